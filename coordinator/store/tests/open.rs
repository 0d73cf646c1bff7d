//! Opening stores by url: scheme dispatch, bad urls, and the SQLite settings we rely on.

use buildfarm_store::{StoreError, open};
use sqlx::Connection;

#[tokio::test]
async fn unknown_scheme_is_a_clear_error() {
    let err = open("mysql://root:hunter2@localhost/farm")
        .await
        .err()
        .expect("an error");
    assert!(matches!(err, StoreError::UnsupportedUrl { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("unsupported store url"), "{msg}");
    assert!(
        msg.contains("sqlite://"),
        "the message lists what works: {msg}"
    );
    assert!(!msg.contains("hunter2"), "the password is not shown: {msg}");

    let err = open("farm.db").await.err().expect("an error");
    assert!(matches!(err, StoreError::UnsupportedUrl { .. }), "{err}");
}

#[tokio::test]
async fn sqlite_url_without_a_path_is_refused() {
    let err = open("sqlite://").await.err().expect("an error");
    assert!(err.to_string().contains("has no file path"), "{err}");
}

#[tokio::test]
async fn unreachable_postgres_is_an_open_error_without_the_password() {
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    let err = open("postgres://bf:s3cret@127.0.0.1:1/farm")
        .await
        .err()
        .expect("an error");
    assert!(
        matches!(
            err,
            StoreError::Open {
                backend: "postgres",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.is_unavailable());
    let msg = err.to_string();
    assert!(msg.contains("postgres://bf:***@127.0.0.1:1/farm"), "{msg}");
    assert!(!msg.contains("s3cret"), "{msg}");
}

#[tokio::test]
async fn sqlite_both_url_forms_create_the_file_in_wal_mode() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (i, prefix) in ["sqlite://", "sqlite:"].into_iter().enumerate() {
        let path = dir.path().join(format!("farm{i}.db"));
        assert!(!path.exists());
        let store = open(&format!("{prefix}{}", path.display()))
            .await
            .expect("open");
        assert_eq!(store.backend(), "sqlite");
        store.ping().await.expect("ping");
        store.close().await;
        assert!(path.exists(), "{prefix} creates the file");

        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .expect("raw connection");
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut conn)
            .await
            .expect("journal mode");
        assert_eq!(mode, "wal");
        let migrations: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
            .fetch_one(&mut conn)
            .await
            .expect("migrations table");
        assert_eq!(migrations, sqlite_migration_versions().len() as i64);
    }
}

#[tokio::test]
async fn sqlite_migrations_twice_apply_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("farm.db").display());
    for _ in 0..2 {
        let store = open(&url).await.expect("open");
        store.ping().await.expect("ping");
        store.close().await;
    }
    let mut conn = sqlx::SqliteConnection::connect(&url)
        .await
        .expect("raw connection");
    let rows: Vec<(i64, bool)> =
        sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&mut conn)
            .await
            .expect("migrations");
    let want: Vec<(i64, bool)> = sqlite_migration_versions()
        .into_iter()
        .map(|v| (v, true))
        .collect();
    assert_eq!(rows, want);
}

/// The versions of the shipped SQLite migrations (`migrations/sqlite/NNNN_*.sql`), sorted.
fn sqlite_migration_versions() -> Vec<i64> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
    let mut versions: Vec<i64> = std::fs::read_dir(&dir)
        .expect("migrations dir")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".sql")?.split('_').next()?.parse().ok()
        })
        .collect();
    versions.sort();
    assert!(
        versions.len() >= 2,
        "no migrations found in {}",
        dir.display()
    );
    versions
}
