//! An in-process cluster: N fake model servers, one control plane serving
//! real gRPC on `127.0.0.1:0`, and M sidecars in remote mode (each with its
//! own gRPC session) — or one standalone sidecar with the control plane
//! embedded.
//!
//! ```no_run
//! # async fn demo() {
//! use switchyard_system_tests::{Cluster, FakeConfig, FakeMode, BackendOptions};
//! let cluster = Cluster::builder()
//!     .backend_with(
//!         FakeConfig::new(FakeMode::Ollama).models(&["m:latest"]).all_loaded(),
//!         BackendOptions::max_concurrent(2),
//!     )
//!     .sidecars(3)
//!     .start()
//!     .await; // returns once every sidecar sees every backend healthy
//! let url = cluster.url(1); // second sidecar, e.g. http://127.0.0.1:40123
//! # let _ = url;
//! cluster.wait_usage(0).await; // control plane's in-flight sum back to 0
//! # }
//! ```
//!
//! Invariants: the config every component gets is the same [`TestConfig`]
//! (so sidecars know the backend keys and the router key); `start` returns
//! only when discovery has seen every running fake and every remote sidecar
//! has a session and a `WatchUsage` snapshot (unless `no_wait`); usage is
//! read from the authoritative control plane.

use std::{sync::Arc, time::Duration};

use switchyard_control_plane::{
    cluster::ClusterState, endpoint::EndpointKind, server::RunningControlPlane,
};
use switchyard_sidecar::SidecarHandle;
use switchyard_tests::fake_backend::{FakeBackend, FakeConfig, FakeMode};

use crate::{
    SOON,
    config::{EndpointEntry, TestConfig},
    wait::{wait_for, wait_until},
};

/// A fake Ollama advertising `models`, all loaded.
pub fn ollama_fake(models: &[&str]) -> FakeConfig {
    FakeConfig::new(FakeMode::Ollama)
        .models(models)
        .all_loaded()
}

/// A fake OpenAI-compatible server advertising `models`.
pub fn openai_fake(models: &[&str]) -> FakeConfig {
    FakeConfig::new(FakeMode::OpenAi)
        .models(models)
        .all_loaded()
}

/// Per-backend config entries.
#[derive(Clone, Debug, Default)]
pub struct BackendOptions {
    /// `endpoint_config.<url>.max_concurrent_connections`.
    pub max_concurrent: Option<u32>,
    /// `api_keys.<url>`: the key the router sends to this backend.
    pub api_key: Option<String>,
}

impl BackendOptions {
    /// Only a concurrency limit.
    pub fn max_concurrent(n: u32) -> Self {
        BackendOptions {
            max_concurrent: Some(n),
            api_key: None,
        }
    }

    /// Only a backend API key entry.
    pub fn api_key(key: &str) -> Self {
        BackendOptions {
            max_concurrent: None,
            api_key: Some(key.to_owned()),
        }
    }
}

/// When set, clusters of one remote sidecar run standalone instead (to tell
/// proxy bugs from control-plane/gRPC bugs while debugging).
pub const FORCE_STANDALONE_ENV: &str = "SWITCHYARD_SYSTEM_STANDALONE";

/// How sidecars reach the control plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SidecarMode {
    /// One in-process control plane over gRPC, this many sidecars.
    Remote(usize),
    /// One sidecar with the control plane embedded.
    Standalone,
}

/// Builds a [`Cluster`].
#[derive(Debug)]
pub struct ClusterBuilder {
    backends: Vec<(FakeConfig, BackendOptions)>,
    mode: SidecarMode,
    config: TestConfig,
    extra: Vec<EndpointEntry>,
    wait_ready: bool,
}

/// The config URL of a fake: OpenAI-compatible fakes are configured with
/// their `/v1` base (the kind is decided by the URL, as in nomyo-router).
pub fn endpoint_url(fake: &FakeBackend) -> String {
    match fake.mode() {
        FakeMode::Ollama | FakeMode::LlamaServer => fake.url(),
        FakeMode::OpenAi => format!("{}/v1", fake.url()),
    }
}

/// The endpoint kind a fake's mode is configured as.
pub fn endpoint_kind(mode: FakeMode) -> EndpointKind {
    match mode {
        FakeMode::Ollama => EndpointKind::Ollama,
        FakeMode::OpenAi => EndpointKind::OpenAi,
        FakeMode::LlamaServer => EndpointKind::LlamaServer,
    }
}

impl ClusterBuilder {
    /// Adds a fake backend with no per-endpoint config entries.
    pub fn backend(self, fake: FakeConfig) -> Self {
        self.backend_with(fake, BackendOptions::default())
    }

    /// Adds a fake backend with per-endpoint config entries.
    pub fn backend_with(mut self, fake: FakeConfig, options: BackendOptions) -> Self {
        self.backends.push((fake, options));
        self
    }

    /// Adds an endpoint not backed by a fake (e.g. a closed port), after
    /// the fakes in config order.
    pub fn extra_endpoint(mut self, entry: EndpointEntry) -> Self {
        self.extra.push(entry);
        self
    }

    /// `n` sidecars in remote mode (default 1).
    pub fn sidecars(mut self, n: usize) -> Self {
        self.mode = SidecarMode::Remote(n);
        self
    }

    /// One standalone sidecar, no separate control plane.
    pub fn standalone(mut self) -> Self {
        self.mode = SidecarMode::Standalone;
        self
    }

    /// [`ClusterBuilder::standalone`] when `standalone`, else as it is
    /// (for tests that run both ways).
    pub fn standalone_if(self, standalone: bool) -> Self {
        if standalone { self.standalone() } else { self }
    }

    /// Sets a top-level config key (YAML value).
    pub fn set(mut self, key: &str, yaml_value: &str) -> Self {
        self.config.set(key, yaml_value);
        self
    }

    /// Sets `router_api_key`.
    pub fn router_api_key(self, key: &str) -> Self {
        let v = serde_json::Value::from(key).to_string();
        self.set("router_api_key", &v)
    }

    /// Do not wait for discovery in [`ClusterBuilder::start`] (for clusters
    /// whose backends are meant to be down).
    pub fn no_wait(mut self) -> Self {
        self.wait_ready = false;
        self
    }

    /// Starts the fakes, then the control plane and sidecars with one
    /// config, then waits until the cluster is ready (see the module docs).
    pub async fn start(self) -> Cluster {
        let mut backends = Vec::new();
        let mut config = self.config;
        for (fake, options) in self.backends {
            let backend = FakeBackend::start(fake).await;
            config.endpoint(EndpointEntry {
                url: endpoint_url(&backend),
                kind: endpoint_kind(backend.mode()),
                max_concurrent: options.max_concurrent,
                api_key: options.api_key,
            });
            backends.push(backend);
        }
        for entry in self.extra {
            config.endpoint(entry);
        }
        let mode = match self.mode {
            SidecarMode::Remote(1) if std::env::var_os(FORCE_STANDALONE_ENV).is_some() => {
                SidecarMode::Standalone
            }
            other => other,
        };
        let (control_plane, sidecars) = match mode {
            SidecarMode::Standalone => {
                let sidecar = switchyard_sidecar::start_standalone(config.build(), loopback())
                    .await
                    .unwrap_or_else(|e| panic!("standalone sidecar failed to start: {e}"));
                (None, vec![sidecar])
            }
            SidecarMode::Remote(n) => {
                let cp = RunningControlPlane::start(config.build())
                    .await
                    .unwrap_or_else(|e| panic!("control plane failed to start: {e}"));
                let mut sidecars = Vec::new();
                for _ in 0..n {
                    let sidecar = switchyard_sidecar::start_remote(
                        cp.url(),
                        Some(config.build()),
                        loopback(),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("remote sidecar failed to start: {e}"));
                    sidecars.push(sidecar);
                }
                (Some(cp), sidecars)
            }
        };
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap_or_else(|e| panic!("cannot build the test HTTP client: {e}"));
        let cluster = Cluster {
            backends,
            control_plane,
            sidecars,
            config,
            http,
        };
        if self.wait_ready {
            cluster.wait_ready().await;
        }
        cluster
    }
}

fn loopback() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A running cluster. Dropping it stops everything (the control plane and
/// fakes cancel on drop; sidecar tasks end with the test's runtime); call
/// [`Cluster::shutdown`] for an orderly stop.
pub struct Cluster {
    /// The fakes, in config order.
    pub backends: Vec<FakeBackend>,
    /// The control plane (remote mode only).
    pub control_plane: Option<RunningControlPlane>,
    /// The sidecars.
    pub sidecars: Vec<SidecarHandle>,
    /// The config every component got.
    pub config: TestConfig,
    http: reqwest::Client,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("backends", &self.backends)
            .field("sidecars", &self.sidecars)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// A builder: no backends, one remote sidecar, [`TestConfig::new`].
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            backends: Vec::new(),
            mode: SidecarMode::Remote(1),
            config: TestConfig::new(),
            extra: Vec::new(),
            wait_ready: true,
        }
    }

    /// Base URL of sidecar `i`, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self, i: usize) -> String {
        let sidecar = self
            .sidecars
            .get(i)
            .unwrap_or_else(|| panic!("no sidecar {i}: the cluster has {}", self.sidecars.len()));
        format!("http://{}", sidecar.addr)
    }

    /// `url(0) + path`.
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url(0))
    }

    /// Fake `i`.
    pub fn backend(&self, i: usize) -> &FakeBackend {
        self.backends
            .get(i)
            .unwrap_or_else(|| panic!("no backend {i}: the cluster has {}", self.backends.len()))
    }

    /// The config URL of fake `i` (the endpoint's identity in cluster state).
    pub fn endpoint_url(&self, i: usize) -> String {
        endpoint_url(self.backend(i))
    }

    /// A shared HTTP client that ignores proxy environment variables.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The authoritative cluster state: the control plane's (remote mode)
    /// or the embedded one's (standalone).
    pub fn state(&self) -> Arc<ClusterState> {
        match (&self.control_plane, self.sidecars.first()) {
            (Some(cp), _) => cp.cp.state(),
            (None, Some(sidecar)) => sidecar.router().cluster_state(),
            (None, None) => panic!("cluster has neither a control plane nor a sidecar"),
        }
    }

    /// Cluster usage: in-flight requests summed over every endpoint, as the
    /// control plane counts them.
    pub fn usage(&self) -> u64 {
        self.state().total_in_flight()
    }

    /// `(in-flight sum, leases held)` from the control plane.
    pub fn usage_and_leases(&self) -> (u64, u32) {
        let s = self.state();
        (s.total_in_flight(), s.leases)
    }

    /// Waits until the in-flight sum is `n` (and, for `n == 0`, no lease is
    /// held either); panics with the last values after [`SOON`].
    pub async fn wait_usage(&self, n: u64) {
        wait_for(
            &format!("cluster usage (in-flight, leases) to reach {n}"),
            SOON,
            || self.usage_and_leases(),
            |(in_flight, leases)| *in_flight == n && (n != 0 || *leases == 0),
        )
        .await;
    }

    /// Waits until every running fake that advertises models is healthy
    /// with its models advertised, in the control plane's view and in every
    /// sidecar's view, and every remote sidecar has a session.
    pub async fn wait_ready(&self) {
        let expected: Vec<(String, usize)> = self
            .backends
            .iter()
            .filter(|b| b.is_running())
            .map(|b| (endpoint_url(b), b.models().len()))
            .collect();
        let ready = |state: &ClusterState| {
            expected.iter().all(|(url, models)| {
                state.endpoints.iter().any(|e| {
                    &*e.url == url.as_str() && e.healthy && e.advertised_models.len() >= *models
                })
            })
        };
        wait_until(
            "control plane to see every fake healthy with its models",
            SOON,
            || ready(&self.state()),
        )
        .await;
        if self.control_plane.is_some() {
            let n = self.sidecars.len() as u32;
            wait_for(
                "every sidecar to open a session",
                SOON,
                || self.state().sessions,
                |s| *s >= n,
            )
            .await;
            for (i, sidecar) in self.sidecars.iter().enumerate() {
                wait_until(
                    &format!(
                        "sidecar {i} to receive a WatchUsage snapshot with every fake healthy"
                    ),
                    SOON,
                    || ready(&sidecar.router().cluster_state()),
                )
                .await;
            }
        }
    }

    /// Waits until the control plane says endpoint `i` is (un)healthy.
    pub async fn wait_healthy(&self, i: usize, healthy: bool) {
        let url = self.endpoint_url(i);
        wait_for(
            &format!("endpoint {url} healthy == {healthy}"),
            SOON,
            || {
                self.state()
                    .endpoints
                    .iter()
                    .find(|e| *e.url == *url)
                    .map(|e| (e.healthy, e.health_detail.clone()))
            },
            |v| v.as_ref().is_some_and(|(h, _)| *h == healthy),
        )
        .await;
        // Remote sidecars answer /health and listings from their snapshot.
        for (n, sidecar) in self.sidecars.iter().enumerate() {
            wait_until(
                &format!("sidecar {n} to see endpoint {url} healthy == {healthy}"),
                SOON,
                || {
                    sidecar
                        .router()
                        .cluster_state()
                        .endpoints
                        .iter()
                        .any(|e| *e.url == *url && e.healthy == healthy)
                },
            )
            .await;
        }
    }

    /// Stops sidecars (gracefully), then the control plane.
    pub async fn shutdown(self) {
        let grace = Duration::from_secs(15);
        for sidecar in self.sidecars {
            crate::wait::within("sidecar shutdown", grace, sidecar.shutdown()).await;
        }
        if let Some(cp) = self.control_plane {
            let r = crate::wait::within("control plane shutdown", grace, cp.shutdown()).await;
            if let Err(e) = r {
                panic!("control plane shutdown failed: {e}");
            }
        }
    }
}

/// The cluster state of the control plane at `url` (`http://ADDR`) over
/// gRPC `Cluster.GetState` — for control planes running as child
/// processes ([`crate::process::ChildProcess::control_plane`]).
pub async fn grpc_cluster_state(url: &str) -> Result<ClusterState, String> {
    use switchyard_proto::v1::{GetStateRequest, cluster_client::ClusterClient};
    let mut client = ClusterClient::connect(url.to_owned())
        .await
        .map_err(|e| format!("cannot connect to {url}: {e}"))?;
    let state = client
        .get_state(GetStateRequest {})
        .await
        .map_err(|e| format!("GetState on {url} failed: {e}"))?
        .into_inner();
    ClusterState::try_from(state).map_err(|e| format!("bad GetState answer from {url}: {e}"))
}

/// Waits until the control plane at `url` reports `n` in flight over the
/// cluster (and no lease held when `n == 0`); panics with the last answer.
pub async fn wait_grpc_usage(url: &str, n: u64) {
    let _reached = crate::wait::wait_for_async(
        &format!("usage of the control plane at {url} to reach {n}"),
        SOON,
        || async {
            grpc_cluster_state(url)
                .await
                .map(|s| (s.total_in_flight(), s.leases))
        },
        |r| matches!(r, Ok((f, l)) if *f == n && (n != 0 || *l == 0)),
    )
    .await;
}
