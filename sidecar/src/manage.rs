//! Model management fanned out to the Ollama endpoints, as nomyo-router
//! does, so `ollama pull llama3` against a sidecar installs the model on
//! the fleet: `POST /api/pull`, `/api/push`, `/api/create`, `/api/copy`,
//! `DELETE /api/delete` (Ollama API shapes; OpenAI-style and llama-server
//! endpoints are never targets).
//!
//! Phases (one per module): [`request`] validates the body (400 for bad
//! JSON or a missing model, 413 over `max_body_bytes`, before any endpoint
//! is chosen); [`targets`] picks the endpoints from the current cluster
//! state; [`fanout`] sends to all of them concurrently with each endpoint's
//! backend key (the client's `Authorization` is never forwarded:
//! [`upstream_headers`]); [`progress`] merges the answers.
//!
//! Targets:
//! - pull, create: every Ollama endpoint passing its probes (draining ones
//!   too: draining stops inference, and a drained node should not miss a
//!   model). Ollama endpoints failing their probes are not contacted but
//!   count as failed, named in the error; none reachable (or none
//!   configured) is a 503.
//! - push: the first endpoint in configuration order that advertises the
//!   model (a reachable one if any): pushing the same model twice is
//!   pointless.
//! - copy: the endpoints that advertise `source`; delete: those that
//!   advertise `model` (or the older `name`). `x` means `x:latest`, as
//!   everywhere ([`canonical_request_name`]). Those failing their probes
//!   (discovery keeps their last list) are not contacted and count as
//!   failed, as for pull.
//! - push, copy, delete with no target: 404 `model 'x' not found`.
//!
//! Answers:
//! - pull, push, create stream by default (no `stream` field means stream,
//!   as Ollama). Backends are always asked to stream, so a slow pull shows
//!   life and each backend's progress can be merged. Streamed: one NDJSON
//!   stream, each line sent as soon as it is produced, `digest` lines
//!   merged per digest (the layer's size, the endpoints' average progress:
//!   [`progress`]), status-only lines once, and last
//!   either `{"status":"success"}` (every endpoint succeeded) or one
//!   `{"error":..}` naming each failed endpoint. Not streamed: 200
//!   `{"status":"success"}`, or the first failure's status (the backend's
//!   own; 500 for an error line in its stream; 502 unreachable) with
//!   `{"error":..}` naming each failed endpoint.
//! - copy, delete: 200 with an empty body when every target succeeded,
//!   otherwise as a non-streamed failure above.
//!
//! Errors name endpoints by URL without credentials ([`without_credentials`]):
//! these are operator actions on many backends, and the operator must know
//! which one to fix (the one exception to [`crate::errors`]' rule).
//!
//! Blob uploads (`HEAD`/`POST /api/blobs/{digest}`, for `ollama create`
//! from local files) go to create's targets: see [`blobs`].
//!
//! Unloads (`ollama stop`, an empty chat or generate with `keep_alive` 0)
//! arrive on the inference routes and go to every endpoint holding the
//! model: see [`unload`].
//!
//! A client that goes away cancels every upstream request (the response
//! body owns them).
//!
//! Routing and listings come from the control plane's discovery, so before
//! the outcome of pull, create, copy or delete is sent (the last line of a
//! stream), the targets are re-probed ([`crate::router::Router::reprobe`]):
//! a client that pulls and then asks for the model at once (`ollama run`)
//! finds it. A failed re-probe only delays the change to the next probe.

pub mod blobs;
pub mod fanout;
pub mod progress;
pub mod request;
pub mod targets;
pub mod unload;

use std::{convert::Infallible, sync::Arc, time::Instant};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    response::{IntoResponse, Response},
    routing::{delete, post},
};
use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header::CONTENT_TYPE};
use serde_json::{Value, json};
use switchyard_control_plane::endpoint::{EndpointKind, without_credentials};

pub use progress::{EndpointFailure, Final, ProgressMerge, summarize, summarize_results};

#[cfg(doc)]
use {
    crate::proxy::forward::upstream_headers,
    switchyard_control_plane::model_name::canonical_request_name,
};

use self::{
    fanout::{Call, Event},
    request::ManageRequest,
};
use crate::{
    errors::ProxyError, metrics::ManagementLabels, proxy::request::read_body, routes::ApiFormat,
    server::AppState,
};

/// One model-management operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    /// `POST /api/pull`.
    Pull,
    /// `POST /api/push`.
    Push,
    /// `POST /api/create`.
    Create,
    /// `POST /api/copy`.
    Copy,
    /// `DELETE /api/delete`.
    Delete,
}

impl Operation {
    /// Every operation.
    pub const ALL: [Operation; 5] = [
        Self::Pull,
        Self::Push,
        Self::Create,
        Self::Copy,
        Self::Delete,
    ];

    /// The path, on the sidecar and on each backend.
    pub fn path(self) -> &'static str {
        match self {
            Self::Pull => "/api/pull",
            Self::Push => "/api/push",
            Self::Create => "/api/create",
            Self::Copy => "/api/copy",
            Self::Delete => "/api/delete",
        }
    }

    /// The HTTP method.
    pub fn method(self) -> Method {
        match self {
            Self::Delete => Method::DELETE,
            Self::Pull | Self::Push | Self::Create | Self::Copy => Method::POST,
        }
    }

    /// Whether the backend answers with progress lines (and the client may
    /// ask for them streamed).
    pub fn reports_progress(self) -> bool {
        match self {
            Self::Pull | Self::Push | Self::Create => true,
            Self::Copy | Self::Delete => false,
        }
    }

    /// Whether the operation changes which models the endpoints list (all
    /// but push).
    pub fn changes_models(self) -> bool {
        !matches!(self, Self::Push)
    }

    /// The verb used in messages.
    pub fn verb(self) -> &'static str {
        match self {
            Self::Pull => "pull",
            Self::Push => "push",
            Self::Create => "create",
            Self::Copy => "copy",
            Self::Delete => "delete",
        }
    }
}

/// The management routes, for [`crate::routes::app`] (behind the router key
/// like every non-liveness route).
pub(crate) fn routes() -> Router<AppState> {
    let mut router = Router::new();
    for op in Operation::ALL {
        let handler = move |State(state): State<AppState>, req: Request| handle(state, op, req);
        router = router.route(
            op.path(),
            match op.method() {
                Method::DELETE => delete(handler),
                _ => post(handler),
            },
        );
    }
    router.route(
        "/api/blobs/{digest}",
        axum::routing::head(blobs::head).post(blobs::post),
    )
}

async fn handle(state: AppState, op: Operation, req: Request) -> Response {
    let started = Instant::now();
    let shutdown = state.shutdown_token();
    let result = tokio::select! {
        r = run(&state, op, req, started) => r,
        () = shutdown.cancelled() => Err(ProxyError::ShuttingDown),
    };
    result.unwrap_or_else(|error| {
        // A failed fan-out was counted when its outcome was logged.
        if !matches!(error, ProxyError::FanOutFailed { .. }) {
            count(&state, op.verb(), "refused");
        }
        if error.status().is_server_error() {
            tracing::warn!(route = op.path(), error = %error, "model management failed");
        } else {
            tracing::info!(route = op.path(), error = %error, "model management refused");
        }
        error.into_response_for(ApiFormat::Ollama)
    })
}

async fn run(
    state: &AppState,
    op: Operation,
    req: Request,
    started: Instant,
) -> Result<Response, ProxyError> {
    let (parts, body) = req.into_parts();
    let bytes = read_body(body, &parts.headers, state.max_body_bytes()).await?;
    let request = request::parse(op, &bytes)?;
    let targets = targets::targets(&state.router().cluster_state(), op, &request.model)?;
    let what = format!("{} '{}'", op.verb(), request.model);
    tracing::info!(
        route = op.path(),
        model = %request.model,
        endpoints = targets.send_to.len(),
        down = targets.down.len(),
        "model management started"
    );
    let calls = calls(state, op, &parts.headers, &request, &targets.send_to);
    let client = state.clients().get(EndpointKind::Ollama);
    // Targets first, then the down endpoints (failed from the start).
    let names: Vec<String> = targets
        .send_to
        .iter()
        .chain(targets.down.iter().map(|(url, _)| url))
        .map(|u| without_credentials(u).into_owned())
        .collect();
    let down = targets.down.iter().map(|(_, detail)| {
        EndpointFailure::new(
            StatusCode::BAD_GATEWAY,
            format!("endpoint is down ({detail})"),
        )
    });
    if !op.reports_progress() {
        let results: Vec<Option<EndpointFailure>> =
            fanout::unary(client, calls, fanout::FIRST_BYTE)
                .await
                .into_iter()
                .chain(down.map(Some))
                .collect();
        refresh(state, op, &targets.send_to).await;
        let outcome = summarize_results(&what, &names, &results);
        record_outcome(state, op, &what, &outcome, started);
        return match outcome {
            Final::Success => Ok(StatusCode::OK.into_response()),
            Final::Failed { status, message } => Err(ProxyError::FanOutFailed { status, message }),
        };
    }
    let mut merge = ProgressMerge::new(names);
    for (i, failure) in down.enumerate() {
        merge.fail(targets.send_to.len() + i, failure);
    }
    let events = fanout::events(client, calls);
    if request.stream {
        return Ok(streamed(
            op,
            what,
            merge,
            events,
            state,
            targets.send_to,
            started,
        ));
    }
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        apply(&mut merge, event);
    }
    refresh(state, op, &targets.send_to).await;
    let outcome = merge.finish(&what);
    record_outcome(state, op, &what, &outcome, started);
    match outcome {
        Final::Success => Ok(json_response(&outcome.to_line())),
        Final::Failed { status, message } => Err(ProxyError::FanOutFailed { status, message }),
    }
}

/// One call per target: the endpoint's URL for the route, its backend key.
fn calls(
    state: &AppState,
    op: Operation,
    client_headers: &HeaderMap,
    request: &ManageRequest,
    send_to: &[std::sync::Arc<str>],
) -> Vec<Call> {
    send_to
        .iter()
        .enumerate()
        .map(|(index, url)| Call {
            index,
            method: op.method(),
            url: format!("{}{}", url.trim_end_matches('/'), op.path()),
            headers: crate::proxy::forward::upstream_headers(
                client_headers,
                state.backend_key(url),
            ),
            body: request.forward.clone(),
        })
        .collect()
}

/// After an operation that changes the endpoints' models, has the control
/// plane probe them now, so the change is routable (and listed) by the time
/// the client hears the outcome: `ollama run` pulls a missing model and
/// then asks for it at once. A failure only delays the change to the next
/// probe.
async fn refresh(state: &AppState, op: Operation, endpoints: &[Arc<str>]) {
    if op.changes_models() {
        reprobe(state, op.path(), endpoints).await;
    }
}

/// Has the control plane probe `endpoints` now (see [`refresh`]); `route`
/// names the request in the warning when that fails.
async fn reprobe(state: &AppState, route: &'static str, endpoints: &[Arc<str>]) {
    if endpoints.is_empty() {
        return;
    }
    if let Err(error) = state.router().reprobe(endpoints).await {
        tracing::warn!(
            route,
            %error,
            "endpoints not re-probed; the change shows at the next probe"
        );
    }
}

/// Applies one endpoint event to the merge; returns the line to emit.
fn apply(merge: &mut ProgressMerge, event: Event) -> Option<Value> {
    match event {
        Event::Line(i, line) => merge.observe(i, &line),
        Event::Failed(i, failure) => {
            merge.fail(i, failure);
            None
        }
        Event::Ended(i) => {
            merge.end(i);
            None
        }
    }
}

/// The merged NDJSON stream. The body owns the upstream requests: a client
/// that goes away drops them. Past the shutdown grace the stream ends with
/// an error line.
fn streamed(
    op: Operation,
    what: String,
    mut merge: ProgressMerge,
    events: impl futures::Stream<Item = Event> + Send + 'static,
    state: &AppState,
    endpoints: Vec<Arc<str>>,
    started: Instant,
) -> Response {
    let shutdown = state.shutdown_token();
    let state = state.clone();
    let body = async_stream::stream! {
        let mut events = std::pin::pin!(events);
        loop {
            let event = tokio::select! {
                event = events.next() => event,
                () = shutdown.cancelled() => {
                    let error = ProxyError::ShuttingDown.to_string();
                    tracing::warn!(route = op.path(), what, error, "model management cut off");
                    yield Ok::<Bytes, Infallible>(ndjson(&json!({ "error": error })));
                    return;
                }
            };
            let Some(event) = event else { break };
            if let Some(line) = apply(&mut merge, event) {
                yield Ok(ndjson(&line));
            }
        }
        refresh(&state, op, &endpoints).await;
        let outcome = merge.finish(&what);
        record_outcome(&state, op, &what, &outcome, started);
        yield Ok(ndjson(&outcome.to_line()));
    };
    let mut response = Response::new(Body::from_stream(body));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

fn ndjson(line: &Value) -> Bytes {
    let mut text = line.to_string();
    text.push('\n');
    Bytes::from(text)
}

fn json_response(body: &Value) -> Response {
    let mut response = Response::new(Body::from(body.to_string()));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

/// Counts one operation (`verb`) in
/// `switchyard_sidecar_model_management_total`.
fn count(state: &AppState, verb: &'static str, outcome: &'static str) {
    state.metrics().management(ManagementLabels {
        operation: verb,
        outcome,
    });
}

/// Logs and counts how a fan-out of `op` ended.
fn record_outcome(state: &AppState, op: Operation, what: &str, outcome: &Final, started: Instant) {
    record(state, op.verb(), op.path(), what, outcome, started);
}

/// Logs and counts how a fan-out ended: operation `verb`, asked on `route`.
fn record(
    state: &AppState,
    verb: &'static str,
    route: &'static str,
    what: &str,
    outcome: &Final,
    started: Instant,
) {
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    count(
        state,
        verb,
        match outcome {
            Final::Success => "success",
            Final::Failed { .. } => "failed",
        },
    );
    match outcome {
        Final::Success => {
            tracing::info!(route, what, elapsed_ms, "model management succeeded");
        }
        Final::Failed { status, message } => tracing::warn!(
            route,
            status = status.as_u16(),
            error = %message,
            elapsed_ms,
            "model management failed"
        ),
    }
}
