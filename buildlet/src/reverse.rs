//! Reverse mode: the buildlet dials the coordinator (revdial), proves its identity with
//! a builder key or a host token, and serves the unauthenticated buildlet routes over
//! that tunnel; the tunnel itself was authenticated by the handshake. Also `keygen`,
//! which derives a host type's builder key from the coordinator's master key file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use buildfarm_proto::revdial::{Hello, hello};
use buildlet::server::{self, BuildletService, ServerConfig};
use revdial::{Credential, DialerConfig};
use tokio_util::sync::CancellationToken;

use super::{
    GRACE, ListenArgs, checked_cgroup, log_containment, tar_limits, url_timeouts, watch_signals,
};

/// Reverse-mode flags; `--workdir`, `--host-type` and the tar limits are shared with
/// listen mode.
#[derive(clap::Args, Debug)]
pub struct ReverseArgs {
    /// Dial the coordinator at this address (https://HOST:PORT) instead of listening.
    #[arg(long)]
    pub reverse: Option<String>,
    /// CA certificate (PEM) the coordinator's certificate must chain to.
    #[arg(long, requires = "reverse")]
    ca_file: Option<PathBuf>,
    /// File holding the hex builder key of the host type (`buildlet keygen` or
    /// `coordinator builder-key` prints it).
    #[arg(long, requires = "reverse")]
    builder_key_file: Option<PathBuf>,
    /// Id of a per-host token (instead of a builder key); needs --host-token-file.
    #[arg(long, requires = "reverse")]
    host_token_id: Option<String>,
    /// File holding the secret of the host token.
    #[arg(long, requires = "reverse")]
    host_token_file: Option<PathBuf>,
    /// Name this host announces; default the machine's hostname.
    #[arg(long, requires = "reverse")]
    hostname: Option<String>,
    /// Name to verify the coordinator's certificate against; default its host.
    #[arg(long, requires = "reverse")]
    server_name: Option<String>,
    /// HTTP/2 PING interval on the tunnel.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    keepalive_interval: Duration,
    /// An unanswered PING closes the tunnel (and we dial again) after this long.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    keepalive_timeout: Duration,
}

pub struct ReverseConfig {
    dialer: DialerConfig,
    server: ServerConfig,
}

fn read_secret(flag: &str, path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {flag} {}", path.display()))?;
    let secret = text.trim();
    if secret.is_empty() {
        bail!("{flag} {} is empty", path.display());
    }
    Ok(secret.to_owned())
}

/// Checks host type and hostname as the coordinator will, so a bad name is a usage
/// error here instead of an endless series of refused dial-ins.
fn check_identity(host_type: &str, hostname: &str) -> anyhow::Result<()> {
    let hello = Hello {
        protocol_version: revdial::handshake::PROTOCOL_VERSION,
        host_type: host_type.to_owned(),
        hostname: hostname.to_owned(),
        buildlet_version: server::VERSION.to_owned(),
        credential: Some(hello::Credential::BuilderKeyProof(vec![
            0;
            revdial::handshake::PROOF_LEN
        ])),
        data_token: Vec::new(),
    };
    revdial::handshake::validate_hello(&hello)
        .map(|_| ())
        .map_err(|r| anyhow::anyhow!("{}", r.reason))
}

/// Turns reverse-mode arguments into a config, reading the files they name.
pub fn validate(r: ReverseArgs, a: ListenArgs) -> anyhow::Result<ReverseConfig> {
    if a.listen.is_some() {
        bail!("give either --listen or --reverse, not both");
    }
    for (flag, given) in [
        ("--tls-cert", a.tls_cert.is_some()),
        ("--tls-key", a.tls_key.is_some()),
        ("--client-ca", a.client_ca.is_some()),
        ("--auth-key-file", a.auth_key_file.is_some()),
    ] {
        if given {
            bail!("{flag} is for listen mode; a reverse buildlet is reached through its tunnel");
        }
    }
    let url = r.reverse.unwrap_or_default();
    revdial::parse_coordinator(&url).context("--reverse")?;
    let mut missing = Vec::new();
    if a.workdir.is_none() {
        missing.push("--workdir");
    }
    if a.host_type.is_empty() {
        missing.push("--host-type");
    }
    if r.ca_file.is_none() {
        missing.push("--ca-file");
    }
    let (Some(workdir), Some(ca_file)) = (a.workdir.clone(), r.ca_file) else {
        bail!("missing required arguments: {}", missing.join(", "));
    };
    if !missing.is_empty() {
        bail!("missing required arguments: {}", missing.join(", "));
    }
    let credential = match (r.builder_key_file, r.host_token_id, r.host_token_file) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => bail!(
            "give either --builder-key-file or --host-token-id with --host-token-file, not both"
        ),
        (Some(p), None, None) => {
            let key = read_secret("--builder-key-file", &p)?;
            if hex::decode(&key).map(|k| k.len()) != Ok(revdial::handshake::PROOF_LEN) {
                bail!(
                    "--builder-key-file {}: not a builder key ({} hex-encoded bytes)",
                    p.display(),
                    revdial::handshake::PROOF_LEN
                );
            }
            Credential::BuilderKey(key)
        }
        (None, Some(id), Some(p)) => Credential::HostToken {
            id,
            secret: read_secret("--host-token-file", &p)?,
        },
        (None, Some(_), None) => bail!("--host-token-id needs --host-token-file"),
        (None, None, Some(_)) => bail!("--host-token-file needs --host-token-id"),
        (None, None, None) => bail!(
            "no credential: give --builder-key-file, or --host-token-id with --host-token-file"
        ),
    };
    let ca_pem = buildfarm_tls::load_ca_file(&ca_file).context("loading --ca-file")?;
    if r.keepalive_interval.is_zero() || r.keepalive_timeout.is_zero() {
        bail!("--keepalive-interval and --keepalive-timeout must be positive");
    }
    let mut server = ServerConfig::new(workdir);
    if let Some(h) = r.hostname {
        server.hostname = h;
    }
    if server.hostname.is_empty() {
        bail!("cannot tell this machine's hostname; give --hostname");
    }
    server.host_type = a.host_type.clone();
    server.tar_limits = tar_limits(&a);
    url_timeouts(&a)(&mut server);
    server.cgroup = checked_cgroup(&a)?;
    check_identity(&server.host_type, &server.hostname)?;
    let mut dialer = DialerConfig::new(
        url,
        ca_pem,
        server.host_type.clone(),
        server.hostname.clone(),
        server::VERSION,
        credential,
    );
    dialer.server_name = r.server_name;
    dialer.keepalive_interval = r.keepalive_interval;
    dialer.keepalive_timeout = r.keepalive_timeout;
    dialer.shutdown_grace = GRACE;
    Ok(ReverseConfig { dialer, server })
}

/// Dials in and serves until SIGTERM/SIGINT or Halt, then kills running commands.
pub async fn run(cfg: ReverseConfig) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let svc =
        BuildletService::new(cfg.server, shutdown.clone()).context("preparing the workdir")?;
    tracing::info!(
        coordinator = %cfg.dialer.coordinator,
        host_type = %cfg.dialer.host_type,
        hostname = %cfg.dialer.hostname,
        workdir = %svc.workdir().display(),
        "buildlet dialling the coordinator"
    );
    log_containment(&svc);
    tokio::spawn(watch_signals(shutdown.clone()));
    // Returns after shutdown, once in-flight calls finished (bounded by the grace).
    // Transfers go over data connections the coordinator asks for (raw TLS, not the
    // tunnel's HTTP/2).
    let data = buildlet::bulk::handler(std::sync::Arc::new(svc.clone()));
    let res = revdial::run_dialer_with_data(
        cfg.dialer,
        server::routes(svc.clone()),
        Some(data),
        shutdown.clone(),
    )
    .await;
    shutdown.cancel();
    res?;
    if !svc.drain(GRACE).await {
        tracing::warn!("tasks still running at exit");
    }
    tracing::info!("buildlet stopped");
    Ok(())
}

/// The builder key of `host_type` under the master key in `master_key_file` (hex).
pub fn keygen(master_key_file: &Path, host_type: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(master_key_file)
        .with_context(|| format!("reading --master-key-file {}", master_key_file.display()))?;
    let master = hex::decode(text.trim())
        .with_context(|| format!("{}: not a hex key", master_key_file.display()))?;
    // The coordinator refuses shorter master keys, so such a file is not its key.
    if master.len() < 16 {
        bail!(
            "{}: master key must be at least 16 bytes",
            master_key_file.display()
        );
    }
    check_identity(host_type, "keygen")?;
    Ok(revdial::builder_key(&master, host_type))
}
