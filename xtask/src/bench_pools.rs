//! Pool benches: for the docker pool, the time from `acquire` to a buildlet answering
//! (container created and started, buildlet fetched over HTTPS and checked, dialled, a
//! `Status` answered) and from release to the container being gone, each beside the
//! same figure for the local pool (a spawned buildlet process) measured in the same
//! run. Needs a Docker engine and `cargo xtask images`; without them the docker figures
//! are skipped with a note.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use buildfarm_config::{Config, DockerPool, HostType, LocalPool, Pool as PoolConfig};
use coordinator::app::{self, Running, StartOptions};
use coordinator::pool::Pool;
use tokio_util::sync::CancellationToken;

use super::bench::Figure;

const RUNS: usize = 5;
const HOST_TYPE: &str = "bench-pool";
const IMAGE: &str = "buildfarm/linux-amd64:local";
/// Longest wait for a released machine to be gone.
const GONE_WAIT: Duration = Duration::from_secs(120);

pub async fn pool_benches(release: &Path, work: &Path) -> Result<Vec<Figure>> {
    std::fs::create_dir_all(work)?;
    let local = measure_local(release, work).await.context("local pool")?;
    let network = format!("bf-bench-{}", std::process::id());
    let docker = match docker_network(&network) {
        Ok(gateway) => {
            let r = measure_docker(release, work, &network, &gateway).await;
            let _ = Command::new("docker")
                .args(["network", "rm", &network])
                .output();
            r.context("docker pool")?
        }
        Err(e) => {
            println!("note: docker pool benches skipped: {e}");
            return Ok(Vec::new());
        }
    };
    let fig = |name: &str, d: Duration, l: Duration, note: &str| Figure {
        name: name.into(),
        measured: d.as_secs_f64() * 1e3,
        baseline: l.as_secs_f64() * 1e3,
        unit: "ms".into(),
        ratio: l.as_secs_f64() / d.as_secs_f64().max(1e-9),
        note: note.into(),
    };
    Ok(vec![
        fig(
            "pool_docker_acquire_ms",
            docker.0,
            local.0,
            "median acquire -> Status answered; baseline: local pool",
        ),
        fig(
            "pool_docker_release_ms",
            docker.1,
            local.1,
            "median release -> container removed; baseline: local buildlet's files removed",
        ),
    ])
}

/// A bridge network of the bench's own; returns its gateway address.
fn docker_network(name: &str) -> Result<String> {
    let image = Command::new("docker")
        .args(["image", "inspect", IMAGE])
        .output();
    match image {
        Ok(o) if o.status.success() => {}
        Ok(_) => bail!("image {IMAGE} is missing (run `cargo xtask images`)"),
        Err(e) => bail!("docker: {e}"),
    }
    let out = Command::new("docker")
        .args(["network", "create", name])
        .output()?;
    if !out.status.success() {
        bail!(
            "docker network create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = Command::new("docker")
        .args([
            "network",
            "inspect",
            name,
            "--format",
            "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
        ])
        .output()?;
    let gw = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if gw.is_empty() {
        bail!("network {name} has no gateway");
    }
    Ok(gw)
}

async fn start(
    pool: PoolConfig,
    listen: &str,
    release: &Path,
    data: PathBuf,
) -> Result<(Running, Arc<dyn Pool>)> {
    let mut config = Config::default();
    config.coordinator.data_dir = data.join("data");
    config.sandbox.workdir_root = Some(data.join("workdirs"));
    config.host_types.push(HostType {
        name: HOST_TYPE.into(),
        pool,
        env: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let running = app::start(
        config,
        listener,
        StartOptions {
            buildlet_bin: Some(release.join("buildlet")),
            config_file: None,
        },
    )
    .await?;
    let pool = running.farm.pool(HOST_TYPE).context("the pool")?.clone();
    Ok((running, pool))
}

/// Medians of (acquire -> answering, release -> gone), `gone` judged by `is_gone`.
async fn measure<F, Fut>(pool: &dyn Pool, mut is_gone: F) -> Result<(Duration, Duration)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let t = Instant::now();
        let lease = pool
            .acquire(&CancellationToken::new())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        lease.client.status().await?;
        up.push(t.elapsed());
        let t = Instant::now();
        drop(lease);
        let deadline = Instant::now() + GONE_WAIT;
        while !is_gone().await {
            if Instant::now() > deadline {
                bail!("a released machine was not gone within {GONE_WAIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        down.push(t.elapsed());
    }
    Ok((median(up), median(down)))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn measure_local(release: &Path, work: &Path) -> Result<(Duration, Duration)> {
    let dir = tempfile::tempdir_in(work)?;
    let (running, pool) = start(
        PoolConfig::Local(LocalPool { count: 1 }),
        "127.0.0.1:0",
        release,
        dir.path().to_owned(),
    )
    .await?;
    let root = dir.path().join("workdirs");
    let before = entries(&root);
    let r = measure(pool.as_ref(), || {
        let root = root.clone();
        async move { entries(&root) <= before }
    })
    .await;
    running.stop(Duration::from_secs(20)).await;
    r
}

fn entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

async fn measure_docker(
    release: &Path,
    work: &Path,
    network: &str,
    gateway: &str,
) -> Result<(Duration, Duration)> {
    let dir = tempfile::tempdir_in(work)?;
    let (running, pool) = start(
        PoolConfig::Docker(DockerPool {
            image: IMAGE.into(),
            network: Some(network.into()),
            max: 1,
            engine: None,
            coordinator_url: None,
            max_lifetime: Duration::from_secs(3600),
        }),
        &format!("{gateway}:0"),
        release,
        dir.path().to_owned(),
    )
    .await?;
    let owner = coordinator::pool::docker::owner_id(running.farm.data_dir());
    let r = measure(pool.as_ref(), || {
        let owner = owner.clone();
        async move { containers(&owner) == 0 }
    })
    .await;
    running.stop(Duration::from_secs(20)).await;
    r
}

fn containers(owner: &str) -> usize {
    Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label={}={owner}", coordinator::pool::docker::LABEL_OWNER),
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
        .unwrap_or(usize::MAX)
}
