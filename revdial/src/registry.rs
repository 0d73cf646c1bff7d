//! The hosts currently connected through reverse tunnels, and the events of hosts
//! coming and going. A pool lists or subscribes here and calls a host through its
//! [`TunnelChannel`]. A host that dials in again with the same host type and
//! hostname replaces its old entry, which is reported lost first.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::tunnel::TunnelChannel;

/// Events are kept for slow subscribers up to this many; a subscriber that falls
/// further behind gets `RecvError::Lagged` and should re-read [`Registry::list`].
const EVENT_BUFFER: usize = 1024;

/// Identifies one connection of a host (a reconnect gets a new id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostId(pub u64);

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rev-{}", self.0)
    }
}

/// What is known about a connected host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    pub id: HostId,
    pub host_type: String,
    pub hostname: String,
    /// The buildlet version the host announced.
    pub version: String,
    pub peer: SocketAddr,
    pub connected_since: SystemTime,
    /// Round-trip time of the last successful tunnel ping.
    pub last_ping_rtt: Option<Duration>,
}

/// A host that can be called.
#[derive(Debug, Clone)]
pub struct ConnectedHost {
    pub info: HostInfo,
    pub channel: TunnelChannel,
    /// Cancelled when the host is lost: a pool selects on it to fail the attempt it
    /// is running on this host.
    pub lost: CancellationToken,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostEvent {
    Connected(HostInfo),
    Lost { info: HostInfo, reason: String },
}

struct Entry {
    host: ConnectedHost,
    /// Cancelling it makes the tunnel's I/O fail, which closes the connection.
    kill: CancellationToken,
}

#[derive(Default)]
struct State {
    hosts: HashMap<HostId, Entry>,
    by_name: HashMap<(String, String), HostId>,
}

struct Inner {
    state: Mutex<State>,
    events: broadcast::Sender<HostEvent>,
    next_id: AtomicU64,
    lost_total: AtomicU64,
}

/// Shared view of the connected hosts. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("hosts", &self.lock().hosts.len())
            .finish()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl Registry {
    pub fn new() -> Self {
        Registry {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                events: broadcast::channel(EVENT_BUFFER).0,
                next_id: AtomicU64::new(1),
                lost_total: AtomicU64::new(0),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way
        // that matters more than losing the registry, so keep going.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The connected hosts, oldest connection first.
    pub fn list(&self) -> Vec<HostInfo> {
        let mut v: Vec<HostInfo> = self
            .lock()
            .hosts
            .values()
            .map(|e| e.host.info.clone())
            .collect();
        v.sort_by_key(|i| i.id);
        v
    }

    pub fn get(&self, id: HostId) -> Option<ConnectedHost> {
        self.lock().hosts.get(&id).map(|e| e.host.clone())
    }

    /// The current connection of `hostname` of `host_type`.
    pub fn find(&self, host_type: &str, hostname: &str) -> Option<ConnectedHost> {
        let st = self.lock();
        let id = st
            .by_name
            .get(&(host_type.to_owned(), hostname.to_owned()))?;
        st.hosts.get(id).map(|e| e.host.clone())
    }

    /// Events from now on. Connected/Lost are sent while the registry is locked, so
    /// they arrive in the order the registry changed.
    pub fn subscribe(&self) -> broadcast::Receiver<HostEvent> {
        self.inner.events.subscribe()
    }

    pub fn len(&self) -> usize {
        self.lock().hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes the tunnel of `id` (e.g. a host the operator wants gone).
    pub fn disconnect(&self, id: HostId, reason: &str) -> bool {
        self.mark_lost(id, reason)
    }

    pub(crate) fn lost_total(&self) -> u64 {
        self.inner.lost_total.load(Ordering::Relaxed)
    }

    pub(crate) fn next_id(&self) -> HostId {
        HostId(self.inner.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Adds a host, replacing an older connection of the same host.
    pub(crate) fn insert(&self, host: ConnectedHost, kill: CancellationToken) {
        let mut st = self.lock();
        let key = (host.info.host_type.clone(), host.info.hostname.clone());
        if let Some(old) = st.by_name.get(&key).copied() {
            let reason = format!("replaced by a new connection from {}", host.info.peer);
            Self::remove_locked(&self.inner, &mut st, old, &reason);
        }
        let info = host.info.clone();
        st.by_name.insert(key, info.id);
        st.hosts.insert(info.id, Entry { host, kill });
        info!(host_id = %info.id, host_type = %info.host_type, hostname = %info.hostname, peer = %info.peer, version = %info.version, "reverse host connected");
        // No receivers is fine: nobody is watching yet.
        let _ = self.inner.events.send(HostEvent::Connected(info));
    }

    /// Removes `id`, closes its tunnel and reports it lost. False if it was already gone.
    pub(crate) fn mark_lost(&self, id: HostId, reason: &str) -> bool {
        let mut st = self.lock();
        Self::remove_locked(&self.inner, &mut st, id, reason)
    }

    fn remove_locked(inner: &Inner, st: &mut State, id: HostId, reason: &str) -> bool {
        let Some(entry) = st.hosts.remove(&id) else {
            return false;
        };
        let info = entry.host.info;
        let key = (info.host_type.clone(), info.hostname.clone());
        if st.by_name.get(&key) == Some(&id) {
            st.by_name.remove(&key);
        }
        entry.host.lost.cancel();
        entry.kill.cancel();
        inner.lost_total.fetch_add(1, Ordering::Relaxed);
        warn!(host_id = %id, host_type = %info.host_type, hostname = %info.hostname, peer = %info.peer, reason, "reverse host lost");
        let _ = inner.events.send(HostEvent::Lost {
            info,
            reason: reason.to_owned(),
        });
        true
    }

    pub(crate) fn set_rtt(&self, id: HostId, rtt: Duration) {
        if let Some(e) = self.lock().hosts.get_mut(&id) {
            e.host.info.last_ping_rtt = Some(rtt);
        }
    }
}
