//! In-crate end-to-end tests: a standalone sidecar in front of tiny axum
//! backends on `127.0.0.1:0`. (The full fake model server and the
//! whole-system tests live in `tests/`.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router as AxumRouter,
    body::{Body, Bytes},
    extract::{Request, State},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use futures::StreamExt;
use http::{HeaderMap, StatusCode};
use parking_lot::Mutex;
use serde_json::{Value, json};
use switchyard_control_plane::{config::Config, server::RunningControlPlane};
use tokio::sync::Notify;

use super::*;

/// What a fake backend does for inference requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    /// Answer normally.
    Serve,
    /// Answer every inference request with this status.
    Fail(u16),
    /// Answer every inference request as Ollama does for a model it does
    /// not have (404, scheduler text).
    ModelGone,
    /// Answer every inference request as a FastAPI server without that
    /// route does (404 `{"detail":"Not Found"}`).
    NoRoute,
    /// Answer every inference request as Ollama (gin) does for a route it
    /// does not have (404, plain text `404 page not found`).
    NoRouteGin,
    /// Stream one chunk, then hold the stream open until dropped.
    StallAfterFirstChunk,
    /// Stream one chunk and the first half of the next, then end the body
    /// cleanly.
    HalfLineThenEnd,
    /// Stream every chunk, the last without its line ending, then break
    /// the connection (no end of the chunked body).
    FinalUnterminatedThenDrop,
    /// Never send response headers.
    Hang,
}

/// One request a fake backend saw.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    headers: HeaderMap,
    body: Value,
}

#[derive(Clone)]
struct FakeState {
    kind: &'static str,
    models: Vec<&'static str>,
    behaviour: Behaviour,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Streams dropped before their end (the sidecar cancelled them).
    dropped: Arc<AtomicUsize>,
    dropped_signal: Arc<Notify>,
}

struct Fake {
    addr: SocketAddr,
    state: FakeState,
    _server: tokio::task::JoinHandle<()>,
}

impl Fake {
    async fn start(kind: &'static str, models: &[&'static str], behaviour: Behaviour) -> Fake {
        Self::start_versioned(kind, models, behaviour, None).await
    }

    /// [`Fake::start`] whose `GET /api/version` answers `version` (without
    /// one the route is missing: 404).
    async fn start_versioned(
        kind: &'static str,
        models: &[&'static str],
        behaviour: Behaviour,
        version: Option<&'static str>,
    ) -> Fake {
        let state = FakeState {
            kind,
            models: models.to_vec(),
            behaviour,
            seen: Arc::default(),
            dropped: Arc::default(),
            dropped_signal: Arc::default(),
        };
        let app = AxumRouter::new()
            .route("/api/tags", get(fake_tags))
            .route("/api/ps", get(fake_ps))
            .route("/v1/models", get(fake_models))
            .route("/api/chat", post(fake_infer))
            .route("/api/generate", post(fake_infer))
            .route("/api/embed", post(fake_infer))
            .route("/api/show", post(fake_infer))
            .route("/v1/chat/completions", post(fake_infer))
            .route("/v1/embeddings", post(fake_infer))
            .route("/v1/rerank", post(fake_infer))
            .route("/v1/responses", post(fake_infer))
            .route("/v1/messages", post(fake_infer));
        let app = match version {
            Some(version) => app.route(
                "/api/version",
                get(move || async move { Json(json!({ "version": version })) }),
            ),
            None => app,
        }
        .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Fake {
            addr,
            state,
            _server: server,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().clone()
    }

    fn inference_count(&self) -> usize {
        self.seen().len()
    }

    /// Stops listening: new connections are refused.
    async fn stop(self) {
        self._server.abort();
        let _ = self._server.await;
    }
}

/// Ollama `/api/tags` items with the metadata a real server sends (the
/// sidecar's listings must show it): size and digest derived from the name.
async fn fake_tags(State(s): State<FakeState>) -> Json<Value> {
    let models: Vec<Value> = s
        .models
        .iter()
        .map(|m| {
            json!({"name": m, "model": m, "size": m.len() * 1000, "digest": format!("digest-{m}"),
                   "modified_at": "2025-05-10T08:06:48-07:00",
                   "details": {"format": "gguf", "family": "fake", "parameter_size": "1B"}})
        })
        .collect();
    Json(json!({ "models": models }))
}

async fn fake_ps(State(s): State<FakeState>) -> Json<Value> {
    let models: Vec<Value> = s
        .models
        .iter()
        .map(|m| {
            json!({"name": m, "model": m, "size": m.len() * 1000, "size_vram": m.len() * 500,
                   "digest": format!("digest-{m}"), "expires_at": "2030-01-01T00:00:00Z",
                   "context_length": 4096})
        })
        .collect();
    Json(json!({ "models": models }))
}

async fn fake_models(State(s): State<FakeState>) -> Json<Value> {
    let data: Vec<Value> = s
        .models
        .iter()
        .map(|m| json!({"id": m, "object": "model"}))
        .collect();
    Json(json!({ "object": "list", "data": data }))
}

/// Counts a stream dropped before it ended.
struct DropWatch {
    done: bool,
    dropped: Arc<AtomicUsize>,
    signal: Arc<Notify>,
}

impl DropWatch {
    fn completed(&mut self) {
        self.done = true;
    }
}

impl Drop for DropWatch {
    fn drop(&mut self) {
        if !self.done {
            self.dropped.fetch_add(1, Ordering::SeqCst);
            self.signal.notify_waiters();
        }
    }
}

async fn fake_infer(State(s): State<FakeState>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let headers = req.headers().clone();
    let bytes = axum::body::to_bytes(req.into_body(), usize::MAX)
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    s.seen.lock().push(Seen {
        path: path.clone(),
        headers,
        body: body.clone(),
    });
    match s.behaviour {
        Behaviour::Serve
        | Behaviour::StallAfterFirstChunk
        | Behaviour::HalfLineThenEnd
        | Behaviour::FinalUnterminatedThenDrop => {}
        Behaviour::NoRoute => {
            return (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"}))).into_response();
        }
        Behaviour::NoRouteGin => {
            return (StatusCode::NOT_FOUND, "404 page not found").into_response();
        }
        Behaviour::ModelGone => {
            let model = body["model"].as_str().unwrap_or_default();
            return (
                StatusCode::NOT_FOUND,
                Json(
                    json!({"error": format!("model \"{model}\" not found, try pulling it first")}),
                ),
            )
                .into_response();
        }
        Behaviour::Fail(code) => {
            let status = StatusCode::from_u16(code).unwrap();
            return (
                status,
                Json(json!({"error": format!("fake failure {code}")})),
            )
                .into_response();
        }
        Behaviour::Hang => {
            std::future::pending::<()>().await;
        }
    }
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    if path == "/api/show" {
        return Json(json!({"modelfile": format!("FROM {}", body["name"].as_str().unwrap_or(&model)), "details": {}}))
            .into_response();
    }
    if path == "/v1/messages" {
        return messages_answer(&model, body["stream"].as_bool().unwrap_or(false));
    }
    if path == "/v1/responses" {
        return responses_answer(&model, body["stream"].as_bool().unwrap_or(false));
    }
    if path == "/v1/rerank" {
        // llama-server's answer (vLLM's has the same `results` and `usage`).
        let results: Vec<Value> = body["documents"]
            .as_array()
            .map(|docs| {
                (0..docs.len())
                    .rev()
                    .map(|i| json!({"index": i, "relevance_score": i as f64 / 10.0}))
                    .collect()
            })
            .unwrap_or_default();
        return Json(json!({"model": model, "object": "list", "results": results,
                           "usage": {"prompt_tokens": 7, "total_tokens": 7}}))
        .into_response();
    }
    let openai = path.starts_with("/v1/");
    let stream = body["stream"].as_bool().unwrap_or(!openai);
    if path.ends_with("embed") || path.ends_with("embeddings") {
        return if openai {
            Json(json!({"object":"list","data":[{"index":0,"embedding":[0.1,0.2]},{"index":1,"embedding":[0.3,0.4]}],
                        "usage":{"prompt_tokens":4,"total_tokens":4}}))
            .into_response()
        } else {
            Json(json!({"model": model, "embeddings": [[0.1, 0.2]], "prompt_eval_count": 4}))
                .into_response()
        };
    }
    let chunks: Vec<String> = if openai {
        if stream {
            vec![
                format!(
                    "data: {}\n\n",
                    json!({"id":"c1","object":"chat.completion.chunk","model":model,"choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"},"finish_reason":null}]})
                ),
                format!(
                    "data: {}\n\n",
                    json!({"id":"c1","object":"chat.completion.chunk","model":model,"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":null}]})
                ),
                format!(
                    "data: {}\n\n",
                    json!({"id":"c1","object":"chat.completion.chunk","model":model,"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]})
                ),
                format!(
                    "data: {}\n\n",
                    json!({"id":"c1","object":"chat.completion.chunk","model":model,"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}})
                ),
                "data: [DONE]\n\n".to_owned(),
            ]
        } else {
            return Json(json!({"id":"c1","object":"chat.completion","model":model,
                "choices":[{"index":0,"message":{"role":"assistant","content":"Hello"},"finish_reason":"stop"}],
                "usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}))
            .into_response();
        }
    } else if stream {
        vec![
            format!(
                "{}\n",
                json!({"model":model,"message":{"role":"assistant","content":"Hel"},"done":false})
            ),
            format!(
                "{}\n",
                json!({"model":model,"message":{"role":"assistant","content":"lo"},"done":false})
            ),
            format!(
                "{}\n",
                json!({"model":model,"message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","prompt_eval_count":3,"eval_count":2})
            ),
        ]
    } else {
        return Json(json!({"model":model,"message":{"role":"assistant","content":"Hello"},"done":true,"prompt_eval_count":3,"eval_count":2})).into_response();
    };
    let behaviour = s.behaviour;
    let mut watch = DropWatch {
        done: false,
        dropped: s.dropped.clone(),
        signal: s.dropped_signal.clone(),
    };
    let last = chunks.len() - 1;
    let body = async_stream::stream! {
        for (i, chunk) in chunks.into_iter().enumerate() {
            match behaviour {
                Behaviour::HalfLineThenEnd if i == 1 => {
                    yield Ok::<Bytes, std::io::Error>(Bytes::from(chunk[..chunk.len() / 2].to_owned()));
                    break;
                }
                Behaviour::FinalUnterminatedThenDrop if i == last => {
                    yield Ok(Bytes::from(chunk.trim_end_matches('\n').to_owned()));
                    // Sent before the connection breaks.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    yield Err(std::io::Error::other("connection dropped"));
                    return;
                }
                _ => yield Ok(Bytes::from(chunk)),
            }
            if behaviour == Behaviour::StallAfterFirstChunk && i == 0 {
                std::future::pending::<()>().await;
            }
        }
        watch.completed();
    };
    let content_type = if openai {
        "text/event-stream"
    } else {
        "application/x-ndjson"
    };
    (
        [(http::header::CONTENT_TYPE, content_type)],
        Body::from_stream(body),
    )
        .into_response()
}

/// The Responses API stream a fake sends (typed events, no `[DONE]`).
fn responses_events(model: &str) -> Vec<String> {
    let created = json!({"type": "response.created", "sequence_number": 0,
        "response": {"id": "resp_1", "object": "response", "model": model, "status": "in_progress", "error": null, "usage": null}});
    let delta = json!({"type": "response.output_text.delta", "sequence_number": 1,
        "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": "Hello"});
    let completed = json!({"type": "response.completed", "sequence_number": 2,
        "response": {"id": "resp_1", "object": "response", "model": model, "status": "completed", "error": null,
                     "usage": {"input_tokens": 12, "output_tokens": 5, "total_tokens": 17}}});
    typed_events([created, delta, completed])
}

/// SSE events named by their data's `type` (`event: <type>`, `data:`), as
/// the Responses and Anthropic Messages APIs send them.
fn typed_events(events: impl IntoIterator<Item = Value>) -> Vec<String> {
    events
        .into_iter()
        .map(|data| {
            format!(
                "event: {}\ndata: {data}\n\n",
                data["type"].as_str().unwrap()
            )
        })
        .collect()
}

/// An SSE response sending `events` one by one.
fn event_stream(events: Vec<String>) -> Response {
    let chunks = events
        .into_iter()
        .map(|e| Ok::<Bytes, Infallible>(Bytes::from(e)));
    (
        [(http::header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(futures::stream::iter(chunks)),
    )
        .into_response()
}

fn responses_answer(model: &str, stream: bool) -> Response {
    if !stream {
        return Json(json!({"id": "resp_1", "object": "response", "model": model, "status": "completed",
            "error": null, "output_text": "Hello",
            "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]}],
            "usage": {"input_tokens": 12, "output_tokens": 5, "total_tokens": 17}}))
        .into_response();
    }
    event_stream(responses_events(model))
}

/// The Anthropic Messages stream a fake sends (typed events, ending with
/// `message_stop`).
fn messages_events(model: &str) -> Vec<String> {
    typed_events([
        json!({"type": "message_start", "message": {"id": "msg_1", "type": "message",
            "role": "assistant", "model": model, "content": [], "stop_reason": null,
            "usage": {"input_tokens": 12, "output_tokens": 1}}}),
        json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}),
        json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": "Hel"}}),
        json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": "lo"}}),
        json!({"type": "content_block_stop", "index": 0}),
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 5}}),
        json!({"type": "message_stop"}),
    ])
}

fn messages_answer(model: &str, stream: bool) -> Response {
    if !stream {
        return Json(
            json!({"id": "msg_1", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": "Hello"}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 12, "output_tokens": 5}}),
        )
        .into_response();
    }
    event_stream(messages_events(model))
}

fn config(yaml: &str) -> Config {
    Config::from_yaml(yaml, &|_| None).unwrap()
}

fn endpoints_yaml(fakes: &[&Fake]) -> String {
    let mut ollama = Vec::new();
    let mut llama = Vec::new();
    for f in fakes {
        match f.state.kind {
            "llama_server" => llama.push(format!("\"{}\"", f.url())),
            _ => ollama.push(format!("\"{}\"", f.url())),
        }
    }
    format!(
        "endpoints: [{}]\nllama_server_endpoints: [{}]\nprobe_interval: 0.1\nmax_concurrent_connections: 4\n",
        ollama.join(", "),
        llama.join(", ")
    )
}

async fn sidecar(yaml: &str) -> SidecarHandle {
    start(StartOptions {
        mode: Mode::Standalone {
            config: config(yaml),
            control_plane_listen: None,
        },
        listen: "127.0.0.1:0".parse().unwrap(),
        name: "test".into(),
    })
    .await
    .unwrap()
}

/// Waits (bounded) until every endpoint has been probed healthy.
async fn wait_routable(handle: &SidecarHandle, endpoints: usize) {
    for _ in 0..500 {
        let state = handle.router().cluster_state();
        if state.endpoints.iter().filter(|e| e.healthy).count() >= endpoints {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("endpoints never became healthy");
}

/// Waits (bounded) until the sidecar holds no lease.
async fn wait_no_leases(handle: &SidecarHandle) {
    for _ in 0..500 {
        if handle.router().local_in_flight() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("leases still held: {}", handle.router().local_in_flight());
}

/// The sidecar's `/metrics` page.
async fn metrics_text(handle: &SidecarHandle) -> String {
    client()
        .get(format!("http://{}/metrics", handle.addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Three chats through a sidecar whose first endpoint answers with
/// `failing` and whose second serves: each must end on the second. Returns
/// the metrics once every lease is back, and how many chats the failing
/// endpoint saw.
async fn three_chats_fail_over(failing: Behaviour) -> (String, usize) {
    let (bad, good, sc) = failing_then_serving(failing).await;
    for _ in 0..3 {
        assert_eq!(chat_llama3(&sc).await.status(), 200);
    }
    assert_eq!(good.inference_count(), 3);
    assert!(bad.inference_count() >= 1);
    wait_no_leases(&sc).await;
    let metrics = metrics_text(&sc).await;
    sc.shutdown().await;
    (metrics, bad.inference_count())
}

/// Two `llama3` endpoints, the first answering with `failing`, behind a
/// sidecar with priority routing: config order breaks ties, so the failing
/// endpoint is tried first. Returns (failing, serving, sidecar), routable.
async fn failing_then_serving(failing: Behaviour) -> (Fake, Fake, SidecarHandle) {
    let bad = Fake::start("ollama", &["llama3:latest"], failing).await;
    let good = Fake::start("ollama", &["llama3:latest"], Behaviour::Serve).await;
    let yaml = format!("{}priority_routing: true\n", endpoints_yaml(&[&bad, &good]));
    let sc = sidecar(&yaml).await;
    wait_routable(&sc, 2).await;
    (bad, good, sc)
}

/// A non-streaming `/api/chat` for `llama3` through `sc`.
async fn chat_llama3(sc: &SidecarHandle) -> reqwest::Response {
    chat_with(&client(), sc).await
}

async fn chat_with(client: &reqwest::Client, sc: &SidecarHandle) -> reqwest::Response {
    client
        .post(format!("http://{}/api/chat", sc.addr))
        .json(&json!({"model": "llama3", "messages": [{"role":"user","content":"hi"}], "stream": false}))
        .send()
        .await
        .unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

fn ndjson(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn ollama_chat_streams_by_default_through_to_done() {
    let fake = Fake::start("ollama", &["llama3:latest"], Behaviour::Serve).await;
    let sc = sidecar(&endpoints_yaml(&[&fake])).await;
    wait_routable(&sc, 1).await;
    let url = format!("http://{}/api/chat", sc.addr);
    let r = client()
        .post(&url)
        .json(&json!({"model": "llama3", "messages": [{"role":"user","content":"hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let lines = ndjson(&r.text().await.unwrap());
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[2]["done"], true);
    // The body was forwarded as sent: the client's untagged name (Ollama
    // resolves `:latest` itself and answers with the name it was sent) and
    // no stream field added (Ollama's default holds).
    let seen = fake.seen();
    assert_eq!(seen[0].path, "/api/chat");
    assert_eq!(seen[0].body["model"], "llama3");
    assert!(seen[0].body.get("stream").is_none());
    wait_no_leases(&sc).await;

    // `/api/show` from an older client (`name`) passes through, with the
    // name as sent (this fake echoes it; Ollama resolves `:latest`).
    let r = client()
        .post(format!("http://{}/api/show", sc.addr))
        .json(&json!({"name": "llama3"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["modelfile"], "FROM llama3");
    assert_eq!(fake.seen().last().unwrap().body["name"], "llama3");

    // Non-streaming.
    let r = client()
        .post(&url)
        .json(&json!({"model": "llama3:latest", "messages": [], "stream": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["message"]["content"], "Hello");
    wait_no_leases(&sc).await;
    sc.shutdown().await;
}

#[tokio::test]
async fn openai_stream_keeps_finish_reason_and_done_and_no_stream_options_added() {
    let fake = Fake::start("ollama", &["llama3:latest"], Behaviour::Serve).await;
    let sc = sidecar(&endpoints_yaml(&[&fake])).await;
    wait_routable(&sc, 1).await;
    let url = format!("http://{}/v1/chat/completions", sc.addr);
    let r = client()
        .post(&url)
        .header("authorization", "Bearer client-secret")
        .json(&json!({"model": "llama3:latest", "messages": [{"role":"user","content":"hi"}], "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("\"finish_reason\":\"stop\""), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let r = client()
        .post(&url)
        .json(&json!({"model": "llama3:latest", "messages": [{"role":"user","content":"hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Hello");
    let seen = fake.seen();
    assert_eq!(seen[0].path, "/v1/chat/completions");
    assert!(seen[1].body.get("stream_options").is_none());
    // The client's key never reaches the backend.
    assert!(seen[0].headers.get("authorization").is_none());
    wait_no_leases(&sc).await;
    sc.shutdown().await;
}

#[tokio::test]
async fn unknown_model_is_404_listing_models_in_client_format() {
    let fake = Fake::start("ollama", &["llama3:latest"], Behaviour::Serve).await;
    let sc = sidecar(&endpoints_yaml(&[&fake])).await;
    wait_routable(&sc, 1).await;
    let r = client()
        .post(format!("http://{}/api/chat", sc.addr))
        .json(&json!({"model": "nope", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.contains("nope") && msg.contains("llama3:latest"),
        "{msg}"
    );
    assert!(!msg.contains("127.0.0.1"), "{msg}");
    let r = client()
        .post(format!("http://{}/v1/chat/completions", sc.addr))
        .json(&json!({"model": "nope", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "model_not_found");
    assert_eq!(fake.inference_count(), 0);
    sc.shutdown().await;
}

#[tokio::test]
async fn bad_requests_are_400_and_413() {
    let fake = Fake::start("ollama", &["llama3:latest"], Behaviour::Serve).await;
    let yaml = format!("{}max_body_bytes: 1000\n", endpoints_yaml(&[&fake]));
    let sc = sidecar(&yaml).await;
    let base = format!("http://{}", sc.addr);
    let r = client()
        .post(format!("{base}/api/chat"))
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().await.unwrap()["error"].is_string());
    let r = client()
        .post(format!("{base}/v1/embeddings"))
        .json(&json!({"input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["param"], "model");
    let big = json!({"model": "llama3", "prompt": "x".repeat(5000)});
    let r = client()
        .post(format!("{base}/api/generate"))
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let r = client()
        .get(format!("{base}/api/nothing"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.json::<Value>().await.unwrap()["error"].is_string());
    // A base URL ending in `/` doubles the slash: still OpenAI's format.
    let r = client()
        .get(format!("{base}//v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["message"],
        "route not found"
    );
    // A path parameter that is not UTF-8: 400 in the client's format, not
    // axum's plain-text rejection.
    for (path, openai) in [("/v1/models/%FF", true), ("/api/blobs/%C3%28", false)] {
        let r = client().head(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 400, "HEAD {path}");
        let r = client()
            .request(
                if openai {
                    reqwest::Method::GET
                } else {
                    reqwest::Method::POST
                },
                format!("{base}{path}"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{path}");
        assert!(
            r.headers()[reqwest::header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{path}"
        );
        let body = r.json::<Value>().await.unwrap();
        let message = if openai {
            &body["error"]["message"]
        } else {
            &body["error"]
        };
        assert!(
            message
                .as_str()
                .is_some_and(|m| m.starts_with("invalid URL path")),
            "{path}: {body}"
        );
    }
    sc.shutdown().await;
}

#[tokio::test]
async fn retries_on_another_endpoint_after_a_5xx() {
    let (metrics, _) = three_chats_fail_over(Behaviour::Fail(503)).await;
    assert!(
        !metrics.contains("switchyard_sidecar_retries_total 0"),
        "{metrics}"
    );
    assert!(metrics.contains("outcome=\"backend_error\""), "{metrics}");
}

#[tokio::test]
async fn retries_on_another_endpoint_after_a_refused_connection() {
    let gone = Fake::start("ollama", &["llama3:latest"], Behaviour::Serve).await;
    let good = Fake::start("ollama", &["llama3:latest"], Behaviour::Serve).await;
    // Slow probes: the stopped endpoint still looks healthy when the request
    // comes, as it would between two probe rounds.
    let yaml = format!(
        "{}priority_routing: true\nprobe_interval: 60\n",
        endpoints_yaml(&[&gone, &good]).replace("probe_interval: 0.1\n", "")
    );
    let sc = sidecar(&yaml).await;
    wait_routable(&sc, 2).await;
    gone.stop().await;
    let r = client()
        .post(format!("http://{}/api/chat", sc.addr))
        .json(&json!({"model": "llama3", "messages": [{"role":"user","content":"hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let lines = ndjson(&r.text().await.unwrap());
    assert_eq!(lines.last().unwrap()["done"], true);
    assert_eq!(good.inference_count(), 1);
    wait_no_leases(&sc).await;
    let metrics = metrics_text(&sc).await;
    assert!(metrics.contains("outcome=\"connect_error\""), "{metrics}");
    sc.shutdown().await;
}

#[tokio::test]
async fn total_failure_is_reported_in_the_client_format() {
    let bad = Fake::start("ollama", &["llama3:latest"], Behaviour::Fail(500)).await;
    let yaml = format!("{}max_attempts: 2\n", endpoints_yaml(&[&bad]));
    let sc = sidecar(&yaml).await;
    wait_routable(&sc, 1).await;
    let r = client()
        .post(format!("http://{}/v1/chat/completions", sc.addr))
        .json(&json!({"model": "llama3:latest", "messages": []}))
        .send()
        .await
        .unwrap();
    // One endpoint, failing with 500: 502 in OpenAI format, never a 200.
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("fake failure"),
        "{v}"
    );
    // A 4xx is the client's: passed through, not retried, even with
    // another endpoint to try.
    let picky = Fake::start("ollama", &["llama3:latest"], Behaviour::Fail(400)).await;
    let spare = Fake::start("ollama", &["llama3:latest"], Behaviour::Serve).await;
    let yaml = format!(
        "{}priority_routing: true\n",
        endpoints_yaml(&[&picky, &spare])
    );
    let sc2 = sidecar(&yaml).await;
    wait_routable(&sc2, 2).await;
    let r = client()
        .post(format!("http://{}/api/chat", sc2.addr))
        .json(&json!({"model": "llama3", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "fake failure 400"
    );
    assert_eq!(picky.inference_count(), 1);
    assert_eq!(spare.inference_count(), 0);
    wait_no_leases(&sc).await;
    wait_no_leases(&sc2).await;
    sc.shutdown().await;
    sc2.shutdown().await;
}

/// A streamed chat through `sc`: Ollama `/api/chat` (NDJSON lines) or, for
/// `openai`, `/v1/chat/completions` (SSE `data:` payloads).
async fn streamed_payloads(sc: &SidecarHandle, openai: bool) -> Vec<String> {
    let path = if openai {
        "/v1/chat/completions"
    } else {
        "/api/chat"
    };
    let r = client()
        .post(format!("http://{}{path}", sc.addr))
        .json(&json!({"model": "llama3", "stream": true, "messages": [{"role":"user","content":"hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    text.lines()
        .filter_map(|l| {
            if openai {
                l.strip_prefix("data: ").map(str::to_owned)
            } else {
                Some(l.to_owned())
            }
        })
        .filter(|l| !l.is_empty())
        .collect()
}

/// A backend that ends its body cleanly halfway through a line: the half
/// line is not passed on (it would be a line the client cannot parse),
/// and the error that follows is a line of its own.
#[tokio::test]
async fn half_a_line_at_a_clean_end_is_dropped_and_the_error_is_a_line_of_its_own() {
    for kind in ["ollama", "llama_server"] {
        let fake = Fake::start(kind, &["llama3:latest"], Behaviour::HalfLineThenEnd).await;
        let sc = sidecar(&endpoints_yaml(&[&fake])).await;
        wait_routable(&sc, 1).await;
        let openai = kind == "llama_server";
        let payloads = streamed_payloads(&sc, openai).await;
        for p in &payloads {
            assert!(
                serde_json::from_str::<Value>(p).is_ok(),
                "{kind}: not JSON: {p:?} in {payloads:?}"
            );
        }
        let last: Value = serde_json::from_str(payloads.last().unwrap()).unwrap();
        let message = if openai {
            &last["error"]["message"]
        } else {
            &last["error"]
        };
        assert!(message.is_string(), "{kind}: {payloads:?}");
        assert_eq!(payloads.len(), 2, "{kind}: one whole chunk, then the error");
        wait_no_leases(&sc).await;
        sc.shutdown().await;
    }
}

/// A final chunk without its line ending, and then a broken connection:
/// the chunk goes on and the stream ends well (no error after it), as it
/// does when the connection ends cleanly.
#[tokio::test]
async fn a_final_chunk_without_its_line_ending_ends_the_stream_even_if_the_connection_breaks() {
    for kind in ["ollama", "llama_server"] {
        let fake = Fake::start(
            kind,
            &["llama3:latest"],
            Behaviour::FinalUnterminatedThenDrop,
        )
        .await;
        let sc = sidecar(&endpoints_yaml(&[&fake])).await;
        wait_routable(&sc, 1).await;
        let openai = kind == "llama_server";
        let payloads = streamed_payloads(&sc, openai).await;
        let last = payloads.last().unwrap();
        if openai {
            assert_eq!(last, "[DONE]", "{payloads:?}");
        } else {
            let last: Value = serde_json::from_str(last).unwrap();
            assert_eq!(last["done"], json!(true), "{payloads:?}");
        }
        assert!(
            !payloads.iter().any(|p| p.contains("\"error\"")),
            "{kind}: {payloads:?}"
        );
        wait_no_leases(&sc).await;
        // Released as ok: a failure would mark the model failing there.
        let state = sc.router().cluster_state();
        assert!(
            state.endpoints[0].failing_models.is_empty(),
            "{kind}: {:?}",
            state.endpoints[0]
        );
        sc.shutdown().await;
    }
}

#[tokio::test]
async fn client_disconnect_mid_stream_cancels_upstream_and_releases() {
    let fake = Fake::start(
        "ollama",
        &["llama3:latest"],
        Behaviour::StallAfterFirstChunk,
    )
    .await;
    let sc = sidecar(&endpoints_yaml(&[&fake])).await;
    wait_routable(&sc, 1).await;
    let dropped = fake.state.dropped_signal.notified();
    let r = client()
        .post(format!("http://{}/api/chat", sc.addr))
        .json(&json!({"model": "llama3", "messages": [{"role":"user","content":"hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(std::str::from_utf8(&first).unwrap().contains("Hel"));
    assert_eq!(sc.router().local_in_flight(), 1);
    drop(body);
    tokio::time::timeout(Duration::from_secs(5), dropped)
        .await
        .expect("upstream stream not cancelled");
    assert_eq!(fake.state.dropped.load(Ordering::SeqCst), 1);
    wait_no_leases(&sc).await;
    // Released as cancelled, with what was streamed: one chunk, one token.
    let state = sc.router().cluster_state();
    let usage = &state.endpoints[0].usage;
    assert_eq!(usage.len(), 1, "{usage:?}");
    assert_eq!(
        (usage[0].requests, usage[0].completion_tokens),
        (1, 1),
        "{usage:?}"
    );
    sc.shutdown().await;
}

#[tokio::test]
async fn idle_timeout_ends_the_stream_with_an_error_line() {
    let fake = Fake::start(
        "ollama",
        &["llama3:latest"],
        Behaviour::StallAfterFirstChunk,
    )
    .await;
    let yaml = format!(
        "{}timeouts:\n  ollama:\n    idle: 0.2\n",
        endpoints_yaml(&[&fake])
    );
    let sc = sidecar(&yaml).await;
    wait_routable(&sc, 1).await;
    let r = client()
        .post(format!("http://{}/api/chat", sc.addr))
        .json(&json!({"model": "llama3", "messages": [{"role":"user","content":"hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let lines = ndjson(&r.text().await.unwrap());
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[1]["error"].as_str().unwrap().contains("nothing"),
        "{lines:?}"
    );
    wait_no_leases(&sc).await;
    let metrics = metrics_text(&sc).await;
    assert!(metrics.contains("outcome=\"idle_timeout\""), "{metrics}");
    sc.shutdown().await;
}

#[tokio::test]
async fn first_byte_timeout_is_504() {
    let fake = Fake::start("ollama", &["llama3:latest"], Behaviour::Hang).await;
    let yaml = format!(
        "{}max_attempts: 1\ntimeouts:\n  ollama:\n    first_byte: 0.2\n",
        endpoints_yaml(&[&fake])
    );
    let sc = sidecar(&yaml).await;
    wait_routable(&sc, 1).await;
    let r = client()
        .post(format!("http://{}/api/generate", sc.addr))
        .json(&json!({"model": "llama3", "prompt": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert!(r.json::<Value>().await.unwrap()["error"].is_string());
    wait_no_leases(&sc).await;
    sc.shutdown().await;
}

#[tokio::test]
async fn a_client_expecting_100_continue_gets_its_answer() {
    // curl sends `Expect: 100-continue` on large bodies and waits for the
    // interim answer before sending the body; the backend must then answer
    // at once, not after the first-byte timeout.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fake = Fake::start("ollama", &["llama3:latest"], Behaviour::Serve).await;
    let sc = sidecar(&endpoints_yaml(&[&fake])).await;
    wait_routable(&sc, 1).await;
    let body = r#"{"model":"llama3","messages":[{"role":"user","content":"hi"}],"stream":false}"#;
    let mut sock = tokio::net::TcpStream::connect(sc.addr).await.unwrap();
    let head = format!(
        "POST /api/chat HTTP/1.1\r\nhost: sidecar\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nexpect: 100-continue\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let exchange = async {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("100 Continue") {
            let n = sock.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before 100 Continue");
            got.extend_from_slice(&buf[..n]);
        }
        sock.write_all(body.as_bytes()).await.unwrap();
        while !String::from_utf8_lossy(&got).contains("\"done\":true") {
            let n = sock.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed before the answer: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(got).unwrap()
    };
    let got = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("no answer within 10 s");
    assert!(got.contains("HTTP/1.1 200 OK"), "{got}");
    wait_no_leases(&sc).await;
    sc.shutdown().await;
}

#[tokio::test]
async fn a_client_that_sends_no_complete_head_is_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fake = Fake::start("ollama", &["llama3:latest"], Behaviour::Serve).await;
    let yaml = format!("{}client_header_timeout: 0.3\n", endpoints_yaml(&[&fake]));
    let sc = sidecar(&yaml).await;
    wait_routable(&sc, 1).await;
    let closed_within = |mut sock: tokio::net::TcpStream, what: &'static str| async move {
        let mut buf = [0u8; 1024];
        let started = tokio::time::Instant::now();
        // End of stream or a reset: either way the sidecar let go.
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match sock.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(read.is_ok(), "{what}: connection still open after 5 s");
        started.elapsed()
    };

    // Half a head, then silence.
    let mut sock = tokio::net::TcpStream::connect(sc.addr).await.unwrap();
    sock.write_all(b"POST /api/chat HTTP/1.1\r\nhost: sidecar\r\n")
        .await
        .unwrap();
    let took = closed_within(sock, "half a head").await;
    assert!(took >= Duration::from_millis(250), "closed after {took:?}");
    // Nothing at all.
    let sock = tokio::net::TcpStream::connect(sc.addr).await.unwrap();
    closed_within(sock, "nothing").await;

    // A client that sends its requests is served, also after pausing for
    // longer than the timeout (its idle connection was closed meanwhile,
    // and it opens another).
    let client = client();
    for pause in [0, 500] {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let r = chat_with(&client, &sc).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    sc.shutdown().await;
}

#[tokio::test]
async fn router_key_is_required_and_backend_key_sent() {
    let fake = Fake::start("llama_server", &["qwen"], Behaviour::Serve).await;
    let yaml = format!(
        "{}router_api_key: sekret\napi_keys:\n  \"{}\": backend-key\n",
        endpoints_yaml(&[&fake]),
        fake.url()
    );
    let sc = sidecar(&yaml).await;
    let base = format!("http://{}", sc.addr);
    let r = client()
        .get(format!("{base}/api/tags"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .get(format!("{base}/v1/models"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].is_string());
    // Liveness stays public.
    let r = client().get(format!("{base}/")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "Ollama is running");
    wait_routable(&sc, 1).await;
    let r = client()
        .post(format!("{base}/v1/chat/completions?api_key=sekret"))
        .json(&json!({"model": "qwen", "messages": [{"role":"user","content":"hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = fake.seen();
    assert_eq!(seen[0].headers["authorization"], "Bearer backend-key");
    // Inference POSTs without a query take the entry's fast path: the same
    // check, the same answers in the client's format.
    let chat =
        json!({"model": "qwen", "messages": [{"role":"user","content":"hi"}], "stream": false});
    let r = client()
        .post(format!("{base}/api/chat"))
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.json::<Value>().await.unwrap()["error"].is_string());
    let r = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth("wrong")
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].is_string());
    let r = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth("sekret")
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = fake.seen();
    assert_eq!(seen.len(), 2, "refused requests never reach the backend");
    assert_eq!(seen[1].headers["authorization"], "Bearer backend-key");
    sc.shutdown().await;
}

#[tokio::test]
async fn ollama_chat_is_translated_for_llama_server() {
    let fake = Fake::start("llama_server", &["qwen"], Behaviour::Serve).await;
    let sc = sidecar(&endpoints_yaml(&[&fake])).await;
    wait_routable(&sc, 1).await;
    let r = client()
        .post(format!("http://{}/api/chat", sc.addr))
        .json(&json!({"model": "qwen", "messages": [{"role":"user","content":"hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let lines = ndjson(&r.text().await.unwrap());
    let last = lines.last().unwrap();
    assert_eq!(last["done"], true, "{lines:?}");
    assert_eq!(last["eval_count"], 2, "{lines:?}");
    let text: String = lines
        .iter()
        .filter_map(|l| l["message"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello");
    let seen = fake.seen();
    assert_eq!(seen[0].path, "/v1/chat/completions");
    assert_eq!(seen[0].body["stream"], true);

    // Embeddings: every vector comes back.
    let r = client()
        .post(format!("http://{}/api/embed", sc.addr))
        .json(&json!({"model": "qwen", "input": ["a", "b"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["embeddings"].as_array().unwrap().len(), 2, "{v}");
    // `/api/show` for an OpenAI-only model is synthesized (no backend call).
    let before = fake.inference_count();
    let r = client()
        .post(format!("http://{}/api/show", sc.addr))
        .json(&json!({"name": "qwen"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["capabilities"].is_array(), "{v}");
    assert_eq!(fake.inference_count(), before);
    // Listings include the OpenAI-only model.
    let tags: Value = client()
        .get(format!("http://{}/api/tags", sc.addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tags["models"][0]["name"], "qwen:latest");
    wait_no_leases(&sc).await;
    sc.shutdown().await;
}

/// `POST /v1/messages` (Anthropic Messages, what Claude Code speaks) is
/// routed by model to the backend's `/v1/messages`: the router key may come
/// as `x-api-key` (and is never forwarded), a stream passes through whole and
/// ends at `message_stop` without an error appended, and refusals are in
/// Anthropic's error format.
#[tokio::test]
async fn anthropic_messages_pass_through_with_anthropic_errors() {
    let fake = Fake::start("ollama", &["llama3:latest"], Behaviour::Serve).await;
    let yaml = format!("{}router_api_key: rk\n", endpoints_yaml(&[&fake]));
    let sc = sidecar(&yaml).await;
    wait_routable(&sc, 1).await;
    let url = format!("http://{}/v1/messages", sc.addr);
    let messages = |body: Value| {
        client()
            .post(&url)
            .header("x-api-key", "rk")
            .header("anthropic-version", "2023-06-01")
            .json(&body)
            .send()
    };
    let ask = json!({"model": "llama3", "max_tokens": 64,
                     "messages": [{"role": "user", "content": "hi"}]});
    let r = messages(ask.clone()).await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["content"][0]["text"], "Hello", "{v}");

    let mut streamed = ask.clone();
    streamed["stream"] = json!(true);
    let r = messages(streamed).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    assert_eq!(r.text().await.unwrap(), messages_events("llama3").concat());
    let seen = fake.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.path, "/v1/messages");
        assert!(s.headers.get("x-api-key").is_none(), "{:?}", s.headers);
        assert!(s.headers.get("authorization").is_none(), "{:?}", s.headers);
        assert_eq!(s.headers["anthropic-version"], "2023-06-01");
    }
    wait_no_leases(&sc).await;

    // Refusals in Anthropic's format: unknown model, bad body, no key.
    let mut unknown = ask.clone();
    unknown["model"] = json!("nope");
    let r = messages(unknown).await.unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "not_found_error", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("nope"),
        "{v}"
    );
    let r = client()
        .post(&url)
        .header("x-api-key", "rk")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    let r = client().post(&url).json(&ask).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "authentication_error", "{v}");
    let r = client()
        .post(&url)
        .header("x-api-key", "wrong")
        .json(&ask)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(fake.inference_count(), 2);
    sc.shutdown().await;
}

/// `POST /v1/responses` (the Responses API) is routed by model to the
/// backend's `/v1/responses`: a stream passes through whole and ends at
/// `response.completed` without an error appended (it has no `[DONE]`), and
/// both forms release their lease.
#[tokio::test]
async fn responses_api_passes_through_streamed_and_not() {
    let fake = Fake::start("ollama", &["llama3:latest"], Behaviour::Serve).await;
    let sc = sidecar(&endpoints_yaml(&[&fake])).await;
    wait_routable(&sc, 1).await;
    let url = format!("http://{}/v1/responses", sc.addr);
    let r = client()
        .post(&url)
        .json(&json!({"model": "llama3", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["output_text"], "Hello", "{v}");
    assert_eq!(v["usage"]["output_tokens"], 5, "{v}");

    let r = client()
        .post(&url)
        .json(&json!({"model": "llama3", "input": "hi", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.unwrap();
    assert_eq!(text, responses_events("llama3").concat());

    let seen = fake.seen();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|s| s.path == "/v1/responses"), "{seen:?}");
    assert_eq!(seen[1].body["stream"], true);
    wait_no_leases(&sc).await;
    let metrics = metrics_text(&sc).await;
    assert!(
        metrics.contains("route=\"/v1/responses\"") && !metrics.contains("status=\"502\""),
        "{metrics}"
    );
    sc.shutdown().await;
}

/// `/v1/rerank` and its alias `/rerank` are routed by model to the chosen
/// backend's `/v1/rerank` (llama-server and vLLM serve it there), answer as
/// the backend did, release their lease, and refuse in OpenAI's format.
#[tokio::test]
async fn rerank_is_routed_by_model_to_the_backends_v1_rerank() {
    let reranker = Fake::start("llama_server", &["bge-reranker"], Behaviour::Serve).await;
    let ollama = Fake::start("ollama", &["llama3:latest"], Behaviour::Serve).await;
    let yaml = format!(
        "{}router_api_key: rk\n",
        endpoints_yaml(&[&reranker, &ollama])
    );
    let sc = sidecar(&yaml).await;
    wait_routable(&sc, 2).await;
    let base = format!("http://{}", sc.addr);
    let rerank = |path: &str, body: Value| {
        client()
            .post(format!("{base}{path}"))
            .bearer_auth("rk")
            .json(&body)
            .send()
    };
    for path in ["/v1/rerank", "/rerank"] {
        let r = rerank(
            path,
            json!({"model": "bge-reranker", "query": "q", "documents": ["a", "b", "c"], "top_n": 3}),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["results"].as_array().unwrap().len(), 3, "{path}: {v}");
        assert_eq!(v["results"][0]["index"], 2, "{path}: {v}");
    }
    let seen = reranker.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.path, "/v1/rerank");
        assert_eq!(s.body["query"], "q");
        assert_eq!(s.body["documents"][2], "c");
        // The router key is the client's credential, never the backend's.
        assert!(s.headers.get("authorization").is_none(), "{:?}", s.headers);
    }
    assert_eq!(ollama.inference_count(), 0);
    wait_no_leases(&sc).await;
    let metrics = client()
        .get(format!("{base}/metrics"))
        .bearer_auth("rk")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("route=\"/rerank\"") && metrics.contains("route=\"/v1/rerank\""),
        "{metrics}"
    );

    // Refusals are in OpenAI's format on both paths.
    let r = rerank(
        "/rerank",
        json!({"model": "nope", "query": "q", "documents": ["a"]}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "model_not_found", "{v}");
    let r = rerank("/rerank", json!({"query": "q", "documents": ["a"]}))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("model"),
        "{v}"
    );
    let r = client()
        .post(format!("{base}/rerank"))
        .json(&json!({"model": "bge-reranker", "query": "q", "documents": ["a"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].is_string(), "{v}");
    assert_eq!(reranker.inference_count(), 2);
    sc.shutdown().await;
}

/// Browsers get Ollama's CORS behaviour: allowed origins (defaults plus
/// `allowed_origins`) are served with `Access-Control-Allow-Origin`,
/// preflights are answered without the router key, other origins get 403
/// in the client's format, and requests without `Origin` are unchanged.
#[tokio::test]
async fn browser_origins_get_ollamas_cors_behaviour() {
    let fake = Fake::start("ollama", &["llama3:latest"], Behaviour::Serve).await;
    let yaml = format!(
        "{}router_api_key: sekret\nallowed_origins: [\"chrome-extension://*\"]\n",
        endpoints_yaml(&[&fake])
    );
    let sc = sidecar(&yaml).await;
    wait_routable(&sc, 1).await;
    let base = format!("http://{}", sc.addr);
    let chat =
        json!({"model": "llama3", "messages": [{"role":"user","content":"hi"}], "stream": false});

    // Preflight: answered before the key check.
    let r = client()
        .request(reqwest::Method::OPTIONS, format!("{base}/api/chat"))
        .header("origin", "http://localhost:3000")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "http://localhost:3000");
    assert!(
        h["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );
    assert_eq!(
        h["access-control-allow-headers"],
        "authorization, content-type"
    );

    // The request itself, on the fast path and through the router.
    for (origin, path) in [
        ("app://obsidian.md", "/api/chat"),
        ("chrome-extension://abcdef", "/api/chat"),
        ("http://127.0.0.1:8080", "/api/tags"),
    ] {
        let req = if path == "/api/chat" {
            client().post(format!("{base}{path}")).json(&chat)
        } else {
            client().get(format!("{base}{path}"))
        };
        let r = req
            .header("origin", origin)
            .bearer_auth("sekret")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{origin} {path}");
        assert_eq!(r.headers()["access-control-allow-origin"], origin);
        assert_eq!(r.headers()["vary"], "Origin");
        r.bytes().await.unwrap();
    }

    // Another origin: 403 in each API's format, the backend never asked.
    let before = fake.inference_count();
    let r = client()
        .post(format!("{base}/api/chat"))
        .header("origin", "https://evil.example")
        .bearer_auth("sekret")
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("https://evil.example"),
        "{v}"
    );
    let r = client()
        .get(format!("{base}/v1/models"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("allowed_origins"),
        "{v}"
    );
    assert_eq!(fake.inference_count(), before);

    // No Origin: no CORS headers; the key is still required.
    let r = client()
        .post(format!("{base}/api/chat"))
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .post(format!("{base}/api/chat"))
        .bearer_auth("sekret")
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    r.bytes().await.unwrap();
    wait_no_leases(&sc).await;
    sc.shutdown().await;
}

#[tokio::test]
async fn health_is_503_when_every_backend_is_down() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let sc = sidecar(&format!("endpoints: [\"{url}\"]\n")).await;
    let r = client()
        .get(format!("http://{}/health", sc.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "unavailable");
    let version: Value = client()
        .get(format!("http://{}/api/version", sc.addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(version["version"], crate::listing::OLLAMA_COMPAT_VERSION);
    sc.shutdown().await;
}

/// A sidecar over a llama3 fake, a client connection to it that is
/// accepted and waiting for its first bytes when the shutdown begins, and
/// the task that ends when the sidecar has stopped; returned 100 ms into
/// the shutdown, the connection still silent.
async fn connected_then_stopping() -> (Fake, tokio::net::TcpStream, tokio::task::JoinHandle<()>) {
    let fake = Fake::start("ollama", &["llama3:latest"], Behaviour::Serve).await;
    let sc = sidecar(&endpoints_yaml(&[&fake])).await;
    wait_routable(&sc, 1).await;
    let sock = tokio::net::TcpStream::connect(sc.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let trigger = sc.shutdown_trigger();
    let stopped = tokio::spawn(sc.wait());
    trigger.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    (fake, sock, stopped)
}

/// A client that connected before the shutdown and sends its request just
/// after it is answered (then the connection closes), not dropped: curl
/// saw "Empty reply from server" for such requests.
#[tokio::test]
async fn a_request_on_a_connection_opened_before_the_shutdown_is_answered() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_fake, mut sock, stopped) = connected_then_stopping().await;
    let body = r#"{"model":"llama3","messages":[{"role":"user","content":"hi"}],"stream":false}"#;
    let request = format!(
        "POST /api/chat HTTP/1.1\r\nhost: sidecar\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut answer))
        .await
        .expect("the connection was neither answered nor closed")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.contains("connection: close"), "{answer:?}");
    assert!(answer.contains("\"done\":true"), "{answer:?}");
    tokio::time::timeout(Duration::from_secs(10), stopped)
        .await
        .expect("shutdown hung")
        .unwrap();
}

/// The same over HTTP/2 with prior knowledge: answered, and the connection
/// gets its `GOAWAY`, so the shutdown does not wait out the grace (30 s
/// by default) for a client that keeps it open.
#[tokio::test]
async fn an_http2_connection_opened_before_the_shutdown_is_answered_and_told_to_go() {
    use http_body_util::BodyExt;
    let (_fake, sock, stopped) = connected_then_stopping().await;
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(sock),
    )
    .await
    .unwrap();
    // The client side stays open as long as the server lets it.
    let client_side = tokio::spawn(connection);
    let body = r#"{"model":"llama3","messages":[{"role":"user","content":"hi"}],"stream":false}"#;
    let request = http::Request::post("http://sidecar/api/chat")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let answer = sender.send_request(request).await.unwrap();
    assert_eq!(answer.status(), 200);
    let text = answer.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&text).contains("\"done\":true"),
        "{text:?}"
    );
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("the shutdown waited for the HTTP/2 client to leave")
        .unwrap();
    drop(sender);
    let _ = client_side.await;
}

#[tokio::test]
async fn shutdown_cancels_streams_after_the_grace() {
    let fake = Fake::start(
        "ollama",
        &["llama3:latest"],
        Behaviour::StallAfterFirstChunk,
    )
    .await;
    let yaml = format!("{}shutdown_grace: 0.2\n", endpoints_yaml(&[&fake]));
    let sc = sidecar(&yaml).await;
    wait_routable(&sc, 1).await;
    let r = client()
        .post(format!("http://{}/api/chat", sc.addr))
        .json(&json!({"model": "llama3", "messages": [{"role":"user","content":"hi"}]}))
        .send()
        .await
        .unwrap();
    let reader = tokio::spawn(async move { r.text().await.unwrap() });
    let router = sc.router().clone();
    tokio::time::timeout(Duration::from_secs(10), sc.shutdown())
        .await
        .expect("shutdown hung");
    let text = reader.await.unwrap();
    let lines = ndjson(&text);
    assert!(
        lines.last().unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("shutting down"),
        "{text}"
    );
    assert_eq!(router.local_in_flight(), 0);
}

/// A control plane over one llama3 fake and a sidecar routed by it, with
/// `extra` appended to the sidecar's configuration; routable on return.
async fn remote_llama3(extra: &str) -> (Fake, RunningControlPlane, SidecarHandle) {
    let fake = Fake::start("ollama", &["llama3:latest"], Behaviour::Serve).await;
    let yaml = endpoints_yaml(&[&fake]);
    let cp = RunningControlPlane::start(config(&yaml)).await.unwrap();
    let sc = start_remote(
        cp.url(),
        Some(config(&format!("{yaml}{extra}"))),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    wait_routable(&sc, 1).await;
    (fake, cp, sc)
}

/// Waits (bounded) until the control plane counts no lease, then checks.
async fn wait_cp_no_leases(cp: &RunningControlPlane) {
    for _ in 0..500 {
        if cp.cp.state().leases == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(cp.cp.state().leases, 0);
}

/// `/api/tags` and `/api/ps` items of `base`, by name.
async fn listing_item(base: &str, path: &str, name: &str) -> Value {
    let body: Value = client()
        .get(format!("{base}{path}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} not in {path}: {body}"))
}

/// The Ollama backend's own size, digest, details and expiry show through
/// the merged listings, standalone and remote alike.
#[tokio::test]
async fn listings_show_the_backends_own_items_standalone_and_remote() {
    let (_fake, cp, remote) = remote_llama3("").await;
    let yaml = endpoints_yaml(&[&_fake]);
    let standalone = sidecar(&yaml).await;
    wait_routable(&standalone, 1).await;
    for sc in [&standalone, &remote] {
        let base = format!("http://{}", sc.addr);
        let tags = listing_item(&base, "/api/tags", "llama3:latest").await;
        assert_eq!(tags["size"], 13_000, "{tags}");
        assert_eq!(tags["digest"], "digest-llama3:latest", "{tags}");
        assert_eq!(tags["modified_at"], "2025-05-10T08:06:48-07:00");
        assert_eq!(tags["details"]["parameter_size"], "1B");
        let ps = listing_item(&base, "/api/ps", "llama3:latest").await;
        assert_eq!(ps["size_vram"], 6_500, "{ps}");
        assert_eq!(ps["expires_at"], "2030-01-01T00:00:00Z");
        assert_eq!(ps["context_length"], 4096);
    }
    standalone.shutdown().await;
    remote.shutdown().await;
    cp.shutdown().await.unwrap();
}

#[tokio::test]
async fn remote_mode_routes_through_the_control_plane() {
    let (_fake, cp, sc) = remote_llama3("").await;
    let r = client()
        .post(format!("http://{}/api/chat", sc.addr))
        .json(&json!({"model": "llama3", "messages": [{"role":"user","content":"hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let lines = ndjson(&r.text().await.unwrap());
    assert_eq!(lines.last().unwrap()["done"], true);
    wait_no_leases(&sc).await;
    // The control plane saw the lease come and go.
    wait_cp_no_leases(&cp).await;
    sc.shutdown().await;
    cp.shutdown().await.unwrap();
}

/// With two server threads, connections alternate between them, each
/// thread chooses on a `Route` stream of its own, and every lease taken on
/// either is released at the control plane.
#[tokio::test]
async fn remote_mode_with_two_server_threads_uses_a_route_stream_on_each() {
    let (_fake, cp, sc) = remote_llama3("server_threads: 2\n").await;
    for i in 0..6 {
        // A client of its own: a new connection, handed to the next thread.
        let r = reqwest::Client::new()
            .post(format!("http://{}/api/chat", sc.addr))
            .json(&json!({"model": "llama3", "stream": false, "messages": [{"role":"user","content":format!("hi {i}")}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.unwrap()["done"], true);
    }
    assert_eq!(sc.router().open_route_streams(), 2);
    assert_eq!(sc.router().degraded_decisions(), 0);
    wait_no_leases(&sc).await;
    wait_cp_no_leases(&cp).await;
    sc.shutdown().await;
    cp.shutdown().await.unwrap();
}

#[tokio::test]
async fn unreachable_control_plane_without_state_is_503() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let sc = start_remote(url, None, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let r = client()
        .post(format!("http://{}/v1/chat/completions", sc.addr))
        .json(&json!({"model": "llama3", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("control plane"),
        "{v}"
    );
    let r = client()
        .get(format!("http://{}/health", sc.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.json::<Value>().await.unwrap()["control_plane_connected"],
        false
    );
    sc.shutdown().await;
}

/// Captures every span's fields (as recorded at creation and later with
/// `Span::record`) and keeps them once the span closes; notes every field
/// recorded again (which the log layer prints twice).
mod span_capture {
    use std::collections::{BTreeMap, HashMap};

    use tracing::{
        Subscriber,
        field::{Field, Visit},
        span::{Attributes, Id, Record},
    };
    use tracing_subscriber::{Layer, layer::Context, registry::LookupSpan};

    use super::*;

    /// A closed span: name and fields (`&str` fields unquoted, others in
    /// their `Debug` form).
    #[derive(Clone, Debug)]
    pub(super) struct ClosedSpan {
        pub name: String,
        pub fields: BTreeMap<String, String>,
    }

    #[derive(Clone, Default)]
    pub(super) struct SpanCapture {
        open: Arc<Mutex<HashMap<u64, ClosedSpan>>>,
        closed: Arc<Mutex<Vec<ClosedSpan>>>,
        recorded_again: Arc<Mutex<Vec<String>>>,
    }

    struct Fields<'a> {
        fields: &'a mut BTreeMap<String, String>,
        /// `span.field` of each field that already had a value.
        again: Vec<String>,
        span: &'a str,
    }

    impl Fields<'_> {
        fn put(&mut self, field: &Field, value: String) {
            if self.fields.insert(field.name().to_owned(), value).is_some() {
                self.again.push(format!("{}.{}", self.span, field.name()));
            }
        }
    }

    impl Visit for Fields<'_> {
        fn record_str(&mut self, field: &Field, value: &str) {
            self.put(field, value.to_owned());
        }

        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.put(field, format!("{value:?}"));
        }
    }

    impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for SpanCapture {
        fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _ctx: Context<'_, S>) {
            let mut fields = BTreeMap::new();
            attrs.record(&mut Fields {
                fields: &mut fields,
                again: Vec::new(),
                span: "",
            });
            self.open.lock().insert(
                id.into_u64(),
                ClosedSpan {
                    name: attrs.metadata().name().to_owned(),
                    fields,
                },
            );
        }

        fn on_record(&self, id: &Id, values: &Record<'_>, _ctx: Context<'_, S>) {
            if let Some(span) = self.open.lock().get_mut(&id.into_u64()) {
                let mut visit = Fields {
                    fields: &mut span.fields,
                    again: Vec::new(),
                    span: &span.name,
                };
                values.record(&mut visit);
                self.recorded_again.lock().extend(visit.again);
            }
        }

        fn on_close(&self, id: Id, _ctx: Context<'_, S>) {
            if let Some(span) = self.open.lock().remove(&id.into_u64()) {
                self.closed.lock().push(span);
            }
        }
    }

    impl SpanCapture {
        /// Closed spans named `name`, oldest first.
        pub(super) fn closed(&self, name: &str) -> Vec<ClosedSpan> {
            self.closed
                .lock()
                .iter()
                .filter(|s| s.name == name)
                .cloned()
                .collect()
        }

        /// Every `span.field` recorded while it already had a value.
        pub(super) fn recorded_again(&self) -> Vec<String> {
            self.recorded_again.lock().clone()
        }

        /// Waits (bounded) until `n` spans named `name` have closed.
        pub(super) async fn wait_closed(&self, name: &str, n: usize) -> Vec<ClosedSpan> {
            for _ in 0..500 {
                let spans = self.closed(name);
                if spans.len() >= n {
                    return spans;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!(
                "expected {n} closed {name:?} spans, have {:?}",
                self.closed(name)
            );
        }
    }
}

/// The per-request span carries the route, model, the endpoint that
/// answered, the number of attempts and the status; each attempt has a
/// child span with its decision (endpoint, reason, attempt, whether it was
/// made locally) and its release outcome. Each field is recorded once: the
/// log layer prints a field recorded twice twice (which the request span's
/// decision fields were after a retry). Shown for a retried non-stream
/// request and for a stream (whose outcome is recorded when the stream
/// ends, after the response head went out).
///
/// Runs on its own (`tests/run.sh` runs it with `--ignored`): requests are
/// served on the sidecar's server threads, so the capture must be the
/// process-global subscriber, which only one test per process can install
/// (the CLI tests install theirs).
#[tokio::test]
#[ignore = "needs its own process; tests/run.sh runs it alone"]
async fn the_request_span_records_the_decision_and_outcome() {
    use tracing_subscriber::layer::SubscriberExt as _;

    let capture = span_capture::SpanCapture::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(capture.clone()))
        .expect("run this test alone: another test installed a global subscriber");

    // The failing endpoint is tried first (held to the end of the test).
    let (failing, good, sc) = failing_then_serving(Behaviour::Fail(503)).await;

    assert_eq!(chat_llama3(&sc).await.status(), 200);
    let spans = capture.wait_closed("request", 1).await;
    let f = &spans[0].fields;
    assert_eq!(f["route"], "/api/chat", "{f:?}");
    assert_eq!(f["model"], "llama3", "{f:?}");
    assert_eq!(f["endpoint"], good.url(), "the answering endpoint: {f:?}");
    assert_eq!(f["attempts"], "2", "{f:?}");
    assert_eq!(f["status"], "200", "{f:?}");
    assert!(
        !f.contains_key("reason") && !f.contains_key("outcome"),
        "decisions are on the attempt spans: {f:?}"
    );
    let attempts = capture.wait_closed("attempt", 2).await;
    let (first, second) = (&attempts[0].fields, &attempts[1].fields);
    assert_eq!(first["endpoint"], failing.url(), "{first:?}");
    assert_eq!(first["attempt"], "1", "{first:?}");
    assert_eq!(first["outcome"], "backend_error", "{first:?}");
    assert_eq!(second["endpoint"], good.url(), "{second:?}");
    assert_eq!(second["reason"], "loaded_free", "{second:?}");
    assert_eq!(second["attempt"], "2", "{second:?}");
    assert_eq!(second["degraded"], "false", "{second:?}");
    assert_eq!(second["outcome"], "ok", "{second:?}");

    // A stream: its attempt span outlives the handler (the lease inside the
    // body holds it) and gets its outcome when the backend's stream ends.
    let r = client()
        .post(format!("http://{}/api/chat", sc.addr))
        .json(&json!({"model": "llama3", "messages": [{"role":"user","content":"hi"}], "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _body = r.text().await.unwrap();
    let spans = capture.wait_closed("request", 2).await;
    let f = &spans[1].fields;
    assert_eq!(f["endpoint"], good.url(), "{f:?}");
    assert_eq!(
        f["attempts"], "1",
        "the failing endpoint is avoided now: {f:?}"
    );
    assert_eq!(f["status"], "200", "{f:?}");
    let attempts = capture.wait_closed("attempt", 3).await;
    let f = &attempts[2].fields;
    assert_eq!(f["endpoint"], good.url(), "{f:?}");
    assert_eq!(f["outcome"], "ok", "{f:?}");

    // An unknown model: no decision, the status only.
    let r = client()
        .post(format!("http://{}/api/chat", sc.addr))
        .json(&json!({"model": "nope", "messages": [], "stream": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let spans = capture.wait_closed("request", 3).await;
    let f = &spans[2].fields;
    assert_eq!(f["model"], "nope", "{f:?}");
    assert_eq!(f["status"], "404", "{f:?}");
    assert!(
        !f.contains_key("endpoint") && !f.contains_key("attempts"),
        "{f:?}"
    );
    assert_eq!(capture.closed("attempt").len(), 3, "no attempt was made");
    assert_eq!(
        capture.recorded_again(),
        Vec::<String>::new(),
        "fields recorded twice"
    );

    wait_no_leases(&sc).await;
    sc.shutdown().await;
}

/// The future the server boxes per request holds the proxy's state machine
/// (several KB) behind one pointer: unboxed, each of its moves was a memcpy
/// of its full size (12 KB per request before `proxy::handle` boxed it).
#[tokio::test]
async fn a_request_future_stays_small() {
    let tasks = TaskTracker::new();
    let background = CancellationToken::new();
    let mode = Mode::Standalone {
        config: config("endpoints: []\n"),
        control_plane_listen: None,
    };
    let cores = CoreRuntimes::start("test", 1).unwrap();
    let (_, _, state) = build_state(mode, "test", &cores, &tasks, &background)
        .await
        .unwrap();
    let request = Request::post("/api/chat").body(Body::empty()).unwrap();
    let future = crate::proxy::handle(state, crate::routes::ApiRoute::OllamaChat, request);
    let size = std::mem::size_of_val(&future);
    assert!(size <= 2048, "a request's future is {size} bytes");
    drop(future);
    background.cancel();
    tasks.close();
}

#[tokio::test]
async fn a_model_missing_on_one_endpoint_is_tried_on_another() {
    // Both advertised the model when probed; the first has lost it since.
    let (metrics, tried_on_the_first) = three_chats_fail_over(Behaviour::ModelGone).await;
    // A healthy backend without the model: released as `model_missing`,
    // never counted against the backend's health...
    let failures: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("switchyard_sidecar_upstream_errors_total{"))
        .collect();
    assert_eq!(failures.len(), 1, "{metrics}");
    assert!(
        failures[0].contains("outcome=\"model_missing\""),
        "{metrics}"
    );
    // ...but avoided for that model afterwards, although its probes still
    // list it: only the first chat went there.
    assert!(failures[0].ends_with(" 1"), "{metrics}");
    assert_eq!(tried_on_the_first, 1);
}

#[tokio::test]
async fn a_model_missing_everywhere_is_404_in_the_client_format() {
    let gone = Fake::start("ollama", &["llama3:latest"], Behaviour::ModelGone).await;
    let sc = sidecar(&endpoints_yaml(&[&gone])).await;
    wait_routable(&sc, 1).await;
    let r = chat_llama3(&sc).await;
    assert_eq!(r.status(), 404);
    let body = r.json::<Value>().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("not found"),
        "{body}"
    );
    let r = client()
        .post(format!("http://{}/v1/chat/completions", sc.addr))
        .json(&json!({"model": "llama3", "messages": [{"role":"user","content":"hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body = r.json::<Value>().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not found"),
        "{body}"
    );
    wait_no_leases(&sc).await;
    assert_eq!(
        gone.inference_count(),
        2,
        "each request tried the one endpoint once"
    );
    sc.shutdown().await;
}

#[tokio::test]
async fn a_missing_backend_route_is_named_in_the_error() {
    // An OpenAI-API backend without `/v1/completions` (the fake has only
    // the chat route, and answers other paths with an empty 404), which a
    // raw generate needs there.
    let chat_only = Fake::start("llama_server", &["m"], Behaviour::Serve).await;
    // A FastAPI-style 404 body.
    let fastapi = Fake::start("ollama", &["llama3:latest"], Behaviour::NoRoute).await;
    // Ollama's own unknown-route answer, which says "not found" too.
    let gin = Fake::start("ollama", &["gemma:latest"], Behaviour::NoRouteGin).await;
    let sc = sidecar(&endpoints_yaml(&[&chat_only, &fastapi, &gin])).await;
    wait_routable(&sc, 3).await;
    for (model, path, raw) in [
        ("m", "/v1/completions", true),
        ("llama3", "/api/generate", false),
        ("gemma", "/api/generate", false),
    ] {
        let r = client()
            .post(format!("http://{}/api/generate", sc.addr))
            .json(&json!({"model": model, "prompt": "hi", "raw": raw, "stream": false}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        let body = r.json::<Value>().await.unwrap();
        assert_eq!(
            body["error"],
            format!("the backend does not serve POST {path} (404 Not Found)")
        );
    }
    wait_no_leases(&sc).await;
    // A missing route says nothing about the model: released as a client
    // error, never as `model_missing` (which would keep the endpoint out
    // of that model's chats too).
    let metrics = metrics_text(&sc).await;
    assert!(metrics.contains("outcome=\"client_error\""), "{metrics}");
    assert!(
        !metrics.contains("outcome=\"model_missing\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("switchyard_cp_releases_total{outcome=\"model_missing\"} 0\n"),
        "{metrics}"
    );
    sc.shutdown().await;
}

// ---- `/api/version`: the lowest Ollama backend version, capped ----

/// A serving fake like [`Fake::start`]'s, with `GET /api/version` answering
/// `version`.
async fn versioned_fake(
    kind: &'static str,
    models: &[&'static str],
    version: &'static str,
) -> Fake {
    Fake::start_versioned(kind, models, Behaviour::Serve, Some(version)).await
}

/// The sidecar's `/api/version` answer.
async fn api_version_of(handle: &SidecarHandle) -> String {
    let r = client()
        .get(format!("http://{}/api/version", handle.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    body["version"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn api_version_is_the_lowest_ollama_backend_version() {
    let old = versioned_fake("ollama", &["a:latest"], "0.5.7").await;
    let new = versioned_fake("ollama", &["b:latest"], "0.9.0").await;
    let sc = sidecar(&endpoints_yaml(&[&new, &old])).await;
    wait_routable(&sc, 2).await;
    assert_eq!(api_version_of(&sc).await, "0.5.7");
    sc.shutdown().await;
}

#[tokio::test]
async fn api_version_is_capped_at_the_api_level_the_sidecar_serves() {
    let newer = versioned_fake("ollama", &["a:latest"], "0.99.0").await;
    let sc = sidecar(&endpoints_yaml(&[&newer])).await;
    wait_routable(&sc, 1).await;
    // Known, and higher than what the sidecar serves: the sidecar's level.
    assert_eq!(sc.router().cluster_state().endpoints[0].version, "0.99.0");
    assert_eq!(
        api_version_of(&sc).await,
        crate::listing::OLLAMA_COMPAT_VERSION
    );
    sc.shutdown().await;
}

#[tokio::test]
async fn api_version_ignores_openai_backends() {
    // An OpenAI-style server that happens to answer `/api/version` (with a
    // low version): it is not asked, it has no Ollama version.
    let openai = versioned_fake("openai", &["gpt-x"], "0.1.0").await;
    let openai_yaml = format!(
        "endpoints: [\"{}/v1\"]\nprobe_interval: 0.1\n",
        openai.url()
    );
    let sc = sidecar(&openai_yaml).await;
    wait_routable(&sc, 1).await;
    assert_eq!(sc.router().cluster_state().endpoints[0].version, "");
    assert_eq!(
        api_version_of(&sc).await,
        crate::listing::OLLAMA_COMPAT_VERSION
    );
    sc.shutdown().await;

    // Next to an Ollama backend, that backend's version alone counts.
    let ollama = versioned_fake("ollama", &["a:latest"], "0.9.0").await;
    let sc = sidecar(&format!(
        "endpoints: [\"{}/v1\", \"{}\"]\nprobe_interval: 0.1\n",
        openai.url(),
        ollama.url()
    ))
    .await;
    wait_routable(&sc, 2).await;
    assert_eq!(api_version_of(&sc).await, "0.9.0");
    sc.shutdown().await;
}

#[tokio::test]
async fn a_backend_without_api_version_stays_healthy_and_routable() {
    // The plain fake answers 404 to `/api/version`.
    let unversioned = Fake::start("ollama", &["old:latest"], Behaviour::Serve).await;
    let versioned = versioned_fake("ollama", &["new:latest"], "0.5.7").await;
    let sc = sidecar(&endpoints_yaml(&[&unversioned, &versioned])).await;
    wait_routable(&sc, 2).await;
    let state = sc.router().cluster_state();
    assert!(state.endpoints[0].healthy, "{:?}", state.endpoints[0]);
    assert_eq!(state.endpoints[0].version, "");
    // The one version known is the answer.
    assert_eq!(api_version_of(&sc).await, "0.5.7");
    let r = client()
        .post(format!("http://{}/api/chat", sc.addr))
        .json(
            &json!({"model": "old", "messages": [{"role":"user","content":"hi"}], "stream": false}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    assert_eq!(unversioned.inference_count(), 1);
    wait_no_leases(&sc).await;
    sc.shutdown().await;
}
