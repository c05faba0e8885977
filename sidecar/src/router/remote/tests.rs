//! Remote router against in-process gRPC control planes on `127.0.0.1:0`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{FutureExt, StreamExt};
use switchyard_control_plane::{
    api::SessionGrant,
    config::Config,
    control_plane::ControlPlane,
    decision::{Choice, ChooseError, ChooseRequest, DecisionReason},
    grpc::{
        RoutingService, WatchUsageStream,
        convert::choose_request_to_proto,
        route_stream::{RouteClient, RouteResponseStream, RouteStream},
    },
    ids::SessionId,
    outcome::{Outcome, TokenCounts},
    server::RunningControlPlane,
};
use switchyard_proto::v1::{
    self,
    routing_client::RoutingClient,
    routing_server::{Routing, RoutingServer},
};
use tokio::sync::{mpsc, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::transport::server::TcpIncoming;

use crate::router::{
    RemoteSettings, RouteError, Router,
    embedded::tests::{probe, request},
    lease::Lease,
    ledger::{self, Ledger, RouteSlot},
};

const WAIT: Duration = Duration::from_secs(15);

fn config() -> Config {
    // Backends on ports nothing listens on: probes fail (the endpoints stay
    // candidates with the lists the tests inject).
    let yaml = "endpoints:\n  - http://127.0.0.1:9\n  - http://127.0.0.1:10\n\
                max_concurrent_connections: 4\nsession_ttl: 2s\nkeepalive_interval: 100ms\n\
                probe_interval: 1h\n";
    Config::from_yaml(yaml, &|_| None).unwrap()
}

fn settings() -> RemoteSettings {
    RemoteSettings {
        // Generous for a loaded 2-core CI machine; still "tens of ms" class.
        choose_timeout: Duration::from_millis(250),
        retry_min: Duration::from_millis(20),
        retry_max: Duration::from_millis(200),
        startup_wait: Duration::from_secs(10),
        ..RemoteSettings::default()
    }
}

/// Polls `cond` every 10 ms until it holds; panics after [`WAIT`].
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn start_cp(addr: Option<SocketAddr>) -> RunningControlPlane {
    start_cp_with(config, addr).await
}

async fn start_cp_with(config: fn() -> Config, addr: Option<SocketAddr>) -> RunningControlPlane {
    let rcp = match addr {
        None => RunningControlPlane::start(config()).await.unwrap(),
        Some(a) => {
            // The old listener may take a moment to go away.
            let deadline = Instant::now() + WAIT;
            loop {
                match RunningControlPlane::start_on(config(), a, None).await {
                    Ok(r) => break r,
                    Err(e) => {
                        assert!(Instant::now() < deadline, "cannot rebind {a}: {e}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }
    };
    probe(&rcp.cp);
    rcp
}

struct Harness {
    tasks: TaskTracker,
    cancel: CancellationToken,
}

impl Harness {
    fn new() -> Self {
        Self {
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
        }
    }

    async fn router(&self, url: String, settings: RemoteSettings) -> Router {
        Router::remote(
            url,
            "test-sidecar".into(),
            settings,
            &self.tasks,
            self.cancel.clone(),
        )
        .await
    }

    /// Every task the router spawned stops on cancel.
    async fn stop(self) {
        self.cancel.cancel();
        self.tasks.close();
        tokio::time::timeout(WAIT, self.tasks.wait())
            .await
            .expect("router tasks did not stop on cancel");
    }
}

/// Waits until `router` holds a session other than `old`.
async fn wait_new_session(router: &Router, old: SessionId) {
    wait_until("new session", || {
        router
            .remote_inner()
            .and_then(|r| r.session())
            .is_some_and(|s| s != old)
    })
    .await;
}

fn has_models(router: &Router) -> bool {
    router
        .cluster_state()
        .endpoints
        .iter()
        .all(|e| !e.advertised_models.is_empty())
}

#[tokio::test]
async fn choose_and_release_through_grpc() {
    let rcp = start_cp(None).await;
    let h = Harness::new();
    let router = h.router(rcp.url(), settings()).await;
    wait_until("cluster state with models", || has_models(&router)).await;
    assert!(router.control_plane_connected());

    let lease = router.choose(&request("llama3")).await.unwrap();
    assert!(!lease.degraded());
    assert!(
        router.remote_inner().unwrap().route_stream_open(),
        "choices travel on the multiplexed Route stream"
    );
    assert_eq!(lease.id().0 >> 63, 0, "granted by the control plane");
    assert_eq!(lease.choice().lease, Some(lease.id()));
    assert_eq!(rcp.cp.state().leases, 1);
    assert_eq!(router.local_in_flight(), 1);

    match router.choose(&request("mistral")).await.unwrap_err() {
        RouteError::Choose(ChooseError::ModelNotFound { model, available }) => {
            assert_eq!(model, "mistral");
            assert_eq!(available, vec!["llama3:latest", "qwen:7b"]);
        }
        other => panic!("unexpected {other:?}"),
    }

    lease.finish(
        Outcome::Ok,
        TokenCounts {
            prompt: 4,
            completion: 6,
        },
    );
    assert_eq!(router.local_in_flight(), 0);
    wait_until("release at the control plane", || {
        rcp.cp.state().leases == 0
    })
    .await;
    let ok = rcp
        .cp
        .stats()
        .releases
        .iter()
        .find(|(o, _)| *o == Outcome::Ok)
        .map(|(_, n)| *n);
    assert_eq!(ok, Some(1));
    assert_eq!(router.degraded_decisions(), 0);

    // A dropped lease is released as cancelled.
    let lease = router.choose(&request("qwen:7b")).await.unwrap();
    drop(lease);
    wait_until("cancelled release", || rcp.cp.state().leases == 0).await;

    assert_eq!(rcp.cp.sessions(Instant::now()).len(), 1);
    router.close().await;
    assert!(rcp.cp.sessions(Instant::now()).is_empty());
    h.stop().await;
    rcp.shutdown().await.unwrap();
}

#[tokio::test]
async fn degraded_while_down_then_reregistered_on_restart() {
    let rcp = start_cp(None).await;
    let addr = rcp.addr;
    let h = Harness::new();
    let s = settings();
    let router = h.router(rcp.url(), s.clone()).await;
    wait_until("cluster state with models", || has_models(&router)).await;
    let old_session = router.remote_inner().and_then(|r| r.session()).unwrap();

    let granted = router.choose(&request("llama3")).await.unwrap();
    assert!(!granted.degraded());
    // The snapshot degraded mode will route on must show that lease (it is
    // published within one `watch_interval`).
    wait_until("snapshot with the lease", || {
        router.cluster_state().leases == 1
    })
    .await;

    // Control plane gone.
    rcp.shutdown().await.unwrap();

    let started = Instant::now();
    let local = router.choose(&request("llama3")).await.unwrap();
    let first = started.elapsed();
    assert!(local.degraded());
    assert!(local.id().0 >> 63 == 1, "local ids are tagged");
    // Bounded by the deadline (plus scheduling slack on a busy machine).
    assert!(
        first < s.choose_timeout * 4,
        "first degraded choice took {first:?}"
    );
    // The two leases held count in the local decision: least in-flight for
    // the model puts the second request on the other endpoint.
    assert_ne!(local.choice().endpoint, granted.choice().endpoint);

    // The circuit is open now: the next choice does not pay the deadline.
    wait_until("circuit open", || !router.control_plane_connected()).await;
    let started = Instant::now();
    let forgotten = router.choose(&request("qwen:7b")).await.unwrap();
    assert!(forgotten.degraded());
    assert!(
        started.elapsed() < s.choose_timeout,
        "circuit did not skip the RPC"
    );
    assert!(router.degraded_decisions() >= 2);
    // Released while disconnected and never registered: forgotten locally.
    drop(forgotten);
    assert_eq!(router.local_in_flight(), 2);

    // A new control plane on the same address.
    let rcp2 = start_cp(Some(addr)).await;
    wait_new_session(&router, old_session).await;
    // Usage exact again: both held leases (one granted by the old control
    // plane, one granted locally) and nothing else.
    wait_until("leases re-registered", || rcp2.cp.state().leases == 2).await;
    let state = rcp2.cp.state();
    assert_eq!(state.total_in_flight(), 2);
    for lease in [&granted, &local] {
        let ep = state
            .endpoints
            .iter()
            .find(|e| e.url == lease.choice().endpoint)
            .unwrap();
        assert_eq!(ep.in_flight, 1, "{}", ep.url);
    }

    // Routing through the control plane again.
    wait_until("reconnected", || router.control_plane_connected()).await;
    let fresh = router.choose(&request("llama3")).await.unwrap();
    assert!(!fresh.degraded());
    assert_eq!(rcp2.cp.state().leases, 3);

    granted.finish(Outcome::Ok, TokenCounts::default());
    local.finish(Outcome::BackendError, TokenCounts::default());
    drop(fresh);
    assert_eq!(router.local_in_flight(), 0);
    wait_until("all released", || rcp2.cp.state().leases == 0).await;
    let stats = rcp2.cp.stats();
    assert_eq!(stats.leases_released, 3, "each lease released exactly once");
    assert_eq!(stats.leases_active, 0);

    router.close().await;
    h.stop().await;
    rcp2.shutdown().await.unwrap();
}

fn affinity_config() -> Config {
    let mut c = config();
    c.affinity.enabled = true;
    c
}

/// A restarted control plane starts with an empty affinity table: the
/// sidecar offers the conversations it remembers when its new session
/// opens, so each stays on its endpoint (reason `affinity`), instead of
/// being spread anew.
#[tokio::test]
async fn a_restarted_control_plane_gets_the_conversations_back() {
    let rcp = start_cp_with(affinity_config, None).await;
    let addr = rcp.addr;
    let h = Harness::new();
    let router = h.router(rcp.url(), settings()).await;
    wait_until("cluster state with models", || has_models(&router)).await;
    let old_session = router.remote_inner().and_then(|r| r.session()).unwrap();
    let keyed = |i: usize| ChooseRequest {
        affinity_key: Some(format!("conversation-{i}")),
        ..request("llama3")
    };
    // Eight conversations, each on the endpoint it happened to get (one
    // request at a time: nothing in flight, so the choice is random).
    let mut placed = Vec::new();
    for i in 0..8 {
        let lease = router.choose(&keyed(i)).await.unwrap();
        assert!(!lease.degraded());
        placed.push(lease.choice().endpoint.clone());
        lease.finish(Outcome::Ok, TokenCounts::default());
    }
    wait_until("released", || rcp.cp.state().leases == 0).await;
    rcp.shutdown().await.unwrap();

    let rcp2 = start_cp_with(affinity_config, Some(addr)).await;
    wait_new_session(&router, old_session).await;
    wait_until("affinity restored", || {
        rcp2.cp.affinity_sample(0, Instant::now()).0 == 8
    })
    .await;
    wait_until("reconnected", || router.control_plane_connected()).await;
    for (i, endpoint) in placed.iter().enumerate() {
        let lease = router.choose(&keyed(i)).await.unwrap();
        assert!(!lease.degraded());
        assert_eq!(
            (&lease.choice().endpoint, lease.choice().reason),
            (endpoint, DecisionReason::Affinity),
            "conversation {i}"
        );
        lease.finish(Outcome::Ok, TokenCounts::default());
    }

    router.close().await;
    h.stop().await;
    rcp2.shutdown().await.unwrap();
}

/// A pinned Responses answer id reaches the control plane, whose next
/// choice for the chain is an affinity choice, and is remembered here:
/// with the control plane gone, degraded choices follow it too. Without
/// the pin each choice is a coin toss between two idle endpoints.
#[tokio::test]
async fn a_pinned_response_is_followed_by_the_control_plane_and_when_degraded() {
    let rcp = start_cp_with(affinity_config, None).await;
    let h = Harness::new();
    let router = h.router(rcp.url(), settings()).await;
    wait_until("cluster state with models", || has_models(&router)).await;
    let first = router.choose(&request("llama3")).await.unwrap();
    let endpoint = first.choice().endpoint.clone();
    // Chains answered there: one continued through the control plane, ten
    // only once it is gone (each once: a local choice teaches the memory
    // too, so only a chain's first continuation shows the pin).
    router
        .pin_response("llama3", "resp_cp", first.choice())
        .await;
    for i in 0..10 {
        router
            .pin_response("llama3", &format!("resp_{i}"), first.choice())
            .await;
    }
    first.finish(Outcome::Ok, TokenCounts::default());
    let continuing = |id: &str| ChooseRequest {
        affinity_key: Some(crate::affinity_key::response_key("llama3", id)),
        ..request("llama3")
    };
    wait_until("the pins at the control plane", || {
        rcp.cp.affinity_sample(0, Instant::now()).0 == 11
    })
    .await;
    for _ in 0..10 {
        let lease = router.choose(&continuing("resp_cp")).await.unwrap();
        assert!(!lease.degraded());
        assert_eq!(
            (&lease.choice().endpoint, lease.choice().reason),
            (&endpoint, DecisionReason::Affinity)
        );
        lease.finish(Outcome::Ok, TokenCounts::default());
    }

    rcp.shutdown().await.unwrap();
    wait_until("circuit open", || !router.control_plane_connected()).await;
    for i in 0..10 {
        let lease = router
            .choose(&continuing(&format!("resp_{i}")))
            .await
            .unwrap();
        assert!(lease.degraded());
        assert_eq!(lease.choice().endpoint, endpoint);
        lease.finish(Outcome::Ok, TokenCounts::default());
    }
    router.close().await;
    h.stop().await;
}

#[tokio::test]
async fn starts_with_the_control_plane_down_and_connects_later() {
    // Learn a free port, then free it.
    let probe_cp = start_cp(None).await;
    let addr = probe_cp.addr;
    probe_cp.shutdown().await.unwrap();

    let h = Harness::new();
    let started = Instant::now();
    let router = h
        .router(
            format!("http://{addr}"),
            RemoteSettings {
                startup_wait: Duration::from_millis(200),
                ..settings()
            },
        )
        .await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!router.control_plane_connected());
    assert!(router.cluster_state().endpoints.is_empty());
    // Not knowing the control plane's setting yet: keys are derived.
    assert!(router.uses_affinity_keys());
    assert!(matches!(
        router.choose(&request("llama3")).await,
        Err(RouteError::NoState)
    ));

    let rcp = start_cp(Some(addr)).await;
    wait_until("connected with models", || {
        router.control_plane_connected() && has_models(&router)
    })
    .await;
    // The test configuration leaves conversation_affinity off: known with
    // the first cluster state.
    wait_until("affinity setting from the cluster state", || {
        !router.uses_affinity_keys()
    })
    .await;
    wait_until("session", || {
        router.remote_inner().and_then(|r| r.session()).is_some()
    })
    .await;
    let lease = router.choose(&request("llama3")).await.unwrap();
    assert!(!lease.degraded());
    drop(lease);
    wait_until("released", || rcp.cp.state().leases == 0).await;
    router.close().await;
    h.stop().await;
    rcp.shutdown().await.unwrap();
}

/// A `Routing` service whose `ChooseEndpoint` can be held at a gate: a
/// control plane that answers too late.
#[derive(Clone)]
struct Gated {
    inner: RoutingService,
    hold: Arc<AtomicBool>,
    /// This many next `OpenSession` calls wait for the gate, then are
    /// carried out even if their caller gave up meanwhile (as a stalled
    /// control-plane process does when it resumes).
    hold_opens: Arc<AtomicUsize>,
    gate: watch::Sender<bool>,
    route: RouteMode,
}

/// How [`Gated`] answers `Route`.
#[derive(Clone)]
enum RouteMode {
    /// Refused, so the router falls back to the gated unary calls (the
    /// late-answer handling is the same for both transports).
    Refused,
    /// Served, under the test's control.
    Served(Arc<StreamControl>),
}

/// Control over the `Route` streams of a [`Gated`] service.
struct StreamControl {
    /// The server's shutdown.
    shutdown: CancellationToken,
    /// While false, requests read from a stream wait before being answered.
    open: watch::Sender<bool>,
    /// Requests that found the gate closed.
    held: AtomicUsize,
    /// Ends the streams opened so far (a broken connection, as far as
    /// they are concerned); replaced by a fresh token for later ones.
    cut: parking_lot::Mutex<CancellationToken>,
}

impl StreamControl {
    fn new(shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            shutdown,
            open: watch::channel(true).0,
            held: AtomicUsize::new(0),
            cut: parking_lot::Mutex::new(CancellationToken::new()),
        })
    }

    fn cut_open_streams(&self) {
        std::mem::take(&mut *self.cut.lock()).cancel();
    }

    /// The answers to `inbound`: requests wait at the gate, and one that
    /// waited until its stream was cut is never answered (it fails the
    /// stream instead).
    fn serve(
        self: &Arc<Self>,
        service: RoutingService,
        inbound: tonic::Streaming<v1::RouteRequest>,
    ) -> RouteResponseStream {
        let cut = self.cut.lock().clone();
        let ctl = self.clone();
        let stream_cut = cut.clone();
        let gated = Box::pin(inbound.then(move |request| {
            let ctl = ctl.clone();
            let cut = stream_cut.clone();
            async move {
                let mut open = ctl.open.subscribe();
                if !*open.borrow_and_update() {
                    ctl.held.fetch_add(1, Ordering::AcqRel);
                }
                let _ = open.wait_for(|o| *o).await;
                if cut.is_cancelled() {
                    return Err(tonic::Status::unavailable("stream cut"));
                }
                request
            }
        }));
        let answers = RouteStream::new(service, gated, &self.shutdown);
        Box::pin(answers.take_until(cut.cancelled_owned()))
    }
}

#[tonic::async_trait]
impl Routing for Gated {
    async fn open_session(
        &self,
        r: tonic::Request<v1::OpenSessionRequest>,
    ) -> Result<tonic::Response<v1::OpenSessionResponse>, tonic::Status> {
        let held = self
            .hold_opens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if !held {
            return self.inner.open_session(r).await;
        }
        let (inner, mut open) = (self.inner.clone(), self.gate.subscribe());
        let carried_out = tokio::spawn(async move {
            let _ = open.wait_for(|o| *o).await;
            inner.open_session(r).await
        });
        carried_out
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?
    }
    async fn keep_alive(
        &self,
        r: tonic::Request<v1::KeepAliveRequest>,
    ) -> Result<tonic::Response<v1::KeepAliveResponse>, tonic::Status> {
        self.inner.keep_alive(r).await
    }
    async fn close_session(
        &self,
        r: tonic::Request<v1::CloseSessionRequest>,
    ) -> Result<tonic::Response<v1::CloseSessionResponse>, tonic::Status> {
        self.inner.close_session(r).await
    }
    async fn register_leases(
        &self,
        r: tonic::Request<v1::RegisterLeasesRequest>,
    ) -> Result<tonic::Response<v1::RegisterLeasesResponse>, tonic::Status> {
        self.inner.register_leases(r).await
    }
    async fn choose_endpoint(
        &self,
        r: tonic::Request<v1::ChooseRequest>,
    ) -> Result<tonic::Response<v1::ChooseResponse>, tonic::Status> {
        if self.hold.swap(false, Ordering::AcqRel) {
            let mut open = self.gate.subscribe();
            let _ = open.wait_for(|o| *o).await;
        }
        self.inner.choose_endpoint(r).await
    }
    async fn release(
        &self,
        r: tonic::Request<v1::ReleaseRequest>,
    ) -> Result<tonic::Response<v1::ReleaseResponse>, tonic::Status> {
        self.inner.release(r).await
    }

    type WatchUsageStream = WatchUsageStream;

    async fn watch_usage(
        &self,
        r: tonic::Request<v1::WatchUsageRequest>,
    ) -> Result<tonic::Response<Self::WatchUsageStream>, tonic::Status> {
        self.inner.watch_usage(r).await
    }

    type RouteStream = RouteResponseStream;

    async fn route(
        &self,
        r: tonic::Request<tonic::Streaming<v1::RouteRequest>>,
    ) -> Result<tonic::Response<Self::RouteStream>, tonic::Status> {
        match &self.route {
            RouteMode::Refused => Err(tonic::Status::unimplemented(
                "gated test service: unary only",
            )),
            RouteMode::Served(ctl) => Ok(tonic::Response::new(
                ctl.serve(self.inner.clone(), r.into_inner()),
            )),
        }
    }
}

/// A [`Gated`] control plane served on `127.0.0.1:0`.
struct GatedServer {
    cp: ControlPlane,
    url: String,
    hold: Arc<AtomicBool>,
    hold_opens: Arc<AtomicUsize>,
    gate: watch::Sender<bool>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl GatedServer {
    /// `streams`: serve `Route` (under the returned control) or refuse it.
    async fn start(streams: bool) -> (Self, Option<Arc<StreamControl>>) {
        let cp = ControlPlane::new(Arc::new(config()));
        probe(&cp);
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        tasks.spawn(cp.clone().run_background(stop.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let hold = Arc::new(AtomicBool::new(false));
        let hold_opens = Arc::new(AtomicUsize::new(0));
        let (gate, _) = watch::channel(false);
        let control = streams.then(|| StreamControl::new(stop.clone()));
        let service = Gated {
            inner: RoutingService::new(cp.clone(), stop.clone()),
            hold: hold.clone(),
            hold_opens: hold_opens.clone(),
            gate: gate.clone(),
            route: control
                .clone()
                .map_or(RouteMode::Refused, RouteMode::Served),
        };
        tasks.spawn(
            tonic::transport::Server::builder()
                .add_service(RoutingServer::new(service))
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(listener),
                    stop.clone().cancelled_owned(),
                ),
        );
        let server = Self {
            cp,
            url,
            hold,
            hold_opens,
            gate,
            stop,
            tasks,
        };
        (server, control)
    }

    async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        tokio::time::timeout(WAIT, self.tasks.wait()).await.unwrap();
    }
}

/// A control plane that stalls while a sidecar opens its session carries
/// out the timed-out opens when it resumes: they grant the session the
/// sidecar's retry got, not one session each.
#[tokio::test]
async fn opens_retried_after_a_stall_leave_one_session() {
    let (server, _) = GatedServer::start(false).await;
    server.hold_opens.store(2, Ordering::Release);
    let h = Harness::new();
    let s = RemoteSettings {
        rpc_timeout: Duration::from_millis(200),
        ..settings()
    };
    let router = h.router(server.url.clone(), s).await;
    wait_until("a session", || server.cp.state().sessions == 1).await;
    assert_eq!(server.hold_opens.load(Ordering::Acquire), 0);
    let session = router.remote_inner().unwrap().session().unwrap();
    // The stalled opens go through now, with the token of the retry.
    server.gate.send_replace(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.cp.state().sessions, 1);
    let sessions = server.cp.sessions(Instant::now());
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(router.remote_inner().unwrap().session(), Some(session));
    router.close().await;
    wait_until("closed", || server.cp.state().sessions == 0).await;
    h.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn late_answer_goes_degraded_and_its_lease_is_released() {
    let (server, _) = GatedServer::start(false).await;
    let (cp, hold, gate) = (server.cp.clone(), server.hold.clone(), server.gate.clone());

    let h = Harness::new();
    let s = settings();
    let router = h.router(server.url.clone(), s.clone()).await;
    wait_until("cluster state with models", || has_models(&router)).await;

    hold.store(true, Ordering::Release);
    let started = Instant::now();
    let local = router.choose(&request("llama3")).await.unwrap();
    let took = started.elapsed();
    assert!(local.degraded());
    assert!(
        took >= s.choose_timeout,
        "answered before the deadline: {took:?}"
    );
    assert!(took < s.choose_timeout * 4, "degraded choice took {took:?}");
    assert_eq!(router.degraded_decisions(), 1);
    // One slow answer does not open the circuit.
    assert!(router.control_plane_connected());

    // The held call now grants a lease nobody uses: it must be released,
    // and the locally granted lease registered, leaving exactly one.
    gate.send_replace(true);
    wait_until("late grant released, local lease registered", || {
        let stats = cp.stats();
        stats.leases_granted == 1 && stats.leases_released == 1 && cp.state().leases == 1
    })
    .await;

    let remote = router.choose(&request("llama3")).await.unwrap();
    assert!(!remote.degraded());
    assert_eq!(cp.state().leases, 2);
    drop(local);
    remote.finish(Outcome::Ok, TokenCounts::default());
    wait_until("all released", || cp.state().leases == 0).await;
    assert_eq!(cp.stats().leases_released, 3);

    router.close().await;
    h.stop().await;
    server.stop().await;
}

/// A control plane paused for longer than the RPC timeout (SIGSTOP, a VM
/// freeze) answers the chooses queued on the `Route` stream when it
/// resumes: the leases it grants then must still be released. Waiting only
/// the RPC timeout for them leaked one lease per such choose for as long as
/// the session lived.
#[tokio::test]
async fn a_stream_choose_answered_after_the_rpc_timeout_is_still_released() {
    let (server, control) = GatedServer::start(true).await;
    let control = control.unwrap();
    let h = Harness::new();
    let s = RemoteSettings {
        rpc_timeout: Duration::from_millis(300),
        ..settings()
    };
    let router = h.router(server.url.clone(), s.clone()).await;
    wait_until("cluster state with models", || has_models(&router)).await;
    let warm = router.choose(&request("llama3")).await.unwrap();
    assert!(!warm.degraded());
    warm.finish(Outcome::Ok, TokenCounts::default());
    assert!(router.remote_inner().unwrap().route_stream_open());
    wait_until("warm-up released", || server.cp.state().leases == 0).await;

    control.open.send_replace(false);
    let local = router.choose(&request("llama3")).await.unwrap();
    assert!(local.degraded());
    // Paused well past the RPC timeout, then answering again.
    tokio::time::sleep(s.rpc_timeout * 3).await;
    control.open.send_replace(true);
    wait_until("late grant released, local lease registered", || {
        let stats = server.cp.stats();
        stats.leases_granted == 2 && stats.leases_released == 2 && server.cp.state().leases == 1
    })
    .await;
    drop(local);
    wait_until("all released", || server.cp.state().leases == 0).await;

    router.close().await;
    h.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn released_leases_go_on_the_open_stream_not_through_the_sender() {
    let rcp = start_cp(None).await;
    let client = RoutingClient::connect(rcp.url()).await.unwrap();
    let grant = client
        .clone()
        .open_session(v1::OpenSessionRequest {
            name: "ledger-test".into(),
            open_token: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let session = SessionGrant::try_from(grant).unwrap().id;
    let (queue, mut sender_jobs) = mpsc::unbounded_channel();
    let slot = Arc::new(RouteSlot::new(None));
    let ledger = Arc::new(Ledger::new(queue, vec![slot.clone()]));
    let generation = ledger.open_session(session);
    let stream = Arc::new(RouteClient::open(client.clone()).await.unwrap());
    *slot.lock() = Some(stream.clone());
    let take = |route: Arc<RouteClient>, ledger: Arc<Ledger>| async move {
        let message = choose_request_to_proto(&request("llama3"), Some(session));
        let choice = Choice::try_from(route.choose(message).await.unwrap()).unwrap();
        let id = choice.lease.unwrap();
        ledger.insert_granted(id, &choice, generation);
        Lease::new(choice, id, false, ledger::sink(&ledger))
    };

    let mut leases = Vec::new();
    for _ in 0..5 {
        leases.push(take(stream.clone(), ledger.clone()).await);
    }
    assert_eq!(rcp.cp.state().leases, 5);
    for lease in leases {
        lease.finish(Outcome::Ok, TokenCounts::default());
    }
    tokio::time::timeout(WAIT, ledger.drained())
        .await
        .expect("acknowledged on the stream");
    assert_eq!(rcp.cp.state().leases, 0);
    assert_eq!(rcp.cp.stats().leases_released, 5);
    assert!(
        sender_jobs.try_recv().is_err(),
        "nothing went to the sender"
    );

    // A stream that goes away before writing them: the releases come back
    // to the sender, still pending, and are applied once from there.
    let stalled = Arc::new(
        RouteClient::open_with_linger(client.clone(), Duration::from_secs(3600))
            .await
            .unwrap(),
    );
    *slot.lock() = Some(stalled.clone());
    let held = [
        take(stalled.clone(), ledger.clone()).await,
        take(stalled.clone(), ledger.clone()).await,
    ];
    drop(held);
    assert!(sender_jobs.try_recv().is_err(), "queued on the stream");
    assert_eq!(rcp.cp.state().leases, 2, "and not written yet");
    drop(stalled);
    drop(slot.lock().take());
    let mut retried = Vec::new();
    for _ in 0..2 {
        let job = tokio::time::timeout(WAIT, sender_jobs.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (job.outcome, job.generation),
            (Outcome::Cancelled, generation)
        );
        retried.push(job);
    }
    assert!(ledger.drained().now_or_never().is_none(), "still pending");
    // What the sender does with them.
    let mut unary = client.clone();
    for job in retried {
        let r = unary
            .release(v1::ReleaseRequest {
                lease_id: job.lease.0,
                outcome: v1::Outcome::Cancelled as i32,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(r.into_inner().released);
        ledger.job_done();
    }
    assert!(ledger.drained().now_or_never().is_some());
    let stats = rcp.cp.stats();
    assert_eq!((stats.leases_active, stats.leases_released), (0, 7));
    rcp.shutdown().await.unwrap();
}

#[tokio::test]
async fn releases_on_a_stream_cut_before_the_ack_are_retried_and_applied_once() {
    let (server, control) = GatedServer::start(true).await;
    let control = control.unwrap();
    let h = Harness::new();
    let router = h.router(server.url.clone(), settings()).await;
    wait_until("cluster state with models", || has_models(&router)).await;

    let mut leases = Vec::new();
    for model in ["llama3", "llama3", "qwen:7b"] {
        let lease = router.choose(&request(model)).await.unwrap();
        assert!(!lease.degraded());
        leases.push(lease);
    }
    assert!(router.remote_inner().unwrap().route_stream_open());
    assert_eq!(server.cp.state().leases, 3);

    // The control plane stops answering the stream, the releases are
    // written to it, then the connection breaks before any answer.
    control.open.send_replace(false);
    for lease in leases {
        lease.finish(Outcome::Ok, TokenCounts::default());
    }
    assert_eq!(router.local_in_flight(), 0);
    wait_until("releases written and held", || {
        control.held.load(Ordering::Acquire) >= 1
    })
    .await;
    assert_eq!(server.cp.state().leases, 3, "none applied yet");
    control.cut_open_streams();
    control.open.send_replace(true);

    // Retried (on a new stream, or unary meanwhile): each applied once.
    wait_until("released after the reconnect", || {
        server.cp.state().leases == 0
    })
    .await;
    let stats = server.cp.stats();
    assert_eq!((stats.leases_released, stats.leases_active), (3, 0));
    assert_eq!(
        stats
            .releases
            .iter()
            .find(|(o, _)| *o == Outcome::Ok)
            .map(|(_, n)| *n),
        Some(3)
    );
    router.close().await;
    assert!(server.cp.sessions(Instant::now()).is_empty());
    h.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn invalid_url_never_routes() {
    let h = Harness::new();
    let router = h.router("not a url".into(), settings()).await;
    assert!(!router.control_plane_connected());
    assert!(matches!(
        router.choose(&request("llama3")).await,
        Err(RouteError::NoState)
    ));
    router.close().await;
    h.stop().await;
}
