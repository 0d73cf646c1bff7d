//! Fuzz target for the reverse-dial handshake parser: arbitrary bytes are decoded as a
//! stream of frames (Hello, and Challenge/Verdict as the dialer reads them) and every
//! decoded Hello is validated and checked against an authenticator. Nothing may panic;
//! a Hello that validates must survive an encode/decode round trip unchanged.

#![no_main]

use libfuzzer_sys::fuzz_target;
use revdial::Authenticator;
use revdial::handshake::{
    Challenge, Hello, MAX_FRAME_LEN, Verdict, decode_frame, encode_frame, validate_challenge,
    validate_hello,
};

fuzz_target!(|data: &[u8]| {
    let auth = Authenticator::new(b"fuzz master".to_vec()).with_token("t1", "linux", "secret");
    let nonce = [7u8; 32];

    let mut rest = data;
    while let Ok(Some((hello, used))) = decode_frame::<Hello>("hello", rest) {
        assert!(used >= 4 && used <= 4 + MAX_FRAME_LEN && used <= rest.len());
        if let Ok(valid) = validate_hello(&hello) {
            let _ = auth.verify(&nonce, &valid);
            let again = encode_frame(&hello);
            let (decoded, n) = decode_frame::<Hello>("hello", &again)
                .expect("re-encoded hello decodes")
                .expect("re-encoded hello is complete");
            assert_eq!(n, again.len());
            assert_eq!(validate_hello(&decoded).ok(), Some(valid));
        }
        rest = &rest[used..];
    }

    if let Ok(Some((challenge, _))) = decode_frame::<Challenge>("challenge", data) {
        let _ = validate_challenge(&challenge);
    }
    let _ = decode_frame::<Verdict>("verdict", data);
});
