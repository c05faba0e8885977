//! Reply bodies in the exact wire shapes of `shared/reference/api-shapes.md`:
//! Ollama NDJSON and JSON, OpenAI chat/completions SSE and JSON (with the
//! llama-server `timings` and reasoning field), embeddings, and listings.
//!
//! Streams are planned as a list of frames up front; the handler sends them
//! with the configured delays and, for injected mid-stream failures, stops at
//! `fail_at`, which always lies after at least one frame (when the reply has
//! content) and before the frame that ends the stream.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::handlers::{ErrorStyle, InferBody, Route};
use super::state::{Shared, StoredResponse};
use super::{FakeMode, FinishReason, ReplyScript, embedding_for};

pub(super) const NDJSON: &str = "application/x-ndjson";
pub(super) const SSE: &str = "text/event-stream";

/// `modified_at` of every listed model.
const MODIFIED_AT: &str = "2025-05-10T08:06:48.123456789Z";
/// `created` of every `/v1/models` item.
const MODEL_CREATED: u64 = 1_700_000_000;

/// A planned reply.
pub(super) enum Reply {
    /// One JSON object (non-streaming).
    Json(Value),
    /// A stream of frames.
    Stream(StreamReply),
}

pub(super) struct StreamReply {
    pub(super) content_type: &'static str,
    pub(super) frames: Vec<Bytes>,
    /// Index of the first frame not sent when a mid-stream failure is injected.
    pub(super) fail_at: usize,
}

/// What a reply is made from.
pub(super) struct ReplyCtx<'a> {
    pub(super) shared: &'a Shared,
    /// The model name as the client sent it (echoed back, like real servers).
    pub(super) model: &'a str,
    pub(super) started: Instant,
    pub(super) script: &'a ReplyScript,
    pub(super) id: u64,
    pub(super) created: u64,
    pub(super) chunk_delay: Duration,
}

impl ReplyCtx<'_> {
    fn prompt_tokens(&self) -> u64 {
        self.shared.prompt_tokens
    }

    fn completion_tokens(&self) -> u64 {
        self.script.completion_tokens()
    }

    /// Expected whole duration of a reply of `frames` frames, in ns.
    fn total_ns(&self, frames: usize) -> u64 {
        let elapsed = self.started.elapsed() + self.chunk_delay * frames as u32;
        u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX).max(1)
    }
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// RFC 3339 UTC timestamp with nanoseconds.
pub(super) fn rfc3339(since_epoch: Duration) -> String {
    let secs = since_epoch.as_secs();
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since_epoch.subsec_nanos()
    )
}

fn now_rfc3339() -> String {
    rfc3339(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default(),
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn ndjson(value: &Value) -> Bytes {
    let mut s = value.to_string();
    s.push('\n');
    Bytes::from(s)
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// A typed SSE event (`event: <kind>` then `data:`), as the Responses and
/// Anthropic Messages APIs send them.
fn sse_event(kind: &str, value: &Value) -> Bytes {
    Bytes::from(format!("event: {kind}\ndata: {value}\n\n"))
}

const SSE_DONE: &[u8] = b"data: [DONE]\n\n";

/// The frame carrying an injected error inside a stream.
pub(super) fn stream_error_frame(style: ErrorStyle, body: &Value) -> Bytes {
    match style {
        ErrorStyle::Ollama => ndjson(body),
        ErrorStyle::OllamaV1 | ErrorStyle::OpenAi | ErrorStyle::Llama => sse(body),
    }
}

/// `fail_at` for a stream with `head` opening frames and `middle` content
/// frames: after the opening frames and half the content (rounded up).
fn fail_index(head: usize, middle: usize) -> usize {
    head + middle.div_ceil(2)
}

/// Split `s` into at most `n` non-empty pieces on char boundaries.
fn split_pieces(s: &str, n: usize) -> Vec<&str> {
    let starts: Vec<usize> = s.char_indices().map(|(i, _)| i).collect();
    let chars = starts.len();
    let n = n.clamp(1, chars.max(1));
    (0..n)
        .filter_map(|k| {
            let a = starts.get(k * chars / n).copied().unwrap_or(s.len());
            let b = starts.get((k + 1) * chars / n).copied().unwrap_or(s.len());
            (a < b).then(|| &s[a..b])
        })
        .collect()
}

// ---- Ollama native --------------------------------------------------------

fn finish_str(script: &ReplyScript) -> &'static str {
    match script.finish {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn ollama_tool_calls(script: &ReplyScript) -> Value {
    Value::Array(
        script
            .tool_calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({"id": c.id, "function": {"index": i, "name": c.name, "arguments": c.arguments}})
            })
            .collect(),
    )
}

fn ollama_metrics(ctx: &ReplyCtx<'_>, obj: &mut Map<String, Value>, frames: usize) {
    let total = ctx.total_ns(frames);
    let load = total / 10;
    let prompt_eval = total / 10;
    obj.insert("total_duration".into(), json!(total));
    obj.insert("load_duration".into(), json!(load));
    obj.insert("prompt_eval_count".into(), json!(ctx.prompt_tokens()));
    obj.insert("prompt_eval_duration".into(), json!(prompt_eval));
    obj.insert("eval_count".into(), json!(ctx.completion_tokens()));
    obj.insert(
        "eval_duration".into(),
        json!((total - load - prompt_eval).max(1)),
    );
}

fn ollama_base(ctx: &ReplyCtx<'_>, created_at: &str) -> Map<String, Value> {
    let mut obj = Map::new();
    obj.insert("model".into(), json!(ctx.model));
    obj.insert("created_at".into(), json!(created_at));
    obj
}

/// `/api/chat` (`chat`) or `/api/generate` reply.
pub(super) fn ollama_reply(ctx: &ReplyCtx<'_>, chat: bool, stream: bool) -> Reply {
    let script = ctx.script;
    let created_at = now_rfc3339();
    let with_text = |obj: &mut Map<String, Value>, content: &str, thinking: Option<&str>| {
        if chat {
            let mut msg = Map::new();
            msg.insert("role".into(), json!("assistant"));
            msg.insert("content".into(), json!(content));
            if let Some(t) = thinking {
                msg.insert("thinking".into(), json!(t));
            }
            obj.insert("message".into(), Value::Object(msg));
        } else {
            obj.insert("response".into(), json!(content));
            if let Some(t) = thinking {
                obj.insert("thinking".into(), json!(t));
            }
        }
    };
    let finish = |obj: &mut Map<String, Value>, frames: usize| {
        obj.insert("done".into(), json!(true));
        obj.insert("done_reason".into(), json!(finish_str(script)));
        ollama_metrics(ctx, obj, frames);
        if !chat {
            obj.insert("context".into(), json!([1, 2, 3]));
        }
    };
    let has_tools = chat && !script.tool_calls.is_empty();

    if !stream {
        let mut obj = ollama_base(ctx, &created_at);
        let reasoning = script.reasoning_text();
        let thinking = (!reasoning.is_empty()).then_some(reasoning.as_str());
        with_text(&mut obj, &script.text(), thinking);
        if has_tools && let Some(Value::Object(msg)) = obj.get_mut("message") {
            msg.insert("tool_calls".into(), ollama_tool_calls(script));
        }
        finish(&mut obj, 0);
        return Reply::Json(Value::Object(obj));
    }

    let mut frames = Vec::with_capacity(script.reasoning.len() + script.content.len() + 2);
    for piece in &script.reasoning {
        let mut obj = ollama_base(ctx, &created_at);
        with_text(&mut obj, "", Some(piece));
        obj.insert("done".into(), json!(false));
        frames.push(ndjson(&Value::Object(obj)));
    }
    for piece in &script.content {
        let mut obj = ollama_base(ctx, &created_at);
        with_text(&mut obj, piece, None);
        obj.insert("done".into(), json!(false));
        frames.push(ndjson(&Value::Object(obj)));
    }
    if has_tools {
        // Ollama sends tool calls whole, in one chunk.
        let mut obj = ollama_base(ctx, &created_at);
        with_text(&mut obj, "", None);
        if let Some(Value::Object(msg)) = obj.get_mut("message") {
            msg.insert("tool_calls".into(), ollama_tool_calls(script));
        }
        obj.insert("done".into(), json!(false));
        frames.push(ndjson(&Value::Object(obj)));
    }
    let middle = frames.len();
    let mut last = ollama_base(ctx, &created_at);
    with_text(&mut last, "", None);
    finish(&mut last, middle);
    frames.push(ndjson(&Value::Object(last)));
    Reply::Stream(StreamReply {
        content_type: NDJSON,
        frames,
        fail_at: fail_index(0, middle),
    })
}

/// Reply to a chat/generate request with no messages/prompt: the model is
/// loaded (or unloaded with `keep_alive: 0`).
pub(super) fn ollama_load(ctx: &ReplyCtx<'_>, chat: bool, unload: bool) -> Value {
    let mut obj = ollama_base(ctx, &now_rfc3339());
    if chat {
        obj.insert(
            "message".into(),
            json!({"role": "assistant", "content": ""}),
        );
    } else {
        obj.insert("response".into(), json!(""));
    }
    obj.insert(
        "done_reason".into(),
        json!(if unload { "unload" } else { "load" }),
    );
    obj.insert("done".into(), json!(true));
    Value::Object(obj)
}

// ---- OpenAI ---------------------------------------------------------------

fn usage(ctx: &ReplyCtx<'_>) -> Value {
    let p = ctx.prompt_tokens();
    let c = ctx.completion_tokens();
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
}

/// llama-server `timings` (milliseconds, floats).
fn timings(ctx: &ReplyCtx<'_>, frames: usize) -> Value {
    let prompt_n = ctx.prompt_tokens();
    let predicted_n = ctx.completion_tokens();
    let total_ms = ctx.total_ns(frames) as f64 / 1e6;
    let prompt_ms = total_ms * 0.1;
    let predicted_ms = total_ms - prompt_ms;
    let per_token = |ms: f64, n: u64| if n == 0 { 0.0 } else { ms / n as f64 };
    let per_second = |ms: f64, n: u64| {
        if ms <= 0.0 {
            0.0
        } else {
            n as f64 * 1000.0 / ms
        }
    };
    json!({
        "cache_n": 0,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": per_token(prompt_ms, prompt_n),
        "prompt_per_second": per_second(prompt_ms, prompt_n),
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": per_token(predicted_ms, predicted_n),
        "predicted_per_second": per_second(predicted_ms, predicted_n),
    })
}

fn chat_finish_reason(script: &ReplyScript) -> &'static str {
    match script.finish {
        FinishReason::Length => "length",
        FinishReason::Stop if !script.tool_calls.is_empty() => "tool_calls",
        FinishReason::Stop => "stop",
    }
}

/// Top-level fields every OpenAI chat object starts with.
fn openai_head(ctx: &ReplyCtx<'_>, object: &str, prefix: &str) -> Map<String, Value> {
    let mut obj = Map::new();
    obj.insert("id".into(), json!(format!("{prefix}-{}", ctx.id)));
    obj.insert("object".into(), json!(object));
    obj.insert("created".into(), json!(ctx.created));
    obj.insert("model".into(), json!(ctx.model));
    if ctx.shared.mode == FakeMode::Ollama {
        obj.insert("system_fingerprint".into(), json!("fp_ollama"));
    }
    obj
}

/// `/v1/chat/completions` reply.
pub(super) fn openai_chat(ctx: &ReplyCtx<'_>, stream: bool, include_usage: bool) -> Reply {
    let script = ctx.script;
    let reasoning_key = ctx.shared.reasoning_field.key();
    let llama = ctx.shared.mode == FakeMode::LlamaServer;
    let finish_reason = chat_finish_reason(script);

    if !stream {
        let mut msg = Map::new();
        msg.insert("role".into(), json!("assistant"));
        let text = script.text();
        if text.is_empty() && !script.tool_calls.is_empty() {
            msg.insert("content".into(), Value::Null);
        } else {
            msg.insert("content".into(), json!(text));
        }
        if !script.reasoning.is_empty() {
            msg.insert(reasoning_key.into(), json!(script.reasoning_text()));
        }
        if !script.tool_calls.is_empty() {
            let calls: Vec<Value> = script
                .tool_calls
                .iter()
                .map(|c| {
                    json!({"id": c.id, "type": "function",
                           "function": {"name": c.name, "arguments": c.arguments_string()}})
                })
                .collect();
            msg.insert("tool_calls".into(), Value::Array(calls));
        }
        let mut obj = openai_head(ctx, "chat.completion", "chatcmpl");
        obj.insert(
            "choices".into(),
            json!([{"index": 0, "message": msg, "logprobs": null, "finish_reason": finish_reason}]),
        );
        obj.insert("usage".into(), usage(ctx));
        if llama {
            obj.insert("timings".into(), timings(ctx, 0));
        }
        return Reply::Json(Value::Object(obj));
    }

    let chunk = |delta: Value, finish: Value| {
        let mut obj = openai_head(ctx, "chat.completion.chunk", "chatcmpl");
        obj.insert(
            "choices".into(),
            json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]),
        );
        obj
    };
    let mut frames = Vec::with_capacity(script.reasoning.len() + script.content.len() + 5);
    frames.push(sse(&Value::Object(chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    ))));
    for piece in &script.reasoning {
        let mut delta = Map::new();
        delta.insert(reasoning_key.into(), json!(piece));
        frames.push(sse(&Value::Object(chunk(
            Value::Object(delta),
            Value::Null,
        ))));
    }
    for piece in &script.content {
        frames.push(sse(&Value::Object(chunk(
            json!({"content": piece}),
            Value::Null,
        ))));
    }
    for (i, call) in script.tool_calls.iter().enumerate() {
        frames.push(sse(&Value::Object(chunk(
            json!({"tool_calls": [{"index": i, "id": call.id, "type": "function",
                                   "function": {"name": call.name, "arguments": ""}}]}),
            Value::Null,
        ))));
        let args = call.arguments_string();
        for piece in split_pieces(&args, call.fragments) {
            frames.push(sse(&Value::Object(chunk(
                json!({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}),
                Value::Null,
            ))));
        }
    }
    let middle = frames.len() - 1;
    let mut last = chunk(json!({}), json!(finish_reason));
    if llama {
        last.insert("timings".into(), timings(ctx, middle + 1));
    }
    frames.push(sse(&Value::Object(last)));
    if include_usage {
        let mut obj = openai_head(ctx, "chat.completion.chunk", "chatcmpl");
        obj.insert("choices".into(), json!([]));
        obj.insert("usage".into(), usage(ctx));
        frames.push(sse(&Value::Object(obj)));
    }
    frames.push(Bytes::from_static(SSE_DONE));
    Reply::Stream(StreamReply {
        content_type: SSE,
        frames,
        fail_at: fail_index(1, middle),
    })
}

/// `/v1/responses` reply (the Responses API, content only): one `message`
/// output item; streamed as typed events (`event:` and `data:` lines)
/// ending with `response.completed`, which carries the usage, and no
/// `[DONE]`.
pub(super) fn openai_responses(
    ctx: &ReplyCtx<'_>,
    stream: bool,
    input: Option<&Value>,
    store: bool,
) -> Reply {
    let script = ctx.script;
    let id = ctx.shared.response_id(ctx.id);
    let p = ctx.prompt_tokens();
    let c = ctx.completion_tokens();
    let usage = json!({"input_tokens": p, "output_tokens": c, "total_tokens": p + c});
    let text = script.text();
    let message = json!({"id": format!("msg_{}", ctx.id), "type": "message", "status": "completed",
        "role": "assistant", "content": [{"type": "output_text", "text": text, "annotations": []}]});
    let response = |status: &str, output: Value, usage: Value| {
        json!({"id": id, "object": "response", "created_at": ctx.created, "model": ctx.model,
               "status": status, "error": null, "incomplete_details": null, "output": output,
               "usage": usage})
    };
    let completed = response("completed", json!([message]), usage.clone());
    if store {
        ctx.shared.store_response(
            id.clone(),
            StoredResponse {
                object: completed.clone(),
                input_items: input_items(ctx.id, input),
            },
        );
    }
    if !stream {
        return Reply::Json(completed);
    }
    let mut seq = 0u64;
    let mut event = |kind: &str, mut data: Value| {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(seq);
        seq += 1;
        sse_event(kind, &data)
    };
    let item = format!("msg_{}", ctx.id);
    let mut frames = vec![event(
        "response.created",
        json!({"response": response("in_progress", json!([]), Value::Null)}),
    )];
    for piece in &script.content {
        frames.push(event(
            "response.output_text.delta",
            json!({"item_id": item, "output_index": 0, "content_index": 0, "delta": piece}),
        ));
    }
    let middle = script.content.len();
    frames.push(event(
        "response.output_text.done",
        json!({"item_id": item, "output_index": 0, "content_index": 0, "text": text}),
    ));
    frames.push(event(
        "response.completed",
        json!({"response": response("completed", json!([message]), usage)}),
    ));
    Reply::Stream(StreamReply {
        content_type: SSE,
        frames,
        fail_at: fail_index(1, middle),
    })
}

/// A Responses request's `input` as stored input items: a string is one
/// user message; list items keep their fields, get an `id` if they have
/// none, `type: "message"` when they have a `role`, and string `content`
/// becomes one `input_text` part. Answer `n`'s items are `item_{n}_{i}`.
fn input_items(n: u64, input: Option<&Value>) -> Vec<Value> {
    let text_part = |text: &Value| json!([{"type": "input_text", "text": text}]);
    match input {
        Some(text @ Value::String(_)) => {
            vec![json!({"id": format!("item_{n}_0"), "type": "message",
            "role": "user", "status": "completed", "content": text_part(text)})]
        }
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| {
                let mut item = item.as_object()?.clone();
                item.entry("id")
                    .or_insert_with(|| json!(format!("item_{n}_{i}")));
                if item.contains_key("role") {
                    item.entry("type").or_insert_with(|| json!("message"));
                }
                if let Some(text) = item.get("content").filter(|c| c.is_string()).cloned() {
                    item.insert("content".into(), text_part(&text));
                }
                Some(Value::Object(item))
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// `/v1/messages` reply (Anthropic Messages, content only): one text
/// block; streamed as typed events from `message_start` (input tokens) to
/// `message_stop`, the output tokens on `message_delta`.
pub(super) fn anthropic_messages(ctx: &ReplyCtx<'_>, stream: bool) -> Reply {
    let script = ctx.script;
    let id = format!("msg_{}", ctx.id);
    let stop_reason = match finish_str(script) {
        "length" => "max_tokens",
        _ => "end_turn",
    };
    let (p, c) = (ctx.prompt_tokens(), ctx.completion_tokens());
    if !stream {
        return Reply::Json(json!({"id": id, "type": "message", "role": "assistant",
            "model": ctx.model, "content": [{"type": "text", "text": script.text()}],
            "stop_reason": stop_reason, "stop_sequence": null,
            "usage": {"input_tokens": p, "output_tokens": c}}));
    }
    let event = |kind: &str, data: Value| sse_event(kind, &data);
    let mut frames = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": {"id": id, "type": "message",
                "role": "assistant", "model": ctx.model, "content": [], "stop_reason": null,
                "stop_sequence": null, "usage": {"input_tokens": p, "output_tokens": 1}}}),
        ),
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
                   "content_block": {"type": "text", "text": ""}}),
        ),
    ];
    for piece in &script.content {
        frames.push(event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "text_delta", "text": piece}}),
        ));
    }
    let middle = script.content.len();
    frames.push(event(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    frames.push(event(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null},
               "usage": {"output_tokens": c}}),
    ));
    frames.push(event("message_stop", json!({"type": "message_stop"})));
    Reply::Stream(StreamReply {
        content_type: SSE,
        frames,
        fail_at: fail_index(2, middle),
    })
}

/// `/v1/completions` reply (content only; reasoning and tool calls are not
/// part of text completions).
pub(super) fn openai_completion(ctx: &ReplyCtx<'_>, stream: bool, include_usage: bool) -> Reply {
    let script = ctx.script;
    let completion_usage = || {
        let p = ctx.prompt_tokens();
        let c = script.content.len() as u64;
        json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
    };
    let finish_reason = finish_str(script);
    if !stream {
        let mut obj = openai_head(ctx, "text_completion", "cmpl");
        obj.insert(
            "choices".into(),
            json!([{"text": script.text(), "index": 0, "logprobs": null,
                    "finish_reason": finish_reason}]),
        );
        obj.insert("usage".into(), completion_usage());
        return Reply::Json(Value::Object(obj));
    }
    let chunk = |text: &str, finish: Value| {
        let mut obj = openai_head(ctx, "text_completion", "cmpl");
        obj.insert(
            "choices".into(),
            json!([{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}]),
        );
        sse(&Value::Object(obj))
    };
    let mut frames: Vec<Bytes> = script
        .content
        .iter()
        .map(|piece| chunk(piece, Value::Null))
        .collect();
    let middle = frames.len();
    frames.push(chunk("", json!(finish_reason)));
    if include_usage {
        let mut obj = openai_head(ctx, "text_completion", "cmpl");
        obj.insert("choices".into(), json!([]));
        obj.insert("usage".into(), completion_usage());
        frames.push(sse(&Value::Object(obj)));
    }
    frames.push(Bytes::from_static(SSE_DONE));
    Reply::Stream(StreamReply {
        content_type: SSE,
        frames,
        fail_at: fail_index(0, middle),
    })
}

// ---- embeddings -------------------------------------------------------------

fn tokens_text(tokens: &[Value]) -> Option<String> {
    let mut out = String::new();
    for (i, t) in tokens.iter().enumerate() {
        let n = t.as_i64()?;
        if i > 0 {
            out.push(',');
        }
        out.push_str(&n.to_string());
    }
    Some(out)
}

/// The inputs of an embeddings request as texts (token arrays become their
/// comma-joined numbers).
fn embed_inputs(value: Option<&Value>) -> Result<Vec<String>, String> {
    let bad = || "input must be a string, a list of strings or token arrays".to_owned();
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => Ok(items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()),
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
            tokens_text(items).map(|t| vec![t]).ok_or_else(bad)
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_array().and_then(|a| tokens_text(a)).ok_or_else(bad))
            .collect(),
        Some(_) => Err(bad()),
    }
}

fn input_tokens(text: &str) -> u64 {
    (text.split_whitespace().count() as u64).max(1)
}

/// `/api/embed`, `/api/embeddings` or `/v1/embeddings` reply.
pub(super) fn embeddings(
    ctx: &ReplyCtx<'_>,
    route: Route,
    body: &InferBody,
) -> Result<Value, String> {
    let dims = ctx
        .shared
        .embedding_dims
        .load(std::sync::atomic::Ordering::Relaxed);
    match route {
        Route::EmbeddingsLegacy => {
            let prompt = match body.prompt.as_ref() {
                Some(Value::String(s)) => s.as_str(),
                None => "",
                Some(_) => return Err("prompt must be a string".into()),
            };
            Ok(json!({"embedding": embedding_for(prompt, dims)}))
        }
        Route::Embed => {
            let inputs = embed_inputs(body.input.as_ref())?;
            let vectors: Vec<Vec<f32>> = inputs.iter().map(|t| embedding_for(t, dims)).collect();
            let tokens: u64 = inputs.iter().map(|t| input_tokens(t)).sum();
            let total = ctx.total_ns(0);
            Ok(
                json!({"model": ctx.model, "embeddings": vectors, "total_duration": total,
                      "load_duration": total / 10, "prompt_eval_count": tokens}),
            )
        }
        _ => {
            let inputs = embed_inputs(body.input.as_ref())?;
            if inputs.is_empty() {
                return Err("input must not be empty".into());
            }
            let data: Vec<Value> = inputs
                .iter()
                .enumerate()
                .map(|(i, t)| json!({"object": "embedding", "index": i, "embedding": embedding_for(t, dims)}))
                .collect();
            let tokens: u64 = inputs.iter().map(|t| input_tokens(t)).sum();
            Ok(json!({"object": "list", "data": data, "model": ctx.model,
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}))
        }
    }
}

// ---- listings -----------------------------------------------------------------

fn name_hash(name: &str, seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn digest(name: &str) -> String {
    (0..4u64)
        .map(|i| format!("{:016x}", name_hash(name, i)))
        .collect()
}

fn model_size(name: &str) -> u64 {
    1_000_000_000 + name_hash(name, 99) % 4_000_000_000
}

fn details() -> Value {
    json!({"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
           "parameter_size": "8.0B", "quantization_level": "Q4_K_M"})
}

/// `GET /api/tags`.
pub(super) fn tags(shared: &Shared) -> Value {
    let models: Vec<Value> = shared
        .models
        .read()
        .iter()
        .map(|m| {
            json!({"name": m.name, "model": m.name, "modified_at": MODIFIED_AT,
                   "size": model_size(&m.name), "digest": digest(&m.name), "details": details()})
        })
        .collect();
    json!({ "models": models })
}

/// `GET /api/ps`: loaded models only.
pub(super) fn ps(shared: &Shared) -> Value {
    let expires = rfc3339(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            + Duration::from_secs(300),
    );
    let models: Vec<Value> = shared
        .models
        .read()
        .iter()
        .filter(|m| m.loaded)
        .map(|m| {
            let size = model_size(&m.name);
            json!({"name": m.name, "model": m.name, "size": size, "digest": digest(&m.name),
                   "details": details(), "expires_at": expires, "size_vram": size,
                   "context_length": shared.context_length})
        })
        .collect();
    json!({ "models": models })
}

/// `POST /api/show` for an advertised model.
pub(super) fn show(shared: &Shared, name: &str) -> Value {
    let capabilities = if name.contains("embed") {
        json!(["embedding"])
    } else {
        json!(["completion", "tools"])
    };
    let dims = shared
        .embedding_dims
        .load(std::sync::atomic::Ordering::Relaxed);
    json!({
        "modelfile": format!("# Modelfile of the fake model\nFROM {name}\n"),
        "parameters": "stop \"<|eot_id|>\"",
        "template": "{{ .Prompt }}",
        "details": details(),
        "model_info": {"general.architecture": "llama", "general.parameter_count": 8_000_000_000u64,
                       "llama.context_length": shared.context_length,
                       "llama.embedding_length": dims},
        "capabilities": capabilities,
        "modified_at": MODIFIED_AT,
    })
}

/// `GET /v1/models` in the mode's flavour.
pub(super) fn v1_models(shared: &Shared) -> Value {
    let data: Vec<Value> = shared
        .models
        .read()
        .iter()
        .map(|m| match shared.mode {
            FakeMode::Ollama => json!({"id": m.name, "object": "model", "created": MODEL_CREATED,
                                       "owned_by": "library"}),
            FakeMode::OpenAi => json!({"id": m.name, "object": "model", "created": MODEL_CREATED,
                                       "owned_by": "fake", "max_model_len": shared.context_length}),
            FakeMode::LlamaServer => json!({"id": m.name, "object": "model",
                                            "created": MODEL_CREATED, "owned_by": "llamacpp",
                                            "status": {"value": if m.loaded { "loaded" } else { "unloaded" }}}),
        })
        .collect();
    json!({"object": "list", "data": data})
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(Duration::ZERO), "1970-01-01T00:00:00.000000000Z");
        // 2024-02-29T12:34:56.5Z
        let t = Duration::from_secs(1_709_210_096) + Duration::from_millis(500);
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56.500000000Z");
    }

    #[test]
    fn split_pieces_covers_the_string() {
        let s = r#"{"city":"Zürich"}"#;
        for n in 1..8 {
            let pieces = split_pieces(s, n);
            assert_eq!(pieces.concat(), s);
            assert!(pieces.len() <= n && !pieces.is_empty());
        }
        assert_eq!(split_pieces("", 3), Vec::<&str>::new());
    }

    #[test]
    fn fail_index_is_inside_the_content() {
        assert_eq!(fail_index(1, 0), 1);
        assert_eq!(fail_index(1, 1), 2);
        assert_eq!(fail_index(0, 3), 2);
        assert_eq!(fail_index(0, 4), 2);
    }
}
