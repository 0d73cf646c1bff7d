//! `[limits]`: fair shares of the farm between users and between classes of work, so one
//! user's gomote instances cannot hold every buildlet while try and post-submit work waits.

use serde::{Deserialize, Serialize};

/// `[limits]`: how much of the farm one user, and interactive work as a whole, may hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Most gomote instances one user may hold at once, counting creates still waiting for
    /// a buildlet; a create beyond it is refused with `ResourceExhausted`. One limit for
    /// every user (there are no roles yet). At least 1. Default: `2`.
    #[serde(default = "default_instances_per_user")]
    pub gomote_instances_per_user: u32,
    /// Percent of each host type's capacity that interactive (gomote) work may hold at
    /// once, rounded down but never below one buildlet; try and post-submit work always
    /// gets the rest. A create beyond the share waits in the queue. 1 to 100.
    /// Default: `50`.
    #[serde(default = "default_interactive_share")]
    pub interactive_share_percent: u32,
}

fn default_instances_per_user() -> u32 {
    2
}
fn default_interactive_share() -> u32 {
    50
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            gomote_instances_per_user: default_instances_per_user(),
            interactive_share_percent: default_interactive_share(),
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
