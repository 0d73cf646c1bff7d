//! The bounded acceptor every listening port of the farm uses (the coordinator's one
//! port, buildlet listen mode, the revdial [`crate::serve`] loop), and the HTTP serving
//! of one accepted connection with time limits.
//!
//! What it bounds, and why:
//! - **Open connections** ([`ConnLimits::max_connections`]): by default the open-file
//!   limit minus a reserve, so the process keeps descriptors for its own files, database
//!   and children however many peers connect. At the cap the **oldest connection with no
//!   request in flight** (still in its handshake, idle keep-alive, or never sent a whole
//!   request) is closed to make room, rather than refusing the newcomer: a flood of
//!   stalled connections is then pushed out by real callers instead of locking them out
//!   until its timeouts expire, while a connection serving a request (a build's log
//!   stream, a `gomote run`, an authenticated revdial tunnel) is never chosen. Only when
//!   every connection is busy is the new one closed at once.
//! - **Handshakes in progress** ([`ConnLimits::max_handshakes`]): at the cap the oldest
//!   unfinished handshake is closed, for the same reason, once it has had
//!   [`HANDSHAKE_GRACE`]; until then the newcomer waits in the backlog for a handshake
//!   to finish. A real peer finishes well within the grace, so a mass reconnect (a fleet
//!   redialling at once) is not cut down to the handshakes that arrived last, while a
//!   flood of stalled handshakes is pushed out as before.
//! - **Time**: the TLS handshake and protocol sorting ([`ConnLimits::handshake_timeout`]),
//!   HTTP/1 header reading ([`ConnLimits::header_read_timeout`]), and idleness: a
//!   connection with no request in flight for [`ConnLimits::idle_timeout`] is closed
//!   (this also catches a TLS connection that sends nothing, a lone HTTP/2 preface, and
//!   HTTP/2 headers that never finish). Open requests are never timed out here.
//! - **Accept errors**: on `EMFILE`/`ENFILE` the loop backs off (doubling up to 1 s)
//!   instead of spinning.
//!
//! [`Conn`] is the admission ticket: it lives as long as the connection's socket (wrap
//! the stream in [`Tracked`]) and its drop frees the slot.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Time limits and caps of one listening port. [`Default`] gives the documented
/// defaults, with `max_connections` derived from the current open-file limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnLimits {
    /// Accept to finished TLS handshake and protocol sorting. Default 10 s.
    pub handshake_timeout: Duration,
    /// Time an HTTP/1 client has to send a request's complete headers. Default 10 s.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight this long is closed. Default 60 s.
    pub idle_timeout: Duration,
    /// HTTP/2 PING interval on served connections. Default 20 s.
    pub keepalive_interval: Duration,
    /// An unanswered PING closes the connection after this long. Default 20 s.
    pub keepalive_timeout: Duration,
    /// Most connections open at once. Default: [`default_max_connections`].
    pub max_connections: usize,
    /// Most handshakes in progress at once. Default 1024.
    pub max_handshakes: usize,
    /// Largest request header block, HTTP/1 and HTTP/2. Default 64 KiB.
    pub max_header_bytes: usize,
}

/// Default of [`ConnLimits::max_header_bytes`].
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Smallest header limit hyper's HTTP/1 read buffer accepts.
pub const MIN_HEADER_BYTES: usize = 8 * 1024;

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(20),
            max_connections: default_max_connections(),
            max_handshakes: 1024,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
        }
    }
}

/// Raises the soft open-file limit to the hard limit and returns the new soft limit.
/// Call once at start, before [`default_max_connections`].
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = get_nofile()?;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
    }
    Ok(lim.rlim_cur)
}

/// The current soft open-file limit.
pub fn nofile_limit() -> io::Result<u64> {
    Ok(get_nofile()?.rlim_cur)
}

fn get_nofile() -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim)
}

/// The connection cap for the current open-file limit (see [`max_connections_for`]).
pub fn default_max_connections() -> usize {
    max_connections_for(nofile_limit().unwrap_or(1024))
}

/// The connection cap for a soft open-file limit of `nofile`: the limit minus a
/// reserve of a quarter of it (at least 256 and at most 4096 descriptors), never below
/// 16. The reserve is for the process's own files, database, pipes of child processes
/// and outgoing connections.
pub fn max_connections_for(nofile: u64) -> usize {
    let reserve = (nofile / 4).clamp(256, 4096);
    let cap = nofile.saturating_sub(reserve).max(16);
    usize::try_from(cap).unwrap_or(usize::MAX)
}

const PHASE_HANDSHAKE: u8 = 0;
const PHASE_SERVING: u8 = 1;
/// Authenticated and long-lived by design (a revdial tunnel): never evicted.
const PHASE_PINNED: u8 = 2;

/// Shared state of one admitted connection.
#[derive(Debug)]
struct ConnState {
    id: u64,
    admitted: Instant,
    phase: AtomicU8,
    in_flight: AtomicUsize,
    /// When the last request finished (or the connection was admitted).
    idle_since: Mutex<Instant>,
    /// Woken when `in_flight` changes.
    changed: Notify,
    /// Cancelled to close the connection (evicted, or its listener stops).
    kill: CancellationToken,
}

impl ConnState {
    /// No request in flight and not pinned: may make room for a newcomer.
    fn idle(&self) -> bool {
        self.phase.load(Ordering::Acquire) != PHASE_PINNED
            && self.in_flight.load(Ordering::Acquire) == 0
    }

    /// Still in its handshake after `min_age`.
    fn stuck_in_handshake(&self, min_age: Duration) -> bool {
        self.phase.load(Ordering::Acquire) == PHASE_HANDSHAKE && self.admitted.elapsed() >= min_age
    }

    fn idle_since(&self) -> Instant {
        *self.idle_since.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Counters of an [`Acceptor`], for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AcceptStats {
    /// Connections open now.
    pub open: usize,
    /// Handshakes in progress now.
    pub handshaking: usize,
    /// Connections accepted since start.
    pub accepted_total: u64,
    /// Connections closed to make room for newer ones.
    pub evicted_total: u64,
    /// New connections closed at once because every open one was busy.
    pub refused_total: u64,
    /// Failed `accept` calls (each followed by a back-off), e.g. out of descriptors.
    pub accept_errors_total: u64,
}

#[derive(Debug, Default)]
struct Table {
    conns: Mutex<BTreeMap<u64, Arc<ConnState>>>,
    next_id: AtomicU64,
    handshaking: AtomicUsize,
    accepted: AtomicU64,
    evicted: AtomicU64,
    refused: AtomicU64,
    accept_errors: AtomicU64,
    /// Connections closed since memory was last handed back to the OS.
    closed_since_trim: AtomicUsize,
}

impl Table {
    /// Closes the oldest connection `pick` allows (ids follow admission, so the first
    /// found is the oldest); false if there is none.
    fn evict_oldest(&self, pick: impl Fn(&ConnState) -> bool) -> bool {
        let victim = {
            let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            let id = conns.values().find(|c| pick(c)).map(|c| c.id);
            // Removed now so the next eviction picks another; the slot itself is freed
            // when the connection's task drops its `Conn`.
            id.and_then(|id| conns.remove(&id))
        };
        match victim {
            Some(c) => {
                c.kill.cancel();
                self.evicted.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

/// Accepts TCP connections within [`ConnLimits`]. Cheap to clone (shared counters).
#[derive(Clone)]
pub struct Acceptor {
    limits: Arc<ConnLimits>,
    slots: Arc<Semaphore>,
    table: Arc<Table>,
    /// [`HANDSHAKE_GRACE`], but for tests that must not race a clock.
    handshake_grace: Duration,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor")
            .field("limits", &self.limits)
            .field("stats", &self.stats())
            .finish()
    }
}

/// How long a full acceptor waits for an evicted connection to free its slot before
/// closing the newcomer instead.
const EVICTION_WAIT: Duration = Duration::from_secs(1);
/// A handshake younger than this is not closed to make room for a newer one.
pub const HANDSHAKE_GRACE: Duration = Duration::from_secs(1);
/// How often a newcomer at the handshake cap looks for room.
const HANDSHAKE_ROOM_POLL: Duration = Duration::from_millis(10);
/// First and largest back-off after a failed `accept` (usually out of descriptors).
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

impl Acceptor {
    /// An acceptor with `limits`. Inside a tokio runtime it also starts a small task,
    /// ending with the acceptor, that returns freed memory to the OS after a burst of
    /// closed connections (see [`trim_after_bursts`]).
    pub fn new(limits: ConnLimits) -> Self {
        let max = limits.max_connections.max(1);
        let table = Arc::new(Table::default());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(trim_after_bursts(Arc::downgrade(&table)));
        }
        Acceptor {
            limits: Arc::new(limits),
            slots: Arc::new(Semaphore::new(max)),
            table,
            handshake_grace: HANDSHAKE_GRACE,
        }
    }

    #[cfg(test)]
    fn with_handshake_grace(mut self, grace: Duration) -> Self {
        self.handshake_grace = grace;
        self
    }

    pub fn limits(&self) -> &ConnLimits {
        &self.limits
    }

    pub fn stats(&self) -> AcceptStats {
        AcceptStats {
            open: self.limits.max_connections.max(1) - self.slots.available_permits(),
            handshaking: self.table.handshaking.load(Ordering::Relaxed),
            accepted_total: self.table.accepted.load(Ordering::Relaxed),
            evicted_total: self.table.evicted.load(Ordering::Relaxed),
            refused_total: self.table.refused.load(Ordering::Relaxed),
            accept_errors_total: self.table.accept_errors.load(Ordering::Relaxed),
        }
    }

    /// The next admitted connection, in its handshake phase; `None` once `shutdown` is
    /// cancelled (connections already admitted are not touched: their serving code
    /// watches `shutdown` itself, with a grace period). Errors of `accept` are logged
    /// and retried with back-off.
    pub async fn accept(
        &self,
        listener: &TcpListener,
        shutdown: &CancellationToken,
    ) -> Option<(TcpStream, SocketAddr, Conn)> {
        let mut backoff = ACCEPT_BACKOFF_MIN;
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => return None,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(error) => {
                        self.table.accept_errors.fetch_add(1, Ordering::Relaxed);
                        warn!(%error, ?backoff, "accept failed; backing off");
                        tokio::select! {
                            _ = shutdown.cancelled() => return None,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                        continue;
                    }
                },
            };
            backoff = ACCEPT_BACKOFF_MIN;
            let _ = tcp.set_nodelay(true);
            match self.admit().await {
                Some(conn) => return Some((tcp, peer, conn)),
                None => {
                    self.table.refused.fetch_add(1, Ordering::Relaxed);
                    debug!(%peer, "connection refused: every open connection is busy");
                }
            }
        }
    }

    /// Returns once a handshake may start: under the cap, or after closing the oldest
    /// handshake past its grace ([`HANDSHAKE_GRACE`]; waiting at most that long).
    async fn handshake_room(&self) {
        while self.table.handshaking.load(Ordering::Acquire) >= self.limits.max_handshakes {
            let grace = self.handshake_grace;
            if self.table.evict_oldest(|c| c.stuck_in_handshake(grace)) {
                return;
            }
            tokio::time::sleep(HANDSHAKE_ROOM_POLL).await;
        }
    }

    /// A slot for a new connection, evicting the oldest non-busy one when full.
    async fn admit(&self) -> Option<Conn> {
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if !self.table.evict_oldest(ConnState::idle) {
                    return None;
                }
                let wait = self.slots.clone().acquire_owned();
                match tokio::time::timeout(EVICTION_WAIT, wait).await {
                    Ok(Ok(p)) => p,
                    _ => return None,
                }
            }
        };
        self.handshake_room().await;
        let id = self.table.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState {
            id,
            admitted: Instant::now(),
            phase: AtomicU8::new(PHASE_HANDSHAKE),
            in_flight: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            changed: Notify::new(),
            kill: CancellationToken::new(),
        });
        self.table
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, state.clone());
        self.table.handshaking.fetch_add(1, Ordering::AcqRel);
        self.table.accepted.fetch_add(1, Ordering::Relaxed);
        Some(Conn {
            handle: ConnHandle {
                state,
                table: self.table.clone(),
                limits: self.limits.clone(),
            },
            _slot: permit,
        })
    }
}

/// One admitted connection's slot and state. Dropping it frees the slot: keep it as
/// long as the socket (see [`Tracked`]). Derefs to its [`ConnHandle`].
#[derive(Debug)]
pub struct Conn {
    handle: ConnHandle,
    _slot: OwnedSemaphorePermit,
}

impl std::ops::Deref for Conn {
    type Target = ConnHandle;

    fn deref(&self) -> &ConnHandle {
        &self.handle
    }
}

/// A connection's state without its slot: what the code serving it watches and marks.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct ConnHandle {
    state: Arc<ConnState>,
    table: Arc<Table>,
    limits: Arc<ConnLimits>,
}

impl Conn {
    /// A handle on this connection's state, for code that no longer holds the stream.
    pub fn handle(&self) -> ConnHandle {
        self.handle.clone()
    }
}

impl ConnHandle {
    pub fn limits(&self) -> &ConnLimits {
        &self.limits
    }

    /// Resolves when the connection must close now: it was evicted for a newer one.
    pub async fn killed(&self) {
        self.state.kill.cancelled().await
    }

    pub fn is_killed(&self) -> bool {
        self.state.kill.is_cancelled()
    }

    /// Leaves the handshake phase: the connection now counts as served (and is
    /// evictable only while no request is in flight). Starts the idle clock.
    pub fn handshake_done(&self) {
        self.leave_handshake(PHASE_SERVING);
        *self
            .state
            .idle_since
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// Marks the connection as an authenticated long-lived one (a revdial tunnel): it
    /// is never evicted and has no idle timeout here (its own keep-alive watches it).
    pub fn pin(&self) {
        self.leave_handshake(PHASE_PINNED);
    }

    fn leave_handshake(&self, to: u8) {
        let was = self.state.phase.swap(to, Ordering::AcqRel);
        if was == PHASE_HANDSHAKE {
            self.table.handshaking.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Counts a request as in flight until the returned guard is dropped.
    pub fn request(&self) -> InFlight {
        InFlight::start(self.state.clone())
    }

    /// Resolves once no request has been in flight for `idle` (checked again whenever
    /// a request starts or ends).
    pub async fn idle_for(&self, idle: Duration) {
        let s = &self.state;
        loop {
            let changed = s.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if s.in_flight.load(Ordering::Acquire) == 0 {
                let since = s.idle_since();
                tokio::select! {
                    _ = tokio::time::sleep_until(since + idle) => {
                        if s.in_flight.load(Ordering::Acquire) == 0 && s.idle_since() == since {
                            return;
                        }
                    }
                    _ = &mut changed => {}
                }
            } else {
                changed.await;
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let h = &self.handle;
        // Swapped so a handle marking the phase concurrently cannot count it twice.
        if h.state.phase.swap(PHASE_SERVING, Ordering::AcqRel) == PHASE_HANDSHAKE {
            h.table.handshaking.fetch_sub(1, Ordering::AcqRel);
        }
        h.table
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&h.state.id);
        h.table.closed_since_trim.fetch_add(1, Ordering::Relaxed);
    }
}

/// Closed connections after which freed memory is worth handing back.
const TRIM_AFTER_CLOSES: usize = 256;
/// How often the trimmer looks at the close count.
const TRIM_POLL: Duration = Duration::from_secs(2);

/// Returns freed heap memory to the OS once a burst of connection closes has settled.
///
/// Why: a flood of thousands of connections (TLS and HTTP buffers, tasks) is freed by
/// glibc into its per-thread arenas, which keep it: measured on the coordinator, 1,000
/// stalled connections of each of six kinds left RSS at 3x its start after every one
/// was closed. `malloc_trim(0)` releases the free pages of every arena. It runs when a
/// poll sees no new closes since the previous one (the burst is over), or when closes
/// keep coming at a high rate; off the async threads, as it walks the heap.
async fn trim_after_bursts(table: std::sync::Weak<Table>) {
    let mut previous = 0;
    loop {
        tokio::time::sleep(TRIM_POLL).await;
        let Some(t) = table.upgrade() else { return };
        let closed = t.closed_since_trim.load(Ordering::Relaxed);
        let settled = closed == previous;
        if closed >= TRIM_AFTER_CLOSES && (settled || closed >= 16 * TRIM_AFTER_CLOSES) {
            t.closed_since_trim.fetch_sub(closed, Ordering::Relaxed);
            previous = 0;
            drop(t);
            let _ = tokio::task::spawn_blocking(release_free_memory).await;
        } else {
            previous = closed;
        }
    }
}

/// Hands free heap pages back to the OS (glibc only; other allocators return memory
/// on their own or have no such call).
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim has no preconditions; it only releases free memory.
        let released = unsafe { libc::malloc_trim(0) };
        debug!(released = released != 0, "returned freed memory to the os");
    }
}

/// A request in flight on a connection; dropping it ends the request.
#[derive(Debug)]
pub struct InFlight {
    state: Arc<ConnState>,
}

impl InFlight {
    fn start(state: Arc<ConnState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        state.changed.notify_waiters();
        InFlight { state }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.state.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self
                .state
                .idle_since
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
        self.state.changed.notify_waiters();
    }
}

/// A stream that holds its connection's [`Conn`], so the slot is freed exactly when
/// the socket is closed, wherever the stream ends up (an HTTP connection, a tunnel).
pub struct Tracked<S> {
    io: S,
    conn: Conn,
}

impl<S> Tracked<S> {
    pub fn new(io: S, conn: Conn) -> Self {
        Tracked { io, conn }
    }

    pub fn conn(&self) -> &Conn {
        &self.conn
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Which HTTP versions [`serve_http`] speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersions {
    /// HTTP/1.1 and HTTP/2, sorted by the first bytes (pages and gRPC on one port).
    Auto,
    /// HTTP/2 only (a gRPC-only server).
    Http2Only,
}

/// Why [`serve_http`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The peer closed, or the protocol ended the connection (errors included).
    Finished,
    /// No request in flight for the idle timeout.
    Idle,
    /// Evicted for a newer connection.
    Killed,
    /// `shutdown` was cancelled; in-flight requests got a grace period.
    Shutdown,
}

/// Time a connection closed for idleness gets to say goodbye (HTTP/2 GOAWAY, or a
/// response already on its way) before it is dropped.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Time in-flight requests get after `shutdown`; long streams would hold it forever.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves HTTP on `io` with `service` within the connection's limits until the peer
/// leaves, it idles out, it is evicted, or `shutdown` (graceful, bounded).
///
/// Every request counts as in flight until its response body is finished or dropped, so
/// a long response (server-sent events, a gRPC stream) keeps the connection open however
/// long it runs.
pub async fn serve_http<I, S, B>(
    io: I,
    service: S,
    conn: &ConnHandle,
    versions: HttpVersions,
    shutdown: &CancellationToken,
) -> Result<Closed, Box<dyn std::error::Error + Send + Sync>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: tower::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limits = conn.limits().clone();
    let svc = TowerToHyperService::new(CountRequests {
        inner: service,
        state: conn.state.clone(),
        max_header_bytes: limits.max_header_bytes,
    });
    // The protocol layers decode up to twice the limit, so that a request somewhat over
    // it reaches `CountRequests` and gets an answer naming the limit; beyond that hyper
    // answers HTTP/1 with a bare 431 and h2 ends the connection (GOAWAY).
    let decode_bound = limits
        .max_header_bytes
        .saturating_mul(2)
        .max(MIN_HEADER_BYTES);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    if versions == HttpVersions::Http2Only {
        builder = builder.http2_only();
    }
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(decode_bound);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout)
        .max_frame_size(crate::h2::MAX_FRAME_SIZE)
        .max_header_list_size(u32::try_from(decode_bound).unwrap_or(u32::MAX));
    let http = builder.serve_connection(io, svc);
    tokio::pin!(http);
    tokio::select! {
        r = http.as_mut() => r.map(|()| Closed::Finished),
        _ = conn.idle_for(limits.idle_timeout) => {
            http.as_mut().graceful_shutdown();
            // A request that slipped in before the peer saw the GOAWAY is served to its
            // end; a peer that says nothing more is dropped after the grace.
            loop {
                tokio::select! {
                    _ = http.as_mut() => break,
                    _ = tokio::time::sleep(IDLE_CLOSE_GRACE) => {
                        if conn.state.in_flight.load(Ordering::Acquire) == 0 {
                            break;
                        }
                    }
                    _ = conn.killed() => return Ok(Closed::Killed),
                }
            }
            Ok(Closed::Idle)
        }
        _ = conn.killed() => Ok(Closed::Killed),
        _ = shutdown.cancelled() => {
            http.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, http.as_mut()).await;
            Ok(Closed::Shutdown)
        }
    }
}

/// Size of a request's header block as HTTP/2 counts it (RFC 9113 6.5.2: name and
/// value plus 32 per field), with the method and target added for HTTP/1.
pub fn header_block_size<B>(req: &http::Request<B>) -> usize {
    let fields: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum();
    fields + req.method().as_str().len() + req.uri().to_string().len()
}

/// The answer to a request whose headers are over the limit: a gRPC status for gRPC
/// callers (so the client shows the message), `431` with a text body otherwise.
fn too_large<RB, B>(
    req: &http::Request<RB>,
    size: usize,
    max: usize,
) -> http::Response<LimitedBody<B>> {
    let message = format!(
        "request headers are {size} bytes, over this server's limit of {max} bytes (max_header_bytes)"
    );
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let mut resp = http::Response::new(LimitedBody::Refused(None));
    if grpc {
        // A trailers-only gRPC answer: RESOURCE_EXHAUSTED (8) with the message.
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", http::HeaderValue::from_static("8"));
        if let Ok(v) = http::HeaderValue::from_str(&message) {
            h.insert("grpc-message", v);
        }
    } else {
        *resp.status_mut() = http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        *resp.body_mut() = LimitedBody::Refused(Some(Bytes::from(message + "\n")));
    }
    resp
}

/// Counts each request as in flight from its call until its response body ends, and
/// refuses requests whose headers are over the limit.
#[derive(Clone)]
struct CountRequests<S> {
    inner: S,
    state: Arc<ConnState>,
    max_header_bytes: usize,
}

impl<S, RB, B> tower::Service<http::Request<RB>> for CountRequests<S>
where
    S: tower::Service<http::Request<RB>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<LimitedBody<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<RB>) -> Self::Future {
        let size = header_block_size(&req);
        if size > self.max_header_bytes {
            debug!(
                size,
                max = self.max_header_bytes,
                "request headers over the limit"
            );
            let resp = too_large(&req, size, self.max_header_bytes);
            return Box::pin(async move { Ok(resp) });
        }
        let guard = InFlight::start(self.state.clone());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|body| LimitedBody::Counted {
                body,
                _guard: guard,
            }))
        })
    }
}

/// A response body: the service's, keeping its request counted as in flight until it
/// is dropped, or the short text of a refusal.
pub enum LimitedBody<B> {
    Counted { body: B, _guard: InFlight },
    Refused(Option<Bytes>),
}

impl<B> http_body::Body for LimitedBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        match self.get_mut() {
            LimitedBody::Counted { body, .. } => Pin::new(body).poll_frame(cx),
            LimitedBody::Refused(text) => {
                Poll::Ready(text.take().map(|t| Ok(http_body::Frame::data(t))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            LimitedBody::Counted { body, .. } => body.is_end_stream(),
            LimitedBody::Refused(text) => text.is_none(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            LimitedBody::Counted { body, .. } => body.size_hint(),
            LimitedBody::Refused(text) => {
                http_body::SizeHint::with_exact(text.as_ref().map_or(0, |t| t.len() as u64))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_keeps_a_reserve() {
        assert_eq!(max_connections_for(20_000), 20_000 - 4096);
        assert_eq!(max_connections_for(4096), 4096 - 1024);
        assert_eq!(max_connections_for(1024), 1024 - 256);
        assert_eq!(max_connections_for(100), 16);
    }

    fn limits(max_connections: usize, max_handshakes: usize) -> ConnLimits {
        ConnLimits {
            max_connections,
            max_handshakes,
            ..ConnLimits::default()
        }
    }

    async fn pair(listener: &TcpListener) -> TcpStream {
        TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect")
    }

    #[tokio::test]
    async fn full_acceptor_evicts_the_oldest_idle_connection_not_a_busy_one() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let acceptor = Acceptor::new(limits(3, 100));
        let mut clients = Vec::new();
        let mut conns = Vec::new();
        for _ in 0..3 {
            clients.push(pair(&listener).await);
            let (_, _, c) = acceptor
                .accept(&listener, &CancellationToken::new())
                .await
                .expect("admitted");
            c.handshake_done();
            conns.push(c);
        }
        // The oldest is busy, the second is idle: the second is the one to go.
        let busy = conns[0].request();
        clients.push(pair(&listener).await);
        let never = CancellationToken::new();
        let accept = acceptor.accept(&listener, &never);
        tokio::pin!(accept);
        tokio::select! {
            _ = conns[1].killed() => {}
            _ = &mut accept => panic!("admitted before a slot was freed"),
        }
        assert!(!conns[0].is_killed(), "a busy connection was evicted");
        assert!(!conns[2].is_killed(), "a newer connection was evicted");
        conns.remove(1);
        let (_, _, fourth) = accept.await.expect("admitted after the eviction");
        assert_eq!(acceptor.stats().evicted_total, 1);
        assert_eq!(acceptor.stats().open, 3);

        // All busy or pinned: the newcomer is refused and nobody is evicted.
        fourth.pin();
        let _busy2 = conns[1].request();
        clients.push(pair(&listener).await);
        let res = tokio::time::timeout(
            Duration::from_millis(500),
            acceptor.accept(&listener, &CancellationToken::new()),
        )
        .await;
        assert!(
            res.is_err(),
            "a connection was admitted with every slot busy"
        );
        assert_eq!(acceptor.stats().refused_total, 1);
        assert_eq!(acceptor.stats().evicted_total, 1);
        assert!(!conns[0].is_killed() && !conns[1].is_killed());
        drop(busy);
        assert!(!fourth.is_killed(), "a pinned connection was evicted");
    }

    #[tokio::test]
    async fn handshake_cap_evicts_the_oldest_handshake() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let acceptor = Acceptor::new(limits(100, 2));
        let mut conns = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..2 {
            clients.push(pair(&listener).await);
            conns.push(
                acceptor
                    .accept(&listener, &CancellationToken::new())
                    .await
                    .expect("admitted")
                    .2,
            );
        }
        assert_eq!(acceptor.stats().handshaking, 2);
        clients.push(pair(&listener).await);
        let (_, _, third) = acceptor
            .accept(&listener, &CancellationToken::new())
            .await
            .expect("admitted");
        assert!(conns[0].is_killed(), "the oldest handshake was not closed");
        assert!(!conns[1].is_killed() && !third.is_killed());
        assert_eq!(acceptor.stats().evicted_total, 1);
        drop(conns);
        assert_eq!(acceptor.stats().handshaking, 1);
        third.handshake_done();
        assert_eq!(acceptor.stats().handshaking, 0);
        assert_eq!(acceptor.stats().open, 1);
    }

    #[tokio::test]
    async fn at_the_handshake_cap_a_young_handshake_that_finishes_makes_room() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        // A grace no clock on a loaded machine can run past during the test.
        let acceptor = Acceptor::new(limits(100, 2)).with_handshake_grace(Duration::from_secs(600));
        let never = CancellationToken::new();
        let mut clients = Vec::new();
        let mut conns = Vec::new();
        for _ in 0..2 {
            clients.push(pair(&listener).await);
            conns.push(
                acceptor
                    .accept(&listener, &never)
                    .await
                    .expect("admitted")
                    .2,
            );
        }
        clients.push(pair(&listener).await);
        let third = acceptor.accept(&listener, &never);
        tokio::pin!(third);
        // Both handshakes are young: the newcomer waits instead of closing one.
        let early = tokio::time::timeout(Duration::from_millis(300), &mut third).await;
        assert!(early.is_err(), "admitted past the cap at once");
        conns[0].handshake_done();
        let (_, _, third) = tokio::time::timeout(Duration::from_secs(30), third)
            .await
            .expect("admitted once a handshake finished")
            .expect("admitted");
        assert!(!conns[0].is_killed() && !conns[1].is_killed());
        assert_eq!(acceptor.stats().evicted_total, 0);
        assert_eq!(acceptor.stats().handshaking, 2);
        drop(third);
    }

    #[tokio::test]
    async fn idle_clock_runs_only_without_requests() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let acceptor = Acceptor::new(limits(10, 10));
        let _client = pair(&listener).await;
        let (_, _, conn) = acceptor
            .accept(&listener, &CancellationToken::new())
            .await
            .expect("admitted");
        conn.handshake_done();
        let idle = Duration::from_millis(200);
        let req = conn.request();
        let r = tokio::time::timeout(idle * 5, conn.idle_for(idle)).await;
        assert!(r.is_err(), "idled out with a request in flight");
        drop(req);
        let start = Instant::now();
        tokio::time::timeout(Duration::from_secs(30), conn.idle_for(idle))
            .await
            .expect("idle clock never fired after the request ended");
        assert!(start.elapsed() >= idle, "{:?}", start.elapsed());
    }
}
