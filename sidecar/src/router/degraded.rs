//! Degraded mode: what the remote router needs to route without the
//! control plane.
//!
//! - [`Circuit`]: whether the control plane is believed reachable. While it
//!   is not, choices skip the RPC entirely (no request pays the deadline);
//!   the session task re-probes in the background and closes the circuit on
//!   the first successful contact. Also counts degraded decisions and logs
//!   once per transition into and out of degraded mode (not per request).
//! - [`AffinityMemory`]: conversation key → endpoint, learned from every
//!   choice, so degraded decisions keep conversations where they were, and
//!   offered to the control plane whenever a session opens, so a restarted
//!   control plane keeps them there too.
//!
//! The decision itself is [`policy::select_from_cluster_state`] over the last
//! `WatchUsage` snapshot plus the ledger's [`LocalUsage`] (leases this
//! sidecar granted itself and has not yet registered). Approximation,
//! documented: leases the control plane granted after the snapshot was
//! published (at most one `watch_interval` before it went away) are not
//! counted, and control-plane leases released during the outage still count
//! until the next snapshot. Both only err by a request or two per sidecar.
//!
//! [`policy::select_from_cluster_state`]: switchyard_control_plane::policy::select_from_cluster_state
//! [`LocalUsage`]: switchyard_control_plane::policy::LocalUsage

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use switchyard_control_plane::{
    api::AffinityRecord,
    decision::{Choice, ChooseRequest},
    policy::index_key,
};

/// Consecutive choose deadlines that open the circuit. One slow answer is
/// not an outage; a few in a row are.
pub(crate) const DEADLINE_MISSES_TO_OPEN: u32 = 3;

/// Why a decision was made locally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DegradeCause {
    /// The circuit is open: the control plane is known unreachable.
    CircuitOpen,
    /// No session yet (control plane never reached, or being re-opened).
    NoSession,
    /// The choose RPC did not answer within `choose_timeout`.
    Deadline,
    /// The choose RPC failed at the transport (connection refused, reset).
    Transport,
    /// The control plane no longer knows this sidecar's session.
    UnknownSession,
    /// The control plane answered something unusable (protocol error).
    BadAnswer,
}

impl DegradeCause {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::CircuitOpen => "control plane unreachable",
            Self::NoSession => "no control-plane session",
            Self::Deadline => "choose deadline exceeded",
            Self::Transport => "control plane transport error",
            Self::UnknownSession => "control-plane session unknown",
            Self::BadAnswer => "unusable control-plane answer",
        }
    }
}

/// Reachability of the control plane and degraded-mode accounting.
#[derive(Debug, Default)]
pub(crate) struct Circuit {
    /// Last contact succeeded. Starts false: nothing is known at start.
    reachable: AtomicBool,
    deadline_misses: AtomicU32,
    /// Inside a degraded stretch (for once-per-transition logging).
    degraded: AtomicBool,
    decisions: AtomicU64,
}

impl Circuit {
    /// True when the last contact with the control plane succeeded.
    pub(crate) fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Acquire)
    }

    /// A contact succeeded.
    pub(crate) fn up(&self) {
        self.deadline_misses.store(0, Ordering::Release);
        if !self.reachable.swap(true, Ordering::AcqRel) {
            tracing::info!("control plane reachable");
        }
    }

    /// A contact failed at the transport: open the circuit.
    pub(crate) fn down(&self, detail: &str) {
        if self.reachable.swap(false, Ordering::AcqRel) {
            tracing::warn!(detail, "control plane unreachable");
        }
    }

    /// A choice missed its deadline; true when that opened the circuit.
    pub(crate) fn deadline_missed(&self) -> bool {
        let misses = self.deadline_misses.fetch_add(1, Ordering::AcqRel) + 1;
        if misses >= DEADLINE_MISSES_TO_OPEN {
            self.down("choose deadline exceeded repeatedly");
            true
        } else {
            false
        }
    }

    /// A choice answered in time.
    pub(crate) fn answered(&self) {
        self.deadline_misses.store(0, Ordering::Release);
        if self.degraded.swap(false, Ordering::AcqRel) {
            tracing::info!(
                degraded_decisions_total = self.decisions.load(Ordering::Relaxed),
                "control plane answering again; leaving degraded mode"
            );
        }
    }

    /// A lease was granted locally.
    pub(crate) fn degraded_decision(&self, cause: DegradeCause) {
        self.decisions.fetch_add(1, Ordering::Relaxed);
        if !self.degraded.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                cause = cause.as_str(),
                "routing in degraded mode: deciding locally from the last cluster state"
            );
        }
    }

    /// Leases granted locally since start.
    pub(crate) fn degraded_decisions(&self) -> u64 {
        self.decisions.load(Ordering::Relaxed)
    }
}

/// One remembered conversation.
#[derive(Debug)]
struct Remembered {
    model: String,
    tracking_model: Arc<str>,
    endpoint: Arc<str>,
    expires: Instant,
}

/// Conversation key → endpoint, bounded: expired entries go first, then
/// the tenth closest to expiry (amortised, no scan per insert).
#[derive(Debug)]
pub(crate) struct AffinityMemory {
    ttl: Duration,
    max_entries: usize,
    entries: Mutex<HashMap<String, Remembered>>,
}

impl AffinityMemory {
    pub(crate) fn new(ttl: Duration, max_entries: usize) -> Self {
        Self {
            ttl,
            max_entries: max_entries.max(1),
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Remembers where a request with an affinity key went.
    pub(crate) fn remember(&self, req: &ChooseRequest, choice: &Choice, now: Instant) {
        if let Some(key) = req.affinity_key.as_deref() {
            self.remember_key(key, &req.model, choice, now);
        }
    }

    /// Remembers that conversation `key` (for `model` as the client names
    /// it) is on `choice`'s endpoint.
    pub(crate) fn remember_key(&self, key: &str, model: &str, choice: &Choice, now: Instant) {
        let mut entries = self.entries.lock();
        if entries.len() >= self.max_entries && !entries.contains_key(key) {
            entries.retain(|_, e| e.expires > now);
            if entries.len() >= self.max_entries {
                let mut by_expiry: Vec<(Instant, String)> = entries
                    .iter()
                    .map(|(k, e)| (e.expires, k.clone()))
                    .collect();
                by_expiry.sort_unstable();
                let evict = (self.max_entries / 10).max(1);
                for (_, k) in by_expiry.into_iter().take(evict) {
                    entries.remove(&k);
                }
            }
        }
        entries.insert(
            key.to_owned(),
            Remembered {
                model: index_key(model).to_owned(),
                tracking_model: choice.tracking_model.clone(),
                endpoint: choice.endpoint.clone(),
                expires: now + self.ttl,
            },
        );
    }

    /// The endpoint this request's conversation last went to, if it is for
    /// the same model and not expired.
    pub(crate) fn lookup(&self, req: &ChooseRequest, now: Instant) -> Option<Arc<str>> {
        let key = req.affinity_key.as_deref()?;
        let entries = self.entries.lock();
        let e = entries.get(key)?;
        (e.expires > now && e.model == index_key(&req.model)).then(|| e.endpoint.clone())
    }

    /// Every live entry, as the control plane takes them back
    /// (`RegisterLeases.affinity`).
    pub(crate) fn records(&self, now: Instant) -> Vec<AffinityRecord> {
        self.entries
            .lock()
            .iter()
            .filter(|(_, e)| e.expires > now)
            .map(|(key, e)| AffinityRecord {
                key: Arc::from(key.as_str()),
                endpoint: e.endpoint.clone(),
                tracking_model: e.tracking_model.clone(),
                expires_in: e.expires - now,
            })
            .collect()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.lock().len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use switchyard_control_plane::outcome::RequestKind;

    use super::*;
    use crate::router::lease::tests::choice;

    fn req(model: &str, key: Option<&str>) -> ChooseRequest {
        ChooseRequest {
            model: model.into(),
            affinity_key: key.map(str::to_owned),
            affinity_required: false,
            kind: RequestKind::Chat,
            exclude: vec![],
        }
    }

    #[test]
    fn circuit_opens_on_transport_or_repeated_deadlines() {
        let c = Circuit::default();
        assert!(!c.reachable());
        c.up();
        assert!(c.reachable());
        assert!(!c.deadline_missed());
        assert!(!c.deadline_missed());
        c.answered();
        assert!(!c.deadline_missed());
        assert!(!c.deadline_missed());
        assert!(c.deadline_missed());
        assert!(!c.reachable());
        c.up();
        c.down("refused");
        assert!(!c.reachable());
        c.degraded_decision(DegradeCause::CircuitOpen);
        c.degraded_decision(DegradeCause::CircuitOpen);
        assert_eq!(c.degraded_decisions(), 2);
    }

    #[test]
    fn affinity_memory_matches_key_and_model_and_expires() {
        let m = AffinityMemory::new(Duration::from_secs(10), 100);
        let now = Instant::now();
        m.remember(&req("llama3", Some("k")), &choice("http://a:1"), now);
        m.remember(&req("llama3", None), &choice("http://b:1"), now);
        assert_eq!(m.len(), 1);
        assert_eq!(
            m.lookup(&req("llama3:latest", Some("k")), now).as_deref(),
            Some("http://a:1")
        );
        assert_eq!(m.lookup(&req("qwen", Some("k")), now), None);
        assert_eq!(m.lookup(&req("llama3", Some("other")), now), None);
        assert_eq!(
            m.lookup(&req("llama3", Some("k")), now + Duration::from_secs(11)),
            None
        );
    }

    #[test]
    fn affinity_memory_offers_its_live_entries_with_their_remaining_time() {
        let m = AffinityMemory::new(Duration::from_secs(10), 100);
        let now = Instant::now();
        m.remember(&req("m", Some("old")), &choice("http://a:1"), now);
        let later = now + Duration::from_secs(4);
        m.remember(&req("m", Some("new")), &choice("http://b:1"), later);
        let mut records = m.records(later);
        records.sort_by(|a, b| a.key.cmp(&b.key));
        let tracking = choice("http://a:1").tracking_model;
        assert_eq!(
            records,
            [
                AffinityRecord {
                    key: Arc::from("new"),
                    endpoint: Arc::from("http://b:1"),
                    tracking_model: tracking.clone(),
                    expires_in: Duration::from_secs(10),
                },
                AffinityRecord {
                    key: Arc::from("old"),
                    endpoint: Arc::from("http://a:1"),
                    tracking_model: tracking,
                    expires_in: Duration::from_secs(6),
                },
            ]
        );
        let keys: Vec<_> = m
            .records(now + Duration::from_secs(12))
            .into_iter()
            .map(|r| r.key)
            .collect();
        assert_eq!(keys, [Arc::<str>::from("new")], "expired entries stay home");
    }

    #[test]
    fn affinity_memory_is_bounded() {
        let m = AffinityMemory::new(Duration::from_secs(10), 20);
        let start = Instant::now();
        for i in 0..100u64 {
            let key = format!("k{i}");
            m.remember(
                &req("m", Some(&key)),
                &choice("http://a:1"),
                start + Duration::from_millis(i),
            );
            assert!(m.len() <= 20);
        }
        // The newest entry survives eviction.
        let newest = start + Duration::from_millis(99);
        assert!(m.lookup(&req("m", Some("k99")), newest).is_some());
        assert!(m.lookup(&req("m", Some("k0")), newest).is_none());
    }
}
