//! A routing request and the policy's answer.

use std::{fmt, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::{endpoint::EndpointKind, ids::LeaseId, outcome::RequestKind};

/// Why the policy picked the endpoint it picked (machine-readable).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionReason {
    /// The conversation's previous endpoint, still loaded and free.
    Affinity,
    /// Model loaded there and a slot free; least in-flight for the model.
    LoadedFree,
    /// A free slot; the model will be loaded there.
    FreeSlot,
    /// Every candidate saturated; least utilization (request queues).
    Saturated,
}

impl DecisionReason {
    /// All reasons, in a stable order.
    pub const ALL: [DecisionReason; 4] = [
        Self::Affinity,
        Self::LoadedFree,
        Self::FreeSlot,
        Self::Saturated,
    ];

    /// Canonical name for logs, metrics labels and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Affinity => "affinity",
            Self::LoadedFree => "loaded_free",
            Self::FreeSlot => "free_slot",
            Self::Saturated => "saturated",
        }
    }
}

impl fmt::Display for DecisionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request to choose an endpoint, validated (see the gRPC edge).
#[derive(Clone, Debug)]
pub struct ChooseRequest {
    /// Model name as the client sent it (non-empty).
    pub model: String,
    /// Conversation-affinity key, if any.
    pub affinity_key: Option<String>,
    /// The endpoint remembered for the key must be followed (see
    /// [`crate::policy::Remembered::required`]).
    pub affinity_required: bool,
    /// What the request does.
    pub kind: RequestKind,
    /// Endpoint URLs to leave out (already failed for this request).
    pub exclude: Vec<String>,
}

/// The choice for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    /// Endpoint base URL as configured.
    pub endpoint: Arc<str>,
    /// API family of the endpoint.
    pub endpoint_kind: EndpointKind,
    /// Name usage is counted under.
    pub tracking_model: Arc<str>,
    /// Model name to send to the backend (as it advertises it).
    pub backend_model: Arc<str>,
    /// Why this endpoint.
    pub reason: DecisionReason,
    /// The lease taken, if the choice reserved one.
    pub lease: Option<LeaseId>,
    /// The lease took the endpoint's last free slot for the model (or none
    /// was free): its release is one other choices may be waiting for, so
    /// it should reach the control plane without delay.
    pub at_limit: bool,
}

/// Why no endpoint could be chosen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChooseError {
    /// No endpoint advertises the model. Lists the models that do exist so
    /// the client's error can say what is available (no URLs, no secrets).
    #[error("model {model:?} not found; available models: {}", available.join(", "))]
    ModelNotFound {
        /// The model asked for.
        model: String,
        /// Models advertised anywhere in the cluster.
        available: Vec<String>,
    },
    /// Every endpoint advertising the model is excluded for this request
    /// (already failed) or draining; or none advertises it but an endpoint
    /// has never answered a probe, so it may have it.
    #[error("no endpoint available for model {model:?}: {detail}")]
    NoEndpointAvailable {
        /// The model asked for.
        model: String,
        /// What excluded the candidates.
        detail: String,
    },
    /// A reserving choice named a session the control plane does not know.
    #[error("unknown session {0}")]
    UnknownSession(u64),
}
