//! What an artifact request means, decided over plain data: a checked target
//! (`GOOS`/`GOARCH`) and version, the host type that builds it (natively when a builder
//! of that platform builds the repo, else cross-compiled by Go on one that does), and the
//! builder the runner gets: one step (`make <target>` or `go build -trimpath`) and the
//! files to keep. No I/O.

use buildfarm_config::{Builder, Config, KNOWN_GOARCH, KNOWN_GOOS, Step};

/// Where the default build writes, relative to the buildlet's workdir (the checkout is
/// `src/`, so the command says `../out/`).
pub const DEFAULT_OUT_DIR: &str = "out";

/// A bad request, answered with 400 (or 404 for an unknown repo).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("unknown repo {0:?}")]
    UnknownRepo(String),
    #[error("unknown GOOS {0:?}")]
    BadGoos(String),
    #[error("unknown GOARCH {0:?}")]
    BadGoarch(String),
    #[error(
        "bad version {0:?}: give a tag, branch or commit ([A-Za-z0-9._/-], at most 200 characters, not starting with '-' or '/', no '..')"
    )]
    BadVersion(String),
    #[error("no builder builds repo {0:?}, so no host type can build its artifacts")]
    NoHostType(String),
}

impl RequestError {
    /// The HTTP status of the answer.
    pub fn status(&self) -> u16 {
        match self {
            RequestError::UnknownRepo(_) => 404,
            RequestError::NoHostType(_) => 409,
            _ => 400,
        }
    }
}

/// A Go target platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub goos: String,
    pub goarch: String,
}

impl Target {
    /// Checks both against the ports Go knows.
    pub fn parse(goos: &str, goarch: &str) -> Result<Target, RequestError> {
        if !KNOWN_GOOS.contains(&goos) {
            return Err(RequestError::BadGoos(goos.to_owned()));
        }
        if !KNOWN_GOARCH.contains(&goarch) {
            return Err(RequestError::BadGoarch(goarch.to_owned()));
        }
        Ok(Target {
            goos: goos.to_owned(),
            goarch: goarch.to_owned(),
        })
    }

    /// `GOOS-GOARCH`: the `builder` of the artifact build's row.
    pub fn name(&self) -> String {
        format!("{}-{}", self.goos, self.goarch)
    }

    /// The suffix executables get on this target.
    pub fn exe_suffix(&self) -> &'static str {
        if self.goos == "windows" { ".exe" } else { "" }
    }
}

/// Checks a version (tag, branch or commit) before git sees it.
pub fn check_version(version: &str) -> Result<(), RequestError> {
    let ok = !version.is_empty()
        && version.len() <= 200
        && !version.starts_with(['-', '/'])
        && !version.ends_with('/')
        && !version.contains("..")
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(RequestError::BadVersion(version.to_owned()))
    }
}

/// Whether `version` is already a full commit hash (no need to ask git what it names).
pub fn is_full_hash(version: &str) -> bool {
    matches!(version.len(), 40 | 64) && version.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Which files a build keeps, and where on the buildlet they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectSpec {
    /// Directory under the workdir the patterns are relative to (`src` or `out`).
    pub base: String,
    pub patterns: Vec<String>,
    /// A build that matches nothing fails (artifacts on request) rather than passing
    /// without artifacts (declared artifacts of other builds).
    pub required: bool,
}

/// What to run for an artifact request.
#[derive(Debug, Clone, PartialEq)]
pub struct ArtifactPlan {
    /// The builder the runner gets: host type, env with `GOOS`/`GOARCH`, one step.
    pub builder: Builder,
    pub collect: CollectSpec,
    /// Built on a host of another platform by Go's cross-compiler.
    pub cross: bool,
}

/// Plans the build of `repo` for `target`. A builder of the target's platform
/// (`GOOS-GOARCH` or `GOOS-GOARCH-suffix`) that builds the repo lends its host type and
/// env; else the repo's first builder does and Go cross-compiles (`CGO_ENABLED=0`).
pub fn plan(config: &Config, repo: &str, target: &Target) -> Result<ArtifactPlan, RequestError> {
    let r = config
        .repo(repo)
        .ok_or_else(|| RequestError::UnknownRepo(repo.to_owned()))?;
    let name = target.name();
    let builders: Vec<&Builder> = config
        .builders
        .iter()
        .filter(|b| b.builds_repo(repo))
        .collect();
    let native = builders.iter().find(|b| {
        b.name == name
            || b.name
                .strip_prefix(name.as_str())
                .is_some_and(|rest| rest.starts_with('-'))
    });
    let (base, cross) = match native {
        Some(b) => (*b, false),
        None => (
            *builders
                .first()
                .ok_or_else(|| RequestError::NoHostType(repo.to_owned()))?,
            true,
        ),
    };
    let mut env = base.env.clone();
    env.insert("GOOS".into(), target.goos.clone());
    env.insert("GOARCH".into(), target.goarch.clone());
    if cross {
        env.insert("CGO_ENABLED".into(), "0".into());
    }
    let (step, collect) = match &r.artifacts {
        Some(a) => (
            Step {
                name: "make".into(),
                command: vec!["make".into(), a.make_target.clone()],
                env: Default::default(),
                timeout: base.build_timeout,
                requires: Vec::new(),
                snapshot: None,
                restore: None,
                cache: None,
                units: None,
                only_units: Vec::new(),
                path: Vec::new(),
                toolchain: None,
            },
            CollectSpec {
                base: "src".into(),
                patterns: a.outputs.clone(),
                required: true,
            },
        ),
        None => (
            Step {
                name: "build".into(),
                command: vec![
                    "go".into(),
                    "build".into(),
                    "-trimpath".into(),
                    "-o".into(),
                    format!("../{DEFAULT_OUT_DIR}/"),
                    "./...".into(),
                ],
                env: Default::default(),
                timeout: base.build_timeout,
                requires: Vec::new(),
                snapshot: None,
                restore: None,
                cache: None,
                units: None,
                only_units: Vec::new(),
                path: Vec::new(),
                toolchain: None,
            },
            CollectSpec {
                base: DEFAULT_OUT_DIR.into(),
                patterns: vec!["**".into()],
                required: true,
            },
        ),
    };
    let builder = Builder {
        name,
        host_type: base.host_type.clone(),
        env,
        try_bot: false,
        repos: Some(vec![repo.to_owned()]),
        branches: None,
        steps: vec![step],
        build_timeout: base.build_timeout,
        test_shards: 1,
        artifacts: Vec::new(),
    };
    Ok(ArtifactPlan {
        builder,
        collect,
        cross,
    })
}

/// What a post-submit or try build of `builder` keeps: its declared patterns, relative to
/// the checkout; `None` when it declares none.
pub fn declared(builder: &Builder) -> Option<CollectSpec> {
    (!builder.artifacts.is_empty()).then(|| CollectSpec {
        base: "src".into(),
        patterns: builder.artifacts.clone(),
        required: false,
    })
}

/// The file name a download suggests: `<name>-<version>-<GOOS>-<GOARCH>` (with `.exe`
/// on windows) when the build made one file, else that artifact's own base name.
pub fn download_name(version: &str, target: &Target, artifact: &str, only_one: bool) -> String {
    let base = artifact.rsplit('/').next().unwrap_or(artifact);
    let name = if only_one {
        let stem = base.strip_suffix(".exe").unwrap_or(base);
        let ext = if base.ends_with(".exe") {
            ".exe"
        } else {
            target.exe_suffix()
        };
        let version = version.replace('/', "-");
        format!("{stem}-{version}-{}-{}{ext}", target.goos, target.goarch)
    } else {
        base.to_owned()
    };
    // It goes in a quoted header parameter.
    name.replace(|c: char| c == '"' || c == '\\' || c.is_control(), "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!(
            r#"
[[host_types]]
name = "linux"
pool = {{ kind = "local", count = 1 }}

[[host_types]]
name = "mac"
pool = {{ kind = "reverse", expected = 1 }}

[[builders]]
name = "linux-amd64"
host_type = "linux"
env = {{ GOCACHE = "/c" }}
steps = [{{ name = "test", command = ["go", "test", "./..."] }}]

[[builders]]
name = "darwin-arm64-race"
host_type = "mac"
steps = [{{ name = "test", command = ["go", "test", "./..."] }}]

[[repos]]
name = "hello"
url = "/srv/hello"
{extra}
"#
        );
        Config::from_toml_str(&text, "test.toml").expect("config")
    }

    #[test]
    fn targets_and_versions() {
        assert_eq!(
            Target::parse("windows", "amd64").unwrap().name(),
            "windows-amd64"
        );
        assert_eq!(
            Target::parse("win", "amd64"),
            Err(RequestError::BadGoos("win".into()))
        );
        assert_eq!(
            Target::parse("linux", "x86"),
            Err(RequestError::BadGoarch("x86".into()))
        );
        for ok in ["v1.2.0", "main", "release/1.2", "0123abcd", "go1.22rc1"] {
            assert_eq!(check_version(ok), Ok(()), "{ok}");
        }
        for bad in ["", "-n", "/etc", "a..b", "a b", "x~1", "HEAD^", "a/"] {
            assert!(check_version(bad).is_err(), "{bad}");
        }
        assert_eq!(RequestError::UnknownRepo("x".into()).status(), 404);
        assert_eq!(RequestError::BadVersion("x y".into()).status(), 400);
        assert!(is_full_hash(&"a".repeat(40)));
        assert!(!is_full_hash("abc123"));
    }

    #[test]
    fn native_builder_lends_its_host_type() {
        let c = config("");
        let p = plan(&c, "hello", &Target::parse("darwin", "arm64").unwrap()).unwrap();
        assert_eq!(p.builder.host_type, "mac");
        assert!(!p.cross);
        assert_eq!(
            p.builder.env.get("GOOS").map(String::as_str),
            Some("darwin")
        );
        assert_eq!(p.builder.env.get("CGO_ENABLED"), None);
    }

    #[test]
    fn other_targets_cross_compile_with_the_builders_env() {
        let c = config("");
        let p = plan(&c, "hello", &Target::parse("windows", "amd64").unwrap()).unwrap();
        assert_eq!(p.builder.host_type, "linux");
        assert!(p.cross);
        assert_eq!(p.builder.name, "windows-amd64");
        let env = &p.builder.env;
        assert_eq!(env.get("GOOS").map(String::as_str), Some("windows"));
        assert_eq!(env.get("GOARCH").map(String::as_str), Some("amd64"));
        assert_eq!(env.get("CGO_ENABLED").map(String::as_str), Some("0"));
        assert_eq!(env.get("GOCACHE").map(String::as_str), Some("/c"));
        assert_eq!(
            p.builder.steps[0].command,
            ["go", "build", "-trimpath", "-o", "../out/", "./..."]
        );
        assert_eq!(p.collect.base, "out");
        assert!(p.collect.required);
    }

    #[test]
    fn a_make_target_is_run_and_its_outputs_kept() {
        let c = config("artifacts = { make_target = \"dist\", outputs = [\"dist/*\"] }");
        let p = plan(&c, "hello", &Target::parse("linux", "amd64").unwrap()).unwrap();
        assert_eq!(p.builder.steps[0].command, ["make", "dist"]);
        assert_eq!(p.collect.base, "src");
        assert_eq!(p.collect.patterns, ["dist/*"]);
    }

    #[test]
    fn unknown_repo_and_repo_without_builders() {
        let c = config("");
        let t = Target::parse("linux", "amd64").unwrap();
        assert_eq!(
            plan(&c, "nope", &t),
            Err(RequestError::UnknownRepo("nope".into()))
        );
        let mut c = c;
        for b in &mut c.builders {
            b.repos = Some(vec!["other".into()]);
        }
        assert_eq!(
            plan(&c, "hello", &t),
            Err(RequestError::NoHostType("hello".into()))
        );
    }

    #[test]
    fn download_names() {
        let w = Target::parse("windows", "amd64").unwrap();
        let l = Target::parse("linux", "arm64").unwrap();
        assert_eq!(
            download_name("v1.2.0", &w, "hello.exe", true),
            "hello-v1.2.0-windows-amd64.exe"
        );
        assert_eq!(
            download_name("v1.2.0", &l, "hello", true),
            "hello-v1.2.0-linux-arm64"
        );
        assert_eq!(
            download_name("release/1.2", &l, "hello", true),
            "hello-release-1.2-linux-arm64"
        );
        assert_eq!(
            download_name("v1", &l, "dist/tool.tar.gz", false),
            "tool.tar.gz"
        );
    }
}
