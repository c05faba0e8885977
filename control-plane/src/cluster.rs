//! The published view of the cluster: what `WatchUsage` streams, what the
//! CLI shows, and what a sidecar's degraded mode routes on. Immutable once
//! built; shared as `Arc<ClusterState>`.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::endpoint::EndpointKind;

/// In-flight and token counts of one model on one endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelUsage {
    /// Tracking model name.
    pub model: Arc<str>,
    /// Requests in flight now.
    pub in_flight: u32,
    /// Prompt tokens reported on release, cumulative.
    pub prompt_tokens: u64,
    /// Completion tokens reported on release, cumulative.
    pub completion_tokens: u64,
    /// Requests released, cumulative.
    pub requests: u64,
}

/// Everything known about one endpoint at one moment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointState {
    /// Base URL as configured (the endpoint's identity).
    pub url: Arc<str>,
    /// API family.
    pub kind: EndpointKind,
    /// Position in the configuration (0 first; priority order).
    pub priority: u32,
    /// Concurrent-request limit per model on this endpoint.
    pub max_concurrent: u32,
    /// Last probe succeeded.
    pub healthy: bool,
    /// Why unhealthy; empty when healthy.
    pub health_detail: String,
    /// Draining endpoints receive no new work.
    pub draining: bool,
    /// Models advertised, as the endpoint names them.
    pub advertised_models: Vec<Arc<str>>,
    /// Models loaded, as the endpoint names them.
    pub loaded_models: Vec<Arc<str>>,
    /// Usage per tracking model.
    pub usage: Vec<ModelUsage>,
    /// In-flight requests over all models.
    pub in_flight: u32,
    /// Tracking models whose completions failed here recently, or which
    /// the endpoint recently answered it does not have.
    pub failing_models: Vec<Arc<str>>,
    /// The subset of `failing_models` avoided because the endpoint answered
    /// it does not have them (the others failed completions).
    pub missing_models: Vec<Arc<str>>,
    /// Circuit breaker open: recent consecutive failures.
    pub circuit_open: bool,
    /// Circuit breaker half-open: its open period is over and one trial
    /// request may go (or is in flight; then `circuit_open` too) to decide
    /// between closing it and opening it again.
    pub circuit_half_open: bool,
    /// Unix milliseconds of the last successful probe; 0 if never.
    pub last_probe_ok_unix_ms: u64,
    /// The server version the endpoint reported, as it sent it (an Ollama
    /// endpoint's `GET /api/version`, asked in every probe round; the last
    /// answer is kept when that call fails). Empty when unknown: not an
    /// Ollama endpoint, not probed yet, or it never answered that call.
    pub version: String,
}

/// An endpoint's `health_detail` before its first probe.
pub const NOT_PROBED: &str = "not probed yet";

impl EndpointState {
    /// An endpoint that nothing is known of yet: not probed (so not
    /// healthy), no models, nothing in flight, limit 1, version unknown. Fixtures fill in
    /// what they need with struct update syntax.
    pub fn new(url: &str, kind: EndpointKind) -> Self {
        Self {
            url: Arc::from(url),
            kind,
            priority: 0,
            max_concurrent: 1,
            healthy: false,
            health_detail: NOT_PROBED.to_owned(),
            draining: false,
            advertised_models: Vec::new(),
            loaded_models: Vec::new(),
            usage: Vec::new(),
            in_flight: 0,
            failing_models: Vec::new(),
            missing_models: Vec::new(),
            circuit_open: false,
            circuit_half_open: false,
            last_probe_ok_unix_ms: 0,
            version: String::new(),
        }
    }
}

/// The whole cluster at one version.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Increases with every published change.
    pub version: u64,
    /// Endpoints in configuration order.
    pub endpoints: Vec<EndpointState>,
    /// Live sidecar sessions.
    pub sessions: u32,
    /// Leases held across all sessions.
    pub leases: u32,
    /// Conversation-affinity entries held.
    pub affinity_entries: u32,
    /// `priority_routing` from the configuration.
    pub priority_routing: bool,
    /// `conversation_affinity` from the configuration.
    pub conversation_affinity: bool,
}

impl ClusterState {
    /// In-flight requests over the whole cluster.
    pub fn total_in_flight(&self) -> u64 {
        self.endpoints.iter().map(|e| u64::from(e.in_flight)).sum()
    }

    /// True when at least one endpoint's last probe succeeded.
    pub fn any_healthy(&self) -> bool {
        self.endpoints.iter().any(|e| e.healthy)
    }
}
