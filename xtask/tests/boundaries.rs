//! The crate boundaries ARCHITECTURE.md promises, checked with `cargo tree` rather than
//! by memory. (The scheduler's "no tokio" rule has its own test in its crate.)

use std::path::Path;
use std::process::Command;

/// Normal (non-dev) dependencies of `krate`, by crate name.
fn deps(krate: &str) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(env!("CARGO"))
        .args(["tree", "-p", krate, "-e", "normal", "--prefix", "none"])
        .current_dir(&root)
        .output()
        .expect("running cargo tree");
    assert!(
        out.status.success(),
        "cargo tree -p {krate}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let names: Vec<String> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    // Guards against passing on empty output.
    assert!(names.iter().any(|n| n == krate), "{text}");
    names
}

fn assert_not_in(krate: &str, banned: &[&str]) {
    let names = deps(krate);
    for b in banned {
        assert!(
            !names.iter().any(|n| n == b),
            "{krate} must not depend on {b}"
        );
    }
}

#[test]
fn config_is_plain_data() {
    assert_not_in("buildfarm-config", &["tokio", "tonic", "sqlx", "hyper"]);
}

#[test]
fn proto_knows_nothing_of_the_rest() {
    assert_not_in(
        "buildfarm-proto",
        &[
            "buildfarm-store",
            "sqlx",
            "revdial",
            "buildlet",
            "coordinator",
        ],
    );
}

#[test]
fn tls_is_certificates_and_configs_only() {
    // No runtime, no gRPC, no other farm crate: anything may use it.
    assert_not_in(
        "buildfarm-tls",
        &["tokio", "tonic", "hyper", "buildfarm-proto", "revdial"],
    );
}

#[test]
fn revdial_serves_any_service() {
    assert_not_in("revdial", &["buildlet", "buildfarm-store", "coordinator"]);
}

#[test]
fn buildlet_does_not_know_the_coordinator() {
    assert_not_in(
        "buildlet",
        &[
            "coordinator",
            "buildfarm-store",
            "buildfarm-scheduler",
            "sqlx",
        ],
    );
}

#[test]
fn store_has_no_grpc_or_buildlets() {
    assert_not_in("buildfarm-store", &["tonic", "buildlet", "revdial"]);
}
