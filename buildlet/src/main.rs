//! The `buildlet` binary.
//!
//! - Listen mode: `buildlet --listen ADDR --workdir DIR --tls-cert F --tls-key F
//!   [--client-ca F] [--auth-key-file F]` serves the buildlet service over TLS.
//! - Reverse mode: `buildlet --reverse https://HOST:PORT --host-type H --workdir DIR
//!   --ca-file F (--builder-key-file F | --host-token-id ID --host-token-file F)` dials
//!   the coordinator and serves the same service over the tunnel (see `reverse.rs`).
//! - Both modes take `--cgroup DIR|auto|none` (default auto): where each command's
//!   process tree is contained (see `buildlet::contain`).
//! - `buildlet keygen --master-key-file F --host-type H` prints a builder key;
//!   `buildlet version` prints the version.
//!
//! Order (thin main): tracing to stderr, crypto provider, parse and validate (bad
//! arguments: message on stderr, exit 64), bind (listen mode: print exactly one line
//! `buildlet listening on <addr>` to stdout) or dial, serve until SIGTERM/SIGINT or
//! Halt, kill running commands, exit 0.
//!
//! The workdir is created if missing; tarballs are staged in `<workdir>.staging`,
//! beside it (same filesystem, so moving into place is a rename).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use buildlet::auth::AuthPolicy;
use buildlet::contain::CgroupChoice;
use buildlet::server::{self, BuildletService, ServerConfig};
use buildlet::tarball::Limits;
use bytesize::ByteSize;
use clap::{Parser, Subcommand};
use revdial::accept::{ConnLimits, MIN_HEADER_BYTES};
use tokio_util::sync::CancellationToken;

mod reverse;

/// Exit code for bad command-line arguments (EX_USAGE).
const EXIT_USAGE: u8 = 64;
/// How long running calls get to finish after shutdown starts.
const GRACE: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
#[command(
    name = "buildlet",
    about = "runs build steps for the buildfarm coordinator"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    listen: ListenArgs,
    #[command(flatten)]
    reverse: reverse::ReverseArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the version and exit.
    Version,
    /// Print the builder key of a host type, derived from the coordinator's master key.
    Keygen {
        /// The coordinator's master key file (hex, as the coordinator writes it).
        #[arg(long)]
        master_key_file: PathBuf,
        /// Host type the key is for.
        #[arg(long)]
        host_type: String,
    },
}

#[derive(clap::Args, Debug)]
struct ListenArgs {
    /// Address to serve on, e.g. 0.0.0.0:443 or 127.0.0.1:0.
    #[arg(long)]
    listen: Option<String>,
    /// Directory every call works in (created if missing).
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Server certificate chain (PEM).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// CA (PEM) whose client certificates are accepted (mTLS).
    #[arg(long)]
    client_ca: Option<PathBuf>,
    /// File holding the bearer key callers may present instead of a certificate.
    #[arg(long)]
    auth_key_file: Option<PathBuf>,
    /// Host type reported by Status (required in reverse mode).
    #[arg(long, default_value = "")]
    host_type: String,
    /// Largest uncompressed tarball accepted.
    #[arg(long, default_value = "4GiB")]
    max_tar_bytes: ByteSize,
    /// Most entries a tarball may have.
    #[arg(long, default_value_t = 1_000_000)]
    max_tar_entries: u64,
    /// PutTarFromUrl: longest wait to connect to the URL's server.
    #[arg(long, default_value = "30s")]
    url_connect_timeout: humantime::Duration,
    /// PutTarFromUrl: longest wait for the response, and then for each piece of the body.
    #[arg(long, default_value = "60s")]
    url_read_timeout: humantime::Duration,
    /// PutTarFromUrl: longest time for the whole download.
    #[arg(long, default_value = "30m")]
    url_fetch_timeout: humantime::Duration,
    /// Where each command's process tree is contained: a cgroup directory (v1 or v2) the
    /// buildlet may make children in, `auto` (its own cgroup, if it can make children
    /// there) or `none` (child subreaper and an environment marker only).
    #[arg(long, default_value = "auto")]
    cgroup: CgroupChoice,
    #[command(flatten)]
    conn: ConnArgs,
}

/// Time limits and caps on listen-mode connections; defaults as the coordinator's
/// `[connections]` table.
#[derive(clap::Args, Debug)]
struct ConnArgs {
    /// Time from accept to a finished TLS handshake.
    #[arg(long, default_value = "10s")]
    handshake_timeout: humantime::Duration,
    /// A connection with no call in flight this long is closed (open calls, however
    /// long, are not cut).
    #[arg(long, default_value = "60s")]
    idle_timeout: humantime::Duration,
    /// Interval of HTTP/2 PINGs on listen-mode connections; an unanswered PING closes
    /// the connection after the same time again. (`--keepalive-interval` is the
    /// reverse tunnel's.)
    #[arg(long, default_value = "20s")]
    listen_keepalive_interval: humantime::Duration,
    /// Most connections open at once; default: the open-file limit (raised to its
    /// hard limit at start) minus a reserve. At the cap the oldest connection with no
    /// call in flight is closed to make room.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Most TLS handshakes in progress; at the cap the oldest is closed.
    #[arg(long, default_value_t = 1024)]
    max_handshakes: usize,
    /// Largest request header block (HTTP/2 header list) accepted.
    #[arg(long, default_value = "64KiB")]
    max_header_bytes: ByteSize,
}

impl ConnArgs {
    /// The acceptor's limits; checks them (bad values are bad usage).
    fn limits(&self) -> anyhow::Result<ConnLimits> {
        let mut bad = Vec::new();
        for (flag, d) in [
            ("--handshake-timeout", *self.handshake_timeout),
            ("--idle-timeout", *self.idle_timeout),
            (
                "--listen-keepalive-interval",
                *self.listen_keepalive_interval,
            ),
        ] {
            if d.is_zero() {
                bad.push(format!("{flag} must be longer than 0s"));
            }
        }
        if self.max_connections == Some(0) {
            bad.push("--max-connections must be at least 1".to_owned());
        }
        if self.max_handshakes == 0 {
            bad.push("--max-handshakes must be at least 1".to_owned());
        }
        let header = self.max_header_bytes.as_u64();
        let (min, max) = (MIN_HEADER_BYTES as u64, 16 << 20);
        if !(min..=max).contains(&header) {
            bad.push(format!(
                "--max-header-bytes must be between {} and {}",
                ByteSize::b(min),
                ByteSize::b(max)
            ));
        }
        if !bad.is_empty() {
            bail!("{}", bad.join("; "));
        }
        let defaults = ConnLimits::default();
        Ok(ConnLimits {
            handshake_timeout: *self.handshake_timeout,
            // Listen mode speaks HTTP/2 only; kept equal for completeness.
            header_read_timeout: *self.handshake_timeout,
            idle_timeout: *self.idle_timeout,
            keepalive_interval: *self.listen_keepalive_interval,
            keepalive_timeout: *self.listen_keepalive_interval,
            max_connections: self.max_connections.unwrap_or(defaults.max_connections),
            max_handshakes: self.max_handshakes,
            max_header_bytes: usize::try_from(header).unwrap_or(defaults.max_header_bytes),
        })
    }
}

/// What the process does.
enum Mode {
    Version,
    /// Print this (a builder key) and exit.
    Print(String),
    Listen(Box<ListenConfig>),
    Reverse(Box<reverse::ReverseConfig>),
}

struct ListenConfig {
    listen: String,
    server: ServerConfig,
    identity: buildfarm_tls::Identity,
    client_ca: Option<String>,
    policy: AuthPolicy,
    conn: ConnArgs,
}

/// Turns arguments into a mode, reading the files they name; binds nothing.
fn validate(cli: Cli) -> anyhow::Result<Mode> {
    match cli.command {
        Some(Command::Version) => return Ok(Mode::Version),
        Some(Command::Keygen {
            master_key_file,
            host_type,
        }) => return reverse::keygen(&master_key_file, &host_type).map(Mode::Print),
        None => {}
    }
    let a = cli.listen;
    if cli.reverse.reverse.is_some() {
        return reverse::validate(cli.reverse, a).map(|c| Mode::Reverse(Box::new(c)));
    }
    let mut missing = Vec::new();
    if a.listen.is_none() {
        missing.push("--listen (or --reverse)");
    }
    if a.workdir.is_none() {
        missing.push("--workdir");
    }
    if a.tls_cert.is_none() {
        missing.push("--tls-cert");
    }
    if a.tls_key.is_none() {
        missing.push("--tls-key");
    }
    let limits = tar_limits(&a);
    let set_url_timeouts = url_timeouts(&a);
    let cgroup = checked_cgroup(&a)?;
    a.conn.limits()?;
    let (Some(listen), Some(workdir), Some(cert), Some(key)) =
        (a.listen, a.workdir, a.tls_cert, a.tls_key)
    else {
        bail!("missing required arguments: {}", missing.join(", "));
    };
    let identity = buildfarm_tls::Identity::from_files(&cert, &key)
        .context("loading the tls certificate and key")?;
    let client_ca = match &a.client_ca {
        Some(p) => Some(buildfarm_tls::load_ca_file(p).context("loading --client-ca")?),
        None => None,
    };
    let key_from_env = std::env::var("BUILDLET_AUTH_KEY").ok();
    let bearer = match (&a.auth_key_file, key_from_env) {
        (Some(p), _) => {
            let k = std::fs::read_to_string(p)
                .with_context(|| format!("reading --auth-key-file {}", p.display()))?;
            Some(k.trim().to_owned())
        }
        (None, Some(k)) => Some(k.trim().to_owned()),
        (None, None) => None,
    };
    if bearer.as_deref() == Some("") {
        bail!("the auth key is empty");
    }
    if bearer.is_none() && client_ca.is_none() {
        bail!(
            "refusing to serve unauthenticated: give --client-ca, --auth-key-file or BUILDLET_AUTH_KEY"
        );
    }
    let mut server = ServerConfig::new(workdir);
    server.tar_limits = limits;
    set_url_timeouts(&mut server);
    server.host_type = a.host_type;
    server.cgroup = cgroup;
    // Make sure the config is usable before binding.
    let _ =
        buildfarm_tls::server_config(&identity, client_ca.as_deref(), &[buildfarm_tls::ALPN_H2])
            .context("building the tls config")?;
    Ok(Mode::Listen(Box::new(ListenConfig {
        listen,
        server,
        identity,
        client_ca,
        policy: AuthPolicy::new(bearer.as_deref()),
        conn: a.conn,
    })))
}

/// Sets the PutTarFromUrl bounds from the command line.
fn url_timeouts(a: &ListenArgs) -> impl FnOnce(&mut ServerConfig) + use<> {
    let (connect, read, whole) = (
        a.url_connect_timeout.into(),
        a.url_read_timeout.into(),
        a.url_fetch_timeout.into(),
    );
    move |server| {
        server.url_connect_timeout = connect;
        server.url_read_timeout = read;
        server.url_fetch_timeout = whole;
    }
}

/// `--cgroup`, with a named directory checked to be a cgroup now (bad usage) rather
/// than when the service starts.
fn checked_cgroup(a: &ListenArgs) -> anyhow::Result<CgroupChoice> {
    if let CgroupChoice::Dir(dir) = &a.cgroup {
        buildlet::cgroup::Cgroup::open(dir).context("--cgroup")?;
    }
    Ok(a.cgroup.clone())
}

fn tar_limits(a: &ListenArgs) -> Limits {
    Limits {
        max_bytes: a.max_tar_bytes.as_u64(),
        max_entries: a.max_tar_entries,
        ..Limits::default()
    }
}

async fn run_listen(cfg: Box<ListenConfig>) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    // Before the connection cap is derived from it.
    match revdial::accept::raise_nofile_limit() {
        Ok(nofile) => tracing::info!(nofile, "open-file limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the open-file limit"),
    }
    let limits = cfg.conn.limits()?;
    tracing::info!(
        max_connections = limits.max_connections,
        max_handshakes = limits.max_handshakes,
        "connection limits"
    );
    let svc =
        BuildletService::new(cfg.server, shutdown.clone()).context("preparing the workdir")?;
    let tls = buildfarm_tls::server_config(
        &cfg.identity,
        cfg.client_ca.as_deref(),
        &[buildfarm_tls::ALPN_H2, buildfarm_tls::ALPN_BULK],
    )
    .context("building the tls config")?;
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    tracing::info!(%addr, workdir = %svc.workdir().display(), "buildlet listening");
    log_containment(&svc);
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "buildlet listening on {addr}").context("writing to stdout")?;
        out.flush().context("writing to stdout")?;
    }
    tokio::spawn(watch_signals(shutdown.clone()));
    let routes = server::authenticated_routes(svc.clone(), cfg.policy.clone());
    // Transfers may come on connections of their own, authorized as calls are.
    let bulk = server::ListenBulk {
        target: std::sync::Arc::new(svc.clone()),
        policy: cfg.policy,
    };
    let serve = server::serve_tls_with(listener, tls, routes, Some(bulk), limits, shutdown.clone());
    tokio::pin!(serve);
    tokio::select! {
        () = &mut serve => {}
        _ = shutdown.cancelled() => {
            // Commands watch the token and are being killed; give calls a grace period.
            if tokio::time::timeout(GRACE, &mut serve).await.is_err() {
                tracing::warn!("calls still running after the grace period");
            }
        }
    }
    shutdown.cancel();
    if !svc.drain(GRACE).await {
        tracing::warn!("tasks still running at exit");
    }
    tracing::info!("buildlet stopped");
    Ok(())
}

/// One start-up line saying how commands are contained, with the cgroup a supervisor
/// kills if this buildlet dies.
fn log_containment(svc: &BuildletService) {
    let c = svc.containment();
    match c.cgroup_path() {
        Some(cg) => {
            tracing::info!(containment = c.description(), cgroup = %cg.display(), "commands contained in cgroups")
        }
        None => tracing::info!(
            containment = c.description(),
            "commands contained without cgroups (child subreaper)"
        ),
    }
}

async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("sigterm: shutting down"),
        _ = int.recv() => tracing::info!("sigint: shutting down"),
        _ = shutdown.cancelled() => return,
    }
    shutdown.cancel();
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    buildfarm_tls::install_crypto_provider();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let mode = match validate(cli) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("buildlet: {e:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let run = match mode {
        Mode::Version => {
            println!("buildlet {}", server::VERSION);
            return ExitCode::SUCCESS;
        }
        Mode::Print(line) => {
            println!("{line}");
            return ExitCode::SUCCESS;
        }
        Mode::Listen(cfg) => run_in_runtime(run_listen(cfg)),
        Mode::Reverse(cfg) => run_in_runtime(reverse::run(*cfg)),
    };
    match run {
        Ok(()) => ExitCode::SUCCESS,
        // A config the dialer refuses to start with is bad usage, like a bad flag.
        Err(e) if e.downcast_ref::<revdial::DialerError>().is_some() => {
            eprintln!("buildlet: {e:#}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "buildlet failed");
            ExitCode::FAILURE
        }
    }
}

fn run_in_runtime(
    fut: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(fut)
}
