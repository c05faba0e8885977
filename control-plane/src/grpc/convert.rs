//! Conversions between the generated `switchyard.v1` types and the domain
//! types, in both directions. This is the boundary where wire messages (every
//! field optional, enums as raw `i32`) become validated domain values: past
//! these functions nothing sees a prost type.
//!
//! Invariants:
//! - every fallible conversion fails with a [`ConvertError`] that names the
//!   field by its path in the message (`endpoints[2].kind`, `leases[0].lease_id`);
//! - an `UNSPECIFIED` or unknown enum value is an error, never a default;
//! - domain → proto is total (counts that do not fit a `u32` saturate).
//!
//! Used by the gRPC services here, the sidecar's remote control-plane client
//! and the CLI.

use std::{sync::Arc, time::Duration};

use switchyard_proto::v1;

use crate::{
    api::{
        AffinityEntryInfo, AffinityRecord, LeaseRecord, RegisterOutcome, SessionGrant, SessionInfo,
    },
    cluster::{ClusterState, EndpointState, ModelUsage},
    decision::{Choice, ChooseError, ChooseRequest, DecisionReason},
    endpoint::EndpointKind,
    ids::{LeaseId, SessionId},
    outcome::{Outcome, RequestKind, TokenCounts},
};

/// A wire message that does not make a valid domain value. Names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ConvertError {
    /// Path of the field in the message, e.g. `endpoints[1].kind`.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

impl ConvertError {
    /// An error for `field`.
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// Prefixes the field path with the enclosing field (`parent.field`).
    #[must_use]
    pub fn within(mut self, parent: impl AsRef<str>) -> Self {
        self.field = format!("{}.{}", parent.as_ref(), self.field);
        self
    }
}

fn must_not_be_empty(field: &str, value: &str) -> Result<(), ConvertError> {
    if value.is_empty() {
        Err(ConvertError::new(field, "must not be empty"))
    } else {
        Ok(())
    }
}

fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn arcs(names: Vec<String>) -> Vec<Arc<str>> {
    names.into_iter().map(Arc::from).collect()
}

fn strings(names: &[Arc<str>]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

// ---------------------------------------------------------------- enums

/// Domain endpoint kind → proto enum value.
pub fn endpoint_kind_to_proto(kind: EndpointKind) -> i32 {
    let p = match kind {
        EndpointKind::Ollama => v1::EndpointKind::Ollama,
        EndpointKind::OpenAi => v1::EndpointKind::Openai,
        EndpointKind::LlamaServer => v1::EndpointKind::LlamaServer,
    };
    p as i32
}

/// Proto enum value → domain endpoint kind; `field` names it in errors.
pub fn endpoint_kind_from_proto(value: i32, field: &str) -> Result<EndpointKind, ConvertError> {
    match v1::EndpointKind::try_from(value) {
        Ok(v1::EndpointKind::Ollama) => Ok(EndpointKind::Ollama),
        Ok(v1::EndpointKind::Openai) => Ok(EndpointKind::OpenAi),
        Ok(v1::EndpointKind::LlamaServer) => Ok(EndpointKind::LlamaServer),
        Ok(v1::EndpointKind::Unspecified) => Err(ConvertError::new(field, "must be set")),
        Err(_) => Err(ConvertError::new(field, format!("unknown value {value}"))),
    }
}

/// Domain request kind → proto enum value.
pub fn request_kind_to_proto(kind: RequestKind) -> i32 {
    let p = match kind {
        RequestKind::Chat => v1::RequestKind::Chat,
        RequestKind::Generate => v1::RequestKind::Generate,
        RequestKind::Embed => v1::RequestKind::Embed,
        RequestKind::Show => v1::RequestKind::Show,
        RequestKind::Rerank => v1::RequestKind::Rerank,
        RequestKind::CountTokens => v1::RequestKind::CountTokens,
    };
    p as i32
}

/// Proto enum value → domain request kind (field `request_kind`).
pub fn request_kind_from_proto(value: i32) -> Result<RequestKind, ConvertError> {
    const FIELD: &str = "request_kind";
    match v1::RequestKind::try_from(value) {
        Ok(v1::RequestKind::Chat) => Ok(RequestKind::Chat),
        Ok(v1::RequestKind::Generate) => Ok(RequestKind::Generate),
        Ok(v1::RequestKind::Embed) => Ok(RequestKind::Embed),
        Ok(v1::RequestKind::Show) => Ok(RequestKind::Show),
        Ok(v1::RequestKind::Rerank) => Ok(RequestKind::Rerank),
        Ok(v1::RequestKind::CountTokens) => Ok(RequestKind::CountTokens),
        Ok(v1::RequestKind::Unspecified) => Err(ConvertError::new(
            FIELD,
            "must be set (chat, generate, embed, show or rerank)",
        )),
        Err(_) => Err(ConvertError::new(FIELD, format!("unknown value {value}"))),
    }
}

/// Domain decision reason → proto enum value.
pub fn decision_reason_to_proto(reason: DecisionReason) -> i32 {
    let p = match reason {
        DecisionReason::Affinity => v1::DecisionReason::Affinity,
        DecisionReason::LoadedFree => v1::DecisionReason::LoadedFree,
        DecisionReason::FreeSlot => v1::DecisionReason::FreeSlot,
        DecisionReason::Saturated => v1::DecisionReason::Saturated,
    };
    p as i32
}

/// Proto enum value → domain decision reason (field `reason`).
pub fn decision_reason_from_proto(value: i32) -> Result<DecisionReason, ConvertError> {
    const FIELD: &str = "reason";
    match v1::DecisionReason::try_from(value) {
        Ok(v1::DecisionReason::Affinity) => Ok(DecisionReason::Affinity),
        Ok(v1::DecisionReason::LoadedFree) => Ok(DecisionReason::LoadedFree),
        Ok(v1::DecisionReason::FreeSlot) => Ok(DecisionReason::FreeSlot),
        Ok(v1::DecisionReason::Saturated) => Ok(DecisionReason::Saturated),
        Ok(v1::DecisionReason::Unspecified) => Err(ConvertError::new(FIELD, "must be set")),
        Err(_) => Err(ConvertError::new(FIELD, format!("unknown value {value}"))),
    }
}

/// Domain outcome → proto enum value ([`Outcome::ModelMissing`] is a client
/// error on the wire, with `ReleaseRequest.model_missing` set).
pub fn outcome_to_proto(outcome: Outcome) -> i32 {
    let p = match outcome {
        Outcome::Ok => v1::Outcome::Ok,
        Outcome::ConnectError => v1::Outcome::ConnectError,
        Outcome::BackendError => v1::Outcome::BackendError,
        Outcome::Cancelled => v1::Outcome::Cancelled,
        Outcome::ConnectTimeout => v1::Outcome::ConnectTimeout,
        Outcome::FirstByteTimeout => v1::Outcome::FirstByteTimeout,
        Outcome::IdleTimeout => v1::Outcome::IdleTimeout,
        Outcome::ClientError | Outcome::ModelMissing => v1::Outcome::ClientError,
    };
    p as i32
}

/// Proto enum value → domain outcome (field `outcome`).
pub fn outcome_from_proto(value: i32) -> Result<Outcome, ConvertError> {
    const FIELD: &str = "outcome";
    match v1::Outcome::try_from(value) {
        Ok(v1::Outcome::Ok) => Ok(Outcome::Ok),
        Ok(v1::Outcome::ConnectError) => Ok(Outcome::ConnectError),
        Ok(v1::Outcome::BackendError) => Ok(Outcome::BackendError),
        Ok(v1::Outcome::Cancelled) => Ok(Outcome::Cancelled),
        Ok(v1::Outcome::ConnectTimeout) => Ok(Outcome::ConnectTimeout),
        Ok(v1::Outcome::FirstByteTimeout) => Ok(Outcome::FirstByteTimeout),
        Ok(v1::Outcome::IdleTimeout) => Ok(Outcome::IdleTimeout),
        Ok(v1::Outcome::ClientError) => Ok(Outcome::ClientError),
        Ok(v1::Outcome::Unspecified) => Err(ConvertError::new(FIELD, "must be set")),
        Err(_) => Err(ConvertError::new(FIELD, format!("unknown value {value}"))),
    }
}

/// The outcome a release reports: its `outcome`, refined by
/// `model_missing`.
pub fn release_outcome_from_proto(m: &v1::ReleaseRequest) -> Result<Outcome, ConvertError> {
    match outcome_from_proto(m.outcome)? {
        Outcome::ClientError if m.model_missing => Ok(Outcome::ModelMissing),
        outcome => Ok(outcome),
    }
}

// ---------------------------------------------------------------- ids

/// A session id from the wire; 0 is never a valid session.
pub fn session_id_from_proto(value: u64) -> Result<SessionId, ConvertError> {
    if value == 0 {
        Err(ConvertError::new("session_id", "must be set (non-zero)"))
    } else {
        Ok(SessionId(value))
    }
}

/// A lease id from the wire; 0 is never a valid lease.
pub fn lease_id_from_proto(value: u64) -> Result<LeaseId, ConvertError> {
    if value == 0 {
        Err(ConvertError::new("lease_id", "must be set (non-zero)"))
    } else {
        Ok(LeaseId(value))
    }
}

// ---------------------------------------------------------------- choose

/// A validated `ChooseEndpoint` call.
#[derive(Clone, Debug)]
pub struct ChooseCall {
    /// What to choose for.
    pub request: ChooseRequest,
    /// The session that takes the lease; `None` is a dry run.
    pub reserve: Option<SessionId>,
}

impl TryFrom<v1::ChooseRequest> for ChooseCall {
    type Error = ConvertError;

    fn try_from(m: v1::ChooseRequest) -> Result<Self, Self::Error> {
        must_not_be_empty("model", &m.model)?;
        let kind = request_kind_from_proto(m.request_kind)?;
        let reserve = if m.reserve {
            Some(session_id_from_proto(m.session_id).map_err(|e| {
                ConvertError::new(e.field, "must be set (non-zero) when `reserve` is true")
            })?)
        } else {
            None
        };
        for (i, url) in m.exclude_endpoints.iter().enumerate() {
            must_not_be_empty(&format!("exclude_endpoints[{i}]"), url)?;
        }
        Ok(Self {
            request: ChooseRequest {
                model: m.model,
                affinity_required: m.affinity_required && !m.affinity_key.is_empty(),
                affinity_key: (!m.affinity_key.is_empty()).then_some(m.affinity_key),
                kind,
                exclude: m.exclude_endpoints,
            },
            reserve,
        })
    }
}

/// Builds the wire request for a choice (the sidecar's remote client and the
/// CLI use this, so the rules stay in one place).
pub fn choose_request_to_proto(
    req: &ChooseRequest,
    reserve: Option<SessionId>,
) -> v1::ChooseRequest {
    v1::ChooseRequest {
        model: req.model.clone(),
        affinity_key: req.affinity_key.clone().unwrap_or_default(),
        affinity_required: req.affinity_required,
        reserve: reserve.is_some(),
        session_id: reserve.map_or(0, |s| s.0),
        request_kind: request_kind_to_proto(req.kind),
        exclude_endpoints: req.exclude.clone(),
    }
}

impl From<&Choice> for v1::ChooseResponse {
    fn from(c: &Choice) -> Self {
        Self {
            endpoint: c.endpoint.to_string(),
            endpoint_kind: endpoint_kind_to_proto(c.endpoint_kind),
            tracking_model: c.tracking_model.to_string(),
            backend_model: c.backend_model.to_string(),
            lease_id: c.lease.map_or(0, |l| l.0),
            reason: decision_reason_to_proto(c.reason),
            at_limit: c.at_limit,
        }
    }
}

impl TryFrom<v1::ChooseResponse> for Choice {
    type Error = ConvertError;

    fn try_from(m: v1::ChooseResponse) -> Result<Self, Self::Error> {
        must_not_be_empty("endpoint", &m.endpoint)?;
        must_not_be_empty("tracking_model", &m.tracking_model)?;
        must_not_be_empty("backend_model", &m.backend_model)?;
        Ok(Self {
            endpoint: Arc::from(m.endpoint),
            endpoint_kind: endpoint_kind_from_proto(m.endpoint_kind, "endpoint_kind")?,
            tracking_model: Arc::from(m.tracking_model),
            backend_model: Arc::from(m.backend_model),
            reason: decision_reason_from_proto(m.reason)?,
            lease: (m.lease_id != 0).then_some(LeaseId(m.lease_id)),
            at_limit: m.at_limit,
        })
    }
}

// ---------------------------------------------------------------- release

/// A validated `Release` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReleaseCall {
    /// The lease to end.
    pub lease: LeaseId,
    /// How the request ended.
    pub outcome: Outcome,
    /// Tokens the request used.
    pub tokens: TokenCounts,
}

impl TryFrom<v1::ReleaseRequest> for ReleaseCall {
    type Error = ConvertError;

    fn try_from(m: v1::ReleaseRequest) -> Result<Self, Self::Error> {
        Ok(Self {
            lease: lease_id_from_proto(m.lease_id)?,
            outcome: release_outcome_from_proto(&m)?,
            tokens: TokenCounts {
                prompt: m.prompt_tokens,
                completion: m.completion_tokens,
            },
        })
    }
}

impl From<&ReleaseCall> for v1::ReleaseRequest {
    fn from(r: &ReleaseCall) -> Self {
        Self {
            lease_id: r.lease.0,
            outcome: outcome_to_proto(r.outcome),
            prompt_tokens: r.tokens.prompt,
            completion_tokens: r.tokens.completion,
            model_missing: r.outcome == Outcome::ModelMissing,
        }
    }
}

// ---------------------------------------------------------------- sessions

impl From<&SessionGrant> for v1::OpenSessionResponse {
    fn from(g: &SessionGrant) -> Self {
        Self {
            session_id: g.id.0,
            ttl_ms: millis(g.ttl),
            keepalive_interval_ms: millis(g.keepalive_interval),
        }
    }
}

impl TryFrom<v1::OpenSessionResponse> for SessionGrant {
    type Error = ConvertError;

    fn try_from(m: v1::OpenSessionResponse) -> Result<Self, Self::Error> {
        let id = session_id_from_proto(m.session_id)?;
        if m.ttl_ms == 0 {
            return Err(ConvertError::new("ttl_ms", "must be greater than zero"));
        }
        if m.keepalive_interval_ms == 0 {
            return Err(ConvertError::new(
                "keepalive_interval_ms",
                "must be greater than zero",
            ));
        }
        Ok(Self {
            id,
            ttl: Duration::from_millis(m.ttl_ms),
            keepalive_interval: Duration::from_millis(m.keepalive_interval_ms),
        })
    }
}

impl From<&LeaseRecord> for v1::LeaseRecord {
    fn from(l: &LeaseRecord) -> Self {
        Self {
            lease_id: l.lease.0,
            endpoint: l.endpoint.to_string(),
            tracking_model: l.tracking_model.to_string(),
        }
    }
}

impl TryFrom<v1::LeaseRecord> for LeaseRecord {
    type Error = ConvertError;

    fn try_from(m: v1::LeaseRecord) -> Result<Self, Self::Error> {
        let lease = lease_id_from_proto(m.lease_id)?;
        must_not_be_empty("endpoint", &m.endpoint)?;
        must_not_be_empty("tracking_model", &m.tracking_model)?;
        Ok(Self {
            lease,
            endpoint: Arc::from(m.endpoint),
            tracking_model: Arc::from(m.tracking_model),
        })
    }
}

/// Converts the `leases` of a `RegisterLeases` call, naming `leases[i].field`.
pub fn lease_records_from_proto(
    leases: Vec<v1::LeaseRecord>,
) -> Result<Vec<LeaseRecord>, ConvertError> {
    leases
        .into_iter()
        .enumerate()
        .map(|(i, l)| LeaseRecord::try_from(l).map_err(|e| e.within(format!("leases[{i}]"))))
        .collect()
}

impl From<&AffinityRecord> for v1::AffinityRecord {
    fn from(a: &AffinityRecord) -> Self {
        Self {
            key: a.key.to_string(),
            endpoint: a.endpoint.to_string(),
            tracking_model: a.tracking_model.to_string(),
            expires_in_ms: millis(a.expires_in),
        }
    }
}

impl TryFrom<v1::AffinityRecord> for AffinityRecord {
    type Error = ConvertError;

    fn try_from(m: v1::AffinityRecord) -> Result<Self, Self::Error> {
        must_not_be_empty("key", &m.key)?;
        must_not_be_empty("endpoint", &m.endpoint)?;
        must_not_be_empty("tracking_model", &m.tracking_model)?;
        Ok(Self {
            key: Arc::from(m.key),
            endpoint: Arc::from(m.endpoint),
            tracking_model: Arc::from(m.tracking_model),
            expires_in: Duration::from_millis(m.expires_in_ms),
        })
    }
}

/// Converts the `affinity` of a `RegisterLeases` call, naming
/// `affinity[i].field`.
pub fn affinity_records_from_proto(
    records: Vec<v1::AffinityRecord>,
) -> Result<Vec<AffinityRecord>, ConvertError> {
    records
        .into_iter()
        .enumerate()
        .map(|(i, a)| AffinityRecord::try_from(a).map_err(|e| e.within(format!("affinity[{i}]"))))
        .collect()
}

impl From<&RegisterOutcome> for v1::RegisterLeasesResponse {
    fn from(r: &RegisterOutcome) -> Self {
        Self {
            registered: r.registered as u64,
            rejected: r.rejected as u64,
            affinity_restored: r.affinity_restored as u64,
        }
    }
}

impl From<v1::RegisterLeasesResponse> for RegisterOutcome {
    fn from(m: v1::RegisterLeasesResponse) -> Self {
        Self {
            registered: usize::try_from(m.registered).unwrap_or(usize::MAX),
            rejected: usize::try_from(m.rejected).unwrap_or(usize::MAX),
            affinity_restored: usize::try_from(m.affinity_restored).unwrap_or(usize::MAX),
        }
    }
}

impl From<&SessionInfo> for v1::SessionInfo {
    fn from(s: &SessionInfo) -> Self {
        Self {
            session_id: s.id.0,
            name: s.name.clone(),
            leases: s.leases,
            last_keepalive_ms_ago: millis(s.since_keepalive),
            expires_in_ms: millis(s.expires_in),
        }
    }
}

impl TryFrom<v1::SessionInfo> for SessionInfo {
    type Error = ConvertError;

    fn try_from(m: v1::SessionInfo) -> Result<Self, Self::Error> {
        Ok(Self {
            id: session_id_from_proto(m.session_id)?,
            name: m.name,
            leases: m.leases,
            since_keepalive: Duration::from_millis(m.last_keepalive_ms_ago),
            expires_in: Duration::from_millis(m.expires_in_ms),
        })
    }
}

impl From<&AffinityEntryInfo> for v1::AffinityEntry {
    fn from(a: &AffinityEntryInfo) -> Self {
        Self {
            key: a.key.clone(),
            endpoint: a.endpoint.to_string(),
            model: a.model.to_string(),
            expires_in_ms: millis(a.expires_in),
        }
    }
}

impl TryFrom<v1::AffinityEntry> for AffinityEntryInfo {
    type Error = ConvertError;

    fn try_from(m: v1::AffinityEntry) -> Result<Self, Self::Error> {
        must_not_be_empty("key", &m.key)?;
        must_not_be_empty("endpoint", &m.endpoint)?;
        must_not_be_empty("model", &m.model)?;
        Ok(Self {
            key: m.key,
            endpoint: Arc::from(m.endpoint),
            model: Arc::from(m.model),
            expires_in: Duration::from_millis(m.expires_in_ms),
        })
    }
}

/// A `ListAffinity` answer: total entries and a sample.
pub fn affinity_listing_to_proto(
    total: usize,
    entries: &[AffinityEntryInfo],
) -> v1::ListAffinityResponse {
    v1::ListAffinityResponse {
        total: saturating_u32(total),
        entries: entries.iter().map(v1::AffinityEntry::from).collect(),
    }
}

// ---------------------------------------------------------------- cluster state

impl From<&ModelUsage> for v1::ModelUsage {
    fn from(u: &ModelUsage) -> Self {
        Self {
            model: u.model.to_string(),
            in_flight: u.in_flight,
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            requests: u.requests,
        }
    }
}

impl TryFrom<v1::ModelUsage> for ModelUsage {
    type Error = ConvertError;

    fn try_from(m: v1::ModelUsage) -> Result<Self, Self::Error> {
        must_not_be_empty("model", &m.model)?;
        Ok(Self {
            model: Arc::from(m.model),
            in_flight: m.in_flight,
            prompt_tokens: m.prompt_tokens,
            completion_tokens: m.completion_tokens,
            requests: m.requests,
        })
    }
}

impl From<&EndpointState> for v1::EndpointState {
    fn from(e: &EndpointState) -> Self {
        Self {
            url: e.url.to_string(),
            kind: endpoint_kind_to_proto(e.kind),
            priority: e.priority,
            max_concurrent: e.max_concurrent,
            healthy: e.healthy,
            health_detail: e.health_detail.clone(),
            draining: e.draining,
            advertised_models: strings(&e.advertised_models),
            loaded_models: strings(&e.loaded_models),
            usage: e.usage.iter().map(v1::ModelUsage::from).collect(),
            in_flight: e.in_flight,
            failing_models: strings(&e.failing_models),
            missing_models: strings(&e.missing_models),
            circuit_open: e.circuit_open,
            circuit_half_open: e.circuit_half_open,
            last_probe_ok_unix_ms: e.last_probe_ok_unix_ms,
            version: e.version.clone(),
        }
    }
}

impl TryFrom<v1::EndpointState> for EndpointState {
    type Error = ConvertError;

    fn try_from(m: v1::EndpointState) -> Result<Self, Self::Error> {
        must_not_be_empty("url", &m.url)?;
        if m.max_concurrent == 0 {
            return Err(ConvertError::new("max_concurrent", "must be at least 1"));
        }
        let kind = endpoint_kind_from_proto(m.kind, "kind")?;
        let usage = m
            .usage
            .into_iter()
            .enumerate()
            .map(|(i, u)| ModelUsage::try_from(u).map_err(|e| e.within(format!("usage[{i}]"))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            url: Arc::from(m.url),
            kind,
            priority: m.priority,
            max_concurrent: m.max_concurrent,
            healthy: m.healthy,
            health_detail: m.health_detail,
            draining: m.draining,
            advertised_models: arcs(m.advertised_models),
            loaded_models: arcs(m.loaded_models),
            usage,
            in_flight: m.in_flight,
            failing_models: arcs(m.failing_models),
            missing_models: arcs(m.missing_models),
            circuit_open: m.circuit_open,
            circuit_half_open: m.circuit_half_open,
            last_probe_ok_unix_ms: m.last_probe_ok_unix_ms,
            version: m.version,
        })
    }
}

impl From<&ClusterState> for v1::ClusterState {
    fn from(s: &ClusterState) -> Self {
        Self {
            version: s.version,
            endpoints: s.endpoints.iter().map(v1::EndpointState::from).collect(),
            sessions: s.sessions,
            leases: s.leases,
            affinity_entries: s.affinity_entries,
            priority_routing: s.priority_routing,
            conversation_affinity: s.conversation_affinity,
        }
    }
}

impl TryFrom<v1::ClusterState> for ClusterState {
    type Error = ConvertError;

    fn try_from(m: v1::ClusterState) -> Result<Self, Self::Error> {
        let endpoints = m
            .endpoints
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                EndpointState::try_from(e).map_err(|err| err.within(format!("endpoints[{i}]")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            version: m.version,
            endpoints,
            sessions: m.sessions,
            leases: m.leases,
            affinity_entries: m.affinity_entries,
            priority_routing: m.priority_routing,
            conversation_affinity: m.conversation_affinity,
        })
    }
}

// ---------------------------------------------------------------- errors

/// Recovers a [`ChooseError`] from the status a `ChooseEndpoint` call failed
/// with, for the sidecar's remote client. `model` is the model it asked for.
/// Returns `None` for statuses that are not a routing answer (transport
/// errors, deadlines, invalid arguments): those mean the control plane could
/// not decide, not that it decided "no".
pub fn choose_error_from_status(status: &tonic::Status, model: &str) -> Option<ChooseError> {
    let message = status.message();
    match status.code() {
        tonic::Code::NotFound => {
            let available = message
                .split_once(AVAILABLE_MODELS)
                .map(|(_, list)| {
                    list.split(", ")
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            Some(ChooseError::ModelNotFound {
                model: model.to_owned(),
                available,
            })
        }
        tonic::Code::Unavailable if message.starts_with(NO_ENDPOINT_PREFIX) => {
            Some(ChooseError::NoEndpointAvailable {
                model: model.to_owned(),
                detail: message
                    .split_once(": ")
                    .map_or_else(|| message.to_owned(), |(_, d)| d.to_owned()),
            })
        }
        tonic::Code::FailedPrecondition => message
            .strip_prefix(UNKNOWN_SESSION_PREFIX)
            .and_then(|n| n.trim().parse().ok())
            .map(ChooseError::UnknownSession),
        _ => None,
    }
}

/// Marker in the `ModelNotFound` message before the list of models (kept in
/// sync with `ChooseError`'s `Display`, checked by a test).
const AVAILABLE_MODELS: &str = "available models: ";
/// Start of the `NoEndpointAvailable` message.
const NO_ENDPOINT_PREFIX: &str = "no endpoint available";
/// Start of the `UnknownSession` message.
const UNKNOWN_SESSION_PREFIX: &str = "unknown session ";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn endpoint(url: &str, kind: EndpointKind) -> EndpointState {
        EndpointState {
            url: Arc::from(url),
            kind,
            priority: 1,
            max_concurrent: 4,
            healthy: false,
            health_detail: "GET /api/tags: connection refused".to_owned(),
            draining: true,
            advertised_models: vec![Arc::from("a:latest"), Arc::from("b:7b")],
            loaded_models: vec![Arc::from("a:latest")],
            usage: vec![ModelUsage {
                model: Arc::from("a:latest"),
                in_flight: 2,
                prompt_tokens: 10,
                completion_tokens: 20,
                requests: 3,
            }],
            in_flight: 2,
            failing_models: vec![Arc::from("b:7b"), Arc::from("c:1b")],
            missing_models: vec![Arc::from("c:1b")],
            circuit_open: true,
            circuit_half_open: true,
            last_probe_ok_unix_ms: 1_700_000_000_000,
            version: "0.5.7".to_owned(),
        }
    }

    fn cluster() -> ClusterState {
        ClusterState {
            version: 42,
            endpoints: vec![
                endpoint("http://a:11434", EndpointKind::Ollama),
                endpoint("https://x/v1", EndpointKind::OpenAi),
                endpoint("http://l:8080/v1", EndpointKind::LlamaServer),
            ],
            sessions: 2,
            leases: 5,
            affinity_entries: 7,
            priority_routing: true,
            conversation_affinity: true,
        }
    }

    #[test]
    fn cluster_state_round_trips() {
        let s = cluster();
        let back = ClusterState::try_from(v1::ClusterState::from(&s)).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn cluster_state_errors_name_the_nested_field() {
        let mut m = v1::ClusterState::from(&cluster());
        m.endpoints[1].kind = 99;
        let err = ClusterState::try_from(m).unwrap_err();
        assert_eq!(err.field, "endpoints[1].kind");
        assert!(err.to_string().contains("99"), "{err}");

        let mut m = v1::ClusterState::from(&cluster());
        m.endpoints[2].usage[0].model.clear();
        let err = ClusterState::try_from(m).unwrap_err();
        assert_eq!(
            err.to_string(),
            "endpoints[2].usage[0].model: must not be empty"
        );

        let mut m = v1::ClusterState::from(&cluster());
        m.endpoints[0].kind = v1::EndpointKind::Unspecified as i32;
        assert_eq!(
            ClusterState::try_from(m).unwrap_err().field,
            "endpoints[0].kind"
        );
    }

    #[test]
    fn enums_round_trip_and_reject_unspecified() {
        for k in EndpointKind::ALL {
            assert_eq!(
                endpoint_kind_from_proto(endpoint_kind_to_proto(k), "kind"),
                Ok(k)
            );
        }
        for o in Outcome::ALL {
            let call = ReleaseCall {
                lease: LeaseId(1),
                outcome: o,
                tokens: TokenCounts::default(),
            };
            let wire = v1::ReleaseRequest::from(&call);
            assert_eq!(ReleaseCall::try_from(wire), Ok(call));
            // A control plane that predates `model_missing` reads the
            // outcome alone: a client error.
            let old = outcome_from_proto(wire.outcome).unwrap();
            let expected = if o == Outcome::ModelMissing {
                Outcome::ClientError
            } else {
                o
            };
            assert_eq!(old, expected);
        }
        for r in DecisionReason::ALL {
            assert_eq!(
                decision_reason_from_proto(decision_reason_to_proto(r)),
                Ok(r)
            );
        }
        for k in [
            RequestKind::Chat,
            RequestKind::Generate,
            RequestKind::Embed,
            RequestKind::Show,
            RequestKind::Rerank,
            RequestKind::CountTokens,
        ] {
            assert_eq!(request_kind_from_proto(request_kind_to_proto(k)), Ok(k));
        }
        assert_eq!(outcome_from_proto(0).unwrap_err().field, "outcome");
        assert_eq!(
            outcome_from_proto(77).unwrap_err().to_string(),
            "outcome: unknown value 77"
        );
        assert_eq!(
            request_kind_from_proto(0).unwrap_err().field,
            "request_kind"
        );
        assert_eq!(decision_reason_from_proto(9).unwrap_err().field, "reason");
    }

    #[test]
    fn choose_request_round_trips_and_validates() {
        let req = ChooseRequest {
            model: "qwen3:8b".to_owned(),
            affinity_key: Some("k".to_owned()),
            affinity_required: true,
            kind: RequestKind::Embed,
            exclude: vec!["http://a:11434".to_owned()],
        };
        let m = choose_request_to_proto(&req, Some(SessionId(9)));
        let call = ChooseCall::try_from(m.clone()).unwrap();
        assert_eq!(call.reserve, Some(SessionId(9)));
        assert_eq!(call.request.model, req.model);
        assert_eq!(call.request.affinity_key, req.affinity_key);
        assert!(call.request.affinity_required);
        // Required without a key means nothing.
        let mut keyless = m.clone();
        keyless.affinity_key.clear();
        assert!(
            !ChooseCall::try_from(keyless)
                .unwrap()
                .request
                .affinity_required
        );
        assert_eq!(call.request.kind, req.kind);
        assert_eq!(call.request.exclude, req.exclude);

        let dry = ChooseCall::try_from(choose_request_to_proto(&req, None)).unwrap();
        assert_eq!(dry.reserve, None);

        let mut bad = m.clone();
        bad.model.clear();
        assert_eq!(
            ChooseCall::try_from(bad).unwrap_err().to_string(),
            "model: must not be empty"
        );
        let mut bad = m.clone();
        bad.session_id = 0;
        assert_eq!(ChooseCall::try_from(bad).unwrap_err().field, "session_id");
        let mut bad = m.clone();
        bad.request_kind = 0;
        assert_eq!(ChooseCall::try_from(bad).unwrap_err().field, "request_kind");
        let mut bad = m;
        bad.exclude_endpoints.push(String::new());
        assert_eq!(
            ChooseCall::try_from(bad).unwrap_err().field,
            "exclude_endpoints[1]"
        );
    }

    #[test]
    fn choice_round_trips() {
        for (lease, at_limit) in [(Some(LeaseId(77)), true), (None, false)] {
            let c = Choice {
                endpoint: Arc::from("http://l:8080/v1"),
                endpoint_kind: EndpointKind::LlamaServer,
                tracking_model: Arc::from("gpt-oss-20b-GGUF"),
                backend_model: Arc::from("unsloth/gpt-oss-20b-GGUF:Q8_0"),
                reason: DecisionReason::FreeSlot,
                lease,
                at_limit,
            };
            assert_eq!(Choice::try_from(v1::ChooseResponse::from(&c)).unwrap(), c);
        }
        let err = Choice::try_from(v1::ChooseResponse::default()).unwrap_err();
        assert_eq!(err.field, "endpoint");
    }

    #[test]
    fn release_and_sessions_round_trip() {
        let r = ReleaseCall {
            lease: LeaseId(5),
            outcome: Outcome::IdleTimeout,
            tokens: TokenCounts {
                prompt: 3,
                completion: 4,
            },
        };
        assert_eq!(
            ReleaseCall::try_from(v1::ReleaseRequest::from(&r)).unwrap(),
            r
        );
        let mut m = v1::ReleaseRequest::from(&r);
        m.lease_id = 0;
        assert_eq!(ReleaseCall::try_from(m).unwrap_err().field, "lease_id");

        let g = SessionGrant {
            id: SessionId(3),
            ttl: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(2),
        };
        assert_eq!(
            SessionGrant::try_from(v1::OpenSessionResponse::from(&g)).unwrap(),
            g
        );

        let s = SessionInfo {
            id: SessionId(3),
            name: "pod-a".to_owned(),
            leases: 4,
            since_keepalive: Duration::from_millis(1500),
            expires_in: Duration::from_millis(8500),
        };
        assert_eq!(SessionInfo::try_from(v1::SessionInfo::from(&s)).unwrap(), s);

        let a = AffinityEntryInfo {
            key: "conv".to_owned(),
            endpoint: Arc::from("http://a:11434"),
            model: Arc::from("m:latest"),
            expires_in: Duration::from_secs(30),
        };
        assert_eq!(
            AffinityEntryInfo::try_from(v1::AffinityEntry::from(&a)).unwrap(),
            a
        );

        let leases = vec![
            LeaseRecord {
                lease: LeaseId(1),
                endpoint: Arc::from("http://a:11434"),
                tracking_model: Arc::from("m:latest"),
            },
            LeaseRecord {
                lease: LeaseId(2),
                endpoint: Arc::from("http://b:11434"),
                tracking_model: Arc::from("m:latest"),
            },
        ];
        let mut wire: Vec<v1::LeaseRecord> = leases.iter().map(v1::LeaseRecord::from).collect();
        assert_eq!(lease_records_from_proto(wire.clone()).unwrap(), leases);
        wire[1].endpoint.clear();
        assert_eq!(
            lease_records_from_proto(wire).unwrap_err().field,
            "leases[1].endpoint"
        );
    }

    #[test]
    fn choose_errors_survive_the_status_round_trip() {
        let nf = ChooseError::ModelNotFound {
            model: "nope".to_owned(),
            available: vec!["a:latest".to_owned(), "b:7b".to_owned()],
        };
        let status = super::super::status_from_error(nf.clone().into());
        assert_eq!(choose_error_from_status(&status, "nope"), Some(nf));

        let na = ChooseError::NoEndpointAvailable {
            model: "m".to_owned(),
            detail: "all excluded".to_owned(),
        };
        let status = super::super::status_from_error(na.clone().into());
        assert_eq!(choose_error_from_status(&status, "m"), Some(na));

        let us = ChooseError::UnknownSession(12);
        let status = super::super::status_from_error(us.clone().into());
        assert_eq!(choose_error_from_status(&status, "m"), Some(us));

        assert_eq!(
            choose_error_from_status(&tonic::Status::unavailable("connection refused"), "m"),
            None
        );
    }
}
