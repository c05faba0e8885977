//! Streaming translation: OpenAI SSE chunks → Ollama NDJSON chunks.
//!
//! [`StreamTranslator`] is fed one SSE `data:` payload at a time (with the
//! `Instant` it arrived) and returns the Ollama objects to send *now*:
//!
//! - each content/reasoning delta becomes one chunk immediately (nothing is
//!   buffered, so the client sees tokens as the backend produces them);
//! - tool-call fragments are accumulated by `index` and sent whole in one
//!   chunk when `finish_reason` arrives (Ollama never splits a tool call);
//! - the final `done:true` chunk is sent once both the finish reason and the
//!   usage are known (usage normally arrives in its own chunk *after* the
//!   finish chunk; llama.cpp may put it on the finish chunk itself), or at
//!   `[DONE]`, whichever comes first. Usage is assigned, never summed, so a
//!   server that repeats it is not counted twice;
//! - an in-stream `{"error":..}` becomes an Ollama `{"error":".."}` line and
//!   the stream is failed;
//! - a stream that ends before any finish reason or `[DONE]` is reported as
//!   [`StreamEnd::Truncated`], never dressed up as a fake `done`.
//!
//! Durations: `total_duration` is `now - start` at the final chunk;
//! `prompt_eval_duration`/`eval_duration` come from llama.cpp `timings` when
//! present, else from the measured first-token time (prompt = start → first
//! token, eval = first token → finish chunk; when both fell in one read,
//! eval = total and prompt = 0, as without a stream). `created_at` is the
//! caller's wall-clock start plus the monotonic time elapsed, so no clock is
//! read.

use std::collections::BTreeMap;
use std::time::{Instant, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{Map, Value, json};

use super::chat::{parse_arguments, unreadable_tool_call};
use super::usage::{Timings, Usage, token_counts};
use super::{
    FinalStats, Thinking, TokenCounts, UpstreamError, done_reason, duration_ns, first_choice,
    ms_to_ns, ollama_error, reasoning_text, timestamp,
};
use crate::framing::{SSE_DONE, SseDecoder};

/// Which Ollama API the stream is rendered for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamMode {
    /// `/api/chat`: `message{role, content, thinking?, tool_calls?}`.
    Chat,
    /// `/api/generate`: `response` and `thinking`; works over both
    /// `/v1/completions` (`choices[].text`) and chat (`choices[].delta`).
    Generate,
}

/// Where a stream stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamStatus {
    /// Still expecting chunks.
    Streaming,
    /// The final `done:true` chunk was produced.
    Done,
    /// An error line was produced (backend error, garbage, or [`abort`]).
    ///
    /// [`abort`]: StreamTranslator::abort
    Failed,
    /// The backend stream ended before it was complete.
    Truncated,
}

/// How a stream ended, for the caller's release report and last line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// Completed normally; the `done` chunk has been produced.
    Complete,
    /// The backend reported an error; the error line has been produced.
    Failed {
        /// The error message sent to the client.
        message: String,
    },
    /// The backend stream stopped early (connection closed before a finish
    /// reason or `[DONE]`). Nothing final was produced: the caller sends an
    /// error line (e.g. [`ollama_error`]) or retries if nothing was sent yet.
    Truncated,
}

#[derive(Debug, Default)]
struct ToolAcc {
    id: Option<String>,
    name: String,
    arguments: String,
}

/// Incremental OpenAI → Ollama stream converter. See the module docs.
#[derive(Debug)]
pub struct StreamTranslator {
    mode: StreamMode,
    model: String,
    start: Instant,
    start_wall: SystemTime,
    first_token: Option<Instant>,
    finish_at: Option<Instant>,
    finish_reason: Option<String>,
    usage: Option<Usage>,
    timings: Option<Timings>,
    tools: BTreeMap<u64, ToolAcc>,
    status: StreamStatus,
    failure: Option<String>,
    tokens: TokenCounts,
    /// Content/reasoning deltas streamed: the completion-token count when
    /// the backend reports neither `usage` nor `timings` (llama-cpp-python's
    /// server ignores `include_usage`; llama.cpp streams one token per chunk).
    deltas: u64,
    /// Whether reasoning deltas become `thinking` (see [`Thinking`]).
    thinking: Thinking,
}

impl StreamTranslator {
    /// A translator for one response. `model` is echoed to the client (the
    /// name it asked for); `start` is when the request started and
    /// `start_wall` the wall-clock time at that instant.
    pub fn new(
        mode: StreamMode,
        model: impl Into<String>,
        start: Instant,
        start_wall: SystemTime,
    ) -> Self {
        Self {
            mode,
            model: model.into(),
            start,
            start_wall,
            first_token: None,
            finish_at: None,
            finish_reason: None,
            usage: None,
            timings: None,
            tools: BTreeMap::new(),
            status: StreamStatus::Streaming,
            failure: None,
            tokens: TokenCounts::default(),
            deltas: 0,
            thinking: Thinking::Shown,
        }
    }

    /// Passes reasoning on as `thinking`, or drops it (`think:false`).
    #[must_use]
    pub fn with_thinking(mut self, thinking: Thinking) -> Self {
        self.thinking = thinking;
        self
    }

    /// Feeds one SSE data payload (JSON text or `[DONE]`) received at
    /// `now`; returns the Ollama objects to send now, in order. After the
    /// stream is done or failed, further payloads are ignored.
    pub fn feed(&mut self, payload: &str, now: Instant) -> Vec<Value> {
        if self.status != StreamStatus::Streaming {
            return Vec::new();
        }
        let payload = payload.trim();
        if payload.is_empty() {
            return Vec::new();
        }
        if payload == SSE_DONE {
            return self.complete(now);
        }
        let Ok(chunk) = serde_json::from_str::<Value>(payload) else {
            return self.abort("backend sent an invalid stream chunk");
        };
        if let Some(e) = UpstreamError::from_stream_value(&chunk) {
            return self.abort(&e.message);
        }
        if let Some(u) = Usage::of(&chunk) {
            self.usage = Some(u);
        }
        if let Some(t) = Timings::of(&chunk) {
            self.timings = Some(t);
        }
        let mut out = Vec::new();
        if let Some(choice) = first_choice(&chunk) {
            let delta = choice.get("delta").and_then(Value::as_object);
            let content = match delta {
                Some(d) => d.get("content").and_then(Value::as_str),
                None => choice.get("text").and_then(Value::as_str),
            }
            .unwrap_or("");
            let reasoning = delta.and_then(reasoning_text).unwrap_or("");
            let had_tools = self.mode == StreamMode::Chat
                && delta.is_some_and(|d| self.accumulate_tools(d.get("tool_calls")));
            if !content.is_empty() || !reasoning.is_empty() || had_tools {
                self.first_token.get_or_insert(now);
            }
            if !content.is_empty() || !reasoning.is_empty() {
                self.deltas += 1;
                let shown = match self.thinking {
                    Thinking::Shown => reasoning,
                    Thinking::Hidden => "",
                };
                if !content.is_empty() || !shown.is_empty() {
                    out.push(self.delta_chunk(content, shown, now));
                }
            }
            if let Some(reason) = choice
                .get("finish_reason")
                .and_then(Value::as_str)
                .filter(|r| !r.is_empty())
            {
                if self.finish_reason.is_none() {
                    self.finish_reason = Some(reason.to_owned());
                    self.finish_at = Some(now);
                }
                out.extend(self.tool_chunk(now));
            }
        }
        if self.finish_reason.is_some() && self.usage.is_some() {
            out.extend(self.complete(now));
        }
        out
    }

    /// Ends the stream (the backend body is exhausted). Returns any final
    /// objects still to send and how the stream ended. A stream that saw a
    /// finish reason but no `[DONE]` is complete (the generation finished);
    /// one that saw neither is truncated.
    pub fn finish(&mut self, now: Instant) -> (Vec<Value>, StreamEnd) {
        match self.status {
            StreamStatus::Streaming if self.finish_reason.is_some() => {
                (self.complete(now), StreamEnd::Complete)
            }
            StreamStatus::Streaming => {
                self.status = StreamStatus::Truncated;
                (Vec::new(), StreamEnd::Truncated)
            }
            StreamStatus::Done => (Vec::new(), StreamEnd::Complete),
            StreamStatus::Failed => (
                Vec::new(),
                StreamEnd::Failed {
                    message: self.failure.clone().unwrap_or_default(),
                },
            ),
            StreamStatus::Truncated => (Vec::new(), StreamEnd::Truncated),
        }
    }

    /// Fails the stream with `message` (e.g. the backend connection broke or
    /// a frame was too large): returns the Ollama error line to send, or
    /// nothing if the stream had already ended.
    pub fn abort(&mut self, message: &str) -> Vec<Value> {
        if self.status != StreamStatus::Streaming {
            return Vec::new();
        }
        self.status = StreamStatus::Failed;
        self.failure = Some(message.to_owned());
        vec![ollama_error(message)]
    }

    /// Tokens so far: final once the `done` chunk was produced; before that
    /// (or for a failed stream) the latest usage/timings seen.
    pub fn tokens(&self) -> TokenCounts {
        match self.status {
            StreamStatus::Done => self.tokens,
            _ => self.counted_tokens(),
        }
    }

    /// Counts from `usage`/`timings`; without either, the number of
    /// streamed deltas stands in for the completion tokens.
    fn counted_tokens(&self) -> TokenCounts {
        let mut tokens = token_counts(self.usage, self.timings);
        if self.usage.is_none() && self.timings.is_none() {
            tokens.completion = self.deltas;
        }
        tokens
    }

    /// Where the stream stands.
    pub fn status(&self) -> StreamStatus {
        self.status
    }

    /// Adds tool-call fragments; true if there were any.
    fn accumulate_tools(&mut self, tool_calls: Option<&Value>) -> bool {
        let Some(Value::Array(calls)) = tool_calls else {
            return false;
        };
        for (pos, call) in calls.iter().enumerate() {
            let index = call
                .get("index")
                .and_then(Value::as_u64)
                .unwrap_or(pos as u64);
            let acc = self.tools.entry(index).or_default();
            if let Some(id) = call
                .get("id")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
            {
                acc.id.get_or_insert_with(|| id.to_owned());
            }
            let Some(function) = call.get("function").and_then(Value::as_object) else {
                continue;
            };
            if let Some(name) = function.get("name").and_then(Value::as_str) {
                // The name comes whole in the first fragment; some servers
                // repeat it later, which must not double it.
                if acc.name.is_empty() {
                    acc.name = name.to_owned();
                }
            }
            match function.get("arguments") {
                Some(Value::String(piece)) => acc.arguments.push_str(piece),
                // A server sending a whole object instead of string pieces.
                Some(obj @ Value::Object(_)) => acc.arguments = obj.to_string(),
                _ => {}
            }
        }
        !calls.is_empty()
    }

    fn created_at(&self, now: Instant) -> String {
        timestamp::rfc3339_nanos(self.start_wall + now.saturating_duration_since(self.start))
    }

    fn base(&self, now: Instant) -> Map<String, Value> {
        let mut obj = Map::new();
        obj.insert("model".into(), self.model.clone().into());
        obj.insert("created_at".into(), self.created_at(now).into());
        obj
    }

    fn delta_chunk(&self, content: &str, reasoning: &str, now: Instant) -> Value {
        let mut obj = self.base(now);
        match self.mode {
            StreamMode::Chat => {
                let mut msg = Map::new();
                msg.insert("role".into(), "assistant".into());
                msg.insert("content".into(), content.into());
                if !reasoning.is_empty() {
                    msg.insert("thinking".into(), reasoning.into());
                }
                obj.insert("message".into(), Value::Object(msg));
            }
            StreamMode::Generate => {
                obj.insert("response".into(), content.into());
                if !reasoning.is_empty() {
                    obj.insert("thinking".into(), reasoning.into());
                }
            }
        }
        obj.insert("done".into(), false.into());
        Value::Object(obj)
    }

    /// The accumulated tool calls as one chunk (once), if any.
    fn tool_chunk(&mut self, now: Instant) -> Option<Value> {
        if self.mode != StreamMode::Chat || self.tools.is_empty() {
            return None;
        }
        let mut calls = Vec::new();
        // Calls whose arguments are not a JSON object go out as text.
        let mut content = String::new();
        for acc in std::mem::take(&mut self.tools).into_values() {
            let arguments = match parse_arguments(Some(&Value::String(acc.arguments))) {
                Ok(arguments) => arguments,
                Err(raw) => {
                    content.push_str(&unreadable_tool_call(&acc.name, &raw));
                    continue;
                }
            };
            let mut call = Map::new();
            if let Some(id) = acc.id {
                call.insert("id".into(), id.into());
            }
            call.insert(
                "function".into(),
                json!({"index": calls.len(), "name": acc.name, "arguments": arguments}),
            );
            calls.push(Value::Object(call));
        }
        let mut msg = Map::new();
        msg.insert("role".into(), "assistant".into());
        msg.insert("content".into(), content.into());
        if !calls.is_empty() {
            msg.insert("tool_calls".into(), Value::Array(calls));
        }
        let mut obj = self.base(now);
        obj.insert("message".into(), Value::Object(msg));
        obj.insert("done".into(), false.into());
        Some(Value::Object(obj))
    }

    /// Produces pending tool calls and the final `done` chunk.
    fn complete(&mut self, now: Instant) -> Vec<Value> {
        let mut out: Vec<Value> = self.tool_chunk(now).into_iter().collect();
        let end = self.finish_at.unwrap_or(now);
        let tokens = self.counted_tokens();
        let timings = self.timings.unwrap_or_default();
        let prompt_eval = timings.prompt_ms.map_or_else(
            || {
                duration_ns(
                    self.first_token
                        .unwrap_or(end)
                        .saturating_duration_since(self.start),
                )
            },
            ms_to_ns,
        );
        let eval = timings.predicted_ms.map_or_else(
            || {
                self.first_token
                    .map_or(0, |first| duration_ns(end.saturating_duration_since(first)))
            },
            ms_to_ns,
        );
        let total = duration_ns(now.saturating_duration_since(self.start));
        // The first token and the finish arrived in the same read (a fast
        // backend, a busy reader): the split is unknown, so report as the
        // non-stream path does (eval = total, prompt_eval = 0) rather than
        // an eval_duration of 0 that clients divide tokens by.
        let (prompt_eval, eval) = if eval == 0 && timings.predicted_ms.is_none() {
            (0, total)
        } else {
            (prompt_eval, eval)
        };
        let stats = FinalStats {
            tokens,
            total,
            prompt_eval,
            eval,
        };
        let mut obj = self.base(now);
        match self.mode {
            StreamMode::Chat => {
                obj.insert(
                    "message".into(),
                    json!({"role": "assistant", "content": ""}),
                );
            }
            StreamMode::Generate => {
                obj.insert("response".into(), "".into());
            }
        }
        obj.insert("done".into(), true.into());
        // A stream that ended without a finish reason was cut short (as
        // llama-cpp-python ends an interrupted generation: `[DONE]` alone).
        // Ollama leaves `done_reason` out when generation did not finish
        // normally; "stop" would hide the truncation.
        if self.finish_reason.is_some() {
            obj.insert(
                "done_reason".into(),
                done_reason(self.finish_reason.as_deref()).into(),
            );
        }
        stats.write(&mut obj);
        out.push(Value::Object(obj));
        self.status = StreamStatus::Done;
        self.tokens = tokens;
        out
    }
}

/// Serializes objects as NDJSON (`{..}\n` each).
pub fn ndjson_bytes(values: &[Value]) -> Bytes {
    let mut buf = BytesMut::new();
    for v in values {
        buf.put_slice(v.to_string().as_bytes());
        buf.put_u8(b'\n');
    }
    buf.freeze()
}

/// SSE body bytes in, NDJSON bytes out: an [`SseDecoder`] feeding a
/// [`StreamTranslator`]. What the proxy drives for a translated stream.
#[derive(Debug)]
pub struct SseToNdjson {
    decoder: SseDecoder,
    translator: StreamTranslator,
}

impl SseToNdjson {
    /// Wraps a translator.
    pub fn new(translator: StreamTranslator) -> Self {
        Self {
            decoder: SseDecoder::new(),
            translator,
        }
    }

    /// Feeds a chunk of the backend body received at `now`; returns the
    /// NDJSON bytes to send now (possibly empty). A framing error fails the
    /// stream with an error line.
    pub fn push(&mut self, bytes: &[u8], now: Instant) -> Bytes {
        let values = match self.decoder.push(bytes) {
            Ok(payloads) => payloads
                .iter()
                .flat_map(|p| self.translator.feed(p, now))
                .collect::<Vec<_>>(),
            Err(e) => self.translator.abort(&e.to_string()),
        };
        ndjson_bytes(&values)
    }

    /// The backend body ended: returns the last NDJSON bytes and how the
    /// stream ended (see [`StreamEnd`]).
    pub fn finish(&mut self, now: Instant) -> (Bytes, StreamEnd) {
        let mut values = Vec::new();
        if let Some(payload) = self.decoder.finish() {
            // An unterminated last event that does not parse was cut off:
            // the stream ended before it was complete (as a passed-through
            // stream reports it), rather than sent an invalid chunk.
            let whole = payload == SSE_DONE
                || serde_json::from_str::<serde::de::IgnoredAny>(&payload).is_ok();
            if whole {
                values.extend(self.translator.feed(&payload, now));
            }
        }
        let (last, end) = self.translator.finish(now);
        values.extend(last);
        (ndjson_bytes(&values), end)
    }

    /// Fails the stream (backend connection error): the error line to send.
    pub fn abort(&mut self, message: &str) -> Bytes {
        ndjson_bytes(&self.translator.abort(message))
    }

    /// Token counts (see [`StreamTranslator::tokens`]).
    pub fn tokens(&self) -> TokenCounts {
        self.translator.tokens()
    }

    /// Where the stream stands.
    pub fn status(&self) -> StreamStatus {
        self.translator.status()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use super::*;

    /// A clock for tests: instants at fixed offsets from a base.
    struct Clock {
        base: Instant,
    }

    impl Clock {
        fn new() -> Self {
            Self {
                base: Instant::now(),
            }
        }
        fn at(&self, ms: u64) -> Instant {
            self.base + Duration::from_millis(ms)
        }
    }

    fn wall() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_735_725_600)
    }

    fn chat(clock: &Clock) -> StreamTranslator {
        StreamTranslator::new(StreamMode::Chat, "qwen3:8b", clock.at(0), wall())
    }

    const HEAD: &str =
        r#""id":"chatcmpl-1","object":"chat.completion.chunk","created":1735689600,"model":"m""#;

    fn chunk(choices: &str) -> String {
        format!("{{{HEAD},\"choices\":[{choices}]}}")
    }

    #[test]
    fn content_deltas_are_emitted_immediately_then_done_after_usage() {
        let c = Clock::new();
        let mut t = chat(&c);
        // Role-only first chunk: nothing to send.
        let out = t.feed(
            &chunk(r#"{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}"#),
            c.at(10),
        );
        assert!(out.is_empty());
        let out = t.feed(
            &chunk(r#"{"index":0,"delta":{"content":"The"},"finish_reason":null}"#),
            c.at(100),
        );
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0]["message"],
            json!({"role":"assistant","content":"The"})
        );
        assert_eq!(out[0]["done"], false);
        assert_eq!(out[0]["model"], "qwen3:8b");
        assert_eq!(out[0]["created_at"], "2025-01-01T10:00:00.100000000Z");
        let out = t.feed(
            &chunk(r#"{"index":0,"delta":{"content":" end"},"finish_reason":null}"#),
            c.at(300),
        );
        assert_eq!(out[0]["message"]["content"], " end");
        // Finish chunk: no usage yet, so no done yet.
        let out = t.feed(
            &chunk(r#"{"index":0,"delta":{},"finish_reason":"length"}"#),
            c.at(400),
        );
        assert!(out.is_empty());
        assert_eq!(t.status(), StreamStatus::Streaming);
        let out = t.feed(
            &format!(r#"{{{HEAD},"choices":[],"usage":{{"prompt_tokens":20,"completion_tokens":2,"total_tokens":22}}}}"#),
            c.at(410),
        );
        assert_eq!(out.len(), 1);
        let done = &out[0];
        assert_eq!(done["done"], true);
        assert_eq!(done["done_reason"], "length");
        assert_eq!(done["message"]["content"], "");
        assert_eq!(done["prompt_eval_count"], 20);
        assert_eq!(done["eval_count"], 2);
        assert_eq!(done["total_duration"], 410_000_000u64);
        assert_eq!(done["prompt_eval_duration"], 100_000_000u64);
        assert_eq!(done["eval_duration"], 300_000_000u64);
        assert_eq!(done["load_duration"], 0);
        assert_eq!(t.status(), StreamStatus::Done);
        // [DONE] afterwards adds nothing.
        assert!(t.feed(SSE_DONE, c.at(420)).is_empty());
        assert_eq!(t.finish(c.at(430)), (vec![], StreamEnd::Complete));
        assert_eq!(
            t.tokens(),
            TokenCounts {
                prompt: 20,
                completion: 2
            }
        );
    }

    #[test]
    fn two_parallel_tool_calls_split_over_chunks() {
        let c = Clock::new();
        let mut t = chat(&c);
        let feeds = [
            r#"{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_a","type":"function","function":{"name":"get_weather","arguments":""}}]},"finish_reason":null}"#,
            r#"{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_b","type":"function","function":{"name":"get_time","arguments":""}}]},"finish_reason":null}"#,
            r#"{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\":"}}]},"finish_reason":null}"#,
            r#"{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":"{\"tz\":\"CET\"}"}}]},"finish_reason":null}"#,
            r#"{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"Oslo\"}"}}]},"finish_reason":null}"#,
        ];
        for (i, f) in feeds.iter().enumerate() {
            assert!(
                t.feed(&chunk(f), c.at(10 * i as u64 + 10)).is_empty(),
                "fragment {i} emitted early"
            );
        }
        let out = t.feed(
            &chunk(r#"{"index":0,"delta":{},"finish_reason":"tool_calls"}"#),
            c.at(100),
        );
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0]["message"]["tool_calls"],
            json!([
                {"id":"call_a","function":{"index":0,"name":"get_weather","arguments":{"city":"Oslo"}}},
                {"id":"call_b","function":{"index":1,"name":"get_time","arguments":{"tz":"CET"}}}
            ])
        );
        assert_eq!(out[0]["done"], false);
        let out = t.feed(SSE_DONE, c.at(110));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["done"], true);
        // tool_calls finish → stop, as Ollama reports it.
        assert_eq!(out[0]["done_reason"], "stop");
        assert!(out[0]["message"].get("tool_calls").is_none());
    }

    #[test]
    fn tool_calls_flushed_at_end_without_finish_chunk_reason() {
        let c = Clock::new();
        let mut t = chat(&c);
        t.feed(&chunk(r#"{"index":0,"delta":{"tool_calls":[{"index":0,"id":"x","function":{"name":"f","arguments":"{bad"}}]}}"#), c.at(5));
        let out = t.feed(SSE_DONE, c.at(6));
        assert_eq!(out.len(), 2);
        // Unparsable arguments cannot be an Ollama tool call (an object):
        // the call comes as the text the model produced.
        assert_eq!(
            out[0]["message"],
            json!({"role":"assistant","content":"{\"name\":\"f\",\"arguments\":{bad}"})
        );
        assert_eq!(out[1]["done"], true);
    }

    #[test]
    fn reasoning_under_both_names() {
        let c = Clock::new();
        let mut t = chat(&c);
        let out = t.feed(
            &chunk(r#"{"index":0,"delta":{"reasoning_content":"hmm"},"finish_reason":null}"#),
            c.at(1),
        );
        assert_eq!(
            out[0]["message"],
            json!({"role":"assistant","content":"","thinking":"hmm"})
        );
        let out = t.feed(
            &chunk(r#"{"index":0,"delta":{"reasoning":"more"},"finish_reason":null}"#),
            c.at(2),
        );
        assert_eq!(out[0]["message"]["thinking"], "more");
        let mut g = StreamTranslator::new(StreamMode::Generate, "m", c.at(0), wall());
        let out = g.feed(
            &chunk(r#"{"index":0,"delta":{"reasoning":"r","content":"c"}}"#),
            c.at(1),
        );
        assert_eq!(out[0]["thinking"], "r");
        assert_eq!(out[0]["response"], "c");
        assert!(out[0].get("message").is_none());
    }

    #[test]
    fn think_false_drops_the_reasoning_a_backend_streams_anyway() {
        let c = Clock::new();
        let mut t = chat(&c).with_thinking(Thinking::Hidden);
        // A reasoning-only delta sends nothing; the content still comes.
        let out = t.feed(
            &chunk(r#"{"index":0,"delta":{"reasoning_content":"hmm"},"finish_reason":null}"#),
            c.at(1),
        );
        assert!(out.is_empty(), "{out:?}");
        let out = t.feed(
            &chunk(r#"{"index":0,"delta":{"reasoning":"r","content":"Hi"},"finish_reason":null}"#),
            c.at(2),
        );
        assert_eq!(
            out[0]["message"],
            json!({"role":"assistant","content":"Hi"})
        );
        let out = t.feed(SSE_DONE, c.at(3));
        assert_eq!(out[0]["done"], true);
        assert!(out[0]["message"].get("thinking").is_none());
        // Reasoning deltas still count as completion tokens without usage.
        assert_eq!(t.tokens().completion, 2);
        let mut g = StreamTranslator::new(StreamMode::Generate, "m", c.at(0), wall())
            .with_thinking(Thinking::Hidden);
        let out = g.feed(
            &chunk(r#"{"index":0,"delta":{"reasoning":"r","content":"c"}}"#),
            c.at(1),
        );
        assert_eq!(out[0]["response"], "c");
        assert!(out[0].get("thinking").is_none());
    }

    #[test]
    fn without_usage_or_timings_streamed_deltas_count_as_completion_tokens() {
        // llama-cpp-python's server ignores stream_options.include_usage.
        let c = Clock::new();
        let mut t = chat(&c);
        for (i, piece) in ["Hel", "lo", "!"].iter().enumerate() {
            let delta =
                format!(r#"{{"index":0,"delta":{{"content":"{piece}"}},"finish_reason":null}}"#);
            t.feed(&chunk(&delta), c.at(10 * (i as u64 + 1)));
        }
        t.feed(
            &chunk(r#"{"index":0,"delta":{},"finish_reason":"stop"}"#),
            c.at(50),
        );
        let out = t.feed("[DONE]", c.at(60));
        let last = out.last().unwrap();
        assert_eq!(last["done"], true);
        assert_eq!(last["eval_count"], 3);
        assert_eq!(t.tokens().completion, 3);
    }

    #[test]
    fn a_stream_cut_short_has_no_done_reason() {
        // One piece of content with `finish_reason` (JSON), then `[DONE]`:
        // the final chunk.
        let c = Clock::new();
        let end = |finish: &str| {
            let mut t = chat(&c);
            t.feed(
                &chunk(&format!(
                    r#"{{"index":0,"delta":{{"content":"Hel"}},"finish_reason":{finish}}}"#
                )),
                c.at(10),
            );
            t.feed("[DONE]", c.at(20)).pop().unwrap()
        };
        // `[DONE]` without a finish chunk: how llama-cpp-python ends an
        // interrupted generation. Not "stop", which would hide it.
        let last = end("null");
        assert_eq!(last["done"], true, "{last}");
        assert!(last.get("done_reason").is_none(), "{last}");
        // With its finish chunk, the same stream says why it ended.
        assert_eq!(end(r#""length""#)["done_reason"], "length");
    }

    #[test]
    fn a_stream_read_in_one_piece_reports_a_non_zero_eval_duration() {
        // Every event arrived in the same read: one instant for all of them.
        let c = Clock::new();
        let mut t = chat(&c);
        t.feed(
            &chunk(r#"{"index":0,"delta":{"content":"Hi"},"finish_reason":null}"#),
            c.at(40),
        );
        t.feed(
            &chunk(r#"{"index":0,"delta":{},"finish_reason":"stop"}"#),
            c.at(40),
        );
        let out = t.feed(
            &format!(r#"{{{HEAD},"choices":[],"usage":{{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}}}"#),
            c.at(40),
        );
        let done = out.last().unwrap();
        assert_eq!(done["done"], true);
        assert_eq!(done["eval_count"], 1);
        assert_eq!(done["total_duration"], 40_000_000u64);
        assert_eq!(done["eval_duration"], 40_000_000u64);
        assert_eq!(done["prompt_eval_duration"], 0);
    }

    #[test]
    fn llama_cpp_usage_and_timings_on_finish_chunk_count_once() {
        let c = Clock::new();
        let mut t = chat(&c);
        t.feed(
            &chunk(r#"{"index":0,"delta":{"content":"Hi"},"finish_reason":null}"#),
            c.at(50),
        );
        let finish = format!(
            r#"{{{HEAD},"choices":[{{"index":0,"delta":{{}},"finish_reason":"stop"}}],
               "usage":{{"prompt_tokens":248,"completion_tokens":35,"total_tokens":283}},
               "timings":{{"cache_n":236,"prompt_n":12,"prompt_ms":30.9,"predicted_n":35,"predicted_ms":661.0}}}}"#
        );
        let out = t.feed(&finish, c.at(700));
        assert_eq!(
            out.len(),
            1,
            "done is sent as soon as finish and usage are known"
        );
        assert_eq!(out[0]["prompt_eval_count"], 248);
        assert_eq!(out[0]["eval_count"], 35);
        assert_eq!(out[0]["prompt_eval_duration"], 30_900_000u64);
        assert_eq!(out[0]["eval_duration"], 661_000_000u64);
        // The usage chunk that follows must not add anything.
        let out = t.feed(
            &format!(r#"{{{HEAD},"choices":[],"usage":{{"prompt_tokens":248,"completion_tokens":35,"total_tokens":283}}}}"#),
            c.at(701),
        );
        assert!(out.is_empty());
        assert!(t.feed(SSE_DONE, c.at(702)).is_empty());
        assert_eq!(
            t.tokens(),
            TokenCounts {
                prompt: 248,
                completion: 35
            }
        );
    }

    #[test]
    fn in_stream_error_fails_the_stream() {
        let c = Clock::new();
        let mut t = chat(&c);
        t.feed(&chunk(r#"{"index":0,"delta":{"content":"par"}}"#), c.at(1));
        let out = t.feed(
            r#"{"error":{"code":400,"message":"the request exceeds the available context size","type":"exceed_context_size_error"}}"#,
            c.at(2),
        );
        assert_eq!(
            out,
            vec![json!({"error": "the request exceeds the available context size"})]
        );
        assert_eq!(t.status(), StreamStatus::Failed);
        assert!(t.feed(SSE_DONE, c.at(3)).is_empty());
        let (last, end) = t.finish(c.at(4));
        assert!(last.is_empty());
        assert_eq!(
            end,
            StreamEnd::Failed {
                message: "the request exceeds the available context size".into()
            }
        );
    }

    #[test]
    fn garbage_chunk_fails_the_stream() {
        let c = Clock::new();
        let mut t = chat(&c);
        let out = t.feed("{not json", c.at(1));
        assert_eq!(out[0]["error"], "backend sent an invalid stream chunk");
        assert_eq!(t.status(), StreamStatus::Failed);
    }

    #[test]
    fn truncated_stream_is_reported_not_faked() {
        let c = Clock::new();
        let mut t = chat(&c);
        t.feed(&chunk(r#"{"index":0,"delta":{"content":"half"}}"#), c.at(1));
        let (last, end) = t.finish(c.at(2));
        assert!(last.is_empty());
        assert_eq!(end, StreamEnd::Truncated);
        assert_eq!(t.status(), StreamStatus::Truncated);
        assert!(t.feed(SSE_DONE, c.at(3)).is_empty());
    }

    #[test]
    fn finish_after_finish_reason_without_done_completes() {
        let c = Clock::new();
        let mut t = chat(&c);
        t.feed(
            &chunk(r#"{"index":0,"delta":{"content":"x"},"finish_reason":"stop"}"#),
            c.at(1),
        );
        let (last, end) = t.finish(c.at(2));
        assert_eq!(end, StreamEnd::Complete);
        assert_eq!(last.len(), 1);
        assert_eq!(last[0]["done"], true);
        // No usage reported: the one streamed delta is the count.
        assert_eq!(last[0]["eval_count"], 1);
    }

    #[test]
    fn generate_over_completions_stream() {
        let c = Clock::new();
        let mut g = StreamTranslator::new(StreamMode::Generate, "gemma:latest", c.at(0), wall());
        let out = g.feed(r#"{"id":"cmpl-1","object":"text_completion","choices":[{"text":"Once","index":0,"finish_reason":null}]}"#, c.at(20));
        assert_eq!(out[0]["response"], "Once");
        let out = g.feed(r#"{"id":"cmpl-1","object":"text_completion","choices":[{"text":"","index":0,"finish_reason":"stop"}]}"#, c.at(30));
        assert!(out.is_empty());
        let out = g.feed(r#"{"id":"cmpl-1","object":"text_completion","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#, c.at(31));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["done"], true);
        assert_eq!(out[0]["response"], "");
        assert_eq!(out[0]["eval_count"], 1);
        assert_eq!(
            g.tokens(),
            TokenCounts {
                prompt: 3,
                completion: 1
            }
        );
    }

    #[test]
    fn sse_to_ndjson_end_to_end_with_arbitrary_splits() {
        let c = Clock::new();
        let body = format!(
            "data: {}\n\n: keep-alive\n\ndata: {}\r\n\r\ndata: {}\n\ndata: {{{HEAD},\"choices\":[],\"usage\":{{\"prompt_tokens\":5,\"completion_tokens\":2}}}}\n\ndata: [DONE]\n\n",
            chunk(r#"{"index":0,"delta":{"role":"assistant","content":"Hel"}}"#),
            chunk(r#"{"index":0,"delta":{"content":"lo"}}"#),
            chunk(r#"{"index":0,"delta":{},"finish_reason":"stop"}"#),
        );
        for step in [1, 3, 7, 64, body.len()] {
            let mut s = SseToNdjson::new(chat(&c));
            let mut out = Vec::new();
            for piece in body.as_bytes().chunks(step) {
                out.extend_from_slice(&s.push(piece, c.at(5)));
            }
            let (last, end) = s.finish(c.at(6));
            out.extend_from_slice(&last);
            assert_eq!(end, StreamEnd::Complete);
            let text = String::from_utf8(out).unwrap();
            let lines: Vec<Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(lines.len(), 3, "step {step}: {text}");
            assert_eq!(lines[0]["message"]["content"], "Hel");
            assert_eq!(lines[1]["message"]["content"], "lo");
            assert_eq!(lines[2]["done"], true);
            assert!(text.ends_with('\n'));
            assert_eq!(
                s.tokens(),
                TokenCounts {
                    prompt: 5,
                    completion: 2
                }
            );
        }
    }

    #[test]
    fn sse_to_ndjson_abort_and_truncation() {
        let c = Clock::new();
        let mut s = SseToNdjson::new(chat(&c));
        assert!(
            !s.push(
                format!(
                    "data: {}\n\n",
                    chunk(r#"{"index":0,"delta":{"content":"a"}}"#)
                )
                .as_bytes(),
                c.at(1)
            )
            .is_empty()
        );
        let (last, end) = s.finish(c.at(2));
        assert!(last.is_empty());
        assert_eq!(end, StreamEnd::Truncated);

        // Half an event, then the end: cut off, not an invalid chunk.
        let mut s = SseToNdjson::new(chat(&c));
        s.push(b"data: {\"id\":\"c1\",\"choi", c.at(1));
        let (last, end) = s.finish(c.at(2));
        assert!(last.is_empty(), "{last:?}");
        assert_eq!(end, StreamEnd::Truncated);

        let mut s = SseToNdjson::new(chat(&c));
        let line = s.abort("backend connection lost");
        assert_eq!(&line[..], b"{\"error\":\"backend connection lost\"}\n");
        assert_eq!(s.status(), StreamStatus::Failed);
        assert!(s.abort("again").is_empty());
    }
}
