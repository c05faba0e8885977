//! The `switchyard-control-plane` command line: typed arguments (clap
//! derive, every flag with an environment-variable fallback), config
//! validation, and the process lifecycle with its exit codes:
//!
//! - `0`: clean shutdown (SIGTERM / Ctrl-C), or `--check-config` passed;
//! - `2`: bad usage or bad config (the message names the key and value);
//! - `1`: runtime failure (e.g. the listen address is in use).
//!
//! `main.rs` only calls [`run_cli`]; everything here is testable.

use std::{
    ffi::OsString, fmt::Write as _, io::Write, net::SocketAddr, path::PathBuf, process::ExitCode,
};

use clap::{Parser, builder::BoolishValueParser};
use tokio_util::sync::CancellationToken;

use crate::{
    admin_file::{AdminFile, AdminFileError},
    config::Config,
    endpoint::without_credentials,
    server::{self, ServeError},
    telemetry::{self, LogFormat, TelemetryOptions},
};

/// Default gRPC listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

/// Switchyard control plane: the authoritative routing state for a fleet of
/// LLM inference servers, served over gRPC to sidecars and the `switchyard`
/// CLI.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "switchyard-control-plane",
    version,
    after_help = "Exit codes: 0 ok, 1 runtime failure (e.g. address in use), 2 bad usage or bad config.\n\
                  Log level: RUST_LOG (default info). SIGTERM or Ctrl-C shuts down gracefully."
)]
pub struct Args {
    /// Configuration file (YAML; nomyo-router's config.yaml keys are accepted).
    #[arg(long, value_name = "FILE", env = "SWITCHYARD_CONFIG")]
    pub config: PathBuf,

    /// Address for the gRPC API (Routing, Cluster, health, reflection).
    #[arg(long, value_name = "ADDR", env = "SWITCHYARD_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Address for Prometheus metrics at GET /metrics; off when unset.
    #[arg(long, value_name = "ADDR", env = "SWITCHYARD_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Validate the configuration, print a one-line summary and exit.
    #[arg(long, env = "SWITCHYARD_CHECK_CONFIG", value_parser = BoolishValueParser::new())]
    pub check_config: bool,

    /// Log format on stderr (level filter from RUST_LOG, default info).
    #[arg(
        long,
        value_enum,
        value_name = "FORMAT",
        env = "SWITCHYARD_LOG_FORMAT",
        default_value_t = LogFormat::Text
    )]
    pub log_format: LogFormat,

    /// Export tracing spans over OTLP/HTTP to this collector URL (e.g.
    /// http://127.0.0.1:4318; spans go to URL/v1/traces). Needs a build with
    /// the `otlp` cargo feature; otherwise the flag exits 2.
    #[arg(long, value_name = "URL", env = "SWITCHYARD_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// How the process ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// 0: success.
    Ok,
    /// 1: runtime failure.
    Runtime,
    /// 2: bad usage or bad configuration.
    Usage,
}

impl Exit {
    /// The numeric exit code.
    pub fn code(self) -> u8 {
        match self {
            Self::Ok => 0,
            Self::Runtime => 1,
            Self::Usage => 2,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e.code())
    }
}

/// What `--check-config` prints for a valid configuration: the
/// [`config_summary`] and, with `state_file`, the drains saved there (read
/// now, so a file the control plane could not start with fails the check).
/// A `state_file` that cannot be written where it is goes to `warnings`:
/// the check may run elsewhere than the control plane (a ConfigMap
/// validated in CI), and the start checks it again, there as an error.
pub fn check_report(config: &Config, warnings: &mut Vec<String>) -> Result<String, AdminFileError> {
    let mut summary = config_summary(config);
    if let Some(path) = &config.state_file {
        let file = AdminFile::new(path.clone());
        let drained = file.load()?;
        if let Err(e) = file.check_writable() {
            warnings.push(format!(
                "{e} (the control plane refuses to start like this)"
            ));
        }
        let _ = write!(
            summary,
            "; drains saved in {} ({} now: {})",
            path.display(),
            drained.len(),
            if drained.is_empty() {
                "none".to_owned()
            } else {
                drained.join(", ")
            }
        );
    }
    Ok(summary)
}

/// The one-line `--check-config` summary: endpoints with kinds and limits;
/// whether keys are set, never their values.
pub fn config_summary(config: &Config) -> String {
    let endpoints: Vec<String> = config
        .endpoints
        .iter()
        .map(|e| {
            format!(
                "{} ({}, max {} per model{}{})",
                without_credentials(&e.url),
                e.kind,
                e.max_concurrent,
                if e.api_key.is_some() { ", api key" } else { "" },
                if e.draining { ", draining" } else { "" }
            )
        })
        .collect();
    format!(
        "config ok: {} endpoint{}: {}; priority_routing={}, conversation_affinity={}, router api key {}",
        config.endpoints.len(),
        if config.endpoints.len() == 1 { "" } else { "s" },
        if endpoints.is_empty() {
            "(none)".to_owned()
        } else {
            endpoints.join(", ")
        },
        config.priority_routing,
        config.affinity.enabled,
        if config.router_api_key.is_some() {
            "set"
        } else {
            "not set"
        },
    )
}

/// Parses `args` (including the program name), then checks the config or
/// runs the control plane until SIGTERM / Ctrl-C. Messages go to `out` and
/// `err`.
pub fn run_cli<I, T>(args: I, out: &mut dyn Write, err: &mut dyn Write) -> Exit
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args = match Args::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => {
            // Help and version are "errors" to clap, but succeed.
            return if e.use_stderr() {
                let _ = write!(err, "{}", e.render());
                Exit::Usage
            } else {
                let _ = write!(out, "{}", e.render());
                Exit::Ok
            };
        }
    };
    if let Some(Err(e)) = args
        .otlp_endpoint
        .as_deref()
        .map(telemetry::check_otlp_endpoint)
    {
        let _ = writeln!(err, "switchyard-control-plane: {e}");
        return Exit::Usage;
    }
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(err, "switchyard-control-plane: {e}");
            return Exit::Usage;
        }
    };
    if args.check_config {
        for warning in &config.warnings {
            let _ = writeln!(err, "switchyard-control-plane: warning: {warning}");
        }
        let mut warnings = Vec::new();
        let report = check_report(&config, &mut warnings);
        for warning in &warnings {
            let _ = writeln!(err, "switchyard-control-plane: warning: {warning}");
        }
        return match report {
            Ok(report) => {
                let _ = writeln!(out, "{report}");
                Exit::Ok
            }
            Err(e) => {
                let _ = writeln!(err, "switchyard-control-plane: {e}");
                Exit::Usage
            }
        };
    }

    // Dropped after the runtime (declared before it): flushes spans
    // still waiting for export.
    let _telemetry = match telemetry::init_with(&TelemetryOptions {
        format: args.log_format,
        otlp_endpoint: args.otlp_endpoint.clone(),
        service_name: "switchyard-control-plane",
    }) {
        Ok(t) => t,
        Err(e) => {
            let _ = writeln!(err, "switchyard-control-plane: {e}");
            return Exit::Usage;
        }
    };
    config.log_warnings();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(
                err,
                "switchyard-control-plane: cannot start the runtime: {e}"
            );
            return Exit::Runtime;
        }
    };
    match runtime.block_on(serve_until_signal(config, &args)) {
        Ok(()) => Exit::Ok,
        Err(e) => {
            tracing::error!(error = %e, "control plane failed");
            let _ = writeln!(err, "switchyard-control-plane: {e}");
            Exit::Runtime
        }
    }
}

async fn serve_until_signal(config: Config, args: &Args) -> Result<(), ServeError> {
    let grpc = server::bind(args.listen).await?;
    let metrics = match args.metrics_listen {
        Some(addr) => Some(server::bind(addr).await?),
        None => None,
    };
    // Log the bound addresses (they differ from the flags for port 0).
    let listen = grpc.local_addr().unwrap_or(args.listen);
    let metrics_listen = metrics.as_ref().map_or_else(
        || "off".to_owned(),
        |l| {
            l.local_addr()
                .map_or_else(|_| "?".to_owned(), |a| a.to_string())
        },
    );
    tracing::info!(
        %listen,
        %metrics_listen,
        endpoints = config.endpoints.len(),
        version = env!("CARGO_PKG_VERSION"),
        "switchyard control plane listening"
    );
    let shutdown = CancellationToken::new();
    let signals = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            wait_for_signal().await;
            tracing::info!("shutdown signal received; stopping");
            shutdown.cancel();
        }
    });
    let result = server::run(config, grpc, metrics, shutdown).await;
    signals.abort();
    if result.is_ok() {
        tracing::info!("switchyard control plane stopped");
    }
    result
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM. If a handler cannot be
/// installed, that signal is simply not awaited. Shared by both binaries.
pub async fn wait_for_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(
            std::iter::once("switchyard-control-plane").chain(args.iter().copied()),
        )
    }

    #[test]
    fn an_unwritable_state_file_is_a_warning_of_the_check_and_an_error_at_start() {
        let config = Config::from_yaml(
            "endpoints: [\"http://127.0.0.1:9\"]\nstate_file: /nonexistent-dir/state.json\n",
            &|_| None,
        )
        .unwrap();
        let mut warnings = Vec::new();
        let report = check_report(&config, &mut warnings).unwrap();
        assert!(report.starts_with("config ok"), "{report}");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("cannot be written there"),
            "{warnings:?}"
        );
        let e = crate::control_plane::ControlPlane::with_state_file(std::sync::Arc::new(config))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent-dir/state.json"), "{e}");
    }

    #[test]
    fn parses_typed_flags_with_defaults() {
        let a = parse(&["--config", "/etc/s.yaml"]).unwrap();
        assert_eq!(a.config, PathBuf::from("/etc/s.yaml"));
        assert_eq!(a.listen, DEFAULT_LISTEN.parse::<SocketAddr>().unwrap());
        assert_eq!(a.metrics_listen, None);
        assert!(!a.check_config);
        assert_eq!(a.log_format, LogFormat::Text);

        let a = parse(&[
            "--config",
            "c.yaml",
            "--listen",
            "0.0.0.0:6000",
            "--metrics-listen",
            "[::1]:9100",
            "--check-config",
            "--log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(a.listen.port(), 6000);
        assert_eq!(a.metrics_listen.unwrap().port(), 9100);
        assert!(a.check_config);
        assert_eq!(a.log_format, LogFormat::Json);
    }

    #[test]
    fn rejects_bad_usage() {
        assert!(parse(&[]).is_err(), "--config is required");
        let e = parse(&["--config", "c", "--listen", "localhost"]).unwrap_err();
        assert!(e.to_string().contains("--listen"), "{e}");
        assert!(parse(&["--config", "c", "--log-format", "xml"]).is_err());
        assert!(parse(&["--config", "c", "--bogus"]).is_err());
    }

    #[test]
    fn help_documents_flags_and_env_vars() {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let exit = run_cli(["switchyard-control-plane", "--help"], &mut out, &mut err);
        assert_eq!(exit, Exit::Ok);
        let help = String::from_utf8(out).unwrap();
        for needle in [
            "--config",
            "--listen",
            "--metrics-listen",
            "--check-config",
            "--log-format",
            "SWITCHYARD_CONFIG",
            "SWITCHYARD_LISTEN",
            "SWITCHYARD_METRICS_LISTEN",
            "SWITCHYARD_LOG_FORMAT",
            "--otlp-endpoint",
            "SWITCHYARD_OTLP_ENDPOINT",
            "127.0.0.1:50051",
        ] {
            assert!(help.contains(needle), "{needle} missing from:\n{help}");
        }
    }

    fn write_config(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn run(args: &[&str]) -> (Exit, String, String) {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let exit = run_cli(
            std::iter::once("switchyard-control-plane").chain(args.iter().copied()),
            &mut out,
            &mut err,
        );
        (
            exit,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[test]
    fn check_config_prints_a_summary_without_secrets() {
        let f = write_config(
            "endpoints:\n  - http://10.0.0.5:11434\n  - https://api.example.com/v1\n\
             llama_server_endpoints: [\"http://10.0.0.6:8080\"]\n\
             api_keys:\n  \"https://api.example.com/v1\": sk-very-secret\n\
             router_api_key: router-secret\n\
             endpoint_config:\n  \"http://10.0.0.6:8080\":\n    draining: true\n",
        );
        let (exit, out, err) = run(&["--config", f.path().to_str().unwrap(), "--check-config"]);
        assert_eq!(exit, Exit::Ok, "{err}");
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(out.contains("3 endpoints"), "{out}");
        assert!(
            out.contains("http://10.0.0.5:11434 (ollama, max 1 per model)"),
            "{out}"
        );
        assert!(
            out.contains("(llama_server, max 1 per model, draining)"),
            "{out}"
        );
        assert!(
            out.contains("https://api.example.com/v1 (openai, max 1 per model, api key)"),
            "{out}"
        );
        assert!(out.contains("(llama_server"), "{out}");
        assert!(
            !out.contains("sk-very-secret") && !out.contains("router-secret"),
            "{out}"
        );
    }

    #[test]
    fn check_config_reads_the_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.json");
        let f = write_config(&format!(
            "endpoints: [\"http://a:1\"]\nstate_file: {}\n",
            state.display()
        ));
        let path = f.path().to_str().unwrap();
        let (exit, out, err) = run(&["--config", path, "--check-config"]);
        assert_eq!(exit, Exit::Ok, "{err}");
        assert!(out.contains("(0 now: none)"), "{out}");
        std::fs::write(&state, "{\"version\": 1, \"drained\": [\"http://a:1\"]}").unwrap();
        let (exit, out, _) = run(&["--config", path, "--check-config"]);
        assert_eq!(exit, Exit::Ok);
        assert!(out.contains("(1 now: http://a:1)"), "{out}");
        std::fs::write(&state, "not json").unwrap();
        let (exit, _, err) = run(&["--config", path, "--check-config"]);
        assert_eq!(exit, Exit::Usage);
        assert!(
            err.contains("state.json") && err.contains("fix or delete it"),
            "{err}"
        );
    }

    #[test]
    fn bad_config_exits_2_naming_key_and_value() {
        let f = write_config("endpoints: [\"http://a:1\"]\nprobe_interval: \"5 parsecs\"\n");
        let (exit, _, err) = run(&["--config", f.path().to_str().unwrap(), "--check-config"]);
        assert_eq!(exit, Exit::Usage);
        assert!(
            err.contains("probe_interval") && err.contains("5 parsecs"),
            "{err}"
        );

        let (exit, _, err) = run(&["--config", "/nonexistent/switchyard.yaml"]);
        assert_eq!(exit, Exit::Usage);
        assert!(err.contains("/nonexistent/switchyard.yaml"), "{err}");

        let (exit, _, err) = run(&["--listen", "nope"]);
        assert_eq!(exit, Exit::Usage);
        assert!(!err.is_empty());
    }

    #[test]
    fn address_in_use_exits_1_naming_the_address() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let f = write_config("endpoints: [\"http://127.0.0.1:9\"]\n");
        let (exit, _, err) = run(&["--config", f.path().to_str().unwrap(), "--listen", &addr]);
        assert_eq!(exit, Exit::Runtime);
        assert!(err.contains(&addr), "{err}");
    }

    #[test]
    fn otlp_endpoint_is_refused_with_exit_2_when_unusable() {
        let f = write_config("endpoints: [\"http://127.0.0.1:9\"]\n");
        let path = f.path().to_str().unwrap();
        let (exit, _, err) = run(&[
            "--config",
            path,
            "--check-config",
            "--otlp-endpoint",
            "not a url",
        ]);
        assert_eq!(exit, Exit::Usage, "{err}");
        assert!(err.contains("--otlp-endpoint"), "{err}");
        #[cfg(not(feature = "otlp"))]
        {
            let (exit, _, err) =
                run(&["--config", path, "--otlp-endpoint", "http://127.0.0.1:4318"]);
            assert_eq!(exit, Exit::Usage, "{err}");
            assert!(err.contains("built without the otlp feature"), "{err}");
        }
        #[cfg(feature = "otlp")]
        {
            let (exit, out, err) = run(&[
                "--config",
                path,
                "--check-config",
                "--otlp-endpoint",
                "http://127.0.0.1:4318",
            ]);
            assert_eq!(exit, Exit::Ok, "{err}");
            assert!(out.starts_with("config ok"), "{out}");
        }
    }
}
