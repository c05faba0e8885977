//! Endpoint identity and kind: which API family a backend speaks and how its
//! URLs are formed. Kinds are an enum decided once at config load; nothing
//! else compares kind strings.
//!
//! Credentials in an endpoint URL (`http://user:pass@host`): the configured
//! URL, userinfo included, stays the endpoint's identity inside the router
//! (config, cluster state, leases). Everything that shows a URL — logs,
//! metric labels, errors, the CLI — shows [`without_credentials`]; every
//! HTTP client connects to [`without_credentials`] and sends the userinfo
//! as `Authorization: Basic` ([`basic_authorization`]), unless the endpoint
//! has an API key ([`authorization`]).

use std::{borrow::Cow, fmt, str::FromStr};

use base64::Engine as _;

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

/// The length of `userinfo@` at the start of `after_scheme` (what follows
/// a URL's `://`), when it has one. The authority ends at the path, query
/// or fragment, or, for a URL quoted in a message, at a character no URL
/// holds unescaped (whitespace, quotes, ...); the userinfo's own
/// characters (`,` `;` `(` ...) are no end. The last `@` counts: an
/// unescaped `@` in a password is still userinfo (as `http::Uri` and
/// `reqwest` read it).
fn userinfo_len(after_scheme: &str) -> Option<usize> {
    let end = after_scheme
        .find(|c: char| c.is_whitespace() || "/?#\"`<>\\{}|^".contains(c))
        .unwrap_or(after_scheme.len());
    after_scheme[..end].rfind('@').map(|at| at + 1)
}

/// The byte range of `userinfo@` in an `http(s)://` URL, when it has one.
fn userinfo_span(url: &str) -> Option<(usize, usize)> {
    let start = url.find("://")? + 3;
    Some((start, start + userinfo_len(&url[start..])?))
}

/// `url` without its credentials (`http://user:pass@host/v1` becomes
/// `http://host/v1`): the form in which an endpoint URL is shown (logs,
/// metric labels, errors, `/api/usage`, the CLI) and the one HTTP clients
/// connect to. Borrowed when there is nothing to remove.
pub fn without_credentials(url: &str) -> Cow<'_, str> {
    match userinfo_span(url) {
        Some((start, end)) => Cow::Owned(format!("{}{}", &url[..start], &url[end..])),
        None => Cow::Borrowed(url),
    }
}

/// `text` with the credentials of every URL in it removed (each
/// `scheme://user:pass@` becomes `scheme://`): for messages that quote
/// URLs among other words, such as a YAML error's key path.
pub fn text_without_credentials(text: &str) -> Cow<'_, str> {
    if !text.contains('@') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let start = i + 3;
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        if let Some(len) = userinfo_len(rest) {
            rest = &rest[len..];
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// The `Authorization` value for the credentials in `url`'s userinfo:
/// `Basic base64(user:pass)`, user and password percent-decoded (a
/// password with `@` or `:` is written `%40`, `%3A`); `user:` when there is
/// no password. `None` without userinfo (or with an empty one).
pub fn basic_authorization(url: &str) -> Option<String> {
    let (start, end) = userinfo_span(url)?;
    let userinfo = &url[start..end - 1];
    if userinfo.is_empty() {
        return None;
    }
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let mut plain = percent_decode(user);
    plain.push(b':');
    plain.extend(percent_decode(password));
    Some(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(plain)
    ))
}

/// The `Authorization` value for requests to the endpoint at `url`: its API
/// key as `Bearer` when it has one, else the URL's credentials as `Basic`
/// ([`basic_authorization`]), else none. One header, never both: the key
/// is the explicit setting (`api_keys`), and a server that takes a bearer
/// key does not also want Basic credentials in the same field.
pub fn authorization(url: &str, api_key: Option<&str>) -> Option<String> {
    match api_key {
        Some(key) => Some(format!("Bearer {key}")),
        None => basic_authorization(url),
    }
}

/// `%XX` escapes decoded to bytes (a `%` not followed by two hex digits is
/// kept as is).
fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let escaped = (b == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match escaped {
            Some(v) => {
                out.push(v);
                i += 3;
            }
            None => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
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
    fn every_url_in_a_text_loses_its_credentials() {
        assert_eq!(
            text_without_credentials(
                "endpoint_config.http://alice:s3cr%40t@127.0.0.1:1.draining: invalid type, \
                 also `https://b:pw@h/v1` and user@example"
            ),
            "endpoint_config.http://127.0.0.1:1.draining: invalid type, also `https://h/v1` \
             and user@example"
        );
        assert!(matches!(
            text_without_credentials("no credentials in http://h:1/x"),
            Cow::Borrowed(_)
        ));
        // Sub-delimiters are userinfo characters, not its end.
        assert_eq!(
            text_without_credentials("key http://u:p,a;s(s)@h:1.x: bad"),
            "key http://h:1.x: bad"
        );
    }

    #[test]
    fn credentials_are_removed_for_display_and_connecting() {
        assert_eq!(without_credentials("http://u:p@h:1/v1"), "http://h:1/v1");
        assert_eq!(without_credentials("https://u@h"), "https://h");
        // An unescaped `@` in the password: the last one ends the userinfo.
        assert_eq!(without_credentials("http://u:p@ss@h:1"), "http://h:1");
        // An `@` after the authority is not userinfo.
        assert_eq!(without_credentials("http://h:1/a@b"), "http://h:1/a@b");
        assert!(matches!(
            without_credentials("http://h:1"),
            Cow::Borrowed("http://h:1")
        ));
        assert_eq!(without_credentials("not a url"), "not a url");
    }

    #[test]
    fn userinfo_becomes_basic_credentials() {
        // base64("alice:CredPw999")
        assert_eq!(
            basic_authorization("http://alice:CredPw999@127.0.0.1:23007").as_deref(),
            Some("Basic YWxpY2U6Q3JlZFB3OTk5")
        );
        // Percent-decoded: base64("a b:p@s:s")
        assert_eq!(
            basic_authorization("http://a%20b:p%40s%3As@h/v1").as_deref(),
            Some("Basic YSBiOnBAczpz")
        );
        // No password: base64("u:")
        assert_eq!(
            basic_authorization("http://u@h").as_deref(),
            Some("Basic dTo=")
        );
        assert_eq!(basic_authorization("http://h:1/a@b"), None);
        assert_eq!(basic_authorization("http://@h"), None);
        assert_eq!(basic_authorization("http://h"), None);
    }

    #[test]
    fn an_api_key_wins_over_url_credentials() {
        assert_eq!(
            authorization("http://u:p@h", Some("k")).as_deref(),
            Some("Bearer k")
        );
        assert_eq!(
            authorization("http://u:p@h", None).as_deref(),
            Some("Basic dTpw")
        );
        assert_eq!(authorization("http://h", None), None);
    }

    #[test]
    fn only_the_path_says_v1() {
        assert_eq!(url_path("http://v1-gpu.internal:11434"), "");
        assert_eq!(url_path("https://api.x.com/openai/v1"), "/openai/v1");
        assert_eq!(url_path("http://h:8000/v1"), "/v1");
    }
}
