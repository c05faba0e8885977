//! The real binaries as child processes, as an operator runs them: a
//! `fake-model-server`, `switchyard-control-plane` and a remote
//! `switchyard-sidecar`, then a `--standalone` sidecar. Exercises the
//! process harness the fault-injection tests build on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::json;
use switchyard_control_plane::{cluster::ClusterState, endpoint::EndpointKind};
use switchyard_proto::v1::{DrainRequest, cluster_client::ClusterClient};
use switchyard_system_tests::{
    SOON, TestConfig,
    client::{chat_ok, get},
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

/// `--control-plane-listen` serves a standalone sidecar's embedded control
/// plane over gRPC, so the `switchyard` CLI works on one machine too: the
/// cluster view, and drains, which the `state_file` keeps across a
/// restart of the sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_sidecar_serves_its_control_plane_to_the_cli() {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let a = ChildProcess::fake_model_server("ollama", &["m:latest"], &[]).await;
    let b = ChildProcess::fake_model_server("ollama", &["m:latest"], &[]).await;
    let state_dir = tempfile::tempdir().unwrap();
    let mut config = config_for(&a);
    config.endpoint(EndpointEntry {
        url: b.url(),
        kind: EndpointKind::Ollama,
        max_concurrent: Some(2),
        api_key: None,
    });
    config.set(
        "state_file",
        &format!("\"{}\"", state_dir.path().join("state.json").display()),
    );
    let (mut sidecar, grpc) = ChildProcess::sidecar_standalone_serving_control_plane(&config).await;
    chat_ok(&http, &sidecar.url(), || sidecar.logs()).await;
    let state = grpc_cluster_state(&grpc).await.unwrap();
    assert_eq!(state.endpoints.len(), 2, "{state:?}");

    let mut cluster = ClusterClient::connect(grpc.clone()).await.unwrap();
    cluster
        .drain(DrainRequest { endpoint: b.url() })
        .await
        .unwrap();
    let served_by_b = |s: &ClusterState| -> u64 {
        s.endpoints
            .iter()
            .find(|e| *e.url == *b.url())
            .map_or(0, |e| e.usage.iter().map(|u| u.requests).sum())
    };
    let before = served_by_b(&grpc_cluster_state(&grpc).await.unwrap());
    for _ in 0..6 {
        chat_ok(&http, &sidecar.url(), || sidecar.logs()).await;
    }
    wait_grpc_usage(&grpc, 0).await;
    let state = grpc_cluster_state(&grpc).await.unwrap();
    assert_eq!(
        served_by_b(&state),
        before,
        "the drained endpoint got requests"
    );

    // Restarted, the sidecar drains b again from the state file.
    sidecar.restart().await;
    let state = wait_for_async(
        "the restarted sidecar's control plane to answer",
        SOON,
        || grpc_cluster_state(&grpc),
        Result::is_ok,
    )
    .await
    .unwrap();
    let drained: Vec<bool> = state.endpoints.iter().map(|e| e.draining).collect();
    assert_eq!(drained, [false, true], "{state:?}\n{}", sidecar.logs());
}

/// `SWITCHYARD_CONTROL_PLANE`, exported for the CLI, conflicts with a
/// sidecar's `--standalone`: the error says where the value came from.
#[tokio::test]
async fn a_conflict_from_the_environment_names_the_variable() {
    use switchyard_system_tests::process::{Binary, binary};
    let output = tokio::process::Command::new(binary(Binary::Sidecar).await)
        .arg("--standalone")
        .env("SWITCHYARD_CONTROL_PLANE", "http://127.0.0.1:9")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(SOON, output)
        .await
        .expect("the sidecar did not exit")
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(
        err.contains("set by the environment variable SWITCHYARD_CONTROL_PLANE"),
        "{err}"
    );
}

/// Every flag also reads an environment variable (DESIGN.md), boolean ones
/// in the usual spellings: `SWITCHYARD_STANDALONE=1` and
/// `SWITCHYARD_CHECK_CONFIG=yes` check a standalone configuration, and the
/// control plane takes `SWITCHYARD_CHECK_CONFIG=on`.
#[tokio::test]
async fn boolean_flags_read_their_environment_variables() {
    use switchyard_system_tests::process::{Binary, binary};
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, "endpoints: [\"http://127.0.0.1:9\"]\n").unwrap();
    for (bin, vars) in [
        (
            Binary::Sidecar,
            [
                ("SWITCHYARD_STANDALONE", "1"),
                ("SWITCHYARD_CHECK_CONFIG", "yes"),
            ],
        ),
        (
            Binary::ControlPlane,
            [
                ("SWITCHYARD_CHECK_CONFIG", "on"),
                ("SWITCHYARD_LOG_FORMAT", "json"),
            ],
        ),
    ] {
        let output = tokio::process::Command::new(binary(bin).await)
            .env("SWITCHYARD_CONFIG", &config)
            .envs(vars)
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(SOON, output)
            .await
            .unwrap_or_else(|_| panic!("{} --check-config did not exit", bin.name()))
            .unwrap();
        let out = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && out.contains("config ok: 1 endpoint: http://127.0.0.1:9"),
            "{}: {:?}\nstdout: {out}\nstderr: {}",
            bin.name(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The spans of a JSON log line (`"spans"`: names from the root down).
fn span_names(line: &serde_json::Value) -> Vec<String> {
    line["spans"]
        .as_array()
        .map(|spans| {
            spans
                .iter()
                .map(|s| s["name"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// With `--log-format json` and debug logs, a request's lines carry its
/// spans in `"spans"` (the JSON format lists only entered spans: a line
/// logged with an explicit `parent` had `"spans":[]`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_list_the_request_spans() {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let fake = ChildProcess::fake_model_server("ollama", &["m:latest"], &["--chunks", "3"]).await;
    let config = config_for(&fake);
    let sidecar = ChildProcess::sidecar_standalone_with(
        &config,
        vec!["--log-format".to_owned(), "json".to_owned()],
        vec![(
            "RUST_LOG".to_owned(),
            "info,switchyard_sidecar=debug".to_owned(),
        )],
    )
    .await;
    chat_ok(&http, &sidecar.url(), || sidecar.logs()).await;
    let unknown = http
        .post(format!("{}/api/chat", sidecar.url()))
        .json(&json!({"model": "nope", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    let logs = sidecar.logs();
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let spans_of = |message: &str| -> Vec<Vec<String>> {
        lines
            .iter()
            .filter(|l| l["message"] == message)
            .map(span_names)
            .collect()
    };
    let request = vec!["request".to_owned()];
    let attempt = vec!["request".to_owned(), "attempt".to_owned()];
    let started = spans_of("response started");
    assert!(
        started.len() >= 2 && started.iter().all(|s| *s == request),
        "{started:?}\n{logs}"
    );
    let released = spans_of("lease released");
    assert!(
        !released.is_empty() && released.iter().all(|s| *s == attempt),
        "{released:?}\n{logs}"
    );
    assert_eq!(spans_of("request refused"), vec![request], "{logs}");
}
