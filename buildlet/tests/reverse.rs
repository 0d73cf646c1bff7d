//! Reverse mode end to end: a real `buildlet --reverse` process dials a revdial
//! listener run by the test (real TLS on loopback, short keepalives), and the test
//! calls it through the tunnel as the coordinator would. Covers the calls themselves,
//! concurrency, a big transfer beside small calls, kill -9, SIGSTOP, restarts, bad
//! credentials and the process's exit paths.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use buildfarm_tls::CertificateAuthority;
use buildlet::client::{BuildletClient, ErrorCode, ExecEvent, ExecSpec, OutputStream};
use futures::StreamExt;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use revdial::{Authenticator, HostEvent, HostId, HostInfo, Listener, ListenerConfig, RefusalKind};
use tempfile::TempDir;
use tokio::process::{Child, Command};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

const MASTER: &[u8] = b"reverse test master key";
const HOST_TYPE: &str = "host-reverse-test";
const TOKEN_ID: &str = "token-1";
const TOKEN_SECRET: &str = "token secret 0123456789";
/// Both sides' HTTP/2 keepalive interval and timeout in the tests of liveness.
const KEEPALIVE: Duration = Duration::from_secs(1);
/// The same for every other test: long enough that a loaded machine (50 busy shells,
/// compilers beside the test) never misses a ping and drops a tunnel the test uses.
const STEADY_KEEPALIVE: Duration = Duration::from_secs(10);
/// Generous bound for what should take well under a second on an idle machine.
const SOON: Duration = Duration::from_secs(30);
/// A dead or frozen peer must be noticed within interval + timeout; the rest is margin
/// for a shared, slow machine.
const LIVENESS_BOUND: Duration = Duration::from_secs(1 + 1 + 8);

/// A revdial listener served on loopback, plus the files a buildlet needs to dial it.
struct Farm {
    listener: Listener,
    addr: std::net::SocketAddr,
    dir: TempDir,
    ca_file: PathBuf,
    shutdown: CancellationToken,
    keepalive: Duration,
}

impl Farm {
    async fn start() -> Farm {
        Farm::start_with(STEADY_KEEPALIVE).await
    }

    /// A farm whose tunnels notice a dead peer within `KEEPALIVE` twice.
    async fn start_watchful() -> Farm {
        Farm::start_with(KEEPALIVE).await
    }

    async fn start_with(keepalive: Duration) -> Farm {
        buildfarm_tls::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertificateAuthority::generate("reverse test ca").expect("ca");
        let server = ca
            .issue_server(&["localhost", "127.0.0.1"])
            .expect("server cert");
        let tls = buildfarm_tls::server_config(&server, None, &[buildfarm_tls::ALPN_REVDIAL])
            .expect("tls config");
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, ca.cert_pem()).expect("write ca");
        let auth =
            Authenticator::new(MASTER.to_vec()).with_token(TOKEN_ID, HOST_TYPE, TOKEN_SECRET);
        let cfg = ListenerConfig {
            keepalive_interval: keepalive,
            keepalive_timeout: keepalive,
            ping_interval: keepalive,
            ..ListenerConfig::default()
        };
        let listener = Listener::new(auth, cfg);
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        tokio::spawn(revdial::serve(tcp, tls, listener.clone(), shutdown.clone()));
        Farm {
            listener,
            addr,
            dir,
            ca_file,
            shutdown,
            keepalive,
        }
    }

    /// Writes `contents` to a file in the test dir and returns its path.
    fn file(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, format!("{contents}\n")).expect("write file");
        p
    }

    fn key_file(&self, master: &[u8], host_type: &str) -> PathBuf {
        self.file(
            &format!("key-{host_type}-{}", hex::encode(master)),
            &revdial::builder_key(master, host_type),
        )
    }

    /// Starts `buildlet --reverse` at this farm as `hostname` with `cred` (credential
    /// flags). Its log goes to `<hostname>.log` (appended across restarts).
    fn spawn(&self, hostname: &str, cred: &[&str]) -> Proc {
        let log_path = self.dir.path().join(format!("{hostname}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("log");
        let keepalive = format!("{}s", self.keepalive.as_secs());
        let child = Command::new(env!("CARGO_BIN_EXE_buildlet"))
            .arg("--reverse")
            .arg(format!("https://{}", self.addr))
            .args(["--host-type", HOST_TYPE, "--hostname", hostname])
            .arg("--workdir")
            .arg(self.dir.path().join(format!("work-{hostname}")))
            .arg("--ca-file")
            .arg(&self.ca_file)
            .args([
                "--keepalive-interval",
                &keepalive,
                "--keepalive-timeout",
                &keepalive,
            ])
            .args(cred)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn buildlet");
        Proc { child, log_path }
    }

    /// Starts a buildlet with the right builder key.
    fn spawn_good(&self, hostname: &str) -> Proc {
        let key = self.key_file(MASTER, HOST_TYPE);
        self.spawn(hostname, &["--builder-key-file", path_str(&key)])
    }

    fn channel(&self, id: HostId) -> revdial::TunnelChannel {
        let host = self
            .listener
            .registry()
            .get(id)
            .expect("host is registered");
        host.channel
    }

    /// A client as the coordinator makes one: transfers on data connections.
    fn client(&self, id: HostId) -> BuildletClient {
        BuildletClient::over_tunnel(self.channel(id)).expect("client")
    }

    /// A client whose transfers go through the tunnel's HTTP/2 too.
    fn tunnel_only_client(&self, id: HostId) -> BuildletClient {
        BuildletClient::from_service(self.channel(id), None).expect("client")
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn path_str(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

struct Proc {
    child: Child,
    log_path: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let log = self.log();
        common::kill_and_remove_container(&mut self.child, &log);
    }
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id().expect("running") as i32)
    }

    async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(Ok(st)) => st,
            other => panic!("buildlet did not exit: {other:?}\n{}", self.log()),
        }
    }
}

/// Waits for the next Connected event of `hostname`, skipping others.
async fn wait_connected(
    rx: &mut broadcast::Receiver<HostEvent>,
    hostname: &str,
    proc: &Proc,
) -> HostInfo {
    let res = tokio::time::timeout(SOON, async {
        loop {
            match rx.recv().await.expect("event stream") {
                HostEvent::Connected(info) if info.hostname == hostname => return info,
                _ => {}
            }
        }
    })
    .await;
    res.unwrap_or_else(|_| panic!("{hostname} did not connect\n{}", proc.log()))
}

/// Waits up to `within` for the Lost event of `id`; returns its reason.
async fn wait_lost(
    rx: &mut broadcast::Receiver<HostEvent>,
    id: HostId,
    within: Duration,
) -> String {
    tokio::time::timeout(within, async {
        loop {
            match rx.recv().await.expect("event stream") {
                HostEvent::Lost { info, reason } if info.id == id => return reason,
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("host {id} not reported lost within {within:?}"))
}

async fn run(c: &BuildletClient, script: &str) -> (Option<i32>, String) {
    let mut out = Vec::new();
    let st = c
        .exec_collect(ExecSpec::new("sh").args(["-c", script]), |s, d| {
            if s == OutputStream::Stdout {
                out.extend_from_slice(d)
            }
        })
        .await
        .unwrap_or_else(|e| panic!("exec {script:?}: {e}"));
    (st.code, String::from_utf8_lossy(&out).into_owned())
}

/// Starts `sh -c 'echo $$; exec sleep 60'` and returns its stream and process group.
async fn start_sleeper(c: &BuildletClient) -> (buildlet::client::ExecStream, Pid) {
    let mut s = c
        .exec(ExecSpec::new("sh").args(["-c", "echo $$; exec sleep 60"]))
        .await
        .expect("exec sleeper");
    let first = tokio::time::timeout(SOON, s.next()).await.expect("output");
    let pgid = match first {
        Some(Ok(ExecEvent::Output { data, .. })) => String::from_utf8_lossy(&data)
            .trim()
            .parse::<i32>()
            .expect("pid"),
        other => panic!("expected the sleeper's pid, got {other:?}"),
    };
    (s, Pid::from_raw(pgid))
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_put_and_get_run_through_the_tunnel_and_halt_stops_it() {
    let farm = Farm::start().await;
    let mut events = farm.listener.registry().subscribe();
    let mut p = farm.spawn_good("rev-calls");
    let info = wait_connected(&mut events, "rev-calls", &p).await;
    assert_eq!(info.host_type, HOST_TYPE);
    // The dialer logs it once the verdict arrives, which may be after the event.
    assert!(
        common::eventually(SOON, || p.log().contains("reverse tunnel established")).await,
        "{}",
        p.log()
    );
    let c = farm.client(info.id);

    let st = c.status().await.expect("status");
    assert_eq!(
        (st.host_type.as_str(), st.hostname.as_str()),
        (HOST_TYPE, "rev-calls")
    );
    let tgz = common::tgz(&[("src/hello.txt", 0o644, b"hello through the tunnel")]);
    let stats = c
        .put_tar(".", std::io::Cursor::new(tgz), None)
        .await
        .expect("put_tar");
    assert_eq!(stats.entries, 1, "{stats:?}");
    assert_eq!(
        run(&c, "cat src/hello.txt").await,
        (Some(0), "hello through the tunnel".into())
    );
    assert_eq!(run(&c, "exit 3").await.0, Some(3));
    c.write_file("src/made.txt", 0, "made by exec")
        .await
        .expect("write_file");
    let mut tar = Vec::new();
    c.get_tar("src", &mut tar, None).await.expect("get_tar");
    let mut names = Vec::new();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&tar[..]));
    for e in archive.entries().expect("entries") {
        let e = e.expect("entry");
        names.push(e.path().expect("path").to_string_lossy().into_owned());
    }
    names.sort();
    assert!(
        names.iter().any(|n| n.ends_with("hello.txt"))
            && names.iter().any(|n| n.ends_with("made.txt")),
        "{names:?}"
    );
    // A path outside the workdir is refused by the same policy as in listen mode.
    let err = c
        .write_file("../escape.txt", 0, "x")
        .await
        .expect_err("escape refused");
    assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");

    // Halt: answered, then the process exits 0 and the host is gone.
    c.halt().await.expect("halt");
    let st = p.wait_exit(SOON).await;
    assert!(st.success(), "exit {st:?}\n{}", p.log());
    wait_lost(&mut events, info.id, SOON).await;
    assert!(farm.listener.registry().is_empty());
}

/// Transfers go over data connections the buildlet dials back: bytes arrive intact
/// both ways, and a hostile tarball is refused with the same error as through the
/// tunnel. A client without data connections still gets the same results.
#[tokio::test(flavor = "multi_thread")]
async fn transfers_use_data_connections_with_the_tunnels_policy() {
    let farm = Farm::start().await;
    let mut events = farm.listener.registry().subscribe();
    let p = farm.spawn_good("rev-data");
    let info = wait_connected(&mut events, "rev-data", &p).await;
    let c = farm.client(info.id);
    let plain = farm.tunnel_only_client(info.id);

    // Incompressible enough that gzip cannot hide a lost byte: a xorshift sequence.
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let blob: Vec<u8> = (0..3 * 1024 * 1024 + 7)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let tgz = common::tgz(&[("up/blob", 0o644, &blob)]);
    let stats = c
        .put_tar(".", std::io::Cursor::new(tgz.clone()), None)
        .await
        .expect("put_tar");
    assert_eq!(
        (stats.entries, stats.bytes),
        (1, blob.len() as u64),
        "{stats:?}"
    );
    for client in [&c, &plain] {
        let mut tar = Vec::new();
        client.get_tar("up", &mut tar, None).await.expect("get_tar");
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&tar[..]));
        let mut found = None;
        for e in archive.entries().expect("entries") {
            let mut e = e.expect("entry");
            if e.path().expect("path").ends_with("blob") {
                let mut got = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut got).expect("read blob");
                found = Some(got);
            }
        }
        assert!(
            found.as_deref() == Some(&blob[..]),
            "blob came back altered"
        );
    }
    assert!(
        common::eventually(SOON, || p.log().contains("put_tar (data connection)")).await,
        "the upload did not use a data connection:\n{}",
        p.log()
    );
    assert!(p.log().contains("get_tar (data connection)"), "{}", p.log());

    // A buildlet that cannot dial back is served through the tunnel instead.
    let no_way_back = farm
        .tunnel_only_client(info.id)
        .with_data_opener(Arc::new(|| {
            Box::pin(async { Err(tonic::Status::unavailable("no route back")) })
        }));
    let mut tar = Vec::new();
    let n = no_way_back
        .get_tar("up", &mut tar, None)
        .await
        .expect("get_tar falls back to the tunnel");
    assert!(n > blob.len() as u64 / 2, "{n} bytes");

    // Path escape: refused the same way on both paths, and nothing lands outside.
    let evil = common::raw_tgz(&[("../escaped.txt", b"out")]);
    for client in [&c, &plain] {
        let err = client
            .put_tar(".", std::io::Cursor::new(evil.clone()), None)
            .await
            .expect_err("escape refused");
        assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");
    }
    let (code, _) = run(&c, "test ! -e ../escaped.txt").await;
    assert_eq!(code, Some(0), "a file escaped the workdir");
    // A missing directory is NotFound through either.
    for client in [&c, &plain] {
        let err = client
            .get_tar("nope", &mut Vec::new(), None)
            .await
            .expect_err("missing dir");
        assert_eq!(err.code(), ErrorCode::NotFound, "{err}");
    }
}

/// Containment works in reverse mode too: a process the command detached with setsid
/// dies with the command, and Status says what contains commands.
#[tokio::test(flavor = "multi_thread")]
async fn a_detached_process_dies_with_its_command_in_reverse_mode() {
    let farm = Farm::start().await;
    let mut events = farm.listener.registry().subscribe();
    let p = farm.spawn_good("rev-contain");
    let info = wait_connected(&mut events, "rev-contain", &p).await;
    let c = farm.client(info.id);
    let st = c.status().await.expect("status");
    assert!(
        st.containment == "subreaper" || st.containment.ends_with(&st.cgroup),
        "{st:?}"
    );
    // A unique duration marks the detached sleeper in /proc.
    let marker = format!("300.0{}", std::process::id());
    let sleeper_alive = || {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .map(|c| c == format!("sleep\0{marker}\0").into_bytes())
                    .unwrap_or(false)
            })
    };
    let script = format!(
        "setsid sleep {marker} & i=0; while [ $i -lt 200 ] && ! pgrep -fx 'sleep {marker}' >/dev/null; do sleep 0.05; i=$((i+1)); done; pgrep -fx 'sleep {marker}' >/dev/null && echo detached"
    );
    let (code, out) = run(&c, &script).await;
    assert_eq!((code, out.trim()), (Some(0), "detached"));
    assert!(
        common::eventually(SOON, || !sleeper_alive()).await,
        "the detached sleeper outlived its command\n{}",
        p.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_token_works_and_sigterm_stops_it_killing_commands() {
    let farm = Farm::start().await;
    let mut events = farm.listener.registry().subscribe();
    let secret = farm.file("token", TOKEN_SECRET);
    let mut p = farm.spawn(
        "rev-token",
        &[
            "--host-token-id",
            TOKEN_ID,
            "--host-token-file",
            path_str(&secret),
        ],
    );
    let info = wait_connected(&mut events, "rev-token", &p).await;
    let c = farm.client(info.id);
    let (mut sleeper, pgid) = start_sleeper(&c).await;
    kill(p.pid(), Signal::SIGTERM).expect("sigterm");
    let st = p.wait_exit(SOON).await;
    assert!(st.success(), "exit {st:?}\n{}", p.log());
    // The running command was killed, so its call ended (with an exit or the tunnel).
    let ended = tokio::time::timeout(SOON, async {
        while let Some(ev) = sleeper.next().await {
            if !matches!(ev, Ok(ExecEvent::Output { .. })) {
                return;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "exec call still open after sigterm");
    assert!(
        common::eventually(SOON, || common::group_members(pgid.as_raw()).is_empty()).await,
        "the command survived sigterm"
    );
    wait_lost(&mut events, info.id, SOON).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_calls_share_one_tunnel() {
    let farm = Farm::start().await;
    let mut events = farm.listener.registry().subscribe();
    let p = farm.spawn_good("rev-many");
    let info = wait_connected(&mut events, "rev-many", &p).await;
    let c = farm.client(info.id);
    // Each call waits until all 50 have started: calls served one after another would
    // never finish, so finishing at all shows they ran at once.
    let calls = (0..50).map(|i| {
        let c = c.clone();
        async move {
            let script = format!(
                "mkdir -p barrier && touch barrier/{i} && \
                 while [ \"$(ls barrier | wc -l)\" -lt 50 ]; do sleep 0.05; done; echo call-{i}"
            );
            (i, run(&c, &script).await)
        }
    });
    let results = tokio::time::timeout(Duration::from_secs(120), futures::future::join_all(calls))
        .await
        .expect("calls on one tunnel were served one at a time");
    for (i, (code, out)) in results {
        assert_eq!((code, out.trim()), (Some(0), format!("call-{i}").as_str()));
    }
    let m = farm.listener.metrics();
    assert_eq!((m.accepted_total, m.connected), (1, 1), "{m:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn small_calls_answer_during_a_100mb_get_tar() {
    let farm = Farm::start().await;
    let mut events = farm.listener.registry().subscribe();
    let p = farm.spawn_good("rev-big");
    let info = wait_connected(&mut events, "rev-big", &p).await;
    // The transfer shares the tunnel with the small calls (no data connection).
    let c = farm.tunnel_only_client(info.id);
    const SIZE: u64 = 100 * 1024 * 1024;
    // Random bytes: gzip cannot shrink them, so 100 MB really cross the tunnel.
    let (code, _) = run(
        &c,
        &format!("mkdir big && head -c {SIZE} /dev/urandom > big/blob"),
    )
    .await;
    assert_eq!(code, Some(0));

    let received = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let transfer = {
        let (c, received, done) = (c.clone(), received.clone(), done.clone());
        tokio::spawn(async move {
            let mut progress = |n: u64| received.store(n, Ordering::SeqCst);
            let mut sink = tokio::io::sink();
            let r = c.get_tar("big", &mut sink, Some(&mut progress)).await;
            done.store(true, Ordering::SeqCst);
            r
        })
    };
    let mut answered_during = 0;
    let mut slowest = Duration::ZERO;
    while !done.load(Ordering::SeqCst) {
        let t = Instant::now();
        c.status().await.expect("status during transfer");
        assert_eq!(run(&c, "true").await.0, Some(0));
        let took = t.elapsed();
        slowest = slowest.max(took);
        if received.load(Ordering::SeqCst) > 0 && !done.load(Ordering::SeqCst) {
            answered_during += 1;
        }
    }
    let total = tokio::time::timeout(Duration::from_secs(300), transfer)
        .await
        .expect("transfer finishes")
        .expect("transfer task")
        .expect("get_tar");
    assert!(total >= SIZE, "got {total} bytes");
    assert!(
        answered_during >= 3,
        "only {answered_during} small calls answered while the transfer ran"
    );
    assert!(
        slowest < Duration::from_secs(10),
        "a small call took {slowest:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_fails_the_call_and_a_restart_comes_back() {
    let farm = Farm::start_watchful().await;
    let mut events = farm.listener.registry().subscribe();
    let mut p = farm.spawn_good("rev-kill");
    let info = wait_connected(&mut events, "rev-kill", &p).await;
    let c = farm.client(info.id);
    let (mut sleeper, pgid) = start_sleeper(&c).await;

    let killed = Instant::now();
    p.child.start_kill().expect("kill -9");
    let _ = p.child.wait().await;
    let next = tokio::time::timeout(LIVENESS_BOUND, sleeper.next())
        .await
        .expect("the call must fail within the liveness bound");
    match next {
        Some(Err(e)) => assert_eq!(e.code(), ErrorCode::Unavailable, "{e}"),
        other => panic!("expected unavailable, got {other:?}"),
    }
    wait_lost(&mut events, info.id, LIVENESS_BOUND).await;
    assert!(killed.elapsed() < LIVENESS_BOUND);
    assert!(c.status().await.is_err(), "calls on a lost host must fail");
    // The orphaned command is no longer anyone's; clean it up.
    let _ = killpg(pgid, Signal::SIGKILL);

    let restarted = Instant::now();
    let p2 = farm.spawn_good("rev-kill");
    let info2 = wait_connected(&mut events, "rev-kill", &p2).await;
    assert!(
        restarted.elapsed() < Duration::from_secs(15),
        "reconnect took {:?}",
        restarted.elapsed()
    );
    assert_ne!(info2.id, info.id);
    let st = farm.client(info2.id).status().await.expect("status");
    assert_eq!(st.hostname, "rev-kill");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_buildlet_is_lost_within_the_keepalive_and_redials_when_thawed() {
    let farm = Farm::start_watchful().await;
    let mut events = farm.listener.registry().subscribe();
    let mut p = farm.spawn_good("rev-stop");
    let info = wait_connected(&mut events, "rev-stop", &p).await;
    let c = farm.client(info.id);
    let (mut sleeper, pgid) = start_sleeper(&c).await;

    kill(p.pid(), Signal::SIGSTOP).expect("sigstop");
    let frozen = Instant::now();
    let reason = wait_lost(&mut events, info.id, LIVENESS_BOUND).await;
    let took = frozen.elapsed();
    let next = tokio::time::timeout(SOON, sleeper.next())
        .await
        .expect("the call ends once the host is lost");
    match next {
        Some(Err(e)) => assert_eq!(e.code(), ErrorCode::Unavailable, "{e}"),
        other => panic!("expected unavailable, got {other:?}"),
    }
    assert!(took < LIVENESS_BOUND, "lost after {took:?} ({reason})");

    // Thawed, it finds its tunnel dead and dials in again.
    kill(p.pid(), Signal::SIGCONT).expect("sigcont");
    let info2 = wait_connected(&mut events, "rev-stop", &p).await;
    assert_ne!(info2.id, info.id);
    farm.client(info2.id).status().await.expect("status");
    let _ = killpg(pgid, Signal::SIGKILL);
    p.child.start_kill().expect("kill");
    let _ = p.child.wait().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_keys_are_refused_again_and_again_and_never_registered() {
    let farm = Farm::start().await;
    let mut events = farm.listener.registry().subscribe();
    let wrong_master = farm.key_file(b"another master key", HOST_TYPE);
    let other_type = farm.key_file(MASTER, "host-other-type");
    let mut a = farm.spawn(
        "rev-wrong-master",
        &["--builder-key-file", path_str(&wrong_master)],
    );
    let mut b = farm.spawn(
        "rev-other-type",
        &["--builder-key-file", path_str(&other_type)],
    );
    // Each process is refused at least three times (it keeps retrying).
    let deadline = Instant::now() + Duration::from_secs(120);
    while farm.listener.metrics().refused(RefusalKind::BadCredential) < 6
        || a.log().matches("coordinator refused dial-in").count() < 3
        || b.log().matches("coordinator refused dial-in").count() < 3
    {
        assert!(
            Instant::now() < deadline,
            "not refused often enough: {:?}\n{}\n{}",
            farm.listener.metrics(),
            a.log(),
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for p in [&mut a, &mut b] {
        assert!(
            p.child.try_wait().expect("try_wait").is_none(),
            "a refused buildlet keeps retrying:\n{}",
            p.log()
        );
    }
    let m = farm.listener.metrics();
    assert_eq!((m.accepted_total, m.connected), (0, 0), "{m:?}");
    assert!(farm.listener.registry().is_empty());
    assert!(
        matches!(
            events.try_recv(),
            Err(broadcast::error::TryRecvError::Empty)
        ),
        "no host events for refused dial-ins"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_flags_exit_64_with_a_message() {
    let farm = Farm::start().await;
    let key = farm.key_file(MASTER, HOST_TYPE);
    let key = path_str(&key);
    let ca = path_str(&farm.ca_file);
    let url = format!("https://{}", farm.addr);
    let work = farm.dir.path().join("w");
    let work = path_str(&work);
    let base = ["--host-type", HOST_TYPE, "--workdir", work, "--ca-file", ca];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--reverse", &url], "no credential"),
        (
            vec![
                "--reverse",
                &url,
                "--builder-key-file",
                key,
                "--host-token-id",
                TOKEN_ID,
                "--host-token-file",
                key,
            ],
            "not both",
        ),
        (
            vec!["--reverse", &url, "--builder-key-file", "/nonexistent/key"],
            "--builder-key-file",
        ),
        (
            vec!["--reverse", &url, "--builder-key-file", ca],
            "not a builder key",
        ),
        (
            vec!["--reverse", "http://127.0.0.1:1", "--builder-key-file", key],
            "only https://",
        ),
        (
            vec!["--reverse", &url, "--host-token-id", TOKEN_ID],
            "needs --host-token-file",
        ),
        (
            vec![
                "--reverse",
                &url,
                "--builder-key-file",
                key,
                "--hostname",
                "bad name",
            ],
            "hostname",
        ),
        (
            vec![
                "--reverse",
                &url,
                "--builder-key-file",
                key,
                "--listen",
                "127.0.0.1:0",
            ],
            "not both",
        ),
    ];
    for (args, want) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_buildlet"))
            .args(&args)
            .args(base)
            .output()
            .await
            .expect("run buildlet");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: want {want:?} in {stderr}");
    }
    // A missing --ca-file is reported, not defaulted.
    let out = Command::new(env!("CARGO_BIN_EXE_buildlet"))
        .args(["--reverse", &url, "--builder-key-file", key])
        .args(["--host-type", HOST_TYPE, "--workdir", work])
        .output()
        .await
        .expect("run buildlet");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ca-file"));
}

#[tokio::test(flavor = "multi_thread")]
async fn keygen_prints_the_builder_key_of_the_master_key_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let master = [7u8; 32];
    let path = dir.path().join("master.key");
    // As the coordinator writes it: hex, no newline.
    std::fs::write(&path, hex::encode(master)).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_buildlet"))
        .args(["keygen", "--host-type", HOST_TYPE, "--master-key-file"])
        .arg(&path)
        .output()
        .await
        .expect("keygen");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        revdial::builder_key(&master, HOST_TYPE)
    );
    std::fs::write(&path, "not hex").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_buildlet"))
        .args(["keygen", "--host-type", HOST_TYPE, "--master-key-file"])
        .arg(&path)
        .output()
        .await
        .expect("keygen");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a hex key"));
}
