//! The buildlet gRPC service. [`BuildletService`] implements every rpc of
//! `buildlet.proto` over a workdir; [`routes`] / [`authenticated_routes`] turn it into
//! `tonic::service::Routes`, which listen mode serves over TLS ([`serve_tls`]) and
//! reverse mode serves over a dialled tunnel. Past each handler the work is done with
//! our own types in `exec`, `shell`, `fsops`, `paths` and `tarball`.
//!
//! Shutdown: the service holds a `CancellationToken` owned by the binary. `Halt`
//! cancels it; every running command and shell watches it and kills its process group
//! and containment scope; [`BuildletService::drain`] then kills whatever is left.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use buildfarm_proto::buildlet as pb;
use buildfarm_proto::buildlet::buildlet_server::{Buildlet, BuildletServer};
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::io::{StreamReader, SyncIoBridge};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

use revdial::accept::{Acceptor, ConnLimits, HttpVersions, Tracked, serve_http};

use crate::auth::{AuthPolicy, PeerInfo};
use crate::contain::{CgroupChoice, ContainError, Containment};
use crate::exec::{self, CommandSpec, EnvMode, PrepareError};
use crate::fsops::{self, FsError, ListOptions};
use crate::paths::{self, PathError};
use crate::shell::{self, ShellInput, ShellSpec};
use crate::tarball::{self, Limits, TarError};

/// The version reported by Status and `buildlet version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Output events buffered per Exec call; when full, the command's readers wait (and
/// the command then blocks on its pipe): a slow caller slows the command down.
const EXEC_CHANNEL: usize = 32;
/// GetTar chunks buffered; when full the tar writer waits.
const GET_TAR_CHANNEL: usize = 8;
/// Size of one GetTar chunk.
const GET_TAR_CHUNK: usize = 64 * 1024;
/// Entries per List response message.
const LIST_BATCH: usize = 500;

/// What the service needs to know. Build with [`ServerConfig::new`] and adjust.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Root of everything callers touch. Created if missing.
    pub workdir: PathBuf,
    /// Where tarballs are extracted before being moved into place; must be on the same
    /// filesystem as the workdir and outside it. Default: `<workdir>.staging`.
    pub staging_dir: PathBuf,
    /// Host type reported by Status; default empty.
    pub host_type: String,
    /// Hostname reported by Status; default the machine's.
    pub hostname: String,
    /// Bounds on each extracted tarball (also bounds PutTarFromUrl downloads).
    pub tar_limits: Limits,
    /// Largest WriteFile contents; default 64 MiB (`buildfarm_proto::DEFAULT_MAX_MESSAGE_BYTES`).
    pub max_write_file_bytes: u64,
    /// Whole-request timeout of PutTarFromUrl downloads; default 30 minutes.
    pub url_fetch_timeout: Duration,
    /// How long PutTarFromUrl waits to connect to the URL's server; default 30 seconds.
    pub url_connect_timeout: Duration,
    /// How long PutTarFromUrl waits for the response, and then for each piece of the
    /// body, so a server that accepts and goes silent is given up on; default 60 seconds.
    pub url_read_timeout: Duration,
    /// Where commands are contained (`--cgroup`); default [`CgroupChoice::Auto`].
    pub cgroup: CgroupChoice,
}

impl ServerConfig {
    pub fn new(workdir: impl Into<PathBuf>) -> Self {
        let workdir = workdir.into();
        let mut staging = workdir.clone().into_os_string();
        staging.push(".staging");
        ServerConfig {
            staging_dir: PathBuf::from(staging),
            workdir,
            host_type: String::new(),
            hostname: hostname(),
            tar_limits: Limits::default(),
            max_write_file_bytes: buildfarm_proto::DEFAULT_MAX_MESSAGE_BYTES as u64,
            url_fetch_timeout: Duration::from_secs(30 * 60),
            url_connect_timeout: Duration::from_secs(30),
            url_read_timeout: Duration::from_secs(60),
            cgroup: CgroupChoice::Auto,
        }
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("preparing {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("staging dir {staging} must not be inside the workdir {workdir}")]
    StagingInsideWorkdir { staging: PathBuf, workdir: PathBuf },
    #[error("setting up process containment: {0}")]
    Contain(#[from] ContainError),
}

/// The buildlet service. Cheap to clone.
#[derive(Clone)]
pub struct BuildletService {
    inner: Arc<Inner>,
}

struct Inner {
    config: ServerConfig,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    running: Arc<AtomicU32>,
    started: Instant,
    http: OnceLock<reqwest::Client>,
    contain: Arc<Containment>,
}

/// Counts a running command for Status while alive.
struct RunningGuard(Arc<AtomicU32>);

impl RunningGuard {
    fn new(counter: &Arc<AtomicU32>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        RunningGuard(counter.clone())
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn make_dir(path: &Path) -> Result<PathBuf, ServerError> {
    let err = |source| ServerError::Dir {
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(path).map_err(err)?;
    // Canonical, so that path checks compare like with like.
    std::fs::canonicalize(path).map_err(err)
}

impl BuildletService {
    /// Creates the workdir and staging dir. `shutdown` is cancelled by Halt, and
    /// cancelling it kills every running command.
    pub fn new(mut config: ServerConfig, shutdown: CancellationToken) -> Result<Self, ServerError> {
        config.workdir = make_dir(&config.workdir)?;
        config.staging_dir = make_dir(&config.staging_dir)?;
        if config.staging_dir.starts_with(&config.workdir) {
            return Err(ServerError::StagingInsideWorkdir {
                staging: config.staging_dir,
                workdir: config.workdir,
            });
        }
        let contain = Containment::new(&config.cgroup, &config.workdir)?;
        Ok(BuildletService {
            inner: Arc::new(Inner {
                contain,
                config,
                shutdown,
                tasks: TaskTracker::new(),
                running: Arc::new(AtomicU32::new(0)),
                started: Instant::now(),
                http: OnceLock::new(),
            }),
        })
    }

    /// The canonical workdir.
    pub fn workdir(&self) -> &Path {
        &self.inner.config.workdir
    }

    /// What contains the commands' process trees.
    pub fn containment(&self) -> &Containment {
        &self.inner.contain
    }

    /// Commands and shells running now.
    pub fn running_commands(&self) -> u32 {
        self.inner.running.load(Ordering::SeqCst)
    }

    /// Waits (up to `grace`) for every command, shell and transfer task to end; call
    /// after cancelling the shutdown token. Returns false on timeout.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.inner.tasks.close();
        let drained = tokio::time::timeout(grace, self.inner.tasks.wait())
            .await
            .is_ok();
        // Whatever the commands left (or a command still running after the grace).
        let contain = self.inner.contain.clone();
        if let Err(error) = tokio::task::spawn_blocking(move || contain.shutdown()).await {
            tracing::warn!(%error, "killing leftover processes");
        }
        drained
    }

    /// A containment scope for one command, or the status that refuses the call.
    fn scope(&self, kind: &str) -> Result<crate::contain::Scope, Status> {
        self.inner.contain.scope(kind).map_err(|e| match e {
            ContainError::ShuttingDown => Status::unavailable(e.to_string()),
            e => Status::internal(e.to_string()),
        })
    }

    fn into_server(self) -> BuildletServer<Self> {
        let max = usize::try_from(self.inner.config.max_write_file_bytes)
            .unwrap_or(usize::MAX)
            .saturating_add(64 * 1024);
        BuildletServer::new(self).max_decoding_message_size(max)
    }

    fn http(&self) -> Result<&reqwest::Client, Status> {
        if let Some(c) = self.inner.http.get() {
            return Ok(c);
        }
        let config = &self.inner.config;
        let client = reqwest::Client::builder()
            .timeout(config.url_fetch_timeout)
            .connect_timeout(config.url_connect_timeout)
            .read_timeout(config.url_read_timeout)
            .build()
            .map_err(|e| Status::internal(format!("building http client: {e}")))?;
        Ok(self.inner.http.get_or_init(|| client))
    }

    /// Extracts a tar.gz byte stream into `dir`; `upload_error` is where the stream
    /// records why it failed, so that a broken upload is not blamed on the tarball.
    async fn extract(
        &self,
        dir: &str,
        data: impl Stream<Item = io::Result<Bytes>> + Send + 'static,
        upload_error: Arc<Mutex<Option<String>>>,
    ) -> Result<pb::PutTarResponse, Status> {
        let dest = paths::resolve_existing_safe(self.workdir(), dir).map_err(path_status)?;
        let staging = self.inner.config.staging_dir.clone();
        let limits = self.inner.config.tar_limits.clone();
        let reader = SyncIoBridge::new(StreamReader::new(Box::pin(data)));
        let res = self
            .inner
            .tasks
            .spawn_blocking(move || tarball::extract_tar_gz(reader, &dest, &staging, &limits))
            .await
            .map_err(|e| Status::internal(format!("extraction task: {e}")))?;
        match res {
            Ok(stats) => Ok(pb::PutTarResponse {
                entries: stats.entries,
                bytes: stats.bytes,
            }),
            Err(e) => {
                let upload = upload_error.lock().ok().and_then(|g| g.clone());
                match upload {
                    Some(why) => Err(Status::cancelled(format!("upload interrupted: {why}"))),
                    None => Err(tar_status(e)),
                }
            }
        }
    }
}

/// Transfers on a data connection (reverse mode) act on the workdir exactly as the
/// gRPC calls do: the same checks, tarball writer and extraction policy.
#[tonic::async_trait]
impl crate::bulk::BulkTarget for BuildletService {
    async fn get_tar(
        &self,
        dir: String,
    ) -> Result<futures::stream::BoxStream<'static, Result<Bytes, Status>>, Status> {
        tracing::info!(dir, "get_tar (data connection)");
        let chunks = Buildlet::get_tar(self, Request::new(pb::GetTarRequest { dir }))
            .await?
            .into_inner();
        Ok(chunks.map(|c| c.map(|c| c.data)).boxed())
    }

    async fn put_tar(
        &self,
        dir: String,
        data: futures::stream::BoxStream<'static, io::Result<Bytes>>,
    ) -> Result<pb::PutTarResponse, Status> {
        let upload_error = Arc::new(Mutex::new(None));
        let record = upload_error.clone();
        let data = data.inspect(move |r| {
            if let (Err(e), Ok(mut g)) = (r, record.lock()) {
                *g = Some(e.to_string());
            }
        });
        let resp = self.extract(&dir, data, upload_error).await?;
        tracing::info!(
            dir,
            entries = resp.entries,
            bytes = resp.bytes,
            "put_tar (data connection)"
        );
        Ok(resp)
    }
}

/// The PutTarFromUrl bounds, to say which one ran out.
#[derive(Debug, Clone, Copy)]
struct UrlTimeouts {
    connect: Duration,
    read: Duration,
    overall: Duration,
}

impl UrlTimeouts {
    fn of(config: &ServerConfig) -> Self {
        UrlTimeouts {
            connect: config.url_connect_timeout,
            read: config.url_read_timeout,
            overall: config.url_fetch_timeout,
        }
    }

    /// A download error as a status naming the URL and, for a timeout, which bound
    /// (DeadlineExceeded); other failures are FailedPrecondition (the URL's fault).
    fn fetch_error(&self, url: &reqwest::Url, e: &reqwest::Error, started: Instant) -> Status {
        let took = started.elapsed();
        if !e.is_timeout() {
            return Status::failed_precondition(format!("fetching {url}: {e}"));
        }
        let which = if e.is_connect() {
            format!(
                "could not connect within the connect timeout of {}",
                humantime::format_duration(self.connect)
            )
        } else if took >= self.overall {
            format!(
                "the download took longer than the overall timeout of {}",
                humantime::format_duration(self.overall)
            )
        } else {
            format!(
                "the server sent nothing for the read timeout of {}",
                humantime::format_duration(self.read)
            )
        };
        Status::deadline_exceeded(format!("fetching {url}: {which}"))
    }
}

fn path_status(e: PathError) -> Status {
    match e {
        PathError::Io { .. } => Status::internal(e.to_string()),
        _ => Status::invalid_argument(e.to_string()),
    }
}

fn fs_status(e: FsError) -> Status {
    match e {
        FsError::Path(p) => path_status(p),
        FsError::NotFound { .. } => Status::not_found(e.to_string()),
        FsError::NotADirectory { .. } | FsError::RemoveRoot { .. } => {
            Status::invalid_argument(e.to_string())
        }
        FsError::Io { .. } => Status::internal(e.to_string()),
    }
}

/// A refused tarball is the caller's problem (InvalidArgument) with the reason, which
/// names the offending entry; a limit is ResourceExhausted; a local disk failure is
/// Internal.
fn tar_status(e: TarError) -> Status {
    match e {
        TarError::TooLarge { .. }
        | TarError::TooManyEntries { .. }
        | TarError::RatioTooHigh { .. } => {
            Status::resource_exhausted(format!("tarball refused: {e}"))
        }
        TarError::Io { .. } => Status::internal(format!("extracting tarball: {e}")),
        _ => Status::invalid_argument(format!("tarball refused: {e}")),
    }
}

fn blocking_failed(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("worker task failed: {e}"))
}

fn exit_to_pb(o: exec::Outcome) -> pb::ExitStatus {
    pb::ExitStatus {
        code: o.code,
        signal: o.signal,
        duration_ms: u64::try_from(o.duration.as_millis()).unwrap_or(u64::MAX),
        timed_out: o.timed_out,
        error: o.error.unwrap_or_default(),
    }
}

fn exec_event_to_pb(ev: exec::Event) -> Result<pb::ExecEvent, Status> {
    use pb::exec_event::Event;
    let event = match ev {
        exec::Event::Output { stderr, data } => Event::Output(pb::ExecOutput {
            stream: if stderr {
                pb::OutputStream::Stderr
            } else {
                pb::OutputStream::Stdout
            } as i32,
            data: data.into(),
        }),
        exec::Event::Exit(o) => Event::Exit(exit_to_pb(o)),
        // The caller's build did not fail; its buildlet went away (and is gone next).
        exec::Event::Shutdown => {
            return Err(Status::unavailable(
                "the buildlet is shutting down; the command was killed",
            ));
        }
    };
    Ok(pb::ExecEvent { event: Some(event) })
}

fn shell_event_to_pb(ev: shell::ShellEvent) -> pb::ShellOutput {
    use pb::shell_output::Msg;
    let msg = match ev {
        shell::ShellEvent::Data(d) => Msg::Data(d.into()),
        shell::ShellEvent::Exit(o) => Msg::Exit(exit_to_pb(o)),
    };
    pb::ShellOutput { msg: Some(msg) }
}

fn clamp_u16(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A `Write` that sends fixed-size chunks into a channel, waiting when it is full.
struct ChannelWriter {
    tx: mpsc::Sender<Result<pb::DataChunk, Status>>,
    /// Frozen into a chunk when full; `split` hands the filled part over without a copy.
    buf: BytesMut,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = self.buf.split().freeze();
        self.buf.reserve(GET_TAR_CHUNK);
        self.tx
            .blocking_send(Ok(pb::DataChunk { data }))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "caller went away"))
    }
}

impl io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = GET_TAR_CHUNK - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= GET_TAR_CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

#[tonic::async_trait]
impl Buildlet for BuildletService {
    async fn put_tar(
        &self,
        request: Request<Streaming<pb::PutTarRequest>>,
    ) -> Result<Response<pb::PutTarResponse>, Status> {
        use pb::put_tar_request::Msg;
        let mut stream = request.into_inner();
        let dir = match stream.message().await? {
            Some(pb::PutTarRequest {
                msg: Some(Msg::Header(h)),
            }) => h.dir,
            _ => {
                return Err(Status::invalid_argument(
                    "the first put_tar message must be the header",
                ));
            }
        };
        let upload_error = Arc::new(Mutex::new(None));
        let record = upload_error.clone();
        let data = stream.map(move |m| match m {
            Ok(pb::PutTarRequest {
                msg: Some(Msg::Data(d)),
            }) => Ok(d),
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "put_tar message after the header is not data",
            )),
            Err(status) => {
                let why = status.message().to_owned();
                if let Ok(mut g) = record.lock() {
                    *g = Some(why.clone());
                }
                Err(io::Error::other(why))
            }
        });
        let resp = self.extract(&dir, data, upload_error).await?;
        tracing::info!(dir, entries = resp.entries, bytes = resp.bytes, "put_tar");
        Ok(Response::new(resp))
    }

    async fn put_tar_from_url(
        &self,
        request: Request<pb::PutTarFromUrlRequest>,
    ) -> Result<Response<pb::PutTarResponse>, Status> {
        let req = request.into_inner();
        let url = reqwest::Url::parse(&req.url)
            .map_err(|e| Status::invalid_argument(format!("bad url {:?}: {e}", req.url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Status::invalid_argument(format!(
                "url {:?}: only http and https are supported",
                req.url
            )));
        }
        // Refuse a bad dir before downloading anything.
        paths::resolve_existing_safe(self.workdir(), &req.dir).map_err(path_status)?;
        let timeouts = UrlTimeouts::of(&self.inner.config);
        let started = Instant::now();
        let resp = self
            .http()?
            .get(url.clone())
            .send()
            .await
            .map_err(|e| timeouts.fetch_error(&url, &e, started))?;
        let code = resp.status();
        if !code.is_success() {
            let msg = format!("fetching {url}: http status {code}");
            return Err(if code == reqwest::StatusCode::NOT_FOUND {
                Status::not_found(msg)
            } else {
                Status::failed_precondition(msg)
            });
        }
        let upload_error = Arc::new(Mutex::new(None));
        let record = upload_error.clone();
        let timed_out = Arc::new(AtomicBool::new(false));
        let record_timeout = timed_out.clone();
        let max = self.inner.config.tar_limits.max_bytes;
        let mut seen = 0u64;
        let body_url = url.clone();
        let data = resp.bytes_stream().map(move |r| {
            let chunk = r.map_err(|e| {
                let status = timeouts.fetch_error(&body_url, &e, started);
                if status.code() == tonic::Code::DeadlineExceeded {
                    record_timeout.store(true, Ordering::SeqCst);
                }
                let why = status.message().to_owned();
                if let Ok(mut g) = record.lock() {
                    *g = Some(why.clone());
                }
                io::Error::other(why)
            })?;
            // The compressed size can never usefully exceed the uncompressed bound.
            seen += chunk.len() as u64;
            if seen > max {
                return Err(io::Error::other(format!(
                    "download larger than {max} bytes"
                )));
            }
            Ok(chunk)
        });
        let resp = self
            .extract(&req.dir, data, upload_error)
            .await
            .map_err(|status| {
                if timed_out.load(Ordering::SeqCst) {
                    let msg = status.message();
                    Status::deadline_exceeded(
                        msg.strip_prefix("upload interrupted: ").unwrap_or(msg),
                    )
                } else {
                    status
                }
            })?;
        tracing::info!(%url, dir = req.dir, entries = resp.entries, "put_tar_from_url");
        Ok(Response::new(resp))
    }

    async fn write_file(
        &self,
        request: Request<pb::WriteFileRequest>,
    ) -> Result<Response<pb::WriteFileResponse>, Status> {
        let req = request.into_inner();
        let max = self.inner.config.max_write_file_bytes;
        if req.contents.len() as u64 > max {
            return Err(Status::resource_exhausted(format!(
                "write_file {:?}: {} bytes is more than the limit of {max}",
                req.path,
                req.contents.len()
            )));
        }
        let root = self.workdir().to_owned();
        tokio::task::spawn_blocking(move || {
            fsops::write_file(&root, &req.path, req.mode, &req.contents)
        })
        .await
        .map_err(blocking_failed)?
        .map_err(fs_status)?;
        Ok(Response::new(pb::WriteFileResponse {}))
    }

    type ExecStream = BoxStream<pb::ExecEvent>;

    async fn exec(
        &self,
        request: Request<pb::ExecRequest>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let req = request.into_inner();
        let env_mode = match pb::EnvMode::try_from(req.env_mode) {
            Ok(pb::EnvMode::Add) => EnvMode::Add,
            Ok(pb::EnvMode::Replace) => EnvMode::Replace,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown env_mode {}",
                    req.env_mode
                )));
            }
        };
        let spec = CommandSpec {
            cmd: req.cmd,
            args: req.args,
            dir: req.dir,
            env: req.env,
            env_mode,
            path: req.path,
            timeout: (req.timeout_ms > 0).then(|| Duration::from_millis(req.timeout_ms)),
        };
        tracing::info!(cmd = spec.cmd, args = ?spec.args, dir = spec.dir, "exec");
        let prepared = match exec::prepare(self.workdir(), &spec, std::env::vars()) {
            Ok(p) => p,
            Err(e @ PrepareError::NotFound { .. }) => {
                // Not a failed call: the command ran (or rather, could not), and the
                // caller reads why from the exit status like any other outcome.
                let ev = exec::Event::Exit(exec::Outcome::failed(e.to_string()));
                let once = futures::stream::iter([exec_event_to_pb(ev)]);
                return Ok(Response::new(Box::pin(once)));
            }
            Err(e @ PrepareError::Io { .. }) => return Err(Status::internal(e.to_string())),
            Err(PrepareError::Path(p)) => return Err(path_status(p)),
            Err(e) => return Err(Status::invalid_argument(e.to_string())),
        };
        let scope = self.scope("exec")?;
        let (tx, rx) = mpsc::channel(EXEC_CHANNEL);
        let guard = RunningGuard::new(&self.inner.running);
        let shutdown = self.inner.shutdown.clone();
        self.inner.tasks.spawn(async move {
            let _guard = guard;
            exec::run(prepared, tx, shutdown, scope).await;
        });
        let out = ReceiverStream::new(rx).map(exec_event_to_pb);
        Ok(Response::new(Box::pin(out)))
    }

    type GetTarStream = BoxStream<pb::DataChunk>;

    async fn get_tar(
        &self,
        request: Request<pb::GetTarRequest>,
    ) -> Result<Response<Self::GetTarStream>, Status> {
        let dir = request.into_inner().dir;
        let src = paths::resolve_existing_safe(self.workdir(), &dir).map_err(path_status)?;
        match std::fs::metadata(&src) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Status::invalid_argument(format!(
                    "{dir:?} is not a directory"
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Status::not_found(format!("{dir:?} does not exist")));
            }
            Err(e) => return Err(Status::internal(format!("inspecting {dir:?}: {e}"))),
        }
        let (tx, rx) = mpsc::channel(GET_TAR_CHANNEL);
        self.inner.tasks.spawn_blocking(move || {
            let mut w = ChannelWriter {
                tx: tx.clone(),
                buf: BytesMut::with_capacity(GET_TAR_CHUNK),
            };
            let res = tarball::write_tar_gz(&src, &mut w);
            let res = match res {
                Ok(n) => io::Write::flush(&mut w)
                    .map(|()| n)
                    .map_err(|e| Status::unavailable(e.to_string())),
                Err(e) => Err(Status::internal(format!("writing tarball of {dir:?}: {e}"))),
            };
            match res {
                Ok(bytes) => tracing::info!(dir, bytes, "get_tar"),
                Err(status) => {
                    tracing::warn!(dir, error = %status.message(), "get_tar failed");
                    let _ = tx.blocking_send(Err(status));
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::RemoveResponse>, Status> {
        let pb::RemoveRequest { paths, allow_root } = request.into_inner();
        let root = self.workdir().to_owned();
        tracing::info!(?paths, allow_root, "remove");
        tokio::task::spawn_blocking(move || fsops::remove(&root, &paths, allow_root))
            .await
            .map_err(blocking_failed)?
            .map_err(fs_status)?;
        Ok(Response::new(pb::RemoveResponse {}))
    }

    type ListStream = BoxStream<pb::ListResponse>;

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let req = request.into_inner();
        let opts = ListOptions {
            dir: req.dir,
            recursive: req.recursive,
            digest: req.digest,
            skip: req.skip,
        };
        // Refuse bad input as the call's status rather than mid-stream.
        paths::resolve_existing_safe(self.workdir(), &opts.dir).map_err(path_status)?;
        let root = self.workdir().to_owned();
        let (tx, rx) = mpsc::channel(4);
        self.inner.tasks.spawn_blocking(move || {
            let res = fsops::list(&root, &opts, LIST_BATCH, |batch| {
                let entries = batch
                    .into_iter()
                    .map(|e| pb::ListEntry {
                        name: e.name,
                        mode: e.mode,
                        size: e.size,
                        mtime_unix: e.mtime_unix,
                        sha256: e.sha256.unwrap_or_default(),
                        is_dir: e.is_dir,
                        is_symlink: e.is_symlink,
                    })
                    .collect();
                tx.blocking_send(Ok(pb::ListResponse { entries })).is_ok()
            });
            if let Err(e) = res {
                let _ = tx.blocking_send(Err(fs_status(e)));
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let c = &self.inner.config;
        Ok(Response::new(pb::StatusResponse {
            version: VERSION.into(),
            host_type: c.host_type.clone(),
            workdir: c.workdir.to_string_lossy().into_owned(),
            load_avg_1m: load_avg_1m(),
            running_commands: self.running_commands(),
            uptime_ms: u64::try_from(self.inner.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            hostname: c.hostname.clone(),
            goos: goos().into(),
            goarch: goarch().into(),
            containment: self.inner.contain.description().to_owned(),
            cgroup: self
                .inner
                .contain
                .cgroup_path()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }))
    }

    async fn workdir(
        &self,
        _request: Request<pb::WorkdirRequest>,
    ) -> Result<Response<pb::WorkdirResponse>, Status> {
        Ok(Response::new(pb::WorkdirResponse {
            workdir: self.workdir().to_string_lossy().into_owned(),
        }))
    }

    async fn halt(
        &self,
        _request: Request<pb::HaltRequest>,
    ) -> Result<Response<pb::HaltResponse>, Status> {
        tracing::info!("halt requested");
        // Graceful shutdown still finishes in-flight calls, so this answer is delivered.
        self.inner.shutdown.cancel();
        Ok(Response::new(pb::HaltResponse {}))
    }

    type ShellStream = BoxStream<pb::ShellOutput>;

    async fn shell(
        &self,
        request: Request<Streaming<pb::ShellInput>>,
    ) -> Result<Response<Self::ShellStream>, Status> {
        use pb::shell_input::Msg;
        let mut input = request.into_inner();
        let start = match input.message().await? {
            Some(pb::ShellInput {
                msg: Some(Msg::Start(s)),
            }) => s,
            _ => {
                return Err(Status::invalid_argument(
                    "the first shell message must be start",
                ));
            }
        };
        let spec = ShellSpec {
            argv: start.argv,
            rows: clamp_u16(start.rows),
            cols: clamp_u16(start.cols),
            term: start.term,
        };
        let workdir = self.workdir().to_owned();
        let env = exec::build_env(std::env::vars(), EnvMode::Add, &start.env, &[], &workdir)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        for sub in ["tmp", "gocache"] {
            let _ = std::fs::create_dir_all(workdir.join(sub));
        }
        // A broken input stream ends input; the output side notices the caller leaving.
        let input = input
            .take_while(|m| futures::future::ready(m.is_ok()))
            .filter_map(|m| {
                futures::future::ready(match m {
                    Ok(pb::ShellInput {
                        msg: Some(Msg::Stdin(d)),
                    }) => Some(ShellInput::Stdin(Bytes::from(d))),
                    Ok(pb::ShellInput {
                        msg: Some(Msg::Resize(r)),
                    }) => Some(ShellInput::Resize {
                        rows: clamp_u16(r.rows),
                        cols: clamp_u16(r.cols),
                    }),
                    _ => None,
                })
            });
        tracing::info!(argv = ?spec.argv, "shell");
        let scope = self.scope("shell")?;
        let (tx, rx) = mpsc::channel(EXEC_CHANNEL);
        let guard = RunningGuard::new(&self.inner.running);
        let shutdown = self.inner.shutdown.clone();
        self.inner.tasks.spawn(async move {
            let _guard = guard;
            shell::run(workdir, spec, env, Box::pin(input), tx, shutdown, scope).await;
        });
        let out = ReceiverStream::new(rx).map(|ev| Ok(shell_event_to_pb(ev)));
        Ok(Response::new(Box::pin(out)))
    }
}

fn load_avg_1m() -> f64 {
    let mut loads = [0f64; 3];
    // SAFETY: the array has room for the 3 values asked for.
    let n = unsafe { libc::getloadavg(loads.as_mut_ptr(), 3) };
    if n >= 1 { loads[0] } else { 0.0 }
}

/// GOOS of this machine, as Go names it.
pub fn goos() -> &'static str {
    match std::env::consts::OS {
        "macos" => "darwin",
        other => other,
    }
}

/// GOARCH of this machine, as Go names it.
pub fn goarch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "x86" => "386",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// The service's routes without authentication: for a reverse tunnel, which was
/// authenticated when dialled.
pub fn routes(svc: BuildletService) -> Routes {
    Routes::new(svc.into_server())
}

/// The service's routes behind `policy`: for listen mode.
pub fn authenticated_routes(svc: BuildletService, policy: AuthPolicy) -> Routes {
    Routes::new(InterceptedService::new(
        svc.into_server(),
        policy.interceptor(),
    ))
}

/// What a listen-mode port needs to take bulk connections (ALPN `buildfarm-bulk/1`,
/// see [`crate::bulk`]): the transfers' target and the gRPC port's authorization.
#[derive(Clone)]
pub struct ListenBulk {
    pub target: Arc<dyn crate::bulk::BulkTarget>,
    pub policy: AuthPolicy,
}

/// Serves `routes` over TLS on `listener` with the default [`ConnLimits`] until
/// `shutdown`; see [`serve_tls_with`].
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    routes: Routes,
    bulk: Option<ListenBulk>,
    shutdown: CancellationToken,
) {
    serve_tls_with(listener, tls, routes, bulk, ConnLimits::default(), shutdown).await
}

/// Serves `routes` (gRPC over HTTP/2) over TLS on `listener` until `shutdown` is
/// cancelled, then gives in-flight calls a grace period and returns once every
/// connection is closed. Connections go through the bounded acceptor of
/// `revdial::accept`: caps on open connections and handshakes, a handshake timeout,
/// an idle timeout (no call in flight), HTTP/2 keep-alive and a header size limit.
/// With `bulk` (and its ALPN in `tls`), a connection that negotiates
/// `buildfarm-bulk/1` carries one transfer instead, once authorized.
pub async fn serve_tls_with(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    routes: Routes,
    bulk: Option<ListenBulk>,
    limits: ConnLimits,
    shutdown: CancellationToken,
) {
    let tls = tokio_rustls::TlsAcceptor::from(tls);
    let acceptor = Acceptor::new(limits);
    let conns = TaskTracker::new();
    while let Some((tcp, peer, conn)) = acceptor.accept(&listener, &shutdown).await {
        let (tls, routes, shutdown) = (tls.clone(), routes.clone(), shutdown.clone());
        let bulk = bulk.clone();
        conns.spawn(async move {
            let h = conn.handle();
            let limit = h.limits().handshake_timeout;
            let stream = tokio::select! {
                r = tokio::time::timeout(limit, tls.accept(tcp)) => match r {
                    Ok(Ok(s)) => s,
                    Ok(Err(error)) => {
                        tracing::info!(%peer, %error, "tls handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%peer, ?limit, "tls handshake timed out");
                        return;
                    }
                },
                _ = h.killed() => return,
                _ = shutdown.cancelled() => return,
            };
            h.handshake_done();
            let info = PeerInfo {
                remote_addr: Some(peer),
                verified_client_cert: stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .is_some_and(|c| !c.is_empty()),
            };
            if stream.get_ref().1.alpn_protocol() == Some(buildfarm_tls::ALPN_BULK) {
                // Only offered when `bulk` is set, so rustls refused it otherwise.
                let Some(bulk) = bulk else { return };
                let cert = info.verified_client_cert;
                let pin = h.clone();
                let authorize = move |auth: &str| {
                    let auth = (!auth.is_empty()).then_some(auth.as_bytes());
                    bulk.policy.check(cert, auth).map_err(|e| {
                        tracing::warn!(%peer, error = %e, "refused bulk connection");
                        Status::from(e)
                    })?;
                    // A transfer may pause longer than the idle timeout between reads.
                    pin.pin();
                    Ok(())
                };
                let io = Tracked::new(stream, conn);
                // Until authorized, the connection is evictable like any other: a peer
                // that sends no request gives its slot up when the acceptor needs it.
                tokio::select! {
                    _ = crate::bulk::serve_authorized(bulk.target, io, authorize) => {}
                    _ = h.killed() => tracing::debug!(%peer, "bulk connection evicted"),
                }
                return;
            }
            // The auth interceptor reads this from every request's extensions.
            let svc = tower::ServiceExt::map_request(routes, move |mut req: http::Request<_>| {
                req.extensions_mut().insert(info.clone());
                req
            });
            let io = hyper_util::rt::TokioIo::new(Tracked::new(stream, conn));
            match serve_http(io, svc, &h, HttpVersions::Http2Only, &shutdown).await {
                Ok(closed) => tracing::debug!(%peer, ?closed, "connection closed"),
                Err(error) => tracing::debug!(%peer, %error, "connection ended with an error"),
            }
        });
    }
    conns.close();
    conns.wait().await;
}
