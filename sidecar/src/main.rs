//! `switchyard-sidecar` binary: all logic lives in [`switchyard_sidecar::cli`].

use std::process::ExitCode;

fn main() -> ExitCode {
    switchyard_sidecar::cli::run_cli(
        std::env::args_os(),
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    )
}
