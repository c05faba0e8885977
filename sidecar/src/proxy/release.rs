//! Outcome classification: how each way an upstream exchange can end maps
//! to the [`Outcome`] a lease is released with, and whether the proxy may
//! try another endpoint.
//!
//! The rules (one place, unit-tested):
//! - Before the response: refused/reset/DNS → `ConnectError`; no connection
//!   within the connect timeout → `ConnectTimeout`; no response headers (or,
//!   for streams, no first body chunk) within the first-byte timeout →
//!   `FirstByteTimeout`. All retryable.
//! - Status 5xx and 429 → `BackendError`, retryable (the backend is busy,
//!   loading or broken; another endpoint may serve the request).
//! - Status 401/403 → `BackendError`, retryable: the *sidecar's* backend key
//!   was refused, which is this endpoint's problem, not the client's.
//! - Other 4xx → `ClientError`, passed through, not retried. That includes
//!   404 "model not found": discovery said the endpoint advertises the model,
//!   so a 404 means the request named something the backend rejects (or a
//!   deleted model that the next probe will notice); counting it against the
//!   backend's health would let clients trip circuit breakers with bad input.
//! - After bytes reached the client: a broken stream → `BackendError`, a
//!   stall → `IdleTimeout`, the client leaving or shutdown → `Cancelled`
//!   (the lease's drop guard), a clean end → `Ok` unless the stream carried
//!   an error object or ended without its final chunk (`BackendError`).
//!
//! [`TrackedLease`] is the one place a lease is finished, so the metric, the
//! span field and the release always agree.

use std::time::Duration;

use http::StatusCode;
use switchyard_control_plane::{
    decision::Choice,
    endpoint::without_credentials,
    outcome::{Outcome, TokenCounts},
};
use tracing::Span;

use crate::{
    metrics::Metrics,
    proxy::upstream::{BodyError, SendError},
    router::{Lease, Router},
    translate::stream::StreamEnd,
};

/// What a response status means for the attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusClass {
    /// 2xx: forward the answer.
    Success,
    /// The backend failed; release with this outcome and try elsewhere.
    Retryable(Outcome),
    /// The client's request was refused; release `ClientError`, pass the
    /// error through.
    ClientError,
}

/// Classifies a backend's response status.
pub fn classify_status(status: StatusCode) -> StatusClass {
    match status.as_u16() {
        200..=299 => StatusClass::Success,
        401 | 403 | 429 => StatusClass::Retryable(Outcome::BackendError),
        // 501: this backend does not offer what the request asks for
        // (llama-server's embeddings without `--embeddings`): not its
        // failure; another endpoint may (see `UpstreamError::is_unsupported`).
        400..=499 | 501 => StatusClass::ClientError,
        // 1xx/3xx are not valid final answers for these POST routes
        // (redirects are not followed): the backend is misconfigured.
        _ => StatusClass::Retryable(Outcome::BackendError),
    }
}

/// What kind of transport failure happened before any response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendFailure {
    /// `connect` flag of the error.
    pub is_connect: bool,
    /// `timeout` flag of the error.
    pub is_timeout: bool,
}

impl SendFailure {
    /// Flags of a failed send.
    pub fn of(e: &SendError) -> Self {
        Self {
            is_connect: e.is_connect(),
            is_timeout: e.is_timeout(),
        }
    }

    /// The outcome to release with; every send failure is retryable.
    pub fn outcome(self) -> Outcome {
        match (self.is_connect, self.is_timeout) {
            (true, true) => Outcome::ConnectTimeout,
            (false, true) => Outcome::FirstByteTimeout,
            // Refused, DNS failure, reset before the response: the request
            // did not get an answer from this endpoint.
            (true, false) | (false, false) => Outcome::ConnectError,
        }
    }
}

/// A short, URL-free description of a failed send for clients and logs:
/// what failed plus the innermost cause (e.g. "connect failed: Connection
/// refused (os error 111)"). The send error's own text is never used: for a
/// bad URL it names the URL.
pub fn describe_send(e: &SendError) -> String {
    let kind = match (e.is_connect(), e.is_timeout()) {
        (true, true) => "connect timed out",
        (true, false) => "connect failed",
        (false, _) => "request failed",
    };
    match innermost_cause(e) {
        Some(cause) => format!("{kind}: {cause}"),
        None => kind.to_owned(),
    }
}

/// A short description of a response body that broke mid-way.
pub fn describe_body(e: &BodyError) -> String {
    let kind = "response body failed";
    match innermost_cause(e) {
        Some(cause) => format!("{kind}: {cause}"),
        None => format!("{kind}: {e}"),
    }
}

/// The last error of `e`'s source chain, if it has one (the outer layers
/// only say "client error" and the like).
fn innermost_cause<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a (dyn std::error::Error + 'static)> {
    let mut cause = e.source()?;
    while let Some(next) = cause.source() {
        cause = next;
    }
    Some(cause)
}

/// How a stream that already reached the client stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamStop {
    /// The backend ended the body; the observer or translator says how
    /// complete it was.
    Ended(StreamEnd),
    /// The backend connection broke mid-body.
    Broken,
    /// No chunk within the idle timeout.
    Stalled,
}

impl StreamStop {
    /// The outcome to release with.
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::Ended(StreamEnd::Complete) => Outcome::Ok,
            // An in-band error or a body cut short without its final chunk.
            Self::Ended(StreamEnd::Failed { .. } | StreamEnd::Truncated) | Self::Broken => {
                Outcome::BackendError
            }
            Self::Stalled => Outcome::IdleTimeout,
        }
    }
}

/// A lease plus what is recorded when it ends: the upstream-error metric,
/// the request span's `outcome` field and a log line.
///
/// Exactly-once release: [`TrackedLease::finish`] consumes it; dropping it
/// unfinished (client disconnect, shutdown, panic unwinding) releases it as
/// `Cancelled`, with the tokens a stream noted so far
/// ([`TrackedLease::note_tokens`]).
pub struct TrackedLease {
    /// `None` once finished: a later finish, or the drop, does nothing.
    lease: Option<Lease>,
    choice: Choice,
    /// Whose cluster state says whether the endpoint is full
    /// ([`TrackedLease::finish_applied`]).
    router: Router,
    metrics: Metrics,
    span: Span,
    /// What a stream delivered so far, reported if it is cancelled.
    so_far: TokenCounts,
}

impl std::fmt::Debug for TrackedLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackedLease")
            .field("endpoint", &self.choice.endpoint)
            .field("held", &self.lease.is_some())
            .finish()
    }
}

impl TrackedLease {
    /// Wraps a lease taken for the request recorded by `span`.
    pub fn new(lease: Lease, router: Router, metrics: Metrics, span: Span) -> Self {
        let choice = lease.choice().clone();
        Self {
            lease: Some(lease),
            choice,
            router,
            metrics,
            span,
            so_far: TokenCounts::default(),
        }
    }

    /// Records the tokens streamed so far: a stream the client leaves (or
    /// a shutdown ends) still counts what it was sent.
    pub fn note_tokens(&mut self, tokens: TokenCounts) {
        self.so_far = tokens;
    }

    /// The choice the lease was taken for.
    pub fn choice(&self) -> &Choice {
        &self.choice
    }

    /// Releases the lease with `outcome`.
    pub fn finish(mut self, outcome: Outcome, tokens: TokenCounts) {
        if let Some(lease) = self.ending(outcome, tokens) {
            lease.finish(outcome, tokens);
        }
    }

    /// Releases the lease with `outcome` before the answer's end goes to
    /// the client (a later finish, or the drop, then does nothing). When the
    /// endpoint is full for the model — this lease took its last slot
    /// ([`Choice::at_limit`]), or the latest cluster state shows it full or
    /// one request short ([`Router::endpoint_near_limit`]) —
    /// the release is sent at once and this returns only once the control
    /// plane applied it (at most [`APPLIED_WAIT`]). So a client that sends
    /// its next request the instant this answer ends, through any sidecar,
    /// finds the slot free instead of the endpoint full.
    pub async fn finish_applied(&mut self, outcome: Outcome, tokens: TokenCounts) {
        let Some(lease) = self.ending(outcome, tokens) else {
            return;
        };
        let full = self.choice.at_limit
            || self
                .router
                .endpoint_near_limit(&self.choice.endpoint, &self.choice.tracking_model);
        if !full {
            return lease.finish(outcome, tokens);
        }
        if let Some(applied) = lease.finish_applied(outcome, tokens) {
            // Not applied in time (or unknown): the answer goes on; the
            // release is still on its way.
            let _late = tokio::time::timeout(APPLIED_WAIT, applied).await;
        }
    }

    /// Records the end (metrics, span, log) and hands over the lease to
    /// release; `None`, recording nothing, once it was finished.
    fn ending(&mut self, outcome: Outcome, tokens: TokenCounts) -> Option<Lease> {
        let lease = self.lease.take()?;
        self.metrics
            .upstream_outcome(&self.choice.endpoint, outcome);
        self.span.record("outcome", outcome.as_str());
        // In the span's scope, not `parent:` (see `proxy::handle`).
        self.span.in_scope(|| {
            tracing::debug!(
                endpoint = %without_credentials(&self.choice.endpoint),
                %outcome,
                prompt_tokens = tokens.prompt,
                completion_tokens = tokens.completion,
                "lease released"
            );
        });
        Some(lease)
    }
}

/// How long an answer waits for the control plane to apply the release of
/// a lease that held its endpoint's last slot
/// ([`TrackedLease::finish_applied`]): a round trip normally takes well
/// under a millisecond; the choose deadline's 50 ms bounds a slow one.
pub const APPLIED_WAIT: Duration = Duration::from_millis(50);

impl Drop for TrackedLease {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            self.span.record("outcome", Outcome::Cancelled.as_str());
            self.span.in_scope(|| {
                tracing::info!(
                    endpoint = %without_credentials(&self.choice.endpoint),
                    prompt_tokens = self.so_far.prompt,
                    completion_tokens = self.so_far.completion,
                    "request cancelled (client gone or shutdown); lease released as cancelled"
                );
            });
            lease.finish(Outcome::Cancelled, self.so_far);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(classify_status(StatusCode::OK), StatusClass::Success);
        for s in [500, 502, 503, 504, 429, 401, 403, 302] {
            assert_eq!(
                classify_status(StatusCode::from_u16(s).unwrap_or(StatusCode::IM_A_TEAPOT)),
                StatusClass::Retryable(Outcome::BackendError),
                "{s}"
            );
        }
        for s in [400, 404, 413, 422, 501] {
            assert_eq!(
                classify_status(StatusCode::from_u16(s).unwrap_or(StatusCode::IM_A_TEAPOT)),
                StatusClass::ClientError,
                "{s}"
            );
        }
    }

    #[test]
    fn send_failures() {
        let f = |is_connect, is_timeout| {
            SendFailure {
                is_connect,
                is_timeout,
            }
            .outcome()
        };
        assert_eq!(f(true, true), Outcome::ConnectTimeout);
        assert_eq!(f(true, false), Outcome::ConnectError);
        assert_eq!(f(false, true), Outcome::FirstByteTimeout);
        assert_eq!(f(false, false), Outcome::ConnectError);
    }

    #[test]
    fn stream_stops() {
        assert_eq!(
            StreamStop::Ended(StreamEnd::Complete).outcome(),
            Outcome::Ok
        );
        assert_eq!(
            StreamStop::Ended(StreamEnd::Failed {
                message: "x".into()
            })
            .outcome(),
            Outcome::BackendError
        );
        assert_eq!(
            StreamStop::Ended(StreamEnd::Truncated).outcome(),
            Outcome::BackendError
        );
        assert_eq!(StreamStop::Broken.outcome(), Outcome::BackendError);
        assert_eq!(StreamStop::Stalled.outcome(), Outcome::IdleTimeout);
    }

    #[tokio::test]
    async fn refused_connection_is_a_connect_error() {
        // Bind, learn the port, close: connecting is then refused.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.ok();
        let Some(addr) = listener.as_ref().and_then(|l| l.local_addr().ok()) else {
            panic!("cannot bind loopback");
        };
        drop(listener);
        let client = crate::proxy::upstream::UpstreamClient::new(std::time::Duration::from_secs(1))
            .unwrap_or_else(|e| panic!("{e}"));
        let sent = client
            .post(
                &format!("http://{addr}/api/chat"),
                http::HeaderMap::new(),
                bytes::Bytes::new(),
            )
            .await;
        let err = match sent {
            Ok(r) => panic!("unexpected answer {}", r.status()),
            Err(e) => e,
        };
        assert_eq!(SendFailure::of(&err).outcome(), Outcome::ConnectError);
        let text = describe_send(&err);
        assert!(!text.contains("127.0.0.1"), "{text}");
        assert!(text.starts_with("connect failed: "), "{text}");
    }
}
