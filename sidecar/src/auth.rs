//! Router-key authentication for clients (`router_api_key` /
//! `nomyo-router-api-key`).
//!
//! Invariants:
//! - When a key is configured, every route except the liveness routes
//!   (`GET /`, `HEAD /`, `GET /health`) requires `Authorization: Bearer <key>`,
//!   `x-api-key: <key>` (how Anthropic clients send it) or `?api_key=<key>`;
//!   none → 401, a wrong one → 403, in the client's API format.
//! - The comparison is constant-time over SHA-256 digests of both sides, so
//!   neither the content nor the length of the key leaks through timing.
//! - `api_key` is removed from the query string before the request goes
//!   further, so nothing downstream (logs, spans) can see it. The client's
//!   `Authorization` and `x-api-key` headers are never forwarded to a
//!   backend (see `proxy::forward`).

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::Response,
};
use http::{HeaderMap, Method, Uri, header::AUTHORIZATION};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use switchyard_control_plane::config::Secret;

use crate::{errors::ProxyError, routes::ApiFormat, server::AppState};

/// Query parameter that may carry the router key.
pub const API_KEY_PARAM: &str = "api_key";

/// The header Anthropic clients send their key in; accepted as the router
/// key like `Authorization: Bearer`, and never forwarded to a backend.
pub const X_API_KEY: &str = "x-api-key";

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No key presented.
    #[error("missing API key")]
    Missing,
    /// A key was presented and it is wrong.
    #[error("invalid API key")]
    Wrong,
}

impl From<AuthError> for ProxyError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Missing => Self::MissingApiKey,
            AuthError::Wrong => Self::WrongApiKey,
        }
    }
}

/// Checks the presented credentials against `expected`. `None` means no
/// key is configured: everything passes.
pub fn check(
    expected: Option<&Secret>,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<(), AuthError> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let expected = Sha256::digest(expected.expose().as_bytes());
    // Every candidate is compared; no short-circuit on the first match.
    let matches = |key: &[u8]| bool::from(Sha256::digest(key).ct_eq(&expected));
    let mut presented = false;
    let mut matched = false;
    for value in headers.get_all(AUTHORIZATION) {
        presented = true;
        if let Some(token) = bearer_token(value.as_bytes()) {
            matched |= matches(token);
        }
    }
    // Anthropic clients (the SDKs, Claude Code with `ANTHROPIC_API_KEY`)
    // send their key as `x-api-key`.
    for value in headers.get_all(X_API_KEY) {
        presented = true;
        matched |= matches(value.as_bytes().trim_ascii());
    }
    if let Some(query) = query {
        for (name, value) in query_pairs(query) {
            if name == API_KEY_PARAM {
                presented = true;
                matched |= matches(value.as_bytes());
            }
        }
    }
    match (presented, matched) {
        (_, true) => Ok(()),
        (false, false) => Err(AuthError::Missing),
        (true, false) => Err(AuthError::Wrong),
    }
}

/// The token of an `Authorization: Bearer <token>` value (scheme
/// case-insensitive), `None` for other schemes.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
}

/// `name=value` pairs of a query string, percent-decoded (`+` is a space).
pub(crate) fn query_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(name), percent_decode(value))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(v) = hex {
                    out.push(v);
                    i += 2;
                } else {
                    out.push(b'%');
                }
            }
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The URI without any `api_key` query parameter (other parameters kept in
/// order). Returns `None` when there was nothing to strip.
pub fn strip_api_key(uri: &Uri) -> Option<Uri> {
    let query = uri.query()?;
    let is_key = |p: &&str| {
        let name = p.split_once('=').map_or(*p, |(n, _)| n);
        percent_decode(name) == API_KEY_PARAM
    };
    if !query.split('&').any(|p| is_key(&p)) {
        return None;
    }
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !is_key(p))
        .collect();
    let path = uri.path();
    let path_and_query = if kept.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", kept.join("&"))
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    Uri::from_parts(parts).ok()
}

/// Routes that answer without a key: liveness probes must work without
/// credentials (Kubernetes, load balancers).
fn is_public(method: &Method, path: &str) -> bool {
    (path == "/" || path == "/health") && (method == Method::GET || method == Method::HEAD)
}

/// axum middleware: checks the router key, then strips `api_key` from the
/// URI before any handler (or log line) sees it.
pub(crate) async fn middleware(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let result = if is_public(req.method(), req.uri().path()) {
        Ok(())
    } else {
        check(state.router_api_key(), req.headers(), req.uri().query())
    };
    if let Some(stripped) = strip_api_key(req.uri()) {
        *req.uri_mut() = stripped;
    }
    match result {
        Ok(()) => next.run(req).await,
        Err(e) => refusal(e, req.uri().path()),
    }
}

/// The answer to a request the router key check refused, in the format of
/// its path (logged without the key).
pub(crate) fn refusal(e: AuthError, path: &str) -> Response {
    let format = ApiFormat::for_path(path);
    tracing::info!(path, reason = %e, "request refused");
    ProxyError::from(e).into_response_for(format)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use http::HeaderValue;

    use super::*;

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    #[test]
    fn no_key_configured_lets_everything_through() {
        assert_eq!(check(None, &headers(None), None), Ok(()));
        assert_eq!(
            check(None, &headers(Some("Bearer x")), Some("api_key=y")),
            Ok(())
        );
    }

    #[test]
    fn bearer_and_query_keys() {
        let key = Secret::new("s3cret");
        let k = Some(&key);
        assert_eq!(check(k, &headers(Some("Bearer s3cret")), None), Ok(()));
        assert_eq!(check(k, &headers(Some("bearer   s3cret ")), None), Ok(()));
        assert_eq!(check(k, &headers(None), Some("a=1&api_key=s3cret")), Ok(()));
        assert_eq!(check(k, &headers(None), Some("api_key=s3cr%65t")), Ok(()));
        assert_eq!(check(k, &headers(None), None), Err(AuthError::Missing));
        assert_eq!(
            check(k, &headers(None), Some("a=1")),
            Err(AuthError::Missing)
        );
        assert_eq!(
            check(k, &headers(Some("Bearer nope")), None),
            Err(AuthError::Wrong)
        );
        assert_eq!(
            check(k, &headers(Some("Basic czNjcmV0")), None),
            Err(AuthError::Wrong)
        );
        assert_eq!(
            check(k, &headers(None), Some("api_key=s3cre")),
            Err(AuthError::Wrong)
        );
        assert_eq!(
            check(k, &headers(None), Some("api_key=")),
            Err(AuthError::Wrong)
        );
        // A wrong header does not hide a right query key.
        assert_eq!(
            check(k, &headers(Some("Bearer nope")), Some("api_key=s3cret")),
            Ok(())
        );
    }

    #[test]
    fn api_key_is_stripped_from_uris() {
        let uri: Uri = "/api/tags?api_key=s3cret&x=1".parse().unwrap();
        let stripped = strip_api_key(&uri).unwrap();
        assert_eq!(stripped.to_string(), "/api/tags?x=1");
        let uri: Uri = "/api/tags?api_key=s3cret".parse().unwrap();
        assert_eq!(strip_api_key(&uri).unwrap().to_string(), "/api/tags");
        let uri: Uri = "/api/tags?api%5Fkey=s3cret".parse().unwrap();
        assert_eq!(strip_api_key(&uri).unwrap().to_string(), "/api/tags");
        let uri: Uri = "/api/tags?x=1".parse().unwrap();
        assert!(strip_api_key(&uri).is_none());
    }

    #[test]
    fn liveness_routes_are_public() {
        assert!(is_public(&Method::GET, "/"));
        assert!(is_public(&Method::HEAD, "/"));
        assert!(is_public(&Method::GET, "/health"));
        assert!(is_public(&Method::HEAD, "/health"));
        assert!(!is_public(&Method::POST, "/health"));
        assert!(!is_public(&Method::GET, "/api/tags"));
        assert!(!is_public(&Method::POST, "/"));
        assert!(!is_public(&Method::GET, "/metrics"));
    }
}
