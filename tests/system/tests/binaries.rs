//! The real binaries as child processes, as an operator runs them: a
//! `fake-model-server`, `switchyard-control-plane` and a remote
//! `switchyard-sidecar`, then a `--standalone` sidecar. Exercises the
//! process harness the fault-injection tests build on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::json;
use switchyard_control_plane::endpoint::EndpointKind;
use switchyard_system_tests::{
    Framing, SOON, TestConfig,
    client::{get, stream},
    cluster::{grpc_cluster_state, wait_grpc_usage},
    config::EndpointEntry,
    process::ChildProcess,
    wait::wait_for_async,
};

fn config_for(fake: &ChildProcess) -> TestConfig {
    let mut config = TestConfig::new();
    config.endpoint(EndpointEntry {
        url: fake.url(),
        kind: EndpointKind::Ollama,
        max_concurrent: Some(2),
        api_key: None,
    });
    config
}

async fn chat_ok(http: &reqwest::Client, base: &str, logs: impl Fn() -> String) {
    // The first request may race discovery: wait until the model is listed.
    wait_for_async(
        "the sidecar to list the fake's model",
        SOON,
        || async { get(http, &format!("{base}/api/tags")).await.text },
        |t| t.contains("m:latest"),
    )
    .await;
    let r = stream(
        http.post(format!("{base}/api/chat")).json(&json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}]
        })),
        Framing::Ndjson,
    )
    .await;
    assert_eq!(r.status, 200, "{}\n--- logs ---\n{}", r.dump(), logs());
    let lines = r.ndjson();
    assert_eq!(lines.last().unwrap()["done"], json!(true), "{}", r.dump());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_binaries_route_a_chat_remote_and_standalone() {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let fake = ChildProcess::fake_model_server("ollama", &["m:latest"], &["--chunks", "3"]).await;
    let config = config_for(&fake);

    let cp = ChildProcess::control_plane(&config).await;
    let mut sidecar = ChildProcess::sidecar_remote(&cp.url(), Some(&config)).await;
    chat_ok(&http, &sidecar.url(), || {
        format!("{}\n{}", cp.logs(), sidecar.logs())
    })
    .await;
    // The control plane process counted the request and released it.
    wait_grpc_usage(&cp.url(), 0).await;
    let state = grpc_cluster_state(&cp.url()).await.unwrap();
    assert_eq!(state.sessions, 1, "{state:?}");
    let served: u64 = state.endpoints[0].usage.iter().map(|u| u.requests).sum();
    assert!(
        served >= 1,
        "the control plane saw no released request: {state:?}"
    );
    // SIGTERM: graceful exit with status 0.
    let status = sidecar.terminate(Duration::from_secs(15)).await;
    assert!(
        status.success(),
        "sidecar exit {status}; logs:\n{}",
        sidecar.logs()
    );

    let standalone = ChildProcess::sidecar_standalone(&config).await;
    chat_ok(&http, &standalone.url(), || standalone.logs()).await;
    let health = get(&http, &format!("{}/health", standalone.url())).await;
    assert_eq!(health.status, 200, "{}", health.text);
}
