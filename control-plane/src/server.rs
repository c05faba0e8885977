//! Running a control plane: the gRPC server (Routing, Cluster, standard
//! `grpc.health.v1` health and server reflection v1 + v1alpha), the metrics
//! endpoint, discovery probes and the facade's background upkeep, all owned
//! by one shutdown token.
//!
//! Shutdown order: the token fires → health flips to `NOT_SERVING` →
//! `WatchUsage` streams end → the gRPC server stops accepting and drains
//! in-flight calls (bounded by [`SHUTDOWN_GRACE`], since a client may hold a
//! health `Watch` stream open forever) → probes, upkeep and metrics stop →
//! [`run`] returns. Every task is owned (a `TaskTracker` or `JoinSet`); none
//! outlives `run`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use switchyard_proto::v1::{cluster_server::ClusterServer, routing_server::RoutingServer};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic_health::ServingStatus;

use crate::{
    config::Config,
    control_plane::ControlPlane,
    discovery::{self, DiscoveryError},
    grpc::{ClusterService, RoutingService},
    metrics,
};

mod threads;

/// Longest time in-flight gRPC calls get to finish after shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// HTTP/2 keep-alive ping period: finds dead sidecar connections.
const HTTP2_KEEPALIVE: Duration = Duration::from_secs(10);

/// Concurrent HTTP/2 streams one connection may open. A sidecar multiplexes
/// all its unary calls (and its `Route` / `WatchUsage` streams) on one
/// connection; hyper's default of 200 would queue a busy sidecar's calls
/// behind each other. Each stream costs a small task, so this stays bounded.
const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Grpc(#[source] tonic::transport::Error),
    /// The `state_file` could not be read.
    #[error(transparent)]
    StateFile(#[from] crate::admin_file::AdminFileError),
    /// The reflection service could not be built from the descriptors.
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[source] tonic_reflection::server::Error),
    /// The metrics server failed.
    #[error("metrics server on {addr} failed: {source}")]
    Metrics {
        /// Its listen address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Discovery could not start.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// A server task panicked.
    #[error("server task failed: {0}")]
    Task(String),
    /// A gRPC server thread (or its runtime) could not start.
    #[error("cannot start a gRPC server thread: {0}")]
    Thread(#[source] std::io::Error),
}

fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(switchyard_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Serves the control plane's gRPC API on `listener` until `shutdown` fires.
pub async fn serve(
    cp: ControlPlane,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    type Routing = RoutingServer<RoutingService>;
    type Cluster = ClusterServer<ClusterService>;

    let (health, health_service) = tonic_health::server::health_reporter();
    // Ready ("" and Routing SERVING) once every endpoint has had a probe
    // round applied. Before that a fresh control plane knows no endpoint's
    // models and would refuse every request (503, `policy::models_unknown`),
    // so Kubernetes' readiness probe keeps it out of its Service and the
    // sidecars keep routing degraded on their last state meanwhile. The
    // wait is bounded (a round takes at most about two probe timeouts);
    // Cluster (inspection) serves at once.
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health.set_not_serving::<Routing>().await;
    health.set_serving::<Cluster>().await;
    let ready = tokio::spawn({
        let health = health.clone();
        let rounds = cp.probe_rounds().clone();
        let bound = cp.config().probe.timeout.saturating_mul(2) + Duration::from_secs(1);
        async move {
            if tokio::time::timeout(bound, rounds.all_applied_once())
                .await
                .is_err()
            {
                tracing::warn!(
                    after = ?bound,
                    "not every endpoint has been probed yet; reporting ready anyway"
                );
            }
            health.set_service_status("", ServingStatus::Serving).await;
            health.set_serving::<Routing>().await;
        }
    });

    let reflection_v1 = reflection_builder()
        .build_v1()
        .map_err(ServeError::Reflection)?;
    let reflection_v1alpha = reflection_builder()
        .build_v1alpha()
        .map_err(ServeError::Reflection)?;

    let signal = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            // The readiness task must not report SERVING after this.
            ready.abort();
            let _ = ready.await;
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            health.set_not_serving::<Routing>().await;
            health.set_not_serving::<Cluster>().await;
        }
    };

    // Throughput settings (measured with `tests/src/bin/grpc-bench.rs`):
    // - TCP_NODELAY: answers are small and latency-bound; Nagle would hold
    //   each one back waiting for the client's ACK;
    // - flow-control windows stay at hyper's 1 MiB (connection and stream):
    //   routing messages are ~100 bytes, so windows never bind, and the
    //   adaptive (BDP) window would only add PINGs (one per round trip);
    // - per-call cost is HTTP/2 stream setup and one write per answer, which
    //   no setting removes: high-rate clients use the `Route` stream, where
    //   answers ready together leave in one write;
    // - one single-threaded runtime per core ([`threads`]).
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE * 2))
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .add_service(RoutingServer::new(RoutingService::new(
            cp.clone(),
            shutdown.clone(),
        )))
        .add_service(ClusterServer::new(ClusterService::new(cp)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let served = threads::serve(listener, router, shutdown.clone());
    let server = async {
        tokio::pin!(served);
        tokio::select! {
            // Failed before any shutdown.
            result = &mut served => result,
            () = signal => served.await,
        }
    };

    tokio::select! {
        result = server => result,
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "gRPC calls still open after the shutdown grace; closing them");
            Ok(())
        }
    }
}

/// Starts what keeps the state fresh without serving it: discovery probes
/// and the facade's upkeep/publisher, on `tracker`, until `cancel`. An
/// embedded (standalone) control plane needs exactly this.
pub fn spawn_background(
    cp: &ControlPlane,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> Result<(), DiscoveryError> {
    discovery::spawn(
        cp.config(),
        Arc::new(cp.clone()),
        cp.probe_rounds().clone(),
        tracker,
        cancel.clone(),
    )?;
    tracker.spawn(cp.clone().run_background(cancel));
    Ok(())
}

/// Runs a control plane for `config`: probes, upkeep, gRPC on `grpc`, and
/// `/metrics` on `metrics` if given. Returns when `shutdown` fires and
/// everything has stopped, or when a server fails (then everything else is
/// stopped first).
pub async fn run(
    config: Config,
    grpc: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let cp = ControlPlane::with_state_file(Arc::new(config))?;
    run_control_plane(cp, grpc, metrics, shutdown).await
}

/// [`run`] for an existing control plane.
pub async fn run_control_plane(
    cp: ControlPlane,
    grpc: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    // A child token: one server failing stops the others without
    // cancelling the caller's token.
    let stop = shutdown.child_token();
    let background = TaskTracker::new();
    spawn_background(&cp, &background, stop.clone())?;

    let mut servers: JoinSet<Result<(), ServeError>> = JoinSet::new();
    servers.spawn(serve(cp.clone(), grpc, stop.clone()));
    if let Some(listener) = metrics {
        let addr = listener
            .local_addr()
            .map_or_else(|_| "(unknown)".to_owned(), |a| a.to_string());
        let cp = cp.clone();
        let stop = stop.clone();
        servers.spawn(async move {
            metrics::serve(cp, listener, stop)
                .await
                .map_err(|source| ServeError::Metrics { addr, source })
        });
    }

    let mut first_error = None;
    while let Some(joined) = servers.join_next().await {
        // Any server ending (shutdown or failure) ends them all.
        stop.cancel();
        let result = joined.unwrap_or_else(|e| Err(ServeError::Task(e.to_string())));
        if let Err(e) = result {
            tracing::error!(error = %e, "server stopped");
            first_error.get_or_insert(e);
        }
    }
    background.close();
    background.wait().await;
    first_error.map_or(Ok(()), Err)
}

/// A control plane running in-process, for tests and embedding: gRPC (and
/// optionally metrics) on bound addresses, probes and upkeep running.
/// Dropping it without [`shutdown`](Self::shutdown) cancels everything.
#[derive(Debug)]
pub struct RunningControlPlane {
    /// gRPC listen address.
    pub addr: SocketAddr,
    /// `/metrics` listen address, when started with metrics.
    pub metrics_addr: Option<SocketAddr>,
    /// The control plane itself (inspect or drive it directly).
    pub cp: ControlPlane,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), ServeError>>>,
}

impl RunningControlPlane {
    /// Starts on `127.0.0.1:0` (gRPC only).
    pub async fn start(config: Config) -> Result<Self, ServeError> {
        Self::start_on(config, loopback(), None).await
    }

    /// Starts on `127.0.0.1:0` with `/metrics` on another `127.0.0.1:0`.
    pub async fn start_with_metrics(config: Config) -> Result<Self, ServeError> {
        Self::start_on(config, loopback(), Some(loopback())).await
    }

    /// Starts on the given addresses.
    pub async fn start_on(
        config: Config,
        grpc: SocketAddr,
        metrics: Option<SocketAddr>,
    ) -> Result<Self, ServeError> {
        let grpc_listener = bind(grpc).await?;
        let addr = local_addr(&grpc_listener, grpc)?;
        let (metrics_listener, metrics_addr) = match metrics {
            Some(m) => {
                let l = bind(m).await?;
                let a = local_addr(&l, m)?;
                (Some(l), Some(a))
            }
            None => (None, None),
        };
        let cp = ControlPlane::with_state_file(Arc::new(config))?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_control_plane(
            cp.clone(),
            grpc_listener,
            metrics_listener,
            shutdown.clone(),
        ));
        Ok(Self {
            addr,
            metrics_addr,
            cp,
            shutdown,
            task: Some(task),
        })
    }

    /// The gRPC URL clients connect to (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops everything and waits for it; returns the first server error.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task
                .await
                .unwrap_or_else(|e| Err(ServeError::Task(e.to_string()))),
            None => Ok(()),
        }
    }
}

impl Drop for RunningControlPlane {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Binds `addr`, naming it in the error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    crate::cores::listen(addr).map_err(|source| ServeError::Bind { addr, source })
}

fn local_addr(listener: &TcpListener, asked: SocketAddr) -> Result<SocketAddr, ServeError> {
    listener.local_addr().map_err(|source| ServeError::Bind {
        addr: asked,
        source,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::sync::atomic::{AtomicBool, Ordering};

    use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
    use futures::StreamExt;
    use serde_json::{Value, json};
    use switchyard_proto::v1::{
        self, cluster_client::ClusterClient, routing_client::RoutingClient,
    };
    use tonic::{Code, transport::Channel};

    use super::*;

    /// A one-model Ollama that can be broken on demand.
    async fn fake_ollama(broken: Arc<AtomicBool>) -> String {
        async fn list(State(broken): State<Arc<AtomicBool>>) -> Result<Json<Value>, StatusCode> {
            if broken.load(Ordering::SeqCst) {
                Err(StatusCode::INTERNAL_SERVER_ERROR)
            } else {
                Ok(Json(json!({"models":[{"name":"m:latest"}]})))
            }
        }
        let app = Router::new()
            .route("/api/tags", get(list))
            .route("/api/ps", get(list))
            .with_state(broken);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    fn config(url: &str) -> Config {
        let yaml = format!(
            "endpoints: [\"{url}\"]\nmax_concurrent_connections: 2\nprobe_interval: 50ms\n\
             probe_timeout: 1s\nwatch_interval: 1ms\n"
        );
        Config::from_yaml(&yaml, &|_| None).unwrap()
    }

    /// Polls `GetState` (bounded) until `pred` holds.
    async fn state_where(
        client: &mut ClusterClient<Channel>,
        pred: impl Fn(&v1::ClusterState) -> bool,
    ) -> v1::ClusterState {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let s = client
                    .get_state(v1::GetStateRequest {})
                    .await
                    .unwrap()
                    .into_inner();
                if pred(&s) {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("state condition not reached")
    }

    fn choose(session: u64, model: &str) -> v1::ChooseRequest {
        v1::ChooseRequest {
            model: model.to_owned(),
            reserve: session != 0,
            session_id: session,
            request_kind: v1::RequestKind::Chat as i32,
            ..Default::default()
        }
    }

    /// A connected channel to `running`'s gRPC API.
    async fn channel_to(running: &RunningControlPlane) -> Channel {
        Channel::from_shared(running.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// gRPC health of `service` (`""` is the whole server).
    async fn health_of(channel: &Channel, service: &str) -> i32 {
        tonic_health::pb::health_client::HealthClient::new(channel.clone())
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
    }

    #[tokio::test]
    async fn ready_only_once_every_endpoint_has_been_probed() {
        use tonic_health::pb::health_check_response::ServingStatus as Status;
        // An endpoint that takes connections and never answers: its first
        // probe round ends at probe_timeout.
        let hang = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hang_url = format!("http://{}", hang.local_addr().unwrap());
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = hang.accept().await {
                open.push(socket);
            }
        });
        let yaml =
            format!("endpoints: [\"{hang_url}\"]\nprobe_interval: 1h\nprobe_timeout: 700ms\n");
        let started = std::time::Instant::now();
        let running = RunningControlPlane::start(Config::from_yaml(&yaml, &|_| None).unwrap())
            .await
            .unwrap();
        let channel = channel_to(&running).await;
        if started.elapsed() < Duration::from_millis(500) {
            for service in ["", "switchyard.v1.Routing"] {
                assert_eq!(
                    health_of(&channel, service).await,
                    Status::NotServing as i32,
                    "{service:?} before the first probe round"
                );
            }
        }
        // Inspection serves at once.
        assert_eq!(
            health_of(&channel, "switchyard.v1.Cluster").await,
            Status::Serving as i32
        );
        tokio::time::timeout(Duration::from_secs(10), async {
            while health_of(&channel, "").await != Status::Serving as i32 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("ready once the round failed at probe_timeout");
        assert!(
            started.elapsed() >= Duration::from_millis(600),
            "ready after {:?}, before the probe timed out",
            started.elapsed()
        );
        assert_eq!(
            health_of(&channel, "switchyard.v1.Routing").await,
            Status::Serving as i32
        );
        assert!(!running.cp.state().endpoints[0].healthy);
        running.shutdown().await.unwrap();
        held.abort();
    }

    #[tokio::test]
    async fn routing_cluster_watch_health_reflection_and_metrics() {
        let broken = Arc::new(AtomicBool::new(false));
        let backend = fake_ollama(broken.clone()).await;
        let running = RunningControlPlane::start_with_metrics(config(&backend))
            .await
            .unwrap();
        let channel = channel_to(&running).await;
        let mut routing = RoutingClient::new(channel.clone());
        let mut cluster = ClusterClient::new(channel.clone());

        // Discovery reached the backend.
        state_where(&mut cluster, |s| {
            s.endpoints[0].healthy && s.endpoints[0].loaded_models == ["m:latest"]
        })
        .await;

        // WatchUsage: the current state at once.
        let mut watch = routing
            .watch_usage(v1::WatchUsageRequest {})
            .await
            .unwrap()
            .into_inner();
        let first = watch.next().await.unwrap().unwrap();
        assert_eq!(first.leases, 0);
        assert_eq!(first.endpoints[0].url, backend);

        let session = routing
            .open_session(v1::OpenSessionRequest {
                name: "test".into(),
                open_token: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_ne!(session.session_id, 0);
        assert!(session.ttl_ms > 0);

        let choice = routing
            .choose_endpoint(choose(session.session_id, "m"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(choice.endpoint, backend);
        assert_ne!(choice.lease_id, 0);
        assert_eq!(choice.reason, v1::DecisionReason::LoadedFree as i32);

        // The watcher sees the lease.
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let s = watch.next().await.unwrap().unwrap();
                if s.leases == 1 && s.endpoints[0].in_flight == 1 {
                    break;
                }
            }
        })
        .await
        .expect("watcher sees the lease");

        let release = v1::ReleaseRequest {
            lease_id: choice.lease_id,
            outcome: v1::Outcome::Ok as i32,
            prompt_tokens: 3,
            completion_tokens: 4,
            model_missing: false,
        };
        assert!(
            routing
                .release(release)
                .await
                .unwrap()
                .into_inner()
                .released
        );
        assert!(
            !routing
                .release(release)
                .await
                .unwrap()
                .into_inner()
                .released
        );

        // Validation and error mapping over the wire.
        let e = routing.choose_endpoint(choose(0, "")).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert_eq!(e.message(), "model: must not be empty");
        let mut no_session = choose(0, "m");
        no_session.reserve = true;
        let e = routing.choose_endpoint(no_session).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with("session_id:"), "{e:?}");
        let e = routing
            .choose_endpoint(choose(session.session_id, "nope"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert!(e.message().contains("m:latest"), "{e:?}");
        let e = routing.choose_endpoint(choose(999, "m")).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert_eq!(e.message(), "unknown session 999");
        let e = routing
            .release(v1::ReleaseRequest {
                lease_id: 5,
                outcome: 42,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with("outcome:"), "{e:?}");
        let e = routing
            .register_leases(v1::RegisterLeasesRequest {
                session_id: 999,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        let e = routing
            .register_leases(v1::RegisterLeasesRequest {
                session_id: 999,
                affinity: vec![v1::AffinityRecord {
                    endpoint: backend.clone(),
                    tracking_model: "m:latest".into(),
                    expires_in_ms: 1_000,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert_eq!(e.message(), "affinity[0].key: must not be empty");

        // Admin.
        let e = cluster
            .drain(v1::DrainRequest {
                endpoint: "http://nope:1".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert!(e.message().contains(&backend), "{e:?}");
        let drained = cluster
            .drain(v1::DrainRequest {
                endpoint: backend.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(drained.endpoint.unwrap().draining);
        let e = routing.choose_endpoint(choose(0, "m")).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        cluster
            .undrain(v1::DrainRequest {
                endpoint: backend.clone(),
            })
            .await
            .unwrap();
        let sessions = cluster
            .list_sessions(v1::ListSessionsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(sessions.sessions.len(), 1);
        assert_eq!(sessions.sessions[0].name, "test");

        // Health: overall and per service.
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        for service in ["", "switchyard.v1.Routing", "switchyard.v1.Cluster"] {
            assert_eq!(
                health_of(&channel, service).await,
                tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
                "{service:?}"
            );
        }

        // Reflection, both versions.
        {
            use tonic_reflection::pb::v1alpha::{
                ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse,
            };
            let mut client = ServerReflectionClient::new(channel.clone());
            let req = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut resp = client
                .server_reflection_info(futures::stream::iter([req]))
                .await
                .unwrap()
                .into_inner();
            let Some(MessageResponse::ListServicesResponse(list)) =
                resp.next().await.unwrap().unwrap().message_response
            else {
                panic!("expected a service list");
            };
            let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
            for want in [
                "switchyard.v1.Routing",
                "switchyard.v1.Cluster",
                "grpc.health.v1.Health",
            ] {
                assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
            }
        }
        {
            use tonic_reflection::pb::v1::{
                ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse,
            };
            let mut client = ServerReflectionClient::new(channel.clone());
            let req = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut resp = client
                .server_reflection_info(futures::stream::iter([req]))
                .await
                .unwrap()
                .into_inner();
            let Some(MessageResponse::ListServicesResponse(list)) =
                resp.next().await.unwrap().unwrap().message_response
            else {
                panic!("expected a service list");
            };
            assert!(
                list.service
                    .iter()
                    .any(|s| s.name == "switchyard.v1.Routing")
            );
        }

        // Metrics reflect what happened.
        let metrics_url = format!("http://{}/metrics", running.metrics_addr.unwrap());
        let resp = reqwest::get(&metrics_url).await.unwrap();
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            metrics::CONTENT_TYPE
        );
        let text = resp.text().await.unwrap();
        assert!(
            text.contains("switchyard_cp_leases_granted_total 1\n"),
            "{text}"
        );
        assert!(
            text.contains("switchyard_cp_releases_total{outcome=\"ok\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("switchyard_cp_model_not_found_total 1\n"),
            "{text}"
        );

        // A failing backend turns unhealthy, with the reason.
        broken.store(true, Ordering::SeqCst);
        let s = state_where(&mut cluster, |s| !s.endpoints[0].healthy).await;
        assert!(s.endpoints[0].health_detail.contains("HTTP 500"), "{s:?}");

        // Shutdown flips health to NOT_SERVING, ends the watch stream and
        // stops the server.
        let mut health_watch = health
            .watch(tonic_health::pb::HealthCheckRequest {
                service: "switchyard.v1.Routing".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
        assert_eq!(health_watch.next().await.unwrap().unwrap().status, serving);
        let stopping = tokio::spawn(running.shutdown());
        let next = tokio::time::timeout(Duration::from_secs(10), health_watch.next())
            .await
            .expect("health watch sees the change");
        assert_eq!(
            next.unwrap().unwrap().status,
            tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
        );
        drop(health_watch);
        tokio::time::timeout(Duration::from_secs(10), stopping)
            .await
            .expect("shutdown completes")
            .unwrap()
            .unwrap();
        let end = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match watch.next().await {
                    Some(Ok(_)) => {}
                    other => return other,
                }
            }
        })
        .await
        .expect("watch stream ends");
        assert!(end.is_none() || matches!(end, Some(Err(_))));
    }
}
