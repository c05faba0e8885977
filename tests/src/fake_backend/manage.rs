//! Ollama's model-management routes, imitated (Ollama mode only):
//! `POST /api/pull`, `/api/push`, `/api/create`, `/api/copy`,
//! `DELETE /api/delete`, in the shapes of `api-shapes.md` 1.9.
//!
//! - pull and create add the model to the advertised list (after their
//!   last progress line); copy adds the destination; delete removes the
//!   model. Names without a tag mean `:latest`.
//! - pull, push and create stream progress unless `stream:false`: status
//!   lines, one layer's `digest` lines with `total` and growing `completed`
//!   ([`layer_total`] bytes; `chunk_delay` between lines), then
//!   `{"status":"success"}`; not streamed, only `{"status":"success"}`.
//! - push, copy and delete of a model the fake does not have: 404
//!   `{"error":"model 'x' not found"}`.
//! - Injected failures apply as to inference routes: a status, a reset, a
//!   hang, and mid-stream an `{"error":..}` line (the model is then not
//!   added) or a reset. The request gate holds these requests too, and each
//!   is counted in flight (so a test sees a cancelled pull).
//! - Blobs: `POST /api/blobs/{digest}` stores the body under the digest
//!   (not verified: the tests send what they check) and answers 201;
//!   `HEAD` answers 200 if stored, else 404. Injected statuses and resets
//!   apply.
//! - Every request is recorded with its headers (see
//!   [`super::FakeControl::requests_to`]).

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};

use super::FailureMode;
use super::handlers::{
    ApiError, ErrorStyle, Route, error_response, injected_refusal, json_response,
};
use super::server::ConnCtx;
use super::state::{RequestGuard, Shared};

/// Largest management body read.
const MAX_BODY: usize = 1024 * 1024;
/// Largest blob stored.
const MAX_BLOB: usize = 256 * 1024 * 1024;

/// The size the fake reports for a model's one layer.
pub fn layer_total(model: &str) -> u64 {
    1000 + model.len() as u64
}

/// The digest the fake reports for a model's one layer (stable per name).
pub fn layer_digest(model: &str) -> String {
    // FNV-1a, spread over 64 hex digits.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in model.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("sha256:{h:016x}{h:016x}{h:016x}{h:016x}")
}

/// `x` → `x:latest`; tagged names unchanged.
pub fn canonical(name: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') {
        name.to_owned()
    } else {
        format!("{name}:latest")
    }
}

/// Serves one management request.
pub(super) async fn serve(shared: &Arc<Shared>, route: Route, req: Request) -> Response {
    let style = ErrorStyle::Ollama;
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .unwrap_or_default();
    shared.note_request(Some(route), &parts, &bytes);
    let body: Value = match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Value::Object(map),
        _ => return error_response(style, &ApiError::BadRequest("invalid JSON body".into())),
    };
    let name_field = |fields: &[&str]| {
        fields
            .iter()
            .find_map(|f| body.get(*f).and_then(Value::as_str))
            .map(str::to_owned)
    };
    let model = match route {
        Route::Copy => name_field(&["source"]),
        _ => name_field(&["model", "name"]),
    };
    let Some(model) = model else {
        return error_response(style, &ApiError::BadRequest("model is required".into()));
    };
    let mut guard = RequestGuard::new(shared.clone(), model.clone());

    let failure = shared.take_failure();
    if let Some(refused) = injected_refusal(failure, style, Some(&mut guard), &parts).await {
        return refused;
    }
    if !shared.authorized(&parts) {
        guard.complete();
        return error_response(style, &ApiError::Unauthorized);
    }
    if matches!(route, Route::Push | Route::Copy | Route::Delete)
        && shared.resolve(&model).is_none()
    {
        guard.complete();
        return error_response(style, &ApiError::ModelNotFound(model));
    }
    shared.gate.pass().await;

    match route {
        Route::Copy => {
            if let Some(destination) = body.get("destination").and_then(Value::as_str) {
                shared.add_model(&canonical(destination));
            }
            guard.complete();
            StatusCode::OK.into_response()
        }
        Route::Delete => {
            shared.remove_model(&model);
            guard.complete();
            StatusCode::OK.into_response()
        }
        _ => {
            let lines = progress_lines(route, &model);
            let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(true);
            let adds = matches!(route, Route::Pull | Route::Create).then(|| canonical(&model));
            if !stream {
                if failure == FailureMode::MidStreamError {
                    guard.complete();
                    return error_response(style, &ApiError::MidStream);
                }
                if let Some(name) = adds {
                    shared.add_model(&name);
                }
                guard.complete();
                return json_response(StatusCode::OK, &json!({"status": "success"}));
            }
            let conn = parts.extensions.get::<ConnCtx>().cloned();
            progress_response(shared.clone(), lines, adds, failure, guard, conn)
        }
    }
}

/// The progress lines of a pull, push or create of `model`, success last.
fn progress_lines(route: Route, model: &str) -> Vec<Value> {
    let digest = layer_digest(model);
    let short = digest
        .strip_prefix("sha256:")
        .and_then(|d| d.get(..12))
        .unwrap_or_default()
        .to_owned();
    let total = layer_total(model);
    let layer = |verb: &str, completed: Option<u64>| {
        let mut line =
            json!({"status": format!("{verb} {short}"), "digest": digest, "total": total});
        if let Some(c) = completed {
            line["completed"] = c.into();
        }
        line
    };
    let status = |s: &str| json!({ "status": s });
    match route {
        Route::Push => vec![
            status("retrieving manifest"),
            layer("pushing", Some(0)),
            layer("pushing", Some(total)),
            status("pushing manifest"),
            status("success"),
        ],
        Route::Create => vec![
            status("reading model metadata"),
            status(&format!("creating new layer {digest}")),
            status("writing manifest"),
            status("success"),
        ],
        _ => vec![
            status("pulling manifest"),
            layer("pulling", None),
            layer("pulling", Some(total / 2)),
            layer("pulling", Some(total)),
            status("verifying sha256 digest"),
            status("writing manifest"),
            status("success"),
        ],
    }
}

/// Streams `lines` with `chunk_delay` between them; an injected mid-stream
/// failure strikes after the first line. The model is added just before the
/// success line.
fn progress_response(
    shared: Arc<Shared>,
    lines: Vec<Value>,
    adds: Option<String>,
    failure: FailureMode,
    mut guard: RequestGuard,
    conn: Option<ConnCtx>,
) -> Response {
    let chunk_delay = shared.chunk_delay();
    let body = async_stream::stream! {
        let last = lines.len().saturating_sub(1);
        for (i, line) in lines.into_iter().enumerate() {
            if i > 0 && !chunk_delay.is_zero() {
                tokio::time::sleep(chunk_delay).await;
            }
            if i == 1 {
                match (failure, conn.as_ref()) {
                    (FailureMode::MidStreamError, _) => {
                        let error = ApiError::MidStream.body(ErrorStyle::Ollama);
                        yield Ok::<Bytes, Infallible>(Bytes::from(format!("{error}\n")));
                        guard.complete();
                        return;
                    }
                    (FailureMode::MidStreamDrop, Some(conn)) => {
                        guard.complete();
                        match conn.abort_after_flush().await {}
                    }
                    _ => {}
                }
            }
            if i == last && let Some(name) = adds.as_deref() {
                shared.add_model(name);
            }
            yield Ok::<Bytes, Infallible>(Bytes::from(format!("{line}\n")));
        }
        guard.complete();
    };
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}

/// The digest in a blob path, in `sha256:` form.
fn blob_digest(path: &str) -> String {
    path.rsplit('/')
        .next()
        .unwrap_or_default()
        .replacen("sha256-", "sha256:", 1)
}

/// Injected failures and auth for blob routes; `Some` answers at once.
async fn blob_refusal(shared: &Shared, parts: &axum::http::request::Parts) -> Option<Response> {
    let refused = injected_refusal(shared.take_failure(), ErrorStyle::Ollama, None, parts).await;
    if refused.is_some() {
        return refused;
    }
    if !shared.authorized(parts) {
        return Some(error_response(ErrorStyle::Ollama, &ApiError::Unauthorized));
    }
    None
}

/// `HEAD /api/blobs/{digest}`.
pub(super) async fn blob_head(shared: Arc<Shared>, req: Request) -> Response {
    let (parts, _body) = req.into_parts();
    shared.note_request(None, &parts, &Bytes::new());
    if let Some(refused) = blob_refusal(&shared, &parts).await {
        return refused;
    }
    let digest = blob_digest(parts.uri.path());
    let status = if shared.blobs.lock().contains_key(&digest) {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    };
    with_label(&shared, status.into_response())
}

/// `POST /api/blobs/{digest}`.
pub(super) async fn blob_post(shared: Arc<Shared>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BLOB).await {
        Ok(bytes) => bytes,
        Err(e) => {
            shared.note_request(None, &parts, &Bytes::new());
            let error = ApiError::BadRequest(format!("cannot read blob: {e}"));
            return error_response(ErrorStyle::Ollama, &error);
        }
    };
    shared.note_request(None, &parts, &bytes);
    if let Some(refused) = blob_refusal(&shared, &parts).await {
        return refused;
    }
    let digest = blob_digest(parts.uri.path());
    shared.blobs.lock().insert(digest, bytes);
    with_label(&shared, StatusCode::CREATED.into_response())
}

fn with_label(shared: &Shared, mut resp: Response) -> Response {
    resp.headers_mut()
        .insert("x-fake-backend", shared.label.clone());
    resp
}
