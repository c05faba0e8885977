//! nomyo-router's usage routes on a sidecar: `GET /api/usage` shows the
//! requests in flight now and the cumulative tokens per endpoint and model,
//! from the cluster state, under endpoint URLs without credentials;
//! `GET /api/usage-stream` sends the same body as Server-Sent Events, at
//! once and again on every change, and ends cleanly at sidecar shutdown;
//! both need the router key.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde_json::{Value, json};
use switchyard_control_plane::endpoint::EndpointKind;
use switchyard_system_tests::{
    Cluster, SOON,
    client::{Reply, send},
    config::EndpointEntry,
    ollama_fake,
    wait::{wait_for_async, within},
};

const ROUTER_KEY: &str = "router-secret";
/// The userinfo of the endpoint configured with credentials in its URL.
const USER: &str = "operator";
const PASSWORD: &str = "hunter2";

/// Ollama fake 0 with `m:latest`, then an endpoint with credentials in its
/// URL on a closed port (no models); router key set.
async fn cluster() -> (Cluster, String) {
    let port = closed_port();
    let c = Cluster::builder()
        .backend(ollama_fake(&["m:latest"]))
        .extra_endpoint(EndpointEntry {
            url: format!("http://{USER}:{PASSWORD}@127.0.0.1:{port}"),
            kind: EndpointKind::Ollama,
            max_concurrent: None,
            api_key: None,
        })
        .router_api_key(ROUTER_KEY)
        .start()
        .await;
    (c, format!("http://127.0.0.1:{port}"))
}

/// A loopback port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

async fn usage(c: &Cluster) -> Value {
    let r = send(c.http().get(c.at("/api/usage")).bearer_auth(ROUTER_KEY)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json()
}

/// `body[map][endpoint][model]`, 0 when absent (nomyo-router lists a model
/// only once it was used).
fn count(body: &Value, map: &str, endpoint: &str, model: &str) -> u64 {
    body[map][endpoint][model].as_u64().unwrap_or(0)
}

/// The tracking model `m:latest` is counted under, from the control plane.
fn tracked_model(c: &Cluster) -> String {
    let url = c.endpoint_url(0);
    let state = c.state();
    let endpoint = state.endpoints.iter().find(|e| *e.url == *url).unwrap();
    let names: Vec<&str> = endpoint.usage.iter().map(|u| &*u.model).collect();
    assert_eq!(names.len(), 1, "usage entries of {url}: {names:?}");
    names[0].to_owned()
}

/// Control-plane tokens (prompt + completion) of the model on fake 0.
fn control_plane_tokens(c: &Cluster, model: &str) -> u64 {
    let url = c.endpoint_url(0);
    c.state()
        .endpoints
        .iter()
        .find(|e| *e.url == *url)
        .and_then(|e| e.usage.iter().find(|u| *u.model == *model))
        .map_or(0, |u| u.prompt_tokens + u.completion_tokens)
}

fn chat(c: &Cluster) -> tokio::task::JoinHandle<Reply> {
    let request = c
        .http()
        .post(c.at("/api/chat"))
        .bearer_auth(ROUTER_KEY)
        .json(&json!({"model": "m", "stream": false,
                      "messages": [{"role": "user", "content": "hi"}]}));
    tokio::spawn(send(request))
}

/// Waits until `/api/usage` satisfies `done`; returns that body.
async fn wait_usage_body(c: &Cluster, what: &str, done: impl FnMut(&Value) -> bool) -> Value {
    wait_for_async(what, SOON, || usage(c), done).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_shows_in_flight_while_a_request_runs_and_tokens_after() {
    let (c, _) = cluster().await;
    let ep = c.endpoint_url(0);
    c.backend(0).hold_requests(true);
    let request = chat(&c);
    assert!(c.backend(0).wait_for_waiting(1, SOON).await, "never held");
    c.wait_usage(1).await;
    let model = tracked_model(&c);
    let body = wait_usage_body(&c, "in flight 1 on fake 0", |b| {
        count(b, "usage_counts", &ep, &model) == 1
    })
    .await;
    assert_eq!(count(&body, "token_usage_counts", &ep, &model), 0, "{body}");

    c.backend(0).hold_requests(false);
    let r = within("the held request", SOON, request).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text);
    c.wait_usage(0).await;
    let body = wait_usage_body(&c, "in flight 0 and tokens counted", |b| {
        count(b, "usage_counts", &ep, &model) == 0
            && count(b, "token_usage_counts", &ep, &model) > 0
    })
    .await;
    let first = count(&body, "token_usage_counts", &ep, &model);
    assert_eq!(first, control_plane_tokens(&c, &model), "{body}");
    // The model stays listed with 0 in flight.
    assert_eq!(body["usage_counts"][&ep][&model], json!(0), "{body}");

    // Cumulative: a second request adds its tokens.
    let r = within("a second request", SOON, chat(&c)).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text);
    let body = wait_usage_body(&c, "tokens of two requests", |b| {
        count(b, "token_usage_counts", &ep, &model) > first
    })
    .await;
    assert_eq!(
        count(&body, "token_usage_counts", &ep, &model),
        control_plane_tokens(&c, &model),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_keys_are_every_endpoint_url_without_credentials() {
    let (c, credentialed) = cluster().await;
    let r = within("a request", SOON, chat(&c)).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text);
    let model = tracked_model(&c);
    let ep = c.endpoint_url(0);
    let body = wait_usage_body(&c, "tokens counted", |b| {
        count(b, "token_usage_counts", &ep, &model) > 0
    })
    .await;
    let text = body.to_string();
    assert!(
        !text.contains(PASSWORD) && !text.contains(USER),
        "credentials in {text}"
    );
    for map in ["usage_counts", "token_usage_counts"] {
        let keys: Vec<&str> = body[map]
            .as_object()
            .unwrap_or_else(|| panic!("{map} is not an object: {body}"))
            .keys()
            .map(String::as_str)
            .collect();
        let mut want = vec![ep.as_str(), credentialed.as_str()];
        want.sort_unstable();
        assert_eq!(keys, want, "{map}: {body}");
        // The endpoint without models is listed, empty.
        assert_eq!(body[map][&credentialed], json!({}), "{map}: {body}");
        assert!(body[map][&ep][&model].is_u64(), "{map}: {body}");
    }
}

/// A response body as a stream of pieces.
type Body = std::pin::Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// Reads an SSE body event by event (comments skipped).
struct Events {
    body: Body,
    buf: Vec<u8>,
}

/// What the next read of a usage stream gave.
#[derive(Debug)]
enum Read {
    Event(Value),
    /// The body ended cleanly.
    End,
    /// The body broke off with a transport error.
    Broken(String),
}

impl Events {
    fn new(body: Body) -> Self {
        Self {
            body,
            buf: Vec::new(),
        }
    }

    /// The next `data:` event as JSON, waiting at most `timeout`.
    async fn next(&mut self, timeout: Duration) -> Read {
        within("the next usage-stream event", timeout, async {
            loop {
                if let Some(event) = self.complete_event() {
                    return Read::Event(event);
                }
                match self.body.next().await {
                    None => return Read::End,
                    Some(Err(e)) => return Read::Broken(format!("{e:?}")),
                    Some(Ok(piece)) => self.buf.extend_from_slice(&piece),
                }
            }
        })
        .await
    }

    /// Takes complete events off the buffer until one carries data.
    fn complete_event(&mut self) -> Option<Value> {
        while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = self.buf.drain(..end + 2).collect();
            let text = String::from_utf8(event).unwrap();
            let data: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            if !data.is_empty() {
                return Some(serde_json::from_str(&data.join("\n")).unwrap());
            }
            assert!(text.starts_with(':'), "not an SSE event: {text:?}");
        }
        None
    }

    /// Events until one satisfies `done`; returns it.
    async fn until(&mut self, what: &str, mut done: impl FnMut(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + SOON;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Read::Event(v) if done(&v) => return v,
                Read::Event(_) => {}
                Read::End => panic!("usage stream ended before {what}"),
                Read::Broken(e) => panic!("usage stream broke off before {what}: {e}"),
            }
        }
    }
}

async fn open_stream(c: &Cluster) -> Events {
    let resp = within(
        "usage-stream headers",
        SOON,
        c.http()
            .get(c.at("/api/usage-stream"))
            .bearer_auth(ROUTER_KEY)
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    let content_type = resp
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(content_type, "text/event-stream");
    Events::new(Box::pin(resp.bytes_stream()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_stream_sends_the_snapshot_at_once_and_an_event_per_change() {
    let (c, credentialed) = cluster().await;
    let ep = c.endpoint_url(0);
    let mut events = open_stream(&c).await;
    // At once: well before a poll period could matter, nothing changing.
    let Read::Event(first) = events.next(Duration::from_secs(2)).await else {
        panic!("no first event");
    };
    assert_eq!(first, usage(&c).await, "first event is the current body");
    assert_eq!(first["usage_counts"][&credentialed], json!({}), "{first}");

    c.backend(0).hold_requests(true);
    let request = chat(&c);
    let started = events
        .until("an event with the request in flight", |v| {
            v["usage_counts"][&ep]
                .as_object()
                .is_some_and(|models| models.values().any(|n| *n == json!(1)))
        })
        .await;
    assert_eq!(
        c.backend(0).waiting(),
        1,
        "event before the request: {started}"
    );

    c.backend(0).hold_requests(false);
    let r = within("the held request", SOON, request).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text);
    let model = tracked_model(&c);
    let done = events
        .until("an event with the request done", |v| {
            count(v, "usage_counts", &ep, &model) == 0
                && count(v, "token_usage_counts", &ep, &model) > 0
        })
        .await;
    assert_eq!(
        count(&done, "token_usage_counts", &ep, &model),
        control_plane_tokens(&c, &model),
        "{done}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_stream_ends_cleanly_at_sidecar_shutdown() {
    // A long grace: the stream must end when shutdown starts, not hold it
    // for the grace like a request still running.
    let c = Cluster::builder()
        .backend(ollama_fake(&["m:latest"]))
        .set("shutdown_grace", "60s")
        .router_api_key(ROUTER_KEY)
        .start()
        .await;
    let mut events = open_stream(&c).await;
    assert!(matches!(
        events.next(Duration::from_secs(2)).await,
        Read::Event(_)
    ));
    // It ends cleanly (a complete body), not cut by the server closing the
    // connection.
    let reader = tokio::spawn(async move { events.next(Duration::from_secs(5)).await });
    within("sidecar shutdown", Duration::from_secs(10), c.shutdown()).await;
    let end = within("the stream's end", Duration::from_secs(5), reader)
        .await
        .unwrap();
    assert!(matches!(end, Read::End), "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_routes_need_the_router_key() {
    let (c, _) = cluster().await;
    for path in ["/api/usage", "/api/usage-stream"] {
        let r = send(c.http().get(c.at(path))).await;
        assert_eq!(r.status, 401, "{path} without key: {}", r.text);
        assert!(!r.text.contains("usage_counts"), "{path}: {}", r.text);
        let r = send(c.http().get(c.at(path)).bearer_auth("wrong")).await;
        assert_eq!(r.status, 403, "{path} wrong key: {}", r.text);
    }
    let r = send(
        c.http()
            .get(c.at("/api/usage"))
            .query(&[("api_key", ROUTER_KEY)]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.json()["usage_counts"].is_object(), "{}", r.text);
    let resp = c
        .http()
        .get(c.at("/api/usage-stream"))
        .bearer_auth(ROUTER_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}
