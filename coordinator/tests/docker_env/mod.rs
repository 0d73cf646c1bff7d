//! A Docker engine for tests: a network of the test's own (the coordinator listens on
//! its gateway address, so all traffic stays on this host and that network), the
//! `env/linux-amd64` image (built with its script when missing), and helpers over the
//! engine. Without an engine the tests print a note and skip; with `CI=true` a missing
//! engine fails them instead.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, NetworkCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, KillContainerOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder,
};
use coordinator::pool::docker::{LABEL_DEADLINE, LABEL_HOST_TYPE, LABEL_OWNER, connect_engine};

/// The image the pool tests run: what `cargo xtask images` builds from env/linux-amd64.
pub const IMAGE: &str = "buildfarm/linux-amd64:local";

/// Label on everything the tests create, so a crashed test's leftovers can be found.
const TEST_LABEL: &str = "buildfarm.test";

/// An engine, or `None` after printing why (a panic under `CI=true`).
pub async fn engine() -> Option<Docker> {
    match connect_engine(None).await {
        Ok(d) => Some(d),
        Err(e) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true but no Docker engine answers: {e}");
            }
            eprintln!("note: skipping a Docker test: no Docker engine answers ({e})");
            None
        }
    }
}

/// The test image, built from `env/linux-amd64/make-image.sh` if the engine lacks it.
pub async fn image() -> Option<String> {
    let docker = engine().await?;
    let script: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "..",
        "env",
        "linux-amd64",
        "make-image.sh",
    ]
    .iter()
    .collect();
    let want = coordinator::pool::bootstrap::sha256_file(&script)
        .await
        .expect("hashing make-image.sh");
    // Current when made by this version of the script.
    let current = || async {
        docker
            .inspect_image(IMAGE)
            .await
            .ok()
            .and_then(|i| i.config?.labels?.remove("buildfarm.script-sha256"))
            == Some(want.clone())
    };
    if current().await {
        return Some(IMAGE.to_owned());
    }
    // One builder at a time across test processes.
    let lock_path = std::env::temp_dir().join("buildfarm-test-image.lock");
    let lock = std::fs::File::create(&lock_path).expect("lock file");
    let lock = tokio::task::spawn_blocking(move || {
        lock.lock().expect("lock");
        lock
    })
    .await
    .expect("lock task");
    if !current().await {
        eprintln!("building {IMAGE} with {}", script.display());
        let out = tokio::process::Command::new("sh")
            .arg(&script)
            .arg(IMAGE)
            .output()
            .await
            .expect("running make-image.sh");
        assert!(
            out.status.success(),
            "make-image.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    drop(lock);
    Some(IMAGE.to_owned())
}

/// A network of this test's own, removed on drop.
pub struct DockerEnv {
    pub docker: Docker,
    pub network: String,
    pub gateway: IpAddr,
}

impl DockerEnv {
    pub async fn new() -> Option<DockerEnv> {
        let docker = engine().await?;
        let network = format!(
            "bf-test-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        docker
            .create_network(NetworkCreateRequest {
                name: network.clone(),
                driver: Some("bridge".into()),
                labels: Some(HashMap::from([(TEST_LABEL.to_owned(), "1".to_owned())])),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("creating network {network}: {e}"));
        let inspect = docker
            .inspect_network(&network, None)
            .await
            .expect("inspect network");
        let gateway = inspect
            .ipam
            .and_then(|i| i.config)
            .unwrap_or_default()
            .into_iter()
            .find_map(|c| c.gateway?.parse::<IpAddr>().ok())
            .expect("the network has a gateway");
        Some(DockerEnv {
            docker,
            network,
            gateway,
        })
    }

    /// Ids of every container (running or not) of `owner`.
    pub async fn containers(&self, owner: &str) -> Vec<String> {
        let filters = HashMap::from([("label".to_owned(), vec![format!("{LABEL_OWNER}={owner}")])]);
        self.docker
            .list_containers(Some(
                ListContainersOptionsBuilder::default()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await
            .expect("list containers")
            .into_iter()
            .filter_map(|c| c.id)
            .collect()
    }

    pub async fn kill(&self, id: &str) {
        let _ = self
            .docker
            .kill_container(
                id,
                Some(
                    KillContainerOptionsBuilder::default()
                        .signal("KILL")
                        .build(),
                ),
            )
            .await;
    }

    pub async fn exists(&self, id: &str) -> bool {
        self.docker.inspect_container(id, None).await.is_ok()
    }

    pub async fn remove(&self, id: &str) {
        let _ = self
            .docker
            .remove_container(
                id,
                Some(RemoveContainerOptionsBuilder::default().force(true).build()),
            )
            .await;
    }

    /// A container as a crashed coordinator `owner` would have left (created, with the
    /// pool's labels); returns its id.
    pub async fn leftover(&self, owner: &str, host_type: &str, what: &str) -> String {
        let image = image().await.expect("image");
        let name = format!("{what}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        self.docker
            .create_container(
                Some(CreateContainerOptionsBuilder::default().name(&name).build()),
                ContainerCreateBody {
                    image: Some(image),
                    cmd: Some(vec!["sleep".into(), "3600".into()]),
                    // On the test's network, so that dropping the env removes it even
                    // when an assertion failed first.
                    host_config: Some(HostConfig {
                        network_mode: Some(self.network.clone()),
                        ..Default::default()
                    }),
                    labels: Some(HashMap::from([
                        (LABEL_OWNER.to_owned(), owner.to_owned()),
                        (LABEL_HOST_TYPE.to_owned(), host_type.to_owned()),
                        (LABEL_DEADLINE.to_owned(), "99999999999".to_owned()),
                        (TEST_LABEL.to_owned(), "1".to_owned()),
                    ])),
                    ..Default::default()
                },
            )
            .await
            .expect("create leftover")
            .id
    }

    /// Removes every container of `owner` (a failed test's too).
    pub async fn cleanup(&self, owner: &str) {
        for id in self.containers(owner).await {
            self.remove(&id).await;
        }
    }
}

impl Drop for DockerEnv {
    fn drop(&mut self) {
        // Synchronous on purpose: drop may run outside the runtime. Containers still on
        // the network are force-removed first so the network can go.
        let _ = std::process::Command::new("sh")
            .arg("-c")
            .arg("ids=$(docker ps -aq --filter network=\"$1\"); [ -z \"$ids\" ] || docker rm -f $ids >/dev/null; docker network rm \"$1\" >/dev/null")
            .arg("sh")
            .arg(&self.network)
            .status();
    }
}
