//! Listings and liveness, answered from the router's latest cluster state
//! (never by fanning out to backends per request): `GET /api/tags`,
//! `/api/ps`, `/v1/models`, `/v1/models/{id}`, `/api/version`, `/` and
//! `/health`.
//!
//! Invariants:
//! - Only endpoints that are healthy and not draining contribute models:
//!   a listed model is one a request can be routed to now.
//! - Listings never depend on credentials (nomyo bug 10: an OpenAI endpoint
//!   without an API key entry made `/api/tags` fail): the names come from
//!   the discovery snapshot.
//! - `/health` is 200 only while at least one backend is healthy, 503
//!   otherwise (nomyo bug 11: it always said ok).
//! - Names are deduplicated; OpenAI ids appear as `id:latest` in the Ollama
//!   listings (as nomyo-router shows them) and as-is in `/v1/models`.
//! - An Ollama endpoint's own `/api/tags` and `/api/ps` items (size,
//!   digest, modified_at, details, expires_at, size_vram, ...) are shown as
//!   it sent them, from the control plane's discovery ([`ModelCatalog`]),
//!   with `name` and `model` set to the listed name. An OpenAI-style or
//!   llama-server endpoint's own `/v1/models` items (created, owned_by,
//!   max_model_len, status, ...) are shown as it sent them in
//!   `/v1/models`, and give `modified_at` (`created`) in `/api/tags` and
//!   `context_length` in `/api/ps`; everything else about those models in
//!   the Ollama listings is the placeholder of [`listing`], as are the
//!   items of models without an own item (not known yet).
//! - Remote, the items come from the control plane (`ListModelItems`,
//!   cached for two seconds) and the names from `WatchUsage`. A listing
//!   whose items lack a model its state lists (one pulled or loaded on a
//!   backend outside the router) asks for the items again at once
//!   ([`state_and_items`]), so such a model does not show a placeholder
//!   until the cached answer ages out.
//! - `/api/version` is the lowest version among the routable Ollama
//!   endpoints, capped at [`OLLAMA_COMPAT_VERSION`] ([`api_version`]).

use std::{
    collections::{BTreeMap, HashMap},
    hash::{DefaultHasher, Hash, Hasher},
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{
    Json,
    extract::{Path, State, rejection::PathRejection},
    response::{IntoResponse, Response},
};
use http::StatusCode;
use serde_json::{Value, json};
use switchyard_control_plane::{
    cluster::{ClusterState, EndpointState},
    endpoint::EndpointKind,
    model_name::canonical_request_name,
};

use crate::{
    errors::ProxyError,
    router::{ModelCatalog, Router, StateSource},
    routes::ApiFormat,
    server::AppState,
    translate::{listing, timestamp},
};

/// The Ollama API level the sidecar serves (translation to OpenAI-style
/// backends included), and the most `/api/version` answers. Clients
/// (ollama-python, Open WebUI, editors) gate features such as `think`,
/// structured outputs and tool calling on that version, so `/api/version`
/// answers the lowest version among the healthy, non-draining Ollama
/// endpoints whose version discovery knows (as nomyo-router does: a client
/// then sends nothing an older backend rejects), or this when that is
/// higher or no such version is known. Versions compare numerically by
/// major.minor.patch; a leading `v` and a suffix such as `-rc1` are
/// tolerated (a pre-release sorts below its release); an unparseable
/// version is ignored. OpenAI-style endpoints have no Ollama version and
/// never lower the answer. See [`api_version`].
pub const OLLAMA_COMPAT_VERSION: &str = "0.12.3";

/// How long `/api/ps` says a loaded model stays loaded (Ollama's default
/// `keep_alive`); the real expiry is per backend and not in the snapshot.
const PS_EXPIRES_IN: Duration = Duration::from_secs(300);

fn routable(state: &ClusterState) -> impl Iterator<Item = &EndpointState> {
    state.endpoints.iter().filter(|e| e.healthy && !e.draining)
}

/// Which models of an endpoint a listing shows, and which of its own
/// items go with them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Listing {
    /// Advertised models; Ollama `/api/tags` items.
    Tags,
    /// Loaded models; Ollama `/api/ps` items.
    Ps,
}

/// An endpoint's own item for a model, in the shape its backend lists it.
enum Own {
    /// An Ollama `/api/tags` or `/api/ps` item.
    Ollama(Value),
    /// An OpenAI-style or llama-server `{base}/models` `data` item.
    OpenAi(Value),
}

/// Each JSON object of `texts` by the name it gives under the first of
/// `keys` it has (texts that are not such an object are skipped).
fn objects_by_name(
    texts: &[std::sync::Arc<str>],
    keys: &[&str],
) -> impl Iterator<Item = (String, Value)> {
    texts.iter().filter_map(|text| {
        let Ok(Value::Object(item)) = serde_json::from_str::<Value>(text) else {
            return None;
        };
        let name = keys
            .iter()
            .find_map(|k| item.get(*k).and_then(Value::as_str))?
            .to_owned();
        Some((name, Value::Object(item)))
    })
}

/// An endpoint's own items for one listing, by the name the endpoint uses:
/// its Ollama items of that listing and its `{base}/models` items (an
/// endpoint has one kind or the other; an Ollama item wins a name both
/// give).
fn own_items(catalog: &ModelCatalog, url: &str, which: Listing) -> HashMap<String, Own> {
    let Some((_, items)) = catalog.iter().find(|(u, _)| &**u == url) else {
        return HashMap::new();
    };
    let ollama = match which {
        Listing::Tags => &items.tags,
        Listing::Ps => &items.ps,
    };
    let openai = objects_by_name(&items.models, &["id"]).map(|(n, item)| (n, Own::OpenAi(item)));
    let ollama =
        objects_by_name(ollama, &["name", "model"]).map(|(n, item)| (n, Own::Ollama(item)));
    openai.chain(ollama).collect()
}

/// What `catalog` lacks that `state` lists, as a fingerprint, or `None`
/// when it lacks nothing: the models (advertised or loaded) of routable
/// endpoints it has an entry for that have no item of their own there.
/// Discovery records an endpoint's names and items together, so a lack
/// means the names reached the sidecar before the items.
fn items_missing(state: &ClusterState, catalog: &ModelCatalog) -> Option<u64> {
    let mut missing = None;
    for endpoint in routable(state) {
        if !catalog.iter().any(|(url, _)| **url == *endpoint.url) {
            continue;
        }
        for (which, models) in [
            (Listing::Tags, &endpoint.advertised_models),
            (Listing::Ps, &endpoint.loaded_models),
        ] {
            let own = own_items(catalog, &endpoint.url, which);
            for model in models.iter().filter(|m| !own.contains_key(&***m)) {
                let hasher = missing.get_or_insert_with(DefaultHasher::new);
                (&*endpoint.url, which as u8, &**model).hash(hasher);
            }
        }
    }
    missing.map(|h| h.finish())
}

/// The router's cluster state and the items to list it with: asked for
/// again at once when the cached items newly lack what the state lists
/// (see the module's invariants).
async fn state_and_items(router: &Router) -> (Arc<ClusterState>, Arc<ModelCatalog>) {
    let state = router.cluster_state();
    let catalog = router.model_items().await;
    if router.expire_items_behind(|| items_missing(&state, &catalog)) {
        return (state, router.model_items().await);
    }
    (state, catalog)
}

/// When `endpoint`'s `/v1/models` entry for `model` says it was created,
/// if the router's items have that entry: the `modified_at` of its
/// `/api/show` answer, the same as its `/api/tags` item's.
pub(crate) async fn created_on(router: &Router, endpoint: &str, model: &str) -> Option<SystemTime> {
    let catalog = router.model_items().await;
    match own_items(&catalog, endpoint, Listing::Tags).remove(model)? {
        Own::OpenAi(item) => listing::created(&item),
        Own::Ollama(_) => None,
    }
}

/// The endpoint's own item for `model`, named `name`.
fn named(mut item: Value, name: &str) -> Value {
    if let Value::Object(fields) = &mut item {
        fields.insert("name".into(), name.into());
        fields.insert("model".into(), name.into());
    }
    item
}

/// One listing merged over the routable endpoints, in configuration order:
/// each model of the endpoints' `which` list once, under `key(model)` (the
/// first endpoint to list it wins), made by `item` from the endpoint, the
/// model as the endpoint names it, its key, and the endpoint's own item for
/// it if the catalog has one (`None` from `item` leaves the key to a later
/// endpoint). Sorted by key.
fn merged(
    state: &ClusterState,
    catalog: &ModelCatalog,
    which: Listing,
    key: impl Fn(&str) -> String,
    item: impl Fn(&EndpointState, &str, &str, Option<Own>) -> Option<Value>,
) -> Vec<Value> {
    let mut items: BTreeMap<String, Value> = BTreeMap::new();
    for endpoint in routable(state) {
        let mut own = own_items(catalog, &endpoint.url, which);
        let models = match which {
            Listing::Tags => &endpoint.advertised_models,
            Listing::Ps => &endpoint.loaded_models,
        };
        for model in models {
            let key = key(model);
            if items.contains_key(&key) {
                continue;
            }
            if let Some(made) = item(endpoint, model, &key, own.remove(&**model)) {
                items.insert(key, made);
            }
        }
    }
    items.into_values().collect()
}

/// `/api/tags` body for a cluster state; `catalog` supplies the endpoints'
/// own items (an OpenAI-style model's `modified_at` is its `created`,
/// `now` without one).
pub fn tags_body(state: &ClusterState, catalog: &ModelCatalog, now: SystemTime) -> Value {
    let items = merged(
        state,
        catalog,
        Listing::Tags,
        canonical_request_name,
        |endpoint, model, name, own| {
            Some(match own {
                Some(Own::Ollama(item)) => named(item, name),
                Some(Own::OpenAi(item)) => {
                    listing::tags_item_from_model(model, &item, endpoint.kind, now)
                }
                None => listing::tags_item(model, endpoint.kind, now),
            })
        },
    );
    json!({ "models": items })
}

/// `/api/ps` body for a cluster state; `catalog` supplies the endpoints'
/// own items (a llama-server model's `context_length` is its serving
/// context, when its item shows it). Sorted as Ollama sorts it: latest
/// `expires_at` first (then by name).
pub fn ps_body(state: &ClusterState, catalog: &ModelCatalog, now: SystemTime) -> Value {
    let expires_at = now + PS_EXPIRES_IN;
    let mut items = merged(
        state,
        catalog,
        Listing::Ps,
        canonical_request_name,
        |endpoint, model, name, own| {
            Some(match own {
                Some(Own::Ollama(item)) => named(item, name),
                Some(Own::OpenAi(item)) => listing::ps_item(
                    model,
                    endpoint.kind,
                    expires_at,
                    listing::model_context_length(&item),
                ),
                None => listing::ps_item(model, endpoint.kind, expires_at, None),
            })
        },
    );
    items.sort_by_cached_key(|item| {
        std::cmp::Reverse(
            item["expires_at"]
                .as_str()
                .and_then(timestamp::parse_rfc3339_unix),
        )
    });
    json!({ "models": items })
}

/// `/v1/models` body for a cluster state. An OpenAI-style or llama-server
/// endpoint's own `/v1/models` item is listed as the backend sent it
/// (created, owned_by, max_model_len, status, ...); an Ollama endpoint's
/// own `/api/tags` item gives `created` (its `modified_at`), as Ollama's
/// own `/v1/models` does. Without an own item (not known yet, or a control
/// plane that predates OpenAI-style items) the item is made from the name.
pub fn openai_models_body(state: &ClusterState, catalog: &ModelCatalog) -> Value {
    let items = merged(
        state,
        catalog,
        Listing::Tags,
        str::to_owned,
        |_, model, _, own| match own {
            Some(Own::OpenAi(item)) => Some(item),
            Some(Own::Ollama(item)) => listing::openai_model_from_tag(&named(item, model)),
            None => listing::openai_model_from_tag(&json!({ "name": model })),
        },
    );
    json!({ "object": "list", "data": items })
}

/// The `/v1/models` item for `model` in `models` (a [`openai_models_body`]):
/// the same id, or the same model by name (`llama3` is `llama3:latest`).
/// `Err` carries the ids there are.
pub fn openai_model_in(models: &Value, model: &str) -> Result<Value, Vec<String>> {
    let items = models["data"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let id = |m: &Value| m["id"].as_str().unwrap_or_default().to_owned();
    let wanted = canonical_request_name(model);
    items
        .iter()
        .find(|m| m["id"] == model)
        .or_else(|| {
            items
                .iter()
                .find(|m| canonical_request_name(&id(m)) == wanted)
        })
        .cloned()
        .ok_or_else(|| items.iter().map(id).collect())
}

/// `/health` status and body for a cluster state; `source` says where the
/// state comes from (`control_plane`, `last_known`, `own_probes`, `none`).
pub fn health(
    state: &ClusterState,
    control_plane_connected: bool,
    source: StateSource,
) -> (StatusCode, Value) {
    let healthy = state.endpoints.iter().filter(|e| e.healthy).count();
    let ok = healthy > 0;
    let body = json!({
        "status": if ok { "ok" } else { "unavailable" },
        "healthy_endpoints": healthy,
        "endpoints": state.endpoints.len(),
        "control_plane_connected": control_plane_connected,
        "cluster_state": source.as_str(),
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

/// A version without surrounding blanks and a leading `v`.
fn bare_version(version: &str) -> &str {
    let version = version.trim();
    version.strip_prefix(['v', 'V']).unwrap_or(version)
}

/// How a version sorts: major, minor and patch numerically (missing ones
/// are 0), then a pre-release (`0.6.0-rc1`; any suffix but `+build`)
/// below its release. `None` when it is not a version: no leading number,
/// an empty or non-numeric component, or more than three; or `0.0.0`,
/// which is what an Ollama built from source reports (a development build,
/// usually the newest, not the oldest: counting it would switch features
/// off for every client).
fn version_key(version: &str) -> Option<([u64; 3], bool)> {
    let version = bare_version(version);
    let end = version
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(version.len());
    let (numbers, suffix) = version.split_at(end);
    let mut key = [0; 3];
    let mut parts = numbers.split('.');
    for slot in &mut key {
        match parts.next() {
            Some(part) => *slot = part.parse().ok()?,
            None => break,
        }
    }
    if parts.next().is_some() {
        return None;
    }
    if key == [0; 3] {
        return None;
    }
    let release = suffix.is_empty() || suffix.starts_with('+');
    Some((key, release))
}

/// The `/api/version` answer for a cluster state: the lowest version among
/// the routable Ollama endpoints, capped at [`OLLAMA_COMPAT_VERSION`] (see
/// there), as the endpoint reported it without a leading `v`.
pub fn api_version(state: &ClusterState) -> &str {
    let mut lowest = OLLAMA_COMPAT_VERSION;
    let mut lowest_key = version_key(lowest);
    for endpoint in routable(state).filter(|e| e.kind == EndpointKind::Ollama) {
        let Some(key) = version_key(&endpoint.version) else {
            continue;
        };
        if lowest_key.is_none_or(|lowest| key < lowest) {
            lowest = bare_version(&endpoint.version);
            lowest_key = Some(key);
        }
    }
    lowest
}

/// `GET /` and `HEAD /`: Ollama's liveness text.
pub(crate) async fn root() -> &'static str {
    "Ollama is running"
}

/// `GET /api/version`: [`api_version`] of the router's latest cluster
/// state (no backend is asked).
pub(crate) async fn version(State(state): State<AppState>) -> Json<Value> {
    Json(json!({ "version": api_version(&state.router().cluster_state()) }))
}

/// `GET /health`.
pub(crate) async fn health_handler(State(state): State<AppState>) -> Response {
    let router = state.router();
    let (status, body) = health(
        &router.cluster_state(),
        router.control_plane_connected(),
        router.state_source(),
    );
    (status, Json(body)).into_response()
}

/// `GET /api/tags`.
pub(crate) async fn tags(State(state): State<AppState>) -> Json<Value> {
    let (cluster, catalog) = state_and_items(state.router()).await;
    Json(tags_body(&cluster, &catalog, SystemTime::now()))
}

/// `GET /api/ps`.
pub(crate) async fn ps(State(state): State<AppState>) -> Json<Value> {
    let (cluster, catalog) = state_and_items(state.router()).await;
    Json(ps_body(&cluster, &catalog, SystemTime::now()))
}

/// `GET /v1/models`.
pub(crate) async fn openai_models(State(state): State<AppState>) -> Json<Value> {
    let (cluster, catalog) = state_and_items(state.router()).await;
    Json(openai_models_body(&cluster, &catalog))
}

/// `GET /v1/models/{model}` (OpenAI "retrieve model"): the `/v1/models`
/// item, or 404 `model_not_found` in OpenAI's format.
pub(crate) async fn openai_model(
    State(state): State<AppState>,
    model: Result<Path<String>, PathRejection>,
) -> Response {
    let model = match model {
        Ok(Path(model)) => model,
        Err(e) => return ProxyError::from(e).into_response_for(ApiFormat::OpenAi),
    };
    let (cluster, catalog) = state_and_items(state.router()).await;
    let models = openai_models_body(&cluster, &catalog);
    match openai_model_in(&models, &model) {
        Ok(item) => Json(item).into_response(),
        Err(available) => {
            ProxyError::ModelNotFound { model, available }.into_response_for(ApiFormat::OpenAi)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;

    use switchyard_control_plane::{api::ModelItems, endpoint::EndpointKind};

    use super::*;

    fn endpoint(
        url: &str,
        kind: EndpointKind,
        healthy: bool,
        advertised: &[&str],
        loaded: &[&str],
    ) -> EndpointState {
        EndpointState {
            healthy,
            health_detail: String::new(),
            advertised_models: advertised.iter().map(|m| Arc::from(*m)).collect(),
            loaded_models: loaded.iter().map(|m| Arc::from(*m)).collect(),
            ..EndpointState::new(url, kind)
        }
    }

    fn state() -> ClusterState {
        ClusterState {
            endpoints: vec![
                endpoint(
                    "http://o1:11434",
                    EndpointKind::Ollama,
                    true,
                    &["llama3:latest", "qwen3:8b"],
                    &["qwen3:8b"],
                ),
                endpoint(
                    "http://o2:11434",
                    EndpointKind::Ollama,
                    true,
                    &["llama3:latest"],
                    &[],
                ),
                // An OpenAI endpoint (no API key needed to list it).
                endpoint(
                    "https://api.x/v1",
                    EndpointKind::OpenAi,
                    true,
                    &["gpt-4o"],
                    &[],
                ),
                endpoint(
                    "http://down:11434",
                    EndpointKind::Ollama,
                    false,
                    &["ghost:1b"],
                    &["ghost:1b"],
                ),
            ],
            ..ClusterState::default()
        }
    }

    #[test]
    fn tags_merge_dedupe_and_show_openai_ids_as_latest() {
        let body = tags_body(&state(), &ModelCatalog::new(), SystemTime::UNIX_EPOCH);
        let names = names(&body);
        assert_eq!(names, ["gpt-4o:latest", "llama3:latest", "qwen3:8b"]);
    }

    #[test]
    fn ps_lists_loaded_models_of_healthy_endpoints() {
        let body = ps_body(&state(), &ModelCatalog::new(), SystemTime::UNIX_EPOCH);
        let names = names(&body);
        assert_eq!(names, ["qwen3:8b"]);
    }

    /// o1's own items: qwen3 with its metadata in both listings, an item
    /// for a model it no longer advertises, and one that is not JSON.
    fn catalog() -> ModelCatalog {
        let tags = vec![
            Arc::from(
                r#"{"name":"qwen3:8b","model":"qwen3:8b","modified_at":"2025-05-10T08:06:48-07:00","size":5225388164,"digest":"d1","details":{"family":"qwen3","parameter_size":"8.2B","quantization_level":"Q4_K_M"},"capabilities":["completion","tools"]}"#,
            ),
            Arc::from(r#"{"name":"gone:1b","size":1}"#),
            Arc::from("not json"),
        ];
        let ps = vec![Arc::from(
            r#"{"model":"qwen3:8b","size":6000000000,"size_vram":5000000000,"digest":"d1","expires_at":"2026-11-27T16:00:00Z","context_length":8192}"#,
        )];
        let items = ModelItems {
            tags,
            ps,
            models: vec![],
        };
        vec![(Arc::from("http://o1:11434"), Arc::new(items))]
    }

    #[test]
    fn a_catalog_lacking_a_listed_model_of_an_endpoint_it_has_is_behind() {
        // o1 advertises llama3 and qwen3 (loaded); its items have qwen3 only.
        assert!(items_missing(&state(), &catalog()).is_some());
        // No entry for an endpoint (no items known for it): not behind.
        assert_eq!(items_missing(&state(), &ModelCatalog::new()), None);
        let only_o1 = |advertised: &[&str], loaded: &[&str]| ClusterState {
            endpoints: vec![
                endpoint(
                    "http://o1:11434",
                    EndpointKind::Ollama,
                    true,
                    advertised,
                    loaded,
                ),
                // Down: what it lists does not count.
                endpoint(
                    "http://down:11434",
                    EndpointKind::Ollama,
                    false,
                    &["ghost:1b"],
                    &[],
                ),
            ],
            ..ClusterState::default()
        };
        let mut catalog = catalog();
        catalog.push((
            Arc::from("http://down:11434"),
            Arc::new(ModelItems::default()),
        ));
        let missing = |state: &ClusterState, catalog: &ModelCatalog| items_missing(state, catalog);
        assert_eq!(
            missing(&only_o1(&["qwen3:8b"], &["qwen3:8b"]), &catalog),
            None
        );
        assert_eq!(missing(&only_o1(&["qwen3:8b"], &[]), &catalog), None);
        // Pulled (advertised) or loaded outside the router: behind, and
        // each lack has its own fingerprint.
        let pulled = missing(&only_o1(&["qwen3:8b", "new:1b"], &[]), &catalog);
        let other = missing(&only_o1(&["qwen3:8b", "other:1b"], &[]), &catalog);
        assert!(pulled.is_some() && other.is_some() && pulled != other);
        assert_eq!(
            pulled,
            missing(&only_o1(&["qwen3:8b", "new:1b"], &[]), &catalog)
        );
        let tags_only = ModelItems {
            ps: vec![],
            ..(*catalog[0].1).clone()
        };
        catalog[0].1 = Arc::new(tags_only);
        let loaded = missing(&only_o1(&["qwen3:8b"], &["qwen3:8b"]), &catalog);
        assert!(loaded.is_some() && loaded != pulled);
    }

    /// The `name` of each item of a listing body, in order.
    fn names(body: &Value) -> Vec<&str> {
        body["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap())
            .collect()
    }

    fn by_name<'a>(body: &'a Value, name: &str) -> &'a Value {
        body["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap()
    }

    #[test]
    fn listings_show_the_endpoints_own_items() {
        let tags = tags_body(&state(), &catalog(), SystemTime::UNIX_EPOCH);
        let names = names(&tags);
        // Only advertised models of routable endpoints are listed.
        assert_eq!(names, ["gpt-4o:latest", "llama3:latest", "qwen3:8b"]);
        let qwen = by_name(&tags, "qwen3:8b");
        assert_eq!(qwen["size"], 5_225_388_164_u64);
        assert_eq!(qwen["digest"], "d1");
        assert_eq!(qwen["modified_at"], "2025-05-10T08:06:48-07:00");
        assert_eq!(qwen["details"]["parameter_size"], "8.2B");
        assert_eq!(qwen["capabilities"][1], "tools");
        assert_eq!(qwen["model"], "qwen3:8b");
        // No own item: the placeholder.
        assert_eq!(by_name(&tags, "llama3:latest")["size"], 0);
        assert_eq!(by_name(&tags, "gpt-4o:latest")["digest"], "");

        let ps = ps_body(&state(), &catalog(), SystemTime::UNIX_EPOCH);
        let qwen = by_name(&ps, "qwen3:8b");
        assert_eq!(qwen["size_vram"], 5_000_000_000_u64);
        assert_eq!(qwen["expires_at"], "2026-11-27T16:00:00Z");
        assert_eq!(qwen["context_length"], 8192);
        // `name` is filled in when the backend sent only `model`.
        assert_eq!(qwen["name"], "qwen3:8b");
    }

    #[test]
    fn ps_lists_the_latest_expiry_first() {
        let state = ClusterState {
            endpoints: vec![endpoint(
                "http://o1:11434",
                EndpointKind::Ollama,
                true,
                &["a:1b", "b:1b", "c:1b"],
                &["a:1b", "b:1b", "c:1b"],
            )],
            ..ClusterState::default()
        };
        let ps = vec![
            Arc::from(r#"{"name":"a:1b","expires_at":"2026-01-01T00:00:00Z"}"#),
            Arc::from(r#"{"name":"b:1b","expires_at":"2027-01-01T00:00:00+02:00"}"#),
            Arc::from(r#"{"name":"c:1b","expires_at":"garbage"}"#),
        ];
        let items = ModelItems {
            tags: vec![],
            ps,
            models: vec![],
        };
        let catalog = vec![(Arc::from("http://o1:11434"), Arc::new(items))];
        let body = ps_body(&state, &catalog, SystemTime::UNIX_EPOCH);
        let names = names(&body);
        assert_eq!(names, ["b:1b", "a:1b", "c:1b"]);
    }

    #[test]
    fn openai_models_list_shape() {
        let body = openai_models_body(&state(), &catalog());
        assert_eq!(body["object"], "list");
        let ids: Vec<&str> = body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["gpt-4o", "llama3:latest", "qwen3:8b"]);
        assert_eq!(body["data"][0]["object"], "model");
        // `created` is the Ollama item's `modified_at` (2025-05-10T15:06:48Z);
        // 0 without one.
        assert_eq!(body["data"][2]["created"], 1_746_889_608);
        assert_eq!(body["data"][1]["created"], 0);
    }

    /// Two vLLM endpoints serving `shared` (with different items), a
    /// llama-server, and an OpenAI endpoint whose items are not known
    /// (e.g. from a control plane that predates them).
    fn openai_style() -> (ClusterState, ModelCatalog) {
        let state = ClusterState {
            endpoints: vec![
                endpoint(
                    "http://v1:8000/v1",
                    EndpointKind::OpenAi,
                    true,
                    &["shared", "only-v1"],
                    &[],
                ),
                endpoint(
                    "http://v2:8000/v1",
                    EndpointKind::OpenAi,
                    true,
                    &["shared"],
                    &[],
                ),
                endpoint(
                    "http://l:8080",
                    EndpointKind::LlamaServer,
                    true,
                    &["org/g-GGUF:Q4_K_M", "org/off-GGUF:Q8_0"],
                    &["org/g-GGUF:Q4_K_M"],
                ),
                endpoint(
                    "https://api.x/v1",
                    EndpointKind::OpenAi,
                    true,
                    &["gpt-4o-mini"],
                    &[],
                ),
            ],
            ..ClusterState::default()
        };
        let models = |texts: &[&str]| {
            Arc::new(ModelItems {
                models: texts.iter().map(|t| Arc::from(*t)).collect(),
                ..ModelItems::default()
            })
        };
        let catalog = vec![
            (
                Arc::from("http://v1:8000/v1"),
                models(&[
                    r#"{"id":"shared","object":"model","created":1700000000,"owned_by":"vllm","max_model_len":4096,"root":"/w/shared"}"#,
                    r#"{"id":"only-v1","object":"model","created":0,"owned_by":"vllm","max_model_len":8192}"#,
                ]),
            ),
            (
                Arc::from("http://v2:8000/v1"),
                models(&[
                    r#"{"id":"shared","object":"model","created":1,"owned_by":"other","max_model_len":1}"#,
                ]),
            ),
            (
                Arc::from("http://l:8080"),
                models(&[
                    r#"{"id":"org/g-GGUF:Q4_K_M","object":"model","created":1700000001,"owned_by":"llamacpp","status":{"value":"loaded","args":["llama-server","-c","16384"]}}"#,
                    r#"{"id":"org/off-GGUF:Q8_0","object":"model","owned_by":"llamacpp","status":{"value":"unloaded"}}"#,
                ]),
            ),
        ];
        (state, catalog)
    }

    #[test]
    fn openai_style_models_are_listed_as_the_backend_sent_them() {
        let (state, catalog) = openai_style();
        let body = openai_models_body(&state, &catalog);
        let data = body["data"].as_array().unwrap();
        let ids: Vec<&str> = data.iter().map(|m| m["id"].as_str().unwrap()).collect();
        assert_eq!(
            ids,
            [
                "gpt-4o-mini",
                "only-v1",
                "org/g-GGUF:Q4_K_M",
                "org/off-GGUF:Q8_0",
                "shared"
            ]
        );
        // Every field as sent; the first endpoint to list a model wins.
        assert_eq!(
            data[4],
            json!({"id":"shared","object":"model","created":1_700_000_000,"owned_by":"vllm","max_model_len":4096,"root":"/w/shared"})
        );
        assert_eq!(data[1]["created"], 0);
        assert_eq!(data[1]["max_model_len"], 8192);
        // llama-server items keep their status and owner.
        assert_eq!(data[2]["status"]["value"], "loaded");
        assert_eq!(data[2]["owned_by"], "llamacpp");
        assert_eq!(data[3]["status"]["value"], "unloaded");
        // No own item: made from the name, as before.
        assert_eq!(
            data[0],
            json!({"id":"gpt-4o-mini","object":"model","created":0,"owned_by":"library"})
        );
        // Retrieval gives the same item.
        assert_eq!(openai_model_in(&body, "shared").unwrap(), data[4]);

        // Without the v1 endpoint, v2's item is the one listed.
        let mut without_v1 = state.clone();
        without_v1.endpoints[0].healthy = false;
        let body = openai_models_body(&without_v1, &catalog);
        let shared = openai_model_in(&body, "shared").unwrap();
        assert_eq!(shared["owned_by"], "other");
        assert_eq!(shared["max_model_len"], 1);
    }

    #[test]
    fn ollama_listings_of_openai_style_models_use_their_items() {
        let (state, catalog) = openai_style();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(5);
        let tags = tags_body(&state, &catalog, now);
        assert_eq!(
            names(&tags),
            [
                "gpt-4o-mini:latest",
                "only-v1:latest",
                "org/g-GGUF:Q4_K_M",
                "org/off-GGUF:Q8_0",
                "shared:latest"
            ]
        );
        // `modified_at` is `created`; `now` when it is missing or 0.
        let shared = by_name(&tags, "shared:latest");
        assert_eq!(shared["modified_at"], "2023-11-14T22:13:20.000000000Z");
        assert_eq!(shared["size"], 0);
        assert_eq!(shared["model"], "shared:latest");
        let now_text = "1970-01-01T00:00:05.000000000Z";
        assert_eq!(by_name(&tags, "only-v1:latest")["modified_at"], now_text);
        assert_eq!(by_name(&tags, "org/off-GGUF:Q8_0")["modified_at"], now_text);
        assert_eq!(
            by_name(&tags, "gpt-4o-mini:latest")["modified_at"],
            now_text
        );
        let gguf = by_name(&tags, "org/g-GGUF:Q4_K_M");
        assert_eq!(gguf["details"]["quantization_level"], "Q4_K_M");
        assert_eq!(gguf["details"]["format"], "gguf");

        // `/api/ps`: the llama-server's serving context.
        let ps = ps_body(&state, &catalog, now);
        assert_eq!(names(&ps), ["org/g-GGUF:Q4_K_M"]);
        assert_eq!(by_name(&ps, "org/g-GGUF:Q4_K_M")["context_length"], 16384);
    }

    #[test]
    fn one_openai_model_by_id_or_by_name() {
        let models = openai_models_body(&state(), &catalog());
        assert_eq!(
            openai_model_in(&models, "qwen3:8b").unwrap()["id"],
            "qwen3:8b"
        );
        // An untagged name is the `latest` tag.
        assert_eq!(
            openai_model_in(&models, "llama3").unwrap()["id"],
            "llama3:latest"
        );
        assert_eq!(openai_model_in(&models, "gpt-4o").unwrap()["id"], "gpt-4o");
        let available = openai_model_in(&models, "nope").unwrap_err();
        assert_eq!(available, ["gpt-4o", "llama3:latest", "qwen3:8b"]);
    }

    #[test]
    fn versions_compare_numerically_and_tolerate_v_and_suffixes() {
        let key = |v: &str| version_key(v).unwrap();
        assert_eq!(key("0.5.7"), ([0, 5, 7], true));
        assert_eq!(key(" v0.6.0-rc1 "), ([0, 6, 0], false));
        assert_eq!(key("1.2"), ([1, 2, 0], true));
        assert_eq!(key("0.5.7+build.3"), ([0, 5, 7], true));
        // Numerically, not as text.
        assert!(key("0.9.0") < key("0.10.0"));
        assert!(key("0.12.3") < key("0.99.0"));
        assert!(key("0.6.0-rc1") < key("0.6.0"));
        assert!(key("0.5.7") < key("0.6.0-rc1"));
        for bad in [
            "", "v", "dev", "latest", "1..2", "1.2.3.4", "x1.2.3", "-1.2", "0.0.0", "0",
        ] {
            assert_eq!(version_key(bad), None, "{bad:?}");
        }
        assert!(version_key(OLLAMA_COMPAT_VERSION).is_some());
    }

    #[test]
    fn api_version_is_the_lowest_routable_ollama_version_capped() {
        let versioned = |url, kind, version: &str| EndpointState {
            version: version.to_owned(),
            ..endpoint(url, kind, true, &["m:latest"], &[])
        };
        let answer = |endpoints: Vec<EndpointState>| {
            let state = ClusterState {
                endpoints,
                ..ClusterState::default()
            };
            api_version(&state).to_owned()
        };
        // No version known: the ceiling.
        assert_eq!(answer(vec![]), OLLAMA_COMPAT_VERSION);
        assert_eq!(
            answer(vec![versioned("http://o1", EndpointKind::Ollama, "")]),
            OLLAMA_COMPAT_VERSION
        );
        // The lowest, numerically (0.10.0 > 0.9.0 although "1" < "9").
        assert_eq!(
            answer(vec![
                versioned("http://o1", EndpointKind::Ollama, "0.10.0"),
                versioned("http://o2", EndpointKind::Ollama, "0.9.0"),
                versioned("http://o3", EndpointKind::Ollama, "0.9.1"),
            ]),
            "0.9.0"
        );
        // Newer than the ceiling: the ceiling.
        assert_eq!(
            answer(vec![versioned("http://o1", EndpointKind::Ollama, "0.99.0")]),
            OLLAMA_COMPAT_VERSION
        );
        // A pre-release below its release; a leading `v` is dropped.
        assert_eq!(
            answer(vec![
                versioned("http://o1", EndpointKind::Ollama, "0.6.0"),
                versioned("http://o2", EndpointKind::Ollama, "v0.6.0-rc1"),
            ]),
            "0.6.0-rc1"
        );
        // Unparseable versions, OpenAI-style endpoints, unhealthy and
        // draining endpoints do not count.
        let mut down = versioned("http://o3", EndpointKind::Ollama, "0.1.0");
        down.healthy = false;
        let mut draining = versioned("http://o4", EndpointKind::Ollama, "0.1.0");
        draining.draining = true;
        assert_eq!(
            answer(vec![
                versioned("http://o1", EndpointKind::Ollama, "dev"),
                versioned("https://x/v1", EndpointKind::OpenAi, "0.1.0"),
                versioned("http://l/v1", EndpointKind::LlamaServer, "0.1.0"),
                down,
                draining,
                versioned("http://o2", EndpointKind::Ollama, "0.5.7"),
            ]),
            "0.5.7"
        );
    }

    #[test]
    fn health_reflects_backends() {
        let (s, body) = health(&state(), true, StateSource::ControlPlane);
        assert_eq!(s, StatusCode::OK);
        assert_eq!(body["status"], "ok");
        assert_eq!(body["healthy_endpoints"], 3);
        assert_eq!(body["cluster_state"], "control_plane");
        let mut all_down = state();
        for e in &mut all_down.endpoints {
            e.healthy = false;
        }
        let (s, body) = health(&all_down, false, StateSource::OwnProbes);
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["status"], "unavailable");
        assert_eq!(body["cluster_state"], "own_probes");
        let (s, _) = health(&ClusterState::default(), true, StateSource::None);
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    }
}
