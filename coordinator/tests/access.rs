//! Access control end to end, on a real coordinator process over real TLS: roles on the
//! gRPC API and the pages, anonymous readers per `[access]`, token issue / list / revoke
//! through the API and the CLI (a revoke refused on the very next call), owner-only
//! instances (admins excepted), per-user rate limits, the denial counter in `/metrics`,
//! and builder-key rotation under a connected reverse buildlet.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use coordinator::client::{ApiError, Code, CreateEvent, FarmClient, TryRequest};
use futures::StreamExt;

fn host_builder() -> String {
    match std::env::consts::ARCH {
        "aarch64" => "linux-arm64".into(),
        _ => "linux-amd64".into(),
    }
}

type Client = FarmClient;

/// A gRPC client of `farm` over TLS, sending `token` (none: anonymous).
async fn client(farm: &TestFarm, token: Option<&str>) -> Client {
    let ca = buildfarm_tls::load_ca_file(&farm.data_dir.join("tls").join("ca.crt")).expect("ca");
    FarmClient::connect(&farm.addr, &ca, token, Duration::from_secs(10))
        .await
        .expect("connect")
}

/// The admin token the coordinator wrote for its own user.
fn own_token(farm: &TestFarm) -> String {
    let text = std::fs::read_to_string(farm.data_dir.join("gomote.json")).expect("gomote.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    v["token"].as_str().expect("token").to_owned()
}

fn code_of<T: std::fmt::Debug>(r: Result<T, ApiError>) -> (Code, String) {
    let s = r.expect_err("call should be refused");
    (s.code(), s.message().to_owned())
}

async fn http_get(
    farm: &TestFarm,
    path: &str,
    auth: Option<&str>,
) -> (reqwest::StatusCode, reqwest::header::HeaderMap, String) {
    let mut req = farm.http.get(format!("http://{}{path}", farm.addr));
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let resp = req.send().await.expect("GET");
    let (status, headers) = (resp.status(), resp.headers().clone());
    (status, headers, resp.text().await.expect("body"))
}

fn basic(token: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("anyone:{token}"))
    )
}

fn config(data_dir: &Path, repo: &Path, access: &str) -> String {
    format!(
        r#"
[coordinator]
listen = "127.0.0.1:0"
data_dir = "{data}"
repo_poll_interval = "1h"

[[host_types]]
name = "local"
pool = {{ kind = "local", count = 2 }}

[[builders]]
name = "{builder}"
host_type = "local"
steps = [{{ name = "check", command = ["sh", "-c", "true"] }}]

[[repos]]
name = "t"
url = "{repo}"
branches = ["main"]

{access}
"#,
        data = data_dir.display(),
        repo = repo.display(),
        builder = host_builder(),
    )
}

async fn start(access: &str) -> (tempfile::TempDir, TestFarm, String) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = tmp.path().join("repo");
    let data = tmp.path().join("data");
    let rev = make_go_repo(&repo);
    let cfg = tmp.path().join("coordinator.toml");
    std::fs::write(&cfg, config(&data, &repo, access)).expect("write config");
    let farm = TestFarm::start(&cfg, &data).await;
    (tmp, farm, rev)
}

/// Creates an instance of the host builder and returns its name.
async fn create(c: &Client) -> Result<String, ApiError> {
    let mut s = c.create_instance(&host_builder()).await?;
    while let Some(msg) = s.next().await {
        if let CreateEvent::Ready(i) = msg? {
            return Ok(i.name);
        }
    }
    panic!("stream ended without an instance")
}

fn try_req(rev: &str) -> TryRequest {
    TryRequest {
        repo: "t".into(),
        rev: rev.into(),
        patch: vec![],
        builders: vec![],
    }
}

/// The value of the denial counter for (reason, action) in a `/metrics` text.
fn denied(metrics: &str, reason: &str, action: &str) -> u64 {
    let want = format!("buildfarm_access_denied_total{{action=\"{action}\",reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&want))
        .map_or(0, |v| v.trim().parse().expect("counter value"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_owners_rate_limits_and_denials_on_a_closed_farm() {
    let (_tmp, farm, rev) = start(
        "[access]\nanonymous_viewers = false\ntry_runs_per_hour = 2\ngomote_creates_per_hour = 1\n",
    )
    .await;
    let viewer = farm.issue_token_with_role("vera", "viewer");
    let alice = farm.issue_token("alice");
    let mallory = farm.issue_token("mallory");
    let operator = farm.issue_token_with_role("oscar", "operator");
    let admin = own_token(&farm);

    // Pages: a token is needed (a browser is challenged), Bearer or Basic; /healthz is open.
    let (status, headers, _) = http_get(&farm, "/", None).await;
    assert_eq!(status, 401);
    assert!(
        headers
            .get("www-authenticate")
            .is_some_and(|v| v.to_str().unwrap_or("").starts_with("Basic")),
        "{headers:?}"
    );
    let (status, _, body) = http_get(&farm, "/api/status", Some(&format!("Bearer {viewer}"))).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, _) = http_get(&farm, "/", Some(&basic(&viewer))).await;
    assert_eq!(status, 200);
    let (status, _, _) = http_get(&farm, "/healthz", None).await;
    assert_eq!(status, 200);
    // Alice's token with its last secret digit changed.
    let last = if alice.ends_with('0') { "1" } else { "0" };
    let bad = format!("Bearer {}{last}", &alice[..alice.len() - 1]);
    let (status, _, _) = http_get(&farm, "/api/status", Some(&bad)).await;
    assert_eq!(status, 401);

    // gRPC: anonymous callers may not even read here; viewers read but change nothing.
    let anon = client(&farm, None).await;
    let (code, msg) = code_of(anon.list_instances().await);
    assert_eq!(code, Code::Unauthenticated, "{msg}");
    let v = client(&farm, Some(&viewer)).await;
    v.list_instances().await.expect("a viewer lists");
    let (code, msg) = code_of(create(&v).await);
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert!(msg.contains("role viewer"), "{msg}");
    let (code, _) = code_of(v.submit_try(try_req(&rev)).await);
    assert_eq!(code, Code::PermissionDenied);

    // A developer creates; the per-hour create limit names its field.
    let a = client(&farm, Some(&alice)).await;
    let inst = create(&a).await.expect("alice creates an instance");
    let (code, msg) = code_of(create(&a).await);
    assert_eq!(code, Code::ResourceExhausted, "{msg}");
    assert!(msg.contains("access.gomote_creates_per_hour"), "{msg}");

    // Her instance is hers: another developer is refused, an admin is not.
    let out = farm
        .gomote()
        .env("BUILDFARM_TOKEN", &mallory)
        .args(["run", &inst, "--", "true"])
        .output()
        .expect("gomote");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("PermissionDenied") && err.contains("alice"),
        "{err}"
    );
    let m = client(&farm, Some(&mallory)).await;
    let (code, _) = code_of(m.destroy_instance(&inst).await);
    assert_eq!(code, Code::PermissionDenied);
    let listed = m.list_instances().await.expect("list");
    assert!(listed.is_empty(), "{listed:?}");
    let adm = client(&farm, Some(&admin)).await;
    let all = adm.list_instances().await.expect("admin lists");
    assert!(all.iter().any(|i| i.name == inst), "{all:?}");
    let out = farm
        .gomote()
        .args(["run", &inst, "--", "sh", "-c", "echo admin-was-here"])
        .output()
        .expect("gomote");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("admin-was-here"));
    adm.destroy_instance(&inst)
        .await
        .expect("an admin destroys anyone's instance");

    // Try runs: two per hour; a developer cannot cancel another's, an operator can.
    let t1 = a.submit_try(try_req(&rev)).await.expect("first try");
    a.submit_try(try_req(&rev)).await.expect("second try");
    let (code, msg) = code_of(a.submit_try(try_req(&rev)).await);
    assert_eq!(code, Code::ResourceExhausted, "{msg}");
    assert!(msg.contains("access.try_runs_per_hour"), "{msg}");
    let (code, msg) = code_of(m.cancel_try(&t1).await);
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    let op = client(&farm, Some(&operator)).await;
    op.cancel_try(&t1)
        .await
        .expect("an operator cancels anyone's try run");
    // Token management is for admins only.
    for token in [&alice, &operator] {
        let c = client(&farm, Some(token)).await;
        let (code, _) = code_of(c.list_tokens().await);
        assert_eq!(code, Code::PermissionDenied);
    }

    // Every denial above is counted by reason and action.
    let (status, _, metrics) = http_get(&farm, "/metrics", Some(&format!("Bearer {viewer}"))).await;
    assert_eq!(status, 200);
    for (reason, action, at_least) in [
        ("no_token", "read", 2),
        ("bad_token", "read", 1),
        ("role", "create_instance", 1),
        ("role", "submit_try", 1),
        ("rate_limit", "create_instance", 1),
        ("rate_limit", "submit_try", 1),
        ("not_owner", "use_others_instance", 2),
        ("not_owner", "cancel_others_try", 1),
        ("role", "manage_tokens", 2),
    ] {
        let n = denied(&metrics, reason, action);
        assert!(
            n >= at_least,
            "{reason}/{action}: {n} < {at_least}\n{metrics}"
        );
    }
    farm.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tokens_are_refused_on_the_next_call_and_anonymous_reads_follow_the_config() {
    let (_tmp, farm, _rev) = start("").await;
    let admin = own_token(&farm);

    // Anonymous readers are allowed by default, on the pages and the API's reads, but
    // nothing that changes state is.
    let (status, _, _) = http_get(&farm, "/api/status", None).await;
    assert_eq!(status, 200);
    let anon = client(&farm, None).await;
    anon.list_instances().await.expect("anonymous list");
    let (code, msg) = code_of(create(&anon).await);
    assert_eq!(code, Code::Unauthenticated, "{msg}");

    // Issued through the API, used, revoked: refused on the very next call.
    let adm = client(&farm, Some(&admin)).await;
    let issued = adm
        .issue_token("bob", "developer", "test")
        .await
        .expect("issue");
    let info = issued.info.expect("info");
    assert_eq!(
        (info.user.as_str(), info.role.as_str()),
        ("bob", "developer")
    );
    let bob = client(&farm, Some(&issued.token)).await;
    bob.list_instances().await.expect("bob's token works");
    adm.revoke_token(&info.id).await.expect("revoke");
    let (code, msg) = code_of(bob.list_instances().await);
    assert_eq!(code, Code::Unauthenticated, "{msg}");
    assert!(msg.contains("revoked"), "{msg}");
    let (status, _, _) = http_get(
        &farm,
        "/api/status",
        Some(&format!("Bearer {}", issued.token)),
    )
    .await;
    assert_eq!(
        status, 401,
        "a revoked token is refused even where anonymous reads are allowed"
    );

    // Listing shows the record, never the secret.
    let listed = adm.list_tokens().await.expect("list");
    let bob_rec = listed.iter().find(|t| t.id == info.id).expect("bob listed");
    assert!(bob_rec.revoked_unix_ms.is_some(), "{bob_rec:?}");
    let secret = issued.token.split_once('.').expect("id.secret").1;
    assert!(!format!("{listed:?}").contains(secret));

    // Bad input is refused with a clear error.
    let (code, msg) = code_of(adm.issue_token("bob", "root", "").await);
    assert_eq!(code, Code::InvalidArgument);
    assert!(msg.contains("root"), "{msg}");
    let (code, _) = code_of(adm.revoke_token("nope").await);
    assert_eq!(code, Code::NotFound);

    // Issued by the CLI into the store: accepted at once by the running coordinator;
    // revoked by the CLI: refused within the refresh interval.
    let carol = farm.issue_token("carol");
    let c = client(&farm, Some(&carol)).await;
    c.list_instances()
        .await
        .expect("a CLI-issued token works at once");
    let id = carol.split_once('.').expect("id.secret").0;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .arg("--config")
        .arg(&farm.config_path)
        .args(["token", "revoke", id])
        .output()
        .expect("token revoke");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match c.list_instances().await {
            Err(s) if s.code() == Code::Unauthenticated => break,
            r => assert!(
                Instant::now() < deadline,
                "a CLI revocation never reached the coordinator: {r:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And `coordinator token list` shows it revoked.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .arg("--config")
        .arg(&farm.config_path)
        .args(["token", "list"])
        .output()
        .expect("token list");
    let list = String::from_utf8_lossy(&out.stdout);
    let line = list
        .lines()
        .find(|l| l.starts_with(id))
        .expect("carol listed");
    assert!(line.contains("carol") && !line.contains(" - "), "{list}");

    // The coordinator's own admin token is kept across a restart while valid, and
    // replaced once revoked; revocations survive the restart.
    let (cfg, data) = (farm.config_path.clone(), farm.data_dir.clone());
    farm.kill().await;
    let farm = TestFarm::start(&cfg, &data).await;
    assert_eq!(own_token(&farm), admin);
    let adm = client(&farm, Some(&admin)).await;
    let (code, _) = code_of(
        client(&farm, Some(&issued.token))
            .await
            .list_instances()
            .await,
    );
    assert_eq!(code, Code::Unauthenticated, "still revoked after a restart");
    let admin_id = admin.split_once('.').expect("id.secret").0.to_owned();
    adm.revoke_token(&admin_id)
        .await
        .expect("an admin may revoke its own token");
    let (code, _) = code_of(adm.list_tokens().await);
    assert_eq!(code, Code::Unauthenticated);
    farm.kill().await;
    let farm = TestFarm::start(&cfg, &data).await;
    let fresh = own_token(&farm);
    assert_ne!(fresh, admin);
    client(&farm, Some(&fresh))
        .await
        .list_tokens()
        .await
        .expect("the new admin token works");
    farm.kill().await;
}

const REV_HOST_TYPE: &str = "host-rev-rotate";
const REV_BUILDER: &str = "linux-amd64-rotate";

fn rotation_config(data: &Path, repo: &Path, keys: &str) -> String {
    format!(
        r#"
[coordinator]
listen = "127.0.0.1:0"
data_dir = "{data}"
repo_poll_interval = "1s"

[[host_types]]
name = "{REV_HOST_TYPE}"
pool = {{ kind = "reverse", expected = 1 }}

[[builders]]
name = "{REV_BUILDER}"
host_type = "{REV_HOST_TYPE}"
steps = [{{ name = "check", command = ["sh", "-c", "echo built-on-$(hostname)"] }}]

[[repos]]
name = "t"
url = "{repo}"
branches = ["main"]

{keys}
"#,
        data = data.display(),
        repo = repo.display(),
    )
}

fn write_secret(path: &Path, byte: u8) -> Vec<u8> {
    let secret = vec![byte; 32];
    std::fs::write(path, hex::encode(&secret)).expect("write secret");
    secret
}

fn start_reverse(tmp: &Path, farm: &TestFarm, hostname: &str, key: &str) -> tokio::process::Child {
    let key_file = tmp.join(format!("{hostname}.key"));
    std::fs::write(&key_file, key).expect("write key");
    let log = std::fs::File::create(tmp.join(format!("{hostname}.log"))).expect("log");
    tokio::process::Command::new(buildlet_bin())
        .arg("--reverse")
        .arg(format!("https://{}", farm.addr))
        .arg("--ca-file")
        .arg(farm.data_dir.join("tls").join("ca.crt"))
        .args(["--host-type", REV_HOST_TYPE, "--hostname", hostname])
        .arg("--builder-key-file")
        .arg(&key_file)
        .arg("--workdir")
        .arg(tmp.join(format!("work-{hostname}")))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn reverse buildlet")
}

fn lists_host(v: &serde_json::Value, hostname: &str) -> bool {
    match v {
        serde_json::Value::Object(m) => {
            m.get("hostname").and_then(|h| h.as_str()) == Some(hostname)
                || m.values().any(|x| lists_host(x, hostname))
        }
        serde_json::Value::Array(a) => a.iter().any(|x| lists_host(x, hostname)),
        _ => false,
    }
}

async fn wait_connected(farm: &TestFarm, hostname: &str) {
    let deadline = Instant::now() + WAIT;
    while !lists_host(&farm.get_json("/api/status").await, hostname) {
        assert!(Instant::now() < deadline, "{hostname} never connected");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn refused_bad_credential(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("buildfarm_revdial_handshakes_refused_total{reason=\"bad_credential\"} ")
        })
        .map_or(0, |v| v.trim().parse().expect("counter"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builder_key_rotated_under_a_connected_buildlet_keeps_it_and_retires_the_old_key() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = tmp.path().join("repo");
    let data = tmp.path().join("data");
    let first = make_go_repo(&repo);
    let old_file: PathBuf = tmp.path().join("old-secret");
    let new_file: PathBuf = tmp.path().join("new-secret");
    let old = write_secret(&old_file, 1);
    let new = write_secret(&new_file, 2);
    let cfg = tmp.path().join("coordinator.toml");
    let only_old = format!(
        "[[access.builder_keys]]\nfile = \"{}\"\n",
        old_file.display()
    );
    std::fs::write(&cfg, rotation_config(&data, &repo, &only_old)).expect("config");
    let farm = TestFarm::start(&cfg, &data).await;
    let old_key = revdial::builder_key(&old, REV_HOST_TYPE);
    let new_key = revdial::builder_key(&new, REV_HOST_TYPE);

    // `coordinator builder-key` prints keys of the configured secret.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .arg("--config")
        .arg(&cfg)
        .args(["builder-key", REV_HOST_TYPE])
        .output()
        .expect("builder-key");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), old_key);

    let _a = start_reverse(tmp.path(), &farm, "rot-a", &old_key);
    wait_connected(&farm, "rot-a").await;
    let builds = farm.wait_final_builds("t", &first, 1).await;
    assert_eq!(builds[0]["state"], "ok", "{builds:?}");

    // Rotate: the old secret retires in a few seconds, the new one is added; SIGHUP.
    let not_after = SystemTime::now() + Duration::from_secs(3);
    let both = format!(
        "[[access.builder_keys]]\nfile = \"{}\"\nnot_after = \"{}\"\n\n[[access.builder_keys]]\nfile = \"{}\"\n",
        old_file.display(),
        humantime::format_rfc3339_seconds(not_after),
        new_file.display()
    );
    std::fs::write(&cfg, rotation_config(&data, &repo, &both)).expect("config");
    let pid = nix::unistd::Pid::from_raw(farm.child.id().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    // Past the overlap (to the second the config can say, plus a margin).
    tokio::time::sleep(Duration::from_secs(6)).await;

    // The connected buildlet stays connected and builds a new commit.
    assert!(lists_host(&farm.get_json("/api/status").await, "rot-a"));
    std::fs::write(
        repo.join("more.go"),
        "package t\n\n// More is new.\nfunc More() {}\n",
    )
    .expect("write");
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "--quiet", "-m", "second"]);
    let second = git(&repo, &["rev-parse", "HEAD"]);
    let builds = farm.wait_final_builds("t", &second, 1).await;
    assert_eq!(builds[0]["state"], "ok", "{builds:?}");
    let log = farm
        .get_text(&format!("/log/{}", builds[0]["id"].as_str().expect("id")))
        .await;
    assert!(log.contains("built-on-"), "{log}");

    // A new dial-in with the old key is refused; one with the new key is accepted.
    let before = refused_bad_credential(&farm.get_text("/metrics").await);
    let _b = start_reverse(tmp.path(), &farm, "rot-b", &old_key);
    let deadline = Instant::now() + WAIT;
    while refused_bad_credential(&farm.get_text("/metrics").await) <= before {
        assert!(Instant::now() < deadline, "the old key was never refused");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!lists_host(&farm.get_json("/api/status").await, "rot-b"));
    let _c = start_reverse(tmp.path(), &farm, "rot-c", &new_key);
    wait_connected(&farm, "rot-c").await;
    assert!(lists_host(&farm.get_json("/api/status").await, "rot-a"));
    farm.kill().await;
}

/// A bulk connection (ALPN `buildfarm-bulk/1`) to the coordinator's port, as
/// `FarmClient` opens one for each `put` and `gettar`.
async fn bulk_connection(farm: &TestFarm) -> revdial::DataStream {
    let ca = buildfarm_tls::load_ca_file(&farm.data_dir.join("tls").join("ca.crt")).expect("ca");
    let tls = buildfarm_tls::client_config(&ca, None, &[buildfarm_tls::ALPN_BULK]).expect("tls");
    let open = buildlet::client::listen_data_opener(
        farm.addr.clone(),
        buildfarm_tls::server_name("127.0.0.1").expect("server name"),
        tls,
        Duration::from_secs(10),
    );
    open()
        .await
        .expect("the coordinator takes bulk connections")
}

/// A tar.gz of one file.
fn tar_gz(name: &str, data: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, name, data).expect("append");
    b.into_inner().expect("tar").finish().expect("gzip")
}

/// The contents of `name` in a tar.gz.
fn file_in(tgz: &[u8], name: &str) -> Option<Vec<u8>> {
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(tgz));
    for e in ar.entries().expect("entries") {
        let mut e = e.expect("entry");
        if e.path().expect("path").ends_with(name) {
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut out).expect("read entry");
            return Some(out);
        }
    }
    None
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn collect_tar<E>(
    chunks: impl futures::Stream<Item = Result<bytes::Bytes, E>>,
) -> Result<Vec<u8>, E> {
    let mut chunks = std::pin::pin!(chunks);
    let mut out = Vec::new();
    while let Some(c) = chunks.next().await {
        out.extend_from_slice(&c?);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gomote_transfers_on_bulk_connections_are_checked_as_calls_are() {
    use buildlet::bulk::{Addressee, BulkError};
    let (_tmp, farm, _rev) = start("[access]\nanonymous_viewers = true\n").await;
    let alice = farm.issue_token("alice");
    let mallory = farm.issue_token("mallory");
    let viewer = farm.issue_token_with_role("vera", "viewer");
    let a = client(&farm, Some(&alice)).await;
    let inst = create(&a).await.expect("alice creates an instance");
    let to = |token: &str, instance: &str| Addressee {
        authorization: if token.is_empty() {
            String::new()
        } else {
            format!("Bearer {token}")
        },
        instance: instance.to_owned(),
    };

    // Odd sizes up on a bulk connection and back three ways: a bulk connection, the
    // client's default (bulk), the client over gRPC; every byte the same.
    let grpc_only = a.clone().without_bulk_connections();
    for (i, n) in [0usize, 1, 65_535, (3 << 20) + 7].into_iter().enumerate() {
        let data = random_bytes(n, i as u64 + 7);
        let tgz = tar_gz("f.bin", &data);
        let dir = format!("d{i}");
        let chunks: Vec<std::io::Result<bytes::Bytes>> = tgz
            .chunks(100_000)
            .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
            .collect();
        let put = buildlet::bulk::put_tar(
            bulk_connection(&farm).await,
            &to(&alice, &inst),
            &dir,
            futures::stream::iter(chunks),
        )
        .await
        .expect("put on a bulk connection");
        assert_eq!((put.entries, put.bytes), (1, n as u64), "{n} bytes");
        let chunks =
            buildlet::bulk::get_tar_stream(bulk_connection(&farm).await, &to(&alice, &inst), &dir)
                .await
                .expect("get on a bulk connection");
        let back = collect_tar(chunks).await.expect("chunks");
        assert_eq!(
            file_in(&back, "f.bin"),
            Some(data.clone()),
            "bulk, {n} bytes"
        );
        for (how, c) in [("client", &a), ("grpc", &grpc_only)] {
            let got = collect_tar(c.get_tar(&inst, &dir).await.expect("get_tar"))
                .await
                .expect("chunks");
            assert_eq!(
                file_in(&got, "f.bin"),
                Some(data.clone()),
                "{how}, {n} bytes"
            );
        }
    }
    // The client's put takes the same path.
    let data = random_bytes(200_000, 99);
    let tgz = bytes::Bytes::from(tar_gz("g.bin", &data));
    a.put_tar(&inst, "g", futures::stream::iter([tgz]))
        .await
        .expect("client put");
    let got = collect_tar(grpc_only.get_tar(&inst, "g").await.expect("get_tar"))
        .await
        .expect("chunks");
    assert_eq!(file_in(&got, "g.bin"), Some(data));

    // Refusals come back as the gRPC calls' would, before anything is read or sent.
    let refused = |r: Result<buildlet::bulk::Chunks, BulkError>| match r {
        Err(BulkError::Status(s)) => (Code::from(s.code()), s.message().to_owned()),
        Err(e) => panic!("expected a refusal, got {e:?}"),
        Ok(_) => panic!("expected a refusal, got chunks"),
    };
    let last = if alice.ends_with('0') { "1" } else { "0" };
    let bad = format!("{}{last}", &alice[..alice.len() - 1]);
    for (token, instance, want, says) in [
        ("", inst.as_str(), Code::Unauthenticated, "user token"),
        (
            bad.as_str(),
            inst.as_str(),
            Code::Unauthenticated,
            "invalid",
        ),
        (
            viewer.as_str(),
            inst.as_str(),
            Code::PermissionDenied,
            "role viewer",
        ),
        (
            mallory.as_str(),
            inst.as_str(),
            Code::PermissionDenied,
            "alice",
        ),
        (
            alice.as_str(),
            "no-such-instance",
            Code::NotFound,
            "no-such-instance",
        ),
    ] {
        let r = buildlet::bulk::get_tar_stream(
            bulk_connection(&farm).await,
            &to(token, instance),
            "d1",
        )
        .await;
        let (code, msg) = refused(r);
        assert_eq!(code, want, "{token:?} on {instance}: {msg}");
        assert!(msg.contains(says), "{token:?} on {instance}: {msg}");
    }
    // An upload of someone else's instance is refused, and nothing lands.
    let up = buildlet::bulk::put_tar(
        bulk_connection(&farm).await,
        &to(&mallory, &inst),
        "m",
        futures::stream::iter([Ok(bytes::Bytes::from(tar_gz("m.bin", b"mallory")))]),
    )
    .await;
    assert!(
        matches!(&up, Err(BulkError::Status(s)) if s.code() == tonic::Code::PermissionDenied),
        "{up:?}"
    );
    let missing = match a.get_tar(&inst, "m").await {
        Err(e) => e,
        Ok(s) => collect_tar(s).await.expect_err("mallory's upload landed"),
    };
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    // The buildlet's own refusal travels back with its code: not a tarball at all.
    let up = buildlet::bulk::put_tar(
        bulk_connection(&farm).await,
        &to(&alice, &inst),
        "x",
        futures::stream::iter([Ok(bytes::Bytes::from_static(b"plain text"))]),
    )
    .await;
    assert!(
        matches!(&up, Err(BulkError::Status(s)) if s.code() == tonic::Code::InvalidArgument && s.message().starts_with("buildlet: ")),
        "{up:?}"
    );

    // The bulk denials are counted with the calls'.
    let (_, _, metrics) = http_get(&farm, "/metrics", None).await;
    for (reason, action) in [
        ("no_token", "use_instance"),
        ("bad_token", "use_instance"),
        ("role", "use_instance"),
        ("not_owner", "use_others_instance"),
    ] {
        assert!(
            denied(&metrics, reason, action) >= 1,
            "{reason}/{action}\n{metrics}"
        );
    }
    farm.kill().await;
}
