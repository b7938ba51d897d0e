//! `hbt`: the command-line edge. Each subcommand lives in `cli/` and composes the library
//! crates; errors become one `error:` line on stderr and exit status 1 (2 for usage errors).

mod cli;
mod exec;
mod vmm;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args) {
        // A closed pipe on stdout (`hbt … | head`) is how the reader says it has enough.
        let broken_pipe = e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        });
        if broken_pipe {
            std::process::exit(0);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
