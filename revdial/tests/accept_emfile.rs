//! Out of file descriptors, the acceptor backs off instead of spinning on `accept`, and
//! admits the waiting connection once descriptors are free again. Its own test binary:
//! it lowers this process's open-file limit.

use std::time::Duration;

use revdial::accept::{Acceptor, ConnLimits};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

fn set_soft_nofile(soft: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain get/set of this process's limit through a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = soft;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}

/// The lowest free descriptor number: the next one the kernel would hand out.
fn lowest_free_fd() -> u64 {
    // SAFETY: dup of stdin's descriptor, closed again at once.
    unsafe {
        let fd = libc::dup(0);
        assert!(fd >= 0, "dup failed");
        libc::close(fd);
        fd as u64
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_backs_off_then_recovers() {
    let before = revdial::accept::raise_nofile_limit().expect("nofile");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    // Waiting in the backlog: accepting it needs one more descriptor.
    let _client = TcpStream::connect(addr).await.expect("connect");
    let acceptor = Acceptor::new(ConnLimits {
        max_connections: 10,
        ..ConnLimits::default()
    });
    let shutdown = CancellationToken::new();
    // No descriptor to spare: the next one would be at the limit.
    set_soft_nofile(lowest_free_fd());
    let pending = {
        let (acceptor, shutdown) = (acceptor.clone(), shutdown.clone());
        tokio::spawn(async move { acceptor.accept(&listener, &shutdown).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let errors = acceptor.stats().accept_errors_total;
    set_soft_nofile(before);
    assert!(
        errors >= 1,
        "accept never failed; the limit was not reached"
    );
    // Backing off from 10 ms doubling to 1 s makes under ten tries in 2 s; a spinning
    // loop makes thousands.
    assert!(
        errors <= 20,
        "{errors} accept failures in 2 s: not backing off"
    );
    let admitted = tokio::time::timeout(Duration::from_secs(30), pending)
        .await
        .expect("the waiting connection was admitted once descriptors were free")
        .expect("join");
    let (_tcp, _peer, _conn) = admitted.expect("admitted, not shut down");
    assert_eq!(acceptor.stats().open, 1);
}
