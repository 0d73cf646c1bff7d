//! The built-in config used when no file is given: everything on this machine, so
//! `buildfarm` runs out of the box against one example repo.

use std::path::Path;
use std::time::Duration;

use crate::model::{
    Builder, Config, CoordinatorConfig, Env, HostType, LocalPool, Pool, Repo, Step,
};
use crate::names::{goarch_from_rust, goos_from_rust};

/// Host type of the built-in config.
pub const LOCAL_HOST_TYPE: &str = "local";
/// Cross-compile-only builders of the built-in config (one equal to the host is skipped).
pub const CROSS_BUILDERS: &[(&str, &str)] = &[
    ("windows", "amd64"),
    ("darwin", "arm64"),
    ("freebsd", "amd64"),
    ("linux", "riscv64"),
];

/// Go's `GOOS-GOARCH` for the machine this runs on, e.g. `linux-amd64`, if Go has that port.
pub fn host_platform() -> Option<(&'static str, &'static str)> {
    let goos = goos_from_rust(std::env::consts::OS)?;
    let goarch = goarch_from_rust(std::env::consts::ARCH, cfg!(target_endian = "little"))?;
    Some((goos, goarch))
}

pub(crate) fn builtin(example_repo: &Path) -> Config {
    let mut builders = Vec::new();
    let host = host_platform();
    // No native builder on a platform Go has no port for; the cross builders still work.
    if let Some((goos, goarch)) = host {
        builders.push(builder(
            format!("{goos}-{goarch}"),
            Env::new(),
            &[
                ("vet", &["go", "vet", "./..."]),
                ("test", &["go", "test", "./..."]),
            ],
        ));
    }
    for &(goos, goarch) in CROSS_BUILDERS {
        if host == Some((goos, goarch)) {
            continue;
        }
        let env = Env::from([
            ("GOOS".to_owned(), goos.to_owned()),
            ("GOARCH".to_owned(), goarch.to_owned()),
            ("CGO_ENABLED".to_owned(), "0".to_owned()),
        ]);
        builders.push(builder(
            format!("{goos}-{goarch}"),
            env,
            &[
                ("build", &["go", "build", "./..."]),
                ("vet", &["go", "vet", "./..."]),
            ],
        ));
    }
    Config {
        coordinator: CoordinatorConfig::default(),
        host_types: vec![HostType {
            name: LOCAL_HOST_TYPE.to_owned(),
            pool: Pool::Local(LocalPool { count: 2 }),
            env: Env::new(),
        }],
        builders,
        repos: vec![Repo {
            name: "example".to_owned(),
            url: example_repo.to_string_lossy().into_owned(),
            branches: vec!["main".to_owned()],
            webhook_secret: None,
            danger_accept_unsigned_webhooks: false,
            commit_status: None,
            go: None,
            artifacts: None,
        }],
        limits: crate::Limits::default(),
        sandbox: Default::default(),
        connections: Default::default(),
        notifications: vec![],
        artifacts: Default::default(),
        access: Default::default(),
    }
}

fn builder(name: String, env: Env, steps: &[(&str, &[&str])]) -> Builder {
    Builder {
        name,
        host_type: LOCAL_HOST_TYPE.to_owned(),
        env,
        try_bot: true,
        repos: None,
        branches: None,
        steps: steps
            .iter()
            .map(|(name, argv)| Step {
                name: (*name).to_owned(),
                command: argv.iter().map(|a| (*a).to_owned()).collect(),
                env: Env::new(),
                timeout: Duration::from_secs(20 * 60),
                requires: Vec::new(),
                snapshot: None,
                restore: None,
                cache: None,
                units: None,
                only_units: Vec::new(),
                path: Vec::new(),
                toolchain: None,
            })
            .collect(),
        build_timeout: Duration::from_secs(60 * 60),
        test_shards: 1,
        artifacts: Vec::new(),
    }
}
