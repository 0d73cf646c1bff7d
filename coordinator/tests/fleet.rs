//! A fleet of reverse buildlets on one coordinator, the short form of `cargo xtask bench
//! fleet`: a real coordinator process, hundreds of reverse buildlets dialling it from
//! a few `buildlet-fleet` processes (the real buildlet service over real revdial
//! tunnels, builder-key handshakes and all), and a queue of builds waiting for a host
//! type nobody serves. Every host registers; the status page, the dashboard, the JSON
//! status and the gRPC API answer; a whole fleet process killed with SIGKILL (its
//! hosts lost at once) and started again comes back whole while the pages keep
//! answering. Correctness only: the timings are the bench's job.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use coordinator::client::FarmClient;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// Fleet processes, one host type each.
const GROUPS: usize = 3;
const HOSTS_PER_GROUP: usize = 100;
/// Builders of the host type no host serves: their builds stay queued.
const QUEUED_BUILDERS: usize = 5;
/// The poller queues this many of a branch's newest commits per builder.
const COMMITS: usize = 10;
const QUEUED_HOST_TYPE: &str = "queued-linux";
/// Generous: hundreds of TLS handshakes on a loaded two-core machine.
const FLEET_WAIT: Duration = Duration::from_secs(180);

fn host_type(group: usize) -> String {
    format!("fleet-{group}")
}

fn fleet_bin() -> PathBuf {
    let p = bin_dir().join("buildlet-fleet");
    assert!(
        p.exists(),
        "{} is missing: build it first (`cargo build -p buildlet --bin buildlet-fleet`; `cargo nextest run --workspace` does)",
        p.display()
    );
    p
}

fn write_config(dir: &Path, repo: &Path) -> PathBuf {
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
    for g in 0..GROUPS {
        text.push_str(&format!(
            "\n[[host_types]]\nname = \"{}\"\npool = {{ kind = \"reverse\", expected = {HOSTS_PER_GROUP} }}\n",
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
    let path = dir.join("coordinator.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// The builder key of `host_type`, from the coordinator's CLI, in a file.
async fn builder_key_file(cfg: &Path, dir: &Path, host_type: &str) -> PathBuf {
    let out = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .arg("--config")
        .arg(cfg)
        .args(["builder-key", host_type])
        .output()
        .await
        .expect("coordinator builder-key");
    assert!(
        out.status.success(),
        "builder-key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = dir.join(format!("{host_type}.key"));
    std::fs::write(&path, &out.stdout).expect("write key");
    path
}

/// Starts fleet process `group` and waits for it to say its dialers started.
async fn start_group(farm: &TestFarm, dir: &Path, group: usize) -> Child {
    let ht = host_type(group);
    let mut child = Command::new(fleet_bin())
        .arg("--reverse")
        .arg(format!("https://{}", farm.addr))
        .arg("--ca-file")
        .arg(farm.data_dir.join("tls/ca.crt"))
        .args(["--host-type", &ht, "--hostname-prefix", &ht])
        .arg("--builder-key-file")
        .arg(dir.join(format!("{ht}.key")))
        .args(["--count", &HOSTS_PER_GROUP.to_string()])
        .arg("--workdir-root")
        .arg(dir.join("work").join(&ht))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn buildlet-fleet");
    let stdout = child.stdout.take().expect("stdout");
    let line = tokio::time::timeout(Duration::from_secs(60), async {
        BufReader::new(stdout).lines().next_line().await
    })
    .await
    .expect("buildlet-fleet said nothing within 60 s")
    .expect("reading buildlet-fleet's stdout")
    .expect("buildlet-fleet exited before starting its dialers");
    assert_eq!(line, format!("fleet dialling {HOSTS_PER_GROUP} hosts"));
    child
}

/// `name{labels} value` samples of one metric family from `/metrics`, by label text.
fn samples(metrics: &str, name: &str) -> BTreeMap<String, f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => {
                    let (labels, v) = r.split_once('}')?;
                    (labels.to_owned(), v)
                }
                None if rest.starts_with(' ') => (String::new(), rest),
                None => return None,
            };
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

/// What the coordinator's `/metrics` says about its reverse hosts.
#[derive(Debug)]
struct FleetState {
    /// Connected hosts per host type.
    connected: BTreeMap<String, usize>,
    accepted_total: u64,
    lost_total: u64,
}

impl FleetState {
    fn fleet_connected(&self) -> usize {
        (0..GROUPS)
            .map(|g| self.connected.get(&host_type(g)).copied().unwrap_or(0))
            .sum()
    }
}

async fn fleet_state(farm: &TestFarm) -> FleetState {
    let text = get_ok(farm, "/metrics").await.expect("GET /metrics");
    let connected = samples(&text, "buildfarm_reverse_connections")
        .into_iter()
        .filter_map(|(labels, v)| {
            let ht = labels
                .strip_prefix("host_type=\"")?
                .strip_suffix('"')?
                .to_owned();
            Some((ht, v as usize))
        })
        .collect();
    let one = |name: &str| {
        samples(&text, name)
            .get("")
            .copied()
            .unwrap_or_else(|| panic!("no {name} in /metrics")) as u64
    };
    FleetState {
        connected,
        accepted_total: one("buildfarm_revdial_handshakes_accepted_total"),
        lost_total: one("buildfarm_revdial_tunnels_lost_total"),
    }
}

/// GET `path` over plaintext on a fresh connection; the body, or why it failed.
async fn get_ok(farm: &TestFarm, path: &str) -> Result<String, String> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    let resp = client
        .get(format!("http://{}{path}", farm.addr))
        .send()
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("GET {path}: {}", resp.status()));
    }
    resp.text()
        .await
        .map_err(|e| format!("GET {path}: body: {e}"))
}

/// The status page, the dashboard and the JSON status answer with what they should
/// show, and a gRPC call through the typed client succeeds.
async fn pages_answer(farm: &TestFarm, api: &FarmClient) -> Result<(), String> {
    let status = get_ok(farm, "/").await?;
    if !status.contains("buildfarm status") {
        return Err(format!("GET /: not the status page: {status:.200}"));
    }
    let dash = get_ok(farm, "/dashboard").await?;
    if !dash.contains("linux-amd64-queued0") {
        return Err(format!("GET /dashboard: no queued builder: {dash:.200}"));
    }
    let json: Value = serde_json::from_str(&get_ok(farm, "/api/status").await?)
        .map_err(|e| format!("/api/status: {e}"))?;
    if json["pools"].as_array().map(Vec::len) != Some(GROUPS + 1) {
        return Err(format!("/api/status: pools {}", json["pools"]));
    }
    api.list_instances()
        .await
        .map_err(|e| format!("ListInstances: {e}"))?;
    Ok(())
}

/// Builds waiting for `host_type`, from `/api/status`.
async fn queued_for(farm: &TestFarm, host_type: &str) -> usize {
    let v = farm.get_json("/api/status").await;
    v["queue"]
        .as_array()
        .map(|q| {
            q.iter()
                .filter(|e| e["host_type"] == host_type)
                .filter_map(|e| e["len"].as_u64())
                .sum::<u64>() as usize
        })
        .unwrap_or(0)
}

/// Polls `/metrics` until `done` holds, bounded by `FLEET_WAIT`.
async fn wait_fleet(farm: &TestFarm, what: &str, done: impl Fn(&FleetState) -> bool) {
    let deadline = Instant::now() + FLEET_WAIT;
    loop {
        let s = fleet_state(farm).await;
        if done(&s) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {FLEET_WAIT:?}; now {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_registers_survives_a_mass_reconnect_and_pages_keep_answering() {
    revdial::accept::raise_nofile_limit().expect("raising RLIMIT_NOFILE");
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = tmp.path().join("repo");
    make_go_repo(&repo);
    for i in 1..COMMITS {
        std::fs::write(repo.join("n.txt"), format!("{i}\n")).expect("write");
        git(&repo, &["add", "n.txt"]);
        git(&repo, &["commit", "--quiet", "-m", &format!("commit {i}")]);
    }
    let cfg = write_config(tmp.path(), &repo);
    for g in 0..GROUPS {
        builder_key_file(&cfg, tmp.path(), &host_type(g)).await;
    }
    let farm = TestFarm::start(&cfg, &tmp.path().join("data")).await;
    let token = farm.issue_token_with_role("fleet-viewer", "viewer");
    let ca = std::fs::read_to_string(farm.data_dir.join("tls/ca.crt")).expect("CA");
    let api = FarmClient::connect(&farm.addr, &ca, Some(&token), Duration::from_secs(60))
        .await
        .expect("connecting the API client")
        .with_call_timeout(Duration::from_secs(60));

    // The start-up poll queues every commit on every builder; none can run.
    let want_queued = QUEUED_BUILDERS * COMMITS;
    let deadline = Instant::now() + WAIT;
    while queued_for(&farm, QUEUED_HOST_TYPE).await < want_queued {
        assert!(Instant::now() < deadline, "builds were not queued");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every host of every group registers.
    let mut groups = Vec::new();
    for g in 0..GROUPS {
        groups.push(start_group(&farm, tmp.path(), g).await);
    }
    let n = GROUPS * HOSTS_PER_GROUP;
    wait_fleet(&farm, "every host connected", |s| s.fleet_connected() == n).await;
    let before = fleet_state(&farm).await;
    for g in 0..GROUPS {
        assert_eq!(
            before.connected.get(&host_type(g)),
            Some(&HOSTS_PER_GROUP),
            "{before:?}"
        );
    }
    pages_answer(&farm, &api)
        .await
        .expect("pages with the fleet connected");
    let status = farm.get_json("/api/status").await;
    for p in status["pools"].as_array().expect("pools") {
        if p["host_type"] == QUEUED_HOST_TYPE {
            assert_eq!(p["capacity"], 0, "{p}");
        } else {
            assert_eq!(p["capacity"], HOSTS_PER_GROUP, "{p}");
            assert_eq!(p["in_use"], 0, "{p}");
        }
    }
    assert_eq!(queued_for(&farm, QUEUED_HOST_TYPE).await, want_queued);

    // Mass reconnect: group 0's process dies at once (its sockets close, as a rack
    // losing power would look from here) and comes back.
    let mut dead = groups.remove(0);
    dead.start_kill().expect("SIGKILL the fleet process");
    let _ = dead.wait().await;
    let back = start_group(&farm, tmp.path(), 0).await;
    groups.insert(0, back);
    // Pages keep answering while a hundred hosts are lost and handshake again.
    let reconnected = wait_fleet(&farm, "every host back after the mass reconnect", |s| {
        s.fleet_connected() == n
            && s.lost_total >= before.lost_total + HOSTS_PER_GROUP as u64
            && s.accepted_total >= before.accepted_total + HOSTS_PER_GROUP as u64
    });
    let probe = async {
        let mut answered = 0;
        loop {
            pages_answer(&farm, &api)
                .await
                .expect("pages during the mass reconnect");
            answered += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            if answered > 10_000 {
                return;
            }
        }
    };
    tokio::select! {
        () = reconnected => {}
        () = probe => {}
    }
    let after = fleet_state(&farm).await;
    for g in 0..GROUPS {
        assert_eq!(
            after.connected.get(&host_type(g)),
            Some(&HOSTS_PER_GROUP),
            "{after:?}"
        );
    }
    pages_answer(&farm, &api)
        .await
        .expect("pages after the mass reconnect");
    assert_eq!(queued_for(&farm, QUEUED_HOST_TYPE).await, want_queued);
    for mut g in groups {
        let _ = g.start_kill();
        let _ = g.wait().await;
    }
    farm.kill().await;
}
