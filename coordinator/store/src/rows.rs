//! Row shapes as both databases return them, and their checked conversion to our model types.
//!
//! Both schemas use the same column names and SQL types that decode to the same Rust types
//! (TEXT -> String, INTEGER/BIGINT -> i64, BLOB/BYTEA -> Vec<u8>), so one set of rows serves both.

use crate::error::StoreError;
use crate::model::{Artifact, Attempt, Build, BuildState, Commit, TryRun};

/// The columns `BuildRow` expects, in a SELECT or RETURNING list.
pub(crate) const BUILD_COLUMNS: &str = "id, kind, repo, branch, rev, builder, try_id, state, \
     attempts, created_at, started_at, finished_at, summary, go_rev";

pub(crate) const COMMIT_COLUMNS: &str = "repo, branch, hash, parents, author, message, commit_time";

pub(crate) const TRY_COLUMNS: &str = "id, repo, rev, patch, builders, user_name, created_at";

pub(crate) const ARTIFACT_COLUMNS: &str = "build_id, name, sha256, size, created_at";

pub(crate) const ATTEMPT_COLUMNS: &str = "n, buildlet, started_at, finished_at, state, error";

/// Lists of hashes and builder names are stored one item per line: neither contains a newline
/// (checked on the way in), and it keeps the schema free of array types SQLite lacks.
pub(crate) fn join_lines(items: &[String]) -> String {
    items.join("\n")
}

pub(crate) fn split_lines(text: &str) -> Vec<String> {
    if text.is_empty() {
        Vec::new()
    } else {
        text.split('\n').map(str::to_owned).collect()
    }
}

fn corrupt(operation: &'static str, id: &str, reason: String) -> StoreError {
    StoreError::Corrupt {
        operation,
        id: Some(id.to_owned()),
        reason,
    }
}

fn parse_state(operation: &'static str, id: &str, s: &str) -> Result<BuildState, StoreError> {
    s.parse()
        .map_err(|e: crate::model::ParseEnumError| corrupt(operation, id, e.to_string()))
}

fn to_u32(operation: &'static str, id: &str, what: &str, v: i64) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| corrupt(operation, id, format!("{what} out of range: {v}")))
}

#[derive(sqlx::FromRow)]
pub(crate) struct BuildRow {
    id: String,
    kind: String,
    repo: String,
    branch: Option<String>,
    rev: String,
    builder: String,
    try_id: Option<String>,
    state: String,
    attempts: i64,
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    summary: Option<String>,
    go_rev: Option<String>,
}

impl BuildRow {
    pub(crate) fn into_build(self, operation: &'static str) -> Result<Build, StoreError> {
        let kind = self
            .kind
            .parse()
            .map_err(|e: crate::model::ParseEnumError| {
                corrupt(operation, &self.id, e.to_string())
            })?;
        let state = parse_state(operation, &self.id, &self.state)?;
        let attempts = to_u32(operation, &self.id, "attempts", self.attempts)?;
        Ok(Build {
            id: self.id,
            kind,
            repo: self.repo,
            branch: self.branch,
            rev: self.rev,
            builder: self.builder,
            try_id: self.try_id,
            state,
            attempts,
            created_at: self.created_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            summary: self.summary,
            go_rev: self.go_rev,
        })
    }
}

pub(crate) fn into_builds(
    rows: Vec<BuildRow>,
    operation: &'static str,
) -> Result<Vec<Build>, StoreError> {
    rows.into_iter().map(|r| r.into_build(operation)).collect()
}

#[derive(sqlx::FromRow)]
pub(crate) struct CommitRow {
    repo: String,
    branch: String,
    hash: String,
    parents: String,
    author: String,
    message: String,
    commit_time: i64,
}

impl From<CommitRow> for Commit {
    fn from(row: CommitRow) -> Self {
        Commit {
            repo: row.repo,
            branch: row.branch,
            hash: row.hash,
            parents: split_lines(&row.parents),
            author: row.author,
            message: row.message,
            commit_time: row.commit_time,
        }
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct TryRow {
    id: String,
    repo: String,
    rev: String,
    patch: Option<Vec<u8>>,
    builders: String,
    user_name: String,
    created_at: i64,
}

impl From<TryRow> for TryRun {
    fn from(row: TryRow) -> Self {
        TryRun {
            id: row.id,
            repo: row.repo,
            rev: row.rev,
            patch: row.patch,
            builders: split_lines(&row.builders),
            user: row.user_name,
            created_at: row.created_at,
        }
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct AttemptRow {
    n: i64,
    buildlet: String,
    started_at: i64,
    finished_at: Option<i64>,
    state: Option<String>,
    error: Option<String>,
}

impl AttemptRow {
    pub(crate) fn into_attempt(self, build_id: &str) -> Result<Attempt, StoreError> {
        const OP: &str = "list_attempts";
        Ok(Attempt {
            n: to_u32(OP, build_id, "attempt number", self.n)?,
            buildlet: self.buildlet,
            started_at: self.started_at,
            finished_at: self.finished_at,
            state: self
                .state
                .as_deref()
                .map(|s| parse_state(OP, build_id, s))
                .transpose()?,
            error: self.error,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct ArtifactRow {
    build_id: String,
    name: String,
    sha256: String,
    size: i64,
    created_at: i64,
}

impl ArtifactRow {
    pub(crate) fn into_artifact(self, operation: &'static str) -> Result<Artifact, StoreError> {
        let size = u64::try_from(self.size).map_err(|_| {
            corrupt(
                operation,
                &self.build_id,
                format!("artifact size out of range: {}", self.size),
            )
        })?;
        Ok(Artifact {
            build_id: self.build_id,
            name: self.name,
            sha256: self.sha256,
            size,
            created_at: self.created_at,
        })
    }
}

pub(crate) fn into_artifacts(
    rows: Vec<ArtifactRow>,
    operation: &'static str,
) -> Result<Vec<Artifact>, StoreError> {
    rows.into_iter()
        .map(|r| r.into_artifact(operation))
        .collect()
}

#[derive(sqlx::FromRow)]
pub(crate) struct LogRow {
    pub(crate) encoding: String,
    pub(crate) size: i64,
    pub(crate) data: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        for items in [vec![], vec!["a".to_string()], vec!["a".into(), "b".into()]] {
            assert_eq!(split_lines(&join_lines(&items)), items);
        }
    }
}

pub(crate) const TOKEN_COLUMNS: &str =
    "id, user_name, role, secret_hash, note, created_at, revoked_at";

#[derive(sqlx::FromRow)]
pub(crate) struct TokenRow {
    id: String,
    user_name: String,
    role: String,
    secret_hash: String,
    note: String,
    created_at: i64,
    revoked_at: Option<i64>,
}

impl From<TokenRow> for crate::model::UserToken {
    fn from(row: TokenRow) -> Self {
        crate::model::UserToken {
            id: row.id,
            user: row.user_name,
            role: row.role,
            secret_hash: row.secret_hash,
            note: row.note,
            created_at: row.created_at,
            revoked_at: row.revoked_at,
        }
    }
}
