//! User tokens for the public API and the pages, as text: a token is `<id>.<secret>`,
//! both random hex. The store keeps the id, the user, the role and a SHA-256 of the
//! secret, never the secret itself, so a copy of the database grants nothing. Pure
//! functions; `access::registry` keeps the valid set.

use sha2::{Digest, Sha256};

/// Hex digits of a token id (64 random bits).
const ID_HEX: usize = 16;
/// Hex digits of a token secret (256 random bits).
const SECRET_HEX: usize = 64;

/// Is `user` an acceptable user name (letters, digits, `-`, `_`, `@`, `.` but no leading dot)?
pub fn valid_user(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 64
        && !user.starts_with('.')
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_@.".contains(c))
}

/// A token just made: what the user gets (`token`) and what the store keeps.
#[derive(Debug, Clone)]
pub struct Minted {
    pub id: String,
    pub token: String,
    pub secret_hash: String,
}

/// Makes a new random token.
pub fn mint() -> Minted {
    let id: [u8; ID_HEX / 2] = rand::random();
    let secret: [u8; SECRET_HEX / 2] = rand::random();
    let (id, secret) = (hex::encode(id), hex::encode(secret));
    Minted {
        token: format!("{id}.{secret}"),
        secret_hash: hash_secret(&secret),
        id,
    }
}

/// The hex SHA-256 of a token's secret half, as the store keeps it.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Splits a token into id and secret if it has the right shape.
pub fn parse(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.split_once('.')?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, ID_HEX) && hex(secret, SECRET_HEX)).then_some((id, secret))
}

/// Does `secret` hash to `stored_hash`? Compares in constant time.
pub fn secret_matches(secret: &str, stored_hash: &str) -> bool {
    let Ok(stored) = hex::decode(stored_hash) else {
        return false;
    };
    let got = Sha256::digest(secret.as_bytes());
    stored.len() == got.len()
        && stored
            .iter()
            .zip(got.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_parse_and_match_only_their_hash() {
        let a = mint();
        let b = mint();
        assert_ne!(a.token, b.token);
        let (id, secret) = parse(&a.token).expect("parses");
        assert_eq!(id, a.id);
        assert!(secret_matches(secret, &a.secret_hash));
        assert!(!secret_matches(secret, &b.secret_hash));
        assert!(!a.secret_hash.contains(secret));
        assert!(!secret_matches(secret, "not hex"));
    }

    #[test]
    fn malformed_tokens_do_not_parse() {
        let good = mint().token;
        for bad in [
            "",
            "alice",
            "alice.0123",
            &good.replace('.', ""),
            &format!("{good}0"),
            &format!("x{}", &good[1..]),
            // The old HMAC form `<user>.<hex mac>`.
            "alice.8f0e2f9b3c1d4e5f60718293a4b5c6d7e8f90123456789abcdef0123456789ab",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn user_names() {
        assert!(valid_user("a.b@example.com"));
        assert!(valid_user("dev_1-x"));
        for bad in ["", ".hidden", "a b", "a/b", &"x".repeat(65)] {
            assert!(!valid_user(bad), "{bad:?}");
        }
    }
}
