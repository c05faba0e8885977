//! The `WatchUsage` follower: keeps the latest [`ClusterState`] the control
//! plane published, for listings, `/health` and degraded decisions.
//!
//! Invariant: the stored state only moves forward to whatever the stream
//! delivered last (the server already skips slow watchers ahead); it is
//! never cleared, so degraded mode always routes on the last known cluster.
//! A broken or ended stream opens the [`Circuit`] and wakes the session
//! task (the control plane is probably gone); a (re)established stream
//! closes it and wakes the session task too, so a restarted control plane
//! gets this sidecar's session and leases back without waiting for the next
//! keep-alive tick.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use switchyard_control_plane::cluster::ClusterState;
use switchyard_proto::v1::{self, routing_client::RoutingClient};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::{degraded::Circuit, remote::Backoff};

/// The last published cluster state.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    state: ArcSwapOption<ClusterState>,
    /// Whether a state from the control plane has been stored: from then on
    /// the cold-start [`bootstrap`](super::bootstrap) probes' states are
    /// refused. Held while either stores, so a bootstrap state can never
    /// overwrite the control plane's.
    from_control_plane: Mutex<bool>,
    /// Notified whenever a state from the control plane arrives.
    pub(crate) arrived: Notify,
}

impl Snapshot {
    /// The last state received, if any.
    pub(crate) fn get(&self) -> Option<Arc<ClusterState>> {
        self.state.load_full()
    }

    /// Whether the control plane has delivered a state yet.
    pub(crate) fn has_control_plane_state(&self) -> bool {
        *self.from_control_plane.lock()
    }

    /// Stores a state the control plane published.
    pub(crate) fn set(&self, state: ClusterState) {
        {
            let mut from_control_plane = self.from_control_plane.lock();
            *from_control_plane = true;
            self.state.store(Some(Arc::new(state)));
        }
        self.arrived.notify_waiters();
    }

    /// Stores a state of the sidecar's own cold-start probes, unless the
    /// control plane's has arrived (then false, and nothing changes).
    pub(crate) fn set_bootstrap(&self, state: Arc<ClusterState>) -> bool {
        let from_control_plane = self.from_control_plane.lock();
        if *from_control_plane {
            return false;
        }
        self.state.store(Some(state));
        true
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
                    self.wake_session.notify_one();
                }
                Err(status) => {
                    self.circuit.down(status.message());
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
