//! The reverse-dial handshake as pure code over byte buffers: frame encoding and
//! decoding (u32 big-endian length prefix), strict validation of `Challenge` and
//! `Hello`, builder keys and the HMAC proofs. No I/O and no clock here, so it is unit
//! tested on buffers and fuzzed (`fuzz/fuzz_targets/revdial_handshake.rs`).

use std::fmt;

use buildfarm_proto::revdial::{HostTokenProof, hello};
use hmac::{Hmac, Mac};
use prost::Message;
use sha2::Sha256;

/// The handshake messages, re-exported so callers (and the fuzz target) need not
/// depend on the proto crate.
pub use buildfarm_proto::revdial::{Challenge, Hello, Verdict};

type HmacSha256 = Hmac<Sha256>;

/// The only handshake version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest frame body either side accepts; a Hello is a few hundred bytes.
pub const MAX_FRAME_LEN: usize = 16 * 1024;
/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;
/// Length of the listener's random challenge.
pub const NONCE_LEN: usize = 32;
/// Length of an HMAC-SHA256 proof or builder key.
pub const PROOF_LEN: usize = 32;
/// Length of a data connection's one-time token.
pub const DATA_TOKEN_LEN: usize = 32;
pub const MAX_HOST_TYPE_LEN: usize = 64;
pub const MAX_HOSTNAME_LEN: usize = 253;
pub const MAX_VERSION_LEN: usize = 64;
pub const MAX_TOKEN_ID_LEN: usize = 128;
/// Longest refusal reason a listener sends (longer ones are cut).
pub const MAX_REASON_LEN: usize = 512;

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_LEN}")]
    TooLarge(usize),
    #[error("decoding {what}: {message}")]
    Decode { what: &'static str, message: String },
}

/// Classes of refusal, used as a bounded metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RefusalKind {
    /// A frame that is oversized or not a valid protobuf message.
    Malformed,
    /// A protocol version other than [`PROTOCOL_VERSION`].
    UnsupportedVersion,
    /// A well-formed Hello with a missing or invalid field.
    InvalidHello,
    /// Wrong builder key or token, a key for another host type, an unknown token, a replay.
    BadCredential,
    /// The peer did not finish the handshake in time.
    Timeout,
    /// The connection failed during the handshake.
    Io,
}

impl RefusalKind {
    pub const ALL: [RefusalKind; 6] = [
        RefusalKind::Malformed,
        RefusalKind::UnsupportedVersion,
        RefusalKind::InvalidHello,
        RefusalKind::BadCredential,
        RefusalKind::Timeout,
        RefusalKind::Io,
    ];

    /// Stable snake_case name (a metric label value).
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalKind::Malformed => "malformed",
            RefusalKind::UnsupportedVersion => "unsupported_version",
            RefusalKind::InvalidHello => "invalid_hello",
            RefusalKind::BadCredential => "bad_credential",
            RefusalKind::Timeout => "timeout",
            RefusalKind::Io => "io",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for RefusalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused dial-in: its class and a detailed reason for the listener's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    pub reason: String,
}

impl Refusal {
    pub fn new(kind: RefusalKind, reason: impl Into<String>) -> Self {
        Refusal {
            kind,
            reason: reason.into(),
        }
    }

    /// What the peer is told. Credential failures all read the same so that a
    /// prober cannot tell a valid token id from an invalid one.
    pub fn peer_reason(&self) -> String {
        match self.kind {
            RefusalKind::BadCredential => {
                "invalid credential for this host type and hostname".to_owned()
            }
            _ => self.reason.clone(),
        }
    }
}

impl From<FrameError> for Refusal {
    fn from(e: FrameError) -> Self {
        Refusal::new(RefusalKind::Malformed, e.to_string())
    }
}

/// Encodes `msg` as one length-prefixed frame.
pub fn encode_frame<M: Message>(msg: &M) -> Vec<u8> {
    let body = msg.encode_to_vec();
    // Our own messages are bounded well below u32::MAX; saturate rather than panic.
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Reads the body length from a frame header, refusing oversized frames before any
/// allocation.
pub fn frame_len(header: [u8; HEADER_LEN]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes a frame body as message `M`.
pub fn decode_body<M: Message + Default>(what: &'static str, body: &[u8]) -> Result<M, FrameError> {
    if body.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(body.len()));
    }
    M::decode(body).map_err(|e| FrameError::Decode {
        what,
        message: e.to_string(),
    })
}

/// Decodes one frame from the front of `buf`. `Ok(None)` means more bytes are needed;
/// otherwise returns the message and how many bytes it used.
pub fn decode_frame<M: Message + Default>(
    what: &'static str,
    buf: &[u8],
) -> Result<Option<(M, usize)>, FrameError> {
    let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let len = frame_len(*header)?;
    let Some(body) = buf[HEADER_LEN..].get(..len) else {
        return Ok(None);
    };
    Ok(Some((decode_body(what, body)?, HEADER_LEN + len)))
}

/// A fresh challenge around `nonce`.
pub fn challenge(nonce: [u8; NONCE_LEN]) -> Challenge {
    Challenge {
        protocol_version: PROTOCOL_VERSION,
        nonce: nonce.to_vec(),
    }
}

/// Checks a challenge on the dialer side and returns its nonce.
pub fn validate_challenge(c: &Challenge) -> Result<[u8; NONCE_LEN], Refusal> {
    if c.protocol_version != PROTOCOL_VERSION {
        return Err(Refusal::new(
            RefusalKind::UnsupportedVersion,
            format!(
                "listener speaks handshake version {}, this dialer speaks {PROTOCOL_VERSION}",
                c.protocol_version
            ),
        ));
    }
    <[u8; NONCE_LEN]>::try_from(c.nonce.as_slice()).map_err(|_| {
        Refusal::new(
            RefusalKind::Malformed,
            format!(
                "challenge nonce is {} bytes, want {NONCE_LEN}",
                c.nonce.len()
            ),
        )
    })
}

/// The credential a dialer presents, after validation.
#[derive(Clone, PartialEq, Eq)]
pub enum PresentedCredential {
    BuilderKey {
        proof: [u8; PROOF_LEN],
    },
    HostToken {
        token_id: String,
        proof: [u8; PROOF_LEN],
    },
}

impl fmt::Debug for PresentedCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Proofs are not secrets, but they are noise in logs.
        match self {
            PresentedCredential::BuilderKey { .. } => f.write_str("BuilderKey"),
            PresentedCredential::HostToken { token_id, .. } => f
                .debug_struct("HostToken")
                .field("token_id", token_id)
                .finish(),
        }
    }
}

/// A Hello whose every field passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidHello {
    pub host_type: String,
    pub hostname: String,
    pub buildlet_version: String,
    pub credential: PresentedCredential,
    /// Set on a data connection: the token of the listener's request it answers.
    pub data_token: Option<[u8; DATA_TOKEN_LEN]>,
}

/// Host types and token ids: ASCII letters, digits, `-`, `_`, `.`, starting with a
/// letter or digit.
fn is_name(s: &str) -> bool {
    s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn check_name(field: &str, value: &str, max: usize) -> Result<(), Refusal> {
    if value.is_empty() || value.len() > max || !is_name(value) {
        return Err(Refusal::new(
            RefusalKind::InvalidHello,
            format!(
                "{field} {:?} must be 1 to {max} characters of [A-Za-z0-9._-] starting with a letter or digit",
                truncate(value, 80)
            ),
        ));
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn proof_array(field: &str, proof: &[u8]) -> Result<[u8; PROOF_LEN], Refusal> {
    <[u8; PROOF_LEN]>::try_from(proof).map_err(|_| {
        Refusal::new(
            RefusalKind::InvalidHello,
            format!("{field} is {} bytes, want {PROOF_LEN}", proof.len()),
        )
    })
}

/// Validates a Hello on the listener side. Credentials are checked later, by
/// [`crate::Authenticator`], against the challenge nonce.
pub fn validate_hello(h: &Hello) -> Result<ValidHello, Refusal> {
    if h.protocol_version != PROTOCOL_VERSION {
        return Err(Refusal::new(
            RefusalKind::UnsupportedVersion,
            format!(
                "handshake version {} is not supported, this listener speaks {PROTOCOL_VERSION}",
                h.protocol_version
            ),
        ));
    }
    check_name("host type", &h.host_type, MAX_HOST_TYPE_LEN)?;
    check_name("hostname", &h.hostname, MAX_HOSTNAME_LEN)?;
    let v = &h.buildlet_version;
    if v.is_empty() || v.len() > MAX_VERSION_LEN || !v.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Refusal::new(
            RefusalKind::InvalidHello,
            format!(
                "buildlet version {:?} must be 1 to {MAX_VERSION_LEN} printable ASCII characters",
                truncate(v, 80)
            ),
        ));
    }
    let credential = match &h.credential {
        None => {
            return Err(Refusal::new(
                RefusalKind::InvalidHello,
                "hello carries no credential",
            ));
        }
        Some(hello::Credential::BuilderKeyProof(p)) => PresentedCredential::BuilderKey {
            proof: proof_array("builder key proof", p)?,
        },
        Some(hello::Credential::HostTokenProof(HostTokenProof { token_id, proof })) => {
            check_name("token id", token_id, MAX_TOKEN_ID_LEN)?;
            PresentedCredential::HostToken {
                token_id: token_id.clone(),
                proof: proof_array("host token proof", proof)?,
            }
        }
    };
    let data_token = match h.data_token.len() {
        0 => None,
        _ => Some(
            <[u8; DATA_TOKEN_LEN]>::try_from(h.data_token.as_slice()).map_err(|_| {
                Refusal::new(
                    RefusalKind::InvalidHello,
                    format!(
                        "data token is {} bytes, not {DATA_TOKEN_LEN}",
                        h.data_token.len()
                    ),
                )
            })?,
        ),
    };
    Ok(ValidHello {
        host_type: h.host_type.clone(),
        hostname: h.hostname.clone(),
        buildlet_version: v.clone(),
        credential,
        data_token,
    })
}

fn mac(key: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

/// The raw builder key of `host_type`: HMAC-SHA256(master key, host type).
pub fn builder_key_bytes(master_key: &[u8], host_type: &str) -> [u8; PROOF_LEN] {
    let mut m = mac(master_key);
    m.update(host_type.as_bytes());
    m.finalize().into_bytes().into()
}

/// The builder key of `host_type`, hex-encoded: what `buildlet keygen` prints and a
/// host stores.
pub fn builder_key(master_key: &[u8], host_type: &str) -> String {
    hex::encode(builder_key_bytes(master_key, host_type))
}

fn proof_mac(key: &[u8], nonce: &[u8; NONCE_LEN], host_type: &str, hostname: &str) -> HmacSha256 {
    let mut m = mac(key);
    m.update(nonce);
    m.update(host_type.as_bytes());
    // The separator keeps ("ab", "c") and ("a", "bc") apart.
    m.update(&[0]);
    m.update(hostname.as_bytes());
    m
}

/// HMAC-SHA256(key, nonce || host type || 0x00 || hostname).
pub fn compute_proof(
    key: &[u8],
    nonce: &[u8; NONCE_LEN],
    host_type: &str,
    hostname: &str,
) -> [u8; PROOF_LEN] {
    proof_mac(key, nonce, host_type, hostname)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks a proof in constant time.
pub fn verify_proof(
    key: &[u8],
    nonce: &[u8; NONCE_LEN],
    host_type: &str,
    hostname: &str,
    proof: &[u8],
) -> bool {
    proof_mac(key, nonce, host_type, hostname)
        .verify_slice(proof)
        .is_ok()
}

/// The listener's answer.
pub fn verdict(result: &Result<(), Refusal>) -> Verdict {
    match result {
        Ok(()) => Verdict {
            accepted: true,
            reason: String::new(),
        },
        Err(r) => Verdict {
            accepted: false,
            reason: truncate(&r.peer_reason(), MAX_REASON_LEN).to_owned(),
        },
    }
}

/// What [`fuzz_handshake`] decoded from its input.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FuzzHandshakeOutcome {
    /// Hello frames decoded from the front of the input, one after another.
    pub hellos: usize,
    /// Of those, how many passed [`validate_hello`].
    pub valid_hellos: usize,
    /// Of those, how many the fuzz authenticator accepted.
    pub authenticated: usize,
}

/// Fuzz body of the listener's side of the handshake (the `revdial_handshake` cargo-fuzz
/// target, and `revdial/tests/fuzz_bodies.rs` on stable). Decodes `data` as a stream of
/// Hello frames, validates and authenticates each one (master key `fuzz master`, host
/// token `t1` for host type `linux` with secret `secret`, nonce of 7s), and decodes the
/// input as a Challenge and a Verdict as the dialer would. Panics when a decoded frame
/// claims more bytes than it had, a valid Hello does not survive re-encoding, a proof is
/// accepted that is not the HMAC it should be, or a verdict's reason is over
/// [`MAX_REASON_LEN`].
pub fn fuzz_handshake(data: &[u8]) -> FuzzHandshakeOutcome {
    const MASTER: &[u8] = b"fuzz master";
    let auth = crate::Authenticator::new(MASTER.to_vec()).with_token("t1", "linux", "secret");
    let nonce = [7u8; NONCE_LEN];
    let mut outcome = FuzzHandshakeOutcome::default();

    let mut rest = data;
    while let Ok(Some((hello, used))) = decode_frame::<Hello>("hello", rest) {
        outcome.hellos += 1;
        assert!(
            (HEADER_LEN..=HEADER_LEN + MAX_FRAME_LEN).contains(&used) && used <= rest.len(),
            "decode_frame consumed {used} of {} bytes",
            rest.len()
        );
        match validate_hello(&hello) {
            Ok(valid) => {
                outcome.valid_hellos += 1;
                let again = encode_frame(&hello);
                let (decoded, n) = decode_frame::<Hello>("hello", &again)
                    .expect("a re-encoded hello decodes")
                    .expect("a re-encoded hello is complete");
                assert_eq!(n, again.len(), "re-encoded hello length");
                assert_eq!(validate_hello(&decoded).ok(), Some(valid.clone()));

                let verified = auth.verify(&nonce, &valid);
                let expected_key = match &valid.credential {
                    PresentedCredential::BuilderKey { proof } => {
                        Some((builder_key_bytes(MASTER, &valid.host_type).to_vec(), *proof))
                    }
                    PresentedCredential::HostToken { token_id, proof } => (token_id == "t1"
                        && valid.host_type == "linux")
                        .then(|| (b"secret".to_vec(), *proof)),
                };
                let should_pass = expected_key.is_some_and(|(key, proof)| {
                    compute_proof(&key, &nonce, &valid.host_type, &valid.hostname) == proof
                });
                assert_eq!(
                    verified.is_ok(),
                    should_pass,
                    "authenticator disagrees with the proof for {valid:?}"
                );
                if verified.is_ok() {
                    outcome.authenticated += 1;
                }
                let answer = verdict(&verified);
                assert_eq!(answer.accepted, verified.is_ok());
                assert!(answer.reason.chars().count() <= MAX_REASON_LEN);
            }
            Err(refusal) => {
                assert!(verdict(&Err(refusal)).reason.chars().count() <= MAX_REASON_LEN);
            }
        }
        rest = &rest[used..];
    }

    if let Ok(Some((challenge, used))) = decode_frame::<Challenge>("challenge", data) {
        assert!(used <= data.len());
        if let Ok(nonce) = validate_challenge(&challenge) {
            assert_eq!(challenge.nonce, nonce);
        }
    }
    if let Ok(Some((v, _))) = decode_frame::<Verdict>("verdict", data) {
        // The dialer prints a refusal's reason: it must be printable whatever it holds.
        let _ = format!("{:?}", v.reason);
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello_with(cred: hello::Credential) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            host_type: "host-linux-amd64".into(),
            hostname: "mac-mini-1.lab".into(),
            buildlet_version: "0.1.0".into(),
            credential: Some(cred),
            data_token: Vec::new(),
        }
    }

    fn valid() -> Hello {
        hello_with(hello::Credential::BuilderKeyProof(vec![7; 32]))
    }

    #[test]
    fn a_data_token_is_32_bytes_or_absent() {
        assert_eq!(validate_hello(&valid()).unwrap().data_token, None);
        let mut h = valid();
        h.data_token = vec![9; DATA_TOKEN_LEN];
        assert_eq!(
            validate_hello(&h).unwrap().data_token,
            Some([9; DATA_TOKEN_LEN])
        );
        for len in [1, DATA_TOKEN_LEN - 1, DATA_TOKEN_LEN + 1] {
            h.data_token = vec![9; len];
            let r = validate_hello(&h).unwrap_err();
            assert_eq!(r.kind, RefusalKind::InvalidHello, "{len}: {r:?}");
            assert!(r.reason.contains("data token"), "{}", r.reason);
        }
    }

    #[test]
    fn frame_round_trips_and_reports_consumed_bytes() {
        let h = valid();
        let mut buf = encode_frame(&h);
        let one = buf.len();
        buf.extend_from_slice(&encode_frame(&challenge([1; 32])));
        let (got, used) = decode_frame::<Hello>("hello", &buf).unwrap().unwrap();
        assert_eq!(got, h);
        assert_eq!(used, one);
        let (c, used2) = decode_frame::<Challenge>("challenge", &buf[used..])
            .unwrap()
            .unwrap();
        assert_eq!(c.nonce, vec![1; 32]);
        assert_eq!(used + used2, buf.len());
    }

    #[test]
    fn partial_frames_ask_for_more() {
        let buf = encode_frame(&valid());
        for cut in 0..buf.len() {
            assert_eq!(
                decode_frame::<Hello>("hello", &buf[..cut]).unwrap(),
                None,
                "cut {cut}"
            );
        }
    }

    #[test]
    fn oversized_frame_is_refused_from_the_header_alone() {
        let mut buf = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes().to_vec();
        buf.push(0);
        assert_eq!(
            decode_frame::<Hello>("hello", &buf),
            Err(FrameError::TooLarge(MAX_FRAME_LEN + 1))
        );
        assert_eq!(
            frame_len([0xff; 4]),
            Err(FrameError::TooLarge(u32::MAX as usize))
        );
        assert_eq!(
            frame_len((MAX_FRAME_LEN as u32).to_be_bytes()),
            Ok(MAX_FRAME_LEN)
        );
    }

    #[test]
    fn garbage_body_is_a_decode_error() {
        // Field 1 with wire type 7 does not exist.
        let body = [0x0f, 0xff, 0xff];
        let err = decode_body::<Hello>("hello", &body).unwrap_err();
        assert!(
            matches!(err, FrameError::Decode { what: "hello", .. }),
            "{err:?}"
        );
        let r: Refusal = err.into();
        assert_eq!(r.kind, RefusalKind::Malformed);
    }

    #[test]
    fn valid_hello_passes() {
        let v = validate_hello(&valid()).unwrap();
        assert_eq!(v.host_type, "host-linux-amd64");
        assert_eq!(
            v.credential,
            PresentedCredential::BuilderKey { proof: [7; 32] }
        );
        let t = validate_hello(&hello_with(hello::Credential::HostTokenProof(
            HostTokenProof {
                token_id: "tok-1".into(),
                proof: vec![1; 32],
            },
        )))
        .unwrap();
        assert!(
            matches!(t.credential, PresentedCredential::HostToken { ref token_id, .. } if token_id == "tok-1")
        );
    }

    #[test]
    fn invalid_hellos_are_refused_with_their_kind() {
        type Mutation = Box<dyn Fn(&mut Hello)>;
        let cases: Vec<(&str, Mutation, RefusalKind)> = vec![
            (
                "version",
                Box::new(|h| h.protocol_version = 2),
                RefusalKind::UnsupportedVersion,
            ),
            (
                "version 0",
                Box::new(|h| h.protocol_version = 0),
                RefusalKind::UnsupportedVersion,
            ),
            (
                "empty host type",
                Box::new(|h| h.host_type.clear()),
                RefusalKind::InvalidHello,
            ),
            (
                "slash",
                Box::new(|h| h.host_type = "a/b".into()),
                RefusalKind::InvalidHello,
            ),
            (
                "leading dot",
                Box::new(|h| h.hostname = ".x".into()),
                RefusalKind::InvalidHello,
            ),
            (
                "newline",
                Box::new(|h| h.hostname = "a\nb".into()),
                RefusalKind::InvalidHello,
            ),
            (
                "long",
                Box::new(|h| h.host_type = "a".repeat(65)),
                RefusalKind::InvalidHello,
            ),
            (
                "long hostname",
                Box::new(|h| h.hostname = "a".repeat(254)),
                RefusalKind::InvalidHello,
            ),
            (
                "unicode",
                Box::new(|h| h.hostname = "hôte".into()),
                RefusalKind::InvalidHello,
            ),
            (
                "no version",
                Box::new(|h| h.buildlet_version.clear()),
                RefusalKind::InvalidHello,
            ),
            (
                "space version",
                Box::new(|h| h.buildlet_version = "1 2".into()),
                RefusalKind::InvalidHello,
            ),
            (
                "no credential",
                Box::new(|h| h.credential = None),
                RefusalKind::InvalidHello,
            ),
            (
                "short proof",
                Box::new(|h| h.credential = Some(hello::Credential::BuilderKeyProof(vec![1; 31]))),
                RefusalKind::InvalidHello,
            ),
            (
                "bad token id",
                Box::new(|h| {
                    h.credential = Some(hello::Credential::HostTokenProof(HostTokenProof {
                        token_id: String::new(),
                        proof: vec![1; 32],
                    }))
                }),
                RefusalKind::InvalidHello,
            ),
        ];
        for (name, mutate, kind) in cases {
            let mut h = valid();
            mutate(&mut h);
            let err = validate_hello(&h).expect_err(name);
            assert_eq!(err.kind, kind, "{name}: {}", err.reason);
        }
        assert!(
            validate_hello(&{
                let mut h = valid();
                h.host_type = "a".repeat(64);
                h.hostname = "b".repeat(253);
                h
            })
            .is_ok()
        );
    }

    #[test]
    fn challenge_validation() {
        assert_eq!(validate_challenge(&challenge([9; 32])), Ok([9; 32]));
        let short = Challenge {
            protocol_version: 1,
            nonce: vec![1; 16],
        };
        assert_eq!(
            validate_challenge(&short).unwrap_err().kind,
            RefusalKind::Malformed
        );
        let v2 = Challenge {
            protocol_version: 2,
            nonce: vec![1; 32],
        };
        assert_eq!(
            validate_challenge(&v2).unwrap_err().kind,
            RefusalKind::UnsupportedVersion
        );
    }

    #[test]
    fn builder_key_matches_a_known_hmac_and_differs_by_host_type() {
        // RFC 4231 test case 2: HMAC-SHA256("Jefe", "what do ya want for nothing?").
        assert_eq!(
            builder_key(b"Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_ne!(
            builder_key(b"m", "linux-amd64"),
            builder_key(b"m", "linux-arm64")
        );
        assert_ne!(
            builder_key(b"m1", "linux-amd64"),
            builder_key(b"m2", "linux-amd64")
        );
    }

    #[test]
    fn proofs_bind_nonce_host_type_and_hostname() {
        let key = builder_key_bytes(b"master", "linux-amd64");
        let n1 = [1; NONCE_LEN];
        let p = compute_proof(&key, &n1, "linux-amd64", "h1");
        assert!(verify_proof(&key, &n1, "linux-amd64", "h1", &p));
        assert!(
            !verify_proof(&key, &[2; NONCE_LEN], "linux-amd64", "h1", &p),
            "replay"
        );
        assert!(
            !verify_proof(&key, &n1, "linux-amd6", "4h1", &p),
            "separator"
        );
        assert!(
            !verify_proof(&key, &n1, "linux-amd64", "h2", &p),
            "hostname"
        );
        assert!(!verify_proof(&[0; 32], &n1, "linux-amd64", "h1", &p), "key");
        assert!(
            !verify_proof(&key, &n1, "linux-amd64", "h1", &p[..31]),
            "truncated"
        );
    }

    /// What the fuzz target does, on mutations of a valid frame: never panic.
    #[test]
    fn mutated_frames_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let base = encode_frame(&valid());
        for _ in 0..20_000 {
            let mut buf = base.clone();
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..buf.len());
                buf[i] = rng.random();
            }
            buf.truncate(rng.random_range(0..=buf.len()));
            if let Ok(Some((h, used))) = decode_frame::<Hello>("hello", &buf) {
                assert!(used <= buf.len());
                let _ = validate_hello(&h);
            }
            let _ = decode_frame::<Challenge>("challenge", &buf);
        }
    }

    #[test]
    fn credential_refusals_do_not_leak_detail_to_the_peer() {
        let r = Refusal::new(RefusalKind::BadCredential, "unknown token id \"x\"");
        let v = verdict(&Err(r));
        assert!(!v.accepted);
        assert!(!v.reason.contains('x'), "{}", v.reason);
        let long = Refusal::new(RefusalKind::InvalidHello, "y".repeat(10_000));
        assert_eq!(verdict(&Err(long)).reason.len(), MAX_REASON_LEN);
        assert!(verdict(&Ok(())).accepted);
    }
}
