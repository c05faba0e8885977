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
//! - every request gets exactly one answer, in request order, except a
//!   choose held while every endpoint is full (`saturated_hold`): it waits
//!   for a slot in a task of its own and is answered when it has one (or
//!   the hold ends), the requests after it meanwhile answered as they come
//!   (the releases that free slots among them); the client matches answers
//!   by correlation id;
//! - each message runs exactly the unary code ([`RoutingService::choose_step`],
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
//!
//! Coalesced releases have two ways to hear how they ended, with the same
//! outcomes: [`RouteClient::queue_release`] returns a future, and
//! [`RouteClient::queue_release_to`] (the hot path of a sidecar, called
//! synchronously where a lease ends) reports to a [`ReleaseListener`] —
//! no future, no task wake-up and no allocation per release. Either way
//! every queued release is settled exactly once: acknowledged, or failed
//! when its message's answer says so, when the stream ends, or when the
//! client is dropped first. [`RouteClient::start_choose`] likewise hands
//! out a plain (`Unpin`, unboxed) future for the answer of a choose.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
};

use futures::Stream;
use parking_lot::Mutex;
use switchyard_proto::v1::{
    self, route_request::Op, route_response::Result as Answer, routing_client::RoutingClient,
};
use tokio::sync::{
    mpsc::{self, error::TrySendError},
    oneshot,
};
use tokio_util::{
    sync::{CancellationToken, WaitForCancellationFutureOwned},
    task::AbortOnDropHandle,
};
use tonic::{Code, Status, transport::Channel};

use super::{
    ChooseStep, GrpcError, HeldChoose, RoutingService,
    convert::{ConvertError, release_outcome_from_proto},
    status_from_error,
};
use crate::outcome::Outcome;

/// Message of the status a `Route` stream ends with at server shutdown.
pub const SHUTTING_DOWN: &str = "control plane shutting down";

/// Response stream type of `Route`.
pub type RouteResponseStream =
    Pin<Box<dyn Stream<Item = Result<v1::RouteResponse, Status>> + Send>>;

/// Answers one `Route` request: exactly what the unary call would do, with
/// a failure carried as a [`v1::RouteError`].
pub fn route_one(service: &RoutingService, request: v1::RouteRequest) -> Routed {
    // Coalesced releases first: a choose in the same message sees the slots
    // they free.
    let carried = request.releases.len();
    let mut applied: u32 = 0;
    for release in request.releases {
        match service.release_now(release) {
            Ok(_) => applied += 1,
            Err(status) => tracing::warn!(
                code = ?status.code(),
                message = status.message(),
                "malformed coalesced release skipped"
            ),
        }
    }
    let result = match request.op {
        Some(Op::Choose(m)) => match service.choose_step(m) {
            Ok(ChooseStep::Answered(answer)) => Some(Ok(Answer::Choice(answer))),
            Ok(ChooseStep::Held(held)) => {
                return Routed::Held {
                    correlation_id: request.correlation_id,
                    releases_applied: applied,
                    held,
                };
            }
            Err(status) => Some(Err(status)),
        },
        Some(Op::Release(m)) => Some(service.release_now(m).map(Answer::Released)),
        None if carried > 0 => None,
        None => Some(Err(status_from_error(GrpcError::Invalid(
            ConvertError::new("op", "must be set (choose or release)"),
        )))),
    };
    Routed::Answer(v1::RouteResponse {
        correlation_id: request.correlation_id,
        result: result
            .map(|r| r.unwrap_or_else(|status| Answer::Error(route_error_from_status(&status)))),
        releases_applied: applied,
    })
}

/// What [`route_one`] did with a request.
#[derive(Debug)]
pub enum Routed {
    /// Its answer.
    Answer(v1::RouteResponse),
    /// A choose held while every endpoint is full (its carried releases
    /// are applied): answered once a slot frees or the hold ends.
    Held {
        /// The request's correlation id.
        correlation_id: u64,
        /// Carried releases applied.
        releases_applied: u32,
        /// The choose.
        held: HeldChoose,
    },
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
    /// The answers of held chooses, from the tasks that wait for a slot.
    held_tx: mpsc::UnboundedSender<v1::RouteResponse>,
    held_rx: mpsc::UnboundedReceiver<v1::RouteResponse>,
    /// Held chooses not answered yet.
    held: usize,
    /// The client ended its side; held chooses may still be answered.
    inbound_done: bool,
    ended: bool,
}

impl<S> RouteStream<S> {
    /// Answers `inbound` with `service` until it ends or `shutdown` fires.
    pub fn new(service: RoutingService, inbound: S, shutdown: &CancellationToken) -> Self {
        let (held_tx, held_rx) = mpsc::unbounded_channel();
        Self {
            service,
            inbound,
            shutdown: shutdown.clone(),
            shutdown_wait: Box::pin(shutdown.clone().cancelled_owned()),
            unchecked: 0,
            held_tx,
            held_rx,
            held: 0,
            inbound_done: false,
            ended: false,
        }
    }

    /// Waits for a slot for `held` in a task of its own, so the stream
    /// goes on answering (releases among them) meanwhile; its answer comes
    /// back through `held_rx`. A lease granted after the stream is gone is
    /// released at once.
    fn hold(&mut self, correlation_id: u64, releases_applied: u32, held: HeldChoose) {
        let service = self.service.clone();
        let answers = self.held_tx.clone();
        self.held += 1;
        tokio::spawn(async move {
            let result = service.choose_after_hold(held).await;
            let lease = result.as_ref().map_or(0, |c| c.lease_id);
            let answer = v1::RouteResponse {
                correlation_id,
                result: Some(result.map_or_else(
                    |status| Answer::Error(route_error_from_status(&status)),
                    Answer::Choice,
                )),
                releases_applied,
            };
            if answers.send(answer).is_err() {
                service.release_unused(lease);
            }
        });
    }

    /// A held choose's answer when one is ready (registering the waker
    /// otherwise).
    fn poll_held(&mut self, cx: &mut Context<'_>) -> Option<v1::RouteResponse> {
        if self.held == 0 {
            return None;
        }
        match self.held_rx.poll_recv(cx) {
            Poll::Ready(Some(answer)) => {
                self.held -= 1;
                Some(answer)
            }
            Poll::Ready(None) | Poll::Pending => None,
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
        if let Some(answer) = this.poll_held(cx) {
            return Poll::Ready(Some(Ok(answer)));
        }
        while !this.inbound_done {
            match Pin::new(&mut this.inbound).poll_next(cx) {
                Poll::Ready(Some(Ok(request))) => match route_one(&this.service, request) {
                    Routed::Answer(answer) => return Poll::Ready(Some(Ok(answer))),
                    Routed::Held {
                        correlation_id,
                        releases_applied,
                        held,
                    } => this.hold(correlation_id, releases_applied, held),
                },
                Poll::Ready(Some(Err(status))) => return this.end(Some(Err(status))),
                Poll::Ready(None) => this.inbound_done = true,
                Poll::Pending => break,
            }
        }
        // Nothing to read now (or ever): held answers, then the end.
        if let Some(answer) = this.poll_held(cx) {
            return Poll::Ready(Some(Ok(answer)));
        }
        if this.inbound_done && this.held == 0 {
            return this.end(None);
        }
        this.unchecked = 0;
        if this.shutdown_wait.as_mut().poll(cx).is_ready() {
            return this.end(Some(Err(Status::unavailable(SHUTTING_DOWN))));
        }
        Poll::Pending
    }
}

impl<S> Drop for RouteStream<S> {
    /// Held chooses answered after the stream ended (shutdown, a broken
    /// request stream) were never delivered: their leases go back now,
    /// and those still waiting release theirs when they find the channel
    /// closed.
    fn drop(&mut self) {
        self.held_rx.close();
        while let Ok(answer) = self.held_rx.try_recv() {
            if let Some(Answer::Choice(choice)) = answer.result {
                self.service.release_unused(choice.lease_id);
            }
        }
    }
}

/// Requests a [`RouteClient`] queues for sending before callers wait.
const CLIENT_QUEUE: usize = 1024;

/// How long a coalesced release waits for a request to ride on before it
/// goes out alone (see [`RouteClient::queue_release`]); tokio timers tick
/// in milliseconds, so the actual wait is up to 1 ms more.
///
/// Long enough that from ~200 requests/s on a sidecar's releases ride on its
/// next choose: at 500 requests/s this halves the control plane's wake-ups
/// per request (4.5 → 2.9 context switches) and cuts the sidecar's by a
/// fifth, against 1 ms. Short against what it delays: a finished request
/// stays counted in flight a few milliseconds longer, where inference
/// requests last hundreds of milliseconds or more and `WatchUsage`
/// publishes every 20 ms. Releases that make the control plane avoid an
/// endpoint ([`Outcome::excludes_endpoint`]: a backend failure, a missing
/// model), and those queued as urgent (a lease that held its endpoint's
/// last slot, [`crate::decision::Choice::at_limit`], which another choice
/// may be waiting for) do not wait at all (see
/// [`RouteClient::queue_release`]).
pub const DEFAULT_RELEASE_LINGER: std::time::Duration = std::time::Duration::from_millis(5);

/// Hears how the coalesced releases queued with
/// [`RouteClient::queue_release_to`] ended.
pub trait ReleaseListener: Send + Sync {
    /// `release`, queued with `tag`, was applied (`Ok`, whether or not the
    /// lease was still held: releases are idempotent) or failed with one of
    /// the statuses [`RouteClient::queue_release`] fails with. Called
    /// exactly once per queued release, from the client's reader task (or
    /// where the client is dropped), never under a lock of the client: it
    /// may queue the release again, here or elsewhere, but must not block.
    fn settled(&self, release: v1::ReleaseRequest, tag: u64, result: Result<(), &Status>);
}

/// Why [`RouteClient::queue_release_to`] did not queue a release. Nothing
/// was written and the listener will not hear of it: send it another way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotQueued {
    /// The stream ended: open a new client.
    #[error("the Route stream is closed")]
    Closed,
    /// The server does not apply coalesced releases: use
    /// [`RouteClient::release`].
    #[error("the control plane does not apply coalesced releases")]
    NotCoalescing,
}

/// A multiplexing `Route` client: any number of concurrent callers share one
/// stream; answers are matched to callers by correlation id.
///
/// Every method fails with the status the unary call would have failed with
/// (`NOT_FOUND`, `UNAVAILABLE`, `FAILED_PRECONDITION`, `INVALID_ARGUMENT`), or,
/// when the stream itself is gone, with the status it ended with (or
/// `UNAVAILABLE`) — then open a new one. A caller that gives up waiting
/// (drops the future) after its choose was sent may still get a lease: like
/// a unary call, it belongs to the session and ends with it.
///
/// Releases can be *coalesced* ([`RouteClient::queue_release`],
/// [`RouteClient::queue_release_to`]): they ride in the `releases` field of
/// the next request written (a choose, usually, under load: one message and
/// one answer instead of two each), or go out alone after the linger. Each
/// is acknowledged by the answer of the message that carried it, so a
/// release is never lost silently: it is either acknowledged or failed
/// (stream gone, client dropped, or a server too old to apply coalesced
/// releases, which also turns coalescing off on this client).
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
    /// Cleared when the server showed it ignores coalesced releases.
    no_coalescing: AtomicBool,
}

/// Who hears how one coalesced release ended.
enum ReleaseDone {
    /// A [`RouteClient::queue_release`] future.
    Future(oneshot::Sender<Result<(), Status>>),
    /// A [`RouteClient::queue_release_to`] listener.
    Listener(Notice),
}

impl ReleaseDone {
    fn settle(self, result: Result<(), &Status>) {
        match self {
            // A caller that stopped waiting has dropped its receiver.
            Self::Future(done) => {
                let _ = done.send(result.map_err(Status::clone));
            }
            Self::Listener(notice) => notice.settle(result),
        }
    }
}

impl std::fmt::Debug for ReleaseDone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Future(_) => f.write_str("Future"),
            Self::Listener(n) => f
                .debug_struct("Listener")
                .field("release", &n.release)
                .field("tag", &n.tag)
                .finish(),
        }
    }
}

/// A listener's report still owed. Dropped unsettled (with the client
/// state, by a path that forgot it), it reports `UNAVAILABLE`: the
/// listener hears of every release exactly once, whatever happens.
struct Notice {
    /// `Some` until reported; taking it makes the report exactly-once.
    listener: Option<Arc<dyn ReleaseListener>>,
    release: v1::ReleaseRequest,
    tag: u64,
}

impl Notice {
    fn settle(mut self, result: Result<(), &Status>) {
        if let Some(listener) = self.listener.take() {
            listener.settled(self.release, self.tag, result);
        }
    }
}

impl Drop for Notice {
    fn drop(&mut self) {
        if let Some(listener) = self.listener.take() {
            let gone = Status::unavailable("Route client gone before the release was acknowledged");
            listener.settled(self.release, self.tag, Err(&gone));
        }
    }
}

/// The answer a caller of `choose` / `release` waits for.
type AnswerRx = oneshot::Receiver<Result<Answer, Status>>;

/// Who waits for the answer to one sent request.
#[derive(Debug, Default)]
struct Waiter {
    /// The caller of `choose` / `release`; `None` for a releases-only
    /// request.
    answer: Option<oneshot::Sender<Result<Answer, Status>>>,
    /// The coalesced releases the request carried.
    releases: Vec<ReleaseDone>,
}

#[derive(Debug, Default)]
struct Pending {
    waiters: HashMap<u64, Waiter>,
    /// Set once the answer stream ended; no new waiter is accepted after.
    closed: Option<Status>,
    /// Coalesced releases not written yet.
    queued: Vec<(v1::ReleaseRequest, ReleaseDone)>,
    /// The writer's waker while it waits, idle or lingering.
    writer: Option<Waker>,
    /// The writer is parked with nothing queued and no traffic: the first
    /// release wakes it (later ones wait for its linger).
    idle: bool,
    /// A queued release excludes its endpoint (a backend failure, a missing
    /// model) or frees a slot a choice may be waiting for (queued as
    /// urgent): the writer sends what is queued at once, so neither the
    /// control plane's health view nor its counts wait for a linger.
    urgent: bool,
}

impl ClientShared {
    fn closed_status(&self) -> Status {
        self.pending
            .lock()
            .closed
            .clone()
            .unwrap_or_else(|| Status::unavailable("Route stream closed"))
    }

    /// Forgets the waiter of a request that was never written.
    fn forget(&self, id: u64) {
        // Bound first: the waiter drops after the lock is released.
        let waiter = self.pending.lock().waiters.remove(&id);
        drop(waiter);
    }
}

impl RouteClient {
    /// Opens a `Route` stream on `client`'s channel, coalescing releases
    /// for [`DEFAULT_RELEASE_LINGER`]. The reader task lives as long as the
    /// returned client (and needs a Tokio runtime).
    pub async fn open(client: RoutingClient<Channel>) -> Result<Self, Status> {
        Self::open_with_linger(client, DEFAULT_RELEASE_LINGER).await
    }

    /// [`RouteClient::open`] with coalesced releases waiting at most about
    /// `linger` for a request to ride on.
    pub async fn open_with_linger(
        mut client: RoutingClient<Channel>,
        linger: std::time::Duration,
    ) -> Result<Self, Status> {
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        let shared = Arc::new(ClientShared::default());
        let outbound = Outbound {
            rx,
            shared: shared.clone(),
            linger,
            timer: Box::pin(tokio::time::sleep(linger)),
            armed: false,
            active: false,
        };
        let answers = client.route(outbound).await?.into_inner();
        let reader = tokio::spawn(read_answers(answers, shared.clone()));
        Ok(Self {
            tx,
            shared,
            _reader: AbortOnDropHandle::new(reader),
        })
    }

    /// `ChooseEndpoint` over the stream.
    pub async fn choose(&self, request: v1::ChooseRequest) -> Result<v1::ChooseResponse, Status> {
        self.start_choose(request).await
    }

    /// Sends `ChooseEndpoint` over the stream now (when the send queue has
    /// room, else as soon as it has) and returns its answer as a plain
    /// future: `Unpin`, `'static` and, while the queue has room, not boxed
    /// (its one allocation is the answer's oneshot channel), so a caller
    /// can keep it inline and hand it to another task if it stops waiting.
    /// Dropping it does not unsend the choose.
    pub fn start_choose(&self, request: v1::ChooseRequest) -> ChooseInFlight {
        let (id, answer) = match self.register() {
            Ok(registered) => registered,
            Err(status) => return ChooseInFlight::failed(status),
        };
        let message = v1::RouteRequest {
            correlation_id: id,
            op: Some(Op::Choose(request)),
            releases: Vec::new(),
        };
        let state = match self.tx.try_send(message) {
            Ok(()) => CallState::Waiting(answer),
            // The writer is behind: wait for room (rare, so boxed).
            Err(TrySendError::Full(message)) => {
                let tx = self.tx.clone();
                let unsent = Unsent::new(&self.shared, id);
                CallState::Sending(Box::pin(async move {
                    if tx.send(message).await.is_err() {
                        return Err(unsent.shared.closed_status());
                    }
                    unsent.sent();
                    Ok(answer)
                }))
            }
            Err(TrySendError::Closed(_)) => {
                self.shared.forget(id);
                CallState::Done(Some(self.shared.closed_status()))
            }
        };
        ChooseInFlight { state }
    }

    /// `Release` over the stream, answered on its own.
    pub async fn release(
        &self,
        request: v1::ReleaseRequest,
    ) -> Result<v1::ReleaseResponse, Status> {
        match self.call(Op::Release(request)).await? {
            Answer::Released(r) => Ok(r),
            other => Err(mismatch("release", &other)),
        }
    }

    /// Queues a coalesced release: it goes out with the next request
    /// written on the stream, or alone after the linger; at once (with
    /// those queued) when `urgent` (the caller knows a choice may be
    /// waiting for the slot it frees: [`crate::decision::Choice::at_limit`]) or when its
    /// outcome makes the control plane avoid the endpoint
    /// ([`Outcome::excludes_endpoint`]). The returned
    /// future resolves when the control plane applied it (`Ok`, whether or
    /// not the lease was still held: releases are idempotent), or fails
    /// with `UNAVAILABLE` (stream gone, or the server does not apply
    /// coalesced releases: send it again, [`RouteClient::coalescing`] is
    /// then false) or `INVALID_ARGUMENT` (the server skipped malformed
    /// entries of that message). Dropping the future does not unqueue it.
    pub fn queue_release(
        &self,
        request: v1::ReleaseRequest,
        urgent: bool,
    ) -> impl Future<Output = Result<(), Status>> + Send + 'static + use<> {
        let (done, acked) = oneshot::channel();
        let refused = self
            .enqueue(request, urgent, || ReleaseDone::Future(done))
            .err();
        let shared = self.shared.clone();
        async move {
            if let Some(status) = refused {
                return Err(status);
            }
            match acked.await {
                Ok(result) => result,
                Err(_) => Err(shared.closed_status()),
            }
        }
    }

    /// Queues a coalesced release like [`RouteClient::queue_release`], but
    /// synchronously and reporting to `listener` (with `tag`, for the
    /// caller to recognise it) instead of through a future: the cheap form
    /// for a caller that ends many leases. `listener` then hears exactly
    /// once how it ended. Refused when the stream is closed or the server
    /// does not apply coalesced releases: then nothing was queued, nothing
    /// will be reported, and the caller sends the release another way.
    pub fn queue_release_to<L: ReleaseListener + 'static>(
        &self,
        request: v1::ReleaseRequest,
        urgent: bool,
        listener: &Arc<L>,
        tag: u64,
    ) -> Result<(), NotQueued> {
        if !self.coalescing() {
            return Err(NotQueued::NotCoalescing);
        }
        self.enqueue(request, urgent, || {
            let listener: Arc<dyn ReleaseListener> = listener.clone();
            ReleaseDone::Listener(Notice {
                listener: Some(listener),
                release: request,
                tag,
            })
        })
        .map_err(|_| NotQueued::Closed)
    }

    /// False once the server showed it does not apply coalesced releases
    /// (older than `RouteRequest.releases`): use [`RouteClient::release`].
    pub fn coalescing(&self) -> bool {
        !self.shared.no_coalescing.load(Ordering::Relaxed)
    }

    /// True once the stream ended: every call now fails; open a new client.
    pub fn is_closed(&self) -> bool {
        self.shared.pending.lock().closed.is_some() || self.tx.is_closed()
    }

    /// Queues `request` with the completion `done` makes, unless the stream
    /// ended (then `done` is not called: the caller reports the status).
    fn enqueue(
        &self,
        request: v1::ReleaseRequest,
        urgent: bool,
        done: impl FnOnce() -> ReleaseDone,
    ) -> Result<(), Status> {
        let mut pending = self.shared.pending.lock();
        if let Some(status) = &pending.closed {
            return Err(status.clone());
        }
        let urgent =
            urgent || release_outcome_from_proto(&request).is_ok_and(Outcome::excludes_endpoint);
        pending.queued.push((request, done()));
        pending.urgent |= urgent;
        if (urgent || (pending.idle && pending.queued.len() == 1))
            && let Some(writer) = pending.writer.take()
        {
            writer.wake();
        }
        Ok(())
    }

    /// A correlation id and the receiver of its answer, registered before
    /// the request is written (the answer may come back at once).
    fn register(&self) -> Result<(u64, AnswerRx), Status> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (done, answer) = oneshot::channel();
        let mut pending = self.shared.pending.lock();
        if let Some(status) = &pending.closed {
            return Err(status.clone());
        }
        pending.waiters.insert(
            id,
            Waiter {
                answer: Some(done),
                releases: Vec::new(),
            },
        );
        Ok((id, answer))
    }

    async fn call(&self, op: Op) -> Result<Answer, Status> {
        let (id, answer) = self.register()?;
        let request = v1::RouteRequest {
            correlation_id: id,
            op: Some(op),
            releases: Vec::new(),
        };
        let unsent = Unsent::new(&self.shared, id);
        if self.tx.send(request).await.is_err() {
            return Err(self.shared.closed_status());
        }
        unsent.sent();
        match answer.await {
            Ok(Ok(Answer::Error(e))) => Err(status_from_route_error(e)),
            Ok(result) => result,
            Err(_) => Err(self.shared.closed_status()),
        }
    }
}

impl Drop for RouteClient {
    fn drop(&mut self) {
        // The reader task stops with the client: settle now what it would
        // have (releases go back to their senders, to be sent again).
        fail_pending(&self.shared, Status::unavailable("Route client dropped"));
    }
}

/// The answer of a choose sent by [`RouteClient::start_choose`].
#[must_use = "the choose is sent; the future only waits for its answer"]
pub struct ChooseInFlight {
    state: CallState,
}

/// A registered request whose message is not in the send queue yet.
/// Dropped before [`Unsent::sent`] (the stream closed, or the caller gave up
/// waiting for room), it forgets the request's waiter: no answer will ever
/// come for it.
struct Unsent {
    shared: Arc<ClientShared>,
    id: u64,
    armed: bool,
}

impl Unsent {
    fn new(shared: &Arc<ClientShared>, id: u64) -> Self {
        Self {
            shared: shared.clone(),
            id,
            armed: true,
        }
    }

    /// The message is queued: its waiter stays until the answer comes.
    fn sent(mut self) {
        self.armed = false;
    }
}

impl Drop for Unsent {
    fn drop(&mut self) {
        if self.armed {
            self.shared.forget(self.id);
        }
    }
}

enum CallState {
    /// Waiting for room in the send queue, then for the answer.
    Sending(Pin<Box<dyn Future<Output = Result<AnswerRx, Status>> + Send>>),
    /// Sent: waiting for the answer.
    Waiting(AnswerRx),
    /// Failed before it was sent; `None` once reported.
    Done(Option<Status>),
}

impl ChooseInFlight {
    fn failed(status: Status) -> Self {
        Self {
            state: CallState::Done(Some(status)),
        }
    }
}

impl std::fmt::Debug for ChooseInFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            CallState::Sending(_) => "sending",
            CallState::Waiting(_) => "waiting",
            CallState::Done(_) => "done",
        };
        f.debug_struct("ChooseInFlight")
            .field("state", &state)
            .finish()
    }
}

impl Future for ChooseInFlight {
    type Output = Result<v1::ChooseResponse, Status>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                CallState::Sending(send) => match send.as_mut().poll(cx) {
                    Poll::Ready(Ok(answer)) => this.state = CallState::Waiting(answer),
                    Poll::Ready(Err(status)) => {
                        this.state = CallState::Done(None);
                        return Poll::Ready(Err(status));
                    }
                    Poll::Pending => return Poll::Pending,
                },
                CallState::Waiting(answer) => {
                    let answer = match Pin::new(answer).poll(cx) {
                        Poll::Ready(answer) => answer,
                        Poll::Pending => return Poll::Pending,
                    };
                    this.state = CallState::Done(None);
                    return Poll::Ready(match answer {
                        Ok(Ok(Answer::Choice(c))) => Ok(c),
                        Ok(Ok(Answer::Error(e))) => Err(status_from_route_error(e)),
                        Ok(Ok(other)) => Err(mismatch("choose", &other)),
                        Ok(Err(status)) => Err(status),
                        // Every waiter is answered or failed before the
                        // client state goes away; this is that going away.
                        Err(_) => Err(Status::unavailable("Route stream closed")),
                    });
                }
                CallState::Done(status) => {
                    return Poll::Ready(Err(status.take().unwrap_or_else(|| {
                        Status::internal("Route choose polled after it completed")
                    })));
                }
            }
        }
    }
}

/// The request stream tonic writes: callers' requests, each carrying the
/// releases queued by then, and releases-only requests when releases waited
/// the linger with nothing to ride on, or at once when one of them reports
/// a backend failure or a missing model. Polled by the connection's writer,
/// so coalescing costs no extra task.
struct Outbound {
    rx: mpsc::Receiver<v1::RouteRequest>,
    shared: Arc<ClientShared>,
    linger: std::time::Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// `timer` runs: since the last request written, or for the releases
    /// queued while idle.
    armed: bool,
    /// A request was written less than a linger ago. While active, queued
    /// releases wait for the timer or the next request (no wake-up per
    /// release); idle, the first queued release wakes the writer.
    active: bool,
}

/// Keeps the writer's current waker (cloned only when it changed).
fn park(pending: &mut Pending, cx: &Context<'_>) {
    match &pending.writer {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => pending.writer = Some(cx.waker().clone()),
    }
}

impl Outbound {
    /// Moves every queued release into `request`, their completions to its
    /// waiter.
    fn attach(pending: &mut Pending, request: &mut v1::RouteRequest) {
        if pending.queued.is_empty() {
            return;
        }
        pending.urgent = false;
        let queued = std::mem::take(&mut pending.queued);
        let mut dones = Vec::with_capacity(queued.len());
        request.releases.reserve(queued.len());
        for (release, done) in queued {
            request.releases.push(release);
            dones.push(done);
        }
        pending
            .waiters
            .entry(request.correlation_id)
            .or_default()
            .releases = dones;
    }

    /// A request carrying only the queued releases.
    fn releases_only(&self, pending: &mut Pending) -> v1::RouteRequest {
        let mut request = v1::RouteRequest {
            correlation_id: self.shared.next_id.fetch_add(1, Ordering::Relaxed),
            op: None,
            releases: Vec::new(),
        };
        Self::attach(pending, &mut request);
        request
    }
}

impl Stream for Outbound {
    type Item = v1::RouteRequest;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(mut request)) => {
                Self::attach(&mut this.shared.pending.lock(), &mut request);
                this.armed = false;
                this.active = true;
                return Poll::Ready(Some(request));
            }
            // The client is gone: end our side (its waiters fail with it).
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        let mut pending = this.shared.pending.lock();
        if pending.urgent && !pending.queued.is_empty() {
            // An endpoint to avoid: no waiting for a ride.
            return Poll::Ready(Some(this.releases_only(&mut pending)));
        }
        pending.urgent = false;
        if !this.armed {
            if pending.queued.is_empty() && !this.active {
                pending.idle = true;
                park(&mut pending, cx);
                return Poll::Pending;
            }
            // Requests flowing (or releases waiting): the timer watches
            // the queue, releases queued meanwhile wake nobody (unless
            // urgent).
            this.armed = true;
            pending.idle = false;
            this.timer
                .as_mut()
                .reset(tokio::time::Instant::now() + this.linger);
        }
        if this.timer.as_mut().poll(cx).is_pending() {
            park(&mut pending, cx);
            return Poll::Pending;
        }
        this.armed = false;
        if pending.queued.is_empty() {
            // A whole linger without traffic: idle until the first release.
            this.active = false;
            pending.idle = true;
            park(&mut pending, cx);
            return Poll::Pending;
        }
        Poll::Ready(Some(this.releases_only(&mut pending)))
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

/// Completes the coalesced releases an answer acknowledges.
fn settle_releases(shared: &ClientShared, releases: Vec<ReleaseDone>, applied: u32) {
    if releases.is_empty() {
        return;
    }
    let outcome = if applied as usize == releases.len() {
        Ok(())
    } else if applied == 0 {
        // A server older than `releases` ignored them: nothing applied.
        if !shared.no_coalescing.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "control plane does not apply coalesced releases; sending them one by one"
            );
        }
        Err(Status::unavailable(
            "coalesced releases not applied by this control plane; send them again",
        ))
    } else {
        Err(Status::invalid_argument(
            "the control plane skipped malformed coalesced releases",
        ))
    };
    for done in releases {
        done.settle(outcome.as_ref().map(|&()| ()));
    }
}

/// Hands each answer to its caller; when the stream ends, fails every caller
/// still waiting (and every release still queued) and refuses new ones.
async fn read_answers(mut answers: tonic::Streaming<v1::RouteResponse>, shared: Arc<ClientShared>) {
    let end = loop {
        match answers.message().await {
            Ok(Some(answer)) => {
                let waiter = shared.pending.lock().waiters.remove(&answer.correlation_id);
                let Some(waiter) = waiter else {
                    tracing::warn!(
                        correlation_id = answer.correlation_id,
                        "Route answer for no pending request"
                    );
                    continue;
                };
                settle_releases(&shared, waiter.releases, answer.releases_applied);
                if let Some(w) = waiter.answer {
                    // A caller that stopped waiting has dropped its receiver.
                    let _ = w.send(
                        answer
                            .result
                            .ok_or_else(|| Status::internal("Route answer without a result")),
                    );
                }
            }
            Ok(None) => break Status::unavailable("Route stream ended by the server"),
            Err(status) => break status,
        }
    };
    fail_pending(&shared, end);
}

/// Closes the client state with `end` (unless already closed): every caller
/// still waiting and every release sent or queued fails with the status
/// the stream ended with, outside the lock.
fn fail_pending(shared: &ClientShared, end: Status) {
    let (end, waiters, queued) = {
        let mut pending = shared.pending.lock();
        let end = pending.closed.get_or_insert(end).clone();
        (
            end,
            std::mem::take(&mut pending.waiters),
            std::mem::take(&mut pending.queued),
        )
    };
    for waiter in waiters.into_values() {
        if let Some(w) = waiter.answer {
            let _ = w.send(Err(end.clone()));
        }
        for done in waiter.releases {
            done.settle(Err(&end));
        }
    }
    for (_, done) in queued {
        done.settle(Err(&end));
    }
}

#[cfg(test)]
mod tests;
