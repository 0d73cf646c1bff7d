//! Benchmarks: each compares the farm's way of doing something with the plain local
//! way measured in the same run (local exec, local `tar`), prints a table of ratios and
//! writes every figure to `target/bench/<name>.json` for comparison across commits.
//!
//! `cargo xtask bench` builds the release binaries and re-runs itself in release mode
//! (`bench-inner`), so figures are not those of a debug build.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use buildlet::client::{BuildletClient, ConnectOptions, ExecSpec};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Debug, Serialize)]
pub struct Figure {
    pub name: String,
    /// What the farm achieved.
    pub measured: f64,
    /// The local reference, measured in the same run.
    pub baseline: f64,
    pub unit: String,
    /// measured / baseline, oriented so that 1.0 means "as good as local" and lower is
    /// worse (for latencies: baseline / measured).
    pub ratio: f64,
    pub note: String,
}

/// `cargo xtask bench`: build release binaries, then run the benches in release mode.
pub fn run(root: &Path, filter: Option<&str>) -> Result<()> {
    let mut build = super::cargo();
    build.current_dir(root).args([
        "build",
        "--release",
        "-p",
        "xtask",
        "--bin",
        "xtask",
        "-p",
        "buildlet",
        "--bin",
        "buildlet",
        "--bin",
        "buildlet-fleet",
        "-p",
        "coordinator",
        "--bin",
        "coordinator",
    ]);
    super::run("release build", build)?;
    let bin = super::target_dir(root).join("release");
    let mut inner = std::process::Command::new(bin.join("xtask"));
    inner.current_dir(root).arg("bench-inner");
    if let Some(f) = filter {
        inner.arg(f);
    }
    super::run("benchmarks", inner)
}

/// Runs the benchmarks in this (release) process.
pub fn inner(root: &Path, filter: Option<&str>) -> Result<()> {
    if filter == Some(super::bench_revdial::FLEET_CHILD) {
        // Not a bench: the dialer process of the revdial fleet bench.
        return super::bench_revdial::fleet_child();
    }
    buildfarm_tls::install_crypto_provider();
    let rt = tokio::runtime::Runtime::new()?;
    let out_dir = super::target_dir(root).join("bench");
    std::fs::create_dir_all(&out_dir)?;
    let release = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .to_path_buf();
    let mut figures = Vec::new();
    let want = |name: &str| filter.is_none_or(|f| name.contains(f));
    if want("buildlet") {
        figures.extend(rt.block_on(buildlet_benches(&release, &out_dir))?);
    }
    if want("gomote") {
        figures.extend(rt.block_on(super::bench_gomote::gomote_benches(&release, &out_dir))?);
    }
    if want("revdial") {
        figures.extend(rt.block_on(super::bench_revdial::revdial_benches())?);
    }
    if want("farm") {
        figures.extend(rt.block_on(super::bench_farm::farm_benches(&release, &out_dir))?);
    }
    if want("pools") {
        figures.extend(rt.block_on(super::bench_pools::pool_benches(
            &release,
            &out_dir.join("pools-work"),
        ))?);
    }
    if want("fleet") {
        figures.extend(rt.block_on(super::bench_fleet::fleet_benches(&release, &out_dir))?);
    }
    if want("pages") {
        figures.extend(rt.block_on(super::bench_pages::pages_benches())?);
    }
    print_table(&figures);
    for f in &figures {
        let path = out_dir.join(format!("{}.json", f.name));
        std::fs::write(&path, serde_json::to_string_pretty(f)?)?;
    }
    println!("figures written to {}", out_dir.display());
    Ok(())
}

fn print_table(figures: &[Figure]) {
    println!(
        "{:<28} {:>14} {:>14} {:>10} {:>8}  note",
        "benchmark", "measured", "baseline", "unit", "ratio"
    );
    for f in figures {
        println!(
            "{:<28} {:>14.3} {:>14.3} {:>10} {:>8.3}  {}",
            f.name, f.measured, f.baseline, f.unit, f.ratio, f.note
        );
    }
}

pub(crate) fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A started release buildlet and a client connected to it with mTLS.
pub(crate) struct Buildlet {
    _child: tokio::process::Child,
    pub(crate) client: BuildletClient,
    workdir: PathBuf,
}

pub(crate) async fn start_buildlet(release: &Path, dir: &Path) -> Result<Buildlet> {
    let ca = buildfarm_tls::CertificateAuthority::generate("bench ca")?;
    let certs = dir.join("certs");
    let (server_cert, server_key) = ca
        .issue_server(&["127.0.0.1"])?
        .write_files(&certs, "server")?;
    let (ca_file, _) = ca.identity().write_files(&certs, "ca")?;
    let client_id = ca.issue_client("bench")?;
    let workdir = dir.join("workdir");
    let mut child = tokio::process::Command::new(release.join("buildlet"))
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--workdir")
        .arg(&workdir)
        .arg("--tls-cert")
        .arg(&server_cert)
        .arg("--tls-key")
        .arg(&server_key)
        .arg("--client-ca")
        .arg(&ca_file)
        .arg("--max-tar-bytes")
        .arg("8GiB")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the release buildlet")?;
    let stdout = child.stdout.take().context("stdout")?;
    let line = BufReader::new(stdout)
        .lines()
        .next_line()
        .await?
        .context("buildlet exited")?;
    let addr = line
        .strip_prefix("buildlet listening on ")
        .context("unexpected first line")?
        .to_owned();
    let mut opts = ConnectOptions::new(addr, ca.cert_pem());
    opts.client_identity = Some(client_id);
    let client = BuildletClient::connect(opts).await?;
    Ok(Buildlet {
        _child: child,
        client,
        workdir,
    })
}

/// A tree of about `total` bytes in 100 KiB files, half random (incompressible) and
/// half text-like, so gzip does real work.
pub(crate) fn make_tree(dir: &Path, total: usize) -> Result<()> {
    if dir.join(".complete").exists() {
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(dir);
    let file_size = 100 << 10;
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..total / file_size {
        let sub = dir.join(format!("d{:03}", i / 100));
        std::fs::create_dir_all(&sub)?;
        let mut data = Vec::with_capacity(file_size);
        if i % 2 == 0 {
            while data.len() < file_size {
                // xorshift: fast, deterministic, incompressible enough.
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                data.extend_from_slice(&seed.to_le_bytes());
            }
        } else {
            while data.len() < file_size {
                data.extend_from_slice(
                    format!("line {i} of a source-like file {}\n", data.len()).as_bytes(),
                );
            }
        }
        data.truncate(file_size);
        std::fs::write(sub.join(format!("f{i:05}.dat")), &data)?;
    }
    std::fs::write(dir.join(".complete"), b"")?;
    Ok(())
}

fn run_tar(args: &[&str]) -> Result<Duration> {
    let start = Instant::now();
    let st = std::process::Command::new("tar")
        .args(args)
        .status()
        .context("running tar")?;
    if !st.success() {
        bail!("tar {args:?} failed");
    }
    Ok(start.elapsed())
}

async fn buildlet_benches(release: &Path, out_dir: &Path) -> Result<Vec<Figure>> {
    let dir = out_dir.join("buildlet-work");
    let _ = std::fs::remove_dir_all(dir.join("workdir"));
    std::fs::create_dir_all(&dir)?;
    let b = start_buildlet(release, &dir).await?;
    let mut figures = vec![];

    // 1. exec of a trivial command: through the buildlet vs spawning it here.
    let n = 200;
    let mut local = Vec::with_capacity(n);
    let mut remote = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        tokio::process::Command::new("true").status().await?;
        local.push(t.elapsed());
        let t = Instant::now();
        let st = b
            .client
            .exec_collect(ExecSpec::new("true"), |_, _| {})
            .await?;
        remote.push(t.elapsed());
        if !st.success() {
            bail!("true failed through the buildlet");
        }
    }
    let (l, r) = (median(local), median(remote));
    figures.push(Figure {
        name: "buildlet_exec_latency".into(),
        measured: r.as_secs_f64() * 1e3,
        baseline: l.as_secs_f64() * 1e3,
        unit: "ms".into(),
        ratio: l.as_secs_f64() / r.as_secs_f64(),
        note: format!("median of {n}; baseline: spawn `true` locally"),
    });

    // 2. push of a ~200 MB tree as tar.gz vs `tar xzf` locally.
    let tree = out_dir.join("tree-200mb");
    make_tree(&tree, 200 << 20)?;
    let tarball = out_dir.join("tree-200mb.tar.gz");
    if !tarball.exists() {
        let f = std::fs::File::create(&tarball)?;
        buildlet::tarball::write_tar_gz(&tree, std::io::BufWriter::new(f))?;
    }
    let tree_bytes: u64 = walk_bytes(&tree);
    let local_x = dir.join("local-extract");
    let _ = std::fs::remove_dir_all(&local_x);
    std::fs::create_dir_all(&local_x)?;
    let t_local = run_tar(&[
        "xzf",
        tarball.to_str().context("utf8")?,
        "-C",
        local_x.to_str().context("utf8")?,
    ])?;
    let file = tokio::fs::File::open(&tarball).await?;
    let t = Instant::now();
    b.client.put_tar("tree", file, None).await?;
    let t_put = t.elapsed();
    let mb = tree_bytes as f64 / 1e6;
    figures.push(Figure {
        name: "buildlet_put_tar".into(),
        measured: mb / t_put.as_secs_f64(),
        baseline: mb / t_local.as_secs_f64(),
        unit: "MB/s".into(),
        ratio: t_local.as_secs_f64() / t_put.as_secs_f64(),
        note: format!("{mb:.0} MB tree; baseline: tar xzf locally"),
    });

    // 3. get of that tree back vs `tar czf` locally.
    let t_local = run_tar(&[
        "czf",
        dir.join("local.tar.gz").to_str().context("utf8")?,
        "-C",
        tree.to_str().context("utf8")?,
        ".",
    ])?;
    let mut out = tokio::fs::File::create(dir.join("got.tar.gz")).await?;
    let t = Instant::now();
    b.client.get_tar("tree", &mut out, None).await?;
    let t_get = t.elapsed();
    figures.push(Figure {
        name: "buildlet_get_tar".into(),
        measured: mb / t_get.as_secs_f64(),
        baseline: mb / t_local.as_secs_f64(),
        unit: "MB/s".into(),
        ratio: t_local.as_secs_f64() / t_get.as_secs_f64(),
        note: format!("{mb:.0} MB tree; baseline: tar czf locally"),
    });
    let _ = std::fs::remove_dir_all(&local_x);
    let _ = std::fs::remove_dir_all(&b.workdir);
    Ok(figures)
}

pub(crate) fn walk_bytes(dir: &Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}
