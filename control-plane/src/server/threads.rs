//! The gRPC server on one single-threaded runtime per core.
//!
//! Why not tokio's work-stealing runtime: there, every event that makes a
//! task runnable also wakes the idle second worker to look for work it then
//! does not find. At 500 requests/s through one sidecar the control plane
//! slept 2.9 times per request that way, and 1.65 times with one runtime
//! per core, spending ~21 instead of ~27 µs of CPU per request at
//! concurrency 10 (`BENCHMARKS.md`). A sidecar sends all its calls on one
//! HTTP/2 connection, and its `Route` stream is served by one task in
//! either design, so keeping a connection on one thread costs a sidecar no
//! parallelism; connections from different sidecars are spread over the
//! threads in turn.
//!
//! The accept loop runs on the caller's runtime and hands each accepted
//! socket to the next thread, which registers it with its own reactor.
//! Shutdown: `shutdown` fires → the accept loop stops (closing the listen
//! socket) and every thread's server drains its connections; when [`serve`]
//! returns or is dropped, whatever is still open is closed.

use std::{io, num::NonZeroUsize, time::Duration};

use futures::StreamExt;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Router;

use super::ServeError;

/// Serves `router` on `listener` with one thread per core until `shutdown`
/// fires and the connections drained (or one server failed).
pub(super) async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let threads = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    // Cancelled when this function returns or its future is dropped: the
    // threads then close what is still open and end.
    let abort = CancellationToken::new();
    let _abort_on_exit = abort.clone().drop_guard();
    let mut inboxes = Vec::with_capacity(threads);
    let mut finished = Vec::with_capacity(threads);
    for i in 0..threads {
        let (inbox, sockets) = mpsc::unbounded_channel();
        let (done, served) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ServeError::Thread)?;
        let (router, stop, abort) = (router.clone(), shutdown.clone(), abort.clone());
        std::thread::Builder::new()
            .name(format!("grpc-{i}"))
            .spawn(move || {
                let result = runtime.block_on(async move {
                    let incoming = UnboundedReceiverStream::new(sockets).map(register);
                    tokio::select! {
                        result = router.serve_with_incoming_shutdown(incoming, stop.cancelled_owned()) => {
                            result.map_err(ServeError::Grpc)
                        }
                        () = abort.cancelled() => Ok(()),
                    }
                });
                // The caller may have stopped waiting.
                let _ = done.send(result);
            })
            .map_err(ServeError::Thread)?;
        inboxes.push(inbox);
        finished.push(served);
    }
    accept(listener, &inboxes, &shutdown).await;
    // No more sockets: each thread's incoming stream ends.
    drop(inboxes);
    let mut first_error = None;
    for served in finished {
        match served.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(_) => {
                first_error.get_or_insert(ServeError::Task("a gRPC server thread panicked".into()));
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// A socket accepted on another runtime, registered with this thread's.
fn register(socket: std::net::TcpStream) -> io::Result<TcpStream> {
    let socket = TcpStream::from_std(socket)?;
    // Answers are small and latency-bound: Nagle would hold each one back
    // waiting for the client's ACK.
    socket.set_nodelay(true)?;
    Ok(socket)
}

/// Accepts until `shutdown`, handing sockets to the threads in turn.
async fn accept(
    listener: TcpListener,
    inboxes: &[mpsc::UnboundedSender<std::net::TcpStream>],
    shutdown: &CancellationToken,
) {
    let mut next = 0usize;
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted.and_then(|(socket, _)| socket.into_std()) {
            Ok(socket) => {
                // A thread that ended (it failed) drops its sockets.
                let _ = inboxes[next % inboxes.len()].send(socket);
                next = next.wrapping_add(1);
            }
            Err(e) => {
                // Out of file descriptors, or a connection reset while
                // queued: keep accepting, without spinning.
                tracing::warn!(error = %e, "gRPC accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}
