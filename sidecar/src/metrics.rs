//! The sidecar's Prometheus metrics, served at `GET /metrics` on the same
//! listener as the APIs (behind the router key when one is set).
//!
//! One [`Metrics`] per sidecar instance (its own registry, no globals), so
//! tests can run several sidecars in one process.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `switchyard_sidecar_requests_total` | counter | `route`, `model`, `endpoint`, `status` |
//! | `switchyard_sidecar_in_flight` | gauge | — (requests whose response has not ended) |
//! | `switchyard_sidecar_retries_total` | counter | — (attempts after the first) |
//! | `switchyard_sidecar_degraded_decisions_total` | counter | — (choices made locally, control plane unreachable) |
//! | `switchyard_sidecar_overhead_seconds` | histogram | — (time in Switchyard excluding backend waits) |
//! | `switchyard_sidecar_upstream_errors_total` | counter | `endpoint`, `outcome` |
//! | `switchyard_sidecar_control_plane_connected` | gauge | — (1 when the last contact succeeded) |
//! | `switchyard_sidecar_own_probes` | gauge | — (1 while the sidecar routes on its own probes of the endpoints, the control plane gone: `router/local_discovery.rs`) |
//! | `switchyard_sidecar_leases_held` | gauge | — (this sidecar's unreleased leases) |
//! | `switchyard_sidecar_model_management_total` | counter | `operation` (`pull`, `push`, `create`, `copy`, `delete`, `unload`, `blob_upload`), `outcome` (`success`; `failed`: some endpoint failed; `refused`: answered before any endpoint was asked) |
//!
//! A standalone sidecar also exposes its embedded control plane's families
//! (`switchyard_cp_*`: decisions by reason, leases, probes, endpoint health;
//! see `switchyard_control_plane::metrics`) in the same exposition.
//!
//! The stored-response routes ([`crate::stored_responses`]) count in
//! `requests_total` too, `route` being the pattern (`/v1/responses/{id}`,
//! never the id), `model` empty and `endpoint` the one that answered.
//!
//! `endpoint` is the endpoint's URL without credentials (`user:pass@`), as
//! in the logs.
//!
//! `model` is the client's model name only once an endpoint was chosen for
//! it (otherwise `""`), so arbitrary unknown names cannot grow the label set.
//! `status` is the status the client received in the response head: a
//! stream that fails after its first byte still counts as 200 there, and
//! shows up in `upstream_errors_total` with its release outcome.

use std::{borrow::Cow, sync::Arc, time::Duration};

use axum::{
    extract::State,
    response::{IntoResponse, Response},
};
use http::{HeaderValue, StatusCode, header::CONTENT_TYPE};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use switchyard_control_plane::{endpoint::without_credentials, outcome::Outcome};

use crate::server::AppState;

/// Labels of `switchyard_sidecar_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Client path.
    pub route: String,
    /// Model as the client named it (`""` when no endpoint was chosen).
    pub model: String,
    /// Chosen endpoint URL (`""` when none), without credentials.
    pub endpoint: String,
    /// Response status code.
    pub status: u16,
}

/// Labels of `switchyard_sidecar_model_management_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ManagementLabels {
    /// `pull`, `push`, `create`, `copy`, `delete`, `unload` or
    /// `blob_upload`.
    pub operation: &'static str,
    /// `success`, `failed` or `refused`.
    pub outcome: &'static str,
}

/// Labels of `switchyard_sidecar_upstream_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// Endpoint URL.
    pub endpoint: String,
    /// Release outcome.
    pub outcome: String,
}

struct Inner {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    in_flight: Gauge,
    retries: Counter,
    degraded: Counter,
    overhead: Histogram,
    upstream_errors: Family<UpstreamLabels, Counter>,
    control_plane_connected: Gauge,
    own_probes: Gauge,
    leases_held: Gauge,
    management: Family<ManagementLabels, Counter>,
}

/// The sidecar's metrics. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let in_flight = Gauge::default();
        let retries = Counter::default();
        let degraded = Counter::default();
        // 50 µs .. ~1.6 s: the sidecar's own work is sub-millisecond when
        // healthy; the tail shows control-plane round trips and retries.
        let overhead = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        let upstream_errors = Family::<UpstreamLabels, Counter>::default();
        let control_plane_connected = Gauge::default();
        let own_probes = Gauge::default();
        let leases_held = Gauge::default();
        let management = Family::<ManagementLabels, Counter>::default();
        registry.register(
            "switchyard_sidecar_model_management",
            "Model-management operations fanned out to the Ollama endpoints, by operation and outcome",
            management.clone(),
        );
        registry.register(
            "switchyard_sidecar_requests",
            "Requests answered, by route, model, endpoint and status",
            requests.clone(),
        );
        registry.register(
            "switchyard_sidecar_in_flight",
            "Requests whose response has not ended",
            in_flight.clone(),
        );
        registry.register(
            "switchyard_sidecar_retries",
            "Attempts on another endpoint after a failure before the first byte",
            retries.clone(),
        );
        registry.register(
            "switchyard_sidecar_degraded_decisions",
            "Routing decisions made locally because the control plane did not answer",
            degraded.clone(),
        );
        registry.register(
            "switchyard_sidecar_overhead_seconds",
            "Time spent in the sidecar per request, excluding time waiting for backends",
            overhead.clone(),
        );
        registry.register(
            "switchyard_sidecar_upstream_errors",
            "Leases released with a failure outcome, by endpoint and outcome",
            upstream_errors.clone(),
        );
        registry.register(
            "switchyard_sidecar_control_plane_connected",
            "1 when the last contact with the control plane succeeded",
            control_plane_connected.clone(),
        );
        registry.register(
            "switchyard_sidecar_own_probes",
            "1 while the sidecar routes on its own probes of the endpoints (control plane unreachable at start, or gone longer than session_ttl)",
            own_probes.clone(),
        );
        registry.register(
            "switchyard_sidecar_leases_held",
            "Leases this sidecar holds and has not released",
            leases_held.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                registry,
                requests,
                in_flight,
                retries,
                degraded,
                overhead,
                upstream_errors,
                control_plane_connected,
                own_probes,
                leases_held,
                management,
            }),
        }
    }

    /// Counts one model-management operation.
    pub fn management(&self, labels: ManagementLabels) {
        self.inner.management.get_or_create(&labels).inc();
    }

    /// Counts one answered request (its endpoint label without credentials).
    pub fn request(&self, mut labels: RequestLabels) {
        if let Cow::Owned(shown) = without_credentials(&labels.endpoint) {
            labels.endpoint = shown;
        }
        self.inner.requests.get_or_create(&labels).inc();
    }

    /// Marks a request in flight until the guard drops.
    pub fn in_flight(&self) -> InFlightGuard {
        self.inner.in_flight.inc();
        InFlightGuard {
            gauge: self.inner.in_flight.clone(),
        }
    }

    /// Counts a retry.
    pub fn retry(&self) {
        self.inner.retries.inc();
    }

    /// Counts a degraded (local) decision.
    pub fn degraded_decision(&self) {
        self.inner.degraded.inc();
    }

    /// Records the sidecar's own time for one request.
    pub fn overhead(&self, d: Duration) {
        self.inner.overhead.observe(d.as_secs_f64());
    }

    /// Counts a lease released with a failure outcome (`Ok` and `Cancelled`
    /// are not failures and are not counted).
    pub fn upstream_outcome(&self, endpoint: &str, outcome: Outcome) {
        if matches!(outcome, Outcome::Ok | Outcome::Cancelled) {
            return;
        }
        self.inner
            .upstream_errors
            .get_or_create(&UpstreamLabels {
                endpoint: without_credentials(endpoint).into_owned(),
                outcome: outcome.as_str().to_owned(),
            })
            .inc();
    }

    /// Renders the registry in the OpenMetrics text format.
    pub fn render(
        &self,
        control_plane_connected: bool,
        own_probes: bool,
        leases_held: usize,
    ) -> Result<String, std::fmt::Error> {
        self.inner
            .control_plane_connected
            .set(i64::from(control_plane_connected));
        self.inner.own_probes.set(i64::from(own_probes));
        self.inner
            .leases_held
            .set(i64::try_from(leases_held).unwrap_or(i64::MAX));
        let mut out = String::new();
        encode(&mut out, &self.inner.registry)?;
        Ok(out)
    }
}

/// Decrements the in-flight gauge when dropped (response ended or the
/// client went away).
#[derive(Debug)]
pub struct InFlightGuard {
    gauge: Gauge,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// `GET /metrics`.
pub(crate) async fn handler(State(state): State<AppState>) -> Response {
    let router = state.router();
    match state.metrics().render(
        router.control_plane_connected(),
        router.state_source() == crate::router::StateSource::OwnProbes,
        router.local_in_flight(),
    ) {
        Ok(mut text) => {
            if let Some(cp) = router.embedded_control_plane() {
                let families =
                    switchyard_control_plane::metrics::render_openmetrics(&cp.stats(), &cp.state());
                // OpenMetrics ends with `# EOF`: the families go before it.
                let end = text.rfind("# EOF").unwrap_or(text.len());
                text.insert_str(end, &families);
            }
            let mut response = text.into_response();
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode metrics: {e}"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn renders_every_family() {
        let m = Metrics::new();
        m.request(RequestLabels {
            route: "/api/chat".into(),
            model: "m".into(),
            endpoint: "http://u:sekret@e".into(),
            status: 200,
        });
        let g = m.in_flight();
        m.retry();
        m.degraded_decision();
        m.overhead(Duration::from_micros(300));
        m.upstream_outcome("http://u:sekret@e", Outcome::ConnectError);
        m.upstream_outcome("http://e", Outcome::Ok);
        let text = m.render(true, true, 2).unwrap();
        for needle in [
            "switchyard_sidecar_requests_total{route=\"/api/chat\",model=\"m\",endpoint=\"http://e\",status=\"200\"} 1",
            "switchyard_sidecar_in_flight 1",
            "switchyard_sidecar_retries_total 1",
            "switchyard_sidecar_degraded_decisions_total 1",
            "switchyard_sidecar_overhead_seconds_count 1",
            "switchyard_sidecar_upstream_errors_total{endpoint=\"http://e\",outcome=\"connect_error\"} 1",
            "switchyard_sidecar_control_plane_connected 1",
            "switchyard_sidecar_own_probes 1",
            "switchyard_sidecar_leases_held 2",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        assert!(!text.contains("outcome=\"ok\""));
        // Endpoint labels never carry URL credentials.
        assert!(!text.contains("sekret"), "{text}");
        drop(g);
        assert!(
            m.render(true, false, 0)
                .unwrap()
                .contains("switchyard_sidecar_in_flight 0")
        );
    }
}
