//! The reverse pool: machines that dialled in over revdial, matched exactly by host
//! type. A machine is never handed out twice; its workdir is emptied before each
//! lease; when its tunnel is lost the lease's `lost` token fires, which fails only the
//! attempt running there.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use buildlet::client::BuildletClient;
use revdial::{HostEvent, HostId, Registry};
use tokio::sync::broadcast::{self, error::TryRecvError};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Lease, Pool, PoolError, PoolStatus};

/// How long `acquire` waits for a machine of its host type to be free or connect.
const ACQUIRE_WAIT: Duration = Duration::from_secs(60);

/// The pool's view of its machines, kept current from the registry's events so a claim
/// is O(log n) instead of listing the whole registry.
struct Hosts {
    idle: BTreeSet<HostId>,
    busy: HashSet<HostId>,
    events: broadcast::Receiver<HostEvent>,
}

impl Hosts {
    /// Applies the registry events that arrived since the last look.
    fn sync(&mut self, host_type: &str, registry: &Registry) {
        loop {
            match self.events.try_recv() {
                Ok(HostEvent::Connected(info)) if info.host_type == host_type => {
                    if !self.busy.contains(&info.id) {
                        self.idle.insert(info.id);
                    }
                }
                Ok(HostEvent::Lost { info, .. }) if info.host_type == host_type => {
                    self.idle.remove(&info.id);
                    self.busy.remove(&info.id);
                }
                Ok(_) => {}
                Err(TryRecvError::Lagged(_)) => self.resync(host_type, registry),
                Err(TryRecvError::Empty | TryRecvError::Closed) => return,
            }
        }
    }

    /// Rebuilds the view from the registry (at start, and after missing events).
    fn resync(&mut self, host_type: &str, registry: &Registry) {
        let connected: HashSet<HostId> = registry
            .list()
            .into_iter()
            .filter(|h| h.host_type == host_type)
            .map(|h| h.id)
            .collect();
        self.busy.retain(|id| connected.contains(id));
        self.idle = connected
            .into_iter()
            .filter(|id| !self.busy.contains(id))
            .collect();
    }
}

pub struct ReversePool {
    host_type: String,
    expected: usize,
    registry: Registry,
    hosts: Arc<Mutex<Hosts>>,
    released: Arc<tokio::sync::Notify>,
    /// Followed by [`Pool::capacity_changed`]; its own receiver so no event between two
    /// calls is lost.
    capacity_events: tokio::sync::Mutex<broadcast::Receiver<HostEvent>>,
}

impl ReversePool {
    pub fn new(host_type: String, expected: usize, registry: Registry) -> Self {
        // Subscribe before listing, so a host connecting in between is not missed.
        let mut hosts = Hosts {
            idle: BTreeSet::new(),
            busy: HashSet::new(),
            events: registry.subscribe(),
        };
        let capacity_events = tokio::sync::Mutex::new(registry.subscribe());
        hosts.resync(&host_type, &registry);
        ReversePool {
            host_type,
            expected,
            registry,
            hosts: Arc::new(Mutex::new(hosts)),
            released: Arc::new(tokio::sync::Notify::new()),
            capacity_events,
        }
    }

    fn hosts(&self) -> MutexGuard<'_, Hosts> {
        let mut h = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        h.sync(&self.host_type, &self.registry);
        h
    }

    /// Claims an idle connected machine, if there is one.
    fn claim(&self) -> Option<HostId> {
        let mut h = self.hosts();
        let id = h.idle.pop_first()?;
        h.busy.insert(id);
        Some(id)
    }

    fn unclaim(&self, id: HostId) {
        release(&self.hosts, id);
        self.released.notify_waiters();
    }
}

/// Gives a claimed machine back; one that was lost meanwhile is not busy any more and
/// stays gone.
fn release(hosts: &Mutex<Hosts>, id: HostId) {
    let mut h = hosts.lock().unwrap_or_else(|e| e.into_inner());
    if h.busy.remove(&id) {
        h.idle.insert(id);
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
        let h = self.hosts();
        h.idle.len() + h.busy.len()
    }

    fn status(&self) -> PoolStatus {
        let h = self.hosts();
        let (in_use, idle) = (h.busy.len(), h.idle.len());
        PoolStatus {
            kind: "reverse",
            host_type: self.host_type.clone(),
            capacity: in_use + idle,
            in_use,
            idle,
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
                    // Gone; its Lost event is on the way. Forget it, don't free it.
                    self.hosts().busy.remove(&id);
                    continue;
                };
                let client = match BuildletClient::over_tunnel(host.channel.clone()) {
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
                let hosts = self.hosts.clone();
                let released = self.released.clone();
                return Ok(Lease::new(
                    client,
                    format!("reverse/{}", host.info.hostname),
                    self.host_type.clone(),
                    host.lost.clone(),
                    move || {
                        release(&hosts, id);
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

    async fn capacity_changed(&self) {
        let mut events = self.capacity_events.lock().await;
        loop {
            match events.recv().await {
                Ok(HostEvent::Connected(info) | HostEvent::Lost { info, .. })
                    if info.host_type == self.host_type =>
                {
                    return;
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => return,
                Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
            }
        }
    }
}
