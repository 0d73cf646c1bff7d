//! Post-submit work discovery: poll every watched branch of every repo (and poll at
//! once when a push webhook arrives), record new commits, and enqueue one build per
//! builder for each. The store's uniqueness makes this idempotent across restarts.
//! A failure is confined to its repo (fetch) or branch (log, store): the pass goes on
//! with the others, and the failures are shown on the status page until they clear.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use buildfarm_store::{BuildKind, Commit, NewBuild};
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::farm::{Farm, PollProblem, now_ms};
use crate::git::Mirror;

/// How many of a branch's newest commits are considered on each poll; older history is
/// not backfilled beyond this.
pub const BACKFILL_DEPTH: usize = 10;

pub async fn poll_loop(farm: Arc<Farm>, kick: Arc<Notify>) {
    let interval = farm.config().coordinator.repo_poll_interval;
    loop {
        poll_once(&farm).await;
        tokio::select! {
            _ = farm.shutdown_token().cancelled() => return,
            _ = kick.notified() => debug!("poll requested"),
            _ = tokio::time::sleep(interval.max(Duration::from_millis(200))) => {}
        }
    }
}

/// What one pass did.
#[derive(Debug, Default)]
pub struct PollReport {
    pub enqueued: usize,
    pub problems: Vec<PollProblem>,
}

/// One pass over every repo and branch; the farm's poll problems become this pass's.
pub async fn poll_once(farm: &Arc<Farm>) -> PollReport {
    let mut report = PollReport::default();
    for repo in &farm.config().repos {
        let Some(mirror) = farm.mirror(&repo.name) else {
            continue;
        };
        let problem = |branch: Option<&str>, e: anyhow::Error| {
            let error = mirror.scrub(&format!("{e:#}"));
            warn!(repo = %repo.name, branch, %error, "polling failed");
            PollProblem {
                repo: repo.name.clone(),
                branch: branch.map(str::to_owned),
                error,
                at_unix_ms: now_ms(),
            }
        };
        if let Err(e) = mirror.fetch().await {
            report.problems.push(problem(None, e));
            continue;
        }
        for branch in &repo.branches {
            match poll_branch(farm, mirror, &repo.name, branch).await {
                Ok(n) => report.enqueued += n,
                Err(e) => report.problems.push(problem(Some(branch), e)),
            }
        }
    }
    farm.set_poll_problems(report.problems.clone());
    report
}

async fn poll_branch(
    farm: &Farm,
    mirror: &Mirror,
    repo: &str,
    branch: &str,
) -> anyhow::Result<usize> {
    let commits = mirror.log(branch, BACKFILL_DEPTH).await?;
    let builders = farm.config().builders_for(repo, branch);
    let mut enqueued = 0;
    // Oldest first so that, on equal commit times, insertion order is stable.
    for c in commits.iter().rev() {
        let commit_time_ms = c.commit_time.saturating_mul(1000);
        farm.store()
            .upsert_commit(&Commit {
                repo: repo.to_owned(),
                branch: branch.to_owned(),
                hash: c.hash.clone(),
                parents: c.parents.clone(),
                author: c.author.clone(),
                message: c.subject.clone(),
                commit_time: commit_time_ms,
            })
            .await
            .with_context(|| format!("recording commit {}", c.hash))?;
        for builder in &builders {
            let new = NewBuild {
                kind: BuildKind::PostSubmit,
                repo: repo.to_owned(),
                branch: Some(branch.to_owned()),
                rev: c.hash.clone(),
                builder: builder.name.clone(),
                try_id: None,
            };
            if farm
                .enqueue_new(&new, Some(commit_time_ms))
                .await
                .with_context(|| format!("queueing {} on {}", c.hash, builder.name))?
                .is_some()
            {
                enqueued += 1;
            }
        }
    }
    Ok(enqueued)
}
