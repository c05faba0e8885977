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
//! - On `stop`, every connection is asked to shut down gracefully: an idle
//!   one closes, one with a request in flight closes after answering it
//!   (HTTP/2: `GOAWAY`, open streams finish). Connections a client opened
//!   before the stop are not dropped unanswered: the sockets the accept
//!   loop took (its backlog included, see `cores::accept_in_turn`) are
//!   still served, and one that has not sent its request yet gets
//!   [`LAST_CALL`] to send it; each of those answers one request and
//!   closes (`connection: close`). [`serve`] returns once all of them have
//!   closed; the caller bounds that wait with the shutdown grace.

use std::{convert::Infallible, io, sync::Arc, time::Duration};

use axum::{body::Body, response::Response};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{
        conn::auto,
        graceful::{GracefulShutdown, Watcher},
    },
};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::Inbox;
use crate::routes;

/// How long a connection opened before the stop, that has not sent its
/// request yet, may still send it (a client sends right after connecting).
const LAST_CALL: Duration = Duration::from_millis(500);

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
    // For connections that start after the stop. HTTP/1: one request,
    // then closed. HTTP/2 (no version sniffing, which a graceful shutdown
    // would cancel): watched, so it gets its GOAWAY and answers the
    // streams already sent.
    let mut last_call = builder.clone().http1_only();
    last_call.http1().keep_alive(false);
    let last_call_h2 = builder.clone().http2_only();
    // Shared by every connection of this thread (one `Arc` clone each).
    let kit = Arc::new(Kit {
        builder,
        last_call,
        last_call_h2,
        service: HyperEntry(entry),
        client_header_timeout,
        stop: stop.clone(),
    });
    let graceful = GracefulShutdown::new();
    let spawn = |io: TcpStream| {
        let connection = Connection {
            watcher: graceful.watcher(),
            kit: kit.clone(),
        };
        tokio::spawn(connection.serve(io));
    };
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            (io, _peer) = inbox.accept() => spawn(io),
        }
    }
    // Sockets accepted before the stop and still on their way here.
    while let Some((io, _peer)) = inbox.remaining().await {
        spawn(io);
    }
    drop(inbox);
    graceful.shutdown().await;
    Ok(())
}

/// What serving a thread's connections needs.
struct Kit {
    builder: auto::Builder<TokioExecutor>,
    /// For connections whose first bytes come after the stop.
    last_call: auto::Builder<TokioExecutor>,
    last_call_h2: auto::Builder<TokioExecutor>,
    service: HyperEntry,
    client_header_timeout: Duration,
    stop: CancellationToken,
}

/// One client connection.
struct Connection {
    /// Held until the connection ends: [`serve`] waits for every one.
    watcher: Watcher,
    kit: Arc<Kit>,
}

impl Connection {
    async fn serve(self, io: TcpStream) {
        let Self { watcher, kit } = self;
        let service = kit.service.clone();
        // hyper's header timer starts with the first bytes: wait for them
        // here, bounded.
        if !first_bytes(&io, kit.client_header_timeout, &kit.stop).await {
            tracing::debug!("client connection sent nothing in time; closing it");
            return;
        }
        let served = if kit.stop.is_cancelled() {
            if opens_http2(&io).await {
                let connection = kit.last_call_h2.serve_connection(TokioIo::new(io), service);
                watcher.watch(connection).await
            } else {
                // Its request arrived as the server stops: answered, not
                // dropped (a graceful shutdown before hyper has read
                // anything would close it unanswered). The watcher, held
                // meanwhile, keeps [`serve`] waiting for it.
                let _waited_for = watcher;
                kit.last_call
                    .serve_connection(TokioIo::new(io), service)
                    .await
            }
        } else {
            let connection = kit.builder.serve_connection(TokioIo::new(io), service);
            watcher.watch(connection).await
        };
        if let Err(e) = served {
            // Clients resetting, timing out or speaking garbage: theirs to
            // see, not an operator's.
            tracing::debug!(error = %e, "client connection ended with an error");
        }
    }
}

/// Whether the bytes a client sent first start the HTTP/2 preface
/// (`PRI * HTTP/2.0`); HTTP/1 methods never start with `PRI `.
async fn opens_http2(io: &TcpStream) -> bool {
    let mut head = [0u8; 4];
    matches!(io.peek(&mut head).await, Ok(4) if &head == b"PRI ")
}

/// Whether the client sent something within `limit`; once `stop` fires,
/// within [`LAST_CALL`] at most.
async fn first_bytes(io: &TcpStream, limit: Duration, stop: &CancellationToken) -> bool {
    let within = |limit| async move {
        matches!(tokio::time::timeout(limit, io.readable()).await, Ok(Ok(())))
    };
    tokio::select! {
        biased;
        sent = within(limit) => sent,
        () = stop.cancelled() => within(limit.min(LAST_CALL)).await,
    }
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
