//! What the cloud pools (kube, ec2) need from the coordinator to start a machine: for one
//! new machine, the `sh` script it runs at boot (pod command, EC2 user-data), which
//! fetches the buildlet and starts it in listen mode with credentials made for that
//! machine alone, and how the coordinator then reaches that buildlet.

use buildlet::client::ConnectOptions;

/// One machine's boot script and the client side of its credentials.
pub struct Provisioned {
    /// A POSIX `sh` script; run as the machine's first (and only) job.
    pub script: String,
    /// How to reach the buildlet; `addr` is left empty and set by the pool once the
    /// machine has an address.
    pub connect: ConnectOptions,
}

/// Makes credentials and boot scripts; implemented over the coordinator's bootstrap.
pub trait Provision: Send + Sync {
    /// Credentials and script for machine `machine` (unique, the pool's name for it) of
    /// `host_type`, whose buildlet will listen on `port` on every address.
    fn provision(&self, machine: &str, host_type: &str, port: u16) -> anyhow::Result<Provisioned>;

    /// The machine is gone: its credentials must stop working.
    fn revoke(&self, machine: &str) {
        let _ = machine;
    }
}
