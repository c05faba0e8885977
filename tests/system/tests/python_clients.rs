//! The official Python clients end to end through a sidecar: `openai`
//! (chat, streamed chat, completions, embeddings, responses, models),
//! `anthropic` (messages, streamed and not, behind a router key sent as
//! `x-api-key`) and `ollama`
//! (chat and generate both ways, embed with a list, list, show), against an
//! Ollama-mode fake and an OpenAI-mode fake (so the ollama client also
//! exercises translation). The scripts are first run straight against the
//! fakes, so a script bug is never mistaken for a sidecar bug.
//!
//! Needs `.venv` from `tests/run.sh` (or `SWITCHYARD_PYTHON`); without it
//! these tests FAIL with that instruction.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use switchyard_system_tests::{
    Cluster, FakeBackend, embedding_for, ollama_fake, openai_fake, python::run_script_ok,
};

const TEXT: &str = "tok0 tok1 tok2";
const INPUTS: [&str; 3] = ["alpha", "beta", "gamma"];

fn env_for(dims: usize) -> Vec<(&'static str, String)> {
    let vecs: Vec<Vec<f32>> = INPUTS.iter().map(|i| embedding_for(i, dims)).collect();
    vec![
        ("EXPECT_TEXT", TEXT.to_owned()),
        ("EMBED_INPUTS", json!(INPUTS).to_string()),
        ("EXPECT_EMBEDDINGS", json!(vecs).to_string()),
    ]
}

async fn run(script: &str, base: &str, model: &str, dims: usize) {
    run_with(script, base, model, dims, &[]).await;
}

/// [`run`] with more environment for the script.
async fn run_with(script: &str, base: &str, model: &str, dims: usize, extra: &[(&str, &str)]) {
    let env = env_for(dims);
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.extend_from_slice(extra);
    let out = run_script_ok(script, &[base, model, model], &env).await;
    assert!(out.stdout.contains("checks passed"), "{}", out.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_pass_against_the_fakes_directly() {
    let ollama = FakeBackend::start(ollama_fake(&["m:latest"])).await;
    run_with(
        "ollama_client.py",
        &ollama.url(),
        "m",
        ollama.embedding_dims(),
        &[("EXPECT_BACKEND_ITEMS", "1")],
    )
    .await;
    run(
        "openai_client.py",
        &ollama.url(),
        "m",
        ollama.embedding_dims(),
    )
    .await;
    let openai = FakeBackend::start(openai_fake(&["gpt-x"])).await;
    run(
        "openai_client.py",
        &openai.url(),
        "gpt-x",
        openai.embedding_dims(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_client_directly_and_through_a_sidecar() {
    let ollama = FakeBackend::start(ollama_fake(&["m:latest"])).await;
    let direct = [("EXPECT_TEXT", TEXT)];
    let out = run_script_ok("anthropic_client.py", &[&ollama.url(), "m"], &direct).await;
    assert!(out.stdout.contains("checks passed"), "{}", out.stdout);

    let c = Cluster::builder()
        .backend(ollama_fake(&["m:latest"]))
        .router_api_key("router-secret")
        .start()
        .await;
    let through = [("EXPECT_TEXT", TEXT), ("API_KEY", "router-secret")];
    let out = run_script_ok("anthropic_client.py", &[&c.url(0), "m"], &through).await;
    assert!(out.stdout.contains("checks passed"), "{}", out.stdout);
    // The router key (sent as `x-api-key`) never reached the backend.
    let seen = c.backend(0).requests_to("/v1/messages");
    assert_eq!(seen.len(), 2, "the unknown model never reaches it");
    for r in seen {
        assert!(r.headers.get("x-api-key").is_none(), "{:?}", r.headers);
    }
    c.wait_usage(0).await;
}

/// `messages.count_tokens` (Claude Code calls it) reaches a backend that
/// serves `/v1/messages/count_tokens`: an Ollama backend, which does not,
/// is tried only when no other has the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_count_tokens_reaches_a_backend_that_serves_it() {
    let c = Cluster::builder()
        .backend(ollama_fake(&["m:latest"]))
        .backend(openai_fake(&["m"]))
        .start()
        .await;
    let env = [("EXPECT_TEXT", TEXT), ("EXPECT_INPUT_TOKENS", "10")];
    let out = run_script_ok("anthropic_client.py", &[&c.url(0), "m"], &env).await;
    assert!(out.stdout.contains("checks passed"), "{}", out.stdout);
    assert_eq!(
        c.backend(1).requests_to("/v1/messages/count_tokens").len(),
        4,
        "every count answered by the backend serving the route"
    );
    assert!(
        c.backend(0)
            .requests_to("/v1/messages/count_tokens")
            .is_empty(),
        "Ollama, which does not serve it, is not tried first"
    );
    c.wait_usage(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_client_through_a_sidecar() {
    let c = Cluster::builder()
        .backend(ollama_fake(&["m:latest"]))
        .backend(openai_fake(&["gpt-x"]))
        .start()
        .await;
    // Through a sidecar `models.retrieve` works too (`/v1/models/{id}`).
    let retrieve = [("EXPECT_RETRIEVE", "1")];
    run_with(
        "openai_client.py",
        &c.url(0),
        "gpt-x",
        c.backend(1).embedding_dims(),
        &retrieve,
    )
    .await;
    run_with(
        "openai_client.py",
        &c.url(0),
        "m",
        c.backend(0).embedding_dims(),
        &retrieve,
    )
    .await;
    c.wait_usage(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_client_through_a_sidecar_to_an_ollama_backend() {
    let c = Cluster::builder()
        .backend(ollama_fake(&["m:latest"]))
        .start()
        .await;
    // The listing shows the backend's own items (through the control
    // plane's `ListModelItems`).
    run_with(
        "ollama_client.py",
        &c.url(0),
        "m",
        c.backend(0).embedding_dims(),
        &[("EXPECT_BACKEND_ITEMS", "1")],
    )
    .await;
    c.wait_usage(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_client_through_a_sidecar_to_an_openai_backend() {
    let c = Cluster::builder()
        .backend(openai_fake(&["gpt-x"]))
        .start()
        .await;
    run(
        "ollama_client.py",
        &c.url(0),
        "gpt-x",
        c.backend(0).embedding_dims(),
    )
    .await;
    // It really was translated: the backend only saw OpenAI routes.
    assert!(c.backend(0).request_count("/v1/chat/completions") >= 2);
    assert!(c.backend(0).request_count("/v1/embeddings") >= 1);
    c.wait_usage(0).await;
}
