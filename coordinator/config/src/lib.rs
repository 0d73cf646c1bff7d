//! The coordinator's configuration: the TOML file's documented plain types, parsing with
//! errors that name file, line, column and field, validation that reports every problem at
//! once, the built-in default config, and the look-ups the coordinator makes.
//!
//! No I/O beyond [`Config::from_file`] reading one file.

mod access;
mod artifacts;
mod builtin;
mod connections;
pub mod dag;
mod error;
mod limits;
mod model;
mod names;
mod notifications;
mod parse;
mod validate;

use std::path::Path;

pub use access::{AccessConfig, BuilderKeyConfig, HostTokenConfig};
pub use artifacts::{ArtifactsConfig, RepoArtifacts, make_target_problem, pattern_problem};
pub use builtin::{CROSS_BUILDERS, LOCAL_HOST_TYPE, host_platform};
pub use connections::ConnectionsConfig;
pub use error::{ConfigError, ConfigErrors, ErrorKind, FieldPath, LoadError, Location};
pub use limits::Limits;
pub use model::{
    Builder, Config, CoordinatorConfig, DockerPool, Ec2Address, Ec2Pool, Env, GoPairing, HostType,
    KubePool, KubeToleration, LocalPool, Pool, Repo, ReversePool, SandboxConfig, SandboxMode,
    Secret, Step, StepCache, ToolchainRef, Units,
};
pub use names::{
    BuilderName, BuilderNameError, KNOWN_GOARCH, KNOWN_GOOS, goarch_from_rust, goos_from_rust,
    parse_builder_name,
};
pub use notifications::{CommitStatus, Notification, NotificationKind, NotifyOn};

impl Config {
    /// Parses and validates a config; `source_name` (usually the file name) starts each error.
    /// Syntax and type errors are all reported together; if there are none, every semantic
    /// problem (references, names, counts) is reported together.
    pub fn from_toml_str(text: &str, source_name: &str) -> Result<Config, ConfigErrors> {
        parse::parse(text, source_name)
    }

    /// Reads, parses and validates the config file at `path`.
    pub fn from_file(path: &Path) -> Result<Config, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        Ok(Config::from_toml_str(&text, &path.display().to_string())?)
    }

    /// The config used when none is given: one `local` host type with 2 buildlets, a native
    /// builder (`go vet`, `go test`) for this machine, cross-compile builders (`go build`,
    /// `go vet` with GOOS/GOARCH set and CGO_ENABLED=0) for [`CROSS_BUILDERS`], and one repo
    /// `example` at `example_repo` watching `main`.
    pub fn builtin_default(example_repo: &Path) -> Config {
        builtin::builtin(example_repo)
    }

    /// Checks a config built in code (errors carry field paths but no line numbers).
    pub fn validate(&self, source_name: &str) -> Result<(), ConfigErrors> {
        let issues = validate::check(self);
        if issues.is_empty() {
            Ok(())
        } else {
            Err(parse::unlocated(issues, source_name))
        }
    }

    /// Builders that build post-submit commits of `branch` in `repo`: those building the repo
    /// whose branch list (default: the repo's watched branches) has the branch. Empty when the
    /// repo is unknown or does not watch the branch.
    pub fn builders_for(&self, repo: &str, branch: &str) -> Vec<&Builder> {
        let Some(r) = self.repo(repo) else {
            return Vec::new();
        };
        if !r.branches.iter().any(|b| b == branch) {
            return Vec::new();
        }
        self.builders
            .iter()
            .filter(|b| b.builds_repo(repo))
            .filter(|b| {
                b.branches
                    .as_ref()
                    .is_none_or(|list| list.iter().any(|x| x == branch))
            })
            .collect()
    }

    /// Builders that try runs of `repo` use. Empty when the repo is unknown.
    pub fn try_builders(&self, repo: &str) -> Vec<&Builder> {
        if self.repo(repo).is_none() {
            return Vec::new();
        }
        self.builders
            .iter()
            .filter(|b| b.try_bot && b.builds_repo(repo))
            .collect()
    }

    /// The host type called `name`.
    pub fn host_type(&self, name: &str) -> Option<&HostType> {
        self.host_types.iter().find(|h| h.name == name)
    }

    /// The builder called `name`.
    pub fn builder(&self, name: &str) -> Option<&Builder> {
        self.builders.iter().find(|b| b.name == name)
    }

    /// The repo called `name`.
    pub fn repo(&self, name: &str) -> Option<&Repo> {
        self.repos.iter().find(|r| r.name == name)
    }
}

/// Fuzz body of config loading (the `config_parse` cargo-fuzz target, and
/// `coordinator/config/tests/fuzz_bodies.rs` on stable): parses and validates `data` as the
/// text of `fuzz.toml` (lossily decoded, as a file read would refuse non-UTF-8 outright).
/// Panics when parsing panics, or when the result breaks the contract: a refused config
/// has at least one error and every error names a line and column inside the text and
/// says what is wrong; an accepted config also passes [`Config::validate`] and all its
/// references resolve.
pub fn fuzz_parse(data: &[u8]) -> Result<Config, ConfigErrors> {
    let text = String::from_utf8_lossy(data);
    let result = Config::from_toml_str(&text, "fuzz.toml");
    match &result {
        Err(errors) => {
            assert!(!errors.errors.is_empty(), "refused with no error");
            let lines = text.matches('\n').count() + 1;
            for e in &errors.errors {
                let Some(loc) = e.location else {
                    panic!("error without a line: {e}");
                };
                assert!(
                    (1..=lines).contains(&loc.line) && loc.column >= 1,
                    "error at {}:{} outside a text of {lines} lines: {e}",
                    loc.line,
                    loc.column
                );
                let shown = e.to_string();
                assert!(
                    shown.starts_with(&format!("fuzz.toml:{}:{}", loc.line, loc.column)),
                    "error does not start with its location: {shown}"
                );
                assert!(
                    !e.kind.to_string().is_empty(),
                    "error says nothing: {shown}"
                );
            }
        }
        Ok(config) => {
            if let Err(errors) = config.validate("fuzz.toml") {
                panic!("parsed config fails validation: {errors}");
            }
            for b in &config.builders {
                assert!(
                    config.host_type(&b.host_type).is_some(),
                    "builder {} names unknown host type {}",
                    b.name,
                    b.host_type
                );
            }
        }
    }
    result
}
