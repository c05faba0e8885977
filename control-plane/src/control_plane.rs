//! The [`ControlPlane`] facade: the one entry point the gRPC service, the
//! discovery probes and an embedded (standalone) sidecar use.
//!
//! Concurrency: discovery (advertised/loaded models and the model →
//! candidate index) is an immutable [`DiscoverySnapshot`] in an `ArcSwap`,
//! read without locking. Everything with invariants (leases, usage,
//! sessions, affinity, health, draining) is one [`State`] behind one short
//! `parking_lot::Mutex`; every method is synchronous and no lock is ever
//! held across `.await`.
//!
//! Lock order: `discovery_writer` (serializes snapshot replacement by
//! probes) before `state`. Nothing else nests.
//!
//! Publication: every visible mutation bumps `version` and notifies;
//! [`ControlPlane::run_background`] coalesces notifications and publishes
//! the latest [`ClusterState`] on a `watch` channel at most once per
//! `watch_interval`. Slow watchers just see the latest value; choices
//! never wait for the publisher.

use std::{
    collections::HashMap,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    admin_file::{AdminFile, AdminFileError},
    api::{
        AdminError, AffinityEntryInfo, AffinityRecord, LeaseRecord, ModelItems, ProbeReport,
        RegisterOutcome, ReprobeError, SessionGrant, SessionInfo, UnknownEndpoint,
    },
    cluster::{ClusterState, EndpointState},
    config::Config,
    decision::{Choice, ChooseError, ChooseRequest, DecisionReason},
    discovery::ProbeRounds,
    endpoint::without_credentials,
    ids::{LeaseId, SessionId},
    outcome::{Outcome, TokenCounts},
    state::{
        State,
        discovery_snapshot::{DiscoverySnapshot, EndpointDiscovery},
    },
};

/// Cumulative counters (monotonic) plus gauges, for Prometheus rendering.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlPlaneStats {
    /// Successful choices by reason (dry runs not counted).
    pub decisions: [(DecisionReason, u64); 4],
    /// Choices refused: model not advertised anywhere.
    pub not_found: u64,
    /// Choices refused: every endpoint advertising the model excluded or
    /// draining, or none advertising it while an endpoint was never
    /// reached (so it may have it).
    pub no_endpoint: u64,
    /// `release` calls that ended a lease, by outcome (every outcome listed).
    pub releases: Vec<(Outcome, u64)>,
    /// Leases granted by reserving choices.
    pub leases_granted: u64,
    /// Leases a sidecar re-registered (after a control-plane restart, or
    /// granted locally in degraded mode); they end like granted ones.
    pub leases_registered: u64,
    /// Leases ended by any means (release, session close, session expiry).
    pub leases_released: u64,
    /// Leases ended by session expiry (included in `leases_released`).
    pub leases_expired: u64,
    /// Gauge: live leases (granted or re-registered).
    pub leases_active: u64,
    /// Gauge: live sessions.
    pub sessions_active: u64,
    /// Sessions expired without keep-alive.
    pub sessions_expired: u64,
    /// Gauge: affinity entries held.
    pub affinity_entries: u64,
    /// Successful probes applied.
    pub probes_ok: u64,
    /// Failed probes applied.
    pub probes_failed: u64,
}

impl ControlPlaneStats {
    /// Successful choices with `reason` so far.
    pub fn decisions_for(&self, reason: DecisionReason) -> u64 {
        self.decisions
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }
}

struct Shared {
    config: Arc<Config>,
    /// Endpoint URL → index, for exclude lists, leases and admin calls.
    urls: HashMap<Arc<str>, u32>,
    /// The same by [`crate::config::endpoint_identity`], for a URL written
    /// another way (`HTTP://`, a default port, ...).
    identities: HashMap<String, u32>,
    discovery: ArcSwap<DiscoverySnapshot>,
    discovery_writer: Mutex<()>,
    state: Mutex<State>,
    version: AtomicU64,
    changed: Notify,
    /// Woken on every state change while a choice is held for a slot
    /// ([`ControlPlane::wait_for_slot`]); `holding` counts those choices,
    /// so a change with none held costs one atomic load.
    freed: Arc<Notify>,
    holding: AtomicUsize,
    watch: watch::Sender<Arc<ClusterState>>,
    /// Each endpoint's latest listing items, replaced on every successful
    /// probe (not part of the published state: they change rarely, are
    /// large, and only listings read them).
    model_items: Mutex<Vec<Arc<ModelItems>>>,
    /// The probe loops' progress, and their wake-up for a probe on demand.
    probe_rounds: Arc<ProbeRounds>,
    /// Where drains are saved; set by [`ControlPlane::with_state_file`].
    admin_file: OnceLock<AdminFile>,
}

/// The answer of [`ControlPlane::choose_or_hold`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Held {
    /// Chosen (and, for a request, leased) as [`ControlPlane::choose`] would.
    Chosen(Choice),
    /// Every candidate is full: nothing was granted; wait for a slot.
    Full,
}

/// Counts one held choice while it lives.
struct HoldingGuard<'a>(&'a AtomicUsize);

impl<'a> HoldingGuard<'a> {
    fn new(holding: &'a AtomicUsize) -> Self {
        holding.fetch_add(1, Ordering::SeqCst);
        Self(holding)
    }
}

impl Drop for HoldingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The control plane: authoritative routing state and selection. Cheap to
/// clone (an `Arc` inside).
#[derive(Clone)]
pub struct ControlPlane {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("endpoints", &self.shared.config.endpoints.len())
            .field("version", &self.shared.version.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl ControlPlane {
    /// A control plane for `config`: nothing probed, no sessions.
    pub fn new(config: Arc<Config>) -> Self {
        Self::from_state(State::new(config))
    }

    fn from_state(state: State) -> Self {
        let config = state.config().clone();
        let config_len = config.endpoints.len();
        let snap = DiscoverySnapshot::empty(config_len);
        let initial = Arc::new(state.cluster_state(&snap, 0, Instant::now()));
        let (watch, _) = watch::channel(initial);
        let urls: HashMap<Arc<str>, u32> = config
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| (e.url.clone(), u32::try_from(i).unwrap_or(u32::MAX)))
            .collect();
        let identities = urls
            .iter()
            .map(|(url, &i)| (crate::config::endpoint_identity(url), i))
            .collect();
        Self {
            shared: Arc::new(Shared {
                config,
                urls,
                identities,
                discovery: ArcSwap::from_pointee(snap),
                discovery_writer: Mutex::new(()),
                state: Mutex::new(state),
                version: AtomicU64::new(0),
                changed: Notify::new(),
                freed: Arc::new(Notify::new()),
                holding: AtomicUsize::new(0),
                watch,
                model_items: Mutex::new(vec![Arc::default(); config_len]),
                probe_rounds: Arc::new(ProbeRounds::new(config_len)),
                admin_file: OnceLock::new(),
            }),
        }
    }

    /// A control plane for `config` that keeps its drains in the config's
    /// `state_file`, when one is set: the endpoints saved there are drained
    /// now, and every drain or undrain is saved (see [`crate::admin_file`]).
    /// The control-plane binary and the standalone sidecar (whose drains
    /// come through `--control-plane-listen`) start this way. A remote
    /// sidecar probing on its own uses [`ControlPlane::new`] and reads or
    /// writes no file.
    pub fn with_state_file(config: Arc<Config>) -> Result<Self, AdminFileError> {
        let cp = Self::new(config);
        let Some(path) = cp.shared.config.state_file.clone() else {
            return Ok(cp);
        };
        let file = AdminFile::new(path);
        let saved = file.load_checked()?;
        let mut drained = Vec::new();
        {
            let mut st = cp.shared.state.lock();
            for url in &saved {
                match cp.endpoint_index(url) {
                    Some(ep) => {
                        st.set_draining(ep as usize, true);
                        drained.push(url.as_str());
                    }
                    None => tracing::warn!(
                        endpoint = %without_credentials(url),
                        file = %file.path().display(),
                        "the state file drains an endpoint that is no longer configured; ignored"
                    ),
                }
            }
        }
        if !drained.is_empty() {
            tracing::info!(?drained, file = %file.path().display(), "drains restored from the state file");
            cp.bump();
        }
        let _ = cp.shared.admin_file.set(file);
        Ok(cp)
    }

    /// Each endpoint's latest listing items from discovery, by position in
    /// `config.endpoints` (empty until a probe succeeds, and for
    /// OpenAI-style endpoints).
    pub fn model_items(&self) -> Vec<Arc<ModelItems>> {
        self.shared.model_items.lock().clone()
    }

    /// The configuration.
    pub fn config(&self) -> &Arc<Config> {
        &self.shared.config
    }

    /// The probe rounds discovery runs (see [`crate::discovery::spawn`]).
    pub fn probe_rounds(&self) -> &Arc<ProbeRounds> {
        &self.shared.probe_rounds
    }

    fn endpoint_index(&self, url: &str) -> Option<u32> {
        if let Some(&index) = self.shared.urls.get(url.trim_end_matches('/')) {
            return Some(index);
        }
        // Written another way (`HTTP://`, a default port, ...): the same
        // endpoint as the config means it.
        let identity = crate::config::endpoint_identity(url);
        if let Some(&index) = self.shared.identities.get(&identity) {
            return Some(index);
        }
        // As logs, metrics and the CLI show it, without the credentials of
        // its configured URL: that endpoint, if only one is shown so.
        let mut shown = self.shown_as(&identity);
        match (shown.next(), shown.next()) {
            (Some(index), None) => u32::try_from(index).ok(),
            _ => None,
        }
    }

    /// The indexes of the configured endpoints whose URL, shown without its
    /// credentials, has `identity` ([`crate::config::endpoint_identity`]).
    /// Admin calls and unknown URLs are rare: a scan will do.
    fn shown_as<'a>(&'a self, identity: &'a str) -> impl Iterator<Item = usize> + 'a {
        self.shared
            .config
            .endpoints
            .iter()
            .enumerate()
            .filter(move |(_, e)| {
                crate::config::endpoint_identity(&without_credentials(&e.url)) == identity
            })
            .map(|(index, _)| index)
    }

    /// Records a visible change; the publisher picks it up.
    fn bump(&self) {
        self.bump_version();
        // SeqCst, as the holder's increment: a holder this load misses
        // registered after the change and sees it when it asks again.
        if self.shared.holding.load(Ordering::SeqCst) > 0 {
            self.shared.freed.notify_waiters();
        }
    }

    /// [`ControlPlane::bump`] for a change that frees no slot (a grant):
    /// held choices are not woken for it.
    fn bump_version(&self) {
        self.shared.version.fetch_add(1, Ordering::Release);
        self.shared.changed.notify_one();
    }

    // ---- sessions ----

    /// Opens a sidecar session.
    pub fn open_session(&self, name: &str, now: Instant) -> SessionGrant {
        self.open_session_once(name, None, now).0
    }

    /// Opens a sidecar session, or grants again the live session opened with
    /// the same `open_token` (false: not new), so that an open the sidecar
    /// retried after a timeout leaves no second session behind.
    pub fn open_session_once(
        &self,
        name: &str,
        open_token: Option<u64>,
        now: Instant,
    ) -> (SessionGrant, bool) {
        let (grant, new) = self
            .shared
            .state
            .lock()
            .open_session_once(name, open_token, now);
        if new {
            self.bump();
        }
        (grant, new)
    }

    /// Extends a session's life; false if unknown (expired or never opened).
    pub fn keep_alive(&self, id: SessionId, now: Instant) -> bool {
        self.shared.state.lock().keep_alive(id, now)
    }

    /// Closes a session, releasing its leases (outcome cancelled, no failure
    /// accounting). Returns the number of leases released.
    pub fn close_session(&self, id: SessionId) -> usize {
        let n = self.shared.state.lock().close_session(id);
        self.bump();
        n
    }

    /// Counts leases a sidecar already holds (after a control-plane restart,
    /// or granted by itself in degraded mode). Idempotent per lease id;
    /// leases on unconfigured endpoints are rejected. Refreshes the session.
    pub fn register_leases(
        &self,
        id: SessionId,
        leases: &[LeaseRecord],
        now: Instant,
    ) -> Result<RegisterOutcome, ChooseError> {
        let out = self
            .shared
            .state
            .lock()
            .register_leases(id, leases, now, |url| {
                self.endpoint_index(url).map(|i| i as usize)
            })?;
        self.bump();
        Ok(out)
    }

    /// Takes affinity entries a sidecar remembers into the table (see
    /// [`State::restore_affinity`]); returns how many were taken.
    pub fn restore_affinity(&self, records: &[AffinityRecord], now: Instant) -> usize {
        if records.is_empty() {
            return 0;
        }
        let n = self
            .shared
            .state
            .lock()
            .restore_affinity(records, now, |url| {
                self.endpoint_index(url).map(|i| i as usize)
            });
        if n > 0 {
            self.bump();
        }
        n
    }

    /// Removes sessions whose deadline passed and releases their leases.
    /// Returns the number of leases reclaimed.
    pub fn expire_sessions(&self, now: Instant) -> usize {
        let n = self.shared.state.lock().expire_sessions(now);
        if n > 0 {
            self.bump();
        }
        n
    }

    // ---- routing ----

    /// Chooses an endpoint. `reserve: Some(session)` takes a lease owned by
    /// that session (and records affinity); `None` is a dry run.
    pub fn choose(
        &self,
        req: &ChooseRequest,
        reserve: Option<SessionId>,
        now: Instant,
    ) -> Result<Choice, ChooseError> {
        self.choose_inner(req, reserve, now, false)?.ok_or_else(|| {
            ChooseError::NoEndpointAvailable {
                model: req.model.clone(),
                detail: "internal: a choice was held though holding was off".to_owned(),
            }
        })
    }

    /// [`ControlPlane::choose`] for a request (`reserve` set) that may wait
    /// briefly for a slot: when every candidate is full and
    /// `saturated_hold` is not zero, nothing is granted and the answer is
    /// [`Held::Full`]; ask again with [`ControlPlane::wait_for_slot`]. Dry
    /// runs and everything else are answered at once.
    pub fn choose_or_hold(
        &self,
        req: &ChooseRequest,
        reserve: Option<SessionId>,
        now: Instant,
    ) -> Result<Held, ChooseError> {
        let hold = !self.shared.config.saturated_hold.is_zero();
        Ok(match self.choose_inner(req, reserve, now, hold)? {
            Some(choice) => Held::Chosen(choice),
            None => Held::Full,
        })
    }

    /// Asks again, after [`Held::Full`], each time the state changes (a
    /// release, a drain lifted, an endpoint back), until a slot is free or
    /// `saturated_hold` from `since` has passed; then the choice is made
    /// whatever it finds (`saturated` if still full). Dropping the future
    /// grants nothing: leases are taken only inside a synchronous choice.
    pub async fn wait_for_slot(
        &self,
        req: &ChooseRequest,
        reserve: Option<SessionId>,
        since: Instant,
    ) -> Result<Choice, ChooseError> {
        let deadline = since + self.shared.config.saturated_hold;
        let _holding = HoldingGuard::new(&self.shared.holding);
        loop {
            // Registered before asking, so a change in between wakes it.
            let freed = self.shared.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let now = Instant::now();
            if let Some(choice) = self.choose_inner(req, reserve, now, now < deadline)? {
                return Ok(choice);
            }
            let _ = tokio::time::timeout_at(deadline.into(), freed).await;
        }
    }

    /// [`ControlPlane::choose_or_hold`], then [`ControlPlane::wait_for_slot`]
    /// when it was held: the whole choice of a request.
    pub async fn choose_held(
        &self,
        req: &ChooseRequest,
        reserve: Option<SessionId>,
    ) -> Result<Choice, ChooseError> {
        let since = Instant::now();
        match self.choose_or_hold(req, reserve, since)? {
            Held::Chosen(choice) => Ok(choice),
            Held::Full => Box::pin(self.wait_for_slot(req, reserve, since)).await,
        }
    }

    fn choose_inner(
        &self,
        req: &ChooseRequest,
        reserve: Option<SessionId>,
        now: Instant,
        hold_full: bool,
    ) -> Result<Option<Choice>, ChooseError> {
        let snap = self.shared.discovery.load();
        // Unknown URLs in the exclude list cannot match a candidate: dropped.
        let excluded: Vec<u32> = req
            .exclude
            .iter()
            .filter_map(|u| self.endpoint_index(u))
            .collect();
        let result = self
            .shared
            .state
            .lock()
            .choose_unless_full(&snap, req, &excluded, reserve, now, hold_full);
        if reserve.is_some() && matches!(result, Ok(Some(_))) {
            self.bump_version();
        }
        result
    }

    /// Ends a lease. Idempotent: false when unknown or already released.
    /// Feeds token counters, the completion-failure cache and the breaker.
    pub fn release(
        &self,
        lease: LeaseId,
        outcome: Outcome,
        tokens: TokenCounts,
        now: Instant,
    ) -> bool {
        let released = self
            .shared
            .state
            .lock()
            .release(lease, outcome, tokens, now);
        if released {
            self.bump();
        }
        released
    }

    // ---- discovery input ----

    /// Applies one probe round's result for endpoint `endpoint` (index in
    /// `config.endpoints`; out-of-range indexes are ignored). The discovery
    /// snapshot is rebuilt and swapped only when the lists changed; a failed
    /// probe keeps the last lists (the endpoint stays a candidate, avoided
    /// unless nothing else is left).
    pub fn apply_probe(&self, endpoint: usize, report: ProbeReport, _now: Instant) {
        let Some(cfg) = self.shared.config.endpoints.get(endpoint) else {
            tracing::warn!(endpoint, "probe report for an unknown endpoint index");
            return;
        };
        match report {
            ProbeReport::Failed { detail } => {
                let changed = self.shared.state.lock().probe_failed(endpoint, &detail);
                if changed {
                    self.bump();
                }
            }
            ProbeReport::Ok {
                advertised,
                loaded,
                items,
            } => {
                if let Some(slot) = self.shared.model_items.lock().get_mut(endpoint)
                    && **slot != items
                {
                    *slot = Arc::new(items);
                }
                let unix_ms = unix_ms_now();
                let _writer = self.shared.discovery_writer.lock();
                let snap = self.shared.discovery.load_full();
                let same = snap
                    .endpoints
                    .get(endpoint)
                    .is_some_and(|d| d.same_lists(&advertised, &loaded));
                if same {
                    let changed = self.shared.state.lock().probe_ok(endpoint, unix_ms);
                    if changed {
                        self.bump();
                    }
                    return;
                }
                let mut disc = EndpointDiscovery::parse(cfg.kind, &advertised, &loaded);
                {
                    let mut state = self.shared.state.lock();
                    state.assign_slots(endpoint, &mut disc);
                    state.probe_ok(endpoint, unix_ms);
                }
                let next = snap.with_endpoint(endpoint, disc);
                self.shared.discovery.store(Arc::new(next));
                self.bump();
            }
        }
    }

    /// Records the server version endpoint `endpoint` reported in a probe
    /// round (an Ollama endpoint's `GET /api/version`), published as its
    /// [`EndpointState::version`]. Discovery calls it before the round's
    /// [`ControlPlane::apply_probe`], so a state that shows the endpoint
    /// healthy after that round shows its version too. Out-of-range indexes
    /// are ignored.
    pub fn apply_version(&self, endpoint: usize, version: &str) {
        let changed = self.shared.state.lock().set_version(endpoint, version);
        if changed {
            self.bump();
        }
    }

    // ---- admin / inspection ----

    fn unknown_endpoint(&self, url: &str) -> UnknownEndpoint {
        // Without credentials: the answer goes to whoever asked.
        let shown = without_credentials(url);
        let configured: Vec<String> = self
            .shared
            .config
            .endpoints
            .iter()
            .map(|e| without_credentials(&e.url).into_owned())
            .collect();
        let look_alike = self
            .shown_as(&crate::config::endpoint_identity(&shown))
            .count();
        let why = match (look_alike, shown.len() != url.len()) {
            (0, _) => None,
            (_, true) => Some(format!(
                "no configured endpoint has these credentials; {look_alike} shown as {shown}"
            )),
            (_, false) => Some(format!(
                "{look_alike} configured endpoints are shown as {shown}, differing only in \
                 their credentials: give the URL with its credentials"
            )),
        };
        UnknownEndpoint {
            url: shown.into_owned(),
            why,
            configured,
        }
    }

    /// Probes `urls` (every endpoint when empty) now, and returns once each
    /// has applied a probe that started after this call: with the state
    /// version that includes them. A sidecar calls it after pulling,
    /// copying or deleting a model, so the change is routable at once
    /// instead of at the next `probe_interval`. Bounded by twice the probe
    /// timeout plus a second (a round already in flight, then the fresh
    /// one).
    pub async fn reprobe(&self, urls: &[&str]) -> Result<u64, ReprobeError> {
        let indices: Vec<usize> = if urls.is_empty() {
            (0..self.shared.config.endpoints.len()).collect()
        } else {
            urls.iter()
                .map(|url| {
                    self.endpoint_index(url)
                        .map(|i| i as usize)
                        .ok_or_else(|| self.unknown_endpoint(url))
                })
                .collect::<Result<_, _>>()?
        };
        let limit = self.shared.config.probe.timeout * 2 + Duration::from_secs(1);
        let rounds = &self.shared.probe_rounds;
        let fresh = futures::future::join_all(indices.into_iter().map(|i| rounds.fresh(i)));
        tokio::time::timeout(limit, fresh)
            .await
            .map_err(|_| ReprobeError::TimedOut(limit))?;
        Ok(self.shared.version.load(Ordering::Acquire))
    }

    /// Drains (or undrains) an endpoint; returns its state afterwards.
    pub fn set_draining(&self, url: &str, draining: bool) -> Result<EndpointState, AdminError> {
        let unknown = || self.unknown_endpoint(url);
        let ep = self.endpoint_index(url).ok_or_else(unknown)? as usize;
        let snap = self.shared.discovery.load();
        let (changed, state) = {
            let mut st = self.shared.state.lock();
            let changed = st.set_draining(ep, draining);
            (changed, st.endpoint_state(&snap, ep, Instant::now()))
        };
        if changed {
            self.bump();
        }
        let state = state.ok_or_else(unknown)?;
        if let Some(file) = self.shared.admin_file.get() {
            let config = &self.shared.config;
            file.save(|| {
                let draining = self.shared.state.lock().draining();
                draining
                    .into_iter()
                    .filter_map(|i| config.endpoints.get(i).map(|e| e.url.to_string()))
                    .collect()
            })
            .map_err(|source| AdminError::NotSaved {
                url: without_credentials(&state.url).into_owned(),
                draining,
                source,
            })?;
        }
        Ok(state)
    }

    /// Live sessions.
    pub fn sessions(&self, now: Instant) -> Vec<SessionInfo> {
        self.shared.state.lock().sessions(now)
    }

    /// Number of live affinity entries and up to `limit` of them.
    pub fn affinity_sample(&self, limit: usize, now: Instant) -> (usize, Vec<AffinityEntryInfo>) {
        self.shared.state.lock().affinity_sample(limit, now)
    }

    /// Counters and gauges for `/metrics`.
    pub fn stats(&self) -> ControlPlaneStats {
        let st = self.shared.state.lock();
        let c = st.counters();
        ControlPlaneStats {
            decisions: DecisionReason::ALL.map(|r| {
                let i = DecisionReason::ALL
                    .iter()
                    .position(|x| *x == r)
                    .unwrap_or(0);
                (r, c.decisions.get(i).copied().unwrap_or(0))
            }),
            not_found: c.not_found,
            no_endpoint: c.no_endpoint,
            releases: Outcome::ALL
                .iter()
                .zip(c.releases)
                .map(|(o, n)| (*o, n))
                .collect(),
            leases_granted: c.leases_granted,
            leases_registered: c.leases_registered,
            leases_released: c.leases_released,
            leases_expired: c.leases_expired,
            leases_active: st.leases_active() as u64,
            sessions_active: st.sessions_active() as u64,
            sessions_expired: c.sessions_expired,
            affinity_entries: st.affinity_entries() as u64,
            probes_ok: c.probes_ok,
            probes_failed: c.probes_failed,
        }
    }

    // ---- publication ----

    /// The cluster state, built now (not the last published one).
    pub fn state(&self) -> Arc<ClusterState> {
        // Version first: every change writes (state under its lock, or the
        // discovery snapshot) and then bumps, so each change counted in
        // `version` is visible below. A state is never labelled newer than
        // its content; changes it misses bump past it and are published
        // again. (Reading the version last let a probe land between the
        // discovery load and the version read: a state with the new version
        // and the old model lists, which the publisher and watchers then
        // took as current, and a sidecar could wait for the models until
        // the next change.)
        let version = self.shared.version.load(Ordering::Acquire);
        let snap = self.shared.discovery.load();
        let st = self.shared.state.lock();
        Arc::new(st.cluster_state(&snap, version, Instant::now()))
    }

    /// A receiver of published states; its current value is the latest
    /// publication (the initial state before `run_background` publishes).
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.shared.watch.subscribe()
    }

    /// Time-driven upkeep: session expiry, breaker timeouts, failure-cache
    /// and affinity expiry.
    fn maintain(&self, now: Instant) {
        let changed = self.shared.state.lock().maintain(now);
        if changed {
            self.bump();
        }
    }

    /// Session reaper (every `min(session_ttl / 4, 1s)`) and `WatchUsage`
    /// publisher (at most once per `watch_interval`, always the latest
    /// state). Runs until `cancel`; the caller owns the task.
    pub async fn run_background(self, cancel: CancellationToken) {
        let reap_every = (self.shared.config.sessions.ttl / 4)
            .min(Duration::from_secs(1))
            .max(Duration::from_millis(1));
        let spacing = self.shared.config.watch_interval;
        let mut reap = tokio::time::interval(reap_every);
        reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut published = self.shared.watch.borrow().version;
        let mut next_publish = tokio::time::Instant::now();
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                _ = reap.tick() => self.maintain(tokio::time::Instant::now().into_std()),
                () = self.shared.changed.notified() => {
                    if tokio::time::Instant::now() < next_publish {
                        tokio::select! {
                            biased;
                            () = cancel.cancelled() => break,
                            () = tokio::time::sleep_until(next_publish) => {}
                        }
                    }
                    if self.shared.version.load(Ordering::Acquire) != published {
                        let state = self.state();
                        published = state.version;
                        self.shared.watch.send_replace(state);
                        next_publish = tokio::time::Instant::now() + spacing;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
