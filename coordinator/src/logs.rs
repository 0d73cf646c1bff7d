//! Live logs of running builds: every byte a build step prints is appended to the build's
//! buffer and broadcast to subscribers (the status page's live log, `gomote try`). The
//! buffer is bounded; past the bound the middle is dropped with a marker so the end of
//! a runaway log (where failures are) is kept.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::broadcast;

/// Most bytes kept of one build's log.
pub const MAX_LOG_BYTES: usize = 32 << 20;
const TRUNCATION_MARKER: &[u8] = b"\n[... log truncated by buildfarm ...]\n";

/// One running build's log.
pub struct LiveLog {
    state: Mutex<LogState>,
    tx: broadcast::Sender<Bytes>,
    /// Shards of the build's sharded test steps, for the build page (live only).
    shards: Mutex<Vec<ShardView>>,
}

/// One shard of a sharded test step as the build page shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ShardView {
    pub step: String,
    /// 1-based.
    pub shard: usize,
    /// `waiting`, `running`, `passed`, `failed` or `lost` (its buildlet died; the rest of
    /// its units are queued again).
    pub state: &'static str,
    pub units: usize,
    pub done: usize,
    pub failed: usize,
    /// The buildlet running it; empty while waiting.
    pub buildlet: String,
}

struct LogState {
    buf: Vec<u8>,
    truncated: bool,
    closed: bool,
}

impl LiveLog {
    fn new() -> Self {
        // Slow subscribers lag and are told so (RecvError::Lagged); writers never wait.
        let (tx, _) = broadcast::channel(1024);
        LiveLog {
            state: Mutex::new(LogState {
                buf: Vec::new(),
                truncated: false,
                closed: false,
            }),
            tx,
            shards: Mutex::new(Vec::new()),
        }
    }

    /// Adds or replaces (by step and shard) one shard's view.
    pub fn set_shard(&self, view: ShardView) {
        let mut shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        match shards
            .iter_mut()
            .find(|s| s.step == view.step && s.shard == view.shard)
        {
            Some(s) => *s = view,
            None => shards.push(view),
        }
    }

    /// The shards so far, in the order they were first set.
    pub fn shards(&self) -> Vec<ShardView> {
        self.shards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Appends bytes and sends them to subscribers.
    pub fn append(&self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.buf.len() + data.len() > MAX_LOG_BYTES {
            // Keep the first quarter and make room at the end.
            let keep_head = MAX_LOG_BYTES / 4;
            let overflow = st.buf.len() + data.len() + TRUNCATION_MARKER.len() - MAX_LOG_BYTES;
            let cut_end = (keep_head + overflow).min(st.buf.len());
            if !st.truncated {
                st.buf
                    .splice(keep_head..cut_end, TRUNCATION_MARKER.iter().copied());
                st.truncated = true;
            } else {
                let start = keep_head + TRUNCATION_MARKER.len();
                let end = (start + overflow).min(st.buf.len());
                st.buf.drain(start..end);
            }
        }
        st.buf.extend_from_slice(data);
        let _ = self.tx.send(Bytes::copy_from_slice(data));
    }

    /// Appends a line written by the farm itself (not by the build).
    pub fn note(&self, line: &str) {
        self.append(format!("[buildfarm] {line}\n").as_bytes());
    }

    /// The log so far and a receiver for what comes next, taken atomically so no byte
    /// is missed or repeated. `None` for the receiver when the log is closed.
    pub fn snapshot_and_subscribe(&self) -> (Vec<u8>, Option<broadcast::Receiver<Bytes>>) {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let rx = (!st.closed).then(|| self.tx.subscribe());
        (st.buf.clone(), rx)
    }

    pub fn contents(&self) -> Vec<u8> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .buf
            .clone()
    }

    fn close(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
    }
}

/// The live logs of all running builds, by build id.
#[derive(Clone, Default)]
pub struct LogHub {
    logs: Arc<Mutex<HashMap<String, Arc<LiveLog>>>>,
}

impl LogHub {
    /// Starts (or returns) the live log of a build.
    pub fn open(&self, build_id: &str) -> Arc<LiveLog> {
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        logs.entry(build_id.to_owned())
            .or_insert_with(|| Arc::new(LiveLog::new()))
            .clone()
    }

    pub fn get(&self, build_id: &str) -> Option<Arc<LiveLog>> {
        self.logs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(build_id)
            .cloned()
    }

    /// Ends a build's live log: subscribers see the end of their stream once the
    /// sender is dropped with the log. The stored log is in the store from now on.
    pub fn close(&self, build_id: &str) {
        let removed = self
            .logs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(build_id);
        if let Some(log) = removed {
            log.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn subscribers_see_the_past_then_the_future() {
        let hub = LogHub::default();
        let log = hub.open("b1");
        log.append(b"one\n");
        let (past, rx) = log.snapshot_and_subscribe();
        let mut rx = rx.expect("open log has a receiver");
        log.append(b"two\n");
        assert_eq!(past, b"one\n");
        assert_eq!(rx.recv().await.expect("recv"), Bytes::from_static(b"two\n"));
        hub.close("b1");
        drop(log);
        assert!(rx.recv().await.is_err(), "stream ends when the build ends");
        assert!(hub.get("b1").is_none());
    }

    #[test]
    fn runaway_logs_keep_head_and_tail() {
        let log = LiveLog::new();
        log.append(b"HEAD");
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..40 {
            log.append(&chunk);
        }
        log.append(b"TAIL");
        let buf = log.contents();
        assert!(buf.len() <= MAX_LOG_BYTES, "len {}", buf.len());
        assert!(buf.starts_with(b"HEAD"));
        assert!(buf.ends_with(b"TAIL"));
        let marker_count = buf
            .windows(TRUNCATION_MARKER.len())
            .filter(|w| *w == TRUNCATION_MARKER)
            .count();
        assert_eq!(marker_count, 1);
    }
}
