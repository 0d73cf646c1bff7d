//! `SqliteStore`: the embedded default store, one SQLite file in WAL mode.
//!
//! WAL lets readers run beside the single writer; the busy timeout makes concurrent writers
//! wait for the lock instead of failing with "database is locked".

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::Clock;
use crate::error::StoreError;

/// How long a writer waits for another writer's lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// SQLite has one writer at a time; a few connections are enough for concurrent readers.
const MAX_CONNECTIONS: u32 = 8;

pub struct SqliteStore {
    pool: SqlitePool,
    clock: Clock,
}

impl SqliteStore {
    const BACKEND: &'static str = "sqlite";
    /// Takes the write lock at BEGIN: a deferred transaction that reads, then writes, fails
    /// at once in WAL mode if another writer committed in between (no busy wait applies).
    const BEGIN_WRITE: &'static str = "BEGIN IMMEDIATE";

    /// Opens (creating if missing) the database at a `sqlite://PATH` or `sqlite:PATH` url and
    /// brings its schema up to date.
    pub async fn open(url: &str, clock: Clock) -> Result<Self, StoreError> {
        let open_err = |source: sqlx::Error| StoreError::Open {
            backend: Self::BACKEND,
            url: url.to_owned(),
            source: Box::new(source),
        };
        let path = url
            .trim_start_matches("sqlite://")
            .trim_start_matches("sqlite:");
        if path.is_empty() || path.starts_with('?') {
            return Err(StoreError::InvalidArgument {
                operation: "open",
                reason: format!("sqlite url {url:?} has no file path"),
            });
        }
        let options = SqliteConnectOptions::from_str(url)
            .map_err(open_err)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL is durable across application crashes in WAL mode, and much faster.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .connect_with(options)
            .await
            .map_err(open_err)?;
        sqlx::migrate!("migrations/sqlite")
            .run(&pool)
            .await
            .map_err(|e| StoreError::Migrate {
                backend: Self::BACKEND,
                source: Box::new(e),
            })?;
        tracing::info!(url, "sqlite store open");
        Ok(SqliteStore { pool, clock })
    }
}

crate::sql_impl::impl_store!(SqliteStore, sqlx::Sqlite);
