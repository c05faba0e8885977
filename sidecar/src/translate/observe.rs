//! Read-only observers for pass-through streams and bodies.
//!
//! When client and backend speak the same API the proxy forwards bytes
//! unchanged; these observers watch a copy of the bytes to learn the token
//! counts for the release report and whether the stream ended cleanly, an
//! error arrived in-band, or the backend stopped early. They never modify
//! or hold back data and never fail: an observer that cannot make sense of
//! the stream simply reports what it saw.

use serde::Deserialize;
use serde_json::{Map, Value, value::RawValue};

use super::stream::StreamEnd;
use super::usage::{Timings, Usage, num_u64, token_counts};
use super::{TokenCounts, UpstreamError};
use crate::{
    framing::{NdjsonDecoder, SSE_DONE, SseDecoder},
    routes::ApiFormat,
};

/// Watches an OpenAI SSE stream (`/v1/chat/completions`, `/v1/completions`).
#[derive(Debug, Default)]
pub struct OpenAiStreamObserver {
    decoder: SseDecoder,
    usage: Option<Usage>,
    timings: Option<Timings>,
    finish_seen: bool,
    done_seen: bool,
    error: Option<String>,
    /// The Responses API's `response.id` (from `response.created` on).
    response_id: Option<String>,
    /// Chunks that carried generated text: the completion-token count
    /// when the stream reports no usage (a client that did not ask for
    /// `stream_options.include_usage`; one token per chunk is what Ollama,
    /// vLLM and llama.cpp stream).
    deltas: u64,
}

impl OpenAiStreamObserver {
    /// An observer at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Watches a chunk of the body as it is forwarded.
    pub fn push(&mut self, bytes: &[u8]) {
        match self.decoder.push(bytes) {
            Ok(payloads) => {
                for p in payloads {
                    self.observe_payload(&p);
                }
            }
            Err(e) => {
                self.error.get_or_insert_with(|| e.to_string());
            }
        }
    }

    /// Watches one SSE data payload (for callers that decode themselves).
    pub fn observe_payload(&mut self, payload: &str) {
        let payload = payload.trim();
        if payload == SSE_DONE {
            self.done_seen = true;
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(payload) else {
            return;
        };
        if let Some(e) = UpstreamError::from_stream_value(&v) {
            self.error.get_or_insert(e.message);
            return;
        }
        if self.observe_typed_event(&v) {
            return;
        }
        if let Some(u) = Usage::of(&v) {
            self.usage = Some(u);
        }
        if let Some(t) = Timings::of(&v) {
            self.timings = Some(t);
        }
        let Some(choices) = v.get("choices").and_then(Value::as_array) else {
            return;
        };
        let non_empty = |c: &Value, k: &str| {
            c.get(k)
                .and_then(Value::as_str)
                .is_some_and(|t| !t.is_empty())
        };
        for c in choices {
            let generated = match c.get("delta") {
                Some(d) => {
                    non_empty(d, "content")
                        || non_empty(d, "reasoning_content")
                        || non_empty(d, "reasoning")
                }
                None => non_empty(c, "text"),
            };
            self.deltas += u64::from(generated);
            self.finish_seen |= non_empty(c, "finish_reason");
        }
    }

    /// A typed event of the Responses API (`/v1/responses`) or the
    /// Anthropic Messages API (`/v1/messages`); neither sends `[DONE]`.
    /// Responses: `response.completed` or `response.incomplete` ends the
    /// stream and carries the usage; `response.failed` and `error` are
    /// in-band errors. Messages: `message_start` carries the input tokens,
    /// `message_delta` the output tokens so far, `message_stop` ends the
    /// stream (its `error` events carry an `error` object, caught before).
    /// False for anything else (chat and completions chunks have no
    /// `type`).
    fn observe_typed_event(&mut self, v: &Value) -> bool {
        let Some(kind) = v.get("type").and_then(Value::as_str) else {
            return false;
        };
        match kind {
            "message_start" => {
                if let Some(u) = v.get("message").and_then(Usage::of) {
                    self.usage = Some(u);
                }
                true
            }
            "message_delta" => {
                if let Some(u) = Usage::of(v) {
                    let before = self.usage.unwrap_or_default();
                    self.usage = Some(Usage {
                        prompt: u.prompt.or(before.prompt),
                        completion: u.completion.or(before.completion),
                    });
                }
                true
            }
            "message_stop" => {
                // The stream's last event: what `[DONE]` is elsewhere.
                self.finish_seen = true;
                self.done_seen = true;
                true
            }
            "response.created" | "response.in_progress" => {
                self.note_response_id(v);
                true
            }
            "response.completed" | "response.incomplete" => {
                self.finish_seen = true;
                self.done_seen = true;
                self.note_response_id(v);
                if let Some(u) = v.get("response").and_then(Usage::of) {
                    self.usage = Some(u);
                }
                true
            }
            "response.failed" | "error" => {
                let error = match kind {
                    "error" => v.get("message"),
                    _ => v.pointer("/response/error/message"),
                };
                let message = error
                    .and_then(Value::as_str)
                    .filter(|m| !m.trim().is_empty())
                    .unwrap_or("the backend reported the response failed");
                self.error.get_or_insert_with(|| message.to_owned());
                true
            }
            _ => false,
        }
    }

    fn note_response_id(&mut self, event: &Value) {
        if self.response_id.is_none()
            && let Some(id) = event
                .pointer("/response/id")
                .and_then(Value::as_str)
                .filter(|id| !id.is_empty())
        {
            self.response_id = Some(id.to_owned());
        }
    }

    /// Latest usage seen (`usage` first, llama.cpp `timings` as fallback;
    /// without either, the chunks that carried text count as completion
    /// tokens).
    pub fn tokens(&self) -> TokenCounts {
        let mut tokens = token_counts(self.usage, self.timings);
        if self.usage.is_none() && self.timings.is_none() {
            tokens.completion = self.deltas;
        }
        tokens
    }

    /// The id of the response a Responses API stream carried, if any.
    pub fn response_id(&self) -> Option<&str> {
        self.response_id.as_deref()
    }

    /// Whether the stream's last event was seen: `data: [DONE]`, or the
    /// Messages API's `message_stop`, or the Responses API's
    /// `response.completed` / `response.incomplete`.
    pub fn done_seen(&self) -> bool {
        self.done_seen
    }

    /// Whether the stream carried an error object.
    pub fn error_seen(&self) -> bool {
        self.error.is_some()
    }

    /// Ends observation (body exhausted): complete after `[DONE]` or a
    /// finish reason; failed on an in-band error; truncated otherwise.
    pub fn finish(&mut self) -> StreamEnd {
        if let Some(p) = self.decoder.finish() {
            self.observe_payload(&p);
        }
        match &self.error {
            Some(message) => StreamEnd::Failed {
                message: message.clone(),
            },
            None if self.done_seen || self.finish_seen => StreamEnd::Complete,
            None => StreamEnd::Truncated,
        }
    }
}

/// Watches an Ollama NDJSON stream (`/api/chat`, `/api/generate`).
#[derive(Debug, Default)]
pub struct OllamaStreamObserver {
    decoder: NdjsonDecoder,
    tokens: TokenCounts,
    /// Lines before the final one: each carries about one token.
    chunks: u64,
    done_seen: bool,
    error: Option<String>,
}

impl OllamaStreamObserver {
    /// An observer at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Watches a chunk of the body as it is forwarded.
    pub fn push(&mut self, bytes: &[u8]) {
        match self.decoder.push(bytes) {
            Ok(lines) => {
                for l in lines {
                    self.observe_line(&l);
                }
            }
            Err(e) => {
                self.error.get_or_insert_with(|| e.to_string());
            }
        }
    }

    /// Watches one NDJSON line.
    pub fn observe_line(&mut self, line: &str) {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            return;
        };
        if let Some(e) = UpstreamError::from_stream_value(&v) {
            self.error.get_or_insert(e.message);
            return;
        }
        if v.get("done").and_then(Value::as_bool) == Some(true) {
            self.done_seen = true;
            self.tokens = tokens_from_ollama_body(&v);
            if self.tokens.completion == 0 {
                // No (believable) count in the final line: the lines
                // streamed stand in.
                self.tokens.completion = self.chunks;
            }
        } else {
            self.chunks += 1;
        }
    }

    /// Counts from the final `done:true` chunk; before it (a stream cut
    /// short, cancelled or still running), the chunks so far stand in for
    /// the completion tokens (Ollama streams one token per line).
    pub fn tokens(&self) -> TokenCounts {
        if self.done_seen {
            self.tokens
        } else {
            TokenCounts {
                prompt: 0,
                completion: self.chunks,
            }
        }
    }

    /// Whether the final `done:true` chunk was seen.
    pub fn done_seen(&self) -> bool {
        self.done_seen
    }

    /// Whether the stream carried an error line.
    pub fn error_seen(&self) -> bool {
        self.error.is_some()
    }

    /// Ends observation: complete after `done:true`, failed on an error
    /// line, truncated otherwise.
    pub fn finish(&mut self) -> StreamEnd {
        if let Some(l) = self.decoder.finish() {
            self.observe_line(&l);
        }
        match &self.error {
            Some(message) => StreamEnd::Failed {
                message: message.clone(),
            },
            None if self.done_seen => StreamEnd::Complete,
            None => StreamEnd::Truncated,
        }
    }
}

/// The top-level fields of a non-stream answer the proxy looks at, borrowed
/// from the body: everything else (the generated text, embeddings) is
/// skipped without building a tree.
#[derive(Deserialize)]
struct AnswerFields<'a> {
    #[serde(borrow)]
    error: Option<&'a RawValue>,
    #[serde(borrow)]
    object: Option<&'a RawValue>,
    #[serde(borrow)]
    prompt_eval_count: Option<&'a RawValue>,
    #[serde(borrow)]
    eval_count: Option<&'a RawValue>,
    #[serde(borrow)]
    usage: Option<&'a RawValue>,
    #[serde(borrow)]
    timings: Option<&'a RawValue>,
}

fn raw_value(raw: Option<&RawValue>) -> Option<Value> {
    raw.and_then(|r| serde_json::from_str(r.get()).ok())
}

/// The `id` of a whole Responses API answer (`{"id": "resp_…", "object":
/// "response", …}`), if it has one.
pub fn response_id_of(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Id<'a> {
        #[serde(borrow)]
        id: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_slice::<Id<'_>>(body)
        .ok()?
        .id
        .filter(|id| !id.is_empty())
        .map(std::borrow::Cow::into_owned)
}

/// Watches a non-stream pass-through answer in `format`: its token counts,
/// or the error object a backend sent with a 2xx status. A body that is not
/// a JSON object yields zero counts (it is forwarded as is either way).
///
/// Same answers as parsing the whole body and calling
/// [`UpstreamError::from_stream_value`] and [`tokens_from_ollama_body`] /
/// [`tokens_from_openai_body`], at a fraction of the cost for big answers.
pub fn observe_answer(body: &[u8], format: ApiFormat) -> Result<TokenCounts, UpstreamError> {
    let whole = || -> Result<TokenCounts, UpstreamError> {
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            return Ok(TokenCounts::default());
        };
        if let Some(error) = UpstreamError::from_stream_value(&v) {
            return Err(error);
        }
        Ok(match format {
            ApiFormat::Ollama => tokens_from_ollama_body(&v),
            ApiFormat::OpenAi | ApiFormat::Anthropic => tokens_from_openai_body(&v),
        })
    };
    // Not an object, not JSON, or a key given twice: the general path.
    let Ok(fields) = serde_json::from_slice::<AnswerFields<'_>>(body) else {
        return whole();
    };
    let error_object = raw_value(fields.object).is_some_and(|o| o == "error");
    if error_object || raw_value(fields.error).is_some_and(|e| !e.is_null()) {
        return whole();
    }
    Ok(match format {
        ApiFormat::Ollama => TokenCounts {
            prompt: num_u64(raw_value(fields.prompt_eval_count).as_ref()).unwrap_or(0),
            completion: num_u64(raw_value(fields.eval_count).as_ref()).unwrap_or(0),
        },
        ApiFormat::OpenAi | ApiFormat::Anthropic => {
            let mut top = Map::new();
            for (key, raw) in [("usage", fields.usage), ("timings", fields.timings)] {
                if let Some(v) = raw_value(raw) {
                    top.insert(key.to_owned(), v);
                }
            }
            tokens_from_openai_body(&Value::Object(top))
        }
    })
}

/// Tokens of a non-stream OpenAI body (chat, completions, embeddings).
pub fn tokens_from_openai_body(body: &Value) -> TokenCounts {
    token_counts(Usage::of(body), Timings::of(body))
}

/// Tokens of a non-stream Ollama body or final chunk (`prompt_eval_count`,
/// `eval_count`; absent means 0).
pub fn tokens_from_ollama_body(body: &Value) -> TokenCounts {
    TokenCounts {
        prompt: num_u64(body.get("prompt_eval_count")).unwrap_or(0),
        completion: num_u64(body.get("eval_count")).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use serde_json::json;

    use super::*;

    #[test]
    fn observe_answer_matches_the_whole_tree_reading() {
        let bodies = [
            r#"{"model":"m","message":{"role":"assistant","content":"hi"},"done":true,"prompt_eval_count":12,"eval_count":3.6}"#,
            r#"{"id":"x","object":"chat.completion","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":20,"completion_tokens":9}}"#,
            r#"{"choices":[],"timings":{"prompt_n":7,"predicted_n":5}}"#,
            r#"{"error":{"message":"boom","type":"server_error","code":503}}"#,
            r#"{"error":"model is loading"}"#,
            r#"{"object":"error","message":"bad","code":400}"#,
            r#"{"error":null,"eval_count":2}"#,
            r#"{"eval_count":1,"eval_count":5}"#,
            r#"{"usage":"weird","prompt_eval_count":"3"}"#,
            r#"[1,2]"#,
            "not json",
            "",
        ];
        for body in bodies {
            for format in [ApiFormat::Ollama, ApiFormat::OpenAi, ApiFormat::Anthropic] {
                let expected = match serde_json::from_str::<Value>(body) {
                    Err(_) => Ok(TokenCounts::default()),
                    Ok(v) => match UpstreamError::from_stream_value(&v) {
                        Some(e) => Err(e.message),
                        None => Ok(match format {
                            ApiFormat::Ollama => tokens_from_ollama_body(&v),
                            ApiFormat::OpenAi | ApiFormat::Anthropic => tokens_from_openai_body(&v),
                        }),
                    },
                };
                let got = observe_answer(body.as_bytes(), format).map_err(|e| e.message);
                assert_eq!(got, expected, "{body} as {format:?}");
            }
        }
        assert_eq!(
            observe_answer(bodies[0].as_bytes(), ApiFormat::Ollama),
            Ok(TokenCounts {
                prompt: 12,
                completion: 4
            })
        );
        assert_eq!(
            observe_answer(bodies[1].as_bytes(), ApiFormat::OpenAi),
            Ok(TokenCounts {
                prompt: 20,
                completion: 9
            })
        );
    }

    #[test]
    fn openai_observer_without_usage_counts_text_chunks() {
        // A client that did not ask for `include_usage` gets no usage chunk.
        let mut o = OpenAiStreamObserver::new();
        o.push(concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"reasoning\":\"r\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"text\":\"lo\"}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: [DONE]\n\n",
        ).as_bytes());
        assert_eq!(o.finish(), StreamEnd::Complete);
        assert_eq!(
            o.tokens(),
            TokenCounts {
                prompt: 0,
                completion: 3
            }
        );
        // Reported usage wins over the count.
        o.push(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":9}}\n\n",
        );
        assert_eq!(
            o.tokens(),
            TokenCounts {
                prompt: 4,
                completion: 9
            }
        );
    }

    #[test]
    fn openai_observer_usage_after_finish_split_anywhere() {
        let body = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n",
            ": ping\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":20,\"completion_tokens\":9,\"total_tokens\":29}}\n\n",
            "data: [DONE]\n\n"
        );
        for step in [1, 5, 17, body.len()] {
            let mut o = OpenAiStreamObserver::new();
            for piece in body.as_bytes().chunks(step) {
                o.push(piece);
            }
            assert!(o.done_seen());
            assert_eq!(o.finish(), StreamEnd::Complete);
            assert_eq!(
                o.tokens(),
                TokenCounts {
                    prompt: 20,
                    completion: 9
                }
            );
        }
    }

    #[test]
    fn openai_observer_llama_cpp_repeated_usage_counts_once() {
        let mut o = OpenAiStreamObserver::new();
        o.push(b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":248,\"completion_tokens\":35},\"timings\":{\"prompt_n\":12,\"cache_n\":236,\"predicted_n\":35}}\n\n");
        o.push(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":248,\"completion_tokens\":35}}\n\n");
        assert_eq!(
            o.tokens(),
            TokenCounts {
                prompt: 248,
                completion: 35
            }
        );
        // Server closed without [DONE] after the finish reason: complete.
        assert_eq!(o.finish(), StreamEnd::Complete);
    }

    #[test]
    fn openai_observer_error_and_truncation() {
        let mut o = OpenAiStreamObserver::new();
        o.push(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\n\ndata: {\"error\":{\"message\":\"overloaded\",\"code\":503}}\n\n");
        assert_eq!(
            o.finish(),
            StreamEnd::Failed {
                message: "overloaded".into()
            }
        );
        let mut o = OpenAiStreamObserver::new();
        o.push(
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\n\ndata: {\"cho",
        );
        assert_eq!(o.finish(), StreamEnd::Truncated);
        // The one chunk of text sent before the cut, counted without usage.
        assert_eq!(
            o.tokens(),
            TokenCounts {
                prompt: 0,
                completion: 1
            }
        );
    }

    /// A Responses API stream (typed events, no `[DONE]`), as Ollama and
    /// vLLM send it.
    const RESPONSES_STREAM: &str = concat!(
        "event: response.created\n",
        "data: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"in_progress\",\"error\":null,\"usage\":null}}\n\n",
        "event: response.output_text.delta\n",
        "data: {\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hi\"}\n\n",
        "event: response.completed\n",
        "data: {\"type\":\"response.completed\",\"sequence_number\":2,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"completed\",\"error\":null,\"usage\":{\"input_tokens\":12,\"output_tokens\":5,\"total_tokens\":17}}}\n\n"
    );

    #[test]
    fn responses_stream_ends_at_completed_with_its_usage() {
        for step in [1, 7, RESPONSES_STREAM.len()] {
            let mut o = OpenAiStreamObserver::new();
            for piece in RESPONSES_STREAM.as_bytes().chunks(step) {
                o.push(piece);
            }
            assert_eq!(o.finish(), StreamEnd::Complete);
            assert_eq!(
                o.tokens(),
                TokenCounts {
                    prompt: 12,
                    completion: 5
                }
            );
        }
        // Cut before `response.completed`: truncated, and its last event
        // not seen yet.
        let cut = RESPONSES_STREAM.find("event: response.completed").unwrap();
        let mut o = OpenAiStreamObserver::new();
        o.push(&RESPONSES_STREAM.as_bytes()[..cut]);
        assert!(!o.done_seen());
        o.push(&RESPONSES_STREAM.as_bytes()[cut..]);
        assert!(o.done_seen(), "response.completed is the last event");
        let mut o = OpenAiStreamObserver::new();
        o.push(&RESPONSES_STREAM.as_bytes()[..cut]);
        assert_eq!(o.finish(), StreamEnd::Truncated);
    }

    #[test]
    fn responses_stream_failures_are_in_band_errors() {
        let mut o = OpenAiStreamObserver::new();
        o.push(b"event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"status\":\"failed\",\"error\":{\"code\":\"server_error\",\"message\":\"model crashed\"}}}\n\n");
        assert_eq!(
            o.finish(),
            StreamEnd::Failed {
                message: "model crashed".into()
            }
        );
        let mut o = OpenAiStreamObserver::new();
        o.push(b"event: error\ndata: {\"type\":\"error\",\"code\":\"rate_limit\",\"message\":\"slow down\",\"param\":null}\n\n");
        assert_eq!(
            o.finish(),
            StreamEnd::Failed {
                message: "slow down".into()
            }
        );
    }

    #[test]
    fn anthropic_stream_ends_at_message_stop_with_both_counts() {
        let body = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
            "event: ping\ndata: {\"type\":\"ping\"}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":5}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
        );
        let mut o = OpenAiStreamObserver::new();
        o.push(body.as_bytes());
        assert!(o.done_seen(), "message_stop is the last event");
        assert_eq!(o.finish(), StreamEnd::Complete);
        assert_eq!(
            o.tokens(),
            TokenCounts {
                prompt: 12,
                completion: 5
            }
        );
        let cut = body.find("event: message_stop").unwrap();
        let mut o = OpenAiStreamObserver::new();
        o.push(&body.as_bytes()[..cut]);
        assert_eq!(o.finish(), StreamEnd::Truncated);
        let mut o = OpenAiStreamObserver::new();
        o.push(b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n");
        assert_eq!(
            o.finish(),
            StreamEnd::Failed {
                message: "Overloaded".into()
            }
        );
    }

    #[test]
    fn responses_answer_counts_input_and_output_tokens() {
        let body = br#"{"id":"resp_1","object":"response","status":"completed","error":null,"output":[],"usage":{"input_tokens":12,"output_tokens":5,"total_tokens":17}}"#;
        assert_eq!(
            observe_answer(body, ApiFormat::OpenAi),
            Ok(TokenCounts {
                prompt: 12,
                completion: 5
            })
        );
    }

    #[test]
    fn ollama_observer_counts_from_done_chunk() {
        let body = concat!(
            "{\"model\":\"m\",\"created_at\":\"2025-01-01T10:00:00.123456789Z\",\"message\":{\"role\":\"assistant\",\"content\":\"The\"},\"done\":false}\n",
            "{\"model\":\"m\",\"created_at\":\"2025-01-01T10:00:00.2Z\",\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done\":true,\"done_reason\":\"stop\",\"total_duration\":5,\"prompt_eval_count\":26,\"eval_count\":298}\n"
        );
        for step in [1, 9, body.len()] {
            let mut o = OllamaStreamObserver::new();
            for piece in body.as_bytes().chunks(step) {
                o.push(piece);
            }
            assert!(o.done_seen());
            assert_eq!(o.finish(), StreamEnd::Complete);
            assert_eq!(
                o.tokens(),
                TokenCounts {
                    prompt: 26,
                    completion: 298
                }
            );
        }
    }

    #[test]
    fn ollama_observer_error_line_and_truncation() {
        let mut o = OllamaStreamObserver::new();
        o.push(b"{\"message\":{\"content\":\"a\"},\"done\":false}\n{\"error\":\"model runner has unexpectedly stopped\"}\n");
        assert_eq!(
            o.finish(),
            StreamEnd::Failed {
                message: "model runner has unexpectedly stopped".into()
            }
        );
        let mut o = OllamaStreamObserver::new();
        o.push(b"{\"message\":{\"content\":\"a\"},\"done\":false}\n");
        o.push(b"{\"message\":{\"content\":\"b\"},\"done\":false}\n");
        assert_eq!(o.finish(), StreamEnd::Truncated);
        // Cut short: the lines so far stand in for the completion tokens.
        assert_eq!(
            o.tokens(),
            TokenCounts {
                prompt: 0,
                completion: 2
            }
        );
        // So they do when the final line carries no count.
        o.push(b"{\"done\":true,\"prompt_eval_count\":5}\n");
        assert_eq!(
            o.tokens(),
            TokenCounts {
                prompt: 5,
                completion: 2
            }
        );
        // A final line without trailing newline still counts.
        let mut o = OllamaStreamObserver::new();
        o.push(b"{\"done\":true,\"prompt_eval_count\":1}");
        assert_eq!(o.finish(), StreamEnd::Complete);
        assert_eq!(
            o.tokens(),
            TokenCounts {
                prompt: 1,
                completion: 0
            }
        );
    }

    #[test]
    fn body_token_helpers() {
        assert_eq!(
            tokens_from_openai_body(&json!({"usage":{"prompt_tokens":3,"completion_tokens":4}})),
            TokenCounts {
                prompt: 3,
                completion: 4
            }
        );
        assert_eq!(
            tokens_from_ollama_body(&json!({"prompt_eval_count":8})),
            TokenCounts {
                prompt: 8,
                completion: 0
            }
        );
    }

    #[test]
    fn the_responses_api_answer_id_is_learned_whole_and_streamed() {
        assert_eq!(
            response_id_of(br#"{"id":"resp_1","object":"response","output":[]}"#).as_deref(),
            Some("resp_1")
        );
        assert_eq!(response_id_of(br#"{"object":"response"}"#), None);
        assert_eq!(response_id_of(b"not json"), None);
        let mut o = OpenAiStreamObserver::new();
        o.push(b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_2\",\"status\":\"in_progress\"}}\n\n");
        assert_eq!(o.response_id(), Some("resp_2"));
        o.push(b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_2\",\"usage\":{\"input_tokens\":1,\"output_tokens\":2}}}\n\n");
        assert_eq!(o.finish(), StreamEnd::Complete);
        assert_eq!(o.response_id(), Some("resp_2"));
        // Chat chunks carry ids too, but they are not responses.
        let mut chat = OpenAiStreamObserver::new();
        chat.push(b"data: {\"id\":\"chatcmpl-1\",\"choices\":[]}\n\n");
        assert_eq!(chat.response_id(), None);
    }
}
