//! Buildlets that fetch themselves: a real coordinator serves `/buildlet/{os}-{arch}`
//! over TLS, and the bootstrap script runs for real under `sh` with `curl`: it fetches
//! the binary trusting only the farm CA, checks the digest, writes the machine's
//! credentials and execs the buildlet, which then answers the coordinator's client
//! with that machine's certificate and bearer key (and nothing else).

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use buildfarm_config::Config;
use buildfarm_tls::CertificateAuthority;
use buildlet::client::{BuildletClient, ExecSpec};
use coordinator::app::{self, Running, StartOptions};
use coordinator::pool::bootstrap::{
    BootstrapParams, MachineCredentials, SHA256_HEADER, bootstrap_script, local_platform,
    sha256_file,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const WAIT: Duration = Duration::from_secs(120);

struct Coord {
    _tmp: tempfile::TempDir,
    running: Running,
    ca: CertificateAuthority,
    port: u16,
}

/// A coordinator with no pools, serving `buildlet` as its local binary.
async fn coordinator(buildlet: &Path) -> Coord {
    buildfarm_tls::install_crypto_provider();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut config = Config::default();
    config.coordinator.data_dir = tmp.path().join("data");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let running = app::start(
        config,
        listener,
        StartOptions {
            buildlet_bin: Some(buildlet.to_owned()),
            config_file: None,
        },
    )
    .await
    .expect("start coordinator");
    let data = running.farm.data_dir().to_path_buf();
    let ca = app::load_or_create_ca(&data.join("tls")).expect("ca");
    Coord {
        _tmp: tmp,
        running,
        ca,
        port,
    }
}

fn https_client(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("ca pem"))
        .build()
        .expect("client")
}

/// Runs `script` under `sh` as a machine would at boot.
fn run_script(script: &str) -> Child {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sh")
}

fn params<'a>(
    c: &Coord,
    creds: &'a MachineCredentials,
    sha256: String,
    dir: &Path,
    ca_pem: String,
) -> BootstrapParams<'a> {
    BootstrapParams {
        // The name on the coordinator's certificate; dialled at its address, as a
        // container reaches the coordinator through its network's gateway.
        coordinator_url: format!("https://localhost:{}", c.port),
        connect_to: Some(format!("127.0.0.1:{}", c.port)),
        coordinator_ca_pem: ca_pem,
        platform: local_platform().expect("platform"),
        sha256,
        credentials: creds,
        host_type: "boot-test".into(),
        listen: "127.0.0.1:0".into(),
        dir: dir.display().to_string(),
        extra_args: vec!["--cgroup".into(), "none".into()],
    }
}

#[tokio::test]
async fn serves_binaries_with_their_digest_and_404s_the_rest() {
    let bin = common::buildlet_bin();
    let c = coordinator(&bin).await;
    let http = https_client(c.ca.cert_pem());
    let platform = local_platform().expect("platform");
    let url = format!("https://localhost:{}/buildlet/{platform}", c.port);
    let resp = http.get(&url).send().await.expect("GET binary");
    assert_eq!(resp.status(), 200);
    let header = resp
        .headers()
        .get(SHA256_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .expect("digest header");
    let body = resp.bytes().await.expect("body");
    let want = sha256_file(&bin).await.expect("hash");
    assert_eq!(header, want);
    use sha2::Digest;
    assert_eq!(hex::encode(sha2::Sha256::digest(&body)), want);
    assert_eq!(
        body.len() as u64,
        std::fs::metadata(&bin).expect("meta").len()
    );

    for path in [
        "linux-nosuch",
        "windows-amd64",
        "..%2F..%2Fetc%2Fpasswd",
        "a-b-c",
    ] {
        let resp = http
            .get(format!("https://localhost:{}/buildlet/{path}", c.port))
            .send()
            .await
            .expect("GET");
        assert_eq!(resp.status(), 404, "{path}");
        let text = resp.text().await.expect("text");
        assert!(!text.contains(&bin.display().to_string()), "{text}");
    }
    c.running.stop(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn script_fetches_checks_and_runs_the_buildlet_with_its_own_credentials() {
    let bin = common::buildlet_bin();
    let c = coordinator(&bin).await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let machine_dir = tmp.path().join("machine");
    let creds = MachineCredentials::issue(&c.ca, &["bl-boot-1"]).expect("creds");
    let sha = sha256_file(&bin).await.expect("hash");
    let script = bootstrap_script(&params(
        &c,
        &creds,
        sha.clone(),
        &machine_dir,
        c.ca.cert_pem().to_owned(),
    ));
    let mut child = run_script(&script);
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("buildlet started in time")
        .expect("read stdout")
        .and_then(|l| l.strip_prefix("buildlet listening on ").map(str::to_owned));
    let Some(addr) = addr else {
        let out = child.wait_with_output().await.expect("wait");
        panic!(
            "bootstrap did not start the buildlet: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // What ran is exactly the served binary.
    assert_eq!(
        sha256_file(&machine_dir.join("buildlet"))
            .await
            .expect("hash"),
        sha
    );
    let ca_pem = c.ca.cert_pem().to_owned();
    let client = BuildletClient::connect(creds.connect_options(addr.clone(), &ca_pem))
        .await
        .expect("connect with the machine's credentials");
    let status = client.status().await.expect("status");
    assert_eq!(status.host_type, "boot-test");
    let mut out = Vec::new();
    let st = client
        .exec_collect(
            ExecSpec::new("sh").args(["-c", "echo fetched-and-running"]),
            |_, b| out.extend_from_slice(b),
        )
        .await
        .expect("exec");
    assert!(st.success(), "{st:?}");
    assert_eq!(String::from_utf8_lossy(&out).trim(), "fetched-and-running");

    // Another machine's bearer key does not open this one.
    let other = MachineCredentials::issue(&c.ca, &["bl-boot-1"]).expect("creds");
    let wrong = BuildletClient::connect(other.connect_options(addr.clone(), &ca_pem))
        .await
        .expect("tls connects");
    let err = wrong.status().await.expect_err("wrong key refused");
    assert_eq!(
        err.code(),
        buildlet::client::ErrorCode::PermissionDenied,
        "{err}"
    );
    // Nor does a certificate check against another machine's name.
    let mut misnamed = creds.connect_options(addr, &ca_pem);
    misnamed.server_name = Some("bl-boot-2".into());
    let refused = match BuildletClient::connect(misnamed).await {
        Err(_) => true,
        Ok(cl) => cl.status().await.is_err(),
    };
    assert!(
        refused,
        "a certificate for bl-boot-1 must not pass as bl-boot-2"
    );

    child.start_kill().expect("kill");
    let _ = child.wait().await;
    c.running.stop(Duration::from_secs(10)).await;
}

/// Runs the script to its end and returns (success, stderr).
async fn run_to_end(script: &str) -> (bool, String) {
    let out = tokio::time::timeout(WAIT, run_script(script).wait_with_output())
        .await
        .expect("script finished in time")
        .expect("wait");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_wrong_digest_refuses_to_run() {
    let bin = common::buildlet_bin();
    let c = coordinator(&bin).await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir: PathBuf = tmp.path().join("machine");
    let creds = MachineCredentials::issue(&c.ca, &["bl-boot-2"]).expect("creds");
    let script = bootstrap_script(&params(
        &c,
        &creds,
        "0".repeat(64),
        &dir,
        c.ca.cert_pem().to_owned(),
    ));
    let (ok, stderr) = run_to_end(&script).await;
    assert!(!ok, "a wrong digest must fail the bootstrap");
    assert!(stderr.contains("digest mismatch"), "{stderr}");
    assert!(!dir.join("buildlet").exists(), "nothing runnable is left");
    assert!(!dir.join("buildlet.download").exists());
    c.running.stop(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn the_fetch_trusts_only_the_given_ca() {
    let bin = common::buildlet_bin();
    let c = coordinator(&bin).await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir: PathBuf = tmp.path().join("machine");
    let creds = MachineCredentials::issue(&c.ca, &["bl-boot-3"]).expect("creds");
    let sha = sha256_file(&bin).await.expect("hash");
    let stranger = CertificateAuthority::generate("another CA").expect("ca");
    let script = bootstrap_script(&params(
        &c,
        &creds,
        sha,
        &dir,
        stranger.cert_pem().to_owned(),
    ));
    let (ok, stderr) = run_to_end(&script).await;
    assert!(
        !ok,
        "a coordinator certificate from another CA must fail the fetch"
    );
    assert!(stderr.contains("curl"), "{stderr}");
    assert!(!dir.join("buildlet").exists());
    c.running.stop(Duration::from_secs(10)).await;
}
