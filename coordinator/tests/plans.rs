//! Plan builds end to end: a real coordinator, real local buildlets, real git and Go
//! 1.19 on a multi-package module the test writes (some packages fail on purpose).
//! Sharded tests agree with `go test ./...` run directly; a helper killed mid-shard costs
//! only its shard; a snapshot restored on another buildlet is the same tree; caches hit,
//! miss and survive corruption; independent steps run at once and a join waits for both.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use sha2::Digest;

fn host_builder(suffix: &str) -> String {
    let arch = match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "amd64",
    };
    format!("linux-{arch}-{suffix}")
}

/// A `[sandbox]` table making `dir` writable inside sandboxed buildlets (marker files).
fn shared_with_sandbox(dir: &Path) -> String {
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .expect("chmod shared dir");
    format!("\n[sandbox]\nwritable_paths = [\"{}\"]\n", dir.display())
}

fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(p, text).expect("write");
}

/// A module with passing, failing, test-less, broken and (on request) hanging packages.
fn make_module(dir: &Path) -> String {
    std::fs::create_dir_all(dir).expect("mkdir repo");
    git(dir, &["init", "--quiet", "--initial-branch=main"]);
    write(dir, "go.mod", "module example.com/t\n\ngo 1.19\n");
    write(
        dir,
        "t.go",
        "package t\n\n// T is two.\nfunc T() int { return 2 }\n",
    );
    write(
        dir,
        "t_test.go",
        "package t\n\nimport \"testing\"\n\nfunc TestT(t *testing.T) {\n\tif T() != 2 {\n\t\tt.Fatal(\"bad\")\n\t}\n}\n",
    );
    for (pkg, body) in [
        ("a", "if 1+1 != 2 { t.Fatal(\"math\") }"),
        ("b", "t.Fatal(\"package b fails on purpose\")"),
        ("c", "t.Log(\"package c passes\")"),
    ] {
        write(
            dir,
            &format!("{pkg}/{pkg}.go"),
            &format!("package {pkg}\n\n// X is x.\nfunc X() int {{ return 1 }}\n"),
        );
        write(
            dir,
            &format!("{pkg}/{pkg}_test.go"),
            &format!(
                "package {pkg}\n\nimport \"testing\"\n\nfunc TestX(t *testing.T) {{\n\t{body}\n}}\n"
            ),
        );
    }
    write(
        dir,
        "d/d.go",
        "package d\n\n// D has no tests.\nfunc D() {}\n",
    );
    write(
        dir,
        "e/e.go",
        "package e\n\n// E builds, its test does not.\nfunc E() {}\n",
    );
    write(
        dir,
        "e/e_test.go",
        "package e\n\nimport \"testing\"\n\nfunc TestE(t *testing.T) { undefinedName() }\n",
    );
    write(
        dir,
        "hang/hang_test.go",
        "package hang\n\nimport (\n\t\"os\"\n\t\"testing\"\n\t\"time\"\n)\n\n\
         // With HANG_MARKER set, the first run creates the marker and hangs.\n\
         func TestHang(t *testing.T) {\n\
         \tm := os.Getenv(\"HANG_MARKER\")\n\
         \tif m == \"\" {\n\t\treturn\n\t}\n\
         \tif _, err := os.Stat(m); err != nil {\n\
         \t\tos.WriteFile(m, []byte(\"x\"), 0o666)\n\
         \t\ttime.Sleep(300 * time.Second)\n\t}\n}\n",
    );
    write(
        dir,
        "hang/doc.go",
        "// Package hang hangs once on request.\npackage hang\n",
    );
    write(
        dir,
        "cmd/hello/main.go",
        "package main\n\nimport \"fmt\"\n\nfunc main() { fmt.Println(\"hello\") }\n",
    );
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "--quiet", "-m", "module"]);
    git(dir, &["rev-parse", "HEAD"])
}

fn commit(dir: &Path, file: &str) -> String {
    write(dir, file, "another commit\n");
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "--quiet", "-m", file]);
    git(dir, &["rev-parse", "HEAD"])
}

fn config(data: &Path, repo: &Path, builders: &str, extra: &str) -> String {
    format!(
        r#"
[coordinator]
listen = "127.0.0.1:0"
data_dir = "{data}"
repo_poll_interval = "1s"
max_attempts = 3

[[host_types]]
name = "local"
pool = {{ kind = "local", count = 4 }}
env = {{ GOFLAGS = "-mod=mod" }}

{builders}

[[repos]]
name = "t"
url = "{repo}"
branches = ["main"]
{extra}
"#,
        data = data.display(),
        repo = repo.display(),
    )
}

struct Setup {
    tmp: tempfile::TempDir,
    repo: std::path::PathBuf,
    data: std::path::PathBuf,
    cfg: std::path::PathBuf,
    rev: String,
}

fn setup(builders: &str, extra: &str) -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = tmp.path().join("repo");
    let data = tmp.path().join("data");
    let rev = make_module(&repo);
    let cfg = tmp.path().join("coordinator.toml");
    std::fs::write(&cfg, config(&data, &repo, builders, extra)).expect("write config");
    Setup {
        tmp,
        repo,
        data,
        cfg,
        rev,
    }
}

/// Gives the local pool `n` buildlets instead of the config's 4.
fn set_local_buildlets(s: &Setup, n: usize) {
    let cfg = std::fs::read_to_string(&s.cfg).expect("config");
    assert!(cfg.contains("count = 4"), "{cfg}");
    std::fs::write(&s.cfg, cfg.replace("count = 4", &format!("count = {n}"))).expect("config");
}

async fn one_build(farm: &TestFarm, rev: &str) -> (serde_json::Value, String) {
    let builds = farm.wait_final_builds("t", rev, 1).await;
    let b = builds[0].clone();
    let log = farm
        .get_text(&format!("/log/{}", b["id"].as_str().expect("id")))
        .await;
    (b, log)
}

/// Per package: passed or not, from `go test` output lines (`ok`, `FAIL`, `?`).
fn go_test_verdicts(out: &str) -> BTreeMap<String, bool> {
    let mut v = BTreeMap::new();
    for line in out.lines() {
        let mut words = line.split_whitespace();
        let (Some(first), Some(pkg)) = (words.next(), words.next()) else {
            continue;
        };
        if !pkg.starts_with("example.com/t") {
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

fn run_go(dir: &Path, args: &[&str]) -> String {
    let cache = tempfile::tempdir().expect("gocache");
    let out = std::process::Command::new("go")
        .args(args)
        .current_dir(dir)
        .env("GOCACHE", cache.path())
        .env("GOFLAGS", "-mod=mod")
        .output()
        .expect("run go");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const SHARDED: &str = r#"
[[builders]]
name = "{name}"
host_type = "local"
test_shards = 3
env = {{ HANG_MARKER = "{marker}" }}
[[builders.steps]]
name = "build"
command = ["go", "build", "./..."]
snapshot = "src"
[[builders.steps]]
name = "test"
requires = ["build"]
units = "go-packages"
command = ["go", "test", "-count=1"]
cache = {{ key_files = ["go.mod"], paths = ["gocache"] }}
"#;

fn sharded_builder(marker: &str) -> String {
    SHARDED
        .replace("{name}", &host_builder("sharded"))
        .replace("{marker}", marker)
        .replace("{{", "{")
        .replace("}}", "}")
}

#[tokio::test(flavor = "multi_thread")]
async fn sharded_tests_match_a_direct_go_test_run_and_record_durations() {
    let s = setup(&sharded_builder(""), "");
    let direct = go_test_verdicts(&run_go(&s.repo, &["test", "-count=1", "./..."]));
    let listed: Vec<String> = run_go(&s.repo, &["list", "./..."])
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        direct.len(),
        listed.len(),
        "every package has a verdict: {direct:?}"
    );
    assert!(
        !direct["example.com/t/b"] && !direct["example.com/t/e"],
        "{direct:?}"
    );

    let farm = TestFarm::start(&s.cfg, &s.data).await;
    let (b, log) = one_build(&farm, &s.rev).await;
    assert_eq!(b["state"], "failed", "{b:#}\n{log}");
    let summary = b["summary"].as_str().unwrap_or_default();
    assert!(summary.contains("2 of 8 units failed"), "{summary}");

    let units = farm_units(&log);
    let order: Vec<String> = units.iter().map(|u| u.0.clone()).collect();
    assert_eq!(order, listed, "each unit once, in unit order:\n{log}");
    let farm_verdicts: BTreeMap<String, bool> = units.iter().map(|u| (u.0.clone(), u.1)).collect();
    assert_eq!(farm_verdicts, direct, "{log}");
    // Each unit's own output is whole, right under its header.
    let b_at = log
        .find("[buildfarm] unit example.com/t/b: FAIL")
        .expect("b header");
    let next = log[b_at + 1..]
        .find("[buildfarm] unit ")
        .map_or(log.len(), |i| b_at + 1 + i);
    assert!(
        log[b_at..next].contains("package b fails on purpose"),
        "{log}"
    );
    assert!(
        log.contains("8 units in 3 shards (balanced by count)"),
        "{log}"
    );
    let buildlets: std::collections::BTreeSet<&str> = units.iter().map(|u| u.2.as_str()).collect();
    assert!(
        buildlets.len() >= 2,
        "shards ran on helpers too: {buildlets:?}\n{log}"
    );
    assert!(
        log.contains(": saved gocache"),
        "the first buildlet saves the cache: {log}"
    );

    // The next build balances by the durations this one recorded.
    let rev2 = commit(&s.repo, "NOTES");
    let (b2, log2) = one_build(&farm, &rev2).await;
    assert_eq!(b2["state"], "failed", "{log2}");
    assert!(log2.contains("balanced by recorded durations"), "{log2}");
    assert!(log2.contains(": hit, restored gocache"), "{log2}");
    let verdicts2: BTreeMap<String, bool> =
        farm_units(&log2).into_iter().map(|u| (u.0, u.1)).collect();
    assert_eq!(verdicts2, direct, "{log2}");
    farm.kill().await;
    drop(s.tmp);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_helper_killed_mid_shard_reruns_only_its_shard() {
    let shared = tempfile::tempdir().expect("shared");
    let marker = shared.path().join("hang-marker");
    let s = setup(
        &sharded_builder(&marker.display().to_string()),
        &shared_with_sandbox(shared.path()),
    );
    let farm = TestFarm::start(&s.cfg, &s.data).await;
    let running = farm
        .wait_running("t", &s.rev, &host_builder("sharded"))
        .await;
    let id = running["id"].as_str().expect("id").to_owned();
    eventually("the hanging unit", || marker.exists().then_some(())).await;

    // The build page shows the shards live.
    let page = farm.get_json(&format!("/api/builds/{id}")).await;
    let shards = page["shards"].as_array().cloned().unwrap_or_default();
    assert_eq!(shards.len(), 3, "{page:#}");
    assert!(shards.iter().any(|s| s["state"] == "running"), "{page:#}");
    assert!(shards.iter().all(|s| s["step"] == "test"), "{page:#}");
    let html = farm.get_text(&format!("/build/{id}")).await;
    assert!(html.contains("<h2>Shards</h2>"), "{html}");
    // So does the status page, one line per sharded step of each active build.
    let status = farm.get_json("/api/status").await;
    let active = status["active"].as_array().cloned().unwrap_or_default();
    let mine = active
        .iter()
        .find(|a| a["build_id"] == id.as_str())
        .unwrap_or_else(|| panic!("build {id} active: {status:#}"));
    assert_eq!(mine["shards"][0]["step"], "test", "{status:#}");
    assert_eq!(mine["shards"][0]["shards"], 3, "{status:#}");
    assert_eq!(mine["shards"][0]["units"], 8, "{status:#}");
    assert!(
        mine["shards"][0]["running"].as_u64().unwrap_or(0) >= 1,
        "{status:#}"
    );
    let html = farm.get_text("/").await;
    assert!(html.contains("test: 3 shards ("), "{html}");

    let pid = eventually("the buildlet running the hanging unit", || {
        buildlet_pids(&s.data.display().to_string())
            .into_iter()
            .find(|pid| process_tree_contains(*pid, "hang.test"))
    })
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");

    let (b, log) = one_build(&farm, &s.rev).await;
    // Same verdict as without the loss: b and e fail, everything else passes.
    assert_eq!(b["state"], "failed", "{log}");
    let units = farm_units(&log);
    let mut names: Vec<&str> = units.iter().map(|u| u.0.as_str()).collect();
    let n = names.len();
    names.dedup();
    assert_eq!(names.len(), n, "no unit ran twice to completion:\n{log}");
    assert_eq!(n, 8, "{log}");
    let hang = units
        .iter()
        .find(|u| u.0 == "example.com/t/hang")
        .expect("hang unit");
    assert!(hang.1, "the re-run passes: {log}");
    let lost: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("lost with its buildlet"))
        .collect();
    assert_eq!(lost.len(), 1, "one shard lost, once: {log}");
    assert!(
        lost[0].contains("run again alone on another buildlet"),
        "{log}"
    );
    // Only the lost shard ran again: the build kept its one attempt.
    let detail = farm.get_json(&format!("/api/builds/{id}")).await;
    assert_eq!(
        detail["attempts"].as_array().map(Vec::len),
        Some(1),
        "{detail:#}"
    );
    farm.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_restored_on_another_buildlet_is_the_same_tree() {
    let builders = format!(
        r#"
[[builders]]
name = "{name}"
host_type = "local"
[[builders.steps]]
name = "build"
command = ["sh", "-c", "go build -o out/ ./cmd/hello && find . -type f ! -name MANIFEST | LC_ALL=C sort | xargs sha256sum > MANIFEST && echo tree digest: $(sha256sum < MANIFEST)"]
snapshot = "src"
[[builders.steps]]
name = "check"
requires = ["build"]
command = ["sh", "-c", "find . -type f ! -name MANIFEST | LC_ALL=C sort | xargs sha256sum > ../check && cmp ../check MANIFEST && ./out/hello && echo tree digest: $(sha256sum < ../check)"]
"#,
        name = host_builder("snap")
    );
    let s = setup(&builders, "");
    let farm = TestFarm::start(&s.cfg, &s.data).await;
    let (b, log) = one_build(&farm, &s.rev).await;
    assert_eq!(b["state"], "ok", "{log}");
    let digests: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix("tree digest: "))
        .collect();
    assert_eq!(digests.len(), 2, "{log}");
    assert_eq!(
        digests[0], digests[1],
        "the restored tree is the saved one: {log}"
    );
    let started: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix("[buildfarm] step "))
        .filter_map(|l| l.split_once(" started on ").map(|(_, b)| b))
        .collect();
    assert_eq!(started.len(), 2, "{log}");
    assert_ne!(started[0], started[1], "two buildlets: {log}");
    // The coordinator keeps the snapshot under its content digest, and restored that one.
    let saved = log
        .lines()
        .find_map(|l| l.strip_prefix("[buildfarm] snapshot of src/ saved: sha256:"))
        .and_then(|r| r.split_whitespace().next())
        .expect("saved note")
        .to_owned();
    assert!(
        log.contains(&format!(
            "restored snapshot sha256:{saved} of step build into src/"
        )),
        "{log}"
    );
    let blob =
        std::fs::read(s.data.join(format!("workspaces/blobs/{saved}.tar.gz"))).expect("blob");
    assert_eq!(hex::encode(sha2::Sha256::digest(&blob)), saved);
    farm.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn caches_hit_miss_and_corrupt() {
    let builders = format!(
        r#"
[[builders]]
name = "{name}"
host_type = "local"
[[builders.steps]]
name = "test"
command = ["sh", "-c", "if [ -e ../gocache/README ]; then echo gocache was restored; fi; if [ -e NOCACHEWRITE ]; then echo cache left alone; else go test ./a ./c; fi"]
cache = {{ key_files = ["go.mod", "go.sum"], paths = ["gocache"] }}
"#,
        name = host_builder("cached")
    );
    let s = setup(&builders, "");
    let farm = TestFarm::start(&s.cfg, &s.data).await;
    // The step's own line (its command echoes the text too).
    let restored = |log: &str| log.lines().any(|l| l == "gocache was restored");

    let (b, log) = one_build(&farm, &s.rev).await;
    assert_eq!(b["state"], "ok", "{log}");
    assert!(log.contains(": miss"), "first build misses: {log}");
    assert!(log.contains(": saved gocache"), "{log}");
    assert!(!restored(&log), "{log}");

    // A step that leaves the restored cache as it was does not save it again.
    let rev2 = commit(&s.repo, "NOCACHEWRITE");
    let (b, log) = one_build(&farm, &rev2).await;
    assert_eq!(b["state"], "ok", "{log}");
    assert!(log.contains(": hit, restored gocache"), "{log}");
    assert!(restored(&log), "{log}");
    assert!(log.contains("cache left alone"), "{log}");
    assert!(
        !log.contains(": saved"),
        "an unchanged hit is not saved again: {log}"
    );
    assert!(log.contains(": unchanged, not saved again"), "{log}");

    // A hit the step adds to (package a changed: new build and test results in the
    // cache) is saved again under the same key.
    write(
        &s.repo,
        "a/a.go",
        "package a\n\n// X is x, changed.\nfunc X() int { return 1 + 0 }\n",
    );
    std::fs::remove_file(s.repo.join("NOCACHEWRITE")).expect("rm NOCACHEWRITE");
    let rev2b = commit(&s.repo, "NOTES1");
    let (b, log) = one_build(&farm, &rev2b).await;
    assert_eq!(b["state"], "ok", "{log}");
    assert!(log.contains(": hit, restored gocache"), "{log}");
    assert!(
        log.contains(": changed by the step, saving it again"),
        "{log}"
    );
    assert!(log.contains(": saved gocache"), "{log}");

    // Corrupt every stored blob: the next build discards the cache and still passes.
    let blobs = s.data.join("workspaces/blobs");
    for e in std::fs::read_dir(&blobs).expect("blobs dir").flatten() {
        std::fs::write(e.path(), b"not a tarball any more").expect("corrupt");
    }
    let rev3 = commit(&s.repo, "NOTES2");
    let (b, log) = one_build(&farm, &rev3).await;
    assert_eq!(b["state"], "ok", "{log}");
    assert!(log.contains(": corrupt, discarded"), "{log}");
    assert!(!restored(&log), "{log}");
    assert!(log.contains(": saved gocache"), "saved afresh: {log}");

    // A changed key file is a different cache: a miss.
    write(
        &s.repo,
        "go.mod",
        "module example.com/t\n\ngo 1.19\n\n// changed\n",
    );
    let rev4 = commit(&s.repo, "NOTES3");
    let (b, log) = one_build(&farm, &rev4).await;
    assert_eq!(b["state"], "ok", "{log}");
    assert!(log.contains(": miss"), "{log}");
    farm.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn independent_steps_run_at_once_and_a_join_waits_for_both() {
    let shared = tempfile::tempdir().expect("shared");
    let d = shared.path().display().to_string();
    // Each side waits (bounded) for the other to have started: run one after the other,
    // the first would time out and fail the build.
    let side = |me: &str, other: &str| {
        format!(
            "touch {d}/{me}; n=0; while [ ! -e {d}/{other} ]; do sleep 0.1; n=$((n+1)); if [ $n -gt 1500 ]; then echo {other} never started; exit 1; fi; done; sleep 1; touch {d}/{me}.done; echo {me} saw {other}"
        )
    };
    let builders = format!(
        r#"
[[builders]]
name = "{name}"
host_type = "local"
[[builders.steps]]
name = "left"
command = ["sh", "-c", "{left}"]
[[builders.steps]]
name = "right"
command = ["sh", "-c", "{right}"]
[[builders.steps]]
name = "join"
requires = ["left", "right"]
command = ["sh", "-c", "test -e {d}/left.done && test -e {d}/right.done && echo join after both"]
"#,
        name = host_builder("dag"),
        left = side("left", "right"),
        right = side("right", "left"),
    );
    let s = setup(&builders, &shared_with_sandbox(shared.path()));
    let farm = TestFarm::start(&s.cfg, &s.data).await;
    let (b, log) = one_build(&farm, &s.rev).await;
    assert_eq!(b["state"], "ok", "{log}");
    assert!(
        log.contains("left saw right") && log.contains("right saw left"),
        "{log}"
    );
    assert!(log.contains("join after both"), "{log}");
    let at = |needle: &str| {
        log.find(needle)
            .unwrap_or_else(|| panic!("{needle} in {log}"))
    };
    let join_started = at("[buildfarm] step join started");
    assert!(at("[buildfarm] step left passed") < join_started, "{log}");
    assert!(at("[buildfarm] step right passed") < join_started, "{log}");
    farm.kill().await;
}

/// Waits until no buildlet of this farm runs: every lease was released.
async fn all_buildlets_released(data: &Path) {
    eventually("every buildlet to be released", || {
        buildlet_pids(&data.display().to_string())
            .is_empty()
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_step_stops_its_sibling_and_releases_every_buildlet() {
    let shared = tempfile::tempdir().expect("shared");
    let d = shared.path().display().to_string();
    let builders = format!(
        r#"
[[builders]]
name = "{name}"
host_type = "local"
[[builders.steps]]
name = "slow"
command = ["sh", "-c", "touch {d}/slow; sleep 291"]
[[builders.steps]]
name = "broken"
command = ["sh", "-c", "while [ ! -e {d}/slow ]; do sleep 0.1; done; echo broken on purpose; exit 3"]
[[builders.steps]]
name = "never"
requires = ["slow", "broken"]
command = ["touch", "{d}/never"]
"#,
        name = host_builder("fails"),
    );
    let s = setup(&builders, &shared_with_sandbox(shared.path()));
    let farm = TestFarm::start(&s.cfg, &s.data).await;
    let (b, log) = one_build(&farm, &s.rev).await;
    assert_eq!(b["state"], "failed", "{log}");
    assert!(
        b["summary"]
            .as_str()
            .is_some_and(|x| x.contains("step broken exited with status 3")),
        "{b:#}"
    );
    assert!(log.contains("broken on purpose"), "{log}");
    assert!(!shared.path().join("never").exists(), "{log}");
    // The sibling's buildlet (sleeping 291 s) was released with the build.
    all_buildlets_released(&s.data).await;
    farm.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_sharded_build_releases_its_buildlet_and_helpers() {
    let shared = tempfile::tempdir().expect("shared");
    let marker = shared.path().join("hang-marker");
    // Post-submit builds only for a branch the repo lacks: the one build is the try run.
    let builder = sharded_builder(&marker.display().to_string()).replace(
        "test_shards = 3",
        "test_shards = 3\nbranches = [\"release\"]",
    );
    let s = setup(&builder, &shared_with_sandbox(shared.path()));
    let cfg = std::fs::read_to_string(&s.cfg).expect("config");
    std::fs::write(
        &s.cfg,
        cfg.replace(
            "branches = [\"main\"]",
            "branches = [\"main\", \"release\"]",
        ),
    )
    .expect("config");
    let farm = TestFarm::start(&s.cfg, &s.data).await;
    let name = host_builder("sharded");
    let (mut watcher, try_id) = farm.watch_try("t", &s.rev, &name);

    eventually("the hanging unit", || marker.exists().then_some(())).await;
    let running = buildlet_pids(&s.data.display().to_string()).len();
    assert!(running >= 1, "buildlets are running");
    let out = farm
        .gomote()
        .args(["cancel", &try_id])
        .output()
        .expect("gomote cancel");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = tokio::task::spawn_blocking(move || watcher.wait()).await;
    let v = farm.get_json(&format!("/api/try/{try_id}")).await;
    assert_eq!(v["builds"][0]["state"], "cancelled", "{v:#}");
    all_buildlets_released(&s.data).await;
    farm.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn plan_helpers_never_take_more_than_the_host_types_capacity() {
    // Two slots, a build wanting three buildlets (3 shards) and another build: before
    // helpers were counted, the pool had four buildlets out at once.
    let other = format!(
        r#"
[[builders]]
name = "{name}"
host_type = "local"
steps = [{{ name = "other", command = ["sh", "-c", "sleep 2; echo other done"] }}]
"#,
        name = host_builder("other"),
    );
    let builders = format!("{}\n{other}", sharded_builder(""));
    let s = setup(&builders, "");
    set_local_buildlets(&s, 2);
    let farm = std::sync::Arc::new(TestFarm::start(&s.cfg, &s.data).await);

    let stop = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let (farm, stop) = (farm.clone(), stop.clone());
        tokio::spawn(async move {
            let mut most = 0u64;
            let mut samples = 0u32;
            while !stop.is_cancelled() {
                let status = farm.get_json("/api/status").await;
                for p in status["pools"].as_array().into_iter().flatten() {
                    let out =
                        p["in_use"].as_u64().unwrap_or(0) + p["starting"].as_u64().unwrap_or(0);
                    most = most.max(out);
                }
                samples += 1;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            (most, samples)
        })
    };
    let builds = farm.wait_final_builds("t", &s.rev, 2).await;
    stop.cancel();
    let (most, samples) = sampler.await.expect("sampler");
    assert!(
        samples > 10,
        "the pool was sampled while the builds ran ({samples})"
    );
    assert!(
        most <= 2,
        "at most the pool's 2 buildlets were out at once, saw {most}"
    );
    let by_builder = |b: &str| {
        builds
            .iter()
            .find(|x| x["builder"] == b)
            .unwrap_or_else(|| panic!("build of {b}: {builds:?}"))
            .clone()
    };
    let sharded = by_builder(&host_builder("sharded"));
    assert_eq!(sharded["state"], "failed", "{sharded:#}");
    assert!(
        sharded["summary"]
            .as_str()
            .is_some_and(|x| x.contains("2 of 8 units failed")),
        "the same verdict with fewer buildlets: {sharded:#}"
    );
    assert_eq!(by_builder(&host_builder("other"))["state"], "ok");
    all_buildlets_released(&s.data).await;
    match std::sync::Arc::try_unwrap(farm) {
        Ok(farm) => farm.kill().await,
        Err(_) => panic!("the sampler still holds the farm"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_waiting_for_a_toolchain_frees_its_slot_for_the_toolchain_build() {
    // One buildlet, and the build that needs the toolchain is queued first: if it kept
    // its slot while waiting, the toolchain build would never start.
    let builders = format!(
        r#"
[[builders]]
name = "{misc}"
host_type = "local"
[[builders.steps]]
name = "cross"
toolchain = {{ builder = "{tc}", step = "make", dir = "goroot" }}
command = ["sh", "-c", "echo cross-built with $(cat ../goroot/VERSION)"]

[[builders]]
name = "{tc}"
host_type = "local"
[[builders.steps]]
name = "make"
snapshot = "goroot"
command = ["sh", "-c", "mkdir -p ../goroot && echo go-from-the-farm > ../goroot/VERSION"]
"#,
        misc = host_builder("amisc"),
        tc = host_builder("toolchain"),
    );
    let s = setup(&builders, "");
    set_local_buildlets(&s, 1);
    let farm = TestFarm::start(&s.cfg, &s.data).await;
    let builds = farm.wait_final_builds("t", &s.rev, 2).await;
    let misc = builds
        .iter()
        .find(|b| b["builder"] == host_builder("amisc").as_str())
        .expect("misc build");
    let id = misc["id"].as_str().expect("id");
    let log = farm.get_text(&format!("/log/{id}")).await;
    assert_eq!(misc["state"], "ok", "{log}");
    assert!(
        log.contains("toolchain: waiting for"),
        "the misc build ran first and waited: {log}"
    );
    assert!(log.contains("cross-built with go-from-the-farm"), "{log}");
    for b in &builds {
        assert_eq!(b["state"], "ok", "{builds:?}");
    }
    farm.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_try_run_pairs_its_builds_with_the_toolchain_built_from_its_own_patch() {
    // The post-submit builds of the commit make and use a toolchain from the unpatched
    // tree; the try run's cross build must use the one its own run made from the patch.
    let builders = format!(
        r#"
[[builders]]
name = "{tc}"
host_type = "local"
[[builders.steps]]
name = "make"
snapshot = "goroot"
command = ["sh", "-c", "mkdir -p ../goroot && (cat TRY_MARK 2>/dev/null || echo unpatched) > ../goroot/VERSION"]

[[builders]]
name = "{misc}"
host_type = "local"
[[builders.steps]]
name = "cross"
toolchain = {{ builder = "{tc}", step = "make", dir = "goroot" }}
command = ["sh", "-c", "echo cross-built with $(cat ../goroot/VERSION)"]
"#,
        tc = host_builder("toolchain"),
        misc = host_builder("misc"),
    );
    let s = setup(&builders, "");
    std::fs::write(s.repo.join("TRY_MARK"), "patched-toolchain\n").expect("write");
    git(&s.repo, &["add", "TRY_MARK"]);
    let patch = git(&s.repo, &["diff", "--cached", "--binary"]);
    git(&s.repo, &["reset", "--quiet"]);
    std::fs::remove_file(s.repo.join("TRY_MARK")).expect("rm");
    let patch_file = s.tmp.path().join("try.patch");
    std::fs::write(&patch_file, format!("{patch}\n")).expect("write patch");

    let farm = TestFarm::start(&s.cfg, &s.data).await;
    let names = format!("{},{}", host_builder("toolchain"), host_builder("misc"));
    let out = farm
        .gomote()
        .args([
            "try",
            "--json",
            "t",
            &s.rev,
            "--builders",
            &names,
            "--patch",
        ])
        .arg(&patch_file)
        .output()
        .expect("gomote try");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout {stdout} stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json");
    assert_eq!(v["verdict"], "ok", "{v:#}");
    let try_id = v["try_id"].as_str().expect("try id");
    let run = farm.get_json(&format!("/api/try/{try_id}")).await;
    let misc = run["builds"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["builder"] == host_builder("misc").as_str())
        .unwrap_or_else(|| panic!("the misc build of the try run: {run:#}"));
    let id = misc["build_id"].as_str().expect("build id");
    let log = farm.get_text(&format!("/log/{id}")).await;
    assert!(log.contains("cross-built with patched-toolchain"), "{log}");

    // The commit's own post-submit pair used the unpatched toolchain.
    let builds = farm.wait_final_builds("t", &s.rev, 2).await;
    let post = builds
        .iter()
        .find(|b| b["builder"] == host_builder("misc").as_str() && b["kind"] == "post-submit")
        .unwrap_or_else(|| panic!("the post-submit misc build: {builds:?}"));
    let id = post["id"].as_str().expect("id");
    let log = farm.get_text(&format!("/log/{id}")).await;
    assert!(log.contains("cross-built with unpatched"), "{log}");
    farm.kill().await;
}
