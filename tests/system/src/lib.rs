//! Shared harness for Switchyard's whole-system tests: fake model servers,
//! a control plane and sidecars wired together on `127.0.0.1:0`, the HTTP
//! client helpers the tests assert with, the Python client runner, and
//! real-binary child processes.
//!
//! Modules:
//! - [`config`]: [`config::TestConfig`], a YAML config built in code with
//!   fast test defaults (probes every 0.1 s, short session TTL).
//! - [`cluster`]: [`cluster::Cluster`] — N fake backends, one in-process
//!   control plane (real gRPC) and M remote-mode sidecars, or one standalone
//!   sidecar; usage reading and readiness waits.
//! - [`wait`]: bounded polling with clear panic messages (never a fixed sleep
//!   used as an assertion).
//! - [`client`]: HTTP requests, NDJSON and SSE readers that keep each
//!   chunk's arrival time.
//! - [`python`]: runs the scripts in `tests/system/python/` with the venv's
//!   interpreter (`SWITCHYARD_PYTHON`); a missing interpreter FAILS the test.
//! - [`process`]: the real binaries (`switchyard-control-plane`,
//!   `switchyard-sidecar`, `fake-model-server`) as child processes, killed
//!   on drop — for fault-injection tests.
//!
//! Invariants the harness keeps:
//! - every listener binds port 0 (child processes get a port the harness
//!   just reserved and released);
//! - every wait is bounded and panics naming what it waited for and the last
//!   value it saw;
//! - nothing is skipped silently: missing tools fail the test with the
//!   command that fixes it.

pub mod client;
pub mod cluster;
pub mod config;
pub mod process;
pub mod python;
pub mod wait;

pub use client::{Framing, Reply, SseEvent, StreamReply, TimedChunk};
pub use cluster::{BackendOptions, Cluster, ClusterBuilder, SidecarMode, ollama_fake, openai_fake};
pub use config::TestConfig;
pub use switchyard_tests::fake_backend::{
    FailureMode, FakeBackend, FakeConfig, FakeControl, FakeMode, FinishReason, RecordedRequest,
    ReplyScript, embedding_for,
};
pub use wait::{wait_for, wait_until};

/// The usual deadline for something the system should do "soon": probes,
/// releases, `WatchUsage` propagation. Generous for a loaded 2-core
/// machine; a passing test never waits for it.
pub const SOON: std::time::Duration = std::time::Duration::from_secs(10);

/// The workspace root (`tests/system/../..`).
pub fn workspace_root() -> std::path::PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .and_then(std::path::Path::parent)
        .map_or_else(|| manifest.to_path_buf(), std::path::Path::to_path_buf)
}

/// Fault-injection helpers (see the module docs).
pub mod faults;
