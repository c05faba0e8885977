//! Conversation affinity: with `conversation_affinity: true` and the model
//! loaded on two backends, every turn of one conversation (a growing
//! message list with the same first messages) lands on the backend that
//! served its first turn, and an `X-Session-Id` header pins the same way.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};
use switchyard_system_tests::{Cluster, FailureMode, client::send, ollama_fake};

/// Index of the backend that served the last request (the only one whose
/// served count grew).
fn served_by(c: &Cluster, before: &[u64]) -> usize {
    let now: Vec<u64> = c.backends.iter().map(|b| b.model_requests("m")).collect();
    let grew: Vec<usize> = (0..now.len()).filter(|i| now[*i] > before[*i]).collect();
    assert_eq!(
        grew.len(),
        1,
        "exactly one backend should have served: {before:?} -> {now:?}"
    );
    grew[0]
}

fn counts(c: &Cluster) -> Vec<u64> {
    c.backends.iter().map(|b| b.model_requests("m")).collect()
}

async fn affinity_cluster() -> Cluster {
    Cluster::builder()
        .backend(ollama_fake(&["m:latest"]))
        .backend(ollama_fake(&["m:latest"]))
        .set("conversation_affinity", "true")
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_of_one_conversation_land_on_the_same_backend() {
    let c = affinity_cluster().await;
    // Several conversations, several turns each: without affinity the
    // random tie-break would split them (chance of a false pass 2^-15).
    for conv in 0..3 {
        let mut messages: Vec<Value> = vec![
            json!({"role": "system", "content": format!("you are assistant {conv}")}),
            json!({"role": "user", "content": format!("conversation {conv} starts")}),
        ];
        let mut first = None;
        for turn in 0..6 {
            let (path, body) = if turn % 2 == 0 {
                (
                    "/api/chat",
                    json!({"model": "m", "stream": false, "messages": messages}),
                )
            } else {
                (
                    "/v1/chat/completions",
                    json!({"model": "m", "messages": messages}),
                )
            };
            let before = counts(&c);
            let r = send(c.http().post(c.at(path)).json(&body)).await;
            assert_eq!(r.status, 200, "{}", r.text);
            let backend = served_by(&c, &before);
            match first {
                None => first = Some(backend),
                Some(f) => assert_eq!(
                    backend, f,
                    "conversation {conv} turn {turn} moved from backend {f} to {backend}"
                ),
            }
            messages.push(json!({"role": "assistant", "content": "tok0 tok1 tok2"}));
            messages.push(json!({"role": "user", "content": format!("turn {turn}")}));
        }
    }
    c.wait_usage(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_header_pins_requests_to_one_backend() {
    let c = affinity_cluster().await;
    let mut seen = Vec::new();
    for session in ["alpha", "beta", "gamma"] {
        let mut first = None;
        for i in 0..5 {
            let before = counts(&c);
            let r = send(
                c.http()
                    .post(c.at("/api/chat"))
                    .header("X-Session-Id", session)
                    .json(&json!({"model": "m", "stream": false, "messages": [
                        {"role": "user", "content": format!("unrelated question {i} in {session}")}
                    ]})),
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.text);
            let backend = served_by(&c, &before);
            match first {
                None => first = Some(backend),
                Some(f) => assert_eq!(backend, f, "session {session} request {i} moved"),
            }
        }
        seen.push(first.unwrap());
    }
    c.wait_usage(0).await;
}

/// The Responses API (`instructions` + `input` items, resent whole each
/// turn, as stateless clients such as Codex do) and Anthropic Messages
/// (top-level `system` + `messages`) keep their conversations on one
/// backend too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_and_anthropic_conversations_stay_on_one_backend() {
    let c = affinity_cluster().await;
    for conv in 0..3 {
        for anthropic in [false, true] {
            let mut turns: Vec<Value> =
                vec![json!({"role": "user", "content": format!("conversation {conv} starts")})];
            let mut first = None;
            for turn in 0..5 {
                let (path, body) = if anthropic {
                    (
                        "/v1/messages",
                        json!({"model": "m", "max_tokens": 16, "system": format!("assistant {conv}"), "messages": turns}),
                    )
                } else {
                    (
                        "/v1/responses",
                        json!({"model": "m", "instructions": format!("assistant {conv}"), "input": turns}),
                    )
                };
                let before = counts(&c);
                let r = send(c.http().post(c.at(path)).json(&body)).await;
                assert_eq!(r.status, 200, "{path}: {}", r.text);
                let backend = served_by(&c, &before);
                match first {
                    None => first = Some(backend),
                    Some(f) => assert_eq!(
                        backend, f,
                        "{path} conversation {conv} turn {turn} moved from backend {f} to {backend}"
                    ),
                }
                turns.push(json!({"role": "assistant", "content": "tok0 tok1"}));
                turns.push(json!({"role": "user", "content": format!("turn {turn}")}));
            }
        }
    }
    c.wait_usage(0).await;
}

/// A Responses chain continued by `previous_response_id` alone (no
/// opening to hash) must reach the backend that stored the response: the
/// fakes, like OpenAI and vLLM, refuse a previous id they did not give
/// (400). Each answer's id (whole or streamed) is pinned to its backend,
/// through any sidecar, remote and standalone. Without the pin each turn
/// lands on either backend (chance of a false pass 2^-24).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_responses_chain_stays_on_the_backend_that_stored_it() {
    for standalone in [false, true] {
        let builder = Cluster::builder()
            .backend(ollama_fake(&["m:latest"]))
            .backend(ollama_fake(&["m:latest"]))
            .set("conversation_affinity", "true");
        let c = if standalone {
            builder.standalone().start().await
        } else {
            builder.sidecars(2).start().await
        };
        let sidecars = if standalone { 1 } else { 2 };
        for chain in 0..3 {
            let mut previous: Option<String> = None;
            let mut first = None;
            for turn in 0..5 {
                let stream = turn % 2 == 1;
                let mut body = json!({"model": "m", "input": format!("chain {chain} turn {turn}"), "stream": stream});
                if let Some(id) = &previous {
                    body["previous_response_id"] = json!(id);
                }
                let url = format!("{}/v1/responses", c.url(turn % sidecars));
                let before = counts(&c);
                let id = if stream {
                    let r = switchyard_system_tests::client::stream(
                        c.http().post(&url).json(&body),
                        switchyard_system_tests::Framing::Sse,
                    )
                    .await;
                    assert_eq!(r.status, 200, "chain {chain} turn {turn}: {}", r.dump());
                    r.sse()
                        .iter()
                        .find_map(|e| match e {
                            switchyard_system_tests::client::SseEvent::Json(v)
                                if v["type"] == "response.completed" =>
                            {
                                v["response"]["id"].as_str().map(str::to_owned)
                            }
                            _ => None,
                        })
                        .unwrap_or_else(|| panic!("no response.completed: {}", r.dump()))
                } else {
                    let r = send(c.http().post(&url).json(&body)).await;
                    assert_eq!(r.status, 200, "chain {chain} turn {turn}: {}", r.text);
                    let v: Value = serde_json::from_str(&r.text).unwrap();
                    v["id"].as_str().unwrap().to_owned()
                };
                let backend = served_by(&c, &before);
                match first {
                    None => first = Some(backend),
                    Some(f) => assert_eq!(backend, f, "chain {chain} turn {turn} moved"),
                }
                previous = Some(id);
            }
        }
        c.wait_usage(0).await;
    }
}

/// Stores a first response through `url`: the backend that holds it, and
/// its id.
async fn open_response(c: &Cluster, url: &str) -> (usize, String) {
    let before = counts(c);
    let r = send(
        c.http()
            .post(url)
            .json(&json!({"model": "m", "input": "opens"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let holder = served_by(c, &before);
    let id = serde_json::from_str::<Value>(&r.text).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    (holder, id)
}

/// Two branches continuing the same stored response at once, with one
/// request per backend allowed: both go to the backend holding the
/// response, the second queueing there, instead of the second being
/// sent to the free backend, which does not have the response (400).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continued_response_queues_on_its_full_backend() {
    let slow = || ollama_fake(&["m:latest"]).delay(std::time::Duration::from_millis(300));
    let c = Cluster::builder()
        .backend(slow())
        .backend(slow())
        .set("conversation_affinity", "true")
        .set("max_concurrent_connections", "1")
        .start()
        .await;
    let url = c.at("/v1/responses");
    let (holder, id) = open_response(&c, &url).await;
    let before = counts(&c);
    let branch = |n: usize| {
        let request = c.http().post(&url).json(
            &json!({"model": "m", "previous_response_id": id, "input": format!("branch {n}")}),
        );
        async move { send(request).await }
    };
    let (a, b) = tokio::join!(branch(1), branch(2));
    for r in [a, b] {
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let after = counts(&c);
    assert_eq!(after[holder], before[holder] + 2, "{before:?} -> {after:?}");
    assert_eq!(
        after[1 - holder],
        before[1 - holder],
        "{before:?} -> {after:?}"
    );
    c.wait_usage(0).await;
}

/// The backend holding a stored response fails the next turn before
/// answering: the client gets that failure (retryable), not the other
/// backend's "previous response not found" (a permanent 400 for a
/// conversation that still exists), and the other backend is not asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continued_response_is_not_retried_on_a_backend_without_it() {
    let c = affinity_cluster().await;
    let url = c.at("/v1/responses");
    let (holder, id) = open_response(&c, &url).await;
    c.backend(holder)
        .control()
        .fail_next(1, FailureMode::Status(500));
    let before = counts(&c);
    let next = json!({"model": "m", "previous_response_id": id, "input": "next"});
    let r = send(c.http().post(&url).json(&next)).await;
    assert_eq!(r.status, 502, "{}", r.text);
    let after = counts(&c);
    assert_eq!(
        after[1 - holder],
        before[1 - holder],
        "tried on the backend without the response: {before:?} -> {after:?}"
    );
    // The failure was the backend's: the chain goes on there.
    let r = send(c.http().post(&url).json(&next)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    c.wait_usage(0).await;
}
