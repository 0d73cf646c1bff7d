//! One contract for every pool kind, run against real machines of each: local buildlet
//! processes, reverse buildlets dialling in over TLS, and Docker containers that fetch
//! their buildlet from the coordinator. Each case is written once against
//! [`Fixture`]; `pool_contract!` instantiates it per kind (kube on a scripted API
//! server and ec2 on moto: `cloud/contract_fixtures.rs`).
//!
//! The contract: acquire, run a command, release; capacity respected under concurrent
//! acquires; a start failure is a clear infra error (`PoolError::Start`/`Unavailable`);
//! a machine lost mid-lease cancels `lost`; leftovers of a previous run are swept.
//!
//! Docker cases need an engine: without one they print a note and pass, except under
//! `CI=true`, where a missing engine fails them.

mod cloud;
#[path = "cloud/contract_fixtures.rs"]
mod cloud_fixtures;
mod common;
mod docker_env;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use buildfarm_config::{
    Config, DockerPool as DockerPoolConfig, HostType, LocalPool, Pool as PoolConfig, ReversePool,
};
use buildlet::client::ExecSpec;
use coordinator::app::{self, Running, StartOptions};
use coordinator::pool::{Lease, Pool, PoolError};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use docker_env::DockerEnv;

const HOST_TYPE: &str = "contract";
/// Generous: machines start on a shared two-core box.
const WAIT: Duration = Duration::from_secs(240);

/// One pool kind under test, with the powers the contract needs over its machines.
#[async_trait]
trait Fixture: Send + Sync {
    /// A started pool of `HOST_TYPE` with room for `capacity` machines. `None` when the
    /// kind cannot run here (a note has been printed).
    async fn start(capacity: usize) -> Option<Self>
    where
        Self: Sized;
    /// The same kind, set up so that starting a machine fails.
    async fn broken() -> Option<Self>
    where
        Self: Sized;
    fn pool(&self) -> Arc<dyn Pool>;
    /// Makes the leased machine die as a crash would (not through the pool).
    async fn kill(&self, lease: &Lease) {
        // From inside: the command's parent is the buildlet.
        let _ = lease
            .client
            .exec_collect(ExecSpec::new("sh").args(["-c", "kill -9 $PPID"]), |_, _| {})
            .await;
    }
    /// How many of the pool's machines exist right now, when the kind can count them.
    async fn alive(&self) -> Option<usize> {
        None
    }
    /// Leaves what a crashed run of this kind leaves behind, lets the pool sweep it,
    /// and asserts that it is gone and that nothing not the pool's was touched.
    async fn check_leftovers_swept(&self);
    async fn stop(self);
}

async fn acquire(pool: &dyn Pool) -> Result<Lease, PoolError> {
    tokio::time::timeout(WAIT, pool.acquire(&CancellationToken::new()))
        .await
        .expect("acquire finished in time")
}

async fn run(lease: &Lease, script: &str) -> (bool, String) {
    let mut out = Vec::new();
    let st = lease
        .client
        .exec_collect(ExecSpec::new("sh").args(["-c", script]), |_, b| {
            out.extend_from_slice(b)
        })
        .await
        .expect("exec");
    (st.success(), String::from_utf8_lossy(&out).into_owned())
}

async fn acquire_run_release<F: Fixture>() {
    let Some(f) = F::start(1).await else { return };
    let pool = f.pool();
    assert_eq!(pool.host_type(), HOST_TYPE);
    assert_eq!(pool.capacity(), 1);
    let lease = acquire(pool.as_ref()).await.expect("a buildlet");
    assert_eq!(lease.host_type, HOST_TYPE);
    assert!(!lease.lost.is_cancelled());
    let (ok, out) = run(&lease, "echo contract-$((6 * 7)); uname -s").await;
    assert!(ok, "{out}");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["contract-42", "Linux"]);
    let status = lease.client.status().await.expect("status");
    assert_eq!(status.host_type, HOST_TYPE);
    assert_eq!(pool.status().in_use, 1);
    drop(lease);
    // Released: the pool has room again and a fresh machine can be had.
    let again = acquire(pool.as_ref())
        .await
        .expect("a buildlet after release");
    let (ok, _) = run(&again, "true").await;
    assert!(ok);
    drop(again);
    if f.alive().await.is_some() {
        wait_until("every machine is gone after release", || async {
            f.alive().await == Some(0)
        })
        .await;
    }
    f.stop().await;
}

async fn capacity_under_concurrent_acquires<F: Fixture + 'static>() {
    let Some(f) = F::start(2).await else { return };
    let f = Arc::new(f);
    let pool = f.pool();
    let current = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..5 {
        let (pool, current, peak, f) = (pool.clone(), current.clone(), peak.clone(), f.clone());
        tasks.spawn(async move {
            let lease = acquire(pool.as_ref())
                .await
                .expect("every acquire is served in turn");
            let now = current.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            assert!(pool.status().in_use <= 2, "{:?}", pool.status());
            if let Some(n) = f.alive().await {
                assert!(n <= 2, "{n} machines alive with capacity 2");
            }
            let (ok, out) = run(&lease, &format!("echo lease-{i}")).await;
            assert!(ok && out.trim() == format!("lease-{i}"), "{out}");
            current.fetch_sub(1, Ordering::SeqCst);
            drop(lease);
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("task");
    }
    let peak = peak.load(Ordering::SeqCst);
    assert!(
        (1..=2).contains(&peak),
        "peak {peak} leases with capacity 2"
    );
    match Arc::try_unwrap(f) {
        Ok(f) => f.stop().await,
        Err(_) => panic!("fixture still shared"),
    }
}

async fn start_failure_is_a_clear_infra_error<F: Fixture>() {
    let Some(f) = F::broken().await else { return };
    let err = acquire(f.pool().as_ref())
        .await
        .expect_err("a broken pool gives no buildlet");
    match &err {
        PoolError::Start { host_type, message } => {
            assert_eq!(host_type, HOST_TYPE);
            assert!(!message.is_empty());
        }
        PoolError::Unavailable(h) => assert_eq!(h, HOST_TYPE),
        PoolError::Cancelled => panic!("not cancelled: {err}"),
    }
    assert!(err.to_string().contains(HOST_TYPE), "{err}");
    // Nothing is left counted as in use.
    assert_eq!(f.pool().status().in_use, 0, "{:?}", f.pool().status());
    f.stop().await;
}

async fn lost_mid_lease_cancels_lost<F: Fixture>() {
    let Some(f) = F::start(1).await else { return };
    let pool = f.pool();
    let lease = acquire(pool.as_ref()).await.expect("a buildlet");
    f.kill(&lease).await;
    tokio::time::timeout(WAIT, lease.lost.cancelled())
        .await
        .expect("the lease learns its machine is gone");
    drop(lease);
    f.stop().await;
}

async fn leftovers_swept<F: Fixture>() {
    let Some(f) = F::start(1).await else { return };
    f.check_leftovers_swept().await;
    f.stop().await;
}

async fn wait_until<Fut: std::future::Future<Output = bool>>(
    what: &str,
    mut check: impl FnMut() -> Fut,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

macro_rules! pool_contract {
    ($kind:ident, $fixture:ty) => {
        mod $kind {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn acquire_run_release() {
                super::acquire_run_release::<$fixture>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn capacity_under_concurrent_acquires() {
                super::capacity_under_concurrent_acquires::<$fixture>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn start_failure_is_a_clear_infra_error() {
                super::start_failure_is_a_clear_infra_error::<$fixture>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn lost_mid_lease_cancels_lost() {
                super::lost_mid_lease_cancels_lost::<$fixture>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn leftovers_swept() {
                super::leftovers_swept::<$fixture>().await
            }
        }
    };
}

pool_contract!(local, LocalFixture);
pool_contract!(reverse, ReverseFixture);
pool_contract!(docker, DockerFixture);
pool_contract!(kube, cloud_fixtures::KubeFixture);
pool_contract!(ec2, cloud_fixtures::Ec2Fixture);

/// A coordinator started in this process with one host type.
struct Farm {
    tmp: tempfile::TempDir,
    running: Running,
}

impl Farm {
    async fn start(
        pool: PoolConfig,
        listen: &str,
        buildlet: &Path,
        tweak: impl FnOnce(&mut Config, &Path),
    ) -> Farm {
        buildfarm_tls::install_crypto_provider();
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut config = Config::default();
        config.coordinator.data_dir = tmp.path().join("data");
        config.host_types.push(HostType {
            name: HOST_TYPE.into(),
            pool,
            env: Default::default(),
        });
        tweak(&mut config, tmp.path());
        let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
        let running = app::start(
            config,
            listener,
            StartOptions {
                buildlet_bin: Some(buildlet.to_owned()),
                config_file: None,
            },
        )
        .await
        .expect("start coordinator");
        Farm { tmp, running }
    }

    fn pool(&self) -> Arc<dyn Pool> {
        self.running.farm.pool(HOST_TYPE).expect("the pool").clone()
    }

    async fn stop(self) {
        self.running.stop(Duration::from_secs(20)).await;
        drop(self.tmp);
    }
}

// ---- local ----

struct LocalFixture {
    farm: Farm,
    /// Holds the broken buildlet of `broken()`.
    _bin_dir: Option<tempfile::TempDir>,
}

#[async_trait]
impl Fixture for LocalFixture {
    async fn start(capacity: usize) -> Option<Self> {
        let pool = PoolConfig::Local(LocalPool {
            count: capacity as u32,
        });
        let farm = Farm::start(pool, "127.0.0.1:0", &common::buildlet_bin(), |c, dir| {
            c.sandbox.workdir_root = Some(dir.join("workdirs"));
        })
        .await;
        Some(LocalFixture {
            farm,
            _bin_dir: None,
        })
    }

    async fn broken() -> Option<Self> {
        // A "buildlet" that dies at once.
        let dir = tempfile::tempdir().expect("tempdir");
        set_mode(dir.path(), 0o755);
        let bin = dir.path().join("broken-buildlet");
        std::fs::write(
            &bin,
            "#!/bin/sh\necho 'this buildlet is broken' >&2\nexit 3\n",
        )
        .expect("write");
        set_mode(&bin, 0o755);
        let pool = PoolConfig::Local(LocalPool { count: 1 });
        let farm = Farm::start(pool, "127.0.0.1:0", &bin, |c, dir| {
            c.sandbox.workdir_root = Some(dir.join("workdirs"));
        })
        .await;
        Some(LocalFixture {
            farm,
            _bin_dir: Some(dir),
        })
    }

    fn pool(&self) -> Arc<dyn Pool> {
        self.farm.pool()
    }

    async fn check_leftovers_swept(&self) {
        // A previous run's workdir under the same root is emptied when a coordinator starts.
        let root = self.farm.tmp.path().join("workdirs");
        let stale = root.join("contract-1-stale");
        std::fs::create_dir_all(&stale).expect("mkdir");
        std::fs::write(stale.join("left.txt"), "from a crashed run").expect("write");
        let mut config = self.farm.running.farm.config().clone();
        config.coordinator.data_dir = self.farm.tmp.path().join("data2");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let second = app::start(
            config,
            listener,
            StartOptions {
                buildlet_bin: Some(common::buildlet_bin()),
                config_file: None,
            },
        )
        .await
        .expect("second start");
        assert!(
            !stale.exists(),
            "the stale workdir {} survived a start",
            stale.display()
        );
        second.stop(Duration::from_secs(20)).await;
    }

    async fn stop(self) {
        self.farm.stop().await;
    }
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

// ---- reverse ----

struct ReverseFixture {
    farm: Farm,
    machines: Vec<Child>,
}

impl ReverseFixture {
    async fn with_machines(n: usize, expected: usize) -> Self {
        let pool = PoolConfig::Reverse(ReversePool {
            expected: expected as u32,
        });
        let farm = Farm::start(pool, "127.0.0.1:0", &common::buildlet_bin(), |_, _| {}).await;
        let key = revdial::handshake::builder_key(farm.running.farm.master_key(), HOST_TYPE);
        let key_file = farm.tmp.path().join("builder.key");
        std::fs::write(&key_file, format!("{key}\n")).expect("key");
        let mut machines = Vec::new();
        for i in 0..n {
            machines.push(
                Command::new(common::buildlet_bin())
                    .arg("--reverse")
                    .arg(format!("https://{}", farm.running.addr))
                    .arg("--ca-file")
                    .arg(&farm.running.ca_file)
                    .args(["--host-type", HOST_TYPE, "--hostname", &format!("rev-{i}")])
                    .arg("--builder-key-file")
                    .arg(&key_file)
                    .arg("--workdir")
                    .arg(farm.tmp.path().join(format!("work-{i}")))
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .spawn()
                    .expect("spawn reverse buildlet"),
            );
        }
        let pool = farm.pool();
        wait_until("every reverse machine connected", || {
            let pool = pool.clone();
            async move { pool.capacity() == n }
        })
        .await;
        ReverseFixture { farm, machines }
    }
}

#[async_trait]
impl Fixture for ReverseFixture {
    async fn start(capacity: usize) -> Option<Self> {
        Some(Self::with_machines(capacity, capacity).await)
    }

    async fn broken() -> Option<Self> {
        // Expected but never connected.
        Some(Self::with_machines(0, 1).await)
    }

    fn pool(&self) -> Arc<dyn Pool> {
        self.farm.pool()
    }

    async fn check_leftovers_swept(&self) {
        // What a build left in a machine's workdir is gone before the next lease.
        let pool = self.pool();
        let lease = acquire(pool.as_ref()).await.expect("a buildlet");
        let (ok, _) = run(&lease, "mkdir -p left/deep && echo x > left/deep/file").await;
        assert!(ok);
        drop(lease);
        let next = acquire(pool.as_ref())
            .await
            .expect("the same machine again");
        // (Each command gets fresh gocache/ and tmp/ dirs; what the last lease wrote is gone.)
        let (ok, out) = run(&next, "ls -A; test ! -e left").await;
        assert!(ok, "the workdir was not emptied: {out}");
    }

    async fn stop(mut self) {
        for m in &mut self.machines {
            let _ = m.start_kill();
            let _ = m.wait().await;
        }
        self.farm.stop().await;
    }
}

// ---- docker ----

struct DockerFixture {
    env: DockerEnv,
    farm: Farm,
}

impl DockerFixture {
    async fn with_image(capacity: usize, image: &str) -> Option<Self> {
        let env = DockerEnv::new().await?;
        let pool = PoolConfig::Docker(DockerPoolConfig {
            image: image.into(),
            network: Some(env.network.clone()),
            max: capacity as u32,
            engine: None,
            coordinator_url: None,
            max_lifetime: Duration::from_secs(3600),
        });
        let farm = Farm::start(
            pool,
            &format!("{}:0", env.gateway),
            &common::buildlet_bin(),
            |_, _| {},
        )
        .await;
        Some(DockerFixture { env, farm })
    }

    fn owner(&self) -> String {
        coordinator::pool::docker::owner_id(self.farm.running.farm.data_dir())
    }
}

#[async_trait]
impl Fixture for DockerFixture {
    async fn start(capacity: usize) -> Option<Self> {
        let image = docker_env::image().await?;
        Self::with_image(capacity, &image).await
    }

    async fn broken() -> Option<Self> {
        Self::with_image(1, "buildfarm/no-such-image:contract").await
    }

    fn pool(&self) -> Arc<dyn Pool> {
        self.farm.pool()
    }

    async fn kill(&self, _lease: &Lease) {
        // As if the engine or the kernel killed it: every container of this pool.
        for id in self.env.containers(&self.owner()).await {
            self.env.kill(&id).await;
        }
    }

    async fn alive(&self) -> Option<usize> {
        Some(self.env.containers(&self.owner()).await.len())
    }

    async fn check_leftovers_swept(&self) {
        // A container a crashed run of this coordinator left, and one of another owner.
        let ours = self
            .env
            .leftover(&self.owner(), HOST_TYPE, "leftover-ours")
            .await;
        let theirs = self
            .env
            .leftover("someone-else", HOST_TYPE, "leftover-theirs")
            .await;
        // The pool sweeps at start and then every minute; ask it now.
        // (The pool's own first sweep may get there first.)
        self.sweep().await;
        assert!(
            !self.env.exists(&ours).await,
            "our leftover survived the sweep"
        );
        assert!(
            self.env.exists(&theirs).await,
            "another owner's container was swept"
        );
        self.env.remove(&theirs).await;
    }

    async fn stop(self) {
        let owner = self.owner();
        self.farm.stop().await;
        self.env.cleanup(&owner).await;
    }
}

impl DockerFixture {
    async fn sweep(&self) -> usize {
        // The same sweep the pool's own task runs, through a pool with the same owner.
        let opts = docker_pool_options(self);
        let pool =
            coordinator::pool::docker::DockerPool::new(opts, tokio_util::task::TaskTracker::new());
        pool.sweep().await.expect("sweep")
    }
}

fn docker_pool_options(f: &DockerFixture) -> coordinator::pool::docker::DockerPoolOptions {
    let running = &f.farm.running;
    let ca = app::load_or_create_ca(&running.farm.data_dir().join("tls")).expect("ca");
    let config = DockerPoolConfig {
        image: "unused".into(),
        network: Some(f.env.network.clone()),
        max: 1,
        engine: None,
        coordinator_url: None,
        max_lifetime: Duration::from_secs(3600),
    };
    coordinator::pool::docker::options(
        &config,
        HOST_TYPE,
        running.farm.data_dir(),
        running.addr,
        Arc::new(ca),
        running.ca_pem.clone(),
        Arc::new(coordinator::pool::bootstrap::BuildletBinaries::new(
            None, None,
        )),
        running.shutdown.clone(),
    )
}
