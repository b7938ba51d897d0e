//! `hbt exec`: run a static x86-64 Linux program through the translator in this process
//! (identity strategy). System calls go to the host kernel, except those that would break the
//! translation, which are emulated here (`syscalls.rs`).

mod loader;
mod syscalls;

use anyhow::{bail, Context, Result};
use clap::Args;
use hbt_translator::exit::vector;
use hbt_translator::{Config, Exit, MemoryStrategy, Platform, Translator};
use std::path::PathBuf;
use std::time::Instant;

/// Run a static x86-64 Linux program through hbt's binary translator.
///
/// The program is loaded into hbt's own address space (guest addresses are host addresses) and
/// every instruction it executes is translated; system calls go to the host kernel, with
/// arch_prctl, brk, fork/clone, execve, exit and signal bookkeeping emulated. CPUID shows the
/// host's features minus what the translator does not support (AVX-512), so libc picks code
/// hbt can run.
///
/// Examples:
///   hbt exec /bin/busybox echo hello
///   hbt exec --stats /bin/busybox sha256sum /etc/os-release
#[derive(Args)]
#[command(verbatim_doc_comment, trailing_var_arg = true)]
pub struct ExecArgs {
    /// Print translation statistics to stderr when the program ends.
    #[arg(long)]
    stats: bool,
    /// argv[0] for the program (default: the program path), as execve(2) allows.
    #[arg(long, value_name = "NAME")]
    argv0: Option<String>,
    /// The program (a static x86-64 ELF).
    program: PathBuf,
    /// Its arguments.
    #[arg(allow_hyphen_values = true)]
    args: Vec<String>,
}

/// CPUID as the guest sees it: the host's, without AVX-512 (the translator has no EVEX rules).
pub struct ExecPlatform;

impl Platform for ExecPlatform {
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let r = std::arch::x86_64::__cpuid_count(leaf, subleaf);
        let mut out = [r.eax, r.ebx, r.ecx, r.edx];
        if leaf == 7 && subleaf == 0 {
            // EBX: AVX512F/DQ/IFMA/PF/ER/CD/BW/VL; ECX: VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ;
            // EDX: 4VNNIW, 4FMAPS, VP2INTERSECT, FP16.
            out[1] &= !((1 << 16) | (1 << 17) | (1 << 21) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 30) | (1 << 31));
            out[2] &= !((1 << 1) | (1 << 6) | (1 << 11) | (1 << 12) | (1 << 14));
            out[3] &= !((1 << 2) | (1 << 3) | (1 << 8) | (1 << 23));
        }
        if leaf == 7 && subleaf == 1 {
            out[0] &= !(1 << 5); // AVX512_BF16
        }
        if leaf == 0xd && subleaf == 0 {
            out[0] &= !0xe0; // opmask / ZMM state components
        }
        out
    }
    fn rdtsc(&mut self) -> u64 {
        hbt_translator::HostPlatform.rdtsc()
    }
    fn tsc_aux(&mut self) -> u32 {
        hbt_translator::HostPlatform.tsc_aux()
    }
}

pub fn run(args: ExecArgs) -> Result<()> {
    let code = execute(&args)?;
    std::process::exit(code);
}

fn execute(args: &ExecArgs) -> Result<i32> {
    let path = &args.program;
    let image = loader::load(path)?;
    let mut argv = vec![args.argv0.clone().unwrap_or_else(|| path.display().to_string())];
    argv.extend(args.args.iter().cloned());
    let env: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
    let hwcap = std::arch::x86_64::__cpuid(1).edx as u64;
    let rsp = loader::build_stack(&image, &argv, &env, hwcap, &path.display().to_string())?;

    let mut t = Translator::new(Config {
        strategy: MemoryStrategy::Identity,
        code_cache_bytes: 256 << 20,
        verified_only: true,
    })
    .context("cannot create the translator")?;
    let s = t.state_mut();
    s.rip = image.entry;
    s.gpr[4] = rsp;
    let mut sys = syscalls::Syscalls::new(image.brk, path.clone());
    let mut platform = ExecPlatform;
    let started = Instant::now();
    let status = loop {
        let exit = t
            .run(&mut platform, u64::MAX)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        match exit {
            Exit::Syscall => {
                if let Some(status) = sys.handle(&mut t)? {
                    break status;
                }
            }
            Exit::Exception(e) => {
                let rip = t.state().rip;
                let (signal, name) = match e.vector {
                    vector::DE => (libc::SIGFPE, "SIGFPE"),
                    vector::UD => (libc::SIGILL, "SIGILL"),
                    vector::BP | vector::DB => (libc::SIGTRAP, "SIGTRAP"),
                    vector::AC => (libc::SIGBUS, "SIGBUS"),
                    _ => (libc::SIGSEGV, "SIGSEGV"),
                };
                eprintln!("hbt: {}: {name} ({e}) at guest RIP {rip:#x}", path.display());
                break 128 + signal;
            }
            other => bail!("{}: unexpected translator exit {other:?}", path.display()),
        }
    };
    if args.stats {
        let st = t.stats();
        eprintln!(
            "hbt exec stats: {:.3} s, {} blocks ({} guest instructions) translated, {} KiB code cache, \
             {} dispatcher exits, {} chained links, {} indirect misses, {} emulated instructions, {} system calls",
            started.elapsed().as_secs_f64(),
            st.blocks_translated,
            st.guest_instructions_translated,
            t.code_cache_used() / 1024,
            st.block_exits,
            st.chained,
            st.indirect_misses,
            st.emulated,
            sys.count
        );
    }
    Ok(status)
}
