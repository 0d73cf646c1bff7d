//! Benches of the farm itself, each against a local reference measured in the same run:
//!
//! - scheduler throughput: 10,000 items over 1,000 host types pushed then popped,
//!   against the same pushes and pops on a plain `VecDeque` (a naive lower bound on
//!   the cost of any queue, not a competitor: it knows no classes or host types);
//! - dispatch latency: a build queued (its row created by the poller) until its first
//!   step runs, on an in-process coordinator with a local pool, against spawning the
//!   same step (`sh -c 'date +%s%N'`) directly;
//! - farm overhead: one build of `env/examples/hello` (`go vet`, `go test`) through the
//!   farm against the same two commands run directly, both with one warm `GOCACHE`.

use std::collections::VecDeque;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use buildfarm_config::Config;
use buildfarm_scheduler::{Policy, Scheduler, Timestamp, WorkClass, WorkId, WorkItem};
use buildfarm_store::{Build, Store};
use coordinator::app::{Running, StartOptions};

use super::bench::Figure;

const ITEMS: usize = 10_000;
const HOST_TYPES: usize = 1_000;
const SCHED_REPS: usize = 5;
const DISPATCH_BUILDS: usize = 20;
const HELLO_RUNS: usize = 3;

pub async fn farm_benches(release: &Path, out_dir: &Path) -> Result<Vec<Figure>> {
    let mut figures = vec![scheduler_bench()];
    let work = out_dir.join("farm-work");
    std::fs::create_dir_all(&work)?;
    figures.extend(dispatch_latency(release, &work).await?);
    figures.extend(hello_overhead(release, out_dir, &work).await?);
    Ok(figures)
}

// ---- scheduler ----

fn work_items() -> (Vec<WorkItem>, Vec<String>) {
    let base = 1_700_000_000_000_u64;
    let hosts: Vec<String> = (0..HOST_TYPES).map(|h| format!("host-{h:04}")).collect();
    let items = (0..ITEMS)
        .map(|i| {
            let (class, commit_time) = match i % 10 {
                0 => (WorkClass::Interactive, None),
                1..=3 => (WorkClass::Try, None),
                _ => (
                    WorkClass::PostSubmit,
                    Some(Timestamp::from_millis(base - (i as u64 * 7919) % 1_000_000)),
                ),
            };
            WorkItem {
                id: WorkId(format!("build:{i:06}")),
                host_type: hosts[i % HOST_TYPES].clone(),
                class,
                enqueued_at: Timestamp::from_millis(base + i as u64),
                commit_time,
            }
        })
        .collect();
    (items, hosts)
}

fn scheduler_bench() -> Figure {
    let now = Timestamp::from_millis(1_700_000_000_000 + ITEMS as u64);
    let mut sched_total = Vec::with_capacity(SCHED_REPS);
    let mut sched_pop = Vec::with_capacity(SCHED_REPS);
    let mut naive = Vec::with_capacity(SCHED_REPS);
    for _ in 0..SCHED_REPS {
        let (items, hosts) = work_items();
        let mut s = Scheduler::new(Policy::default());
        let t = Instant::now();
        for item in items {
            // Ids are unique and below the policy's limit: a push cannot fail.
            let _ = black_box(s.push(item));
        }
        let t_pop = Instant::now();
        let mut popped = 0;
        for h in &hosts {
            // Bounded: each pop removes an item.
            while let Some(item) = s.pop_next(h, now) {
                black_box(&item);
                popped += 1;
            }
        }
        sched_pop.push(t_pop.elapsed());
        sched_total.push(t.elapsed());
        assert_eq!(popped, ITEMS, "scheduler lost items");

        let (items, _) = work_items();
        let mut q = VecDeque::new();
        let t = Instant::now();
        for item in items {
            q.push_back(black_box(item));
        }
        while let Some(item) = q.pop_front() {
            black_box(&item);
        }
        naive.push(t.elapsed());
    }
    let med = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (total, pop, naive) = (med(sched_total), med(sched_pop), med(naive));
    let rate = |d: Duration| ITEMS as f64 / d.as_secs_f64();
    Figure {
        name: "farm_scheduler_items".into(),
        measured: rate(total),
        baseline: rate(naive),
        unit: "items/s".into(),
        ratio: naive.as_secs_f64() / total.as_secs_f64(),
        note: format!(
            "{ITEMS} items over {HOST_TYPES} host types pushed then popped (pops alone {:.0}/s), median of {SCHED_REPS}; baseline: VecDeque push/pop (naive lower bound)",
            rate(pop)
        ),
    }
}

// ---- an in-process coordinator ----

fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("git")
        .args(["-c", "user.name=bench", "-c", "user.email=bench@localhost"])
        .args(args)
        .current_dir(dir)
        .output()
        .context("running git")?;
    if !out.status.success() {
        bail!("git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Commits a change of `BENCH.txt` (an empty tree cannot be checked out).
fn commit(repo: &Path, msg: &str) -> Result<String> {
    std::fs::write(repo.join("BENCH.txt"), msg)?;
    git(repo, &["add", "BENCH.txt"])?;
    git(repo, &["commit", "--quiet", "-m", msg])?;
    git(repo, &["rev-parse", "HEAD"])
}

/// An in-process coordinator with `config`, its local buildlets the release `buildlet`.
pub(crate) async fn start_coordinator(release: &Path, config: &str) -> Result<Running> {
    let config = Config::from_toml_str(config, "xtask.toml").map_err(|e| anyhow!("{e}"))?;
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    coordinator::app::start(
        config,
        tcp,
        StartOptions {
            buildlet_bin: Some(release.join("buildlet")),
            ..Default::default()
        },
    )
    .await
}

/// Waits (bounded by `within`) for the build of `rev` to be final.
async fn wait_final(
    store: &Arc<dyn Store>,
    repo: &str,
    rev: &str,
    within: Duration,
) -> Result<Build> {
    // Polled often: the dispatch bench times this wait.
    wait_final_by(store, repo, rev, None, Duration::from_millis(10), within).await
}

/// Waits (bounded by `within`, polling every `poll`) for the build of `rev` (by
/// `builder`, if given) to be final.
pub(crate) async fn wait_final_by(
    store: &Arc<dyn Store>,
    repo: &str,
    rev: &str,
    builder: Option<&str>,
    poll: Duration,
    within: Duration,
) -> Result<Build> {
    let start = Instant::now();
    loop {
        let builds = store.builds_for_commits(repo, &[rev.to_owned()]).await?;
        if let Some(b) = builds
            .into_iter()
            .find(|b| b.state.is_final() && builder.is_none_or(|name| b.builder == name))
        {
            return Ok(b);
        }
        if start.elapsed() > within {
            bail!(
                "build of {repo}@{rev}{} not finished within {within:?}",
                builder.map(|b| format!(" by {b}")).unwrap_or_default()
            );
        }
        tokio::time::sleep(poll).await;
    }
}

/// Commits, has the poller queue the build, and waits for it to finish.
async fn one_build(running: &Running, repo: &Path, msg: &str, within: Duration) -> Result<Build> {
    let rev = commit(repo, msg)?;
    let report = coordinator::poller::poll_once(&running.farm).await;
    if let Some(p) = report.problems.first() {
        bail!("polling {}: {}", p.repo, p.error);
    }
    let n = report.enqueued;
    if n != 1 {
        bail!("the poller queued {n} builds for {rev}, expected 1");
    }
    wait_final(running.farm.store(), "r", &rev, within).await
}

fn unix_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(f64::NAN)
}

fn last_stamp_ns(stamps: &Path) -> Result<i128> {
    let text =
        std::fs::read_to_string(stamps).with_context(|| format!("reading {}", stamps.display()))?;
    text.lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .context("no timestamp written by the step")
}

// ---- dispatch latency ----

async fn dispatch_latency(release: &Path, work: &Path) -> Result<Vec<Figure>> {
    let tmp = tempfile::tempdir_in(work)?;
    let repo = tmp.path().join("repo");
    std::fs::create_dir_all(&repo)?;
    git(&repo, &["init", "--quiet", "--initial-branch=main"])?;
    let stamps = tmp.path().join("stamps");
    let config = format!(
        r#"
[coordinator]
listen = "127.0.0.1:0"
data_dir = "{data}"
repo_poll_interval = "1h"
max_attempts = 1

[[host_types]]
name = "local"
pool = {{ kind = "local", count = 1 }}

[[builders]]
name = "linux-amd64-stamp"
host_type = "local"
steps = [{{ name = "stamp", command = ["sh", "-c", "date +%s%N >> {stamps}"] }}]

[[repos]]
name = "r"
url = "{repo}"
branches = ["main"]
"#,
        data = tmp.path().join("data").display(),
        stamps = stamps.display(),
        repo = repo.display(),
    );
    // The first commit exists before start: the start-up poll builds it (a warm-up).
    let rev0 = commit(&repo, "build 0")?;
    let running = start_coordinator(release, &config).await?;
    let result = async {
        let warm = wait_final(running.farm.store(), "r", &rev0, Duration::from_secs(120)).await?;
        if warm.state != buildfarm_store::BuildState::Ok {
            bail!("warm-up build ended {}: {:?}", warm.state, warm.summary);
        }
        let mut farm_ms = Vec::with_capacity(DISPATCH_BUILDS);
        for i in 1..=DISPATCH_BUILDS {
            let b = one_build(
                &running,
                &repo,
                &format!("build {i}"),
                Duration::from_secs(60),
            )
            .await?;
            if b.state != buildfarm_store::BuildState::Ok {
                bail!("build {i} ended {}: {:?}", b.state, b.summary);
            }
            let step_ns = last_stamp_ns(&stamps)?;
            farm_ms.push((step_ns - i128::from(b.created_at) * 1_000_000) as f64 / 1e6);
        }
        Ok(farm_ms)
    }
    .await;
    running.stop(Duration::from_secs(10)).await;
    let farm_ms = result?;

    let mut direct_ms = Vec::with_capacity(DISPATCH_BUILDS);
    for _ in 0..DISPATCH_BUILDS {
        let t0 = unix_ns();
        let out = tokio::process::Command::new("sh")
            .args(["-c", "date +%s%N"])
            .output()
            .await?;
        let ns: i128 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .context("date +%s%N output")?;
        direct_ms.push((ns - t0) as f64 / 1e6);
    }
    let mut figures = vec![];
    for (p, label) in [(0.5, "p50"), (0.99, "p99")] {
        let (m, b) = (
            percentile(farm_ms.clone(), p),
            percentile(direct_ms.clone(), p),
        );
        figures.push(Figure {
            name: format!("farm_dispatch_{label}"),
            measured: m,
            baseline: b,
            unit: "ms".into(),
            ratio: b / m,
            note: format!(
                "{DISPATCH_BUILDS} builds, queued (store row) -> first step runs; local pool starts a buildlet per lease and pushes the source; baseline: spawn the step directly"
            ),
        });
    }
    Ok(figures)
}

// ---- farm overhead on the example module ----

fn go_available() -> bool {
    std::process::Command::new("go")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn copy_dir(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
    for entry in walkdir::WalkDir::new(src).min_depth(1) {
        let entry = entry?;
        let target = dst.join(entry.path().strip_prefix(src)?);
        if entry.file_type().is_dir() {
            std::fs::create_dir_all(&target)?;
        } else if entry.file_type().is_file() {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// `go vet ./...` then `go test ./...` in a fresh copy of `module` (the farm also
/// builds in a fresh workdir each time, and Go's cache keys include the directory).
async fn direct_go(module: &Path, scratch: &Path, gocache: &Path) -> Result<Duration> {
    let dir = scratch.join(format!("direct-{}", uuid_ish()));
    copy_dir(module, &dir)?;
    let t = Instant::now();
    for args in [["vet", "./..."], ["test", "./..."]] {
        let out = tokio::process::Command::new("go")
            .args(args)
            .env("GOCACHE", gocache)
            .current_dir(&dir)
            .output()
            .await
            .context("running go")?;
        if !out.status.success() {
            bail!(
                "go {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let took = t.elapsed();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(took)
}

fn uuid_ish() -> String {
    format!("{:x}", unix_ns())
}

async fn hello_overhead(release: &Path, out_dir: &Path, work: &Path) -> Result<Vec<Figure>> {
    if !go_available() {
        println!("farm_hello_build: skipped, `go` not found (sudo apt-get install golang-go)");
        return Ok(vec![]);
    }
    let module: PathBuf = super::workspace_root().join("env/examples/hello");
    let gocache = out_dir.join("farm-gocache");
    std::fs::create_dir_all(&gocache)?;
    let tmp = tempfile::tempdir_in(work)?;
    let repo = tmp.path().join("repo");
    coordinator::git::import_dir_as_repo(&module, &repo).await?;
    let arch = match std::env::consts::ARCH {
        "aarch64" => "arm64",
        "x86_64" => "amd64",
        other => other,
    };
    let config = format!(
        r#"
[coordinator]
listen = "127.0.0.1:0"
data_dir = "{data}"
repo_poll_interval = "1h"
max_attempts = 1

[[host_types]]
name = "local"
pool = {{ kind = "local", count = 1 }}
env = {{ GOCACHE = "{gocache}" }}

[[builders]]
name = "linux-{arch}"
host_type = "local"
steps = [
  {{ name = "vet", command = ["go", "vet", "./..."] }},
  {{ name = "test", command = ["go", "test", "./..."] }},
]

[[repos]]
name = "r"
url = "{repo}"
branches = ["main"]
"#,
        data = tmp.path().join("data").display(),
        gocache = gocache.display(),
        repo = repo.display(),
    );
    // Warm the cache directly first, then through the farm (the start-up build).
    direct_go(&module, tmp.path(), &gocache).await?;
    let rev0 = git(&repo, &["rev-parse", "HEAD"])?;
    let running = start_coordinator(release, &config).await?;
    let result = async {
        let warm = wait_final(running.farm.store(), "r", &rev0, Duration::from_secs(300)).await?;
        if warm.state != buildfarm_store::BuildState::Ok {
            bail!(
                "warm-up hello build ended {}: {:?}",
                warm.state,
                warm.summary
            );
        }
        let mut farm = Vec::with_capacity(HELLO_RUNS);
        for i in 1..=HELLO_RUNS {
            let b = one_build(
                &running,
                &repo,
                &format!("run {i}"),
                Duration::from_secs(300),
            )
            .await?;
            if b.state != buildfarm_store::BuildState::Ok {
                bail!("hello build {i} ended {}: {:?}", b.state, b.summary);
            }
            let end = b.finished_at.context("final build without finished_at")?;
            farm.push(Duration::from_millis((end - b.created_at).max(0) as u64));
        }
        Ok(farm)
    }
    .await;
    running.stop(Duration::from_secs(10)).await;
    let farm = result?;
    let mut direct = Vec::with_capacity(HELLO_RUNS);
    for _ in 0..HELLO_RUNS {
        direct.push(direct_go(&module, tmp.path(), &gocache).await?);
    }
    let med = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (f, d) = (med(farm), med(direct));
    Ok(vec![Figure {
        name: "farm_hello_build".into(),
        measured: f.as_secs_f64(),
        baseline: d.as_secs_f64(),
        unit: "s".into(),
        ratio: d.as_secs_f64() / f.as_secs_f64(),
        note: format!(
            "env/examples/hello go vet + go test, warm GOCACHE, median of {HELLO_RUNS}; farm: queued -> finished; baseline: same commands in a fresh copy"
        ),
    }])
}
