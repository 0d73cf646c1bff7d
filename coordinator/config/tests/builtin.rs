//! The built-in default config: valid, the expected builders, and the same after a trip
//! through TOML (so `--print-config` output can be edited and loaded back).

use std::path::Path;

use buildfarm_config::{CROSS_BUILDERS, Config, Pool, host_platform};

#[test]
fn builtin_default_passes_its_own_validation() {
    let c = Config::builtin_default(Path::new("/tmp/example"));
    c.validate("<builtin>").unwrap();
}

#[test]
fn builtin_default_has_a_local_pool_of_two_and_one_example_repo() {
    let c = Config::builtin_default(Path::new("/tmp/example"));
    assert_eq!(c.host_types.len(), 1);
    assert!(matches!(c.host_types[0].pool, Pool::Local(ref p) if p.count == 2));
    assert_eq!(c.repos.len(), 1);
    assert_eq!(c.repos[0].name, "example");
    assert_eq!(c.repos[0].url, "/tmp/example");
    assert_eq!(c.repos[0].branches, ["main"]);
    assert!(c.builders.iter().all(|b| b.host_type == "local"));
}

#[test]
fn builtin_default_tests_natively_and_cross_compiles_the_rest() {
    let c = Config::builtin_default(Path::new("/tmp/example"));
    let (goos, goarch) = host_platform().expect("tests run on a platform Go supports");
    let native = c.builder(&format!("{goos}-{goarch}")).unwrap();
    let argv: Vec<Vec<&str>> = native
        .steps
        .iter()
        .map(|s| s.command.iter().map(String::as_str).collect())
        .collect();
    assert_eq!(argv, [["go", "vet", "./..."], ["go", "test", "./..."]]);
    assert!(native.env.is_empty());

    for &(os, arch) in CROSS_BUILDERS {
        if (os, arch) == (goos, goarch) {
            continue;
        }
        let b = c.builder(&format!("{os}-{arch}")).unwrap();
        assert_eq!(b.env["GOOS"], os);
        assert_eq!(b.env["GOARCH"], arch);
        assert_eq!(b.env["CGO_ENABLED"], "0");
        assert_eq!(b.steps[0].command, ["go", "build", "./..."]);
        assert_eq!(b.steps[1].command, ["go", "vet", "./..."]);
    }
    // Native plus every cross builder not equal to the host; names are unique.
    let expected = 1 + CROSS_BUILDERS
        .iter()
        .filter(|&&p| p != (goos, goarch))
        .count();
    assert_eq!(c.builders.len(), expected);
}

#[test]
fn builtin_default_round_trips_through_toml() {
    let c = Config::builtin_default(Path::new("/tmp/example"));
    let text = toml::to_string(&c).unwrap();
    assert_eq!(Config::from_toml_str(&text, "printed.toml").unwrap(), c);
}

#[test]
fn validate_without_source_text_gives_paths_but_no_lines() {
    let mut c = Config::builtin_default(Path::new("/tmp/example"));
    c.builders[0].host_type = "gone".into();
    let err = c.validate("<builtin>").unwrap_err();
    assert_eq!(
        err.to_string(),
        "<builtin>: builders[0].host_type: unknown host type \"gone\""
    );
}
