//! Data connections: a second TLS connection a dialer opens on the listener's request,
//! carrying one raw byte stream (a bulk transfer) instead of HTTP/2, so the bytes move
//! at the speed of TLS itself, with no HTTP/2 framing, flow control or hand-offs
//! between tasks. The listener asks over the tunnel (`Tunnel.OpenData` with a fresh
//! one-time token); the dialer dials back and presents a normal Hello, proof included,
//! that also carries the token; the listener lets it in only if the token is one it is
//! waiting for, from that same host, and hands the stream to whoever asked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

use crate::handshake::DATA_TOKEN_LEN;
use crate::registry::HostId;

/// A byte stream for one bulk transfer; TLS underneath.
pub type DataStream = Box<dyn DataIo>;

/// What a [`DataStream`] is: any async byte stream that can move between tasks.
pub trait DataIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> DataIo for T {}

/// The dialer's side: serves each data connection the listener asked for, once it is
/// let in (e.g. the buildlet's bulk transfers).
pub type DataHandler = Arc<dyn Fn(DataStream) -> BoxFuture<'static, ()> + Send + Sync>;

/// The listener's data connections asked for and not yet arrived, by token.
#[derive(Default)]
pub(crate) struct DataWaiters {
    waiting: Mutex<HashMap<[u8; DATA_TOKEN_LEN], Waiter>>,
}

impl std::fmt::Debug for DataWaiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataWaiters").finish_non_exhaustive()
    }
}

/// One data connection asked for: who must dial it and where it goes.
pub(crate) struct Waiter {
    pub(crate) host: HostId,
    host_type: String,
    hostname: String,
    pub(crate) tx: oneshot::Sender<DataStream>,
}

/// A data connection asked for; the token stops being accepted when this is dropped.
pub(crate) struct Expected {
    pub(crate) token: [u8; DATA_TOKEN_LEN],
    waiters: Arc<DataWaiters>,
}

impl Drop for Expected {
    fn drop(&mut self) {
        if let Ok(mut w) = self.waiters.waiting.lock() {
            w.remove(&self.token);
        }
    }
}

impl DataWaiters {
    /// Registers a fresh token for a data connection from `host_type/hostname`.
    pub(crate) fn expect(
        self: &Arc<Self>,
        host: HostId,
        host_type: &str,
        hostname: &str,
    ) -> (Expected, oneshot::Receiver<DataStream>) {
        let (tx, rx) = oneshot::channel();
        let token: [u8; DATA_TOKEN_LEN] = rand::random();
        let waiter = Waiter {
            host,
            host_type: host_type.to_owned(),
            hostname: hostname.to_owned(),
            tx,
        };
        if let Ok(mut w) = self.waiting.lock() {
            w.insert(token, waiter);
        }
        let expected = Expected {
            token,
            waiters: self.clone(),
        };
        (expected, rx)
    }

    /// The waiter of `token` if it expects this host; it is removed (a token is good
    /// for one connection).
    pub(crate) fn take(
        &self,
        token: &[u8; DATA_TOKEN_LEN],
        host_type: &str,
        hostname: &str,
    ) -> Option<Waiter> {
        let mut w = self.waiting.lock().ok()?;
        let matches = w
            .get(token)
            .is_some_and(|x| x.host_type == host_type && x.hostname == hostname);
        if matches { w.remove(token) } else { None }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.waiting.lock().map(|w| w.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_taken_once_by_its_own_host_and_dropped_with_its_request() {
        let waiters = Arc::new(DataWaiters::default());
        let (expected, _rx) = waiters.expect(HostId(7), "linux-amd64", "h1");
        let token = expected.token;
        assert!(
            waiters.take(&token, "linux-amd64", "h2").is_none(),
            "other host"
        );
        assert!(
            waiters.take(&token, "linux-arm64", "h1").is_none(),
            "other type"
        );
        assert!(
            waiters
                .take(&[0; DATA_TOKEN_LEN], "linux-amd64", "h1")
                .is_none()
        );
        let w = waiters.take(&token, "linux-amd64", "h1").expect("own host");
        assert_eq!(w.host, HostId(7));
        assert!(waiters.take(&token, "linux-amd64", "h1").is_none(), "spent");

        let (expected2, _rx2) = waiters.expect(HostId(8), "linux-amd64", "h1");
        assert_ne!(expected2.token, token, "tokens are fresh");
        assert_eq!(waiters.len(), 1);
        drop(expected2);
        drop(expected);
        assert_eq!(
            waiters.len(),
            0,
            "a request given up on leaves nothing behind"
        );
    }
}
