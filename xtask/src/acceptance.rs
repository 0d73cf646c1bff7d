//! `cargo xtask acceptance`: the Go farm's own workload, measured end to end on Debian's
//! Go 1.19 source (made into a git repo here), each figure against a reference measured
//! in the same run:
//!
//! - make.bash through the farm (the toolchain builder's make step on a local buildlet)
//!   against make.bash run directly on a clone of the same tree (goal: ≤ 1.03×);
//! - a named subset of `go tool dist test` over N buildlets (the first plus helpers
//!   restored from the make.bash snapshot) against the same subset on one buildlet,
//!   with the speed-up per core available;
//! - a real module's (Debian's go-cmp) build with a warm checksum-keyed cache against
//!   its first build, cold.
//!
//! Like `bench`, it builds the release binaries and re-runs itself in release mode
//! (`acceptance-inner`). Takes tens of minutes on two cores (two make.bash runs).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use buildfarm_store::Store;

use super::bench_farm::{start_coordinator, wait_final_by};

const GO_SRC: &str = "/usr/share/go-1.19";
const BOOTSTRAP: &str = "/usr/lib/go-1.19";
const CMP_SRC: &str = "/usr/share/gocode/src/github.com/google/go-cmp";
/// Buildlets sharing the dist tests in the sharded run.
const SHARDS: u32 = 3;
/// A named subset of Go 1.19's dist tests: std packages whose tests take seconds.
const DIST_UNITS: [&str; 12] = [
    "go_test:bufio",
    "go_test:bytes",
    "go_test:container/heap",
    "go_test:container/list",
    "go_test:encoding/base64",
    "go_test:encoding/csv",
    "go_test:errors",
    "go_test:path",
    "go_test:sort",
    "go_test:strconv",
    "go_test:text/tabwriter",
    "go_test:unicode/utf8",
];
const MAKE_WAIT: Duration = Duration::from_secs(60 * 60);

/// `cargo xtask acceptance`: release binaries, then the measurements in release mode.
pub fn run(root: &Path) -> Result<()> {
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
    ]);
    super::run("release build", build)?;
    let bin = super::target_dir(root).join("release");
    let mut inner = Command::new(bin.join("xtask"));
    inner.current_dir(root).arg("acceptance-inner");
    super::run("acceptance", inner)
}

/// One line of the table.
struct Row {
    name: &'static str,
    farm: f64,
    reference: f64,
    ratio: f64,
    goal: &'static str,
    note: String,
}

pub fn inner(root: &Path) -> Result<()> {
    for (p, pkg) in [
        (
            format!("{GO_SRC}/src/make.bash"),
            "golang-1.19-src (golang-go)",
        ),
        (
            format!("{CMP_SRC}/go.mod"),
            "golang-github-google-go-cmp-dev",
        ),
    ] {
        if !Path::new(&p).exists() {
            bail!("{p} is missing: sudo apt-get install {pkg}");
        }
    }
    buildfarm_tls::install_crypto_provider();
    let out = super::target_dir(root).join("acceptance");
    std::fs::create_dir_all(&out)?;
    let tmp = tempfile::tempdir_in(&out)?;
    let release = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .to_path_buf();
    let rt = tokio::runtime::Runtime::new()?;
    let rows = rt.block_on(measure(&release, tmp.path()))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("\nacceptance on {cores} cores ({})", std::env::consts::ARCH);
    println!(
        "{:<30} {:>10} {:>10} {:>8} {:>8}  note",
        "figure", "farm", "reference", "ratio", "goal"
    );
    for r in &rows {
        println!(
            "{:<30} {:>9.1}s {:>9.1}s {:>8.3} {:>8}  {}",
            r.name, r.farm, r.reference, r.ratio, r.goal, r.note
        );
    }
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "name": r.name, "farm_s": r.farm, "reference_s": r.reference,
                "ratio": r.ratio, "goal": r.goal, "note": r.note,
            })
        })
        .collect();
    let path = out.join("acceptance.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    println!("figures written to {}", path.display());
    Ok(())
}

fn sh(what: &str, cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=acceptance",
            "-c",
            "user.email=acceptance@localhost",
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

/// `src` copied into `dir` and committed; the Go tree gets the VERSION its build needs.
fn import(src: &str, dir: &Path, go_version: Option<&str>) -> Result<String> {
    std::fs::create_dir_all(dir)?;
    sh(
        "copying the source",
        Command::new("cp").args(["-a", &format!("{src}/."), &dir.display().to_string()]),
    )?;
    if let Some(v) = go_version {
        std::fs::write(dir.join("VERSION"), format!("{v}\n"))?;
    }
    git(dir, &["init", "--quiet", "--initial-branch=main"])?;
    git(dir, &["-c", "core.compression=1", "add", "-A"])?;
    git(dir, &["commit", "--quiet", "-m", "import"])?;
    git(dir, &["rev-parse", "HEAD"])
}

/// The log of `builder`'s build of `rev` once it is final (waiting up to `within`); an
/// error, with the log, unless it passed.
async fn passed_log(
    store: &Arc<dyn Store>,
    repo: &str,
    rev: &str,
    builder: &str,
    within: Duration,
) -> Result<String> {
    let poll = Duration::from_millis(500);
    let b = wait_final_by(store, repo, rev, Some(builder), poll, within).await?;
    let log = store.get_log(&b.id).await?.unwrap_or_default();
    let log = String::from_utf8_lossy(&log).into_owned();
    if b.state != buildfarm_store::BuildState::Ok {
        bail!("{} ended {} ({:?}):\n{log}", b.builder, b.state, b.summary);
    }
    Ok(log)
}

/// Seconds from a `[buildfarm] <prefix><secs>s` note of a build log.
fn seconds(log: &str, prefix: &str) -> Result<f64> {
    log.lines()
        .find_map(|l| l.strip_prefix("[buildfarm] ")?.strip_prefix(prefix))
        .and_then(|rest| rest.trim_end_matches('s').parse().ok())
        .ok_or_else(|| anyhow!("no `{prefix}` note in the log:\n{log}"))
}

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "amd64",
    }
}

fn farm_config(data: &Path, go: &Path, dist_shards: u32) -> String {
    let a = arch();
    let units = DIST_UNITS
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"
[coordinator]
listen = "127.0.0.1:0"
data_dir = "{data}"
repo_poll_interval = "1h"
max_attempts = 1

[[host_types]]
name = "local"
pool = {{ kind = "local", count = {SHARDS} }}

[[builders]]
name = "linux-{a}-toolchain"
host_type = "local"
build_timeout = "60m"
env = {{ GOROOT_BOOTSTRAP = "{BOOTSTRAP}" }}
[[builders.steps]]
name = "make"
command = ["sh", "-c", "cd src && exec ./make.bash"]
snapshot = "src"
timeout = "60m"

[[builders]]
name = "linux-{a}-dist{dist_shards}"
host_type = "local"
test_shards = {dist_shards}
build_timeout = "60m"
[[builders.steps]]
name = "test"
toolchain = {{ builder = "linux-{a}-toolchain", step = "make" }}
units = "dist-test"
only_units = [{units}]
path = ["$WORKDIR/src/bin", "$PATH"]
command = ["go", "tool", "dist", "test", "-no-rebuild"]

[[repos]]
name = "go"
url = "{go}"
branches = ["main"]
"#,
        data = data.display(),
        go = go.display(),
    )
}

async fn measure(release: &Path, tmp: &Path) -> Result<Vec<Row>> {
    let version = std::fs::read_to_string(Path::new(BOOTSTRAP).join("VERSION"))?;
    let version = version.lines().next().unwrap_or("go1.19").trim().to_owned();
    let go = tmp.join("go");
    eprintln!("acceptance: importing {GO_SRC} as a git repo");
    let rev = import(GO_SRC, &go, Some(&version))?;
    let mut rows = Vec::new();

    // make.bash directly, on a clone of the same commit with a fresh GOCACHE as a
    // buildlet has, side by side with the farm's so both see the same machine load
    // (other work on a shared machine would skew two runs one after the other).
    let direct = tmp.join("direct-go");
    git(
        tmp,
        &["clone", "--quiet", &go.display().to_string(), "direct-go"],
    )?;
    let gocache = tmp.join("direct-gocache");
    eprintln!("acceptance: make.bash directly and through the farm, side by side");
    let direct_run = {
        let mut cmd = tokio::process::Command::new("./make.bash");
        cmd.current_dir(direct.join("src"))
            .env("GOROOT_BOOTSTRAP", BOOTSTRAP)
            .env("GOCACHE", &gocache)
            .env_remove("GOROOT")
            .kill_on_drop(true);
        async move {
            let t = Instant::now();
            let out = cmd.output().await.context("starting make.bash")?;
            if !out.status.success() {
                bail!(
                    "make.bash failed: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(t.elapsed().as_secs_f64())
        }
    };
    let direct_run = tokio::spawn(direct_run);

    // Through the farm: the toolchain, then the dist tests over SHARDS buildlets.
    let data = tmp.join("data");
    let running = start_coordinator(release, &farm_config(&data, &go, SHARDS)).await?;
    let result = async {
        let store = running.farm.store();
        let tc_log = passed_log(
            store,
            "go",
            &rev,
            &format!("linux-{}-toolchain", arch()),
            MAKE_WAIT,
        )
        .await?;
        let dist_log = passed_log(
            store,
            "go",
            &rev,
            &format!("linux-{}-dist{SHARDS}", arch()),
            MAKE_WAIT,
        )
        .await?;
        Ok::<_, anyhow::Error>((tc_log, dist_log))
    }
    .await;
    running.stop(Duration::from_secs(10)).await;
    let direct_make = direct_run.await.context("make.bash task")??;
    let _ = std::fs::remove_dir_all(&direct);
    let (tc_log, dist_log) = result?;
    let farm_make = seconds(&tc_log, "step make: command took ")?;
    let make_step = seconds(&tc_log, "step make passed in ")?;
    let dist_n = seconds(&dist_log, "step test passed in ")?;
    rows.push(Row {
        name: "make.bash",
        farm: farm_make,
        reference: direct_make,
        ratio: farm_make / direct_make,
        goal: "<= 1.03",
        note: "the make step's command on a local buildlet vs make.bash on a clone, side by side"
            .into(),
    });
    rows.push(Row {
        name: "make step, all in",
        farm: make_step,
        reference: direct_make,
        ratio: make_step / direct_make,
        goal: "-",
        note: "plus pushing the source and saving the GOROOT snapshot".into(),
    });

    // The same dist tests on one buildlet (a restart adds that builder; the toolchain
    // published above is restored, not rebuilt).
    eprintln!("acceptance: the same dist tests on one buildlet");
    let running = start_coordinator(release, &farm_config(&data, &go, 1)).await?;
    let result = async {
        let store = running.farm.store();
        let log = passed_log(
            store,
            "go",
            &rev,
            &format!("linux-{}-dist1", arch()),
            MAKE_WAIT,
        )
        .await?;
        Ok::<_, anyhow::Error>(log)
    }
    .await;
    running.stop(Duration::from_secs(10)).await;
    let dist_1 = seconds(&result?, "step test passed in ")?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let speedup = dist_1 / dist_n;
    let usable = (SHARDS as usize).min(cores) as f64;
    rows.push(Row {
        name: "dist test over helpers",
        farm: dist_n,
        reference: dist_1,
        ratio: speedup,
        goal: "-",
        note: format!(
            "{} dist tests on {SHARDS} buildlets vs 1: speed-up {speedup:.2}x, {:.2} per core used ({usable} of {cores} cores)",
            DIST_UNITS.len(),
            speedup / usable
        ),
    });

    // A module's build, cold then with the cache its first build saved.
    eprintln!("acceptance: go-cmp cold and warm");
    let cmp = tmp.join("cmp");
    let cmp_rev = import(CMP_SRC, &cmp, None)?;
    let cmp_config = format!(
        r#"
[coordinator]
listen = "127.0.0.1:0"
data_dir = "{data}"
repo_poll_interval = "1h"
max_attempts = 1

[[host_types]]
name = "local"
pool = {{ kind = "local", count = 1 }}

[[builders]]
name = "linux-{a}-cmp"
host_type = "local"
[[builders.steps]]
name = "test"
command = ["go", "test", "-count=1", "./..."]
cache = {{ key_files = ["go.mod", "go.sum"], paths = ["gocache"] }}

[[repos]]
name = "cmp"
url = "{cmp}"
branches = ["main"]
"#,
        data = tmp.join("cmp-data").display(),
        cmp = cmp.display(),
        a = arch(),
    );
    let running = start_coordinator(release, &cmp_config).await?;
    let result = async {
        let store = running.farm.store();
        let builder = format!("linux-{}-cmp", arch());
        let cold_log = passed_log(store, "cmp", &cmp_rev, &builder, MAKE_WAIT).await?;
        std::fs::write(cmp.join("ACCEPTANCE.txt"), "a second commit\n")?;
        git(&cmp, &["add", "-A"])?;
        git(&cmp, &["commit", "--quiet", "-m", "second"])?;
        let rev2 = git(&cmp, &["rev-parse", "HEAD"])?;
        coordinator::poller::poll_once(&running.farm).await;
        let warm_log = passed_log(store, "cmp", &rev2, &builder, MAKE_WAIT).await?;
        if !warm_log.contains(": hit, restored gocache") {
            bail!("the second build missed its cache:\n{warm_log}");
        }
        Ok::<_, anyhow::Error>((
            seconds(&cold_log, "step test passed in ")?,
            seconds(&warm_log, "step test passed in ")?,
        ))
    }
    .await;
    running.stop(Duration::from_secs(10)).await;
    let (cold, warm) = result?;
    rows.push(Row {
        name: "module, warm cache",
        farm: warm,
        reference: cold,
        ratio: warm / cold,
        goal: "-",
        note: "go-cmp `go test ./...` step with its gocache restored (hit) vs the first build (miss, saves it)".into(),
    });
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_seconds_are_read_from_the_log_notes() {
        let log = "x\n[buildfarm] step make: command took 123.4s\n[buildfarm] step make passed in 130.0s\n";
        assert_eq!(seconds(log, "step make: command took ").unwrap(), 123.4);
        assert_eq!(seconds(log, "step make passed in ").unwrap(), 130.0);
        assert!(seconds(log, "step test passed in ").is_err());
    }

    #[test]
    fn the_farm_config_parses_for_both_runs() {
        for shards in [SHARDS, 1] {
            let text = farm_config(Path::new("/tmp/d"), Path::new("/tmp/go"), shards);
            buildfarm_config::Config::from_toml_str(&text, "acceptance.toml").unwrap();
        }
    }
}
