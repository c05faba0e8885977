//! One single-threaded Tokio runtime per core, and an accept loop that
//! hands connections to them in turn. The control plane's gRPC server and
//! the sidecar's HTTP server both run this way.
//!
//! Why not tokio's work-stealing runtime: there, every event that makes a
//! task runnable also wakes the idle second worker to look for work it then
//! does not find, and a connection's tasks hop between threads. Measured on
//! the 2-core benchmark machine (`BENCHMARKS.md`): the control plane slept
//! 2.9 times per request that way and 1.6 times with one runtime per core;
//! the sidecar, with its default of one server runtime, spends about a fifth
//! less CPU per proxied request in remote mode and sleeps half as often.
//!
//! A connection stays on the thread it was handed to, with everything it
//! uses there: the sidecar gives each thread its own backend connection
//! pool and its own `Route` stream to the control plane
//! ([`CoreRuntimes::current`] tells code which thread it runs on).
//!
//! How many: the control plane runs one per core; the sidecar
//! `server_threads` (default 0: one per core too).
//!
//! Lifetime: the threads run until [`CoreRuntimes::stop`] or until the
//! value is dropped; then each drops its runtime, which cancels the tasks
//! still on it (closing their connections).

use std::{cell::Cell, io, num::NonZeroUsize, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    runtime::Handle,
    sync::oneshot,
};
use tokio_util::sync::CancellationToken;

thread_local! {
    /// Index of the core runtime this thread drives, if it is one.
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

struct CoreThread {
    handle: Handle,
    /// Dropped (or fired) to end the thread.
    exit: Option<oneshot::Sender<()>>,
    /// Fires once the thread dropped its runtime.
    exited: oneshot::Receiver<()>,
}

/// Single-threaded runtimes, each on a thread of its own.
pub struct CoreRuntimes {
    threads: Vec<CoreThread>,
}

impl std::fmt::Debug for CoreRuntimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreRuntimes")
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl CoreRuntimes {
    /// One runtime per CPU this process may use (its affinity mask and
    /// cgroup quota), threads named `{name}-{i}`.
    pub fn per_core(name: &str) -> io::Result<Self> {
        let count = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        Self::start(name, count)
    }

    /// `count` runtimes (at least one).
    pub fn start(name: &str, count: usize) -> io::Result<Self> {
        let mut threads = Vec::with_capacity(count.max(1));
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let (exit, exit_requested) = oneshot::channel::<()>();
            let (exited_tx, exited) = oneshot::channel();
            std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || {
                    CURRENT.with(|c| c.set(Some(index)));
                    // Drives every task spawned on the handle until told
                    // to stop (or until the owner is gone).
                    let _ = runtime.block_on(exit_requested);
                    drop(runtime);
                    let _ = exited_tx.send(());
                })?;
            threads.push(CoreThread {
                handle,
                exit: Some(exit),
                exited,
            });
        }
        Ok(Self { threads })
    }

    /// How many runtimes there are.
    pub fn len(&self) -> usize {
        self.threads.len()
    }

    /// Always false: there is at least one runtime.
    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    /// The handle of runtime `index` (wrapping around).
    pub fn handle(&self, index: usize) -> &Handle {
        &self.threads[index % self.threads.len()].handle
    }

    /// The handles, in index order.
    pub fn handles(&self) -> impl Iterator<Item = &Handle> {
        self.threads.iter().map(|t| &t.handle)
    }

    /// Index of the core runtime the calling thread drives; `None` on any
    /// other thread.
    pub fn current() -> Option<usize> {
        CURRENT.with(Cell::get)
    }

    /// Ends every thread (tasks still on them are cancelled) and waits
    /// until they have dropped their runtimes.
    pub async fn stop(mut self) {
        for thread in &mut self.threads {
            thread.exit.take();
        }
        for thread in std::mem::take(&mut self.threads) {
            let _ = thread.exited.await;
        }
    }
}

/// A socket [`accept_in_turn`] handed over, registered with the calling
/// thread's runtime, with `TCP_NODELAY` set: both servers send small,
/// latency-bound writes (answers, streamed tokens) that Nagle would hold
/// back waiting for the peer's ACK.
pub fn register(socket: std::net::TcpStream) -> io::Result<TcpStream> {
    let socket = TcpStream::from_std(socket)?;
    socket.set_nodelay(true)?;
    Ok(socket)
}

/// How many completed connections the kernel may queue for `accept`
/// (capped by `net.core.somaxconn`). tokio's `TcpListener::bind` asks for
/// 128, which a burst of new clients overflows: the rest wait for SYN
/// retransmits (1 s, then 3 s, ...).
pub const LISTEN_BACKLOG: u32 = 1024;

/// A listener on `addr` with [`LISTEN_BACKLOG`] (`SO_REUSEADDR` set, as
/// std's own `bind` does on Unix).
pub fn listen(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accepts on `listener` until `shutdown`, handing each socket (as a std
/// socket, to be [`register`]ed with the receiving runtime's reactor) to
/// `hand` with the index of the runtime whose turn it is, out of `count`.
pub async fn accept_in_turn(
    listener: TcpListener,
    count: usize,
    shutdown: &CancellationToken,
    mut hand: impl FnMut(usize, std::net::TcpStream),
) {
    let mut next = 0usize;
    // In turn, across the runtimes.
    let mut give = |socket| {
        hand(next % count.max(1), socket);
        next = next.wrapping_add(1);
    };
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => {
                // Connections whose handshake completed before the stop
                // are handed over too (closing the listener would reset
                // them): the kernel's whole backlog, read without the
                // reactor (no cached readiness, no task budget). The
                // sidecar serves them; the control plane's gRPC server,
                // already stopping, closes them.
                drain_backlog(listener, &mut give);
                return;
            }
            accepted = listener.accept() => accepted,
        };
        match accepted.and_then(|(socket, _)| socket.into_std()) {
            Ok(socket) => give(socket),
            Err(e) => {
                // Out of file descriptors, or a connection reset while
                // queued: keep accepting, without spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Accepts every connection waiting in `listener`'s backlog and gives it
/// on.
fn drain_backlog(listener: TcpListener, give: &mut impl FnMut(std::net::TcpStream)) {
    let Ok(listener) = listener.into_std() else {
        return;
    };
    // Already non-blocking (tokio's), said again so a WouldBlock ends it.
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    loop {
        match listener.accept() {
            Ok((socket, _)) => {
                // std's accept returns a blocking socket; tokio needs
                // non-blocking ones.
                if socket.set_nonblocking(true).is_ok() {
                    give(socket);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[tokio::test]
    async fn a_stop_hands_over_the_whole_backlog_as_non_blocking_sockets() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        // More than tokio's task budget (128) and its default backlog (128),
        // all waiting in the backlog.
        let clients: Vec<_> = (0..300)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let stop = CancellationToken::new();
        stop.cancel();
        let mut handed = vec![0usize; 2];
        let mut sockets = Vec::new();
        accept_in_turn(listener, 2, &stop, |i, socket| {
            handed[i] += 1;
            sockets.push(socket);
        })
        .await;
        assert_eq!(handed, [150, 150]);
        for socket in sockets {
            register(socket).expect("registered with the reactor");
        }
        drop(clients);
    }

    #[tokio::test]
    async fn tasks_run_on_the_runtime_they_were_spawned_on_and_stop_ends_them() {
        let cores = CoreRuntimes::start("test", 3).unwrap();
        assert_eq!(cores.len(), 3);
        assert_eq!(CoreRuntimes::current(), None);
        for i in 0..3 {
            let seen = cores
                .handle(i)
                .spawn(async { CoreRuntimes::current() })
                .await
                .unwrap();
            assert_eq!(seen, Some(i));
        }
        // A task still pending when the runtimes stop is dropped.
        let (tx, rx) = oneshot::channel::<()>();
        let never = cores.handle(1).spawn(async move {
            let _keep = tx;
            std::future::pending::<()>().await;
        });
        cores.stop().await;
        assert!(rx.await.is_err(), "the pending task's state was dropped");
        assert!(never.await.unwrap_err().is_cancelled());
    }

    #[tokio::test]
    async fn accept_hands_sockets_in_turn_until_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = shutdown.clone();
        let accepting = tokio::spawn(async move {
            accept_in_turn(listener, 2, &stop, |i, s| {
                let _ = tx.send((i, s));
            })
            .await;
        });
        let mut clients = Vec::new();
        let mut turns = Vec::new();
        for _ in 0..4 {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            turns.push(rx.recv().await.unwrap().0);
        }
        assert_eq!(turns, [0, 1, 0, 1]);
        shutdown.cancel();
        accepting.await.unwrap();
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "the listener closed"
        );
    }
}
