//! A big fleet on one coordinator: a real `coordinator` process (so its memory and CPU
//! are its own), 5,000 reverse buildlets dialling it from five `buildlet-fleet`
//! processes (the real buildlet service over real revdial tunnels, one host type per
//! process), and 1,000 builds queued for a host type no host serves (100 builders ×
//! the 10 newest commits the poller takes). Measured, each against the same figure on
//! the same coordinator before the fleet connected:
//!
//! - p50/p99 latency of the status page `/`, the dashboard `/dashboard` and a gRPC call
//!   (`ListInstances` through `coordinator::client::FarmClient`), each on a kept-alive
//!   connection, with the fleet connected and the builds queued;
//! - the coordinator's memory per tunnel and its CPU at idle;
//! - time until every host is connected from a cold start (all dial at once);
//! - a mass reconnect: one fleet process (1,000 hosts) is SIGKILLed and started again
//!   at once; time until all are back, while the status page and the API are probed
//!   every 100 ms (their worst latency and any failure are reported).
//!
//! `BUILDFARM_BENCH_FLEET_HOSTS=N` changes the fleet size (hosts are split into
//! processes of at most 1,000; the mass reconnect is one such process).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use coordinator::client::FarmClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::bench::Figure;
use super::bench_revdial::{child_cpu_time, proc_rss_kib, raise_nofile};

/// Hosts per `buildlet-fleet` process: also how many a mass reconnect loses.
const GROUP: usize = 1000;
const QUEUED_BUILDERS: usize = 100;
/// The poller queues a branch's 10 newest commits for each builder.
const COMMITS: usize = 10;
const QUEUED_HOST_TYPE: &str = "queued-linux";
/// Requests per page and per phase.
const SAMPLES: usize = 200;
/// How long the idle fleet is watched for CPU.
const IDLE: Duration = Duration::from_secs(20);
/// Bound on every wait for the fleet; generous for a loaded two-core machine.
const FLEET_WAIT: Duration = Duration::from_secs(600);

fn fleet_hosts() -> Result<usize> {
    match std::env::var("BUILDFARM_BENCH_FLEET_HOSTS") {
        Ok(s) => {
            let n: usize = s
                .parse()
                .with_context(|| format!("BUILDFARM_BENCH_FLEET_HOSTS={s:?} is not a count"))?;
            if !(1..=15_000).contains(&n) {
                bail!("BUILDFARM_BENCH_FLEET_HOSTS must be in 1..=15000 (file descriptors)");
            }
            Ok(n)
        }
        Err(_) => Ok(5000),
    }
}

fn host_type(group: usize) -> String {
    format!("fleet-{group}")
}

fn git(dir: &Path, args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("git")
        .args(["-c", "user.name=bench", "-c", "user.email=bench@localhost"])
        .args(args)
        .current_dir(dir)
        .output()
        .context("running git")?;
    if !out.status.success() {
        bail!("git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn make_repo(repo: &Path) -> Result<()> {
    std::fs::create_dir_all(repo)?;
    git(repo, &["init", "--quiet", "--initial-branch=main"])?;
    for i in 0..COMMITS {
        std::fs::write(repo.join("n.txt"), format!("{i}\n"))?;
        git(repo, &["add", "n.txt"])?;
        git(repo, &["commit", "--quiet", "-m", &format!("commit {i}")])?;
    }
    Ok(())
}

fn config(dir: &Path, repo: &Path, groups: &[usize]) -> String {
    let mut text = format!(
        r#"
[coordinator]
listen = "127.0.0.1:0"
data_dir = "{data}"
repo_poll_interval = "1h"

[[host_types]]
name = "{QUEUED_HOST_TYPE}"
pool = {{ kind = "reverse", expected = 1 }}
"#,
        data = dir.join("data").display(),
    );
    for (g, n) in groups.iter().enumerate() {
        text.push_str(&format!(
            "\n[[host_types]]\nname = \"{}\"\npool = {{ kind = \"reverse\", expected = {n} }}\n",
            host_type(g)
        ));
    }
    for b in 0..QUEUED_BUILDERS {
        text.push_str(&format!(
            "\n[[builders]]\nname = \"linux-amd64-queued{b}\"\nhost_type = \"{QUEUED_HOST_TYPE}\"\nsteps = [{{ name = \"t\", command = [\"true\"] }}]\n"
        ));
    }
    text.push_str(&format!(
        "\n[[repos]]\nname = \"r\"\nurl = \"{}\"\nbranches = [\"main\"]\n",
        repo.display()
    ));
    text
}

/// The running coordinator process and how to reach it.
struct Coordinator {
    child: Child,
    pid: u32,
    addr: String,
    config: PathBuf,
    data: PathBuf,
    http: reqwest::Client,
}

impl Coordinator {
    async fn start(release: &Path, config: &Path, data: &Path, log: &Path) -> Result<Self> {
        let log = std::fs::File::create(log).context("creating the coordinator log")?;
        let mut child = Command::new(release.join("coordinator"))
            .arg("--config")
            .arg(config)
            .arg("--buildlet")
            .arg(release.join("buildlet"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .context("starting the release coordinator")?;
        let pid = child.id().context("coordinator pid")?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let addr = tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.trim().strip_prefix("status page: http://") {
                    return Ok(rest.trim_end_matches('/').to_owned());
                }
            }
            bail!("the coordinator exited before printing its address")
        })
        .await
        .context("the coordinator did not start within 120 s")??;
        // Keep draining stdout so the coordinator never blocks on it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Coordinator {
            child,
            pid,
            addr,
            config: config.to_owned(),
            data: data.to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()?,
        })
    }

    async fn get(&self, path: &str) -> Result<String> {
        let resp = self
            .http
            .get(format!("http://{}{path}", self.addr))
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        if !resp.status().is_success() {
            bail!("GET {path}: {}", resp.status());
        }
        Ok(resp.text().await?)
    }

    fn cli(&self, args: &[&str], release: &Path) -> Result<String> {
        let out = std::process::Command::new(release.join("coordinator"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .context("running the coordinator's CLI")?;
        if !out.status.success() {
            bail!(
                "coordinator {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Builds waiting for `host_type`, from `/api/status`.
    async fn queued_for(&self, host_type: &str) -> Result<usize> {
        let v: serde_json::Value = serde_json::from_str(&self.get("/api/status").await?)?;
        Ok(v["queue"]
            .as_array()
            .map(|q| {
                q.iter()
                    .filter(|e| e["host_type"] == host_type)
                    .filter_map(|e| e["len"].as_u64())
                    .sum::<u64>() as usize
            })
            .unwrap_or(0))
    }

    async fn metrics(&self) -> Result<Metrics> {
        Ok(Metrics::parse(&self.get("/metrics").await?))
    }
}

/// The figures of `/metrics` this bench follows.
#[derive(Debug, Default)]
struct Metrics {
    connected: BTreeMap<String, usize>,
    accepted: u64,
    lost: u64,
    evicted: u64,
    refused: u64,
    handshakes_refused: u64,
}

impl Metrics {
    fn parse(text: &str) -> Metrics {
        let mut m = Metrics::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(v) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = key.split_once('{').unwrap_or((key, ""));
            match name {
                "buildfarm_reverse_connections" => {
                    if let Some(ht) = labels
                        .strip_prefix("host_type=\"")
                        .and_then(|l| l.strip_suffix("\"}"))
                    {
                        m.connected.insert(ht.to_owned(), v as usize);
                    }
                }
                "buildfarm_revdial_handshakes_accepted_total" => m.accepted = v as u64,
                "buildfarm_revdial_tunnels_lost_total" => m.lost = v as u64,
                "buildfarm_connections_evicted_total" => m.evicted = v as u64,
                "buildfarm_connections_refused_total" => m.refused = v as u64,
                "buildfarm_revdial_handshakes_refused_total" => m.handshakes_refused += v as u64,
                _ => {}
            }
        }
        m
    }

    fn fleet_connected(&self, groups: usize) -> usize {
        (0..groups)
            .map(|g| self.connected.get(&host_type(g)).copied().unwrap_or(0))
            .sum()
    }
}

struct FleetSpec {
    release: PathBuf,
    dir: PathBuf,
    addr: String,
    ca_file: PathBuf,
}

/// Starts the fleet process of `group` (`count` hosts) and waits for its dialers.
async fn start_group(spec: &FleetSpec, group: usize, count: usize) -> Result<Child> {
    let mut child = spawn_group(spec, group, count)?;
    group_ready(&mut child, count).await?;
    Ok(child)
}

/// Starts the fleet process of `group` (`count` hosts); see [`group_ready`].
fn spawn_group(spec: &FleetSpec, group: usize, count: usize) -> Result<Child> {
    let ht = host_type(group);
    Command::new(spec.release.join("buildlet-fleet"))
        .arg("--reverse")
        .arg(format!("https://{}", spec.addr))
        .arg("--ca-file")
        .arg(&spec.ca_file)
        .args(["--host-type", &ht, "--hostname-prefix", &ht])
        .arg("--builder-key-file")
        .arg(spec.dir.join(format!("{ht}.key")))
        .args(["--count", &count.to_string()])
        .arg("--workdir-root")
        .arg(spec.dir.join("work").join(&ht))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting buildlet-fleet")
}

/// Waits for a fleet process to say it started its `count` dialers.
async fn group_ready(child: &mut Child, count: usize) -> Result<()> {
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
        .await
        .context("buildlet-fleet said nothing within 120 s")??
        .context("buildlet-fleet exited before starting its dialers")?;
    if line != format!("fleet dialling {count} hosts") {
        bail!("buildlet-fleet's first line: {line:?}");
    }
    Ok(())
}

/// Polls `/metrics` until `done`; returns how long it took and the last metrics.
async fn wait_metrics(
    c: &Coordinator,
    what: &str,
    done: impl Fn(&Metrics) -> bool,
) -> Result<(Duration, Metrics)> {
    let start = Instant::now();
    loop {
        let m = c.metrics().await?;
        if done(&m) {
            return Ok((start.elapsed(), m));
        }
        if start.elapsed() > FLEET_WAIT {
            bail!("{what}: not within {FLEET_WAIT:?}; now {m:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Latencies of `SAMPLES` sequential requests of each kind.
struct PageTimes {
    status: Vec<Duration>,
    dashboard: Vec<Duration>,
    api: Vec<Duration>,
}

async fn time_pages(c: &Coordinator, api: &FarmClient) -> Result<PageTimes> {
    let mut t = PageTimes {
        status: Vec::with_capacity(SAMPLES),
        dashboard: Vec::with_capacity(SAMPLES),
        api: Vec::with_capacity(SAMPLES),
    };
    // Interleaved, so a burst of load from elsewhere hits all three alike.
    for _ in 0..SAMPLES {
        let s = Instant::now();
        c.get("/").await?;
        t.status.push(s.elapsed());
        let s = Instant::now();
        c.get("/dashboard").await?;
        t.dashboard.push(s.elapsed());
        let s = Instant::now();
        api.list_instances()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        t.api.push(s.elapsed());
    }
    Ok(t)
}

/// CPU used by `pid` over `over`, as a percentage of one core.
async fn cpu_percent(pid: u32, over: Duration) -> Result<f64> {
    let c0 = child_cpu_time(pid).context("coordinator cpu time")?;
    let t0 = Instant::now();
    tokio::time::sleep(over).await;
    let c1 = child_cpu_time(pid).context("coordinator cpu time")?;
    Ok((c1 - c0).as_secs_f64() / t0.elapsed().as_secs_f64() * 100.0)
}

pub async fn fleet_benches(release: &Path, out_dir: &Path) -> Result<Vec<Figure>> {
    let n = fleet_hosts()?;
    let limit = raise_nofile()?;
    if limit < n as u64 + 1024 {
        bail!("open-file limit {limit} is too low for a fleet of {n}");
    }
    let groups: Vec<usize> = (0..n.div_ceil(GROUP))
        .map(|g| (n - g * GROUP).min(GROUP))
        .collect();
    let work = out_dir.join("fleet-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let tmp = tempfile::tempdir_in(&work)?;
    let dir = tmp.path();
    let repo = dir.join("repo");
    make_repo(&repo)?;
    let cfg_path = dir.join("coordinator.toml");
    std::fs::write(&cfg_path, config(dir, &repo, &groups))?;
    let c = Coordinator::start(
        release,
        &cfg_path,
        &dir.join("data"),
        &dir.join("coordinator.log"),
    )
    .await?;
    for g in 0..groups.len() {
        let key = c.cli(&["builder-key", &host_type(g)], release)?;
        std::fs::write(dir.join(format!("{}.key", host_type(g))), key)?;
    }
    let token = c.cli(
        &["token", "issue", "fleet-bench", "--role", "viewer"],
        release,
    )?;
    let ca = std::fs::read_to_string(c.data.join("tls/ca.crt"))?;
    let api = FarmClient::connect(&c.addr, &ca, Some(&token), Duration::from_secs(60))
        .await
        .map_err(|e| anyhow::anyhow!("connecting the API client: {e}"))?
        .with_call_timeout(Duration::from_secs(120));

    // The queue: every commit on every builder, none of which can run.
    let queued_want = QUEUED_BUILDERS * COMMITS;
    let start = Instant::now();
    while c.queued_for(QUEUED_HOST_TYPE).await? < queued_want {
        if start.elapsed() > Duration::from_secs(300) {
            bail!("{queued_want} builds were not queued within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Before the fleet: memory, idle CPU and page latencies with the queue alone.
    time_pages(&c, &api).await?; // warm-up
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = proc_rss_kib(c.pid)?;
    let cpu_before = cpu_percent(c.pid, IDLE).await?;
    let empty = time_pages(&c, &api).await?;

    // Cold start: every fleet process at once, every host dialling at once.
    let spec = FleetSpec {
        release: release.to_owned(),
        dir: dir.to_owned(),
        addr: c.addr.clone(),
        ca_file: c.data.join("tls/ca.crt"),
    };
    // Every process is started before any is waited for: all hosts dial within about
    // a second, as after a coordinator restart.
    let dialled = Instant::now();
    let mut children = Vec::new();
    for (g, count) in groups.iter().enumerate() {
        children.push(spawn_group(&spec, g, *count)?);
    }
    for (child, count) in children.iter_mut().zip(&groups) {
        group_ready(child, *count).await?;
    }
    let (_, m0) = wait_metrics(&c, "every host connected", |m| {
        m.fleet_connected(groups.len()) == n
    })
    .await?;
    let connect_all = dialled.elapsed();
    // Let the connect burst's buffers settle before measuring.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_fleet = proc_rss_kib(c.pid)?;
    let cpu_fleet = cpu_percent(c.pid, IDLE).await?;
    let loaded = time_pages(&c, &api).await?;
    let m1 = c.metrics().await?;
    let still = m1.fleet_connected(groups.len());

    // Mass reconnect: one fleet process (GROUP hosts) dies at once and comes back.
    let lost_n = groups[0] as u64;
    let probe_stop = tokio_util::sync::CancellationToken::new();
    let probe = {
        let (http, addr, api, stop) = (
            c.http.clone(),
            c.addr.clone(),
            api.clone(),
            probe_stop.clone(),
        );
        tokio::spawn(async move {
            let (mut times, mut failures) = (Vec::new(), Vec::new());
            while !stop.is_cancelled() {
                let s = Instant::now();
                match http.get(format!("http://{addr}/")).send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        times.push(s.elapsed());
                    }
                    Ok(r) => failures.push(format!("GET /: {}", r.status())),
                    Err(e) => failures.push(format!("GET /: {e}")),
                }
                let s = Instant::now();
                match api.list_instances().await {
                    Ok(_) => times.push(s.elapsed()),
                    Err(e) => failures.push(format!("ListInstances: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (times, failures)
        })
    };
    let killed = Instant::now();
    let mut dead = children.remove(0);
    dead.start_kill().context("SIGKILL of a fleet process")?;
    let _ = dead.wait().await;
    children.insert(0, start_group(&spec, 0, groups[0]).await?);
    let (_, m2) = wait_metrics(&c, "every host back after the mass reconnect", |m| {
        m.fleet_connected(groups.len()) == n
            && m.lost >= m1.lost + lost_n
            && m.accepted >= m1.accepted + lost_n
    })
    .await?;
    let reconnect = killed.elapsed();
    probe_stop.cancel();
    let (probe_times, probe_failures) = probe.await.context("the probe task")?;

    for mut child in children {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    let mut coordinator = c.child;
    let _ = coordinator.start_kill();
    let _ = coordinator.wait().await;

    let per_conn = rss_fleet.saturating_sub(rss_before) as f64 / n as f64;
    let mut figures = vec![];
    for (name, before, with) in [
        ("fleet_status_page", &empty.status, &loaded.status),
        ("fleet_dashboard", &empty.dashboard, &loaded.dashboard),
        ("fleet_api_call", &empty.api, &loaded.api),
    ] {
        for (label, p) in [("p50", 0.5), ("p99", 0.99)] {
            let (b, m) = (percentile(before.clone(), p), percentile(with.clone(), p));
            figures.push(Figure {
                name: format!("{name}_{label}"),
                measured: ms(m),
                baseline: ms(b),
                unit: "ms".into(),
                ratio: b.as_secs_f64() / m.as_secs_f64().max(1e-9),
                note: format!(
                    "{SAMPLES} requests, {n} hosts connected, {queued_want} builds queued; baseline: the same coordinator and queue before the fleet connected"
                ),
            });
        }
    }
    let cpu_budget = n as f64 / 1000.0;
    figures.extend([
        Figure {
            name: "fleet_rss_per_conn".into(),
            measured: per_conn,
            baseline: rss_before as f64,
            unit: "KiB/conn".into(),
            ratio: 1.0,
            note: format!(
                "coordinator RSS {rss_before} KiB -> {rss_fleet} KiB with {n} tunnels; baseline column: RSS before the fleet (KiB); ratio not meaningful"
            ),
        },
        Figure {
            name: "fleet_idle_cpu".into(),
            measured: cpu_fleet,
            baseline: cpu_budget,
            unit: "% core".into(),
            ratio: cpu_budget / cpu_fleet.max(0.001),
            note: format!(
                "coordinator over {}s idle with {n} tunnels ({still} still up) and {queued_want} builds queued; {cpu_before:.2}% before the fleet; baseline is a budget (1%/1000 hosts)",
                IDLE.as_secs()
            ),
        },
        Figure {
            name: "fleet_connect_all".into(),
            measured: connect_all.as_secs_f64(),
            baseline: n as f64,
            unit: "s".into(),
            ratio: 1.0,
            note: format!(
                "{} processes started together, every host dialling at once, until all {n} are registered; evicted {}, refused {}, handshakes refused {} (baseline column: hosts)",
                groups.len(),
                m0.evicted,
                m0.refused,
                m0.handshakes_refused
            ),
        },
    ]);
    let probe_max = probe_times.iter().max().copied().unwrap_or_default();
    let probe_p99 = percentile(probe_times.clone(), 0.99);
    let idle_p99 = percentile(
        loaded.status.iter().chain(&loaded.api).copied().collect(),
        0.99,
    );
    figures.extend([
        Figure {
            name: "fleet_mass_reconnect".into(),
            measured: reconnect.as_secs_f64(),
            baseline: connect_all.as_secs_f64() * lost_n as f64 / n as f64,
            unit: "s".into(),
            ratio: (connect_all.as_secs_f64() * lost_n as f64 / n as f64)
                / reconnect.as_secs_f64().max(1e-9),
            note: format!(
                "{lost_n} hosts' process SIGKILLed and started again, until all {n} are registered (lost {} -> {}; evicted {}, refused {}, handshakes refused {} since the cold start); baseline: the cold start's time per {lost_n} hosts",
                m1.lost,
                m2.lost,
                m2.evicted - m1.evicted,
                m2.refused - m1.refused,
                m2.handshakes_refused - m1.handshakes_refused
            ),
        },
        Figure {
            name: "fleet_reconnect_page_p99".into(),
            measured: ms(probe_p99),
            baseline: ms(idle_p99),
            unit: "ms".into(),
            ratio: idle_p99.as_secs_f64() / probe_p99.as_secs_f64().max(1e-9),
            note: format!(
                "status page and ListInstances every 100 ms during the mass reconnect: {} answered, worst {:.1} ms, {} failed{}; baseline: their p99 with the fleet idle",
                probe_times.len(),
                ms(probe_max),
                probe_failures.len(),
                probe_failures
                    .first()
                    .map(|f| format!(" (first: {f})"))
                    .unwrap_or_default()
            ),
        },
    ]);
    Ok(figures)
}
