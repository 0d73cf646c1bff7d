//! buildfarm-store: the dashboard store. Commits, builds (with their attempts and logs), try
//! runs and the artifacts builds kept, behind the [`Store`] trait, on SQLite (embedded default) or PostgreSQL (scale-out).
//!
//! Use [`open`] with a `sqlite://PATH` or `postgres://...` url; schema migrations run there.
//! Ids are uuid v7 strings and times are unix milliseconds everywhere.

mod error;
mod log_codec;
pub mod model;
mod postgres;
mod rows;
mod sql_impl;
mod sqlite;
mod store;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub use error::StoreError;
pub use model::{
    Artifact, Attempt, Build, BuildKind, BuildState, Commit, NewArtifact, NewBuild, NewTry,
    NewUserToken, TryRun, UserToken, Verdict, try_verdict,
};
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;
pub use store::{Result, Store};

/// Where the store gets "now" (unix milliseconds); injected so tests control time.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The wall clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    })
}

/// Opens the store named by `url` using the wall clock; see [`open_with_clock`].
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    open_with_clock(url, system_clock()).await
}

/// Opens the store named by `url`: `sqlite://PATH` or `sqlite:PATH` (the file is created if
/// missing), `postgres://...` or `postgresql://...`. Migrations run before it returns.
pub async fn open_with_clock(url: &str, clock: Clock) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::open(url, clock).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::open(url, clock).await?))
    } else {
        Err(StoreError::UnsupportedUrl {
            url: redact_url(url),
        })
    }
}

/// The url with any password replaced by `***`, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &userinfo[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://bf:secret@db:5432/farm?sslmode=disable"),
            "postgres://bf:***@db:5432/farm?sslmode=disable"
        );
        assert_eq!(redact_url("postgres://bf@db/farm"), "postgres://bf@db/farm");
        assert_eq!(redact_url("postgres://db/farm"), "postgres://db/farm");
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
        assert_eq!(redact_url("mysql://u:p@h/d"), "mysql://u:***@h/d");
    }
}
