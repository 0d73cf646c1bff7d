//! The `Store` trait: everything the coordinator records about commits, builds and try runs.
//!
//! Implemented by `SqliteStore` and `PostgresStore`; callers hold an `Arc<dyn Store>` from
//! [`crate::open`].

use crate::error::StoreError;
use crate::model::{
    Artifact, Attempt, Build, BuildState, Commit, NewArtifact, NewBuild, NewTry, NewUserToken,
    TryRun, UserToken,
};

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[async_trait::async_trait]
pub trait Store: Send + Sync {
    /// "sqlite" or "postgres", for the status page.
    fn backend(&self) -> &'static str;

    /// Round-trips a trivial query; an error means "store unreachable".
    async fn ping(&self) -> Result<()>;

    /// Closes the connection pool; later calls fail.
    async fn close(&self);

    // ---- commits ----

    /// Inserts the commit, or updates its details if (repo, branch, hash) is known.
    /// Returns true when the commit was new.
    async fn upsert_commit(&self, commit: &Commit) -> Result<bool>;

    /// Commits of a branch, newest first (commit time, then latest inserted first).
    async fn list_commits(
        &self,
        repo: &str,
        branch: &str,
        limit: u32,
        offset: u32,
    ) -> Result<Vec<Commit>>;

    async fn count_commits(&self, repo: &str, branch: &str) -> Result<u64>;

    /// Every (repo, branch) with at least one commit, sorted.
    async fn list_branches(&self) -> Result<Vec<(String, String)>>;

    // ---- builds ----

    /// Records a new queued build. A post-submit build whose (repo, rev, builder) exists
    /// already returns `None`, so repeated polling never enqueues twice.
    async fn enqueue_build(&self, build: &NewBuild) -> Result<Option<Build>>;

    async fn get_build(&self, id: &str) -> Result<Build>;

    /// Queued or running builds, oldest first.
    async fn list_unfinished_builds(&self) -> Result<Vec<Build>>;

    /// Starts the next attempt on `buildlet` and returns its number (from 1). The build
    /// becomes running; an attempt still open is closed as infra-failure.
    async fn start_attempt(&self, build_id: &str, buildlet: &str) -> Result<u32>;

    /// Records how one attempt ended without finishing the build.
    async fn finish_attempt(
        &self,
        build_id: &str,
        attempt: u32,
        state: BuildState,
        error: Option<&str>,
    ) -> Result<()>;

    /// Puts an unfinished build back in the queue (closing an open attempt as infra-failure).
    async fn requeue_build(&self, build_id: &str) -> Result<()>;

    /// Stores the final result and the log, exactly once: a build that is already final
    /// returns `AlreadyFinished` and nothing changes.
    async fn finish_build(
        &self,
        build_id: &str,
        state: BuildState,
        summary: Option<&str>,
        log: &[u8],
    ) -> Result<()>;

    /// Cancels an unfinished build; returns false (changing nothing) if it was already final.
    async fn cancel_build(&self, build_id: &str) -> Result<bool>;

    /// The build's log, decompressed; `None` until the build is finished with a log.
    async fn get_log(&self, build_id: &str) -> Result<Option<Vec<u8>>>;

    /// Finished builds, most recently finished first.
    async fn recent_builds(&self, limit: u32) -> Result<Vec<Build>>;

    /// Running builds, earliest started first.
    async fn active_builds(&self) -> Result<Vec<Build>>;

    /// Post-submit builds of these commits, for the commit x builder grid.
    async fn builds_for_commits(&self, repo: &str, hashes: &[String]) -> Result<Vec<Build>>;

    /// After a coordinator restart: every running build's open attempt is recorded as
    /// infra-failure "coordinator restarted" and the build is queued again. Returns every
    /// unfinished build, oldest first.
    async fn resume_after_restart(&self) -> Result<Vec<Build>>;

    async fn list_attempts(&self, build_id: &str) -> Result<Vec<Attempt>>;

    // ---- try runs ----

    /// Records the try run and one queued try build per builder, in one transaction.
    async fn create_try(&self, new: &NewTry) -> Result<(TryRun, Vec<Build>)>;

    async fn get_try(&self, id: &str) -> Result<TryRun>;

    /// Try runs, newest first.
    async fn list_try_runs(&self, limit: u32) -> Result<Vec<TryRun>>;

    /// The try run's builds, by builder name.
    async fn builds_for_try(&self, try_id: &str) -> Result<Vec<Build>>;

    /// Records the Go commit whose toolchain an unfinished build is tested against (a
    /// subrepo build paired with a toolchain build), replacing an earlier one (a retried
    /// build may pair anew). A final build is `AlreadyFinished`, an unknown one
    /// `NotFound`; `go_rev` must be a non-empty token.
    async fn set_go_rev(&self, build_id: &str, go_rev: &str) -> Result<()>;

    // ---- test unit durations (shard balancing) ----

    /// The last recorded duration of each test unit of `builder`, in milliseconds, by
    /// unit name; empty when the builder never recorded any.
    async fn unit_durations(&self, builder: &str) -> Result<Vec<(String, u64)>>;

    /// Records (replacing older values) how long each unit took on `builder`, in
    /// milliseconds, in one transaction. Unit names must not be empty.
    async fn record_unit_durations(&self, builder: &str, units: &[(String, u64)]) -> Result<()>;

    // ---- artifacts ----

    /// Finds or records the artifact build for `new` (kind [`crate::BuildKind::Artifact`]):
    /// an unfinished build of the same (repo, rev, builder), or an `ok` one that still
    /// has artifacts, is shared (returned with `false`); otherwise a new queued build is
    /// recorded (returned with `true`). Identical concurrent requests get one build.
    async fn request_artifact_build(&self, new: &NewBuild) -> Result<(Build, bool)>;

    /// The newest artifact build of (repo, rev, builder), in any state.
    async fn latest_artifact_build(
        &self,
        repo: &str,
        rev: &str,
        builder: &str,
    ) -> Result<Option<Build>>;

    /// Records files a build kept; a name recorded before for the build is replaced.
    async fn add_artifacts(&self, build_id: &str, files: &[NewArtifact]) -> Result<()>;

    /// A build's artifacts, by name.
    async fn list_artifacts(&self, build_id: &str) -> Result<Vec<Artifact>>;

    /// Every artifact, oldest first (for the retention policy).
    async fn all_artifacts(&self) -> Result<Vec<Artifact>>;

    /// Forgets these (build id, name) artifacts; returns how many were removed.
    async fn delete_artifacts(&self, keys: &[(String, String)]) -> Result<u64>;

    // ---- user tokens ----

    /// Records a new user token (created now, not revoked). An existing id is
    /// `InvalidArgument`.
    async fn create_user_token(&self, token: &NewUserToken) -> Result<UserToken>;

    /// One token, revoked or not; `NotFound` if the id is unknown.
    async fn get_user_token(&self, id: &str) -> Result<UserToken>;

    /// Every token, revoked ones included, newest first.
    async fn list_user_tokens(&self) -> Result<Vec<UserToken>>;

    /// Marks the token revoked (now, or keeps the earlier time if it already was) and
    /// returns it; `NotFound` if the id is unknown.
    async fn revoke_user_token(&self, id: &str) -> Result<UserToken>;
}
