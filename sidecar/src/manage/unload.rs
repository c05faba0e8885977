//! `ollama stop MODEL` through a sidecar: an unload request (`/api/chat`
//! with no messages or `/api/generate` with an empty prompt, `keep_alive`
//! 0; [`RequestContext::unload`]) goes to **every** Ollama endpoint that has
//! the model loaded, not to one chosen endpoint. Routed like an inference
//! request it would reach the least-loaded endpoint, most often one where
//! the model is not loaded at all, and leave it loaded everywhere else.
//!
//! - Targets ([`unload_targets`]): the Ollama endpoints passing their probes
//!   whose last `/api/ps` lists the model (`x` is `x:latest`), draining ones
//!   included (unloading is what a drained node should do).
//! - None: the request takes the ordinary path ([`crate::proxy::choose`]),
//!   which answers 404 for a model no endpoint has, answers OpenAI-style
//!   endpoints locally, and otherwise sends it to one Ollama endpoint, which
//!   replies `unload` as Ollama does for a model it has not loaded.
//! - Each target gets the client's body unchanged with its own backend key
//!   (the client's key is never forwarded) and must answer within the
//!   inference `first_byte` timeout. No lease is taken: nothing runs.
//! - Then the targets are re-probed, so `ollama ps` right after `ollama
//!   stop` no longer lists the model, and the client gets Ollama's unload
//!   reply (`done_reason` `unload`; one NDJSON line when streaming). If
//!   any target failed: that target's status with an Ollama error naming
//!   each failed endpoint, as the other fan-outs do.
//! - Counted as operation `unload` in
//!   `switchyard_sidecar_model_management_total`.

use std::time::Instant;

use axum::response::Response;
use http::Method;
use switchyard_control_plane::endpoint::{EndpointKind, without_credentials};

use super::{
    fanout, fanout::Call, progress::summarize_results, record, reprobe, targets::unload_targets,
};
use crate::{
    errors::ProxyError,
    manage::Final,
    proxy::{forward::upstream_headers, request::RequestContext, stream::local_response},
    routes::ApiRoute,
    server::AppState,
    translate::LocalReply,
};

/// The operation's name in metrics and messages.
const VERB: &str = "unload";

/// Unloads `ctx.model` from every Ollama endpoint holding it; `None` when
/// none does (the caller routes the request as usual).
pub(crate) async fn unload(
    state: &AppState,
    ctx: &RequestContext,
) -> Result<Option<Response>, ProxyError> {
    let send_to = unload_targets(&state.router().cluster_state(), &ctx.model);
    if send_to.is_empty() {
        return Ok(None);
    }
    let started = Instant::now();
    let route = ctx.route.path();
    tracing::info!(route, model = %ctx.model, endpoints = send_to.len(), "unloading");
    let calls = send_to
        .iter()
        .enumerate()
        .map(|(index, url)| Call {
            index,
            method: Method::POST,
            url: format!("{}{}", url.trim_end_matches('/'), route),
            headers: upstream_headers(&ctx.headers, state.backend_key(url)),
            body: ctx.body.clone(),
        })
        .collect();
    let first_byte = state.timeouts(EndpointKind::Ollama).first_byte;
    let results = fanout::unary(state.clients().get(EndpointKind::Ollama), calls, first_byte).await;
    reprobe(state, route, &send_to).await;
    let what = format!("{VERB} '{}'", ctx.model);
    let names: Vec<String> = send_to
        .iter()
        .map(|u| without_credentials(u).into_owned())
        .collect();
    let outcome = summarize_results(&what, &names, &results);
    record(state, VERB, route, &what, &outcome, started);
    match outcome {
        Final::Success => {
            let reply = match ctx.route {
                ApiRoute::OllamaChat => LocalReply::ChatLoad { unload: true },
                _ => LocalReply::GenerateLoad { unload: true },
            };
            let body = reply.render(&ctx.model, std::time::SystemTime::now());
            Ok(Some(local_response(ctx.stream, body)))
        }
        Final::Failed { status, message } => Err(ProxyError::FanOutFailed { status, message }),
    }
}
