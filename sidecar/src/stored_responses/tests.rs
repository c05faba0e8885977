//! Id validation, target selection and error bodies; and, through a
//! standalone sidecar in front of tiny OpenAI-style backends, how the
//! answers of several backends are chosen (the system tests in
//! `tests/system/tests/stored_responses.rs` run the whole flow against the
//! full fake).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use axum::{Json, Router as AxumRouter, response::IntoResponse};
use serde_json::{Value, json};
use switchyard_control_plane::{
    cluster::{ClusterState, EndpointState},
    config::Config,
};

use super::*;
use crate::{Mode, SidecarHandle, StartOptions, start};

#[test]
fn ids_are_checked_before_any_backend_is_asked() {
    for ok in ["resp_1", "a", "A-b_9", &"r".repeat(MAX_ID_LEN)] {
        assert!(validate_id(ok).is_ok(), "{ok}");
    }
    for bad in [
        "",
        "a.b",
        "a/b",
        "a b",
        "é",
        "a?b",
        "..",
        &"r".repeat(MAX_ID_LEN + 1),
    ] {
        let e = validate_id(bad).unwrap_err();
        assert_eq!(e.status(), 400, "{bad}");
        let (_, body) = e.to_body(ApiFormat::OpenAi);
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "response_id");
    }
}

#[test]
fn only_a_true_stream_is_refused() {
    assert!(wants_stream(Some("stream=true")));
    assert!(wants_stream(Some("include%5B%5D=x&stream=True")));
    assert!(wants_stream(Some("stream=1")));
    assert!(!wants_stream(Some("stream=false")));
    assert!(!wants_stream(Some("streams=true")));
    assert!(!wants_stream(None));
    let (status, body) = ProxyError::StoredResponseStreamUnsupported.to_body(ApiFormat::OpenAi);
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "stream");
}

#[test]
fn not_found_is_openais_error() {
    let (status, body) = ProxyError::ResponseNotFound {
        id: "resp_x".into(),
    }
    .to_body(ApiFormat::OpenAi);
    assert_eq!(status, 404);
    assert_eq!(
        body,
        json!({"error": {"message": "No response found with id 'resp_x'.",
            "type": "invalid_request_error", "param": null, "code": "not_found"}})
    );
}

#[test]
fn every_kind_is_asked_unless_it_fails_its_probes() {
    let endpoint = |url: &str, kind, healthy, detail: &str, draining| EndpointState {
        healthy,
        health_detail: detail.to_owned(),
        draining,
        ..EndpointState::new(url, kind)
    };
    let state = ClusterState {
        endpoints: vec![
            endpoint("http://o", EndpointKind::Ollama, true, "", false),
            endpoint("http://a/v1", EndpointKind::OpenAi, true, "", true),
            endpoint(
                "http://l",
                EndpointKind::LlamaServer,
                false,
                NOT_PROBED,
                false,
            ),
            endpoint(
                "http://down/v1",
                EndpointKind::OpenAi,
                false,
                "GET /v1/models: connection refused",
                false,
            ),
        ],
        ..ClusterState::default()
    };
    let (ask, down) = targets(&state);
    let urls: Vec<&str> = ask.iter().map(|t| &*t.url).collect();
    assert_eq!(urls, ["http://o", "http://a/v1", "http://l"]);
    assert_eq!(down, 1);
    // Each kind's OpenAI base.
    let paths: Vec<String> = ask
        .iter()
        .map(|t| {
            format!(
                "{}{}",
                openai_base(&t.url, t.kind),
                Operation::InputItems.backend_path("r")
            )
        })
        .collect();
    assert_eq!(
        paths,
        [
            "http://o/v1/responses/r/input_items",
            "http://a/v1/responses/r/input_items",
            "http://l/v1/responses/r/input_items",
        ]
    );
}

/// What a tiny backend answers on `/v1/responses/...`.
#[derive(Clone, Copy, Debug)]
enum Does {
    /// This status, with `{"id": <id>, "from": <name>}` (or an error body).
    Answer(u16),
    /// After a pause, 200.
    SlowOk,
    /// Never answers; counts the requests dropped by the sidecar.
    Hang,
}

struct Tiny {
    url: String,
    asked: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
}

struct DropCount(Arc<AtomicUsize>);

impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

async fn tiny(name: &'static str, does: Does) -> Tiny {
    let asked = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    let (a, d) = (asked.clone(), dropped.clone());
    let app = AxumRouter::new()
        .route(
            "/v1/models",
            get(|| async {
                Json(json!({"object": "list", "data": [{"id": "m", "object": "model"}]}))
            }),
        )
        .route(
            "/v1/responses/{id}",
            get(move |Path(id): Path<String>| {
                let (a, d) = (a.clone(), d.clone());
                async move {
                    a.fetch_add(1, Ordering::SeqCst);
                    match does {
                        Does::Answer(status) => {
                            let status = StatusCode::from_u16(status).unwrap();
                            let body = if status.is_success() {
                                json!({"id": id, "from": name})
                            } else {
                                json!({"error": {"message": format!("{name} says {status}")}})
                            };
                            (status, Json(body)).into_response()
                        }
                        Does::SlowOk => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            Json(json!({"id": id, "from": name})).into_response()
                        }
                        Does::Hang => {
                            let _guard = DropCount(d);
                            std::future::pending::<()>().await;
                            StatusCode::OK.into_response()
                        }
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Tiny {
        url,
        asked,
        dropped,
    }
}

async fn sidecar(backends: &[&Tiny]) -> SidecarHandle {
    let urls: Vec<&str> = backends.iter().map(|b| b.url.as_str()).collect();
    sidecar_on(&urls).await
}

/// A standalone sidecar over the endpoints at `urls`, probing every 0.1 s.
async fn sidecar_on(urls: &[&str]) -> SidecarHandle {
    let urls: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    let yaml = format!("endpoints: [{}]\nprobe_interval: 0.1\n", urls.join(", "));
    let config = Config::from_yaml(&yaml, &|_| None).unwrap();
    start(StartOptions {
        mode: Mode::Standalone {
            config,
            control_plane_listen: None,
        },
        listen: "127.0.0.1:0".parse().unwrap(),
        name: "test".into(),
    })
    .await
    .unwrap()
}

async fn get_json(handle: &SidecarHandle, path: &str) -> (u16, Value) {
    let r = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{}{path}", handle.addr))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test]
async fn the_holders_answer_wins_over_refusals_and_404s() {
    // A backend refusing its key answers first; the holder (slow) still
    // wins, and the other 404s.
    let refusing = tiny("refusing", Does::Answer(401)).await;
    let holder = tiny("holder", Does::SlowOk).await;
    let empty = tiny("empty", Does::Answer(404)).await;
    let handle = sidecar(&[&refusing, &holder, &empty]).await;
    let (status, body) = get_json(&handle, "/v1/responses/resp_1").await;
    assert_eq!((status, &body["from"]), (200, &json!("holder")), "{body}");
    // Without a 2xx, the refusal is the answer (passed through).
    let handle = sidecar(&[&refusing, &empty]).await;
    let (status, body) = get_json(&handle, "/v1/responses/resp_1").await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["message"], "refusing says 401 Unauthorized");
}

#[tokio::test]
async fn failures_are_502_or_503_without_urls() {
    let failing = tiny("failing", Does::Answer(500)).await;
    let empty = tiny("empty", Does::Answer(404)).await;
    // Some 404, one failed: the holder may be the failed one.
    let handle = sidecar(&[&failing, &empty]).await;
    let (status, body) = get_json(&handle, "/v1/responses/resp_1").await;
    assert_eq!(status, 502, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("no backend could be asked for response 'resp_1'"),
        "{message}"
    );
    assert!(!message.contains("127.0.0.1"), "{message}");
    // The others 404, one endpoint fails its probes (not asked): the
    // holder may be that one, so no 404.
    let down = "http://127.0.0.1:1/v1";
    let with_down = sidecar_on(&[&empty.url, down]).await;
    // Wait for the probe to mark it down (before that it is asked, and
    // its refused connection is a failure like any other).
    for _ in 0..500 {
        let (_, down) = targets(&with_down.router().cluster_state());
        if down == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(targets(&with_down.router().cluster_state()).1, 1);
    let answered = get_json(&with_down, "/v1/responses/resp_1").await;
    assert_eq!(answered.0, 502, "{}", answered.1);
    assert_eq!(empty.asked.load(Ordering::SeqCst), 2);
    let message = answered.1["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("fail their health probes"), "{message}");
    // Nobody answered.
    let handle = sidecar(&[&failing]).await;
    let (status, body) = get_json(&handle, "/v1/responses/resp_1").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["type"], "server_error");
}

#[tokio::test]
async fn the_first_answer_cancels_the_other_requests() {
    let hanging = tiny("hanging", Does::Hang).await;
    let holder = tiny("holder", Does::Answer(200)).await;
    let handle = sidecar(&[&hanging, &holder]).await;
    let answered = tokio::time::timeout(
        Duration::from_secs(5),
        get_json(&handle, "/v1/responses/resp_1"),
    )
    .await
    .expect("the hanging backend held the answer back");
    assert_eq!(answered.0, 200, "{}", answered.1);
    assert_eq!(hanging.asked.load(Ordering::SeqCst), 1);
    for _ in 0..500 {
        if hanging.dropped.load(Ordering::SeqCst) == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the request to the hanging backend was not cancelled");
}
