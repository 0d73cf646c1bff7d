//! The local pool: spawns `buildlet` processes on the coordinator's machine, one per
//! lease, each in its own sandbox (see [`super::sandbox`]) with its own workdir outside the
//! data dir and a server certificate of its own from the coordinator's CA, talking mutual
//! TLS on loopback. A released buildlet is killed with everything it started, and its
//! directories removed.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use buildfarm_tls::{CertificateAuthority, Identity};
use buildlet::client::{BuildletClient, ConnectOptions};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::sandbox::{BuildletDirs, Sandbox, Slot, force_remove};
use super::{Lease, Pool, PoolError, PoolStatus};

/// How long a released buildlet has to stop (and kill its commands) before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Everything a local pool needs to start buildlets.
#[derive(Clone)]
pub struct LocalPoolOptions {
    pub host_type: String,
    pub count: usize,
    /// How buildlets are started and where their directories go (shared by local pools).
    pub sandbox: Arc<Sandbox>,
    /// Issues each buildlet's server certificate; clients must chain to it.
    pub ca: Arc<CertificateAuthority>,
    pub ca_pem: String,
    /// The buildlets' stderr logs go here: the operator can read them, builds cannot.
    pub log_dir: PathBuf,
    /// The coordinator's client identity (mutual TLS).
    pub client_identity: Identity,
    pub start_timeout: Duration,
}

pub struct LocalPool {
    opts: LocalPoolOptions,
    in_use: Arc<AtomicUsize>,
    starting: AtomicUsize,
    next_id: AtomicU64,
    tasks: TaskTracker,
}

/// What a started (or half-started) buildlet holds until it is cleaned up.
struct Resources {
    slot: Slot,
    dirs: BuildletDirs,
    log: PathBuf,
}

impl Resources {
    /// Removes the buildlet's directories, then frees its slot (so its uid is reused only
    /// once nothing of it is left).
    async fn remove(self) {
        let Resources { slot, dirs, log } = self;
        let _ = tokio::task::spawn_blocking(move || {
            for p in [&dirs.home, &dirs.creds, &log] {
                if let Err(error) = force_remove(p) {
                    warn!(path = %p.display(), %error, "removing a local buildlet's files");
                }
            }
            drop(slot);
        })
        .await;
    }
}

impl LocalPool {
    pub fn new(opts: LocalPoolOptions, tasks: TaskTracker) -> Self {
        LocalPool {
            opts,
            in_use: Arc::new(AtomicUsize::new(0)),
            starting: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            tasks,
        }
    }

    /// Kills `child` (and so its sandbox) and removes its files, in the background.
    fn discard(&self, mut child: Child, res: Resources) {
        self.tasks.spawn(async move {
            let _ = child.start_kill();
            let _ = child.wait().await;
            res.remove().await;
        });
    }

    async fn start(&self, cancel: &CancellationToken) -> Result<Lease, PoolError> {
        let o = &self.opts;
        let start_err = |message: String| PoolError::Start {
            host_type: o.host_type.clone(),
            message,
        };
        let slot = o
            .sandbox
            .acquire_slot(cancel)
            .await
            .ok_or(PoolError::Cancelled)?;
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let name = format!("local/{}#{n}", o.host_type);
        let slug = format!("{}-{n}-{}", o.host_type, uuid::Uuid::new_v4().simple());
        // A fresh certificate per buildlet: a build that reads its own buildlet's key
        // learns nothing that works against another buildlet or the coordinator.
        let identity =
            o.ca.issue_server(&["localhost", "127.0.0.1"])
                .map_err(|e| start_err(format!("issuing a certificate: {e}")))?;
        let dirs = o
            .sandbox
            .make_dirs(&slot, &slug, &identity, &o.ca_pem)
            .map_err(|e| {
                start_err(format!(
                    "making dirs in {}: {e}",
                    o.sandbox.root().display()
                ))
            })?;
        let log = o.log_dir.join(format!("{slug}.log"));
        let res = Resources { slot, dirs, log };
        let stderr = match std::fs::create_dir_all(&o.log_dir)
            .and_then(|()| std::fs::File::create(&res.log))
        {
            Ok(f) => f,
            Err(e) => {
                let msg = format!("creating {}: {e}", res.log.display());
                res.remove().await;
                return Err(start_err(msg));
            }
        };
        let args: Vec<OsString> = vec![
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--workdir".into(),
            res.dirs.workdir.clone().into(),
            "--tls-cert".into(),
            res.dirs.server_cert().into(),
            "--tls-key".into(),
            res.dirs.server_key().into(),
            "--client-ca".into(),
            res.dirs.client_ca().into(),
            "--host-type".into(),
            o.host_type.clone().into(),
        ];
        let mut cmd = o.sandbox.command(&res.slot, &res.dirs, &args);
        let spawned = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                res.remove().await;
                return Err(start_err(format!("starting the buildlet: {e}")));
            }
        };
        let Some(stdout) = child.stdout.take() else {
            self.discard(child, res);
            return Err(start_err("no stdout pipe".into()));
        };
        let mut lines = BufReader::new(stdout).lines();
        let log_path = res.log.display().to_string();
        let first = tokio::select! {
            _ = cancel.cancelled() => Err(PoolError::Cancelled),
            r = tokio::time::timeout(o.start_timeout, lines.next_line()) => match r {
                Err(_) => Err(start_err(format!("no listening line within {:?}; see {log_path}", o.start_timeout))),
                Ok(Err(e)) => Err(start_err(format!("reading buildlet stdout: {e}"))),
                Ok(Ok(None)) => Err(start_err(format!("buildlet exited at start; see {log_path}"))),
                Ok(Ok(Some(line))) => line
                    .strip_prefix("buildlet listening on ")
                    .map(str::to_owned)
                    .ok_or_else(|| start_err(format!("unexpected first line {line:?}"))),
            }
        };
        let addr = match first {
            Ok(a) => a,
            Err(e) => {
                self.discard(child, res);
                return Err(e);
            }
        };
        let mut connect = ConnectOptions::new(addr.clone(), o.ca_pem.clone());
        connect.client_identity = Some(o.client_identity.clone());
        let client = match BuildletClient::connect(connect).await {
            Ok(c) => c,
            Err(e) => {
                self.discard(child, res);
                return Err(start_err(format!("connecting to {addr}: {e}")));
            }
        };

        let lost = CancellationToken::new();
        let stop = CancellationToken::new();
        {
            let (lost, stop, name) = (lost.clone(), stop.clone(), name.clone());
            self.tasks.spawn(async move {
                // Drain stdout so the buildlet never blocks writing to it.
                let drain = async { while let Ok(Some(_)) = lines.next_line().await {} };
                tokio::select! {
                    status = child.wait() => {
                        warn!(buildlet = %name, ?status, "local buildlet exited");
                        lost.cancel();
                    }
                    _ = stop.cancelled() => {
                        // SIGTERM first: unsandboxed, the buildlet then kills its commands'
                        // process groups itself; sandboxed, bwrap dies and the kernel kills
                        // every process of the sandbox. SIGKILL if it does not exit in time.
                        if let Some(pid) = child.id() {
                            let _ = nix::sys::signal::kill(
                                nix::unistd::Pid::from_raw(pid as i32),
                                nix::sys::signal::Signal::SIGTERM,
                            );
                        }
                        if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_err() {
                            let _ = child.start_kill();
                            let _ = child.wait().await;
                        }
                    }
                    _ = async { drain.await; std::future::pending::<()>().await } => {}
                }
                res.remove().await;
            });
        }
        info!(buildlet = %name, %addr, "local buildlet started");
        let in_use = self.in_use.clone();
        Ok(Lease::new(
            client,
            name,
            o.host_type.clone(),
            lost,
            move || {
                stop.cancel();
                in_use.fetch_sub(1, Ordering::SeqCst);
            },
        ))
    }
}

#[async_trait]
impl Pool for LocalPool {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn host_type(&self) -> &str {
        &self.opts.host_type
    }

    fn capacity(&self) -> usize {
        self.opts.count
    }

    fn status(&self) -> PoolStatus {
        let in_use = self.in_use.load(Ordering::SeqCst);
        let starting = self.starting.load(Ordering::SeqCst);
        PoolStatus {
            kind: "local",
            host_type: self.opts.host_type.clone(),
            capacity: self.opts.count,
            in_use: in_use.saturating_sub(starting),
            idle: 0,
            starting,
            expected: None,
        }
    }

    async fn acquire(&self, cancel: &CancellationToken) -> Result<Lease, PoolError> {
        self.in_use.fetch_add(1, Ordering::SeqCst);
        self.starting.fetch_add(1, Ordering::SeqCst);
        let result = self.start(cancel).await;
        self.starting.fetch_sub(1, Ordering::SeqCst);
        if result.is_err() {
            self.in_use.fetch_sub(1, Ordering::SeqCst);
        }
        result
    }
}
