//! The buildlet's tarball policy: see `buildlet::tarball::fuzz_extract`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = buildlet::tarball::fuzz_extract(data);
});
