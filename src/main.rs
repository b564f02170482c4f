//! The `portcullis` binary: parse the command line and hand over to `cli::run`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = portcullis::cli::Cli::parse();
    match portcullis::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("portcullis: error: {err:#}");
            ExitCode::from(2)
        }
    }
}
