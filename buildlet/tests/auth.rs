//! Who may call a listen-mode buildlet: bearer key, client certificate, nothing, or a
//! certificate from the wrong CA; and the binary's refusal to start without any.

mod common;

use std::process::Stdio;

use buildfarm_tls::CertificateAuthority;
use buildlet::client::{BuildletClient, ErrorCode};
use common::*;

#[tokio::test]
async fn no_credentials_is_unauthenticated() {
    let b = TestBuildlet::start().await;
    let c = BuildletClient::connect(b.options()).await.expect("connect");
    let err = c.workdir().await.expect_err("anonymous call accepted");
    assert_eq!(err.code(), ErrorCode::Unauthenticated, "{err}");
    let err = c
        .remove(&["."])
        .await
        .expect_err("anonymous remove accepted");
    assert_eq!(err.code(), ErrorCode::Unauthenticated, "{err}");
}

#[tokio::test]
async fn wrong_bearer_key_is_permission_denied() {
    let b = TestBuildlet::start().await;
    let mut o = b.options();
    o.bearer_key = Some("not-the-key".into());
    let c = BuildletClient::connect(o).await.expect("connect");
    let err = c.status().await.expect_err("wrong key accepted");
    assert_eq!(err.code(), ErrorCode::PermissionDenied, "{err}");
    // The right key works on the same buildlet.
    b.client().await.status().await.expect("right key");
}

#[tokio::test]
async fn client_certificate_from_the_ca_is_accepted() {
    let b = TestBuildlet::start_with(Options {
        bearer_key: false,
        ..Options::default()
    })
    .await;
    let mut o = b.options();
    o.client_identity = Some(b.client_identity("coordinator"));
    let c = BuildletClient::connect(o).await.expect("connect");
    let st = c.status().await.expect("mTLS call");
    assert_eq!(st.host_type, "host-test");
}

#[tokio::test]
async fn client_certificate_from_another_ca_fails() {
    let b = TestBuildlet::start().await;
    let other = CertificateAuthority::generate("impostor ca").expect("ca");
    let mut o = b.options();
    o.client_identity = Some(other.issue_client("impostor").expect("cert"));
    // With TLS 1.3 the client learns of the rejection on its first read, so the
    // failure shows either at connect or on the first call.
    let res = match BuildletClient::connect(o).await {
        Ok(c) => c.status().await.map(|_| ()),
        Err(e) => Err(e),
    };
    let err = res.expect_err("certificate from another CA accepted");
    assert_eq!(err.code(), ErrorCode::Unavailable, "{err}");
}

#[tokio::test]
async fn server_certificate_is_verified_by_the_client() {
    let b = TestBuildlet::start().await;
    let other = CertificateAuthority::generate("other ca").expect("ca");
    let mut o = b.options();
    o.ca_pem = other.cert_pem().to_owned();
    o.bearer_key = Some(KEY.into());
    let res = match BuildletClient::connect(o).await {
        Ok(c) => c.status().await.map(|_| ()),
        Err(e) => Err(e),
    };
    let err = res.expect_err("untrusted server accepted");
    assert_eq!(err.code(), ErrorCode::Unavailable, "{err}");
}

#[tokio::test]
async fn refuses_to_start_without_authentication_or_with_bad_args() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = CertificateAuthority::generate("ca").expect("ca");
    let (cert, key) = ca
        .issue_server(&["localhost"])
        .expect("cert")
        .write_files(dir.path(), "server")
        .expect("write");
    let run = |args: Vec<String>| {
        std::process::Command::new(env!("CARGO_BIN_EXE_buildlet"))
            .args(args)
            .env_remove("BUILDLET_AUTH_KEY")
            .stdin(Stdio::null())
            .output()
            .expect("run buildlet")
    };
    let base = vec![
        "--listen".to_string(),
        "127.0.0.1:0".into(),
        "--workdir".into(),
        dir.path().join("w").display().to_string(),
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
    ];
    let out = run(base.clone());
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unauthenticated"), "{stderr}");
    assert!(out.stdout.is_empty(), "printed a listening line: {out:?}");

    let out = run(vec!["--listen".into(), "127.0.0.1:0".into()]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--workdir"));

    let out = run(vec!["--no-such-flag".into()]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");

    let mut missing_key = base.clone();
    missing_key.extend(["--auth-key-file".into(), "/nonexistent/key".into()]);
    let out = run(missing_key);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/key"));

    let out = run(vec!["version".into()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("buildlet {}", env!("CARGO_PKG_VERSION"))
    );
}

/// Transfers go on bulk connections of their own (ALPN `buildfarm-bulk/1`), authorized
/// exactly as calls are: the right key or a client certificate moves the bytes; no
/// credentials or a wrong key is refused there and extracts nothing.
#[tokio::test]
async fn bulk_connections_are_authorized_as_calls_are() {
    let b = TestBuildlet::start().await;
    let tgz = tgz(&[("bulk/hello.txt", 0o644, b"over a bulk connection")]);
    let c = b.client().await;
    let stats = c
        .put_tar(".", std::io::Cursor::new(tgz.clone()), None)
        .await
        .expect("put_tar with the right key");
    assert_eq!(stats.entries, 1, "{stats:?}");
    let mut back = Vec::new();
    c.get_tar("bulk", &mut back, None).await.expect("get_tar");
    assert!(!back.is_empty());
    assert!(
        eventually(std::time::Duration::from_secs(10), || b
            .log()
            .contains("put_tar (data connection)"))
        .await,
        "the upload did not use a bulk connection:\n{}",
        b.log()
    );
    assert!(b.log().contains("get_tar (data connection)"), "{}", b.log());

    let anonymous = BuildletClient::connect(b.options()).await.expect("connect");
    let err = anonymous
        .put_tar("other", std::io::Cursor::new(tgz.clone()), None)
        .await
        .expect_err("anonymous upload accepted");
    assert_eq!(err.code(), ErrorCode::Unauthenticated, "{err}");
    let mut o = b.options();
    o.bearer_key = Some("not-the-key".into());
    let wrong = BuildletClient::connect(o).await.expect("connect");
    let err = wrong
        .get_tar("bulk", &mut Vec::new(), None)
        .await
        .expect_err("wrong key download accepted");
    assert_eq!(err.code(), ErrorCode::PermissionDenied, "{err}");
    assert!(b.log().contains("refused bulk connection"), "{}", b.log());
    let err = c
        .get_tar("other", &mut Vec::new(), None)
        .await
        .expect_err("an anonymous upload landed");
    assert_eq!(err.code(), ErrorCode::NotFound, "{err}");

    // A client certificate is enough, as for calls.
    let m = TestBuildlet::start_with(Options {
        bearer_key: false,
        ..Options::default()
    })
    .await;
    let mut o = m.options();
    o.client_identity = Some(m.client_identity("coordinator"));
    let by_cert = BuildletClient::connect(o).await.expect("connect");
    by_cert
        .put_tar(".", std::io::Cursor::new(tgz), None)
        .await
        .expect("put_tar with a client certificate");
    assert!(
        eventually(std::time::Duration::from_secs(10), || m
            .log()
            .contains("put_tar (data connection)"))
        .await,
        "{}",
        m.log()
    );
}
