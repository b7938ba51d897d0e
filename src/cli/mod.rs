//! Command-line interface (clap). One file per subcommand.

mod coverage;
mod isa_test;
mod progress;

use clap::{Parser, Subcommand};

/// hbt — a hybrid binary-translation CPU virtualizer for x86-64.
///
/// `hbt coverage` measures which x86-64 instructions a Linux distribution uses, weighted by
/// package popularity, and how much of it the translator's supported set covers.
/// `hbt isa-test` proves each supported instruction form against the host CPU.
/// `hbt exec` runs a Linux program (static or dynamic) through the translator; `hbt run` runs a
/// guest image on KVM.
#[derive(Parser)]
#[command(name = "hbt", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Coverage(Box<coverage::CoverageArgs>),
    IsaTest(isa_test::IsaTestArgs),
    Exec(crate::exec::ExecArgs),
    Run(crate::vmm::RunArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Coverage(args) => coverage::run(*args),
        Command::IsaTest(args) => isa_test::run(args),
        Command::Exec(args) => crate::exec::run(args),
        Command::Run(args) => crate::vmm::run(args),
    }
}
