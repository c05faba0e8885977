//! `ollama stop MODEL` through a sidecar: the unload request (empty
//! `/api/generate` or `/api/chat` with `keep_alive: 0`) reaches every Ollama
//! backend that has the model loaded, each with its own backend key, and
//! `/api/ps` no longer lists the model when the answer arrives. Routed to
//! one chosen backend instead, it would leave the model loaded on the
//! others. Ends with the official Python `ollama` client's `ollama stop`
//! equivalent.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};
use switchyard_system_tests::{
    Cluster, FailureMode,
    client::{Framing, ollama_error_text, send, stream},
    ollama_fake, openai_fake,
    python::run_script_ok,
};

const ROUTER_KEY: &str = "router-secret";
const KEY_A: &str = "backend-a-secret";
const NONE: &[&str] = &[];

/// Ollama A (own key, `m` loaded), Ollama B (`m` not loaded), Ollama C
/// (`m` loaded), OpenAI D (`m`); probes hourly, so only the sidecar's
/// re-probe can show the unload in `/api/ps`.
async fn cluster(standalone: bool) -> Cluster {
    let builder = Cluster::builder()
        .backend_with(
            ollama_fake(&["m:latest"]).api_key(KEY_A).label("a"),
            switchyard_system_tests::BackendOptions::api_key(KEY_A),
        )
        .backend(ollama_fake(&["m:latest"]).loaded(NONE).label("b"))
        .backend(ollama_fake(&["m:latest"]).label("c"))
        .backend(openai_fake(&["m"]).label("d"))
        .set("probe_interval", "1h")
        .router_api_key(ROUTER_KEY);
    builder.standalone_if(standalone).start().await
}

fn post(c: &Cluster, path: &str, body: &Value) -> reqwest::RequestBuilder {
    c.http().post(c.at(path)).bearer_auth(ROUTER_KEY).json(body)
}

async fn ps(c: &Cluster) -> Vec<String> {
    let r = send(c.http().get(c.at("/api/ps")).bearer_auth(ROUTER_KEY)).await;
    r.json()["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Requests backend `i` got on `path`, with the bearer key each carried.
fn keys_on(c: &Cluster, i: usize, path: &str) -> Vec<Option<String>> {
    c.backends[i]
        .requests_to(path)
        .iter()
        .map(|r| r.bearer_token().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unload_reaches_every_backend_holding_the_model() {
    for standalone in [true, false] {
        let c = cluster(standalone).await;
        assert_eq!(ps(&c).await, ["m:latest"], "standalone={standalone}");

        // `ollama stop m`: an empty generate with keep_alive 0, streamed by
        // default: one NDJSON line.
        let r = stream(
            post(&c, "/api/generate", &json!({"model": "m", "keep_alive": 0})),
            Framing::Ndjson,
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.dump());
        let lines = r.ndjson();
        assert_eq!(lines.len(), 1, "{}", r.dump());
        assert_eq!(lines[0]["done_reason"], "unload");
        assert_eq!(lines[0]["done"], true);
        assert_eq!(lines[0]["model"], "m");

        // Both holders got it once, each with its own key (none for C) and
        // never the router key; B (not loaded) got nothing.
        assert_eq!(keys_on(&c, 0, "/api/generate"), [Some(KEY_A.to_owned())]);
        assert_eq!(keys_on(&c, 2, "/api/generate"), [None]);
        assert!(c.backends[1].requests_to("/api/generate").is_empty());
        assert!(c.backends[0].loaded_models().is_empty());
        assert!(c.backends[2].loaded_models().is_empty());
        // Re-probed before the answer: `ollama ps` right after shows it gone.
        assert!(ps(&c).await.is_empty(), "standalone={standalone}");
        c.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_unload_names_the_backend_and_chat_unloads_too() {
    let c = cluster(false).await;
    let failing = c.endpoint_url(2);
    c.backends[2].fail_next(1, FailureMode::Status(500));
    let r = send(post(
        &c,
        "/api/chat",
        &json!({"model": "m", "messages": [], "keep_alive": "0s", "stream": false}),
    ))
    .await;
    assert_eq!(r.status, 500, "{}", r.text);
    let error = ollama_error_text(&r);
    assert!(error.contains("unload 'm' failed on 1 of 2"), "{error}");
    assert!(error.contains(&failing), "{error}");
    assert!(!error.contains(&c.endpoint_url(0)), "{error}");
    assert!(c.backends[0].loaded_models().is_empty());

    // Again: only C still holds it; a chat unload, not streamed, is one JSON
    // object with an empty assistant message.
    let r = send(post(
        &c,
        "/api/chat",
        &json!({"model": "m", "messages": [], "keep_alive": 0, "stream": false}),
    ))
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let body = r.json();
    assert_eq!(body["done_reason"], "unload");
    assert_eq!(body["message"], json!({"role": "assistant", "content": ""}));
    assert_eq!(c.backends[0].requests_to("/api/chat").len(), 1);
    assert_eq!(c.backends[2].requests_to("/api/chat").len(), 2);
    assert!(c.backends[2].loaded_models().is_empty());

    let metrics = send(c.http().get(c.at("/metrics")).bearer_auth(ROUTER_KEY))
        .await
        .text;
    for outcome in ["failed", "success"] {
        let line = format!(
            "switchyard_sidecar_model_management_total{{operation=\"unload\",outcome=\"{outcome}\"}} 1"
        );
        assert!(metrics.contains(&line), "{line} missing in:\n{metrics}");
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loaded_nowhere_takes_the_ordinary_path() {
    let c = Cluster::builder()
        .backend(ollama_fake(&["m:latest"]).loaded(NONE).label("a"))
        .backend(ollama_fake(&["m:latest"]).loaded(NONE).label("b"))
        .router_api_key(ROUTER_KEY)
        .start()
        .await;
    let r = send(post(
        &c,
        "/api/generate",
        &json!({"model": "m", "keep_alive": 0, "stream": false}),
    ))
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["done_reason"], "unload");
    let sent: usize = (0..2)
        .map(|i| c.backends[i].requests_to("/api/generate").len())
        .sum();
    assert_eq!(sent, 1, "one chosen backend, as any request");

    // A model nobody has: the usual 404.
    let r = send(post(
        &c,
        "/api/generate",
        &json!({"model": "absent", "keep_alive": 0, "stream": false}),
    ))
    .await;
    assert_eq!(r.status, 404, "{}", r.text);
    c.shutdown().await;
}

/// `ollama stop m` is `generate(model, keep_alive=0)` in the Python client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_ollama_client_stops_a_model_everywhere() {
    let c = cluster(false).await;
    let out = run_script_ok(
        "ollama_stop.py",
        &[&c.url(0), "m"],
        &[("ROUTER_KEY", ROUTER_KEY)],
    )
    .await;
    assert!(out.stdout.contains("all checks passed"), "{}", out.stdout);
    assert!(c.backends[0].loaded_models().is_empty());
    assert!(c.backends[2].loaded_models().is_empty());
    c.shutdown().await;
}
