//! Test configurations built in code. [`TestConfig`] renders the same YAML
//! an operator writes (so it can also be written to a file for the real
//! binaries) and validates it with the control plane's own loader.
//!
//! Defaults favour fast tests: probes every 0.1 s, a 2 s session TTL,
//! `WatchUsage` publications at most every 5 ms, a generous control-plane
//! choice deadline (2 s) so a slow debug build never drops into degraded
//! mode by accident, and short connect timeouts.

use std::fmt::Write as _;

use switchyard_control_plane::{config::Config, endpoint::EndpointKind};

/// One endpoint line of a test config.
#[derive(Clone, Debug)]
pub struct EndpointEntry {
    /// Base URL as configured (`/v1` included for OpenAI-compatible ones).
    pub url: String,
    /// Kind: decides whether it goes under `endpoints` or
    /// `llama_server_endpoints`.
    pub kind: EndpointKind,
    /// `endpoint_config.<url>.max_concurrent_connections`.
    pub max_concurrent: Option<u32>,
    /// `api_keys.<url>`.
    pub api_key: Option<String>,
}

/// A configuration under construction. `settings` are top-level YAML
/// `key: value` lines, later ones overriding earlier ones of the same key.
#[derive(Clone, Debug)]
pub struct TestConfig {
    /// Endpoints in priority order.
    pub endpoints: Vec<EndpointEntry>,
    /// Top-level keys, as `(key, YAML value)`.
    pub settings: Vec<(String, String)>,
}

impl Default for TestConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl TestConfig {
    /// No endpoints, fast test defaults.
    pub fn new() -> Self {
        let mut c = TestConfig {
            endpoints: Vec::new(),
            settings: Vec::new(),
        };
        for (k, v) in [
            ("probe_interval", "0.1"),
            ("probe_timeout", "1"),
            ("probe_jitter", "0"),
            ("session_ttl", "2"),
            ("keepalive_interval", "0.2"),
            ("watch_interval", "0.005"),
            ("choose_timeout", "2"),
            ("max_concurrent_connections", "4"),
            ("shutdown_grace", "1"),
            ("completion_failure_ttl", "1"),
            ("breaker_open_for", "1"),
        ] {
            c.settings.push((k.to_owned(), v.to_owned()));
        }
        for kind in ["ollama", "openai", "llama_server"] {
            c.settings.push((
                format!("timeouts.{kind}"),
                "{connect: 1, first_byte: 20, idle: 20}".to_owned(),
            ));
        }
        c
    }

    /// Sets a top-level key to a YAML value (`"true"`, `"2"`, `"\"k\""`).
    pub fn set(&mut self, key: &str, yaml_value: &str) -> &mut Self {
        self.settings.retain(|(k, _)| k != key);
        self.settings.push((key.to_owned(), yaml_value.to_owned()));
        self
    }

    /// Adds an endpoint.
    pub fn endpoint(&mut self, entry: EndpointEntry) -> &mut Self {
        self.endpoints.push(entry);
        self
    }

    /// The YAML text.
    pub fn yaml(&self) -> String {
        let mut out = String::new();
        let list = |kinds: &[EndpointKind]| -> Vec<&EndpointEntry> {
            self.endpoints
                .iter()
                .filter(|e| kinds.contains(&e.kind))
                .collect()
        };
        let plain = list(&[EndpointKind::Ollama, EndpointKind::OpenAi]);
        let llama = list(&[EndpointKind::LlamaServer]);
        out.push_str("endpoints:\n");
        for e in &plain {
            let _ = writeln!(out, "  - {}", quoted(&e.url));
        }
        if plain.is_empty() {
            out.truncate(0);
            out.push_str("endpoints: []\n");
        }
        if !llama.is_empty() {
            out.push_str("llama_server_endpoints:\n");
            for e in &llama {
                let _ = writeln!(out, "  - {}", quoted(&e.url));
            }
        }
        let keys: Vec<_> = self
            .endpoints
            .iter()
            .filter(|e| e.api_key.is_some())
            .collect();
        if !keys.is_empty() {
            out.push_str("api_keys:\n");
            for e in keys {
                let key = e.api_key.as_deref().unwrap_or_default();
                let _ = writeln!(out, "  {}: {}", quoted(&e.url), quoted(key));
            }
        }
        let limits: Vec<_> = self
            .endpoints
            .iter()
            .filter(|e| e.max_concurrent.is_some())
            .collect();
        if !limits.is_empty() {
            out.push_str("endpoint_config:\n");
            for e in limits {
                let n = e.max_concurrent.unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  {}:\n    max_concurrent_connections: {n}",
                    quoted(&e.url)
                );
            }
        }
        let mut timeouts = Vec::new();
        for (k, v) in &self.settings {
            if let Some(kind) = k.strip_prefix("timeouts.") {
                timeouts.push((kind, v));
            } else {
                let _ = writeln!(out, "{k}: {v}");
            }
        }
        if !timeouts.is_empty() {
            out.push_str("timeouts:\n");
            for (kind, v) in timeouts {
                let _ = writeln!(out, "  {kind}: {v}");
            }
        }
        out
    }

    /// Validates the YAML with the control plane's loader (no `${ENV}`
    /// lookups); panics with the YAML and the error if it is invalid.
    pub fn build(&self) -> Config {
        let yaml = self.yaml();
        Config::from_yaml(&yaml, &|_| None)
            .unwrap_or_else(|e| panic!("test config is invalid: {e}\n--- yaml ---\n{yaml}"))
    }
}

fn quoted(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}
