//! The pooled HTTP clients that carry requests to backends: one per endpoint
//! kind, each with that kind's connect timeout; connections are reused
//! across requests (keep-alive), `http://` and `https://` (rustls, Mozilla
//! roots, HTTP/2 by ALPN) alike.
//!
//! Two clients behind one call ([`UpstreamClient::post`]):
//! - `http://` backends (the usual case on a cluster network) go through
//!   `h1`: the request runs in the proxying task itself on a pooled
//!   keep-alive connection, without a connection task in between;
//! - `https://` backends go through `hyper-util`'s pooled client (rustls,
//!   Mozilla roots, HTTP/2 by ALPN).
//!
//! Model management ([`crate::manage`]) also sends other methods
//! ([`UpstreamClient::send`]: `DELETE`, `HEAD`, through hyper for either
//! scheme) and streamed bodies of unknown length
//! ([`UpstreamClient::send_streaming`]: blob uploads, through a hyper
//! client of their own, so the hot path keeps its `Full` body type).
//!
//! Neither re-parses URLs more than once, follows redirects (a POST must not
//! be replayed elsewhere) or retries beyond `h1`'s one resend when writing
//! to a pooled connection the backend had already reset (URL re-parsing and
//! the redirect/retry layers showed up in the sidecar's CPU profile when it
//! used a convenience client: BENCHMARKS.md).
//!
//! Invariants: the body is sent as given (length known up front, except
//! for [`UpstreamClient::send_streaming`]); the
//! `Host` header is set by the client from the URL; credentials in an
//! endpoint URL (`http://user:pass@host`) are never part of the address,
//! the `Host` header or an error: the request goes to the URL
//! [`without_credentials`] and carries them as `Authorization: Basic`,
//! unless the caller already set `Authorization` (the endpoint's API key
//! wins, as in [`authorization`]'s order; see [`target`]); send failures are
//! classified once, here ([`SendError`]), into connect / connect-timeout /
//! other, so the outcome rules in [`super::release`] never look at error
//! text.

mod h1;

use std::{
    borrow::Cow,
    error::Error as _,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, header::AUTHORIZATION};
use http_body::{Body, Frame};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
#[cfg(doc)]
use switchyard_control_plane::endpoint::authorization;
use switchyard_control_plane::{
    config::SidecarConfig,
    endpoint::{EndpointKind, basic_authorization, without_credentials},
};

/// How long an idle pooled connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(90);

pub use h1::{H1BodyError, H1Error};

/// A backend's answer: status, headers, and the body as it arrives.
pub type UpstreamResponse = Response<UpstreamBody>;

/// A backend's response body, from whichever client carried the request.
#[derive(Debug)]
pub enum UpstreamBody {
    /// Read straight from a plain-HTTP connection.
    Inline(h1::H1Body),
    /// From hyper's client (`https://`).
    Hyper(Incoming),
}

/// Why a response body broke off.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// From the plain-HTTP client.
    #[error("{0}")]
    Inline(#[source] H1BodyError),
    /// From hyper's client.
    #[error("{0}")]
    Hyper(#[source] hyper::Error),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Self::Inline(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BodyError::Inline))),
            Self::Hyper(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BodyError::Hyper))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Inline(b) => b.is_end_stream(),
            Self::Hyper(b) => b.is_end_stream(),
        }
    }
}

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up TLS for backend connections: {0}")]
pub struct ClientError(#[source] rustls::Error);

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The endpoint URL plus route is not a valid URI (a configuration
    /// problem; never sent).
    #[error("invalid backend URL {url:?}: {source}")]
    BadUrl {
        /// The URL, without credentials.
        url: String,
        /// Why.
        #[source]
        source: http::uri::InvalidUri,
    },
    /// The request failed before a response head arrived (plain HTTP).
    #[error("{0}")]
    Inline(#[source] H1Error),
    /// The request failed before a response head arrived (`https://`).
    #[error("{0}")]
    Transport(#[source] hyper_util::client::legacy::Error),
}

impl SendError {
    /// The connection could not be established (refused, unreachable, DNS,
    /// TLS handshake, connect timeout): nothing reached the backend.
    pub fn is_connect(&self) -> bool {
        match self {
            Self::BadUrl { .. } => true,
            Self::Inline(e) => matches!(e, H1Error::Connect(_) | H1Error::ConnectTimeout(_)),
            Self::Transport(e) => e.is_connect(),
        }
    }

    /// The connect timeout expired.
    pub fn is_timeout(&self) -> bool {
        let mut source = self.source();
        while let Some(e) = source {
            if e.downcast_ref::<io::Error>()
                .is_some_and(|io| io.kind() == io::ErrorKind::TimedOut)
            {
                return true;
            }
            source = e.source();
        }
        false
    }
}

/// A request body streamed as it arrives, of unknown length (model blob
/// uploads, tee'd from the client to several backends); an `Err` frame
/// aborts the request.
pub type StreamingBody = http_body_util::combinators::UnsyncBoxBody<Bytes, io::Error>;

/// One pooled client for one endpoint kind.
#[derive(Clone, Debug)]
pub struct UpstreamClient {
    plain: Arc<h1::H1Pool>,
    tls: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// hyper's client for streamed request bodies (blob uploads); apart
    /// from `tls` so the hot path's body type stays `Full`.
    streaming: Client<HttpsConnector<HttpConnector>, StreamingBody>,
}

impl UpstreamClient {
    /// A client whose connections time out after `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Result<Self, ClientError> {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        // The TLS layer decides per URL scheme.
        http.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(ClientError)?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let tls = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_timer(TokioTimer::new())
            .build(https.clone());
        let streaming = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_timer(TokioTimer::new())
            .build(https);
        Ok(Self {
            plain: Arc::new(h1::H1Pool::new(connect_timeout, POOL_IDLE)),
            tls,
            streaming,
        })
    }

    /// POSTs `body` to `url` with `headers`; resolves when the response
    /// head has arrived (the body streams on).
    pub async fn post(
        &self,
        url: &str,
        mut headers: HeaderMap,
        body: Bytes,
    ) -> Result<UpstreamResponse, SendError> {
        let uri = target(url, &mut headers)?;
        if uri.scheme() == Some(&http::uri::Scheme::HTTP)
            && let Some(authority) = uri.authority()
        {
            let addr = match authority.port_u16() {
                Some(_) => Cow::Borrowed(authority.as_str()),
                None => Cow::Owned(format!("{}:80", authority.host())),
            };
            let target = uri.path_and_query().map_or("/", |p| p.as_str());
            let request = h1::H1Request {
                authority: authority.as_str(),
                addr: &addr,
                target,
                headers: &headers,
                body,
            };
            return match self.plain.post(request).await {
                Ok(response) => Ok(response.map(UpstreamBody::Inline)),
                Err(e) => Err(SendError::Inline(e)),
            };
        }
        self.via_hyper(Method::POST, uri, headers, body).await
    }

    /// Sends a request with any method: POSTs as [`Self::post`] does;
    /// other methods (model management's `DELETE /api/delete`) go through
    /// hyper's pooled client, which speaks plain HTTP as well (the inline
    /// client writes POSTs only, the one method of the hot path).
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        mut headers: HeaderMap,
        body: Bytes,
    ) -> Result<UpstreamResponse, SendError> {
        if method == Method::POST {
            return self.post(url, headers, body).await;
        }
        let uri = target(url, &mut headers)?;
        self.via_hyper(method, uri, headers, body).await
    }

    /// Sends a request whose body streams while it is sent (a blob upload),
    /// through hyper's client; `Content-Length` is sent when `headers` has
    /// it, otherwise the body is chunked.
    pub async fn send_streaming(
        &self,
        method: Method,
        url: &str,
        mut headers: HeaderMap,
        body: StreamingBody,
    ) -> Result<UpstreamResponse, SendError> {
        let uri = target(url, &mut headers)?;
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        match self.streaming.request(request).await {
            Ok(response) => Ok(response.map(UpstreamBody::Hyper)),
            Err(e) => Err(SendError::Transport(e)),
        }
    }

    /// One request through hyper's client.
    async fn via_hyper(
        &self,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<UpstreamResponse, SendError> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        match self.tls.request(request).await {
            Ok(response) => Ok(response.map(UpstreamBody::Hyper)),
            Err(e) => Err(SendError::Transport(e)),
        }
    }
}

/// The URI to send to for `url`: without its credentials (`user:pass@`),
/// which go into `headers` as `Authorization: Basic` unless `headers`
/// already has an `Authorization` (the endpoint's API key, set by
/// [`super::forward::upstream_headers`]). The inline client would otherwise
/// take `user:pass@host` for the host to connect to and put the password in
/// the `Host` header; hyper's client would connect to the host but send no
/// credentials.
fn target(url: &str, headers: &mut HeaderMap) -> Result<Uri, SendError> {
    let bare = without_credentials(url);
    if matches!(bare, Cow::Owned(_))
        && !headers.contains_key(AUTHORIZATION)
        && let Some(value) = basic_authorization(url)
        // Base64 after `Basic `: always a valid header value.
        && let Ok(mut value) = HeaderValue::from_str(&value)
    {
        value.set_sensitive(true);
        headers.insert(AUTHORIZATION, value);
    }
    Uri::try_from(bare.as_ref()).map_err(|source| SendError::BadUrl {
        url: bare.into_owned(),
        source,
    })
}

/// One pooled HTTP client per endpoint kind.
#[derive(Clone, Debug)]
pub struct UpstreamClients {
    ollama: UpstreamClient,
    openai: UpstreamClient,
    llama_server: UpstreamClient,
}

impl UpstreamClients {
    /// Builds the clients with each kind's connect timeout.
    pub fn new(config: &SidecarConfig) -> Result<Self, ClientError> {
        let build = |kind: EndpointKind| UpstreamClient::new(config.timeouts(kind).connect);
        Ok(Self {
            ollama: build(EndpointKind::Ollama)?,
            openai: build(EndpointKind::OpenAi)?,
            llama_server: build(EndpointKind::LlamaServer)?,
        })
    }

    /// The client for an endpoint kind.
    pub fn get(&self, kind: EndpointKind) -> &UpstreamClient {
        match kind {
            EndpointKind::Ollama => &self.ollama,
            EndpointKind::OpenAi => &self.openai,
            EndpointKind::LlamaServer => &self.llama_server,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::net::SocketAddr;

    use super::*;

    fn client() -> UpstreamClient {
        UpstreamClient::new(Duration::from_millis(300)).unwrap()
    }

    /// A port nothing listens on (bound, then released).
    fn closed_port() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    #[tokio::test]
    async fn refused_connection_is_a_connect_error_not_a_timeout() {
        let addr = closed_port();
        let e = client()
            .post(
                &format!("http://{addr}/api/chat"),
                HeaderMap::new(),
                Bytes::new(),
            )
            .await
            .unwrap_err();
        assert!(e.is_connect(), "{e:?}");
        assert!(!e.is_timeout(), "{e:?}");
    }

    #[tokio::test]
    async fn bad_url_is_refused_before_sending() {
        let e = client()
            .post("http://exa mple/", HeaderMap::new(), Bytes::new())
            .await
            .unwrap_err();
        assert!(matches!(e, SendError::BadUrl { .. }), "{e:?}");
        assert!(e.is_connect());
    }

    #[tokio::test]
    async fn posts_body_and_headers_and_reuses_the_connection() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            // One connection serves both requests (keep-alive).
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            for _ in 0..2 {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") || !got.ends_with(b"{}") {
                    let n = sock.read(&mut buf).await.unwrap();
                    assert!(n > 0, "connection closed early");
                    got.extend_from_slice(&buf[..n]);
                }
                seen.push(String::from_utf8(got).unwrap());
                sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .unwrap();
            }
            seen
        });
        let c = client();
        let mut headers = HeaderMap::new();
        headers.insert("x-test", "1".parse().unwrap());
        for _ in 0..2 {
            let r = c
                .post(
                    &format!("http://{addr}/api/chat"),
                    headers.clone(),
                    Bytes::from_static(b"{}"),
                )
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            use http_body_util::BodyExt as _;
            let body = r.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
        }
        let seen = server.await.unwrap();
        for req in &seen {
            let lower = req.to_ascii_lowercase();
            assert!(lower.starts_with("post /api/chat http/1.1\r\n"), "{req}");
            assert!(lower.contains(&format!("host: {addr}\r\n")), "{req}");
            assert!(lower.contains("x-test: 1\r\n"), "{req}");
            assert!(lower.contains("content-length: 2\r\n"), "{req}");
        }
    }

    /// A backend that answers `n` requests, one per connection, with an
    /// empty 200, and returns each request's head as it was received.
    async fn heads_of(n: usize) -> (SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut heads = Vec::new();
            for _ in 0..n {
                let (mut sock, _) = listener.accept().await.unwrap();
                let mut got = Vec::new();
                let mut buf = vec![0u8; 4096];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = sock.read(&mut buf).await.unwrap();
                    assert!(n > 0, "connection closed early");
                    got.extend_from_slice(&buf[..n]);
                }
                let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                heads.push(String::from_utf8(got[..end + 2].to_vec()).unwrap());
                sock.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
                .await
                .unwrap();
            }
            heads
        });
        (addr, server)
    }

    /// The values of header `name` in a request head.
    fn values<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
        head.split("\r\n")
            .filter_map(|line| line.split_once(':'))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
            .collect()
    }

    #[tokio::test]
    async fn url_credentials_become_basic_auth_not_the_host() {
        let (addr, server) = heads_of(3).await;
        let c = client();
        // base64("alice:Cred@Pw999"): user and password percent-decoded.
        let basic = "Basic YWxpY2U6Q3JlZEBQdzk5OQ==";
        let url = format!("http://alice:Cred%40Pw999@{addr}/api/chat");

        // The inline HTTP/1 client (POST).
        let r = c.post(&url, HeaderMap::new(), Bytes::new()).await.unwrap();
        assert_eq!(r.status(), 200);
        // An explicit key (the endpoint's `api_keys` entry) wins: one
        // Authorization field, the caller's.
        let mut keyed = HeaderMap::new();
        keyed.insert(AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        let r = c.post(&url, keyed, Bytes::new()).await.unwrap();
        assert_eq!(r.status(), 200);
        // hyper's client (other methods: model management's DELETE).
        let r = c
            .send(Method::DELETE, &url, HeaderMap::new(), Bytes::new())
            .await
            .unwrap();
        assert_eq!(r.status(), 200);

        let heads = server.await.unwrap();
        let want_host = addr.to_string();
        for head in &heads {
            assert_eq!(values(head, "host"), [want_host.as_str()], "{head}");
            assert!(!head.contains("alice"), "{head}");
            assert!(!head.contains("Pw999"), "{head}");
        }
        assert!(
            heads[0].starts_with("POST /api/chat HTTP/1.1\r\n"),
            "{}",
            heads[0]
        );
        assert_eq!(values(&heads[0], "authorization"), [basic], "{}", heads[0]);
        assert_eq!(
            values(&heads[1], "authorization"),
            ["Bearer k"],
            "{}",
            heads[1]
        );
        assert!(
            heads[2].starts_with("DELETE /api/chat HTTP/1.1\r\n"),
            "{}",
            heads[2]
        );
        assert_eq!(values(&heads[2], "authorization"), [basic], "{}", heads[2]);
    }

    #[tokio::test]
    async fn a_bad_url_error_does_not_show_its_credentials() {
        let e = client()
            .post("http://u:sekret@exa mple/", HeaderMap::new(), Bytes::new())
            .await
            .unwrap_err();
        assert!(matches!(e, SendError::BadUrl { .. }), "{e:?}");
        assert!(!e.to_string().contains("sekret"), "{e}");
    }
}
