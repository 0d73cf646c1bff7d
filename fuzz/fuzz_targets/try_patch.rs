//! A try run's patch pre-checks: see `fuzz_check` in coordinator/src/try_patch.rs.

#![no_main]

// Compiled on its own: the module is pure and names no `crate::` item.
#[path = "../../coordinator/src/try_patch.rs"]
#[allow(dead_code)]
mod try_patch;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = try_patch::fuzz_check(data);
});
