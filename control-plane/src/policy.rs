//! The selection policy: a pure function from a snapshot of candidate loads
//! to a decision with its reason. No clock reads, no I/O; randomness comes
//! from the caller's RNG so tests can seed it.
//!
//! Two front ends share [`select`]:
//! - the control plane calls [`select_with`], computing each candidate's
//!   [`CandidateLoad`] on demand from its precomputed model → candidate
//!   index and dense counters (nothing allocated per decision);
//! - a sidecar in degraded mode calls [`select_from_cluster_state`] over the
//!   last published [`ClusterState`] plus its own [`LocalUsage`].
//!
//! Rules, in order (see DESIGN.md "Selection"):
//! 1. candidates advertise the model (names compared by [`index_key`]);
//! 2. hard exclusions (excluded for this request, draining) always apply;
//!    nothing left → [`Rejection::AllHardExcluded`];
//! 3. soft exclusions (probe failed, circuit open or half-open trial in
//!    flight, recent completion failure) apply unless they drop everything;
//! 4. affinity: the conversation's endpoint if still in the pool, loaded and free;
//! 5. loaded and free: least in-flight for the model (priority routing:
//!    its utilization `model_in_flight / limit`, then config order);
//! 6. any free slot, model not loaded: least total in-flight on the endpoint
//!    (priority routing: the endpoint's load `total_in_flight / limit`, then
//!    config order);
//! 7. all saturated: least utilization `model_in_flight / limit`, then least
//!    total in-flight on the endpoint (priority routing: utilization, then
//!    config order).
//!
//! The limit (`max_concurrent_connections`) is per endpoint **and model**, like
//! Ollama's `OLLAMA_NUM_PARALLEL` and nomyo-router's meaning of the key: a
//! candidate has a free slot while its in-flight for the requested (tracking)
//! model is below the limit, whatever the endpoint serves for other models.
//!
//! Ties are broken uniformly at random among equal keys.

use std::{collections::HashMap, sync::Arc};

use rand::Rng;

use crate::{
    cluster::ClusterState,
    decision::{Choice, ChooseError, ChooseRequest, DecisionReason},
    model_name::tracking_name,
    state::discovery_snapshot::ready_without_loading,
};

/// Why a candidate can never get this request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HardExclusion {
    /// Named in the request's exclude list (already failed for it).
    Excluded,
    /// Admin-draining.
    Draining,
}

/// The load of one candidate endpoint for one model, as the policy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CandidateLoad {
    /// Position of the endpoint in the configuration (priority order).
    pub priority: u32,
    /// In-flight requests for the requested (tracking) model on the endpoint.
    pub model_in_flight: u32,
    /// In-flight requests over all models on the endpoint.
    pub total_in_flight: u32,
    /// Concurrent-request limit of the endpoint per model, i.e. for
    /// `model_in_flight` (0 is treated as 1).
    pub max_concurrent: u32,
    /// The model is loaded there now.
    pub loaded: bool,
    /// A hard exclusion, if any.
    pub hard: Option<HardExclusion>,
    /// Soft exclusion: probe failed, circuit open (or trial in flight), or a
    /// recent completion failure of this model there.
    pub avoid: bool,
}

/// An endpoint's per-model limit from its `max_concurrent` (0 is 1).
#[inline(always)]
pub fn model_limit(max_concurrent: u32) -> u32 {
    max_concurrent.max(1)
}

impl CandidateLoad {
    /// The per-model limit ([`model_limit`]).
    #[inline(always)]
    fn limit(&self) -> u32 {
        model_limit(self.max_concurrent)
    }

    /// True while the endpoint has a free slot for the model: its in-flight
    /// for this (tracking) model is below the limit. Requests for other
    /// models on the endpoint do not count (the limit is per endpoint and
    /// model, like `OLLAMA_NUM_PARALLEL`).
    #[inline]
    pub fn has_free_slot(&self) -> bool {
        self.model_in_flight < self.limit()
    }
}

/// The policy's pick: an index into the candidate slice and the reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selection {
    /// Index into the candidate slice.
    pub index: usize,
    /// Why.
    pub reason: DecisionReason,
}

/// Why the policy could not pick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// No endpoint advertises the model.
    NoCandidates,
    /// Every candidate is hard-excluded.
    AllHardExcluded {
        /// Candidates excluded for this request.
        excluded: usize,
        /// Candidates draining.
        draining: usize,
    },
}

impl Rejection {
    /// The client-facing error. `unknown` is the number of endpoints whose
    /// models nobody knows ([`models_unknown`]): while there are any, a
    /// model no endpoint advertises may still be on one of them, so
    /// [`Rejection::NoCandidates`] is "no endpoint available" (503, try
    /// again), not "model not found" (404), which would send a user to
    /// pull a model they have because the backend was down when the router
    /// started. `available` is only called for a real not-found (it may be
    /// costly to build).
    pub fn into_error(
        self,
        model: &str,
        unknown: usize,
        available: impl FnOnce() -> Vec<String>,
    ) -> ChooseError {
        match self {
            Self::NoCandidates if unknown > 0 => ChooseError::NoEndpointAvailable {
                model: model.to_owned(),
                detail: format!(
                    "no endpoint that answered its probes advertises it, and {unknown} \
                     endpoint(s) never reached since the router started may have it"
                ),
            },
            Self::NoCandidates => ChooseError::ModelNotFound {
                model: model.to_owned(),
                available: available(),
            },
            Self::AllHardExcluded { excluded, draining } => ChooseError::NoEndpointAvailable {
                model: model.to_owned(),
                detail: format!(
                    "{} endpoint(s) advertise it: {excluded} already failed for this request, \
                     {draining} draining",
                    excluded + draining
                ),
            },
        }
    }
}

/// Whether nobody knows an endpoint's models: it has never answered a
/// probe since the control plane started (`last_probe_ok_unix_ms` 0, not
/// healthy) and is not draining (a draining endpoint gets no requests, so
/// what it has does not matter).
pub fn models_unknown(healthy: bool, last_probe_ok_unix_ms: u64, draining: bool) -> bool {
    !healthy && last_probe_ok_unix_ms == 0 && !draining
}

/// The tier a candidate falls in: rules 5, 6 and 7 in one ordering.
/// A loaded-and-free candidate (tier 0) beats any merely free one (tier 1),
/// which beats any saturated one (tier 2); within the winning tier the
/// rule's own key decides. So one minimum finds the rule's answer.
const TIER_REASON: [DecisionReason; 3] = [
    DecisionReason::LoadedFree,
    DecisionReason::FreeSlot,
    DecisionReason::Saturated,
];

/// Bit layout of a candidate's rank word (smaller is better):
/// `hard | avoid | tier (2 bits) | key (124 bits)`.
const HARD_BIT: u32 = 127;
const AVOID_BIT: u32 = 126;
const TIER_SHIFT: u32 = 124;

/// The candidate's rank as one integer, smaller is better. From the top:
/// the hard-exclusion bit (such candidates lose to everything and are
/// never picked), the avoid bit (soft exclusions lose to every candidate
/// without one, which is exactly "soft exclusions hold only while
/// something else is left"), the tier (free means `model_in_flight <
/// limit`), then the tier's key:
///
/// | tier | key | key with priority routing |
/// |---|---|---|
/// | 0 loaded and free (rule 5) | `model_in_flight` | `model_in_flight / limit`, config order |
/// | 1 free, not loaded (rule 6) | `total_in_flight` | `total_in_flight / limit`, config order |
/// | 2 saturated (rule 7) | `model_in_flight / limit`, `total_in_flight` | `model_in_flight / limit`, config order |
///
/// A ratio takes the key's upper bits and its second component the low 32.
/// So the whole rule cascade is one minimum over integers, and ties are
/// the candidates equal to it. The ratio is an `f64` whose bit pattern
/// orders like the value (it is never negative); IEEE division is
/// correctly rounded, so equal ratios give equal bits, and the quotient of
/// two integers below 2^17 keeps distinct ratios distinct (they differ by
/// at least 2^-34 relative, far above the rounding error). Beyond that,
/// near-equal ratios may tie.
#[inline(always)]
fn rank(c: &CandidateLoad, priority_routing: bool) -> u128 {
    let limit = c.limit();
    let free = c.has_free_slot();
    let free_unloaded = free & !c.loaded;
    let tier = 2 * u128::from(!free) + u128::from(free_unloaded);
    let ratio = |n: u32| u128::from((f64::from(n) / f64::from(limit)).to_bits()) << 32;
    let key = if priority_routing {
        // The model's utilization, except where the model is not loaded
        // yet and a free slot is the endpoint's (rule 6): its load.
        let n = if free_unloaded {
            c.total_in_flight
        } else {
            c.model_in_flight
        };
        ratio(n) | u128::from(c.priority)
    } else if !free {
        ratio(c.model_in_flight) | u128::from(c.total_in_flight)
    } else if c.loaded {
        u128::from(c.model_in_flight)
    } else {
        u128::from(c.total_in_flight)
    };
    (u128::from(c.hard.is_some()) << HARD_BIT)
        | (u128::from(c.avoid) << AVOID_BIT)
        | (tier << TIER_SHIFT)
        | key
}

fn tier_reason(rank: u128) -> DecisionReason {
    let tier = usize::try_from((rank >> TIER_SHIFT) & 3).unwrap_or(2);
    TIER_REASON
        .get(tier)
        .copied()
        .unwrap_or(DecisionReason::Saturated)
}

/// The endpoint a request's conversation went to, among the candidates
/// (the caller has checked the key is for the same model).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Remembered {
    /// Its index among the candidates.
    pub index: usize,
    /// Follow it whenever it is neither excluded nor draining, even when it
    /// is full, has the model unloaded or is failing: the request continues
    /// state stored there (a Responses API `previous_response_id`) that no
    /// other endpoint can serve.
    pub required: bool,
}

/// Selects one candidate; `affinity` is where the conversation went.
pub fn select<R: Rng + ?Sized>(
    candidates: &[CandidateLoad],
    affinity: Option<Remembered>,
    priority_routing: bool,
    rng: &mut R,
) -> Result<Selection, Rejection> {
    select_with(
        candidates.len(),
        |i| candidates[i],
        affinity,
        priority_routing,
        &mut Vec::with_capacity(candidates.len()),
        rng,
    )
}

/// [`select`] over `len` candidates whose loads `load(i)` computes on
/// demand (the control plane reads them straight from its dense counters,
/// without materializing them). `load` must be a pure function of `i`.
/// `ranks` is scratch space the caller keeps between decisions, so that
/// nothing is allocated per decision once it has grown.
///
/// `load` is called once per candidate to write its `rank`; the rest works
/// on the rank words alone: their minimum is the answer's rank (rules 2–7
/// at once), the candidates equal to it are the ties, and one random draw
/// picks among them uniformly.
pub fn select_with<R: Rng + ?Sized>(
    len: usize,
    load: impl Fn(usize) -> CandidateLoad,
    affinity: Option<Remembered>,
    priority_routing: bool,
    ranks: &mut Vec<u128>,
    rng: &mut R,
) -> Result<Selection, Rejection> {
    if len == 0 {
        return Err(Rejection::NoCandidates);
    }
    ranks.clear();
    ranks.resize(len, 0);
    let (mut excluded, mut draining) = (0usize, 0usize);
    for (i, slot) in ranks.iter_mut().enumerate() {
        let c = load(i);
        excluded += usize::from(c.hard == Some(HardExclusion::Excluded));
        draining += usize::from(c.hard == Some(HardExclusion::Draining));
        *slot = rank(&c, priority_routing);
    }
    let best = ranks.iter().copied().min().unwrap_or(u128::MAX);
    if best >> HARD_BIT != 0 {
        return Err(Rejection::AllHardExcluded { excluded, draining });
    }

    // Affinity: the remembered endpoint, if it is in the pool the minimum
    // came from (not avoided, unless everything eligible is), loaded and
    // free (tier 0); a required one whenever it is not hard-excluded.
    let pool_flags = best >> AVOID_BIT;
    if let Some(Remembered { index, required }) = affinity
        && let Some(&r) = ranks.get(index)
        && if required {
            r >> HARD_BIT == 0
        } else {
            r >> AVOID_BIT <= pool_flags && (r >> TIER_SHIFT) & 3 == 0
        }
    {
        return Ok(Selection {
            index,
            reason: DecisionReason::Affinity,
        });
    }

    let ties: u32 = ranks.iter().map(|&r| u32::from(r == best)).sum();
    let k = if ties > 1 {
        rng.random_range(0..ties)
    } else {
        0
    };
    let index = ranks
        .iter()
        .enumerate()
        .filter(|(_, r)| **r == best)
        .nth(k as usize)
        .map_or(0, |(i, _)| i);
    Ok(Selection {
        index,
        reason: tier_reason(best),
    })
}

/// True when the last path segment of `name` carries a `:tag`.
fn has_tag(name: &str) -> bool {
    name.rsplit('/').next().unwrap_or(name).contains(':')
}

/// The key model names are matched by: the trimmed name with a `:latest`
/// tag removed. Two names have the same key exactly when their
/// [`canonical_request_name`](crate::model_name::canonical_request_name)s
/// are equal, but computing it never allocates.
pub fn index_key(name: &str) -> &str {
    let name = name.trim();
    match name.strip_suffix(":latest") {
        Some(base) if !has_tag(base) => base,
        _ => name,
    }
}

/// In-flight requests a sidecar knows about and the published state does
/// not (yet): leases it granted itself in degraded mode, or requests started
/// since the last `WatchUsage` update. Counts may go negative transiently
/// (a release seen locally before the state caught up); the policy clamps
/// the sum with the published count at zero.
#[derive(Clone, Debug, Default)]
pub struct LocalUsage {
    endpoints: HashMap<Arc<str>, LocalEndpoint>,
}

#[derive(Clone, Debug, Default)]
struct LocalEndpoint {
    total: i64,
    models: HashMap<Arc<str>, i64>,
}

impl LocalUsage {
    /// Adds `delta` (+1 on start, -1 on end) for (endpoint url, tracking model).
    pub fn add(&mut self, endpoint: &str, tracking_model: &str, delta: i64) {
        let ep = match self.endpoints.get_mut(endpoint) {
            Some(ep) => ep,
            None => self.endpoints.entry(Arc::from(endpoint)).or_default(),
        };
        ep.total = ep.total.saturating_add(delta);
        match ep.models.get_mut(tracking_model) {
            Some(n) => *n = n.saturating_add(delta),
            None => {
                ep.models.insert(Arc::from(tracking_model), delta);
            }
        }
        ep.models.retain(|_, n| *n != 0);
        if ep.total == 0 && ep.models.is_empty() {
            self.endpoints.remove(endpoint);
        }
    }

    /// Extra in-flight for (endpoint url, tracking model).
    pub fn get(&self, endpoint: &str, tracking_model: &str) -> i64 {
        self.endpoints
            .get(endpoint)
            .and_then(|ep| ep.models.get(tracking_model))
            .copied()
            .unwrap_or(0)
    }

    /// Extra in-flight on an endpoint over all models.
    pub fn endpoint_total(&self, endpoint: &str) -> i64 {
        self.endpoints.get(endpoint).map_or(0, |ep| ep.total)
    }

    /// True when nothing is counted.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Forgets every count (e.g. once the control plane has caught up).
    pub fn clear(&mut self) {
        self.endpoints.clear();
    }
}

fn add_clamped(published: u32, extra: i64) -> u32 {
    let sum = i64::from(published).saturating_add(extra);
    u32::try_from(sum.max(0)).unwrap_or(u32::MAX)
}

/// The same policy over a published [`ClusterState`] plus the sidecar's own
/// in-flight counts (`local`). Used by a sidecar that cannot reach the
/// control plane. The choice carries no lease. `affinity_endpoint` is the URL
/// the sidecar remembers for the request's affinity key (same model); it is
/// honoured only when the state says affinity is on and the request has a key.
pub fn select_from_cluster_state(
    state: &ClusterState,
    local: &LocalUsage,
    req: &ChooseRequest,
    affinity_endpoint: Option<&str>,
    rng: &mut impl Rng,
) -> Result<Choice, ChooseError> {
    let key = index_key(&req.model);
    let excluded: Vec<&str> = req
        .exclude
        .iter()
        .map(|u| u.trim_end_matches('/'))
        .collect();
    let affinity_endpoint = affinity_endpoint
        .filter(|_| state.conversation_affinity && req.affinity_key.is_some())
        .map(|u| u.trim_end_matches('/'));

    // (endpoint index, advertised name, tracking name) per candidate.
    let mut found: Vec<(usize, &Arc<str>, String)> = Vec::new();
    let mut loads: Vec<CandidateLoad> = Vec::new();
    let mut affinity = None;
    for (i, ep) in state.endpoints.iter().enumerate() {
        let Some(advertised) = ep.advertised_models.iter().find(|m| index_key(m) == key) else {
            continue;
        };
        let tracking = tracking_name(ep.kind, advertised);
        let published = ep
            .usage
            .iter()
            .find(|u| *u.model == *tracking)
            .map_or(0, |u| u.in_flight);
        let hard = if excluded.contains(&&*ep.url) {
            Some(HardExclusion::Excluded)
        } else if ep.draining {
            Some(HardExclusion::Draining)
        } else {
            None
        };
        let avoid =
            !ep.healthy || ep.circuit_open || ep.failing_models.iter().any(|m| **m == *tracking);
        if affinity_endpoint == Some(&*ep.url) {
            affinity = Some(Remembered {
                index: loads.len(),
                required: req.affinity_required,
            });
        }
        loads.push(CandidateLoad {
            priority: ep.priority,
            model_in_flight: add_clamped(published, local.get(&ep.url, &tracking)),
            total_in_flight: add_clamped(ep.in_flight, local.endpoint_total(&ep.url)),
            max_concurrent: ep.max_concurrent,
            loaded: ready_without_loading(ep.kind)
                || ep.loaded_models.iter().any(|m| index_key(m) == key),
            hard,
            avoid,
        });
        found.push((i, advertised, tracking));
    }

    let selection = select(&loads, affinity, state.priority_routing, rng).map_err(|r| {
        let unknown = state
            .endpoints
            .iter()
            .filter(|e| models_unknown(e.healthy, e.last_probe_ok_unix_ms, e.draining))
            .count();
        r.into_error(&req.model, unknown, || {
            let mut all: Vec<String> = state
                .endpoints
                .iter()
                .flat_map(|e| e.advertised_models.iter().map(|m| m.to_string()))
                .collect();
            all.sort();
            all.dedup();
            all
        })
    })?;
    let (ep_index, advertised, tracking) =
        found
            .get(selection.index)
            .ok_or_else(|| ChooseError::NoEndpointAvailable {
                model: req.model.clone(),
                detail: "internal: selection out of range".to_owned(),
            })?;
    let ep = state
        .endpoints
        .get(*ep_index)
        .ok_or_else(|| ChooseError::NoEndpointAvailable {
            model: req.model.clone(),
            detail: "internal: endpoint out of range".to_owned(),
        })?;
    Ok(Choice {
        endpoint: ep.url.clone(),
        endpoint_kind: ep.kind,
        tracking_model: Arc::from(tracking.as_str()),
        backend_model: (*advertised).clone(),
        reason: selection.reason,
        lease: None,
        at_limit: false,
    })
}

#[cfg(test)]
mod tests;
