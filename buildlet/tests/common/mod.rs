//! Test harness: starts the real `buildlet` binary on 127.0.0.1:0 with certificates made
//! for the test, waits for its "listening on" line, and hands out connected clients.
//! Also small helpers shared by the integration tests (tarballs, /proc inspection).
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use buildfarm_tls::{CertificateAuthority, Identity};
use buildlet::client::{BuildletClient, ConnectOptions};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

pub const KEY: &str = "test-bearer-key-0123456789";

/// How the buildlet is started.
#[derive(Clone, Copy)]
pub struct Options {
    pub client_ca: bool,
    pub bearer_key: bool,
    /// Run a copy of the binary from the test dir: another user may not be able to
    /// reach the target dir (CI keeps it under root's 0700 home).
    pub copy_binary: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            client_ca: true,
            bearer_key: true,
            copy_binary: false,
        }
    }
}

pub struct TestBuildlet {
    pub child: Child,
    pub addr: String,
    pub ca: CertificateAuthority,
    /// Holds certificates, the workdir and the log; its `outside` dir is a sibling of
    /// the workdir that escape tests watch.
    pub dir: TempDir,
    pub workdir: PathBuf,
    pub outside: PathBuf,
    _stdout: BufReader<ChildStdout>,
}

impl TestBuildlet {
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(opts: Options) -> Self {
        Self::start_full(opts, &[], None).await
    }

    /// Starts the buildlet with `extra` command-line arguments appended.
    pub async fn start_with_args(opts: Options, extra: &[&str]) -> Self {
        Self::start_full(opts, extra, None).await
    }

    /// Starts with `extra_args` added, on `workdir` if given (else `<dir>/work`).
    pub async fn start_full(opts: Options, extra_args: &[&str], workdir: Option<&Path>) -> Self {
        Self::start_custom(opts, extra_args, workdir, |_, _| {}).await
    }

    /// Like `start_full`, with `customize` called on the command (and the test dir,
    /// holding the certificates) just before the buildlet is spawned.
    pub async fn start_custom(
        opts: Options,
        extra_args: &[&str],
        workdir: Option<&Path>,
        customize: impl FnOnce(&mut Command, &Path),
    ) -> Self {
        buildfarm_tls::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertificateAuthority::generate("buildlet test ca").expect("ca");
        let server = ca
            .issue_server(&["localhost", "127.0.0.1"])
            .expect("server cert");
        let (cert, key) = server
            .write_files(dir.path(), "server")
            .expect("write cert");
        let ca_file = dir.path().join("client-ca.crt");
        std::fs::write(&ca_file, ca.cert_pem()).expect("write ca");
        let key_file = dir.path().join("auth.key");
        std::fs::write(&key_file, format!("{KEY}\n")).expect("write key");
        let workdir = workdir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.path().join("work"));
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).expect("outside dir");
        std::fs::write(outside.join("precious.txt"), "do not touch").expect("outside file");
        let log = std::fs::File::create(dir.path().join("buildlet.log")).expect("log");

        let binary = if opts.copy_binary {
            let copy = dir.path().join("buildlet");
            std::fs::copy(env!("CARGO_BIN_EXE_buildlet"), &copy).expect("copy buildlet");
            copy
        } else {
            PathBuf::from(env!("CARGO_BIN_EXE_buildlet"))
        };
        let mut cmd = Command::new(binary);
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--workdir")
            .arg(&workdir)
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .arg("--host-type")
            .arg("host-test")
            .args(extra_args)
            .env_remove("BUILDLET_AUTH_KEY")
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        if opts.client_ca {
            cmd.arg("--client-ca").arg(&ca_file);
        }
        if opts.bearer_key {
            cmd.arg("--auth-key-file").arg(&key_file);
        }
        customize(&mut cmd, dir.path());
        let mut child = cmd.spawn().expect("spawn buildlet");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        let read = tokio::time::timeout(Duration::from_secs(60), stdout.read_line(&mut line)).await;
        let log_text =
            || std::fs::read_to_string(dir.path().join("buildlet.log")).unwrap_or_default();
        match read {
            Ok(Ok(n)) if n > 0 => {}
            other => panic!("buildlet did not start: {other:?}\n{}", log_text()),
        }
        let addr = line
            .trim()
            .strip_prefix("buildlet listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        TestBuildlet {
            child,
            addr,
            ca,
            workdir: std::fs::canonicalize(&workdir).expect("canonical workdir"),
            outside,
            dir,
            _stdout: stdout,
        }
    }

    /// Connect options trusting the test CA, with no credentials.
    pub fn options(&self) -> ConnectOptions {
        ConnectOptions::new(self.addr.clone(), self.ca.cert_pem())
    }

    /// A client authenticated with the bearer key.
    pub async fn client(&self) -> BuildletClient {
        let mut o = self.options();
        o.bearer_key = Some(KEY.into());
        BuildletClient::connect(o).await.expect("connect")
    }

    pub fn client_identity(&self, name: &str) -> Identity {
        self.ca.issue_client(name).expect("client cert")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("buildlet.log")).unwrap_or_default()
    }

    /// Waits for the process to exit on its own.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(Ok(st)) => st,
            other => panic!("buildlet did not exit: {other:?}\n{}", self.log()),
        }
    }

    /// The container cgroup the buildlet logged at start-up, if it uses one.
    pub fn container_cgroup(&self) -> Option<PathBuf> {
        logged_container(&self.log())
    }
}

/// The container cgroup a buildlet's log names ("commands contained in cgroups").
pub fn logged_container(log: &str) -> Option<PathBuf> {
    let log = strip_ansi(log);
    let line = log
        .lines()
        .find(|l| l.contains("commands contained in cgroups"))?;
    let at = line.rfind("cgroup=")?;
    Some(PathBuf::from(line[at + "cgroup=".len()..].trim()))
}

/// SIGKILLs a buildlet and, acting as its supervisor, removes the container cgroup its
/// `log` names (a SIGKILLed buildlet leaves it on purpose), so tests leave none behind.
pub fn kill_and_remove_container(child: &mut Child, log: &str) {
    let Some(cg) = logged_container(log) else {
        return;
    };
    if let Some(pid) = child.id() {
        let _ = child.start_kill();
        // Dead once it is a zombie (tokio reaps it later) or gone.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Ok(stat) if !stat.contains(") Z ") => std::thread::sleep(Duration::from_millis(10)),
                _ => break,
            }
        }
    }
    if let Ok(cg) = buildlet::cgroup::Cgroup::open(&cg) {
        let _ = cg.remove(Duration::from_secs(5));
    }
}

/// `text` without terminal colour sequences (`ESC [ ... m`), as tracing writes them.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Drop for TestBuildlet {
    fn drop(&mut self) {
        let log = self.log();
        kill_and_remove_container(&mut self.child, &log);
    }
}

/// Builds a tar.gz of `entries` (path, mode, contents), with directories implied.
pub fn tgz(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut b = tar::Builder::new(gz);
    for (path, mode, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, path, *data).expect("append");
    }
    b.into_inner().expect("tar").finish().expect("gzip")
}

/// A tar.gz with one regular entry whose raw name is `name` (may be hostile).
pub fn raw_tgz(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut tar = Vec::new();
    for (name, data) in entries {
        let mut h = tar::Header::new_old();
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        tar.extend_from_slice(h.as_bytes());
        tar.extend_from_slice(data);
        tar.resize(tar.len().div_ceil(512) * 512, 0);
    }
    tar.resize(tar.len() + 1024, 0);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).expect("gzip");
    gz.finish().expect("gzip")
}

/// Every file under `root` (relative path -> (mode bits, contents or link target)).
pub fn tree(root: &Path) -> std::collections::BTreeMap<String, (u32, Vec<u8>)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = std::collections::BTreeMap::new();
    for e in walkdir::WalkDir::new(root).min_depth(1) {
        let e = e.expect("walk");
        let rel = e
            .path()
            .strip_prefix(root)
            .expect("prefix")
            .to_string_lossy()
            .into_owned();
        let meta = e.path().symlink_metadata().expect("meta");
        let body = if meta.file_type().is_symlink() {
            std::fs::read_link(e.path())
                .expect("readlink")
                .to_string_lossy()
                .into_owned()
                .into_bytes()
        } else if meta.is_file() {
            std::fs::read(e.path()).expect("read")
        } else {
            Vec::new()
        };
        let mode = if meta.file_type().is_symlink() {
            0
        } else {
            meta.permissions().mode() & 0o7777
        };
        out.insert(rel, (mode, body));
    }
    out
}

/// Live (non-zombie) processes whose process group is `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name (which may hold spaces and parentheses).
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let (Some(state), Some(pgrp)) = (fields.first(), fields.get(2)) else {
            continue;
        };
        if *state != "Z" && pgrp.parse::<i32>().ok() == Some(pgid) {
            out.push(pid);
        }
    }
    out
}

/// Polls until `cond` holds or `within` passes; returns whether it held.
pub async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
