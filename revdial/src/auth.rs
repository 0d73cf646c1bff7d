//! Who may dial in: the listener's secrets (the builder master key and per-host
//! tokens) and the check of a validated Hello's proof against the challenge nonce.
//! Pure code; the listener calls [`Authenticator::verify`].

use std::collections::HashMap;
use std::fmt;
use std::time::SystemTime;

use crate::handshake::{
    NONCE_LEN, PresentedCredential, Refusal, RefusalKind, ValidHello, builder_key_bytes,
    verify_proof,
};

/// A per-host token, bound to one host type, accepted for new dial-ins until `not_after`.
#[derive(Clone)]
pub struct HostToken {
    pub host_type: String,
    pub secret: String,
    /// New dial-ins with this secret are refused after this time (none: no end).
    pub not_after: Option<SystemTime>,
}

impl fmt::Debug for HostToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostToken")
            .field("host_type", &self.host_type)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A secret builder keys derive from, accepted until `not_after`.
#[derive(Clone)]
struct BuilderSecret {
    key: Vec<u8>,
    not_after: Option<SystemTime>,
}

fn expired(not_after: Option<SystemTime>, now: SystemTime) -> bool {
    not_after.is_some_and(|t| now > t)
}

/// Verifies dial-in credentials. Cheap to clone. Several builder-key secrets and several
/// secrets per host token id may be valid at once, each until its own `not_after`, so
/// keys can be rotated with an overlap; only new handshakes are checked, so a machine
/// already connected is never dropped when its key retires.
#[derive(Clone, Default)]
pub struct Authenticator {
    builder_secrets: Vec<BuilderSecret>,
    tokens: HashMap<String, Vec<HostToken>>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print secrets.
        f.debug_struct("Authenticator")
            .field("builder_secrets", &self.builder_secrets.len())
            .field("token_ids", &self.tokens.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Authenticator {
    /// Accepts builder keys derived from `master_key` (see [`crate::builder_key`]).
    pub fn new(master_key: impl Into<Vec<u8>>) -> Self {
        Authenticator::tokens_only().with_builder_secret(master_key, None)
    }

    /// Accepts only host tokens (add them with [`Authenticator::with_token`]).
    pub fn tokens_only() -> Self {
        Authenticator::default()
    }

    /// Also accepts builder keys derived from `secret`, until `not_after` if given.
    pub fn with_builder_secret(
        mut self,
        secret: impl Into<Vec<u8>>,
        not_after: Option<SystemTime>,
    ) -> Self {
        self.builder_secrets.push(BuilderSecret {
            key: secret.into(),
            not_after,
        });
        self
    }

    /// Adds (or replaces) a host token `id` valid for `host_type`, with no end.
    pub fn with_token(
        mut self,
        id: impl Into<String>,
        host_type: impl Into<String>,
        secret: impl Into<String>,
    ) -> Self {
        let id = id.into();
        self.tokens.remove(&id);
        self.with_token_until(id, host_type, secret, None)
    }

    /// Adds one more secret for host token `id` (valid for `host_type`), accepted until
    /// `not_after` if given; secrets added before for the same id stay valid.
    pub fn with_token_until(
        mut self,
        id: impl Into<String>,
        host_type: impl Into<String>,
        secret: impl Into<String>,
        not_after: Option<SystemTime>,
    ) -> Self {
        self.tokens.entry(id.into()).or_default().push(HostToken {
            host_type: host_type.into(),
            secret: secret.into(),
            not_after,
        });
        self
    }

    /// Checks `hello`'s proof over `nonce` now; see [`Authenticator::verify_at`].
    pub fn verify(&self, nonce: &[u8; NONCE_LEN], hello: &ValidHello) -> Result<(), Refusal> {
        self.verify_at(SystemTime::now(), nonce, hello)
    }

    /// Checks `hello`'s proof over `nonce` at time `now`: a secret past its `not_after`
    /// is not accepted. Every failure is `BadCredential`; the detail is for the
    /// listener's log only.
    pub fn verify_at(
        &self,
        now: SystemTime,
        nonce: &[u8; NONCE_LEN],
        hello: &ValidHello,
    ) -> Result<(), Refusal> {
        let bad = |reason: String| Err(Refusal::new(RefusalKind::BadCredential, reason));
        match &hello.credential {
            PresentedCredential::BuilderKey { proof } => {
                if self.builder_secrets.is_empty() {
                    return bad("builder keys are not accepted by this listener".into());
                }
                let mut retired = false;
                for secret in &self.builder_secrets {
                    let key = builder_key_bytes(&secret.key, &hello.host_type);
                    if verify_proof(&key, nonce, &hello.host_type, &hello.hostname, proof) {
                        if expired(secret.not_after, now) {
                            retired = true;
                            continue;
                        }
                        return Ok(());
                    }
                }
                if retired {
                    bad(format!(
                        "builder key of host type {:?} was retired (past its not_after)",
                        hello.host_type
                    ))
                } else {
                    bad(format!(
                        "builder key proof does not match host type {:?} (wrong key, key of another host type, or a replayed hello)",
                        hello.host_type
                    ))
                }
            }
            PresentedCredential::HostToken { token_id, proof } => {
                let Some(secrets) = self.tokens.get(token_id) else {
                    return bad(format!("unknown host token id {token_id:?}"));
                };
                let mut retired = false;
                let mut other_type = None;
                for token in secrets {
                    if token.host_type != hello.host_type {
                        other_type = Some(&token.host_type);
                        continue;
                    }
                    if verify_proof(
                        token.secret.as_bytes(),
                        nonce,
                        &hello.host_type,
                        &hello.hostname,
                        proof,
                    ) {
                        if expired(token.not_after, now) {
                            retired = true;
                            continue;
                        }
                        return Ok(());
                    }
                }
                if retired {
                    bad(format!(
                        "host token {token_id:?} secret was retired (past its not_after)"
                    ))
                } else if let Some(t) = other_type {
                    bad(format!(
                        "host token {token_id:?} is for host type {t:?}, not {:?}",
                        hello.host_type
                    ))
                } else {
                    bad(format!(
                        "host token {token_id:?} proof does not match (wrong secret or a replayed hello)"
                    ))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::compute_proof;

    const NONCE: [u8; NONCE_LEN] = [3; NONCE_LEN];

    fn hello(host_type: &str, credential: PresentedCredential) -> ValidHello {
        ValidHello {
            host_type: host_type.into(),
            hostname: "h1".into(),
            buildlet_version: "1".into(),
            credential,
            data_token: None,
        }
    }

    fn key_hello(key_owner_type: &str, claimed_type: &str) -> ValidHello {
        let key = builder_key_bytes(b"master", key_owner_type);
        let proof = compute_proof(&key, &NONCE, claimed_type, "h1");
        hello(claimed_type, PresentedCredential::BuilderKey { proof })
    }

    fn token_hello(secret: &str, id: &str, host_type: &str) -> ValidHello {
        let proof = compute_proof(secret.as_bytes(), &NONCE, host_type, "h1");
        hello(
            host_type,
            PresentedCredential::HostToken {
                token_id: id.into(),
                proof,
            },
        )
    }

    #[test]
    fn builder_keys() {
        let auth = Authenticator::new(b"master".to_vec());
        assert_eq!(auth.verify(&NONCE, &key_hello("linux", "linux")), Ok(()));
        let err = auth
            .verify(&NONCE, &key_hello("darwin", "linux"))
            .unwrap_err();
        assert_eq!(err.kind, RefusalKind::BadCredential);
        let other = Authenticator::new(b"other".to_vec());
        assert!(other.verify(&NONCE, &key_hello("linux", "linux")).is_err());
        assert!(
            Authenticator::tokens_only()
                .verify(&NONCE, &key_hello("linux", "linux"))
                .is_err()
        );
    }

    #[test]
    fn host_tokens() {
        let auth = Authenticator::tokens_only().with_token("t1", "linux", "s3cret");
        assert_eq!(
            auth.verify(&NONCE, &token_hello("s3cret", "t1", "linux")),
            Ok(())
        );
        for (h, why) in [
            (token_hello("wrong", "t1", "linux"), "wrong secret"),
            (token_hello("s3cret", "t2", "linux"), "unknown id"),
            (token_hello("s3cret", "t1", "darwin"), "other host type"),
        ] {
            let err = auth.verify(&NONCE, &h).expect_err(why);
            assert_eq!(err.kind, RefusalKind::BadCredential, "{why}");
        }
        assert!(!format!("{auth:?}").contains("s3cret"));
    }

    #[test]
    fn rotated_secrets_overlap_until_not_after() {
        let t0 = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        let later = t0 + std::time::Duration::from_secs(60);
        let auth = Authenticator::tokens_only()
            .with_builder_secret(b"master".to_vec(), Some(t0))
            .with_builder_secret(b"new master".to_vec(), None)
            .with_token_until("t1", "linux", "old", Some(t0))
            .with_token_until("t1", "linux", "new", None);
        let new_key = {
            let key = builder_key_bytes(b"new master", "linux");
            let proof = compute_proof(&key, &NONCE, "linux", "h1");
            hello("linux", PresentedCredential::BuilderKey { proof })
        };
        // Before the old secrets retire, old and new are both accepted.
        for (h, what) in [
            (key_hello("linux", "linux"), "old builder key"),
            (new_key.clone(), "new builder key"),
            (token_hello("old", "t1", "linux"), "old token secret"),
            (token_hello("new", "t1", "linux"), "new token secret"),
        ] {
            assert_eq!(auth.verify_at(t0, &NONCE, &h), Ok(()), "{what}");
        }
        // After, only the new ones; the refusal says the key was retired.
        for (h, what) in [
            (key_hello("linux", "linux"), "old builder key"),
            (token_hello("old", "t1", "linux"), "old token secret"),
        ] {
            let err = auth.verify_at(later, &NONCE, &h).expect_err(what);
            assert_eq!(err.kind, RefusalKind::BadCredential);
            assert!(err.reason.contains("retired"), "{what}: {}", err.reason);
        }
        assert_eq!(auth.verify_at(later, &NONCE, &new_key), Ok(()));
        assert_eq!(
            auth.verify_at(later, &NONCE, &token_hello("new", "t1", "linux")),
            Ok(())
        );
    }
}
