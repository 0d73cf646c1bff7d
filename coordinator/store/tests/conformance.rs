//! The store conformance suite: every test in `suite/` runs against SQLite (a temp file) and
//! PostgreSQL (a fresh database per test on the server named by `BUILDFARM_TEST_POSTGRES_URL`).
//!
//! Without that variable the PostgreSQL variants fail when `CI` is set and are skipped with a
//! loud note otherwise, so developers without a server can still run the tests.

mod suite;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use buildfarm_store::{Clock, Store};
use sqlx::Connection;

pub const POSTGRES_ENV: &str = "BUILDFARM_TEST_POSTGRES_URL";

/// A clock the test moves by hand.
#[derive(Clone)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
    fn as_clock(&self) -> Clock {
        let inner = self.0.clone();
        Arc::new(move || inner.load(Ordering::SeqCst))
    }
}

/// What each suite test gets: a migrated empty store, its url (to open it again) and its clock.
pub struct Harness {
    pub store: Arc<dyn Store>,
    pub url: String,
    pub clock: ManualClock,
    pub backend: &'static str,
}

impl Harness {
    /// Opens the same database again, as a restarted coordinator would.
    pub async fn reopen(&self) -> Arc<dyn Store> {
        buildfarm_store::open_with_clock(&self.url, self.clock.as_clock())
            .await
            .expect("reopen store")
    }
}

pub enum Backend {
    Sqlite,
    Postgres,
}

enum Cleanup {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Postgres { admin_url: String, db: String },
}

/// `admin_url` with its database path replaced by `db`.
fn with_database(admin_url: &str, db: &str) -> String {
    let (base, query) = match admin_url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (admin_url, None),
    };
    let authority_start = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_end = base[authority_start..]
        .find('/')
        .map(|i| authority_start + i)
        .unwrap_or(base.len());
    let mut url = format!("{}/{db}", &base[..host_end]);
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    url
}

async fn setup(backend: Backend) -> Option<(Harness, Cleanup)> {
    let clock = ManualClock(Arc::new(AtomicI64::new(1_700_000_000_000)));
    let (url, cleanup, name) = match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("temp dir");
            let url = format!("sqlite://{}", dir.path().join("store.db").display());
            (url, Cleanup::Sqlite(dir), "sqlite")
        }
        Backend::Postgres => {
            let admin_url = match std::env::var(POSTGRES_ENV) {
                Ok(url) if !url.is_empty() => url,
                _ => {
                    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
                        panic!(
                            "{POSTGRES_ENV} is not set but CI is: the PostgreSQL store tests \
                             must run in CI (start PostgreSQL and export the admin url)"
                        );
                    }
                    eprintln!(
                        "\n!!!!! NOTE: {POSTGRES_ENV} is not set: SKIPPING this PostgreSQL \
                         store test. Set it to an admin url, e.g. \
                         postgres://buildfarm:buildfarm@127.0.0.1:5432/postgres !!!!!\n"
                    );
                    return None;
                }
            };
            let db = format!("bf_test_{}", uuid::Uuid::new_v4().simple());
            let mut admin = sqlx::PgConnection::connect(&admin_url)
                .await
                .expect("connect to the PostgreSQL admin url");
            sqlx::query(&format!("CREATE DATABASE \"{db}\""))
                .execute(&mut admin)
                .await
                .expect("create test database");
            admin.close().await.expect("close admin connection");
            let url = with_database(&admin_url, &db);
            (url, Cleanup::Postgres { admin_url, db }, "postgres")
        }
    };
    let store = buildfarm_store::open_with_clock(&url, clock.as_clock())
        .await
        .expect("open store");
    Some((
        Harness {
            store,
            url,
            clock,
            backend: name,
        },
        cleanup,
    ))
}

async fn teardown(store: Arc<dyn Store>, cleanup: Cleanup) {
    store.close().await;
    if let Cleanup::Postgres { admin_url, db } = cleanup {
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .expect("connect to the PostgreSQL admin url");
        // FORCE: a store a failed test left open must not keep the database alive.
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
            .execute(&mut admin)
            .await
            .expect("drop test database");
    }
}

/// Runs one suite test on `backend`, cleaning up even when the test panics.
pub async fn run<F, Fut>(backend: Backend, test: F)
where
    F: FnOnce(Harness) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some((harness, cleanup)) = setup(backend).await else {
        return;
    };
    let store = harness.store.clone();
    let outcome = tokio::spawn(test(harness)).await;
    teardown(store, cleanup).await;
    if let Err(e) = outcome {
        match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("test task failed: {e}"),
        }
    }
}

/// Generates one `#[tokio::test]` per suite function and backend (Quickwit's
/// `metastore_test_suite!` pattern).
macro_rules! store_test_suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    crate::run(crate::Backend::Sqlite, crate::suite::$name).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    crate::run(crate::Backend::Postgres, crate::suite::$name).await;
                }
            )*
        }
    };
}

store_test_suite!(
    ping_and_backend,
    go_rev_pairs_a_build_with_a_toolchain_commit,
    idempotent_enqueue,
    enqueue_validation,
    exactly_once_finish,
    log_round_trip_5mb,
    resume_after_restart,
    attempts_lifecycle,
    cancel_build,
    commit_ordering_and_upsert,
    recent_builds_ordering,
    builds_for_commits_grid,
    try_runs_and_verdicts,
    not_found_errors,
    reopen_is_a_migration_no_op,
    concurrent_writers,
    unit_durations_round_trip,
    artifact_requests_share_a_build,
    artifacts_round_trip,
    user_tokens_issue_list_revoke,
);

#[test]
fn with_database_replaces_the_path() {
    assert_eq!(
        with_database("postgres://u:p@h:5432/postgres", "x"),
        "postgres://u:p@h:5432/x"
    );
    assert_eq!(
        with_database("postgres://u:p@h/postgres?sslmode=disable", "x"),
        "postgres://u:p@h/x?sslmode=disable"
    );
    assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
}
