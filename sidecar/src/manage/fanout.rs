//! Sending one management request to several endpoints at once, through
//! the sidecar's pooled Ollama client ([`UpstreamClient`]).
//!
//! - [`events`]: progress operations; every endpoint's NDJSON lines as
//!   [`Event`]s in arrival order (one merged stream, nothing buffered).
//! - [`unary`]: copy and delete; each endpoint's result.
//! - [`send`]: one request within a deadline for its head (also how
//!   [`crate::stored_responses`] asks every endpoint for a response).
//!
//! Dropping either future or stream drops every upstream request (the
//! pooled connection is closed: the backend sees the cancel).
//!
//! Timeouts: [`FIRST_BYTE`] before the response head and [`IDLE`] between
//! two progress lines, both long. Pulls are slow: a backend answers the
//! head at once in stream mode, but between two lines it may verify a
//! multi-GB blob; the configured inference `first_byte`/`idle` timeouts
//! would cut healthy pulls.

use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt, stream::BoxStream};
use http::{HeaderMap, Method, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;

use super::progress::EndpointFailure;
use crate::{
    framing::NdjsonDecoder,
    proxy::upstream::{UpstreamBody, UpstreamClient},
};

/// Longest wait for a backend's response head.
pub const FIRST_BYTE: Duration = Duration::from_secs(10 * 60);
/// Longest wait between two progress lines of one backend.
pub const IDLE: Duration = Duration::from_secs(30 * 60);
/// Most bytes of an error body read to report a backend's message.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// Longest wait for an error body.
const ERROR_BODY_WAIT: Duration = Duration::from_secs(10);

/// One request to one endpoint.
#[derive(Clone, Debug)]
pub struct Call {
    /// Position of the endpoint in the merge.
    pub index: usize,
    /// `DELETE` for delete, `POST` otherwise.
    pub method: Method,
    /// Endpoint base URL plus the route.
    pub url: String,
    /// Headers for this endpoint (its backend key, never the client's).
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

/// Something one endpoint did.
#[derive(Debug)]
pub enum Event {
    /// A progress line (an NDJSON object) from endpoint `.0`.
    Line(usize, Value),
    /// Endpoint `.0` failed; its stream is over.
    Failed(usize, EndpointFailure),
    /// Endpoint `.0`'s stream ended (the merge decides whether it
    /// reported success).
    Ended(usize),
}

/// Every endpoint's progress, merged in arrival order; the stream ends when
/// every endpoint's did, each with exactly one `Failed` or `Ended`.
pub fn events(client: &UpstreamClient, calls: Vec<Call>) -> impl Stream<Item = Event> + use<> {
    let streams: Vec<BoxStream<'static, Event>> = calls
        .into_iter()
        .map(|call| endpoint_events(client.clone(), call).boxed())
        .collect();
    futures::stream::select_all(streams)
}

/// Each call's result, in call order; `None` for a 2xx. Each endpoint
/// must answer within `first_byte` ([`FIRST_BYTE`] for copy and delete).
pub async fn unary(
    client: &UpstreamClient,
    calls: Vec<Call>,
    first_byte: Duration,
) -> Vec<Option<EndpointFailure>> {
    futures::future::join_all(calls.into_iter().map(|call| async move {
        match send(client, call, first_byte).await {
            Ok(response) if response.status().is_success() => {
                // Drain the (empty) body so the connection goes back to the pool.
                let _ = tokio::time::timeout(ERROR_BODY_WAIT, response.into_body().collect()).await;
                None
            }
            Ok(response) => Some(refusal(response).await),
            Err(failure) => Some(failure),
        }
    }))
    .await
}

fn endpoint_events(client: UpstreamClient, call: Call) -> impl Stream<Item = Event> {
    async_stream::stream! {
        let index = call.index;
        let response = match send(&client, call, FIRST_BYTE).await {
            Ok(response) => response,
            Err(failure) => {
                yield Event::Failed(index, failure);
                return;
            }
        };
        if !response.status().is_success() {
            yield Event::Failed(index, refusal(response).await);
            return;
        }
        let mut body = response.into_body();
        let mut decoder = NdjsonDecoder::new();
        loop {
            let frame = match tokio::time::timeout(IDLE, body.frame()).await {
                Err(_) => {
                    yield Event::Failed(index, EndpointFailure::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!("no progress for {} s", IDLE.as_secs()),
                    ));
                    return;
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    yield Event::Failed(index, EndpointFailure::new(
                        StatusCode::BAD_GATEWAY,
                        format!("stream broke off: {e}"),
                    ));
                    return;
                }
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            match decoder.push(&data) {
                Ok(lines) => {
                    for line in lines {
                        yield line_event(index, &line);
                    }
                }
                Err(e) => {
                    yield Event::Failed(index, EndpointFailure::new(
                        StatusCode::BAD_GATEWAY,
                        format!("unreadable progress stream: {e}"),
                    ));
                    return;
                }
            }
        }
        if let Some(line) = decoder.finish() {
            yield line_event(index, &line);
        }
        yield Event::Ended(index);
    }
}

fn line_event(index: usize, line: &str) -> Event {
    match serde_json::from_str::<Value>(line) {
        Ok(value) => Event::Line(index, value),
        Err(e) => Event::Failed(
            index,
            EndpointFailure::new(
                StatusCode::BAD_GATEWAY,
                format!("sent a progress line that is not JSON: {e}"),
            ),
        ),
    }
}

/// Sends `call`; a failure before the response head is a 502 (504 when no
/// head came within `first_byte`).
pub(crate) async fn send(
    client: &UpstreamClient,
    call: Call,
    first_byte: Duration,
) -> Result<http::Response<UpstreamBody>, EndpointFailure> {
    let sent = client.send(call.method, &call.url, call.headers, call.body);
    match tokio::time::timeout(first_byte, sent).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(e)) => Err(EndpointFailure::new(
            StatusCode::BAD_GATEWAY,
            format!("unreachable: {e}"),
        )),
        Err(_) => Err(EndpointFailure::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!("no response within {} s", first_byte.as_secs()),
        )),
    }
}

/// A non-2xx answer as a failure with the backend's status and message
/// (`{"error":..}`'s text, else the body's first line).
pub(crate) async fn refusal(response: http::Response<UpstreamBody>) -> EndpointFailure {
    let status = response.status();
    let limited = http_body_util::Limited::new(response.into_body(), MAX_ERROR_BODY);
    let body = match tokio::time::timeout(ERROR_BODY_WAIT, limited.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(_)) | Err(_) => Bytes::new(),
    };
    let message = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(fields)) => fields.get("error").map(|e| match e {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }),
        _ => None,
    }
    .unwrap_or_else(|| {
        let text = String::from_utf8_lossy(&body);
        let first = text.lines().next().unwrap_or_default().trim();
        let first: String = first.chars().take(200).collect();
        if first.is_empty() {
            format!("answered {}", status.as_u16())
        } else {
            format!("answered {}: {first}", status.as_u16())
        }
    });
    EndpointFailure::new(status, message)
}
