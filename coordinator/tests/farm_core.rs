//! The farm's middle on its failure paths, in process: a real farm (dispatcher, runner,
//! reconciler, poller) over a real SQLite store behind a wrapper that fails on demand,
//! and a pool whose buildlets are real buildlet services called in memory (no sockets).
//! Nothing sleeps: tests wait on the farm's own events or on the pool's counters, with
//! generous timeouts only as a safety net.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use buildfarm_config::Config;
use buildfarm_store::{
    Attempt, Build, BuildKind, BuildState, Commit, NewBuild, NewTry, Store, StoreError, TryRun,
};
use buildlet::client::BuildletClient;
use buildlet::server::{BuildletService, ServerConfig};

use coordinator::farm::{Farm, FarmEvent, FarmParts, Tuning};
use coordinator::git::Mirror;
use coordinator::pool::{Lease, Pool, PoolError, PoolStatus};
use coordinator::retry::Backoff;
use tokio::sync::{Semaphore, broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A safety net only; every wait ends on an event long before.
const WAIT: Duration = Duration::from_secs(120);

// ---- a store that fails on demand ----

/// How the next calls of one operation go wrong.
#[derive(Debug, Default, Clone, Copy)]
struct Faults {
    /// Fail before reaching the store.
    fail: u32,
    /// Reach the store, then report a failure (the answer was lost).
    lose_reply: u32,
}

struct FlakyStore {
    inner: Arc<dyn Store>,
    faults: Mutex<HashMap<&'static str, Faults>>,
    /// Calls that reached the inner store and succeeded, per operation.
    ok: Mutex<HashMap<&'static str, u32>>,
    /// When set, `get_build` waits for a permit (and counts in `get_build_calls`).
    get_build_gate: Mutex<Option<Arc<Semaphore>>>,
    get_build_calls: watch::Sender<usize>,
}

fn down(operation: &'static str) -> StoreError {
    StoreError::Database {
        operation,
        id: None,
        source: Box::new(std::io::Error::other("store down (test)")),
    }
}

impl FlakyStore {
    fn new(inner: Arc<dyn Store>) -> Arc<FlakyStore> {
        Arc::new(FlakyStore {
            inner,
            faults: Mutex::new(HashMap::new()),
            ok: Mutex::new(HashMap::new()),
            get_build_gate: Mutex::new(None),
            get_build_calls: watch::channel(0).0,
        })
    }

    fn set(&self, op: &'static str, faults: Faults) {
        self.faults.lock().unwrap().insert(op, faults);
    }

    fn ok_calls(&self, op: &'static str) -> u32 {
        self.ok.lock().unwrap().get(op).copied().unwrap_or(0)
    }

    async fn run<T, F>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        let lose = {
            let mut all = self.faults.lock().unwrap();
            let fl = all.entry(op).or_default();
            if fl.fail > 0 {
                fl.fail -= 1;
                return Err(down(op));
            }
            if fl.lose_reply > 0 {
                fl.lose_reply -= 1;
                true
            } else {
                false
            }
        };
        let r = f.await;
        if r.is_ok() {
            *self.ok.lock().unwrap().entry(op).or_default() += 1;
        }
        if lose { Err(down(op)) } else { r }
    }
}

#[async_trait]
impl Store for FlakyStore {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.run("ping", self.inner.ping()).await
    }
    async fn close(&self) {
        self.inner.close().await
    }
    async fn upsert_commit(&self, c: &Commit) -> Result<bool, StoreError> {
        self.run("upsert_commit", self.inner.upsert_commit(c)).await
    }
    async fn list_commits(
        &self,
        repo: &str,
        branch: &str,
        limit: u32,
        offset: u32,
    ) -> Result<Vec<Commit>, StoreError> {
        self.run(
            "list_commits",
            self.inner.list_commits(repo, branch, limit, offset),
        )
        .await
    }
    async fn count_commits(&self, repo: &str, branch: &str) -> Result<u64, StoreError> {
        self.run("count_commits", self.inner.count_commits(repo, branch))
            .await
    }
    async fn list_branches(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.run("list_branches", self.inner.list_branches()).await
    }
    async fn enqueue_build(&self, b: &NewBuild) -> Result<Option<Build>, StoreError> {
        self.run("enqueue_build", self.inner.enqueue_build(b)).await
    }
    async fn get_build(&self, id: &str) -> Result<Build, StoreError> {
        self.get_build_calls.send_modify(|n| *n += 1);
        let gate = self.get_build_gate.lock().unwrap().clone();
        if let Some(gate) = gate {
            gate.acquire().await.expect("gate closed").forget();
        }
        self.run("get_build", self.inner.get_build(id)).await
    }
    async fn list_unfinished_builds(&self) -> Result<Vec<Build>, StoreError> {
        self.run(
            "list_unfinished_builds",
            self.inner.list_unfinished_builds(),
        )
        .await
    }
    async fn start_attempt(&self, id: &str, buildlet: &str) -> Result<u32, StoreError> {
        self.run("start_attempt", self.inner.start_attempt(id, buildlet))
            .await
    }
    async fn finish_attempt(
        &self,
        id: &str,
        attempt: u32,
        state: BuildState,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        self.run(
            "finish_attempt",
            self.inner.finish_attempt(id, attempt, state, error),
        )
        .await
    }
    async fn requeue_build(&self, id: &str) -> Result<(), StoreError> {
        self.run("requeue_build", self.inner.requeue_build(id))
            .await
    }
    async fn finish_build(
        &self,
        id: &str,
        state: BuildState,
        summary: Option<&str>,
        log: &[u8],
    ) -> Result<(), StoreError> {
        self.run(
            "finish_build",
            self.inner.finish_build(id, state, summary, log),
        )
        .await
    }
    async fn cancel_build(&self, id: &str) -> Result<bool, StoreError> {
        self.run("cancel_build", self.inner.cancel_build(id)).await
    }
    async fn get_log(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.run("get_log", self.inner.get_log(id)).await
    }
    async fn recent_builds(&self, limit: u32) -> Result<Vec<Build>, StoreError> {
        self.run("recent_builds", self.inner.recent_builds(limit))
            .await
    }
    async fn active_builds(&self) -> Result<Vec<Build>, StoreError> {
        self.run("active_builds", self.inner.active_builds()).await
    }
    async fn builds_for_commits(
        &self,
        repo: &str,
        hashes: &[String],
    ) -> Result<Vec<Build>, StoreError> {
        self.run(
            "builds_for_commits",
            self.inner.builds_for_commits(repo, hashes),
        )
        .await
    }
    async fn resume_after_restart(&self) -> Result<Vec<Build>, StoreError> {
        self.run("resume_after_restart", self.inner.resume_after_restart())
            .await
    }
    async fn list_attempts(&self, id: &str) -> Result<Vec<Attempt>, StoreError> {
        self.run("list_attempts", self.inner.list_attempts(id))
            .await
    }
    async fn create_try(&self, new: &NewTry) -> Result<(TryRun, Vec<Build>), StoreError> {
        self.run("create_try", self.inner.create_try(new)).await
    }
    async fn get_try(&self, id: &str) -> Result<TryRun, StoreError> {
        self.run("get_try", self.inner.get_try(id)).await
    }
    async fn list_try_runs(&self, limit: u32) -> Result<Vec<TryRun>, StoreError> {
        self.run("list_try_runs", self.inner.list_try_runs(limit))
            .await
    }
    async fn builds_for_try(&self, try_id: &str) -> Result<Vec<Build>, StoreError> {
        self.run("builds_for_try", self.inner.builds_for_try(try_id))
            .await
    }

    async fn set_go_rev(&self, build_id: &str, go_rev: &str) -> Result<(), StoreError> {
        self.run("set_go_rev", self.inner.set_go_rev(build_id, go_rev))
            .await
    }

    async fn unit_durations(&self, builder: &str) -> Result<Vec<(String, u64)>, StoreError> {
        self.run("unit_durations", self.inner.unit_durations(builder))
            .await
    }

    async fn record_unit_durations(
        &self,
        builder: &str,
        units: &[(String, u64)],
    ) -> Result<(), StoreError> {
        self.run(
            "record_unit_durations",
            self.inner.record_unit_durations(builder, units),
        )
        .await
    }

    async fn request_artifact_build(
        &self,
        new: &buildfarm_store::NewBuild,
    ) -> Result<(Build, bool), StoreError> {
        self.run(
            "request_artifact_build",
            self.inner.request_artifact_build(new),
        )
        .await
    }

    async fn latest_artifact_build(
        &self,
        repo: &str,
        rev: &str,
        builder: &str,
    ) -> Result<Option<Build>, StoreError> {
        self.run(
            "latest_artifact_build",
            self.inner.latest_artifact_build(repo, rev, builder),
        )
        .await
    }

    async fn add_artifacts(
        &self,
        build_id: &str,
        files: &[buildfarm_store::NewArtifact],
    ) -> Result<(), StoreError> {
        self.run("add_artifacts", self.inner.add_artifacts(build_id, files))
            .await
    }

    async fn list_artifacts(
        &self,
        build_id: &str,
    ) -> Result<Vec<buildfarm_store::Artifact>, StoreError> {
        self.run("list_artifacts", self.inner.list_artifacts(build_id))
            .await
    }

    async fn all_artifacts(&self) -> Result<Vec<buildfarm_store::Artifact>, StoreError> {
        self.run("all_artifacts", self.inner.all_artifacts()).await
    }

    async fn delete_artifacts(&self, keys: &[(String, String)]) -> Result<u64, StoreError> {
        self.run("delete_artifacts", self.inner.delete_artifacts(keys))
            .await
    }

    async fn create_user_token(
        &self,
        t: &buildfarm_store::NewUserToken,
    ) -> Result<buildfarm_store::UserToken, StoreError> {
        self.run("create_user_token", self.inner.create_user_token(t))
            .await
    }
    async fn get_user_token(&self, id: &str) -> Result<buildfarm_store::UserToken, StoreError> {
        self.run("get_user_token", self.inner.get_user_token(id))
            .await
    }
    async fn list_user_tokens(&self) -> Result<Vec<buildfarm_store::UserToken>, StoreError> {
        self.run("list_user_tokens", self.inner.list_user_tokens())
            .await
    }
    async fn revoke_user_token(&self, id: &str) -> Result<buildfarm_store::UserToken, StoreError> {
        self.run("revoke_user_token", self.inner.revoke_user_token(id))
            .await
    }
}

// ---- a pool of in-memory buildlets ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Lease a real buildlet service, called in memory.
    Serve,
    /// Every acquire fails at once.
    Fail,
    /// Acquire never returns (until cancelled).
    Never,
}

struct FakePool {
    host_type: String,
    capacity: AtomicUsize,
    mode: Mutex<Mode>,
    /// When set, each acquire waits for a permit first ("blocks until told").
    gate: Option<Arc<Semaphore>>,
    /// Acquire calls entered so far.
    calls: watch::Sender<usize>,
    leased: AtomicUsize,
    root: tempfile::TempDir,
    /// See [`LazyBuildlet`].
    one_alive: Arc<tokio::sync::Mutex<()>>,
}

impl FakePool {
    fn new(mode: Mode, capacity: usize, gate: Option<Arc<Semaphore>>) -> Arc<FakePool> {
        Arc::new(FakePool {
            host_type: "fake".into(),
            capacity: AtomicUsize::new(capacity),
            mode: Mutex::new(mode),
            gate,
            calls: watch::channel(0).0,
            leased: AtomicUsize::new(0),
            root: tempfile::tempdir().expect("pool root"),
            one_alive: Arc::default(),
        })
    }

    fn calls(&self) -> usize {
        *self.calls.borrow()
    }

    async fn wait_calls(&self, n: usize) {
        let mut rx = self.calls.subscribe();
        tokio::time::timeout(WAIT, rx.wait_for(|c| *c >= n))
            .await
            .expect("acquire was never called")
            .expect("pool gone");
    }

    fn lease(&self) -> Result<Lease, PoolError> {
        let n = self.leased.fetch_add(1, Ordering::SeqCst);
        let mut cfg = ServerConfig::new(self.root.path().join(format!("w{n}")));
        cfg.cgroup = buildlet::contain::CgroupChoice::None;
        cfg.host_type = self.host_type.clone();
        let client =
            BuildletClient::from_service(LazyBuildlet::new(cfg, self.one_alive.clone()), None)
                .map_err(|e| PoolError::Start {
                    host_type: self.host_type.clone(),
                    message: e.to_string(),
                })?;
        Ok(Lease::new(
            client,
            format!("fake#{n}"),
            self.host_type.clone(),
            CancellationToken::new(),
            || {},
        ))
    }
}

/// A real buildlet service, called in memory, made at its first call. A buildlet
/// service reaps every exited child of its process that it did not start (it is a
/// child subreaper), so in one process with the coordinator and other services it
/// would take their children's exit status. Hence: made at the first call (pushing the
/// source, after the coordinator's `git` made the tarball), and one alive at a time in
/// the process (the pool's `one_alive` lock, held until the lease is dropped).
#[derive(Clone)]
struct LazyBuildlet {
    config: ServerConfig,
    one_alive: Arc<tokio::sync::Mutex<()>>,
    state: Arc<tokio::sync::OnceCell<Alive>>,
}

struct Alive {
    routes: tonic::service::Routes,
    _turn: tokio::sync::OwnedMutexGuard<()>,
    _stop: tokio_util::sync::DropGuard,
}

impl LazyBuildlet {
    fn new(config: ServerConfig, one_alive: Arc<tokio::sync::Mutex<()>>) -> Self {
        LazyBuildlet {
            config,
            one_alive,
            state: Arc::default(),
        }
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for LazyBuildlet {
    type Response = http::Response<tonic::body::Body>;
    type Error = tower::BoxError;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            use tower::ServiceExt;
            let alive = this
                .state
                .get_or_try_init(|| async {
                    let turn = this.one_alive.clone().lock_owned().await;
                    let stop = CancellationToken::new();
                    let svc = BuildletService::new(this.config.clone(), stop.clone())?;
                    Ok::<_, tower::BoxError>(Alive {
                        routes: buildlet::server::routes(svc),
                        _turn: turn,
                        _stop: stop.drop_guard(),
                    })
                })
                .await?;
            Ok(alive.routes.clone().oneshot(req).await?)
        })
    }
}

#[async_trait]
impl Pool for FakePool {
    fn kind(&self) -> &'static str {
        "fake"
    }
    fn host_type(&self) -> &str {
        &self.host_type
    }
    fn capacity(&self) -> usize {
        self.capacity.load(Ordering::SeqCst)
    }
    fn status(&self) -> PoolStatus {
        PoolStatus {
            kind: "fake",
            host_type: self.host_type.clone(),
            capacity: self.capacity(),
            in_use: 0,
            idle: 0,
            starting: 0,
            expected: None,
        }
    }
    async fn acquire(&self, cancel: &CancellationToken) -> Result<Lease, PoolError> {
        self.calls.send_modify(|c| *c += 1);
        if let Some(gate) = &self.gate {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(PoolError::Cancelled),
                p = gate.acquire() => p.expect("gate closed").forget(),
            }
        }
        let mode = *self.mode.lock().unwrap();
        match mode {
            Mode::Serve => self.lease(),
            Mode::Fail => Err(PoolError::Start {
                host_type: self.host_type.clone(),
                message: "no machines today (test)".into(),
            }),
            Mode::Never => {
                cancel.cancelled().await;
                Err(PoolError::Cancelled)
            }
        }
    }
}

// ---- the farm under test ----

fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(["-c", "user.name=test", "-c", "user.email=test@example.com"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A repo with one commit holding `hello.txt`; returns its hash.
fn make_repo(dir: &Path) -> String {
    std::fs::create_dir_all(dir).expect("mkdir repo");
    git(dir, &["init", "--quiet", "--initial-branch=main"]);
    std::fs::write(dir.join("hello.txt"), "hello\n").expect("write");
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "--quiet", "-m", "first"]);
    git(dir, &["rev-parse", "HEAD"])
}

struct Setup {
    /// The builder's steps, as TOML.
    steps: &'static str,
    build_timeout: &'static str,
    max_attempts: u32,
    /// More repos, as TOML, each backed by a repo dir the test made.
    extra_repos: Vec<(String, std::path::PathBuf, Vec<&'static str>)>,
    tuning: Tuning,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            steps: r#"[{ name = "check", command = ["sh", "-c", "test -f hello.txt && echo source-ok"] }]"#,
            build_timeout: "10m",
            max_attempts: 3,
            extra_repos: Vec::new(),
            tuning: Tuning {
                store_retry: Backoff {
                    first: Duration::from_millis(1),
                    max: Duration::from_millis(5),
                },
                attempt_backoff: Backoff {
                    first: Duration::from_millis(1),
                    max: Duration::from_millis(5),
                },
                // Tests call reconcile_once themselves.
                reconcile_every: Duration::from_secs(3600),
                max_queued: 1000,
            },
        }
    }
}

struct TestFarm {
    _tmp: tempfile::TempDir,
    farm: Arc<Farm>,
    store: Arc<FlakyStore>,
    rev: String,
    shutdown: CancellationToken,
}

impl Drop for TestFarm {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(pool: Arc<FakePool>, setup: Setup) -> TestFarm {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo_dir = tmp.path().join("repo");
    let rev = make_repo(&repo_dir);
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    // Extra repos first, so a broken one comes before "t".
    let mut repos = String::new();
    for (name, dir, branches) in &setup.extra_repos {
        let branches: Vec<String> = branches.iter().map(|b| format!("\"{b}\"")).collect();
        repos.push_str(&format!(
            "[[repos]]\nname = \"{name}\"\nurl = \"{}\"\nbranches = [{}]\n",
            dir.display(),
            branches.join(", ")
        ));
    }
    repos.push_str(&format!(
        "[[repos]]\nname = \"t\"\nurl = \"{}\"\nbranches = [\"main\"]\n",
        repo_dir.display()
    ));
    let toml = format!(
        r#"
[coordinator]
data_dir = "{data}"
max_attempts = {max_attempts}

[[host_types]]
name = "fake"
pool = {{ kind = "local", count = 1 }}

[[builders]]
name = "linux-amd64"
host_type = "fake"
build_timeout = "{timeout}"
steps = {steps}

[[builders]]
name = "linux-386"
host_type = "fake"
build_timeout = "{timeout}"
steps = {steps}

{repos}
"#,
        data = data.display(),
        max_attempts = setup.max_attempts,
        timeout = setup.build_timeout,
        steps = setup.steps,
    );
    let config = Config::from_toml_str(&toml, "test.toml").expect("config");
    let inner = buildfarm_store::open(&format!("sqlite://{}", data.join("db.sqlite").display()))
        .await
        .expect("store");
    let store = FlakyStore::new(inner);
    let mut mirrors = HashMap::new();
    for r in &config.repos {
        let m = Mirror::open(&r.name, &r.url, &data).await.expect("mirror");
        mirrors.insert(r.name.clone(), m);
    }
    let shutdown = CancellationToken::new();
    let pools: HashMap<String, Arc<dyn Pool>> = HashMap::from([("fake".to_owned(), pool as _)]);
    let farm = Farm::new(FarmParts {
        config,
        store: store.clone(),
        pools,
        mirrors,
        revdial_registry: None,
        master_key: vec![7; 32],
        data_dir: data,
        shutdown: shutdown.clone(),
        tasks: TaskTracker::new(),
        tuning: setup.tuning,
    });
    farm.start();
    TestFarm {
        _tmp: tmp,
        farm,
        store,
        rev,
        shutdown,
    }
}

impl TestFarm {
    fn new_build(&self, builder: &str) -> NewBuild {
        NewBuild {
            kind: BuildKind::PostSubmit,
            repo: "t".into(),
            branch: Some("main".into()),
            rev: self.rev.clone(),
            builder: builder.into(),
            try_id: None,
        }
    }

    async fn enqueue(&self, builder: &str) -> Build {
        self.farm
            .enqueue_new(&self.new_build(builder), None)
            .await
            .expect("enqueue")
            .expect("a new build")
    }
}

/// Waits for `id`'s final state as the farm announces it.
async fn wait_final(events: &mut broadcast::Receiver<FarmEvent>, id: &str) -> Build {
    tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await {
                Ok(FarmEvent::BuildChanged(b)) if b.id == id && b.state.is_final() => return b,
                Ok(_) => {}
                Err(e) => panic!("events: {e}"),
            }
        }
    })
    .await
    .expect("the build never finished")
}

// ---- the cases ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_that_passes_runs_its_steps_on_the_source() {
    let pool = FakePool::new(Mode::Serve, 1, None);
    let t = start(pool.clone(), Setup::default()).await;
    let mut events = t.farm.subscribe();
    let b = t.enqueue("linux-amd64").await;
    let done = wait_final(&mut events, &b.id).await;
    assert_eq!(done.state, BuildState::Ok, "{done:?}");
    let log = t.store.get_log(&b.id).await.expect("log").expect("a log");
    assert!(
        String::from_utf8_lossy(&log).contains("source-ok"),
        "{}",
        String::from_utf8_lossy(&log)
    );
    assert!(done.started_at.is_some() && done.finished_at.is_some());
    assert_eq!(t.farm.sources().built(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_past_its_timeout_fails_naming_the_timeout() {
    let pool = FakePool::new(Mode::Serve, 1, None);
    let t = start(
        pool,
        Setup {
            steps: r#"[{ name = "hang", command = ["sleep", "600"] }]"#,
            build_timeout: "1s",
            ..Setup::default()
        },
    )
    .await;
    let mut events = t.farm.subscribe();
    let b = t.enqueue("linux-amd64").await;
    let done = wait_final(&mut events, &b.id).await;
    assert_eq!(done.state, BuildState::Failed);
    assert_eq!(
        done.summary.as_deref(),
        Some("build timed out after 1s"),
        "{done:?}"
    );
    assert!(t.farm.active_builds().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infra_failures_give_up_after_max_attempts() {
    let pool = FakePool::new(Mode::Fail, 1, None);
    let t = start(
        pool.clone(),
        Setup {
            max_attempts: 3,
            ..Setup::default()
        },
    )
    .await;
    let mut events = t.farm.subscribe();
    let b = t.enqueue("linux-amd64").await;
    let done = wait_final(&mut events, &b.id).await;
    assert_eq!(done.state, BuildState::InfraFailure);
    let summary = done.summary.unwrap_or_default();
    assert!(
        summary.starts_with("infra failure after 3 attempts") && summary.contains("no machines"),
        "{summary}"
    );
    assert_eq!(pool.calls(), 3);
    let attempts = t.store.list_attempts(&b.id).await.expect("attempts");
    assert_eq!(attempts.len(), 3, "{attempts:?}");
    assert!(
        attempts
            .iter()
            .all(|a| a.state == Some(BuildState::InfraFailure)),
        "{attempts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_queued_build_stores_it_cancelled_and_it_never_runs() {
    // No capacity: the build stays queued.
    let pool = FakePool::new(Mode::Serve, 0, None);
    let t = start(pool.clone(), Setup::default()).await;
    let mut events = t.farm.subscribe();
    let b = t.enqueue("linux-amd64").await;
    assert_eq!(
        t.farm.queue_snapshot().iter().map(|q| q.len).sum::<usize>(),
        1
    );
    assert!(t.farm.cancel_build(&b.id).await.expect("cancel"));
    let done = wait_final(&mut events, &b.id).await;
    assert_eq!(done.state, BuildState::Cancelled);
    assert_eq!(
        t.store.get_build(&b.id).await.expect("build").state,
        BuildState::Cancelled
    );
    assert!(t.farm.queue_snapshot().iter().all(|q| q.len == 0));
    // Capacity appears: nothing is left to run.
    pool.capacity.store(1, Ordering::SeqCst);
    t.farm.dispatch_once();
    assert_eq!(pool.calls(), 0);
    assert!(t.farm.active_builds().is_empty());
    // A second cancel finds nothing.
    assert!(!t.farm.cancel_build(&b.id).await.expect("cancel again"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_between_pop_and_run_is_found_and_ends_the_build() {
    // Acquire blocks until the test lets it go: the build is popped but not running.
    let gate = Arc::new(Semaphore::new(0));
    let pool = FakePool::new(Mode::Serve, 1, Some(gate.clone()));
    let t = start(pool.clone(), Setup::default()).await;
    let mut events = t.farm.subscribe();
    let b = t.enqueue("linux-amd64").await;
    pool.wait_calls(1).await;
    // Out of the queue, and listed active from the moment it was popped.
    assert!(t.farm.queue_snapshot().iter().all(|q| q.len == 0));
    let active = t.farm.active_builds();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].build_id, b.id);
    assert_eq!(active[0].builder, "linux-amd64");
    assert!(
        t.farm.cancel_build(&b.id).await.expect("cancel"),
        "cancel must find a popped build"
    );
    // Letting acquire go now changes nothing: the build is over.
    gate.add_permits(1);
    let done = wait_final(&mut events, &b.id).await;
    assert_eq!(done.state, BuildState::Cancelled, "{done:?}");
    assert_eq!(pool.leased.load(Ordering::SeqCst), 0);
    assert_eq!(t.store.ok_calls("start_attempt"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_while_the_runner_first_reads_the_store_is_found_too() {
    // The narrowest window: popped, and the runner still reading the build's row.
    let pool = FakePool::new(Mode::Serve, 1, None);
    let t = start(pool.clone(), Setup::default()).await;
    let gate = Arc::new(Semaphore::new(0));
    *t.store.get_build_gate.lock().unwrap() = Some(gate.clone());
    let mut events = t.farm.subscribe();
    let mut reads = t.store.get_build_calls.subscribe();
    let b = t.enqueue("linux-amd64").await;
    tokio::time::timeout(WAIT, reads.wait_for(|n| *n >= 1))
        .await
        .expect("the runner never read the build")
        .expect("store gone");
    assert_eq!(t.farm.active_builds().len(), 1);
    assert!(
        t.farm.cancel_build(&b.id).await.expect("cancel"),
        "cancel must find a build whose runner has not read it yet"
    );
    *t.store.get_build_gate.lock().unwrap() = None;
    gate.add_permits(100);
    let done = wait_final(&mut events, &b.id).await;
    assert_eq!(done.state, BuildState::Cancelled, "{done:?}");
    assert_eq!(
        pool.calls(),
        0,
        "a cancelled build must not lease a buildlet"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_resource_exhausted_and_stores_nothing() {
    let pool = FakePool::new(Mode::Serve, 0, None);
    let t = start(
        pool,
        Setup {
            tuning: Tuning {
                max_queued: 1,
                ..Setup::default().tuning
            },
            ..Setup::default()
        },
    )
    .await;
    t.enqueue("linux-amd64").await;
    let e = t
        .farm
        .enqueue_new(&t.new_build("linux-386"), None)
        .await
        .expect_err("the queue is full");
    let status = e.to_status();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("queue is full"), "{status:?}");
    let e = t
        .farm
        .submit_try(&NewTry {
            repo: "t".into(),
            rev: t.rev.clone(),
            patch: None,
            builders: vec!["linux-amd64".into(), "linux-386".into()],
            user: "gopher".into(),
        })
        .await
        .expect_err("the queue is full");
    assert_eq!(e.to_status().code(), tonic::Code::ResourceExhausted);
    // Nothing stored for the refused work.
    let unfinished = t.store.list_unfinished_builds().await.expect("list");
    assert_eq!(unfinished.len(), 1, "{unfinished:?}");
    assert!(t.store.list_try_runs(10).await.expect("tries").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_that_never_yields_a_buildlet_fails_the_build_as_infra() {
    let pool = FakePool::new(Mode::Never, 1, None);
    let t = start(
        pool.clone(),
        Setup {
            build_timeout: "1s",
            max_attempts: 2,
            ..Setup::default()
        },
    )
    .await;
    let mut events = t.farm.subscribe();
    let b = t.enqueue("linux-amd64").await;
    let done = wait_final(&mut events, &b.id).await;
    assert_eq!(done.state, BuildState::InfraFailure);
    let summary = done.summary.unwrap_or_default();
    assert!(
        summary.contains("after 2 attempts")
            && summary.contains("no buildlet of host type fake within 1s"),
        "{summary}"
    );
    assert_eq!(pool.calls(), 2);
    assert!(t.farm.active_builds().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_broken_repo_or_branch_does_not_stop_the_poller_for_the_others() {
    let pool = FakePool::new(Mode::Serve, 0, None);
    let spare = tempfile::tempdir().expect("tempdir");
    let broken_dir = spare.path().join("broken");
    make_repo(&broken_dir);
    let t = start(
        pool,
        Setup {
            // Listed before "t".
            extra_repos: vec![("broken".into(), broken_dir.clone(), vec!["main"])],
            ..Setup::default()
        },
    )
    .await;
    // The mirror exists; now its origin is gone, so every fetch fails.
    std::fs::remove_dir_all(&broken_dir).expect("remove origin");
    let report = coordinator::poller::poll_once(&t.farm).await;
    let mut problems: Vec<(String, Option<String>)> = report
        .problems
        .iter()
        .map(|p| (p.repo.clone(), p.branch.clone()))
        .collect();
    problems.sort();
    assert_eq!(
        problems,
        vec![("broken".to_owned(), None)],
        "{:#?}",
        report.problems
    );
    // "t", after the broken repos, still got one build per builder.
    assert_eq!(report.enqueued, 2, "{report:?}");
    assert_eq!(t.farm.poll_problems(), report.problems);
    let checks = coordinator::http::status::poll_checks(&t.farm.poll_problems());
    assert!(
        checks.iter().any(|c| c
            .message
            .starts_with("polling broken failed: fetching repo broken")),
        "{checks:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_branch_is_reported_and_the_next_branch_still_polled() {
    let pool = FakePool::new(Mode::Serve, 0, None);
    let spare = tempfile::tempdir().expect("tempdir");
    let other = spare.path().join("other");
    make_repo(&other);
    let t = start(
        pool,
        Setup {
            extra_repos: vec![("other".into(), other.clone(), vec!["nosuch", "main"])],
            ..Setup::default()
        },
    )
    .await;
    let report = coordinator::poller::poll_once(&t.farm).await;
    assert_eq!(report.problems.len(), 1, "{:#?}", report.problems);
    assert_eq!(report.problems[0].repo, "other");
    assert_eq!(report.problems[0].branch.as_deref(), Some("nosuch"));
    // "other"'s main and "t"'s main: one build per builder each.
    assert_eq!(report.enqueued, 4, "{report:?}");
    assert_eq!(t.farm.poll_problems().len(), 1);
    // Shown until a pass is clean: the branch appears, the problem goes.
    git(&other, &["branch", "nosuch"]);
    let report = coordinator::poller::poll_once(&t.farm).await;
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    assert!(t.farm.poll_problems().is_empty());
    // Same commits, so nothing new.
    assert_eq!(report.enqueued, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_failing_mid_build_delays_the_result_which_is_recorded_exactly_once() {
    let pool = FakePool::new(Mode::Serve, 1, None);
    let t = start(pool, Setup::default()).await;
    // Down for the attempt's start and the result; the last result write reaches the
    // store but its answer is lost, so the retry meets "already finished".
    t.store.set(
        "start_attempt",
        Faults {
            fail: 3,
            lose_reply: 0,
        },
    );
    t.store.set(
        "finish_build",
        Faults {
            fail: 3,
            lose_reply: 1,
        },
    );
    let mut events = t.farm.subscribe();
    let b = t.enqueue("linux-amd64").await;
    let done = wait_final(&mut events, &b.id).await;
    assert_eq!(done.state, BuildState::Ok, "{done:?}");
    assert_eq!(t.store.ok_calls("finish_build"), 1);
    assert_eq!(t.store.ok_calls("start_attempt"), 1);
    let attempts = t.store.list_attempts(&b.id).await.expect("attempts");
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    let stored = t.store.get_build(&b.id).await.expect("build");
    assert_eq!(stored.state, BuildState::Ok);
    assert!(t.store.get_log(&b.id).await.expect("log").is_some());
    // Exactly one final announcement.
    let mut finals = 0;
    while let Ok(ev) = events.try_recv() {
        let FarmEvent::BuildChanged(x) = ev;
        if x.id == b.id && x.state.is_final() {
            finals += 1;
        }
    }
    assert_eq!(finals, 0, "a second final event");
    assert!(t.farm.active_builds().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_row_with_nothing_behind_it_is_queued_again_by_the_reconciler() {
    let pool = FakePool::new(Mode::Serve, 1, None);
    let t = start(pool.clone(), Setup::default()).await;
    // Stored and marked running, as a runner that died without a trace would leave it;
    // never given to the dispatcher.
    let b = t
        .store
        .enqueue_build(&t.new_build("linux-amd64"))
        .await
        .expect("store")
        .expect("new");
    t.store
        .start_attempt(&b.id, "ghost")
        .await
        .expect("attempt");
    let mut events = t.farm.subscribe();
    // The first pass only suspects it (it could be on its way to the queue).
    assert_eq!(t.farm.reconcile_once().await.expect("pass 1"), 0);
    assert_eq!(pool.calls(), 0);
    assert_eq!(t.farm.reconcile_once().await.expect("pass 2"), 1);
    let done = wait_final(&mut events, &b.id).await;
    assert_eq!(done.state, BuildState::Ok, "{done:?}");
    let attempts = t.store.list_attempts(&b.id).await.expect("attempts");
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(attempts[0].buildlet, "ghost");
    assert_eq!(attempts[0].state, Some(BuildState::InfraFailure));
    assert_eq!(attempts[1].state, Some(BuildState::Ok));
    // Finished: later passes leave it alone.
    assert_eq!(t.farm.reconcile_once().await.expect("pass 3"), 0);
    assert_eq!(t.farm.reconcile_once().await.expect("pass 4"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_queued_in_the_store_are_not_taken_as_stranded() {
    // Queued work the dispatcher holds is never touched by the reconciler.
    let pool = FakePool::new(Mode::Serve, 0, None);
    let t = start(pool, Setup::default()).await;
    t.enqueue("linux-amd64").await;
    for _ in 0..3 {
        assert_eq!(t.farm.reconcile_once().await.expect("pass"), 0);
    }
    assert_eq!(
        t.farm.queue_snapshot().iter().map(|q| q.len).sum::<usize>(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_builds_of_one_commit_make_one_source_tarball() {
    let pool = FakePool::new(Mode::Serve, 20, None);
    let t = start(pool, Setup::default()).await;
    let mut events = t.farm.subscribe();
    // Twenty builds of the same rev at once: try runs of two builders, ten times.
    let mut ids = Vec::new();
    for _ in 0..10 {
        let (_, builds) = t
            .farm
            .submit_try(&NewTry {
                repo: "t".into(),
                rev: t.rev.clone(),
                patch: None,
                builders: vec!["linux-amd64".into(), "linux-386".into()],
                user: "gopher".into(),
            })
            .await
            .expect("submit");
        ids.extend(builds.into_iter().map(|b| b.id));
    }
    let mut left: std::collections::HashSet<String> = ids.iter().cloned().collect();
    tokio::time::timeout(WAIT, async {
        while !left.is_empty() {
            if let Ok(FarmEvent::BuildChanged(b)) = events.recv().await
                && b.state.is_final()
            {
                assert_eq!(b.state, BuildState::Ok, "{b:?}");
                left.remove(&b.id);
            }
        }
    })
    .await
    .expect("builds never finished");
    assert_eq!(t.farm.sources().built(), 1);
}
