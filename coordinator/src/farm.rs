//! The running farm: what it is made of (config, store, pools, mirrors, live logs),
//! the one place build results are recorded, and the tasks that move work: the
//! dispatch loop (woken by events only), the runner tasks it spawns, and the
//! reconciler. Its fields are private; other modules use the narrow methods below and
//! follow [`FarmEvent`]s, which carry the new state so listeners need not re-read the
//! store.
//!
//! One owner per stage: the store owns the record, the [`Dispatcher`] owns queued and
//! active work (registered active at pop, before anything is spawned), `runner` turns a
//! build into an outcome, and [`Farm::record`] alone writes results.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use buildfarm_config::Config;
use buildfarm_scheduler::{Policy, QueueStat, Timestamp};
use buildfarm_store::{Build, BuildKind, BuildState, NewBuild, NewTry, Store, StoreError, TryRun};
use tokio::sync::{broadcast, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

use crate::artifacts::{Artifacts, CollectSpec, RequestError, Target};
use crate::dispatcher::{Cancelled, Dispatcher, QueueFull, Ready, Slot};
use crate::git::Mirror;
use crate::logs::LogHub;
use crate::plan::workspace::Workspaces;
use crate::pool::Pool;
use crate::reconcile::Reconciler;
use crate::retry::{Backoff, store_op};
use crate::runner::{RunEnv, RunOutcome};
use crate::sources::SourceCache;

pub use crate::dispatcher::{ActiveBuild, InstanceGrant};

/// A change other parts watch (try watchers, metrics, the status page), with the
/// build's new state.
#[derive(Debug, Clone)]
pub enum FarmEvent {
    BuildChanged(Build),
}

/// Knobs that are not in the config file: defaults for production, small values in
/// tests.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Between retries of a store write during a build.
    pub store_retry: Backoff,
    /// Between attempts of a build after an infra failure.
    pub attempt_backoff: Backoff,
    /// How often the reconciler compares the store with the dispatcher.
    pub reconcile_every: Duration,
    /// Most work items queued at once; more is refused with `ResourceExhausted`.
    pub max_queued: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            store_retry: Backoff::default(),
            attempt_backoff: Backoff {
                first: Duration::from_millis(200),
                max: Duration::from_secs(10),
            },
            reconcile_every: Duration::from_secs(30),
            max_queued: Policy::default().max_items,
        }
    }
}

/// What a farm is made of; see `app` for how each part is built.
pub struct FarmParts {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub pools: HashMap<String, Arc<dyn Pool>>,
    pub mirrors: HashMap<String, Mirror>,
    pub revdial_registry: Option<revdial::Registry>,
    pub master_key: Vec<u8>,
    pub data_dir: PathBuf,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    pub tuning: Tuning,
}

/// A poll that went wrong, shown on the status page until that repo and branch poll
/// cleanly again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PollProblem {
    pub repo: String,
    /// `None` when the whole repo failed (its fetch).
    pub branch: Option<String>,
    pub error: String,
    pub at_unix_ms: i64,
}

/// Why new work was not queued.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error(transparent)]
    Full(#[from] QueueFull),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("build {build_id} names unknown builder {builder}")]
    UnknownBuilder { build_id: String, builder: String },
}

/// Why an artifact request was not queued (or a GET found nothing).
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("unknown version {version:?} of repo {repo}")]
    UnknownVersion { repo: String, version: String },
    #[error(transparent)]
    Full(#[from] QueueFull),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

impl ArtifactError {
    /// The HTTP status of the answer.
    pub fn status(&self) -> u16 {
        match self {
            ArtifactError::Request(e) => e.status(),
            ArtifactError::UnknownVersion { .. } => 404,
            ArtifactError::Full(_) => 429,
            ArtifactError::Store(_) => 503,
        }
    }
}

/// An artifact request as the farm took it.
#[derive(Debug, Clone)]
pub struct ArtifactRequest {
    pub build: Build,
    /// True when this request queued the build; false when it shares one.
    pub created: bool,
    pub target: Target,
}

impl EnqueueError {
    /// The answer an API caller gets.
    pub fn to_status(&self) -> tonic::Status {
        match self {
            EnqueueError::Full(e) => tonic::Status::resource_exhausted(e.to_string()),
            EnqueueError::Store(e) => tonic::Status::unavailable(format!("store: {e}")),
            EnqueueError::UnknownBuilder { .. } => {
                tonic::Status::invalid_argument(self.to_string())
            }
        }
    }
}

pub struct Farm {
    config: Config,
    store: Arc<dyn Store>,
    pools: HashMap<String, Arc<dyn Pool>>,
    mirrors: HashMap<String, Mirror>,
    revdial_registry: Option<revdial::Registry>,
    logs: LogHub,
    master_key: Vec<u8>,
    data_dir: PathBuf,
    events: broadcast::Sender<FarmEvent>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Base URL of the HTTP side, for links in API answers.
    base_url: Mutex<String>,
    started_at: SystemTime,
    tuning: Tuning,
    dispatcher: Arc<Dispatcher>,
    sources: Arc<SourceCache>,
    workspaces: Arc<Workspaces>,
    reconciler: Mutex<Reconciler>,
    poll_problems: Mutex<Vec<PollProblem>>,
    artifacts: Arc<Artifacts>,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn now_ts() -> Timestamp {
    Timestamp::from_millis(now_ms().max(0) as u64)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes a build from the active set when its task ends, however it ends.
struct ActiveGuard {
    dispatcher: Arc<Dispatcher>,
    build_id: String,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.dispatcher.finish_active(&self.build_id);
    }
}

impl Farm {
    pub fn new(parts: FarmParts) -> Arc<Farm> {
        let (events, _) = broadcast::channel(1024);
        let policy = Policy {
            interactive_share_percent: parts.config.limits.interactive_share_percent,
            max_items: parts.tuning.max_queued,
            ..Policy::default()
        };
        let sources = Arc::new(SourceCache::new(
            parts.config.coordinator.source_cache_bytes.as_u64(),
            parts.mirrors.values(),
        ));
        let workspaces = Workspaces::new(
            parts.data_dir.join("workspaces"),
            parts.config.coordinator.workspace_bytes.as_u64(),
            parts.config.coordinator.workspace_max_age,
        );
        let artifacts = Arc::new(Artifacts::new(
            &parts.data_dir,
            parts.store.clone(),
            parts.config.artifacts.clone(),
        ));
        Arc::new(Farm {
            artifacts,
            config: parts.config,
            store: parts.store,
            pools: parts.pools,
            mirrors: parts.mirrors,
            revdial_registry: parts.revdial_registry,
            logs: LogHub::default(),
            master_key: parts.master_key,
            data_dir: parts.data_dir,
            events,
            shutdown: parts.shutdown,
            tasks: parts.tasks,
            base_url: Mutex::new(String::new()),
            started_at: SystemTime::now(),
            tuning: parts.tuning,
            dispatcher: Dispatcher::new(policy),
            sources,
            workspaces,
            reconciler: Mutex::new(Reconciler::default()),
            poll_problems: Mutex::new(Vec::new()),
        })
    }

    // ---- what the farm is made of (read-only) ----

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn pool(&self, host_type: &str) -> Option<&Arc<dyn Pool>> {
        self.pools.get(host_type)
    }

    pub fn pools(&self) -> impl Iterator<Item = &Arc<dyn Pool>> {
        self.pools.values()
    }

    pub fn mirror(&self, repo: &str) -> Option<&Mirror> {
        self.mirrors.get(repo)
    }

    pub fn revdial_registry(&self) -> Option<&revdial::Registry> {
        self.revdial_registry.as_ref()
    }

    pub fn logs(&self) -> &LogHub {
        &self.logs
    }

    pub fn master_key(&self) -> &[u8] {
        &self.master_key
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    pub fn started_at(&self) -> SystemTime {
        self.started_at
    }

    pub fn artifacts(&self) -> &Arc<Artifacts> {
        &self.artifacts
    }

    pub fn sources(&self) -> &SourceCache {
        &self.sources
    }

    pub fn base_url(&self) -> String {
        lock(&self.base_url).clone()
    }

    pub fn set_base_url(&self, url: String) {
        *lock(&self.base_url) = url;
    }

    pub fn subscribe(&self) -> broadcast::Receiver<FarmEvent> {
        self.events.subscribe()
    }

    fn changed(&self, build: Build) {
        let _ = self.events.send(FarmEvent::BuildChanged(build));
    }

    // ---- new work ----

    fn host_type_of(&self, build: &Build) -> Result<String, EnqueueError> {
        if build.kind == BuildKind::Artifact {
            return self
                .artifact_plan(build)
                .map(|p| p.builder.host_type)
                .map_err(|_| EnqueueError::UnknownBuilder {
                    build_id: build.id.clone(),
                    builder: build.builder.clone(),
                });
        }
        self.config
            .builder(&build.builder)
            .map(|b| b.host_type.clone())
            .ok_or_else(|| EnqueueError::UnknownBuilder {
                build_id: build.id.clone(),
                builder: build.builder.clone(),
            })
    }

    /// Queues a build that is already stored (resume, reconciler).
    pub fn enqueue(&self, build: &Build, commit_time_ms: Option<i64>) -> Result<(), EnqueueError> {
        let host_type = self.host_type_of(build)?;
        self.dispatcher
            .push_build(build, &host_type, commit_time_ms, now_ts())?;
        Ok(())
    }

    /// Stores and queues a new build as one operation. A full queue refuses it before
    /// anything is stored; `None` when the store already has it (polling is idempotent).
    /// Should the queue fill between the check and the push, the stored build waits for
    /// the reconciler.
    pub async fn enqueue_new(
        &self,
        new: &NewBuild,
        commit_time_ms: Option<i64>,
    ) -> Result<Option<Build>, EnqueueError> {
        self.dispatcher.has_room(1)?;
        let Some(build) = self.store.enqueue_build(new).await? else {
            return Ok(None);
        };
        if let Err(e) = self.enqueue(&build, commit_time_ms) {
            warn!(build_id = %build.id, error = %e, "stored build not queued; the reconciler will");
        }
        self.changed(build.clone());
        Ok(Some(build))
    }

    /// Stores a try run and queues its builds as one operation; a full queue refuses
    /// the whole run before anything is stored.
    pub async fn submit_try(&self, new: &NewTry) -> Result<(TryRun, Vec<Build>), EnqueueError> {
        self.dispatcher.has_room(new.builders.len())?;
        let (run, builds) = self.store.create_try(new).await?;
        for b in &builds {
            if let Err(e) = self.enqueue(b, None) {
                warn!(build_id = %b.id, error = %e, "stored try build not queued; the reconciler will");
            }
            self.changed(b.clone());
        }
        Ok((run, builds))
    }

    /// The plan of a stored artifact build (its `builder` is the target `GOOS-GOARCH`).
    fn artifact_plan(&self, build: &Build) -> Result<crate::artifacts::ArtifactPlan, RequestError> {
        let (goos, goarch) = build
            .builder
            .split_once('-')
            .ok_or_else(|| RequestError::BadGoos(build.builder.clone()))?;
        let target = Target::parse(goos, goarch)?;
        crate::artifacts::plan::plan(&self.config, &build.repo, &target)
    }

    /// Checks an artifact request and resolves its version to a commit (fetching the
    /// repo's mirror first unless the version is a full hash the mirror has).
    async fn artifact_key(
        &self,
        repo: &str,
        goos: &str,
        goarch: &str,
        version: &str,
        fetch: bool,
    ) -> Result<(Target, String), ArtifactError> {
        let target = Target::parse(goos, goarch)?;
        crate::artifacts::plan::check_version(version)?;
        crate::artifacts::plan::plan(&self.config, repo, &target)?;
        let mirror = self
            .mirror(repo)
            .ok_or_else(|| RequestError::UnknownRepo(repo.to_owned()))?;
        let known = if crate::artifacts::plan::is_full_hash(version) {
            mirror.resolve(version).await.ok()
        } else {
            None
        };
        let commit = match known {
            Some(c) => c,
            None => {
                if fetch && let Err(e) = mirror.fetch().await {
                    warn!(repo, error = %format!("{e:#}"), "fetching before resolving an artifact version");
                }
                mirror
                    .resolve(version)
                    .await
                    .map_err(|_| ArtifactError::UnknownVersion {
                        repo: repo.to_owned(),
                        version: version.to_owned(),
                    })?
            }
        };
        Ok((target, commit))
    }

    /// `POST /artifacts/...`: queues (or shares) the build of `repo` at `version` for
    /// `GOOS`/`GOARCH`. A branch or tag is resolved to its commit first, so identical
    /// requests (same repo, commit and target) share one build.
    pub async fn request_artifact(
        &self,
        repo: &str,
        goos: &str,
        goarch: &str,
        version: &str,
    ) -> Result<ArtifactRequest, ArtifactError> {
        let (target, commit) = self.artifact_key(repo, goos, goarch, version, true).await?;
        self.dispatcher.has_room(1)?;
        let (build, created) = self
            .store
            .request_artifact_build(&NewBuild {
                kind: BuildKind::Artifact,
                repo: repo.to_owned(),
                branch: None,
                rev: commit,
                builder: target.name(),
                try_id: None,
            })
            .await?;
        if created {
            if let Err(e) = self.enqueue(&build, None) {
                warn!(build_id = %build.id, error = %e, "stored artifact build not queued; the reconciler will");
            }
            info!(build_id = %build.id, repo, version, target = %target.name(), rev = %build.rev, "artifact build queued");
            self.changed(build.clone());
        }
        Ok(ArtifactRequest {
            build,
            created,
            target,
        })
    }

    /// `GET /artifacts/...`: the newest build of that artifact, if one was asked for.
    /// The version is resolved with the mirror as it stands (no fetch).
    pub async fn find_artifact(
        &self,
        repo: &str,
        goos: &str,
        goarch: &str,
        version: &str,
    ) -> Result<(Target, Option<Build>), ArtifactError> {
        let (target, commit) = self
            .artifact_key(repo, goos, goarch, version, false)
            .await?;
        let build = self
            .store
            .latest_artifact_build(repo, &commit, &target.name())
            .await?;
        Ok((target, build))
    }

    /// Cancels a build, queued or running. False if it was neither (or already final).
    pub async fn cancel_build(&self, build_id: &str) -> anyhow::Result<bool> {
        match self.dispatcher.cancel(build_id) {
            Some(Cancelled::Signalled) => Ok(true),
            Some(Cancelled::Dequeued) => self.cancel_stored(build_id).await,
            // Stored but in neither place (stranded): cancel it in the store.
            None => {
                let build = self.store.get_build(build_id).await?;
                if build.state.is_final() {
                    return Ok(false);
                }
                self.cancel_stored(build_id).await
            }
        }
    }

    async fn cancel_stored(&self, build_id: &str) -> anyhow::Result<bool> {
        let cancelled = self.store.cancel_build(build_id).await?;
        if cancelled {
            let mut build = self.store.get_build(build_id).await?;
            build.state = BuildState::Cancelled;
            self.changed(build);
        }
        Ok(cancelled)
    }

    // ---- gomote requests ----

    /// Asks for an interactive (gomote) buildlet of `host_type`; the receiver gets the
    /// lease when the scheduler reaches the request. `request_id` identifies it for
    /// [`Farm::queue_position`] and [`Farm::cancel_instance_request`].
    pub fn request_instance(
        &self,
        request_id: &str,
        host_type: &str,
    ) -> oneshot::Receiver<InstanceGrant> {
        self.dispatcher
            .request_instance(request_id, host_type, now_ts())
    }

    pub fn cancel_instance_request(&self, request_id: &str) {
        self.dispatcher.cancel_instance_request(request_id)
    }

    pub fn queue_position(&self, request_id: &str) -> Option<usize> {
        self.dispatcher.queue_position(request_id, now_ts())
    }

    /// When interactive work already holds its share of `host_type`, says so (for the
    /// gomote create progress line); `None` while there is room.
    pub fn interactive_share_full(&self, host_type: &str) -> Option<String> {
        let capacity = self.pools.get(host_type)?.capacity();
        let (held, limit) = self.dispatcher.interactive_held(host_type, capacity);
        // With no capacity at all the wait is the pool's, not the share's.
        (capacity > 0 && held >= limit).then(|| {
            format!(
                "gomote instances hold {held} of host type {host_type}'s {capacity} buildlets, its interactive share ({}%, limits.interactive_share_percent); try and post-submit builds get the rest",
                self.config.limits.interactive_share_percent
            )
        })
    }

    // ---- views ----

    pub fn queue_snapshot(&self) -> Vec<QueueStat> {
        self.dispatcher.queue_snapshot(now_ts())
    }

    pub fn active_builds(&self) -> Vec<ActiveBuild> {
        self.dispatcher.active_builds()
    }

    pub fn poll_problems(&self) -> Vec<PollProblem> {
        lock(&self.poll_problems).clone()
    }

    /// Replaces the problems of the repos a poll pass covered.
    pub fn set_poll_problems(&self, problems: Vec<PollProblem>) {
        *lock(&self.poll_problems) = problems;
    }

    // ---- recovery ----

    /// Re-queues the work a previous coordinator left: queued builds, and running ones
    /// (whose open attempt the store records as an infra failure).
    pub async fn resume(&self) -> anyhow::Result<usize> {
        let builds = self.store.resume_after_restart().await?;
        let mut n = 0;
        for b in &builds {
            match self.enqueue(b, None) {
                Ok(()) => n += 1,
                Err(e @ EnqueueError::UnknownBuilder { .. }) => {
                    warn!(build_id = %b.id, error = %e, "cannot resume build; cancelling it");
                    let _ = self.store.cancel_build(&b.id).await;
                }
                Err(e) => {
                    warn!(build_id = %b.id, error = %e, "cannot resume build yet; the reconciler will")
                }
            }
        }
        if n > 0 {
            info!(builds = n, "resumed unfinished work");
        }
        Ok(n)
    }

    /// One reconciler pass: unfinished builds in the store that the dispatcher has not
    /// had queued or active for two passes in a row are queued again (a running one has
    /// its open attempt closed as an infra failure first). Returns how many.
    pub async fn reconcile_once(&self) -> anyhow::Result<usize> {
        let unfinished = self.store.list_unfinished_builds().await?;
        let stranded = lock(&self.reconciler)
            .pass(unfinished.iter().map(|b| b.id.as_str()), |id| {
                self.dispatcher.knows(id)
            });
        let mut n = 0;
        for id in stranded {
            let Some(b) = unfinished.iter().find(|b| b.id == id) else {
                continue;
            };
            warn!(build_id = %b.id, state = %b.state, "build fell between store and dispatcher; queueing it again");
            if b.state == BuildState::Running
                && let Err(e) = self.store.requeue_build(&b.id).await
            {
                warn!(build_id = %b.id, error = %e, "cannot requeue stranded build");
                continue;
            }
            match self.enqueue(b, None) {
                Ok(()) => n += 1,
                Err(e @ EnqueueError::UnknownBuilder { .. }) => {
                    let log = format!("{e}\n");
                    let mut b = b.clone();
                    self.record(
                        &mut b,
                        BuildState::Failed,
                        "unknown builder",
                        log.as_bytes(),
                    )
                    .await;
                }
                Err(e) => warn!(build_id = %b.id, error = %e, "cannot queue stranded build"),
            }
        }
        Ok(n)
    }

    async fn reconcile_loop(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.tuning.reconcile_every) => {}
            }
            if let Err(e) = self.reconcile_once().await {
                warn!(error = %format!("{e:#}"), "reconciling the store with the queue");
            }
        }
    }

    // ---- running ----

    /// Starts the farm's own tasks: the dispatch loop, a waker per pool whose capacity
    /// can change by itself, and the reconciler.
    pub fn start(self: &Arc<Self>) {
        self.tasks.spawn(self.clone().dispatch_loop());
        if let Err(e) = self.artifacts.blobs().clear_tmp() {
            warn!(error = %format!("{e:#}"), "clearing temporary artifact files");
        }
        self.tasks
            .spawn(self.artifacts.clone().sweep_loop(self.shutdown.clone()));
        self.tasks.spawn(self.clone().reconcile_loop());
        for pool in self.pools.values() {
            let (pool, dispatcher, stop) =
                (pool.clone(), self.dispatcher.clone(), self.shutdown.clone());
            self.tasks.spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = pool.capacity_changed() => dispatcher.wake(),
                    }
                }
            });
        }
    }

    /// The dispatcher loop: start as much queued work as the pools have room for, in
    /// the scheduler's order, whenever woken (new work, freed capacity, a pool's
    /// capacity changed). No timer.
    async fn dispatch_loop(self: Arc<Self>) {
        loop {
            self.dispatch_once();
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = self.dispatcher.woken() => {}
            }
        }
    }

    /// Pops and starts what fits now. Public for tests that drive the farm step by step.
    pub fn dispatch_once(self: &Arc<Self>) {
        let ready = self
            .dispatcher
            .pop_ready(&self.pools, &self.shutdown, now_ts(), now_ms());
        for r in ready {
            match r {
                Ready::Build {
                    build_id,
                    pool,
                    slot,
                    cancel,
                } => {
                    self.tasks
                        .spawn(self.clone().run_build(build_id, pool, slot, cancel));
                }
                Ready::Instance {
                    request_id,
                    waiter,
                    pool,
                    slot,
                } => {
                    let cancel = self.shutdown.child_token();
                    self.tasks.spawn(async move {
                        match pool.acquire(&cancel).await {
                            // If the requester went away meanwhile, the grant is dropped
                            // and the buildlet and slot go back.
                            Ok(lease) => {
                                let _ = waiter.send((lease, slot));
                            }
                            Err(e) => {
                                warn!(request_id, error = %e, "no buildlet for gomote request")
                            }
                        }
                    });
                }
            }
        }
    }

    async fn run_build(
        self: Arc<Self>,
        build_id: String,
        pool: Arc<dyn Pool>,
        slot: Slot,
        cancel: CancellationToken,
    ) {
        let span = info_span!("build", build_id = %build_id);
        async move {
            let _active = ActiveGuard {
                dispatcher: self.dispatcher.clone(),
                build_id: build_id.clone(),
            };
            let mut build =
                match store_op("get_build", self.tuning.store_retry, &self.shutdown, || {
                    self.store.get_build(&build_id)
                })
                .await
                {
                    None => return,
                    Some(Ok(b)) => b,
                    Some(Err(e)) => {
                        warn!(error = %e, "queued build vanished from the store");
                        return;
                    }
                };
            if build.state.is_final() {
                return;
            }
            let planned = if build.kind == BuildKind::Artifact {
                self.artifact_plan(&build)
                    .map(|p| (p.builder, Some(p.collect)))
                    .ok()
            } else {
                self.config.builder(&build.builder).cloned().map(|b| {
                    let collect = crate::artifacts::plan::declared(&b);
                    (b, collect)
                })
            };
            let Some((builder, collect)) = planned else {
                let log = format!("unknown builder {}\n", build.builder);
                self.record(
                    &mut build,
                    BuildState::Failed,
                    "unknown builder",
                    log.as_bytes(),
                )
                .await;
                return;
            };
            let keeps_files = collect.is_some();
            let collect: Option<(CollectSpec, Arc<Artifacts>)> =
                collect.map(|c| (c, self.artifacts.clone()));
            let log = self.logs.open(&build.id);
            let env = RunEnv {
                store: self.store.clone(),
                sources: self.sources.clone(),
                mirror: self.mirrors.get(&build.repo).cloned(),
                pool,
                base_env: crate::runner::builder_env(&self.config, &builder),
                builder,
                log: log.clone(),
                max_attempts: self.config.coordinator.max_attempts,
                collect,
                cancel,
                shutdown: self.shutdown.clone(),
                store_retry: self.tuning.store_retry,
                attempt_backoff: self.tuning.attempt_backoff,
                on_attempt: {
                    let (farm, build) = (self.clone(), build.clone());
                    Box::new(move |buildlet, attempt| {
                        farm.dispatcher.set_attempt(&build.id, buildlet, attempt);
                        let mut b = build.clone();
                        b.state = BuildState::Running;
                        b.attempts = attempt;
                        b.started_at.get_or_insert_with(now_ms);
                        farm.changed(b);
                    })
                },
                workspaces: self.workspaces.clone(),
                dispatcher: self.dispatcher.clone(),
                go_pairing: self.config.repo(&build.repo).and_then(|r| r.go.clone()),
                build_slot: std::sync::Mutex::new(Some(slot)),
            };
            match crate::runner::run(&env, &build).await {
                RunOutcome::Finished(state, summary) => {
                    self.record(&mut build, state, &summary, &log.contents())
                        .await;
                    if keeps_files && state == BuildState::Ok {
                        // New files may push the total past the retention limit.
                        if let Err(e) = self.artifacts.sweep(now_ms()).await {
                            warn!(error = %format!("{e:#}"), "artifact retention sweep failed");
                        }
                    }
                }
                RunOutcome::Stopped => {}
                RunOutcome::AlreadyFinal(why) => info!(why, "build already final in the store"),
            }
            // With its slot.
            drop(env);
            self.logs.close(&build.id);
        }
        .instrument(span)
        .await
    }

    /// Records a build's result exactly once, retrying while the store is unreachable
    /// (until shutdown, after which the next coordinator resumes the build), and tells
    /// watchers.
    pub async fn record(&self, build: &mut Build, state: BuildState, summary: &str, log: &[u8]) {
        let r = store_op(
            "finish_build",
            self.tuning.store_retry,
            &self.shutdown,
            || {
                self.store
                    .finish_build(&build.id, state, Some(summary), log)
            },
        )
        .await;
        match r {
            None => return,
            Some(Ok(())) => {
                info!(build_id = %build.id, builder = %build.builder, rev = %build.rev, result = %state, summary, "build finished");
                println!(
                    "build {} {} {} {}: {state} ({summary})",
                    build.repo,
                    short(&build.rev),
                    build.builder,
                    build.kind
                );
                // The stored row has the store's timestamps (metrics use them); one
                // read by the writer spares every listener its own.
                match self.store.get_build(&build.id).await {
                    Ok(b) => *build = b,
                    Err(_) => {
                        build.state = state;
                        build.summary = Some(summary.to_owned());
                        build.finished_at = Some(now_ms());
                    }
                }
            }
            // A retry after a write whose answer was lost: the first one counted.
            Some(Err(StoreError::AlreadyFinished { state: stored, .. })) => {
                build.state = stored;
            }
            Some(Err(e)) => {
                warn!(build_id = %build.id, error = %e, "the store refused the result");
                return;
            }
        }
        // Final in the store, so the reconciler will not look for it: no longer active
        // by the time anyone hears it finished.
        self.dispatcher.finish_active(&build.id);
        self.changed(build.clone());
    }
}

pub fn short(rev: &str) -> &str {
    rev.get(..10).unwrap_or(rev)
}
