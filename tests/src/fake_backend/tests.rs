//! Tests of the fake backend through real HTTP (reqwest): wire shapes per
//! mode, concurrency recording, the gate, failure injection, cancellation
//! detection, shutdown and restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use super::*;

const WAIT: Duration = Duration::from_secs(5);

fn client() -> reqwest::Client {
    reqwest::Client::builder().build().unwrap()
}

async fn ollama(models: &[&str]) -> FakeBackend {
    FakeBackend::start(FakeConfig::new(FakeMode::Ollama).models(models)).await
}

fn ndjson_lines(body: &str) -> Vec<Value> {
    body.lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The `data:` payloads of an SSE body, `[DONE]` included as a string.
fn sse_events(body: &str) -> Vec<String> {
    assert!(
        body.ends_with("\n\n"),
        "SSE body must end with a blank line"
    );
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap().to_owned())
        .collect()
}

fn sse_json(events: &[String]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

async fn post(url: String, body: Value) -> reqwest::Response {
    client().post(url).json(&body).send().await.unwrap()
}

// ---- Ollama -----------------------------------------------------------------

#[tokio::test]
async fn ollama_listings() {
    let fake = FakeBackend::start(
        FakeConfig::new(FakeMode::Ollama)
            .models(&["a:latest", "b:7b"])
            .loaded(&["b:7b"]),
    )
    .await;
    let c = client();
    let root = c.get(fake.url()).send().await.unwrap();
    assert_eq!(root.headers()["x-fake-backend"], "fake");
    assert_eq!(root.text().await.unwrap(), "Ollama is running");

    let tags: Value = c
        .get(format!("{}/api/tags", fake.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items = tags["models"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["name"], "a:latest");
    assert_eq!(items[0]["model"], "a:latest");
    assert_eq!(items[0]["digest"].as_str().unwrap().len(), 64);
    assert!(items[0]["size"].as_u64().unwrap() > 0);
    assert!(items[0]["modified_at"].is_string());
    assert_eq!(items[0]["details"]["format"], "gguf");

    let ps: Value = c
        .get(format!("{}/api/ps", fake.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let loaded: Vec<&str> = ps["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(loaded, ["b:7b"]);
    assert!(ps["models"][0]["expires_at"].is_string());
    assert_eq!(ps["models"][0]["context_length"], 4096);

    fake.set_loaded("a", true);
    fake.set_loaded("b:7b", false);
    let ps: Value = c
        .get(format!("{}/api/ps", fake.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ps["models"][0]["name"], "a:latest");
    assert_eq!(ps["models"].as_array().unwrap().len(), 1);

    let version: Value = c
        .get(format!("{}/api/version", fake.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(version["version"].is_string());

    let show = post(format!("{}/api/show", fake.url()), json!({"model": "a"})).await;
    assert_eq!(show.status(), 200);
    let show: Value = show.json().await.unwrap();
    assert_eq!(show["model_info"]["llama.context_length"], 4096);
    assert!(
        show["capabilities"]
            .as_array()
            .unwrap()
            .contains(&json!("completion"))
    );
    let missing = post(format!("{}/api/show", fake.url()), json!({"name": "zz"})).await;
    assert_eq!(missing.status(), 404);

    let models: Value = c
        .get(format!("{}/v1/models", fake.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(
        models["data"][1],
        json!({"id": "b:7b", "object": "model", "created": 1_700_000_000, "owned_by": "library"})
    );

    fake.set_models(&["c"]);
    let tags: Value = c
        .get(format!("{}/api/tags", fake.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tags["models"].as_array().unwrap().len(), 1);
    assert_eq!(fake.request_count("/api/tags"), 2);
    assert_eq!(fake.request_count("/api/ps"), 2);
}

#[tokio::test]
async fn ollama_chat_streams_ndjson_with_a_final_metrics_chunk() {
    let fake = FakeBackend::start(
        FakeConfig::new(FakeMode::Ollama)
            .models(&["m:latest"])
            .chunks(4),
    )
    .await;
    // `stream` omitted: Ollama streams by default. `m` resolves to `m:latest`.
    let resp = post(
        format!("{}/api/chat", fake.url()),
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let lines = ndjson_lines(&resp.text().await.unwrap());
    assert_eq!(lines.len(), 5);
    let text: String = lines[..4]
        .iter()
        .map(|l| {
            assert_eq!(l["done"], false);
            assert_eq!(l["model"], "m");
            assert_eq!(l["message"]["role"], "assistant");
            l["message"]["content"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(text, "tok0 tok1 tok2 tok3");
    let last = &lines[4];
    assert_eq!(last["done"], true);
    assert_eq!(last["done_reason"], "stop");
    assert_eq!(last["message"]["content"], "");
    for field in [
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    ] {
        assert!(last[field].is_u64(), "{field} must be an integer: {last}");
    }
    assert_eq!(last["eval_count"], 4);
    assert_eq!(last["prompt_eval_count"], 10);
    assert!(last["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(fake.request_count("/api/chat"), 1);
    assert_eq!(fake.model_requests("m:latest"), 1);
}

#[tokio::test]
async fn ollama_non_streaming_chat_and_generate() {
    let fake = ollama(&["m"]).await;
    fake.set_reply(Some(
        ReplyScript::content(&["Hello", " world"])
            .with_reasoning(&["hmm"])
            .with_tool_call(ToolCallScript::new("get_weather", json!({"city": "Paris"}))),
    ));
    let chat: Value = post(
        format!("{}/api/chat", fake.url()),
        json!({"model": "m", "stream": false, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(chat["done"], true);
    assert_eq!(chat["done_reason"], "stop");
    assert_eq!(chat["message"]["content"], "Hello world");
    assert_eq!(chat["message"]["thinking"], "hmm");
    assert_eq!(
        chat["message"]["tool_calls"][0]["function"]["name"],
        "get_weather"
    );
    assert_eq!(
        chat["message"]["tool_calls"][0]["function"]["arguments"],
        json!({"city": "Paris"})
    );
    assert!(chat["eval_duration"].is_u64());

    let generated: Value = post(
        format!("{}/api/generate", fake.url()),
        json!({"model": "m", "stream": false, "prompt": "hi"}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(generated["response"], "Hello world");
    assert_eq!(generated["thinking"], "hmm");
    assert!(generated.get("message").is_none());
    assert_eq!(generated["done"], true);

    let resp = post(
        format!("{}/api/generate", fake.url()),
        json!({"model": "m", "prompt": "hi"}),
    )
    .await;
    let lines = ndjson_lines(&resp.text().await.unwrap());
    // One thinking chunk, two content chunks, the final chunk.
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["thinking"], "hmm");
    assert_eq!(lines[1]["response"], "Hello");
    assert_eq!(lines[3]["response"], "");
    assert_eq!(lines[3]["done"], true);
    assert!(lines[3]["context"].is_array());
}

#[tokio::test]
async fn ollama_streams_tool_calls_whole_in_one_chunk() {
    let fake = ollama(&["m"]).await;
    fake.set_reply(Some(
        ReplyScript::default().with_tool_call(ToolCallScript::new("f", json!({"x": 1}))),
    ));
    let resp = post(
        format!("{}/api/chat", fake.url()),
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    let lines = ndjson_lines(&resp.text().await.unwrap());
    assert_eq!(lines.len(), 2);
    assert_eq!(
        lines[0]["message"]["tool_calls"][0]["function"]["arguments"],
        json!({"x": 1})
    );
    assert_eq!(lines[1]["done_reason"], "stop");
}

#[tokio::test]
async fn ollama_empty_chat_loads_and_keep_alive_zero_unloads() {
    let fake = ollama(&["m"]).await;
    let load: Value = post(
        format!("{}/api/chat", fake.url()),
        json!({"model": "m", "messages": []}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(load["done_reason"], "load");
    assert_eq!(fake.loaded_models(), ["m"]);
    let unload: Value = post(
        format!("{}/api/generate", fake.url()),
        json!({"model": "m", "keep_alive": 0}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(unload["done_reason"], "unload");
    assert!(fake.loaded_models().is_empty());
}

#[tokio::test]
async fn unknown_model_is_404_in_each_error_shape() {
    let o = ollama(&["m"]).await;
    let resp = post(
        format!("{}/api/chat", o.url()),
        json!({"model": "x", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(resp.status(), 404);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"error": "model 'x' not found"})
    );
    let resp = post(
        format!("{}/v1/chat/completions", o.url()),
        json!({"model": "x", "messages": []}),
    )
    .await;
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "not_found_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not found")
    );

    let oa = FakeBackend::start(FakeConfig::new(FakeMode::OpenAi).models(&["m"])).await;
    let resp = post(
        format!("{}/v1/chat/completions", oa.url()),
        json!({"model": "x", "messages": []}),
    )
    .await;
    assert_eq!(resp.status(), 404);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"error": {"message": "The model `x` does not exist.", "type": "NotFoundError", "param": "model", "code": 404}})
    );
    // An OpenAI server has no Ollama routes.
    let resp = post(format!("{}/api/chat", oa.url()), json!({"model": "m"})).await;
    assert_eq!(resp.status(), 404);

    let ls = FakeBackend::start(FakeConfig::new(FakeMode::LlamaServer).models(&["m"])).await;
    let resp = post(
        format!("{}/v1/embeddings", ls.url()),
        json!({"model": "x", "input": "a"}),
    )
    .await;
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], 404);
    assert_eq!(body["error"]["type"], "not_found_error");
}

#[tokio::test]
async fn embeddings_keep_input_order_and_are_deterministic() {
    let fake = ollama(&["e"]).await;
    let inputs = ["first", "second text", "third"];
    let body: Value = post(
        format!("{}/api/embed", fake.url()),
        json!({"model": "e", "input": inputs}),
    )
    .await
    .json()
    .await
    .unwrap();
    let vectors = body["embeddings"].as_array().unwrap();
    assert_eq!(vectors.len(), 3);
    for (v, text) in vectors.iter().zip(inputs) {
        let got: Vec<f32> = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(got, embedding_for(text, 8));
    }
    assert_eq!(body["prompt_eval_count"], 4);
    assert!(body["total_duration"].is_u64());

    // A single string still gives a list of one vector.
    let one: Value = post(
        format!("{}/api/embed", fake.url()),
        json!({"model": "e", "input": "x"}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(one["embeddings"].as_array().unwrap().len(), 1);

    let legacy: Value = post(
        format!("{}/api/embeddings", fake.url()),
        json!({"model": "e", "prompt": "x"}),
    )
    .await
    .json()
    .await
    .unwrap();
    let got: Vec<f32> = serde_json::from_value(legacy["embedding"].clone()).unwrap();
    assert_eq!(got, embedding_for("x", 8));
    assert_eq!(legacy.as_object().unwrap().len(), 1);

    let oa: Value = post(
        format!("{}/v1/embeddings", fake.url()),
        json!({"model": "e", "input": inputs}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(oa["object"], "list");
    for (i, (item, text)) in oa["data"]
        .as_array()
        .unwrap()
        .iter()
        .zip(inputs)
        .enumerate()
    {
        assert_eq!(item["index"], i);
        assert_eq!(item["object"], "embedding");
        let got: Vec<f32> = serde_json::from_value(item["embedding"].clone()).unwrap();
        assert_eq!(got, embedding_for(text, 8));
    }
    assert_eq!(oa["usage"], json!({"prompt_tokens": 4, "total_tokens": 4}));
    assert_ne!(embedding_for("a", 8), embedding_for("b", 8));
    assert!(
        embedding_for("abc", 64)
            .iter()
            .all(|x| (-1.0..1.0).contains(x))
    );
}

// ---- OpenAI -----------------------------------------------------------------

#[tokio::test]
async fn openai_chat_non_streaming_has_usage() {
    let fake = FakeBackend::start(FakeConfig::new(FakeMode::OpenAi).models(&["m"]).chunks(2)).await;
    let resp = post(
        format!("{}/v1/chat/completions", fake.url()),
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(
        body["choices"][0]["message"],
        json!({"role": "assistant", "content": "tok0 tok1"})
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12})
    );
    assert!(body.get("timings").is_none());
}

#[tokio::test]
async fn openai_chat_stream_order_usage_only_when_asked() {
    let fake = FakeBackend::start(FakeConfig::new(FakeMode::OpenAi).models(&["m"]).chunks(3)).await;
    let url = format!("{}/v1/chat/completions", fake.url());
    let messages = json!([{"role": "user", "content": "hi"}]);

    let resp = post(
        url.clone(),
        json!({"model": "m", "messages": messages, "stream": true}),
    )
    .await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = sse_events(&resp.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks = sse_json(&events);
    // role, 3 content, finish; no usage chunk.
    assert_eq!(chunks.len(), 5);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks[1..4]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, "tok0 tok1 tok2");
    assert_eq!(chunks[4]["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
        assert_eq!(c["created"], chunks[0]["created"]);
        assert!(c.get("usage").is_none());
    }

    let resp = post(
        url,
        json!({"model": "m", "messages": messages, "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    let events = sse_events(&resp.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks = sse_json(&events);
    assert_eq!(chunks.len(), 6);
    let usage = &chunks[5];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["total_tokens"], 13);
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");
}

/// Joins streamed tool-call fragments as a client would.
fn joined_tool_call(chunks: &[Value]) -> (String, String, String) {
    let mut id = String::new();
    let mut name = String::new();
    let mut args = String::new();
    for c in chunks {
        if let Some(calls) = c["choices"][0]["delta"]["tool_calls"].as_array() {
            for call in calls {
                assert_eq!(call["index"], 0);
                if let Some(i) = call["id"].as_str() {
                    id.push_str(i);
                    assert_eq!(call["type"], "function");
                    assert_eq!(
                        call["function"]["arguments"], "",
                        "first fragment has empty arguments"
                    );
                }
                if let Some(n) = call["function"]["name"].as_str() {
                    name.push_str(n);
                }
                args.push_str(call["function"]["arguments"].as_str().unwrap());
            }
        }
    }
    (id, name, args)
}

#[tokio::test]
async fn openai_streams_tool_calls_and_reasoning_per_mode() {
    let script = ReplyScript::content(&["ok"])
        .with_reasoning(&["think", "ing"])
        .with_tool_call(
            ToolCallScript::new("get_weather", json!({"city": "Paris", "unit": "c"}))
                .with_id("call_1"),
        );
    for (mode, field) in [
        (FakeMode::OpenAi, "reasoning"),
        (FakeMode::LlamaServer, "reasoning_content"),
        (FakeMode::Ollama, "reasoning"),
    ] {
        let fake =
            FakeBackend::start(FakeConfig::new(mode).models(&["m"]).reply(script.clone())).await;
        let resp = post(
            format!("{}/v1/chat/completions", fake.url()),
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true}),
        )
        .await;
        let events = sse_events(&resp.text().await.unwrap());
        let chunks = sse_json(&events);
        let reasoning: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"][field].as_str())
            .collect();
        assert_eq!(reasoning, "thinking", "{mode}");
        let (id, name, args) = joined_tool_call(&chunks);
        assert_eq!(id, "call_1");
        assert_eq!(name, "get_weather");
        assert_eq!(
            serde_json::from_str::<Value>(&args).unwrap(),
            json!({"city": "Paris", "unit": "c"})
        );
        let fragments = chunks
            .iter()
            .filter(|c| c["choices"][0]["delta"]["tool_calls"].is_array())
            .count();
        assert_eq!(fragments, 4, "first fragment plus 3 argument pieces");
        let finish = chunks
            .iter()
            .rev()
            .find(|c| !c["choices"][0]["finish_reason"].is_null())
            .unwrap();
        assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            finish["timings"].is_object(),
            mode == FakeMode::LlamaServer,
            "{mode}"
        );
        if mode == FakeMode::LlamaServer {
            assert_eq!(finish["timings"]["predicted_n"], 4);
            assert!(finish["timings"]["predicted_ms"].is_f64());
        }
        assert_eq!(
            chunks[0].get("system_fingerprint").is_some(),
            mode == FakeMode::Ollama
        );

        let body: Value = post(
            format!("{}/v1/chat/completions", fake.url()),
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await
        .json()
        .await
        .unwrap();
        let msg = &body["choices"][0]["message"];
        assert_eq!(msg[field], "thinking");
        assert_eq!(
            msg["tool_calls"][0]["function"]["arguments"],
            r#"{"city":"Paris","unit":"c"}"#
        );
        assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
    }
}

#[tokio::test]
async fn openai_completions_stream_and_not() {
    let fake = FakeBackend::start(FakeConfig::new(FakeMode::OpenAi).models(&["m"]).chunks(2)).await;
    let url = format!("{}/v1/completions", fake.url());
    let body: Value = post(url.clone(), json!({"model": "m", "prompt": "say"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["text"], "tok0 tok1");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["completion_tokens"], 2);

    let resp = post(
        url,
        json!({"model": "m", "prompt": "say", "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    let events = sse_events(&resp.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks = sse_json(&events);
    assert_eq!(chunks.len(), 4);
    assert_eq!(chunks[0]["choices"][0]["text"], "tok0");
    assert_eq!(chunks[2]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[3]["choices"], json!([]));
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
}

#[tokio::test]
async fn api_key_is_required_when_configured() {
    let fake = FakeBackend::start(
        FakeConfig::new(FakeMode::OpenAi)
            .models(&["m"])
            .api_key("sekret"),
    )
    .await;
    let c = client();
    let url = format!("{}/v1/chat/completions", fake.url());
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let resp = c.post(&url).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["type"], "AuthenticationError");
    assert_eq!(err["error"]["code"], 401);
    let resp = c
        .post(&url)
        .bearer_auth("wrong")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = c
        .post(&url)
        .bearer_auth("sekret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let models = c
        .get(format!("{}/v1/models", fake.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 401);

    let recorded = fake.last_request_to("/v1/chat/completions").unwrap();
    assert_eq!(recorded.bearer_token(), Some("sekret"));
    assert_eq!(recorded.json().unwrap()["model"], "m");
    assert_eq!(fake.requests_to("/v1/chat/completions").len(), 3);

    let ls = FakeBackend::start(
        FakeConfig::new(FakeMode::LlamaServer)
            .models(&["m"])
            .api_key("k"),
    )
    .await;
    let health = c.get(format!("{}/health", ls.url())).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(
        health.json::<Value>().await.unwrap(),
        json!({"status": "ok"})
    );
    let resp = c
        .get(format!("{}/v1/models", ls.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}})
    );
}

#[tokio::test]
async fn llama_server_models_carry_status_and_completions_can_be_absent() {
    let fake = FakeBackend::start(
        FakeConfig::new(FakeMode::LlamaServer)
            .models(&["org/qwen-GGUF:Q4_K_M", "other"])
            .loaded(&["other"])
            .no_completions(),
    )
    .await;
    let c = client();
    let list = |fake_url: String| {
        let c = c.clone();
        async move {
            c.get(format!("{fake_url}/v1/models"))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let models = list(fake.url()).await;
    assert_eq!(models["data"][0]["status"], json!({"value": "unloaded"}));
    assert_eq!(models["data"][1]["status"], json!({"value": "loaded"}));
    assert_eq!(models["data"][0]["owned_by"], "llamacpp");
    fake.set_loaded("org/qwen-GGUF:Q4_K_M", true);
    assert_eq!(
        list(fake.url()).await["data"][0]["status"]["value"],
        "loaded"
    );

    let resp = post(
        format!("{}/v1/completions", fake.url()),
        json!({"model": "other", "prompt": "x"}),
    )
    .await;
    assert_eq!(resp.status(), 404);
    assert_eq!(fake.request_count("/v1/completions"), 0);

    let with = FakeBackend::start(FakeConfig::new(FakeMode::LlamaServer).models(&["other"])).await;
    let resp = post(
        format!("{}/v1/completions", with.url()),
        json!({"model": "other", "prompt": "x"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
}

// ---- concurrency and the gate -------------------------------------------------

#[tokio::test]
async fn gate_holds_requests_and_peak_concurrency_is_recorded() {
    let fake = FakeBackend::start(FakeConfig::new(FakeMode::OpenAi).models(&["a", "b"])).await;
    fake.hold_requests(true);
    let mut tasks = Vec::new();
    for model in ["a", "a", "a", "b"] {
        let url = format!("{}/v1/chat/completions", fake.url());
        tasks.push(tokio::spawn(async move {
            post(
                url,
                json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
            )
            .await
            .status()
        }));
    }
    assert!(fake.wait_for_waiting(4, WAIT).await, "4 requests held");
    assert_eq!(fake.in_flight(), 4);
    assert_eq!(fake.concurrency("a"), 3);
    assert_eq!(fake.peak_concurrency("a"), 3);
    assert_eq!(fake.peak_concurrency("b"), 1);

    assert_eq!(fake.release_held(1), 1);
    assert!(fake.wait_until(WAIT, |f| f.completed_count() == 1).await);
    assert_eq!(fake.waiting(), 3);
    assert_eq!(fake.in_flight(), 3);

    fake.hold_requests(false);
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert!(fake.wait_for_idle(WAIT).await);
    assert_eq!(fake.peak_in_flight(), 4);
    assert_eq!(fake.peak_concurrency("a"), 3);
    assert_eq!(fake.cancelled_count(), 0);
    assert_eq!(fake.completed_count(), 4);
    // Releasing more than are held releases only those held.
    fake.hold_requests(true);
    assert_eq!(fake.release_held(5), 0);
    fake.reset_stats();
    assert_eq!(fake.peak_in_flight(), 0);
    assert_eq!(fake.peak_concurrency("a"), 0);
}

#[tokio::test]
async fn delay_applies_before_the_first_byte() {
    let fake = ollama(&["m"]).await;
    fake.set_delay(Duration::from_millis(150));
    let t0 = Instant::now();
    let resp = post(
        format!("{}/api/chat", fake.url()),
        json!({"model": "m", "stream": false, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(t0.elapsed() >= Duration::from_millis(150));
}

// ---- failures -----------------------------------------------------------------

#[tokio::test]
async fn status_failure_is_fast_and_in_each_shape() {
    let fake = ollama(&["m"]).await;
    fake.set_delay(Duration::from_secs(30));
    fake.hold_requests(true);
    fake.set_failure(FailureMode::Status(503));
    let resp = post(
        format!("{}/api/chat", fake.url()),
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().starts_with("server busy"));
    let resp = post(
        format!("{}/v1/chat/completions", fake.url()),
        json!({"model": "m", "messages": []}),
    )
    .await;
    assert_eq!(resp.status(), 503);
    assert!(resp.json::<Value>().await.unwrap()["error"]["message"].is_string());

    let oa = FakeBackend::start(FakeConfig::new(FakeMode::OpenAi).models(&["m"])).await;
    oa.fail_next(1, FailureMode::Status(500));
    let url = format!("{}/v1/chat/completions", oa.url());
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let resp = post(url.clone(), body.clone()).await;
    assert_eq!(resp.status(), 500);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"]["code"], 500);
    // Only the next request failed.
    assert_eq!(post(url, body).await.status(), 200);
    assert_eq!(oa.cancelled_count(), 0);
}

#[tokio::test]
async fn reset_closes_the_connection_before_any_byte() {
    let fake = ollama(&["m"]).await;
    fake.set_failure(FailureMode::Reset);
    let err = client()
        .post(format!("{}/api/chat", fake.url()))
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect_err("a reset connection gives no response");
    assert!(!err.is_status() && !err.is_timeout(), "{err:?}");
    assert_eq!(fake.cancelled_count(), 0);
    fake.set_failure(FailureMode::None);
    let ok = post(
        format!("{}/api/chat", fake.url()),
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(ok.status(), 200);

    fake.set_probe_failure(FailureMode::Reset);
    assert!(
        client()
            .get(format!("{}/api/tags", fake.url()))
            .send()
            .await
            .is_err()
    );
    fake.set_probe_failure(FailureMode::Status(500));
    let tags = client()
        .get(format!("{}/api/tags", fake.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(tags.status(), 500);
}

#[tokio::test]
async fn mid_stream_error_sends_chunks_then_an_error_line() {
    let fake = ollama(&["m"]).await;
    fake.set_chunks(4);
    fake.set_failure(FailureMode::MidStreamError);
    let resp = post(
        format!("{}/api/chat", fake.url()),
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let lines = ndjson_lines(&resp.text().await.unwrap());
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0]["message"]["content"], "tok0");
    assert_eq!(lines[1]["done"], false);
    assert!(lines[2]["error"].is_string());

    let resp = post(
        format!("{}/v1/chat/completions", fake.url()),
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true}),
    )
    .await;
    let events = sse_events(&resp.text().await.unwrap());
    assert!(!events.contains(&"[DONE]".to_owned()));
    let chunks = sse_json(&events);
    // role, 2 of 4 content chunks, then the error event.
    assert_eq!(chunks.len(), 4);
    assert!(chunks[3]["error"]["message"].is_string());
    assert!(
        chunks[..3]
            .iter()
            .all(|c| c["choices"][0]["finish_reason"].is_null())
    );

    let resp = post(
        format!("{}/api/chat", fake.url()),
        json!({"model": "m", "stream": false, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(resp.status(), 500);
    assert_eq!(fake.cancelled_count(), 0);
    assert!(fake.wait_for_idle(WAIT).await);
}

#[tokio::test]
async fn mid_stream_drop_sends_chunks_then_breaks_the_connection() {
    let fake = FakeBackend::start(FakeConfig::new(FakeMode::OpenAi).models(&["m"]).chunks(4)).await;
    fake.set_failure(FailureMode::MidStreamDrop);
    let resp = post(
        format!("{}/v1/chat/completions", fake.url()),
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut received = Vec::new();
    let mut failed = false;
    while let Some(item) = stream.next().await {
        match item {
            Ok(b) => received.extend_from_slice(&b),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the body must end with an error");
    let text = String::from_utf8(received).unwrap();
    let chunks = sse_json(&sse_events(&text));
    assert_eq!(chunks.len(), 3, "role and 2 content chunks: {text}");
    assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "tok0");

    // Non-streaming: half a body, then the reset.
    let resp = post(
        format!("{}/v1/chat/completions", fake.url()),
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.is_err());
    assert!(fake.wait_for_idle(WAIT).await);
    assert_eq!(fake.cancelled_count(), 0);
}

#[tokio::test]
async fn hang_never_answers_and_the_disconnect_is_seen_as_a_cancel() {
    let fake = ollama(&["m"]).await;
    fake.set_failure(FailureMode::Hang);
    let c = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let err = c
        .post(format!("{}/api/chat", fake.url()))
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect_err("a hung server never answers");
    assert!(err.is_timeout(), "{err:?}");
    assert!(fake.wait_for_cancelled(1, WAIT).await);
    assert_eq!(fake.in_flight(), 0);
}

// ---- cancellation ---------------------------------------------------------------

#[tokio::test]
async fn a_client_leaving_mid_stream_is_counted_promptly() {
    let fake = ollama(&["m"]).await;
    fake.set_chunks(5);
    // Far longer than the bounded wait below: detection must not wait for
    // the next write.
    fake.set_chunk_delay(Duration::from_secs(30));
    let resp = post(
        format!("{}/api/chat", fake.url()),
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("tok0"));
    assert_eq!(fake.in_flight(), 1);
    let dropped_at = Instant::now();
    drop(stream);
    assert!(fake.wait_for_cancelled(1, Duration::from_secs(2)).await);
    assert!(dropped_at.elapsed() < Duration::from_secs(2));
    assert_eq!(fake.in_flight(), 0);
    assert_eq!(fake.completed_count(), 0);
}

#[tokio::test]
async fn a_client_leaving_while_held_is_counted_and_leaves_the_gate() {
    let fake = ollama(&["m"]).await;
    fake.hold_requests(true);
    let url = format!("{}/api/chat", fake.url());
    let task = tokio::spawn(async move {
        post(
            url,
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await
    });
    assert!(fake.wait_for_waiting(1, WAIT).await);
    task.abort();
    assert!(fake.wait_for_cancelled(1, WAIT).await);
    assert_eq!(fake.waiting(), 0);
    assert_eq!(fake.in_flight(), 0);
}

// ---- shutdown and restart ---------------------------------------------------------

#[tokio::test]
async fn shutdown_kills_open_streams_and_restart_serves_again() {
    let fake = ollama(&["m"]).await;
    fake.set_chunks(3);
    fake.set_chunk_delay(Duration::from_secs(30));
    let url = fake.url();
    let resp = post(
        format!("{url}/api/chat"),
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();

    fake.shutdown().await;
    assert!(!fake.is_running());
    let mut broke = false;
    while let Some(item) = stream.next().await {
        if item.is_err() {
            broke = true;
        }
    }
    assert!(
        broke,
        "an open stream ends with an error when the server dies"
    );
    let refused = client().get(format!("{url}/api/tags")).send().await;
    assert!(refused.unwrap_err().is_connect());

    fake.restart().await.unwrap();
    assert!(matches!(
        fake.restart().await,
        Err(FakeError::AlreadyRunning)
    ));
    assert_eq!(fake.url(), url);
    fake.set_chunk_delay(Duration::ZERO);
    let resp = post(
        format!("{url}/api/chat"),
        json!({"model": "m", "stream": false, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn bad_requests_are_400() {
    let fake = FakeBackend::start(FakeConfig::new(FakeMode::OpenAi).models(&["m"])).await;
    let resp = client()
        .post(format!("{}/v1/chat/completions", fake.url()))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = post(
        format!("{}/v1/chat/completions", fake.url()),
        json!({"messages": []}),
    )
    .await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["type"],
        "BadRequestError"
    );
}

#[test]
fn fake_mode_round_trips_through_its_name() {
    for mode in [FakeMode::Ollama, FakeMode::OpenAi, FakeMode::LlamaServer] {
        assert_eq!(mode.to_string().parse::<FakeMode>().unwrap(), mode);
    }
    assert!("vllm".parse::<FakeMode>().is_err());
}

#[tokio::test]
async fn releasing_then_holding_again_does_not_re_hold_released_requests() {
    let fake = ollama(&["m"]).await;
    fake.hold_requests(true);
    let url = format!("{}/api/chat", fake.url());
    let task = tokio::spawn(async move {
        post(
            url,
            json!({"model": "m", "stream": false, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await
        .status()
    });
    assert!(fake.wait_for_waiting(1, WAIT).await);
    fake.hold_requests(false);
    fake.hold_requests(true);
    assert_eq!(fake.waiting(), 0);
    assert_eq!(task.await.unwrap(), 200);
}

#[tokio::test]
async fn llama_health_reports_loading_and_probes_are_counted() {
    let fake = FakeBackend::start(
        FakeConfig::new(FakeMode::LlamaServer)
            .models(&["m"])
            .label("backend-2"),
    )
    .await;
    let c = client();
    fake.set_probe_failure(FailureMode::Status(503));
    let resp = c
        .get(format!("{}/health", fake.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-fake-backend"], "backend-2");
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}})
    );
    fake.set_probe_failure(FailureMode::None);
    assert_eq!(
        c.get(format!("{}/health", fake.url()))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(fake.wait_for_requests("/health", 2, WAIT).await);
    assert_eq!(fake.total_requests(), 2);
    // Probes are not inference: nothing was in flight.
    assert_eq!(fake.peak_in_flight(), 0);
}

// ---- stored responses -------------------------------------------------------

#[tokio::test]
async fn stored_responses_are_served_back_until_deleted() {
    let fake = FakeBackend::start(FakeConfig::new(FakeMode::OpenAi).models(&["m"])).await;
    let base = format!("{}/v1/responses", fake.url());
    let created: Value = post(
        base.clone(),
        json!({"model": "m", "input": [{"role": "user", "content": "a"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "b"}]}]}),
    )
    .await
    .json()
    .await
    .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(fake.stores_response(&id));
    let get = |path: String| async move { client().get(path).send().await.unwrap() };
    let r = get(format!("{base}/{id}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), created);

    // Newest first by default; `limit`, `order` and `after` page.
    let page: Value = get(format!("{base}/{id}/input_items"))
        .await
        .json()
        .await
        .unwrap();
    let texts = |page: &Value| -> Vec<String> {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| item["content"][0]["text"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(texts(&page), ["b", "a"]);
    assert_eq!(page["object"], "list");
    assert_eq!(page["has_more"], false);
    assert_eq!(page["first_id"], page["data"][0]["id"]);
    let page: Value = get(format!("{base}/{id}/input_items?limit=1&order=asc"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (texts(&page), &page["has_more"]),
        (vec!["a".to_owned()], &json!(true))
    );
    let after = page["last_id"].as_str().unwrap();
    let page: Value = get(format!("{base}/{id}/input_items?order=asc&after={after}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(texts(&page), ["b"]);

    let r = client()
        .post(format!("{base}/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "completed");
    let r = client()
        .delete(format!("{base}/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"id": id, "object": "response.deleted", "deleted": true})
    );
    for r in [
        get(format!("{base}/{id}")).await,
        client()
            .delete(format!("{base}/{id}"))
            .send()
            .await
            .unwrap(),
    ] {
        assert_eq!(r.status(), 404);
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            body["error"]["message"],
            format!("No response found with id '{id}'.")
        );
    }

    // `store: false` is not kept.
    let created: Value = post(
        base.clone(),
        json!({"model": "m", "input": "x", "store": false}),
    )
    .await
    .json()
    .await
    .unwrap();
    let id = created["id"].as_str().unwrap();
    assert!(!fake.stores_response(id));
    assert_eq!(get(format!("{base}/{id}")).await.status(), 404);
}
