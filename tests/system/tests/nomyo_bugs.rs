//! One test per bug of nomyo-router (`shared/reference/nomyo-routing.md`,
//! "Its bugs"), each named after the bug it proves fixed. Every cluster
//! here is a real control plane over gRPC plus a remote-mode sidecar.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::{Value, json};
use switchyard_system_tests::{
    BackendOptions, Cluster, FailureMode, Framing, SOON, SseEvent,
    client::{StreamReply, get, ollama_error_text, openai_error_message, post_json, stream},
    embedding_for, ollama_fake, openai_fake,
    wait::wait_until,
};

const TEXT: &str = "tok0 tok1 tok2";

fn ndjson_text(lines: &[Value], field: &str) -> String {
    lines
        .iter()
        .filter_map(|l| match field {
            "message" => l["message"]["content"].as_str(),
            f => l[f].as_str(),
        })
        .collect()
}

async fn one_ollama() -> Cluster {
    Cluster::builder()
        .backend(ollama_fake(&["m:latest"]))
        .start()
        .await
}

async fn one_openai() -> Cluster {
    Cluster::builder()
        .backend(openai_fake(&["gpt-x"]))
        .start()
        .await
}

/// An Ollama backend with `m` and an OpenAI one with `gpt-x`, six chunks
/// per stream, both failing in `mode`.
async fn both_failing(mode: FailureMode) -> Cluster {
    let c = Cluster::builder()
        .backend(ollama_fake(&["m:latest"]).chunks(6))
        .backend(openai_fake(&["gpt-x"]).chunks(6))
        .start()
        .await;
    c.backend(0).set_failure(mode);
    c.backend(1).set_failure(mode);
    c
}

/// A streamed one-message chat ("hi") to `model` on `path`.
async fn stream_hi(c: &Cluster, path: &str, model: &str, framing: Framing) -> StreamReply {
    stream(
        c.http().post(c.at(path)).json(&json!({
            "model": model, "stream": true,
            "messages": [{"role": "user", "content": "hi"}]
        })),
        framing,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug01_streaming_api_chat_to_ollama_delivers_final_done_chunk() {
    let c = one_ollama().await;
    let r = stream_hi(&c, "/api/chat", "m", Framing::Ndjson).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert!(r.content_type.contains("ndjson"), "{}", r.dump());
    let lines = r.ndjson();
    let last = lines.last().expect("no line at all");
    assert_eq!(
        last["done"],
        json!(true),
        "last line is not done:true: {}",
        r.dump()
    );
    assert_eq!(last["done_reason"], json!("stop"), "{}", r.dump());
    assert_eq!(ndjson_text(&lines, "message"), TEXT, "{}", r.dump());
    assert!(
        r.trailing.is_empty() && r.transport_error.is_none(),
        "{}",
        r.dump()
    );
    c.wait_usage(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug02_api_chat_without_stream_field_streams_ndjson_to_done() {
    let c = one_ollama().await;
    let r = stream(
        c.http().post(c.at("/api/chat")).json(&json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}]
        })),
        Framing::Ndjson,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let lines = r.ndjson();
    assert!(
        lines.len() >= 2,
        "Ollama's default is to stream: expected several NDJSON lines, got {}",
        r.dump()
    );
    assert_eq!(lines.last().unwrap()["done"], json!(true), "{}", r.dump());
    assert_eq!(ndjson_text(&lines, "message"), TEXT, "{}", r.dump());
    // Same for /api/generate.
    let r = stream(
        c.http()
            .post(c.at("/api/generate"))
            .json(&json!({"model": "m", "prompt": "hi"})),
        Framing::Ndjson,
    )
    .await;
    let lines = r.ndjson();
    assert!(lines.len() >= 2, "{}", r.dump());
    assert_eq!(lines.last().unwrap()["done"], json!(true), "{}", r.dump());
    assert_eq!(ndjson_text(&lines, "response"), TEXT, "{}", r.dump());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug03_unknown_model_is_404_in_client_format_listing_models() {
    let c = Cluster::builder()
        .backend(ollama_fake(&["m:latest"]))
        .backend(openai_fake(&["gpt-x"]))
        .start()
        .await;
    let body = json!({"model": "nope", "stream": false,
                      "messages": [{"role": "user", "content": "hi"}]});
    let r = post_json(c.http(), &c.at("/api/chat"), &body).await;
    assert_eq!(r.status, 404, "{}", r.text);
    let text = ollama_error_text(&r);
    assert!(
        text.contains("nope"),
        "error does not name the model: {text}"
    );
    assert!(
        text.contains("m:latest"),
        "error does not list available models: {text}"
    );
    assert!(
        text.contains("gpt-x"),
        "error does not list available models: {text}"
    );

    let r = post_json(c.http(), &c.at("/v1/chat/completions"), &body).await;
    assert_eq!(r.status, 404, "{}", r.text);
    let msg = openai_error_message(&r);
    assert!(msg.contains("nope") && msg.contains("m:latest"), "{msg}");
    assert!(r.json()["error"]["type"].is_string(), "{}", r.text);

    let r = post_json(
        c.http(),
        &c.at("/api/embed"),
        &json!({"model": "nope", "input": "x"}),
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text);
    ollama_error_text(&r);
    c.wait_usage(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug04_backend_failure_mid_stream_ends_with_error_in_client_format() {
    // Ollama client, Ollama backend that resets the connection mid-stream.
    let c = both_failing(FailureMode::MidStreamDrop).await;
    let r = stream_hi(&c, "/api/chat", "m", Framing::Ndjson).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let lines = r.ndjson();
    assert!(
        lines.len() >= 2,
        "expected content, then an error line: {}",
        r.dump()
    );
    let last = lines.last().unwrap();
    assert!(
        last["error"].is_string(),
        "stream did not end with an {{\"error\":..}} line: {}",
        r.dump()
    );
    assert!(
        !lines.iter().any(|l| l["done"] == json!(true)),
        "a cut stream must not claim done:true: {}",
        r.dump()
    );
    assert!(lines[0]["message"]["content"].is_string(), "{}", r.dump());

    // OpenAI client, OpenAI backend: the SSE stream ends with an error event.
    let r = stream_hi(&c, "/v1/chat/completions", "gpt-x", Framing::Sse).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let events = r.sse();
    let errors: Vec<_> = events
        .iter()
        .filter(|e| matches!(e, SseEvent::Json(v) if v["error"]["message"].is_string()))
        .collect();
    assert_eq!(errors.len(), 1, "expected one error event: {}", r.dump());
    assert!(
        events
            .iter()
            .any(|e| matches!(e, SseEvent::Json(v) if v["choices"].is_array())),
        "content before the failure was lost: {}",
        r.dump()
    );

    // Ollama client, OpenAI backend (translated stream): an error line too.
    let r = stream_hi(&c, "/api/chat", "gpt-x", Framing::Ndjson).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let lines = r.ndjson();
    assert!(
        lines.last().is_some_and(|l| l["error"].is_string()),
        "translated stream did not end with an error line: {}",
        r.dump()
    );
    assert!(
        !lines.iter().any(|l| l["done"] == json!(true)),
        "{}",
        r.dump()
    );
    c.wait_usage(0).await;
}

/// A backend that dies in the middle of a line or event: the half frame is
/// not passed on, so every line the client gets parses and the error is a
/// frame of its own (glued onto the half line, neither parsed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug04_failure_mid_line_ends_with_an_error_frame_of_its_own() {
    let c = both_failing(FailureMode::MidLineDrop).await;

    // `ndjson()` fails on any line that is not JSON.
    let r = stream_hi(&c, "/api/chat", "m", Framing::Ndjson).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let lines = r.ndjson();
    assert!(lines[0]["message"]["content"].is_string(), "{}", r.dump());
    assert!(
        lines.last().is_some_and(|l| l["error"].is_string()),
        "stream did not end with an {{\"error\":..}} line: {}",
        r.dump()
    );

    let r = stream_hi(&c, "/v1/chat/completions", "gpt-x", Framing::Sse).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let events = r.sse();
    assert!(
        events.iter().all(|e| !matches!(e, SseEvent::Text(_))),
        "an event that is not JSON: {}",
        r.dump()
    );
    assert!(
        events
            .last()
            .is_some_and(|e| matches!(e, SseEvent::Json(v) if v["error"]["message"].is_string())),
        "stream did not end with an error event: {}",
        r.dump()
    );
    c.wait_usage(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug04_failure_before_first_byte_is_retried_on_another_endpoint() {
    // priority_routing: the failing endpoint (first in config order) is
    // chosen first, so the retry is certain to be exercised. A fresh
    // cluster per failure: the first failure marks the endpoint failing.
    for failure in [
        FailureMode::Reset,
        FailureMode::Status(503),
        FailureMode::Status(500),
    ] {
        let c = Cluster::builder()
            .backend(ollama_fake(&["m:latest"]).label("bad"))
            .backend(ollama_fake(&["m:latest"]).label("good"))
            .set("priority_routing", "true")
            .start()
            .await;
        c.backend(0).set_failure(failure);
        let r = stream_hi(&c, "/api/chat", "m", Framing::Ndjson).await;
        assert_eq!(r.status, 200, "{failure:?}: {}", r.dump());
        let lines = r.ndjson();
        assert_eq!(
            lines.last().unwrap()["done"],
            json!(true),
            "{failure:?}: {}",
            r.dump()
        );
        assert_eq!(
            ndjson_text(&lines, "message"),
            TEXT,
            "{failure:?}: {}",
            r.dump()
        );
        assert_eq!(
            c.backend(0).request_count("/api/chat"),
            1,
            "{failure:?}: the failing endpoint was tried first"
        );
        assert_eq!(
            c.backend(1).request_count("/api/chat"),
            1,
            "{failure:?}: the healthy endpoint served the retry"
        );
        c.wait_usage(0).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug04_dead_endpoint_leaves_rotation_within_seconds() {
    let c = Cluster::builder()
        .backend(ollama_fake(&["m:latest"]))
        .backend(ollama_fake(&["m:latest"]))
        .start()
        .await;
    c.backend(0).shutdown().await;
    c.wait_healthy(0, false).await;
    for i in 0..4 {
        let r = post_json(
            c.http(),
            &c.at("/api/chat"),
            &json!({"model": "m", "stream": false,
                    "messages": [{"role": "user", "content": format!("q{i}")}]}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    assert_eq!(c.backend(1).request_count("/api/chat"), 4);
    c.wait_usage(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug05_counters_do_not_leak_after_backend_errors() {
    let c = Cluster::builder()
        .backend_with(
            ollama_fake(&["m:latest"]).chunks(6),
            BackendOptions::max_concurrent(1),
        )
        .set("max_attempts", "1")
        .start()
        .await;
    for failure in [
        FailureMode::Status(500),
        FailureMode::Reset,
        FailureMode::MidStreamDrop,
        FailureMode::MidStreamError,
    ] {
        c.backend(0).set_failure(failure);
        let r = stream_hi(&c, "/api/chat", "m", Framing::Ndjson).await;
        assert!(
            r.status >= 500 || r.chunks.iter().any(|l| l.text.contains("\"error\"")),
            "{failure:?} was not reported to the client: {}",
            r.dump()
        );
        c.wait_usage(0).await;
    }
    // And the endpoint is usable again afterwards (no phantom in-flight
    // count holding its only slot).
    c.backend(0).set_failure(FailureMode::None);
    let r = post_json(
        c.http(),
        &c.at("/api/chat"),
        &json!({"model": "m", "stream": false, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    c.wait_usage(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug05_counters_do_not_leak_after_client_disconnect_mid_stream() {
    let c = Cluster::builder()
        .backend(
            ollama_fake(&["m:latest"])
                .chunks(50)
                .chunk_delay(Duration::from_millis(100)),
        )
        .start()
        .await;
    for path in ["/api/chat", "/v1/chat/completions"] {
        let before = c.backend(0).cancelled_count();
        let resp = c
            .http()
            .post(c.at(path))
            .json(&json!({"model": "m", "stream": true,
                          "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut resp = resp;
        let first = tokio::time::timeout(SOON, resp.chunk())
            .await
            .unwrap()
            .unwrap();
        assert!(first.is_some(), "{path}: no first chunk");
        assert_eq!(c.usage(), 1, "{path}: the running request is counted");
        drop(resp); // the client goes away mid-stream
        assert!(
            c.backend(0).wait_for_cancelled(before + 1, SOON).await,
            "{path}: the backend never saw the cancellation (cancelled count {})",
            c.backend(0).cancelled_count()
        );
        c.wait_usage(0).await;
        assert!(c.backend(0).wait_for_idle(SOON).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug05_counters_do_not_leak_when_the_client_gives_up_before_the_first_byte() {
    let c = Cluster::builder()
        .backend(ollama_fake(&["m:latest"]))
        .backend(openai_fake(&["gpt-x"]))
        .start()
        .await;
    for (i, (path, model)) in [
        ("/api/chat", "m"),
        ("/api/chat", "gpt-x"),
        ("/v1/chat/completions", "gpt-x"),
    ]
    .into_iter()
    .enumerate()
    {
        let fake = usize::from(model == "gpt-x");
        c.backend(fake).hold_requests(true);
        let before = c.backend(fake).cancelled_count();
        let http = c.http().clone();
        let url = c.at(path);
        let client = tokio::spawn(async move {
            http.post(url)
                .json(&json!({"model": model, "stream": true,
                              "messages": [{"role": "user", "content": format!("q{i}")}]}))
                .send()
                .await
        });
        assert!(
            c.backend(fake).wait_for_waiting(1, SOON).await,
            "{path} {model}: request never reached the backend"
        );
        c.wait_usage(1).await;
        client.abort(); // the client hangs up while the backend is silent
        assert!(
            c.backend(fake).wait_for_cancelled(before + 1, SOON).await,
            "{path} {model}: the backend never saw the cancellation"
        );
        c.wait_usage(0).await;
        c.backend(fake).hold_requests(false);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug06_openai_stream_has_finish_reason_and_done_and_no_stream_options_when_not_streaming() {
    let c = Cluster::builder()
        .backend(openai_fake(&["gpt-x"]))
        .backend(ollama_fake(&["m:latest"]))
        .start()
        .await;
    for (model, fake) in [("gpt-x", 0), ("m", 1)] {
        let r = stream_hi(&c, "/v1/chat/completions", model, Framing::Sse).await;
        assert_eq!(r.status, 200, "{}", r.dump());
        let events = r.sse();
        assert_eq!(
            events.last(),
            Some(&SseEvent::Done),
            "{model}: no final [DONE]: {}",
            r.dump()
        );
        let finish: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                SseEvent::Json(v) => v["choices"][0]["finish_reason"].as_str().map(str::to_owned),
                _ => None,
            })
            .collect();
        assert_eq!(
            finish,
            ["stop"],
            "{model}: finish_reason chunk: {}",
            r.dump()
        );
        let text: String = events
            .iter()
            .filter_map(|e| match e {
                SseEvent::Json(v) => v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned),
                _ => None,
            })
            .collect();
        assert_eq!(text, TEXT, "{}", r.dump());

        let r = post_json(
            c.http(),
            &c.at("/v1/chat/completions"),
            &json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json()["choices"][0]["message"]["content"], json!(TEXT));
        let sent = c
            .backend(fake)
            .last_request_to("/v1/chat/completions")
            .unwrap();
        let sent = sent.json().unwrap();
        assert!(
            sent.get("stream_options").is_none(),
            "{model}: non-stream request forwarded with stream_options: {sent}"
        );
        assert_ne!(sent["stream"], json!(true), "{sent}");
    }
    c.wait_usage(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug07_translated_streaming_generate_ends_with_done() {
    let c = one_openai().await;
    let r = stream(
        c.http()
            .post(c.at("/api/generate"))
            .json(&json!({"model": "gpt-x", "prompt": "once", "stream": true})),
        Framing::Ndjson,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let lines = r.ndjson();
    let last = lines.last().expect("no lines");
    assert_eq!(last["done"], json!(true), "{}", r.dump());
    assert!(last["done_reason"].is_string(), "{}", r.dump());
    assert_eq!(ndjson_text(&lines, "response"), TEXT, "{}", r.dump());
    assert!(
        lines[..lines.len() - 1]
            .iter()
            .all(|l| l["done"] == json!(false)),
        "{}",
        r.dump()
    );
    // It really went through translation to the OpenAI API.
    let upstream = c.backend(0).total_requests();
    assert!(
        c.backend(0).request_count("/v1/completions")
            + c.backend(0).request_count("/v1/chat/completions")
            >= 1,
        "no OpenAI request reached the backend ({upstream} requests)"
    );
    c.wait_usage(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug08_translated_embed_with_list_returns_every_embedding_in_order() {
    let c = one_openai().await;
    let inputs = ["alpha", "beta", "gamma", "delta"];
    let r = post_json(
        c.http(),
        &c.at("/api/embed"),
        &json!({"model": "gpt-x", "input": inputs}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let body = r.json();
    let got = body["embeddings"]
        .as_array()
        .unwrap_or_else(|| panic!("no embeddings: {body}"));
    assert_eq!(got.len(), inputs.len(), "{body}");
    let dims = c.backend(0).embedding_dims();
    for (input, vector) in inputs.iter().zip(got) {
        let want = embedding_for(input, dims);
        let vector: Vec<f64> = vector
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(vector.len(), want.len(), "{input}");
        for (a, b) in vector.iter().zip(&want) {
            assert!(
                (a - f64::from(*b)).abs() < 1e-5,
                "{input}: {vector:?} != {want:?}"
            );
        }
    }
    assert_eq!(body["model"], json!("gpt-x"), "{body}");
    c.wait_usage(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug09_image_message_keeps_its_text_when_translated() {
    let c = one_openai().await;
    let png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";
    let r = post_json(
        c.http(),
        &c.at("/api/chat"),
        &json!({"model": "gpt-x", "stream": false, "messages": [
            {"role": "user", "content": "describe this picture", "images": [png]}
        ]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["message"]["content"], json!(TEXT), "{}", r.text);
    let sent = c
        .backend(0)
        .last_request_to("/v1/chat/completions")
        .expect("nothing forwarded");
    let sent = sent.json().unwrap();
    let content = &sent["messages"][0]["content"];
    let parts = content
        .as_array()
        .unwrap_or_else(|| panic!("content is not a part list: {sent}"));
    assert!(
        parts
            .iter()
            .any(|p| p["type"] == json!("text") && p["text"] == json!("describe this picture")),
        "the text part was lost: {sent}"
    );
    let image = parts
        .iter()
        .find(|p| p["type"] == json!("image_url"))
        .unwrap_or_else(|| panic!("the image part was lost: {sent}"));
    let url = image["image_url"]["url"].as_str().unwrap_or_default();
    assert!(url.starts_with("data:image/"), "{url}");
    assert!(url.ends_with(png), "image data changed: {url}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug10_tags_work_when_an_openai_endpoint_has_no_api_key_entry() {
    let c = Cluster::builder()
        .backend(ollama_fake(&["m:latest"]))
        .backend(openai_fake(&["gpt-x"]))
        .backend_with(
            openai_fake(&["gpt-keyed"]).api_key("k1"),
            BackendOptions::api_key("k1"),
        )
        .start()
        .await;
    let r = get(c.http(), &c.at("/api/tags")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let names: Vec<String> = r.json()["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    for want in ["m", "gpt-x", "gpt-keyed"] {
        assert!(
            names
                .iter()
                .any(|n| n == want || *n == format!("{want}:latest")),
            "{want} missing from /api/tags: {names:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug11_health_is_503_when_every_backend_is_down_and_200_when_one_is_up() {
    let c = Cluster::builder()
        .backend(ollama_fake(&["m:latest"]))
        .backend(openai_fake(&["gpt-x"]))
        .start()
        .await;
    let r = get(c.http(), &c.at("/health")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    c.backend(0).shutdown().await;
    c.wait_healthy(0, false).await;
    let r = get(c.http(), &c.at("/health")).await;
    assert_eq!(r.status, 200, "one backend is still up: {}", r.text);
    c.backend(1).shutdown().await;
    c.wait_healthy(1, false).await;
    let r = get(c.http(), &c.at("/health")).await;
    assert_eq!(r.status, 503, "every backend is down: {}", r.text);
    c.backend(1).restart().await.unwrap();
    c.wait_healthy(1, true).await;
    let r = get(c.http(), &c.at("/health")).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug12_remote_image_urls_are_never_fetched_by_the_router() {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let image_url = format!("http://{}/cat.png", listener.local_addr().unwrap());
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    let watcher = tokio::spawn(async move {
        while let Ok((_socket, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    let c = Cluster::builder()
        .backend(openai_fake(&["gpt-x"]))
        .backend(ollama_fake(&["m:latest"]))
        .start()
        .await;
    for model in ["gpt-x", "m"] {
        let r = post_json(
            c.http(),
            &c.at("/v1/chat/completions"),
            &json!({"model": model, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "what is this"},
                {"type": "image_url", "image_url": {"url": image_url}}
            ]}]}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    // Passed through untouched: the backend decides what to do with it.
    let sent = c
        .backend(0)
        .last_request_to("/v1/chat/completions")
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        sent["messages"][0]["content"][1]["image_url"]["url"],
        json!(image_url),
        "{sent}"
    );
    // An Ollama client putting a URL where base64 belongs, to a backend
    // that needs translation: refused or forwarded, but never fetched.
    let r = post_json(
        c.http(),
        &c.at("/api/chat"),
        &json!({"model": "gpt-x", "stream": false, "messages": [
            {"role": "user", "content": "what is this", "images": [image_url]}
        ]}),
    )
    .await;
    assert!(r.status == 200 || r.status == 400, "{}", r.text);
    // Asserting that something did NOT happen needs a window: a fetch the
    // router started in the background would connect within it.
    wait_until("requests to settle", SOON, || c.usage() == 0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "the router connected to the client-supplied image URL"
    );
    watcher.abort();
}
