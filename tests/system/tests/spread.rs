//! The test per-process routers fail: three sidecars share one control
//! plane, so six concurrent requests over three backends limited to two
//! each never put a third request on any backend.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use switchyard_system_tests::{
    BackendOptions, Cluster, FakeConfig, FakeMode, SOON,
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

/// With a limit above one, the release that frees a slot at a full
/// endpoint need not be the lease that filled it: b allows two requests,
/// takes A then B (full), and A ends first. A's release is sent, and
/// applied, before A's answer reaches the client, because the cluster
/// state shows b full; so the client's next request, through the other
/// sidecar, finds b's freed slot instead of queueing on a (full, held).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_freed_at_a_full_endpoint_is_free_at_once_whichever_lease_filled_it() {
    let c = Cluster::builder()
        .sidecars(2)
        .backend_with(
            ollama_fake(&["m:latest"]).label("a"),
            BackendOptions::max_concurrent(1),
        )
        .backend_with(
            // Not loaded: a, loaded and free, takes the first request.
            FakeConfig::new(FakeMode::Ollama)
                .models(&["m:latest"])
                .label("b"),
            BackendOptions::max_concurrent(2),
        )
        .start()
        .await;
    let (a, b) = (&c.backends[0], &c.backends[1]);
    let body = |i: usize| {
        json!({"model": "m", "stream": false,
               "messages": [{"role": "user", "content": format!("request {i}")}]})
    };
    let send = |sidecar: usize, i: usize| {
        let (http, url, body) = (
            c.http().clone(),
            format!("{}/api/chat", c.url(sidecar)),
            body(i),
        );
        tokio::spawn(async move { post_json(&http, &url, &body).await })
    };
    // a is full: one request held there for the whole test.
    a.hold_requests(true);
    let held = send(0, 0);
    wait_for("a request held on a", SOON, || a.waiting(), |&w| w == 1).await;
    // Every later request goes to b while it has a free slot.
    b.set_delay(std::time::Duration::from_millis(300));
    for round in 0..5 {
        let first = send(0, 10 * round + 1);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let second = send(0, 10 * round + 2);
        let r = within("the first of two on b", SOON, first).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text);
        // At once, through the other sidecar: b has a free slot again.
        let r = within(
            "a request b's freed slot should take",
            SOON,
            post_json(
                c.http(),
                &format!("{}/api/chat", c.url(1)),
                &body(10 * round + 3),
            ),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let r = within("the second of two on b", SOON, second)
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text);
    }
    assert_eq!(a.waiting(), 1);
    assert_eq!(a.peak_in_flight(), 1);
    assert!(
        b.peak_in_flight() <= 2,
        "b allows 2: {}",
        b.peak_in_flight()
    );
    a.hold_requests(false);
    assert_eq!(
        within("the held request", SOON, held).await.unwrap().status,
        200
    );
    c.wait_usage(0).await;
    c.shutdown().await;
}

/// Reads an Ollama stream until its `done:true` line and returns then,
/// before the body's end (a client acting on the final chunk), with the
/// task that reads the rest (the connection stays open meanwhile).
async fn until_done(
    http: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> tokio::task::JoinHandle<()> {
    let mut response = http.post(url).json(body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut seen = Vec::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        seen.extend_from_slice(&chunk);
        if String::from_utf8_lossy(&seen).contains("\"done\":true") {
            return tokio::spawn(async move { while let Ok(Some(_)) = response.chunk().await {} });
        }
    }
    panic!(
        "stream ended without done: {}",
        String::from_utf8_lossy(&seen)
    );
}

/// A stream's lease is released, and applied, before its final chunk goes
/// out: a client that sends its next request the moment it sees
/// `done:true`, through the other sidecar, finds the slot free, even from
/// a backend that keeps the body open a while after that chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_frees_its_slot_before_its_final_chunk() {
    let c = Cluster::builder()
        .sidecars(2)
        .backend_with(
            ollama_fake(&["m:latest"]).label("a"),
            BackendOptions::max_concurrent(1),
        )
        .backend_with(
            FakeConfig::new(FakeMode::Ollama)
                .models(&["m:latest"])
                .label("b"),
            BackendOptions::max_concurrent(1),
        )
        .start()
        .await;
    let (a, b) = (&c.backends[0], &c.backends[1]);
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    b.set_end_delay(std::time::Duration::from_millis(100));
    a.hold_requests(true);
    let held = tokio::spawn({
        let (http, url, body) = (
            c.http().clone(),
            format!("{}/api/chat", c.url(0)),
            body.clone(),
        );
        async move { post_json(&http, &url, &body).await }
    });
    wait_for("a request held on a", SOON, || a.waiting(), |&w| w == 1).await;
    let mut rests = Vec::new();
    for i in 0..20 {
        let url = format!("{}/api/chat", c.url(i % 2));
        rests.push(
            within(
                "a stream the free backend should serve",
                SOON,
                until_done(c.http(), &url, &body),
            )
            .await,
        );
    }
    for rest in rests {
        within("a stream's end", SOON, rest).await.unwrap();
    }
    assert_eq!(b.model_requests("m"), 20);
    assert_eq!(a.peak_in_flight(), 1);
    a.hold_requests(false);
    assert_eq!(
        within("the held request", SOON, held).await.unwrap().status,
        200
    );
    c.wait_usage(0).await;
    c.shutdown().await;
}
