//! Switchyard sidecar: the HTTP process clients talk to instead of an
//! Ollama server or an OpenAI-compatible endpoint. It serves both APIs,
//! routes every request by model to a backend chosen by the control plane
//! (remote over gRPC, or embedded in standalone mode), streams answers
//! without buffering, translates Ollama-API requests for OpenAI-only
//! backends, retries on another endpoint before the first byte, and
//! releases every lease exactly once.
//!
//! Where to look:
//! - [`server`]: listener, shared state, graceful shutdown, and the library
//!   API ([`start_standalone`], [`start_remote`], [`start`],
//!   [`SidecarHandle`]); [`standalone`] wires the routing modes.
//! - [`routes`]: the route table; [`proxy`]: the proxy phases (parse →
//!   choose → forward → stream → release); [`errors`]: every error's status
//!   and body in the client's format.
//! - [`auth`]: router key; [`affinity_key`]: conversation keys;
//!   [`listing`]: `/api/tags`, `/api/ps`, `/v1/models` (and one model), `/health`;
//!   [`metrics`]: `/metrics`; [`manage`]: model management (`/api/pull`,
//!   `/api/push`, `/api/create`, `/api/copy`, `/api/delete`, blobs, and
//!   `ollama stop`'s unload) fanned out to the Ollama endpoints;
//!   [`usage`]: nomyo-router's `/api/usage` and `/api/usage-stream`;
//!   [`stored_responses`]: the Responses API's stored-response routes
//!   (`GET`/`DELETE /v1/responses/{id}`, `input_items`, `cancel`), asked
//!   of every endpoint that may hold the response.
//! - [`router`]: the routing handle (`Router`, `Lease`) over the control
//!   plane; [`translate`] and [`framing`]: Ollama ⇄ OpenAI translation and
//!   stream decoders.
//! - [`cli`]: the `switchyard-sidecar` command line.
//!
//! Library API for tests:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use switchyard_control_plane::config::Config;
//! let config = Config::from_yaml("endpoints: [\"http://127.0.0.1:11434\"]", &|_| None)?;
//! let sidecar = switchyard_sidecar::start_standalone(config, "127.0.0.1:0".parse()?).await?;
//! let url = format!("http://{}/api/tags", sidecar.addr);
//! # let _ = url;
//! sidecar.shutdown().await; // graceful: in-flight requests finish first
//! # Ok(()) }
//! ```

pub mod affinity_key;
pub mod auth;
pub mod cli;
pub mod cors;
pub mod errors;
pub mod framing;
pub mod listing;
pub mod manage;
pub mod metrics;
pub mod proxy;

pub mod router;
pub mod routes;
pub mod server;
pub mod standalone;
pub mod stored_responses;
pub mod translate;
pub mod usage;

pub use server::{
    Mode, SidecarHandle, StartError, StartOptions, start, start_remote, start_standalone,
};
