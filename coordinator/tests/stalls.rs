//! Connections that stall are closed by the coordinator's port within its
//! `[connections]` time limits, while real callers (the status page, the gRPC API) keep
//! being answered; its descriptors and memory come back afterwards. Long requests
//! (a live log's server-sent events, a `gomote run` stream) outlive the idle timeout.
//! A real coordinator process, floods from this process on loopback.

mod common;
mod flood;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use buildfarm_proto::coordinator::ListInstancesRequest;
use buildfarm_proto::coordinator::coordinator_client::CoordinatorClient;
use common::*;
use flood::{Kind, Target};
use tokio::time::Instant;

/// The limits the tests configure: short, so the floods close quickly.
const HANDSHAKE: Duration = Duration::from_secs(4);
const HEADER_READ: Duration = Duration::from_secs(4);
const IDLE: Duration = Duration::from_secs(4);
/// Added to a limit before a still-open connection fails the test: the machine is
/// loaded and thousands of connections are closed at once.
const SLACK: Duration = Duration::from_secs(60);

fn write_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let data = dir.join("data");
    let cfg = dir.join("coordinator.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[coordinator]
listen = "127.0.0.1:0"
data_dir = "{data}"

[connections]
handshake_timeout = "{h}s"
header_read_timeout = "{r}s"
idle_timeout = "{i}s"
keepalive_interval = "5s"
{extra}
"#,
            data = data.display(),
            h = HANDSHAKE.as_secs(),
            r = HEADER_READ.as_secs(),
            i = IDLE.as_secs(),
        ),
    )
    .expect("write config");
    cfg
}

fn target(farm: &TestFarm) -> Target {
    let addr: SocketAddr = farm.addr.parse().expect("coordinator address");
    let ca = std::fs::read_to_string(farm.data_dir.join("tls/ca.crt")).expect("reading the CA");
    Target::new(addr, &ca, None, "127.0.0.1")
}

/// A real gRPC call through the typed client on a fresh TLS connection.
async fn list_instances(farm: &TestFarm, token: &str) -> Result<usize, String> {
    let ca = std::fs::read_to_string(farm.data_dir.join("tls/ca.crt")).expect("reading the CA");
    let tls = revdial::tls::client_config(&ca, None, &[revdial::tls::ALPN_H2]).expect("tls");
    let channel = revdial::tls::connect_channel(
        &farm.addr,
        revdial::tls::server_name("127.0.0.1").expect("name"),
        tls,
        Duration::from_secs(30),
    )
    .await
    .map_err(|e| format!("connecting: {e}"))?;
    let mut client = CoordinatorClient::new(channel);
    let mut req = tonic::Request::new(ListInstancesRequest {});
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    req.set_timeout(Duration::from_secs(30));
    client
        .list_instances(req)
        .await
        .map(|r| r.into_inner().instances.len())
        .map_err(|s| format!("ListInstances: {s}"))
}

/// The status page over plaintext HTTP on a fresh connection.
async fn status_page(farm: &TestFarm) -> Result<(), String> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let resp = client
        .get(format!("http://{}/", farm.addr))
        .send()
        .await
        .map_err(|e| format!("GET /: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("GET /: {}", resp.status()));
    }
    let body = resp.text().await.map_err(|e| format!("body: {e}"))?;
    if !body.contains("<html") {
        return Err(format!("GET /: not the status page: {body:.200}"));
    }
    Ok(())
}

fn pid(farm: &TestFarm) -> u32 {
    farm.child.id().expect("coordinator pid")
}

#[tokio::test(flavor = "multi_thread")]
async fn every_kind_of_stalled_connection_is_closed_while_real_callers_are_served() {
    flood::raise_nofile();
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(tmp.path(), "");
    let farm = TestFarm::start(&cfg, &tmp.path().join("data")).await;
    let token = farm.issue_token("alice");
    let pid = pid(&farm);
    let target = target(&farm);
    let n = flood::flood_size();

    // Warm up (first TLS and gRPC use allocate once), then the baseline.
    status_page(&farm).await.expect("status page before the floods");
    list_instances(&farm, &token).await.expect("gRPC before the floods");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fds_before = flood::fd_count(pid);
    let rss_before = flood::rss_kib(pid);
    eprintln!("baseline: {fds_before} fds, {rss_before} KiB");

    for kind in Kind::ALL {
        let started = Instant::now();
        let conns = flood::open(&target, kind, n).await;
        let fds_open = flood::fd_count(pid);
        let rss_open = flood::rss_kib(pid);
        eprintln!(
            "{kind:?}: {n} opened in {:?}; coordinator has {fds_open} fds, {rss_open} KiB",
            started.elapsed()
        );
        // Real callers are answered while the flood is held.
        status_page(&farm)
            .await
            .unwrap_or_else(|e| panic!("status page during a {kind:?} flood: {e}"));
        list_instances(&farm, &token)
            .await
            .unwrap_or_else(|e| panic!("gRPC during a {kind:?} flood: {e}"));
        let limit = match kind {
            Kind::TcpSilence => HANDSHAKE,
            Kind::PartialHeadersPlain | Kind::PartialHeadersTls | Kind::TrickledHeaders => {
                HEADER_READ.max(IDLE)
            }
            Kind::TlsSilence | Kind::Http2PrefaceTls => IDLE,
        };
        let open = flood::wait_closed(conns, started + limit + SLACK).await;
        assert_eq!(
            open, 0,
            "{open} of {n} {kind:?} connections still open {:?} after the flood started",
            limit + SLACK
        );
        eprintln!("{kind:?}: all closed by the server after {:?}", started.elapsed());
        // Descriptors come back (a few may be the coordinator's own, e.g. the store).
        let back = flood::becomes(SLACK, || flood::fd_count(pid) <= fds_before + 32).await;
        assert!(
            back,
            "after {kind:?}: {} fds open, {fds_before} before the floods",
            flood::fd_count(pid)
        );
    }

    // Memory comes back near where it started once the floods are gone.
    let rss_limit = rss_before + (rss_before / 2).max(48 * 1024);
    let back = flood::becomes(SLACK, || flood::rss_kib(pid) <= rss_limit).await;
    let rss_after = flood::rss_kib(pid);
    eprintln!("after the floods: {rss_after} KiB (baseline {rss_before} KiB)");
    assert!(
        back,
        "RSS {rss_after} KiB after the floods, {rss_before} KiB before (limit {rss_limit} KiB)"
    );
    status_page(&farm).await.expect("status page after the floods");
    list_instances(&farm, &token).await.expect("gRPC after the floods");
    farm.kill().await;
}
