//! The conversation-affinity key sent with every choice.
//!
//! An explicit session header (`X-Session-Id`, or `X-Switchyard-Session`)
//! wins. Otherwise the key is derived from what stays the same across the
//! turns of one conversation: the model plus a SHA-256 over the
//! conversation's opening — the system messages before the first user
//! message and that first user message (chat), or the system prompt and the
//! first [`PROMPT_PREFIX_BYTES`] of the prompt (generate / completions).
//! Anthropic Messages add the top-level `system` to the chat opening; the
//! Responses API hashes `instructions` with the opening of `input` (an item
//! list like chat messages, or a string like a prompt). A Responses request
//! continuing a chain by `previous_response_id` gets the key
//! [`response_key`] of that response, before any header: the response is
//! stored on the backend that produced it, and the proxy pins each new
//! response id to its backend (`Router::pin_response`) when it sees it.
//! Every turn of one chat therefore maps to the same key, and two chats that
//! open differently map to different keys.
//!
//! The fields come as raw JSON text borrowed from the body
//! ([`ConversationFields`]); no `Value` tree of the conversation is built.
//! `messages` is parsed one element at a time and parsing stops at the
//! first user message, so a long conversation costs no more than its
//! opening. The keys are the ones a parse of the whole body gave
//! (content that is not a string is hashed as its `Value` serialization;
//! duplicate keys inside a message: the last wins), pinned by a test
//! against that implementation.
//!
//! The key is always computed; the control plane ignores it when
//! `conversation_affinity` is off. Embeddings and `/api/show` get a key only
//! from an explicit header (they have no conversation).

use std::{borrow::Cow, fmt, ops::ControlFlow};

use http::HeaderMap;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Value, value::RawValue};
use sha2::{Digest, Sha256};
use switchyard_control_plane::model_name::canonical_request_name;

use crate::{
    proxy::request::{KeyIn, raw_str},
    routes::ApiRoute,
};

/// Headers carrying an explicit session id, in order of preference.
pub const SESSION_HEADERS: [&str; 2] = ["x-session-id", "x-switchyard-session"];

/// How much of a completion prompt identifies its conversation. Clients that
/// resend the whole transcript as the prompt keep the same opening.
pub const PROMPT_PREFIX_BYTES: usize = 1024;

/// Longest explicit session id used verbatim; longer ids are hashed so keys
/// stay small in the control plane's bounded table.
const MAX_SESSION_ID: usize = 128;

/// The body fields a derived key is computed from, as raw JSON text
/// borrowed from the body (absent fields are `None`).
#[derive(Clone, Copy, Debug, Default)]
pub struct ConversationFields<'a> {
    /// `messages` (chat routes).
    pub messages: Option<&'a RawValue>,
    /// `prompt` (generate and completions routes).
    pub prompt: Option<&'a RawValue>,
    /// `system` (Ollama generate, Anthropic Messages).
    pub system: Option<&'a RawValue>,
    /// `input` (Responses API).
    pub input: Option<&'a RawValue>,
    /// `instructions` (Responses API).
    pub instructions: Option<&'a RawValue>,
    /// `previous_response_id` (Responses API).
    pub previous_response_id: Option<&'a RawValue>,
}

/// The key a Responses chain continued from response `id` routes by (the
/// one a new response id is pinned under).
pub fn response_key(model: &str, id: &str) -> String {
    key(canonical_request_name(model), "|response:", id)
}

/// The response a Responses API request continues (`previous_response_id`),
/// if any.
fn continued_response(route: ApiRoute, body: &ConversationFields<'_>) -> Option<String> {
    if route != ApiRoute::OpenAiResponses {
        return None;
    }
    body.previous_response_id
        .and_then(raw_str)
        .map(|id| id.trim().to_owned())
        .filter(|id| !id.is_empty())
}

/// Whether the request's key must be followed: it continues a response
/// stored on one backend, which no other can serve.
pub fn affinity_required(route: ApiRoute, body: &ConversationFields<'_>) -> bool {
    continued_response(route, body).is_some()
}

/// The affinity key for a request, if any.
pub fn affinity_key(
    route: ApiRoute,
    model: &str,
    headers: &HeaderMap,
    body: &ConversationFields<'_>,
) -> Option<String> {
    if let Some(previous) = continued_response(route, body) {
        return Some(response_key(model, &previous));
    }
    let model = canonical_request_name(model);
    if let Some(session) = explicit_session(headers) {
        let session = if session.len() > MAX_SESSION_ID {
            std::borrow::Cow::Owned(hex(&Sha256::digest(session.as_bytes())[..16]))
        } else {
            std::borrow::Cow::Borrowed(session)
        };
        return Some(key(model, "|session:", &session));
    }
    let digest = match route {
        ApiRoute::OllamaChat | ApiRoute::OpenAiChat => chat_opening(None, body.messages?)?,
        ApiRoute::AnthropicMessages => chat_opening(body.system, body.messages?)?,
        ApiRoute::OllamaGenerate | ApiRoute::OpenAiCompletions => {
            prompt_opening(body.system, body.prompt)?
        }
        ApiRoute::OpenAiResponses => match body.input {
            Some(input) if input.get().starts_with('[') => chat_opening(body.instructions, input)?,
            input => prompt_opening(body.instructions, input)?,
        },
        ApiRoute::OllamaEmbed
        | ApiRoute::OllamaEmbeddings
        | ApiRoute::OllamaShow
        | ApiRoute::OpenAiEmbeddings
        | ApiRoute::AnthropicCountTokens
        | ApiRoute::Rerank
        | ApiRoute::RerankAlias => {
            return None;
        }
    };
    Some(key(model, "|conv:", &hex(&digest[..16])))
}

/// `{model}{kind}{id}` in one allocation (this runs on every request).
fn key(model: String, kind: &str, id: &str) -> String {
    let mut key = model;
    key.reserve_exact(kind.len() + id.len());
    key.push_str(kind);
    key.push_str(id);
    key
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

/// Content as text: a string as-is, nothing for `null` or no content,
/// anything else (OpenAI part arrays) as its JSON serialization.
fn content_bytes(content: Option<&RawValue>) -> Cow<'_, [u8]> {
    match content {
        None => Cow::Borrowed(b""),
        Some(raw) if raw.get() == "null" => Cow::Borrowed(b""),
        Some(raw) => match raw_str(raw).unwrap_or_else(|| value_text(raw)) {
            Cow::Borrowed(s) => Cow::Borrowed(s.as_bytes()),
            Cow::Owned(s) => Cow::Owned(s.into_bytes()),
        },
    }
}

/// A non-string value as its `Value` serialization (compact, keys in
/// `Value`'s map order), which is what the key has always hashed. A value a
/// `Value` cannot hold (numbers beyond `f64`, very deep nesting) was a 400
/// before; it is hashed as written.
///
/// Anthropic's `cache_control` markers are left out of part arrays: a
/// client moves them to the newest message every turn (Claude Code marks
/// the last blocks), so the first user message carries one on turn 1 and
/// none later, and the conversation's key would change on turn 2, moving
/// it off the backend holding its KV cache.
fn value_text(raw: &RawValue) -> Cow<'_, str> {
    serde_json::from_str::<Value>(raw.get()).map_or(Cow::Borrowed(raw.get()), |mut v| {
        if let Value::Array(parts) = &mut v {
            for part in parts {
                if let Value::Object(fields) = part {
                    fields.remove("cache_control");
                }
            }
        }
        Cow::Owned(v.to_string())
    })
}

/// Hash of the system messages up to and including the first user message,
/// after a top-level system prompt (`system`: Anthropic's `system`, the
/// Responses API's `instructions`) when there is one.
fn chat_opening(system: Option<&RawValue>, messages: &RawValue) -> Option<[u8; 32]> {
    let mut hasher = Sha256::new();
    let mut any = false;
    let system = content_bytes(system);
    if !system.is_empty() {
        // A label no message role can collide with (roles are fed as
        // length-prefixed fields too).
        feed(&mut hasher, b"\0system-field");
        feed(&mut hasher, &system);
    }
    for_each_element(messages, |message| {
        let message = MessageFields::of(message);
        let role = message
            .role
            .and_then(raw_str)
            .unwrap_or_default()
            .to_ascii_lowercase();
        let is_user = role == "user";
        if is_user || role == "system" || role == "developer" {
            feed(&mut hasher, role.as_bytes());
            feed(&mut hasher, &content_bytes(message.content));
            any = true;
        }
        if is_user {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    any.then(|| hasher.finalize().into())
}

/// Hash of the system prompt and the prompt's opening.
fn prompt_opening(system: Option<&RawValue>, prompt: Option<&RawValue>) -> Option<[u8; 32]> {
    let system = system.and_then(raw_str).unwrap_or_default();
    let prompt = match prompt {
        Some(raw) if raw.get().starts_with('[') => {
            // OpenAI: a list of prompts (or token arrays); the first one
            // opens it.
            let mut first = None;
            for_each_element(raw, |item| {
                first = Some(item);
                ControlFlow::Break(())
            });
            match first {
                Some(item) => raw_str(item).unwrap_or_else(|| value_text(item)),
                None => Cow::Borrowed(""),
            }
        }
        Some(raw) => raw_str(raw).unwrap_or_default(),
        None => Cow::Borrowed(""),
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

/// Calls `f` on the elements of the JSON array `array`, in order, until it
/// breaks; the elements after that are not parsed at all. Nothing happens
/// when `array` is not an array.
fn for_each_element<'a>(array: &'a RawValue, f: impl FnMut(&'a RawValue) -> ControlFlow<()>) {
    struct Elements<F>(F);
    impl<'de, F: FnMut(&'de RawValue) -> ControlFlow<()>> Visitor<'de> for Elements<F> {
        type Value = ();

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an array")
        }

        fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
            while let Some(element) = seq.next_element::<&'de RawValue>()? {
                if (self.0)(element).is_break() {
                    break;
                }
            }
            Ok(())
        }
    }
    // The result is dropped on purpose: the body parse already checked the
    // whole array, so the only errors left are "not an array" (no key, as
    // before) and serde_json's complaint about the elements deliberately
    // left unread after a break.
    let _ = (&mut serde_json::Deserializer::from_str(array.get())).deserialize_seq(Elements(f));
}

/// The fields of one message the key reads; a message that is not an
/// object has neither.
#[derive(Debug, Default)]
struct MessageFields<'a> {
    role: Option<&'a RawValue>,
    content: Option<&'a RawValue>,
}

impl<'a> MessageFields<'a> {
    const NAMES: [&'static str; 2] = ["role", "content"];

    fn of(message: &'a RawValue) -> Self {
        if message.get().starts_with('{') {
            serde_json::from_str(message.get()).unwrap_or_default()
        } else {
            Self::default()
        }
    }
}

impl<'de> Deserialize<'de> for MessageFields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = MessageFields<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a message object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = MessageFields::default();
                while let Some(index) = map.next_key_seed(KeyIn(&MessageFields::NAMES))? {
                    // Last wins on a duplicate key, as in a `Value` map.
                    match index {
                        Some(0) => fields.role = Some(map.next_value()?),
                        Some(1) => fields.content = Some(map.next_value()?),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(fields)
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

fn hex(bytes: &[u8]) -> String {
    // By table, not `format!` per byte: this runs on every request.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

#[cfg(test)]
mod hex_tests {
    #[test]
    fn hex_is_lowercase_two_digits_per_byte() {
        assert_eq!(super::hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(super::hex(&[]), "");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::HashMap;

    use http::HeaderValue;
    use proptest::prelude::*;
    use serde_json::{Map, json};

    use super::*;

    /// The fields as the request parse hands them over.
    fn fields(text: &str) -> ConversationFields<'_> {
        let map: HashMap<String, &RawValue> = serde_json::from_str(text).unwrap();
        ConversationFields {
            messages: map.get("messages").copied(),
            prompt: map.get("prompt").copied(),
            system: map.get("system").copied(),
            input: map.get("input").copied(),
            instructions: map.get("instructions").copied(),
            previous_response_id: map.get("previous_response_id").copied(),
        }
    }

    fn key(route: ApiRoute, model: &str, body: Value) -> Option<String> {
        let text = body.to_string();
        affinity_key(route, model, &HeaderMap::new(), &fields(&text))
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
    fn anthropic_cache_markers_do_not_change_the_key() {
        // Turn 1: the only user message carries the marker (it is the
        // last); turn 2: the marker moved to the newest message.
        let turn1 = json!({"system": [{"type":"text","text":"be brief","cache_control":{"type":"ephemeral"}}],
            "messages":[{"role":"user","content":[{"type":"text","text":"hi","cache_control":{"type":"ephemeral"}}]}]});
        let turn2 = json!({"system": [{"type":"text","text":"be brief"}],
            "messages":[{"role":"user","content":[{"type":"text","text":"hi"}]},
                        {"role":"assistant","content":"hello"},
                        {"role":"user","content":[{"type":"text","text":"more","cache_control":{"type":"ephemeral"}}]}]});
        let k1 = key(ApiRoute::AnthropicMessages, "m", turn1);
        assert!(k1.is_some());
        assert_eq!(k1, key(ApiRoute::AnthropicMessages, "m", turn2));
        // The text still counts.
        let other = json!({"messages":[{"role":"user","content":[{"type":"text","text":"bye"}]}]});
        assert_ne!(k1, key(ApiRoute::AnthropicMessages, "m", other));
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
        let text = json!({"input": "x"}).to_string();
        let body = fields(&text);
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
    fn anthropic_messages_hash_the_system_prompt_too() {
        let open = |system: Value| {
            let mut body = json!({"messages":[{"role":"user","content":"hi"}]});
            if !system.is_null() {
                body["system"] = system;
            }
            key(ApiRoute::AnthropicMessages, "m", body).unwrap()
        };
        let plain = open(Value::Null);
        let brief = open(json!("be brief"));
        assert_ne!(plain, brief);
        assert_ne!(brief, open(json!("be verbose")));
        assert_ne!(brief, open(json!([{"type":"text","text":"be brief"}])));
        // Later turns keep the key.
        let later = json!({"system":"be brief","messages":[
            {"role":"user","content":"hi"},
            {"role":"assistant","content":"hello"},
            {"role":"user","content":"more"}]});
        assert_eq!(key(ApiRoute::AnthropicMessages, "m", later).unwrap(), brief);
        // Chat routes keep their keys: a stray top-level `system` is not read.
        let chat = json!({"messages":[{"role":"user","content":"hi"}]});
        let mut with_system = chat.clone();
        with_system["system"] = json!("x");
        assert_eq!(
            key(ApiRoute::OpenAiChat, "m", chat),
            key(ApiRoute::OpenAiChat, "m", with_system)
        );
    }

    #[test]
    fn responses_hash_instructions_and_the_opening_of_input() {
        let turn1 = json!({"instructions":"be brief","input":[
            {"role":"user","content":"hi"}]});
        let turn2 = json!({"instructions":"be brief","input":[
            {"role":"user","content":"hi"},
            {"type":"message","role":"assistant","content":[{"type":"output_text","text":"hello"}]},
            {"type":"function_call_output","call_id":"c1","output":"42"},
            {"role":"user","content":"more"}]});
        let k1 = key(ApiRoute::OpenAiResponses, "m", turn1).unwrap();
        assert_eq!(k1, key(ApiRoute::OpenAiResponses, "m", turn2).unwrap());
        let other = json!({"instructions":"be verbose","input":[{"role":"user","content":"hi"}]});
        assert_ne!(k1, key(ApiRoute::OpenAiResponses, "m", other).unwrap());
        // A string input is a prompt.
        let a = key(ApiRoute::OpenAiResponses, "m", json!({"input":"hi"})).unwrap();
        assert_ne!(
            a,
            key(ApiRoute::OpenAiResponses, "m", json!({"input":"ho"})).unwrap()
        );
        // A continued chain routes by the response it continues, whatever
        // else the request holds, and before a session header.
        let continued = key(
            ApiRoute::OpenAiResponses,
            "m",
            json!({"previous_response_id":"resp_1","input":"hi"}),
        );
        assert_eq!(continued.as_deref(), Some("m:latest|response:resp_1"));
        assert_eq!(continued.unwrap(), response_key("m", "resp_1"));
        let mut h = HeaderMap::new();
        h.insert("x-session-id", "s1".parse().unwrap());
        let text = json!({"previous_response_id":"resp_2"}).to_string();
        assert_eq!(
            affinity_key(ApiRoute::OpenAiResponses, "m", &h, &fields(&text)).as_deref(),
            Some("m:latest|response:resp_2")
        );
        // Such a key must be followed; no other is.
        let text = json!({"previous_response_id":"resp_1","input":"hi"}).to_string();
        assert!(affinity_required(ApiRoute::OpenAiResponses, &fields(&text)));
        assert!(!affinity_required(ApiRoute::OpenAiChat, &fields(&text)));
        let opening = json!({"input":"hi"}).to_string();
        assert!(!affinity_required(
            ApiRoute::OpenAiResponses,
            &fields(&opening)
        ));
        // Elsewhere the field means nothing.
        assert!(
            key(
                ApiRoute::OpenAiChat,
                "m",
                json!({"previous_response_id":"r"})
            )
            .is_none()
        );
    }

    #[test]
    fn embeddings_have_no_derived_key() {
        assert!(key(ApiRoute::OllamaEmbed, "m", json!({"input": "x"})).is_none());
        assert!(key(ApiRoute::OllamaChat, "m", json!({"messages": []})).is_none());
    }

    /// The implementation over a fully parsed body that the keys must stay
    /// identical to (as it was before the body stopped being parsed whole).
    mod reference {
        use super::*;

        pub fn key(route: ApiRoute, model: &str, body: &Map<String, Value>) -> Option<String> {
            let model = canonical_request_name(model);
            let digest = match route {
                ApiRoute::OllamaChat | ApiRoute::OpenAiChat => chat_opening(body)?,
                ApiRoute::OllamaGenerate | ApiRoute::OpenAiCompletions => prompt_opening(body)?,
                _ => return None,
            };
            Some(format!("{model}|conv:{}", hex(&digest[..16])))
        }

        fn content_bytes(content: Option<&Value>) -> Vec<u8> {
            match content {
                Some(Value::String(s)) => s.as_bytes().to_vec(),
                Some(Value::Null) | None => Vec::new(),
                Some(other) => other.to_string().into_bytes(),
            }
        }

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

        fn prompt_opening(body: &Map<String, Value>) -> Option<[u8; 32]> {
            let system = body
                .get("system")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let prompt = match body.get("prompt") {
                Some(Value::String(s)) => s.clone(),
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
    }

    const CONVERSATION_ROUTES: [ApiRoute; 4] = [
        ApiRoute::OllamaChat,
        ApiRoute::OpenAiChat,
        ApiRoute::OllamaGenerate,
        ApiRoute::OpenAiCompletions,
    ];

    /// New and reference keys for one body text, for every route.
    fn assert_same_keys(text: &str) {
        let map: Map<String, Value> = serde_json::from_str(text).unwrap();
        let new = fields(text);
        for route in CONVERSATION_ROUTES {
            assert_eq!(
                affinity_key(route, "llama3", &HeaderMap::new(), &new),
                reference::key(route, "llama3", &map),
                "{route:?} {text}"
            );
        }
    }

    #[test]
    fn keys_identical_to_a_full_parse() {
        let long = "é".repeat(PROMPT_PREFIX_BYTES);
        let bodies = [
            r#"{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"},{"role":"user","content":"later"}]}"#.to_owned(),
            r#"{"messages":[{"role":"SYSTEM","content":"s"},{"role":"Developer","content":null},{"role":"assistant","content":"a"},{"role":"User"}]}"#.to_owned(),
            // Duplicate keys in a message: the last one wins.
            r#"{"messages":[{"role":"assistant","content":"x","role":"user","content":"y"}]}"#.to_owned(),
            // Escaped keys and values, whitespace everywhere.
            "{ \"messages\" : [ { \"r\\u006fle\" : \"us\\u0065r\" , \"content\" : \"h\\u00e9\\n\\\"i\\\"\" } ] }".to_owned(),
            // Part arrays and other non-string content, keys out of order.
            r#"{"messages":[{"role":"user","content":[{"type":"text","text":"hi","b":1,"a":[1.0,2.50,-0,1e2]}]}]}"#.to_owned(),
            r#"{"messages":[{"role":"system","content":12.0},{"role":"user","content":{"z":true,"a":null}}]}"#.to_owned(),
            // Messages that are not objects, roles that are not strings.
            r#"{"messages":[1,"user",null,[{"role":"user"}],{"role":7,"content":"x"},{"role":"user","content":"hi"}]}"#.to_owned(),
            r#"{"messages":[{"role":"assistant","content":"only"}]}"#.to_owned(),
            r#"{"messages":[]}"#.to_owned(),
            r#"{"messages":{"role":"user","content":"hi"}}"#.to_owned(),
            r#"{"messages":"hi"}"#.to_owned(),
            r#"{"prompt":"hello","system":"s"}"#.to_owned(),
            format!(r#"{{"prompt":"{long}","system":7}}"#),
            format!(r#"{{"prompt":["{long}","second"]}}"#),
            r#"{"prompt":[[1,2,3],"second"]}"#.to_owned(),
            r#"{"prompt":[{"b":1,"a":2.0}]}"#.to_owned(),
            r#"{"prompt":[],"system":"s"}"#.to_owned(),
            r#"{"prompt":[null]}"#.to_owned(),
            r#"{"prompt":42,"system":"s"}"#.to_owned(),
            r#"{"prompt":"p\u00e9\ud83d\ude00","system":null}"#.to_owned(),
            r#"{"system":"only system"}"#.to_owned(),
            "{}".to_owned(),
        ];
        for body in &bodies {
            assert_same_keys(body);
        }
    }

    /// Any JSON value, small.
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (-1.0e6f64..1.0e6).prop_map(Value::from),
            any::<String>().prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z]{1,3}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn any_role() -> impl Strategy<Value = Value> {
        prop_oneof![
            4 => prop::sample::select(vec!["system", "user", "assistant", "developer", "tool", "USER", "System"])
                .prop_map(Value::from),
            1 => any_json(),
        ]
    }

    fn any_message() -> impl Strategy<Value = Value> {
        prop_oneof![
            8 => (any_role(), proptest::option::of(any_json()), "[a-z ]{0,12}").prop_map(
                |(role, content, text)| {
                    let mut m = Map::new();
                    m.insert("role".into(), role);
                    m.insert("content".into(), content.unwrap_or(Value::from(text)));
                    m.insert("images".into(), json!([]));
                    Value::Object(m)
                }
            ),
            1 => any_json(),
        ]
    }

    proptest! {
        #[test]
        fn keys_identical_to_a_full_parse_for_any_conversation(
            messages in proptest::collection::vec(any_message(), 0..6),
            prompt in any_json(),
            prompt_text in ".{0,40}",
            system in prop_oneof![any::<String>().prop_map(Value::from), any_json()],
        ) {
            let body = json!({ "messages": messages, "system": system.clone() });
            assert_same_keys(&body.to_string());
            assert_same_keys(&json!({ "prompt": prompt, "system": system.clone() }).to_string());
            assert_same_keys(&json!({ "prompt": [prompt_text.clone(), 1] }).to_string());
            assert_same_keys(&json!({ "prompt": prompt_text, "system": system }).to_string());
        }
    }
}
