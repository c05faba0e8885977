//! Endpoint identity and kind: which API family a backend speaks and how its
//! URLs are formed. Kinds are an enum decided once at config load; nothing
//! else compares kind strings.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// The API family a backend speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointKind {
    /// Native Ollama: `/api/*`, plus its own OpenAI routes under `/v1`.
    Ollama,
    /// An OpenAI-compatible server (vLLM, hosted APIs). Base URL ends in `/v1`.
    OpenAi,
    /// llama.cpp `llama-server`: OpenAI-compatible, `/v1/models` has `status`.
    LlamaServer,
}

impl EndpointKind {
    /// All kinds, in a stable order.
    pub const ALL: [EndpointKind; 3] = [Self::Ollama, Self::OpenAi, Self::LlamaServer];

    /// The canonical name used in config, logs and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ollama => "ollama",
            Self::OpenAi => "openai",
            Self::LlamaServer => "llama_server",
        }
    }

    /// True for kinds that only speak the OpenAI API (Ollama-API requests
    /// must be translated for them).
    pub fn is_openai_only(self) -> bool {
        match self {
            Self::Ollama => false,
            Self::OpenAi | Self::LlamaServer => true,
        }
    }
}

impl fmt::Display for EndpointKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An endpoint kind name that is not one of `ollama`, `openai`, `llama_server`.
#[derive(Debug, thiserror::Error)]
#[error("unknown endpoint kind {0:?} (expected ollama, openai or llama_server)")]
pub struct UnknownEndpointKind(pub String);

impl FromStr for EndpointKind {
    type Err = UnknownEndpointKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ollama" => Ok(Self::Ollama),
            "openai" => Ok(Self::OpenAi),
            "llama_server" | "llama-server" => Ok(Self::LlamaServer),
            other => Err(UnknownEndpointKind(other.to_owned())),
        }
    }
}

/// The path of an `http(s)://host[:port]/path` URL (empty when it has
/// none), so a host such as `v1-gpu.internal` says nothing about the API.
pub fn url_path(url: &str) -> &str {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or(url);
    rest.find('/').map_or("", |at| &rest[at..])
}

/// Base URL for OpenAI-style routes (`{base}/models`, `{base}/chat/completions`).
///
/// OpenAI-compatible endpoints are configured with their `/v1` base (as
/// nomyo-router expects); a llama-server URL given without `/v1` gets it
/// appended. Ollama serves its OpenAI routes under `{url}/v1`.
pub fn openai_base(url: &str, kind: EndpointKind) -> String {
    let url = url.trim_end_matches('/');
    match kind {
        EndpointKind::OpenAi if url_path(url).contains("/v1") => url.to_owned(),
        EndpointKind::OpenAi | EndpointKind::LlamaServer | EndpointKind::Ollama => {
            if url.ends_with("/v1") {
                url.to_owned()
            } else {
                format!("{url}/v1")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_round_trips_through_its_name() {
        for kind in EndpointKind::ALL {
            assert_eq!(kind.as_str().parse::<EndpointKind>().ok(), Some(kind));
        }
        assert!("vllm".parse::<EndpointKind>().is_err());
    }

    #[test]
    fn openai_base_forms() {
        assert_eq!(
            openai_base("http://h:11434/", EndpointKind::Ollama),
            "http://h:11434/v1"
        );
        assert_eq!(
            openai_base("https://api.x.com/openai/v1", EndpointKind::OpenAi),
            "https://api.x.com/openai/v1"
        );
        assert_eq!(
            openai_base("http://h:8080", EndpointKind::LlamaServer),
            "http://h:8080/v1"
        );
        assert_eq!(
            openai_base("http://h:8080/v1", EndpointKind::LlamaServer),
            "http://h:8080/v1"
        );
    }

    #[test]
    fn only_the_path_says_v1() {
        assert_eq!(url_path("http://v1-gpu.internal:11434"), "");
        assert_eq!(url_path("https://api.x.com/openai/v1"), "/openai/v1");
        assert_eq!(url_path("http://h:8000/v1"), "/v1");
    }
}
