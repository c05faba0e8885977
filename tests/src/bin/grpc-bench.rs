//! `grpc-bench`: choose+release pairs per second against a running control
//! plane over gRPC, from several concurrent clients.
//!
//! Each worker loops `ChooseEndpoint(reserve) → Release(ok)` for the measured
//! duration; workers share `--channels` HTTP/2 connections. Prints one JSON
//! object with pairs/s and per-pair latency percentiles.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use switchyard_proto::v1::{
    ChooseRequest, OpenSessionRequest, Outcome, ReleaseRequest, RequestKind,
    routing_client::RoutingClient,
};
use tonic::transport::Channel;

#[derive(Parser, Debug)]
#[command(about = "Measure choose+release pairs/s over gRPC against a control plane")]
struct Args {
    /// Control-plane URL.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,
    /// Model to choose for.
    #[arg(long)]
    model: String,
    /// Concurrent workers.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections shared by the workers.
    #[arg(long, default_value_t = 4)]
    channels: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up seconds.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut channels = Vec::new();
    for _ in 0..args.channels.max(1) {
        let ch = Channel::from_shared(args.target.clone())
            .context("bad --target")?
            .connect()
            .await
            .with_context(|| format!("connecting to {}", args.target))?;
        channels.push(ch);
    }
    let mut first = RoutingClient::new(channels[0].clone());
    let session = first
        .open_session(OpenSessionRequest { name: "grpc-bench".into() })
        .await?
        .into_inner()
        .session_id;

    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.concurrency {
        let mut client = RoutingClient::new(channels[i % channels.len()].clone());
        let model = args.model.clone();
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < end {
                let t0 = Instant::now();
                let choice = client
                    .choose_endpoint(ChooseRequest {
                        model: model.clone(),
                        reserve: true,
                        session_id: session,
                        request_kind: RequestKind::Chat as i32,
                        ..Default::default()
                    })
                    .await;
                let ok = match choice {
                    Ok(c) => client
                        .release(ReleaseRequest {
                            lease_id: c.into_inner().lease_id,
                            outcome: Outcome::Ok as i32,
                            prompt_tokens: 1,
                            completion_tokens: 1,
                        })
                        .await
                        .is_ok(),
                    Err(_) => false,
                };
                if t0 >= measure_from && Instant::now() <= end {
                    if ok {
                        lat.push(t0.elapsed());
                    } else {
                        errors += 1;
                    }
                }
            }
            (lat, errors)
        });
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    while let Some(r) = tasks.join_next().await {
        let (l, e) = r?;
        lat.extend(l);
        errors += e;
    }
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
        lat[i.min(lat.len() - 1)].as_secs_f64() * 1e6
    };
    let out = serde_json::json!({
        "pairs": lat.len(),
        "errors": errors,
        "pairs_per_sec": lat.len() as f64 / args.duration,
        "concurrency": args.concurrency,
        "channels": args.channels,
        "p50_us": pct(0.5),
        "p99_us": pct(0.99),
    });
    println!("{out}");
    Ok(())
}
