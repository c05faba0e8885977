//! `/api/generate` → `/v1/chat/completions` or `/v1/completions`; and the
//! reply back. Which route serves a request is the caller's choice
//! (`proxy::forward::generate_route`): chat for a prompt Ollama would
//! template, completions for a `raw` one (and, on llama-server, for one
//! with a `suffix`).
//!
//! Choices, documented because OpenAI backends have no Ollama templates:
//! - Chat always applies the backend's chat template (it cannot be
//!   disabled over the OpenAI API), as Ollama applies the model's to a
//!   prompt that is not `raw`: `system` becomes a system message and the
//!   prompt (with images) the user message; `suffix` is dropped.
//! - `/v1/completions` never applies a chat template, so every prompt is
//!   effectively `raw`; `system` has no place there and is dropped, and
//!   `template` is always dropped. `suffix` is forwarded when non-empty and
//!   the backend decides (servers without fill-in-the-middle reject it,
//!   which is better than silently completing without the suffix).
//! - `raw` together with `system`/`template`/`context` is rejected with 400,
//!   as Ollama does. `context` (Ollama's token array) cannot be mapped and
//!   no `context` is returned.
//! - Images cannot go to `/v1/completions`, so a request with images uses
//!   the chat fallback whatever route was asked for.

use serde_json::{Map, Value, json};

use super::chat::convert_messages;
use super::options::{
    apply_format, apply_options, apply_stream, apply_think, body_object, keep_alive_is_zero,
    ollama_stream, opt_str,
};
use super::{
    Converted, LocalReply, OpenAiRoute, OutboundRequest, Plan, ResponseMeta, Target, Thinking,
    TranslateError, bad_request, body_error, content_text, done_reason, first_choice,
    nonstream_stats, reasoning_text, timestamp,
};

/// Which OpenAI route serves `/api/generate` for this backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GenerateRoute {
    /// `/v1/completions`: `raw` prompts, and llama-server's `suffix` ones.
    Completions,
    /// `/v1/chat/completions`: every other prompt.
    Chat,
}

/// Translates an Ollama `/api/generate` body (or answers an empty prompt
/// locally as a load/unload). See the module docs for the field choices.
pub fn generate_request(
    body: &Value,
    target: &Target<'_>,
    route: GenerateRoute,
) -> Result<Plan, TranslateError> {
    let req = body_object(body)?;
    let prompt = opt_str(req, "prompt")?;
    let system = opt_str(req, "system")?;
    let template = opt_str(req, "template")?;
    let suffix = opt_str(req, "suffix")?;
    let raw = req.get("raw").and_then(Value::as_bool).unwrap_or(false);
    let has_context = req
        .get("context")
        .and_then(Value::as_array)
        .is_some_and(|c| !c.is_empty());
    if raw && (!system.is_empty() || !template.is_empty() || has_context) {
        return Err(bad_request(
            "raw mode does not support template, system, or context",
        ));
    }
    let images = match req.get("images") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(images)) => images.clone(),
        Some(_) => return Err(bad_request("images must be an array of base64 strings")),
    };
    if prompt.is_empty() && images.is_empty() {
        return Ok(Plan::Local(LocalReply::GenerateLoad {
            unload: keep_alive_is_zero(req),
        }));
    }
    let stream = ollama_stream(req)?;
    let route = if images.is_empty() {
        route
    } else {
        GenerateRoute::Chat
    };
    let mut out = Map::new();
    out.insert("model".into(), target.model.into());
    let openai_route = match route {
        GenerateRoute::Completions => {
            out.insert("prompt".into(), prompt.into());
            if !suffix.is_empty() {
                out.insert("suffix".into(), suffix.into());
            }
            OpenAiRoute::Completions
        }
        GenerateRoute::Chat => {
            let mut messages = Vec::new();
            if !system.is_empty() {
                messages.push(json!({"role": "system", "content": system}));
            }
            let mut user = json!({"role": "user", "content": prompt});
            if !images.is_empty() {
                user["images"] = Value::Array(images);
            }
            messages.push(user);
            out.insert(
                "messages".into(),
                Value::Array(convert_messages(&messages)?),
            );
            apply_think(&mut out, req.get("think"), target.kind)?;
            OpenAiRoute::ChatCompletions
        }
    };
    apply_format(&mut out, req.get("format"), target.kind)?;
    apply_options(&mut out, req.get("options"), target.kind)?;
    apply_stream(&mut out, stream);
    Ok(Plan::Forward(OutboundRequest {
        route: openai_route,
        body: Value::Object(out),
        stream,
    }))
}

/// Converts a non-stream `/v1/completions` (`choices[0].text`) or
/// `/v1/chat/completions` (`choices[0].message`) body into one Ollama
/// generate object.
pub fn generate_response(
    body: &Value,
    meta: &ResponseMeta<'_>,
) -> Result<Converted, TranslateError> {
    if let Some(e) = body_error(body) {
        return Err(e.into());
    }
    let choice = first_choice(body)
        .ok_or_else(|| TranslateError::BadBackendResponse("no choices".into()))?;
    let (response, thinking) = match choice.get("message").and_then(Value::as_object) {
        Some(message) => (
            content_text(message.get("content")),
            reasoning_text(message).map(str::to_owned),
        ),
        None => match choice.get("text") {
            Some(Value::String(text)) => (text.clone(), reasoning_text(choice).map(str::to_owned)),
            _ => {
                return Err(TranslateError::BadBackendResponse(
                    "choice without text or message".into(),
                ));
            }
        },
    };
    let stats = nonstream_stats(body, meta.total_duration);
    let mut out = Map::new();
    out.insert("model".into(), meta.model.into());
    out.insert(
        "created_at".into(),
        timestamp::rfc3339_nanos(meta.now).into(),
    );
    out.insert("response".into(), response.into());
    if let Some(thinking) = thinking
        && meta.thinking == Thinking::Shown
    {
        out.insert("thinking".into(), thinking.into());
    }
    out.insert("done".into(), true.into());
    let finish = choice.get("finish_reason").and_then(Value::as_str);
    out.insert("done_reason".into(), done_reason(finish).into());
    stats.write(&mut out);
    Ok(Converted {
        body: Value::Object(out),
        tokens: stats.tokens,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::translate::{EndpointKind, TokenCounts};

    fn target() -> Target<'static> {
        Target {
            kind: EndpointKind::LlamaServer,
            model: "gemma",
        }
    }

    fn forward(plan: Plan) -> OutboundRequest {
        match plan {
            Plan::Forward(r) => r,
            Plan::Local(l) => panic!("expected forward, got {l:?}"),
        }
    }

    #[test]
    fn completions_route_drops_system_keeps_suffix() {
        let body = json!({"model": "gemma:latest", "prompt": "def f(", "suffix": "return x",
                          "system": "ignored", "template": "{{ .Prompt }}",
                          "options": {"num_predict": 32, "min_p": 0.1}, "stream": false});
        let r = forward(generate_request(&body, &target(), GenerateRoute::Completions).unwrap());
        assert_eq!(r.route, OpenAiRoute::Completions);
        assert_eq!(
            r.body,
            json!({"model": "gemma", "prompt": "def f(", "suffix": "return x",
                   "max_tokens": 32, "min_p": 0.1, "stream": false})
        );
    }

    #[test]
    fn chat_fallback_system_message_and_stream() {
        let body = json!({"model": "m", "prompt": "hi", "system": "be nice", "think": "low"});
        let r = forward(generate_request(&body, &target(), GenerateRoute::Chat).unwrap());
        assert_eq!(r.route, OpenAiRoute::ChatCompletions);
        assert!(r.stream);
        assert_eq!(
            r.body["messages"],
            json!([{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}])
        );
        assert_eq!(r.body["reasoning_effort"], "low");
        assert_eq!(r.body["stream_options"], json!({"include_usage": true}));
    }

    #[test]
    fn images_force_chat_route() {
        let body = json!({"model": "m", "prompt": "describe", "images": ["iVBORw0KGgo="]});
        let r = forward(generate_request(&body, &target(), GenerateRoute::Completions).unwrap());
        assert_eq!(r.route, OpenAiRoute::ChatCompletions);
        let parts = r.body["messages"][0]["content"].as_array().unwrap();
        assert_eq!(parts[0]["text"], "describe");
        assert_eq!(
            parts[1]["image_url"]["url"],
            "data:image/png;base64,iVBORw0KGgo="
        );
    }

    #[test]
    fn raw_conflicts_and_load_requests() {
        let body = json!({"model": "m", "prompt": "x", "raw": true, "system": "s"});
        assert!(matches!(
            generate_request(&body, &target(), GenerateRoute::Completions),
            Err(TranslateError::BadRequest(_))
        ));
        let body = json!({"model": "m", "prompt": "x", "raw": true});
        assert!(generate_request(&body, &target(), GenerateRoute::Completions).is_ok());
        let body = json!({"model": "m", "keep_alive": "0"});
        assert_eq!(
            generate_request(&body, &target(), GenerateRoute::Completions).unwrap(),
            Plan::Local(LocalReply::GenerateLoad { unload: true })
        );
    }

    fn meta() -> ResponseMeta<'static> {
        ResponseMeta {
            model: "gemma:latest",
            now: SystemTime::UNIX_EPOCH,
            total_duration: Duration::from_secs(1),
            thinking: Thinking::Shown,
        }
    }

    #[test]
    fn completion_response() {
        let body = json!({"id":"cmpl-1","object":"text_completion","created":1,"model":"gemma",
            "choices":[{"text":" return 1","index":0,"logprobs":null,"finish_reason":"length"}],
            "usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}});
        let c = generate_response(&body, &meta()).unwrap();
        assert_eq!(
            c.tokens,
            TokenCounts {
                prompt: 5,
                completion: 3
            }
        );
        assert_eq!(c.body["response"], " return 1");
        assert_eq!(c.body["done"], true);
        assert_eq!(c.body["done_reason"], "length");
        assert_eq!(c.body["model"], "gemma:latest");
        assert!(c.body.get("thinking").is_none());
        assert!(c.body.get("context").is_none());
    }

    #[test]
    fn chat_shaped_response_for_generate() {
        let body = json!({"choices":[{"index":0,"finish_reason":"stop",
            "message":{"role":"assistant","content":"Hi","reasoning":"hmm"}}],
            "usage":{"prompt_tokens":4,"completion_tokens":1}});
        let c = generate_response(&body, &meta()).unwrap();
        assert_eq!(c.body["response"], "Hi");
        assert_eq!(c.body["thinking"], "hmm");
        let hidden = ResponseMeta {
            thinking: Thinking::Hidden,
            ..meta()
        };
        let c = generate_response(&body, &hidden).unwrap();
        assert_eq!(c.body["response"], "Hi");
        assert!(c.body.get("thinking").is_none());
        assert!(generate_response(&json!({"choices":[{"index":0}]}), &meta()).is_err());
    }
}
