//! Reverse tunnels end to end over real TLS on loopback: dial-in, calls through the
//! reversed connection, concurrency, a big transfer beside small calls, and liveness
//! (a killed dialer, a frozen peer, a host that comes back).

mod common;

use std::time::Duration;

use buildfarm_proto::buildlet::buildlet_client::BuildletClient;
use buildfarm_proto::buildlet::{ExecRequest, GetTarRequest, exec_event};
use buildfarm_proto::revdial::PingRequest;
use buildfarm_proto::revdial::tunnel_client::TunnelClient;
use common::*;
use revdial::{ListenerConfig, RefusalKind, TunnelChannel};
use tokio::time::Instant;

fn exec(cmd: &str, args: &[&str]) -> ExecRequest {
    ExecRequest {
        cmd: cmd.into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Runs `echo` and returns what came back.
async fn echo(channel: TunnelChannel, args: &[&str]) -> Result<Vec<String>, tonic::Status> {
    let mut stream = BuildletClient::new(channel)
        .exec(exec("echo", args))
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(ev) = stream.message().await? {
        match ev.event {
            Some(exec_event::Event::Output(o)) => out.push(String::from_utf8(o.data).unwrap()),
            Some(exec_event::Event::Exit(e)) => assert_eq!(e.code, Some(0)),
            None => panic!("empty event"),
        }
    }
    Ok(out)
}

fn fast_liveness() -> ListenerConfig {
    ListenerConfig {
        keepalive_interval: Duration::from_secs(1),
        keepalive_timeout: Duration::from_secs(1),
        ping_interval: Duration::from_millis(200),
        ..ListenerConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_in_is_registered_and_calls_work() {
    let farm = Farm::start(fast_liveness()).await;
    let mut events = farm.listener.registry().subscribe();
    let dialer = Dialer::spawn(farm.dialer_config(
        farm.addr,
        HOST_TYPE,
        "mini-1",
        Farm::builder_key(HOST_TYPE),
    ));
    let info = wait_connected(&mut events, "mini-1").await;
    assert_eq!(info.host_type, HOST_TYPE);
    assert_eq!(info.version, "test-1");
    assert!(info.peer.ip().is_loopback(), "{}", info.peer);

    let registry = farm.listener.registry();
    let listed: Vec<_> = registry
        .list()
        .into_iter()
        .map(|h| revdial::HostInfo {
            last_ping_rtt: None,
            ..h
        })
        .collect();
    assert_eq!(
        listed,
        vec![revdial::HostInfo {
            last_ping_rtt: None,
            ..info.clone()
        }]
    );
    let host = registry.get(info.id).expect("registered");
    assert!(!host.lost.is_cancelled());
    assert_eq!(
        registry.find(HOST_TYPE, "mini-1").map(|h| h.info.id),
        Some(info.id)
    );

    assert_eq!(
        echo(host.channel.clone(), &["hello", "world"])
            .await
            .unwrap(),
        ["hello", "world"]
    );
    TunnelClient::new(host.channel.clone())
        .ping(PingRequest {})
        .await
        .expect("ping through the tunnel");
    // A remote error is passed through as is, not turned into Unavailable.
    let err = BuildletClient::new(host.channel.clone())
        .status(buildfarm_proto::buildlet::StatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);

    eventually("a ping rtt is recorded", || {
        registry
            .get(info.id)
            .is_some_and(|h| h.info.last_ping_rtt.is_some())
    })
    .await;
    let m = farm.listener.metrics();
    assert_eq!(m.accepted_total, 1);
    assert_eq!(m.refused_sum(), 0);
    assert_eq!(m.connected, 1);

    // A clean dialer shutdown is reported as a loss too.
    dialer.stop().await;
    let reason = wait_lost(&mut events, info.id, SOON).await;
    assert!(!reason.is_empty());
    assert!(registry.is_empty());
    assert!(host.lost.is_cancelled());
    let err = echo(host.channel, &["x"]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_calls_share_one_tunnel() {
    let farm = Farm::start(ListenerConfig::default()).await;
    let mut events = farm.listener.registry().subscribe();
    let dialer = Dialer::spawn(farm.dialer_config(
        farm.addr,
        HOST_TYPE,
        "mini-1",
        Farm::builder_key(HOST_TYPE),
    ));
    let info = wait_connected(&mut events, "mini-1").await;
    let channel = farm.listener.registry().get(info.id).unwrap().channel;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..50 {
        let channel = channel.clone();
        calls.spawn(async move {
            let args = [format!("call-{i}"), "x".repeat(i * 100)];
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let got = echo(channel, &args).await.expect("call");
            assert_eq!(got, args);
        });
    }
    let done = tokio::time::timeout(SOON, async {
        let mut n = 0;
        while let Some(r) = calls.join_next().await {
            r.expect("call task");
            n += 1;
        }
        n
    })
    .await
    .expect("calls finish");
    assert_eq!(done, 50);
    assert_eq!(farm.listener.metrics().accepted_total, 1, "one connection");
    dialer.stop().await;
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_transfer_does_not_starve_small_calls() {
    const TOTAL: usize = 100 * 1024 * 1024;
    let farm = Farm::start(ListenerConfig::default()).await;
    let mut events = farm.listener.registry().subscribe();
    let dialer = Dialer::spawn(farm.dialer_config(
        farm.addr,
        HOST_TYPE,
        "mini-1",
        Farm::builder_key(HOST_TYPE),
    ));
    let info = wait_connected(&mut events, "mini-1").await;
    let channel = farm.listener.registry().get(info.id).unwrap().channel;

    let transfer = {
        let channel = channel.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut stream = BuildletClient::new(channel)
                .get_tar(GetTarRequest {
                    dir: TOTAL.to_string(),
                })
                .await
                .expect("get_tar")
                .into_inner();
            let mut got = 0usize;
            while let Some(chunk) = stream.message().await.expect("chunk") {
                got += chunk.data.len();
            }
            (got, started.elapsed())
        })
    };
    let mut ping = TunnelClient::new(channel);
    let mut worst = Duration::ZERO;
    let mut pings = 0;
    while !transfer.is_finished() {
        let start = Instant::now();
        ping.ping(PingRequest {}).await.expect("small call");
        // How long each took is for the bench to judge; here it is enough that several
        // answered while the transfer was still running.
        worst = worst.max(start.elapsed());
        pings += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (got, took) = transfer.await.expect("transfer task");
    assert_eq!(got, TOTAL);
    assert!(
        pings >= 3,
        "only {pings} small calls ran during the transfer ({took:?})"
    );
    eprintln!("100 MB in {took:?}; {pings} pings, slowest {worst:?}");
    dialer.stop().await;
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_dialer_fails_in_flight_calls_and_comes_back() {
    let cfg = ListenerConfig {
        keepalive_interval: Duration::from_secs(2),
        keepalive_timeout: Duration::from_secs(2),
        ..ListenerConfig::default()
    };
    let margin = Duration::from_secs(3);
    let liveness = cfg.keepalive_interval + cfg.keepalive_timeout + margin;
    let farm = Farm::start(cfg).await;
    let proxy = Proxy::start(farm.addr).await;
    let registry = farm.listener.registry();
    let mut events = registry.subscribe();
    let dcfg = farm.dialer_config(
        proxy.addr,
        HOST_TYPE,
        "mini-1",
        Farm::builder_key(HOST_TYPE),
    );
    let dialer = Dialer::spawn(dcfg.clone());
    let info = wait_connected(&mut events, "mini-1").await;
    let host = registry.get(info.id).unwrap();

    let mut hanging = BuildletClient::new(host.channel.clone())
        .exec(exec("hang", &[]))
        .await
        .expect("start call")
        .into_inner();
    let first = hanging.message().await.expect("first event");
    assert!(first.is_some());

    // Kill the dialer: its task and its TCP connection.
    dialer.task.abort();
    proxy.cut();
    let killed = Instant::now();
    let err = tokio::time::timeout(liveness, hanging.message())
        .await
        .expect("in-flight call fails in time")
        .expect_err("in-flight call must fail");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    let reason = wait_lost(&mut events, info.id, liveness).await;
    eprintln!("lost after {:?}: {reason}", killed.elapsed());
    assert!(host.lost.is_cancelled());
    assert!(registry.get(info.id).is_none());
    let m = farm.listener.metrics();
    assert_eq!((m.lost_total, m.connected), (1, 0));

    // The host comes back: a new id, the same identity, calls work again.
    let dialer = Dialer::spawn(dcfg);
    let again = wait_connected(&mut events, "mini-1").await;
    assert_ne!(again.id, info.id);
    assert_eq!(registry.list().len(), 1);
    let channel = registry.get(again.id).unwrap().channel;
    assert_eq!(echo(channel, &["back"]).await.unwrap(), ["back"]);
    dialer.stop().await;
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_peer_is_detected_by_keepalive_and_redials_after_thaw() {
    let cfg = ListenerConfig {
        keepalive_interval: Duration::from_secs(1),
        keepalive_timeout: Duration::from_secs(1),
        // Leave detection to HTTP/2 keep-alive alone.
        ping_interval: Duration::from_secs(3600),
        ..ListenerConfig::default()
    };
    let liveness = cfg.keepalive_interval + cfg.keepalive_timeout + Duration::from_secs(4);
    let farm = Farm::start(cfg).await;
    let proxy = Proxy::start(farm.addr).await;
    let registry = farm.listener.registry();
    let mut events = registry.subscribe();
    let dialer = Dialer::spawn(farm.dialer_config(
        proxy.addr,
        HOST_TYPE,
        "mini-1",
        Farm::builder_key(HOST_TYPE),
    ));
    let info = wait_connected(&mut events, "mini-1").await;
    let host = registry.get(info.id).unwrap();
    let mut hanging = BuildletClient::new(host.channel.clone())
        .exec(exec("hang", &[]))
        .await
        .expect("start call")
        .into_inner();
    assert!(hanging.message().await.expect("first event").is_some());

    proxy.pause();
    let frozen = Instant::now();
    let reason = wait_lost(&mut events, info.id, liveness).await;
    eprintln!("frozen peer lost after {:?}: {reason}", frozen.elapsed());
    let err = tokio::time::timeout(SOON, hanging.message())
        .await
        .expect("in-flight call ends")
        .expect_err("in-flight call must fail");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");

    // After the partition heals the dialer (whose own keep-alive gave up too) is back.
    proxy.resume();
    let again = wait_connected(&mut events, "mini-1").await;
    let channel = registry.get(again.id).unwrap().channel;
    assert_eq!(echo(channel, &["thawed"]).await.unwrap(), ["thawed"]);
    assert_eq!(
        farm.listener.metrics().refused(RefusalKind::BadCredential),
        0
    );
    dialer.stop().await;
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_replaces_the_old_entry() {
    let farm = Farm::start(ListenerConfig::default()).await;
    let registry = farm.listener.registry();
    let mut events = registry.subscribe();
    // The old connection: a valid handshake whose peer then goes quiet, like a host
    // that rebooted before its old connection timed out.
    let mut old = raw_tls(&farm).await;
    let verdict = raw_handshake(&mut old, &valid_proof(HOST_TYPE, "mini-1")).await;
    assert!(verdict.accepted, "{}", verdict.reason);
    let a = wait_connected(&mut events, "mini-1").await;

    let dialer = Dialer::spawn(farm.dialer_config(
        farm.addr,
        HOST_TYPE,
        "mini-1",
        Farm::builder_key(HOST_TYPE),
    ));
    let reason = wait_lost(&mut events, a.id, SOON).await;
    assert!(reason.contains("replaced"), "{reason}");
    let b = wait_connected(&mut events, "mini-1").await;
    assert_ne!(a.id, b.id);
    assert_eq!(registry.list().len(), 1);
    let channel = registry.get(b.id).unwrap().channel;
    assert_eq!(echo(channel, &["new"]).await.unwrap(), ["new"]);
    // The old connection was closed by the listener.
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(SOON, async {
        loop {
            match tokio::io::AsyncReadExt::read(&mut old, &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "old connection still open");
    dialer.stop().await;
    farm.stop().await;
}
