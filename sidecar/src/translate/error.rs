//! Error bodies in both client formats, and parsing of backend errors.
//!
//! Backends disagree on the error shape: OpenAI `{"error":{message,type,
//! param,code}}` with a string `code`; vLLM and llama.cpp the same with an
//! integer `code`; older vLLM a top-level `{"object":"error",message,..}`;
//! FastAPI `{"detail":..}`; Ollama `{"error":"text"}`; proxies in between
//! plain text or HTML. [`UpstreamError::parse`] accepts all of them and never
//! fails, so the client always gets an error in its own format.

use http::StatusCode;
use serde_json::{Map, Value, json};

/// Longest message taken from a non-JSON error body (an HTML error page from
/// a proxy in front of the backend would otherwise flood the client).
const MAX_TEXT_MESSAGE: usize = 512;

/// An Ollama error body: `{"error":"<msg>"}`.
pub fn ollama_error(msg: &str) -> Value {
    json!({ "error": msg })
}

/// An OpenAI error body: `{"error":{"message","type","param":null,"code"}}`.
pub fn openai_error(msg: &str, error_type: &str, code: Option<&str>) -> Value {
    json!({
        "error": {
            "message": msg,
            "type": error_type,
            "param": null,
            "code": code,
        }
    })
}

/// An Anthropic Messages API error body:
/// `{"type":"error","error":{"type","message"}}`, typed by status as the
/// Anthropic API does.
pub fn anthropic_error(msg: &str, status: StatusCode) -> Value {
    let error_type = match status.as_u16() {
        400 | 405 | 415 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    };
    json!({"type": "error", "error": {"type": error_type, "message": msg}})
}

/// The OpenAI error `type` conventionally used for a status.
pub fn openai_error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        500..=599 => "server_error",
        _ => "invalid_request_error",
    }
}

/// An error a backend reported, normalized from any of the shapes above.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct UpstreamError {
    /// The backend's HTTP status (for in-stream errors: the error's integer
    /// `code` when it is a valid 4xx/5xx, else 500).
    pub status: StatusCode,
    /// Human-readable message (never empty).
    pub message: String,
    /// OpenAI `type`, when given (`invalid_request_error`,
    /// `exceed_context_size_error`, `NotFoundError`, …).
    pub error_type: Option<String>,
    /// `code`, with integer codes rendered as decimal strings.
    pub code: Option<String>,
    /// OpenAI `param` (the request field at fault), when given.
    pub param: Option<String>,
}

impl UpstreamError {
    /// Parses an error response body. Total: any bytes give an error.
    pub fn parse(status: StatusCode, body: &[u8]) -> Self {
        if let Ok(v) = serde_json::from_slice::<Value>(body)
            && let Some(e) = Self::from_value(status, &v)
        {
            return e;
        }
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        let message = if text.is_empty() {
            default_message(status)
        } else {
            truncate_chars(text, MAX_TEXT_MESSAGE)
        };
        Self {
            status,
            message,
            error_type: None,
            code: None,
            param: None,
        }
    }

    /// The error carried by a JSON object that arrived with a 2xx status or
    /// inside a stream (`data: {"error":..}`, an NDJSON `{"error":..}` line,
    /// old vLLM `{"object":"error",..}`); `None` if it is not an error.
    pub fn from_stream_value(v: &Value) -> Option<Self> {
        let obj = v.as_object()?;
        let is_error = obj.get("error").is_some_and(|e| !e.is_null())
            || obj.get("object").and_then(Value::as_str) == Some("error");
        if !is_error {
            return None;
        }
        let code_status = error_object(obj)
            .and_then(|e| e.get("code"))
            .and_then(Value::as_u64)
            .and_then(|c| u16::try_from(c).ok())
            .filter(|c| (400..=599).contains(c))
            .and_then(|c| StatusCode::from_u16(c).ok());
        Self::from_value(code_status.unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), v)
    }

    fn from_value(status: StatusCode, v: &Value) -> Option<Self> {
        let obj = v.as_object()?;
        let mut param = None;
        let (message, error_type, code) = if let Some(e) = error_object(obj) {
            param = e.get("param").and_then(Value::as_str).map(str::to_owned);
            (
                e.get("message").map(text_of),
                e.get("type").and_then(Value::as_str).map(str::to_owned),
                e.get("code").and_then(code_of),
            )
        } else if let Some(Value::String(s)) = obj.get("error") {
            (Some(s.clone()), None, None)
        } else if let Some(detail) = obj.get("detail") {
            (Some(text_of(detail)), None, None)
        } else if obj.contains_key("message") {
            (
                obj.get("message").map(text_of),
                obj.get("type").and_then(Value::as_str).map(str::to_owned),
                obj.get("code").and_then(code_of),
            )
        } else if let Some(e) = obj.get("error").filter(|e| !e.is_null()) {
            (Some(text_of(e)), None, None)
        } else {
            return None;
        };
        let message = message
            .map(|m| m.trim().to_owned())
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| default_message(status));
        Some(Self {
            status,
            message,
            error_type,
            code,
            param,
        })
    }

    /// The status to give an Ollama or OpenAI client for this backend error.
    ///
    /// The backend's own 4xx statuses pass through (400, 404, 413, 422, 429
    /// keep their meaning for the client), except 401/403: those mean the
    /// *sidecar's* configured backend key was refused, which is not the
    /// client's fault, so they become 502. 501 (a feature the backend
    /// lacks) and 503/504 stay, other 5xx become 502 Bad Gateway.
    pub fn ollama_status(&self) -> StatusCode {
        match self.status.as_u16() {
            401 | 403 => StatusCode::BAD_GATEWAY,
            501 | 503 | 504 => self.status,
            400..=499 => self.status,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// The message shown to clients (auth failures are labelled as the
    /// backend's, so the client does not think its own key was wrong).
    fn client_message(&self) -> String {
        match self.status.as_u16() {
            401 | 403 => format!(
                "backend rejected the router's credentials: {}",
                self.message
            ),
            _ => self.message.clone(),
        }
    }

    /// Status and `{"error":"..."}` body for an Ollama client.
    pub fn to_ollama(&self) -> (StatusCode, Value) {
        (self.ollama_status(), ollama_error(&self.client_message()))
    }

    /// Status and OpenAI error body for an OpenAI client.
    pub fn to_openai(&self) -> (StatusCode, Value) {
        let status = self.ollama_status();
        let error_type = match self.status.as_u16() {
            401 | 403 => openai_error_type(status),
            _ => self
                .error_type
                .as_deref()
                .unwrap_or_else(|| openai_error_type(status)),
        };
        let mut body = openai_error(&self.client_message(), error_type, self.code.as_deref());
        if let Some(param) = &self.param
            && let Some(error) = body.get_mut("error").and_then(Value::as_object_mut)
        {
            error.insert("param".into(), Value::String(param.clone()));
        }
        (status, body)
    }

    /// Status and Anthropic error body for an Anthropic Messages client.
    pub fn to_anthropic(&self) -> (StatusCode, Value) {
        let status = self.ollama_status();
        (status, anthropic_error(&self.client_message(), status))
    }

    /// A 404 that names nothing: FastAPI's `Not Found` (vLLM,
    /// llama-cpp-python), llama.cpp's `File Not Found`, Go's and gin's
    /// `404 page not found` (Ollama's unknown route), or no body at all.
    /// The backend has no such route; a missing model is named in the text.
    pub fn is_missing_route(&self) -> bool {
        let message = self.message.trim();
        self.status == StatusCode::NOT_FOUND
            && (message.eq_ignore_ascii_case("not found")
                || message.eq_ignore_ascii_case("file not found")
                || message.eq_ignore_ascii_case("404 page not found")
                || message == default_message(StatusCode::NOT_FOUND))
    }

    /// 501 Not Implemented: the backend does not offer what the request
    /// asks for (llama-server: embeddings without `--embeddings`,
    /// `not_supported_error`). Like a missing route, another endpoint may.
    pub fn is_unsupported(&self) -> bool {
        self.status == StatusCode::NOT_IMPLEMENTED
    }

    /// A missing model: 404 with `not found` / `does not exist`, or code
    /// `model_not_found` (Ollama, vLLM and OpenAI texts); never a bare
    /// missing route ([`UpstreamError::is_missing_route`]), whose text says
    /// `Not Found` too. The proxy tries such a request on another endpoint;
    /// other 4xx (a prompt over the context size among them) are the
    /// request's and go back as they are.
    pub fn is_model_not_found(&self) -> bool {
        let msg = self.message.to_ascii_lowercase();
        self.code.as_deref() == Some("model_not_found")
            || (self.status == StatusCode::NOT_FOUND
                && !self.is_missing_route()
                && (msg.contains("not found") || msg.contains("does not exist")))
    }
}

/// The nested `error` object, if the body has one.
fn error_object(obj: &Map<String, Value>) -> Option<&Map<String, Value>> {
    obj.get("error").and_then(Value::as_object)
}

/// A string stays itself; anything else is rendered as JSON.
fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// `code` as string: string codes as-is, integer codes in decimal.
fn code_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn default_message(status: StatusCode) -> String {
    format!(
        "backend returned {} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("error")
    )
}

fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn openai_string_code() {
        let body = br#"{"error":{"message":"The model `gpt-x` does not exist","type":"invalid_request_error","param":"model","code":"model_not_found"}}"#;
        let e = UpstreamError::parse(StatusCode::NOT_FOUND, body);
        assert_eq!(e.code.as_deref(), Some("model_not_found"));
        assert!(e.is_model_not_found());
        let (s, v) = e.to_ollama();
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert_eq!(v, json!({"error": "The model `gpt-x` does not exist"}));
        // An OpenAI client gets the field at fault back.
        assert_eq!(e.to_openai().1["error"]["param"], "model");
        let no_param = br#"{"error":{"message":"x","type":"invalid_request_error"}}"#;
        let (_, v) = UpstreamError::parse(StatusCode::BAD_REQUEST, no_param).to_openai();
        assert_eq!(v["error"]["param"], Value::Null);
    }

    #[test]
    fn llama_cpp_int_code_and_context_overflow() {
        let body = br#"{"error":{"code":400,"message":"the request exceeds the available context size, try increasing it","type":"exceed_context_size_error","n_prompt_tokens":5000,"n_ctx":4096}}"#;
        let e = UpstreamError::parse(StatusCode::BAD_REQUEST, body);
        assert_eq!(e.code.as_deref(), Some("400"));
        assert!(!e.is_model_not_found());
        let (s, v) = e.to_openai();
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(v["error"]["type"], "exceed_context_size_error");
        assert_eq!(v["error"]["code"], "400");
    }

    #[test]
    fn vllm_shapes() {
        let body = br#"{"error":{"message":"The model `x` does not exist.","type":"NotFoundError","param":"model","code":404}}"#;
        let e = UpstreamError::parse(StatusCode::NOT_FOUND, body);
        assert!(e.is_model_not_found());
        assert!(!e.is_missing_route());
        let old = br#"{"object":"error","message":"This model's maximum context length is 4096 tokens.","type":"BadRequestError","param":null,"code":400}"#;
        let e = UpstreamError::parse(StatusCode::BAD_REQUEST, old);
        assert_eq!(e.error_type.as_deref(), Some("BadRequestError"));
        let fastapi = br#"{"detail":"Not Found"}"#;
        let e = UpstreamError::parse(StatusCode::NOT_FOUND, fastapi);
        assert_eq!(e.message, "Not Found");
        assert!(e.is_missing_route());
        assert!(!e.is_model_not_found());
        // llama.cpp's unknown route, and a bare 404.
        let llama =
            br#"{"error":{"code":404,"message":"File Not Found","type":"not_found_error"}}"#;
        assert!(UpstreamError::parse(StatusCode::NOT_FOUND, llama).is_missing_route());
        assert!(UpstreamError::parse(StatusCode::NOT_FOUND, b"").is_missing_route());
        // Ollama's (gin's) unknown route: plain text, and not a missing model.
        let gin = UpstreamError::parse(StatusCode::NOT_FOUND, b"404 page not found");
        assert!(gin.is_missing_route());
        assert!(!gin.is_model_not_found());
        // Ollama's missing model is named: not a missing route.
        let ollama = br#"{"error":"model 'llama3' not found"}"#;
        assert!(!UpstreamError::parse(StatusCode::NOT_FOUND, ollama).is_missing_route());
    }

    #[test]
    fn ollama_shape_and_non_json() {
        let e = UpstreamError::parse(
            StatusCode::SERVICE_UNAVAILABLE,
            br#"{"error":"server busy, please try again.  maximum pending requests exceeded"}"#,
        );
        assert_eq!(e.ollama_status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(e.message.starts_with("server busy"));
        let e = UpstreamError::parse(StatusCode::BAD_GATEWAY, b"<html>bad gateway</html>");
        assert_eq!(e.message, "<html>bad gateway</html>");
        let e = UpstreamError::parse(StatusCode::INTERNAL_SERVER_ERROR, b"");
        assert_eq!(e.message, "backend returned 500 Internal Server Error");
        assert_eq!(e.ollama_status(), StatusCode::BAD_GATEWAY);
        let long = "x".repeat(2000);
        let e = UpstreamError::parse(StatusCode::INTERNAL_SERVER_ERROR, long.as_bytes());
        assert_eq!(e.message.chars().count(), MAX_TEXT_MESSAGE + 1);
    }

    #[test]
    fn backend_auth_failure_is_not_the_clients() {
        let body =
            br#"{"error":{"code":401,"message":"Invalid API Key","type":"authentication_error"}}"#;
        let e = UpstreamError::parse(StatusCode::UNAUTHORIZED, body);
        let (s, v) = e.to_ollama();
        assert_eq!(s, StatusCode::BAD_GATEWAY);
        assert!(v["error"].as_str().unwrap().contains("Invalid API Key"));
        let (s, v) = e.to_openai();
        assert_eq!(s, StatusCode::BAD_GATEWAY);
        assert_eq!(v["error"]["type"], "server_error");
    }

    #[test]
    fn in_stream_errors() {
        let v = json!({"error":{"code":503,"message":"Loading model","type":"unavailable_error"}});
        let e = UpstreamError::from_stream_value(&v).unwrap();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.message, "Loading model");
        let v = json!({"error":{"message":"boom","code":"server_error"}});
        assert_eq!(
            UpstreamError::from_stream_value(&v).unwrap().status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            UpstreamError::from_stream_value(&json!({"error":"x"}))
                .unwrap()
                .message,
            "x"
        );
        assert!(UpstreamError::from_stream_value(&json!({"choices":[]})).is_none());
        assert!(UpstreamError::from_stream_value(&json!({"error":null,"choices":[]})).is_none());
    }

    #[test]
    fn builders() {
        assert_eq!(ollama_error("m"), json!({"error":"m"}));
        assert_eq!(
            openai_error("m", "invalid_request_error", Some("c")),
            json!({"error":{"message":"m","type":"invalid_request_error","param":null,"code":"c"}})
        );
        assert_eq!(openai_error_type(StatusCode::NOT_FOUND), "not_found_error");
    }
}
