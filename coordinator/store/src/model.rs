//! The store's own data types: commits, builds, attempts and try runs.
//!
//! Nothing here knows about SQL; ids are uuid v7 strings and every time is unix milliseconds.

use std::fmt;
use std::str::FromStr;

/// A commit seen on a watched branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub repo: String,
    pub branch: String,
    pub hash: String,
    /// Parent hashes, first parent first.
    pub parents: Vec<String>,
    pub author: String,
    pub message: String,
    /// Commit time, unix milliseconds.
    pub commit_time: i64,
}

/// Why a build exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BuildKind {
    /// One build per (repo, rev, builder) for a commit that landed on a watched branch.
    PostSubmit,
    /// One builder's part of a try run.
    Try,
    /// An artifact asked for over HTTP: `builder` is the target `GOOS-GOARCH`, `rev` the
    /// resolved commit; its outputs are kept as artifacts.
    Artifact,
}

impl BuildKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BuildKind::PostSubmit => "post-submit",
            BuildKind::Try => "try",
            BuildKind::Artifact => "artifact",
        }
    }
}

impl fmt::Display for BuildKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BuildKind {
    type Err = ParseEnumError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "post-submit" => Ok(BuildKind::PostSubmit),
            "try" => Ok(BuildKind::Try),
            "artifact" => Ok(BuildKind::Artifact),
            other => Err(ParseEnumError {
                what: "build kind",
                value: other.to_owned(),
            }),
        }
    }
}

/// Where a build (or one attempt of it) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BuildState {
    Queued,
    Running,
    Ok,
    Failed,
    InfraFailure,
    Cancelled,
}

impl BuildState {
    pub const ALL: [BuildState; 6] = [
        BuildState::Queued,
        BuildState::Running,
        BuildState::Ok,
        BuildState::Failed,
        BuildState::InfraFailure,
        BuildState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BuildState::Queued => "queued",
            BuildState::Running => "running",
            BuildState::Ok => "ok",
            BuildState::Failed => "failed",
            BuildState::InfraFailure => "infra-failure",
            BuildState::Cancelled => "cancelled",
        }
    }

    /// True for states a build never leaves.
    pub fn is_final(self) -> bool {
        !matches!(self, BuildState::Queued | BuildState::Running)
    }
}

impl fmt::Display for BuildState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BuildState {
    type Err = ParseEnumError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BuildState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| ParseEnumError {
                what: "build state",
                value: s.to_owned(),
            })
    }
}

/// A string that is not one of an enum's names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}")]
pub struct ParseEnumError {
    pub what: &'static str,
    pub value: String,
}

/// A build of one revision on one builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Build {
    /// uuid v7, so ids sort by creation time.
    pub id: String,
    pub kind: BuildKind,
    pub repo: String,
    /// The watched branch for post-submit builds; `None` for try builds.
    pub branch: Option<String>,
    pub rev: String,
    pub builder: String,
    /// The try run this build belongs to (try builds only).
    pub try_id: Option<String>,
    pub state: BuildState,
    /// Attempts started so far.
    pub attempts: u32,
    pub created_at: i64,
    /// When the first attempt started.
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub summary: Option<String>,
    /// The Go commit whose toolchain the build was tested against, for builds of a repo
    /// paired with the Go repo (subrepo builds); `None` otherwise.
    pub go_rev: Option<String>,
}

/// What the coordinator asks to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewBuild {
    pub kind: BuildKind,
    pub repo: String,
    pub branch: Option<String>,
    pub rev: String,
    pub builder: String,
    /// Required for [`BuildKind::Try`], forbidden for [`BuildKind::PostSubmit`].
    pub try_id: Option<String>,
}

/// A file a build kept: its content lives in the coordinator's blob store under
/// `sha256`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    pub build_id: String,
    /// Path relative to the collected directory, `/`-separated.
    pub name: String,
    /// Lowercase hex SHA-256 of the content.
    pub sha256: String,
    pub size: u64,
    /// When it was stored, unix milliseconds.
    pub created_at: i64,
}

/// A file to record for a build (see [`crate::Store::add_artifacts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewArtifact {
    pub name: String,
    pub sha256: String,
    pub size: u64,
}

/// One try of a build on one buildlet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// Attempt number, from 1.
    pub n: u32,
    pub buildlet: String,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    /// How the attempt ended; `None` while it runs.
    pub state: Option<BuildState>,
    pub error: Option<String>,
}

/// A developer's request to run a change on every try builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTry {
    pub repo: String,
    pub rev: String,
    /// A patch to apply on top of `rev` (from `gomote try` with local changes).
    pub patch: Option<Vec<u8>>,
    pub builders: Vec<String>,
    pub user: String,
}

/// A stored try run; its builds come from `builds_for_try`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TryRun {
    pub id: String,
    pub repo: String,
    pub rev: String,
    pub patch: Option<Vec<u8>>,
    pub builders: Vec<String>,
    pub user: String,
    pub created_at: i64,
}

/// The one-word result of a try run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    Pending,
    Ok,
    Failed,
}

/// The verdict of a try run from its builds.
///
/// `Failed` as soon as any build is final and not `Ok` (failed, infra-failure or cancelled):
/// such a run can no longer pass, and developers want to hear it early. `Ok` when there is at
/// least one build and every build is `Ok`. `Pending` otherwise, including no builds at all.
pub fn try_verdict(builds: &[Build]) -> Verdict {
    if builds
        .iter()
        .any(|b| b.state.is_final() && b.state != BuildState::Ok)
    {
        Verdict::Failed
    } else if !builds.is_empty() && builds.iter().all(|b| b.state == BuildState::Ok) {
        Verdict::Ok
    } else {
        Verdict::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(state: BuildState) -> Build {
        Build {
            id: "id".into(),
            kind: BuildKind::Try,
            repo: "go".into(),
            branch: None,
            rev: "abc".into(),
            builder: "linux-amd64".into(),
            try_id: Some("t".into()),
            state,
            attempts: 0,
            created_at: 0,
            started_at: None,
            finished_at: None,
            summary: None,
            go_rev: None,
        }
    }

    #[test]
    fn state_strings_round_trip() {
        for state in BuildState::ALL {
            assert_eq!(state.as_str().parse::<BuildState>(), Ok(state));
        }
        assert_eq!(BuildState::InfraFailure.as_str(), "infra-failure");
        let err = "done".parse::<BuildState>().unwrap_err();
        assert_eq!(err.to_string(), "unknown build state \"done\"");
    }

    #[test]
    fn final_states() {
        let finals: Vec<_> = BuildState::ALL
            .into_iter()
            .filter(|s| s.is_final())
            .collect();
        assert_eq!(
            finals,
            [
                BuildState::Ok,
                BuildState::Failed,
                BuildState::InfraFailure,
                BuildState::Cancelled
            ]
        );
    }

    #[test]
    fn kind_strings_round_trip() {
        for kind in [BuildKind::PostSubmit, BuildKind::Try, BuildKind::Artifact] {
            assert_eq!(kind.as_str().parse::<BuildKind>(), Ok(kind));
        }
        assert!("postsubmit".parse::<BuildKind>().is_err());
    }

    #[test]
    fn verdicts() {
        use BuildState::*;
        let v = |states: &[BuildState]| {
            try_verdict(&states.iter().map(|s| build(*s)).collect::<Vec<_>>())
        };
        assert_eq!(v(&[]), Verdict::Pending);
        assert_eq!(v(&[Queued, Ok]), Verdict::Pending);
        assert_eq!(v(&[Running, Running]), Verdict::Pending);
        assert_eq!(v(&[Ok, Ok]), Verdict::Ok);
        assert_eq!(v(&[Running, Failed]), Verdict::Failed);
        assert_eq!(v(&[Ok, InfraFailure]), Verdict::Failed);
        assert_eq!(v(&[Queued, Cancelled]), Verdict::Failed);
    }
}

/// A user token to record: the id (public half of `<id>.<secret>`), who it is for, its
/// role name (`viewer`, `developer`, `operator` or `admin`) and the hex SHA-256 of its
/// secret. The store never sees the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUserToken {
    pub id: String,
    pub user: String,
    pub role: String,
    pub secret_hash: String,
    /// What the token is for; may be empty.
    pub note: String,
}

/// A stored user token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserToken {
    pub id: String,
    pub user: String,
    pub role: String,
    pub secret_hash: String,
    pub note: String,
    pub created_at: i64,
    /// When it was revoked; a revoked token is refused.
    pub revoked_at: Option<i64>,
}
