//! Dial-ins that must be refused, over real TLS on loopback: each is counted by kind,
//! told why, and leaves no registry entry; a refused real dialer keeps retrying.

mod common;

use std::time::Duration;

use buildfarm_proto::revdial::{Challenge, Hello, Verdict};
use common::*;
use revdial::{Authenticator, Credential, ListenerConfig, RefusalKind};
use tokio::io::AsyncWriteExt;

/// Runs a real dialer with `credential` until the listener has refused it at least
/// twice (so it retried), then checks nothing got in.
async fn refused_dialer(farm: &Farm, host_type: &str, credential: Credential) {
    let before = farm.listener.metrics().refused(RefusalKind::BadCredential);
    let dialer = Dialer::spawn(farm.dialer_config(farm.addr, host_type, "mini-1", credential));
    eventually("the dialer is refused twice", || {
        farm.listener.metrics().refused(RefusalKind::BadCredential) >= before + 2
    })
    .await;
    assert!(
        !dialer.task.is_finished(),
        "a refused dialer keeps retrying"
    );
    assert!(farm.listener.registry().is_empty());
    assert_eq!(farm.listener.metrics().accepted_total, 0);
    dialer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_builder_key_is_refused() {
    let farm = Farm::start(ListenerConfig::default()).await;
    let wrong = Credential::BuilderKey(revdial::builder_key(b"another master", HOST_TYPE));
    refused_dialer(&farm, HOST_TYPE, wrong).await;
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_of_another_host_type_is_refused() {
    let farm = Farm::start(ListenerConfig::default()).await;
    refused_dialer(&farm, HOST_TYPE, Farm::builder_key("linux-arm64")).await;
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_tokens_are_checked() {
    let auth = Authenticator::tokens_only()
        .with_token("tok-1", HOST_TYPE, "right secret")
        .with_token("tok-arm", "linux-arm64", "arm secret");
    let farm = Farm::start_with(ListenerConfig::default(), auth).await;
    let token = |id: &str, secret: &str| Credential::HostToken {
        id: id.into(),
        secret: secret.into(),
    };
    refused_dialer(&farm, HOST_TYPE, token("tok-1", "wrong secret")).await;
    refused_dialer(&farm, HOST_TYPE, token("tok-unknown", "right secret")).await;
    refused_dialer(&farm, HOST_TYPE, token("tok-arm", "arm secret")).await;
    // Builder keys are not accepted by a tokens-only listener.
    refused_dialer(&farm, HOST_TYPE, Farm::builder_key(HOST_TYPE)).await;

    let mut events = farm.listener.registry().subscribe();
    let dialer = Dialer::spawn(farm.dialer_config(
        farm.addr,
        HOST_TYPE,
        "mini-1",
        token("tok-1", "right secret"),
    ));
    wait_connected(&mut events, "mini-1").await;
    assert_eq!(farm.listener.metrics().accepted_total, 1);
    dialer.stop().await;
    farm.stop().await;
}

/// Sends `bytes` after reading the challenge; returns the verdict if one came.
async fn send_raw(farm: &Farm, bytes: &[u8]) -> Option<Verdict> {
    let mut io = raw_tls(farm).await;
    let _: Challenge = read_frame(&mut io).await;
    io.write_all(bytes).await.expect("write");
    let mut header = [0u8; 4];
    match tokio::time::timeout(
        SOON,
        tokio::io::AsyncReadExt::read_exact(&mut io, &mut header),
    )
    .await
    .expect("listener answers or closes in time")
    {
        Ok(_) => {
            let len = revdial::handshake::frame_len(header).expect("frame len");
            let mut body = vec![0; len];
            tokio::io::AsyncReadExt::read_exact(&mut io, &mut body)
                .await
                .expect("verdict body");
            Some(revdial::handshake::decode_body("verdict", &body).expect("verdict"))
        }
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_frames_are_refused() {
    let farm = Farm::start(ListenerConfig::default()).await;
    // A frame whose body is not a protobuf message.
    let v = send_raw(&farm, &[0, 0, 0, 3, 0x0f, 0xff, 0xff])
        .await
        .expect("verdict");
    assert!(!v.accepted);
    assert!(v.reason.contains("decoding hello"), "{}", v.reason);
    // A length far over the limit: refused from the header, nothing allocated.
    let v = send_raw(&farm, &[0xff, 0xff, 0xff, 0xff])
        .await
        .expect("verdict");
    assert!(!v.accepted);
    assert!(v.reason.contains("exceeds the limit"), "{}", v.reason);
    let m = farm.listener.metrics();
    assert_eq!(m.refused(RefusalKind::Malformed), 2, "{m:?}");
    assert_eq!(m.accepted_total, 0);
    assert!(farm.listener.registry().is_empty());
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_hellos_are_refused() {
    let farm = Farm::start(ListenerConfig::default()).await;
    let good = valid_proof(HOST_TYPE, "mini-1");

    let mut io = raw_tls(&farm).await;
    let v = raw_handshake(&mut io, &|n: &[u8; 32]| Hello {
        protocol_version: 2,
        ..good(n)
    })
    .await;
    assert!(!v.accepted);
    assert!(v.reason.contains("version 2"), "{}", v.reason);

    let mut io = raw_tls(&farm).await;
    let v = raw_handshake(&mut io, &|n: &[u8; 32]| Hello {
        hostname: "evil/../host".into(),
        ..good(n)
    })
    .await;
    assert!(!v.accepted);
    assert!(v.reason.contains("hostname"), "{}", v.reason);

    let m = farm.listener.metrics();
    assert_eq!(m.refused(RefusalKind::UnsupportedVersion), 1, "{m:?}");
    assert_eq!(m.refused(RefusalKind::InvalidHello), 1, "{m:?}");
    assert!(farm.listener.registry().is_empty());
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_hello_is_refused_and_does_not_displace_the_host() {
    let farm = Farm::start(ListenerConfig::default()).await;
    let registry = farm.listener.registry();
    let mut events = registry.subscribe();

    // Capture a genuine Hello from an accepted connection...
    let captured = std::sync::Mutex::new(None);
    let good = valid_proof(HOST_TYPE, "mini-1");
    let mut io = raw_tls(&farm).await;
    let v = raw_handshake(&mut io, &|n: &[u8; 32]| {
        let h = good(n);
        *captured.lock().unwrap() = Some(h.clone());
        h
    })
    .await;
    assert!(v.accepted);
    let original = wait_connected(&mut events, "mini-1").await;
    let captured = captured.lock().unwrap().clone().unwrap();

    // ...and replay it on a new connection, where the nonce differs.
    let mut replay = raw_tls(&farm).await;
    let v = raw_handshake(&mut replay, &|_: &[u8; 32]| captured.clone()).await;
    assert!(!v.accepted);
    assert!(v.reason.contains("invalid credential"), "{}", v.reason);

    let m = farm.listener.metrics();
    assert_eq!(m.refused(RefusalKind::BadCredential), 1, "{m:?}");
    assert_eq!(m.accepted_total, 1);
    let ids: Vec<_> = registry.list().into_iter().map(|h| h.id).collect();
    assert_eq!(
        ids,
        [original.id],
        "the replay must not replace the real host"
    );
    drop(io);
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_times_out() {
    let farm = Farm::start(ListenerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..ListenerConfig::default()
    })
    .await;
    let mut io = raw_tls(&farm).await;
    let _: Challenge = read_frame(&mut io).await;
    // Send nothing: the listener gives up and says so.
    let v: Verdict = tokio::time::timeout(SOON, read_frame(&mut io))
        .await
        .expect("verdict in time");
    assert!(!v.accepted);
    assert!(v.reason.contains("not finished"), "{}", v.reason);
    assert_eq!(farm.listener.metrics().refused(RefusalKind::Timeout), 1);
    farm.stop().await;
}
