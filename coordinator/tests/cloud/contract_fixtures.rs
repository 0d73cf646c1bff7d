//! The pool contract's fixtures for the cloud pools: kube on the scripted API server
//! (the test plays the kubelet) and ec2 on moto (the test plays EC2's hosts). Included by
//! `pool_contract.rs`, whose `Fixture` trait they implement.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use coordinator::pool::ec2::{Ec2Pool, Ec2PoolOptions, Ec2Timing};
use coordinator::pool::kube::{KubePool, KubePoolOptions};
use coordinator::pool::reconcile::labels;
use coordinator::pool::{Lease, Pool};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::cloud::kube_api::KubeApi;
use super::cloud::kubelet::{Kubelet, kubelet};
use super::cloud::moto::{self, FaultProxy, Hosts, Moto};
use super::cloud::{Machines, TestProvision, eventually};
use super::{Fixture, HOST_TYPE};

const OWNER: &str = "bf-contract";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---- kube ----

pub struct KubeFixture {
    api: KubeApi,
    pool: Arc<KubePool>,
    machines: Machines,
    shutdown: CancellationToken,
}

impl KubeFixture {
    async fn make(capacity: usize, mode: Kubelet) -> Self {
        buildfarm_tls::install_crypto_provider();
        let running = KubeApi::start("contract").await;
        let machines = Machines::default();
        kubelet(
            running.api.clone(),
            running.feed,
            machines.clone(),
            mode,
            91,
        );
        let config = serde_json::from_value(json!({
            "image": "buildfarm/linux-amd64:local",
            "namespace": "contract",
            "cpu": "1",
            "memory": "512 MiB",
            "max_pods": capacity,
            "buildlet_port": 18450,
            "start_timeout": "120s",
        }))
        .expect("config");
        let shutdown = CancellationToken::new();
        let pool = KubePool::new(
            KubePoolOptions {
                host_type: HOST_TYPE.into(),
                config,
                owner: OWNER.into(),
                client: KubeApi::client(running.addr),
                provision: TestProvision::new(),
                sweep_interval: Duration::from_millis(300),
            },
            TaskTracker::new(),
            shutdown.clone(),
        );
        KubeFixture {
            api: running.api,
            pool: Arc::new(pool),
            machines,
            shutdown,
        }
    }
}

#[async_trait]
impl Fixture for KubeFixture {
    async fn start(capacity: usize) -> Option<Self> {
        Some(Self::make(capacity, Kubelet::Run).await)
    }

    async fn broken() -> Option<Self> {
        Some(Self::make(1, Kubelet::PullFails).await)
    }

    fn pool(&self) -> Arc<dyn Pool> {
        self.pool.clone()
    }

    async fn alive(&self) -> Option<usize> {
        Some(self.api.pods().len())
    }

    async fn check_leftovers_swept(&self) {
        let stray = |name: &str, owner: &str, deadline: u64| {
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": { "name": name, "labels": {
                    labels::OWNER: owner, labels::HOST_TYPE: HOST_TYPE,
                    labels::DEADLINE: deadline.to_string(),
                }},
                "spec": { "containers": [{ "name": "buildlet", "image": "x" }] },
                "status": { "phase": "Running", "podIP": "127.0.0.1" },
            })
        };
        self.api.insert(stray("left-expired", OWNER, now() - 1));
        self.api.insert(stray("left-orphan", OWNER, now() + 3600));
        self.api
            .insert(stray("not-ours", "bf-someone-else", now() - 1));
        eventually("the previous run's pods are deleted", || {
            let pods = self.api.pods();
            !pods.contains_key("left-expired") && !pods.contains_key("left-orphan")
        })
        .await;
        assert!(
            self.api.pods().contains_key("not-ours"),
            "another owner's pod was swept"
        );
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.machines.kill_all();
    }
}

// ---- ec2 ----

pub struct Ec2Fixture {
    moto: Moto,
    ec2: aws_sdk_ec2::Client,
    hosts: Hosts,
    _subnet: moto::LoopbackSubnet,
    pool: Arc<Ec2Pool>,
    shutdown: CancellationToken,
    _proxy: Option<FaultProxy>,
}

impl Ec2Fixture {
    async fn make(capacity: usize, broken: bool) -> Self {
        buildfarm_tls::install_crypto_provider();
        let moto = Moto::start().await;
        let ec2 = moto::client(&moto.url);
        let subnet = moto::loopback_subnet(&ec2).await;
        let ami = moto::some_ami(&ec2).await;
        let hosts = Hosts::start(ec2.clone());
        // Broken: EC2 never has capacity for the type.
        let proxy = if broken {
            Some(FaultProxy::start(&moto.url, u32::MAX, "InsufficientInstanceCapacity").await)
        } else {
            None
        };
        let endpoint = proxy.as_ref().map_or(moto.url.clone(), |p| p.url.clone());
        let config = serde_json::from_value(json!({
            "ami": ami,
            "instance_type": "c5.large",
            "region": "us-east-1",
            "endpoint_url": endpoint,
            "max_instances": capacity,
            "vcpu_quota": 2 * capacity,
            "subnet_id": subnet.id,
            "buildlet_port": 18451,
            "start_timeout": "120s",
            "coordinator_url": "https://coordinator.test:8119",
        }))
        .expect("config");
        let shutdown = CancellationToken::new();
        let pool = Ec2Pool::new(
            Ec2PoolOptions {
                host_type: HOST_TYPE.into(),
                config,
                owner: OWNER.into(),
                client: moto::client(&endpoint),
                provision: TestProvision::new(),
                timing: Ec2Timing {
                    poll: Duration::from_millis(100),
                    sweep: Duration::from_millis(300),
                    retry_base: Duration::from_millis(10),
                    retry_max: Duration::from_millis(50),
                    retry_attempts: 3,
                },
            },
            TaskTracker::new(),
            shutdown.clone(),
        );
        Ec2Fixture {
            moto,
            ec2,
            hosts,
            _subnet: subnet,
            pool: Arc::new(pool),
            shutdown,
            _proxy: proxy,
        }
    }
}

#[async_trait]
impl Fixture for Ec2Fixture {
    async fn start(capacity: usize) -> Option<Self> {
        Some(Self::make(capacity, false).await)
    }

    async fn broken() -> Option<Self> {
        Some(Self::make(1, true).await)
    }

    fn pool(&self) -> Arc<dyn Pool> {
        self.pool.clone()
    }

    /// An instance is lost when it stops (a dead buildlet on a running instance is not
    /// something EC2 reports): stop it as EC2 would retire its host.
    async fn kill(&self, lease: &Lease) {
        let _ = lease;
        let live = moto::live_instances(&self.ec2).await;
        assert_eq!(live.len(), 1, "{live:?}");
        self.ec2
            .stop_instances()
            .instance_ids(&live[0])
            .send()
            .await
            .expect("stop instance");
    }

    async fn alive(&self) -> Option<usize> {
        Some(moto::live_instances(&self.ec2).await.len())
    }

    async fn check_leftovers_swept(&self) {
        let launch = |owner: &'static str, deadline: u64| {
            let ec2 = self.ec2.clone();
            async move {
                let spec = aws_sdk_ec2::types::TagSpecification::builder()
                    .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
                    .tags(
                        aws_sdk_ec2::types::Tag::builder()
                            .key(labels::OWNER)
                            .value(owner)
                            .build(),
                    )
                    .tags(
                        aws_sdk_ec2::types::Tag::builder()
                            .key(labels::HOST_TYPE)
                            .value(HOST_TYPE)
                            .build(),
                    )
                    .tags(
                        aws_sdk_ec2::types::Tag::builder()
                            .key(labels::DEADLINE)
                            .value(deadline.to_string())
                            .build(),
                    )
                    .tags(
                        aws_sdk_ec2::types::Tag::builder()
                            .key(labels::MACHINE)
                            .value(format!("left-{owner}"))
                            .build(),
                    )
                    .build();
                let out = ec2
                    .run_instances()
                    .image_id(moto::some_ami(&ec2).await)
                    .min_count(1)
                    .max_count(1)
                    .tag_specifications(spec)
                    .send()
                    .await
                    .expect("launch a leftover");
                out.instances()[0].instance_id().expect("id").to_owned()
            }
        };
        let ours = launch(OWNER, now() + 3600).await;
        let theirs = launch("bf-someone-else", now() - 1).await;
        let deadline = tokio::time::Instant::now() + super::WAIT;
        loop {
            let live = moto::live_instances(&self.ec2).await;
            if !live.contains(&ours) {
                assert!(live.contains(&theirs), "another owner's instance was swept");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "leftover {ours} not swept"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.ec2
            .terminate_instances()
            .instance_ids(&theirs)
            .send()
            .await
            .expect("terminate the other owner's instance");
    }

    async fn stop(self) {
        // Released leases terminate their instances; nothing may be left running.
        let deadline = tokio::time::Instant::now() + super::WAIT;
        loop {
            let live = moto::live_instances(&self.ec2).await;
            if live.is_empty() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "instances left: {live:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.shutdown.cancel();
        drop(self.hosts);
        drop(self.moto);
    }
}
