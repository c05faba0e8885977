//! Remote mode: the control plane is another process, reached over tonic
//! [`Channel`]s (HTTP/2, connected lazily, reconnecting by themselves): one
//! on the caller's runtime for the session, `WatchUsage` and the retry
//! paths, and one per server thread ([`Lane`]) for that thread's `Route`
//! stream, driven by its runtime so a choice never wakes another thread.
//!
//! Three background tasks, all on the caller's `TaskTracker` and stopped by
//! its `CancellationToken`:
//! - the **session task** opens the session (retrying with backoff while the
//!   control plane is unreachable), keeps it alive every
//!   `keepalive_interval` from the grant, re-probes quickly while the circuit
//!   is open, and when the control plane forgot the session (`known=false`
//!   or `FAILED_PRECONDITION unknown session`: it restarted, or the session
//!   expired) opens a new one and re-registers every lease still held —
//!   including those granted locally in degraded mode — with
//!   `RegisterLeases`, so cluster usage is exact again within one interval;
//!   after every session opens it offers the conversations it remembers
//!   ([`AffinityMemory`], `RegisterLeases.affinity`), so a restarted
//!   control plane keeps them on their endpoints;
//! - the **follower** ([`super::follower`]) keeps the last `WatchUsage` state;
//! - the **release sender** is the retry path of releases: it sends the
//!   ones the ledger could not put on an open `Route` stream, and the ones
//!   the stream failed before its acknowledgement, many concurrently,
//!   retrying transport failures until acknowledged or until the session
//!   they were owed to is gone (then the control plane already dropped the
//!   lease). See [`super::ledger`] for the exactly-once rules and the fast
//!   path. On the `Route` stream releases are coalesced: they ride on the
//!   next choose written (or go out together after ~5 ms; at once with
//!   one that makes the control plane avoid an endpoint, frees an
//!   endpoint's last slot for its model — `Choice::at_limit`, whose
//!   acknowledgement the proxy waits for before the answer ends — or was
//!   granted too late to be used), each still acknowledged by the answer
//!   of the message that carried it; a control plane that predates
//!   coalescing is detected and gets them one by one.
//!
//! A choice is one `ChooseEndpoint` with `reserve=true` and a local deadline
//! of `choose_timeout`. On deadline, transport error, unknown session or a
//! missing session it decides locally ([`super::degraded`]). A call that
//! missed the deadline is not abandoned: it finishes in a tracked task and a
//! lease it still grants is released at once (otherwise the control plane
//! would count it until the session ends). On the `Route` stream a choice
//! costs no `tonic::Request` (whose `grpc-timeout` header is formatted per
//! call) and no boxed future: the stream's [`ChooseInFlight`] is waited on
//! inline; only the unary fallback builds a request and boxes its call.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{StreamExt, future::Either};
use switchyard_control_plane::grpc::route_stream::{ChooseInFlight, RouteClient};
use switchyard_control_plane::{
    api::{AffinityRecord, SessionGrant},
    cluster::ClusterState,
    config::Config,
    decision::{Choice, ChooseError, ChooseRequest},
    endpoint::without_credentials,
    grpc::convert::{ReleaseCall, choose_error_from_status, choose_request_to_proto},
    ids::{LeaseId, SessionId},
    policy::select_from_cluster_state,
};
use switchyard_proto::v1::{self, cluster_client::ClusterClient, routing_client::RoutingClient};
use tokio::{
    runtime::Handle,
    sync::{Notify, mpsc},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Code, Status, transport::Channel};

use super::{
    RemoteSettings, RouteError, StateSource,
    degraded::{AffinityMemory, Circuit, DegradeCause},
    follower::{Follower, Snapshot},
    lease::Lease,
    ledger::{self, Ledger, Registration, ReleaseJob, RouteSlot},
    local_discovery,
    model_items::{ItemsCache, ModelCatalog},
};

/// Exponential backoff with ±20 % jitter, `min` doubling up to `max`.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        Self {
            min,
            max: max.max(min),
            current: min,
        }
    }

    /// The next delay to wait.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        base.mul_f64(rand::random_range(0.8..1.2))
    }

    /// Back to the shortest delay (after a success).
    pub(crate) fn reset(&mut self) {
        self.current = self.min;
    }
}

/// True for failures that say nothing about the request, only that the
/// control plane could not be reached or did not answer.
pub(crate) fn is_transport(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}

/// Runs `call` with a local deadline (the tonic `grpc-timeout` header is set
/// too, so the server stops waiting as well).
pub(super) async fn with_deadline<T>(
    deadline: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Status> {
    within(deadline, call)
        .await
        .map(tonic::Response::into_inner)
}

/// `call`'s result, or `DEADLINE_EXCEEDED` once `deadline` has passed.
async fn within<T>(
    deadline: Duration,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(deadline, call).await {
        Ok(r) => r,
        Err(_) => Err(Status::deadline_exceeded("no answer within the deadline")),
    }
}

pub(super) fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(timeout);
    r
}

/// Where one server thread's choices and releases travel: a connection of
/// its own to the control plane, driven by that thread's runtime, and the
/// multiplexed `Route` stream on it (one HTTP/2 stream instead of one call
/// each: ~10x cheaper for the control plane), reopened when it ends, unary
/// calls meanwhile. A request is then handled from its first byte to its
/// release without waking another thread.
struct Lane {
    runtime: Handle,
    client: RoutingClient<Channel>,
    /// Shared with the ledger, which queues releases on it directly.
    route: Arc<RouteSlot>,
    /// Serializes stream (re)opening.
    opening: tokio::sync::Mutex<()>,
}

struct Shared {
    name: String,
    settings: RemoteSettings,
    /// Session, keep-alive, registration, `WatchUsage`, the release retry
    /// path and the unary fallback, on the caller's runtime.
    client: RoutingClient<Channel>,
    /// The same connection, for `Cluster.ListModelItems`.
    channel: Channel,
    model_items: ItemsCache,
    /// One per server thread ([`ledger::current_lane`] picks).
    lanes: Box<[Lane]>,
    ledger: Arc<Ledger>,
    circuit: Arc<Circuit>,
    snapshot: Arc<Snapshot>,
    affinity: AffinityMemory,
    wake_session: Arc<Notify>,
    /// Notified when a session opens (start-up wait).
    session_opened: Notify,
    closed: AtomicBool,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

/// Router over a control plane reached by gRPC.
pub(crate) struct RemoteRouter {
    /// `None` when the URL was unusable: then every choice is local and
    /// fails with [`RouteError::NoState`] (no state can ever arrive).
    shared: Option<Arc<Shared>>,
    empty: Arc<ClusterState>,
}

impl RemoteRouter {
    /// Starts the router; `lanes` are the runtimes of the server threads
    /// (empty: one lane on the caller's runtime).
    pub(crate) async fn start(
        url: String,
        name: String,
        settings: RemoteSettings,
        probe_config: Option<Arc<Config>>,
        lanes: Vec<Handle>,
        tasks: &TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        let empty = Arc::new(ClusterState::default());
        let endpoint = match tonic::transport::Endpoint::from_shared(url.clone()) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(url, error = %e, "invalid control-plane URL; no routing possible");
                return Self {
                    shared: None,
                    empty,
                };
            }
        };
        let endpoint = endpoint
            .connect_timeout(settings.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(settings.http2_keepalive)
            .keep_alive_timeout(settings.http2_keepalive * 2)
            .keep_alive_while_idle(true);
        let channel = endpoint.connect_lazy();
        let client = RoutingClient::new(channel.clone());
        let lanes: Box<[Lane]> = if lanes.is_empty() {
            Box::new([Lane::new(Handle::current(), client.clone())])
        } else {
            lanes
                .into_iter()
                .map(|runtime| {
                    // The channel's tasks (its connection) run where it is
                    // made: on the lane's runtime.
                    let lane_channel = {
                        let _on_lane = runtime.enter();
                        endpoint.connect_lazy()
                    };
                    Lane::new(runtime, RoutingClient::new(lane_channel))
                })
                .collect()
        };
        let (queue, jobs) = mpsc::unbounded_channel();
        let routes = lanes.iter().map(|l| l.route.clone()).collect();
        let shared = Arc::new(Shared {
            name,
            affinity: AffinityMemory::new(settings.affinity_ttl, settings.affinity_max_entries),
            settings,
            client: client.clone(),
            channel,
            model_items: ItemsCache::default(),
            lanes,
            ledger: Arc::new(Ledger::new(queue, routes)),
            circuit: Arc::new(Circuit::default()),
            snapshot: Arc::new(Snapshot::default()),
            wake_session: Arc::new(Notify::new()),
            session_opened: Notify::new(),
            closed: AtomicBool::new(false),
            tasks: tasks.clone(),
            cancel: cancel.clone(),
        });
        tracing::info!(url, name = shared.name, "connecting to the control plane");

        tasks.spawn(session_task(shared.clone(), cancel.clone()));
        tasks.spawn(release_sender(shared.clone(), jobs, cancel.clone()));
        let follower = Follower {
            client,
            snapshot: shared.snapshot.clone(),
            circuit: shared.circuit.clone(),
            wake_session: shared.wake_session.clone(),
            backoff: Backoff::new(shared.settings.retry_min, shared.settings.retry_max),
        };
        tasks.spawn(follower.run(cancel.clone()));

        let router = Self {
            shared: Some(shared.clone()),
            empty,
        };
        // Give the first requests a session and a cluster state when the
        // control plane is up; never fail (or wait long) when it is not.
        let ready = async {
            loop {
                let opened = shared.session_opened.notified();
                let arrived = shared.snapshot.arrived.notified();
                let has_session = shared.ledger.session().is_some();
                let has_state = shared.snapshot.get().is_some();
                match (has_session, has_state) {
                    (true, true) => return,
                    (false, _) => opened.await,
                    (true, false) => arrived.await,
                }
            }
        };
        tokio::select! {
            () = ready => {}
            () = tokio::time::sleep(shared.settings.startup_wait) => {
                tracing::warn!("control plane not ready yet; starting anyway (degraded until it is)");
                if probe_config.is_none() && shared.snapshot.get().is_none() {
                    tracing::warn!("no endpoints configured in this sidecar: requests are refused until the control plane answers");
                }
            }
            () = cancel.cancelled() => {}
        }
        if let Some(config) = probe_config {
            let outage = config.sessions.ttl;
            // Started without the control plane: the probes begin now, and
            // the first round (bounded by the probe timeout) is waited for,
            // so the first requests and listings see the endpoints instead
            // of a refusal and an empty `/api/tags`.
            // Both notifications armed before the check: a state arriving
            // in between still ends the wait.
            let local = shared.snapshot.local.notified();
            let arrived = shared.snapshot.arrived.notified();
            let first_round = (shared.snapshot.get().is_none() && !cancel.is_cancelled())
                .then(|| config.probe.timeout + FIRST_ROUND_SLACK);
            tasks.spawn(local_discovery::supervise(
                config,
                shared.snapshot.clone(),
                outage,
                tasks.clone(),
                cancel.clone(),
            ));
            if let Some(limit) = first_round {
                tokio::select! {
                    () = local => {}
                    () = arrived => {}
                    () = tokio::time::sleep(limit) => {}
                    () = cancel.cancelled() => {}
                }
            }
        }
        router
    }

    pub(crate) async fn choose(&self, req: &ChooseRequest) -> Result<Lease, RouteError> {
        let Some(shared) = &self.shared else {
            return Err(RouteError::NoState);
        };
        let cause = match shared.ledger.session() {
            None => DegradeCause::NoSession,
            Some(_) if !shared.circuit.reachable() => DegradeCause::CircuitOpen,
            Some((session, generation)) => {
                match remote_choose(shared, req, session, generation).await {
                    Ok(lease) => return Ok(lease),
                    Err(Fallback::Refused(e)) => return Err(RouteError::Choose(e)),
                    Err(Fallback::Local(cause)) => cause,
                }
            }
        };
        choose_locally(shared, req, cause)
    }

    pub(crate) fn cluster_state(&self) -> Arc<ClusterState> {
        self.shared
            .as_ref()
            .and_then(|s| s.snapshot.get())
            .unwrap_or_else(|| self.empty.clone())
    }

    pub(crate) async fn model_items(&self) -> Arc<ModelCatalog> {
        let Some(shared) = &self.shared else {
            return Arc::default();
        };
        if let Some(items) = shared.snapshot.local_items() {
            return items;
        }
        let timeout = settings_rpc_timeout(&shared.settings);
        shared
            .model_items
            .get(&shared.channel, shared.circuit.reachable(), timeout)
            .await
    }

    /// See [`ItemsCache::expire_if_newly_behind`].
    pub(crate) fn expire_items_behind(&self, missing: impl FnOnce() -> Option<u64>) -> bool {
        self.shared.as_ref().is_some_and(|shared| {
            shared.snapshot.local_items().is_none()
                && shared.model_items.expire_if_newly_behind(missing())
        })
    }

    /// Has the control plane probe `urls` now (`Cluster.Reprobe`), then
    /// waits until this sidecar's `WatchUsage` state includes the result
    /// and makes the next listing fetch the endpoints' items again.
    pub(crate) async fn reprobe(&self, urls: &[Arc<str>]) -> Result<(), Status> {
        let Some(shared) = &self.shared else {
            return Err(Status::unavailable("no control plane configured"));
        };
        let mut client = ClusterClient::new(shared.channel.clone());
        let message = v1::ReprobeRequest {
            endpoints: urls.iter().map(|u| u.to_string()).collect(),
        };
        let call = client.reprobe(request(message, REPROBE_TIMEOUT));
        let version = with_deadline(REPROBE_TIMEOUT, call).await?.version;
        shared.model_items.expire();
        let followed = async {
            while self.cluster_state().version < version {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(FOLLOW_TIMEOUT, followed)
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "the WatchUsage stream did not reach state version {version} within {FOLLOW_TIMEOUT:?}"
                ))
            })
    }

    pub(crate) fn uses_affinity_keys(&self) -> bool {
        self.shared
            .as_ref()
            .and_then(|s| s.snapshot.get())
            .is_none_or(|state| state.conversation_affinity)
    }

    pub(crate) fn control_plane_connected(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| s.circuit.reachable())
    }

    pub(crate) fn local_in_flight(&self) -> usize {
        self.shared.as_ref().map_or(0, |s| s.ledger.held())
    }

    pub(crate) fn state_source(&self) -> StateSource {
        self.shared
            .as_ref()
            .map_or(StateSource::None, |s| s.snapshot.source())
    }

    pub(crate) fn degraded_decisions(&self) -> u64 {
        self.shared
            .as_ref()
            .map_or(0, |s| s.circuit.degraded_decisions())
    }

    /// Flushes queued releases (so their outcomes and tokens are counted),
    /// then closes the session; each step bounded, all best effort.
    pub(crate) async fn close(&self) {
        let Some(shared) = &self.shared else {
            return;
        };
        shared.closed.store(true, Ordering::Release);
        shared.wake_session.notify_one();
        let budget = shared.settings.close_timeout;
        if tokio::time::timeout(budget / 2, shared.ledger.drained())
            .await
            .is_err()
        {
            tracing::warn!("releases still queued at close; the session close ends those leases");
        }
        let Some(session) = shared.ledger.take_session() else {
            return;
        };
        let mut client = shared.client.clone();
        let call = client.close_session(request(
            v1::CloseSessionRequest {
                session_id: session.0,
            },
            budget / 2,
        ));
        match with_deadline(budget / 2, call).await {
            Ok(r) => {
                tracing::info!(session = %session, released = r.released_leases, "session closed")
            }
            Err(s) => {
                tracing::warn!(session = %session, code = ?s.code(), message = s.message(), "could not close the session; it will expire")
            }
        }
    }

    /// True while choices and releases travel on an open `Route` stream.
    #[cfg(test)]
    pub(crate) fn route_stream_open(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| s.lane().stream_open())
    }

    /// How many lanes have an open `Route` stream.
    #[cfg(test)]
    pub(crate) fn open_route_streams(&self) -> usize {
        self.shared
            .as_ref()
            .map_or(0, |s| s.lanes.iter().filter(|l| l.stream_open()).count())
    }

    /// Pins conversation `key` (a Responses chain's next turn) to
    /// `choice`'s endpoint: remembered here (degraded decisions, and the
    /// offer to a restarted control plane) and registered with the control
    /// plane (`RegisterLeases.affinity`) before this returns, so the turn
    /// that continues the chain, sent once the client has this answer,
    /// finds the pin through any sidecar. Waits at most `choose_timeout`
    /// (as long as a choice would); a pin not delivered by then stays in
    /// the memory, offered again when the next session opens.
    pub(crate) async fn pin(&self, key: String, model: &str, choice: &Choice) {
        let Some(shared) = &self.shared else {
            return;
        };
        shared
            .affinity
            .remember_key(&key, model, choice, Instant::now());
        let Some((session, _)) = shared.ledger.session() else {
            return;
        };
        if !shared.circuit.reachable() {
            return;
        }
        let record = AffinityRecord::for_choice(key, choice, shared.settings.affinity_ttl);
        let affinity = vec![v1::AffinityRecord::from(&record)];
        let call = register_leases(
            shared,
            session,
            Vec::new(),
            affinity,
            shared.settings.choose_timeout,
        );
        if let Err(status) = call.await {
            tracing::debug!(code = ?status.code(), message = status.message(), "response pin not delivered; offered when the next session opens");
        }
    }

    #[cfg(test)]
    pub(crate) fn session(&self) -> Option<SessionId> {
        self.shared
            .as_ref()
            .and_then(|s| s.ledger.session())
            .map(|(s, _)| s)
    }
}

/// Why a remote choice did not produce a lease.
enum Fallback {
    /// The control plane decided: no endpoint (model not found, ...).
    Refused(ChooseError),
    /// The control plane could not decide: decide locally.
    Local(DegradeCause),
}

async fn remote_choose(
    shared: &Arc<Shared>,
    req: &ChooseRequest,
    session: SessionId,
    generation: u64,
) -> Result<Lease, Fallback> {
    let settings = &shared.settings;
    let message = choose_request_to_proto(req, Some(session));
    let call = match route_client(shared).await {
        // Sent now; the answer is waited for inline (no box, no request).
        Some(route) => Either::Left(route.start_choose(message)),
        None => {
            let mut client = shared.client.clone();
            // The header deadline is the long RPC timeout: a late answer is
            // still wanted (to release its lease), only this request stops
            // waiting.
            let message = request(message, settings_rpc_timeout(settings));
            Either::Right(Box::pin(async move {
                client
                    .choose_endpoint(message)
                    .await
                    .map(tonic::Response::into_inner)
            }) as UnaryChoose)
        }
    };
    // If this future is dropped while the call is pending (the client went
    // away), or the deadline passes, the guard hands the call to
    // `reap_late_grant`, so a lease the control plane still grants is
    // released instead of leaking for the session's lifetime.
    let mut pending = PendingChoose {
        shared,
        generation,
        call: Some(call),
    };
    let answer = match pending.wait(settings.choose_timeout).await {
        Some(answer) => answer,
        None => {
            drop(pending);
            if shared.circuit.deadline_missed() {
                shared.wake_session.notify_one();
            }
            return Err(Fallback::Local(DegradeCause::Deadline));
        }
    };
    match answer {
        Ok(response) => {
            shared.circuit.up();
            let choice = match Choice::try_from(response) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "invalid choice from the control plane");
                    return Err(Fallback::Local(DegradeCause::BadAnswer));
                }
            };
            let Some(id) = choice.lease else {
                tracing::error!("the control plane granted no lease for a reserving choice");
                return Err(Fallback::Local(DegradeCause::BadAnswer));
            };
            shared.circuit.answered();
            shared.ledger.insert_granted(id, &choice, generation);
            shared.affinity.remember(req, &choice, Instant::now());
            Ok(Lease::new(choice, id, false, ledger::sink(&shared.ledger)))
        }
        Err(status) => match choose_error_from_status(&status, &req.model) {
            Some(ChooseError::UnknownSession(_)) => {
                shared.circuit.up();
                if shared.ledger.drop_session(session) {
                    tracing::warn!(session = %session, "control plane does not know this session; re-opening");
                }
                shared.wake_session.notify_one();
                Err(Fallback::Local(DegradeCause::UnknownSession))
            }
            Some(refused) => {
                shared.circuit.up();
                shared.circuit.answered();
                Err(Fallback::Refused(refused))
            }
            None if is_transport(status.code()) => {
                shared.circuit.down(status.message());
                shared.wake_session.notify_one();
                Err(Fallback::Local(DegradeCause::Transport))
            }
            None => {
                tracing::error!(code = ?status.code(), message = status.message(), "control plane rejected a choice");
                Err(Fallback::Local(DegradeCause::BadAnswer))
            }
        },
    }
}

type ChooseAnswer = Result<v1::ChooseResponse, Status>;

/// A unary choose in flight (the fallback when there is no stream).
type UnaryChoose = Pin<Box<dyn Future<Output = ChooseAnswer> + Send>>;

/// A choose in flight on either transport.
type AnyChoose = Either<ChooseInFlight, UnaryChoose>;

impl Lane {
    fn new(runtime: Handle, client: RoutingClient<Channel>) -> Self {
        Self {
            runtime,
            client,
            route: Arc::new(RouteSlot::new(None)),
            opening: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether the lane's `Route` stream is open.
    #[cfg(test)]
    fn stream_open(&self) -> bool {
        self.route.lock().as_ref().is_some_and(|c| !c.is_closed())
    }
}

impl Shared {
    /// The calling thread's lane.
    fn lane(&self) -> &Lane {
        &self.lanes[ledger::current_lane(self.lanes.len())]
    }
}

/// The calling thread's open `Route` stream, opening one when there is
/// none (bounded by the choice deadline); `None` means use unary calls this
/// time.
async fn route_client(shared: &Shared) -> Option<Arc<RouteClient>> {
    let lane = shared.lane();
    let usable =
        |slot: &Option<Arc<RouteClient>>| slot.as_ref().filter(|c| !c.is_closed()).cloned();
    if let Some(c) = usable(&lane.route.lock()) {
        return Some(c);
    }
    let _opening = lane.opening.try_lock().ok()?;
    if let Some(c) = usable(&lane.route.lock()) {
        return Some(c);
    }
    // Opened on the lane's runtime, where the stream's reader then runs
    // (the release sender may ask from another thread).
    let open = lane.runtime.spawn(RouteClient::open(lane.client.clone()));
    match tokio::time::timeout(shared.settings.choose_timeout, open).await {
        Ok(Ok(Ok(c))) => {
            let c = Arc::new(c);
            // The closed client goes away outside the slot's lock (its
            // drop reports what it still held to the ledger).
            let closed = lane.route.lock().replace(c.clone());
            drop(closed);
            Some(c)
        }
        Ok(Ok(Err(status))) => {
            tracing::debug!(code = ?status.code(), "cannot open the Route stream; unary calls");
            None
        }
        // Timed out, or the lane's runtime is stopping.
        Ok(Err(_)) | Err(_) => None,
    }
}

/// A choose call in flight. Dropped unfinished, it lets the call complete in
/// a tracked task that releases any lease granted late.
struct PendingChoose<'a> {
    shared: &'a Arc<Shared>,
    generation: u64,
    call: Option<AnyChoose>,
}

impl PendingChoose<'_> {
    /// The answer, or `None` when `limit` passed first (the call stays
    /// pending and is reaped on drop).
    async fn wait(&mut self, limit: Duration) -> Option<ChooseAnswer> {
        let call = self.call.as_mut()?;
        let answer = tokio::time::timeout(limit, call).await.ok()?;
        self.call = None;
        Some(answer)
    }
}

impl Drop for PendingChoose<'_> {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            // A choose on the `Route` stream is answered whenever the
            // control plane gets to it (it may have been paused for
            // seconds), or fails when the stream ends (HTTP/2 keep-alive
            // ends it if the control plane stays silent): wait for that,
            // however long. A unary call gives up at its own deadline.
            let limit = match call {
                Either::Left(_) => None,
                Either::Right(_) => Some(settings_rpc_timeout(&self.shared.settings)),
            };
            reap_late_grant(self.shared, call, self.generation, limit);
        }
    }
}

/// Beyond the probe timeout, how long a sidecar started without the control
/// plane waits for its own first probe round to be published.
const FIRST_ROUND_SLACK: Duration = Duration::from_secs(1);

/// Longest wait for `Cluster.Reprobe`: the control plane bounds it by
/// twice its probe timeout plus a second.
const REPROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for the `WatchUsage` stream to carry a reprobe's version
/// (the control plane publishes every `watch_interval`, 20 ms by default).
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(2);

fn settings_rpc_timeout(settings: &RemoteSettings) -> Duration {
    settings.rpc_timeout.max(settings.choose_timeout)
}

/// Lets a choose call that missed its deadline finish in a tracked task and
/// releases the lease it may still grant; `limit` bounds the wait (`None`:
/// until the call itself ends).
///
/// Giving up while the control plane may still answer leaks the lease it
/// grants then for as long as the session lives: with a 2 s bound, a
/// control plane paused for 3 s (SIGSTOP, a VM freeze) with chooses
/// queued kept those leases until it restarted.
fn reap_late_grant<F>(shared: &Arc<Shared>, call: F, generation: u64, limit: Option<Duration>)
where
    F: Future<Output = ChooseAnswer> + Send + 'static,
{
    let ledger = shared.ledger.clone();
    let cancel = shared.cancel.clone();
    shared.tasks.spawn(async move {
        let bounded = async {
            match limit {
                Some(limit) => tokio::time::timeout(limit, call).await.ok(),
                None => Some(call.await),
            }
        };
        let answer = tokio::select! {
            () = cancel.cancelled() => return,
            a = bounded => a,
        };
        if let Some(Ok(response)) = answer {
            let lease = response.lease_id;
            if lease != 0 {
                tracing::debug!(lease, "late choice granted a lease; releasing it");
                ledger.release_orphan(LeaseId(lease), generation);
            }
        }
    });
}

fn choose_locally(
    shared: &Shared,
    req: &ChooseRequest,
    cause: DegradeCause,
) -> Result<Lease, RouteError> {
    let Some((state, own_probes)) = shared.snapshot.current() else {
        return Err(RouteError::NoState);
    };
    let now = Instant::now();
    let affinity = shared.affinity.lookup(req, now);
    let (choice, id) = shared.ledger.grant_local(own_probes, |local| {
        select_from_cluster_state(&state, local, req, affinity.as_deref(), &mut rand::rng())
    })?;
    shared.circuit.degraded_decision(cause);
    shared.affinity.remember(req, &choice, now);
    tracing::debug!(
        endpoint = %without_credentials(&choice.endpoint),
        cause = cause.as_str(),
        "degraded decision"
    );
    Ok(Lease::new(choice, id, true, ledger::sink(&shared.ledger)))
}

// ---------------------------------------------------------------- session

/// Waits `delay`, or until woken; false when cancelled.
async fn pause(shared: &Shared, delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = cancel.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
        () = shared.wake_session.notified() => true,
    }
}

/// A new open's token: its retries send the same one, so the control
/// plane grants them the session a timed-out attempt opened instead of
/// another one (`OpenSessionRequest.open_token`; never 0).
fn open_token() -> u64 {
    rand::random::<u64>().max(1)
}

async fn open_session(shared: &Shared, open_token: u64) -> Result<SessionGrant, Status> {
    let timeout = shared.settings.rpc_timeout;
    let mut client = shared.client.clone();
    let call = client.open_session(request(
        v1::OpenSessionRequest {
            name: shared.name.clone(),
            open_token,
        },
        timeout,
    ));
    let response = with_deadline(timeout, call).await?;
    SessionGrant::try_from(response).map_err(|e| Status::internal(e.to_string()))
}

async fn keep_alive(shared: &Shared, session: SessionId) -> Result<bool, Status> {
    let timeout = shared.settings.rpc_timeout;
    let mut client = shared.client.clone();
    let call = client.keep_alive(request(
        v1::KeepAliveRequest {
            session_id: session.0,
        },
        timeout,
    ));
    with_deadline(timeout, call).await.map(|r| r.known)
}

/// What a registration round found out about the session.
enum Registered {
    Done,
    SessionUnknown,
    Failed,
}

/// One `RegisterLeases` call for `session`, answered within `timeout`.
async fn register_leases(
    shared: &Shared,
    session: SessionId,
    leases: Vec<v1::LeaseRecord>,
    affinity: Vec<v1::AffinityRecord>,
    timeout: Duration,
) -> Result<v1::RegisterLeasesResponse, Status> {
    let mut client = shared.client.clone();
    let call = client.register_leases(request(
        v1::RegisterLeasesRequest {
            session_id: session.0,
            leases,
            affinity,
        },
        timeout,
    ));
    with_deadline(timeout, call).await
}

/// What a failed `RegisterLeases` call of the session task means: the
/// session is gone (re-open it), or try again at the next round (a
/// transport failure also marks the control plane unreachable).
fn registration_failed(shared: &Shared, status: &Status, what: &str) -> Registered {
    if let Some(ChooseError::UnknownSession(_)) = choose_error_from_status(status, "") {
        return Registered::SessionUnknown;
    }
    if is_transport(status.code()) {
        shared.circuit.down(status.message());
    }
    tracing::warn!(code = ?status.code(), message = status.message(), "{what} failed; will retry");
    Registered::Failed
}

async fn register(shared: &Shared, round: &Registration) -> Registered {
    let leases = round.leases.iter().map(v1::LeaseRecord::from).collect();
    let call = register_leases(
        shared,
        round.session,
        leases,
        Vec::new(),
        shared.settings.rpc_timeout,
    );
    match call.await {
        Ok(r) => {
            shared.circuit.up();
            shared.ledger.finish_registration(round, true);
            if r.rejected > 0 {
                tracing::warn!(
                    rejected = r.rejected,
                    "control plane rejected leases on endpoints it does not know"
                );
            }
            tracing::info!(session = %round.session, registered = r.registered, "leases re-registered");
            Registered::Done
        }
        Err(status) => {
            shared.ledger.finish_registration(round, false);
            registration_failed(shared, &status, "lease registration")
        }
    }
}

/// Affinity entries per `RegisterLeases` call when offering them: ~150
/// bytes each, so a call stays far below gRPC's 4 MB message limit.
const AFFINITY_CHUNK: usize = 2_000;

/// Offers the conversations this sidecar remembers to the control plane
/// of `session`, so one that restarted (and lost its affinity table) keeps
/// each on its endpoint instead of spreading them anew.
async fn offer_affinity(shared: &Shared, session: SessionId) -> Registered {
    let records = shared.affinity.records(Instant::now());
    if records.is_empty() {
        return Registered::Done;
    }
    let mut restored = 0;
    for chunk in records.chunks(AFFINITY_CHUNK) {
        let affinity = chunk.iter().map(v1::AffinityRecord::from).collect();
        let call = register_leases(
            shared,
            session,
            Vec::new(),
            affinity,
            shared.settings.rpc_timeout,
        );
        match call.await {
            Ok(r) => restored += r.affinity_restored,
            Err(status) => {
                return registration_failed(shared, &status, "offering affinity entries");
            }
        }
    }
    tracing::info!(session = %session, offered = records.len(), restored, "conversation affinity offered to the control plane");
    Registered::Done
}

/// Opens, keeps alive, re-opens the session and registers leases, until
/// `cancel` or [`RemoteRouter::close`].
async fn session_task(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut backoff = Backoff::new(shared.settings.retry_min, shared.settings.retry_max);
    let mut logged_failure = false;
    let mut token = open_token();
    'session: loop {
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        let grant = match open_session(&shared, token).await {
            Ok(g) => {
                // The next open (after this session is lost) is a new one.
                token = open_token();
                g
            }
            Err(status) => {
                shared.circuit.down(status.message());
                if !logged_failure {
                    tracing::warn!(code = ?status.code(), message = status.message(), "cannot open a control-plane session; retrying");
                    logged_failure = true;
                }
                if !pause(&shared, backoff.next_delay(), &cancel).await {
                    return;
                }
                continue;
            }
        };
        if shared.closed.load(Ordering::Acquire) {
            // Closed while opening: do not leave a session behind.
            let mut client = shared.client.clone();
            let timeout = shared.settings.rpc_timeout;
            let _ = with_deadline(
                timeout,
                client.close_session(request(
                    v1::CloseSessionRequest {
                        session_id: grant.id.0,
                    },
                    timeout,
                )),
            )
            .await;
            return;
        }
        shared.circuit.up();
        backoff.reset();
        logged_failure = false;
        let generation = shared.ledger.open_session(grant.id);
        shared.session_opened.notify_waiters();
        tracing::info!(session = %grant.id, generation, ttl = ?grant.ttl, "control-plane session opened");

        let mut wait = Duration::ZERO;
        let mut affinity_offered = false;
        loop {
            // Register what the session does not count yet: everything after
            // a re-open, leases granted locally meanwhile, late answers.
            if shared.circuit.reachable()
                && let Some(round) = shared.ledger.begin_registration()
                && let Registered::SessionUnknown = register(&shared, &round).await
            {
                shared.ledger.drop_session(grant.id);
                continue 'session;
            }
            // Then the conversations, once per session (a restarted control
            // plane knows none of them).
            if !affinity_offered && shared.circuit.reachable() {
                match offer_affinity(&shared, grant.id).await {
                    Registered::Done => affinity_offered = true,
                    Registered::SessionUnknown => {
                        shared.ledger.drop_session(grant.id);
                        continue 'session;
                    }
                    Registered::Failed => {}
                }
            }
            if !pause(&shared, wait, &cancel).await {
                return;
            }
            if shared.closed.load(Ordering::Acquire) {
                return;
            }
            let answer = match keep_alive(&shared, grant.id).await {
                // Same meaning as `known = false`.
                Err(status)
                    if matches!(
                        choose_error_from_status(&status, ""),
                        Some(ChooseError::UnknownSession(_))
                    ) =>
                {
                    Ok(false)
                }
                other => other,
            };
            match answer {
                Ok(true) => {
                    shared.circuit.up();
                    backoff.reset();
                    // A choice may have dropped the session on an "unknown
                    // session" answer that this keep-alive contradicts (two
                    // control-plane replicas behind one address): it lives.
                    if !shared.closed.load(Ordering::Acquire) {
                        shared.ledger.restore_session(grant.id);
                    }
                    wait = grant.keepalive_interval;
                }
                Ok(false) => {
                    shared.circuit.up();
                    shared.ledger.drop_session(grant.id);
                    tracing::warn!(session = %grant.id, "control plane forgot the session (restart or expiry); re-opening and re-registering leases");
                    continue 'session;
                }
                Err(status) => {
                    shared.circuit.down(status.message());
                    // Re-probe quickly while unreachable, never slower than
                    // the keep-alive period.
                    wait = backoff.next_delay().min(grant.keepalive_interval);
                }
            }
        }
    }
}

// ---------------------------------------------------------------- releases

/// Sends queued releases, up to `release_concurrency` at once, until
/// `cancel`.
async fn release_sender(
    shared: Arc<Shared>,
    mut jobs: mpsc::UnboundedReceiver<ReleaseJob>,
    cancel: CancellationToken,
) {
    let stream = futures::stream::poll_fn(move |cx| jobs.poll_recv(cx));
    let limit = shared.settings.release_concurrency.max(1);
    let run = stream.for_each_concurrent(limit, |job| {
        let shared = shared.clone();
        async move {
            let lease = job.lease;
            let applied = send_release(&shared, job).await;
            shared.ledger.release_settled(lease, applied);
            shared.ledger.job_done();
        }
    });
    tokio::select! {
        () = cancel.cancelled() => {}
        () = run => {}
    }
}

/// Sends `job` until acknowledged (true) or refused or abandoned (false).
async fn send_release(shared: &Shared, job: ReleaseJob) -> bool {
    let mut backoff = Backoff::new(shared.settings.retry_min, shared.settings.retry_max);
    let message = v1::ReleaseRequest::from(&ReleaseCall {
        lease: job.lease,
        outcome: job.outcome,
        tokens: job.tokens,
    });
    loop {
        if !shared.ledger.is_current(job.generation) {
            tracing::debug!(lease = %job.lease, "session replaced; its leases are gone at the control plane");
            return false;
        }
        let timeout = shared.settings.rpc_timeout;
        let answer = match route_client(shared).await {
            // Coalesced: rides on the next choose (one message, one answer
            // for both), or goes alone after the client's linger.
            Some(route) if route.coalescing() => {
                within(timeout, route.queue_release(message, job.urgent))
                    .await
                    .map(|()| None)
            }
            Some(route) => within(timeout, route.release(message)).await.map(Some),
            None => {
                let mut client = shared.client.clone();
                with_deadline(timeout, client.release(request(message, timeout)))
                    .await
                    .map(Some)
            }
        };
        match answer {
            Ok(r) => {
                if r.is_some_and(|r| !r.released) {
                    tracing::debug!(lease = %job.lease, "lease already ended at the control plane");
                }
                return true;
            }
            Err(status) if is_transport(status.code()) => {
                tracing::debug!(lease = %job.lease, code = ?status.code(), "release not delivered; retrying");
            }
            Err(status) => {
                tracing::warn!(lease = %job.lease, code = ?status.code(), message = status.message(), "release refused; dropped");
                return false;
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

#[cfg(test)]
mod tests;
