//! Browser access (CORS), as Ollama grants it: requests carrying an
//! `Origin` header are served only for allowed origins
//! (`allowed_origins`: Ollama's defaults — local pages on any port,
//! desktop and editor web views — plus the configured ones), and their
//! answers carry `Access-Control-Allow-Origin`. Preflights (`OPTIONS` with
//! `Access-Control-Request-Method`) are answered here, before the router
//! key check: browsers send no credentials on them. Requests without an
//! `Origin` (curl, SDKs, servers) are untouched.

use axum::{
    extract::Request,
    response::{IntoResponse, Response},
};
use http::{
    HeaderMap, HeaderValue, Method, StatusCode,
    header::{
        ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
        ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD,
        ORIGIN, VARY,
    },
};

use crate::{errors::ProxyError, routes::ApiFormat};

/// Methods a preflight may ask for.
const ALLOW_METHODS: &str = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS";
/// Headers allowed when a preflight names none.
const ALLOW_HEADERS: &str = "Authorization, Content-Type, User-Agent, Accept, X-Requested-With";

/// Whether `origin` matches `pattern`, where each `*` matches any text.
pub fn matches(pattern: &str, origin: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(first) = parts.next() else {
        return false;
    };
    let Some(mut rest) = origin.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No `*`: the whole origin must have matched.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Whether any of `allowed` matches `origin`.
pub fn allowed(allowed: &[String], origin: &str) -> bool {
    allowed.iter().any(|p| matches(p, origin))
}

/// What to do with a request before routing it.
pub(crate) enum Admission {
    /// No `Origin`: serve as usual, no CORS headers.
    Plain,
    /// An allowed origin: serve, then [`decorate`] the answer with it.
    Allowed(HeaderValue),
    /// Answered already: a preflight, or a refused origin.
    Answered(Response),
}

/// Decides on `req`'s origin against `allowed_origins`.
pub(crate) fn admit(allowed_origins: &[String], req: &Request) -> Admission {
    let Some(origin) = req.headers().get(ORIGIN) else {
        return Admission::Plain;
    };
    let text = origin.to_str().unwrap_or_default();
    if !allowed(allowed_origins, text) {
        let format = ApiFormat::for_path(req.uri().path());
        let refusal = ProxyError::OriginNotAllowed {
            origin: text.to_owned(),
        };
        return Admission::Answered(refusal.into_response_for(format));
    }
    if req.method() == Method::OPTIONS && req.headers().contains_key(ACCESS_CONTROL_REQUEST_METHOD)
    {
        return Admission::Answered(preflight(origin.clone(), req.headers()));
    }
    Admission::Allowed(origin.clone())
}

/// The answer to an allowed preflight.
fn preflight(origin: HeaderValue, request: &HeaderMap) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let headers = response.headers_mut();
    headers.insert(
        ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(ALLOW_METHODS),
    );
    let asked = request
        .get(ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned()
        .unwrap_or(HeaderValue::from_static(ALLOW_HEADERS));
    headers.insert(ACCESS_CONTROL_ALLOW_HEADERS, asked);
    headers.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("43200"));
    decorate(&mut response, origin);
    response
}

/// Marks an answer as readable by `origin`.
pub(crate) fn decorate(response: &mut Response, origin: HeaderValue) {
    let headers = response.headers_mut();
    headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.append(VARY, HeaderValue::from_static("Origin"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_like_ollamas() {
        assert!(matches("http://localhost", "http://localhost"));
        assert!(!matches("http://localhost", "http://localhost:3000"));
        assert!(matches("http://localhost:*", "http://localhost:3000"));
        assert!(!matches("http://localhost:*", "http://localhost.evil.com"));
        assert!(matches("app://*", "app://obsidian.md"));
        assert!(matches("*", "https://anything.example"));
        assert!(matches("https://*.example.com", "https://chat.example.com"));
        assert!(!matches(
            "https://*.example.com",
            "https://example.com.evil"
        ));
        assert!(matches("a*b*c", "a-b-b-c"));
        assert!(!matches("a*b*c", "a-c"));
        assert!(!matches("ab*ba", "aba"));
    }
}
