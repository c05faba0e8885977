//! Fault-injection tests (issue "Survive failure"): the control plane and
//! sidecars killed and restarted as real processes, backends failing in
//! every way the fake can fail, clients leaving, timeouts, graceful
//! shutdown. Each test asserts that no client request failed (unless the
//! scenario makes a failure the expected answer) and that cluster usage
//! ends exactly at zero, and prints what it measured (`--nocapture`).
//!
//! Run: `cargo test -p switchyard-system-tests --test faults -- --nocapture`.
//! Tests are independent (own processes, own ports) and may run in
//! parallel; on a loaded 2-core machine the latency figures they print are
//! cleanest with `-- --test-threads=1`, which is also the stable way to
//! run them: in parallel runs an in-process cluster's start-up wait
//! (`Cluster::wait_ready`, "sidecar 0 to receive a WatchUsage snapshot with
//! every fake healthy") has intermittently timed out (2 of ~9 runs, not
//! reproduced in isolation). The accounting soak is in
//! `faults_soak.rs` so its CPU load does not skew these timings.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use switchyard_control_plane::{cluster::ClusterState, outcome::Outcome};
use switchyard_system_tests::{
    BackendOptions, Cluster, FailureMode, FakeBackend, FakeConfig, FakeMode, Framing, SOON,
    TestConfig,
    client::{post_json, stream},
    cluster::{endpoint_kind, endpoint_url},
    config::EndpointEntry,
    faults::{
        BlackHole, CpProcess, Load, chat, chat_once, chat_stream, get_text, http_client,
        measure_until, metric_sum, sidecar_process, tail,
    },
    ollama_fake,
    wait::{wait_for, wait_for_async, wait_until, within},
};
use tokio::time::Instant;

// ------------------------------------------------------------ helpers

/// Releases the control plane counted with `outcome` (in-process cluster).
fn cp_releases(c: &Cluster, outcome: Outcome) -> u64 {
    c.control_plane
        .as_ref()
        .expect("remote-mode cluster")
        .cp
        .stats()
        .releases
        .iter()
        .find(|(o, _)| *o == outcome)
        .map_or(0, |(_, n)| *n)
}

/// Backend-failure releases (every outcome that counts against health).
fn cp_failure_releases(c: &Cluster) -> u64 {
    Outcome::ALL
        .into_iter()
        .filter(|o| o.is_backend_failure())
        .map(|o| cp_releases(c, o))
        .sum()
}

/// A sidecar's `/metrics` value.
async fn sidecar_metric(
    http: &reqwest::Client,
    base: &str,
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    let text = get_text(http, &format!("{base}/metrics"))
        .await
        .unwrap_or_else(|| panic!("{base}/metrics did not answer"));
    metric_sum(&text, name, labels)
}

/// Where a sidecar's cluster state comes from, as `/health` reports it.
async fn state_source(http: &reqwest::Client, base: &str) -> String {
    // 503 when no backend is healthy: the body says why either way.
    let body = http
        .get(format!("{base}/health"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{base}/health did not answer: {e}"))
        .text()
        .await
        .unwrap_or_default();
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("/health: {e}: {body}"));
    v["cluster_state"].as_str().unwrap_or_default().to_owned()
}

/// A config entry for an in-process fake.
fn entry(fake: &FakeBackend, max_concurrent: u32) -> EndpointEntry {
    EndpointEntry {
        url: endpoint_url(fake),
        kind: endpoint_kind(fake.mode()),
        max_concurrent: Some(max_concurrent),
        api_key: None,
    }
}

/// Waits until the control-plane process sees every fake healthy with its
/// models and `sessions` sessions, and every sidecar lists `models`.
async fn wait_cp_ready(
    cp: &CpProcess,
    fakes: &[&FakeBackend],
    sessions: u32,
    sidecars: &[String],
    models: &[&str],
) {
    let http = http_client();
    let deadline = Instant::now() + SOON;
    loop {
        let state = cp.state().await;
        let cp_ok = state.as_ref().is_some_and(|s| {
            s.sessions >= sessions
                && fakes.iter().all(|f| {
                    let url = endpoint_url(f);
                    s.endpoints.iter().any(|e| {
                        *e.url == *url && e.healthy && e.advertised_models.len() >= f.models().len()
                    })
                })
        });
        let mut sidecars_ok = true;
        for s in sidecars {
            let tags = get_text(&http, &format!("{s}/api/tags"))
                .await
                .unwrap_or_default();
            sidecars_ok &= models.iter().all(|m| tags.contains(m));
        }
        if cp_ok && sidecars_ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "cluster of processes not ready: cp state {state:?}, sidecars ok {sidecars_ok}; cp log:\n{}",
            tail(&cp.process.logs(), 30)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn process_config() -> TestConfig {
    let mut config = TestConfig::new();
    config
        .set("choose_timeout", "0.05")
        .set("timeouts.ollama", "{connect: 1, first_byte: 60, idle: 60}");
    config
}

// ------------------------------------------------- 1. control plane killed

/// SIGKILL of the control plane under steady load through two sidecar
/// processes, then a restart on the same port: no client request fails
/// (degraded mode decides locally), held requests are re-registered so
/// usage is exact again, and it returns to zero after the load.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn control_plane_killed_under_load_no_client_fails_and_usage_recovers() {
    let a = FakeBackend::start(
        ollama_fake(&["m:latest"])
            .delay(Duration::from_millis(20))
            .label("a"),
    )
    .await;
    let b = FakeBackend::start(
        ollama_fake(&["m:latest"])
            .delay(Duration::from_millis(20))
            .label("b"),
    )
    .await;
    let slow = FakeBackend::start(ollama_fake(&["slow:latest"]).label("slow")).await;
    let mut config = process_config();
    for f in [&a, &b, &slow] {
        config.endpoint(entry(f, 64));
    }
    let mut cp = CpProcess::start(&config).await;
    let s1 = sidecar_process(&cp.url(), &config, "s1").await;
    let s2 = sidecar_process(&cp.url(), &config, "s2").await;
    let urls = [s1.url(), s2.url()];
    wait_cp_ready(
        &cp,
        &[&a, &b, &slow],
        2,
        &urls,
        &["m:latest", "slow:latest"],
    )
    .await;
    let http = http_client();

    // Two requests held at a backend across the whole outage: they must be
    // re-registered with the restarted control plane.
    slow.hold_requests(true);
    let held: Vec<_> = urls
        .iter()
        .map(|u| {
            let http = http.clone();
            let url = format!("{u}/api/chat");
            tokio::spawn(async move { chat_once(&http, &url, &chat("slow", "held")).await })
        })
        .collect();
    assert!(
        slow.wait_for_waiting(2, SOON).await,
        "held requests never reached the backend"
    );
    cp.wait_usage(2, 2, SOON).await;

    let load = Load::start(&http, &urls, 8, "m");
    wait_for("load to warm up", SOON, || load.ok(), |n| *n >= 100).await;

    let before_kill = load.ok();
    cp.kill();
    let killed_at = Instant::now();
    wait_for(
        "the sidecars to serve 300 requests without the control plane",
        Duration::from_secs(30),
        || load.ok(),
        |n| *n >= before_kill + 300,
    )
    .await;
    let served_during_outage = load.ok() - before_kill;
    let outage = killed_at.elapsed();

    cp.restart().await;
    let restarted_at = Instant::now();
    // Exact again: the two held leases are counted by the new control plane.
    let reregistered = {
        let deadline = restarted_at + Duration::from_secs(20);
        loop {
            let slow_in_flight = cp.state().await.and_then(|s| {
                s.endpoints
                    .iter()
                    .find(|e| *e.url == *endpoint_url(&slow))
                    .map(|e| e.in_flight)
            });
            if slow_in_flight == Some(2) {
                break restarted_at.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "held leases not re-registered within 20 s (slow in-flight {slow_in_flight:?}); \
                 s1 log:\n{}",
                tail(&s1.logs(), 30)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let after_restart = load.ok();
    wait_for(
        "load to continue after the restart",
        Duration::from_secs(30),
        || load.ok(),
        |n| *n >= after_restart + 200,
    )
    .await;
    let report = load.stop().await;
    let load_end = Instant::now();
    // Only the two held requests remain counted.
    let exact_after_load = cp.wait_usage(2, 2, Duration::from_secs(20)).await;
    slow.hold_requests(false);
    for h in held {
        let r = within("a held request", SOON, h).await.unwrap();
        assert!(r.is_ok(), "held request failed: {r:?}");
    }
    cp.wait_usage(0, 0, Duration::from_secs(20)).await;
    let zero_after_load = load_end.elapsed();

    // Both sidecars are back on the control plane with one session each.
    let mut names: Vec<String> = cp
        .sessions()
        .await
        .expect("control plane answers")
        .into_iter()
        .map(|s| s.name)
        .collect();
    names.sort();
    assert_eq!(names, ["s1", "s2"], "sessions after the restart");
    for u in &urls {
        let connected =
            sidecar_metric(&http, u, "switchyard_sidecar_control_plane_connected", &[]).await;
        assert_eq!(
            connected, 1.0,
            "{u} does not report the control plane connected"
        );
    }
    let mut degraded = 0.0;
    for u in &urls {
        degraded +=
            sidecar_metric(&http, u, "switchyard_sidecar_degraded_decisions_total", &[]).await;
    }
    println!(
        "control plane killed: {} requests ok, {} failed; {served_during_outage} served during a \
         {outage:?} outage; {degraded} degraded decisions; held leases re-registered {reregistered:?} \
         after restart; usage exact {exact_after_load:?} and zero {zero_after_load:?} after the \
         load; slowest request {:?}",
        report.ok,
        report.failures.len(),
        report.max_latency
    );
    assert!(
        report.failures.is_empty(),
        "{} client requests failed (first 10): {:#?}\ns1 log:\n{}",
        report.failures.len(),
        &report.failures[..report.failures.len().min(10)],
        tail(&s1.logs(), 40)
    );
    assert!(degraded > 0.0, "no sidecar reported a degraded decision");
    // Backend delay 20 ms, choose deadline 50 ms: a request that waited for
    // a dead control plane much longer than that was not decided locally.
    assert!(
        report.max_latency < Duration::from_secs(1),
        "slowest request took {:?}",
        report.max_latency
    );
}

/// A sidecar started while the control plane is down has no cluster state
/// to route on. Given the cluster's config, it probes the endpoints itself
/// and serves (degraded, counting its own requests against each
/// endpoint's limit); when the control plane comes up, the lease it holds is registered there
/// and its choices go through the control plane again. Without endpoints
/// in its config it refuses with 503, naming the problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sidecar_started_without_the_control_plane_routes_on_its_own_probes() {
    let a = FakeBackend::start(ollama_fake(&["m:latest"]).label("a")).await;
    let mut config = process_config();
    config.endpoint(entry(&a, 1));
    let mut cp = CpProcess::start(&config).await;
    cp.kill();
    let s1 = sidecar_process(&cp.url(), &config, "s1").await;
    let bare = sidecar_process(&cp.url(), &process_config(), "bare").await;
    let http = http_client();
    let degraded = |base: String| {
        let http = http.clone();
        async move {
            sidecar_metric(
                &http,
                &base,
                "switchyard_sidecar_degraded_decisions_total",
                &[],
            )
            .await
        }
    };

    // It starts serving once its own first probe round is in: from the
    // first request on, it is healthy, lists and serves (no empty
    // `/api/tags` while the probe is still out).
    let started = Instant::now();
    let health = http
        .get(format!("{}/health", s1.url()))
        .send()
        .await
        .map_or(0, |r| r.status().as_u16());
    assert_eq!(health, 200, "first /health without the control plane");
    let tags = get_text(&http, &format!("{}/api/tags", s1.url()))
        .await
        .unwrap_or_default();
    // The backend's own item (size, digest), from the sidecar's probes.
    let tags: Value = serde_json::from_str(&tags).unwrap_or_else(|e| panic!("{e}: {tags}"));
    let item = &tags["models"][0];
    assert_eq!(item["name"], "m:latest", "/api/tags: {tags}");
    assert!(item["size"].as_u64().unwrap_or(0) > 0, "/api/tags: {tags}");
    assert_eq!(
        item["digest"].as_str().unwrap_or("").len(),
        64,
        "/api/tags: {tags}"
    );
    let answer = chat_once(&http, &format!("{}/api/chat", s1.url()), &chat("m", "hi")).await;
    assert!(
        answer.is_ok(),
        "request without the control plane: {answer:?}"
    );
    let first_answer = started.elapsed();
    let own_probes = |base: String| {
        let http = http.clone();
        async move { sidecar_metric(&http, &base, "switchyard_sidecar_own_probes", &[]).await }
    };
    assert_eq!(own_probes(s1.url()).await, 1.0, "own-probes gauge");
    assert_eq!(
        own_probes(bare.url()).await,
        0.0,
        "own-probes gauge, no endpoints"
    );
    assert_eq!(state_source(&http, &s1.url()).await, "own_probes");
    assert_eq!(state_source(&http, &bare.url()).await, "none");
    assert!(degraded(s1.url()).await >= 1.0, "not counted as degraded");

    // A request held at the backend: the lease it holds was granted
    // locally, and must be counted by the control plane once it is up.
    a.hold_requests(true);
    let held = {
        let http = http.clone();
        let url = format!("{}/api/chat", s1.url());
        tokio::spawn(async move { chat_once(&http, &url, &chat("m", "held")).await })
    };
    assert!(
        a.wait_for_waiting(1, SOON).await,
        "held request never reached a"
    );

    // The same without endpoints of its own: a 503 that says why.
    let refused = http
        .post(format!("{}/api/chat", bare.url()))
        .json(&chat("m", "hi"))
        .send()
        .await
        .expect("bare sidecar answers");
    let status = refused.status().as_u16();
    let body = refused.text().await.unwrap_or_default();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no cluster state"), "{body}");

    // The control plane comes up: the held lease is registered there, and
    // the next request is decided by it, not locally.
    cp.restart().await;
    wait_for_async(
        "the held lease to be registered: (sessions, in flight)",
        SOON,
        || async { cp.state().await.map(|s| (s.sessions, s.total_in_flight())) },
        |in_flight| in_flight.is_some_and(|(sessions, n)| sessions >= 1 && n == 1),
    )
    .await;
    a.hold_requests(false);
    let held = within("the held request", SOON, held).await.unwrap();
    assert!(held.is_ok(), "held request: {held:?}");
    cp.wait_usage(0, 0, SOON).await;
    let before = degraded(s1.url()).await;
    let answer = chat_once(&http, &format!("{}/api/chat", s1.url()), &chat("m", "back")).await;
    assert!(
        answer.is_ok(),
        "request after the control plane came up: {answer:?}"
    );
    assert_eq!(
        degraded(s1.url()).await,
        before,
        "decided locally although the control plane is up"
    );
    // Its own probes stop once it follows the control plane's state again
    // (the follower reconnects within its backoff, at most 2 s).
    wait_until("the sidecar's own probes to stop", SOON, || {
        s1.logs().contains("stopped probing the endpoints")
    })
    .await;
    assert_eq!(own_probes(s1.url()).await, 0.0, "own-probes gauge after");
    assert_eq!(state_source(&http, &s1.url()).await, "control_plane");
    println!(
        "started without the control plane: first answer {first_answer:?} after the sidecar started"
    );
}

/// In a long control-plane outage the last cluster state goes stale: a
/// backend that died since still looks healthy in it, and every request
/// sent there pays a failed attempt before its retry. Once the control
/// plane has been gone for a session TTL, the sidecar probes the endpoints
/// itself, stops trying the dead one, and hands back to the control plane
/// when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_control_plane_outage_sidecar_probes_itself_and_avoids_a_backend_that_died() {
    let a = FakeBackend::start(ollama_fake(&["m:latest"]).label("a")).await;
    let b = FakeBackend::start(ollama_fake(&["m:latest"]).label("b")).await;
    let mut config = process_config();
    config
        .set("session_ttl", "2")
        .set("keepalive_interval", "0.5");
    config.endpoint(entry(&a, 64)).endpoint(entry(&b, 64));
    let mut cp = CpProcess::start(&config).await;
    let s1 = sidecar_process(&cp.url(), &config, "s1").await;
    wait_cp_ready(&cp, &[&a, &b], 1, &[s1.url()], &["m:latest"]).await;
    let http = http_client();
    let base = s1.url();
    let url = format!("{base}/api/chat");
    let retries = || sidecar_metric(&http, &base, "switchyard_sidecar_retries_total", &[]);
    let send = |n: usize, what: &'static str| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            for i in 0..n {
                let answer = chat_once(&http, &url, &chat("m", what)).await;
                assert!(answer.is_ok(), "{what} request {i}: {answer:?}");
            }
        }
    };

    assert_eq!(state_source(&http, &base).await, "control_plane");
    cp.kill();
    b.shutdown().await;
    // On the stale state `b` is still a candidate: requests reach it, fail
    // to connect and are retried on `a` (no client sees it).
    let before = retries().await;
    send(20, "stale").await;
    let on_stale_state = retries().await - before;
    assert_eq!(state_source(&http, &base).await, "last_known");

    // Routing on its own probes once their first round is in.
    wait_for_async(
        "the sidecar to route on its own probes (gauge)",
        SOON,
        || sidecar_metric(&http, &base, "switchyard_sidecar_own_probes", &[]),
        |gauge| *gauge == 1.0,
    )
    .await;
    assert!(
        s1.logs()
            .contains("control plane gone longer than a session TTL"),
        "why it probes is not logged"
    );
    assert_eq!(state_source(&http, &base).await, "own_probes");
    let before = retries().await;
    send(40, "own probes").await;
    let on_own_probes = retries().await - before;
    println!(
        "long outage: {on_stale_state} of 20 requests retried on the stale state, {on_own_probes} of 40 on the sidecar's own probes"
    );
    assert!(
        on_stale_state > 0.0,
        "the dead backend was never tried on the stale state"
    );
    assert_eq!(on_own_probes, 0.0, "the dead backend was still tried");

    cp.restart().await;
    wait_until(
        "the sidecar to hand back to the control plane",
        SOON,
        || s1.logs().contains("stopped probing the endpoints"),
    )
    .await;
    send(5, "after").await;
    cp.wait_usage(0, 0, SOON).await;
}

/// A restarted control plane starts with an empty affinity table. Each
/// sidecar offers the conversations it remembers when its new session
/// opens, so a conversation opened through one sidecar before the restart
/// continues on the same backend after it, even through another sidecar.
/// Without the offer each second turn would be placed anew (two equal
/// backends, random tie-break: all eight kept by chance 1 in 256).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_keep_their_backend_across_a_control_plane_restart() {
    let a = FakeBackend::start(ollama_fake(&["m:latest"]).label("a")).await;
    let b = FakeBackend::start(ollama_fake(&["m:latest"]).label("b")).await;
    let mut config = process_config();
    config.set("conversation_affinity", "true");
    for f in [&a, &b] {
        config.endpoint(entry(f, 64));
    }
    let mut cp = CpProcess::start(&config).await;
    let s1 = sidecar_process(&cp.url(), &config, "s1").await;
    let s2 = sidecar_process(&cp.url(), &config, "s2").await;
    wait_cp_ready(&cp, &[&a, &b], 2, &[s1.url(), s2.url()], &["m:latest"]).await;
    let http = http_client();
    let served = || [a.model_requests("m"), b.model_requests("m")];
    let turn = |conversation: usize, second: bool| {
        let mut messages = vec![
            json!({"role": "system", "content": format!("assistant {conversation}")}),
            json!({"role": "user", "content": format!("conversation {conversation} opens")}),
        ];
        if second {
            messages.push(json!({"role": "assistant", "content": "tok0 tok1"}));
            messages.push(json!({"role": "user", "content": "and then?"}));
        }
        json!({"model": "m", "stream": false, "messages": messages})
    };
    let send = |sidecar: String, body: Value| {
        let http = http.clone();
        async move {
            let before = served();
            let r = chat_once(&http, &format!("{sidecar}/api/chat"), &body).await;
            assert!(r.is_ok(), "{r:?}");
            let after = served();
            assert_eq!(
                after.iter().sum::<u64>(),
                before.iter().sum::<u64>() + 1,
                "one backend serves each turn"
            );
            usize::from(after[1] > before[1])
        }
    };

    let mut first = Vec::new();
    for c in 0..8 {
        first.push(send(s1.url(), turn(c, false)).await);
    }
    cp.kill();
    cp.restart().await;
    let restarted = Instant::now();
    wait_for_async(
        "the restarted control plane to hold the eight conversations",
        Duration::from_secs(20),
        || cp.state(),
        |s| {
            s.as_ref()
                .is_some_and(|s| s.affinity_entries == 8 && s.sessions == 2)
        },
    )
    .await;
    println!(
        "affinity back {:?} after the control plane restarted",
        restarted.elapsed()
    );
    for (c, backend) in first.iter().enumerate() {
        assert_eq!(
            send(s2.url(), turn(c, true)).await,
            *backend,
            "conversation {c} moved after the restart; s1 log:\n{}",
            tail(&s1.logs(), 20)
        );
    }
    assert!(
        s1.logs()
            .contains("conversation affinity offered to the control plane"),
        "s1 log:\n{}",
        tail(&s1.logs(), 20)
    );
    cp.wait_usage(0, 0, SOON).await;
}

/// With `state_file` set, a drain made at run time survives a control-plane
/// crash: the restarted control plane drains the endpoint again at once,
/// and the sidecar keeps sending nothing there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_survives_a_control_plane_restart_with_a_state_file() {
    let a = FakeBackend::start(ollama_fake(&["m:latest"]).label("a")).await;
    let b = FakeBackend::start(ollama_fake(&["m:latest"]).label("b")).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = process_config();
    config.set(
        "state_file",
        &format!("\"{}\"", dir.path().join("state.json").display()),
    );
    for f in [&a, &b] {
        config.endpoint(entry(f, 64));
    }
    let mut cp = CpProcess::start(&config).await;
    let s1 = sidecar_process(&cp.url(), &config, "s1").await;
    wait_cp_ready(&cp, &[&a, &b], 1, &[s1.url()], &["m:latest"]).await;
    let b_url = endpoint_url(&b);
    let drained = |s: &ClusterState| s.endpoints.iter().any(|e| *e.url == *b_url && e.draining);
    cp.set_draining(&b_url, true).await;
    let state = crash_and_restart(&mut cp).await;
    assert!(
        drained(&state),
        "b is not drained after the restart: {state:?}"
    );
    wait_for_async(
        "the sidecar's session on the restarted control plane",
        Duration::from_secs(20),
        || cp.state(),
        |s| s.as_ref().is_some_and(|s| s.sessions == 1),
    )
    .await;
    let http = http_client();
    let before = b.model_requests("m");
    for i in 0..10 {
        let r = chat_once(
            &http,
            &format!("{}/api/chat", s1.url()),
            &chat("m", &format!("{i}")),
        )
        .await;
        assert!(r.is_ok(), "{r:?}");
    }
    assert_eq!(
        b.model_requests("m"),
        before,
        "a drained endpoint got requests"
    );
    // Undrained, saved too.
    cp.set_draining(&b_url, false).await;
    let state = crash_and_restart(&mut cp).await;
    assert!(!drained(&state), "b still drained after undrain: {state:?}");
}

/// SIGKILL, restart on the same address, and its first cluster state.
async fn crash_and_restart(cp: &mut CpProcess) -> ClusterState {
    cp.kill();
    cp.restart().await;
    wait_for_async(
        "the restarted control plane to answer",
        SOON,
        || cp.state(),
        Option::is_some,
    )
    .await
    .expect("answered")
}

// ------------------------------------------------------ 2. sidecar killed

/// SIGKILL of a sidecar holding a request: its lease ends with its session
/// (TTL 2 s) and the slot serves a request through another sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sidecar_killed_with_request_in_flight_frees_its_slot_within_the_ttl() {
    let a = FakeBackend::start(ollama_fake(&["m:latest"]).label("a")).await;
    let b = FakeBackend::start(ollama_fake(&["m:latest"]).label("b")).await;
    let mut config = process_config();
    config
        .set("session_ttl", "2")
        .set("keepalive_interval", "0.5")
        .set("priority_routing", "true");
    config.endpoint(entry(&a, 1)).endpoint(entry(&b, 1));
    let cp = CpProcess::start(&config).await;
    let mut s1 = sidecar_process(&cp.url(), &config, "s1").await;
    let s2 = sidecar_process(&cp.url(), &config, "s2").await;
    wait_cp_ready(&cp, &[&a, &b], 2, &[s1.url(), s2.url()], &["m:latest"]).await;
    let http = http_client();
    a.hold_requests(true);
    b.hold_requests(true);

    let send = |base: String, text: &'static str| {
        let http = http.clone();
        tokio::spawn(async move {
            chat_once(&http, &format!("{base}/api/chat"), &chat("m", text)).await
        })
    };
    // Priority routing: the first request takes `a`, the second `b`.
    let doomed = send(s1.url(), "through s1");
    assert!(
        a.wait_for_waiting(1, SOON).await,
        "s1's request did not reach a"
    );
    let survivor = send(s2.url(), "through s2");
    assert!(
        b.wait_for_waiting(1, SOON).await,
        "s2's request did not reach b"
    );
    cp.wait_usage(2, 2, SOON).await;

    s1.kill();
    let killed = Instant::now();
    let freed = cp.wait_usage(1, 1, Duration::from_secs(5)).await;
    let freed_after_kill = killed.elapsed();
    assert!(
        a.wait_for_cancelled(1, SOON).await,
        "backend a never saw s1's request go away"
    );
    let sessions = cp.sessions().await.expect("control plane answers");
    let names: Vec<&str> = sessions.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["s2"], "sessions after s1 was killed");
    assert!(
        freed_after_kill <= Duration::from_millis(2000 + 700),
        "s1's lease was released {freed_after_kill:?} after the kill; session_ttl is 2 s"
    );
    let r = within("the killed sidecar's client", SOON, doomed)
        .await
        .unwrap();
    assert!(
        r.is_err(),
        "a request through a killed sidecar cannot succeed: {r:?}"
    );

    // a's only slot is free again: s2's next request lands there (b is full).
    let reuse = send(s2.url(), "through s2 again");
    assert!(
        a.wait_until(SOON, |f| f.waiting() == 1).await,
        "s2's second request did not reach a"
    );
    a.hold_requests(false);
    b.hold_requests(false);
    let reuse = within("s2's second request", SOON, reuse).await.unwrap();
    assert_eq!(reuse.as_deref(), Ok("a"), "s2's second request");
    let survivor = within("s2's first request", SOON, survivor).await.unwrap();
    assert_eq!(survivor.as_deref(), Ok("b"), "s2's first request");
    cp.wait_usage(0, 0, SOON).await;
    println!(
        "sidecar killed: lease freed {freed_after_kill:?} after SIGKILL (polled {freed:?}); \
         slot reused by s2"
    );
}

// ---------------------------------------------- 3. failing backends

/// Two backends (`a`, `b`), two in-process sidecars, the config keys
/// `settings` on top of the test defaults; warmed up with 40 sequential
/// chats, which both backends must have answered.
async fn two_backend_cluster(settings: &[(&str, &str)]) -> Cluster {
    let mut builder = Cluster::builder()
        .backend_with(
            ollama_fake(&["m:latest"]).label("a").record_capacity(0),
            BackendOptions::max_concurrent(8),
        )
        .backend_with(
            ollama_fake(&["m:latest"]).label("b").record_capacity(0),
            BackendOptions::max_concurrent(8),
        )
        .sidecars(2);
    for (key, value) in settings {
        builder = builder.set(key, value);
    }
    let c = builder.start().await;
    let warm = sequential(&c, 40, "warm-up").await;
    assert!(
        warm.iter().any(|l| l == "a") && warm.iter().any(|l| l == "b"),
        "{warm:?}"
    );
    c
}

/// Sends `n` sequential chats alternating sidecars; panics on any failure.
/// Returns the backend label of each answer.
async fn sequential(c: &Cluster, n: usize, what: &str) -> Vec<String> {
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let url = format!("{}/api/chat", c.url(i % c.sidecars.len()));
        match chat_once(c.http(), &url, &chat("m", &format!("{what} {i}"))).await {
            Ok(label) => labels.push(label),
            Err(e) => panic!("{what}: request {i} failed: {e}"),
        }
    }
    labels
}

/// Switches backend `a` to `mode`, runs 300 sequential requests, checks
/// every one succeeds and `a` sees at most 5 % of them; then heals it and
/// checks it gets traffic again.
async fn failing_backend_scenario(mode: FailureMode) {
    let c = two_backend_cluster(&[]).await;
    let a = c.backend(0);
    let before = a.request_count("/api/chat");
    a.set_failure(mode);
    let started = Instant::now();
    let n = 300;
    let labels = sequential(&c, n, "after the switch").await;
    let took = started.elapsed();
    let to_a = a.request_count("/api/chat") - before;
    let share = to_a as f64 / n as f64 * 100.0;
    println!(
        "{mode:?}: {n} requests in {took:?}, all ok; failing backend received {to_a} ({share:.2} %); \
         retries absorbed every failure"
    );
    assert!(
        labels.iter().all(|l| l == "b"),
        "answers not from b: {labels:?}"
    );
    assert!(
        share <= 5.0,
        "failing backend received {to_a} of {n} requests ({share:.1} %) after the switch"
    );
    a.set_failure(FailureMode::None);
    let healed = Instant::now();
    let back = back_in_rotation(&c, "a").await;
    println!(
        "{mode:?}: healed backend serves again {back:?} after healing (checked {:?})",
        healed.elapsed()
    );
    c.wait_usage(0).await;
}

/// Sequential requests until one is answered by `label`; the time it took.
async fn back_in_rotation(c: &Cluster, label: &str) -> Duration {
    let start = Instant::now();
    let mut i = 0;
    loop {
        let url = format!("{}/api/chat", c.url(i % c.sidecars.len()));
        match chat_once(c.http(), &url, &chat("m", "recovery")).await {
            Ok(l) if l == label => return start.elapsed(),
            Ok(_) => {}
            Err(e) => panic!("request {i} during recovery failed: {e}"),
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "backend {label} received no traffic within 20 s of recovering"
        );
        i += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A backend loses a model between two probes (`ollama rm`): the first
/// request sent there gets "model not found", is retried on the other
/// backend, and the control plane then avoids that backend for that model
/// (every sidecar, at once), without counting it as unhealthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backend_that_lost_the_model_gets_one_request_then_none_and_stays_healthy() {
    // Probes far apart: discovery keeps advertising m on a for the whole
    // test; the exclusion outlasts it too.
    let c =
        two_backend_cluster(&[("probe_interval", "60"), ("completion_failure_ttl", "60")]).await;
    let a = c.backend(0);
    let before = a.request_count("/api/chat");
    a.set_models(&[] as &[&str]);
    let labels = sequential(&c, 40, "after the model left a").await;
    assert!(labels.iter().all(|l| l == "b"), "{labels:?}");
    assert_eq!(
        a.request_count("/api/chat") - before,
        1,
        "only the first request after the model left should reach a"
    );
    assert_eq!(cp_releases(&c, Outcome::ModelMissing), 1);
    assert_eq!(
        cp_failure_releases(&c),
        0,
        "a healthy backend is no failure"
    );
    // The cluster state (and so the CLI) says why a is avoided for m.
    let state = c
        .control_plane
        .as_ref()
        .expect("remote-mode cluster")
        .cp
        .state();
    let avoided: Vec<_> = state
        .endpoints
        .iter()
        .map(|e| (e.failing_models.clone(), e.missing_models.clone()))
        .collect();
    assert_eq!(avoided[0].0.len(), 1, "{avoided:?}");
    assert_eq!(avoided[0].1, avoided[0].0, "{avoided:?}");
    assert!(
        avoided[1].0.is_empty() && avoided[1].1.is_empty(),
        "{avoided:?}"
    );
    c.wait_usage(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backend_switched_to_fast_503s_gets_little_traffic_and_no_client_fails() {
    failing_backend_scenario(FailureMode::Status(503)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backend_switched_to_connection_resets_gets_little_traffic_and_no_client_fails() {
    failing_backend_scenario(FailureMode::Reset).await;
}

/// A killed backend: no client fails, no attempt reaches it 2 s after the
/// kill, and after a restart the probes bring it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_backend_stops_receiving_traffic_within_2s_and_probes_bring_it_back() {
    let c = two_backend_cluster(&[]).await;
    let a = c.backend(0);
    let failures_before = cp_failure_releases(&c);
    a.shutdown().await;
    let killed = Instant::now();
    // Record when the last failed attempt (on `a`) was released.
    let mut last_failure_at = None;
    let mut failures = failures_before;
    let mut n = 0;
    while killed.elapsed() < Duration::from_secs(4) {
        let url = format!("{}/api/chat", c.url(n % 2));
        if let Err(e) = chat_once(c.http(), &url, &chat("m", "during the outage")).await {
            panic!("request {n} after the kill failed: {e}");
        }
        n += 1;
        let now = cp_failure_releases(&c);
        if now != failures {
            failures = now;
            last_failure_at = Some(killed.elapsed());
        }
    }
    // Releases are sent in the background: let the last ones land.
    tokio::time::sleep(Duration::from_millis(200)).await;
    if cp_failure_releases(&c) != failures {
        failures = cp_failure_releases(&c);
        last_failure_at = Some(Duration::from_secs(4));
    }
    let attempts_on_dead = failures - failures_before;
    let share = attempts_on_dead as f64 / n as f64 * 100.0;
    println!(
        "killed backend: {n} requests in 4 s, all ok; {attempts_on_dead} attempts hit the dead \
         backend ({share:.2} %); last one {last_failure_at:?} after the kill"
    );
    let last = last_failure_at.unwrap_or_default();
    assert!(
        last <= Duration::from_secs(2),
        "the dead backend was still tried {last:?} after the kill"
    );
    assert!(
        share <= 5.0,
        "{share:.1} % of requests tried the dead backend"
    );

    a.restart().await.unwrap();
    let restarted = Instant::now();
    c.wait_healthy(0, true).await;
    let healthy = restarted.elapsed();
    let back = back_in_rotation(&c, "a").await;
    println!(
        "killed backend: healthy again {healthy:?} after restart, receives traffic {:?} after restart",
        healthy + back
    );
    c.wait_usage(0).await;
}

// --------------------------------------------------- 4. client disconnects

/// The cluster usage must be back to zero this soon after a client leaves.
const CANCEL_TO_ZERO: Duration = Duration::from_millis(100);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_disconnect_mid_stream_cancels_backend_and_frees_usage_within_100ms() {
    let c = Cluster::builder()
        .backend(
            ollama_fake(&["m:latest"])
                .chunks(20)
                .chunk_delay(Duration::from_millis(300)),
        )
        .start()
        .await;
    let resp = c
        .http()
        .post(c.at("/api/chat"))
        .json(&chat_stream("m", "long answer"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let first = within("the first chunk", SOON, body.next()).await;
    assert!(matches!(first, Some(Ok(_))), "{first:?}");
    wait_for("usage 1", SOON, || c.usage_and_leases(), |u| *u == (1, 1)).await;

    drop(body);
    let gone = Instant::now();
    let to_zero = measure_until("usage back to zero", gone, SOON, || {
        c.usage_and_leases() == (0, 0)
    })
    .await;
    let backend = c.backend(0);
    let cancelled = measure_until("the backend to see the cancellation", gone, SOON, || {
        backend.cancelled_count() >= 1
    })
    .await;
    println!(
        "mid-stream disconnect: usage zero after {to_zero:?}; backend saw the cancel after {cancelled:?}"
    );
    assert!(
        to_zero <= CANCEL_TO_ZERO,
        "usage took {to_zero:?} to reach zero after the disconnect"
    );
    assert_eq!(backend.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_disconnect_before_first_byte_cancels_backend_and_frees_usage_within_100ms() {
    let c = Cluster::builder()
        .backend(ollama_fake(&["m:latest"]))
        .start()
        .await;
    let backend = c.backend(0);
    backend.hold_requests(true);
    let http = c.http().clone();
    let url = c.at("/api/chat");
    let client =
        tokio::spawn(
            async move { post_json(&http, &url, &chat_stream("m", "never answered")).await },
        );
    assert!(
        backend.wait_for_waiting(1, SOON).await,
        "request never reached the backend"
    );
    wait_for("usage 1", SOON, || c.usage_and_leases(), |u| *u == (1, 1)).await;

    client.abort();
    let _ = client.await;
    let gone = Instant::now();
    let to_zero = measure_until("usage back to zero", gone, Duration::from_secs(5), || {
        c.usage_and_leases() == (0, 0)
    })
    .await;
    let cancelled = measure_until("the backend to see the cancellation", gone, SOON, || {
        backend.cancelled_count() >= 1
    })
    .await;
    println!(
        "pre-first-byte disconnect: usage zero after {to_zero:?}; backend saw the cancel after {cancelled:?}"
    );
    assert!(
        to_zero <= CANCEL_TO_ZERO,
        "usage took {to_zero:?} to reach zero after the disconnect"
    );
    backend.hold_requests(false);
    assert_eq!(backend.waiting(), 0);
}

/// Clients that leave within the first 0–3 ms — while the sidecar is still
/// waiting for the control plane's choice — must not leave leases behind.
/// (Found by the soak: the remote router drops its in-flight
/// `ChooseEndpoint` call with the request, so a lease the control plane
/// grants for it is never released while the session lives.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_disconnect_while_the_sidecar_chooses_leaks_no_lease() {
    let c = Cluster::builder()
        .backend_with(
            ollama_fake(&["m:latest"]).record_capacity(0),
            BackendOptions::max_concurrent(4),
        )
        .start()
        .await;
    let url = c.at("/api/chat");
    let n = 400u64;
    for i in 0..n {
        let send = c.http().post(&url).json(&chat("m", "leaving")).send();
        let _ = tokio::time::timeout(Duration::from_micros(i * 7919 % 3000), send).await;
    }
    let left = Instant::now();
    let deadline = left + SOON;
    let (usage, local) = loop {
        let usage = c.usage_and_leases();
        let local = c.sidecars[0].router().local_in_flight();
        if usage == (0, 0) || Instant::now() > deadline {
            break (usage, local);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let stats = c.control_plane.as_ref().unwrap().cp.stats();
    println!(
        "{n} early leaves: control plane (in-flight, leases) {usage:?} after {:?}; the sidecar \
         itself holds {local}; granted {}, ended {}",
        left.elapsed(),
        stats.leases_granted,
        stats.leases_released
    );
    assert_eq!(
        usage,
        (0, 0),
        "leases leaked at the control plane by clients that left during the choice (the sidecar \
         holds {local} itself); {stats:?}"
    );
}

// ---------------------------------------------------------- 5. timeouts

fn tight_timeouts(
    builder: switchyard_system_tests::ClusterBuilder,
) -> switchyard_system_tests::ClusterBuilder {
    builder.set("priority_routing", "true").set(
        "timeouts.ollama",
        "{connect: 0.3, first_byte: 0.5, idle: 0.5}",
    )
}

/// A backend slower than `first_byte`: released as `first_byte_timeout`,
/// retried on the other backend, the client is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn first_byte_timeout_is_its_own_outcome_and_is_retried() {
    let c = tight_timeouts(Cluster::builder())
        .backend(
            ollama_fake(&["m:latest"])
                .label("slow")
                .delay(Duration::from_secs(3)),
        )
        .backend(ollama_fake(&["m:latest"]).label("fast"))
        .start()
        .await;
    let started = Instant::now();
    let label = chat_once(c.http(), &c.at("/api/chat"), &chat("m", "hello")).await;
    let took = started.elapsed();
    assert_eq!(label.as_deref(), Ok("fast"), "answer");
    assert!(
        took >= Duration::from_millis(500),
        "answered in {took:?}: slow backend not tried first?"
    );
    wait_until(
        "the control plane to count a first_byte_timeout release",
        SOON,
        || cp_releases(&c, Outcome::FirstByteTimeout) == 1,
    )
    .await;
    let m = sidecar_metric(
        c.http(),
        &c.url(0),
        "switchyard_sidecar_upstream_errors_total",
        &[("outcome", "first_byte_timeout")],
    )
    .await;
    assert_eq!(m, 1.0, "sidecar first_byte_timeout metric");
    assert_eq!(cp_releases(&c, Outcome::ConnectTimeout), 0);
    assert_eq!(cp_releases(&c, Outcome::IdleTimeout), 0);
    assert!(
        c.backend(0).wait_for_cancelled(1, SOON).await,
        "slow backend not told to stop"
    );
    println!("first-byte timeout: answered by the other backend after {took:?}");
    c.wait_usage(0).await;
}

/// A stream that stalls longer than `idle`: ended with an error line in
/// the client's format, released as `idle_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_timeout_is_its_own_outcome() {
    let c = tight_timeouts(Cluster::builder())
        .backend(
            ollama_fake(&["m:latest"])
                .chunks(3)
                .chunk_delay(Duration::from_secs(3)),
        )
        .start()
        .await;
    let r = stream(
        c.http()
            .post(c.at("/api/chat"))
            .json(&chat_stream("m", "stall")),
        Framing::Ndjson,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let lines = r.ndjson();
    assert!(lines.len() >= 2, "{}", r.dump());
    let last: &Value = lines.last().unwrap();
    assert!(
        last.get("error").is_some(),
        "stream did not end with an error line: {}",
        r.dump()
    );
    let stalled = r.ended.duration_since(r.chunks[0].at);
    assert!(
        // The sidecar's timer starts before the client sees the chunk.
        stalled >= Duration::from_millis(450) && stalled < Duration::from_millis(2500),
        "stream ended {stalled:?} after the first chunk (idle timeout 0.5 s)"
    );
    wait_until(
        "the control plane to count an idle_timeout release",
        SOON,
        || cp_releases(&c, Outcome::IdleTimeout) == 1,
    )
    .await;
    assert_eq!(cp_releases(&c, Outcome::FirstByteTimeout), 0);
    let m = sidecar_metric(
        c.http(),
        &c.url(0),
        "switchyard_sidecar_upstream_errors_total",
        &[("outcome", "idle_timeout")],
    )
    .await;
    assert_eq!(m, 1.0, "sidecar idle_timeout metric");
    println!("idle timeout: stream ended {stalled:?} after its first chunk with {last}");
    c.wait_usage(0).await;
}

/// A backend address whose connects hang: released as `connect_timeout`,
/// retried on the other backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connect_timeout_is_its_own_outcome_and_is_retried() {
    // Probes only at start, so the endpoint stays routable once its
    // address turns into a black hole.
    let c = tight_timeouts(Cluster::builder())
        .set("probe_interval", "60")
        .backend(ollama_fake(&["m:latest"]).label("doomed"))
        .backend(ollama_fake(&["m:latest"]).label("fine"))
        .start()
        .await;
    let doomed = c.backend(0);
    doomed.shutdown().await;
    let _hole = BlackHole::bind(doomed.addr()).await;
    let started = Instant::now();
    let label = chat_once(c.http(), &c.at("/api/chat"), &chat("m", "hello")).await;
    let took = started.elapsed();
    assert_eq!(label.as_deref(), Ok("fine"), "answer");
    wait_until(
        "the control plane to count a connect_timeout release",
        SOON,
        || cp_releases(&c, Outcome::ConnectTimeout) == 1,
    )
    .await;
    assert_eq!(cp_releases(&c, Outcome::FirstByteTimeout), 0);
    assert_eq!(cp_releases(&c, Outcome::ConnectError), 0);
    let m = sidecar_metric(
        c.http(),
        &c.url(0),
        "switchyard_sidecar_upstream_errors_total",
        &[("outcome", "connect_timeout")],
    )
    .await;
    assert_eq!(m, 1.0, "sidecar connect_timeout metric");
    println!("connect timeout: answered by the other backend after {took:?}");
    c.wait_usage(0).await;
}

// ----------------------------------------------------------- 6. shutdown

/// SIGTERM to a sidecar process with a stream in flight: the listener
/// closes, the stream finishes completely, the process exits 0, and the
/// control plane shows the session closed (not expired) and usage 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_the_stream_finish_closes_the_session_and_exits_0() {
    let fake = FakeBackend::start(
        FakeConfig::new(FakeMode::Ollama)
            .models(&["m:latest"])
            .all_loaded()
            .chunks(20)
            .chunk_delay(Duration::from_millis(100)),
    )
    .await;
    let mut config = process_config();
    config
        .set("shutdown_grace", "10")
        .set("session_ttl", "10")
        .set("keepalive_interval", "1");
    config.endpoint(entry(&fake, 4));
    let cp = CpProcess::start(&config).await;
    let mut sidecar = sidecar_process(&cp.url(), &config, "leaving").await;
    wait_cp_ready(&cp, &[&fake], 1, &[sidecar.url()], &["m:latest"]).await;
    let http = http_client();
    let url = format!("{}/api/chat", sidecar.url());
    let reader = {
        let http = http.clone();
        tokio::spawn(async move {
            stream(
                http.post(url).json(&chat_stream("m", "long")),
                Framing::Ndjson,
            )
            .await
        })
    };
    assert!(
        fake.wait_for_in_flight(1, SOON).await,
        "stream never reached the backend"
    );
    cp.wait_usage(1, 1, SOON).await;

    let pid = sidecar.pid().unwrap();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let term = Instant::now();
    let addr = sidecar.addr;
    let refused = {
        let deadline = term + Duration::from_secs(2);
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                break term.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "the sidecar still accepts connections 2 s after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let r = within("the in-flight stream", Duration::from_secs(15), reader)
        .await
        .unwrap();
    let lines = r.ndjson();
    assert_eq!(r.status, 200, "{}", r.dump());
    assert!(
        r.transport_error.is_none() && r.trailing.is_empty(),
        "{}",
        r.dump()
    );
    let text: String = lines
        .iter()
        .filter_map(|l| l["message"]["content"].as_str())
        .collect();
    let expected: String = (0..20)
        .map(|i| {
            if i == 0 {
                "tok0".to_owned()
            } else {
                format!(" tok{i}")
            }
        })
        .collect();
    assert_eq!(text, expected, "stream content: {}", r.dump());
    assert_eq!(lines.last().unwrap()["done"], json!(true), "{}", r.dump());
    let finished = r.ended.duration_since(term);

    let status = sidecar.wait_exit(Duration::from_secs(15)).await;
    let exited = term.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status; log:\n{}",
        tail(&sidecar.logs(), 30)
    );
    let sessions = cp.sessions().await.expect("control plane answers");
    assert!(
        sessions.is_empty(),
        "sessions after the sidecar left: {sessions:?}"
    );
    cp.wait_usage(0, 0, Duration::from_millis(500)).await;
    let metrics = cp.metrics().await.expect("control-plane metrics");
    assert_eq!(
        metric_sum(&metrics, "switchyard_cp_sessions_expired_total", &[]),
        0.0,
        "the session expired instead of being closed"
    );
    println!(
        "SIGTERM: listener closed {refused:?} after the signal, stream finished {finished:?} after, \
         process exited 0 after {exited:?}; session closed, usage 0"
    );
}
