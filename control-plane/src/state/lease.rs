//! The lease table and the usage counters it drives.
//!
//! Usage is flat: per endpoint a total and a vector of per-model counters
//! whose positions ("slots") never change once assigned, so the decision loop
//! reads `usage[endpoint].models[slot]` without hashing a model name. Slots
//! are interned per endpoint by tracking name.
//!
//! Invariants (checked by [`LeaseTable::check_invariants`] in tests): for
//! every (endpoint, slot), `in_flight` equals the number of live leases on it;
//! an endpoint's `total` is the sum of its models' `in_flight`. A lease is
//! released at most once: the second release finds nothing and changes
//! nothing, and counters are decremented with saturating arithmetic.

use std::{collections::HashMap, sync::Arc};

use crate::{
    ids::{LeaseId, SessionId},
    outcome::TokenCounts,
};

/// Counters of one model on one endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelCounters {
    /// Tracking name.
    pub name: Arc<str>,
    /// Live leases.
    pub in_flight: u32,
    /// Prompt tokens reported, cumulative.
    pub prompt_tokens: u64,
    /// Completion tokens reported, cumulative.
    pub completion_tokens: u64,
    /// Leases released, cumulative.
    pub requests: u64,
}

/// Counters of one endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointUsage {
    /// Live leases over all models.
    pub total: u32,
    /// Per tracking model, by slot.
    pub models: Vec<ModelCounters>,
}

/// One live lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Owning session.
    pub session: SessionId,
    /// Endpoint index.
    pub endpoint: u32,
    /// Usage slot on that endpoint.
    pub slot: u32,
}

/// Leases and usage.
#[derive(Debug)]
pub struct LeaseTable {
    leases: HashMap<LeaseId, Lease>,
    usage: Vec<EndpointUsage>,
}

impl LeaseTable {
    /// A table for `endpoints` endpoints.
    pub fn new(endpoints: usize) -> Self {
        Self {
            leases: HashMap::new(),
            usage: vec![EndpointUsage::default(); endpoints],
        }
    }

    /// The slot of (endpoint, tracking model), created if new. `None` for an
    /// unknown endpoint.
    pub fn slot(&mut self, endpoint: usize, tracking: &str) -> Option<u32> {
        let usage = self.usage.get_mut(endpoint)?;
        if let Some(pos) = usage.models.iter().position(|m| &*m.name == tracking) {
            return u32::try_from(pos).ok();
        }
        usage.models.push(ModelCounters {
            name: Arc::from(tracking),
            ..ModelCounters::default()
        });
        u32::try_from(usage.models.len() - 1).ok()
    }

    /// In-flight on (endpoint, slot).
    #[inline]
    pub fn model_in_flight(&self, endpoint: usize, slot: u32) -> u32 {
        self.usage
            .get(endpoint)
            .and_then(|u| u.models.get(slot as usize))
            .map_or(0, |m| m.in_flight)
    }

    /// In-flight on an endpoint over all models.
    #[inline]
    pub fn total_in_flight(&self, endpoint: usize) -> u32 {
        self.usage.get(endpoint).map_or(0, |u| u.total)
    }

    /// Counters of an endpoint.
    pub fn usage(&self, endpoint: usize) -> Option<&EndpointUsage> {
        self.usage.get(endpoint)
    }

    /// Tracking name of a slot.
    pub fn slot_name(&self, endpoint: usize, slot: u32) -> Option<&Arc<str>> {
        Some(&self.usage.get(endpoint)?.models.get(slot as usize)?.name)
    }

    /// The lease, if live.
    pub fn get(&self, id: LeaseId) -> Option<&Lease> {
        self.leases.get(&id)
    }

    /// Moves a live lease to another session (re-registration).
    pub fn set_session(&mut self, id: LeaseId, session: SessionId) {
        if let Some(l) = self.leases.get_mut(&id) {
            l.session = session;
        }
    }

    /// Counts a new lease. False (and nothing counted) if the id is already
    /// live or the slot does not exist.
    pub fn grant(&mut self, id: LeaseId, lease: Lease) -> bool {
        if self.leases.contains_key(&id) {
            return false;
        }
        let Some(usage) = self.usage.get_mut(lease.endpoint as usize) else {
            return false;
        };
        let Some(model) = usage.models.get_mut(lease.slot as usize) else {
            return false;
        };
        model.in_flight = model.in_flight.saturating_add(1);
        usage.total = usage.total.saturating_add(1);
        self.leases.insert(id, lease);
        true
    }

    /// Releases a lease: `None` if unknown or already released (a no-op).
    pub fn release(&mut self, id: LeaseId, tokens: TokenCounts) -> Option<Lease> {
        let lease = self.leases.remove(&id)?;
        if let Some(usage) = self.usage.get_mut(lease.endpoint as usize) {
            debug_assert!(usage.total > 0, "endpoint total underflow");
            usage.total = usage.total.saturating_sub(1);
            if let Some(model) = usage.models.get_mut(lease.slot as usize) {
                debug_assert!(model.in_flight > 0, "model in-flight underflow");
                model.in_flight = model.in_flight.saturating_sub(1);
                model.prompt_tokens = model.prompt_tokens.saturating_add(tokens.prompt);
                model.completion_tokens = model.completion_tokens.saturating_add(tokens.completion);
                model.requests = model.requests.saturating_add(1);
            }
        }
        Some(lease)
    }

    /// Live leases.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// True when no lease is live.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// Panics if a counter disagrees with the live leases (tests only).
    #[cfg(test)]
    pub fn check_invariants(&self) {
        let mut expect: HashMap<(u32, u32), u32> = HashMap::new();
        for l in self.leases.values() {
            *expect.entry((l.endpoint, l.slot)).or_default() += 1;
        }
        for (e, usage) in self.usage.iter().enumerate() {
            let mut sum = 0;
            for (s, m) in usage.models.iter().enumerate() {
                let want = expect
                    .get(&(e as u32, s as u32))
                    .copied()
                    .unwrap_or_default();
                assert_eq!(m.in_flight, want, "endpoint {e} slot {s}");
                sum += m.in_flight;
            }
            assert_eq!(usage.total, sum, "endpoint {e} total");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn release_is_exactly_once() {
        let mut t = LeaseTable::new(2);
        let a = t.slot(0, "m").unwrap();
        assert_eq!(t.slot(0, "m"), Some(a), "slots are interned");
        let b = t.slot(0, "n").unwrap();
        assert_ne!(a, b);
        assert_eq!(t.slot(5, "m"), None);
        let lease = Lease {
            session: SessionId(1),
            endpoint: 0,
            slot: a,
        };
        assert!(t.grant(LeaseId(1), lease));
        assert!(!t.grant(LeaseId(1), lease), "same id counted once");
        assert_eq!((t.model_in_flight(0, a), t.total_in_flight(0)), (1, 1));
        let tokens = TokenCounts {
            prompt: 3,
            completion: 4,
        };
        assert!(t.release(LeaseId(1), tokens).is_some());
        assert!(t.release(LeaseId(1), tokens).is_none());
        assert_eq!((t.model_in_flight(0, a), t.total_in_flight(0)), (0, 0));
        let m = &t.usage(0).unwrap().models[a as usize];
        assert_eq!(
            (m.prompt_tokens, m.completion_tokens, m.requests),
            (3, 4, 1)
        );
        t.check_invariants();
    }
}
