//! The route table: every path the sidecar answers, and the vocabulary the
//! proxy uses to talk about them ([`ApiRoute`], [`ApiFormat`]).
//!
//! Invariants:
//! - Every routed inference path is one [`ApiRoute`] variant; nothing else
//!   compares path strings (the error format of an unmatched path is decided
//!   once, by [`ApiFormat::for_path`]).
//! - Authentication wraps every route except the liveness routes `GET /`
//!   and `GET /health` (see [`crate::auth`]).
//! - `GET /metrics` is served on the same listener as the APIs.
//! - Browser requests (`Origin` header) pass [`crate::cors`] first, on every
//!   path: preflights are answered there, refused origins get 403, and
//!   allowed ones get `Access-Control-Allow-Origin` on their answer.
//! - `Entry` is what the server runs: inference POSTs without a query
//!   string go straight to the key check and `proxy::handle` (the same
//!   check and handler the router below would reach, without its per-request
//!   routing, middleware and boxing: ~10 allocations per request); every
//!   other request goes through the axum router, so there is one definition
//!   of each behaviour.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use axum::{
    Router,
    extract::{Request, State},
    middleware,
    response::Response,
    routing::{get, post},
};
use http::Method;
use switchyard_control_plane::outcome::RequestKind;
use tower_service::Service;

use crate::{
    auth, cors, errors::ProxyError, listing, manage, metrics, proxy, server::AppState,
    stored_responses,
};

/// The API family a client speaks; decides the shape of every error it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApiFormat {
    /// Ollama native (`/api/*`, `/`): errors are `{"error":"text"}`.
    Ollama,
    /// OpenAI (`/v1/*`): errors are `{"error":{message,type,param,code}}`.
    OpenAi,
    /// Anthropic Messages (`/v1/messages`): errors are
    /// `{"type":"error","error":{type,message}}`.
    Anthropic,
}

impl ApiFormat {
    /// The format of a request path: a routed path's own format
    /// ([`ApiRoute::format`]); otherwise `/v1` and below are OpenAI, the rest
    /// Ollama.
    pub fn for_path(path: &str) -> Self {
        // `//v1/models` (a base URL ending in `/` plus `/v1/...`) is still
        // an OpenAI client's path, and gets its error format.
        let rest = path.trim_start_matches('/');
        if let Some(route) = ApiRoute::for_path(path) {
            route.format()
        } else if rest == "v1" || rest.starts_with("v1/") {
            Self::OpenAi
        } else {
            Self::Ollama
        }
    }
}

/// An inference route routed to one backend by the body's `model`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApiRoute {
    /// Ollama `POST /api/chat`.
    OllamaChat,
    /// Ollama `POST /api/generate`.
    OllamaGenerate,
    /// Ollama `POST /api/embed`.
    OllamaEmbed,
    /// Ollama `POST /api/embeddings` (legacy, single prompt).
    OllamaEmbeddings,
    /// Ollama `POST /api/show`.
    OllamaShow,
    /// OpenAI `POST /v1/chat/completions`.
    OpenAiChat,
    /// OpenAI `POST /v1/completions`.
    OpenAiCompletions,
    /// OpenAI `POST /v1/embeddings`.
    OpenAiEmbeddings,
    /// Anthropic `POST /v1/messages` (the Messages API: Ollama, vLLM and
    /// recent llama-server builds serve it, for Claude Code and the
    /// Anthropic SDKs).
    AnthropicMessages,
    /// Anthropic `POST /v1/messages/count_tokens` (llama-server and vLLM
    /// serve it; Ollama answers 404, which Claude Code copes with).
    AnthropicCountTokens,
    /// OpenAI `POST /v1/responses` (the Responses API, stateless: Ollama,
    /// vLLM and recent llama-server builds serve it).
    OpenAiResponses,
    /// OpenAI-style `POST /v1/rerank` (llama-server, vLLM, Jina/Cohere
    /// shape: `{model, query, documents, top_n?}`).
    Rerank,
    /// `POST /rerank`: the unversioned alias llama-server and vLLM serve
    /// (and nomyo-router routes).
    RerankAlias,
}

impl ApiRoute {
    /// Every routed inference route.
    pub const ALL: [ApiRoute; 13] = [
        Self::OllamaChat,
        Self::OllamaGenerate,
        Self::OllamaEmbed,
        Self::OllamaEmbeddings,
        Self::OllamaShow,
        Self::OpenAiChat,
        Self::OpenAiCompletions,
        Self::OpenAiEmbeddings,
        Self::OpenAiResponses,
        Self::AnthropicMessages,
        Self::AnthropicCountTokens,
        Self::Rerank,
        Self::RerankAlias,
    ];

    /// The route served at `path`, if any.
    pub fn for_path(path: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.path() == path)
    }

    /// The client-facing path (also the `route` label in metrics and logs).
    pub fn path(self) -> &'static str {
        match self {
            Self::OllamaChat => "/api/chat",
            Self::OllamaGenerate => "/api/generate",
            Self::OllamaEmbed => "/api/embed",
            Self::OllamaEmbeddings => "/api/embeddings",
            Self::OllamaShow => "/api/show",
            Self::OpenAiChat => "/v1/chat/completions",
            Self::OpenAiCompletions => "/v1/completions",
            Self::OpenAiEmbeddings => "/v1/embeddings",
            Self::OpenAiResponses => "/v1/responses",
            Self::AnthropicMessages => "/v1/messages",
            Self::AnthropicCountTokens => "/v1/messages/count_tokens",
            Self::Rerank => "/v1/rerank",
            Self::RerankAlias => "/rerank",
        }
    }

    /// The API family of the route.
    pub fn format(self) -> ApiFormat {
        match self {
            Self::OllamaChat
            | Self::OllamaGenerate
            | Self::OllamaEmbed
            | Self::OllamaEmbeddings
            | Self::OllamaShow => ApiFormat::Ollama,
            Self::OpenAiChat
            | Self::OpenAiCompletions
            | Self::OpenAiEmbeddings
            | Self::OpenAiResponses
            | Self::Rerank
            | Self::RerankAlias => ApiFormat::OpenAi,
            Self::AnthropicMessages | Self::AnthropicCountTokens => ApiFormat::Anthropic,
        }
    }

    /// What the request does, for the control plane.
    pub fn kind(self) -> RequestKind {
        match self {
            Self::OllamaChat
            | Self::OpenAiChat
            | Self::OpenAiResponses
            | Self::AnthropicMessages => RequestKind::Chat,
            Self::OllamaGenerate | Self::OpenAiCompletions => RequestKind::Generate,
            Self::OllamaEmbed | Self::OllamaEmbeddings | Self::OpenAiEmbeddings => {
                RequestKind::Embed
            }
            Self::OllamaShow => RequestKind::Show,
            Self::Rerank | Self::RerankAlias => RequestKind::Rerank,
            Self::AnthropicCountTokens => RequestKind::CountTokens,
        }
    }

    /// Whether the route has a `stream` field at all.
    pub fn accepts_stream(self) -> bool {
        match self {
            Self::OllamaChat
            | Self::OllamaGenerate
            | Self::OpenAiChat
            | Self::OpenAiCompletions
            | Self::OpenAiResponses
            | Self::AnthropicMessages => true,
            Self::OllamaEmbed
            | Self::OllamaEmbeddings
            | Self::OllamaShow
            | Self::OpenAiEmbeddings
            | Self::AnthropicCountTokens
            | Self::Rerank
            | Self::RerankAlias => false,
        }
    }

    /// The stream mode when the body has no `stream` field: Ollama streams by
    /// default (nomyo bug 2 came from ignoring this), OpenAI does not.
    pub fn default_stream(self) -> bool {
        matches!(self, Self::OllamaChat | Self::OllamaGenerate)
    }

    /// Body fields that may carry the model name, in order of preference
    /// (`/api/show` from older clients sends `name`).
    pub fn model_fields(self) -> &'static [&'static str] {
        match self {
            Self::OllamaShow => &["model", "name"],
            _ => &["model"],
        }
    }
}

/// Builds the axum application: inference routes, listings, health,
/// metrics, a fallback answering unknown paths in the client's format, all
/// behind the router-key check.
pub(crate) fn app(state: AppState) -> Router {
    let mut router = Router::new();
    for route in ApiRoute::ALL {
        router = router.route(
            route.path(),
            post(move |State(state): State<AppState>, req: Request| {
                proxy::handle(state, route, req)
            }),
        );
    }
    router
        .route("/", get(listing::root).head(listing::root))
        .route("/health", get(listing::health_handler))
        .route("/api/version", get(listing::version))
        .route("/api/tags", get(listing::tags))
        .route("/api/ps", get(listing::ps))
        .route("/api/usage", get(crate::usage::usage))
        .route("/api/usage-stream", get(crate::usage::usage_stream))
        .route("/v1/models", get(listing::openai_models))
        .route("/v1/models/{*model}", get(listing::openai_model))
        .route("/metrics", get(metrics::handler))
        .merge(manage::routes())
        .merge(stored_responses::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::middleware,
        ))
        .with_state(state)
}

/// The service the server runs: the fast path for inference POSTs, the
/// axum [`app`] for everything else (see the module docs).
#[derive(Clone)]
pub(crate) struct Entry {
    app: Router,
    state: AppState,
}

impl Entry {
    pub(crate) fn new(state: AppState) -> Self {
        Self {
            app: app(state.clone()),
            state,
        }
    }
}

impl Service<Request> for Entry {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        self.respond(req)
    }
}

impl Entry {
    /// Answers one request: the CORS check, then [`Entry::serve`]. Needs
    /// no `&mut`: the server calls it on the connection's shared copy.
    pub(crate) fn respond(&self, req: Request) -> <Self as Service<Request>>::Future {
        match cors::admit(self.state.allowed_origins(), &req) {
            cors::Admission::Plain => self.serve(req),
            cors::Admission::Answered(response) => Box::pin(async move { Ok(response) }),
            cors::Admission::Allowed(origin) => {
                let served = self.serve(req);
                Box::pin(async move {
                    let mut response = served.await?;
                    cors::decorate(&mut response, origin);
                    Ok(response)
                })
            }
        }
    }
}

impl Entry {
    /// Serves one request: the fast path or the router.
    fn serve(&self, req: Request) -> <Self as Service<Request>>::Future {
        // A query string may carry `api_key` (stripped by the middleware):
        // the router path handles those.
        let fast = if req.method() == Method::POST && req.uri().query().is_none() {
            ApiRoute::for_path(req.uri().path())
        } else {
            None
        };
        match fast {
            Some(route) => {
                let state = self.state.clone();
                Box::pin(async move {
                    // Inference routes are never public: the middleware's
                    // check, without the query (there is none).
                    Ok(
                        match auth::check(state.router_api_key(), req.headers(), None) {
                            Ok(()) => proxy::handle(state, route, req).await,
                            Err(e) => auth::refusal(e, route.path()),
                        },
                    )
                })
            }
            None => {
                let mut app = self.app.clone();
                Box::pin(async move { app.call(req).await })
            }
        }
    }
}

async fn not_found(req: Request) -> Response {
    let format = ApiFormat::for_path(req.uri().path());
    ProxyError::UnknownRoute.into_response_for(format)
}

async fn method_not_allowed(req: Request) -> Response {
    let format = ApiFormat::for_path(req.uri().path());
    ProxyError::MethodNotAllowed.into_response_for(format)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_follow_paths() {
        for route in ApiRoute::ALL {
            assert_eq!(
                ApiFormat::for_path(route.path()),
                route.format(),
                "{route:?}"
            );
        }
        assert_eq!(ApiFormat::for_path("/v1"), ApiFormat::OpenAi);
        assert_eq!(ApiFormat::for_path("//v1/models"), ApiFormat::OpenAi);
        assert_eq!(ApiFormat::for_path("//api/chat"), ApiFormat::Ollama);
        assert_eq!(ApiFormat::for_path("/v1x"), ApiFormat::Ollama);
        assert_eq!(ApiFormat::for_path("/"), ApiFormat::Ollama);
    }

    #[test]
    fn only_ollama_generation_streams_by_default() {
        let streaming: Vec<_> = ApiRoute::ALL
            .into_iter()
            .filter(|r| r.default_stream())
            .collect();
        assert_eq!(streaming, [ApiRoute::OllamaChat, ApiRoute::OllamaGenerate]);
        for r in streaming {
            assert!(r.accepts_stream());
        }
    }
}
