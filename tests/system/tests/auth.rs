//! Router key and backend keys: with `router_api_key` set, a request
//! without a key is 401 and with a wrong one 403 (client format); Bearer and
//! `?api_key=` both work; the client's credentials never reach a backend and
//! each OpenAI-compatible backend gets its own configured key.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use switchyard_system_tests::{
    BackendOptions, Cluster,
    client::{get, ollama_error_text, openai_error_message, send},
    ollama_fake, openai_fake,
};

const ROUTER_KEY: &str = "router-secret";
const BACKEND_KEY: &str = "backend-secret";

async fn cluster() -> Cluster {
    Cluster::builder()
        .backend(ollama_fake(&["m:latest"]))
        .backend_with(
            openai_fake(&["gpt-x"]).api_key(BACKEND_KEY),
            BackendOptions::api_key(BACKEND_KEY),
        )
        .router_api_key(ROUTER_KEY)
        .start()
        .await
}

fn chat(model: &str) -> serde_json::Value {
    json!({"model": model, "stream": false, "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_key_is_401_and_wrong_key_is_403_in_client_format() {
    let c = cluster().await;
    // Ollama format.
    for (method_path, body) in [("/api/chat", Some(chat("m"))), ("/api/tags", None)] {
        let req = |c: &Cluster| match &body {
            Some(b) => c.http().post(c.at(method_path)).json(b),
            None => c.http().get(c.at(method_path)),
        };
        let r = send(req(&c)).await;
        assert_eq!(r.status, 401, "{method_path} without key: {}", r.text);
        ollama_error_text(&r);
        let r = send(req(&c).bearer_auth("wrong")).await;
        assert_eq!(r.status, 403, "{method_path} wrong key: {}", r.text);
        ollama_error_text(&r);
        let r = send(req(&c).query(&[("api_key", "wrong")])).await;
        assert_eq!(r.status, 403, "{method_path} wrong ?api_key: {}", r.text);
    }
    // OpenAI format.
    for (path, body) in [
        ("/v1/chat/completions", Some(chat("gpt-x"))),
        ("/v1/models", None),
    ] {
        let req = |c: &Cluster| match &body {
            Some(b) => c.http().post(c.at(path)).json(b),
            None => c.http().get(c.at(path)),
        };
        let r = send(req(&c)).await;
        assert_eq!(r.status, 401, "{path} without key: {}", r.text);
        openai_error_message(&r);
        let r = send(req(&c).bearer_auth("wrong")).await;
        assert_eq!(r.status, 403, "{path} wrong key: {}", r.text);
        openai_error_message(&r);
    }
    // Nothing reached a backend's inference routes.
    for b in &c.backends {
        assert_eq!(
            b.completed_count(),
            0,
            "an unauthenticated request was forwarded"
        );
    }
    // Liveness stays open.
    let r = get(c.http(), &c.at("/health")).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_and_query_keys_work_and_only_backend_keys_go_upstream() {
    let c = cluster().await;
    // Bearer, OpenAI client, OpenAI backend requiring its own key.
    let r = send(
        c.http()
            .post(c.at("/v1/chat/completions"))
            .bearer_auth(ROUTER_KEY)
            .json(&chat("gpt-x")),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let sent = c
        .backend(1)
        .last_request_to("/v1/chat/completions")
        .unwrap();
    assert_eq!(
        sent.bearer_token(),
        Some(BACKEND_KEY),
        "backend key not sent"
    );
    // ?api_key=, Ollama client translated to the same backend.
    let r = send(
        c.http()
            .post(c.at("/api/chat"))
            .query(&[("api_key", ROUTER_KEY)])
            .json(&chat("gpt-x")),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let sent = c
        .backend(1)
        .last_request_to("/v1/chat/completions")
        .unwrap();
    assert_eq!(sent.bearer_token(), Some(BACKEND_KEY));
    assert!(
        !sent
            .query
            .as_deref()
            .unwrap_or_default()
            .contains(ROUTER_KEY),
        "router key forwarded in the query: {:?}",
        sent.query
    );
    // Ollama backend without a key: the client's Authorization is not forwarded.
    let r = send(
        c.http()
            .post(c.at("/api/chat"))
            .bearer_auth(ROUTER_KEY)
            .json(&chat("m")),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = send(
        c.http()
            .get(c.at("/api/tags"))
            .query(&[("api_key", ROUTER_KEY)]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    for (i, b) in c.backends.iter().enumerate() {
        for req in b.requests() {
            let auth = req.header("authorization").unwrap_or_default();
            assert!(
                !auth.contains(ROUTER_KEY),
                "backend {i} got the client's key on {}: {auth}",
                req.path
            );
            assert!(
                !req.query
                    .as_deref()
                    .unwrap_or_default()
                    .contains(ROUTER_KEY),
                "backend {i} got the client's key in the query of {}",
                req.path
            );
        }
    }
    let sent = c.backend(0).last_request_to("/api/chat").unwrap();
    assert_eq!(
        sent.header("authorization"),
        None,
        "the Ollama backend has no key configured"
    );
    c.wait_usage(0).await;
}
