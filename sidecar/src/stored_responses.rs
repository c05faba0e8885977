//! The stored-response routes of the OpenAI Responses API, routed to the
//! backend that holds the response:
//!
//! | route | openai-python |
//! |---|---|
//! | `GET /v1/responses/{id}` | `client.responses.retrieve` |
//! | `DELETE /v1/responses/{id}` | `client.responses.delete` |
//! | `GET /v1/responses/{id}/input_items` | `client.responses.input_items.list` |
//! | `POST /v1/responses/{id}/cancel` | `client.responses.cancel` (background responses) |
//!
//! A backend that stores responses (vLLM with `store: true`, OpenAI itself)
//! answers these only where the response was created, and nothing tells
//! the sidecar which backend that is (the pin of a `previous_response_id`
//! chain is keyed by model, which these requests do not carry). So:
//!
//! - Ask ([`targets`]): every endpoint that may hold responses, whatever
//!   its kind (OpenAI-compatible, llama-server and Ollama all serve
//!   `/v1/responses` under their OpenAI base), that passes its probes or
//!   has not been probed yet, draining ones included (draining stops new
//!   work; the stored responses are still there). Endpoints failing their
//!   probes are not asked.
//! - Concurrently, through the pooled [`UpstreamClient`] of each endpoint's
//!   kind (the machinery of model management's fan-out, [`fanout::send`]),
//!   with the endpoint's own backend key (the client's `Authorization` and
//!   `x-api-key` are never forwarded: [`upstream_headers`]), within the
//!   kind's configured `first_byte` timeout for the head and `idle` for
//!   the body. The query string goes along as sent (`limit`, `order`,
//!   `after`, `before`, `include[]`, ...; the router key's `api_key` was
//!   removed by [`crate::auth`]).
//! - Answer: the first 2xx, at once (the other requests are dropped, which
//!   cancels them); else the first other non-404 answer below 500 (a 400
//!   for cancelling a response that is not a background one), once every
//!   backend has answered, so a backend refusing its key cannot hide the
//!   holder's answer. The backend's status, headers (`content-type`, minus
//!   hop-by-hop ones) and body pass through unchanged.
//! - Every backend asked answered 404: 404 `{"error":{"message":"No
//!   response found with id '…'.","type":"invalid_request_error",
//!   "param":null,"code":"not_found"}}`, as OpenAI answers.
//! - No answer at all (every backend unreachable, timed out or 5xx, or
//!   none to ask): 503 naming that no backend could be asked; some 404 and
//!   some failed or left out for failing their probes: 502 (the holder may
//!   be among those), never a 404 that would tell the client its response
//!   is gone. Messages carry counts, never URLs (the log line names the
//!   endpoints).
//!
//! Refused before any backend is asked, with 400 in OpenAI format: an id
//! that is empty, longer than [`MAX_ID_LEN`] or has characters other than
//! `[A-Za-z0-9_-]` (so it goes into the backend's URL path as is), and
//! `GET /v1/responses/{id}?stream=true`: replaying a stored response as
//! server-sent events is **not supported** (the answers are buffered,
//! small JSON).
//!
//! These are not inference requests: no lease, no choice, no retry. They
//! sit behind the router key like every `/v1` route, and are counted in
//! `switchyard_sidecar_requests_total` with the route pattern as `route`
//! (`/v1/responses/{id}`, never the id), `model` empty and the answering
//! endpoint as `endpoint` (empty when none answered).

#[cfg(test)]
mod tests;

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    extract::{Path, Request, State, rejection::PathRejection},
    response::Response,
    routing::{get, post},
};
use bytes::Bytes;
use futures::{StreamExt, stream::FuturesUnordered};
use http::{HeaderMap, Method, StatusCode};
use http_body_util::BodyExt;
use switchyard_control_plane::{
    cluster::{ClusterState, NOT_PROBED},
    endpoint::{EndpointKind, openai_base, without_credentials},
};

use crate::{
    errors::ProxyError,
    manage::{
        EndpointFailure,
        fanout::{self, Call},
    },
    metrics::RequestLabels,
    proxy::{
        forward::{response_headers, upstream_headers},
        upstream::UpstreamClient,
    },
    routes::ApiFormat,
    server::AppState,
};

/// Longest response id accepted.
pub const MAX_ID_LEN: usize = 256;

/// Most bytes of one backend answer read (a stored response with a long
/// output, or a page of input items).
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// One stored-response operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    /// `GET /v1/responses/{id}`.
    Retrieve,
    /// `DELETE /v1/responses/{id}`.
    Delete,
    /// `GET /v1/responses/{id}/input_items`.
    InputItems,
    /// `POST /v1/responses/{id}/cancel`.
    Cancel,
}

impl Operation {
    /// Every operation.
    pub const ALL: [Operation; 4] = [Self::Retrieve, Self::Delete, Self::InputItems, Self::Cancel];

    /// The route pattern on the sidecar (also the `route` metrics label).
    pub fn route(self) -> &'static str {
        match self {
            Self::Retrieve | Self::Delete => "/v1/responses/{id}",
            Self::InputItems => "/v1/responses/{id}/input_items",
            Self::Cancel => "/v1/responses/{id}/cancel",
        }
    }

    /// The HTTP method.
    pub fn method(self) -> Method {
        match self {
            Self::Retrieve | Self::InputItems => Method::GET,
            Self::Delete => Method::DELETE,
            Self::Cancel => Method::POST,
        }
    }

    /// The path under a backend's OpenAI base for response `id` (a valid
    /// id: [`validate_id`]).
    pub fn backend_path(self, id: &str) -> String {
        match self {
            Self::Retrieve | Self::Delete => format!("/responses/{id}"),
            Self::InputItems => format!("/responses/{id}/input_items"),
            Self::Cancel => format!("/responses/{id}/cancel"),
        }
    }
}

/// The stored-response routes, for [`crate::routes::app`] (behind the
/// router key).
pub(crate) fn routes() -> Router<AppState> {
    let handler = |op: Operation| {
        move |State(state): State<AppState>,
              id: Result<Path<String>, PathRejection>,
              req: Request| { handle(state, op, id.map(|Path(id)| id), req) }
    };
    Router::new()
        .route(
            Operation::Retrieve.route(),
            get(handler(Operation::Retrieve)).delete(handler(Operation::Delete)),
        )
        .route(
            Operation::InputItems.route(),
            get(handler(Operation::InputItems)),
        )
        .route(Operation::Cancel.route(), post(handler(Operation::Cancel)))
}

/// Checks a response id: 1 to [`MAX_ID_LEN`] characters of
/// `[A-Za-z0-9_-]`.
pub fn validate_id(id: &str) -> Result<(), ProxyError> {
    let problem = if id.is_empty() {
        "it is empty".to_owned()
    } else if id.len() > MAX_ID_LEN {
        format!("it is longer than {MAX_ID_LEN} characters")
    } else if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        "only letters, digits, '_' and '-' are allowed".to_owned()
    } else {
        return Ok(());
    };
    Err(ProxyError::InvalidResponseId(problem))
}

/// Whether the query asks for the stored response as a stream.
fn wants_stream(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        crate::auth::query_pairs(q).any(|(name, value)| {
            name == "stream" && matches!(value.to_ascii_lowercase().as_str(), "true" | "1")
        })
    })
}

/// An endpoint to ask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The endpoint's configured URL (its identity).
    pub url: Arc<str>,
    /// Its kind (decides the OpenAI base and the pooled client).
    pub kind: EndpointKind,
}

/// The endpoints to ask, in configuration order: every endpoint passing
/// its probes or not probed yet, draining ones included; and how many were
/// left out because they fail their probes.
pub fn targets(state: &ClusterState) -> (Vec<Target>, usize) {
    let (ask, down): (Vec<_>, Vec<_>) = state
        .endpoints
        .iter()
        .partition(|e| e.healthy || e.health_detail == NOT_PROBED);
    (
        ask.into_iter()
            .map(|e| Target {
                url: e.url.clone(),
                kind: e.kind,
            })
            .collect(),
        down.len(),
    )
}

async fn handle(
    state: AppState,
    op: Operation,
    id: Result<String, PathRejection>,
    req: Request,
) -> Response {
    let shutdown = state.shutdown_token();
    let result = tokio::select! {
        r = run(&state, op, id, req) => r,
        () = shutdown.cancelled() => Err(ProxyError::ShuttingDown),
    };
    let (response, endpoint) = match result {
        Ok((response, endpoint)) => (response, Some(endpoint)),
        Err(error) => {
            if error.status().is_server_error() {
                tracing::warn!(route = op.route(), error = %error, "stored response failed");
            } else {
                tracing::debug!(route = op.route(), error = %error, "stored response refused");
            }
            (error.into_response_for(ApiFormat::OpenAi), None)
        }
    };
    state.metrics().request(RequestLabels {
        route: op.route().to_owned(),
        model: String::new(),
        endpoint: endpoint.as_deref().unwrap_or_default().to_owned(),
        status: response.status().as_u16(),
    });
    response
}

/// Validates, asks the endpoints, and returns the answer with the URL of
/// the endpoint that gave it.
async fn run(
    state: &AppState,
    op: Operation,
    id: Result<String, PathRejection>,
    req: Request,
) -> Result<(Response, Arc<str>), ProxyError> {
    let id = id.map_err(|e| ProxyError::InvalidResponseId(e.body_text()))?;
    validate_id(&id)?;
    let query = req.uri().query();
    if op == Operation::Retrieve && wants_stream(query) {
        return Err(ProxyError::StoredResponseStreamUnsupported);
    }
    let suffix = match query {
        Some(q) if !q.is_empty() => format!("{}?{q}", op.backend_path(&id)),
        _ => op.backend_path(&id),
    };
    let (targets, down) = targets(&state.router().cluster_state());
    if targets.is_empty() {
        return Err(ProxyError::StoredResponseUnavailable {
            status: StatusCode::SERVICE_UNAVAILABLE,
            id,
            detail: if down == 0 {
                "no endpoint is configured".to_owned()
            } else {
                format!("all {down} endpoint(s) fail their health probes")
            },
        });
    }
    let mut pending: FuturesUnordered<_> = targets
        .iter()
        .enumerate()
        .map(|(index, target)| {
            let call = Call {
                index,
                method: op.method(),
                url: format!("{}{suffix}", openai_base(&target.url, target.kind)),
                headers: upstream_headers(req.headers(), state.backend_key(&target.url)),
                body: Bytes::new(),
            };
            let client = state.clients().get(target.kind).clone();
            let timeouts = state.timeouts(target.kind);
            async move {
                let answer = fetch(&client, call, timeouts.first_byte, timeouts.idle).await;
                (index, answer)
            }
        })
        .collect();
    let mut not_found = 0usize;
    let mut failed: Vec<(usize, EndpointFailure)> = Vec::new();
    let mut held: Option<(usize, Answer)> = None;
    while let Some((index, answer)) = pending.next().await {
        match answer {
            // Dropping `pending` on return cancels the other requests.
            Ok(answer) if answer.status.is_success() => {
                return Ok((answer.into_response(), targets[index].url.clone()));
            }
            Ok(answer) if answer.status == StatusCode::NOT_FOUND => not_found += 1,
            Ok(answer) => {
                if held.is_none() {
                    held = Some((index, answer));
                }
            }
            Err(failure) => failed.push((index, failure)),
        }
    }
    if let Some((index, answer)) = held {
        return Ok((answer.into_response(), targets[index].url.clone()));
    }
    if failed.is_empty() && down == 0 {
        return Err(ProxyError::ResponseNotFound { id });
    }
    let named: Vec<String> = failed
        .iter()
        .map(|(i, f)| {
            format!(
                "{} ({}: {})",
                without_credentials(&targets[*i].url),
                f.status.as_u16(),
                f.message
            )
        })
        .collect();
    tracing::warn!(
        route = op.route(),
        id,
        not_found,
        failed = %named.join(", "),
        not_asked = down,
        "stored response: some backends could not be asked"
    );
    // Endpoints failing their probes were not asked: the holder may be
    // one of them, so their silence is not a 404 either.
    let unanswered = failed.len() + down;
    let (status, detail) = if not_found == 0 {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "all {unanswered} backend(s) failed, were unreachable or fail their health probes"
            ),
        )
    } else {
        (
            StatusCode::BAD_GATEWAY,
            format!(
                "not found on {not_found} backend(s); {unanswered} other(s) failed, were unreachable or fail their health probes"
            ),
        )
    };
    Err(ProxyError::StoredResponseUnavailable { status, id, detail })
}

/// One backend's whole answer (below 500).
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn into_response(self) -> Response {
        let mut response = Response::new(Body::from(self.body));
        *response.status_mut() = self.status;
        *response.headers_mut() = response_headers(&self.headers);
        response
    }
}

/// Sends `call` and reads the whole answer; a 5xx, an unreachable backend,
/// a timeout or a broken body is a failure.
async fn fetch(
    client: &UpstreamClient,
    call: Call,
    first_byte: Duration,
    idle: Duration,
) -> Result<Answer, EndpointFailure> {
    let response = fanout::send(client, call, first_byte).await?;
    if response.status().is_server_error() {
        return Err(fanout::refusal(response).await);
    }
    let (parts, body) = response.into_parts();
    let limited = http_body_util::Limited::new(body, MAX_ANSWER_BYTES);
    let body = match tokio::time::timeout(idle, limited.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) => {
            return Err(EndpointFailure::new(
                StatusCode::BAD_GATEWAY,
                format!("answer unreadable: {e}"),
            ));
        }
        Err(_) => {
            return Err(EndpointFailure::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!("answer not complete within {} s", idle.as_secs()),
            ));
        }
    };
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}
