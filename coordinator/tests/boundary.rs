//! The farm's middle has no module cycle: the parts the farm drives (dispatcher, runner,
//! sources, reconciler, retry) never reach back into `farm`, and the pure ones do no
//! I/O. Checked here, not by memory.

use std::path::Path;

fn source(module: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src")
        .join(format!("{module}.rs"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_parts_the_farm_drives_do_not_know_the_farm() {
    for module in [
        "dispatcher",
        "runner",
        "sources",
        "reconcile",
        "retry",
        "pool/mod",
        "pool/reverse",
    ] {
        let text = source(module);
        assert!(
            !text.contains("crate::farm") && !text.contains("Farm"),
            "{module}.rs reaches into the farm"
        );
    }
}

#[test]
fn the_reconciler_rule_is_pure() {
    let text = source("reconcile");
    for io in ["tokio", "crate::", "std::fs", "Store"] {
        assert!(!text.contains(io), "reconcile.rs mentions {io}");
    }
}
