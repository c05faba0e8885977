//! What each command shows, as plain structs with stable, documented field
//! names: the `--output json` schema, and the input of the table renderer.
//!
//! Parse at the boundary: proto messages are converted here, once; enum
//! values the CLI does not know are an error naming the field, never a
//! default. Kinds and reasons are written with the control plane's canonical
//! names (`ollama`, `openai`, `llama_server`; `affinity`, `loaded_free`,
//! `free_slot`, `saturated`).
//!
//! JSON schema (field names are part of the CLI's interface):
//! - `endpoints`, each `watch` line: [`StateView`].
//! - `models`: [`ModelsView`]. `usage`: [`UsageView`].
//! - `sessions`: [`SessionsView`]. `affinity`: [`AffinityView`].
//! - `choose`: [`ChoiceView`]. `drain` / `undrain`: [`DrainView`].

use std::{borrow::Cow, collections::BTreeMap};

use serde::{Deserialize, Serialize};
use switchyard_control_plane::{
    decision::DecisionReason,
    endpoint::{EndpointKind, without_credentials},
    model_name::{canonical_request_name, tracking_name},
};
use switchyard_proto::v1;

use crate::error::CliError;

/// Usage of one model on one endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelUsageView {
    /// Tracking model name.
    pub model: String,
    /// Requests in flight now.
    pub in_flight: u32,
    /// Requests completed (released), cumulative.
    pub requests: u64,
    /// Prompt tokens, cumulative.
    pub prompt_tokens: u64,
    /// Completion tokens, cumulative.
    pub completion_tokens: u64,
}

/// One endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointView {
    /// Base URL as configured (the endpoint's identity).
    pub url: String,
    /// `ollama`, `openai` or `llama_server`.
    pub kind: String,
    /// Position in the configuration (0 first).
    pub priority: u32,
    /// Last probe succeeded.
    pub healthy: bool,
    /// Why unhealthy; empty when healthy.
    pub health_detail: String,
    /// Receives no new work.
    pub draining: bool,
    /// Circuit breaker open after consecutive failures (also while a
    /// half-open breaker's trial request is in flight).
    pub circuit_open: bool,
    /// Circuit breaker half-open: one trial request may go, or is in flight.
    pub circuit_half_open: bool,
    /// Requests in flight over all models.
    pub in_flight: u32,
    /// Concurrency limit per model on the endpoint.
    pub max_concurrent: u32,
    /// Models advertised, as the endpoint names them.
    pub advertised_models: Vec<String>,
    /// Models loaded, as the endpoint names them.
    pub loaded_models: Vec<String>,
    /// Tracking models avoided here: their completions failed recently, or
    /// the endpoint answered it does not have them (`missing_models`).
    pub failing_models: Vec<String>,
    /// The subset of `failing_models` the endpoint answered it does not have.
    pub missing_models: Vec<String>,
    /// Usage per tracking model.
    pub usage: Vec<ModelUsageView>,
    /// Unix milliseconds of the last successful probe; 0 if never.
    pub last_probe_ok_unix_ms: u64,
    /// The server version the endpoint reported (Ollama's `/api/version`);
    /// empty when unknown or not an Ollama endpoint.
    pub server_version: String,
}

/// The whole cluster (`endpoints`, `watch`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateView {
    /// State version; increases with every change.
    pub version: u64,
    /// Live sidecar sessions.
    pub sessions: u32,
    /// Leases held (requests in flight, cluster-wide, as counted by leases).
    pub leases: u32,
    /// Conversation-affinity entries.
    pub affinity_entries: u32,
    /// `priority_routing` is on.
    pub priority_routing: bool,
    /// `conversation_affinity` is on.
    pub conversation_affinity: bool,
    /// Sum of in-flight over all endpoints.
    pub in_flight: u64,
    /// Endpoints in configuration order.
    pub endpoints: Vec<EndpointView>,
}

/// One endpoint serving a model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelEndpointView {
    /// Endpoint URL.
    pub url: String,
    /// Endpoint kind.
    pub kind: String,
    /// The name the endpoint advertises the model under (empty if it does
    /// not advertise it but still has requests in flight for it).
    pub advertised_as: String,
    /// The name usage is counted under there.
    pub tracking_model: String,
    /// Model loaded there.
    pub loaded: bool,
    /// Requests in flight for this model there.
    pub in_flight: u32,
    /// Endpoint healthy.
    pub healthy: bool,
    /// Endpoint draining.
    pub draining: bool,
}

/// One model and where it runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelView {
    /// Model name in canonical request form (untagged names get `:latest`):
    /// a client asking for this name can be routed to every endpoint listed.
    pub model: String,
    /// Requests in flight for the model, cluster-wide.
    pub in_flight: u64,
    /// Endpoints serving it, in configuration order.
    pub endpoints: Vec<ModelEndpointView>,
}

/// `models`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelsView {
    /// State version.
    pub version: u64,
    /// Models, sorted by name.
    pub models: Vec<ModelView>,
}

/// One endpoint × model usage row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRow {
    /// Endpoint URL.
    pub endpoint: String,
    /// Tracking model name.
    pub model: String,
    /// Requests in flight now.
    pub in_flight: u32,
    /// Requests completed, cumulative.
    pub requests: u64,
    /// Prompt tokens, cumulative.
    pub prompt_tokens: u64,
    /// Completion tokens, cumulative.
    pub completion_tokens: u64,
}

/// Sums over all usage rows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageTotals {
    /// Requests in flight now.
    pub in_flight: u64,
    /// Requests completed.
    pub requests: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
}

/// `usage`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageView {
    /// State version.
    pub version: u64,
    /// Rows, endpoints in configuration order, models by name.
    pub rows: Vec<UsageRow>,
    /// Sums.
    pub totals: UsageTotals,
}

/// One sidecar session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionView {
    /// Session id; JSON carries it as the 16 hex digits the table and the
    /// logs show (a number above 2^53 loses digits in `jq` and JavaScript).
    #[serde(with = "hex_id")]
    pub id: u64,
    /// Sidecar name.
    pub name: String,
    /// Leases held.
    pub leases: u32,
    /// Milliseconds since the last keep-alive.
    pub last_keepalive_ms_ago: u64,
    /// Milliseconds until expiry without keep-alive.
    pub expires_in_ms: u64,
}

/// `sessions`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionsView {
    /// Sessions, by id.
    pub sessions: Vec<SessionView>,
}

/// One affinity entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AffinityEntryView {
    /// Conversation key.
    pub key: String,
    /// Endpoint URL the conversation is bound to.
    pub endpoint: String,
    /// Tracking model.
    pub model: String,
    /// Milliseconds until the entry expires.
    pub expires_in_ms: u64,
}

/// `affinity`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AffinityView {
    /// Entries held in total.
    pub total: u32,
    /// A sample (at most `--limit`).
    pub entries: Vec<AffinityEntryView>,
}

/// `choose`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChoiceView {
    /// Model as asked.
    pub model: String,
    /// Endpoint URL that would serve it.
    pub endpoint: String,
    /// Its kind.
    pub endpoint_kind: String,
    /// Name that would be sent to the backend.
    pub backend_model: String,
    /// Name usage would be counted under.
    pub tracking_model: String,
    /// `affinity`, `loaded_free`, `free_slot` or `saturated`.
    pub reason: DecisionReason,
}

/// `drain` / `undrain`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainView {
    /// The endpoint after the change.
    pub endpoint: EndpointView,
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> CliError {
    CliError::InvalidResponse {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Decodes a proto endpoint kind.
pub fn endpoint_kind(field: &str, raw: i32) -> Result<EndpointKind, CliError> {
    match v1::EndpointKind::try_from(raw) {
        Ok(v1::EndpointKind::Ollama) => Ok(EndpointKind::Ollama),
        Ok(v1::EndpointKind::Openai) => Ok(EndpointKind::OpenAi),
        Ok(v1::EndpointKind::LlamaServer) => Ok(EndpointKind::LlamaServer),
        Ok(v1::EndpointKind::Unspecified) => Err(invalid(field, "unspecified")),
        Err(_) => Err(invalid(field, format!("unknown value {raw}"))),
    }
}

/// Decodes a proto decision reason.
pub fn decision_reason(field: &str, raw: i32) -> Result<DecisionReason, CliError> {
    match v1::DecisionReason::try_from(raw) {
        Ok(v1::DecisionReason::Affinity) => Ok(DecisionReason::Affinity),
        Ok(v1::DecisionReason::LoadedFree) => Ok(DecisionReason::LoadedFree),
        Ok(v1::DecisionReason::FreeSlot) => Ok(DecisionReason::FreeSlot),
        Ok(v1::DecisionReason::Saturated) => Ok(DecisionReason::Saturated),
        Ok(v1::DecisionReason::Unspecified) => Err(invalid(field, "unspecified")),
        Err(_) => Err(invalid(field, format!("unknown value {raw}"))),
    }
}

/// An endpoint URL as the CLI shows it, in tables and JSON alike: without
/// the credentials of a `http://user:pass@host` URL (`drain` and `undrain`
/// take it so, as long as no other endpoint is shown alike).
fn shown(url: String) -> String {
    match without_credentials(&url) {
        Cow::Owned(shown) => shown,
        Cow::Borrowed(_) => url,
    }
}

impl EndpointView {
    /// Converts one endpoint; `field` prefixes error field names.
    pub fn from_proto(field: &str, e: v1::EndpointState) -> Result<Self, CliError> {
        let kind = endpoint_kind(&format!("{field}.kind"), e.kind)?;
        Ok(Self {
            url: shown(e.url),
            kind: kind.as_str().to_owned(),
            priority: e.priority,
            healthy: e.healthy,
            health_detail: e.health_detail,
            draining: e.draining,
            circuit_open: e.circuit_open,
            circuit_half_open: e.circuit_half_open,
            in_flight: e.in_flight,
            max_concurrent: e.max_concurrent,
            advertised_models: e.advertised_models,
            loaded_models: e.loaded_models,
            failing_models: e.failing_models,
            missing_models: e.missing_models,
            usage: e
                .usage
                .into_iter()
                .map(|u| ModelUsageView {
                    model: u.model,
                    in_flight: u.in_flight,
                    requests: u.requests,
                    prompt_tokens: u.prompt_tokens,
                    completion_tokens: u.completion_tokens,
                })
                .collect(),
            last_probe_ok_unix_ms: e.last_probe_ok_unix_ms,
            server_version: e.version,
        })
    }

    fn kind(&self) -> Option<EndpointKind> {
        self.kind.parse().ok()
    }
}

impl TryFrom<v1::ClusterState> for StateView {
    type Error = CliError;

    fn try_from(s: v1::ClusterState) -> Result<Self, CliError> {
        let endpoints = s
            .endpoints
            .into_iter()
            .enumerate()
            .map(|(i, e)| EndpointView::from_proto(&format!("endpoints[{i}]"), e))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            version: s.version,
            sessions: s.sessions,
            leases: s.leases,
            affinity_entries: s.affinity_entries,
            priority_routing: s.priority_routing,
            conversation_affinity: s.conversation_affinity,
            in_flight: endpoints.iter().map(|e| u64::from(e.in_flight)).sum(),
            endpoints,
        })
    }
}

impl From<&StateView> for ModelsView {
    /// Groups advertised models by the name a client asks for (canonical
    /// request form), so `llama3` on Ollama and `llama3` on an OpenAI server
    /// are one model served by two endpoints, as the policy sees them.
    fn from(state: &StateView) -> Self {
        let mut models: BTreeMap<String, Vec<ModelEndpointView>> = BTreeMap::new();
        for ep in &state.endpoints {
            // Kinds were validated when the view was built.
            let Some(kind) = ep.kind() else { continue };
            let in_flight_of = |tracking: &str| {
                ep.usage
                    .iter()
                    .find(|u| u.model == tracking)
                    .map_or(0, |u| u.in_flight)
            };
            let mut here: BTreeMap<String, ModelEndpointView> = BTreeMap::new();
            for name in &ep.advertised_models {
                let tracking = tracking_name(kind, name);
                let loaded = ep
                    .loaded_models
                    .iter()
                    .any(|l| tracking_name(kind, l) == tracking);
                here.entry(canonical_request_name(name))
                    .or_insert_with(|| ModelEndpointView {
                        url: ep.url.clone(),
                        kind: ep.kind.clone(),
                        advertised_as: name.clone(),
                        in_flight: in_flight_of(&tracking),
                        tracking_model: tracking,
                        loaded,
                        healthy: ep.healthy,
                        draining: ep.draining,
                    });
            }
            // Requests in flight for a model the endpoint no longer
            // advertises (removed mid-request) still count.
            for u in &ep.usage {
                if u.in_flight > 0 && !here.values().any(|v| v.tracking_model == u.model) {
                    here.insert(
                        canonical_request_name(&u.model),
                        ModelEndpointView {
                            url: ep.url.clone(),
                            kind: ep.kind.clone(),
                            advertised_as: String::new(),
                            tracking_model: u.model.clone(),
                            loaded: false,
                            in_flight: u.in_flight,
                            healthy: ep.healthy,
                            draining: ep.draining,
                        },
                    );
                }
            }
            for (model, view) in here {
                models.entry(model).or_default().push(view);
            }
        }
        Self {
            version: state.version,
            models: models
                .into_iter()
                .map(|(model, endpoints)| ModelView {
                    in_flight: endpoints.iter().map(|e| u64::from(e.in_flight)).sum(),
                    model,
                    endpoints,
                })
                .collect(),
        }
    }
}

impl From<&StateView> for UsageView {
    fn from(state: &StateView) -> Self {
        let mut rows = Vec::new();
        let mut totals = UsageTotals::default();
        for ep in &state.endpoints {
            let mut usage: Vec<&ModelUsageView> = ep.usage.iter().collect();
            usage.sort_by(|a, b| a.model.cmp(&b.model));
            for u in usage {
                totals.in_flight += u64::from(u.in_flight);
                totals.requests += u.requests;
                totals.prompt_tokens += u.prompt_tokens;
                totals.completion_tokens += u.completion_tokens;
                rows.push(UsageRow {
                    endpoint: ep.url.clone(),
                    model: u.model.clone(),
                    in_flight: u.in_flight,
                    requests: u.requests,
                    prompt_tokens: u.prompt_tokens,
                    completion_tokens: u.completion_tokens,
                });
            }
        }
        Self {
            version: state.version,
            rows,
            totals,
        }
    }
}

impl From<v1::ListSessionsResponse> for SessionsView {
    fn from(r: v1::ListSessionsResponse) -> Self {
        let mut sessions: Vec<SessionView> = r
            .sessions
            .into_iter()
            .map(|s| SessionView {
                id: s.session_id,
                name: s.name,
                leases: s.leases,
                last_keepalive_ms_ago: s.last_keepalive_ms_ago,
                expires_in_ms: s.expires_in_ms,
            })
            .collect();
        sessions.sort_by_key(|s| s.id);
        Self { sessions }
    }
}

impl From<v1::ListAffinityResponse> for AffinityView {
    fn from(r: v1::ListAffinityResponse) -> Self {
        Self {
            total: r.total,
            entries: r
                .entries
                .into_iter()
                .map(|e| AffinityEntryView {
                    key: e.key,
                    endpoint: shown(e.endpoint),
                    model: e.model,
                    expires_in_ms: e.expires_in_ms,
                })
                .collect(),
        }
    }
}

impl ChoiceView {
    /// Converts a dry-run answer for `model`.
    pub fn from_proto(model: &str, c: v1::ChooseResponse) -> Result<Self, CliError> {
        let kind = endpoint_kind("endpoint_kind", c.endpoint_kind)?;
        let reason = decision_reason("reason", c.reason)?;
        Ok(Self {
            model: model.to_owned(),
            endpoint: shown(c.endpoint),
            endpoint_kind: kind.as_str().to_owned(),
            backend_model: c.backend_model,
            tracking_model: c.tracking_model,
            reason,
        })
    }
}

impl TryFrom<v1::DrainResponse> for DrainView {
    type Error = CliError;

    fn try_from(r: v1::DrainResponse) -> Result<Self, CliError> {
        let endpoint = r.endpoint.ok_or_else(|| invalid("endpoint", "missing"))?;
        Ok(Self {
            endpoint: EndpointView::from_proto("endpoint", endpoint)?,
        })
    }
}

/// A `u64` id as a string of 16 hex digits (`SessionId`'s display form).
mod hex_id {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(id: &u64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{id:016x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
        let text = String::deserialize(deserializer)?;
        u64::from_str_radix(&text, 16)
            .map_err(|e| D::Error::custom(format!("session id {text:?} is not hex: {e}")))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A two-endpoint cluster: an Ollama box with `llama3:latest` loaded and
    /// two requests in flight, and an OpenAI server advertising `llama3`.
    pub(crate) fn sample_state() -> v1::ClusterState {
        v1::ClusterState {
            version: 7,
            endpoints: vec![
                v1::EndpointState {
                    url: "http://10.0.0.5:11434".into(),
                    kind: v1::EndpointKind::Ollama as i32,
                    priority: 0,
                    max_concurrent: 4,
                    healthy: true,
                    health_detail: String::new(),
                    draining: false,
                    advertised_models: vec!["llama3:latest".into(), "qwen3:8b".into()],
                    loaded_models: vec!["llama3:latest".into()],
                    usage: vec![v1::ModelUsage {
                        model: "llama3:latest".into(),
                        in_flight: 2,
                        prompt_tokens: 100,
                        completion_tokens: 40,
                        requests: 3,
                    }],
                    in_flight: 2,
                    failing_models: vec![],
                    missing_models: vec![],
                    circuit_open: false,
                    circuit_half_open: false,
                    last_probe_ok_unix_ms: 1_700_000_000_000,
                    version: "0.5.7".into(),
                },
                v1::EndpointState {
                    url: "https://vllm.internal/v1".into(),
                    kind: v1::EndpointKind::Openai as i32,
                    priority: 1,
                    max_concurrent: 8,
                    healthy: false,
                    health_detail: "connection refused".into(),
                    draining: true,
                    advertised_models: vec!["llama3".into()],
                    loaded_models: vec![],
                    usage: vec![v1::ModelUsage {
                        model: "llama3".into(),
                        in_flight: 0,
                        prompt_tokens: 5,
                        completion_tokens: 6,
                        requests: 1,
                    }],
                    in_flight: 0,
                    failing_models: vec!["llama3".into()],
                    missing_models: vec![],
                    circuit_open: false,
                    circuit_half_open: true,
                    last_probe_ok_unix_ms: 0,
                    version: String::new(),
                },
            ],
            sessions: 1,
            leases: 2,
            affinity_entries: 3,
            priority_routing: true,
            conversation_affinity: true,
        }
    }

    #[test]
    fn session_ids_are_hex_strings_in_json() {
        let view = SessionView {
            id: 0x2e8a_cb34_0000_0001,
            name: "ingress-a".into(),
            leases: 2,
            last_keepalive_ms_ago: 10,
            expires_in_ms: 9_990,
        };
        let json = serde_json::to_value(&view).unwrap();
        // 3353716296729493505 as a JSON number would read back as ...500.
        assert_eq!(json["id"], "2e8acb3400000001");
        assert_eq!(serde_json::from_value::<SessionView>(json).unwrap(), view);
        let bad = serde_json::json!({"id": "xyz", "name": "", "leases": 0,
            "last_keepalive_ms_ago": 0, "expires_in_ms": 0});
        let err = serde_json::from_value::<SessionView>(bad).unwrap_err();
        assert!(err.to_string().contains("\"xyz\" is not hex"), "{err}");
    }

    #[test]
    fn state_converts_with_canonical_kind_names() {
        let s = StateView::try_from(sample_state()).unwrap();
        assert_eq!(s.in_flight, 2);
        assert_eq!(s.endpoints[0].kind, "ollama");
        assert_eq!(s.endpoints[1].kind, "openai");
        assert_eq!(s.endpoints[0].usage[0].prompt_tokens, 100);
    }

    #[test]
    fn unknown_kind_names_the_field() {
        let mut raw = sample_state();
        raw.endpoints[1].kind = 42;
        let err = StateView::try_from(raw).unwrap_err().to_string();
        assert!(
            err.contains("endpoints[1].kind") && err.contains("42"),
            "{err}"
        );
        let mut raw = sample_state();
        raw.endpoints[0].kind = 0;
        let err = StateView::try_from(raw).unwrap_err().to_string();
        assert!(err.contains("endpoints[0].kind"), "{err}");
    }

    #[test]
    fn endpoint_urls_are_shown_without_credentials() {
        let mut raw = sample_state();
        raw.endpoints[0].url = "http://alice:sekret@10.0.0.5:11434".into();
        let s = StateView::try_from(raw).unwrap();
        assert_eq!(s.endpoints[0].url, "http://10.0.0.5:11434");
        let m = ModelsView::from(&s);
        assert_eq!(m.models[0].endpoints[0].url, "http://10.0.0.5:11434");
        let u = UsageView::from(&s);
        let json = serde_json::to_string(&(&s, &m, &u)).unwrap();
        assert!(
            !json.contains("sekret") && !json.contains("alice"),
            "{json}"
        );
        let a = AffinityView::from(v1::ListAffinityResponse {
            total: 1,
            entries: vec![v1::AffinityEntry {
                key: "k".into(),
                endpoint: "http://alice:sekret@10.0.0.5:11434".into(),
                model: "m".into(),
                expires_in_ms: 1,
            }],
        });
        assert_eq!(a.entries[0].endpoint, "http://10.0.0.5:11434");
    }

    #[test]
    fn models_group_by_requested_name() {
        let s = StateView::try_from(sample_state()).unwrap();
        let m = ModelsView::from(&s);
        let names: Vec<_> = m.models.iter().map(|m| m.model.as_str()).collect();
        // `llama3:latest` (Ollama) and `llama3` (OpenAI) answer the same
        // request, so they are one model on two endpoints.
        assert_eq!(names, ["llama3:latest", "qwen3:8b"]);
        let llama = &m.models[0];
        assert_eq!(llama.in_flight, 2);
        let urls: Vec<_> = llama.endpoints.iter().map(|e| e.url.as_str()).collect();
        assert_eq!(urls, ["http://10.0.0.5:11434", "https://vllm.internal/v1"]);
        assert!(llama.endpoints[0].loaded);
        assert_eq!(llama.endpoints[0].in_flight, 2);
        assert_eq!(llama.endpoints[1].tracking_model, "llama3");
        assert_eq!(llama.endpoints[1].advertised_as, "llama3");
        assert!(!llama.endpoints[1].loaded);
        let qwen = &m.models[1];
        assert!(!qwen.endpoints[0].loaded);
        assert_eq!(qwen.in_flight, 0);
    }

    #[test]
    fn models_keep_in_flight_of_unadvertised_models() {
        let mut raw = sample_state();
        raw.endpoints[0].advertised_models.clear();
        let s = StateView::try_from(raw).unwrap();
        let m = ModelsView::from(&s);
        let llama = &m.models[0];
        assert_eq!(llama.model, "llama3:latest");
        assert_eq!(llama.endpoints[0].advertised_as, "");
        assert_eq!(llama.in_flight, 2);
    }

    #[test]
    fn usage_rows_and_totals() {
        let s = StateView::try_from(sample_state()).unwrap();
        let u = UsageView::from(&s);
        assert_eq!(u.rows.len(), 2);
        assert_eq!(
            u.totals,
            UsageTotals {
                in_flight: 2,
                requests: 4,
                prompt_tokens: 105,
                completion_tokens: 46
            }
        );
    }

    #[test]
    fn choice_and_drain_convert() {
        let c = ChoiceView::from_proto(
            "llama3",
            v1::ChooseResponse {
                endpoint: "http://a:1".into(),
                endpoint_kind: v1::EndpointKind::LlamaServer as i32,
                tracking_model: "llama3".into(),
                backend_model: "org/llama3:Q4".into(),
                lease_id: 0,
                reason: v1::DecisionReason::FreeSlot as i32,
                at_limit: false,
            },
        )
        .unwrap();
        assert_eq!(c.endpoint_kind, "llama_server");
        assert_eq!(c.reason, DecisionReason::FreeSlot);
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["reason"], "free_slot");
        assert_eq!(json["endpoint_kind"], "llama_server");
        let err = ChoiceView::from_proto(
            "x",
            v1::ChooseResponse {
                reason: 99,
                endpoint_kind: 1,
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("reason"), "{err}");
        let err = DrainView::try_from(v1::DrainResponse { endpoint: None })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`endpoint`") && err.contains("missing"),
            "{err}"
        );
    }
}
