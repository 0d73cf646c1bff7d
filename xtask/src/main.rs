//! `cargo xtask <task>`: the project's own automation (no Makefiles, no drifting shell).
//!
//! - `ci`: exactly what CI runs after `.ci/run` installed the system packages:
//!   `cargo fmt --check`, `cargo clippy --all-targets -D warnings`, the whole test suite.
//! - `bench`: benchmarks that print ratios against a limit measured in the same run.
//! - `acceptance`: the Go toolchain workload (make.bash, sharded dist tests, a module's
//!   cache) through the farm against the same work done directly (see `acceptance.rs`).
//! - `certs`: a CA plus server and client certificates for trying things by hand.
//! - `images`: the local Docker images of `env/` (see `images.rs`).
//! - `chaos`: the full multi-host chaos suite in Docker containers (`coordinator/tests/chaos.rs`;
//!   its short form runs in `ci`).
//! - `fuzz`: each `cargo fuzz` target for a bounded time (needs nightly + cargo-fuzz); the
//!   same fuzz bodies also run on stable in `cargo test` (the `tests/fuzz_bodies.rs` files).

mod acceptance;
mod bench;
mod bench_farm;
mod bench_fleet;
mod bench_gomote;
mod bench_pages;
mod bench_pools;
mod bench_revdial;
mod fuzz;
mod images;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Format check, clippy with warnings as errors, then every test.
    Ci,
    /// The main job: build the binaries and run the coordinator with its built-in
    /// config (local buildlets building the example Go module). Extra arguments go to
    /// the coordinator.
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the benchmarks and print ratios (JSON under target/bench/).
    Bench {
        /// Only run benchmarks whose name contains this.
        filter: Option<String>,
    },
    /// Measure the Go toolchain workload through the farm against the same work done
    /// directly: make.bash, dist tests over helpers vs one buildlet, a warm module cache.
    /// Tens of minutes (two make.bash runs).
    Acceptance,
    /// Used by `acceptance`: run the measurements in this (release) process.
    #[command(hide = true)]
    AcceptanceInner,
    /// Used by `bench`: run the benchmarks in this (release) process.
    #[command(hide = true)]
    BenchInner { filter: Option<String> },
    /// Write a CA, a server certificate (localhost, 127.0.0.1) and a client certificate.
    Certs {
        #[arg(long, default_value = "target/certs")]
        out: PathBuf,
    },
    /// Build the local Docker images of env/ (`buildfarm/<host type>:local`).
    Images {
        /// Only the host types whose name contains this.
        filter: Option<String>,
    },
    /// The full chaos suite: coordinator, PostgreSQL and buildlets in containers, faults
    /// injected under a stream of builds (table printed, JSON under target/chaos/).
    Chaos,
    /// Run every fuzz target for a bounded time each (needs nightly and cargo-fuzz).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only the targets whose name contains this.
        filter: Option<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.task {
        Task::Ci => ci(&root),
        Task::Demo { args } => demo(&root, &args),
        Task::Acceptance => acceptance::run(&root),
        Task::AcceptanceInner => acceptance::inner(&root),
        Task::Bench { filter } => bench::run(&root, filter.as_deref()),
        Task::BenchInner { filter } => bench::inner(&root, filter.as_deref()),
        Task::Certs { out } => certs(&root.join(out)),
        Task::Chaos => chaos(&root),
        Task::Fuzz { seconds, filter } => fuzz::run(&root, seconds, filter.as_deref()),
        Task::Images { filter } => images::run(&root, filter.as_deref()),
    }
}

fn workspace_root() -> PathBuf {
    // xtask lives one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(what: &str, mut cmd: Command) -> Result<()> {
    eprintln!("xtask: {what}: {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn ci(root: &Path) -> Result<()> {
    let mut fmt = cargo();
    fmt.current_dir(root).args(["fmt", "--all", "--check"]);
    run("format check", fmt)?;

    let mut clippy = cargo();
    clippy.current_dir(root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    run("clippy", clippy)?;

    // The Docker pool's tests run builds in these images; without an engine they skip
    // (and fail under CI=true, which says the engine must be there).
    if images::engine_answers() {
        images::run(root, None)?;
    } else {
        eprintln!("xtask: no Docker engine: not building env/ images");
    }

    // Slow multi-process suites run in CI; developers opt in with BUILDFARM_SLOW_TESTS=1.
    let mut test = cargo();
    test.current_dir(root)
        .args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    run("tests", test)?;
    Ok(())
}

pub(crate) fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

fn demo(root: &Path, args: &[String]) -> Result<()> {
    if Command::new("go").arg("version").output().is_err() {
        bail!(
            "the main job builds Go code but `go` was not found; install it with: sudo apt-get install golang-go"
        );
    }
    if Command::new("bwrap").arg("--version").output().is_err() {
        eprintln!(
            "note: `bwrap` was not found, so local buildlets will run without a sandbox; install it with: sudo apt-get install bubblewrap"
        );
    }
    let mut build = cargo();
    build.current_dir(root).args([
        "build",
        "--bin",
        "coordinator",
        "--bin",
        "buildlet",
        "--bin",
        "gomote",
    ]);
    run("build", build)?;
    let bin = target_dir(root).join("debug");
    let mut coord = Command::new(bin.join("coordinator"));
    coord.current_dir(root).args(args);
    let status = coord.status().context("starting the coordinator")?;
    if !status.success() {
        bail!("coordinator exited with {status}");
    }
    Ok(())
}

fn chaos(root: &Path) -> Result<()> {
    if !images::engine_answers() {
        bail!("no Docker engine answers `docker version`: install docker.io and start it");
    }
    // The images are assembled from these binaries (the test binary alone does not
    // build the buildlet).
    let mut build = cargo();
    build
        .current_dir(root)
        .args(["build", "--bin", "coordinator", "--bin", "buildlet"]);
    run("build", build)?;
    let mut test = cargo();
    test.current_dir(root).env("BUILDFARM_CHAOS", "full").args([
        "test",
        "-p",
        "coordinator",
        "--test",
        "chaos",
        "--",
        "--nocapture",
    ]);
    run("chaos suite", test)
}

fn certs(out: &Path) -> Result<()> {
    buildfarm_tls::install_crypto_provider();
    let ca = buildfarm_tls::CertificateAuthority::generate("buildfarm dev CA")?;
    ca.identity().write_files(out, "ca")?;
    ca.issue_server(&["localhost", "127.0.0.1"])?
        .write_files(out, "server")?;
    ca.issue_client("coordinator")?.write_files(out, "client")?;
    println!(
        "wrote ca.crt, server.crt/key, client.crt/key to {}",
        out.display()
    );
    Ok(())
}
