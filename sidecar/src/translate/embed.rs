//! `/api/embed` and legacy `/api/embeddings` ⇄ `/v1/embeddings`.
//!
//! Every input gets its vector back, ordered by the OpenAI `index` (servers
//! may answer out of order), fixing nomyo-router's "only the first
//! embedding" bug. `truncate` has no OpenAI equivalent and is dropped (the
//! backend's own truncation policy applies); `dimensions` passes through;
//! vectors are returned as the backend computed them (OpenAI-compatible
//! servers normalize them already for the usual embedding models).

use serde_json::{Map, Value, json};

use super::options::{body_object, opt_str};
use super::usage::{Usage, token_counts};
use super::{
    Converted, LocalReply, OpenAiRoute, OutboundRequest, Plan, ResponseMeta, Target,
    TranslateError, bad_request, body_error, duration_ns,
};

/// Which Ollama embeddings API the client called.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EmbedApi {
    /// `/api/embed`: `input` string or list → `embeddings: [[..]]`.
    Embed,
    /// Legacy `/api/embeddings`: `prompt` string → `embedding: [..]`.
    Embeddings,
}

/// Translates an embeddings request (or answers an empty input locally,
/// as Ollama does without running the model).
pub fn embed_request(
    body: &Value,
    target: &Target<'_>,
    api: EmbedApi,
) -> Result<Plan, TranslateError> {
    let req = body_object(body)?;
    let input = match api {
        EmbedApi::Embed => match req.get("input") {
            None | Some(Value::Null) => return Ok(Plan::Local(LocalReply::EmbedEmpty)),
            Some(Value::String(s)) if s.is_empty() => {
                return Ok(Plan::Local(LocalReply::EmbedEmpty));
            }
            Some(Value::String(s)) => Value::String(s.clone()),
            Some(Value::Array(items)) if items.is_empty() => {
                return Ok(Plan::Local(LocalReply::EmbedEmpty));
            }
            Some(Value::Array(items)) => {
                if !items.iter().all(Value::is_string) {
                    return Err(bad_request("input must be a string or a list of strings"));
                }
                Value::Array(items.clone())
            }
            Some(_) => return Err(bad_request("input must be a string or a list of strings")),
        },
        EmbedApi::Embeddings => {
            let prompt = opt_str(req, "prompt")?;
            if prompt.is_empty() {
                return Ok(Plan::Local(LocalReply::EmbeddingsEmpty));
            }
            Value::String(prompt.to_owned())
        }
    };
    let mut out = Map::new();
    out.insert("model".into(), target.model.into());
    out.insert("input".into(), input);
    out.insert("encoding_format".into(), "float".into());
    if let Some(d) = req.get("dimensions").filter(|d| d.is_u64()) {
        out.insert("dimensions".into(), d.clone());
    }
    Ok(Plan::Forward(OutboundRequest {
        route: OpenAiRoute::Embeddings,
        body: Value::Object(out),
        stream: false,
    }))
}

/// Converts a `/v1/embeddings` reply for the client's API.
pub fn embed_response(
    body: &Value,
    meta: &ResponseMeta<'_>,
    api: EmbedApi,
) -> Result<Converted, TranslateError> {
    if let Some(e) = body_error(body) {
        return Err(e.into());
    }
    let data = body
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| TranslateError::BadBackendResponse("embeddings without data".into()))?;
    let mut indexed = Vec::with_capacity(data.len());
    for (pos, item) in data.iter().enumerate() {
        let index = item
            .get("index")
            .and_then(Value::as_u64)
            .unwrap_or(pos as u64);
        let vector = item
            .get("embedding")
            .filter(|e| e.is_array())
            .ok_or_else(|| {
                TranslateError::BadBackendResponse("embedding is not a list of floats".into())
            })?;
        indexed.push((index, vector));
    }
    // Stable sort: equal (or missing) indexes keep the server's order.
    indexed.sort_by_key(|(index, _)| *index);
    let tokens = token_counts(Usage::of(body), None);
    let out = match api {
        EmbedApi::Embed => json!({
            "model": meta.model,
            "embeddings": indexed.iter().map(|(_, v)| (*v).clone()).collect::<Vec<_>>(),
            "total_duration": duration_ns(meta.total_duration),
            "load_duration": 0,
            "prompt_eval_count": tokens.prompt,
        }),
        EmbedApi::Embeddings => json!({
            "embedding": indexed.first().map_or_else(|| json!([]), |(_, v)| (*v).clone()),
        }),
    };
    Ok(Converted { body: out, tokens })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::translate::{EndpointKind, Thinking, TokenCounts};

    fn target() -> Target<'static> {
        Target {
            kind: EndpointKind::OpenAi,
            model: "nomic-embed-text",
        }
    }

    fn meta() -> ResponseMeta<'static> {
        ResponseMeta {
            model: "nomic-embed-text:latest",
            now: SystemTime::UNIX_EPOCH,
            total_duration: Duration::from_millis(12),
            thinking: Thinking::Shown,
        }
    }

    #[test]
    fn embed_request_shapes() {
        let body = json!({"model": "x", "input": ["a", "b"], "truncate": false, "dimensions": 256, "keep_alive": "1m"});
        let Plan::Forward(r) = embed_request(&body, &target(), EmbedApi::Embed).unwrap() else {
            panic!("expected forward")
        };
        assert_eq!(r.route, OpenAiRoute::Embeddings);
        assert!(!r.stream);
        assert_eq!(
            r.body,
            json!({"model": "nomic-embed-text", "input": ["a", "b"], "encoding_format": "float", "dimensions": 256})
        );
        let body = json!({"model": "x", "prompt": "hello"});
        let Plan::Forward(r) = embed_request(&body, &target(), EmbedApi::Embeddings).unwrap()
        else {
            panic!("expected forward")
        };
        assert_eq!(r.body["input"], "hello");
        assert_eq!(
            embed_request(
                &json!({"model": "x", "input": []}),
                &target(),
                EmbedApi::Embed
            )
            .unwrap(),
            Plan::Local(LocalReply::EmbedEmpty)
        );
        assert_eq!(
            embed_request(&json!({"model": "x"}), &target(), EmbedApi::Embeddings).unwrap(),
            Plan::Local(LocalReply::EmbeddingsEmpty)
        );
        assert!(embed_request(&json!({"input": [1, 2]}), &target(), EmbedApi::Embed).is_err());
    }

    #[test]
    fn every_embedding_in_index_order() {
        let body = json!({"object":"list","model":"m","data":[
            {"object":"embedding","index":2,"embedding":[0.3]},
            {"object":"embedding","index":0,"embedding":[0.1]},
            {"object":"embedding","index":1,"embedding":[0.2]}],
            "usage":{"prompt_tokens":9,"total_tokens":9}});
        let c = embed_response(&body, &meta(), EmbedApi::Embed).unwrap();
        assert_eq!(
            c.tokens,
            TokenCounts {
                prompt: 9,
                completion: 0
            }
        );
        assert_eq!(
            c.body,
            json!({"model": "nomic-embed-text:latest", "embeddings": [[0.1], [0.2], [0.3]],
                   "total_duration": 12_000_000u64, "load_duration": 0, "prompt_eval_count": 9})
        );
        let legacy = embed_response(&body, &meta(), EmbedApi::Embeddings).unwrap();
        assert_eq!(legacy.body, json!({"embedding": [0.1]}));
    }

    proptest::proptest! {
        /// The vectors come out with the backend's numbers, to the bit: a
        /// float parse that is not correctly rounded (serde_json without
        /// `float_roundtrip`) moved about one value in ten by one step.
        #[test]
        fn embeddings_keep_every_bit(vector in proptest::collection::vec(-1.0f64..1.0, 1..64)) {
            let text = serde_json::to_string(&vector).unwrap();
            let backend = format!(r#"{{"data":[{{"index":0,"embedding":{text}}}]}}"#);
            let body: Value = serde_json::from_str(&backend).unwrap();
            let c = embed_response(&body, &meta(), EmbedApi::Embed).unwrap();
            let out = serde_json::to_string(&c.body["embeddings"][0]).unwrap();
            proptest::prop_assert_eq!(out, text);
        }
    }

    #[test]
    fn bad_embedding_bodies() {
        let b64 = json!({"data":[{"index":0,"embedding":"AAAA"}]});
        assert!(embed_response(&b64, &meta(), EmbedApi::Embed).is_err());
        assert!(embed_response(&json!({}), &meta(), EmbedApi::Embed).is_err());
        let err = json!({"error":{"message":"input too long","code":400}});
        assert!(matches!(
            embed_response(&err, &meta(), EmbedApi::Embed),
            Err(TranslateError::Upstream(_))
        ));
    }
}
