//! Parse-and-validate phase: read the body under the size limit, parse the
//! JSON, find the model, settle the stream mode, compute the affinity key,
//! and build the per-request [`RequestContext`].
//!
//! Invariants: the original body bytes are kept untouched (forwarded as-is
//! unless the model name must change); `stream` is decided here once, from
//! the body or the route's default (Ollama: stream; OpenAI: don't).

use std::time::{Instant, SystemTime};

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, header::CONTENT_LENGTH};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::{Map, Value};

use crate::{affinity_key::affinity_key, errors::ProxyError, routes::ApiRoute};

/// Everything later phases need to know about one client request.
#[derive(Clone, Debug)]
pub struct RequestContext {
    /// Which route the client called.
    pub route: ApiRoute,
    /// The model as the client named it.
    pub model: String,
    /// The body field the model came from (`model`, or `name` for old
    /// `/api/show` clients); rewritten there when the backend names the
    /// model differently.
    pub model_field: &'static str,
    /// Effective stream mode.
    pub stream: bool,
    /// Whether the body carried `stream` itself.
    pub stream_explicit: bool,
    /// The body exactly as received.
    pub body: Bytes,
    /// The body parsed.
    pub json: Map<String, Value>,
    /// Conversation-affinity key, if any.
    pub affinity_key: Option<String>,
    /// The client's request headers (forwarded minus hop-by-hop and auth).
    pub headers: HeaderMap,
    /// When the request arrived.
    pub received: Instant,
    /// Wall-clock time at arrival (`created_at` of translated answers).
    pub received_wall: SystemTime,
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

/// Parses and validates a body for `route`.
pub fn parse(
    route: ApiRoute,
    headers: HeaderMap,
    body: Bytes,
    received: Instant,
) -> Result<RequestContext, ProxyError> {
    let value: Value =
        serde_json::from_slice(&body).map_err(|e| ProxyError::InvalidJson(e.to_string()))?;
    let Value::Object(json) = value else {
        return Err(ProxyError::NotAnObject);
    };
    let (model_field, model) = find_model(route, &json)?;
    let (stream, stream_explicit) = stream_mode(route, &json)?;
    let affinity_key = affinity_key(route, &model, &headers, &json);
    Ok(RequestContext {
        route,
        model,
        model_field,
        stream,
        stream_explicit,
        body,
        json,
        affinity_key,
        headers,
        received,
        received_wall: SystemTime::now(),
    })
}

fn find_model(
    route: ApiRoute,
    json: &Map<String, Value>,
) -> Result<(&'static str, String), ProxyError> {
    for field in route.model_fields() {
        match json.get(*field) {
            None | Some(Value::Null) => continue,
            Some(Value::String(s)) if !s.trim().is_empty() => {
                return Ok((field, s.trim().to_owned()));
            }
            Some(Value::String(_)) => continue,
            Some(_) => {
                return Err(ProxyError::InvalidField {
                    field,
                    problem: "must be a string",
                });
            }
        }
    }
    Err(ProxyError::MissingModel)
}

fn stream_mode(route: ApiRoute, json: &Map<String, Value>) -> Result<(bool, bool), ProxyError> {
    if !route.accepts_stream() {
        return Ok((false, false));
    }
    match json.get("stream") {
        None | Some(Value::Null) => Ok((route.default_stream(), false)),
        Some(Value::Bool(b)) => Ok((*b, true)),
        Some(_) => Err(ProxyError::InvalidField {
            field: "stream",
            problem: "must be a boolean",
        }),
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
}
