//! The scheduler stays a pure crate: checked with `cargo tree`, not by memory.

use std::path::Path;
use std::process::Command;

#[test]
fn scheduler_does_not_depend_on_tokio() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "buildfarm-scheduler",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(&root)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Guards against passing on empty output.
    assert!(stdout.contains("buildfarm-scheduler"), "{stdout}");
    let crates: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for banned in ["tokio", "tokio-util", "futures", "async-std"] {
        assert!(!crates.contains(&banned), "depends on {banned}:\n{stdout}");
    }
}
