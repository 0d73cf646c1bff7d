//! Pools hand out buildlets of one host type and take them back. Every pool kind
//! (local, reverse, docker, kube and ec2) implements [`Pool`]; the dispatcher
//! never knows which kind it is talking to.

pub mod bootstrap;
pub mod cloud;
pub mod docker;
pub mod ec2;
pub mod kube;
pub mod local;
pub mod provision;
pub mod reconcile;
pub mod reverse;
pub mod sandbox;

use async_trait::async_trait;
use buildlet::client::BuildletClient;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// Why a pool could not provide a buildlet. Every variant is an infrastructure
/// failure of the attempt, never a build failure.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("starting a buildlet for {host_type}: {message}")]
    Start { host_type: String, message: String },
    #[error("no buildlet of host type {0} can be had")]
    Unavailable(String),
    #[error("cancelled while waiting for a buildlet")]
    Cancelled,
}

/// What a pool reports on the status page and in metrics.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PoolStatus {
    pub kind: &'static str,
    pub host_type: String,
    /// Most buildlets that can be leased at once right now.
    pub capacity: usize,
    pub in_use: usize,
    pub idle: usize,
    pub starting: usize,
    /// For reverse pools: how many machines the config expects to be connected.
    pub expected: Option<usize>,
}

/// One leased buildlet. Dropping the lease gives it back to its pool (which may
/// destroy it, as the local pool does).
pub struct Lease {
    pub client: BuildletClient,
    /// Human-readable identity, e.g. `local/linux-amd64#3` or `reverse/mac-mini-1`.
    pub name: String,
    pub host_type: String,
    /// Cancelled when the pool learns the buildlet is gone (process died, tunnel lost).
    pub lost: CancellationToken,
    release: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Lease {
    pub fn new(
        client: BuildletClient,
        name: String,
        host_type: String,
        lost: CancellationToken,
        release: impl FnOnce() + Send + Sync + 'static,
    ) -> Self {
        Lease {
            client,
            name,
            host_type,
            lost,
            release: Some(Box::new(release)),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release();
        }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("name", &self.name).finish()
    }
}

#[async_trait]
pub trait Pool: Send + Sync {
    fn kind(&self) -> &'static str;
    fn host_type(&self) -> &str;
    /// How many leases may be out at once right now (the dispatcher's limit).
    fn capacity(&self) -> usize;
    fn status(&self) -> PoolStatus;
    /// A ready buildlet. Waits while the pool is starting one; fails rather than
    /// waiting forever when none can be had.
    async fn acquire(&self, cancel: &CancellationToken) -> Result<Lease, PoolError>;
    /// Resolves when [`Pool::capacity`] may have changed by itself (a machine connected
    /// or left), so the dispatcher wakes on the event instead of polling. Pools whose
    /// capacity only changes when leases come back (which the dispatcher sees) keep the
    /// default, which never resolves.
    async fn capacity_changed(&self) {
        std::future::pending::<()>().await
    }
}
