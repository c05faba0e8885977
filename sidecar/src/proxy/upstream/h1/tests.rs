#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};

use http_body::Body as _;
use http_body_util::BodyExt as _;
use proptest::prelude::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use super::*;

fn pool() -> Arc<H1Pool> {
    Arc::new(H1Pool::new(
        Duration::from_millis(500),
        Duration::from_secs(60),
    ))
}

/// Reads one request (head + `content-length` body) from `sock`; `None` at
/// end of stream.
async fn read_request(sock: &mut TcpStream) -> Option<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            if got.len() >= end + 4 + len {
                return Some(String::from_utf8(got).unwrap());
            }
        }
        let n = sock.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
    }
}

/// A backend answering each request on a connection with the next of
/// `answers` (each written in the given pieces), then closing when
/// `close_after` answers were given on that connection. Counts connections
/// and requests.
struct Backend {
    addr: String,
    connections: Arc<AtomicUsize>,
    requests: Arc<parking_lot::Mutex<Vec<String>>>,
}

async fn backend(answers: Vec<Vec<&'static [u8]>>, close_after: usize) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let answers = Arc::new(parking_lot::Mutex::new(answers.into_iter()));
    let (c, r) = (connections.clone(), requests.clone());
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            c.fetch_add(1, Ordering::SeqCst);
            let (answers, r) = (answers.clone(), r.clone());
            tokio::spawn(async move {
                for _ in 0..close_after {
                    let Some(req) = read_request(&mut sock).await else {
                        return;
                    };
                    r.lock().push(req);
                    let Some(pieces) = answers.lock().next() else {
                        return;
                    };
                    for piece in pieces {
                        sock.write_all(piece).await.unwrap();
                        sock.flush().await.unwrap();
                        tokio::task::yield_now().await;
                    }
                }
            });
        }
    });
    Backend {
        addr,
        connections,
        requests,
    }
}

/// A request to `addr` (also its `Host`).
fn request<'a>(
    addr: &'a str,
    target: &'a str,
    headers: &'a HeaderMap,
    body: Bytes,
) -> H1Request<'a> {
    H1Request {
        authority: addr,
        addr,
        target,
        headers,
        body,
    }
}

async fn post(pool: &Arc<H1Pool>, addr: &str, body: &'static [u8]) -> Result<(u16, Bytes), String> {
    let headers = HeaderMap::new();
    let response = pool
        .post(request(
            addr,
            "/api/chat",
            &headers,
            Bytes::from_static(body),
        ))
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

#[tokio::test]
async fn content_length_answers_reuse_one_connection() {
    let ok: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    let b = backend(vec![vec![ok], vec![ok], vec![ok]], 10).await;
    let p = pool();
    for _ in 0..3 {
        assert_eq!(
            post(&p, &b.addr, b"{}").await.unwrap(),
            (200, Bytes::from("ok"))
        );
    }
    assert_eq!(b.connections.load(Ordering::SeqCst), 1);
    for req in b.requests.lock().iter() {
        let lower = req.to_ascii_lowercase();
        assert!(lower.starts_with("post /api/chat http/1.1\r\n"), "{req}");
        assert!(lower.contains(&format!("host: {}\r\n", b.addr)), "{req}");
        assert!(lower.contains("content-length: 2\r\n"), "{req}");
        assert!(req.ends_with("\r\n\r\n{}"), "{req}");
    }
}

#[tokio::test]
async fn headers_are_sent_as_given() {
    let ok: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
    let b = backend(vec![vec![ok]], 10).await;
    let mut headers = HeaderMap::new();
    headers.insert("x-test", HeaderValue::from_static("1"));
    headers.insert("authorization", HeaderValue::from_static("Bearer k"));
    let response = pool()
        .post(request(
            &b.addr,
            "/v1/chat/completions?x=1",
            &headers,
            Bytes::new(),
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.body().is_end_stream(),
        "content-length 0 is done at once"
    );
    let req = b.requests.lock()[0].clone();
    assert!(
        req.starts_with("POST /v1/chat/completions?x=1 HTTP/1.1\r\n"),
        "{req}"
    );
    assert!(req.contains("x-test: 1\r\n"), "{req}");
    assert!(req.contains("authorization: Bearer k\r\n"), "{req}");
    assert!(req.contains("content-length: 0\r\n"), "{req}");
}

#[tokio::test]
async fn chunked_answers_split_anywhere_decode_and_reuse_the_connection() {
    let pieces: Vec<&'static [u8]> = vec![
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: application/x-ndjson\r\n\r\n",
        b"7\r\n{\"a\":1",
        b"}\r\n",
        b"3;ext=1\r\nxyz\r",
        b"\n0\r\nx-trailer: 1\r\n",
        b"\r\n",
    ];
    let b = backend(vec![pieces.clone(), pieces], 10).await;
    let p = pool();
    for _ in 0..2 {
        let (status, body) = post(&p, &b.addr, b"{}").await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(&body[..], b"{\"a\":1}xyz");
    }
    assert_eq!(b.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn body_until_close_ends_at_close_and_is_not_reused() {
    let answer: &[u8] = b"HTTP/1.1 200 OK\r\n\r\nall of it";
    let b = backend(vec![vec![answer], vec![answer]], 1).await;
    let p = pool();
    for _ in 0..2 {
        assert_eq!(
            post(&p, &b.addr, b"{}").await.unwrap(),
            (200, Bytes::from("all of it"))
        );
    }
    assert_eq!(b.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn connection_close_is_not_reused() {
    let answer: &[u8] = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\nx";
    let b = backend(vec![vec![answer], vec![answer]], 10).await;
    let p = pool();
    for _ in 0..2 {
        post(&p, &b.addr, b"{}").await.unwrap();
    }
    assert_eq!(b.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_stale_pooled_connection_is_replaced_transparently() {
    // The backend closes each connection after one answer, keep-alive
    // header or not: the second request finds a dead pooled connection.
    let ok: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    let b = backend(vec![vec![ok], vec![ok]], 1).await;
    let p = pool();
    post(&p, &b.addr, b"{}").await.unwrap();
    // Let the close reach us.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        post(&p, &b.addr, b"{}").await.unwrap(),
        (200, Bytes::from("ok"))
    );
    assert_eq!(b.connections.load(Ordering::SeqCst), 2);
    assert_eq!(
        b.requests.lock().len(),
        2,
        "each request reached the backend once"
    );
}

#[tokio::test]
async fn a_request_read_then_unanswered_is_never_resent() {
    // First request answered (keep-alive), the second read on the same
    // connection and left unanswered: the backend may have started on it,
    // so it must not get it twice.
    let ok: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    let b = backend(vec![vec![ok], vec![]], 2).await;
    let p = pool();
    post(&p, &b.addr, b"{}").await.unwrap();
    let e = post(&p, &b.addr, b"{}").await.unwrap_err();
    assert_eq!(e, H1Error::Closed.to_string());
    assert_eq!(b.connections.load(Ordering::SeqCst), 1);
    assert_eq!(b.requests.lock().len(), 2);
}

#[tokio::test]
async fn stray_bytes_after_a_response_retire_its_connection() {
    // The backend sends one byte more than its content-length announced,
    // with the body or just after it: either the body leaves it buffered
    // (not pooled) or the idle check finds it (not reused). The next
    // request gets a fresh connection either way.
    let ok: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    let b = backend(vec![vec![ok, b"X"], vec![ok]], 10).await;
    let p = pool();
    assert_eq!(
        post(&p, &b.addr, b"{}").await.unwrap(),
        (200, Bytes::from("ok"))
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        post(&p, &b.addr, b"{}").await.unwrap(),
        (200, Bytes::from("ok"))
    );
    assert_eq!(b.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_fresh_connection_closed_without_answer_fails_once() {
    // Reads the request, answers nothing, closes.
    let b = backend(vec![vec![]], 1).await;
    let e = post(&pool(), &b.addr, b"{}").await.unwrap_err();
    assert_eq!(e, H1Error::Closed.to_string());
    assert_eq!(b.connections.load(Ordering::SeqCst), 1, "not resent");
}

#[tokio::test]
async fn refused_connection_is_a_connect_error() {
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let headers = HeaderMap::new();
    let e = pool()
        .post(request(&addr, "/", &headers, Bytes::new()))
        .await
        .unwrap_err();
    assert!(matches!(e, H1Error::Connect(_)), "{e:?}");
}

#[tokio::test]
async fn interim_responses_are_skipped() {
    let b = backend(
        vec![vec![
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 201 Created\r\ncontent-length: 1\r\n\r\nx",
        ]],
        10,
    )
    .await;
    assert_eq!(
        post(&pool(), &b.addr, b"{}").await.unwrap(),
        (201, Bytes::from("x"))
    );
}

#[tokio::test]
async fn an_interim_response_read_together_with_the_final_one_is_skipped() {
    // Both heads in one write, so they usually arrive in one read: the
    // final head must be parsed from what is already buffered, not waited
    // for (it would never come).
    let b = backend(
        vec![vec![
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ]],
        10,
    )
    .await;
    let answer = tokio::time::timeout(Duration::from_secs(5), post(&pool(), &b.addr, b"{}"))
        .await
        .expect("the final response was already buffered");
    assert_eq!(answer.unwrap(), (200, Bytes::from("ok")));
}

#[tokio::test]
async fn a_body_cut_short_is_an_error_and_dropping_a_body_closes_its_connection() {
    let short: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc";
    let b = backend(vec![vec![short]], 1).await;
    let e = post(&pool(), &b.addr, b"{}").await.unwrap_err();
    assert_eq!(e, H1BodyError::Closed.to_string());

    // A backend that keeps streaming: dropping the body must close the
    // connection (the backend's read sees end of stream).
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        read_request(&mut sock).await.unwrap();
        sock.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 16];
        // Returns when the client closes.
        sock.read(&mut buf).await.unwrap_or(0)
    });
    let p = pool();
    let headers = HeaderMap::new();
    let mut response = p
        .post(request(&addr, "/", &headers, Bytes::new()))
        .await
        .unwrap();
    let first = response.body_mut().frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), Bytes::from("a"));
    drop(response);
    let read = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("backend saw the close")
        .unwrap();
    assert_eq!(read, 0);
    assert!(p.idle.lock().get(addr.as_str()).is_none_or(Vec::is_empty));
}

#[tokio::test]
async fn no_content_has_no_body() {
    let b = backend(
        vec![
            vec![b"HTTP/1.1 204 No Content\r\n\r\n"],
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\ny"],
        ],
        10,
    )
    .await;
    let p = pool();
    assert_eq!(post(&p, &b.addr, b"{}").await.unwrap(), (204, Bytes::new()));
    assert_eq!(
        post(&p, &b.addr, b"{}").await.unwrap(),
        (200, Bytes::from("y"))
    );
    assert_eq!(b.connections.load(Ordering::SeqCst), 1);
}

#[test]
fn malformed_heads_are_protocol_errors() {
    for head in [
        &b"HTTP/1.1 abc OK\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
        b"garbage\r\n\r\n",
    ] {
        assert!(
            matches!(
                parse_head(&mut BytesMut::from(head)),
                Err(H1Error::Protocol(_))
            ),
            "{}",
            String::from_utf8_lossy(head)
        );
    }
    // A head over the limit is refused also when it is complete in the
    // buffer (one large read), not only while it is still arriving.
    let big = format!(
        "HTTP/1.1 200 OK\r\n{}content-length: 0\r\n\r\n",
        format!("x-big: {}\r\n", "b".repeat(1000)).repeat(MAX_HEAD / 1000 + 1)
    );
    assert!(
        matches!(
            parse_head(&mut BytesMut::from(big.as_bytes())),
            Err(H1Error::Protocol("response head too large"))
        ),
        "a complete {}-byte head",
        big.len()
    );
    let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\n"[..]);
    assert!(matches!(parse_head(&mut partial), Ok(None)));
    assert_eq!(partial.len(), 17, "an incomplete head stays buffered");
}

#[test]
fn framing_follows_rfc_9112() {
    let framing = |head: &[u8]| match parse_head(&mut BytesMut::from(head)).unwrap().unwrap() {
        Parsed::Final(h) => (h.framing, h.keep_alive),
        Parsed::Interim => panic!("interim"),
    };
    assert_eq!(
        framing(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 5\r\n\r\n"
        ),
        (Framing::Chunked(Chunk::Size), true)
    );
    assert_eq!(
        framing(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
        (Framing::Length(5), true)
    );
    assert_eq!(
        framing(b"HTTP/1.1 200 OK\r\n\r\n"),
        (Framing::UntilClose, false)
    );
    assert_eq!(
        framing(b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n"),
        (Framing::Length(1), false)
    );
    assert_eq!(
        framing(b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\n"),
        (Framing::Length(1), true)
    );
    assert_eq!(
        framing(b"HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n"),
        (Framing::Length(0), true)
    );
}

#[test]
fn bad_chunk_sizes_are_errors() {
    for body in [
        &b"zz\r\n"[..],
        b"\r\n",
        b"1\r\nab\r\n",
        b"1234567890abcdef0\r\n",
    ] {
        let mut framing = Framing::Chunked(Chunk::Size);
        let mut buf = BytesMut::from(body);
        let mut failed = false;
        for _ in 0..4 {
            match framing.decode(&mut buf) {
                Err(_) => {
                    failed = true;
                    break;
                }
                Ok(Decoded::Data(_)) => {}
                Ok(_) => break,
            }
        }
        assert!(failed, "{}", String::from_utf8_lossy(body));
    }
}

/// Chunked encoding of `parts` (one chunk each, empty ones skipped).
fn chunked(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts.iter().filter(|p| !p.is_empty()) {
        out.extend_from_slice(format!("{:x}\r\n", p.len()).as_bytes());
        out.extend_from_slice(p);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

proptest! {
    /// Any chunked body fed in any pieces decodes to its data, ends exactly
    /// at its last byte, and leaves nothing buffered.
    #[test]
    fn chunked_decoding_is_split_independent(
        parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..6),
        cuts in proptest::collection::vec(1usize..16, 0..40),
    ) {
        let wire = chunked(&parts);
        let mut framing = Framing::Chunked(Chunk::Size);
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        let mut fed = 0;
        let mut cuts = cuts.into_iter();
        let mut ended = false;
        while !ended {
            match framing.decode(&mut buf).unwrap() {
                Decoded::Data(d) => data.extend_from_slice(&d),
                Decoded::End => ended = true,
                Decoded::NeedMore => {
                    prop_assert!(fed < wire.len(), "needs more after all bytes");
                    let n = cuts.next().unwrap_or(wire.len()).min(wire.len() - fed);
                    buf.extend_from_slice(&wire[fed..fed + n]);
                    fed += n;
                }
            }
        }
        prop_assert_eq!(fed, wire.len());
        prop_assert!(buf.is_empty());
        prop_assert_eq!(data, parts.concat());
    }
}

#[test]
fn content_length_digits() {
    for n in [0usize, 7, 10, 99, 107_331, usize::MAX] {
        let mut out = Vec::new();
        push_decimal(&mut out, n);
        assert_eq!(String::from_utf8(out).unwrap(), n.to_string());
    }
}

#[test]
fn head_is_taken_off_the_buffer_and_values_are_kept() {
    let mut buf = BytesMut::from(
        &b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-custom: a b\r\ncontent-length: 2\r\n\r\nok"[..],
    );
    let Some(Parsed::Final(head)) = parse_head(&mut buf).unwrap() else {
        panic!("final head expected");
    };
    assert_eq!(&buf[..], b"ok", "the body bytes stay in the buffer");
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.headers["content-type"], "application/json");
    assert_eq!(head.headers["x-custom"], "a b");
    assert_eq!(head.framing, Framing::Length(2));
}
