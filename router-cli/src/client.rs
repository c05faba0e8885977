//! The gRPC connection to the control plane, with the CLI's timeouts, and
//! one method per call the CLI makes. Every error leaves this module as a
//! [`CliError`] that names the address tried.
//!
//! Timeouts: connecting is bounded by [`CONNECT_TIMEOUT`]; every unary call
//! carries a deadline of [`CALL_DEADLINE`] (sent as `grpc-timeout`, so the
//! server gives up too). The `WatchUsage` stream has no deadline: it lives
//! until Ctrl-C; HTTP/2 keep-alives detect a silently dead peer instead.

use std::time::Duration;

use switchyard_proto::v1::{self, cluster_client::ClusterClient, routing_client::RoutingClient};
use tonic::{
    Request, Streaming,
    transport::{Channel, Endpoint},
};

use crate::{cli::ControlPlaneUrl, error::CliError};

/// Longest wait for the TCP (and HTTP/2) connection to the control plane.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Deadline of each unary call.
pub const CALL_DEADLINE: Duration = Duration::from_secs(10);
/// HTTP/2 keep-alive ping period (detects a dead control plane under `watch`).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a keep-alive ping may go unanswered.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A connected control-plane client.
#[derive(Clone, Debug)]
pub struct ControlPlaneClient {
    addr: String,
    cluster: ClusterClient<Channel>,
    routing: RoutingClient<Channel>,
}

impl ControlPlaneClient {
    /// Connects (eagerly, so an unreachable control plane is reported before
    /// any call is attempted).
    pub async fn connect(url: &ControlPlaneUrl) -> Result<Self, CliError> {
        let addr = url.to_string();
        let endpoint = Endpoint::from(url.uri().clone())
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        // `connect_timeout` bounds the TCP connect; the outer timeout also
        // bounds the HTTP/2 handshake with a server that accepts and stalls.
        let channel = match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => return Err(CliError::connect(&addr, &e)),
            Err(_elapsed) => {
                return Err(CliError::Unreachable {
                    addr,
                    cause: format!("no connection within {}s", CONNECT_TIMEOUT.as_secs_f64()),
                });
            }
        };
        Ok(Self {
            addr,
            cluster: ClusterClient::new(channel.clone()),
            routing: RoutingClient::new(channel),
        })
    }

    /// The address connected to, as given.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn request<T>(msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.set_timeout(CALL_DEADLINE);
        req
    }

    fn fail(&self, status: tonic::Status) -> CliError {
        CliError::status(&self.addr, status, CALL_DEADLINE)
    }

    /// `Cluster.GetState`.
    pub async fn get_state(&mut self) -> Result<v1::ClusterState, CliError> {
        let req = Self::request(v1::GetStateRequest {});
        match self.cluster.get_state(req).await {
            Ok(resp) => Ok(resp.into_inner()),
            Err(status) => Err(self.fail(status)),
        }
    }

    /// `Cluster.ListSessions`.
    pub async fn list_sessions(&mut self) -> Result<v1::ListSessionsResponse, CliError> {
        let req = Self::request(v1::ListSessionsRequest {});
        match self.cluster.list_sessions(req).await {
            Ok(resp) => Ok(resp.into_inner()),
            Err(status) => Err(self.fail(status)),
        }
    }

    /// `Cluster.ListAffinity`.
    pub async fn list_affinity(
        &mut self,
        limit: u32,
    ) -> Result<v1::ListAffinityResponse, CliError> {
        let req = Self::request(v1::ListAffinityRequest { limit });
        match self.cluster.list_affinity(req).await {
            Ok(resp) => Ok(resp.into_inner()),
            Err(status) => Err(self.fail(status)),
        }
    }

    /// `Cluster.Drain` (`draining = true`) or `Cluster.Undrain`.
    pub async fn set_draining(
        &mut self,
        endpoint: &str,
        draining: bool,
    ) -> Result<v1::DrainResponse, CliError> {
        let req = Self::request(v1::DrainRequest {
            endpoint: endpoint.to_owned(),
        });
        let result = if draining {
            self.cluster.drain(req).await
        } else {
            self.cluster.undrain(req).await
        };
        match result {
            Ok(resp) => Ok(resp.into_inner()),
            Err(status) => Err(self.fail(status)),
        }
    }

    /// `Routing.ChooseEndpoint` as a dry run: `reserve = false`, no session,
    /// so no lease is taken and no affinity entry is written.
    pub async fn choose_dry_run(
        &mut self,
        model: &str,
        affinity_key: Option<&str>,
    ) -> Result<v1::ChooseResponse, CliError> {
        let req = Self::request(v1::ChooseRequest {
            model: model.to_owned(),
            affinity_key: affinity_key.unwrap_or_default().to_owned(),
            reserve: false,
            session_id: 0,
            request_kind: v1::RequestKind::Chat as i32,
            exclude_endpoints: Vec::new(),
            affinity_required: false,
        });
        match self.routing.choose_endpoint(req).await {
            Ok(resp) => Ok(resp.into_inner()),
            Err(status) => Err(self.fail(status)),
        }
    }

    /// `Routing.WatchUsage`: the stream of cluster states (no deadline).
    pub async fn watch_usage(&mut self) -> Result<Streaming<v1::ClusterState>, CliError> {
        let req = Request::new(v1::WatchUsageRequest {});
        match self.routing.watch_usage(req).await {
            Ok(resp) => Ok(resp.into_inner()),
            Err(status) => Err(self.fail(status)),
        }
    }
}
