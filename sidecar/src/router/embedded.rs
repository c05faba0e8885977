//! Standalone mode: the control plane lives in this process and every
//! choice and release is a direct (synchronous, one short lock) call on the
//! [`ControlPlane`] facade — no gRPC hop, never degraded.
//!
//! Session lifetime: the embedded session **never expires**. Session expiry
//! exists to reclaim the leases of a sidecar that crashed or was cut off;
//! an embedded sidecar cannot be cut off from its control plane and cannot
//! crash without taking it along. So instead of a keep-alive task, the
//! session is renewed once at open with a `now` far in the future (the
//! facade takes `now` as a parameter), which puts its deadline beyond any
//! reaper tick. Should the session vanish anyway (nothing in the facade does
//! that today), a choice answered `UnknownSession` re-opens it and retries
//! once.
//!
//! Invariant: `in_flight` counts leases handed out and not yet released
//! (incremented before the [`Lease`] exists, decremented by its one release).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use switchyard_control_plane::{
    cluster::ClusterState,
    control_plane::ControlPlane,
    decision::{ChooseError, ChooseRequest},
    ids::{LeaseId, SessionId},
    outcome::{Outcome, TokenCounts},
};

use super::{
    ModelCatalog, RouteError,
    lease::{Lease, ReleaseSink},
    model_items,
};

/// How far in the future the embedded session's keep-alive is dated.
/// Tried longest first; `Instant` arithmetic can overflow on some platforms.
const NEVER_EXPIRE_HORIZONS: [Duration; 3] = [
    Duration::from_secs(100 * 365 * 24 * 3600),
    Duration::from_secs(365 * 24 * 3600),
    Duration::from_secs(24 * 3600),
];

/// The release side shared by every lease of an embedded router.
struct EmbeddedSink {
    cp: ControlPlane,
    in_flight: AtomicUsize,
}

impl ReleaseSink for EmbeddedSink {
    fn release(&self, id: LeaseId, outcome: Outcome, tokens: TokenCounts) {
        // `false` means the control plane already ended the lease (session
        // closed at shutdown): the local count still goes down exactly once.
        let _ = self.cp.release(id, outcome, tokens, Instant::now());
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Router over an in-process control plane.
pub(crate) struct EmbeddedRouter {
    name: String,
    session: Mutex<SessionId>,
    sink: Arc<EmbeddedSink>,
}

impl EmbeddedRouter {
    /// Opens a (never-expiring) session named `name` on `cp`.
    pub(crate) fn new(cp: ControlPlane, name: &str) -> Self {
        let session = open_session(&cp, name);
        tracing::info!(session = %session, name, "embedded control plane session opened");
        Self {
            name: name.to_owned(),
            session: Mutex::new(session),
            sink: Arc::new(EmbeddedSink {
                cp,
                in_flight: AtomicUsize::new(0),
            }),
        }
    }

    /// Chooses and takes a lease; while every endpoint is full it waits
    /// for a slot, at most `saturated_hold` ([`ControlPlane::choose_held`]).
    pub(crate) async fn choose(&self, req: &ChooseRequest) -> Result<Lease, RouteError> {
        let cp = &self.sink.cp;
        let session = *self.session.lock();
        let choice = match cp.choose_held(req, Some(session)).await {
            Err(ChooseError::UnknownSession(_)) => {
                let fresh = self.reopen(session);
                cp.choose_held(req, Some(fresh)).await?
            }
            other => other?,
        };
        let Some(id) = choice.lease else {
            // A reserving choice always carries a lease; refuse rather than
            // hand out a guard that cannot be released.
            return Err(RouteError::Choose(ChooseError::NoEndpointAvailable {
                model: req.model.clone(),
                detail: "internal: the control plane granted no lease".to_owned(),
            }));
        };
        self.sink.in_flight.fetch_add(1, Ordering::AcqRel);
        Ok(Lease::new(choice, id, false, self.sink.clone()))
    }

    /// Re-opens the session unless another caller already did.
    fn reopen(&self, stale: SessionId) -> SessionId {
        let mut session = self.session.lock();
        if *session == stale {
            *session = open_session(&self.sink.cp, &self.name);
            tracing::warn!(session = %*session, "embedded session was gone; re-opened");
        }
        *session
    }

    pub(crate) fn cluster_state(&self) -> Arc<ClusterState> {
        self.sink.cp.state()
    }

    pub(crate) fn model_items(&self) -> Arc<ModelCatalog> {
        Arc::new(model_items::catalog_of(&self.sink.cp))
    }

    pub(crate) fn local_in_flight(&self) -> usize {
        self.sink.in_flight.load(Ordering::Acquire)
    }

    pub(crate) fn close(&self) {
        let session = *self.session.lock();
        let released = self.sink.cp.close_session(session);
        tracing::info!(session = %session, released, "embedded session closed");
    }

    /// The embedded control plane (tests; the sidecar's `/metrics`).
    pub(crate) fn control_plane(&self) -> &ControlPlane {
        &self.sink.cp
    }
}

fn open_session(cp: &ControlPlane, name: &str) -> SessionId {
    let now = Instant::now();
    let grant = cp.open_session(name, now);
    let far = NEVER_EXPIRE_HORIZONS
        .iter()
        .find_map(|d| now.checked_add(*d))
        .unwrap_or(now);
    cp.keep_alive(grant.id, far);
    grant.id
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;

    use switchyard_control_plane::{
        api::{ModelItems, ProbeReport},
        config::Config,
        outcome::RequestKind,
    };

    use super::*;
    use crate::router::Router;

    pub(crate) fn config() -> Config {
        let yaml = "endpoints:\n  - http://127.0.0.1:9/\n  - http://127.0.0.1:10/\n\
                    max_concurrent_connections: 2\nsession_ttl: 1s\nkeepalive_interval: 100ms\n";
        Config::from_yaml(yaml, &|_| None).unwrap()
    }

    /// Both configured endpoints advertise `llama3:latest` (loaded) and `qwen:7b`.
    pub(crate) fn probe(cp: &ControlPlane) {
        for i in 0..2 {
            cp.apply_probe(
                i,
                ProbeReport::Ok {
                    advertised: vec!["llama3:latest".into(), "qwen:7b".into()],
                    loaded: vec!["llama3:latest".into()],
                    items: ModelItems::default(),
                },
                Instant::now(),
            );
        }
    }

    /// A chat choice for `model`, no affinity, nothing excluded.
    pub(crate) fn request(model: &str) -> ChooseRequest {
        ChooseRequest {
            model: model.into(),
            affinity_key: None,
            affinity_required: false,
            kind: RequestKind::Chat,
            exclude: vec![],
        }
    }

    #[test]
    fn affinity_keys_are_wanted_only_with_conversation_affinity_on() {
        let off = Router::embedded(ControlPlane::new(Arc::new(config())), "test");
        assert!(!off.uses_affinity_keys());
        let yaml = "endpoints:\n  - http://127.0.0.1:9/\nconversation_affinity: true\n";
        let on_config = Config::from_yaml(yaml, &|_| None).unwrap();
        let on = Router::embedded(ControlPlane::new(Arc::new(on_config)), "test");
        assert!(on.uses_affinity_keys());
    }

    #[tokio::test]
    async fn choose_and_release_return_usage_to_zero() {
        let cp = ControlPlane::new(Arc::new(config()));
        probe(&cp);
        let router = Router::embedded(cp.clone(), "test");
        assert!(router.control_plane_connected());

        let a = router.choose(&request("llama3")).await.unwrap();
        let b = router.choose(&request("llama3")).await.unwrap();
        assert!(!a.degraded());
        assert_ne!(a.id(), b.id());
        // Least in-flight: the second request goes to the other endpoint.
        assert_ne!(a.choice().endpoint, b.choice().endpoint);
        assert_eq!(router.local_in_flight(), 2);
        assert_eq!(cp.state().leases, 2);
        assert_eq!(router.cluster_state().total_in_flight(), 2);

        a.finish(
            Outcome::Ok,
            TokenCounts {
                prompt: 1,
                completion: 2,
            },
        );
        assert_eq!(router.local_in_flight(), 1);
        drop(b);
        assert_eq!(router.local_in_flight(), 0);
        let state = cp.state();
        assert_eq!(state.leases, 0);
        assert_eq!(state.total_in_flight(), 0);
        assert_eq!(router.degraded_decisions(), 0);
        let stats = cp.stats();
        assert_eq!(stats.leases_granted, 2);
        assert_eq!(stats.leases_released, 2);
    }

    #[tokio::test]
    async fn unknown_model_lists_available_models() {
        let cp = ControlPlane::new(Arc::new(config()));
        probe(&cp);
        let router = Router::embedded(cp, "test");
        let err = router.choose(&request("mistral")).await.unwrap_err();
        match err {
            RouteError::Choose(ChooseError::ModelNotFound { model, available }) => {
                assert_eq!(model, "mistral");
                assert_eq!(available, vec!["llama3:latest", "qwen:7b"]);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(router.local_in_flight(), 0);
    }

    #[tokio::test]
    async fn embedded_session_does_not_expire_and_close_releases() {
        let cp = ControlPlane::new(Arc::new(config()));
        probe(&cp);
        let router = Router::embedded(cp.clone(), "test");
        let lease = router.choose(&request("qwen:7b")).await.unwrap();
        // Far past the 1s TTL: the reaper would have taken a normal session.
        assert_eq!(
            cp.expire_sessions(Instant::now() + Duration::from_secs(3600)),
            0
        );
        assert_eq!(cp.state().leases, 1);
        router.close().await;
        assert_eq!(cp.state().leases, 0);
        // Releasing after close is harmless and still counts down locally.
        drop(lease);
        assert_eq!(router.local_in_flight(), 0);
    }

    #[tokio::test]
    async fn lost_session_is_reopened() {
        let cp = ControlPlane::new(Arc::new(config()));
        probe(&cp);
        let router = Router::embedded(cp.clone(), "test");
        let Some(embedded) = router.embedded_inner() else {
            panic!("not embedded")
        };
        let old = *embedded.session.lock();
        assert_eq!(embedded.control_plane().close_session(old), 0);
        let lease = router.choose(&request("llama3")).await.unwrap();
        assert_ne!(*embedded.session.lock(), old);
        assert_eq!(cp.state().leases, 1);
        drop(lease);
        assert_eq!(cp.state().leases, 0);
    }
}
