//! Discovery: background probes that find which models each endpoint
//! advertises and which it has loaded, and whether it answers at all.
//!
//! One task per endpoint probes immediately at start and then every
//! `probe.interval`, spread by ±`probe.jitter` so a fleet of endpoints is not
//! probed in lock-step, or at once when asked through [`ProbeRounds`]
//! (after a model was pulled or deleted through a sidecar). Each round ends in exactly one
//! [`ProbeReport`] handed to a [`ProbeSink`] (the [`ControlPlane`]).
//! A choice never waits on a probe: it reads the last report's snapshot.
//!
//! What is probed, by kind (see `shared/reference/nomyo-routing.md`):
//! - Ollama: `GET {url}/api/tags` (advertised) and `GET {url}/api/ps`
//!   (loaded), and `GET {url}/api/version` (the server version), all three
//!   concurrently; the version call never fails the round (see
//!   [`Prober::version`]);
//! - OpenAI-compatible: `GET {base}/models` with the endpoint's API key as
//!   `Authorization: Bearer` (every probe sends the key, else the URL's
//!   `user:pass@` as Basic: [`authorization`]); nothing is reported loaded (as nomyo-router
//!   does), so these endpoints are chosen by free slot, not by "loaded";
//! - llama-server: `GET {base}/models`, loaded decided by each item's status.
//!
//! Each report carries the endpoint's listing items as the backend sent
//! them ([`ModelItems`]: Ollama's `/api/tags` and `/api/ps` items, the
//! others' `{base}/models` items) for the sidecar's merged listings.
//!
//! Invariants: all probes share one pooled HTTP client; every probe is bounded
//! by `probe.timeout` and by a body-size cap; failure details never carry the
//! API key or URL credentials; tasks are owned by the caller's
//! [`TaskTracker`] and stop when the [`CancellationToken`] fires.
//!
//! [`ControlPlane`]: crate::control_plane::ControlPlane

pub mod listing;
pub mod rounds;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use rand::Rng;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    api::{ModelItems, ProbeReport},
    config::{Config, EndpointConfig, ProbeConfig, Secret},
    endpoint::{EndpointKind, authorization, openai_base, without_credentials},
};

pub use rounds::ProbeRounds;

/// Largest listing body accepted (a big Ollama host lists a few hundred
/// models in well under 1 MiB).
const MAX_LISTING_BYTES: usize = 8 * 1024 * 1024;

/// Longest server version kept (Ollama's are like `0.12.3` or
/// `0.6.0-rc1`); a longer one is not a version and is ignored, so that
/// nothing large rides in every published state.
const MAX_VERSION_LEN: usize = 64;

/// Receives probe results. Implemented by the control plane; tests use their
/// own sinks.
pub trait ProbeSink: Send + Sync + 'static {
    /// Records the result of one probe round of endpoint `endpoint` (its
    /// position in `config.endpoints`).
    fn apply_probe(&self, endpoint: usize, report: ProbeReport, now: Instant);

    /// Records the server version endpoint `endpoint` reported in a probe
    /// round ([`Prober::version`]); called before that round's
    /// [`ProbeSink::apply_probe`], and only when the version call succeeded.
    fn apply_version(&self, endpoint: usize, version: &str);
}

impl ProbeSink for crate::control_plane::ControlPlane {
    fn apply_probe(&self, endpoint: usize, report: ProbeReport, now: Instant) {
        crate::control_plane::ControlPlane::apply_probe(self, endpoint, report, now);
    }

    fn apply_version(&self, endpoint: usize, version: &str) {
        crate::control_plane::ControlPlane::apply_version(self, endpoint, version);
    }
}

/// What an OpenAI-style or llama-server endpoint's probe found: the
/// advertised models with their `{base}/models` items, and the loaded ones.
fn openai_report(advertised: listing::OpenAiListing, loaded: Vec<String>) -> ProbeReport {
    ProbeReport::Ok {
        advertised: advertised.names,
        loaded,
        items: ModelItems {
            models: advertised.items,
            ..ModelItems::default()
        },
    }
}

/// The HTTP client for probes could not be built (TLS backend failure).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the discovery HTTP client: {0}")]
pub struct DiscoveryError(#[source] reqwest::Error);

/// Probes endpoints. Cheap to clone (the client is pooled and shared).
#[derive(Clone, Debug)]
pub struct Prober {
    client: reqwest::Client,
    timeout: Duration,
}

impl Prober {
    /// A prober with one pooled client; each probe is bounded by `timeout`.
    pub fn new(timeout: Duration) -> Result<Self, DiscoveryError> {
        let client = reqwest::Client::builder()
            .connect_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!(
                "switchyard-control-plane/",
                env!("CARGO_PKG_VERSION")
            ))
            .build()
            .map_err(DiscoveryError)?;
        Ok(Self { client, timeout })
    }

    /// One probe round for one endpoint. Never fails: problems become
    /// [`ProbeReport::Failed`].
    pub async fn probe(&self, endpoint: &EndpointConfig) -> ProbeReport {
        self.try_probe(endpoint)
            .await
            .unwrap_or_else(|detail| ProbeReport::Failed { detail })
    }

    /// One probe round with the server version: [`Prober::probe`] and
    /// [`Prober::version`] concurrently (one more small request for an
    /// Ollama endpoint, none for the others).
    pub async fn probe_with_version(
        &self,
        endpoint: &EndpointConfig,
    ) -> (ProbeReport, Option<String>) {
        tokio::join!(self.probe(endpoint), self.version(endpoint))
    }

    /// The server version an Ollama endpoint reports on `GET /api/version`
    /// (`{"version":"0.5.7"}`), trimmed, as it sent it otherwise. `None`
    /// for other kinds (they have no Ollama version; nothing is asked) and
    /// when the call fails or answers no version: an Ollama build without
    /// that route is still a healthy endpoint, so this never fails a round.
    pub async fn version(&self, endpoint: &EndpointConfig) -> Option<String> {
        if endpoint.kind != EndpointKind::Ollama {
            return None;
        }
        let url = format!("{}/api/version", endpoint.url.trim_end_matches('/'));
        let found = self
            .get(endpoint, &url, "/api/version")
            .await
            .and_then(|body| parse_version_body(&body));
        match found {
            Ok(version) => Some(version),
            Err(detail) => {
                tracing::debug!(endpoint = %without_credentials(&endpoint.url), %detail, "no server version");
                None
            }
        }
    }

    /// The probe's [`ProbeReport::Ok`], or what failed.
    async fn try_probe(&self, endpoint: &EndpointConfig) -> Result<ProbeReport, String> {
        match endpoint.kind {
            EndpointKind::Ollama => {
                let url = endpoint.url.trim_end_matches('/');
                let (tags_url, ps_url) = (format!("{url}/api/tags"), format!("{url}/api/ps"));
                let (tags, ps) = tokio::join!(
                    self.get(endpoint, &tags_url, "/api/tags"),
                    self.get(endpoint, &ps_url, "/api/ps"),
                );
                let tags = listing::parse_ollama_listing(&tags?)
                    .map_err(|e| format!("GET /api/tags: {e}"))?;
                let ps =
                    listing::parse_ollama_listing(&ps?).map_err(|e| format!("GET /api/ps: {e}"))?;
                Ok(ProbeReport::Ok {
                    advertised: tags.names,
                    loaded: ps.names,
                    items: ModelItems {
                        tags: tags.items,
                        ps: ps.items,
                        models: Vec::new(),
                    },
                })
            }
            EndpointKind::OpenAi => {
                let base = openai_base(&endpoint.url, endpoint.kind);
                let body = self
                    .get(endpoint, &format!("{base}/models"), "/models")
                    .await?;
                let advertised =
                    listing::parse_openai_models(&body).map_err(|e| format!("GET /models: {e}"))?;
                // Hosted and vLLM servers do not say what is loaded; like
                // nomyo-router, report nothing loaded.
                Ok(openai_report(advertised, Vec::new()))
            }
            EndpointKind::LlamaServer => {
                let base = openai_base(&endpoint.url, endpoint.kind);
                let body = self
                    .get(endpoint, &format!("{base}/models"), "/models")
                    .await?;
                let (advertised, loaded) = listing::parse_llama_server_models(&body)
                    .map_err(|e| format!("GET /models: {e}"))?;
                Ok(openai_report(advertised, loaded))
            }
        }
    }

    /// GET with the probe timeout, the endpoint's credentials
    /// ([`authorization`]: its bearer key, else the URL's userinfo as Basic),
    /// and a bounded body. Errors are described by `path` only (no host, no
    /// credentials).
    async fn get(
        &self,
        endpoint: &EndpointConfig,
        url: &str,
        path: &str,
    ) -> Result<Vec<u8>, String> {
        // The URL without its userinfo: reqwest would send that as Basic by
        // itself, and add a bearer key as a second `Authorization` field.
        let mut req = self
            .client
            .get(without_credentials(url).as_ref())
            .timeout(self.timeout);
        let key = endpoint.api_key.as_ref().map(Secret::expose);
        if let Some(value) = authorization(&endpoint.url, key) {
            let mut value = reqwest::header::HeaderValue::from_str(&value).map_err(|_| {
                format!("GET {path}: the API key or URL credentials are not a valid header value")
            })?;
            value.set_sensitive(true);
            req = req.header(reqwest::header::AUTHORIZATION, value);
        }
        let mut resp = req
            .send()
            .await
            .map_err(|e| format!("GET {path}: {}", describe(&e, self.timeout)))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!(
                "GET {path}: HTTP {status}{}",
                hint(endpoint, path, status)
            ));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| format!("GET {path}: {}", describe(&e, self.timeout)))?
        {
            if body.len() + chunk.len() > MAX_LISTING_BYTES {
                return Err(format!(
                    "GET {path}: listing larger than {MAX_LISTING_BYTES} bytes"
                ));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// What an operator likely got wrong when a probe's route does not exist:
/// an OpenAI-compatible server (vLLM, llama-server, a hosted API) listed
/// under `endpoints` without `/v1` in its URL is probed as an Ollama
/// server, and has no `/api/tags`.
fn hint(endpoint: &EndpointConfig, path: &str, status: reqwest::StatusCode) -> &'static str {
    if status == reqwest::StatusCode::NOT_FOUND
        && endpoint.kind == EndpointKind::Ollama
        && path == "/api/tags"
    {
        " (no Ollama API at this URL: list an OpenAI-compatible server with /v1 at the \
         end of its URL, a llama-server under llama_server_endpoints)"
    } else {
        ""
    }
}

/// The `version` of an Ollama `GET /api/version` body.
fn parse_version_body(body: &[u8]) -> Result<String, String> {
    #[derive(serde::Deserialize)]
    struct Body {
        version: String,
    }
    let body: Body = serde_json::from_slice(body).map_err(|e| format!("GET /api/version: {e}"))?;
    let version = body.version.trim();
    if version.is_empty() || version.len() > MAX_VERSION_LEN {
        return Err(format!(
            "GET /api/version: not a version ({} bytes)",
            version.len()
        ));
    }
    Ok(version.to_owned())
}

/// A short description of a request error without the URL (which could hold
/// credentials in its userinfo).
fn describe(err: &reqwest::Error, timeout: Duration) -> String {
    if err.is_timeout() {
        return format!("timed out after {timeout:?}");
    }
    let kind = if err.is_connect() {
        "connect error"
    } else if err.is_body() || err.is_decode() {
        "error reading body"
    } else {
        "request error"
    };
    // The innermost cause is the useful part ("Connection refused").
    let mut cause: &dyn std::error::Error = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    if std::ptr::addr_eq(cause, err as &dyn std::error::Error) {
        kind.to_owned()
    } else {
        format!("{kind}: {cause}")
    }
}

/// The delay before the next probe: `interval` spread by ±`jitter`.
fn next_delay(probe: &ProbeConfig, rng: &mut impl Rng) -> Duration {
    let jitter = probe.jitter.clamp(0.0, 0.5);
    if jitter == 0.0 {
        return probe.interval;
    }
    let factor = 1.0 + rng.random_range(-jitter..=jitter);
    probe.interval.mul_f64(factor)
}

/// Starts one probe task per configured endpoint on `tracker`. Each task
/// probes at once, then periodically or when asked through `rounds`, until
/// `cancel` fires.
pub fn spawn(
    config: &Config,
    sink: Arc<dyn ProbeSink>,
    rounds: Arc<ProbeRounds>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> Result<(), DiscoveryError> {
    let prober = Prober::new(config.probe.timeout)?;
    for (index, endpoint) in config.endpoints.iter().enumerate() {
        tracker.spawn(probe_loop(
            prober.clone(),
            index,
            endpoint.clone(),
            config.probe.clone(),
            Arc::clone(&sink),
            Arc::clone(&rounds),
            cancel.clone(),
        ));
    }
    Ok(())
}

async fn probe_loop(
    prober: Prober,
    index: usize,
    endpoint: EndpointConfig,
    probe: ProbeConfig,
    sink: Arc<dyn ProbeSink>,
    rounds: Arc<ProbeRounds>,
    cancel: CancellationToken,
) {
    let mut was_ok: Option<bool> = None;
    loop {
        let round = rounds.start(index);
        let (report, version) = tokio::select! {
            () = cancel.cancelled() => return,
            found = prober.probe_with_version(&endpoint) => found,
        };
        let ok = matches!(report, ProbeReport::Ok { .. });
        // Log transitions only: a steady state is visible in metrics.
        if was_ok != Some(ok) {
            match &report {
                ProbeReport::Ok {
                    advertised, loaded, ..
                } => tracing::info!(
                    endpoint = %without_credentials(&endpoint.url),
                    kind = %endpoint.kind,
                    advertised = advertised.len(),
                    loaded = loaded.len(),
                    "endpoint probe ok"
                ),
                ProbeReport::Failed { detail } => tracing::warn!(
                    endpoint = %without_credentials(&endpoint.url),
                    kind = %endpoint.kind,
                    %detail,
                    "endpoint probe failed"
                ),
            }
            was_ok = Some(ok);
        }
        // The version first: a state showing the endpoint healthy after this
        // round shows its version too.
        if let Some(version) = &version {
            sink.apply_version(index, version);
        }
        sink.apply_probe(index, report, Instant::now());
        rounds.applied(index, round);
        let delay = next_delay(&probe, &mut rand::rng());
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
            () = rounds.requested(index) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::config::Secret;
    use axum::{
        Json, Router,
        extract::State,
        http::{HeaderMap, StatusCode},
        routing::get,
    };
    use parking_lot::Mutex;
    use serde_json::{Value, json};

    /// What a fake backend answers, changeable while it runs.
    #[derive(Clone, Default)]
    struct Fake {
        tags: Arc<Mutex<Value>>,
        ps: Arc<Mutex<Value>>,
        models: Arc<Mutex<Value>>,
        /// Authorization headers seen on `/v1/models`.
        auth: Arc<Mutex<Vec<Option<String>>>>,
        /// Answer 500 to everything.
        broken: Arc<Mutex<bool>>,
        /// The `/api/version` body; `None` answers 404 (no such route).
        version: Arc<Mutex<Option<Value>>>,
        /// `/api/version` requests seen.
        version_calls: Arc<Mutex<usize>>,
    }

    /// Discovery feeding `cp`, as the control-plane process runs it; stop
    /// it with `cancel.cancel()`, then close and wait for the tracker.
    fn run_discovery(cp: &crate::control_plane::ControlPlane) -> (TaskTracker, CancellationToken) {
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        spawn(
            cp.config(),
            Arc::new(cp.clone()),
            cp.probe_rounds().clone(),
            &tracker,
            cancel.clone(),
        )
        .unwrap();
        (tracker, cancel)
    }

    async fn serve_fake(fake: Fake) -> String {
        async fn tags(State(f): State<Fake>) -> Result<Json<Value>, StatusCode> {
            if *f.broken.lock() {
                return Err(StatusCode::INTERNAL_SERVER_ERROR);
            }
            Ok(Json(f.tags.lock().clone()))
        }
        async fn ps(State(f): State<Fake>) -> Result<Json<Value>, StatusCode> {
            if *f.broken.lock() {
                return Err(StatusCode::INTERNAL_SERVER_ERROR);
            }
            Ok(Json(f.ps.lock().clone()))
        }
        async fn models(
            State(f): State<Fake>,
            headers: HeaderMap,
        ) -> Result<Json<Value>, StatusCode> {
            // Every value, so a request carrying two would show.
            let auth: Vec<&str> = headers
                .get_all("authorization")
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect();
            let auth = (!auth.is_empty()).then(|| auth.join(" | "));
            f.auth.lock().push(auth);
            if *f.broken.lock() {
                return Err(StatusCode::INTERNAL_SERVER_ERROR);
            }
            Ok(Json(f.models.lock().clone()))
        }
        async fn version(State(f): State<Fake>) -> Result<Json<Value>, StatusCode> {
            *f.version_calls.lock() += 1;
            if *f.broken.lock() {
                return Err(StatusCode::INTERNAL_SERVER_ERROR);
            }
            f.version
                .lock()
                .clone()
                .map(Json)
                .ok_or(StatusCode::NOT_FOUND)
        }
        let app = Router::new()
            .route("/api/tags", get(tags))
            .route("/api/ps", get(ps))
            .route("/api/version", get(version))
            .route("/v1/models", get(models))
            .with_state(fake);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    fn endpoint(url: &str, kind: EndpointKind, key: Option<&str>) -> EndpointConfig {
        EndpointConfig {
            url: Arc::from(url),
            kind,
            api_key: key.map(Secret::new),
            max_concurrent: 1,
            draining: false,
        }
    }

    fn prober() -> Prober {
        Prober::new(Duration::from_secs(2)).unwrap()
    }

    #[tokio::test]
    async fn ollama_probe_reads_tags_and_ps() {
        let fake = Fake::default();
        *fake.tags.lock() = json!({"models":[{"name":"a:latest","size":7},{"name":"b:7b"}]});
        *fake.ps.lock() = json!({"models":[{"name":"b:7b","size_vram":3}]});
        let url = serve_fake(fake).await;
        let report = prober()
            .probe(&endpoint(&url, EndpointKind::Ollama, None))
            .await;
        assert_eq!(
            report,
            ProbeReport::Ok {
                advertised: vec!["a:latest".into(), "b:7b".into()],
                loaded: vec!["b:7b".into()],
                items: ModelItems {
                    tags: vec![
                        r#"{"name":"a:latest","size":7}"#.into(),
                        r#"{"name":"b:7b"}"#.into()
                    ],
                    ps: vec![r#"{"name":"b:7b","size_vram":3}"#.into()],
                    models: vec![],
                },
            }
        );
    }

    #[tokio::test]
    async fn openai_probe_sends_bearer_and_reports_nothing_loaded() {
        let fake = Fake::default();
        *fake.models.lock() = json!({"object":"list","data":[{"id":"gpt-x","object":"model"}]});
        let url = serve_fake(fake.clone()).await;
        let report = prober()
            .probe(&endpoint(
                &format!("{url}/v1"),
                EndpointKind::OpenAi,
                Some("sk-secret"),
            ))
            .await;
        assert_eq!(
            report,
            ProbeReport::Ok {
                advertised: vec!["gpt-x".into()],
                loaded: vec![],
                items: ModelItems {
                    models: vec![r#"{"id":"gpt-x","object":"model"}"#.into()],
                    ..ModelItems::default()
                },
            }
        );
        assert_eq!(
            fake.auth.lock().as_slice(),
            [Some("Bearer sk-secret".to_owned())]
        );

        // Without a key, no Authorization header at all.
        prober()
            .probe(&endpoint(&format!("{url}/v1"), EndpointKind::OpenAi, None))
            .await;
        assert_eq!(fake.auth.lock().last().unwrap(), &None);

        // Credentials in the URL: sent as Basic (percent-decoded), the URL
        // requested without them.
        let with_userinfo = url.replacen("http://", "http://al%40ice:pw@", 1);
        let report = prober()
            .probe(&endpoint(
                &format!("{with_userinfo}/v1"),
                EndpointKind::OpenAi,
                None,
            ))
            .await;
        assert!(matches!(report, ProbeReport::Ok { .. }), "{report:?}");
        // base64("al@ice:pw")
        assert_eq!(
            fake.auth.lock().last().unwrap().as_deref(),
            Some("Basic YWxAaWNlOnB3")
        );

        // Both: the API key alone, not a second Authorization field.
        prober()
            .probe(&endpoint(
                &format!("{with_userinfo}/v1"),
                EndpointKind::OpenAi,
                Some("sk-secret"),
            ))
            .await;
        assert_eq!(
            fake.auth.lock().last().unwrap().as_deref(),
            Some("Bearer sk-secret")
        );
    }

    #[tokio::test]
    async fn llama_server_probe_uses_status() {
        let fake = Fake::default();
        *fake.models.lock() = json!({"data":[
            {"id":"org/m-GGUF:Q4_K_M","status":{"value":"loaded"}},
            {"id":"other","status":"unloaded"},
            {"id":"plain"}]});
        let url = serve_fake(fake).await;
        // Configured without `/v1`: the probe appends it.
        let report = prober()
            .probe(&endpoint(&url, EndpointKind::LlamaServer, None))
            .await;
        assert_eq!(
            report,
            ProbeReport::Ok {
                advertised: vec!["org/m-GGUF:Q4_K_M".into(), "other".into(), "plain".into()],
                loaded: vec!["org/m-GGUF:Q4_K_M".into(), "plain".into()],
                items: ModelItems {
                    models: vec![
                        r#"{"id":"org/m-GGUF:Q4_K_M","status":{"value":"loaded"}}"#.into(),
                        r#"{"id":"other","status":"unloaded"}"#.into(),
                        r#"{"id":"plain"}"#.into(),
                    ],
                    ..ModelItems::default()
                },
            }
        );
    }

    #[tokio::test]
    async fn an_url_without_the_ollama_api_gets_a_hint() {
        let url = serve_fake(Fake::default()).await;
        // An OpenAI-compatible server listed as an Ollama endpoint: no
        // `/api/tags` under its URL.
        let report = prober()
            .probe(&endpoint(&format!("{url}/v1"), EndpointKind::Ollama, None))
            .await;
        let ProbeReport::Failed { detail } = report else {
            panic!("{report:?}");
        };
        assert!(
            detail.starts_with("GET /api/tags: HTTP 404 Not Found (no Ollama API"),
            "{detail}"
        );
        assert!(detail.contains("/v1 at the end of its URL"), "{detail}");

        // Any other failure says only what failed.
        let fake = Fake::default();
        *fake.broken.lock() = true;
        let url = serve_fake(fake).await;
        let report = prober()
            .probe(&endpoint(&url, EndpointKind::Ollama, None))
            .await;
        assert_eq!(
            report,
            ProbeReport::Failed {
                detail: "GET /api/tags: HTTP 500 Internal Server Error".into()
            }
        );
    }

    #[tokio::test]
    async fn failures_are_reported_without_secrets() {
        let fake = Fake::default();
        *fake.broken.lock() = true;
        let url = serve_fake(fake).await;
        let report = prober()
            .probe(&endpoint(
                &format!("{url}/v1"),
                EndpointKind::OpenAi,
                Some("sk-secret"),
            ))
            .await;
        let ProbeReport::Failed { detail } = report else {
            panic!("expected failure, got {report:?}");
        };
        assert!(detail.contains("HTTP 500"), "{detail}");
        assert!(!detail.contains("sk-secret"), "{detail}");

        // Nothing listening: a connect error naming the path, not the URL's
        // credentials.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let report = prober()
            .probe(&endpoint(
                &format!("http://user:pw@{dead}"),
                EndpointKind::Ollama,
                None,
            ))
            .await;
        let ProbeReport::Failed { detail } = report else {
            panic!("expected failure, got {report:?}");
        };
        assert!(detail.starts_with("GET /api/"), "{detail}");
        assert!(!detail.contains("pw"), "{detail}");
    }

    /// Collects reports and wakes waiters.
    #[derive(Default)]
    struct Recorder {
        reports: Mutex<Vec<(usize, ProbeReport)>>,
        notify: tokio::sync::Notify,
    }

    impl ProbeSink for Recorder {
        fn apply_probe(&self, endpoint: usize, report: ProbeReport, _now: Instant) {
            self.reports.lock().push((endpoint, report));
            self.notify.notify_waiters();
        }

        fn apply_version(&self, _endpoint: usize, _version: &str) {}
    }

    impl Recorder {
        /// Waits (bounded) until `pred` holds for the latest report of `ep`.
        async fn wait_for(&self, ep: usize, pred: impl Fn(&ProbeReport) -> bool) -> ProbeReport {
            tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    let notified = self.notify.notified();
                    if let Some((_, r)) = self.reports.lock().iter().rev().find(|(i, _)| *i == ep)
                        && pred(r)
                    {
                        return r.clone();
                    }
                    notified.await;
                }
            })
            .await
            .expect("condition not reached in time")
        }
    }

    #[tokio::test]
    async fn loop_probes_at_once_then_sees_changes_and_failures() {
        let fake = Fake::default();
        *fake.tags.lock() = json!({"models":[{"name":"a:latest"}]});
        *fake.ps.lock() = json!({"models":[]});
        let url = serve_fake(fake.clone()).await;
        let yaml = format!(
            "endpoints: [\"{url}\"]\nprobe_interval: 100ms\nprobe_timeout: 1s\nprobe_jitter: 0.2\n"
        );
        let config = Config::from_yaml(&yaml, &|_| None).unwrap();
        let recorder = Arc::new(Recorder::default());
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        spawn(
            &config,
            recorder.clone(),
            Arc::new(ProbeRounds::new(1)),
            &tracker,
            cancel.clone(),
        )
        .unwrap();

        let first = recorder.wait_for(0, |_| true).await;
        assert!(
            matches!(first, ProbeReport::Ok { ref advertised, .. } if advertised == &["a:latest"])
        );

        // A model pulled at runtime shows up within a probe interval or two.
        *fake.tags.lock() = json!({"models":[{"name":"a:latest"},{"name":"new:1b"}]});
        recorder
            .wait_for(0, |r| {
                matches!(r, ProbeReport::Ok { advertised, .. } if advertised.iter().any(|m| m == "new:1b"))
            })
            .await;

        // The backend breaks: the next report is a failure.
        *fake.broken.lock() = true;
        recorder
            .wait_for(0, |r| matches!(r, ProbeReport::Failed { .. }))
            .await;

        cancel.cancel();
        tracker.close();
        tokio::time::timeout(Duration::from_secs(5), tracker.wait())
            .await
            .expect("probe tasks stop on cancel");
    }

    #[tokio::test]
    async fn control_plane_sees_models_and_marks_failures_unhealthy() {
        use crate::control_plane::ControlPlane;

        let fake = Fake::default();
        *fake.tags.lock() = json!({"models":[{"name":"a:latest"}]});
        *fake.ps.lock() = json!({"models":[{"name":"a:latest"}]});
        let url = serve_fake(fake.clone()).await;
        let yaml = format!("endpoints: [\"{url}\"]\nprobe_interval: 50ms\nprobe_timeout: 1s\n");
        let cp = ControlPlane::new(Arc::new(Config::from_yaml(&yaml, &|_| None).unwrap()));
        let (tracker, cancel) = run_discovery(&cp);

        let wait = |pred: fn(&crate::cluster::EndpointState) -> bool| {
            let cp = cp.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(10), async {
                    loop {
                        let state = cp.state();
                        if pred(&state.endpoints[0]) {
                            return state;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
                .await
                .expect("endpoint state not reached in time")
            }
        };
        let state = wait(|e| e.healthy && e.loaded_models.len() == 1).await;
        assert_eq!(&*state.endpoints[0].advertised_models[0], "a:latest");

        *fake.broken.lock() = true;
        let state = wait(|e| !e.healthy).await;
        assert!(
            state.endpoints[0].health_detail.contains("HTTP 500"),
            "{:?}",
            state.endpoints[0]
        );
        let stats = cp.stats();
        assert!(
            stats.probes_ok >= 1 && stats.probes_failed >= 1,
            "{stats:?}"
        );

        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }

    /// With an hour between probes, a model pulled on the endpoint is in
    /// the state as soon as `reprobe` returns; unknown endpoints are named.
    #[tokio::test]
    async fn reprobe_applies_a_fresh_probe_before_returning() {
        use crate::{api::ReprobeError, control_plane::ControlPlane};

        let fake = Fake::default();
        *fake.tags.lock() = json!({"models":[{"name":"a:latest"}]});
        *fake.ps.lock() = json!({"models":[]});
        let url = serve_fake(fake.clone()).await;
        let yaml = format!("endpoints: [\"{url}\"]\nprobe_interval: 1h\nprobe_timeout: 1s\n");
        let cp = ControlPlane::new(Arc::new(Config::from_yaml(&yaml, &|_| None).unwrap()));
        // Without discovery running, no probe comes: the wait is bounded.
        assert!(matches!(
            cp.reprobe(&[url.as_str()]).await,
            Err(ReprobeError::TimedOut(_))
        ));
        let (tracker, cancel) = run_discovery(&cp);
        cp.reprobe(&[]).await.unwrap();
        assert_eq!(cp.state().endpoints[0].advertised_models.len(), 1);

        *fake.tags.lock() = json!({"models":[{"name":"a:latest"},{"name":"new:1b"}]});
        let before = cp.state().version;
        let version = cp.reprobe(&[url.as_str()]).await.unwrap();
        assert!(version > before, "{version} > {before}");
        let state = cp.state();
        assert!(
            state.endpoints[0]
                .advertised_models
                .iter()
                .any(|m| &**m == "new:1b"),
            "{:?}",
            state.endpoints[0]
        );

        let err = cp.reprobe(&["http://nowhere:1"]).await.unwrap_err();
        assert!(err.to_string().contains("http://nowhere:1"), "{err}");

        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test]
    async fn ollama_version_is_read_and_never_fails_the_round() {
        let fake = Fake::default();
        *fake.tags.lock() = json!({"models":[{"name":"a:latest"}]});
        *fake.ps.lock() = json!({"models":[]});
        *fake.version.lock() = Some(json!({"version":" 0.5.7 "}));
        let url = serve_fake(fake.clone()).await;
        let ollama = endpoint(&url, EndpointKind::Ollama, None);
        let (report, version) = prober().probe_with_version(&ollama).await;
        assert!(matches!(report, ProbeReport::Ok { .. }), "{report:?}");
        assert_eq!(version.as_deref(), Some("0.5.7"));

        // No such route (an old or unusual build), a body without a
        // version, or one too long to be a version: the version is unknown
        // and the round is still ok.
        for body in [
            None,
            Some(json!({"status":"ok"})),
            Some(json!({"version":""})),
            Some(json!({"version":"9".repeat(MAX_VERSION_LEN + 1)})),
        ] {
            *fake.version.lock() = body.clone();
            let (report, version) = prober().probe_with_version(&ollama).await;
            assert!(
                matches!(report, ProbeReport::Ok { .. }),
                "{body:?}: {report:?}"
            );
            assert_eq!(version, None, "{body:?}");
        }

        // OpenAI-style endpoints have no Ollama version: nothing is asked.
        *fake.models.lock() = json!({"data":[{"id":"gpt-x"}]});
        *fake.version.lock() = Some(json!({"version":"0.1.0"}));
        let calls = *fake.version_calls.lock();
        for kind in [EndpointKind::OpenAi, EndpointKind::LlamaServer] {
            let (report, version) = prober()
                .probe_with_version(&endpoint(&format!("{url}/v1"), kind, None))
                .await;
            assert!(matches!(report, ProbeReport::Ok { .. }), "{report:?}");
            assert_eq!(version, None);
        }
        assert_eq!(*fake.version_calls.lock(), calls);
    }

    /// The control plane publishes each Ollama endpoint's version, follows
    /// an upgrade, and keeps the last one (and the endpoint healthy) when
    /// the version call starts failing.
    #[tokio::test]
    async fn control_plane_records_the_endpoint_version() {
        use crate::control_plane::ControlPlane;

        let fake = Fake::default();
        *fake.tags.lock() = json!({"models":[{"name":"a:latest"}]});
        *fake.ps.lock() = json!({"models":[]});
        *fake.version.lock() = Some(json!({"version":"0.5.7"}));
        let url = serve_fake(fake.clone()).await;
        let yaml = format!("endpoints: [\"{url}\"]\nprobe_interval: 50ms\nprobe_timeout: 1s\n");
        let cp = ControlPlane::new(Arc::new(Config::from_yaml(&yaml, &|_| None).unwrap()));
        assert_eq!(cp.state().endpoints[0].version, "");
        let (tracker, cancel) = run_discovery(&cp);

        cp.reprobe(&[]).await.unwrap();
        let state = cp.state();
        assert!(state.endpoints[0].healthy, "{:?}", state.endpoints[0]);
        assert_eq!(state.endpoints[0].version, "0.5.7");

        *fake.version.lock() = Some(json!({"version":"0.9.0"}));
        cp.reprobe(&[]).await.unwrap();
        assert_eq!(cp.state().endpoints[0].version, "0.9.0");

        *fake.version.lock() = None;
        let calls = *fake.version_calls.lock();
        cp.reprobe(&[]).await.unwrap();
        assert!(*fake.version_calls.lock() > calls);
        let state = cp.state();
        assert!(state.endpoints[0].healthy, "{:?}", state.endpoints[0]);
        assert_eq!(state.endpoints[0].version, "0.9.0");

        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let probe = ProbeConfig {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(1),
            jitter: 0.1,
        };
        let mut rng = rand::rng();
        for _ in 0..1000 {
            let d = next_delay(&probe, &mut rng);
            assert!(
                d >= Duration::from_secs(9) && d <= Duration::from_secs(11),
                "{d:?}"
            );
        }
        let fixed = ProbeConfig {
            jitter: 0.0,
            ..probe
        };
        assert_eq!(next_delay(&fixed, &mut rng), Duration::from_secs(10));
    }
}
