//! The coordinator's end of reverse tunnels. [`Listener::accept`] takes a stream that
//! already passed TLS (the coordinator's accept loop routes it here by ALPN), runs the
//! handshake, and turns the connection around: we become the HTTP/2 client of the
//! host. Each tunnel then has a monitor task that pings it and reports its loss.
//! [`serve`] is a small accept loop for tests and simple deployments.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use buildfarm_proto::revdial::tunnel_client::TunnelClient;
use buildfarm_proto::revdial::{Hello, PingRequest};
use hyper::client::conn::http2;
use hyper_util::rt::TokioIo;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::accept::{Acceptor, ConnLimits, Tracked};
use crate::auth::Authenticator;
use crate::data::{DataWaiters, Waiter};
use crate::handshake::{
    NONCE_LEN, Refusal, RefusalKind, ValidHello, challenge, validate_hello, verdict,
};
use crate::link::{LinkSignal, WatchedIo};
use crate::registry::{ConnectedHost, HostId, HostInfo, Registry};
use crate::tunnel::{TunnelChannel, TunnelHost};
use crate::wire::{WireError, read_frame, write_frame};

/// How the listener runs its tunnels.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// HTTP/2 PING interval on idle and busy tunnels. Default 5 s.
    pub keepalive_interval: Duration,
    /// A PING unanswered this long closes the tunnel. Default 5 s, so a dead peer is
    /// noticed within interval + timeout.
    pub keepalive_timeout: Duration,
    /// Time a dialer has for the whole handshake (TLS excluded). Default 10 s.
    pub handshake_timeout: Duration,
    /// Interval of the `Tunnel.Ping` round trips that measure RTT. Default 30 s: liveness
    /// is the HTTP/2 keep-alive's job, and a gRPC call costs an idle fleet several
    /// times what a PING does.
    pub ping_interval: Duration,
    /// HTTP/2 flow-control window per stream. Default 4 MiB.
    pub stream_window: u32,
    /// HTTP/2 flow-control window per connection; larger than a stream's so one big
    /// transfer cannot starve small calls. Default 16 MiB.
    pub connection_window: u32,
    /// Largest HTTP/2 frame this end accepts (the dialer's GetTar chunks travel in
    /// frames up to this size). Default [`crate::h2::MAX_FRAME_SIZE`] (256 KiB).
    pub max_frame_size: u32,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(30),
            stream_window: crate::h2::STREAM_WINDOW,
            connection_window: crate::h2::CONNECTION_WINDOW,
            max_frame_size: crate::h2::MAX_FRAME_SIZE,
        }
    }
}

/// Counters since the listener was made, for the coordinator's metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerMetrics {
    pub accepted_total: u64,
    /// Every [`RefusalKind`] is present, zero or not.
    pub refused_total: BTreeMap<RefusalKind, u64>,
    pub lost_total: u64,
    pub connected: usize,
}

impl ListenerMetrics {
    pub fn refused(&self, kind: RefusalKind) -> u64 {
        self.refused_total.get(&kind).copied().unwrap_or(0)
    }

    pub fn refused_sum(&self) -> u64 {
        self.refused_total.values().sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DialInError {
    #[error("dial-in from {peer} refused ({kind}): {reason}")]
    Refused {
        peer: SocketAddr,
        kind: RefusalKind,
        reason: String,
    },
    #[error("opening the reverse gRPC channel to {peer}: {source}")]
    Channel {
        peer: SocketAddr,
        source: hyper::Error,
    },
    #[error("listener is shut down")]
    ShutDown,
}

struct Inner {
    /// Swapped whole by [`Listener::set_authenticator`]; each handshake reads it once.
    auth: std::sync::RwLock<Arc<Authenticator>>,
    cfg: ListenerConfig,
    registry: Registry,
    accepted: AtomicU64,
    refused: [AtomicU64; RefusalKind::ALL.len()],
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// Data connections asked for over tunnels and not yet dialled back.
    data: Arc<DataWaiters>,
}

/// Accepts reverse dial-ins. Cheap to clone.
#[derive(Clone)]
pub struct Listener {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("cfg", &self.inner.cfg)
            .field("registry", &self.inner.registry)
            .finish_non_exhaustive()
    }
}

impl Listener {
    pub fn new(auth: Authenticator, cfg: ListenerConfig) -> Self {
        Listener {
            inner: Arc::new(Inner {
                auth: std::sync::RwLock::new(Arc::new(auth)),
                cfg,
                registry: Registry::new(),
                accepted: AtomicU64::new(0),
                refused: Default::default(),
                tasks: TaskTracker::new(),
                shutdown: CancellationToken::new(),
                data: Arc::default(),
            }),
        }
    }

    /// Replaces the credentials new dial-ins are checked against (key rotation). Hosts
    /// already connected are not checked again and stay connected.
    pub fn set_authenticator(&self, auth: Authenticator) {
        *self.inner.auth.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(auth);
    }

    pub fn registry(&self) -> Registry {
        self.inner.registry.clone()
    }

    pub fn config(&self) -> &ListenerConfig {
        &self.inner.cfg
    }

    pub fn metrics(&self) -> ListenerMetrics {
        ListenerMetrics {
            accepted_total: self.inner.accepted.load(Ordering::Relaxed),
            refused_total: RefusalKind::ALL
                .iter()
                .map(|k| (*k, self.inner.refused[k.index()].load(Ordering::Relaxed)))
                .collect(),
            lost_total: self.inner.registry.lost_total(),
            connected: self.inner.registry.len(),
        }
    }

    /// Closes every tunnel (each reported lost), refuses new ones and waits for the
    /// monitor tasks to finish.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    /// Runs the handshake on a TLS-accepted stream and, if the host is let in,
    /// registers it and returns its id. The tunnel lives on after this returns. A data
    /// connection (see [`TunnelChannel::open_data`]) goes to whoever asked for it
    /// instead; the id returned is then that of its host's tunnel.
    pub async fn accept<S>(&self, mut io: S, peer: SocketAddr) -> Result<HostId, DialInError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        if self.inner.shutdown.is_cancelled() {
            return Err(DialInError::ShutDown);
        }
        let cfg = &self.inner.cfg;
        let nonce: [u8; NONCE_LEN] = rand::random();
        let seen_host_type = Mutex::new(String::new());
        let outcome = match timeout(
            cfg.handshake_timeout,
            self.handshake(&mut io, &nonce, &seen_host_type),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(Refusal::new(
                RefusalKind::Timeout,
                format!("handshake not finished within {:?}", cfg.handshake_timeout),
            )),
        };
        let outcome = match outcome {
            Ok(hello) => {
                // The verdict write gets a short deadline of its own: the handshake's
                // may be nearly spent.
                match timeout(
                    Duration::from_secs(5),
                    write_frame(&mut io, "verdict", &verdict(&Ok(()))),
                )
                .await
                {
                    Ok(Ok(())) => Ok(hello),
                    Ok(Err(e)) => Err(Refusal::new(RefusalKind::Io, e.to_string())),
                    Err(_) => Err(Refusal::new(
                        RefusalKind::Timeout,
                        "writing the verdict timed out",
                    )),
                }
            }
            Err(refusal) => {
                if refusal.kind != RefusalKind::Io {
                    // Best effort: the dialer logs why it was refused.
                    let v = verdict(&Err(refusal.clone()));
                    let _ =
                        timeout(Duration::from_secs(1), write_frame(&mut io, "verdict", &v)).await;
                }
                Err(refusal)
            }
        };
        let (hello, data_waiter) = match outcome {
            Ok(h) => h,
            Err(r) => {
                self.inner.refused[r.kind.index()].fetch_add(1, Ordering::Relaxed);
                let host_type = seen_host_type.lock().map(|s| s.clone()).unwrap_or_default();
                warn!(peer = %peer, host_type, reason = %r.reason, kind = %r.kind, "reverse dial-in refused");
                return Err(DialInError::Refused {
                    peer,
                    kind: r.kind,
                    reason: r.reason,
                });
            }
        };
        if let Some(waiter) = data_waiter {
            debug!(%peer, host_type = %hello.host_type, hostname = %hello.hostname, "data connection let in");
            let host = waiter.host;
            // The asker may have given up meanwhile; the stream then just closes.
            let _ = waiter.tx.send(Box::new(io));
            return Ok(host);
        }
        self.open_tunnel(io, peer, hello).await
    }

    async fn handshake<S>(
        &self,
        io: &mut S,
        nonce: &[u8; NONCE_LEN],
        seen_host_type: &Mutex<String>,
    ) -> Result<(ValidHello, Option<Waiter>), Refusal>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let wire = |e: WireError| match e {
            WireError::Frame(f) => Refusal::from(f),
            other => Refusal::new(RefusalKind::Io, other.to_string()),
        };
        write_frame(io, "challenge", &challenge(*nonce))
            .await
            .map_err(wire)?;
        let hello: Hello = read_frame(io, "hello").await.map_err(wire)?;
        if let Ok(mut s) = seen_host_type.lock() {
            // Only for the log line; cut so a hostile value cannot flood it.
            *s = hello.host_type.chars().take(64).collect();
        }
        let hello = validate_hello(&hello)?;
        let auth = self
            .inner
            .auth
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        auth.verify(nonce, &hello)?;
        let waiter = match &hello.data_token {
            None => None,
            Some(token) => Some(
                self.inner
                    .data
                    .take(token, &hello.host_type, &hello.hostname)
                    .ok_or_else(|| {
                        Refusal::new(
                            RefusalKind::BadCredential,
                            "a data connection with an unknown, spent or another host's token",
                        )
                    })?,
            ),
        };
        Ok((hello, waiter))
    }

    async fn open_tunnel<S>(
        &self,
        io: S,
        peer: SocketAddr,
        hello: ValidHello,
    ) -> Result<HostId, DialInError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let cfg = &self.inner.cfg;
        let registry = &self.inner.registry;
        let id = registry.next_id();
        let signal = LinkSignal::new();
        let kill = CancellationToken::new();
        let lost = CancellationToken::new();
        let io = WatchedIo::new(io, signal.clone(), kill.clone());
        let channel = connect_channel(io, cfg, &self.inner.tasks)
            .await
            .map_err(|source| {
                kill.cancel();
                DialInError::Channel { peer, source }
            })?;
        let channel = TunnelChannel::new(
            channel,
            lost.clone(),
            TunnelHost::new(id, &hello.host_type, &hello.hostname),
            self.inner.data.clone(),
        );
        let info = HostInfo {
            id,
            host_type: hello.host_type,
            hostname: hello.hostname,
            version: hello.buildlet_version,
            peer,
            connected_since: SystemTime::now(),
            last_ping_rtt: None,
        };
        let span = info_span!("revdial_tunnel", host_id = %id, host_type = %info.host_type, hostname = %info.hostname);
        // Counted before the Connected event so observers see consistent metrics.
        self.inner.accepted.fetch_add(1, Ordering::Relaxed);
        registry.insert(
            ConnectedHost {
                info,
                channel: channel.clone(),
                lost: lost.clone(),
            },
            kill,
        );
        let monitor = Monitor {
            registry: registry.clone(),
            id,
            signal,
            lost,
            channel,
            cfg: cfg.clone(),
            shutdown: self.inner.shutdown.clone(),
        };
        self.inner.tasks.spawn(monitor.run().instrument(span));
        Ok(id)
    }
}

/// Makes the HTTP/2 client over the already-open stream: hyper's connection task
/// (owned by the listener's task tracker) and the handle calls go through. No tonic
/// `Channel`: its request buffer is one more task hop per call and its queue a few KiB
/// per tunnel, and there is nothing to reconnect to anyway.
async fn connect_channel<S>(
    io: WatchedIo<S>,
    cfg: &ListenerConfig,
    tasks: &TaskTracker,
) -> Result<http2::SendRequest<tonic::body::Body>, hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(cfg.keepalive_interval)
        .keep_alive_timeout(cfg.keepalive_timeout)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(cfg.stream_window)
        .initial_connection_window_size(cfg.connection_window)
        .max_frame_size(cfg.max_frame_size)
        .handshake(TokioIo::new(io))
        .await?;
    // Ends when the stream dies (WatchedIo fires the link signal) or is killed.
    tasks.spawn(async move {
        if let Err(error) = conn.await {
            debug!(%error, "reverse tunnel connection ended");
        }
    });
    Ok(send)
}

/// Watches one tunnel until it dies, measuring ping round trips meanwhile.
struct Monitor {
    registry: Registry,
    id: HostId,
    signal: LinkSignal,
    lost: CancellationToken,
    channel: TunnelChannel,
    cfg: ListenerConfig,
    shutdown: CancellationToken,
}

impl Monitor {
    async fn run(self) {
        let reason = tokio::select! {
            _ = self.signal.fired() => self.signal.reason(),
            // Replaced or disconnected: already reported.
            _ = self.lost.cancelled() => return,
            _ = self.shutdown.cancelled() => "listener shutting down".to_owned(),
            r = self.ping_until_failure() => r,
        };
        self.registry.mark_lost(self.id, &reason);
    }

    async fn ping_until_failure(&self) -> String {
        let mut client = TunnelClient::new(self.channel.clone());
        // Same bound as the HTTP/2 keep-alive: a slower answer means a dead tunnel.
        let deadline = self.cfg.keepalive_interval + self.cfg.keepalive_timeout;
        let mut ticker = tokio::time::interval(self.cfg.ping_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let start = Instant::now();
            let mut req = tonic::Request::new(PingRequest {});
            req.set_timeout(deadline);
            match timeout(deadline, client.ping(req)).await {
                Ok(Ok(_)) => {
                    let rtt = start.elapsed();
                    debug!(?rtt, "tunnel ping");
                    self.registry.set_rtt(self.id, rtt);
                }
                // The host answers, it just does not serve the Tunnel service.
                Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => {}
                Ok(Err(s)) => return format!("tunnel ping failed: {}", s.message()),
                Err(_) => return format!("tunnel ping got no answer within {deadline:?}"),
            }
        }
    }
}

/// Most TLS and revdial handshakes in progress at once; at the cap the oldest is closed.
const MAX_PENDING_HANDSHAKES: usize = 256;

/// Accepts TCP connections on `tcp`, does TLS with `tls` (which must offer
/// [`buildfarm_tls::ALPN_REVDIAL`]) and hands revdial connections to `listener`, until
/// `shutdown`. Connections go through the bounded acceptor of [`crate::accept`]
/// (default caps; handshakes bounded by the listener's handshake timeout); a tunnel,
/// once let in, keeps its slot and is never evicted. Tunnels outlive this loop; stop
/// them with [`Listener::shutdown`].
pub async fn serve(
    tcp: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    listener: Listener,
    shutdown: CancellationToken,
) {
    let tls_acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let acceptor = Acceptor::new(ConnLimits {
        handshake_timeout: listener.config().handshake_timeout,
        max_handshakes: MAX_PENDING_HANDSHAKES,
        ..ConnLimits::default()
    });
    let mut pending = JoinSet::new();
    if let Ok(addr) = tcp.local_addr() {
        info!(%addr, "revdial listener accepting");
    }
    loop {
        // Reap finished handshakes so the set does not grow.
        while pending.try_join_next().is_some() {}
        let Some((stream, peer, conn)) = acceptor.accept(&tcp, &shutdown).await else {
            break;
        };
        let tls_acceptor = tls_acceptor.clone();
        let listener = listener.clone();
        let tls_timeout = listener.config().handshake_timeout;
        pending.spawn(
            async move {
                let h = conn.handle();
                let tls = tokio::select! {
                    r = timeout(tls_timeout, tls_acceptor.accept(stream)) => match r {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(error)) => {
                            warn!(%peer, %error, "tls handshake with reverse dialer failed");
                            return;
                        }
                        Err(_) => {
                            warn!(%peer, "tls handshake with reverse dialer timed out");
                            return;
                        }
                    },
                    _ = h.killed() => return,
                };
                let alpn = tls.get_ref().1.alpn_protocol();
                if alpn != Some(buildfarm_tls::ALPN_REVDIAL) {
                    let alpn = alpn.map(String::from_utf8_lossy);
                    warn!(%peer, ?alpn, "connection did not negotiate the revdial alpn");
                    return;
                }
                // Refusals are logged and counted by the listener.
                let accepted = tokio::select! {
                    r = listener.accept(Tracked::new(tls, conn), peer) => r,
                    _ = h.killed() => return,
                };
                match accepted {
                    Ok(_) => h.pin(),
                    Err(DialInError::Channel { peer, source }) => {
                        warn!(%peer, error = %source, "reverse tunnel setup failed");
                    }
                    Err(_) => {}
                }
            }
            .instrument(info_span!("revdial_accept", %peer)),
        );
    }
    pending.shutdown().await;
}
