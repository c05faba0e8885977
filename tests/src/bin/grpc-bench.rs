//! `grpc-bench`: choose+release pairs per second against a running control
//! plane over gRPC, from several concurrent clients.
//!
//! Each of `--concurrency` workers loops "choose (reserve) → release (ok)"
//! for the measured duration, waiting for each answer before the next
//! request. Two transports:
//! - `--mode stream` (default): each of `--channels` HTTP/2 connections opens
//!   `--streams-per-channel` `Routing.Route` streams; workers share them,
//!   answers are matched to workers by correlation id (what a sidecar does);
//! - `--mode unary`: `ChooseEndpoint` then `Release` calls, workers sharing
//!   the channels.
//!
//! Prints one JSON object with pairs/s and per-pair latency percentiles.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use parking_lot::Mutex;
use switchyard_proto::v1::{
    ChooseRequest, KeepAliveRequest, OpenSessionRequest, Outcome, ReleaseRequest, RequestKind,
    RouteRequest, RouteResponse, route_request::Op, route_response::Result as Answer,
    routing_client::RoutingClient,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// `ChooseEndpoint` + `Release` unary calls.
    Unary,
    /// Both multiplexed on `Route` streams.
    Stream,
}

#[derive(Parser, Debug)]
#[command(about = "Measure choose+release pairs/s over gRPC against a control plane")]
struct Args {
    /// Control-plane URL.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,
    /// Model to choose for.
    #[arg(long)]
    model: String,
    /// Transport for the calls.
    #[arg(long, value_enum, default_value_t = Mode::Stream)]
    mode: Mode,
    /// Concurrent workers.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections shared by the workers.
    #[arg(long, default_value_t = 4)]
    channels: usize,
    /// `Route` streams per connection (stream mode).
    #[arg(long, default_value_t = 1)]
    streams_per_channel: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up seconds.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
}

/// One worker's results: latencies of measured pairs, failed pairs.
type WorkerResult = (Vec<Duration>, u64);

/// The measured window.
#[derive(Clone, Copy)]
struct Window {
    from: Instant,
    end: Instant,
}

impl Window {
    fn record(&self, t0: Instant, ok: bool, lat: &mut Vec<Duration>, errors: &mut u64) {
        if t0 >= self.from && Instant::now() <= self.end {
            if ok {
                lat.push(t0.elapsed());
            } else {
                *errors += 1;
            }
        }
    }
}

fn choose_request(model: &str, session: u64) -> ChooseRequest {
    ChooseRequest {
        model: model.to_owned(),
        reserve: true,
        session_id: session,
        request_kind: RequestKind::Chat as i32,
        ..Default::default()
    }
}

fn release_request(lease_id: u64) -> ReleaseRequest {
    ReleaseRequest {
        lease_id,
        outcome: Outcome::Ok as i32,
        prompt_tokens: 1,
        completion_tokens: 1,
        model_missing: false,
    }
}

/// Callers waiting on one `Route` stream, by correlation id.
type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Answer>>>>;

/// One `Route` stream shared by several workers.
struct Mux {
    tx: mpsc::Sender<RouteRequest>,
    next_id: AtomicU64,
    waiters: Waiters,
}

impl Mux {
    async fn open(channel: Channel) -> anyhow::Result<Arc<Self>> {
        let (tx, rx) = mpsc::channel(4096);
        let mut answers = RoutingClient::new(channel)
            .route(ReceiverStream::new(rx))
            .await
            .context("opening a Route stream")?
            .into_inner();
        let waiters: Waiters = Arc::default();
        let reader_waiters = waiters.clone();
        tokio::spawn(async move {
            while let Ok(Some(RouteResponse {
                correlation_id,
                result: Some(result),
                ..
            })) = answers.message().await
            {
                if let Some(w) = reader_waiters.lock().remove(&correlation_id) {
                    let _ = w.send(result);
                }
            }
            // Stream over: dropping the senders fails every waiting worker.
            reader_waiters.lock().clear();
        });
        Ok(Arc::new(Self {
            tx,
            next_id: AtomicU64::new(1),
            waiters,
        }))
    }

    /// Sends `op` and waits for its answer; `None` when the stream is gone.
    async fn call(&self, op: Op) -> Option<Answer> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (done, answer) = oneshot::channel();
        self.waiters.lock().insert(id, done);
        let request = RouteRequest {
            correlation_id: id,
            op: Some(op),
            releases: Vec::new(),
        };
        if self.tx.send(request).await.is_err() {
            self.waiters.lock().remove(&id);
            return None;
        }
        answer.await.ok()
    }
}

async fn stream_worker(mux: Arc<Mux>, model: String, session: u64, w: Window) -> WorkerResult {
    let mut lat = Vec::new();
    let mut errors = 0u64;
    while Instant::now() < w.end {
        let t0 = Instant::now();
        let ok = match mux.call(Op::Choose(choose_request(&model, session))).await {
            Some(Answer::Choice(c)) => matches!(
                mux.call(Op::Release(release_request(c.lease_id))).await,
                Some(Answer::Released(_))
            ),
            Some(_) => false,
            None => return (lat, errors + 1),
        };
        w.record(t0, ok, &mut lat, &mut errors);
    }
    (lat, errors)
}

async fn unary_worker(
    mut client: RoutingClient<Channel>,
    model: String,
    session: u64,
    w: Window,
) -> WorkerResult {
    let mut lat = Vec::new();
    let mut errors = 0u64;
    while Instant::now() < w.end {
        let t0 = Instant::now();
        let ok = match client
            .choose_endpoint(choose_request(&model, session))
            .await
        {
            Ok(c) => client
                .release(release_request(c.into_inner().lease_id))
                .await
                .is_ok(),
            Err(_) => false,
        };
        w.record(t0, ok, &mut lat, &mut errors);
    }
    (lat, errors)
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
        .open_session(OpenSessionRequest {
            name: "grpc-bench".into(),
            open_token: 0,
        })
        .await?
        .into_inner()
        .session_id;

    // Keep the session alive as a sidecar does: runs longer than the
    // session TTL (10 s by default) would otherwise see it expire.
    let mut keeper = RoutingClient::new(channels[0].clone());
    let _keep_alive = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tick.tick().await;
            let _ = keeper
                .keep_alive(KeepAliveRequest {
                    session_id: session,
                })
                .await;
        }
    }));

    let mut muxes = Vec::new();
    if args.mode == Mode::Stream {
        for ch in &channels {
            for _ in 0..args.streams_per_channel.max(1) {
                muxes.push(Mux::open(ch.clone()).await?);
            }
        }
    }

    let start = Instant::now();
    let from = start + Duration::from_secs_f64(args.warmup);
    let window = Window {
        from,
        end: from + Duration::from_secs_f64(args.duration),
    };
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.concurrency {
        let model = args.model.clone();
        match args.mode {
            Mode::Stream => {
                let mux = muxes[i % muxes.len()].clone();
                tasks.spawn(stream_worker(mux, model, session, window));
            }
            Mode::Unary => {
                let client = RoutingClient::new(channels[i % channels.len()].clone());
                tasks.spawn(unary_worker(client, model, session, window));
            }
        }
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
    let mode = match args.mode {
        Mode::Unary => "unary",
        Mode::Stream => "stream",
    };
    let out = serde_json::json!({
        "mode": mode,
        "pairs": lat.len(),
        "errors": errors,
        "pairs_per_sec": lat.len() as f64 / args.duration,
        "concurrency": args.concurrency,
        "channels": args.channels,
        "streams_per_channel": if args.mode == Mode::Stream { args.streams_per_channel } else { 0 },
        "p50_us": pct(0.5),
        "p99_us": pct(0.99),
    });
    println!("{out}");
    Ok(())
}
