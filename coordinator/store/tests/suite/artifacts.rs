//! Conformance tests of artifact builds (shared identical requests) and the artifacts
//! table (record, list, replace, age order, delete).

use buildfarm_store::{BuildKind, BuildState, NewArtifact, NewBuild, StoreError};

use crate::Harness;

fn artifact_build(rev: &str, target: &str) -> NewBuild {
    NewBuild {
        kind: BuildKind::Artifact,
        repo: "hello".into(),
        branch: None,
        rev: rev.into(),
        builder: target.into(),
        try_id: None,
    }
}

fn file(name: &str, byte: u8, size: u64) -> NewArtifact {
    NewArtifact {
        name: name.into(),
        sha256: hex_of(byte),
        size,
    }
}

fn hex_of(byte: u8) -> String {
    format!("{byte:02x}").repeat(32)
}

pub async fn artifact_requests_share_a_build(h: Harness) {
    let store = &*h.store;
    let req = artifact_build("c0ffee", "windows-amd64");
    let (first, created) = store.request_artifact_build(&req).await.expect("request");
    assert!(created);
    assert_eq!(first.kind, BuildKind::Artifact);
    assert_eq!(first.state, BuildState::Queued);
    assert_eq!(store.get_build(&first.id).await.expect("get"), first);

    // The same request again shares the queued build.
    let (again, created) = store.request_artifact_build(&req).await.expect("again");
    assert!(!created);
    assert_eq!(again.id, first.id);

    // Racing requests for a new key: exactly one build.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let store = h.store.clone();
        tasks.spawn(async move {
            store
                .request_artifact_build(&artifact_build("c0ffee", "linux-arm64"))
                .await
        });
    }
    let mut ids = std::collections::HashSet::new();
    let mut created_count = 0;
    while let Some(r) = tasks.join_next().await {
        let (b, created) = r.expect("join").expect("request");
        ids.insert(b.id);
        created_count += usize::from(created);
    }
    assert_eq!(ids.len(), 1, "racing requests made {ids:?}");
    assert_eq!(created_count, 1);

    // Another target or commit is another build.
    let (other, created) = store
        .request_artifact_build(&artifact_build("c0ffee", "linux-amd64"))
        .await
        .expect("other target");
    assert!(created);
    assert_ne!(other.id, first.id);

    // A failed build is not shared: asking again builds again.
    h.clock.advance(10);
    store
        .finish_build(&first.id, BuildState::Failed, Some("boom"), b"log")
        .await
        .expect("finish");
    let (retry, created) = store.request_artifact_build(&req).await.expect("retry");
    assert!(created);
    assert_ne!(retry.id, first.id);
    let latest = store
        .latest_artifact_build("hello", "c0ffee", "windows-amd64")
        .await
        .expect("latest")
        .expect("some");
    assert_eq!(latest.id, retry.id);

    // An ok build is shared while it has artifacts, and rebuilt once they are gone.
    h.clock.advance(10);
    store
        .finish_build(&retry.id, BuildState::Ok, Some("ok"), b"")
        .await
        .expect("finish ok");
    store
        .add_artifacts(&retry.id, &[file("hello.exe", 1, 10)])
        .await
        .expect("add");
    let (shared, created) = store.request_artifact_build(&req).await.expect("shared");
    assert!(!created);
    assert_eq!(shared.id, retry.id);
    assert_eq!(shared.state, BuildState::Ok);
    let removed = store
        .delete_artifacts(&[(retry.id.clone(), "hello.exe".into())])
        .await
        .expect("delete");
    assert_eq!(removed, 1);
    let (rebuilt, created) = store.request_artifact_build(&req).await.expect("rebuilt");
    assert!(created);
    assert_ne!(rebuilt.id, retry.id);

    // Nothing asked for that key: none. The grid never shows artifact builds.
    assert_eq!(
        store
            .latest_artifact_build("hello", "c0ffee", "plan9-386")
            .await
            .expect("latest"),
        None
    );
    let grid = store
        .builds_for_commits("hello", &["c0ffee".to_string()])
        .await
        .expect("grid");
    assert!(grid.is_empty(), "{grid:?}");

    // Only artifact builds go through this door.
    let mut wrong = artifact_build("c0ffee", "linux-amd64");
    wrong.kind = BuildKind::Try;
    wrong.try_id = Some("t".into());
    assert!(matches!(
        store.request_artifact_build(&wrong).await,
        Err(StoreError::InvalidArgument { .. })
    ));
}

pub async fn artifacts_round_trip(h: Harness) {
    let store = &*h.store;
    let (a, _) = store
        .request_artifact_build(&artifact_build("aaa", "linux-amd64"))
        .await
        .expect("a");
    let (b, _) = store
        .request_artifact_build(&artifact_build("bbb", "linux-amd64"))
        .await
        .expect("b");
    assert_eq!(store.list_artifacts(&a.id).await.expect("empty"), vec![]);

    let t0 = h.clock.get();
    store
        .add_artifacts(&a.id, &[file("bin/z", 1, 100), file("bin/a", 2, 200)])
        .await
        .expect("add a");
    h.clock.advance(1000);
    store
        .add_artifacts(&b.id, &[file("out", 2, 200)])
        .await
        .expect("add b");

    let listed = store.list_artifacts(&a.id).await.expect("list");
    let names: Vec<&str> = listed.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(names, ["bin/a", "bin/z"]);
    assert_eq!(listed[0].sha256, hex_of(2));
    assert_eq!(listed[0].size, 200);
    assert_eq!(listed[0].created_at, t0);
    assert_eq!(listed[0].build_id, a.id);

    // Oldest first, across builds.
    let all = store.all_artifacts().await.expect("all");
    assert_eq!(all.len(), 3);
    assert_eq!(all[2].build_id, b.id);
    assert!(all[0].created_at <= all[1].created_at && all[1].created_at < all[2].created_at);

    // Recording a name again replaces it.
    store
        .add_artifacts(&a.id, &[file("bin/z", 3, 300)])
        .await
        .expect("replace");
    let z = store
        .list_artifacts(&a.id)
        .await
        .expect("list")
        .into_iter()
        .find(|x| x.name == "bin/z")
        .expect("bin/z");
    assert_eq!((z.sha256.as_str(), z.size), (hex_of(3).as_str(), 300));

    // Bad input is refused with the offending value, and nothing is stored.
    let bad = NewArtifact {
        name: "x".into(),
        sha256: "not-hex".into(),
        size: 1,
    };
    let err = store.add_artifacts(&a.id, &[bad]).await.unwrap_err();
    assert!(err.to_string().contains("not-hex"), "{err}");
    let err = store
        .add_artifacts(&a.id, &[file("d", 1, 1), file("d", 2, 2)])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("listed twice"), "{err}");
    assert_eq!(store.list_artifacts(&a.id).await.expect("list").len(), 2);
    assert!(matches!(
        store.add_artifacts("missing", &[file("x", 1, 1)]).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.list_artifacts("missing").await,
        Err(StoreError::NotFound { .. })
    ));

    // Deleting some keys (an unknown one counts nothing).
    let n = store
        .delete_artifacts(&[
            (a.id.clone(), "bin/a".into()),
            (a.id.clone(), "nope".into()),
        ])
        .await
        .expect("delete");
    assert_eq!(n, 1);
    assert_eq!(store.all_artifacts().await.expect("all").len(), 2);
    assert_eq!(store.delete_artifacts(&[]).await.expect("none"), 0);
}
