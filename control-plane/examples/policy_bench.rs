//! Decision-cost benchmark (a program, not a test):
//!
//! ```text
//! cargo run --release -p switchyard-control-plane --example policy_bench
//! ```
//!
//! For 10, 100 and 1,000 endpoints that all advertise the benchmarked model
//! (about half with it loaded, mixed usage from held leases, a few unhealthy
//! or failing), it measures:
//! - `select`: the pure policy over an already-filled candidate slice;
//! - `choose dry`: a full `ControlPlane::choose` without reservation
//!   (snapshot load, index lookup, lock, candidate fill, policy);
//! - `choose+release`: a reserving choice and its release, one thread;
//! - `choose+release x2`: the same from two threads at once (wall time per
//!   pair over both threads, i.e. inverse throughput).
//!
//! Each single-thread figure is the best of many ~100 µs runs (the machine
//! is shared); the two-thread figure is one longer run.
//! Goal: the policy at 1,000 endpoints within 10 µs per decision.

use std::{
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use rand::{Rng, SeedableRng, rngs::SmallRng};
use switchyard_control_plane::{
    api::{ModelItems, ProbeReport},
    config::Config,
    control_plane::ControlPlane,
    decision::ChooseRequest,
    outcome::{Outcome, RequestKind, TokenCounts},
    policy::{self, CandidateLoad},
};

const MODEL: &str = "llama3:8b";
const RUN_FOR: Duration = Duration::from_millis(400);

/// ns per call of `f`: the best of many short runs (about 100 µs each, well
/// inside one scheduler time slice), so that time the shared machine spends
/// on other processes inflates the figure as little as possible.
fn time_per_call(mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut warm = 0u32;
    while start.elapsed() < Duration::from_millis(20) {
        f();
        warm += 1;
    }
    let estimate = start.elapsed().as_nanos() as f64 / f64::from(warm.max(1));
    let calls = ((100_000.0 / estimate) as u32).clamp(5, 10_000);
    let mut best = f64::INFINITY;
    let deadline = Instant::now() + RUN_FOR;
    while Instant::now() < deadline {
        let start = Instant::now();
        for _ in 0..calls {
            f();
        }
        best = best.min(start.elapsed().as_nanos() as f64 / f64::from(calls));
    }
    best
}

fn build(n: usize, rng: &mut SmallRng) -> anyhow::Result<ControlPlane> {
    let mut yaml = String::from("max_concurrent_connections: 4\nendpoints:\n");
    for i in 0..n {
        yaml.push_str(&format!("  - http://10.{}.{}.1:11434\n", i / 256, i % 256));
    }
    let config = Config::from_yaml(&yaml, &|_| None).context("bench config")?;
    let cp = ControlPlane::new(Arc::new(config));
    let t0 = Instant::now();
    for i in 0..n {
        let mut advertised = vec![MODEL.to_owned(), "qwen2:7b".to_owned()];
        advertised.extend((0..rng.random_range(0..6)).map(|k| format!("extra{k}:latest")));
        let loaded = if rng.random_bool(0.5) {
            vec![MODEL.to_owned()]
        } else {
            vec!["qwen2:7b".to_owned()]
        };
        cp.apply_probe(
            i,
            ProbeReport::Ok {
                advertised,
                loaded,
                items: ModelItems::default(),
            },
            t0,
        );
        if i % 50 == 7 {
            cp.apply_probe(
                i,
                ProbeReport::Failed {
                    detail: "bench: down".to_owned(),
                },
                t0,
            );
        }
    }
    // Mixed usage: leases held for the rest of the run.
    let session = cp.open_session("bench-holder", t0).id;
    for k in 0..(n * 3 / 2) {
        let model = if k % 3 == 0 { "qwen2:7b" } else { MODEL };
        let choice = cp.choose(&request(model), Some(session), t0)?;
        if k % 40 == 0
            && let Some(lease) = choice.lease
        {
            // A few completion failures (the lease ends, the entry stays).
            cp.release(lease, Outcome::BackendError, TokenCounts::default(), t0);
        }
    }
    Ok(cp)
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

/// A candidate slice shaped like the control plane's, for the pure policy.
fn candidates(n: usize, rng: &mut SmallRng) -> Vec<CandidateLoad> {
    (0..n)
        .map(|i| {
            let model = rng.random_range(0..3);
            CandidateLoad {
                priority: i as u32,
                model_in_flight: model,
                total_in_flight: model + rng.random_range(0..3),
                max_concurrent: 4,
                loaded: rng.random_bool(0.5),
                hard: None,
                avoid: i % 50 == 7,
            }
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let mut rng = SmallRng::seed_from_u64(42);
    println!(
        "{:>9} | {:>12} | {:>12} | {:>16} | {:>19}",
        "endpoints", "select ns", "choose dry ns", "choose+release ns", "choose+release x2 ns"
    );
    println!("{}", "-".repeat(82));
    for n in [10usize, 100, 1_000] {
        let cands = candidates(n, &mut rng);
        let mut prng = SmallRng::seed_from_u64(n as u64);
        let select_ns = time_per_call(|| {
            black_box(policy::select(black_box(&cands), None, false, &mut prng).ok());
        });

        let cp = build(n, &mut rng)?;
        let req = request(MODEL);
        let now = Instant::now();
        let dry_ns = time_per_call(|| {
            black_box(cp.choose(black_box(&req), None, now).ok());
        });

        let session = cp.open_session("bench", now).id;
        let pair_ns = time_per_call(|| {
            if let Ok(choice) = cp.choose(&req, Some(session), now)
                && let Some(lease) = choice.lease
            {
                cp.release(lease, Outcome::Ok, TokenCounts::default(), now);
            }
        });

        // Two threads at once: wall time over both threads' pairs.
        let pairs_per_thread = ((RUN_FOR.as_nanos() as f64 / pair_ns) as u64).max(1000);
        let start = Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..2 {
                let cp = cp.clone();
                let req = req.clone();
                scope.spawn(move || {
                    for _ in 0..pairs_per_thread {
                        if let Ok(choice) = cp.choose(&req, Some(session), now)
                            && let Some(lease) = choice.lease
                        {
                            cp.release(lease, Outcome::Ok, TokenCounts::default(), now);
                        }
                    }
                });
            }
        });
        let x2_ns = start.elapsed().as_nanos() as f64 / (2 * pairs_per_thread) as f64;
        let stats = cp.stats();
        anyhow::ensure!(
            stats.leases_active as usize == n * 3 / 2 - (n * 3 / 2).div_ceil(40),
            "leases leaked: {} active",
            stats.leases_active
        );
        println!("{n:>9} | {select_ns:>12.0} | {dry_ns:>13.0} | {pair_ns:>17.0} | {x2_ns:>20.0}");
    }
    Ok(())
}
