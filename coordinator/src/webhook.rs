//! The push webhook's request check, as a pure function over the config, the repo name
//! from the URL, the signature header and the body: no I/O, so it is fuzzed
//! (`fuzz/fuzz_targets/webhook.rs`, `coordinator/tests/fuzz_bodies.rs`). The HTTP handler
//! in `http.rs` maps the outcome to a status and kicks the poller.
//!
//! Uses only `buildfarm_config`, `hmac`, `sha2` and `hex` (never `crate::`): the fuzz crate
//! compiles this file on its own so it need not build the whole coordinator.

use buildfarm_config::{Config, Repo};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header GitHub (and compatible senders) sign the body with.
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";

/// Why a webhook call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("unknown repo {0:?}")]
    UnknownRepo(String),
    /// A repo without `webhook_secret` takes no webhooks unless it opts in with
    /// `danger_accept_unsigned_webhooks`.
    #[error(
        "webhooks for repo {0:?} are refused: it has no webhook_secret to check a signature with \
         (set webhook_secret, or danger_accept_unsigned_webhooks = true to accept unsigned ones)"
    )]
    NotEnabled(String),
    #[error("missing X-Hub-Signature-256")]
    MissingSignature,
    #[error("X-Hub-Signature-256 is not \"sha256=\" followed by hex digits")]
    MalformedSignature,
    #[error("signature mismatch")]
    Mismatch,
}

impl WebhookError {
    /// The HTTP status this refusal is answered with.
    pub fn status(&self) -> u16 {
        match self {
            WebhookError::UnknownRepo(_) => 404,
            WebhookError::MissingSignature | WebhookError::MalformedSignature => 401,
            WebhookError::NotEnabled(_) | WebhookError::Mismatch => 403,
        }
    }
}

/// A webhook call that passed [`check_push`].
#[derive(Debug, Clone, Copy)]
pub struct Push<'c> {
    /// The repo to poll.
    pub repo: &'c Repo,
    /// False when accepted unsigned under `danger_accept_unsigned_webhooks`.
    pub signed: bool,
}

/// Checks a push webhook for `repo` whose `X-Hub-Signature-256` header is `signature` (raw
/// header bytes, if present) over `body`.
pub fn check_push<'c>(
    config: &'c Config,
    repo: &str,
    signature: Option<&[u8]>,
    body: &[u8],
) -> Result<Push<'c>, WebhookError> {
    let Some(cfg) = config.repo(repo) else {
        return Err(WebhookError::UnknownRepo(repo.to_owned()));
    };
    let Some(secret) = &cfg.webhook_secret else {
        if cfg.danger_accept_unsigned_webhooks {
            return Ok(Push {
                repo: cfg,
                signed: false,
            });
        }
        return Err(WebhookError::NotEnabled(cfg.name.clone()));
    };
    let signature = signature.ok_or(WebhookError::MissingSignature)?;
    let digest = signature
        .strip_prefix(b"sha256=")
        .and_then(|hex_digits| hex::decode(hex_digits).ok())
        .ok_or(WebhookError::MalformedSignature)?;
    let mut mac = signer(secret.expose().as_bytes());
    mac.update(body);
    // Constant time; a digest of the wrong length is a mismatch too.
    mac.verify_slice(&digest)
        .map_err(|_| WebhookError::Mismatch)?;
    Ok(Push {
        repo: cfg,
        signed: true,
    })
}

/// The header value a sender with `secret` puts on `body`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = signer(secret);
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn signer(secret: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length, so this cannot fail.
    Hmac::<Sha256>::new_from_slice(secret).unwrap_or_else(|_| unreachable!())
}

/// The config the fuzz body checks against: repo `signed` with secret `s3cret`, repo
/// `open` without one, repo `unsigned` that opted in to unsigned calls.
pub fn fuzz_config() -> Config {
    let text = r#"
[[repos]]
name = "signed"
url = "file:///nonexistent/signed"
webhook_secret = "s3cret"

[[repos]]
name = "open"
url = "file:///nonexistent/open"

[[repos]]
name = "unsigned"
url = "file:///nonexistent/unsigned"
danger_accept_unsigned_webhooks = true
"#;
    match Config::from_toml_str(text, "webhook fuzz config") {
        Ok(c) => c,
        Err(e) => panic!("the webhook fuzz config is invalid: {e}"),
    }
}

/// Fuzz body of the webhook check (the `webhook` cargo-fuzz target, and
/// `coordinator/tests/fuzz_bodies.rs` on stable). The input is split as
/// `repo \n signature-header \n body` (a missing part is absent); the check runs on it as
/// given and again with the correct signature of the body. Panics when the outcome breaks
/// the contract: only a `signed` request whose header is exactly the body's HMAC (hex in
/// any case), or any request for `unsigned`, is accepted; a correctly signed body is always
/// accepted, and a one-bit change of the body is refused.
pub fn fuzz_check(config: &Config, data: &[u8]) -> Result<(), WebhookError> {
    let mut parts = data.splitn(3, |&b| b == b'\n');
    let repo = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let header = parts.next();
    let body = parts.next().unwrap_or_default();
    let secret = b"s3cret";

    let result = check_push(config, &repo, header, body).map(|push| {
        assert_eq!(push.repo.name, repo);
        assert_eq!(push.signed, repo == "signed");
    });
    let expected = sign(secret, body);
    let header_is_right = header.is_some_and(|h| {
        h.strip_prefix(b"sha256=")
            .is_some_and(|hx| hx.eq_ignore_ascii_case(&expected.as_bytes()[7..]))
    });
    assert_eq!(
        result.is_ok(),
        (repo == "signed" && header_is_right) || repo == "unsigned",
        "accepted {repo:?} with header {:?}: {result:?}",
        header.map(String::from_utf8_lossy)
    );
    if let Err(e) = &result {
        assert!((400..500).contains(&e.status()));
    }

    if repo == "signed" {
        let signed = check_push(config, &repo, Some(expected.as_bytes()), body);
        assert!(
            signed.is_ok(),
            "a correctly signed body was refused: {signed:?}"
        );
        let mut flipped = body.to_vec();
        match flipped.first_mut() {
            Some(b) => *b ^= 1,
            None => flipped.push(0),
        }
        assert_eq!(
            check_push(config, &repo, Some(expected.as_bytes()), &flipped).map(|_| ()),
            Err(WebhookError::Mismatch)
        );
    }
    result
}
