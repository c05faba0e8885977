//! The real binaries as child processes — for end-to-end checks of the
//! command line and for fault injection (kill -9 a sidecar or the control
//! plane, restart it).
//!
//! Locating a binary: `env!("CARGO_BIN_EXE_<name>")` exists only inside the
//! binary's own package, so [`binary`] first runs one
//! `cargo build --bins -p switchyard-control-plane -p switchyard-sidecar
//! -p switchyard-tests` per test process (a no-op when fresh, so a stale
//! binary is never tested; cargo allows it while `cargo test` runs), then
//! looks in
//! `SWITCHYARD_BIN_DIR`, the directory of the running test executable's
//! profile (`target/debug`, found from `current_exe()`), and
//! `<workspace>/target/debug`. Set `SWITCHYARD_SKIP_BUILD=1` to skip the
//! build step (e.g. when testing release binaries in `SWITCHYARD_BIN_DIR`).
//!
//! Usage (fault-injection helpers reuse exactly this):
//!
//! ```no_run
//! # async fn demo(config: &switchyard_system_tests::TestConfig) {
//! use switchyard_system_tests::process::ChildProcess;
//! let mut cp = ChildProcess::control_plane(config).await;    // --config FILE --listen ADDR
//! let sidecar = ChildProcess::sidecar_remote(&cp.url(), Some(config)).await;
//! // ... send requests to sidecar.url() ...
//! cp.kill();                       // SIGKILL, reaped
//! cp.restart().await;              // same args, same port
//! println!("{}", sidecar.logs());  // stdout+stderr so far
//! # }
//! ```
//!
//! Every child is killed (SIGKILL) and reaped when its [`ChildProcess`] is
//! dropped; its output goes to a log file in a temp dir owned by the
//! handle, shown by [`ChildProcess::logs`].

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use tokio::sync::OnceCell;

use crate::{SOON, config::TestConfig, wait::wait_for_async};

/// A binary of the workspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Binary {
    /// `switchyard-control-plane` (package `switchyard-control-plane`).
    ControlPlane,
    /// `switchyard-sidecar` (package `switchyard-sidecar`).
    Sidecar,
    /// `fake-model-server` (package `switchyard-tests`).
    FakeModelServer,
}

impl Binary {
    /// File name.
    pub fn name(self) -> &'static str {
        match self {
            Binary::ControlPlane => "switchyard-control-plane",
            Binary::Sidecar => "switchyard-sidecar",
            Binary::FakeModelServer => "fake-model-server",
        }
    }

    /// Cargo package that builds it.
    pub fn package(self) -> &'static str {
        match self {
            Binary::ControlPlane => "switchyard-control-plane",
            Binary::Sidecar => "switchyard-sidecar",
            Binary::FakeModelServer => "switchyard-tests",
        }
    }
}

/// Builds every binary the harness runs, in one cargo invocation, once per
/// test process (one invocation: a single feature resolution, so the
/// binaries are not relinked back and forth between calls).
async fn build_binaries() {
    static BUILT: OnceCell<()> = OnceCell::const_new();
    BUILT
        .get_or_init(|| async {
            if std::env::var_os("SWITCHYARD_SKIP_BUILD").is_some() {
                return;
            }
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
            let mut args = vec!["build", "--quiet", "--bins"];
            for bin in [
                Binary::ControlPlane,
                Binary::Sidecar,
                Binary::FakeModelServer,
            ] {
                args.extend(["-p", bin.package()]);
            }
            let status = tokio::process::Command::new(&cargo)
                .current_dir(crate::workspace_root())
                .args(&args)
                .stdin(Stdio::null())
                .status()
                .await
                .unwrap_or_else(|e| panic!("cannot run {cargo} build: {e}"));
            if !status.success() {
                panic!("`cargo {}` failed ({status})", args.join(" "));
            }
        })
        .await;
}

fn candidate_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("SWITCHYARD_BIN_DIR") {
        dirs.push(PathBuf::from(d));
    }
    // target/debug/deps/<test-exe> -> target/debug
    if let Ok(exe) = std::env::current_exe()
        && let Some(profile) = exe.parent().and_then(Path::parent)
    {
        dirs.push(profile.to_path_buf());
    }
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        dirs.push(PathBuf::from(d).join("debug"));
    }
    dirs.push(crate::workspace_root().join("target/debug"));
    dirs
}

/// The path of `bin`, built (once per process) if needed; panics with the
/// build command to run when it cannot be found.
pub async fn binary(bin: Binary) -> PathBuf {
    build_binaries().await;
    candidate_dirs()
        .into_iter()
        .map(|d| d.join(bin.name()))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "binary {} not found in {:?}: run `cargo build -p {} --bin {}`",
                bin.name(),
                candidate_dirs(),
                bin.package(),
                bin.name()
            )
        })
}

/// A free loopback address for a child process to listen on.
///
/// The port comes from *below* the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`), never from it: a killed
/// process's port in the ephemeral range can be taken within milliseconds
/// as the source port of any outgoing connection on the machine (the
/// suite makes thousands), and then the restarted process cannot bind it
/// again (`a_drain_survives_a_control_plane_restart_with_a_state_file`
/// failed in CI that way). Ports below the range are only ever bound
/// explicitly. Each port is handed out once per test process, and is
/// checked free by binding it (the small race with other programs is the
/// price of real processes on free ports).
pub fn free_addr() -> SocketAddr {
    use std::{
        collections::HashSet,
        sync::{Mutex, OnceLock},
    };
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let low = 10_000u16.min(ephemeral_start / 2);
    let span = u32::from(ephemeral_start - low);
    let mut given = GIVEN
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Start at a spot that differs between test processes and runs.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id().wrapping_mul(2_654_435_761);
    for i in 0..span {
        let offset = seed.wrapping_add(i) % span;
        let port = low + u16::try_from(offset).unwrap_or_default();
        if given.contains(&port) {
            continue;
        }
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            given.insert(port);
            return listener
                .local_addr()
                .unwrap_or_else(|e| panic!("no local address: {e}"));
        }
    }
    panic!("no free loopback port in {low}..{ephemeral_start}")
}

/// A running child process listening on `addr`.
#[derive(Debug)]
pub struct ChildProcess {
    bin: Binary,
    path: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// The address it listens on.
    pub addr: SocketAddr,
    child: Option<Child>,
    dir: tempfile::TempDir,
    log: PathBuf,
}

impl ChildProcess {
    /// Starts `bin` with `args` (which must make it listen on `addr`) and
    /// waits until `addr` accepts TCP connections.
    pub async fn spawn(
        bin: Binary,
        args: Vec<String>,
        env: Vec<(String, String)>,
        addr: SocketAddr,
    ) -> Self {
        Self::spawn_in(bin, args, env, addr, temp_dir()).await
    }

    /// [`ChildProcess::spawn`] with its files (log, configs) in `dir`, which
    /// the handle keeps alive so a restart finds its config again.
    pub async fn spawn_in(
        bin: Binary,
        args: Vec<String>,
        env: Vec<(String, String)>,
        addr: SocketAddr,
        dir: tempfile::TempDir,
    ) -> Self {
        let path = binary(bin).await;
        let log = dir.path().join(format!("{}.log", bin.name()));
        let mut child = ChildProcess {
            bin,
            path,
            args,
            env,
            addr,
            child: None,
            dir,
            log,
        };
        child.start().await;
        child
    }

    async fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log.display()));
        let err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot clone the log handle: {e}"));
        let mut cmd = Command::new(&self.path);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .env("RUST_LOG", "info")
            .env("NO_PROXY", "127.0.0.1,localhost");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = self.child.insert(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.path.display())),
        );
        let addr = self.addr;
        let name = self.bin.name();
        // Ok(true): listening; Err(status): the process exited instead.
        let listening = wait_for_async(
            &format!("{name} to listen on {addr}"),
            SOON,
            || {
                let exited = child.try_wait().ok().flatten();
                async move {
                    match exited {
                        Some(status) => Err(status),
                        None => Ok(tokio::net::TcpStream::connect(addr).await.is_ok()),
                    }
                }
            },
            |state| !matches!(state, Ok(false)),
        )
        .await;
        if let Err(status) = listening {
            self.child = None;
            panic!(
                "{name} exited ({status}) instead of listening on {addr}; its log:\n{}",
                self.logs()
            );
        }
    }

    /// A file in this process's temp dir (for configs).
    pub fn temp_file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL and reap (no-op if not running).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (graceful shutdown), then wait up to `timeout` for the exit.
    pub async fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let Some(pid) = self.pid() else {
            panic!("{} is not running", self.bin.name());
        };
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap_or_else(|e| panic!("cannot run kill: {e}"));
        assert!(sent.success(), "kill -TERM {pid} failed");
        self.wait_exit(timeout).await
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let Some(child) = self.child.as_mut() else {
                panic!("{} is not running", self.bin.name());
            };
            if let Some(status) = child
                .try_wait()
                .unwrap_or_else(|e| panic!("waiting for {} failed: {e}", self.bin.name()))
            {
                self.child = None;
                return status;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "{} did not exit within {timeout:?}; log:\n{}",
                    self.bin.name(),
                    self.logs()
                );
            }
            tokio::time::sleep(crate::wait::POLL).await;
        }
    }

    /// Starts again with the same arguments on the same address (after
    /// [`ChildProcess::kill`] or an exit).
    pub async fn restart(&mut self) {
        self.kill();
        self.start().await;
    }

    /// Everything the process (and earlier runs of it) printed.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `switchyard-control-plane --config FILE --listen ADDR`.
    pub async fn control_plane(config: &TestConfig) -> Self {
        let addr = free_addr();
        let dir = temp_dir();
        let file = write_config(dir.path(), config);
        let args = vec![
            "--config".to_owned(),
            file.display().to_string(),
            "--listen".to_owned(),
            addr.to_string(),
        ];
        Self::spawn_in(Binary::ControlPlane, args, Vec::new(), addr, dir).await
    }

    /// `switchyard-sidecar --control-plane URL --listen ADDR [--config FILE]`.
    pub async fn sidecar_remote(control_plane_url: &str, config: Option<&TestConfig>) -> Self {
        let addr = free_addr();
        let dir = temp_dir();
        let mut args = vec![
            "--control-plane".to_owned(),
            control_plane_url.to_owned(),
            "--listen".to_owned(),
            addr.to_string(),
        ];
        if let Some(config) = config {
            let file = write_config(dir.path(), config);
            args.extend(["--config".to_owned(), file.display().to_string()]);
        }
        Self::spawn_in(Binary::Sidecar, args, Vec::new(), addr, dir).await
    }

    /// `switchyard-sidecar --standalone --config FILE --listen ADDR`.
    pub async fn sidecar_standalone(config: &TestConfig) -> Self {
        Self::sidecar_standalone_with(config, Vec::new(), Vec::new()).await
    }

    /// [`ChildProcess::sidecar_standalone`] plus
    /// `--control-plane-listen GRPC`; returns the gRPC URL too.
    pub async fn sidecar_standalone_serving_control_plane(config: &TestConfig) -> (Self, String) {
        let grpc = free_addr();
        let extra = vec!["--control-plane-listen".to_owned(), grpc.to_string()];
        (
            Self::sidecar_standalone_with(config, extra, Vec::new()).await,
            format!("http://{grpc}"),
        )
    }

    /// [`ChildProcess::sidecar_standalone`] plus `extra` arguments and
    /// environment variables (`RUST_LOG` here replaces the harness's `info`).
    pub async fn sidecar_standalone_with(
        config: &TestConfig,
        extra: Vec<String>,
        env: Vec<(String, String)>,
    ) -> Self {
        let addr = free_addr();
        let dir = temp_dir();
        let file = write_config(dir.path(), config);
        let mut args = vec![
            "--standalone".to_owned(),
            "--config".to_owned(),
            file.display().to_string(),
            "--listen".to_owned(),
            addr.to_string(),
        ];
        args.extend(extra);
        Self::spawn_in(Binary::Sidecar, args, env, addr, dir).await
    }

    /// `fake-model-server --mode MODE --models M,.. --listen ADDR` plus
    /// `extra` arguments (e.g. `--chunk-delay-ms 50`).
    pub async fn fake_model_server(mode: &str, models: &[&str], extra: &[&str]) -> Self {
        let addr = free_addr();
        let mut args = vec![
            "--mode".to_owned(),
            mode.to_owned(),
            "--models".to_owned(),
            models.join(","),
            "--loaded".to_owned(),
            models.join(","),
            "--listen".to_owned(),
            addr.to_string(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        Self::spawn(Binary::FakeModelServer, args, Vec::new(), addr).await
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"))
}

/// Writes `config` as `config.yaml` in `dir`.
pub fn write_config(dir: &Path, config: &TestConfig) -> PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(&path, config.yaml())
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path
}
