//! `[connections]`: time limits and caps on every connection to the coordinator's port
//! (status page, JSON, gRPC API and reverse dial-ins alike). The coordinator turns this
//! table into the acceptor's limits; the buildlet's listen-mode flags have the same
//! defaults.

use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use crate::error::{ErrorKind, FieldPath};

/// `[connections]`: limits on connections to the coordinator's port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionsConfig {
    /// Time from accept to a finished TLS handshake (or the first plaintext byte) and
    /// protocol sorting; a slower connection is closed. Default: `10s`.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Time an HTTP/1 client has to send a request's complete headers. Default: `10s`.
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed (HTTP/1
    /// keep-alive, HTTP/2 with no open stream, a TLS connection that sends nothing, an
    /// HTTP/2 preface with nothing after it). Open requests, however long (live logs,
    /// watch streams, `gomote run`), are never cut by it. Default: `60s`.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Interval of HTTP/2 PINGs on served connections, so a dead peer is noticed; an
    /// unanswered PING closes the connection after the same time again. Default: `20s`.
    #[serde(default = "default_keepalive_interval", with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// Most connections open at once. Default: none, meaning the open-file limit
    /// (raised to its hard limit at start) minus a reserve kept for the coordinator's
    /// own files, database and buildlets. At the cap the oldest connection that has no
    /// request in flight is closed to make room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Most TLS handshakes in progress at once; at the cap the oldest unfinished
    /// handshake is closed to make room. Default: `1024`.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: u32,
    /// Largest request header block accepted (HTTP/1 and HTTP/2); a larger one gets
    /// `431 Request Header Fields Too Large`. Default: `64KiB`.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: ByteSize,
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_keepalive_interval() -> Duration {
    Duration::from_secs(20)
}
fn default_max_handshakes() -> u32 {
    1024
}
fn default_max_header_bytes() -> ByteSize {
    ByteSize::kib(64)
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        ConnectionsConfig {
            handshake_timeout: default_handshake_timeout(),
            header_read_timeout: default_header_read_timeout(),
            idle_timeout: default_idle_timeout(),
            keepalive_interval: default_keepalive_interval(),
            max_connections: None,
            max_handshakes: default_max_handshakes(),
            max_header_bytes: default_max_header_bytes(),
        }
    }
}

/// Smallest header limit: hyper's HTTP/1 read buffer cannot be smaller, and below it
/// ordinary browsers and gRPC clients fail.
const MIN_HEADER_BYTES: u64 = 8 * 1024;
/// Largest header limit: HTTP/2 advertises it as a 32-bit setting, and a bigger one
/// would let one request pin that much memory.
const MAX_HEADER_BYTES: u64 = 16 * 1024 * 1024;

/// Problems in the `[connections]` table, as (path, kind) pairs.
pub(crate) fn check(c: &ConnectionsConfig) -> Vec<(FieldPath, ErrorKind)> {
    let path = FieldPath::root().key("connections");
    let mut out = Vec::new();
    for (name, d) in [
        ("handshake_timeout", c.handshake_timeout),
        ("header_read_timeout", c.header_read_timeout),
        ("idle_timeout", c.idle_timeout),
        ("keepalive_interval", c.keepalive_interval),
    ] {
        if d.is_zero() {
            out.push((
                path.key(name),
                ErrorKind::Invalid("must be longer than 0s".into()),
            ));
        }
    }
    if c.max_connections == Some(0) {
        out.push((path.key("max_connections"), ErrorKind::Zero));
    }
    if c.max_handshakes == 0 {
        out.push((path.key("max_handshakes"), ErrorKind::Zero));
    }
    let bytes = c.max_header_bytes.as_u64();
    if !(MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(&bytes) {
        out.push((
            path.key("max_header_bytes"),
            ErrorKind::Invalid(format!(
                "must be between {} and {}",
                ByteSize::b(MIN_HEADER_BYTES),
                ByteSize::b(MAX_HEADER_BYTES)
            )),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::Config;

    #[test]
    fn defaults_apply_when_the_table_is_absent() {
        let c = Config::from_toml_str("", "t.toml").expect("empty config parses");
        assert_eq!(c.connections, super::ConnectionsConfig::default());
        assert_eq!(c.connections.max_header_bytes.as_u64(), 64 * 1024);
    }

    #[test]
    fn fields_parse() {
        let c = Config::from_toml_str(
            "[connections]\nhandshake_timeout = \"3s\"\nheader_read_timeout = \"2s\"\n\
             idle_timeout = \"4s\"\nkeepalive_interval = \"5s\"\nmax_connections = 100\n\
             max_handshakes = 10\nmax_header_bytes = \"32KiB\"\n",
            "t.toml",
        )
        .expect("valid table");
        let k = &c.connections;
        assert_eq!(k.handshake_timeout.as_secs(), 3);
        assert_eq!(k.header_read_timeout.as_secs(), 2);
        assert_eq!(k.idle_timeout.as_secs(), 4);
        assert_eq!(k.keepalive_interval.as_secs(), 5);
        assert_eq!(k.max_connections, Some(100));
        assert_eq!(k.max_handshakes, 10);
        assert_eq!(k.max_header_bytes.as_u64(), 32 * 1024);
    }

    #[test]
    fn bad_values_are_all_reported_with_lines() {
        let err = Config::from_toml_str(
            "[connections]\nidle_timeout = \"0s\"\nmax_connections = 0\n\
             max_handshakes = 0\nmax_header_bytes = \"100B\"\n",
            "t.toml",
        )
        .expect_err("zeros are refused");
        let text = err.to_string();
        assert!(
            text.contains("t.toml:2:") && text.contains("connections.idle_timeout"),
            "{text}"
        );
        assert!(text.contains("connections.max_connections"), "{text}");
        assert!(text.contains("connections.max_handshakes"), "{text}");
        assert!(
            text.contains("connections.max_header_bytes") && text.contains("between"),
            "{text}"
        );
        assert_eq!(err.errors.len(), 4, "{text}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = Config::from_toml_str("[connections]\nidle = \"3s\"\n", "t.toml")
            .expect_err("unknown field");
        assert!(err.to_string().contains("idle"), "{err}");
    }
}
