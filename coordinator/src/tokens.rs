//! User tokens for the public API (gomote, try). A token is `<user>.<hex mac>` where the
//! MAC is HMAC-SHA256 of the user name under the coordinator's master key: the
//! coordinator issues and checks them without storing anything.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const DOMAIN: &[u8] = b"buildfarm user token v1\0";

fn mac(master_key: &[u8], user: &str) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(master_key)
        .unwrap_or_else(|_| unreachable!("hmac takes any key length"));
    mac.update(DOMAIN);
    mac.update(user.as_bytes());
    mac
}

/// Is `user` an acceptable user name (letters, digits, `-`, `_`, `@`, `.` but no leading dot)?
pub fn valid_user(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 64
        && !user.starts_with('.')
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_@.".contains(c))
}

/// Issues the token of `user`.
pub fn issue(master_key: &[u8], user: &str) -> String {
    let tag = mac(master_key, user).finalize().into_bytes();
    format!("{user}.{}", hex::encode(tag))
}

/// Checks a token and returns its user. Constant-time comparison.
pub fn verify(master_key: &[u8], token: &str) -> Option<String> {
    let (user, tag_hex) = token.rsplit_once('.')?;
    if !valid_user(user) {
        return None;
    }
    let tag = hex::decode(tag_hex).ok()?;
    mac(master_key, user).verify_slice(&tag).ok()?;
    Some(user.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_verify_and_forgeries_do_not() {
        let key = b"master";
        let token = issue(key, "alice");
        assert_eq!(verify(key, &token).as_deref(), Some("alice"));
        assert_eq!(verify(b"other master", &token), None);
        let forged = token.replacen("alice", "mallory", 1);
        assert_eq!(verify(key, &forged), None);
        assert_eq!(verify(key, "alice"), None);
        assert_eq!(verify(key, "alice.zz"), None);
        assert_eq!(verify(key, ""), None);
    }

    #[test]
    fn user_names_with_dots_round_trip() {
        let token = issue(b"k", "a.b@example.com");
        assert_eq!(verify(b"k", &token).as_deref(), Some("a.b@example.com"));
    }
}
