//! `buildlet-fleet`: many reverse buildlets of one host type in one process, for load
//! tests of a coordinator (`cargo xtask bench fleet`, `coordinator/tests/fleet.rs`).
//!
//! Each host is what `buildlet --reverse` runs, minus the process: its own
//! `BuildletService` (real service, own workdir, host type and hostname) served over
//! its own `revdial::run_dialer` tunnel with the same builder-key handshake, keep-alive
//! watch and jittered reconnect backoff. Hostnames are `<prefix>-<index>` (five
//! digits), so a fleet started again with the same flags replaces its old entries.
//!
//! Prints one line `fleet dialling N hosts` once every dialer is started; runs until
//! SIGTERM/SIGINT (SIGKILL is how tests make a thousand hosts vanish at once). Bad
//! flags exit 64. Commands run without a cgroup (`--cgroup none`): a fleet shares one
//! process, so containment per host is not what it tests.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use buildlet::contain::CgroupChoice;
use buildlet::server::{self, BuildletService, ServerConfig};
use clap::Parser;
use revdial::{Credential, DialerConfig};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Exit code for bad command-line arguments (EX_USAGE).
const EXIT_USAGE: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "buildlet-fleet",
    about = "runs many reverse buildlets of one host type in one process (load tests)"
)]
struct Cli {
    /// The coordinator (https://HOST:PORT).
    #[arg(long)]
    reverse: String,
    /// CA certificate (PEM) the coordinator's certificate must chain to.
    #[arg(long)]
    ca_file: PathBuf,
    /// Name to verify the coordinator's certificate against; default its host.
    #[arg(long)]
    server_name: Option<String>,
    #[arg(long)]
    host_type: String,
    /// File holding the hex builder key of the host type.
    #[arg(long)]
    builder_key_file: PathBuf,
    /// How many hosts.
    #[arg(long)]
    count: usize,
    /// Index of the first host (hostnames run from it).
    #[arg(long, default_value_t = 0)]
    first: usize,
    /// Hostnames are `<prefix>-<index>`.
    #[arg(long, default_value = "fleet")]
    hostname_prefix: String,
    /// Each host's workdir is `<workdir-root>/<hostname>`.
    #[arg(long)]
    workdir_root: PathBuf,
    /// Start the dialers evenly over this long instead of all at once.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    dial_spread: Duration,
}

struct Fleet {
    hosts: Vec<(DialerConfig, BuildletService)>,
    spread: Duration,
}

fn validate(cli: Cli, shutdown: &CancellationToken) -> anyhow::Result<Fleet> {
    if cli.count == 0 || cli.count > 50_000 {
        bail!("--count must be in 1..=50000");
    }
    revdial::parse_coordinator(&cli.reverse).context("--reverse")?;
    let ca_pem = buildfarm_tls::load_ca_file(&cli.ca_file).context("loading --ca-file")?;
    let key = std::fs::read_to_string(&cli.builder_key_file)
        .with_context(|| {
            format!(
                "reading --builder-key-file {}",
                cli.builder_key_file.display()
            )
        })?
        .trim()
        .to_owned();
    let mut hosts = Vec::with_capacity(cli.count);
    for i in cli.first..cli.first + cli.count {
        let hostname = format!("{}-{i:05}", cli.hostname_prefix);
        let mut cfg = ServerConfig::new(cli.workdir_root.join(&hostname));
        cfg.host_type = cli.host_type.clone();
        cfg.hostname = hostname.clone();
        cfg.cgroup = CgroupChoice::None;
        let svc = BuildletService::new(cfg, shutdown.clone())
            .with_context(|| format!("preparing the workdir of {hostname}"))?;
        let mut dialer = DialerConfig::new(
            cli.reverse.clone(),
            ca_pem.clone(),
            cli.host_type.clone(),
            hostname,
            server::VERSION,
            Credential::BuilderKey(key.clone()),
        );
        dialer.server_name = cli.server_name.clone();
        hosts.push((dialer, svc));
    }
    Ok(Fleet {
        hosts,
        spread: cli.dial_spread,
    })
}

async fn run(fleet: Fleet, shutdown: CancellationToken) -> anyhow::Result<()> {
    let n = fleet.hosts.len();
    let gap = fleet.spread / u32::try_from(n).unwrap_or(u32::MAX);
    let mut dialers = JoinSet::new();
    for (i, (cfg, svc)) in fleet.hosts.into_iter().enumerate() {
        if i > 0 && !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
        dialers.spawn(revdial::run_dialer(
            cfg,
            server::routes(svc),
            shutdown.clone(),
        ));
    }
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "fleet dialling {n} hosts").context("writing to stdout")?;
        out.flush().context("writing to stdout")?;
    }
    // Each dialer returns at shutdown, or at once for a config it cannot start with.
    while let Some(r) = dialers.join_next().await {
        r.context("a dialer task panicked")?
            .context("a dialer could not start")?;
    }
    Ok(())
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
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = shutdown.cancelled() => return,
    }
    shutdown.cancel();
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // Thousands of hosts: one line per connect would drown the log.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    buildfarm_tls::install_crypto_provider();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // One descriptor per tunnel, plus the process's own.
    if let Err(error) = revdial::accept::raise_nofile_limit() {
        tracing::warn!(%error, "cannot raise the open-file limit");
    }
    let shutdown = CancellationToken::new();
    let fleet = match validate(cli, &shutdown) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("buildlet-fleet: {e:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("buildlet-fleet: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async {
        tokio::spawn(watch_signals(shutdown.clone()));
        run(fleet, shutdown).await
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("buildlet-fleet: {e:#}");
            ExitCode::FAILURE
        }
    }
}
