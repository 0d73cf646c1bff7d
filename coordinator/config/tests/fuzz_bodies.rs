//! The `config_parse` fuzz body on stable: every committed seed and a bounded number of
//! generated config texts go through `buildfarm_config::fuzz_parse`, which panics when
//! parsing panics or an error does not name a line inside the text.

#[path = "../../../fuzz/stable.rs"]
mod stable;

use buildfarm_config::fuzz_parse;

const TARGET: &str = "config_parse";

#[test]
fn corpus_seeds_are_accepted_or_refused_as_named() {
    for (name, data) in stable::corpus(env!("CARGO_MANIFEST_DIR"), TARGET) {
        let result = fuzz_parse(&data);
        if name.starts_with("ok-") {
            assert!(result.is_ok(), "{name} was refused: {result:?}");
        } else if name.starts_with("bad-") {
            assert!(result.is_err(), "{name} was accepted");
        }
    }
}

#[test]
fn mutated_configs_never_panic_and_errors_name_a_line() {
    let seeds = stable::corpus(env!("CARGO_MANIFEST_DIR"), TARGET);
    let (mut accepted, mut refused) = (0, 0);
    stable::run_generated(
        TARGET,
        &seeds,
        13,
        stable::iterations(),
        16 << 10,
        |d| match fuzz_parse(d) {
            Ok(_) => accepted += 1,
            Err(_) => refused += 1,
        },
    );
    assert!(
        accepted > 0 && refused > 0,
        "accepted {accepted}, refused {refused}"
    );
}
