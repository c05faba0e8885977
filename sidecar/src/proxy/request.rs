//! Parse-and-validate phase: read the body under the size limit, check it
//! is JSON, find the model, settle the stream mode, compute the affinity
//! key, and build the per-request [`RequestContext`].
//!
//! The body is never turned into a `serde_json::Value` tree here. Chat
//! bodies carry the whole conversation (often hundreds of KB) while routing
//! needs only a handful of top-level fields, so one pass over the body
//! checks that it is well-formed JSON and borrows the raw text of the
//! fields the sidecar reads (`model`, `name`, `stream`, `messages`,
//! `prompt`, `system`, `images`, `keep_alive`, `input`, `instructions`,
//! `previous_response_id`);
//! every other value is skipped without being built. The affinity key parses only the
//! opening of `messages` (see [`crate::affinity_key`]). The full object is
//! parsed on demand, by [`RequestContext::json_object`], only where a
//! request must be rebuilt (translation for an OpenAI-only backend).
//!
//! Invariants:
//! - The original body bytes are kept untouched: forwarded as-is, or with
//!   only the model value replaced in place
//!   ([`RequestContext::body_with_model`]) when the backend names the model
//!   differently.
//! - `stream` is decided here once, from the body or the route's default
//!   (Ollama: stream; OpenAI: don't).
//! - Every field the sidecar reads appears at most once at the top level:
//!   a duplicate is a 400. The body goes to the backend verbatim and JSON
//!   parsers disagree on which copy of a duplicate wins; a request the
//!   sidecar routes as model A must never run as model B.
//! - Rejected as today: invalid UTF-8 and malformed JSON (400
//!   `InvalidJson`), non-objects (`NotAnObject`), a non-string model, a
//!   non-boolean stream (`InvalidField`). Values the sidecar skips are
//!   checked for syntax only, so three kinds of well-formed JSON that a
//!   `Value` cannot hold (numbers beyond `f64`, nesting deeper than 128,
//!   lone `\u` surrogates) now reach the backend on the pass-through path;
//!   where the full object is needed they still fail as `InvalidJson`.

use std::{
    borrow::Cow,
    fmt,
    ops::Range,
    time::{Instant, SystemTime},
};

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, header::CONTENT_LENGTH};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value, value::RawValue};

use crate::{
    affinity_key::{ConversationFields, affinity_key, affinity_required},
    errors::ProxyError,
    routes::{ApiFormat, ApiRoute},
    translate::options::is_zero_keep_alive,
};

/// Everything later phases need to know about one client request.
#[derive(Clone, Debug)]
pub struct RequestContext {
    /// Which route the client called.
    pub route: ApiRoute,
    /// The model as the client named it, without surrounding whitespace.
    pub model: String,
    /// The body's model value had whitespace around the name: the backend
    /// must get the trimmed name (it would not know `" llama3"`, and its
    /// "model not found" would make the router avoid it for that model).
    pub model_padded: bool,
    /// The body field the model came from (`model`, or `name` for old
    /// `/api/show` clients); rewritten there when the backend names the
    /// model differently.
    pub model_field: &'static str,
    /// Effective stream mode.
    pub stream: bool,
    /// Whether the body carried `stream` itself.
    pub stream_explicit: bool,
    /// The body exactly as received (validated JSON object, UTF-8).
    pub body: Bytes,
    /// Conversation-affinity key, if any.
    pub affinity_key: Option<String>,
    /// The key's endpoint must be followed (a Responses request continuing
    /// a stored response).
    pub affinity_required: bool,
    /// An Ollama unload (`ollama stop`): `/api/chat` with no messages or
    /// `/api/generate` with an empty prompt and no images, with
    /// `keep_alive` 0. Sent to every Ollama endpoint holding the model
    /// ([`crate::manage::unload`]), not to one chosen endpoint.
    pub unload: bool,
    /// The client's request headers (forwarded minus hop-by-hop and auth).
    pub headers: HeaderMap,
    /// When the request arrived.
    pub received: Instant,
    /// Wall-clock time at arrival (`created_at` of translated answers).
    pub received_wall: SystemTime,
    /// Byte range in `body` of the model field's JSON value (quotes
    /// included), replaced by [`Self::body_with_model`].
    model_span: Range<usize>,
}

impl RequestContext {
    /// The whole body parsed as a JSON object, for the paths that rebuild
    /// the request (translation). Parses `body` on every call: the
    /// pass-through path never calls it.
    ///
    /// Errors are the ones [`parse_for`] gave before it stopped building the
    /// tree: `InvalidJson` for what a `Value` cannot hold (see the module
    /// docs), `NotAnObject` (unreachable after [`parse_for`], kept for
    /// completeness of the mapping).
    pub fn json_object(&self) -> Result<Map<String, Value>, ProxyError> {
        match serde_json::from_slice(&self.body) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(_) => Err(ProxyError::NotAnObject),
            Err(e) => Err(ProxyError::InvalidJson(e.to_string())),
        }
    }

    /// The body with the model field's value replaced by `model` and every
    /// other byte unchanged (no re-serialization: key order, number
    /// spelling and unknown fields reach the backend as the client wrote
    /// them).
    pub fn body_with_model(&self, model: &str) -> Result<Bytes, ProxyError> {
        let quoted = serde_json::to_string(model)
            .map_err(|e| ProxyError::Internal(format!("cannot serialize model name: {e}")))?;
        let (Some(before), Some(after)) = (
            self.body.get(..self.model_span.start),
            self.body.get(self.model_span.end..),
        ) else {
            return Err(ProxyError::Internal(
                "model value outside the request body".into(),
            ));
        };
        let mut out = Vec::with_capacity(before.len() + quoted.len() + after.len());
        out.extend_from_slice(before);
        out.extend_from_slice(quoted.as_bytes());
        out.extend_from_slice(after);
        Ok(Bytes::from(out))
    }
}

/// Reads the whole body, refusing more than `limit` bytes (413), by the
/// declared `Content-Length` first so an oversized upload is refused
/// without reading it.
pub async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ProxyError> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ProxyError::BodyTooLarge { limit })
        }
        Err(e) => Err(ProxyError::BodyRead(e.to_string())),
    }
}

/// Parses and validates a body for `route`, deriving its affinity key (the
/// tests' shorthand; the proxy asks its router with [`parse_for`]).
#[cfg(test)]
pub fn parse(
    route: ApiRoute,
    headers: HeaderMap,
    body: Bytes,
    received: Instant,
) -> Result<RequestContext, ProxyError> {
    parse_for(route, headers, body, received, true)
}

/// Parses and validates a body for `route`, deriving the affinity key only
/// when `derive_affinity` (with `conversation_affinity` off nothing reads
/// it, and deriving it hashes the conversation's opening on every request).
pub fn parse_for(
    route: ApiRoute,
    headers: HeaderMap,
    body: Bytes,
    received: Instant,
    derive_affinity: bool,
) -> Result<RequestContext, ProxyError> {
    // Skipped values are not decoded, so UTF-8 is checked here, for the
    // whole body at once (as parsing into a `Value` did). Ollama's own
    // decoder (Go's) takes invalid UTF-8 in strings as U+FFFD, and its
    // clients rely on that: on its routes the body goes on so replaced.
    // OpenAI-style servers differ (most refuse it): a 400 there.
    let received_body = body;
    let text = String::from_utf8_lossy(&received_body);
    let body = match &text {
        Cow::Borrowed(_) => received_body.clone(),
        Cow::Owned(replaced) if route.format() == ApiFormat::Ollama => {
            Bytes::from(replaced.clone().into_bytes())
        }
        Cow::Owned(_) => {
            let problem = std::str::from_utf8(&received_body)
                .err()
                .map_or_else(|| "invalid UTF-8".to_owned(), |e| e.to_string());
            return Err(ProxyError::InvalidJson(problem));
        }
    };
    let text: &str = &text;
    let envelope = match serde_json::from_str::<TopLevel<'_>>(text) {
        Ok(TopLevel::Object(envelope)) => envelope,
        Ok(TopLevel::Other) => return Err(ProxyError::NotAnObject),
        Err(e) => return Err(ProxyError::InvalidJson(e.to_string())),
    };
    if let Some(field) = envelope.duplicate {
        return Err(ProxyError::InvalidField {
            field,
            problem: "appears more than once",
        });
    }
    let (model_field, model_value, model, model_padded) = find_model(route, &envelope)?;
    let model_span = span_in(text, model_value).ok_or_else(|| {
        ProxyError::Internal("parsed model value does not point into the body".into())
    })?;
    let (stream, stream_explicit) = stream_mode(route, envelope.get("stream"))?;
    let (affinity_key, affinity_required) = if derive_affinity {
        let conversation = envelope.conversation();
        (
            affinity_key(route, &model, &headers, &conversation),
            affinity_required(route, &conversation),
        )
    } else {
        (None, false)
    };
    let unload = is_unload(route, &envelope);
    Ok(RequestContext {
        route,
        model,
        model_padded,
        model_field,
        stream,
        stream_explicit,
        body,
        affinity_key,
        affinity_required,
        unload,
        headers,
        received,
        received_wall: SystemTime::now(),
        model_span,
    })
}

/// The model: the first of the route's model fields holding a non-blank
/// string (`null` and blank strings are as good as absent).
fn find_model<'a>(
    route: ApiRoute,
    envelope: &Envelope<'a>,
) -> Result<(&'static str, &'a RawValue, String, bool), ProxyError> {
    for &field in route.model_fields() {
        let Some(raw) = envelope.get(field) else {
            continue;
        };
        if raw.get() == "null" {
            continue;
        }
        if !raw.get().starts_with('"') {
            return Err(ProxyError::InvalidField {
                field,
                problem: "must be a string",
            });
        }
        let decoded = decode_str(raw).map_err(|e| ProxyError::InvalidJson(e.to_string()))?;
        let name = decoded.trim();
        if !name.is_empty() {
            return Ok((field, raw, name.to_owned(), name.len() != decoded.len()));
        }
    }
    Err(ProxyError::MissingModel)
}

fn stream_mode(route: ApiRoute, raw: Option<&RawValue>) -> Result<(bool, bool), ProxyError> {
    if !route.accepts_stream() {
        return Ok((false, false));
    }
    // A raw value is exactly the value's text: literals have one spelling.
    match raw.map(RawValue::get) {
        None | Some("null") => Ok((route.default_stream(), false)),
        Some("true") => Ok((true, true)),
        Some("false") => Ok((false, true)),
        Some(_) => Err(ProxyError::InvalidField {
            field: "stream",
            problem: "must be a boolean",
        }),
    }
}

/// Whether the body asks Ollama to unload the model: nothing to run (chat:
/// no messages; generate: an empty prompt and no images, the rule the
/// translation for OpenAI backends uses too) and `keep_alive` 0.
fn is_unload(route: ApiRoute, envelope: &Envelope<'_>) -> bool {
    let nothing_to_run = match route {
        ApiRoute::OllamaChat => is_empty_array(envelope.get("messages")),
        ApiRoute::OllamaGenerate => {
            is_empty_string(envelope.get("prompt")) && is_empty_array(envelope.get("images"))
        }
        _ => return false,
    };
    nothing_to_run
        && envelope
            .get("keep_alive")
            .and_then(|raw| serde_json::from_str::<Value>(raw.get()).ok())
            .is_some_and(|value| is_zero_keep_alive(&value))
}

/// Absent, `null` or `[]` (any spacing inside).
fn is_empty_array(raw: Option<&RawValue>) -> bool {
    match raw.map(RawValue::get) {
        None | Some("null") => true,
        Some(text) => text
            .strip_prefix('[')
            .and_then(|t| t.strip_suffix(']'))
            .is_some_and(|inside| inside.trim().is_empty()),
    }
}

/// Absent, `null` or `""`.
fn is_empty_string(raw: Option<&RawValue>) -> bool {
    matches!(raw.map(RawValue::get), None | Some("null" | "\"\""))
}

/// Where `raw` (borrowed from `text` by the parser) lies in `text`.
fn span_in(text: &str, raw: &RawValue) -> Option<Range<usize>> {
    let raw = raw.get();
    let start = raw.as_ptr().addr().checked_sub(text.as_ptr().addr())?;
    let span = start..start.checked_add(raw.len())?;
    // In bounds and the same text: the pointer arithmetic was right.
    (text.get(span.clone()) == Some(raw)).then_some(span)
}

/// The top-level fields the sidecar reads; every other value in the body
/// is skipped (syntax-checked, never built).
const READ_FIELDS: [&str; 11] = [
    "model",
    "name",
    "stream",
    "messages",
    "prompt",
    "system",
    "images",
    "keep_alive",
    "input",
    "instructions",
    "previous_response_id",
];

/// The top level of a body: the raw text of the [`READ_FIELDS`] present.
#[derive(Debug, Default)]
struct Envelope<'a> {
    /// Indexed like [`READ_FIELDS`].
    values: [Option<&'a RawValue>; READ_FIELDS.len()],
    /// The first read field found twice.
    duplicate: Option<&'static str>,
}

impl<'a> Envelope<'a> {
    fn get(&self, field: &str) -> Option<&'a RawValue> {
        let index = READ_FIELDS.iter().position(|f| *f == field)?;
        self.values.get(index).copied().flatten()
    }

    fn conversation(&self) -> ConversationFields<'a> {
        ConversationFields {
            messages: self.get("messages"),
            prompt: self.get("prompt"),
            system: self.get("system"),
            input: self.get("input"),
            instructions: self.get("instructions"),
            previous_response_id: self.get("previous_response_id"),
        }
    }
}

/// A body's top level: an object, or anything else (fully syntax-checked
/// either way, so malformed JSON is `InvalidJson` before `NotAnObject`, as
/// when parsing into a `Value`).
enum TopLevel<'a> {
    Object(Envelope<'a>),
    Other,
}

impl<'de> de::Deserialize<'de> for TopLevel<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TopLevelVisitor)
    }
}

struct TopLevelVisitor;

impl<'de> Visitor<'de> for TopLevelVisitor {
    type Value = TopLevel<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut envelope = Envelope::default();
        while let Some(index) = map.next_key_seed(KeyIn(&READ_FIELDS))? {
            let slot = index.and_then(|i| Some((envelope.values.get_mut(i)?, READ_FIELDS.get(i)?)));
            let Some((slot, field)) = slot else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            if slot.replace(map.next_value::<&'de RawValue>()?).is_some() {
                envelope.duplicate.get_or_insert(field);
            }
        }
        Ok(TopLevel::Object(envelope))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(TopLevel::Other)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(TopLevel::Other)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(TopLevel::Other)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(TopLevel::Other)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(TopLevel::Other)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(TopLevel::Other)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(TopLevel::Other)
    }
}

/// An object key looked up in a list of names: `Some(index)` for a listed
/// name, `None` for any other key. Escaped keys (`"mod\u0065l"`) are
/// decoded first, as a `Value` map would.
pub(crate) struct KeyIn(pub &'static [&'static str]);

impl<'de> DeserializeSeed<'de> for KeyIn {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_identifier(self)
    }
}

impl<'de> Visitor<'de> for KeyIn {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().position(|name| *name == key))
    }
}

/// A raw JSON string decoded, borrowed from the body when it has no
/// escapes. Errors on anything but a valid JSON string.
pub(crate) fn decode_str(raw: &RawValue) -> Result<Cow<'_, str>, serde_json::Error> {
    struct CowStr;
    impl<'de> Visitor<'de> for CowStr {
        type Value = Cow<'de, str>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }

        fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
            Ok(Cow::Borrowed(s))
        }

        fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
            Ok(Cow::Owned(s.to_owned()))
        }
    }
    (&mut serde_json::Deserializer::from_str(raw.get())).deserialize_str(CowStr)
}

/// A raw JSON value as text if it is a string (`None` for other values,
/// like `Value::as_str`).
pub(crate) fn raw_str(raw: &RawValue) -> Option<Cow<'_, str>> {
    if raw.get().starts_with('"') {
        decode_str(raw).ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use http::HeaderValue;

    use super::*;

    fn p(route: ApiRoute, body: &str) -> Result<RequestContext, ProxyError> {
        parse(
            route,
            HeaderMap::new(),
            Bytes::from(body.to_owned()),
            Instant::now(),
        )
    }

    /// Invalid UTF-8 in a string: Ollama's routes take it as U+FFFD (as
    /// Ollama does) and forward the body so replaced; OpenAI's refuse it.
    #[test]
    fn invalid_utf8_is_replaced_for_ollama_and_refused_for_openai() {
        let raw = b"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"a\xffb\"}]}";
        let c = parse(
            ApiRoute::OllamaChat,
            HeaderMap::new(),
            Bytes::from_static(raw),
            Instant::now(),
        )
        .unwrap();
        assert_eq!(c.model, "m");
        let v: Value = serde_json::from_slice(&c.body).unwrap();
        assert_eq!(v["messages"][0]["content"], "a\u{fffd}b");
        let e = parse(
            ApiRoute::OpenAiChat,
            HeaderMap::new(),
            Bytes::from_static(raw),
            Instant::now(),
        )
        .unwrap_err();
        assert!(
            matches!(&e, ProxyError::InvalidJson(m) if m.contains("invalid utf-8")),
            "{e:?}"
        );
    }

    #[test]
    fn ollama_chat_streams_by_default_openai_does_not() {
        let c = p(ApiRoute::OllamaChat, r#"{"model":"m","messages":[]}"#).unwrap();
        assert!(c.stream && !c.stream_explicit);
        let c = p(
            ApiRoute::OllamaGenerate,
            r#"{"model":"m","prompt":"x","stream":null}"#,
        )
        .unwrap();
        assert!(c.stream && !c.stream_explicit);
        let c = p(ApiRoute::OllamaChat, r#"{"model":"m","stream":false}"#).unwrap();
        assert!(!c.stream && c.stream_explicit);
        let c = p(ApiRoute::OpenAiChat, r#"{"model":"m","messages":[]}"#).unwrap();
        assert!(!c.stream);
        let c = p(ApiRoute::OpenAiChat, r#"{"model":"m","stream":true}"#).unwrap();
        assert!(c.stream);
        // Embeddings never stream, whatever the body says.
        let c = p(
            ApiRoute::OllamaEmbed,
            r#"{"model":"m","input":"x","stream":true}"#,
        )
        .unwrap();
        assert!(!c.stream);
    }

    #[test]
    fn unloads_are_empty_ollama_requests_with_keep_alive_zero() {
        let unload = |route, body| p(route, body).unwrap().unload;
        assert!(unload(
            ApiRoute::OllamaChat,
            r#"{"model":"m","keep_alive":0}"#
        ));
        assert!(unload(
            ApiRoute::OllamaChat,
            r#"{"model":"m","messages":[ ],"keep_alive":"0s"}"#
        ));
        assert!(unload(
            ApiRoute::OllamaGenerate,
            r#"{"model":"m","prompt":"","keep_alive":"0m"}"#
        ));
        assert!(unload(
            ApiRoute::OllamaGenerate,
            r#"{"model":"m","images":null,"keep_alive":0.0}"#
        ));
        // Something to run, or a keep_alive other than 0: an ordinary request.
        assert!(!unload(
            ApiRoute::OllamaChat,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"keep_alive":0}"#
        ));
        assert!(!unload(
            ApiRoute::OllamaGenerate,
            r#"{"model":"m","prompt":"hi","keep_alive":0}"#
        ));
        assert!(!unload(
            ApiRoute::OllamaGenerate,
            r#"{"model":"m","images":["aGk="],"keep_alive":0}"#
        ));
        assert!(!unload(ApiRoute::OllamaGenerate, r#"{"model":"m"}"#));
        assert!(!unload(
            ApiRoute::OllamaGenerate,
            r#"{"model":"m","keep_alive":"5m"}"#
        ));
        assert!(!unload(
            ApiRoute::OllamaChat,
            r#"{"model":"m","keep_alive":-1}"#
        ));
        // Other routes never unload.
        assert!(!unload(
            ApiRoute::OpenAiChat,
            r#"{"model":"m","keep_alive":0}"#
        ));
        assert!(!unload(
            ApiRoute::OllamaEmbed,
            r#"{"model":"m","keep_alive":0}"#
        ));
    }

    #[test]
    fn body_is_kept_verbatim() {
        let raw = r#"{ "model" : "m",   "messages":[] }"#;
        let c = p(ApiRoute::OllamaChat, raw).unwrap();
        assert_eq!(&c.body[..], raw.as_bytes());
        assert_eq!(c.model, "m");
    }

    #[test]
    fn validation_errors() {
        assert!(matches!(
            p(ApiRoute::OllamaChat, "{nope"),
            Err(ProxyError::InvalidJson(_))
        ));
        assert!(matches!(
            p(ApiRoute::OllamaChat, "[1]"),
            Err(ProxyError::NotAnObject)
        ));
        assert!(matches!(
            p(ApiRoute::OllamaChat, "{}"),
            Err(ProxyError::MissingModel)
        ));
        assert!(matches!(
            p(ApiRoute::OllamaChat, r#"{"model":"  "}"#),
            Err(ProxyError::MissingModel)
        ));
        assert!(matches!(
            p(ApiRoute::OllamaChat, r#"{"model":7}"#),
            Err(ProxyError::InvalidField { field: "model", .. })
        ));
        assert!(matches!(
            p(ApiRoute::OpenAiChat, r#"{"model":"m","stream":"yes"}"#),
            Err(ProxyError::InvalidField {
                field: "stream",
                ..
            })
        ));
    }

    #[test]
    fn show_accepts_name_from_older_clients() {
        let c = p(ApiRoute::OllamaShow, r#"{"name":"llama3"}"#).unwrap();
        assert_eq!((c.model_field, c.model.as_str()), ("name", "llama3"));
        let c = p(ApiRoute::OllamaShow, r#"{"model":"a","name":"b"}"#).unwrap();
        assert_eq!((c.model_field, c.model.as_str()), ("model", "a"));
        assert!(matches!(
            p(ApiRoute::OllamaChat, r#"{"name":"m"}"#),
            Err(ProxyError::MissingModel)
        ));
    }

    #[test]
    fn affinity_key_is_computed() {
        let mut h = HeaderMap::new();
        h.insert("x-session-id", HeaderValue::from_static("s1"));
        let c = parse(
            ApiRoute::OllamaChat,
            h,
            Bytes::from_static(br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#),
            Instant::now(),
        )
        .unwrap();
        assert_eq!(c.affinity_key.as_deref(), Some("m:latest|session:s1"));
        let c = p(
            ApiRoute::OllamaChat,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        assert!(c.affinity_key.unwrap().contains("|conv:"));
    }

    #[tokio::test]
    async fn body_limit() {
        let big = Body::from(vec![b' '; 100]);
        let err = read_body(big, &HeaderMap::new(), 10).await.unwrap_err();
        assert!(matches!(err, ProxyError::BodyTooLarge { limit: 10 }));
        let mut h = HeaderMap::new();
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("1000000"));
        let err = read_body(Body::empty(), &h, 10).await.unwrap_err();
        assert!(matches!(err, ProxyError::BodyTooLarge { .. }));
        let ok = read_body(Body::from("{}"), &HeaderMap::new(), 10)
            .await
            .unwrap();
        assert_eq!(&ok[..], b"{}");
    }

    #[test]
    fn malformed_json_is_rejected_even_in_skipped_values() {
        for body in [
            r#"{"model":"m",}"#,
            r#"{"model":"m"} x"#,
            r#"{"model":"m","options":{"a":[1,}}"#,
            r#"{"model":"m","options":{"a":tru}}"#,
            r#"{"model":"m","x":"bad \q escape"}"#,
            "{\"model\":\"m\",\"x\":\"raw\ncontrol\"}",
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}"#,
            "[1",
            "",
        ] {
            assert!(
                matches!(
                    p(ApiRoute::OllamaChat, body),
                    Err(ProxyError::InvalidJson(_))
                ),
                "{body:?}"
            );
        }
        // Invalid UTF-8 in a value the sidecar never reads (an OpenAI route;
        // Ollama's replace it: invalid_utf8_is_replaced_for_ollama_and_refused_for_openai).
        let mut bytes = br#"{"model":"m","x":""#.to_vec();
        bytes.extend_from_slice(b"\xff\"}");
        assert!(matches!(
            parse(
                ApiRoute::OpenAiChat,
                HeaderMap::new(),
                Bytes::from(bytes),
                Instant::now()
            ),
            Err(ProxyError::InvalidJson(_))
        ));
        for body in ["[]", r#""model""#, "1", "null", "true"] {
            assert!(
                matches!(p(ApiRoute::OllamaChat, body), Err(ProxyError::NotAnObject)),
                "{body:?}"
            );
        }
    }

    #[test]
    fn duplicate_read_fields_are_rejected_other_duplicates_pass() {
        let dup = |route, body| match p(route, body) {
            Err(ProxyError::InvalidField { field, problem }) => {
                assert_eq!(problem, "appears more than once");
                Some(field)
            }
            other => panic!("{body}: {other:?}"),
        };
        assert_eq!(
            dup(ApiRoute::OllamaChat, r#"{"model":"a","model":"b"}"#),
            Some("model")
        );
        // The same key spelt with an escape is the same key.
        assert_eq!(
            dup(ApiRoute::OpenAiChat, r#"{"model":"a","mod\u0065l":"a"}"#),
            Some("model")
        );
        assert_eq!(
            dup(
                ApiRoute::OpenAiChat,
                r#"{"stream":true,"model":"a","stream":false}"#
            ),
            Some("stream")
        );
        assert_eq!(
            dup(
                ApiRoute::OllamaChat,
                r#"{"model":"a","messages":[],"messages":[]}"#
            ),
            Some("messages")
        );
        assert_eq!(
            dup(ApiRoute::OllamaShow, r#"{"name":"a","name":"b"}"#),
            Some("name")
        );
        // keep_alive decides whether the request is an unload.
        assert_eq!(
            dup(
                ApiRoute::OllamaGenerate,
                r#"{"model":"a","keep_alive":0,"keep_alive":"5m"}"#
            ),
            Some("keep_alive")
        );
        // Fields the sidecar does not read are the backend's business.
        let c = p(
            ApiRoute::OllamaChat,
            r#"{"model":"a","think":true,"think":false}"#,
        )
        .unwrap();
        assert_eq!(c.model, "a");
    }

    #[test]
    fn strings_and_literals_are_decoded_like_a_value() {
        let c = p(
            ApiRoute::OpenAiChat,
            "{ \"model\" : \" ll\\u0061ma3\\t\" ,\n \"stream\"\t:  true }",
        )
        .unwrap();
        assert_eq!(c.model, "llama3");
        assert!(c.stream && c.stream_explicit);
        let c = p(ApiRoute::OllamaShow, r#"{"model":null,"name":"x"}"#).unwrap();
        assert_eq!((c.model_field, c.model.as_str()), ("name", "x"));
        assert!(matches!(
            p(ApiRoute::OllamaShow, r#"{"model":["x"],"name":"x"}"#),
            Err(ProxyError::InvalidField { field: "model", .. })
        ));
        assert!(matches!(
            p(ApiRoute::OllamaChat, r#"{"model":"m","stream":"true"}"#),
            Err(ProxyError::InvalidField {
                field: "stream",
                ..
            })
        ));
        assert!(matches!(
            p(ApiRoute::OllamaChat, r#"{"model":"m","stream":0}"#),
            Err(ProxyError::InvalidField {
                field: "stream",
                ..
            })
        ));
    }

    #[test]
    fn body_with_model_replaces_only_the_model_value() {
        let raw = "{\"options\":{\"t\":1.50},\n \"model\" :  \"ll\\u0061ma3\" , \"messages\":[]}";
        let c = p(ApiRoute::OllamaChat, raw).unwrap();
        let out = c.body_with_model("llama3:latest").unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "{\"options\":{\"t\":1.50},\n \"model\" :  \"llama3:latest\" , \"messages\":[]}"
        );
        // Names needing escapes stay valid JSON.
        let out = c.body_with_model("a\"b\\c").unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "a\"b\\c");
        // `/api/show` from older clients: the `name` value is the one.
        let c = p(ApiRoute::OllamaShow, r#"{"name":"x","verbose":true}"#).unwrap();
        let out = c.body_with_model("x:latest").unwrap();
        assert_eq!(&out[..], br#"{"name":"x:latest","verbose":true}"#);
    }

    #[test]
    fn json_object_parses_the_whole_body_on_demand() {
        let c = p(
            ApiRoute::OllamaGenerate,
            r#"{"model":"m","prompt":"p","raw":true,"options":{"temperature":0.5}}"#,
        )
        .unwrap();
        let map = c.json_object().unwrap();
        assert_eq!(map["raw"], true);
        assert_eq!(map["options"]["temperature"], 0.5);
        assert_eq!(map.len(), 4);
        // Well-formed JSON a `Value` cannot hold passes the cheap parse
        // (the backend decides), and fails where the tree is needed.
        let c = p(ApiRoute::OllamaChat, r#"{"model":"m","seed":1e400}"#).unwrap();
        assert!(matches!(c.json_object(), Err(ProxyError::InvalidJson(_))));
    }

    #[test]
    fn huge_conversation_parses_only_its_opening() {
        // Later turns hold a number no `Value` can represent: building the
        // tree would fail, so a key computed at all proves they were only
        // skipped, and it equals the key of the opening alone.
        let opening = r#"{"role":"system","content":"be brief"},{"role":"user","content":"hi"}"#;
        let mut body = format!(r#"{{"model":"m","messages":[{opening}"#);
        for i in 0..20_000 {
            body.push_str(&format!(
                r#",{{"role":"assistant","content":"turn {i} {}","score":1e400}}"#,
                "x".repeat(20)
            ));
        }
        body.push_str("]}");
        assert!(serde_json::from_str::<Value>(&body).is_err());
        let big = p(ApiRoute::OllamaChat, &body).unwrap();
        let small = p(
            ApiRoute::OllamaChat,
            &format!(r#"{{"model":"m","messages":[{opening}]}}"#),
        )
        .unwrap();
        assert!(big.affinity_key.is_some());
        assert_eq!(big.affinity_key, small.affinity_key);
        assert_eq!(&big.body[..], body.as_bytes());
    }
}
