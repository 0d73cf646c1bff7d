//! Who may dial in: the listener's secrets (the builder master key and per-host
//! tokens) and the check of a validated Hello's proof against the challenge nonce.
//! Pure code; the listener calls [`Authenticator::verify`].

use std::collections::HashMap;
use std::fmt;

use crate::handshake::{
    NONCE_LEN, PresentedCredential, Refusal, RefusalKind, ValidHello, builder_key_bytes,
    verify_proof,
};

/// A per-host token, bound to one host type.
#[derive(Clone)]
pub struct HostToken {
    pub host_type: String,
    pub secret: String,
}

impl fmt::Debug for HostToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostToken")
            .field("host_type", &self.host_type)
            .finish_non_exhaustive()
    }
}

/// Verifies dial-in credentials. Cheap to clone.
#[derive(Clone, Default)]
pub struct Authenticator {
    master_key: Option<Vec<u8>>,
    tokens: HashMap<String, HostToken>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print secrets.
        f.debug_struct("Authenticator")
            .field("has_master_key", &self.master_key.is_some())
            .field("token_ids", &self.tokens.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Authenticator {
    /// Accepts builder keys derived from `master_key` (see [`crate::builder_key`]).
    pub fn new(master_key: impl Into<Vec<u8>>) -> Self {
        Authenticator {
            master_key: Some(master_key.into()),
            tokens: HashMap::new(),
        }
    }

    /// Accepts only host tokens (add them with [`Authenticator::with_token`]).
    pub fn tokens_only() -> Self {
        Authenticator::default()
    }

    /// Adds (or replaces) a host token `id` valid for `host_type`.
    pub fn with_token(
        mut self,
        id: impl Into<String>,
        host_type: impl Into<String>,
        secret: impl Into<String>,
    ) -> Self {
        self.tokens.insert(
            id.into(),
            HostToken {
                host_type: host_type.into(),
                secret: secret.into(),
            },
        );
        self
    }

    /// Checks `hello`'s proof over `nonce`. Every failure is `BadCredential`; the
    /// detail is for the listener's log only.
    pub fn verify(&self, nonce: &[u8; NONCE_LEN], hello: &ValidHello) -> Result<(), Refusal> {
        let bad = |reason: String| Err(Refusal::new(RefusalKind::BadCredential, reason));
        match &hello.credential {
            PresentedCredential::BuilderKey { proof } => {
                let Some(master) = &self.master_key else {
                    return bad("builder keys are not accepted by this listener".into());
                };
                let key = builder_key_bytes(master, &hello.host_type);
                if verify_proof(&key, nonce, &hello.host_type, &hello.hostname, proof) {
                    Ok(())
                } else {
                    bad(format!(
                        "builder key proof does not match host type {:?} (wrong key, key of another host type, or a replayed hello)",
                        hello.host_type
                    ))
                }
            }
            PresentedCredential::HostToken { token_id, proof } => {
                let Some(token) = self.tokens.get(token_id) else {
                    return bad(format!("unknown host token id {token_id:?}"));
                };
                if token.host_type != hello.host_type {
                    return bad(format!(
                        "host token {token_id:?} is for host type {:?}, not {:?}",
                        token.host_type, hello.host_type
                    ));
                }
                if verify_proof(
                    token.secret.as_bytes(),
                    nonce,
                    &hello.host_type,
                    &hello.hostname,
                    proof,
                ) {
                    Ok(())
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
}
