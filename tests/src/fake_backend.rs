//! A fake model server speaking the Ollama, OpenAI and llama-server wire
//! formats, for Switchyard's integration tests, fault-injection tests and
//! benchmarks.
//!
//! What it owns: an HTTP server on a real TCP socket (its own accept loop, so
//! it can reset single connections and kill all of them), the replies in the
//! exact shapes of `shared/reference/api-shapes.md`, and a control handle
//! ([`FakeControl`]) that tests drive while the server runs: advertised and
//! loaded models, delays, scripted replies, a gate that holds requests, failure
//! injection, and records of what the server saw. In Ollama mode it also
//! imitates model management (pull, push, create, copy, delete: see
//! `manage.rs`), changing its advertised models. In every mode it stores its
//! Responses API answers and serves them back (`GET`/`DELETE
//! /v1/responses/{id}`, `input_items`, `cancel`: see `stored.rs`).
//!
//! Invariants it keeps:
//! - every inference request is counted in flight from the moment its body is
//!   read until its response body has been fully produced or dropped, so the
//!   peak concurrency is exact; the count is released exactly once (a drop
//!   guard), whatever path the request takes;
//! - a request is counted as *cancelled* only when the client went away before
//!   the server finished its response; failures the server injects itself
//!   (status, reset, mid-stream error or drop) are not cancellations;
//! - embedding vectors depend only on the input text ([`embedding_for`]), so a
//!   test can check that the order of the inputs was kept;
//! - no per-request logging; request recording can be turned off
//!   (capacity 0) so the benchmark binary pays only for what it serves.

mod handlers;
mod manage;
mod render;
mod server;
mod state;
mod stored;

#[cfg(test)]
mod tests;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::ops::Deref;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, Method};
use bytes::Bytes;
use parking_lot::Mutex;

use state::Shared;

pub use manage::{layer_digest, layer_total};

/// Which kind of model server the fake imitates; decides its routes, reply
/// fields and error shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FakeMode {
    /// Ollama: native `/api/*` routes plus Ollama's own `/v1/*` routes.
    Ollama,
    /// A generic OpenAI-compatible server (vLLM-like errors and listing).
    OpenAi,
    /// llama.cpp `llama-server` (router mode): `/v1/*` with `status` on
    /// `/v1/models` items, `timings` on replies, `reasoning_content`, `/health`.
    LlamaServer,
}

impl FakeMode {
    /// The name used on the command line and in [`fmt::Display`].
    pub fn as_str(self) -> &'static str {
        match self {
            FakeMode::Ollama => "ollama",
            FakeMode::OpenAi => "openai",
            FakeMode::LlamaServer => "llama-server",
        }
    }
}

impl fmt::Display for FakeMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error for a [`FakeMode`] name that is not one of `ollama`, `openai`,
/// `llama-server`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown fake mode `{0}` (expected ollama, openai or llama-server)")]
pub struct UnknownFakeMode(pub String);

impl FromStr for FakeMode {
    type Err = UnknownFakeMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ollama" => Ok(FakeMode::Ollama),
            "openai" => Ok(FakeMode::OpenAi),
            "llama-server" | "llama_server" => Ok(FakeMode::LlamaServer),
            other => Err(UnknownFakeMode(other.to_owned())),
        }
    }
}

/// A failure the fake injects instead of (or in the middle of) a normal reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FailureMode {
    /// Answer normally.
    #[default]
    None,
    /// Answer at once (no delay, no gate) with this HTTP status and an error
    /// body in the route's error shape (Ollama `{"error":".."}` or the OpenAI /
    /// llama-server object). 503 uses each server's real busy/loading text.
    Status(u16),
    /// Accept the request, then close the connection with a TCP reset
    /// (`SO_LINGER` 0) before any response byte.
    Reset,
    /// Stream the first half of the chunks (at least one), then one error
    /// line (NDJSON `{"error":..}` / SSE `data: {"error":{..}}`) and end the
    /// body normally. A non-streaming request gets a 500 error instead.
    MidStreamError,
    /// Stream the first half of the chunks (at least one), then reset the
    /// connection. A non-streaming request gets its headers (with the full
    /// `Content-Length`) and half of its body before the reset.
    MidStreamDrop,
    /// Like `MidStreamDrop`, but the connection is reset halfway through a
    /// line or event: the first half of the chunks, then the first half of
    /// the next one's bytes. A non-streaming request is treated as by
    /// `MidStreamDrop`.
    MidLineDrop,
    /// Never answer; the request stays in flight until the client goes away
    /// or the server shuts down.
    Hang,
}

/// Why a scripted reply stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FinishReason {
    /// Natural end: Ollama `done_reason:"stop"`, OpenAI `finish_reason:"stop"`
    /// (`"tool_calls"` when the script has tool calls).
    #[default]
    Stop,
    /// Token limit: `"length"` in both APIs.
    Length,
}

/// The field name the fake uses for reasoning text in OpenAI-style replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReasoningField {
    /// `reasoning` (Ollama `/v1`, current vLLM); default for
    /// [`FakeMode::Ollama`] and [`FakeMode::OpenAi`].
    Reasoning,
    /// `reasoning_content` (llama-server, older vLLM); default for
    /// [`FakeMode::LlamaServer`].
    ReasoningContent,
}

impl ReasoningField {
    fn key(self) -> &'static str {
        match self {
            ReasoningField::Reasoning => "reasoning",
            ReasoningField::ReasoningContent => "reasoning_content",
        }
    }
}

/// One scripted tool call.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCallScript {
    /// Call id sent in OpenAI replies (and as `id` in Ollama replies).
    pub id: String,
    /// Function name.
    pub name: String,
    /// Arguments: a JSON object. Ollama replies carry it as an object; OpenAI
    /// replies carry its compact serialization as a string.
    pub arguments: serde_json::Value,
    /// In OpenAI streams, how many pieces the argument string is split into
    /// (after the first fragment, which has the id, name and `""`). At least 1.
    pub fragments: usize,
}

impl ToolCallScript {
    /// A tool call with id `call_<name>` whose arguments stream in 3 pieces.
    pub fn new(name: impl Into<String>, arguments: serde_json::Value) -> Self {
        let name = name.into();
        ToolCallScript {
            id: format!("call_{name}"),
            name,
            arguments,
            fragments: 3,
        }
    }

    /// Replace the call id.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// The argument object as the JSON string OpenAI replies carry.
    pub fn arguments_string(&self) -> String {
        self.arguments.to_string()
    }
}

/// What the fake answers to chat/generate/completion requests.
///
/// Without a script the fake answers `chunks` generated pieces
/// (`"tok0"`, `" tok1"`, ...; see [`ReplyScript::generated`]).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ReplyScript {
    /// Content pieces, one stream chunk each. Joined for non-streaming replies.
    pub content: Vec<String>,
    /// Reasoning pieces, streamed before the content (Ollama `thinking`,
    /// OpenAI `reasoning` / `reasoning_content`).
    pub reasoning: Vec<String>,
    /// Tool calls, sent after the content (chat routes only).
    pub tool_calls: Vec<ToolCallScript>,
    /// Why the reply stopped.
    pub finish: FinishReason,
}

impl ReplyScript {
    /// A reply made of these content pieces.
    pub fn content<S: AsRef<str>>(pieces: &[S]) -> Self {
        ReplyScript {
            content: pieces.iter().map(|p| p.as_ref().to_owned()).collect(),
            ..ReplyScript::default()
        }
    }

    /// The default reply with `n` pieces: `"tok0"`, `" tok1"`, ... so the whole
    /// text is `"tok0 tok1 ..."`.
    pub fn generated(n: usize) -> Self {
        ReplyScript {
            content: (0..n)
                .map(|i| {
                    if i == 0 {
                        "tok0".to_owned()
                    } else {
                        format!(" tok{i}")
                    }
                })
                .collect(),
            ..ReplyScript::default()
        }
    }

    /// Add reasoning pieces.
    pub fn with_reasoning<S: AsRef<str>>(mut self, pieces: &[S]) -> Self {
        self.reasoning = pieces.iter().map(|p| p.as_ref().to_owned()).collect();
        self
    }

    /// Add a tool call.
    pub fn with_tool_call(mut self, call: ToolCallScript) -> Self {
        self.tool_calls.push(call);
        self
    }

    /// Set the finish reason.
    pub fn with_finish(mut self, finish: FinishReason) -> Self {
        self.finish = finish;
        self
    }

    /// The whole content text.
    pub fn text(&self) -> String {
        self.content.concat()
    }

    /// The whole reasoning text.
    pub fn reasoning_text(&self) -> String {
        self.reasoning.concat()
    }

    /// Completion tokens reported in usage: one per content, reasoning and
    /// tool-call piece.
    pub fn completion_tokens(&self) -> u64 {
        (self.content.len() + self.reasoning.len() + self.tool_calls.len()) as u64
    }
}

/// Everything needed to start a [`FakeBackend`]. Build with
/// [`FakeConfig::new`] and the chained setters; every field is public too.
#[derive(Clone, Debug)]
pub struct FakeConfig {
    /// Which server to imitate.
    pub mode: FakeMode,
    /// Address to bind; default `127.0.0.1:0`.
    pub listen: SocketAddr,
    /// Advertised models (Ollama names as listed, e.g. `"llama3:latest"`).
    pub models: Vec<String>,
    /// Models loaded at start (must also be in `models` to be visible).
    pub loaded: Vec<String>,
    /// When set, every route but `/` and `/health` requires
    /// `Authorization: Bearer <key>`; otherwise 401 in the route's error shape.
    pub api_key: Option<String>,
    /// Time before the first response byte of an inference reply.
    pub delay: Duration,
    /// Time between stream chunks.
    pub chunk_delay: Duration,
    /// Content pieces of the generated reply (ignored when `reply` is set).
    pub chunks: usize,
    /// A scripted reply instead of the generated one.
    pub reply: Option<ReplyScript>,
    /// Serve no `/v1/completions` route (like backends that lack it).
    pub no_completions: bool,
    /// How many requests to keep for [`FakeControl::requests`]; 0 disables
    /// recording.
    pub record_capacity: usize,
    /// Length of the embedding vectors.
    pub embedding_dims: usize,
    /// Prompt tokens reported in usage for chat/generate/completions.
    pub prompt_tokens: u64,
    /// Context length reported by `/api/show`, `/api/ps` and `/v1/models`.
    pub context_length: u64,
    /// Mark a model loaded when a request for it is served (Ollama's
    /// behaviour); off by default so tests control loading explicitly.
    pub load_on_request: bool,
    /// Override the reasoning field name of OpenAI-style replies.
    pub reasoning_field: Option<ReasoningField>,
    /// Sent as the `x-fake-backend` response header on every reply, so a test
    /// can tell which fake answered.
    pub label: String,
    /// What `GET /api/version` answers in Ollama mode (`{"version": ..}`);
    /// `None` serves no such route (404, like a server without it).
    pub version: Option<String>,
}

impl FakeConfig {
    /// The version `/api/version` answers unless told otherwise.
    pub const DEFAULT_VERSION: &'static str = "0.12.3";

    /// Defaults: bind `127.0.0.1:0`, no models, no key, no delay, 3 chunks,
    /// recording of the last 256 requests, 8-dimensional embeddings,
    /// 10 prompt tokens, context 4096, label `"fake"`, version
    /// [`FakeConfig::DEFAULT_VERSION`].
    pub fn new(mode: FakeMode) -> Self {
        FakeConfig {
            mode,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            models: Vec::new(),
            loaded: Vec::new(),
            api_key: None,
            delay: Duration::ZERO,
            chunk_delay: Duration::ZERO,
            chunks: 3,
            reply: None,
            no_completions: false,
            record_capacity: 256,
            embedding_dims: 8,
            prompt_tokens: 10,
            context_length: 4096,
            load_on_request: false,
            reasoning_field: None,
            label: "fake".to_owned(),
            version: Some(Self::DEFAULT_VERSION.to_owned()),
        }
    }

    /// Set the advertised models.
    pub fn models<S: AsRef<str>>(mut self, models: &[S]) -> Self {
        self.models = models.iter().map(|m| m.as_ref().to_owned()).collect();
        self
    }

    /// Set the models loaded at start.
    pub fn loaded<S: AsRef<str>>(mut self, models: &[S]) -> Self {
        self.loaded = models.iter().map(|m| m.as_ref().to_owned()).collect();
        self
    }

    /// Mark every advertised model loaded at start (call after
    /// [`FakeConfig::models`]).
    pub fn all_loaded(mut self) -> Self {
        self.loaded = self.models.clone();
        self
    }

    /// Require this API key.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Set the bind address.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Set the delay before the first byte.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Set the delay between stream chunks.
    pub fn chunk_delay(mut self, delay: Duration) -> Self {
        self.chunk_delay = delay;
        self
    }

    /// Set the number of generated content chunks.
    pub fn chunks(mut self, n: usize) -> Self {
        self.chunks = n;
        self
    }

    /// Use a scripted reply.
    pub fn reply(mut self, script: ReplyScript) -> Self {
        self.reply = Some(script);
        self
    }

    /// Serve no `/v1/completions`.
    pub fn no_completions(mut self) -> Self {
        self.no_completions = true;
        self
    }

    /// Set how many requests are recorded (0 = none).
    pub fn record_capacity(mut self, n: usize) -> Self {
        self.record_capacity = n;
        self
    }

    /// Set the embedding length.
    pub fn embedding_dims(mut self, n: usize) -> Self {
        self.embedding_dims = n;
        self
    }

    /// Set the label sent in `x-fake-backend`.
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    /// Mark models loaded when they serve a request.
    pub fn load_on_request(mut self) -> Self {
        self.load_on_request = true;
        self
    }

    /// Override the reasoning field name.
    pub fn reasoning_field(mut self, field: ReasoningField) -> Self {
        self.reasoning_field = Some(field);
        self
    }

    /// Set the version `/api/version` answers (Ollama mode), e.g. `"0.5.7"`.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// Serve no `/api/version` (404), like a server without that route.
    pub fn no_version(mut self) -> Self {
        self.version = None;
        self
    }
}

/// Errors starting or restarting a fake server.
#[derive(Debug, thiserror::Error)]
pub enum FakeError {
    /// Binding the listening socket failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address that could not be bound.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// [`FakeBackend::restart`] was called while the server was running.
    #[error("the fake server is already running")]
    AlreadyRunning,
    /// The label is not a valid HTTP header value.
    #[error("label `{0}` is not a valid header value")]
    BadLabel(String),
}

/// One request the fake received, as it arrived.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// HTTP method.
    pub method: Method,
    /// URI path, e.g. `/api/chat`.
    pub path: String,
    /// Query string without `?`, if any.
    pub query: Option<String>,
    /// All request headers.
    pub headers: HeaderMap,
    /// The raw body.
    pub body: Bytes,
    /// When the request arrived.
    pub at: Instant,
}

impl RecordedRequest {
    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// A header value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The token of an `Authorization: Bearer <token>` header.
    pub fn bearer_token(&self) -> Option<&str> {
        self.header("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
    }
}

/// The deterministic embedding the fake returns for `text`: `dims` values in
/// `[-1, 1)` derived from the text's bytes (FNV-1a seeded by the index).
pub fn embedding_for(text: &str, dims: usize) -> Vec<f32> {
    (0..dims)
        .map(|i| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            for b in text.as_bytes() {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
            // Mix once more so neighbouring indices differ in the top bits.
            h ^= h >> 29;
            h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
            h ^= h >> 32;
            let unit = (h >> 40) as f32 / (1u64 << 24) as f32;
            unit * 2.0 - 1.0
        })
        .collect()
}

/// Thread-safe control handle of a running fake: cheap to clone, usable from
/// any task while the server runs. [`FakeBackend`] derefs to it.
#[derive(Clone)]
pub struct FakeControl {
    shared: Arc<Shared>,
}

impl fmt::Debug for FakeControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeControl")
            .field("mode", &self.shared.mode)
            .finish_non_exhaustive()
    }
}

impl FakeControl {
    /// The mode this fake imitates.
    pub fn mode(&self) -> FakeMode {
        self.shared.mode
    }

    // ---- models -------------------------------------------------------

    /// Replace the advertised models. Models that stay keep their loaded
    /// flag; new ones start unloaded.
    pub fn set_models<S: AsRef<str>>(&self, models: &[S]) {
        self.shared.set_models(models.iter().map(|m| m.as_ref()));
    }

    /// Set whether `model` is loaded (Ollama `/api/ps`, llama-server
    /// `status`). Returns false if the fake does not advertise it.
    pub fn set_loaded(&self, model: &str, loaded: bool) -> bool {
        self.shared.set_loaded(model, loaded)
    }

    /// Advertised models, in order.
    pub fn models(&self) -> Vec<String> {
        self.shared
            .models
            .read()
            .iter()
            .map(|m| m.name.clone())
            .collect()
    }

    /// The bytes of a blob stored by `POST /api/blobs/{digest}`
    /// (`sha256:<hex>` or `sha256-<hex>`), if any.
    pub fn blob(&self, digest: &str) -> Option<Bytes> {
        let key = digest.replacen("sha256-", "sha256:", 1);
        self.shared.blobs.lock().get(&key).cloned()
    }

    /// Models currently loaded, in order.
    pub fn loaded_models(&self) -> Vec<String> {
        self.shared
            .models
            .read()
            .iter()
            .filter(|m| m.loaded)
            .map(|m| m.name.clone())
            .collect()
    }

    // ---- timing and replies -------------------------------------------

    /// Time before the first response byte of inference replies.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.set_delay(delay);
    }

    /// Time between stream chunks.
    pub fn set_chunk_delay(&self, delay: Duration) {
        self.shared.set_chunk_delay(delay);
    }

    /// Time a stream's body stays open after its last chunk (a backend
    /// slow to end the response).
    pub fn set_end_delay(&self, delay: Duration) {
        self.shared.set_end_delay(delay);
    }

    /// Number of content chunks of the generated reply (no effect while a
    /// script is set).
    pub fn set_chunks(&self, n: usize) {
        self.shared.set_chunks(n);
    }

    /// Answer with this script from now on; `None` goes back to the
    /// generated reply.
    pub fn set_reply(&self, script: Option<ReplyScript>) {
        self.shared.set_reply(script);
    }

    /// The reply the fake sends now (the script or the generated one).
    pub fn reply(&self) -> ReplyScript {
        (*self.shared.effective_reply()).clone()
    }

    /// Require this API key (`None`: no key needed).
    pub fn set_api_key(&self, key: Option<&str>) {
        *self.shared.api_key.write() = key.map(str::to_owned);
    }

    /// Embedding length.
    pub fn embedding_dims(&self) -> usize {
        self.shared
            .embedding_dims
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    // ---- failures -----------------------------------------------------

    /// Inject this failure on every inference request from now on.
    pub fn set_failure(&self, mode: FailureMode) {
        self.shared.failures.lock().persistent = mode;
    }

    /// Inject `mode` on the next `n` inference requests only, then fall back
    /// to the persistent mode set by [`FakeControl::set_failure`].
    pub fn fail_next(&self, n: usize, mode: FailureMode) {
        let mut f = self.shared.failures.lock();
        f.one_shot = if n == 0 { None } else { Some((n, mode)) };
    }

    /// Inject a failure on the listing and health routes (`/`, `/api/tags`,
    /// `/api/ps`, `/api/version`, `/api/show`, `/v1/models`, `/health`), as
    /// discovery probes see it. Only `None`, `Status`, `Reset` and `Hang`
    /// apply; the mid-stream modes behave like `Status(500)`. A `Status(503)`
    /// on llama-server `/health` is its `Loading model` answer.
    pub fn set_probe_failure(&self, mode: FailureMode) {
        *self.shared.probe_failure.lock() = mode;
    }

    // ---- gate ---------------------------------------------------------

    /// `true`: inference requests that arrive wait (counted in flight and
    /// in [`FakeControl::waiting`]) until released. `false`: release all of
    /// them and stop holding.
    pub fn hold_requests(&self, hold: bool) {
        self.shared.gate.set_held(hold);
    }

    /// Release up to `n` requests that are being held now (never future
    /// ones); returns how many were released.
    pub fn release_held(&self, n: usize) -> usize {
        self.shared.gate.release(n)
    }

    /// Requests being held by the gate and not yet released.
    pub fn waiting(&self) -> usize {
        self.shared.gate.waiting()
    }

    // ---- statistics ---------------------------------------------------

    /// Inference requests in flight now (all models).
    pub fn in_flight(&self) -> usize {
        self.shared.stats.in_flight()
    }

    /// Highest number of inference requests in flight at once (all models)
    /// since start or [`FakeControl::reset_stats`].
    pub fn peak_in_flight(&self) -> usize {
        self.shared.stats.peak()
    }

    /// Inference requests in flight now for `model` (matched like the
    /// server matches request names, e.g. `a` finds `a:latest` in Ollama mode).
    pub fn concurrency(&self, model: &str) -> usize {
        let key = self.shared.stats_key(model);
        self.shared.stats.model(&key).0
    }

    /// Peak concurrent inference requests for `model`.
    pub fn peak_concurrency(&self, model: &str) -> usize {
        let key = self.shared.stats_key(model);
        self.shared.stats.model(&key).1
    }

    /// Inference requests served for `model` (any outcome).
    pub fn model_requests(&self, model: &str) -> u64 {
        let key = self.shared.stats_key(model);
        self.shared.stats.model(&key).2
    }

    /// Requests received on `path` (a route path such as `/api/chat` or
    /// `/v1/models`; 0 for paths the fake does not serve).
    pub fn request_count(&self, path: &str) -> u64 {
        self.shared.stats.route_count(path)
    }

    /// All requests received, on any path (unknown paths included).
    pub fn total_requests(&self) -> u64 {
        self.shared.stats.total()
    }

    /// Inference requests whose client disconnected before the response was
    /// complete.
    pub fn cancelled_count(&self) -> u64 {
        self.shared.stats.cancelled()
    }

    /// Inference requests the server finished (normally or with an injected
    /// failure).
    pub fn completed_count(&self) -> u64 {
        self.shared.stats.completed()
    }

    /// Zero the counters and set peaks to the current in-flight values.
    /// Recorded requests are kept (see [`FakeControl::clear_requests`]).
    pub fn reset_stats(&self) {
        self.shared.stats.reset();
    }

    // ---- recording ----------------------------------------------------

    /// The last recorded requests, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.recorder.lock().iter().cloned().collect()
    }

    /// The recorded requests on `path`, oldest first.
    pub fn requests_to(&self, path: &str) -> Vec<RecordedRequest> {
        self.shared
            .recorder
            .lock()
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// The most recent recorded request on `path`.
    pub fn last_request_to(&self, path: &str) -> Option<RecordedRequest> {
        self.shared
            .recorder
            .lock()
            .iter()
            .rev()
            .find(|r| r.path == path)
            .cloned()
    }

    /// Whether the fake stores the Responses API answer with id `id`
    /// (given, with `store` not false, and not deleted).
    pub fn stores_response(&self, id: &str) -> bool {
        self.shared.has_response(id)
    }

    /// Forget the recorded requests.
    pub fn clear_requests(&self) {
        self.shared.recorder.lock().clear();
    }

    // ---- waiting for conditions -----------------------------------------

    /// Wait until `condition` holds or `timeout` passes; returns whether it
    /// holds. Re-checked whenever a request starts or ends, is cancelled, or
    /// the gate's waiting count changes — no polling interval.
    pub async fn wait_until<F>(&self, timeout: Duration, mut condition: F) -> bool
    where
        F: FnMut(&FakeControl) -> bool,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.events.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if condition(self) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return condition(self);
            }
        }
    }

    /// Wait until at least `n` requests are held by the gate.
    pub fn wait_for_waiting(&self, n: usize, timeout: Duration) -> impl Future<Output = bool> + '_ {
        self.wait_until(timeout, move |c| c.waiting() >= n)
    }

    /// Wait until at least `n` inference requests are in flight.
    pub fn wait_for_in_flight(
        &self,
        n: usize,
        timeout: Duration,
    ) -> impl Future<Output = bool> + '_ {
        self.wait_until(timeout, move |c| c.in_flight() >= n)
    }

    /// Wait until no inference request is in flight.
    pub fn wait_for_idle(&self, timeout: Duration) -> impl Future<Output = bool> + '_ {
        self.wait_until(timeout, |c| c.in_flight() == 0)
    }

    /// Wait until at least `n` requests have been cancelled by their client.
    pub fn wait_for_cancelled(&self, n: u64, timeout: Duration) -> impl Future<Output = bool> + '_ {
        self.wait_until(timeout, move |c| c.cancelled_count() >= n)
    }

    /// Wait until at least `n` requests have arrived on `path`.
    pub fn wait_for_requests<'a>(
        &'a self,
        path: &'a str,
        n: u64,
        timeout: Duration,
    ) -> impl Future<Output = bool> + 'a {
        self.wait_until(timeout, move |c| c.request_count(path) >= n)
    }
}

/// A running fake model server. Dropping it stops the server and closes its
/// connections. Derefs to its [`FakeControl`].
pub struct FakeBackend {
    control: FakeControl,
    addr: SocketAddr,
    router: axum::Router,
    running: Mutex<Option<server::Running>>,
}

impl fmt::Debug for FakeBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeBackend")
            .field("mode", &self.control.mode())
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FakeBackend {
    /// Start a fake server; panics if it cannot bind (tests bind
    /// `127.0.0.1:0`, which does not fail). Use [`FakeBackend::try_start`]
    /// to handle the error.
    pub async fn start(config: FakeConfig) -> FakeBackend {
        match Self::try_start(config).await {
            Ok(backend) => backend,
            Err(e) => panic!("fake backend failed to start: {e}"),
        }
    }

    /// Start a fake server, returning bind errors.
    pub async fn try_start(config: FakeConfig) -> Result<FakeBackend, FakeError> {
        let shared = Arc::new(Shared::new(&config)?);
        let router = handlers::router(shared.clone(), &config);
        let listener = server::bind(config.listen)?;
        let addr = listener.local_addr().map_err(|source| FakeError::Bind {
            addr: config.listen,
            source,
        })?;
        let running = server::spawn(listener, router.clone());
        Ok(FakeBackend {
            control: FakeControl { shared },
            addr,
            router,
            running: Mutex::new(Some(running)),
        })
    }

    /// Base URL, e.g. `http://127.0.0.1:41234` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Bound socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A clonable control handle (the same one `Deref` gives).
    pub fn control(&self) -> FakeControl {
        self.control.clone()
    }

    /// Whether the server is accepting connections.
    pub fn is_running(&self) -> bool {
        self.running.lock().is_some()
    }

    /// Stop listening and close every open connection at once, mid-response
    /// included (the "killed backend" case). Returns when all connection
    /// tasks have ended. No-op if already stopped.
    pub async fn shutdown(&self) {
        let running = self.running.lock().take();
        if let Some(running) = running {
            running.stop().await;
        }
    }

    /// Listen again on the same address after [`FakeBackend::shutdown`];
    /// state (models, counters, records) is kept.
    pub async fn restart(&self) -> Result<(), FakeError> {
        if self.is_running() {
            return Err(FakeError::AlreadyRunning);
        }
        let listener = server::bind(self.addr)?;
        let running = server::spawn(listener, self.router.clone());
        let mut slot = self.running.lock();
        if slot.is_some() {
            // Another restart won the race; ours stops again.
            running.cancel();
            return Err(FakeError::AlreadyRunning);
        }
        *slot = Some(running);
        Ok(())
    }
}

impl Deref for FakeBackend {
    type Target = FakeControl;

    fn deref(&self) -> &FakeControl {
        &self.control
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        if let Some(running) = self.running.lock().take() {
            running.cancel();
        }
    }
}
