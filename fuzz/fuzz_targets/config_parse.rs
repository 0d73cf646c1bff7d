//! Config parsing and validation: see `buildfarm_config::fuzz_parse`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = buildfarm_config::fuzz_parse(data);
});
