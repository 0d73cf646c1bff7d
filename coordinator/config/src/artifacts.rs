//! Artifact settings: `[artifacts]` (how long built files are kept), a repo's
//! `artifacts` (the build command of artifacts on request) and the path patterns
//! builders declare (`artifacts = ["bin/*"]`), with the checks they need.

use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// `[artifacts]`: where built files are kept and for how long.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactsConfig {
    /// Most bytes of artifact files kept (each distinct file counted once); past it the
    /// oldest artifacts go first. Default: `10 GiB`.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: ByteSize,
    /// Artifacts older than this are removed. Default: `30days`.
    #[serde(default = "default_max_age", with = "humantime_serde")]
    pub max_age: Duration,
    /// Largest single artifact file a build may produce; a bigger one fails the
    /// collection (the build is failed with that reason). Default: `2 GiB`.
    #[serde(default = "default_max_file_bytes")]
    pub max_file_bytes: ByteSize,
    /// How often the retention policy runs besides after each build that stored
    /// artifacts. Default: `10m`.
    #[serde(default = "default_sweep_interval", with = "humantime_serde")]
    pub sweep_interval: Duration,
}

fn default_max_bytes() -> ByteSize {
    ByteSize::gib(10)
}
fn default_max_age() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}
fn default_max_file_bytes() -> ByteSize {
    ByteSize::gib(2)
}
fn default_sweep_interval() -> Duration {
    Duration::from_secs(10 * 60)
}

impl Default for ArtifactsConfig {
    fn default() -> Self {
        ArtifactsConfig {
            max_bytes: default_max_bytes(),
            max_age: default_max_age(),
            max_file_bytes: default_max_file_bytes(),
            sweep_interval: default_sweep_interval(),
        }
    }
}

/// A repo's `artifacts`: how an artifact on request is built. Without it the
/// coordinator runs `go build -trimpath` over the module's main packages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoArtifacts {
    /// Target of the repo's `Makefile` run as `make <target>` in the checkout, with
    /// `GOOS` and `GOARCH` (and `CGO_ENABLED=0` when cross-compiling) in its
    /// environment. Required.
    pub make_target: String,
    /// Path patterns, relative to the checkout, of the files the target produces
    /// (`*` and `?` within one path segment, `**` for any number of segments), e.g.
    /// `["dist/*"]`; at least one. Required.
    pub outputs: Vec<String>,
}

/// Problems with one path pattern, `None` when it is usable: relative, no `..` or
/// `.` segment, no empty segment, no backslash.
pub fn pattern_problem(pattern: &str) -> Option<String> {
    if pattern.is_empty() {
        return Some("pattern is empty".into());
    }
    if pattern.starts_with('/') {
        return Some(format!(
            "pattern {pattern:?} must be relative to the checkout"
        ));
    }
    if pattern.contains('\\') || pattern.contains('\0') {
        return Some(format!(
            "pattern {pattern:?} must use '/' and no backslashes"
        ));
    }
    if pattern
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Some(format!(
            "pattern {pattern:?} must not have empty, '.' or '..' segments"
        ));
    }
    None
}

/// Problems with a make target, `None` when it is usable: `[A-Za-z0-9._/-]+`, not
/// starting with `-` (make would read it as an option).
pub fn make_target_problem(target: &str) -> Option<String> {
    let ok = !target.is_empty()
        && !target.starts_with('-')
        && target
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'));
    (!ok).then(|| {
        format!("make target {target:?} must match [A-Za-z0-9._/-]+ and not start with '-'")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert_eq!(pattern_problem("bin/*"), None);
        assert_eq!(pattern_problem("**/*.exe"), None);
        assert!(pattern_problem("").is_some());
        assert!(pattern_problem("/etc/passwd").is_some());
        assert!(pattern_problem("../x").is_some());
        assert!(pattern_problem("a//b").is_some());
        assert!(pattern_problem("a\\b").is_some());
    }

    #[test]
    fn make_targets() {
        assert_eq!(make_target_problem("dist"), None);
        assert_eq!(make_target_problem("build/all"), None);
        assert!(make_target_problem("-f").is_some());
        assert!(make_target_problem("a b").is_some());
        assert!(make_target_problem("").is_some());
    }
}
