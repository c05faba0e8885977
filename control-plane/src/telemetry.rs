//! Logging and tracing setup shared by the Switchyard binaries: `tracing`
//! events to stderr, as human-readable text or one JSON object per line,
//! filtered by `RUST_LOG` (default `info`); and, with the cargo feature
//! `otlp`, spans exported over OTLP/HTTP (protobuf) to `--otlp-endpoint`.
//!
//! Invariants:
//! - one global subscriber per process; a second [`init`] keeps the first;
//! - `--otlp-endpoint` on a build without the feature is a usage error
//!   ([`TelemetryError::OtlpNotBuilt`], exit 2), never silently ignored, so
//!   `--help` is the same for every build;
//! - spans still buffered for export are flushed when the [`Telemetry`]
//!   guard drops (at process exit, outside the async runtime);
//! - secrets never reach the logs through here: configuration is never
//!   logged whole, and [`Secret`](crate::config::Secret) prints as `***`.

use std::io::IsTerminal as _;

use tracing_subscriber::{EnvFilter, Layer, Registry, layer::SubscriberExt as _};

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

/// What [`init_with`] sets up.
#[derive(Clone, Debug)]
pub struct TelemetryOptions {
    /// Log line format on stderr.
    pub format: LogFormat,
    /// OTLP/HTTP collector URL (e.g. `http://127.0.0.1:4318`); spans go to
    /// `URL/v1/traces` unless the URL already ends with that path.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of exported spans (`switchyard-control-plane`,
    /// `switchyard-sidecar`).
    pub service_name: &'static str,
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `--otlp-endpoint` given to a binary built without the `otlp` feature.
    #[error(
        "--otlp-endpoint: this binary was built without the otlp feature \
         (rebuild with `cargo build --release --features \
         switchyard-sidecar/otlp,switchyard-control-plane/otlp`)"
    )]
    OtlpNotBuilt,
    /// The OTLP endpoint is not an `http://` or `https://` URL.
    #[error("--otlp-endpoint: {0:?} is not an http:// or https:// URL")]
    BadEndpoint(String),
    /// The OTLP exporter could not be built.
    #[error("--otlp-endpoint: cannot build the OTLP exporter: {0}")]
    Exporter(String),
}

/// Keeps the span exporter alive; flushes and stops it when dropped. Drop
/// it outside the async runtime (the exporter's HTTP client is blocking).
#[derive(Debug, Default)]
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider.take() {
            // Export failures were already reported by the SDK; at exit
            // there is nothing left to do about them.
            let _flushed = provider.shutdown();
        }
    }
}

/// The filter from `RUST_LOG`, or `info` when it is unset or invalid.
fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// The filter of exported spans: [`filter`] plus the sidecar's per-request
/// spans, which are debug-level so that plain logging never pays for them
/// but are what trace export is for.
#[cfg(feature = "otlp")]
fn span_filter() -> EnvFilter {
    let request_spans = "switchyard_sidecar::proxy=debug".parse();
    match request_spans {
        Ok(directive) => filter().add_directive(directive),
        Err(_) => filter(),
    }
}

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// The stderr log layer in `format`, filtered by `RUST_LOG`.
fn log_layer(format: LogFormat) -> BoxedLayer {
    // Colour codes only for a terminal: in files and log collectors they are noise.
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => layer.with_filter(filter()).boxed(),
        LogFormat::Json => layer
            .json()
            .flatten_event(true)
            .with_filter(filter())
            .boxed(),
    }
}

/// What is wrong with a set `RUST_LOG`, which [`filter`] replaces by
/// `info`: said once at start, so a typo does not silently log nothing.
fn rust_log_problem(value: Option<&str>) -> Option<String> {
    let value = value?;
    let err = EnvFilter::try_new(value).err()?;
    Some(format!(
        "{}={value:?} is not a valid filter ({err}); logging at info",
        EnvFilter::DEFAULT_ENV
    ))
}

/// Installs the global subscriber with logs only. Call once, early in
/// `main`. A second call (tests, an embedding binary that set up its own)
/// leaves the first subscriber in place.
pub fn init(format: LogFormat) {
    let subscriber = tracing_subscriber::registry().with(log_layer(format));
    install(subscriber);
}

/// Checks an `--otlp-endpoint` value before anything starts: a URL, and a
/// build that can export (otherwise [`TelemetryError::OtlpNotBuilt`]).
pub fn check_otlp_endpoint(endpoint: &str) -> Result<(), TelemetryError> {
    if !cfg!(feature = "otlp") {
        return Err(TelemetryError::OtlpNotBuilt);
    }
    traces_url(endpoint).map(drop)
}

/// Installs the global subscriber: logs, plus OTLP span export when
/// `options.otlp_endpoint` is set. Keep the returned guard until exit.
/// Nothing is installed when this fails.
pub fn init_with(options: &TelemetryOptions) -> Result<Telemetry, TelemetryError> {
    let log = log_layer(options.format);
    match &options.otlp_endpoint {
        None => {
            install(tracing_subscriber::registry().with(log));
            Ok(Telemetry::default())
        }
        Some(endpoint) => {
            check_otlp_endpoint(endpoint)?;
            init_otlp(log, endpoint, options.service_name)
        }
    }
}

#[cfg(feature = "otlp")]
fn init_otlp(
    log: BoxedLayer,
    endpoint: &str,
    service_name: &'static str,
) -> Result<Telemetry, TelemetryError> {
    let (export, provider) = otlp::layer(&traces_url(endpoint)?, service_name)?;
    install(tracing_subscriber::registry().with(vec![log, export]));
    Ok(Telemetry {
        provider: Some(provider),
    })
}

#[cfg(not(feature = "otlp"))]
fn init_otlp(
    _log: BoxedLayer,
    _endpoint: &str,
    _service_name: &'static str,
) -> Result<Telemetry, TelemetryError> {
    Err(TelemetryError::OtlpNotBuilt)
}

fn install<S>(subscriber: S)
where
    S: tracing::Subscriber + Send + Sync + 'static,
{
    // `set_global_default` fails only when a global subscriber is already
    // set; keeping that one is the right outcome, so the error carries
    // nothing to act on.
    if tracing::subscriber::set_global_default(subscriber).is_ok()
        && let Some(problem) =
            rust_log_problem(std::env::var(EnvFilter::DEFAULT_ENV).ok().as_deref())
    {
        tracing::warn!("{problem}");
    }
}

/// The URL spans are POSTed to: `endpoint` + `/v1/traces` (the OTLP/HTTP
/// signal path), unless `endpoint` already ends with it.
pub fn traces_url(endpoint: &str) -> Result<String, TelemetryError> {
    let trimmed = endpoint.trim().trim_end_matches('/');
    let has_host = trimmed
        .strip_prefix("http://")
        .or_else(|| trimmed.strip_prefix("https://"))
        .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'));
    if !has_host {
        return Err(TelemetryError::BadEndpoint(endpoint.to_owned()));
    }
    Ok(if trimmed.ends_with("/v1/traces") {
        trimmed.to_owned()
    } else {
        format!("{trimmed}/v1/traces")
    })
}

/// The OTLP pieces (feature `otlp`).
#[cfg(feature = "otlp")]
pub mod otlp {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;
    use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
    use tracing_subscriber::{Layer, Registry};

    use super::{BoxedLayer, TelemetryError, span_filter};

    /// How long one export request may take.
    const EXPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

    /// A tracer provider exporting spans to `traces_url` in batches (on the
    /// SDK's own thread, with a blocking HTTP client: no async runtime
    /// needed), with `service.name` = `service_name`.
    pub fn provider(
        traces_url: &str,
        service_name: &'static str,
    ) -> Result<SdkTracerProvider, TelemetryError> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(traces_url)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        let resource = Resource::builder().with_service_name(service_name).build();
        Ok(SdkTracerProvider::builder()
            .with_resource(resource)
            .with_batch_exporter(exporter)
            .build())
    }

    /// The `tracing` layer sending spans to a new [`provider`], filtered by
    /// `RUST_LOG` like the logs plus the sidecar's request spans
    /// ([`span_filter`]); keep the provider to flush it at exit.
    pub fn layer(
        traces_url: &str,
        service_name: &'static str,
    ) -> Result<(BoxedLayer, SdkTracerProvider), TelemetryError> {
        let provider = provider(traces_url, service_name)?;
        let tracer = provider.tracer(service_name);
        let layer = tracing_opentelemetry::layer::<Registry>()
            .with_tracer(tracer)
            .with_filter(span_filter())
            .boxed();
        Ok((layer, provider))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn init_twice_is_harmless() {
        init(LogFormat::Json);
        init(LogFormat::Text);
        tracing::info!("still logging");
    }

    #[test]
    fn an_invalid_rust_log_is_named() {
        assert_eq!(rust_log_problem(None), None);
        assert_eq!(rust_log_problem(Some("debug")), None);
        assert_eq!(
            rust_log_problem(Some("warn,switchyard_sidecar=debug")),
            None
        );
        let problem = rust_log_problem(Some("foo=bar=baz")).unwrap();
        assert!(
            problem.starts_with("RUST_LOG=\"foo=bar=baz\" is not a valid filter")
                && problem.ends_with("logging at info"),
            "{problem}"
        );
    }

    #[test]
    fn traces_url_appends_the_signal_path_once() {
        assert_eq!(
            traces_url("http://c:4318").unwrap(),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://c:4318/").unwrap(),
            "https://c:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://c:4318/v1/traces").unwrap(),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://c/otlp").unwrap(),
            "http://c/otlp/v1/traces"
        );
        for bad in ["c:4318", "http://", "ftp://c", ""] {
            assert!(
                matches!(traces_url(bad), Err(TelemetryError::BadEndpoint(_))),
                "{bad}"
            );
        }
    }

    #[cfg(not(feature = "otlp"))]
    #[test]
    fn an_otlp_endpoint_without_the_feature_is_refused() {
        let err = init_with(&TelemetryOptions {
            format: LogFormat::Text,
            otlp_endpoint: Some("http://127.0.0.1:4318".into()),
            service_name: "switchyard-control-plane",
        })
        .unwrap_err();
        assert!(matches!(err, TelemetryError::OtlpNotBuilt));
        assert!(matches!(
            check_otlp_endpoint("http://127.0.0.1:4318"),
            Err(TelemetryError::OtlpNotBuilt)
        ));
        assert!(err.to_string().contains("built without the otlp feature"));
        // Without an endpoint there is nothing to refuse.
        assert!(
            init_with(&TelemetryOptions {
                format: LogFormat::Text,
                otlp_endpoint: None,
                service_name: "switchyard-control-plane",
            })
            .is_ok()
        );
    }

    /// Spans reach an OTLP/HTTP collector: a tiny listener records what is
    /// POSTed to `/v1/traces`.
    #[cfg(feature = "otlp")]
    mod otlp_export {
        #![allow(clippy::unwrap_used, clippy::expect_used)]

        use std::sync::Arc;

        use axum::{Router, body::Bytes, extract::State, http::HeaderMap, routing::post};
        use parking_lot::Mutex;
        use tracing_subscriber::layer::SubscriberExt as _;

        use super::super::*;

        /// `(content-type, body)` of each export request.
        type Seen = Arc<Mutex<Vec<(String, Bytes)>>>;

        async fn collect(
            State(seen): State<Seen>,
            headers: HeaderMap,
            body: Bytes,
        ) -> &'static str {
            let content_type = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            seen.lock().push((content_type, body));
            ""
        }

        fn contains(haystack: &[u8], needle: &str) -> bool {
            haystack
                .windows(needle.len())
                .any(|w| w == needle.as_bytes())
        }

        #[test]
        fn a_request_span_is_exported_with_the_service_name() {
            // The collector runs on its own runtime: the exporter's
            // blocking client must not run inside one.
            let seen: Seen = Arc::default();
            let runtime = tokio::runtime::Runtime::new().unwrap();
            let listener = runtime
                .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .unwrap();
            let addr = listener.local_addr().unwrap();
            let app = Router::new()
                .route("/v1/traces", post(collect))
                .with_state(seen.clone());
            runtime.spawn(async move { axum::serve(listener, app).await });

            let url = traces_url(&format!("http://{addr}")).unwrap();
            let (layer, provider) = otlp::layer(&url, "switchyard-control-plane").unwrap();
            let subscriber = tracing_subscriber::registry().with(layer);
            tracing::subscriber::with_default(subscriber, || {
                let span = tracing::info_span!(
                    "request",
                    route = "/api/chat",
                    endpoint = tracing::field::Empty
                );
                span.record("endpoint", "http://backend-under-test:11434");
                span.in_scope(|| tracing::info!("routed"));
            });
            // Export what the batch holds now (blocks until sent).
            provider.force_flush().unwrap();

            let exports = seen.lock().clone();
            assert!(!exports.is_empty(), "no export request arrived");
            let (content_type, body) = &exports[0];
            assert_eq!(content_type, "application/x-protobuf");
            for needle in [
                "switchyard-control-plane",
                "request",
                "http://backend-under-test:11434",
            ] {
                assert!(contains(body, needle), "{needle:?} not in the export");
            }
            provider.shutdown().unwrap();
        }
    }
}
