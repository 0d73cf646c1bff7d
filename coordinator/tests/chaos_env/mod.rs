//! The chaos suite's farm: PostgreSQL, a coordinator and reverse buildlets, each in a
//! container of its own on a Docker network the suite creates, plus the listen-mode
//! buildlets the coordinator's docker pool starts on that network (through the host's
//! engine socket, mounted into the coordinator's container). Images are assembled from
//! this machine's files by `make-image.sh` and tagged by a digest of their inputs, so a
//! second run reuses them. The test talks to containers at their addresses on the
//! network: HTTPS to the coordinator (with the suite's CA), SQL to PostgreSQL.
//!
//! Everything is named `buildfarm-chaos-*` and removed when the farm is dropped.

#![allow(dead_code)]

pub mod tally;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use buildfarm_store::Store;

/// The port the coordinator listens on inside its container.
pub const COORD_PORT: u16 = 8443;
pub const REPO: &str = "chaos";
pub const REVERSE_HOST_TYPE: &str = "chaos-reverse";
pub const LISTEN_HOST_TYPE: &str = "chaos-listen";
pub const REVERSE_BUILDER: &str = "linux-amd64-reverse";
pub const LISTEN_BUILDER: &str = "linux-amd64-listen";
/// Each build's step: a marker from the commit, a pause (so faults land mid-build), a
/// quarter-megabyte scratch file (what fills a small disk), the marker again.
const STEP: &str = "echo begin-$(cat marker); sleep 3; \
    head -c 262144 /dev/zero > scratch.bin && echo done-$(cat marker)";

/// Runs `docker ARGS`, returning stdout; a failure carries docker's stderr.
pub async fn docker(args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new("docker")
        .args(args)
        .output()
        .await
        .with_context(|| format!("running docker {args:?}"))?;
    if !out.status.success() {
        bail!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Whether the suite can run here: a Docker engine and Debian's PostgreSQL. `Err` says
/// what is missing.
pub async fn prerequisites() -> Result<()> {
    docker(&["version", "--format", "{{.Server.Version}}"])
        .await
        .context("no Docker engine answers")?;
    if !Path::new("/usr/lib/postgresql").is_dir() {
        bail!("PostgreSQL is not installed (apt-get install postgresql)");
    }
    Ok(())
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/chaos_env/make-image.sh")
}

/// `sha256sum` of files (fast on large debug binaries, unlike unoptimised hashing here).
async fn digest(parts: &[String], files: &[PathBuf]) -> Result<String> {
    let mut text = parts.join("\n");
    if !files.is_empty() {
        let out = tokio::process::Command::new("sha256sum")
            .args(files)
            .output()
            .await
            .context("running sha256sum")?;
        if !out.status.success() {
            bail!(
                "sha256sum {files:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        text.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    use sha2::Digest;
    Ok(hex::encode(sha2::Sha256::digest(text.as_bytes()))[..16].to_owned())
}

/// The image of `kind`, built unless one with the same input digest exists; older
/// tags of the kind are removed after a build.
async fn image(kind: &str, bin_dir: &Path) -> Result<String> {
    let script = script();
    let mut files = vec![script.clone()];
    let mut parts = vec![kind.to_owned()];
    match kind {
        "coordinator" => {
            files.push(bin_dir.join("coordinator"));
            files.push(bin_dir.join("buildlet"));
        }
        "buildlet" => files.push(bin_dir.join("buildlet")),
        _ => {
            // The server's version stands for the package's files.
            let v = std::fs::read_dir("/usr/lib/postgresql")
                .context("reading /usr/lib/postgresql")?
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .max()
                .context("no PostgreSQL version under /usr/lib/postgresql")?;
            files.push(v.join("bin/postgres"));
            parts.push(v.display().to_string());
        }
    }
    let repo = format!("buildfarm-chaos-{kind}");
    let tag = format!("{repo}:{}", digest(&parts, &files).await?);
    if docker(&["image", "inspect", "--format", "{{.Id}}", &tag])
        .await
        .is_ok()
    {
        return Ok(tag);
    }
    let started = Instant::now();
    let out = tokio::process::Command::new("sh")
        .arg(&script)
        .arg(kind)
        .arg(&tag)
        .arg(bin_dir)
        .output()
        .await
        .context("running make-image.sh")?;
    if !out.status.success() {
        bail!(
            "make-image.sh {kind} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "chaos: built {tag} in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let old = docker(&["image", "ls", &repo, "--format", "{{.Repository}}:{{.Tag}}"]).await?;
    for t in old.lines().filter(|t| *t != tag) {
        let _ = docker(&["image", "rm", t]).await;
    }
    Ok(tag)
}

pub struct Images {
    pub coordinator: String,
    pub buildlet: String,
    pub postgres: String,
}

/// One at a time across test processes (another worktree's run may build too).
pub async fn images(bin_dir: &Path) -> Result<Images> {
    let lock_path = std::env::temp_dir().join("buildfarm-chaos-images.lock");
    let lock = std::fs::File::create(&lock_path).context("image lock file")?;
    let lock = tokio::task::spawn_blocking(move || lock.lock().map(|()| lock))
        .await
        .context("lock task")?
        .context("locking")?;
    let images = Images {
        coordinator: image("coordinator", bin_dir).await?,
        buildlet: image("buildlet", bin_dir).await?,
        postgres: image("postgres", bin_dir).await?,
    };
    drop(lock);
    Ok(images)
}

/// The farm of one run.
pub struct ChaosFarm {
    pub id: String,
    pub network: String,
    pub dir: tempfile::TempDir,
    pub images: Images,
    pub coord: String,
    pub pg: String,
    /// Reverse buildlet containers (their hostnames, which name them on the farm).
    pub reverse: Vec<String>,
    ca_pem: String,
}

impl ChaosFarm {
    pub fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    /// Starts PostgreSQL, the coordinator and `reverse` reverse buildlets; returns once
    /// the coordinator answers and every reverse buildlet is connected.
    pub async fn start(images: Images, reverse: usize) -> Result<ChaosFarm> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let network = format!("buildfarm-chaos-{id}");
        let dir = tempfile::Builder::new()
            .prefix("buildfarm-chaos-")
            .tempdir()
            .context("tempdir")?;
        // Plain bridge, not --internal: the test on the host dials containers.
        docker(&["network", "create", "--driver", "bridge", &network]).await?;
        let mut farm = ChaosFarm {
            coord: format!("buildfarm-chaos-coord-{id}"),
            pg: format!("buildfarm-chaos-pg-{id}"),
            reverse: (0..reverse)
                .map(|i| format!("buildfarm-chaos-rev{i}-{id}"))
                .collect(),
            id,
            network,
            dir,
            images,
            ca_pem: String::new(),
        };
        farm.prepare_files()?;
        farm.start_postgres().await?;
        farm.start_coordinator().await?;
        for name in farm.reverse.clone() {
            farm.run_reverse(&name, None).await?;
        }
        farm.wait_reverse_connected(&farm.reverse.clone(), Duration::from_secs(120))
            .await?;
        Ok(farm)
    }

    fn prepare_files(&mut self) -> Result<()> {
        let root = self.dir.path();
        let tls = root.join("tls");
        std::fs::create_dir_all(&tls)?;
        let ca = buildfarm_tls::CertificateAuthority::generate("buildfarm chaos CA")?;
        ca.identity().write_files(&tls, "ca")?;
        ca.issue_server(&[self.coord.as_str(), "localhost"])?
            .write_files(&tls, "server")?;
        self.ca_pem = std::fs::read_to_string(tls.join("ca.crt"))?;
        let master = coordinator::app::master_key(&root.join("master.key"))?;
        std::fs::write(
            root.join("builder.key"),
            revdial::builder_key(&master, REVERSE_HOST_TYPE),
        )?;
        // The repo the coordinator polls (mounted read-only would do, but git wants to
        // write nothing there anyway): one commit to begin with.
        let repo = self.repo();
        std::fs::create_dir_all(&repo)?;
        git(&repo, &["init", "--quiet", "--initial-branch=main"])?;
        std::fs::write(repo.join("marker"), "initial\n")?;
        git(&repo, &["add", "."])?;
        git(&repo, &["commit", "--quiet", "-m", "initial"])?;
        let docker_pool = format!(
            "{{ kind = \"docker\", image = \"{}\", network = \"{}\", max = 2, \
             coordinator_url = \"https://{}:{COORD_PORT}\", max_lifetime = \"1h\" }}",
            self.images.buildlet, self.network, self.coord
        );
        let step = format!(
            "[{{ name = \"work\", command = [\"sh\", \"-c\", {:?}], timeout = \"2m\" }}]",
            STEP
        );
        let config = format!(
            "[coordinator]\n\
             listen = \"0.0.0.0:{COORD_PORT}\"\n\
             data_dir = \"/chaos/data\"\n\
             store_url = \"postgres://buildfarm@{pg}:5432/postgres\"\n\
             tls_cert = \"/chaos/tls/server.crt\"\n\
             tls_key = \"/chaos/tls/server.key\"\n\
             master_key_file = \"/chaos/master.key\"\n\
             repo_poll_interval = \"1s\"\n\
             max_attempts = 8\n\n\
             [[host_types]]\nname = \"{REVERSE_HOST_TYPE}\"\n\
             pool = {{ kind = \"reverse\", expected = {n} }}\n\n\
             [[host_types]]\nname = \"{LISTEN_HOST_TYPE}\"\npool = {docker_pool}\n\n\
             [[builders]]\nname = \"{REVERSE_BUILDER}\"\nhost_type = \"{REVERSE_HOST_TYPE}\"\nsteps = {step}\n\n\
             [[builders]]\nname = \"{LISTEN_BUILDER}\"\nhost_type = \"{LISTEN_HOST_TYPE}\"\nsteps = {step}\n\n\
             [[repos]]\nname = \"{REPO}\"\nurl = \"/chaos/repo\"\nbranches = [\"main\"]\n",
            pg = self.pg,
            n = self.reverse.len(),
        );
        // Checked here so a bad config fails with its own message, not a dead container.
        buildfarm_config::Config::from_toml_str(&config, "chaos.toml")
            .map_err(|e| anyhow::anyhow!("the suite's config: {e}"))?;
        std::fs::write(root.join("config.toml"), config)?;
        Ok(())
    }

    async fn start_postgres(&self) -> Result<()> {
        docker(&[
            "run",
            "-d",
            "--name",
            &self.pg,
            "--hostname",
            &self.pg,
            "--network",
            &self.network,
            "--user",
            "999:999",
            &self.images.postgres,
        ])
        .await?;
        self.wait_postgres(Duration::from_secs(90)).await
    }

    /// Until PostgreSQL accepts a query (store open: migrations included).
    pub async fn wait_postgres(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            match self.store().await {
                Ok(s) => {
                    s.close().await;
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!(
                        "PostgreSQL not ready in {limit:?}; its log:\n{}",
                        self.logs(&self.pg).await
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    /// A fresh connection to the store (the database's address changes when its
    /// container restarts).
    pub async fn store(&self) -> Result<Arc<dyn Store>> {
        let ip = self.ip(&self.pg).await?;
        buildfarm_store::open(&format!("postgres://buildfarm@{ip}:5432/postgres"))
            .await
            .map_err(|e| anyhow::anyhow!("opening the store at {ip}: {e}"))
    }

    fn engine_socket() -> String {
        std::env::var("DOCKER_HOST")
            .ok()
            .and_then(|h| h.strip_prefix("unix://").map(str::to_owned))
            .unwrap_or_else(|| "/var/run/docker.sock".to_owned())
    }

    async fn start_coordinator(&self) -> Result<()> {
        let mount = format!("{}:/chaos", self.dir.path().display());
        let sock = format!("{}:/var/run/docker.sock", Self::engine_socket());
        docker(&[
            "run",
            "-d",
            "--name",
            &self.coord,
            "--hostname",
            &self.coord,
            "--network",
            &self.network,
            "-v",
            &mount,
            "-v",
            &sock,
            "-e",
            "RUST_LOG=info",
            &self.images.coordinator,
            "coordinator",
            "--config",
            "/chaos/config.toml",
        ])
        .await?;
        self.wait_coordinator(Duration::from_secs(90)).await
    }

    /// Until `/healthz` answers.
    pub async fn wait_coordinator(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            match self.get("/healthz").await {
                Ok(_) => return Ok(()),
                Err(e)
                    if Instant::now() > deadline
                        || docker(&["inspect", "--format", "{{.State.Running}}", &self.coord])
                            .await
                            .is_ok_and(|r| r == "false") =>
                {
                    return Err(e.context(format!(
                        "the coordinator is not running or did not answer in {limit:?}; its log:\n{}",
                        self.logs(&self.coord).await
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
    }

    /// Runs a reverse buildlet container `name`; `tmpfs` bounds its workdir's disk.
    pub async fn run_reverse(&self, name: &str, tmpfs: Option<&str>) -> Result<()> {
        let mount = format!("{}:/chaos:ro", self.dir.path().display());
        let url = format!("https://{}:{COORD_PORT}", self.coord);
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            "--hostname",
            name,
            "--network",
            &self.network,
            "-v",
            &mount,
        ];
        let tmpfs_arg;
        if let Some(size) = tmpfs {
            // The workdir and its staging dir beside it share the small filesystem.
            tmpfs_arg = format!("/wd:size={size}");
            args.extend(["--tmpfs", &tmpfs_arg]);
        }
        args.extend([
            &self.images.buildlet,
            "buildlet",
            "--reverse",
            &url,
            "--host-type",
            REVERSE_HOST_TYPE,
            "--builder-key-file",
            "/chaos/builder.key",
            "--ca-file",
            "/chaos/tls/ca.crt",
            "--workdir",
            "/wd/work",
            "--cgroup",
            "none",
        ]);
        docker(&args).await?;
        Ok(())
    }

    /// The container's address on the suite's network.
    pub async fn ip(&self, container: &str) -> Result<IpAddr> {
        let format = format!(
            "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
            self.network
        );
        let ip = docker(&["inspect", "--format", &format, container]).await?;
        ip.parse()
            .with_context(|| format!("{container} has no address on {}: {ip:?}", self.network))
    }

    /// GET over HTTPS from the coordinator, verified against the suite's CA under the
    /// coordinator's container name (dialled at its current address).
    pub async fn get(&self, path: &str) -> Result<String> {
        let ip = self.ip(&self.coord).await?;
        let client = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem.as_bytes())?)
            .resolve(&self.coord, (ip, COORD_PORT).into())
            .timeout(Duration::from_secs(10))
            .build()?;
        let url = format!("https://{}:{COORD_PORT}{path}", self.coord);
        let resp = client.get(&url).send().await.with_context(|| url.clone())?;
        let status = resp.status();
        let body = resp.text().await?;
        if !status.is_success() {
            bail!("GET {path}: {status}: {body}");
        }
        Ok(body)
    }

    pub async fn status(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.get("/api/status").await?)?)
    }

    /// Hostnames of the reverse buildlets the coordinator has connected.
    pub async fn connected_reverse(&self) -> Result<Vec<String>> {
        let s = self.status().await?;
        Ok(s["reverse_hosts"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|h| h["hostname"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    pub async fn wait_reverse_connected(&self, names: &[String], limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let connected = self.connected_reverse().await.unwrap_or_default();
            if names.iter().all(|n| connected.contains(n)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let mut logs = String::new();
                for n in names {
                    logs.push_str(&format!("--- {n}:\n{}\n", self.logs(n).await));
                }
                bail!(
                    "reverse buildlets {names:?} not connected in {limit:?} (connected: {connected:?})\n{logs}"
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The marker of a scenario's `i`th commit (unique per run).
    pub fn marker(&self, scenario: &str, i: usize) -> String {
        format!("{scenario}-{}-{i}", self.id)
    }

    /// The reverse buildlet of the disk-full scenario.
    pub fn disk_full_name(&self) -> String {
        format!("buildfarm-chaos-full-{}", self.id)
    }

    /// The last lines of a container's log (for failure messages).
    pub async fn logs(&self, container: &str) -> String {
        match tokio::process::Command::new("docker")
            .args(["logs", "--tail", "60", container])
            .output()
            .await
        {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("(docker logs: {e})"),
        }
    }

    /// Containers of the docker pool (the listen-mode buildlets) running now.
    pub async fn listen_buildlets(&self) -> Result<Vec<String>> {
        let out = docker(&[
            "ps",
            "--filter",
            &format!("network={}", self.network),
            "--filter",
            &format!("name=buildfarm-{LISTEN_HOST_TYPE}"),
            "--format",
            "{{.Names}}",
        ])
        .await?;
        Ok(out.lines().map(str::to_owned).collect())
    }
}

/// Commits `marker` to the polled repo; returns the commit's hash.
pub fn commit(repo: &Path, marker: &str) -> Result<String> {
    std::fs::write(repo.join("marker"), format!("{marker}\n"))?;
    git(repo, &["commit", "--quiet", "-am", marker])?;
    git(repo, &["rev-parse", "HEAD"])
}

pub fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("git")
        .args([
            "-c",
            "user.name=chaos",
            "-c",
            "user.email=chaos@example.com",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .context("running git")?;
    if !out.status.success() {
        bail!("git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl Drop for ChaosFarm {
    fn drop(&mut self) {
        // Synchronous: drop may run outside the runtime. Everything on the network (the
        // docker pool's containers too) goes first, then the network.
        let _ = std::process::Command::new("sh")
            .arg("-c")
            .arg("ids=$(docker ps -aq --filter network=\"$1\"); [ -z \"$ids\" ] || docker rm -f $ids >/dev/null; docker network rm \"$1\" >/dev/null")
            .arg("sh")
            .arg(&self.network)
            .status();
    }
}
