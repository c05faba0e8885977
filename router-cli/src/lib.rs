//! `switchyard`: inspect and operate a Switchyard cluster over the control
//! plane's gRPC API (`switchyard.v1`, services `Cluster` and `Routing`).
//!
//! - [`cli`]: the command line (clap derive), fixed by DESIGN.md.
//! - [`client`]: the gRPC connection, its timeouts and the calls made.
//! - [`view`]: proto answers converted once into the structs printed, whose
//!   field names are the `--output json` schema.
//! - [`render`]: tables and JSON.
//! - [`commands`]: one function per subcommand.
//! - [`error`]: run-time failures, each one clear line; exit code 1.
//!
//! The CLI holds no state and never changes any except through `drain` /
//! `undrain`; `choose` is a dry run (no lease, no affinity entry).

pub mod cli;
pub mod client;
pub mod commands;
pub mod error;
pub mod render;
pub mod view;

use std::{
    io::{self, IsTerminal, Write},
    process::ExitCode,
};

pub use cli::Cli;
pub use error::CliError;

/// Runs a parsed command line to completion and returns the process exit
/// code: 0 ok, 1 run-time failure (message on stderr). Usage errors (2) are
/// clap's, before this is called.
pub fn execute(cli: &Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stdout = io::stdout();
    let terminal = stdout.is_terminal();
    let mut out = stdout.lock();
    let result = runtime.block_on(commands::run(cli, &mut out, terminal, shutdown_signal()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `switchyard watch | head`: the reader left; nothing to report.
        Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
        Err(e) => {
            // Whatever was printed goes out before the error line.
            let _ = out.flush();
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM. If a handler cannot be
/// installed, that signal keeps its default action (terminate).
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
