//! The authoritative routing state: leases and usage, sessions, affinity,
//! health and admin (draining) flags, plus the cumulative counters behind
//! `/metrics`. [`State`] is plain data with `&mut self` methods; the
//! [`ControlPlane`](crate::control_plane::ControlPlane) owns it behind one
//! short `parking_lot::Mutex` and pairs it with the lock-free
//! [`DiscoverySnapshot`].
//!
//! Invariants kept here, across the submodules:
//! - usage counters equal the number of live leases per (endpoint, model);
//!   a lease is released at most once (see [`lease`]);
//! - every live lease belongs to a live session, and that session's lease
//!   set holds it (see [`session`]);
//! - a half-open breaker's trial lease is a live lease or is cleared when
//!   the lease ends (see [`health`]).

pub mod affinity;
pub mod discovery_snapshot;
pub mod health;
pub mod lease;
pub mod session;

use std::{sync::Arc, time::Instant};

use rand::{SeedableRng, rngs::SmallRng};

use crate::{
    api::{
        AffinityEntryInfo, AffinityRecord, LeaseRecord, RegisterOutcome, SessionGrant, SessionInfo,
    },
    cluster::{ClusterState, EndpointState, ModelUsage},
    config::Config,
    decision::{Choice, ChooseError, ChooseRequest, DecisionReason},
    ids::{IdAllocator, LeaseId, SessionId},
    outcome::{Outcome, TokenCounts},
    policy::{self, CandidateLoad, HardExclusion},
};

use self::{
    affinity::AffinityTable,
    discovery_snapshot::{DiscoverySnapshot, EndpointDiscovery},
    health::Health,
    lease::{Lease, LeaseTable},
    session::SessionTable,
};

/// The map and set of the tables every choose and release touches (leases,
/// sessions and their leases, the discovery index). They hash with foldhash
/// rather than std's SipHash, which was ~10 % of the control plane's
/// instructions per choose + release (callgrind, BENCHMARKS.md): keep them
/// to keys clients do not choose (ids this process allocates, names from
/// config and discovery).
pub type FastMap<K, V> = foldhash::HashMap<K, V>;
/// See [`FastMap`].
pub type FastSet<T> = foldhash::HashSet<T>;

/// Cumulative counters (monotonic).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Decisions by reason, in [`DecisionReason::ALL`] order (dry runs not counted).
    pub decisions: [u64; 4],
    /// Choices refused because no endpoint advertises the model.
    pub not_found: u64,
    /// Choices refused because every candidate was excluded or draining.
    pub no_endpoint: u64,
    /// `release` calls that ended a lease, by outcome in [`Outcome::ALL`] order.
    pub releases: [u64; Outcome::ALL.len()],
    /// Leases granted by choices (not re-registrations).
    pub leases_granted: u64,
    /// Leases re-registered that were not yet known.
    pub leases_registered: u64,
    /// Leases ended by any means (release, session close, session expiry).
    pub leases_released: u64,
    /// Of those, ended by session expiry.
    pub leases_expired: u64,
    /// Sessions that expired without keep-alive.
    pub sessions_expired: u64,
    /// Successful probes.
    pub probes_ok: u64,
    /// Failed probes.
    pub probes_failed: u64,
}

fn reason_index(r: DecisionReason) -> usize {
    match r {
        DecisionReason::Affinity => 0,
        DecisionReason::LoadedFree => 1,
        DecisionReason::FreeSlot => 2,
        DecisionReason::Saturated => 3,
    }
}

fn outcome_index(o: Outcome) -> usize {
    Outcome::ALL.iter().position(|x| *x == o).unwrap_or(0)
}

/// What the decision loop needs of an endpoint's configuration and admin
/// state, packed so one read serves both.
#[derive(Clone, Copy, Debug)]
struct Admission {
    max_concurrent: u32,
    draining: bool,
}

impl Admission {
    /// Endpoint `ep`'s entry in `table`; one missing from it is closed
    /// (draining, limit 1).
    #[inline(always)]
    fn of(table: &[Admission], ep: usize) -> Admission {
        table.get(ep).copied().unwrap_or(Admission {
            max_concurrent: 1,
            draining: true,
        })
    }
}

/// Everything mutable, owned by one lock.
#[derive(Debug)]
pub struct State {
    config: Arc<Config>,
    leases: LeaseTable,
    sessions: SessionTable,
    affinity: AffinityTable,
    health: Health,
    /// Per endpoint, dense for the decision loop: `max_concurrent` and the
    /// admin draining flag.
    admission: Vec<Admission>,
    lease_ids: IdAllocator,
    rng: SmallRng,
    /// The policy's scratch space (one rank word per candidate), kept so
    /// that decisions allocate nothing once it has grown.
    ranks: Vec<u128>,
    counters: Counters,
    /// Per endpoint, the server version it last reported (Ollama
    /// `GET /api/version`); empty when unknown.
    versions: Vec<String>,
}

impl State {
    /// Fresh state for a configuration: no sessions, nothing probed.
    pub fn new(config: Arc<Config>) -> Self {
        Self::with_rng(config, SmallRng::from_os_rng())
    }

    /// Fresh state with a given RNG (tests seed it).
    pub fn with_rng(config: Arc<Config>, rng: SmallRng) -> Self {
        let n = config.endpoints.len();
        Self {
            leases: LeaseTable::new(n),
            sessions: SessionTable::new(config.sessions.ttl),
            affinity: AffinityTable::new(config.affinity.max_entries),
            health: Health::new(config.health.clone(), n),
            admission: config
                .endpoints
                .iter()
                .map(|e| Admission {
                    max_concurrent: e.max_concurrent,
                    draining: e.draining,
                })
                .collect(),
            lease_ids: IdAllocator::new(false),
            rng,
            ranks: Vec::with_capacity(n),
            counters: Counters::default(),
            versions: vec![String::new(); n],
            config,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// Cumulative counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Live leases.
    pub fn leases_active(&self) -> usize {
        self.leases.len()
    }

    /// Live sessions.
    pub fn sessions_active(&self) -> usize {
        self.sessions.len()
    }

    /// Affinity entries held.
    pub fn affinity_entries(&self) -> usize {
        self.affinity.len()
    }

    // ---- sessions ----

    /// Opens a session.
    pub fn open_session(&mut self, name: &str, now: Instant) -> SessionGrant {
        self.open_session_once(name, None, now).0
    }

    /// Opens a session, or grants again the live one opened with the same
    /// `open_token` (false: not new); see [`SessionTable::open`].
    pub fn open_session_once(
        &mut self,
        name: &str,
        open_token: Option<u64>,
        now: Instant,
    ) -> (SessionGrant, bool) {
        let (id, new) = self.sessions.open(name, open_token, now);
        let grant = SessionGrant {
            id,
            ttl: self.config.sessions.ttl,
            keepalive_interval: self.config.sessions.keepalive_interval,
        };
        (grant, new)
    }

    /// Extends a session; false if unknown.
    pub fn keep_alive(&mut self, id: SessionId, now: Instant) -> bool {
        self.sessions.keep_alive(id, now)
    }

    /// Closes a session, releasing its leases (no failure accounting).
    pub fn close_session(&mut self, id: SessionId) -> usize {
        match self.sessions.remove(id) {
            Some(s) => self.drop_leases(s.leases),
            None => 0,
        }
    }

    /// Ends leases without an outcome (session closed or expired).
    fn drop_leases(&mut self, leases: impl IntoIterator<Item = LeaseId>) -> usize {
        let mut n = 0;
        for id in leases {
            if let Some(l) = self.leases.release(id, TokenCounts::default()) {
                self.health.on_lease_dropped(l.endpoint as usize, id);
                n += 1;
            }
        }
        self.counters.leases_released += n as u64;
        n
    }

    /// Removes expired sessions and reclaims their leases; returns the
    /// number of leases reclaimed.
    pub fn expire_sessions(&mut self, now: Instant) -> usize {
        let mut reclaimed = 0;
        for (id, s) in self.sessions.take_expired(now) {
            self.counters.sessions_expired += 1;
            let released = self.drop_leases(s.leases);
            reclaimed += released;
            // Rare (a sidecar died or lost the network) and worth a line:
            // its in-flight requests stopped counting.
            tracing::info!(
                session = %id,
                name = %s.name,
                released,
                silent_for = ?now.saturating_duration_since(s.last_keepalive),
                "session expired (no keep-alive within its TTL); its leases were released"
            );
        }
        self.counters.leases_expired += reclaimed as u64;
        reclaimed
    }

    /// Time-driven upkeep: session expiry, breaker and failure-cache
    /// expiry, affinity purge. True if anything visible changed.
    pub fn maintain(&mut self, now: Instant) -> bool {
        let sessions_before = self.sessions.len();
        let reclaimed = self.expire_sessions(now);
        let health = self.health.maintain(now);
        let purged = self.affinity.purge_expired(now);
        reclaimed > 0 || sessions_before != self.sessions.len() || health || purged > 0
    }

    /// Counts leases a sidecar holds (after a control-plane restart, or
    /// granted by itself in degraded mode). Known leases are moved to this
    /// session and counted once; unknown endpoints are rejected.
    pub fn register_leases(
        &mut self,
        id: SessionId,
        records: &[LeaseRecord],
        now: Instant,
        endpoint_index: impl Fn(&str) -> Option<usize>,
    ) -> Result<RegisterOutcome, ChooseError> {
        if !self.sessions.keep_alive(id, now) {
            return Err(ChooseError::UnknownSession(id.0));
        }
        let mut out = RegisterOutcome::default();
        for r in records {
            let Some(ep) = endpoint_index(&r.endpoint) else {
                out.rejected += 1;
                continue;
            };
            if let Some(existing) = self.leases.get(r.lease).copied() {
                if existing.session != id {
                    self.sessions.detach(existing.session, r.lease);
                    self.leases.set_session(r.lease, id);
                    self.sessions.attach(id, r.lease);
                }
                out.registered += 1;
                continue;
            }
            let (Some(slot), Ok(endpoint)) = (
                self.leases.slot(ep, r.tracking_model.trim()),
                u32::try_from(ep),
            ) else {
                out.rejected += 1;
                continue;
            };
            let lease = Lease {
                session: id,
                endpoint,
                slot,
            };
            if self.leases.grant(r.lease, lease) {
                self.sessions.attach(id, r.lease);
                self.counters.leases_registered += 1;
                out.registered += 1;
            } else {
                out.rejected += 1;
            }
        }
        Ok(out)
    }

    /// Takes affinity entries a sidecar remembers into the table (after a
    /// restart it is empty): each conversation stays on its endpoint. An
    /// entry loses to one the table holds with a later expiry (a more
    /// recent choice), lives at most `conversation_affinity_ttl`, and is
    /// dropped when its endpoint is not configured. Nothing is taken while
    /// `conversation_affinity` is off. Returns how many were taken.
    pub fn restore_affinity(
        &mut self,
        records: &[AffinityRecord],
        now: Instant,
        endpoint_index: impl Fn(&str) -> Option<usize>,
    ) -> usize {
        if !self.config.affinity.enabled {
            return 0;
        }
        let mut restored = 0;
        for r in records {
            let expires = now + r.expires_in.min(self.config.affinity.ttl);
            if expires <= now
                || self
                    .affinity
                    .get(&r.key, now)
                    .is_some_and(|e| e.expires >= expires)
            {
                continue;
            }
            let Some(ep) = endpoint_index(&r.endpoint) else {
                continue;
            };
            let (Ok(endpoint), Some(slot)) = (
                u32::try_from(ep),
                self.leases.slot(ep, r.tracking_model.trim()),
            ) else {
                continue;
            };
            let Some(model) = self.leases.slot_name(slot).cloned() else {
                continue;
            };
            self.affinity
                .record(&r.key, endpoint, slot, &model, expires, now);
            restored += 1;
        }
        restored
    }

    // ---- routing ----

    /// Chooses an endpoint over `snap`; with `reserve`, takes a lease owned
    /// by that session and records affinity. `excluded` holds the endpoint
    /// indexes of the request's exclude list. With `hold_full` a reserving
    /// choice that would be placed `saturated` (every candidate full) is
    /// not made: `Ok(None)`, nothing granted, nothing counted; the caller
    /// asks again once a slot may have freed. Otherwise always `Some`.
    pub fn choose_unless_full(
        &mut self,
        snap: &DiscoverySnapshot,
        req: &ChooseRequest,
        excluded: &[u32],
        reserve: Option<SessionId>,
        now: Instant,
        hold_full: bool,
    ) -> Result<Option<Choice>, ChooseError> {
        if let Some(s) = reserve
            && !self.sessions.contains(s)
        {
            return Err(ChooseError::UnknownSession(s.0));
        }
        let candidates = snap.candidates(&req.model);
        let affinity_key = req
            .affinity_key
            .as_deref()
            .filter(|_| self.config.affinity.enabled);
        let remembered = affinity_key
            .and_then(|k| self.affinity.get(k, now))
            .map(|e| (e.endpoint, e.slot));

        // Candidates are in endpoint order: find the remembered one by search.
        let affinity_index = remembered.and_then(|(endpoint, slot)| {
            let i = candidates
                .binary_search_by_key(&endpoint, |c| c.endpoint)
                .ok()?;
            (candidates.get(i)?.slot == slot).then_some(policy::Remembered {
                index: i,
                required: req.affinity_required,
            })
        });

        // The policy reads each candidate's load straight from the dense
        // counters: nothing is materialized per decision.
        let (leases, health, admission) = (&self.leases, &self.health, &self.admission);
        let load = |i: usize| {
            let c = candidates[i];
            let ep = c.endpoint as usize;
            let adm = Admission::of(admission, ep);
            let hard = if !excluded.is_empty() && excluded.contains(&c.endpoint) {
                Some(HardExclusion::Excluded)
            } else if adm.draining {
                Some(HardExclusion::Draining)
            } else {
                None
            };
            CandidateLoad {
                priority: c.endpoint,
                model_in_flight: leases.model_in_flight(c.slot),
                total_in_flight: leases.total_in_flight(ep),
                max_concurrent: adm.max_concurrent,
                loaded: c.loaded,
                hard,
                avoid: health.avoid(ep, c.slot, now),
            }
        };
        let selection = match policy::select_with(
            candidates.len(),
            load,
            affinity_index,
            self.config.priority_routing,
            &mut self.ranks,
            &mut self.rng,
        ) {
            Ok(s) => s,
            Err(rejection) => {
                let unknown = (0..self.config.endpoints.len())
                    .filter(|&ep| {
                        policy::models_unknown(
                            self.health.healthy(ep),
                            self.health.probe(ep).map_or(0, |p| p.last_ok_unix_ms),
                            Admission::of(admission, ep).draining,
                        )
                    })
                    .count();
                let error = rejection.into_error(&req.model, unknown, || snap.available().to_vec());
                // Only requests count: a dry run (`switchyard choose`)
                // leaves the metrics as they were.
                if reserve.is_some() {
                    match error {
                        ChooseError::ModelNotFound { .. } => self.counters.not_found += 1,
                        _ => self.counters.no_endpoint += 1,
                    }
                }
                return Err(error);
            }
        };
        if hold_full && reserve.is_some() && selection.reason == DecisionReason::Saturated {
            return Ok(None);
        }
        let internal = |detail: &str| ChooseError::NoEndpointAvailable {
            model: req.model.clone(),
            detail: format!("internal: {detail}"),
        };
        let c = *candidates
            .get(selection.index)
            .ok_or_else(|| internal("selection out of range"))?;
        let model = snap
            .model(&c)
            .ok_or_else(|| internal("candidate without model"))?;
        let ep = c.endpoint as usize;
        let endpoint = self
            .config
            .endpoints
            .get(ep)
            .ok_or_else(|| internal("candidate endpoint not configured"))?;

        // The chosen candidate's in-flight for the model and its limit, as
        // the policy saw them (a lease makes the in-flight one more). Read
        // here rather than by calling `load` again: a second call site
        // makes the compiler stop inlining `load` into the policy's loop,
        // which doubled the cost of a choice (policy_bench, BENCHMARKS.md).
        let chosen_in_flight = leases.model_in_flight(c.slot);
        let chosen_limit = policy::model_limit(Admission::of(admission, ep).max_concurrent);
        let lease = match reserve {
            Some(session) => {
                let id = LeaseId(self.lease_ids.next());
                let granted = self.leases.grant(
                    id,
                    Lease {
                        session,
                        endpoint: c.endpoint,
                        slot: c.slot,
                    },
                );
                if !granted {
                    return Err(internal("lease could not be counted"));
                }
                self.sessions.attach(session, id);
                self.health.on_grant(ep, id, now);
                self.counters.leases_granted += 1;
                if let Some(key) = affinity_key {
                    self.affinity.record(
                        key,
                        c.endpoint,
                        c.slot,
                        &model.tracking_name,
                        now + self.config.affinity.ttl,
                        now,
                    );
                }
                Some(id)
            }
            None => None,
        };
        if lease.is_some() {
            self.counters.decisions[reason_index(selection.reason)] += 1;
        }
        let at_limit = lease.is_some() && chosen_in_flight.saturating_add(1) >= chosen_limit;
        Ok(Some(Choice {
            endpoint: endpoint.url.clone(),
            endpoint_kind: endpoint.kind,
            tracking_model: model.tracking_name.clone(),
            backend_model: model.backend_name.clone(),
            reason: selection.reason,
            lease,
            at_limit,
        }))
    }

    /// Ends a lease with an outcome; false if unknown or already released.
    pub fn release(
        &mut self,
        id: LeaseId,
        outcome: Outcome,
        tokens: TokenCounts,
        now: Instant,
    ) -> bool {
        let Some(lease) = self.leases.release(id, tokens) else {
            return false;
        };
        self.sessions.detach(lease.session, id);
        self.health
            .on_release(lease.endpoint as usize, lease.slot, id, outcome, now);
        self.counters.releases[outcome_index(outcome)] += 1;
        self.counters.leases_released += 1;
        true
    }

    // ---- discovery and admin ----

    /// Gives each model of a new discovery its usage slot on endpoint `ep`.
    pub fn assign_slots(&mut self, ep: usize, discovery: &mut EndpointDiscovery) {
        for m in &mut discovery.models {
            if let Some(slot) = self.leases.slot(ep, &m.tracking_name) {
                m.slot = slot;
            }
        }
    }

    /// Records a successful probe; true if health visibly changed.
    pub fn probe_ok(&mut self, ep: usize, unix_ms: u64) -> bool {
        self.counters.probes_ok += 1;
        self.health.probe_ok(ep, unix_ms)
    }

    /// Records the server version endpoint `ep` reported; true if it
    /// changed. Kept until another is reported (a failed probe does not
    /// clear it: an unhealthy endpoint's version is not consulted anyway).
    pub fn set_version(&mut self, ep: usize, version: &str) -> bool {
        match self.versions.get_mut(ep) {
            Some(v) if v != version => {
                version.clone_into(v);
                true
            }
            _ => false,
        }
    }

    /// Records a failed probe; true if health visibly changed.
    pub fn probe_failed(&mut self, ep: usize, detail: &str) -> bool {
        self.counters.probes_failed += 1;
        self.health.probe_failed(ep, detail)
    }

    /// Sets an endpoint's draining flag; true if it changed.
    pub fn set_draining(&mut self, ep: usize, draining: bool) -> bool {
        match self.admission.get_mut(ep) {
            Some(a) if a.draining != draining => {
                a.draining = draining;
                true
            }
            _ => false,
        }
    }

    /// Indexes of the endpoints draining now.
    pub fn draining(&self) -> Vec<usize> {
        (0..self.admission.len())
            .filter(|&i| self.admission[i].draining)
            .collect()
    }

    // ---- inspection ----

    /// Sessions, by name then id.
    pub fn sessions(&self, now: Instant) -> Vec<SessionInfo> {
        let mut out: Vec<SessionInfo> = self
            .sessions
            .iter()
            .map(|(id, s)| SessionInfo {
                id: *id,
                name: s.name.clone(),
                leases: u32::try_from(s.leases.len()).unwrap_or(u32::MAX),
                since_keepalive: now.saturating_duration_since(s.last_keepalive),
                expires_in: s.deadline.saturating_duration_since(now),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        out
    }

    /// Live affinity entries and up to `limit` of them, most recent first.
    pub fn affinity_sample(&self, limit: usize, now: Instant) -> (usize, Vec<AffinityEntryInfo>) {
        let sample = self
            .affinity
            .sample(limit, now)
            .into_iter()
            .map(|(k, e)| AffinityEntryInfo {
                key: k.to_string(),
                endpoint: self
                    .config
                    .endpoints
                    .get(e.endpoint as usize)
                    .map_or_else(|| Arc::from("?"), |c| c.url.clone()),
                model: e.model.clone(),
                expires_in: e.expires.saturating_duration_since(now),
            })
            .collect();
        (self.affinity.live(now), sample)
    }

    /// One endpoint's published state.
    pub fn endpoint_state(
        &self,
        snap: &DiscoverySnapshot,
        ep: usize,
        now: Instant,
    ) -> Option<EndpointState> {
        let cfg = self.config.endpoints.get(ep)?;
        let probe = self.health.probe(ep);
        let disc = snap.endpoints.get(ep);
        Some(EndpointState {
            url: cfg.url.clone(),
            kind: cfg.kind,
            priority: u32::try_from(ep).unwrap_or(u32::MAX),
            max_concurrent: cfg.max_concurrent,
            healthy: self.health.healthy(ep),
            health_detail: probe.map(|p| p.detail.clone()).unwrap_or_default(),
            draining: self.admission.get(ep).is_some_and(|a| a.draining),
            advertised_models: disc.map(|d| d.advertised.clone()).unwrap_or_default(),
            loaded_models: disc.map(|d| d.loaded.clone()).unwrap_or_default(),
            usage: self
                .leases
                .endpoint_usage(ep)
                .filter(|(c, n)| *n > 0 || c.requests > 0)
                .map(|(c, n)| ModelUsage {
                    model: c.name.clone(),
                    in_flight: n,
                    prompt_tokens: c.prompt_tokens,
                    completion_tokens: c.completion_tokens,
                    requests: c.requests,
                })
                .collect(),
            in_flight: self.leases.total_in_flight(ep),
            failing_models: self
                .health
                .failing_slots(ep, now)
                .filter_map(|s| self.leases.slot_name(s).cloned())
                .collect(),
            missing_models: self
                .health
                .missing_slots(ep, now)
                .filter_map(|s| self.leases.slot_name(s).cloned())
                .collect(),
            circuit_open: self.health.circuit_open(ep, now),
            circuit_half_open: self.health.circuit_half_open(ep, now),
            last_probe_ok_unix_ms: probe.map_or(0, |p| p.last_ok_unix_ms),
            version: self.versions.get(ep).cloned().unwrap_or_default(),
        })
    }

    /// The whole published state at `version`.
    pub fn cluster_state(
        &self,
        snap: &DiscoverySnapshot,
        version: u64,
        now: Instant,
    ) -> ClusterState {
        let sat = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        ClusterState {
            version,
            endpoints: (0..self.config.endpoints.len())
                .filter_map(|ep| self.endpoint_state(snap, ep, now))
                .collect(),
            sessions: sat(self.sessions.len()),
            leases: sat(self.leases.len()),
            affinity_entries: sat(self.affinity.len()),
            priority_routing: self.config.priority_routing,
            conversation_affinity: self.config.affinity.enabled,
        }
    }

    /// Panics if usage disagrees with leases or sessions (tests only).
    #[cfg(test)]
    pub fn check_invariants(&self) {
        self.leases.check_invariants();
        let mut owned = 0;
        for (id, s) in self.sessions.iter() {
            for l in &s.leases {
                assert_eq!(self.leases.get(*l).map(|l| l.session), Some(*id));
                owned += 1;
            }
        }
        assert_eq!(owned, self.leases.len(), "every lease has its session");
    }
}
