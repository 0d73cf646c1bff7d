//! The EC2 pool through the real `aws-sdk-ec2` against a real moto server on loopback.
//! Moto starts no machine: `cloud::moto::Hosts` boots a local process for every instance
//! moto reports running, from its user-data, at its private address (the test VPC is in
//! 127.0.0.0/8, so nothing leaves this host). Every test ends by describing all instances
//! and asserting none is left pending or running.

mod cloud;

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_ec2::types::{InstanceAttributeName, Tag};
use buildfarm_config::Ec2Pool as Ec2Config;
use buildlet::client::ExecSpec;
use cloud::moto::{self, FaultProxy, Hosts, Moto};
use cloud::{TestProvision, WAIT, eventually};
use coordinator::pool::ec2::{Ec2Pool, Ec2PoolOptions, Ec2Timing};
use coordinator::pool::reconcile::labels;
use coordinator::pool::{Lease, Pool, PoolError};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const OWNER: &str = "bf-test-owner";
const HOST_TYPE: &str = "linux-amd64-ec2";
const PORT: u16 = 18444;

fn timing() -> Ec2Timing {
    Ec2Timing {
        poll: Duration::from_millis(100),
        sweep: Duration::from_millis(300),
        retry_base: Duration::from_millis(20),
        retry_max: Duration::from_millis(100),
        retry_attempts: 4,
    }
}

struct Setup {
    moto: Moto,
    ec2: aws_sdk_ec2::Client,
    hosts: Hosts,
    subnet: moto::LoopbackSubnet,
    ami: String,
    provision: Arc<TestProvision>,
    shutdowns: Vec<CancellationToken>,
}

impl Setup {
    async fn new() -> Setup {
        buildfarm_tls::install_crypto_provider();
        let moto = Moto::start().await;
        let ec2 = moto::client(&moto.url);
        let subnet = moto::loopback_subnet(&ec2).await;
        let ami = moto::some_ami(&ec2).await;
        let hosts = Hosts::start(ec2.clone());
        Setup {
            moto,
            ec2,
            hosts,
            subnet,
            ami,
            provision: TestProvision::new(),
            shutdowns: Vec::new(),
        }
    }

    fn config(&self, max_instances: u32, vcpu_quota: u32) -> Ec2Config {
        serde_json::from_value(json!({
            "ami": self.ami,
            "instance_type": "c5.large",
            "region": "us-east-1",
            "endpoint_url": self.moto.url,
            "max_instances": max_instances,
            "vcpu_quota": vcpu_quota,
            "subnet_id": self.subnet.id,
            "buildlet_port": PORT,
            "start_timeout": "90s",
            "coordinator_url": "https://coordinator.test:8119",
        }))
        .expect("config")
    }

    /// A pool as a coordinator process would make it; `endpoint` defaults to moto.
    fn pool(&mut self, config: Ec2Config, endpoint: Option<&str>) -> Arc<Ec2Pool> {
        let shutdown = CancellationToken::new();
        self.shutdowns.push(shutdown.clone());
        let client = match endpoint {
            Some(url) => moto::client(url),
            None => self.ec2.clone(),
        };
        Arc::new(Ec2Pool::new(
            Ec2PoolOptions {
                host_type: HOST_TYPE.into(),
                config,
                owner: OWNER.into(),
                client,
                provision: self.provision.clone(),
                timing: timing(),
            },
            TaskTracker::new(),
            shutdown,
        ))
    }

    /// No instance is pending or running, and no machine process is left.
    async fn assert_none_left(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let live = moto::live_instances(&self.ec2).await;
            if live.is_empty() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "instances left running: {live:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eventually("every machine process is gone", || {
            self.hosts.machines.running().is_empty()
        })
        .await;
    }
}

impl Setup {
    /// Stops the sweepers of the pools made so far: one coordinator runs one pool per
    /// host type, and a second pool with the same owner would sweep the first one's
    /// instances as orphans (as a restarted coordinator should).
    fn stop_pools(&self) {
        for s in &self.shutdowns {
            s.cancel();
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        for s in &self.shutdowns {
            s.cancel();
        }
    }
}

async fn echo(lease: &Lease, word: &str) -> String {
    let mut out = Vec::new();
    let status = lease
        .client
        .exec_collect(ExecSpec::new("echo").args([word]), |_, d| {
            out.extend_from_slice(d)
        })
        .await
        .expect("exec");
    assert!(status.success(), "{status:?}");
    String::from_utf8_lossy(&out).trim().to_owned()
}

fn tag<'a>(tags: &'a [Tag], key: &str) -> Option<&'a str> {
    tags.iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_run_release_launches_tags_and_terminates_one_instance() {
    let mut s = Setup::new().await;
    let pool = s.pool(s.config(3, 64), None);
    let lease = tokio::time::timeout(WAIT, pool.acquire(&CancellationToken::new()))
        .await
        .expect("acquire in time")
        .expect("acquire");
    assert_eq!(echo(&lease, "hello-from-ec2").await, "hello-from-ec2");
    assert_eq!(pool.status().in_use, 1);

    let out = s.ec2.describe_instances().send().await.expect("describe");
    let instances: Vec<_> = out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .collect();
    assert_eq!(instances.len(), 1);
    let i = instances[0];
    let id = i.instance_id().expect("id").to_owned();
    assert_eq!(i.instance_type().map(|t| t.as_str()), Some("c5.large"));
    assert_eq!(i.image_id(), Some(s.ami.as_str()));
    assert_eq!(i.subnet_id(), Some(s.subnet.id.as_str()));
    let tags = i.tags();
    let machine = tag(tags, labels::MACHINE).expect("machine tag");
    assert_eq!(lease.name, format!("ec2/{machine}"));
    assert_eq!(tag(tags, "Name"), Some(machine));
    assert_eq!(tag(tags, labels::OWNER), Some(OWNER));
    assert_eq!(tag(tags, labels::HOST_TYPE), Some(HOST_TYPE));
    let deadline: u64 = tag(tags, labels::DEADLINE)
        .expect("deadline tag")
        .parse()
        .expect("number");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    assert!(deadline > now + 5 * 3600 && deadline <= now + 6 * 3600 + 60);
    let user_data = s
        .ec2
        .describe_instance_attribute()
        .instance_id(&id)
        .attribute(InstanceAttributeName::UserData)
        .send()
        .await
        .expect("user data");
    assert!(
        user_data.user_data().and_then(|u| u.value()).is_some(),
        "the boot script is the user-data"
    );

    drop(lease);
    s.assert_none_left().await;
    eventually("the slot is free again", || pool.status().in_use == 0).await;
    let all = moto::all_instances(&s.ec2).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].0, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vcpu_quota_is_never_exceeded() {
    let mut s = Setup::new().await;
    // c5.large has 2 vCPUs (asked from DescribeInstanceTypes): 4 vCPUs hold 2 instances.
    let pool = s.pool(s.config(5, 4), None);
    let a = pool.acquire(&CancellationToken::new()).await.expect("a");
    assert_eq!(pool.capacity(), 2, "capacity follows the quota");
    let b = pool.acquire(&CancellationToken::new()).await.expect("b");
    let third_cancel = CancellationToken::new();
    let p = pool.clone();
    let c = third_cancel.clone();
    let third = tokio::spawn(async move { p.acquire(&c).await });
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(moto::live_instances(&s.ec2).await.len(), 2);
        assert!(!third.is_finished(), "a third instance beyond the quota");
    }
    third_cancel.cancel();
    let third = third.await.expect("join");
    assert!(matches!(third, Err(PoolError::Cancelled)), "{third:?}");
    assert_eq!(echo(&a, "a").await, "a");
    drop((a, b));
    s.assert_none_left().await;

    // An instance bigger than the whole quota is refused without asking EC2.
    s.stop_pools();
    let small = s.pool(s.config(5, 1), None);
    let err = small
        .acquire(&CancellationToken::new())
        .await
        .expect_err("refused");
    match err {
        PoolError::Start { message, .. } => {
            assert!(message.contains("needs 2 vCPUs"), "{message}");
            assert!(message.contains("vcpu_quota of 1"), "{message}");
        }
        other => panic!("expected a start error, got {other:?}"),
    }
    assert_eq!(
        moto::all_instances(&s.ec2).await.len(),
        2,
        "no new instance"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_coordinator_crash_the_next_one_sweeps_the_instances_it_left() {
    let mut s = Setup::new().await;
    let first = s.pool(s.config(2, 64), None);
    let lease = first
        .acquire(&CancellationToken::new())
        .await
        .expect("acquire");
    assert_eq!(echo(&lease, "x").await, "x");
    // An instance of another coordinator in the same account: not ours to touch.
    let other = s
        .ec2
        .run_instances()
        .image_id(&s.ami)
        .min_count(1)
        .max_count(1)
        .tag_specifications(
            aws_sdk_ec2::types::TagSpecification::builder()
                .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
                .tags(Tag::builder().key(labels::OWNER).value("bf-other").build())
                .tags(
                    Tag::builder()
                        .key(labels::HOST_TYPE)
                        .value(HOST_TYPE)
                        .build(),
                )
                .tags(Tag::builder().key(labels::DEADLINE).value("1").build())
                .build(),
        )
        .send()
        .await
        .expect("other coordinator's instance");
    let other_id = other.instances()[0].instance_id().expect("id").to_owned();

    // Crash: the process is gone without releasing anything.
    s.shutdowns[0].cancel();
    std::mem::forget(lease);
    drop(first);
    assert_eq!(moto::live_instances(&s.ec2).await.len(), 2);

    // The next coordinator, same owner, sweeps at start.
    let _second = s.pool(s.config(2, 64), None);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let live = moto::live_instances(&s.ec2).await;
        if live == [other_id.clone()] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "left instance not swept: {live:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.ec2
        .terminate_instances()
        .instance_ids(&other_id)
        .send()
        .await
        .expect("terminate the other instance");
    s.assert_none_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leased_instance_that_stops_cancels_lost() {
    let mut s = Setup::new().await;
    let pool = s.pool(s.config(1, 64), None);
    let lease = pool
        .acquire(&CancellationToken::new())
        .await
        .expect("acquire");
    let live = moto::live_instances(&s.ec2).await;
    assert_eq!(live.len(), 1);
    // Someone stops it (or EC2 retires the host): the lease loses it.
    s.ec2
        .stop_instances()
        .instance_ids(&live[0])
        .send()
        .await
        .expect("stop");
    tokio::time::timeout(WAIT, lease.lost.cancelled())
        .await
        .expect("lost cancelled");
    drop(lease);
    // The stopped instance is terminated, not left behind.
    eventually_terminated(&s, &live[0]).await;
    s.assert_none_left().await;
}

async fn eventually_terminated(s: &Setup, id: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let all = moto::all_instances(&s.ec2).await;
        if all
            .iter()
            .any(|(i, st)| i == id && *st == aws_sdk_ec2::types::InstanceStateName::Terminated)
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} not terminated: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_capacity_is_retried_then_a_clear_infra_failure() {
    let mut s = Setup::new().await;
    // Two refusals, then capacity: the acquire succeeds on the third call.
    let flaky = FaultProxy::start(&s.moto.url, 2, "InsufficientInstanceCapacity").await;
    let pool = s.pool(s.config(1, 64), Some(&flaky.url));
    let lease = pool
        .acquire(&CancellationToken::new())
        .await
        .expect("acquire after retries");
    assert_eq!(
        flaky
            .run_instances_calls
            .load(std::sync::atomic::Ordering::SeqCst),
        3
    );
    assert_eq!(moto::live_instances(&s.ec2).await.len(), 1);
    drop(lease);
    s.assert_none_left().await;

    // Never any capacity: a clear infra failure after the configured attempts, and no
    // instance.
    let dry = FaultProxy::start(&s.moto.url, u32::MAX, "InsufficientInstanceCapacity").await;
    s.stop_pools();
    let pool = s.pool(s.config(1, 64), Some(&dry.url));
    let err = pool
        .acquire(&CancellationToken::new())
        .await
        .expect_err("no capacity");
    match &err {
        PoolError::Start { host_type, message } => {
            assert_eq!(host_type, HOST_TYPE);
            assert!(
                message.contains("no capacity after 4 attempts"),
                "{message}"
            );
            assert!(
                message.contains("InsufficientInstanceCapacity"),
                "{message}"
            );
            assert!(message.contains("c5.large"), "{message}");
        }
        other => panic!("expected a start error, got {other:?}"),
    }
    assert_eq!(
        dry.run_instances_calls
            .load(std::sync::atomic::Ordering::SeqCst),
        4
    );
    eventually("the slot is free again", || pool.status().in_use == 0).await;

    // Throttling is retried the same way.
    let throttled = FaultProxy::start(&s.moto.url, 1, "RequestLimitExceeded").await;
    s.stop_pools();
    let pool = s.pool(s.config(1, 64), Some(&throttled.url));
    let lease = pool
        .acquire(&CancellationToken::new())
        .await
        .expect("acquire after throttling");
    assert_eq!(
        throttled
            .run_instances_calls
            .load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    drop(lease);
    s.assert_none_left().await;
}
