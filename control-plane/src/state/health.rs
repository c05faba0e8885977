//! Endpoint health: the last probe result per endpoint, recent completion
//! failures per (endpoint, model slot) with a TTL, and a circuit breaker per
//! endpoint.
//!
//! Breaker: `Closed` counts consecutive backend failures; at
//! `breaker_failures` it opens for `breaker_open_for`. Once that time has
//! passed (or a probe succeeds) it is half-open: one trial lease may go
//! there; while the trial is in flight the endpoint is avoided as if open.
//! A success closes it, a backend failure re-opens it, a neutral end
//! (cancelled, client error, expiry) frees the trial slot.

use std::time::Instant;

use crate::{config::HealthConfig, ids::LeaseId, outcome::Outcome};

/// [`Health`] gate bit: the last probe failed (or none has run yet).
const UNHEALTHY: u8 = 1;
/// [`Health`] gate bit: the breaker is not closed or failure entries exist.
const ATTENTION: u8 = 2;

/// Details of the last probe of one endpoint (whether it succeeded is
/// [`Health::healthy`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProbeHealth {
    /// Why unhealthy; empty when healthy.
    pub detail: String,
    /// Unix ms of the last successful probe; 0 if never.
    pub last_ok_unix_ms: u64,
}

/// Circuit-breaker state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow; failures are counted.
    Closed,
    /// Avoided until `until`.
    Open {
        /// End of the open period.
        until: Instant,
    },
    /// One trial allowed; `trial` is the lease carrying it, if granted.
    HalfOpen {
        /// The trial lease in flight.
        trial: Option<LeaseId>,
    },
}

/// One endpoint's breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Breaker {
    /// Consecutive backend failures.
    pub consecutive: u32,
    /// State.
    pub state: BreakerState,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            consecutive: 0,
            state: BreakerState::Closed,
        }
    }
}

impl Breaker {
    /// True while the breaker keeps new work away: open and not yet timed
    /// out, or half-open with its trial in flight.
    #[inline]
    pub fn blocks(&self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed => false,
            BreakerState::Open { until } => now < until,
            BreakerState::HalfOpen { trial } => trial.is_some(),
        }
    }

    /// True once the open period is over and until a trial decides:
    /// one request may go (or is in flight) to test the endpoint.
    #[inline]
    pub fn half_open(&self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed => false,
            BreakerState::Open { until } => now >= until,
            BreakerState::HalfOpen { .. } => true,
        }
    }

    /// Open whose time has passed → half-open.
    fn advance(&mut self, now: Instant) -> bool {
        if let BreakerState::Open { until } = self.state
            && now >= until
        {
            self.state = BreakerState::HalfOpen { trial: None };
            return true;
        }
        false
    }
}

/// Health of every endpoint.
///
/// The decision loop reads one dense flag byte per candidate, `gate`:
/// `UNHEALTHY` (last probe failed) and `ATTENTION` (breaker not closed,
/// or some failure entry present); only flagged endpoints pay for the
/// detailed checks. `ATTENTION` is recomputed after every change to that
/// endpoint's breaker or entries.
#[derive(Debug)]
pub struct Health {
    config: HealthConfig,
    probes: Vec<ProbeHealth>,
    gate: Vec<u8>,
    breakers: Vec<Breaker>,
    /// Per endpoint: recent completion failures and missing models.
    failing: Vec<Vec<Failing>>,
}

/// An (endpoint, slot) avoided until `until`.
#[derive(Clone, Copy, Debug)]
struct Failing {
    slot: u32,
    until: Instant,
    /// The endpoint answered it does not have the model (rather than
    /// failing the completion).
    missing: bool,
}

impl Health {
    /// Health for `endpoints` endpoints, none probed yet.
    pub fn new(config: HealthConfig, endpoints: usize) -> Self {
        Self {
            config,
            probes: vec![
                ProbeHealth {
                    detail: crate::cluster::NOT_PROBED.to_owned(),
                    last_ok_unix_ms: 0,
                };
                endpoints
            ],
            gate: vec![UNHEALTHY; endpoints],
            breakers: vec![Breaker::default(); endpoints],
            failing: vec![Vec::new(); endpoints],
        }
    }

    fn refresh_attention(&mut self, ep: usize) {
        if let (Some(g), Some(b), Some(f)) = (
            self.gate.get_mut(ep),
            self.breakers.get(ep),
            self.failing.get(ep),
        ) {
            let attention = b.state != BreakerState::Closed || !f.is_empty();
            *g = (*g & !ATTENTION) | if attention { ATTENTION } else { 0 };
        }
    }

    /// Probe state of an endpoint.
    pub fn probe(&self, ep: usize) -> Option<&ProbeHealth> {
        self.probes.get(ep)
    }

    /// Last probe of the endpoint succeeded.
    pub fn healthy(&self, ep: usize) -> bool {
        self.gate.get(ep).is_some_and(|g| g & UNHEALTHY == 0)
    }

    /// Breaker of an endpoint.
    pub fn breaker(&self, ep: usize) -> Option<&Breaker> {
        self.breakers.get(ep)
    }

    /// Records a successful probe. An open breaker becomes half-open.
    /// Returns true if anything visible changed.
    pub fn probe_ok(&mut self, ep: usize, unix_ms: u64) -> bool {
        let mut changed = false;
        if let Some(p) = self.probes.get_mut(ep) {
            p.detail.clear();
            p.last_ok_unix_ms = unix_ms;
        }
        if let Some(g) = self.gate.get_mut(ep) {
            changed |= *g & UNHEALTHY != 0;
            *g &= !UNHEALTHY;
        }
        if let Some(b) = self.breakers.get_mut(ep)
            && matches!(b.state, BreakerState::Open { .. })
        {
            b.state = BreakerState::HalfOpen { trial: None };
            changed = true;
        }
        self.refresh_attention(ep);
        changed
    }

    /// Records a failed probe. Returns true if anything visible changed.
    pub fn probe_failed(&mut self, ep: usize, detail: &str) -> bool {
        match (self.probes.get_mut(ep), self.gate.get_mut(ep)) {
            (Some(p), Some(g)) => {
                let changed = *g & UNHEALTHY == 0 || p.detail != detail;
                *g |= UNHEALTHY;
                detail.clone_into(&mut p.detail);
                changed
            }
            _ => false,
        }
    }

    /// True when the policy should avoid (endpoint, slot) now.
    #[inline]
    pub fn avoid(&self, ep: usize, slot: u32, now: Instant) -> bool {
        let gate = self.gate.get(ep).copied().unwrap_or(UNHEALTHY);
        gate != 0
            && (gate & UNHEALTHY != 0
                || self.breakers.get(ep).is_some_and(|b| b.blocks(now))
                || self.is_failing(ep, slot, now))
    }

    /// True when (endpoint, slot) had a completion failure within the TTL.
    #[inline]
    pub fn is_failing(&self, ep: usize, slot: u32, now: Instant) -> bool {
        self.failing
            .get(ep)
            .is_some_and(|f| f.iter().any(|f| f.slot == slot && f.until > now))
    }

    /// Slots of an endpoint avoided now (failed, or missing there).
    pub fn failing_slots(&self, ep: usize, now: Instant) -> impl Iterator<Item = u32> + '_ {
        self.failing
            .get(ep)
            .into_iter()
            .flatten()
            .filter(move |f| f.until > now)
            .map(|f| f.slot)
    }

    /// The subset of [`Health::failing_slots`] avoided because the endpoint
    /// answered it does not have the model.
    pub fn missing_slots(&self, ep: usize, now: Instant) -> impl Iterator<Item = u32> + '_ {
        self.failing
            .get(ep)
            .into_iter()
            .flatten()
            .filter(move |f| f.missing && f.until > now)
            .map(|f| f.slot)
    }

    /// True when the breaker keeps new work away now.
    pub fn circuit_open(&self, ep: usize, now: Instant) -> bool {
        self.breakers.get(ep).is_some_and(|b| b.blocks(now))
    }

    /// True while the breaker is half-open: a trial may go, or is in flight.
    pub fn circuit_half_open(&self, ep: usize, now: Instant) -> bool {
        self.breakers.get(ep).is_some_and(|b| b.half_open(now))
    }

    /// A lease was granted on `ep`: if the breaker is (or has become)
    /// half-open with no trial, this lease is the trial.
    pub fn on_grant(&mut self, ep: usize, lease: LeaseId, now: Instant) {
        if let Some(b) = self.breakers.get_mut(ep) {
            b.advance(now);
            if b.state == (BreakerState::HalfOpen { trial: None }) {
                b.state = BreakerState::HalfOpen { trial: Some(lease) };
            }
        }
        self.refresh_attention(ep);
    }

    /// A lease ended with `outcome`. Returns true if health changed.
    pub fn on_release(
        &mut self,
        ep: usize,
        slot: u32,
        lease: LeaseId,
        outcome: Outcome,
        now: Instant,
    ) -> bool {
        let changed = self.apply_release(ep, slot, lease, outcome, now);
        self.refresh_attention(ep);
        changed
    }

    fn apply_release(
        &mut self,
        ep: usize,
        slot: u32,
        lease: LeaseId,
        outcome: Outcome,
        now: Instant,
    ) -> bool {
        let threshold = self.config.breaker_failures.max(1);
        let open_for = self.config.breaker_open_for;
        let ttl = self.config.completion_failure_ttl;
        let (Some(b), Some(failing)) = (self.breakers.get_mut(ep), self.failing.get_mut(ep)) else {
            return false;
        };
        if outcome.excludes_endpoint() {
            // Avoided for this model until the TTL or a success on it (a
            // missing model also stops being a candidate there once a probe
            // no longer lists it).
            failing.retain(|f| f.slot != slot && f.until > now);
            failing.push(Failing {
                slot,
                until: now + ttl,
                missing: outcome == Outcome::ModelMissing,
            });
        }
        if outcome.is_backend_failure() {
            b.consecutive = b.consecutive.saturating_add(1);
            match b.state {
                BreakerState::Closed if b.consecutive >= threshold => {
                    b.state = BreakerState::Open {
                        until: now + open_for,
                    };
                }
                BreakerState::HalfOpen { .. } => {
                    b.state = BreakerState::Open {
                        until: now + open_for,
                    };
                }
                BreakerState::Closed | BreakerState::Open { .. } => {}
            }
            true
        } else if outcome == Outcome::Ok {
            let before = failing.len();
            failing.retain(|f| f.slot != slot && f.until > now);
            let mut changed = failing.len() != before || b.consecutive != 0;
            b.consecutive = 0;
            if matches!(b.state, BreakerState::HalfOpen { .. }) {
                b.state = BreakerState::Closed;
                changed = true;
            }
            changed
        } else if outcome == Outcome::ModelMissing {
            // The backend is healthy: its breaker is untouched, but a trial
            // it held is over.
            self.on_lease_dropped(ep, lease);
            true
        } else {
            self.on_lease_dropped(ep, lease)
        }
    }

    /// A lease ended without a verdict on the backend (cancelled, client
    /// error, session expiry): frees the half-open trial slot if it held it.
    pub fn on_lease_dropped(&mut self, ep: usize, lease: LeaseId) -> bool {
        if let Some(b) = self.breakers.get_mut(ep)
            && b.state == (BreakerState::HalfOpen { trial: Some(lease) })
        {
            b.state = BreakerState::HalfOpen { trial: None };
            self.refresh_attention(ep);
            return true;
        }
        false
    }

    /// Time-driven transitions: open breakers past their time become
    /// half-open, expired failure entries are dropped. True if any changed.
    pub fn maintain(&mut self, now: Instant) -> bool {
        let mut changed = false;
        for b in &mut self.breakers {
            changed |= b.advance(now);
        }
        for f in &mut self.failing {
            let before = f.len();
            f.retain(|f| f.until > now);
            changed |= f.len() != before;
        }
        for ep in 0..self.gate.len() {
            self.refresh_attention(ep);
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::time::Duration;

    use super::*;

    fn health() -> Health {
        let mut h = Health::new(
            HealthConfig {
                completion_failure_ttl: Duration::from_secs(30),
                breaker_failures: 2,
                breaker_open_for: Duration::from_secs(5),
            },
            2,
        );
        h.probe_ok(0, 1);
        h.probe_ok(1, 1);
        h
    }

    #[test]
    fn breaker_opens_half_opens_and_closes() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut h = health();
        h.on_release(0, 0, LeaseId(1), Outcome::BackendError, t0);
        assert!(!h.circuit_open(0, t0), "one failure is below the threshold");
        assert!(h.is_failing(0, 0, t0) && !h.is_failing(0, 1, t0));
        h.on_release(0, 1, LeaseId(2), Outcome::ConnectError, t0);
        assert!(h.circuit_open(0, t0) && h.circuit_open(0, t0 + s(4)));
        assert!(!h.circuit_half_open(0, t0 + s(4)));
        assert!(!h.circuit_open(0, t0 + s(5)), "open period over");
        assert!(h.circuit_half_open(0, t0 + s(5)), "a trial may go");
        // First grant after the open period is the trial; others are kept away.
        h.on_grant(0, LeaseId(3), t0 + s(5));
        assert_eq!(
            h.breaker(0).unwrap().state,
            BreakerState::HalfOpen {
                trial: Some(LeaseId(3))
            }
        );
        assert!(h.avoid(0, 5, t0 + s(5)));
        assert!(h.circuit_open(0, t0 + s(5)) && h.circuit_half_open(0, t0 + s(5)));
        // Trial fails: open again.
        h.on_release(0, 0, LeaseId(3), Outcome::FirstByteTimeout, t0 + s(6));
        assert!(h.circuit_open(0, t0 + s(10)) && !h.circuit_half_open(0, t0 + s(10)));
        // A successful probe moves it to half-open at once.
        h.probe_ok(0, 2);
        assert!(!h.circuit_open(0, t0 + s(7)));
        h.on_grant(0, LeaseId(4), t0 + s(7));
        assert!(h.circuit_open(0, t0 + s(7)));
        // A cancelled trial frees the slot; a success closes.
        h.on_release(0, 0, LeaseId(4), Outcome::Cancelled, t0 + s(7));
        assert_eq!(
            h.breaker(0).unwrap().state,
            BreakerState::HalfOpen { trial: None }
        );
        h.on_grant(0, LeaseId(5), t0 + s(8));
        h.on_release(0, 0, LeaseId(5), Outcome::Ok, t0 + s(8));
        assert_eq!(*h.breaker(0).unwrap(), Breaker::default());
        assert!(!h.is_failing(0, 0, t0 + s(8)), "success clears the entry");
        assert!(h.is_failing(0, 1, t0 + s(8)));
        assert!(!h.is_failing(0, 1, t0 + s(30)), "TTL");
        assert!(!h.avoid(1, 0, t0));
    }

    #[test]
    fn ok_resets_the_consecutive_count() {
        let t0 = Instant::now();
        let mut h = health();
        h.on_release(1, 0, LeaseId(1), Outcome::IdleTimeout, t0);
        h.on_release(1, 0, LeaseId(2), Outcome::Ok, t0);
        h.on_release(1, 0, LeaseId(3), Outcome::IdleTimeout, t0);
        assert!(!h.circuit_open(1, t0));
        h.on_release(1, 0, LeaseId(4), Outcome::ClientError, t0);
        h.on_release(1, 0, LeaseId(5), Outcome::BackendError, t0);
        assert!(h.circuit_open(1, t0), "neutral outcomes do not reset");
        assert!(h.maintain(t0 + Duration::from_secs(60)));
        assert!(h.failing_slots(1, t0).next().is_none());
    }

    #[test]
    fn a_missing_model_avoids_the_endpoint_for_that_model_only() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut h = health();
        for lease in 1..=3 {
            assert!(h.on_release(0, 1, LeaseId(lease), Outcome::ModelMissing, t0));
        }
        assert!(h.is_failing(0, 1, t0) && !h.is_failing(0, 0, t0));
        assert!(h.avoid(0, 1, t0) && !h.avoid(0, 0, t0));
        assert_eq!(h.missing_slots(0, t0).collect::<Vec<_>>(), [1]);
        // Healthy all the same: no failure counted, the breaker stays shut.
        assert_eq!(*h.breaker(0).unwrap(), Breaker::default());
        assert!(!h.circuit_open(0, t0));
        assert!(!h.is_failing(0, 1, t0 + s(30)), "TTL");
        // A success on that model ends it early.
        h.on_release(0, 1, LeaseId(4), Outcome::ModelMissing, t0);
        h.on_release(0, 1, LeaseId(5), Outcome::Ok, t0 + s(1));
        assert!(!h.is_failing(0, 1, t0 + s(1)));
        // Reported apart from failed completions.
        h.on_release(0, 1, LeaseId(6), Outcome::ModelMissing, t0);
        h.on_release(0, 0, LeaseId(7), Outcome::BackendError, t0);
        assert_eq!(h.failing_slots(0, t0).count(), 2);
        assert_eq!(h.missing_slots(0, t0).collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn probe_failure_marks_unhealthy() {
        let mut h = health();
        assert!(h.probe_failed(0, "connection refused"));
        assert!(!h.probe_failed(0, "connection refused"));
        assert!(h.avoid(0, 0, Instant::now()));
        assert_eq!(h.probe(0).unwrap().detail, "connection refused");
    }
}
