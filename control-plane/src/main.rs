//! `switchyard-control-plane` binary: all logic lives in
//! [`switchyard_control_plane::cli`].

use std::process::ExitCode;

/// mimalloc instead of glibc's malloc, as in the sidecar: each `Route`
/// message decodes into fresh strings and frames (BENCHMARKS.md
/// "mimalloc"). Without transparent huge pages (`no_thp`), which would
/// raise idle RSS.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    switchyard_control_plane::cli::run_cli(
        std::env::args_os(),
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    )
    .into()
}
