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
//!
//! Where an owed release goes ([`Ledger::enqueue`]):
//! - **fast path**: while the remote router's `Route` stream (the shared
//!   [`RouteSlot`]) is open and coalescing, the release is queued on it
//!   synchronously, right where the lease ends, with the ledger itself as
//!   its [`ReleaseListener`] (tag: the generation). No channel hop, no task
//!   wake-up, no future or allocation per release: it rides on the next
//!   choose written (or goes out after the ~5 ms linger; at once when it
//!   reports a backend failure or a missing model, or is urgent:
//!   [`ReleaseJob::urgent`]), and the stream's reader reports the
//!   acknowledgement here — and to whoever waits for it
//!   ([`ReleaseSink::release_applied`]);
//! - **retry path**: otherwise — and whenever the stream reports a
//!   transport failure (it ended, or the client went away, before the ack;
//!   or the control plane turned out not to apply coalesced releases) — the
//!   job goes on the channel to the remote router's release sender, which
//!   retries with backoff (stream or unary) until acknowledged or until its
//!   generation is superseded.
//!
//! A release refused as malformed (`INVALID_ARGUMENT`, any other
//! non-transport status) is dropped with a warning on both paths.
//! [`Ledger::drained`] counts both: a job is pending from the moment it is
//! owed until it is acknowledged, refused or abandoned, whichever path it
//! took (a fast-path failure keeps it pending while it moves to the retry
//! path).
//!
//! Unlike the retry path, the fast path has no per-release deadline: a
//! stream that stays open but never answers keeps its releases until the
//! connection's HTTP/2 keep-alive fails it (then they take the retry path);
//! [`Ledger::drained`] is bounded by its callers. While releases wait on
//! the stream, the stream's client holds the ledger (as their listener) and
//! the ledger's slot holds the client: that cycle ends with their report.
//!
//! Lock order: the book lock is never held while queueing; the route slot's
//! lock is held while queueing on the stream (slot, then the client's own
//! lock — the order `remote::route_client` takes them in too). Listener
//! reports run outside the client's locks and take neither.

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
    cores::CoreRuntimes,
    decision::Choice,
    grpc::{
        convert::ReleaseCall,
        route_stream::{ReleaseListener, RouteClient},
    },
    ids::{IdAllocator, LeaseId, SessionId},
    outcome::{Outcome, TokenCounts},
    policy::LocalUsage,
};
use switchyard_proto::v1;
use tokio::sync::{Notify, mpsc, oneshot};
use tonic::Status;

use super::{
    lease::{Applied, ReleaseSink},
    remote::is_transport,
};

/// One lane's current `Route` stream, shared with the ledger: the remote
/// router opens and replaces it, the ledger queues releases on it. `None`
/// (or a closed client) means the retry path.
pub(crate) type RouteSlot = Mutex<Option<Arc<RouteClient>>>;

/// The lane the calling thread uses, out of `lanes`: its server thread's
/// index ([`CoreRuntimes::current`]), or lane 0 on any other thread.
pub(crate) fn current_lane(lanes: usize) -> usize {
    CoreRuntimes::current().map_or(0, |i| i % lanes.max(1))
}

/// A `Release` owed to the control plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ReleaseJob {
    pub(crate) lease: LeaseId,
    pub(crate) outcome: Outcome,
    pub(crate) tokens: TokenCounts,
    /// Session generation that counts the lease.
    pub(crate) generation: u64,
    /// Send without waiting for a choose to ride on: the lease held its
    /// endpoint's last slot for the model ([`Choice::at_limit`]), or nobody
    /// used it (a late grant), or it is being sent again. See
    /// [`RouteClient::queue_release`].
    pub(crate) urgent: bool,
}

impl ReleaseJob {
    fn message(&self) -> v1::ReleaseRequest {
        v1::ReleaseRequest::from(&ReleaseCall {
            lease: self.lease,
            outcome: self.outcome,
            tokens: self.tokens,
        })
    }
}

#[derive(Debug)]
struct Held {
    record: LeaseRecord,
    /// Generation of the session that counts this lease, if any.
    counted_in: Option<u64>,
    /// Counted in `Book::local` (granted locally, not registered yet).
    local: bool,
    /// The control plane said the lease took its endpoint's last slot for
    /// the model ([`Choice::at_limit`]): its release goes at once.
    at_limit: bool,
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
    /// The fast path (see the module docs): each lane's stream, used by
    /// the releases of requests served on that lane's thread.
    routes: Box<[Arc<RouteSlot>]>,
    /// The retry path: to the remote router's release sender.
    queue: mpsc::UnboundedSender<ReleaseJob>,
    /// Releases owed and not yet done (acknowledged, refused or abandoned),
    /// on either path.
    pending: AtomicUsize,
    drained: Notify,
    /// Ids for leases granted locally (tagged: never collide with the
    /// control plane's).
    local_ids: IdAllocator,
    /// Who waits for the control plane to apply a release
    /// ([`ReleaseSink::release_applied`]), by lease; and how many, so the
    /// acknowledgement of every other release skips the lock.
    applied_waiters: Mutex<HashMap<LeaseId, oneshot::Sender<()>>>,
    waiting: AtomicUsize,
}

impl Ledger {
    /// A ledger whose releases go on the stream in the releasing thread's
    /// lane of `routes` when it is open and coalescing, to `queue`
    /// otherwise.
    pub(crate) fn new(
        queue: mpsc::UnboundedSender<ReleaseJob>,
        routes: Vec<Arc<RouteSlot>>,
    ) -> Self {
        let routes = if routes.is_empty() {
            vec![Arc::default()]
        } else {
            routes
        };
        Self {
            book: Mutex::new(Book::default()),
            routes: routes.into_boxed_slice(),
            queue,
            pending: AtomicUsize::new(0),
            drained: Notify::new(),
            local_ids: IdAllocator::new(true),
            applied_waiters: Mutex::new(HashMap::new()),
            waiting: AtomicUsize::new(0),
        }
    }

    /// The release of `lease` ended: applied by the control plane (its
    /// waiter hears so), or refused or abandoned (its waiter's sender is
    /// dropped: unknown).
    pub(crate) fn release_settled(&self, lease: LeaseId, applied: bool) {
        if self.waiting.load(Ordering::Acquire) == 0 {
            return;
        }
        let Some(waiter) = self.applied_waiters.lock().remove(&lease) else {
            return;
        };
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        if applied {
            let _gone = waiter.send(());
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
                at_limit: choice.at_limit,
            },
        );
    }

    /// Decides locally and records the lease in one critical section, so
    /// concurrent degraded decisions see each other's leases. `decide` gets
    /// the leases the state it decides on does not count: those granted
    /// locally and not registered (a control-plane state), or every lease
    /// held (`count_all`: a state of the sidecar's own probes, which counts
    /// none).
    pub(crate) fn grant_local<E>(
        &self,
        count_all: bool,
        decide: impl FnOnce(&LocalUsage) -> Result<Choice, E>,
    ) -> Result<(Choice, LeaseId), E> {
        let mut book = self.book.lock();
        let choice = if count_all {
            let mut all = LocalUsage::default();
            for held in book.held.values() {
                all.add(&held.record.endpoint, &held.record.tracking_model, 1);
            }
            decide(&all)?
        } else {
            decide(&book.local)?
        };
        let id = LeaseId(self.local_ids.next());
        book.local.add(&choice.endpoint, &choice.tracking_model, 1);
        book.held.insert(
            id,
            Held {
                record: record(id, &choice),
                counted_in: None,
                local: true,
                at_limit: false,
            },
        );
        Ok((choice, id))
    }

    /// Releases a lease the control plane granted but this sidecar never
    /// used (its answer came after the choose deadline).
    pub(crate) fn release_orphan(self: &Arc<Self>, lease: LeaseId, generation: u64) {
        self.enqueue(ReleaseJob {
            lease,
            outcome: Outcome::Cancelled,
            tokens: TokenCounts::default(),
            generation,
            // Counted for nothing: gone from the control plane's counts
            // as soon as possible.
            urgent: true,
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
    pub(crate) fn finish_registration(self: &Arc<Self>, round: &Registration, registered: bool) {
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

    /// Owes `job`: on the open `Route` stream when there is one that
    /// coalesces (the fast path), else to the release sender.
    fn enqueue(self: &Arc<Self>, job: ReleaseJob) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        {
            let route = self.routes[current_lane(self.routes.len())].lock();
            if let Some(route) = &*route
                && route
                    .queue_release_to(job.message(), job.urgent, self, job.generation)
                    .is_ok()
            {
                return;
            }
        }
        self.to_sender(job);
    }

    /// Owes `job` without a reference to hand on: the retry path only.
    fn enqueue_to_sender(&self, job: ReleaseJob) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        self.to_sender(job);
    }

    /// Hands a pending job to the release sender (the retry path).
    fn to_sender(&self, job: ReleaseJob) {
        if let Err(mpsc::error::SendError(job)) = self.queue.send(job) {
            // The sender stopped (shutdown): the session close or expiry
            // ends the lease at the control plane.
            self.release_settled(job.lease, false);
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
        if let Some(job) = self.owe(id, outcome, tokens) {
            self.enqueue_to_sender(job);
        }
    }

    fn release_owned(self: Arc<Self>, id: LeaseId, outcome: Outcome, tokens: TokenCounts) {
        if let Some(job) = self.owe(id, outcome, tokens) {
            self.enqueue(job);
        }
    }

    fn release_applied(
        self: Arc<Self>,
        id: LeaseId,
        outcome: Outcome,
        tokens: TokenCounts,
    ) -> Option<Applied> {
        let mut job = self.owe(id, outcome, tokens)?;
        // The caller waits for it: no ride on a later choose.
        job.urgent = true;
        let (waiter, applied) = oneshot::channel();
        // Registered before the release can be acknowledged.
        if self.applied_waiters.lock().insert(id, waiter).is_none() {
            self.waiting.fetch_add(1, Ordering::AcqRel);
        }
        self.enqueue(job);
        Some(applied)
    }
}

/// Reports of the releases queued on the `Route` stream (the fast path).
impl ReleaseListener for Ledger {
    fn settled(&self, release: v1::ReleaseRequest, generation: u64, result: Result<(), &Status>) {
        let lease = LeaseId(release.lease_id);
        let status = match result {
            Ok(()) => {
                self.release_settled(lease, true);
                return self.job_done();
            }
            Err(status) => status,
        };
        let call = match ReleaseCall::try_from(release) {
            Ok(call) => call,
            Err(e) => {
                // Built from a ReleaseJob, so it converts back; if it ever
                // did not, the session's end still ends the lease.
                tracing::error!(error = %e, "queued release does not convert back; dropped");
                self.release_settled(lease, false);
                return self.job_done();
            }
        };
        if is_transport(status.code()) {
            // Not acknowledged: the retry path sends it again (releases are
            // idempotent if it was applied after all). Still pending.
            tracing::debug!(lease = %call.lease, code = ?status.code(), "release not acknowledged on the stream; retrying");
            self.to_sender(ReleaseJob {
                lease: call.lease,
                outcome: call.outcome,
                tokens: call.tokens,
                generation,
                // Late already: resent without waiting for a ride.
                urgent: true,
            });
        } else {
            tracing::warn!(lease = %call.lease, code = ?status.code(), message = status.message(), "release refused; dropped");
            self.release_settled(call.lease, false);
            self.job_done();
        }
    }
}

impl Ledger {
    /// Takes lease `id` off the book; the release to send, if the current
    /// session counts it (see the module docs for the other cases).
    fn owe(&self, id: LeaseId, outcome: Outcome, tokens: TokenCounts) -> Option<ReleaseJob> {
        let mut book = self.book.lock();
        let h = book.held.remove(&id)?;
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
            urgent: h.at_limit,
        };
        if book.registering.as_ref().is_some_and(|r| r.contains(&id)) {
            book.deferred.push(job);
            return None;
        }
        match h.counted_in {
            Some(g) if g == generation => Some(job),
            // Counted by nobody: never registered, or its session is
            // gone at the control plane (and the lease with it).
            _ => None,
        }
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
        (Arc::new(Ledger::new(tx, vec![Arc::default()])), rx)
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<ReleaseJob>) -> Vec<ReleaseJob> {
        let mut out = Vec::new();
        while let Ok(j) = rx.try_recv() {
            out.push(j);
        }
        out
    }

    fn local_lease(l: &Arc<Ledger>, ep: &str) -> Lease {
        let (c, id) = l.grant_local(false, |_| Ok::<_, ()>(choice(ep))).unwrap();
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

    /// A lease that held its endpoint's last slot is released urgently,
    /// and its releaser hears when the control plane applied it (or, when
    /// it was refused or abandoned, that it will not hear).
    #[tokio::test]
    async fn the_release_of_a_lease_at_its_limit_is_urgent_and_heard() {
        let (l, mut rx) = ledger();
        let g = l.open_session(SessionId(1));
        let mut at_limit = choice("http://a:1");
        at_limit.at_limit = true;
        for (id, applied) in [(5, true), (6, false)] {
            l.insert_granted(LeaseId(id), &at_limit, g);
            let lease = Lease::new(at_limit.clone(), LeaseId(id), false, sink(&l));
            let waiter = lease
                .finish_applied(Outcome::Ok, TokenCounts::default())
                .unwrap();
            let jobs = drain(&mut rx);
            assert_eq!(jobs.len(), 1);
            assert!(jobs[0].urgent);
            l.release_settled(LeaseId(id), applied);
            assert_eq!(waiter.await.is_ok(), applied);
        }
        // An ordinary lease is not urgent, and nobody waits for it.
        l.insert_granted(LeaseId(7), &choice("http://a:1"), g);
        Lease::new(choice("http://a:1"), LeaseId(7), false, sink(&l))
            .finish(Outcome::Ok, TokenCounts::default());
        assert!(!drain(&mut rx)[0].urgent);
        assert_eq!(l.waiting.load(Ordering::Acquire), 0);
    }

    #[test]
    fn decisions_on_own_probes_count_every_held_lease() {
        let (l, _rx) = ledger();
        let g = l.open_session(SessionId(1));
        // Granted by the control plane, so counted in its states.
        l.insert_granted(LeaseId(5), &choice("http://a:1"), g);
        let _local = local_lease(&l, "http://a:1");
        let seen = |count_all: bool| {
            let mut n = 0;
            let (c, id) = l
                .grant_local(count_all, |usage| {
                    n = usage.get("http://a:1", "m:latest");
                    Ok::<_, ()>(choice("http://b:1"))
                })
                .unwrap();
            drop(Lease::new(c, id, true, sink(&l)));
            n
        };
        // On a control-plane state only the local lease is extra; on the
        // sidecar's own probes (which count nothing) both are.
        assert_eq!(seen(false), 1);
        assert_eq!(seen(true), 2);
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

    #[test]
    fn stream_reports_finish_the_job_or_hand_it_to_the_sender() {
        use futures::FutureExt;

        let (l, mut rx) = ledger();
        let g = l.open_session(SessionId(1));
        // No stream in the slot: owed releases go to the sender. Taken off
        // its queue here to play the stream's reports on them.
        l.release_orphan(LeaseId(9), g);
        let job = drain(&mut rx).pop().unwrap();
        assert!(l.drained().now_or_never().is_none());

        // Not acknowledged (stream gone): the same job goes to the sender,
        // still pending.
        l.settled(job.message(), g, Err(&Status::unavailable("stream gone")));
        assert_eq!(drain(&mut rx), vec![job]);
        assert!(l.drained().now_or_never().is_none());

        // Refused as malformed: dropped (with a warning), done.
        l.settled(
            job.message(),
            g,
            Err(&Status::invalid_argument("malformed coalesced releases")),
        );
        assert!(drain(&mut rx).is_empty());
        assert!(l.drained().now_or_never().is_some());

        // Acknowledged: done.
        l.release_orphan(LeaseId(10), g);
        let job = drain(&mut rx).pop().unwrap();
        l.settled(job.message(), g, Ok(()));
        assert!(drain(&mut rx).is_empty());
        assert!(l.drained().now_or_never().is_some());
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
