//! What the cloud pools (kube, ec2) need from the coordinator to start a machine: for one
//! new machine, the `sh` script it runs at boot (pod command, EC2 user-data), which
//! fetches the buildlet and starts it in listen mode with credentials made for that
//! machine alone, and how the coordinator then reaches that buildlet.
//! [`BootstrapProvision`] is the coordinator's, over [`super::bootstrap`].

use std::sync::Arc;

use async_trait::async_trait;
use buildfarm_tls::CertificateAuthority;
use buildlet::client::ConnectOptions;

use super::bootstrap::{BootstrapParams, BuildletBinaries, MachineCredentials, bootstrap_script};

/// One machine's boot script and the client side of its credentials.
pub struct Provisioned {
    /// A POSIX `sh` script; run as the machine's first (and only) job.
    pub script: String,
    /// How to reach the buildlet; `addr` is left empty and set by the pool once the
    /// machine has an address.
    pub connect: ConnectOptions,
}

/// Makes credentials and boot scripts.
#[async_trait]
pub trait Provision: Send + Sync {
    /// Credentials and script for machine `machine` (unique, the pool's name for it) of
    /// `host_type`, whose buildlet will listen on `port` on every address.
    async fn provision(
        &self,
        machine: &str,
        host_type: &str,
        port: u16,
    ) -> anyhow::Result<Provisioned>;

    /// The machine is gone: its credentials must stop working.
    fn revoke(&self, machine: &str) {
        let _ = machine;
    }
}

/// The coordinator's provisioner: a certificate from the farm CA for the machine's name
/// and a random bearer key (never the master key), and the bootstrap script that fetches
/// the buildlet from `coordinator_url` trusting `trust_pem` only.
pub struct BootstrapProvision {
    pub ca: Arc<CertificateAuthority>,
    /// The CA the coordinator's clients verify machine certificates against.
    pub ca_pem: String,
    /// What the machine's fetch trusts: the CA (or chain) of the coordinator's own
    /// certificate.
    pub trust_pem: String,
    /// `https://host:port` of the coordinator as machines see it.
    pub coordinator_url: String,
    pub binaries: Arc<BuildletBinaries>,
    /// `GOOS-GOARCH` of the machines.
    pub platform: String,
    /// Directory on the machine for the binary, credentials and workdir.
    pub dir: String,
    /// More buildlet flags.
    pub extra_args: Vec<String>,
}

#[async_trait]
impl Provision for BootstrapProvision {
    async fn provision(
        &self,
        machine: &str,
        host_type: &str,
        port: u16,
    ) -> anyhow::Result<Provisioned> {
        let bin = self.binaries.get(&self.platform).await?;
        // The certificate names the machine, not an address: it is checked against this
        // name whatever address the pool dials.
        let name = format!("{machine}.buildlet.buildfarm");
        let creds = MachineCredentials::issue(&self.ca, &[&name])?;
        let script = bootstrap_script(&BootstrapParams {
            coordinator_url: self.coordinator_url.clone(),
            connect_to: None,
            coordinator_ca_pem: self.trust_pem.clone(),
            platform: bin.platform.clone(),
            sha256: bin.sha256.clone(),
            credentials: &creds,
            host_type: host_type.to_owned(),
            listen: format!("0.0.0.0:{port}"),
            dir: format!("{}/{machine}", self.dir.trim_end_matches('/')),
            extra_args: self.extra_args.clone(),
        });
        Ok(Provisioned {
            script,
            connect: creds.connect_options(String::new(), &self.ca_pem),
        })
    }
}
