//! The Responses API's stored-response routes through a sidecar:
//! `GET`/`DELETE /v1/responses/{id}`, `GET /v1/responses/{id}/input_items`
//! and `POST /v1/responses/{id}/cancel` reach the backend that stored the
//! response (the fakes, like vLLM and OpenAI, answer them only there and
//! 404 elsewhere), with each backend's own key, draining backends
//! included; unknown ids are 404 and invalid ones 400, in OpenAI format.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::{Value, json};
use switchyard_system_tests::{
    BackendOptions, Cluster, ClusterBuilder,
    client::{Reply, openai_error_message, send},
    openai_fake, wait_until,
};

fn three_backends() -> ClusterBuilder {
    Cluster::builder()
        .backend(openai_fake(&["m"]))
        .backend(openai_fake(&["m"]))
        .backend(openai_fake(&["m"]))
}

/// Creates a stored response through the sidecar (two input items);
/// returns its id and the index of the backend holding it.
async fn create(c: &Cluster, key: Option<&str>) -> (String, usize) {
    let body = json!({"model": "m", "store": true, "input": [
        {"role": "user", "content": "first"},
        {"role": "user", "content": "second"},
    ]});
    let mut request = c.http().post(c.at("/v1/responses")).json(&body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let r = send(request).await;
    assert_eq!(r.status, 200, "create: {}", r.text);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let holders: Vec<usize> = (0..c.backends.len())
        .filter(|&i| c.backend(i).stores_response(&id))
        .collect();
    assert_eq!(holders.len(), 1, "{id} stored on {holders:?}");
    (id, holders[0])
}

/// Asserts the OpenAI not-found error for `id`, naming no backend.
fn assert_not_found(r: &Reply, id: &str) {
    assert_eq!(r.status, 404, "{}", r.text);
    assert_eq!(
        r.json(),
        json!({"error": {"message": format!("No response found with id '{id}'."),
            "type": "invalid_request_error", "param": null, "code": "not_found"}}),
    );
    assert!(!r.text.contains("127.0.0.1"), "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_response_is_retrieved_listed_and_deleted_on_its_backend() {
    let c = three_backends().standalone().start().await;
    let (id, holder) = create(&c, None).await;
    let path = format!("/v1/responses/{id}");

    let r = send(c.http().get(c.at(&path))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    let got = r.json();
    assert_eq!(got["id"], id);
    assert_eq!(got["object"], "response");
    assert_eq!(got["status"], "completed");
    assert_eq!(
        c.backend(holder).requests_to(&path).len(),
        1,
        "the holder answered"
    );

    // input_items: the query goes along; the holder pages its items.
    let items_path = format!("{path}/input_items");
    let r = send(c.http().get(c.at(&items_path)).query(&[
        ("limit", "1"),
        ("order", "asc"),
        ("include[]", "x"),
    ]))
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let page = r.json();
    assert_eq!(page["object"], "list");
    assert_eq!(page["data"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["data"][0]["content"][0]["text"], "first", "{page}");
    assert_eq!(page["has_more"], true);
    let seen = c.backend(holder).last_request_to(&items_path).unwrap();
    assert_eq!(
        seen.query.as_deref(),
        Some("limit=1&order=asc&include%5B%5D=x")
    );
    let after = page["last_id"].as_str().unwrap().to_owned();
    let r = send(
        c.http()
            .get(c.at(&items_path))
            .query(&[("order", "asc"), ("after", &after)]),
    )
    .await;
    assert_eq!(
        r.json()["data"][0]["content"][0]["text"],
        "second",
        "{}",
        r.text
    );

    // cancel answers the response object (the fake runs nothing in the
    // background).
    let r = send(c.http().post(c.at(&format!("{path}/cancel")))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["id"], id);

    let r = send(c.http().delete(c.at(&path))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.json(),
        json!({"id": id, "object": "response.deleted", "deleted": true})
    );
    assert!(!c.backend(holder).stores_response(&id));
    let r = send(c.http().get(c.at(&path))).await;
    assert_not_found(&r, &id);
    let r = send(c.http().delete(c.at(&path))).await;
    assert_not_found(&r, &id);
    c.wait_usage(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_id_is_404_after_asking_every_backend() {
    let c = three_backends().standalone().start().await;
    for suffix in ["", "/input_items"] {
        let path = format!("/v1/responses/resp_unknown{suffix}");
        let r = send(c.http().get(c.at(&path))).await;
        assert_not_found(&r, "resp_unknown");
        for i in 0..3 {
            assert_eq!(c.backend(i).requests_to(&path).len(), 1, "backend {i}");
        }
    }
    let r = send(c.http().post(c.at("/v1/responses/resp_unknown/cancel"))).await;
    assert_not_found(&r, "resp_unknown");
    // Counted like other requests, by route pattern (never the id).
    let metrics = send(c.http().get(c.at("/metrics"))).await.text;
    assert!(
        metrics.contains(r#"route="/v1/responses/{id}",model="",endpoint="",status="404""#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_ids_and_streamed_retrieval_are_400() {
    let c = three_backends().standalone().start().await;
    let long = "r".repeat(257);
    for path in [
        "/v1/responses/a.b".to_owned(),
        "/v1/responses/a%2Fb".to_owned(),
        "/v1/responses/a%20b/input_items".to_owned(),
        "/v1/responses/%C3%A9".to_owned(),
        format!("/v1/responses/{long}"),
    ] {
        let r = send(c.http().get(c.at(&path))).await;
        assert_eq!(r.status, 400, "{path}: {}", r.text);
        let message = openai_error_message(&r);
        assert!(message.contains("invalid response id"), "{message}");
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    }
    let ok_length = "r".repeat(256);
    let r = send(c.http().get(c.at(&format!("/v1/responses/{ok_length}")))).await;
    assert_eq!(r.status, 404, "256 characters are allowed: {}", r.text);

    let r = send(
        c.http()
            .get(c.at("/v1/responses/resp_1"))
            .query(&[("stream", "true")]),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(
        openai_error_message(&r).contains("not supported"),
        "{}",
        r.text
    );
    // None of these reached a backend, except the valid 256-character id.
    for i in 0..3 {
        let asked: Vec<String> = c
            .backend(i)
            .requests()
            .into_iter()
            .map(|r| r.path)
            .filter(|p| p.starts_with("/v1/responses/"))
            .collect();
        assert_eq!(asked, [format!("/v1/responses/{ok_length}")], "backend {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_key_is_required_and_each_backend_gets_its_own() {
    let keys = ["key-0", "key-1", "key-2"];
    let mut builder = Cluster::builder().router_api_key("router-secret");
    for key in keys {
        builder = builder.backend_with(
            openai_fake(&["m"]).api_key(key),
            BackendOptions::api_key(key),
        );
    }
    let c = builder.standalone().start().await;
    let (id, holder) = create(&c, Some("router-secret")).await;
    let path = format!("/v1/responses/{id}");

    let r = send(c.http().get(c.at(&path))).await;
    assert_eq!(r.status, 401, "{}", r.text);
    openai_error_message(&r);
    let r = send(c.http().delete(c.at(&path)).bearer_auth("wrong")).await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(
        c.backend(holder).stores_response(&id),
        "refused, not deleted"
    );
    for i in 0..3 {
        assert!(
            c.backend(i).requests_to(&path).is_empty(),
            "backend {i} was asked"
        );
    }

    let r = send(c.http().get(c.at(&path)).bearer_auth("router-secret")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["id"], id);
    // `?api_key=` works too and is not passed on.
    let r = send(
        c.http()
            .get(c.at(&format!("{path}/input_items")))
            .query(&[("api_key", "router-secret"), ("limit", "2")]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    for (i, key) in keys.iter().enumerate() {
        for seen in c.backend(i).requests() {
            if !seen.path.starts_with(&path) {
                continue;
            }
            assert_eq!(seen.bearer_token(), Some(*key), "backend {i} {}", seen.path);
            assert!(
                !seen
                    .query
                    .as_deref()
                    .unwrap_or_default()
                    .contains("api_key"),
                "{:?}",
                seen.query
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_backend_still_answers_for_its_responses() {
    // Remote mode: draining is the control plane's admin call.
    let c = three_backends().start().await;
    let (id, holder) = create(&c, None).await;
    let holder_url = c.endpoint_url(holder);
    let cp = c.control_plane.as_ref().unwrap();
    cp.cp.set_draining(&holder_url, true).unwrap();
    wait_until(
        "the sidecar sees the drain",
        Duration::from_secs(10),
        || {
            c.sidecars[0]
                .router()
                .cluster_state()
                .endpoints
                .iter()
                .any(|e| *e.url == *holder_url && e.draining)
        },
    )
    .await;
    let r = send(c.http().get(c.at(&format!("/v1/responses/{id}")))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["id"], id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_down_does_not_hide_the_holder_and_all_down_is_503() {
    let c = three_backends().standalone().start().await;
    let (id, holder) = create(&c, None).await;
    let path = format!("/v1/responses/{id}");
    let other = (holder + 1) % 3;
    c.backend(other).shutdown().await;
    // At once (still marked healthy: its connection is refused) and after
    // the probes noticed (not asked).
    for _ in 0..2 {
        let r = send(c.http().get(c.at(&path))).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json()["id"], id);
        c.wait_healthy(other, false).await;
    }
    for i in 0..3 {
        c.backend(i).shutdown().await;
    }
    let r = send(c.http().get(c.at(&path))).await;
    assert_eq!(r.status, 503, "{}", r.text);
    let message = openai_error_message(&r);
    assert!(message.contains("no backend could be asked"), "{message}");
    assert!(!message.contains("127.0.0.1"), "{message}");
    let _: Value = r.json();
}
