//! Model-name normalization, the rules nomyo-router's routing relies on.
//!
//! - Ollama names without a tag mean `:latest`.
//! - A request for `x:latest` also matches an OpenAI/llama-server endpoint
//!   that lists plain `x`.
//! - llama-server names are tracked without HF org prefix and quantization
//!   suffix (`unsloth/gpt-oss-20b-GGUF:Q8_0` → `gpt-oss-20b-GGUF`), so usage
//!   of one model on several servers adds up.

use crate::endpoint::EndpointKind;

/// The canonical form of a name a client sent: an untagged name gets
/// `:latest`. Names with a tag (or a `/`-path with a tag) are unchanged.
pub fn canonical_request_name(name: &str) -> String {
    let name = name.trim();
    if has_tag(name) {
        name.to_owned()
    } else {
        format!("{name}:latest")
    }
}

/// True when the last path segment of `name` carries a `:tag`.
fn has_tag(name: &str) -> bool {
    let last = name.rsplit('/').next().unwrap_or(name);
    last.contains(':')
}

/// Strips a trailing `:latest`, if any.
pub fn strip_latest(name: &str) -> &str {
    name.strip_suffix(":latest").unwrap_or(name)
}

/// The name usage is counted under for a model an endpoint advertises.
pub fn tracking_name(kind: EndpointKind, advertised: &str) -> String {
    match kind {
        EndpointKind::Ollama => canonical_request_name(advertised),
        EndpointKind::OpenAi => strip_latest(advertised).to_owned(),
        EndpointKind::LlamaServer => llama_server_tracking_name(advertised),
    }
}

/// `unsloth/gpt-oss-20b-GGUF:Q8_0` → `gpt-oss-20b-GGUF`; a path like
/// `/models/foo.gguf` → `foo.gguf`.
pub fn llama_server_tracking_name(advertised: &str) -> String {
    let last = advertised.rsplit('/').next().unwrap_or(advertised);
    let base = match last.split_once(':') {
        Some((base, _quant)) => base,
        None => last,
    };
    base.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untagged_means_latest() {
        assert_eq!(canonical_request_name("llama3"), "llama3:latest");
        assert_eq!(canonical_request_name("llama3:8b"), "llama3:8b");
        assert_eq!(canonical_request_name("hf.co/org/m"), "hf.co/org/m:latest");
        assert_eq!(canonical_request_name("hf.co/org/m:Q4"), "hf.co/org/m:Q4");
    }

    /// Requests and advertised names match by canonical form (the index
    /// the policy looks candidates up in is keyed the same way, see
    /// `policy::index_key`).
    #[test]
    fn latest_matches_untagged_openai_ids() {
        let matches = |advertised: &str, requested: &str| {
            canonical_request_name(advertised) == canonical_request_name(requested)
        };
        assert!(matches("gpt-4o", "gpt-4o:latest"));
        assert!(matches("gpt-4o", "gpt-4o"));
        assert!(matches("llama3:latest", "llama3"));
        assert!(matches("llama3", "llama3:latest"));
        assert!(!matches("llama3:8b", "llama3"));
        assert!(matches(
            "unsloth/gpt-oss-20b-GGUF:Q8_0",
            "unsloth/gpt-oss-20b-GGUF:Q8_0"
        ));
    }

    #[test]
    fn llama_server_names_are_tracked_without_org_and_quant() {
        assert_eq!(
            tracking_name(EndpointKind::LlamaServer, "unsloth/gpt-oss-20b-GGUF:Q8_0"),
            "gpt-oss-20b-GGUF"
        );
        assert_eq!(
            tracking_name(EndpointKind::LlamaServer, "gpt-oss-20b-GGUF"),
            "gpt-oss-20b-GGUF"
        );
        assert_eq!(
            tracking_name(EndpointKind::Ollama, "llama3"),
            "llama3:latest"
        );
    }
}
