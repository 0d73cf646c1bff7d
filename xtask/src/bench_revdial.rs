//! Benches of reverse tunnels (`revdial`), each against a plain-socket or forward-gRPC
//! reference measured in the same run, all on loopback:
//!
//! - throughput of a server-streaming gRPC call through a tunnel vs writing the same
//!   bytes over raw TCP and over raw TLS (tokio-rustls);
//! - latency of a small unary call (`Tunnel.Ping`) through a tunnel vs a forward gRPC
//!   connection over TLS to the same service;
//! - an idle fleet: N tunnels held by one listener in this process, the dialers in a
//!   child process (this binary again, see [`FLEET_CHILD`]), so memory and CPU are the
//!   listener's alone; the memory reference is N idle raw TLS connections.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use buildfarm_proto::buildlet::buildlet_client::BuildletClient;
use buildfarm_proto::buildlet::buildlet_server::{Buildlet, BuildletServer};
use buildfarm_proto::buildlet::*;
use buildfarm_proto::revdial::PingRequest;
use buildfarm_proto::revdial::tunnel_client::TunnelClient;
use buildfarm_tls::{self as tls, CertificateAuthority};
use buildlet::bulk::Addressee;
use futures::{Stream, StreamExt};
use revdial::{
    Authenticator, Credential, DialerConfig, HostEvent, Listener, ListenerConfig, TunnelService,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::{Request, Response, Status, Streaming};

use buildlet::client::DataOpener;

use super::bench::Figure;

const MASTER: &[u8] = b"bench master key";
const HOST_TYPE: &str = "linux-amd64";
/// Bytes streamed by the throughput bench.
const STREAM_BYTES: usize = 256 << 20;
/// Write and message size: the real buildlet's GetTar chunk.
const CHUNK: usize = 64 << 10;
const PINGS: usize = 1000;
/// Small GetTars per round (each way), and their size: what a dial-back costs.
const SMALL_TRANSFERS: usize = 100;
const SMALL_BYTES: usize = 4096;
/// The bench filter under which `bench-inner` runs as the fleet's dialer process.
pub const FLEET_CHILD: &str = "__revdial_fleet_child";
/// How long the idle fleet is watched.
const IDLE: Duration = Duration::from_secs(10);

pub async fn revdial_benches() -> Result<Vec<Figure>> {
    let mut figures = throughput_and_latency().await?;
    figures.extend(fleet().await?);
    Ok(figures)
}

/// A listener behind `revdial::serve` on loopback, with its own CA.
struct TunnelFarm {
    ca: CertificateAuthority,
    listener: Listener,
    addr: SocketAddr,
    stop: CancellationToken,
}

impl TunnelFarm {
    async fn start(cfg: ListenerConfig) -> Result<TunnelFarm> {
        let ca = CertificateAuthority::generate("bench ca")?;
        let server = ca.issue_server(&["localhost", "127.0.0.1"])?;
        let tls_cfg = tls::server_config(&server, None, &[tls::ALPN_REVDIAL])?;
        let tcp = TcpListener::bind("127.0.0.1:0").await?;
        let addr = tcp.local_addr()?;
        let listener = Listener::new(Authenticator::new(MASTER.to_vec()), cfg);
        let stop = CancellationToken::new();
        tokio::spawn(revdial::serve(tcp, tls_cfg, listener.clone(), stop.clone()));
        Ok(TunnelFarm {
            ca,
            listener,
            addr,
            stop,
        })
    }

    async fn stop(self) {
        self.stop.cancel();
        self.listener.shutdown().await;
    }
}

fn dialer_config(addr: &str, ca_pem: &str, hostname: &str, keepalive: Duration) -> DialerConfig {
    let mut cfg = DialerConfig::new(
        addr,
        ca_pem,
        HOST_TYPE,
        hostname,
        "bench-1",
        Credential::BuilderKey(revdial::builder_key(MASTER, HOST_TYPE)),
    );
    cfg.server_name = Some("localhost".into());
    cfg.keepalive_interval = keepalive;
    cfg
}

fn bench_routes() -> Routes {
    Routes::new(BuildletServer::new(StreamBuildlet))
}

/// Rounds of the stream and call benches; each figure is the median over rounds, and
/// every round measures each path and its baseline back to back (interleaved), so a
/// burst of load from elsewhere on the machine hits both.
const ROUNDS: usize = 3;

/// The far end's runtime: the dialer (a buildlet in production runs in its own
/// process), the forward server and the far end of each raw baseline. Separate from
/// the caller's runtime, as the coordinator and a buildlet are.
struct Remote {
    rt: Option<tokio::runtime::Runtime>,
}

impl Remote {
    fn new() -> Result<Remote> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .thread_name("bench-remote")
            .enable_all()
            .build()
            .context("building the remote runtime")?;
        Ok(Remote { rt: Some(rt) })
    }

    fn handle(&self) -> tokio::runtime::Handle {
        match &self.rt {
            Some(rt) => rt.handle().clone(),
            None => unreachable!("the runtime is only taken on drop"),
        }
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        // Dropping a runtime inside another one's context would panic.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Medians and percentiles of one kind of measurement across rounds.
#[derive(Default)]
struct Samples(Vec<Duration>);

impl Samples {
    fn push(&mut self, d: Duration) {
        self.0.push(d);
    }
    fn pct(&self, p: f64) -> Duration {
        let mut v = self.0.clone();
        v.sort();
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v.get(i).copied().unwrap_or_default()
    }
    fn median(&self) -> Duration {
        self.pct(0.5)
    }
}

/// A tunnel: a listener with `cfg` and one dialer in the remote runtime whose max
/// frame size is `dialer_frame`.
struct OneTunnel {
    farm: TunnelFarm,
    channel: revdial::TunnelChannel,
    stop: CancellationToken,
    dialer: tokio::task::JoinHandle<Result<(), revdial::DialerError>>,
}

impl OneTunnel {
    async fn start(remote: &Remote, cfg: ListenerConfig, dialer_frame: u32) -> Result<OneTunnel> {
        let farm = TunnelFarm::start(cfg).await?;
        let mut events = farm.listener.registry().subscribe();
        let stop = CancellationToken::new();
        let mut dcfg = dialer_config(
            &farm.addr.to_string(),
            farm.ca.cert_pem(),
            "bench-1",
            Duration::from_secs(5),
        );
        dcfg.max_frame_size = dialer_frame;
        // Data connections as a reverse buildlet takes them, served by the bench target.
        let data = buildlet::bulk::handler(Arc::new(StreamBuildlet));
        let dialer = remote.handle().spawn(revdial::run_dialer_with_data(
            dcfg,
            bench_routes(),
            Some(data),
            stop.clone(),
        ));
        let id = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match events.recv().await {
                    Ok(HostEvent::Connected(info)) => return Ok(info.id),
                    Ok(_) => {}
                    Err(e) => bail!("registry events: {e}"),
                }
            }
        })
        .await
        .context("the dialer did not connect within 10 s")??;
        let channel = farm
            .listener
            .registry()
            .get(id)
            .context("host vanished")?
            .channel;
        Ok(OneTunnel {
            farm,
            channel,
            stop,
            dialer,
        })
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.dialer).await;
        self.farm.stop().await;
    }
}

/// HTTP/2's default max frame size, for the A/B figure of the frame size alone.
const H2_DEFAULT_FRAME: u32 = 16 << 10;

async fn throughput_and_latency() -> Result<Vec<Figure>> {
    let remote = Remote::new()?;
    let tunnel = OneTunnel::start(
        &remote,
        ListenerConfig::default(),
        revdial::h2::MAX_FRAME_SIZE,
    )
    .await?;
    let small = OneTunnel::start(
        &remote,
        ListenerConfig {
            max_frame_size: H2_DEFAULT_FRAME,
            ..ListenerConfig::default()
        },
        H2_DEFAULT_FRAME,
    )
    .await?;
    let fwd = ForwardServer::start(&remote).await?;
    let rtt_server = RawTlsPeer::start(&remote).await?;

    // Callers run as tasks on the caller's runtime, as the coordinator's do.
    let (tunnel_ch, fwd_ch) = (tunnel.channel.clone(), fwd.channel.clone());
    let small_ch = small.channel.clone();
    let (tunnel_open, fwd_open) = (tunnel_opener(&tunnel.channel), fwd.open.clone());
    let rtt_stop = rtt_server.stop.clone();
    let h = remote.handle();
    let m = tokio::spawn(async move {
        let mut m = Measured::default();
        for _ in 0..ROUNDS {
            let mut tun = BuildletClient::new(tunnel_ch.clone());
            let mut fw = BuildletClient::new(fwd_ch.clone());
            m.tunnel_down.push(time_get_tar(&mut tun).await?);
            m.tls_down.push(raw_tls_stream(&h, Direction::Down).await?);
            m.data_down.push(time_data_get_tar(&tunnel_open, "").await?);
            m.tunnel_up.push(time_put_tar(&mut tun).await?);
            m.data_up.push(time_data_put_tar(&tunnel_open, "").await?);
            let mut sm = BuildletClient::new(small_ch.clone());
            m.small_down.push(time_get_tar(&mut sm).await?);
            m.small_up.push(time_put_tar(&mut sm).await?);
            m.tls_up.push(raw_tls_stream(&h, Direction::Up).await?);
            m.fwd_down.push(time_get_tar(&mut fw).await?);
            m.fwd_up.push(time_put_tar(&mut fw).await?);
            m.fwd_data_down
                .push(time_data_get_tar(&fwd_open, FORWARD_AUTH).await?);
            m.fwd_data_up
                .push(time_data_put_tar(&fwd_open, FORWARD_AUTH).await?);
            m.tcp_down.push(raw_tcp_stream(&h).await?);
            for _ in 0..SMALL_TRANSFERS {
                let t = Instant::now();
                let io = tunnel_ch.open_data(Duration::from_secs(10)).await?;
                let mut sink = tokio::io::sink();
                buildlet::bulk::get_tar(
                    io,
                    &Addressee::default(),
                    &SMALL_BYTES.to_string(),
                    &mut sink,
                    None,
                )
                .await
                .map_err(|e| anyhow::anyhow!("small bulk get_tar: {e:?}"))?;
                m.small_data.push(t.elapsed());
                let t = Instant::now();
                let req = GetTarRequest {
                    dir: SMALL_BYTES.to_string(),
                };
                let mut chunks = tun.get_tar(req).await?.into_inner();
                while chunks.message().await?.is_some() {}
                m.small_tunnel.push(t.elapsed());
            }
            let mut via_tunnel = TunnelClient::new(tunnel_ch.clone());
            let mut forward = TunnelClient::new(fwd_ch.clone());
            let mut raw = rtt_server.connect().await?;
            for i in 0..PINGS + 50 {
                let t = Instant::now();
                via_tunnel.ping(PingRequest {}).await?;
                let a = t.elapsed();
                let t = Instant::now();
                forward.ping(PingRequest {}).await?;
                let b = t.elapsed();
                let t = Instant::now();
                raw_round_trip(&mut raw).await?;
                let c = t.elapsed();
                // The first calls of a round warm up the connections.
                if i >= 50 {
                    m.ping_tunnel.push(a);
                    m.ping_fwd.push(b);
                    m.rtt_tls.push(c);
                }
            }
        }
        Ok::<_, anyhow::Error>(m)
    })
    .await
    .context("the measuring task panicked")??;

    let mb = STREAM_BYTES as f64 / 1e6;
    let rate = |d: Duration| mb / d.as_secs_f64();
    let stream = |name: &str, got: &Samples, base: &Samples, note: String| Figure {
        name: name.into(),
        measured: rate(got.median()),
        baseline: rate(base.median()),
        unit: "MB/s".into(),
        ratio: base.median().as_secs_f64() / got.median().as_secs_f64(),
        note,
    };
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let latency = |name: &str, got: &Samples, p: f64, note: String| Figure {
        name: name.into(),
        measured: us(got.pct(p)),
        baseline: us(m.rtt_tls.pct(p)),
        unit: "us".into(),
        ratio: m.rtt_tls.pct(p).as_secs_f64() / got.pct(p).as_secs_f64(),
        note,
    };
    let medians = format!("median of {ROUNDS} interleaved rounds");
    let figures = vec![
        stream(
            "revdial_data_stream_vs_tls",
            &m.data_down,
            &m.tls_down,
            format!(
                "{mb:.0} MB GetTar of a reverse buildlet as the farm moves it: on a data connection the dialer dials back (dial-back included); baseline: raw tokio-rustls, writer in the same other runtime; {medians}; goal >= 0.95"
            ),
        ),
        stream(
            "revdial_data_stream_up_vs_tls",
            &m.data_up,
            &m.tls_up,
            format!(
                "{mb:.0} MB PutTar on a data connection (dial-back included); baseline: raw tokio-rustls the same way; {medians}; goal >= 0.95"
            ),
        ),
        Figure {
            name: "revdial_small_get_tar_data_vs_tunnel".into(),
            measured: us(m.small_data.median()),
            baseline: us(m.small_tunnel.median()),
            unit: "us".into(),
            ratio: m.small_tunnel.median().as_secs_f64() / m.small_data.median().as_secs_f64(),
            note: format!(
                "p50 of {} {SMALL_BYTES}-byte GetTars on a data connection (dial-back: TCP, TLS and revdial handshakes; p99 {:.0} us); baseline: p50 of the same through the tunnel (p99 {:.0} us); on loopback: a WAN adds about 3 round trips to the data path",
                m.small_data.0.len(),
                us(m.small_data.pct(0.99)),
                us(m.small_tunnel.pct(0.99)),
            ),
        },
        stream(
            "revdial_stream_vs_tls",
            &m.tunnel_down,
            &m.tls_down,
            format!(
                "{mb:.0} MB GetTar through the tunnel's HTTP/2 (the path of a buildlet that takes no data connections); baseline: raw tokio-rustls; {medians}"
            ),
        ),
        stream(
            "revdial_stream_up_vs_tls",
            &m.tunnel_up,
            &m.tls_up,
            format!(
                "{mb:.0} MB PutTar through the tunnel's HTTP/2; baseline: raw tokio-rustls the same way; {medians}"
            ),
        ),
        stream(
            "revdial_stream_frames_16k",
            &m.small_down,
            &m.tls_down,
            format!(
                "the same GetTar through a tunnel whose ends advertise HTTP/2's default 16 KiB frames (A/B of the frame size); {medians}"
            ),
        ),
        stream(
            "revdial_stream_up_frames_16k",
            &m.small_up,
            &m.tls_up,
            format!("the same PutTar with 16 KiB frames both ways; {medians}"),
        ),
        stream(
            "revdial_stream_vs_tcp",
            &m.tunnel_down,
            &m.tcp_down,
            format!("{mb:.0} MB GetTar; baseline: raw TCP write of 64 KiB chunks; {medians}"),
        ),
        stream(
            "forward_data_stream_vs_tls",
            &m.fwd_data_down,
            &m.tls_down,
            format!(
                "{mb:.0} MB GetTar of a listen-mode buildlet as the farm moves it: on a bulk connection to its port (connect and TLS included); baseline: raw tokio-rustls; {medians}; goal >= 0.95"
            ),
        ),
        stream(
            "forward_data_stream_up_vs_tls",
            &m.fwd_data_up,
            &m.tls_up,
            format!(
                "{mb:.0} MB PutTar on a bulk connection to a listen-mode port; baseline: raw tokio-rustls; {medians}; goal >= 0.95"
            ),
        ),
        stream(
            "forward_stream_vs_tls",
            &m.fwd_down,
            &m.tls_down,
            format!(
                "{mb:.0} MB GetTar over forward gRPC/TLS (the listen-mode path of a buildlet that takes no bulk connections); baseline: raw tokio-rustls; {medians}"
            ),
        ),
        stream(
            "forward_stream_up_vs_tls",
            &m.fwd_up,
            &m.tls_up,
            format!(
                "{mb:.0} MB PutTar over forward gRPC/TLS; baseline: raw tokio-rustls; {medians}"
            ),
        ),
        stream(
            "revdial_stream_vs_grpc",
            &m.tunnel_down,
            &m.fwd_down,
            format!("{mb:.0} MB GetTar; baseline: the same over forward gRPC/TLS; {medians}"),
        ),
        latency(
            "revdial_ping_p50",
            &m.ping_tunnel,
            0.5,
            format!(
                "p50 of {} unary Tunnel.Ping through a tunnel; baseline: p50 of a raw TLS {RTT_BYTES}-byte request/response round trip; goal ratio >= 0.67 (<= 1.5x)",
                m.ping_tunnel.0.len()
            ),
        ),
        latency(
            "revdial_ping_p99",
            &m.ping_tunnel,
            0.99,
            "p99 of the same; baseline: p99 of the raw TLS round trip".into(),
        ),
        latency(
            "forward_ping_p50",
            &m.ping_fwd,
            0.5,
            "p50 of Tunnel.Ping over forward gRPC/TLS; baseline: raw TLS round trip p50; goal ratio >= 0.67".into(),
        ),
        latency(
            "forward_ping_p99",
            &m.ping_fwd,
            0.99,
            "p99 of the same; baseline: raw TLS round trip p99".into(),
        ),
    ];
    fwd.stop.cancel();
    rtt_stop.cancel();
    tunnel.stop().await;
    small.stop().await;
    drop(remote);
    Ok(figures)
}

#[derive(Default)]
struct Measured {
    fwd_data_down: Samples,
    fwd_data_up: Samples,
    small_data: Samples,
    small_tunnel: Samples,
    data_down: Samples,
    data_up: Samples,
    tunnel_down: Samples,
    small_down: Samples,
    small_up: Samples,
    tunnel_up: Samples,
    fwd_down: Samples,
    fwd_up: Samples,
    tls_down: Samples,
    tls_up: Samples,
    tcp_down: Samples,
    ping_tunnel: Samples,
    ping_fwd: Samples,
    rtt_tls: Samples,
}

async fn time_get_tar<C>(client: &mut BuildletClient<C>) -> Result<Duration>
where
    C: tonic::client::GrpcService<tonic::body::Body>,
    C::Error: Into<tonic::codegen::StdError>,
    C::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <C::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let t = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(300), async {
        let mut stream = client
            .get_tar(GetTarRequest {
                dir: STREAM_BYTES.to_string(),
            })
            .await?
            .into_inner();
        let mut got = 0usize;
        while let Some(chunk) = stream.message().await? {
            got += chunk.data.len();
        }
        Ok::<_, Status>(got)
    })
    .await
    .context("GetTar stream took over 300 s")??;
    let elapsed = t.elapsed();
    if got != STREAM_BYTES {
        bail!("GetTar stream delivered {got} of {STREAM_BYTES} bytes");
    }
    Ok(elapsed)
}

async fn time_put_tar<C>(client: &mut BuildletClient<C>) -> Result<Duration>
where
    C: tonic::client::GrpcService<tonic::body::Body>,
    C::Error: Into<tonic::codegen::StdError>,
    C::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <C::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let header = PutTarRequest {
        msg: Some(put_tar_request::Msg::Header(PutTarHeader {
            dir: String::new(),
        })),
    };
    let data = chunks(STREAM_BYTES).map(|c| PutTarRequest {
        msg: Some(put_tar_request::Msg::Data(c)),
    });
    let t = Instant::now();
    let resp = tokio::time::timeout(
        Duration::from_secs(300),
        client.put_tar(futures::stream::once(async { header }).chain(data)),
    )
    .await
    .context("PutTar stream took over 300 s")??
    .into_inner();
    let elapsed = t.elapsed();
    if resp.bytes != STREAM_BYTES as u64 {
        bail!(
            "PutTar stream delivered {} of {STREAM_BYTES} bytes",
            resp.bytes
        );
    }
    Ok(elapsed)
}

/// Opens a reverse buildlet's data connections as the coordinator does.
fn tunnel_opener(channel: &revdial::TunnelChannel) -> DataOpener {
    let channel = channel.clone();
    Arc::new(move || {
        let channel = channel.clone();
        Box::pin(async move { channel.open_data(Duration::from_secs(10)).await })
    })
}

/// A GetTar as the farm runs it on a data connection (a reverse buildlet's dialled
/// back, or one to a listen-mode port); timed from asking for the connection to the
/// last byte.
async fn time_data_get_tar(open: &DataOpener, authorization: &str) -> Result<Duration> {
    let t = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(300), async {
        let io = open().await?;
        let mut sink = tokio::io::sink();
        buildlet::bulk::get_tar(
            io,
            &Addressee::bearer(authorization),
            &STREAM_BYTES.to_string(),
            &mut sink,
            None,
        )
        .await
        .map_err(|e| anyhow::anyhow!("bulk get_tar: {e:?}"))
    })
    .await
    .context("GetTar on a data connection took over 300 s")??;
    let elapsed = t.elapsed();
    if got != STREAM_BYTES as u64 {
        bail!("GetTar on a data connection delivered {got} of {STREAM_BYTES} bytes");
    }
    Ok(elapsed)
}

/// A PutTar on a data connection, the chunks the same shared buffer as the gRPC one's.
async fn time_data_put_tar(open: &DataOpener, authorization: &str) -> Result<Duration> {
    let data = chunks(STREAM_BYTES).map(Ok);
    let t = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(300), async {
        let io = open().await?;
        buildlet::bulk::put_tar(io, &Addressee::bearer(authorization), "", data)
            .await
            .map_err(|e| anyhow::anyhow!("bulk put_tar: {e:?}"))
    })
    .await
    .context("PutTar on a data connection took over 300 s")??;
    let elapsed = t.elapsed();
    if resp.bytes != STREAM_BYTES as u64 {
        bail!(
            "PutTar on a data connection delivered {} of {STREAM_BYTES} bytes",
            resp.bytes
        );
    }
    Ok(elapsed)
}

async fn write_all_chunks(w: &mut (impl tokio::io::AsyncWrite + Unpin)) -> std::io::Result<()> {
    let chunk = vec![0x5a_u8; CHUNK];
    let mut left = STREAM_BYTES;
    while left > 0 {
        let n = left.min(CHUNK);
        w.write_all(&chunk[..n]).await?;
        left -= n;
    }
    w.shutdown().await
}

async fn read_count(r: &mut (impl tokio::io::AsyncRead + Unpin)) -> Result<usize> {
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0;
    // Bounded: the writer sends exactly STREAM_BYTES, and the caller has a timeout.
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(got);
        }
        got += n;
    }
}

/// Raw TCP: the remote end writes, this end reads; timed from the first byte asked for
/// (after connecting) to the last received.
async fn raw_tcp_stream(remote: &tokio::runtime::Handle) -> Result<Duration> {
    let tcp = TcpListener::bind("127.0.0.1:0").await?;
    let addr = tcp.local_addr()?;
    let writer = remote.spawn(async move {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let mut s = s;
        write_all_chunks(&mut s).await
    });
    let (mut s, _) = tcp.accept().await?;
    s.set_nodelay(true)?;
    let t = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(300), read_count(&mut s))
        .await
        .context("raw tcp stream took over 300 s")??;
    let elapsed = t.elapsed();
    writer.await??;
    if got != STREAM_BYTES {
        bail!("raw tcp delivered {got} of {STREAM_BYTES} bytes");
    }
    Ok(elapsed)
}

/// Which way bytes flow, seen from the caller (the coordinator): down is from the far
/// end (GetTar), up is to it (PutTar).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Down,
    Up,
}

/// Raw TLS between the two runtimes: the remote end dials (as a dialer does), then
/// bytes flow `dir`; timed after the handshake, until the reader has the last byte.
async fn raw_tls_stream(remote: &tokio::runtime::Handle, dir: Direction) -> Result<Duration> {
    let ca = CertificateAuthority::generate("bench raw tls")?;
    let server = ca.issue_server(&["localhost"])?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(&server, None, &[])?);
    let connector = tokio_rustls::TlsConnector::from(tls::client_config(ca.cert_pem(), None, &[])?);
    let tcp = TcpListener::bind("127.0.0.1:0").await?;
    let addr = tcp.local_addr()?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let far = remote.spawn(async move {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let mut s = connector.connect(tls::server_name("localhost")?, s).await?;
        // Wait until the near end has started its clock.
        let _ = ready_rx.await;
        match dir {
            Direction::Down => {
                write_all_chunks(&mut s).await?;
                // Drain until the reader closes: closing with unread bytes (the
                // server's session tickets) would reset the connection under it.
                let _ = read_count(&mut s).await;
                Ok(STREAM_BYTES)
            }
            Direction::Up => read_count(&mut s).await,
        }
    });
    let (s, _) = tcp.accept().await?;
    s.set_nodelay(true)?;
    let mut s = acceptor.accept(s).await?;
    let t = Instant::now();
    let _ = ready_tx.send(());
    let got = tokio::time::timeout(Duration::from_secs(300), async {
        match dir {
            Direction::Down => {
                let got = read_count(&mut s).await;
                let _ = s.shutdown().await;
                got
            }
            Direction::Up => {
                write_all_chunks(&mut s).await?;
                far.await.context("raw tls reader panicked")?
            }
        }
    })
    .await
    .context("raw tls stream took over 300 s")??;
    let elapsed = t.elapsed();
    if got != STREAM_BYTES {
        bail!("raw tls delivered {got} of {STREAM_BYTES} bytes");
    }
    Ok(elapsed)
}

/// A loopback listener not yet tied to a runtime, for the remote one to take.
fn bind_std() -> Result<(std::net::TcpListener, SocketAddr)> {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
    tcp.set_nonblocking(true)?;
    let addr = tcp.local_addr()?;
    Ok((tcp, addr))
}

/// Bytes each way of the raw TLS round trip: about what a small unary gRPC call puts
/// on the wire (HEADERS, DATA and trailers after HPACK).
const RTT_BYTES: usize = 64;

/// A raw TLS echo in the remote runtime: reads [`RTT_BYTES`], answers as many.
struct RawTlsPeer {
    addr: SocketAddr,
    connector: tokio_rustls::TlsConnector,
    stop: CancellationToken,
}

impl RawTlsPeer {
    async fn start(remote: &Remote) -> Result<RawTlsPeer> {
        let ca = CertificateAuthority::generate("bench rtt")?;
        let server = ca.issue_server(&["localhost"])?;
        let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(&server, None, &[])?);
        let connector =
            tokio_rustls::TlsConnector::from(tls::client_config(ca.cert_pem(), None, &[])?);
        let (tcp, addr) = bind_std()?;
        let stop = CancellationToken::new();
        let h = remote.handle();
        let h2 = h.clone();
        let token = stop.clone();
        h.spawn(async move {
            let Ok(tcp) = TcpListener::from_std(tcp) else {
                return;
            };
            loop {
                let (s, _) = tokio::select! {
                    _ = token.cancelled() => return,
                    r = tcp.accept() => match r { Ok(x) => x, Err(_) => return },
                };
                let acceptor = acceptor.clone();
                let token = token.clone();
                h2.spawn(async move {
                    let _ = s.set_nodelay(true);
                    let Ok(mut s) = acceptor.accept(s).await else {
                        return;
                    };
                    let mut buf = [0u8; RTT_BYTES];
                    loop {
                        tokio::select! {
                            _ = token.cancelled() => return,
                            r = s.read_exact(&mut buf) => if r.is_err() { return },
                        }
                        if s.write_all(&buf).await.is_err() || s.flush().await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(RawTlsPeer {
            addr,
            connector,
            stop,
        })
    }

    async fn connect(&self) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let s = TcpStream::connect(self.addr).await?;
        s.set_nodelay(true)?;
        Ok(self
            .connector
            .connect(tls::server_name("localhost")?, s)
            .await?)
    }
}

async fn raw_round_trip(s: &mut tokio_rustls::client::TlsStream<TcpStream>) -> Result<()> {
    let mut buf = [0x5a_u8; RTT_BYTES];
    s.write_all(&buf).await?;
    s.flush().await?;
    s.read_exact(&mut buf).await?;
    Ok(())
}

/// The bench service served forward: a TLS gRPC server (the buildlet's own accept
/// loop) and a channel to it.
struct ForwardServer {
    channel: tonic::transport::Channel,
    /// Bulk connections to the same port (ALPN `buildfarm-bulk/1`).
    open: DataOpener,
    stop: CancellationToken,
}

/// The bearer credential of the forward server's bulk connections.
const FORWARD_KEY: &str = "bench-key";
const FORWARD_AUTH: &str = "Bearer bench-key";

impl ForwardServer {
    async fn start(remote: &Remote) -> Result<ForwardServer> {
        let ca = CertificateAuthority::generate("bench forward")?;
        let server = ca.issue_server(&["localhost"])?;
        let server_tls = tls::server_config(&server, None, &[tls::ALPN_H2, tls::ALPN_BULK])?;
        let (tcp, addr) = bind_std()?;
        let stop = CancellationToken::new();
        let routes = bench_routes().add_service(TunnelService::server());
        let token = stop.clone();
        remote.handle().spawn(async move {
            // Registered with the remote runtime's reactor, not the caller's.
            let Ok(tcp) = TcpListener::from_std(tcp) else {
                return;
            };
            let bulk = buildlet::server::ListenBulk {
                target: Arc::new(StreamBuildlet),
                policy: buildlet::auth::AuthPolicy::new(Some(FORWARD_KEY)),
            };
            buildlet::server::serve_tls(tcp, server_tls, routes, Some(bulk), token).await
        });
        let channel = revdial::h2::connect_channel(
            &addr.to_string(),
            tls::server_name("localhost")?,
            tls::client_config(ca.cert_pem(), None, &[tls::ALPN_H2])?,
            Duration::from_secs(10),
        )
        .await?;
        let open = buildlet::client::listen_data_opener(
            addr.to_string(),
            tls::server_name("localhost")?,
            tls::client_config(ca.cert_pem(), None, &[tls::ALPN_BULK])?,
            Duration::from_secs(10),
        );
        Ok(ForwardServer {
            channel,
            open,
            stop,
        })
    }
}

// ---- the idle fleet ----

fn fleet_size() -> Result<usize> {
    match std::env::var("BUILDFARM_BENCH_FLEET") {
        Ok(s) => {
            let n: usize = s
                .parse()
                .with_context(|| format!("BUILDFARM_BENCH_FLEET={s:?} is not a count"))?;
            if !(1..=15_000).contains(&n) {
                bail!("BUILDFARM_BENCH_FLEET must be in 1..=15000 (file descriptors)");
            }
            Ok(n)
        }
        Err(_) => Ok(1000),
    }
}

/// Raises the soft open-file limit to the hard one.
pub(super) fn raise_nofile() -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a valid, owned struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            bail!("setrlimit: {}", std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

fn rss_kib() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/self/status")
}

/// User plus system CPU time of this process.
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct we own.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU time of another process from /proc/<pid>/stat (utime + stime).
pub(super) fn child_cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the ")" that ends the command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_millis(ticks * 1000 / hz))
}

fn trim_heap() {
    // SAFETY: malloc_trim only returns free memory to the OS.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Resident memory of another process, from /proc/<pid>/status.
pub(super) fn proc_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in the child's status")
}

fn signal_child(pid: u32, sig: libc::c_int) -> Result<()> {
    let pid = libc::pid_t::try_from(pid).context("child pid")?;
    // SAFETY: kill has no memory preconditions; pid is our own child.
    if unsafe { libc::kill(pid, sig) } != 0 {
        bail!("kill({pid}, {sig}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The fleet child's first line: its RSS before it dials.
async fn child_start_rss(child: &mut tokio::process::Child) -> Result<u64> {
    use tokio::io::AsyncBufReadExt;
    let out = child.stdout.take().context("fleet child stdout")?;
    let mut lines = tokio::io::BufReader::new(out).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("fleet child said nothing for 30 s")??
        .context("fleet child exited")?;
    line.strip_prefix("rss_kib ")
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("fleet child's first line {line:?}"))
}

/// Spawns this binary as the fleet's dialer process.
fn spawn_fleet_child(
    mode: &str,
    addr: SocketAddr,
    ca_pem: &str,
    n: usize,
) -> Result<tokio::process::Child> {
    let exe = std::env::current_exe()?;
    tokio::process::Command::new(exe)
        .arg("bench-inner")
        .arg(FLEET_CHILD)
        .env("BENCH_FLEET_MODE", mode)
        .env("BENCH_FLEET_ADDR", addr.to_string())
        .env("BENCH_FLEET_CA", ca_pem)
        .env("BENCH_FLEET_N", n.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawning the fleet's dialer process")
}

/// Waits until `count()` reaches `n`, bounded by `within`.
async fn wait_count(
    what: &str,
    n: usize,
    within: Duration,
    count: impl Fn() -> usize,
) -> Result<Duration> {
    let start = Instant::now();
    while count() < n {
        if start.elapsed() > within {
            bail!("only {} of {n} {what} after {within:?}", count());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(start.elapsed())
}

async fn fleet() -> Result<Vec<Figure>> {
    let n = fleet_size()?;
    let limit = raise_nofile()?;
    if limit < n as u64 + 256 {
        bail!("open-file limit {limit} is too low for a fleet of {n}");
    }
    let connect_bound = Duration::from_secs(60) + Duration::from_millis(20) * n as u32;

    // Reference: n idle raw TLS connections held by this process.
    let raw_kib_per_conn = {
        let ca = CertificateAuthority::generate("bench fleet raw")?;
        let server = ca.issue_server(&["localhost", "127.0.0.1"])?;
        let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(&server, None, &[])?);
        let tcp = TcpListener::bind("127.0.0.1:0").await?;
        let addr = tcp.local_addr()?;
        let held = Arc::new(std::sync::Mutex::new(Vec::with_capacity(n)));
        let count = Arc::new(AtomicUsize::new(0));
        trim_heap();
        let before = rss_kib()?;
        let accept = {
            let (held, count) = (held.clone(), count.clone());
            tokio::spawn(async move {
                let mut handshakes = tokio::task::JoinSet::new();
                // Bounded: one accept per expected connection (plus failures).
                for _ in 0..n * 2 {
                    let Ok((s, _)) = tcp.accept().await else {
                        continue;
                    };
                    let acceptor = acceptor.clone();
                    let (held, count) = (held.clone(), count.clone());
                    handshakes.spawn(async move {
                        if let Ok(Ok(tls)) =
                            tokio::time::timeout(Duration::from_secs(30), acceptor.accept(s)).await
                        {
                            held.lock().unwrap_or_else(|e| e.into_inner()).push(tls);
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                    while handshakes.try_join_next().is_some() {}
                }
            })
        };
        let child = spawn_fleet_child("tls", addr, ca.cert_pem(), n)?;
        wait_count("raw tls connections", n, connect_bound, || {
            count.load(Ordering::Relaxed)
        })
        .await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = rss_kib()?;
        accept.abort();
        drop(child);
        held.lock().unwrap_or_else(|e| e.into_inner()).clear();
        after.saturating_sub(before) as f64 / n as f64
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The fleet: n tunnels with the production keep-alive and ping intervals.
    let cfg = ListenerConfig::default();
    let (keepalive, cfg_timeout, ping) = (
        cfg.keepalive_interval,
        cfg.keepalive_timeout,
        cfg.ping_interval,
    );
    let farm = TunnelFarm::start(cfg).await?;
    trim_heap();
    let before = rss_kib()?;
    let mut child = spawn_fleet_child("tunnel", farm.addr, farm.ca.cert_pem(), n)?;
    let child_before = child_start_rss(&mut child).await?;
    let registry = farm.listener.registry();
    let took = wait_count("tunnels", n, connect_bound, || registry.len()).await?;
    // Let the connect burst's buffers settle before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib()?;
    let pid = child.id().context("fleet child pid")?;
    let child_after = proc_rss_kib(pid)?;
    let (cpu0, child0, t0) = (cpu_time(), child_cpu_time(pid), Instant::now());
    tokio::time::sleep(IDLE).await;
    let (cpu1, child1, wall) = (cpu_time(), child_cpu_time(pid), t0.elapsed());
    let still = registry.len();
    let lost = farm.listener.metrics().lost_total;
    let cpu_pct = (cpu1 - cpu0).as_secs_f64() / wall.as_secs_f64() * 100.0;
    let child_pct = match (child0, child1) {
        (Some(a), Some(b)) => format!("{:.2}%", (b - a).as_secs_f64() / wall.as_secs_f64() * 100.0),
        _ => "?".into(),
    };
    let kib_per_conn = after.saturating_sub(before) as f64 / n as f64;
    let child_kib_per_conn = child_after.saturating_sub(child_before) as f64 / n as f64;

    // Loss detection: freeze the dialer process (its sockets stay open, nothing is
    // answered, like a partition) and time until the listener has lost every tunnel.
    let bound = keepalive + cfg_timeout;
    let stopped = Instant::now();
    signal_child(pid, libc::SIGSTOP)?;
    let lost_all = wait_count(
        "lost tunnels",
        n,
        bound * 3 + Duration::from_secs(30),
        || n - registry.len().min(n),
    )
    .await;
    let detect = stopped.elapsed();
    signal_child(pid, libc::SIGCONT)?;
    lost_all?;
    if let Some(stdin) = child.stdin.take() {
        drop(stdin);
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    drop(child);
    farm.stop().await;

    // Budget, not a measurement: 1% of one core per 1,000 idle hosts.
    let cpu_budget = n as f64 / 1000.0;
    Ok(vec![
        Figure {
            name: "revdial_fleet_rss_per_conn".into(),
            measured: kib_per_conn,
            baseline: raw_kib_per_conn,
            unit: "KiB/conn".into(),
            ratio: raw_kib_per_conn / kib_per_conn.max(0.001),
            note: format!(
                "listener side only (dialers in a child process), {n} tunnels connected in {:.1} s; baseline: {n} idle raw TLS conns held",
                took.as_secs_f64()
            ),
        },
        Figure {
            name: "revdial_fleet_dialer_rss_per_conn".into(),
            measured: child_kib_per_conn,
            baseline: raw_kib_per_conn,
            unit: "KiB/conn".into(),
            ratio: raw_kib_per_conn / child_kib_per_conn.max(0.001),
            note: format!(
                "dialer side: the {n} dialers' process; baseline: the listener's {n} idle raw TLS conns"
            ),
        },
        Figure {
            name: "revdial_fleet_loss_detect".into(),
            measured: detect.as_secs_f64(),
            baseline: bound.as_secs_f64(),
            unit: "s".into(),
            ratio: bound.as_secs_f64() / detect.as_secs_f64().max(0.001),
            note: format!(
                "dialer process frozen (SIGSTOP): until all {n} tunnels are lost; baseline: keep-alive interval + timeout, the bound"
            ),
        },
        Figure {
            name: "revdial_fleet_idle_cpu".into(),
            measured: cpu_pct,
            baseline: cpu_budget,
            unit: "% core".into(),
            ratio: cpu_budget / cpu_pct.max(0.001),
            note: format!(
                "listener over {}s idle, {n} tunnels, h2 keepalive {keepalive:?}, Tunnel.Ping every {ping:?}; {still} still up, {lost} lost; dialer process {child_pct}; baseline is a budget (1%/1000 hosts)",
                IDLE.as_secs()
            ),
        },
    ])
}

/// The fleet's dialer process: `BENCH_FLEET_N` dialers (mode `tunnel`) or raw TLS
/// connections (mode `tls`) to `BENCH_FLEET_ADDR`, held until stdin closes (at most
/// 15 minutes).
pub fn fleet_child() -> Result<()> {
    let var = |k: &str| std::env::var(k).with_context(|| format!("{k} not set"));
    let mode = var("BENCH_FLEET_MODE")?;
    let addr = var("BENCH_FLEET_ADDR")?;
    let ca_pem = var("BENCH_FLEET_CA")?;
    let n: usize = var("BENCH_FLEET_N")?.parse().context("BENCH_FLEET_N")?;
    raise_nofile()?;
    buildfarm_tls::install_crypto_provider();
    let rt = tokio::runtime::Runtime::new()?;
    // The parent reads this line to know the dialer process's memory before the fleet.
    trim_heap();
    println!("rss_kib {}", rss_kib()?);
    rt.block_on(async move {
        let stop = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        let client_tls = tls::client_config(&ca_pem, None, &[])?;
        let defaults = ListenerConfig::default();
        for i in 0..n {
            if mode == "tunnel" {
                let cfg = dialer_config(
                    &addr,
                    &ca_pem,
                    &format!("host-{i:05}"),
                    defaults.keepalive_interval,
                );
                let stop = stop.clone();
                tasks.spawn(async move {
                    revdial::run_dialer(cfg, bench_routes(), stop)
                        .await
                        .map_err(anyhow::Error::from)
                });
            } else {
                let (connector, addr, stop) = (
                    tokio_rustls::TlsConnector::from(client_tls.clone()),
                    addr.clone(),
                    stop.clone(),
                );
                tasks.spawn(async move {
                    // A few tries: the listener's backlog can overflow in the burst.
                    for _ in 0..5 {
                        let conn = async {
                            let s = TcpStream::connect(&addr).await?;
                            connector
                                .connect(tls::server_name("localhost")?, s)
                                .await
                                .map_err(anyhow::Error::from)
                        };
                        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(30), conn).await
                        {
                            stop.cancelled().await;
                            drop(s);
                            return Ok(());
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    bail!("raw tls connection failed 5 times")
                });
            }
            // Stagger the burst a little: 100 connections per 20 ms.
            if i % 100 == 99 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 16];
        let _ = tokio::time::timeout(Duration::from_secs(900), async {
            // Bounded: ends at EOF or error, and by the timeout.
            while let Ok(k) = stdin.read(&mut buf).await {
                if k == 0 {
                    break;
                }
            }
        })
        .await;
        stop.cancel();
        tasks.abort_all();
        Ok::<_, anyhow::Error>(())
    })
}

// ---- the bench service ----

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// GetTar streams `dir` (a byte count) of filler bytes in 64 KiB messages; PutTar
/// counts what it is sent; everything else is unimplemented.
#[derive(Clone, Copy)]
struct StreamBuildlet;

/// `total` bytes as the benches move them: slices of one shared 64 KiB buffer, so no
/// side pays a copy the other does not.
fn chunks(total: usize) -> impl Stream<Item = tonic::codegen::Bytes> + Send + 'static {
    let chunk = tonic::codegen::Bytes::from(vec![0x5a_u8; CHUNK]);
    futures::stream::iter(
        (0..total.div_ceil(CHUNK)).map(move |i| chunk.slice(..(total - i * CHUNK).min(CHUNK))),
    )
}

/// The byte count a bench GetTar asks for, in its `dir`.
fn requested_bytes(dir: &str) -> Result<usize, Status> {
    dir.parse()
        .map_err(|_| Status::invalid_argument("dir must be a byte count"))
}

/// The same source and sink on a data connection.
#[tonic::async_trait]
impl buildlet::bulk::BulkTarget for StreamBuildlet {
    async fn get_tar(
        &self,
        dir: String,
    ) -> Result<futures::stream::BoxStream<'static, Result<tonic::codegen::Bytes, Status>>, Status>
    {
        Ok(chunks(requested_bytes(&dir)?).map(Ok).boxed())
    }

    async fn put_tar(
        &self,
        _dir: String,
        mut data: futures::stream::BoxStream<'static, std::io::Result<tonic::codegen::Bytes>>,
    ) -> Result<PutTarResponse, Status> {
        let mut bytes = 0u64;
        while let Some(chunk) = data.next().await {
            bytes += chunk.map_err(|e| Status::cancelled(e.to_string()))?.len() as u64;
        }
        Ok(PutTarResponse { entries: 0, bytes })
    }
}

fn unimplemented<T>() -> Result<T, Status> {
    Err(Status::unimplemented("bench service"))
}

#[tonic::async_trait]
impl Buildlet for StreamBuildlet {
    /// Counts the data bytes it is sent and drops them.
    async fn put_tar(
        &self,
        req: Request<Streaming<PutTarRequest>>,
    ) -> Result<Response<PutTarResponse>, Status> {
        let mut stream = req.into_inner();
        let mut bytes = 0u64;
        while let Some(m) = stream.message().await? {
            if let Some(put_tar_request::Msg::Data(d)) = m.msg {
                bytes += d.len() as u64;
            }
        }
        Ok(Response::new(PutTarResponse { entries: 0, bytes }))
    }
    async fn put_tar_from_url(
        &self,
        _: Request<PutTarFromUrlRequest>,
    ) -> Result<Response<PutTarResponse>, Status> {
        unimplemented()
    }
    async fn write_file(
        &self,
        _: Request<WriteFileRequest>,
    ) -> Result<Response<WriteFileResponse>, Status> {
        unimplemented()
    }

    type ExecStream = BoxStream<ExecEvent>;
    async fn exec(&self, _: Request<ExecRequest>) -> Result<Response<Self::ExecStream>, Status> {
        unimplemented()
    }

    type GetTarStream = BoxStream<DataChunk>;
    async fn get_tar(
        &self,
        req: Request<GetTarRequest>,
    ) -> Result<Response<Self::GetTarStream>, Status> {
        let total = requested_bytes(&req.into_inner().dir)?;
        let s = chunks(total).map(|data| Ok(DataChunk { data }));
        Ok(Response::new(Box::pin(s)))
    }

    async fn remove(&self, _: Request<RemoveRequest>) -> Result<Response<RemoveResponse>, Status> {
        unimplemented()
    }

    type ListStream = BoxStream<ListResponse>;
    async fn list(&self, _: Request<ListRequest>) -> Result<Response<Self::ListStream>, Status> {
        unimplemented()
    }
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        unimplemented()
    }
    async fn workdir(
        &self,
        _: Request<WorkdirRequest>,
    ) -> Result<Response<WorkdirResponse>, Status> {
        unimplemented()
    }
    async fn halt(&self, _: Request<HaltRequest>) -> Result<Response<HaltResponse>, Status> {
        unimplemented()
    }

    type ShellStream = BoxStream<ShellOutput>;
    async fn shell(
        &self,
        _: Request<Streaming<ShellInput>>,
    ) -> Result<Response<Self::ShellStream>, Status> {
        unimplemented()
    }
}
