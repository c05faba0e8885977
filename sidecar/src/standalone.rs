//! Wiring of the two routing modes.
//!
//! - Standalone: the control plane runs in this process — its upkeep and
//!   `WatchUsage` publisher plus the discovery probes
//!   ([`switchyard_control_plane::server::spawn_background`]) — and the
//!   router calls it directly, with no gRPC hop.
//! - Remote: the router talks gRPC to a control plane elsewhere and keeps
//!   routing (degraded, from its last snapshot) when that control plane is
//!   unreachable.
//!
//! Every background task lands on the caller's [`TaskTracker`] and stops on
//! the caller's [`CancellationToken`].

use std::sync::Arc;

use switchyard_control_plane::{
    config::Config, control_plane::ControlPlane, endpoint::without_credentials,
    server::spawn_background,
};
use tokio::{net::TcpListener, runtime::Handle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    router::{RemoteSettings, Router},
    server::StartError,
};

/// A router over an embedded control plane for `config`, with discovery
/// and upkeep running on `tasks` until `cancel`; with `grpc`, the control
/// plane's gRPC API is served there too (for the `switchyard` CLI). Drains
/// are kept in the config's `state_file`, as by the control-plane binary.
pub(crate) fn embedded_router(
    config: Arc<Config>,
    name: &str,
    grpc: Option<TcpListener>,
    tasks: &TaskTracker,
    cancel: &CancellationToken,
) -> Result<Router, StartError> {
    // What a newcomer needs first: where requests will go.
    for e in &config.endpoints {
        tracing::info!(endpoint = %without_credentials(&e.url), kind = %e.kind, "standalone: routing to endpoint");
    }
    let cp = ControlPlane::with_state_file(config)?;
    spawn_background(&cp, tasks, cancel.child_token()).map_err(StartError::Discovery)?;
    if let Some(listener) = grpc {
        let addr = listener
            .local_addr()
            .map_or_else(|_| "?".to_owned(), |a| a.to_string());
        tracing::info!(%addr, "serving the embedded control plane's gRPC API");
        let serve =
            switchyard_control_plane::server::serve(cp.clone(), listener, cancel.child_token());
        tasks.spawn(async move {
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "the embedded control plane's gRPC API failed");
            }
        });
    }
    Ok(Router::embedded(cp, name))
}

/// A router over the control plane at `url`, with a lane for each of the
/// server threads' runtimes `lanes`. The endpoints in `config`, if any, are
/// what it probes and routes on itself when the control plane is
/// unreachable at start or gone for a session TTL
/// (`router/local_discovery.rs`).
pub(crate) async fn remote_router(
    url: String,
    name: String,
    config: &Arc<Config>,
    lanes: Vec<Handle>,
    tasks: &TaskTracker,
    cancel: &CancellationToken,
) -> Router {
    let settings = RemoteSettings::from_config(config);
    let probe_config = (!config.endpoints.is_empty()).then(|| config.clone());
    Router::remote_on_lanes(
        url,
        name,
        settings,
        probe_config,
        lanes,
        tasks,
        cancel.child_token(),
    )
    .await
}
