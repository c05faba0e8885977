//! The conversation-affinity key sent with every choice.
//!
//! An explicit session header (`X-Session-Id`, or `X-Switchyard-Session`)
//! wins. Otherwise the key is derived from what stays the same across the
//! turns of one conversation: the model plus a SHA-256 over the
//! conversation's opening — the system messages before the first user
//! message and that first user message (chat), or the system prompt and the
//! first [`PROMPT_PREFIX_BYTES`] of the prompt (generate / completions).
//! Every turn of one chat therefore maps to the same key, and two chats that
//! open differently map to different keys.
//!
//! The key is always computed; the control plane ignores it when
//! `conversation_affinity` is off. Embeddings and `/api/show` get a key only
//! from an explicit header (they have no conversation).

use http::HeaderMap;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use switchyard_control_plane::model_name::canonical_request_name;

use crate::routes::ApiRoute;

/// Headers carrying an explicit session id, in order of preference.
pub const SESSION_HEADERS: [&str; 2] = ["x-session-id", "x-switchyard-session"];

/// How much of a completion prompt identifies its conversation. Clients that
/// resend the whole transcript as the prompt keep the same opening.
pub const PROMPT_PREFIX_BYTES: usize = 1024;

/// Longest explicit session id used verbatim; longer ids are hashed so keys
/// stay small in the control plane's bounded table.
const MAX_SESSION_ID: usize = 128;

/// The affinity key for a request, if any.
pub fn affinity_key(
    route: ApiRoute,
    model: &str,
    headers: &HeaderMap,
    body: &Map<String, Value>,
) -> Option<String> {
    let model = canonical_request_name(model);
    if let Some(session) = explicit_session(headers) {
        let session = if session.len() > MAX_SESSION_ID {
            hex(&Sha256::digest(session.as_bytes())[..16])
        } else {
            session.to_owned()
        };
        return Some(format!("{model}|session:{session}"));
    }
    let digest = match route {
        ApiRoute::OllamaChat | ApiRoute::OpenAiChat => chat_opening(body)?,
        ApiRoute::OllamaGenerate | ApiRoute::OpenAiCompletions => prompt_opening(body)?,
        ApiRoute::OllamaEmbed
        | ApiRoute::OllamaEmbeddings
        | ApiRoute::OllamaShow
        | ApiRoute::OpenAiEmbeddings => {
            return None;
        }
    };
    Some(format!("{model}|conv:{}", hex(&digest[..16])))
}

fn explicit_session(headers: &HeaderMap) -> Option<&str> {
    SESSION_HEADERS.iter().find_map(|name| {
        headers
            .get(*name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    })
}

/// Feeds one length-prefixed field, so field boundaries cannot be forged by
/// moving text between fields.
fn feed(hasher: &mut Sha256, field: &[u8]) {
    hasher.update((field.len() as u64).to_le_bytes());
    hasher.update(field);
}

/// Content as text: a string as-is, anything else (OpenAI part arrays) as
/// its JSON serialization.
fn content_bytes(content: Option<&Value>) -> Vec<u8> {
    match content {
        Some(Value::String(s)) => s.as_bytes().to_vec(),
        Some(Value::Null) | None => Vec::new(),
        Some(other) => other.to_string().into_bytes(),
    }
}

/// Hash of the system messages up to and including the first user message.
fn chat_opening(body: &Map<String, Value>) -> Option<[u8; 32]> {
    let messages = body.get("messages")?.as_array()?;
    let mut hasher = Sha256::new();
    let mut any = false;
    for message in messages {
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_ascii_lowercase();
        let is_user = role == "user";
        if is_user || role == "system" || role == "developer" {
            feed(&mut hasher, role.as_bytes());
            feed(&mut hasher, &content_bytes(message.get("content")));
            any = true;
        }
        if is_user {
            break;
        }
    }
    any.then(|| hasher.finalize().into())
}

/// Hash of the system prompt and the prompt's opening.
fn prompt_opening(body: &Map<String, Value>) -> Option<[u8; 32]> {
    let system = body
        .get("system")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let prompt = match body.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        // OpenAI: a list of prompts (or token arrays); the first one opens it.
        Some(Value::Array(items)) => match items.first() {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        },
        _ => String::new(),
    };
    if system.is_empty() && prompt.is_empty() {
        return None;
    }
    let mut end = prompt.len().min(PROMPT_PREFIX_BYTES);
    while !prompt.is_char_boundary(end) {
        end -= 1;
    }
    let mut hasher = Sha256::new();
    feed(&mut hasher, system.as_bytes());
    feed(&mut hasher, &prompt.as_bytes()[..end]);
    Some(hasher.finalize().into())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use http::HeaderValue;
    use serde_json::json;

    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn key(route: ApiRoute, model: &str, body: Value) -> Option<String> {
        affinity_key(route, model, &HeaderMap::new(), &obj(body))
    }

    #[test]
    fn every_turn_of_a_chat_maps_to_one_key() {
        let turn1 = json!({"model":"llama3","messages":[
            {"role":"system","content":"be brief"},
            {"role":"user","content":"hi"}]});
        let turn2 = json!({"model":"llama3","messages":[
            {"role":"system","content":"be brief"},
            {"role":"user","content":"hi"},
            {"role":"assistant","content":"hello"},
            {"role":"user","content":"how are you?"}]});
        let k1 = key(ApiRoute::OllamaChat, "llama3", turn1).unwrap();
        let k2 = key(ApiRoute::OllamaChat, "llama3:latest", turn2).unwrap();
        assert_eq!(k1, k2);
        assert!(k1.starts_with("llama3:latest|conv:"), "{k1}");
    }

    #[test]
    fn different_openings_or_models_differ() {
        let a = json!({"messages":[{"role":"user","content":"hi"}]});
        let b = json!({"messages":[{"role":"user","content":"hello"}]});
        let c =
            json!({"messages":[{"role":"system","content":"x"},{"role":"user","content":"hi"}]});
        let ka = key(ApiRoute::OpenAiChat, "m", a.clone()).unwrap();
        assert_ne!(ka, key(ApiRoute::OpenAiChat, "m", b).unwrap());
        assert_ne!(ka, key(ApiRoute::OpenAiChat, "m", c).unwrap());
        assert_ne!(ka, key(ApiRoute::OpenAiChat, "other", a).unwrap());
        // Moving text across the role/content boundary changes the key.
        let d = json!({"messages":[{"role":"user","content":"userhi"}]});
        let e = json!({"messages":[{"role":"useruser","content":"hi"}]});
        assert_ne!(
            key(ApiRoute::OpenAiChat, "m", d),
            key(ApiRoute::OpenAiChat, "m", e)
        );
    }

    #[test]
    fn openai_part_arrays_hash_stably() {
        let parts = json!({"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]});
        assert_eq!(
            key(ApiRoute::OpenAiChat, "m", parts.clone()),
            key(ApiRoute::OpenAiChat, "m", parts)
        );
    }

    #[test]
    fn generate_uses_system_and_prompt_prefix() {
        let long_a = format!("{}A", "x".repeat(PROMPT_PREFIX_BYTES));
        let long_b = format!("{}B", "x".repeat(PROMPT_PREFIX_BYTES));
        assert_eq!(
            key(ApiRoute::OllamaGenerate, "m", json!({"prompt": long_a})),
            key(ApiRoute::OllamaGenerate, "m", json!({"prompt": long_b}))
        );
        assert_ne!(
            key(
                ApiRoute::OllamaGenerate,
                "m",
                json!({"prompt": "a", "system": "s"})
            ),
            key(ApiRoute::OllamaGenerate, "m", json!({"prompt": "a"}))
        );
        assert!(key(ApiRoute::OllamaGenerate, "m", json!({"prompt": ""})).is_none());
        // Multi-byte characters at the cut do not panic.
        let emoji = "é".repeat(PROMPT_PREFIX_BYTES);
        assert!(key(ApiRoute::OpenAiCompletions, "m", json!({"prompt": [emoji]})).is_some());
    }

    #[test]
    fn explicit_session_header_wins_everywhere() {
        let mut h = HeaderMap::new();
        h.insert("x-switchyard-session", HeaderValue::from_static("abc"));
        let body = obj(json!({"input": "x"}));
        assert_eq!(
            affinity_key(ApiRoute::OllamaEmbed, "m", &h, &body).as_deref(),
            Some("m:latest|session:abc")
        );
        h.insert("x-session-id", HeaderValue::from_static("first"));
        assert_eq!(
            affinity_key(ApiRoute::OllamaChat, "m", &h, &body).as_deref(),
            Some("m:latest|session:first")
        );
        let long = "s".repeat(500);
        h.insert("x-session-id", HeaderValue::from_str(&long).unwrap());
        let k = affinity_key(ApiRoute::OllamaChat, "m", &h, &body).unwrap();
        assert!(k.len() < 100, "{k}");
    }

    #[test]
    fn embeddings_have_no_derived_key() {
        assert!(key(ApiRoute::OllamaEmbed, "m", json!({"input": "x"})).is_none());
        assert!(key(ApiRoute::OllamaChat, "m", json!({"messages": []})).is_none());
    }
}
