//! Listings answered from cluster state: `/api/tags`, `/api/ps`,
//! `/v1/models`, `/api/version`, in each API's shape, merging every
//! healthy backend and dropping a dead one; OpenAI-style backends' own
//! `/v1/models` entries passed through as they sent them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use switchyard_system_tests::{
    Cluster, FakeConfig, FakeMode, SOON, client::get, ollama_fake, openai_fake,
    wait::wait_for_async,
};

fn names(body: &Value, list: &str, field: &str) -> Vec<String> {
    body[list]
        .as_array()
        .unwrap_or_else(|| panic!("no `{list}` array in {body}"))
        .iter()
        .map(|m| m[field].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn has(names: &[String], model: &str) -> bool {
    names
        .iter()
        .any(|n| n == model || *n == format!("{model}:latest"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_merge_healthy_backends_in_each_api_shape() {
    let c = Cluster::builder()
        .backend(ollama_fake(&["m:latest", "other:7b"]).loaded(&["m:latest"]))
        .backend(openai_fake(&["gpt-x"]))
        .backend(ollama_fake(&["m:latest", "third:1b"]).loaded(&["third:1b"]))
        .start()
        .await;

    let tags = get(c.http(), &c.at("/api/tags")).await;
    assert_eq!(tags.status, 200, "{}", tags.text);
    let tag_names = names(&tags.json(), "models", "name");
    for m in ["m", "other:7b", "gpt-x", "third:1b"] {
        assert!(
            has(&tag_names, m),
            "{m} missing from /api/tags: {tag_names:?}"
        );
    }
    assert_eq!(
        tag_names
            .iter()
            .filter(|n| n.starts_with("m:") || *n == "m")
            .count(),
        1,
        "a model on two backends is listed once: {tag_names:?}"
    );
    for item in tags.json()["models"].as_array().unwrap() {
        assert!(
            item["model"].is_string() && item["details"].is_object(),
            "{item}"
        );
    }

    let ps = get(c.http(), &c.at("/api/ps")).await;
    assert_eq!(ps.status, 200, "{}", ps.text);
    let ps_names = names(&ps.json(), "models", "name");
    assert!(
        has(&ps_names, "m") && has(&ps_names, "third:1b"),
        "{ps_names:?}"
    );
    assert!(
        !has(&ps_names, "other:7b"),
        "an unloaded model in /api/ps: {ps_names:?}"
    );

    let models = get(c.http(), &c.at("/v1/models")).await;
    assert_eq!(models.status, 200, "{}", models.text);
    let body = models.json();
    assert_eq!(body["object"], "list", "{body}");
    let ids = names(&body, "data", "id");
    for m in ["m", "other:7b", "gpt-x", "third:1b"] {
        assert!(has(&ids, m), "{m} missing from /v1/models: {ids:?}");
    }
    for item in body["data"].as_array().unwrap() {
        assert_eq!(item["object"], "model", "{item}");
    }

    let version = get(c.http(), &c.at("/api/version")).await;
    assert_eq!(version.status, 200, "{}", version.text);
    assert!(version.json()["version"].is_string(), "{}", version.text);

    // A dead backend's models leave the listing.
    c.backend(1).shutdown().await;
    c.wait_healthy(1, false).await;
    let tag_names = names(
        &get(c.http(), &c.at("/api/tags")).await.json(),
        "models",
        "name",
    );
    assert!(
        !has(&tag_names, "gpt-x"),
        "a dead backend's model is listed: {tag_names:?}"
    );
    assert!(has(&tag_names, "m"), "{tag_names:?}");
    // Listings never touched a backend per request: only probes did.
    let before = c.backend(0).request_count("/api/tags");
    for _ in 0..20 {
        get(c.http(), &c.at("/api/tags")).await;
    }
    let after = c.backend(0).request_count("/api/tags");
    assert!(
        after - before < 20,
        "/api/tags fanned out per request ({} backend calls for 20 requests)",
        after - before
    );
}

/// The entry for `id` in a `/v1/models` body.
fn entry(body: &Value, id: &str) -> Value {
    body["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no `data` array in {body}"))
        .iter()
        .find(|m| m["id"] == id)
        .unwrap_or_else(|| panic!("{id} missing from {body}"))
        .clone()
}

/// An OpenAI-compatible (vLLM-like: `max_model_len`) and a llama-server
/// backend's own `/v1/models` entries come through the sidecar's
/// `/v1/models` and `/v1/models/{id}` exactly as the backends send them;
/// an Ollama backend's entry is still built from its `/api/tags` item.
async fn openai_style_entries_pass_through(standalone: bool) {
    let builder = Cluster::builder()
        .backend(ollama_fake(&["m:latest"]))
        .backend(openai_fake(&["gpt-4o-mini"]))
        .backend(
            FakeConfig::new(FakeMode::LlamaServer)
                .models(&["org/g-GGUF:Q4_K_M", "org/off-GGUF:Q8_0"])
                .loaded(&["org/g-GGUF:Q4_K_M"]),
        );
    let c = builder.standalone_if(standalone).start().await;

    let models = get(c.http(), &c.at("/v1/models")).await;
    assert_eq!(models.status, 200, "{}", models.text);
    let body = models.json();
    for (backend, id) in [
        (1, "gpt-4o-mini"),
        (2, "org/g-GGUF:Q4_K_M"),
        (2, "org/off-GGUF:Q8_0"),
    ] {
        let direct = get(c.http(), &format!("{}/v1/models", c.backend(backend).url())).await;
        assert_eq!(direct.status, 200, "{}", direct.text);
        let sent = entry(&direct.json(), id);
        assert_eq!(entry(&body, id), sent, "/v1/models entry for {id}");
        let one = get(c.http(), &c.at(&format!("/v1/models/{id}"))).await;
        assert_eq!(one.status, 200, "{}", one.text);
        assert_eq!(one.json(), sent, "/v1/models/{id}");
    }
    // What the fakes send, so the comparison above means something.
    let gpt = entry(&body, "gpt-4o-mini");
    assert!(
        gpt["max_model_len"].as_u64().is_some_and(|n| n > 0),
        "{gpt}"
    );
    assert_eq!(gpt["owned_by"], "fake", "{gpt}");
    assert_eq!(gpt["created"], 1_700_000_000, "{gpt}");
    let gguf = entry(&body, "org/g-GGUF:Q4_K_M");
    assert_eq!(gguf["status"]["value"], "loaded", "{gguf}");
    assert_eq!(gguf["owned_by"], "llamacpp", "{gguf}");
    // The Ollama entry: as Ollama's own `/v1/models` would give it.
    let m = entry(&body, "m:latest");
    assert_eq!(m["owned_by"], "library", "{m}");
    assert!(m["created"].as_i64().is_some_and(|t| t > 0), "{m}");
    assert!(m.get("max_model_len").is_none(), "{m}");

    // `/api/tags` still lists them in Ollama's shape, dated by `created`.
    let tags = get(c.http(), &c.at("/api/tags")).await.json();
    let gpt = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "gpt-4o-mini:latest")
        .unwrap_or_else(|| panic!("gpt-4o-mini:latest missing from {tags}"));
    assert_eq!(
        gpt["modified_at"], "2023-11-14T22:13:20.000000000Z",
        "{gpt}"
    );
    assert!(gpt["details"].is_object(), "{gpt}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_style_model_entries_pass_through_remote() {
    openai_style_entries_pass_through(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_style_model_entries_pass_through_standalone() {
    openai_style_entries_pass_through(true).await;
}

/// A model pulled on a backend outside the router. Remote, the sidecar
/// learns its name from `WatchUsage` and its item from `ListModelItems`,
/// whose answer it caches for two seconds: the first listing to show the
/// model must show the backend's own item (size, digest), not the
/// placeholder (`size` 0, no digest) until the cache ages out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_pulled_outside_the_router_is_listed_with_its_own_item_at_once() {
    let c = Cluster::builder()
        .backend(ollama_fake(&["m:latest"]))
        .start()
        .await;
    // The items are asked for, and cached.
    let tags = get(c.http(), &c.at("/api/tags")).await;
    assert!(
        has(&names(&tags.json(), "models", "name"), "m"),
        "{}",
        tags.text
    );
    c.backend(0).set_models(&["m:latest", "fresh:1b"]);
    let tags = wait_for_async(
        "/api/tags to list fresh:1b",
        SOON,
        || async { get(c.http(), &c.at("/api/tags")).await },
        |r| has(&names(&r.json(), "models", "name"), "fresh:1b"),
    )
    .await;
    let body = tags.json();
    let item = body["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "fresh:1b")
        .unwrap();
    assert!(
        item["size"].as_u64().unwrap_or(0) > 0
            && !item["digest"].as_str().unwrap_or_default().is_empty(),
        "the backend's own item, not the placeholder: {item}"
    );
}
