//! Model listings across API families: OpenAI/llama-server/vLLM model ids
//! rendered as Ollama `/api/tags`, `/api/ps` and `/api/show` answers, and
//! Ollama tag items rendered as OpenAI `/v1/models` items (an OpenAI-style
//! backend's own `/v1/models` items need no rendering: they are listed as
//! sent).
//!
//! Every function is total: missing or odd fields give empty/zero values,
//! never an error (nomyo-router's `/api/tags` failed with 500 when one
//! endpoint lacked an API key; listings here never depend on credentials or
//! on any one backend answering well). Names follow nomyo-router: an
//! untagged OpenAI id `x` is listed as `x:latest`.

use std::time::SystemTime;

use serde_json::{Map, Value, json};
use switchyard_control_plane::model_name::canonical_request_name;

use super::usage::num_u64;
use super::{EndpointKind, timestamp};

/// A llama-server model's load state (`/models` item `status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LoadState {
    /// Loaded and serving (also: `status` absent, as in single-model mode).
    Loaded,
    /// Being loaded.
    Loading,
    /// Known but not loaded.
    Unloaded,
    /// Unloaded by `--sleep-idle-seconds`; wakes on the next request.
    Sleeping,
    /// Being downloaded.
    Downloading,
    /// The last load failed (`unloaded` with `failed:true`).
    Failed,
    /// A status value this build does not know.
    Unknown,
}

/// The load state of a llama-server `/models` item; `status` may be an
/// object `{value,..}`, a bare string, or absent (= loaded).
pub fn llama_server_load_state(item: &Value) -> LoadState {
    let status = item.get("status");
    let (value, failed) = match status {
        None | Some(Value::Null) => return LoadState::Loaded,
        Some(Value::String(s)) => (s.as_str(), false),
        Some(Value::Object(o)) => (
            o.get("value").and_then(Value::as_str).unwrap_or("loaded"),
            o.get("failed").and_then(Value::as_bool).unwrap_or(false),
        ),
        Some(_) => return LoadState::Unknown,
    };
    match value.to_ascii_lowercase().as_str() {
        "loaded" => LoadState::Loaded,
        "loading" => LoadState::Loading,
        "unloaded" if failed => LoadState::Failed,
        "unloaded" => LoadState::Unloaded,
        "sleeping" => LoadState::Sleeping,
        "downloading" => LoadState::Downloading,
        _ => LoadState::Unknown,
    }
}

/// The serving context length a `/v1/models` item reveals: llama-server
/// router `status.args` (`-c`, `--ctx-size`, `-ctx`) or vLLM
/// `max_model_len`. (llama.cpp's `meta.n_ctx_train` is the training context,
/// not what the server runs with, so it is not used.)
pub fn model_context_length(item: &Value) -> Option<u64> {
    let args = item
        .get("status")
        .and_then(|s| s.get("args"))
        .and_then(Value::as_array);
    if let Some(args) = args {
        let from_args = args.windows(2).find_map(|w| {
            let flag = w[0].as_str()?;
            if matches!(flag, "-c" | "--ctx-size" | "-ctx") {
                w[1].as_str()?.parse::<u64>().ok().filter(|n| *n > 0)
            } else {
                None
            }
        });
        if from_args.is_some() {
            return from_args;
        }
    }
    num_u64(item.get("max_model_len")).filter(|n| *n > 0)
}

/// A model family when the name makes it obvious (`qwen3-8b` → `qwen3`),
/// else `""`. Families use Ollama's architecture names.
pub fn family_from_name(name: &str) -> &'static str {
    const FAMILIES: [(&str, &str); 14] = [
        ("qwen3", "qwen3"),
        ("qwen2.5", "qwen2"),
        ("qwen2", "qwen2"),
        ("gpt-oss", "gptoss"),
        ("gemma3", "gemma3"),
        ("gemma-3", "gemma3"),
        ("gemma2", "gemma2"),
        ("gemma-2", "gemma2"),
        ("gemma", "gemma"),
        ("llama", "llama"),
        ("phi3", "phi3"),
        ("phi-3", "phi3"),
        ("nomic-embed", "nomic-bert"),
        ("bert", "bert"),
    ];
    let base = base_name(name).to_ascii_lowercase();
    FAMILIES
        .iter()
        .find(|(needle, _)| base.contains(needle))
        .map_or("", |(_, family)| family)
}

/// Last path segment without `:tag` and `.gguf`.
fn base_name(name: &str) -> &str {
    let last = name.rsplit('/').next().unwrap_or(name);
    let last = last.split_once(':').map_or(last, |(b, _)| b);
    last.strip_suffix(".gguf").unwrap_or(last)
}

/// The quantization a llama-server `org/repo:QUANT` tag names (`Q4_K_M`,
/// `IQ3_XS`, `F16`, `BF16`, `MXFP4`), else `""`.
fn quantization_from_tag(name: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    let Some((_, tag)) = last.split_once(':') else {
        return String::new();
    };
    let upper = tag.to_ascii_uppercase();
    let b = upper.as_bytes();
    let quantish = (b.first() == Some(&b'Q') && b.get(1).is_some_and(u8::is_ascii_digit))
        || (upper.starts_with("IQ") && b.get(2).is_some_and(u8::is_ascii_digit))
        || matches!(upper.as_str(), "F16" | "F32" | "BF16" | "MXFP4");
    if quantish { upper } else { String::new() }
}

fn details(id: &str, kind: EndpointKind) -> Value {
    let family = family_from_name(id);
    let (format, quant) = match kind {
        EndpointKind::LlamaServer => ("gguf", quantization_from_tag(id)),
        EndpointKind::OpenAi | EndpointKind::Ollama => ("", String::new()),
    };
    let families: Vec<&str> = if family.is_empty() {
        vec![]
    } else {
        vec![family]
    };
    json!({
        "parent_model": "",
        "format": format,
        "family": family,
        "families": families,
        "parameter_size": "",
        "quantization_level": quant,
    })
}

/// An `/api/tags` item for an OpenAI-style model id.
pub fn tags_item(id: &str, kind: EndpointKind, modified_at: SystemTime) -> Value {
    let name = canonical_request_name(id);
    json!({
        "name": name,
        "model": name,
        "modified_at": timestamp::rfc3339_nanos(modified_at),
        "size": 0,
        "digest": "",
        "details": details(id, kind),
    })
}

/// Items of a `/v1/models` (or llama-server `/models`) body: `data[]` (or
/// `models[]`) entries with a string `id`.
fn model_entries(body: &Value) -> impl Iterator<Item = (&str, &Value)> {
    body.get("data")
        .or_else(|| body.get("models"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|item| {
            let id = item
                .get("id")
                .or_else(|| item.get("name"))
                .and_then(Value::as_str)?;
            (!id.is_empty()).then_some((id, item))
        })
}

/// An `/api/tags` item for model `id` with its `/v1/models` item `item`:
/// `modified_at` is the item's `created` (Unix seconds) or
/// `fallback_modified`.
pub fn tags_item_from_model(
    id: &str,
    item: &Value,
    kind: EndpointKind,
    fallback_modified: SystemTime,
) -> Value {
    tags_item(id, kind, created(item).unwrap_or(fallback_modified))
}

/// A `/v1/models` item's `created` (Unix seconds), when it has a positive
/// one: the `modified_at` of the model's Ollama listing items.
pub fn created(item: &Value) -> Option<SystemTime> {
    item.get("created")
        .and_then(Value::as_i64)
        .filter(|c| *c > 0)
        .map(timestamp::from_unix)
}

/// `/api/tags` items for every model of a `/v1/models` body
/// ([`tags_item_from_model`]).
pub fn tags_items_from_models(
    body: &Value,
    kind: EndpointKind,
    fallback_modified: SystemTime,
) -> Vec<Value> {
    model_entries(body)
        .map(|(id, item)| tags_item_from_model(id, item, kind, fallback_modified))
        .collect()
}

/// An `/api/ps` item for a loaded OpenAI-style model.
pub fn ps_item(
    id: &str,
    kind: EndpointKind,
    expires_at: SystemTime,
    context_length: Option<u64>,
) -> Value {
    let name = canonical_request_name(id);
    let mut obj = Map::new();
    obj.insert("name".into(), name.clone().into());
    obj.insert("model".into(), name.into());
    obj.insert("size".into(), 0.into());
    obj.insert("digest".into(), "".into());
    obj.insert("details".into(), details(id, kind));
    obj.insert(
        "expires_at".into(),
        timestamp::rfc3339_nanos(expires_at).into(),
    );
    obj.insert("size_vram".into(), 0.into());
    if let Some(n) = context_length {
        obj.insert("context_length".into(), n.into());
    }
    Value::Object(obj)
}

/// `/api/ps` items for the loaded models of a llama-server `/models` body.
pub fn ps_items_from_llama_server(body: &Value, expires_at: SystemTime) -> Vec<Value> {
    model_entries(body)
        .filter(|(_, item)| llama_server_load_state(item) == LoadState::Loaded)
        .map(|(id, item)| {
            ps_item(
                id,
                EndpointKind::LlamaServer,
                expires_at,
                model_context_length(item),
            )
        })
        .collect()
}

/// An `/api/show` answer for a model only an OpenAI-style backend serves:
/// no Modelfile, template or parameters are known, so those are empty.
pub fn show_response(id: &str, kind: EndpointKind, modified_at: SystemTime) -> Value {
    json!({
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": details(id, kind),
        "model_info": {},
        "capabilities": ["completion"],
        "modified_at": timestamp::rfc3339_nanos(modified_at),
    })
}

/// A `/v1/models` item for an Ollama `/api/tags` item: `id` is the name,
/// `created` the `modified_at` in Unix seconds (0 when unparsable),
/// `owned_by` the namespace (`library` when none). `None` without a name.
pub fn openai_model_from_tag(item: &Value) -> Option<Value> {
    let name = item
        .get("name")
        .or_else(|| item.get("model"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())?;
    let created = item
        .get("modified_at")
        .and_then(Value::as_str)
        .and_then(timestamp::parse_rfc3339_unix)
        .filter(|t| *t > 0)
        .unwrap_or(0);
    let path = name.split_once(':').map_or(name, |(p, _)| p);
    let mut segments: Vec<&str> = path.split('/').collect();
    segments.pop();
    let owned_by = segments
        .last()
        .copied()
        .filter(|s| !s.is_empty())
        .unwrap_or("library");
    Some(json!({"id": name, "object": "model", "created": created, "owned_by": owned_by}))
}

/// A `/v1/models` list body for an `/api/tags` body.
pub fn openai_models_from_tags(body: &Value) -> Value {
    let data: Vec<Value> = body
        .get("models")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(openai_model_from_tag)
        .collect();
    json!({"object": "list", "data": data})
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn tags_from_openai_and_llama_server_ids() {
        let body = json!({"object":"list","data":[
            {"id":"Qwen3-8B","object":"model","created":1735725600,"owned_by":"vllm","max_model_len":32768},
            {"id":"ggml-org/gemma-3-4b-it-GGUF:Q4_K_M","status":{"value":"loaded"}},
            {"id":""}, {"object":"model"}
        ]});
        let items = tags_items_from_models(&body, EndpointKind::LlamaServer, t(5));
        assert_eq!(items.len(), 2);
        assert_eq!(items[0]["name"], "Qwen3-8B:latest");
        assert_eq!(items[0]["model"], "Qwen3-8B:latest");
        assert_eq!(items[0]["modified_at"], "2025-01-01T10:00:00.000000000Z");
        assert_eq!(items[0]["size"], 0);
        assert_eq!(items[0]["digest"], "");
        assert_eq!(items[0]["details"]["family"], "qwen3");
        assert_eq!(items[0]["details"]["format"], "gguf");
        assert_eq!(items[1]["name"], "ggml-org/gemma-3-4b-it-GGUF:Q4_K_M");
        assert_eq!(items[1]["details"]["family"], "gemma3");
        assert_eq!(items[1]["details"]["quantization_level"], "Q4_K_M");
        assert_eq!(items[1]["modified_at"], "1970-01-01T00:00:05.000000000Z");

        let openai = tags_items_from_models(
            &json!({"data":[{"id":"gpt-4o-mini"}]}),
            EndpointKind::OpenAi,
            t(0),
        );
        assert_eq!(openai[0]["details"]["format"], "");
        assert_eq!(openai[0]["details"]["family"], "");
        assert_eq!(openai[0]["details"]["quantization_level"], "");
        // Garbage bodies give nothing rather than failing.
        assert!(tags_items_from_models(&json!("nope"), EndpointKind::OpenAi, t(0)).is_empty());
        assert!(
            tags_items_from_models(&json!({"data": null}), EndpointKind::OpenAi, t(0)).is_empty()
        );
    }

    #[test]
    fn load_states_in_all_three_forms() {
        assert_eq!(
            llama_server_load_state(&json!({"id":"a"})),
            LoadState::Loaded
        );
        assert_eq!(
            llama_server_load_state(&json!({"status":"loaded"})),
            LoadState::Loaded
        );
        assert_eq!(
            llama_server_load_state(&json!({"status":{"value":"loading"}})),
            LoadState::Loading
        );
        assert_eq!(
            llama_server_load_state(
                &json!({"status":{"value":"unloaded","failed":true,"exit_code":1}})
            ),
            LoadState::Failed
        );
        assert_eq!(
            llama_server_load_state(&json!({"status":"sleeping"})),
            LoadState::Sleeping
        );
        assert_eq!(
            llama_server_load_state(&json!({"status":{"value":"downloading"}})),
            LoadState::Downloading
        );
        assert_eq!(
            llama_server_load_state(&json!({"status":"weird"})),
            LoadState::Unknown
        );
    }

    #[test]
    fn ps_lists_only_loaded_llama_server_models() {
        let body = json!({"data":[
            {"id":"a:Q8_0","status":{"value":"loaded","args":["llama-server","-ctx","4096"]}},
            {"id":"b","status":{"value":"unloaded"}},
            {"id":"c","status":"loaded"},
            {"id":"d"}
        ]});
        let items = ps_items_from_llama_server(&body, t(100));
        let names: Vec<&str> = items.iter().map(|i| i["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["a:Q8_0", "c:latest", "d:latest"]);
        assert_eq!(items[0]["context_length"], 4096);
        assert_eq!(items[0]["size_vram"], 0);
        assert_eq!(items[0]["expires_at"], "1970-01-01T00:01:40.000000000Z");
        assert!(items[1].get("context_length").is_none());
        assert_eq!(
            model_context_length(&json!({"max_model_len": 32768})),
            Some(32768)
        );
    }

    #[test]
    fn show_for_openai_only_model() {
        let v = show_response("Qwen3-8B", EndpointKind::OpenAi, t(0));
        assert_eq!(v["capabilities"], json!(["completion"]));
        assert_eq!(v["model_info"], json!({}));
        assert_eq!(v["details"]["family"], "qwen3");
        assert_eq!(v["modelfile"], "");
    }

    #[test]
    fn tags_to_openai_models() {
        let tags = json!({"models":[
            {"name":"qwen3:8b","model":"qwen3:8b","modified_at":"2025-05-10T08:06:48-07:00","size":5225388164u64},
            {"name":"hf.co/unsloth/gemma:Q4","modified_at":"garbage"},
            {"model":"only-model:latest"},
            {"size":1}
        ]});
        let v = openai_models_from_tags(&tags);
        assert_eq!(v["object"], "list");
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len(), 3);
        assert_eq!(
            data[0],
            json!({"id":"qwen3:8b","object":"model","created":1_746_889_608,"owned_by":"library"})
        );
        assert_eq!(data[1]["owned_by"], "unsloth");
        assert_eq!(data[1]["created"], 0);
        assert_eq!(data[2]["id"], "only-model:latest");
        assert_eq!(openai_models_from_tags(&json!(null))["data"], json!([]));
    }

    #[test]
    fn families() {
        assert_eq!(
            family_from_name("meta-llama/Llama-3.1-8B-Instruct"),
            "llama"
        );
        assert_eq!(family_from_name("Qwen/Qwen2.5-7B"), "qwen2");
        assert_eq!(family_from_name("unsloth/gpt-oss-20b-GGUF:Q8_0"), "gptoss");
        assert_eq!(family_from_name("/models/foo.gguf"), "");
        assert_eq!(family_from_name("gpt-4o"), "");
    }
}
