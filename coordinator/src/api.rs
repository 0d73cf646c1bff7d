//! The coordinator's public gRPC API (`buildfarm.coordinator.v1.Coordinator`): gomote
//! instances (borrowed buildlets, proxied call by call), try runs and user tokens.
//! Every call passes the access layer first (`grpc_auth`: token and role, see
//! `access`); the handlers check ownership and rate limits, which need the request.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use buildfarm_proto::buildlet as bp;
use buildfarm_proto::coordinator as cp;
use buildfarm_proto::coordinator::coordinator_server::Coordinator;
use buildfarm_store::{BuildState, NewTry, Verdict, try_verdict};
use buildlet::bulk::BulkTarget;
use buildlet::client::{BuildletClient, ClientError, ErrorCode};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::access::{Access, Action, DenyReason, Principal, Role};
use crate::farm::{Farm, FarmEvent, InstanceGrant, now_ms};
use crate::git::PatchError;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Largest patch a try run accepts.
pub const MAX_PATCH_BYTES: usize = 16 << 20;

/// Who refused an oversized message, for [`over_limit_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHolder {
    /// The coordinator's API (`limits.max_message_bytes`).
    Coordinator,
    /// A gomote instance's buildlet, behind the coordinator's proxy.
    Buildlet,
}

/// tonic refuses a message over its size limit with `OutOfRange` and a decoder message
/// ("decoded message length too large ..."), which tells a user neither which limit it is
/// nor what to do. This turns such a status into `ResourceExhausted` naming the limit;
/// any other status gives `None`.
pub fn over_limit_status(status: &Status, holder: LimitHolder) -> Option<Status> {
    if status.code() != tonic::Code::OutOfRange {
        return None;
    }
    let msg = status.message();
    let msg = msg.strip_prefix("buildlet: ").unwrap_or(msg);
    // Only a refused request can be helped by streaming; a refused response cannot.
    let (direction, advice, rest) = if let Some(rest) =
        msg.strip_prefix("Error, decoded message length too large: found ")
    {
        (
            "received",
            "; send files with `gomote put` or `gomote puttar`, which stream them in chunks",
            rest,
        )
    } else if let Some(rest) = msg.strip_prefix("Error, encoded message length too large: found ") {
        ("sent", "", rest)
    } else {
        return None;
    };
    // "<found> bytes, the limit is: <limit> bytes"
    let found = rest.split(' ').next().unwrap_or("?");
    let limit = rest
        .split("the limit is: ")
        .nth(1)
        .and_then(|l| l.split(' ').next())
        .unwrap_or("?");
    let (whose, knob) = match holder {
        LimitHolder::Coordinator => (
            "the coordinator's",
            " (limits.max_message_bytes in its config)",
        ),
        LimitHolder::Buildlet => ("the buildlet's", ""),
    };
    Some(Status::resource_exhausted(format!(
        "a {direction} message of {found} bytes is over {whose} limit of {limit} bytes per message{knob}{advice}"
    )))
}

/// A borrowed buildlet.
pub struct Instance {
    pub info: cp::Instance,
    last_used_ms: Mutex<i64>,
    grant: Mutex<Option<InstanceGrant>>,
    /// The owner's allowance this instance uses; given back with the grant.
    ticket: Mutex<Option<InstanceTicket>>,
    client: buildlet::client::BuildletClient,
    lost: tokio_util::sync::CancellationToken,
}

impl Instance {
    fn touch(&self) {
        *self.last_used_ms.lock().unwrap_or_else(|e| e.into_inner()) = now_ms();
    }
}

/// How many gomote instances each user holds, live or still being created, for
/// `limits.gomote_instances_per_user`.
type HeldByUser = Arc<Mutex<HashMap<String, usize>>>;

/// One instance of a user's allowance, taken when a create starts and given back when
/// dropped: when the create is abandoned or fails, or the instance is destroyed or expires.
struct InstanceTicket {
    held: HeldByUser,
    user: String,
}

impl Drop for InstanceTicket {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.user);
            }
        }
    }
}

/// Who is calling, as the access layer found it: `None` for an anonymous reader.
/// Put in the request's extensions by [`grpc_auth`].
#[derive(Debug, Clone)]
pub struct Caller(pub Option<Principal>);

/// The gRPC side of access control, in front of every method: checks the bearer token
/// and the role the method needs (`access::policy::grpc_action`), refuses with a gRPC
/// status, or passes the caller on to the handler in the request's extensions.
pub async fn grpc_auth(
    axum::extract::State(access): axum::extract::State<Arc<Access>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let action = crate::access::policy::grpc_action(req.uri().path());
    match access
        .authorize(req.headers().get(http::header::AUTHORIZATION), action)
        .await
    {
        Ok(p) => {
            req.extensions_mut().insert(Caller(p));
            next.run(req).await
        }
        Err(d) => d.to_status().into_http(),
    }
}

fn token_info(t: &buildfarm_store::UserToken) -> cp::TokenInfo {
    cp::TokenInfo {
        id: t.id.clone(),
        user: t.user.clone(),
        role: t.role.clone(),
        note: t.note.clone(),
        created_unix_ms: t.created_at,
        revoked_unix_ms: t.revoked_at.unwrap_or(0),
    }
}

#[derive(Clone)]
pub struct Api {
    farm: Arc<Farm>,
    access: Arc<Access>,
    instances: Arc<Mutex<HashMap<String, Arc<Instance>>>>,
    held: HeldByUser,
}

impl Api {
    pub fn new(farm: Arc<Farm>, access: Arc<Access>) -> Self {
        let api = Api {
            farm: farm.clone(),
            access,
            instances: Arc::new(Mutex::new(HashMap::new())),
            held: Arc::new(Mutex::new(HashMap::new())),
        };
        let sweeper = api.clone();
        farm.tasks()
            .spawn(async move { sweeper.expire_loop().await });
        api
    }

    pub fn access(&self) -> &Arc<Access> {
        &self.access
    }

    /// The caller the access layer let through; `None` for an anonymous reader.
    fn caller<T>(&self, req: &Request<T>) -> Result<Option<Principal>, Status> {
        match req.extensions().get::<Caller>() {
            Some(c) => Ok(c.0.clone()),
            // Only reachable if the service is served without `grpc_auth`.
            None => Err(Status::internal("the access layer did not run")),
        }
    }

    /// The caller, who must have a token (every method that changes state needs one,
    /// and the access layer refuses those without it).
    fn user<T>(&self, req: &Request<T>) -> Result<Principal, Status> {
        self.caller(req)?
            .ok_or_else(|| Status::unauthenticated("this call needs a user token"))
    }

    /// Takes one of `user`'s instances, or refuses with `ResourceExhausted` naming the
    /// limit when the user already holds `limits.gomote_instances_per_user` (live ones
    /// and creates still waiting count alike, so parallel creates cannot get around it).
    fn take_ticket(&self, user: &str) -> Result<InstanceTicket, Status> {
        let limit = self.farm.config().limits.gomote_instances_per_user as usize;
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.get(user).copied().unwrap_or(0);
        if n >= limit {
            drop(held);
            let live = self
                .instances
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .filter(|i| i.info.owner == user)
                .count()
                .min(n);
            let what = if live == n {
                format!("{n} live gomote instances")
            } else {
                format!(
                    "{n} gomote instances ({live} live, {} being created)",
                    n - live
                )
            };
            warn!(
                user,
                held = n,
                limit,
                "gomote create refused: instance limit"
            );
            return Err(Status::resource_exhausted(format!(
                "user {user} has {what}; the limit is {limit} (limits.gomote_instances_per_user): destroy one first"
            )));
        }
        held.insert(user.to_owned(), n + 1);
        Ok(InstanceTicket {
            held: self.held.clone(),
            user: user.to_owned(),
        })
    }

    fn instance(&self, user: &Principal, name: &str) -> Result<Arc<Instance>, Status> {
        let inst = self
            .instances
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no instance {name:?}")))?;
        self.access
            .check_owner(
                user,
                &inst.info.owner,
                &format!("instance {name:?}"),
                Action::UseOthersInstance,
            )
            .map_err(|r| r.to_status())?;
        if inst.lost.is_cancelled() {
            self.remove_instance(name);
            return Err(Status::unavailable(format!(
                "instance {name:?} lost its buildlet"
            )));
        }
        inst.touch();
        Ok(inst)
    }

    /// The builder whose environment an exec on `inst` gets: the instance's own, or
    /// `other` (`gomote run --builderenv`), which must run on the same host type, since
    /// its env is only meaningful on that kind of machine.
    fn env_builder(
        &self,
        inst: &Instance,
        other: &str,
    ) -> Result<&buildfarm_config::Builder, Status> {
        let name = if other.is_empty() {
            inst.info.builder.as_str()
        } else {
            other
        };
        let builder = self
            .farm
            .config()
            .builder(name)
            .ok_or_else(|| Status::not_found(format!("unknown builder {name:?}")))?;
        if builder.host_type != inst.info.host_type {
            return Err(Status::invalid_argument(format!(
                "builder {name} runs on host type {}, but instance {} is a {} buildlet; \
                 --builderenv takes a builder of host type {}",
                builder.host_type, inst.info.name, inst.info.host_type, inst.info.host_type
            )));
        }
        Ok(builder)
    }

    /// Puts the env of the builder `env_builder` picks in front of `caller_env`, as a
    /// build step of that builder would run: its env first, the caller's on top.
    fn with_builder_env(
        &self,
        inst: &Instance,
        other: &str,
        caller_env: &mut Vec<String>,
    ) -> Result<(), Status> {
        let builder = self.env_builder(inst, other)?;
        let mut env: Vec<String> = crate::runner::builder_env(self.farm.config(), builder)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        env.append(caller_env);
        *caller_env = env;
        Ok(())
    }

    fn remove_instance(&self, name: &str) -> bool {
        let removed = self
            .instances
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if let Some(inst) = removed {
            // Releasing the grant gives the buildlet and its slot back, and the ticket
            // the owner's allowance.
            inst.grant.lock().unwrap_or_else(|e| e.into_inner()).take();
            inst.ticket.lock().unwrap_or_else(|e| e.into_inner()).take();
            info!(instance = name, "gomote instance destroyed");
            true
        } else {
            false
        }
    }

    async fn expire_loop(&self) {
        let idle = self.farm.config().coordinator.gomote_idle_timeout;
        loop {
            tokio::select! {
                _ = self.farm.shutdown_token().cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(5).min(idle)) => {}
            }
            let cutoff = now_ms() - idle.as_millis() as i64;
            let expired: Vec<String> = self
                .instances
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .filter(|i| {
                    *i.last_used_ms.lock().unwrap_or_else(|e| e.into_inner()) < cutoff
                        || i.lost.is_cancelled()
                })
                .map(|i| i.info.name.clone())
                .collect();
            for name in expired {
                info!(instance = %name, "gomote instance expired or lost");
                self.remove_instance(&name);
            }
        }
    }

    pub fn instance_count(&self) -> usize {
        self.instances
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

/// A unary request aimed at one instance: its name and the buildlet request inside.
trait InstanceRequest {
    type Inner;
    fn split(self) -> (String, Option<Self::Inner>);
}

macro_rules! instance_request {
    ($($outer:ty => $inner:ty),* $(,)?) => {$(
        impl InstanceRequest for $outer {
            type Inner = $inner;
            fn split(self) -> (String, Option<$inner>) {
                (self.instance, self.request)
            }
        }
    )*};
}

instance_request! {
    cp::InstanceWriteFileRequest => bp::WriteFileRequest,
    cp::InstanceGetTarRequest => bp::GetTarRequest,
    cp::InstanceRemoveRequest => bp::RemoveRequest,
    cp::InstanceListRequest => bp::ListRequest,
}

impl Api {
    /// Checks the caller may use the named instance and returns its buildlet client
    /// and the request to forward.
    fn target<R: InstanceRequest>(
        &self,
        req: Request<R>,
    ) -> Result<(buildlet::client::RawClient, R::Inner), Status> {
        let user = self.user(&req)?;
        let (name, inner) = req.into_inner().split();
        let inst = self.instance(&user, &name)?;
        let inner = inner.ok_or_else(|| Status::invalid_argument("missing request"))?;
        Ok((inst.client.raw(), inner))
    }
}

fn proxy_status(e: Status) -> Status {
    if let Some(s) = over_limit_status(&e, LimitHolder::Buildlet) {
        return s;
    }
    // Keep the buildlet's code (Unavailable for a lost buildlet, InvalidArgument for bad
    // paths) and say where it came from.
    Status::new(e.code(), format!("buildlet: {}", e.message()))
}

fn forward<T: Send + 'static>(s: Streaming<T>) -> BoxStream<T> {
    Box::pin(s.map(|r| r.map_err(proxy_status)))
}

/// A buildlet client's error as the proxy's status: the same code, saying where it
/// came from.
fn client_status(e: ClientError) -> Status {
    let code = match e.code() {
        ErrorCode::InvalidArgument => tonic::Code::InvalidArgument,
        ErrorCode::NotFound => tonic::Code::NotFound,
        ErrorCode::PermissionDenied => tonic::Code::PermissionDenied,
        ErrorCode::Unauthenticated => tonic::Code::Unauthenticated,
        ErrorCode::Unavailable => tonic::Code::Unavailable,
        ErrorCode::DeadlineExceeded => tonic::Code::DeadlineExceeded,
        ErrorCode::ResourceExhausted => tonic::Code::ResourceExhausted,
        ErrorCode::FailedPrecondition => tonic::Code::FailedPrecondition,
        ErrorCode::Cancelled => tonic::Code::Cancelled,
        ErrorCode::Internal => tonic::Code::Internal,
        // The upload from the caller broke: the caller knows why.
        ErrorCode::Local => tonic::Code::Cancelled,
        ErrorCode::Other => tonic::Code::Unknown,
    };
    Status::new(code, format!("buildlet: {}", e.message()))
}

/// A gomote instance's transfers, for both of the proxy's front ends (gRPC calls and
/// bulk connections to the coordinator's port): the buildlet leg goes through its
/// client, on a data connection where the buildlet takes one.
struct InstanceTransfers(BuildletClient);

#[tonic::async_trait]
impl BulkTarget for InstanceTransfers {
    async fn get_tar(
        &self,
        dir: String,
    ) -> Result<futures::stream::BoxStream<'static, Result<Bytes, Status>>, Status> {
        let chunks = self.0.get_tar_stream(&dir).await.map_err(client_status)?;
        Ok(chunks.map(|c| c.map_err(client_status)).boxed())
    }

    async fn put_tar(
        &self,
        dir: String,
        data: futures::stream::BoxStream<'static, std::io::Result<Bytes>>,
    ) -> Result<bp::PutTarResponse, Status> {
        let stats = self
            .0
            .put_tar(&dir, tokio_util::io::StreamReader::new(data), None)
            .await
            .map_err(client_status)?;
        Ok(bp::PutTarResponse {
            entries: stats.entries,
            bytes: stats.bytes,
        })
    }
}

impl Api {
    /// Serves one gomote transfer on a bulk connection to the coordinator's port
    /// (ALPN `buildfarm-bulk/1`, the buildlets' protocol with the instance named in
    /// the request): the token is checked as a gRPC call's (`UseInstance`), then the
    /// instance's owner; `authorized` runs once both passed.
    pub async fn serve_bulk<S>(&self, io: S, authorized: impl FnOnce())
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        buildlet::bulk::serve_with(io, |to| async move {
            let action = Action::UseInstance;
            let header = match to.authorization.as_str() {
                "" => None,
                a => Some(http::HeaderValue::from_str(a).map_err(|_| {
                    self.access
                        .deny(None, action, DenyReason::BadToken, "malformed authorization")
                        .to_status()
                })?),
            };
            let user = self
                .access
                .authorize(header.as_ref(), action)
                .await
                .map_err(|d| d.to_status())?
                .ok_or_else(|| Status::unauthenticated("this call needs a user token"))?;
            let inst = self.instance(&user, &to.instance)?;
            authorized();
            tracing::debug!(instance = %to.instance, user = %user.user, "gomote transfer on a bulk connection");
            Ok(Arc::new(InstanceTransfers(inst.client.clone())))
        })
        .await
    }
}

/// Cancels a queued gomote request when the `create` stream is dropped.
struct RequestGuard {
    farm: Arc<Farm>,
    id: String,
    done: bool,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if !self.done {
            self.farm.cancel_instance_request(&self.id);
        }
    }
}

#[tonic::async_trait]
impl Coordinator for Api {
    type CreateInstanceStream = BoxStream<cp::CreateInstanceResponse>;

    async fn create_instance(
        &self,
        req: Request<cp::CreateInstanceRequest>,
    ) -> Result<Response<Self::CreateInstanceStream>, Status> {
        let user = self.user(&req)?;
        let builder_name = req.into_inner().builder;
        let builder = self
            .farm
            .config()
            .builder(&builder_name)
            .ok_or_else(|| Status::not_found(format!("unknown builder {builder_name:?}")))?
            .clone();
        if self.farm.pool(&builder.host_type).is_none() {
            return Err(Status::failed_precondition(format!(
                "host type {} has no pool",
                builder.host_type
            )));
        }
        let ticket = self.take_ticket(&user.user)?;
        self.access
            .take_gomote_create(&user)
            .map_err(|r| r.to_status())?;
        let request_id = uuid::Uuid::now_v7().to_string();
        // Past the interactive share of the host type the request waits in the queue
        // (shown with its place in line) rather than failing: the share frees up as soon
        // as any instance is destroyed or expires, and the per-user limit above bounds how
        // many requests one user can leave waiting.
        let mut rx = self.farm.request_instance(&request_id, &builder.host_type);
        let api = self.clone();
        let farm = self.farm.clone();
        let user = user.user;
        let stream = async_stream::try_stream! {
            let mut guard = RequestGuard { farm: farm.clone(), id: request_id.clone(), done: false };
            let grant = loop {
                let ahead = farm.queue_position(&request_id).unwrap_or(0) as u32;
                yield cp::CreateInstanceResponse {
                    phase: cp::create_instance_response::Phase::Queued as i32,
                    waiters_ahead: ahead,
                    instance: None,
                    waiting_for: farm.interactive_share_full(&builder.host_type).unwrap_or_default(),
                };
                let granted = tokio::select! {
                    g = &mut rx => Some(g),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => None,
                };
                if let Some(g) = granted {
                    break g.map_err(|_| Status::unavailable("no buildlet could be started for this builder"))?;
                }
            };
            guard.done = true;
            let (lease, slot) = grant;
            let n = uuid::Uuid::new_v4().simple().to_string();
            let name = format!("{user}-{}-{}", builder.name, &n[..6]);
            let now = now_ms();
            let idle = farm.config().coordinator.gomote_idle_timeout.as_millis() as i64;
            let info = cp::Instance {
                name: name.clone(),
                builder: builder.name.clone(),
                host_type: builder.host_type.clone(),
                owner: user.clone(),
                created_unix: now / 1000,
                expires_unix: (now + idle) / 1000,
            };
            let inst = Arc::new(Instance {
                info: info.clone(),
                last_used_ms: Mutex::new(now),
                client: lease.client.clone(),
                lost: lease.lost.clone(),
                grant: Mutex::new(Some((lease, slot))),
                ticket: Mutex::new(Some(ticket)),
            });
            api.instances.lock().unwrap_or_else(|e| e.into_inner()).insert(name.clone(), inst);
            info!(instance = %name, user = %user, "gomote instance created");
            yield cp::CreateInstanceResponse {
                phase: cp::create_instance_response::Phase::Ready as i32,
                waiters_ahead: 0,
                instance: Some(info),
                waiting_for: String::new(),
            };
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_instances(
        &self,
        req: Request<cp::ListInstancesRequest>,
    ) -> Result<Response<cp::ListInstancesResponse>, Status> {
        let caller = self.caller(&req)?;
        let idle_ms = self
            .farm
            .config()
            .coordinator
            .gomote_idle_timeout
            .as_millis() as i64;
        let mut instances: Vec<cp::Instance> = self
            .instances
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            // Admins see everyone's instances; others their own; anonymous readers none.
            .filter(|i| {
                caller
                    .as_ref()
                    .is_some_and(|p| p.role >= Role::Admin || i.info.owner == p.user)
            })
            .map(|i| {
                // Every use pushes the expiry back (see `expire_loop`).
                let last_used = *i.last_used_ms.lock().unwrap_or_else(|e| e.into_inner());
                cp::Instance {
                    expires_unix: (last_used + idle_ms) / 1000,
                    ..i.info.clone()
                }
            })
            .collect();
        instances.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(cp::ListInstancesResponse { instances }))
    }

    async fn destroy_instance(
        &self,
        req: Request<cp::DestroyInstanceRequest>,
    ) -> Result<Response<cp::DestroyInstanceResponse>, Status> {
        let user = self.user(&req)?;
        let name = req.into_inner().name;
        // Not `instance()`: a lost instance can still be destroyed.
        let owner = self
            .instances
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&name)
            .map(|i| i.info.owner.clone())
            .ok_or_else(|| Status::not_found(format!("no instance {name:?}")))?;
        self.access
            .check_owner(
                &user,
                &owner,
                &format!("instance {name:?}"),
                Action::UseOthersInstance,
            )
            .map_err(|r| r.to_status())?;
        self.remove_instance(&name);
        Ok(Response::new(cp::DestroyInstanceResponse {}))
    }

    async fn put_tar(
        &self,
        req: Request<Streaming<cp::InstancePutTarRequest>>,
    ) -> Result<Response<bp::PutTarResponse>, Status> {
        let user = self.user(&req)?;
        let mut incoming = req.into_inner();
        let first = incoming
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty put_tar stream"))?;
        let inst = self.instance(&user, &first.instance)?;
        let dir = match first.request.and_then(|r| r.msg) {
            Some(bp::put_tar_request::Msg::Header(h)) => h.dir,
            _ => {
                return Err(Status::invalid_argument(
                    "a put_tar stream starts with its header",
                ));
            }
        };
        // A client error mid-stream (e.g. a message over the size limit) ends the upload
        // as an error, so the buildlet never takes it for a whole tarball, and the caller
        // is told the client-side error, which is the cause.
        let client_error: Arc<Mutex<Option<Status>>> = Arc::default();
        let keep = client_error.clone();
        let data = incoming.filter_map(move |m| {
            futures::future::ready(match m.map(|m| m.request.and_then(|r| r.msg)) {
                Ok(Some(bp::put_tar_request::Msg::Data(d))) => Some(Ok(d)),
                Ok(Some(bp::put_tar_request::Msg::Header(_))) => Some(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "a second put_tar header",
                ))),
                Ok(None) => None,
                Err(e) => {
                    let broke = std::io::Error::other(e.message().to_owned());
                    *keep.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                    Some(Err(broke))
                }
            })
        });
        let resp = InstanceTransfers(inst.client.clone())
            .put_tar(dir, data.boxed())
            .await;
        if let Some(e) = client_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            return Err(e);
        }
        resp.map(Response::new)
    }

    async fn write_file(
        &self,
        req: Request<cp::InstanceWriteFileRequest>,
    ) -> Result<Response<bp::WriteFileResponse>, Status> {
        let (mut raw, inner) = self.target(req)?;
        raw.write_file(inner).await.map_err(proxy_status)
    }

    type ExecStream = BoxStream<bp::ExecEvent>;

    async fn exec(
        &self,
        req: Request<cp::InstanceExecRequest>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let user = self.user(&req)?;
        let r = req.into_inner();
        let inst = self.instance(&user, &r.instance)?;
        let mut inner = r
            .request
            .ok_or_else(|| Status::invalid_argument("missing request"))?;
        self.with_builder_env(&inst, &r.builder_env, &mut inner.env)?;
        let s = inst.client.raw().exec(inner).await.map_err(proxy_status)?;
        Ok(Response::new(forward(s.into_inner())))
    }

    type GetTarStream = BoxStream<bp::DataChunk>;

    async fn get_tar(
        &self,
        req: Request<cp::InstanceGetTarRequest>,
    ) -> Result<Response<Self::GetTarStream>, Status> {
        let user = self.user(&req)?;
        let (name, inner) = req.into_inner().split();
        let inst = self.instance(&user, &name)?;
        let dir = inner
            .ok_or_else(|| Status::invalid_argument("missing request"))?
            .dir;
        let chunks = InstanceTransfers(inst.client.clone()).get_tar(dir).await?;
        Ok(Response::new(Box::pin(
            chunks.map(|c| c.map(|data| bp::DataChunk { data })),
        )))
    }

    async fn remove(
        &self,
        req: Request<cp::InstanceRemoveRequest>,
    ) -> Result<Response<bp::RemoveResponse>, Status> {
        let (mut raw, inner) = self.target(req)?;
        raw.remove(inner).await.map_err(proxy_status)
    }

    type ListStream = BoxStream<bp::ListResponse>;

    async fn list(
        &self,
        req: Request<cp::InstanceListRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let (mut raw, inner) = self.target(req)?;
        let s = raw.list(inner).await.map_err(proxy_status)?;
        Ok(Response::new(forward(s.into_inner())))
    }

    type ShellStream = BoxStream<bp::ShellOutput>;

    async fn shell(
        &self,
        req: Request<Streaming<cp::InstanceShellInput>>,
    ) -> Result<Response<Self::ShellStream>, Status> {
        let user = self.user(&req)?;
        let mut incoming = req.into_inner();
        let first = incoming
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty shell stream"))?;
        let inst = self.instance(&user, &first.instance)?;
        let mut head = first.input;
        if let Some(bp::ShellInput {
            msg: Some(bp::shell_input::Msg::Start(start)),
        }) = head.as_mut()
        {
            // The shell acts like the builder, as `exec` does.
            self.with_builder_env(&inst, &first.builder_env, &mut start.env)?;
        }
        let head = head.into_iter();
        let rest = tokio_stream::StreamExt::filter_map(incoming, |m| m.ok().and_then(|m| m.input));
        let outbound = futures::stream::iter(head).chain(rest);
        let s = inst
            .client
            .raw()
            .shell(outbound)
            .await
            .map_err(proxy_status)?
            .into_inner();
        Ok(Response::new(forward(s)))
    }

    async fn submit_try(
        &self,
        req: Request<cp::SubmitTryRequest>,
    ) -> Result<Response<cp::SubmitTryResponse>, Status> {
        let user = self.user(&req)?;
        let r = req.into_inner();
        // Below `limits.max_message_bytes` (64 MiB by default), so this is what an
        // oversized patch meets.
        if r.patch.len() > MAX_PATCH_BYTES {
            return Err(Status::resource_exhausted(format!(
                "patch is {} bytes; the limit for a try patch is {MAX_PATCH_BYTES} bytes",
                r.patch.len()
            )));
        }
        let repo = self
            .farm
            .config()
            .repo(&r.repo)
            .ok_or_else(|| Status::not_found(format!("unknown repo {:?}", r.repo)))?;
        let mirror = self.farm.mirror(&repo.name).ok_or_else(|| {
            Status::failed_precondition(format!("repo {} has no mirror", repo.name))
        })?;
        // Shape and paths, before any git (`crate::try_patch`).
        if !r.patch.is_empty() {
            crate::try_patch::check(&r.patch, MAX_PATCH_BYTES)
                .map_err(|e| Status::invalid_argument(format!("patch does not apply: {e}")))?;
        }
        if let Err(e) = mirror.fetch().await {
            warn!(repo = %repo.name, error = %format!("{e:#}"), "fetch before try failed");
        }
        let rev = mirror
            .resolve(&r.rev)
            .await
            .map_err(|e| Status::invalid_argument(mirror.scrub(&format!("{e:#}"))))?;
        // A patch that cannot apply would fail on every builder after queueing; refuse it
        // now, before anything is stored.
        if !r.patch.is_empty() {
            match mirror.check_patch(&rev, &r.patch).await {
                Ok(()) => {}
                Err(e @ PatchError::DoesNotApply { .. }) => {
                    return Err(Status::invalid_argument(e.to_string()));
                }
                Err(PatchError::Check(e)) => {
                    warn!(repo = %repo.name, error = %format!("{e:#}"), "patch check failed");
                    return Err(Status::unavailable(
                        "the coordinator could not check the patch; try again later",
                    ));
                }
            }
        }
        let try_builders: Vec<String> = self
            .farm
            .config()
            .try_builders(&repo.name)
            .into_iter()
            .map(|b| b.name.clone())
            .collect();
        let builders = if r.builders.is_empty() {
            try_builders
        } else {
            for b in &r.builders {
                if !try_builders.contains(b) {
                    return Err(Status::invalid_argument(format!(
                        "{b:?} is not a try builder of {} (try builders: {})",
                        repo.name,
                        try_builders.join(", ")
                    )));
                }
            }
            r.builders.clone()
        };
        if builders.is_empty() {
            return Err(Status::failed_precondition(format!(
                "repo {} has no try builders",
                repo.name
            )));
        }
        self.access.take_try_run(&user).map_err(|r| r.to_status())?;
        let user = user.user;
        // Stored and queued as one operation; a full queue refuses it, storing nothing.
        let (run, builds) = self
            .farm
            .submit_try(&NewTry {
                repo: repo.name.clone(),
                rev,
                patch: (!r.patch.is_empty()).then_some(r.patch),
                builders,
                user: user.clone(),
            })
            .await
            .map_err(|e| e.to_status())?;
        info!(try_id = %run.id, user = %user, repo = %run.repo, rev = %run.rev, builders = builds.len(), "try run submitted");
        Ok(Response::new(cp::SubmitTryResponse { try_id: run.id }))
    }

    async fn cancel_try(
        &self,
        req: Request<cp::CancelTryRequest>,
    ) -> Result<Response<cp::CancelTryResponse>, Status> {
        let user = self.user(&req)?;
        let try_id = req.into_inner().try_id;
        let run = self
            .farm
            .store()
            .get_try(&try_id)
            .await
            .map_err(|e| Status::not_found(format!("try run {try_id:?}: {e}")))?;
        self.access
            .check_owner(
                &user,
                &run.user,
                &format!("try run {try_id}"),
                Action::CancelOthersTry,
            )
            .map_err(|r| r.to_status())?;
        let builds = self
            .farm
            .store()
            .builds_for_try(&try_id)
            .await
            .map_err(|e| Status::unavailable(format!("store: {e}")))?;
        let mut cancelled = 0;
        for b in builds.iter().filter(|b| !b.state.is_final()) {
            match self.farm.cancel_build(&b.id).await {
                Ok(true) => cancelled += 1,
                Ok(false) => {}
                Err(e) => return Err(Status::unavailable(format!("cancelling {}: {e:#}", b.id))),
            }
        }
        info!(try_id = %try_id, user = %user.user, cancelled, "try run cancelled");
        Ok(Response::new(cp::CancelTryResponse { cancelled }))
    }

    async fn issue_token(
        &self,
        req: Request<cp::IssueTokenRequest>,
    ) -> Result<Response<cp::IssueTokenResponse>, Status> {
        self.issue_token_impl(req).await
    }

    async fn list_tokens(
        &self,
        req: Request<cp::ListTokensRequest>,
    ) -> Result<Response<cp::ListTokensResponse>, Status> {
        self.user(&req)?;
        let tokens = self
            .access
            .list()
            .await
            .map_err(|e| Status::unavailable(format!("listing tokens: {e}")))?;
        Ok(Response::new(cp::ListTokensResponse {
            tokens: tokens.iter().map(token_info).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        req: Request<cp::RevokeTokenRequest>,
    ) -> Result<Response<cp::RevokeTokenResponse>, Status> {
        let admin = self.user(&req)?;
        let id = req.into_inner().id;
        let t = self.access.revoke(&id).await.map_err(|e| match e {
            buildfarm_store::StoreError::NotFound { .. } => {
                Status::not_found(format!("no token {id:?}"))
            }
            e => Status::unavailable(format!("revoking token {id}: {e}")),
        })?;
        info!(by = %admin.user, token_id = %t.id, user = %t.user, "user token revoked");
        Ok(Response::new(cp::RevokeTokenResponse {
            info: Some(token_info(&t)),
        }))
    }

    type WatchTryStream = BoxStream<cp::TryState>;

    async fn watch_try(
        &self,
        req: Request<cp::WatchTryRequest>,
    ) -> Result<Response<Self::WatchTryStream>, Status> {
        self.caller(&req)?;
        let try_id = req.into_inner().try_id;
        self.farm
            .store()
            .get_try(&try_id)
            .await
            .map_err(|e| Status::not_found(format!("try run {try_id:?}: {e}")))?;
        let farm = self.farm.clone();
        // Subscribed before the first read, so no change after it is missed.
        let mut events = farm.subscribe();
        let stream = async_stream::try_stream! {
            let mut builds = try_builds(&farm, &try_id).await?;
            let mut last: Option<cp::TryState> = None;
            loop {
                let state = try_state(&farm, &try_id, &builds);
                if last.as_ref() != Some(&state) {
                    last = Some(state.clone());
                    let done = state.done;
                    yield state;
                    if done {
                        break;
                    }
                }
                // Events carry each build's new state; the store is read again only
                // after missing some.
                match events.recv().await {
                    Ok(FarmEvent::BuildChanged(b)) if b.try_id.as_deref() == Some(try_id.as_str()) => {
                        match builds.iter_mut().find(|x| x.id == b.id) {
                            Some(slot) => *slot = b,
                            None => builds.push(b),
                        }
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => builds = try_builds(&farm, &try_id).await?,
                    Err(RecvError::Closed) => break,
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}

impl Api {
    async fn issue_token_impl(
        &self,
        req: Request<cp::IssueTokenRequest>,
    ) -> Result<Response<cp::IssueTokenResponse>, Status> {
        let admin = self.user(&req)?;
        let r = req.into_inner();
        if !crate::tokens::valid_user(&r.user) {
            return Err(Status::invalid_argument(format!(
                "invalid user name {:?}: letters, digits, `-`, `_`, `@` and `.` (not first), at most 64",
                r.user
            )));
        }
        let role: Role = r
            .role
            .parse()
            .map_err(|e: crate::access::policy::UnknownRole| {
                Status::invalid_argument(e.to_string())
            })?;
        let (t, token) = self
            .access
            .issue(&r.user, role, &r.note)
            .await
            .map_err(|e| Status::unavailable(format!("storing the token: {e}")))?;
        info!(by = %admin.user, token_id = %t.id, user = %t.user, role = %t.role, "user token issued");
        Ok(Response::new(cp::IssueTokenResponse {
            token,
            info: Some(token_info(&t)),
        }))
    }
}

async fn try_builds(farm: &Farm, try_id: &str) -> Result<Vec<buildfarm_store::Build>, Status> {
    farm.store()
        .builds_for_try(try_id)
        .await
        .map_err(|e| Status::unavailable(format!("store: {e}")))
}

fn try_state(farm: &Farm, try_id: &str, builds: &[buildfarm_store::Build]) -> cp::TryState {
    let base = farm.base_url();
    let now = now_ms();
    let builders = builds
        .iter()
        .map(|b| cp::TryBuilderState {
            builder: b.builder.clone(),
            state: b.state.as_str().to_owned(),
            build_id: b.id.clone(),
            log_url: format!("{base}/log/{}", b.id),
            elapsed_ms: match (b.started_at, b.finished_at) {
                (Some(s), Some(f)) => (f - s).max(0) as u64,
                (Some(s), None) if b.state == BuildState::Running => (now - s).max(0) as u64,
                _ => 0,
            },
        })
        .collect();
    let all_final = builds.iter().all(|b| b.state.is_final());
    let verdict = match try_verdict(builds) {
        Verdict::Pending => "pending",
        Verdict::Ok => "ok",
        Verdict::Failed => "failed",
    };
    cp::TryState {
        try_id: try_id.to_owned(),
        builders,
        done: all_final,
        verdict: verdict.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_limit_errors_become_resource_exhausted_naming_the_limit() {
        let decoded = Status::out_of_range(
            "Error, decoded message length too large: found 2097162 bytes, the limit is: 1048576 bytes",
        );
        let s = over_limit_status(&decoded, LimitHolder::Coordinator).expect("rewritten");
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert!(
            s.message().starts_with(
                "a received message of 2097162 bytes is over the coordinator's limit of 1048576 bytes per message (limits.max_message_bytes in its config)"
            ),
            "{}",
            s.message()
        );

        let proxied = proxy_status(Status::out_of_range(
            "Error, decoded message length too large: found 70000000 bytes, the limit is: 67174400 bytes",
        ));
        assert_eq!(proxied.code(), tonic::Code::ResourceExhausted);
        assert!(
            proxied
                .message()
                .contains("over the buildlet's limit of 67174400 bytes"),
            "{}",
            proxied.message()
        );

        // Anything else keeps its code and message.
        assert!(
            over_limit_status(
                &Status::out_of_range("offset past end"),
                LimitHolder::Coordinator
            )
            .is_none()
        );
        assert!(
            over_limit_status(
                &Status::internal("Error, decoded message length too large: found 1 bytes"),
                LimitHolder::Coordinator
            )
            .is_none()
        );
        let other = proxy_status(Status::invalid_argument("path escapes the workdir"));
        assert_eq!(other.code(), tonic::Code::InvalidArgument);
        assert_eq!(other.message(), "buildlet: path escapes the workdir");
    }

    #[test]
    fn the_config_default_message_limit_is_the_wire_default() {
        assert_eq!(
            buildfarm_config::Limits::default().max_message_bytes(),
            buildfarm_proto::DEFAULT_MAX_MESSAGE_BYTES
        );
    }
}
