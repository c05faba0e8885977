//! Runs the Python client scripts in `tests/system/python/` with the
//! official `openai` / `ollama` packages.
//!
//! The interpreter is `SWITCHYARD_PYTHON`, else `<workspace>/.venv/bin/python`
//! (created by `tests/run.sh`). A missing interpreter or missing packages
//! FAIL the test with the command that fixes it; they never skip it.
//! Scripts run as async child processes so the in-process servers keep
//! serving while a script waits on them, with proxies disabled for loopback.

use std::{path::PathBuf, process::Stdio, time::Duration};

/// Longest a script may run.
pub const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

/// The interpreter to use; panics if it does not exist.
pub fn python_path() -> PathBuf {
    let path = std::env::var_os("SWITCHYARD_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join(".venv/bin/python"));
    if !path.exists() {
        panic!(
            "Python interpreter {} not found: run tests/run.sh (it creates .venv with the \
             `openai` and `ollama` packages), or set SWITCHYARD_PYTHON",
            path.display()
        );
    }
    path
}

/// The path of a script in `tests/system/python/`.
pub fn script_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(name)
}

/// What a script printed.
#[derive(Clone, Debug)]
pub struct ScriptOutput {
    /// Exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs `script` with `args` and extra environment; returns its output
/// whatever the exit code.
pub async fn run_script(script: &str, args: &[&str], env: &[(&str, &str)]) -> ScriptOutput {
    let python = python_path();
    let path = script_path(script);
    let mut cmd = tokio::process::Command::new(&python);
    cmd.arg(&path)
        .args(args)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("all_proxy")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {} {}: {e}", python.display(), path.display()));
    let out = crate::wait::within(
        &format!("python script {script}"),
        SCRIPT_TIMEOUT,
        child.wait_with_output(),
    )
    .await
    .unwrap_or_else(|e| panic!("waiting for {script} failed: {e}"));
    ScriptOutput {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `script` and panics, showing its output, unless it exits 0. A
/// `ModuleNotFoundError` is reported as a setup problem (run tests/run.sh).
pub async fn run_script_ok(script: &str, args: &[&str], env: &[(&str, &str)]) -> ScriptOutput {
    let out = run_script(script, args, env).await;
    if out.code != Some(0) {
        let hint = if out.stderr.contains("ModuleNotFoundError") {
            "\nThe venv lacks a package: run tests/run.sh (installs `openai`, `ollama` and `anthropic`)."
        } else {
            ""
        };
        panic!(
            "{script} {args:?} failed (exit {:?}){hint}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.code, out.stdout, out.stderr
        );
    }
    out
}
