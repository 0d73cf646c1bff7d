//! Listen mode closes stalled connections within its limits (`--handshake-timeout`,
//! `--idle-timeout`) while a real client is served, keeps a long exec stream open past
//! the idle timeout, and holds at most `--max-connections` however many connect.
//! The real `buildlet` binary, floods from this process on loopback.

#[path = "../../coordinator/tests/flood/mod.rs"]
mod flood;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use buildfarm_tls::CertificateAuthority;
use buildlet::client::{BuildletClient, ConnectOptions, ExecSpec};
use flood::{Kind, Target};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use tokio::time::Instant;

const KEY: &str = "stall-test-bearer-key-0123456789";
/// The idle timeout of the long-exec test, well below how long its command is silent.
const IDLE: Duration = Duration::from_secs(4);
/// Added to a limit before a still-open connection fails the test (loaded machine).
const SLACK: Duration = Duration::from_secs(60);

struct Listening {
    child: Child,
    addr: String,
    ca: CertificateAuthority,
    _dir: tempfile::TempDir,
    _stdout: BufReader<ChildStdout>,
}

impl Listening {
    /// Starts `buildlet --listen` with mTLS and a bearer key, plus `limits` flags.
    async fn start(limits: &[&str]) -> Listening {
        buildfarm_tls::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertificateAuthority::generate("stall test ca").expect("ca");
        let (cert, key) = ca
            .issue_server(&["localhost", "127.0.0.1"])
            .expect("server cert")
            .write_files(dir.path(), "server")
            .expect("write cert");
        let ca_file = dir.path().join("client-ca.crt");
        std::fs::write(&ca_file, ca.cert_pem()).expect("write ca");
        let key_file = dir.path().join("auth.key");
        std::fs::write(&key_file, KEY).expect("write key");
        let mut child = Command::new(env!("CARGO_BIN_EXE_buildlet"))
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--workdir")
            .arg(dir.path().join("work"))
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .arg("--client-ca")
            .arg(&ca_file)
            .arg("--auth-key-file")
            .arg(&key_file)
            .args(limits)
            .env_remove("BUILDLET_AUTH_KEY")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn buildlet");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(60), stdout.read_line(&mut line))
            .await
            .expect("buildlet start timed out")
            .expect("reading stdout");
        assert!(n > 0, "buildlet exited at start");
        let addr = line
            .trim()
            .strip_prefix("buildlet listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Listening {
            child,
            addr,
            ca,
            _dir: dir,
            _stdout: stdout,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("buildlet pid")
    }

    fn target(&self) -> Target {
        Target::new(
            self.addr.parse().expect("addr"),
            self.ca.cert_pem(),
            None,
            "127.0.0.1",
        )
    }

    /// A client on a fresh connection, with the bearer key.
    async fn client(&self) -> BuildletClient {
        let mut o = ConnectOptions::new(self.addr.clone(), self.ca.cert_pem());
        o.bearer_key = Some(KEY.into());
        BuildletClient::connect(o).await.expect("connect")
    }

    /// A real call on a fresh connection.
    async fn status(&self) -> Result<(), String> {
        let client = tokio::time::timeout(Duration::from_secs(30), self.client())
            .await
            .map_err(|_| "connect timed out".to_owned())?;
        tokio::time::timeout(Duration::from_secs(30), client.status())
            .await
            .map_err(|_| "status timed out".to_owned())?
            .map(|_| ())
            .map_err(|e| format!("status: {e}"))
    }
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_connections_are_closed_while_a_client_is_served() {
    flood::raise_nofile();
    let limit = flood::stall_limit();
    let (h, i) = (secs(limit), secs(limit));
    // Handshakes uncapped (beyond the flood): the time limits, not evictions, must
    // close these; the cap has its own test.
    let b = Listening::start(&[
        "--handshake-timeout",
        &h,
        "--idle-timeout",
        &i,
        "--max-handshakes",
        "20000",
    ])
    .await;
    let pid = b.pid();
    let target = b.target();
    let n = flood::flood_size();
    b.status().await.expect("status before the floods");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fds_before = flood::fd_count(pid);
    let rss_before = flood::rss_kib(pid);

    for kind in [
        Kind::TcpSilence,
        Kind::TlsSilence,
        Kind::Http2PrefaceTls,
        Kind::BulkSilence,
    ] {
        let started = Instant::now();
        let conns = flood::open(&target, kind, n).await;
        let fds_open = flood::fd_count(pid);
        assert!(
            fds_open >= fds_before + n / 2,
            "the {kind:?} flood was not held open ({fds_open} fds)"
        );
        b.status()
            .await
            .unwrap_or_else(|e| panic!("a real call during a {kind:?} flood: {e}"));
        let open = flood::wait_closed(conns, started + limit + SLACK).await;
        assert_eq!(open, 0, "{open} of {n} {kind:?} connections still open");
        let back = flood::becomes(SLACK, || flood::fd_count(pid) <= fds_before + 16).await;
        assert!(
            back,
            "after {kind:?}: {} fds, {fds_before} before",
            flood::fd_count(pid)
        );
    }
    let rss_limit = rss_before + (rss_before / 2).max(16 * 1024);
    let back = flood::becomes(SLACK, || flood::rss_kib(pid) <= rss_limit).await;
    assert!(
        back,
        "RSS {} KiB after the floods, {rss_before} KiB before",
        flood::rss_kib(pid)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_exec_outlives_the_idle_timeout() {
    let i = secs(IDLE);
    let b = Listening::start(&["--idle-timeout", &i]).await;
    let client = b.client().await;
    let quiet = IDLE * 3;
    let spec = ExecSpec::new("sh").args([
        "-c".to_owned(),
        format!("sleep {}; echo exec-finished", quiet.as_secs()),
    ]);
    let mut out = Vec::new();
    let started = Instant::now();
    let status = client
        .exec_collect(spec, |_, data| out.extend_from_slice(data))
        .await
        .expect("an exec silent for three idle timeouts");
    assert!(status.success(), "{status:?}");
    assert_eq!(String::from_utf8_lossy(&out), "exec-finished\n");
    assert!(started.elapsed() >= quiet);
    // The same connection idles out afterwards, and the client reconnects on its own.
    tokio::time::sleep(IDLE * 2).await;
    client
        .status()
        .await
        .expect("a call after the connection idled out");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_larger_than_the_cap_does_not_stop_a_client() {
    flood::raise_nofile();
    const CAP: usize = 50;
    let cap = CAP.to_string();
    let b = Listening::start(&[
        "--max-connections",
        &cap,
        "--max-handshakes",
        "20",
        "--handshake-timeout",
        "120s",
        "--idle-timeout",
        "120s",
    ])
    .await;
    let pid = b.pid();
    let target = b.target();
    b.status().await.expect("status before the flood");
    let fds_before = flood::fd_count(pid);
    let mut held = Vec::new();
    for kind in [
        Kind::TcpSilence,
        Kind::TlsSilence,
        Kind::Http2PrefaceTls,
        Kind::BulkSilence,
    ] {
        held.extend(flood::open_some(&target, kind, 3 * CAP, false).await);
        let fds = flood::fd_count(pid);
        assert!(
            fds <= fds_before + CAP + 8,
            "after a {kind:?} flood the buildlet has {fds} fds; cap {CAP}, {fds_before} before"
        );
        b.status()
            .await
            .unwrap_or_else(|e| panic!("a real call past the cap ({kind:?}): {e}"));
    }
    let open = flood::wait_closed(held, Instant::now() + Duration::from_secs(5)).await;
    assert!(
        open <= CAP,
        "{open} flood connections still open, cap {CAP}"
    );
}

#[test]
fn bad_limit_flags_are_usage_errors() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_buildlet"))
        .args(["--listen", "127.0.0.1:0", "--workdir"])
        .arg(Path::new("/nonexistent/work"))
        .args(["--tls-cert", "/x", "--tls-key", "/y"])
        .args(["--idle-timeout", "0s", "--max-header-bytes", "1KiB"])
        .output()
        .expect("run buildlet");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--idle-timeout must be longer than 0s"),
        "{err}"
    );
    assert!(err.contains("--max-header-bytes must be between"), "{err}");
}
