//! HTTP helpers for assertions: JSON requests, and stream readers that keep
//! every NDJSON line / SSE event with its arrival time (to prove streams are
//! not buffered and to find the final chunk).

use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use tokio::time::Instant;

/// Longest time one test request may take before it fails the test.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A complete, non-streamed reply.
#[derive(Clone, Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Response headers.
    pub headers: reqwest::header::HeaderMap,
    /// Raw body text.
    pub text: String,
}

impl Reply {
    /// The body as JSON; panics (showing the body) if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}); status {}, body: {:?}",
                self.status, self.text
            )
        })
    }

    /// A header value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends `request` and reads the whole body; panics on transport errors.
pub async fn send(request: reqwest::RequestBuilder) -> Reply {
    let fut = async {
        let resp = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("request failed: {e:?}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp
            .text()
            .await
            .unwrap_or_else(|e| panic!("reading the body failed (status {status}): {e:?}"));
        Reply {
            status,
            headers,
            text,
        }
    };
    crate::wait::within("HTTP request", REQUEST_TIMEOUT, fut).await
}

/// `POST url` with a JSON body.
pub async fn post_json(http: &reqwest::Client, url: &str, body: &Value) -> Reply {
    send(http.post(url).json(body)).await
}

/// `GET url`.
pub async fn get(http: &reqwest::Client, url: &str) -> Reply {
    send(http.get(url)).await
}

/// A piece of a streamed body and when it arrived.
#[derive(Clone, Debug)]
pub struct TimedChunk {
    /// Arrival time.
    pub at: Instant,
    /// One NDJSON line (without `\n`) or one SSE event's `data` (joined).
    pub text: String,
}

/// One SSE event.
#[derive(Clone, Debug, PartialEq)]
pub enum SseEvent {
    /// `data: [DONE]`.
    Done,
    /// `data: <json>`.
    Json(Value),
    /// `data:` that is not JSON.
    Text(String),
}

/// A streamed reply, read to the end.
#[derive(Clone, Debug)]
pub struct StreamReply {
    /// Status code.
    pub status: u16,
    /// Content type.
    pub content_type: String,
    /// When the request was sent.
    pub started: Instant,
    /// When the headers arrived.
    pub headers_at: Instant,
    /// When the body ended.
    pub ended: Instant,
    /// Complete lines/events, in order.
    pub chunks: Vec<TimedChunk>,
    /// Bytes after the last complete line/event (a cut stream leaves them).
    pub trailing: String,
    /// The body ended with a transport error (reset) rather than cleanly.
    pub transport_error: Option<String>,
}

impl StreamReply {
    /// NDJSON lines parsed as JSON; panics on a line that is not JSON.
    pub fn ndjson(&self) -> Vec<Value> {
        self.chunks
            .iter()
            .map(|c| {
                serde_json::from_str(&c.text)
                    .unwrap_or_else(|e| panic!("NDJSON line is not JSON ({e}): {:?}", c.text))
            })
            .collect()
    }

    /// SSE events.
    pub fn sse(&self) -> Vec<SseEvent> {
        self.chunks
            .iter()
            .map(|c| {
                if c.text == "[DONE]" {
                    SseEvent::Done
                } else {
                    serde_json::from_str(&c.text)
                        .map_or_else(|_| SseEvent::Text(c.text.clone()), SseEvent::Json)
                }
            })
            .collect()
    }

    /// The whole body as received (lines/events joined), for messages.
    pub fn dump(&self) -> String {
        let mut s: Vec<&str> = self.chunks.iter().map(|c| c.text.as_str()).collect();
        if !self.trailing.is_empty() {
            s.push(&self.trailing);
        }
        format!(
            "status {} ({}), error {:?}, body:\n{}",
            self.status,
            self.content_type,
            self.transport_error,
            s.join("\n")
        )
    }
}

/// How to split a streamed body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// One JSON object per `\n`-terminated line.
    Ndjson,
    /// `data:` events separated by a blank line.
    Sse,
}

/// Sends `request` and reads the body incrementally, timestamping each
/// complete line/event as it arrives.
pub async fn stream(request: reqwest::RequestBuilder, framing: Framing) -> StreamReply {
    let fut = async {
        let started = Instant::now();
        let resp = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("streaming request failed: {e:?}"));
        let headers_at = Instant::now();
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let mut body = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut chunks = Vec::new();
        let mut transport_error = None;
        while let Some(piece) = body.next().await {
            let piece = match piece {
                Ok(p) => p,
                Err(e) => {
                    transport_error = Some(format!("{e:?}"));
                    break;
                }
            };
            let at = Instant::now();
            buf.extend_from_slice(&piece);
            split_complete(&mut buf, framing, at, &mut chunks);
        }
        StreamReply {
            status,
            content_type,
            started,
            headers_at,
            ended: Instant::now(),
            chunks,
            trailing: String::from_utf8_lossy(&buf).into_owned(),
            transport_error,
        }
    };
    crate::wait::within("streaming HTTP request", REQUEST_TIMEOUT, fut).await
}

fn split_complete(buf: &mut Vec<u8>, framing: Framing, at: Instant, out: &mut Vec<TimedChunk>) {
    match framing {
        Framing::Ndjson => {
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let text = String::from_utf8_lossy(&line).trim().to_owned();
                if !text.is_empty() {
                    out.push(TimedChunk { at, text });
                }
            }
        }
        Framing::Sse => {
            // Events end with a blank line (`\n\n` or `\r\n\r\n`); split on
            // bytes so a UTF-8 character cut between reads stays intact.
            while let Some((end, sep)) = find_blank_line(buf) {
                let event: Vec<u8> = buf.drain(..end + sep).collect();
                let event = String::from_utf8_lossy(&event[..end]).replace("\r\n", "\n");
                let data: Vec<&str> = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if !data.is_empty() {
                    out.push(TimedChunk {
                        at,
                        text: data.join("\n"),
                    });
                }
            }
        }
    }
}

/// Position and length of the first blank-line separator in `buf`.
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    match (lf, crlf) {
        (Some(a), Some(b)) if b < a => Some((b, 4)),
        (Some(a), _) => Some((a, 2)),
        (None, Some(b)) => Some((b, 4)),
        (None, None) => None,
    }
}

/// Asserts an Ollama-format error body (`{"error":"text"}`) and returns the
/// text.
pub fn ollama_error_text(reply: &Reply) -> String {
    let body = reply.json();
    match body.get("error") {
        Some(Value::String(s)) => s.clone(),
        _ => panic!(
            "expected an Ollama error body {{\"error\":\"..\"}}, status {}: {}",
            reply.status, reply.text
        ),
    }
}

/// Asserts an OpenAI-format error body (`{"error":{"message":..}}`) and
/// returns the message.
pub fn openai_error_message(reply: &Reply) -> String {
    let body = reply.json();
    match body.get("error").and_then(|e| e.get("message")) {
        Some(Value::String(s)) => s.clone(),
        _ => panic!(
            "expected an OpenAI error body {{\"error\":{{\"message\":..}}}}, status {}: {}",
            reply.status, reply.text
        ),
    }
}

/// Chats with model `m` at a sidecar (`base`) as a client would, after
/// waiting until the sidecar lists `m:latest` (a first request may race
/// discovery): a 200 stream ending in `done: true`. `logs` (the
/// processes' output) goes into the failure message.
pub async fn chat_ok(http: &reqwest::Client, base: &str, logs: impl Fn() -> String) {
    crate::wait::wait_for_async(
        "the sidecar to list the fake's model",
        crate::SOON,
        || async { get(http, &format!("{base}/api/tags")).await.text },
        |t| t.contains("m:latest"),
    )
    .await;
    let r = stream(
        http.post(format!("{base}/api/chat"))
            .json(&serde_json::json!({
                "model": "m", "messages": [{"role": "user", "content": "hi"}]
            })),
        Framing::Ndjson,
    )
    .await;
    assert_eq!(r.status, 200, "{}\n--- logs ---\n{}", r.dump(), logs());
    let lines = r.ndjson();
    assert_eq!(
        lines.last().map(|l| &l["done"]),
        Some(&Value::Bool(true)),
        "{}",
        r.dump()
    );
}
