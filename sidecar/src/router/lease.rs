//! The lease guard: one held reservation, released exactly once.
//!
//! Invariant: a [`Lease`] reaches its [`ReleaseSink`] exactly once — through
//! [`Lease::finish`] (which consumes it) or, if it is dropped unfinished
//! (client gone, early return, panic unwinding, task aborted), through `Drop`
//! with [`Outcome::Cancelled`]. The sink call is synchronous and never
//! blocks on the network: the embedded router calls the in-process control
//! plane (one short lock), the remote router updates its ledger and queues
//! the `Release` on its `Route` stream (or, without one, to a background
//! sender).

use std::{fmt, sync::Arc};

use switchyard_control_plane::{
    decision::Choice,
    ids::LeaseId,
    outcome::{Outcome, TokenCounts},
};

/// Where a lease goes when it ends. Implementations must not block and must
/// not panic: `release` runs inside `Drop`, possibly while unwinding.
pub(crate) trait ReleaseSink: Send + Sync {
    /// Ends lease `id` with `outcome`. Called exactly once per lease.
    fn release(&self, id: LeaseId, outcome: Outcome, tokens: TokenCounts);

    /// [`ReleaseSink::release`] given the handle the lease held, which is
    /// what a [`Lease`] calls: a sink that must hand itself on (the remote
    /// ledger lends itself to the `Route` stream as the listener of the
    /// release) gets its `Arc` without a self-reference of its own.
    fn release_owned(self: Arc<Self>, id: LeaseId, outcome: Outcome, tokens: TokenCounts) {
        self.release(id, outcome, tokens);
    }

    /// [`ReleaseSink::release_owned`], and what resolves once the control
    /// plane applied the release: `None` when there is nothing to wait for
    /// (a control plane in the same process applied it already; or the
    /// release is owed to no one). A sender dropped unsent means unknown.
    fn release_applied(
        self: Arc<Self>,
        id: LeaseId,
        outcome: Outcome,
        tokens: TokenCounts,
    ) -> Option<Applied> {
        self.release_owned(id, outcome, tokens);
        None
    }
}

/// Resolves when the control plane applied a release
/// ([`Lease::finish_applied`]).
pub(crate) type Applied = tokio::sync::oneshot::Receiver<()>;

/// A held lease. Exactly-once release: [`finish`](Self::finish) consumes
/// it; dropping it unfinished (client disconnect, panic unwinding, early
/// return) releases with [`Outcome::Cancelled`]. Release is non-blocking
/// (remote: queued on the `Route` stream, or to a background sender that
/// retries until the control plane acknowledges or the session is gone).
#[must_use = "dropping a lease releases it at once as cancelled"]
pub struct Lease {
    choice: Choice,
    id: LeaseId,
    degraded: bool,
    /// `Some` until released; taking it is what makes release exactly-once.
    sink: Option<Arc<dyn ReleaseSink>>,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("id", &self.id)
            .field("endpoint", &self.choice.endpoint)
            .field("tracking_model", &self.choice.tracking_model)
            .field("degraded", &self.degraded)
            .field("held", &self.sink.is_some())
            .finish()
    }
}

impl Lease {
    /// A lease `id` for `choice` (whose `lease` field is set to `id`).
    pub(crate) fn new(
        mut choice: Choice,
        id: LeaseId,
        degraded: bool,
        sink: Arc<dyn ReleaseSink>,
    ) -> Self {
        choice.lease = Some(id);
        Self {
            choice,
            id,
            degraded,
            sink: Some(sink),
        }
    }

    /// The routing decision this lease was taken for (`choice().lease` is
    /// the lease id).
    pub fn choice(&self) -> &Choice {
        &self.choice
    }

    /// The lease id (granted by the control plane, or by this sidecar in
    /// degraded mode — those ids have the top bit set).
    pub fn id(&self) -> LeaseId {
        self.id
    }

    /// True when the sidecar decided locally because the control plane did
    /// not answer in time (degraded mode).
    pub fn degraded(&self) -> bool {
        self.degraded
    }

    /// Releases the lease with the request's outcome and token counts.
    pub fn finish(mut self, outcome: Outcome, tokens: TokenCounts) {
        self.release(outcome, tokens);
    }

    /// [`Lease::finish`], returning what resolves once the control plane
    /// applied the release (see [`ReleaseSink::release_applied`]).
    pub(crate) fn finish_applied(
        mut self,
        outcome: Outcome,
        tokens: TokenCounts,
    ) -> Option<Applied> {
        self.sink
            .take()
            .and_then(|sink| sink.release_applied(self.id, outcome, tokens))
    }

    fn release(&mut self, outcome: Outcome, tokens: TokenCounts) {
        if let Some(sink) = self.sink.take() {
            sink.release_owned(self.id, outcome, tokens);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.release(Outcome::Cancelled, TokenCounts::default());
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;

    use parking_lot::Mutex;
    use switchyard_control_plane::{decision::DecisionReason, endpoint::EndpointKind};

    use super::*;

    /// A sink that records every release.
    #[derive(Default)]
    pub(crate) struct Recorder {
        pub(crate) released: Mutex<Vec<(LeaseId, Outcome, TokenCounts)>>,
    }

    impl ReleaseSink for Recorder {
        fn release(&self, id: LeaseId, outcome: Outcome, tokens: TokenCounts) {
            self.released.lock().push((id, outcome, tokens));
        }
    }

    pub(crate) fn choice(endpoint: &str) -> Choice {
        Choice {
            endpoint: Arc::from(endpoint),
            endpoint_kind: EndpointKind::Ollama,
            tracking_model: Arc::from("m:latest"),
            backend_model: Arc::from("m:latest"),
            reason: DecisionReason::LoadedFree,
            lease: None,
            at_limit: false,
        }
    }

    fn lease(rec: &Arc<Recorder>, id: u64) -> Lease {
        Lease::new(choice("http://a:1"), LeaseId(id), false, rec.clone())
    }

    #[test]
    fn finish_releases_once_with_its_outcome() {
        let rec = Arc::new(Recorder::default());
        let l = lease(&rec, 7);
        assert_eq!(l.choice().lease, Some(LeaseId(7)));
        assert_eq!(l.id(), LeaseId(7));
        assert!(!l.degraded());
        let tokens = TokenCounts {
            prompt: 3,
            completion: 5,
        };
        l.finish(Outcome::Ok, tokens);
        assert_eq!(
            *rec.released.lock(),
            vec![(LeaseId(7), Outcome::Ok, tokens)]
        );
    }

    #[test]
    fn drop_releases_as_cancelled() {
        let rec = Arc::new(Recorder::default());
        {
            let _l = lease(&rec, 8);
            assert!(rec.released.lock().is_empty());
        }
        assert_eq!(
            *rec.released.lock(),
            vec![(LeaseId(8), Outcome::Cancelled, TokenCounts::default())]
        );
    }

    #[tokio::test]
    async fn panic_in_a_task_holding_a_lease_releases_it() {
        let rec = Arc::new(Recorder::default());
        let l = lease(&rec, 9);
        let task = tokio::spawn(async move {
            let _held = l;
            tokio::task::yield_now().await;
            panic!("handler bug");
        });
        let err = task.await.unwrap_err();
        assert!(err.is_panic());
        assert_eq!(
            *rec.released.lock(),
            vec![(LeaseId(9), Outcome::Cancelled, TokenCounts::default())]
        );
    }

    #[tokio::test]
    async fn aborted_task_releases_its_lease() {
        let rec = Arc::new(Recorder::default());
        let l = lease(&rec, 10);
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let _held = l;
            let _ = started_tx.send(());
            std::future::pending::<()>().await;
        });
        started_rx.await.unwrap();
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        assert_eq!(rec.released.lock().len(), 1);
        assert_eq!(rec.released.lock()[0].1, Outcome::Cancelled);
    }
}
