use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    eventsieve::cli::main(eventsieve::cli::Cli::parse())
}
