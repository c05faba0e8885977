//! Fault-injection helpers (issue "Survive failure"): a control-plane child
//! process inspected over its own gRPC `Cluster` service and `/metrics`,
//! sidecar child processes with a session name, a client load generator that
//! records every failed request, a Prometheus text reader, a TCP "black
//! hole" for connect timeouts, and a tight poller that measures how long a
//! condition took.
//!
//! Used by `tests/system/tests/faults.rs` and `faults_soak.rs`. Built on
//! [`crate::process`] (children are SIGKILLed and reaped on drop) and
//! [`crate::wait`] (every wait bounded, panicking with the last value).
//!
//! Invariants: every listener binds port 0 (or a port the harness just
//! reserved); every network call made here is bounded by a timeout, so a
//! dead control plane shows up as `None`, never as a hung test; the load
//! generator never retries — a request that fails is reported, with its
//! status and body, as a failure.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;
use serde_json::{Value, json};
use switchyard_control_plane::{api::SessionInfo, cluster::ClusterState};
use switchyard_proto::v1::{self, cluster_client::ClusterClient};
use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::{
    config::TestConfig,
    process::{Binary, ChildProcess, free_addr, write_config},
};

/// Deadline of one inspection call (gRPC or `/metrics`).
const INSPECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A `switchyard-control-plane` child process with `--metrics-listen`, and
/// a lazily (re)connecting gRPC channel to its `Cluster` service.
#[derive(Debug)]
pub struct CpProcess {
    /// The process (kill / restart / logs).
    pub process: ChildProcess,
    /// Its `/metrics` address.
    pub metrics_addr: SocketAddr,
    channel: Channel,
    http: reqwest::Client,
}

impl CpProcess {
    /// `switchyard-control-plane --config FILE --listen ADDR --metrics-listen ADDR`.
    pub async fn start(config: &TestConfig) -> Self {
        let addr = free_addr();
        let metrics_addr = free_addr();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        let file = write_config(dir.path(), config);
        let args = vec![
            "--config".to_owned(),
            file.display().to_string(),
            "--listen".to_owned(),
            addr.to_string(),
            "--metrics-listen".to_owned(),
            metrics_addr.to_string(),
        ];
        let process =
            ChildProcess::spawn_in(Binary::ControlPlane, args, Vec::new(), addr, dir).await;
        let channel = tonic::transport::Endpoint::from_shared(process.url())
            .unwrap_or_else(|e| panic!("bad control-plane URL {}: {e}", process.url()))
            .connect_timeout(Duration::from_millis(500))
            .timeout(INSPECT_TIMEOUT)
            .connect_lazy();
        CpProcess {
            process,
            metrics_addr,
            channel,
            http: http_client(),
        }
    }

    /// gRPC URL for sidecars.
    pub fn url(&self) -> String {
        self.process.url()
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts again on the same addresses.
    pub async fn restart(&mut self) {
        self.process.restart().await;
    }

    /// The cluster state, or `None` when the control plane does not answer.
    pub async fn state(&self) -> Option<ClusterState> {
        let mut client = ClusterClient::new(self.channel.clone());
        let call = client.get_state(v1::GetStateRequest {});
        let answer = tokio::time::timeout(INSPECT_TIMEOUT, call)
            .await
            .ok()?
            .ok()?;
        Some(
            ClusterState::try_from(answer.into_inner())
                .unwrap_or_else(|e| panic!("control plane sent an invalid ClusterState: {e}")),
        )
    }

    /// `(in-flight sum, leases)`, or `None` when unreachable.
    pub async fn usage(&self) -> Option<(u64, u32)> {
        self.state().await.map(|s| (s.total_in_flight(), s.leases))
    }

    /// Live sessions, or `None` when unreachable.
    pub async fn sessions(&self) -> Option<Vec<SessionInfo>> {
        let mut client = ClusterClient::new(self.channel.clone());
        let call = client.list_sessions(v1::ListSessionsRequest {});
        let answer = tokio::time::timeout(INSPECT_TIMEOUT, call)
            .await
            .ok()?
            .ok()?;
        Some(
            answer
                .into_inner()
                .sessions
                .into_iter()
                .map(|s| {
                    SessionInfo::try_from(s).unwrap_or_else(|e| {
                        panic!("invalid SessionInfo from the control plane: {e}")
                    })
                })
                .collect(),
        )
    }

    /// `Cluster.Drain` (or `Undrain`) of `endpoint`; panics on failure.
    pub async fn set_draining(&self, endpoint: &str, draining: bool) {
        let mut client = ClusterClient::new(self.channel.clone());
        let request = v1::DrainRequest {
            endpoint: endpoint.to_owned(),
        };
        let answer = if draining {
            client.drain(request).await
        } else {
            client.undrain(request).await
        };
        if let Err(e) = answer {
            panic!("drain {endpoint} = {draining} failed: {e}");
        }
    }

    /// The `/metrics` text, or `None` when unreachable.
    pub async fn metrics(&self) -> Option<String> {
        get_text(&self.http, &format!("http://{}/metrics", self.metrics_addr)).await
    }

    /// Polls until usage is `(in_flight, leases)`; returns the time it took.
    /// Panics after `timeout` with the last value seen.
    pub async fn wait_usage(&self, in_flight: u64, leases: u32, timeout: Duration) -> Duration {
        let start = Instant::now();
        let mut last = None;
        loop {
            let now = self.usage().await;
            if now == Some((in_flight, leases)) {
                return start.elapsed();
            }
            if now.is_some() {
                last = now;
            }
            if start.elapsed() > timeout {
                panic!(
                    "control plane usage (in-flight, leases) did not reach ({in_flight}, {leases}) \
                     within {timeout:?}; last seen {last:?}; control-plane log:\n{}",
                    tail(&self.process.logs(), 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// `switchyard-sidecar --control-plane URL --listen ADDR --name NAME --config FILE`.
pub async fn sidecar_process(
    control_plane_url: &str,
    config: &TestConfig,
    name: &str,
) -> ChildProcess {
    let addr = free_addr();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
    let file = write_config(dir.path(), config);
    let args = vec![
        "--control-plane".to_owned(),
        control_plane_url.to_owned(),
        "--listen".to_owned(),
        addr.to_string(),
        "--name".to_owned(),
        name.to_owned(),
        "--config".to_owned(),
        file.display().to_string(),
    ];
    ChildProcess::spawn_in(Binary::Sidecar, args, Vec::new(), addr, dir).await
}

/// An HTTP client that ignores proxy variables, without a global timeout
/// (callers bound their own calls).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap_or_else(|e| panic!("cannot build an HTTP client: {e}"))
}

/// `GET url` as text within `INSPECT_TIMEOUT`; `None` on any failure or a
/// non-2xx status.
pub async fn get_text(http: &reqwest::Client, url: &str) -> Option<String> {
    let fut = async {
        let r = http.get(url).send().await.ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.text().await.ok()
    };
    tokio::time::timeout(INSPECT_TIMEOUT, fut)
        .await
        .ok()
        .flatten()
}

/// The last `n` lines of `text` (for failure messages).
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Sum of the samples of metric `name` (exact name, e.g.
/// `switchyard_cp_releases_total`) whose labels include every `(key,
/// value)` of `labels`, in Prometheus text format. 0 when absent.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let has_all = labels
                .iter()
                .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
            if !has_all {
                return None;
            }
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

/// A non-streaming `/api/chat` body for model `model`.
pub fn chat(model: &str, text: &str) -> Value {
    json!({"model": model, "stream": false,
           "messages": [{"role": "user", "content": text}]})
}

/// A streaming `/api/chat` body for model `model`.
pub fn chat_stream(model: &str, text: &str) -> Value {
    json!({"model": model, "stream": true,
           "messages": [{"role": "user", "content": text}]})
}

/// Sends one non-streaming request; `Ok(x-fake-backend label)` on a 200
/// with a complete Ollama answer, `Err(description)` otherwise.
pub async fn chat_once(http: &reqwest::Client, url: &str, body: &Value) -> Result<String, String> {
    let fut = async {
        let r = http
            .post(url)
            .json(body)
            .send()
            .await
            .map_err(|e| format!("transport error: {e:?}"))?;
        let status = r.status().as_u16();
        let label = r
            .headers()
            .get("x-fake-backend")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let text = r
            .text()
            .await
            .map_err(|e| format!("status {status}, body read failed: {e:?}"))?;
        if status != 200 {
            return Err(format!("status {status}: {text}"));
        }
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| format!("status 200, body not JSON ({e}): {text}"))?;
        if v["done"] != json!(true) || v.get("error").is_some() {
            return Err(format!("status 200 but not a complete answer: {text}"));
        }
        Ok(label)
    };
    match tokio::time::timeout(Duration::from_secs(30), fut).await {
        Ok(r) => r,
        Err(_) => Err("no answer within 30 s".to_owned()),
    }
}

/// What a [`Load`] did.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Requests answered completely with 200.
    pub ok: u64,
    /// Every failed request: `(seconds since load start, what happened)`.
    pub failures: Vec<(f64, String)>,
    /// The slowest request (successful or not).
    pub max_latency: Duration,
}

/// Closed-loop client load: `workers` tasks, each sending non-streaming
/// chats one after another, cycling over `urls` (sidecar base URLs), until
/// stopped. Never retries.
#[derive(Debug)]
pub struct Load {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<(f64, String)>>>,
    max_latency_us: Arc<AtomicU64>,
}

impl Load {
    /// Starts the workers.
    pub fn start(http: &reqwest::Client, urls: &[String], workers: usize, model: &str) -> Load {
        let stop = CancellationToken::new();
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let max_latency_us = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let tasks = (0..workers)
            .map(|w| {
                let http = http.clone();
                let urls: Vec<String> = urls.iter().map(|u| format!("{u}/api/chat")).collect();
                let stop = stop.clone();
                let ok = ok.clone();
                let failures = failures.clone();
                let max_latency_us = max_latency_us.clone();
                let model = model.to_owned();
                tokio::spawn(async move {
                    let mut i = w;
                    while !stop.is_cancelled() {
                        let url = &urls[i % urls.len()];
                        let body = chat(&model, &format!("worker {w} request {i}"));
                        let sent = Instant::now();
                        let answer = chat_once(&http, url, &body).await;
                        let took = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                        max_latency_us.fetch_max(took, Ordering::Relaxed);
                        match answer {
                            Ok(_) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => failures
                                .lock()
                                .push((started.elapsed().as_secs_f64(), format!("{url}: {e}"))),
                        }
                        i += 1;
                    }
                })
            })
            .collect();
        Load {
            stop,
            tasks,
            ok,
            failures,
            max_latency_us,
        }
    }

    /// Requests answered so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Failures so far.
    pub fn failures(&self) -> usize {
        self.failures.lock().len()
    }

    /// Stops the workers after their current request and reports.
    pub async fn stop(self) -> LoadReport {
        self.stop.cancel();
        for t in self.tasks {
            crate::wait::within("a load worker to stop", Duration::from_secs(40), t)
                .await
                .unwrap_or_else(|e| panic!("load worker panicked: {e}"));
        }
        LoadReport {
            ok: self.ok.load(Ordering::Relaxed),
            failures: std::mem::take(&mut *self.failures.lock()),
            max_latency: Duration::from_micros(self.max_latency_us.load(Ordering::Relaxed)),
        }
    }
}

/// A TCP address whose connects hang: a listener with backlog 0 whose
/// accept queue is filled by connections it never accepts, so the kernel
/// drops further SYNs. Dropping it frees the address.
#[derive(Debug)]
pub struct BlackHole {
    _listener: tokio::net::TcpListener,
    _fillers: Vec<tokio::net::TcpStream>,
    /// The address.
    pub addr: SocketAddr,
}

impl BlackHole {
    /// Binds `addr` (e.g. the address a stopped fake used) and fills its
    /// accept queue; panics if connects still succeed afterwards.
    pub async fn bind(addr: SocketAddr) -> BlackHole {
        let socket = tokio::net::TcpSocket::new_v4()
            .unwrap_or_else(|e| panic!("cannot create a socket: {e}"));
        let _ = socket.set_reuseaddr(true);
        socket
            .bind(addr)
            .unwrap_or_else(|e| panic!("cannot bind {addr} for the black hole: {e}"));
        let listener = socket
            .listen(0)
            .unwrap_or_else(|e| panic!("cannot listen on {addr}: {e}"));
        let mut fillers = Vec::new();
        for _ in 0..8 {
            match tokio::time::timeout(
                Duration::from_millis(300),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            {
                Ok(Ok(s)) => fillers.push(s),
                Ok(Err(e)) => panic!("black hole at {addr}: filler connect failed: {e}"),
                Err(_) => {
                    return BlackHole {
                        _listener: listener,
                        _fillers: fillers,
                        addr,
                    };
                }
            }
        }
        panic!(
            "black hole at {addr}: {} connects succeeded, the accept queue never filled",
            fillers.len()
        );
    }
}

/// Polls `condition` every millisecond until it holds; returns the time
/// since `since`. Panics after `timeout` naming `what`.
pub async fn measure_until(
    what: &str,
    since: Instant,
    timeout: Duration,
    mut condition: impl FnMut() -> bool,
) -> Duration {
    loop {
        if condition() {
            return since.elapsed();
        }
        if since.elapsed() > timeout {
            panic!("{what} did not happen within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
