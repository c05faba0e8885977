//! The gRPC server on one single-threaded runtime per core
//! ([`crate::cores`]).
//!
//! A sidecar sends all its calls on its HTTP/2 connections, and each of its
//! `Route` streams is served by one task in either design, so keeping a
//! connection on one thread costs a sidecar no parallelism; connections are
//! spread over the threads in turn.
//!
//! The accept loop runs on the caller's runtime and hands each accepted
//! socket to the next thread, which registers it with its own reactor.
//! Shutdown: `shutdown` fires → the accept loop stops (closing the listen
//! socket) and every thread's server drains its connections; when [`serve`]
//! returns or is dropped, whatever is still open is closed (the runtimes
//! stop).

use futures::StreamExt;
use tokio::{net::TcpListener, sync::mpsc};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Router;

use super::ServeError;
use crate::cores::{self, CoreRuntimes};

/// Serves `router` on `listener` with one thread per core until `shutdown`
/// fires and the connections drained (or one server failed).
pub(super) async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    // Dropped when this function returns or its future is dropped: the
    // threads then close what is still open and end.
    let cores = CoreRuntimes::per_core("grpc").map_err(ServeError::Thread)?;
    let mut inboxes = Vec::with_capacity(cores.len());
    let mut servers = Vec::with_capacity(cores.len());
    for runtime in cores.handles() {
        let (inbox, sockets) = mpsc::unbounded_channel();
        let incoming = UnboundedReceiverStream::new(sockets).map(cores::register);
        let (router, stop) = (router.clone(), shutdown.clone());
        servers.push(runtime.spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
        }));
        inboxes.push(inbox);
    }
    cores::accept_in_turn(listener, inboxes.len(), &shutdown, |i, socket| {
        // A thread whose server ended (it failed) drops its sockets.
        let _ = inboxes[i].send(socket);
    })
    .await;
    // No more sockets: each thread's incoming stream ends.
    drop(inboxes);
    let mut first_error = None;
    for server in servers {
        let error = match server.await {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => ServeError::Grpc(e),
            Err(e) => ServeError::Task(format!("a gRPC server thread failed: {e}")),
        };
        first_error.get_or_insert(error);
    }
    cores.stop().await;
    first_error.map_or(Ok(()), Err)
}
