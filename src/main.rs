//! `hbt`: the command-line edge. Each subcommand lives in `cli/` and composes the library
//! crates; errors become one `error:` line on stderr and exit status 1 (2 for usage errors).

mod cli;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
