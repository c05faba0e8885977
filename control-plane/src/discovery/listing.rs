//! Parsing of the model listings backends answer to discovery probes:
//! Ollama `/api/tags` and `/api/ps`, OpenAI-style `{base}/models`, and
//! llama-server's `{base}/models` with its per-model `status`.
//!
//! Unknown fields are ignored (backends add fields often); a missing required
//! field is an error naming it. Names keep the spelling the backend uses;
//! normalization happens in the state, not here. Duplicates are dropped,
//! first occurrence kept.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value};

/// A listing that does not have the expected shape. The message never quotes
/// the body (it may be large or contain anything).
#[derive(Debug, thiserror::Error)]
pub enum ListingError {
    /// Not JSON, or the wrong JSON shape.
    #[error("invalid listing: {0}")]
    Json(#[from] serde_json::Error),
    /// An item without a usable name.
    #[error("invalid listing: {field}: missing or empty")]
    MissingName {
        /// Path of the field, e.g. `models[2].name`.
        field: String,
    },
}

#[derive(Deserialize)]
struct OllamaList {
    /// `null` is what some builds send for an empty list.
    models: Option<Vec<Map<String, Value>>>,
}

/// An Ollama listing: the model names and, for each, the item's JSON text.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct OllamaListing {
    /// Names, first occurrence kept.
    pub names: Vec<String>,
    /// The item of each name, in the same order, as JSON object text.
    pub items: Vec<Arc<str>>,
}

#[derive(Deserialize)]
struct OpenAiList {
    data: Option<Vec<Map<String, Value>>>,
}

/// An OpenAI-style `{base}/models` listing: the model ids and, for each,
/// the `data` item's JSON text.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct OpenAiListing {
    /// Ids, first occurrence kept.
    pub names: Vec<String>,
    /// The item of each id, in the same order, as JSON object text.
    pub items: Vec<Arc<str>>,
}

#[derive(Deserialize)]
struct OpenAiItem {
    id: Option<String>,
    /// llama-server router mode only; see [`LlamaStatus`].
    #[serde(default)]
    status: Option<LlamaStatus>,
}

/// llama-server's model status, in the three forms seen in the wild:
/// `{"value":"loaded", ...}`, a bare `"loaded"`, or absent (meaning loaded:
/// single-model servers do not send it).
#[derive(Deserialize)]
#[serde(untagged)]
enum LlamaStatus {
    Text(String),
    Object { value: String },
}

impl LlamaStatus {
    fn is_loaded(&self) -> bool {
        let value = match self {
            Self::Text(v) | Self::Object { value: v } => v,
        };
        value.eq_ignore_ascii_case("loaded")
    }
}

fn push_unique(names: &mut Vec<String>, name: String) {
    if !names.contains(&name) {
        names.push(name);
    }
}

/// An Ollama `GET /api/tags` or `/api/ps` body: `models[].name` (or
/// `model`, which older and newer builds both send) and each item's JSON.
pub fn parse_ollama_listing(body: &[u8]) -> Result<OllamaListing, ListingError> {
    let list: OllamaList = serde_json::from_slice(body)?;
    let mut listing = OllamaListing::default();
    for (i, item) in list.models.unwrap_or_default().into_iter().enumerate() {
        let text = |key: &str| {
            item.get(key)
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
        };
        let name = text("name")
            .or_else(|| text("model"))
            .ok_or_else(|| ListingError::MissingName {
                field: format!("models[{i}].name"),
            })?
            .to_owned();
        if !listing.names.contains(&name) {
            listing.names.push(name);
            listing.items.push(Value::Object(item).to_string().into());
        }
    }
    Ok(listing)
}

/// One `data` item of an OpenAI-style listing.
struct DataItem {
    /// Its `id`, not empty.
    id: String,
    /// llama-server's status, if it has one.
    status: Option<LlamaStatus>,
    /// The item itself (a JSON object).
    item: Value,
}

fn openai_items(body: &[u8]) -> Result<Vec<DataItem>, ListingError> {
    let list: OpenAiList = serde_json::from_slice(body)?;
    list.data
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, fields)| {
            let item = Value::Object(fields);
            let OpenAiItem { id, status } = OpenAiItem::deserialize(&item)?;
            match id.filter(|id| !id.is_empty()) {
                Some(id) => Ok(DataItem { id, status, item }),
                None => Err(ListingError::MissingName {
                    field: format!("data[{i}].id"),
                }),
            }
        })
        .collect()
}

/// Adds `id` and its item to `listing` unless the id is there already.
fn push_item(listing: &mut OpenAiListing, id: String, item: &Value) {
    if !listing.names.contains(&id) {
        listing.names.push(id);
        listing.items.push(item.to_string().into());
    }
}

/// Advertised models from an OpenAI-style `GET {base}/models` (`data[].id`)
/// and each one's item.
pub fn parse_openai_models(body: &[u8]) -> Result<OpenAiListing, ListingError> {
    let mut listing = OpenAiListing::default();
    for DataItem { id, item, .. } in openai_items(body)? {
        push_item(&mut listing, id, &item);
    }
    Ok(listing)
}

/// Advertised models (with each one's item) and loaded models from
/// llama-server's `GET {base}/models`: every item is advertised; it is
/// loaded when its `status` says `loaded` or carries no status at all.
pub fn parse_llama_server_models(
    body: &[u8],
) -> Result<(OpenAiListing, Vec<String>), ListingError> {
    let mut advertised = OpenAiListing::default();
    let mut loaded = Vec::new();
    for DataItem { id, status, item } in openai_items(body)? {
        if status.as_ref().is_none_or(LlamaStatus::is_loaded) {
            push_unique(&mut loaded, id.clone());
        }
        push_item(&mut advertised, id, &item);
    }
    Ok((advertised, loaded))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn ollama_tags_and_ps() {
        let tags = br#"{"models":[
            {"name":"qwen3:8b","model":"qwen3:8b","modified_at":"2025-05-10T08:06:48-07:00","size":5225388164,
             "digest":"abc","details":{"format":"gguf","family":"qwen3","families":["qwen3"],
             "parameter_size":"8.2B","quantization_level":"Q4_K_M"},"capabilities":["completion"]},
            {"model":"llama3.2:latest"},
            {"name":"qwen3:8b"}]}"#;
        assert_eq!(
            parse_ollama_listing(tags).unwrap().names,
            ["qwen3:8b", "llama3.2:latest"]
        );
        let ps = br#"{"models":[{"name":"qwen3:8b","model":"qwen3:8b","size":1,"digest":"d",
            "expires_at":"2025-05-10T08:06:48-07:00","size_vram":1,"context_length":4096}]}"#;
        assert_eq!(parse_ollama_listing(ps).unwrap().names, ["qwen3:8b"]);
        // Each name's item is kept whole, unknown fields included; the
        // duplicate's item is not.
        let listing = parse_ollama_listing(tags).unwrap();
        assert_eq!(listing.items.len(), 2);
        let first: Value = serde_json::from_str(&listing.items[0]).unwrap();
        assert_eq!(first["size"], 5_225_388_164_u64);
        assert_eq!(first["digest"], "abc");
        assert_eq!(first["details"]["parameter_size"], "8.2B");
        assert_eq!(first["capabilities"][0], "completion");
        let second: Value = serde_json::from_str(&listing.items[1]).unwrap();
        assert_eq!(second, serde_json::json!({"model": "llama3.2:latest"}));
        assert!(
            parse_ollama_listing(br#"{"models":[]}"#)
                .unwrap()
                .names
                .is_empty()
        );
        assert!(
            parse_ollama_listing(br#"{"models":null}"#)
                .unwrap()
                .names
                .is_empty()
        );
    }

    #[test]
    fn ollama_errors_name_the_field() {
        let err = parse_ollama_listing(br#"{"models":[{"name":"a"},{"size":3}]}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid listing: models[1].name: missing or empty"
        );
        assert!(matches!(
            parse_ollama_listing(b"<html>oops</html>").unwrap_err(),
            ListingError::Json(_)
        ));
    }

    #[test]
    fn openai_models() {
        let body = br#"{"object":"list","data":[
            {"id":"gpt-4o","object":"model","created":1700000000,"owned_by":"org"},
            {"id":"text-embedding-3-small","object":"model"}]}"#;
        let listing = parse_openai_models(body).unwrap();
        assert_eq!(listing.names, ["gpt-4o", "text-embedding-3-small"]);
        // Each id's item is kept whole, unknown fields included.
        let first: Value = serde_json::from_str(&listing.items[0]).unwrap();
        assert_eq!(
            first,
            serde_json::json!({"id":"gpt-4o","object":"model","created":1700000000,"owned_by":"org"})
        );
        let vllm = br#"{"data":[{"id":"m","max_model_len":32768,"root":"/w/m","permission":[]},
            {"id":"m","max_model_len":1}]}"#;
        let listing = parse_openai_models(vllm).unwrap();
        // The duplicate and its item are dropped, the first kept.
        assert_eq!(listing.names, ["m"]);
        assert_eq!(listing.items.len(), 1);
        let item: Value = serde_json::from_str(&listing.items[0]).unwrap();
        assert_eq!(item["max_model_len"], 32768);
        assert_eq!(item["root"], "/w/m");
        let err = parse_openai_models(br#"{"data":[{"object":"model"}]}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid listing: data[0].id: missing or empty"
        );
    }

    #[test]
    fn llama_server_status_in_all_three_forms() {
        let body = br#"{"object":"list","data":[
            {"id":"ggml-org/gemma-3-4b-it-GGUF:Q4_K_M","path":"/m/x.gguf",
             "status":{"value":"loaded","args":["llama-server","-ctx","4096"]}},
            {"id":"unsloth/gpt-oss-20b-GGUF:Q8_0","status":{"value":"unloaded","failed":true,"exit_code":1}},
            {"id":"bare-loaded","status":"loaded"},
            {"id":"bare-sleeping","status":"sleeping"},
            {"id":"loading","status":{"value":"loading"}},
            {"id":"downloading","status":{"value":"downloading","progress":{"u":{"done":1,"total":2}}}},
            {"id":"single-model","owned_by":"llamacpp","meta":null},
            {"id":"null-status","status":null}]}"#;
        let (advertised, loaded) = parse_llama_server_models(body).unwrap();
        assert_eq!(advertised.names.len(), 8);
        assert_eq!(advertised.items.len(), 8);
        let first: Value = serde_json::from_str(&advertised.items[0]).unwrap();
        assert_eq!(first["path"], "/m/x.gguf");
        assert_eq!(first["status"]["args"][2], "4096");
        assert_eq!(
            loaded,
            [
                "ggml-org/gemma-3-4b-it-GGUF:Q4_K_M",
                "bare-loaded",
                "single-model",
                "null-status"
            ]
        );
    }
}
