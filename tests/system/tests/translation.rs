//! Ollama-API clients on OpenAI-only backends, end to end: every item of
//! the translation issue shown through a remote-mode sidecar (real control
//! plane over gRPC) against the fake model server in OpenAI mode and, where
//! the dialect matters, in llama-server mode.
//!
//! What is checked, per item:
//! 1. `/api/chat` → `/v1/chat/completions`: the translated upstream body as
//!    the fake recorded it (roles, images as data-URL parts next to their
//!    text, tool calls with ids and JSON-string arguments, tool results
//!    with a `tool_call_id` recovered from `tool_name`, `format`, `options`
//!    per backend kind, `think`); the reply (content, `thinking` from
//!    `reasoning` and `reasoning_content`, tool calls whole in one chunk,
//!    final `done:true` chunk with counts from `usage` and measured
//!    durations, non-zero even when a whole stream arrives in one read).
//! 2. `/api/generate` → `/v1/completions` (llama-server, `raw` prompts) or
//!    chat (other OpenAI-compatible servers, which may lack completions),
//!    the upstream path asserted.
//! 3. `/api/embed` (string and list: every vector, in order) and the legacy
//!    `/api/embeddings`.
//! 4. Streams converted chunk by chunk without buffering; backend errors in
//!    Ollama's shape and status, before and in the middle of a stream.
//! 5. `/api/tags`, `/api/ps`, `/api/show` for OpenAI-only models.
//! 6. Token counts of translated replies reach the control plane.
//!
//! Plus the official `ollama` Python client on the translated paths
//! (`python/ollama_translation.py`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::{Value, json};
use switchyard_control_plane::{
    cluster::{ClusterState, ModelUsage},
    endpoint::EndpointKind,
    model_name::tracking_name,
};
use switchyard_system_tests::{
    BackendOptions, Cluster, FailureMode, FakeConfig, FakeMode, FinishReason, Framing, ReplyScript,
    SOON, StreamReply,
    client::{Reply, get, ollama_error_text, post_json, stream},
    cluster::endpoint_kind,
    config::EndpointEntry,
    embedding_for,
    python::run_script_ok,
    wait::{wait_for, wait_for_async, wait_until},
};
use switchyard_tests::fake_backend::{ReasoningField, ToolCallScript};

/// A 1×1 PNG, as Ollama clients send images: raw base64, no `data:` prefix.
const PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";
/// The start of a JPEG (magic bytes `FF D8 FF`).
const JPEG: &str = "/9j/4AAQSkZJRgABAQEASABIAAD/2wBDAAEBAQ==";

/// The model every fake here advertises (an OpenAI-style id, no tag).
const MODEL: &str = "gpt-x";

/// Prompt tokens the fake reports in `usage` (its default).
const PROMPT_TOKENS: u64 = 10;

// ---- helpers ------------------------------------------------------------------

fn fake(mode: FakeMode) -> FakeConfig {
    FakeConfig::new(mode).models(&[MODEL]).all_loaded()
}

async fn cluster(config: FakeConfig) -> Cluster {
    Cluster::builder().backend(config).start().await
}

/// A reply with reasoning, content and one tool call whose arguments
/// stream in three fragments.
fn thinking_tool_script() -> ReplyScript {
    ReplyScript::content(&["The ", "answer"])
        .with_reasoning(&["Let me ", "think."])
        .with_tool_call(ToolCallScript::new(
            "get_weather",
            json!({"city": "Oslo", "days": 2}),
        ))
}

/// The body the fake recorded last on `path`.
fn last_sent(c: &Cluster, path: &str) -> Value {
    let fake = c.backend(0);
    let seen: Vec<String> = fake.requests().iter().map(|r| r.path.clone()).collect();
    fake.last_request_to(path)
        .unwrap_or_else(|| panic!("nothing was forwarded to {path}; the fake saw {seen:?}"))
        .json()
        .unwrap_or_else(|| panic!("the body forwarded to {path} is not JSON"))
}

fn ns(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} is not an integer number of ns: {v}"))
}

/// Checks the final (`done:true`) Ollama object: reason, counts, and
/// durations that are integers in ns, positive, consistent with each
/// other, at least `min_total` (a delay the fake really waited) and at most
/// `max_total` (the wall time the test measured around the request).
fn assert_final(
    last: &Value,
    reason: &str,
    counts: (u64, u64),
    min_total: Duration,
    max_total: Duration,
) {
    assert_eq!(last["done"], json!(true), "{last}");
    assert_eq!(last["done_reason"], json!(reason), "{last}");
    assert_eq!(last["prompt_eval_count"], json!(counts.0), "{last}");
    assert_eq!(last["eval_count"], json!(counts.1), "{last}");
    assert!(last["created_at"].is_string(), "{last}");
    let total = ns(last, "total_duration");
    let eval = ns(last, "eval_duration");
    let prompt_eval = ns(last, "prompt_eval_duration");
    let _load = ns(last, "load_duration");
    assert!(eval > 0, "eval_duration must be > 0 ns: {last}");
    assert!(
        total >= eval && total >= prompt_eval + eval,
        "total_duration {total} < prompt_eval {prompt_eval} + eval {eval}: {last}"
    );
    let min = u64::try_from(min_total.as_nanos()).unwrap();
    let max = u64::try_from(max_total.as_nanos()).unwrap();
    assert!(
        total >= min,
        "total_duration {total} ns is shorter than the {min_total:?} the backend waited: {last}"
    );
    assert!(
        total <= max,
        "total_duration {total} ns is longer than the {max_total:?} the client measured \
         (invented, or not in ns): {last}"
    );
}

/// Every line but the last is `done:false`, and no line is an error.
fn assert_stream_shape(r: &StreamReply) -> Vec<Value> {
    assert_eq!(r.status, 200, "{}", r.dump());
    assert!(
        r.content_type.contains("application/x-ndjson"),
        "{}",
        r.dump()
    );
    assert!(
        r.trailing.is_empty() && r.transport_error.is_none(),
        "{}",
        r.dump()
    );
    let lines = r.ndjson();
    assert!(lines.len() >= 2, "{}", r.dump());
    for l in &lines[..lines.len() - 1] {
        assert_eq!(l["done"], json!(false), "{}", r.dump());
        assert!(l.get("error").is_none(), "{}", r.dump());
        assert_eq!(l["model"], json!(MODEL), "{}", r.dump());
    }
    lines
}

fn joined(lines: &[Value], pick: impl Fn(&Value) -> Option<&str>) -> String {
    lines.iter().filter_map(pick).collect()
}

async fn chat_stream(c: &Cluster, body: Value) -> StreamReply {
    stream(
        c.http().post(c.at("/api/chat")).json(&body),
        Framing::Ndjson,
    )
    .await
}

/// Sends a non-stream request and returns the reply with the wall time.
async fn timed_post(c: &Cluster, path: &str, body: &Value) -> (Reply, Duration) {
    let started = std::time::Instant::now();
    let r = post_json(c.http(), &c.at(path), body).await;
    (r, started.elapsed())
}

// ---- 1. /api/chat: the translated request ----------------------------------------

/// The conversation every request test sends: system, user with two
/// images, an assistant tool call (object arguments, no id), the tool's
/// result named only by `tool_name`, and a last user turn.
fn conversation() -> Value {
    json!([
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is in these pictures?", "images": [PNG, JPEG]},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}}
        ]},
        {"role": "tool", "content": "{\"temp\":3}", "tool_name": "get_weather"},
        {"role": "user", "content": "and tomorrow?"}
    ])
}

fn tools() -> Value {
    json!([{"type": "function", "function": {
        "name": "get_weather", "description": "weather for a city",
        "parameters": {"type": "object", "required": ["city"],
                       "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}
    }}])
}

fn options() -> Value {
    json!({
        "num_predict": 64, "temperature": 0.2, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
        "seed": 7, "stop": ["END", "STOP"], "frequency_penalty": 0.5, "presence_penalty": 0.3,
        "repeat_penalty": 1.1, "num_ctx": 8192, "num_gpu": 1
    })
}

/// Checks the translated messages of [`conversation`].
fn assert_messages(sent: &Value) {
    let msgs = sent["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages: {sent}"));
    assert_eq!(msgs.len(), 5, "{sent}");
    assert_eq!(
        msgs[0],
        json!({"role": "system", "content": "be brief"}),
        "{sent}"
    );

    // Images become data-URL parts AFTER the text part, which is kept.
    assert_eq!(msgs[1]["role"], json!("user"), "{sent}");
    assert_eq!(
        msgs[1]["content"],
        json!([
            {"type": "text", "text": "what is in these pictures?"},
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{PNG}")}},
            {"type": "image_url", "image_url": {"url": format!("data:image/jpeg;base64,{JPEG}")}}
        ]),
        "{sent}"
    );
    assert!(msgs[1].get("images").is_none(), "{sent}");

    // Assistant tool call: made-up id, type, JSON-string arguments.
    let call = &msgs[2]["tool_calls"][0];
    let id = call["id"].as_str().unwrap_or_default();
    assert!(
        id.starts_with("call_") && id.len() > "call_".len(),
        "no call id: {sent}"
    );
    assert_eq!(call["type"], json!("function"), "{sent}");
    assert_eq!(call["function"]["name"], json!("get_weather"), "{sent}");
    let args = call["function"]["arguments"]
        .as_str()
        .unwrap_or_else(|| panic!("arguments are not a JSON string: {sent}"));
    assert_eq!(
        serde_json::from_str::<Value>(args).unwrap(),
        json!({"city": "Oslo", "days": 2}),
        "{sent}"
    );

    // Tool result: the call id recovered from tool_name.
    assert_eq!(
        msgs[3],
        json!({"role": "tool", "tool_call_id": id, "content": "{\"temp\":3}"}),
        "{sent}"
    );
    assert_eq!(
        msgs[4],
        json!({"role": "user", "content": "and tomorrow?"}),
        "{sent}"
    );
}

/// Fields Ollama-only or load-time, never sent to an OpenAI backend.
fn assert_no_ollama_fields(sent: &Value) {
    for k in [
        "options",
        "format",
        "think",
        "keep_alive",
        "num_predict",
        "num_ctx",
        "num_gpu",
        "images",
    ] {
        assert!(sent.get(k).is_none(), "{k} forwarded: {sent}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_request_is_translated_for_an_openai_backend() {
    let c = cluster(fake(FakeMode::OpenAi)).await;
    let body = json!({
        "model": MODEL, "stream": false, "messages": conversation(), "tools": tools(),
        "format": "json", "options": options(), "think": "high", "keep_alive": "10m"
    });
    let r = post_json(c.http(), &c.at("/api/chat"), &body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let sent = last_sent(&c, "/v1/chat/completions");
    assert_eq!(sent["model"], json!(MODEL), "{sent}");
    assert_eq!(
        sent["stream"],
        json!(false),
        "stream must be explicit: {sent}"
    );
    assert!(sent.get("stream_options").is_none(), "{sent}");
    assert_messages(&sent);
    assert_eq!(sent["tools"], tools(), "{sent}");
    assert_eq!(
        sent["response_format"],
        json!({"type": "json_object"}),
        "{sent}"
    );
    assert_eq!(sent["max_tokens"], json!(64), "{sent}");
    assert_eq!(sent["temperature"], json!(0.2), "{sent}");
    assert_eq!(sent["top_p"], json!(0.9), "{sent}");
    assert_eq!(sent["seed"], json!(7), "{sent}");
    assert_eq!(sent["stop"], json!(["END", "STOP"]), "{sent}");
    assert_eq!(sent["frequency_penalty"], json!(0.5), "{sent}");
    assert_eq!(sent["presence_penalty"], json!(0.3), "{sent}");
    assert_eq!(sent["reasoning_effort"], json!("high"), "{sent}");
    // llama.cpp sampler knobs are not OpenAI fields.
    for k in ["top_k", "min_p", "repeat_penalty"] {
        assert!(
            sent.get(k).is_none(),
            "{k} sent to a plain OpenAI backend: {sent}"
        );
    }
    assert_no_ollama_fields(&sent);

    // A schema `format`, a stream, and `think:false` (not expressible for a
    // plain OpenAI backend: omitted).
    let schema = json!({"type": "object", "properties": {"n": {"type": "integer"}},
                        "required": ["n"]});
    let r = chat_stream(
        &c,
        json!({"model": MODEL, "messages": [{"role": "user", "content": "count"}],
               "format": schema, "think": false, "options": {"stop": "END"}}),
    )
    .await;
    assert_stream_shape(&r);
    let sent = last_sent(&c, "/v1/chat/completions");
    assert_eq!(
        sent["stream"],
        json!(true),
        "Ollama streams by default: {sent}"
    );
    assert_eq!(
        sent["stream_options"],
        json!({"include_usage": true}),
        "{sent}"
    );
    assert_eq!(
        sent["response_format"]["type"],
        json!("json_schema"),
        "{sent}"
    );
    assert_eq!(
        sent["response_format"]["json_schema"]["schema"], schema,
        "{sent}"
    );
    assert!(
        sent["response_format"]["json_schema"]["name"].is_string(),
        "{sent}"
    );
    assert_eq!(sent["stop"], json!(["END"]), "{sent}");
    assert!(sent.get("reasoning_effort").is_none(), "{sent}");
    assert!(sent.get("tools").is_none(), "{sent}");

    // A client that already knows the ids: kept as they are.
    let r = post_json(
        c.http(),
        &c.at("/api/chat"),
        &json!({"model": MODEL, "stream": false, "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_a", "function": {"name": "get_weather", "arguments": {"city": "A"}}},
                {"id": "call_b", "function": {"name": "get_weather", "arguments": {"city": "B"}}}
            ]},
            {"role": "tool", "content": "b", "tool_call_id": "call_b"},
            {"role": "tool", "content": "a", "tool_name": "get_weather"}
        ]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let sent = last_sent(&c, "/v1/chat/completions");
    let msgs = &sent["messages"];
    assert_eq!(msgs[1]["tool_calls"][0]["id"], json!("call_a"), "{sent}");
    assert_eq!(msgs[1]["tool_calls"][1]["id"], json!("call_b"), "{sent}");
    assert_eq!(msgs[2]["tool_call_id"], json!("call_b"), "{sent}");
    // Recovered by name: the call of that name not answered yet.
    assert_eq!(msgs[3]["tool_call_id"], json!("call_a"), "{sent}");
    c.wait_usage(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_request_for_llama_server_keeps_its_sampler_options() {
    let c = cluster(fake(FakeMode::LlamaServer)).await;
    let body = json!({
        "model": MODEL, "stream": false, "messages": conversation(), "tools": tools(),
        "options": options(), "think": false
    });
    let r = post_json(c.http(), &c.at("/api/chat"), &body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let sent = last_sent(&c, "/v1/chat/completions");
    assert_messages(&sent);
    assert_eq!(sent["max_tokens"], json!(64), "{sent}");
    assert_eq!(sent["top_k"], json!(40), "{sent}");
    assert_eq!(sent["min_p"], json!(0.05), "{sent}");
    assert_eq!(sent["repeat_penalty"], json!(1.1), "{sent}");
    assert_eq!(sent["temperature"], json!(0.2), "{sent}");
    assert_eq!(sent["seed"], json!(7), "{sent}");
    assert_eq!(sent["stop"], json!(["END", "STOP"]), "{sent}");
    // think:false turns reasoning off the llama-server way.
    assert_eq!(sent["reasoning_effort"], json!("none"), "{sent}");
    assert!(sent.get("response_format").is_none(), "{sent}");
    assert_no_ollama_fields(&sent);
    c.wait_usage(0).await;
}

// ---- 1. /api/chat: the translated reply ------------------------------------------

/// Streamed and non-streamed chat with reasoning, content and a tool call,
/// for one backend dialect; the fake waits `DELAY` before answering.
async fn chat_reply_case(mode: FakeMode, field: ReasoningField) {
    const DELAY: Duration = Duration::from_millis(50);
    let script = thinking_tool_script();
    let c = cluster(
        fake(mode)
            .reply(script.clone())
            .reasoning_field(field)
            .delay(DELAY)
            .chunk_delay(Duration::from_millis(5)),
    )
    .await;
    let eval = script.completion_tokens();
    let counts = (PROMPT_TOKENS, eval);
    let want_call = json!({"city": "Oslo", "days": 2});
    let msgs = json!([{"role": "user", "content": "weather in Oslo?"}]);
    // The request, without `stream` (Ollama streams then) or not streamed.
    let ask =
        |think: bool| json!({"model": MODEL, "messages": msgs, "tools": tools(), "think": think});
    let whole = |think: bool| {
        let mut body = ask(think);
        body["stream"] = json!(false);
        body
    };

    // Stream.
    let r = chat_stream(&c, ask(true)).await;
    let wall = r.ended - r.started;
    let lines = assert_stream_shape(&r);
    assert_eq!(
        joined(&lines, |l| l["message"]["thinking"].as_str()),
        script.reasoning_text(),
        "{mode}: thinking from `{field:?}`: {}",
        r.dump()
    );
    assert_eq!(
        joined(&lines, |l| l["message"]["content"].as_str()),
        script.text(),
        "{}",
        r.dump()
    );
    for l in &lines {
        assert_eq!(l["message"]["role"], json!("assistant"), "{}", r.dump());
    }
    // Thinking and content each arrive as they were produced (one Ollama
    // chunk per backend delta), not as one block.
    let thinking_chunks = lines
        .iter()
        .filter(|l| {
            l["message"]["thinking"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        })
        .count();
    assert_eq!(thinking_chunks, script.reasoning.len(), "{}", r.dump());
    // The tool call: accumulated from its fragments, sent whole, once.
    let with_tools: Vec<&Value> = lines
        .iter()
        .filter(|l| l["message"].get("tool_calls").is_some())
        .collect();
    assert_eq!(
        with_tools.len(),
        1,
        "tool calls must come whole in one chunk: {}",
        r.dump()
    );
    let calls = with_tools[0]["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{}", r.dump());
    assert_eq!(calls[0]["function"]["name"], json!("get_weather"));
    assert_eq!(
        calls[0]["function"]["arguments"],
        want_call,
        "arguments must be an object: {}",
        r.dump()
    );
    assert_eq!(calls[0]["id"], json!("call_get_weather"), "{}", r.dump());
    assert_eq!(with_tools[0]["done"], json!(false), "{}", r.dump());
    let last = lines.last().unwrap();
    assert_eq!(last["message"]["content"], json!(""), "{last}");
    // `done_reason` stays `stop` when tools were called (finish `tool_calls`).
    assert_final(last, "stop", counts, DELAY, wall);

    // Not streamed.
    let (r, wall) = timed_post(&c, "/api/chat", &whole(true)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{:?}",
        r.headers
    );
    let v = r.json();
    assert_eq!(v["model"], json!(MODEL), "{v}");
    assert_eq!(v["message"]["role"], json!("assistant"), "{v}");
    assert_eq!(v["message"]["content"], json!(script.text()), "{v}");
    assert_eq!(
        v["message"]["thinking"],
        json!(script.reasoning_text()),
        "{v}"
    );
    let calls = v["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{v}");
    assert_eq!(calls[0]["function"]["name"], json!("get_weather"), "{v}");
    assert_eq!(calls[0]["function"]["arguments"], want_call, "{v}");
    assert_final(&v, "stop", counts, DELAY, wall);

    // `think:false` to a backend that reasons anyway (the fake ignores
    // `reasoning_effort`): as from Ollama, no `thinking` reaches the client,
    // streamed or not; the content and the call still do.
    let r = chat_stream(&c, ask(false)).await;
    let lines = assert_stream_shape(&r);
    assert!(
        lines.iter().all(|l| l["message"].get("thinking").is_none()),
        "{mode}: {}",
        r.dump()
    );
    assert_eq!(
        joined(&lines, |l| l["message"]["content"].as_str()),
        script.text(),
        "{}",
        r.dump()
    );
    assert!(
        lines
            .iter()
            .any(|l| l["message"].get("tool_calls").is_some()),
        "{}",
        r.dump()
    );
    let (r, _) = timed_post(&c, "/api/chat", &whole(false)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert!(v["message"].get("thinking").is_none(), "{mode}: {v}");
    assert_eq!(v["message"]["content"], json!(script.text()), "{v}");
    c.wait_usage(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_reply_from_an_openai_backend_reasoning_field() {
    chat_reply_case(FakeMode::OpenAi, ReasoningField::Reasoning).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_reply_from_llama_server_reasoning_content_field() {
    chat_reply_case(FakeMode::LlamaServer, ReasoningField::ReasoningContent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_reply_length_limit_and_instant_stream_durations() {
    // No delays at all: the whole SSE body may arrive in one read, and the
    // final chunk must still carry usable (non-zero) durations.
    let c = cluster(fake(FakeMode::OpenAi).chunks(4)).await;
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let r = chat_stream(&c, json!({"model": MODEL, "messages": msgs})).await;
    let wall = r.ended - r.started;
    let lines = assert_stream_shape(&r);
    assert_eq!(
        joined(&lines, |l| l["message"]["content"].as_str()),
        "tok0 tok1 tok2 tok3"
    );
    assert_final(
        lines.last().unwrap(),
        "stop",
        (PROMPT_TOKENS, 4),
        Duration::ZERO,
        wall,
    );

    c.backend(0).set_reply(Some(
        ReplyScript::generated(2).with_finish(FinishReason::Length),
    ));
    let r = chat_stream(&c, json!({"model": MODEL, "messages": msgs})).await;
    let lines = assert_stream_shape(&r);
    assert_eq!(
        lines.last().unwrap()["done_reason"],
        json!("length"),
        "{}",
        r.dump()
    );
    let (r, _) = timed_post(
        &c,
        "/api/chat",
        &json!({"model": MODEL, "messages": msgs, "stream": false}),
    )
    .await;
    assert_eq!(r.json()["done_reason"], json!("length"), "{}", r.text);
    c.wait_usage(0).await;
}

/// A minimal OpenAI-compatible backend that answers every request in ONE
/// write (head and whole body together): `GET /v1/models` lists [`MODEL`],
/// anything else gets `sse` as an event stream. This is what a fast backend
/// looks like to a busy reader: every event of the stream in one read.
async fn one_write_backend(sse: String) -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let sse = sse.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut piece = [0u8; 4096];
                let mut want = None;
                while want.is_none_or(|n| buf.len() < n) {
                    match sock.read(&mut piece).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&piece[..n]),
                    }
                    if want.is_none()
                        && let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n")
                    {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        want = Some(end + 4 + len);
                    }
                }
                let (content_type, body) = if buf.starts_with(b"GET /v1/models") {
                    let models = json!({"object": "list", "data": [
                        {"id": MODEL, "object": "model", "created": 1, "owned_by": "burst"}]});
                    ("application/json", models.to_string())
                } else {
                    ("text/event-stream", sse)
                };
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
                     connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(reply.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (format!("http://{addr}/v1"), task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_read_in_one_piece_still_has_usable_durations() {
    let head = r#""id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-x""#;
    let sse: String = [
        format!(r#"{{{head},"choices":[{{"index":0,"delta":{{"role":"assistant","content":""}},"finish_reason":null}}]}}"#),
        format!(r#"{{{head},"choices":[{{"index":0,"delta":{{"content":"Hello"}},"finish_reason":null}}]}}"#),
        format!(r#"{{{head},"choices":[{{"index":0,"delta":{{"content":" there"}},"finish_reason":null}}]}}"#),
        format!(r#"{{{head},"choices":[{{"index":0,"delta":{{}},"finish_reason":"stop"}}]}}"#),
        format!(r#"{{{head},"choices":[],"usage":{{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}}}"#),
        "[DONE]".to_owned(),
    ]
    .iter()
    .map(|d| format!("data: {d}\n\n"))
    .collect();
    let (url, server) = one_write_backend(sse).await;
    let c = Cluster::builder()
        .extra_endpoint(EndpointEntry {
            url: url.clone(),
            kind: EndpointKind::OpenAi,
            max_concurrent: None,
            api_key: None,
        })
        .start()
        .await;
    let ready = |s: &ClusterState| {
        s.endpoints
            .iter()
            .any(|e| *e.url == *url && e.healthy && !e.advertised_models.is_empty())
    };
    wait_until("the one-write backend to be discovered", SOON, || {
        ready(&c.state()) && ready(&c.sidecars[0].router().cluster_state())
    })
    .await;
    let r = chat_stream(
        &c,
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    let wall = r.ended - r.started;
    let lines = assert_stream_shape(&r);
    assert_eq!(
        joined(&lines, |l| l["message"]["content"].as_str()),
        "Hello there"
    );
    // eval_duration 0 with eval_count 2 would make clients divide by zero
    // (tokens/s = eval_count / eval_duration).
    assert_final(lines.last().unwrap(), "stop", (7, 2), Duration::ZERO, wall);
    c.wait_usage(0).await;
    server.abort();
}

// ---- 2. /api/generate ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_goes_to_chat_on_an_openai_backend_without_completions() {
    const DELAY: Duration = Duration::from_millis(50);
    let script = ReplyScript::content(&["once", " upon", " a time"]).with_reasoning(&["hmm"]);
    let c = cluster(
        fake(FakeMode::OpenAi)
            .no_completions()
            .reply(script.clone())
            .delay(DELAY)
            .chunk_delay(Duration::from_millis(5)),
    )
    .await;
    let counts = (PROMPT_TOKENS, script.completion_tokens());
    let body = json!({"model": MODEL, "prompt": "tell a story", "system": "you are terse",
                      "suffix": "the end", "options": {"num_predict": 20, "temperature": 0.7}});

    let r = stream(
        c.http().post(c.at("/api/generate")).json(&body),
        Framing::Ndjson,
    )
    .await;
    let wall = r.ended - r.started;
    let lines = assert_stream_shape(&r);
    assert_eq!(
        joined(&lines, |l| l["response"].as_str()),
        script.text(),
        "{}",
        r.dump()
    );
    assert_eq!(
        joined(&lines, |l| l["thinking"].as_str()),
        "hmm",
        "{}",
        r.dump()
    );
    let last = lines.last().unwrap();
    assert_eq!(last["response"], json!(""), "{last}");
    assert!(last.get("message").is_none(), "{last}");
    assert_final(last, "stop", counts, DELAY, wall);

    let sent = last_sent(&c, "/v1/chat/completions");
    assert_eq!(
        sent["messages"],
        json!([{"role": "system", "content": "you are terse"},
               {"role": "user", "content": "tell a story"}]),
        "{sent}"
    );
    assert_eq!(sent["stream"], json!(true), "{sent}");
    assert_eq!(sent["max_tokens"], json!(20), "{sent}");
    assert_eq!(sent["temperature"], json!(0.7), "{sent}");
    // Chat has no fill-in-the-middle: the suffix cannot be sent.
    assert!(
        sent.get("suffix").is_none() && sent.get("prompt").is_none(),
        "{sent}"
    );
    assert_eq!(c.backend(0).request_count("/v1/completions"), 0);

    let mut once = body.clone();
    once["stream"] = json!(false);
    let (r, wall) = timed_post(&c, "/api/generate", &once).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["model"], json!(MODEL), "{v}");
    assert_eq!(v["response"], json!(script.text()), "{v}");
    assert_eq!(v["thinking"], json!("hmm"), "{v}");
    assert!(v.get("message").is_none(), "{v}");
    assert_final(&v, "stop", counts, DELAY, wall);
    assert_eq!(c.backend(0).request_count("/v1/completions"), 0);
    c.wait_usage(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_raw_prompt_goes_to_completions_on_an_openai_backend() {
    let c = cluster(fake(FakeMode::OpenAi).chunks(3)).await;
    let body = json!({"model": MODEL, "prompt": "<s>[INST] hi [/INST]", "raw": true,
                      "suffix": "</s>", "stream": false, "options": {"num_predict": 5}});
    let r = post_json(c.http(), &c.at("/api/generate"), &body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["response"], json!("tok0 tok1 tok2"), "{}", r.text);
    let sent = last_sent(&c, "/v1/completions");
    assert_eq!(sent["prompt"], json!("<s>[INST] hi [/INST]"), "{sent}");
    assert_eq!(sent["suffix"], json!("</s>"), "{sent}");
    assert_eq!(sent["max_tokens"], json!(5), "{sent}");
    assert!(
        sent.get("messages").is_none() && sent.get("raw").is_none(),
        "{sent}"
    );
    assert_eq!(c.backend(0).request_count("/v1/chat/completions"), 0);
    // `raw` with `system` is refused as Ollama refuses it, before any call.
    // Inference routes only: the control plane's probes hit the backend
    // meanwhile, so a total count would race with them.
    let inference = || {
        c.backend(0).request_count("/v1/completions")
            + c.backend(0).request_count("/v1/chat/completions")
    };
    let before = inference();
    let r = post_json(
        c.http(),
        &c.at("/api/generate"),
        &json!({"model": MODEL, "prompt": "x", "raw": true, "system": "s", "stream": false}),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(ollama_error_text(&r).contains("raw"), "{}", r.text);
    assert_eq!(inference(), before, "a refused request reached the backend");
    c.wait_usage(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_raw_prompt_without_a_completions_route_is_an_ollama_error() {
    // A raw prompt is already templated: sending it as a chat message would
    // template it twice, so it must not silently fall back to chat. The
    // backend's refusal reaches the client in Ollama's error shape.
    let c = cluster(fake(FakeMode::OpenAi).no_completions()).await;
    for stream in [false, true] {
        let r = post_json(
            c.http(),
            &c.at("/api/generate"),
            &json!({"model": MODEL, "prompt": "<s>x", "raw": true, "stream": stream}),
        )
        .await;
        assert!(
            (400..500).contains(&r.status),
            "stream {stream}: {} {}",
            r.status,
            r.text
        );
        ollama_error_text(&r);
    }
    assert_eq!(c.backend(0).request_count("/v1/chat/completions"), 0);
    assert_eq!(c.backend(0).requests_to("/v1/completions").len(), 2);
    c.wait_usage(0).await;
}

/// A prompt Ollama would template (not `raw`, no `suffix`) goes to
/// llama-server's chat route, which applies the model's chat template,
/// with `system` as a system message and `format` as `response_format`,
/// its properties in the client's order (QA: sent to `/v1/completions` as
/// bare text, an instruct model answered gibberish and ignored `system`
/// and `format`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_goes_to_chat_on_llama_server() {
    let c = cluster(fake(FakeMode::LlamaServer).chunks(3)).await;
    // Properties out of alphabetical order: a model writes the keys in the
    // schema's order, so that order must reach the backend (QA: it was
    // sorted, and the answer's keys with it).
    let schema = json!({"type": "object",
                        "properties": {"zeta": {"type": "integer"}, "alpha": {"type": "integer"}}});
    let body = json!({"model": MODEL, "prompt": "say hi", "system": "you are a pirate",
                      "format": schema, "stream": false, "options": {"num_predict": 8}});
    let r = post_json(c.http(), &c.at("/api/generate"), &body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["response"], json!("tok0 tok1 tok2"), "{v}");
    assert_eq!(v["done"], json!(true), "{v}");
    let sent = last_sent(&c, "/v1/chat/completions");
    assert_eq!(
        sent["messages"],
        json!([{"role": "system", "content": "you are a pirate"},
               {"role": "user", "content": "say hi"}]),
        "{sent}"
    );
    assert_eq!(
        sent["response_format"],
        json!({"type": "json_object", "schema": schema}),
        "{sent}"
    );
    let order: Vec<&String> = sent["response_format"]["schema"]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(order, ["zeta", "alpha"], "{sent}");
    assert_eq!(sent["max_tokens"], json!(8), "{sent}");
    assert!(sent.get("prompt").is_none(), "{sent}");
    assert_eq!(c.backend(0).request_count("/v1/completions"), 0);
    c.wait_usage(0).await;
}

/// With a `suffix` (fill-in-the-middle), which chat cannot carry,
/// llama-server gets the completions route and decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_with_a_suffix_goes_to_completions_on_llama_server() {
    let c = cluster(
        fake(FakeMode::LlamaServer)
            .chunks(4)
            .chunk_delay(Duration::from_millis(5)),
    )
    .await;
    let body = json!({"model": MODEL, "prompt": "def add(a, b):", "suffix": "return c",
                      "options": {"num_predict": 16, "top_k": 20, "seed": 3}});
    let r = stream(
        c.http().post(c.at("/api/generate")).json(&body),
        Framing::Ndjson,
    )
    .await;
    let wall = r.ended - r.started;
    let lines = assert_stream_shape(&r);
    assert_eq!(
        joined(&lines, |l| l["response"].as_str()),
        "tok0 tok1 tok2 tok3",
        "{}",
        r.dump()
    );
    assert_final(
        lines.last().unwrap(),
        "stop",
        (PROMPT_TOKENS, 4),
        Duration::ZERO,
        wall,
    );
    let sent = last_sent(&c, "/v1/completions");
    assert_eq!(sent["prompt"], json!("def add(a, b):"), "{sent}");
    assert_eq!(sent["suffix"], json!("return c"), "{sent}");
    assert_eq!(sent["max_tokens"], json!(16), "{sent}");
    assert_eq!(sent["top_k"], json!(20), "{sent}");
    assert_eq!(sent["seed"], json!(3), "{sent}");
    assert_eq!(sent["stream"], json!(true), "{sent}");
    assert_eq!(
        sent["stream_options"],
        json!({"include_usage": true}),
        "{sent}"
    );
    assert_no_ollama_fields(&sent);
    assert_eq!(c.backend(0).request_count("/v1/chat/completions"), 0);

    let mut once = body.clone();
    once["stream"] = json!(false);
    let (r, wall) = timed_post(&c, "/api/generate", &once).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["response"], json!("tok0 tok1 tok2 tok3"), "{v}");
    assert_final(&v, "stop", (PROMPT_TOKENS, 4), Duration::ZERO, wall);
    let sent = last_sent(&c, "/v1/completions");
    assert_eq!(sent["stream"], json!(false), "{sent}");
    assert!(sent.get("stream_options").is_none(), "{sent}");
    c.wait_usage(0).await;
}

// ---- 3. embeddings --------------------------------------------------------------------

fn assert_vector(got: &Value, text: &str, dims: usize) {
    let want = embedding_for(text, dims);
    let got: Vec<f64> = got
        .as_array()
        .unwrap_or_else(|| panic!("{text}: not a vector: {got}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(got.len(), want.len(), "{text}: {got:?}");
    for (a, b) in got.iter().zip(&want) {
        assert!(
            (a - f64::from(*b)).abs() < 1e-6,
            "{text}: got {got:?}, want {want:?}"
        );
    }
}

async fn embed_case(mode: FakeMode) {
    let c = cluster(fake(mode).embedding_dims(16)).await;
    let dims = c.backend(0).embedding_dims();

    // A single string: still a list of one vector.
    let r = post_json(
        c.http(),
        &c.at("/api/embed"),
        &json!({"model": MODEL, "input": "hello world"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["model"], json!(MODEL), "{v}");
    let got = v["embeddings"].as_array().unwrap();
    assert_eq!(got.len(), 1, "{v}");
    assert_vector(&got[0], "hello world", dims);
    assert_eq!(v["prompt_eval_count"], json!(2), "{v}");
    assert!(ns(&v, "total_duration") > 0, "{v}");
    let sent = last_sent(&c, "/v1/embeddings");
    assert_eq!(sent["input"], json!("hello world"), "{sent}");
    assert_eq!(sent["model"], json!(MODEL), "{sent}");

    // A list: every vector, in the order of the inputs.
    let inputs = ["alpha", "beta gamma", "delta", "epsilon", "zeta eta theta"];
    let r = post_json(
        c.http(),
        &c.at("/api/embed"),
        &json!({"model": MODEL, "input": inputs, "truncate": true}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let got = v["embeddings"].as_array().unwrap();
    assert_eq!(got.len(), inputs.len(), "every input needs its vector: {v}");
    for (vector, input) in got.iter().zip(inputs) {
        assert_vector(vector, input, dims);
    }
    assert_eq!(v["prompt_eval_count"], json!(1 + 2 + 1 + 1 + 3), "{v}");
    let sent = last_sent(&c, "/v1/embeddings");
    assert_eq!(sent["input"], json!(inputs), "{sent}");
    assert!(sent.get("truncate").is_none(), "{sent}");

    // Legacy /api/embeddings: `prompt` in, `{"embedding":[..]}` out.
    let r = post_json(
        c.http(),
        &c.at("/api/embeddings"),
        &json!({"model": MODEL, "prompt": "legacy text"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["embedding"], "{v}");
    assert_vector(&v["embedding"], "legacy text", dims);
    assert_eq!(
        last_sent(&c, "/v1/embeddings")["input"],
        json!("legacy text")
    );
    assert_eq!(c.backend(0).request_count("/v1/embeddings"), 3);
    c.wait_usage(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embed_returns_every_vector_in_order_openai_backend() {
    embed_case(FakeMode::OpenAi).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embed_returns_every_vector_in_order_llama_server() {
    embed_case(FakeMode::LlamaServer).await;
}

// ---- 4. streaming without buffering, errors -----------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translated_streams_are_converted_chunk_by_chunk() {
    const GAP: Duration = Duration::from_millis(150);
    const CHUNKS: usize = 4;
    for mode in [FakeMode::OpenAi, FakeMode::LlamaServer] {
        let c = cluster(fake(mode).chunks(CHUNKS).chunk_delay(GAP)).await;
        for (path, body, field) in [
            (
                "/api/chat",
                json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
                "message",
            ),
            (
                "/api/generate",
                json!({"model": MODEL, "prompt": "hi"}),
                "response",
            ),
        ] {
            let r = stream(c.http().post(c.at(path)).json(&body), Framing::Ndjson).await;
            let lines = assert_stream_shape(&r);
            let what = format!("{mode} {path}");
            let text_of = |l: &Value| match field {
                "message" => l["message"]["content"].as_str().map(str::to_owned),
                _ => l["response"].as_str().map(str::to_owned),
            };
            let content: Vec<usize> = (0..lines.len())
                .filter(|&i| text_of(&lines[i]).is_some_and(|t| !t.is_empty()))
                .collect();
            assert_eq!(
                content.len(),
                CHUNKS,
                "{what}: one line per delta: {}",
                r.dump()
            );
            // Each content line arrived on its own, about GAP after the
            // previous one: nothing was held back and sent in a batch (a
            // quarter of GAP leaves room for scheduling jitter on a busy
            // 2-core machine; a batch arrives within microseconds).
            for pair in content.windows(2) {
                let gap = r.chunks[pair[1]].at - r.chunks[pair[0]].at;
                assert!(
                    gap >= GAP / 4,
                    "{what}: lines {} and {} arrived {gap:?} apart (buffered): {}",
                    pair[0],
                    pair[1],
                    r.dump()
                );
            }
            let first = r.chunks[content[0]].at;
            let last = r.chunks.last().unwrap().at;
            assert!(
                last - first >= GAP * (CHUNKS as u32 - 1),
                "{what}: first content line only {:?} before the last line",
                last - first
            );
            assert!(
                first - r.started < (last - r.started) / 2,
                "{what}: the first line came at {:?} of {:?}",
                first - r.started,
                last - r.started
            );
            assert_eq!(lines.last().unwrap()["done"], json!(true), "{}", r.dump());
        }
        c.wait_usage(0).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_errors_reach_ollama_clients_in_ollama_shape() {
    let c = cluster(fake(FakeMode::OpenAi).chunks(6)).await;
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});

    // A 400 before anything was sent: Ollama's {"error": ".."} and 400,
    // streamed or not, on every translated route.
    let mut chat_once = chat.clone();
    chat_once["stream"] = json!(false);
    for (path, body) in [
        ("/api/chat", chat.clone()),
        ("/api/chat", chat_once),
        ("/api/generate", json!({"model": MODEL, "prompt": "hi"})),
        (
            "/api/generate",
            json!({"model": MODEL, "prompt": "hi", "stream": false}),
        ),
        ("/api/embed", json!({"model": MODEL, "input": ["a", "b"]})),
        ("/api/embeddings", json!({"model": MODEL, "prompt": "a"})),
    ] {
        c.backend(0).fail_next(1, FailureMode::Status(400));
        let r = post_json(c.http(), &c.at(path), &body).await;
        assert_eq!(r.status, 400, "{path} {body}: {}", r.text);
        assert!(
            r.header("content-type")
                .is_some_and(|t| t.starts_with("application/json")),
            "{path}: {:?}",
            r.headers
        );
        let text = ollama_error_text(&r);
        assert!(
            text.contains("fake backend failure (status 400)"),
            "{path}: the backend's message is lost: {text}"
        );
        let v = r.json();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["error"], "{path}: {}", r.text);
    }

    // A backend error in the middle of the stream: what was produced,
    // then one {"error": ".."} line; never a done:true.
    c.backend(0).set_failure(FailureMode::MidStreamError);
    for (path, body, field) in [
        ("/api/chat", chat.clone(), "message"),
        (
            "/api/generate",
            json!({"model": MODEL, "prompt": "hi"}),
            "response",
        ),
    ] {
        let r = stream(c.http().post(c.at(path)).json(&body), Framing::Ndjson).await;
        assert_eq!(r.status, 200, "{path}: {}", r.dump());
        assert!(
            r.trailing.is_empty() && r.transport_error.is_none(),
            "{path}: {}",
            r.dump()
        );
        let lines = r.ndjson();
        let (last, before) = lines.split_last().expect("no lines");
        assert!(
            last["error"]
                .as_str()
                .is_some_and(|e| e.contains("fake backend failure in the middle")),
            "{path}: the stream does not end with the backend's error: {}",
            r.dump()
        );
        assert!(!before.is_empty(), "{path}: {}", r.dump());
        let text: String = before
            .iter()
            .filter_map(|l| match field {
                "message" => l["message"]["content"].as_str(),
                _ => l["response"].as_str(),
            })
            .collect();
        assert!(
            !text.is_empty() && "tok0 tok1 tok2 tok3 tok4 tok5".starts_with(&text),
            "{path}: {}",
            r.dump()
        );
        assert!(
            lines.iter().all(|l| l["done"] != json!(true)),
            "{path}: a failed stream claims done: {}",
            r.dump()
        );
    }
    c.backend(0).set_failure(FailureMode::None);
    c.wait_usage(0).await;
}

// ---- 5. listings -------------------------------------------------------------------------

fn listed<'a>(body: &'a Value, name: &str) -> Option<&'a Value> {
    body["models"]
        .as_array()
        .unwrap_or_else(|| panic!("no models list: {body}"))
        .iter()
        .find(|m| m["name"] == json!(name))
}

fn assert_ollama_details(item: &Value) {
    let d = &item["details"];
    for k in [
        "parent_model",
        "format",
        "family",
        "parameter_size",
        "quantization_level",
    ] {
        assert!(d[k].is_string(), "details.{k}: {item}");
    }
    assert!(d["families"].is_array(), "{item}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_show_openai_only_models_in_ollama_shape() {
    let c = Cluster::builder()
        // No api_keys entry for this one (nomyo-router answered 500).
        .backend(fake(FakeMode::OpenAi))
        .backend_with(
            FakeConfig::new(FakeMode::OpenAi)
                .models(&["gpt-keyed"])
                .api_key("k1"),
            BackendOptions::api_key("k1"),
        )
        .backend(
            FakeConfig::new(FakeMode::LlamaServer)
                .models(&["ls-busy", "ls-idle"])
                .loaded(&["ls-busy"]),
        )
        .start()
        .await;

    let r = get(c.http(), &c.at("/api/tags")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let tags = r.json();
    for name in [
        "gpt-x:latest",
        "gpt-keyed:latest",
        "ls-busy:latest",
        "ls-idle:latest",
    ] {
        let item = listed(&tags, name).unwrap_or_else(|| panic!("{name} not in {tags}"));
        assert_eq!(item["model"], json!(name), "{item}");
        assert!(item["modified_at"].is_string(), "{item}");
        assert!(
            item["size"].is_u64() && item["digest"].is_string(),
            "{item}"
        );
        assert_ollama_details(item);
    }
    assert_eq!(
        listed(&tags, "ls-busy:latest").unwrap()["details"]["format"],
        json!("gguf")
    );

    // /api/ps: llama-server models by their load state.
    let ps = get(c.http(), &c.at("/api/ps")).await;
    assert_eq!(ps.status, 200, "{}", ps.text);
    let ps = ps.json();
    let busy = listed(&ps, "ls-busy:latest").unwrap_or_else(|| panic!("{ps}"));
    assert_eq!(busy["model"], json!("ls-busy:latest"), "{busy}");
    assert!(busy["expires_at"].is_string(), "{busy}");
    assert!(
        busy["size_vram"].is_u64() && busy["size"].is_u64(),
        "{busy}"
    );
    assert_ollama_details(busy);
    assert!(
        listed(&ps, "ls-idle:latest").is_none(),
        "an unloaded model in /api/ps: {ps}"
    );
    // Loading it shows up after the next probe.
    assert!(c.backend(2).set_loaded("ls-idle", true));
    let body = wait_for_async(
        "ls-idle to appear in /api/ps",
        SOON,
        || async { get(c.http(), &c.at("/api/ps")).await.json() },
        |v| listed(v, "ls-idle:latest").is_some(),
    )
    .await;
    assert!(listed(&body, "ls-busy:latest").is_some(), "{body}");

    // /api/show answers for OpenAI-only models, with `model` or old `name`.
    for (req, want_format) in [
        (json!({"model": MODEL}), ""),
        (json!({"model": "gpt-keyed:latest"}), ""),
        (json!({"name": "ls-busy"}), "gguf"),
    ] {
        let r = post_json(c.http(), &c.at("/api/show"), &req).await;
        assert_eq!(r.status, 200, "{req}: {}", r.text);
        let v = r.json();
        assert_ollama_details(&v);
        assert_eq!(v["details"]["format"], json!(want_format), "{v}");
        assert!(v["model_info"].is_object(), "{v}");
        assert!(
            v["capabilities"]
                .as_array()
                .is_some_and(|c| c.contains(&json!("completion"))),
            "{v}"
        );
        for k in ["modelfile", "parameters", "template", "modified_at"] {
            assert!(v[k].is_string(), "{k}: {v}");
        }
    }
    // The same `modified_at` as its /api/tags item (the `/v1/models`
    // entry's `created`), not the time of the request (QA).
    let tags = get(c.http(), &c.at("/api/tags")).await.json();
    let tag = listed(&tags, &format!("{MODEL}:latest")).unwrap_or_else(|| panic!("{tags}"));
    let shown = post_json(c.http(), &c.at("/api/show"), &json!({"model": MODEL}))
        .await
        .json();
    assert_eq!(shown["modified_at"], tag["modified_at"], "{shown} / {tag}");
    // Shown from what the sidecar knows: the backends saw no /api/show.
    for i in 0..3 {
        assert_eq!(c.backend(i).request_count("/api/show"), 0);
    }
    let r = post_json(c.http(), &c.at("/api/show"), &json!({"model": "missing"})).await;
    assert_eq!(r.status, 404, "{}", r.text);
    ollama_error_text(&r);
    c.wait_usage(0).await;
}

/// With an Ollama and an OpenAI-only endpoint serving the same model,
/// `/api/show` is answered by Ollama every time (the OpenAI endpoint would
/// get the sidecar's stub, without template or tool capabilities), and by
/// the other when Ollama is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_show_prefers_an_ollama_endpoint_with_the_model() {
    let c = Cluster::builder()
        .backend(FakeConfig::new(FakeMode::Ollama).models(&["m:latest"]))
        .backend(FakeConfig::new(FakeMode::OpenAi).models(&["m"]))
        .start()
        .await;
    for _ in 0..8 {
        let r = post_json(c.http(), &c.at("/api/show"), &json!({"model": "m"})).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(r.json()["template"].is_string(), "{}", r.text);
    }
    assert_eq!(c.backend(0).request_count("/api/show"), 8);
    // Ollama no longer has it: the OpenAI endpoint's turn after all.
    c.backend(0).set_models::<&str>(&[]);
    let stub = wait_for_async(
        "/api/show to come from the OpenAI endpoint",
        SOON,
        || async { post_json(c.http(), &c.at("/api/show"), &json!({"model": "m"})).await },
        |r| r.status == 200 && r.json()["details"]["format"] == json!(""),
    )
    .await;
    assert!(stub.json()["capabilities"].is_array(), "{}", stub.text);
    c.wait_usage(0).await;
}

// ---- 6. token counts reach the control plane ----------------------------------------------

fn model_usage(c: &Cluster, i: usize) -> ModelUsage {
    let url = c.endpoint_url(i);
    let kind = endpoint_kind(c.backend(i).mode());
    let tracked = tracking_name(kind, MODEL);
    let state = c.state();
    let endpoint = state
        .endpoints
        .iter()
        .find(|e| *e.url == *url)
        .unwrap_or_else(|| panic!("{url} not in the cluster state"));
    endpoint
        .usage
        .iter()
        .find(|u| *u.model == *tracked)
        .cloned()
        .unwrap_or(ModelUsage {
            model: tracked.into(),
            in_flight: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            requests: 0,
        })
}

async fn wait_tokens(c: &Cluster, what: &str, want: (u64, u64, u64)) {
    wait_for(
        &format!("control plane tokens (prompt, completion, requests) {want:?} after {what}"),
        SOON,
        || {
            let u = model_usage(c, 0);
            (u.prompt_tokens, u.completion_tokens, u.requests)
        },
        |got| *got == want,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_counts_of_translated_replies_reach_the_control_plane() {
    for mode in [FakeMode::OpenAi, FakeMode::LlamaServer] {
        let script = thinking_tool_script();
        let n = script.completion_tokens();
        let c = cluster(fake(mode).reply(script)).await;
        let start = model_usage(&c, 0);
        let base = (start.prompt_tokens, start.completion_tokens, start.requests);
        let msgs = json!([{"role": "user", "content": "hi"}]);

        let r = post_json(
            c.http(),
            &c.at("/api/chat"),
            &json!({"model": MODEL, "messages": msgs, "stream": false}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
        wait_tokens(
            &c,
            &format!("{mode} non-stream chat"),
            (base.0 + PROMPT_TOKENS, base.1 + n, base.2 + 1),
        )
        .await;

        let r = chat_stream(&c, json!({"model": MODEL, "messages": msgs})).await;
        assert_stream_shape(&r);
        wait_tokens(
            &c,
            &format!("{mode} streamed chat"),
            (base.0 + 2 * PROMPT_TOKENS, base.1 + 2 * n, base.2 + 2),
        )
        .await;

        // Generate: chat on both kinds (a prompt that is not `raw`), so the
        // same usage as the chat above.
        let r = stream(
            c.http()
                .post(c.at("/api/generate"))
                .json(&json!({"model": MODEL, "prompt": "hi"})),
            Framing::Ndjson,
        )
        .await;
        let lines = assert_stream_shape(&r);
        let eval = lines.last().unwrap()["eval_count"].as_u64().unwrap();
        assert_eq!(eval, n, "{}", r.dump());
        wait_tokens(
            &c,
            &format!("{mode} streamed generate"),
            (
                base.0 + 3 * PROMPT_TOKENS,
                base.1 + 2 * n + eval,
                base.2 + 3,
            ),
        )
        .await;
        c.wait_usage(0).await;
    }
}

// ---- the official ollama Python client ------------------------------------------------

const EMBED_INPUTS: [&str; 4] = ["first input", "second", "third one here", "4th"];

async fn run_ollama_script(base: &str, dims: usize) {
    let script = thinking_tool_script();
    let call = &script.tool_calls[0];
    let vectors: Vec<Vec<f32>> = EMBED_INPUTS
        .iter()
        .map(|t| embedding_for(t, dims))
        .collect();
    let env = [
        ("EXPECT_TEXT", script.text()),
        ("EXPECT_THINKING", script.reasoning_text()),
        (
            "EXPECT_TOOL",
            json!({"name": call.name, "arguments": call.arguments}).to_string(),
        ),
        ("EXPECT_PROMPT_TOKENS", PROMPT_TOKENS.to_string()),
        ("EXPECT_EVAL_COUNT", script.completion_tokens().to_string()),
        ("EMBED_INPUTS", json!(EMBED_INPUTS).to_string()),
        ("EXPECT_EMBEDDINGS", json!(vectors).to_string()),
        ("IMAGE_B64", PNG.to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = run_script_ok("ollama_translation.py", &[base, MODEL], &env).await;
    assert!(
        out.stdout.contains("all translation checks passed"),
        "{}",
        out.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_translation_script_passes_against_an_ollama_fake_directly() {
    // The script's expectations hold for a real Ollama API (the fake in
    // Ollama mode), so a failure through the sidecar is the sidecar's.
    let ollama = switchyard_system_tests::FakeBackend::start(
        FakeConfig::new(FakeMode::Ollama)
            .models(&["gpt-x:latest"])
            .all_loaded()
            .reply(thinking_tool_script()),
    )
    .await;
    run_ollama_script(&ollama.url(), ollama.embedding_dims()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_client_on_an_openai_only_backend() {
    let c = cluster(
        fake(FakeMode::OpenAi)
            .reply(thinking_tool_script())
            .chunk_delay(Duration::from_millis(2)),
    )
    .await;
    run_ollama_script(&c.url(0), c.backend(0).embedding_dims()).await;

    let fake = c.backend(0);
    // Only OpenAI routes were used.
    assert_eq!(
        fake.request_count("/api/chat") + fake.request_count("/api/generate"),
        0
    );
    assert!(fake.request_count("/v1/chat/completions") >= 5);
    assert!(fake.request_count("/v1/embeddings") >= 2);
    // The client's image and tool history, as the backend received them.
    let with_history = fake
        .requests_to("/v1/chat/completions")
        .iter()
        .filter_map(|r| r.json())
        .find(|b| b["messages"].as_array().is_some_and(|m| m.len() == 4))
        .unwrap_or_else(|| panic!("the history request was not forwarded"));
    let msgs = &with_history["messages"];
    assert_eq!(
        msgs[0]["content"],
        json!([{"type": "text", "text": "what is this?"},
               {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{PNG}")}}]),
        "{with_history}"
    );
    let id = msgs[1]["tool_calls"][0]["id"].as_str().unwrap_or_default();
    assert!(id.starts_with("call_"), "{with_history}");
    assert_eq!(
        msgs[1]["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .map(|s| serde_json::from_str::<Value>(s).unwrap()),
        Some(json!({"city": "Oslo", "days": 2})),
        "{with_history}"
    );
    assert_eq!(msgs[2]["role"], json!("tool"), "{with_history}");
    assert_eq!(msgs[2]["tool_call_id"], json!(id), "{with_history}");
    c.wait_usage(0).await;
}
