//! Forward-and-stream phase: send one attempt upstream, wait for its answer
//! under the first-byte deadline, and hand the answer to the client.
//!
//! - Nothing reaches the client until the backend has answered 2xx *and*
//!   sent its first body chunk, so every failure up to that point (connect,
//!   timeouts, 5xx/429, an empty or broken first chunk, a 404 saying the
//!   model is missing there) can be retried on another endpoint
//!   ([`Attempt::Retry`]).
//! - Streams are never buffered: each chunk is forwarded (pass-through,
//!   watched by an observer for token counts and in-band errors) or
//!   translated (SSE → NDJSON) as it arrives. Each wait for the next chunk
//!   is bounded by the idle timeout.
//! - Non-stream answers are single JSON objects produced at the end of
//!   generation, so they are read whole (bounded) before the status is sent:
//!   a failure while reading them is still retryable and never becomes a
//!   200 with a cut body.
//! - The lease lives *inside* the response body stream: when the client
//!   goes away hyper drops the body, which drops the upstream response
//!   body (closing that connection: the backend sees the cancel) and the
//!   lease (released as `Cancelled`). Every other end finishes it
//!   explicitly, exactly once.
//! - After the first byte, a failure ends the stream with an error chunk in
//!   the client's format; a panic while streaming ends the stream the same
//!   way.

use std::{
    convert::Infallible,
    panic::AssertUnwindSafe,
    pin::Pin,
    time::{Duration, Instant, SystemTime},
};

use axum::{
    Json,
    body::Body,
    response::{IntoResponse, Response},
};
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue, StatusCode, header::CONTENT_TYPE};
use serde_json::Value;
use switchyard_control_plane::outcome::{Outcome, TokenCounts};
use tokio_util::sync::CancellationToken;

use super::{
    Progress,
    forward::{self, Handling, Planned, UpstreamCall},
    release::{
        SendFailure, StatusClass, StreamStop, TrackedLease, classify_status, describe_body,
        describe_send,
    },
    request::RequestContext,
    upstream::{BodyError, UpstreamBody, UpstreamResponse},
};
use crate::{
    errors::{AttemptFailure, ProxyError, stream_error_chunk},
    framing::WholeFrames,
    metrics::InFlightGuard,
    router::Router,
    routes::{ApiFormat, ApiRoute},
    server::AppState,
    translate::{
        ResponseMeta, TranslateError, UpstreamError, chat, embed, generate,
        observe::{OllamaStreamObserver, OpenAiStreamObserver, observe_answer, response_id_of},
        stream::{SseToNdjson, StreamEnd, StreamMode, StreamTranslator},
        timestamp,
    },
};

/// Largest non-stream answer read into memory (a big embedding batch fits
/// comfortably; anything larger is a misbehaving backend).
pub const MAX_BUFFERED_RESPONSE: usize = 256 * 1024 * 1024;

/// Most bytes of an error body read to build the client's error message.
const MAX_ERROR_BODY: usize = 64 * 1024;

const NDJSON: &str = "application/x-ndjson";
const EVENT_STREAM: &str = "text/event-stream";

/// How one attempt ended.
pub enum Attempt {
    /// The client has its answer (possibly a stream still running).
    Answered(Response),
    /// Failed before anything reached the client; the lease is released.
    Retry(AttemptFailure),
    /// Failed in a way another endpoint will not fix; the lease is released.
    Failed(ProxyError),
}

type Upstream = Pin<Box<dyn Stream<Item = Result<Bytes, BodyError>> + Send>>;

/// The data frames of a backend's response body, as they arrive.
fn body_stream(body: UpstreamBody) -> Upstream {
    Box::pin(http_body_util::BodyDataStream::new(body))
}

fn retry_transport(lease: TrackedLease, outcome: Outcome, detail: String) -> Attempt {
    lease.finish(outcome, TokenCounts::default());
    Attempt::Retry(AttemptFailure::Transport { outcome, detail })
}

fn retry_upstream(lease: TrackedLease, outcome: Outcome, error: UpstreamError) -> Attempt {
    lease.finish(outcome, TokenCounts::default());
    Attempt::Retry(AttemptFailure::Upstream { outcome, error })
}

fn bad_gateway(message: String) -> UpstreamError {
    UpstreamError {
        status: StatusCode::BAD_GATEWAY,
        message,
        error_type: None,
        code: None,
        param: None,
    }
}

/// A 404 naming nothing ([`UpstreamError::is_missing_route`]) says the
/// backend has no such route, not no such model. The client would see only
/// `Not Found`, so name the route the request was sent to (a generate on an
/// OpenAI-API backend needs `/v1/completions`, which chat-only servers
/// lack). The status stays 404.
fn name_missing_route(mut error: UpstreamError, url: &str) -> UpstreamError {
    let path = url
        .parse::<http::Uri>()
        .map_or_else(|_| url.to_owned(), |u| u.path().to_owned());
    error.message = format!("the backend does not serve POST {path} (404 Not Found)");
    error
}

/// Where a Responses API answer's id is pinned: with conversation affinity
/// on, a request continuing the chain (`previous_response_id`) must reach
/// the backend that stored the response.
struct ResponsePin {
    router: Router,
    model: String,
}

impl ResponsePin {
    fn for_request(state: &AppState, ctx: &RequestContext) -> Option<Self> {
        (ctx.route == ApiRoute::OpenAiResponses && state.router().uses_affinity_keys()).then(|| {
            Self {
                router: state.router().clone(),
                model: ctx.model.clone(),
            }
        })
    }

    /// Pins `id` to the lease's endpoint; returns once the pin is in place
    /// (see [`Router::pin_response`]), before the client sees the answer.
    ///
    /// Boxed: the pin's future (a control-plane call in remote mode) is
    /// ~5 KB, and awaited in place it made every request's state machine,
    /// and every stream's, that much bigger, Responses API or not (the
    /// boxed proxy future was ~8.5 KB, copied into its box per request).
    async fn pin(&self, id: &str, lease: &TrackedLease) {
        Box::pin(self.router.pin_response(&self.model, id, lease.choice())).await;
    }

    /// Pins a stream's response id as soon as it shows (`response.created`
    /// opens the stream), before the chunk carrying it is sent on.
    async fn pin_once(pin: &mut Option<Self>, transform: &Transform, lease: &TrackedLease) {
        if let Some(id) = transform.response_id()
            && let Some(p) = pin.take()
        {
            p.pin(id, lease).await;
        }
    }
}

/// Runs one attempt on the endpoint `lease` was taken for.
pub(crate) async fn exchange(
    state: &AppState,
    ctx: &RequestContext,
    lease: TrackedLease,
    progress: &mut Progress,
) -> Attempt {
    let choice = lease.choice().clone();
    let call = match forward::plan(ctx, &choice, state.backend_key(&choice.endpoint)) {
        Ok(Planned::Send(call)) => call,
        Ok(Planned::Local(mut body)) => {
            if ctx.route == ApiRoute::OllamaShow
                && let Some(created) = crate::listing::created_on(
                    state.router(),
                    &choice.endpoint,
                    &choice.backend_model,
                )
                .await
            {
                body["modified_at"] = timestamp::rfc3339_nanos(created).into();
            }
            lease.finish(Outcome::Ok, TokenCounts::default());
            return Attempt::Answered(local_response(ctx.stream, body));
        }
        Err(e) => {
            // The request cannot be expressed for this backend (bad image
            // data, bad `format`, ...): the client's fault.
            lease.finish(Outcome::ClientError, TokenCounts::default());
            return Attempt::Failed(e);
        }
    };
    let timeouts = state.timeouts(choice.endpoint_kind);
    let client = state.clients().get(choice.endpoint_kind);
    let UpstreamCall {
        url,
        body,
        headers,
        stream,
        handling,
    } = call;

    let sent = Instant::now();
    let deadline = tokio::time::Instant::from_std(sent + timeouts.first_byte);
    let send = client.post(&url, headers, body);
    let response = tokio::time::timeout_at(deadline, send).await;
    progress.backend_wait += sent.elapsed();
    let response = match response {
        Err(_) => {
            return retry_transport(
                lease,
                Outcome::FirstByteTimeout,
                format!("no response within {:?}", timeouts.first_byte),
            );
        }
        Ok(Err(e)) => {
            return retry_transport(lease, SendFailure::of(&e).outcome(), describe_send(&e));
        }
        Ok(Ok(r)) => r,
    };

    let status = response.status();
    match classify_status(status) {
        StatusClass::Success => {}
        StatusClass::Retryable(outcome) => {
            let waited = Instant::now();
            let body = read_error_body(response, timeouts.idle).await;
            progress.backend_wait += waited.elapsed();
            return retry_upstream(lease, outcome, UpstreamError::parse(status, &body));
        }
        StatusClass::ClientError => {
            let waited = Instant::now();
            let body = read_error_body(response, timeouts.idle).await;
            progress.backend_wait += waited.elapsed();
            let error = UpstreamError::parse(status, &body);
            if error.is_missing_route() {
                // Another endpoint may serve the route. Nothing is said
                // about the model: released as a client error, so the
                // endpoint stays in the model's other requests' choices.
                let error = name_missing_route(error, &url);
                return retry_upstream(lease, Outcome::ClientError, error);
            }
            if error.is_unsupported() {
                // Likewise for a feature this backend lacks (501): its
                // health and the model's other requests are not affected.
                return retry_upstream(lease, Outcome::ClientError, error);
            }
            if error.is_model_not_found() {
                // The model left this endpoint since it was last probed
                // (deleted, or never pulled there): another endpoint may
                // still have it. The backend is healthy, the request is
                // fine: tried elsewhere, and the control plane avoids this
                // endpoint for this model for a while (not counted against
                // its health).
                return retry_upstream(lease, Outcome::ModelMissing, error);
            }
            lease.finish(Outcome::ClientError, TokenCounts::default());
            if matches!(handling, Handling::PassThrough) && is_error_object(&body) {
                // Same API on both sides: the backend's own error as it
                // sent it, as a success would be (llama.cpp's `n_ctx` and
                // `n_prompt_tokens`, integer codes, vendor fields).
                return Attempt::Answered(backend_error(status, body));
            }
            return Attempt::Failed(ProxyError::Upstream(error));
        }
    }

    let (parts, body) = response.into_parts();
    let upstream_headers = parts.headers;
    let mut upstream = body_stream(body);
    if !stream {
        let waited = Instant::now();
        let read = read_whole(&mut upstream, deadline, timeouts.idle).await;
        progress.backend_wait += waited.elapsed();
        return match read {
            Ok(body) => {
                if let Some(pin) = ResponsePin::for_request(state, ctx)
                    && let Some(id) = response_id_of(&body)
                {
                    pin.pin(&id, &lease).await;
                }
                whole_answer(ctx, lease, handling, status, &upstream_headers, body).await
            }
            Err((outcome, detail)) => retry_transport(lease, outcome, detail),
        };
    }

    // Stream: wait for the first chunk before committing to this endpoint.
    let waited = Instant::now();
    let first = tokio::time::timeout_at(deadline, upstream.next()).await;
    progress.backend_wait += waited.elapsed();
    let first = match first {
        Err(_) => {
            return retry_transport(
                lease,
                Outcome::FirstByteTimeout,
                format!("no stream data within {:?}", timeouts.first_byte),
            );
        }
        Ok(None) => {
            return retry_upstream(
                lease,
                Outcome::BackendError,
                bad_gateway("backend ended the stream before sending anything".into()),
            );
        }
        Ok(Some(Err(e))) => {
            return retry_transport(lease, Outcome::BackendError, describe_body(&e));
        }
        Ok(Some(Ok(bytes))) => bytes,
    };

    let format = ctx.route.format();
    let (transform, headers) = match handling {
        Handling::PassThrough => {
            let mut headers = forward::response_headers(&upstream_headers);
            let default_type = match format {
                ApiFormat::Ollama => NDJSON,
                ApiFormat::OpenAi | ApiFormat::Anthropic => EVENT_STREAM,
            };
            headers
                .entry(CONTENT_TYPE)
                .or_insert(HeaderValue::from_static(default_type));
            let transform = match format {
                ApiFormat::Ollama => {
                    Transform::Ollama(OllamaStreamObserver::new(), WholeFrames::ndjson())
                }
                ApiFormat::OpenAi | ApiFormat::Anthropic => {
                    Transform::OpenAi(OpenAiStreamObserver::new(), WholeFrames::sse())
                }
            };
            (transform, headers)
        }
        Handling::Chat(_) | Handling::Generate(_) => {
            let mode = if matches!(handling, Handling::Chat(_)) {
                StreamMode::Chat
            } else {
                StreamMode::Generate
            };
            let translator =
                StreamTranslator::new(mode, ctx.model.clone(), ctx.received, ctx.received_wall)
                    .with_thinking(handling.thinking());
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(NDJSON));
            (
                Transform::Translate(Box::new(SseToNdjson::new(translator))),
                headers,
            )
        }
        Handling::Embed(_) => {
            lease.finish(Outcome::BackendError, TokenCounts::default());
            return Attempt::Failed(ProxyError::Internal(
                "embeddings answered as a stream".into(),
            ));
        }
    };

    let live = LiveStream {
        lease,
        upstream,
        first,
        transform,
        idle: timeouts.idle,
        format,
        shutdown: state.shutdown_token(),
        in_flight: progress.in_flight.take(),
        pin: ResponsePin::for_request(state, ctx),
    };
    let mut response = Response::new(live.into_body());
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Attempt::Answered(response)
}

/// A local answer: one JSON object, or one NDJSON line for a streaming
/// Ollama request (as Ollama itself answers load/unload requests).
pub(crate) fn local_response(stream: bool, body: Value) -> Response {
    if stream {
        let mut line = body.to_string();
        line.push('\n');
        ([(CONTENT_TYPE, NDJSON)], line).into_response()
    } else {
        Json(body).into_response()
    }
}

/// Handles a complete non-stream answer.
async fn whole_answer(
    ctx: &RequestContext,
    mut lease: TrackedLease,
    handling: Handling,
    status: StatusCode,
    upstream_headers: &HeaderMap,
    body: Bytes,
) -> Attempt {
    if handling == Handling::PassThrough {
        let tokens = match observe_answer(&body, ctx.route.format()) {
            Ok(tokens) => tokens,
            // A 2xx carrying an error object: the backend failed.
            Err(error) => return retry_upstream(lease, Outcome::BackendError, error),
        };
        lease.finish_applied(Outcome::Ok, tokens).await;
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = status;
        *response.headers_mut() = forward::response_headers(upstream_headers);
        return Attempt::Answered(response);
    }
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return retry_upstream(
                lease,
                Outcome::BackendError,
                bad_gateway(format!("backend answered invalid JSON: {e}")),
            );
        }
    };
    let meta = ResponseMeta {
        model: &ctx.model,
        now: SystemTime::now(),
        total_duration: ctx.received.elapsed(),
        thinking: handling.thinking(),
    };
    let converted = match handling {
        Handling::Chat(_) => chat::chat_response(&value, &meta),
        Handling::Generate(_) => generate::generate_response(&value, &meta),
        Handling::Embed(api) => embed::embed_response(&value, &meta, api),
        Handling::PassThrough => Err(TranslateError::BadBackendResponse("unreachable".into())),
    };
    match converted {
        Ok(c) => {
            lease.finish_applied(Outcome::Ok, c.tokens).await;
            Attempt::Answered(Json(c.body).into_response())
        }
        Err(TranslateError::Upstream(e)) => retry_upstream(lease, Outcome::BackendError, e),
        Err(TranslateError::BadBackendResponse(m)) => retry_upstream(
            lease,
            Outcome::BackendError,
            bad_gateway(format!("invalid response from backend: {m}")),
        ),
        Err(e @ TranslateError::BadRequest(_)) => {
            lease.finish(Outcome::ClientError, TokenCounts::default());
            Attempt::Failed(e.into())
        }
    }
}

/// Reads a whole non-stream body: the first chunk by the first-byte
/// deadline, each next one within `idle`, at most [`MAX_BUFFERED_RESPONSE`].
async fn read_whole(
    upstream: &mut Upstream,
    deadline: tokio::time::Instant,
    idle: Duration,
) -> Result<Bytes, (Outcome, String)> {
    // Most answers arrive in one chunk: keep it as is, copy only when a
    // second one follows.
    let mut only: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let mut first = true;
    loop {
        let next = if first {
            tokio::time::timeout_at(deadline, upstream.next()).await
        } else {
            tokio::time::timeout(idle, upstream.next()).await
        };
        match next {
            Err(_) if first => {
                return Err((Outcome::FirstByteTimeout, "no response body in time".into()));
            }
            Err(_) => {
                return Err((
                    Outcome::IdleTimeout,
                    format!("response body stalled for {idle:?}"),
                ));
            }
            Ok(None) => return Ok(only.take().unwrap_or_else(|| buf.freeze())),
            Ok(Some(Err(e))) => return Err((Outcome::BackendError, describe_body(&e))),
            Ok(Some(Ok(chunk))) => {
                let held = only.as_ref().map_or(buf.len(), Bytes::len);
                if held + chunk.len() > MAX_BUFFERED_RESPONSE {
                    return Err((
                        Outcome::BackendError,
                        format!("response larger than {MAX_BUFFERED_RESPONSE} bytes"),
                    ));
                }
                if first {
                    only = Some(chunk);
                } else {
                    if let Some(head) = only.take() {
                        buf.extend_from_slice(&head);
                    }
                    buf.extend_from_slice(&chunk);
                }
                first = false;
            }
        }
    }
}

/// Whether `body` is a whole JSON object with an `error` member: an error
/// in the backend's API shape (a body cut at [`MAX_ERROR_BODY`] is not).
fn is_error_object(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body).is_ok_and(|v| v.get("error").is_some())
}

/// A backend's error answer, passed on unchanged (JSON).
fn backend_error(status: StatusCode, body: Bytes) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Reads up to [`MAX_ERROR_BODY`] bytes of an error answer; whatever
/// arrives before a stall or failure is enough for the message.
async fn read_error_body(response: UpstreamResponse, idle: Duration) -> Bytes {
    let mut body = body_stream(response.into_body());
    let mut buf = BytesMut::new();
    while buf.len() < MAX_ERROR_BODY {
        match tokio::time::timeout(idle, body.next()).await {
            Ok(Some(Ok(chunk))) => buf.extend_from_slice(&chunk),
            Ok(None | Some(Err(_))) | Err(_) => break,
        }
    }
    buf.truncate(MAX_ERROR_BODY);
    buf.freeze()
}

/// What happens to each chunk of a streamed answer.
enum Transform {
    /// Ollama NDJSON passed through in whole lines, observed.
    Ollama(OllamaStreamObserver, WholeFrames),
    /// OpenAI SSE passed through in whole events, observed.
    OpenAi(OpenAiStreamObserver, WholeFrames),
    /// OpenAI SSE translated to Ollama NDJSON.
    Translate(Box<SseToNdjson>),
}

impl Transform {
    /// The bytes to send for a backend chunk.
    fn push(&mut self, chunk: Bytes, now: Instant) -> Bytes {
        match self {
            Self::Ollama(o, frames) => {
                o.push(&chunk);
                frames.push(chunk)
            }
            Self::OpenAi(o, frames) => {
                o.push(&chunk);
                frames.push(chunk)
            }
            Self::Translate(t) => t.push(&chunk, now),
        }
    }

    /// The backend ended the body: last bytes to send and how it ended. A
    /// last frame without its line ending goes on; one the backend did not
    /// finish before its final chunk does not (the error chunk follows).
    fn finish(&mut self, now: Instant) -> (Bytes, StreamEnd) {
        let pass_through = |end: StreamEnd, frames: &mut WholeFrames| {
            let tail = if end == StreamEnd::Truncated {
                Bytes::from_static(frames.close_for_error())
            } else {
                frames.take_held()
            };
            (tail, end)
        };
        match self {
            Self::Ollama(o, frames) => pass_through(o.finish(), frames),
            Self::OpenAi(o, frames) => pass_through(o.finish(), frames),
            Self::Translate(t) => t.finish(now),
        }
    }

    /// The backend failed or stalled: when its final chunk had come, the
    /// rest to send, and the stream has ended well. The final chunk either
    /// went out already (the rest is what followed it, which no longer
    /// matters), or is the frame held back for want of its line ending
    /// (`done:true`, `[DONE]`, `message_stop`).
    fn rest_after_final(&mut self) -> Option<Bytes> {
        if self.complete() {
            return Some(match self {
                Self::Ollama(_, frames) | Self::OpenAi(_, frames) => frames.take_held(),
                Self::Translate(_) => Bytes::new(),
            });
        }
        let (end, frames) = match self {
            Self::Ollama(o, frames) if frames.holds() => (o.finish(), frames),
            Self::OpenAi(o, frames) if frames.holds() => (o.finish(), frames),
            _ => return None,
        };
        (end == StreamEnd::Complete).then(|| frames.take_held())
    }

    /// Whether the stream carried its final chunk with no error before it:
    /// the request succeeded, whatever the connection does next.
    fn ended_cleanly(&self) -> bool {
        match self {
            Self::Ollama(o, _) => o.done_seen() && !o.error_seen(),
            Self::OpenAi(o, _) => o.done_seen() && !o.error_seen(),
            Self::Translate(t) => t.status() == crate::translate::stream::StreamStatus::Done,
        }
    }

    /// Whether the stream already carried its final chunk (a transport
    /// failure after that is harmless).
    fn complete(&self) -> bool {
        match self {
            Self::Ollama(o, _) => o.done_seen(),
            Self::OpenAi(o, _) => o.done_seen(),
            Self::Translate(t) => t.status() == crate::translate::stream::StreamStatus::Done,
        }
    }

    /// The error chunk that ends a failed stream, in the client's framing
    /// (a half frame held back is dropped: the backend failed inside it).
    fn abort(&mut self, format: ApiFormat, message: &str) -> Bytes {
        match self {
            Self::Ollama(_, frames) | Self::OpenAi(_, frames) => {
                let before = frames.close_for_error();
                let chunk = stream_error_chunk(format, message);
                if before.is_empty() {
                    chunk
                } else {
                    [before, &chunk[..]].concat().into()
                }
            }
            Self::Translate(t) => {
                let line = t.abort(message);
                if line.is_empty() {
                    stream_error_chunk(ApiFormat::Ollama, message)
                } else {
                    line
                }
            }
        }
    }

    fn tokens(&self) -> TokenCounts {
        match self {
            Self::Ollama(o, _) => o.tokens(),
            Self::OpenAi(o, _) => o.tokens(),
            Self::Translate(t) => t.tokens(),
        }
    }

    /// The Responses API's response id, when the stream carried one.
    fn response_id(&self) -> Option<&str> {
        match self {
            Self::OpenAi(o, _) => o.response_id(),
            Self::Ollama(..) | Self::Translate(_) => None,
        }
    }
}

/// A streamed answer in progress; owns everything that must be released
/// when the stream ends or is dropped.
struct LiveStream {
    lease: TrackedLease,
    upstream: Upstream,
    first: Bytes,
    transform: Transform,
    idle: Duration,
    format: ApiFormat,
    shutdown: CancellationToken,
    in_flight: Option<InFlightGuard>,
    pin: Option<ResponsePin>,
}

enum Next {
    Chunk(Bytes),
    End,
    Broken(String),
    Stalled,
    Shutdown,
}

impl LiveStream {
    fn into_body(self) -> Body {
        let format = self.format;
        let body = async_stream::stream! {
            let LiveStream { mut lease, mut upstream, first, mut transform, idle, format, shutdown, in_flight, mut pin } = self;
            // Held until the stream ends or is dropped.
            let _in_flight = in_flight;
            let out = transform.push(first, Instant::now());
            after_push(&mut lease, &transform, &mut pin).await;
            if !out.is_empty() {
                yield Ok::<Bytes, Infallible>(out);
            }
            loop {
                let next = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => Next::Shutdown,
                    r = tokio::time::timeout(idle, upstream.next()) => match r {
                        Err(_) => Next::Stalled,
                        Ok(None) => Next::End,
                        Ok(Some(Ok(chunk))) => Next::Chunk(chunk),
                        Ok(Some(Err(e))) => Next::Broken(describe_body(&e)),
                    },
                };
                match next {
                    Next::Chunk(chunk) => {
                        let out = transform.push(chunk, Instant::now());
                        after_push(&mut lease, &transform, &mut pin).await;
                        if !out.is_empty() {
                            yield Ok(out);
                        }
                    }
                    Next::End => {
                        let (tail, end) = transform.finish(Instant::now());
                        if !tail.is_empty() {
                            yield Ok(tail);
                        }
                        if end == StreamEnd::Truncated {
                            yield Ok(stream_error_chunk(
                                if matches!(transform, Transform::Translate(_)) { ApiFormat::Ollama } else { format },
                                "backend ended the stream before it was complete",
                            ));
                        }
                        let stop = StreamStop::Ended(end);
                        // Before the body's end reaches the client.
                        lease.finish_applied(stop.outcome(), transform.tokens()).await;
                        break;
                    }
                    Next::Broken(_) | Next::Stalled if let Some(rest) = transform.rest_after_final() => {
                        // The final chunk came; the backend just closed
                        // untidily.
                        if !rest.is_empty() {
                            yield Ok(rest);
                        }
                        lease.finish_applied(Outcome::Ok, transform.tokens()).await;
                        break;
                    }
                    Next::Broken(detail) => {
                        yield Ok(transform.abort(format, &format!("backend stream failed: {detail}")));
                        lease.finish(StreamStop::Broken.outcome(), transform.tokens());
                        break;
                    }
                    Next::Stalled => {
                        yield Ok(transform.abort(format, &format!("backend sent nothing for {idle:?}")));
                        lease.finish(StreamStop::Stalled.outcome(), transform.tokens());
                        break;
                    }
                    Next::Shutdown => {
                        yield Ok(transform.abort(format, "sidecar is shutting down"));
                        // Dropping the lease releases it as Cancelled,
                        // with the tokens streamed so far.
                        drop(lease);
                        break;
                    }
                }
            }
        };
        let guarded = panic_safe(body, format);
        Body::from_stream(guarded)
    }
}

/// What follows each backend chunk pushed into `transform`, before its
/// output goes to the client: the tokens so far noted, a response id
/// pinned, and, when it was the final chunk (`done:true`, `[DONE]`,
/// `message_stop`, `response.completed`), the lease released. A client may
/// send its next request as soon as it sees that chunk, and a backend
/// holding the connection open afterwards no longer holds the lease; the
/// later `finish` calls do nothing.
async fn after_push(
    lease: &mut TrackedLease,
    transform: &Transform,
    pin: &mut Option<ResponsePin>,
) {
    lease.note_tokens(transform.tokens());
    ResponsePin::pin_once(pin, transform, lease).await;
    if transform.ended_cleanly() {
        lease.finish_applied(Outcome::Ok, transform.tokens()).await;
    }
}

/// Ends a body stream with an error chunk instead of a dropped connection
/// if producing it panics (the stream, and the lease inside it, is dropped
/// during unwinding: released as `Cancelled`).
fn panic_safe<S>(body: S, format: ApiFormat) -> impl Stream<Item = Result<Bytes, Infallible>> + Send
where
    S: Stream<Item = Result<Bytes, Infallible>> + Send,
{
    AssertUnwindSafe(body)
        .catch_unwind()
        .map(move |item| match item {
            Ok(item) => item,
            Err(_) => {
                tracing::error!("panic while streaming a response; stream ended");
                Ok(stream_error_chunk(format, "internal error while streaming"))
            }
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[tokio::test]
    async fn read_whole_joins_chunks_in_order() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        for chunks in [vec![], vec!["{\"a\":1}"], vec!["{\"a\"", ":1", "}"]] {
            let expected: String = chunks.concat();
            let items: Vec<Result<Bytes, BodyError>> = chunks
                .into_iter()
                .map(|c| Ok(Bytes::from_static(c.as_bytes())))
                .collect();
            let mut upstream: Upstream = Box::pin(futures::stream::iter(items));
            let body = read_whole(&mut upstream, deadline, Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(&body[..], expected.as_bytes());
        }
    }

    #[tokio::test]
    async fn a_panicking_stream_ends_with_an_error_chunk() {
        let body = async_stream::stream! {
            yield Ok::<Bytes, Infallible>(Bytes::from_static(b"{\"a\":1}\n"));
            if Instant::now().elapsed() < Duration::from_secs(3600) {
                panic!("boom");
            }
            yield Ok(Bytes::from_static(b"never"));
        };
        let out: Vec<Bytes> = panic_safe(body, ApiFormat::Ollama)
            .map(|r| r.unwrap())
            .collect()
            .await;
        assert_eq!(out.len(), 2);
        assert_eq!(&out[0][..], b"{\"a\":1}\n");
        assert!(
            std::str::from_utf8(&out[1])
                .unwrap()
                .contains("internal error")
        );
    }
}
