//! Upstream request building: which URL, which body, which headers.
//!
//! - URL: Ollama-API requests to Ollama backends go to `{url}/api/...`;
//!   OpenAI-API requests go to the endpoint's OpenAI base
//!   ([`openai_base`]: `{url}/v1` for Ollama and llama-server, the configured
//!   `/v1` URL for OpenAI-compatible servers) plus the route.
//! - Body: forwarded byte for byte unless the backend names the model
//!   differently from the client (then only the model field's value is
//!   replaced, in place: [`RequestContext::body_with_model`]). Only a
//!   translated request needs the body as a JSON tree; it is parsed then,
//!   by [`RequestContext::json_object`], and never on the pass-through path.
//! - Headers ("header hygiene"): the client's headers go along except
//!   hop-by-hop headers, `host`, `content-length` (recomputed),
//!   `authorization` (the client's key is for the router, never for the
//!   backend), `accept-encoding` (responses must stay readable for the
//!   stream observers and translators), `expect` (the whole body goes at
//!   once, so no `100 Continue` is wanted) and the session headers. The
//!   endpoint's own API key is added as `Authorization: Bearer`.
//!
//! The clients that send it are in [`super::upstream`].

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue,
    header::{ACCEPT_ENCODING, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, EXPECT, HOST},
};
use std::time::SystemTime;

use serde_json::Value;
use switchyard_control_plane::{
    config::Secret,
    decision::Choice,
    endpoint::{EndpointKind, openai_base},
};

use crate::{
    affinity_key::SESSION_HEADERS,
    errors::ProxyError,
    proxy::request::RequestContext,
    routes::ApiRoute,
    translate::{
        Plan, Target, Thinking, chat,
        embed::{self, EmbedApi},
        generate::{self, GenerateRoute},
        listing,
    },
};

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the legacy ones proxies drop.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The OpenAI route path under the OpenAI base, for OpenAI-API routes.
fn openai_path(route: ApiRoute) -> Option<&'static str> {
    match route {
        ApiRoute::OpenAiChat => Some("/chat/completions"),
        ApiRoute::OpenAiCompletions => Some("/completions"),
        ApiRoute::OpenAiEmbeddings => Some("/embeddings"),
        ApiRoute::OpenAiResponses => Some("/responses"),
        ApiRoute::AnthropicMessages => Some("/messages"),
        ApiRoute::AnthropicCountTokens => Some("/messages/count_tokens"),
        ApiRoute::Rerank | ApiRoute::RerankAlias => Some("/rerank"),
        ApiRoute::OllamaChat
        | ApiRoute::OllamaGenerate
        | ApiRoute::OllamaEmbed
        | ApiRoute::OllamaEmbeddings
        | ApiRoute::OllamaShow => None,
    }
}

/// The pass-through URL for `route` on the chosen endpoint, or `None` when
/// the route needs translation for this endpoint (Ollama API to an
/// OpenAI-only backend).
pub fn passthrough_url(route: ApiRoute, endpoint: &str, kind: EndpointKind) -> Option<String> {
    match openai_path(route) {
        Some(path) => Some(joined(&openai_base(endpoint, kind), path)),
        None if kind.is_openai_only() => None,
        None => Some(joined(endpoint.trim_end_matches('/'), route.path())),
    }
}

/// The URL for a translated request (`path` relative to the OpenAI base).
pub fn translated_url(endpoint: &str, kind: EndpointKind, path: &str) -> String {
    joined(&openai_base(endpoint, kind), path)
}

/// `base` + `path` in one allocation, without the formatting machinery
/// (this runs on every request).
fn joined(base: &str, path: &str) -> String {
    let mut url = String::with_capacity(base.len() + path.len());
    url.push_str(base);
    url.push_str(path);
    url
}

/// How the backend's answer is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handling {
    /// Same API on both sides: bytes pass unchanged (observed for tokens).
    PassThrough,
    /// Ollama `/api/chat` answered by `/v1/chat/completions`.
    Chat(Thinking),
    /// Ollama `/api/generate` answered by `/v1/completions` or chat.
    Generate(Thinking),
    /// Ollama `/api/embed` or `/api/embeddings` answered by `/v1/embeddings`.
    Embed(EmbedApi),
}

impl Handling {
    /// Whether a translated answer passes reasoning on (only chat and
    /// generate carry a choice; nothing else has reasoning to drop).
    pub fn thinking(self) -> Thinking {
        match self {
            Self::Chat(thinking) | Self::Generate(thinking) => thinking,
            Self::Embed(_) | Self::PassThrough => Thinking::Shown,
        }
    }
}

/// A request ready to send to the chosen backend.
#[derive(Clone, Debug)]
pub struct UpstreamCall {
    /// Full URL.
    pub url: String,
    /// Body bytes.
    pub body: Bytes,
    /// Request headers (already cleaned, backend key added).
    pub headers: HeaderMap,
    /// Whether the answer is a stream.
    pub stream: bool,
    /// How to handle the answer.
    pub handling: Handling,
}

/// What the forward phase decided for one attempt.
#[derive(Clone, Debug)]
pub enum Planned {
    /// Send this to the backend.
    Send(UpstreamCall),
    /// Answer locally without contacting the backend (Ollama load/unload
    /// and empty-input requests for OpenAI-only backends, `/api/show` for
    /// a model only an OpenAI-only backend serves).
    Local(Value),
}

/// Which OpenAI route serves `/api/generate` on an OpenAI-only backend.
/// Ollama applies the model's template to a prompt that is not `raw`;
/// over the OpenAI API only chat applies one (the backend's chat template),
/// so chat serves it, with `system` as a system message. A `raw` prompt is
/// already templated and needs the completions route (chat would template
/// it twice). A `suffix` (fill-in-the-middle) has no place in chat:
/// llama-server, which always has `/v1/completions`, gets it there and
/// answers it or refuses it; other OpenAI-compatible servers (hosted APIs
/// often lack completions for chat models) get chat without it.
fn generate_route(kind: EndpointKind, body: &Value) -> GenerateRoute {
    let raw = body.get("raw").and_then(Value::as_bool).unwrap_or(false);
    let suffix = body
        .get("suffix")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty());
    match kind {
        _ if raw => GenerateRoute::Completions,
        EndpointKind::LlamaServer if suffix => GenerateRoute::Completions,
        EndpointKind::LlamaServer | EndpointKind::OpenAi | EndpointKind::Ollama => {
            GenerateRoute::Chat
        }
    }
}

/// Plans the upstream request for one attempt on `choice`.
pub fn plan(
    ctx: &RequestContext,
    choice: &Choice,
    api_key: Option<&Secret>,
) -> Result<Planned, ProxyError> {
    let kind = choice.endpoint_kind;
    let headers = upstream_headers(&ctx.headers, api_key);
    if let Some(url) = passthrough_url(ctx.route, &choice.endpoint, kind) {
        return Ok(Planned::Send(UpstreamCall {
            url,
            body: passthrough_body(ctx, choice)?,
            headers,
            stream: ctx.stream,
            handling: Handling::PassThrough,
        }));
    }
    // Ollama API to an OpenAI-only backend: translate.
    let target = Target {
        kind,
        model: &choice.backend_model,
    };
    let body = || ctx.json_object().map(Value::Object);
    let (plan, handling) = match ctx.route {
        ApiRoute::OllamaChat => {
            let body = body()?;
            (
                chat::chat_request(&body, &target)?,
                Handling::Chat(Thinking::requested(&body)),
            )
        }
        ApiRoute::OllamaGenerate => {
            let body = body()?;
            (
                generate::generate_request(&body, &target, generate_route(kind, &body))?,
                Handling::Generate(Thinking::requested(&body)),
            )
        }
        ApiRoute::OllamaEmbed => (
            embed::embed_request(&body()?, &target, EmbedApi::Embed)?,
            Handling::Embed(EmbedApi::Embed),
        ),
        ApiRoute::OllamaEmbeddings => (
            embed::embed_request(&body()?, &target, EmbedApi::Embeddings)?,
            Handling::Embed(EmbedApi::Embeddings),
        ),
        ApiRoute::OllamaShow => {
            return Ok(Planned::Local(listing::show_response(
                &choice.backend_model,
                kind,
                SystemTime::now(),
            )));
        }
        ApiRoute::OpenAiChat
        | ApiRoute::OpenAiCompletions
        | ApiRoute::OpenAiEmbeddings
        | ApiRoute::OpenAiResponses
        | ApiRoute::AnthropicMessages
        | ApiRoute::AnthropicCountTokens
        | ApiRoute::Rerank
        | ApiRoute::RerankAlias => {
            return Err(ProxyError::Internal(format!(
                "no upstream URL for {} on a {kind} endpoint",
                ctx.route.path()
            )));
        }
    };
    match plan {
        Plan::Local(reply) => Ok(Planned::Local(reply.render(&ctx.model, SystemTime::now()))),
        Plan::Forward(out) => {
            let body = serde_json::to_vec(&out.body)
                .map(Bytes::from)
                .map_err(|e| {
                    ProxyError::Internal(format!("cannot serialize translated body: {e}"))
                })?;
            Ok(Planned::Send(UpstreamCall {
                url: translated_url(&choice.endpoint, kind, out.route.path()),
                body,
                headers,
                stream: out.stream,
                handling,
            }))
        }
    }
}

/// The body to forward: the original bytes when the backend knows the model
/// by the client's name as sent ([`name_for_backend`]), otherwise the body
/// with the model field's value replaced (no JSON tree either way).
pub fn passthrough_body(ctx: &RequestContext, choice: &Choice) -> Result<Bytes, ProxyError> {
    let name = name_for_backend(&ctx.model, choice);
    if name == ctx.model && !ctx.model_padded {
        return Ok(ctx.body.clone());
    }
    ctx.body_with_model(name)
}

/// The model name to send: the backend's own, except that an Ollama backend
/// gets an untagged name as the client wrote it (`llama3` for its
/// `llama3:latest`). Ollama resolves the tag itself and answers with the
/// name it was sent, so the client sees its own name, as it would from
/// Ollama directly.
fn name_for_backend<'a>(client: &'a str, choice: &'a Choice) -> &'a str {
    let backend = &*choice.backend_model;
    let untagged_latest = !client.contains(':')
        && backend
            .strip_suffix(":latest")
            .is_some_and(|base| base == client);
    if choice.endpoint_kind == EndpointKind::Ollama && untagged_latest {
        client
    } else {
        backend
    }
}

fn is_dropped_request_header(name: &HeaderName) -> bool {
    let n = name.as_str();
    HOP_BY_HOP.contains(&n)
        || name == HOST
        || name == CONTENT_LENGTH
        || name == AUTHORIZATION
        || name == ACCEPT_ENCODING
        || name == CONTENT_TYPE
        // The sidecar sends the whole body at once: asking the backend
        // for a 100 Continue first would only add an interim answer.
        || name == EXPECT
        || SESSION_HEADERS.contains(&n)
        || n == crate::auth::X_API_KEY
}

/// Headers named in the client's `Connection` header are hop-by-hop too.
fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Request headers for the backend: the client's minus the dropped ones,
/// JSON content type, and the endpoint's key if it has one.
pub fn upstream_headers(client: &HeaderMap, api_key: Option<&Secret>) -> HeaderMap {
    let listed = connection_listed(client);
    let mut out = HeaderMap::with_capacity(client.len() + 2);
    for (name, value) in client {
        if is_dropped_request_header(name) || listed.iter().any(|l| l == name.as_str()) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(key) = api_key
        && let Ok(mut value) = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
    {
        value.set_sensitive(true);
        out.insert(AUTHORIZATION, value);
    }
    out
}

/// Response headers for the client: the backend's minus hop-by-hop headers
/// and `content-length` (the body is re-streamed, possibly with an error
/// chunk appended, so the server frames it).
pub fn response_headers(upstream: &HeaderMap) -> HeaderMap {
    let listed = connection_listed(upstream);
    let mut out = HeaderMap::with_capacity(upstream.len());
    for (name, value) in upstream {
        if HOP_BY_HOP.contains(&name.as_str())
            || name == CONTENT_LENGTH
            || listed.iter().any(|l| l == name.as_str())
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::{sync::Arc, time::Instant};

    use switchyard_control_plane::decision::DecisionReason;

    use super::*;
    use crate::proxy::request::parse;

    fn choice(url: &str, kind: EndpointKind, backend_model: &str) -> Choice {
        Choice {
            endpoint: Arc::from(url),
            endpoint_kind: kind,
            tracking_model: Arc::from(backend_model),
            backend_model: Arc::from(backend_model),
            reason: DecisionReason::LoadedFree,
            lease: None,
            at_limit: false,
        }
    }

    #[test]
    fn urls_per_endpoint_kind() {
        use EndpointKind::*;
        let u = |r, e, k| passthrough_url(r, e, k);
        assert_eq!(
            u(ApiRoute::OllamaChat, "http://o:11434", Ollama).unwrap(),
            "http://o:11434/api/chat"
        );
        assert_eq!(
            u(ApiRoute::OllamaShow, "http://o:11434/", Ollama).unwrap(),
            "http://o:11434/api/show"
        );
        assert_eq!(
            u(ApiRoute::OpenAiChat, "http://o:11434", Ollama).unwrap(),
            "http://o:11434/v1/chat/completions"
        );
        assert_eq!(
            u(ApiRoute::OpenAiEmbeddings, "https://api.x.com/v1", OpenAi).unwrap(),
            "https://api.x.com/v1/embeddings"
        );
        assert_eq!(
            u(ApiRoute::OpenAiCompletions, "http://l:8080", LlamaServer).unwrap(),
            "http://l:8080/v1/completions"
        );
        assert!(u(ApiRoute::OllamaChat, "http://l:8080/v1", LlamaServer).is_none());
        assert!(u(ApiRoute::OllamaEmbed, "https://api.x.com/v1", OpenAi).is_none());
        assert_eq!(
            translated_url("http://l:8080", LlamaServer, "/chat/completions"),
            "http://l:8080/v1/chat/completions"
        );
    }

    #[test]
    fn body_rewritten_only_when_model_differs() {
        let raw = r#"{"model":"llama3",  "messages":[]}"#;
        let ctx = parse(
            ApiRoute::OllamaChat,
            HeaderMap::new(),
            Bytes::from(raw),
            Instant::now(),
        )
        .unwrap();
        let same =
            passthrough_body(&ctx, &choice("http://o", EndpointKind::Ollama, "llama3")).unwrap();
        assert_eq!(&same[..], raw.as_bytes());
        // Ollama resolves the `:latest` itself and answers with the name it
        // was sent: the client's, as from Ollama directly.
        let untagged = passthrough_body(
            &ctx,
            &choice("http://o", EndpointKind::Ollama, "llama3:latest"),
        )
        .unwrap();
        assert_eq!(&untagged[..], raw.as_bytes());
        // Any other difference is the backend's name.
        let other = passthrough_body(
            &ctx,
            &choice("http://o", EndpointKind::Ollama, "Llama3:latest"),
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&other).unwrap();
        assert_eq!(v["model"], "Llama3:latest");
        assert_eq!(v["messages"], Value::Array(vec![]));
        // The stream field is not added: Ollama's default (stream) holds.
        assert!(v.get("stream").is_none());

        let ctx = parse(
            ApiRoute::OllamaShow,
            HeaderMap::new(),
            Bytes::from(r#"{"name":"llama3"}"#),
            Instant::now(),
        )
        .unwrap();
        let b =
            passthrough_body(&ctx, &choice("http://o", EndpointKind::OpenAi, "llama3:8b")).unwrap();
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["name"], "llama3:8b");
        // An OpenAI-compatible backend knows only its own listed name.
        let b = passthrough_body(
            &ctx,
            &choice("http://o", EndpointKind::OpenAi, "llama3:latest"),
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["name"], "llama3:latest");

        // A name with whitespace around it is routed trimmed, and the
        // backend gets the trimmed name too: it knows no `" llama3\t"`.
        let ctx = parse(
            ApiRoute::OpenAiChat,
            HeaderMap::new(),
            Bytes::from(r#"{"model":" llama3\t","messages":[]}"#),
            Instant::now(),
        )
        .unwrap();
        assert_eq!((ctx.model.as_str(), ctx.model_padded), ("llama3", true));
        let b =
            passthrough_body(&ctx, &choice("http://o", EndpointKind::OpenAi, "llama3")).unwrap();
        assert_eq!(&b[..], br#"{"model":"llama3","messages":[]}"#);
    }

    #[test]
    fn rewrite_keeps_every_other_byte() {
        let raw = r#"{"model" : "llama3",  "messages":[],"options":{"temperature":0.50},"z":1}"#;
        let ctx = parse(
            ApiRoute::OllamaChat,
            HeaderMap::new(),
            Bytes::from(raw),
            Instant::now(),
        )
        .unwrap();
        let out = passthrough_body(
            &ctx,
            &choice("http://o", EndpointKind::OpenAi, "llama3:latest"),
        )
        .unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"model" : "llama3:latest",  "messages":[],"options":{"temperature":0.50},"z":1}"#
        );
    }

    fn body_of(planned: Planned) -> (UpstreamCall, Value) {
        let Planned::Send(call) = planned else {
            panic!("answered locally: {planned:?}");
        };
        let body = serde_json::from_slice(&call.body).unwrap();
        (call, body)
    }

    #[test]
    fn translation_gets_the_full_body() {
        let raw = r#"{"model":"qwen","stream":false,"options":{"temperature":0.25,"num_predict":7},
            "messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"},
                        {"role":"assistant","content":"a"},{"role":"user","content":"more"}]}"#;
        let ctx = parse(
            ApiRoute::OllamaChat,
            HeaderMap::new(),
            Bytes::from(raw),
            Instant::now(),
        )
        .unwrap();
        let llama = choice("http://l:8080", EndpointKind::LlamaServer, "qwen-backend");
        let (call, body) = body_of(plan(&ctx, &llama, None).unwrap());
        assert_eq!(call.url, "http://l:8080/v1/chat/completions");
        assert_eq!(call.handling, Handling::Chat(Thinking::Shown));
        assert_eq!(body["model"], "qwen-backend");
        assert_eq!(body["temperature"], 0.25);
        assert_eq!(body["max_tokens"], 7);
        let messages = body["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 4);
        assert_eq!(messages[3]["content"], "more");

        // `raw` (read from the full body) picks the completions route.
        let hosted = choice("https://api.x.com/v1", EndpointKind::OpenAi, "qwen");
        for (raw_flag, path) in [(true, "/completions"), (false, "/chat/completions")] {
            let ctx = parse(
                ApiRoute::OllamaGenerate,
                HeaderMap::new(),
                Bytes::from(format!(
                    r#"{{"model":"qwen","prompt":"hi","raw":{raw_flag},"stream":false}}"#
                )),
                Instant::now(),
            )
            .unwrap();
            let (call, body) = body_of(plan(&ctx, &hosted, None).unwrap());
            assert_eq!(call.url, format!("https://api.x.com/v1{path}"));
            assert_eq!(call.handling, Handling::Generate(Thinking::Shown));
            assert_eq!(body["model"], "qwen");
        }
    }

    #[test]
    fn translation_reports_a_body_no_tree_can_hold() {
        // Passes the cheap parse; the translator needs the tree and gets a
        // 400 as before the parse was made lazy.
        let ctx = parse(
            ApiRoute::OllamaChat,
            HeaderMap::new(),
            Bytes::from(r#"{"model":"qwen","messages":[],"seed":1e400}"#),
            Instant::now(),
        )
        .unwrap();
        let llama = choice("http://l:8080", EndpointKind::LlamaServer, "qwen");
        assert!(matches!(
            plan(&ctx, &llama, None),
            Err(ProxyError::InvalidJson(_))
        ));
        // The pass-through path forwards it untouched.
        let ollama = choice("http://o", EndpointKind::Ollama, "qwen");
        let (call, _) = match plan(&ctx, &ollama, None).unwrap() {
            Planned::Send(call) => (call, ()),
            other => panic!("{other:?}"),
        };
        assert_eq!(call.body, ctx.body);
    }

    #[test]
    fn header_hygiene() {
        let mut client = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer client-key"),
            ("host", "sidecar:12434"),
            ("content-length", "12"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("accept-encoding", "gzip"),
            ("x-session-id", "abc"),
            ("content-type", "text/plain"),
            ("expect", "100-continue"),
            ("user-agent", "ollama-python/0.4"),
            ("traceparent", "00-abc-def-01"),
        ] {
            client.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = upstream_headers(&client, None);
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        for dropped in [
            "authorization",
            "host",
            "content-length",
            "connection",
            "x-private",
            "keep-alive",
            "transfer-encoding",
            "accept-encoding",
            "x-session-id",
            "expect",
        ] {
            assert!(!names.contains(&dropped), "{dropped} forwarded: {names:?}");
        }
        assert_eq!(out["user-agent"], "ollama-python/0.4");
        assert_eq!(out["traceparent"], "00-abc-def-01");
        assert_eq!(out["content-type"], "application/json");

        let key = Secret::new("backend-key");
        let out = upstream_headers(&client, Some(&key));
        assert_eq!(out["authorization"], "Bearer backend-key");
        assert!(out["authorization"].is_sensitive());
        assert_eq!(out.get_all("authorization").iter().count(), 1);
    }

    #[test]
    fn response_header_hygiene() {
        let mut up = HeaderMap::new();
        up.insert(
            "content-type",
            HeaderValue::from_static("application/x-ndjson"),
        );
        up.insert("content-length", HeaderValue::from_static("99"));
        up.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        up.insert("x-request-id", HeaderValue::from_static("r1"));
        let out = response_headers(&up);
        assert_eq!(out["content-type"], "application/x-ndjson");
        assert_eq!(out["x-request-id"], "r1");
        assert!(out.get("content-length").is_none());
        assert!(out.get("transfer-encoding").is_none());
    }
}
