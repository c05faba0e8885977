//! Probes on demand: each endpoint's probe loop counts the rounds it starts
//! and applies, and can be woken early. [`ProbeRounds::fresh`] asks for a
//! probe now and waits until one that *started after the call* has been
//! applied, so a change the caller just made on the endpoint (a model
//! pulled, copied or deleted through a sidecar) is in the state when it
//! returns, instead of at the next `probe_interval`.
//!
//! A round already in flight when the call comes may have read the
//! endpoint before the change, so it does not count; the wake-up is kept
//! (a [`Notify`] permit) and the loop starts the next round as soon as that
//! one is applied.

use tokio::sync::{Notify, watch};

/// How far one endpoint's probe loop has got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Progress {
    /// Number of the last round started (rounds count from 1).
    started: u64,
    /// Number of the last round whose report was applied.
    applied: u64,
}

struct Round {
    wake: Notify,
    progress: watch::Sender<Progress>,
}

/// The probe rounds of every configured endpoint, by position in
/// `config.endpoints`. Shared by the probe loops and whoever asks for a
/// fresh probe.
pub struct ProbeRounds {
    endpoints: Box<[Round]>,
}

impl std::fmt::Debug for ProbeRounds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeRounds")
            .field("endpoints", &self.endpoints.len())
            .finish()
    }
}

impl ProbeRounds {
    /// Rounds for `endpoints` endpoints, none started.
    pub fn new(endpoints: usize) -> Self {
        Self {
            endpoints: (0..endpoints)
                .map(|_| Round {
                    wake: Notify::new(),
                    progress: watch::Sender::new(Progress::default()),
                })
                .collect(),
        }
    }

    /// The probe loop of `endpoint` starts a round: its number.
    pub(super) fn start(&self, endpoint: usize) -> u64 {
        let Some(round) = self.endpoints.get(endpoint) else {
            return 0;
        };
        let mut number = 0;
        round.progress.send_modify(|p| {
            p.started += 1;
            number = p.started;
        });
        number
    }

    /// The probe loop of `endpoint` applied round `number`'s report.
    pub(super) fn applied(&self, endpoint: usize, number: u64) {
        if let Some(round) = self.endpoints.get(endpoint) {
            round
                .progress
                .send_modify(|p| p.applied = p.applied.max(number));
        }
    }

    /// Resolves when someone asks `endpoint` for a fresh probe (at once if
    /// someone asked since the last time this resolved).
    pub(super) async fn requested(&self, endpoint: usize) {
        match self.endpoints.get(endpoint) {
            Some(round) => round.wake.notified().await,
            None => std::future::pending().await,
        }
    }

    /// Resolves once every endpoint has had a probe round applied (at once
    /// with no endpoints): from then on every endpoint's models are known
    /// or its failure is. Never resolves while a probe loop is missing:
    /// callers bound the wait.
    pub async fn all_applied_once(&self) {
        for round in &self.endpoints {
            let mut progress = round.progress.subscribe();
            // The sender lives in `self`: the wait cannot fail while we
            // hold it.
            let _ = progress.wait_for(|p| p.applied >= 1).await;
        }
    }

    /// Asks `endpoint` for a probe now and resolves once a round started
    /// after this call has been applied. Never resolves while no probe loop
    /// runs for it: callers bound the wait. `false` for an index out of
    /// range.
    pub async fn fresh(&self, endpoint: usize) -> bool {
        let Some(round) = self.endpoints.get(endpoint) else {
            return false;
        };
        let mut progress = round.progress.subscribe();
        let wanted = progress.borrow_and_update().started + 1;
        round.wake.notify_one();
        progress.wait_for(|p| p.applied >= wanted).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::{sync::Arc, time::Duration};

    use super::*;

    #[tokio::test]
    async fn a_round_in_flight_at_the_call_does_not_count() {
        let rounds = Arc::new(ProbeRounds::new(1));
        let first = rounds.start(0);
        let waiter = tokio::spawn({
            let rounds = rounds.clone();
            async move { rounds.fresh(0).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        rounds.applied(0, first);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "a round started before the call");
        // The loop sees the request and runs the next round.
        tokio::time::timeout(Duration::from_secs(1), rounds.requested(0))
            .await
            .expect("the wake-up is kept");
        let second = rounds.start(0);
        rounds.applied(0, second);
        assert!(
            tokio::time::timeout(Duration::from_secs(1), waiter)
                .await
                .unwrap()
                .unwrap()
        );
    }

    #[tokio::test]
    async fn all_applied_once_waits_for_every_endpoint() {
        assert!(
            tokio::time::timeout(
                Duration::from_secs(1),
                ProbeRounds::new(0).all_applied_once()
            )
            .await
            .is_ok(),
            "no endpoints: at once"
        );
        let rounds = Arc::new(ProbeRounds::new(2));
        let waiter = tokio::spawn({
            let rounds = rounds.clone();
            async move { rounds.all_applied_once().await }
        });
        let first = rounds.start(1);
        rounds.applied(1, first);
        let started = rounds.start(0);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "endpoint 0's round is not applied");
        rounds.applied(0, started);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("resolves once both are applied")
            .unwrap();
    }

    #[tokio::test]
    async fn unknown_endpoints_are_refused_not_awaited() {
        let rounds = ProbeRounds::new(1);
        assert!(!rounds.fresh(3).await);
    }
}
