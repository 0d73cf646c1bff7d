//! Hostile clients for the stall tests of the coordinator's port and buildlet listen
//! mode: many connections that each stall in one way, held open from this process
//! until the server closes them. Shared by `coordinator/tests/stalls.rs` and
//! `buildlet/tests/stalls.rs` (included by path).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// How a flood connection stalls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// TCP connect, then nothing.
    TcpSilence,
    /// A completed TLS handshake, then nothing.
    TlsSilence,
    /// Part of an HTTP/1 request's headers in plaintext, then nothing.
    PartialHeadersPlain,
    /// Part of an HTTP/1 request's headers over TLS, then nothing.
    PartialHeadersTls,
    /// TLS with ALPN h2 and the HTTP/2 connection preface, then nothing.
    Http2PrefaceTls,
    /// TLS with ALPN `buildfarm-bulk/1` (a transfer's connection), then no request.
    BulkSilence,
    /// HTTP/1 headers over plaintext, one line a second, never finished.
    TrickledHeaders,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::TcpSilence,
        Kind::TlsSilence,
        Kind::PartialHeadersPlain,
        Kind::PartialHeadersTls,
        Kind::Http2PrefaceTls,
        Kind::BulkSilence,
        Kind::TrickledHeaders,
    ];

    fn tls(self) -> bool {
        matches!(
            self,
            Kind::TlsSilence | Kind::PartialHeadersTls | Kind::Http2PrefaceTls | Kind::BulkSilence
        )
    }

    fn first_bytes(self) -> &'static [u8] {
        match self {
            Kind::TcpSilence | Kind::TlsSilence | Kind::BulkSilence => b"",
            Kind::PartialHeadersPlain | Kind::PartialHeadersTls => {
                b"GET / HTTP/1.1\r\nHost: stall\r\nUser-Agent: st"
            }
            Kind::Http2PrefaceTls => b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            Kind::TrickledHeaders => b"GET / HTTP/1.1\r\nHost: stall\r\n",
        }
    }
}

/// Where to flood: the address and, for TLS kinds, how to reach it.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// Trusts the server's CA; no ALPN (HTTP/1 kinds, TLS silence).
    pub tls_plain: Arc<ClientConfig>,
    /// Trusts the server's CA; ALPN h2.
    pub tls_h2: Arc<ClientConfig>,
    /// Trusts the server's CA; ALPN `buildfarm-bulk/1`.
    pub tls_bulk: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

impl Target {
    /// A target whose certificate chains to `ca_pem` (optionally presenting a client
    /// certificate, for servers that want one).
    pub fn new(
        addr: SocketAddr,
        ca_pem: &str,
        identity: Option<&buildfarm_tls::Identity>,
        host: &str,
    ) -> Target {
        Target {
            addr,
            tls_plain: buildfarm_tls::client_config(ca_pem, identity, &[]).expect("tls config"),
            tls_h2: buildfarm_tls::client_config(ca_pem, identity, &[buildfarm_tls::ALPN_H2])
                .expect("tls config"),
            tls_bulk: buildfarm_tls::client_config(ca_pem, identity, &[buildfarm_tls::ALPN_BULK])
                .expect("tls config"),
            server_name: buildfarm_tls::server_name(host).expect("server name"),
        }
    }
}

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One stalled connection.
pub struct Stalled {
    io: Box<dyn Io>,
    kind: Kind,
}

/// Connections opened at once while flooding; beyond the listen backlog a connect
/// waits for a SYN retransmission, which only slows the flood down.
const CONNECT_CONCURRENCY: usize = 128;

/// Opens `n` connections of `kind`; panics if one cannot be opened (the server must
/// accept every one of them: they are under its cap). Returns them still open.
pub async fn open(target: &Target, kind: Kind, n: usize) -> Vec<Stalled> {
    open_some(target, kind, n, true).await
}

/// Opens up to `n` connections of `kind`, skipping those the server refuses or closes
/// during the handshake when `must` is false.
pub async fn open_some(target: &Target, kind: Kind, n: usize, must: bool) -> Vec<Stalled> {
    let results: Vec<Result<Stalled, String>> = futures::stream::iter(0..n)
        .map(|_| open_one(target.clone(), kind))
        .buffer_unordered(CONNECT_CONCURRENCY)
        .collect()
        .await;
    let mut out = Vec::with_capacity(n);
    for r in results {
        match r {
            Ok(s) => out.push(s),
            Err(e) if must => panic!("opening a {kind:?} connection: {e}"),
            Err(_) => {}
        }
    }
    out
}

async fn open_one(target: Target, kind: Kind) -> Result<Stalled, String> {
    let tcp = tokio::time::timeout(Duration::from_secs(60), TcpStream::connect(target.addr))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    let mut io: Box<dyn Io> = if kind.tls() {
        let config = match kind {
            Kind::Http2PrefaceTls => target.tls_h2.clone(),
            Kind::BulkSilence => target.tls_bulk.clone(),
            _ => target.tls_plain.clone(),
        };
        let tls: TlsStream<TcpStream> = tokio::time::timeout(
            Duration::from_secs(60),
            TlsConnector::from(config).connect(target.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| "tls handshake timed out".to_owned())?
        .map_err(|e| format!("tls handshake: {e}"))?;
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    let first = kind.first_bytes();
    if !first.is_empty() {
        io.write_all(first)
            .await
            .map_err(|e| format!("write: {e}"))?;
        io.flush().await.map_err(|e| format!("flush: {e}"))?;
    }
    Ok(Stalled { io, kind })
}

/// Holds every connection (trickling header lines where the kind does) until the
/// server closes it or `deadline` passes; returns how many are still open then.
pub async fn wait_closed(conns: Vec<Stalled>, deadline: Instant) -> usize {
    let results: Vec<bool> = futures::stream::iter(conns)
        .map(|c| hold(c, deadline))
        .buffer_unordered(usize::MAX)
        .collect()
        .await;
    results.into_iter().filter(|closed| !closed).count()
}

/// True when the server closed the connection before `deadline`.
async fn hold(mut c: Stalled, deadline: Instant) -> bool {
    let mut buf = vec![0u8; 4096];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            r = c.io.read(&mut buf) => match r {
                Ok(0) | Err(_) => return true,
                // The server's own frames (HTTP/2 SETTINGS, a TLS ticket): keep waiting.
                Ok(_) => {}
            },
            _ = tick.tick(), if c.kind == Kind::TrickledHeaders => {
                if c.io.write_all(b"X-Trickle: 1\r\n").await.is_err() {
                    return true;
                }
            }
            _ = tokio::time::sleep_until(deadline) => return false,
        }
    }
}

/// Raises this process's soft open-file limit to the hard limit (a flood needs many).
pub fn raise_nofile() -> u64 {
    revdial::accept::raise_nofile_limit().expect("raising RLIMIT_NOFILE")
}

/// Open file descriptors of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("reading /proc/PID/fd")
        .count()
}

/// Resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line")
}

/// Waits (polling) until `f` is true or `limit` passes; returns whether it became true.
pub async fn becomes(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How many connections per kind: 5,000 in the slow suite, 1,000 otherwise.
pub fn flood_size() -> usize {
    if std::env::var("BUILDFARM_SLOW_TESTS").as_deref() == Ok("1") {
        5000
    } else {
        1000
    }
}

/// The time limits the flood tests configure: short so a flood closes quickly, but
/// longer than opening the whole flood takes (5,000 TLS handshakes take over ten
/// seconds on a loaded two-core machine), so every connection is open at once.
pub fn stall_limit() -> Duration {
    if flood_size() > 1000 {
        Duration::from_secs(20)
    } else {
        Duration::from_secs(4)
    }
}
