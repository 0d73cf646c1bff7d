//! The coordinator's one port. Each connection is sorted by its first bytes and its
//! TLS ALPN: a TLS connection offering `buildfarm-revdial/1` is a buildlet dialling in
//! (handed to the revdial listener); one offering `buildfarm-bulk/1` carries one gomote
//! transfer (`Api::serve_bulk`); any other TLS connection, and plaintext HTTP when
//! allowed (loopback by default), is served by the HTTP router, which carries the
//! status pages, the JSON API, the webhook and the public gRPC API alike.
//!
//! Every connection goes through the bounded acceptor of `revdial::accept`: caps on
//! open connections and handshakes, a handshake timeout covering the TLS handshake and
//! the sorting, and HTTP header, idle and keep-alive limits once served (the
//! `[connections]` config table).

use std::net::SocketAddr;
use std::sync::Arc;

use buildfarm_config::ConnectionsConfig;
use hyper_util::rt::TokioIo;
use revdial::accept::{Acceptor, Closed, Conn, ConnLimits, HttpVersions, Tracked};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

#[derive(Clone)]
pub struct Endpoint {
    pub router: axum::Router,
    pub tls: Arc<rustls::ServerConfig>,
    pub revdial: revdial::Listener,
    /// Serves gomote transfers on bulk connections.
    pub api: crate::api::Api,
    /// Serve plaintext HTTP too (the status page in a browser without certificates).
    pub allow_plaintext: bool,
    /// Admits connections within their time limits and caps; made by the caller so the
    /// pages can read its counters.
    pub acceptor: Acceptor,
}

/// The acceptor limits of a `[connections]` table; an unset `max_connections` is
/// derived from the open-file limit (raise it first, see
/// `revdial::accept::raise_nofile_limit`).
pub fn conn_limits(c: &ConnectionsConfig) -> ConnLimits {
    let defaults = ConnLimits::default();
    ConnLimits {
        handshake_timeout: c.handshake_timeout,
        header_read_timeout: c.header_read_timeout,
        idle_timeout: c.idle_timeout,
        keepalive_interval: c.keepalive_interval,
        // One bound for both: a PING unanswered for an interval means a dead peer.
        keepalive_timeout: c.keepalive_interval,
        max_connections: c
            .max_connections
            .map_or(defaults.max_connections, |n| n as usize),
        max_handshakes: c.max_handshakes as usize,
        max_header_bytes: usize::try_from(c.max_header_bytes.as_u64())
            .unwrap_or(defaults.max_header_bytes),
    }
}

/// Accepts connections until `shutdown`; each is served in a task owned by `tasks`.
pub async fn serve(
    listener: TcpListener,
    ep: Endpoint,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let acceptor = ep.acceptor.clone();
    let tls = tokio_rustls::TlsAcceptor::from(ep.tls.clone());
    while let Some((tcp, peer, conn)) = acceptor.accept(&listener, &shutdown).await {
        let (ep, tls, shutdown) = (ep.clone(), tls.clone(), shutdown.clone());
        tasks.spawn(async move {
            match handle(tcp, peer, conn, ep, tls, shutdown).await {
                Ok(closed) => debug!(%peer, ?closed, "connection closed"),
                Err(e) => debug!(%peer, error = %e, "connection ended with an error"),
            }
        });
    }
}

/// What a connection turned out to be after its handshake.
enum Sorted {
    Revdial(Tracked<tokio_rustls::server::TlsStream<TcpStream>>),
    Bulk(Tracked<tokio_rustls::server::TlsStream<TcpStream>>),
    HttpTls(Tracked<tokio_rustls::server::TlsStream<TcpStream>>),
    HttpPlain(Tracked<TcpStream>),
    Refused,
}

async fn handle(
    tcp: TcpStream,
    peer: SocketAddr,
    conn: Conn,
    ep: Endpoint,
    tls: tokio_rustls::TlsAcceptor,
    shutdown: CancellationToken,
) -> anyhow::Result<Closed> {
    let limit = conn.limits().handshake_timeout;
    // One deadline for the first byte, the TLS handshake and the ALPN sorting; an
    // eviction (the acceptor needs the slot) ends it early.
    let sorted = tokio::select! {
        r = tokio::time::timeout(limit, sort(tcp, peer, conn, &ep, &tls)) => match r {
            Ok(r) => r?,
            Err(_) => {
                debug!(%peer, ?limit, "handshake timed out");
                return Ok(Closed::Finished);
            }
        },
        _ = shutdown.cancelled() => return Ok(Closed::Shutdown),
    };
    let router = ep.router;
    let served = match sorted {
        Sorted::Revdial(io) => {
            let h = io.conn().handle();
            // Refusals are logged and counted by the listener. Until it lets the host
            // in, the connection may be evicted like any unauthenticated one.
            tokio::select! {
                r = ep.revdial.accept(io, peer) => { r?; }
                _ = h.killed() => return Ok(Closed::Killed),
            }
            // The tunnel (and the slot it holds) lives on after this returns.
            h.pin();
            return Ok(Closed::Finished);
        }
        Sorted::Bulk(io) => {
            let h = io.conn().handle();
            // Until the caller is authorized the connection may be evicted like any
            // other; a transfer then runs to its end (it may pause between reads).
            let pin = h.clone();
            tokio::select! {
                _ = ep.api.serve_bulk(io, move || pin.pin()) => {}
                _ = h.killed() => return Ok(Closed::Killed),
                _ = shutdown.cancelled() => return Ok(Closed::Shutdown),
            }
            return Ok(Closed::Finished);
        }
        Sorted::HttpTls(io) => serve_http(io, router, &shutdown).await,
        Sorted::HttpPlain(io) => serve_http(io, router, &shutdown).await,
        Sorted::Refused => return Ok(Closed::Finished),
    };
    served.map_err(|e| anyhow::anyhow!("{e}"))
}

/// Peeks the first byte, does TLS when it is a handshake, and sorts by ALPN. Gives up
/// when the acceptor evicts the connection.
async fn sort(
    tcp: TcpStream,
    peer: SocketAddr,
    conn: Conn,
    ep: &Endpoint,
    tls: &tokio_rustls::TlsAcceptor,
) -> anyhow::Result<Sorted> {
    let mut first = [0u8; 1];
    let n = tokio::select! {
        r = tcp.peek(&mut first) => r?,
        _ = conn.killed() => return Ok(Sorted::Refused),
    };
    if n == 0 {
        return Ok(Sorted::Refused);
    }
    if first[0] == TLS_HANDSHAKE {
        let stream = tokio::select! {
            r = tls.accept(tcp) => r?,
            _ = conn.killed() => return Ok(Sorted::Refused),
        };
        let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let io = Tracked::new(stream, conn);
        io.conn().handshake_done();
        Ok(match alpn.as_deref() {
            Some(buildfarm_tls::ALPN_REVDIAL) => Sorted::Revdial(io),
            Some(buildfarm_tls::ALPN_BULK) => Sorted::Bulk(io),
            _ => Sorted::HttpTls(io),
        })
    } else if ep.allow_plaintext {
        conn.handshake_done();
        Ok(Sorted::HttpPlain(Tracked::new(tcp, conn)))
    } else {
        warn!(%peer, "plaintext connection refused; this port speaks TLS");
        Ok(Sorted::Refused)
    }
}

async fn serve_http<S>(
    io: Tracked<S>,
    router: axum::Router,
    shutdown: &CancellationToken,
) -> Result<Closed, Box<dyn std::error::Error + Send + Sync>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // The slot travels inside the stream; the handle watches the connection's state.
    let conn = io.conn().handle();
    revdial::accept::serve_http(
        TokioIo::new(io),
        router,
        &conn,
        HttpVersions::Auto,
        shutdown,
    )
    .await
}
