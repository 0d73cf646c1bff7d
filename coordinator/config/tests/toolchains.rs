//! Go toolchain builders in the config: `dist-test` units and `only_units`, a step's
//! `path`, a step's `toolchain` (another builder's snapshot), and a repo's `go` pairing;
//! what parses, and each mistake reported at its field.

use buildfarm_config::{Config, Units};

/// A Go repo with a toolchain builder, a misc-compile builder and a subrepo builder.
const GOOD: &str = r#"[[host_types]]
name = "local"
pool = { kind = "local", count = 4 }

[[repos]]
name = "go"
url = "/srv/go"
branches = ["master"]

[[repos]]
name = "text"
url = "/srv/text"
go = { repo = "go", branch = "master" }

[[builders]]
name = "linux-amd64"
host_type = "local"
repos = ["go"]
test_shards = 4
env = { GOROOT_BOOTSTRAP = "/usr/lib/go-1.19" }
[[builders.steps]]
name = "make"
command = ["sh", "-c", "cd src && exec ./make.bash"]
snapshot = "src"
[[builders.steps]]
name = "test"
requires = ["make"]
units = "dist-test"
only_units = ["go_test:sort", "runtime:cpu124"]
path = ["$WORKDIR/src/bin", "$PATH"]
command = ["go", "tool", "dist", "test", "-no-rebuild"]

[[builders]]
name = "linux-arm64-misccompile"
host_type = "local"
repos = ["go"]
env = { GOOS = "linux", GOARCH = "arm64" }
[[builders.steps]]
name = "build"
toolchain = { builder = "linux-amd64", step = "make" }
path = ["$WORKDIR/src/bin", "$PATH"]
command = ["go", "build", "std", "cmd"]

[[builders]]
name = "linux-amd64-text"
host_type = "local"
repos = ["text"]
[[builders.steps]]
name = "test"
units = "go-packages"
toolchain = { builder = "linux-amd64", step = "make", dir = "goroot" }
path = ["$WORKDIR/goroot/bin", "$PATH"]
command = ["go", "test"]
"#;

fn errors(text: &str) -> Vec<String> {
    match Config::from_toml_str(text, "coordinator.toml") {
        Ok(c) => panic!("expected errors, parsed {c:?}"),
        Err(e) => e.errors.iter().map(ToString::to_string).collect(),
    }
}

fn assert_has(errors: &[String], needle: &str) {
    assert!(
        errors.iter().any(|e| e.contains(needle)),
        "no error contains {needle:?} in:\n{}",
        errors.join("\n")
    );
}

#[test]
fn toolchain_misc_compile_and_subrepo_builders_parse() {
    let c = Config::from_toml_str(GOOD, "c.toml").unwrap();
    let tc = c.builder("linux-amd64").unwrap();
    assert_eq!(tc.steps[1].units, Some(Units::DistTest));
    assert_eq!(tc.steps[1].only_units, ["go_test:sort", "runtime:cpu124"]);
    assert_eq!(tc.steps[1].path, ["$WORKDIR/src/bin", "$PATH"]);
    let misc = c.builder("linux-arm64-misccompile").unwrap();
    assert!(misc.is_plan(), "a toolchain step runs as a plan");
    let t = misc.steps[0].toolchain.as_ref().unwrap();
    assert_eq!(
        (t.builder.as_str(), t.step.as_str(), t.dir.as_deref()),
        ("linux-amd64", "make", None)
    );
    let sub = c.builder("linux-amd64-text").unwrap();
    assert_eq!(
        sub.steps[0].toolchain.as_ref().unwrap().dir.as_deref(),
        Some("goroot")
    );
    let pairing = c.repo("text").unwrap().go.as_ref().unwrap();
    assert_eq!(
        (pairing.repo.as_str(), pairing.branch.as_str()),
        ("go", "master")
    );
    assert_eq!(c.repo("go").unwrap().go, None);
}

#[test]
fn toolchain_references_must_resolve() {
    let e = errors(&GOOD.replace(
        "builder = \"linux-amd64\", step = \"make\" }",
        "builder = \"linux-amd64-nope\", step = \"make\" }",
    ));
    assert_has(
        &e,
        "builders[1].steps[0].toolchain.builder: unknown builder \"linux-amd64-nope\"",
    );
    let e = errors(&GOOD.replace(
        "builder = \"linux-amd64\", step = \"make\", dir",
        "builder = \"linux-amd64\", step = \"test\", dir",
    ));
    assert_has(
        &e,
        "builders[2].steps[0].toolchain.step: step \"test\" of builder \"linux-amd64\" saves no snapshot",
    );
    let e = errors(&GOOD.replace("step = \"make\" }", "step = \"nope\" }"));
    assert_has(&e, "builder \"linux-amd64\" has no step \"nope\"");
    let e = errors(&GOOD.replace("dir = \"goroot\"", "dir = \"../goroot\""));
    assert_has(
        &e,
        "builders[2].steps[0].toolchain.dir: \"../goroot\" must not contain `..`",
    );
}

#[test]
fn a_subrepo_needs_a_go_pairing_with_a_watched_branch() {
    let e = errors(&GOOD.replace("go = { repo = \"go\", branch = \"master\" }\n", ""));
    assert_has(
        &e,
        "builder \"linux-amd64\" builds neither repo \"text\" nor the repo of its `go` pairing",
    );
    let e = errors(&GOOD.replace(
        "go = { repo = \"go\", branch = \"master\" }",
        "go = { repo = \"go\", branch = \"dev\" }",
    ));
    assert_has(
        &e,
        "repos[1].go.branch: branch \"dev\" is not watched by repo \"go\"",
    );
    let e = errors(&GOOD.replace(
        "go = { repo = \"go\", branch = \"master\" }",
        "go = { repo = \"golang\", branch = \"master\" }",
    ));
    assert_has(&e, "repos[1].go.repo: unknown repo \"golang\"");
    let e = errors(&GOOD.replace(
        "go = { repo = \"go\", branch = \"master\" }",
        "go = { repo = \"text\", branch = \"main\" }",
    ));
    assert_has(&e, "repos[1].go.repo: a repo cannot be paired with itself");
}

#[test]
fn unit_subsets_need_units_and_names() {
    let e = errors(&GOOD.replace(
        "only_units = [\"go_test:sort\", \"runtime:cpu124\"]",
        "only_units = [\"go_test:sort\", \"-k\", \"go_test:sort\", \"a b\"]",
    ));
    assert_has(&e, "only_units[1]: \"-k\" is not a unit name");
    assert_has(&e, "only_units[2]: duplicate unit name \"go_test:sort\"");
    assert_has(&e, "only_units[3]: \"a b\" is not a unit name");
    let e = errors(&GOOD.replace(
        "path = [\"$WORKDIR/src/bin\", \"$PATH\"]\ncommand = [\"go\", \"build\", \"std\", \"cmd\"]",
        "path = [\"\"]\ncommand = [\"go\", \"build\", \"std\", \"cmd\"]\nonly_units = [\"x\"]",
    ));
    assert_has(
        &e,
        "builders[1].steps[0].only_units: is set but the step has no `units` to choose from",
    );
    assert_has(&e, "builders[1].steps[0].path[0]: must not be empty");
    let e = errors(&GOOD.replace("units = \"dist-test\"", "units = \"dist-tests\""));
    assert_has(&e, "dist-tests");
}

#[test]
fn a_builder_cannot_take_its_own_toolchain() {
    let e = errors(&GOOD.replace(
        "command = [\"go\", \"tool\", \"dist\", \"test\", \"-no-rebuild\"]",
        "command = [\"go\", \"tool\", \"dist\", \"test\", \"-no-rebuild\"]\ntoolchain = { builder = \"linux-amd64\", step = \"make\" }",
    ));
    assert_has(
        &e,
        "builders[0].steps[1].toolchain.builder: names this builder: restore its own step's snapshot with `restore`",
    );
}
