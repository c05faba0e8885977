//! `loadgen`: an HTTP load generator for Switchyard's benchmarks.
//!
//! Two modes:
//! - closed loop (`--concurrency N`): N workers send back-to-back requests;
//!   measures peak throughput.
//! - open loop (`--rate R`): requests are *scheduled* at a fixed rate and
//!   latency is measured from the scheduled send time, so a stall shows up in
//!   the percentiles instead of silently lowering the rate (no coordinated
//!   omission). The pacing timer has tokio's 1 ms resolution, so each
//!   request also starts up to ~1 ms late; the `service_*` percentiles
//!   measure from the actual send instead, without that client-side jitter
//!   (every request runs in its own task on its own connection from the
//!   pool, so a slow server still shows there).
//!
//! Prints one JSON object with throughput and latency percentiles.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "HTTP load generator for Switchyard benchmarks (closed or open loop)")]
struct Args {
    /// Full URL, e.g. http://127.0.0.1:12434/api/chat
    #[arg(long)]
    url: String,
    /// JSON body to POST; GET when absent.
    #[arg(long)]
    body: Option<String>,
    /// Closed loop: number of concurrent workers.
    #[arg(long, conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// Open loop: requests per second, scheduled at fixed intervals.
    #[arg(long)]
    rate: Option<f64>,
    /// Measured duration in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up seconds (not measured).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Label printed with the results.
    #[arg(long, default_value = "")]
    label: String,
    /// Also write one line per measured request to this file: send time
    /// (µs since the start of the measurement), latency µs, service µs, ok.
    /// For finding out whether a latency tail is one stall or spread out.
    #[arg(long)]
    dump: Option<std::path::PathBuf>,
}

struct Sample {
    /// When it was sent.
    sent: Instant,
    /// From the scheduled (open loop) or actual (closed loop) send time.
    latency: Duration,
    /// From the actual send time.
    service: Duration,
    ok: bool,
}

async fn send(client: &reqwest::Client, args: &Args) -> bool {
    let req = match &args.body {
        Some(b) => client
            .post(&args.url)
            .header("content-type", "application/json")
            .body(b.clone()),
        None => client.get(&args.url),
    };
    match req.send().await {
        Ok(resp) => {
            let ok = resp.status().is_success();
            // Read the whole body: streaming answers count when complete.
            resp.bytes().await.is_ok() && ok
        }
        Err(_) => false,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)].as_secs_f64() * 1e6
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = std::sync::Arc::new(Args::parse());
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()
        .context("building HTTP client")?;
    let warmup = Duration::from_secs_f64(args.warmup);
    let measure = Duration::from_secs_f64(args.duration);
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + measure;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Sample>();
    let mut tasks = tokio::task::JoinSet::new();

    match (args.concurrency, args.rate) {
        (Some(n), None) => {
            for _ in 0..n {
                let (client, args, tx) = (client.clone(), args.clone(), tx.clone());
                tasks.spawn(async move {
                    while Instant::now() < end {
                        let t0 = Instant::now();
                        let ok = send(&client, &args).await;
                        if t0 >= measure_from && Instant::now() <= end {
                            let took = t0.elapsed();
                            let _ = tx.send(Sample {
                                sent: t0,
                                latency: took,
                                service: took,
                                ok,
                            });
                        }
                    }
                });
            }
        }
        (None, Some(rate)) if rate > 0.0 => {
            let interval = Duration::from_secs_f64(1.0 / rate);
            let (client, args, tx) = (client.clone(), args.clone(), tx.clone());
            tasks.spawn(async move {
                let mut inner = tokio::task::JoinSet::new();
                let mut next = start;
                while next < end {
                    tokio::time::sleep_until(next.into()).await;
                    let scheduled = next;
                    let (client, args, tx) = (client.clone(), args.clone(), tx.clone());
                    inner.spawn(async move {
                        let sent = Instant::now();
                        let ok = send(&client, &args).await;
                        if scheduled >= measure_from {
                            let _ = tx.send(Sample {
                                sent,
                                latency: scheduled.elapsed(),
                                service: sent.elapsed(),
                                ok,
                            });
                        }
                    });
                    next += interval;
                    while inner.try_join_next().is_some() {}
                }
                while inner.join_next().await.is_some() {}
            });
        }
        _ => bail!("give exactly one of --concurrency N or --rate R (R > 0)"),
    }
    drop(tx);
    let (mut lat, mut service) = (Vec::new(), Vec::new());
    let mut errors = 0u64;
    let mut dump = Vec::new();
    while let Some(s) = rx.recv().await {
        if args.dump.is_some() {
            dump.push((
                s.sent.saturating_duration_since(measure_from).as_micros(),
                s.latency.as_micros(),
                s.service.as_micros(),
                s.ok,
            ));
        }
        if s.ok {
            lat.push(s.latency);
            service.push(s.service);
        } else {
            errors += 1;
        }
    }
    while tasks.join_next().await.is_some() {}
    if let Some(path) = &args.dump {
        dump.sort_unstable();
        let text: String = dump
            .iter()
            .map(|(at, l, sv, ok)| format!("{at} {l} {sv} {ok}\n"))
            .collect();
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    lat.sort_unstable();
    service.sort_unstable();
    let out = serde_json::json!({
        "label": args.label,
        "mode": if args.rate.is_some() { "open" } else { "closed" },
        "requests": lat.len(),
        "errors": errors,
        "rps": lat.len() as f64 / measure.as_secs_f64(),
        "p50_us": percentile(&lat, 0.50),
        "p90_us": percentile(&lat, 0.90),
        "p99_us": percentile(&lat, 0.99),
        "max_us": percentile(&lat, 1.0),
        "service_p50_us": percentile(&service, 0.50),
        "service_p90_us": percentile(&service, 0.90),
        "service_p99_us": percentile(&service, 0.99),
    });
    println!("{out}");
    Ok(())
}
