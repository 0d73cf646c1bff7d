//! The local pool: spawns `buildlet` processes on the coordinator's machine, one per
//! lease, each with its own workdir, talking mutual TLS on loopback with certificates
//! from the coordinator's CA. A released buildlet is killed and its workdir removed.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use buildlet::client::{BuildletClient, ConnectOptions};
use revdial::tls::Identity;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::{Lease, Pool, PoolError, PoolStatus};

/// How long a released buildlet has to stop (and kill its commands) before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Everything a local pool needs to start buildlets.
#[derive(Clone)]
pub struct LocalPoolOptions {
    pub host_type: String,
    pub count: usize,
    pub buildlet_bin: PathBuf,
    /// Workdirs and buildlet logs go under here.
    pub root: PathBuf,
    /// The buildlets' server certificate and key, and the CA clients must chain to.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub ca_file: PathBuf,
    pub ca_pem: String,
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

    async fn start(&self, cancel: &CancellationToken) -> Result<Lease, PoolError> {
        let o = &self.opts;
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let name = format!("local/{}#{n}", o.host_type);
        let slug = format!("{}-{n}-{}", o.host_type, uuid::Uuid::new_v4().simple());
        let workdir = o.root.join(&slug);
        let start_err = |message: String| PoolError::Start {
            host_type: o.host_type.clone(),
            message,
        };
        tokio::fs::create_dir_all(&o.root)
            .await
            .map_err(|e| start_err(format!("creating {}: {e}", o.root.display())))?;
        let stderr_path = o.root.join(format!("{slug}.log"));
        let stderr = std::fs::File::create(&stderr_path)
            .map_err(|e| start_err(format!("creating {}: {e}", stderr_path.display())))?;

        let mut cmd = Command::new(&o.buildlet_bin);
        // SAFETY: the closure runs in the forked child before exec and only calls
        // prctl(2), which is async-signal-safe. A buildlet must not outlive a
        // coordinator that crashed (kill_on_drop only covers orderly exits).
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--workdir")
            .arg(&workdir)
            .arg("--tls-cert")
            .arg(&o.server_cert)
            .arg("--tls-key")
            .arg(&o.server_key)
            .arg("--client-ca")
            .arg(&o.ca_file)
            .arg("--host-type")
            .arg(&o.host_type)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                start_err(format!(
                    "running {} (build it with `cargo build`): {e}",
                    o.buildlet_bin.display()
                ))
            })?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| start_err("no stdout pipe".into()))?;
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::select! {
            _ = cancel.cancelled() => return Err(PoolError::Cancelled),
            r = tokio::time::timeout(o.start_timeout, lines.next_line()) => match r {
                Err(_) => return Err(start_err(format!("no listening line within {:?}; see {}", o.start_timeout, stderr_path.display()))),
                Ok(Err(e)) => return Err(start_err(format!("reading buildlet stdout: {e}"))),
                Ok(Ok(None)) => return Err(start_err(format!("buildlet exited at start; see {}", stderr_path.display()))),
                Ok(Ok(Some(line))) => line
                    .strip_prefix("buildlet listening on ")
                    .map(str::to_owned)
                    .ok_or_else(|| start_err(format!("unexpected first line {line:?}")))?,
            }
        };
        let mut connect = ConnectOptions::new(addr.clone(), o.ca_pem.clone());
        connect.client_identity = Some(o.client_identity.clone());
        let client = BuildletClient::connect(connect)
            .await
            .map_err(|e| start_err(format!("connecting to {addr}: {e}")))?;

        let lost = CancellationToken::new();
        let stop = CancellationToken::new();
        {
            let (lost, stop, name) = (lost.clone(), stop.clone(), name.clone());
            let (workdir, log) = (workdir.clone(), stderr_path.clone());
            self.tasks.spawn(async move {
                // Drain stdout so the buildlet never blocks writing to it.
                let drain = async { while let Ok(Some(_)) = lines.next_line().await {} };
                tokio::select! {
                    status = child.wait() => {
                        warn!(buildlet = %name, ?status, "local buildlet exited");
                        lost.cancel();
                    }
                    _ = stop.cancelled() => {
                        // SIGTERM first: the buildlet then kills its commands' process
                        // groups itself. SIGKILL only if it does not exit in time.
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
                let _ = tokio::fs::remove_dir_all(&workdir).await;
                let staging = PathBuf::from(format!("{}.staging", workdir.display()));
                let _ = tokio::fs::remove_dir_all(&staging).await;
                let _ = tokio::fs::remove_file(&log).await;
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
