//! Bulk data through a tunnel with the farm's HTTP/2 settings (large frames, `Bytes`
//! chunks): random bytes of awkward sizes go up (PutTar) and come back down (GetTar)
//! byte-identical, also when one end advertises HTTP/2's default 16 KiB max frame size
//! (an older peer).

mod common;

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use buildfarm_proto::buildlet::buildlet_client::BuildletClient;
use buildfarm_proto::buildlet::buildlet_server::{Buildlet, BuildletServer};
use buildfarm_proto::buildlet::*;
use bytes::Bytes;
use common::*;
use futures::Stream;
use rand::{RngCore, SeedableRng};
use revdial::{ListenerConfig, TunnelChannel};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::{Request, Response, Status, Streaming};

/// HTTP/2's default (and smallest allowed) max frame size.
const H2_DEFAULT_FRAME: u32 = 16 << 10;
/// Message size of these transfers: larger than any frame size in play, so a message
/// spans frames, and within tonic's default 4 MiB message limit.
const MESSAGE: usize = 1 << 20;
/// Bound on one transfer of 100 MB in a debug build on a loaded machine.
const TRANSFER: Duration = Duration::from_secs(300);

/// PutTar keeps what it is sent; GetTar sends it back in `MESSAGE`-sized messages.
#[derive(Clone, Default)]
struct Store(Arc<Mutex<Bytes>>);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn unimplemented<T>() -> Result<T, Status> {
    Err(Status::unimplemented("bulk test service"))
}

#[tonic::async_trait]
impl Buildlet for Store {
    async fn put_tar(
        &self,
        req: Request<Streaming<PutTarRequest>>,
    ) -> Result<Response<PutTarResponse>, Status> {
        let mut stream = req.into_inner();
        let mut got = Vec::new();
        let mut messages = 0u64;
        while let Some(m) = stream.message().await? {
            match m.msg {
                Some(put_tar_request::Msg::Header(_)) => {}
                Some(put_tar_request::Msg::Data(d)) => got.extend_from_slice(&d),
                None => return Err(Status::invalid_argument("empty message")),
            }
            messages += 1;
        }
        let bytes = got.len() as u64;
        *self.0.lock().expect("store lock") = Bytes::from(got);
        Ok(Response::new(PutTarResponse {
            entries: messages,
            bytes,
        }))
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
        _: Request<GetTarRequest>,
    ) -> Result<Response<Self::GetTarStream>, Status> {
        let all = self.0.lock().expect("store lock").clone();
        let chunks: Vec<_> = (0..all.len().div_ceil(MESSAGE))
            .map(|i| {
                let end = ((i + 1) * MESSAGE).min(all.len());
                Ok(DataChunk {
                    data: all.slice(i * MESSAGE..end),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
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

/// A farm and one dialer serving a [`Store`], with the given max frame sizes.
struct Setup {
    farm: Farm,
    channel: TunnelChannel,
    store: Store,
    stop: CancellationToken,
    dialer: tokio::task::JoinHandle<Result<(), revdial::DialerError>>,
}

impl Setup {
    async fn start(listener_frame: u32, dialer_frame: u32) -> Setup {
        let farm = Farm::start(ListenerConfig {
            max_frame_size: listener_frame,
            ..ListenerConfig::default()
        })
        .await;
        let mut events = farm.listener.registry().subscribe();
        let mut cfg =
            farm.dialer_config(farm.addr, HOST_TYPE, "bulk-1", Farm::builder_key(HOST_TYPE));
        cfg.max_frame_size = dialer_frame;
        let store = Store::default();
        let stop = CancellationToken::new();
        let dialer = tokio::spawn(revdial::run_dialer(
            cfg,
            Routes::new(BuildletServer::new(store.clone())),
            stop.clone(),
        ));
        let info = wait_connected(&mut events, "bulk-1").await;
        let channel = farm
            .listener
            .registry()
            .get(info.id)
            .expect("connected host")
            .channel;
        Setup {
            farm,
            channel,
            store,
            stop,
            dialer,
        }
    }

    /// Sends `data` up in `MESSAGE`-sized messages, checks what the far end stored, and
    /// fetches it back down.
    async fn round_trip(&self, data: &Bytes, what: &str) {
        let mut client = BuildletClient::new(self.channel.clone());
        let header = PutTarRequest {
            msg: Some(put_tar_request::Msg::Header(PutTarHeader {
                dir: String::new(),
            })),
        };
        let chunks: Vec<_> = (0..data.len().div_ceil(MESSAGE))
            .map(|i| PutTarRequest {
                msg: Some(put_tar_request::Msg::Data(
                    data.slice(i * MESSAGE..((i + 1) * MESSAGE).min(data.len())),
                )),
            })
            .collect();
        let n_chunks = chunks.len() as u64;
        let up = futures::stream::iter(std::iter::once(header).chain(chunks));
        let resp = tokio::time::timeout(TRANSFER, client.put_tar(up))
            .await
            .unwrap_or_else(|_| panic!("{what}: upload timed out"))
            .unwrap_or_else(|s| panic!("{what}: upload failed: {s}"))
            .into_inner();
        assert_eq!(resp.bytes, data.len() as u64, "{what}: bytes stored");
        assert_eq!(resp.entries, n_chunks + 1, "{what}: messages received");
        let stored = self.store.0.lock().expect("store lock").clone();
        assert!(stored == *data, "{what}: uploaded bytes differ");

        let down = tokio::time::timeout(TRANSFER, async {
            let mut stream = client
                .get_tar(GetTarRequest { dir: String::new() })
                .await?
                .into_inner();
            let mut got = Vec::with_capacity(data.len());
            while let Some(c) = stream.message().await? {
                got.extend_from_slice(&c.data);
            }
            Ok::<_, Status>(got)
        })
        .await
        .unwrap_or_else(|_| panic!("{what}: download timed out"))
        .unwrap_or_else(|s| panic!("{what}: download failed: {s}"));
        assert_eq!(down.len(), data.len(), "{what}: downloaded length");
        assert!(down == *data, "{what}: downloaded bytes differ");
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(SOON, self.dialer).await;
        self.farm.stop().await;
    }
}

fn random_bytes(rng: &mut rand::rngs::StdRng, n: usize) -> Bytes {
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    Bytes::from(v)
}

/// Sizes around a frame of `frame` bytes: the payloads whose gRPC message (5-byte
/// prefix, field tag, length varint, payload) is one byte under, exactly, and one byte
/// over the frame, and the payloads one under, at and one over it.
fn sizes_around(frame: u32) -> Vec<usize> {
    let f = frame as usize;
    let varint_len = |n: usize| (usize::BITS - n.max(1).leading_zeros()).div_ceil(7) as usize;
    let message = |n: usize| 5 + 1 + varint_len(n) + n;
    let mut v: Vec<usize> = (f - 16..=f + 1)
        .filter(|&n| message(n).abs_diff(f) <= 1 || n.abs_diff(f) <= 1)
        .collect();
    assert_eq!(
        v.len(),
        6,
        "three message sizes and three payload sizes around {f}"
    );
    v.sort_unstable();
    v
}

fn seeded_rng() -> rand::rngs::StdRng {
    let seed = rand::random::<u64>();
    // Printed so that a failure can be replayed.
    eprintln!("random data seed {seed}");
    rand::rngs::StdRng::seed_from_u64(seed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_sizes_round_trip_byte_identical() {
    let s = Setup::start(revdial::h2::MAX_FRAME_SIZE, revdial::h2::MAX_FRAME_SIZE).await;
    let mut rng = seeded_rng();
    let mut sizes = vec![0, 1, 2, 65_535, 65_536, 65_537, 3 * MESSAGE + 7];
    sizes.extend(sizes_around(revdial::h2::MAX_FRAME_SIZE));
    sizes.extend(sizes_around(H2_DEFAULT_FRAME));
    for n in sizes {
        let data = random_bytes(&mut rng, n);
        s.round_trip(&data, &format!("{n} bytes")).await;
    }
    // 100 MB, not a multiple of anything in play.
    let data = random_bytes(&mut rng, 100_000_003);
    s.round_trip(&data, "100 MB").await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialer_with_default_frames_interoperates() {
    // The coordinator must send PutTar in 16 KiB frames to this dialer.
    let s = Setup::start(revdial::h2::MAX_FRAME_SIZE, H2_DEFAULT_FRAME).await;
    let mut rng = seeded_rng();
    let mut sizes = vec![0, 1, 5 * MESSAGE + 3];
    sizes.extend(sizes_around(H2_DEFAULT_FRAME));
    sizes.extend(sizes_around(revdial::h2::MAX_FRAME_SIZE));
    for n in sizes {
        let data = random_bytes(&mut rng, n);
        s.round_trip(&data, &format!("{n} bytes, dialer at 16 KiB frames"))
            .await;
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_with_default_frames_interoperates() {
    // The dialer must send GetTar in 16 KiB frames to this listener.
    let s = Setup::start(H2_DEFAULT_FRAME, revdial::h2::MAX_FRAME_SIZE).await;
    let mut rng = seeded_rng();
    let mut sizes = vec![0, 1, 5 * MESSAGE + 3];
    sizes.extend(sizes_around(H2_DEFAULT_FRAME));
    sizes.extend(sizes_around(revdial::h2::MAX_FRAME_SIZE));
    for n in sizes {
        let data = random_bytes(&mut rng, n);
        s.round_trip(&data, &format!("{n} bytes, listener at 16 KiB frames"))
            .await;
    }
    s.stop().await;
}
