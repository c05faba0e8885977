//! Ollama request knobs → OpenAI request fields, shared by chat and
//! generate: `options`, `format`, `think`, `stream`, `keep_alive`.
//!
//! Per endpoint kind: llama-server (and its sampler) accepts llama.cpp's own
//! sampling names (`top_k`, `min_p`, `typical_p`, `repeat_penalty`,
//! `repeat_last_n`, `mirostat*`) on its OpenAI routes, so they pass through
//! for [`EndpointKind::LlamaServer`]; a plain OpenAI-compatible endpoint gets
//! only the OpenAI fields. Load-time and Ollama-only options (`num_ctx`,
//! `num_gpu`, `keep_alive`, …) are dropped: an OpenAI backend's context is
//! fixed per deployment.

use serde_json::{Map, Value, json};

use super::{EndpointKind, TranslateError, bad_request};

/// Options that mean the same on every OpenAI-compatible backend.
const OPENAI_OPTIONS: [&str; 5] = [
    "temperature",
    "top_p",
    "seed",
    "frequency_penalty",
    "presence_penalty",
];

/// llama.cpp sampler options accepted by llama-server's OpenAI routes.
const LLAMA_SERVER_OPTIONS: [&str; 8] = [
    "top_k",
    "min_p",
    "typical_p",
    "repeat_penalty",
    "repeat_last_n",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
];

/// Copies `options` into the OpenAI body.
pub(crate) fn apply_options(
    out: &mut Map<String, Value>,
    options: Option<&Value>,
    kind: EndpointKind,
) -> Result<(), TranslateError> {
    let opts = match options {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Object(o)) => o,
        Some(_) => return Err(bad_request("options must be an object")),
    };
    for key in OPENAI_OPTIONS {
        if let Some(v) = opts.get(key).filter(|v| !v.is_null()) {
            out.insert(key.to_owned(), v.clone());
        }
    }
    if kind == EndpointKind::LlamaServer {
        for key in LLAMA_SERVER_OPTIONS {
            if let Some(v) = opts.get(key).filter(|v| !v.is_null()) {
                out.insert(key.to_owned(), v.clone());
            }
        }
    }
    // num_predict: -1 (unlimited) and -2 (fill context) mean "no limit".
    if let Some(n) = opts.get("num_predict").and_then(Value::as_i64)
        && n > 0
    {
        out.insert("max_tokens".into(), n.into());
    }
    match opts.get("stop") {
        Some(Value::Array(stops)) if !stops.is_empty() => {
            out.insert("stop".into(), Value::Array(stops.clone()));
        }
        Some(Value::String(s)) if !s.is_empty() => {
            out.insert("stop".into(), json!([s]));
        }
        _ => {}
    }
    Ok(())
}

/// `format` → `response_format`.
///
/// `"json"` → `json_object`; a schema object → `json_schema` wrapper named
/// `response`, without `strict` — for a llama-server endpoint
/// `{"type":"json_object","schema":..}`, the form llama.cpp's server takes
/// besides the wrapper and the only one llama-cpp-python's server takes
/// (it answers 500 to the wrapper); `""`/`null` → nothing. Any other
/// string is rejected as Ollama does.
///
/// No `strict:true`: OpenAI refuses a strict schema unless every object in it
/// sets `additionalProperties:false` and lists all its properties as
/// `required`, which Ollama schemas (pydantic's `model_json_schema()` among
/// them) rarely do, so every such request would be a 400. llama-server and
/// vLLM constrain the output to the schema either way.
pub(crate) fn apply_format(
    out: &mut Map<String, Value>,
    format: Option<&Value>,
    kind: EndpointKind,
) -> Result<(), TranslateError> {
    match format {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(s)) if s.is_empty() => Ok(()),
        Some(Value::String(s)) if s == "json" => {
            out.insert("response_format".into(), json!({"type": "json_object"}));
            Ok(())
        }
        Some(Value::Object(schema)) => {
            let response_format = if kind == EndpointKind::LlamaServer {
                json!({"type": "json_object", "schema": schema})
            } else {
                json!({
                    "type": "json_schema",
                    "json_schema": {"name": "response", "schema": schema}
                })
            };
            out.insert("response_format".into(), response_format);
            Ok(())
        }
        Some(other) => Err(bad_request(format!(
            "invalid format: {other}; expected \"json\" or a JSON schema object"
        ))),
    }
}

/// `think` → `reasoning_effort`.
///
/// `false` turns reasoning off where that can be expressed (llama-server
/// `reasoning_effort:"none"`); elsewhere it is omitted, as is `true` (the
/// model's default), and the reasoning the backend sends anyway is left
/// out of the answer ([`super::Thinking`]). Level strings pass as `reasoning_effort`, with Ollama's
/// `max` mapped to OpenAI's highest level `high`.
pub(crate) fn apply_think(
    out: &mut Map<String, Value>,
    think: Option<&Value>,
    kind: EndpointKind,
) -> Result<(), TranslateError> {
    match think {
        None | Some(Value::Null) | Some(Value::Bool(true)) => Ok(()),
        Some(Value::Bool(false)) => {
            if kind == EndpointKind::LlamaServer {
                out.insert("reasoning_effort".into(), "none".into());
            }
            Ok(())
        }
        Some(Value::String(level)) => {
            let level = level.trim().to_ascii_lowercase();
            match level.as_str() {
                "" => {}
                "max" => {
                    out.insert("reasoning_effort".into(), "high".into());
                }
                _ => {
                    out.insert("reasoning_effort".into(), level.into());
                }
            }
            Ok(())
        }
        Some(other) => Err(bad_request(format!(
            "invalid think value: {other}; expected a boolean or a level"
        ))),
    }
}

/// `stream` as Ollama reads it: absent/null means `true`.
pub(crate) fn ollama_stream(body: &Map<String, Value>) -> Result<bool, TranslateError> {
    match body.get("stream") {
        None | Some(Value::Null) => Ok(true),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(bad_request("stream must be a boolean")),
    }
}

/// Sets `stream` explicitly and, for streams only, asks for usage.
pub(crate) fn apply_stream(out: &mut Map<String, Value>, stream: bool) {
    out.insert("stream".into(), stream.into());
    if stream {
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
}

/// `keep_alive` of 0 (number or duration string such as `"0"`, `"0s"`,
/// `"0m"`): an empty request then means "unload".
pub(crate) fn keep_alive_is_zero(body: &Map<String, Value>) -> bool {
    body.get("keep_alive").is_some_and(is_zero_keep_alive)
}

/// Whether a `keep_alive` value is 0 (see [`keep_alive_is_zero`]).
pub(crate) fn is_zero_keep_alive(value: &Value) -> bool {
    match value {
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s
            .trim()
            .trim_end_matches(|c: char| c.is_ascii_alphabetic())
            .parse::<f64>()
            .is_ok_and(|n| n == 0.0),
        _ => false,
    }
}

/// The request body as an object.
pub(crate) fn body_object(body: &Value) -> Result<&Map<String, Value>, TranslateError> {
    body.as_object()
        .ok_or_else(|| bad_request("request body must be a JSON object"))
}

/// A string field that may be absent/null (→ empty).
pub(crate) fn opt_str<'a>(
    body: &'a Map<String, Value>,
    key: &str,
) -> Result<&'a str, TranslateError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(""),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(bad_request(format!("{key} must be a string"))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn apply(opts: Value, kind: EndpointKind) -> Map<String, Value> {
        let mut out = Map::new();
        apply_options(&mut out, Some(&opts), kind).unwrap();
        out
    }

    #[test]
    fn options_per_kind() {
        let opts = json!({
            "num_predict": 64, "temperature": 0.2, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
            "seed": 7, "stop": ["\n\n"], "frequency_penalty": 0.1, "presence_penalty": 0.2,
            "repeat_penalty": 1.1, "num_ctx": 8192, "num_gpu": 99
        });
        let openai = apply(opts.clone(), EndpointKind::OpenAi);
        assert_eq!(
            Value::Object(openai),
            json!({"max_tokens": 64, "temperature": 0.2, "top_p": 0.9, "seed": 7,
                   "stop": ["\n\n"], "frequency_penalty": 0.1, "presence_penalty": 0.2})
        );
        let llama = apply(opts, EndpointKind::LlamaServer);
        assert_eq!(llama["top_k"], 40);
        assert_eq!(llama["min_p"], 0.05);
        assert_eq!(llama["repeat_penalty"], 1.1);
        assert!(!llama.contains_key("num_ctx"));
    }

    #[test]
    fn num_predict_unlimited_is_dropped() {
        assert!(
            !apply(json!({"num_predict": -1}), EndpointKind::OpenAi).contains_key("max_tokens")
        );
        assert!(
            !apply(json!({"num_predict": -2}), EndpointKind::OpenAi).contains_key("max_tokens")
        );
        let mut out = Map::new();
        assert!(apply_options(&mut out, Some(&json!([1])), EndpointKind::OpenAi).is_err());
    }

    #[test]
    fn format_json_and_schema() {
        let openai = EndpointKind::OpenAi;
        let mut out = Map::new();
        apply_format(&mut out, Some(&json!("json")), openai).unwrap();
        assert_eq!(out["response_format"], json!({"type": "json_object"}));
        let schema = json!({"type": "object", "properties": {"a": {"type": "string"}}});
        apply_format(&mut out, Some(&schema), openai).unwrap();
        assert_eq!(
            out["response_format"],
            json!({"type": "json_schema", "json_schema": {"name": "response", "schema": schema}})
        );
        apply_format(&mut out, Some(&schema), EndpointKind::LlamaServer).unwrap();
        assert_eq!(
            out["response_format"],
            json!({"type": "json_object", "schema": schema})
        );
        assert!(apply_format(&mut Map::new(), Some(&json!("yaml")), openai).is_err());
        let mut out = Map::new();
        apply_format(&mut out, Some(&json!("")), openai).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn think_mapping() {
        let mut out = Map::new();
        apply_think(&mut out, Some(&json!(false)), EndpointKind::LlamaServer).unwrap();
        assert_eq!(out["reasoning_effort"], "none");
        let mut out = Map::new();
        apply_think(&mut out, Some(&json!(false)), EndpointKind::OpenAi).unwrap();
        assert!(out.is_empty());
        apply_think(&mut out, Some(&json!(true)), EndpointKind::OpenAi).unwrap();
        assert!(out.is_empty());
        apply_think(&mut out, Some(&json!("High")), EndpointKind::OpenAi).unwrap();
        assert_eq!(out["reasoning_effort"], "high");
        apply_think(&mut out, Some(&json!("max")), EndpointKind::OpenAi).unwrap();
        assert_eq!(out["reasoning_effort"], "high");
        assert!(apply_think(&mut out, Some(&json!(3)), EndpointKind::OpenAi).is_err());
    }

    #[test]
    fn stream_and_keep_alive() {
        let b = json!({"stream": null, "keep_alive": "0s"});
        let b = b.as_object().unwrap();
        assert!(ollama_stream(b).unwrap());
        assert!(keep_alive_is_zero(b));
        let b = json!({"keep_alive": "5m", "stream": false});
        let b = b.as_object().unwrap();
        assert!(!ollama_stream(b).unwrap());
        assert!(!keep_alive_is_zero(b));
        assert!(keep_alive_is_zero(
            json!({"keep_alive": 0}).as_object().unwrap()
        ));
        let mut out = Map::new();
        apply_stream(&mut out, false);
        assert_eq!(Value::Object(out), json!({"stream": false}));
        let mut out = Map::new();
        apply_stream(&mut out, true);
        assert_eq!(out["stream_options"], json!({"include_usage": true}));
    }
}
