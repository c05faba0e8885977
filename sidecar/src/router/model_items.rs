//! Each endpoint's own listing items (Ollama `/api/tags` and `/api/ps`
//! items with their size, digest, details, ...; OpenAI-style and
//! llama-server `/v1/models` items with their created, owned_by,
//! max_model_len, status, ...), for the merged listings.
//!
//! The control plane keeps them from discovery, outside the published
//! cluster state. Embedded, they are read directly; remote, they are asked
//! for with `Cluster.ListModelItems` at most every [`MAX_AGE`], and the
//! last answer stands in while the control plane is unreachable (listings
//! then fall back to names only once nothing was ever received).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use switchyard_control_plane::{api::ModelItems, control_plane::ControlPlane};
use switchyard_proto::v1::{self, cluster_client::ClusterClient};
use tonic::transport::Channel;

use super::remote::{request, with_deadline};

/// Each endpoint's listing items: (configured URL, items).
pub type ModelCatalog = Vec<(Arc<str>, Arc<ModelItems>)>;

/// The listing items of a control plane in this process (standalone, or
/// the sidecar's own probes), by configured endpoint.
pub(crate) fn catalog_of(cp: &ControlPlane) -> ModelCatalog {
    let urls = cp.config().endpoints.iter().map(|e| e.url.clone());
    urls.zip(cp.model_items()).collect()
}

/// How old a remote answer may be before the next listing asks again.
/// Listings are rare (a UI's page load) and the items change when a model
/// is pulled, deleted, loaded or unloaded.
pub(crate) const MAX_AGE: Duration = Duration::from_secs(2);

/// The last `ListModelItems` answer (or failure) and when it came.
#[derive(Default)]
pub(crate) struct ItemsCache {
    last: Mutex<Option<(Instant, Arc<ModelCatalog>)>>,
    /// One refresh at a time: listings that find the answer stale while
    /// another is asking wait for that answer instead of asking too.
    refresh: tokio::sync::Mutex<()>,
    /// Set when the endpoints' listings just changed (a model was pulled
    /// or deleted through this sidecar): the next listing asks again.
    expired: AtomicBool,
    /// What the answer lacked when a listing last found it behind the
    /// cluster state and had it asked for again
    /// ([`Self::expire_if_newly_behind`]).
    behind: Mutex<Option<u64>>,
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
        if let Some(catalog) = self.usable(reachable) {
            return catalog;
        }
        if !reachable {
            return Arc::default();
        }
        let _turn = self.refresh.lock().await;
        // Refreshed by the listing that held the turn before this one?
        if let Some(catalog) = self.usable(reachable) {
            return catalog;
        }
        let mut client = ClusterClient::new(channel.clone());
        let call = client.list_model_items(request(v1::ListModelItemsRequest {}, timeout));
        let catalog = match with_deadline(timeout, call).await {
            Ok(answer) => Arc::new(catalog_from_proto(answer)),
            Err(status) => {
                tracing::debug!(code = ?status.code(), message = status.message(), "ListModelItems failed; listings use the last items");
                let cached = self.last.lock().clone();
                cached.map(|(_, c)| c).unwrap_or_default()
            }
        };
        *self.last.lock() = Some((Instant::now(), catalog.clone()));
        self.expired.store(false, Ordering::Release);
        catalog
    }

    /// Makes the next listing ask the control plane again (the previous
    /// answer is still served while it is unreachable).
    pub(crate) fn expire(&self) {
        self.expired.store(true, Ordering::Release);
    }

    /// A listing found the answer lacking the items `missing` (a
    /// fingerprint of them) that its cluster state lists, or nothing
    /// (`None`). [`Self::expire`]s the answer, and says so, the first time
    /// it lacks those: an answer that still lacks them after being asked
    /// for again (a control plane that sends no items for some endpoints)
    /// is asked for again only after [`MAX_AGE`], as usual.
    pub(crate) fn expire_if_newly_behind(&self, missing: Option<u64>) -> bool {
        let mut behind = self.behind.lock();
        let newly = missing.is_some() && *behind != missing;
        *behind = missing;
        if newly {
            self.expired.store(true, Ordering::Release);
        }
        newly
    }

    /// The cached catalog if it is fresh, or if the control plane is
    /// unreachable (then nothing better can be had).
    fn usable(&self, reachable: bool) -> Option<Arc<ModelCatalog>> {
        let last = self.last.lock();
        let (at, catalog) = last.as_ref()?;
        let fresh = at.elapsed() < MAX_AGE && !self.expired.load(Ordering::Acquire);
        (fresh || !reachable).then(|| catalog.clone())
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
                models: e.models.into_iter().map(Arc::from).collect(),
            };
            (Arc::from(e.url), Arc::new(items))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::atomic::{AtomicUsize, Ordering};

    use switchyard_proto::v1::cluster_server::{Cluster, ClusterServer};
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::{Request, Response, Status};

    use super::*;

    /// A control plane that only answers `ListModelItems`, slowly, and
    /// counts the calls.
    #[derive(Clone, Default)]
    struct Counting {
        calls: Arc<AtomicUsize>,
    }

    fn unused<T>() -> Result<Response<T>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    #[tonic::async_trait]
    impl Cluster for Counting {
        async fn get_state(
            &self,
            _: Request<v1::GetStateRequest>,
        ) -> Result<Response<v1::ClusterState>, Status> {
            unused()
        }
        async fn list_sessions(
            &self,
            _: Request<v1::ListSessionsRequest>,
        ) -> Result<Response<v1::ListSessionsResponse>, Status> {
            unused()
        }
        async fn list_affinity(
            &self,
            _: Request<v1::ListAffinityRequest>,
        ) -> Result<Response<v1::ListAffinityResponse>, Status> {
            unused()
        }
        async fn drain(
            &self,
            _: Request<v1::DrainRequest>,
        ) -> Result<Response<v1::DrainResponse>, Status> {
            unused()
        }
        async fn undrain(
            &self,
            _: Request<v1::DrainRequest>,
        ) -> Result<Response<v1::DrainResponse>, Status> {
            unused()
        }
        async fn reprobe(
            &self,
            _: Request<v1::ReprobeRequest>,
        ) -> Result<Response<v1::ReprobeResponse>, Status> {
            unused()
        }
        async fn list_model_items(
            &self,
            _: Request<v1::ListModelItemsRequest>,
        ) -> Result<Response<v1::ListModelItemsResponse>, Status> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(Response::new(v1::ListModelItemsResponse {
                endpoints: vec![v1::EndpointModelItems {
                    url: "http://o:1".into(),
                    tags: vec![format!(r#"{{"name":"m","call":{n}}}"#)],
                    ps: vec![],
                    models: vec![],
                }],
            }))
        }
    }

    async fn serve(fake: Counting) -> Channel {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ClusterServer::new(fake))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect_lazy()
    }

    #[test]
    fn catalog_from_proto_keeps_every_kind_of_item() {
        let catalog = catalog_from_proto(v1::ListModelItemsResponse {
            endpoints: vec![
                v1::EndpointModelItems {
                    url: "http://o:1".into(),
                    tags: vec![r#"{"name":"a:latest"}"#.into()],
                    ps: vec![r#"{"name":"a:latest","size_vram":1}"#.into()],
                    models: vec![],
                },
                v1::EndpointModelItems {
                    url: "http://v:1/v1".into(),
                    tags: vec![],
                    ps: vec![],
                    models: vec![r#"{"id":"m","max_model_len":4096}"#.into()],
                },
            ],
        });
        assert_eq!(catalog.len(), 2);
        assert_eq!(&*catalog[0].1.tags[0], r#"{"name":"a:latest"}"#);
        assert_eq!(&*catalog[0].1.ps[0], r#"{"name":"a:latest","size_vram":1}"#);
        assert!(catalog[0].1.models.is_empty());
        assert_eq!(&*catalog[1].0, "http://v:1/v1");
        assert_eq!(
            &*catalog[1].1.models[0],
            r#"{"id":"m","max_model_len":4096}"#
        );
    }

    #[tokio::test]
    async fn concurrent_listings_share_one_call_and_the_answer_is_kept() {
        let fake = Counting::default();
        let channel = serve(fake.clone()).await;
        let cache = Arc::new(ItemsCache::default());
        let timeout = Duration::from_secs(5);
        let listings: Vec<_> = (0..8)
            .map(|_| {
                let (cache, channel) = (cache.clone(), channel.clone());
                tokio::spawn(async move { cache.get(&channel, true, timeout).await })
            })
            .collect();
        for listing in listings {
            let catalog = listing.await.unwrap();
            assert_eq!(&*catalog[0].0, "http://o:1");
            assert_eq!(&*catalog[0].1.tags[0], r#"{"name":"m","call":0}"#);
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
        // Fresh: no call. Unreachable: the last answer, no call.
        cache.get(&channel, true, timeout).await;
        let kept = cache.get(&channel, false, timeout).await;
        assert_eq!(kept.len(), 1);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
        // Nothing cached and unreachable: names only, no call.
        let empty = ItemsCache::default().get(&channel, false, timeout).await;
        assert!(empty.is_empty());
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_answer_found_behind_is_asked_for_again_once_per_lack() {
        let fake = Counting::default();
        let channel = serve(fake.clone()).await;
        let cache = ItemsCache::default();
        let timeout = Duration::from_secs(5);
        let calls = || fake.calls.load(Ordering::SeqCst);
        cache.get(&channel, true, timeout).await;
        assert!(!cache.expire_if_newly_behind(None));
        cache.get(&channel, true, timeout).await;
        assert_eq!(calls(), 1, "not behind: the cached answer");
        // Behind: asked for again at once, well within MAX_AGE.
        assert!(cache.expire_if_newly_behind(Some(7)));
        let again = cache.get(&channel, true, timeout).await;
        assert_eq!(calls(), 2);
        assert_eq!(&*again[0].1.tags[0], r#"{"name":"m","call":1}"#);
        // Still lacking the same: not again (until MAX_AGE).
        assert!(!cache.expire_if_newly_behind(Some(7)));
        cache.get(&channel, true, timeout).await;
        assert_eq!(calls(), 2);
        // Lacking something else: again.
        assert!(cache.expire_if_newly_behind(Some(8)));
        cache.get(&channel, true, timeout).await;
        assert_eq!(calls(), 3);
        // Caught up, then lacking the first again (say, deleted and
        // pulled again): again.
        assert!(!cache.expire_if_newly_behind(None));
        assert!(cache.expire_if_newly_behind(Some(7)));
        cache.get(&channel, true, timeout).await;
        assert_eq!(calls(), 4);
    }
}
