//! Go toolchain builders end to end, on Debian's Go 1.19 source made into a git repo: one
//! farm, one `make.bash` shared by three builders. The toolchain builder builds Go
//! (bootstrapped with the host's Go), snapshots the GOROOT and runs a named subset of
//! `go tool dist test` sharded over helpers restored from that snapshot, with the same
//! verdict per test as `dist test` run directly on the same toolchain; a misc-compile
//! builder cross-builds the toolchain for a second GOARCH from the snapshot; a subrepo
//! builder tests a real module (Debian's go-cmp) against the snapshot of the Go commit it
//! pairs with, with the same verdict per package as `go test` run directly, and the
//! dashboard shows the pairing. Slow (one make.bash): on with `BUILDFARM_SLOW_TESTS=1`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Debian's `golang-1.19-src` (installed with `golang-go`).
const GO_SRC: &str = "/usr/share/go-1.19";
/// The Go that bootstraps the build (`GOROOT_BOOTSTRAP`); its VERSION names the source's.
const BOOTSTRAP: &str = "/usr/lib/go-1.19";
/// Debian's `golang-github-google-go-cmp-dev`: a real module with several packages.
const CMP_SRC: &str = "/usr/share/gocode/src/github.com/google/go-cmp";
/// make.bash takes minutes on two shared cores.
const TOOLCHAIN_WAIT: Duration = Duration::from_secs(25 * 60);

/// The dist tests run: small packages, one of which fails on purpose (see below).
const DIST_UNITS: [&str; 5] = [
    "go_test:container/list",
    "go_test:container/ring",
    "go_test:errors",
    "go_test:sort",
    "go_test:unicode/utf8",
];

fn slow_tests_on() -> bool {
    if std::env::var("BUILDFARM_SLOW_TESTS").as_deref() == Ok("1") {
        return true;
    }
    eprintln!("skipped: set BUILDFARM_SLOW_TESTS=1 to build Go with the farm (minutes)");
    false
}

fn host_goarch() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "amd64",
    }
}

/// A GOARCH other than the host's, and its ELF `e_machine` bytes as `od -tx1` prints them.
fn other_goarch() -> (&'static str, &'static str) {
    match host_goarch() {
        "arm64" => ("amd64", "3e 00"),
        _ => ("arm64", "b7 00"),
    }
}

fn sh(cmd: &str, dir: &Path) {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .current_dir(dir)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Debian's Go source as a git repo with one commit: a VERSION that marks the toolchain
/// as this farm's, and a test that fails on purpose in container/ring.
fn make_go_repo(dir: &Path) -> String {
    assert!(
        Path::new(GO_SRC).join("src/make.bash").exists(),
        "{GO_SRC} is missing: install Debian's golang-1.19-src (with golang-go)"
    );
    std::fs::create_dir_all(dir).expect("mkdir");
    sh(&format!("cp -a {GO_SRC}/. {}", dir.display()), dir);
    let version = std::fs::read_to_string(Path::new(BOOTSTRAP).join("VERSION")).expect("VERSION");
    let version = version.lines().next().unwrap_or("go1.19").trim().to_owned();
    std::fs::write(dir.join("VERSION"), format!("{version}-buildfarm\n")).expect("VERSION");
    std::fs::write(
        dir.join("src/container/ring/farm_fail_test.go"),
        "package ring\n\nimport \"testing\"\n\nfunc TestFarmFailsOnPurpose(t *testing.T) {\n\tt.Fatal(\"container/ring fails on purpose\")\n}\n",
    )
    .expect("write");
    git(dir, &["init", "--quiet", "--initial-branch=main"]);
    git(dir, &["-c", "core.compression=1", "add", "-A"]);
    // No automatic gc: with this many loose objects the commit would start one in the
    // background, packing and deleting objects while the coordinator's clone copies them.
    git(
        dir,
        &[
            "-c",
            "gc.auto=0",
            "commit",
            "--quiet",
            "-m",
            "Go 1.19 from Debian's source",
        ],
    );
    git(dir, &["rev-parse", "HEAD"])
}

fn make_module_repo(dir: &Path) -> String {
    assert!(
        Path::new(CMP_SRC).join("go.mod").exists(),
        "{CMP_SRC} is missing: install Debian's golang-github-google-go-cmp-dev"
    );
    std::fs::create_dir_all(dir).expect("mkdir");
    sh(&format!("cp -a {CMP_SRC}/. {}", dir.display()), dir);
    git(dir, &["init", "--quiet", "--initial-branch=main"]);
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "--quiet", "-m", "go-cmp from Debian"]);
    git(dir, &["rev-parse", "HEAD"])
}

fn config(data: &Path, go: &Path, cmp: &Path) -> String {
    let arch = host_goarch();
    let (cross, _) = other_goarch();
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
repo_poll_interval = "1s"
max_attempts = 2

[[host_types]]
name = "local"
pool = {{ kind = "local", count = 4 }}

# Builds Go with the host's Go, then runs dist tests over 3 buildlets.
[[builders]]
name = "linux-{arch}-toolchain"
host_type = "local"
repos = ["go"]
test_shards = 3
build_timeout = "40m"
env = {{ GOROOT_BOOTSTRAP = "{BOOTSTRAP}" }}
[[builders.steps]]
name = "make"
command = ["sh", "-c", "cd src && exec ./make.bash"]
snapshot = "src"
timeout = "30m"
[[builders.steps]]
name = "test"
requires = ["make"]
units = "dist-test"
only_units = [{units}]
path = ["$WORKDIR/src/bin", "$PATH"]
command = ["go", "tool", "dist", "test", "-no-rebuild"]

# Cross-builds the toolchain's go command for another GOARCH from that snapshot.
[[builders]]
name = "linux-{cross}-misccompile"
host_type = "local"
repos = ["go"]
build_timeout = "40m"
[[builders.steps]]
name = "build"
toolchain = {{ builder = "linux-{arch}-toolchain", step = "make" }}
path = ["$WORKDIR/src/bin", "$PATH"]
env = {{ GOOS = "linux", GOARCH = "{cross}" }}
command = ["sh", "-c", "go build -o ../out/ cmd/go && echo machine: $(od -An -tx1 -j18 -N2 ../out/go)"]

# Tests the module against the toolchain of go's main branch.
[[builders]]
name = "linux-{arch}-cmp"
host_type = "local"
repos = ["cmp"]
test_shards = 2
build_timeout = "40m"
[[builders.steps]]
name = "test"
units = "go-packages"
toolchain = {{ builder = "linux-{arch}-toolchain", step = "make", dir = "goroot" }}
path = ["$WORKDIR/goroot/bin", "$PATH"]
command = ["sh", "-c", "go version && exec go test -count=1 \"$@\"", "go-test"]

[[repos]]
name = "go"
url = "{go}"
branches = ["main"]

[[repos]]
name = "cmp"
url = "{cmp}"
branches = ["main"]
go = {{ repo = "go", branch = "main" }}
"#,
        data = data.display(),
        go = go.display(),
        cmp = cmp.display(),
    )
}

/// The final build of `rev` on `builder`, waiting up to [`TOOLCHAIN_WAIT`].
async fn final_build(farm: &TestFarm, repo: &str, rev: &str, builder: &str) -> serde_json::Value {
    let deadline = Instant::now() + TOOLCHAIN_WAIT;
    loop {
        let v = farm
            .get_json(&format!("/api/builds?repo={repo}&rev={rev}"))
            .await;
        if let Some(b) = v.as_array().and_then(|a| {
            a.iter().find(|b| {
                b["builder"] == builder
                    && !matches!(b["state"].as_str(), Some("queued" | "running"))
            })
        }) {
            return b.clone();
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {builder} on {repo}@{rev}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn log_of(farm: &TestFarm, b: &serde_json::Value) -> String {
    farm.get_text(&format!("/log/{}", b["id"].as_str().expect("id")))
        .await
}

/// Per unit, in log order: (unit, passed, buildlet), from the farm's unit headers.
fn farm_units(log: &str) -> Vec<(String, bool, String)> {
    log.lines()
        .filter_map(|l| l.strip_prefix("[buildfarm] unit "))
        .filter_map(|rest| {
            let (unit, rest) = rest.split_once(": ")?;
            let (verdict, rest) = rest.split_once(' ')?;
            let buildlet = rest.split(" on ").nth(1)?.split(',').next()?.to_owned();
            Some((unit.to_owned(), verdict == "ok", buildlet))
        })
        .collect()
}

/// Per package of `module`: passed or not, from `go test` output lines.
fn go_test_verdicts(out: &str, module: &str) -> BTreeMap<String, bool> {
    let mut v = BTreeMap::new();
    for line in out.lines() {
        let mut words = line.split_whitespace();
        let (Some(first), Some(pkg)) = (words.next(), words.next()) else {
            continue;
        };
        if !pkg.starts_with(module) {
            continue;
        }
        match first {
            "ok" | "?" => v.insert(pkg.to_owned(), true),
            "FAIL" => v.insert(pkg.to_owned(), false),
            _ => None,
        };
    }
    v
}

/// `go test ./...` run directly with the host's Go.
fn direct_go_test(dir: &Path) -> BTreeMap<String, bool> {
    let cache = tempfile::tempdir().expect("gocache");
    let out = Command::new("go")
        .args(["test", "-count=1", "./..."])
        .current_dir(dir)
        .env("GOCACHE", cache.path())
        .env("GOFLAGS", "-mod=mod")
        .output()
        .expect("go test");
    go_test_verdicts(
        &String::from_utf8_lossy(&out.stdout),
        "github.com/google/go-cmp",
    )
}

/// Each dist test run directly (`go tool dist test -no-rebuild NAME`) on `goroot`.
fn direct_dist_tests(goroot: &Path) -> BTreeMap<String, bool> {
    let cache = tempfile::tempdir().expect("gocache");
    let path = format!(
        "{}:{}",
        goroot.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    DIST_UNITS
        .iter()
        .map(|u| {
            let st = Command::new(goroot.join("bin/go"))
                .args(["tool", "dist", "test", "-no-rebuild", u])
                .current_dir(goroot.join("src"))
                .env("PATH", &path)
                .env("GOCACHE", cache.path())
                .env_remove("GOROOT")
                .output()
                .expect("dist test");
            ((*u).to_owned(), st.status.success())
        })
        .collect()
}

/// The snapshot a log says was saved of `dir`, extracted into `into`.
fn extract_snapshot(log: &str, data: &Path, into: &Path) -> PathBuf {
    let digest = log
        .lines()
        .find_map(|l| l.strip_prefix("[buildfarm] snapshot of src/ saved: sha256:"))
        .and_then(|r| r.split_whitespace().next())
        .expect("snapshot note")
        .to_owned();
    let blob = data.join(format!("workspaces/blobs/{digest}.tar.gz"));
    std::fs::create_dir_all(into).expect("mkdir");
    sh(
        &format!("tar -xzf {} -C {}", blob.display(), into.display()),
        into,
    );
    into.to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_make_bash_serves_dist_tests_misc_compile_and_a_subrepo() {
    if !slow_tests_on() {
        return;
    }
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (go, cmp, data) = (
        tmp.path().join("go"),
        tmp.path().join("cmp"),
        tmp.path().join("data"),
    );
    let go_rev = make_go_repo(&go);
    let cmp_rev = make_module_repo(&cmp);
    let direct_cmp = direct_go_test(&cmp);
    assert!(direct_cmp.len() >= 4, "go-cmp has packages: {direct_cmp:?}");
    let cfg = tmp.path().join("coordinator.toml");
    std::fs::write(&cfg, config(&data, &go, &cmp)).expect("config");
    eprintln!("fixtures ready after {:.0?}", started.elapsed());

    let farm = TestFarm::start(&cfg, &data).await;
    let arch = host_goarch();
    let (cross, machine) = other_goarch();
    let toolchain_builder = format!("linux-{arch}-toolchain");

    // The subrepo pairs with the Go commit as soon as make.bash is snapshotted.
    let sub = final_build(&farm, "cmp", &cmp_rev, &format!("linux-{arch}-cmp")).await;
    let sub_log = log_of(&farm, &sub).await;
    eprintln!("subrepo build final after {:.0?}", started.elapsed());
    let farm_cmp: BTreeMap<String, bool> = farm_units(&sub_log)
        .into_iter()
        .map(|u| (u.0, u.1))
        .collect();
    assert_eq!(farm_cmp, direct_cmp, "{sub_log}");
    let want_state = if direct_cmp.values().all(|ok| *ok) {
        "ok"
    } else {
        "failed"
    };
    assert_eq!(sub["state"], want_state, "{sub:#}\n{sub_log}");
    assert!(
        sub_log.contains(&format!(
            "toolchain: Go commit {go_rev} of go, built by step make of {toolchain_builder}"
        )),
        "{sub_log}"
    );
    assert!(
        sub_log.contains("into goroot/"),
        "restored beside the module: {sub_log}"
    );
    // Every unit ran the farm's toolchain, not the host's Go.
    let versions = sub_log
        .lines()
        .filter(|l| l.starts_with("go version go1.19") && l.contains("-buildfarm"))
        .count();
    assert_eq!(versions, farm_cmp.len(), "{sub_log}");
    // The pairing is recorded and shown.
    let sub_id = sub["id"].as_str().expect("id");
    let detail = farm.get_json(&format!("/api/builds/{sub_id}")).await;
    assert_eq!(detail["go_rev"], go_rev, "{detail:#}");
    let dash = farm
        .get_json("/dashboard?repo=cmp&branch=main&format=json")
        .await;
    let cell = &dash["rows"][0]["cells"][0];
    assert_eq!(cell["go_rev"], go_rev, "{dash:#}");
    let html = farm.get_text("/dashboard?repo=cmp&branch=main").await;
    assert!(
        html.contains(&format!("go <code>{}</code>", &go_rev[..10])),
        "{html}"
    );
    let page = farm.get_text(&format!("/build/{sub_id}")).await;
    assert!(
        page.contains(&format!("built from Go commit <code>{go_rev}</code>")),
        "{page}"
    );

    // misc-compile: the go command for the second GOARCH, built from the snapshot.
    let misc = final_build(&farm, "go", &go_rev, &format!("linux-{cross}-misccompile")).await;
    let misc_log = log_of(&farm, &misc).await;
    eprintln!("misc-compile build final after {:.0?}", started.elapsed());
    assert_eq!(misc["state"], "ok", "{misc_log}");
    assert!(
        misc_log.contains(&format!("restored the toolchain of go at {go_rev}")),
        "{misc_log}"
    );
    assert!(
        misc_log.contains(&format!("machine: {machine}")),
        "an ELF for {cross}: {misc_log}"
    );
    assert!(
        !misc_log.contains("Building Go toolchain"),
        "no second make.bash: {misc_log}"
    );

    // The toolchain build: make.bash once, then dist tests over helpers.
    let tc = final_build(&farm, "go", &go_rev, &toolchain_builder).await;
    let tc_log = log_of(&farm, &tc).await;
    eprintln!("toolchain build final after {:.0?}", started.elapsed());
    assert!(
        tc_log.contains("Installed Go for linux/"),
        "make.bash ran: {tc_log}"
    );
    assert_eq!(tc["state"], "failed", "container/ring fails: {tc_log}");
    assert!(
        tc["summary"]
            .as_str()
            .is_some_and(|s| s.contains("1 of 5 units failed: go_test:container/ring")),
        "{tc:#}"
    );
    let units = farm_units(&tc_log);
    let names: Vec<&str> = units.iter().map(|u| u.0.as_str()).collect();
    assert_eq!(
        names, DIST_UNITS,
        "the named subset, in listing order:\n{tc_log}"
    );
    // Helpers join and restore the snapshot; which buildlet runs which shard depends on
    // who is free first (on a loaded 2-core machine the step's own buildlet has run every
    // shard while the helpers were still restoring 159 MB), so that is not asserted here:
    // `plans.rs` checks that shards spread over helpers (small snapshots, restored in time).
    let joined = tc_log.matches("step test: helper ").count();
    let restored = tc_log.matches("restored snapshot ").count();
    assert!(
        joined >= 1 && restored > joined,
        "helpers joined ({joined}) and each restored the snapshot ({restored} restores):\n{tc_log}"
    );
    let farm_dist: BTreeMap<String, bool> = units.iter().map(|u| (u.0.clone(), u.1)).collect();

    // The same tests run directly on the same toolchain agree, unit by unit.
    let goroot = extract_snapshot(&tc_log, &data, &tmp.path().join("goroot"));
    let direct_dist = direct_dist_tests(&goroot);
    assert_eq!(farm_dist, direct_dist, "{tc_log}");
    eprintln!("done after {:.0?}", started.elapsed());
    farm.kill().await;
}
