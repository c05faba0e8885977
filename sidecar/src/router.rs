//! The sidecar's routing handle: how a request gets an endpoint and a lease.
//!
//! [`Router`] has two modes behind one API:
//! - **embedded** ([`Router::embedded`], standalone mode): the control plane
//!   is in this process; choices and releases are direct facade calls;
//! - **remote** ([`Router::remote`]): gRPC to a control-plane process, with a
//!   session kept alive, the cluster state followed over `WatchUsage`,
//!   releases sent in the background, and **degraded mode** — local
//!   decisions from the last cluster state — whenever the control plane does
//!   not answer within `choose_timeout`. Each server thread chooses and
//!   releases on a connection and `Route` stream of its own (a *lane*,
//!   [`Router::remote_on_lanes`]). A sidecar that starts while the control
//!   plane is unreachable, or has lost it for longer than a session TTL,
//!   probes the endpoints of its own config and routes on those results
//!   until the control plane's state arrives (`local_discovery`).
//!
//! Invariants kept here and in the submodules:
//! - every [`Lease`] is released exactly once (`finish`, or `Drop` as
//!   cancelled), and at the control plane at most once;
//! - release never blocks a request on the network;
//! - after the control plane restarts, the leases this sidecar holds
//!   (including those it granted itself while degraded) are registered with
//!   the new one, so its usage counts are exact again within one keep-alive
//!   interval;
//! - every background task runs on the caller's `TaskTracker` and stops on
//!   the caller's `CancellationToken`.

mod degraded;
mod embedded;
mod follower;
mod lease;
mod ledger;
mod local_discovery;
mod model_items;
mod remote;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use switchyard_control_plane::{
    api::AffinityRecord,
    cluster::ClusterState,
    config::Config,
    control_plane::ControlPlane,
    decision::{Choice, ChooseError, ChooseRequest},
    policy,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use lease::Lease;
pub use model_items::ModelCatalog;

use self::{embedded::EmbeddedRouter, remote::RemoteRouter};

/// Where the cluster state a sidecar routes on (when the control plane does
/// not answer), lists and reports health from comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateSource {
    /// The control plane: embedded, or followed over `WatchUsage`.
    ControlPlane,
    /// The last state the control plane published before it went away.
    LastKnown,
    /// The sidecar's own probes of the endpoints in its config
    /// (`router/local_discovery.rs`).
    OwnProbes,
    /// Nothing yet: no state ever arrived and no probes of its own.
    None,
}

impl StateSource {
    /// The name `/health` reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ControlPlane => "control_plane",
            Self::LastKnown => "last_known",
            Self::OwnProbes => "own_probes",
            Self::None => "none",
        }
    }
}

/// Why no lease could be had.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The policy (control plane or local) found no endpoint: model not
    /// found, or every candidate excluded or draining.
    #[error(transparent)]
    Choose(#[from] ChooseError),
    /// Degraded mode without anything to decide on.
    #[error("control plane unreachable and no cluster state known yet")]
    NoState,
}

/// Settings of the remote (gRPC) router. [`RemoteSettings::from_config`]
/// takes `choose_timeout` and the affinity settings from the config; the
/// rest are transport constants with sensible defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteSettings {
    /// Deadline for a control-plane choice before deciding locally
    /// (`choose_timeout`, tens of milliseconds).
    pub choose_timeout: Duration,
    /// TCP connect timeout to the control plane.
    pub connect_timeout: Duration,
    /// Deadline of the other calls (session, keep-alive, register, release).
    pub rpc_timeout: Duration,
    /// First retry delay when the control plane is unreachable (doubles).
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// HTTP/2 ping period on the channel (finds dead connections).
    pub http2_keepalive: Duration,
    /// Longest wait in [`Router::remote`] for a session and a first cluster
    /// state before serving anyway (degraded).
    pub startup_wait: Duration,
    /// Total budget of [`Router::close`] (flush releases, close session).
    pub close_timeout: Duration,
    /// `Release` calls in flight at once.
    pub release_concurrency: usize,
    /// How long a conversation is remembered for degraded decisions.
    pub affinity_ttl: Duration,
    /// Most conversations remembered.
    pub affinity_max_entries: usize,
}

impl Default for RemoteSettings {
    fn default() -> Self {
        Self {
            choose_timeout: Duration::from_millis(50),
            connect_timeout: Duration::from_secs(1),
            rpc_timeout: Duration::from_secs(2),
            retry_min: Duration::from_millis(50),
            retry_max: Duration::from_secs(2),
            http2_keepalive: Duration::from_secs(10),
            startup_wait: Duration::from_secs(1),
            close_timeout: Duration::from_secs(2),
            release_concurrency: 64,
            affinity_ttl: Duration::from_secs(300),
            affinity_max_entries: 100_000,
        }
    }
}

impl RemoteSettings {
    /// Settings for `config`: its `choose_timeout` and affinity TTL / size.
    pub fn from_config(config: &Config) -> Self {
        Self {
            choose_timeout: config.sidecar.choose_timeout,
            affinity_ttl: config.affinity.ttl,
            affinity_max_entries: config.affinity.max_entries,
            ..Self::default()
        }
    }
}

enum Mode {
    Embedded(EmbeddedRouter),
    Remote(RemoteRouter),
}

/// How the sidecar reaches routing decisions. Cheap to clone.
#[derive(Clone)]
pub struct Router {
    mode: Arc<Mode>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match &*self.mode {
            Mode::Embedded(_) => "embedded",
            Mode::Remote(_) => "remote",
        };
        f.debug_struct("Router")
            .field("mode", &mode)
            .field("local_in_flight", &self.local_in_flight())
            .finish()
    }
}

impl Router {
    /// Standalone: control plane embedded in this process (no gRPC hop).
    /// Opens a session on the embedded control plane; that session never
    /// expires (an embedded sidecar cannot lose contact with its own
    /// process, and expiry exists only to reclaim the leases of sidecars
    /// that did), so no keep-alive task is needed.
    pub fn embedded(cp: ControlPlane, name: &str) -> Router {
        Router {
            mode: Arc::new(Mode::Embedded(EmbeddedRouter::new(cp, name))),
        }
    }

    /// Remote: gRPC to `url` (e.g. `http://127.0.0.1:50051`); spawns its
    /// session keep-alive, `WatchUsage` follower and release sender tasks
    /// (owned by `tasks`, stopped by `cancel`). Does not fail if the control
    /// plane is down at start: it waits at most `settings.startup_wait` for a
    /// session and a first cluster state, then keeps retrying in the
    /// background and routes in degraded mode meanwhile. An unusable URL is
    /// logged; every choice then fails with [`RouteError::NoState`].
    pub async fn remote(
        url: String,
        name: String,
        settings: RemoteSettings,
        tasks: &TaskTracker,
        cancel: CancellationToken,
    ) -> Router {
        Self::remote_on_lanes(url, name, settings, None, Vec::new(), tasks, cancel).await
    }

    /// [`Router::remote`] for a server that runs requests on the per-core
    /// runtimes `lanes` ([`switchyard_control_plane::cores`]): each gets a
    /// connection and a `Route` stream of its own, driven by that runtime,
    /// and a request uses its thread's. Empty: one lane on the caller's
    /// runtime.
    ///
    /// `probe_config`: a configuration whose endpoints the sidecar
    /// probes itself when the control plane gives it no cluster state
    /// within `startup_wait`, or has been gone for the config's session
    /// TTL, to route on (degraded) until the control plane's state arrives
    /// (see `router/local_discovery.rs`). `None`: a sidecar that starts
    /// without the control plane refuses requests until it answers, and
    /// one that loses it routes on its last state.
    pub async fn remote_on_lanes(
        url: String,
        name: String,
        settings: RemoteSettings,
        probe_config: Option<Arc<Config>>,
        lanes: Vec<tokio::runtime::Handle>,
        tasks: &TaskTracker,
        cancel: CancellationToken,
    ) -> Router {
        let remote =
            RemoteRouter::start(url, name, settings, probe_config, lanes, tasks, cancel).await;
        Router {
            mode: Arc::new(Mode::Remote(remote)),
        }
    }

    /// Chooses an endpoint and takes a lease. Remote: gRPC with deadline
    /// `choose_timeout`; on timeout / unavailable decides locally with
    /// `policy::select_from_cluster_state` over the last `WatchUsage`
    /// snapshot plus this sidecar's own unregistered local leases
    /// (`Lease::degraded() == true`).
    pub async fn choose(&self, req: &ChooseRequest) -> Result<Lease, RouteError> {
        match &*self.mode {
            Mode::Embedded(e) => e.choose(req).await,
            Mode::Remote(r) => r.choose(req).await,
        }
    }

    /// Latest cluster state (embedded: built now; remote: the last
    /// `WatchUsage` snapshot, or an empty state before the first one).
    pub fn cluster_state(&self) -> Arc<ClusterState> {
        match &*self.mode {
            Mode::Embedded(e) => e.cluster_state(),
            Mode::Remote(r) => r.cluster_state(),
        }
    }

    /// Whether the latest cluster state (`WatchUsage`, at most
    /// `watch_interval` old) shows `endpoint` full for `model`, or one
    /// request short of full: a release there frees a slot another choice
    /// may be waiting for. One short, because the state may not show yet a
    /// lease granted since (another request filling the last slot while
    /// this one ended). Always false for the embedded control plane, whose
    /// releases apply at once.
    pub(crate) fn endpoint_near_limit(&self, endpoint: &str, model: &str) -> bool {
        let Mode::Remote(r) = &*self.mode else {
            return false;
        };
        let state = r.cluster_state();
        state
            .endpoints
            .iter()
            .find(|e| &*e.url == endpoint)
            .and_then(|e| {
                let usage = e.usage.iter().find(|u| &*u.model == model)?;
                Some(usage.in_flight.saturating_add(1) >= policy::model_limit(e.max_concurrent))
            })
            .unwrap_or(false)
    }

    /// Each endpoint's own listing items, for the merged `/api/tags`,
    /// `/api/ps` and `/v1/models` (embedded: the control plane's now; remote:
    /// `ListModelItems`, at most every two seconds, the last answer while the
    /// control plane is unreachable).
    pub async fn model_items(&self) -> Arc<ModelCatalog> {
        match &*self.mode {
            Mode::Embedded(e) => e.model_items(),
            Mode::Remote(r) => r.model_items().await,
        }
    }

    /// Given by each listing what its items lack that its cluster state
    /// lists (`missing`: a fingerprint, `None` for nothing). Remote, the
    /// first time they lack that, makes the next [`Self::model_items`] ask
    /// the control plane again, and says it will. Embedded (or with the
    /// sidecar's own probes), the items are always current: false, and
    /// `missing` is not worked out.
    pub fn expire_items_behind(&self, missing: impl FnOnce() -> Option<u64>) -> bool {
        match &*self.mode {
            Mode::Embedded(_) => false,
            Mode::Remote(r) => r.expire_items_behind(missing),
        }
    }

    /// Has the control plane probe `urls` now, after a model was pulled,
    /// created, copied or deleted on them, and returns once this sidecar's
    /// cluster state includes the result: the change is routable and listed
    /// at once instead of at the next `probe_interval`. The error says why
    /// not (the change then shows at the next probe).
    pub async fn reprobe(&self, urls: &[Arc<str>]) -> Result<(), String> {
        match &*self.mode {
            Mode::Embedded(e) => {
                let urls: Vec<&str> = urls.iter().map(|u| &**u).collect();
                e.control_plane()
                    .reprobe(&urls)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            Mode::Remote(r) => r
                .reprobe(urls)
                .await
                .map_err(|s| format!("Reprobe failed ({:?}): {}", s.code(), s.message())),
        }
    }

    /// Pins the Responses chain continued from response `id` to the
    /// endpoint that produced (and stored) it, so a request with
    /// `previous_response_id: id` — keyed by
    /// [`crate::affinity_key::response_key`] — goes there, through any
    /// sidecar. `model` is the model as the client named it. Remote: waits
    /// for the control plane to take the pin (at most `choose_timeout`),
    /// so the answer reaches the client only after the pin is in place.
    pub async fn pin_response(&self, model: &str, id: &str, choice: &Choice) {
        let key = crate::affinity_key::response_key(model, id);
        match &*self.mode {
            Mode::Embedded(e) => {
                let cp = e.control_plane();
                let record = AffinityRecord::for_choice(key, choice, cp.config().affinity.ttl);
                cp.restore_affinity(&[record], Instant::now());
            }
            Mode::Remote(r) => r.pin(key, model, choice).await,
        }
    }

    /// Whether choices use affinity keys (`conversation_affinity` on; remote:
    /// as the last cluster state said, and yes before the first one). When
    /// off, the proxy does not derive them.
    pub fn uses_affinity_keys(&self) -> bool {
        match &*self.mode {
            Mode::Embedded(e) => e.control_plane().config().affinity.enabled,
            Mode::Remote(r) => r.uses_affinity_keys(),
        }
    }

    /// Whether the last contact with the control plane succeeded (always
    /// true when embedded).
    pub fn control_plane_connected(&self) -> bool {
        match &*self.mode {
            Mode::Embedded(_) => true,
            Mode::Remote(r) => r.control_plane_connected(),
        }
    }

    /// Number of this sidecar's leases not yet released.
    pub fn local_in_flight(&self) -> usize {
        match &*self.mode {
            Mode::Embedded(e) => e.local_in_flight(),
            Mode::Remote(r) => r.local_in_flight(),
        }
    }

    /// Where the cluster state comes from; for `/health` and metrics.
    pub fn state_source(&self) -> StateSource {
        match &*self.mode {
            Mode::Embedded(_) => StateSource::ControlPlane,
            Mode::Remote(r) => r.state_source(),
        }
    }

    /// Leases granted locally (degraded mode) since start; for metrics.
    pub fn degraded_decisions(&self) -> u64 {
        match &*self.mode {
            Mode::Embedded(_) => 0,
            Mode::Remote(r) => r.degraded_decisions(),
        }
    }

    /// Closes the session on shutdown (after in-flight requests finished).
    /// Remote: flushes queued releases, then `CloseSession`; bounded by
    /// `close_timeout`, best effort.
    pub async fn close(&self) {
        match &*self.mode {
            Mode::Embedded(e) => e.close(),
            Mode::Remote(r) => r.close().await,
        }
    }

    /// The embedded control plane (standalone mode), for its metrics.
    pub(crate) fn embedded_control_plane(&self) -> Option<&ControlPlane> {
        match &*self.mode {
            Mode::Embedded(e) => Some(e.control_plane()),
            Mode::Remote(_) => None,
        }
    }

    #[cfg(test)]
    fn embedded_inner(&self) -> Option<&EmbeddedRouter> {
        match &*self.mode {
            Mode::Embedded(e) => Some(e),
            Mode::Remote(_) => None,
        }
    }

    /// Remote: how many lanes have an open `Route` stream.
    #[cfg(test)]
    pub(crate) fn open_route_streams(&self) -> usize {
        self.remote_inner()
            .map_or(0, RemoteRouter::open_route_streams)
    }

    #[cfg(test)]
    fn remote_inner(&self) -> Option<&RemoteRouter> {
        match &*self.mode {
            Mode::Embedded(_) => None,
            Mode::Remote(r) => Some(r),
        }
    }
}
