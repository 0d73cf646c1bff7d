//! The push webhook's request check: see `fuzz_check` in coordinator/src/webhook.rs.

#![no_main]

// Compiled on its own: the module is pure and names no `crate::` item.
#[path = "../../coordinator/src/webhook.rs"]
#[allow(dead_code)]
mod webhook;

use std::sync::OnceLock;

static CONFIG: OnceLock<buildfarm_config::Config> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = webhook::fuzz_check(CONFIG.get_or_init(webhook::fuzz_config), data);
});
