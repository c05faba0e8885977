//! The `WatchUsage` follower: keeps the latest [`ClusterState`] the control
//! plane published, for listings, `/health` and degraded decisions.
//!
//! Invariant: the stored state only moves forward to whatever the stream
//! delivered last (the server already skips slow watchers ahead); it is
//! never cleared, so degraded mode always routes on the last known cluster
//! (or, once the control plane has been gone longer than a session TTL, on
//! the sidecar's own probes: [`local_discovery`](super::local_discovery)).
//! A broken or ended stream opens the [`Circuit`] and wakes the session
//! task (the control plane is probably gone); a (re)established stream
//! closes it and wakes the session task too, so a restarted control plane
//! gets this sidecar's session and leases back without waiting for the next
//! keep-alive tick.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use switchyard_control_plane::cluster::ClusterState;
use switchyard_proto::v1::{self, routing_client::RoutingClient};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::{StateSource, degraded::Circuit, model_items::ModelCatalog, remote::Backoff};

/// The state degraded decisions, listings and `/health` read: the last one
/// the control plane published, or, while the control plane has been gone
/// a while, one from the sidecar's own probes
/// ([`local_discovery`](super::local_discovery)).
#[derive(Debug)]
pub(crate) struct Snapshot {
    state: ArcSwapOption<ClusterState>,
    /// Whether `WatchUsage` is delivering. Held while a state is stored, so
    /// a state of the sidecar's own probes never overwrites the control
    /// plane's.
    feed: Mutex<Feed>,
    /// Notified whenever a state from the control plane arrives.
    pub(crate) arrived: Notify,
    /// Notified when the `WatchUsage` stream is lost.
    pub(crate) went_away: Notify,
    /// Notified whenever a state of the sidecar's own probes is stored.
    pub(crate) local: Notify,
}

#[derive(Debug)]
struct Feed {
    /// The stream is open and the stored state is the control plane's.
    live: bool,
    /// A state from the control plane was ever stored.
    ever: bool,
    /// Set while the stored state is from the sidecar's own probes: their
    /// listing items.
    local_items: Option<Arc<ModelCatalog>>,
    /// Since when the stream has been gone (start-up, at first).
    lost_since: Instant,
}

impl Default for Snapshot {
    fn default() -> Self {
        Self {
            state: ArcSwapOption::empty(),
            feed: Mutex::new(Feed {
                live: false,
                ever: false,
                local_items: None,
                lost_since: Instant::now(),
            }),
            arrived: Notify::new(),
            went_away: Notify::new(),
            local: Notify::new(),
        }
    }
}

impl Snapshot {
    /// The last state stored, if any.
    pub(crate) fn get(&self) -> Option<Arc<ClusterState>> {
        self.state.load_full()
    }

    /// Whether the control plane's `WatchUsage` stream is delivering.
    pub(crate) fn live(&self) -> bool {
        self.feed.lock().live
    }

    /// How long the control plane's stream has been gone (`None` while it
    /// delivers), and whether it ever delivered.
    pub(crate) fn gone_for(&self, now: Instant) -> Option<(Duration, bool)> {
        let feed = self.feed.lock();
        (!feed.live).then(|| (now.saturating_duration_since(feed.lost_since), feed.ever))
    }

    /// Stores a state the control plane published.
    pub(crate) fn set(&self, state: ClusterState) {
        {
            let mut feed = self.feed.lock();
            feed.live = true;
            feed.ever = true;
            feed.local_items = None;
            self.state.store(Some(Arc::new(state)));
        }
        self.arrived.notify_waiters();
    }

    /// The control plane's stream ended or could not be opened.
    pub(crate) fn lost(&self) {
        {
            let mut feed = self.feed.lock();
            if !feed.live {
                return;
            }
            feed.live = false;
            feed.lost_since = Instant::now();
        }
        self.went_away.notify_waiters();
    }

    /// Stores a state of the sidecar's own probes, unless the control
    /// plane's stream is delivering (then false, and nothing changes).
    pub(crate) fn set_local(&self, state: Arc<ClusterState>, items: Arc<ModelCatalog>) -> bool {
        let mut feed = self.feed.lock();
        if feed.live {
            return false;
        }
        feed.local_items = Some(items);
        self.state.store(Some(state));
        drop(feed);
        self.local.notify_waiters();
        true
    }

    /// The listing items of the sidecar's own probes, while their state is
    /// the one stored.
    pub(crate) fn local_items(&self) -> Option<Arc<ModelCatalog>> {
        self.feed.lock().local_items.clone()
    }

    /// The stored state, if any, and whether it is from the sidecar's own
    /// probes.
    pub(crate) fn current(&self) -> Option<(Arc<ClusterState>, bool)> {
        let feed = self.feed.lock();
        self.state
            .load_full()
            .map(|state| (state, feed.local_items.is_some()))
    }

    /// Where the stored state comes from.
    pub(crate) fn source(&self) -> StateSource {
        let feed = self.feed.lock();
        if feed.live {
            StateSource::ControlPlane
        } else if feed.local_items.is_some() {
            StateSource::OwnProbes
        } else if feed.ever {
            StateSource::LastKnown
        } else {
            StateSource::None
        }
    }
}

/// Everything the follower task touches.
pub(crate) struct Follower {
    pub(crate) client: RoutingClient<Channel>,
    pub(crate) snapshot: Arc<Snapshot>,
    pub(crate) circuit: Arc<Circuit>,
    /// Wakes the session task (probe / re-open now).
    pub(crate) wake_session: Arc<Notify>,
    pub(crate) backoff: Backoff,
}

impl Follower {
    /// Follows `WatchUsage` until `cancel`, reconnecting with backoff.
    pub(crate) async fn run(mut self, cancel: CancellationToken) {
        let mut logged_failure = false;
        loop {
            let mut client = self.client.clone();
            let opened = tokio::select! {
                () = cancel.cancelled() => return,
                r = client.watch_usage(v1::WatchUsageRequest {}) => r,
            };
            match opened {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    let mut first = true;
                    loop {
                        let next = tokio::select! {
                            () = cancel.cancelled() => return,
                            m = stream.message() => m,
                        };
                        match next {
                            Ok(Some(msg)) => match ClusterState::try_from(msg) {
                                Ok(state) => {
                                    if first {
                                        tracing::info!(
                                            version = state.version,
                                            "following cluster state"
                                        );
                                        first = false;
                                        logged_failure = false;
                                        self.circuit.up();
                                        self.wake_session.notify_one();
                                        self.backoff.reset();
                                    }
                                    self.snapshot.set(state);
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "invalid cluster state from the control plane; ignored");
                                }
                            },
                            Ok(None) => {
                                tracing::info!("cluster state stream ended");
                                break;
                            }
                            Err(status) => {
                                tracing::warn!(code = ?status.code(), message = status.message(), "cluster state stream broke");
                                break;
                            }
                        }
                    }
                    self.circuit.down("cluster state stream ended");
                    self.snapshot.lost();
                    self.wake_session.notify_one();
                }
                Err(status) => {
                    self.circuit.down(status.message());
                    self.snapshot.lost();
                    if !logged_failure {
                        tracing::warn!(code = ?status.code(), message = status.message(), "cannot follow cluster state; retrying");
                        logged_failure = true;
                    }
                }
            }
            let wait = self.backoff.next_delay();
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}
