//! The typed async client of the buildlet service, used by the coordinator and
//! `gomote`. Callers see our own types ([`ExecSpec`], [`ExitStatus`], [`ListEntry`],
//! [`BuildletStatus`]) and one error type, [`ClientError`], never prost or tonic types.
//!
//! Transfers (`put_tar`, `get_tar`) on a client made with
//! [`BuildletClient::over_tunnel`] go over a data connection the buildlet dials back
//! ([`crate::bulk`]), at raw TLS speed; a buildlet that takes none, or one that cannot
//! dial back, is served through the tunnel as before.
//!
//! Deadlines: unary calls carry `call_timeout`; `exec` carries its own timeout plus a
//! margin when it has one; transfers and shells carry none (their length depends on
//! the data or the user); cancel them by dropping the future or stream.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use buildfarm_proto::buildlet as pb;
use buildfarm_tls::{ALPN_BULK, ALPN_H2, Identity};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::io::ReaderStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub use crate::exec::EnvMode;
pub use crate::fsops::{Entry as ListEntry, ListOptions};

/// Extra time an exec call's deadline allows beyond the command's own timeout, so the
/// buildlet can report the timeout itself.
const EXEC_DEADLINE_SLACK: Duration = Duration::from_secs(30);
/// Size of one PutTar data message.
const PUT_TAR_CHUNK: usize = 64 * 1024;
/// How long a buildlet gets to dial a data connection back.
const DATA_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a data connection for one bulk transfer.
pub type DataOpener =
    Arc<dyn Fn() -> BoxFuture<'static, Result<revdial::DataStream, tonic::Status>> + Send + Sync>;

/// How a client reaches a server for bulk transfers besides gRPC: a buildlet (data
/// connections, or its port's bulk ALPN) or the coordinator's port (gomote transfers).
#[derive(Clone)]
pub struct BulkPath {
    open: DataOpener,
    /// Sent in each request (a bearer key or token, where the server asks for one).
    authorization: String,
    /// Set once the server said it takes no bulk connections: not asked again.
    refused: Arc<AtomicBool>,
}

impl BulkPath {
    pub fn new(open: DataOpener, authorization: &str) -> Self {
        BulkPath {
            open,
            authorization: authorization.to_owned(),
            refused: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A connection for one transfer and whom its request is for (this path's
    /// credential, `instance` on the coordinator), or `None` to use gRPC: the server
    /// takes none, or opening failed (logged; the gRPC call then says whether the
    /// server is really gone).
    pub async fn connection(
        &self,
        op: &str,
        instance: &str,
    ) -> Option<(revdial::DataStream, crate::bulk::Addressee)> {
        if self.refused.load(Ordering::Relaxed) {
            return None;
        }
        match (self.open)().await {
            Ok(io) => {
                let to = crate::bulk::Addressee {
                    authorization: self.authorization.clone(),
                    instance: instance.to_owned(),
                };
                Some((io, to))
            }
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                tracing::debug!(op, error = %s.message(), "no bulk connections here; using gRPC");
                self.refused.store(true, Ordering::Relaxed);
                None
            }
            Err(s) => {
                tracing::warn!(op, error = %s.message(), "no bulk connection; transferring over gRPC");
                None
            }
        }
    }
}

/// A download's chunks, as they come; a failure part way is the last item.
pub type TarChunks = Pin<Box<dyn Stream<Item = Result<Bytes, ClientError>> + Send>>;

/// What kind of failure a [`ClientError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    /// The buildlet could not be reached or the connection was lost.
    Unavailable,
    DeadlineExceeded,
    ResourceExhausted,
    FailedPrecondition,
    Cancelled,
    Internal,
    /// A failure on this side (reading the tarball to send, writing one received).
    Local,
    Other,
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ErrorCode::InvalidArgument => "invalid argument",
            ErrorCode::NotFound => "not found",
            ErrorCode::PermissionDenied => "permission denied",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::DeadlineExceeded => "deadline exceeded",
            ErrorCode::ResourceExhausted => "resource exhausted",
            ErrorCode::FailedPrecondition => "failed precondition",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Internal => "internal",
            ErrorCode::Local => "local i/o",
            ErrorCode::Other => "error",
        })
    }
}

/// A failed client operation, e.g. `exec "go": unavailable: connection reset`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{op}: {code}: {message}")]
pub struct ClientError {
    op: String,
    code: ErrorCode,
    message: String,
}

impl ClientError {
    pub fn new(op: impl Into<String>, code: ErrorCode, message: impl Into<String>) -> Self {
        ClientError {
            op: op.into(),
            code,
            message: message.into(),
        }
    }

    pub fn op(&self) -> &str {
        &self.op
    }

    pub fn code(&self) -> ErrorCode {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// True when the buildlet is unreachable or was lost: the work should be retried
    /// on another buildlet.
    pub fn is_unavailable(&self) -> bool {
        self.code == ErrorCode::Unavailable
    }

    fn from_status(op: impl Into<String>, status: tonic::Status) -> Self {
        use tonic::Code;
        // Statuses the server sent have no source; ones tonic made from a broken
        // connection do, and their chain says what broke.
        let from_transport = std::error::Error::source(&status).is_some();
        let code = match status.code() {
            Code::InvalidArgument | Code::OutOfRange => ErrorCode::InvalidArgument,
            Code::NotFound => ErrorCode::NotFound,
            Code::PermissionDenied => ErrorCode::PermissionDenied,
            Code::Unauthenticated => ErrorCode::Unauthenticated,
            Code::Unavailable => ErrorCode::Unavailable,
            Code::DeadlineExceeded => ErrorCode::DeadlineExceeded,
            Code::ResourceExhausted => ErrorCode::ResourceExhausted,
            Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => {
                ErrorCode::FailedPrecondition
            }
            Code::Cancelled if from_transport => ErrorCode::Unavailable,
            Code::Cancelled => ErrorCode::Cancelled,
            Code::Unknown if from_transport => ErrorCode::Unavailable,
            Code::Internal | Code::DataLoss => ErrorCode::Internal,
            Code::Ok | Code::Unknown | Code::Unimplemented => ErrorCode::Other,
        };
        let mut message = status.message().to_owned();
        let mut source = std::error::Error::source(&status);
        while let Some(s) = source {
            let text = s.to_string();
            if !message.contains(&text) {
                message = format!("{message}: {text}");
            }
            source = s.source();
        }
        ClientError::new(op, code, message)
    }
}

/// How to reach a listen-mode buildlet.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// `host:port`.
    pub addr: String,
    /// Name to verify the server certificate against; default the host of `addr`.
    pub server_name: Option<String>,
    /// CA certificates (PEM) trusted for the server certificate.
    pub ca_pem: String,
    /// Client certificate to present (mTLS).
    pub client_identity: Option<Identity>,
    /// Key sent as `authorization: Bearer <key>`.
    pub bearer_key: Option<String>,
    /// Default 10 s.
    pub connect_timeout: Duration,
    /// Deadline of unary calls; default 60 s.
    pub call_timeout: Duration,
}

impl ConnectOptions {
    pub fn new(addr: impl Into<String>, ca_pem: impl Into<String>) -> Self {
        ConnectOptions {
            addr: addr.into(),
            server_name: None,
            ca_pem: ca_pem.into(),
            client_identity: None,
            bearer_key: None,
            connect_timeout: Duration::from_secs(10),
            call_timeout: Duration::from_secs(60),
        }
    }
}

/// Adds the bearer key, if any, to every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Any HTTP/2 transport a client can run over: a TLS connection (`connect`) or a reverse
/// tunnel (`from_service` with a `revdial::TunnelChannel`). Boxed so the client has one
/// type whatever carries it.
///
/// The error type is `Status` (not a boxed error) on purpose: transport failures become
/// `Unavailable` here, and a concrete type keeps the generated client's futures `Send`
/// without higher-ranked lifetime trouble.
pub type Transport = tower::util::BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    tonic::Status,
>;

/// The generated client over [`Transport`], for callers that forward raw messages (the
/// coordinator's gomote proxy).
pub type RawClient = pb::buildlet_client::BuildletClient<InterceptedService<Transport, Bearer>>;

type Grpc = RawClient;

/// A command to run.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    pub cmd: String,
    pub args: Vec<String>,
    /// Relative to the workdir; empty means the workdir.
    pub dir: String,
    pub env: Vec<(String, String)>,
    pub env_mode: EnvMode,
    /// PATH elements; may use `$PATH`, `$WORKDIR`, `$EMPTY`. Empty leaves PATH alone.
    pub path: Vec<String>,
    pub timeout: Option<Duration>,
}

impl ExecSpec {
    pub fn new(cmd: impl Into<String>) -> Self {
        ExecSpec {
            cmd: cmd.into(),
            args: Vec::new(),
            dir: String::new(),
            env: Vec::new(),
            env_mode: EnvMode::Add,
            path: Vec::new(),
            timeout: None,
        }
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn dir(mut self, dir: impl Into<String>) -> Self {
        self.dir = dir.into();
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn env_mode(mut self, mode: EnvMode) -> Self {
        self.env_mode = mode;
        self
    }

    pub fn path<I: IntoIterator<Item = S>, S: Into<String>>(mut self, elems: I) -> Self {
        self.path = elems.into_iter().map(Into::into).collect();
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// How a command (or shell) ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub duration: Duration,
    pub timed_out: bool,
    /// Set when the command could not be started (e.g. not found).
    pub error: Option<String>,
}

impl ExitStatus {
    pub fn success(&self) -> bool {
        self.code == Some(0) && self.error.is_none()
    }
}

impl From<pb::ExitStatus> for ExitStatus {
    fn from(e: pb::ExitStatus) -> Self {
        ExitStatus {
            code: e.code,
            signal: e.signal,
            duration: Duration::from_millis(e.duration_ms),
            timed_out: e.timed_out,
            error: (!e.error.is_empty()).then_some(e.error),
        }
    }
}

/// One event of a running command; the last one is always `Exit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Output { stream: OutputStream, data: Bytes },
    Exit(ExitStatus),
}

/// The events of one exec call. Dropping it cancels the call, which kills the
/// command's process group on the buildlet.
pub type ExecStream = Pin<Box<dyn Stream<Item = Result<ExecEvent, ClientError>> + Send>>;

/// What PutTar wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PutTarStats {
    pub entries: u64,
    pub bytes: u64,
}

/// What Status reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BuildletStatus {
    pub version: String,
    pub host_type: String,
    pub workdir: String,
    pub load_avg_1m: f64,
    pub running_commands: u32,
    pub uptime: Duration,
    pub hostname: String,
    pub goos: String,
    pub goarch: String,
    /// What contains commands' processes: "cgroup v2 <dir>", "cgroup v1 <dir>" or
    /// "subreaper".
    pub containment: String,
    /// The buildlet's container cgroup, empty without one (kill it to kill leftovers).
    pub cgroup: String,
}

/// Called with the total bytes sent or received so far.
pub type Progress = Box<dyn FnMut(u64) + Send>;

/// The start of a shell session.
#[derive(Debug, Clone, Default)]
pub struct ShellStart {
    /// Empty means the buildlet user's shell.
    pub argv: Vec<String>,
    pub rows: u32,
    pub cols: u32,
    pub term: String,
}

/// Output of a shell session; the last one is always `Exit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShellEvent {
    Data(Bytes),
    Exit(ExitStatus),
}

/// The input side of a shell session. Dropping it closes the input; the session
/// goes on until the command exits or the [`ShellReader`] is dropped.
pub struct ShellWriter {
    tx: mpsc::Sender<pb::ShellInput>,
}

impl ShellWriter {
    pub async fn send_stdin(&self, data: impl Into<Vec<u8>>) -> Result<(), ClientError> {
        self.send(pb::shell_input::Msg::Stdin(data.into())).await
    }

    pub async fn resize(&self, rows: u32, cols: u32) -> Result<(), ClientError> {
        self.send(pb::shell_input::Msg::Resize(pb::ShellResize { rows, cols }))
            .await
    }

    async fn send(&self, msg: pb::shell_input::Msg) -> Result<(), ClientError> {
        self.tx
            .send(pb::ShellInput { msg: Some(msg) })
            .await
            .map_err(|_| ClientError::new("shell", ErrorCode::Unavailable, "session ended"))
    }
}

/// The output side of a shell session. Dropping it ends the session.
pub struct ShellReader {
    stream: tonic::Streaming<pb::ShellOutput>,
    done: bool,
}

impl ShellReader {
    /// The next event; `None` after `Exit`.
    pub async fn next(&mut self) -> Option<Result<ShellEvent, ClientError>> {
        if self.done {
            return None;
        }
        let res = match self.stream.message().await {
            Ok(Some(pb::ShellOutput {
                msg: Some(pb::shell_output::Msg::Data(d)),
            })) => Ok(ShellEvent::Data(Bytes::from(d))),
            Ok(Some(pb::ShellOutput {
                msg: Some(pb::shell_output::Msg::Exit(e)),
            })) => {
                self.done = true;
                Ok(ShellEvent::Exit(e.into()))
            }
            Ok(Some(pb::ShellOutput { msg: None })) => Err(ClientError::new(
                "shell",
                ErrorCode::Internal,
                "empty shell output message",
            )),
            Ok(None) => {
                self.done = true;
                Err(ClientError::new(
                    "shell",
                    ErrorCode::Unavailable,
                    "stream ended without an exit status",
                ))
            }
            Err(s) => {
                self.done = true;
                Err(ClientError::from_status("shell", s))
            }
        };
        Some(res)
    }
}

/// A connected buildlet. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct BuildletClient {
    grpc: Grpc,
    call_timeout: Option<Duration>,
    data: Option<BulkPath>,
}

impl std::fmt::Debug for BuildletClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildletClient").finish_non_exhaustive()
    }
}

/// Opens bulk connections to a listen-mode buildlet at `addr`: TLS (`tls` must offer
/// only ALPN `buildfarm-bulk/1`) to its port. A buildlet that does not speak it (an
/// older one) fails the handshake or picks no protocol: that is UNIMPLEMENTED, so a
/// client stops asking.
pub fn listen_data_opener(
    addr: String,
    server_name: rustls::pki_types::ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
) -> DataOpener {
    let connector = tokio_rustls::TlsConnector::from(tls);
    Arc::new(move || {
        let (addr, server_name, connector) = (addr.clone(), server_name.clone(), connector.clone());
        Box::pin(async move {
            let dial = async {
                let tcp = tokio::net::TcpStream::connect(&addr).await?;
                tcp.set_nodelay(true)?;
                connector.connect(server_name, tcp).await
            };
            let tls = match tokio::time::timeout(connect_timeout, dial).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) if refused_alpn(&e) => {
                    return Err(tonic::Status::unimplemented(format!(
                        "{addr} does not take bulk connections: {e}"
                    )));
                }
                Ok(Err(e)) => {
                    return Err(tonic::Status::unavailable(format!(
                        "bulk connection to {addr}: {e}"
                    )));
                }
                Err(_) => {
                    return Err(tonic::Status::unavailable(format!(
                        "bulk connection to {addr}: no answer within {connect_timeout:?}"
                    )));
                }
            };
            if tls.get_ref().1.alpn_protocol() != Some(ALPN_BULK) {
                return Err(tonic::Status::unimplemented(format!(
                    "{addr} does not take bulk connections"
                )));
            }
            Ok(Box::new(tls) as revdial::DataStream)
        })
    })
}

/// Whether a TLS handshake failed because the server offers none of our protocols.
fn refused_alpn(e: &io::Error) -> bool {
    matches!(
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::NoApplicationProtocol
        ))
    )
}

fn bulk_error(op: &str, e: crate::bulk::BulkError) -> ClientError {
    use crate::bulk::BulkError;
    match e {
        BulkError::Io(e) => {
            ClientError::new(op, ErrorCode::Unavailable, format!("data connection: {e}"))
        }
        BulkError::Input(e) => {
            ClientError::new(op, ErrorCode::Local, format!("reading input: {e}"))
        }
        BulkError::Output(e) => ClientError::new(op, ErrorCode::Local, format!("writing: {e}")),
        BulkError::Status(s) => ClientError::from_status(op, s),
    }
}

fn bearer(key: Option<&str>) -> Result<Bearer, ClientError> {
    match key {
        None => Ok(Bearer(None)),
        Some(k) => MetadataValue::try_from(format!("Bearer {}", k.trim()))
            .map(|v| Bearer(Some(v)))
            .map_err(|_| {
                ClientError::new(
                    "connect",
                    ErrorCode::InvalidArgument,
                    "bearer key is not valid metadata",
                )
            }),
    }
}

impl BuildletClient {
    /// Connects over TLS (ALPN h2) to a listen-mode buildlet.
    pub async fn connect(opts: ConnectOptions) -> Result<Self, ClientError> {
        let op = format!("connect {}", opts.addr);
        let bad = |e: String| ClientError::new(op.clone(), ErrorCode::InvalidArgument, e);
        let tls =
            buildfarm_tls::client_config(&opts.ca_pem, opts.client_identity.as_ref(), &[ALPN_H2])
                .map_err(|e| bad(e.to_string()))?;
        let host = match &opts.server_name {
            Some(n) => n.clone(),
            None => host_of(&opts.addr).to_owned(),
        };
        let server_name = buildfarm_tls::server_name(&host).map_err(|e| bad(e.to_string()))?;
        let channel = revdial::h2::connect_channel(
            &opts.addr,
            server_name.clone(),
            tls,
            opts.connect_timeout,
        )
        .await
        .map_err(|e| {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                message = format!("{message}: {s}");
                source = s.source();
            }
            ClientError::new(op.clone(), ErrorCode::Unavailable, message)
        })?;
        let mut client = Self::from_channel(channel, opts.bearer_key.as_deref())?;
        client.call_timeout = Some(opts.call_timeout);
        // Transfers on connections of their own (ALPN "buildfarm-bulk/1"), with the same
        // certificate and key as the gRPC calls.
        let bulk_tls =
            buildfarm_tls::client_config(&opts.ca_pem, opts.client_identity.as_ref(), &[ALPN_BULK])
                .map_err(|e| bad(e.to_string()))?;
        let open = listen_data_opener(
            opts.addr.clone(),
            server_name,
            bulk_tls,
            opts.connect_timeout,
        );
        let authorization = match opts.bearer_key.as_deref() {
            Some(key) => format!("Bearer {}", key.trim()),
            None => String::new(),
        };
        Ok(client.with_data(open, &authorization))
    }

    /// Wraps an existing channel (e.g. one over a reverse tunnel). Unary calls then
    /// carry no deadline unless set with [`BuildletClient::with_call_timeout`].
    pub fn from_channel(channel: Channel, bearer_key: Option<&str>) -> Result<Self, ClientError> {
        Self::from_service(channel, bearer_key)
    }

    /// Wraps any gRPC transport, e.g. a `revdial::TunnelChannel` over a reverse tunnel.
    pub fn from_service<S>(service: S, bearer_key: Option<&str>) -> Result<Self, ClientError>
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
            > + Clone
            + Send
            + Sync
            + 'static,
        S::Error: Into<tower::BoxError>,
        S::Future: Send + 'static,
    {
        use tower::ServiceExt;
        let transport = Transport::new(service.map_err(|e| {
            let e: tower::BoxError = e.into();
            match e.downcast::<tonic::Status>() {
                Ok(status) => *status,
                Err(e) => {
                    let mut message = e.to_string();
                    let mut source = e.source();
                    while let Some(s) = source {
                        message = format!("{message}: {s}");
                        source = s.source();
                    }
                    tonic::Status::unavailable(message)
                }
            }
        }));
        let grpc =
            pb::buildlet_client::BuildletClient::with_interceptor(transport, bearer(bearer_key)?)
                .max_decoding_message_size(buildfarm_proto::DEFAULT_MAX_MESSAGE_BYTES)
                .max_encoding_message_size(usize::MAX);
        Ok(BuildletClient {
            grpc,
            call_timeout: None,
            data: None,
        })
    }

    /// A client over a reverse tunnel whose transfers use data connections when the
    /// buildlet takes them.
    pub fn over_tunnel(channel: revdial::TunnelChannel) -> Result<Self, ClientError> {
        let opener = channel.clone();
        let open: DataOpener = Arc::new(move || {
            let channel = opener.clone();
            Box::pin(async move { channel.open_data(DATA_OPEN_TIMEOUT).await })
        });
        Ok(Self::from_service(channel, None)?.with_data_opener(open))
    }

    /// Moves transfers to data connections opened with `open` (falling back to gRPC
    /// when it fails).
    pub fn with_data_opener(self, open: DataOpener) -> Self {
        self.with_data(open, "")
    }

    /// [`BuildletClient::with_data_opener`], sending `authorization` in each request.
    fn with_data(mut self, open: DataOpener, authorization: &str) -> Self {
        self.data = Some(BulkPath::new(open, authorization));
        self
    }

    /// A data connection for one transfer, or `None` to use gRPC.
    async fn data_connection(
        &self,
        op: &str,
    ) -> Option<(revdial::DataStream, crate::bulk::Addressee)> {
        self.data.as_ref()?.connection(op, "").await
    }

    /// The generated client, for forwarding raw messages.
    pub fn raw(&self) -> RawClient {
        self.grpc.clone()
    }

    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = Some(timeout);
        self
    }

    fn unary<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(t) = self.call_timeout {
            req.set_timeout(t);
        }
        req
    }

    /// Uploads a tar.gz read from `reader` and extracts it into `dir`.
    pub async fn put_tar<R>(
        &self,
        dir: &str,
        reader: R,
        mut progress: Option<Progress>,
    ) -> Result<PutTarStats, ClientError>
    where
        R: AsyncRead + Send + 'static,
    {
        let op = format!("put_tar {dir:?}");
        if let Some((io, to)) = self.data_connection(&op).await {
            let mut sent = 0u64;
            let data = ReaderStream::with_capacity(Box::pin(reader), PUT_TAR_CHUNK).inspect(
                move |chunk| {
                    if let (Ok(c), Some(p)) = (chunk, progress.as_mut()) {
                        sent += c.len() as u64;
                        p(sent);
                    }
                },
            );
            let r = crate::bulk::put_tar(io, &to, dir, data)
                .await
                .map_err(|e| bulk_error(&op, e))?;
            return Ok(PutTarStats {
                entries: r.entries,
                bytes: r.bytes,
            });
        }
        let header = pb::PutTarRequest {
            msg: Some(pb::put_tar_request::Msg::Header(pb::PutTarHeader {
                dir: dir.to_owned(),
            })),
        };
        // The request body is a plain channel stream fed by `produce`, which runs
        // beside the call in this future (a borrowed async stream would make the
        // call's future lose `Send` to a higher-ranked lifetime error).
        let (tx, rx) = mpsc::channel::<pb::PutTarRequest>(4);
        let produce = async move {
            if tx.send(header).await.is_err() {
                return futures::future::pending::<io::Error>().await;
            }
            let mut chunks = ReaderStream::with_capacity(Box::pin(reader), PUT_TAR_CHUNK);
            let mut sent = 0u64;
            while let Some(chunk) = chunks.next().await {
                match chunk {
                    Ok(data) => {
                        sent += data.len() as u64;
                        if let Some(p) = progress.as_mut() {
                            p(sent);
                        }
                        let msg = pb::PutTarRequest {
                            msg: Some(pb::put_tar_request::Msg::Data(data)),
                        };
                        if tx.send(msg).await.is_err() {
                            break;
                        }
                    }
                    // Return without closing the stream cleanly: a clean end would
                    // submit a truncated tarball. Dropping the call resets it instead.
                    Err(e) => return e,
                }
            }
            drop(tx);
            futures::future::pending::<io::Error>().await
        };
        let mut grpc = self.grpc.clone();
        let call = grpc.put_tar(tonic::Request::new(ReceiverStream::new(rx)));
        tokio::select! {
            res = call => {
                let r = res.map_err(|s| ClientError::from_status(&op, s))?.into_inner();
                Ok(PutTarStats { entries: r.entries, bytes: r.bytes })
            }
            e = produce => {
                Err(ClientError::new(op, ErrorCode::Local, format!("reading input: {e}")))
            }
        }
    }

    /// Has the buildlet download a tar.gz from `url` (http or https) into `dir`.
    pub async fn put_tar_from_url(&self, url: &str, dir: &str) -> Result<PutTarStats, ClientError> {
        let op = format!("put_tar_from_url {url:?}");
        let req = tonic::Request::new(pb::PutTarFromUrlRequest {
            url: url.to_owned(),
            dir: dir.to_owned(),
        });
        let r = self
            .grpc
            .clone()
            .put_tar_from_url(req)
            .await
            .map_err(|s| ClientError::from_status(&op, s))?
            .into_inner();
        Ok(PutTarStats {
            entries: r.entries,
            bytes: r.bytes,
        })
    }

    /// Writes one file; `mode` 0 means 0644.
    pub async fn write_file(
        &self,
        path: &str,
        mode: u32,
        contents: impl Into<Vec<u8>>,
    ) -> Result<(), ClientError> {
        let req = self.unary(pb::WriteFileRequest {
            path: path.to_owned(),
            mode,
            contents: contents.into(),
        });
        self.grpc
            .clone()
            .write_file(req)
            .await
            .map_err(|s| ClientError::from_status(format!("write_file {path:?}"), s))?;
        Ok(())
    }

    /// Starts a command; its output and exit status arrive on the returned stream.
    pub async fn exec(&self, spec: ExecSpec) -> Result<ExecStream, ClientError> {
        let op = format!("exec {:?}", spec.cmd);
        let mut req = tonic::Request::new(pb::ExecRequest {
            cmd: spec.cmd,
            args: spec.args,
            dir: spec.dir,
            env: spec
                .env
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
            env_mode: match spec.env_mode {
                EnvMode::Add => pb::EnvMode::Add,
                EnvMode::Replace => pb::EnvMode::Replace,
            } as i32,
            path: spec.path,
            timeout_ms: spec
                .timeout
                .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0),
        });
        if let Some(t) = spec.timeout {
            req.set_timeout(t + EXEC_DEADLINE_SLACK);
        }
        let mut stream = self
            .grpc
            .clone()
            .exec(req)
            .await
            .map_err(|s| ClientError::from_status(&op, s))?
            .into_inner();
        Ok(Box::pin(async_stream::stream! {
            loop {
                match stream.message().await {
                    Ok(Some(pb::ExecEvent { event: Some(pb::exec_event::Event::Output(o)) })) => {
                        let stream = if o.stream == pb::OutputStream::Stderr as i32 {
                            OutputStream::Stderr
                        } else {
                            OutputStream::Stdout
                        };
                        yield Ok(ExecEvent::Output { stream, data: Bytes::from(o.data) });
                    }
                    Ok(Some(pb::ExecEvent { event: Some(pb::exec_event::Event::Exit(e)) })) => {
                        yield Ok(ExecEvent::Exit(e.into()));
                        return;
                    }
                    Ok(Some(pb::ExecEvent { event: None })) => {}
                    Ok(None) => {
                        yield Err(ClientError::new(
                            op.clone(),
                            ErrorCode::Unavailable,
                            "stream ended without an exit status",
                        ));
                        return;
                    }
                    Err(s) => {
                        yield Err(ClientError::from_status(op.clone(), s));
                        return;
                    }
                }
            }
        }))
    }

    /// Runs a command to its end, handing each output chunk to `on_output`.
    pub async fn exec_collect(
        &self,
        spec: ExecSpec,
        mut on_output: impl FnMut(OutputStream, &[u8]),
    ) -> Result<ExitStatus, ClientError> {
        let mut events = self.exec(spec).await?;
        while let Some(ev) = events.next().await {
            match ev? {
                ExecEvent::Output { stream, data } => on_output(stream, &data),
                ExecEvent::Exit(status) => return Ok(status),
            }
        }
        // The stream always ends with Exit or an error; this is unreachable in practice.
        Err(ClientError::new(
            "exec",
            ErrorCode::Unavailable,
            "stream ended without an exit status",
        ))
    }

    /// `dir` as tar.gz, in chunks as they come. A failure before the first chunk
    /// (no such directory) is the call's error; one after ends the chunks with it.
    pub async fn get_tar_stream(&self, dir: &str) -> Result<TarChunks, ClientError> {
        let op = format!("get_tar {dir:?}");
        if let Some((io, to)) = self.data_connection(&op).await {
            let chunks = crate::bulk::get_tar_stream(io, &to, dir)
                .await
                .map_err(|e| bulk_error(&op, e))?;
            return Ok(Box::pin(
                chunks.map(move |c| c.map_err(|e| bulk_error(&op, e))),
            ));
        }
        let stream = self
            .grpc
            .clone()
            .get_tar(tonic::Request::new(pb::GetTarRequest {
                dir: dir.to_owned(),
            }))
            .await
            .map_err(|s| ClientError::from_status(&op, s))?
            .into_inner();
        Ok(Box::pin(stream.map(move |c| {
            c.map(|c| c.data)
                .map_err(|s| ClientError::from_status(&op, s))
        })))
    }

    /// Downloads `dir` as tar.gz into `writer`; returns the bytes written.
    pub async fn get_tar<W>(
        &self,
        dir: &str,
        writer: &mut W,
        mut progress: Option<&mut (dyn FnMut(u64) + Send)>,
    ) -> Result<u64, ClientError>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        let local = |e: io::Error| {
            ClientError::new(
                format!("get_tar {dir:?}"),
                ErrorCode::Local,
                format!("writing: {e}"),
            )
        };
        let mut chunks = self.get_tar_stream(dir).await?;
        let mut total = 0u64;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            writer.write_all(&chunk).await.map_err(local)?;
            total += chunk.len() as u64;
            if let Some(p) = progress.as_mut() {
                p(total);
            }
        }
        writer.flush().await.map_err(local)?;
        Ok(total)
    }

    /// Removes paths (files or trees). A path naming the workdir itself ("", ".",
    /// "a/..") is refused with InvalidArgument; emptying the workdir is
    /// [`BuildletClient::remove_all`], so a stray or computed path never does it.
    pub async fn remove(&self, paths: &[&str]) -> Result<(), ClientError> {
        self.remove_paths(paths, false).await
    }

    /// Empties the workdir, keeping the directory itself.
    pub async fn remove_all(&self) -> Result<(), ClientError> {
        self.remove_paths(&["."], true).await
    }

    async fn remove_paths(&self, paths: &[&str], allow_root: bool) -> Result<(), ClientError> {
        let req = self.unary(pb::RemoveRequest {
            paths: paths.iter().map(|p| p.to_string()).collect(),
            allow_root,
        });
        self.grpc
            .clone()
            .remove(req)
            .await
            .map_err(|s| ClientError::from_status(format!("remove {paths:?}"), s))?;
        Ok(())
    }

    /// Lists a directory.
    pub async fn list(&self, opts: ListOptions) -> Result<Vec<ListEntry>, ClientError> {
        let op = format!("list {:?}", opts.dir);
        let req = self.unary(pb::ListRequest {
            dir: opts.dir,
            recursive: opts.recursive,
            digest: opts.digest,
            skip: opts.skip,
        });
        let mut stream = self
            .grpc
            .clone()
            .list(req)
            .await
            .map_err(|s| ClientError::from_status(&op, s))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(batch) = stream
            .message()
            .await
            .map_err(|s| ClientError::from_status(&op, s))?
        {
            out.extend(batch.entries.into_iter().map(|e| ListEntry {
                name: e.name,
                mode: e.mode,
                size: e.size,
                mtime_unix: e.mtime_unix,
                sha256: (!e.sha256.is_empty()).then_some(e.sha256),
                is_dir: e.is_dir,
                is_symlink: e.is_symlink,
            }));
        }
        Ok(out)
    }

    pub async fn status(&self) -> Result<BuildletStatus, ClientError> {
        let s = self
            .grpc
            .clone()
            .status(self.unary(pb::StatusRequest {}))
            .await
            .map_err(|s| ClientError::from_status("status", s))?
            .into_inner();
        Ok(BuildletStatus {
            version: s.version,
            host_type: s.host_type,
            workdir: s.workdir,
            load_avg_1m: s.load_avg_1m,
            running_commands: s.running_commands,
            uptime: Duration::from_millis(s.uptime_ms),
            hostname: s.hostname,
            goos: s.goos,
            goarch: s.goarch,
            containment: s.containment,
            cgroup: s.cgroup,
        })
    }

    /// The buildlet's workdir (absolute path on its machine).
    pub async fn workdir(&self) -> Result<String, ClientError> {
        let r = self
            .grpc
            .clone()
            .workdir(self.unary(pb::WorkdirRequest {}))
            .await
            .map_err(|s| ClientError::from_status("workdir", s))?;
        Ok(r.into_inner().workdir)
    }

    /// Asks the buildlet to shut down; it answers first.
    pub async fn halt(&self) -> Result<(), ClientError> {
        self.grpc
            .clone()
            .halt(self.unary(pb::HaltRequest {}))
            .await
            .map_err(|s| ClientError::from_status("halt", s))?;
        Ok(())
    }

    /// Starts an interactive session on a PTY.
    pub async fn shell(
        &self,
        start: ShellStart,
    ) -> Result<(ShellWriter, ShellReader), ClientError> {
        let (tx, rx) = mpsc::channel(16);
        let first = pb::ShellInput {
            msg: Some(pb::shell_input::Msg::Start(pb::ShellStart {
                argv: start.argv,
                rows: start.rows,
                cols: start.cols,
                term: start.term,
                // The coordinator's own shells need no extra env; gomote's go through
                // the API proxy, which adds the builder's.
                env: vec![],
            })),
        };
        tx.send(first)
            .await
            .map_err(|_| ClientError::new("shell", ErrorCode::Internal, "input channel closed"))?;
        let stream = self
            .grpc
            .clone()
            .shell(tonic::Request::new(ReceiverStream::new(rx)))
            .await
            .map_err(|s| ClientError::from_status("shell", s))?
            .into_inner();
        Ok((
            ShellWriter { tx },
            ShellReader {
                stream,
                done: false,
            },
        ))
    }
}

/// The host part of `host:port` (brackets of an IPv6 literal removed).
fn host_of(addr: &str) -> &str {
    let host = match addr.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => addr,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buildlet from before bulk connections offers only h2: the opener says
    /// UNIMPLEMENTED (the client then stops asking and uses gRPC), and one that offers
    /// the bulk protocol is opened.
    #[tokio::test]
    async fn an_opener_tells_a_buildlet_without_bulk_connections_apart() {
        buildfarm_tls::install_crypto_provider();
        let ca = buildfarm_tls::CertificateAuthority::generate("ca").unwrap();
        let server = ca.issue_server(&["localhost"]).unwrap();
        for (offered, unimplemented) in [(&[ALPN_H2][..], true), (&[ALPN_H2, ALPN_BULK][..], false)]
        {
            let tls = buildfarm_tls::server_config(&server, None, offered).unwrap();
            let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = tcp.local_addr().unwrap().to_string();
            let accept = tokio::spawn(async move {
                let (s, _) = tcp.accept().await.unwrap();
                let tls = tokio_rustls::TlsAcceptor::from(tls).accept(s).await;
                // Hold an accepted connection until the client is done with it.
                if let Ok(mut tls) = tls {
                    let _ = tokio::io::AsyncReadExt::read(&mut tls, &mut [0; 1]).await;
                }
            });
            let open = listen_data_opener(
                addr,
                buildfarm_tls::server_name("localhost").unwrap(),
                buildfarm_tls::client_config(ca.cert_pem(), None, &[ALPN_BULK]).unwrap(),
                Duration::from_secs(10),
            );
            match open().await {
                Err(s) => assert!(
                    unimplemented && s.code() == tonic::Code::Unimplemented,
                    "offering {offered:?}: {s:?}"
                ),
                Ok(io) => {
                    assert!(!unimplemented, "offering {offered:?}: opened");
                    drop(io);
                }
            }
            accept.await.unwrap();
        }
    }

    /// A server that said it takes no bulk connections is not asked again (the client
    /// goes straight to gRPC); one that could not be reached is asked next time.
    #[tokio::test]
    async fn a_refusal_is_remembered_and_a_failure_is_not() {
        use std::sync::atomic::AtomicUsize;
        for (code, asked_again) in [
            (tonic::Code::Unimplemented, false),
            (tonic::Code::Unavailable, true),
        ] {
            let calls = Arc::new(AtomicUsize::new(0));
            let counted = calls.clone();
            let open: DataOpener = Arc::new(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move { Err(tonic::Status::new(code, "no")) })
            });
            let path = BulkPath::new(open, "Bearer k");
            assert!(path.connection("get_tar", "").await.is_none(), "{code:?}");
            assert!(path.connection("get_tar", "").await.is_none(), "{code:?}");
            let want = if asked_again { 2 } else { 1 };
            assert_eq!(calls.load(Ordering::SeqCst), want, "{code:?}");
        }
    }

    #[test]
    fn host_parsing() {
        assert_eq!(host_of("127.0.0.1:443"), "127.0.0.1");
        assert_eq!(host_of("[::1]:80"), "::1");
        assert_eq!(host_of("buildlet.example"), "buildlet.example");
    }

    #[test]
    fn error_display_and_codes() {
        let e = ClientError::from_status(
            "exec \"go\"",
            tonic::Status::unavailable("connection reset"),
        );
        assert_eq!(e.to_string(), "exec \"go\": unavailable: connection reset");
        assert!(e.is_unavailable());
        let e = ClientError::from_status("list", tonic::Status::invalid_argument("bad path"));
        assert_eq!(e.code(), ErrorCode::InvalidArgument);
        assert!(!e.is_unavailable());
    }
}
