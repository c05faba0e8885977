//! The sidecar's own probes, for when the control plane cannot tell it.
//!
//! A remote sidecar routes in degraded mode on the last cluster state the
//! control plane published. That state is missing in one case and goes
//! stale in another:
//! - a sidecar that **starts** while the control plane is unreachable has
//!   no state at all, and would refuse every request;
//! - in a **long outage** the last state keeps the health of that moment
//!   (a backend that died since stays routable, each request paying a
//!   failed attempt first) and the other sidecars' requests of that moment
//!   (counted in flight for good).
//!
//! When its configuration lists endpoints (the `deploy/` manifests give
//! sidecars the control plane's config), the sidecar then probes them
//! itself, with the control plane's own discovery embedded, and routes on
//! those results: its own requests counted against each endpoint's limit,
//! as in any degraded decision. [`supervise`] starts the probes once no
//! state from the control plane has arrived within `startup_wait` of
//! start-up (the router's start then waits for the first round, bounded by
//! the probe timeout, before the sidecar serves), or once its `WatchUsage` stream has been gone for a session
//! TTL (by then the control plane has expired this sidecar's session too);
//! [`run`] publishes nothing until every endpoint has been probed once (an
//! unprobed endpoint advertises no models, and every request would be
//! answered "model not found"), keeps the snapshot current with each probe,
//! and stops as soon as the control plane's stream delivers again (its
//! state replaces the local one, and [`Snapshot::set_local`] refuses any
//! later one). The leases granted meanwhile are registered with the control
//! plane like every degraded lease.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use switchyard_control_plane::{
    config::Config, control_plane::ControlPlane, endpoint::without_credentials,
    server::spawn_background,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{follower::Snapshot, model_items};

/// Runs the sidecar's own probes whenever the control plane's state is
/// missing (never arrived) or has been gone for `outage`, until `cancel`.
/// Spawned after the router's start-up wait.
pub(crate) async fn supervise(
    config: Arc<Config>,
    snapshot: Arc<Snapshot>,
    outage: Duration,
    tasks: TaskTracker,
    cancel: CancellationToken,
) {
    loop {
        // Wait for the control plane to be gone long enough.
        loop {
            let went_away = snapshot.went_away.notified();
            let arrived = snapshot.arrived.notified();
            let wait = match snapshot.gone_for(Instant::now()) {
                None => None,
                // Never delivered: start at once (the start-up wait is over).
                Some((_, false)) => break,
                Some((gone, true)) if gone >= outage => break,
                Some((gone, true)) => Some(outage - gone),
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                () = went_away, if wait.is_none() => {}
                () = arrived, if wait.is_some() => {}
                () = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {}
            }
        }
        let probed = run(
            config.clone(),
            snapshot.clone(),
            tasks.clone(),
            cancel.clone(),
        )
        .await;
        // A failure to probe at all would fail the same way again.
        if !probed || cancel.is_cancelled() {
            return;
        }
    }
}

/// Probes `config`'s endpoints and publishes the results into `snapshot`
/// until the control plane's stream delivers again or `cancel` fires.
/// False when the probes could not be started at all.
async fn run(
    config: Arc<Config>,
    snapshot: Arc<Snapshot>,
    tasks: TaskTracker,
    cancel: CancellationToken,
) -> bool {
    let Some((gone, ever)) = snapshot.gone_for(Instant::now()) else {
        return true;
    };
    let endpoints = config.endpoints.len();
    let cp = ControlPlane::new(config);
    // Endpoints an operator drained stay drained: the last state the
    // control plane published says which (the config's own drains are
    // applied by `ControlPlane::new`).
    if let Some(last) = snapshot.get() {
        for e in last.endpoints.iter().filter(|e| e.draining) {
            if cp.set_draining(&e.url, true).is_err() {
                tracing::debug!(
                    endpoint = %without_credentials(&e.url),
                    "drained endpoint not in this sidecar's config"
                );
            }
        }
    }
    let probes = cancel.child_token();
    // Stops the probe loops and upkeep on every way out.
    let _stop_probes = probes.clone().drop_guard();
    if let Err(e) = spawn_background(&cp, &tasks, probes) {
        tracing::error!(error = %e, "cannot probe the configured endpoints; routing on the last cluster state, if any");
        return false;
    }
    if ever {
        tracing::warn!(
            endpoints,
            gone_for = ?gone,
            "control plane gone longer than a session TTL: probing the configured endpoints to route on meanwhile"
        );
    } else {
        tracing::warn!(
            endpoints,
            "no cluster state from the control plane yet: probing the configured endpoints to route on meanwhile"
        );
    }
    let mut published = cp.subscribe();
    // A first probe of every endpoint (bounded by the probe timeout); a
    // timeout leaves the slow ones unhealthy, as the control plane would.
    tokio::select! {
        () = cancel.cancelled() => return true,
        () = control_plane_back(&snapshot) => return stopped(),
        _ = cp.reprobe(&[]) => {}
    }
    loop {
        // Built now: the publications only say when something changed (one
        // may lag behind a probe that `reprobe` already saw applied).
        published.borrow_and_update();
        let items = Arc::new(model_items::catalog_of(&cp));
        if !snapshot.set_local(cp.state(), items) {
            return stopped();
        }
        tokio::select! {
            () = cancel.cancelled() => return true,
            () = control_plane_back(&snapshot) => return stopped(),
            // The sender lives in `cp`, held here: never closed.
            _ = published.changed() => {}
        }
    }
}

/// Resolves once the control plane's stream delivers a state.
async fn control_plane_back(snapshot: &Snapshot) {
    loop {
        let arrived = snapshot.arrived.notified();
        if snapshot.live() {
            return;
        }
        arrived.await;
    }
}

fn stopped() -> bool {
    tracing::info!("cluster state from the control plane arrived; stopped probing the endpoints");
    true
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    use axum::{Json, Router, routing::get};
    use switchyard_control_plane::{
        cluster::{ClusterState, EndpointState},
        endpoint::EndpointKind,
    };

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

        wait_for("a state of its own probes", || snapshot.get().is_some()).await;
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
        assert!(!snapshot.live());
        // Listings get the endpoints' own items from the same probes.
        let items = snapshot.local_items().expect("listing items of the probes");
        assert_eq!(&*items[0].0, fake.url.as_str());
        assert_eq!(items.len(), 2);

        // The control plane's state replaces it for good, and the probes stop.
        let probes_before = fake.request_count();
        snapshot.set(ClusterState {
            version: 7,
            ..ClusterState::default()
        });
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the probes stop once the control plane's state arrives")
            .unwrap();
        assert_eq!(snapshot.get().unwrap().version, 7);
        assert!(snapshot.local_items().is_none());
        assert!(!snapshot.set_local(first, Arc::default()));
        assert_eq!(snapshot.get().unwrap().version, 7);
        tasks.close();
        tokio::time::timeout(Duration::from_secs(5), tasks.wait())
            .await
            .expect("the embedded probe loops end with `run`");
        let probes_after = fake.request_count();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(fake.request_count(), probes_after, "still probing");
        assert!(probes_after >= probes_before);
    }

    #[tokio::test]
    async fn takes_over_after_the_control_plane_is_gone_for_the_outage_and_hands_back() {
        let fake = Ollama::start().await;
        let snapshot = Arc::new(Snapshot::default());
        // The control plane's state: the endpoint unprobed, nothing listed.
        let cp_state = ClusterState {
            version: 3,
            ..ClusterState::default()
        };
        snapshot.set(cp_state.clone());
        let tasks = TaskTracker::new();
        let cancel = CancellationToken::new();
        let outage = Duration::from_millis(300);
        tokio::spawn(supervise(
            config_for(std::slice::from_ref(&fake.url)),
            snapshot.clone(),
            outage,
            tasks.clone(),
            cancel.clone(),
        ));

        // Live: no probes of its own.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            fake.request_count(),
            0,
            "probed while the control plane delivers"
        );

        // Gone: the last state stands until the outage has lasted `outage`.
        let lost_at = Instant::now();
        snapshot.lost();
        wait_for("a state of its own probes", || {
            snapshot.get().is_some_and(|s| !s.endpoints.is_empty())
        })
        .await;
        assert!(
            lost_at.elapsed() >= outage,
            "took over after {:?}",
            lost_at.elapsed()
        );
        assert!(snapshot.get().unwrap().endpoints[0].healthy);

        // Back: the control plane's state again, and the probes stop.
        snapshot.set(cp_state.clone());
        let stopped_at = fake.request_count();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            fake.request_count() <= stopped_at + 2,
            "still probing: {} requests after the hand-back",
            fake.request_count() - stopped_at
        );
        assert_eq!(*snapshot.get().unwrap(), cp_state);

        // And again on the next outage.
        snapshot.lost();
        wait_for("its own probes again", || {
            snapshot.get().is_some_and(|s| !s.endpoints.is_empty())
        })
        .await;
        cancel.cancel();
        tasks.close();
        tokio::time::timeout(Duration::from_secs(5), tasks.wait())
            .await
            .expect("the probes end on cancel");
    }

    #[tokio::test]
    async fn endpoints_drained_in_the_last_state_stay_drained() {
        let fake = Ollama::start().await;
        let other = Ollama::start().await;
        let endpoint = |url: &str, draining: bool| EndpointState {
            healthy: true,
            health_detail: String::new(),
            draining,
            advertised_models: vec![Arc::from("m:latest")],
            last_probe_ok_unix_ms: 1,
            ..EndpointState::new(url, EndpointKind::Ollama)
        };
        let snapshot = Arc::new(Snapshot::default());
        snapshot.set(ClusterState {
            endpoints: vec![endpoint(&fake.url, true), endpoint(&other.url, false)],
            ..ClusterState::default()
        });
        snapshot.lost();
        let tasks = TaskTracker::new();
        let cancel = CancellationToken::new();
        tokio::spawn(run(
            config_for(&[fake.url.clone(), other.url.clone()]),
            snapshot.clone(),
            tasks.clone(),
            cancel.clone(),
        ));
        wait_for("a state of its own probes", || {
            snapshot
                .get()
                .is_some_and(|s| s.endpoints[1].last_probe_ok_unix_ms > 1)
        })
        .await;
        let own = snapshot.get().unwrap();
        assert!(own.endpoints[0].draining, "{own:?}");
        assert!(!own.endpoints[1].draining, "{own:?}");
        cancel.cancel();
    }

    #[tokio::test]
    async fn does_nothing_once_the_control_plane_has_answered() {
        let fake = Ollama::start().await;
        let snapshot = Arc::new(Snapshot::default());
        snapshot.set(ClusterState::default());
        let tasks = TaskTracker::new();
        assert!(
            run(
                config_for(std::slice::from_ref(&fake.url)),
                snapshot.clone(),
                tasks.clone(),
                CancellationToken::new(),
            )
            .await
        );
        tasks.close();
        tasks.wait().await;
        assert_eq!(fake.request_count(), 0);
        assert_eq!(snapshot.get().unwrap().version, 0);
    }
}
