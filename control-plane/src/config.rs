//! Configuration: YAML that accepts nomyo-router's `config.yaml` unchanged,
//! plus Switchyard's own keys. Parsed into [`RawConfig`] (every key optional,
//! unknown keys rejected), then validated once by [`Config::load`] /
//! [`Config::from_yaml`] into a typed [`Config`] that needs no further checks.
//! Every error names the key and the bad value.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;

use crate::endpoint::{EndpointKind, text_without_credentials, without_credentials};

/// A secret string (API key). Never printed: `Debug` and `Display` show `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A configuration problem, naming the key and the bad value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// Path tried.
        path: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// YAML syntax error, unknown key, or a value of the wrong type.
    #[error("invalid config: {0}")]
    Syntax(String),
    /// A key has a value that is not allowed.
    #[error("invalid config: key `{key}`: {problem} (value: {value})")]
    Invalid {
        /// Dotted key path.
        key: String,
        /// The offending value, as written (secrets elided).
        value: String,
        /// What is wrong with it.
        problem: String,
    },
    /// An entry of a map given twice, the same way or two ways that mean
    /// the same (`http://a:1` and `http://a:1/`; `llama_server` and
    /// `llama-server`): serde would keep the last one silently.
    #[error(
        "invalid config: key `{key}`: {}",
        describe_duplicate(first, second, lines)
    )]
    Duplicate {
        /// The map (`api_keys`, `endpoint_config`, `timeouts`).
        key: String,
        /// The entry as written first (credentials elided).
        first: String,
        /// The entry as written the second time (credentials elided).
        second: String,
        /// The lines (1-based) of the entries, when the YAML is block style.
        lines: Vec<usize>,
    },
}

fn describe_duplicate(first: &str, second: &str, lines: &[usize]) -> String {
    let mut out = if first == second {
        format!("`{first}` is given twice")
    } else {
        format!("`{first}` is given twice, also as `{second}`")
    };
    if lines.len() >= 2 {
        let lines: Vec<String> = lines.iter().map(usize::to_string).collect();
        out.push_str(&format!(" (lines {})", lines.join(" and ")));
    }
    out
}

/// The longest `saturated_hold`: a choice held longer than a sidecar's
/// `choose_timeout` is decided by the sidecar without the control plane.
const MAX_SATURATED_HOLD: Duration = Duration::from_secs(1);

/// A config error naming `key` and `value`; an endpoint URL in either is
/// shown without its credentials (errors go to logs and terminals).
fn invalid(
    key: impl Into<String>,
    value: impl fmt::Display,
    problem: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        key: without_credentials(&key.into()).into_owned(),
        value: without_credentials(&value.to_string()).into_owned(),
        problem: problem.into(),
    }
}

/// A duration as written in YAML: a number of seconds (`30`, `0.5`) or a
/// string with a unit (`"250ms"`, `"5s"`, `"2m"`, `"1h"`).
#[derive(Clone, Debug)]
pub enum RawDuration {
    /// Seconds.
    Seconds(f64),
    /// Number with unit.
    Text(String),
}

/// Written by hand rather than `#[serde(untagged)]`: an untagged enum
/// refuses a value of another type (`true`, `[1]`, `{a: 1}`) with "data did
/// not match any variant", without the key, the value or what is accepted;
/// a visitor's error is an ordinary type error, which the YAML layer
/// prefixes with the key and suffixes with the line.
impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl serde::de::Visitor<'_> for Visitor {
            type Value = RawDuration;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a duration: seconds as a number, or a string such as \"250ms\", \"5s\", \"2m\"",
                )
            }

            // Integers become seconds as f64: past 2^53 they lose precision,
            // but any such value is far over MAX_DURATION and refused anyway.
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawDuration, E> {
                Ok(RawDuration::Seconds(v as f64))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RawDuration, E> {
                Ok(RawDuration::Seconds(v as f64))
            }

            // The YAML layer hands integers past 64 bits over as 128-bit ones.
            fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<RawDuration, E> {
                Ok(RawDuration::Seconds(v as f64))
            }

            fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<RawDuration, E> {
                Ok(RawDuration::Seconds(v as f64))
            }

            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<RawDuration, E> {
                Ok(RawDuration::Seconds(v))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawDuration, E> {
                Ok(RawDuration::Text(v.to_owned()))
            }
        }

        deserializer.deserialize_any(Visitor)
    }
}

/// The longest duration any key accepts: far beyond any useful timeout,
/// period or lifetime, and short enough that a deadline computed from it
/// (`now + d`, `2 * d`) cannot overflow, which would panic at run time.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

impl RawDuration {
    fn parse(&self, key: &str) -> Result<Duration, ConfigError> {
        match self {
            Self::Seconds(s) => {
                seconds(*s).map_err(|problem| invalid(key, show_seconds(*s), problem.describe()))
            }
            Self::Text(t) => parse_duration_text(t)
                .map_err(|problem| invalid(key, format!("{t:?}"), problem.describe())),
        }
    }
}

/// Why a written duration is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DurationProblem {
    /// Text not of the form `<number><unit>`.
    Malformed,
    /// Negative, or not a number (NaN).
    Negative,
    /// Longer than [`MAX_DURATION`], infinite included.
    TooLong,
}

impl DurationProblem {
    fn describe(self) -> String {
        match self {
            Self::Malformed => "expected seconds or a number with unit ms, s, m or h".to_owned(),
            Self::Negative => "must be a non-negative number of seconds".to_owned(),
            Self::TooLong => format!(
                "must be at most 10 years ({} seconds)",
                MAX_DURATION.as_secs()
            ),
        }
    }
}

/// A number of seconds as a `Duration`, never panicking (as
/// `Duration::from_secs_f64` does on a value it cannot hold): NaN,
/// negative, infinite or longer than [`MAX_DURATION`] is refused.
fn seconds(secs: f64) -> Result<Duration, DurationProblem> {
    if secs.is_nan() || secs < 0.0 {
        return Err(DurationProblem::Negative);
    }
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if d <= MAX_DURATION => Ok(d),
        _ => Err(DurationProblem::TooLong),
    }
}

/// A number of seconds as the operator may have written it: `30`, `0.5`,
/// `1e20` (`Display` alone would print a huge one with all its digits).
fn show_seconds(secs: f64) -> String {
    if secs.is_finite() && secs.abs() < 1e16 {
        secs.to_string()
    } else {
        format!("{secs:?}")
    }
}

/// `"250ms"`, `"5s"`, `"2m"`, `"1h"` (a space before the unit allowed).
fn parse_duration_text(text: &str) -> Result<Duration, DurationProblem> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or(DurationProblem::Malformed)?;
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| DurationProblem::Malformed)?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(DurationProblem::Malformed),
    };
    seconds(secs)
}

/// Per-endpoint overrides under `endpoint_config.<url>`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEndpointConfig {
    /// Concurrent-request limit for this endpoint.
    pub max_concurrent_connections: Option<u32>,
    /// Start drained: no new requests until `switchyard undrain` (or until
    /// the key is removed and the control plane restarted).
    pub draining: Option<bool>,
}

/// Timeouts for one endpoint kind, under `timeouts.<kind>`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    /// TCP (and TLS) connect.
    pub connect: Option<RawDuration>,
    /// From request sent to the first response byte (model loading counts).
    pub first_byte: Option<RawDuration>,
    /// Longest silence between two chunks of a streamed answer.
    pub idle: Option<RawDuration>,
}

/// A YAML mapping as written: its entries in document order, one given
/// twice kept twice, for [`Config::validate`] to refuse naming both (into a
/// `BTreeMap`, serde would keep the last one silently).
#[derive(Clone, Debug)]
pub struct Entries<V>(pub Vec<(String, V)>);

impl<V> Default for Entries<V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Entries<V> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<V>(std::marker::PhantomData<V>);

        impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Visitor<V> {
            type Value = Entries<V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Entries<V>, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, V>()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }

        deserializer.deserialize_map(Visitor(std::marker::PhantomData))
    }
}

/// The YAML file as written. Every key optional; unknown keys are errors.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    // --- nomyo-router keys ---
    /// Ollama or OpenAI-compatible (URL containing `/v1`) endpoints.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// llama.cpp `llama-server` endpoints.
    #[serde(default)]
    pub llama_server_endpoints: Vec<String>,
    /// Default concurrent-request limit per endpoint and model.
    pub max_concurrent_connections: Option<u32>,
    /// Backend API keys by endpoint URL; values may use `${ENV}`.
    #[serde(default)]
    pub api_keys: Entries<String>,
    /// Router API key clients must present (nomyo spelling).
    #[serde(rename = "nomyo-router-api-key")]
    pub nomyo_router_api_key: Option<String>,
    /// Router API key clients must present.
    pub router_api_key: Option<String>,
    /// Prefer endpoints in config order at equal utilization.
    pub priority_routing: Option<bool>,
    /// Route a conversation's turns to the same endpoint.
    pub conversation_affinity: Option<bool>,
    /// Affinity entry lifetime (seconds).
    pub conversation_affinity_ttl: Option<RawDuration>,
    /// Per-endpoint overrides.
    #[serde(default)]
    pub endpoint_config: Entries<RawEndpointConfig>,

    // --- Switchyard keys ---
    /// Most affinity entries held.
    pub affinity_max_entries: Option<usize>,
    /// Period of discovery probes.
    pub probe_interval: Option<RawDuration>,
    /// Timeout of one probe request.
    pub probe_timeout: Option<RawDuration>,
    /// Random spread of probe periods, as a fraction (0 to 0.5).
    pub probe_jitter: Option<f64>,
    /// Session lifetime without keep-alive; its leases are released after.
    pub session_ttl: Option<RawDuration>,
    /// Keep-alive period sidecars are told to use.
    pub keepalive_interval: Option<RawDuration>,
    /// How long a failed completion excludes (endpoint, model).
    pub completion_failure_ttl: Option<RawDuration>,
    /// Consecutive backend failures that open an endpoint's circuit breaker.
    pub breaker_failures: Option<u32>,
    /// How long an open breaker keeps the endpoint out before a trial.
    pub breaker_open_for: Option<RawDuration>,
    /// Least time between two `WatchUsage` publications.
    pub watch_interval: Option<RawDuration>,
    /// How long a choice that finds every endpoint full waits for a slot to
    /// free before it goes to the least utilised one anyway.
    pub saturated_hold: Option<RawDuration>,
    /// Where the control plane keeps drains made at run time, so they
    /// survive a restart (the control-plane process and a standalone
    /// sidecar; a remote sidecar ignores it).
    pub state_file: Option<String>,
    /// Sidecar: deadline for a control-plane choice before deciding locally.
    pub choose_timeout: Option<RawDuration>,
    /// Sidecar: largest request body accepted, in bytes.
    pub max_body_bytes: Option<usize>,
    /// Sidecar: most endpoints tried for one request.
    pub max_attempts: Option<u32>,
    /// Sidecar: how long in-flight requests may run after SIGTERM.
    pub shutdown_grace: Option<RawDuration>,
    /// Sidecar: how long a client connection may take to send a request
    /// head before it is closed.
    pub client_header_timeout: Option<RawDuration>,
    /// Sidecar: threads serving client connections (0 = one per core).
    pub server_threads: Option<usize>,
    /// Sidecar: browser origins allowed besides Ollama's defaults.
    pub allowed_origins: Option<Vec<String>>,
    /// Sidecar: timeouts by endpoint kind (`ollama`, `openai`, `llama_server`).
    #[serde(default)]
    pub timeouts: Entries<RawTimeouts>,
}

/// One backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointConfig {
    /// Base URL as configured, without a trailing `/` (the endpoint's identity).
    pub url: Arc<str>,
    /// API family.
    pub kind: EndpointKind,
    /// Sent as `Authorization: Bearer` to OpenAI-style routes.
    pub api_key: Option<Secret>,
    /// Concurrent-request limit per model on this endpoint.
    pub max_concurrent: u32,
    /// Drained from the start (`endpoint_config.<url>.draining`); the
    /// runtime flag (`Drain` / `Undrain`) starts from this.
    pub draining: bool,
}

/// Conversation affinity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AffinityConfig {
    /// On or off (`conversation_affinity`).
    pub enabled: bool,
    /// Entry lifetime (`conversation_affinity_ttl`).
    pub ttl: Duration,
    /// Most entries held (`affinity_max_entries`).
    pub max_entries: usize,
}

/// Discovery probes.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeConfig {
    /// Period.
    pub interval: Duration,
    /// Timeout per probe request.
    pub timeout: Duration,
    /// Random spread of the period, as a fraction.
    pub jitter: f64,
}

/// Sidecar sessions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// Lifetime without keep-alive.
    pub ttl: Duration,
    /// Keep-alive period sidecars use.
    pub keepalive_interval: Duration,
}

/// Passive health: completion failures and the circuit breaker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthConfig {
    /// How long a failed completion excludes (endpoint, model).
    pub completion_failure_ttl: Duration,
    /// Consecutive failures that open the breaker.
    pub breaker_failures: u32,
    /// How long the breaker stays open before a trial request.
    pub breaker_open_for: Duration,
}

/// Timeouts for requests to one endpoint kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Connect.
    pub connect: Duration,
    /// First response byte.
    pub first_byte: Duration,
    /// Between stream chunks.
    pub idle: Duration,
}

/// Sidecar behaviour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SidecarConfig {
    /// Deadline for a control-plane choice before deciding locally.
    pub choose_timeout: Duration,
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Most endpoints tried for one request (1 = no retry).
    pub max_attempts: u32,
    /// How long in-flight requests may run after SIGTERM.
    pub shutdown_grace: Duration,
    /// How long a client connection may take to send its first byte, or a
    /// complete request head once started, and may sit idle between
    /// requests, before the sidecar closes it: a client that opens
    /// connections and sends nothing, or a head byte by byte, cannot hold
    /// them forever.
    pub client_header_timeout: Duration,
    /// Threads serving client connections, each with its own runtime,
    /// backend connection pools and `Route` stream; 0 = one per core.
    pub server_threads: usize,
    /// Browser origins (CORS) allowed: Ollama's defaults
    /// ([`defaults::ALLOWED_ORIGINS`]) plus `allowed_origins`; `*` in a
    /// pattern matches any text, and `*` alone any origin.
    pub allowed_origins: Vec<String>,
    /// Timeouts for Ollama endpoints.
    pub ollama_timeouts: Timeouts,
    /// Timeouts for OpenAI-compatible endpoints.
    pub openai_timeouts: Timeouts,
    /// Timeouts for llama-server endpoints.
    pub llama_server_timeouts: Timeouts,
}

impl SidecarConfig {
    /// Timeouts for an endpoint kind.
    pub fn timeouts(&self, kind: EndpointKind) -> Timeouts {
        match kind {
            EndpointKind::Ollama => self.ollama_timeouts,
            EndpointKind::OpenAi => self.openai_timeouts,
            EndpointKind::LlamaServer => self.llama_server_timeouts,
        }
    }
}

/// Most sidecar server threads `server_threads` may ask for (each is an OS
/// thread with its own runtime and connection pools).
const MAX_SERVER_THREADS: usize = 1024;

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Backends in configuration order (priority order).
    pub endpoints: Vec<EndpointConfig>,
    /// Key clients must present; `None` means no auth.
    pub router_api_key: Option<Secret>,
    /// Prefer lower utilization, then config order.
    pub priority_routing: bool,
    /// Conversation affinity.
    pub affinity: AffinityConfig,
    /// Discovery probes.
    pub probe: ProbeConfig,
    /// Sidecar sessions.
    pub sessions: SessionConfig,
    /// Passive health.
    pub health: HealthConfig,
    /// Least time between two `WatchUsage` publications.
    pub watch_interval: Duration,
    /// How long a choice that finds every candidate full waits for a slot
    /// to free (a release, a drain lifted, ...) before it is placed
    /// `saturated` after all; zero: at once.
    pub saturated_hold: Duration,
    /// Where drains made at run time are kept (`state_file`); `None`: in
    /// memory only.
    pub state_file: Option<PathBuf>,
    /// Sidecar behaviour.
    pub sidecar: SidecarConfig,
    /// What the configuration asks for that is accepted, as nomyo-router
    /// accepts it, but is probably not meant (an API key for a URL that is
    /// not an endpoint, an unset `${VAR}` in a backend key). Each names the
    /// key; the binaries log them at start and `--check-config` prints them.
    pub warnings: Vec<String>,
}

/// Defaults, in one place.
pub mod defaults {
    use std::time::Duration;

    /// nomyo-router's default.
    pub const MAX_CONCURRENT: u32 = 1;
    /// Affinity entry lifetime.
    pub const AFFINITY_TTL: Duration = Duration::from_secs(300);
    /// Most affinity entries.
    pub const AFFINITY_MAX_ENTRIES: usize = 100_000;
    /// Probe period.
    pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);
    /// Probe timeout.
    pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
    /// Probe jitter fraction.
    pub const PROBE_JITTER: f64 = 0.1;
    /// Session lifetime without keep-alive.
    pub const SESSION_TTL: Duration = Duration::from_secs(10);
    /// Keep-alive period.
    pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
    /// Completion-failure exclusion.
    pub const COMPLETION_FAILURE_TTL: Duration = Duration::from_secs(30);
    /// Breaker threshold.
    pub const BREAKER_FAILURES: u32 = 3;
    /// Breaker open time.
    pub const BREAKER_OPEN_FOR: Duration = Duration::from_secs(5);
    /// Watch publication spacing.
    pub const WATCH_INTERVAL: Duration = Duration::from_millis(20);
    /// Covers the race of a release and a choice arriving through different
    /// sidecars within a millisecond or two of each other; short against
    /// the wait behind a busy backend that a `saturated` placement means.
    pub const SATURATED_HOLD: Duration = Duration::from_millis(5);
    /// Control-plane choice deadline.
    pub const CHOOSE_TIMEOUT: Duration = Duration::from_millis(50);
    /// Largest request body (images arrive base64-encoded).
    pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
    /// Endpoints tried per request.
    pub const MAX_ATTEMPTS: u32 = 3;
    /// Shutdown grace.
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
    /// Time a client has to send a request head, and the longest a
    /// kept-alive client connection may sit idle (nginx's
    /// `client_header_timeout`).
    pub const CLIENT_HEADER_TIMEOUT: Duration = Duration::from_secs(60);
    /// Sidecar server threads: 0, one per core (as many as the process may
    /// use: `std::thread::available_parallelism`, which honours a
    /// container's CPU limit).
    pub const SERVER_THREADS: usize = 0;
    /// Browser origins allowed without configuration: Ollama's defaults
    /// (local pages on any port, desktop and editor web views).
    pub const ALLOWED_ORIGINS: [&str; 17] = [
        "http://localhost",
        "https://localhost",
        "http://localhost:*",
        "https://localhost:*",
        "http://127.0.0.1",
        "https://127.0.0.1",
        "http://127.0.0.1:*",
        "https://127.0.0.1:*",
        "http://0.0.0.0",
        "https://0.0.0.0",
        "http://0.0.0.0:*",
        "https://0.0.0.0:*",
        "app://*",
        "file://*",
        "tauri://*",
        "vscode-webview://*",
        "vscode-file://*",
    ];
    /// Connect timeout.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
    /// First-byte timeout (covers model loading).
    pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(300);
    /// Idle-between-chunks timeout.
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
}

/// [`expand_env`] that does not fail on unset variables: they expand to
/// nothing and are returned by name.
fn expand_env_lenient(
    key: &str,
    value: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(String, Vec<String>), ConfigError> {
    let unset = std::cell::RefCell::new(Vec::new());
    let expanded = expand_env(key, value, &|name| {
        Some(lookup(name).unwrap_or_else(|| {
            unset.borrow_mut().push(name.to_owned());
            String::new()
        }))
    })?;
    Ok((expanded, unset.into_inner()))
}

/// Expands `${NAME}` from the environment via `lookup`.
fn expand_env(
    key: &str,
    value: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| invalid(key, "(secret elided)", "unterminated ${...}"))?;
        let name = &after[..end];
        let val = lookup(name).ok_or_else(|| {
            invalid(
                key,
                format!("${{{name}}}"),
                format!("environment variable {name} is not set"),
            )
        })?;
        out.push_str(&val);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// An endpoint URL as written, without surrounding space or trailing `/`,
/// once it is known to be one the probes and the proxy can use (a host, a
/// port that exists, nothing `reqwest` or `http::Uri` would refuse later:
/// such an endpoint would only ever show as down).
fn normalize_url(key: &str, url: &str) -> Result<String, ConfigError> {
    let trimmed = url.trim().trim_end_matches('/');
    let rest = trimmed
        .strip_prefix("http://")
        .or_else(|| trimmed.strip_prefix("https://"))
        .ok_or_else(|| invalid(key, url, "must start with http:// or https://"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(invalid(key, url, "has no host"));
    }
    if trimmed.contains("${") {
        return Err(invalid(
            key,
            url,
            "${...} is not expanded in endpoint URLs (only in api_keys and router_api_key)",
        ));
    }
    let parsed = reqwest::Url::parse(trimmed)
        .map_err(|e| invalid(key, url, format!("not a valid URL: {e}")))?;
    trimmed
        .parse::<tonic::codegen::http::Uri>()
        .map_err(|e| invalid(key, url, format!("not a valid URL: {e}")))?;
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(invalid(key, url, "must not have a query or fragment"));
    }
    Ok(trimmed.to_owned())
}

/// What makes two endpoint URLs the same server: scheme and host case,
/// a default port written out (`:80`, `:443`) or a port's leading zeros do
/// not. Only for URLs [`normalize_url`] accepted.
pub(crate) fn same_endpoint(a: &str, b: &str) -> bool {
    a == b || endpoint_identity(a) == endpoint_identity(b)
}

/// An endpoint URL in the one form [`same_endpoint`] compares (parsed and
/// printed back, without a trailing `/`); the URL as given if it does not
/// parse.
pub(crate) fn endpoint_identity(url: &str) -> String {
    reqwest::Url::parse(url).map_or_else(
        |_| url.to_owned(),
        |p| p.as_str().trim_end_matches('/').to_owned(),
    )
}

/// The YAML parser's message, with the line numbers of a duplicated key
/// added: serde reports a duplicate field without its place.
fn syntax_error(text: &str, err: &serde_yaml_ng::Error) -> String {
    let message = err.to_string();
    let Some(field) = message
        .strip_prefix("duplicate field `")
        .and_then(|rest| rest.split('`').next())
    else {
        return message;
    };
    let lines = duplicated_key_lines(text, field);
    if lines.len() < 2 {
        return message;
    }
    let lines: Vec<String> = lines.iter().map(usize::to_string).collect();
    format!("{message} (lines {})", lines.join(" and "))
}

/// The lines (1-based) of block-style keys named `field` whose whole path
/// (parent keys, list items told apart) occurs more than once: the same
/// key under two different parents is no duplicate. Best effort: flow
/// style (`{a: 1}`) is not looked into.
fn duplicated_key_lines(text: &str, field: &str) -> Vec<usize> {
    let found: Vec<(usize, Vec<String>)> = block_keys(text)
        .into_iter()
        .filter(|(_, path)| path.last().is_some_and(|key| key == field))
        .collect();
    found
        .iter()
        .filter(|(_, path)| found.iter().filter(|(_, p)| p == path).count() > 1)
        .map(|(line, _)| *line)
        .collect()
}

/// The lines (1-based) of the entries of the top-level map `map` written
/// as one of `keys`. Best effort, as [`duplicated_key_lines`].
fn entry_lines(text: &str, map: &str, keys: &[&str]) -> Vec<usize> {
    block_keys(text)
        .into_iter()
        .filter(|(_, path)| match path.as_slice() {
            [parent, key] => parent == map && keys.contains(&key.as_str()),
            _ => false,
        })
        .map(|(line, _)| line)
        .collect()
}

/// Every block-style `key:` of the YAML text: its line (1-based) and its
/// path, parent keys first and the key last (quotes removed; a list item
/// is an entry `[line]` of its own, so items are told apart).
fn block_keys(text: &str) -> Vec<(usize, Vec<String>)> {
    /// The key a `key: value` line starts with, quotes removed.
    fn key_of(body: &str) -> Option<&str> {
        let (key, rest) = if let Some(quoted) = body.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else if let Some(quoted) = body.strip_prefix('\'') {
            let end = quoted.find('\'')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            // A plain key ends at `: ` or at a `:` ending the line; a URL's
            // `://` is part of it.
            let end = body
                .find(": ")
                .or_else(|| body.strip_suffix(':').map(str::len))?;
            (body[..end].trim_end(), &body[end..])
        };
        let rest = rest.trim_start().strip_prefix(':')?;
        (rest.is_empty() || rest.starts_with(' ')).then_some(key)
    }
    let mut parents: Vec<(usize, String)> = Vec::new();
    let mut found = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let body = line.trim_start();
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        let mut indent = line.len() - body.len();
        let mut body = body;
        if let Some(item) = body.strip_prefix("- ") {
            // A list item: its keys sit under an entry of their own.
            parents.retain(|(depth, _)| *depth < indent);
            parents.push((indent, format!("[{i}]")));
            indent += 2;
            body = item.trim_start();
        }
        let Some(key) = key_of(body) else {
            continue;
        };
        parents.retain(|(depth, _)| *depth < indent);
        let mut path: Vec<String> = parents.iter().map(|(_, k)| k.clone()).collect();
        path.push(key.to_owned());
        found.push((i + 1, path));
        parents.push((indent, key.to_owned()));
    }
    found
}

/// The entries of the top-level map `map`, each with what it names
/// (`identify`: its normalised URL, its endpoint kind), refusing an entry
/// that names the same as one before it (`same`), with both spellings and,
/// when `text` is given and block style, their lines.
fn unique_entries<'a, V, I>(
    map: &str,
    entries: &'a Entries<V>,
    text: Option<&str>,
    identify: impl Fn(&str, &str) -> Result<I, ConfigError>,
    same: impl Fn(&I, &I) -> bool,
) -> Result<Vec<(&'a str, I, &'a V)>, ConfigError> {
    let mut out: Vec<(&'a str, I, &'a V)> = Vec::with_capacity(entries.0.len());
    for (written, value) in &entries.0 {
        let id = identify(&format!("{map}.{written}"), written)?;
        if let Some((first, _, _)) = out.iter().find(|(_, seen, _)| same(seen, &id)) {
            return Err(ConfigError::Duplicate {
                key: map.to_owned(),
                first: without_credentials(first).into_owned(),
                second: without_credentials(written).into_owned(),
                lines: text.map_or_else(Vec::new, |text| {
                    entry_lines(text, map, &[first, written.as_str()])
                }),
            });
        }
        out.push((written, id, value));
    }
    Ok(out)
}

impl Config {
    /// Reads and validates a config file; `${ENV}` comes from the process environment.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text, &|name| std::env::var(name).ok())
    }

    /// Parses and validates YAML text; `env` resolves `${NAME}`.
    pub fn from_yaml(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let raw: RawConfig = if text.trim().is_empty() {
            RawConfig::default()
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| {
                // The key path may hold an endpoint URL with credentials.
                let message = syntax_error(text, &e);
                ConfigError::Syntax(text_without_credentials(&message).into_owned())
            })?
        };
        Self::check(raw, env, Some(text))
    }

    /// The single validation step from raw to typed config.
    pub fn validate(
        raw: RawConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        Self::check(raw, env, None)
    }

    /// [`Config::validate`]; `text`, the YAML `raw` was read from, lets an
    /// entry given twice be named with its lines.
    fn check(
        raw: RawConfig,
        env: &dyn Fn(&str) -> Option<String>,
        text: Option<&str>,
    ) -> Result<Self, ConfigError> {
        let default_limit = raw
            .max_concurrent_connections
            .unwrap_or(defaults::MAX_CONCURRENT);
        if default_limit == 0 {
            return Err(invalid(
                "max_concurrent_connections",
                0,
                "must be at least 1",
            ));
        }

        let mut endpoints: Vec<EndpointConfig> = Vec::new();
        let listed = raw
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, u)| (format!("endpoints[{i}]"), u, false))
            .chain(
                raw.llama_server_endpoints
                    .iter()
                    .enumerate()
                    .map(|(i, u)| (format!("llama_server_endpoints[{i}]"), u, true)),
            );
        for (key, url, llama) in listed {
            let url = normalize_url(&key, url)?;
            if let Some(first) = endpoints.iter().find(|e| same_endpoint(&e.url, &url)) {
                let problem = if *first.url == *url {
                    "endpoint listed twice".to_owned()
                } else {
                    format!("endpoint listed twice (as {})", first.url)
                };
                return Err(invalid(key, &url, problem));
            }
            let kind = if llama {
                EndpointKind::LlamaServer
            } else if crate::endpoint::url_path(&url).contains("/v1") {
                EndpointKind::OpenAi
            } else {
                EndpointKind::Ollama
            };
            endpoints.push(EndpointConfig {
                url: Arc::from(url),
                kind,
                api_key: None,
                max_concurrent: default_limit,
                draining: false,
            });
        }

        // Both maps are keyed by endpoint URL; one given twice (however
        // written, as for `endpoints`) would silently lose the first entry.
        let same_url = |a: &String, b: &String| same_endpoint(a, b);
        let api_keys = unique_entries("api_keys", &raw.api_keys, text, normalize_url, same_url)?;
        let endpoint_config = unique_entries(
            "endpoint_config",
            &raw.endpoint_config,
            text,
            normalize_url,
            same_url,
        )?;

        // Backend keys are forgiving where nomyo-router is (its own sample
        // config has both cases): a key for a URL that is not an endpoint is
        // ignored, and an unset `${VAR}` means no key. Both are warnings, so
        // a typo does not go unnoticed; a backend that needs the key answers
        // 401, which the probes and the request log show. (An unset
        // `${VAR}` in the *router* key stays an error: it would silently
        // open the router to everyone.)
        let mut warnings = Vec::new();
        for (url, norm, value) in api_keys {
            // Shown in warnings: without the URL's credentials.
            let key = format!("api_keys.{}", without_credentials(url));
            let Some(idx) = endpoints.iter().position(|e| same_endpoint(&e.url, &norm)) else {
                warnings.push(format!(
                    "{key}: not a configured endpoint (not in `endpoints` or \
                     `llama_server_endpoints`); the key is ignored"
                ));
                continue;
            };
            let secret = match expand_env_lenient(&key, value, env)? {
                (secret, unset) if unset.is_empty() => secret,
                (_, unset) => {
                    warnings.push(format!(
                        "{key}: environment variable {} not set; no API key is sent to {}",
                        unset.join(", "),
                        without_credentials(url)
                    ));
                    continue;
                }
            };
            if let Some(ep) = endpoints.get_mut(idx)
                && !secret.is_empty()
            {
                ep.api_key = Some(Secret::new(secret));
            }
        }
        for (url, norm, over) in endpoint_config {
            let key = format!("endpoint_config.{url}");
            let idx = endpoints
                .iter()
                .position(|e| same_endpoint(&e.url, &norm))
                .ok_or_else(|| invalid(&key, url, "not a configured endpoint"))?;
            if let Some(limit) = over.max_concurrent_connections {
                if limit == 0 {
                    return Err(invalid(
                        format!("{key}.max_concurrent_connections"),
                        0,
                        "must be at least 1",
                    ));
                }
                if let Some(ep) = endpoints.get_mut(idx) {
                    ep.max_concurrent = limit;
                }
            }
            if let (Some(draining), Some(ep)) = (over.draining, endpoints.get_mut(idx)) {
                ep.draining = draining;
            }
        }

        let router_api_key = match (&raw.nomyo_router_api_key, &raw.router_api_key) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "router_api_key",
                    "(secret elided)",
                    "set only one of `router_api_key` and `nomyo-router-api-key`",
                ));
            }
            (Some(v), None) => Some(("nomyo-router-api-key", v)),
            (None, Some(v)) => Some(("router_api_key", v)),
            (None, None) => None,
        };
        let router_api_key = match router_api_key {
            Some((key, v)) => {
                let expanded = expand_env(key, v, env)?;
                // Left empty: no key (nomyo-router's "leave empty to
                // disable"). Empty only once expanded: a variable set to
                // nothing, as dangerous as an unset one.
                if expanded.is_empty() && v.contains("${") {
                    return Err(invalid(
                        key,
                        v.as_str(),
                        "expands to an empty key, which would open the router to everyone \
                         (set the variable, or leave the key empty to run without one)",
                    ));
                }
                (!expanded.is_empty()).then(|| Secret::new(expanded))
            }
            None => None,
        };

        let dur = |key: &str,
                   v: &Option<RawDuration>,
                   default: Duration|
         -> Result<Duration, ConfigError> {
            v.as_ref().map_or(Ok(default), |d| d.parse(key))
        };
        let positive = |key: &str, d: Duration| -> Result<Duration, ConfigError> {
            if d.is_zero() {
                Err(invalid(key, "0", "must be greater than zero"))
            } else {
                Ok(d)
            }
        };

        let affinity = AffinityConfig {
            enabled: raw.conversation_affinity.unwrap_or(false),
            ttl: positive(
                "conversation_affinity_ttl",
                dur(
                    "conversation_affinity_ttl",
                    &raw.conversation_affinity_ttl,
                    defaults::AFFINITY_TTL,
                )?,
            )?,
            max_entries: match raw.affinity_max_entries {
                Some(0) => return Err(invalid("affinity_max_entries", 0, "must be at least 1")),
                Some(n) => n,
                None => defaults::AFFINITY_MAX_ENTRIES,
            },
        };

        let jitter = raw.probe_jitter.unwrap_or(defaults::PROBE_JITTER);
        if !(0.0..=0.5).contains(&jitter) {
            return Err(invalid("probe_jitter", jitter, "must be between 0 and 0.5"));
        }
        let probe = ProbeConfig {
            interval: positive(
                "probe_interval",
                dur(
                    "probe_interval",
                    &raw.probe_interval,
                    defaults::PROBE_INTERVAL,
                )?,
            )?,
            timeout: positive(
                "probe_timeout",
                dur("probe_timeout", &raw.probe_timeout, defaults::PROBE_TIMEOUT)?,
            )?,
            jitter,
        };

        let sessions = SessionConfig {
            ttl: positive(
                "session_ttl",
                dur("session_ttl", &raw.session_ttl, defaults::SESSION_TTL)?,
            )?,
            keepalive_interval: positive(
                "keepalive_interval",
                dur(
                    "keepalive_interval",
                    &raw.keepalive_interval,
                    defaults::KEEPALIVE_INTERVAL,
                )?,
            )?,
        };
        if sessions.keepalive_interval * 2 > sessions.ttl {
            return Err(invalid(
                "keepalive_interval",
                format!("{:?}", sessions.keepalive_interval),
                format!("must be at most half of session_ttl ({:?})", sessions.ttl),
            ));
        }

        let health = HealthConfig {
            completion_failure_ttl: dur(
                "completion_failure_ttl",
                &raw.completion_failure_ttl,
                defaults::COMPLETION_FAILURE_TTL,
            )?,
            breaker_failures: match raw.breaker_failures {
                Some(0) => return Err(invalid("breaker_failures", 0, "must be at least 1")),
                Some(n) => n,
                None => defaults::BREAKER_FAILURES,
            },
            breaker_open_for: positive(
                "breaker_open_for",
                dur(
                    "breaker_open_for",
                    &raw.breaker_open_for,
                    defaults::BREAKER_OPEN_FOR,
                )?,
            )?,
        };

        // `llama_server` and `llama-server` are the same kind: given both,
        // one would be lost as surely as one given twice.
        let timeouts = unique_entries(
            "timeouts",
            &raw.timeouts,
            text,
            |key, kind_name| {
                kind_name
                    .parse::<EndpointKind>()
                    .map_err(|_| invalid(key, kind_name, "expected ollama, openai or llama_server"))
            },
            |a, b| a == b,
        )?;
        let mut kind_timeouts = BTreeMap::new();
        for (kind_name, kind, t) in timeouts {
            let key = format!("timeouts.{kind_name}");
            let connect = positive(
                &format!("{key}.connect"),
                dur(
                    &format!("{key}.connect"),
                    &t.connect,
                    defaults::CONNECT_TIMEOUT,
                )?,
            )?;
            let first_byte = positive(
                &format!("{key}.first_byte"),
                dur(
                    &format!("{key}.first_byte"),
                    &t.first_byte,
                    defaults::FIRST_BYTE_TIMEOUT,
                )?,
            )?;
            let idle = positive(
                &format!("{key}.idle"),
                dur(&format!("{key}.idle"), &t.idle, defaults::IDLE_TIMEOUT)?,
            )?;
            let spelled = Timeouts {
                connect,
                first_byte,
                idle,
            };
            kind_timeouts.insert(kind.as_str(), spelled);
        }
        let default_timeouts = Timeouts {
            connect: defaults::CONNECT_TIMEOUT,
            first_byte: defaults::FIRST_BYTE_TIMEOUT,
            idle: defaults::IDLE_TIMEOUT,
        };
        let timeouts_for = |kind: EndpointKind| {
            kind_timeouts
                .get(kind.as_str())
                .copied()
                .unwrap_or(default_timeouts)
        };

        let saturated_hold = dur(
            "saturated_hold",
            &raw.saturated_hold,
            defaults::SATURATED_HOLD,
        )?;
        if saturated_hold > MAX_SATURATED_HOLD {
            return Err(invalid(
                "saturated_hold",
                format!("{saturated_hold:?}"),
                "must be at most 1s",
            ));
        }
        let sidecar = SidecarConfig {
            choose_timeout: positive(
                "choose_timeout",
                dur(
                    "choose_timeout",
                    &raw.choose_timeout,
                    defaults::CHOOSE_TIMEOUT,
                )?,
            )?,
            max_body_bytes: match raw.max_body_bytes {
                Some(0) => return Err(invalid("max_body_bytes", 0, "must be at least 1")),
                Some(n) => n,
                None => defaults::MAX_BODY_BYTES,
            },
            max_attempts: match raw.max_attempts {
                Some(0) => return Err(invalid("max_attempts", 0, "must be at least 1")),
                Some(n) => n,
                None => defaults::MAX_ATTEMPTS,
            },
            shutdown_grace: dur(
                "shutdown_grace",
                &raw.shutdown_grace,
                defaults::SHUTDOWN_GRACE,
            )?,
            client_header_timeout: positive(
                "client_header_timeout",
                dur(
                    "client_header_timeout",
                    &raw.client_header_timeout,
                    defaults::CLIENT_HEADER_TIMEOUT,
                )?,
            )?,
            server_threads: match raw.server_threads {
                Some(n) if n > MAX_SERVER_THREADS => {
                    return Err(invalid(
                        "server_threads",
                        n,
                        format!("must be at most {MAX_SERVER_THREADS} (0 = one per core)"),
                    ));
                }
                Some(n) => n,
                None => defaults::SERVER_THREADS,
            },
            allowed_origins: {
                let mut origins: Vec<String> = defaults::ALLOWED_ORIGINS
                    .iter()
                    .map(|o| (*o).to_owned())
                    .collect();
                for (i, origin) in raw
                    .allowed_origins
                    .unwrap_or_default()
                    .into_iter()
                    .enumerate()
                {
                    if origin.is_empty() || origin.chars().any(char::is_whitespace) {
                        return Err(invalid(
                            format!("allowed_origins[{i}]"),
                            format!("{origin:?}"),
                            "must be an origin such as https://chat.example.com (`*` matches any text)",
                        ));
                    }
                    origins.push(origin);
                }
                origins
            },
            ollama_timeouts: timeouts_for(EndpointKind::Ollama),
            openai_timeouts: timeouts_for(EndpointKind::OpenAi),
            llama_server_timeouts: timeouts_for(EndpointKind::LlamaServer),
        };

        Ok(Self {
            endpoints,
            router_api_key,
            priority_routing: raw.priority_routing.unwrap_or(false),
            affinity,
            probe,
            sessions,
            health,
            watch_interval: dur(
                "watch_interval",
                &raw.watch_interval,
                defaults::WATCH_INTERVAL,
            )?,
            saturated_hold,
            state_file: match raw.state_file.as_deref().map(str::trim) {
                None => None,
                Some("") => return Err(invalid("state_file", "\"\"", "must be a file path")),
                Some(p) => Some(PathBuf::from(p)),
            },
            sidecar,
            warnings,
        }
        .with_hold_warning())
    }

    /// Warns when a held choice can outlast a sidecar's `choose_timeout`
    /// (the sidecar then decides without the control plane).
    fn with_hold_warning(mut self) -> Self {
        if self.saturated_hold >= self.sidecar.choose_timeout {
            self.warnings.push(format!(
                "saturated_hold ({:?}) is not below choose_timeout ({:?}): a choice held \
                 for a slot that long is decided by the sidecar without the control plane",
                self.saturated_hold, self.sidecar.choose_timeout
            ));
        }
        self
    }

    /// Logs each of [`Config::warnings`] at `warn` level.
    pub fn log_warnings(&self) {
        for warning in &self.warnings {
            tracing::warn!("configuration: {warning}");
        }
    }

    /// The configuration used when none is given: one local Ollama at
    /// `http://127.0.0.1:11434`, every other key at its default.
    pub fn local_ollama() -> Result<Self, ConfigError> {
        let mut raw = RawConfig::default();
        raw.endpoints.push("http://127.0.0.1:11434".to_owned());
        Self::validate(raw, &|_| None)
    }

    /// The endpoint with this URL (trailing `/` ignored).
    pub fn endpoint(&self, url: &str) -> Option<&EndpointConfig> {
        let url = url.trim_end_matches('/');
        self.endpoints.iter().find(|e| &*e.url == url)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "OPENAI_KEY").then(|| "sk-test".to_owned())
    }

    /// The error `yaml` is refused with, as shown to the operator.
    fn error(yaml: &str) -> String {
        Config::from_yaml(yaml, &env).unwrap_err().to_string()
    }

    const NOMYO: &str = r#"
endpoints:
  - http://192.168.0.50:11434
  - http://192.168.0.51:11434/
  - https://api.openai.com/v1
llama_server_endpoints:
  - http://192.168.0.33:8889/v1
max_concurrent_connections: 2
api_keys:
  "http://192.168.0.50:11434": "ollama"
  "https://api.openai.com/v1": "${OPENAI_KEY}"
nomyo-router-api-key: "router-secret"
priority_routing: true
conversation_affinity: true
conversation_affinity_ttl: 600
endpoint_config:
  "http://192.168.0.51:11434":
    max_concurrent_connections: 4
"#;

    #[test]
    fn endpoint_urls_the_probes_could_not_use_are_refused() {
        for (url, problem) in [
            ("http://exa mple:11434", "not a valid URL"),
            ("http://a:99999", "not a valid URL"),
            ("http://${HOST}:11434", "not expanded in endpoint URLs"),
            ("http://a:11434/?x=1", "must not have a query"),
            ("ftp://a", "must start with http://"),
            ("http:///v1", "has no host"),
        ] {
            let e = error(&format!("endpoints:\n  - \"{url}\"\n"));
            assert!(
                e.contains("endpoints[0]") && e.contains(problem),
                "{url}: {e}"
            );
        }
    }

    #[test]
    fn the_same_server_written_two_ways_is_listed_twice() {
        for (a, b) in [
            ("http://127.0.0.1:80", "http://127.0.0.1"),
            (
                "https://api.example.com:443/v1",
                "https://api.example.com/v1",
            ),
            ("http://127.0.0.1:23001", "http://127.0.0.1:023001"),
            ("http://Host.example:11434", "http://host.example:11434/"),
        ] {
            let e = error(&format!("endpoints:\n  - {a}\n  - {b}\n"));
            assert!(
                e.contains("endpoints[1]") && e.contains("listed twice"),
                "{a} / {b}: {e}"
            );
        }
        // Keys match the endpoint however its URL is written.
        let c = Config::from_yaml(
            "endpoints:\n  - http://127.0.0.1:80\n\
             api_keys:\n  \"http://127.0.0.1\": k\n\
             endpoint_config:\n  \"http://127.0.0.1:080/\":\n    max_concurrent_connections: 7\n",
            &env,
        )
        .unwrap();
        assert_eq!(c.endpoints[0].api_key.as_ref().unwrap().expose(), "k");
        assert_eq!(c.endpoints[0].max_concurrent, 7);
    }

    #[test]
    fn accepts_nomyo_config_unchanged() {
        let c = Config::from_yaml(NOMYO, &env).unwrap();
        let kinds: Vec<_> = c.endpoints.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                EndpointKind::Ollama,
                EndpointKind::Ollama,
                EndpointKind::OpenAi,
                EndpointKind::LlamaServer
            ]
        );
        assert_eq!(&*c.endpoints[1].url, "http://192.168.0.51:11434");
        assert_eq!(c.endpoints[0].max_concurrent, 2);
        assert_eq!(c.endpoints[1].max_concurrent, 4);
        assert_eq!(c.endpoints[2].api_key.as_ref().unwrap().expose(), "sk-test");
        assert_eq!(c.router_api_key.as_ref().unwrap().expose(), "router-secret");
        assert!(c.priority_routing);
        assert!(c.affinity.enabled);
        assert_eq!(c.affinity.ttl, Duration::from_secs(600));
    }

    #[test]
    fn the_kind_is_read_from_the_path_not_the_host() {
        let c = Config::from_yaml(
            "endpoints: [\"http://v1-gpu.internal:11434\", \"http://gpu:8000/v1\"]\n",
            &env,
        )
        .unwrap();
        let kinds: Vec<_> = c.endpoints.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [EndpointKind::Ollama, EndpointKind::OpenAi]);
    }

    #[test]
    fn endpoint_can_start_drained() {
        let yaml = "endpoints:\n  - http://a:1\n  - http://b:1\nendpoint_config:\n  \"http://b:1/\":\n    draining: true\n";
        let c = Config::from_yaml(yaml, &env).unwrap();
        assert!(!c.endpoints[0].draining);
        assert!(c.endpoints[1].draining);
        let err = error(
            "endpoints:\n  - http://a:1\nendpoint_config:\n  \"http://a:1\":\n    draining: maybe\n",
        );
        assert!(err.contains("draining") && err.contains("maybe"), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_yaml("endpoints: []\nprobe_intervall: 3\n", &env).unwrap_err();
        assert!(err.to_string().contains("probe_intervall"), "{err}");
    }

    #[test]
    fn bad_values_are_named_with_their_value() {
        let err = error("probe_interval: \"5 parsecs\"\n");
        assert!(
            err.contains("probe_interval") && err.contains("5 parsecs"),
            "{err}"
        );
        let err = error("endpoints: [\"ftp://x\"]\n");
        assert!(
            err.contains("endpoints[0]") && err.contains("ftp://x"),
            "{err}"
        );
        let err = error("max_concurrent_connections: 0\n");
        assert!(err.contains("max_concurrent_connections"), "{err}");
        let err = error("timeouts:\n  vllm:\n    connect: 1\n");
        assert!(err.contains("timeouts.vllm"), "{err}");
    }

    #[test]
    fn an_unset_backend_key_variable_is_a_warning_naming_it_and_secrets_are_never_printed() {
        let yaml = "endpoints: [\"https://x/v1\"]\napi_keys:\n  \"https://x/v1\": \"${NOPE}\"\n";
        let c = Config::from_yaml(yaml, &env).unwrap();
        assert!(c.endpoints[0].api_key.is_none());
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        let w = &c.warnings[0];
        assert!(
            w.contains("NOPE") && w.contains("api_keys.https://x/v1") && w.contains("no API key"),
            "{w}"
        );
        let c = Config::from_yaml(NOMYO, &env).unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert!(!format!("{c:?}").contains("sk-test"));
        assert!(!format!("{c:?}").contains("router-secret"));
    }

    #[test]
    fn an_unset_router_key_variable_is_an_error_since_it_would_open_the_router() {
        let empty = Config::from_yaml("router_api_key: \"${EMPTY}\"\n", &|name| {
            (name == "EMPTY").then(String::new)
        })
        .unwrap_err()
        .to_string();
        assert!(
            empty.contains("router_api_key") && empty.contains("expands to an empty key"),
            "{empty}"
        );
        let err = error("router_api_key: \"${NOPE}\"\n");
        assert!(
            err.contains("NOPE") && err.contains("router_api_key"),
            "{err}"
        );
    }

    #[test]
    fn a_backend_key_for_an_unknown_url_is_ignored_with_a_warning() {
        let yaml =
            "endpoints: [\"http://a:1\"]\napi_keys:\n  \"http://b:1\": k\n  \"http://a:1/\": ka\n";
        let c = Config::from_yaml(yaml, &env).unwrap();
        assert_eq!(c.endpoints[0].api_key.as_ref().unwrap().expose(), "ka");
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(
            c.warnings[0].contains("api_keys.http://b:1")
                && c.warnings[0].contains("not a configured endpoint"),
            "{:?}",
            c.warnings
        );
        // A malformed URL is still an error, and so is a limit for an
        // unknown endpoint (a lost override would go unnoticed).
        let err = error("endpoints: [\"http://a:1\"]\napi_keys:\n  \"ftp://b\": k\n");
        assert!(err.contains("api_keys.ftp://b"), "{err}");
        let err = error(
            "endpoints: [\"http://a:1\"]\nendpoint_config:\n  \"http://b:1\":\n    max_concurrent_connections: 4\n",
        );
        assert!(err.contains("endpoint_config.http://b:1"), "{err}");
    }

    /// nomyo-router's own `doc/examples/sample-config.yaml`, verbatim: a
    /// key for an endpoint it does not list, `${OPENAI_KEY}` unset.
    #[test]
    fn nomyo_routers_sample_config_loads_as_it_is() {
        let yaml = r#"# config.yaml
# Ollama endpoints local + remote
endpoints:
  - http://localhost:11434
  - http://192.168.0.51:11434
  - http://192.168.0.52:11434
  # External OpenAI-compatible endpoints (will NOT be queried for /api/ps /api/ps_details)
  - https://api.openai.com/v1

# llama-server endpoints (OpenAI-compatible with /v1/models status info)
# These endpoints will be queried for /api/tags, /api/ps, /api/ps_details
# and included in the model selection pool for inference routing
llama_server_endpoints:
  - http://localhost:8080/v1
  - http://192.168.0.33:8081/v1

# Maximum concurrent connections *per endpoint‑model pair* (equals to OLLAMA_NUM_PARALLEL)
max_concurrent_connections: 2

# Optional router-level API key that gates router/API/web UI access (leave empty to disable)
nomyo-router-api-key: ""

# API keys for remote endpoints
# Set an environment variable like OPENAI_KEY
# Confirm endpoints are exactly as in endpoints block
api_keys:
  "http://192.168.0.50:11434": "ollama"
  "http://192.168.0.51:11434": "ollama"
  "http://192.168.0.52:11434": "ollama"
  "https://api.openai.com/v1": "${OPENAI_KEY}"
  "http://localhost:8080/v1": "llama-server"  # Optional API key for llama-server - depends on llama_server config
  "http://192.168.0.33:8081/v1": "llama-server"
"#;
        let c = Config::from_yaml(yaml, &|_| None).unwrap();
        assert_eq!(c.endpoints.len(), 6);
        assert!(c.router_api_key.is_none());
        assert_eq!(c.endpoints[1].api_key.as_ref().unwrap().expose(), "ollama");
        assert!(c.endpoints[3].api_key.is_none(), "OPENAI_KEY is unset");
        assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("http://192.168.0.50:11434"))
        );
        assert!(c.warnings.iter().any(|w| w.contains("OPENAI_KEY")));
    }

    #[test]
    fn durations_accept_units() {
        let c = Config::from_yaml(
            "session_ttl: 20s\nkeepalive_interval: 500ms\nprobe_interval: 0.25\n",
            &env,
        )
        .unwrap();
        assert_eq!(c.sessions.ttl, Duration::from_secs(20));
        assert_eq!(c.sessions.keepalive_interval, Duration::from_millis(500));
        assert_eq!(c.probe.interval, Duration::from_millis(250));
        let err = error("session_ttl: 2s\nkeepalive_interval: 2s\n");
        assert!(err.contains("keepalive_interval"), "{err}");
    }

    /// `Duration::from_secs_f64` panics on a value a `Duration` cannot
    /// hold; every form must be a config error naming key and value.
    #[test]
    fn huge_negative_and_non_finite_durations_are_errors_naming_key_and_value() {
        for (yaml, key, value, problem) in [
            (
                "probe_timeout: 1e20",
                "probe_timeout",
                "1e20",
                "at most 10 years",
            ),
            (
                "probe_timeout: \"99999999999999999999s\"",
                "probe_timeout",
                "99999999999999999999s",
                "at most",
            ),
            (
                "probe_timeout: 99999999999999999999s",
                "probe_timeout",
                "99999999999999999999s",
                "at most",
            ),
            (
                "conversation_affinity_ttl: 1e30",
                "conversation_affinity_ttl",
                "1e30",
                "at most",
            ),
            (
                "timeouts:\n  ollama:\n    idle: 1e20",
                "timeouts.ollama.idle",
                "1e20",
                "at most",
            ),
            ("session_ttl: 100000h", "session_ttl", "100000h", "at most"),
            (
                "watch_interval: 315360001",
                "watch_interval",
                "315360001",
                "at most",
            ),
            ("choose_timeout: .inf", "choose_timeout", "inf", "at most"),
            ("shutdown_grace: -1", "shutdown_grace", "-1", "non-negative"),
            (
                "shutdown_grace: -.inf",
                "shutdown_grace",
                "-inf",
                "non-negative",
            ),
            (
                "probe_interval: .nan",
                "probe_interval",
                "NaN",
                "non-negative",
            ),
            (
                "probe_interval: \"1e30ms\"",
                "probe_interval",
                "1e30ms",
                "number with unit",
            ),
            (
                "probe_interval: \"-5s\"",
                "probe_interval",
                "-5s",
                "number with unit",
            ),
            (
                "probe_interval: \"nan s\"",
                "probe_interval",
                "nan s",
                "number with unit",
            ),
        ] {
            let err = Config::from_yaml(yaml, &env).unwrap_err();
            assert!(
                matches!(err, ConfigError::Invalid { .. }),
                "{yaml}: {err:?}"
            );
            let err = err.to_string();
            assert!(
                err.contains(&format!("`{key}`")) && err.contains(value) && err.contains(problem),
                "{yaml}: {err}"
            );
        }
        // The longest accepted, in each form.
        let c = Config::from_yaml(
            "completion_failure_ttl: 315360000\nwatch_interval: 87600h\n",
            &env,
        )
        .unwrap();
        assert_eq!(c.health.completion_failure_ttl, MAX_DURATION);
        assert_eq!(c.watch_interval, MAX_DURATION);
    }

    /// A value of the wrong YAML type names the key, what was given and
    /// what a duration may be, with its line.
    #[test]
    fn a_duration_of_the_wrong_type_names_the_key_and_what_is_accepted() {
        for (yaml, key, given) in [
            ("probe_interval: true\n", "probe_interval", "boolean `true`"),
            ("session_ttl: [1]\n", "session_ttl", "sequence"),
            ("choose_timeout: {a: 1}\n", "choose_timeout", "map"),
            (
                "timeouts:\n  openai:\n    idle: false\n",
                "timeouts.openai.idle",
                "boolean `false`",
            ),
        ] {
            let err = error(yaml);
            assert!(
                err.contains(key)
                    && err.contains(given)
                    && err.contains("expected a duration: seconds as a number, or a string")
                    && err.contains("line "),
                "{yaml}: {err}"
            );
        }
        // Every accepted form still reads as before.
        let c = Config::from_yaml(
            "probe_interval: 3\nprobe_timeout: 0.5\nsession_ttl: \"2m\"\nkeepalive_interval: 1h\n\
             watch_interval: 0\nshutdown_grace: 250 ms\n",
            &env,
        );
        let err = c.unwrap_err().to_string();
        assert!(err.contains("keepalive_interval"), "{err}");
        let c = Config::from_yaml(
            "probe_interval: 3\nprobe_timeout: 0.5\nsession_ttl: \"2m\"\nkeepalive_interval: 60s\n\
             watch_interval: 0\nshutdown_grace: 250 ms\n",
            &env,
        )
        .unwrap();
        assert_eq!(c.probe.interval, Duration::from_secs(3));
        assert_eq!(c.probe.timeout, Duration::from_millis(500));
        assert_eq!(c.sessions.ttl, Duration::from_secs(120));
        assert_eq!(c.watch_interval, Duration::ZERO);
        assert_eq!(c.sidecar.shutdown_grace, Duration::from_millis(250));
    }

    #[test]
    fn allowed_origins_add_to_ollamas_defaults() {
        let origins = |extra: &str| {
            Config::from_yaml(&format!("endpoints: [\"http://a:1\"]\n{extra}"), &|_| None)
                .unwrap()
                .sidecar
                .allowed_origins
        };
        let default = origins("");
        assert_eq!(default.len(), defaults::ALLOWED_ORIGINS.len());
        assert!(default.iter().any(|o| o == "http://localhost:*"));
        let more =
            origins("allowed_origins: [\"https://chat.example.com\", \"chrome-extension://*\"]\n");
        assert_eq!(more.len(), defaults::ALLOWED_ORIGINS.len() + 2);
        assert_eq!(more.last().unwrap(), "chrome-extension://*");
        let err = error("allowed_origins: [\"ok://x\", \"bad one\"]\n");
        assert!(
            err.contains("allowed_origins[1]") && err.contains("bad one"),
            "{err}"
        );
    }

    #[test]
    fn client_header_timeout_defaults_to_60s_and_must_be_positive() {
        let timeout = |yaml: &str| {
            Config::from_yaml(yaml, &env)
                .unwrap()
                .sidecar
                .client_header_timeout
        };
        assert_eq!(timeout(""), Duration::from_secs(60));
        assert_eq!(
            timeout("client_header_timeout: 250ms\n"),
            Duration::from_millis(250)
        );
        let err = error("client_header_timeout: 0\n");
        assert!(
            err.contains("client_header_timeout") && err.contains("greater than zero"),
            "{err}"
        );
    }

    #[test]
    fn server_threads_default_to_zero_which_means_one_per_core() {
        let threads = |yaml: &str| {
            Config::from_yaml(yaml, &env)
                .unwrap()
                .sidecar
                .server_threads
        };
        assert_eq!(threads(""), 0);
        assert_eq!(threads("server_threads: 0\n"), 0);
        assert_eq!(threads("server_threads: 1\n"), 1);
        assert_eq!(threads("server_threads: 4\n"), 4);
        let err = error("server_threads: 5000\n");
        assert!(
            err.contains("server_threads") && err.contains("5000"),
            "{err}"
        );
        let err = error("server_threads: -1\n");
        assert!(err.contains("server_threads"), "{err}");
    }

    #[test]
    fn a_duplicated_key_names_its_lines() {
        let err = error("endpoints: [\"http://a:1\"]\nprobe_interval: 1s\nprobe_interval: 2s\n");
        assert!(
            err.contains("duplicate field `probe_interval`") && err.ends_with("(lines 2 and 3)"),
            "{err}"
        );
        // Nested, the parser names the path and line itself.
        let nested =
            "timeouts:\n  ollama:\n    connect: 1s\n  openai:\n    connect: 2s\n    connect: 3s\n";
        let err = error(nested);
        assert!(
            err.contains("timeouts.openai") && err.contains("line"),
            "{err}"
        );
        // The helper never names the same key under another parent.
        assert_eq!(duplicated_key_lines(nested, "connect"), [5, 6]);
        let list = "endpoints:\n  - url: a\n  - url: b\nurl: c\n";
        assert!(duplicated_key_lines(list, "url").is_empty());
        // The same kind's timeouts under both spellings.
        let err =
            error("timeouts:\n  llama_server: {connect: 1s}\n  llama-server: {connect: 2s}\n");
        assert_eq!(
            err,
            "invalid config: key `timeouts`: `llama_server` is given twice, \
             also as `llama-server` (lines 2 and 3)"
        );
    }

    /// Maps keyed by URL (or kind) lost the first of two entries for the
    /// same key silently; now both are named, with their lines.
    #[test]
    fn an_entry_given_twice_in_a_keyed_map_is_named_with_its_lines() {
        let err = error(
            "endpoints: [\"http://a:1\"]\n\
             endpoint_config:\n  \"http://a:1\":\n    draining: true\n  \"http://a:1\":\n    max_concurrent_connections: 2\n",
        );
        assert_eq!(
            err,
            "invalid config: key `endpoint_config`: `http://a:1` is given twice (lines 3 and 5)"
        );
        let err = error(
            "endpoints: [\"https://x/v1\"]\napi_keys:\n  https://x/v1: k1\n  'https://x/v1': k2\n",
        );
        assert_eq!(
            err,
            "invalid config: key `api_keys`: `https://x/v1` is given twice (lines 3 and 4)"
        );
        // Written two ways for the same server (as in `endpoints`); also for
        // a URL that is not an endpoint; credentials are not shown.
        let err = error(
            "endpoints: [\"http://a:1\"]\napi_keys:\n  \"http://u:pw@b:1/\": k1\n  \"http://a:1\": k\n  \"http://u:pw@B:1\": k2\n",
        );
        assert_eq!(
            err,
            "invalid config: key `api_keys`: `http://b:1/` is given twice, \
             also as `http://B:1` (lines 3 and 5)"
        );
        assert!(!err.contains("pw"), "{err}");
        // Flow style: named without lines.
        let err = error(
            "endpoints: [\"http://a:1\"]\napi_keys: {\"http://a:1\": k1, \"http://a:1/\": k2}\n",
        );
        assert_eq!(
            err,
            "invalid config: key `api_keys`: `http://a:1` is given twice, also as `http://a:1/`"
        );
        // The same timeouts kind twice.
        let err = error("timeouts:\n  ollama:\n    idle: 1s\n  ollama:\n    idle: 2s\n");
        assert_eq!(
            err,
            "invalid config: key `timeouts`: `ollama` is given twice (lines 2 and 4)"
        );
        // One entry per endpoint is still fine.
        let c = Config::from_yaml(
            "endpoints: [\"http://a:1\", \"http://b:1\"]\napi_keys:\n  \"http://a:1\": ka\n  \"http://b:1\": kb\n",
            &env,
        )
        .unwrap();
        assert_eq!(c.endpoints[1].api_key.as_ref().unwrap().expose(), "kb");
    }

    /// Errors and warnings about an endpoint URL show it without the
    /// credentials in it.
    #[test]
    fn config_errors_and_warnings_hide_url_credentials() {
        let err = error("endpoints: [\"http://u:s3cret@h:1/?q=1\"]\n");
        assert!(
            err.contains("http://h:1/?q=1") && !err.contains("s3cret"),
            "{err}"
        );
        let err = error(
            "endpoints: [\"http://u:s3cret@h:1\"]\nendpoint_config:\n  \"http://u:s3cret@h:1\":\n    max_concurrent_connections: 0\n",
        );
        assert!(
            err.contains("endpoint_config.http://h:1") && !err.contains("s3cret"),
            "{err}"
        );
        // Type errors and unknown keys under a URL key (serde's messages).
        for entry in [
            "draining: maybe",
            "bogus_key: 1",
            "max_concurrent_connections: -3",
        ] {
            let err = error(&format!(
                "endpoints: [\"http://u:s3cret@h:1\"]\nendpoint_config:\n  \"http://u:s3cret@h:1\":\n    {entry}\n"
            ));
            assert!(
                err.contains("http://h:1") && !err.contains("s3cret"),
                "{err}"
            );
        }
        let err =
            error("endpoints: [\"http://a:1\"]\napi_keys:\n  \"http://u:s3cret@h:1\": [1, 2]\n");
        assert!(!err.contains("s3cret"), "{err}");
        let c = Config::from_yaml(
            "endpoints: [\"http://a:1\"]\napi_keys:\n  \"http://u:s3cret@h:1\": k\n  \"http://a:1\": ${NOPE}\n",
            &|_| None,
        )
        .unwrap();
        assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
        assert!(
            c.warnings.iter().all(|w| !w.contains("s3cret")),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn saturated_hold_is_at_most_a_second_and_warned_about_past_choose_timeout() {
        let read = |extra: &str| {
            Config::from_yaml(&format!("endpoints: [\"http://a:1\"]\n{extra}"), &|_| None)
        };
        let c = read("").unwrap();
        assert_eq!(c.saturated_hold, Duration::from_millis(5));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert_eq!(
            read("saturated_hold: 0\n").unwrap().saturated_hold,
            Duration::ZERO
        );
        let err = read("saturated_hold: 2s\n").unwrap_err().to_string();
        assert!(
            err.contains("saturated_hold") && err.contains("at most 1s"),
            "{err}"
        );
        let c = read("saturated_hold: 100ms\nchoose_timeout: 50ms\n").unwrap();
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(
            c.warnings[0].contains("saturated_hold") && c.warnings[0].contains("choose_timeout"),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn default_config_points_at_local_ollama() {
        let c = Config::local_ollama().unwrap();
        assert_eq!(c.endpoints.len(), 1);
        assert_eq!(&*c.endpoints[0].url, "http://127.0.0.1:11434");
        assert_eq!(c.endpoints[0].kind, EndpointKind::Ollama);
    }
}
