//! Blob uploads, which `ollama create` from a local file needs before the
//! create itself: `HEAD /api/blobs/{digest}` and `POST /api/blobs/{digest}`,
//! on the endpoints a create goes to (every Ollama endpoint passing its
//! probes; see [`super::targets`]).
//!
//! - HEAD: 200 only when every target has the blob and no Ollama endpoint
//!   is down; otherwise 404 (so the client uploads, and the upload names
//!   what is missing), or the first failure's status when a target could
//!   not answer.
//! - POST: the client's body is tee'd to every target concurrently as it
//!   arrives, never held whole: each target has a queue of
//!   [`BLOB_QUEUE`] chunks, and the client is read only as fast as the
//!   slowest target takes them (chunks are shared, not copied), so memory
//!   stays at a few chunks whatever the blob's size. `max_body_bytes` does
//!   not apply: blobs are model weights. A target that takes no chunk for
//!   [`BLOB_STALL`] is cut off (its upload aborted) and named in the
//!   error; the others go on. A client whose upload breaks off aborts every
//!   target's upload (a backend never sees a truncated blob as complete).
//!   201 when every target stored it (Ollama's answer), otherwise the first
//!   failure's status naming each failed endpoint.

use std::{io, time::Duration};

use axum::{
    body::Body,
    extract::{Path, Request, State, rejection::PathRejection},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use http::{
    HeaderValue, Method, StatusCode,
    header::{CONTENT_LENGTH, CONTENT_TYPE},
};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    Final, Operation,
    fanout::{self, Call, FIRST_BYTE},
    progress::{EndpointFailure, summarize_results},
    targets::{Targets, targets},
};
use crate::{
    errors::ProxyError,
    proxy::{
        forward::upstream_headers,
        upstream::{StreamingBody, UpstreamClient},
    },
    routes::ApiFormat,
    server::AppState,
};
use switchyard_control_plane::endpoint::{EndpointKind, without_credentials};

/// Chunks queued per target before the client is read further.
pub const BLOB_QUEUE: usize = 4;
/// Longest a target may take no chunk before its upload is cut off.
pub const BLOB_STALL: Duration = Duration::from_secs(5 * 60);

/// `HEAD /api/blobs/{digest}`.
pub(super) async fn head(
    State(state): State<AppState>,
    digest: Result<Path<String>, PathRejection>,
    req: Request,
) -> Response {
    let digest = match digest {
        Ok(Path(digest)) => digest,
        Err(e) => return ProxyError::from(e).into_response_for(ApiFormat::Ollama),
    };
    match check(&state, &digest, req).await {
        Ok(status) => status.into_response(),
        Err(e) => e.into_response_for(ApiFormat::Ollama),
    }
}

/// `POST /api/blobs/{digest}`.
pub(super) async fn post(
    State(state): State<AppState>,
    digest: Result<Path<String>, PathRejection>,
    req: Request,
) -> Response {
    let digest = match digest {
        Ok(Path(digest)) => digest,
        Err(e) => return ProxyError::from(e).into_response_for(ApiFormat::Ollama),
    };
    let shutdown = state.shutdown_token();
    let result = tokio::select! {
        r = upload(&state, &digest, req) => r,
        () = shutdown.cancelled() => Err(ProxyError::ShuttingDown),
    };
    let outcome = match &result {
        Ok(_) => "success",
        Err(ProxyError::FanOutFailed { .. }) => "failed",
        Err(_) => "refused",
    };
    super::count(&state, "blob_upload", outcome);
    match result {
        Ok(response) => response,
        Err(e) => {
            tracing::warn!(route = "/api/blobs", digest, error = %e, "blob upload failed");
            e.into_response_for(ApiFormat::Ollama)
        }
    }
}

/// Whether `digest` is `sha256:` (or `sha256-`) and 64 lowercase hex
/// digits, as Ollama requires; it also goes into backend URLs.
pub fn valid_digest(digest: &str) -> bool {
    let hex = digest
        .strip_prefix("sha256:")
        .or_else(|| digest.strip_prefix("sha256-"));
    hex.is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn blob_targets(state: &AppState, digest: &str) -> Result<Targets, ProxyError> {
    if !valid_digest(digest) {
        return Err(ProxyError::InvalidField {
            field: "digest",
            problem: "must be sha256:<64 hex digits>",
        });
    }
    targets(&state.router().cluster_state(), Operation::Create, "")
}

fn blob_url(endpoint: &str, digest: &str) -> String {
    format!("{}/api/blobs/{digest}", endpoint.trim_end_matches('/'))
}

async fn check(state: &AppState, digest: &str, req: Request) -> Result<StatusCode, ProxyError> {
    let targets = blob_targets(state, digest)?;
    let calls = targets
        .send_to
        .iter()
        .enumerate()
        .map(|(index, url)| Call {
            index,
            method: Method::HEAD,
            url: blob_url(url, digest),
            headers: upstream_headers(req.headers(), state.backend_key(url)),
            body: Bytes::new(),
        })
        .collect();
    let results = fanout::unary(
        state.clients().get(EndpointKind::Ollama),
        calls,
        fanout::FIRST_BYTE,
    )
    .await;
    let failures: Vec<&EndpointFailure> = results.iter().flatten().collect();
    if failures.is_empty() && targets.down.is_empty() {
        return Ok(StatusCode::OK);
    }
    let missing = !targets.down.is_empty() || failures.iter().any(|f| f.status == 404);
    Ok(match failures.first() {
        Some(f) if !missing => f.status,
        _ => StatusCode::NOT_FOUND,
    })
}

/// One target's upload: its queue's sender and its cut-off switch.
struct Feed {
    queue: Option<mpsc::Sender<Bytes>>,
    abort: CancellationToken,
    /// Why the tee cut it off, if it did.
    stalled: Option<EndpointFailure>,
}

async fn upload(state: &AppState, digest: &str, req: Request) -> Result<Response, ProxyError> {
    let targets = blob_targets(state, digest)?;
    let (parts, body) = req.into_parts();
    let client = state.clients().get(EndpointKind::Ollama);
    let pumped = CancellationToken::new();
    let mut feeds = Vec::with_capacity(targets.send_to.len());
    let mut uploads = Vec::with_capacity(targets.send_to.len());
    for url in &targets.send_to {
        let (queue, receiver) = mpsc::channel(BLOB_QUEUE);
        let abort = CancellationToken::new();
        let mut headers = upstream_headers(&parts.headers, state.backend_key(url));
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        if let Some(length) = parts.headers.get(CONTENT_LENGTH) {
            headers.insert(CONTENT_LENGTH, length.clone());
        }
        let body = streaming_body(receiver, abort.clone());
        uploads.push(send_one(
            client,
            blob_url(url, digest),
            headers,
            body,
            pumped.clone(),
        ));
        feeds.push(Feed {
            queue: Some(queue),
            abort,
            stalled: None,
        });
    }
    let (teed, results) = tokio::join!(
        async {
            let teed = tee(body, &mut feeds, BLOB_STALL).await;
            pumped.cancel();
            teed
        },
        futures::future::join_all(uploads)
    );
    teed?;
    let names: Vec<String> = targets
        .send_to
        .iter()
        .chain(targets.down.iter().map(|(url, _)| url))
        .map(|u| without_credentials(u).into_owned())
        .collect();
    let down = targets.down.iter().map(|(_, detail)| {
        Some(EndpointFailure::new(
            StatusCode::BAD_GATEWAY,
            format!("endpoint is down ({detail})"),
        ))
    });
    let failures: Vec<Option<EndpointFailure>> = feeds
        .into_iter()
        .zip(results)
        .map(|(feed, result)| feed.stalled.or(result))
        .chain(down)
        .collect();
    let what = format!("blob upload {digest}");
    match summarize_results(&what, &names, &failures) {
        Final::Success => {
            tracing::info!(digest, endpoints = names.len(), "blob uploaded");
            Ok(StatusCode::CREATED.into_response())
        }
        Final::Failed { status, message } => Err(ProxyError::FanOutFailed { status, message }),
    }
}

/// A target's request body: the chunks of its queue, or an error (aborting
/// the request) once `abort` fires.
fn streaming_body(mut receiver: mpsc::Receiver<Bytes>, abort: CancellationToken) -> StreamingBody {
    let frames = async_stream::stream! {
        loop {
            tokio::select! {
                biased;
                () = abort.cancelled() => {
                    yield Err(io::Error::other("upload aborted"));
                    return;
                }
                chunk = receiver.recv() => match chunk {
                    Some(chunk) => yield Ok(Frame::data(chunk)),
                    None => return,
                },
            }
        }
    };
    BodyExt::boxed_unsync(StreamBody::new(frames))
}

/// Sends one target's upload; after the client's body was fully tee'd
/// (`pumped`), waits at most [`FIRST_BYTE`] for the answer (the backend
/// verifies the digest first).
async fn send_one(
    client: &UpstreamClient,
    url: String,
    headers: http::HeaderMap,
    body: StreamingBody,
    pumped: CancellationToken,
) -> Option<EndpointFailure> {
    let sent = client.send_streaming(Method::POST, &url, headers, body);
    let deadline = async {
        pumped.cancelled().await;
        tokio::time::sleep(FIRST_BYTE).await;
    };
    let response = tokio::select! {
        r = sent => r,
        () = deadline => {
            return Some(EndpointFailure::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!("no response within {} s of the upload's end", FIRST_BYTE.as_secs()),
            ));
        }
    };
    match response {
        Ok(response) if response.status().is_success() => {
            let _ = response.into_body().collect().await;
            None
        }
        Ok(response) => Some(fanout::refusal(response).await),
        Err(e) => Some(EndpointFailure::new(
            StatusCode::BAD_GATEWAY,
            format!("unreachable: {e}"),
        )),
    }
}

/// Copies the client's body into every feed, as fast as the slowest live
/// one takes it; a feed that takes no chunk for `stall` is cut off. Ends
/// every feed: cleanly at the body's end, with an abort when the client's
/// upload broke off (then `Err`).
async fn tee(mut body: Body, feeds: &mut [Feed], stall: Duration) -> Result<(), ProxyError> {
    loop {
        let chunk = match body.frame().await {
            None => break,
            Some(Err(e)) => {
                for feed in feeds.iter_mut() {
                    feed.abort.cancel();
                    feed.queue = None;
                }
                return Err(ProxyError::BodyRead(e.to_string()));
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(chunk) => chunk,
                Err(_) => continue, // trailers
            },
        };
        for feed in feeds.iter_mut() {
            let Some(queue) = &feed.queue else { continue };
            match tokio::time::timeout(stall, queue.send(chunk.clone())).await {
                Ok(Ok(())) => {}
                // Its request ended early; its result says why.
                Ok(Err(_)) => feed.queue = None,
                Err(_) => {
                    feed.abort.cancel();
                    feed.queue = None;
                    feed.stalled = Some(EndpointFailure::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!("took no data for {} ms", stall.as_millis()),
                    ));
                }
            }
        }
    }
    for feed in feeds.iter_mut() {
        feed.queue = None;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn feed() -> (Feed, mpsc::Receiver<Bytes>) {
        let (queue, receiver) = mpsc::channel(BLOB_QUEUE);
        let feed = Feed {
            queue: Some(queue),
            abort: CancellationToken::new(),
            stalled: None,
        };
        (feed, receiver)
    }

    fn chunks(n: u8) -> Vec<Result<Bytes, io::Error>> {
        (0..n).map(|i| Ok(Bytes::from(vec![i; 1000]))).collect()
    }

    async fn drain(mut receiver: mpsc::Receiver<Bytes>) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(chunk) = receiver.recv().await {
            out.extend_from_slice(&chunk);
        }
        out
    }

    #[tokio::test]
    async fn every_live_feed_gets_every_chunk() {
        let (a, ra) = feed();
        let (b, rb) = feed();
        let (gone, dropped) = feed();
        drop(dropped);
        let mut feeds = vec![a, b, gone];
        let body = Body::from_stream(futures::stream::iter(chunks(20)));
        let (teed, got_a, got_b) =
            tokio::join!(tee(body, &mut feeds, BLOB_STALL), drain(ra), drain(rb));
        teed.unwrap();
        let expected: Vec<u8> = (0..20u8).flat_map(|i| vec![i; 1000]).collect();
        assert_eq!(got_a, expected);
        assert_eq!(got_b, expected);
        assert!(
            feeds
                .iter()
                .all(|f| f.queue.is_none() && f.stalled.is_none())
        );
        assert!(feeds.iter().all(|f| !f.abort.is_cancelled()));
    }

    #[tokio::test]
    async fn a_feed_that_takes_nothing_is_cut_off_and_the_others_go_on() {
        let (a, ra) = feed();
        let (stuck, _kept_but_never_read) = feed();
        let mut feeds = vec![a, stuck];
        let body = Body::from_stream(futures::stream::iter(chunks(3 * BLOB_QUEUE as u8)));
        let stall = Duration::from_millis(50);
        let (teed, got_a) = tokio::join!(tee(body, &mut feeds, stall), drain(ra));
        teed.unwrap();
        assert_eq!(got_a.len(), 3 * BLOB_QUEUE * 1000);
        assert!(feeds[1].abort.is_cancelled());
        let stalled = feeds[1].stalled.as_ref().expect("cut off");
        assert_eq!(stalled.status, StatusCode::GATEWAY_TIMEOUT);
        assert!(!feeds[0].abort.is_cancelled());
    }

    #[tokio::test]
    async fn a_broken_client_upload_aborts_every_feed() {
        let (a, ra) = feed();
        let (b, rb) = feed();
        let mut feeds = vec![a, b];
        let mut pieces = chunks(2);
        pieces.push(Err(io::Error::other("client went away")));
        let body = Body::from_stream(futures::stream::iter(pieces));
        let (teed, _, _) = tokio::join!(tee(body, &mut feeds, BLOB_STALL), drain(ra), drain(rb));
        assert!(matches!(teed, Err(ProxyError::BodyRead(_))));
        assert!(feeds.iter().all(|f| f.abort.is_cancelled()));
    }

    #[tokio::test]
    async fn an_aborted_body_ends_with_an_error_not_a_clean_end() {
        let (queue, receiver) = mpsc::channel(BLOB_QUEUE);
        let abort = CancellationToken::new();
        let mut body = streaming_body(receiver, abort.clone());
        queue.send(Bytes::from_static(b"part")).await.unwrap();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"part"));
        abort.cancel();
        assert!(body.frame().await.unwrap().is_err());
    }

    #[test]
    fn digests_are_checked_before_they_reach_a_url() {
        let hex = "a".repeat(64);
        assert!(valid_digest(&format!("sha256:{hex}")));
        assert!(valid_digest(&format!("sha256-{hex}")));
        for bad in [
            format!("sha256:{}", "a".repeat(63)),
            format!("sha256:{}", "A".repeat(64)),
            format!("md5:{hex}"),
            format!("sha256:{}/../x", "a".repeat(58)),
            String::new(),
        ] {
            assert!(!valid_digest(&bad), "{bad}");
        }
    }
}
