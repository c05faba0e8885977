//! Each endpoint's own listing items (Ollama `/api/tags` and `/api/ps`
//! items with their size, digest, details, ...), for the merged listings.
//!
//! The control plane keeps them from discovery, outside the published
//! cluster state. Embedded, they are read directly; remote, they are asked
//! for with `Cluster.ListModelItems` at most every [`MAX_AGE`], and the
//! last answer stands in while the control plane is unreachable (listings
//! then fall back to names only once nothing was ever received).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use switchyard_control_plane::api::ModelItems;
use switchyard_proto::v1::{self, cluster_client::ClusterClient};
use tonic::transport::Channel;

/// Each endpoint's listing items: (configured URL, items).
pub type ModelCatalog = Vec<(Arc<str>, Arc<ModelItems>)>;

/// How old a remote answer may be before the next listing asks again.
/// Listings are rare (a UI's page load) and the items change when a model
/// is pulled, deleted, loaded or unloaded.
pub(crate) const MAX_AGE: Duration = Duration::from_secs(2);

/// The last `ListModelItems` answer (or failure) and when it came.
#[derive(Default)]
pub(crate) struct ItemsCache {
    last: Mutex<Option<(Instant, Arc<ModelCatalog>)>>,
}

impl ItemsCache {
    /// The cached catalog while fresh, or when `reachable` is false; else a
    /// new answer within `timeout`. A failed call keeps the previous
    /// catalog (empty if none) for another [`MAX_AGE`], so an unreachable
    /// or older control plane costs at most one call per period.
    pub(crate) async fn get(
        &self,
        channel: &Channel,
        reachable: bool,
        timeout: Duration,
    ) -> Arc<ModelCatalog> {
        let cached = self.last.lock().clone();
        if let Some((at, catalog)) = &cached
            && (at.elapsed() < MAX_AGE || !reachable)
        {
            return catalog.clone();
        }
        if !reachable {
            return Arc::default();
        }
        let mut client = ClusterClient::new(channel.clone());
        let mut request = tonic::Request::new(v1::ListModelItemsRequest {});
        request.set_timeout(timeout);
        let catalog = match tokio::time::timeout(timeout, client.list_model_items(request)).await {
            Ok(Ok(answer)) => Arc::new(catalog_from_proto(answer.into_inner())),
            Ok(Err(status)) => {
                tracing::debug!(code = ?status.code(), message = status.message(), "ListModelItems failed; listings use the last items");
                cached.map(|(_, c)| c).unwrap_or_default()
            }
            Err(_) => {
                tracing::debug!("ListModelItems timed out; listings use the last items");
                cached.map(|(_, c)| c).unwrap_or_default()
            }
        };
        *self.last.lock() = Some((Instant::now(), catalog.clone()));
        catalog
    }
}

/// A `ListModelItemsResponse` as a catalog.
pub(crate) fn catalog_from_proto(answer: v1::ListModelItemsResponse) -> ModelCatalog {
    answer
        .endpoints
        .into_iter()
        .map(|e| {
            let items = ModelItems {
                tags: e.tags.into_iter().map(Arc::from).collect(),
                ps: e.ps.into_iter().map(Arc::from).collect(),
            };
            (Arc::from(e.url), Arc::new(items))
        })
        .collect()
}
