//! `PostgresStore`: the scale-out store on a PostgreSQL server.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::error::StoreError;
use crate::{Clock, redact_url};

const MAX_CONNECTIONS: u32 = 16;

/// Bounded so an unreachable server shows up as an error on the status page, not a hang.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct PostgresStore {
    pool: PgPool,
    clock: Clock,
}

impl PostgresStore {
    const BACKEND: &'static str = "postgres";
    /// Row locks taken by each transaction's first UPDATE do the serializing.
    const BEGIN_WRITE: &'static str = "BEGIN";

    /// Connects to a `postgres://` or `postgresql://` url and brings the schema up to date.
    pub async fn open(url: &str, clock: Clock) -> Result<Self, StoreError> {
        let open_err = |source: sqlx::Error| StoreError::Open {
            backend: Self::BACKEND,
            url: redact_url(url),
            source: Box::new(source),
        };
        let options = PgConnectOptions::from_str(url).map_err(open_err)?;
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(open_err)?;
        sqlx::migrate!("migrations/postgres")
            .run(&pool)
            .await
            .map_err(|e| StoreError::Migrate {
                backend: Self::BACKEND,
                source: Box::new(e),
            })?;
        tracing::info!(url = %redact_url(url), "postgres store open");
        Ok(PostgresStore { pool, clock })
    }
}

crate::sql_impl::impl_store!(PostgresStore, sqlx::Postgres);
