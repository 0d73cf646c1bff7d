//! The gRPC face of a tunnel: the `Tunnel` Ping service the dialer serves beside the
//! real one, and [`TunnelChannel`], the listener's client handle, which turns every
//! transport failure into `Unavailable` so callers can tell "the host is gone" from a
//! real error of the remote service.

use std::task::{Context, Poll};

use buildfarm_proto::revdial::tunnel_server::{Tunnel, TunnelServer};
use buildfarm_proto::revdial::{PingRequest, PingResponse};
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use hyper::client::conn::http2::SendRequest;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::{Request, Response, Status};

/// Answers pings; served by every dialer.
#[derive(Debug, Clone, Copy, Default)]
pub struct TunnelService;

#[tonic::async_trait]
impl Tunnel for TunnelService {
    async fn ping(&self, _: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        Ok(Response::new(PingResponse {}))
    }
}

impl TunnelService {
    pub fn server() -> TunnelServer<TunnelService> {
        TunnelServer::new(TunnelService)
    }
}

/// A gRPC channel over one reverse tunnel. Use it like a `tonic::transport::Channel`:
/// `BuildletClient::new(host.channel.clone())`. Once the tunnel is lost, every call,
/// including ones in flight, fails with `Unavailable`.
#[derive(Clone, Debug)]
pub struct TunnelChannel {
    inner: SendRequest<Body>,
    lost: CancellationToken,
    host: std::sync::Arc<str>,
}

impl TunnelChannel {
    pub(crate) fn new(inner: SendRequest<Body>, lost: CancellationToken, host: String) -> Self {
        TunnelChannel {
            inner,
            lost,
            host: host.into(),
        }
    }

    /// True once the tunnel is gone for good.
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
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
        let host = self.host.clone();
        self.inner.poll_ready(cx).map_err(|e| unavailable(&host, e))
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let host = self.host.clone();
        if self.lost.is_cancelled() {
            return Box::pin(async move { Err(unavailable(&host, "host disconnected")) });
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
                    Body::new(body.map_err(move |e| unavailable(&host, e)))
                })),
                Err(e) => Err(unavailable(&host, e)),
            }
        })
    }
}
