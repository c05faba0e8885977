//! The pooled HTTP clients that carry requests to backends: one per endpoint
//! kind, each with that kind's connect timeout; connections are reused
//! across requests (keep-alive).

use switchyard_control_plane::{config::SidecarConfig, endpoint::EndpointKind};

/// One pooled HTTP client per endpoint kind.
#[derive(Clone, Debug)]
pub struct UpstreamClients {
    ollama: reqwest::Client,
    openai: reqwest::Client,
    llama_server: reqwest::Client,
}

impl UpstreamClients {
    /// Builds the clients with each kind's connect timeout.
    pub fn new(config: &SidecarConfig) -> Result<Self, reqwest::Error> {
        let build = |kind: EndpointKind| {
            reqwest::Client::builder()
                .connect_timeout(config.timeouts(kind).connect)
                // POST bodies must not be replayed as GETs to another host.
                .redirect(reqwest::redirect::Policy::none())
                .tcp_nodelay(true)
                .pool_idle_timeout(std::time::Duration::from_secs(90))
                .build()
        };
        Ok(Self {
            ollama: build(EndpointKind::Ollama)?,
            openai: build(EndpointKind::OpenAi)?,
            llama_server: build(EndpointKind::LlamaServer)?,
        })
    }

    /// The client for an endpoint kind.
    pub fn get(&self, kind: EndpointKind) -> &reqwest::Client {
        match kind {
            EndpointKind::Ollama => &self.ollama,
            EndpointKind::OpenAi => &self.openai,
            EndpointKind::LlamaServer => &self.llama_server,
        }
    }
}

