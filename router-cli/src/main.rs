//! `switchyard` binary: parse the command line (clap exits 2 on bad usage),
//! run it, exit with its code. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;
use switchyard_cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    switchyard_cli::execute(&cli)
}
