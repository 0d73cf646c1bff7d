//! Data connections: the listener asks a host over its tunnel, the host dials back
//! presenting a one-time token, and the stream reaches the asker; bytes go both ways
//! intact; a host without a handler says so; an unknown token is refused and counted,
//! and never becomes a tunnel.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use rand::{RngCore, SeedableRng};
use revdial::{DataHandler, ListenerConfig, RefusalKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

const HOST_TYPE: &str = "linux-amd64";
const OPEN: Duration = Duration::from_secs(20);

/// Echoes what it reads until the asker closes its side.
fn echo() -> DataHandler {
    Arc::new(|io| {
        Box::pin(async move {
            let (mut r, mut w) = tokio::io::split(io);
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        })
    })
}

async fn dial(farm: &Farm, hostname: &str, data: Option<DataHandler>) -> CancellationToken {
    let cfg = farm.dialer_config(farm.addr, HOST_TYPE, hostname, Farm::builder_key(HOST_TYPE));
    let stop = CancellationToken::new();
    // The dialer adds the Tunnel service itself; nothing else is needed here.
    tokio::spawn(revdial::run_dialer_with_data(
        cfg,
        Routes::default(),
        data,
        stop.clone(),
    ));
    stop
}

fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

#[tokio::test]
async fn data_connections_carry_bytes_both_ways_to_the_asker() {
    let farm = Farm::start(ListenerConfig::default()).await;
    let mut events = farm.listener.registry().subscribe();
    let stop = dial(&farm, "data-1", Some(echo())).await;
    let host = wait_connected(&mut events, "data-1").await;
    let channel = farm.listener.registry().get(host.id).expect("host").channel;

    // Three at once, each with its own bytes: tokens must not cross.
    let sizes = [0usize, 1, 3 << 20];
    let transfers = sizes.iter().enumerate().map(|(i, &n)| {
        let channel = channel.clone();
        async move {
            let io = channel.open_data(OPEN).await.expect("open data connection");
            let (mut r, mut w) = tokio::io::split(io);
            let sent = random(n, i as u64);
            let write = async {
                w.write_all(&sent).await.expect("write");
                w.shutdown().await.expect("shutdown");
            };
            let read = async {
                let mut got = Vec::new();
                r.read_to_end(&mut got).await.expect("read");
                got
            };
            let ((), got) = tokio::join!(write, read);
            assert!(
                got == sent,
                "{n} bytes came back altered ({} bytes)",
                got.len()
            );
        }
    });
    tokio::time::timeout(
        Duration::from_secs(120),
        futures::future::join_all(transfers),
    )
    .await
    .expect("transfers finish");

    // Data connections are not tunnels: still one host, one accepted dial-in.
    let m = farm.listener.metrics();
    assert_eq!(m.connected, 1, "{m:?}");
    assert_eq!(m.accepted_total, 1, "{m:?}");
    assert_eq!(m.refused_sum(), 0, "{m:?}");
    stop.cancel();
    farm.stop().await;
}

#[tokio::test]
async fn a_host_without_a_data_handler_says_so() {
    let farm = Farm::start(ListenerConfig::default()).await;
    let mut events = farm.listener.registry().subscribe();
    let stop = dial(&farm, "plain-1", None).await;
    let host = wait_connected(&mut events, "plain-1").await;
    let channel = farm.listener.registry().get(host.id).expect("host").channel;
    match channel.open_data(OPEN).await {
        Err(s) => assert_eq!(s.code(), tonic::Code::Unimplemented, "{s:?}"),
        Ok(_) => panic!("a host without a handler opened a data connection"),
    }
    // An old-style dialer (plain run_dialer) is the same.
    let cfg = farm.dialer_config(
        farm.addr,
        HOST_TYPE,
        "plain-2",
        Farm::builder_key(HOST_TYPE),
    );
    let d = Dialer::spawn(cfg);
    let host = wait_connected(&mut events, "plain-2").await;
    let channel = farm.listener.registry().get(host.id).expect("host").channel;
    let err = channel.open_data(OPEN).await.err().expect("refused");
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
    d.stop().await;
    stop.cancel();
    farm.stop().await;
}

#[tokio::test]
async fn a_data_connection_with_an_unknown_token_is_refused_and_counted() {
    let farm = Farm::start(ListenerConfig::default()).await;
    let good = valid_proof(HOST_TYPE, "mini-1");
    let mut io = raw_tls(&farm).await;
    let v = raw_handshake(&mut io, &|n: &[u8; 32]| revdial_hello(good(n), [7; 32])).await;
    // Credential refusals tell the peer nothing more; the count says which kind.
    assert!(!v.accepted, "{v:?}");
    let m = farm.listener.metrics();
    assert_eq!(m.refused(RefusalKind::BadCredential), 1, "{m:?}");
    assert_eq!(
        m.connected, 0,
        "an unknown token must not open a tunnel: {m:?}"
    );

    // A token of the wrong length is an invalid Hello.
    let mut io = raw_tls(&farm).await;
    let v = raw_handshake(&mut io, &|n: &[u8; 32]| {
        let mut h = good(n);
        h.data_token = vec![1; 5];
        h
    })
    .await;
    assert!(!v.accepted, "{v:?}");
    assert_eq!(
        farm.listener.metrics().refused(RefusalKind::InvalidHello),
        1
    );
    farm.stop().await;
}

fn revdial_hello(
    mut h: buildfarm_proto::revdial::Hello,
    token: [u8; 32],
) -> buildfarm_proto::revdial::Hello {
    h.data_token = token.to_vec();
    h
}
