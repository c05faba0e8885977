//! Prometheus metrics of the control plane, in the text exposition format at
//! `GET /metrics` on `--metrics-listen`.
//!
//! Rendered at scrape time from [`ControlPlane::stats`] and
//! [`ControlPlane::state`]: no second set of counters to keep in step, and a
//! scrape costs one short lock plus string formatting. Every family has its
//! `# HELP` and `# TYPE` lines; label values are escaped per the format.
//!
//! [`render_openmetrics`] renders the same samples for an OpenMetrics
//! exposition (a standalone sidecar appends them to its own `/metrics`):
//! there a counter family is named without its `_total` suffix, which only
//! its samples carry.

use std::fmt::Write as _;

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    cluster::ClusterState, control_plane::ControlPlane, control_plane::ControlPlaneStats,
    endpoint::without_credentials,
};

/// Content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Metric family type.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
        }
    }
}

/// Escapes a label value: backslash, double quote and newline.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes `# HELP` text: backslash and newline.
fn escape_help(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A text-format writer. `fmt::Write` into a `String` cannot fail, so the
/// results are discarded.
#[derive(Default)]
struct Encoder {
    out: String,
    /// Name counter families without `_total` (OpenMetrics).
    openmetrics: bool,
}

impl Encoder {
    fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let name = match kind {
            Kind::Counter if self.openmetrics => name.strip_suffix("_total").unwrap_or(name),
            _ => name,
        };
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    fn single(&mut self, name: &str, kind: Kind, help: &str, value: u64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// Renders all control-plane metrics (Prometheus text format 0.0.4).
pub fn render(stats: &ControlPlaneStats, state: &ClusterState) -> String {
    render_with(Encoder::default(), stats, state)
}

/// Renders all control-plane metrics as OpenMetrics families, without the
/// closing `# EOF` (the caller appends them to its own exposition).
pub fn render_openmetrics(stats: &ControlPlaneStats, state: &ClusterState) -> String {
    render_with(
        Encoder {
            out: String::new(),
            openmetrics: true,
        },
        stats,
        state,
    )
}

fn render_with(mut e: Encoder, stats: &ControlPlaneStats, state: &ClusterState) -> String {
    e.family(
        "switchyard_cp_decisions_total",
        Kind::Counter,
        "Endpoint choices made, by the reason for the choice (dry runs such as `switchyard choose` not counted).",
    );
    for (reason, n) in &stats.decisions {
        e.sample(
            "switchyard_cp_decisions_total",
            &[("reason", reason.as_str())],
            *n,
        );
    }
    e.single(
        "switchyard_cp_model_not_found_total",
        Kind::Counter,
        "Choices refused because no endpoint advertises the model.",
        stats.not_found,
    );
    e.single(
        "switchyard_cp_no_endpoint_total",
        Kind::Counter,
        "Choices refused because every endpoint advertising the model was excluded \
         or draining, or none does while an endpoint was never reached.",
        stats.no_endpoint,
    );
    e.family(
        "switchyard_cp_releases_total",
        Kind::Counter,
        "Leases released by sidecars, by request outcome.",
    );
    for (outcome, n) in &stats.releases {
        e.sample(
            "switchyard_cp_releases_total",
            &[("outcome", outcome.as_str())],
            *n,
        );
    }
    e.single(
        "switchyard_cp_leases_active",
        Kind::Gauge,
        "Leases currently held across all sessions.",
        stats.leases_active,
    );
    e.single(
        "switchyard_cp_leases_granted_total",
        Kind::Counter,
        "Leases granted by reserving choices.",
        stats.leases_granted,
    );
    e.single(
        "switchyard_cp_leases_registered_total",
        Kind::Counter,
        "Leases sidecars re-registered (after a control-plane restart or degraded mode).",
        stats.leases_registered,
    );
    e.single(
        "switchyard_cp_leases_released_total",
        Kind::Counter,
        "Leases ended by any means (release, session close, session expiry).",
        stats.leases_released,
    );
    e.single(
        "switchyard_cp_leases_expired_total",
        Kind::Counter,
        "Leases reclaimed because their session expired.",
        stats.leases_expired,
    );
    e.single(
        "switchyard_cp_sessions_active",
        Kind::Gauge,
        "Live sidecar sessions.",
        stats.sessions_active,
    );
    e.single(
        "switchyard_cp_sessions_expired_total",
        Kind::Counter,
        "Sidecar sessions expired without keep-alive.",
        stats.sessions_expired,
    );

    e.family(
        "switchyard_cp_in_flight",
        Kind::Gauge,
        "Requests in flight per endpoint and tracking model.",
    );
    for ep in &state.endpoints {
        for u in &ep.usage {
            e.sample(
                "switchyard_cp_in_flight",
                &[
                    ("endpoint", &without_credentials(&ep.url)),
                    ("model", &u.model),
                ],
                u64::from(u.in_flight),
            );
        }
    }
    e.family(
        "switchyard_cp_endpoint_healthy",
        Kind::Gauge,
        "1 when the endpoint's last probe succeeded.",
    );
    for ep in &state.endpoints {
        e.sample(
            "switchyard_cp_endpoint_healthy",
            &[("endpoint", &without_credentials(&ep.url))],
            u64::from(ep.healthy),
        );
    }
    e.family(
        "switchyard_cp_endpoint_draining",
        Kind::Gauge,
        "1 when the endpoint is draining (receives no new work).",
    );
    for ep in &state.endpoints {
        e.sample(
            "switchyard_cp_endpoint_draining",
            &[("endpoint", &without_credentials(&ep.url))],
            u64::from(ep.draining),
        );
    }
    e.family(
        "switchyard_cp_probes_total",
        Kind::Counter,
        "Discovery probe rounds, by result.",
    );
    e.sample(
        "switchyard_cp_probes_total",
        &[("result", "ok")],
        stats.probes_ok,
    );
    e.sample(
        "switchyard_cp_probes_total",
        &[("result", "failed")],
        stats.probes_failed,
    );
    e.single(
        "switchyard_cp_affinity_entries",
        Kind::Gauge,
        "Conversation-affinity entries held.",
        stats.affinity_entries,
    );
    e.out
}

async fn scrape(State(cp): State<ControlPlane>) -> impl IntoResponse {
    let body = render(&cp.stats(), &cp.state());
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body)
}

/// The metrics HTTP app (`GET /metrics`).
pub fn router(cp: ControlPlane) -> Router {
    Router::new().route("/metrics", get(scrape)).with_state(cp)
}

/// Serves `/metrics` on `listener` until `shutdown` fires.
pub async fn serve(
    cp: ControlPlane,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(cp))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::sync::Arc;

    use super::*;
    use crate::{
        cluster::{EndpointState, ModelUsage},
        decision::DecisionReason,
        endpoint::EndpointKind,
        outcome::Outcome,
    };

    fn stats() -> ControlPlaneStats {
        ControlPlaneStats {
            decisions: DecisionReason::ALL.map(|r| (r, 3)),
            not_found: 1,
            no_endpoint: 4,
            releases: Outcome::ALL.iter().map(|o| (*o, 2)).collect(),
            leases_granted: 10,
            leases_registered: 0,
            leases_released: 8,
            leases_expired: 1,
            leases_active: 2,
            sessions_active: 1,
            sessions_expired: 0,
            affinity_entries: 4,
            probes_ok: 5,
            probes_failed: 6,
        }
    }

    fn state() -> ClusterState {
        ClusterState {
            endpoints: vec![EndpointState {
                url: Arc::from("http://a:11434"),
                kind: EndpointKind::Ollama,
                priority: 0,
                max_concurrent: 2,
                healthy: true,
                health_detail: String::new(),
                draining: false,
                advertised_models: vec![],
                loaded_models: vec![],
                usage: vec![ModelUsage {
                    model: Arc::from("we\"ird\\name\n"),
                    in_flight: 2,
                    ..ModelUsage::default()
                }],
                in_flight: 2,
                failing_models: vec![],
                missing_models: vec![],
                circuit_open: false,
                circuit_half_open: false,
                last_probe_ok_unix_ms: 0,
                version: String::new(),
            }],
            ..ClusterState::default()
        }
    }

    #[test]
    fn renders_every_family_with_help_and_type() {
        let text = render(&stats(), &state());
        for family in [
            "switchyard_cp_decisions_total",
            "switchyard_cp_model_not_found_total",
            "switchyard_cp_no_endpoint_total",
            "switchyard_cp_releases_total",
            "switchyard_cp_leases_active",
            "switchyard_cp_leases_granted_total",
            "switchyard_cp_leases_released_total",
            "switchyard_cp_leases_expired_total",
            "switchyard_cp_sessions_active",
            "switchyard_cp_in_flight",
            "switchyard_cp_endpoint_healthy",
            "switchyard_cp_endpoint_draining",
            "switchyard_cp_probes_total",
            "switchyard_cp_affinity_entries",
        ] {
            assert!(
                text.contains(&format!("# HELP {family} ")),
                "{family}\n{text}"
            );
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{family}\n{text}"
            );
        }
        assert!(text.contains("switchyard_cp_decisions_total{reason=\"loaded_free\"} 3\n"));
        assert!(text.contains("switchyard_cp_releases_total{outcome=\"idle_timeout\"} 2\n"));
        assert!(text.contains("switchyard_cp_probes_total{result=\"failed\"} 6\n"));
        assert!(text.contains("switchyard_cp_no_endpoint_total 4\n"));
        assert!(text.contains("switchyard_cp_endpoint_healthy{endpoint=\"http://a:11434\"} 1\n"));
        assert!(text.contains("# TYPE switchyard_cp_leases_active gauge\n"));
        assert!(text.contains("# TYPE switchyard_cp_leases_granted_total counter\n"));
    }

    #[test]
    fn openmetrics_counter_families_drop_the_total_suffix() {
        let text = render_openmetrics(&stats(), &state());
        assert!(
            text.contains("# TYPE switchyard_cp_decisions counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP switchyard_cp_leases_granted "),
            "{text}"
        );
        assert!(text.contains("switchyard_cp_decisions_total{reason=\"loaded_free\"} 3\n"));
        assert!(text.contains("# TYPE switchyard_cp_leases_active gauge\n"));
        assert!(
            !text.contains("# TYPE switchyard_cp_decisions_total"),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
        // The 0.0.4 rendering is unchanged.
        assert!(
            render(&stats(), &state()).contains("# TYPE switchyard_cp_decisions_total counter\n")
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let text = render(&stats(), &state());
        assert!(
            text.contains(
                "switchyard_cp_in_flight{endpoint=\"http://a:11434\",model=\"we\\\"ird\\\\name\\n\"} 2\n"
            ),
            "{text}"
        );
        // Every non-comment line is `name{labels} value` or `name value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<u64>().is_ok(), "{line}");
        }
    }
}
