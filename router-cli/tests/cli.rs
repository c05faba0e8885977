//! The `switchyard` binary against an in-process control plane on
//! `127.0.0.1:0`: every command in both output formats, the error paths and
//! their exit codes, drain/undrain, and `watch` following lease changes.
//!
//! Discovery is injected with `ControlPlane::apply_probe` (no backends): the
//! configured endpoints point at closed ports, the probe interval is an hour,
//! and each test waits for the first (failed) probe round before injecting,
//! so no later probe can overwrite what the test set up.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use switchyard_cli::view::{
    AffinityView, ChoiceView, DrainView, ModelsView, SessionsView, StateView, UsageView,
};
use switchyard_control_plane::{
    api::{ModelItems, ProbeReport},
    config::Config,
    decision::{ChooseRequest, DecisionReason},
    ids::{LeaseId, SessionId},
    outcome::{Outcome, RequestKind, TokenCounts},
    server::RunningControlPlane,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

const OLLAMA: &str = "http://127.0.0.1:1";
const OPENAI: &str = "http://127.0.0.1:2/v1";
const LLAMA: &str = "http://127.0.0.1:3/v1";
const GEMMA: &str = "unsloth/gemma-3-4b-it-GGUF:Q4_K_M";

const CONFIG: &str = r#"
endpoints:
  - http://127.0.0.1:1
  - http://127.0.0.1:2/v1
llama_server_endpoints:
  - http://127.0.0.1:3/v1
max_concurrent_connections: 2
conversation_affinity: true
probe_interval: 1h
probe_timeout: 1s
probe_jitter: 0
"#;

/// Longest wait for anything in these tests.
const BOUND: Duration = Duration::from_secs(20);

/// Polls `cond` until it holds, failing the test after [`BOUND`].
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + BOUND;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A running control plane whose endpoints advertise models:
/// - Ollama: `llama3:latest` (loaded), `qwen3:8b` (not loaded);
/// - OpenAI: `llama3` (loaded), `gpt-4o`;
/// - llama-server: the Gemma GGUF (loaded).
async fn cluster() -> RunningControlPlane {
    let config = Config::from_yaml(CONFIG, &|_| None).unwrap();
    let running = RunningControlPlane::start(config).await.unwrap();
    let cp = running.cp.clone();
    // Each endpoint's first probe fails (closed port); the next is an hour away.
    let endpoints = cp.config().endpoints.len() as u64;
    wait_until("the first probe round to fail", || {
        cp.stats().probes_failed >= endpoints
    })
    .await;
    let ok = |advertised: &[&str], loaded: &[&str]| ProbeReport::Ok {
        advertised: advertised.iter().map(|s| (*s).to_owned()).collect(),
        loaded: loaded.iter().map(|s| (*s).to_owned()).collect(),
        items: ModelItems::default(),
    };
    let now = Instant::now();
    cp.apply_probe(
        0,
        ok(&["llama3:latest", "qwen3:8b"], &["llama3:latest"]),
        now,
    );
    cp.apply_probe(1, ok(&["llama3", "gpt-4o"], &["llama3"]), now);
    cp.apply_probe(2, ok(&[GEMMA], &[GEMMA]), now);
    assert!(cp.state().endpoints.iter().all(|e| e.healthy));
    running
}

fn request(model: &str, affinity_key: Option<&str>) -> ChooseRequest {
    ChooseRequest {
        model: model.to_owned(),
        affinity_key: affinity_key.map(str::to_owned),
        affinity_required: false,
        kind: RequestKind::Chat,
        exclude: Vec::new(),
    }
}

/// Usage: one finished `llama3` request (10 prompt + 5 completion tokens)
/// and one in flight with affinity key `conv-1`. Returns the session, the
/// in-flight lease and its endpoint.
fn make_usage(running: &RunningControlPlane) -> (SessionId, LeaseId, String) {
    let cp = &running.cp;
    let now = Instant::now();
    let session = cp.open_session("ingress-a", now).id;
    let done = cp
        .choose(&request("llama3", None), Some(session), now)
        .unwrap();
    let tokens = TokenCounts {
        prompt: 10,
        completion: 5,
    };
    assert!(cp.release(done.lease.unwrap(), Outcome::Ok, tokens, now));
    let open = cp
        .choose(&request("llama3", Some("conv-1")), Some(session), now)
        .unwrap();
    (session, open.lease.unwrap(), open.endpoint.to_string())
}

/// Runs the built binary against `url` and waits for it (bounded).
async fn switchyard(url: &str, args: &[&str]) -> Output {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("--control-plane")
        .arg(url)
        .args(args)
        .env_remove("SWITCHYARD_OUTPUT")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(BOUND, child)
        .await
        .expect("switchyard did not finish in time")
        .unwrap()
}

/// Runs a command that must succeed; returns its stdout.
async fn ok(url: &str, args: &[&str]) -> String {
    let out = switchyard(url, args).await;
    assert!(
        out.status.success(),
        "switchyard {args:?} failed: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command with `--output json` and parses its stdout.
async fn json<T: serde::de::DeserializeOwned>(url: &str, args: &[&str]) -> T {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let text = ok(url, &all).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn row_of<'a>(table: &'a str, first_cell: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(first_cell))
        .unwrap_or_else(|| panic!("no row for {first_cell} in:\n{table}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_in_both_formats() {
    let running = cluster().await;
    let (_, _, busy) = make_usage(&running);
    let url = running.url();

    let state: StateView = json(&url, &["endpoints"]).await;
    let urls: Vec<&str> = state.endpoints.iter().map(|e| e.url.as_str()).collect();
    assert_eq!(urls, [OLLAMA, OPENAI, LLAMA]);
    let kinds: Vec<&str> = state.endpoints.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["ollama", "openai", "llama_server"]);
    assert!(
        state.endpoints.iter().all(|e| e.healthy && !e.draining),
        "{state:#?}"
    );
    assert_eq!(
        state.endpoints[0].advertised_models,
        ["llama3:latest", "qwen3:8b"]
    );
    assert_eq!(state.endpoints[0].loaded_models, ["llama3:latest"]);
    assert_eq!((state.sessions, state.leases, state.in_flight), (1, 1, 1));
    let busy_ep = state.endpoints.iter().find(|e| e.url == busy).unwrap();
    assert_eq!((busy_ep.in_flight, busy_ep.max_concurrent), (1, 2));

    let table = ok(&url, &["endpoints"]).await;
    assert!(table.starts_with("URL "), "{table}");
    let row = row_of(&table, &busy);
    assert!(
        row.contains(" ok ") && row.contains("active") && row.contains("closed"),
        "{row}"
    );
    // IN-FLIGHT (over all models) then LIMIT/MODEL (the per-model limit).
    let header = table.lines().next().unwrap();
    let cell = |name: &str| {
        let at = header.find(name).unwrap();
        row[at..].split_whitespace().next().unwrap()
    };
    assert_eq!(
        (cell("IN-FLIGHT"), cell("LIMIT/MODEL")),
        ("1", "2"),
        "{row}"
    );
    let gemma = row_of(&table, LLAMA);
    assert!(
        gemma.contains("llama_server") && gemma.contains(GEMMA),
        "{gemma}"
    );

    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_in_both_formats() {
    let running = cluster().await;
    let (_, _, busy) = make_usage(&running);
    let url = running.url();

    let models: ModelsView = json(&url, &["models"]).await;
    let names: Vec<&str> = models.models.iter().map(|m| m.model.as_str()).collect();
    assert_eq!(names, ["gpt-4o:latest", "llama3:latest", "qwen3:8b", GEMMA]);
    let llama = &models.models[1];
    let served_by: Vec<&str> = llama.endpoints.iter().map(|e| e.url.as_str()).collect();
    assert_eq!(served_by, [OLLAMA, OPENAI]);
    assert!(llama.endpoints.iter().all(|e| e.loaded));
    assert_eq!(llama.in_flight, 1);
    let on_busy = llama.endpoints.iter().find(|e| e.url == busy).unwrap();
    assert_eq!(on_busy.in_flight, 1);
    let gemma = &models.models[3];
    assert_eq!(gemma.endpoints[0].tracking_model, "gemma-3-4b-it-GGUF");
    let qwen = &models.models[2];
    assert!(!qwen.endpoints[0].loaded);

    let table = ok(&url, &["models"]).await;
    assert!(table.starts_with("MODEL "), "{table}");
    let qwen_row = row_of(&table, "qwen3:8b");
    assert!(
        qwen_row.contains(OLLAMA) && qwen_row.contains(" no "),
        "{qwen_row}"
    );

    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_in_both_formats() {
    let running = cluster().await;
    make_usage(&running);
    let url = running.url();

    let usage: UsageView = json(&url, &["usage"]).await;
    assert_eq!(usage.totals.in_flight, 1);
    assert_eq!(usage.totals.requests, 1);
    assert_eq!(usage.totals.prompt_tokens, 10);
    assert_eq!(usage.totals.completion_tokens, 5);
    assert!(
        usage.rows.iter().all(|r| r.model.starts_with("llama3")),
        "{usage:?}"
    );

    let table = ok(&url, &["usage"]).await;
    let total: Vec<&str> = row_of(&table, "TOTAL").split_whitespace().collect();
    assert_eq!(total, ["TOTAL", "1", "1", "10", "5"]);

    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_in_both_formats() {
    let running = cluster().await;
    let (session, _, _) = make_usage(&running);
    let url = running.url();

    let sessions: SessionsView = json(&url, &["sessions"]).await;
    assert_eq!(sessions.sessions.len(), 1);
    let s = &sessions.sessions[0];
    assert_eq!(
        (s.id, s.name.as_str(), s.leases),
        (session.0, "ingress-a", 1)
    );
    assert!(s.expires_in_ms > 0 && s.expires_in_ms <= 10_000, "{s:?}");

    let table = ok(&url, &["sessions"]).await;
    let row = row_of(&table, &session.to_string());
    assert!(row.contains("ingress-a") && row.contains(" ago"), "{row}");

    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_in_both_formats() {
    let running = cluster().await;
    let (session, _, busy) = make_usage(&running);
    // A second conversation, so `--limit 1` has something to leave out.
    running
        .cp
        .choose(
            &request("gpt-4o", Some("conv-2")),
            Some(session),
            Instant::now(),
        )
        .unwrap();
    let url = running.url();

    let all: AffinityView = json(&url, &["affinity"]).await;
    assert_eq!(all.total, 2);
    let conv1 = all.entries.iter().find(|e| e.key == "conv-1").unwrap();
    assert_eq!(conv1.endpoint, busy);
    assert!(conv1.expires_in_ms > 0);
    let one: AffinityView = json(&url, &["affinity", "--limit", "1"]).await;
    assert_eq!((one.total, one.entries.len()), (2, 1));

    let table = ok(&url, &["affinity"]).await;
    assert!(
        table.starts_with("affinity entries: 2 (showing 2)"),
        "{table}"
    );
    assert!(row_of(&table, "conv-1").contains(&busy), "{table}");

    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn choose_is_a_dry_run_in_both_formats() {
    let running = cluster().await;
    let (_, _, busy) = make_usage(&running);
    let url = running.url();
    let leases_before = running.cp.state().leases;

    let gemma: ChoiceView = json(&url, &["choose", GEMMA]).await;
    assert_eq!(gemma.endpoint, LLAMA);
    assert_eq!(gemma.endpoint_kind, "llama_server");
    assert_eq!(gemma.backend_model, GEMMA);
    assert_eq!(gemma.tracking_model, "gemma-3-4b-it-GGUF");
    assert_eq!(gemma.reason, DecisionReason::LoadedFree);

    let qwen: ChoiceView = json(&url, &["choose", "qwen3:8b"]).await;
    assert_eq!(
        (qwen.endpoint.as_str(), qwen.reason),
        (OLLAMA, DecisionReason::FreeSlot)
    );

    let sticky: ChoiceView = json(&url, &["choose", "llama3", "--affinity-key", "conv-1"]).await;
    assert_eq!(
        (sticky.endpoint.as_str(), sticky.reason),
        (busy.as_str(), DecisionReason::Affinity)
    );

    let table = ok(&url, &["choose", "qwen3:8b"]).await;
    assert!(
        table.contains(&format!("endpoint:       {OLLAMA}\n")),
        "{table}"
    );
    assert!(table.contains("kind:           ollama\n"), "{table}");
    assert!(table.contains("backend model:  qwen3:8b\n"), "{table}");
    assert!(table.contains("tracking model: qwen3:8b\n"), "{table}");
    assert!(table.contains("reason:         free_slot ("), "{table}");

    // Nothing reserved, no affinity written.
    let state = running.cp.state();
    assert_eq!(state.leases, leases_before);
    assert_eq!(state.affinity_entries, 1);

    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found_exits_1_with_the_servers_message() {
    let running = cluster().await;
    let url = running.url();

    let out = switchyard(&url, &["choose", "no-such-model"]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: model"), "{err}");
    assert!(
        err.contains("no-such-model") && err.contains("not found"),
        "{err}"
    );
    assert!(out.stdout.is_empty());

    let out = switchyard(&url, &["drain", "http://127.0.0.1:99"]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("http://127.0.0.1:99") && err.contains(OLLAMA),
        "{err}"
    );

    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_undrain_round_trip() {
    let running = cluster().await;
    let url = running.url();

    let drained: DrainView = json(&url, &["drain", OLLAMA]).await;
    assert_eq!(drained.endpoint.url, OLLAMA);
    assert!(drained.endpoint.draining);
    assert!(running.cp.state().endpoints[0].draining);
    let state: StateView = json(&url, &["endpoints"]).await;
    assert!(state.endpoints[0].draining && !state.endpoints[1].draining);
    let table = ok(&url, &["endpoints"]).await;
    assert!(row_of(&table, OLLAMA).contains("draining"), "{table}");
    // A drained endpoint is not chosen for a model others also serve.
    let llama: ChoiceView = json(&url, &["choose", "llama3"]).await;
    assert_eq!(llama.endpoint, OPENAI);

    // Trailing slash ignored; table output says the new state.
    let text = ok(&url, &["undrain", &format!("{OLLAMA}/")]).await;
    assert!(text.starts_with(&format!("{OLLAMA} is active")), "{text}");
    assert!(!running.cp.state().endpoints[0].draining);
    let text = ok(&url, &["drain", OLLAMA]).await;
    assert!(text.starts_with(&format!("{OLLAMA} is draining")), "{text}");
    let undrained: DrainView = json(&url, &["undrain", OLLAMA]).await;
    assert!(!undrained.endpoint.draining);

    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn unreachable_control_plane_exits_1_naming_the_address() {
    // A port that was free a moment ago: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let url = format!("http://{addr}");
    for args in [
        &["endpoints"][..],
        &["watch", "--output", "json"],
        &["drain", OLLAMA],
    ] {
        let out = switchyard(&url, args).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            err.trim_end(),
            format!("error: cannot reach control plane at {url}: connection refused"),
            "{args:?}"
        );
        assert!(out.stdout.is_empty());
    }
}

#[tokio::test]
async fn bad_usage_exits_2() {
    let url = "http://127.0.0.1:1";
    for args in [
        &["choose"][..],
        &["frobnicate"],
        &["endpoints", "--output", "yaml"],
        &["affinity", "--limit", "0"],
    ] {
        let out = switchyard(url, args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty());
    }
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["--control-plane", "localhost:50051", "endpoints"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("http://"));
}

#[tokio::test]
async fn every_subcommand_has_help() {
    for cmd in [
        "endpoints",
        "models",
        "usage",
        "sessions",
        "affinity",
        "watch",
        "choose",
        "drain",
        "undrain",
    ] {
        let out = switchyard("http://127.0.0.1:1", &[cmd, "--help"]).await;
        assert!(out.status.success(), "{cmd}");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains(&format!("Usage: switchyard {cmd}")), "{help}");
        assert!(help.contains("--output"), "{cmd}: {help}");
        // Every flag also reads an environment variable (DESIGN.md).
        // Each option's block starts with a line "  -x, --flag" or "      --flag".
        let options = help.split("Options:").nth(1).unwrap_or_default();
        let mut blocks: Vec<String> = Vec::new();
        for line in options.lines() {
            let trimmed = line.trim_start();
            if trimmed.starts_with('-') && line.len() - trimmed.len() <= 6 {
                blocks.push(String::new());
            }
            if let Some(block) = blocks.last_mut() {
                block.push_str(line);
                block.push('\n');
            }
        }
        assert!(!blocks.is_empty(), "{cmd}: {help}");
        for block in blocks {
            if block.contains("--help") || block.contains("--version") {
                continue;
            }
            assert!(block.contains("[env: SWITCHYARD_"), "{cmd}: {block}");
        }
    }
}

/// A running `switchyard watch` whose stdout is read line by line.
struct Watch {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Watch {
    fn spawn(url: &str, extra: &[&str]) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["--control-plane", url, "watch"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        Self {
            child,
            lines: BufReader::new(stdout).lines(),
        }
    }

    async fn line(&mut self) -> Option<String> {
        tokio::time::timeout(BOUND, self.lines.next_line())
            .await
            .expect("no output from watch in time")
            .unwrap()
    }

    /// Reads JSON lines until one satisfies `cond`.
    async fn until(&mut self, what: &str, cond: impl Fn(&StateView) -> bool) -> StateView {
        loop {
            let line = self
                .line()
                .await
                .unwrap_or_else(|| panic!("watch ended before {what}"));
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert!(v.is_object(), "{line}");
            let state: StateView = serde_json::from_value(v).unwrap();
            if cond(&state) {
                return state;
            }
        }
    }

    async fn exit_code(mut self) -> Option<i32> {
        tokio::time::timeout(BOUND, self.child.wait())
            .await
            .expect("watch did not exit in time")
            .unwrap()
            .code()
    }

    async fn exit_code_and_stderr(mut self) -> (Option<i32>, String) {
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            tokio::time::timeout(BOUND, pipe.read_to_string(&mut stderr))
                .await
                .expect("watch did not exit in time")
                .unwrap();
        }
        (self.exit_code().await, stderr)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_json_follows_a_request_and_ends_with_the_stream() {
    let running = cluster().await;
    let cp = running.cp.clone();
    let session = cp.open_session("ingress-w", Instant::now()).id;
    let mut watch = Watch::spawn(&running.url(), &["--output", "json"]);

    let first = watch.until("the initial snapshot", |_| true).await;
    assert_eq!((first.leases, first.in_flight), (0, 0));
    assert_eq!(first.endpoints.len(), 3);

    // A request starts: a lease is taken.
    let choice = cp
        .choose(&request(GEMMA, None), Some(session), Instant::now())
        .unwrap();
    let started = watch.until("the lease to show", |s| s.leases == 1).await;
    assert!(started.version > first.version);
    let gemma = started.endpoints.iter().find(|e| e.url == LLAMA).unwrap();
    assert_eq!(gemma.in_flight, 1);
    assert_eq!(gemma.usage[0].model, "gemma-3-4b-it-GGUF");

    // The request ends: the lease is released with its tokens.
    let tokens = TokenCounts {
        prompt: 7,
        completion: 3,
    };
    assert!(cp.release(choice.lease.unwrap(), Outcome::Ok, tokens, Instant::now()));
    let ended = watch.until("the release to show", |s| s.leases == 0).await;
    assert_eq!(ended.in_flight, 0);
    let usage = &ended
        .endpoints
        .iter()
        .find(|e| e.url == LLAMA)
        .unwrap()
        .usage[0];
    assert_eq!(
        (usage.requests, usage.prompt_tokens, usage.completion_tokens),
        (1, 7, 3)
    );

    // The control plane shuts down: the stream ends, and watch says so and
    // exits 1 (a script following it must notice).
    running.shutdown().await.unwrap();
    let (code, stderr) = watch.exit_code_and_stderr().await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("the control plane ended the stream"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_table_exits_cleanly_on_ctrl_c() {
    let running = cluster().await;
    let mut watch = Watch::spawn(&running.url(), &[]);
    // Not a terminal: frames follow one another, no ANSI clearing.
    let first = watch.line().await.unwrap();
    assert!(first.starts_with("version "), "{first}");
    assert!(!first.contains('\x1b'), "{first:?}");
    let mut frame = Vec::new();
    while let Some(line) = watch.line().await {
        if line.starts_with("TOTAL") {
            break;
        }
        frame.push(line);
    }
    assert!(frame.iter().any(|l| l.starts_with("URL ")), "{frame:?}");
    assert!(frame.iter().any(|l| l.starts_with(OLLAMA)), "{frame:?}");

    let pid = watch.child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(watch.exit_code().await, Some(0));

    running.shutdown().await.unwrap();
}
