//! Tests of the facade: selection rules end to end over probes, leases,
//! sessions, health and affinity; restart re-registration; publication.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use proptest::prelude::*;
use rand::{SeedableRng, rngs::SmallRng};

use super::*;
use crate::{
    api::{AdminError, AffinityRecord},
    endpoint::EndpointKind,
    outcome::RequestKind,
};

const A: &str = "http://a:11434";
const B: &str = "http://b:11434";
const O: &str = "http://o/v1";
const L: &str = "http://l:8080/v1";

/// Endpoints a, b (Ollama), o (OpenAI), l (llama-server), limit 2 each
/// unless `extra` sets `max_concurrent_connections`.
fn config(extra: &str) -> Arc<Config> {
    let limit = if extra
        .lines()
        .any(|l| l.starts_with("max_concurrent_connections"))
    {
        ""
    } else {
        "max_concurrent_connections: 2\n"
    };
    let yaml = format!(
        "endpoints:\n  - {A}\n  - {B}\n  - {O}\nllama_server_endpoints:\n  - {L}\n{limit}{extra}"
    );
    Arc::new(Config::from_yaml(&yaml, &|_| None).unwrap())
}

fn plane(extra: &str) -> ControlPlane {
    ControlPlane::from_state(State::with_rng(config(extra), SmallRng::seed_from_u64(11)))
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

fn probe(cp: &ControlPlane, ep: usize, advertised: &[&str], loaded: &[&str], now: Instant) {
    cp.apply_probe(
        ep,
        ProbeReport::Ok {
            advertised: strings(advertised),
            loaded: strings(loaded),
            items: ModelItems::default(),
        },
        now,
    );
}

fn req(model: &str) -> ChooseRequest {
    ChooseRequest {
        model: model.to_owned(),
        affinity_key: None,
        affinity_required: false,
        kind: RequestKind::Chat,
        exclude: Vec::new(),
    }
}

fn keyed(model: &str, key: &str) -> ChooseRequest {
    ChooseRequest {
        affinity_key: Some(key.to_owned()),
        ..req(model)
    }
}

fn check(cp: &ControlPlane) {
    cp.shared.state.lock().check_invariants();
    let state = cp.state();
    let sum: u64 = state.total_in_flight();
    assert_eq!(sum, u64::from(state.leases), "usage == live leases");
}

fn in_flight(cp: &ControlPlane, url: &str) -> u32 {
    cp.state()
        .endpoints
        .iter()
        .find(|e| &*e.url == url)
        .unwrap()
        .in_flight
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[test]
fn choice_carries_backend_and_tracking_names() {
    let t0 = Instant::now();
    let cp = plane("");
    probe(&cp, 3, &["unsloth/gpt-oss-20b-GGUF:Q8_0"], &[], t0);
    probe(&cp, 2, &["gpt-4o", "llama3"], &[], t0);
    let s = cp.open_session("sc", t0).id;
    let ch = cp
        .choose(&req("unsloth/gpt-oss-20b-GGUF:Q8_0"), Some(s), t0)
        .unwrap();
    assert_eq!(&*ch.endpoint, L);
    assert_eq!(ch.endpoint_kind, EndpointKind::LlamaServer);
    assert_eq!(&*ch.backend_model, "unsloth/gpt-oss-20b-GGUF:Q8_0");
    assert_eq!(&*ch.tracking_model, "gpt-oss-20b-GGUF");
    assert!(ch.lease.is_some());
    let usage = &cp.state().endpoints[3].usage;
    assert_eq!(&*usage[0].model, "gpt-oss-20b-GGUF");
    assert_eq!(usage[0].in_flight, 1);
    for name in ["llama3:latest", "llama3"] {
        let ch = cp.choose(&req(name), None, t0).unwrap();
        assert_eq!(
            (&*ch.endpoint, &*ch.backend_model, &*ch.tracking_model),
            (O, "llama3", "llama3")
        );
        assert_eq!(ch.lease, None);
    }
    check(&cp);
}

#[test]
fn unknown_model_lists_available_models() {
    let t0 = Instant::now();
    let cp = plane("");
    probe(&cp, 0, &["qwen:7b", "llama3:latest"], &[], t0);
    probe(&cp, 1, &["llama3:latest"], &[], t0);
    probe(&cp, 2, &["gpt-4o"], &[], t0);
    probe(&cp, 3, &[], &[], t0);
    let err = cp.choose(&req("mistral"), None, t0).unwrap_err();
    assert_eq!(
        err,
        ChooseError::ModelNotFound {
            model: "mistral".into(),
            available: strings(&["gpt-4o", "llama3:latest", "qwen:7b"]),
        }
    );
    assert!(err.to_string().contains("gpt-4o, llama3:latest, qwen:7b"));
}

#[test]
fn a_model_is_not_called_missing_while_an_endpoint_was_never_reached() {
    let t0 = Instant::now();
    let cp = plane("");
    let s = cp.open_session("sc", t0).id;
    probe(&cp, 0, &["llama3:latest"], &[], t0);
    probe(&cp, 1, &["llama3:latest"], &[], t0);
    probe(&cp, 2, &["gpt-4o"], &[], t0);
    // l (index 3) has not answered a probe yet, nor ever (refused).
    cp.apply_probe(
        3,
        ProbeReport::Failed {
            detail: "connection refused".into(),
        },
        t0,
    );
    let err = cp.choose(&req("mistral"), Some(s), t0).unwrap_err();
    match &err {
        ChooseError::NoEndpointAvailable { model, detail } => {
            assert_eq!(model, "mistral");
            assert!(detail.contains("1 endpoint(s) never reached"), "{detail}");
        }
        other => panic!("expected NoEndpointAvailable, got {other:?}"),
    }
    let stats = cp.stats();
    assert_eq!((stats.not_found, stats.no_endpoint), (0, 1));
    // Models that are known are still chosen meanwhile.
    let ch = cp.choose(&req("llama3"), Some(s), t0).unwrap();
    assert!([A, B].contains(&&*ch.endpoint), "{ch:?}");
    // Once it has answered, a model nobody has is not found.
    probe(&cp, 3, &["unsloth/x-GGUF:Q4_K_M"], &[], t0);
    let err = cp.choose(&req("mistral"), Some(s), t0).unwrap_err();
    assert!(matches!(err, ChooseError::ModelNotFound { .. }), "{err:?}");
    assert_eq!(cp.stats().not_found, 1);
    // Down again later, its models stay known: still not found.
    cp.apply_probe(
        3,
        ProbeReport::Failed {
            detail: "connection refused".into(),
        },
        t0,
    );
    let err = cp.choose(&req("mistral"), Some(s), t0).unwrap_err();
    assert!(matches!(err, ChooseError::ModelNotFound { .. }), "{err:?}");
}

#[test]
fn excluded_and_draining_endpoints_never_get_the_request() {
    let t0 = Instant::now();
    let cp = plane("");
    probe(&cp, 0, &["m"], &["m"], t0);
    probe(&cp, 1, &["m"], &["m"], t0);
    let mut r = req("m");
    r.exclude = vec![format!("{A}/")];
    for _ in 0..20 {
        assert_eq!(&*cp.choose(&r, None, t0).unwrap().endpoint, B);
    }
    let drained = cp.set_draining(B, true).unwrap();
    assert!(drained.draining && &*drained.url == B);
    let err = cp.choose(&r, None, t0).unwrap_err();
    let ChooseError::NoEndpointAvailable { model, detail } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(model, "m");
    assert!(
        detail.contains("1 already failed") && detail.contains("1 draining"),
        "{detail}"
    );
    r.exclude.clear();
    for _ in 0..20 {
        assert_eq!(&*cp.choose(&r, None, t0).unwrap().endpoint, A);
    }
    assert!(!cp.set_draining(B, false).unwrap().draining);
    // The same endpoint written another way.
    let drained = cp.set_draining("HTTP://B:11434/", true).unwrap();
    assert!(drained.draining && &*drained.url == B);
    assert!(!cp.set_draining(B, false).unwrap().draining);
    let err = cp.set_draining("http://nope:1", true).unwrap_err();
    let AdminError::UnknownEndpoint(err) = err else {
        panic!("{err:?}");
    };
    assert_eq!(err.configured, strings(&[A, B, O, L]));
}

#[test]
fn an_endpoint_with_credentials_is_named_without_them() {
    let yaml = "endpoints:\n  - http://u:pw@c:11434\n  - http://u:pw2@d:11434\n  \
                - http://v:pw3@d:11434\n";
    let cp = ControlPlane::new(Arc::new(Config::from_yaml(yaml, &|_| None).unwrap()));
    // Drained as the CLI shows it, or as configured.
    let drained = cp.set_draining("http://c:11434", true).unwrap();
    assert!(drained.draining && &*drained.url == "http://u:pw@c:11434");
    assert!(
        !cp.set_draining("http://u:pw@c:11434", false)
            .unwrap()
            .draining
    );
    // Two endpoints shown alike: only their full URLs name them.
    let AdminError::UnknownEndpoint(err) = cp.set_draining("http://d:11434", true).unwrap_err()
    else {
        panic!("expected an unknown endpoint");
    };
    assert_eq!(
        err.configured,
        strings(&["http://c:11434", "http://d:11434", "http://d:11434"])
    );
    let text = err.to_string();
    assert!(
        text.contains("2 configured endpoints are shown as http://d:11434")
            && text.contains("give the URL with its credentials"),
        "{text}"
    );
    assert!(
        cp.set_draining("http://v:pw3@d:11434", true)
            .unwrap()
            .draining
    );
    // Wrong credentials are not the endpoint; the error does not repeat them.
    let AdminError::UnknownEndpoint(err) =
        cp.set_draining("http://u:guess@c:11434", true).unwrap_err()
    else {
        panic!("expected an unknown endpoint");
    };
    assert_eq!(err.url, "http://c:11434");
    let text = err.to_string();
    assert!(
        text.contains("no configured endpoint has these credentials") && !text.contains("guess"),
        "{text}"
    );
    // Nothing alike: no explanation.
    let AdminError::UnknownEndpoint(err) = cp.set_draining("http://e:1", true).unwrap_err() else {
        panic!("expected an unknown endpoint");
    };
    assert_eq!(err.why, None);
}

fn with_state_file(path: &std::path::Path, extra: &str) -> ControlPlane {
    let cfg = config(&format!("state_file: {}\n{extra}", path.display()));
    ControlPlane::with_state_file(cfg).unwrap()
}

#[test]
fn drains_survive_a_restart_through_the_state_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let cp = with_state_file(&path, "");
    assert!(
        cp.state().endpoints.iter().all(|e| !e.draining),
        "no file yet"
    );
    cp.set_draining(B, true).unwrap();
    cp.set_draining(&format!("{O}/"), true).unwrap();
    cp.set_draining(O, false).unwrap();

    // A new control plane on the same file: b is drained again, o is not.
    let restarted = with_state_file(&path, "");
    let drained: Vec<bool> = restarted
        .state()
        .endpoints
        .iter()
        .map(|e| e.draining)
        .collect();
    assert_eq!(drained, [false, true, false, false]);
    // Drains in the config add to the saved ones.
    let both = with_state_file(
        &path,
        &format!("endpoint_config:\n  {A}:\n    draining: true\n"),
    );
    let drained: Vec<bool> = both.state().endpoints.iter().map(|e| e.draining).collect();
    assert_eq!(drained, [true, true, false, false]);
    // An endpoint saved but since removed from the config is ignored.
    std::fs::write(
        &path,
        format!("{{\"version\": 1, \"drained\": [\"http://gone:1\", \"{L}\"]}}"),
    )
    .unwrap();
    let drained: Vec<bool> = with_state_file(&path, "")
        .state()
        .endpoints
        .iter()
        .map(|e| e.draining)
        .collect();
    assert_eq!(drained, [false, false, false, true]);
    // A control plane without `state_file`, and one made with `new`, save
    // nothing (a sidecar probing on its own must not write the file).
    let before = std::fs::read_to_string(&path).unwrap();
    plane("").set_draining(A, true).unwrap();
    ControlPlane::new(config(&format!("state_file: {}\n", path.display())))
        .set_draining(A, true)
        .unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
}

#[test]
fn a_drain_that_cannot_be_saved_takes_effect_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let cp = with_state_file(&sub.join("state.json"), "");
    std::fs::remove_dir(&sub).unwrap();
    let err = cp.set_draining(B, true).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, AdminError::NotSaved { draining: true, .. }),
        "{err:?}"
    );
    assert!(
        message.contains(B) && message.contains("will not survive a control-plane restart"),
        "{message}"
    );
    assert!(cp.state().endpoints[1].draining, "the drain took effect");
    // A file that cannot be parsed stops the start.
    let path = dir.path().join("bad.json");
    std::fs::write(&path, "drained: everything").unwrap();
    let cfg = config(&format!("state_file: {}\n", path.display()));
    let err = ControlPlane::with_state_file(cfg).unwrap_err().to_string();
    assert!(
        err.contains("bad.json") && err.contains("fix or delete it"),
        "{err}"
    );
}

#[test]
fn endpoint_drained_in_the_config_starts_drained_until_undrained() {
    let t0 = Instant::now();
    let cp = plane(&format!("endpoint_config:\n  {B}:\n    draining: true\n"));
    probe(&cp, 0, &["m"], &["m"], t0);
    probe(&cp, 1, &["m"], &["m"], t0);
    let state = cp.state();
    assert!(!state.endpoints[0].draining);
    assert!(state.endpoints[1].draining, "{:?}", state.endpoints[1]);
    for _ in 0..20 {
        assert_eq!(&*cp.choose(&req("m"), None, t0).unwrap().endpoint, A);
    }
    // The runtime flag starts from the config and overrides it.
    assert!(!cp.set_draining(B, false).unwrap().draining);
    let mut seen_b = false;
    for _ in 0..40 {
        seen_b |= &*cp.choose(&req("m"), None, t0).unwrap().endpoint == B;
    }
    assert!(seen_b, "undrained endpoint never chosen");
}

#[test]
fn unknown_session_is_refused_and_dry_runs_take_nothing() {
    let t0 = Instant::now();
    let cp = plane("conversation_affinity: true\n");
    probe(&cp, 0, &["m"], &["m"], t0);
    assert_eq!(
        cp.choose(&req("m"), Some(SessionId(42)), t0),
        Err(ChooseError::UnknownSession(42))
    );
    let ch = cp.choose(&keyed("m", "k"), None, t0).unwrap();
    assert_eq!(ch.lease, None);
    assert_eq!(in_flight(&cp, A), 0);
    assert_eq!(
        cp.affinity_sample(10, t0).0,
        0,
        "dry run records no affinity"
    );
    assert_eq!(cp.stats().leases_granted, 0);
    // Nor does it count as a decision or a miss in the metrics.
    assert!(cp.choose(&req("nope"), None, t0).is_err());
    let stats = cp.stats();
    assert!(
        stats.decisions.iter().all(|&(_, n)| n == 0),
        "{:?}",
        stats.decisions
    );
    assert_eq!(stats.not_found, 0);
}

#[test]
fn loaded_free_then_free_slot_then_saturated() {
    let t0 = Instant::now();
    let cp = plane("");
    probe(&cp, 0, &["m"], &["m"], t0);
    probe(&cp, 1, &["m"], &[], t0);
    let s = cp.open_session("sc", t0).id;
    let reasons: Vec<(String, DecisionReason)> = (0..6)
        .map(|_| {
            let ch = cp.choose(&req("m"), Some(s), t0).unwrap();
            (ch.endpoint.to_string(), ch.reason)
        })
        .collect();
    use DecisionReason::*;
    assert_eq!(reasons[0], (A.to_owned(), LoadedFree));
    assert_eq!(reasons[1], (A.to_owned(), LoadedFree));
    assert_eq!(reasons[2], (B.to_owned(), FreeSlot));
    assert_eq!(reasons[3], (B.to_owned(), FreeSlot));
    assert_eq!(reasons[4].1, Saturated);
    assert_eq!(reasons[5].1, Saturated);
    assert_ne!(
        reasons[4].0, reasons[5].0,
        "least utilization spreads the queue"
    );
    assert_eq!((in_flight(&cp, A), in_flight(&cp, B)), (3, 3));
    check(&cp);
}

/// With every candidate full, a request's choice is held (nothing granted,
/// nothing counted) and takes the slot a release frees meanwhile, on the
/// endpoint that freed it, as `free_slot` / `loaded_free` rather than
/// `saturated`. `saturated_hold: 0` places it at once, `saturated`; a dry
/// run is never held.
#[tokio::test]
async fn a_choice_finding_every_endpoint_full_waits_for_a_release() {
    let t0 = Instant::now();
    let cp = plane("max_concurrent_connections: 1\nsaturated_hold: 1s\n");
    probe(&cp, 0, &["m"], &["m"], t0);
    probe(&cp, 1, &["m"], &["m"], t0);
    let s = cp.open_session("sc", t0).id;
    let first = cp.choose(&req("m"), Some(s), t0).unwrap();
    let second = cp.choose(&req("m"), Some(s), t0).unwrap();
    assert_ne!(first.endpoint, second.endpoint);
    assert_eq!(
        cp.choose_or_hold(&req("m"), Some(s), Instant::now())
            .unwrap(),
        Held::Full
    );
    assert_eq!(cp.state().leases, 2, "a held choice grants nothing");
    assert_eq!(
        cp.choose(&req("m"), None, Instant::now()).unwrap().reason,
        DecisionReason::Saturated,
        "a dry run answers at once"
    );

    let waiting = tokio::spawn({
        let cp = cp.clone();
        async move { cp.choose_held(&req("m"), Some(s)).await }
    });
    // Let it find both full and wait.
    while cp.shared.holding.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    assert!(cp.release(
        second.lease.unwrap(),
        Outcome::Ok,
        TokenCounts::default(),
        Instant::now()
    ));
    let got = waiting.await.unwrap().unwrap();
    assert_eq!(got.endpoint, second.endpoint, "the freed slot");
    assert_eq!(got.reason, DecisionReason::LoadedFree);
    assert_eq!(cp.shared.holding.load(Ordering::SeqCst), 0);
    let stats = cp.stats();
    assert_eq!(
        stats.decisions_for(DecisionReason::Saturated),
        0,
        "{:?}",
        stats.decisions
    );
    check(&cp);

    // Nothing frees: after the hold it is placed, saturated.
    let cp = plane("max_concurrent_connections: 1\nsaturated_hold: 20ms\n");
    probe(&cp, 0, &["m"], &["m"], t0);
    let s = cp.open_session("sc", t0).id;
    cp.choose(&req("m"), Some(s), t0).unwrap();
    let late = cp.choose_held(&req("m"), Some(s)).await.unwrap();
    assert_eq!(late.reason, DecisionReason::Saturated);
    assert_eq!(in_flight(&cp, A), 2);

    // No hold configured: saturated at once.
    let cp = plane("max_concurrent_connections: 1\nsaturated_hold: 0\n");
    probe(&cp, 0, &["m"], &["m"], t0);
    let s = cp.open_session("sc", t0).id;
    cp.choose(&req("m"), Some(s), t0).unwrap();
    let Held::Chosen(now) = cp.choose_or_hold(&req("m"), Some(s), t0).unwrap() else {
        panic!("held with saturated_hold: 0");
    };
    assert_eq!(now.reason, DecisionReason::Saturated);
    check(&cp);
}

/// A held choice that is given up (its caller gone) takes nothing.
#[tokio::test]
async fn a_held_choice_given_up_takes_no_lease() {
    let t0 = Instant::now();
    let cp = plane("max_concurrent_connections: 1\nsaturated_hold: 1s\n");
    probe(&cp, 0, &["m"], &["m"], t0);
    let s = cp.open_session("sc", t0).id;
    cp.choose(&req("m"), Some(s), t0).unwrap();
    let given_up = tokio::time::timeout(
        Duration::from_millis(20),
        cp.choose_held(&req("m"), Some(s)),
    )
    .await;
    assert!(given_up.is_err(), "still held after 20 ms of a 1 s hold");
    assert_eq!(cp.state().leases, 1);
    assert_eq!(cp.shared.holding.load(Ordering::SeqCst), 0);
    check(&cp);
}

/// A lease that fills the endpoint's last slot for its model (limit 2
/// here), or lands on a full one, says so: its release is one a choice may
/// be waiting for. Dry runs take no slot.
#[test]
fn a_lease_taking_the_last_slot_is_at_limit() {
    let t0 = Instant::now();
    let cp = plane("");
    probe(&cp, 0, &["m", "n"], &["m", "n"], t0);
    probe(&cp, 1, &["m", "n"], &["m", "n"], t0);
    let s = cp.open_session("sc", t0).id;
    let mut on_a = req("m");
    on_a.exclude = vec![B.to_owned()];
    let at_limit = |r: &ChooseRequest, session| cp.choose(r, session, t0).unwrap().at_limit;
    assert!(!at_limit(&on_a, None), "a dry run");
    assert!(!at_limit(&on_a, Some(s)), "1 of 2");
    assert!(at_limit(&on_a, Some(s)), "2 of 2");
    assert!(at_limit(&on_a, Some(s)), "3 of 2 (saturated)");
    let mut n_on_a = req("n");
    n_on_a.exclude = vec![B.to_owned()];
    assert!(!at_limit(&n_on_a, Some(s)), "the limit is per model");
    check(&cp);
}

#[test]
fn loaded_free_counts_in_flight_for_the_model_only() {
    let t0 = Instant::now();
    let cp = plane("endpoint_config:\n  \"http://a:11434\":\n    max_concurrent_connections: 4\n");
    probe(&cp, 0, &["m", "n"], &["m", "n"], t0);
    probe(&cp, 1, &["m"], &["m"], t0);
    let s = cp.open_session("sc", t0).id;
    // Two requests for n on a: a has 2 in flight in total, 0 for m.
    for _ in 0..2 {
        assert_eq!(&*cp.choose(&req("n"), Some(s), t0).unwrap().endpoint, A);
    }
    let mut on_b = req("m");
    on_b.exclude = vec![A.to_owned()];
    let l_b = cp.choose(&on_b, Some(s), t0).unwrap();
    assert_eq!(&*l_b.endpoint, B);
    let next = cp.choose(&req("m"), None, t0).unwrap();
    assert_eq!(
        (&*next.endpoint, next.reason),
        (A, DecisionReason::LoadedFree),
        "b has 1 in flight for m, a has 0 for m (but 2 in total)"
    );
}

/// `max_concurrent_connections` is per endpoint and model (like
/// `OLLAMA_NUM_PARALLEL`): with limit 2, endpoint a serving m and n takes
/// two of each before either is saturated there, and n at its limit on a
/// leaves a free for m.
#[test]
fn the_limit_is_per_endpoint_and_model() {
    let t0 = Instant::now();
    let cp = plane("");
    probe(&cp, 0, &["m", "n"], &["m", "n"], t0);
    probe(&cp, 1, &["m", "n"], &[], t0);
    let s = cp.open_session("sc", t0).id;
    for model in ["n", "n", "m", "m"] {
        let ch = cp.choose(&req(model), Some(s), t0).unwrap();
        assert_eq!(
            (&*ch.endpoint, ch.reason),
            (A, DecisionReason::LoadedFree),
            "{model}"
        );
    }
    assert_eq!(in_flight(&cp, A), 4, "2 of each model on a");
    for model in ["m", "n"] {
        let ch = cp.choose(&req(model), None, t0).unwrap();
        assert_eq!(
            (&*ch.endpoint, ch.reason),
            (B, DecisionReason::FreeSlot),
            "{model} is full on a, b is free"
        );
    }
    check(&cp);
}

#[test]
fn priority_routing_uses_ratio_then_config_order() {
    let t0 = Instant::now();
    let cp = plane("priority_routing: true\n");
    probe(&cp, 0, &["m"], &["m"], t0);
    probe(&cp, 1, &["m"], &["m"], t0);
    let s = cp.open_session("sc", t0).id;
    let order: Vec<String> = (0..4)
        .map(|_| {
            cp.choose(&req("m"), Some(s), t0)
                .unwrap()
                .endpoint
                .to_string()
        })
        .collect();
    assert_eq!(order, strings(&[A, B, A, B]));
}

#[test]
fn affinity_is_honoured_only_when_loaded_and_free() {
    let t0 = Instant::now();
    let cp = plane("priority_routing: true\nconversation_affinity: true\n");
    probe(&cp, 0, &["m"], &["m"], t0);
    probe(&cp, 1, &["m"], &["m"], t0);
    let s = cp.open_session("sc", t0).id;
    let first = cp.choose(&keyed("m", "k"), Some(s), t0).unwrap();
    assert_eq!(
        (&*first.endpoint, first.reason),
        (A, DecisionReason::LoadedFree)
    );
    // Priority routing alone would now pick b (lower ratio): affinity wins.
    let again = cp.choose(&keyed("m", "k"), Some(s), t0).unwrap();
    assert_eq!(
        (&*again.endpoint, again.reason),
        (A, DecisionReason::Affinity)
    );
    // a is full (2/2): affinity not honoured; the new endpoint is remembered.
    let moved = cp.choose(&keyed("m", "k"), Some(s), t0).unwrap();
    assert_eq!(
        (&*moved.endpoint, moved.reason),
        (B, DecisionReason::LoadedFree)
    );
    let (n, sample) = cp.affinity_sample(10, t0);
    assert_eq!(n, 1);
    assert_eq!((&*sample[0].endpoint, &*sample[0].model), (B, "m:latest"));
    // Model unloaded on b: not honoured (b still wins on free slot).
    probe(&cp, 1, &["m"], &[], t0);
    let ch = cp.choose(&keyed("m", "k"), None, t0).unwrap();
    assert_eq!((&*ch.endpoint, ch.reason), (B, DecisionReason::FreeSlot));
    // Another model under the same key does not follow the entry.
    probe(&cp, 0, &["m", "n"], &["m", "n"], t0);
    probe(&cp, 1, &["m", "n"], &["m", "n"], t0);
    let ch = cp.choose(&keyed("n", "k"), None, t0).unwrap();
    assert_ne!(ch.reason, DecisionReason::Affinity);
    // Entries expire after the TTL.
    let later = t0 + config("").affinity.ttl + secs(1);
    assert_eq!(cp.affinity_sample(10, later).0, 0);
}

fn remembered(key: &str, endpoint: &str, expires_in: Duration) -> AffinityRecord {
    AffinityRecord {
        key: Arc::from(key),
        endpoint: Arc::from(endpoint),
        tracking_model: Arc::from("m:latest"),
        expires_in,
    }
}

#[test]
fn a_restarted_control_plane_takes_affinity_from_sidecars() {
    let t0 = Instant::now();
    let ttl = config("").affinity.ttl;
    // Priority routing sends every unpinned choice to a: a conversation
    // pinned to b is visibly kept there.
    let cp = plane("priority_routing: true\nconversation_affinity: true\n");
    probe(&cp, 0, &["m"], &["m"], t0);
    probe(&cp, 1, &["m"], &["m"], t0);
    let s = cp.open_session("sc", t0).id;
    // A conversation the new control plane has already seen: chosen on a
    // now, so its entry is newer than a sidecar's memory of b.
    let fresh = cp.choose(&keyed("m", "fresh"), Some(s), t0).unwrap();
    assert_eq!(&*fresh.endpoint, A);
    assert!(cp.release(
        fresh.lease.unwrap(),
        Outcome::Ok,
        TokenCounts::default(),
        t0
    ));
    let records = vec![
        remembered("k", &format!("{B}/"), secs(60)),
        remembered("gone", B, Duration::ZERO),
        remembered("elsewhere", "http://unknown:1", secs(60)),
        remembered("fresh", B, ttl - secs(1)),
        remembered("long", B, ttl * 10),
    ];
    assert_eq!(cp.restore_affinity(&records, t0), 2, "k and long");

    let ch = cp.choose(&keyed("m", "k"), None, t0).unwrap();
    assert_eq!((&*ch.endpoint, ch.reason), (B, DecisionReason::Affinity));
    let ch = cp.choose(&keyed("m", "fresh"), None, t0).unwrap();
    assert_eq!((&*ch.endpoint, ch.reason), (A, DecisionReason::Affinity));
    let ch = cp.choose(&keyed("m", "gone"), None, t0).unwrap();
    assert_eq!(&*ch.endpoint, A, "an expired entry is not restored");
    // Lifetimes: "k" as the sidecar said, "long" capped at the TTL.
    let (n, _) = cp.affinity_sample(10, t0 + secs(61));
    assert_eq!(n, 2, "fresh and long outlive k");
    let (n, sample) = cp.affinity_sample(10, t0 + ttl - secs(1));
    assert_eq!(n, 2);
    assert!(sample.iter().any(|e| e.key == "long"));
    assert_eq!(cp.affinity_sample(10, t0 + ttl + secs(1)).0, 0);
    check(&cp);

    // With conversation affinity off nothing is taken.
    let off = plane("");
    probe(&off, 1, &["m"], &["m"], t0);
    assert_eq!(off.restore_affinity(&records, t0), 0);
    assert_eq!(off.stats().affinity_entries, 0);
}

/// A request continuing a response stored on b follows its pin to b even
/// when b is full (it queues there); an optional key does not.
#[test]
fn a_required_affinity_is_followed_to_a_full_endpoint() {
    let t0 = Instant::now();
    let cp = plane("conversation_affinity: true\n");
    probe(&cp, 0, &["m"], &["m"], t0);
    probe(&cp, 1, &["m"], &["m"], t0);
    let s = cp.open_session("sc", t0).id;
    assert_eq!(
        cp.restore_affinity(&[remembered("pin", B, secs(60))], t0),
        1
    );
    let required = ChooseRequest {
        affinity_required: true,
        ..keyed("m", "pin")
    };
    // b (limit 2) takes three: the third queues there.
    for _ in 0..3 {
        let ch = cp.choose(&required, Some(s), t0).unwrap();
        assert_eq!((&*ch.endpoint, ch.reason), (B, DecisionReason::Affinity));
    }
    let ch = cp.choose(&keyed("m", "pin"), None, t0).unwrap();
    assert_eq!(
        &*ch.endpoint, A,
        "an optional key yields to the free endpoint"
    );
    check(&cp);
}

#[test]
fn affinity_off_records_nothing_and_table_is_bounded() {
    let t0 = Instant::now();
    let cp = plane("");
    probe(&cp, 0, &["m"], &["m"], t0);
    let s = cp.open_session("sc", t0).id;
    cp.choose(&keyed("m", "k"), Some(s), t0).unwrap();
    assert_eq!(cp.stats().affinity_entries, 0);

    let cp = plane("conversation_affinity: true\naffinity_max_entries: 2\n");
    probe(&cp, 0, &["m"], &["m"], t0);
    let s = cp.open_session("sc", t0).id;
    for (i, key) in ["k1", "k2", "k3"].iter().enumerate() {
        cp.choose(&keyed("m", key), Some(s), t0 + secs(i as u64))
            .unwrap();
    }
    let (n, sample) = cp.affinity_sample(10, t0 + secs(3));
    assert_eq!(n, 2);
    let keys: Vec<&str> = sample.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["k3", "k2"], "least recently used evicted");
}

#[test]
fn probe_failures_are_avoided_unless_all_fail() {
    let t0 = Instant::now();
    let cp = plane("");
    probe(&cp, 0, &["m"], &["m"], t0);
    probe(&cp, 1, &["m"], &["m"], t0);
    cp.apply_probe(
        0,
        ProbeReport::Failed {
            detail: "connection refused".into(),
        },
        t0,
    );
    let st = cp.state();
    assert!(!st.endpoints[0].healthy);
    assert_eq!(st.endpoints[0].health_detail, "connection refused");
    assert_eq!(st.endpoints[0].advertised_models.len(), 1, "lists kept");
    let s = cp.open_session("sc", t0).id;
    for _ in 0..4 {
        // Even saturated, b is preferred over an unhealthy a.
        assert_eq!(&*cp.choose(&req("m"), Some(s), t0).unwrap().endpoint, B);
    }
    cp.apply_probe(1, ProbeReport::Failed { detail: "x".into() }, t0);
    let ch = cp.choose(&req("m"), None, t0).unwrap();
    assert_eq!(
        (&*ch.endpoint, ch.reason),
        (A, DecisionReason::LoadedFree),
        "all unhealthy: fall through"
    );
    probe(&cp, 0, &["m"], &["m"], t0);
    assert!(cp.state().endpoints[0].healthy);
    let stats = cp.stats();
    assert_eq!((stats.probes_ok, stats.probes_failed), (3, 2));
}

#[test]
fn completion_failures_avoid_the_model_on_that_endpoint_for_a_while() {
    let t0 = Instant::now();
    let cp = plane("completion_failure_ttl: 30\nbreaker_failures: 5\n");
    probe(&cp, 0, &["m", "n"], &["m", "n"], t0);
    probe(&cp, 1, &["m", "n"], &["m", "n"], t0);
    let s = cp.open_session("sc", t0).id;
    let mut r = req("m");
    r.exclude = vec![B.to_owned()];
    let lease = cp.choose(&r, Some(s), t0).unwrap().lease.unwrap();
    assert!(cp.release(lease, Outcome::BackendError, TokenCounts::default(), t0));
    assert_eq!(
        &*cp.state().endpoints[0].failing_models,
        &[Arc::<str>::from("m:latest")]
    );
    for _ in 0..20 {
        assert_eq!(
            &*cp.choose(&req("m"), None, t0 + secs(29)).unwrap().endpoint,
            B
        );
    }
    // Only that model: n may still go to a.
    let mut seen_a = false;
    for _ in 0..40 {
        seen_a |= &*cp.choose(&req("n"), None, t0).unwrap().endpoint == A;
    }
    assert!(seen_a);
    // Excluding b: a is the only candidate left, failing or not.
    assert_eq!(&*cp.choose(&r, None, t0).unwrap().endpoint, A);
    // After the TTL, m goes to a again sometimes.
    let mut seen_a = false;
    for _ in 0..40 {
        seen_a |= &*cp.choose(&req("m"), None, t0 + secs(30)).unwrap().endpoint == A;
    }
    assert!(seen_a);
    // A success clears the entry at once.
    let lease = cp.choose(&r, Some(s), t0).unwrap().lease.unwrap();
    assert!(cp.release(lease, Outcome::BackendError, TokenCounts::default(), t0));
    let lease = cp.choose(&r, Some(s), t0).unwrap().lease.unwrap();
    assert!(cp.release(lease, Outcome::Ok, TokenCounts::default(), t0));
    assert!(cp.state().endpoints[0].failing_models.is_empty());
}

#[test]
fn breaker_opens_then_half_open_allows_one_trial() {
    let t0 = Instant::now();
    let cp = plane(
        "priority_routing: true\nmax_concurrent_connections: 4\nbreaker_failures: 2\n\
         breaker_open_for: 5\ncompletion_failure_ttl: 0\n",
    );
    probe(&cp, 0, &["m"], &["m"], t0);
    probe(&cp, 1, &["m"], &["m"], t0);
    let s = cp.open_session("sc", t0).id;
    for _ in 0..2 {
        let ch = cp.choose(&req("m"), Some(s), t0).unwrap();
        assert_eq!(&*ch.endpoint, A);
        cp.release(
            ch.lease.unwrap(),
            Outcome::ConnectError,
            TokenCounts::default(),
            t0,
        );
    }
    let a = &cp.state().endpoints[0];
    assert!(a.circuit_open && !a.circuit_half_open);
    // Open: a is avoided even though b gets busier.
    let held: Vec<LeaseId> = (0..2)
        .map(|_| {
            let ch = cp.choose(&req("m"), Some(s), t0 + secs(1)).unwrap();
            assert_eq!(&*ch.endpoint, B);
            ch.lease.unwrap()
        })
        .collect();
    // Open period over: one trial goes to a; while in flight a is avoided.
    let t1 = t0 + secs(5);
    let trial = cp.choose(&req("m"), Some(s), t1).unwrap();
    assert_eq!(&*trial.endpoint, A);
    let a = &cp.state().endpoints[0];
    assert!(a.circuit_open && a.circuit_half_open, "trial in flight");
    let other = cp.choose(&req("m"), Some(s), t1).unwrap();
    assert_eq!(
        &*other.endpoint, B,
        "a has ratio 1/4 < 3/4 but its trial is in flight"
    );
    // Trial succeeds: closed; a preferred again.
    cp.release(
        trial.lease.unwrap(),
        Outcome::Ok,
        TokenCounts::default(),
        t1,
    );
    let a = &cp.state().endpoints[0];
    assert!(!a.circuit_open && !a.circuit_half_open);
    assert_eq!(&*cp.choose(&req("m"), None, t1).unwrap().endpoint, A);
    for l in held.into_iter().chain(other.lease) {
        assert!(cp.release(l, Outcome::Ok, TokenCounts::default(), t1));
    }
    check(&cp);
}

#[test]
fn failed_trial_reopens_and_probe_success_half_opens() {
    let t0 = Instant::now();
    let cp = plane(
        "priority_routing: true\nbreaker_failures: 1\nbreaker_open_for: 60\n\
         completion_failure_ttl: 0\n",
    );
    probe(&cp, 0, &["m"], &["m"], t0);
    probe(&cp, 1, &["m"], &["m"], t0);
    let s = cp.open_session("sc", t0).id;
    let l = cp.choose(&req("m"), Some(s), t0).unwrap().lease.unwrap();
    cp.release(l, Outcome::IdleTimeout, TokenCounts::default(), t0);
    assert_eq!(
        &*cp.choose(&req("m"), None, t0 + secs(30)).unwrap().endpoint,
        B
    );
    // A successful probe moves the open breaker to half-open now.
    probe(&cp, 0, &["m"], &["m"], t0 + secs(30));
    let trial = cp.choose(&req("m"), Some(s), t0 + secs(30)).unwrap();
    assert_eq!(&*trial.endpoint, A);
    cp.release(
        trial.lease.unwrap(),
        Outcome::BackendError,
        TokenCounts::default(),
        t0 + secs(30),
    );
    assert_eq!(
        &*cp.choose(&req("m"), None, t0 + secs(89)).unwrap().endpoint,
        B
    );
    assert_eq!(
        &*cp.choose(&req("m"), None, t0 + secs(90)).unwrap().endpoint,
        A
    );
}

#[test]
fn release_is_exactly_once_and_counts_never_go_negative() {
    let t0 = Instant::now();
    let cp = plane("");
    probe(&cp, 0, &["m"], &["m"], t0);
    let s = cp.open_session("sc", t0).id;
    let l = cp.choose(&req("m"), Some(s), t0).unwrap().lease.unwrap();
    let tokens = TokenCounts {
        prompt: 10,
        completion: 5,
    };
    assert!(cp.release(l, Outcome::Ok, tokens, t0));
    assert!(!cp.release(l, Outcome::Ok, tokens, t0));
    assert!(!cp.release(LeaseId(999), Outcome::Ok, tokens, t0));
    let st = cp.state();
    let u = &st.endpoints[0].usage[0];
    assert_eq!(
        (
            u.in_flight,
            u.prompt_tokens,
            u.completion_tokens,
            u.requests
        ),
        (0, 10, 5, 1)
    );
    assert_eq!(st.endpoints[0].in_flight, 0);
    // The lease is gone from its session too: closing releases nothing.
    assert_eq!(cp.close_session(s), 0);
    check(&cp);
}

#[test]
fn session_expiry_and_close_reclaim_leases_without_failure_accounting() {
    let t0 = Instant::now();
    let cp = plane("session_ttl: 10\nkeepalive_interval: 2\nbreaker_failures: 1\n");
    probe(&cp, 0, &["m"], &["m"], t0);
    probe(&cp, 1, &["m"], &["m"], t0);
    let dead = cp.open_session("dead", t0).id;
    let live = cp.open_session("live", t0).id;
    let closing = cp.open_session("closing", t0).id;
    for s in [dead, dead, live, closing] {
        cp.choose(&req("m"), Some(s), t0).unwrap();
    }
    assert_eq!(cp.state().leases, 4);
    assert!(cp.keep_alive(live, t0 + secs(8)));
    assert!(cp.keep_alive(closing, t0 + secs(8)));
    let listed = cp.sessions(t0 + secs(9));
    assert_eq!(listed.len(), 3);
    let d = listed.iter().find(|i| i.id == dead).unwrap();
    assert_eq!((d.name.as_str(), d.leases), ("dead", 2));
    assert_eq!((d.since_keepalive, d.expires_in), (secs(9), secs(1)));
    assert_eq!(cp.expire_sessions(t0 + secs(9)), 0);
    assert_eq!(cp.expire_sessions(t0 + secs(10)), 2);
    assert!(!cp.keep_alive(dead, t0 + secs(10)));
    assert_eq!(cp.close_session(closing), 1);
    let st = cp.state();
    assert_eq!((st.leases, st.sessions), (1, 1));
    assert!(
        st.endpoints
            .iter()
            .all(|e| !e.circuit_open && e.failing_models.is_empty())
    );
    let stats = cp.stats();
    assert_eq!(stats.leases_expired, 2);
    assert_eq!(stats.leases_released, 3);
    assert_eq!(stats.sessions_expired, 1);
    assert_eq!((stats.leases_active, stats.sessions_active), (1, 1));
    assert!(
        stats.releases.iter().all(|(_, n)| *n == 0),
        "no release() calls"
    );
    assert_eq!(
        cp.choose(&req("m"), Some(dead), t0 + secs(10)),
        Err(ChooseError::UnknownSession(dead.0))
    );
    check(&cp);
}

#[test]
fn register_leases_after_restart_is_idempotent() {
    let t0 = Instant::now();
    let old = plane("");
    probe(&old, 0, &["m"], &["m"], t0);
    let s_old = old.open_session("sc", t0).id;
    let granted = old.choose(&req("m"), Some(s_old), t0).unwrap();

    // The control plane restarts: a new instance knows nothing.
    let cp = plane("");
    probe(&cp, 0, &["m"], &["m"], t0);
    assert_eq!(
        cp.register_leases(s_old, &[], t0),
        Err(ChooseError::UnknownSession(s_old.0))
    );
    let s = cp.open_session("sc", t0).id;
    // As a sidecar's own allocator makes them in degraded mode: top bit set.
    let degraded = LeaseId(crate::ids::IdAllocator::new(true).next());
    assert_eq!(degraded.0 >> 63, 1);
    let records = vec![
        LeaseRecord {
            lease: granted.lease.unwrap(),
            endpoint: granted.endpoint.clone(),
            tracking_model: granted.tracking_model.clone(),
        },
        // Granted by the sidecar itself in degraded mode (top bit set),
        // for a model the endpoint does not advertise.
        LeaseRecord {
            lease: degraded,
            endpoint: Arc::from(format!("{B}/")),
            tracking_model: Arc::from("other:latest"),
        },
        LeaseRecord {
            lease: LeaseId(5),
            endpoint: Arc::from("http://unknown:1"),
            tracking_model: Arc::from("m:latest"),
        },
    ];
    let out = cp.register_leases(s, &records, t0).unwrap();
    assert_eq!(
        out,
        RegisterOutcome {
            registered: 2,
            rejected: 1,
            affinity_restored: 0,
        }
    );
    assert_eq!(cp.stats().leases_active, 2);
    // Registering again (e.g. a retried call) counts nothing twice.
    assert_eq!(cp.register_leases(s, &records, t0).unwrap().registered, 2);
    // A new session (sidecar reconnected) takes them over, still once.
    let s2 = cp.open_session("sc", t0).id;
    assert_eq!(cp.register_leases(s2, &records, t0).unwrap().registered, 2);
    assert_eq!(cp.close_session(s), 0, "moved to the new session");
    let st = cp.state();
    assert_eq!(
        (st.endpoints[0].in_flight, st.endpoints[1].in_flight),
        (1, 1)
    );
    assert_eq!(&*st.endpoints[1].usage[0].model, "other:latest");
    check(&cp);
    // Exact usage: a (limit 2) has one free slot left, for one request.
    let ch = cp.choose(&req("m"), None, t0).unwrap();
    assert_eq!((&*ch.endpoint, ch.reason), (A, DecisionReason::LoadedFree));
    assert!(cp.release(degraded, Outcome::Ok, TokenCounts::default(), t0));
    assert!(cp.release(
        granted.lease.unwrap(),
        Outcome::Ok,
        TokenCounts::default(),
        t0
    ));
    assert_eq!(cp.state().leases, 0);
    check(&cp);
}

#[test]
fn stats_count_decisions_and_releases() {
    let t0 = Instant::now();
    let cp = plane("conversation_affinity: true\n");
    probe(&cp, 0, &["m"], &["m"], t0);
    let s = cp.open_session("sc", t0).id;
    let l1 = cp
        .choose(&keyed("m", "k"), Some(s), t0)
        .unwrap()
        .lease
        .unwrap();
    let l2 = cp
        .choose(&keyed("m", "k"), Some(s), t0)
        .unwrap()
        .lease
        .unwrap();
    let _l3 = cp.choose(&req("m"), Some(s), t0).unwrap();
    cp.release(l1, Outcome::Ok, TokenCounts::default(), t0);
    cp.release(l2, Outcome::Cancelled, TokenCounts::default(), t0);
    cp.release(l2, Outcome::Cancelled, TokenCounts::default(), t0);
    // Once every endpoint has answered a probe, "nope" is not found.
    for ep in 1..4 {
        probe(&cp, ep, &[], &[], t0);
    }
    let _ = cp.choose(&req("nope"), Some(s), t0);
    let st = cp.stats();
    let d: Vec<(DecisionReason, u64)> = st.decisions.to_vec();
    assert_eq!(
        d,
        [
            (DecisionReason::Affinity, 1),
            (DecisionReason::LoadedFree, 1),
            (DecisionReason::FreeSlot, 0),
            (DecisionReason::Saturated, 1)
        ]
    );
    assert_eq!(st.not_found, 1);
    assert_eq!(st.releases.len(), Outcome::ALL.len());
    let get = |o: Outcome| st.releases.iter().find(|(x, _)| *x == o).unwrap().1;
    assert_eq!(
        (
            get(Outcome::Ok),
            get(Outcome::Cancelled),
            get(Outcome::BackendError)
        ),
        (1, 1, 0)
    );
    assert_eq!(
        (st.leases_granted, st.leases_released, st.leases_active),
        (3, 2, 1)
    );
    assert_eq!((st.sessions_active, st.affinity_entries), (1, 1));
}

/// The next published state, waiting at most 5 s.
async fn next(rx: &mut watch::Receiver<Arc<ClusterState>>) -> Arc<ClusterState> {
    tokio::time::timeout(Duration::from_secs(5), rx.changed())
        .await
        .expect("a publication within 5 s")
        .unwrap();
    rx.borrow_and_update().clone()
}

/// Waits (bounded) for a published state satisfying `want`.
async fn until(
    rx: &mut watch::Receiver<Arc<ClusterState>>,
    want: impl Fn(&ClusterState) -> bool,
) -> Arc<ClusterState> {
    for _ in 0..1000 {
        let st = next(rx).await;
        if want(&st) {
            return st;
        }
    }
    panic!("state never reached");
}

#[tokio::test]
async fn watchers_see_initial_state_then_changes() {
    let cp = plane("watch_interval: 20ms\n");
    let mut rx = cp.subscribe();
    assert_eq!(rx.borrow_and_update().version, 0);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(cp.clone().run_background(cancel.clone()));
    let now = || tokio::time::Instant::now().into_std();
    probe(&cp, 0, &["m"], &["m"], now());
    let s = cp.open_session("sc", now()).id;
    let lease = cp.choose(&req("m"), Some(s), now()).unwrap().lease.unwrap();
    let seen = until(&mut rx, |st| st.leases == 1).await;
    assert_eq!(seen.endpoints[0].in_flight, 1);
    assert_eq!(&*seen.endpoints[0].advertised_models[0], "m");
    let v1 = seen.version;
    let t_release = tokio::time::Instant::now();
    cp.release(lease, Outcome::Ok, TokenCounts::default(), now());
    let st = next(&mut rx).await;
    assert!(st.version > v1);
    assert_eq!((st.leases, st.endpoints[0].in_flight), (0, 0));
    assert!(
        tokio::time::Instant::now() - t_release < Duration::from_secs(2),
        "published within a few watch intervals"
    );
    // Many changes in a burst are coalesced into few publications.
    let before = st.version;
    for _ in 0..100 {
        let l = cp.choose(&req("m"), Some(s), now()).unwrap().lease.unwrap();
        cp.release(l, Outcome::Ok, TokenCounts::default(), now());
    }
    let st = next(&mut rx).await;
    assert!(st.version >= before + 200, "the latest state is published");
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn publications_keep_their_spacing_and_a_change_after_quiet_goes_at_once() {
    let cp = plane("watch_interval: 20ms\n");
    let start = tokio::time::Instant::now();
    let mut rx = cp.subscribe();
    rx.borrow_and_update();
    // Every publication's time and version.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let watcher = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let version = rx.borrow_and_update().version;
                seen.lock()
                    .push((tokio::time::Instant::now() - start, version));
            }
        })
    };
    let cancel = CancellationToken::new();
    let task = tokio::spawn(cp.clone().run_background(cancel.clone()));
    let now = || tokio::time::Instant::now().into_std();
    let ms = Duration::from_millis;
    probe(&cp, 0, &["m"], &["m"], now());
    let s = cp.open_session("sc", now()).id;
    tokio::time::sleep(ms(1)).await;
    assert_eq!(
        seen.lock().len(),
        1,
        "the first change is published at once"
    );
    // Quiet for a while, then a change every 5 ms for 100 ms.
    tokio::time::sleep(ms(100)).await;
    let burst = tokio::time::Instant::now() - start;
    let mut last = 0;
    for _ in 0..20 {
        let l = cp.choose(&req("m"), Some(s), now()).unwrap().lease.unwrap();
        cp.release(l, Outcome::Ok, TokenCounts::default(), now());
        last = cp.state().version;
        tokio::time::sleep(ms(5)).await;
    }
    let burst_end = tokio::time::Instant::now() - start;
    tokio::time::sleep(ms(100)).await;
    // Quiet again: the next change goes at once too.
    cp.close_session(s);
    let lone = tokio::time::Instant::now() - start;
    tokio::time::sleep(ms(1)).await;
    cancel.cancel();
    task.await.unwrap();
    watcher.abort();
    let seen = seen.lock().clone();
    let during: Vec<_> = seen
        .iter()
        .filter(|(t, _)| *t >= burst && *t < lone)
        .copied()
        .collect();
    assert_eq!(
        during[0].0, burst,
        "a change after quiet is published at once"
    );
    for pair in during.windows(2) {
        assert!(pair[1].0 - pair[0].0 >= ms(20), "spaced: {during:?}");
    }
    assert!(
        during.len() >= 5,
        "the burst is published as it goes: {during:?}"
    );
    let final_one = during.last().unwrap();
    assert_eq!(final_one.1, last, "the burst's last state is published");
    assert!(
        final_one.0 <= burst_end + ms(20),
        "within one interval: {during:?}"
    );
    assert_eq!(seen.last().unwrap().0, lone, "{seen:?}");
}

#[tokio::test]
async fn background_reaper_expires_sessions() {
    let cp = plane("session_ttl: 200ms\nkeepalive_interval: 100ms\n");
    let cancel = CancellationToken::new();
    let task = tokio::spawn(cp.clone().run_background(cancel.clone()));
    let now = tokio::time::Instant::now().into_std();
    probe(&cp, 0, &["m"], &["m"], now);
    let s = cp.open_session("sc", now).id;
    cp.choose(&req("m"), Some(s), now).unwrap();
    let mut rx = cp.subscribe();
    let st = until(&mut rx, |st| st.sessions == 1).await;
    assert_eq!(st.leases, 1);
    let st = until(&mut rx, |st| st.sessions == 0).await;
    assert_eq!(st.leases, 0);
    assert!(Instant::now() >= now + Duration::from_millis(200));
    assert_eq!(cp.stats().leases_expired, 1);
    cancel.cancel();
    task.await.unwrap();
}

#[derive(Clone, Debug)]
enum Op {
    Choose {
        model: usize,
        session: usize,
        reserve: bool,
        key: Option<u8>,
    },
    Release {
        nth: usize,
        outcome: usize,
    },
    Close {
        session: usize,
    },
    Expire {
        advance: u64,
    },
    KeepAlive {
        session: usize,
    },
    Drain {
        ep: usize,
        on: bool,
    },
    ProbeFail {
        ep: usize,
    },
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..3, 0usize..3, any::<bool>(), prop::option::of(0u8..4))
            .prop_map(|(model, session, reserve, key)| Op::Choose { model, session, reserve, key }),
        5 => (any::<usize>(), 0usize..8).prop_map(|(nth, outcome)| Op::Release { nth, outcome }),
        1 => (0usize..3).prop_map(|session| Op::Close { session }),
        1 => (0u64..8).prop_map(|advance| Op::Expire { advance }),
        2 => (0usize..3).prop_map(|session| Op::KeepAlive { session }),
        1 => (0usize..4, any::<bool>()).prop_map(|(ep, on)| Op::Drain { ep, on }),
        1 => (0usize..4).prop_map(|ep| Op::ProbeFail { ep }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Any sequence of operations keeps usage equal to live leases, never
    /// negative, never above a (per endpoint and model) limit while capacity
    /// was available.
    #[test]
    fn usage_always_equals_live_leases(ops in prop::collection::vec(arb_op(), 1..80)) {
        let t0 = Instant::now();
        let cp = plane(
            "conversation_affinity: true\nsession_ttl: 10\nkeepalive_interval: 2\n\
             breaker_failures: 2\n",
        );
        probe(&cp, 0, &["m", "n"], &["m"], t0);
        probe(&cp, 1, &["m"], &[], t0);
        probe(&cp, 2, &["n", "o"], &[], t0);
        probe(&cp, 3, &["o"], &["o"], t0);
        let models = ["m", "n", "o"];
        let mut clock = t0;
        let mut sessions: Vec<SessionId> =
            (0..3).map(|i| cp.open_session(&format!("s{i}"), t0).id).collect();
        let mut live: Vec<LeaseId> = Vec::new();
        for op in ops {
            match op {
                Op::Choose { model, session, reserve, key } => {
                    let mut r = req(models[model]);
                    r.affinity_key = key.map(|k| format!("k{k}"));
                    let before = cp.state();
                    let res = cp.choose(&r, reserve.then(|| sessions[session]), clock);
                    if let Ok(ch) = res {
                        let ep = before.endpoints.iter().find(|e| e.url == ch.endpoint).unwrap();
                        let wanted = crate::policy::index_key(models[model]);
                        let advertises = ep
                            .advertised_models
                            .iter()
                            .any(|m| crate::policy::index_key(m) == wanted);
                        prop_assert!(advertises, "chose an endpoint not advertising the model");
                        prop_assert!(!ep.draining);
                        if ch.reason != DecisionReason::Saturated {
                            // The limit is per (endpoint, model).
                            let model_in_flight = ep
                                .usage
                                .iter()
                                .find(|u| u.model == ch.tracking_model)
                                .map_or(0, |u| u.in_flight);
                            prop_assert!(model_in_flight < ep.max_concurrent, "free slot used");
                        }
                        if let Some(l) = ch.lease {
                            live.push(l);
                        }
                    }
                }
                Op::Release { nth, outcome } => {
                    if !live.is_empty() {
                        let l = live[nth % live.len()];
                        let released =
                            cp.release(l, Outcome::ALL[outcome], TokenCounts::default(), clock);
                        // May already be gone with its session; never twice.
                        prop_assert!(!cp.release(l, Outcome::Ok, TokenCounts::default(), clock));
                        let _ = released;
                        live.retain(|x| *x != l);
                    }
                }
                Op::Close { session } => {
                    cp.close_session(sessions[session]);
                    sessions[session] = cp.open_session("again", clock).id;
                }
                Op::Expire { advance } => {
                    clock += secs(advance);
                    cp.expire_sessions(clock);
                    for s in &mut sessions {
                        if !cp.keep_alive(*s, clock) {
                            *s = cp.open_session("again", clock).id;
                        }
                    }
                }
                Op::KeepAlive { session } => {
                    cp.keep_alive(sessions[session], clock);
                }
                Op::Drain { ep, on } => {
                    cp.set_draining([A, B, O, L][ep], on).unwrap();
                }
                Op::ProbeFail { ep } => {
                    cp.apply_probe(ep, ProbeReport::Failed { detail: "down".into() }, clock);
                }
            }
            check(&cp);
        }
        // Releasing everything still live brings usage to zero exactly.
        for l in live {
            cp.release(l, Outcome::Cancelled, TokenCounts::default(), clock);
        }
        let st = cp.state();
        prop_assert_eq!(st.leases, 0);
        prop_assert!(st.endpoints.iter().all(|e| e.in_flight == 0));
        check(&cp);
    }
}

/// A state's version never runs ahead of its content: while probes keep
/// changing endpoint a's model list (one bump each), every state read
/// concurrently shows at least the list of the last change its version
/// counts.
#[test]
fn state_versions_never_run_ahead_of_their_content() {
    let cp = plane("");
    let base = cp.state().version;
    let rounds: u64 = 3_000;
    let writer = {
        let cp = cp.clone();
        std::thread::spawn(move || {
            for i in 1..=rounds {
                let name = format!("m{i}");
                probe(&cp, 0, &[&name], &[], Instant::now());
            }
        })
    };
    let mut checked = 0u64;
    while !writer.is_finished() || checked == 0 {
        let s = cp.state();
        let shown: u64 = s.endpoints[0]
            .advertised_models
            .first()
            .and_then(|m| m.trim_start_matches('m').split(':').next()?.parse().ok())
            .unwrap_or(0);
        let counted = s.version - base;
        assert!(
            counted <= shown,
            "state version counts {counted} changes but shows list m{shown}"
        );
        checked += 1;
    }
    writer.join().unwrap();
    assert_eq!(
        cp.state().version - base,
        rounds,
        "one bump per list change"
    );
}
