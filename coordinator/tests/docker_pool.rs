//! The main job in containers: the built-in config's native builder (`go vet`, `go
//! test` of the example module in `env/examples/hello`) with its host type switched to a
//! Docker pool. A real coordinator polls a real git repo, and each build runs in a
//! container of the `env/linux-amd64` image that fetched its buildlet from the
//! coordinator through the test network's gateway. No container outlives the test.
//!
//! Without a Docker engine this prints a note and passes; under `CI=true` it fails.

mod common;
mod docker_env;

use std::time::Duration;

use buildfarm_config::{Config, DockerPool, LOCAL_HOST_TYPE, Pool, host_platform};
use buildfarm_store::BuildState;
use coordinator::app::{self, StartOptions};
use docker_env::DockerEnv;

const WAIT: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_module_builds_in_containers() {
    let Some(image) = docker_env::image().await else {
        return;
    };
    let Some(env) = DockerEnv::new().await else {
        return;
    };
    buildfarm_tls::install_crypto_provider();
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = tmp.path().join("example-repo");
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../env/examples/hello");
    coordinator::git::import_dir_as_repo(&example, &repo)
        .await
        .expect("import the example module");
    let (goos, goarch) = host_platform().expect("a Go platform");
    let native = format!("{goos}-{goarch}");

    let mut config = Config::builtin_default(&repo);
    config.coordinator.data_dir = tmp.path().join("data");
    config.coordinator.repo_poll_interval = Duration::from_secs(1);
    // Only the native builder: cross builds of the standard library would take many
    // minutes on two cores, and prove nothing more about containers.
    config.builders.retain(|b| b.name == native);
    assert_eq!(
        config.builders.len(),
        1,
        "the built-in config has a {native} builder"
    );
    let host_type = config
        .host_types
        .iter_mut()
        .find(|h| h.name == LOCAL_HOST_TYPE)
        .expect("the built-in host type");
    host_type.pool = Pool::Docker(DockerPool {
        image,
        network: Some(env.network.clone()),
        max: 1,
        engine: None,
        coordinator_url: None,
        max_lifetime: Duration::from_secs(1800),
    });
    config.validate("test").expect("a valid config");

    let listener = tokio::net::TcpListener::bind((env.gateway, 0))
        .await
        .expect("bind on the network's gateway");
    let running = app::start(
        config,
        listener,
        StartOptions {
            buildlet_bin: Some(common::buildlet_bin()),
            config_file: None,
        },
    )
    .await
    .expect("start coordinator");
    let owner = coordinator::pool::docker::owner_id(running.farm.data_dir());

    let deadline = tokio::time::Instant::now() + WAIT;
    let build = loop {
        let builds = running.farm.store().recent_builds(10).await.expect("store");
        if let Some(b) = builds
            .iter()
            .find(|b| b.builder == native && b.state.is_final())
        {
            break b.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no final build of {native} in time: {builds:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let log = running
        .farm
        .store()
        .get_log(&build.id)
        .await
        .expect("log")
        .map(|l| String::from_utf8_lossy(&l).into_owned())
        .unwrap_or_default();
    assert_eq!(build.state, BuildState::Ok, "build {build:?}\nlog:\n{log}");
    assert!(log.contains("ok"), "go test reported no ok:\n{log}");
    let attempts = running
        .farm
        .store()
        .list_attempts(&build.id)
        .await
        .expect("attempts");
    assert!(
        attempts.iter().any(|a| a.buildlet.starts_with("docker/")),
        "the build ran on a docker buildlet: {attempts:?}"
    );

    // The build's container is removed after release.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !env.containers(&owner).await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the build's container was not removed"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    running.stop(Duration::from_secs(20)).await;
    env.cleanup(&owner).await;
}

/// A coordinator that dies holding a container leaves it behind; the next coordinator
/// on the same data dir (same owner) removes it when it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_sweeps_what_the_last_one_left() {
    let Some(image) = docker_env::image().await else {
        return;
    };
    let Some(env) = DockerEnv::new().await else {
        return;
    };
    buildfarm_tls::install_crypto_provider();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut config = Config::default();
    config.coordinator.data_dir = tmp.path().join("data");
    config.host_types.push(buildfarm_config::HostType {
        name: "linux-amd64-docker".into(),
        pool: Pool::Docker(DockerPool {
            image,
            network: Some(env.network.clone()),
            max: 1,
            engine: None,
            coordinator_url: None,
            max_lifetime: Duration::from_secs(1800),
        }),
        env: Default::default(),
    });
    let start = |config: Config| {
        let gateway = env.gateway;
        async move {
            let listener = tokio::net::TcpListener::bind((gateway, 0))
                .await
                .expect("bind on the network's gateway");
            app::start(
                config,
                listener,
                StartOptions {
                    buildlet_bin: Some(common::buildlet_bin()),
                    config_file: None,
                },
            )
            .await
            .expect("start coordinator")
        }
    };
    let first = start(config.clone()).await;
    let owner = coordinator::pool::docker::owner_id(first.farm.data_dir());
    let pool = first
        .farm
        .pool("linux-amd64-docker")
        .expect("docker pool")
        .clone();
    let lease = tokio::time::timeout(
        WAIT,
        pool.acquire(&tokio_util::sync::CancellationToken::new()),
    )
    .await
    .expect("acquire in time")
    .expect("a container");
    // The coordinator "crashes": the lease is never released.
    std::mem::forget(lease);
    first.stop(Duration::from_secs(2)).await;
    assert_eq!(
        env.containers(&owner).await.len(),
        1,
        "the crash left its container"
    );

    let second = start(config).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !env.containers(&owner).await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restarted coordinator did not sweep the container"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    second.stop(Duration::from_secs(20)).await;
    env.cleanup(&owner).await;
}
