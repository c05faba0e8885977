//! `switchyard-control-plane` binary: all logic lives in
//! [`switchyard_control_plane::cli`].

use std::process::ExitCode;

fn main() -> ExitCode {
    switchyard_control_plane::cli::run_cli(
        std::env::args_os(),
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    )
    .into()
}
