//! Knowing when a tunnel's connection dies. [`WatchedIo`] wraps the stream handed to
//! hyper: it fires a [`LinkSignal`] on EOF, on a read or write error and when hyper
//! drops it (keep-alive timeout, connection closed), and it fails all I/O once its
//! `kill` token is cancelled, which is how we close a connection hyper still owns.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Fired once when the connection under a tunnel is gone; keeps the first reason.
/// Also counts reads that brought data, so a watchdog can tell a silent peer.
#[derive(Clone, Debug, Default)]
pub(crate) struct LinkSignal {
    token: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
    reads: Arc<AtomicU64>,
}

impl LinkSignal {
    pub(crate) fn new() -> Self {
        LinkSignal::default()
    }

    pub(crate) fn fire(&self, reason: impl FnOnce() -> String) {
        if self.token.is_cancelled() {
            return;
        }
        if let Ok(mut r) = self.reason.lock()
            && r.is_none()
        {
            *r = Some(reason());
        }
        self.token.cancel();
    }

    pub(crate) async fn fired(&self) {
        self.token.cancelled().await
    }

    /// Reads that returned data so far.
    pub(crate) fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    pub(crate) fn reason(&self) -> String {
        self.reason
            .lock()
            .ok()
            .and_then(|r| r.clone())
            .unwrap_or_else(|| "connection closed".to_owned())
    }
}

/// A stream that reports its own death and can be killed from outside.
pub(crate) struct WatchedIo<T> {
    inner: T,
    signal: LinkSignal,
    kill_token: CancellationToken,
    kill: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl<T> WatchedIo<T> {
    pub(crate) fn new(inner: T, signal: LinkSignal, kill: CancellationToken) -> Self {
        WatchedIo {
            inner,
            signal,
            kill: Box::pin(kill.clone().cancelled_owned()),
            kill_token: kill,
        }
    }

    fn killed_error(&self) -> io::Error {
        self.signal.fire(|| "tunnel closed locally".to_owned());
        io::Error::new(io::ErrorKind::ConnectionAborted, "tunnel closed locally")
    }
}

impl<T> Drop for WatchedIo<T> {
    fn drop(&mut self) {
        self.signal.fire(|| {
            "connection closed by the http/2 layer (keep-alive timeout, protocol error or shutdown)"
                .to_owned()
        });
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WatchedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // hyper always has a read pending, so polling the kill future here is enough
        // to wake the connection when the tunnel is closed from outside.
        if self.kill.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(self.killed_error()));
        }
        let before = buf.filled().len();
        let had_room = buf.remaining() > 0;
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if had_room && buf.filled().len() == before {
                    this.signal.fire(|| "peer closed the connection".to_owned());
                } else if buf.filled().len() > before {
                    this.signal.reads.fetch_add(1, Ordering::Relaxed);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                this.signal.fire(|| format!("read error: {e}"));
                Poll::Ready(Err(e))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WatchedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.kill_token.is_cancelled() {
            return Poll::Ready(Err(self.killed_error()));
        }
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        if let Poll::Ready(Err(e)) = &r {
            this.signal.fire(|| format!("write error: {e}"));
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        if let Poll::Ready(Err(e)) = &r {
            this.signal.fire(|| format!("write error: {e}"));
        }
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        if r.is_ready() {
            this.signal.fire(|| "connection shut down".to_owned());
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.kill_token.is_cancelled() {
            return Poll::Ready(Err(self.killed_error()));
        }
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Err(e)) = &r {
            this.signal.fire(|| format!("write error: {e}"));
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Lets the dialer serve a client-side TLS stream with tonic's server.
impl<T> tonic::transport::server::Connected for WatchedIo<T> {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn eof_fires_the_signal() {
        let (a, mut b) = tokio::io::duplex(64);
        let signal = LinkSignal::new();
        let mut w = WatchedIo::new(a, signal.clone(), CancellationToken::new());
        b.write_all(b"hi").await.unwrap();
        let mut buf = [0; 2];
        w.read_exact(&mut buf).await.unwrap();
        assert!(!signal.token.is_cancelled(), "data is not death");
        assert!(signal.reads() >= 1, "a read with data is counted");
        drop(b);
        assert_eq!(w.read(&mut buf).await.unwrap(), 0);
        assert!(signal.token.is_cancelled());
        assert_eq!(signal.reason(), "peer closed the connection");
    }

    #[tokio::test]
    async fn kill_fails_a_pending_read_and_drop_fires() {
        let (a, _b) = tokio::io::duplex(64);
        let signal = LinkSignal::new();
        let kill = CancellationToken::new();
        let mut w = WatchedIo::new(a, signal.clone(), kill.clone());
        let reader = async {
            let mut buf = [0; 1];
            w.read(&mut buf).await
        };
        let (r, ()) = tokio::join!(reader, async { kill.cancel() });
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
        assert_eq!(signal.reason(), "tunnel closed locally");
        assert!(w.write_all(b"x").await.is_err());

        let signal2 = LinkSignal::new();
        let (c, _d) = tokio::io::duplex(64);
        drop(WatchedIo::new(c, signal2.clone(), CancellationToken::new()));
        assert!(
            signal2.reason().contains("http/2 layer"),
            "{}",
            signal2.reason()
        );
    }
}
