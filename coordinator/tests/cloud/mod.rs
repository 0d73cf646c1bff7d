//! Shared parts of the cloud pool tests: machines simulated by local processes that run
//! the boot script a pool gave them, on a loopback address of their own (all of
//! 127.0.0.0/8 is loopback: no traffic leaves the host), and a test provisioner.

#![allow(dead_code)]

pub mod kube_api;
pub mod kubelet;
pub mod moto;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use buildfarm_tls::CertificateAuthority;
use buildlet::client::ConnectOptions;
use coordinator::pool::provision::{Provision, Provisioned};
use tokio::process::{Child, Command};

/// Generous: these start processes on a shared two-core machine.
pub const WAIT: Duration = Duration::from_secs(120);

pub fn buildlet_bin() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_coordinator"));
    let p = exe.parent().expect("bin dir").join("buildlet");
    assert!(
        p.exists(),
        "{} is missing: build it first (`cargo build -p buildlet`)",
        p.display()
    );
    p
}

/// Single-quotes `s` for `sh`.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Issues per-machine credentials from a CA of its own and writes a boot script that
/// starts the local buildlet binary in listen mode with them on `0.0.0.0:<port>`, as
/// the coordinator's bootstrap does (without fetching: the tests of the bootstrap itself
/// are `tests/bootstrap.rs`).
pub struct TestProvision {
    pub ca: CertificateAuthority,
    pub buildlet: PathBuf,
    pub issued: Mutex<Vec<String>>,
    pub revoked: Mutex<Vec<String>>,
}

impl TestProvision {
    pub fn new() -> Arc<Self> {
        Arc::new(TestProvision {
            ca: CertificateAuthority::generate("test farm CA").expect("ca"),
            buildlet: buildlet_bin(),
            issued: Mutex::new(Vec::new()),
            revoked: Mutex::new(Vec::new()),
        })
    }
}

#[async_trait::async_trait]
impl Provision for TestProvision {
    async fn provision(
        &self,
        machine: &str,
        host_type: &str,
        port: u16,
    ) -> anyhow::Result<Provisioned> {
        let server_name = format!("{machine}.buildlet.test");
        let id = self.ca.issue_server(&[&server_name])?;
        let key = hex::encode(rand::random::<[u8; 16]>());
        let script = format!(
            "set -eu\n\
             d=$(mktemp -d)\n\
             cat > \"$d/cert.pem\" <<'EOF_CERT'\n{cert}EOF_CERT\n\
             cat > \"$d/key.pem\" <<'EOF_KEY'\n{pkey}EOF_KEY\n\
             printf '%s' {key} > \"$d/auth\"\n\
             exec {bin} --listen '0.0.0.0:{port}' --workdir \"$d/work\" \
             --tls-cert \"$d/cert.pem\" --tls-key \"$d/key.pem\" --auth-key-file \"$d/auth\" \
             --host-type {ht} --cgroup none\n",
            cert = ensure_newline(&id.cert_pem),
            pkey = ensure_newline(&id.key_pem),
            key = sh_quote(&key),
            bin = sh_quote(&self.buildlet.display().to_string()),
            ht = sh_quote(host_type),
        );
        let mut connect = ConnectOptions::new(String::new(), self.ca.cert_pem().to_owned());
        connect.server_name = Some(server_name);
        connect.bearer_key = Some(key);
        connect.connect_timeout = Duration::from_secs(2);
        self.issued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(machine.to_owned());
        Ok(Provisioned { script, connect })
    }

    fn revoke(&self, machine: &str) {
        self.revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(machine.to_owned());
    }
}

fn ensure_newline(s: &str) -> String {
    if s.ends_with('\n') {
        s.to_owned()
    } else {
        format!("{s}\n")
    }
}

/// Machines (pods, instances) played by local processes, by name.
#[derive(Default, Clone)]
pub struct Machines {
    procs: Arc<Mutex<HashMap<String, Child>>>,
}

impl Machines {
    /// Runs `script` with `sh` as machine `name` whose only address is `ip`: the
    /// buildlet's `--listen '0.0.0.0:PORT'` becomes `ip:PORT` (on a real machine
    /// 0.0.0.0 is its own address; here every machine shares the host's loopback).
    pub fn boot(&self, name: &str, script: &str, ip: &str) {
        assert!(
            script.contains("--listen '0.0.0.0:"),
            "the boot script does not listen on 0.0.0.0: {script}"
        );
        let script = script.replace("--listen '0.0.0.0:", &format!("--listen '{ip}:"));
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .process_group(0);
        // kill_on_drop does not run when the test process is killed (a timed-out test, an
        // interrupted run): the machine must not outlive it holding its address.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let child = command.spawn().expect("starting a machine's boot script");
        self.procs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), child);
    }

    /// The machine's processes die (deletion, eviction, termination).
    pub fn kill(&self, name: &str) -> bool {
        let child = self
            .procs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        match child {
            Some(mut c) => {
                if let Some(pid) = c.id() {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = c.start_kill();
                true
            }
            None => false,
        }
    }

    /// Machines whose processes exited by themselves since the last call (forgotten).
    pub fn reap(&self) -> Vec<(String, i32)> {
        let mut procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
        let mut gone = Vec::new();
        procs.retain(|name, child| match child.try_wait() {
            Ok(Some(status)) => {
                use std::os::unix::process::ExitStatusExt;
                let code = status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
                gone.push((name.clone(), code));
                false
            }
            _ => true,
        });
        gone
    }

    pub fn running(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .procs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    pub fn kill_all(&self) {
        for name in self.running() {
            self.kill(&name);
        }
    }
}

/// Waits (bounded by [`WAIT`]) until `cond` holds.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
