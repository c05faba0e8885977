//! The fake's accept loop and connections.
//!
//! A custom loop (rather than `axum::serve`) so the fake can kill one
//! connection from inside a handler (failure injection) and every connection
//! at once (shutdown). Each connection gets a [`ConnCtx`] in its requests'
//! extensions; [`ConnCtx::abort`] sets `SO_LINGER` 0 on the socket and drops
//! the connection, which the client sees as a reset.
//!
//! Every task is owned by a `TaskTracker` and stopped by one
//! `CancellationToken`; dropping a connection future drops the in-flight
//! handlers and bodies, which is how the request guards see the end.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::FakeError;

/// Handle to one connection, given to handlers through request extensions.
#[derive(Clone, Debug)]
pub(super) struct ConnCtx {
    kill: Arc<KillSwitch>,
}

#[derive(Debug, Default)]
struct KillSwitch {
    token: CancellationToken,
    reset: AtomicBool,
}

impl ConnCtx {
    /// Reset the connection now and never return: the caller's future is
    /// dropped with the connection.
    pub(super) async fn abort(&self) -> std::convert::Infallible {
        self.kill.reset.store(true, Ordering::SeqCst);
        self.kill.token.cancel();
        std::future::pending().await
    }

    /// Like [`ConnCtx::abort`], after giving hyper time to flush what the
    /// body already produced to the socket (so the client really receives
    /// the first chunks before the reset).
    pub(super) async fn abort_after_flush(&self) -> std::convert::Infallible {
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.abort().await
    }
}

/// A TCP stream that, when dropped after [`ConnCtx::abort`], closes with a
/// reset instead of a FIN.
struct KillableIo {
    inner: TcpStream,
    kill: Arc<KillSwitch>,
}

impl Drop for KillableIo {
    fn drop(&mut self) {
        if self.kill.reset.load(Ordering::SeqCst) {
            // Best effort: if the option cannot be set the close is a FIN,
            // which the client also sees as an early EOF.
            let _ = self.inner.set_zero_linger();
        }
    }
}

impl AsyncRead for KillableIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Bind a listening socket with `SO_REUSEADDR`, so a restart can take the
/// same port while old connections sit in TIME_WAIT.
pub(super) fn bind(addr: SocketAddr) -> Result<TcpListener, FakeError> {
    let err = |source| FakeError::Bind { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(1024).map_err(err)
}

/// A running accept loop and its connections.
pub(super) struct Running {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Running {
    /// Stop accepting and drop every connection, without waiting.
    pub(super) fn cancel(&self) {
        self.token.cancel();
        self.tracker.close();
    }

    /// Stop, then wait until every task has ended.
    pub(super) async fn stop(self) {
        self.cancel();
        self.tracker.wait().await;
    }
}

/// Start serving `router` on `listener`.
pub(super) fn spawn(listener: TcpListener, router: Router) -> Running {
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(accept_loop(
        listener,
        router,
        token.clone(),
        tracker.clone(),
    ));
    Running { token, tracker }
}

async fn accept_loop(
    listener: TcpListener,
    router: Router,
    token: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            () = token.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _peer)) => {
                tracker.spawn(serve_connection(stream, router.clone(), token.clone()));
            }
            Err(_) => {
                // Out of file descriptors or a connection aborted during the
                // handshake: wait a little rather than spin.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

async fn serve_connection(stream: TcpStream, router: Router, token: CancellationToken) {
    // Small stream chunks must leave at once.
    let _ = stream.set_nodelay(true);
    let kill = Arc::new(KillSwitch::default());
    let io = TokioIo::new(KillableIo {
        inner: stream,
        kill: kill.clone(),
    });
    let tower = TowerToHyperService::new(router);
    let ctx = ConnCtx { kill: kill.clone() };
    let service = service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ctx.clone());
        hyper::service::Service::call(&tower, req)
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(io, service);
    tokio::select! {
        _ = conn => {}
        () = kill.token.cancelled() => {}
        () = token.cancelled() => {}
    }
}
