//! Who may call the buildlet in listen mode. A caller is let in when it either
//! presented a TLS client certificate that chains to `--client-ca` (the coordinator
//! issues these), or sends `authorization: Bearer <key>` with the key the buildlet was
//! started with (compared in constant time).
//!
//! A client certificate that does *not* chain to the CA never gets here: the TLS
//! handshake itself fails. No credentials at all is `Unauthenticated`; a wrong or
//! unexpected bearer key is `PermissionDenied`.
//!
//! Reverse mode does not use this: the tunnel was authenticated when it was dialled.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

/// What the listen-mode TLS layer learned about a connection; the listen-mode server
/// inserts it into every request's extensions.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    pub remote_addr: Option<std::net::SocketAddr>,
    /// True when the peer presented a client certificate, which the TLS layer has
    /// already verified against the client CA (a bad one fails the handshake).
    pub verified_client_cert: bool,
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no credentials: present a client certificate or an authorization bearer key")]
    Missing,
    #[error("malformed authorization metadata: expected \"Bearer <key>\"")]
    Malformed,
    #[error("bearer key rejected")]
    WrongKey,
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Status {
        match e {
            AuthError::Missing | AuthError::Malformed => Status::unauthenticated(e.to_string()),
            AuthError::WrongKey => Status::permission_denied(e.to_string()),
        }
    }
}

/// The accepted credentials. Cheap to clone.
#[derive(Clone)]
pub struct AuthPolicy {
    /// SHA-256 of the bearer key, so that comparisons take the same time whatever the
    /// length of what the caller sent.
    key_digest: Option<Arc<[u8; 32]>>,
}

impl std::fmt::Debug for AuthPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("AuthPolicy")
            .field("bearer_key", &self.key_digest.is_some())
            .finish()
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl AuthPolicy {
    /// `bearer_key`: the key callers may present, if any. Client certificates are
    /// accepted whenever the TLS layer verified one (it only asks for them when the
    /// buildlet has a client CA).
    pub fn new(bearer_key: Option<&str>) -> Self {
        AuthPolicy {
            key_digest: bearer_key.map(|k| Arc::new(digest(k.trim().as_bytes()))),
        }
    }

    /// Decides on one call. Pure: `verified_client_cert` says whether the TLS layer
    /// verified a client certificate, `authorization` is the metadata value if any.
    pub fn check(
        &self,
        verified_client_cert: bool,
        authorization: Option<&[u8]>,
    ) -> Result<(), AuthError> {
        if verified_client_cert {
            return Ok(());
        }
        let Some(value) = authorization else {
            return Err(AuthError::Missing);
        };
        let value = std::str::from_utf8(value).map_err(|_| AuthError::Malformed)?;
        let Some((scheme, key)) = value.trim().split_once(' ') else {
            return Err(AuthError::Malformed);
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Malformed);
        }
        let Some(expected) = &self.key_digest else {
            return Err(AuthError::WrongKey);
        };
        let got = digest(key.trim().as_bytes());
        if bool::from(got.ct_eq(expected.as_ref())) {
            Ok(())
        } else {
            Err(AuthError::WrongKey)
        }
    }

    /// The tonic interceptor applying this policy.
    pub fn interceptor(
        self,
    ) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static
    {
        move |req: Request<()>| {
            let peer = req.extensions().get::<PeerInfo>();
            let cert = peer.is_some_and(|p| p.verified_client_cert);
            let auth = req.metadata().get("authorization").map(|v| v.as_bytes());
            match self.check(cert, auth) {
                Ok(()) => Ok(req),
                Err(e) => {
                    let peer = peer.and_then(|p| p.remote_addr);
                    tracing::warn!(?peer, error = %e, "refused call");
                    Err(e.into())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        let p = AuthPolicy::new(Some("s3cret"));
        assert_eq!(p.check(true, None), Ok(()));
        assert_eq!(p.check(false, None), Err(AuthError::Missing));
        assert_eq!(p.check(false, Some(b"Bearer s3cret")), Ok(()));
        assert_eq!(p.check(false, Some(b"bearer s3cret")), Ok(()));
        assert_eq!(
            p.check(false, Some(b"Bearer wrong")),
            Err(AuthError::WrongKey)
        );
        assert_eq!(
            p.check(false, Some(b"Bearer s3cre")),
            Err(AuthError::WrongKey)
        );
        assert_eq!(
            p.check(false, Some(b"Basic s3cret")),
            Err(AuthError::Malformed)
        );
        assert_eq!(p.check(false, Some(b"s3cret")), Err(AuthError::Malformed));
        let no_key = AuthPolicy::new(None);
        assert_eq!(
            no_key.check(false, Some(b"Bearer x")),
            Err(AuthError::WrongKey)
        );
        assert_eq!(no_key.check(true, None), Ok(()));
    }

    #[test]
    fn status_codes() {
        assert_eq!(
            Status::from(AuthError::Missing).code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            Status::from(AuthError::WrongKey).code(),
            tonic::Code::PermissionDenied
        );
    }
}
