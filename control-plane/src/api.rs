//! Plain data passed into and out of the [`ControlPlane`] facade that is not
//! a choice: probe reports, lease records, session and affinity listings.
//! Shared by the gRPC edge, the discovery probes and the embedded
//! (standalone) sidecar.
//!
//! [`ControlPlane`]: crate::control_plane::ControlPlane

use std::{sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

use crate::ids::{LeaseId, SessionId};

/// An endpoint's own listing items, each the JSON object text of one item
/// as the backend sent it, so the sidecar's merged listings show them
/// instead of placeholders: an Ollama endpoint's `/api/tags` and `/api/ps`
/// items (size, digest, modified_at, details, expires_at, size_vram, ...
/// and whatever newer builds add), an OpenAI-style or llama-server
/// endpoint's `{base}/models` `data` items (created, owned_by, vLLM's
/// max_model_len, llama-server's status, ...). The lists of the other
/// kind are empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelItems {
    /// `/api/tags` items, in the backend's order, one per model name
    /// (Ollama endpoints only).
    pub tags: Vec<Arc<str>>,
    /// `/api/ps` items, in the backend's order, one per model name
    /// (Ollama endpoints only).
    pub ps: Vec<Arc<str>>,
    /// `{base}/models` `data` items, in the backend's order, one per model
    /// id (OpenAI-style and llama-server endpoints only).
    pub models: Vec<Arc<str>>,
}

/// What one discovery probe round found for one endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeReport {
    /// The endpoint answered.
    Ok {
        /// Models it advertises, as it names them.
        advertised: Vec<String>,
        /// Models it has loaded, as it names them.
        loaded: Vec<String>,
        /// The listing items themselves.
        items: ModelItems,
    },
    /// The endpoint did not answer, or answered an error.
    Failed {
        /// What went wrong (no secrets).
        detail: String,
    },
}

/// A lease a sidecar holds and asks the control plane to count.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Lease id as the sidecar knows it.
    pub lease: LeaseId,
    /// Endpoint base URL.
    pub endpoint: Arc<str>,
    /// Tracking model name.
    pub tracking_model: Arc<str>,
}

/// A conversation-affinity entry a sidecar remembers from its own choices,
/// offered to a control plane that may have lost its table (restart).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AffinityRecord {
    /// The conversation key.
    pub key: Arc<str>,
    /// Endpoint base URL the conversation last went to.
    pub endpoint: Arc<str>,
    /// Tracking model name.
    pub tracking_model: Arc<str>,
    /// Remaining lifetime as the sidecar sees it.
    pub expires_in: Duration,
}

impl AffinityRecord {
    /// Conversation `key` on `choice`'s endpoint and model, for `expires_in`.
    pub fn for_choice(key: String, choice: &crate::decision::Choice, expires_in: Duration) -> Self {
        Self {
            key: Arc::from(key),
            endpoint: choice.endpoint.clone(),
            tracking_model: choice.tracking_model.clone(),
            expires_in,
        }
    }
}

/// What opening a session grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionGrant {
    /// The new session.
    pub id: SessionId,
    /// Lifetime without keep-alive.
    pub ttl: Duration,
    /// Keep-alive period to use.
    pub keepalive_interval: Duration,
}

/// Result of re-registering leases.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegisterOutcome {
    /// Leases now counted (new or already known).
    pub registered: usize,
    /// Leases refused: endpoint not configured.
    pub rejected: usize,
    /// Affinity entries taken into the table.
    pub affinity_restored: usize,
}

/// One session, for listings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Session id.
    pub id: SessionId,
    /// Sidecar name given at open.
    pub name: String,
    /// Leases held.
    pub leases: u32,
    /// Time since the last keep-alive.
    pub since_keepalive: Duration,
    /// Time until expiry without keep-alive.
    pub expires_in: Duration,
}

/// One affinity entry, for listings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AffinityEntryInfo {
    /// Conversation key.
    pub key: String,
    /// Endpoint URL it is bound to.
    pub endpoint: Arc<str>,
    /// Tracking model.
    pub model: Arc<str>,
    /// Time until the entry expires.
    pub expires_in: Duration,
}

/// Why [`crate::control_plane::ControlPlane::reprobe`] failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReprobeError {
    /// An endpoint given is not configured.
    #[error(transparent)]
    UnknownEndpoint(#[from] UnknownEndpoint),
    /// No fresh probe was applied in time (the endpoint hangs past its
    /// probe timeout, or no discovery runs).
    #[error("no fresh probe applied within {0:?}")]
    TimedOut(std::time::Duration),
}

/// Why a drain or undrain failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The endpoint is not configured.
    #[error(transparent)]
    UnknownEndpoint(#[from] UnknownEndpoint),
    /// The change took effect, but the state file could not be written:
    /// it will not survive a restart.
    #[error(
        "endpoint {url} is {} now, but the change was not saved and will not survive a \
         control-plane restart: {source}",
        if *.draining { "draining" } else { "in service" }
    )]
    NotSaved {
        /// The endpoint.
        url: String,
        /// Its admin state now.
        draining: bool,
        /// Why saving failed.
        #[source]
        source: crate::admin_file::AdminFileError,
    },
}

/// An admin call named an endpoint that is not configured (or, shown
/// without credentials, more than one).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown endpoint {url:?}{}; configured endpoints: {}", why.as_deref().map(|w| format!(" ({w})")).unwrap_or_default(), configured.join(", "))]
pub struct UnknownEndpoint {
    /// The URL given (without credentials).
    pub url: String,
    /// Why a URL that looks configured did not name one endpoint.
    pub why: Option<String>,
    /// Configured endpoint URLs (without credentials).
    pub configured: Vec<String>,
}
