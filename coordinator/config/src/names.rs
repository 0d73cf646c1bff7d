//! Go platform names: the GOOS/GOARCH lists, builder-name parsing and the mapping from
//! Rust's host target names to Go's, so builder names are checked the way `go tool dist list`
//! would accept them.

/// Operating systems Go knows (`go tool dist list`, plus `hurd`/`zos` reserved upstream).
pub const KNOWN_GOOS: &[&str] = &[
    "aix",
    "android",
    "darwin",
    "dragonfly",
    "freebsd",
    "hurd",
    "illumos",
    "ios",
    "js",
    "linux",
    "netbsd",
    "openbsd",
    "plan9",
    "solaris",
    "wasip1",
    "windows",
    "zos",
];

/// Architectures Go knows (`go tool dist list`).
pub const KNOWN_GOARCH: &[&str] = &[
    "386", "amd64", "arm", "arm64", "loong64", "mips", "mipsle", "mips64", "mips64le", "ppc64",
    "ppc64le", "riscv64", "s390x", "wasm",
];

/// A builder name split into its parts: `GOOS-GOARCH[-suffix]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuilderName<'a> {
    /// The target operating system, e.g. `linux`.
    pub goos: &'a str,
    /// The target architecture, e.g. `amd64`.
    pub goarch: &'a str,
    /// What distinguishes builders of one platform, e.g. `race` or `longtest`.
    pub suffix: Option<&'a str>,
}

/// Why a builder name was refused; the text completes "bad builder name "x": ...".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuilderNameError {
    /// Not of the form `GOOS-GOARCH[-suffix]`.
    #[error("expected GOOS-GOARCH[-suffix]")]
    Shape,
    /// The first part is not a GOOS Go knows.
    #[error("unknown GOOS \"{0}\"")]
    UnknownGoos(String),
    /// The second part is not a GOARCH Go knows.
    #[error("unknown GOARCH \"{0}\"")]
    UnknownGoarch(String),
    /// The suffix is empty or has characters outside `[a-z0-9-]`.
    #[error("suffix \"{0}\" must match [a-z0-9-]+")]
    BadSuffix(String),
}

/// Splits and checks a builder name against the known GOOS/GOARCH lists.
pub fn parse_builder_name(name: &str) -> Result<BuilderName<'_>, BuilderNameError> {
    let mut parts = name.splitn(3, '-');
    let (Some(goos), Some(goarch)) = (parts.next(), parts.next()) else {
        return Err(BuilderNameError::Shape);
    };
    if !KNOWN_GOOS.contains(&goos) {
        return Err(BuilderNameError::UnknownGoos(goos.to_owned()));
    }
    if !KNOWN_GOARCH.contains(&goarch) {
        return Err(BuilderNameError::UnknownGoarch(goarch.to_owned()));
    }
    let suffix = parts.next();
    if let Some(s) = suffix {
        let ok = !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(BuilderNameError::BadSuffix(s.to_owned()));
        }
    }
    Ok(BuilderName {
        goos,
        goarch,
        suffix,
    })
}

/// Go's GOARCH for a Rust `std::env::consts::ARCH` value, or `None` when Go has no port.
/// `little_endian` picks between e.g. `ppc64` and `ppc64le`.
pub fn goarch_from_rust(arch: &str, little_endian: bool) -> Option<&'static str> {
    Some(match (arch, little_endian) {
        ("x86_64", _) => "amd64",
        ("x86", _) => "386",
        ("aarch64", _) => "arm64",
        ("arm", _) => "arm",
        ("riscv64", _) => "riscv64",
        ("powerpc64", true) => "ppc64le",
        ("powerpc64", false) => "ppc64",
        ("s390x", _) => "s390x",
        ("loongarch64", _) => "loong64",
        ("mips", true) => "mipsle",
        ("mips", false) => "mips",
        ("mips64", true) => "mips64le",
        ("mips64", false) => "mips64",
        ("wasm32", _) => "wasm",
        _ => return None,
    })
}

/// Go's GOOS for a Rust `std::env::consts::OS` value, or `None` when Go has no port.
pub fn goos_from_rust(os: &str) -> Option<&'static str> {
    Some(match os {
        "macos" => "darwin",
        "linux" => "linux",
        "windows" => "windows",
        "freebsd" => "freebsd",
        "netbsd" => "netbsd",
        "openbsd" => "openbsd",
        "dragonfly" => "dragonfly",
        "illumos" => "illumos",
        "solaris" => "solaris",
        "android" => "android",
        "ios" => "ios",
        "aix" => "aix",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_names_parse_into_parts() {
        let n = parse_builder_name("linux-386-longtest-race").unwrap();
        assert_eq!(
            (n.goos, n.goarch, n.suffix),
            ("linux", "386", Some("longtest-race"))
        );
        assert_eq!(parse_builder_name("windows-amd64").unwrap().suffix, None);
    }

    #[test]
    fn bad_builder_names_say_why() {
        assert_eq!(parse_builder_name("linux"), Err(BuilderNameError::Shape));
        assert_eq!(
            parse_builder_name("linus-amd64"),
            Err(BuilderNameError::UnknownGoos("linus".into()))
        );
        assert_eq!(
            parse_builder_name("linux-x86_64"),
            Err(BuilderNameError::UnknownGoarch("x86_64".into()))
        );
        assert_eq!(
            parse_builder_name("linux-amd64-"),
            Err(BuilderNameError::BadSuffix(String::new()))
        );
        assert_eq!(
            parse_builder_name("linux-amd64-Race"),
            Err(BuilderNameError::BadSuffix("Race".into()))
        );
    }

    #[test]
    fn rust_arch_names_map_to_goarch() {
        assert_eq!(goarch_from_rust("x86_64", true), Some("amd64"));
        assert_eq!(goarch_from_rust("aarch64", true), Some("arm64"));
        assert_eq!(goarch_from_rust("powerpc64", true), Some("ppc64le"));
        assert_eq!(goarch_from_rust("powerpc64", false), Some("ppc64"));
        assert_eq!(goarch_from_rust("sparc64", false), None);
        assert_eq!(goos_from_rust("macos"), Some("darwin"));
        assert_eq!(goos_from_rust("redox"), None);
    }
}
