//! Choose phase and the retry loop.
//!
//! Each attempt asks the router for an endpoint (excluding the ones that
//! already failed for this request), takes its lease, and runs the exchange.
//! A failure before anything reached the client releases that lease with
//! its outcome and tries again, up to `max_attempts` in all (except for a
//! request that must reach the endpoint holding its previous response). When no
//! endpoint is left (or attempts run out) the client gets the last failure,
//! in its own format.

use switchyard_control_plane::{
    decision::{ChooseRequest, DecisionReason},
    endpoint::{EndpointKind, without_credentials},
};
use tracing::{Span, field};

use super::{
    Progress,
    release::TrackedLease,
    request::RequestContext,
    stream::{Attempt, exchange},
};
use crate::{
    errors::{AttemptFailure, ProxyError},
    routes::ApiRoute,
    server::AppState,
};

/// Endpoints a route is known not to be served by (well), tried only when
/// no other has the model:
/// - Ollama has no Anthropic token count (it answers 404, costing a lease
///   and a round trip before the retry);
/// - only Ollama has `/api/show`: for the others the sidecar answers from
///   what it knows (no template, no capabilities beyond completion), so an
///   Ollama endpoint with the model answers it, the same way every time.
fn avoided_first(state: &AppState, ctx: &RequestContext) -> Vec<String> {
    let avoided: fn(EndpointKind) -> bool = match ctx.route {
        ApiRoute::AnthropicCountTokens => |kind| kind == EndpointKind::Ollama,
        ApiRoute::OllamaShow => |kind| kind != EndpointKind::Ollama,
        _ => return Vec::new(),
    };
    state
        .router()
        .cluster_state()
        .endpoints
        .iter()
        .filter(|e| avoided(e.kind))
        .map(|e| e.url.to_string())
        .collect()
}

/// Routes the request, retrying on another endpoint while nothing has
/// reached the client.
pub(crate) async fn route(
    state: &AppState,
    ctx: &RequestContext,
    progress: &mut Progress,
    span: &Span,
) -> Result<axum::response::Response, ProxyError> {
    let max_attempts = state.max_attempts().max(1);
    let mut exclude: Vec<String> = Vec::new();
    let mut avoid = avoided_first(state, ctx);
    let mut last: Option<AttemptFailure> = None;
    for attempt in 1..=max_attempts {
        let mut request = ChooseRequest {
            model: ctx.model.clone(),
            affinity_key: ctx.affinity_key.clone(),
            affinity_required: ctx.affinity_required,
            kind: ctx.route.kind(),
            exclude: exclude.iter().chain(&avoid).cloned().collect(),
        };
        let mut chosen = state.router().choose(&request).await;
        if chosen.is_err() && !avoid.is_empty() {
            // Nothing else has the model: try those after all.
            avoid.clear();
            request.exclude.clone_from(&exclude);
            chosen = state.router().choose(&request).await;
        }
        let lease = match chosen {
            Ok(lease) => lease,
            Err(e) => {
                return Err(match last {
                    // Nothing left to try after failures: report the
                    // failure, not "no endpoint".
                    Some(last) => ProxyError::AttemptsFailed {
                        attempts: attempt - 1,
                        last,
                    },
                    None => e.into(),
                });
            }
        };
        if attempt > 1 {
            state.metrics().retry();
        }
        if lease.degraded() {
            state.metrics().degraded_decision();
        }
        let choice = lease.choice().clone();
        // Each attempt's decision and outcome go on a span of its own, a
        // child of the request's: recorded again on the request span after
        // a retry, the log layer printed each field twice.
        let attempt_span = tracing::debug_span!(
            parent: span,
            "attempt",
            endpoint = %without_credentials(&choice.endpoint),
            reason = choice.reason.as_str(),
            attempt,
            degraded = lease.degraded(),
            outcome = field::Empty,
        );
        progress.endpoint = Some(choice.endpoint.clone());
        progress.attempts = attempt;
        let lease = TrackedLease::new(
            lease,
            state.router().clone(),
            state.metrics().clone(),
            attempt_span,
        );
        match exchange(state, ctx, lease, progress).await {
            Attempt::Answered(response) => return Ok(response),
            Attempt::Failed(error) => return Err(error),
            Attempt::Retry(failure) => {
                tracing::warn!(
                    endpoint = %without_credentials(&choice.endpoint),
                    attempt,
                    max_attempts,
                    failure = %failure,
                    "attempt failed before the first byte"
                );
                if ctx.affinity_required && choice.reason == DecisionReason::Affinity {
                    // The request continues a response stored on this
                    // endpoint alone (`previous_response_id`): another one
                    // would only answer that it does not know the id, a
                    // permanent error for a conversation that still
                    // exists. The client gets this failure (with the
                    // backend's status, 502 for a transport failure), which
                    // it may retry.
                    return Err(ProxyError::AttemptsFailed {
                        attempts: attempt,
                        last: failure,
                    });
                }
                exclude.push(choice.endpoint.to_string());
                last = Some(failure);
            }
        }
    }
    Err(match last {
        Some(last) => ProxyError::AttemptsFailed {
            attempts: max_attempts,
            last,
        },
        None => ProxyError::Internal("retry loop ended without an attempt".into()),
    })
}
