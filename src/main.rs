//! `hbt`: the command-line edge. Each subcommand lives in `cli/` and composes the library
//! crates; errors become one `error:` line on stderr and exit status 1 (2 for usage errors).

/// A line on stderr that never panics: `hbt run img 2>&1 | head` closes stderr too, and a
/// diagnostic that cannot be written is dropped rather than turned into a crash.
macro_rules! diag {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

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
        diag!("error: {e:#}");
        std::process::exit(1);
    }
}
