//! The conformance tests themselves: each takes a fresh `Harness` and must pass on every backend.

use std::collections::HashSet;
use std::sync::Arc;

use buildfarm_store::{
    Build, BuildKind, BuildState, Commit, NewBuild, NewTry, Store, StoreError, Verdict, try_verdict,
};

use crate::Harness;

mod artifacts;
pub use artifacts::{artifact_requests_share_a_build, artifacts_round_trip};

fn post_submit(rev: &str, builder: &str) -> NewBuild {
    NewBuild {
        kind: BuildKind::PostSubmit,
        repo: "go".into(),
        branch: Some("master".into()),
        rev: rev.into(),
        builder: builder.into(),
        try_id: None,
    }
}

fn commit(hash: &str, time: i64) -> Commit {
    Commit {
        repo: "go".into(),
        branch: "master".into(),
        hash: hash.into(),
        parents: vec![format!("{hash}-parent")],
        author: "Gopher <gopher@golang.org>".into(),
        message: format!("commit {hash}"),
        commit_time: time,
    }
}

async fn enqueue(store: &dyn Store, rev: &str, builder: &str) -> Build {
    store
        .enqueue_build(&post_submit(rev, builder))
        .await
        .expect("enqueue")
        .expect("new build")
}

fn ids(builds: &[Build]) -> Vec<&str> {
    builds.iter().map(|b| b.id.as_str()).collect()
}

pub async fn ping_and_backend(h: Harness) {
    h.store.ping().await.expect("ping");
    assert_eq!(h.store.backend(), h.backend);
}

pub async fn idempotent_enqueue(h: Harness) {
    let store = &*h.store;
    let first = enqueue(store, "aaa", "linux-amd64").await;
    assert_eq!(first.state, BuildState::Queued);
    assert_eq!(first.attempts, 0);
    assert_eq!(first.created_at, h.clock.get());
    assert_eq!(store.get_build(&first.id).await.expect("get"), first);

    // Polling again finds the same commit: nothing new.
    let again = store
        .enqueue_build(&post_submit("aaa", "linux-amd64"))
        .await
        .expect("enqueue again");
    assert_eq!(again, None);
    // Another builder or revision is a different build.
    enqueue(store, "aaa", "linux-arm64").await;
    enqueue(store, "bbb", "linux-amd64").await;
    assert_eq!(store.list_unfinished_builds().await.expect("list").len(), 3);

    // Racing pollers: exactly one of them enqueues.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let store = h.store.clone();
        tasks.spawn(async move {
            store
                .enqueue_build(&post_submit("ccc", "windows-amd64"))
                .await
        });
    }
    let mut created = 0;
    while let Some(result) = tasks.join_next().await {
        if result.expect("task").expect("enqueue").is_some() {
            created += 1;
        }
    }
    assert_eq!(created, 1);
    assert_eq!(store.list_unfinished_builds().await.expect("list").len(), 4);
}

pub async fn enqueue_validation(h: Harness) {
    let mut bad = post_submit("aaa", "linux-amd64");
    bad.kind = BuildKind::Try;
    let err = h.store.enqueue_build(&bad).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::InvalidArgument {
                operation: "enqueue_build",
                ..
            }
        ),
        "{err}"
    );
    let err = h
        .store
        .enqueue_build(&post_submit("", "linux-amd64"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("rev is empty"), "{err}");
    // A try build must name an existing try run.
    bad.try_id = Some("no-such-try".into());
    bad.branch = None;
    let err = h.store.enqueue_build(&bad).await.unwrap_err();
    assert_eq!(err.to_string(), "try run no-such-try not found");
    assert!(
        h.store
            .list_unfinished_builds()
            .await
            .expect("list")
            .is_empty()
    );
}

pub async fn exactly_once_finish(h: Harness) {
    for round in 0..10 {
        let build = enqueue(&*h.store, &format!("rev{round}"), "linux-amd64").await;
        assert_eq!(
            h.store
                .start_attempt(&build.id, "buildlet-1")
                .await
                .expect("start"),
            1
        );

        let finish = |state: BuildState, tag: &'static str| {
            let store = h.store.clone();
            let id = build.id.clone();
            tokio::spawn(async move {
                let log = format!("log of {tag}\n").repeat(1000).into_bytes();
                let result = store.finish_build(&id, state, Some(tag), &log).await;
                (result, state, tag, log)
            })
        };
        let a = finish(BuildState::Ok, "a");
        let b = finish(BuildState::Failed, "b");
        let outcomes = [a.await.expect("task a"), b.await.expect("task b")];

        let winners: Vec<_> = outcomes.iter().filter(|o| o.0.is_ok()).collect();
        assert_eq!(
            winners.len(),
            1,
            "round {round}: exactly one finish succeeds"
        );
        let (_, state, tag, log) = winners[0];
        let loser = outcomes.iter().find(|o| o.0.is_err()).expect("a loser");
        match &loser.0 {
            Err(StoreError::AlreadyFinished { id, state: s, .. }) => {
                assert_eq!(id, &build.id);
                assert_eq!(s, state);
            }
            other => panic!("round {round}: loser got {other:?}"),
        }

        let stored = h.store.get_build(&build.id).await.expect("get");
        assert_eq!(stored.state, *state);
        assert_eq!(stored.summary.as_deref(), Some(*tag));
        assert_eq!(stored.finished_at, Some(h.clock.get()));
        assert_eq!(
            h.store.get_log(&build.id).await.expect("log").as_ref(),
            Some(log)
        );
        let attempts = h.store.list_attempts(&build.id).await.expect("attempts");
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0].state, Some(*state));
        assert!(attempts[0].finished_at.is_some());

        // A late third finish changes nothing.
        h.clock.advance(5);
        let err = h
            .store
            .finish_build(&build.id, BuildState::InfraFailure, Some("late"), b"late")
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::AlreadyFinished { .. }), "{err}");
        assert_eq!(h.store.get_build(&build.id).await.expect("get"), stored);
        assert_eq!(
            h.store.get_log(&build.id).await.expect("log").as_ref(),
            Some(log)
        );
    }
    // A non-final state is not a result.
    let build = enqueue(&*h.store, "zzz", "linux-amd64").await;
    let err = h
        .store
        .finish_build(&build.id, BuildState::Running, None, b"")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidArgument { .. }), "{err}");
}

pub async fn log_round_trip_5mb(h: Harness) {
    let build = enqueue(&*h.store, "aaa", "linux-amd64").await;
    assert_eq!(h.store.get_log(&build.id).await.expect("log"), None);

    // Text like a test log, with a pseudo-random tail so it is not trivially compressible.
    let mut log = Vec::with_capacity(5 << 20);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut line = 0u64;
    while log.len() < 5 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        log.extend_from_slice(
            format!("ok  \tpkg/{line}\t{}.{:03}s\t{x:016x}\n", x % 9, x % 1000).as_bytes(),
        );
        line += 1;
    }
    log.truncate(5 << 20);
    h.store
        .finish_build(&build.id, BuildState::Ok, None, &log)
        .await
        .expect("finish");
    let back = h
        .store
        .get_log(&build.id)
        .await
        .expect("log")
        .expect("some log");
    assert_eq!(back.len(), log.len());
    assert!(back == log, "5 MB log differs after the round trip");

    // An empty log is a log too.
    let empty = enqueue(&*h.store, "bbb", "linux-amd64").await;
    h.store
        .finish_build(&empty.id, BuildState::Failed, Some("no output"), b"")
        .await
        .expect("finish");
    assert_eq!(h.store.get_log(&empty.id).await.expect("log"), Some(vec![]));
}

pub async fn resume_after_restart(h: Harness) {
    let queued = enqueue(&*h.store, "aaa", "linux-amd64").await;
    h.clock.advance(1);
    let running = enqueue(&*h.store, "bbb", "linux-amd64").await;
    h.clock.advance(1);
    let done = enqueue(&*h.store, "ccc", "linux-amd64").await;
    h.clock.advance(1);
    let started_at = h.clock.get();
    h.store
        .start_attempt(&running.id, "reverse-host-1")
        .await
        .expect("start");
    h.store
        .start_attempt(&done.id, "reverse-host-2")
        .await
        .expect("start");
    h.store
        .finish_build(&done.id, BuildState::Ok, None, b"PASS")
        .await
        .expect("finish");
    assert_eq!(
        ids(&h.store.active_builds().await.expect("active")),
        [running.id.as_str()]
    );

    // The coordinator restarts: a new process opens the same database.
    h.clock.advance(1000);
    let restarted = h.reopen().await;
    let resumed = restarted.resume_after_restart().await.expect("resume");
    assert_eq!(ids(&resumed), [queued.id.as_str(), running.id.as_str()]);
    assert!(resumed.iter().all(|b| b.state == BuildState::Queued));
    assert!(restarted.active_builds().await.expect("active").is_empty());

    let attempts = restarted
        .list_attempts(&running.id)
        .await
        .expect("attempts");
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].n, 1);
    assert_eq!(attempts[0].buildlet, "reverse-host-1");
    assert_eq!(attempts[0].started_at, started_at);
    assert_eq!(attempts[0].finished_at, Some(h.clock.get()));
    assert_eq!(attempts[0].state, Some(BuildState::InfraFailure));
    assert_eq!(attempts[0].error.as_deref(), Some("coordinator restarted"));

    // The finished build is untouched, and the resumed one carries on with attempt 2.
    assert_eq!(
        restarted.get_build(&done.id).await.expect("get").state,
        BuildState::Ok
    );
    assert_eq!(
        restarted
            .start_attempt(&running.id, "reverse-host-3")
            .await
            .expect("start"),
        2
    );
    let again = restarted.get_build(&running.id).await.expect("get");
    assert_eq!(
        again.started_at,
        Some(started_at),
        "started_at keeps the first start"
    );
    assert_eq!(again.attempts, 2);
    restarted.close().await;
}

pub async fn attempts_lifecycle(h: Harness) {
    let store = &*h.store;
    let build = enqueue(store, "aaa", "linux-amd64").await;
    assert!(
        store
            .list_attempts(&build.id)
            .await
            .expect("attempts")
            .is_empty()
    );

    assert_eq!(
        store
            .start_attempt(&build.id, "pod-1")
            .await
            .expect("start"),
        1
    );
    let running = store.get_build(&build.id).await.expect("get");
    assert_eq!(running.state, BuildState::Running);
    assert_eq!(running.started_at, Some(h.clock.get()));
    assert_eq!(
        ids(&store.active_builds().await.expect("active")),
        [build.id.as_str()]
    );

    // The buildlet is lost: the attempt ends, the build does not.
    h.clock.advance(10);
    store
        .finish_attempt(
            &build.id,
            1,
            BuildState::InfraFailure,
            Some("buildlet lost"),
        )
        .await
        .expect("finish attempt");
    let err = store
        .finish_attempt(&build.id, 1, BuildState::Failed, None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::AlreadyFinished {
                entity: "attempt",
                state: BuildState::InfraFailure,
                ..
            }
        ),
        "{err}"
    );
    let err = store
        .finish_attempt(&build.id, 7, BuildState::Failed, None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::NotFound {
                entity: "attempt",
                ..
            }
        ),
        "{err}"
    );
    let err = store
        .finish_attempt(&build.id, 1, BuildState::Queued, None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidArgument { .. }), "{err}");
    assert_eq!(
        store.get_build(&build.id).await.expect("get").state,
        BuildState::Running
    );

    store.requeue_build(&build.id).await.expect("requeue");
    assert_eq!(
        store.get_build(&build.id).await.expect("get").state,
        BuildState::Queued
    );
    assert_eq!(
        store
            .start_attempt(&build.id, "pod-2")
            .await
            .expect("start"),
        2
    );
    // Starting again while attempt 2 is open closes it.
    assert_eq!(
        store
            .start_attempt(&build.id, "pod-3")
            .await
            .expect("start"),
        3
    );
    store
        .finish_build(
            &build.id,
            BuildState::Failed,
            Some("FAIL: TestFoo"),
            b"--- FAIL",
        )
        .await
        .expect("finish");

    let attempts = store.list_attempts(&build.id).await.expect("attempts");
    let summary: Vec<_> = attempts
        .iter()
        .map(|a| (a.n, a.buildlet.as_str(), a.state, a.error.as_deref()))
        .collect();
    assert_eq!(
        summary,
        [
            (
                1,
                "pod-1",
                Some(BuildState::InfraFailure),
                Some("buildlet lost")
            ),
            (
                2,
                "pod-2",
                Some(BuildState::InfraFailure),
                Some("superseded by a new attempt")
            ),
            (3, "pod-3", Some(BuildState::Failed), Some("FAIL: TestFoo")),
        ]
    );
    assert!(attempts.iter().all(|a| a.finished_at.is_some()));

    // A finished build takes no more attempts and cannot be requeued.
    let err = store.start_attempt(&build.id, "pod-4").await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::AlreadyFinished {
                state: BuildState::Failed,
                ..
            }
        ),
        "{err}"
    );
    let err = store.requeue_build(&build.id).await.unwrap_err();
    assert!(matches!(err, StoreError::AlreadyFinished { .. }), "{err}");
    assert_eq!(store.get_build(&build.id).await.expect("get").attempts, 3);
}

pub async fn cancel_build(h: Harness) {
    let store = &*h.store;
    let queued = enqueue(store, "aaa", "linux-amd64").await;
    assert!(store.cancel_build(&queued.id).await.expect("cancel"));
    let got = store.get_build(&queued.id).await.expect("get");
    assert_eq!(got.state, BuildState::Cancelled);
    assert!(got.finished_at.is_some());
    assert!(!store.cancel_build(&queued.id).await.expect("cancel again"));
    let err = store
        .finish_build(&queued.id, BuildState::Ok, None, b"")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::AlreadyFinished {
                state: BuildState::Cancelled,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(store.get_log(&queued.id).await.expect("log"), None);

    let running = enqueue(store, "bbb", "linux-amd64").await;
    store
        .start_attempt(&running.id, "pod")
        .await
        .expect("start");
    assert!(store.cancel_build(&running.id).await.expect("cancel"));
    let attempts = store.list_attempts(&running.id).await.expect("attempts");
    assert_eq!(attempts[0].state, Some(BuildState::Cancelled));

    let done = enqueue(store, "ccc", "linux-amd64").await;
    store
        .finish_build(&done.id, BuildState::Ok, None, b"ok")
        .await
        .expect("finish");
    assert!(!store.cancel_build(&done.id).await.expect("cancel finished"));
    assert_eq!(
        store.get_build(&done.id).await.expect("get").state,
        BuildState::Ok
    );
}

pub async fn commit_ordering_and_upsert(h: Harness) {
    let store = &*h.store;
    assert!(
        store
            .upsert_commit(&commit("c1", 100))
            .await
            .expect("upsert")
    );
    assert!(
        store
            .upsert_commit(&commit("c3", 300))
            .await
            .expect("upsert")
    );
    assert!(
        store
            .upsert_commit(&commit("c2", 200))
            .await
            .expect("upsert")
    );
    // Same commit time as c2 but inserted later: listed before it.
    assert!(
        store
            .upsert_commit(&commit("c2b", 200))
            .await
            .expect("upsert")
    );
    let mut other = commit("d1", 999);
    other.branch = "release-branch.go1.24".into();
    assert!(store.upsert_commit(&other).await.expect("upsert"));
    other.repo = "net".into();
    other.branch = "master".into();
    assert!(store.upsert_commit(&other).await.expect("upsert"));

    let hashes = |v: Vec<Commit>| v.into_iter().map(|c| c.hash).collect::<Vec<_>>();
    assert_eq!(
        hashes(
            store
                .list_commits("go", "master", 10, 0)
                .await
                .expect("list")
        ),
        ["c3", "c2b", "c2", "c1"]
    );
    assert_eq!(
        hashes(
            store
                .list_commits("go", "master", 2, 1)
                .await
                .expect("list")
        ),
        ["c2b", "c2"]
    );
    assert!(
        store
            .list_commits("go", "master", 10, 4)
            .await
            .expect("list")
            .is_empty()
    );
    assert_eq!(store.count_commits("go", "master").await.expect("count"), 4);
    assert_eq!(store.count_commits("go", "nope").await.expect("count"), 0);
    assert_eq!(
        store.list_branches().await.expect("branches"),
        [
            ("go".to_string(), "master".to_string()),
            ("go".to_string(), "release-branch.go1.24".to_string()),
            ("net".to_string(), "master".to_string()),
        ]
    );

    // Upserting a known commit updates it in place.
    let mut edited = commit("c1", 100);
    edited.message = "commit c1, amended".into();
    edited.parents = vec!["p1".into(), "p2".into()];
    assert!(!store.upsert_commit(&edited).await.expect("upsert"));
    let listed = store
        .list_commits("go", "master", 10, 0)
        .await
        .expect("list");
    assert_eq!(listed.last(), Some(&edited));
    assert_eq!(store.count_commits("go", "master").await.expect("count"), 4);

    let mut root = commit("c0", 50);
    root.parents.clear();
    store.upsert_commit(&root).await.expect("upsert");
    let listed = store
        .list_commits("go", "master", 10, 0)
        .await
        .expect("list");
    assert_eq!(listed.last(), Some(&root));

    let err = store
        .upsert_commit(&commit("bad hash", 1))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidArgument { .. }), "{err}");
}

pub async fn recent_builds_ordering(h: Harness) {
    let store = &*h.store;
    let a = enqueue(store, "aaa", "linux-amd64").await;
    let b = enqueue(store, "bbb", "linux-amd64").await;
    let c = enqueue(store, "ccc", "linux-amd64").await;
    let d = enqueue(store, "ddd", "linux-amd64").await;
    // Finish in an order unlike creation: c, a, b; d stays unfinished.
    for id in [&c.id, &a.id, &b.id] {
        h.clock.advance(1000);
        store
            .finish_build(id, BuildState::Ok, None, b"")
            .await
            .expect("finish");
    }
    let recent = store.recent_builds(10).await.expect("recent");
    assert_eq!(ids(&recent), [b.id.as_str(), a.id.as_str(), c.id.as_str()]);
    assert_eq!(
        ids(&store.recent_builds(2).await.expect("recent")),
        [b.id.as_str(), a.id.as_str()]
    );
    assert_eq!(
        ids(&store.list_unfinished_builds().await.expect("unfinished")),
        [d.id.as_str()]
    );
}

pub async fn builds_for_commits_grid(h: Harness) {
    let store = &*h.store;
    let a1 = enqueue(store, "aaa", "linux-amd64").await;
    let a2 = enqueue(store, "aaa", "windows-amd64").await;
    let b1 = enqueue(store, "bbb", "linux-amd64").await;
    enqueue(store, "ccc", "linux-amd64").await;
    let mut net = post_submit("aaa", "linux-amd64");
    net.repo = "net".into();
    store
        .enqueue_build(&net)
        .await
        .expect("enqueue")
        .expect("new");
    // Try builds of the same rev are not part of the grid.
    store
        .create_try(&NewTry {
            repo: "go".into(),
            rev: "aaa".into(),
            patch: None,
            builders: vec!["linux-amd64".into()],
            user: "gopher".into(),
        })
        .await
        .expect("try");

    // More hashes than one IN list holds.
    let mut hashes: Vec<String> = (0..1200).map(|i| format!("unknown{i}")).collect();
    hashes.insert(3, "aaa".into());
    hashes.push("bbb".into());
    let grid = store.builds_for_commits("go", &hashes).await.expect("grid");
    let got: HashSet<&str> = grid.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(
        got,
        HashSet::from([a1.id.as_str(), a2.id.as_str(), b1.id.as_str()])
    );
    assert!(
        grid.iter()
            .all(|b| b.kind == BuildKind::PostSubmit && b.repo == "go")
    );
    assert!(
        store
            .builds_for_commits("go", &[])
            .await
            .expect("grid")
            .is_empty()
    );
}

pub async fn go_rev_pairs_a_build_with_a_toolchain_commit(h: Harness) {
    let store = &*h.store;
    let mut new = post_submit("x1", "linux-amd64");
    new.repo = "text".into();
    let b = store
        .enqueue_build(&new)
        .await
        .expect("enqueue")
        .expect("new");
    assert_eq!(b.go_rev, None, "unpaired until the runner pairs it");
    store.set_go_rev(&b.id, "go1").await.expect("pair");
    assert_eq!(
        store.get_build(&b.id).await.expect("get").go_rev.as_deref(),
        Some("go1")
    );
    // A retried attempt may pair with a newer toolchain.
    store.start_attempt(&b.id, "bl").await.expect("attempt");
    store.set_go_rev(&b.id, "go2").await.expect("pair again");
    store
        .finish_build(&b.id, BuildState::Ok, None, b"log")
        .await
        .expect("finish");
    // The pairing is on every read path: the grid, recent builds.
    let grid = store
        .builds_for_commits("text", &["x1".into()])
        .await
        .expect("grid");
    assert_eq!(grid[0].go_rev.as_deref(), Some("go2"));
    let recent = store.recent_builds(5).await.expect("recent");
    assert_eq!(recent[0].go_rev.as_deref(), Some("go2"));
    // A final build keeps the commit it was tested with.
    assert!(matches!(
        store.set_go_rev(&b.id, "go3").await,
        Err(StoreError::AlreadyFinished { .. })
    ));
    assert!(matches!(
        store.set_go_rev("no-such-build", "go3").await,
        Err(StoreError::NotFound { .. })
    ));
    let other = enqueue(store, "x2", "linux-amd64").await;
    for bad in ["", "a b"] {
        assert!(matches!(
            store.set_go_rev(&other.id, bad).await,
            Err(StoreError::InvalidArgument { .. })
        ));
    }
    assert_eq!(store.get_build(&other.id).await.expect("get").go_rev, None);
}

pub async fn try_runs_and_verdicts(h: Harness) {
    let store = &*h.store;
    let patch: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    let new = NewTry {
        repo: "go".into(),
        rev: "abc123".into(),
        patch: Some(patch.clone()),
        builders: vec![
            "windows-amd64".into(),
            "linux-amd64".into(),
            "darwin-arm64".into(),
        ],
        user: "gopher".into(),
    };
    let (run, builds) = store.create_try(&new).await.expect("create try");
    assert_eq!(run.patch.as_deref(), Some(&patch[..]));
    assert_eq!(run.builders, new.builders);
    assert_eq!(run.user, "gopher");
    assert_eq!(builds.len(), 3);
    assert!(builds.iter().all(|b| b.kind == BuildKind::Try
        && b.try_id.as_deref() == Some(run.id.as_str())
        && b.branch.is_none()
        && b.state == BuildState::Queued));
    assert_eq!(store.get_try(&run.id).await.expect("get try"), run);

    let listed = store.builds_for_try(&run.id).await.expect("builds");
    let builders: Vec<_> = listed.iter().map(|b| b.builder.as_str()).collect();
    assert_eq!(builders, ["darwin-arm64", "linux-amd64", "windows-amd64"]);
    assert_eq!(try_verdict(&listed), Verdict::Pending);

    store
        .finish_build(&listed[0].id, BuildState::Ok, None, b"")
        .await
        .expect("finish");
    assert_eq!(
        try_verdict(&store.builds_for_try(&run.id).await.expect("builds")),
        Verdict::Pending
    );
    store
        .finish_build(&listed[1].id, BuildState::Failed, Some("FAIL"), b"")
        .await
        .expect("finish");
    // One failure decides the run even while a builder is still queued.
    assert_eq!(
        try_verdict(&store.builds_for_try(&run.id).await.expect("builds")),
        Verdict::Failed
    );

    h.clock.advance(1000);
    let (second, builds2) = store
        .create_try(&NewTry {
            repo: "go".into(),
            rev: "def456".into(),
            patch: None,
            builders: vec!["linux-amd64".into(), "linux-386".into()],
            user: "gopher2".into(),
        })
        .await
        .expect("create try");
    assert_eq!(second.patch, None);
    for b in &builds2 {
        store.start_attempt(&b.id, "pod").await.expect("start");
        store
            .finish_build(&b.id, BuildState::Ok, None, b"PASS")
            .await
            .expect("finish");
    }
    assert_eq!(
        try_verdict(&store.builds_for_try(&second.id).await.expect("builds")),
        Verdict::Ok
    );

    let runs = store.list_try_runs(10).await.expect("list");
    assert_eq!(
        runs.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        [second.id.as_str(), run.id.as_str()]
    );
    assert_eq!(store.list_try_runs(1).await.expect("list").len(), 1);

    let err = store
        .create_try(&NewTry {
            builders: vec![],
            ..new.clone()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::InvalidArgument {
                operation: "create_try",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        store.list_try_runs(10).await.expect("list").len(),
        2,
        "a refused try stores nothing"
    );
}

pub async fn not_found_errors(h: Harness) {
    let store = &*h.store;
    let missing = "0190b5e4-0000-7000-8000-000000000000";
    let is_not_found = |r: Result<(), StoreError>, entity: &str| match r {
        Err(StoreError::NotFound { entity: e, id }) => {
            assert_eq!(e, entity);
            assert!(id.starts_with(missing), "{id}");
        }
        other => panic!("expected {entity} not found, got {other:?}"),
    };
    is_not_found(store.get_build(missing).await.map(drop), "build");
    is_not_found(store.get_log(missing).await.map(drop), "build");
    is_not_found(store.list_attempts(missing).await.map(drop), "build");
    is_not_found(store.start_attempt(missing, "pod").await.map(drop), "build");
    is_not_found(store.requeue_build(missing).await, "build");
    is_not_found(store.cancel_build(missing).await.map(drop), "build");
    is_not_found(
        store
            .finish_build(missing, BuildState::Ok, None, b"log")
            .await,
        "build",
    );
    is_not_found(
        store.finish_attempt(missing, 1, BuildState::Ok, None).await,
        "attempt",
    );
    is_not_found(store.get_try(missing).await.map(drop), "try run");
    is_not_found(store.builds_for_try(missing).await.map(drop), "try run");
    let err = store.get_build(missing).await.unwrap_err();
    assert_eq!(err.to_string(), format!("build {missing} not found"));
}

pub async fn reopen_is_a_migration_no_op(h: Harness) {
    let build = enqueue(&*h.store, "aaa", "linux-amd64").await;
    h.store
        .upsert_commit(&commit("c1", 1))
        .await
        .expect("upsert");
    // Opening again (migrations run again) keeps the data and the schema working.
    let second = h.reopen().await;
    second.ping().await.expect("ping");
    assert_eq!(second.get_build(&build.id).await.expect("get"), build);
    assert_eq!(
        second.count_commits("go", "master").await.expect("count"),
        1
    );
    assert_eq!(
        second
            .enqueue_build(&post_submit("aaa", "linux-amd64"))
            .await
            .expect("enqueue"),
        None
    );
    enqueue(&*second, "bbb", "linux-amd64").await;
    assert_eq!(
        h.store.list_unfinished_builds().await.expect("list").len(),
        2
    );
    second.close().await;
    let third = h.reopen().await;
    assert_eq!(third.list_unfinished_builds().await.expect("list").len(), 2);
    third.close().await;
}

/// Eight tasks writing at once through one store: none may fail (SQLite: "database is locked").
pub async fn concurrent_writers(h: Harness) {
    const TASKS: usize = 8;
    const BUILDS_PER_TASK: usize = 15;
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let store: Arc<dyn Store> = h.store.clone();
        tasks.spawn(async move {
            for i in 0..BUILDS_PER_TASK {
                let rev = format!("rev-{t}-{i}");
                store.upsert_commit(&commit(&rev, i as i64)).await?;
                let build = store
                    .enqueue_build(&post_submit(&rev, "linux-amd64"))
                    .await?
                    .expect("new build");
                store.start_attempt(&build.id, &format!("pod-{t}")).await?;
                store
                    .finish_build(
                        &build.id,
                        BuildState::Ok,
                        None,
                        format!("log {rev}").as_bytes(),
                    )
                    .await?;
                store.get_log(&build.id).await?;
            }
            Ok::<_, StoreError>(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.expect("task").expect("concurrent writes succeed");
    }
    let total = TASKS * BUILDS_PER_TASK;
    assert_eq!(
        h.store.recent_builds(1000).await.expect("recent").len(),
        total
    );
    assert_eq!(
        h.store.count_commits("go", "master").await.expect("count"),
        total as u64
    );
}

pub async fn unit_durations_round_trip(h: Harness) {
    let s = &h.store;
    assert!(
        s.unit_durations("linux-amd64")
            .await
            .expect("read")
            .is_empty()
    );
    s.record_unit_durations(
        "linux-amd64",
        &[
            ("example.com/t/a".into(), 1500),
            ("example.com/t/b".into(), 20),
        ],
    )
    .await
    .expect("record");
    s.record_unit_durations("linux-arm64", &[("example.com/t/a".into(), 9)])
        .await
        .expect("record other builder");
    // A later run replaces a unit's value and adds new units.
    s.record_unit_durations(
        "linux-amd64",
        &[
            ("example.com/t/a".into(), 700),
            ("example.com/t/c".into(), 3),
        ],
    )
    .await
    .expect("record again");
    assert_eq!(
        s.unit_durations("linux-amd64").await.expect("read"),
        vec![
            ("example.com/t/a".to_owned(), 700),
            ("example.com/t/b".to_owned(), 20),
            ("example.com/t/c".to_owned(), 3),
        ]
    );
    assert_eq!(
        s.unit_durations("linux-arm64").await.expect("read"),
        vec![("example.com/t/a".to_owned(), 9)]
    );
    // Nothing to record is fine; bad names are refused and change nothing.
    s.record_unit_durations("linux-amd64", &[])
        .await
        .expect("empty");
    let err = s
        .record_unit_durations("linux-amd64", &[("".into(), 5), ("x".into(), 1)])
        .await
        .expect_err("empty unit");
    assert!(matches!(err, StoreError::InvalidArgument { .. }), "{err}");
    let err = s
        .record_unit_durations("linux amd64", &[("x".into(), 1)])
        .await
        .expect_err("bad builder");
    assert!(err.to_string().contains("whitespace"), "{err}");
    assert_eq!(
        s.unit_durations("linux-amd64").await.expect("read").len(),
        3
    );
    // Durations survive a reopen (a coordinator restart).
    let again = h.reopen().await;
    assert_eq!(
        again
            .unit_durations("linux-amd64")
            .await
            .expect("read")
            .len(),
        3
    );
}

fn new_token(id: &str, user: &str, role: &str) -> buildfarm_store::NewUserToken {
    buildfarm_store::NewUserToken {
        id: id.into(),
        user: user.into(),
        role: role.into(),
        secret_hash: format!("{:0>64}", id.len()),
        note: format!("for {user}"),
    }
}

pub async fn user_tokens_issue_list_revoke(h: Harness) {
    let store = &*h.store;
    let a = store
        .create_user_token(&new_token("t1", "alice", "developer"))
        .await
        .expect("create t1");
    assert_eq!(a.created_at, h.clock.get());
    assert_eq!(a.revoked_at, None);
    assert_eq!(store.get_user_token("t1").await.expect("get"), a);
    h.clock.advance(10);
    let b = store
        .create_user_token(&new_token("t2", "bob", "admin"))
        .await
        .expect("create t2");

    // Newest first, secrets never stored (only what was given as the hash).
    let listed = store.list_user_tokens().await.expect("list");
    assert_eq!(listed, vec![b.clone(), a.clone()]);

    // A duplicate id is refused and changes nothing.
    let dup = store
        .create_user_token(&new_token("t1", "mallory", "admin"))
        .await
        .expect_err("duplicate id");
    assert!(matches!(dup, StoreError::InvalidArgument { .. }), "{dup}");
    assert_eq!(store.get_user_token("t1").await.expect("get").user, "alice");

    // Bad input: unknown role, a dot in the id, a hash that is not a SHA-256.
    for (bad, why) in [
        (new_token("t3", "carol", "root"), "role"),
        (new_token("t.3", "carol", "viewer"), "dot"),
        (
            buildfarm_store::NewUserToken {
                secret_hash: "xyz".into(),
                ..new_token("t3", "carol", "viewer")
            },
            "hash",
        ),
        (new_token("t3", "", "viewer"), "user"),
    ] {
        let e = store.create_user_token(&bad).await.expect_err(why);
        assert!(
            matches!(e, StoreError::InvalidArgument { .. }),
            "{why}: {e}"
        );
    }
    assert_eq!(store.list_user_tokens().await.expect("list").len(), 2);

    // Revoking records the time once; revoking again keeps it.
    h.clock.advance(5);
    let revoked_at = h.clock.get();
    let r = store.revoke_user_token("t1").await.expect("revoke");
    assert_eq!(r.revoked_at, Some(revoked_at));
    h.clock.advance(5);
    let again = store.revoke_user_token("t1").await.expect("revoke again");
    assert_eq!(again.revoked_at, Some(revoked_at));
    assert_eq!(
        store.get_user_token("t2").await.expect("get t2").revoked_at,
        None
    );

    // Unknown ids are NotFound.
    for e in [
        store.get_user_token("nope").await.expect_err("get"),
        store.revoke_user_token("nope").await.expect_err("revoke"),
    ] {
        assert!(matches!(e, StoreError::NotFound { .. }), "{e}");
    }

    // A restarted coordinator sees the same tokens.
    let reopened = h.reopen().await;
    assert_eq!(
        reopened.get_user_token("t1").await.expect("get").revoked_at,
        Some(revoked_at)
    );
}
