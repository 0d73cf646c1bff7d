//! The gRPC face of a tunnel: the `Tunnel` service the dialer serves beside the real
//! one (pings, and dialling data connections back), and [`TunnelChannel`], the
//! listener's client handle, which turns every transport failure into `Unavailable` so
//! callers can tell "the host is gone" from a real error of the remote service.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use buildfarm_proto::revdial::tunnel_client::TunnelClient;
use buildfarm_proto::revdial::tunnel_server::{Tunnel, TunnelServer};
use buildfarm_proto::revdial::{OpenDataRequest, OpenDataResponse, PingRequest, PingResponse};
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use hyper::client::conn::http2::SendRequest;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::{Request, Response, Status};

use crate::data::{DataStream, DataWaiters};
use crate::dialer::DialBack;
use crate::handshake::DATA_TOKEN_LEN;
use crate::registry::HostId;

/// Served by every dialer: answers pings and, when the dialer was given a data
/// handler, dials data connections back.
#[derive(Clone, Default)]
pub struct TunnelService {
    dial_back: Option<Arc<DialBack>>,
}

impl std::fmt::Debug for TunnelService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelService")
            .field("data_connections", &self.dial_back.is_some())
            .finish()
    }
}

#[tonic::async_trait]
impl Tunnel for TunnelService {
    async fn ping(&self, _: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        Ok(Response::new(PingResponse {}))
    }

    async fn open_data(
        &self,
        req: Request<OpenDataRequest>,
    ) -> Result<Response<OpenDataResponse>, Status> {
        let Some(dial_back) = &self.dial_back else {
            return Err(Status::unimplemented("this host takes no data connections"));
        };
        let token = <[u8; DATA_TOKEN_LEN]>::try_from(req.into_inner().token.as_slice())
            .map_err(|_| Status::invalid_argument("a data token is 32 bytes"))?;
        dial_back.open(token).await?;
        Ok(Response::new(OpenDataResponse {}))
    }
}

impl TunnelService {
    /// The service without data connections (pings only).
    pub fn server() -> TunnelServer<TunnelService> {
        TunnelServer::new(TunnelService::default())
    }

    pub(crate) fn with_dial_back(dial_back: DialBack) -> TunnelServer<TunnelService> {
        TunnelServer::new(TunnelService {
            dial_back: Some(Arc::new(dial_back)),
        })
    }
}

/// Who is at the far end of a tunnel, as the listener let it in.
#[derive(Debug)]
pub(crate) struct TunnelHost {
    pub(crate) id: HostId,
    pub(crate) host_type: String,
    pub(crate) hostname: String,
    /// `host_type/hostname`, for messages.
    label: String,
}

impl TunnelHost {
    pub(crate) fn new(id: HostId, host_type: &str, hostname: &str) -> Self {
        TunnelHost {
            id,
            host_type: host_type.to_owned(),
            hostname: hostname.to_owned(),
            label: format!("{host_type}/{hostname}"),
        }
    }
}

/// A gRPC channel over one reverse tunnel. Use it like a `tonic::transport::Channel`:
/// `BuildletClient::new(host.channel.clone())`. Once the tunnel is lost, every call,
/// including ones in flight, fails with `Unavailable`.
#[derive(Clone, Debug)]
pub struct TunnelChannel {
    inner: SendRequest<Body>,
    lost: CancellationToken,
    host: Arc<TunnelHost>,
    data: Arc<DataWaiters>,
}

impl TunnelChannel {
    pub(crate) fn new(
        inner: SendRequest<Body>,
        lost: CancellationToken,
        host: TunnelHost,
        data: Arc<DataWaiters>,
    ) -> Self {
        TunnelChannel {
            inner,
            lost,
            host: Arc::new(host),
            data,
        }
    }

    /// True once the tunnel is gone for good.
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Opens a data connection to this host: a TLS connection it dials back to the
    /// listener for one raw byte stream (a bulk transfer). Fails with `Unimplemented`
    /// when the host takes none (use the tunnel instead), `Unavailable` when it could
    /// not dial back or the tunnel is gone, `DeadlineExceeded` after `limit`.
    pub async fn open_data(&self, limit: Duration) -> Result<DataStream, Status> {
        let host = &self.host;
        let (expected, arrived) = self.data.expect(host.id, &host.host_type, &host.hostname);
        let mut req = Request::new(OpenDataRequest {
            token: expected.token.to_vec(),
        });
        req.set_timeout(limit);
        let mut client = TunnelClient::new(self.clone());
        let open = async {
            // The host answers once the listener let the connection in; the stream is
            // handed over right after.
            client.open_data(req).await?;
            arrived.await.map_err(|_| {
                Status::unavailable(format!(
                    "the data connection from {} failed while being let in",
                    host.label
                ))
            })
        };
        let opened = tokio::time::timeout(limit, open).await.map_err(|_| {
            Status::deadline_exceeded(format!(
                "no data connection from {} within {limit:?}",
                host.label
            ))
        });
        drop(expected);
        opened?
    }
}

fn unavailable(host: &str, err: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("reverse tunnel to {host} lost: {err}"))
}

impl tower::Service<http::Request<Body>> for TunnelChannel {
    type Response = http::Response<Body>;
    type Error = Status;
    type Future = BoxFuture<'static, Result<Self::Response, Status>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        if self.lost.is_cancelled() {
            // Let `call` report it, with the host in the message.
            return Poll::Ready(Ok(()));
        }
        let host = &self.host.label;
        self.inner.poll_ready(cx).map_err(|e| unavailable(host, e))
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let host = self.host.clone();
        if self.lost.is_cancelled() {
            return Box::pin(async move { Err(unavailable(&host.label, "host disconnected")) });
        }
        // gRPC clients send a path only; HTTP/2 needs a scheme and an authority.
        let mut uri = std::mem::take(req.uri_mut()).into_parts();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = Some(http::uri::Authority::from_static("revdial.invalid"));
        match http::Uri::from_parts(uri) {
            Ok(u) => *req.uri_mut() = u,
            Err(e) => {
                return Box::pin(async move { Err(Status::internal(format!("request uri: {e}"))) });
            }
        }
        let fut = self.inner.send_request(req);
        Box::pin(async move {
            match fut.await {
                Ok(res) => Ok(res.map(|body| {
                    // A body error is always the transport: gRPC statuses travel in
                    // trailers, not as body errors.
                    Body::new(body.map_err(move |e| unavailable(&host.label, e)))
                })),
                Err(e) => Err(unavailable(&host.label, e)),
            }
        })
    }
}
