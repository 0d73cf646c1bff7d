//! The host's end of a reverse tunnel: dial the coordinator over TLS, prove who we
//! are, then serve gRPC (the caller's routes plus the `Tunnel` Ping service) on that
//! same connection until it drops, and dial again with jittered backoff.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use buildfarm_proto::revdial::{Challenge, Hello, HostTokenProof, Verdict, hello};
use futures::StreamExt;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::Server;
use tracing::{error, info, warn};

use crate::backoff::Backoff;
use crate::data::DataHandler;
use crate::handshake::{
    DATA_TOKEN_LEN, NONCE_LEN, PROOF_LEN, PROTOCOL_VERSION, compute_proof, validate_challenge,
    validate_hello,
};
use crate::link::{LinkSignal, WatchedIo};
use crate::tunnel::TunnelService;
use crate::wire::{WireError, read_frame, write_frame};
use buildfarm_tls::{ALPN_REVDIAL, TlsError};

/// How a host proves itself.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// The hex builder key of the host type (`buildlet keygen` prints it).
    BuilderKey(String),
    /// A per-host token: its id and secret.
    HostToken { id: String, secret: String },
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print secrets.
        match self {
            Credential::BuilderKey(_) => f.write_str("BuilderKey(..)"),
            Credential::HostToken { id, .. } => f
                .debug_struct("HostToken")
                .field("id", id)
                .finish_non_exhaustive(),
        }
    }
}

/// What a dialer needs. Build it with [`DialerConfig::new`] and adjust fields.
#[derive(Debug, Clone)]
pub struct DialerConfig {
    /// `host:port`, `host` (port 443) or `https://host:port`.
    pub coordinator: String,
    /// CA certificates (PEM) the coordinator's certificate must chain to.
    pub ca_pem: String,
    /// Name to verify the coordinator's certificate against; default: its host.
    pub server_name: Option<String>,
    pub host_type: String,
    pub hostname: String,
    /// Buildlet version announced to the coordinator.
    pub version: String,
    pub credential: Credential,
    /// Bound on TCP connect plus TLS handshake. Default 10 s.
    pub connect_timeout: Duration,
    /// Bound on the revdial handshake. Default 10 s.
    pub handshake_timeout: Duration,
    /// The dialer sends no PINGs of its own; it closes the tunnel (and dials again)
    /// when nothing arrives from the coordinator, which pings quiet tunnels, for
    /// `keepalive_interval + keepalive_timeout`. Their sum must exceed the
    /// coordinator's keep-alive interval (5 s by default). Defaults 5 s and 5 s.
    pub keepalive_interval: Duration,
    /// See `keepalive_interval`. Default 5 s.
    pub keepalive_timeout: Duration,
    /// HTTP/2 flow-control windows. Defaults 4 MiB per stream, 16 MiB per connection.
    pub stream_window: u32,
    pub connection_window: u32,
    /// Largest HTTP/2 frame this end accepts (PutTar chunks from the coordinator travel
    /// in frames up to this size). Default [`crate::h2::MAX_FRAME_SIZE`] (256 KiB).
    pub max_frame_size: u32,
    pub backoff: Backoff,
    /// On shutdown, in-flight calls get this long to finish before the tunnel is cut.
    /// Default 5 s.
    pub shutdown_grace: Duration,
}

impl DialerConfig {
    pub fn new(
        coordinator: impl Into<String>,
        ca_pem: impl Into<String>,
        host_type: impl Into<String>,
        hostname: impl Into<String>,
        version: impl Into<String>,
        credential: Credential,
    ) -> Self {
        DialerConfig {
            coordinator: coordinator.into(),
            ca_pem: ca_pem.into(),
            server_name: None,
            host_type: host_type.into(),
            hostname: hostname.into(),
            version: version.into(),
            credential,
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(5),
            stream_window: crate::h2::STREAM_WINDOW,
            connection_window: crate::h2::CONNECTION_WINDOW,
            max_frame_size: crate::h2::MAX_FRAME_SIZE,
            backoff: Backoff::default(),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// A configuration the dialer cannot start with.
#[derive(Debug, thiserror::Error)]
pub enum DialerError {
    #[error("invalid coordinator address {addr:?}: {reason}")]
    Address { addr: String, reason: String },
    #[error("builder key for host type {host_type:?} is not {PROOF_LEN} hex-encoded bytes")]
    BadBuilderKey { host_type: String },
    #[error("invalid dialer identity: {0}")]
    Identity(String),
    #[error("tls setup: {0}")]
    Tls(#[from] TlsError),
}

/// Why one dial attempt ended.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("tls handshake with {addr}: {source}")]
    Tls {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("coordinator did not negotiate the revdial protocol (alpn {0:?})")]
    Alpn(Option<String>),
    #[error("handshake: {0}")]
    Wire(#[from] WireError),
    #[error("handshake: {0}")]
    Protocol(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error("serving the tunnel: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Everything derived from the config once, before the first dial.
struct Prepared {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    key: Vec<u8>,
    token_id: Option<String>,
}

impl Prepared {
    fn new(cfg: &DialerConfig) -> Result<Self, DialerError> {
        let (host, port) = parse_coordinator(&cfg.coordinator)?;
        let sni = cfg.server_name.clone().unwrap_or_else(|| host.clone());
        let server_name = buildfarm_tls::server_name(&sni)?;
        let tls = buildfarm_tls::client_config(&cfg.ca_pem, None, &[ALPN_REVDIAL])?;
        let (key, token_id) = match &cfg.credential {
            Credential::BuilderKey(hexkey) => {
                let key = hex::decode(hexkey.trim())
                    .ok()
                    .filter(|k| k.len() == PROOF_LEN)
                    .ok_or_else(|| DialerError::BadBuilderKey {
                        host_type: cfg.host_type.clone(),
                    })?;
                (key, None)
            }
            Credential::HostToken { id, secret } => (secret.as_bytes().to_vec(), Some(id.clone())),
        };
        let p = Prepared {
            host,
            port,
            server_name,
            connector: TlsConnector::from(tls),
            key,
            token_id,
        };
        // The listener would refuse what fails here; better to say so at start.
        validate_hello(&p.hello(cfg, &[0; NONCE_LEN], None))
            .map_err(|r| DialerError::Identity(r.reason))?;
        Ok(p)
    }

    fn hello(
        &self,
        cfg: &DialerConfig,
        nonce: &[u8; NONCE_LEN],
        data_token: Option<&[u8; DATA_TOKEN_LEN]>,
    ) -> Hello {
        let proof = compute_proof(&self.key, nonce, &cfg.host_type, &cfg.hostname).to_vec();
        let credential = match &self.token_id {
            None => hello::Credential::BuilderKeyProof(proof),
            Some(id) => hello::Credential::HostTokenProof(HostTokenProof {
                token_id: id.clone(),
                proof,
            }),
        };
        Hello {
            protocol_version: PROTOCOL_VERSION,
            host_type: cfg.host_type.clone(),
            hostname: cfg.hostname.clone(),
            buildlet_version: cfg.version.clone(),
            credential: Some(credential),
            data_token: data_token.map(|t| t.to_vec()).unwrap_or_default(),
        }
    }
}

/// The dialer's means to open data connections: the same address, TLS and
/// credentials as its tunnel, and the handler each connection is given to.
pub(crate) struct DialBack {
    cfg: DialerConfig,
    prepared: Arc<Prepared>,
    handler: DataHandler,
}

impl DialBack {
    /// Dials a data connection presenting `token` and, once it is let in, hands it to
    /// the handler on a task of its own.
    pub(crate) async fn open(&self, token: [u8; DATA_TOKEN_LEN]) -> Result<(), tonic::Status> {
        let tls = connect_and_handshake(&self.cfg, &self.prepared, Some(&token))
            .await
            .map_err(|e| tonic::Status::unavailable(format!("data connection: {e}")))?;
        tokio::spawn((self.handler)(Box::new(tls)));
        Ok(())
    }
}

/// Splits `host:port`, `[v6]:port`, `host` or `https://host:port/` into host and port.
pub fn parse_coordinator(addr: &str) -> Result<(String, u16), DialerError> {
    let bad = |reason: &str| DialerError::Address {
        addr: addr.to_owned(),
        reason: reason.to_owned(),
    };
    let rest = match addr.split_once("://") {
        Some(("https", rest)) => rest,
        Some(_) => return Err(bad("only https:// or a bare host:port is supported")),
        None => addr,
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') {
        return Err(bad("a path is not allowed"));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
        match after {
            "" => (host, None),
            p => (
                host,
                Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?),
            ),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            Some(_) => return Err(bad("IPv6 addresses need brackets")),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    let port = match port {
        None => 443,
        Some(p) => p
            .parse()
            .map_err(|_| bad("port is not a number in 0..65535"))?,
    };
    Ok((host.to_owned(), port))
}

/// Dials the coordinator and serves `routes` (plus the `Tunnel` service) over each
/// tunnel, redialling with backoff after refusals and lost connections, until
/// `shutdown`. Returns an error only for a configuration it cannot start with.
/// Dropping the future closes the tunnel.
pub async fn run_dialer(
    cfg: DialerConfig,
    routes: Routes,
    shutdown: CancellationToken,
) -> Result<(), DialerError> {
    run_dialer_with_data(cfg, routes, None, shutdown).await
}

/// [`run_dialer`], and data connections: when the listener asks for one, the dialer
/// dials it back and gives it to `data` (see [`crate::DataStream`]). Without `data` the
/// listener is told this host takes none, and bulk transfers use the tunnel.
pub async fn run_dialer_with_data(
    cfg: DialerConfig,
    routes: Routes,
    data: Option<DataHandler>,
    shutdown: CancellationToken,
) -> Result<(), DialerError> {
    let prepared = Arc::new(Prepared::new(&cfg)?);
    let tunnel = match data {
        None => TunnelService::server(),
        Some(handler) => TunnelService::with_dial_back(DialBack {
            cfg: cfg.clone(),
            prepared: prepared.clone(),
            handler,
        }),
    };
    let routes = routes.add_service(tunnel);
    let mut failures: u32 = 0;
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        match dial_once(&cfg, &prepared, routes.clone(), &shutdown).await {
            Ok(lived) => {
                info!(?lived, "reverse tunnel closed");
                if lived >= cfg.backoff.reset_after {
                    failures = 0;
                }
            }
            Err(AttemptError::Refused(reason)) => {
                error!(reason, host_type = %cfg.host_type, "coordinator refused dial-in");
            }
            Err(e) => warn!(error = %e, coordinator = %cfg.coordinator, "reverse dial-in failed"),
        }
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let delay = cfg.backoff.delay(failures, rand::random::<f64>());
        failures = failures.saturating_add(1);
        info!(?delay, "redialling coordinator after backoff");
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// One dial: connect, handshake, serve until the tunnel ends. Returns how long the
/// tunnel lived.
async fn dial_once(
    cfg: &DialerConfig,
    p: &Prepared,
    routes: Routes,
    shutdown: &CancellationToken,
) -> Result<Duration, AttemptError> {
    let tls = tokio::select! {
        _ = shutdown.cancelled() => return Ok(Duration::ZERO),
        r = connect_and_handshake(cfg, p, None) => r?,
    };
    info!(coordinator = %cfg.coordinator, host_type = %cfg.host_type, hostname = %cfg.hostname, "reverse tunnel established");
    let started = Instant::now();
    serve_tunnel(cfg, tls, routes, shutdown).await?;
    Ok(started.elapsed())
}

/// Connects, does TLS and the revdial handshake: for a tunnel, or with `data_token` for
/// a data connection.
async fn connect_and_handshake(
    cfg: &DialerConfig,
    p: &Prepared,
    data_token: Option<&[u8; DATA_TOKEN_LEN]>,
) -> Result<TlsStream<TcpStream>, AttemptError> {
    let addr = format!("{}:{}", p.host, p.port);
    let connect = async {
        let tcp = TcpStream::connect((p.host.as_str(), p.port))
            .await
            .map_err(|source| AttemptError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        p.connector
            .connect(p.server_name.clone(), tcp)
            .await
            .map_err(|source| AttemptError::Tls {
                addr: addr.clone(),
                source,
            })
    };
    let mut tls = timeout(cfg.connect_timeout, connect)
        .await
        .map_err(|_| AttemptError::Timeout("connecting"))??;
    let alpn = tls.get_ref().1.alpn_protocol();
    if alpn != Some(ALPN_REVDIAL) {
        return Err(AttemptError::Alpn(
            alpn.map(|a| String::from_utf8_lossy(a).into_owned()),
        ));
    }
    timeout(
        cfg.handshake_timeout,
        handshake(cfg, p, &mut tls, data_token),
    )
    .await
    .map_err(|_| AttemptError::Timeout("handshake"))??;
    Ok(tls)
}

async fn handshake(
    cfg: &DialerConfig,
    p: &Prepared,
    tls: &mut TlsStream<TcpStream>,
    data_token: Option<&[u8; DATA_TOKEN_LEN]>,
) -> Result<(), AttemptError> {
    let ch: Challenge = read_frame(tls, "challenge").await?;
    let nonce = validate_challenge(&ch).map_err(|r| AttemptError::Protocol(r.reason))?;
    write_frame(tls, "hello", &p.hello(cfg, &nonce, data_token)).await?;
    let v: Verdict = read_frame(tls, "verdict").await?;
    if !v.accepted {
        return Err(AttemptError::Refused(v.reason));
    }
    Ok(())
}

/// Serves gRPC on the tunnel until it dies or `shutdown` (then drains for
/// `shutdown_grace` and cuts it).
async fn serve_tunnel(
    cfg: &DialerConfig,
    tls: TlsStream<TcpStream>,
    routes: Routes,
    shutdown: &CancellationToken,
) -> Result<(), AttemptError> {
    let signal = LinkSignal::new();
    let kill = CancellationToken::new();
    // tonic serves the connection on a task of its own; cutting the stream when this
    // future is dropped keeps that task from outliving us.
    let _cut_on_drop = kill.clone().drop_guard();
    let io = WatchedIo::new(tls, signal.clone(), kill.clone());
    let incoming = futures::stream::once(std::future::ready(Ok::<_, std::io::Error>(io)))
        // Never end: tonic stops serving (without waiting) when the stream ends.
        .chain(futures::stream::pending());
    let stop = {
        let signal = signal.clone();
        let shutdown = shutdown.clone();
        async move {
            tokio::select! {
                _ = signal.fired() => {}
                _ = shutdown.cancelled() => {}
            }
        }
    };
    // No HTTP/2 PINGs of our own: the coordinator pings every tunnel that is quiet, so
    // frames arrive at least every keep-alive interval, and `quiet_watch` notices when
    // they stop. Each idle tunnel then costs the coordinator one PING exchange per
    // interval instead of two.
    let server = Server::builder()
        .http2_keepalive_interval(None)
        .initial_stream_window_size(cfg.stream_window)
        .initial_connection_window_size(cfg.connection_window)
        .max_frame_size(Some(cfg.max_frame_size))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, stop);
    tokio::pin!(server);
    let cut_after_grace = async {
        shutdown.cancelled().await;
        tokio::time::sleep(cfg.shutdown_grace).await;
    };
    let result = tokio::select! {
        r = &mut server => r,
        quiet = quiet_watch(&signal, cfg.keepalive_interval + cfg.keepalive_timeout) => {
            signal.fire(|| format!("nothing heard from the coordinator for {quiet:?}"));
            kill.cancel();
            server.await
        }
        _ = cut_after_grace => {
            warn!(grace = ?cfg.shutdown_grace, "in-flight calls did not finish in time; closing the tunnel");
            kill.cancel();
            server.await
        }
    };
    if !shutdown.is_cancelled() {
        info!(reason = %signal.reason(), "reverse tunnel lost");
    }
    result.map_err(AttemptError::from)
}

/// Returns once a whole `window` passes without a read that brought data; returns the
/// window. A live coordinator sends at least a PING per keep-alive interval, so the
/// window (the dialer's keep-alive interval plus timeout) must exceed the
/// coordinator's keep-alive interval; the defaults are 10 s against 5 s. A dead
/// coordinator is noticed within two windows.
async fn quiet_watch(signal: &LinkSignal, window: Duration) -> Duration {
    let mut seen = signal.reads();
    loop {
        tokio::time::sleep(window).await;
        let now = signal.reads();
        if now == seen {
            return window;
        }
        seen = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_addresses() {
        let ok = |s: &str| parse_coordinator(s).unwrap();
        assert_eq!(ok("farm.example:8443"), ("farm.example".into(), 8443));
        assert_eq!(
            ok("https://farm.example:8443/"),
            ("farm.example".into(), 8443)
        );
        assert_eq!(ok("farm.example"), ("farm.example".into(), 443));
        assert_eq!(ok("127.0.0.1:1"), ("127.0.0.1".into(), 1));
        assert_eq!(ok("[::1]:9"), ("::1".into(), 9));
        assert_eq!(ok("[::1]"), ("::1".into(), 443));
        for bad in [
            "http://x:1",
            "x:notaport",
            "x:70000",
            ":1",
            "::1:9",
            "https://x:1/path",
            "[::1",
            "[::1]x",
        ] {
            assert!(parse_coordinator(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_config_is_refused_up_front() {
        buildfarm_tls::install_crypto_provider();
        let ca = buildfarm_tls::CertificateAuthority::generate("ca").unwrap();
        let good = DialerConfig::new(
            "localhost:1",
            ca.cert_pem(),
            "linux-amd64",
            "h1",
            "1",
            Credential::BuilderKey(crate::builder_key(b"m", "linux-amd64")),
        );
        assert!(Prepared::new(&good).is_ok());
        let mut c = good.clone();
        c.credential = Credential::BuilderKey("abc".into());
        assert!(matches!(
            Prepared::new(&c),
            Err(DialerError::BadBuilderKey { .. })
        ));
        let mut c = good.clone();
        c.host_type = "bad type".into();
        assert!(matches!(Prepared::new(&c), Err(DialerError::Identity(_))));
        let mut c = good.clone();
        c.ca_pem = "nope".into();
        assert!(matches!(Prepared::new(&c), Err(DialerError::Tls(_))));
        assert!(
            !format!("{:?}", good.credential).contains(&crate::builder_key(b"m", "linux-amd64"))
        );
    }
}
