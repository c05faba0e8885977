//! Listings answered from cluster state: `/api/tags`, `/api/ps`,
//! `/v1/models`, `/api/version`, in each API's shape, merging every
//! healthy backend and dropping a dead one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use switchyard_system_tests::{Cluster, client::get, ollama_fake, openai_fake};

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
