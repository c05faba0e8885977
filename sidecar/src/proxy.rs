//! The proxy for routed inference requests, in explicit phases:
//!
//! 1. **accept** — `handle`: span, in-flight gauge, panic and shutdown
//!    guards (auth already ran as middleware, see [`crate::auth`]);
//! 2. **parse and validate** — [`request`]: body limit, JSON, model, stream
//!    default, affinity key → [`request::RequestContext`];
//! 3. **choose** — [`choose`]: lease from the router, retry loop excluding
//!    failed endpoints;
//! 4. **forward** — [`forward`]: URL per endpoint kind, body (rewritten
//!    only when the model name differs, or translated), header hygiene;
//! 5. **stream** — [`stream`]: send through the pooled clients of
//!    [`upstream`], timeouts, retry before the first byte, streaming without
//!    buffering;
//! 6. **release and record** — [`release`]: outcome classification, the
//!    lease finished exactly once, metrics.
//!
//! Errors from any phase become a response in the client's format in one
//! place, [`crate::errors`].

pub mod choose;
pub mod forward;
pub mod release;
pub mod request;
pub mod stream;
pub mod upstream;

use std::{
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{extract::Request, response::Response};
use futures::FutureExt;
use switchyard_control_plane::endpoint::without_credentials;
use tracing::{Instrument, Span, field};

use crate::{
    errors::ProxyError, metrics::InFlightGuard, metrics::RequestLabels, routes::ApiRoute,
    server::AppState,
};

/// What the phases learn about a request that the accept phase reports.
#[derive(Debug)]
pub(crate) struct Progress {
    /// When the request arrived.
    pub received: Instant,
    /// Time spent waiting for backends (excluded from overhead).
    pub backend_wait: Duration,
    /// The endpoint of the last attempt.
    pub endpoint: Option<Arc<str>>,
    /// Attempts that got an endpoint (0 before the first).
    pub attempts: u32,
    /// Held until the response ends; a stream takes it along.
    pub in_flight: Option<InFlightGuard>,
}

impl Progress {
    /// Time spent in the sidecar itself so far.
    fn overhead(&self) -> Duration {
        self.received.elapsed().saturating_sub(self.backend_wait)
    }
}

/// Entry point for every routed inference request.
pub(crate) async fn handle(state: AppState, route: ApiRoute, req: Request) -> Response {
    let format = route.format();
    // A debug span: with logs at the default `info` the span is never built,
    // which saves a third of the sidecar's CPU per request (formatting its
    // fields for the log layer); `RUST_LOG=switchyard_sidecar=debug` and
    // OTLP export (whose filter always enables it) get it with every field.
    let span = tracing::debug_span!(
        "request",
        route = route.path(),
        model = field::Empty,
        endpoint = field::Empty,
        attempts = field::Empty,
        status = field::Empty,
    );
    let mut progress = Progress {
        received: Instant::now(),
        backend_wait: Duration::ZERO,
        endpoint: None,
        attempts: 0,
        in_flight: Some(state.metrics().in_flight()),
    };
    let mut model = None;
    // Boxed where it is made: the proxy's state machine is ~4 KB, and unboxed
    // it was moved (into `catch_panic`, `select!` and the server's boxed
    // future, which grew to 12 KB) with a memcpy of its full size each time:
    // ~4 % of the sidecar's CPU per request, now ~2 %. Boxed before it is
    // instrumented: `instrument` takes the future by value, so wrapping first
    // moved all of it once more on the way into the box.
    let work = Box::pin(run(&state, route, req, &mut progress, &span, &mut model))
        .instrument(span.clone());
    let shutdown = state.shutdown_token();
    let result = tokio::select! {
        r = catch_panic(work) => r,
        // Past the shutdown grace: give up on requests still waiting for a
        // backend (their leases drop and release as Cancelled).
        () = shutdown.cancelled() => Err(ProxyError::ShuttingDown),
    };
    let response = match result {
        Ok(response) => response,
        Err(error) => {
            // The span may be off: these lines name the request themselves.
            let (route, model) = (route.path(), model.as_deref().unwrap_or_default());
            // In the span's scope rather than `parent: &span`: the JSON log
            // format lists only entered spans under "spans" (tracing#2973).
            span.in_scope(|| {
                if error.status().is_server_error() {
                    tracing::warn!(route, model, error = %error, "request failed");
                } else {
                    tracing::info!(route, model, error = %error, "request refused");
                }
            });
            error.into_response_for(format)
        }
    };
    let status = response.status().as_u16();
    // Recorded once, here (each attempt's own span has its decision and
    // outcome): the endpoint that answered, or whose failure the client got.
    if let Some(endpoint) = &progress.endpoint {
        span.record("endpoint", &*without_credentials(endpoint));
        span.record("attempts", progress.attempts);
    }
    span.record("status", status);
    state.metrics().overhead(progress.overhead());
    let endpoint = progress.endpoint.as_deref().unwrap_or_default().to_owned();
    state.metrics().request(RequestLabels {
        route: route.path().to_owned(),
        // Only routed names become label values (bounded cardinality).
        model: if endpoint.is_empty() {
            String::new()
        } else {
            model.unwrap_or_default()
        },
        endpoint,
        status,
    });
    // Per-request lines are debug: at thousands of requests per second an
    // info line each costs more CPU than the routing itself (BENCHMARKS.md).
    // Failures above are logged at info/warn; the counts are in /metrics.
    span.in_scope(|| tracing::debug!(status, "response started"));
    response
}

/// Runs a handler future, turning a panic into an internal error (a 500 in
/// the client's format) instead of a dropped connection. Leases held by the
/// future are dropped during unwinding and release as `Cancelled`.
async fn catch_panic<F>(work: F) -> Result<Response, ProxyError>
where
    F: Future<Output = Result<Response, ProxyError>>,
{
    match AssertUnwindSafe(work).catch_unwind().await {
        Ok(result) => result,
        Err(_panic) => {
            tracing::error!("panic while handling a request");
            Err(ProxyError::Internal(
                "unexpected failure while handling the request".into(),
            ))
        }
    }
}

async fn run(
    state: &AppState,
    route: ApiRoute,
    req: Request,
    progress: &mut Progress,
    span: &Span,
    model: &mut Option<String>,
) -> Result<Response, ProxyError> {
    let (parts, body) = req.into_parts();
    let bytes = request::read_body(body, &parts.headers, state.max_body_bytes()).await?;
    let derive_affinity = state.router().uses_affinity_keys();
    let ctx = request::parse_for(
        route,
        parts.headers,
        bytes,
        progress.received,
        derive_affinity,
    )?;
    span.record("model", ctx.model.as_str());
    *model = Some(ctx.model.clone());
    // Boxed: the unload's future is ~4.6 KB; awaited in place it made
    // every request's state machine that much bigger.
    if ctx.unload
        && let Some(response) = Box::pin(crate::manage::unload::unload(state, &ctx)).await?
    {
        return Ok(response);
    }
    choose::route(state, &ctx, progress, span).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use axum::response::IntoResponse;

    use super::*;

    #[tokio::test]
    async fn panics_become_internal_errors() {
        let ok = catch_panic(async { Ok("fine".into_response()) }).await;
        assert_eq!(ok.unwrap().status(), 200);
        let boom = catch_panic(async {
            if Instant::now().elapsed() < Duration::from_secs(3600) {
                panic!("boom");
            }
            Ok("unreachable".into_response())
        })
        .await;
        let err = boom.unwrap_err();
        assert!(matches!(err, ProxyError::Internal(_)));
        assert_eq!(err.status(), 500);
    }
}
