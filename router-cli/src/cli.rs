//! The command line, as clap derive structs: every flag, its environment
//! variable and its help text live here and nowhere else.
//!
//! The interface is fixed by DESIGN.md ("Command-line interface"):
//! `switchyard [--control-plane URL] <command> [--output table|json]`.
//! `--control-plane` and `--output` are global, so they may be written
//! before or after the subcommand.

use std::{fmt, str::FromStr};

use clap::{Parser, Subcommand, ValueEnum};

/// Default control-plane address (the control plane's default `--listen`).
pub const DEFAULT_CONTROL_PLANE: &str = "http://127.0.0.1:50051";

/// The `--output json` schema, shown by `switchyard --help`. Field names are
/// part of the interface (see [`crate::view`]); keep the two in step.
pub(crate) const JSON_HELP: &str = "\
JSON output (--output json; field names are stable):
  endpoints, each watch line:
    {version, sessions, leases, affinity_entries, priority_routing,
     conversation_affinity, in_flight, endpoints: [{url, kind, priority,
     healthy, health_detail, draining, circuit_open, circuit_half_open,
     in_flight, max_concurrent,
     advertised_models, loaded_models, failing_models, missing_models,
     last_probe_ok_unix_ms, server_version,
     usage: [{model, in_flight, requests, prompt_tokens, completion_tokens}]}]}
  models:   {version, models: [{model, in_flight, endpoints: [{url, kind,
             advertised_as, tracking_model, loaded, in_flight, healthy, draining}]}]}
  usage:    {version, rows: [{endpoint, model, in_flight, requests,
             prompt_tokens, completion_tokens}], totals: {in_flight, requests,
             prompt_tokens, completion_tokens}}
  sessions: {sessions: [{id (16 hex digits, as in the table), name, leases,
             last_keepalive_ms_ago, expires_in_ms}]}
  affinity: {total, entries: [{key, endpoint, model, expires_in_ms}]}
  choose:   {model, endpoint, endpoint_kind, backend_model, tracking_model, reason}
  drain, undrain: {endpoint: {...as in endpoints...}}
  kind: ollama | openai | llama_server
  max_concurrent: in-flight limit per endpoint and model (not endpoint total)
  reason: affinity | loaded_free | free_slot | saturated";

/// Inspect and operate a Switchyard cluster through its control plane's gRPC API.
///
/// Exit codes: 0 ok, 1 runtime failure (control plane unreachable, unknown
/// model or endpoint, ...), 2 bad usage.
#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about, long_about, after_long_help = JSON_HELP)]
pub struct Cli {
    /// Control-plane gRPC address (http://; the control plane serves plaintext gRPC).
    #[arg(
        long,
        global = true,
        env = "SWITCHYARD_CONTROL_PLANE",
        default_value = DEFAULT_CONTROL_PLANE,
        value_name = "URL"
    )]
    pub control_plane: ControlPlaneUrl,

    /// Output format: human-readable tables, or JSON with stable field names.
    #[arg(
        long,
        short = 'o',
        global = true,
        env = "SWITCHYARD_OUTPUT",
        value_enum,
        default_value_t = OutputFormat::Table
    )]
    pub output: OutputFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand, PartialEq, Eq)]
pub enum Command {
    /// List endpoints: kind, version, health, drain state, circuit breaker, models, in-flight.
    ///
    /// One row per configured endpoint, in configuration (priority) order.
    /// VERSION is what an Ollama endpoint reports on `/api/version` (`-`
    /// when unknown or not Ollama);
    /// HEALTH is `ok` or `down` followed by the last probe error; CIRCUIT is
    /// `open` while the circuit breaker keeps the endpoint out after
    /// consecutive failures, `half-open` once that period is over (the next
    /// request is a trial), `trial` while that request is in flight (the
    /// endpoint is kept out until it ends: success closes the breaker,
    /// failure opens it again), else `closed`; IN-FLIGHT is requests in flight over all
    /// models; LIMIT/MODEL is `max_concurrent_connections`, the limit per
    /// endpoint and model (like OLLAMA_NUM_PARALLEL; nomyo-router's meaning)
    /// that the router fills before queueing. JSON: `{"version", "endpoints": [...]}`.
    Endpoints,
    /// List models: which endpoints serve each one, where it is loaded, in-flight.
    ///
    /// Models are grouped by the name a client sends, in canonical form (an
    /// untagged name gets `:latest`; nothing else is changed), so `llama3` on
    /// an Ollama endpoint and `llama3` on an OpenAI-compatible one are one
    /// model served by two endpoints. Each endpoint row shows the name the
    /// endpoint advertises (AS; `-` for a model no longer advertised that
    /// still has requests in flight there) and EP-IN-FLIGHT, counted under
    /// the endpoint's tracking name (`tracking_model` in JSON; llama-server
    /// names without org prefix and quantization suffix); IN-FLIGHT is the
    /// sum over the model's endpoints. JSON: `{"version", "models": [...]}`.
    Models,
    /// Show in-flight requests and token counts per endpoint and model, with totals.
    ///
    /// Token and request counts are cumulative since the control plane
    /// started, as reported by sidecars when requests end.
    /// JSON: `{"version", "rows": [...], "totals": {...}}`.
    Usage,
    /// List sidecar sessions: id, name, leases held, last keep-alive, expiry.
    ///
    /// A session that misses its keep-alive deadline expires and its leases
    /// are released. JSON: `{"sessions": [...]}`.
    Sessions,
    /// Show the conversation-affinity table size and a sample of entries.
    ///
    /// JSON: `{"total", "entries": [...]}`.
    Affinity {
        /// Most entries to show.
        #[arg(long, default_value_t = 20, value_name = "N", env = "SWITCHYARD_AFFINITY_LIMIT",
              value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
    /// Follow cluster state live (the `WatchUsage` stream) until Ctrl-C.
    ///
    /// On a terminal the view is redrawn in place; otherwise each update is
    /// printed after the previous one. With `--output json`, one JSON object
    /// per line per update (the same object as `endpoints --output json`
    /// plus cluster totals). Exits 0 on Ctrl-C; 1 with a message when the
    /// stream breaks or the control plane ends it (it shut down or
    /// restarted), so a script following it notices.
    Watch,
    /// Dry-run a routing decision for MODEL: which endpoint would serve it, and why.
    ///
    /// Takes no lease and changes no state. Prints the endpoint, its kind,
    /// the model name that would be sent to the backend, the name usage is
    /// tracked under, and the reason (affinity, loaded_free, free_slot,
    /// saturated). Exits 1 with the control plane's message if no endpoint
    /// serves the model.
    Choose {
        /// Model name as a client would send it (e.g. `llama3.2`, `gpt-4o`).
        model: String,
        /// Conversation-affinity key to route with (as a sidecar would compute it).
        #[arg(long, value_name = "K", env = "SWITCHYARD_AFFINITY_KEY")]
        affinity_key: Option<String>,
    },
    /// Stop sending new requests to ENDPOINT; requests in flight finish.
    ///
    /// ENDPOINT is the base URL exactly as configured (a trailing `/` is
    /// ignored). Watch its IN-FLIGHT in `switchyard endpoints` fall to 0
    /// before taking the backend down.
    Drain {
        /// Endpoint base URL as configured, e.g. `http://10.0.0.5:11434`.
        endpoint: String,
    },
    /// Return a drained ENDPOINT to service.
    Undrain {
        /// Endpoint base URL as configured, e.g. `http://10.0.0.5:11434`.
        endpoint: String,
    },
}

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Human-readable tables.
    Table,
    /// JSON with stable field names (one object per line for `watch`).
    Json,
}

/// A control-plane address: an absolute `http://` URL with a host. `https://`
/// is refused, not silently connected to in plaintext: the control plane
/// serves plaintext gRPC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlPlaneUrl(http::Uri);

impl ControlPlaneUrl {
    /// The URL as a URI.
    pub fn uri(&self) -> &http::Uri {
        &self.0
    }
}

impl fmt::Display for ControlPlaneUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `Uri` renders `http://h:1` as `http://h:1/`; show it as written.
        let s = self.0.to_string();
        f.write_str(s.strip_suffix('/').unwrap_or(&s))
    }
}

/// Why a `--control-plane` value was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneUrlError {
    /// Not a URI at all.
    #[error("not a valid URL: {0}")]
    Invalid(#[from] http::uri::InvalidUri),
    /// Scheme missing or not http.
    #[error("must start with http:// (e.g. {DEFAULT_CONTROL_PLANE})")]
    Scheme,
    /// `https://`: the control plane serves plaintext gRPC only.
    #[error("{}", switchyard_control_plane::grpc::HTTPS_UNSUPPORTED)]
    Tls,
    /// No host.
    #[error("has no host")]
    NoHost,
    /// A path other than `/` (gRPC services live at the root).
    #[error("must not have a path (gRPC is served at the root)")]
    Path,
}

impl FromStr for ControlPlaneUrl {
    type Err = ControlPlaneUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let uri: http::Uri = s.trim().parse()?;
        match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("http") => {}
            Some(s) if s.eq_ignore_ascii_case("https") => return Err(ControlPlaneUrlError::Tls),
            _ => return Err(ControlPlaneUrlError::Scheme),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(ControlPlaneUrlError::NoHost);
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(ControlPlaneUrlError::Path);
        }
        Ok(Self(uri))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use clap::{CommandFactory, error::ErrorKind};

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("switchyard").chain(args.iter().copied()))
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults() {
        // The env var may be set in a developer's shell; clap reads it.
        if std::env::var_os("SWITCHYARD_CONTROL_PLANE").is_some()
            || std::env::var_os("SWITCHYARD_OUTPUT").is_some()
        {
            return;
        }
        let cli = parse(&["endpoints"]).unwrap();
        assert_eq!(cli.control_plane.to_string(), DEFAULT_CONTROL_PLANE);
        assert_eq!(cli.output, OutputFormat::Table);
        assert_eq!(cli.command, Command::Endpoints);
    }

    #[test]
    fn global_flags_before_or_after_the_command() {
        let a = parse(&[
            "--control-plane",
            "http://cp:1",
            "usage",
            "--output",
            "json",
        ])
        .unwrap();
        let b = parse(&["usage", "--control-plane", "http://cp:1", "-o", "json"]).unwrap();
        for cli in [a, b] {
            assert_eq!(cli.control_plane.to_string(), "http://cp:1");
            assert_eq!(cli.output, OutputFormat::Json);
            assert_eq!(cli.command, Command::Usage);
        }
    }

    #[test]
    fn every_command_parses() {
        let cases: &[(&[&str], Command)] = &[
            (&["endpoints"], Command::Endpoints),
            (&["models"], Command::Models),
            (&["usage"], Command::Usage),
            (&["sessions"], Command::Sessions),
            (&["affinity"], Command::Affinity { limit: 20 }),
            (
                &["affinity", "--limit", "5"],
                Command::Affinity { limit: 5 },
            ),
            (&["watch"], Command::Watch),
            (
                &["choose", "llama3"],
                Command::Choose {
                    model: "llama3".into(),
                    affinity_key: None,
                },
            ),
            (
                &["choose", "llama3", "--affinity-key", "k1"],
                Command::Choose {
                    model: "llama3".into(),
                    affinity_key: Some("k1".into()),
                },
            ),
            (
                &["drain", "http://a:1"],
                Command::Drain {
                    endpoint: "http://a:1".into(),
                },
            ),
            (
                &["undrain", "http://a:1"],
                Command::Undrain {
                    endpoint: "http://a:1".into(),
                },
            ),
        ];
        for (args, want) in cases {
            assert_eq!(&parse(args).unwrap().command, want, "{args:?}");
        }
    }

    #[test]
    fn bad_usage_is_a_clap_error() {
        let kind = |args: &[&str]| parse(args).unwrap_err().kind();
        assert_eq!(
            kind(&[]),
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        );
        assert_eq!(kind(&["frobnicate"]), ErrorKind::InvalidSubcommand);
        assert_eq!(kind(&["choose"]), ErrorKind::MissingRequiredArgument);
        assert_eq!(kind(&["drain"]), ErrorKind::MissingRequiredArgument);
        assert_eq!(kind(&["endpoints", "-o", "yaml"]), ErrorKind::InvalidValue);
        assert_eq!(
            kind(&["affinity", "--limit", "0"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            kind(&["--control-plane", "127.0.0.1:50051", "endpoints"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            kind(&["--control-plane", "ftp://x", "endpoints"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            kind(&["--control-plane", "http://x:1/api", "endpoints"]),
            ErrorKind::ValueValidation
        );
    }

    #[test]
    fn every_subcommand_has_help() {
        let cmd = Cli::command();
        for sub in cmd.get_subcommands() {
            assert!(
                sub.get_about().is_some(),
                "subcommand {} has no help",
                sub.get_name()
            );
        }
    }

    /// Every key of every JSON view appears in the `--help` schema.
    #[test]
    fn json_help_names_every_field() {
        use switchyard_control_plane::decision::DecisionReason;
        use switchyard_proto::v1;

        use crate::view::{self, tests::sample_state};

        fn keys(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    for (k, v) in m {
                        out.push(k.clone());
                        keys(v, out);
                    }
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| keys(v, out)),
                _ => {}
            }
        }
        let state = view::StateView::try_from(sample_state()).unwrap();
        let values = [
            serde_json::to_value(&state).unwrap(),
            serde_json::to_value(view::ModelsView::from(&state)).unwrap(),
            serde_json::to_value(view::UsageView::from(&state)).unwrap(),
            serde_json::to_value(view::SessionsView::from(v1::ListSessionsResponse {
                sessions: vec![v1::SessionInfo::default()],
            }))
            .unwrap(),
            serde_json::to_value(view::AffinityView::from(v1::ListAffinityResponse {
                total: 1,
                entries: vec![v1::AffinityEntry::default()],
            }))
            .unwrap(),
            serde_json::to_value(view::ChoiceView {
                model: String::new(),
                endpoint: String::new(),
                endpoint_kind: String::new(),
                backend_model: String::new(),
                tracking_model: String::new(),
                reason: DecisionReason::Affinity,
            })
            .unwrap(),
            serde_json::to_value(view::DrainView {
                endpoint: state.endpoints[0].clone(),
            })
            .unwrap(),
        ];
        let mut all = Vec::new();
        values.iter().for_each(|v| keys(v, &mut all));
        let words: Vec<&str> = JSON_HELP
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .collect();
        for key in all {
            assert!(
                words.contains(&key.as_str()),
                "`{key}` missing from JSON_HELP"
            );
        }
    }

    #[test]
    fn url_display_keeps_what_was_written() {
        let u: ControlPlaneUrl = "http://cp.example:50051".parse().unwrap();
        assert_eq!(u.to_string(), "http://cp.example:50051");
        let u: ControlPlaneUrl = "http://10.0.0.1:50051/".parse().unwrap();
        assert_eq!(u.to_string(), "http://10.0.0.1:50051");
    }

    #[test]
    fn https_is_refused_not_used_in_plaintext() {
        for url in ["https://cp.example:443", "HTTPS://cp.example"] {
            let e = url.parse::<ControlPlaneUrl>().unwrap_err();
            assert!(matches!(e, ControlPlaneUrlError::Tls), "{url}: {e}");
            assert!(e.to_string().contains("https:// is not supported"), "{e}");
        }
        assert!(matches!(
            "ftp://cp".parse::<ControlPlaneUrl>(),
            Err(ControlPlaneUrlError::Scheme)
        ));
    }
}
