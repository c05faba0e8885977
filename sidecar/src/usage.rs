//! nomyo-router's usage routes, so the dashboards and scripts of operators
//! migrating from it keep working: `GET /api/usage` and
//! `GET /api/usage-stream`, both answered from the router's cluster state.
//!
//! Body (the shape nomyo-router sends):
//! `{"usage_counts": {ENDPOINT: {MODEL: N}}, "token_usage_counts": {ENDPOINT: {MODEL: T}}}`
//! where `N` is the requests in flight now and `T` the cumulative prompt +
//! completion tokens, per endpoint and tracking model.
//!
//! Invariants:
//! - The counts are cluster-wide (the control plane's view, every sidecar's
//!   requests), not this sidecar's alone.
//! - Endpoint keys are the configured URLs without credentials
//!   ([`without_credentials`]); every endpoint appears (as `{}` until one of its
//!   models had a request), with every model the state lists (from its
//!   first request on), zero counts included.
//! - `/api/usage-stream` is Server-Sent Events: the current body at once,
//!   then a new event whenever the body changes (the state is polled every
//!   250 ms: the router has no change notification), and a `: keep-alive`
//!   comment every 15 s so proxies do not cut an idle stream. The body
//!   stream owns everything (no task is spawned): a client that goes away
//!   drops it, and it ends cleanly as soon as the sidecar's graceful
//!   shutdown starts (`AppState::stopping_token`): a stream that never ends
//!   by itself must not hold the shutdown for the whole `shutdown_grace`.

use std::{collections::BTreeMap, convert::Infallible, time::Duration};

use axum::{
    Json,
    body::Body,
    extract::State,
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures::Stream;
use http::{
    HeaderValue,
    header::{CACHE_CONTROL, CONTENT_TYPE},
};
use serde_json::{Value, json};
use switchyard_control_plane::{cluster::ClusterState, endpoint::without_credentials};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::server::AppState;

/// The SSE comment that keeps an idle stream open through proxies.
const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// Counts per endpoint, then per model, sorted by name.
type Counts = BTreeMap<String, BTreeMap<String, u64>>;

/// The usage body of a cluster state (see the module docs).
pub fn usage_body(state: &ClusterState) -> Value {
    let mut in_flight = Counts::new();
    let mut tokens = Counts::new();
    for endpoint in &state.endpoints {
        // Two endpoints differing only in credentials share a key: their
        // counts add up.
        let key = without_credentials(&endpoint.url).into_owned();
        let in_flight = in_flight.entry(key.clone()).or_default();
        let tokens = tokens.entry(key).or_default();
        for usage in &endpoint.usage {
            let model = usage.model.to_string();
            add(in_flight, &model, u64::from(usage.in_flight));
            add(
                tokens,
                &model,
                usage.prompt_tokens.saturating_add(usage.completion_tokens),
            );
        }
    }
    json!({ "usage_counts": in_flight, "token_usage_counts": tokens })
}

fn add(counts: &mut BTreeMap<String, u64>, model: &str, n: u64) {
    let count = counts.entry(model.to_owned()).or_default();
    *count = count.saturating_add(n);
}

/// One SSE event carrying `body`.
fn event(body: &Value) -> Bytes {
    Bytes::from(format!("data: {body}\n\n"))
}

/// How often the stream looks at the state and sends a keep-alive comment.
#[derive(Clone, Copy, Debug)]
struct Timing {
    /// Between two looks at the cluster state.
    poll: Duration,
    /// Between two keep-alive comments.
    keep_alive: Duration,
}

impl Timing {
    const DEFAULT: Timing = Timing {
        poll: Duration::from_millis(250),
        keep_alive: Duration::from_secs(15),
    };
}

/// What wakes the stream.
enum Wake {
    Poll,
    KeepAlive,
    Shutdown,
}

/// The SSE body: `snapshot()` at once, then whenever it differs from the
/// last one sent, keep-alive comments in between; ends when `shutdown`
/// fires.
fn events(
    snapshot: impl Fn() -> Value + Send + 'static,
    shutdown: CancellationToken,
    timing: Timing,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    async_stream::stream! {
        let mut last = snapshot();
        yield Ok(event(&last));
        let mut poll = tokio::time::interval_at(Instant::now() + timing.poll, timing.poll);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut keep_alive =
            tokio::time::interval_at(Instant::now() + timing.keep_alive, timing.keep_alive);
        keep_alive.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let wake = tokio::select! {
                biased;
                () = shutdown.cancelled() => Wake::Shutdown,
                _ = poll.tick() => Wake::Poll,
                _ = keep_alive.tick() => Wake::KeepAlive,
            };
            match wake {
                Wake::Shutdown => return,
                Wake::KeepAlive => yield Ok(Bytes::from_static(KEEP_ALIVE)),
                Wake::Poll => {
                    let now = snapshot();
                    if now != last {
                        yield Ok(event(&now));
                        last = now;
                    }
                }
            }
        }
    }
}

/// `GET /api/usage`.
pub(crate) async fn usage(State(state): State<AppState>) -> Json<Value> {
    Json(usage_body(&state.router().cluster_state()))
}

/// `GET /api/usage-stream`.
pub(crate) async fn usage_stream(State(state): State<AppState>) -> Response {
    let shutdown = state.stopping_token();
    let snapshot = move || usage_body(&state.router().cluster_state());
    let body = Body::from_stream(events(snapshot, shutdown, Timing::DEFAULT));
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    };

    use futures::StreamExt;
    use switchyard_control_plane::{
        cluster::{EndpointState, ModelUsage},
        endpoint::EndpointKind,
    };

    use super::*;

    fn endpoint(url: &str, usage: Vec<ModelUsage>) -> EndpointState {
        EndpointState {
            max_concurrent: 4,
            healthy: true,
            health_detail: String::new(),
            usage,
            ..EndpointState::new(url, EndpointKind::Ollama)
        }
    }

    fn model(name: &str, in_flight: u32, prompt: u64, completion: u64) -> ModelUsage {
        ModelUsage {
            model: name.into(),
            in_flight,
            prompt_tokens: prompt,
            completion_tokens: completion,
            requests: 0,
        }
    }

    #[test]
    fn usage_body_has_every_endpoint_and_model_without_credentials() {
        let state = ClusterState {
            endpoints: vec![
                endpoint(
                    "http://127.0.0.1:11434",
                    vec![model("llama3:latest", 2, 10, 5), model("idle:1b", 0, 0, 0)],
                ),
                endpoint("https://user:secret@api.example.com/v1", Vec::new()),
            ],
            ..ClusterState::default()
        };
        let body = usage_body(&state);
        assert_eq!(
            body,
            json!({
                "usage_counts": {
                    "http://127.0.0.1:11434": {"llama3:latest": 2, "idle:1b": 0},
                    "https://api.example.com/v1": {},
                },
                "token_usage_counts": {
                    "http://127.0.0.1:11434": {"llama3:latest": 15, "idle:1b": 0},
                    "https://api.example.com/v1": {},
                },
            })
        );
        assert!(!body.to_string().contains("secret"), "{body}");
    }

    #[test]
    fn usage_body_of_an_empty_cluster_is_two_empty_maps() {
        assert_eq!(
            usage_body(&ClusterState::default()),
            json!({"usage_counts": {}, "token_usage_counts": {}})
        );
    }

    #[test]
    fn endpoints_differing_only_in_credentials_add_up() {
        let state = ClusterState {
            endpoints: vec![
                endpoint("http://a:1@h:1", vec![model("m", 1, 1, 1)]),
                endpoint("http://b:2@h:1", vec![model("m", 2, u64::MAX, 1)]),
            ],
            ..ClusterState::default()
        };
        assert_eq!(
            usage_body(&state),
            json!({
                "usage_counts": {"http://h:1": {"m": 3}},
                "token_usage_counts": {"http://h:1": {"m": u64::MAX}},
            })
        );
    }

    #[test]
    fn events_are_sse_data_lines() {
        let body = json!({"usage_counts": {}, "token_usage_counts": {}});
        assert_eq!(
            event(&body),
            Bytes::from(format!("data: {body}\n\n").into_bytes())
        );
    }

    const FAST: Timing = Timing {
        poll: Duration::from_millis(10),
        keep_alive: Duration::from_millis(300),
    };

    async fn next_text(
        stream: &mut (impl Stream<Item = Result<Bytes, Infallible>> + Unpin),
    ) -> Option<String> {
        let item = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("the stream produced nothing within 5 s")?;
        Some(String::from_utf8(item.unwrap().to_vec()).unwrap())
    }

    #[tokio::test]
    async fn stream_sends_the_snapshot_at_once_then_only_changes() {
        let counter = Arc::new(AtomicU64::new(0));
        let seen = counter.clone();
        let snapshot = move || json!({ "n": seen.load(Ordering::SeqCst) });
        let shutdown = CancellationToken::new();
        let mut stream = Box::pin(events(snapshot, shutdown.clone(), FAST));

        let started = Instant::now();
        assert_eq!(next_text(&mut stream).await.unwrap(), "data: {\"n\":0}\n\n");
        assert!(started.elapsed() < FAST.poll, "first event not immediate");

        counter.store(1, Ordering::SeqCst);
        assert_eq!(next_text(&mut stream).await.unwrap(), "data: {\"n\":1}\n\n");

        // No change: the next thing sent is a keep-alive comment, not an
        // event repeating the snapshot.
        assert_eq!(next_text(&mut stream).await.unwrap(), ": keep-alive\n\n");

        shutdown.cancel();
        assert_eq!(next_text(&mut stream).await, None, "stream did not end");
    }

    #[tokio::test]
    async fn stream_ends_at_shutdown_while_idle() {
        let shutdown = CancellationToken::new();
        let timing = Timing {
            poll: Duration::from_secs(60),
            keep_alive: Duration::from_secs(60),
        };
        let mut stream = Box::pin(events(|| json!({}), shutdown.clone(), timing));
        assert!(next_text(&mut stream).await.is_some());
        shutdown.cancel();
        assert_eq!(next_text(&mut stream).await, None);
    }
}
