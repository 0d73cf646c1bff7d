//! The listener's side of the reverse-dial handshake: see `revdial::handshake::fuzz_handshake`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = revdial::handshake::fuzz_handshake(data);
});
