//! `[limits]`: fair shares of the farm between users and between classes of work, so one
//! user's gomote instances cannot hold every buildlet while try and post-submit work waits,
//! and the size bound of every gRPC message.

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// Default of `limits.max_message_bytes`: 64 MiB. The same number as
/// `buildfarm_proto::DEFAULT_MAX_MESSAGE_BYTES`, which the buildlet and gomote use (this crate
/// does not depend on `proto`; a coordinator test checks the two agree).
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 64 << 20;

/// Smallest `limits.max_message_bytes` accepted: gomote sends files in chunks of 256 KiB, and
/// a try patch or a tarball header must fit in one message.
pub const MIN_MAX_MESSAGE_BYTES: u64 = 1 << 20;

/// `[limits]`: how much of the farm one user, and interactive work as a whole, may hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Most gomote instances one user may hold at once, counting creates still waiting for
    /// a buildlet; a create beyond it is refused with `ResourceExhausted`. One limit for
    /// every user, whatever their role (see `[access]` for per-hour limits). At least 1.
    /// Default: `2`.
    #[serde(default = "default_instances_per_user")]
    pub gomote_instances_per_user: u32,
    /// Percent of each host type's capacity that interactive (gomote) work may hold at
    /// once, rounded down but never below one buildlet; try and post-submit work always
    /// gets the rest. A create beyond the share waits in the queue. 1 to 100.
    /// Default: `50`.
    #[serde(default = "default_interactive_share")]
    pub interactive_share_percent: u32,
    /// Largest gRPC message the coordinator's API accepts or sends, e.g. `"64 MiB"` or a
    /// number of bytes. A bigger message is refused with `ResourceExhausted` naming this
    /// field. Files of any size still go through: `gomote put`, `puttar` and `push` stream
    /// them in chunks. At least 1 MiB. Default: `"64 MiB"`.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: ByteSize,
}

fn default_instances_per_user() -> u32 {
    2
}
fn default_interactive_share() -> u32 {
    50
}
fn default_max_message_bytes() -> ByteSize {
    ByteSize::b(DEFAULT_MAX_MESSAGE_BYTES)
}

impl Limits {
    /// `max_message_bytes` as a `usize`, for tonic's message size settings.
    pub fn max_message_bytes(&self) -> usize {
        usize::try_from(self.max_message_bytes.as_u64()).unwrap_or(usize::MAX)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            gomote_instances_per_user: default_instances_per_user(),
            interactive_share_percent: default_interactive_share(),
            max_message_bytes: default_max_message_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::Config;

    const BASE: &str = r#"
[[host_types]]
name = "local"
pool = { kind = "local", count = 2 }
"#;

    #[test]
    fn omitted_limits_take_their_documented_defaults() {
        let c = Config::from_toml_str(BASE, "c.toml").expect("parses");
        assert_eq!(c.limits.gomote_instances_per_user, 2);
        assert_eq!(c.limits.interactive_share_percent, 50);
        assert_eq!(c.limits.max_message_bytes(), 64 << 20);
    }

    #[test]
    fn max_message_bytes_reads_sizes_and_numbers_and_refuses_tiny_ones() {
        let c = Config::from_toml_str(
            &format!("{BASE}\n[limits]\nmax_message_bytes = \"2 MiB\"\n"),
            "c.toml",
        )
        .expect("parses");
        assert_eq!(c.limits.max_message_bytes(), 2 << 20);
        let c = Config::from_toml_str(
            &format!("{BASE}\n[limits]\nmax_message_bytes = 3145728\n"),
            "c.toml",
        )
        .expect("parses");
        assert_eq!(c.limits.max_message_bytes(), 3 << 20);
        let errors = Config::from_toml_str(
            &format!("{BASE}\n[limits]\nmax_message_bytes = \"4 KiB\"\n"),
            "c.toml",
        )
        .expect_err("tiny limit accepted")
        .to_string();
        assert!(
            errors.contains(
                "c.toml:7:1: limits.max_message_bytes: 4.0 KiB is below the minimum of 1.0 MiB"
            ),
            "{errors}"
        );
    }

    #[test]
    fn limits_are_read_and_bad_values_named_with_their_line() {
        let text = format!(
            "{BASE}\n[limits]\ngomote_instances_per_user = 5\ninteractive_share_percent = 25\n"
        );
        let c = Config::from_toml_str(&text, "c.toml").expect("parses");
        assert_eq!(c.limits.gomote_instances_per_user, 5);
        assert_eq!(c.limits.interactive_share_percent, 25);

        let text = format!(
            "{BASE}\n[limits]\ngomote_instances_per_user = 0\ninteractive_share_percent = 101\n"
        );
        let errors: Vec<String> = Config::from_toml_str(&text, "c.toml")
            .expect_err("bad limits accepted")
            .errors
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            errors,
            [
                "c.toml:7:1: limits.gomote_instances_per_user: must be at least 1",
                "c.toml:8:1: limits.interactive_share_percent: interactive_share_percent 101 must be between 1 and 100",
            ]
        );

        let text = format!("{BASE}\n[limits]\ninteractive_share = 0.5\n");
        let errors = Config::from_toml_str(&text, "c.toml").expect_err("unknown field accepted");
        assert!(errors.to_string().contains("interactive_share"), "{errors}");
    }
}
