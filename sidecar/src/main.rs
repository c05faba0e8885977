//! `switchyard-sidecar` binary: all logic lives in [`switchyard_sidecar::cli`].

use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: a request allocates and frees
/// dozens of small buffers (headers, JSON, the proxy's boxed state), and
/// glibc's malloc and free were 7-10 % of the sidecar's CPU per request
/// (`perf`, BENCHMARKS.md "mimalloc"). Built without transparent huge pages
/// (`no_thp`), which otherwise raised idle RSS from 12 to 20 MB here.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    switchyard_sidecar::cli::run_cli(
        std::env::args_os(),
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    )
}
