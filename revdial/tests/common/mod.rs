//! Test harness for revdial: a listener on real TLS over loopback with certificates
//! made per test, dialers as tasks, a small Buildlet service (Exec echoes, GetTar
//! streams N bytes) and a TCP proxy that can freeze or cut connections.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use buildfarm_proto::buildlet::buildlet_server::{Buildlet, BuildletServer};
use buildfarm_proto::buildlet::*;
use buildfarm_proto::revdial::{Challenge, Hello, Verdict, hello};
use buildfarm_tls::{self as tls, CertificateAuthority};
use futures::Stream;
use revdial::{
    Authenticator, Backoff, Credential, DialerConfig, DialerError, HostEvent, HostInfo, Listener,
    ListenerConfig,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::{Request, Response, Status, Streaming};

pub const MASTER: &[u8] = b"test master key";
pub const HOST_TYPE: &str = "linux-amd64";
/// Generous bound for things that should take milliseconds.
pub const SOON: Duration = Duration::from_secs(10);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "revdial=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A running listener behind `revdial::serve`.
pub struct Farm {
    pub ca: CertificateAuthority,
    pub listener: Listener,
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    serve: JoinHandle<()>,
}

impl Farm {
    pub async fn start(cfg: ListenerConfig) -> Farm {
        Farm::start_with(cfg, Authenticator::new(MASTER.to_vec())).await
    }

    pub async fn start_with(cfg: ListenerConfig, auth: Authenticator) -> Farm {
        init_tracing();
        tls::install_crypto_provider();
        let ca = CertificateAuthority::generate("test ca").expect("ca");
        let server = ca
            .issue_server(&["localhost", "127.0.0.1"])
            .expect("server cert");
        let tls_cfg = tls::server_config(&server, None, &[tls::ALPN_REVDIAL]).expect("tls config");
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let listener = Listener::new(auth, cfg);
        let shutdown = CancellationToken::new();
        let serve = tokio::spawn(revdial::serve(
            tcp,
            tls_cfg,
            listener.clone(),
            shutdown.clone(),
        ));
        Farm {
            ca,
            listener,
            addr,
            shutdown,
            serve,
        }
    }

    /// A dialer config aimed at `addr` (the farm, or a proxy in front of it).
    pub fn dialer_config(
        &self,
        addr: SocketAddr,
        host_type: &str,
        hostname: &str,
        credential: Credential,
    ) -> DialerConfig {
        let mut cfg = DialerConfig::new(
            addr.to_string(),
            self.ca.cert_pem(),
            host_type,
            hostname,
            "test-1",
            credential,
        );
        cfg.server_name = Some("localhost".into());
        cfg.backoff = Backoff {
            min: Duration::from_millis(50),
            max: Duration::from_millis(500),
            reset_after: Duration::from_secs(1),
        };
        cfg.keepalive_interval = self.listener.config().keepalive_interval;
        cfg.keepalive_timeout = self.listener.config().keepalive_timeout;
        cfg
    }

    pub fn builder_key(host_type: &str) -> Credential {
        Credential::BuilderKey(revdial::builder_key(MASTER, host_type))
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.serve.await.expect("serve task");
        self.listener.shutdown().await;
    }
}

/// A dialer running as a task.
pub struct Dialer {
    pub task: JoinHandle<Result<(), DialerError>>,
    pub shutdown: CancellationToken,
}

impl Dialer {
    pub fn spawn(cfg: DialerConfig) -> Dialer {
        let shutdown = CancellationToken::new();
        let routes = Routes::new(BuildletServer::new(TestBuildlet));
        let task = tokio::spawn(revdial::run_dialer(cfg, routes, shutdown.clone()));
        Dialer { task, shutdown }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(SOON, self.task)
            .await
            .expect("dialer stops on shutdown")
            .expect("dialer task")
            .expect("dialer result");
    }
}

/// Waits for the next Connected event of `hostname`, skipping others.
pub async fn wait_connected(rx: &mut broadcast::Receiver<HostEvent>, hostname: &str) -> HostInfo {
    tokio::time::timeout(SOON, async {
        loop {
            match rx.recv().await.expect("event stream") {
                HostEvent::Connected(info) if info.hostname == hostname => return info,
                _ => {}
            }
        }
    })
    .await
    .expect("host connects in time")
}

/// Waits up to `within` for the Lost event of `id`; returns its reason.
pub async fn wait_lost(
    rx: &mut broadcast::Receiver<HostEvent>,
    id: revdial::HostId,
    within: Duration,
) -> String {
    tokio::time::timeout(within, async {
        loop {
            match rx.recv().await.expect("event stream") {
                HostEvent::Lost { info, reason } if info.id == id => return reason,
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("host {id} not reported lost within {within:?}"))
}

/// Polls `f` until it is true or `SOON` passes.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + SOON;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Exec: `echo` streams each arg back as stdout then exits 0; `hang` sends one output
/// and never finishes. GetTar: `dir` is a byte count to stream.
#[derive(Clone, Copy)]
pub struct TestBuildlet;

pub const CHUNK: usize = 64 * 1024;

#[tonic::async_trait]
impl Buildlet for TestBuildlet {
    async fn put_tar(
        &self,
        _: Request<Streaming<PutTarRequest>>,
    ) -> Result<Response<PutTarResponse>, Status> {
        Err(Status::unimplemented("test buildlet"))
    }
    async fn put_tar_from_url(
        &self,
        _: Request<PutTarFromUrlRequest>,
    ) -> Result<Response<PutTarResponse>, Status> {
        Err(Status::unimplemented("test buildlet"))
    }
    async fn write_file(
        &self,
        _: Request<WriteFileRequest>,
    ) -> Result<Response<WriteFileResponse>, Status> {
        Err(Status::unimplemented("test buildlet"))
    }

    type ExecStream = BoxStream<ExecEvent>;
    async fn exec(&self, req: Request<ExecRequest>) -> Result<Response<Self::ExecStream>, Status> {
        let req = req.into_inner();
        let out = |data: Vec<u8>| ExecEvent {
            event: Some(exec_event::Event::Output(ExecOutput {
                stream: OutputStream::Stdout as i32,
                data,
            })),
        };
        match req.cmd.as_str() {
            "echo" => {
                let mut events: Vec<Result<ExecEvent, Status>> = req
                    .args
                    .into_iter()
                    .map(|a| Ok(out(a.into_bytes())))
                    .collect();
                events.push(Ok(ExecEvent {
                    event: Some(exec_event::Event::Exit(ExitStatus {
                        code: Some(0),
                        ..Default::default()
                    })),
                }));
                Ok(Response::new(Box::pin(futures::stream::iter(events))))
            }
            "hang" => {
                let first = futures::stream::once(async move { Ok(out(b"started".to_vec())) });
                Ok(Response::new(Box::pin(
                    first.chain(futures::stream::pending()),
                )))
            }
            other => Err(Status::not_found(format!("no command {other:?}"))),
        }
    }

    type GetTarStream = BoxStream<DataChunk>;
    async fn get_tar(
        &self,
        req: Request<GetTarRequest>,
    ) -> Result<Response<Self::GetTarStream>, Status> {
        let total: usize = req
            .into_inner()
            .dir
            .parse()
            .map_err(|_| Status::invalid_argument("dir must be a byte count"))?;
        let chunk = bytes::Bytes::from(vec![0x5a; CHUNK]);
        let s = async_stream::stream! {
            let mut left = total;
            while left > 0 {
                let n = left.min(CHUNK);
                left -= n;
                yield Ok(DataChunk { data: chunk.slice(..n) });
            }
        };
        Ok(Response::new(Box::pin(s)))
    }

    async fn remove(&self, _: Request<RemoveRequest>) -> Result<Response<RemoveResponse>, Status> {
        Err(Status::unimplemented("test buildlet"))
    }

    type ListStream = BoxStream<ListResponse>;
    async fn list(&self, _: Request<ListRequest>) -> Result<Response<Self::ListStream>, Status> {
        Err(Status::unimplemented("test buildlet"))
    }
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Err(Status::unimplemented("test buildlet"))
    }
    async fn workdir(
        &self,
        _: Request<WorkdirRequest>,
    ) -> Result<Response<WorkdirResponse>, Status> {
        Err(Status::unimplemented("test buildlet"))
    }
    async fn halt(&self, _: Request<HaltRequest>) -> Result<Response<HaltResponse>, Status> {
        Err(Status::unimplemented("test buildlet"))
    }

    type ShellStream = BoxStream<ShellOutput>;
    async fn shell(
        &self,
        _: Request<Streaming<ShellInput>>,
    ) -> Result<Response<Self::ShellStream>, Status> {
        Err(Status::unimplemented("test buildlet"))
    }
}

use futures::StreamExt as _;

/// A TCP proxy on loopback. `pause` stops moving bytes without closing anything (a
/// network partition); `cut` closes every current connection (new ones still work).
pub struct Proxy {
    pub addr: SocketAddr,
    paused: watch::Sender<bool>,
    cut: Arc<Mutex<CancellationToken>>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = tcp.local_addr().expect("proxy addr");
        let (paused, paused_rx) = watch::channel(false);
        let cut = Arc::new(Mutex::new(CancellationToken::new()));
        let cut2 = cut.clone();
        let task = tokio::spawn(async move {
            // Dropping the set (when the proxy is dropped) aborts every connection.
            let mut conns = JoinSet::new();
            loop {
                let Ok((down, _)) = tcp.accept().await else {
                    continue;
                };
                let Ok(up) = TcpStream::connect(target).await else {
                    continue;
                };
                let cut = cut2.lock().expect("cut lock").clone();
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                for (r, w) in [
                    (
                        Box::new(dr) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        Box::new(uw) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    ),
                    (Box::new(ur), Box::new(dw)),
                ] {
                    let cut = cut.clone();
                    let paused = paused_rx.clone();
                    conns.spawn(async move {
                        tokio::select! {
                            _ = cut.cancelled() => {}
                            _ = pump(r, w, paused) => {}
                        }
                    });
                }
                while conns.try_join_next().is_some() {}
            }
        });
        Proxy {
            addr,
            paused,
            cut,
            task,
        }
    }

    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    pub fn cut(&self) {
        let mut c = self.cut.lock().expect("cut lock");
        c.cancel();
        *c = CancellationToken::new();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut r: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    mut w: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    mut paused: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if paused.wait_for(|p| !*p).await.is_err() {
            return;
        }
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Bytes read just before a pause are held until resume, like a stalled link.
        if paused.wait_for(|p| !*p).await.is_err() {
            return;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

pub async fn raw_tls(farm: &Farm) -> tokio_rustls::client::TlsStream<TcpStream> {
    let cfg =
        tls::client_config(farm.ca.cert_pem(), None, &[tls::ALPN_REVDIAL]).expect("client cfg");
    let tcp = TcpStream::connect(farm.addr).await.expect("connect");
    tokio_rustls::TlsConnector::from(cfg)
        .connect(tls::server_name("localhost").expect("name"), tcp)
        .await
        .expect("tls connect")
}

/// Reads one handshake frame from a raw stream.
pub async fn read_frame<M: prost::Message + Default>(
    io: &mut (impl tokio::io::AsyncRead + Unpin),
) -> M {
    let mut header = [0u8; 4];
    io.read_exact(&mut header).await.expect("frame header");
    let len = revdial::handshake::frame_len(header).expect("frame length");
    let mut body = vec![0; len];
    io.read_exact(&mut body).await.expect("frame body");
    revdial::handshake::decode_body("test", &body).expect("decode frame")
}

/// A builder-key Hello credential valid for `host_type`/`hostname` under [`MASTER`],
/// as a function of the nonce.
pub fn valid_proof(host_type: &str, hostname: &str) -> impl Fn(&[u8; 32]) -> Hello {
    let key = revdial::handshake::builder_key_bytes(MASTER, host_type);
    let (host_type, hostname) = (host_type.to_owned(), hostname.to_owned());
    move |nonce| {
        hello_with_proof(
            &host_type,
            &hostname,
            revdial::handshake::compute_proof(&key, nonce, &host_type, &hostname).to_vec(),
        )
    }
}

pub fn hello_with_proof(host_type: &str, hostname: &str, proof: Vec<u8>) -> Hello {
    Hello {
        protocol_version: revdial::handshake::PROTOCOL_VERSION,
        host_type: host_type.into(),
        hostname: hostname.into(),
        buildlet_version: "raw-1".into(),
        credential: Some(hello::Credential::BuilderKeyProof(proof)),
        data_token: Vec::new(),
    }
}

/// Runs the dialer's side of the handshake by hand; returns the verdict.
pub async fn raw_handshake(
    io: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin),
    make_hello: &impl Fn(&[u8; 32]) -> Hello,
) -> Verdict {
    let ch: Challenge = read_frame(io).await;
    let nonce = revdial::handshake::validate_challenge(&ch).expect("valid challenge");
    let hello = make_hello(&nonce);
    io.write_all(&revdial::handshake::encode_frame(&hello))
        .await
        .expect("write hello");
    read_frame(io).await
}
