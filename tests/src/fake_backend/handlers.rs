//! Routes of the fake and the phases every request goes through.
//!
//! Inference requests: read body → count/record → in-flight guard → injected
//! failure → auth → validate (400/404) → gate → delay → reply. Listing and
//! health requests: count/record → probe failure → auth → reply. Error bodies
//! for every status are built in one place ([`error_response`]) in the shape
//! of the route's API ([`ErrorStyle`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, head, post};
use bytes::Bytes;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Value, json};

use super::render::{self, Reply, ReplyCtx, StreamReply};
use super::server::ConnCtx;
use super::state::{RequestGuard, Shared};
use super::{FailureMode, FakeConfig, FakeMode};

/// Largest request body the fake reads (images in chat requests can be big).
const MAX_BODY: usize = 64 * 1024 * 1024;

/// Every route the fake can serve; statistics are kept per route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Route {
    Root,
    Tags,
    Ps,
    Version,
    Show,
    Chat,
    Generate,
    Embed,
    EmbeddingsLegacy,
    V1Chat,
    V1Completions,
    V1Embeddings,
    V1Models,
    V1Responses,
    V1Messages,
    V1CountTokens,
    Health,
    Pull,
    Push,
    Create,
    Copy,
    Delete,
}

impl Route {
    pub(super) const COUNT: usize = 22;
    const ALL: [Route; Route::COUNT] = [
        Route::Root,
        Route::Tags,
        Route::Ps,
        Route::Version,
        Route::Show,
        Route::Chat,
        Route::Generate,
        Route::Embed,
        Route::EmbeddingsLegacy,
        Route::V1Chat,
        Route::V1Completions,
        Route::V1Embeddings,
        Route::V1Models,
        Route::V1Responses,
        Route::V1Messages,
        Route::V1CountTokens,
        Route::Health,
        Route::Pull,
        Route::Push,
        Route::Create,
        Route::Copy,
        Route::Delete,
    ];

    pub(super) fn index(self) -> usize {
        self as usize
    }

    pub(super) fn path(self) -> &'static str {
        match self {
            Route::Root => "/",
            Route::Tags => "/api/tags",
            Route::Ps => "/api/ps",
            Route::Version => "/api/version",
            Route::Show => "/api/show",
            Route::Chat => "/api/chat",
            Route::Generate => "/api/generate",
            Route::Embed => "/api/embed",
            Route::EmbeddingsLegacy => "/api/embeddings",
            Route::V1Chat => "/v1/chat/completions",
            Route::V1Completions => "/v1/completions",
            Route::V1Embeddings => "/v1/embeddings",
            Route::V1Models => "/v1/models",
            Route::V1Responses => "/v1/responses",
            Route::V1Messages => "/v1/messages",
            Route::V1CountTokens => "/v1/messages/count_tokens",
            Route::Health => "/health",
            Route::Pull => "/api/pull",
            Route::Push => "/api/push",
            Route::Create => "/api/create",
            Route::Copy => "/api/copy",
            Route::Delete => "/api/delete",
        }
    }

    pub(super) fn from_path(path: &str) -> Option<Route> {
        Route::ALL.into_iter().find(|r| r.path() == path)
    }

    fn is_get(self) -> bool {
        matches!(
            self,
            Route::Root
                | Route::Tags
                | Route::Ps
                | Route::Version
                | Route::V1Models
                | Route::Health
        )
    }

    /// Model management (see [`super::manage`]); served in Ollama mode.
    fn is_management(self) -> bool {
        matches!(
            self,
            Route::Pull | Route::Push | Route::Create | Route::Copy | Route::Delete
        )
    }

    fn is_probe(self) -> bool {
        self.is_get() || self == Route::Show
    }

    fn needs_auth(self) -> bool {
        !matches!(self, Route::Root | Route::Health)
    }

    fn is_v1(self) -> bool {
        matches!(
            self,
            Route::V1Chat
                | Route::V1Completions
                | Route::V1Embeddings
                | Route::V1Models
                | Route::V1Responses
                | Route::V1Messages
                | Route::V1CountTokens
        )
    }

    /// Native Ollama routes stream unless told not to; OpenAI routes do not.
    fn streams_by_default(self) -> bool {
        matches!(self, Route::Chat | Route::Generate)
    }

    fn served_in(self, mode: FakeMode, no_completions: bool) -> bool {
        if self == Route::V1Completions && no_completions {
            return false;
        }
        match mode {
            // Ollama serves `/v1/messages` but not its token count.
            FakeMode::Ollama => self != Route::Health && self != Route::V1CountTokens,
            FakeMode::OpenAi => self.is_v1(),
            FakeMode::LlamaServer => self.is_v1() || self == Route::Health,
        }
    }
}

/// Build the router for a configuration: its mode, `no_completions` and
/// `version`.
pub(super) fn router(shared: Arc<Shared>, config: &FakeConfig) -> Router {
    let mode = config.mode;
    let mut router = Router::new();
    for route in Route::ALL {
        if !route.served_in(mode, config.no_completions) {
            continue;
        }
        let s = shared.clone();
        if route == Route::Version {
            // Answers the configured version; without one the route is not
            // served (404, as from a server that lacks it).
            let Some(version) = &config.version else {
                continue;
            };
            let body = Arc::new(json!({ "version": version }));
            router = router.route(
                route.path(),
                get(move |req: Request| version_reply(s.clone(), body.clone(), req)),
            );
            continue;
        }
        let handler = move |req: Request| dispatch(s.clone(), route, req);
        router = if route.is_get() {
            router.route(route.path(), get(handler))
        } else if route == Route::Delete {
            router.route(route.path(), delete(handler))
        } else {
            router.route(route.path(), post(handler))
        };
    }
    if mode == FakeMode::Ollama {
        let (h, p) = (shared.clone(), shared.clone());
        router = router.route(
            "/api/blobs/{digest}",
            head(move |req: Request| super::manage::blob_head(h.clone(), req))
                .post(move |req: Request| super::manage::blob_post(p.clone(), req)),
        );
    }
    if Route::V1Responses.served_in(mode, config.no_completions) {
        router = router.merge(super::stored::router(&shared));
    }
    let s = shared.clone();
    router.fallback(move |req: Request| not_found(s.clone(), req))
}

async fn not_found(shared: Arc<Shared>, req: Request) -> Response {
    let (parts, _body) = req.into_parts();
    shared.note_request(None, &parts, &Bytes::new());
    let mut resp = (StatusCode::NOT_FOUND, "404 page not found").into_response();
    resp.headers_mut()
        .insert("x-fake-backend", shared.label.clone());
    resp
}

async fn dispatch(shared: Arc<Shared>, route: Route, req: Request) -> Response {
    let mut resp = if route.is_probe() {
        probe(&shared, route, req).await
    } else if route.is_management() {
        super::manage::serve(&shared, route, req).await
    } else {
        inference(&shared, route, req).await
    };
    resp.headers_mut()
        .insert("x-fake-backend", shared.label.clone());
    resp
}

// ---- errors ---------------------------------------------------------------

/// The error body shape of a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ErrorStyle {
    /// `{"error":"text"}`.
    Ollama,
    /// Ollama `/v1`: `{"error":{message,type,param:null,code:null}}`.
    OllamaV1,
    /// vLLM-like: `{"error":{message,type,param,code:<int>}}`.
    OpenAi,
    /// llama-server: `{"error":{code:<int>,message,type}}`.
    Llama,
}

impl ErrorStyle {
    pub(super) fn of(mode: FakeMode, route: Route) -> ErrorStyle {
        match mode {
            FakeMode::Ollama if route.is_v1() => ErrorStyle::OllamaV1,
            FakeMode::Ollama => ErrorStyle::Ollama,
            FakeMode::OpenAi => ErrorStyle::OpenAi,
            FakeMode::LlamaServer => ErrorStyle::Llama,
        }
    }
}

/// Every error the fake answers.
#[derive(Clone, Debug)]
pub(super) enum ApiError {
    BadRequest(String),
    Unauthorized,
    ModelNotFound(String),
    /// No stored response with this id.
    NoResponse(String),
    /// An injected failure with this status.
    Injected(u16),
    /// An injected error inside a stream (always reported as 500).
    MidStream,
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::ModelNotFound(_) | ApiError::NoResponse(_) => StatusCode::NOT_FOUND,
            ApiError::Injected(code) => {
                StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
            ApiError::MidStream => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn message(&self, style: ErrorStyle) -> String {
        match (self, style) {
            (ApiError::BadRequest(m), _) => m.clone(),
            (ApiError::Unauthorized, ErrorStyle::Llama) => "Invalid API Key".to_owned(),
            (ApiError::Unauthorized, _) => "Invalid API key".to_owned(),
            (ApiError::ModelNotFound(m), ErrorStyle::Ollama | ErrorStyle::Llama) => {
                format!("model '{m}' not found")
            }
            (ApiError::ModelNotFound(m), ErrorStyle::OllamaV1) => {
                format!("model \"{m}\" not found, try pulling it first")
            }
            (ApiError::ModelNotFound(m), ErrorStyle::OpenAi) => {
                format!("The model `{m}` does not exist.")
            }
            (ApiError::NoResponse(id), _) => format!("No response found with id '{id}'."),
            (ApiError::Injected(503), ErrorStyle::Ollama | ErrorStyle::OllamaV1) => {
                "server busy, please try again.  maximum pending requests exceeded".to_owned()
            }
            (ApiError::Injected(503), ErrorStyle::Llama) => "Loading model".to_owned(),
            (ApiError::Injected(code), _) => format!("fake backend failure (status {code})"),
            (ApiError::MidStream, _) => {
                "fake backend failure in the middle of the stream".to_owned()
            }
        }
    }

    /// The JSON error object in a style.
    pub(super) fn body(&self, style: ErrorStyle) -> Value {
        let status = self.status().as_u16();
        let message = self.message(style);
        match style {
            ErrorStyle::Ollama => json!({ "error": message }),
            ErrorStyle::OllamaV1 => {
                let kind = match status {
                    400 => "invalid_request_error",
                    404 => "not_found_error",
                    _ => "api_error",
                };
                json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
            }
            ErrorStyle::OpenAi => {
                let kind = match status {
                    400 => "BadRequestError",
                    401 => "AuthenticationError",
                    404 => "NotFoundError",
                    429 => "RateLimitError",
                    503 => "ServiceUnavailableError",
                    _ => "InternalServerError",
                };
                let param = match self {
                    ApiError::ModelNotFound(_) => json!("model"),
                    _ => Value::Null,
                };
                json!({"error": {"message": message, "type": kind, "param": param, "code": status}})
            }
            ErrorStyle::Llama => {
                let kind = match status {
                    400 => "invalid_request_error",
                    401 => "authentication_error",
                    404 => "not_found_error",
                    501 => "not_supported_error",
                    503 => "unavailable_error",
                    _ => "server_error",
                };
                json!({"error": {"code": status, "message": message, "type": kind}})
            }
        }
    }
}

pub(super) fn error_response(style: ErrorStyle, err: &ApiError) -> Response {
    json_response(err.status(), &err.body(style))
}

pub(super) fn json_response(status: StatusCode, body: &Value) -> Response {
    let bytes = Bytes::from(body.to_string());
    let mut resp = Response::new(Body::from(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

// ---- probes ---------------------------------------------------------------

#[derive(Deserialize, Default)]
struct ShowBody {
    model: Option<String>,
    name: Option<String>,
}

/// `GET /api/version`: the probe phases, then `body` (the configured
/// version).
async fn version_reply(shared: Arc<Shared>, body: Arc<Value>, req: Request) -> Response {
    let mut resp = match probe_phases(&shared, Route::Version, req).await {
        Ok(_) => json_response(StatusCode::OK, &body),
        Err(refused) => refused,
    };
    resp.headers_mut()
        .insert("x-fake-backend", shared.label.clone());
    resp
}

/// What every probe request goes through before its answer: the body is
/// read and the request recorded, then an injected probe failure or a
/// missing key refuses it (`Err`, the refusal). `Ok` is the body.
async fn probe_phases(shared: &Shared, route: Route, req: Request) -> Result<Bytes, Response> {
    let style = ErrorStyle::of(shared.mode, route);
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .unwrap_or_default();
    shared.note_request(Some(route), &parts, &bytes);

    let failure = *shared.probe_failure.lock();
    match failure {
        FailureMode::None => {}
        FailureMode::Status(code) => return Err(error_response(style, &ApiError::Injected(code))),
        FailureMode::MidStreamError | FailureMode::MidStreamDrop | FailureMode::MidLineDrop => {
            return Err(error_response(style, &ApiError::Injected(500)));
        }
        FailureMode::Reset => return Err(abort(&parts).await),
        FailureMode::Hang => return Err(hang().await),
    }
    if route.needs_auth() && !shared.authorized(&parts) {
        return Err(error_response(style, &ApiError::Unauthorized));
    }
    Ok(bytes)
}

async fn probe(shared: &Arc<Shared>, route: Route, req: Request) -> Response {
    let style = ErrorStyle::of(shared.mode, route);
    let bytes = match probe_phases(shared, route, req).await {
        Ok(bytes) => bytes,
        Err(refused) => return refused,
    };

    match route {
        Route::Root => "Ollama is running".into_response(),
        Route::Tags => json_response(StatusCode::OK, &render::tags(shared)),
        Route::Ps => json_response(StatusCode::OK, &render::ps(shared)),
        Route::V1Models => json_response(StatusCode::OK, &render::v1_models(shared)),
        Route::Health => json_response(StatusCode::OK, &json!({"status": "ok"})),
        Route::Show => {
            let parsed: ShowBody = match serde_json::from_slice(&bytes) {
                Ok(b) => b,
                Err(e) => return error_response(style, &ApiError::BadRequest(e.to_string())),
            };
            let Some(name) = parsed.model.or(parsed.name) else {
                return error_response(style, &ApiError::BadRequest("model is required".into()));
            };
            match shared.resolve(&name) {
                Some(resolved) => json_response(StatusCode::OK, &render::show(shared, &resolved)),
                None => error_response(style, &ApiError::ModelNotFound(name)),
            }
        }
        _ => error_response(style, &ApiError::BadRequest("not a probe route".into())),
    }
}

/// The answer of an injected failure that ends a request before its reply
/// (a status, a reset, a hang), completing the request's `guard` if it has
/// one; `None` when the request goes on (no failure, or one that strikes
/// mid-stream).
pub(super) async fn injected_refusal(
    failure: FailureMode,
    style: ErrorStyle,
    guard: Option<&mut RequestGuard>,
    parts: &axum::http::request::Parts,
) -> Option<Response> {
    let complete = || {
        if let Some(guard) = guard {
            guard.complete();
        }
    };
    match failure {
        FailureMode::None
        | FailureMode::MidStreamError
        | FailureMode::MidStreamDrop
        | FailureMode::MidLineDrop => None,
        FailureMode::Status(code) => {
            complete();
            Some(error_response(style, &ApiError::Injected(code)))
        }
        FailureMode::Reset => {
            complete();
            Some(abort(parts).await)
        }
        FailureMode::Hang => Some(hang().await),
    }
}

pub(super) async fn abort(parts: &axum::http::request::Parts) -> Response {
    match parts.extensions.get::<ConnCtx>() {
        Some(conn) => match conn.abort().await {},
        // Not reachable: the accept loop puts a ConnCtx on every request.
        None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

pub(super) async fn hang() -> Response {
    std::future::pending::<Infallible>().await;
    // Unreachable: `pending` never completes.
    StatusCode::INTERNAL_SERVER_ERROR.into_response()
}

// ---- inference --------------------------------------------------------------

#[derive(Deserialize, Default)]
pub(super) struct StreamOptions {
    #[serde(default)]
    pub(super) include_usage: Option<bool>,
}

/// The fields of an inference request the fake looks at; the rest is ignored.
#[derive(Deserialize, Default)]
pub(super) struct InferBody {
    pub(super) model: Option<String>,
    pub(super) stream: Option<bool>,
    pub(super) stream_options: Option<StreamOptions>,
    pub(super) messages: Option<Vec<IgnoredAny>>,
    pub(super) prompt: Option<Value>,
    pub(super) input: Option<Value>,
    pub(super) keep_alive: Option<Value>,
    pub(super) previous_response_id: Option<String>,
    pub(super) store: Option<bool>,
}

async fn inference(shared: &Arc<Shared>, route: Route, req: Request) -> Response {
    let started = Instant::now();
    let style = ErrorStyle::of(shared.mode, route);
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => {
            shared.note_request(Some(route), &parts, &Bytes::new());
            return error_response(
                style,
                &ApiError::BadRequest(format!("cannot read body: {e}")),
            );
        }
    };
    shared.note_request(Some(route), &parts, &bytes);
    let parsed = serde_json::from_slice::<InferBody>(&bytes);
    let requested = parsed.as_ref().ok().and_then(|b| b.model.clone());
    let key = requested
        .as_deref()
        .map(|m| shared.stats_key(m))
        .unwrap_or_default();
    let mut guard = RequestGuard::new(shared.clone(), key);

    let failure = shared.take_failure();
    if let Some(refused) = injected_refusal(failure, style, Some(&mut guard), &parts).await {
        return refused;
    }

    if route.needs_auth() && !shared.authorized(&parts) {
        guard.complete();
        return error_response(style, &ApiError::Unauthorized);
    }
    let body = match parsed {
        Ok(b) => b,
        Err(e) => {
            guard.complete();
            return error_response(style, &ApiError::BadRequest(format!("invalid JSON: {e}")));
        }
    };
    let Some(model) = requested else {
        guard.complete();
        return error_response(style, &ApiError::BadRequest("model is required".into()));
    };
    let Some(resolved) = shared.resolve(&model) else {
        guard.complete();
        return error_response(style, &ApiError::ModelNotFound(model));
    };
    if route == Route::V1Responses
        && let Some(previous) = body.previous_response_id.as_deref()
        && !shared.has_response(previous)
    {
        guard.complete();
        return error_response(
            style,
            &ApiError::BadRequest(format!("Previous response with id '{previous}' not found.")),
        );
    }

    shared.gate.pass().await;
    let delay = shared.delay();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    shared.note_served(&resolved);

    let stream = body.stream.unwrap_or(route.streams_by_default());
    let include_usage = body
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let script = shared.effective_reply();
    let ctx = ReplyCtx {
        shared,
        model: &model,
        started,
        script: &script,
        id: shared.next_id(),
        created: render::unix_now(),
        chunk_delay: shared.chunk_delay(),
    };

    let reply = match route {
        Route::Chat | Route::Generate => {
            let chat = route == Route::Chat;
            let empty = if chat {
                body.messages.as_ref().is_none_or(Vec::is_empty)
            } else {
                body.prompt
                    .as_ref()
                    .is_none_or(|p| p.as_str().is_some_and(str::is_empty))
            };
            if empty {
                let unload = body.keep_alive.as_ref().is_some_and(is_zero_keep_alive);
                shared.set_loaded(&resolved, !unload);
                Reply::Json(render::ollama_load(&ctx, chat, unload))
            } else {
                render::ollama_reply(&ctx, chat, stream)
            }
        }
        Route::V1Chat => render::openai_chat(&ctx, stream, include_usage),
        Route::V1Completions => render::openai_completion(&ctx, stream, include_usage),
        Route::V1Responses => {
            render::openai_responses(&ctx, stream, body.input.as_ref(), body.store != Some(false))
        }
        Route::V1Messages => render::anthropic_messages(&ctx, stream),
        Route::V1CountTokens => Reply::Json(json!({"input_tokens": ctx.shared.prompt_tokens})),
        Route::Embed | Route::EmbeddingsLegacy | Route::V1Embeddings => {
            match render::embeddings(&ctx, route, &body) {
                Ok(v) => Reply::Json(v),
                Err(msg) => {
                    guard.complete();
                    return error_response(style, &ApiError::BadRequest(msg));
                }
            }
        }
        _ => Reply::Json(json!({})),
    };

    let conn = parts.extensions.get::<ConnCtx>().cloned();
    match reply {
        Reply::Json(value) => match (failure, conn) {
            (FailureMode::MidStreamError, _) => {
                guard.complete();
                error_response(style, &ApiError::MidStream)
            }
            (FailureMode::MidStreamDrop | FailureMode::MidLineDrop, Some(conn)) => {
                truncated_json(&value, guard, conn)
            }
            _ => {
                guard.complete();
                json_response(StatusCode::OK, &value)
            }
        },
        Reply::Stream(plan) => {
            let error_frame = render::stream_error_frame(style, &ApiError::MidStream.body(style));
            stream_response(
                plan,
                failure,
                error_frame,
                (shared.chunk_delay(), shared.end_delay()),
                guard,
                conn,
            )
        }
    }
}

fn is_zero_keep_alive(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s == "0" || s == "0s" || s == "0m",
        _ => false,
    }
}

/// A non-streaming reply whose connection is reset halfway through the body.
fn truncated_json(value: &Value, mut guard: RequestGuard, conn: ConnCtx) -> Response {
    let full = Bytes::from(value.to_string());
    let half = full.slice(..full.len() / 2);
    let len = full.len();
    let body = async_stream::stream! {
        yield Ok::<Bytes, Infallible>(half);
        guard.complete();
        match conn.abort_after_flush().await {}
    };
    let mut resp = Response::new(Body::from_stream(body));
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

/// A streaming reply: frames with `chunk_delay` between them, `end_delay`
/// before the body ends, and the injected mid-stream failure at
/// `plan.fail_at`. The guard lives in the body so a client that goes away
/// mid-stream is counted when hyper drops it.
fn stream_response(
    plan: StreamReply,
    failure: FailureMode,
    error_frame: Bytes,
    (chunk_delay, end_delay): (std::time::Duration, std::time::Duration),
    mut guard: RequestGuard,
    conn: Option<ConnCtx>,
) -> Response {
    let StreamReply {
        content_type,
        frames,
        fail_at,
    } = plan;
    let body = async_stream::stream! {
        for (i, frame) in frames.into_iter().enumerate() {
            if i > 0 && !chunk_delay.is_zero() {
                tokio::time::sleep(chunk_delay).await;
            }
            if i == fail_at {
                match (failure, conn.as_ref()) {
                    (FailureMode::MidStreamError, _) => {
                        yield Ok::<Bytes, Infallible>(error_frame.clone());
                        guard.complete();
                        return;
                    }
                    (FailureMode::MidStreamDrop, Some(conn)) => {
                        guard.complete();
                        match conn.abort_after_flush().await {}
                    }
                    (FailureMode::MidLineDrop, Some(conn)) => {
                        yield Ok::<Bytes, Infallible>(frame.slice(..frame.len() / 2));
                        guard.complete();
                        match conn.abort_after_flush().await {}
                    }
                    _ => {}
                }
            }
            yield Ok::<Bytes, Infallible>(frame);
        }
        if !end_delay.is_zero() {
            tokio::time::sleep(end_delay).await;
        }
        guard.complete();
    };
    let mut resp = Response::new(Body::from_stream(body));
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if content_type == render::SSE {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::super::{FailureMode, FakeBackend, FakeConfig, FakeMode};

    /// `/api/version`'s status and body text.
    async fn version(fake: &FakeBackend) -> (u16, String) {
        let r = reqwest::get(format!("{}/api/version", fake.url()))
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    #[tokio::test]
    async fn api_version_is_configurable() {
        let default = FakeBackend::start(FakeConfig::new(FakeMode::Ollama)).await;
        assert_eq!(
            version(&default).await,
            (
                200,
                format!(r#"{{"version":"{}"}}"#, FakeConfig::DEFAULT_VERSION)
            )
        );
        let old = FakeBackend::start(FakeConfig::new(FakeMode::Ollama).version("0.5.7")).await;
        assert_eq!(
            version(&old).await,
            (200, r#"{"version":"0.5.7"}"#.to_owned())
        );
        assert_eq!(old.request_count("/api/version"), 1);
        // Like every probe route: injected probe failures and the key apply.
        old.set_probe_failure(FailureMode::Status(500));
        assert_eq!(version(&old).await.0, 500);
        old.set_probe_failure(FailureMode::None);
        old.set_api_key(Some("k"));
        assert_eq!(version(&old).await.0, 401);

        let none = FakeBackend::start(
            FakeConfig::new(FakeMode::Ollama)
                .models(&["m:latest"])
                .no_version(),
        )
        .await;
        assert_eq!(version(&none).await.0, 404);
        let tags = reqwest::get(format!("{}/api/tags", none.url()))
            .await
            .unwrap();
        assert_eq!(tags.status(), 200);
    }
}
