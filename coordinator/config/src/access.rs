//! `[access]`: who may do what. Whether anonymous visitors may read, per-user rate limits
//! on try runs and gomote creates, and the credentials reverse buildlets dial in with
//! (builder-key secrets and per-host tokens), each with an optional `not_after` so an old
//! and a new key overlap while hosts are moved to the new one.

use std::path::PathBuf;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::error::{ErrorKind, FieldPath};

/// `[access]`: roles, rate limits and dial-in credentials.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    /// Whether callers without a token may read: the status page, dashboard, logs, JSON,
    /// `/metrics`, and the API's read calls (watch a try run). With `false`, every page
    /// except `/healthz` needs a token of role `viewer` or above. Whatever changes state
    /// always needs a token. Default: `true`.
    #[serde(default = "default_true")]
    pub anonymous_viewers: bool,
    /// Most try runs one user may submit in any hour (a sliding window, counted by the
    /// running coordinator); one more is refused with `ResourceExhausted` naming this
    /// field. `0` means no limit. Default: `60`.
    #[serde(default = "default_try_runs_per_hour")]
    pub try_runs_per_hour: u32,
    /// Most gomote instances one user may create in any hour (as above). `0` means no
    /// limit. Default: `30`.
    #[serde(default = "default_gomote_creates_per_hour")]
    pub gomote_creates_per_hour: u32,
    /// Secrets builder keys derive from (a builder key is the HMAC of the host type under
    /// such a secret). A dial-in with a key derived from any entry not past its
    /// `not_after` is accepted. Default: none, meaning the coordinator's master key alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub builder_keys: Vec<BuilderKeyConfig>,
    /// Per-host tokens: a reverse buildlet dials in with the id and proves it holds the
    /// secret. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_tokens: Vec<HostTokenConfig>,
}

/// One `[[access.builder_keys]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuilderKeyConfig {
    /// File holding the secret (at least 16 bytes; hex text as the master key file is,
    /// or raw bytes). Required.
    pub file: PathBuf,
    /// Time after which new dial-ins with keys of this secret are refused, e.g.
    /// `"2026-12-01T15:00:00Z"`; machines already connected stay connected. Default:
    /// none (no end).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub not_after: Option<SystemTime>,
}

/// One `[[access.host_tokens]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostTokenConfig {
    /// The token's id, which the buildlet sends (`--host-token-id`). Required; unique
    /// across entries unless the entries are for the same host type (two secrets of one
    /// id overlap during a rotation).
    pub id: String,
    /// The host type the token may dial in as. Required; must name a `[[host_types]]`.
    pub host_type: String,
    /// File holding the secret (`--host-token-file` on the buildlet). Required.
    pub secret_file: PathBuf,
    /// Time after which new dial-ins with this secret are refused; machines already
    /// connected stay connected. Default: none (no end).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub not_after: Option<SystemTime>,
}

fn default_true() -> bool {
    true
}
fn default_try_runs_per_hour() -> u32 {
    60
}
fn default_gomote_creates_per_hour() -> u32 {
    30
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            anonymous_viewers: true,
            try_runs_per_hour: default_try_runs_per_hour(),
            gomote_creates_per_hour: default_gomote_creates_per_hour(),
            builder_keys: Vec::new(),
            host_tokens: Vec::new(),
        }
    }
}

/// Problems in the `[access]` table, as (path, kind) pairs. `host_types` are the names
/// the config defines.
pub(crate) fn check(a: &AccessConfig, host_types: &[&str]) -> Vec<(FieldPath, ErrorKind)> {
    let path = FieldPath::root().key("access");
    let mut out = Vec::new();
    for (i, k) in a.builder_keys.iter().enumerate() {
        if k.file.as_os_str().is_empty() {
            out.push((
                path.key("builder_keys").index(i).key("file"),
                ErrorKind::Empty,
            ));
        }
    }
    let mut seen: Vec<(&str, &str)> = Vec::new();
    for (i, t) in a.host_tokens.iter().enumerate() {
        let p = path.key("host_tokens").index(i);
        if t.id.trim().is_empty() {
            out.push((p.key("id"), ErrorKind::Empty));
        } else if t.id.chars().any(char::is_whitespace) {
            out.push((
                p.key("id"),
                ErrorKind::Invalid(format!("token id {:?} contains whitespace", t.id)),
            ));
        }
        if !host_types.contains(&t.host_type.as_str()) {
            out.push((
                p.key("host_type"),
                ErrorKind::UnknownHostType(t.host_type.clone()),
            ));
        }
        if t.secret_file.as_os_str().is_empty() {
            out.push((p.key("secret_file"), ErrorKind::Empty));
        }
        if let Some((_, other)) = seen.iter().find(|(id, _)| *id == t.id)
            && *other != t.host_type
        {
            out.push((
                p.key("id"),
                ErrorKind::Invalid(format!(
                    "host token {:?} is listed for host types {other:?} and {:?}; one id serves one host type",
                    t.id, t.host_type
                )),
            ));
        }
        seen.push((&t.id, &t.host_type));
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::Config;

    const BASE: &str = r#"
[[host_types]]
name = "linux"
pool = { kind = "reverse", expected = 1 }
"#;

    #[test]
    fn omitted_access_takes_its_documented_defaults() {
        let c = Config::from_toml_str(BASE, "c.toml").expect("parses");
        assert!(c.access.anonymous_viewers);
        assert_eq!(c.access.try_runs_per_hour, 60);
        assert_eq!(c.access.gomote_creates_per_hour, 30);
        assert!(c.access.builder_keys.is_empty() && c.access.host_tokens.is_empty());
    }

    #[test]
    fn keys_with_not_after_are_read() {
        let text = format!(
            "{BASE}\n[access]\nanonymous_viewers = false\ntry_runs_per_hour = 3\n\
             [[access.builder_keys]]\nfile = \"old.key\"\nnot_after = \"2026-12-01T15:00:00Z\"\n\
             [[access.builder_keys]]\nfile = \"new.key\"\n\
             [[access.host_tokens]]\nid = \"mac1\"\nhost_type = \"linux\"\nsecret_file = \"t\"\n"
        );
        let c = Config::from_toml_str(&text, "c.toml").expect("parses");
        assert!(!c.access.anonymous_viewers);
        assert_eq!(c.access.try_runs_per_hour, 3);
        let old = c.access.builder_keys[0].not_after.expect("not_after");
        assert_eq!(
            old.duration_since(std::time::UNIX_EPOCH)
                .expect("after epoch")
                .as_secs(),
            1_796_137_200
        );
        assert_eq!(c.access.builder_keys[1].not_after, None);
        assert_eq!(c.access.host_tokens[0].id, "mac1");
    }

    #[test]
    fn bad_entries_are_named_with_their_line() {
        let text = format!(
            "{BASE}\n[access]\n\
             [[access.host_tokens]]\nid = \"a b\"\nhost_type = \"darwin\"\nsecret_file = \"t\"\n\
             [[access.host_tokens]]\nid = \"x\"\nhost_type = \"linux\"\nsecret_file = \"t\"\n\
             [[access.host_tokens]]\nid = \"x\"\nhost_type = \"other\"\nsecret_file = \"t\"\n"
        );
        let errors: Vec<String> = Config::from_toml_str(&text, "c.toml")
            .expect_err("bad tokens accepted")
            .errors
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            errors,
            [
                "c.toml:8:1: access.host_tokens[0].id: token id \"a b\" contains whitespace",
                "c.toml:9:1: access.host_tokens[0].host_type: unknown host type \"darwin\"",
                "c.toml:16:1: access.host_tokens[2].id: host token \"x\" is listed for host types \"linux\" and \"other\"; one id serves one host type",
                "c.toml:17:1: access.host_tokens[2].host_type: unknown host type \"other\"",
            ]
        );
        let text = format!("{BASE}\n[access]\nnot_after = \"soon\"\n");
        let e = Config::from_toml_str(&text, "c.toml").expect_err("unknown field accepted");
        assert!(e.to_string().contains("not_after"), "{e}");
        let text = format!(
            "{BASE}\n[[access.builder_keys]]\nfile = \"k\"\nnot_after = \"next tuesday\"\n"
        );
        let e = Config::from_toml_str(&text, "c.toml").expect_err("bad time accepted");
        assert!(
            e.to_string()
                .contains("c.toml:8:13: access.builder_keys[0].not_after: invalid value"),
            "{e}"
        );
    }
}
