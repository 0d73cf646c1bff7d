//! The multi-host chaos suite: PostgreSQL, the coordinator, reverse buildlets and the
//! docker pool's listen-mode buildlets, each in its own container on a private Docker
//! network (see `chaos_env`). A stream of post-submit commits runs through each
//! scenario while a fault is injected; each scenario ends by checking, from PostgreSQL
//! (read directly) and the coordinator's JSON API, that every build has exactly one
//! final result and that its log kept its marker. The table is printed and written to
//! `target/chaos/chaos-<mode>.json`; any lost or duplicated result fails the test.
//!
//! Short form (about two to three minutes): with `BUILDFARM_SLOW_TESTS=1` or `CI=true`.
//! Full form (more builds, every scenario, a 30 s database outage): `cargo xtask chaos`
//! (`BUILDFARM_CHAOS=full`). Without a Docker engine or PostgreSQL it skips with a note,
//! and fails under `CI=true`.

mod chaos_env;
mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use buildfarm_store::{BuildState, Store};
use chaos_env::tally::{self, Counts, Expected, Observed, ScenarioReport};
use chaos_env::{ChaosFarm, docker};

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// kill -9 a reverse buildlet running a build and a listen-mode container; the
    /// reverse one is started again (the docker pool makes new containers itself).
    KillBuildlets { rounds: usize },
    /// `docker network disconnect` a reverse buildlet running a build, then reconnect.
    PartitionReverse,
    /// `docker restart` (SIGTERM, then start) of the coordinator mid-run.
    RestartCoordinator,
    /// kill -9 of the coordinator mid-run, then start.
    KillCoordinator,
    /// PostgreSQL stopped for this long mid-run.
    PostgresDown(Duration),
    /// A reverse buildlet whose workdir is a tmpfs too small for the step's scratch
    /// file replaces the others in the pool for the scenario.
    DiskFull,
}

struct Plan {
    name: &'static str,
    commits: usize,
    interval: Duration,
    settle: Duration,
    scenarios: Vec<(&'static str, Fault)>,
}

fn plan() -> Option<Plan> {
    if std::env::var("BUILDFARM_CHAOS").as_deref() == Ok("full") {
        return Some(Plan {
            name: "full",
            // The poller looks at a branch's 10 newest commits: a scenario stays below.
            commits: 8,
            interval: Duration::from_secs(2),
            settle: Duration::from_secs(420),
            scenarios: vec![
                ("kill-buildlets", Fault::KillBuildlets { rounds: 3 }),
                ("partition-reverse", Fault::PartitionReverse),
                ("restart-coordinator", Fault::RestartCoordinator),
                ("kill-coordinator", Fault::KillCoordinator),
                (
                    "postgres-down-30s",
                    Fault::PostgresDown(Duration::from_secs(30)),
                ),
                ("disk-full", Fault::DiskFull),
            ],
        });
    }
    let ci = std::env::var("CI").as_deref() == Ok("true");
    if ci || std::env::var("BUILDFARM_SLOW_TESTS").as_deref() == Ok("1") {
        return Some(Plan {
            name: "short",
            commits: 3,
            interval: Duration::from_secs(1),
            settle: Duration::from_secs(300),
            scenarios: vec![
                ("kill-buildlets", Fault::KillBuildlets { rounds: 1 }),
                ("partition-reverse", Fault::PartitionReverse),
                ("restart-coordinator", Fault::RestartCoordinator),
                ("kill-coordinator", Fault::KillCoordinator),
                (
                    "postgres-down-10s",
                    Fault::PostgresDown(Duration::from_secs(10)),
                ),
                ("disk-full", Fault::DiskFull),
            ],
        });
    }
    None
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_every_build_has_one_result_and_its_log() {
    let Some(plan) = plan() else {
        eprintln!(
            "note: skipping the chaos suite (set BUILDFARM_SLOW_TESTS=1, or run `cargo xtask chaos`)"
        );
        return;
    };
    if let Err(e) = chaos_env::prerequisites().await {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CI=true but the chaos suite cannot run: {e:#}");
        }
        eprintln!("note: skipping the chaos suite: {e:#}");
        return;
    }
    buildfarm_tls::install_crypto_provider();
    let started = Instant::now();
    let bin_dir = common::bin_dir();
    common::buildlet_bin();
    let images = chaos_env::images(&bin_dir).await.expect("images");
    let images_secs = started.elapsed().as_secs_f64();
    let mut farm = ChaosFarm::start(images, 2).await.expect("start the farm");
    // The repo's first commit is built too; out of the way before any fault, so that
    // every build running during a scenario is the scenario's.
    let initial = chaos_env::git(&farm.repo(), &["rev-parse", "HEAD"]).expect("initial commit");
    wait_final(&farm, &[initial], 2, Duration::from_secs(180))
        .await
        .expect("the initial commit's builds");
    let farm_secs = started.elapsed().as_secs_f64() - images_secs;
    eprintln!("chaos: images {images_secs:.1}s, farm up {farm_secs:.1}s");

    let mut reports = Vec::new();
    for (name, fault) in &plan.scenarios {
        let at = Instant::now();
        let report = match run_scenario(&mut farm, &plan, name, *fault).await {
            Ok(r) => r,
            Err(e) => panic!(
                "scenario {name}: {e:#}\n--- coordinator log:\n{}",
                farm.logs(&farm.coord).await
            ),
        };
        eprintln!(
            "chaos: {name} in {:.1}s: {:?}",
            at.elapsed().as_secs_f64(),
            report.counts
        );
        reports.push(report);
    }
    let table = tally::render(&reports);
    eprintln!("{table}");
    let out_dir = bin_dir
        .parent()
        .map(|p| p.join("chaos"))
        .expect("target dir");
    std::fs::create_dir_all(&out_dir).expect("mkdir target/chaos");
    let json = serde_json::json!({
        "mode": plan.name,
        "images_secs": images_secs,
        "farm_start_secs": farm_secs,
        "total_secs": started.elapsed().as_secs_f64(),
        "scenarios": reports,
    });
    let path = out_dir.join(format!("chaos-{}.json", plan.name));
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json).expect("json") + "\n",
    )
    .expect("write the report");
    eprintln!("chaos: wrote {}", path.display());

    let bad: Vec<_> = reports
        .iter()
        .filter(|r| r.counts.lost > 0 || r.counts.duplicated > 0 || r.counts.mismatched > 0)
        .collect();
    assert!(
        bad.is_empty(),
        "lost, duplicated or inconsistent results:\n{table}\n{:#?}\n--- coordinator log:\n{}",
        bad.iter()
            .map(|r| (&r.scenario, &r.counts.problems))
            .collect::<Vec<_>>(),
        farm.logs(&farm.coord).await
    );
    drop(farm);
}

/// Pushes the scenario's commits (the first at once, the rest every `interval` in the
/// background), injects the fault once a build of the scenario runs, waits for every
/// build to be final, and tallies.
async fn run_scenario(
    farm: &mut ChaosFarm,
    plan: &Plan,
    name: &str,
    fault: Fault,
) -> Result<ScenarioReport> {
    let markers: Vec<String> = (0..plan.commits).map(|i| farm.marker(name, i)).collect();
    let repo = farm.repo();
    let first = chaos_env::commit(&repo, &markers[0])?;
    let rest = markers[1..].to_vec();
    let interval = plan.interval;
    let stream = tokio::spawn(async move {
        let mut pushed = Vec::new();
        for m in rest {
            tokio::time::sleep(interval).await;
            let repo = repo.clone();
            let m2 = m.clone();
            let hash = tokio::task::spawn_blocking(move || chaos_env::commit(&repo, &m2))
                .await
                .context("commit task")??;
            pushed.push((hash, m));
        }
        anyhow::Ok(pushed)
    });

    // A fault only means something while a build of the scenario runs.
    if !matches!(fault, Fault::DiskFull) {
        wait_running(farm, &first, Duration::from_secs(120)).await?;
    }
    let fault_ms = now_ms();
    let fault_at = Instant::now();
    let (mut detect, mut detected_by, buildlet_filter) = inject(farm, fault).await?;

    let mut commits = vec![(first, markers[0].clone())];
    commits.extend(stream.await.context("stream task")??);
    let expected: Vec<Expected> = commits
        .iter()
        .flat_map(|(rev, marker)| {
            [chaos_env::REVERSE_BUILDER, chaos_env::LISTEN_BUILDER].map(|b| Expected {
                rev: rev.clone(),
                builder: b.to_owned(),
                marker: marker.clone(),
            })
        })
        .collect();
    let hashes: Vec<String> = commits.iter().map(|(h, _)| h.clone()).collect();
    wait_final(farm, &hashes, expected.len(), plan.settle).await?;
    let settle_secs = fault_at.elapsed().as_secs_f64();
    if let Fault::DiskFull = fault {
        docker(&["rm", "-f", &farm.disk_full_name()]).await?;
        for r in &farm.reverse {
            docker(&["start", r]).await?;
        }
        farm.wait_reverse_connected(&farm.reverse.clone(), Duration::from_secs(120))
            .await?;
    }
    let observed = observe(farm, &hashes).await?;
    if detect.is_none() {
        // The farm noticed when it closed an attempt as failed after the fault.
        detect = first_failed_attempt(farm, &hashes, fault_ms, &buildlet_filter)
            .await?
            .map(|ms| (ms - fault_ms).max(0) as f64 / 1000.0);
        if detect.is_none() {
            detected_by = format!("{detected_by} (no attempt was interrupted)");
        }
    }
    let counts: Counts = tally::tally(&expected, &observed);
    Ok(ScenarioReport {
        scenario: name.to_owned(),
        counts,
        detect_secs: detect,
        detected_by,
        settle_secs,
    })
}

/// Injects the fault. Returns the detection time if it was observed directly, what
/// detection means, and which buildlets' attempts count for it (prefixes).
async fn inject(farm: &mut ChaosFarm, fault: Fault) -> Result<(Option<f64>, String, Vec<String>)> {
    match fault {
        Fault::KillBuildlets { rounds } => {
            let mut filter = Vec::new();
            let mut done = 0;
            for round in 0..rounds {
                let victim = if round == 0 {
                    running_reverse(farm, Duration::from_secs(60)).await?
                } else {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    // Later rounds only while the stream still has builds running.
                    match running_reverse(farm, Duration::from_secs(20)).await {
                        Ok(v) => v,
                        Err(_) => break,
                    }
                };
                done += 1;
                let listen = farm.listen_buildlets().await?;
                docker(&["kill", "-s", "KILL", &victim]).await?;
                filter.push(format!("reverse/{victim}"));
                if let Some(c) = pick(&listen) {
                    // The pool may be removing it already.
                    let _ = docker(&["kill", "-s", "KILL", c]).await;
                    filter.push("docker/".to_owned());
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                docker(&["start", &victim]).await?;
            }
            Ok((
                None,
                format!("first attempt on a killed buildlet closed (store); {done} round(s)"),
                filter,
            ))
        }
        Fault::PartitionReverse => {
            let victim = running_reverse(farm, Duration::from_secs(60)).await?;
            let at = Instant::now();
            docker(&["network", "disconnect", "-f", &farm.network, &victim]).await?;
            let deadline = at + Duration::from_secs(120);
            let detect = loop {
                let connected = farm.connected_reverse().await?;
                if !connected.contains(&victim) {
                    break at.elapsed().as_secs_f64();
                }
                if Instant::now() > deadline {
                    bail!("the coordinator still lists {victim} 120 s after its partition");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            docker(&["network", "connect", &farm.network, &victim]).await?;
            let healed = Instant::now();
            farm.wait_reverse_connected(std::slice::from_ref(&victim), Duration::from_secs(180))
                .await?;
            Ok((
                Some(detect),
                format!(
                    "host gone from /api/status (back {:.1}s after the heal)",
                    healed.elapsed().as_secs_f64()
                ),
                vec![],
            ))
        }
        Fault::RestartCoordinator | Fault::KillCoordinator => {
            if let Fault::KillCoordinator = fault {
                docker(&["kill", "-s", "KILL", &farm.coord]).await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
                docker(&["start", &farm.coord]).await?;
            } else {
                docker(&["restart", "-t", "20", &farm.coord]).await?;
            }
            farm.wait_coordinator(Duration::from_secs(120)).await?;
            Ok((
                None,
                "restarted coordinator closed an interrupted attempt (store)".into(),
                vec![],
            ))
        }
        Fault::PostgresDown(down) => {
            let at = Instant::now();
            docker(&["stop", "-t", "2", &farm.pg]).await?;
            let mut detect = None;
            while at.elapsed() < down {
                if detect.is_none()
                    && farm
                        .status()
                        .await
                        .is_ok_and(|s| s["store"]["ok"] == serde_json::Value::Bool(false))
                {
                    detect = Some(at.elapsed().as_secs_f64());
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            docker(&["start", &farm.pg]).await?;
            farm.wait_postgres(Duration::from_secs(60)).await?;
            Ok((detect, "store not ok on /api/status".into(), vec![]))
        }
        Fault::DiskFull => {
            // The other reverse buildlets step aside (until the scenario ends), so the
            // reverse builds must land on the full disk.
            for r in &farm.reverse {
                docker(&["stop", "-t", "5", r]).await?;
            }
            let name = farm.disk_full_name();
            farm.run_reverse(&name, Some("192k")).await?;
            farm.wait_reverse_connected(std::slice::from_ref(&name), Duration::from_secs(120))
                .await?;
            Ok((
                None,
                "first step failing on the full buildlet (store)".into(),
                vec![format!("reverse/{name}")],
            ))
        }
    }
}

fn pick(items: &[String]) -> Option<&String> {
    if items.is_empty() {
        return None;
    }
    items.get(rand::random::<u32>() as usize % items.len())
}

/// Until a build of `rev` has started (the store says so).
async fn wait_running(farm: &ChaosFarm, rev: &str, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    let revs = [rev.to_owned()];
    loop {
        let last = match builds(farm, &revs).await {
            Ok(b) if b.iter().any(|b| b.started_at.is_some()) => return Ok(()),
            Ok(b) => format!("{b:?}"),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!("no build of {rev} started within {limit:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A reverse buildlet running a build now (a random one of those).
async fn running_reverse(farm: &ChaosFarm, limit: Duration) -> Result<String> {
    let deadline = Instant::now() + limit;
    loop {
        let status = farm.status().await;
        let last = match &status {
            Ok(s) => s["active"].to_string(),
            Err(e) => format!("{e:#}"),
        };
        if let Ok(s) = status {
            let busy: Vec<String> = s["active"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|b| b["buildlet"].as_str()?.strip_prefix("reverse/"))
                        .filter(|n| farm.reverse.iter().any(|r| r == n))
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            if let Some(v) = pick(&busy) {
                return Ok(v.clone());
            }
        }
        if Instant::now() > deadline {
            bail!("no reverse buildlet ran a build within {limit:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Until every build of `hashes` is final (and there are at least `expected` rows).
async fn wait_final(
    farm: &ChaosFarm,
    hashes: &[String],
    expected: usize,
    limit: Duration,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let last = match builds(farm, hashes).await {
            Ok(b) => {
                let unfinished = b.iter().filter(|b| !b.state.is_final()).count();
                if b.len() >= expected && unfinished == 0 {
                    return Ok(());
                }
                format!(
                    "{} of {expected} recorded, {unfinished} unfinished",
                    b.len()
                )
            }
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            // Not an error here: the tally counts what never finished as lost.
            eprintln!("chaos: builds not final within {limit:?}: {last}");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn builds(farm: &ChaosFarm, hashes: &[String]) -> Result<Vec<buildfarm_store::Build>> {
    let store = farm.store().await?;
    let b = store
        .builds_for_commits(chaos_env::REPO, hashes)
        .await
        .map_err(|e| anyhow::anyhow!("builds_for_commits: {e}"));
    store.close().await;
    b
}

/// Each build of `hashes` as the store and the API have it.
async fn observe(farm: &ChaosFarm, hashes: &[String]) -> Result<Vec<Observed>> {
    let store = farm.store().await?;
    let rows = store
        .builds_for_commits(chaos_env::REPO, hashes)
        .await
        .map_err(|e| anyhow::anyhow!("builds_for_commits: {e}"))?;
    let mut out = Vec::new();
    for b in rows {
        let attempts = store
            .list_attempts(&b.id)
            .await
            .map_err(|e| anyhow::anyhow!("attempts of {}: {e}", b.id))?;
        let store_log = store
            .get_log(&b.id)
            .await
            .map_err(|e| anyhow::anyhow!("log of {}: {e}", b.id))?
            .map(|l| String::from_utf8_lossy(&l).into_owned());
        let api: Option<serde_json::Value> = farm
            .get(&format!("/api/builds/{}", b.id))
            .await
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let api_state = api.and_then(|v| {
            v.get("state")
                .or_else(|| v.get("build").and_then(|b| b.get("state")))
                .and_then(|s| s.as_str())
                .map(str::to_owned)
        });
        let api_log = farm.get(&format!("/log/{}", b.id)).await.ok();
        out.push(Observed {
            id: b.id.clone(),
            rev: b.rev.clone(),
            builder: b.builder.clone(),
            state: b.state.as_str().to_owned(),
            attempts: b.attempts,
            ok_attempts: attempts
                .iter()
                .filter(|a| a.state == Some(BuildState::Ok))
                .count() as u32,
            store_log,
            api_state,
            api_log,
        });
    }
    store.close().await;
    Ok(out)
}

/// When the first attempt of these builds (on a buildlet matching a prefix of
/// `filter`, or any when it is empty) closed without `ok` at or after `since_ms`.
async fn first_failed_attempt(
    farm: &ChaosFarm,
    hashes: &[String],
    since_ms: i64,
    filter: &[String],
) -> Result<Option<i64>> {
    let store: std::sync::Arc<dyn Store> = farm.store().await?;
    let rows = store
        .builds_for_commits(chaos_env::REPO, hashes)
        .await
        .map_err(|e| anyhow::anyhow!("builds_for_commits: {e}"))?;
    let mut first: Option<i64> = None;
    for b in rows {
        let attempts = store
            .list_attempts(&b.id)
            .await
            .map_err(|e| anyhow::anyhow!("attempts of {}: {e}", b.id))?;
        for a in attempts {
            let matches = filter.is_empty() || filter.iter().any(|f| a.buildlet.starts_with(f));
            if let (Some(end), Some(state)) = (a.finished_at, a.state)
                && state != BuildState::Ok
                && end >= since_ms
                && matches
            {
                first = Some(first.map_or(end, |f| f.min(end)));
            }
        }
    }
    store.close().await;
    Ok(first)
}

// The verdict's own tests (pure; they run without Docker).

fn exp(rev: &str, builder: &str, marker: &str) -> Expected {
    Expected {
        rev: rev.into(),
        builder: builder.into(),
        marker: marker.into(),
    }
}

fn obs(rev: &str, builder: &str, state: &str, log: &str) -> Observed {
    Observed {
        id: format!("{rev}-{builder}"),
        rev: rev.into(),
        builder: builder.into(),
        state: state.into(),
        attempts: 1,
        ok_attempts: u32::from(state == "ok"),
        store_log: Some(log.into()),
        api_state: Some(state.into()),
        api_log: Some(log.into()),
    }
}

#[test]
fn a_clean_run_counts_no_loss_and_no_duplicate() {
    let e = [exp("a1", "b", "m1"), exp("a2", "b", "m2")];
    let mut retried = obs("a2", "b", "ok", "begin-m2\nlost\nbegin-m2\ndone-m2\n");
    retried.attempts = 2;
    let c = tally::tally(&e, &[obs("a1", "b", "ok", "begin-m1\ndone-m1\n"), retried]);
    assert_eq!(
        (
            c.builds,
            c.ok,
            c.retried,
            c.lost,
            c.duplicated,
            c.mismatched
        ),
        (2, 2, 1, 0, 0, 0),
        "{c:?}"
    );
}

#[test]
fn missing_unfinished_and_markerless_builds_are_lost() {
    let e = [
        exp("a1", "b", "m1"),
        exp("a2", "b", "m2"),
        exp("a3", "b", "m3"),
        exp("a4", "b", "m4"),
    ];
    let mut api_lost = obs("a4", "b", "ok", "begin-m4\ndone-m4\n");
    api_lost.api_log = Some(String::new());
    let c = tally::tally(
        &e,
        &[
            obs("a2", "b", "running", ""),
            obs("a3", "b", "ok", "begin-m3\n"),
            api_lost,
        ],
    );
    assert_eq!(c.lost, 4, "{c:?}");
    assert_eq!(c.duplicated, 0, "{c:?}");
}

#[test]
fn second_rows_ok_attempts_and_repeated_markers_are_duplicates() {
    let e = [
        exp("a1", "b", "m1"),
        exp("a2", "b", "m2"),
        exp("a3", "b", "m3"),
    ];
    let mut twice_ok = obs("a2", "b", "ok", "begin-m2\ndone-m2\n");
    twice_ok.ok_attempts = 2;
    let c = tally::tally(
        &e,
        &[
            obs("a1", "b", "ok", "begin-m1\ndone-m1\n"),
            obs("a1", "b", "ok", "begin-m1\ndone-m1\n"),
            twice_ok,
            obs("a3", "b", "ok", "begin-m3\ndone-m3\ndone-m3\n"),
        ],
    );
    // a3's marker is repeated in both the store's and the API's copy.
    assert_eq!(c.duplicated, 4, "{c:?}");
    assert_eq!(c.lost, 0, "{c:?}");
}

#[test]
fn a_failed_step_is_a_result_and_api_disagreement_is_counted() {
    let e = [exp("a1", "b", "m1"), exp("a2", "b", "m2")];
    let mut disagree = obs("a2", "b", "ok", "begin-m2\ndone-m2\n");
    disagree.api_state = Some("running".into());
    let c = tally::tally(
        &e,
        &[
            obs("a1", "b", "failed", "begin-m1\nNo space left on device\n"),
            disagree,
        ],
    );
    assert_eq!((c.failed, c.lost, c.mismatched), (1, 0, 1), "{c:?}");
}
