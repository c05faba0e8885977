//! The lease table and the usage counters it drives.
//!
//! Usage is laid out for the decision loop: a dense `in_flight` array
//! indexed by a global *slot* (one per (endpoint, tracking model), interned
//! by name per endpoint, never reused or moved) and a dense per-endpoint
//! `totals` array. The discovery index stores each candidate's slot, so a
//! decision reads two `u32`s per candidate and never hashes a model name.
//! Cumulative token counts live beside, in [`SlotCounters`].
//!
//! Invariants (checked by `LeaseTable::check_invariants` in tests): for
//! every slot, `in_flight` equals the number of live leases on it; an
//! endpoint's total is the sum over its slots. A lease is released at most
//! once: the second release finds nothing and changes nothing, and counters
//! are decremented with saturating arithmetic.

use std::sync::Arc;

// Keyed by lease ids this process allocates.
use super::FastMap;

use crate::{
    ids::{LeaseId, SessionId},
    outcome::TokenCounts,
};

/// Cumulative counters of one (endpoint, tracking model) slot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotCounters {
    /// Endpoint index.
    pub endpoint: u32,
    /// Tracking name.
    pub name: Arc<str>,
    /// Prompt tokens reported, cumulative.
    pub prompt_tokens: u64,
    /// Completion tokens reported, cumulative.
    pub completion_tokens: u64,
    /// Leases released, cumulative.
    pub requests: u64,
}

/// One live lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Owning session.
    pub session: SessionId,
    /// Endpoint index.
    pub endpoint: u32,
    /// Global usage slot of (endpoint, tracking model).
    pub slot: u32,
}

/// Leases and usage.
#[derive(Debug)]
pub struct LeaseTable {
    leases: FastMap<LeaseId, Lease>,
    /// Per endpoint: live leases over all models.
    totals: Vec<u32>,
    /// Per slot: live leases.
    in_flight: Vec<u32>,
    /// Per slot: identity and cumulative counters.
    slots: Vec<SlotCounters>,
    /// Per endpoint: its slots, in creation order.
    endpoint_slots: Vec<Vec<u32>>,
}

impl LeaseTable {
    /// A table for `endpoints` endpoints.
    pub fn new(endpoints: usize) -> Self {
        Self {
            leases: FastMap::default(),
            totals: vec![0; endpoints],
            in_flight: Vec::new(),
            slots: Vec::new(),
            endpoint_slots: vec![Vec::new(); endpoints],
        }
    }

    /// The slot of (endpoint, tracking model), created if new. `None` for an
    /// unknown endpoint.
    pub fn slot(&mut self, endpoint: usize, tracking: &str) -> Option<u32> {
        let owned = self.endpoint_slots.get_mut(endpoint)?;
        if let Some(&s) = owned.iter().find(|&&s| {
            self.slots
                .get(s as usize)
                .is_some_and(|c| &*c.name == tracking)
        }) {
            return Some(s);
        }
        let slot = u32::try_from(self.slots.len()).ok()?;
        self.slots.push(SlotCounters {
            endpoint: u32::try_from(endpoint).ok()?,
            name: Arc::from(tracking),
            ..SlotCounters::default()
        });
        self.in_flight.push(0);
        owned.push(slot);
        Some(slot)
    }

    /// In-flight on a slot.
    #[inline]
    pub fn model_in_flight(&self, slot: u32) -> u32 {
        self.in_flight.get(slot as usize).copied().unwrap_or(0)
    }

    /// In-flight on an endpoint over all models.
    #[inline]
    pub fn total_in_flight(&self, endpoint: usize) -> u32 {
        self.totals.get(endpoint).copied().unwrap_or(0)
    }

    /// An endpoint's slots with their in-flight counts.
    pub fn endpoint_usage(&self, endpoint: usize) -> impl Iterator<Item = (&SlotCounters, u32)> {
        self.endpoint_slots
            .get(endpoint)
            .into_iter()
            .flatten()
            .filter_map(|&s| Some((self.slots.get(s as usize)?, self.model_in_flight(s))))
    }

    /// Tracking name of a slot.
    pub fn slot_name(&self, slot: u32) -> Option<&Arc<str>> {
        Some(&self.slots.get(slot as usize)?.name)
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
    /// live or the slot does not belong to the endpoint.
    pub fn grant(&mut self, id: LeaseId, lease: Lease) -> bool {
        if self.leases.contains_key(&id)
            || self.slots.get(lease.slot as usize).map(|s| s.endpoint) != Some(lease.endpoint)
        {
            return false;
        }
        let (Some(total), Some(n)) = (
            self.totals.get_mut(lease.endpoint as usize),
            self.in_flight.get_mut(lease.slot as usize),
        ) else {
            return false;
        };
        *total = total.saturating_add(1);
        *n = n.saturating_add(1);
        self.leases.insert(id, lease);
        true
    }

    /// Releases a lease: `None` if unknown or already released (a no-op).
    pub fn release(&mut self, id: LeaseId, tokens: TokenCounts) -> Option<Lease> {
        let lease = self.leases.remove(&id)?;
        if let Some(total) = self.totals.get_mut(lease.endpoint as usize) {
            debug_assert!(*total > 0, "endpoint total underflow");
            *total = total.saturating_sub(1);
        }
        if let Some(n) = self.in_flight.get_mut(lease.slot as usize) {
            debug_assert!(*n > 0, "slot in-flight underflow");
            *n = n.saturating_sub(1);
        }
        let tokens = tokens.believable();
        if let Some(c) = self.slots.get_mut(lease.slot as usize) {
            c.prompt_tokens = c.prompt_tokens.saturating_add(tokens.prompt);
            c.completion_tokens = c.completion_tokens.saturating_add(tokens.completion);
            c.requests = c.requests.saturating_add(1);
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
        let mut expect: FastMap<u32, u32> = FastMap::default();
        for l in self.leases.values() {
            assert_eq!(self.slots[l.slot as usize].endpoint, l.endpoint);
            *expect.entry(l.slot).or_default() += 1;
        }
        for (slot, n) in self.in_flight.iter().enumerate() {
            let want = expect.get(&(slot as u32)).copied().unwrap_or_default();
            assert_eq!(*n, want, "slot {slot}");
        }
        for (e, owned) in self.endpoint_slots.iter().enumerate() {
            let sum: u32 = owned.iter().map(|&s| self.in_flight[s as usize]).sum();
            assert_eq!(self.totals[e], sum, "endpoint {e} total");
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
        let other = t.slot(1, "m").unwrap();
        assert_ne!(other, a, "slots are per endpoint");
        let wrong = Lease {
            session: SessionId(1),
            endpoint: 0,
            slot: other,
        };
        assert!(!t.grant(LeaseId(9), wrong), "slot of another endpoint");
        let lease = Lease {
            session: SessionId(1),
            endpoint: 0,
            slot: a,
        };
        assert!(t.grant(LeaseId(1), lease));
        assert!(!t.grant(LeaseId(1), lease), "same id counted once");
        assert_eq!((t.model_in_flight(a), t.total_in_flight(0)), (1, 1));
        let tokens = TokenCounts {
            prompt: 3,
            completion: 4,
        };
        assert!(t.release(LeaseId(1), tokens).is_some());
        assert!(t.release(LeaseId(1), tokens).is_none());
        assert_eq!((t.model_in_flight(a), t.total_in_flight(0)), (0, 0));
        let (m, n) = t.endpoint_usage(0).next().unwrap();
        assert_eq!(
            (n, m.prompt_tokens, m.completion_tokens, m.requests),
            (0, 3, 4, 1)
        );
        // A count no request produces is taken as none.
        assert!(t.grant(LeaseId(2), lease));
        let absurd = TokenCounts {
            prompt: 5,
            completion: u64::MAX,
        };
        assert!(t.release(LeaseId(2), absurd).is_some());
        let (m, _) = t.endpoint_usage(0).next().unwrap();
        assert_eq!((m.prompt_tokens, m.completion_tokens), (8, 4));
        t.check_invariants();
    }
}
