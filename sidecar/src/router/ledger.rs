//! The remote router's ledger: every lease this sidecar holds, which
//! control-plane session counts it, and the releases owed to the control
//! plane. One short `parking_lot` lock, never held across `.await`.
//!
//! Sessions are numbered by a local *generation* that grows with every
//! session opened. Each held lease records the generation whose session
//! counts it (`counted_in`): the one it was granted under, the one it was
//! re-registered under, or none (granted locally in degraded mode and not
//! registered yet). A new generation is only opened after the control plane
//! said the previous session is unknown, so a lease counted only by an older
//! generation is counted by nobody and must be registered again.
//!
//! Exactly-once release at the control plane:
//! - a lease counted by the current session gets one `Release`;
//! - a lease counted by nobody (degraded and unregistered, or its session is
//!   gone) gets none — it is forgotten locally;
//! - a lease released while a `RegisterLeases` call carrying it is in
//!   flight is *deferred*: its `Release` is queued only after the
//!   registration answered, so it cannot overtake the registration and
//!   leave the lease counted forever (`Release` is idempotent, so a deferred
//!   release of a lease the registration did not reach is harmless).
//!
//! Queued releases carry the generation they were owed to; the sender drops
//! one whose generation was superseded (that session, and its leases, are
//! gone at the control plane).

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use parking_lot::Mutex;
use switchyard_control_plane::{
    api::LeaseRecord,
    decision::Choice,
    ids::{IdAllocator, LeaseId, SessionId},
    outcome::{Outcome, TokenCounts},
    policy::LocalUsage,
};
use tokio::sync::{Notify, mpsc};

use super::lease::ReleaseSink;

/// A `Release` owed to the control plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ReleaseJob {
    pub(crate) lease: LeaseId,
    pub(crate) outcome: Outcome,
    pub(crate) tokens: TokenCounts,
    /// Session generation that counts the lease.
    pub(crate) generation: u64,
}

#[derive(Debug)]
struct Held {
    record: LeaseRecord,
    /// Generation of the session that counts this lease, if any.
    counted_in: Option<u64>,
    /// Counted in `Book::local` (granted locally, not registered yet).
    local: bool,
}

#[derive(Debug, Default)]
struct Book {
    session: Option<SessionId>,
    generation: u64,
    held: HashMap<LeaseId, Held>,
    /// In-flight counts of `held` leases with `local == true`.
    local: LocalUsage,
    /// Leases carried by the `RegisterLeases` call in flight.
    registering: Option<HashSet<LeaseId>>,
    /// Releases of `registering` leases, queued when it answers.
    deferred: Vec<ReleaseJob>,
}

/// What one registration round must send.
#[derive(Debug)]
pub(crate) struct Registration {
    pub(crate) session: SessionId,
    pub(crate) generation: u64,
    pub(crate) leases: Vec<LeaseRecord>,
}

/// The ledger (see the module docs). It is also the [`ReleaseSink`] of every
/// remote lease.
pub(crate) struct Ledger {
    book: Mutex<Book>,
    queue: mpsc::UnboundedSender<ReleaseJob>,
    /// Releases queued and not yet done by the sender.
    pending: AtomicUsize,
    drained: Notify,
    /// Ids for leases granted locally (tagged: never collide with the
    /// control plane's).
    local_ids: IdAllocator,
}

impl Ledger {
    /// A ledger whose releases go to `queue`.
    pub(crate) fn new(queue: mpsc::UnboundedSender<ReleaseJob>) -> Self {
        Self {
            book: Mutex::new(Book::default()),
            queue,
            pending: AtomicUsize::new(0),
            drained: Notify::new(),
            local_ids: IdAllocator::new(true),
        }
    }

    /// The current session and its generation.
    pub(crate) fn session(&self) -> Option<(SessionId, u64)> {
        let book = self.book.lock();
        book.session.map(|s| (s, book.generation))
    }

    /// Records a newly opened session; returns its generation.
    pub(crate) fn open_session(&self, id: SessionId) -> u64 {
        let mut book = self.book.lock();
        book.generation += 1;
        book.session = Some(id);
        book.generation
    }

    /// Forgets `stale` as the current session (it is unknown at the control
    /// plane); true if it was current.
    pub(crate) fn drop_session(&self, stale: SessionId) -> bool {
        let mut book = self.book.lock();
        if book.session == Some(stale) {
            book.session = None;
            true
        } else {
            false
        }
    }

    /// Makes `id` current again if no session is (without a new
    /// generation: the same session still counts the same leases).
    pub(crate) fn restore_session(&self, id: SessionId) {
        let mut book = self.book.lock();
        if book.session.is_none() {
            book.session = Some(id);
        }
    }

    /// Takes the current session for closing; later choices go local.
    pub(crate) fn take_session(&self) -> Option<SessionId> {
        self.book.lock().session.take()
    }

    /// True while `generation` is the newest session generation.
    pub(crate) fn is_current(&self, generation: u64) -> bool {
        self.book.lock().generation == generation
    }

    /// Records a lease the control plane granted under `generation`.
    pub(crate) fn insert_granted(&self, id: LeaseId, choice: &Choice, generation: u64) {
        self.book.lock().held.insert(
            id,
            Held {
                record: record(id, choice),
                counted_in: Some(generation),
                local: false,
            },
        );
    }

    /// Decides locally and records the lease in one critical section, so
    /// concurrent degraded decisions see each other's leases.
    pub(crate) fn grant_local<E>(
        &self,
        decide: impl FnOnce(&LocalUsage) -> Result<Choice, E>,
    ) -> Result<(Choice, LeaseId), E> {
        let mut book = self.book.lock();
        let choice = decide(&book.local)?;
        let id = LeaseId(self.local_ids.next());
        book.local.add(&choice.endpoint, &choice.tracking_model, 1);
        book.held.insert(
            id,
            Held {
                record: record(id, &choice),
                counted_in: None,
                local: true,
            },
        );
        Ok((choice, id))
    }

    /// Releases a lease the control plane granted but this sidecar never
    /// used (its answer came after the choose deadline).
    pub(crate) fn release_orphan(&self, lease: LeaseId, generation: u64) {
        self.enqueue(ReleaseJob {
            lease,
            outcome: Outcome::Cancelled,
            tokens: TokenCounts::default(),
            generation,
        });
    }

    /// Leases held and not yet released.
    pub(crate) fn held(&self) -> usize {
        self.book.lock().held.len()
    }

    /// True when some held lease is not counted by the current session.
    #[cfg(test)]
    pub(crate) fn needs_registration(&self) -> bool {
        let book = self.book.lock();
        book.session.is_some()
            && book.registering.is_none()
            && book
                .held
                .values()
                .any(|h| h.counted_in != Some(book.generation))
    }

    /// Starts a registration round for every held lease the current session
    /// does not count. `None` when there is nothing to do.
    pub(crate) fn begin_registration(&self) -> Option<Registration> {
        let mut book = self.book.lock();
        let session = book.session?;
        if book.registering.is_some() {
            return None;
        }
        let generation = book.generation;
        let leases: Vec<LeaseRecord> = book
            .held
            .values()
            .filter(|h| h.counted_in != Some(generation))
            .map(|h| h.record.clone())
            .collect();
        if leases.is_empty() {
            return None;
        }
        book.registering = Some(leases.iter().map(|l| l.lease).collect());
        Some(Registration {
            session,
            generation,
            leases,
        })
    }

    /// Ends a registration round. `registered`: the control plane counted
    /// the leases (an error leaves them for the next round). Deferred
    /// releases are queued either way: after a failed round the control plane
    /// may or may not count them, and `Release` is idempotent.
    pub(crate) fn finish_registration(&self, round: &Registration, registered: bool) {
        let deferred = {
            let mut book = self.book.lock();
            let ids = book.registering.take().unwrap_or_default();
            if registered {
                let Book { held, local, .. } = &mut *book;
                for id in &ids {
                    if let Some(h) = held.get_mut(id) {
                        if h.local {
                            local.add(&h.record.endpoint, &h.record.tracking_model, -1);
                            h.local = false;
                        }
                        h.counted_in = Some(round.generation);
                    }
                }
            }
            std::mem::take(&mut book.deferred)
        };
        for mut job in deferred {
            job.generation = round.generation;
            self.enqueue(job);
        }
    }

    fn enqueue(&self, job: ReleaseJob) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        if self.queue.send(job).is_err() {
            // The sender stopped (shutdown): the session close or expiry
            // ends the lease at the control plane.
            self.job_done();
        }
    }

    /// The sender finished one job (acknowledged, refused or abandoned).
    pub(crate) fn job_done(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.drained.notify_waiters();
        }
    }

    /// Waits until every queued release is done.
    pub(crate) async fn drained(&self) {
        loop {
            let notified = self.drained.notified();
            if self.pending.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    #[cfg(test)]
    pub(crate) fn local_usage(&self, endpoint: &str, model: &str) -> i64 {
        self.book.lock().local.get(endpoint, model)
    }
}

impl ReleaseSink for Ledger {
    fn release(&self, id: LeaseId, outcome: Outcome, tokens: TokenCounts) {
        let job = {
            let mut book = self.book.lock();
            let Some(h) = book.held.remove(&id) else {
                return;
            };
            if h.local {
                book.local
                    .add(&h.record.endpoint, &h.record.tracking_model, -1);
            }
            let generation = book.generation;
            let job = ReleaseJob {
                lease: id,
                outcome,
                tokens,
                generation,
            };
            if book.registering.as_ref().is_some_and(|r| r.contains(&id)) {
                book.deferred.push(job);
                return;
            }
            match h.counted_in {
                Some(g) if g == generation => job,
                // Counted by nobody: never registered, or its session is
                // gone at the control plane (and the lease with it).
                _ => return,
            }
        };
        self.enqueue(job);
    }
}

fn record(id: LeaseId, choice: &Choice) -> LeaseRecord {
    LeaseRecord {
        lease: id,
        endpoint: choice.endpoint.clone(),
        tracking_model: choice.tracking_model.clone(),
    }
}

/// The sink handle leases hold.
pub(crate) fn sink(ledger: &Arc<Ledger>) -> Arc<dyn ReleaseSink> {
    ledger.clone()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::router::lease::{Lease, tests::choice};

    fn ledger() -> (Arc<Ledger>, mpsc::UnboundedReceiver<ReleaseJob>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Arc::new(Ledger::new(tx)), rx)
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<ReleaseJob>) -> Vec<ReleaseJob> {
        let mut out = Vec::new();
        while let Ok(j) = rx.try_recv() {
            out.push(j);
        }
        out
    }

    fn local_lease(l: &Arc<Ledger>, ep: &str) -> Lease {
        let (c, id) = l.grant_local(|_| Ok::<_, ()>(choice(ep))).unwrap();
        Lease::new(c, id, true, sink(l))
    }

    #[test]
    fn granted_lease_is_released_once_under_its_session() {
        let (l, mut rx) = ledger();
        let g = l.open_session(SessionId(1));
        l.insert_granted(LeaseId(5), &choice("http://a:1"), g);
        let lease = Lease::new(choice("http://a:1"), LeaseId(5), false, sink(&l));
        assert!(!l.needs_registration());
        lease.finish(Outcome::Ok, TokenCounts::default());
        let jobs = drain(&mut rx);
        assert_eq!(jobs.len(), 1);
        assert_eq!((jobs[0].lease, jobs[0].generation), (LeaseId(5), g));
        assert_eq!(l.held(), 0);
    }

    #[test]
    fn unregistered_local_lease_is_forgotten_not_sent() {
        let (l, mut rx) = ledger();
        let lease = local_lease(&l, "http://a:1");
        assert!(lease.id().0 & (1 << 63) != 0, "local ids are tagged");
        assert_eq!(l.local_usage("http://a:1", "m:latest"), 1);
        drop(lease);
        assert_eq!(l.local_usage("http://a:1", "m:latest"), 0);
        assert!(drain(&mut rx).is_empty());
        assert_eq!(l.held(), 0);
    }

    #[test]
    fn registration_counts_local_and_stale_leases_then_releases_normally() {
        let (l, mut rx) = ledger();
        let g1 = l.open_session(SessionId(1));
        l.insert_granted(LeaseId(5), &choice("http://a:1"), g1);
        let granted = Lease::new(choice("http://a:1"), LeaseId(5), false, sink(&l));
        let local = local_lease(&l, "http://b:1");
        // Control plane restarted: a new session must count both.
        assert!(l.drop_session(SessionId(1)));
        assert!(
            l.begin_registration().is_none(),
            "no session, nothing to do"
        );
        let g2 = l.open_session(SessionId(2));
        assert!(l.needs_registration());
        let round = l.begin_registration().unwrap();
        assert_eq!(round.session, SessionId(2));
        assert_eq!(round.leases.len(), 2);
        l.finish_registration(&round, true);
        assert!(!l.needs_registration());
        assert_eq!(l.local_usage("http://b:1", "m:latest"), 0);
        drop(granted);
        drop(local);
        let jobs = drain(&mut rx);
        assert_eq!(jobs.len(), 2);
        assert!(jobs.iter().all(|j| j.generation == g2));
    }

    #[test]
    fn release_during_registration_is_deferred_until_it_answers() {
        let (l, mut rx) = ledger();
        l.open_session(SessionId(1));
        let local = local_lease(&l, "http://a:1");
        let round = l.begin_registration().unwrap();
        drop(local);
        assert!(
            drain(&mut rx).is_empty(),
            "must not overtake the registration"
        );
        l.finish_registration(&round, true);
        let jobs = drain(&mut rx);
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].outcome, Outcome::Cancelled);
        assert_eq!(jobs[0].generation, round.generation);
        assert_eq!(l.held(), 0);
    }

    #[test]
    fn lease_of_a_gone_session_released_before_reregistration_is_dropped() {
        let (l, mut rx) = ledger();
        let g1 = l.open_session(SessionId(1));
        l.insert_granted(LeaseId(5), &choice("http://a:1"), g1);
        let granted = Lease::new(choice("http://a:1"), LeaseId(5), false, sink(&l));
        l.drop_session(SessionId(1));
        let g2 = l.open_session(SessionId(2));
        assert!(!l.is_current(g1) && l.is_current(g2));
        drop(granted);
        assert!(drain(&mut rx).is_empty());
        assert!(l.begin_registration().is_none());
    }

    #[tokio::test]
    async fn drained_waits_for_pending_jobs() {
        let (l, mut rx) = ledger();
        l.drained().await;
        let g = l.open_session(SessionId(1));
        l.release_orphan(LeaseId(9), g);
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move { l.drained().await })
        };
        assert_eq!(rx.recv().await.map(|j| j.lease), Some(LeaseId(9)));
        l.job_done();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
