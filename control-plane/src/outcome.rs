//! What a sidecar reports when a request ends, and what kind of request it was.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// How a request ended, reported on release.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Completed normally.
    Ok,
    /// Connection refused or reset before any response.
    ConnectError,
    /// Backend answered 5xx or broke the stream.
    BackendError,
    /// Client went away, or the sidecar shut down.
    Cancelled,
    /// No connection within the connect timeout.
    ConnectTimeout,
    /// No response byte within the first-byte timeout.
    FirstByteTimeout,
    /// Stream stalled longer than the idle timeout.
    IdleTimeout,
    /// Backend answered 4xx: the request's fault, not the backend's.
    ClientError,
    /// Backend answered that it does not have the model (404 "model not
    /// found"): healthy, but its advertised models are stale. On the wire a
    /// client error with `model_missing` set.
    ModelMissing,
}

impl Outcome {
    /// All outcomes, in a stable order.
    pub const ALL: [Outcome; 9] = [
        Self::Ok,
        Self::ConnectError,
        Self::BackendError,
        Self::Cancelled,
        Self::ConnectTimeout,
        Self::FirstByteTimeout,
        Self::IdleTimeout,
        Self::ClientError,
        Self::ModelMissing,
    ];

    /// Canonical name for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::ConnectError => "connect_error",
            Self::BackendError => "backend_error",
            Self::Cancelled => "cancelled",
            Self::ConnectTimeout => "connect_timeout",
            Self::FirstByteTimeout => "first_byte_timeout",
            Self::IdleTimeout => "idle_timeout",
            Self::ClientError => "client_error",
            Self::ModelMissing => "model_missing",
        }
    }

    /// True when the outcome counts against the backend's health (feeds the
    /// completion-failure cache and the circuit breaker).
    pub fn is_backend_failure(self) -> bool {
        match self {
            Self::ConnectError
            | Self::BackendError
            | Self::ConnectTimeout
            | Self::FirstByteTimeout
            | Self::IdleTimeout => true,
            Self::Ok | Self::Cancelled | Self::ClientError | Self::ModelMissing => false,
        }
    }

    /// True when the control plane stops choosing the endpoint for the
    /// request's model for a while (`completion_failure_ttl`): every
    /// backend failure, and a model the endpoint turned out not to have.
    pub fn excludes_endpoint(self) -> bool {
        self.is_backend_failure() || self == Self::ModelMissing
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An outcome name that is not known.
#[derive(Debug, thiserror::Error)]
#[error("unknown outcome {0:?}")]
pub struct UnknownOutcome(pub String);

impl FromStr for Outcome {
    type Err = UnknownOutcome;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| UnknownOutcome(s.to_owned()))
    }
}

/// Token counts reported with a release.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCounts {
    /// Prompt (input) tokens.
    pub prompt: u64,
    /// Completion (output) tokens.
    pub completion: u64,
}

impl TokenCounts {
    /// The largest count believed for one request (2^32: beyond any
    /// context window by orders of magnitude).
    pub const MAX_PER_REQUEST: u64 = 1 << 32;

    /// These counts with any above [`Self::MAX_PER_REQUEST`] taken as 0:
    /// a broken or hostile reporter cannot pin the cluster's totals.
    pub fn believable(self) -> Self {
        let cap = |n: u64| if n > Self::MAX_PER_REQUEST { 0 } else { n };
        Self {
            prompt: cap(self.prompt),
            completion: cap(self.completion),
        }
    }
}

/// What a routed request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestKind {
    /// Chat completion (`/api/chat`, `/v1/chat/completions`).
    Chat,
    /// Text completion (`/api/generate`, `/v1/completions`).
    Generate,
    /// Embeddings (`/api/embed`, `/api/embeddings`, `/v1/embeddings`).
    Embed,
    /// Model metadata (`/api/show`).
    Show,
    /// Reranking documents against a query (`/v1/rerank`, `/rerank`).
    Rerank,
    /// Counting a prompt's tokens (`/v1/messages/count_tokens`).
    CountTokens,
}

impl RequestKind {
    /// Canonical name for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Generate => "generate",
            Self::Embed => "embed",
            Self::Show => "show",
            Self::Rerank => "rerank",
            Self::CountTokens => "count_tokens",
        }
    }
}

impl fmt::Display for RequestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_names_round_trip() {
        for o in Outcome::ALL {
            assert_eq!(o.as_str().parse::<Outcome>().ok(), Some(o));
        }
        assert!("fine".parse::<Outcome>().is_err());
    }
}
