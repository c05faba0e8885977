//! The one place every sidecar error becomes an HTTP status and a body in
//! the client's API format.
//!
//! Invariants:
//! - [`ProxyError::status`] is one exhaustive match: adding a variant does
//!   not compile until its status is decided.
//! - Ollama clients get `{"error":"text"}`; OpenAI clients get
//!   `{"error":{"message","type","param","code"}}`. Never an empty body,
//!   never a 200.
//! - Messages never carry backend URLs or secrets: the client sees model
//!   names and what went wrong; operators find the endpoint in the logs.
//!   The one exception is model management ([`crate::manage`]), an
//!   operator's action on every backend at once: its errors name each
//!   failed endpoint by URL without credentials (as `switchyard endpoints`
//!   shows it), since "failed somewhere" would not tell what to fix.

use axum::{
    Json,
    extract::rejection::PathRejection,
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use http::StatusCode;
use serde_json::Value;
use switchyard_control_plane::{decision::ChooseError, outcome::Outcome};

use crate::{
    router::RouteError,
    routes::ApiFormat,
    translate::{
        TranslateError, UpstreamError,
        error::{anthropic_error, openai_error_type},
        ollama_error, openai_error,
    },
};

/// Most model names listed in a "model not found" message.
const MAX_LISTED_MODELS: usize = 50;

/// Why one attempt on one endpoint failed before anything reached the
/// client (the proxy may retry elsewhere).
#[derive(Clone, Debug)]
pub enum AttemptFailure {
    /// No usable response: refused, reset, or a timeout.
    Transport {
        /// How the lease was released (connect error or a timeout).
        outcome: Outcome,
        /// What happened, without the endpoint URL.
        detail: String,
    },
    /// The backend answered an error status, or an error object as the
    /// first thing in a 2xx body.
    Upstream {
        /// How the lease was released.
        outcome: Outcome,
        /// The backend's error, normalized.
        error: UpstreamError,
    },
}

impl AttemptFailure {
    /// The outcome the failed attempt's lease was released with.
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::Transport { outcome, .. } | Self::Upstream { outcome, .. } => *outcome,
        }
    }
}

impl std::fmt::Display for AttemptFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Transport { outcome, detail } => write!(f, "{outcome}: {detail}"),
            Self::Upstream { error, .. } => write!(
                f,
                "backend answered {}: {}",
                error.status.as_u16(),
                error.message
            ),
        }
    }
}

/// Every way a request can fail in the sidecar.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A router key is configured and the request carries none.
    #[error("missing API key: send `Authorization: Bearer <key>`")]
    MissingApiKey,
    /// The request's key does not match the router key.
    #[error("invalid API key")]
    WrongApiKey,
    /// The body is larger than `max_body_bytes`.
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// The body could not be read (client went away, bad framing).
    #[error("cannot read request body: {0}")]
    BodyRead(String),
    /// The body is not valid JSON.
    #[error("invalid JSON in request body: {0}")]
    InvalidJson(String),
    /// The body is JSON but not an object.
    #[error("request body must be a JSON object")]
    NotAnObject,
    /// No `model` in the body.
    #[error("missing `model` in request body")]
    MissingModel,
    /// A required body field other than `model` is missing.
    #[error("missing `{field}` in request body")]
    MissingField {
        /// The field.
        field: &'static str,
    },
    /// A field has the wrong type or value.
    #[error("invalid `{field}`: {problem}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// What is wrong.
        problem: &'static str,
    },
    /// No endpoint advertises the model.
    #[error(
        "model '{model}' not found; available models: {}",
        list_models(available)
    )]
    ModelNotFound {
        /// The model asked for.
        model: String,
        /// Models advertised in the cluster.
        available: Vec<String>,
    },
    /// Every endpoint with the model is excluded, draining or failed; or
    /// none has it but one was never reached (it may have it).
    #[error("no backend available for model '{model}': {detail}")]
    NoEndpointAvailable {
        /// The model asked for.
        model: String,
        /// Why (no URLs).
        detail: String,
    },
    /// Model management: no Ollama endpoint advertises the model.
    #[error("model '{model}' not found")]
    ManagedModelNotFound {
        /// The model asked for.
        model: String,
    },
    /// Model management: no Ollama endpoint to pull or create on (none
    /// configured, or every one failing its probes: `detail` names them).
    #[error("{detail}")]
    NoOllamaEndpoint {
        /// What is missing, naming the down endpoints.
        detail: String,
    },
    /// Model management: the operation failed on some endpoints; `status`
    /// is the first failure's (the backend's own, or 502 when unreachable).
    #[error("{message}")]
    FanOutFailed {
        /// The status to answer.
        status: StatusCode,
        /// Every failed endpoint and why.
        message: String,
    },
    /// Stored responses: the id in the path is empty, too long, or has
    /// characters other than `[A-Za-z0-9_-]`.
    #[error("invalid response id: {0}")]
    InvalidResponseId(String),
    /// Stored responses: `GET /v1/responses/{id}?stream=true` (replaying a
    /// stored response as events) is not supported.
    #[error(
        "streaming a stored response (`stream=true`) is not supported by this router; retrieve it without `stream`"
    )]
    StoredResponseStreamUnsupported,
    /// Stored responses: every backend asked answered 404.
    #[error("No response found with id '{id}'.")]
    ResponseNotFound {
        /// The response id asked for.
        id: String,
    },
    /// Stored responses: no backend gave an answer (all unreachable or
    /// failing, or none to ask); `status` is 502 or 503.
    #[error("no backend could be asked for response '{id}': {detail}")]
    StoredResponseUnavailable {
        /// The status to answer.
        status: StatusCode,
        /// The response id asked for.
        id: String,
        /// What happened (counts, no URLs).
        detail: String,
    },
    /// The control plane is unreachable and no cluster state is known yet.
    #[error("control plane unreachable and no cluster state known yet")]
    NoClusterState,
    /// The control plane refused the choice for an internal reason
    /// (unknown session while re-registering).
    #[error("control plane error: {0}")]
    ControlPlane(String),
    /// The backend answered an error the client should see (4xx passed
    /// through, or a non-retryable 5xx).
    #[error("{0}")]
    Upstream(UpstreamError),
    /// Every attempt failed before anything reached the client.
    #[error("all {attempts} attempt(s) failed; last: {last}")]
    AttemptsFailed {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: AttemptFailure,
    },
    /// The request or the backend's answer could not be translated.
    #[error(transparent)]
    Translate(#[from] TranslateError),
    /// The sidecar is shutting down and cancelled the request.
    #[error("sidecar is shutting down")]
    ShuttingDown,
    /// No such route.
    #[error("route not found")]
    UnknownRoute,

    /// A path parameter that cannot be read (not UTF-8 once
    /// percent-decoded).
    #[error("invalid URL path: {0}")]
    InvalidPath(String),
    /// The route exists with another method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A browser request from an origin `allowed_origins` does not list.
    #[error("origin '{origin}' is not allowed (add it to allowed_origins)")]
    OriginNotAllowed {
        /// The request's `Origin` header.
        origin: String,
    },
    /// A bug: a panic in a handler, an impossible state.
    #[error("internal error: {0}")]
    Internal(String),
}

fn list_models(models: &[String]) -> String {
    if models.is_empty() {
        return "(none)".to_owned();
    }
    let mut out = models
        .iter()
        .take(MAX_LISTED_MODELS)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if models.len() > MAX_LISTED_MODELS {
        out.push_str(&format!(", … ({} more)", models.len() - MAX_LISTED_MODELS));
    }
    out
}

/// A path parameter that cannot be read (not UTF-8 once percent-decoded):
/// a 400 in the client's format instead of axum's plain-text rejection.
impl From<PathRejection> for ProxyError {
    fn from(e: PathRejection) -> Self {
        Self::InvalidPath(e.body_text())
    }
}

impl From<RouteError> for ProxyError {
    fn from(e: RouteError) -> Self {
        match e {
            RouteError::Choose(ChooseError::ModelNotFound { model, available }) => {
                Self::ModelNotFound { model, available }
            }
            RouteError::Choose(ChooseError::NoEndpointAvailable { model, detail }) => {
                Self::NoEndpointAvailable { model, detail }
            }
            RouteError::Choose(e @ ChooseError::UnknownSession(_)) => {
                Self::ControlPlane(e.to_string())
            }
            RouteError::NoState => Self::NoClusterState,
        }
    }
}

impl ProxyError {
    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingApiKey => StatusCode::UNAUTHORIZED,
            Self::WrongApiKey => StatusCode::FORBIDDEN,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyRead(_)
            | Self::InvalidJson(_)
            | Self::NotAnObject
            | Self::MissingModel
            | Self::MissingField { .. }
            | Self::InvalidField { .. }
            | Self::InvalidResponseId(_)
            | Self::InvalidPath(_)
            | Self::StoredResponseStreamUnsupported => StatusCode::BAD_REQUEST,
            Self::ModelNotFound { .. }
            | Self::ManagedModelNotFound { .. }
            | Self::ResponseNotFound { .. }
            | Self::UnknownRoute => StatusCode::NOT_FOUND,
            Self::StoredResponseUnavailable { status, .. } => *status,
            Self::NoOllamaEndpoint { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::FanOutFailed { status, .. } => *status,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::OriginNotAllowed { .. } => StatusCode::FORBIDDEN,
            Self::NoEndpointAvailable { .. }
            | Self::NoClusterState
            | Self::ControlPlane(_)
            | Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Upstream(e) => e.ollama_status(),
            Self::AttemptsFailed { last, .. } => match last {
                AttemptFailure::Transport { outcome, .. } => match outcome {
                    // No backend could even be reached: the service is
                    // unavailable (as /health says), not a bad gateway.
                    Outcome::ConnectError | Outcome::ConnectTimeout => {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                    Outcome::FirstByteTimeout | Outcome::IdleTimeout => StatusCode::GATEWAY_TIMEOUT,
                    Outcome::Ok
                    | Outcome::BackendError
                    | Outcome::Cancelled
                    | Outcome::ClientError
                    | Outcome::ModelMissing => StatusCode::BAD_GATEWAY,
                },
                AttemptFailure::Upstream { error, .. } => error.ollama_status(),
            },
            Self::Translate(e) => e.ollama_status(),
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI `(type, param, code)` for this error.
    fn openai_fields(&self) -> (&'static str, Option<&'static str>, Option<&'static str>) {
        match self {
            Self::MissingApiKey | Self::WrongApiKey => {
                ("invalid_request_error", None, Some("invalid_api_key"))
            }
            Self::MissingModel => ("invalid_request_error", Some("model"), None),
            Self::InvalidField { field, .. } => ("invalid_request_error", Some(field), None),
            Self::InvalidResponseId(_) => ("invalid_request_error", Some("response_id"), None),
            Self::StoredResponseStreamUnsupported => {
                ("invalid_request_error", Some("stream"), None)
            }
            // As OpenAI answers an unknown response id.
            Self::ResponseNotFound { .. } => ("invalid_request_error", None, Some("not_found")),
            Self::ModelNotFound { .. } => (
                "invalid_request_error",
                Some("model"),
                Some("model_not_found"),
            ),
            Self::BodyTooLarge { .. }
            | Self::BodyRead(_)
            | Self::InvalidJson(_)
            | Self::NotAnObject
            | Self::MissingField { .. }
            | Self::ManagedModelNotFound { .. }
            | Self::NoOllamaEndpoint { .. }
            | Self::FanOutFailed { .. }
            | Self::StoredResponseUnavailable { .. }
            | Self::NoEndpointAvailable { .. }
            | Self::NoClusterState
            | Self::ControlPlane(_)
            | Self::Upstream(_)
            | Self::AttemptsFailed { .. }
            | Self::Translate(_)
            | Self::ShuttingDown
            | Self::UnknownRoute
            | Self::InvalidPath(_)
            | Self::MethodNotAllowed
            | Self::OriginNotAllowed { .. }
            | Self::Internal(_) => (openai_error_type(self.status()), None, None),
        }
    }

    /// Status and body in the client's format.
    pub fn to_body(&self, format: ApiFormat) -> (StatusCode, Value) {
        // Backend errors keep their own type/code when we have them.
        let upstream = match self {
            Self::Upstream(e) => Some(e),
            Self::AttemptsFailed {
                last: AttemptFailure::Upstream { error, .. },
                ..
            } => Some(error),
            Self::Translate(TranslateError::Upstream(e)) => Some(e),
            _ => None,
        };
        if let Some(e) = upstream {
            return match format {
                ApiFormat::Ollama => e.to_ollama(),
                ApiFormat::OpenAi => e.to_openai(),
                ApiFormat::Anthropic => e.to_anthropic(),
            };
        }
        let status = self.status();
        let message = self.to_string();
        let body = match format {
            ApiFormat::Ollama => ollama_error(&message),
            ApiFormat::OpenAi => {
                let (kind, param, code) = self.openai_fields();
                let mut body = openai_error(&message, kind, code);
                if let (Some(param), Some(err)) = (param, body.get_mut("error")) {
                    err["param"] = Value::from(param);
                }
                body
            }
            ApiFormat::Anthropic => anthropic_error(&message, status),
        };
        (status, body)
    }

    /// The HTTP response for a client speaking `format`.
    pub fn into_response_for(self, format: ApiFormat) -> Response {
        let (status, body) = self.to_body(format);
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// The last chunk of a stream that failed after its headers were sent: an
/// NDJSON `{"error":"..."}` line for Ollama clients, an SSE
/// `data: {"error":{..}}` event for OpenAI clients (the status is already 200,
/// so the error must travel in the body; both SDKs read it there).
pub fn stream_error_chunk(format: ApiFormat, message: &str) -> Bytes {
    match format {
        ApiFormat::Ollama => {
            let mut line = ollama_error(message).to_string();
            line.push('\n');
            Bytes::from(line)
        }
        ApiFormat::OpenAi => {
            let body = openai_error(message, "server_error", None);
            Bytes::from(format!("data: {body}\n\n"))
        }
        ApiFormat::Anthropic => {
            let body = anthropic_error(message, StatusCode::INTERNAL_SERVER_ERROR);
            Bytes::from(format!("event: error\ndata: {body}\n\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use serde_json::json;

    use super::*;

    #[test]
    fn model_not_found_is_404_and_lists_models_in_both_formats() {
        let e = ProxyError::ModelNotFound {
            model: "nope".into(),
            available: vec!["llama3:latest".into(), "qwen3:8b".into()],
        };
        let (s, body) = e.to_body(ApiFormat::Ollama);
        assert_eq!(s, StatusCode::NOT_FOUND);
        let text = body["error"].as_str().unwrap();
        assert!(text.contains("'nope' not found"), "{text}");
        assert!(text.contains("llama3:latest, qwen3:8b"), "{text}");
        assert!(!text.contains("http"), "{text}");
        let (s, body) = e.to_body(ApiFormat::OpenAi);
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert_eq!(body["error"]["code"], "model_not_found");
        assert_eq!(body["error"]["param"], "model");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("qwen3:8b")
        );
    }

    #[test]
    fn long_model_lists_are_capped() {
        let available: Vec<String> = (0..80).map(|i| format!("m{i}")).collect();
        let e = ProxyError::ModelNotFound {
            model: "x".into(),
            available,
        };
        let msg = e.to_string();
        assert!(msg.contains("(30 more)"), "{msg}");
        assert!(!msg.contains("m79"), "{msg}");
    }

    #[test]
    fn statuses() {
        let cases = [
            (ProxyError::MissingApiKey, 401),
            (ProxyError::WrongApiKey, 403),
            (ProxyError::BodyTooLarge { limit: 1 }, 413),
            (ProxyError::InvalidJson("x".into()), 400),
            (ProxyError::MissingModel, 400),
            (ProxyError::NoClusterState, 503),
            (
                ProxyError::NoEndpointAvailable {
                    model: "m".into(),
                    detail: "d".into(),
                },
                503,
            ),
            (ProxyError::ShuttingDown, 503),
            (ProxyError::Internal("boom".into()), 500),
            (
                ProxyError::AttemptsFailed {
                    attempts: 2,
                    last: AttemptFailure::Transport {
                        outcome: Outcome::ConnectError,
                        detail: "refused".into(),
                    },
                },
                503,
            ),
            (
                ProxyError::AttemptsFailed {
                    attempts: 2,
                    last: AttemptFailure::Transport {
                        outcome: Outcome::BackendError,
                        detail: "reset mid-body".into(),
                    },
                },
                502,
            ),
            (
                ProxyError::AttemptsFailed {
                    attempts: 1,
                    last: AttemptFailure::Transport {
                        outcome: Outcome::FirstByteTimeout,
                        detail: "slow".into(),
                    },
                },
                504,
            ),
        ];
        for (e, status) in cases {
            assert_eq!(e.status().as_u16(), status, "{e}");
            for format in [ApiFormat::Ollama, ApiFormat::OpenAi, ApiFormat::Anthropic] {
                let (s, body) = e.to_body(format);
                assert_eq!(s.as_u16(), status);
                match format {
                    ApiFormat::Ollama => assert!(body["error"].is_string(), "{body}"),
                    ApiFormat::OpenAi => {
                        assert!(body["error"]["message"].is_string(), "{body}");
                        assert!(body["error"]["type"].is_string(), "{body}");
                    }
                    ApiFormat::Anthropic => {
                        assert_eq!(body["type"], "error", "{body}");
                        assert!(body["error"]["message"].is_string(), "{body}");
                        assert!(body["error"]["type"].is_string(), "{body}");
                    }
                }
            }
        }
    }

    #[test]
    fn upstream_errors_keep_their_shape_and_status() {
        let up = UpstreamError::parse(
            StatusCode::SERVICE_UNAVAILABLE,
            br#"{"error":"server busy, please try again."}"#,
        );
        let e = ProxyError::AttemptsFailed {
            attempts: 3,
            last: AttemptFailure::Upstream {
                outcome: Outcome::BackendError,
                error: up,
            },
        };
        let (s, body) = e.to_body(ApiFormat::Ollama);
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, json!({"error": "server busy, please try again."}));
    }

    #[test]
    fn unauthorized_carries_www_authenticate() {
        let r = ProxyError::MissingApiKey.into_response_for(ApiFormat::OpenAi);
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()[http::header::WWW_AUTHENTICATE], "Bearer");
    }

    #[test]
    fn stream_error_chunks_are_framed() {
        let c = stream_error_chunk(ApiFormat::Ollama, "cut");
        assert_eq!(&c[..], b"{\"error\":\"cut\"}\n");
        let c = stream_error_chunk(ApiFormat::OpenAi, "cut");
        let text = std::str::from_utf8(&c).unwrap();
        assert!(
            text.starts_with("data: {") && text.ends_with("}\n\n"),
            "{text}"
        );
        let v: Value = serde_json::from_str(text.trim_start_matches("data: ").trim()).unwrap();
        assert_eq!(v["error"]["message"], "cut");
    }
}
