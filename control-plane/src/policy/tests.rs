//! Unit and property tests of the pure policy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use rand::{SeedableRng, rngs::SmallRng};

use super::*;
use crate::{
    cluster::{EndpointState, ModelUsage},
    endpoint::EndpointKind,
    model_name::canonical_request_name,
    outcome::RequestKind,
};

/// Exact order of `a_n / a.limit` and `b_n / b.limit`, by cross-multiplication.
fn ratio_cmp(a: &CandidateLoad, a_n: u32, b: &CandidateLoad, b_n: u32) -> std::cmp::Ordering {
    let lhs = u64::from(a_n) * u64::from(b.max_concurrent.max(1));
    let rhs = u64::from(b_n) * u64::from(a.max_concurrent.max(1));
    lhs.cmp(&rhs)
}

/// Exact utilization order (`model_in_flight / limit`, the limit being per
/// endpoint and model).
fn utilization_cmp(a: &CandidateLoad, b: &CandidateLoad) -> std::cmp::Ordering {
    ratio_cmp(a, a.model_in_flight, b, b.model_in_flight)
}

/// `endpoint` with one request of `model` in flight (and nothing else).
fn one_in_flight(endpoint: &mut EndpointState, model: &str) {
    endpoint.usage.push(ModelUsage {
        model: Arc::from(model),
        in_flight: 1,
        ..ModelUsage::default()
    });
    endpoint.in_flight = 1;
}

fn rng() -> SmallRng {
    SmallRng::seed_from_u64(7)
}

/// A healthy, eligible candidate.
fn c(priority: u32, model: u32, total: u32, max: u32, loaded: bool) -> CandidateLoad {
    CandidateLoad {
        priority,
        model_in_flight: model,
        total_in_flight: total,
        max_concurrent: max,
        loaded,
        hard: None,
        avoid: false,
    }
}

fn pick(cands: &[CandidateLoad], affinity: Option<usize>, priority: bool) -> Selection {
    select(cands, remembered(affinity, false), priority, &mut rng()).unwrap()
}

fn remembered(index: Option<usize>, required: bool) -> Option<Remembered> {
    index.map(|index| Remembered { index, required })
}

fn sel(index: usize, reason: DecisionReason) -> Selection {
    Selection { index, reason }
}

#[test]
fn no_candidates_is_not_found() {
    assert_eq!(
        select(&[], None, false, &mut rng()),
        Err(Rejection::NoCandidates)
    );
    let err = Rejection::NoCandidates.into_error("m", 0, || vec!["a".into(), "b".into()]);
    assert_eq!(
        err,
        ChooseError::ModelNotFound {
            model: "m".into(),
            available: vec!["a".into(), "b".into()]
        }
    );
    // An endpoint never reached may have it: unavailable, not unknown.
    let err = Rejection::NoCandidates.into_error("m", 2, || unreachable!("no list needed"));
    match err {
        ChooseError::NoEndpointAvailable { model, detail } => {
            assert_eq!(model, "m");
            assert!(detail.contains("2 endpoint(s) never reached"), "{detail}");
        }
        other => panic!("expected NoEndpointAvailable, got {other:?}"),
    }
}

/// A required affinity (a request continuing a response stored on that
/// endpoint) is followed when the endpoint is full, has the model unloaded
/// or is failing; only a hard exclusion (excluded, draining) overrides it,
/// and then the request goes elsewhere as usual.
#[test]
fn a_required_affinity_is_followed_unless_hard_excluded() {
    let free = c(0, 0, 0, 4, true);
    let full = c(1, 4, 4, 4, true);
    let unloaded = c(2, 0, 0, 4, false);
    let mut failing = c(3, 0, 0, 4, true);
    failing.avoid = true;
    let cands = [free, full, unloaded, failing];
    for i in 1..=3 {
        for prio in [false, true] {
            assert_ne!(
                pick(&cands, Some(i), prio).index,
                i,
                "optional affinity yields"
            );
            assert_eq!(
                select(&cands, remembered(Some(i), true), prio, &mut rng()),
                Ok(sel(i, DecisionReason::Affinity)),
                "required affinity to candidate {i}"
            );
        }
    }
    for hard in [HardExclusion::Excluded, HardExclusion::Draining] {
        let mut out = full;
        out.hard = Some(hard);
        assert_eq!(
            select(&[free, out], remembered(Some(1), true), false, &mut rng()),
            Ok(sel(0, DecisionReason::LoadedFree))
        );
    }
}

#[test]
fn hard_exclusions_never_get_the_request() {
    let mut excluded = c(0, 0, 0, 4, true);
    excluded.hard = Some(HardExclusion::Excluded);
    let mut draining = c(1, 0, 0, 4, true);
    draining.hard = Some(HardExclusion::Draining);
    let busy = c(2, 9, 9, 1, false);
    for prio in [false, true] {
        assert_eq!(
            pick(&[excluded, draining, busy], Some(0), prio),
            sel(2, DecisionReason::Saturated)
        );
    }
    let err = select(&[excluded, draining], None, false, &mut rng()).unwrap_err();
    assert_eq!(
        err,
        Rejection::AllHardExcluded {
            excluded: 1,
            draining: 1
        }
    );
    let msg = err.into_error("m", 0, Vec::new).to_string();
    assert!(
        msg.contains("1 already failed") && msg.contains("1 draining"),
        "{msg}"
    );
}

#[test]
fn soft_exclusions_drop_unless_they_drop_all() {
    let mut sick = c(0, 0, 0, 4, true);
    sick.avoid = true;
    let busy = c(1, 3, 3, 4, true);
    assert_eq!(
        pick(&[sick, busy], None, false),
        sel(1, DecisionReason::LoadedFree)
    );
    // Even a saturated healthy endpoint beats a free avoided one.
    let full = c(1, 4, 4, 4, true);
    assert_eq!(
        pick(&[sick, full], None, false),
        sel(1, DecisionReason::Saturated)
    );
    // All avoided: fall through to the whole hard-filtered set.
    let mut sick_busy = busy;
    sick_busy.avoid = true;
    assert_eq!(
        pick(&[sick, sick_busy], None, false),
        sel(0, DecisionReason::LoadedFree)
    );
    // A hard-excluded healthy endpoint does not keep the soft filter on.
    let mut excluded = c(2, 0, 0, 4, true);
    excluded.hard = Some(HardExclusion::Excluded);
    assert_eq!(
        pick(&[sick, excluded], None, false),
        sel(0, DecisionReason::LoadedFree)
    );
}

#[test]
fn affinity_only_when_loaded_and_free() {
    let idle = c(0, 0, 0, 4, true);
    let remembered = c(1, 2, 2, 4, true);
    assert_eq!(
        pick(&[idle, remembered], Some(1), false),
        sel(1, DecisionReason::Affinity)
    );
    let not_loaded = c(1, 0, 2, 4, false);
    assert_eq!(
        pick(&[idle, not_loaded], Some(1), false),
        sel(0, DecisionReason::LoadedFree)
    );
    let full = c(1, 4, 4, 4, true);
    assert_eq!(
        pick(&[idle, full], Some(1), false),
        sel(0, DecisionReason::LoadedFree)
    );
    let mut sick = remembered;
    sick.avoid = true;
    assert_eq!(
        pick(&[idle, sick], Some(1), false),
        sel(0, DecisionReason::LoadedFree)
    );
    let mut excluded = remembered;
    excluded.hard = Some(HardExclusion::Excluded);
    assert_eq!(
        pick(&[idle, excluded], Some(1), false),
        sel(0, DecisionReason::LoadedFree)
    );
    assert_eq!(
        pick(&[idle, remembered], Some(7), false),
        sel(0, DecisionReason::LoadedFree),
        "out-of-range affinity index is ignored"
    );
}

#[test]
fn loaded_free_prefers_least_in_flight_for_the_model() {
    // Endpoint 0: busy with other models but idle for this one.
    let a = c(0, 0, 3, 4, true);
    let b = c(1, 1, 1, 4, true);
    let unloaded = c(2, 0, 0, 4, false);
    assert_eq!(
        pick(&[a, b, unloaded], None, false),
        sel(0, DecisionReason::LoadedFree)
    );
    // Priority routing: the model's utilization ratio first (0/4 < 1/4),
    // whatever the endpoint serves for other models.
    assert_eq!(
        pick(&[a, b, unloaded], None, true),
        sel(0, DecisionReason::LoadedFree)
    );
    // Priority routing: ratio 2/8 < 1/2, though 1 < 2 in flight.
    let big = c(1, 2, 2, 8, true);
    let small = c(0, 1, 1, 2, true);
    assert_eq!(
        pick(&[big, small], None, false),
        sel(1, DecisionReason::LoadedFree)
    );
    assert_eq!(
        pick(&[big, small], None, true),
        sel(0, DecisionReason::LoadedFree)
    );
    // Priority routing: equal ratio → config order.
    let x = c(5, 1, 1, 2, true);
    let y = c(3, 2, 5, 4, true);
    assert_eq!(
        pick(&[x, y], None, true),
        sel(1, DecisionReason::LoadedFree)
    );
}

#[test]
fn free_slot_prefers_least_total_in_flight() {
    let loaded_full = c(0, 2, 2, 2, true);
    let a = c(1, 0, 3, 8, false);
    let b = c(2, 0, 2, 3, false);
    assert_eq!(
        pick(&[loaded_full, a, b], None, false),
        sel(2, DecisionReason::FreeSlot)
    );
    // Priority routing: ratio 3/8 < 2/3.
    assert_eq!(
        pick(&[loaded_full, a, b], None, true),
        sel(1, DecisionReason::FreeSlot)
    );
    let e = c(1, 0, 1, 2, false);
    let f = c(0, 0, 2, 4, false);
    assert_eq!(pick(&[e, f], None, true), sel(1, DecisionReason::FreeSlot));
}

#[test]
fn saturated_prefers_least_utilization() {
    let a = c(0, 6, 6, 2, true); // utilization 3
    let b = c(1, 4, 5, 2, false); // utilization 2
    let d = c(2, 5, 5, 1, true); // utilization 5
    for prio in [false, true] {
        assert_eq!(
            pick(&[a, b, d], None, prio),
            sel(1, DecisionReason::Saturated)
        );
    }
    // Equal utilization 2: priority routing → config order; otherwise the
    // endpoint with less in flight in total.
    let e = c(4, 2, 2, 1, false);
    let f = c(3, 4, 4, 2, false);
    assert_eq!(pick(&[e, f], None, true), sel(1, DecisionReason::Saturated));
    assert_eq!(
        pick(&[e, f], None, false),
        sel(0, DecisionReason::Saturated)
    );
    // Zero limit (malformed published state) counts as one.
    let z = c(0, 1, 1, 0, true);
    assert_eq!(
        pick(&[z, e], None, false),
        sel(0, DecisionReason::Saturated)
    );
}

/// The limit is per (endpoint, model), like `OLLAMA_NUM_PARALLEL`: other
/// models' requests on the endpoint do not take this model's slots.
#[test]
fn a_model_at_its_limit_leaves_the_endpoint_free_for_another_model() {
    // Limit 2; model A holds both slots, so for model B the same endpoint
    // has 0 of 2 in flight (2 in total).
    let for_a = c(0, 2, 2, 2, true);
    let for_b = c(0, 0, 2, 2, true);
    assert!(!for_a.has_free_slot());
    assert!(for_b.has_free_slot());
    for prio in [false, true] {
        assert_eq!(
            pick(&[for_b], None, prio),
            sel(0, DecisionReason::LoadedFree)
        );
        // Not loaded there yet: still a free slot (rule 6), not saturated.
        let unloaded_b = c(0, 0, 2, 2, false);
        assert_eq!(
            pick(&[unloaded_b], None, prio),
            sel(0, DecisionReason::FreeSlot)
        );
        // It beats a saturated endpoint that is idle for everything else.
        let other_full = c(1, 2, 2, 2, true);
        assert_eq!(
            pick(&[other_full, unloaded_b], None, prio),
            sel(1, DecisionReason::FreeSlot)
        );
    }
    // Affinity follows it too: loaded and free for B.
    let idle = c(1, 0, 0, 2, true);
    assert_eq!(
        pick(&[idle, for_b], Some(1), false),
        sel(1, DecisionReason::Affinity)
    );
}

/// Two models on one endpoint each reach the limit: with limit 2, an
/// endpoint takes 2 requests of each model (4 in all) before either is
/// saturated there.
#[test]
fn two_models_on_one_endpoint_each_reach_the_limit() {
    let limit = 2;
    let (mut a, mut b) = (0u32, 0u32);
    let mut reasons = Vec::new();
    for model_is_a in [true, false, true, false, true, false] {
        let n = if model_is_a { a } else { b };
        let cand = c(0, n, a + b, limit, true);
        let s = pick(&[cand], None, false);
        reasons.push(s.reason);
        if model_is_a {
            a += 1;
        } else {
            b += 1;
        }
    }
    use DecisionReason::*;
    assert_eq!(
        reasons,
        [
            LoadedFree, LoadedFree, LoadedFree, LoadedFree, Saturated, Saturated
        ]
    );
    // At 2 + 2 the endpoint is saturated for both models, and a second
    // endpoint holding 1 request of the model is still free for it.
    let full = c(0, 2, 4, 2, true);
    let other = c(1, 1, 1, 2, true);
    for prio in [false, true] {
        assert_eq!(
            pick(&[full, other], None, prio),
            sel(1, DecisionReason::LoadedFree)
        );
    }
}

/// Saturation and utilization count the requested model only: a saturated
/// endpoint busy with other models is as good as one that is not.
#[test]
fn saturation_ratio_is_per_model() {
    // Both saturated for the model; x has utilization 2/2 = 1 (9 in total),
    // y 3/2 (3 in total): x, though its endpoint is much busier.
    let x = c(0, 2, 9, 2, true);
    let y = c(1, 3, 3, 2, true);
    for prio in [false, true] {
        assert_eq!(pick(&[x, y], None, prio), sel(0, DecisionReason::Saturated));
        assert_eq!(pick(&[y, x], None, prio), sel(1, DecisionReason::Saturated));
    }
    // Equal utilization (2/1 == 4/2): without priority routing the endpoint
    // with fewer requests in total wins, every time.
    let p = c(0, 2, 2, 1, true);
    let q = c(1, 4, 4, 2, true);
    let mut r = rng();
    for _ in 0..64 {
        assert_eq!(
            select(&[q, p], None, false, &mut r),
            Ok(sel(1, DecisionReason::Saturated))
        );
    }
}

/// Each of `k` equal candidates gets within ±6% of n/k of `n` draws.
fn assert_even(cands: &[CandidateLoad], reason: DecisionReason) {
    let n = 40_000usize;
    let k = cands.len();
    let mut counts = vec![0usize; k];
    let mut r = rng();
    for _ in 0..n {
        let s = select(cands, None, false, &mut r).unwrap();
        assert_eq!(s.reason, reason);
        counts[s.index] += 1;
    }
    let expect = n / k;
    for (i, got) in counts.iter().enumerate() {
        let dev = (*got as f64 - expect as f64).abs() / expect as f64;
        assert!(
            dev < 0.06,
            "candidate {i}: {got} of {n} (expected ~{expect})"
        );
    }
}

#[test]
fn ties_are_broken_uniformly() {
    // Loaded-free ties, with an unequal candidate in between.
    let eq = c(0, 1, 1, 4, true);
    let worse = c(1, 2, 2, 4, true);
    let mut r = rng();
    let mut seen = [0usize; 4];
    for _ in 0..4000 {
        seen[select(&[eq, worse, eq, eq], None, false, &mut r)
            .unwrap()
            .index] += 1;
    }
    assert_eq!(seen[1], 0, "a worse candidate never wins a tie");
    assert_even(&[eq, eq, eq, eq], DecisionReason::LoadedFree);
    assert_even(&[c(0, 0, 1, 4, false); 5], DecisionReason::FreeSlot);
    // Equal utilization (4/2 == 2/1) and equal total in flight.
    assert_even(
        &[c(0, 4, 4, 2, false), c(1, 2, 4, 1, true)],
        DecisionReason::Saturated,
    );
}

#[test]
fn index_key_matches_canonical_names() {
    assert_eq!(index_key("llama3"), "llama3");
    assert_eq!(index_key("llama3:latest"), "llama3");
    assert_eq!(index_key(" org/m:latest "), "org/m");
    assert_eq!(index_key("m:8b"), "m:8b");
    assert_eq!(index_key("a:b:latest"), "a:b:latest");
}

proptest! {
    #[test]
    fn index_key_agrees_with_canonical_request_name(
        a in "[a-c]{1,2}(/[a-c]{1,2})?(:(latest|b|c:latest))?",
        b in "[a-c]{1,2}(/[a-c]{1,2})?(:(latest|b|c:latest))?",
    ) {
        prop_assert_eq!(
            index_key(&a) == index_key(&b),
            canonical_request_name(&a) == canonical_request_name(&b)
        );
    }
}

fn arb_candidate() -> impl Strategy<Value = CandidateLoad> {
    (
        0u32..6,
        0u32..6,
        1u32..5,
        any::<bool>(),
        0u8..10,
        any::<bool>(),
    )
        .prop_map(|(model, extra, max, loaded, hard, avoid)| CandidateLoad {
            priority: 0,
            model_in_flight: model,
            total_in_flight: model + extra,
            max_concurrent: max,
            loaded,
            hard: match hard {
                0 => Some(HardExclusion::Excluded),
                1 => Some(HardExclusion::Draining),
                _ => None,
            },
            avoid,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// The policy's answer is consistent with the state it was given.
    #[test]
    fn selection_is_consistent_with_the_snapshot(
        mut cands in prop::collection::vec(arb_candidate(), 0..12),
        affinity in prop::option::of(0usize..14),
        priority in any::<bool>(),
        seed in any::<u64>(),
    ) {
        for (i, cand) in cands.iter_mut().enumerate() {
            cand.priority = i as u32;
        }
        let result = select(&cands, remembered(affinity, false), priority, &mut SmallRng::seed_from_u64(seed));
        let eligible: Vec<&CandidateLoad> = cands.iter().filter(|c| c.hard.is_none()).collect();
        if cands.is_empty() {
            prop_assert_eq!(result, Err(Rejection::NoCandidates));
            return Ok(());
        }
        if eligible.is_empty() {
            prop_assert!(
                matches!(result, Err(Rejection::AllHardExcluded { .. })),
                "expected AllHardExcluded, got {:?}",
                result
            );
            return Ok(());
        }
        let s = result.unwrap();
        let chosen = cands[s.index];
        prop_assert!(chosen.hard.is_none(), "never excluded or draining");
        let strict = eligible.iter().any(|c| !c.avoid);
        prop_assert!(!(strict && chosen.avoid), "avoided only when all are");
        let pool: Vec<&CandidateLoad> =
            eligible.into_iter().filter(|c| !(strict && c.avoid)).collect();
        let any_free = pool.iter().any(|c| c.has_free_slot());
        let any_loaded_free = pool.iter().any(|c| c.loaded && c.has_free_slot());
        if any_free {
            prop_assert!(chosen.has_free_slot(), "a free slot was available");
        }
        match s.reason {
            DecisionReason::Affinity => {
                prop_assert_eq!(Some(s.index), affinity);
                prop_assert!(chosen.loaded && chosen.has_free_slot());
            }
            DecisionReason::LoadedFree => {
                prop_assert!(chosen.loaded && chosen.has_free_slot());
                if !priority {
                    let min = pool
                        .iter()
                        .filter(|c| c.loaded && c.has_free_slot())
                        .map(|c| c.model_in_flight)
                        .min();
                    prop_assert_eq!(Some(chosen.model_in_flight), min);
                }
            }
            DecisionReason::FreeSlot => {
                prop_assert!(!any_loaded_free && chosen.has_free_slot());
                if !priority {
                    let min = pool.iter().filter(|c| c.has_free_slot()).map(|c| c.total_in_flight).min();
                    prop_assert_eq!(Some(chosen.total_in_flight), min);
                }
            }
            DecisionReason::Saturated => {
                prop_assert!(!any_free);
                for other in &pool {
                    let order = utilization_cmp(&chosen, other);
                    prop_assert!(order != std::cmp::Ordering::Greater);
                    if !priority && order == std::cmp::Ordering::Equal {
                        prop_assert!(chosen.total_in_flight <= other.total_in_flight);
                    }
                }
            }
        }
        if priority && s.reason != DecisionReason::Affinity {
            // Priority routing: least ratio within the tier (utilization of
            // the model; the endpoint's load in the free-slot tier), then
            // config order.
            let tier = |x: &CandidateLoad| match (x.has_free_slot(), x.loaded) {
                (true, true) => 0,
                (true, false) => 1,
                (false, _) => 2,
            };
            let n = |x: &CandidateLoad| {
                if tier(x) == 1 { x.total_in_flight } else { x.model_in_flight }
            };
            for other in pool.iter().filter(|o| tier(o) == tier(&chosen)) {
                let order = ratio_cmp(&chosen, n(&chosen), other, n(other))
                    .then(chosen.priority.cmp(&other.priority));
                prop_assert!(order != std::cmp::Ordering::Greater);
            }
        }
        // The limit is per (endpoint, model): other models' requests never
        // make a candidate saturated.
        for x in &cands {
            prop_assert_eq!(x.has_free_slot(), x.model_in_flight < x.max_concurrent.max(1));
        }
        if let Some(a) = affinity
            && let Some(ac) = cands.get(a)
            && pool.iter().any(|p| std::ptr::eq(*p, ac))
            && ac.loaded
            && ac.has_free_slot()
        {
            prop_assert_eq!(s.reason, DecisionReason::Affinity);
        }
        if priority && s.reason != DecisionReason::Affinity {
            // With priority routing the answer is deterministic.
            let again = select(&cands, remembered(affinity, false), priority, &mut SmallRng::seed_from_u64(seed ^ 1));
            prop_assert_eq!(again, Ok(s));
        }
    }
}

// ---- select_from_cluster_state ----

fn endpoint(url: &str, kind: EndpointKind, priority: u32, advertised: &[&str]) -> EndpointState {
    EndpointState {
        priority,
        max_concurrent: 2,
        healthy: true,
        health_detail: String::new(),
        advertised_models: advertised.iter().map(|m| Arc::from(*m)).collect(),
        last_probe_ok_unix_ms: 1,
        ..EndpointState::new(url, kind)
    }
}

fn request(model: &str) -> ChooseRequest {
    ChooseRequest {
        model: model.to_owned(),
        affinity_key: None,
        affinity_required: false,
        kind: RequestKind::Chat,
        exclude: Vec::new(),
    }
}

fn cluster() -> ClusterState {
    ClusterState {
        version: 3,
        endpoints: vec![
            endpoint(
                "http://a:11434",
                EndpointKind::Ollama,
                0,
                &["llama3:latest", "qwen:7b"],
            ),
            endpoint(
                "http://b/v1",
                EndpointKind::OpenAi,
                1,
                &["llama3", "gpt-4o"],
            ),
            endpoint(
                "http://c:8080/v1",
                EndpointKind::LlamaServer,
                2,
                &["unsloth/gpt-oss-20b-GGUF:Q8_0"],
            ),
        ],
        conversation_affinity: true,
        ..ClusterState::default()
    }
}

#[test]
fn cluster_state_choice_names_backend_and_tracking_models() {
    let state = cluster();
    let local = LocalUsage::default();
    let ch = select_from_cluster_state(
        &state,
        &local,
        &request("unsloth/gpt-oss-20b-GGUF:Q8_0"),
        None,
        &mut rng(),
    )
    .unwrap();
    assert_eq!(&*ch.endpoint, "http://c:8080/v1");
    assert_eq!(ch.endpoint_kind, EndpointKind::LlamaServer);
    assert_eq!(&*ch.backend_model, "unsloth/gpt-oss-20b-GGUF:Q8_0");
    assert_eq!(&*ch.tracking_model, "gpt-oss-20b-GGUF");
    assert_eq!(ch.lease, None);

    // `llama3:latest` also matches the OpenAI endpoint listing plain `llama3`.
    let mut req = request("llama3:latest");
    req.exclude = vec!["http://a:11434/".to_owned()];
    let ch = select_from_cluster_state(&state, &local, &req, None, &mut rng()).unwrap();
    assert_eq!(&*ch.endpoint, "http://b/v1");
    assert_eq!(&*ch.backend_model, "llama3");
    assert_eq!(&*ch.tracking_model, "llama3");
    // What an OpenAI-compatible server lists, it serves without loading.
    assert_eq!(ch.reason, DecisionReason::LoadedFree);
}

#[test]
fn cluster_state_not_found_lists_models_sorted_and_deduplicated() {
    let mut state = cluster();
    state.endpoints[1]
        .advertised_models
        .push(Arc::from("qwen:7b"));
    let err = select_from_cluster_state(
        &state,
        &LocalUsage::default(),
        &request("mistral"),
        None,
        &mut rng(),
    )
    .unwrap_err();
    assert_eq!(
        err,
        ChooseError::ModelNotFound {
            model: "mistral".into(),
            available: [
                "gpt-4o",
                "llama3",
                "llama3:latest",
                "qwen:7b",
                "unsloth/gpt-oss-20b-GGUF:Q8_0"
            ]
            .map(String::from)
            .to_vec(),
        }
    );
}

#[test]
fn cluster_state_model_on_no_known_endpoint_is_unavailable_while_one_was_never_reached() {
    let not_found = |state: &ClusterState| {
        select_from_cluster_state(
            state,
            &LocalUsage::default(),
            &request("mistral"),
            None,
            &mut rng(),
        )
        .unwrap_err()
    };
    let mut state = cluster();
    // Down now, but answered once: its models are known, so "not found"
    // stands.
    state.endpoints[2].healthy = false;
    assert!(
        matches!(not_found(&state), ChooseError::ModelNotFound { .. }),
        "{:?}",
        not_found(&state)
    );
    // Never answered a probe: it may have the model.
    state.endpoints[2].last_probe_ok_unix_ms = 0;
    state.endpoints[2].advertised_models.clear();
    match not_found(&state) {
        ChooseError::NoEndpointAvailable { model, detail } => {
            assert_eq!(model, "mistral");
            assert!(detail.contains("1 endpoint(s) never reached"), "{detail}");
        }
        other => panic!("expected NoEndpointAvailable, got {other:?}"),
    }
    // Draining, it gets no requests whatever it has.
    state.endpoints[2].draining = true;
    assert!(matches!(
        not_found(&state),
        ChooseError::ModelNotFound { .. }
    ));
}

#[test]
fn cluster_state_counts_local_usage_and_health() {
    let mut state = cluster();
    state.priority_routing = true;
    // Loaded on a, as it always is on the OpenAI endpoint b.
    state.endpoints[0]
        .loaded_models
        .push(Arc::from("llama3:latest"));
    let mut local = LocalUsage::default();
    // Priority routing picks endpoint a first while both are idle.
    let req = request("llama3");
    let ch = select_from_cluster_state(&state, &local, &req, None, &mut rng()).unwrap();
    assert_eq!(&*ch.endpoint, "http://a:11434");
    // Two local in-flight on a (not yet published) saturate it.
    local.add("http://a:11434", "llama3:latest", 1);
    local.add("http://a:11434", "llama3:latest", 1);
    assert_eq!(local.get("http://a:11434", "llama3:latest"), 2);
    assert_eq!(local.endpoint_total("http://a:11434"), 2);
    let ch = select_from_cluster_state(&state, &local, &req, None, &mut rng()).unwrap();
    assert_eq!(&*ch.endpoint, "http://b/v1");
    // Local releases the state already counted: clamped at zero.
    local.add("http://a:11434", "llama3:latest", -3);
    assert_eq!(local.get("http://a:11434", "llama3:latest"), -1);
    local.add("http://a:11434", "llama3:latest", 1);
    assert!(local.is_empty());
    // Failing model on a, circuit open on b: c does not advertise; fall through.
    state.endpoints[0]
        .failing_models
        .push(Arc::from("llama3:latest"));
    let ch = select_from_cluster_state(&state, &local, &req, None, &mut rng()).unwrap();
    assert_eq!(&*ch.endpoint, "http://b/v1");
    state.endpoints[1].circuit_open = true;
    let ch = select_from_cluster_state(&state, &local, &req, None, &mut rng()).unwrap();
    assert_eq!(&*ch.endpoint, "http://a:11434", "all avoided: fall through");
    state.endpoints[0].draining = true;
    state.endpoints[1].draining = true;
    let err = select_from_cluster_state(&state, &local, &req, None, &mut rng()).unwrap_err();
    assert!(
        matches!(err, ChooseError::NoEndpointAvailable { .. }),
        "{err}"
    );
}

#[test]
fn cluster_state_affinity_needs_key_loaded_and_free() {
    let mut state = cluster();
    // (An OpenAI endpoint's models count as loaded whether it lists them
    // so or not: see the test below.)
    state.endpoints[0]
        .loaded_models
        .push(Arc::from("llama3:latest"));
    one_in_flight(&mut state.endpoints[1], "llama3");
    let local = LocalUsage::default();
    let mut req = request("llama3");
    // Without a key the affinity URL is ignored: a is less busy.
    let ch =
        select_from_cluster_state(&state, &local, &req, Some("http://b/v1"), &mut rng()).unwrap();
    assert_eq!(
        (&*ch.endpoint, ch.reason),
        ("http://a:11434", DecisionReason::LoadedFree)
    );
    req.affinity_key = Some("conv".to_owned());
    let ch =
        select_from_cluster_state(&state, &local, &req, Some("http://b/v1"), &mut rng()).unwrap();
    assert_eq!(
        (&*ch.endpoint, ch.reason),
        ("http://b/v1", DecisionReason::Affinity)
    );
    state.conversation_affinity = false;
    let ch =
        select_from_cluster_state(&state, &local, &req, Some("http://b/v1"), &mut rng()).unwrap();
    assert_eq!(&*ch.endpoint, "http://a:11434");
}

/// vLLM and hosted APIs say nothing about loading: a conversation still
/// stays on the OpenAI-compatible endpoint that served it, although the
/// other one is idle.
#[test]
fn affinity_applies_to_openai_endpoints_which_report_no_load_state() {
    let mut state = cluster();
    state.endpoints[0].advertised_models.clear();
    state.endpoints[0].kind = EndpointKind::OpenAi;
    state.endpoints[0].url = Arc::from("http://a2/v1");
    state.endpoints[0]
        .advertised_models
        .push(Arc::from("llama3"));
    one_in_flight(&mut state.endpoints[1], "llama3");
    let local = LocalUsage::default();
    let mut req = request("llama3");
    req.affinity_key = Some("conv".to_owned());
    for _ in 0..20 {
        let ch = select_from_cluster_state(&state, &local, &req, Some("http://b/v1"), &mut rng())
            .unwrap();
        assert_eq!(
            (&*ch.endpoint, ch.reason),
            ("http://b/v1", DecisionReason::Affinity)
        );
    }
}

#[test]
fn rank_orders_ratios_exactly_for_realistic_limits() {
    // Saturated tier, keyed by ratio: 87380/65535 == 4/3 exactly;
    // 87381/65535 is just above.
    // The low 32 bits of the key are the total in flight (tie-break).
    let r = |x: &CandidateLoad| rank(x, false);
    let sat = c(1, 4, 4, 3, false);
    let sat_same = c(0, 87380, 87380, 65535, false);
    let sat_above = c(2, 87381, 87381, 65535, false);
    assert_eq!(r(&sat) >> 32, r(&sat_same) >> 32, "equal ratios tie");
    assert!(r(&sat) < r(&sat_same), "then fewer in flight in total");
    assert!(
        r(&sat_above) > r(&sat_same),
        "distinct ratios stay distinct"
    );
    // Priority routing ranks every tier by ratio, then config order:
    // 21845/65535 == 1/3 exactly.
    let p = |x: &CandidateLoad| rank(x, true);
    let third = c(1, 0, 1, 3, false);
    let same = c(0, 0, 21845, 65535, false);
    let above = c(2, 0, 21846, 65535, false);
    assert!(p(&same) < p(&third) && p(&third) < p(&above));
    // Tiers dominate keys: loaded-free < free < saturated.
    assert!(r(&c(0, 9, 9, 10, true)) < r(&c(0, 0, 0, 10, false)));
    assert!(r(&c(0, 0, 9, 10, false)) < r(&c(0, 1, 1, 1, true)));
    // Free or saturated by the model's count alone.
    assert!(r(&c(0, 0, 50, 1, false)) < r(&c(0, 1, 1, 1, true)));
}

/// Degraded mode counts the limit per (endpoint, model) too: another model
/// holding every slot of endpoint a (published and local) leaves a free for
/// llama3, which is loaded there.
#[test]
fn cluster_state_limit_is_per_endpoint_and_model() {
    let mut state = cluster();
    state.priority_routing = true;
    state.endpoints[0]
        .loaded_models
        .extend([Arc::from("llama3:latest"), Arc::from("qwen:7b")]);
    one_in_flight(&mut state.endpoints[0], "qwen:7b");
    let mut local = LocalUsage::default();
    local.add("http://a:11434", "qwen:7b", 1);
    let req = request("llama3");
    let ch = select_from_cluster_state(&state, &local, &req, None, &mut rng()).unwrap();
    assert_eq!(
        (&*ch.endpoint, ch.reason),
        ("http://a:11434", DecisionReason::LoadedFree)
    );
    // qwen itself is saturated on a (1 published + 1 local of 2).
    let ch =
        select_from_cluster_state(&state, &local, &request("qwen:7b"), None, &mut rng()).unwrap();
    assert_eq!(ch.reason, DecisionReason::Saturated);
    // Two llama3 in flight on a (local): now saturated for llama3 as well,
    // and the free slot on b wins.
    local.add("http://a:11434", "llama3:latest", 2);
    let ch = select_from_cluster_state(&state, &local, &req, None, &mut rng()).unwrap();
    assert_eq!(
        (&*ch.endpoint, ch.reason),
        ("http://b/v1", DecisionReason::LoadedFree)
    );
}
