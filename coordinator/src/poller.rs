//! Post-submit work discovery: poll every watched branch of every repo (and poll at
//! once when a push webhook arrives), record new commits, and enqueue one build per
//! builder for each. The store's uniqueness makes this idempotent across restarts.

use std::sync::Arc;
use std::time::Duration;

use buildfarm_store::{BuildKind, Commit, NewBuild};
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::farm::Farm;

/// How many of a branch's newest commits are considered on each poll; older history is
/// not backfilled beyond this.
pub const BACKFILL_DEPTH: usize = 10;

pub async fn poll_loop(farm: Arc<Farm>, kick: Arc<Notify>) {
    let interval = farm.config.coordinator.repo_poll_interval;
    loop {
        if let Err(e) = poll_once(&farm).await {
            warn!(error = %format!("{e:#}"), "polling repos");
        }
        tokio::select! {
            _ = farm.shutdown.cancelled() => return,
            _ = kick.notified() => debug!("poll requested"),
            _ = tokio::time::sleep(interval.max(Duration::from_millis(200))) => {}
        }
    }
}

/// One pass over every repo and branch. Returns how many builds were enqueued.
pub async fn poll_once(farm: &Arc<Farm>) -> anyhow::Result<usize> {
    let mut enqueued = 0;
    for repo in &farm.config.repos {
        let Some(mirror) = farm.mirrors.get(&repo.name) else {
            continue;
        };
        if let Err(e) = mirror.fetch().await {
            warn!(repo = %repo.name, error = %format!("{e:#}"), "fetch failed");
            continue;
        }
        for branch in &repo.branches {
            let commits = mirror.log(branch, BACKFILL_DEPTH).await?;
            let builders = farm.config.builders_for(&repo.name, branch);
            // Oldest first so that, on equal commit times, insertion order is stable.
            for c in commits.iter().rev() {
                let commit_time_ms = c.commit_time.saturating_mul(1000);
                farm.store
                    .upsert_commit(&Commit {
                        repo: repo.name.clone(),
                        branch: branch.clone(),
                        hash: c.hash.clone(),
                        parents: c.parents.clone(),
                        author: c.author.clone(),
                        message: c.subject.clone(),
                        commit_time: commit_time_ms,
                    })
                    .await?;
                for builder in &builders {
                    let new = NewBuild {
                        kind: BuildKind::PostSubmit,
                        repo: repo.name.clone(),
                        branch: Some(branch.clone()),
                        rev: c.hash.clone(),
                        builder: builder.name.clone(),
                        try_id: None,
                    };
                    if let Some(build) = farm.store.enqueue_build(&new).await? {
                        farm.enqueue(&build, Some(commit_time_ms))?;
                        farm.notify_build(&build.id, None);
                        enqueued += 1;
                    }
                }
            }
        }
    }
    Ok(enqueued)
}
