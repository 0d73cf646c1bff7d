//! Assembling a coordinator from its config: data dir, keys and certificates, store,
//! git mirrors, pools, the farm, and the tasks that run it. `main` parses arguments and
//! calls [`start`]; tests can do the same in-process.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use buildfarm_config::{Config, Pool as PoolConfig};
use buildfarm_tls::{self as tls, CertificateAuthority, Identity};
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
use crate::pool::sandbox::{Sandbox, SandboxOptions, force_remove};
use crate::server::{Endpoint, serve};

/// Settings that are not part of the config file.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// The `buildlet` binary the local pool runs; default: next to this executable.
    pub buildlet_bin: Option<PathBuf>,
    /// The config file the coordinator was started with: it may hold secrets (webhook
    /// secrets, a database password), so sandboxed buildlets see an empty file there.
    pub config_file: Option<PathBuf>,
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
    /// The local buildlets' sandbox, when there is a local pool.
    pub sandbox: Option<Arc<Sandbox>>,
    /// Roles, user tokens, rate limits.
    pub access: Arc<crate::access::Access>,
    /// Where reverse buildlets dial in; its credentials change on [`Running::reload_dialin`].
    pub revdial: revdial::Listener,
}

impl Running {
    /// Re-reads the dial-in credentials of `access` (builder-key secrets and host
    /// tokens) for new handshakes; connected buildlets stay connected.
    pub fn reload_dialin(&self, access: &buildfarm_config::AccessConfig) -> Result<()> {
        let auth = crate::access::dialin::authenticator(access, self.farm.master_key())?;
        self.revdial.set_authenticator(auth);
        info!(
            builder_keys = access.builder_keys.len(),
            host_tokens = access.host_tokens.len(),
            "dial-in credentials reloaded"
        );
        Ok(())
    }

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
        if let Some(sandbox) = &self.sandbox {
            sandbox.remove_root_if_idle();
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

/// Buildlet stderr logs, under the data dir: the operator reads them, builds cannot.
const BUILDLET_LOGS: &str = "buildlet-logs";

/// A digest of the canonical data dir, from which per-farm defaults are derived.
fn data_dir_hash(data_dir: &Path) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data_dir.as_os_str().as_encoded_bytes()).into()
}

/// The default workdir root: `<temp dir>/buildfarm-<hash of the data dir>`.
pub fn default_workdir_root(data_dir: &Path) -> PathBuf {
    let h = data_dir_hash(data_dir);
    std::env::temp_dir().join(format!("buildfarm-{}", hex::encode(&h[..6])))
}

/// The default first sandbox uid: 1,500,000 plus 1024 × a number below 2^20 taken from
/// the data dir, so farms on one machine (tests, too) almost never share a uid range.
pub fn default_uid_base(data_dir: &Path) -> u32 {
    let h = data_dir_hash(data_dir);
    let bucket = u32::from_be_bytes([0, h[0] & 0x0f, h[1], h[2]]);
    1_500_000 + 1024 * bucket
}

/// Resolves the `[sandbox]` settings and prepares the sandbox, when there is a local pool.
async fn prepare_sandbox(
    config: &Config,
    data_dir: &Path,
    opts: &StartOptions,
) -> Result<Option<Arc<Sandbox>>> {
    let slots: usize = config
        .host_types
        .iter()
        .map(|h| match &h.pool {
            PoolConfig::Local(l) => l.count as usize,
            _ => 0,
        })
        .sum();
    if slots == 0 {
        return Ok(None);
    }
    let s = &config.sandbox;
    let buildlet_bin = match &opts.buildlet_bin {
        Some(b) => b.clone(),
        None => default_buildlet_bin()?,
    };
    let buildlet_bin = buildlet_bin
        .canonicalize()
        .with_context(|| format!("the buildlet binary {}", buildlet_bin.display()))?;
    let workdir_root = s
        .workdir_root
        .clone()
        .unwrap_or_else(|| default_workdir_root(data_dir));
    // Checked before start-up cleanup empties the root.
    let root = workdir_root
        .canonicalize()
        .unwrap_or_else(|_| std::path::absolute(&workdir_root).unwrap_or(workdir_root.clone()));
    let mut writable_paths = Vec::new();
    for p in &s.writable_paths {
        let c = p
            .canonicalize()
            .with_context(|| format!("[sandbox] writable_paths: {}", p.display()))?;
        for (what, dir) in [("data dir", data_dir), ("workdir root", root.as_path())] {
            if c.starts_with(dir) || dir.starts_with(&c) {
                bail!(
                    "[sandbox] writable_paths: {} must be outside the {what} {} and not contain it",
                    c.display(),
                    dir.display()
                );
            }
        }
        writable_paths.push(c);
    }
    let sandbox = Sandbox::prepare(SandboxOptions {
        mode: s.mode,
        data_dir: data_dir.to_owned(),
        workdir_root,
        uid_base: s.uid_base.unwrap_or_else(|| default_uid_base(data_dir)),
        slots,
        writable_paths,
        secret_files: secret_files(config, data_dir)
            .into_iter()
            .chain(
                opts.config_file
                    .iter()
                    .filter_map(|f| f.canonicalize().ok()),
            )
            .collect(),
        buildlet_bin,
    })
    .await?;
    // Where workdirs were kept before they moved out of the data dir.
    let legacy = data_dir.join("buildlets");
    if legacy.exists() {
        info!(dir = %legacy.display(), "removing local buildlet workdirs left in the data dir by an older version");
        force_remove(&legacy).with_context(|| format!("removing {}", legacy.display()))?;
    }
    // Logs of a previous run's buildlets: their workdirs are gone, so are they.
    let logs = data_dir.join(BUILDLET_LOGS);
    if let Ok(rd) = std::fs::read_dir(&logs) {
        let stale = rd.flatten().count();
        if stale > 0 {
            info!(dir = %logs.display(), files = stale, "removing a previous run's buildlet logs");
            force_remove(&logs).with_context(|| format!("removing {}", logs.display()))?;
        }
    }
    Ok(Some(sandbox))
}

/// Files only the coordinator may read: master key, private keys, the SQLite database.
fn secret_files(config: &Config, data_dir: &Path) -> Vec<PathBuf> {
    let mut files = vec![config.coordinator.master_key_path()];
    if let Some(k) = &config.coordinator.tls_key {
        files.push(k.clone());
    }
    if let Ok(rd) = std::fs::read_dir(data_dir.join("tls")) {
        files.extend(
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "key")),
        );
    }
    let url = config.coordinator.store_url();
    if let Some(rest) = url
        .strip_prefix("sqlite://")
        .or(url.strip_prefix("sqlite:"))
    {
        let db = PathBuf::from(rest.split('?').next().unwrap_or(rest));
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let mut p = db.clone().into_os_string();
            p.push(suffix);
            files.push(PathBuf::from(p));
        }
    }
    files
        .into_iter()
        .map(|f| f.canonicalize().unwrap_or(f))
        .collect()
}

/// Makes the data dir (and its `tls/`) 0700 and each existing secret file 0600, logging
/// each change: a data dir made by an older version, or by hand, may be open to others.
fn tighten_modes(data_dir: &Path, secret_files: &[PathBuf]) {
    use std::os::unix::fs::PermissionsExt;
    let tighten = |path: &Path, mode: u32| {
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        let old = meta.permissions().mode() & 0o7777;
        if old & 0o077 == 0 {
            return;
        }
        match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
            Ok(()) => info!(
                path = %path.display(),
                old_mode = format!("{old:o}"),
                new_mode = format!("{mode:o}"),
                "made a secret readable only by the coordinator"
            ),
            Err(error) => warn!(
                path = %path.display(),
                old_mode = format!("{old:o}"),
                %error,
                "cannot restrict the mode of a secret; other users may read it"
            ),
        }
    };
    tighten(data_dir, 0o700);
    tighten(&data_dir.join("tls"), 0o700);
    for f in secret_files {
        tighten(f, 0o600);
    }
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

/// The buildlet binaries served to machines that fetch themselves: the one local
/// buildlets run (when it can be found) for this machine's platform, and the
/// `[coordinator] buildlet_binaries` directory.
fn buildlet_binaries(
    opts: &StartOptions,
    dir: Option<PathBuf>,
) -> crate::pool::bootstrap::BuildletBinaries {
    let local = match &opts.buildlet_bin {
        Some(b) => Some(b.clone()),
        None => match default_buildlet_bin() {
            Ok(b) => Some(b),
            Err(error) => {
                info!(%error, "no local buildlet binary to serve at /buildlet/");
                None
            }
        },
    };
    crate::pool::bootstrap::BuildletBinaries::new(local, dir)
}

/// Starts a coordinator on `listener` with `config`.
pub async fn start(config: Config, listener: TcpListener, opts: StartOptions) -> Result<Running> {
    let data_dir = config.coordinator.data_dir.clone();
    let config_connections = config.connections.clone();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    let data_dir = data_dir.canonicalize()?;
    tighten_modes(&data_dir, &secret_files(&config, &data_dir));
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();

    let master_key = master_key(&config.coordinator.master_key_path())?;
    let tls_dir = data_dir.join("tls");
    let ca = Arc::new(load_or_create_ca(&tls_dir)?);
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
        &[
            tls::ALPN_REVDIAL,
            tls::ALPN_BULK,
            tls::ALPN_H2,
            tls::ALPN_HTTP1,
        ],
    )?;

    // Before anything else is started: a sandbox that cannot work is a start-up error.
    let sandbox = prepare_sandbox(&config, &data_dir, &opts).await?;

    let store = buildfarm_store::open(&config.coordinator.store_url())
        .await
        .with_context(|| format!("opening store {}", config.coordinator.store_url()))?;
    // The store may have just created the database (and its WAL files) with the umask's
    // mode; keys were made since the first pass too.
    tighten_modes(&data_dir, &secret_files(&config, &data_dir));

    let mut mirrors = HashMap::new();
    for repo in &config.repos {
        let m = Mirror::open(&repo.name, &repo.url, &data_dir)
            .await
            .with_context(|| format!("repo {}", repo.name))?;
        mirrors.insert(repo.name.clone(), m);
    }

    let revdial_listener = revdial::Listener::new(
        crate::access::dialin::authenticator(&config.access, &master_key)?,
        revdial::ListenerConfig::default(),
    );
    let access = crate::access::Access::new(&config.access, store.clone()).await?;
    let registry = revdial_listener.registry();

    let binaries = Arc::new(buildlet_binaries(
        &opts,
        config.coordinator.buildlet_binaries.clone(),
    ));
    let mut pools: HashMap<String, Arc<dyn Pool>> = HashMap::new();
    let local_parts = match sandbox.clone() {
        Some(sandbox) => {
            let (client, _, _) = load_or_issue(&tls_dir, "coordinator-client", || {
                Ok(ca.issue_client("coordinator")?)
            })?;
            Some((sandbox, ca.clone(), client))
        }
        None => None,
    };
    let cloud = crate::pool::cloud::CloudParts {
        ca: ca.clone(),
        ca_pem: ca_pem.clone(),
        trust_pem: match &config.coordinator.tls_cert {
            // Machines fetch from the coordinator's port: trust its configured chain.
            Some(c) => format!(
                "{ca_pem}\n{}",
                std::fs::read_to_string(c).with_context(|| format!("reading {}", c.display()))?
            ),
            None => ca_pem.clone(),
        },
        binaries: binaries.clone(),
        owner: crate::pool::reconcile::default_owner(&master_key),
        listen_port: addr.port(),
        tasks: tasks.clone(),
        shutdown: shutdown.clone(),
    };
    for ht in &config.host_types {
        match &ht.pool {
            PoolConfig::Local(l) => {
                let Some((sandbox, ca, client)) = &local_parts else {
                    bail!("local pool {} without a sandbox", ht.name);
                };
                let pool = LocalPool::new(
                    LocalPoolOptions {
                        host_type: ht.name.clone(),
                        count: l.count as usize,
                        sandbox: sandbox.clone(),
                        ca: ca.clone(),
                        ca_pem: ca_pem.clone(),
                        log_dir: data_dir.join(BUILDLET_LOGS),
                        client_identity: client.clone(),
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
            PoolConfig::Kube(k) => {
                let pool = cloud.kube_pool(&ht.name, k).await?;
                pools.insert(ht.name.clone(), pool);
            }
            PoolConfig::Ec2(e) => {
                let pool = cloud.ec2_pool(&ht.name, e).await;
                pools.insert(ht.name.clone(), pool);
            }
            PoolConfig::Docker(d) => {
                let coordinator_ca_pem = match &config.coordinator.tls_cert {
                    // Containers trust the chain of an operator's certificate as well.
                    Some(c) => format!(
                        "{ca_pem}\n{}",
                        std::fs::read_to_string(c)
                            .with_context(|| format!("reading {}", c.display()))?
                    ),
                    None => ca_pem.clone(),
                };
                let opts = crate::pool::docker::options(
                    d,
                    &ht.name,
                    &data_dir,
                    addr,
                    ca.clone(),
                    coordinator_ca_pem,
                    binaries.clone(),
                    shutdown.clone(),
                );
                pools.insert(
                    ht.name.clone(),
                    crate::pool::docker::DockerPool::new(opts, tasks.clone()),
                );
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
        tuning: crate::farm::Tuning::default(),
    });
    farm.set_base_url(format!("http://{addr}"));
    farm.resume().await?;

    let api = Api::new(farm.clone(), access.clone());
    tasks.spawn(access.clone().refresh_loop(shutdown.clone()));
    let poll_kick = Arc::new(Notify::new());
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
    let acceptor = revdial::accept::Acceptor::new(limits);
    let web_parts = crate::http::WebParts {
        revdial: Some(revdial_listener.clone()),
        acceptor: Some(acceptor.clone()),
        unsandboxed: sandbox
            .as_ref()
            .and_then(|s| s.unsandboxed_reason())
            .map(str::to_owned),
        binaries: Some(binaries.clone()),
    };
    let web = crate::http::WebState::start(&farm, web_parts)?;
    web.metrics.register(access.denied_counter())?;
    let state = AppState {
        farm: farm.clone(),
        api,
        poll_kick: poll_kick.clone(),
        web,
    };
    let endpoint = Endpoint {
        api: state.api.clone(),
        router: router(state),
        tls: server_tls,
        revdial: revdial_listener.clone(),
        allow_plaintext: addr.ip().is_loopback(),
        acceptor,
    };
    farm.start();
    crate::notifications::Notifier::start(
        &farm,
        crate::retry::Backoff {
            first: Duration::from_secs(1),
            max: Duration::from_secs(300),
        },
    )?;
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
        sandbox,
        access,
        revdial: revdial_listener,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_farm_defaults_are_stable_distinct_and_in_range() {
        let a = Path::new("/var/lib/buildfarm");
        let b = Path::new("/srv/other-farm");
        assert_eq!(default_uid_base(a), default_uid_base(a));
        assert_ne!(default_uid_base(a), default_uid_base(b));
        for p in [a, b] {
            let base = default_uid_base(p);
            assert!((1_500_000..1_500_000 + 1024 * (1 << 20)).contains(&base));
            assert_eq!((base - 1_500_000) % 1024, 0);
            let root = default_workdir_root(p);
            assert!(root.starts_with(std::env::temp_dir()) && !root.starts_with(p));
        }
        assert_ne!(default_workdir_root(a), default_workdir_root(b));
    }
}
