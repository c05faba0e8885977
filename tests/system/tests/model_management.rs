//! Model management through a sidecar, fanned out to the Ollama backends:
//! `POST /api/pull`, `/api/push`, `/api/create`, `/api/copy`,
//! `DELETE /api/delete`. Every target gets the request with its own backend
//! key and never the client's; OpenAI-style backends never get one; progress
//! is merged per digest; one failing backend is named in the error; copy and
//! delete only go where the model is; bad bodies are 400 before anything is
//! sent; the router key is required. Ends with the official Python `ollama`
//! client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::{Value, json};
use switchyard_system_tests::{
    BackendOptions, Cluster, FailureMode, FakeBackend, SOON,
    client::{Framing, get, ollama_error_text, send, stream},
    ollama_fake, openai_fake,
    python::run_script_ok,
    wait::wait_for_async,
};
use switchyard_tests::fake_backend::{layer_digest, layer_total};

const ROUTER_KEY: &str = "router-secret";
const KEY_A: &str = "backend-a-secret";
const KEY_C: &str = "backend-c-secret";

/// Ollama A (own key, has `m`), OpenAI B (has `m` too), Ollama C (own key,
/// has `m` and `other:1b`), Ollama D (no key, has `other:1b`); router key
/// set.
async fn cluster() -> Cluster {
    Cluster::builder()
        .backend_with(
            ollama_fake(&["m:latest"]).api_key(KEY_A).label("a"),
            BackendOptions::api_key(KEY_A),
        )
        .backend(openai_fake(&["m"]).label("b"))
        .backend_with(
            ollama_fake(&["m:latest", "other:1b"])
                .api_key(KEY_C)
                .label("c"),
            BackendOptions::api_key(KEY_C),
        )
        .backend(ollama_fake(&["other:1b"]).label("d"))
        .router_api_key(ROUTER_KEY)
        .start()
        .await
}

/// Indices of the Ollama backends in [`cluster`], with their keys.
const OLLAMA: [(usize, Option<&str>); 3] = [(0, Some(KEY_A)), (2, Some(KEY_C)), (3, None)];

fn post(c: &Cluster, path: &str, body: &Value) -> reqwest::RequestBuilder {
    c.http().post(c.at(path)).bearer_auth(ROUTER_KEY).json(body)
}

fn delete(c: &Cluster, body: &Value) -> reqwest::RequestBuilder {
    c.http()
        .delete(c.at("/api/delete"))
        .bearer_auth(ROUTER_KEY)
        .json(body)
}

/// Asserts backend `i` got exactly `n` requests on `path`, each with its
/// backend key (or none) and never the router key.
fn assert_got(c: &Cluster, i: usize, key: Option<&str>, path: &str, n: usize) {
    let got = c.backends[i].requests_to(path);
    assert_eq!(got.len(), n, "backend {i}: requests to {path}");
    for r in got {
        assert_eq!(r.bearer_token(), key, "backend {i}: key on {path}");
        let auth: Vec<_> = r.headers.get_all("authorization").iter().collect();
        assert!(auth.len() <= 1, "backend {i}: {auth:?}");
    }
}

async fn tags(c: &Cluster) -> Vec<String> {
    let r = send(c.http().get(c.at("/api/tags")).bearer_auth(ROUTER_KEY)).await;
    r.json()["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_pull_merges_progress_of_every_ollama_backend() {
    let c = cluster().await;
    for (i, _) in OLLAMA {
        c.backends[i].set_chunk_delay(Duration::from_millis(60));
    }
    let r = stream(
        post(&c, "/api/pull", &json!({"model": "fresh"})),
        Framing::Ndjson,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert_eq!(r.content_type, "application/x-ndjson");
    let lines = r.ndjson();
    let statuses: Vec<&str> = lines
        .iter()
        .map(|l| l["status"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(statuses.last(), Some(&"success"), "{}", r.dump());
    for once in [
        "pulling manifest",
        "verifying sha256 digest",
        "writing manifest",
        "success",
    ] {
        assert_eq!(
            statuses.iter().filter(|s| **s == once).count(),
            1,
            "{once}: {}",
            r.dump()
        );
    }
    // Per digest: the layer's size, and the three Ollama backends' average
    // progress, never going down, with the same total on every line (the
    // Ollama CLI fixes a bar's total at its first line).
    let digest = layer_digest("fresh");
    let progress: Vec<&Value> = lines.iter().filter(|l| l["digest"] == digest).collect();
    assert!(!progress.is_empty(), "{}", r.dump());
    let size = layer_total("fresh");
    let mut last = 0;
    for line in &progress {
        let completed = line["completed"].as_u64().unwrap_or(0);
        assert!(completed >= last, "completed went down: {}", r.dump());
        assert_eq!(line["total"].as_u64(), Some(size), "{}", r.dump());
        last = completed;
    }
    let end = progress.last().unwrap();
    assert_eq!(end["completed"].as_u64(), Some(size), "{}", r.dump());
    // Each line was sent as soon as it was made: the first long before the end.
    let first = r.chunks.first().unwrap().at;
    assert!(
        r.ended.duration_since(first) >= Duration::from_millis(200),
        "lines arrived together: {}",
        r.dump()
    );
    // Every Ollama backend got it, streamed, with its own key; B none.
    for (i, key) in OLLAMA {
        assert_got(&c, i, key, "/api/pull", 1);
        let body = c.backends[i]
            .last_request_to("/api/pull")
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(body, json!({"model": "fresh", "stream": true}));
    }
    assert_eq!(c.backends[1].requests_to("/api/pull").len(), 0);
    // The listing shows it (re-probed before the answer).
    wait_for_async(
        "pulled model listed",
        SOON,
        || tags(&c),
        |names| names.iter().any(|n| n == "fresh:latest"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstreamed_pull_push_and_create() {
    let c = cluster().await;
    let r = send(post(
        &c,
        "/api/pull",
        &json!({"model": "p", "stream": false}),
    ))
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json(), json!({"status": "success"}));
    for (i, key) in OLLAMA {
        assert_got(&c, i, key, "/api/pull", 1);
        assert!(c.backends[i].models().contains(&"p:latest".to_owned()));
    }
    // Create goes everywhere too; streamed by default.
    let r = stream(
        post(&c, "/api/create", &json!({"model": "mine", "from": "m"})),
        Framing::Ndjson,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let lines = r.ndjson();
    assert_eq!(
        lines.last().unwrap(),
        &json!({"status": "success"}),
        "{}",
        r.dump()
    );
    let writing = lines
        .iter()
        .filter(|l| l["status"] == "writing manifest")
        .count();
    assert_eq!(writing, 1, "{}", r.dump());
    for (i, key) in OLLAMA {
        assert_got(&c, i, key, "/api/create", 1);
    }
    // Push: only the first backend (config order) with the model.
    let r = send(post(
        &c,
        "/api/push",
        &json!({"model": "other:1b", "stream": false}),
    ))
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_got(&c, 2, Some(KEY_C), "/api/push", 1);
    assert_got(&c, 3, None, "/api/push", 0);
    assert_got(&c, 0, Some(KEY_A), "/api/push", 0);
    let r = send(post(&c, "/api/push", &json!({"model": "nope"}))).await;
    assert_eq!(r.status, 404, "{}", r.text);
    assert_eq!(r.json(), json!({"error": "model 'nope' not found"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_backend_is_named_and_success_is_withheld() {
    let c = cluster().await;
    let failing = c.endpoint_url(2);
    let healthy = c.endpoint_url(0);

    // An error line in the middle of its stream.
    c.backends[2].fail_next(1, FailureMode::MidStreamError);
    let r = stream(
        post(&c, "/api/pull", &json!({"model": "x"})),
        Framing::Ndjson,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let lines = r.ndjson();
    assert!(
        !lines.iter().any(|l| l["status"] == "success"),
        "{}",
        r.dump()
    );
    let error = lines.last().unwrap()["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(error.contains("failed on 1 of 3 endpoint(s)"), "{error}");
    assert!(error.contains(&failing), "{error}");
    assert!(!error.contains(&healthy), "{error}");
    assert_eq!(lines.iter().filter(|l| l.get("error").is_some()).count(), 1);

    // A status, not streamed: that status, naming the backend.
    c.backends[2].fail_next(1, FailureMode::Status(500));
    let r = send(post(
        &c,
        "/api/pull",
        &json!({"model": "x", "stream": false}),
    ))
    .await;
    assert_eq!(r.status, 500, "{}", r.text);
    let error = ollama_error_text(&r);
    assert!(
        error.contains(&failing) && !error.contains(&healthy),
        "{error}"
    );

    // Unreachable (connection reset): 502.
    c.backends[2].fail_next(1, FailureMode::Reset);
    let r = send(post(
        &c,
        "/api/pull",
        &json!({"model": "x", "stream": false}),
    ))
    .await;
    assert_eq!(r.status, 502, "{}", r.text);
    assert!(ollama_error_text(&r).contains(&failing), "{}", r.text);

    // Down (probes failing): not contacted, named in the error.
    c.backends[2].set_probe_failure(FailureMode::Status(500));
    c.wait_healthy(2, false).await;
    c.backends[2].clear_requests();
    let r = stream(
        post(&c, "/api/pull", &json!({"model": "y"})),
        Framing::Ndjson,
    )
    .await;
    let error = r.ndjson().last().unwrap()["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        error.contains(&format!("{failing}: endpoint is down")),
        "{error}"
    );
    assert_eq!(c.backends[2].requests_to("/api/pull").len(), 0);
    assert_got(&c, 0, Some(KEY_A), "/api/pull", 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_and_delete_go_only_where_the_model_is() {
    let c = cluster().await;
    let r = send(post(
        &c,
        "/api/copy",
        &json!({"source": "other:1b", "destination": "copy"}),
    ))
    .await;
    assert_eq!((r.status, r.text.as_str()), (200, ""));
    assert_got(&c, 2, Some(KEY_C), "/api/copy", 1);
    assert_got(&c, 3, None, "/api/copy", 1);
    assert_got(&c, 0, Some(KEY_A), "/api/copy", 0);
    assert!(c.backends[3].models().contains(&"copy:latest".to_owned()));

    // `m` means `m:latest`; the OpenAI backend listing `m` gets nothing.
    let r = send(delete(&c, &json!({"model": "m"}))).await;
    assert_eq!((r.status, r.text.as_str()), (200, ""));
    assert_got(&c, 0, Some(KEY_A), "/api/delete", 1);
    assert_got(&c, 2, Some(KEY_C), "/api/delete", 1);
    assert_got(&c, 3, None, "/api/delete", 0);
    for path in ["/api/copy", "/api/delete", "/api/pull"] {
        assert_eq!(
            c.backends[1].requests_to(path).len(),
            0,
            "OpenAI backend got {path}"
        );
    }
    assert!(c.backends[0].models().is_empty());
    let delete_request = c.backends[0].last_request_to("/api/delete").unwrap();
    assert_eq!(delete_request.method, "DELETE");

    // Unknown models: 404 in Ollama's words, nothing sent.
    for r in [
        send(post(
            &c,
            "/api/copy",
            &json!({"source": "nope", "destination": "x"}),
        ))
        .await,
        send(delete(&c, &json!({"name": "nope"}))).await,
    ] {
        assert_eq!(r.status, 404, "{}", r.text);
        assert_eq!(r.json(), json!({"error": "model 'nope' not found"}));
    }
    assert_got(&c, 2, Some(KEY_C), "/api/copy", 1);

    // A backend failing the delete is named, with its status.
    c.backends[3].fail_next(1, FailureMode::Status(500));
    let r = send(delete(&c, &json!({"model": "other:1b"}))).await;
    assert_eq!(r.status, 500, "{}", r.text);
    let error = ollama_error_text(&r);
    assert!(
        error.contains("delete 'other:1b' failed on 1 of 2"),
        "{error}"
    );
    assert!(error.contains(&c.endpoint_url(3)), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_backend_with_the_model_is_named_not_contacted() {
    let c = Cluster::builder()
        .backend(ollama_fake(&["m:latest"]))
        .backend(ollama_fake(&["m:latest"]))
        .start()
        .await;
    c.backends[1].set_probe_failure(FailureMode::Status(500));
    c.wait_healthy(1, false).await;
    let r = send(
        c.http()
            .delete(c.at("/api/delete"))
            .json(&json!({"model": "m"})),
    )
    .await;
    assert_eq!(r.status, 502, "{}", r.text);
    let error = ollama_error_text(&r);
    let down = format!("{}: endpoint is down", c.endpoint_url(1));
    assert!(error.contains(&down), "{error}");
    assert!(error.contains("failed on 1 of 2"), "{error}");
    assert_eq!(c.backends[0].requests_to("/api/delete").len(), 1);
    assert_eq!(c.backends[1].requests_to("/api/delete").len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_and_the_router_key() {
    let c = Cluster::builder()
        .backend(ollama_fake(&["m:latest"]))
        .router_api_key(ROUTER_KEY)
        .set("max_body_bytes", "2048")
        .start()
        .await;
    let bad = |path: &str, body: &str| {
        c.http()
            .request(
                if path == "/api/delete" {
                    reqwest::Method::DELETE
                } else {
                    reqwest::Method::POST
                },
                c.at(path),
            )
            .bearer_auth(ROUTER_KEY)
            .header("content-type", "application/json")
            .body(body.to_owned())
    };
    for (path, body) in [
        ("/api/pull", "not json"),
        ("/api/pull", "{}"),
        ("/api/push", r#"{"model": 3}"#),
        ("/api/create", r#"{"model": "m", "stream": "yes"}"#),
        ("/api/copy", r#"{"source": "m"}"#),
        ("/api/delete", "[]"),
    ] {
        let r = send(bad(path, body)).await;
        assert_eq!(r.status, 400, "{path} {body}: {}", r.text);
        ollama_error_text(&r);
    }
    let big = format!(r#"{{"model": "m", "pad": "{}"}}"#, "x".repeat(4096));
    let r = send(bad("/api/pull", &big)).await;
    assert_eq!(r.status, 413, "{}", r.text);
    ollama_error_text(&r);

    // The router key: 401 without, 403 wrong, in Ollama's format.
    for path in ["/api/pull", "/api/push", "/api/create", "/api/copy"] {
        let body = json!({"model": "m", "source": "m", "destination": "n"});
        let r = send(c.http().post(c.at(path)).json(&body)).await;
        assert_eq!(r.status, 401, "{path}: {}", r.text);
        ollama_error_text(&r);
        let r = send(c.http().post(c.at(path)).bearer_auth("wrong").json(&body)).await;
        assert_eq!(r.status, 403, "{path}: {}", r.text);
    }
    let r = send(
        c.http()
            .delete(c.at("/api/delete"))
            .json(&json!({"model": "m"})),
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.text);
    let b = &c.backends[0];
    for path in [
        "/api/pull",
        "/api/push",
        "/api/create",
        "/api/copy",
        "/api/delete",
    ] {
        assert_eq!(b.requests_to(path).len(), 0, "{path} reached the backend");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reachable_ollama_backend_is_503() {
    let c = Cluster::builder()
        .backend(openai_fake(&["gpt-x"]))
        .start()
        .await;
    let r = send(
        c.http()
            .post(c.at("/api/pull"))
            .json(&json!({"model": "m"})),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert!(
        ollama_error_text(&r).contains("no Ollama endpoint is configured"),
        "{}",
        r.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_going_away_cancels_every_upstream_pull() {
    let c = cluster().await;
    for (i, _) in OLLAMA {
        c.backends[i].hold_requests(true);
    }
    let response = post(&c, "/api/pull", &json!({"model": "slow"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    for (i, _) in OLLAMA {
        let b = &c.backends[i];
        assert!(
            b.wait_until(SOON, |b| b.waiting() == 1).await,
            "backend {i} never got the pull"
        );
    }
    drop(response);
    for (i, _) in OLLAMA {
        let b = &c.backends[i];
        assert!(
            b.wait_until(SOON, |b| b.cancelled_count() == 1 && b.in_flight() == 0)
                .await,
            "backend {i}: pull not cancelled (cancelled {}, in flight {})",
            b.cancelled_count(),
            b.in_flight()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_ollama_client_pulls_copies_and_deletes() {
    // The script against one fake first: a script bug is not a sidecar bug.
    let direct = FakeBackend::start(ollama_fake(&["m:latest"])).await;
    let one = layer_total("pulled-streamed").to_string();
    let out = run_script_ok(
        "ollama_manage.py",
        &[&direct.url(), "m"],
        &[("EXPECT_TOTAL", one.as_str())],
    )
    .await;
    assert!(out.stdout.contains("checks passed"), "{}", out.stdout);

    let c = Cluster::builder()
        .backend(ollama_fake(&["m:latest"]))
        .backend(ollama_fake(&["m:latest"]))
        .start()
        .await;
    // Through two backends the layer's size is the same: the total does not
    // double, the progress is their average.
    let two = layer_total("pulled-streamed").to_string();
    let out = run_script_ok(
        "ollama_manage.py",
        &[&c.url(0), "m"],
        &[("EXPECT_TOTAL", two.as_str())],
    )
    .await;
    assert!(out.stdout.contains("checks passed"), "{}", out.stdout);
    let digest = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("BLOB_DIGEST="))
        .expect("the script prints the blob's digest")
        .to_owned();
    for b in &c.backends {
        let blob = b.blob(&digest).expect("the blob reached every backend");
        assert_eq!(blob.len(), 256 * 1024);
        assert!(blob.iter().enumerate().all(|(i, x)| *x == (i % 256) as u8));
        assert!(b.models().contains(&"from-blob:latest".to_owned()));
        assert_eq!(b.requests_to("/api/pull").len(), 2);
        assert_eq!(b.requests_to("/api/copy").len(), 1);
        assert_eq!(b.requests_to("/api/delete").len(), 1);
        let models = b.models();
        for m in [
            "pulled-streamed:latest",
            "pulled-plain:latest",
            "copied:latest",
        ] {
            assert!(models.contains(&m.to_owned()), "{m} missing: {models:?}");
        }
        assert!(!models.contains(&"m:latest".to_owned()), "{models:?}");
    }
    let r = get(c.http(), &c.at("/api/version")).await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_are_checked_on_and_teed_to_every_ollama_backend() {
    // max_body_bytes does not apply to blobs (model weights).
    let c = Cluster::builder()
        .backend_with(
            ollama_fake(&["m:latest"]).api_key(KEY_A),
            BackendOptions::api_key(KEY_A),
        )
        .backend(openai_fake(&["m"]))
        .backend_with(
            ollama_fake(&["m:latest"]).api_key(KEY_C),
            BackendOptions::api_key(KEY_C),
        )
        .router_api_key(ROUTER_KEY)
        .set("max_body_bytes", "2048")
        .start()
        .await;
    let digest = format!("sha256:{}", "ab".repeat(32));
    let path = format!("/api/blobs/{digest}");
    let head = |c: &Cluster, path: &str| c.http().head(c.at(path)).bearer_auth(ROUTER_KEY);
    assert_eq!(send(head(&c, &path)).await.status, 404);

    // Streamed in pieces (chunked, no length): every Ollama backend gets
    // all of it, with its own key.
    let blob: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
        blob.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
    let body = reqwest::Body::wrap_stream(futures::stream::iter(pieces));
    let r = send(
        c.http()
            .post(c.at(&path))
            .bearer_auth(ROUTER_KEY)
            .body(body),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    for (i, key) in [(0, Some(KEY_A)), (2, Some(KEY_C))] {
        let got = c.backends[i].blob(&digest).expect("blob stored");
        assert!(
            got == blob,
            "backend {i} got {} bytes, not the blob",
            got.len()
        );
        assert_got(&c, i, key, &path, 2);
    }
    assert_eq!(c.backends[1].requests_to(&path).len(), 0);
    assert_eq!(send(head(&c, &path)).await.status, 200);

    // On one backend only: missing for the cluster.
    let other = format!("/api/blobs/sha256:{}", "cd".repeat(32));
    let direct = c.http().post(format!("{}{other}", c.backends[0].url()));
    let r = send(direct.bearer_auth(KEY_A).body("x")).await;
    assert_eq!(r.status, 201);
    assert_eq!(send(head(&c, &other)).await.status, 404);

    // A backend refusing the upload is named; bad digests are 400.
    c.backends[2].fail_next(1, FailureMode::Status(500));
    let r = send(
        c.http()
            .post(c.at(&other))
            .bearer_auth(ROUTER_KEY)
            .body("y"),
    )
    .await;
    assert_eq!(r.status, 500, "{}", r.text);
    let error = ollama_error_text(&r);
    assert!(error.contains(&c.endpoint_url(2)), "{error}");
    assert!(!error.contains(&c.endpoint_url(0)), "{error}");
    let r = send(
        c.http()
            .post(c.at("/api/blobs/sha256:nothex"))
            .bearer_auth(ROUTER_KEY)
            .body("z"),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text);
    let r = send(c.http().post(c.at(&path)).body("no key")).await;
    assert_eq!(r.status, 401, "{}", r.text);

    // Counted by outcome, like the other operations (the 401 never reached
    // the route).
    let metrics = send(c.http().get(c.at("/metrics")).bearer_auth(ROUTER_KEY))
        .await
        .text;
    for outcome in ["success", "failed", "refused"] {
        let line = format!(
            "switchyard_sidecar_model_management_total{{operation=\"blob_upload\",outcome=\"{outcome}\"}} 1"
        );
        assert!(metrics.contains(&line), "{line} missing in:\n{metrics}");
    }
}

/// `ollama run` pulls a missing model and then asks for it at once. With an
/// hour between discovery probes, the sidecar has the control plane re-probe
/// the endpoints before it answers, so a pulled or copied model is routable
/// and listed right away, and a deleted one is gone. Standalone and through
/// a control plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_routable_as_soon_as_they_are_answered() {
    for standalone in [true, false] {
        let builder = Cluster::builder()
            .backend(ollama_fake(&["m:latest"]))
            .backend(ollama_fake(&["m:latest"]))
            .set("probe_interval", "1h")
            .router_api_key(ROUTER_KEY);
        let c = builder.standalone_if(standalone).start().await;
        let chat = |model: &str| {
            post(
                &c,
                "/api/chat",
                &json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": false}),
            )
        };
        assert_eq!(send(chat("fresh")).await.status, 404);

        let r = stream(
            post(&c, "/api/pull", &json!({"model": "fresh"})),
            Framing::Ndjson,
        )
        .await;
        assert_eq!(
            r.ndjson().last(),
            Some(&json!({"status": "success"})),
            "{}",
            r.dump()
        );
        let r = send(chat("fresh")).await;
        assert_eq!(r.status, 200, "standalone={standalone}: {}", r.text);
        assert!(tags(&c).await.contains(&"fresh:latest".to_owned()));

        let r = send(post(
            &c,
            "/api/copy",
            &json!({"source": "fresh", "destination": "fresh-copy"}),
        ))
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let r = send(chat("fresh-copy")).await;
        assert_eq!(r.status, 200, "standalone={standalone}: {}", r.text);

        let r = send(delete(&c, &json!({"model": "fresh"}))).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let r = send(chat("fresh")).await;
        assert_eq!(r.status, 404, "standalone={standalone}: {}", r.text);
        assert!(!tags(&c).await.contains(&"fresh:latest".to_owned()));
        c.shutdown().await;
    }
}

/// Every operation is counted by outcome in
/// `switchyard_sidecar_model_management_total`: success, failed (some
/// endpoint failed, streamed or not) and refused (answered before any
/// endpoint was asked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_are_counted_by_outcome() {
    let c = cluster().await;
    let r = send(post(
        &c,
        "/api/pull",
        &json!({"model": "p", "stream": false}),
    ))
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    c.backends[2].fail_next(1, FailureMode::MidStreamError);
    let r = stream(
        post(&c, "/api/pull", &json!({"model": "q"})),
        Framing::Ndjson,
    )
    .await;
    assert!(
        r.ndjson().last().unwrap().get("error").is_some(),
        "{}",
        r.dump()
    );
    c.backends[0].fail_next(1, FailureMode::Status(500));
    let r = send(post(
        &c,
        "/api/copy",
        &json!({"source": "m", "destination": "n"}),
    ))
    .await;
    assert_eq!(r.status, 500, "{}", r.text);
    let r = send(delete(&c, &json!({"model": "nope"}))).await;
    assert_eq!(r.status, 404, "{}", r.text);

    let metrics = send(c.http().get(c.at("/metrics")).bearer_auth(ROUTER_KEY))
        .await
        .text;
    for (operation, outcome, n) in [
        ("pull", "success", 1),
        ("pull", "failed", 1),
        ("copy", "failed", 1),
        ("delete", "refused", 1),
    ] {
        let line = format!(
            "switchyard_sidecar_model_management_total{{operation=\"{operation}\",outcome=\"{outcome}\"}} {n}"
        );
        assert!(metrics.contains(&line), "{line} missing in:\n{metrics}");
    }
    assert!(
        !metrics.contains("operation=\"delete\",outcome=\"failed\""),
        "a refusal is not also a failure:\n{metrics}"
    );
    assert!(
        !metrics.contains("operation=\"copy\",outcome=\"refused\""),
        "a failure is not also a refusal:\n{metrics}"
    );
}
