//! The reverse pool: machines that dialled in over revdial, matched exactly by host
//! type. A machine is never handed out twice; its workdir is emptied before each
//! lease; when its tunnel is lost the lease's `lost` token fires, which fails only the
//! attempt running there.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use buildlet::client::BuildletClient;
use revdial::{HostId, Registry};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Lease, Pool, PoolError, PoolStatus};

/// How long `acquire` waits for a machine of its host type to be free or connect.
const ACQUIRE_WAIT: Duration = Duration::from_secs(60);

pub struct ReversePool {
    host_type: String,
    expected: usize,
    registry: Registry,
    busy: Arc<Mutex<HashSet<HostId>>>,
    released: Arc<tokio::sync::Notify>,
}

impl ReversePool {
    pub fn new(host_type: String, expected: usize, registry: Registry) -> Self {
        ReversePool {
            host_type,
            expected,
            registry,
            busy: Arc::new(Mutex::new(HashSet::new())),
            released: Arc::new(tokio::sync::Notify::new()),
        }
    }

    fn connected(&self) -> Vec<HostId> {
        self.registry
            .list()
            .into_iter()
            .filter(|h| h.host_type == self.host_type)
            .map(|h| h.id)
            .collect()
    }

    /// Claims an idle connected machine, if there is one.
    fn claim(&self) -> Option<HostId> {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        // Forget machines that are gone so the set stays small.
        let connected = self.connected();
        busy.retain(|id| connected.contains(id));
        let id = connected.into_iter().find(|id| !busy.contains(id))?;
        busy.insert(id);
        Some(id)
    }

    fn unclaim(&self, id: HostId) {
        self.busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.released.notify_waiters();
    }
}

#[async_trait]
impl Pool for ReversePool {
    fn kind(&self) -> &'static str {
        "reverse"
    }

    fn host_type(&self) -> &str {
        &self.host_type
    }

    fn capacity(&self) -> usize {
        self.connected().len()
    }

    fn status(&self) -> PoolStatus {
        let connected = self.connected();
        let busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let in_use = connected.iter().filter(|id| busy.contains(id)).count();
        PoolStatus {
            kind: "reverse",
            host_type: self.host_type.clone(),
            capacity: connected.len(),
            in_use,
            idle: connected.len() - in_use,
            starting: 0,
            expected: Some(self.expected),
        }
    }

    async fn acquire(&self, cancel: &CancellationToken) -> Result<Lease, PoolError> {
        let deadline = tokio::time::Instant::now() + ACQUIRE_WAIT;
        loop {
            // Subscribe before looking so a connect between the two is not missed.
            let mut events = self.registry.subscribe();
            let released = self.released.notified();
            if let Some(id) = self.claim() {
                let Some(host) = self.registry.get(id) else {
                    self.unclaim(id);
                    continue;
                };
                let client = match BuildletClient::from_service(host.channel.clone(), None) {
                    Ok(c) => c,
                    Err(e) => {
                        self.unclaim(id);
                        return Err(PoolError::Start {
                            host_type: self.host_type.clone(),
                            message: e.to_string(),
                        });
                    }
                };
                // Start every lease from an empty workdir, as the Go farm did.
                if let Err(e) = client.remove_all().await {
                    warn!(host = %host.info.hostname, error = %e, "cleaning reverse buildlet failed");
                    self.unclaim(id);
                    if e.is_unavailable() {
                        continue;
                    }
                    return Err(PoolError::Start {
                        host_type: self.host_type.clone(),
                        message: format!("cleaning {}: {e}", host.info.hostname),
                    });
                }
                info!(host = %host.info.hostname, host_type = %self.host_type, "reverse buildlet leased");
                let busy = self.busy.clone();
                let released = self.released.clone();
                return Ok(Lease::new(
                    client,
                    format!("reverse/{}", host.info.hostname),
                    self.host_type.clone(),
                    host.lost.clone(),
                    move || {
                        busy.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                        released.notify_waiters();
                    },
                ));
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err(PoolError::Cancelled),
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(PoolError::Unavailable(self.host_type.clone()));
                }
                _ = events.recv() => {}
                _ = released => {}
            }
        }
    }
}
