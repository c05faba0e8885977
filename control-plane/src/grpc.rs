//! The gRPC edge: `switchyard.v1.Routing` and `switchyard.v1.Cluster`
//! implemented over the [`ControlPlane`] facade.
//!
//! Each handler parses its request at the boundary ([`convert`]), makes one
//! synchronous facade call (no lock is held across `.await`), and converts
//! the answer back. Every failure goes through [`status_from_error`], the one
//! exhaustive mapping from domain errors to gRPC codes:
//!
//! | error | code |
//! |---|---|
//! | invalid field | `INVALID_ARGUMENT`, message names the field |
//! | model not advertised anywhere | `NOT_FOUND`, message lists available models |
//! | model not advertised anywhere, but an endpoint never answered a probe (it may have it) | `UNAVAILABLE` |
//! | every candidate excluded or draining | `UNAVAILABLE` |
//! | unknown session (choose, register) | `FAILED_PRECONDITION` `unknown session N` (the sidecar re-opens) |
//! | unknown endpoint (drain) | `NOT_FOUND`, message lists configured endpoints |
//!
//! `WatchUsage` sends the current state at once, then every newly published
//! state; a slow watcher skips to the latest (a `watch` channel), and the
//! stream ends when the server shuts down.
//!
//! `Route` multiplexes choose and release on one bidirectional stream
//! ([`route_stream`]); each message goes through the very same code as the
//! unary `ChooseEndpoint` / `Release` calls ([`RoutingService::choose_step`],
//! [`RoutingService::release_now`]), so validation and error codes cannot
//! drift apart.

pub mod convert;
pub mod route_stream;

/// Why an `https://` control-plane URL is refused (by the sidecar and the
/// CLI alike) instead of being connected to in plaintext: the control plane
/// serves plaintext gRPC only, and whoever writes https expects encryption.
pub const HTTPS_UNSUPPORTED: &str = "https:// is not supported: the control plane serves \
    plaintext gRPC; use http:// (encrypt the link with a service mesh or tunnel if it \
    leaves the host)";

use std::{pin::Pin, sync::Arc, time::Instant};

use futures::Stream;
use switchyard_proto::v1::{self, cluster_server::Cluster, routing_server::Routing};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::{
    api::{AdminError, ReprobeError, UnknownEndpoint},
    cluster::ClusterState,
    control_plane::{ControlPlane, Held},
    decision::ChooseError,
    endpoint::without_credentials,
    grpc::convert::{
        ChooseCall, ConvertError, ReleaseCall, affinity_listing_to_proto,
        affinity_records_from_proto, lease_records_from_proto, session_id_from_proto,
    },
    grpc::route_stream::{RouteResponseStream, RouteStream},
};

/// Default number of affinity entries a `ListAffinity` call returns.
const DEFAULT_AFFINITY_SAMPLE: usize = 20;

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    /// The request is malformed.
    #[error(transparent)]
    Invalid(#[from] ConvertError),
    /// The policy could not choose.
    #[error(transparent)]
    Choose(#[from] ChooseError),
    /// An admin call named an endpoint that is not configured.
    #[error(transparent)]
    UnknownEndpoint(#[from] UnknownEndpoint),
    /// An admin change took effect but could not be saved.
    #[error(transparent)]
    NotSaved(AdminError),
}

impl From<AdminError> for GrpcError {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::UnknownEndpoint(u) => Self::UnknownEndpoint(u),
            not_saved @ AdminError::NotSaved { .. } => Self::NotSaved(not_saved),
        }
    }
}

/// The one mapping from domain errors to gRPC statuses.
pub fn status_from_error(err: GrpcError) -> Status {
    let message = err.to_string();
    match err {
        GrpcError::Invalid(_) => Status::invalid_argument(message),
        GrpcError::Choose(e) => match e {
            ChooseError::ModelNotFound { .. } => Status::not_found(message),
            ChooseError::NoEndpointAvailable { .. } => Status::unavailable(message),
            ChooseError::UnknownSession(_) => Status::failed_precondition(message),
        },
        GrpcError::UnknownEndpoint(_) => Status::not_found(message),
        GrpcError::NotSaved(_) => Status::internal(message),
    }
}

impl From<GrpcError> for Status {
    fn from(err: GrpcError) -> Self {
        status_from_error(err)
    }
}

fn invalid(err: ConvertError) -> Status {
    status_from_error(GrpcError::Invalid(err))
}

/// What [`RoutingService::choose_step`] did.
#[derive(Debug)]
pub enum ChooseStep {
    /// The answer.
    Answered(v1::ChooseResponse),
    /// Every endpoint is full: finish with
    /// [`RoutingService::choose_after_hold`].
    Held(HeldChoose),
}

/// A choose waiting for a slot.
#[derive(Debug)]
pub struct HeldChoose {
    call: ChooseCall,
    since: Instant,
}

/// The `Routing` service (sidecars' data path).
#[derive(Clone, Debug)]
pub struct RoutingService {
    cp: ControlPlane,
    shutdown: CancellationToken,
}

impl RoutingService {
    /// A service over `cp`; `WatchUsage` and `Route` streams end when
    /// `shutdown` fires.
    pub fn new(cp: ControlPlane, shutdown: CancellationToken) -> Self {
        Self { cp, shutdown }
    }

    /// One `ChooseEndpoint` (parse, choose, convert): the unary call and a
    /// `Route` stream's `choose` both run exactly this. Answered at once,
    /// or held while every endpoint is full ([`ControlPlane::choose_or_hold`]):
    /// then [`RoutingService::choose_after_hold`] finishes it.
    pub fn choose_step(&self, request: v1::ChooseRequest) -> Result<ChooseStep, Status> {
        let call = ChooseCall::try_from(request).map_err(invalid)?;
        let since = Instant::now();
        match self
            .cp
            .choose_or_hold(&call.request, call.reserve, since)
            .map_err(GrpcError::from)?
        {
            Held::Chosen(choice) => Ok(ChooseStep::Answered((&choice).into())),
            Held::Full => Ok(ChooseStep::Held(HeldChoose { call, since })),
        }
    }

    /// The rest of a held choose: waits for a slot, at most
    /// `saturated_hold` from when it was first asked.
    pub async fn choose_after_hold(&self, held: HeldChoose) -> Result<v1::ChooseResponse, Status> {
        let HeldChoose { call, since } = held;
        let choice = self
            .cp
            .wait_for_slot(&call.request, call.reserve, since)
            .await
            .map_err(GrpcError::from)?;
        Ok((&choice).into())
    }

    /// Releases a lease that was granted for a caller no longer there (its
    /// `Route` stream ended while the choose was held).
    pub fn release_unused(&self, lease: u64) {
        if lease != 0 {
            self.cp.release(
                crate::ids::LeaseId(lease),
                crate::outcome::Outcome::Cancelled,
                crate::outcome::TokenCounts::default(),
                Instant::now(),
            );
        }
    }

    /// One `Release`, start to end: the unary call and a `Route` stream's
    /// `release` both run exactly this.
    pub fn release_now(&self, request: v1::ReleaseRequest) -> Result<v1::ReleaseResponse, Status> {
        let call = ReleaseCall::try_from(request).map_err(invalid)?;
        let released = self
            .cp
            .release(call.lease, call.outcome, call.tokens, Instant::now());
        Ok(v1::ReleaseResponse { released })
    }
}

/// Stream type of `WatchUsage`.
pub type WatchUsageStream = Pin<Box<dyn Stream<Item = Result<v1::ClusterState, Status>> + Send>>;

#[tonic::async_trait]
impl Routing for RoutingService {
    async fn open_session(
        &self,
        request: Request<v1::OpenSessionRequest>,
    ) -> Result<Response<v1::OpenSessionResponse>, Status> {
        let v1::OpenSessionRequest { name, open_token } = request.into_inner();
        let token = (open_token != 0).then_some(open_token);
        let (grant, new) = self.cp.open_session_once(&name, token, Instant::now());
        if new {
            tracing::info!(session = %grant.id, %name, "session opened");
        } else {
            tracing::info!(session = %grant.id, %name, "session open retried; granted the same session again");
        }
        Ok(Response::new((&grant).into()))
    }

    async fn keep_alive(
        &self,
        request: Request<v1::KeepAliveRequest>,
    ) -> Result<Response<v1::KeepAliveResponse>, Status> {
        let id = session_id_from_proto(request.into_inner().session_id).map_err(invalid)?;
        let known = self.cp.keep_alive(id, Instant::now());
        Ok(Response::new(v1::KeepAliveResponse { known }))
    }

    async fn close_session(
        &self,
        request: Request<v1::CloseSessionRequest>,
    ) -> Result<Response<v1::CloseSessionResponse>, Status> {
        let id = session_id_from_proto(request.into_inner().session_id).map_err(invalid)?;
        let released = self.cp.close_session(id);
        tracing::info!(session = %id, released, "session closed");
        Ok(Response::new(v1::CloseSessionResponse {
            released_leases: released as u64,
        }))
    }

    async fn register_leases(
        &self,
        request: Request<v1::RegisterLeasesRequest>,
    ) -> Result<Response<v1::RegisterLeasesResponse>, Status> {
        let m = request.into_inner();
        let id = session_id_from_proto(m.session_id).map_err(invalid)?;
        let leases = lease_records_from_proto(m.leases).map_err(invalid)?;
        let affinity = affinity_records_from_proto(m.affinity).map_err(invalid)?;
        let now = Instant::now();
        let mut out = self
            .cp
            .register_leases(id, &leases, now)
            .map_err(GrpcError::from)?;
        out.affinity_restored = self.cp.restore_affinity(&affinity, now);
        if !affinity.is_empty() {
            tracing::info!(
                session = %id,
                offered = affinity.len(),
                restored = out.affinity_restored,
                "affinity entries restored from a sidecar"
            );
        }
        Ok(Response::new((&out).into()))
    }

    async fn choose_endpoint(
        &self,
        request: Request<v1::ChooseRequest>,
    ) -> Result<Response<v1::ChooseResponse>, Status> {
        match self.choose_step(request.into_inner())? {
            ChooseStep::Answered(answer) => Ok(Response::new(answer)),
            ChooseStep::Held(held) => self.choose_after_hold(held).await.map(Response::new),
        }
    }

    async fn release(
        &self,
        request: Request<v1::ReleaseRequest>,
    ) -> Result<Response<v1::ReleaseResponse>, Status> {
        self.release_now(request.into_inner()).map(Response::new)
    }

    type RouteStream = RouteResponseStream;

    async fn route(
        &self,
        request: Request<tonic::Streaming<v1::RouteRequest>>,
    ) -> Result<Response<Self::RouteStream>, Status> {
        let stream = RouteStream::new(self.clone(), request.into_inner(), &self.shutdown);
        Ok(Response::new(Box::pin(stream)))
    }

    type WatchUsageStream = WatchUsageStream;

    async fn watch_usage(
        &self,
        _request: Request<v1::WatchUsageRequest>,
    ) -> Result<Response<Self::WatchUsageStream>, Status> {
        let mut rx = self.cp.subscribe();
        // Everything published so far is covered by the fresh state below.
        rx.mark_unchanged();
        let first = self.cp.state();
        let watcher = Watcher {
            first: Some(first),
            sent: None,
            rx,
            shutdown: self.shutdown.clone(),
        };
        let stream = futures::stream::unfold(watcher, |mut w| async move {
            let state = w.next().await?;
            Some((Ok(v1::ClusterState::from(&*state)), w))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// One `WatchUsage` subscriber: the fresh state first, then publications,
/// never going back in version (a publication racing with the first fresh
/// state may be older than it).
struct Watcher {
    first: Option<Arc<ClusterState>>,
    sent: Option<u64>,
    rx: watch::Receiver<Arc<ClusterState>>,
    shutdown: CancellationToken,
}

impl Watcher {
    /// The next state to send; `None` ends the stream (server shutdown, or
    /// the control plane is gone).
    async fn next(&mut self) -> Option<Arc<ClusterState>> {
        if let Some(state) = self.first.take() {
            self.sent = Some(state.version);
            return Some(state);
        }
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return None,
                changed = self.rx.changed() => changed.ok()?,
            }
            let state = self.rx.borrow_and_update().clone();
            if self.sent.is_none_or(|v| state.version > v) {
                self.sent = Some(state.version);
                return Some(state);
            }
        }
    }
}

/// The `Cluster` service (inspection and administration).
#[derive(Clone, Debug)]
pub struct ClusterService {
    cp: ControlPlane,
}

impl ClusterService {
    /// A service over `cp`.
    pub fn new(cp: ControlPlane) -> Self {
        Self { cp }
    }

    fn set_draining(
        &self,
        request: Request<v1::DrainRequest>,
        draining: bool,
    ) -> Result<v1::DrainResponse, Status> {
        let url = request.into_inner().endpoint;
        if url.is_empty() {
            return Err(invalid(ConvertError::new("endpoint", "must not be empty")));
        }
        let state = self
            .cp
            .set_draining(&url, draining)
            .map_err(GrpcError::from)?;
        tracing::info!(endpoint = %without_credentials(&state.url), draining, "endpoint admin state changed");
        Ok(v1::DrainResponse {
            endpoint: Some((&state).into()),
        })
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn get_state(
        &self,
        _request: Request<v1::GetStateRequest>,
    ) -> Result<Response<v1::ClusterState>, Status> {
        Ok(Response::new((&*self.cp.state()).into()))
    }

    async fn list_sessions(
        &self,
        _request: Request<v1::ListSessionsRequest>,
    ) -> Result<Response<v1::ListSessionsResponse>, Status> {
        let sessions = self.cp.sessions(Instant::now());
        Ok(Response::new(v1::ListSessionsResponse {
            sessions: sessions.iter().map(v1::SessionInfo::from).collect(),
        }))
    }

    async fn list_affinity(
        &self,
        request: Request<v1::ListAffinityRequest>,
    ) -> Result<Response<v1::ListAffinityResponse>, Status> {
        let limit = match request.into_inner().limit {
            0 => DEFAULT_AFFINITY_SAMPLE,
            n => n as usize,
        };
        let (total, entries) = self.cp.affinity_sample(limit, Instant::now());
        Ok(Response::new(affinity_listing_to_proto(total, &entries)))
    }

    async fn list_model_items(
        &self,
        _request: Request<v1::ListModelItemsRequest>,
    ) -> Result<Response<v1::ListModelItemsResponse>, Status> {
        let items = self.cp.model_items();
        let endpoints = self
            .cp
            .config()
            .endpoints
            .iter()
            .zip(items)
            .map(|(endpoint, items)| v1::EndpointModelItems {
                url: endpoint.url.to_string(),
                tags: items.tags.iter().map(|t| t.to_string()).collect(),
                ps: items.ps.iter().map(|t| t.to_string()).collect(),
                models: items.models.iter().map(|t| t.to_string()).collect(),
            })
            .collect();
        Ok(Response::new(v1::ListModelItemsResponse { endpoints }))
    }

    async fn reprobe(
        &self,
        request: Request<v1::ReprobeRequest>,
    ) -> Result<Response<v1::ReprobeResponse>, Status> {
        let endpoints = request.into_inner().endpoints;
        let urls: Vec<&str> = endpoints.iter().map(String::as_str).collect();
        match self.cp.reprobe(&urls).await {
            Ok(version) => Ok(Response::new(v1::ReprobeResponse { version })),
            Err(ReprobeError::UnknownEndpoint(e)) => Err(GrpcError::from(e).into()),
            Err(e @ ReprobeError::TimedOut(_)) => Err(Status::deadline_exceeded(e.to_string())),
        }
    }

    async fn drain(
        &self,
        request: Request<v1::DrainRequest>,
    ) -> Result<Response<v1::DrainResponse>, Status> {
        self.set_draining(request, true).map(Response::new)
    }

    async fn undrain(
        &self,
        request: Request<v1::DrainRequest>,
    ) -> Result<Response<v1::DrainResponse>, Status> {
        self.set_draining(request, false).map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use tonic::Code;

    #[test]
    fn every_error_maps_to_its_code() {
        let cases: Vec<(GrpcError, Code, &str)> = vec![
            (
                ConvertError::new("model", "must not be empty").into(),
                Code::InvalidArgument,
                "model: must not be empty",
            ),
            (
                ChooseError::ModelNotFound {
                    model: "x".into(),
                    available: vec!["a:latest".into(), "b:7b".into()],
                }
                .into(),
                Code::NotFound,
                "available models: a:latest, b:7b",
            ),
            (
                ChooseError::NoEndpointAvailable {
                    model: "x".into(),
                    detail: "all draining".into(),
                }
                .into(),
                Code::Unavailable,
                "all draining",
            ),
            (
                ChooseError::UnknownSession(7).into(),
                Code::FailedPrecondition,
                "unknown session 7",
            ),
            (
                UnknownEndpoint {
                    url: "http://nope:1".into(),
                    why: None,
                    configured: vec!["http://a:11434".into(), "http://b:11434".into()],
                }
                .into(),
                Code::NotFound,
                "configured endpoints: http://a:11434, http://b:11434",
            ),
        ];
        for (err, code, needle) in cases {
            let status = status_from_error(err);
            assert_eq!(status.code(), code, "{status:?}");
            assert!(status.message().contains(needle), "{status:?}");
        }
    }
}
