//! Assembling a coordinator from its config: data dir, keys and certificates, store,
//! git mirrors, pools, the farm, and the tasks that run it. `main` parses arguments and
//! calls [`start`]; tests can do the same in-process.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use buildfarm_config::{Config, Pool as PoolConfig};
use revdial::tls::{self, CertificateAuthority, Identity};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::api::Api;
use crate::farm::{Farm, FarmParts};
use crate::git::Mirror;
use crate::http::{AppState, router};
use crate::pool::Pool;
use crate::pool::local::{LocalPool, LocalPoolOptions};
use crate::pool::reverse::ReversePool;
use crate::server::{Endpoint, serve};

/// Settings that are not part of the config file.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// The `buildlet` binary the local pool runs; default: next to this executable.
    pub buildlet_bin: Option<PathBuf>,
}

/// A started coordinator.
pub struct Running {
    pub addr: SocketAddr,
    pub farm: Arc<Farm>,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    /// The CA that signed the coordinator's certificate (clients trust it).
    pub ca_pem: String,
    pub ca_file: PathBuf,
}

impl Running {
    /// Stops accepting, lets running work be recorded as resumable, and waits (bounded).
    pub async fn stop(self, grace: Duration) {
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            warn!("some tasks did not stop within the grace period");
        }
    }
}

/// Reads or creates the master key (32 random bytes, hex) with mode 0600.
pub fn master_key(path: &Path) -> Result<Vec<u8>> {
    if path.exists() {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let key = hex::decode(text.trim())
            .with_context(|| format!("{}: not a hex key", path.display()))?;
        if key.len() < 16 {
            bail!("{}: master key must be at least 16 bytes", path.display());
        }
        return Ok(key);
    }
    let key: [u8; 32] = rand::random();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    tls::write_private(path, hex::encode(key).as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    info!(path = %path.display(), "generated a new master key");
    Ok(key.to_vec())
}

/// The coordinator's CA under `dir`, created on first start.
pub fn load_or_create_ca(dir: &Path) -> Result<CertificateAuthority> {
    let (cert, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    if cert.exists() && key.exists() {
        let id = Identity::from_files(&cert, &key)?;
        return Ok(CertificateAuthority::from_pem(&id.cert_pem, &id.key_pem)?);
    }
    let ca = CertificateAuthority::generate("buildfarm coordinator CA")?;
    ca.identity().write_files(dir, "ca")?;
    Ok(ca)
}

fn load_or_issue(
    dir: &Path,
    stem: &str,
    issue: impl FnOnce() -> Result<Identity>,
) -> Result<(Identity, PathBuf, PathBuf)> {
    let (cert, key) = (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    );
    if cert.exists() && key.exists() {
        return Ok((Identity::from_files(&cert, &key)?, cert, key));
    }
    let id = issue()?;
    let (c, k) = id.write_files(dir, stem)?;
    Ok((id, c, k))
}

fn default_buildlet_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("BUILDFARM_BUILDLET") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("finding this executable")?;
    let dir = exe.parent().context("executable has no directory")?;
    // Test binaries live one level down, in target/debug/deps.
    for candidate in [dir.join("buildlet"), dir.join("../buildlet")] {
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    bail!(
        "the buildlet binary was not found next to {} (build it with `cargo build --bins`, or set BUILDFARM_BUILDLET)",
        exe.display()
    )
}

/// Starts a coordinator on `listener` with `config`.
pub async fn start(config: Config, listener: TcpListener, opts: StartOptions) -> Result<Running> {
    let data_dir = config.coordinator.data_dir.clone();
    let config_connections = config.connections.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    let data_dir = data_dir.canonicalize()?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();

    let master_key = master_key(&config.coordinator.master_key_path())?;
    let tls_dir = data_dir.join("tls");
    let ca = load_or_create_ca(&tls_dir)?;
    let ca_file = tls_dir.join("ca.crt");
    let ca_pem = ca.cert_pem().to_owned();
    let server_identity = match (&config.coordinator.tls_cert, &config.coordinator.tls_key) {
        (Some(c), Some(k)) => Identity::from_files(c, k)?,
        _ => {
            let ip = addr.ip().to_string();
            load_or_issue(&tls_dir, "coordinator", || {
                Ok(ca.issue_server(&["localhost", "127.0.0.1", &ip])?)
            })?
            .0
        }
    };
    let server_tls = tls::server_config(
        &server_identity,
        None,
        &[tls::ALPN_REVDIAL, tls::ALPN_H2, tls::ALPN_HTTP1],
    )?;

    let store = buildfarm_store::open(&config.coordinator.store_url())
        .await
        .with_context(|| format!("opening store {}", config.coordinator.store_url()))?;

    let mut mirrors = HashMap::new();
    for repo in &config.repos {
        let m = Mirror::open(&repo.name, &repo.url, &data_dir)
            .await
            .with_context(|| format!("repo {}", repo.name))?;
        mirrors.insert(repo.name.clone(), m);
    }

    let revdial_listener = revdial::Listener::new(
        revdial::Authenticator::new(master_key.clone()),
        revdial::ListenerConfig::default(),
    );
    let registry = revdial_listener.registry();

    let mut pools: HashMap<String, Arc<dyn Pool>> = HashMap::new();
    let mut local_parts = None;
    for ht in &config.host_types {
        match &ht.pool {
            PoolConfig::Local(l) => {
                let (bin, server_cert, server_key, client) = match &local_parts {
                    Some(p) => Clone::clone(p),
                    None => {
                        let bin = match &opts.buildlet_bin {
                            Some(b) => b.clone(),
                            None => default_buildlet_bin()?,
                        };
                        let (_, sc, sk) = load_or_issue(&tls_dir, "local-buildlet", || {
                            Ok(ca.issue_server(&["localhost", "127.0.0.1"])?)
                        })?;
                        let (client, _, _) = load_or_issue(&tls_dir, "coordinator-client", || {
                            Ok(ca.issue_client("coordinator")?)
                        })?;
                        let parts = (bin, sc, sk, client);
                        local_parts = Some(parts.clone());
                        parts
                    }
                };
                let pool = LocalPool::new(
                    LocalPoolOptions {
                        host_type: ht.name.clone(),
                        count: l.count as usize,
                        buildlet_bin: bin,
                        root: data_dir.join("buildlets"),
                        server_cert,
                        server_key,
                        ca_file: ca_file.clone(),
                        ca_pem: ca_pem.clone(),
                        client_identity: client,
                        start_timeout: Duration::from_secs(30),
                    },
                    tasks.clone(),
                );
                pools.insert(ht.name.clone(), Arc::new(pool));
            }
            PoolConfig::Reverse(r) => {
                pools.insert(
                    ht.name.clone(),
                    Arc::new(ReversePool::new(
                        ht.name.clone(),
                        r.expected as usize,
                        registry.clone(),
                    )),
                );
            }
            other => {
                warn!(host_type = %ht.name, kind = other.kind(), "pool kind not available in this build; its builders will wait");
            }
        }
    }

    let farm = Farm::new(FarmParts {
        config,
        store,
        pools,
        mirrors,
        revdial_registry: Some(registry),
        master_key,
        data_dir: data_dir.clone(),
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
    });
    *farm.base_url.lock().unwrap_or_else(|e| e.into_inner()) = format!("http://{addr}");
    farm.resume().await?;

    let api = Api::new(farm.clone());
    let poll_kick = Arc::new(Notify::new());
    let state = AppState {
        farm: farm.clone(),
        api,
        poll_kick: poll_kick.clone(),
        web: crate::http::WebState::start(&farm, Some(revdial_listener.clone()))?,
    };
    // Before the connection cap is derived from it: every descriptor the hard limit
    // allows, less a reserve for our own files.
    match revdial::accept::raise_nofile_limit() {
        Ok(nofile) => info!(nofile, "open-file limit"),
        Err(error) => warn!(%error, "cannot raise the open-file limit"),
    }
    let limits = crate::server::conn_limits(&config_connections);
    info!(
        max_connections = limits.max_connections,
        max_handshakes = limits.max_handshakes,
        "connection limits"
    );
    let endpoint = Endpoint {
        router: router(state),
        tls: server_tls,
        revdial: revdial_listener.clone(),
        allow_plaintext: addr.ip().is_loopback(),
        limits,
    };
    tasks.spawn(farm.clone().dispatch_loop());
    tasks.spawn(crate::poller::poll_loop(farm.clone(), poll_kick));
    tasks.spawn(serve(listener, endpoint, shutdown.clone(), tasks.clone()));
    {
        let (shutdown, revdial_listener) = (shutdown.clone(), revdial_listener.clone());
        tasks.spawn(async move {
            shutdown.cancelled().await;
            revdial_listener.shutdown().await;
        });
    }
    info!(%addr, data_dir = %data_dir.display(), "coordinator started");
    Ok(Running {
        addr,
        farm,
        shutdown,
        tasks,
        ca_pem,
        ca_file,
    })
}
