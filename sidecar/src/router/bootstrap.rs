//! Cold start without the control plane.
//!
//! A remote sidecar routes in degraded mode from the last cluster state the
//! control plane published. One that starts while the control plane is
//! unreachable has no such state, and would refuse every request until the
//! control plane is back. When its configuration lists endpoints (the
//! `deploy/` manifests give sidecars the control plane's config), it probes
//! them itself instead, with the control plane's own discovery embedded,
//! and routes degraded on those results: its own in-flight counts against
//! each endpoint's limit, as in any degraded decision.
//!
//! Lifecycle ([`run`]):
//! - starts only when `startup_wait` passed without a state from the
//!   control plane (so a sidecar whose control plane is up never probes);
//! - publishes nothing until every endpoint has been probed once (an
//!   unprobed endpoint advertises no models, and every request would be
//!   answered "model not found");
//! - then keeps the snapshot current with each probe;
//! - stops probing as soon as the control plane's first `WatchUsage` state
//!   arrives (that state replaces the bootstrap one, and
//!   [`Snapshot::set_bootstrap`] refuses any later one). The leases granted
//!   meanwhile are registered with the control plane like every degraded
//!   lease.

use std::sync::Arc;

use switchyard_control_plane::{
    config::Config, control_plane::ControlPlane, server::spawn_background,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::follower::Snapshot;

/// Probes `config`'s endpoints and publishes the results into `snapshot`
/// until the control plane's own state arrives or `cancel` fires.
pub(crate) async fn run(
    config: Arc<Config>,
    snapshot: Arc<Snapshot>,
    tasks: TaskTracker,
    cancel: CancellationToken,
) {
    if snapshot.has_control_plane_state() {
        return;
    }
    let endpoints = config.endpoints.len();
    let cp = ControlPlane::new(config);
    let probes = cancel.child_token();
    // Stops the probe loops and upkeep on every way out.
    let _stop_probes = probes.clone().drop_guard();
    if let Err(e) = spawn_background(&cp, &tasks, probes) {
        tracing::error!(error = %e, "cannot probe the configured endpoints; no routing until the control plane is reachable");
        return;
    }
    tracing::warn!(
        endpoints,
        "no cluster state from the control plane yet: probing the configured endpoints to route on meanwhile"
    );
    let mut published = cp.subscribe();
    // A first probe of every endpoint (bounded by the probe timeout); a
    // timeout leaves the slow ones unhealthy, as the control plane would.
    tokio::select! {
        () = cancel.cancelled() => return,
        () = control_plane_arrived(&snapshot) => return stopped(),
        _ = cp.reprobe(&[]) => {}
    }
    loop {
        // Built now: the publications only say when something changed (one
        // may lag behind a probe that `reprobe` already saw applied).
        published.borrow_and_update();
        if !snapshot.set_bootstrap(cp.state()) {
            return stopped();
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = control_plane_arrived(&snapshot) => return stopped(),
            changed = published.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// Resolves once a state from the control plane has been stored.
async fn control_plane_arrived(snapshot: &Snapshot) {
    loop {
        let arrived = snapshot.arrived.notified();
        if snapshot.has_control_plane_state() {
            return;
        }
        arrived.await;
    }
}

fn stopped() {
    tracing::info!("cluster state from the control plane arrived; stopped probing the endpoints");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    use axum::{Json, Router, routing::get};
    use switchyard_control_plane::cluster::ClusterState;

    use super::*;

    /// A minimal Ollama for discovery: `/api/tags` lists `m`, `/api/ps`
    /// nothing; counts the requests it answers.
    struct Ollama {
        url: String,
        requests: Arc<AtomicUsize>,
    }

    impl Ollama {
        async fn start() -> Self {
            let requests = Arc::new(AtomicUsize::new(0));
            let (tags, ps) = (requests.clone(), requests.clone());
            let app = Router::new()
                .route(
                    "/api/tags",
                    get(move || async move {
                        tags.fetch_add(1, Ordering::SeqCst);
                        Json(serde_json::json!({"models": [{"name": "m:latest", "model": "m:latest"}]}))
                    }),
                )
                .route(
                    "/api/ps",
                    get(move || async move {
                        ps.fetch_add(1, Ordering::SeqCst);
                        Json(serde_json::json!({"models": []}))
                    }),
                );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, app).await });
            Self { url, requests }
        }

        fn request_count(&self) -> usize {
            self.requests.load(Ordering::SeqCst)
        }
    }

    fn config_for(urls: &[String]) -> Arc<Config> {
        let yaml = format!(
            "endpoints:\n{}probe_interval: 50ms\n",
            urls.iter()
                .map(|u| format!("  - {u}\n"))
                .collect::<String>()
        );
        Arc::new(Config::from_yaml(&yaml, &|_| None).unwrap())
    }

    async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn publishes_probed_endpoints_then_yields_to_the_control_plane() {
        let fake = Ollama::start().await;
        // A port nothing listens on: probed, unhealthy.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let snapshot = Arc::new(Snapshot::default());
        let tasks = TaskTracker::new();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(
            config_for(&[fake.url.clone(), dead]),
            snapshot.clone(),
            tasks.clone(),
            cancel.clone(),
        ));

        wait_for("a bootstrap state", || snapshot.get().is_some()).await;
        // Never a state of unprobed endpoints: the first one published has
        // every endpoint's probe result.
        let first = snapshot.get().unwrap();
        assert!(first.endpoints[0].healthy, "{first:?}");
        assert_eq!(&*first.endpoints[0].advertised_models[0], "m:latest");
        assert!(!first.endpoints[1].healthy);
        assert!(
            !first.endpoints[1].health_detail.contains("not probed"),
            "{first:?}"
        );
        assert!(!snapshot.has_control_plane_state());

        // The control plane's state replaces it for good, and the probes stop.
        let probes_before = fake.request_count();
        snapshot.set(ClusterState {
            version: 7,
            ..ClusterState::default()
        });
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("bootstrap stops once the control plane's state arrives")
            .unwrap();
        assert_eq!(snapshot.get().unwrap().version, 7);
        assert!(!snapshot.set_bootstrap(first));
        assert_eq!(snapshot.get().unwrap().version, 7);
        tasks.close();
        tokio::time::timeout(Duration::from_secs(5), tasks.wait())
            .await
            .expect("the embedded probe loops end with the bootstrap");
        let probes_after = fake.request_count();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(fake.request_count(), probes_after, "still probing");
        assert!(probes_after >= probes_before);
    }

    #[tokio::test]
    async fn does_nothing_once_the_control_plane_has_answered() {
        let fake = Ollama::start().await;
        let snapshot = Arc::new(Snapshot::default());
        snapshot.set(ClusterState::default());
        let tasks = TaskTracker::new();
        run(
            config_for(std::slice::from_ref(&fake.url)),
            snapshot.clone(),
            tasks.clone(),
            CancellationToken::new(),
        )
        .await;
        tasks.close();
        tasks.wait().await;
        assert_eq!(fake.request_count(), 0);
        assert_eq!(snapshot.get().unwrap().version, 0);
    }
}
