//! HTTP/2 settings shared by every gRPC connection of the farm (tunnels both ways, the
//! buildlet's listen mode, the coordinator's port and the forward clients), so that
//! bulk transfers cost the same whichever path they take.
//!
//! Why these values: a GetTar or PutTar chunk is a 64 KiB message. With HTTP/2's
//! default 16 KiB max frame size each one leaves as five DATA frames, each handed
//! between tasks and written on its own; a frame size above one message lets a chunk
//! travel as one frame (rustls still cuts it into 16 KiB records). The max frame size is
//! what a peer *accepts*: each end advertises it, and a peer that advertises less is
//! sent frames of its size (HTTP/2 requires that), so old peers keep working. Fixed
//! windows, not hyper's adaptive one: measured faster on loopback and as fast on a
//! long link, since the per-stream window already covers 4 MiB in flight.

/// Largest DATA frame we accept. 256 KiB: four 64 KiB chunks; the read buffer of a
/// connection grows to one frame only while a transfer runs.
pub const MAX_FRAME_SIZE: u32 = 256 << 10;
/// Flow-control window per stream.
pub const STREAM_WINDOW: u32 = 4 << 20;
/// Flow-control window per connection; larger than a stream's, so one big transfer
/// cannot starve small calls on the same connection.
pub const CONNECTION_WINDOW: u32 = 16 << 20;

/// Opens a gRPC channel to `addr` (`host:port`) over TLS with `config` (which should
/// offer ALPN h2). The connector dials afresh whenever tonic reconnects. Used by every
/// forward gRPC client of the farm: the buildlet client and `gomote`.
pub async fn connect_channel(
    addr: &str,
    server_name: rustls::pki_types::ServerName<'static>,
    config: std::sync::Arc<rustls::ClientConfig>,
    connect_timeout: std::time::Duration,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(std::time::Duration::from_secs(20))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .tcp_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(config);
    let addr = addr.to_owned();
    let connect = tower::service_fn(move |_: tonic::transport::Uri| {
        let (connector, server_name, addr) = (connector.clone(), server_name.clone(), addr.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(&addr).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    endpoint.connect_with_connector(connect).await
}
