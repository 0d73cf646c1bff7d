//! Upgrading a database made by the first schema: the artifacts migration rebuilds SQLite's
//! `builds` table (to widen its kind check), and every build, attempt and log must survive
//! it with their references intact.

use buildfarm_store::{BuildKind, BuildState, NewBuild, open};
use sqlx::Connection;

#[tokio::test]
async fn sqlite_schema_1_data_survives_the_artifacts_migration() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("farm.db");
    let url = format!("sqlite://{}", db.display());

    // A migrations folder holding only the first migration: the database it makes is what
    // a coordinator from before artifacts left behind.
    let first_only = dir.path().join("migrations");
    std::fs::create_dir_all(&first_only).expect("mkdir");
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
    std::fs::copy(
        src.join("0001_initial.sql"),
        first_only.join("0001_initial.sql"),
    )
    .expect("copy migration");
    {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&db)
            .create_if_missing(true)
            .foreign_keys(true);
        let mut conn = sqlx::SqliteConnection::connect_with(&options)
            .await
            .expect("connect");
        sqlx::migrate::Migrator::new(first_only.as_path())
            .await
            .expect("migrator")
            .run(&mut conn)
            .await
            .expect("first migration");
        conn.close().await.expect("close");
    }

    // Data written through schema 1 (by the store of today, before the upgrade would be
    // ideal, but opening migrates; so write raw rows the way schema 1 stores them).
    {
        let mut conn = sqlx::SqliteConnection::connect(&url)
            .await
            .expect("connect");
        sqlx::query(
            "INSERT INTO builds (id, kind, repo, branch, rev, builder, state, attempts, \
             created_at, finished_at, summary) VALUES ('b1', 'post-submit', 'go', 'main', \
             'abc', 'linux-amd64', 'ok', 1, 1, 5, 'fine')",
        )
        .execute(&mut conn)
        .await
        .expect("insert build");
        sqlx::query(
            "INSERT INTO attempts (build_id, n, buildlet, started_at, finished_at, state) \
             VALUES ('b1', 1, 'local-0', 2, 5, 'ok')",
        )
        .execute(&mut conn)
        .await
        .expect("insert attempt");
        sqlx::query(
            "INSERT INTO build_logs (build_id, encoding, size, data) \
             VALUES ('b1', 'zlib', 3, x'0102')",
        )
        .execute(&mut conn)
        .await
        .expect("insert log");
        sqlx::query(
            "INSERT INTO builds (id, kind, repo, branch, rev, builder, state, attempts, \
             created_at) VALUES ('b2', 'post-submit', 'go', 'main', 'def', 'linux-amd64', \
             'queued', 0, 3)",
        )
        .execute(&mut conn)
        .await
        .expect("insert build 2");
        conn.close().await.expect("close");
    }

    let store = open(&url).await.expect("open migrates");
    let b1 = store.get_build("b1").await.expect("b1 kept");
    assert_eq!(b1.state, BuildState::Ok);
    assert_eq!(b1.summary.as_deref(), Some("fine"));
    let attempts = store.list_attempts("b1").await.expect("attempts kept");
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].buildlet, "local-0");

    // The rebuilt table keeps its rules: post-submit builds once, artifact builds allowed,
    // foreign keys enforced again.
    let again = NewBuild {
        kind: BuildKind::PostSubmit,
        repo: "go".into(),
        branch: Some("main".into()),
        rev: "abc".into(),
        builder: "linux-amd64".into(),
        try_id: None,
    };
    assert_eq!(store.enqueue_build(&again).await.expect("enqueue"), None);
    let (art, created) = store
        .request_artifact_build(&NewBuild {
            kind: BuildKind::Artifact,
            repo: "go".into(),
            branch: None,
            rev: "abc".into(),
            builder: "windows-amd64".into(),
            try_id: None,
        })
        .await
        .expect("artifact build");
    assert!(created);
    store
        .finish_build(&art.id, BuildState::Ok, Some("ok"), b"log")
        .await
        .expect("finish");
    assert_eq!(
        store.get_log(&art.id).await.expect("log").as_deref(),
        Some(&b"log"[..])
    );
    let unknown = store
        .add_artifacts(
            "no-such-build",
            &[buildfarm_store::NewArtifact {
                name: "x".into(),
                sha256: "a".repeat(64),
                size: 1,
            }],
        )
        .await;
    assert!(unknown.is_err());
    let unfinished = store.list_unfinished_builds().await.expect("unfinished");
    assert_eq!(unfinished.len(), 1);
    assert_eq!(unfinished[0].id, "b2");
    store.close().await;

    // The old log row is there, and every child table references the new builds table.
    let mut conn = sqlx::SqliteConnection::connect(&url)
        .await
        .expect("connect");
    let data: Vec<u8> = sqlx::query_scalar("SELECT data FROM build_logs WHERE build_id = 'b1'")
        .fetch_one(&mut conn)
        .await
        .expect("old log kept");
    assert_eq!(data, [1, 2]);
    for child in ["attempts", "build_logs", "artifacts"] {
        let parents: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT \"table\" FROM pragma_foreign_key_list('{child}')"
        ))
        .fetch_all(&mut conn)
        .await
        .expect("foreign keys");
        assert_eq!(parents, ["builds"], "{child}");
    }
    conn.close().await.expect("close");
}
