//! End-to-end tests of gomote instances acting like their builder (environment,
//! `--builderenv`, `list` times) and of message limits: a real coordinator with local
//! buildlets, driven through the real `gomote` binary.

mod common;

use std::io::Write;
use std::path::Path;

use common::*;
use sha2::{Digest, Sha256};

/// Two host types; three builders on `local` (two of them cross builders with their own
/// GOOS/GOARCH), one on `other`. The API takes messages of at most `max_message` (1 MiB
/// in most tests), so anything bigger must be streamed. No repos: nothing builds while
/// the gomotes run.
fn config(data_dir: &Path, max_message: &str) -> String {
    format!(
        r#"
[coordinator]
listen = "127.0.0.1:0"
data_dir = "{data}"

[limits]
gomote_instances_per_user = 4
interactive_share_percent = 100
max_message_bytes = "{max_message}"

[[host_types]]
name = "local"
pool = {{ kind = "local", count = 2 }}
env = {{ HOST_MARK = "from-the-host-type", GOFLAGS = "-mod=mod" }}

[[host_types]]
name = "other"
pool = {{ kind = "local", count = 1 }}

[[builders]]
name = "windows-amd64"
host_type = "local"
env = {{ GOOS = "windows", GOARCH = "amd64", CGO_ENABLED = "0" }}
steps = [{{ name = "build", command = ["go", "build", "./..."] }}]

[[builders]]
name = "windows-386"
host_type = "local"
env = {{ GOOS = "windows", GOARCH = "386", HOST_MARK = "from-the-builder" }}
steps = [{{ name = "build", command = ["go", "build", "./..."] }}]

[[builders]]
name = "linux-amd64-other"
host_type = "other"
env = {{ GOOS = "linux", GOARCH = "amd64" }}
steps = [{{ name = "build", command = ["go", "build", "./..."] }}]
"#,
        data = data_dir.display(),
    )
}

async fn start() -> (tempfile::TempDir, TestFarm) {
    start_with_message_limit("1 MiB").await
}

async fn start_with_message_limit(max_message: &str) -> (tempfile::TempDir, TestFarm) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let cfg = tmp.path().join("coordinator.toml");
    std::fs::write(&cfg, config(&data, max_message)).expect("write config");
    let farm = TestFarm::start(&cfg, &data).await;
    (tmp, farm)
}

/// Runs gomote; returns exit code, stdout, stderr.
fn gomote(farm: &TestFarm, args: &[&str]) -> (Option<i32>, String, String) {
    let out = farm.gomote().args(args).output().expect("gomote");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn create(farm: &TestFarm, builder: &str) -> String {
    let (code, out, err) = gomote(farm, &["create", builder]);
    assert_eq!(code, Some(0), "create {builder}: {err}");
    out.trim().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn gomote_commands_get_their_builders_environment() {
    let (_tmp, farm) = start().await;
    let inst = create(&farm, "windows-amd64");

    // `list` says when, in words.
    let (code, list, err) = gomote(&farm, &["list"]);
    assert_eq!(code, Some(0), "{err}");
    let line = list
        .lines()
        .find(|l| l.starts_with(&inst))
        .unwrap_or_else(|| panic!("{inst} not listed: {list}"));
    let fields: Vec<&str> = line.split('\t').collect();
    assert_eq!(fields[1..3], ["windows-amd64", "local"], "{line}");
    assert!(
        fields[3].starts_with("created ") && fields[3].ends_with(" ago"),
        "{line}"
    );
    // The default idle timeout is 30 minutes, counted from the last use (the create).
    let minutes_left: u32 = fields[4]
        .strip_prefix("expires in ")
        .and_then(|rest| rest.split('m').next())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no expiry in {line}"));
    assert!((25..30).contains(&minutes_left), "{line}");

    // A command sees the builder's GOOS/GOARCH, as a build step would, and the host
    // type's env under it.
    let (code, out, err) = gomote(&farm, &["run", &inst, "--", "go", "env", "GOOS", "GOARCH"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "windows\namd64\n");
    let (code, out, err) = gomote(&farm, &["run", &inst, "--", "sh", "-c", "echo $HOST_MARK"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "from-the-host-type\n");

    // The caller's --env goes on top of the builder's.
    let (code, out, err) = gomote(
        &farm,
        &[
            "run",
            &inst,
            "-e",
            "GOARCH=arm64",
            "--",
            "go",
            "env",
            "GOARCH",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "arm64\n");

    // --builderenv: another builder of the same host type, its env instead (the
    // builder's HOST_MARK over the host type's).
    let (code, out, err) = gomote(
        &farm,
        &[
            "run",
            &inst,
            "--builderenv",
            "windows-386",
            "--",
            "sh",
            "-c",
            "echo $GOOS $GOARCH $HOST_MARK",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "windows 386 from-the-builder\n");

    // A builder of another host type is refused, saying why; an unknown one is not found.
    let (code, out, err) = gomote(
        &farm,
        &[
            "run",
            &inst,
            "--builderenv",
            "linux-amd64-other",
            "--",
            "true",
        ],
    );
    assert_ne!(code, Some(0));
    assert_eq!(out, "");
    assert!(err.contains("InvalidArgument"), "{err}");
    assert!(
        err.contains("builder linux-amd64-other runs on host type other"),
        "{err}"
    );
    let (code, _, err) = gomote(
        &farm,
        &["run", &inst, "--builderenv", "nope-386", "--", "true"],
    );
    assert_ne!(code, Some(0));
    assert!(
        err.contains("NotFound") && err.contains("nope-386"),
        "{err}"
    );

    // `gomote ssh` gets the same environment, and takes --builderenv too.
    for (extra, want) in [
        (None, "env-windows-amd64-from-the-host-type"),
        (Some("windows-386"), "env-windows-386-from-the-builder"),
    ] {
        let mut cmd = farm.gomote();
        cmd.args(["ssh", &inst]);
        if let Some(b) = extra {
            cmd.args(["--builderenv", b]);
        }
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("gomote ssh");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"echo env-$GOOS-$GOARCH-$HOST_MARK\nexit 3\n")
            .expect("write");
        let out = child.wait_with_output().expect("wait");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(3),
            "{stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The PTY echoes the typed line too, unexpanded, so only the output matches.
        assert!(stdout.contains(want), "{stdout}");
    }
    let out = farm
        .gomote()
        .args(["ssh", &inst, "--builderenv", "linux-amd64-other"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("gomote ssh");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("InvalidArgument"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert_eq!(gomote(&farm, &["destroy", &inst]).0, Some(0));
    farm.kill().await;
}

/// Writes `len` pseudo-random bytes (xorshift: incompressible, reproducible) and returns
/// their SHA-256 in hex.
fn write_random_file(path: &Path, len: usize) -> String {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut hasher = Sha256::new();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut block = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for word in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
        }
        let n = left.min(block.len());
        f.write_all(&block[..n]).expect("write");
        hasher.update(&block[..n]);
        left -= n;
    }
    f.flush().expect("flush");
    hex::encode(hasher.finalize())
}

fn remote_sha256(farm: &TestFarm, inst: &str, path: &str) -> String {
    let (code, out, err) = gomote(farm, &["run", inst, "--", "sha256sum", path]);
    assert_eq!(code, Some(0), "{err}");
    out.split_whitespace().next().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_100_mb_put_round_trips_byte_identical_under_a_1_mib_message_limit() {
    let (tmp, farm) = start().await;
    let inst = create(&farm, "linux-amd64-other");

    let big = tmp.path().join("big.bin");
    let want = write_random_file(&big, 100 << 20);
    std::fs::set_permissions(&big, std::os::unix::fs::PermissionsExt::from_mode(0o750))
        .expect("chmod");
    let (code, _, err) = gomote(
        &farm,
        &["put", &inst, big.to_str().expect("utf8"), "in/sub/big.bin"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(remote_sha256(&farm, &inst, "in/sub/big.bin"), want);
    let (_, mode, _) = gomote(
        &farm,
        &["run", &inst, "--", "stat", "-c", "%a", "in/sub/big.bin"],
    );
    assert_eq!(mode.trim(), "750");

    // And back: gettar returns the same bytes.
    let out_tar = tmp.path().join("back.tar.gz");
    let (code, _, err) = gomote(
        &farm,
        &[
            "gettar",
            &inst,
            "--dir",
            "in",
            "-o",
            out_tar.to_str().expect("utf8"),
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(
        std::fs::File::open(&out_tar).expect("open"),
    ));
    let mut got = None;
    for e in ar.entries().expect("entries") {
        let mut e = e.expect("entry");
        if e.path().expect("path").ends_with("sub/big.bin") {
            let mut h = Sha256::new();
            std::io::copy(&mut e, &mut h).expect("read entry");
            got = Some(hex::encode(h.finalize()));
        }
    }
    assert_eq!(got.as_deref(), Some(want.as_str()), "gettar round trip");

    // A second put replaces the file; a file of zeros (highly compressible) goes too.
    let zeros = tmp.path().join("zeros.bin");
    std::fs::write(&zeros, vec![0u8; 8 << 20]).expect("write");
    let (code, _, err) = gomote(
        &farm,
        &[
            "put",
            &inst,
            zeros.to_str().expect("utf8"),
            "in/sub/big.bin",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        remote_sha256(&farm, &inst, "in/sub/big.bin"),
        hex::encode(Sha256::digest(vec![0u8; 8 << 20]))
    );

    // Bad input gets a clear error, before anything is sent.
    let (code, _, err) = gomote(&farm, &["put", &inst, "/nonexistent/file"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("/nonexistent/file"), "{err}");
    let (code, _, err) = gomote(
        &farm,
        &["put", &inst, zeros.to_str().expect("utf8"), "../escape.bin"],
    );
    assert_ne!(code, Some(0));
    assert!(err.contains(".."), "{err}");

    // puttar streams too: a tarball bigger than one message.
    let tarball = tmp.path().join("t.tar.gz");
    {
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&tarball).expect("create"),
            flate2::Compression::none(),
        );
        let mut b = tar::Builder::new(gz);
        b.append_path_with_name(&big, "big-copy.bin")
            .expect("append");
        b.into_inner().expect("tar").finish().expect("gzip");
    }
    let (code, _, err) = gomote(
        &farm,
        &[
            "puttar",
            &inst,
            tarball.to_str().expect("utf8"),
            "--dir",
            "t",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(remote_sha256(&farm, &inst, "t/big-copy.bin"), want);
    farm.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_over_the_limit_gets_resource_exhausted_naming_the_limit() {
    let (tmp, farm) = start().await;
    // A try patch travels in one message: 2 MiB is over the configured 1 MiB.
    let patch = tmp.path().join("big.patch");
    std::fs::write(&patch, vec![b'+'; 2 << 20]).expect("write");
    let (code, out, err) = gomote(
        &farm,
        &["try", "t", "main", "--patch", patch.to_str().expect("utf8")],
    );
    assert_ne!(code, Some(0));
    assert_eq!(out, "");
    assert!(err.contains("(ResourceExhausted)"), "{err}");
    assert!(
        err.contains(
            "over the coordinator's limit of 1048576 bytes per message (limits.max_message_bytes"
        ),
        "{err}"
    );
    assert!(!err.contains("decoded message length"), "{err}");

    // Under the limit the same call reaches the handler (which knows no repo `t`).
    std::fs::write(&patch, b"+small\n").expect("write");
    let (code, _, err) = gomote(
        &farm,
        &["try", "t", "main", "--patch", patch.to_str().expect("utf8")],
    );
    assert_ne!(code, Some(0));
    assert!(
        err.contains("NotFound") && err.contains("unknown repo"),
        "{err}"
    );
    farm.kill().await;
}

/// An API client from the farm's gomote settings, with no size limit of its own on
/// sending, so the coordinator's limit is what answers.
async fn api_client(farm: &TestFarm) -> coordinator::client::FarmClient {
    let settings: serde_json::Value = serde_json::from_slice(
        &std::fs::read(farm.data_dir.join("gomote.json")).expect("gomote.json"),
    )
    .expect("json");
    let ca = buildfarm_tls::load_ca_file(Path::new(settings["ca_file"].as_str().expect("ca")))
        .expect("ca");
    coordinator::client::FarmClient::connect(
        settings["coordinator"].as_str().expect("coordinator"),
        &ca,
        Some(settings["token"].as_str().expect("token")),
        std::time::Duration::from_secs(30),
    )
    .await
    .expect("connect")
}

fn assert_names_the_limit(err: &coordinator::client::ApiError) {
    assert_eq!(
        err.code(),
        coordinator::client::Code::ResourceExhausted,
        "{err:?}"
    );
    assert!(
        err.message().contains(
            "over the coordinator's limit of 1048576 bytes per message (limits.max_message_bytes"
        ),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_unary_and_streamed_messages_get_resource_exhausted_naming_the_limit() {
    let (_tmp, farm) = start().await;
    let inst = create(&farm, "linux-amd64-other");
    let client = api_client(&farm).await;

    // Unary: one WriteFile of 2 MiB.
    let err = client
        .write_file(&inst, "big", 0o644, vec![7u8; 2 << 20])
        .await
        .expect_err("2 MiB accepted");
    assert_names_the_limit(&err);

    // Client streaming over gRPC: a PutTar whose first data message is 2 MiB; the
    // upload stops there and the caller hears about the limit, not about a truncated
    // tarball.
    let zeros = || futures::stream::iter([bytes::Bytes::from(vec![0u8; 2 << 20])]);
    let err = client
        .clone()
        .without_bulk_connections()
        .put_tar(&inst, "t", zeros())
        .await
        .expect_err("2 MiB chunk accepted");
    assert_names_the_limit(&err);
    // On a bulk connection (the client's default) chunks are frames with no message
    // limit: the same 2 MiB reach the buildlet, which finds no tarball in them.
    let err = client
        .put_tar(&inst, "t", zeros())
        .await
        .expect_err("zeros extracted");
    assert_eq!(
        err.code(),
        coordinator::client::Code::InvalidArgument,
        "{err:?}"
    );

    // The instance is still usable, and a small message goes through.
    client
        .write_file(&inst, "small", 0o644, b"ok".to_vec())
        .await
        .expect("small write");
    let (code, out, err) = gomote(&farm, &["run", &inst, "--", "cat", "small"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "ok");
    farm.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_try_patch_under_the_message_limit_but_over_its_own_limit_is_refused_naming_it() {
    // The default message limit (64 MiB) lets a 17 MiB patch reach the try handler,
    // whose own 16 MiB bound answers.
    let (tmp, farm) = start_with_message_limit("64 MiB").await;
    let patch = tmp.path().join("big.patch");
    std::fs::write(&patch, vec![b'+'; 17 << 20]).expect("write");
    let (code, _, err) = gomote(
        &farm,
        &["try", "t", "main", "--patch", patch.to_str().expect("utf8")],
    );
    assert_ne!(code, Some(0));
    assert!(err.contains("(ResourceExhausted)"), "{err}");
    assert!(
        err.contains("patch is 17825792 bytes; the limit for a try patch is 16777216 bytes"),
        "{err}"
    );
    farm.kill().await;
}
