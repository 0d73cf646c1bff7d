//! The Kubernetes pool: one pod per lease, from the host type's image, with CPU and
//! memory requests and limits, node selector and tolerations. The pod's command is the
//! boot script (see [`super::provision`]): it fetches the buildlet from the coordinator
//! and runs it in listen mode. The pool watches the pod until it is Running and the
//! buildlet answers at the pod IP, hands it out, and keeps watching: a pod that fails, is
//! evicted or deleted mid-lease cancels the lease's `lost` token. Release hands deletion
//! to a task the pool owns.
//!
//! Pods carry labels for the owning coordinator, the host type and a deadline; a sweeper
//! lists them and deletes what [`reconcile`](super::reconcile::reconcile) says: pods past
//! their deadline and, after a restart, pods no lease holds.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use async_trait::async_trait;
use buildfarm_config::KubePool as KubeConfig;
use buildlet::client::BuildletClient;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams, WatchEvent, WatchParams};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::provision::Provision;
use super::reconcile::{self, Action, MachineState, Observed, Tracked, labels};
use super::{Lease, Pool, PoolError, PoolStatus};

/// How long one watch request may stay open before the pool re-issues it.
const WATCH_TIMEOUT_SECS: u32 = 290;
/// Pause before re-watching after a failed watch request.
const REWATCH_PAUSE: Duration = Duration::from_secs(1);
/// Pause between attempts to reach the buildlet in a Running pod (it is still fetching
/// itself).
const DIAL_PAUSE: Duration = Duration::from_millis(500);
/// Grace period given to a pod's buildlet when it is deleted.
const DELETE_GRACE_SECS: u32 = 5;

pub struct KubePoolOptions {
    pub host_type: String,
    pub config: KubeConfig,
    /// The owner label's value (the config's `owner`, or the default from the master key).
    pub owner: String,
    pub client: kube::Client,
    pub provision: Arc<dyn Provision>,
    /// How often the sweeper lists the pool's pods.
    pub sweep_interval: Duration,
}

pub struct KubePool {
    inner: Arc<Inner>,
}

struct Inner {
    opts: KubePoolOptions,
    api: Api<Pod>,
    /// Pods made by this process, by name: what the sweeper must leave alone.
    tracked: Mutex<HashMap<String, Entry>>,
    /// One permit per pod that may exist; held until the pod's deletion was accepted.
    permits: Arc<Semaphore>,
    in_use: AtomicUsize,
    starting: AtomicUsize,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

struct Entry {
    state: Tracked,
    lost: CancellationToken,
}

/// What a pod's state means to the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodState {
    /// Scheduled or not, containers not running yet.
    Pending,
    /// Running, with this pod IP.
    Running(String),
    /// Failed, succeeded (the buildlet exited), or stuck in a way that will not heal.
    Dead(String),
    /// Being deleted.
    Going,
}

/// Container waiting reasons that never heal by themselves: fail the start at once with
/// the reason rather than waiting for the start timeout.
const FATAL_WAITING: &[&str] = &[
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
];

/// Classifies a pod. Pure.
pub fn pod_state(pod: &Pod) -> PodState {
    if pod.metadata.deletion_timestamp.is_some() {
        return PodState::Going;
    }
    let Some(status) = &pod.status else {
        return PodState::Pending;
    };
    let reason = || {
        let r = status.reason.clone().unwrap_or_default();
        let m = status.message.clone().unwrap_or_default();
        match (r.is_empty(), m.is_empty()) {
            (true, true) => String::new(),
            (false, true) => r,
            (true, false) => m,
            (false, false) => format!("{r}: {m}"),
        }
    };
    match status.phase.as_deref() {
        Some("Failed") => {
            let r = reason();
            return PodState::Dead(if r.is_empty() { "pod failed".into() } else { r });
        }
        Some("Succeeded") => return PodState::Dead("the buildlet exited".into()),
        _ => {}
    }
    for cs in status.container_statuses.iter().flatten() {
        if let Some(w) = cs.state.as_ref().and_then(|s| s.waiting.as_ref())
            && let Some(r) = &w.reason
            && FATAL_WAITING.contains(&r.as_str())
        {
            let m = w.message.clone().unwrap_or_default();
            return PodState::Dead(format!("container {}: {r} {m}", cs.name).trim().to_owned());
        }
        if let Some(t) = cs.state.as_ref().and_then(|s| s.terminated.as_ref()) {
            return PodState::Dead(format!(
                "container {} exited with code {}{}",
                cs.name,
                t.exit_code,
                t.reason
                    .as_ref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ));
        }
    }
    match (status.phase.as_deref(), &status.pod_ip) {
        (Some("Running"), Some(ip)) if !ip.is_empty() => PodState::Running(ip.clone()),
        _ => PodState::Pending,
    }
}

/// A label value naming the host type: the name itself when it is a valid label value,
/// else a digest of it.
pub fn host_type_label(host_type: &str) -> String {
    let b = host_type.as_bytes();
    let valid = !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric();
    if valid {
        host_type.to_owned()
    } else {
        use sha2::Digest;
        format!(
            "h-{}",
            hex::encode(&sha2::Sha256::digest(host_type.as_bytes())[..8])
        )
    }
}

/// The pod for one lease. Pure.
pub fn pod_spec(
    name: &str,
    host_type: &str,
    owner: &str,
    deadline: u64,
    config: &KubeConfig,
    script: &str,
) -> anyhow::Result<Pod> {
    let labels: BTreeMap<&str, String> = [
        (labels::OWNER, owner.to_owned()),
        (labels::HOST_TYPE, host_type_label(host_type)),
        (labels::DEADLINE, deadline.to_string()),
    ]
    .into();
    let tolerations: Vec<serde_json::Value> = config
        .tolerations
        .iter()
        .map(|t| {
            let mut v = serde_json::json!({ "operator": t.operator });
            for (k, val) in [("key", &t.key), ("value", &t.value), ("effect", &t.effect)] {
                if !val.is_empty() {
                    v[k] = serde_json::Value::from(val.as_str());
                }
            }
            v
        })
        .collect();
    let resources = serde_json::json!({
        "cpu": config.cpu,
        "memory": config.memory.as_u64().to_string(),
    });
    let pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": { "buildfarm.dev/host-type-name": host_type },
        },
        "spec": {
            "restartPolicy": "Never",
            // Builds must not get credentials for the cluster.
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "terminationGracePeriodSeconds": DELETE_GRACE_SECS,
            "nodeSelector": config.node_selector,
            "tolerations": tolerations,
            "containers": [{
                "name": "buildlet",
                "image": config.image,
                "command": ["/bin/sh", "-c", script],
                "ports": [{ "name": "buildlet", "containerPort": config.buildlet_port }],
                "resources": { "requests": resources, "limits": resources },
            }],
        },
    });
    serde_json::from_value(pod).context("building the pod spec")
}

impl KubePool {
    /// Creates the pool and starts its sweeper (first sweep at once: after a restart it
    /// deletes the pods the previous run left).
    pub fn new(opts: KubePoolOptions, tasks: TaskTracker, shutdown: CancellationToken) -> Self {
        let api = Api::namespaced(opts.client.clone(), &opts.config.namespace);
        let inner = Arc::new(Inner {
            permits: Arc::new(Semaphore::new(opts.config.max_pods as usize)),
            opts,
            api,
            tracked: Mutex::new(HashMap::new()),
            in_use: AtomicUsize::new(0),
            starting: AtomicUsize::new(0),
            tasks: tasks.clone(),
            shutdown,
        });
        let sweeper = inner.clone();
        tasks.spawn(async move { sweeper.sweep_loop().await });
        KubePool { inner }
    }

    /// Runs one sweep now (tests; the loop runs them on its own).
    pub async fn sweep(&self) -> anyhow::Result<Vec<Action>> {
        self.inner.sweep_once().await
    }
}

impl Inner {
    fn host_type(&self) -> &str {
        &self.opts.host_type
    }

    fn selector(&self) -> String {
        format!(
            "{}={},{}={}",
            labels::OWNER,
            self.opts.owner,
            labels::HOST_TYPE,
            host_type_label(&self.opts.host_type)
        )
    }

    fn tracked(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.tracked.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn sweep_loop(self: Arc<Self>) {
        loop {
            if let Err(error) = self.sweep_once().await {
                warn!(
                    host_type = self.host_type(),
                    error = format!("{error:#}"),
                    "kube pool sweep failed"
                );
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.opts.sweep_interval) => {}
            }
        }
    }

    async fn sweep_once(self: &Arc<Self>) -> anyhow::Result<Vec<Action>> {
        let pods = self
            .api
            .list(&ListParams::default().labels(&self.selector()))
            .await
            .with_context(|| format!("listing pods in {}", self.opts.config.namespace))?;
        let observed: Vec<Observed> = pods
            .items
            .iter()
            .filter_map(|p| {
                let name = p.metadata.name.clone()?;
                let deadline = p
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(labels::DEADLINE))
                    .and_then(|d| d.parse().ok());
                let state = match pod_state(p) {
                    PodState::Pending | PodState::Running(_) => MachineState::Alive,
                    PodState::Dead(_) => MachineState::Dead,
                    PodState::Going => MachineState::Going,
                };
                Some(Observed {
                    machine: name,
                    deadline,
                    state,
                })
            })
            .collect();
        let tracked: HashMap<String, Tracked> = self
            .tracked()
            .iter()
            .map(|(k, e)| (k.clone(), e.state))
            .collect();
        let actions =
            reconcile::reconcile(&observed, &tracked, reconcile::unix_secs(SystemTime::now()));
        for a in &actions {
            match a {
                Action::Delete { machine, why } => {
                    info!(host_type = self.host_type(), pod = %machine, %why, "sweeping pod");
                    self.delete_pod(machine).await;
                }
                Action::Lost { machine, why } => {
                    if let Some(e) = self.tracked().get(machine) {
                        warn!(host_type = self.host_type(), pod = %machine, %why, "leased pod lost");
                        e.lost.cancel();
                    }
                }
            }
        }
        Ok(actions)
    }

    /// Deletes a pod; one that is already gone is fine.
    async fn delete_pod(&self, name: &str) -> bool {
        let dp = DeleteParams::background().grace_period(DELETE_GRACE_SECS);
        match self.api.delete(name, &dp).await {
            Ok(_) => true,
            Err(kube::Error::Api(s)) if s.code == 404 => true,
            Err(error) => {
                warn!(host_type = self.host_type(), pod = %name, %error, "deleting pod failed; the sweeper retries");
                false
            }
        }
    }

    /// Deletes the pod in a task the pool owns, then frees its permit.
    fn discard(self: &Arc<Self>, name: String, permit: OwnedSemaphorePermit) {
        self.tracked().remove(&name);
        self.opts.provision.revoke(&name);
        let me = self.clone();
        self.tasks.spawn(async move {
            // A failed delete is retried by the sweeper (the pod is untracked now); the
            // permit is kept a little so a flapping API does not let pods pile up.
            if !me.delete_pod(&name).await {
                tokio::time::sleep(me.opts.sweep_interval).await;
            }
            drop(permit);
        });
    }

    async fn start(
        self: &Arc<Self>,
        name: &str,
        cancel: &CancellationToken,
    ) -> Result<(BuildletClient, String), String> {
        let c = &self.opts.config;
        let provisioned = self
            .opts
            .provision
            .provision(name, self.host_type(), c.buildlet_port)
            .await
            .map_err(|e| format!("provisioning credentials: {e:#}"))?;
        let deadline = reconcile::unix_secs(SystemTime::now() + c.max_lifetime);
        let pod = pod_spec(
            name,
            self.host_type(),
            &self.opts.owner,
            deadline,
            c,
            &provisioned.script,
        )
        .map_err(|e| format!("{e:#}"))?;
        let created = self
            .api
            .create(&PostParams::default(), &pod)
            .await
            .map_err(|e| format!("creating pod {name} in {}: {e}", c.namespace))?;
        let mut watch = PodWatch::new(self.api.clone(), name, &created);
        let mut state = pod_state(&created);
        let ip = loop {
            match state {
                PodState::Running(ip) => break ip,
                PodState::Dead(why) => return Err(format!("pod {name}: {why}")),
                PodState::Going => return Err(format!("pod {name} was deleted while starting")),
                PodState::Pending => {}
            }
            state = match watch.next(cancel).await {
                Some(Some(pod)) => pod_state(&pod),
                Some(None) => return Err(format!("pod {name} was deleted while starting")),
                None => return Err("cancelled".into()),
            };
        };
        let addr = if ip.contains(':') {
            format!("[{ip}]:{}", c.buildlet_port)
        } else {
            format!("{ip}:{}", c.buildlet_port)
        };
        let mut connect = provisioned.connect;
        connect.addr = addr.clone();
        // The buildlet is fetching itself: dial until it answers (the caller's timeout
        // bounds this), but give up as soon as the pod dies.
        let client = loop {
            let attempt = async {
                let client = BuildletClient::connect(connect.clone()).await?;
                client.status().await?;
                Ok::<_, buildlet::client::ClientError>(client)
            };
            let last_error = match attempt.await {
                Ok(client) => break client,
                Err(e) => e,
            };
            tokio::select! {
                _ = cancel.cancelled() => return Err("cancelled".into()),
                _ = tokio::time::sleep(DIAL_PAUSE) => {}
                ev = watch.next(cancel) => match ev {
                    Some(Some(pod)) => match pod_state(&pod) {
                        PodState::Dead(why) => return Err(format!("pod {name}: {why}")),
                        PodState::Going => return Err(format!("pod {name} was deleted while starting")),
                        _ => {}
                    },
                    Some(None) => return Err(format!("pod {name} was deleted while starting (last dial error: {last_error})")),
                    None => return Err("cancelled".into()),
                },
            }
        };
        // Hand the watch on: it now guards the lease.
        let lost = CancellationToken::new();
        {
            let mut tracked = self.tracked();
            match tracked.get_mut(name) {
                Some(e) => {
                    e.state = Tracked::Leased;
                    e.lost = lost.clone();
                }
                None => return Err(format!("pod {name} was swept while starting")),
            }
        }
        let (me, name_owned) = (self.clone(), name.to_owned());
        self.tasks.spawn(async move {
            me.guard(watch, name_owned, lost).await;
        });
        Ok((client, addr))
    }

    /// Watches a leased pod until it dies (cancelling `lost`) or the lease ends.
    async fn guard(&self, mut watch: PodWatch, name: String, lost: CancellationToken) {
        let stop = CancellationToken::new();
        loop {
            let ev = tokio::select! {
                _ = lost.cancelled() => return,
                _ = self.shutdown.cancelled() => return,
                ev = watch.next(&stop) => ev,
            };
            // Released: the lease removed the pod from `tracked` first.
            if !self.tracked().contains_key(&name) {
                return;
            }
            let why = match ev {
                Some(Some(pod)) => match pod_state(&pod) {
                    PodState::Dead(why) => why,
                    PodState::Going => "pod is being deleted".into(),
                    _ => continue,
                },
                Some(None) => "pod was deleted".into(),
                None => return,
            };
            warn!(host_type = self.host_type(), pod = %name, reason = %why, "leased pod lost");
            lost.cancel();
            return;
        }
    }
}

/// A watch on one pod that survives the API server closing the stream: it re-watches
/// from the last resource version, and after `410 Gone` re-reads the pod.
struct PodWatch {
    api: Api<Pod>,
    name: String,
    version: String,
    stream: Option<futures::stream::BoxStream<'static, kube::Result<WatchEvent<Pod>>>>,
}

impl PodWatch {
    fn new(api: Api<Pod>, name: &str, pod: &Pod) -> Self {
        PodWatch {
            api,
            name: name.to_owned(),
            version: pod
                .metadata
                .resource_version
                .clone()
                .unwrap_or_else(|| "0".into()),
            stream: None,
        }
    }

    /// The pod's next state: `Some(Some(pod))` after a change, `Some(None)` when it was
    /// deleted, `None` when cancelled.
    async fn next(&mut self, cancel: &CancellationToken) -> Option<Option<Pod>> {
        loop {
            if self.stream.is_none() {
                let wp = WatchParams::default()
                    .fields(&format!("metadata.name={}", self.name))
                    .timeout(WATCH_TIMEOUT_SECS);
                let opened = tokio::select! {
                    _ = cancel.cancelled() => return None,
                    r = self.api.watch(&wp, &self.version) => r,
                };
                match opened {
                    Ok(s) => self.stream = Some(s.boxed()),
                    Err(error) => {
                        warn!(pod = %self.name, %error, "watching pod failed; retrying");
                        tokio::select! {
                            _ = cancel.cancelled() => return None,
                            _ = tokio::time::sleep(REWATCH_PAUSE) => {}
                        }
                        continue;
                    }
                }
            }
            let stream = self.stream.as_mut()?;
            let ev = tokio::select! {
                _ = cancel.cancelled() => return None,
                ev = stream.try_next() => ev,
            };
            match ev {
                Ok(Some(WatchEvent::Added(p) | WatchEvent::Modified(p))) => {
                    if let Some(v) = &p.metadata.resource_version {
                        self.version = v.clone();
                    }
                    return Some(Some(p));
                }
                Ok(Some(WatchEvent::Deleted(_))) => return Some(None),
                Ok(Some(WatchEvent::Bookmark(b))) => self.version = b.metadata.resource_version,
                Ok(Some(WatchEvent::Error(status))) if status.code == 410 => {
                    // Too old: read the pod again and watch from there.
                    self.stream = None;
                    match self.api.get_opt(&self.name).await {
                        Ok(Some(p)) => {
                            self.version = p.metadata.resource_version.clone().unwrap_or_default();
                            return Some(Some(p));
                        }
                        Ok(None) => return Some(None),
                        Err(error) => warn!(pod = %self.name, %error, "re-reading pod failed"),
                    }
                }
                Ok(Some(WatchEvent::Error(status))) => {
                    warn!(pod = %self.name, code = status.code, message = %status.message, "pod watch error");
                    self.stream = None;
                }
                // The server ended the watch (its timeout): watch again.
                Ok(None) => self.stream = None,
                Err(error) => {
                    warn!(pod = %self.name, %error, "pod watch broke; re-watching");
                    self.stream = None;
                    tokio::select! {
                        _ = cancel.cancelled() => return None,
                        _ = tokio::time::sleep(REWATCH_PAUSE) => {}
                    }
                }
            }
        }
    }
}

#[async_trait]
impl Pool for KubePool {
    fn kind(&self) -> &'static str {
        "kube"
    }

    fn host_type(&self) -> &str {
        &self.inner.opts.host_type
    }

    fn capacity(&self) -> usize {
        self.inner.opts.config.max_pods as usize
    }

    fn status(&self) -> PoolStatus {
        let in_use = self.inner.in_use.load(Ordering::SeqCst);
        let starting = self.inner.starting.load(Ordering::SeqCst);
        PoolStatus {
            kind: "kube",
            host_type: self.inner.opts.host_type.clone(),
            capacity: self.capacity(),
            in_use,
            idle: 0,
            starting,
            expected: None,
        }
    }

    async fn acquire(&self, cancel: &CancellationToken) -> Result<Lease, PoolError> {
        let inner = &self.inner;
        let host_type = inner.opts.host_type.clone();
        let start_err = |message: String| PoolError::Start {
            host_type: host_type.clone(),
            message,
        };
        let permit = tokio::select! {
            _ = cancel.cancelled() => return Err(PoolError::Cancelled),
            p = inner.permits.clone().acquire_owned() => p.map_err(|_| PoolError::Unavailable(host_type.clone()))?,
        };
        let name = reconcile::machine_name(&host_type);
        inner.tracked().insert(
            name.clone(),
            Entry {
                state: Tracked::Starting,
                lost: CancellationToken::new(),
            },
        );
        inner.starting.fetch_add(1, Ordering::SeqCst);
        let timeout = inner.opts.config.start_timeout;
        let started = tokio::time::timeout(timeout, inner.start(&name, cancel)).await;
        inner.starting.fetch_sub(1, Ordering::SeqCst);
        let (client, addr) = match started {
            Ok(Ok(ok)) => ok,
            Ok(Err(message)) => {
                inner.discard(name, permit);
                if cancel.is_cancelled() {
                    return Err(PoolError::Cancelled);
                }
                return Err(start_err(message));
            }
            Err(_) => {
                inner.discard(name.clone(), permit);
                return Err(start_err(format!(
                    "pod {name} had no answering buildlet within {}",
                    humantime::format_duration(timeout)
                )));
            }
        };
        let lost = inner
            .tracked()
            .get(&name)
            .map(|e| e.lost.clone())
            .unwrap_or_default();
        inner.in_use.fetch_add(1, Ordering::SeqCst);
        info!(host_type = %host_type, pod = %name, %addr, "kube buildlet ready");
        let me = inner.clone();
        let lease_name = format!("kube/{name}");
        Ok(Lease::new(client, lease_name, host_type, lost, move || {
            me.in_use.fetch_sub(1, Ordering::SeqCst);
            me.discard(name, permit);
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> KubeConfig {
        serde_json::from_value(serde_json::json!({
            "image": "buildlet:1",
            "namespace": "farm",
            "cpu": "2",
            "memory": "1 GiB",
            "max_pods": 3,
            "node_selector": { "kubernetes.io/arch": "amd64" },
            "tolerations": [
                { "key": "dedicated", "value": "builds", "effect": "NoSchedule" },
                { "operator": "Exists" },
            ],
        }))
        .unwrap()
    }

    #[test]
    fn pod_spec_has_resources_placement_labels_and_no_token() {
        let pod = pod_spec(
            "bf-x-1",
            "linux-amd64",
            "bf-owner",
            1234,
            &config(),
            "echo hi",
        )
        .unwrap();
        let v = serde_json::to_value(&pod).unwrap();
        assert_eq!(v["metadata"]["labels"][labels::OWNER], "bf-owner");
        assert_eq!(v["metadata"]["labels"][labels::DEADLINE], "1234");
        assert_eq!(v["metadata"]["labels"][labels::HOST_TYPE], "linux-amd64");
        let spec = &v["spec"];
        assert_eq!(spec["automountServiceAccountToken"], false);
        assert_eq!(spec["restartPolicy"], "Never");
        assert_eq!(spec["nodeSelector"]["kubernetes.io/arch"], "amd64");
        assert_eq!(
            spec["tolerations"],
            serde_json::json!([
                { "key": "dedicated", "operator": "Equal", "value": "builds", "effect": "NoSchedule" },
                { "operator": "Exists" },
            ])
        );
        let c = &spec["containers"][0];
        assert_eq!(c["image"], "buildlet:1");
        assert_eq!(
            c["command"],
            serde_json::json!(["/bin/sh", "-c", "echo hi"])
        );
        assert_eq!(c["resources"]["limits"]["cpu"], "2");
        assert_eq!(c["resources"]["requests"]["memory"], "1073741824");
        assert_eq!(c["ports"][0]["containerPort"], 8443);
    }

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn pod_states() {
        assert_eq!(pod_state(&pod(serde_json::json!({}))), PodState::Pending);
        assert_eq!(
            pod_state(&pod(
                serde_json::json!({"status": {"phase": "Running", "podIP": "10.1.2.3"}})
            )),
            PodState::Running("10.1.2.3".into())
        );
        assert_eq!(
            pod_state(&pod(serde_json::json!({"status": {"phase": "Running"}}))),
            PodState::Pending
        );
        assert_eq!(
            pod_state(&pod(
                serde_json::json!({"status": {"phase": "Failed", "reason": "Evicted", "message": "low on memory"}})
            )),
            PodState::Dead("Evicted: low on memory".into())
        );
        assert_eq!(
            pod_state(&pod(
                serde_json::json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}, "status": {"phase": "Running", "podIP": "1.2.3.4"}})
            )),
            PodState::Going
        );
        let pull = pod(
            serde_json::json!({"status": {"phase": "Pending", "containerStatuses": [
            {"name": "buildlet", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
             "state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}}}]}}),
        );
        assert_eq!(
            pod_state(&pull),
            PodState::Dead("container buildlet: ImagePullBackOff no such image".into())
        );
    }

    #[test]
    fn names_and_host_type_labels() {
        let n = reconcile::machine_name("Linux_AMD64.big");
        assert!(n.starts_with("bf-linux-amd64-big-"), "{n}");
        assert!(n.len() <= 63);
        assert_eq!(host_type_label("linux-amd64"), "linux-amd64");
        assert!(host_type_label("-odd-").starts_with("h-"));
        assert!(host_type_label(&"x".repeat(70)).starts_with("h-"));
    }
}
