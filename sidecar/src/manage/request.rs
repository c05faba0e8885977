//! Validation of a model-management body, before any endpoint is chosen:
//! JSON object, the model named (`model`, or `name` from older clients;
//! `source` and `destination` for copy), `stream` a boolean if present.
//!
//! Management bodies are small (a name, a Modelfile's fields), so unlike
//! the inference path the body is parsed into a tree: progress operations
//! are forwarded with `stream: true` set (the sidecar merges the progress
//! itself, see [`crate::manage`]); copy and delete bodies go as received.

use bytes::Bytes;
use serde_json::{Map, Value};

use super::Operation;
use crate::errors::ProxyError;

/// A validated management request.
#[derive(Clone, Debug, PartialEq)]
pub struct ManageRequest {
    /// The model the targets are chosen by: `model`/`name`, or copy's
    /// `source`.
    pub model: String,
    /// Whether the client wants the progress streamed (progress operations
    /// only; Ollama's default is to stream).
    pub stream: bool,
    /// The body to send to each endpoint.
    pub forward: Bytes,
}

/// Validates `body` for `op`.
pub fn parse(op: Operation, body: &Bytes) -> Result<ManageRequest, ProxyError> {
    let mut fields = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(fields)) => fields,
        Ok(_) => return Err(ProxyError::NotAnObject),
        Err(e) => return Err(ProxyError::InvalidJson(e.to_string())),
    };
    let model = match op {
        Operation::Copy => {
            let source = string_field(&fields, "source")?
                .ok_or(ProxyError::MissingField { field: "source" })?;
            string_field(&fields, "destination")?.ok_or(ProxyError::MissingField {
                field: "destination",
            })?;
            source
        }
        Operation::Pull | Operation::Push | Operation::Create | Operation::Delete => {
            match string_field(&fields, "model")? {
                Some(model) => model,
                None => string_field(&fields, "name")?.ok_or(ProxyError::MissingModel)?,
            }
        }
    };
    if !op.reports_progress() {
        return Ok(ManageRequest {
            model,
            stream: false,
            forward: body.clone(),
        });
    }
    let stream = match fields.get("stream") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ProxyError::InvalidField {
                field: "stream",
                problem: "must be a boolean",
            });
        }
    };
    fields.insert("stream".into(), Value::Bool(true));
    let forward = serde_json::to_vec(&Value::Object(fields))
        .map(Bytes::from)
        .map_err(|e| ProxyError::Internal(format!("cannot serialize the request body: {e}")))?;
    Ok(ManageRequest {
        model,
        stream,
        forward,
    })
}

/// A string field, trimmed; `None` when absent, null or blank.
fn string_field(
    fields: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<String>, ProxyError> {
    match fields.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            let s = s.trim();
            Ok((!s.is_empty()).then(|| s.to_owned()))
        }
        Some(_) => Err(ProxyError::InvalidField {
            field,
            problem: "must be a string",
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn p(op: Operation, body: &str) -> Result<ManageRequest, ProxyError> {
        parse(op, &Bytes::from(body.to_owned()))
    }

    #[test]
    fn progress_operations_stream_by_default_and_always_upstream() {
        let r = p(Operation::Pull, r#"{"model":"llama3","insecure":true}"#).unwrap();
        assert_eq!(r.model, "llama3");
        assert!(r.stream);
        let sent: Value = serde_json::from_slice(&r.forward).unwrap();
        assert_eq!(sent["stream"], true);
        assert_eq!(sent["insecure"], true);
        let r = p(
            Operation::Create,
            r#"{"model":"m","from":"llama3","stream":false}"#,
        )
        .unwrap();
        assert!(!r.stream);
        let sent: Value = serde_json::from_slice(&r.forward).unwrap();
        assert_eq!(sent["stream"], true, "the sidecar merges progress itself");
        assert_eq!(sent["from"], "llama3");
        // Older clients name the model `name`.
        assert_eq!(
            p(Operation::Push, r#"{"name":"me/m"}"#).unwrap().model,
            "me/m"
        );
    }

    #[test]
    fn copy_and_delete_bodies_go_as_received() {
        let body = r#"{"source":"a", "destination":"b"}"#;
        let r = p(Operation::Copy, body).unwrap();
        assert_eq!((r.model.as_str(), &r.forward[..]), ("a", body.as_bytes()));
        let r = p(Operation::Delete, r#"{"name":"a"}"#).unwrap();
        assert_eq!(r.model, "a");
    }

    #[test]
    fn bad_bodies_are_400() {
        for (op, body) in [
            (Operation::Pull, "not json"),
            (Operation::Pull, "[1]"),
            (Operation::Pull, "{}"),
            (Operation::Pull, r#"{"model":"  "}"#),
            (Operation::Pull, r#"{"model":7}"#),
            (Operation::Pull, r#"{"model":"m","stream":"yes"}"#),
            (Operation::Delete, r#"{"stream":true}"#),
            (Operation::Copy, r#"{"source":"a"}"#),
            (Operation::Copy, r#"{"destination":"b"}"#),
        ] {
            let e = p(op, body).unwrap_err();
            assert_eq!(e.status(), 400, "{op:?} {body}: {e}");
        }
        let e = p(Operation::Copy, r#"{"source":"a"}"#).unwrap_err();
        assert_eq!(e.to_string(), "missing `destination` in request body");
    }
}
