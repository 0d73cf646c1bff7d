//! Go toolchains shared between builds. A plan step's snapshot is published under
//! (builder, step, repo, commit, try run) as soon as the step passes, so other builds use
//! it while the rest of its build still runs (as the Go farm used its make.bash snapshot):
//! misc-compile builders restore the toolchain of their own Go commit, subrepo builders
//! that of the newest commit of their repo's `go` branch that has one, waiting for a
//! toolchain build of a newer commit still under way. [`pair`] is that choice, pure; the
//! rest reads the store and the workspace store.

use std::collections::HashMap;
use std::time::Duration;

use buildfarm_config::ToolchainRef;
use buildfarm_store::{Build, BuildKind, BuildState};
use sha2::{Digest, Sha256};

use super::StepEnd;
use crate::retry::store_op;
use crate::runner::RunEnv;

/// How many of the Go branch's newest commits a subrepo build looks through.
pub const PAIR_DEPTH: u32 = 20;

/// How often a build waiting for a toolchain looks again.
const WAIT_POLL: Duration = Duration::from_secs(3);

/// The workspace-store key under which a step's snapshot of `repo` at `rev` (in try run
/// `try_id`, if any) is published.
pub fn published_key(
    builder: &str,
    step: &str,
    repo: &str,
    rev: &str,
    try_id: Option<&str>,
) -> String {
    let mut h = Sha256::new();
    h.update(b"buildfarm published snapshot v1\0");
    for part in [builder, step, repo, rev, try_id.unwrap_or("")] {
        h.update(part.as_bytes());
        h.update(b"\0");
    }
    format!("snap-{}", hex::encode(h.finalize()))
}

/// A Go commit a build could pair with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub rev: String,
    /// Whether the producing step published a toolchain for it.
    pub published: bool,
    /// The state of the producing builder's build of it, if there is one.
    pub producer: Option<BuildState>,
}

/// What a build does about its toolchain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pairing {
    /// Restore the toolchain of this commit.
    Use(String),
    /// The toolchain of this commit is still being built (`None`: no commit of the Go
    /// branch is known yet): look again later.
    Wait(Option<String>),
    /// No commit has a toolchain, and none is being built.
    Unavailable,
}

/// The choice over `candidates`, newest first: the first commit with a toolchain, unless a
/// newer one's toolchain build is still queued or running (then wait for it). A commit
/// whose build ended without a toolchain (make.bash failed) is passed over, and so is one
/// with no toolchain build at all, unless `own_commit` (the build's own commit, whose
/// toolchain build is enqueued beside it, maybe a moment later). No candidate at all
/// means the Go branch was not polled yet: wait.
pub fn pair(candidates: &[Candidate], own_commit: bool) -> Pairing {
    if candidates.is_empty() {
        return Pairing::Wait(None);
    }
    for c in candidates {
        if c.published {
            return Pairing::Use(c.rev.clone());
        }
        let building = match c.producer {
            Some(s) => matches!(s, BuildState::Queued | BuildState::Running),
            None => own_commit,
        };
        if building {
            return Pairing::Wait(Some(c.rev.clone()));
        }
    }
    Pairing::Unavailable
}

/// The toolchain a step restores: published under `key`, built from `go_repo` at `go_rev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resolved {
    pub go_repo: String,
    pub go_rev: String,
    pub key: String,
}

/// Publishes the snapshot `digest` (saved from `dir`) of `step` of this build, for builds
/// of other builders to restore. Artifact builds publish nothing (no one pairs with them).
pub(crate) async fn publish(env: &RunEnv, build: &Build, step: &str, digest: &str, dir: &str) {
    let try_id = match build.kind {
        BuildKind::PostSubmit => None,
        BuildKind::Try => build.try_id.as_deref(),
        BuildKind::Artifact => return,
    };
    let key = published_key(&build.builder, step, &build.repo, &build.rev, try_id);
    let entry = vec![(digest.to_owned(), dir.to_owned())];
    if let Err(e) = env.workspaces.cache_put(&key, &entry).await {
        tracing::warn!(error = %format!("{e:#}"), step, "publishing a snapshot");
        env.log
            .note(&format!("snapshot of step {step} not published: {e:#}"));
    }
}

/// Resolves every step's `toolchain`, waiting (bounded by the caller) while one is being
/// built, and records a subrepo build's Go commit in the store. Steps without one are
/// absent from the map.
pub(crate) async fn resolve_all(
    env: &RunEnv,
    build: &Build,
) -> Result<HashMap<usize, Resolved>, StepEnd> {
    let mut out = HashMap::new();
    let mut done: Vec<(&ToolchainRef, Resolved)> = Vec::new();
    for (i, s) in env.builder.steps.iter().enumerate() {
        let Some(t) = &s.toolchain else { continue };
        let r = match done
            .iter()
            .find(|(d, _)| d.builder == t.builder && d.step == t.step)
        {
            Some((_, r)) => r.clone(),
            None => {
                let r = resolve(env, build, t).await?;
                done.push((t, r.clone()));
                r
            }
        };
        out.insert(i, r);
    }
    if env.go_pairing.is_some()
        && let Some((_, r)) = done.first()
    {
        match store_op("set_go_rev", env.store_retry, &env.shutdown, || {
            env.store.set_go_rev(&build.id, &r.go_rev)
        })
        .await
        {
            None => return Err(StepEnd::Cancelled),
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(StepEnd::Infra(format!("recording the Go commit: {e}"))),
        }
    }
    Ok(out)
}

/// One toolchain reference's pairing, waiting while its toolchain is being built.
async fn resolve(env: &RunEnv, build: &Build, t: &ToolchainRef) -> Result<Resolved, StepEnd> {
    let mut waited_for: Option<Option<String>> = None;
    loop {
        let (go_repo, candidates, try_id) = candidates(env, build, t).await?;
        let key = |rev: &str| published_key(&t.builder, &t.step, &go_repo, rev, try_id.as_deref());
        match pair(&candidates, env.go_pairing.is_none()) {
            Pairing::Use(rev) => {
                env.log.note(&format!(
                    "toolchain: Go commit {rev} of {go_repo}, built by step {} of {}",
                    t.step, t.builder
                ));
                return Ok(Resolved {
                    key: key(&rev),
                    go_repo,
                    go_rev: rev,
                });
            }
            Pairing::Wait(rev) => {
                if waited_for.is_none() {
                    // Waiting holds no buildlet; it must not hold the slot either, or
                    // builds waiting for a toolchain could fill the pool and leave the
                    // toolchain build queued behind them.
                    env.release_build_slot();
                }
                if waited_for != Some(rev.clone()) {
                    env.log.note(&match &rev {
                        Some(rev) => format!(
                            "toolchain: waiting for {}'s build of {go_repo} at {rev} to finish step {}",
                            t.builder, t.step
                        ),
                        None => format!("toolchain: waiting for the commits of {go_repo}"),
                    });
                    waited_for = Some(rev);
                }
                tokio::select! {
                    _ = env.cancel.cancelled() => return Err(StepEnd::Cancelled),
                    _ = tokio::time::sleep(WAIT_POLL) => {}
                }
            }
            Pairing::Unavailable => {
                let which = match &env.go_pairing {
                    Some(g) => format!(
                        "none of the newest {PAIR_DEPTH} commits of {}/{}",
                        g.repo, g.branch
                    ),
                    None => format!("{} at {}", build.repo, build.rev),
                };
                return Err(StepEnd::Failed(format!(
                    "no Go toolchain to test with: {which} has one built by step {} of {} (its build failed, or there is none)",
                    t.step, t.builder
                )));
            }
        }
    }
}

/// The Go repo, its candidate commits newest first, and the try run whose toolchains count.
async fn candidates(
    env: &RunEnv,
    build: &Build,
    t: &ToolchainRef,
) -> Result<(String, Vec<Candidate>, Option<String>), StepEnd> {
    let store = &env.store;
    fn op<T>(
        what: &'static str,
    ) -> impl FnOnce(Option<Result<T, buildfarm_store::StoreError>>) -> Result<T, StepEnd> {
        move |r| match r {
            None => Err(StepEnd::Cancelled),
            Some(Ok(v)) => Ok(v),
            Some(Err(e)) => Err(StepEnd::Infra(format!("{what}: {e}"))),
        }
    }
    let (go_repo, revs, producers, try_id): (String, Vec<String>, Vec<Build>, Option<String>) =
        match (&env.go_pairing, build.kind) {
            // A subrepo: the Go branch's newest commits.
            (Some(g), _) => {
                let commits = op("listing Go commits")(
                    store_op("list_commits", env.store_retry, &env.shutdown, || {
                        store.list_commits(&g.repo, &g.branch, PAIR_DEPTH, 0)
                    })
                    .await,
                )?;
                let revs: Vec<String> = commits.into_iter().map(|c| c.hash).collect();
                let builds = op("reading toolchain builds")(
                    store_op("builds_for_commits", env.store_retry, &env.shutdown, || {
                        store.builds_for_commits(&g.repo, &revs)
                    })
                    .await,
                )?;
                (g.repo.clone(), revs, builds, None)
            }
            // The Go repo itself, in a try run: the toolchain of the same try run.
            (None, BuildKind::Try) => {
                let try_id = build.try_id.clone().unwrap_or_default();
                let builds = op("reading the try run's builds")(
                    store_op("builds_for_try", env.store_retry, &env.shutdown, || {
                        store.builds_for_try(&try_id)
                    })
                    .await,
                )?;
                (
                    build.repo.clone(),
                    vec![build.rev.clone()],
                    builds,
                    Some(try_id),
                )
            }
            // The Go repo itself: its own commit.
            (None, _) => {
                let revs = vec![build.rev.clone()];
                let builds = op("reading toolchain builds")(
                    store_op("builds_for_commits", env.store_retry, &env.shutdown, || {
                        store.builds_for_commits(&build.repo, &revs)
                    })
                    .await,
                )?;
                (build.repo.clone(), revs, builds, None)
            }
        };
    let mut out = Vec::with_capacity(revs.len());
    for rev in revs {
        let key = published_key(&t.builder, &t.step, &go_repo, &rev, try_id.as_deref());
        let published = matches!(env.workspaces.cache_get(&key).await, Ok(Some(_)));
        let producer = producers
            .iter()
            .filter(|b| b.builder == t.builder && b.rev == rev)
            .map(|b| b.state)
            .next();
        out.push(Candidate {
            rev,
            published,
            producer,
        });
    }
    Ok((go_repo, out, try_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(rev: &str, published: bool, producer: Option<BuildState>) -> Candidate {
        Candidate {
            rev: rev.into(),
            published,
            producer,
        }
    }

    #[test]
    fn the_newest_published_toolchain_is_used() {
        use BuildState::*;
        let cands = [
            c("g3", false, Some(Failed)),
            c("g2", true, Some(Running)),
            c("g1", true, Some(Ok)),
        ];
        // g3's make.bash failed; g2 published while its tests still run.
        assert_eq!(pair(&cands, false), Pairing::Use("g2".into()));
    }

    #[test]
    fn a_newer_toolchain_still_building_is_waited_for() {
        use BuildState::*;
        let cands = [
            c("g3", false, None),
            c("g2", false, Some(Queued)),
            c("g1", true, Some(Ok)),
        ];
        assert_eq!(pair(&cands, false), Pairing::Wait(Some("g2".into())));
        let running = [c("g2", false, Some(Running)), c("g1", true, Some(Ok))];
        assert_eq!(pair(&running, false), Pairing::Wait(Some("g2".into())));
        // The Go branch not polled yet.
        assert_eq!(pair(&[], false), Pairing::Wait(None));
    }

    #[test]
    fn a_build_of_the_go_repo_waits_for_its_own_commits_toolchain_build() {
        use BuildState::*;
        // Enqueued beside it, maybe a moment later.
        assert_eq!(
            pair(&[c("g1", false, None)], true),
            Pairing::Wait(Some("g1".into()))
        );
        assert_eq!(
            pair(&[c("g1", false, Some(Running))], true),
            Pairing::Wait(Some("g1".into()))
        );
        assert_eq!(
            pair(&[c("g1", true, Some(Running))], true),
            Pairing::Use("g1".into())
        );
        assert_eq!(
            pair(&[c("g1", false, Some(Failed))], true),
            Pairing::Unavailable
        );
    }

    #[test]
    fn without_any_toolchain_nothing_is_paired() {
        use BuildState::*;
        let cands = [
            c("g2", false, Some(Failed)),
            c("g1", false, Some(Cancelled)),
            c("g0", false, None),
        ];
        assert_eq!(pair(&cands, false), Pairing::Unavailable);
    }

    #[test]
    fn published_keys_separate_builders_steps_commits_and_try_runs() {
        let k = published_key("linux-amd64", "make", "go", "abc", None);
        assert!(k.starts_with("snap-") && k.len() == 69, "{k}");
        assert!(
            k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "a workspace-store key: {k}"
        );
        for other in [
            published_key("linux-arm64", "make", "go", "abc", None),
            published_key("linux-amd64", "test", "go", "abc", None),
            published_key("linux-amd64", "make", "text", "abc", None),
            published_key("linux-amd64", "make", "go", "abd", None),
            published_key("linux-amd64", "make", "go", "abc", Some("t1")),
        ] {
            assert_ne!(k, other);
        }
        // Field boundaries count: ("ab","c") is not ("a","bc").
        assert_ne!(
            published_key("a", "bc", "go", "x", None),
            published_key("ab", "c", "go", "x", None)
        );
    }
}
