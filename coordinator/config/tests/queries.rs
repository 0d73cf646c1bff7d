//! The look-ups the coordinator makes: which builders build a commit, which run try jobs.

use buildfarm_config::Config;

const FULL: &str = include_str!("../examples/full.toml");

fn names<'a>(builders: impl IntoIterator<Item = &'a buildfarm_config::Builder>) -> Vec<&'a str> {
    builders.into_iter().map(|b| b.name.as_str()).collect()
}

#[test]
fn builders_for_honours_repo_and_branch_lists() {
    let c = Config::from_toml_str(FULL, "full.toml").unwrap();
    assert_eq!(
        names(c.builders_for("go", "master")),
        [
            "linux-amd64",
            "linux-amd64-race",
            "linux-arm64",
            "windows-amd64-crosscompile"
        ]
    );
    // linux-amd64-race only builds master.
    assert_eq!(
        names(c.builders_for("go", "release-branch.go1.25")),
        ["linux-amd64", "linux-arm64", "windows-amd64-crosscompile"]
    );
    assert_eq!(
        names(c.builders_for("tools", "main")),
        [
            "linux-amd64",
            "linux-arm64",
            "linux-ppc64le-power9",
            "windows-amd64-crosscompile"
        ]
    );
    assert!(c.builders_for("tools", "master").is_empty(), "not watched");
    assert!(c.builders_for("nope", "main").is_empty(), "unknown repo");
}

#[test]
fn try_builders_skip_post_submit_only_builders() {
    let c = Config::from_toml_str(FULL, "full.toml").unwrap();
    assert_eq!(
        names(c.try_builders("go")),
        ["linux-amd64", "linux-arm64", "windows-amd64-crosscompile"]
    );
    assert_eq!(
        names(c.try_builders("tools")),
        [
            "linux-amd64",
            "linux-arm64",
            "linux-ppc64le-power9",
            "windows-amd64-crosscompile"
        ]
    );
    assert!(c.try_builders("nope").is_empty());
}

#[test]
fn lookups_by_name() {
    let c = Config::from_toml_str(FULL, "full.toml").unwrap();
    assert_eq!(c.host_type("local").unwrap().pool.kind(), "local");
    assert!(c.host_type("remote").is_none());
    assert_eq!(
        c.builder("linux-arm64").unwrap().host_type,
        "linux-arm64-ec2"
    );
    assert!(c.builder("linux-mips").is_none());
    assert_eq!(c.repo("tools").unwrap().url, "/srv/git/tools");
    assert!(c.repo("go2").is_none());
}
