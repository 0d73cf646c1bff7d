//! Building the cloud pools (kube, ec2) from their config tables: what they share (the
//! farm CA that signs machine certificates, the buildlet binaries machines fetch, the
//! owner label) and the client each talks to its cloud with.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use buildfarm_config::{Ec2Pool as Ec2Config, KubePool as KubeConfig};
use buildfarm_tls::CertificateAuthority;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use super::Pool;
use super::bootstrap::BuildletBinaries;
use super::ec2::{Ec2Pool, Ec2PoolOptions, Ec2Timing};
use super::kube::{KubePool, KubePoolOptions};
use super::provision::BootstrapProvision;

/// How often the kube sweeper lists its pods.
const KUBE_SWEEP: Duration = Duration::from_secs(30);
/// Where the bootstrap keeps its files on a pod (writable for any user) and on an EC2
/// instance (user-data runs as root).
const POD_DIR: &str = "/tmp/buildfarm";
const INSTANCE_DIR: &str = "/var/lib/buildfarm";

pub struct CloudParts {
    pub ca: Arc<CertificateAuthority>,
    pub ca_pem: String,
    /// What machines trust when they fetch from the coordinator.
    pub trust_pem: String,
    pub binaries: Arc<BuildletBinaries>,
    /// The default owner label (from the master key).
    pub owner: String,
    /// The coordinator's port, for the default kube `coordinator_url`.
    pub listen_port: u16,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
}

impl CloudParts {
    fn provision(&self, url: String, platform: &str, dir: &str) -> Arc<BootstrapProvision> {
        Arc::new(BootstrapProvision {
            ca: self.ca.clone(),
            ca_pem: self.ca_pem.clone(),
            trust_pem: self.trust_pem.clone(),
            coordinator_url: url,
            binaries: self.binaries.clone(),
            platform: platform.to_owned(),
            dir: dir.to_owned(),
            extra_args: Vec::new(),
        })
    }

    /// A kube pool using the in-cluster service account or `KUBECONFIG`.
    pub async fn kube_pool(
        &self,
        host_type: &str,
        c: &KubeConfig,
    ) -> anyhow::Result<Arc<dyn Pool>> {
        let client = kube::Client::try_default().await.with_context(|| {
            format!(
                "kube pool {host_type}: no Kubernetes API to talk to (run in a pod with a service account, or set KUBECONFIG)"
            )
        })?;
        let url = c.coordinator_url.clone().unwrap_or_else(|| {
            format!(
                "https://buildfarm-coordinator.{}.svc:{}",
                c.namespace, self.listen_port
            )
        });
        let owner = c.owner.clone().unwrap_or_else(|| self.owner.clone());
        info!(host_type, namespace = %c.namespace, %owner, coordinator_url = %url, "kube pool");
        let pool = KubePool::new(
            KubePoolOptions {
                host_type: host_type.to_owned(),
                config: c.clone(),
                owner,
                client,
                provision: self.provision(url, &c.platform, POD_DIR),
                sweep_interval: KUBE_SWEEP,
            },
            self.tasks.clone(),
            self.shutdown.clone(),
        );
        Ok(Arc::new(pool))
    }

    /// An EC2 pool using AWS's default credential chain.
    pub async fn ec2_pool(&self, host_type: &str, c: &Ec2Config) -> Arc<dyn Pool> {
        let client = super::ec2::client_from_config(c).await;
        let owner = c.owner.clone().unwrap_or_else(|| self.owner.clone());
        info!(host_type, region = %c.region, %owner, coordinator_url = %c.coordinator_url, "ec2 pool");
        Arc::new(Ec2Pool::new(
            Ec2PoolOptions {
                host_type: host_type.to_owned(),
                config: c.clone(),
                owner,
                client,
                provision: self.provision(c.coordinator_url.clone(), &c.platform, INSTANCE_DIR),
                timing: Ec2Timing::default(),
            },
            self.tasks.clone(),
            self.shutdown.clone(),
        ))
    }
}
