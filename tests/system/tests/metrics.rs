//! Observability end to end: traffic through an in-process cluster (a
//! control plane with `/metrics`, two remote sidecars, two fake Ollama
//! backends), then both components' `/metrics` scraped over HTTP, parsed,
//! and checked value by value against what was sent:
//!
//! - sidecar `requests_total` by route, model, endpoint and status equals
//!   the requests each sidecar answered (the unknown model counted with
//!   empty model and endpoint labels), `retries_total`, `in_flight`,
//!   `leases_held`, `upstream_errors_total`, the overhead histogram's count
//!   and a plausible sum;
//! - control plane decisions by reason adding up to the leases granted,
//!   releases by outcome, no active lease, probes succeeding, in-flight
//!   gauges at 0, endpoints healthy;
//! - then the control plane is stopped and one more request is routed
//!   locally: `degraded_decisions_total` counts it.
//!
//! `priority_routing` makes choices deterministic on an idle cluster
//! (config order breaks ties), and every request waits for the cluster's
//! usage to return to 0 before the next one, so each request's endpoint is
//! known in advance.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use serde_json::{Value, json};
use switchyard_control_plane::server::RunningControlPlane;
use switchyard_sidecar::SidecarHandle;
use switchyard_system_tests::{
    Cluster, FailureMode, FakeBackend, SOON, TestConfig,
    client::{get, post_json},
    cluster::{endpoint_kind, endpoint_url},
    config::EndpointEntry,
    ollama_fake,
    wait::{wait_for, wait_for_async, wait_until},
};

// ---- a tiny Prometheus / OpenMetrics text parser ---------------------------

/// One sample line: `name{k="v",...} value`.
#[derive(Clone, Debug, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the text exposition format (comments and `# EOF` skipped). Panics
/// on a line it cannot read: a malformed exposition is a failure.
fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| parse_line(line).unwrap_or_else(|| panic!("unreadable sample line {line:?}")))
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let Some(brace) = line.find('{') else {
        let (name, value) = line.split_once(' ')?;
        return Some(Sample {
            name: name.to_owned(),
            labels: BTreeMap::new(),
            value: value.split(' ').next()?.parse().ok()?,
        });
    };
    let name = line[..brace].to_owned();
    let mut labels = BTreeMap::new();
    let mut chars = line[brace + 1..].chars();
    loop {
        // `key="value"` then `,` or `}`.
        let mut key = String::new();
        loop {
            match chars.next()? {
                '=' => break,
                '}' if key.is_empty() => {
                    let value = chars.as_str().trim().split(' ').next()?.parse().ok()?;
                    return Some(Sample {
                        name,
                        labels,
                        value,
                    });
                }
                c => key.push(c),
            }
        }
        if chars.next()? != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.insert(key, value);
        match chars.next()? {
            ',' => {}
            '}' => {
                let value = chars.as_str().trim().split(' ').next()?.parse().ok()?;
                return Some(Sample {
                    name,
                    labels,
                    value,
                });
            }
            _ => return None,
        }
    }
}

/// The scraped samples of one component.
#[derive(Debug)]
struct Scrape(Vec<Sample>);

impl Scrape {
    /// Samples of `name` whose labels include every `(k, v)` in `filter`.
    fn matching<'a>(
        &'a self,
        name: &'a str,
        filter: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.0.iter().filter(move |s| {
            s.name == name
                && filter
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sum over matching samples; panics if there is none (a missing
    /// series is a failure, not a zero).
    fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        let found: Vec<_> = self.matching(name, filter).collect();
        assert!(
            !found.is_empty(),
            "no sample {name} with {filter:?}; samples:\n{:#?}",
            self.0
        );
        found.iter().map(|s| s.value).sum()
    }

    /// The single unlabelled (or uniquely matching) value.
    fn value(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        let found: Vec<_> = self.matching(name, filter).collect();
        assert_eq!(
            found.len(),
            1,
            "expected exactly one {name} with {filter:?}, got {found:#?}"
        );
        found[0].value
    }

    /// Every sample of `name` as (labels → value).
    fn series(&self, name: &str) -> BTreeMap<Vec<(String, String)>, f64> {
        self.matching(name, &[])
            .map(|s| {
                (
                    s.labels
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    s.value,
                )
            })
            .collect()
    }
}

async fn scrape(http: &reqwest::Client, url: &str) -> Scrape {
    let reply = get(http, url).await;
    assert_eq!(reply.status, 200, "GET {url}: {}", reply.text);
    Scrape(parse(&reply.text))
}

#[test]
fn the_parser_reads_labels_escapes_and_bare_samples() {
    let text = "# HELP x y\n# TYPE x counter\nx_total{a=\"1\",b=\"q\\\"uo\\\\te\\n\"} 3\n\
                up 1\nh_bucket{le=\"+Inf\"} 2\n# EOF\n";
    let s = parse(text);
    assert_eq!(s.len(), 3, "{s:?}");
    assert_eq!(s[0].name, "x_total");
    assert_eq!(s[0].labels["a"], "1");
    assert_eq!(s[0].labels["b"], "q\"uo\\te\n");
    assert!((s[0].value - 3.0).abs() < f64::EPSILON);
    assert_eq!(s[1].name, "up");
    assert!(s[1].labels.is_empty());
    assert_eq!(s[2].labels["le"], "+Inf");
    assert!(parse_line("broken{a=1} 2").is_none());
}

// ---- the cluster ------------------------------------------------------------

fn label_key(route: &str, model: &str, endpoint: &str, status: &str) -> Vec<(String, String)> {
    // BTreeMap order: endpoint, model, route, status.
    vec![
        ("endpoint".into(), endpoint.into()),
        ("model".into(), model.into()),
        ("route".into(), route.into()),
        ("status".into(), status.into()),
    ]
}

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream,
           "messages": [{"role": "user", "content": "how are the metrics?"}]})
}

/// Waits until the control plane counts nothing in flight and no lease.
async fn wait_idle(cp: &RunningControlPlane) {
    wait_for(
        "control plane usage (in-flight, leases) back to 0",
        SOON,
        || {
            let s = cp.cp.state();
            (s.total_in_flight(), s.leases)
        },
        |(f, l)| *f == 0 && *l == 0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_both_components_count_the_traffic_sent() {
    // Two Ollama fakes advertising both models; A comes first in config.
    let a = FakeBackend::start(ollama_fake(&["alpha:latest", "beta:latest"]).label("a")).await;
    let b = FakeBackend::start(ollama_fake(&["alpha:latest", "beta:latest"]).label("b")).await;
    let mut config = TestConfig::new();
    config.set("priority_routing", "true");
    for fake in [&a, &b] {
        config.endpoint(EndpointEntry {
            url: endpoint_url(fake),
            kind: endpoint_kind(fake.mode()),
            max_concurrent: None,
            api_key: None,
        });
    }
    let (url_a, url_b) = (endpoint_url(&a), endpoint_url(&b));
    let cp = RunningControlPlane::start_with_metrics(config.build())
        .await
        .unwrap();
    let cp_metrics = format!("http://{}/metrics", cp.metrics_addr.unwrap());
    let mut sidecars: Vec<SidecarHandle> = Vec::new();
    for _ in 0..2 {
        sidecars.push(
            switchyard_sidecar::start_remote(
                cp.url(),
                Some(config.build()),
                "127.0.0.1:0".parse().unwrap(),
            )
            .await
            .unwrap(),
        );
    }
    let base: Vec<String> = sidecars
        .iter()
        .map(|s| format!("http://{}", s.addr))
        .collect();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();

    // Ready: both endpoints healthy with both models, at the control plane
    // and in each sidecar's snapshot; both sessions open.
    let ready = |s: &switchyard_control_plane::cluster::ClusterState| {
        [&url_a, &url_b].iter().all(|u| {
            s.endpoints
                .iter()
                .any(|e| *e.url == ***u && e.healthy && e.advertised_models.len() >= 2)
        })
    };
    wait_until("control plane sees both fakes", SOON, || {
        ready(&cp.cp.state())
    })
    .await;
    wait_until("two sessions", SOON, || cp.cp.state().sessions >= 2).await;
    for (i, s) in sidecars.iter().enumerate() {
        wait_until(&format!("sidecar {i} snapshot ready"), SOON, || {
            ready(&s.router().cluster_state())
        })
        .await;
    }

    // ---- traffic ----
    // Sidecar 0: 3 Ollama chats on alpha, 2 OpenAI chats on beta, one
    // unknown model.
    for _ in 0..3 {
        let r = post_json(
            &http,
            &format!("{}/api/chat", base[0]),
            &chat("alpha", false),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
        wait_idle(&cp).await;
    }
    for _ in 0..2 {
        let r = post_json(
            &http,
            &format!("{}/v1/chat/completions", base[0]),
            &chat("beta", false),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
        wait_idle(&cp).await;
    }
    let r = post_json(
        &http,
        &format!("{}/api/chat", base[0]),
        &chat("no-such-model", false),
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text);
    // Sidecar 1: 2 streamed chats on beta, one generate on alpha.
    for _ in 0..2 {
        let r = post_json(&http, &format!("{}/api/chat", base[1]), &chat("beta", true)).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(r.text.contains("\"done\":true"), "{}", r.text);
        wait_idle(&cp).await;
    }
    let r = post_json(
        &http,
        &format!("{}/api/generate", base[1]),
        &json!({"model": "alpha", "prompt": "hi", "stream": false}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    wait_idle(&cp).await;
    // Sidecar 0, last (its failure marks alpha on A as failing for a
    // while): A answers 503 once, the request is retried on B.
    a.fail_next(1, FailureMode::Status(503));
    // Chats only: the control plane's probes (every 0.1 s here) hit the
    // fakes too, and a total count raced with them.
    let before_b = b.request_count("/api/chat");
    let r = post_json(
        &http,
        &format!("{}/api/chat", base[0]),
        &chat("alpha", false),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        b.request_count("/api/chat"),
        before_b + 1,
        "the retry went to B"
    );
    wait_idle(&cp).await;

    // ---- sidecar metrics ----
    // Streams release their in-flight guard when the body generator ends,
    // just after the client read the last chunk: poll for 0.
    for (i, url) in base.iter().enumerate() {
        let _ = wait_for_async(
            &format!("sidecar {i} in_flight and leases_held back to 0"),
            SOON,
            || async {
                let s = scrape(&http, &format!("{url}/metrics")).await;
                (
                    s.value("switchyard_sidecar_in_flight", &[]),
                    s.value("switchyard_sidecar_leases_held", &[]),
                )
            },
            |v| *v == (0.0, 0.0),
        )
        .await;
    }
    let s0 = scrape(&http, &format!("{}/metrics", base[0])).await;
    let s1 = scrape(&http, &format!("{}/metrics", base[1])).await;

    let expected0: BTreeMap<_, _> = [
        (label_key("/api/chat", "alpha", &url_a, "200"), 3.0),
        (
            label_key("/v1/chat/completions", "beta", &url_a, "200"),
            2.0,
        ),
        (label_key("/api/chat", "", "", "404"), 1.0),
        (label_key("/api/chat", "alpha", &url_b, "200"), 1.0),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        s0.series("switchyard_sidecar_requests_total"),
        expected0,
        "sidecar 0 requests by route/model/endpoint/status"
    );
    let expected1: BTreeMap<_, _> = [
        (label_key("/api/chat", "beta", &url_a, "200"), 2.0),
        (label_key("/api/generate", "alpha", &url_a, "200"), 1.0),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        s1.series("switchyard_sidecar_requests_total"),
        expected1,
        "sidecar 1 requests by route/model/endpoint/status"
    );

    assert_eq!(s0.value("switchyard_sidecar_retries_total", &[]), 1.0);
    assert_eq!(s1.value("switchyard_sidecar_retries_total", &[]), 0.0);
    assert_eq!(
        s0.series("switchyard_sidecar_upstream_errors_total"),
        [(
            vec![
                ("endpoint".to_owned(), url_a.clone()),
                ("outcome".to_owned(), "backend_error".to_owned())
            ],
            1.0
        )]
        .into_iter()
        .collect(),
        "the 503 is counted against A"
    );
    assert!(
        s1.series("switchyard_sidecar_upstream_errors_total")
            .is_empty()
    );
    for (s, n) in [(&s0, 7.0), (&s1, 3.0)] {
        assert_eq!(
            s.value("switchyard_sidecar_degraded_decisions_total", &[]),
            0.0
        );
        assert_eq!(
            s.value("switchyard_sidecar_control_plane_connected", &[]),
            1.0
        );
        // Every request through the proxy is observed once, the refused
        // unknown model included (its overhead is all Switchyard's).
        let count = s.value("switchyard_sidecar_overhead_seconds_count", &[]);
        let sum = s.value("switchyard_sidecar_overhead_seconds_sum", &[]);
        assert_eq!(count, n, "overhead observations");
        assert!(sum > 0.0, "overhead sum {sum}");
        assert!(
            sum / count < 0.5,
            "mean overhead {} s per request is not plausible (backend time leaked in?)",
            sum / count
        );
        assert_eq!(
            s.value(
                "switchyard_sidecar_overhead_seconds_bucket",
                &[("le", "+Inf")]
            ),
            n
        );
    }

    // ---- control-plane metrics ----
    let c = scrape(&http, &cp_metrics).await;
    // 3 + 2 + 2 + 1 routed requests, one of them twice (the retry).
    let leases = 10.0;
    assert_eq!(c.value("switchyard_cp_leases_granted_total", &[]), leases);
    assert_eq!(
        c.sum("switchyard_cp_decisions_total", &[]),
        leases,
        "decisions by reason: {:?}",
        c.series("switchyard_cp_decisions_total")
    );
    // Every fake has both models loaded and free slots.
    assert_eq!(
        c.value(
            "switchyard_cp_decisions_total",
            &[("reason", "loaded_free")]
        ),
        leases
    );
    assert_eq!(c.value("switchyard_cp_model_not_found_total", &[]), 1.0);
    assert_eq!(
        c.value("switchyard_cp_releases_total", &[("outcome", "ok")]),
        leases - 1.0
    );
    assert_eq!(
        c.value(
            "switchyard_cp_releases_total",
            &[("outcome", "backend_error")]
        ),
        1.0
    );
    assert_eq!(
        c.sum("switchyard_cp_releases_total", &[]),
        leases,
        "every lease released once: {:?}",
        c.series("switchyard_cp_releases_total")
    );
    assert_eq!(c.value("switchyard_cp_leases_released_total", &[]), leases);
    assert_eq!(c.value("switchyard_cp_leases_active", &[]), 0.0);
    assert_eq!(c.value("switchyard_cp_sessions_active", &[]), 2.0);
    assert!(c.value("switchyard_cp_probes_total", &[("result", "ok")]) > 0.0);
    let in_flight = c.series("switchyard_cp_in_flight");
    assert!(!in_flight.is_empty(), "no in-flight series");
    assert!(
        in_flight.values().all(|v| *v == 0.0),
        "in-flight gauges: {in_flight:?}"
    );
    for url in [&url_a, &url_b] {
        assert_eq!(
            c.value("switchyard_cp_endpoint_healthy", &[("endpoint", url)]),
            1.0
        );
        assert_eq!(
            c.value("switchyard_cp_endpoint_draining", &[("endpoint", url)]),
            0.0
        );
        // Usage was tracked under the normalized model names.
        assert!(
            c.matching("switchyard_cp_in_flight", &[("endpoint", url)])
                .count()
                >= 1,
            "{in_flight:?}"
        );
    }

    // ---- degraded: the control plane goes away, sidecar 0 routes locally ----
    cp.shutdown().await.unwrap();
    let r = post_json(
        &http,
        &format!("{}/api/chat", base[0]),
        &chat("beta", false),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let s0 = wait_for_async(
        "sidecar 0 to count the degraded request and be idle",
        SOON,
        || async { scrape(&http, &format!("{}/metrics", base[0])).await },
        |s| s.value("switchyard_sidecar_in_flight", &[]) == 0.0,
    )
    .await;
    assert_eq!(
        s0.value("switchyard_sidecar_degraded_decisions_total", &[]),
        1.0
    );
    assert_eq!(
        s0.value("switchyard_sidecar_control_plane_connected", &[]),
        0.0
    );
    assert_eq!(
        s0.sum(
            "switchyard_sidecar_requests_total",
            &[("route", "/api/chat"), ("model", "beta"), ("status", "200")]
        ),
        1.0
    );
    assert_eq!(
        s0.value("switchyard_sidecar_overhead_seconds_count", &[]),
        8.0
    );
    assert_eq!(s0.value("switchyard_sidecar_retries_total", &[]), 1.0);

    for s in sidecars {
        s.shutdown().await;
    }
}

/// A standalone sidecar (control plane embedded) exposes the control
/// plane's families in its own `/metrics`, as valid OpenMetrics: counter
/// families without `_total`, one `# EOF` at the very end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_sidecar_exposes_the_embedded_control_plane_metrics() {
    let c = Cluster::builder()
        .backend(ollama_fake(&["m:latest"]))
        .standalone()
        .start()
        .await;
    let url = c.endpoint_url(0);
    let r = post_json(c.http(), &c.at("/api/chat"), &chat("m", false)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = post_json(c.http(), &c.at("/api/chat"), &chat("nope", false)).await;
    assert_eq!(r.status, 404, "{}", r.text);
    c.wait_usage(0).await;

    let reply = get(c.http(), &c.at("/metrics")).await;
    assert_eq!(reply.status, 200);
    let text = &reply.text;
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert_eq!(text.matches("# EOF").count(), 1, "{text}");
    assert!(
        text.contains("# TYPE switchyard_cp_decisions counter\n"),
        "{text}"
    );
    let s = Scrape(parse(text));
    assert_eq!(
        s.sum("switchyard_sidecar_requests_total", &[("status", "200")]),
        1.0
    );
    assert_eq!(
        s.value(
            "switchyard_sidecar_requests_total",
            &[("endpoint", ""), ("status", "404")]
        ),
        1.0
    );
    assert_eq!(s.sum("switchyard_cp_decisions_total", &[]), 1.0);
    assert_eq!(s.value("switchyard_cp_leases_granted_total", &[]), 1.0);
    assert_eq!(s.value("switchyard_cp_model_not_found_total", &[]), 1.0);
    assert_eq!(
        s.value("switchyard_cp_releases_total", &[("outcome", "ok")]),
        1.0
    );
    assert_eq!(s.value("switchyard_cp_leases_active", &[]), 0.0);
    assert!(s.value("switchyard_cp_probes_total", &[("result", "ok")]) > 0.0);
    assert_eq!(
        s.value("switchyard_cp_endpoint_healthy", &[("endpoint", &url)]),
        1.0
    );
    c.shutdown().await;
}
