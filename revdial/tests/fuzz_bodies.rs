//! The `revdial_handshake` fuzz body on stable: every committed seed and a bounded number
//! of generated inputs go through `revdial::handshake::fuzz_handshake`, which panics when
//! framing, validation or authentication breaks its contract.

#[path = "../../fuzz/stable.rs"]
mod stable;

use revdial::handshake::fuzz_handshake;

const TARGET: &str = "revdial_handshake";

/// `ok-*` seeds carry Hellos that all authenticate; `bad-*` seeds none that does.
#[test]
fn corpus_seeds_are_accepted_or_refused_as_named() {
    for (name, data) in stable::corpus(env!("CARGO_MANIFEST_DIR"), TARGET) {
        let outcome = fuzz_handshake(&data);
        if name.starts_with("ok-") {
            assert!(
                outcome.authenticated > 0 && outcome.authenticated == outcome.hellos,
                "{name}: {outcome:?}"
            );
        } else if name.starts_with("bad-") {
            assert_eq!(outcome.authenticated, 0, "{name}: {outcome:?}");
        }
    }
}

#[test]
fn mutated_seeds_never_break_the_handshake() {
    let seeds = stable::corpus(env!("CARGO_MANIFEST_DIR"), TARGET);
    let mut valid = 0;
    stable::run_generated(TARGET, &seeds, 13, stable::iterations(), 4 << 10, |d| {
        valid += fuzz_handshake(d).valid_hellos;
    });
    // Mutations that keep a Hello valid (e.g. a changed proof byte) must occur, or the
    // authenticator check is never reached.
    assert!(valid > 0, "no generated input got past validation");
}
