//! The `webhook` and `try_patch` fuzz bodies on stable: every committed seed and a bounded
//! number of generated inputs go through `coordinator::webhook::fuzz_check` and
//! `coordinator::try_patch::fuzz_check`, which panic when the check breaks its contract.

#[path = "../../fuzz/stable.rs"]
mod stable;

use coordinator::{try_patch, webhook};

#[test]
fn webhook_seeds_are_accepted_or_refused_as_named() {
    let config = webhook::fuzz_config();
    for (name, data) in stable::corpus(env!("CARGO_MANIFEST_DIR"), "webhook") {
        let result = webhook::fuzz_check(&config, &data);
        if name.starts_with("ok-") {
            assert!(result.is_ok(), "{name} was refused: {result:?}");
        } else if name.starts_with("bad-") {
            assert!(result.is_err(), "{name} was accepted");
        }
    }
}

#[test]
fn mutated_webhook_calls_are_only_accepted_when_signed() {
    let config = webhook::fuzz_config();
    let seeds = stable::corpus(env!("CARGO_MANIFEST_DIR"), "webhook");
    stable::run_generated("webhook", &seeds, 13, stable::iterations(), 4 << 10, |d| {
        let _ = webhook::fuzz_check(&config, d);
    });
}

#[test]
fn patch_seeds_are_accepted_or_refused_as_named() {
    for (name, data) in stable::corpus(env!("CARGO_MANIFEST_DIR"), "try_patch") {
        let result = try_patch::fuzz_check(&data);
        if name.starts_with("ok-") {
            assert!(result.is_ok(), "{name} was refused: {result:?}");
        } else if name.starts_with("bad-") {
            assert!(result.is_err(), "{name} was accepted: {result:?}");
        }
    }
}

#[test]
fn mutated_patches_never_panic_or_pass_a_hostile_path() {
    let seeds = stable::corpus(env!("CARGO_MANIFEST_DIR"), "try_patch");
    let (mut accepted, mut refused) = (0, 0);
    stable::run_generated(
        "try_patch",
        &seeds,
        13,
        stable::iterations(),
        16 << 10,
        |d| match try_patch::fuzz_check(d) {
            Ok(_) => accepted += 1,
            Err(_) => refused += 1,
        },
    );
    assert!(
        accepted > 0 && refused > 0,
        "accepted {accepted}, refused {refused}"
    );
}
