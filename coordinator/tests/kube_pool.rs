//! The kube pool through the real `kube::Client` against a scripted API server (see
//! `cloud/kube_api.rs`): the test plays the kubelet, running each pod's command as a
//! local process on a loopback address of its own, and asserts the requests the pool
//! makes. No live cluster is involved.

mod cloud;

use std::sync::Arc;
use std::time::Duration;

use buildfarm_config::KubePool as KubeConfig;
use buildlet::client::ExecSpec;
use cloud::kube_api::KubeApi;
use cloud::kubelet::{Kubelet, kubelet};
use cloud::{Machines, TestProvision, WAIT, eventually};
use coordinator::pool::kube::{KubePool, KubePoolOptions};
use coordinator::pool::reconcile::labels;
use coordinator::pool::{Pool, PoolError};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const NS: &str = "builds";
const OWNER: &str = "bf-test-owner";
const HOST_TYPE: &str = "linux-amd64-kube";

fn config(max_pods: u32) -> KubeConfig {
    serde_json::from_value(json!({
        "image": "buildfarm/buildlet-linux-amd64:1",
        "namespace": NS,
        "cpu": "2",
        "memory": "1 GiB",
        "max_pods": max_pods,
        "node_selector": { "kubernetes.io/arch": "amd64" },
        "tolerations": [{ "key": "dedicated", "value": "builds", "effect": "NoSchedule" }],
        "buildlet_port": 18443,
        "start_timeout": "60s",
    }))
    .expect("config")
}

struct Setup {
    api: KubeApi,
    addr: std::net::SocketAddr,
    pool: Arc<KubePool>,
    machines: Machines,
    provision: Arc<TestProvision>,
    shutdown: CancellationToken,
}

async fn setup(max_pods: u32, mode: Kubelet, net: u8, before: impl FnOnce(&KubeApi)) -> Setup {
    buildfarm_tls::install_crypto_provider();
    let running = KubeApi::start(NS).await;
    before(&running.api);
    let machines = Machines::default();
    kubelet(
        running.api.clone(),
        running.feed,
        machines.clone(),
        mode,
        net,
    );
    let provision = TestProvision::new();
    let shutdown = CancellationToken::new();
    let pool = KubePool::new(
        KubePoolOptions {
            host_type: HOST_TYPE.into(),
            config: config(max_pods),
            owner: OWNER.into(),
            client: KubeApi::client(running.addr),
            provision: provision.clone(),
            sweep_interval: Duration::from_millis(300),
        },
        TaskTracker::new(),
        shutdown.clone(),
    );
    Setup {
        api: running.api,
        addr: running.addr,
        pool: Arc::new(pool),
        machines,
        provision,
        shutdown,
    }
}

impl Setup {
    /// No pod and no machine process is left.
    async fn assert_all_gone(&self) {
        eventually("every pod is deleted", || self.api.pods().is_empty()).await;
        eventually("every machine process is gone", || {
            self.machines.running().is_empty()
        })
        .await;
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.machines.kill_all();
    }
}

async fn echo(lease: &coordinator::pool::Lease, word: &str) -> String {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_run_release_makes_and_deletes_one_pod() {
    let s = setup(2, Kubelet::Run, 71, |_| {}).await;
    let cancel = CancellationToken::new();
    let lease = tokio::time::timeout(WAIT, s.pool.acquire(&cancel))
        .await
        .expect("acquire in time")
        .expect("acquire");
    assert_eq!(echo(&lease, "hello-from-pod").await, "hello-from-pod");
    assert_eq!(s.pool.status().in_use, 1);
    let pods = s.api.pods();
    assert_eq!(pods.len(), 1);
    let (name, pod) = pods.into_iter().next().expect("pod");
    assert_eq!(lease.name, format!("kube/{name}"));

    // The create request: image, resources, placement, labels, no service account token.
    let reqs = s.api.requests();
    let create = reqs
        .iter()
        .find(|r| r.method == "POST")
        .expect("a create request");
    assert_eq!(create.path, format!("/api/v1/namespaces/{NS}/pods"));
    let body: &Value = create.body.as_ref().expect("body");
    let labels_v = &body["metadata"]["labels"];
    assert_eq!(labels_v[labels::OWNER], OWNER);
    assert_eq!(labels_v[labels::HOST_TYPE], HOST_TYPE);
    let deadline: u64 = labels_v[labels::DEADLINE]
        .as_str()
        .expect("deadline label")
        .parse()
        .expect("number");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    assert!(
        deadline > now + 5 * 3600 && deadline <= now + 6 * 3600 + 60,
        "deadline {deadline} vs now {now}"
    );
    let spec = &body["spec"];
    assert_eq!(spec["automountServiceAccountToken"], false);
    assert_eq!(spec["nodeSelector"]["kubernetes.io/arch"], "amd64");
    assert_eq!(spec["tolerations"][0]["key"], "dedicated");
    let c = &spec["containers"][0];
    assert_eq!(c["image"], "buildfarm/buildlet-linux-amd64:1");
    assert_eq!(c["resources"]["requests"]["cpu"], "2");
    assert_eq!(c["resources"]["limits"]["memory"], "1073741824");
    assert_eq!(pod["status"]["phase"], "Running");

    // It watched that pod by name.
    assert!(
        reqs.iter().any(|r| r.method == "GET"
            && r.query
                .get("watch")
                .is_some_and(|w| w == "true" || w == "1")
            && r.query.get("fieldSelector") == Some(&format!("metadata.name={name}"))),
        "no watch on the pod: {reqs:#?}"
    );

    drop(lease);
    eventually("the pod is deleted after release", || {
        s.api
            .requests()
            .iter()
            .any(|r| r.method == "DELETE" && r.path.ends_with(&format!("/pods/{name}")))
    })
    .await;
    s.assert_all_gone().await;
    eventually("the slot is free again", || s.pool.status().in_use == 0).await;
    assert_eq!(
        *s.provision.revoked.lock().unwrap(),
        vec![name.clone()],
        "the machine's credentials were revoked"
    );
    // The sweeper lists only this coordinator's pods of this host type.
    let list = s
        .api
        .requests()
        .into_iter()
        .find(|r| r.method == "GET" && !r.query.contains_key("watch") && r.path.ends_with("/pods"))
        .expect("a list request");
    assert_eq!(
        list.query.get("labelSelector"),
        Some(&format!(
            "{}={OWNER},{}={HOST_TYPE}",
            labels::OWNER,
            labels::HOST_TYPE
        ))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_pod_cancels_lost_and_is_cleaned_up() {
    let s = setup(1, Kubelet::Run, 72, |_| {}).await;
    let cancel = CancellationToken::new();
    let lease = s.pool.acquire(&cancel).await.expect("acquire");
    assert_eq!(echo(&lease, "before").await, "before");
    assert!(!lease.lost.is_cancelled());
    let name = lease.name.trim_start_matches("kube/").to_owned();
    assert!(s.api.evict(&name));
    s.machines.kill(&name);
    tokio::time::timeout(WAIT, lease.lost.cancelled())
        .await
        .expect("lost is cancelled after the eviction");
    drop(lease);
    s.assert_all_gone().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_deleted_by_someone_else_cancels_lost() {
    let s = setup(1, Kubelet::Run, 73, |_| {}).await;
    let lease = s
        .pool
        .acquire(&CancellationToken::new())
        .await
        .expect("acquire");
    let name = lease.name.trim_start_matches("kube/").to_owned();
    // A node drain: the pod is deleted through the API (as kubectl does), not by the pool.
    let resp = reqwest::Client::new()
        .delete(format!(
            "http://{}/api/v1/namespaces/{NS}/pods/{name}",
            s.addr
        ))
        .send()
        .await
        .expect("delete request");
    assert!(resp.status().is_success(), "{}", resp.status());
    tokio::time::timeout(WAIT, lease.lost.cancelled())
        .await
        .expect("lost is cancelled after the deletion");
    drop(lease);
    s.assert_all_gone().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_cannot_be_pulled_is_a_clear_start_failure() {
    let s = setup(1, Kubelet::PullFails, 74, |_| {}).await;
    let err = tokio::time::timeout(WAIT, s.pool.acquire(&CancellationToken::new()))
        .await
        .expect("fails in time, not at the start timeout")
        .expect_err("no buildlet from a pod whose image cannot be pulled");
    match &err {
        PoolError::Start { host_type, message } => {
            assert_eq!(host_type, HOST_TYPE);
            assert!(message.contains("ImagePullBackOff"), "{message}");
        }
        other => panic!("expected a start error, got {other:?}"),
    }
    s.assert_all_gone().await;
    assert_eq!(s.pool.status().in_use, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_is_respected_under_concurrent_acquires() {
    let s = setup(1, Kubelet::Run, 75, |_| {}).await;
    assert_eq!(s.pool.capacity(), 1);
    let first = s
        .pool
        .acquire(&CancellationToken::new())
        .await
        .expect("first");
    let pool = s.pool.clone();
    let second = tokio::spawn(async move { pool.acquire(&CancellationToken::new()).await });
    // While the first is held, the second waits and makes no pod.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(s.api.pods().len() <= 1, "a second pod beyond max_pods");
        assert!(!second.is_finished());
    }
    drop(first);
    let second = tokio::time::timeout(WAIT, second)
        .await
        .expect("second acquired after the release")
        .expect("join")
        .expect("second lease");
    assert_eq!(echo(&second, "two").await, "two");
    assert!(s.api.pods().len() <= 1);
    drop(second);
    s.assert_all_gone().await;
}

fn stray_pod(name: &str, owner: &str, host_type: &str, deadline: u64) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "labels": {
            labels::OWNER: owner, labels::HOST_TYPE: host_type, labels::DEADLINE: deadline.to_string(),
        }},
        "spec": { "containers": [{ "name": "buildlet", "image": "x" }] },
        "status": { "phase": "Running", "podIP": "127.0.0.1" },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_sweeper_deletes_expired_and_orphaned_pods_it_owns() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let s = setup(2, Kubelet::Run, 76, |api| {
        // Left by a previous run of this coordinator:
        api.insert(stray_pod("bf-expired", OWNER, HOST_TYPE, now - 10));
        api.insert(stray_pod("bf-orphan", OWNER, HOST_TYPE, now + 3600));
        // Not ours to touch:
        api.insert(stray_pod(
            "other-owner",
            "bf-someone-else",
            HOST_TYPE,
            now - 10,
        ));
        api.insert(stray_pod("other-host-type", OWNER, "linux-arm64", now - 10));
    })
    .await;
    eventually("the expired and orphaned pods are deleted", || {
        let pods = s.api.pods();
        !pods.contains_key("bf-expired") && !pods.contains_key("bf-orphan")
    })
    .await;
    let actions = s.pool.sweep().await.expect("sweep");
    assert!(actions.is_empty(), "{actions:?}");
    let left: Vec<String> = s.api.pods().into_keys().collect();
    assert_eq!(left, ["other-host-type", "other-owner"]);
    let deletes: Vec<String> = s
        .api
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| r.path.rsplit('/').next().unwrap_or_default().to_owned())
        .collect();
    assert!(
        deletes
            .iter()
            .all(|d| d == "bf-expired" || d == "bf-orphan"),
        "{deletes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leased_pod_past_its_deadline_is_deleted_and_its_lease_lost() {
    let s = setup(1, Kubelet::Run, 77, |_| {}).await;
    let lease = s
        .pool
        .acquire(&CancellationToken::new())
        .await
        .expect("acquire");
    let name = lease.name.trim_start_matches("kube/").to_owned();
    s.api.update(&name, |p| {
        p["metadata"]["labels"][labels::DEADLINE] = json!("1");
    });
    tokio::time::timeout(WAIT, lease.lost.cancelled())
        .await
        .expect("lost after the deadline");
    drop(lease);
    s.assert_all_gone().await;
}
