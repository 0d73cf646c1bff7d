//! The `Store` implementation shared by SQLite and PostgreSQL.
//!
//! Both backends run the same SQL text (`$N` placeholders, `ON CONFLICT`, `RETURNING` and
//! partial indexes work in both), so the implementation is written once, in `impl_store!`,
//! and expanded for each concrete pool type. A generic version over `sqlx::Database` would need
//! dozens of higher-ranked bounds; the macro keeps the code plain.
//!
//! Write transactions start with the backend's `BEGIN_WRITE` (SQLite: `BEGIN IMMEDIATE`, so a
//! transaction never has to upgrade a read lock, which WAL refuses with "database is locked"
//! instead of waiting). Each write transaction also does its first write before any read, so
//! on PostgreSQL the row lock is taken first and concurrent callers serialize on it.

use crate::error::StoreError;
use crate::model::{BuildKind, BuildState, Commit, NewArtifact, NewBuild, NewTry, NewUserToken};

/// How many hashes go in one `IN (...)` list (SQLite allows 32766 parameters per statement).
pub(crate) const IN_CHUNK: usize = 500;

pub(crate) fn invalid(operation: &'static str, reason: impl Into<String>) -> StoreError {
    StoreError::InvalidArgument {
        operation,
        reason: reason.into(),
    }
}

/// Names that end up in line-joined columns or in URLs: non-empty, no whitespace.
pub(crate) fn check_token(
    operation: &'static str,
    what: &str,
    value: &str,
) -> Result<(), StoreError> {
    if value.is_empty() {
        return Err(invalid(operation, format!("{what} is empty")));
    }
    if value.chars().any(char::is_whitespace) {
        return Err(invalid(
            operation,
            format!("{what} {value:?} contains whitespace"),
        ));
    }
    Ok(())
}

pub(crate) fn validate_commit(c: &Commit) -> Result<(), StoreError> {
    const OP: &str = "upsert_commit";
    check_token(OP, "repo", &c.repo)?;
    check_token(OP, "branch", &c.branch)?;
    check_token(OP, "commit hash", &c.hash)?;
    for p in &c.parents {
        check_token(OP, "parent hash", p)?;
    }
    Ok(())
}

pub(crate) fn validate_new_build(b: &NewBuild) -> Result<(), StoreError> {
    const OP: &str = "enqueue_build";
    check_token(OP, "repo", &b.repo)?;
    check_token(OP, "rev", &b.rev)?;
    check_token(OP, "builder", &b.builder)?;
    match (b.kind, &b.try_id) {
        (BuildKind::Try, None) => Err(invalid(OP, "a try build needs a try_id")),
        (BuildKind::PostSubmit, Some(_)) => {
            Err(invalid(OP, "a post-submit build cannot have a try_id"))
        }
        (BuildKind::PostSubmit, _) if b.branch.is_none() => {
            Err(invalid(OP, "a post-submit build needs a branch"))
        }
        (BuildKind::Artifact, Some(_)) => {
            Err(invalid(OP, "an artifact build cannot have a try_id"))
        }
        _ => Ok(()),
    }
}

pub(crate) fn validate_new_artifacts(
    build_id: &str,
    files: &[NewArtifact],
) -> Result<(), StoreError> {
    const OP: &str = "add_artifacts";
    let mut seen = std::collections::HashSet::new();
    for f in files {
        if f.name.is_empty() || f.name.contains('\0') {
            return Err(invalid(OP, format!("bad artifact name {:?}", f.name)));
        }
        if f.sha256.len() != 64
            || !f
                .sha256
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(invalid(
                OP,
                format!(
                    "artifact {:?} of build {build_id}: sha256 {:?} is not 64 lowercase hex digits",
                    f.name, f.sha256
                ),
            ));
        }
        if i64::try_from(f.size).is_err() {
            return Err(invalid(
                OP,
                format!("artifact {:?} size {} out of range", f.name, f.size),
            ));
        }
        if !seen.insert(f.name.as_str()) {
            return Err(invalid(OP, format!("artifact {:?} listed twice", f.name)));
        }
    }
    Ok(())
}

pub(crate) fn validate_new_try(t: &NewTry) -> Result<(), StoreError> {
    const OP: &str = "create_try";
    check_token(OP, "repo", &t.repo)?;
    check_token(OP, "rev", &t.rev)?;
    if t.user.is_empty() {
        return Err(invalid(OP, "user is empty"));
    }
    if t.builders.is_empty() {
        return Err(invalid(OP, "no builders"));
    }
    let mut seen = std::collections::HashSet::new();
    for b in &t.builders {
        check_token(OP, "builder", b)?;
        if !seen.insert(b.as_str()) {
            return Err(invalid(OP, format!("builder {b:?} listed twice")));
        }
    }
    Ok(())
}

/// Roles a stored token may carry (the `user_tokens.role` CHECK).
pub(crate) const ROLES: [&str; 4] = ["viewer", "developer", "operator", "admin"];

pub(crate) fn validate_new_token(t: &NewUserToken) -> Result<(), StoreError> {
    const OP: &str = "create_user_token";
    check_token(OP, "token id", &t.id)?;
    if t.id.contains('.') {
        return Err(invalid(OP, format!("token id {:?} contains a dot", t.id)));
    }
    check_token(OP, "user", &t.user)?;
    if !ROLES.contains(&t.role.as_str()) {
        return Err(invalid(
            OP,
            format!("role {:?} is not one of {}", t.role, ROLES.join(", ")),
        ));
    }
    if t.secret_hash.len() != 64 || !t.secret_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid(OP, "secret hash is not 64 hex digits (a SHA-256)"));
    }
    Ok(())
}

pub(crate) fn validate_final(operation: &'static str, state: BuildState) -> Result<(), StoreError> {
    if state.is_final() {
        Ok(())
    } else {
        Err(invalid(operation, format!("{state} is not a final state")))
    }
}

pub(crate) fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Expands to `impl Store for $store`. `$store` must have fields `pool: sqlx::Pool<$db>` and
/// `clock: crate::Clock`, and the consts `BACKEND` and `BEGIN_WRITE`.
macro_rules! impl_store {
    ($store:ty, $db:ty) => {
        impl $store {
            fn now(&self) -> i64 {
                (self.clock)()
            }

            async fn begin_write(
                &self,
                operation: &'static str,
                id: Option<&str>,
            ) -> Result<sqlx::Transaction<'static, $db>, $crate::StoreError> {
                self.pool
                    .begin_with(Self::BEGIN_WRITE)
                    .await
                    .map_err(|e| $crate::StoreError::db(operation, id, e))
            }

            /// The state of a build, `None` if it does not exist.
            async fn build_state(
                &self,
                operation: &'static str,
                id: &str,
            ) -> Result<Option<$crate::BuildState>, $crate::StoreError> {
                let state: Option<String> =
                    sqlx::query_scalar("SELECT state FROM builds WHERE id = $1")
                        .bind(id)
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(|e| $crate::StoreError::db(operation, Some(id), e))?;
                state
                    .map(|s| {
                        s.parse().map_err(|e: $crate::model::ParseEnumError| {
                            $crate::StoreError::Corrupt {
                                operation,
                                id: Some(id.to_owned()),
                                reason: e.to_string(),
                            }
                        })
                    })
                    .transpose()
            }

            /// Explains why a conditional update on an unfinished build touched no row.
            async fn not_updatable(
                &self,
                operation: &'static str,
                id: &str,
            ) -> $crate::StoreError {
                match self.build_state(operation, id).await {
                    Err(e) => e,
                    Ok(None) => $crate::StoreError::NotFound {
                        entity: "build",
                        id: id.to_owned(),
                    },
                    Ok(Some(state)) if state.is_final() => $crate::StoreError::AlreadyFinished {
                        entity: "build",
                        id: id.to_owned(),
                        state,
                    },
                    Ok(Some(state)) => $crate::StoreError::Corrupt {
                        operation,
                        id: Some(id.to_owned()),
                        reason: format!("build is {state} but the update matched no row"),
                    },
                }
            }

            /// Ends a write transaction that changed nothing, releasing its lock now rather
            /// than when the pool next uses the connection.
            async fn rollback(
                tx: sqlx::Transaction<'static, $db>,
                operation: &'static str,
                id: &str,
            ) {
                if let Err(error) = tx.rollback().await {
                    tracing::warn!(operation, id, %error, "rollback failed");
                }
            }

            async fn require_build(
                &self,
                operation: &'static str,
                id: &str,
            ) -> Result<(), $crate::StoreError> {
                match self.build_state(operation, id).await? {
                    Some(_) => Ok(()),
                    None => Err($crate::StoreError::NotFound {
                        entity: "build",
                        id: id.to_owned(),
                    }),
                }
            }

            async fn select_builds(
                &self,
                operation: &'static str,
                where_order: &str,
                limit: Option<u32>,
            ) -> Result<Vec<$crate::Build>, $crate::StoreError> {
                let sql = format!(
                    "SELECT {} FROM builds {where_order}",
                    $crate::rows::BUILD_COLUMNS
                );
                let mut query = sqlx::query_as::<_, $crate::rows::BuildRow>(&sql);
                if let Some(limit) = limit {
                    query = query.bind(i64::from(limit));
                }
                let rows = query
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| $crate::StoreError::db(operation, None, e))?;
                $crate::rows::into_builds(rows, operation)
            }

            /// Closes the build's open attempts (at most one is expected).
            async fn close_open_attempts(
                tx: &mut sqlx::Transaction<'static, $db>,
                operation: &'static str,
                build_id: &str,
                now: i64,
                state: $crate::BuildState,
                error: Option<&str>,
            ) -> Result<(), $crate::StoreError> {
                sqlx::query(
                    "UPDATE attempts SET finished_at = $1, state = $2, error = $3 \
                     WHERE build_id = $4 AND finished_at IS NULL",
                )
                .bind(now)
                .bind(state.as_str())
                .bind(error)
                .bind(build_id)
                .execute(&mut **tx)
                .await
                .map_err(|e| $crate::StoreError::db(operation, Some(build_id), e))?;
                Ok(())
            }

            async fn insert_build(
                tx: &mut sqlx::Transaction<'static, $db>,
                operation: &'static str,
                new: &$crate::NewBuild,
                now: i64,
            ) -> Result<Option<$crate::Build>, $crate::StoreError> {
                let id = $crate::sql_impl::new_id();
                let result = sqlx::query(
                    "INSERT INTO builds (id, kind, repo, branch, rev, builder, try_id, state, \
                     attempts, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, 'queued', 0, $8) \
                     ON CONFLICT (repo, rev, builder) WHERE kind = 'post-submit' DO NOTHING",
                )
                .bind(&id)
                .bind(new.kind.as_str())
                .bind(&new.repo)
                .bind(new.branch.as_deref())
                .bind(&new.rev)
                .bind(&new.builder)
                .bind(new.try_id.as_deref())
                .bind(now)
                .execute(&mut **tx)
                .await
                .map_err(|e| $crate::StoreError::db(operation, Some(&id), e))?;
                if result.rows_affected() == 0 {
                    return Ok(None);
                }
                Ok(Some($crate::Build {
                    id,
                    kind: new.kind,
                    repo: new.repo.clone(),
                    branch: new.branch.clone(),
                    rev: new.rev.clone(),
                    builder: new.builder.clone(),
                    try_id: new.try_id.clone(),
                    state: $crate::BuildState::Queued,
                    attempts: 0,
                    created_at: now,
                    started_at: None,
                    finished_at: None,
                    summary: None,
                    go_rev: None,
                }))
            }

            /// Moves an unfinished build to a final state, in `tx`; false if it was not
            /// unfinished (missing or already final).
            async fn finalize(
                &self,
                tx: &mut sqlx::Transaction<'static, $db>,
                operation: &'static str,
                build_id: &str,
                state: $crate::BuildState,
                summary: Option<&str>,
                now: i64,
            ) -> Result<bool, $crate::StoreError> {
                // The WHERE clause is what makes finishing happen once: a concurrent second
                // finisher waits for the first one's lock, then matches no row.
                let updated = sqlx::query(
                    "UPDATE builds SET state = $1, summary = $2, finished_at = $3 \
                     WHERE id = $4 AND state IN ('queued', 'running')",
                )
                .bind(state.as_str())
                .bind(summary)
                .bind(now)
                .bind(build_id)
                .execute(&mut **tx)
                .await
                .map_err(|e| $crate::StoreError::db(operation, Some(build_id), e))?
                .rows_affected();
                if updated == 0 {
                    return Ok(false);
                }
                let attempt_error = if state == $crate::BuildState::Ok {
                    None
                } else {
                    summary
                };
                Self::close_open_attempts(tx, operation, build_id, now, state, attempt_error)
                    .await?;
                Ok(true)
            }
        }

        #[async_trait::async_trait]
        impl $crate::Store for $store {
            fn backend(&self) -> &'static str {
                Self::BACKEND
            }

            async fn ping(&self) -> Result<(), $crate::StoreError> {
                sqlx::query("SELECT 1")
                    .execute(&self.pool)
                    .await
                    .map_err(|e| $crate::StoreError::db("ping", None, e))?;
                Ok(())
            }

            async fn close(&self) {
                self.pool.close().await;
            }

            async fn upsert_commit(&self, c: &$crate::Commit) -> Result<bool, $crate::StoreError> {
                const OP: &str = "upsert_commit";
                $crate::sql_impl::validate_commit(c)?;
                let parents = $crate::rows::join_lines(&c.parents);
                let db = |e| $crate::StoreError::db(OP, Some(&c.hash), e);
                let mut tx = self.begin_write(OP, Some(&c.hash)).await?;
                let inserted = sqlx::query(
                    "INSERT INTO commits (repo, branch, hash, parents, author, message, \
                     commit_time) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                     ON CONFLICT (repo, branch, hash) DO NOTHING",
                )
                .bind(&c.repo)
                .bind(&c.branch)
                .bind(&c.hash)
                .bind(&parents)
                .bind(&c.author)
                .bind(&c.message)
                .bind(c.commit_time)
                .execute(&mut *tx)
                .await
                .map_err(db)?
                .rows_affected()
                    == 1;
                if !inserted {
                    sqlx::query(
                        "UPDATE commits SET parents = $4, author = $5, message = $6, \
                         commit_time = $7 WHERE repo = $1 AND branch = $2 AND hash = $3",
                    )
                    .bind(&c.repo)
                    .bind(&c.branch)
                    .bind(&c.hash)
                    .bind(&parents)
                    .bind(&c.author)
                    .bind(&c.message)
                    .bind(c.commit_time)
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                }
                tx.commit().await.map_err(db)?;
                Ok(inserted)
            }

            async fn list_commits(
                &self,
                repo: &str,
                branch: &str,
                limit: u32,
                offset: u32,
            ) -> Result<Vec<$crate::Commit>, $crate::StoreError> {
                let sql = format!(
                    "SELECT {} FROM commits WHERE repo = $1 AND branch = $2 \
                     ORDER BY commit_time DESC, seq DESC LIMIT $3 OFFSET $4",
                    $crate::rows::COMMIT_COLUMNS
                );
                let rows = sqlx::query_as::<_, $crate::rows::CommitRow>(&sql)
                    .bind(repo)
                    .bind(branch)
                    .bind(i64::from(limit))
                    .bind(i64::from(offset))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| $crate::StoreError::db("list_commits", None, e))?;
                Ok(rows.into_iter().map(Into::into).collect())
            }

            async fn count_commits(
                &self,
                repo: &str,
                branch: &str,
            ) -> Result<u64, $crate::StoreError> {
                let n: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM commits WHERE repo = $1 AND branch = $2")
                        .bind(repo)
                        .bind(branch)
                        .fetch_one(&self.pool)
                        .await
                        .map_err(|e| $crate::StoreError::db("count_commits", None, e))?;
                // COUNT(*) is never negative.
                Ok(u64::try_from(n).unwrap_or(0))
            }

            async fn list_branches(&self) -> Result<Vec<(String, String)>, $crate::StoreError> {
                sqlx::query_as(
                    "SELECT DISTINCT repo, branch FROM commits ORDER BY repo, branch",
                )
                .fetch_all(&self.pool)
                .await
                .map_err(|e| $crate::StoreError::db("list_branches", None, e))
            }

            async fn enqueue_build(
                &self,
                new: &$crate::NewBuild,
            ) -> Result<Option<$crate::Build>, $crate::StoreError> {
                const OP: &str = "enqueue_build";
                $crate::sql_impl::validate_new_build(new)?;
                if let Some(try_id) = &new.try_id {
                    // Say which try run is missing rather than report a foreign-key failure.
                    self.get_try(try_id).await?;
                }
                let now = self.now();
                let mut tx = self.begin_write(OP, None).await?;
                let build = Self::insert_build(&mut tx, OP, new, now).await?;
                tx.commit()
                    .await
                    .map_err(|e| $crate::StoreError::db(OP, None, e))?;
                match &build {
                    Some(b) => tracing::debug!(
                        build_id = %b.id, kind = %b.kind, builder = %b.builder, rev = %b.rev,
                        "build enqueued"
                    ),
                    None => tracing::trace!(
                        builder = %new.builder, rev = %new.rev, "post-submit build already exists"
                    ),
                }
                Ok(build)
            }

            async fn get_build(&self, id: &str) -> Result<$crate::Build, $crate::StoreError> {
                const OP: &str = "get_build";
                let sql = format!(
                    "SELECT {} FROM builds WHERE id = $1",
                    $crate::rows::BUILD_COLUMNS
                );
                sqlx::query_as::<_, $crate::rows::BuildRow>(&sql)
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| $crate::StoreError::db(OP, Some(id), e))?
                    .ok_or_else(|| $crate::StoreError::NotFound {
                        entity: "build",
                        id: id.to_owned(),
                    })?
                    .into_build(OP)
            }

            async fn list_unfinished_builds(
                &self,
            ) -> Result<Vec<$crate::Build>, $crate::StoreError> {
                self.select_builds(
                    "list_unfinished_builds",
                    "WHERE state IN ('queued', 'running') ORDER BY created_at, id",
                    None,
                )
                .await
            }

            async fn start_attempt(
                &self,
                build_id: &str,
                buildlet: &str,
            ) -> Result<u32, $crate::StoreError> {
                const OP: &str = "start_attempt";
                let now = self.now();
                let db = |e| $crate::StoreError::db(OP, Some(build_id), e);
                let mut tx = self.begin_write(OP, Some(build_id)).await?;
                let n: Option<i64> = sqlx::query_scalar(
                    "UPDATE builds SET state = 'running', attempts = attempts + 1, \
                     started_at = COALESCE(started_at, $1) \
                     WHERE id = $2 AND state IN ('queued', 'running') RETURNING attempts",
                )
                .bind(now)
                .bind(build_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?;
                let Some(n) = n else {
                    Self::rollback(tx, OP, build_id).await;
                    return Err(self.not_updatable(OP, build_id).await);
                };
                let n = u32::try_from(n).map_err(|_| $crate::StoreError::Corrupt {
                    operation: OP,
                    id: Some(build_id.to_owned()),
                    reason: format!("attempt count out of range: {n}"),
                })?;
                Self::close_open_attempts(
                    &mut tx,
                    OP,
                    build_id,
                    now,
                    $crate::BuildState::InfraFailure,
                    Some("superseded by a new attempt"),
                )
                .await?;
                sqlx::query(
                    "INSERT INTO attempts (build_id, n, buildlet, started_at) \
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(build_id)
                .bind(i64::from(n))
                .bind(buildlet)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
                tx.commit().await.map_err(db)?;
                tracing::debug!(build_id, attempt = n, buildlet, "attempt started");
                Ok(n)
            }

            async fn finish_attempt(
                &self,
                build_id: &str,
                attempt: u32,
                state: $crate::BuildState,
                error: Option<&str>,
            ) -> Result<(), $crate::StoreError> {
                const OP: &str = "finish_attempt";
                $crate::sql_impl::validate_final(OP, state)?;
                let updated = sqlx::query(
                    "UPDATE attempts SET finished_at = $1, state = $2, error = $3 \
                     WHERE build_id = $4 AND n = $5 AND finished_at IS NULL",
                )
                .bind(self.now())
                .bind(state.as_str())
                .bind(error)
                .bind(build_id)
                .bind(i64::from(attempt))
                .execute(&self.pool)
                .await
                .map_err(|e| $crate::StoreError::db(OP, Some(build_id), e))?
                .rows_affected();
                if updated == 1 {
                    return Ok(());
                }
                let attempt_id = format!("{build_id}#{attempt}");
                let existing: Option<Option<String>> = sqlx::query_scalar(
                    "SELECT state FROM attempts WHERE build_id = $1 AND n = $2",
                )
                .bind(build_id)
                .bind(i64::from(attempt))
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| $crate::StoreError::db(OP, Some(build_id), e))?;
                match existing {
                    None => Err($crate::StoreError::NotFound {
                        entity: "attempt",
                        id: attempt_id,
                    }),
                    Some(prev) => Err($crate::StoreError::AlreadyFinished {
                        entity: "attempt",
                        state: prev
                            .as_deref()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or($crate::BuildState::InfraFailure),
                        id: attempt_id,
                    }),
                }
            }

            async fn requeue_build(&self, build_id: &str) -> Result<(), $crate::StoreError> {
                const OP: &str = "requeue_build";
                let now = self.now();
                let db = |e| $crate::StoreError::db(OP, Some(build_id), e);
                let mut tx = self.begin_write(OP, Some(build_id)).await?;
                let updated = sqlx::query(
                    "UPDATE builds SET state = 'queued' \
                     WHERE id = $1 AND state IN ('queued', 'running')",
                )
                .bind(build_id)
                .execute(&mut *tx)
                .await
                .map_err(db)?
                .rows_affected();
                if updated == 0 {
                    Self::rollback(tx, OP, build_id).await;
                    return Err(self.not_updatable(OP, build_id).await);
                }
                Self::close_open_attempts(
                    &mut tx,
                    OP,
                    build_id,
                    now,
                    $crate::BuildState::InfraFailure,
                    Some("requeued"),
                )
                .await?;
                tx.commit().await.map_err(db)?;
                tracing::debug!(build_id, "build requeued");
                Ok(())
            }

            async fn finish_build(
                &self,
                build_id: &str,
                state: $crate::BuildState,
                summary: Option<&str>,
                log: &[u8],
            ) -> Result<(), $crate::StoreError> {
                const OP: &str = "finish_build";
                $crate::sql_impl::validate_final(OP, state)?;
                // Compress before taking the write lock, so the lock is held briefly.
                let data = $crate::log_codec::compress(build_id, log).await?;
                let size = i64::try_from(log.len()).unwrap_or(i64::MAX);
                let now = self.now();
                let db = |e| $crate::StoreError::db(OP, Some(build_id), e);
                let mut tx = self.begin_write(OP, Some(build_id)).await?;
                if !self.finalize(&mut tx, OP, build_id, state, summary, now).await? {
                    Self::rollback(tx, OP, build_id).await;
                    return Err(self.not_updatable(OP, build_id).await);
                }
                sqlx::query(
                    "INSERT INTO build_logs (build_id, encoding, size, data) \
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(build_id)
                .bind($crate::log_codec::ENCODING_ZLIB)
                .bind(size)
                .bind(&data)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
                tx.commit().await.map_err(db)?;
                tracing::info!(build_id, %state, log_bytes = log.len(), "build finished");
                Ok(())
            }

            async fn cancel_build(&self, build_id: &str) -> Result<bool, $crate::StoreError> {
                const OP: &str = "cancel_build";
                let now = self.now();
                let mut tx = self.begin_write(OP, Some(build_id)).await?;
                let cancelled = self
                    .finalize(
                        &mut tx,
                        OP,
                        build_id,
                        $crate::BuildState::Cancelled,
                        Some("cancelled"),
                        now,
                    )
                    .await?;
                if !cancelled {
                    Self::rollback(tx, OP, build_id).await;
                    return match self.not_updatable(OP, build_id).await {
                        $crate::StoreError::AlreadyFinished { .. } => Ok(false),
                        e => Err(e),
                    };
                }
                tx.commit()
                    .await
                    .map_err(|e| $crate::StoreError::db(OP, Some(build_id), e))?;
                tracing::info!(build_id, "build cancelled");
                Ok(true)
            }

            async fn get_log(
                &self,
                build_id: &str,
            ) -> Result<Option<Vec<u8>>, $crate::StoreError> {
                const OP: &str = "get_log";
                let row: Option<$crate::rows::LogRow> = sqlx::query_as(
                    "SELECT encoding, size, data FROM build_logs WHERE build_id = $1",
                )
                .bind(build_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| $crate::StoreError::db(OP, Some(build_id), e))?;
                match row {
                    Some(row) => $crate::log_codec::decompress(
                        build_id,
                        &row.encoding,
                        row.data,
                        row.size,
                    )
                    .await
                    .map(Some),
                    None => {
                        self.require_build(OP, build_id).await?;
                        Ok(None)
                    }
                }
            }

            async fn recent_builds(
                &self,
                limit: u32,
            ) -> Result<Vec<$crate::Build>, $crate::StoreError> {
                self.select_builds(
                    "recent_builds",
                    "WHERE finished_at IS NOT NULL ORDER BY finished_at DESC, id DESC LIMIT $1",
                    Some(limit),
                )
                .await
            }

            async fn active_builds(&self) -> Result<Vec<$crate::Build>, $crate::StoreError> {
                self.select_builds(
                    "active_builds",
                    "WHERE state = 'running' ORDER BY started_at, id",
                    None,
                )
                .await
            }

            async fn builds_for_commits(
                &self,
                repo: &str,
                hashes: &[String],
            ) -> Result<Vec<$crate::Build>, $crate::StoreError> {
                const OP: &str = "builds_for_commits";
                let mut builds = Vec::new();
                for chunk in hashes.chunks($crate::sql_impl::IN_CHUNK) {
                    let mut qb = sqlx::QueryBuilder::<$db>::new(format!(
                        "SELECT {} FROM builds WHERE kind = 'post-submit' AND repo = ",
                        $crate::rows::BUILD_COLUMNS
                    ));
                    qb.push_bind(repo);
                    qb.push(" AND rev IN (");
                    let mut list = qb.separated(", ");
                    for hash in chunk {
                        list.push_bind(hash.as_str());
                    }
                    qb.push(") ORDER BY created_at, id");
                    let rows = qb
                        .build_query_as::<$crate::rows::BuildRow>()
                        .fetch_all(&self.pool)
                        .await
                        .map_err(|e| $crate::StoreError::db(OP, None, e))?;
                    builds.extend($crate::rows::into_builds(rows, OP)?);
                }
                Ok(builds)
            }

            async fn resume_after_restart(
                &self,
            ) -> Result<Vec<$crate::Build>, $crate::StoreError> {
                const OP: &str = "resume_after_restart";
                let now = self.now();
                let db = |e| $crate::StoreError::db(OP, None, e);
                let mut tx = self.begin_write(OP, None).await?;
                // Builds first: on PostgreSQL this locks the rows before their attempts.
                let requeued: Vec<String> = sqlx::query_scalar(
                    "UPDATE builds SET state = 'queued' WHERE state = 'running' RETURNING id",
                )
                .fetch_all(&mut *tx)
                .await
                .map_err(db)?;
                for id in &requeued {
                    Self::close_open_attempts(
                        &mut tx,
                        OP,
                        id,
                        now,
                        $crate::BuildState::InfraFailure,
                        Some("coordinator restarted"),
                    )
                    .await?;
                }
                tx.commit().await.map_err(db)?;
                let unfinished = self.list_unfinished_builds().await?;
                tracing::info!(
                    requeued = requeued.len(),
                    unfinished = unfinished.len(),
                    "resumed builds after restart"
                );
                Ok(unfinished)
            }

            async fn list_attempts(
                &self,
                build_id: &str,
            ) -> Result<Vec<$crate::Attempt>, $crate::StoreError> {
                const OP: &str = "list_attempts";
                let sql = format!(
                    "SELECT {} FROM attempts WHERE build_id = $1 ORDER BY n",
                    $crate::rows::ATTEMPT_COLUMNS
                );
                let rows = sqlx::query_as::<_, $crate::rows::AttemptRow>(&sql)
                    .bind(build_id)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| $crate::StoreError::db(OP, Some(build_id), e))?;
                if rows.is_empty() {
                    self.require_build(OP, build_id).await?;
                }
                rows.into_iter().map(|r| r.into_attempt(build_id)).collect()
            }

            async fn create_try(
                &self,
                new: &$crate::NewTry,
            ) -> Result<($crate::TryRun, Vec<$crate::Build>), $crate::StoreError> {
                const OP: &str = "create_try";
                $crate::sql_impl::validate_new_try(new)?;
                let id = $crate::sql_impl::new_id();
                let now = self.now();
                let db = |e| $crate::StoreError::db(OP, Some(&id), e);
                let mut tx = self.begin_write(OP, Some(&id)).await?;
                sqlx::query(
                    "INSERT INTO try_runs (id, repo, rev, patch, builders, user_name, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(&id)
                .bind(&new.repo)
                .bind(&new.rev)
                .bind(new.patch.as_deref())
                .bind($crate::rows::join_lines(&new.builders))
                .bind(&new.user)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
                let mut builds = Vec::with_capacity(new.builders.len());
                for builder in &new.builders {
                    let nb = $crate::NewBuild {
                        kind: $crate::BuildKind::Try,
                        repo: new.repo.clone(),
                        branch: None,
                        rev: new.rev.clone(),
                        builder: builder.clone(),
                        try_id: Some(id.clone()),
                    };
                    let build = Self::insert_build(&mut tx, OP, &nb, now).await?.ok_or_else(
                        || $crate::StoreError::Corrupt {
                            operation: OP,
                            id: Some(id.clone()),
                            reason: format!("try build for {builder} was not inserted"),
                        },
                    )?;
                    builds.push(build);
                }
                tx.commit().await.map_err(db)?;
                tracing::info!(try_id = %id, builders = builds.len(), user = %new.user, "try run created");
                let run = $crate::TryRun {
                    id,
                    repo: new.repo.clone(),
                    rev: new.rev.clone(),
                    patch: new.patch.clone(),
                    builders: new.builders.clone(),
                    user: new.user.clone(),
                    created_at: now,
                };
                Ok((run, builds))
            }

            async fn get_try(&self, id: &str) -> Result<$crate::TryRun, $crate::StoreError> {
                let sql = format!(
                    "SELECT {} FROM try_runs WHERE id = $1",
                    $crate::rows::TRY_COLUMNS
                );
                sqlx::query_as::<_, $crate::rows::TryRow>(&sql)
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| $crate::StoreError::db("get_try", Some(id), e))?
                    .map(Into::into)
                    .ok_or_else(|| $crate::StoreError::NotFound {
                        entity: "try run",
                        id: id.to_owned(),
                    })
            }

            async fn list_try_runs(
                &self,
                limit: u32,
            ) -> Result<Vec<$crate::TryRun>, $crate::StoreError> {
                let sql = format!(
                    "SELECT {} FROM try_runs ORDER BY created_at DESC, id DESC LIMIT $1",
                    $crate::rows::TRY_COLUMNS
                );
                let rows = sqlx::query_as::<_, $crate::rows::TryRow>(&sql)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| $crate::StoreError::db("list_try_runs", None, e))?;
                Ok(rows.into_iter().map(Into::into).collect())
            }

            async fn builds_for_try(
                &self,
                try_id: &str,
            ) -> Result<Vec<$crate::Build>, $crate::StoreError> {
                const OP: &str = "builds_for_try";
                let sql = format!(
                    "SELECT {} FROM builds WHERE try_id = $1 ORDER BY builder",
                    $crate::rows::BUILD_COLUMNS
                );
                let rows = sqlx::query_as::<_, $crate::rows::BuildRow>(&sql)
                    .bind(try_id)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| $crate::StoreError::db(OP, Some(try_id), e))?;
                if rows.is_empty() {
                    // Distinguish "no such run" from a run without builds.
                    self.get_try(try_id).await?;
                }
                $crate::rows::into_builds(rows, OP)
            }

            async fn set_go_rev(
                &self,
                build_id: &str,
                go_rev: &str,
            ) -> Result<(), $crate::StoreError> {
                const OP: &str = "set_go_rev";
                $crate::sql_impl::check_token(OP, "go_rev", go_rev)?;
                let db = |e| $crate::StoreError::db(OP, Some(build_id), e);
                let mut tx = self.begin_write(OP, Some(build_id)).await?;
                let updated = sqlx::query(
                    "UPDATE builds SET go_rev = $1 WHERE id = $2 AND state IN ('queued', 'running')",
                )
                .bind(go_rev)
                .bind(build_id)
                .execute(&mut *tx)
                .await
                .map_err(db)?
                .rows_affected();
                if updated == 0 {
                    Self::rollback(tx, OP, build_id).await;
                    return Err(self.not_updatable(OP, build_id).await);
                }
                tx.commit().await.map_err(db)?;
                Ok(())
            }

            async fn unit_durations(
                &self,
                builder: &str,
            ) -> Result<Vec<(String, u64)>, $crate::StoreError> {
                const OP: &str = "unit_durations";
                let rows: Vec<(String, i64)> = sqlx::query_as(
                    "SELECT unit, duration_ms FROM unit_durations WHERE builder = $1 ORDER BY unit",
                )
                .bind(builder)
                .fetch_all(&self.pool)
                .await
                .map_err(|e| $crate::StoreError::db(OP, Some(builder), e))?;
                Ok(rows
                    .into_iter()
                    .map(|(unit, ms)| (unit, u64::try_from(ms).unwrap_or(0)))
                    .collect())
            }

            async fn record_unit_durations(
                &self,
                builder: &str,
                units: &[(String, u64)],
            ) -> Result<(), $crate::StoreError> {
                const OP: &str = "record_unit_durations";
                $crate::sql_impl::check_token(OP, "builder", builder)?;
                if let Some((_, _)) = units.iter().find(|(u, _)| u.is_empty()) {
                    return Err($crate::sql_impl::invalid(OP, "a unit name is empty"));
                }
                if units.is_empty() {
                    return Ok(());
                }
                let now = self.now();
                let db = |e| $crate::StoreError::db(OP, Some(builder), e);
                let mut tx = self.begin_write(OP, Some(builder)).await?;
                for (unit, ms) in units {
                    sqlx::query(
                        "INSERT INTO unit_durations (builder, unit, duration_ms, updated_at) \
                         VALUES ($1, $2, $3, $4) \
                         ON CONFLICT (builder, unit) DO UPDATE SET \
                         duration_ms = excluded.duration_ms, updated_at = excluded.updated_at",
                    )
                    .bind(builder)
                    .bind(unit)
                    .bind(i64::try_from(*ms).unwrap_or(i64::MAX))
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                }
                tx.commit().await.map_err(db)?;
                Ok(())
            }

            async fn request_artifact_build(
                &self,
                new: &$crate::NewBuild,
            ) -> Result<($crate::Build, bool), $crate::StoreError> {
                const OP: &str = "request_artifact_build";
                $crate::sql_impl::validate_new_build(new)?;
                if new.kind != $crate::BuildKind::Artifact {
                    return Err($crate::StoreError::InvalidArgument {
                        operation: OP,
                        reason: format!("a {} build is not an artifact build", new.kind),
                    });
                }
                let now = self.now();
                let db = |e| $crate::StoreError::db(OP, None, e);
                let find = format!(
                    "SELECT {} FROM builds b WHERE kind = 'artifact' AND repo = $1 AND rev = $2 \
                     AND builder = $3 AND (state IN ('queued', 'running') OR (state = 'ok' AND \
                     EXISTS (SELECT 1 FROM artifacts a WHERE a.build_id = b.id))) \
                     ORDER BY created_at DESC, id DESC LIMIT 1",
                    $crate::rows::BUILD_COLUMNS
                );
                let mut tx = self.begin_write(OP, None).await?;
                let existing = sqlx::query_as::<_, $crate::rows::BuildRow>(&find)
                    .bind(&new.repo)
                    .bind(&new.rev)
                    .bind(&new.builder)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db)?;
                if let Some(row) = existing {
                    tx.commit().await.map_err(db)?;
                    return Ok((row.into_build(OP)?, false));
                }
                let id = $crate::sql_impl::new_id();
                // A concurrent request may have inserted the same unfinished build since
                // the look-up (PostgreSQL): the partial unique index turns that into a
                // conflict, and the look-up again finds the winner.
                let inserted = sqlx::query(
                    "INSERT INTO builds (id, kind, repo, branch, rev, builder, try_id, state, \
                     attempts, created_at) VALUES ($1, 'artifact', $2, NULL, $3, $4, NULL, \
                     'queued', 0, $5) ON CONFLICT (repo, rev, builder) \
                     WHERE kind = 'artifact' AND state IN ('queued', 'running') DO NOTHING",
                )
                .bind(&id)
                .bind(&new.repo)
                .bind(&new.rev)
                .bind(&new.builder)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(db)?
                .rows_affected()
                    == 1;
                if inserted {
                    tx.commit().await.map_err(db)?;
                    tracing::debug!(build_id = %id, builder = %new.builder, rev = %new.rev, "artifact build enqueued");
                    let build = $crate::Build {
                        id,
                        kind: $crate::BuildKind::Artifact,
                        repo: new.repo.clone(),
                        branch: None,
                        rev: new.rev.clone(),
                        builder: new.builder.clone(),
                        try_id: None,
                        state: $crate::BuildState::Queued,
                        attempts: 0,
                        created_at: now,
                        started_at: None,
                        finished_at: None,
                        summary: None,
                        go_rev: None,
                    };
                    return Ok((build, true));
                }
                let row = sqlx::query_as::<_, $crate::rows::BuildRow>(&find)
                    .bind(&new.repo)
                    .bind(&new.rev)
                    .bind(&new.builder)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db)?;
                tx.commit().await.map_err(db)?;
                match row {
                    Some(row) => Ok((row.into_build(OP)?, false)),
                    None => Err($crate::StoreError::Corrupt {
                        operation: OP,
                        id: None,
                        reason: format!(
                            "artifact build of {} {} {} conflicted but was not found",
                            new.repo, new.rev, new.builder
                        ),
                    }),
                }
            }

            async fn latest_artifact_build(
                &self,
                repo: &str,
                rev: &str,
                builder: &str,
            ) -> Result<Option<$crate::Build>, $crate::StoreError> {
                const OP: &str = "latest_artifact_build";
                let sql = format!(
                    "SELECT {} FROM builds WHERE kind = 'artifact' AND repo = $1 AND rev = $2 \
                     AND builder = $3 ORDER BY created_at DESC, id DESC LIMIT 1",
                    $crate::rows::BUILD_COLUMNS
                );
                sqlx::query_as::<_, $crate::rows::BuildRow>(&sql)
                    .bind(repo)
                    .bind(rev)
                    .bind(builder)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| $crate::StoreError::db(OP, None, e))?
                    .map(|r| r.into_build(OP))
                    .transpose()
            }

            async fn add_artifacts(
                &self,
                build_id: &str,
                files: &[$crate::NewArtifact],
            ) -> Result<(), $crate::StoreError> {
                const OP: &str = "add_artifacts";
                $crate::sql_impl::validate_new_artifacts(build_id, files)?;
                self.require_build(OP, build_id).await?;
                let now = self.now();
                let db = |e| $crate::StoreError::db(OP, Some(build_id), e);
                let mut tx = self.begin_write(OP, Some(build_id)).await?;
                for f in files {
                    sqlx::query(
                        "INSERT INTO artifacts (build_id, name, sha256, size, created_at) \
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (build_id, name) DO UPDATE \
                         SET sha256 = excluded.sha256, size = excluded.size, \
                         created_at = excluded.created_at",
                    )
                    .bind(build_id)
                    .bind(&f.name)
                    .bind(&f.sha256)
                    .bind(i64::try_from(f.size).unwrap_or(i64::MAX))
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                }
                tx.commit().await.map_err(db)?;
                tracing::debug!(build_id, files = files.len(), "artifacts recorded");
                Ok(())
            }

            async fn list_artifacts(
                &self,
                build_id: &str,
            ) -> Result<Vec<$crate::Artifact>, $crate::StoreError> {
                const OP: &str = "list_artifacts";
                let sql = format!(
                    "SELECT {} FROM artifacts WHERE build_id = $1 ORDER BY name",
                    $crate::rows::ARTIFACT_COLUMNS
                );
                let rows = sqlx::query_as::<_, $crate::rows::ArtifactRow>(&sql)
                    .bind(build_id)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| $crate::StoreError::db(OP, Some(build_id), e))?;
                if rows.is_empty() {
                    self.require_build(OP, build_id).await?;
                }
                $crate::rows::into_artifacts(rows, OP)
            }

            async fn all_artifacts(&self) -> Result<Vec<$crate::Artifact>, $crate::StoreError> {
                const OP: &str = "all_artifacts";
                let sql = format!(
                    "SELECT {} FROM artifacts ORDER BY created_at, build_id, name",
                    $crate::rows::ARTIFACT_COLUMNS
                );
                let rows = sqlx::query_as::<_, $crate::rows::ArtifactRow>(&sql)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| $crate::StoreError::db(OP, None, e))?;
                $crate::rows::into_artifacts(rows, OP)
            }

            async fn delete_artifacts(
                &self,
                keys: &[(String, String)],
            ) -> Result<u64, $crate::StoreError> {
                const OP: &str = "delete_artifacts";
                if keys.is_empty() {
                    return Ok(0);
                }
                let db = |e| $crate::StoreError::db(OP, None, e);
                let mut tx = self.begin_write(OP, None).await?;
                let mut n = 0;
                for (build_id, name) in keys {
                    n += sqlx::query("DELETE FROM artifacts WHERE build_id = $1 AND name = $2")
                        .bind(build_id)
                        .bind(name)
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?
                        .rows_affected();
                }
                tx.commit().await.map_err(db)?;
                Ok(n)
            }

            async fn create_user_token(
                &self,
                t: &$crate::NewUserToken,
            ) -> Result<$crate::UserToken, $crate::StoreError> {
                const OP: &str = "create_user_token";
                $crate::sql_impl::validate_new_token(t)?;
                let now = self.now();
                let inserted = sqlx::query(
                    "INSERT INTO user_tokens (id, user_name, role, secret_hash, note, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
                )
                .bind(&t.id)
                .bind(&t.user)
                .bind(&t.role)
                .bind(&t.secret_hash)
                .bind(&t.note)
                .bind(now)
                .execute(&self.pool)
                .await
                .map_err(|e| $crate::StoreError::db(OP, Some(&t.id), e))?
                .rows_affected();
                if inserted == 0 {
                    return Err($crate::StoreError::InvalidArgument {
                        operation: OP,
                        reason: format!("token id {:?} exists already", t.id),
                    });
                }
                Ok($crate::UserToken {
                    id: t.id.clone(),
                    user: t.user.clone(),
                    role: t.role.clone(),
                    secret_hash: t.secret_hash.clone(),
                    note: t.note.clone(),
                    created_at: now,
                    revoked_at: None,
                })
            }

            async fn get_user_token(
                &self,
                id: &str,
            ) -> Result<$crate::UserToken, $crate::StoreError> {
                let sql = format!(
                    "SELECT {} FROM user_tokens WHERE id = $1",
                    $crate::rows::TOKEN_COLUMNS
                );
                sqlx::query_as::<_, $crate::rows::TokenRow>(&sql)
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| $crate::StoreError::db("get_user_token", Some(id), e))?
                    .map(Into::into)
                    .ok_or_else(|| $crate::StoreError::NotFound {
                        entity: "user token",
                        id: id.to_owned(),
                    })
            }

            async fn list_user_tokens(
                &self,
            ) -> Result<Vec<$crate::UserToken>, $crate::StoreError> {
                let sql = format!(
                    "SELECT {} FROM user_tokens ORDER BY created_at DESC, id DESC",
                    $crate::rows::TOKEN_COLUMNS
                );
                let rows = sqlx::query_as::<_, $crate::rows::TokenRow>(&sql)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| $crate::StoreError::db("list_user_tokens", None, e))?;
                Ok(rows.into_iter().map(Into::into).collect())
            }

            async fn revoke_user_token(
                &self,
                id: &str,
            ) -> Result<$crate::UserToken, $crate::StoreError> {
                const OP: &str = "revoke_user_token";
                // Revoking twice keeps the first time.
                sqlx::query(
                    "UPDATE user_tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
                )
                .bind(id)
                .bind(self.now())
                .execute(&self.pool)
                .await
                .map_err(|e| $crate::StoreError::db(OP, Some(id), e))?;
                self.get_user_token(id).await
            }
        }
    };
}

pub(crate) use impl_store;

#[cfg(test)]
mod tests {
    use super::*;

    fn new_build(kind: BuildKind, try_id: Option<&str>, branch: Option<&str>) -> NewBuild {
        NewBuild {
            kind,
            repo: "go".into(),
            branch: branch.map(Into::into),
            rev: "abc".into(),
            builder: "linux-amd64".into(),
            try_id: try_id.map(Into::into),
        }
    }

    #[test]
    fn new_build_rules() {
        assert!(
            validate_new_build(&new_build(BuildKind::PostSubmit, None, Some("master"))).is_ok()
        );
        assert!(validate_new_build(&new_build(BuildKind::Try, Some("t"), None)).is_ok());
        let err = validate_new_build(&new_build(BuildKind::Try, None, None)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid argument to enqueue_build: a try build needs a try_id"
        );
        assert!(
            validate_new_build(&new_build(BuildKind::PostSubmit, Some("t"), Some("m"))).is_err()
        );
        assert!(validate_new_build(&new_build(BuildKind::PostSubmit, None, None)).is_err());
        let mut b = new_build(BuildKind::PostSubmit, None, Some("master"));
        b.builder = "linux amd64".into();
        assert!(validate_new_build(&b).is_err());
    }

    #[test]
    fn try_rules() {
        let mut t = NewTry {
            repo: "go".into(),
            rev: "abc".into(),
            patch: None,
            builders: vec!["a".into(), "b".into()],
            user: "gopher".into(),
        };
        assert!(validate_new_try(&t).is_ok());
        t.builders.push("a".into());
        let err = validate_new_try(&t).unwrap_err();
        assert!(err.to_string().contains("listed twice"), "{err}");
        t.builders.clear();
        assert!(validate_new_try(&t).is_err());
    }

    #[test]
    fn final_state_rule() {
        assert!(validate_final("finish_build", BuildState::Failed).is_ok());
        assert!(validate_final("finish_build", BuildState::Running).is_err());
    }
}
