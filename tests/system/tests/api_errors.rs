//! Client errors and unavailability, always in the client's API format:
//! malformed JSON and a missing model are 400, a body over
//! `max_body_bytes` is 413, no healthy backend is 503, and so is a model
//! no backend has while one backend has never been reached (it may have
//! it: "not found" would be a guess).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use switchyard_control_plane::endpoint::EndpointKind;
use switchyard_system_tests::{
    Cluster, FailureMode, FakeConfig, FakeMode, SOON,
    client::{Reply, ollama_error_text, openai_error_message, post_json, send},
    config::EndpointEntry,
    ollama_fake, openai_fake,
    process::free_addr,
    wait_for,
};

/// Routed paths with their API format (`true` = OpenAI).
const PATHS: [(&str, bool); 5] = [
    ("/api/chat", false),
    ("/api/generate", false),
    ("/api/embed", false),
    ("/v1/chat/completions", true),
    ("/v1/embeddings", true),
];

fn assert_format(path: &str, openai: bool, r: &Reply) -> String {
    if openai {
        openai_error_message(r)
    } else {
        assert!(
            r.json()["error"].is_string(),
            "{path}: expected an Ollama error body, got {}",
            r.text
        );
        ollama_error_text(r)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_and_missing_model_are_400_in_client_format() {
    let c = Cluster::builder()
        .backend(ollama_fake(&["m:latest"]))
        .start()
        .await;
    for (path, openai) in PATHS {
        let r = send(
            c.http()
                .post(c.at(path))
                .header("content-type", "application/json")
                .body("{\"model\": \"m\", \"messages\": ["),
        )
        .await;
        assert_eq!(r.status, 400, "{path} malformed: {}", r.text);
        assert_format(path, openai, &r);

        let r = post_json(
            c.http(),
            &c.at(path),
            &json!({"messages": [], "input": "x", "prompt": "x"}),
        )
        .await;
        assert_eq!(r.status, 400, "{path} without model: {}", r.text);
        let msg = assert_format(path, openai, &r);
        assert!(
            msg.contains("model"),
            "{path}: message should name `model`: {msg}"
        );
    }
    assert_eq!(
        c.backend(0).model_requests("m"),
        0,
        "a bad request reached the backend"
    );
    c.wait_usage(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_max_body_bytes_is_413_in_client_format() {
    let c = Cluster::builder()
        .backend(ollama_fake(&["m:latest"]))
        .set("max_body_bytes", "2048")
        .start()
        .await;
    let big = "x".repeat(8 * 1024);
    for (path, openai) in PATHS {
        let r = post_json(
            c.http(),
            &c.at(path),
            &json!({"model": "m", "stream": false, "input": big, "prompt": big,
                    "messages": [{"role": "user", "content": big}]}),
        )
        .await;
        assert_eq!(r.status, 413, "{path}: {}", r.text);
        assert_format(path, openai, &r);
    }
    // Just under the limit is fine.
    let r = post_json(
        c.http(),
        &c.at("/api/chat"),
        &json!({"model": "m", "stream": false, "messages": [{"role": "user", "content": "x".repeat(1000)}]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    c.wait_usage(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_no_reached_backend_has_is_503_while_another_was_never_reached() {
    let never = free_addr(); // nothing listens there
    let c = Cluster::builder()
        .backend(ollama_fake(&["m:latest"]))
        .extra_endpoint(EndpointEntry {
            url: format!("http://{never}"),
            kind: EndpointKind::Ollama,
            max_concurrent: None,
            api_key: None,
        })
        .start()
        .await;
    let down = format!("http://{never}");
    wait_for(
        "the unreachable endpoint's first probe",
        SOON,
        || {
            c.state()
                .endpoints
                .iter()
                .find(|e| *e.url == *down)
                .map(|e| e.health_detail.clone())
        },
        |detail| detail.as_deref().is_some_and(|d| d.contains("connect")),
    )
    .await;
    let chat = |model: &str| {
        json!({"model": model, "stream": false,
               "messages": [{"role": "user", "content": "hi"}]})
    };
    for (path, openai) in [("/api/chat", false), ("/v1/chat/completions", true)] {
        let r = post_json(c.http(), &c.at(path), &chat("llama3")).await;
        assert_eq!(r.status, 503, "{path}: {}", r.text);
        let text = assert_format(path, openai, &r);
        assert!(
            text.contains("llama3") && text.contains("never reached"),
            "{path}: {text}"
        );
        assert!(!text.contains(&never.to_string()), "names no URL: {text}");
        // What the reachable backend has is served meanwhile.
        let r = post_json(c.http(), &c.at(path), &chat("m")).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
    }
    c.wait_usage(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_healthy_backend_is_503_in_client_format() {
    let c = Cluster::builder()
        .backend(ollama_fake(&["m:latest"]))
        .backend(openai_fake(&["m"]))
        .start()
        .await;
    c.backend(0).shutdown().await;
    c.backend(1).shutdown().await;
    c.wait_healthy(0, false).await;
    c.wait_healthy(1, false).await;
    let chat =
        json!({"model": "m", "stream": false, "messages": [{"role": "user", "content": "hi"}]});
    for (path, openai) in [("/api/chat", false), ("/v1/chat/completions", true)] {
        let r = post_json(c.http(), &c.at(path), &chat).await;
        assert_eq!(r.status, 503, "{path} with every backend down: {}", r.text);
        assert_format(path, openai, &r);
    }
    c.wait_usage(0).await;
}

/// A route no backend serves (`/v1/messages/count_tokens` on Ollama) is a
/// 404 in the client's format naming the route, not a model error; and the
/// model stays routable on that backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_tokens_on_a_backend_without_the_route_is_404_naming_it() {
    let c = Cluster::builder()
        .backend(ollama_fake(&["m:latest"]))
        .start()
        .await;
    let ask = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let r = post_json(c.http(), &c.at("/v1/messages/count_tokens"), &ask).await;
    assert_eq!(r.status, 404, "{}", r.text);
    let body = r.json();
    assert_eq!(body["type"], "error", "{}", r.text);
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("/v1/messages/count_tokens"), "{message}");
    let mut chat = ask.clone();
    chat["max_tokens"] = json!(8);
    let r = post_json(c.http(), &c.at("/v1/messages"), &chat).await;
    assert_eq!(r.status, 200, "{}", r.text);
    c.wait_usage(0).await;
}

/// A backend answering 501 Not Implemented (llama-server's embeddings
/// without `--embeddings`) lacks a feature; it is not failing: the request
/// is tried on another endpoint, and the backend is neither marked failing
/// for the model nor has its breaker opened. With every endpoint answering
/// 501, the client gets that 501.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_501_is_tried_elsewhere_and_marks_no_backend_failing() {
    let c = Cluster::builder()
        .backend(openai_fake(&["m"]).label("a"))
        .backend(openai_fake(&["m"]).label("b"))
        .start()
        .await;
    c.backend(0).set_failure(FailureMode::Status(501));
    let embed = json!({"model": "m", "input": "hi"});
    for _ in 0..6 {
        let r = post_json(c.http(), &c.at("/v1/embeddings"), &embed).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let state = c.state();
    for e in &state.endpoints {
        assert!(
            e.healthy && e.failing_models.is_empty() && !e.circuit_open,
            "{e:?}"
        );
    }
    c.backend(1).set_failure(FailureMode::Status(501));
    let r = post_json(c.http(), &c.at("/v1/embeddings"), &embed).await;
    assert_eq!(r.status, 501, "{}", r.text);
    openai_error_message(&r);
    c.wait_usage(0).await;
}

/// A backend's 4xx error on the client's own API reaches the client as
/// the backend sent it, as a success would: llama-server's integer `code`
/// stays an integer (QA: it became a string, and llama.cpp's `n_ctx` and
/// `n_prompt_tokens` were dropped). Translated for an Ollama client, it is
/// in Ollama's shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_error_on_the_clients_own_api_passes_unchanged() {
    let c = Cluster::builder()
        .backend(FakeConfig::new(FakeMode::LlamaServer).models(&["m"]))
        .start()
        .await;
    c.backend(0).set_failure(FailureMode::Status(400));
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let direct = post_json(
        c.http(),
        &format!("{}/v1/chat/completions", c.backend(0).url()),
        &chat,
    )
    .await;
    assert_eq!(direct.status, 400, "{}", direct.text);
    assert!(direct.json()["error"]["code"].is_u64(), "{}", direct.text);
    let routed = post_json(c.http(), &c.at("/v1/chat/completions"), &chat).await;
    assert_eq!(routed.status, 400, "{}", routed.text);
    assert_eq!(routed.json(), direct.json());
    let ollama = post_json(c.http(), &c.at("/api/chat"), &chat).await;
    assert_eq!(ollama.status, 400, "{}", ollama.text);
    assert!(
        ollama_error_text(&ollama).contains("fake backend failure"),
        "{}",
        ollama.text
    );
    c.wait_usage(0).await;
}
