//! The test per-process routers fail: three sidecars share one control
//! plane, so six concurrent requests over three backends limited to two
//! each never put a third request on any backend.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use switchyard_system_tests::{
    BackendOptions, Cluster, SOON,
    client::post_json,
    ollama_fake,
    wait::{wait_for, within},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn six_requests_over_three_sidecars_never_exceed_two_per_backend() {
    let mut builder = Cluster::builder().sidecars(3);
    for label in ["a", "b", "c"] {
        builder = builder.backend_with(
            ollama_fake(&["m:latest"]).label(label),
            BackendOptions::max_concurrent(2),
        );
    }
    let c = builder.start().await;
    for b in &c.backends {
        b.hold_requests(true);
    }

    // Two requests through each sidecar, all at once.
    let mut requests = Vec::new();
    for i in 0..6 {
        let http = c.http().clone();
        let url = format!("{}/api/chat", c.url(i % 3));
        requests.push(tokio::spawn(async move {
            post_json(
                &http,
                &url,
                &json!({"model": "m", "stream": false,
                        "messages": [{"role": "user", "content": format!("request {i}")}]}),
            )
            .await
        }));
    }

    // All six reach a backend and are held there.
    let held = wait_for(
        "all six requests to be held by the backends",
        SOON,
        || c.backends.iter().map(|b| b.waiting()).collect::<Vec<_>>(),
        |w| w.iter().sum::<usize>() == 6,
    )
    .await;
    assert_eq!(held, [2, 2, 2], "requests per backend while held");
    c.wait_usage(6).await;
    for b in &c.backends {
        b.hold_requests(false);
    }
    for r in requests {
        let r = within("a spread request", SOON, r).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json()["message"]["content"], json!("tok0 tok1 tok2"));
    }
    let peaks: Vec<usize> = c.backends.iter().map(|b| b.peak_in_flight()).collect();
    assert!(
        peaks.iter().all(|p| *p <= 2),
        "a backend limited to 2 saw more at once: peaks {peaks:?}"
    );
    let served: Vec<u64> = c.backends.iter().map(|b| b.model_requests("m")).collect();
    assert_eq!(served, [2, 2, 2], "requests served per backend");
    c.wait_usage(0).await;
    c.shutdown().await;
}

/// A slot freed through one sidecar is free at once for a choice made
/// through another: two backends limited to one request each, one kept
/// busy by a held request, and requests alternating between two sidecars,
/// each sent the instant the previous answer arrived, all go to the free
/// backend. (A release used to wait up to 5 ms for a choose of its own
/// sidecar to ride on; a request in that window found both backends full
/// and could be queued behind the held one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_freed_through_one_sidecar_is_free_at_once_through_another() {
    let mut builder = Cluster::builder().sidecars(2);
    for label in ["a", "b"] {
        builder = builder.backend_with(
            ollama_fake(&["m:latest"]).label(label),
            BackendOptions::max_concurrent(1),
        );
    }
    let c = builder.start().await;
    let body = json!({"model": "m", "stream": false,
                      "messages": [{"role": "user", "content": "hi"}]});
    for b in &c.backends {
        b.hold_requests(true);
    }
    let held = tokio::spawn({
        let (http, url, body) = (
            c.http().clone(),
            format!("{}/api/chat", c.url(0)),
            body.clone(),
        );
        async move { post_json(&http, &url, &body).await }
    });
    let waiting = wait_for(
        "one request held",
        SOON,
        || c.backends.iter().map(|b| b.waiting()).collect::<Vec<_>>(),
        |w| w.iter().sum::<usize>() == 1,
    )
    .await;
    let busy = waiting.iter().position(|&n| n == 1).unwrap();
    let free = 1 - busy;
    c.backends[free].hold_requests(false);

    for i in 0..20 {
        let url = format!("{}/api/chat", c.url(i % 2));
        let r = within(
            "a request the free backend should serve",
            SOON,
            post_json(c.http(), &url, &body),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    assert_eq!(c.backends[free].model_requests("m"), 20);
    assert_eq!(c.backends[busy].peak_in_flight(), 1);

    c.backends[busy].hold_requests(false);
    let r = within("the held request", SOON, held).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text);
    c.wait_usage(0).await;
    c.shutdown().await;
}
