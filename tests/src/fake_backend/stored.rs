//! The Responses API's stored-response routes, imitated in every mode that
//! serves `/v1/responses`, over the answers the fake stored (every
//! Responses answer unless the request said `store: false`):
//!
//! - `GET /v1/responses/{id}`: the response object as the final answer
//!   carried it (`status: "completed"`).
//! - `DELETE /v1/responses/{id}`: forgets it and answers
//!   `{"id","object":"response.deleted","deleted":true}`; later requests
//!   for it are 404.
//! - `GET /v1/responses/{id}/input_items`: the request's input as items
//!   (see `render::input_items`), as a list page
//!   `{"object":"list","data","first_id","last_id","has_more"}`; query
//!   `limit` (1..=100, default 20), `order` (`asc`, default `desc` as
//!   OpenAI), `after` (an item id: the page starts after it).
//! - `POST /v1/responses/{id}/cancel`: the response object with its status
//!   as stored (nothing runs in the background here).
//! - An id the fake does not store: 404 `No response found with id '..'.`
//!   in the error shape of the mode's `/v1` routes.
//!
//! Every request is recorded with its path, query and headers (so a test
//! sees which key arrived); a configured API key is required as on the
//! inference routes.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::handlers::{ApiError, ErrorStyle, Route, error_response, json_response};
use super::state::Shared;

/// Largest body read (these requests carry none).
const MAX_BODY: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Retrieve,
    Delete,
    InputItems,
    Cancel,
}

/// The routes, for the fake's router.
pub(super) fn router(shared: &Arc<Shared>) -> Router {
    let handler = |op: Op| {
        let shared = shared.clone();
        move |Path(id): Path<String>, req: Request| {
            let shared = shared.clone();
            async move { serve(&shared, op, id, req).await }
        }
    };
    Router::new()
        .route(
            "/v1/responses/{id}",
            get(handler(Op::Retrieve)).delete(handler(Op::Delete)),
        )
        .route(
            "/v1/responses/{id}/input_items",
            get(handler(Op::InputItems)),
        )
        .route("/v1/responses/{id}/cancel", post(handler(Op::Cancel)))
}

async fn serve(shared: &Arc<Shared>, op: Op, id: String, req: Request) -> Response {
    let style = ErrorStyle::of(shared.mode, Route::V1Responses);
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .unwrap_or_else(|_| Bytes::new());
    shared.note_request(None, &parts, &bytes);
    let mut resp = if !shared.authorized(&parts) {
        error_response(style, &ApiError::Unauthorized)
    } else {
        match shared.stored_response(&id) {
            None => error_response(style, &ApiError::NoResponse(id)),
            Some(stored) => match op {
                Op::Retrieve | Op::Cancel => json_response(StatusCode::OK, &stored.object),
                Op::Delete => {
                    shared.delete_response(&id);
                    json_response(
                        StatusCode::OK,
                        &json!({"id": id, "object": "response.deleted", "deleted": true}),
                    )
                }
                Op::InputItems => {
                    let query = Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
                        .map(|Query(q)| q)
                        .unwrap_or_default();
                    match page(&stored.input_items, &query) {
                        Ok(page) => json_response(StatusCode::OK, &page),
                        Err(message) => error_response(style, &ApiError::BadRequest(message)),
                    }
                }
            },
        }
    };
    resp.headers_mut()
        .insert("x-fake-backend", shared.label.clone());
    resp
}

/// One page of input items for the query's `limit`, `order` and `after`.
fn page(items: &[Value], query: &[(String, String)]) -> Result<Value, String> {
    let param = |name: &str| {
        query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let limit = match param("limit") {
        None => 20,
        Some(v) => match v.parse::<usize>() {
            Ok(n @ 1..=100) => n,
            _ => return Err(format!("Invalid 'limit': {v} (expected 1 to 100).")),
        },
    };
    let mut ordered: Vec<&Value> = items.iter().collect();
    match param("order") {
        None | Some("desc") => ordered.reverse(),
        Some("asc") => {}
        Some(other) => return Err(format!("Invalid 'order': {other} (expected asc or desc).")),
    }
    if let Some(after) = param("after") {
        let at = ordered
            .iter()
            .position(|item| item["id"] == after)
            .ok_or_else(|| format!("No input item found with id '{after}'."))?;
        ordered.drain(..=at);
    }
    let has_more = ordered.len() > limit;
    ordered.truncate(limit);
    Ok(json!({
        "object": "list",
        "data": ordered,
        "first_id": ordered.first().map(|item| item["id"].clone()),
        "last_id": ordered.last().map(|item| item["id"].clone()),
        "has_more": has_more,
    }))
}
