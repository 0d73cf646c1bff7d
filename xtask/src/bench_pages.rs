//! Bench of the dashboard grid: the first page of a repo with 10,000 commits x 100
//! builders (a million builds) in a SQLite store filled here, queried and rendered as
//! the server does, against rendering the page of an empty store in the same run.
//! The grid should cost about the same whatever the history's size: it reads one page of
//! commits and the builds of that page only.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use askama::Template;
use buildfarm_store::{BuildKind, BuildState, Commit, NewBuild, Store};
use coordinator::http::dashboard::{self, DashQuery, PAGE_SIZE};

use super::bench::Figure;

const COMMITS: usize = 10_000;
const BUILDERS: usize = 100;
const RUNS: usize = 15;
/// Concurrent writers while filling; SQLite serializes them, this only hides latency.
const FILLERS: usize = 4;

fn builders() -> Vec<String> {
    (0..BUILDERS)
        .map(|i| format!("linux-amd64-b{i:03}"))
        .collect()
}

async fn fill(store: &std::sync::Arc<dyn Store>) -> Result<()> {
    let t0 = 1_700_000_000_000_i64;
    for i in 0..COMMITS {
        store
            .upsert_commit(&Commit {
                repo: "go".into(),
                branch: "master".into(),
                hash: format!("{i:040x}"),
                parents: vec![],
                author: "Gopher <g@example.com>".into(),
                message: format!("pkg{}: change number {i}\n\nA body.", i % 37),
                commit_time: t0 + i as i64 * 60_000,
            })
            .await
            .context("inserting a commit")?;
    }
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..FILLERS {
        let store = store.clone();
        tasks.spawn(async move {
            let names = builders();
            for i in (w..COMMITS).step_by(FILLERS) {
                for b in &names {
                    store
                        .enqueue_build(&NewBuild {
                            kind: BuildKind::PostSubmit,
                            repo: "go".into(),
                            branch: Some("master".into()),
                            rev: format!("{i:040x}"),
                            builder: b.clone(),
                            try_id: None,
                        })
                        .await
                        .context("enqueueing a build")?;
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.context("filler task")??;
    }
    // Give the newest commits (the first page) a mix of results, as a real grid has.
    let newest: Vec<String> = (COMMITS - PAGE_SIZE as usize..COMMITS)
        .map(|i| format!("{i:040x}"))
        .collect();
    for (n, b) in store
        .builds_for_commits("go", &newest)
        .await?
        .into_iter()
        .enumerate()
    {
        let state = match n % 10 {
            0 => BuildState::Failed,
            1 => continue,
            2 => BuildState::InfraFailure,
            _ => BuildState::Ok,
        };
        store.start_attempt(&b.id, "bench").await?;
        store
            .finish_build(&b.id, state, Some("bench"), b"log\n")
            .await?;
    }
    Ok(())
}

/// Median time to query and render the first dashboard page, and its size in bytes.
async fn time_page(store: &dyn Store) -> Result<(Duration, usize)> {
    let q = DashQuery {
        repo: Some("go".into()),
        branch: Some("master".into()),
        page: None,
    };
    let names = builders();
    let mut times = Vec::with_capacity(RUNS);
    let mut size = 0;
    for _ in 0..RUNS {
        let start = Instant::now();
        let input = dashboard::gather(store, &q, |_, _| names.clone())
            .await
            .map_err(|e| anyhow::anyhow!("dashboard: {e}"))?;
        let html = dashboard::dashboard_view(input, 1_800_000_000_000).render()?;
        times.push(start.elapsed());
        size = html.len();
    }
    times.sort();
    Ok((times[times.len() / 2], size))
}

pub async fn pages_benches() -> Result<Vec<Figure>> {
    let tmp = tempfile::tempdir().context("temp dir for the bench stores")?;
    let url = |name: &str| format!("sqlite://{}", tmp.path().join(name).display());
    let empty = buildfarm_store::open(&url("empty.db")).await?;
    let full = buildfarm_store::open(&url("full.db")).await?;
    let start = Instant::now();
    fill(&full).await?;
    println!(
        "pages: filled {COMMITS} commits x {BUILDERS} builders in {:.1}s",
        start.elapsed().as_secs_f64()
    );
    let (base, base_size) = time_page(empty.as_ref()).await?;
    let (grid, grid_size) = time_page(full.as_ref()).await?;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Ok(vec![Figure {
        name: "dashboard_grid_10k_x_100".into(),
        measured: ms(grid),
        baseline: ms(base),
        unit: "ms".into(),
        ratio: ms(base) / ms(grid).max(1e-9),
        note: format!(
            "first page ({PAGE_SIZE} commits, {grid_size} bytes) of 10k x 100 vs empty page ({base_size} bytes); median of {RUNS}"
        ),
    }])
}
