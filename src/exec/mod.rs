//! `hbt exec`: run an x86-64 Linux program (static or dynamic) through the translator in this process
//! (identity strategy). System calls go to the host kernel, except those that would break the
//! translation, which are emulated here (`syscalls.rs`).

mod census;
mod elf;
mod loader;
mod signals;
mod syscalls;
mod threads;

use anyhow::{bail, Context, Result};
use clap::Args;
use hbt_coverage::cpu_model::{self, CpuModel};
use hbt_translator::cpu::xsave::XsaveLayout;
use hbt_translator::{Config, Exit, MemoryStrategy, Platform, Translator};
use std::path::PathBuf;
use std::time::Instant;

/// Run an x86-64 Linux program (static, static-PIE or dynamically linked, or a #! script)
/// through hbt's binary translator.
///
/// The program is loaded into hbt's own address space (guest addresses are host addresses) and
/// every instruction it executes is translated; system calls go to the host kernel, with
/// arch_prctl, brk, fork/clone, execve, exit and signals emulated (guest handlers run
/// translated). CPUID shows the `--cpu-model`'s features minus every feature with an instruction
/// form the translator has not verified (on AVX-512 hosts: AVX-512), so libc's runtime dispatch
/// picks code hbt can run. XSAVE state follows: the guest's XCR0 (what `xgetbv` returns, what
/// its `xsave` writes and CPUID leaf 0DH sizes) holds exactly the components of the features
/// it is shown; AMX and any other XFD-armed state are never offered.
///
/// Examples:
///   hbt exec /bin/busybox echo hello
///   hbt exec --stats /bin/busybox sha256sum /etc/os-release
///   hbt exec --cpu-model x86-64-v2 /bin/busybox gzip -c big.txt
///   hbt exec --census sh.census /bin/sh -c 'ls | wc -l'; hbt coverage --compare sh.census
#[derive(Args)]
#[command(verbatim_doc_comment, trailing_var_arg = true)]
pub struct ExecArgs {
    /// Print translation statistics to stderr when the program ends.
    #[arg(long)]
    stats: bool,
    /// Like --stats, as one JSON object on stderr (for scripts).
    #[arg(long)]
    stats_json: bool,
    /// CPU the guest sees through CPUID: x86-64-v1, x86-64-v2, x86-64-v3 or host (always
    /// limited to what the translator verifies; x86-64-v4 needs AVX-512, which it does not).
    #[arg(long, value_name = "MODEL", default_value = "host")]
    cpu_model: CpuModel,
    /// Write the instruction forms translated during the run to FILE (added to it when it is
    /// already a census: the processes a program starts add theirs). Read it with
    /// `hbt coverage --compare FILE` or `--supported FILE`.
    #[arg(long, value_name = "FILE")]
    census: Option<PathBuf>,
    /// argv[0] for the program (default: the program path), as execve(2) allows.
    #[arg(long, value_name = "NAME")]
    argv0: Option<String>,
    /// The program: an x86-64 ELF (static or dynamic) or a #! script.
    program: PathBuf,
    /// Its arguments.
    #[arg(allow_hyphen_values = true)]
    args: Vec<String>,
}

/// CPUID as the guest sees it: the host's, with the features outside the model cleared and the
/// XSAVE leaf describing exactly the guest's XCR0.
pub struct ExecPlatform {
    /// Kept features, indexed by `iced_x86::CpuidFeature as usize`.
    keep: Vec<bool>,
    /// The guest's XCR0: the managed XSAVE components of the kept features.
    xcr0: u64,
}

impl ExecPlatform {
    pub fn new(model: CpuModel) -> Self {
        let keep = cpu_model::translatable_features(model, hbt_translator::supported::is_supported);
        let xcr0 = XsaveLayout::host().xcr0_for(|f| keep[f as usize]);
        ExecPlatform { keep, xcr0 }
    }

    /// The XCR0 the guest runs with (`xgetbv`, its signal frames, its `xsave`s).
    pub fn xcr0(&self) -> u64 {
        self.xcr0
    }

    /// Whether the guest sees `feature`.
    pub fn shows(&self, feature: iced_x86::CpuidFeature) -> bool {
        self.keep[feature as usize]
    }

    /// Host features the guest does not see.
    pub fn hidden(&self) -> Vec<String> {
        let host = CpuModel::Host.features().expect("host features");
        iced_x86::CpuidFeature::values()
            .filter(|&f| host[f as usize] && !self.keep[f as usize])
            .map(|f| format!("{f:?}"))
            .collect()
    }
}

impl Platform for ExecPlatform {
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let r = std::arch::x86_64::__cpuid_count(leaf, subleaf);
        let mut out = [r.eax, r.ebx, r.ecx, r.edx];
        cpu_model::mask_cpuid(&self.keep, leaf, subleaf, &mut out);
        XsaveLayout::host().guest_cpuid(self.xcr0, leaf, subleaf, &mut out);
        out
    }
    fn rdtsc(&mut self) -> u64 {
        hbt_translator::HostPlatform.rdtsc()
    }
    fn tsc_aux(&mut self) -> u32 {
        hbt_translator::HostPlatform.tsc_aux()
    }
}

/// Runs one guest thread until it (or the whole program) ends: system calls, guest exceptions
/// and signals between translator runs. `seen` is the thread's invalidation epoch (threads.rs).
fn drive(
    t: &mut Translator,
    sys: &mut syscalls::Syscalls,
    platform: &mut ExecPlatform,
    path: &std::path::Path,
    seen: &mut u64,
) -> Result<syscalls::End> {
    loop {
        if threads::threaded() {
            threads::catch_up(t, seen);
        }
        let exit = t
            .run(platform, u64::MAX)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        match exit {
            Exit::Syscall => {
                if let Some(end) = sys.handle(t)? {
                    return Ok(end);
                }
            }
            // `int $0x80`: the 32-bit system call (Linux's IDT lets user mode raise it).
            Exit::Exception(e) if e.vector == 0x80 => {
                if let Some(end) = sys.int80(t)? {
                    return Ok(end);
                }
            }
            Exit::Exception(e) => {
                if let Err(fatal) = sys.signals.exception(t, &e) {
                    signals::die(path, &fatal);
                }
            }
            Exit::Interrupted => {}
            other => bail!("{}: unexpected translator exit {other:?}", path.display()),
        }
        if let Err(fatal) = sys.signals.deliver_pending(t) {
            signals::die(path, &fatal);
        }
    }
}

pub fn run(args: ExecArgs) -> Result<()> {
    let code = execute(&args)?;
    std::process::exit(code);
}

fn execute(args: &ExecArgs) -> Result<i32> {
    let mut argv = vec![args.argv0.clone().unwrap_or_else(|| args.program.display().to_string())];
    argv.extend(args.args.iter().cloned());
    // The checks execve(2) makes, in its order: an executable regular file (a FIFO or a
    // directory is EACCES, never a hang), then the binary format.
    let program = elf::open_executable(&args.program)
        .map_err(|r| anyhow::anyhow!("{}: cannot execute: {r}", args.program.display()))?;
    let is_script = elf::head(&program).is_ok_and(|h| h.starts_with(b"#!"));
    drop(program);
    let script_path;
    let path = if is_script {
        let (interp, new_argv) = loader::resolve_exec(&args.program.display().to_string(), argv).map_err(|e| {
            anyhow::anyhow!(
                "{}: cannot run this script: {}",
                args.program.display(),
                std::io::Error::from_raw_os_error(e)
            )
        })?;
        argv = new_argv;
        script_path = PathBuf::from(interp);
        &script_path
    } else {
        &args.program
    };
    let image = match loader::load(path) {
        Ok(image) => image,
        Err(loader::LoadError::Refused(r)) => bail!("{}: cannot execute: {r}", path.display()),
        Err(loader::LoadError::Killed { signal, why }) => signals::die(
            path,
            &signals::Fatal {
                signal,
                why: format!("the kernel would kill the program at exec: {why}"),
            },
        ),
    };
    let env: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
    let hwcap = std::arch::x86_64::__cpuid(1).edx as u64;
    let rsp = loader::build_stack(&image, &argv, &env, hwcap, &path.display().to_string())?;

    let mut t = Translator::new(Config {
        strategy: MemoryStrategy::Identity,
        code_cache_bytes: 256 << 20,
        verified_only: true,
        system: false,
    })
    .context("cannot create the translator")?;
    if let Some(file) = &args.census {
        let what = format!("hbt exec {}", argv.join(" "));
        census::start(file, what).with_context(|| format!("--census {}", file.display()))?;
    }
    if let Some(counts) = census::counts() {
        t.record_census(counts);
    }
    let mut platform = ExecPlatform::new(args.cpu_model);
    if args.cpu_model == CpuModel::V4 {
        // Programs built for x86-64-v4 use AVX-512 without asking CPUID: every level feature
        // must be shown, or the model cannot be honoured here.
        use iced_x86::CpuidFeature as F;
        let v4 = [F::AVX512F, F::AVX512BW, F::AVX512CD, F::AVX512DQ, F::AVX512VL];
        let missing: Vec<String> = v4
            .iter()
            .filter(|&&f| !platform.shows(f))
            .map(|f| format!("{f:?}"))
            .collect();
        if !missing.is_empty() {
            bail!(
                "--cpu-model x86-64-v4 needs {} on this host (with every form verified by `hbt isa-test`); use --cpu-model host or x86-64-v3",
                missing.join(", ")
            );
        }
    }
    let s = t.state_mut();
    s.rip = image.entry;
    s.gpr[4] = rsp;
    s.xcr0 = platform.xcr0();
    s.rflags = 0x202; // what a process starts with: IF set
    let mut sys = syscalls::Syscalls::new(image.brk, path.clone(), args.cpu_model);
    let started = Instant::now();
    let status = match drive(&mut t, &mut sys, &mut platform, path, &mut 0)? {
        syscalls::End::Process(status) => status,
        syscalls::End::Thread => unreachable!("the first thread's exit ends the process"),
    };
    census::flush();
    if args.stats || args.stats_json {
        let st = t.stats();
        let hidden = platform.hidden();
        let seconds = started.elapsed().as_secs_f64();
        if args.stats_json {
            let v = serde_json::json!({
                "pid": std::process::id(),
                "program": path.display().to_string(),
                "seconds": seconds,
                "seconds_translating": st.translate_time.as_secs_f64(),
                "blocks_translated": st.blocks_translated,
                "guest_instructions_translated": st.guest_instructions_translated,
                "code_cache_bytes": t.code_cache_used(),
                "dispatcher_exits": st.block_exits,
                "chained_links": st.chained,
                "indirect_misses": st.indirect_misses,
                "emulated_instructions": st.emulated,
                "system_calls": sys.count,
                "cpu_model": args.cpu_model.to_string(),
                "guest_xcr0": format!("{:#x}", platform.xcr0()),
                "hidden_host_features": hidden,
            });
            diag!("{v}");
        } else {
            diag!(
                "hbt exec stats (pid {}): {seconds:.3} s ({:.3} s translating, the rest running translated code \
                 and system calls), {} blocks ({} guest instructions) translated, {} KiB code cache, \
                 {} dispatcher exits, {} chained links, {} indirect misses, {} emulated instructions, {} system calls",
                std::process::id(),
                st.translate_time.as_secs_f64(),
                st.blocks_translated,
                st.guest_instructions_translated,
                t.code_cache_used() / 1024,
                st.block_exits,
                st.chained,
                st.indirect_misses,
                st.emulated,
                sys.count
            );
            diag!(
                "hbt exec guest CPU: {} (XCR0 {:#x}) minus {} host features: {}",
                args.cpu_model,
                platform.xcr0(),
                hidden.len(),
                if hidden.is_empty() {
                    "none".to_string()
                } else {
                    hidden.join(" ")
                }
            );
        }
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuid_follows_the_cpu_model_and_the_supported_set() {
        let host = |leaf, sub| {
            let r = std::arch::x86_64::__cpuid_count(leaf, sub);
            [r.eax, r.ebx, r.ecx, r.edx]
        };
        let mut v1 = ExecPlatform::new(CpuModel::V1);
        // x86-64-v1: no SSE3 (leaf 1 ECX bit 0), SSE4.2 (bit 20), AVX (bit 28), AVX2 (leaf 7 EBX 5).
        assert_eq!(v1.cpuid(1, 0)[2] & ((1 << 0) | (1 << 20) | (1 << 28)), 0);
        assert_eq!(v1.cpuid(7, 0)[1] & (1 << 5), 0);
        // SSE2 (leaf 1 EDX bit 26) is architectural and stays when the host has it.
        assert_eq!(v1.cpuid(1, 0)[3] & (1 << 26), host(1, 0)[3] & (1 << 26));
        // The default model shows AVX-512 exactly where the host has it (every AVX512F form is
        // verified, `supported.txt`), and keeps AVX2 when the host has it.
        let mut dflt = ExecPlatform::new(CpuModel::Host);
        let host_avx512f = hbt_translator::host::features::host_has(iced_x86::CpuidFeature::AVX512F);
        assert_eq!(dflt.cpuid(7, 0)[1] & (1 << 16) != 0, host_avx512f, "AVX512F");
        assert_eq!(dflt.cpuid(7, 0)[1] & (1 << 5), host(7, 0)[1] & (1 << 5), "AVX2 hidden");
        // Leaves without feature bits pass through (vendor string).
        assert_eq!(dflt.cpuid(0, 0), host(0, 0));
    }

    #[test]
    fn the_guest_never_sees_a_feature_the_host_lacks_nor_amx() {
        let host = CpuModel::Host.features().expect("host features");
        for model in [CpuModel::V1, CpuModel::V2, CpuModel::V3, CpuModel::Host] {
            let p = ExecPlatform::new(model);
            for f in iced_x86::CpuidFeature::values().filter(|&f| p.keep[f as usize]) {
                assert!(host[f as usize], "{model}: {f:?} shown but the host lacks it");
            }
            // (That no unverified form stays reachable through a shown non-baseline feature is
            // `cpu_model::translatable_features`' own test.)
            // The guest's XCR0 follows the features: AVX-512 state only with AVX512F shown.
            let avx512 = p.keep[iced_x86::CpuidFeature::AVX512F as usize];
            assert_eq!(p.xcr0() & 0xe0 != 0, avx512, "{model}: XCR0 {:#x}", p.xcr0());
            assert_eq!(p.xcr0() & (1 << 17 | 1 << 18), 0, "AMX is never offered");
        }
    }
}
