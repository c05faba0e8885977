//! One server thread's client connections: each socket the accept loop
//! hands the thread is served by hyper (HTTP/1.1 with keep-alive, or HTTP/2
//! when the client opens with its preface) on a task of the thread's own
//! runtime, answering with [`routes::Entry`].
//!
//! - A connection that sends no byte within `client_header_timeout`, or
//!   no complete request head within that time of starting one, is closed;
//!   so is a kept-alive connection idle that long after an answer. A
//!   client that opens connections and sends nothing, or a head byte by
//!   byte, cannot hold sockets forever (hyper applies no such limit unless
//!   given a timer, and none before the first byte).
//! - On `stop`, the thread takes no more sockets and every connection is
//!   asked to shut down gracefully: an idle one closes, one with a request
//!   in flight closes after answering it (HTTP/2: `GOAWAY`, open streams
//!   finish). [`serve`] returns once all of them have closed; the caller
//!   bounds that wait with the shutdown grace.

use std::{convert::Infallible, io, time::Duration};

use axum::{body::Body, response::Response};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio_util::sync::CancellationToken;

use super::Inbox;
use crate::routes;

/// Serves the sockets arriving in `inbox` until `stop`, then waits for the
/// open connections to finish (see the module docs).
pub(super) async fn serve(
    mut inbox: Inbox,
    entry: routes::Entry,
    client_header_timeout: Duration,
    stop: CancellationToken,
) -> io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(client_header_timeout);
    let graceful = GracefulShutdown::new();
    let service = HyperEntry(entry);
    loop {
        let io = tokio::select! {
            (io, _peer) = inbox.accept() => io,
            () = stop.cancelled() => break,
        };
        let (watcher, builder, service, stop) = (
            graceful.watcher(),
            builder.clone(),
            service.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            // hyper's header timer starts with the first bytes: wait for
            // them here, bounded.
            tokio::select! {
                first = tokio::time::timeout(client_header_timeout, io.readable()) => {
                    if !matches!(first, Ok(Ok(()))) {
                        tracing::debug!("client connection sent nothing in time; closing it");
                        return;
                    }
                }
                () = stop.cancelled() => return,
            }
            let connection = builder.serve_connection(TokioIo::new(io), service);
            if let Err(e) = watcher.watch(connection).await {
                // Clients resetting, timing out or speaking garbage: theirs
                // to see, not an operator's.
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        });
    }
    drop(inbox);
    graceful.shutdown().await;
    Ok(())
}

/// [`routes::Entry`] as a hyper service.
#[derive(Clone)]
struct HyperEntry(routes::Entry);

impl hyper::service::Service<hyper::Request<Incoming>> for HyperEntry {
    type Response = Response;
    type Error = Infallible;
    type Future = <routes::Entry as tower_service::Service<axum::extract::Request>>::Future;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        self.0.respond(req.map(Body::new))
    }
}
