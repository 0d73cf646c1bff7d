//! Tarballs and file operations against the real buildlet binary over TLS: round trips,
//! hostile input refused with the workdir unchanged, fetch-from-URL, write/list/remove,
//! and paths that try to leave the workdir.

mod common;

use buildlet::client::{ErrorCode, ExecSpec, ListOptions};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn sample_tree() -> Vec<(&'static str, u32, Vec<u8>)> {
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    vec![
        ("README", 0o644, b"hello\n".to_vec()),
        ("bin/run.sh", 0o755, b"#!/bin/sh\necho run\n".to_vec()),
        ("data/big.bin", 0o600, big),
        ("data/empty", 0o644, Vec::new()),
    ]
}

#[tokio::test]
async fn put_tar_then_get_tar_round_trips_the_tree() {
    let b = TestBuildlet::start().await;
    let c = b.client().await;
    let tree_in = sample_tree();
    let entries: Vec<(&str, u32, &[u8])> = tree_in
        .iter()
        .map(|(p, m, d)| (*p, *m, d.as_slice()))
        .collect();
    let upload = tgz(&entries);
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = sent.clone();
    let stats = c
        .put_tar(
            "src",
            std::io::Cursor::new(upload.clone()),
            Some(Box::new(move |n| {
                seen.store(n, std::sync::atomic::Ordering::SeqCst)
            })),
        )
        .await
        .expect("put_tar");
    assert_eq!(stats.entries, 4, "{stats:?}");
    assert_eq!(
        sent.load(std::sync::atomic::Ordering::SeqCst),
        upload.len() as u64
    );

    // What landed in the workdir is exactly the tree.
    let on_disk = tree(&b.workdir.join("src"));
    for (p, m, d) in &tree_in {
        assert_eq!(on_disk.get(*p), Some(&(*m, d.clone())), "{p}");
    }

    let mut got = Vec::new();
    let n = c.get_tar("src", &mut got, None).await.expect("get_tar");
    assert_eq!(n, got.len() as u64);
    let out = tempfile::tempdir().expect("tempdir");
    tar::Archive::new(flate2::read::GzDecoder::new(got.as_slice()))
        .unpack(out.path())
        .expect("unpack what get_tar returned");
    assert_eq!(tree(out.path()), on_disk);
}

#[tokio::test]
async fn hostile_tarball_is_refused_and_the_workdir_is_unchanged() {
    let b = TestBuildlet::start().await;
    let c = b.client().await;
    c.write_file("keep.txt", 0, "kept").await.expect("write");
    let before = tree(&b.workdir);
    let outside_before = tree(&b.outside);
    let evil = raw_tgz(&[
        ("fine.txt", b"fine"),
        ("../outside/precious.txt", b"overwritten"),
    ]);
    let err = c
        .put_tar("", std::io::Cursor::new(evil), None)
        .await
        .expect_err("hostile tarball accepted");
    assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");
    assert!(
        err.message().contains("../outside/precious.txt"),
        "message does not name the entry: {err}"
    );
    assert_eq!(tree(&b.workdir), before, "workdir changed");
    assert_eq!(tree(&b.outside), outside_before, "outside changed");

    // Not a tarball at all.
    let err = c
        .put_tar("x", std::io::Cursor::new(b"plain text".to_vec()), None)
        .await
        .expect_err("garbage accepted");
    assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");
    assert_eq!(tree(&b.workdir), before, "workdir changed");
}

/// Serves `body` once per connection with HTTP/1.1 on loopback; paths other than
/// `/ok.tar.gz` get a 404.
async fn tiny_http_server(body: Vec<u8>) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let req = String::from_utf8_lossy(&req);
                let (status, body) = if req.starts_with("GET /ok.tar.gz ") {
                    ("200 OK", body)
                } else {
                    ("404 Not Found", b"no".to_vec())
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(&body).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    (format!("http://{addr}"), task)
}

#[tokio::test]
async fn put_tar_from_url_fetches_over_http() {
    let b = TestBuildlet::start().await;
    let c = b.client().await;
    let body = tgz(&[
        ("go/VERSION", 0o644, b"go1.99"),
        ("go/bin/go", 0o755, b"binary"),
    ]);
    let (base, server) = tiny_http_server(body).await;
    let stats = c
        .put_tar_from_url(&format!("{base}/ok.tar.gz"), "goroot")
        .await
        .expect("put_tar_from_url");
    assert_eq!(stats.entries, 2, "{stats:?}");
    assert_eq!(
        std::fs::read(b.workdir.join("goroot/go/VERSION")).expect("extracted"),
        b"go1.99"
    );
    let err = c
        .put_tar_from_url(&format!("{base}/missing.tar.gz"), "x")
        .await
        .expect_err("404 accepted");
    assert_eq!(err.code(), ErrorCode::NotFound, "{err}");
    let err = c
        .put_tar_from_url("file:///etc/passwd", "x")
        .await
        .expect_err("file url accepted");
    assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");
    assert!(!b.workdir.join("x").exists());
    server.abort();
}

#[tokio::test]
async fn write_list_remove_workdir_and_status() {
    let b = TestBuildlet::start().await;
    let c = b.client().await;
    c.write_file("a/b.txt", 0o600, "hello")
        .await
        .expect("write");
    c.write_file("a/skip/inner", 0, "x").await.expect("write");
    c.write_file("top", 0o755, "").await.expect("write");

    let entries = c
        .list(ListOptions {
            recursive: true,
            digest: true,
            skip: vec!["a/skip".into()],
            ..Default::default()
        })
        .await
        .expect("list");
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["a/", "a/b.txt", "a/skip/", "top"]);
    let file = &entries[1];
    assert_eq!((file.mode, file.size, file.is_dir), (0o600, 5, false));
    assert_eq!(
        file.sha256.as_deref(),
        Some("2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")
    );
    assert!(entries[0].is_dir && entries[0].sha256.is_none());
    assert!(file.mtime_unix > 1_600_000_000);

    // Not recursive, no digests.
    let shallow = c
        .list(ListOptions {
            dir: "a".into(),
            ..Default::default()
        })
        .await
        .expect("list a");
    let names: Vec<&str> = shallow.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["b.txt", "skip/"]);
    assert!(shallow[0].sha256.is_none());

    // More entries than one response message holds.
    let many = (0..1200)
        .map(|i| format!("touch many/f{i}"))
        .collect::<Vec<_>>()
        .join("; ");
    let st = c
        .exec_collect(
            ExecSpec::new("sh").args(["-c", &format!("mkdir many; {many}")]),
            |_, _| {},
        )
        .await
        .expect("exec");
    assert_eq!(st.code, Some(0));
    let listed = c
        .list(ListOptions {
            dir: "many".into(),
            ..Default::default()
        })
        .await
        .expect("list many");
    assert_eq!(listed.len(), 1200);

    c.remove(&["a/b.txt", "does/not/exist"])
        .await
        .expect("remove");
    assert!(!b.workdir.join("a/b.txt").exists());
    assert!(b.workdir.join("a/skip/inner").exists());
    c.remove_all().await.expect("remove all");
    assert!(b.workdir.is_dir(), "workdir itself was removed");
    assert_eq!(std::fs::read_dir(&b.workdir).expect("read").count(), 0);

    assert_eq!(
        c.workdir().await.expect("workdir"),
        b.workdir.display().to_string()
    );
    let st = c.status().await.expect("status");
    assert_eq!(st.host_type, "host-test");
    assert_eq!(st.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(st.workdir, b.workdir.display().to_string());
    assert_eq!(st.goos, "linux");
    assert!(!st.goarch.is_empty());
    assert_eq!(st.running_commands, 0);

    let err = c
        .list(ListOptions {
            dir: "nope".into(),
            ..Default::default()
        })
        .await
        .expect_err("listing a missing dir");
    assert_eq!(err.code(), ErrorCode::NotFound, "{err}");
}

#[tokio::test]
async fn paths_escaping_the_workdir_are_refused() {
    let b = TestBuildlet::start().await;
    let c = b.client().await;
    let outside_before = tree(&b.outside);
    let escape = "../outside/precious.txt";
    for path in [escape, "/etc/passwd", "a/../../outside/x"] {
        let err = c.write_file(path, 0, "evil").await.expect_err(path);
        assert_eq!(err.code(), ErrorCode::InvalidArgument, "{path}: {err}");
        let err = c.remove(&[path]).await.expect_err(path);
        assert_eq!(err.code(), ErrorCode::InvalidArgument, "{path}: {err}");
    }
    let err = c
        .list(ListOptions {
            dir: "../outside".into(),
            ..Default::default()
        })
        .await
        .expect_err("list outside");
    assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");
    let mut sink = Vec::new();
    let err = c
        .get_tar("/etc", &mut sink, None)
        .await
        .expect_err("get_tar /etc");
    assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");
    let err = c
        .put_tar(
            "../outside",
            std::io::Cursor::new(tgz(&[("f", 0o644, b"x")])),
            None,
        )
        .await
        .expect_err("put_tar outside");
    assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");
    let err = c
        .exec(ExecSpec::new("true").dir("../outside"))
        .await
        .err()
        .expect("exec dir outside");
    assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");

    // A symlink planted inside the workdir does not lead writes out of it.
    let st = c
        .exec_collect(
            ExecSpec::new("ln").args(["-s", &b.outside.display().to_string(), "link"]),
            |_, _| {},
        )
        .await
        .expect("ln");
    assert_eq!(st.code, Some(0));
    let err = c
        .write_file("link/precious.txt", 0, "evil")
        .await
        .expect_err("write through symlink");
    assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");
    // Removing the link removes the link, not what it points to.
    c.remove(&["link"]).await.expect("remove link");
    assert_eq!(
        tree(&b.outside),
        outside_before,
        "something outside changed"
    );
    assert!(std::fs::symlink_metadata(b.workdir.join("link")).is_err());
}

#[tokio::test]
async fn removing_the_workdir_root_is_refused_unless_asked_for() {
    let b = TestBuildlet::start().await;
    let c = b.client().await;
    c.write_file("keep/a.txt", 0, "a").await.expect("write");
    c.write_file("b.txt", 0, "b").await.expect("write");
    let before = tree(&b.workdir);
    // What a stray empty argument or a computed path produces never empties the
    // workdir, even next to an ordinary path.
    for root in ["", "./", "./.", "keep/..", "keep/../."] {
        let err = c.remove(&["b.txt", root]).await.expect_err(root);
        assert_eq!(err.code(), ErrorCode::InvalidArgument, "{root:?}: {err}");
        // ".." is refused by the path policy; the others as the workdir itself.
        let msg = err.to_string();
        assert!(
            msg.contains("workdir itself") || msg.contains("\"..\""),
            "{root:?}: {msg}"
        );
    }
    // Through the raw service (as the coordinator forwards `gomote rm`), "." too needs
    // allow_root.
    let mut raw = c.raw();
    for root in [".", ""] {
        let err = raw
            .remove(buildfarm_proto::buildlet::RemoveRequest {
                paths: vec![root.into()],
                allow_root: false,
            })
            .await
            .expect_err(root);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{root:?}: {err}");
    }
    assert_eq!(
        tree(&b.workdir),
        before,
        "a refused remove changed the workdir"
    );

    // Asked for explicitly, the workdir is emptied but kept.
    raw.remove(buildfarm_proto::buildlet::RemoveRequest {
        paths: vec![String::new()],
        allow_root: true,
    })
    .await
    .expect("remove with allow_root");
    assert!(b.workdir.is_dir());
    assert_eq!(std::fs::read_dir(&b.workdir).expect("read").count(), 0);
    c.write_file("c.txt", 0, "c").await.expect("write");
    c.remove_all().await.expect("remove_all");
    assert_eq!(std::fs::read_dir(&b.workdir).expect("read").count(), 0);
}

/// A TCP server that accepts connections and reads them but never answers.
async fn silent_server() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = vec![0u8; 4096];
            let _ = conn.read(&mut buf).await;
            // Keep the connection open and silent.
            held.push(conn);
        }
    });
    (format!("http://{addr}"), task)
}

/// A server that answers with headers and a little of the body, then goes silent.
async fn stalling_server(body: Vec<u8>) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = vec![0u8; 4096];
            let _ = conn.read(&mut buf).await;
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/gzip\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(&body[..body.len() / 2]).await;
            let _ = conn.flush().await;
            held.push(conn);
        }
    });
    (format!("http://{addr}"), task)
}

#[tokio::test]
async fn put_tar_from_url_gives_up_on_a_server_that_never_answers() {
    let b = TestBuildlet::start_with_args(
        Options::default(),
        &["--url-read-timeout", "2s", "--url-connect-timeout", "2s"],
    )
    .await;
    let c = b.client().await;
    let (base, server) = silent_server().await;
    let url = format!("{base}/never.tar.gz");
    let started = std::time::Instant::now();
    // The outer bound only keeps a regression from hanging the test.
    let err = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        c.put_tar_from_url(&url, "x"),
    )
    .await
    .expect("put_tar_from_url waited on a silent server for 2 minutes")
    .expect_err("a silent server's download succeeded");
    assert_eq!(err.code(), ErrorCode::DeadlineExceeded, "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&url), "names the URL: {msg}");
    assert!(
        msg.contains("read timeout of 2s"),
        "names the timeout: {msg}"
    );
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(2),
        "gave up before the timeout"
    );

    // A server that stalls halfway through the body is given up on the same way, and
    // nothing of the half-received tarball lands in the workdir.
    let big = vec![7u8; 200_000];
    let body = tgz(&[("big.bin", 0o644, big.as_slice())]);
    let (base, stalling) = stalling_server(body).await;
    let url = format!("{base}/half.tar.gz");
    let err = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        c.put_tar_from_url(&url, ""),
    )
    .await
    .expect("put_tar_from_url waited on a stalled body for 2 minutes")
    .expect_err("a stalled download succeeded");
    assert_eq!(err.code(), ErrorCode::DeadlineExceeded, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&url) && msg.contains("read timeout of 2s"),
        "{msg}"
    );
    assert_eq!(std::fs::read_dir(&b.workdir).expect("read").count(), 0);
    server.abort();
    stalling.abort();
}
