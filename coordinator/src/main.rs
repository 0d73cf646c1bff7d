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
    /// Issue, list or revoke user tokens (in the config's store; a running coordinator
    /// sees a new token at once and a revocation within seconds; `gomote token revoke`
    /// is effective at once).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print the builder key a reverse buildlet of HOST_TYPE authenticates with (from
    /// the newest `access.builder_keys` secret, else the master key).
    BuilderKey { host_type: String },
    /// Validate the config and exit.
    CheckConfig,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a new token for USER (shown once; the store keeps only its hash).
    Issue {
        user: String,
        /// viewer, developer, operator or admin.
        #[arg(long, default_value = "developer")]
        role: String,
        /// What the token is for.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// List every token (id, user, role, created, revoked); never the secrets.
    List,
    /// Revoke the token with this id.
    Revoke { id: String },
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
        Some(Command::BuilderKey { host_type }) => {
            let key = app::master_key(&config.coordinator.master_key_path()).and_then(|m| {
                coordinator::access::dialin::current_builder_secret(
                    &config.access,
                    &m,
                    std::time::SystemTime::now(),
                )
            });
            match key {
                Ok(k) => println!("{}", revdial::builder_key(&k, host_type)),
                Err(e) => {
                    eprintln!("coordinator: {e:#}");
                    return ExitCode::FAILURE;
                }
            }
            return ExitCode::SUCCESS;
        }
        Some(Command::Token(t)) => return token_command(&config, t),
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

/// `coordinator token ...`: works on the config's store directly.
fn token_command(config: &Config, cmd: &TokenCommand) -> ExitCode {
    if let TokenCommand::Issue { user, role, .. } = cmd {
        if !coordinator::tokens::valid_user(user) {
            eprintln!("coordinator: invalid user name {user:?}");
            return ExitCode::from(EXIT_CONFIG);
        }
        if let Err(e) = role.parse::<coordinator::access::Role>() {
            eprintln!("coordinator: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("coordinator: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(token_command_async(config, cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coordinator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn token_command_async(config: &Config, cmd: &TokenCommand) -> Result<()> {
    let url = config.coordinator.store_url();
    let store = buildfarm_store::open(&url)
        .await
        .with_context(|| format!("opening store {}", buildfarm_store::redact_url(&url)))?;
    let registry = coordinator::access::registry::TokenRegistry::new(store.clone());
    let result = match cmd {
        TokenCommand::Issue { user, role, note } => {
            let role: coordinator::access::Role = role.parse()?;
            let (_, token) = registry.issue(user, role, note).await?;
            println!("{token}");
            Ok(())
        }
        TokenCommand::List => {
            println!(
                "{:<16}  {:<10}  {:<20}  {:<24}  note",
                "id", "role", "user", "revoked"
            );
            for t in registry.list().await? {
                let revoked = t
                    .revoked_at
                    .map(coordinator::access::fmt_unix_ms)
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{:<16}  {:<10}  {:<20}  {:<24}  {}",
                    t.id, t.role, t.user, revoked, t.note
                );
            }
            Ok(())
        }
        TokenCommand::Revoke { id } => {
            let t = registry.revoke(id).await?;
            println!("revoked {} ({}, {})", t.id, t.user, t.role);
            Ok(())
        }
    };
    store.close().await;
    result
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
    // The coordinator's own user is its admin; the token is kept across restarts while
    // it stays valid (the file is in the data dir, readable by this user alone).
    let existing = std::fs::read(&gomote_cfg)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["token"].as_str().map(str::to_owned));
    let token = running
        .access
        .ensure_token(
            existing.as_deref(),
            &user,
            coordinator::access::Role::Admin,
            "gomote.json of the coordinator's own user",
        )
        .await
        .context("issuing the token of gomote.json")?;
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

    let config_file = cli.config.clone();
    let reload = {
        let running = &running;
        async move {
            #[cfg(unix)]
            {
                let Ok(mut hup) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                else {
                    return std::future::pending().await;
                };
                while hup.recv().await.is_some() {
                    let Some(path) = &config_file else {
                        tracing::warn!("SIGHUP: the built-in config has nothing to reload");
                        continue;
                    };
                    match Config::from_file(path) {
                        Ok(c) => {
                            if let Err(e) = running.reload_dialin(&c.access) {
                                tracing::error!(error = %format!("{e:#}"), "SIGHUP: keeping the old dial-in credentials");
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "SIGHUP: config invalid; nothing reloaded")
                        }
                    }
                }
            }
            std::future::pending::<()>().await
        }
    };
    tokio::select! {
        _ = shutdown_signal() => {}
        _ = reload => {}
    }
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
