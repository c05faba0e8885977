//! `/api/chat` ⇄ `/v1/chat/completions`.
//!
//! Request: Ollama messages become OpenAI messages (images → `image_url`
//! data-URL parts next to the text part; assistant `tool_calls` get ids and
//! JSON-string arguments; tool results get a `tool_call_id`, recovered by
//! `tool_name` from the earlier assistant calls when the client sent none).
//! Response: one `chat.completion` becomes one Ollama chat object.
//!
//! Made-up tool-call ids are derived from the call's position and content
//! (SHA-256), not random: the same history then renders to the same prompt
//! on every turn, which keeps the backend's prompt cache useful.

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::options::{
    apply_format, apply_options, apply_stream, apply_think, body_object, keep_alive_is_zero,
    ollama_stream,
};
use super::{
    Converted, LocalReply, OpenAiRoute, OutboundRequest, Plan, ResponseMeta, Target, Thinking,
    TranslateError, bad_request, body_error, content_text, done_reason, first_choice,
    nonstream_stats, reasoning_text, timestamp,
};

/// Translates an Ollama `/api/chat` body into a `/v1/chat/completions`
/// request (or a local load/unload reply for empty `messages`).
///
/// Dropped on purpose: `keep_alive`, `options.num_ctx` and other load-time
/// options, `truncate`, `shift`, `logprobs`/`top_logprobs` (the reply has no
/// Ollama logprobs mapping), assistant `thinking` and images on non-user
/// messages (OpenAI messages cannot carry them).
pub fn chat_request(body: &Value, target: &Target<'_>) -> Result<Plan, TranslateError> {
    let req = body_object(body)?;
    let messages = match req.get("messages") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(m)) => m.as_slice(),
        Some(_) => return Err(bad_request("messages must be an array")),
    };
    if messages.is_empty() {
        return Ok(Plan::Local(LocalReply::ChatLoad {
            unload: keep_alive_is_zero(req),
        }));
    }
    let stream = ollama_stream(req)?;
    let mut out = Map::new();
    out.insert("model".into(), target.model.into());
    out.insert("messages".into(), Value::Array(convert_messages(messages)?));
    match req.get("tools") {
        Some(Value::Array(tools)) if !tools.is_empty() => {
            out.insert("tools".into(), Value::Array(tools.clone()));
        }
        None | Some(Value::Null | Value::Array(_)) => {}
        Some(_) => return Err(bad_request("tools must be an array")),
    }
    apply_format(&mut out, req.get("format"), target.kind)?;
    apply_options(&mut out, req.get("options"), target.kind)?;
    apply_think(&mut out, req.get("think"), target.kind)?;
    apply_stream(&mut out, stream);
    Ok(Plan::Forward(OutboundRequest {
        route: OpenAiRoute::ChatCompletions,
        body: Value::Object(out),
        stream,
    }))
}

/// A tool call seen in an assistant message, for recovering result ids.
struct SeenCall {
    id: String,
    name: String,
    answered: bool,
}

/// Converts Ollama messages to OpenAI messages.
pub(crate) fn convert_messages(messages: &[Value]) -> Result<Vec<Value>, TranslateError> {
    let mut calls: Vec<SeenCall> = Vec::new();
    let mut out = Vec::with_capacity(messages.len());
    for (i, msg) in messages.iter().enumerate() {
        let msg = msg
            .as_object()
            .ok_or_else(|| bad_request("each message must be an object"))?;
        let role = match msg.get("role") {
            Some(Value::String(r)) => r.trim().to_ascii_lowercase(),
            None | Some(Value::Null) => "user".to_owned(),
            Some(_) => return Err(bad_request("message role must be a string")),
        };
        let content = msg.get("content").cloned().unwrap_or(Value::Null);
        let content = match content {
            // Clients sometimes send OpenAI-style parts; pass them through.
            Value::String(_) | Value::Array(_) => content,
            Value::Null => Value::String(String::new()),
            _ => return Err(bad_request("message content must be a string")),
        };
        let converted = match role.as_str() {
            "user" => user_message(msg, content)?,
            "assistant" => assistant_message(i, msg, content, &mut calls)?,
            "tool" => tool_message(i, msg, content, &mut calls)?,
            // system, developer and unknown roles: the role and text as-is.
            _ => json!({"role": role, "content": content}),
        };
        out.push(converted);
    }
    Ok(out)
}

fn user_message(msg: &Map<String, Value>, content: Value) -> Result<Value, TranslateError> {
    let images = match msg.get("images") {
        None | Some(Value::Null) => return Ok(json!({"role": "user", "content": content})),
        Some(Value::Array(images)) => images,
        Some(_) => return Err(bad_request("images must be an array of base64 strings")),
    };
    if images.is_empty() {
        return Ok(json!({"role": "user", "content": content}));
    }
    let mut parts = match content {
        Value::Array(parts) => parts,
        Value::String(text) if text.is_empty() => Vec::new(),
        Value::String(text) => vec![json!({"type": "text", "text": text})],
        _ => Vec::new(),
    };
    for image in images {
        let b64 = image
            .as_str()
            .ok_or_else(|| bad_request("images must be an array of base64 strings"))?;
        parts.push(json!({"type": "image_url", "image_url": {"url": image_data_url(b64)?}}));
    }
    Ok(json!({"role": "user", "content": parts}))
}

fn assistant_message(
    i: usize,
    msg: &Map<String, Value>,
    content: Value,
    calls: &mut Vec<SeenCall>,
) -> Result<Value, TranslateError> {
    let tool_calls = match msg.get("tool_calls") {
        None | Some(Value::Null) => return Ok(json!({"role": "assistant", "content": content})),
        Some(Value::Array(tc)) => tc,
        Some(_) => return Err(bad_request("tool_calls must be an array")),
    };
    if tool_calls.is_empty() {
        return Ok(json!({"role": "assistant", "content": content}));
    }
    let mut out_calls = Vec::with_capacity(tool_calls.len());
    for (j, call) in tool_calls.iter().enumerate() {
        let function = call
            .get("function")
            .and_then(Value::as_object)
            .ok_or_else(|| bad_request("tool call without a function"))?;
        let name = function
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad_request("tool call without a function name"))?;
        let arguments = match function.get("arguments") {
            None | Some(Value::Null) => "{}".to_owned(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        };
        let id = match call.get("id").and_then(Value::as_str) {
            Some(id) if !id.is_empty() => id.to_owned(),
            _ => made_up_call_id(&format!("{i}\0{j}\0{name}\0{arguments}")),
        };
        calls.push(SeenCall {
            id: id.clone(),
            name: name.to_owned(),
            answered: false,
        });
        out_calls.push(json!({
            "id": id,
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }));
    }
    Ok(json!({"role": "assistant", "content": content, "tool_calls": out_calls}))
}

fn tool_message(
    i: usize,
    msg: &Map<String, Value>,
    content: Value,
    calls: &mut [SeenCall],
) -> Result<Value, TranslateError> {
    let given_id = msg
        .get("tool_call_id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty());
    let name = msg
        .get("tool_name")
        .or_else(|| msg.get("name"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty());
    let id = if let Some(id) = given_id {
        if let Some(c) = calls.iter_mut().find(|c| c.id == id) {
            c.answered = true;
        }
        id.to_owned()
    } else {
        // First unanswered call with that name; then the latest call with
        // that name; then the first unanswered call (positional); then a
        // made-up id so the message is still well-formed.
        let pick = name
            .and_then(|n| calls.iter().position(|c| !c.answered && c.name == n))
            .or_else(|| name.and_then(|n| calls.iter().rposition(|c| c.name == n)))
            .or_else(|| calls.iter().position(|c| !c.answered));
        match pick {
            Some(k) => {
                calls[k].answered = true;
                calls[k].id.clone()
            }
            None => made_up_call_id(&format!("{i}\0result\0{}", name.unwrap_or(""))),
        }
    };
    let content = match content {
        Value::Array(_) => Value::String(content_text(Some(&content))),
        other => other,
    };
    Ok(json!({"role": "tool", "tool_call_id": id, "content": content}))
}

/// `call_` + 8 hex digits of SHA-256(seed).
fn made_up_call_id(seed: &str) -> String {
    let digest = Sha256::digest(seed.as_bytes());
    let hex: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("call_{hex}")
}

/// Builds a `data:` URL from Ollama's raw base64 image.
///
/// Only base64 is accepted (whitespace ignored, as Go's decoder does): a URL
/// or anything else is rejected, so the backend is never asked to fetch a
/// location a client chose. A `data:...;base64,` prefix some clients add is
/// tolerated and replaced. The MIME type comes from the magic bytes.
pub(crate) fn image_data_url(image: &str) -> Result<String, TranslateError> {
    let mut b64 = image.trim();
    if let Some(rest) = b64.strip_prefix("data:") {
        b64 = rest
            .split_once(";base64,")
            .map(|(_, data)| data)
            .ok_or_else(|| bad_request("invalid image: only base64 data is accepted"))?;
    }
    let clean: String = b64.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    if clean.is_empty() {
        return Err(bad_request("invalid image: empty"));
    }
    let body = clean.trim_end_matches('=');
    if clean.len() - body.len() > 2 || !body.bytes().all(is_base64_char) {
        return Err(bad_request("invalid image: not base64 data"));
    }
    let mime = sniff_image_mime(&decode_prefix(&clean, 16));
    Ok(format!("data:{mime};base64,{clean}"))
}

fn is_base64_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'+' || b == b'/'
}

fn base64_value(b: u8) -> Option<u8> {
    match b {
        b'A'..=b'Z' => Some(b - b'A'),
        b'a'..=b'z' => Some(b - b'a' + 26),
        b'0'..=b'9' => Some(b - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

/// Decodes the first `chars` base64 characters (a multiple of 4 is best).
fn decode_prefix(b64: &str, chars: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(chars / 4 * 3);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for b in b64.bytes().take(chars) {
        let Some(v) = base64_value(b) else { break };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xff) as u8);
        }
    }
    out
}

/// Image MIME type from magic bytes; PNG when unknown.
fn sniff_image_mime(head: &[u8]) -> &'static str {
    if head.starts_with(&[0xff, 0xd8, 0xff]) {
        "image/jpeg"
    } else if head.starts_with(b"GIF8") {
        "image/gif"
    } else if head.len() >= 12 && head.starts_with(b"RIFF") && &head[8..12] == b"WEBP" {
        "image/webp"
    } else {
        "image/png"
    }
}

/// Converts a `chat.completion` body into one Ollama chat object
/// (`done:true`, counts and durations).
pub fn chat_response(body: &Value, meta: &ResponseMeta<'_>) -> Result<Converted, TranslateError> {
    if let Some(e) = body_error(body) {
        return Err(e.into());
    }
    let choice = first_choice(body)
        .ok_or_else(|| TranslateError::BadBackendResponse("no choices".into()))?;
    let message = choice
        .get("message")
        .and_then(Value::as_object)
        .ok_or_else(|| TranslateError::BadBackendResponse("choice without message".into()))?;
    let mut content = content_text(message.get("content"));
    let mut tool_calls = Vec::new();
    if let Some(Value::Array(calls)) = message.get("tool_calls") {
        for call in calls {
            match ollama_tool_call(tool_calls.len(), call) {
                Some(Ok(call)) => tool_calls.push(call),
                Some(Err(text)) => content.push_str(&text),
                None => {}
            }
        }
    }
    let mut msg = Map::new();
    msg.insert("role".into(), "assistant".into());
    msg.insert("content".into(), content.into());
    if let Some(thinking) = reasoning_text(message)
        && meta.thinking == Thinking::Shown
    {
        msg.insert("thinking".into(), thinking.into());
    }
    if !tool_calls.is_empty() {
        msg.insert("tool_calls".into(), Value::Array(tool_calls));
    }
    let stats = nonstream_stats(body, meta.total_duration);
    let mut out = Map::new();
    out.insert("model".into(), meta.model.into());
    out.insert(
        "created_at".into(),
        timestamp::rfc3339_nanos(meta.now).into(),
    );
    out.insert("message".into(), Value::Object(msg));
    out.insert("done".into(), true.into());
    let finish = choice.get("finish_reason").and_then(Value::as_str);
    out.insert("done_reason".into(), done_reason(finish).into());
    stats.write(&mut out);
    Ok(Converted {
        body: Value::Object(out),
        tokens: stats.tokens,
    })
}

/// An OpenAI tool call (`{id, type, function:{name, arguments:"<json>"}}`)
/// as an Ollama one (`{id, function:{index, name, arguments:{..}}}`), or, when
/// its arguments are not a JSON object, as text ([`unreadable_tool_call`]).
pub(crate) fn ollama_tool_call(index: usize, call: &Value) -> Option<Result<Value, String>> {
    let function = call.get("function")?.as_object()?;
    let name = function.get("name").and_then(Value::as_str).unwrap_or("");
    let arguments = match parse_arguments(function.get("arguments")) {
        Ok(arguments) => arguments,
        Err(raw) => return Some(Err(unreadable_tool_call(name, &raw))),
    };
    let mut f = Map::new();
    f.insert("index".into(), index.into());
    f.insert("name".into(), name.into());
    f.insert("arguments".into(), arguments);
    let mut out = Map::new();
    if let Some(id) = call
        .get("id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    {
        out.insert("id".into(), id.into());
    }
    out.insert("function".into(), Value::Object(f));
    Some(Ok(Value::Object(out)))
}

/// Tool arguments as Ollama wants them: a JSON object parsed from the
/// OpenAI string; empty or `null` means `{}`. Anything else (a call cut off
/// by the token limit, malformed JSON, an array) is `Err` with the text the
/// model produced.
pub(crate) fn parse_arguments(arguments: Option<&Value>) -> Result<Value, String> {
    match arguments {
        None | Some(Value::Null) => Ok(json!({})),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(json!({})),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(v @ Value::Object(_)) => Ok(v),
            Ok(Value::Null) => Ok(json!({})),
            _ => Err(s.clone()),
        },
        Some(v @ Value::Object(_)) => Ok(v.clone()),
        Some(other) => Err(other.to_string()),
    }
}

/// A tool call whose arguments are not a JSON object, as the text a model
/// writes for a call: `{"name":"f","arguments":<the text as sent>}`.
///
/// Ollama's `arguments` is always an object and its clients reject
/// anything else (the Python client fails validation), so such a call
/// cannot be a `tool_calls` entry. Ollama itself returns a call its parser
/// cannot read as content; so does the translation, and nothing the model
/// produced is lost.
pub(crate) fn unreadable_tool_call(name: &str, raw: &str) -> String {
    format!("{{\"name\":{},\"arguments\":{raw}}}", Value::from(name))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::translate::{EndpointKind, TokenCounts};

    const PNG_B64: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk";
    const JPEG_B64: &str = "/9j/4AAQSkZJRgABAQEASABIAAD/2wBDAAEBAQ==";
    const GIF_B64: &str = "R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==";
    const WEBP_B64: &str = "UklGRiQAAABXRUJQVlA4IBgAAAAwAQCdASoBAAEAAwA0JaQAA3AA/vuUAAA=";

    fn target(kind: EndpointKind) -> Target<'static> {
        Target {
            kind,
            model: "qwen3-8b",
        }
    }

    fn forward(plan: Plan) -> OutboundRequest {
        match plan {
            Plan::Forward(r) => r,
            Plan::Local(l) => panic!("expected forward, got {l:?}"),
        }
    }

    #[test]
    fn basic_chat_stream_default_and_dropped_knobs() {
        let body = json!({
            "model": "qwen3:8b",
            "messages": [{"role": "System", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "options": {"temperature": 0.2, "num_ctx": 8192, "num_predict": 100, "top_k": 20},
            "keep_alive": "10m"
        });
        let r = forward(chat_request(&body, &target(EndpointKind::OpenAi)).unwrap());
        assert_eq!(r.route, OpenAiRoute::ChatCompletions);
        assert!(r.stream);
        assert_eq!(
            r.body,
            json!({
                "model": "qwen3-8b",
                "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                "temperature": 0.2,
                "max_tokens": 100,
                "stream": true,
                "stream_options": {"include_usage": true}
            })
        );
        let r = forward(chat_request(&body, &target(EndpointKind::LlamaServer)).unwrap());
        assert_eq!(r.body["top_k"], 20);
    }

    #[test]
    fn non_stream_request_has_no_stream_options() {
        let body =
            json!({"model": "m", "stream": false, "messages": [{"role": "user", "content": "x"}]});
        let r = forward(chat_request(&body, &target(EndpointKind::OpenAi)).unwrap());
        assert!(!r.stream);
        assert_eq!(r.body["stream"], false);
        assert!(r.body.get("stream_options").is_none());
    }

    #[test]
    fn images_keep_text_and_sniff_types() {
        let body = json!({"model": "m", "messages": [{
            "role": "user", "content": "what is this?",
            "images": [PNG_B64, JPEG_B64, GIF_B64, WEBP_B64]
        }]});
        let r = forward(chat_request(&body, &target(EndpointKind::OpenAi)).unwrap());
        let parts = r.body["messages"][0]["content"].as_array().unwrap();
        assert_eq!(parts[0], json!({"type": "text", "text": "what is this?"}));
        let urls: Vec<&str> = parts[1..]
            .iter()
            .map(|p| p["image_url"]["url"].as_str().unwrap())
            .collect();
        assert_eq!(urls[0], format!("data:image/png;base64,{PNG_B64}"));
        assert!(urls[1].starts_with("data:image/jpeg;base64,/9j/"));
        assert!(urls[2].starts_with("data:image/gif;base64,"));
        assert!(urls[3].starts_with("data:image/webp;base64,"));
    }

    #[test]
    fn image_urls_are_never_passed_on() {
        for bad in [
            "http://169.254.169.254/latest",
            "https://example.com/a.png",
            "file:///etc/passwd",
            "",
        ] {
            let body = json!({"model": "m", "messages": [{"role": "user", "content": "x", "images": [bad]}]});
            let err = chat_request(&body, &target(EndpointKind::LlamaServer)).unwrap_err();
            assert!(matches!(err, TranslateError::BadRequest(_)), "{bad}");
        }
        // A data URL prefix is tolerated and normalized.
        let url = image_data_url(&format!("data:image/jpeg;base64,{PNG_B64}")).unwrap();
        assert_eq!(url, format!("data:image/png;base64,{PNG_B64}"));
        // Unknown content defaults to png; whitespace is dropped.
        assert_eq!(
            image_data_url("QUJD\nREVG").unwrap(),
            "data:image/png;base64,QUJDREVG"
        );
    }

    #[test]
    fn tool_calls_and_results_by_name() {
        let body = json!({"model": "m", "stream": false, "messages": [
            {"role": "user", "content": "weather in Oslo and Bergen?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
                {"function": {"name": "get_time", "arguments": {"city": "Bergen"}}}
            ]},
            {"role": "tool", "tool_name": "get_time", "content": "12:00"},
            {"role": "tool", "tool_name": "get_weather", "content": "rain"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_given", "function": {"name": "get_weather", "arguments": {"city": "Bergen"}}}
            ]},
            {"role": "tool", "tool_name": "get_weather", "content": "sun"}
        ], "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]});
        let r = forward(chat_request(&body, &target(EndpointKind::OpenAi)).unwrap());
        let msgs = r.body["messages"].as_array().unwrap();
        let calls = msgs[1]["tool_calls"].as_array().unwrap();
        let weather_id = calls[0]["id"].as_str().unwrap();
        let time_id = calls[1]["id"].as_str().unwrap();
        assert!(weather_id.starts_with("call_") && weather_id.len() == 13);
        assert_ne!(weather_id, time_id);
        assert_eq!(calls[0]["type"], "function");
        assert_eq!(calls[0]["function"]["arguments"], "{\"city\":\"Oslo\"}");
        assert_eq!(
            msgs[2],
            json!({"role": "tool", "tool_call_id": time_id, "content": "12:00"})
        );
        assert_eq!(msgs[3]["tool_call_id"], weather_id);
        assert_eq!(msgs[5]["tool_call_id"], "call_given");
        assert_eq!(r.body["tools"][0]["function"]["name"], "get_weather");
        // Deterministic: the same history gives the same ids.
        let again = forward(chat_request(&body, &target(EndpointKind::OpenAi)).unwrap());
        assert_eq!(again.body, r.body);
    }

    #[test]
    fn tool_result_with_explicit_id_and_orphans() {
        let msgs = convert_messages(&[
            json!({"role": "tool", "tool_call_id": "call_x", "content": "a"}),
            json!({"role": "tool", "tool_name": "nobody", "content": "b"}),
        ])
        .unwrap();
        assert_eq!(msgs[0]["tool_call_id"], "call_x");
        assert!(
            msgs[1]["tool_call_id"]
                .as_str()
                .unwrap()
                .starts_with("call_")
        );
    }

    #[test]
    fn format_think_and_empty_messages() {
        let body = json!({"model": "m", "format": "json", "think": false,
                          "messages": [{"role": "user", "content": "x"}]});
        let r = forward(chat_request(&body, &target(EndpointKind::LlamaServer)).unwrap());
        assert_eq!(r.body["response_format"], json!({"type": "json_object"}));
        assert_eq!(r.body["reasoning_effort"], "none");
        let schema = json!({"type": "object", "properties": {"n": {"type": "integer"}}});
        let body =
            json!({"model": "m", "format": schema, "messages": [{"role": "user", "content": "x"}]});
        let r = forward(chat_request(&body, &target(EndpointKind::OpenAi)).unwrap());
        assert_eq!(r.body["response_format"]["json_schema"]["schema"], schema);
        assert!(
            r.body["response_format"]["json_schema"]
                .get("strict")
                .is_none()
        );

        let load = chat_request(
            &json!({"model": "m", "messages": []}),
            &target(EndpointKind::OpenAi),
        );
        assert_eq!(
            load.unwrap(),
            Plan::Local(LocalReply::ChatLoad { unload: false })
        );
        let unload = chat_request(
            &json!({"model": "m", "keep_alive": 0}),
            &target(EndpointKind::OpenAi),
        );
        assert_eq!(
            unload.unwrap(),
            Plan::Local(LocalReply::ChatLoad { unload: true })
        );
        assert!(chat_request(&json!("x"), &target(EndpointKind::OpenAi)).is_err());
    }

    fn meta() -> ResponseMeta<'static> {
        ResponseMeta {
            model: "qwen3:8b",
            now: SystemTime::UNIX_EPOCH + Duration::new(1_735_725_600, 5),
            total_duration: Duration::from_millis(900),
            thinking: Thinking::Shown,
        }
    }

    #[test]
    fn response_with_tool_calls_and_usage() {
        let body = json!({"id":"chatcmpl-1","object":"chat.completion","created":1735689600,"model":"m",
            "choices":[{"index":0,"finish_reason":"tool_calls","logprobs":null,"message":{"role":"assistant","content":null,
              "tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Oslo\"}"}},
                            {"id":"call_2","type":"function","function":{"name":"broken","arguments":"{not json"}}]}}],
            "usage":{"prompt_tokens":20,"completion_tokens":9,"total_tokens":29}});
        let c = chat_response(&body, &meta()).unwrap();
        assert_eq!(
            c.tokens,
            TokenCounts {
                prompt: 20,
                completion: 9
            }
        );
        let v = c.body;
        assert_eq!(v["model"], "qwen3:8b");
        assert_eq!(v["created_at"], "2025-01-01T10:00:00.000000005Z");
        assert_eq!(v["done"], true);
        assert_eq!(v["done_reason"], "stop");
        assert_eq!(
            v["message"]["tool_calls"],
            json!([{"id":"call_1","function":{"index":0,"name":"get_weather","arguments":{"city":"Oslo"}}}])
        );
        // Arguments that are not a JSON object (Ollama clients accept
        // only an object) come as the call's text instead.
        assert_eq!(
            v["message"]["content"],
            r#"{"name":"broken","arguments":{not json}"#
        );
        assert_eq!(v["prompt_eval_count"], 20);
        assert_eq!(v["eval_count"], 9);
        assert_eq!(v["total_duration"], 900_000_000u64);
        assert_eq!(v["load_duration"], 0);
        assert_eq!(v["eval_duration"], 900_000_000u64);
    }

    #[test]
    fn tool_arguments_are_an_object_or_the_call_is_text() {
        assert_eq!(parse_arguments(None), Ok(json!({})));
        assert_eq!(parse_arguments(Some(&json!(" "))), Ok(json!({})));
        assert_eq!(parse_arguments(Some(&json!("null"))), Ok(json!({})));
        assert_eq!(
            parse_arguments(Some(&json!("{\"a\":1}"))),
            Ok(json!({"a": 1}))
        );
        assert_eq!(parse_arguments(Some(&json!({"a": 1}))), Ok(json!({"a": 1})));
        // Cut off by the token limit, an array, a bare string.
        for raw in [r#"{"city": "Os"#, "[1,2]", r#""Oslo""#] {
            assert_eq!(parse_arguments(Some(&json!(raw))), Err(raw.to_owned()));
        }
        assert_eq!(parse_arguments(Some(&json!([1]))), Err("[1]".to_owned()));
        let body = json!({"choices":[{"index":0,"finish_reason":"length","message":{"role":"assistant","content":"",
            "tool_calls":[{"id":"c","type":"function","function":{"name":"get_weather","arguments":"{\"city\": \"Os"}}]}}]});
        let v = chat_response(&body, &meta()).unwrap().body;
        assert_eq!(
            v["message"],
            json!({"role":"assistant","content":"{\"name\":\"get_weather\",\"arguments\":{\"city\": \"Os}"})
        );
        assert_eq!(v["done_reason"], "length");
    }

    #[test]
    fn response_llama_cpp_reasoning_and_timings() {
        let body = json!({"choices":[{"index":0,"finish_reason":"length","message":{"role":"assistant",
              "content":"Hello","reasoning_content":"think think"}}],
            "timings":{"cache_n":236,"prompt_n":12,"prompt_ms":30.9,"predicted_n":35,"predicted_ms":661.0}});
        let c = chat_response(&body, &meta()).unwrap();
        assert_eq!(
            c.tokens,
            TokenCounts {
                prompt: 248,
                completion: 35
            }
        );
        assert_eq!(c.body["message"]["thinking"], "think think");
        assert_eq!(c.body["done_reason"], "length");
        assert_eq!(c.body["prompt_eval_duration"], 30_900_000u64);
        assert_eq!(c.body["eval_duration"], 661_000_000u64);
        // vLLM's `reasoning` name.
        let body = json!({"choices":[{"index":0,"finish_reason":"stop","message":{"content":"x","reasoning":"r"}}]});
        assert_eq!(
            chat_response(&body, &meta()).unwrap().body["message"]["thinking"],
            "r"
        );
        // `think:false`: a backend that reasoned anyway is not shown to.
        let hidden = ResponseMeta {
            thinking: Thinking::Hidden,
            ..meta()
        };
        let c = chat_response(&body, &hidden).unwrap();
        assert_eq!(c.body["message"], json!({"role":"assistant","content":"x"}));
    }

    #[test]
    fn response_errors() {
        let e =
            chat_response(&json!({"error":{"message":"boom","code":500}}), &meta()).unwrap_err();
        assert!(matches!(e, TranslateError::Upstream(_)));
        let e = chat_response(&json!({"choices":[]}), &meta()).unwrap_err();
        assert!(matches!(e, TranslateError::BadBackendResponse(_)));
    }
}
