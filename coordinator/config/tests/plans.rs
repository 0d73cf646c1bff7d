//! Plan fields of builder steps (`requires`, `snapshot`, `restore`, `cache`, `units`):
//! what parses, and every graph or path mistake reported with its line and field.

use buildfarm_config::{Config, Units};

const HEAD: &str = r#"[[host_types]]
name = "local"
pool = { kind = "local", count = 4 }

[[builders]]
name = "linux-amd64"
host_type = "local"
"#;

fn errors(text: &str) -> Vec<String> {
    match Config::from_toml_str(text, "coordinator.toml") {
        Ok(c) => panic!("expected errors, parsed {c:?}"),
        Err(e) => e.errors.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn a_plan_parses_with_its_defaults() {
    let text = format!(
        r#"{HEAD}test_shards = 3
[[builders.steps]]
name = "build"
command = ["go", "build", "./..."]
snapshot = "src"
cache = {{ key_files = ["go.sum"], paths = ["gocache"] }}
[[builders.steps]]
name = "test"
requires = ["build"]
units = "go-packages"
command = ["go", "test"]
"#
    );
    let c = Config::from_toml_str(&text, "c.toml").unwrap();
    let b = &c.builders[0];
    assert!(b.is_plan());
    assert_eq!(b.steps[0].snapshot.as_deref(), Some("src"));
    assert_eq!(b.steps[0].cache.as_ref().unwrap().key_files, ["go.sum"]);
    assert_eq!(b.steps[1].requires, ["build"]);
    assert_eq!(b.steps[1].units, Some(Units::GoPackages));
    assert_eq!(
        b.steps[1].restore, None,
        "default: the requirements' snapshots"
    );
    let dag = buildfarm_config::dag::Dag::new(&b.steps).unwrap();
    assert_eq!(dag.restores(1), [0]);

    // Plain steps stay a sequence on one buildlet.
    let plain = format!("{HEAD}steps = [{{ name = \"a\", command = [\"true\"] }}]\n");
    assert!(!Config::from_toml_str(&plain, "c.toml").unwrap().builders[0].is_plan());
}

#[test]
fn graph_mistakes_are_reported_at_their_lines() {
    let text = format!(
        r#"{HEAD}[[builders.steps]]
name = "a"
command = ["true"]
requires = ["c"]
[[builders.steps]]
name = "b"
command = ["true"]
requires = ["a", "nope", "b"]
restore = "a"
[[builders.steps]]
name = "c"
command = ["true"]
requires = ["b"]
"#
    );
    assert_eq!(
        errors(&text),
        [
            "coordinator.toml:11:1: builders[0].steps[0].requires: steps require each other in a cycle: a -> c -> b -> a",
            "coordinator.toml:15:18: builders[0].steps[1].requires[1]: unknown step \"nope\"",
            "coordinator.toml:15:26: builders[0].steps[1].requires[2]: a step cannot require itself",
        ]
    );
}

#[test]
fn restores_must_name_a_required_snapshot() {
    let text = format!(
        r#"{HEAD}[[builders.steps]]
name = "a"
command = ["true"]
[[builders.steps]]
name = "b"
command = ["true"]
restore = "a"
[[builders.steps]]
name = "c"
command = ["true"]
requires = ["a"]
restore = "a"
"#
    );
    assert_eq!(
        errors(&text),
        [
            "coordinator.toml:14:1: builders[0].steps[1].restore: \"a\" is not among this step's requirements (add it to `requires`)",
            "coordinator.toml:19:1: builders[0].steps[2].restore: step \"a\" saves no snapshot (give it `snapshot = \"dir\"`)",
        ]
    );
}

#[test]
fn paths_must_stay_in_the_workdir_and_shards_need_units() {
    let text = format!(
        r#"{HEAD}test_shards = 2
[[builders.steps]]
name = "a"
command = ["true"]
snapshot = "/etc"
cache = {{ key_files = ["../go.sum"], paths = [] }}
units = "every-test"
"#
    );
    let e = errors(&text);
    assert_eq!(e.len(), 1, "a parse error stops the checks: {e:?}");
    assert!(
        e[0].contains("steps[0].units") && e[0].contains("every-test"),
        "{e:?}"
    );

    let text = text.replace("units = \"every-test\"\n", "");
    assert_eq!(
        errors(&text),
        [
            "coordinator.toml:8:1: builders[0].test_shards: is 2 but no step has `units` to split (e.g. units = \"go-packages\")",
            "coordinator.toml:12:1: builders[0].steps[0].snapshot: \"/etc\" must be relative to the buildlet's workdir",
            "coordinator.toml:13:24: builders[0].steps[0].cache.key_files[0]: \"../go.sum\" must not contain `..`",
            "coordinator.toml:13:38: builders[0].steps[0].cache.paths: must not be empty",
        ]
    );
}
