//! The plain-HTTP/1.1 backend client: the request runs in the task that
//! asked for it, on a pooled keep-alive connection, with no connection task
//! in between.
//!
//! Why not hyper's client here: hyper drives every connection from its own
//! task, so each proxied request crossed tasks three times (request into a
//! channel, response head back through a oneshot, body frames through
//! another channel), and profiles of the sidecar put that machinery at
//! about a sixth of its CPU per request. Backends on the cluster network
//! are plain `http://` and answer one POST at a time per connection, which
//! needs very little of HTTP/1.1: write one request, parse one response
//! head (`httparse`), then hand out the body by its framing. `https://`
//! backends keep using hyper (TLS, HTTP/2).
//!
//! Invariants:
//! - A connection is back in the pool only after its response body was read
//!   to its framed end with nothing extra buffered, and the response allowed
//!   keep-alive. A body dropped early closes its connection: the backend
//!   sees the client's cancel.
//! - A POST is not replayed once the backend may have read it. A pooled
//!   connection is checked before reuse (the reactor already knows when the
//!   backend closed or reset it while idle: no syscall in the common case)
//!   and dropped if it is not cleanly idle. The request is sent a second
//!   time only when writing it to a *reused* connection failed (the backend
//!   had reset it: nothing was processed); then the host's idle connections
//!   are dropped (a restarted backend killed all of them) and the resend
//!   gets a fresh one. Any failure after the request was written — even an
//!   end of stream before the first response byte — is final here, and the
//!   proxy's retry policy decides (another endpoint, before the first
//!   byte).
//! - 1xx interim responses are skipped; 204/304 have no body; otherwise the
//!   body is chunked (last transfer coding), `content-length`, or until
//!   close (RFC 9112 §6.3).

use std::{
    io,
    mem::MaybeUninit,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, Version};
use http_body::Frame;
use tokio::{io::AsyncWriteExt, net::TcpStream};

/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Most response headers accepted.
const MAX_HEADERS: usize = 128;
/// Read buffer size per exchange (grown by this much when nearly full).
/// Every stream in flight holds one, and the allocator keeps what a burst
/// of streams held: 8 KB instead of 16 KB kept ~3.5 MB less after 500
/// concurrent streams (BENCHMARKS.md, "Sidecar memory"); streamed events
/// and most answers are far smaller, and a large answer costs a few more
/// reads.
const READ_CHUNK: usize = 8 * 1024;
/// Idle connections kept per backend.
const MAX_IDLE_PER_HOST: usize = 512;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    /// No connection could be made.
    #[error("connect failed")]
    Connect(#[source] io::Error),
    /// Connecting took longer than the connect timeout.
    #[error("connect timed out")]
    ConnectTimeout(#[source] io::Error),
    /// The connection failed while sending or before the response head was
    /// complete.
    #[error("connection failed")]
    Io(#[source] io::Error),
    /// The connection closed before a complete response head.
    #[error("connection closed before a response")]
    Closed,
    /// The backend's answer is not valid HTTP/1.1.
    #[error("invalid response: {0}")]
    Protocol(&'static str),
}

/// Why a response body broke off.
#[derive(Debug, thiserror::Error)]
pub enum H1BodyError {
    /// Reading from the connection failed.
    #[error("connection failed")]
    Io(#[source] io::Error),
    /// The connection closed before the body's framed end.
    #[error("connection closed before the end of the body")]
    Closed,
    /// Malformed chunked framing.
    #[error("invalid chunked body: {0}")]
    Chunked(&'static str),
}

/// One idle keep-alive connection.
struct Idle {
    io: TcpStream,
    since: Instant,
}

/// Idle connections by `host:port`, most recently used last.
pub struct H1Pool {
    // foldhash rather than SipHash: keyed by configured endpoint
    // authorities, not by anything a client chooses.
    idle: parking_lot::Mutex<foldhash::HashMap<Box<str>, Vec<Idle>>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

impl std::fmt::Debug for H1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Pool")
            .field("connect_timeout", &self.connect_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

/// Where and what to send.
pub struct H1Request<'a> {
    /// The URL's authority, sent as the `Host` header.
    pub authority: &'a str,
    /// `host:port` to connect to (the authority with the default port
    /// filled in); also the pool key.
    pub addr: &'a str,
    /// Origin-form target, e.g. `/api/chat`.
    pub target: &'a str,
    /// Headers as given (hop-by-hop ones already removed by the caller).
    pub headers: &'a HeaderMap,
    /// The body (sent with `content-length`).
    pub body: Bytes,
}

impl H1Pool {
    /// A pool whose new connections time out after `connect_timeout` and
    /// whose idle ones are dropped after `idle_timeout`.
    pub fn new(connect_timeout: Duration, idle_timeout: Duration) -> Self {
        Self {
            idle: parking_lot::Mutex::new(foldhash::HashMap::default()),
            connect_timeout,
            idle_timeout,
        }
    }

    /// Sends `request` and returns the response once its head arrived; the
    /// body streams from the connection as it is polled.
    pub async fn post(
        self: &Arc<Self>,
        request: H1Request<'_>,
    ) -> Result<Response<H1Body>, H1Error> {
        let head = encode_head(&request);
        loop {
            let (io, reused) = match self.checkout(request.addr) {
                Some(io) => (io, true),
                None => (self.connect(request.addr).await?, false),
            };
            match exchange(io, &head, &request.body).await {
                Ok((response, io, buf)) => return Ok(self.respond(response, io, buf, request)),
                Err(Failure::Untouched(_)) if reused => {
                    // Idle connections of a backend that closed them: drop
                    // them all, retry once on a fresh connection.
                    self.idle.lock().remove(request.addr);
                }
                Err(Failure::Untouched(e) | Failure::Broken(e)) => return Err(e),
            }
        }
    }

    fn respond(
        self: &Arc<Self>,
        head: Head,
        io: TcpStream,
        buf: BytesMut,
        request: H1Request<'_>,
    ) -> Response<H1Body> {
        let mut body = H1Body {
            conn: Some(io),
            buf,
            framing: head.framing,
            keep_alive: head.keep_alive,
            pool: self.clone(),
            addr: request.addr.into(),
            done: false,
        };
        body.finish_if_complete();
        let mut response = Response::new(body);
        *response.status_mut() = head.status;
        *response.version_mut() = head.version;
        *response.headers_mut() = head.headers;
        response
    }

    fn checkout(&self, addr: &str) -> Option<TcpStream> {
        let mut idle = self.idle.lock();
        let conns = idle.get_mut(addr)?;
        while let Some(conn) = conns.pop() {
            if conn.since.elapsed() < self.idle_timeout && cleanly_idle(&conn.io) {
                return Some(conn.io);
            }
        }
        None
    }

    fn checkin(&self, addr: &str, io: TcpStream) {
        let mut idle = self.idle.lock();
        // Looked up before `entry`, which would allocate the key every time.
        let conns = match idle.get_mut(addr) {
            Some(conns) => conns,
            None => idle.entry(addr.into()).or_default(),
        };
        // Oldest first: drop the expired ones while we are here.
        let fresh = conns
            .iter()
            .position(|c| c.since.elapsed() < self.idle_timeout)
            .unwrap_or(conns.len());
        conns.drain(..fresh);
        if conns.len() < MAX_IDLE_PER_HOST {
            conns.push(Idle {
                io,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self, addr: &str) -> Result<TcpStream, H1Error> {
        let connect = TcpStream::connect(addr);
        let io = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => return Err(H1Error::Connect(e)),
            Err(_) => {
                return Err(H1Error::ConnectTimeout(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {:?}", self.connect_timeout),
                )));
            }
        };
        // Small writes (one request, one head) must not wait for ACKs.
        io.set_nodelay(true).map_err(H1Error::Connect)?;
        Ok(io)
    }
}

/// Whether an idle connection can carry a request: nothing to read (no end
/// of stream, no reset, no stray bytes). Costs no syscall while the reactor
/// has not seen it become readable.
fn cleanly_idle(io: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// The request line and headers, ready to write.
fn encode_head(request: &H1Request<'_>) -> Vec<u8> {
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"POST ");
    head.extend_from_slice(request.target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    head.extend_from_slice(request.authority.as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in request.headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"content-length: ");
    push_decimal(&mut head, request.body.len());
    head.extend_from_slice(b"\r\n\r\n");
    head
}

/// Appends `n` in decimal (no formatting machinery per request).
fn push_decimal(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        // `n % 10` < 10: the cast cannot truncate.
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// A failed exchange: whether the backend can have seen the request.
enum Failure {
    /// Writing the request failed: the connection was already reset.
    Untouched(H1Error),
    /// The request was written (the backend may be working on it), then the
    /// exchange failed.
    Broken(H1Error),
}

/// A parsed response head.
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
}

/// Writes the request and reads the response head; returns the connection
/// and whatever body bytes were read with the head.
async fn exchange(
    mut io: TcpStream,
    head: &[u8],
    body: &Bytes,
) -> Result<(Head, TcpStream, BytesMut), Failure> {
    let mut out = Buf::chain(head, body.as_ref());
    if let Err(e) = io.write_all_buf(&mut out).await {
        return Err(Failure::Untouched(H1Error::Io(e)));
    }
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        make_room(&mut buf);
        match read(&mut io, &mut buf).await {
            Ok(0) => return Err(Failure::Broken(H1Error::Closed)),
            Ok(_) => {}
            Err(e) => return Err(Failure::Broken(H1Error::Io(e))),
        }
        // One read can hold an interim head (100 Continue and friends)
        // and the final one after it: parse until the buffer holds no
        // complete head before reading again.
        loop {
            match parse_head(&mut buf) {
                Ok(Some(Parsed::Interim)) => {}
                Ok(Some(Parsed::Final(head))) => return Ok((head, io, buf)),
                Ok(None) if buf.len() > MAX_HEAD => {
                    return Err(Failure::Broken(H1Error::Protocol(
                        "response head too large",
                    )));
                }
                Ok(None) => break,
                Err(e) => return Err(Failure::Broken(e)),
            }
        }
    }
}

/// Makes sure the next read has a useful amount of space.
fn make_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(READ_CHUNK);
    }
}

async fn read(io: &mut TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    std::future::poll_fn(|cx| poll_read(io, cx, buf)).await
}

/// Reads what is available into `buf` (0 = end of stream), through
/// tokio's `AsyncRead`: a read that leaves room in `buf` tells the reactor
/// the socket is drained (epoll), so the liveness check of the idle
/// connection at its next checkout ([`cleanly_idle`]) costs no syscall.
/// (`try_read_buf` keeps the readiness until a read would block: one
/// `EAGAIN` syscall per request.)
fn poll_read(
    io: &mut TcpStream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

enum Parsed {
    Interim,
    Final(Head),
}

/// Takes the response head off the front of `buf` once it is complete
/// (`None` while it is not). Header values are slices of one copy of the
/// head, not copies each: one allocation per head instead of one per
/// header, and cloning them later is a reference count. Parsed once, into
/// uninitialised header slots (`MAX_HEADERS` initialised slots are 4 KB of
/// writes per response).
fn parse_head(buf: &mut BytesMut) -> Result<Option<Parsed>, H1Error> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        buf,
        &mut slots,
    ) {
        // The same limit whether the head came in one read or many (the
        // read loop checks an incomplete one).
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => {
            return Err(H1Error::Protocol("response head too large"));
        }
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(H1Error::Protocol("too many response headers"));
        }
        Err(_) => return Err(H1Error::Protocol("malformed response head")),
    };
    let code = parsed.code.unwrap_or(0);
    let status =
        StatusCode::from_u16(code).map_err(|_| H1Error::Protocol("invalid status code"))?;
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        buf.advance(len);
        return Ok(Some(Parsed::Interim));
    }
    let version = if parsed.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let head = Bytes::copy_from_slice(&buf[..len]);
    let base = buf.as_ptr().addr();
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    let mut chunked = false;
    let mut length: Option<u64> = None;
    let mut close = version == Version::HTTP_10;
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| H1Error::Protocol("invalid header name"))?;
        // httparse's slices lie within `buf[..len]`, which `head` copies.
        let start = h.value.as_ptr().addr() - base;
        let value = HeaderValue::from_maybe_shared(head.slice(start..start + h.value.len()))
            .map_err(|_| H1Error::Protocol("invalid header value"))?;
        if name == http::header::TRANSFER_ENCODING {
            // Chunked only counts as the last coding.
            chunked = value
                .to_str()
                .ok()
                .and_then(|v| v.rsplit(',').next())
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if name == http::header::CONTENT_LENGTH {
            let n = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(H1Error::Protocol("invalid content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(H1Error::Protocol("conflicting content-length"));
            }
            length = Some(n);
        } else if name == http::header::CONNECTION {
            let v = value.as_bytes();
            if v.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if v.eq_ignore_ascii_case(b"keep-alive") {
                close = false;
            }
        }
        headers.append(name, value);
    }
    buf.advance(len);
    let framing = if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked(Chunk::Size)
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        close = true;
        Framing::UntilClose
    };
    Ok(Some(Parsed::Final(Head {
        status,
        version,
        headers,
        framing,
        keep_alive: !close,
    })))
}

/// How the body ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// This many bytes still to come.
    Length(u64),
    /// Chunked, in this state.
    Chunked(Chunk),
    /// Until the backend closes (not reusable).
    UntilClose,
}

/// Chunked decoding state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// This many data bytes of the current chunk left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
    /// Done.
    End,
}

/// What decoding the buffer gave.
enum Decoded {
    Data(Bytes),
    NeedMore,
    End,
}

/// Longest chunk-size or trailer line accepted.
const MAX_LINE: usize = 8 * 1024;

impl Framing {
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, H1BodyError> {
        match self {
            Self::Length(0) => Ok(Decoded::End),
            Self::Length(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= n as u64;
                Ok(Decoded::Data(buf.split_to(n).freeze()))
            }
            Self::UntilClose => {
                if buf.is_empty() {
                    Ok(Decoded::NeedMore)
                } else {
                    Ok(Decoded::Data(buf.split().freeze()))
                }
            }
            Self::Chunked(state) => loop {
                match *state {
                    Chunk::End => return Ok(Decoded::End),
                    Chunk::Data(0) => *state = Chunk::DataEnd,
                    Chunk::Data(left) => {
                        if buf.is_empty() {
                            return Ok(Decoded::NeedMore);
                        }
                        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                        *state = Chunk::Data(left - n as u64);
                        return Ok(Decoded::Data(buf.split_to(n).freeze()));
                    }
                    Chunk::DataEnd => {
                        if buf.len() < 2 {
                            return Ok(Decoded::NeedMore);
                        }
                        if &buf[..2] != b"\r\n" {
                            return Err(H1BodyError::Chunked("missing CRLF after chunk data"));
                        }
                        buf.advance(2);
                        *state = Chunk::Size;
                    }
                    Chunk::Size => {
                        let Some(line) = take_line(buf)? else {
                            return Ok(Decoded::NeedMore);
                        };
                        let size = parse_chunk_size(&line)?;
                        *state = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Chunk::Trailers => {
                        let Some(line) = take_line(buf)? else {
                            return Ok(Decoded::NeedMore);
                        };
                        if line.is_empty() {
                            *state = Chunk::End;
                        }
                    }
                }
            },
        }
    }

    /// Whether the backend closing the connection now ends the body
    /// cleanly.
    fn ends_at_close(self) -> bool {
        matches!(
            self,
            Self::UntilClose | Self::Chunked(Chunk::End) | Self::Length(0)
        )
    }
}

/// One CRLF-terminated line from the front of `buf`, without the CRLF.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, H1BodyError> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(i) => {
            let mut line = buf.split_to(i + 1);
            line.truncate(i);
            if line.last() == Some(&b'\r') {
                line.truncate(i - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err(H1BodyError::Chunked("line too long")),
        None => Ok(None),
    }
}

/// The hex size of a chunk-size line (extensions after `;` ignored).
fn parse_chunk_size(line: &[u8]) -> Result<u64, H1BodyError> {
    let digits = line.split(|&b| b == b';').next().unwrap_or_default();
    let digits = digits.trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return Err(H1BodyError::Chunked("invalid chunk size"));
    }
    let mut size = 0u64;
    for &b in digits {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return Err(H1BodyError::Chunked("invalid chunk size")),
        };
        size = size * 16 + u64::from(d);
    }
    Ok(size)
}

/// A response body read straight from its connection. Read to its end, the
/// connection goes back to the pool; dropped before, it is closed.
pub struct H1Body {
    conn: Option<TcpStream>,
    buf: BytesMut,
    framing: Framing,
    keep_alive: bool,
    pool: Arc<H1Pool>,
    addr: Box<str>,
    done: bool,
}

impl std::fmt::Debug for H1Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Body")
            .field("framing", &self.framing)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl H1Body {
    /// Marks the body done when its framing says nothing more comes (e.g.
    /// `content-length: 0`), returning the connection at once.
    fn finish_if_complete(&mut self) {
        if matches!(self.framing, Framing::Length(0)) {
            self.finish();
        }
    }

    /// Ends the body with `e`; the connection is closed (its state is
    /// unknown).
    fn fail(&mut self, e: H1BodyError) -> Poll<Option<Result<Frame<Bytes>, H1BodyError>>> {
        self.done = true;
        self.conn = None;
        Poll::Ready(Some(Err(e)))
    }

    fn finish(&mut self) {
        self.done = true;
        if let Some(io) = self.conn.take()
            && self.keep_alive
            && self.buf.is_empty()
            && self.framing != Framing::UntilClose
        {
            self.pool.checkin(&self.addr, io);
        }
    }
}

impl http_body::Body for H1Body {
    type Data = Bytes;
    type Error = H1BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1BodyError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            match this.framing.decode(&mut this.buf) {
                Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Decoded::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => {}
                Err(e) => return this.fail(e),
            }
            let Some(io) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            make_room(&mut this.buf);
            match std::task::ready!(poll_read(io, cx, &mut this.buf)) {
                Ok(0) if this.framing.ends_at_close() => {
                    this.keep_alive = false;
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(H1BodyError::Closed),
                Ok(_) => {}
                Err(e) => return this.fail(H1BodyError::Io(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests;
