//! The coordinator's one port. Each connection is sorted by its first bytes and its
//! TLS ALPN: a TLS connection offering `buildfarm-revdial/1` is a buildlet dialling in
//! (handed to the revdial listener); any other TLS connection, and plaintext HTTP when
//! allowed (loopback by default), is served by the HTTP router, which carries the
//! status pages, the JSON API, the webhook and the public gRPC API alike.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Endpoint {
    pub router: axum::Router,
    pub tls: Arc<rustls::ServerConfig>,
    pub revdial: revdial::Listener,
    /// Serve plaintext HTTP too (the status page in a browser without certificates).
    pub allow_plaintext: bool,
}

/// Accepts connections until `shutdown`; each is served in a task owned by `tasks`.
pub async fn serve(
    listener: TcpListener,
    ep: Endpoint,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(ep.tls.clone());
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(error) => {
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (ep, acceptor, shutdown) = (ep.clone(), acceptor.clone(), shutdown.clone());
        tasks.spawn(async move {
            if let Err(e) = handle(tcp, peer, ep, acceptor, shutdown).await {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

async fn handle(
    tcp: TcpStream,
    peer: SocketAddr,
    ep: Endpoint,
    acceptor: tokio_rustls::TlsAcceptor,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let _ = tcp.set_nodelay(true);
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await??;
    if n == 0 {
        return Ok(());
    }
    if first[0] == TLS_HANDSHAKE {
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await??;
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        if alpn.as_deref() == Some(revdial::tls::ALPN_REVDIAL) {
            ep.revdial.accept(tls, peer).await?;
            return Ok(());
        }
        serve_http(TokioIo::new(tls), ep.router, shutdown).await
    } else if ep.allow_plaintext {
        serve_http(TokioIo::new(tcp), ep.router, shutdown).await
    } else {
        warn!(%peer, "plaintext connection refused; this port speaks TLS");
        Ok(())
    }
}

async fn serve_http<I>(
    io: I,
    router: axum::Router,
    shutdown: CancellationToken,
) -> anyhow::Result<()>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = TowerToHyperService::new(router);
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r.map_err(|e| anyhow::anyhow!("{e}")),
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            // Long streams (live logs, watches) would hold shutdown forever.
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
            Ok(())
        }
    }
}
