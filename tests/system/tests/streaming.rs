//! Streams are not buffered: with a backend pausing 200 ms between chunks,
//! each chunk reaches the client about when the backend sent it, in every
//! API combination (pass-through NDJSON, pass-through SSE, translated).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::json;
use switchyard_system_tests::{
    Cluster, Framing, StreamReply, client::stream, ollama_fake, openai_fake,
};

const GAP: Duration = Duration::from_millis(200);
const CHUNKS: usize = 5;

/// The first chunk arrives long before the end, and chunks arrive spread
/// out rather than in one burst.
fn assert_unbuffered(what: &str, r: &StreamReply) {
    assert_eq!(r.status, 200, "{what}: {}", r.dump());
    assert!(r.chunks.len() >= CHUNKS, "{what}: {}", r.dump());
    let first = r.chunks[0].at;
    let last = r.chunks.last().unwrap().at;
    let spread = last - first;
    // The backend needs (CHUNKS - 1) * GAP = 800 ms between its first and
    // last content chunk; a buffering proxy delivers them all at once.
    assert!(
        spread >= GAP * 3,
        "{what}: chunks arrived within {spread:?} of each other (buffered?)"
    );
    let distinct = {
        let mut times: Vec<_> = r.chunks.iter().map(|c| c.at).collect();
        times.dedup();
        times.len()
    };
    assert!(
        distinct >= CHUNKS - 1,
        "{what}: only {distinct} distinct arrival times for {} chunks",
        r.chunks.len()
    );
    let to_first = first - r.started;
    assert!(
        to_first + GAP * 3 <= r.ended - r.started,
        "{what}: first chunk after {to_first:?}, stream ended after {:?}",
        r.ended - r.started
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_reach_the_client_as_the_backend_sends_them() {
    let c = Cluster::builder()
        .backend(ollama_fake(&["m:latest"]).chunks(CHUNKS).chunk_delay(GAP))
        .backend(openai_fake(&["gpt-x"]).chunks(CHUNKS).chunk_delay(GAP))
        .start()
        .await;
    let chat = |model: &str| json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let cases = [
        ("/api/chat", "m", Framing::Ndjson, "Ollama pass-through"),
        (
            "/v1/chat/completions",
            "gpt-x",
            Framing::Sse,
            "OpenAI pass-through",
        ),
        (
            "/v1/chat/completions",
            "m",
            Framing::Sse,
            "OpenAI API on Ollama",
        ),
        (
            "/api/chat",
            "gpt-x",
            Framing::Ndjson,
            "Ollama API translated to OpenAI",
        ),
    ];
    for (path, model, framing, what) in cases {
        let r = stream(c.http().post(c.at(path)).json(&chat(model)), framing).await;
        assert_unbuffered(what, &r);
    }
    c.wait_usage(0).await;
}
