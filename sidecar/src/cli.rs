//! Command line of `switchyard-sidecar` (fixed by DESIGN.md):
//!
//! ```text
//! switchyard-sidecar --control-plane URL [--listen ADDR] [--config FILE]
//! switchyard-sidecar --standalone [--config FILE] [--listen ADDR]
//! ```
//!
//! plus `--log-format text|json`, `--otlp-endpoint URL` (span export,
//! only in builds with the cargo feature `otlp`; otherwise exit 2) and,
//! standalone, `--control-plane-listen ADDR` (the embedded control plane's
//! gRPC API, for the `switchyard` CLI).
//!
//! Every flag also reads an environment variable. Without
//! `--control-plane` the sidecar runs standalone (the single-machine
//! default); standalone without `--config` routes to one local Ollama at
//! `http://127.0.0.1:11434`.
//!
//! Exit codes: 0 after a clean shutdown (SIGTERM / Ctrl-C), 2 for bad usage
//! or a bad configuration (the message names the problem), 1 for a runtime
//! failure (cannot listen, server error).

use std::{ffi::OsString, io::Write, net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, builder::BoolishValueParser};
use switchyard_control_plane::{
    cli::{check_report, config_summary},
    config::Config,
    telemetry::{self, LogFormat, TelemetryOptions},
};

use crate::server::{Mode, StartError, StartOptions, default_name, start};

/// Default listen address (one port above Ollama's 11434 decade, so both
/// can run on one host).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:12434";

/// Ollama- and OpenAI-API proxy that routes each request to a model server
/// chosen by the Switchyard control plane.
#[derive(Debug, Parser)]
#[command(
    name = "switchyard-sidecar",
    version,
    after_help = "Modes:\n  \
        switchyard-sidecar --control-plane http://cp:50051 [--config FILE]\n      \
        route through a shared control plane (the config, if given, supplies\n      \
        backend API keys, the router key and sidecar settings, and the\n      \
        endpoints this sidecar probes and routes on itself if it starts\n      \
        while the control plane is unreachable, or loses it for longer\n      \
        than session_ttl)\n  \
        switchyard-sidecar --standalone [--config FILE]\n      \
        single machine: control plane embedded; without --config, one local\n      \
        Ollama at http://127.0.0.1:11434; with --control-plane-listen ADDR the\n      \
        switchyard CLI inspects and drains it (switchyard --control-plane http://ADDR)\n\n\
        Without --control-plane the sidecar runs standalone.\n\n\
        HTTP routes: Ollama /api/chat /api/generate /api/embed /api/embeddings /api/show\n\
        /api/tags /api/ps /api/version, OpenAI /v1/chat/completions /v1/completions\n\
        /v1/embeddings /v1/responses /v1/models /v1/models/{id}, Anthropic /v1/messages\n\
        /v1/messages/count_tokens, reranking /v1/rerank /rerank, plus GET / (liveness),\n\
        /health, /metrics, and /api/usage /api/usage-stream (in-flight and token counts, nomyo-router's shape).\n\
        Stored responses, asked of every endpoint, answered by the one holding the id:\n\
        GET/DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items,\n\
        POST /v1/responses/{id}/cancel.\n\
        Model management fanned out to the Ollama endpoints: POST /api/pull /api/push\n\
        /api/create /api/copy, DELETE /api/delete, HEAD/POST /api/blobs/{digest}.\n\n\
        Exit codes: 0 clean shutdown, 2 bad usage or configuration, 1 runtime failure."
)]
pub struct Args {
    /// Embed the control plane in this process (single machine).
    #[arg(
        long,
        env = "SWITCHYARD_STANDALONE",
        value_parser = BoolishValueParser::new(),
        conflicts_with = "control_plane"
    )]
    pub standalone: bool,

    /// gRPC URL of the control plane, e.g. http://127.0.0.1:50051.
    #[arg(long, env = "SWITCHYARD_CONTROL_PLANE", value_name = "URL", value_parser = parse_url)]
    pub control_plane: Option<String>,

    /// Configuration file (nomyo-router compatible YAML).
    #[arg(long, env = "SWITCHYARD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// HTTP listen address.
    #[arg(long, env = "SWITCHYARD_LISTEN", value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Standalone: also serve the embedded control plane's gRPC API on
    /// this address, so the `switchyard` CLI can inspect and operate this
    /// machine (endpoints, usage, drain, ...), e.g. 127.0.0.1:50051.
    #[arg(
        long,
        env = "SWITCHYARD_CONTROL_PLANE_LISTEN",
        value_name = "ADDR",
        conflicts_with = "control_plane"
    )]
    pub control_plane_listen: Option<SocketAddr>,

    /// Session name shown by the control plane [default: host name].
    #[arg(long, env = "SWITCHYARD_NAME", value_name = "NAME")]
    pub name: Option<String>,

    /// Log format (RUST_LOG sets the filter, default info).
    #[arg(long, env = "SWITCHYARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Validate the configuration, print a summary and exit (0 valid, 2
    /// invalid); warnings go to stderr.
    #[arg(long, env = "SWITCHYARD_CHECK_CONFIG", value_parser = BoolishValueParser::new())]
    pub check_config: bool,

    /// Export tracing spans over OTLP/HTTP to this collector URL (e.g.
    /// http://127.0.0.1:4318; spans go to URL/v1/traces). Needs a build with
    /// the `otlp` cargo feature; otherwise the flag exits 2.
    #[arg(long, env = "SWITCHYARD_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

fn parse_url(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.get(..8)
        .is_some_and(|p| p.eq_ignore_ascii_case("https://"))
    {
        // Refused rather than connected to in plaintext: whoever writes
        // https:// expects the link to be encrypted.
        return Err(format!(
            "{s:?}: {}",
            switchyard_control_plane::grpc::HTTPS_UNSUPPORTED
        ));
    }
    let rest = s
        .strip_prefix("http://")
        .ok_or_else(|| format!("{s:?} must start with http://"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("{s:?} has no host"));
    }
    Ok(s.trim_end_matches('/').to_owned())
}

/// What the arguments ask for, validated.
#[derive(Debug)]
pub struct Plan {
    /// Start options.
    pub options: StartOptions,
    /// Log format.
    pub log_format: LogFormat,
    /// Only validate the configuration.
    pub check_only: bool,
    /// OTLP/HTTP collector URL for span export (checked: a URL, and a
    /// build with the `otlp` feature).
    pub otlp_endpoint: Option<String>,
}

/// A usage or configuration problem (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(String);

impl Args {
    /// Loads the configuration and decides the mode.
    pub fn plan(self) -> Result<Plan, UsageError> {
        if let Some(Err(e)) = self
            .otlp_endpoint
            .as_deref()
            .map(telemetry::check_otlp_endpoint)
        {
            return Err(UsageError(e.to_string()));
        }
        let config = match &self.config {
            Some(path) => Some(Config::load(path).map_err(|e| UsageError(e.to_string()))?),
            None => None,
        };
        let mode = match self.control_plane {
            Some(url) => Mode::Remote {
                control_plane_url: url,
                config,
            },
            None => {
                let config = match config {
                    Some(c) => c,
                    None => Config::local_ollama().map_err(|e| UsageError(e.to_string()))?,
                };
                if config.endpoints.is_empty() {
                    return Err(UsageError(
                        "standalone mode needs at least one endpoint: the config lists none \
                         (keys `endpoints` / `llama_server_endpoints`)"
                            .into(),
                    ));
                }
                Mode::Standalone {
                    config,
                    control_plane_listen: self.control_plane_listen,
                }
            }
        };
        Ok(Plan {
            options: StartOptions {
                mode,
                listen: self.listen,
                name: self.name.unwrap_or_else(default_name),
            },
            log_format: self.log_format,
            check_only: self.check_config,
            otlp_endpoint: self.otlp_endpoint,
        })
    }
}

/// Exit code: clean shutdown.
pub const EXIT_OK: u8 = 0;
/// Exit code: runtime failure.
pub const EXIT_RUNTIME: u8 = 1;
/// Exit code: bad usage or bad configuration.
pub const EXIT_USAGE: u8 = 2;

/// Runs the sidecar binary: parse, start, serve until SIGTERM/Ctrl-C,
/// shut down gracefully. Returns the process exit code.
pub fn run_cli(
    args: impl IntoIterator<Item = OsString>,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> ExitCode {
    ExitCode::from(run_cli_code(args, stdout, stderr))
}

/// [`run_cli`] returning the exit code as a number.
pub fn run_cli_code(
    args: impl IntoIterator<Item = OsString>,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> u8 {
    let args: Vec<OsString> = args.into_iter().collect();
    let typed_control_plane = args
        .iter()
        .skip(1)
        .any(|a| a == "--control-plane" || a.to_string_lossy().starts_with("--control-plane="));
    let args = match Args::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
            let mut text = e.render().to_string();
            // The CLI reads the same variable: exported for it, it turns a
            // standalone start into a conflict nobody typed.
            if e.kind() == clap::error::ErrorKind::ArgumentConflict
                && !typed_control_plane
                && std::env::var_os("SWITCHYARD_CONTROL_PLANE").is_some()
            {
                text.push_str(
                    "\nnote: --control-plane is set by the environment variable \
                     SWITCHYARD_CONTROL_PLANE (unset it to run standalone)\n",
                );
            }
            let _ = if code == 0 {
                stdout.write_all(text.as_bytes())
            } else {
                stderr.write_all(text.as_bytes())
            };
            return code;
        }
    };
    let plan = match args.plan() {
        Ok(p) => p,
        Err(e) => {
            let _ = writeln!(stderr, "switchyard-sidecar: {e}");
            return EXIT_USAGE;
        }
    };
    if plan.check_only {
        return check_config(&plan.options.mode, stdout, stderr);
    }
    // Dropped after the runtime (declared before it): flushes spans
    // still waiting for export.
    let _telemetry = match telemetry::init_with(&TelemetryOptions {
        format: plan.log_format,
        otlp_endpoint: plan.otlp_endpoint.clone(),
        service_name: "switchyard-sidecar",
    }) {
        Ok(t) => t,
        Err(e) => {
            let _ = writeln!(stderr, "switchyard-sidecar: {e}");
            return EXIT_USAGE;
        }
    };
    match plan.options.mode.config() {
        Some(config) => config.log_warnings(),
        None => tracing::warn!("{NO_CONFIG}"),
    }
    // This runtime accepts connections and runs the background tasks
    // (discovery, the control-plane session, metrics); requests are served
    // on one runtime per core that `start` adds (see `server`).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(
                stderr,
                "switchyard-sidecar: cannot start the async runtime: {e}"
            );
            return EXIT_RUNTIME;
        }
    };
    match runtime.block_on(serve_until_signal(plan.options)) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            tracing::error!(error = %e, "sidecar failed");
            let _ = writeln!(stderr, "switchyard-sidecar: {e}");
            EXIT_RUNTIME
        }
    }
}

/// What a remote sidecar started without `--config` goes without: the
/// keys never cross the gRPC wire, so they come from its own config only.
const NO_CONFIG: &str = "no --config: this sidecar checks no router API key (every client is \
     served), sends no backend API keys, and cannot probe the endpoints itself while the \
     control plane is unreachable; give it the cluster's config file";

/// `--check-config`: the configuration's warnings on stderr, then what the
/// control plane's `--check-config` reports (with the drains saved in
/// `state_file`, which a standalone sidecar reads at start: a file it could
/// not start with fails the check).
fn check_config(mode: &Mode, stdout: &mut dyn Write, stderr: &mut dyn Write) -> u8 {
    let Some(config) = mode.config() else {
        let _ = writeln!(stderr, "switchyard-sidecar: warning: {NO_CONFIG}");
        let _ = writeln!(
            stdout,
            "config ok: no --config (the control plane supplies the endpoints)"
        );
        return EXIT_OK;
    };
    for warning in &config.warnings {
        let _ = writeln!(stderr, "switchyard-sidecar: warning: {warning}");
    }
    let mut warnings = Vec::new();
    let report = match mode {
        Mode::Standalone { .. } => check_report(config, &mut warnings),
        Mode::Remote { .. } => Ok(config_summary(config)),
    };
    for warning in &warnings {
        let _ = writeln!(stderr, "switchyard-sidecar: warning: {warning}");
    }
    match report {
        Ok(report) => {
            let _ = writeln!(stdout, "{report}");
            EXIT_OK
        }
        Err(e) => {
            let _ = writeln!(stderr, "switchyard-sidecar: {e}");
            EXIT_USAGE
        }
    }
}

async fn serve_until_signal(options: StartOptions) -> Result<(), StartError> {
    let handle = start(options).await?;
    let trigger = handle.shutdown_trigger();
    tokio::select! {
        () = switchyard_control_plane::cli::wait_for_signal() => {
            tracing::info!("shutdown signal received");
            handle.shutdown().await;
        }
        // The server stopped on its own (it failed; the error is logged).
        () = trigger.cancelled() => handle.wait().await,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::io::Write as _;

    use super::*;

    /// A config file in the temp dir, removed on drop.
    struct TempConfig(PathBuf);

    impl TempConfig {
        fn new(name: &str, text: &str) -> Self {
            let path = std::env::temp_dir().join(format!(
                "switchyard-sidecar-cli-{}-{name}.yaml",
                std::process::id()
            ));
            let mut f = std::fs::File::create(&path).unwrap();
            f.write_all(text.as_bytes()).unwrap();
            Self(path)
        }

        fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for TempConfig {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("switchyard-sidecar").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_to_standalone_local_ollama() {
        let plan = parse(&[]).unwrap().plan().unwrap();
        assert_eq!(plan.options.listen.to_string(), DEFAULT_LISTEN);
        match plan.options.mode {
            Mode::Standalone { config, .. } => {
                assert_eq!(&*config.endpoints[0].url, "http://127.0.0.1:11434");
            }
            Mode::Remote { .. } => panic!("expected standalone"),
        }
    }

    #[test]
    fn a_remote_sidecar_without_config_is_told_what_it_goes_without() {
        let plan = parse(&["--control-plane", "http://cp:50051"])
            .unwrap()
            .plan()
            .unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert_eq!(
            check_config(&plan.options.mode, &mut out, &mut err),
            EXIT_OK
        );
        let err = String::from_utf8(err).unwrap();
        assert!(
            err.contains("warning: no --config") && err.contains("no router API key"),
            "{err}"
        );
        assert!(String::from_utf8(out).unwrap().starts_with("config ok"));
    }

    #[test]
    fn remote_mode_and_url_validation() {
        let plan = parse(&[
            "--control-plane",
            "http://cp:50051/",
            "--listen",
            "0.0.0.0:9000",
        ])
        .unwrap()
        .plan()
        .unwrap();
        match plan.options.mode {
            Mode::Remote {
                control_plane_url,
                config,
            } => {
                assert_eq!(control_plane_url, "http://cp:50051");
                assert!(config.is_none());
            }
            Mode::Standalone { .. } => panic!("expected remote"),
        }
        assert!(parse(&["--control-plane", "cp:50051"]).is_err());
        // Refused, not connected to in plaintext.
        let e = parse(&["--control-plane", "https://cp:443"]).unwrap_err();
        assert!(e.to_string().contains("https:// is not supported"), "{e}");
        assert!(parse(&["--standalone", "--control-plane", "http://cp:1"]).is_err());
        // The embedded control plane's gRPC API is for standalone only.
        assert!(
            parse(&[
                "--control-plane",
                "http://cp:1",
                "--control-plane-listen",
                "127.0.0.1:50051"
            ])
            .is_err()
        );
        let plan = parse(&["--control-plane-listen", "127.0.0.1:50051"])
            .unwrap()
            .plan()
            .unwrap();
        assert!(matches!(
            plan.options.mode,
            Mode::Standalone {
                control_plane_listen: Some(a),
                ..
            } if a.to_string() == "127.0.0.1:50051"
        ));
        assert!(parse(&["--listen", "nope"]).is_err());
    }

    #[test]
    fn config_file_errors_name_the_problem() {
        let f = TempConfig::new("typo", "endpoints: [\"http://a:1\"]\nprobe_intervall: 3\n");
        let err = parse(&["--standalone", "--config", f.path()])
            .unwrap()
            .plan()
            .unwrap_err();
        assert!(err.to_string().contains("probe_intervall"), "{err}");
        let err = parse(&["--config", "/nonexistent/switchyard.yaml"])
            .unwrap()
            .plan()
            .unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/switchyard.yaml"),
            "{err}"
        );

        let empty = TempConfig::new("empty", "endpoints: []\n");
        let err = parse(&["--config", empty.path()])
            .unwrap()
            .plan()
            .unwrap_err();
        assert!(err.to_string().contains("endpoints"), "{err}");
    }

    #[test]
    fn exit_codes() {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let code = run_cli_code(
            ["switchyard-sidecar", "--bogus"].map(OsString::from),
            &mut out,
            &mut err,
        );
        assert_eq!(code, EXIT_USAGE);
        assert!(String::from_utf8_lossy(&err).contains("--bogus"));

        let mut out = Vec::new();
        let code = run_cli_code(
            ["switchyard-sidecar", "--help"].map(OsString::from),
            &mut out,
            &mut err,
        );
        assert_eq!(code, EXIT_OK);
        let help = String::from_utf8_lossy(&out);
        for needle in [
            "--control-plane",
            "--standalone",
            "--listen",
            "SWITCHYARD_LISTEN",
            "SWITCHYARD_CONFIG",
            "--otlp-endpoint",
            "SWITCHYARD_OTLP_ENDPOINT",
            "Exit codes",
        ] {
            assert!(help.contains(needle), "help lacks {needle}:\n{help}");
        }

        let mut out = Vec::new();
        let code = run_cli_code(
            ["switchyard-sidecar", "--check-config"].map(OsString::from),
            &mut out,
            &mut err,
        );
        assert_eq!(code, EXIT_OK);
        let code = run_cli_code(
            ["switchyard-sidecar", "--config", "/nonexistent/x.yaml"].map(OsString::from),
            &mut out,
            &mut err,
        );
        assert_eq!(code, EXIT_USAGE);
    }

    /// `run_cli_code` with `args`: (exit code, stdout, stderr).
    fn run(args: &[&str]) -> (u8, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run_cli_code(
            std::iter::once("switchyard-sidecar")
                .chain(args.iter().copied())
                .map(OsString::from),
            &mut out,
            &mut err,
        );
        (
            code,
            String::from_utf8_lossy(&out).into_owned(),
            String::from_utf8_lossy(&err).into_owned(),
        )
    }

    /// A standalone sidecar starts with the drains saved in `state_file`,
    /// so its `--check-config` reads the file: one it could not start with
    /// fails the check. Warnings go to stderr and do not fail it.
    #[test]
    fn check_config_reads_the_state_file_and_prints_warnings() {
        let state = std::env::temp_dir().join(format!(
            "switchyard-sidecar-cli-{}-state.json",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&state);
        let config = TempConfig::new(
            "state-file",
            &format!(
                "endpoints: [\"http://a:1\"]\nstate_file: {}\n\
                 api_keys:\n  \"http://elsewhere:1\": k\n",
                state.display()
            ),
        );
        let (code, out, err) = run(&["--config", config.path(), "--check-config"]);
        assert_eq!(code, EXIT_OK, "{err}");
        assert!(
            out.contains("http://a:1") && out.contains("(0 now: none)"),
            "{out}"
        );
        assert!(
            err.contains("warning: api_keys.http://elsewhere:1: not a configured endpoint"),
            "{err}"
        );
        std::fs::write(&state, "not json").unwrap();
        let (code, _, err) = run(&["--config", config.path(), "--check-config"]);
        assert_eq!(code, EXIT_USAGE);
        assert!(
            err.contains("state.json") && err.contains("fix or delete it"),
            "{err}"
        );
        // A remote sidecar never reads the file.
        let (code, out, err) = run(&[
            "--control-plane",
            "http://cp:1",
            "--config",
            config.path(),
            "--check-config",
        ]);
        assert_eq!(code, EXIT_OK, "{err}");
        assert!(!out.contains("drains saved"), "{out}");
        let _ = std::fs::remove_file(&state);
    }

    #[test]
    fn otlp_endpoint_is_refused_with_exit_2_when_unusable() {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let code = run_cli_code(
            [
                "switchyard-sidecar",
                "--check-config",
                "--otlp-endpoint",
                "not a url",
            ]
            .map(OsString::from),
            &mut out,
            &mut err,
        );
        assert_eq!(code, EXIT_USAGE);
        assert!(String::from_utf8_lossy(&err).contains("--otlp-endpoint"));

        let mut err = Vec::new();
        let code = run_cli_code(
            [
                "switchyard-sidecar",
                "--check-config",
                "--otlp-endpoint",
                "http://127.0.0.1:4318",
            ]
            .map(OsString::from),
            &mut out,
            &mut err,
        );
        let err = String::from_utf8_lossy(&err);
        if cfg!(feature = "otlp") {
            assert_eq!(code, EXIT_OK, "{err}");
        } else {
            assert_eq!(code, EXIT_USAGE);
            assert!(err.contains("built without the otlp feature"), "{err}");
        }
    }
}
