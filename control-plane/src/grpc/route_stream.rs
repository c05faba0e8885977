//! `Routing.Route`: choose and release multiplexed on one bidirectional
//! stream, the high-throughput form of `ChooseEndpoint` + `Release`.
//!
//! Unary calls cost one HTTP/2 stream each (headers, trailers, a task, a
//! write per answer). On a `Route` stream a sidecar sends every request
//! tagged with a `correlation_id`, and the server answers each with one
//! `RouteResponse` echoing it.
//!
//! Server side ([`RouteStream`]): the response stream *is* the request
//! stream mapped through [`route_one`], synchronously, in the task that
//! writes the responses. Invariants:
//! - every request gets exactly one answer, in request order;
//! - each message runs exactly the unary code ([`RoutingService::choose_now`],
//!   [`RoutingService::release_now`]); a failure becomes a [`v1::RouteError`]
//!   carrying the status the unary call would return (the one
//!   [`status_from_error`] mapping) and the stream stays open;
//! - batching comes for free: tonic's encoder keeps polling while answers
//!   are ready, so all requests that arrived together leave in one write;
//! - backpressure is natural: while the client does not read answers the
//!   server does not read requests (no unbounded queue in between);
//! - the stream ends when the client ends its side (OK), when the request
//!   stream fails (that status), or when the server shuts down
//!   (`UNAVAILABLE`; requests not answered by then were not processed);
//! - leases belong to the `session_id` of their choose, not to the stream:
//!   closing a stream releases nothing. A sidecar that goes away is cleaned
//!   up by its session (`CloseSession`, or expiry after its TTL).
//!
//! Client side ([`RouteClient`]): one stream shared by any number of
//! concurrent callers, with the same `Result<_, Status>` shape as the unary
//! client so callers (and `convert::choose_error_from_status`) do not change.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use futures::Stream;
use parking_lot::Mutex;
use switchyard_proto::v1::{
    self, route_request::Op, route_response::Result as Answer, routing_client::RoutingClient,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::{
    sync::{CancellationToken, WaitForCancellationFutureOwned},
    task::AbortOnDropHandle,
};
use tonic::{Code, Status, transport::Channel};

use super::{GrpcError, RoutingService, convert::ConvertError, status_from_error};

/// Message of the status a `Route` stream ends with at server shutdown.
pub const SHUTTING_DOWN: &str = "control plane shutting down";

/// Response stream type of `Route`.
pub type RouteResponseStream =
    Pin<Box<dyn Stream<Item = Result<v1::RouteResponse, Status>> + Send>>;

/// Answers one `Route` request: exactly what the unary call would do, with
/// a failure carried as a [`v1::RouteError`].
pub fn route_one(service: &RoutingService, request: v1::RouteRequest) -> v1::RouteResponse {
    let result = match request.op {
        Some(Op::Choose(m)) => service.choose_now(m).map(Answer::Choice),
        Some(Op::Release(m)) => service.release_now(m).map(Answer::Released),
        None => Err(status_from_error(GrpcError::Invalid(ConvertError::new(
            "op",
            "must be set (choose or release)",
        )))),
    };
    v1::RouteResponse {
        correlation_id: request.correlation_id,
        result: Some(
            result.unwrap_or_else(|status| Answer::Error(route_error_from_status(&status))),
        ),
    }
}

/// The status a request failed with, as sent on a `Route` stream.
pub fn route_error_from_status(status: &Status) -> v1::RouteError {
    v1::RouteError {
        code: status.code() as i32,
        message: status.message().to_owned(),
    }
}

/// A `Route` error back as the status the unary call would have returned
/// (unknown codes become `UNKNOWN`, as tonic does).
pub fn status_from_route_error(error: v1::RouteError) -> Status {
    Status::new(Code::from_i32(error.code), error.message)
}

/// Messages a busy `Route` stream answers between shutdown checks. Checking
/// takes the token's mutex, which every stream shares: once per message
/// showed up in profiles, while an idle stream checks when it waits anyway.
const SHUTDOWN_CHECK_EVERY: u32 = 256;

/// The server half of one `Route` call: the request stream mapped through
/// [`route_one`], ended by server shutdown.
pub struct RouteStream<S> {
    service: RoutingService,
    inbound: S,
    shutdown: CancellationToken,
    /// Registers this stream's waker for shutdown while it waits for input.
    shutdown_wait: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Messages answered since the last shutdown check.
    unchecked: u32,
    ended: bool,
}

impl<S> RouteStream<S> {
    /// Answers `inbound` with `service` until it ends or `shutdown` fires.
    pub fn new(service: RoutingService, inbound: S, shutdown: &CancellationToken) -> Self {
        Self {
            service,
            inbound,
            shutdown: shutdown.clone(),
            shutdown_wait: Box::pin(shutdown.clone().cancelled_owned()),
            unchecked: 0,
            ended: false,
        }
    }

    /// Ends the stream after `last`.
    fn end(
        &mut self,
        last: Option<Result<v1::RouteResponse, Status>>,
    ) -> Poll<Option<Result<v1::RouteResponse, Status>>> {
        self.ended = true;
        Poll::Ready(last)
    }
}

impl<S> Stream for RouteStream<S>
where
    S: Stream<Item = Result<v1::RouteRequest, Status>> + Unpin,
{
    type Item = Result<v1::RouteResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        // A stream that never runs dry still sees shutdown; one that waits
        // checks (and registers its waker) below.
        this.unchecked += 1;
        if this.unchecked >= SHUTDOWN_CHECK_EVERY {
            this.unchecked = 0;
            if this.shutdown.is_cancelled() {
                return this.end(Some(Err(Status::unavailable(SHUTTING_DOWN))));
            }
        }
        match Pin::new(&mut this.inbound).poll_next(cx) {
            Poll::Ready(Some(Ok(request))) => {
                Poll::Ready(Some(Ok(route_one(&this.service, request))))
            }
            Poll::Ready(Some(Err(status))) => this.end(Some(Err(status))),
            Poll::Ready(None) => this.end(None),
            Poll::Pending => {
                this.unchecked = 0;
                if this.shutdown_wait.as_mut().poll(cx).is_ready() {
                    return this.end(Some(Err(Status::unavailable(SHUTTING_DOWN))));
                }
                Poll::Pending
            }
        }
    }
}

/// Requests a [`RouteClient`] queues for sending before callers wait.
const CLIENT_QUEUE: usize = 1024;

/// A multiplexing `Route` client: any number of concurrent callers share one
/// stream; answers are matched to callers by correlation id.
///
/// Every method fails with the status the unary call would have failed with
/// (`NOT_FOUND`, `UNAVAILABLE`, `FAILED_PRECONDITION`, `INVALID_ARGUMENT`), or,
/// when the stream itself is gone, with the status it ended with (or
/// `UNAVAILABLE`) — then open a new one. A caller that gives up waiting
/// (drops the future) after its choose was sent may still get a lease: like
/// a unary call, it belongs to the session and ends with it.
#[derive(Debug)]
pub struct RouteClient {
    tx: mpsc::Sender<v1::RouteRequest>,
    shared: Arc<ClientShared>,
    _reader: AbortOnDropHandle<()>,
}

#[derive(Debug, Default)]
struct ClientShared {
    next_id: AtomicU64,
    pending: Mutex<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    waiters: HashMap<u64, oneshot::Sender<Result<Answer, Status>>>,
    /// Set once the answer stream ended; no new waiter is accepted after.
    closed: Option<Status>,
}

impl ClientShared {
    fn closed_status(&self) -> Status {
        self.pending
            .lock()
            .closed
            .clone()
            .unwrap_or_else(|| Status::unavailable("Route stream closed"))
    }
}

impl RouteClient {
    /// Opens a `Route` stream on `client`'s channel. The reader task lives as
    /// long as the returned client (and needs a Tokio runtime).
    pub async fn open(mut client: RoutingClient<Channel>) -> Result<Self, Status> {
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        let answers = client.route(ReceiverStream::new(rx)).await?.into_inner();
        let shared = Arc::new(ClientShared::default());
        let reader = tokio::spawn(read_answers(answers, shared.clone()));
        Ok(Self {
            tx,
            shared,
            _reader: AbortOnDropHandle::new(reader),
        })
    }

    /// `ChooseEndpoint` over the stream.
    pub async fn choose(&self, request: v1::ChooseRequest) -> Result<v1::ChooseResponse, Status> {
        match self.call(Op::Choose(request)).await? {
            Answer::Choice(c) => Ok(c),
            other => Err(mismatch("choose", &other)),
        }
    }

    /// `Release` over the stream.
    pub async fn release(
        &self,
        request: v1::ReleaseRequest,
    ) -> Result<v1::ReleaseResponse, Status> {
        match self.call(Op::Release(request)).await? {
            Answer::Released(r) => Ok(r),
            other => Err(mismatch("release", &other)),
        }
    }

    /// True once the stream ended: every call now fails; open a new client.
    pub fn is_closed(&self) -> bool {
        self.shared.pending.lock().closed.is_some() || self.tx.is_closed()
    }

    async fn call(&self, op: Op) -> Result<Answer, Status> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (done, answer) = oneshot::channel();
        {
            let mut pending = self.shared.pending.lock();
            if let Some(status) = &pending.closed {
                return Err(status.clone());
            }
            pending.waiters.insert(id, done);
        }
        let request = v1::RouteRequest {
            correlation_id: id,
            op: Some(op),
        };
        if self.tx.send(request).await.is_err() {
            self.shared.pending.lock().waiters.remove(&id);
            return Err(self.shared.closed_status());
        }
        match answer.await {
            Ok(Ok(Answer::Error(e))) => Err(status_from_route_error(e)),
            Ok(result) => result,
            Err(_) => Err(self.shared.closed_status()),
        }
    }
}

fn mismatch(asked: &str, got: &Answer) -> Status {
    let got = match got {
        Answer::Choice(_) => "choice",
        Answer::Released(_) => "released",
        Answer::Error(_) => "error",
    };
    Status::internal(format!("Route answered a {asked} with a `{got}` result"))
}

/// Hands each answer to its caller; when the stream ends, fails every caller
/// still waiting and refuses new ones.
async fn read_answers(mut answers: tonic::Streaming<v1::RouteResponse>, shared: Arc<ClientShared>) {
    let end = loop {
        match answers.message().await {
            Ok(Some(answer)) => {
                let waiter = shared.pending.lock().waiters.remove(&answer.correlation_id);
                match waiter {
                    Some(w) => {
                        // A caller that stopped waiting has dropped its receiver.
                        let _ = w.send(
                            answer
                                .result
                                .ok_or_else(|| Status::internal("Route answer without a result")),
                        );
                    }
                    None => tracing::warn!(
                        correlation_id = answer.correlation_id,
                        "Route answer for no pending request"
                    ),
                }
            }
            Ok(None) => break Status::unavailable("Route stream ended by the server"),
            Err(status) => break status,
        }
    };
    let waiters = {
        let mut pending = shared.pending.lock();
        pending.closed = Some(end.clone());
        std::mem::take(&mut pending.waiters)
    };
    for waiter in waiters.into_values() {
        let _ = waiter.send(Err(end.clone()));
    }
}

#[cfg(test)]
mod tests;
