//! `coordinator`: with no arguments, the main job — the built-in config building the
//! example Go module with local buildlets, SQLite under `./.buildfarm`, status page on
//! 127.0.0.1:8119. With `--config`, a farm as configured.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use buildfarm_config::Config;
use clap::{Parser, Subcommand};
use coordinator::app::{self, StartOptions};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "coordinator", version, about = "buildfarm coordinator")]
struct Cli {
    /// The config file; without it, the built-in main-job config.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Override the listen address of the config.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Override the data dir of the config.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// The buildlet binary for local pools (default: next to this executable).
    #[arg(long)]
    buildlet: Option<PathBuf>,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print a user token for the public API (gomote, try).
    IssueToken { user: String },
    /// Print the builder key a reverse buildlet of HOST_TYPE authenticates with.
    BuilderKey { host_type: String },
    /// Validate the config and exit.
    CheckConfig,
}

/// Exit code for bad usage or config (sysexits EX_USAGE / EX_CONFIG style).
const EXIT_CONFIG: u8 = 64;
/// A required program is missing (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;

fn example_repo_dir() -> PathBuf {
    let here = Path::new("env/examples/hello");
    if here.join("go.mod").exists() {
        return here.to_path_buf();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../env/examples/hello")
}

fn load_config(cli: &Cli) -> Result<(Config, bool), String> {
    let (mut config, builtin) = match &cli.config {
        Some(path) => (Config::from_file(path).map_err(|e| e.to_string())?, false),
        None => (Config::builtin_default(&example_repo_dir()), true),
    };
    if let Some(l) = cli.listen {
        config.coordinator.listen = l;
    }
    if let Some(d) = &cli.data_dir {
        config.coordinator.data_dir = d.clone();
    }
    Ok((config, builtin))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if cli.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    buildfarm_tls::install_crypto_provider();

    let (config, builtin) = match load_config(&cli) {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("coordinator: invalid config:\n{msg}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match &cli.command {
        Some(Command::CheckConfig) => {
            println!(
                "config ok: {} host types, {} builders, {} repos",
                config.host_types.len(),
                config.builders.len(),
                config.repos.len()
            );
            return ExitCode::SUCCESS;
        }
        Some(Command::IssueToken { user }) | Some(Command::BuilderKey { host_type: user }) => {
            if let Some(Command::IssueToken { .. }) = &cli.command
                && !coordinator::tokens::valid_user(user)
            {
                eprintln!("coordinator: invalid user name {user:?}");
                return ExitCode::from(EXIT_CONFIG);
            }
            let key = match app::master_key(&config.coordinator.master_key_path()) {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("coordinator: {e:#}");
                    return ExitCode::FAILURE;
                }
            };
            match &cli.command {
                Some(Command::IssueToken { user }) => {
                    println!("{}", coordinator::tokens::issue(&key, user))
                }
                _ => println!("{}", revdial::builder_key(&key, user)),
            }
            return ExitCode::SUCCESS;
        }
        None => {}
    }
    if builtin
        && std::process::Command::new("go")
            .arg("version")
            .output()
            .is_err()
    {
        eprintln!(
            "coordinator: the main job builds Go code but `go` was not found; install it with: sudo apt-get install golang-go"
        );
        return ExitCode::from(EXIT_UNAVAILABLE);
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("coordinator: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(config, builtin, &cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coordinator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(mut config: Config, builtin: bool, cli: &Cli) -> Result<()> {
    if builtin {
        // The example module becomes a real git repository under the data dir, with a
        // new commit whenever the shipped files change.
        let repo_dir = config.coordinator.data_dir.join("example-repo");
        coordinator::git::import_dir_as_repo(&example_repo_dir(), &repo_dir)
            .await
            .context("importing the example module")?;
        let abs = repo_dir.canonicalize()?;
        for r in &mut config.repos {
            if r.name == "example" {
                r.url = abs.display().to_string();
            }
        }
        // One Go build cache for the local buildlets: the cross builders share std.
        let cache = config.coordinator.data_dir.join("gocache");
        std::fs::create_dir_all(&cache)?;
        let cache = cache.canonicalize()?;
        for ht in &mut config.host_types {
            ht.env
                .entry("GOCACHE".into())
                .or_insert_with(|| cache.display().to_string());
        }
    }
    let listen = config.coordinator.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| {
            format!("binding {listen} (is another coordinator running? use --listen)")
        })?;
    let running = app::start(
        config,
        listener,
        StartOptions {
            buildlet_bin: cli.buildlet.clone(),
            config_file: cli.config.clone(),
        },
    )
    .await?;
    let user = std::env::var("USER")
        .ok()
        .filter(|u| coordinator::tokens::valid_user(u))
        .unwrap_or_else(|| "dev".into());
    let gomote_cfg = running.farm.data_dir().join("gomote.json");
    let token = coordinator::tokens::issue(running.farm.master_key(), &user);
    let cfg = serde_json::json!({
        "coordinator": format!("https://{}", running.addr),
        "ca_file": running.ca_file,
        "token": token,
    });
    buildfarm_tls::write_private(&gomote_cfg, serde_json::to_string_pretty(&cfg)?.as_bytes())?;
    println!("buildfarm coordinator running");
    println!("  status page: http://{}/", running.addr);
    println!(
        "  gomote:      BUILDFARM_GOMOTE_CONFIG={} gomote list",
        gomote_cfg.display()
    );
    println!("  (Ctrl-C to stop; a line per finished build follows)");

    shutdown_signal().await;
    println!("stopping (unfinished work resumes on the next start)");
    running.stop(Duration::from_secs(10)).await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
