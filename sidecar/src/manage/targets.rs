//! Which endpoints a model-management request (or an unload) goes to: a
//! pure function of the cluster state (see [`crate::manage`] for the rules).

use std::sync::Arc;

use switchyard_control_plane::{
    cluster::{ClusterState, EndpointState},
    endpoint::{EndpointKind, without_credentials},
    model_name::canonical_request_name,
};

use super::Operation;
use crate::errors::ProxyError;

/// The endpoints one request runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Targets {
    /// Endpoint URLs to send the request to, in configuration order.
    pub send_to: Vec<Arc<str>>,
    /// Ollama endpoints the request should reach but that fail their
    /// probes (pull, create: any; copy, delete: those that last advertised
    /// the model): not contacted, reported as failed (URL, probe error,
    /// never empty).
    pub down: Vec<(Arc<str>, String)>,
}

/// The targets of `op` for `model` in `state`.
///
/// Errors: [`ProxyError::ManagedModelNotFound`] when no Ollama endpoint
/// advertises the model (push, copy, delete); [`ProxyError::NoOllamaEndpoint`]
/// when there is no Ollama endpoint to pull or create on.
pub fn targets(state: &ClusterState, op: Operation, model: &str) -> Result<Targets, ProxyError> {
    let ollama = || {
        state
            .endpoints
            .iter()
            .filter(|e| e.kind == EndpointKind::Ollama)
    };
    match op {
        Operation::Pull | Operation::Create => {
            let (up, down): (Vec<_>, Vec<_>) = ollama().partition(|e| e.healthy);
            if up.is_empty() {
                return Err(no_ollama_endpoint(&down));
            }
            Ok(Targets {
                send_to: up.iter().map(|e| e.url.clone()).collect(),
                down: down
                    .iter()
                    .map(|e| (e.url.clone(), down_detail(e)))
                    .collect(),
            })
        }
        Operation::Push => {
            // Pushing the same model twice is pointless: one endpoint, a
            // reachable one if any.
            let having: Vec<_> = ollama().filter(|e| advertises(e, model)).collect();
            let first = having
                .iter()
                .find(|e| e.healthy)
                .or_else(|| having.first())
                .ok_or_else(|| not_found(model))?;
            Ok(Targets {
                send_to: vec![first.url.clone()],
                down: Vec::new(),
            })
        }
        Operation::Copy | Operation::Delete => {
            let (up, down): (Vec<_>, Vec<_>) = ollama()
                .filter(|e| advertises(e, model))
                .partition(|e| e.healthy);
            if up.is_empty() && down.is_empty() {
                return Err(not_found(model));
            }
            Ok(Targets {
                send_to: up.iter().map(|e| e.url.clone()).collect(),
                down: down
                    .iter()
                    .map(|e| (e.url.clone(), down_detail(e)))
                    .collect(),
            })
        }
    }
}

/// The targets of an unload (`ollama stop`, see [`super::unload`]): the
/// Ollama endpoints passing their probes whose last `/api/ps` lists
/// `model`, draining ones included, in configuration order.
pub fn unload_targets(state: &ClusterState, model: &str) -> Vec<Arc<str>> {
    state
        .endpoints
        .iter()
        .filter(|e| e.kind == EndpointKind::Ollama && e.healthy)
        .filter(|e| lists(&e.loaded_models, model))
        .map(|e| e.url.clone())
        .collect()
}

/// Whether `endpoint` advertises `model` (`x` is `x:latest`).
fn advertises(endpoint: &EndpointState, model: &str) -> bool {
    lists(&endpoint.advertised_models, model)
}

/// Whether `models` (as an endpoint names them) holds `model` (`x` is
/// `x:latest`).
fn lists(models: &[Arc<str>], model: &str) -> bool {
    let wanted = canonical_request_name(model);
    models.iter().any(|m| canonical_request_name(m) == wanted)
}

/// Why an endpoint is down: its probe's error.
fn down_detail(endpoint: &EndpointState) -> String {
    if endpoint.health_detail.is_empty() {
        "probe failing".to_owned()
    } else {
        endpoint.health_detail.clone()
    }
}

fn not_found(model: &str) -> ProxyError {
    ProxyError::ManagedModelNotFound {
        model: model.to_owned(),
    }
}

fn no_ollama_endpoint(down: &[&EndpointState]) -> ProxyError {
    let detail = if down.is_empty() {
        "no Ollama endpoint is configured".to_owned()
    } else {
        let named = down
            .iter()
            .map(|e| format!("{} ({})", without_credentials(&e.url), down_detail(e)))
            .collect::<Vec<_>>()
            .join(", ");
        format!("no Ollama endpoint is reachable: {named}")
    };
    ProxyError::NoOllamaEndpoint { detail }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn endpoint(url: &str, kind: EndpointKind, healthy: bool, models: &[&str]) -> EndpointState {
        EndpointState {
            healthy,
            health_detail: if healthy {
                String::new()
            } else {
                "GET /api/tags: connection refused".into()
            },
            advertised_models: models.iter().map(|m| Arc::from(*m)).collect(),
            ..EndpointState::new(url, kind)
        }
    }

    fn state(endpoints: Vec<EndpointState>) -> ClusterState {
        ClusterState {
            endpoints,
            ..ClusterState::default()
        }
    }

    fn urls(t: &Targets) -> Vec<&str> {
        t.send_to.iter().map(|u| &**u).collect()
    }

    fn cluster() -> ClusterState {
        state(vec![
            endpoint("http://a", EndpointKind::Ollama, true, &["llama3:latest"]),
            endpoint("http://oai/v1", EndpointKind::OpenAi, true, &["llama3"]),
            endpoint(
                "http://b",
                EndpointKind::Ollama,
                false,
                &["llama3:latest", "qwen:8b"],
            ),
            endpoint(
                "http://c",
                EndpointKind::Ollama,
                true,
                &["llama3", "qwen:8b"],
            ),
            endpoint("http://l/v1", EndpointKind::LlamaServer, true, &["qwen:8b"]),
        ])
    }

    #[test]
    fn pull_and_create_go_to_every_reachable_ollama_endpoint() {
        for op in [Operation::Pull, Operation::Create] {
            let t = targets(&cluster(), op, "anything").unwrap();
            assert_eq!(urls(&t), ["http://a", "http://c"], "{op:?}");
            assert_eq!(t.down.len(), 1);
            assert_eq!(&*t.down[0].0, "http://b");
        }
    }

    #[test]
    fn pull_without_a_reachable_ollama_endpoint_is_unavailable() {
        let down = state(vec![endpoint(
            "http://u:pw@b",
            EndpointKind::Ollama,
            false,
            &[],
        )]);
        let e = targets(&down, Operation::Pull, "m").unwrap_err();
        assert_eq!(e.status(), 503);
        let text = e.to_string();
        assert!(
            text.contains("no Ollama endpoint is reachable: http://b ("),
            "{text}"
        );
        assert!(!text.contains("pw"), "{text}");
        let none = state(vec![endpoint(
            "http://oai/v1",
            EndpointKind::OpenAi,
            true,
            &[],
        )]);
        let e = targets(&none, Operation::Create, "m").unwrap_err();
        assert_eq!(e.status(), 503);
        assert!(
            e.to_string().contains("no Ollama endpoint is configured"),
            "{e}"
        );
    }

    #[test]
    fn copy_and_delete_go_to_ollama_endpoints_with_the_model() {
        for op in [Operation::Copy, Operation::Delete] {
            // `llama3` is `llama3:latest`; the OpenAI endpoint never counts.
            // b is down: not contacted, reported.
            let t = targets(&cluster(), op, "llama3").unwrap();
            assert_eq!(urls(&t), ["http://a", "http://c"], "{op:?}");
            assert_eq!(&*t.down[0].0, "http://b");
            let t = targets(&cluster(), op, "qwen:8b").unwrap();
            assert_eq!(urls(&t), ["http://c"], "{op:?}");
            assert_eq!(t.down.len(), 1);
            let e = targets(&cluster(), op, "nope").unwrap_err();
            assert_eq!(e.status(), 404);
            assert_eq!(e.to_string(), "model 'nope' not found");
        }
    }

    #[test]
    fn unloads_go_to_the_reachable_ollama_endpoints_with_the_model_loaded() {
        let loaded = |mut e: EndpointState, models: &[&str]| {
            e.loaded_models = models.iter().map(|m| Arc::from(*m)).collect();
            e
        };
        let mut draining = loaded(
            endpoint("http://d", EndpointKind::Ollama, true, &["m:latest"]),
            &["m:latest"],
        );
        draining.draining = true;
        let state = state(vec![
            loaded(
                endpoint("http://a", EndpointKind::Ollama, true, &["m:latest"]),
                &["m:latest"],
            ),
            loaded(
                endpoint("http://b", EndpointKind::Ollama, true, &["m:latest"]),
                &["other:latest"],
            ),
            loaded(
                endpoint("http://c", EndpointKind::Ollama, false, &["m:latest"]),
                &["m:latest"],
            ),
            loaded(
                endpoint("http://o", EndpointKind::OpenAi, true, &["m"]),
                &["m"],
            ),
            draining,
        ]);
        let urls = |model| {
            unload_targets(&state, model)
                .iter()
                .map(|u| u.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(urls("m"), ["http://a", "http://d"]);
        assert_eq!(urls("m:latest"), ["http://a", "http://d"]);
        assert_eq!(urls("other"), ["http://b"]);
        assert!(urls("absent").is_empty());
    }

    #[test]
    fn push_goes_to_the_first_reachable_endpoint_with_the_model() {
        let t = targets(&cluster(), Operation::Push, "qwen:8b").unwrap();
        assert_eq!(urls(&t), ["http://c"], "b is down");
        let t = targets(&cluster(), Operation::Push, "llama3:latest").unwrap();
        assert_eq!(urls(&t), ["http://a"]);
        let only_down = state(vec![endpoint(
            "http://b",
            EndpointKind::Ollama,
            false,
            &["m:latest"],
        )]);
        let t = targets(&only_down, Operation::Push, "m").unwrap();
        assert_eq!(urls(&t), ["http://b"], "tried, so the failure is reported");
        assert_eq!(
            targets(&cluster(), Operation::Push, "gpt")
                .unwrap_err()
                .status(),
            404
        );
    }
}
