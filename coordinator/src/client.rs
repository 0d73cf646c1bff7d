//! The typed client of the coordinator's public gRPC API, used by `gomote` and tests.
//! Callers see plain types defined here (or the buildlet client's, where an RPC
//! forwards a buildlet call) and one error type, [`ApiError`]; prost and tonic stay
//! inside this module, `proto` and the API handlers.

use std::pin::Pin;
use std::time::Duration;

use anyhow::Context;
use buildfarm_proto::buildlet as bp;
use buildfarm_proto::coordinator as cp;
use buildfarm_proto::coordinator::coordinator_client::CoordinatorClient;
use buildlet::bulk::Addressee;
use buildlet::client::BulkPath;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub use buildlet::client::{
    ExecEvent, ExitStatus, ListEntry, OutputStream, PutTarStats, ShellEvent,
};

/// The gRPC status code of a failed call (the names are gRPC's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Ok,
    Cancelled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl From<tonic::Code> for Code {
    fn from(c: tonic::Code) -> Self {
        use tonic::Code as T;
        match c {
            T::Ok => Code::Ok,
            T::Cancelled => Code::Cancelled,
            T::Unknown => Code::Unknown,
            T::InvalidArgument => Code::InvalidArgument,
            T::DeadlineExceeded => Code::DeadlineExceeded,
            T::NotFound => Code::NotFound,
            T::AlreadyExists => Code::AlreadyExists,
            T::PermissionDenied => Code::PermissionDenied,
            T::ResourceExhausted => Code::ResourceExhausted,
            T::FailedPrecondition => Code::FailedPrecondition,
            T::Aborted => Code::Aborted,
            T::OutOfRange => Code::OutOfRange,
            T::Unimplemented => Code::Unimplemented,
            T::Internal => Code::Internal,
            T::Unavailable => Code::Unavailable,
            T::DataLoss => Code::DataLoss,
            T::Unauthenticated => Code::Unauthenticated,
        }
    }
}

/// A failed API call: which RPC, the status code and the server's (or transport's)
/// message, e.g. `ListInstances: token revoked (Unauthenticated)`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{op}: {message} ({code:?})")]
pub struct ApiError {
    op: &'static str,
    code: Code,
    message: String,
}

impl ApiError {
    fn new(op: &'static str, s: tonic::Status) -> Self {
        ApiError {
            op,
            code: s.code().into(),
            message: s.message().to_owned(),
        }
    }

    /// The RPC that failed, e.g. `ListInstances`.
    pub fn op(&self) -> &str {
        self.op
    }

    pub fn code(&self) -> Code {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

/// A transfer's failure on a bulk connection as the gRPC call's would read.
fn bulk_error(op: &'static str, e: buildlet::bulk::BulkError) -> ApiError {
    use buildlet::bulk::BulkError;
    let (code, message) = match e {
        BulkError::Status(s) => return ApiError::new(op, s),
        BulkError::Io(e) => (Code::Unavailable, format!("bulk connection: {e}")),
        BulkError::Input(e) => (Code::Cancelled, format!("reading the upload: {e}")),
        BulkError::Output(e) => (Code::Cancelled, format!("writing: {e}")),
    };
    ApiError { op, code, message }
}

/// A stream of typed messages from the coordinator; dropping it cancels the call.
pub type ApiStream<T> = Pin<Box<dyn Stream<Item = Result<T, ApiError>> + Send>>;

/// A gomote instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub name: String,
    pub builder: String,
    pub host_type: String,
    pub owner: String,
    pub created_unix: i64,
    pub expires_unix: i64,
}

impl From<cp::Instance> for Instance {
    fn from(i: cp::Instance) -> Self {
        Instance {
            name: i.name,
            builder: i.builder,
            host_type: i.host_type,
            owner: i.owner,
            created_unix: i.created_unix,
            expires_unix: i.expires_unix,
        }
    }
}

/// One message of a CreateInstance call: still queued, or the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateEvent {
    Queued {
        waiters_ahead: u32,
        /// Empty, or what the queue waits for (e.g. a machine booting).
        waiting_for: String,
    },
    Ready(Instance),
}

/// What to run on an instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSpec {
    pub cmd: String,
    pub args: Vec<String>,
    /// Relative to the workdir; empty is the workdir.
    pub dir: String,
    /// `KEY=VALUE` entries added to the builder's environment.
    pub env: Vec<String>,
    /// Act like this builder (same host type) instead; empty is the instance's own.
    pub builder_env: String,
    /// None: the buildlet's default.
    pub timeout: Option<Duration>,
}

/// The state of one builder of a try run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TryBuilderState {
    pub builder: String,
    pub state: String,
    pub build_id: String,
    pub log_url: String,
    pub elapsed_ms: u64,
}

/// The state of a try run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TryState {
    pub try_id: String,
    pub builders: Vec<TryBuilderState>,
    pub done: bool,
    pub verdict: String,
}

impl From<cp::TryState> for TryState {
    fn from(s: cp::TryState) -> Self {
        TryState {
            try_id: s.try_id,
            builders: s
                .builders
                .into_iter()
                .map(|b| TryBuilderState {
                    builder: b.builder,
                    state: b.state,
                    build_id: b.build_id,
                    log_url: b.log_url,
                    elapsed_ms: b.elapsed_ms,
                })
                .collect(),
            done: s.done,
            verdict: s.verdict,
        }
    }
}

/// A try run to submit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TryRequest {
    pub repo: String,
    pub rev: String,
    /// A git patch applied on `rev`; empty for none.
    pub patch: Vec<u8>,
    /// Empty: the repo's default builders.
    pub builders: Vec<String>,
}

/// A user token as the coordinator lists it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub id: String,
    pub user: String,
    pub role: String,
    pub note: String,
    pub created_unix_ms: i64,
    /// Set once revoked.
    pub revoked_unix_ms: Option<i64>,
}

impl From<cp::TokenInfo> for TokenInfo {
    fn from(t: cp::TokenInfo) -> Self {
        TokenInfo {
            id: t.id,
            user: t.user,
            role: t.role,
            note: t.note,
            created_unix_ms: t.created_unix_ms,
            revoked_unix_ms: (t.revoked_unix_ms != 0).then_some(t.revoked_unix_ms),
        }
    }
}

/// A newly issued token: its text, shown once, and its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken {
    pub token: String,
    pub info: Option<TokenInfo>,
}

#[derive(Clone)]
struct Auth(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Grpc = CoordinatorClient<InterceptedService<Channel, Auth>>;

/// A connection to the coordinator's API. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct FarmClient {
    grpc: Grpc,
    call_timeout: Option<Duration>,
    /// Transfers (put, gettar) on connections of their own to the coordinator's port;
    /// `None`: over gRPC only.
    bulk: Option<BulkPath>,
}

impl std::fmt::Debug for FarmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FarmClient").finish_non_exhaustive()
    }
}

/// The input side of a shell session. Dropping it closes the input.
pub struct ShellInput {
    tx: tokio::sync::mpsc::Sender<cp::InstanceShellInput>,
}

impl ShellInput {
    /// Sends keystrokes; fails once the session ended.
    pub async fn send_stdin(&self, data: Vec<u8>) -> Result<(), ApiError> {
        let msg = cp::InstanceShellInput {
            instance: String::new(),
            input: Some(bp::ShellInput {
                msg: Some(bp::shell_input::Msg::Stdin(data)),
            }),
            builder_env: String::new(),
        };
        self.tx.send(msg).await.map_err(|_| ApiError {
            op: "Shell",
            code: Code::Unavailable,
            message: "session ended".into(),
        })
    }
}

/// How a shell session starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShellSpec {
    pub rows: u32,
    pub cols: u32,
    pub term: String,
    /// Act like this builder (same host type) instead; empty is the instance's own.
    pub builder_env: String,
}

impl FarmClient {
    /// Connects over TLS to `addr` (`host:port`, an `https://` prefix allowed) trusting
    /// `ca_pem`, sending `token` as the bearer (None: anonymous).
    pub async fn connect(
        addr: &str,
        ca_pem: &str,
        token: Option<&str>,
        connect_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let addr = addr
            .strip_prefix("https://")
            .unwrap_or(addr)
            .trim_end_matches('/')
            .to_owned();
        let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(&addr);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let tls = buildfarm_tls::client_config(ca_pem, None, &[buildfarm_tls::ALPN_H2])?;
        let server_name = buildfarm_tls::server_name(host)?;
        let channel =
            revdial::h2::connect_channel(&addr, server_name.clone(), tls, connect_timeout)
                .await
                .with_context(|| format!("connecting to coordinator {addr}"))?;
        let bearer = token.map(|t| format!("Bearer {t}"));
        let auth = match &bearer {
            None => Auth(None),
            Some(b) => Auth(Some(
                MetadataValue::try_from(b.as_str()).context("token is not valid header text")?,
            )),
        };
        // Transfers on connections of their own (ALPN "buildfarm-bulk/1"): an older
        // coordinator refuses the protocol, and the client then uses gRPC.
        let bulk_tls = buildfarm_tls::client_config(ca_pem, None, &[buildfarm_tls::ALPN_BULK])?;
        let open = buildlet::client::listen_data_opener(
            addr.clone(),
            server_name,
            bulk_tls,
            connect_timeout,
        );
        let bulk = BulkPath::new(open, bearer.as_deref().unwrap_or_default());
        // Sending is not bounded here: the coordinator's configured limit decides, and
        // its refusal names it.
        let grpc = CoordinatorClient::with_interceptor(channel, auth)
            .max_decoding_message_size(buildfarm_proto::DEFAULT_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(usize::MAX);
        Ok(FarmClient {
            grpc,
            call_timeout: None,
            bulk: Some(bulk),
        })
    }

    /// Sends transfers over gRPC only (to compare the two paths, or where a proxy in
    /// between passes HTTP/2 alone).
    pub fn without_bulk_connections(mut self) -> Self {
        self.bulk = None;
        self
    }

    /// A bulk connection for one transfer to `instance`, or `None` for gRPC.
    async fn bulk_connection(
        &self,
        op: &str,
        instance: &str,
    ) -> Option<(revdial::DataStream, Addressee)> {
        self.bulk.as_ref()?.connection(op, instance).await
    }

    /// Gives every unary call this deadline (streams carry none).
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

    /// Asks for an instance of `builder`: queue positions, then the instance.
    pub async fn create_instance(&self, builder: &str) -> Result<ApiStream<CreateEvent>, ApiError> {
        const OP: &str = "CreateInstance";
        let s = self
            .grpc
            .clone()
            .create_instance(cp::CreateInstanceRequest {
                builder: builder.to_owned(),
            })
            .await
            .map_err(|e| ApiError::new(OP, e))?
            .into_inner();
        Ok(Box::pin(s.map(|m| {
            let m = m.map_err(|e| ApiError::new(OP, e))?;
            Ok(match m.instance {
                Some(i) => CreateEvent::Ready(i.into()),
                None => CreateEvent::Queued {
                    waiters_ahead: m.waiters_ahead,
                    waiting_for: m.waiting_for,
                },
            })
        })))
    }

    pub async fn list_instances(&self) -> Result<Vec<Instance>, ApiError> {
        let r = self
            .grpc
            .clone()
            .list_instances(self.unary(cp::ListInstancesRequest {}))
            .await
            .map_err(|e| ApiError::new("ListInstances", e))?
            .into_inner();
        Ok(r.instances.into_iter().map(Instance::from).collect())
    }

    pub async fn destroy_instance(&self, name: &str) -> Result<(), ApiError> {
        self.grpc
            .clone()
            .destroy_instance(self.unary(cp::DestroyInstanceRequest {
                name: name.to_owned(),
            }))
            .await
            .map_err(|e| ApiError::new("DestroyInstance", e))?;
        Ok(())
    }

    /// Uploads a tar.gz, sent as `data` yields it, and extracts it into `dir` of the
    /// instance.
    pub async fn put_tar(
        &self,
        instance: &str,
        dir: &str,
        data: impl Stream<Item = Bytes> + Send + 'static,
    ) -> Result<PutTarStats, ApiError> {
        const OP: &str = "PutTar";
        if let Some((io, to)) = self.bulk_connection(OP, instance).await {
            let r = buildlet::bulk::put_tar(io, &to, dir, data.map(Ok::<_, std::io::Error>))
                .await
                .map_err(|e| bulk_error(OP, e))?;
            return Ok(PutTarStats {
                entries: r.entries,
                bytes: r.bytes,
            });
        }
        let header = cp::InstancePutTarRequest {
            instance: instance.to_owned(),
            request: Some(bp::PutTarRequest {
                msg: Some(bp::put_tar_request::Msg::Header(bp::PutTarHeader {
                    dir: dir.to_owned(),
                })),
            }),
        };
        let data = data.map(|chunk| cp::InstancePutTarRequest {
            instance: String::new(),
            request: Some(bp::PutTarRequest {
                msg: Some(bp::put_tar_request::Msg::Data(chunk)),
            }),
        });
        let r = self
            .grpc
            .clone()
            .put_tar(futures::stream::once(async { header }).chain(data))
            .await
            .map_err(|e| ApiError::new("PutTar", e))?
            .into_inner();
        Ok(PutTarStats {
            entries: r.entries,
            bytes: r.bytes,
        })
    }

    /// Writes one file (the whole of it in one message).
    pub async fn write_file(
        &self,
        instance: &str,
        path: &str,
        mode: u32,
        contents: Vec<u8>,
    ) -> Result<(), ApiError> {
        self.grpc
            .clone()
            .write_file(self.unary(cp::InstanceWriteFileRequest {
                instance: instance.to_owned(),
                request: Some(bp::WriteFileRequest {
                    path: path.to_owned(),
                    mode,
                    contents,
                }),
            }))
            .await
            .map_err(|e| ApiError::new("WriteFile", e))?;
        Ok(())
    }

    /// Runs a command the way a build step of the instance's builder (or
    /// `spec.builder_env`) would; events until `Exit`.
    pub async fn exec(
        &self,
        instance: &str,
        spec: RunSpec,
    ) -> Result<ApiStream<ExecEvent>, ApiError> {
        const OP: &str = "Exec";
        let s = self
            .grpc
            .clone()
            .exec(cp::InstanceExecRequest {
                instance: instance.to_owned(),
                request: Some(bp::ExecRequest {
                    cmd: spec.cmd,
                    args: spec.args,
                    dir: spec.dir,
                    env: spec.env,
                    env_mode: bp::EnvMode::Add as i32,
                    path: vec![],
                    timeout_ms: spec.timeout.map(|t| t.as_millis() as u64).unwrap_or(0),
                }),
                builder_env: spec.builder_env,
            })
            .await
            .map_err(|e| ApiError::new(OP, e))?
            .into_inner();
        Ok(Box::pin(s.filter_map(|ev| async move {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => return Some(Err(ApiError::new(OP, e))),
            };
            match ev.event? {
                bp::exec_event::Event::Output(o) => Some(Ok(ExecEvent::Output {
                    stream: if o.stream == bp::OutputStream::Stderr as i32 {
                        OutputStream::Stderr
                    } else {
                        OutputStream::Stdout
                    },
                    data: o.data.into(),
                })),
                bp::exec_event::Event::Exit(x) => Some(Ok(ExecEvent::Exit(x.into()))),
            }
        })))
    }

    /// The tar.gz of `dir` of the instance, in chunks.
    pub async fn get_tar(&self, instance: &str, dir: &str) -> Result<ApiStream<Bytes>, ApiError> {
        const OP: &str = "GetTar";
        if let Some((io, to)) = self.bulk_connection(OP, instance).await {
            let chunks = buildlet::bulk::get_tar_stream(io, &to, dir)
                .await
                .map_err(|e| bulk_error(OP, e))?;
            return Ok(Box::pin(chunks.map(|c| c.map_err(|e| bulk_error(OP, e)))));
        }
        let s = self
            .grpc
            .clone()
            .get_tar(cp::InstanceGetTarRequest {
                instance: instance.to_owned(),
                request: Some(bp::GetTarRequest {
                    dir: dir.to_owned(),
                }),
            })
            .await
            .map_err(|e| ApiError::new(OP, e))?
            .into_inner();
        Ok(Box::pin(s.map(|c| {
            c.map(|c| c.data).map_err(|e| ApiError::new(OP, e))
        })))
    }

    /// Removes `paths` (relative to the workdir); `allow_root` permits `.`.
    pub async fn remove(
        &self,
        instance: &str,
        paths: Vec<String>,
        allow_root: bool,
    ) -> Result<(), ApiError> {
        self.grpc
            .clone()
            .remove(self.unary(cp::InstanceRemoveRequest {
                instance: instance.to_owned(),
                request: Some(bp::RemoveRequest { paths, allow_root }),
            }))
            .await
            .map_err(|e| ApiError::new("Remove", e))?;
        Ok(())
    }

    /// Lists `dir` of the instance (all batches).
    pub async fn list(
        &self,
        instance: &str,
        dir: &str,
        recursive: bool,
        digest: bool,
    ) -> Result<Vec<ListEntry>, ApiError> {
        const OP: &str = "List";
        let mut s = self
            .grpc
            .clone()
            .list(cp::InstanceListRequest {
                instance: instance.to_owned(),
                request: Some(bp::ListRequest {
                    dir: dir.to_owned(),
                    recursive,
                    digest,
                    skip: vec![],
                }),
            })
            .await
            .map_err(|e| ApiError::new(OP, e))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(batch) = s.next().await {
            let batch = batch.map_err(|e| ApiError::new(OP, e))?;
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

    /// Opens a shell on the instance: the input side and the output events.
    pub async fn shell(
        &self,
        instance: &str,
        spec: ShellSpec,
    ) -> Result<(ShellInput, ApiStream<ShellEvent>), ApiError> {
        const OP: &str = "Shell";
        let (tx, rx) = tokio::sync::mpsc::channel::<cp::InstanceShellInput>(64);
        let start = cp::InstanceShellInput {
            instance: instance.to_owned(),
            input: Some(bp::ShellInput {
                msg: Some(bp::shell_input::Msg::Start(bp::ShellStart {
                    argv: vec![],
                    rows: spec.rows,
                    cols: spec.cols,
                    term: spec.term,
                    env: vec![],
                })),
            }),
            builder_env: spec.builder_env,
        };
        // The channel is empty and its receiver alive: this cannot fail.
        let _ = tx.send(start).await;
        let s = self
            .grpc
            .clone()
            .shell(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|e| ApiError::new(OP, e))?
            .into_inner();
        let events = s.filter_map(|m| async move {
            let m = match m {
                Ok(m) => m,
                Err(e) => return Some(Err(ApiError::new(OP, e))),
            };
            match m.msg? {
                bp::shell_output::Msg::Data(d) => Some(Ok(ShellEvent::Data(d.into()))),
                bp::shell_output::Msg::Exit(x) => Some(Ok(ShellEvent::Exit(x.into()))),
            }
        });
        Ok((ShellInput { tx }, Box::pin(events)))
    }

    /// Submits a try run; returns its id.
    pub async fn submit_try(&self, req: TryRequest) -> Result<String, ApiError> {
        Ok(self
            .grpc
            .clone()
            .submit_try(self.unary(cp::SubmitTryRequest {
                repo: req.repo,
                rev: req.rev,
                patch: req.patch,
                builders: req.builders,
            }))
            .await
            .map_err(|e| ApiError::new("SubmitTry", e))?
            .into_inner()
            .try_id)
    }

    /// The states of a try run as they change, until it is done.
    pub async fn watch_try(&self, try_id: &str) -> Result<ApiStream<TryState>, ApiError> {
        const OP: &str = "WatchTry";
        let s = self
            .grpc
            .clone()
            .watch_try(cp::WatchTryRequest {
                try_id: try_id.to_owned(),
            })
            .await
            .map_err(|e| ApiError::new(OP, e))?
            .into_inner();
        Ok(Box::pin(s.map(|m| {
            m.map(TryState::from).map_err(|e| ApiError::new(OP, e))
        })))
    }

    /// Cancels a try run's unfinished builds; returns how many.
    pub async fn cancel_try(&self, try_id: &str) -> Result<u32, ApiError> {
        Ok(self
            .grpc
            .clone()
            .cancel_try(self.unary(cp::CancelTryRequest {
                try_id: try_id.to_owned(),
            }))
            .await
            .map_err(|e| ApiError::new("CancelTry", e))?
            .into_inner()
            .cancelled)
    }

    pub async fn issue_token(
        &self,
        user: &str,
        role: &str,
        note: &str,
    ) -> Result<IssuedToken, ApiError> {
        let r = self
            .grpc
            .clone()
            .issue_token(self.unary(cp::IssueTokenRequest {
                user: user.to_owned(),
                role: role.to_owned(),
                note: note.to_owned(),
            }))
            .await
            .map_err(|e| ApiError::new("IssueToken", e))?
            .into_inner();
        Ok(IssuedToken {
            token: r.token,
            info: r.info.map(TokenInfo::from),
        })
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>, ApiError> {
        let r = self
            .grpc
            .clone()
            .list_tokens(self.unary(cp::ListTokensRequest {}))
            .await
            .map_err(|e| ApiError::new("ListTokens", e))?
            .into_inner();
        Ok(r.tokens.into_iter().map(TokenInfo::from).collect())
    }

    /// Revokes the token with this id; returns its record when the server sends it.
    pub async fn revoke_token(&self, id: &str) -> Result<Option<TokenInfo>, ApiError> {
        let r = self
            .grpc
            .clone()
            .revoke_token(self.unary(cp::RevokeTokenRequest { id: id.to_owned() }))
            .await
            .map_err(|e| ApiError::new("RevokeToken", e))?
            .into_inner();
        Ok(r.info.map(TokenInfo::from))
    }
}
