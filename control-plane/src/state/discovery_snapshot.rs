//! The discovery snapshot: models advertised and loaded per endpoint, plus a
//! precomputed index from a model's [`index_key`] to its candidate
//! endpoints. Immutable once built; the control plane swaps whole snapshots
//! atomically (`ArcSwap`) when a probe reports a change, so choices read it
//! without locking and never see half an update.
//!
//! Invariants: every endpoint's `models` are deduplicated by key; index
//! entries list candidates in configuration order; `slot` of a model is the
//! position of its usage counters in the lease table (assigned by the state
//! before the snapshot is published, and stable forever).

use std::sync::Arc;

// Keyed by the model names endpoints advertise (requests only look them up).
use super::FastMap;

use crate::{endpoint::EndpointKind, model_name::tracking_name, policy::index_key};

/// Whether every model the endpoint advertises counts as loaded for
/// selection: OpenAI-compatible servers (vLLM, hosted APIs) have no load
/// state and serve what they list at once. Without this they were never
/// "loaded", so conversation affinity (which follows only a loaded
/// endpoint) never applied to them, and they always ranked behind an Ollama
/// endpoint with the model loaded. Listings (`/api/ps`) still show nothing
/// loaded there, as nomyo-router does.
pub fn ready_without_loading(kind: EndpointKind) -> bool {
    kind == EndpointKind::OpenAi
}

/// One model an endpoint advertises.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdvertisedModel {
    /// Match key ([`index_key`] of the advertised name).
    pub key: Box<str>,
    /// The name as the endpoint advertises it (sent to the backend).
    pub backend_name: Arc<str>,
    /// The name usage is counted under.
    pub tracking_name: Arc<str>,
    /// Loaded there at the last probe, or served by an OpenAI-compatible
    /// endpoint (see [`ready_without_loading`]).
    pub loaded: bool,
    /// Position of the (endpoint, tracking model) usage counters.
    pub slot: u32,
}

/// What the last successful probe of one endpoint found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointDiscovery {
    /// Advertised names, as reported.
    pub advertised: Vec<Arc<str>>,
    /// Loaded names, as reported.
    pub loaded: Vec<Arc<str>>,
    /// Advertised models, deduplicated by key (first wins).
    pub models: Vec<AdvertisedModel>,
}

impl EndpointDiscovery {
    /// Parses a probe's lists. Slots are left at 0 until the state assigns them.
    pub fn parse(kind: EndpointKind, advertised: &[String], loaded: &[String]) -> Self {
        let loaded_keys: Vec<&str> = loaded.iter().map(|m| index_key(m)).collect();
        let mut models: Vec<AdvertisedModel> = Vec::with_capacity(advertised.len());
        for name in advertised {
            let key = index_key(name);
            if key.is_empty() || models.iter().any(|m| &*m.key == key) {
                continue;
            }
            models.push(AdvertisedModel {
                key: Box::from(key),
                backend_name: Arc::from(name.trim()),
                tracking_name: Arc::from(tracking_name(kind, name.trim())),
                loaded: ready_without_loading(kind) || loaded_keys.contains(&key),
                slot: 0,
            });
        }
        Self {
            advertised: advertised.iter().map(|m| Arc::from(m.as_str())).collect(),
            loaded: loaded.iter().map(|m| Arc::from(m.as_str())).collect(),
            models,
        }
    }

    /// Same advertised and loaded lists (the index would not change).
    pub fn same_lists(&self, advertised: &[String], loaded: &[String]) -> bool {
        fn eq(a: &[Arc<str>], b: &[String]) -> bool {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| **x == **y)
        }
        eq(&self.advertised, advertised) && eq(&self.loaded, loaded)
    }
}

/// One candidate endpoint for one model key: everything the decision loop
/// reads, 16 bytes, no pointers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Endpoint index (configuration order).
    pub endpoint: u32,
    /// Position in that endpoint's `models`.
    pub model: u32,
    /// Usage counters slot of (endpoint, tracking model).
    pub slot: u32,
    /// Model loaded there.
    pub loaded: bool,
}

/// The whole discovery view at one moment.
#[derive(Clone, Debug, Default)]
pub struct DiscoverySnapshot {
    /// Per endpoint, configuration order.
    pub endpoints: Vec<EndpointDiscovery>,
    index: FastMap<Box<str>, Vec<Candidate>>,
    available: Vec<String>,
}

impl DiscoverySnapshot {
    /// A snapshot where `n` endpoints advertise nothing (before any probe).
    pub fn empty(n: usize) -> Self {
        Self {
            endpoints: vec![EndpointDiscovery::default(); n],
            index: FastMap::default(),
            available: Vec::new(),
        }
    }

    /// This snapshot with endpoint `ep` replaced; index rebuilt.
    pub fn with_endpoint(&self, ep: usize, discovery: EndpointDiscovery) -> Self {
        let mut endpoints = self.endpoints.clone();
        if let Some(slot) = endpoints.get_mut(ep) {
            *slot = discovery;
        }
        Self::build(endpoints)
    }

    /// Builds the index over per-endpoint discoveries.
    pub fn build(endpoints: Vec<EndpointDiscovery>) -> Self {
        let mut index: FastMap<Box<str>, Vec<Candidate>> = FastMap::default();
        let mut available: Vec<String> = Vec::new();
        for (e, disc) in endpoints.iter().enumerate() {
            let endpoint = u32::try_from(e).unwrap_or(u32::MAX);
            available.extend(disc.advertised.iter().map(|m| m.to_string()));
            for (m, model) in disc.models.iter().enumerate() {
                index.entry(model.key.clone()).or_default().push(Candidate {
                    endpoint,
                    model: u32::try_from(m).unwrap_or(u32::MAX),
                    slot: model.slot,
                    loaded: model.loaded,
                });
            }
        }
        available.sort();
        available.dedup();
        Self {
            endpoints,
            index,
            available,
        }
    }

    /// Candidates for a requested model name (any spelling; see [`index_key`]).
    pub fn candidates(&self, requested: &str) -> &[Candidate] {
        self.index
            .get(index_key(requested))
            .map_or(&[], Vec::as_slice)
    }

    /// The advertised model a candidate stands for.
    pub fn model(&self, c: &Candidate) -> Option<&AdvertisedModel> {
        self.endpoints
            .get(c.endpoint as usize)?
            .models
            .get(c.model as usize)
    }

    /// Sorted, deduplicated advertised names over the cluster.
    pub fn available(&self) -> &[String] {
        &self.available
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn index_matches_latest_and_untagged_across_kinds() {
        let ollama = EndpointDiscovery::parse(
            EndpointKind::Ollama,
            &s(&["llama3:latest", "qwen:7b"]),
            &s(&["llama3"]),
        );
        let openai = EndpointDiscovery::parse(EndpointKind::OpenAi, &s(&["llama3"]), &[]);
        let llama = EndpointDiscovery::parse(
            EndpointKind::LlamaServer,
            &s(&["unsloth/gpt-oss-20b-GGUF:Q8_0"]),
            &s(&["unsloth/gpt-oss-20b-GGUF:Q8_0"]),
        );
        let snap = DiscoverySnapshot::build(vec![ollama, openai, llama]);
        for spelling in ["llama3", "llama3:latest", " llama3 "] {
            let c = snap.candidates(spelling);
            assert_eq!(c.len(), 2, "{spelling}");
            assert_eq!((c[0].endpoint, c[0].loaded), (0, true));
            // An OpenAI-compatible endpoint has no load state: ready.
            assert_eq!((c[1].endpoint, c[1].loaded), (1, true));
            assert_eq!(&*snap.model(&c[1]).unwrap().backend_name, "llama3");
            assert_eq!(&*snap.model(&c[1]).unwrap().tracking_name, "llama3");
            assert_eq!(&*snap.model(&c[0]).unwrap().tracking_name, "llama3:latest");
        }
        assert!(snap.candidates("qwen").is_empty());
        assert_eq!(snap.candidates("qwen:7b").len(), 1);
        let c = snap.candidates("unsloth/gpt-oss-20b-GGUF:Q8_0");
        assert_eq!(
            &*snap.model(&c[0]).unwrap().tracking_name,
            "gpt-oss-20b-GGUF"
        );
        assert!(c[0].loaded);
        assert_eq!(
            snap.available(),
            s(&[
                "llama3",
                "llama3:latest",
                "qwen:7b",
                "unsloth/gpt-oss-20b-GGUF:Q8_0"
            ])
        );
    }

    #[test]
    fn duplicate_spellings_on_one_endpoint_count_once() {
        let d = EndpointDiscovery::parse(EndpointKind::Ollama, &s(&["x", "x:latest"]), &[]);
        assert_eq!(d.models.len(), 1);
        assert!(d.same_lists(&s(&["x", "x:latest"]), &[]));
        assert!(!d.same_lists(&s(&["x"]), &[]));
    }
}
