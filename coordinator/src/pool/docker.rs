//! The Docker pool: one container per lease on a Docker engine (local socket or TCP),
//! from an image that does not contain the buildlet. Each container runs the bootstrap
//! script (`super::bootstrap`): it fetches the coordinator's buildlet over HTTPS,
//! checks its digest and serves in listen mode with credentials made for that
//! container alone. The coordinator dials it at its address on the pool's network.
//!
//! Containers carry the cloud pools' labels (`buildfarm.dev/owner`,
//! `buildfarm.dev/host-type`, `buildfarm.dev/deadline`: `super::reconcile::labels`) so that a sweeper can remove the ones this coordinator owns
//! that no lease holds (after a restart, or a removal that failed) and the ones past
//! their deadline. A container that stops mid-lease cancels the lease's `lost` token.
//! Release is synchronous in the trait: it only signals the lease's watcher task, which
//! the pool owns and which removes the container; the capacity slot is freed once the
//! container is gone.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder,
};
use buildfarm_tls::CertificateAuthority;
use buildlet::client::BuildletClient;
use futures::StreamExt;
use tokio::sync::{OnceCell, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::bootstrap::{BootstrapParams, BuildletBinaries, MachineCredentials, bootstrap_script};
use super::{Lease, Pool, PoolError, PoolStatus};

/// The labels of every container: the same keys as the machines of the cloud pools
/// (the deadline in Unix seconds, after which the container may be removed).
pub use super::reconcile::labels::{
    DEADLINE as LABEL_DEADLINE, HOST_TYPE as LABEL_HOST_TYPE, OWNER as LABEL_OWNER,
};
/// Port the buildlet listens on inside each container.
pub const BUILDLET_PORT: u16 = 5936;
/// Where the bootstrap puts the buildlet, its credentials and the workdir.
const MACHINE_DIR: &str = "/var/lib/buildlet";
/// Log lines kept to explain a container that failed to start.
const LOG_TAIL: usize = 20;

/// Everything a Docker pool needs.
#[derive(Clone)]
pub struct DockerPoolOptions {
    pub host_type: String,
    pub image: String,
    /// Network the containers join; default Docker's `bridge`.
    pub network: Option<String>,
    pub max: usize,
    /// `unix://...`, `tcp://host:port` or `http://host:port`; default `DOCKER_HOST` or the
    /// local socket.
    pub engine: Option<String>,
    /// Identifies this coordinator's containers across restarts (the owner label).
    pub owner: String,
    /// Where containers fetch the buildlet; default derived from the network's
    /// gateway and `coordinator_listen` (see [`fetch_target`]).
    pub coordinator_url: Option<String>,
    /// The address the coordinator listens on.
    pub coordinator_listen: SocketAddr,
    /// CA certificates (PEM) the containers trust for the coordinator.
    pub coordinator_ca_pem: String,
    /// Issues each container's server certificate; the coordinator trusts `ca_pem`.
    pub ca: Arc<CertificateAuthority>,
    pub ca_pem: String,
    pub binaries: Arc<BuildletBinaries>,
    /// From creating a container to its buildlet answering.
    pub start_timeout: Duration,
    /// The deadline label is this far after creation.
    pub max_lifetime: Duration,
    /// How often owned containers are swept (and once at start).
    pub sweep_interval: Duration,
    /// Stops the sweeper.
    pub shutdown: CancellationToken,
}

/// The owner label of a coordinator: stable across its restarts (same machine, same
/// data dir), distinct between coordinators sharing an engine.
pub fn owner_id(data_dir: &std::path::Path) -> String {
    use sha2::Digest;
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut h = sha2::Sha256::new();
    h.update(host.as_bytes());
    h.update([0]);
    h.update(data_dir.as_os_str().as_encoded_bytes());
    hex::encode(&h.finalize()[..6])
}

/// The pool's options from its config table and what the coordinator knows.
#[allow(clippy::too_many_arguments)]
pub fn options(
    config: &buildfarm_config::DockerPool,
    host_type: &str,
    data_dir: &std::path::Path,
    coordinator_listen: SocketAddr,
    ca: Arc<CertificateAuthority>,
    coordinator_ca_pem: String,
    binaries: Arc<BuildletBinaries>,
    shutdown: CancellationToken,
) -> DockerPoolOptions {
    DockerPoolOptions {
        host_type: host_type.to_owned(),
        image: config.image.clone(),
        network: config.network.clone(),
        max: config.max as usize,
        engine: config.engine.clone(),
        owner: owner_id(data_dir),
        coordinator_url: config.coordinator_url.clone(),
        coordinator_listen,
        coordinator_ca_pem,
        ca_pem: ca.cert_pem().to_owned(),
        ca,
        binaries,
        start_timeout: Duration::from_secs(120),
        max_lifetime: config.max_lifetime,
        sweep_interval: Duration::from_secs(60),
        shutdown,
    }
}

/// What the pool learned from the engine once.
struct Engine {
    docker: Docker,
    /// `GOOS-GOARCH` of the engine's machine: the buildlet binary containers fetch.
    platform: String,
    network: String,
    /// The coordinator's URL as containers see it, and where they dial it.
    fetch_url: String,
    connect_to: Option<String>,
}

/// Where containers fetch the buildlet: `(url, connect_to)`. With a configured URL,
/// that. Otherwise `https://localhost:<port>` (a name on the coordinator's generated
/// certificate) dialled at the network's gateway, which the coordinator must listen on.
pub fn fetch_target(
    coordinator_url: Option<&str>,
    listen: SocketAddr,
    gateway: Option<IpAddr>,
    network: &str,
) -> Result<(String, Option<String>), String> {
    if let Some(url) = coordinator_url {
        return Ok((url.trim_end_matches('/').to_owned(), None));
    }
    let Some(gateway) = gateway else {
        return Err(format!(
            "network {network} has no IPv4 or IPv6 gateway to reach the coordinator by; set coordinator_url"
        ));
    };
    let port = listen.port();
    if !(listen.ip().is_unspecified() || listen.ip() == gateway) {
        return Err(format!(
            "containers on network {network} reach the coordinator at its gateway {gateway}, \
             but the coordinator listens on {listen}: listen on 0.0.0.0:{port} or \
             {gateway}:{port}, or set coordinator_url"
        ));
    }
    let dial = SocketAddr::new(gateway, port);
    Ok((format!("https://localhost:{port}"), Some(dial.to_string())))
}

/// The deadline label's value: Unix seconds.
fn deadline_label(now: SystemTime, lifetime: Duration) -> String {
    (now + lifetime)
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        .to_string()
}

/// An owned container as the sweeper sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    pub id: String,
    pub name: String,
    /// Unix seconds; `None` when the label is missing or unreadable.
    pub deadline: Option<u64>,
}

/// Which owned containers to remove: those no lease of this process holds (left by a
/// previous run, or a removal that failed) and those past their deadline.
pub fn to_sweep(owned: &[Owned], live: &HashSet<String>, now_secs: u64) -> Vec<Owned> {
    owned
        .iter()
        .filter(|c| !live.contains(&c.name) || c.deadline.is_some_and(|d| d <= now_secs))
        .cloned()
        .collect()
}

fn docker_err(e: bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError {
            status_code,
            message,
        } => format!("{message} (HTTP {status_code})"),
        other => other.to_string(),
    }
}

fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// Connects to the engine named in `engine` (or the defaults) and settles the API
/// version with it (this engine may be older than the client).
pub async fn connect_engine(engine: Option<&str>) -> Result<Docker, String> {
    let docker = match engine {
        Some(e) => Docker::connect_with_host(e),
        None => Docker::connect_with_defaults(),
    }
    .map_err(|e| format!("docker engine {}: {e}", engine.unwrap_or("(default)")))?;
    docker.negotiate_version().await.map_err(|e| {
        format!(
            "docker engine {}: {}",
            engine.unwrap_or("(default)"),
            docker_err(e)
        )
    })
}

pub struct DockerPool {
    opts: DockerPoolOptions,
    engine: OnceCell<Arc<Engine>>,
    slots: Arc<Semaphore>,
    in_use: Arc<AtomicUsize>,
    starting: AtomicUsize,
    next_id: AtomicU64,
    /// Names of the containers leases of this process hold (or are creating).
    live: Arc<Mutex<HashSet<String>>>,
    tasks: TaskTracker,
}

impl DockerPool {
    /// Makes the pool and starts its sweeper (which runs once at once, then every
    /// `sweep_interval` until shutdown). Nothing talks to the engine before that.
    pub fn new(opts: DockerPoolOptions, tasks: TaskTracker) -> Arc<Self> {
        let pool = Arc::new(DockerPool {
            slots: Arc::new(Semaphore::new(opts.max)),
            opts,
            engine: OnceCell::new(),
            in_use: Arc::new(AtomicUsize::new(0)),
            starting: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            live: Arc::new(Mutex::new(HashSet::new())),
            tasks: tasks.clone(),
        });
        let weak = Arc::downgrade(&pool);
        let shutdown = pool.opts.shutdown.clone();
        let every = pool.opts.sweep_interval;
        tasks.spawn(async move {
            loop {
                let Some(pool) = weak.upgrade() else { return };
                match pool.sweep().await {
                    Ok(0) => {}
                    Ok(n) => info!(host_type = %pool.opts.host_type, removed = n, "swept docker containers"),
                    Err(error) => warn!(host_type = %pool.opts.host_type, %error, "sweeping docker containers"),
                }
                drop(pool);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
            }
        });
        pool
    }

    async fn engine(&self) -> Result<Arc<Engine>, String> {
        self.engine
            .get_or_try_init(|| async {
                let o = &self.opts;
                let docker = connect_engine(o.engine.as_deref()).await?;
                let version = docker.version().await.map_err(docker_err)?;
                let platform = format!(
                    "{}-{}",
                    version.os.unwrap_or_default(),
                    version.arch.unwrap_or_default()
                );
                let network = o.network.clone().unwrap_or_else(|| "bridge".to_owned());
                let net = docker
                    .inspect_network(&network, None)
                    .await
                    .map_err(|e| format!("network {network}: {}", docker_err(e)))?;
                let gateway = net
                    .ipam
                    .and_then(|i| i.config)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|c| c.gateway?.parse::<IpAddr>().ok())
                    .min_by_key(|ip| ip.is_ipv6());
                let (fetch_url, connect_to) = fetch_target(
                    o.coordinator_url.as_deref(),
                    o.coordinator_listen,
                    gateway,
                    &network,
                )?;
                info!(host_type = %o.host_type, %platform, %network, %fetch_url, ?connect_to, "docker engine ready");
                Ok(Arc::new(Engine {
                    docker,
                    platform,
                    network,
                    fetch_url,
                    connect_to,
                }))
            })
            .await
            .cloned()
    }

    /// Removes owned containers of this host type that no lease holds, and those past
    /// their deadline. Returns how many were removed.
    pub async fn sweep(&self) -> Result<usize, String> {
        let engine = self.engine().await?;
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![
                format!("{LABEL_OWNER}={}", self.opts.owner),
                format!("{LABEL_HOST_TYPE}={}", self.opts.host_type),
            ],
        )]);
        let list = engine
            .docker
            .list_containers(Some(
                ListContainersOptionsBuilder::default()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await
            .map_err(docker_err)?;
        let owned: Vec<Owned> = list
            .into_iter()
            .filter_map(|c| {
                let id = c.id?;
                let name = c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .map(|n| n.trim_start_matches('/').to_owned())
                    .unwrap_or_default();
                let deadline = c
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(LABEL_DEADLINE))
                    .and_then(|d| d.parse().ok());
                Some(Owned { id, name, deadline })
            })
            .collect();
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut removed = 0;
        for c in to_sweep(&owned, &live, now) {
            info!(container = %c.name, deadline = ?c.deadline, "removing a stale docker container");
            if remove(&engine.docker, &c.id).await {
                removed += 1;
            }
        }
        Ok(removed)
    }

    async fn start(
        &self,
        permit: OwnedSemaphorePermit,
        cancel: &CancellationToken,
    ) -> Result<Lease, PoolError> {
        let o = &self.opts;
        let start_err = |message: String| PoolError::Start {
            host_type: o.host_type.clone(),
            message,
        };
        let engine = self.engine().await.map_err(start_err)?;
        let bin = o.binaries.get(&engine.platform).await.map_err(|e| {
            start_err(format!(
                "the buildlet for the engine's {}: {e}",
                engine.platform
            ))
        })?;
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let short = uuid::Uuid::new_v4().simple().to_string();
        let hostname = format!("bl-{}", &short[..12]);
        let container = format!(
            "buildfarm-{}-{}-{hostname}",
            o.owner,
            sanitize(&o.host_type)
        );
        let lease_name = format!("docker/{}#{n}", o.host_type);
        let creds =
            MachineCredentials::issue(&o.ca, &[&hostname]).map_err(|e| start_err(e.to_string()))?;
        let script = bootstrap_script(&BootstrapParams {
            coordinator_url: engine.fetch_url.clone(),
            connect_to: engine.connect_to.clone(),
            coordinator_ca_pem: o.coordinator_ca_pem.clone(),
            platform: bin.platform.clone(),
            sha256: bin.sha256.clone(),
            credentials: &creds,
            host_type: o.host_type.clone(),
            listen: format!("0.0.0.0:{BUILDLET_PORT}"),
            dir: MACHINE_DIR.to_owned(),
            extra_args: Vec::new(),
        });
        let labels = HashMap::from([
            (LABEL_OWNER.to_owned(), o.owner.clone()),
            (LABEL_HOST_TYPE.to_owned(), o.host_type.clone()),
            (
                LABEL_DEADLINE.to_owned(),
                deadline_label(SystemTime::now(), o.max_lifetime),
            ),
        ]);
        let body = ContainerCreateBody {
            image: Some(o.image.clone()),
            entrypoint: Some(vec!["/bin/sh".into(), "-c".into(), script]),
            cmd: Some(Vec::new()),
            hostname: Some(hostname.clone()),
            labels: Some(labels),
            host_config: Some(HostConfig {
                network_mode: Some(engine.network.clone()),
                // An init reaps what builds leave behind; the buildlet is its child.
                init: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        };
        // Live before it exists, so a sweep in between leaves it alone.
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(container.clone());
        let created = engine
            .docker
            .create_container(
                Some(
                    CreateContainerOptionsBuilder::default()
                        .name(&container)
                        .build(),
                ),
                body,
            )
            .await;
        let id = match created {
            Ok(r) => r.id,
            Err(e) => {
                self.forget(&container);
                let hint = if is_not_found(&e) {
                    " (build local images with `cargo xtask images`)"
                } else {
                    ""
                };
                return Err(start_err(format!(
                    "creating a container of image {}: {}{hint}",
                    o.image,
                    docker_err(e)
                )));
            }
        };
        let ready = tokio::select! {
            _ = cancel.cancelled() => Err(PoolError::Cancelled),
            r = tokio::time::timeout(o.start_timeout, self.boot(&engine, &id, &container, &creds)) => match r {
                Err(_) => Err(start_err(format!(
                    "container {container}: no buildlet answering within {:?}",
                    o.start_timeout
                ))),
                Ok(r) => r.map_err(start_err),
            },
        };
        let client = match ready {
            Ok(c) => c,
            Err(e) => {
                self.discard(engine.clone(), id, container, permit);
                return Err(e);
            }
        };

        let lost = CancellationToken::new();
        let stop = CancellationToken::new();
        {
            let (lost, stop, engine) = (lost.clone(), stop.clone(), engine.clone());
            let (lease_name, live, in_use) =
                (lease_name.clone(), self.live.clone(), self.in_use.clone());
            self.tasks.spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    code = wait_stopped(&engine.docker, &id) => {
                        warn!(buildlet = %lease_name, container = %container, ?code, "docker container stopped mid-lease");
                        lost.cancel();
                        stop.cancelled().await;
                    }
                }
                remove(&engine.docker, &id).await;
                live.lock().unwrap_or_else(|e| e.into_inner()).remove(&container);
                in_use.fetch_sub(1, Ordering::SeqCst);
                drop(permit);
            });
        }
        info!(buildlet = %lease_name, host_type = %o.host_type, "docker buildlet started");
        Ok(Lease::new(
            client,
            lease_name,
            o.host_type.clone(),
            lost,
            move || stop.cancel(),
        ))
    }

    /// Starts the container and waits for its buildlet to say it listens, then dials it.
    async fn boot(
        &self,
        engine: &Engine,
        id: &str,
        container: &str,
        creds: &MachineCredentials,
    ) -> Result<BuildletClient, String> {
        let docker = &engine.docker;
        docker
            .start_container(id, None)
            .await
            .map_err(|e| format!("starting container {container}: {}", docker_err(e)))?;
        let mut logs = docker.logs(
            id,
            Some(
                LogsOptionsBuilder::default()
                    .follow(true)
                    .stdout(true)
                    .stderr(true)
                    .build(),
            ),
        );
        let mut tail: Vec<String> = Vec::new();
        let mut partial = String::new();
        let mut listening = false;
        'read: while let Some(chunk) = logs.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    return Err(format!(
                        "reading the logs of {container}: {}",
                        docker_err(e)
                    ));
                }
            };
            partial.push_str(&String::from_utf8_lossy(chunk.as_ref()));
            while let Some(i) = partial.find('\n') {
                let line: String = partial.drain(..=i).collect();
                let line = line.trim_end().to_owned();
                if line.starts_with("buildlet listening on ") {
                    listening = true;
                    break 'read;
                }
                if tail.len() == LOG_TAIL {
                    tail.remove(0);
                }
                tail.push(line);
            }
        }
        drop(logs);
        if !listening {
            let code = docker
                .inspect_container(id, None)
                .await
                .ok()
                .and_then(|i| i.state)
                .and_then(|s| s.exit_code);
            return Err(format!(
                "container {container} exited (code {}) before its buildlet listened; its last output:\n{}",
                code.map_or("unknown".to_owned(), |c| c.to_string()),
                tail.join("\n")
            ));
        }
        let inspect = docker
            .inspect_container(id, None)
            .await
            .map_err(|e| format!("inspecting container {container}: {}", docker_err(e)))?;
        let ip = inspect
            .network_settings
            .and_then(|n| n.networks)
            .and_then(|mut nets| nets.remove(&engine.network))
            .and_then(|e| e.ip_address)
            .filter(|ip| !ip.is_empty())
            .and_then(|ip| ip.parse::<IpAddr>().ok())
            .ok_or_else(|| {
                format!(
                    "container {container} has no address on network {}",
                    engine.network
                )
            })?;
        let addr = SocketAddr::new(ip, BUILDLET_PORT).to_string();
        let client =
            BuildletClient::connect(creds.connect_options(addr.clone(), &self.opts.ca_pem))
                .await
                .map_err(|e| format!("connecting to the buildlet of {container} at {addr}: {e}"))?;
        // Answering means authenticated: the lease's key and the machine's certificate.
        client
            .status()
            .await
            .map_err(|e| format!("the buildlet of {container} at {addr} does not answer: {e}"))?;
        Ok(client)
    }

    fn forget(&self, container: &str) {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(container);
    }

    /// Removes a container that never became a lease, in the background; its slot is
    /// freed once it is gone.
    fn discard(
        &self,
        engine: Arc<Engine>,
        id: String,
        container: String,
        permit: OwnedSemaphorePermit,
    ) {
        let live = self.live.clone();
        self.tasks.spawn(async move {
            remove(&engine.docker, &id).await;
            live.lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&container);
            drop(permit);
        });
    }
}

/// Waits until the container is no longer running; returns its exit code if known.
async fn wait_stopped(docker: &Docker, id: &str) -> Option<i64> {
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut wait = docker.wait_container(id, None);
        match wait.next().await {
            Some(Ok(r)) => return Some(r.status_code),
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => {
                return Some(code);
            }
            Some(Err(e)) if is_not_found(&e) => return None,
            // The engine connection broke: look again rather than call the machine lost.
            Some(Err(_)) | None => {
                match docker.inspect_container(id, None).await {
                    Ok(i) if i.state.as_ref().and_then(|s| s.running) == Some(false) => {
                        return i.state.and_then(|s| s.exit_code);
                    }
                    Err(e) if is_not_found(&e) => return None,
                    _ => {}
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Removes a container (killing it first); true when it is gone. Retries a few times:
/// a container whose removal keeps failing is left to the sweeper.
async fn remove(docker: &Docker, id: &str) -> bool {
    let opts = RemoveContainerOptionsBuilder::default()
        .force(true)
        .v(true)
        .build();
    let mut backoff = Duration::from_millis(200);
    for attempt in 1..=5 {
        match docker.remove_container(id, Some(opts.clone())).await {
            Ok(()) => return true,
            Err(e) if is_not_found(&e) => return true,
            // 409: removal already in progress (e.g. the sweeper got there first).
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) if attempt > 1 => return true,
            Err(e) => {
                warn!(container = %id, attempt, error = %docker_err(e), "removing a docker container");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
    }
    false
}

/// A host type name as part of a container name (`[a-zA-Z0-9_.-]`).
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

#[async_trait]
impl Pool for DockerPool {
    fn kind(&self) -> &'static str {
        "docker"
    }

    fn host_type(&self) -> &str {
        &self.opts.host_type
    }

    fn capacity(&self) -> usize {
        self.opts.max
    }

    fn status(&self) -> PoolStatus {
        let in_use = self.in_use.load(Ordering::SeqCst);
        let starting = self.starting.load(Ordering::SeqCst);
        PoolStatus {
            kind: "docker",
            host_type: self.opts.host_type.clone(),
            capacity: self.opts.max,
            in_use: in_use.saturating_sub(starting),
            idle: 0,
            starting,
            expected: None,
        }
    }

    async fn acquire(&self, cancel: &CancellationToken) -> Result<Lease, PoolError> {
        // One slot per container alive, held until it is removed.
        let permit = tokio::select! {
            _ = cancel.cancelled() => return Err(PoolError::Cancelled),
            p = self.slots.clone().acquire_owned() => p.map_err(|_| PoolError::Unavailable(self.opts.host_type.clone()))?,
        };
        self.in_use.fetch_add(1, Ordering::SeqCst);
        self.starting.fetch_add(1, Ordering::SeqCst);
        let result = self.start(permit, cancel).await;
        self.starting.fetch_sub(1, Ordering::SeqCst);
        if result.is_err() {
            self.in_use.fetch_sub(1, Ordering::SeqCst);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn fetch_target_prefers_the_configured_url_then_the_gateway() {
        let gw: IpAddr = "172.18.0.1".parse().expect("ip");
        assert_eq!(
            fetch_target(
                Some("https://farm:8119/"),
                addr("127.0.0.1:8119"),
                Some(gw),
                "bf"
            ),
            Ok(("https://farm:8119".into(), None))
        );
        assert_eq!(
            fetch_target(None, addr("0.0.0.0:8119"), Some(gw), "bf"),
            Ok((
                "https://localhost:8119".into(),
                Some("172.18.0.1:8119".into())
            ))
        );
        assert_eq!(
            fetch_target(None, addr("172.18.0.1:40000"), Some(gw), "bf"),
            Ok((
                "https://localhost:40000".into(),
                Some("172.18.0.1:40000".into())
            ))
        );
        let v6: IpAddr = "fd00::1".parse().expect("ip");
        assert_eq!(
            fetch_target(None, addr("[::]:8119"), Some(v6), "bf").map(|(_, c)| c),
            Ok(Some("[fd00::1]:8119".into()))
        );
        let err = fetch_target(None, addr("127.0.0.1:8119"), Some(gw), "bf").expect_err("loopback");
        assert!(
            err.contains("listens on 127.0.0.1:8119") && err.contains("0.0.0.0:8119"),
            "{err}"
        );
        let err = fetch_target(None, addr("0.0.0.0:8119"), None, "none").expect_err("no gateway");
        assert!(err.contains("coordinator_url"), "{err}");
    }

    #[test]
    fn sweep_takes_what_no_lease_holds_and_what_is_past_its_deadline() {
        let c = |name: &str, deadline: Option<u64>| Owned {
            id: format!("id-{name}"),
            name: name.into(),
            deadline,
        };
        let owned = vec![
            c("held", Some(2000)),
            c("held-expired", Some(1000)),
            c("orphan", Some(5000)),
            c("held-no-deadline", None),
        ];
        let live: HashSet<String> = ["held", "held-expired", "held-no-deadline"]
            .into_iter()
            .map(String::from)
            .collect();
        let names: Vec<String> = to_sweep(&owned, &live, 1500)
            .into_iter()
            .map(|o| o.name)
            .collect();
        assert_eq!(names, ["held-expired", "orphan"]);
        assert!(
            to_sweep(&owned, &live, 0)
                .iter()
                .all(|o| o.name == "orphan")
        );
    }

    #[test]
    fn labels_and_names() {
        assert_eq!(
            deadline_label(
                UNIX_EPOCH + Duration::from_secs(100),
                Duration::from_secs(60)
            ),
            "160"
        );
        assert_eq!(sanitize("linux-amd64_x.y"), "linux-amd64_x.y");
        assert_eq!(sanitize("a b/c"), "a-b-c");
    }
}
