//! The credentials reverse buildlets dial in with, from `[access]`: builder-key secrets
//! and per-host tokens, each until its optional `not_after`. Read at start and again on
//! SIGHUP (`coordinator` re-reads the config file), then handed to the revdial listener,
//! which checks only new handshakes: rotating keys never drops a connected machine.

use std::path::Path;

use anyhow::{Context, Result, bail};
use buildfarm_config::AccessConfig;

/// Reads a builder-key secret: hex text of at least 16 bytes, as the master key file is.
pub fn read_builder_secret(path: &Path) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading builder key secret {}", path.display()))?;
    let key =
        hex::decode(text.trim()).with_context(|| format!("{}: not a hex key", path.display()))?;
    if key.len() < 16 {
        bail!(
            "{}: a builder key secret must be at least 16 bytes",
            path.display()
        );
    }
    Ok(key)
}

fn read_token_secret(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading host token secret {}", path.display()))?;
    let secret = text.trim().to_owned();
    if secret.len() < 16 {
        bail!(
            "{}: a host token secret must be at least 16 characters",
            path.display()
        );
    }
    Ok(secret)
}

/// The listener's authenticator for `access`: builder keys of each configured secret
/// (or of `master_key` when none is configured) and every host token.
pub fn authenticator(access: &AccessConfig, master_key: &[u8]) -> Result<revdial::Authenticator> {
    let mut auth = revdial::Authenticator::tokens_only();
    if access.builder_keys.is_empty() {
        auth = auth.with_builder_secret(master_key.to_vec(), None);
    }
    for (i, k) in access.builder_keys.iter().enumerate() {
        let secret =
            read_builder_secret(&k.file).with_context(|| format!("access.builder_keys[{i}]"))?;
        auth = auth.with_builder_secret(secret, k.not_after);
    }
    for (i, t) in access.host_tokens.iter().enumerate() {
        let secret = read_token_secret(&t.secret_file)
            .with_context(|| format!("access.host_tokens[{i}] ({})", t.id))?;
        auth = auth.with_token_until(t.id.clone(), t.host_type.clone(), secret, t.not_after);
    }
    Ok(auth)
}

/// The secret `coordinator builder-key` derives keys from: of the configured ones not
/// yet retired at `now`, the one retiring last (one without `not_after` first, else the
/// last listed); the master key when none is configured.
pub fn current_builder_secret(
    access: &AccessConfig,
    master_key: &[u8],
    now: std::time::SystemTime,
) -> Result<Vec<u8>> {
    if access.builder_keys.is_empty() {
        return Ok(master_key.to_vec());
    }
    let live = access
        .builder_keys
        .iter()
        .filter(|k| k.not_after.is_none_or(|t| t >= now))
        .max_by_key(|k| k.not_after.map_or((1, std::time::UNIX_EPOCH), |t| (0, t)));
    let Some(k) = live else {
        bail!("every access.builder_keys entry is past its not_after: add a new one");
    };
    read_builder_secret(&k.file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use buildfarm_config::BuilderKeyConfig;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn the_current_secret_is_the_one_retiring_last() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, byte: u8| {
            let p = dir.path().join(name);
            std::fs::write(&p, hex::encode([byte; 32])).expect("write");
            p
        };
        let t = |s: u64| Some(UNIX_EPOCH + Duration::from_secs(s));
        let mut access = AccessConfig::default();
        assert_eq!(
            current_builder_secret(&access, b"master", UNIX_EPOCH).expect("master"),
            b"master"
        );
        access.builder_keys = vec![
            BuilderKeyConfig {
                file: write("a", 1),
                not_after: t(100),
            },
            BuilderKeyConfig {
                file: write("b", 2),
                not_after: None,
            },
            BuilderKeyConfig {
                file: write("c", 3),
                not_after: t(200),
            },
        ];
        let now = UNIX_EPOCH + Duration::from_secs(50);
        assert_eq!(
            current_builder_secret(&access, b"m", now).expect("b"),
            vec![2; 32]
        );
        access.builder_keys.remove(1);
        assert_eq!(
            current_builder_secret(&access, b"m", now).expect("c"),
            vec![3; 32]
        );
        let late = UNIX_EPOCH + Duration::from_secs(300);
        assert!(current_builder_secret(&access, b"m", late).is_err());
        // A short or non-hex file is refused with its path.
        std::fs::write(dir.path().join("short"), "abcd").expect("write");
        let e = read_builder_secret(&dir.path().join("short")).expect_err("short");
        assert!(format!("{e:#}").contains("short"), "{e:#}");
    }
}
