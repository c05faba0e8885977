//! Ollama API ⇄ OpenAI API translation for OpenAI-only backends.
//!
//! When an Ollama-API client (`/api/chat`, `/api/generate`, `/api/embed`,
//! `/api/embeddings`) is routed to a backend that only speaks the OpenAI API
//! (llama.cpp `llama-server`, vLLM, hosted APIs), the proxy calls these pure
//! functions to rewrite the request body, the response body, and the stream
//! (SSE → NDJSON) so the client cannot tell.
//!
//! - [`chat`], [`generate`], [`embed`]: request and non-stream response
//!   conversion per route.
//! - [`stream`]: the incremental SSE → NDJSON [`stream::StreamTranslator`].
//! - [`observe`]: read-only observers for pass-through streams (token counts,
//!   end-of-stream and in-stream errors) that never modify bytes.
//! - [`listing`]: `/api/tags`, `/api/ps`, `/api/show` and `/v1/models` items.
//! - [`error`]: error bodies in both formats and upstream error parsing.
//!
//! Invariants kept here:
//! - No I/O and no clock reads: callers pass `Instant`s, `SystemTime`s and
//!   measured durations in, so every conversion is deterministic and
//!   unit-testable.
//! - Never fetch a URL for a client: images become `data:` URLs built from
//!   validated base64; anything that is not base64 is rejected (no SSRF).
//! - `stream` is always explicit on the outbound body, and
//!   `stream_options` appears only on streaming requests.
//! - Every response conversion returns [`TokenCounts`] for the release.
//! - Unknown fields are ignored, never an error; only inputs Ollama itself
//!   would reject become [`TranslateError::BadRequest`].

pub mod chat;
pub mod embed;
pub mod error;
pub mod generate;
pub mod listing;
pub mod observe;
pub(crate) mod options;
pub mod stream;
pub mod timestamp;
mod usage;

use std::time::{Duration, SystemTime};

use http::StatusCode;
use serde_json::{Map, Value, json};

pub use switchyard_control_plane::endpoint::EndpointKind;
/// Prompt and completion token counts reported with a lease release.
///
/// This is the control plane's type (`Copy`, `Default`), re-exported so the
/// proxy hands the counts over without conversion.
pub use switchyard_control_plane::outcome::TokenCounts;

pub use self::error::{UpstreamError, ollama_error, openai_error};

/// The backend a request is translated for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target<'a> {
    /// The backend's API dialect; decides which non-standard knobs are sent
    /// (`top_k`, `min_p`, `reasoning_effort:"none"` only for llama-server).
    pub kind: EndpointKind,
    /// The model name as the backend advertises it (`/v1/models` id), which
    /// may differ from the client's name (`x` vs `x:latest`).
    pub model: &'a str,
}

/// The OpenAI route a translated request goes to, relative to the
/// endpoint's OpenAI base (which ends in `/v1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpenAiRoute {
    /// `POST {base}/chat/completions`
    ChatCompletions,
    /// `POST {base}/completions`
    Completions,
    /// `POST {base}/embeddings`
    Embeddings,
}

impl OpenAiRoute {
    /// Path to append to the OpenAI base URL (`/chat/completions`, …).
    pub fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/chat/completions",
            Self::Completions => "/completions",
            Self::Embeddings => "/embeddings",
        }
    }
}

/// A translated request ready to send to the backend.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboundRequest {
    /// Where to send it.
    pub route: OpenAiRoute,
    /// The OpenAI request body.
    pub body: Value,
    /// Whether the client asked for a stream (Ollama's default is `true`);
    /// the outbound body carries the same value explicitly.
    pub stream: bool,
}

/// What to do with an Ollama request for an OpenAI-only backend.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Send this request to the backend.
    Forward(OutboundRequest),
    /// Answer without contacting the backend: Ollama answers these requests
    /// (empty prompt/messages = load or unload, empty embedding input)
    /// without running the model, and OpenAI backends have no equivalent.
    Local(LocalReply),
}

/// A reply the sidecar gives itself; see [`Plan::Local`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalReply {
    /// `/api/chat` with no messages: `done_reason` `load` (or `unload` when
    /// `keep_alive` is 0). OpenAI backends keep models loaded themselves.
    ChatLoad {
        /// `keep_alive` was 0.
        unload: bool,
    },
    /// `/api/generate` with an empty prompt; as [`LocalReply::ChatLoad`].
    GenerateLoad {
        /// `keep_alive` was 0.
        unload: bool,
    },
    /// `/api/embed` with empty input: `{"model":..,"embeddings":[]}`.
    EmbedEmpty,
    /// `/api/embeddings` with an empty prompt: `{"embedding":[]}`.
    EmbeddingsEmpty,
}

impl LocalReply {
    /// The Ollama body to return (one object; for a streaming request send it
    /// as the single NDJSON line, as Ollama does).
    pub fn render(self, model: &str, now: SystemTime) -> Value {
        let reason = |unload: bool| if unload { "unload" } else { "load" };
        match self {
            Self::ChatLoad { unload } => json!({
                "model": model,
                "created_at": timestamp::rfc3339_nanos(now),
                "message": {"role": "assistant", "content": ""},
                "done": true,
                "done_reason": reason(unload),
            }),
            Self::GenerateLoad { unload } => json!({
                "model": model,
                "created_at": timestamp::rfc3339_nanos(now),
                "response": "",
                "done": true,
                "done_reason": reason(unload),
            }),
            Self::EmbedEmpty => json!({"model": model, "embeddings": []}),
            Self::EmbeddingsEmpty => json!({"embedding": []}),
        }
    }
}

/// Whether the backend's reasoning reaches an Ollama client.
///
/// Ollama answers `think:false` without `thinking`. An OpenAI-API backend
/// may reason anyway: llama-server is told not to (`reasoning_effort:"none"`),
/// but other OpenAI-compatible servers have no portable switch (hosted
/// OpenAI rejects llama.cpp's and vLLM's), so the reasoning they send is
/// left out of the translated answer instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Thinking {
    /// Reasoning becomes `thinking`, as the backend sends it.
    Shown,
    /// The client sent `think:false`: reasoning is dropped.
    Hidden,
}

impl Thinking {
    /// What an Ollama `/api/chat` or `/api/generate` body asks for.
    pub fn requested(body: &Value) -> Self {
        match body.get("think") {
            Some(Value::Bool(false)) => Self::Hidden,
            _ => Self::Shown,
        }
    }
}

/// What the caller measured, for a non-stream response conversion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseMeta<'a> {
    /// The model name to echo to the client (the name it asked for).
    pub model: &'a str,
    /// Wall-clock time for `created_at`.
    pub now: SystemTime,
    /// Whole-request time measured by the caller (`total_duration`).
    pub total_duration: Duration,
    /// Whether reasoning is passed on as `thinking`.
    pub thinking: Thinking,
}

/// A converted response body plus the tokens it reports.
#[derive(Clone, Debug, PartialEq)]
pub struct Converted {
    /// The body in the client's format.
    pub body: Value,
    /// Tokens for the release report.
    pub tokens: TokenCounts,
}

/// Why a request or response could not be translated.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// The client's request is invalid in a way Ollama itself rejects with
    /// 400 (bad image data, bad `format`, `raw` with `system`, …).
    #[error("{0}")]
    BadRequest(String),
    /// The backend answered 2xx with a body that is not the route's shape.
    #[error("invalid response from backend: {0}")]
    BadBackendResponse(String),
    /// The backend answered 2xx with an error object in the body.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

impl TranslateError {
    /// The status to answer an Ollama client with.
    pub fn ollama_status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::BadBackendResponse(_) => StatusCode::BAD_GATEWAY,
            Self::Upstream(e) => e.ollama_status(),
        }
    }

    /// Status plus `{"error":"..."}` body for an Ollama client.
    pub fn to_ollama(&self) -> (StatusCode, Value) {
        (self.ollama_status(), ollama_error(&self.to_string()))
    }
}

pub(crate) fn bad_request(msg: impl Into<String>) -> TranslateError {
    TranslateError::BadRequest(msg.into())
}

/// Nanoseconds in a duration, saturating (Ollama durations are int64 ns).
pub(crate) fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// llama.cpp `timings` milliseconds (float) → integer nanoseconds.
pub(crate) fn ms_to_ns(ms: f64) -> u64 {
    if ms.is_finite() && ms > 0.0 {
        // Finite and positive; `as` saturates, which is the intent.
        (ms * 1_000_000.0).round() as u64
    } else {
        0
    }
}

/// OpenAI `finish_reason` → Ollama `done_reason`.
///
/// `length` stays `length`; `stop`, `tool_calls`, `content_filter`,
/// `function_call` and anything unknown become `stop` (Ollama keeps `stop`
/// even when tools were called).
pub(crate) fn done_reason(finish_reason: Option<&str>) -> &'static str {
    match finish_reason {
        Some("length") => "length",
        _ => "stop",
    }
}

/// The timing and count fields of a final (`done:true`) Ollama object.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct FinalStats {
    pub(crate) tokens: TokenCounts,
    pub(crate) total: u64,
    pub(crate) prompt_eval: u64,
    pub(crate) eval: u64,
}

impl FinalStats {
    pub(crate) fn write(&self, obj: &mut Map<String, Value>) {
        obj.insert("total_duration".into(), self.total.into());
        obj.insert("load_duration".into(), 0.into());
        obj.insert("prompt_eval_count".into(), self.tokens.prompt.into());
        obj.insert("prompt_eval_duration".into(), self.prompt_eval.into());
        obj.insert("eval_count".into(), self.tokens.completion.into());
        obj.insert("eval_duration".into(), self.eval.into());
    }
}

/// Stats for a non-stream reply: llama.cpp `timings` when present; without
/// them only the total is known, so `eval_duration` is the total (a lower
/// bound for tokens/s rather than a division by zero in clients) and
/// `prompt_eval_duration` is 0.
pub(crate) fn nonstream_stats(body: &Value, total: Duration) -> FinalStats {
    let usage = usage::Usage::of(body);
    let timings = usage::Timings::of(body);
    let total = duration_ns(total);
    let prompt_eval = timings.and_then(|t| t.prompt_ms).map_or(0, ms_to_ns);
    let eval = timings.and_then(|t| t.predicted_ms).map_or(total, ms_to_ns);
    FinalStats {
        tokens: usage::token_counts(usage, timings),
        total,
        prompt_eval,
        eval,
    }
}

/// If a 2xx body is really an error object, the error.
pub(crate) fn body_error(body: &Value) -> Option<UpstreamError> {
    UpstreamError::from_stream_value(body)
}

/// `choices[0]` of an OpenAI response (the one with `index` 0 if present).
pub(crate) fn first_choice(body: &Value) -> Option<&Map<String, Value>> {
    let choices = body.get("choices")?.as_array()?;
    choices
        .iter()
        .find(|c| c.get("index").and_then(Value::as_u64) == Some(0))
        .or_else(|| choices.first())
        .and_then(Value::as_object)
}

/// Text of an OpenAI `content` field: a string, or the text parts of an
/// array joined; `null`/absent is empty.
pub(crate) fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

/// Reasoning text from a message or delta: `reasoning_content` (llama.cpp,
/// older vLLM) or `reasoning` (current vLLM, Ollama `/v1`).
pub(crate) fn reasoning_text(obj: &Map<String, Value>) -> Option<&str> {
    ["reasoning_content", "reasoning"]
        .iter()
        .filter_map(|k| obj.get(*k).and_then(Value::as_str))
        .find(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn ms_to_ns_converts_and_clamps() {
        assert_eq!(ms_to_ns(30.9), 30_900_000);
        assert_eq!(ms_to_ns(-1.0), 0);
        assert_eq!(ms_to_ns(f64::NAN), 0);
    }

    #[test]
    fn done_reason_mapping() {
        assert_eq!(done_reason(Some("length")), "length");
        assert_eq!(done_reason(Some("tool_calls")), "stop");
        assert_eq!(done_reason(Some("content_filter")), "stop");
        assert_eq!(done_reason(None), "stop");
    }

    #[test]
    fn local_replies_render_ollama_shapes() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_735_725_600);
        let v = LocalReply::ChatLoad { unload: true }.render("m:latest", now);
        assert_eq!(v["done_reason"], "unload");
        assert_eq!(v["message"]["content"], "");
        assert_eq!(v["created_at"], "2025-01-01T10:00:00.000000000Z");
        let v = LocalReply::GenerateLoad { unload: false }.render("m", now);
        assert_eq!(v["done_reason"], "load");
        assert_eq!(v["response"], "");
        assert_eq!(
            LocalReply::EmbeddingsEmpty.render("m", now),
            json!({"embedding": []})
        );
        assert_eq!(
            LocalReply::EmbedEmpty.render("m", now)["embeddings"],
            json!([])
        );
    }

    #[test]
    fn content_text_joins_parts() {
        let parts =
            json!([{"type":"text","text":"a"},{"type":"image_url"},{"type":"text","text":"b"}]);
        assert_eq!(content_text(Some(&parts)), "ab");
        assert_eq!(content_text(Some(&Value::Null)), "");
    }

    #[test]
    fn translate_error_statuses() {
        let (s, body) = bad_request("nope").to_ollama();
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(body, json!({"error": "nope"}));
        let e = TranslateError::BadBackendResponse("x".into());
        assert_eq!(e.ollama_status(), StatusCode::BAD_GATEWAY);
    }
}
