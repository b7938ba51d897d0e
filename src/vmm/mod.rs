//! `hbt run`: the VMM. Guest RAM ([`memory`]), KVM state ([`vstate`]), image loaders
//! ([`loader`]), long-mode entry ([`boot`]), the port-I/O device table ([`devices`]) and the run
//! loop below, which ends on the guest's exit port, a reset, a triple fault, `--timeout`,
//! Ctrl-C or a KVM error, and says which.

pub mod boot;
pub mod devices;
pub mod loader;
pub mod memory;
mod terminal;
pub mod vstate;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use devices::{Action, Buses};
use kvm_ioctls::VcpuExit;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Run a guest image on KVM.
///
/// The image is recognized by its contents: a bare-metal x86-64 ELF (entered in 64-bit long
/// mode with identity paging), a Linux bzImage (boot protocol 2.12+, 64-bit entry; --initrd,
/// --append), or a flat binary (--load-addr, --entry). The guest's COM1 serial port is wired to
/// stdin/stdout; a write to port 0xf4 ends the run with that value as hbt's exit status.
///
/// Examples:
///   hbt run test-images/hello.img
///   hbt run --stats --timeout 10 test-images/timer.img
///   hbt run --load-addr 0x100000 code.bin
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct RunArgs {
    /// The guest image.
    image: PathBuf,
    /// Guest RAM, in MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    mem: u64,
    /// Execution engine. Only `kvm` exists today; `bt` (translator only) and `hybrid` (guest
    /// user mode on KVM, kernel mode translated) are reserved.
    #[arg(long, value_enum, default_value_t = Accel::Kvm)]
    accel: Accel,
    /// Flat binary: guest-physical load address.
    #[arg(long, value_parser = parse_u64, value_name = "ADDR")]
    load_addr: Option<u64>,
    /// Flat binary: entry point (default: the load address).
    #[arg(long, value_parser = parse_u64, value_name = "ADDR")]
    entry: Option<u64>,
    /// Linux: initial ramdisk.
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Linux: kernel command line.
    #[arg(long, default_value = "console=ttyS0", value_name = "CMDLINE")]
    append: String,
    /// End the run after this many seconds (exit status 124).
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
    /// Print exits by reason and port, time in KVM_RUN vs in hbt, and boot-progress marks.
    #[arg(long)]
    stats: bool,
    /// Like --stats, as one JSON object on stderr (for scripts).
    #[arg(long)]
    stats_json: bool,
    /// Benchmark floor: run the guest with a bare KVM_RUN loop that only counts exits (no
    /// devices, no output) until it writes the debug-exit port; print the loop's time per exit.
    #[arg(long, hide = true)]
    raw_exit_loop: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Accel {
    Kvm,
    Bt,
    Hybrid,
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("`{s}` is not a number: {e}"))
}

/// The most guest RAM `--mem` may ask for (1 TiB: guest-physical addresses stay far below the
/// 52-bit limit even above the MMIO hole).
const MAX_RAM: u64 = 1 << 40;

/// Why a run ended.
#[derive(Debug)]
enum End {
    ExitPort(u32),
    Reset,
    Halted,
    Timeout,
    /// SIGINT (Ctrl-C), SIGTERM or SIGHUP: the signal number.
    Interrupted(i32),
    /// stdout was closed (EPIPE on the console).
    OutputClosed,
}

/// Bit 0: `--timeout`; bits 8..: the terminating signal that arrived (SIGINT/SIGTERM/SIGHUP).
static STOP: AtomicU64 = AtomicU64::new(0);
const STOP_TIMEOUT: u64 = 1;
static VCPU_THREAD: AtomicU64 = AtomicU64::new(0);
static KICK_INSTALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_kick(_: libc::c_int) {}
/// SIGINT/SIGTERM/SIGHUP: end the run cleanly (terminal restored, status 128 + signal).
extern "C" fn on_terminate(sig: libc::c_int) {
    // The first terminating signal wins.
    let _ = STOP.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
        (v >> 8 == 0).then_some(v | (sig as u64) << 8)
    });
    kick_vcpu();
}

/// Makes the vCPU thread's KVM_RUN return (EINTR) by signalling it.
fn kick_vcpu() {
    let t = VCPU_THREAD.load(Ordering::SeqCst);
    if t != 0 {
        // SAFETY: pthread_kill on the vCPU thread, which lives for the whole run.
        unsafe { libc::pthread_kill(t as libc::pthread_t, libc::SIGUSR1) };
    }
}

fn install_signal_handlers() {
    if KICK_INSTALLED.swap(true, Ordering::SeqCst) {
        return;
    }
    // SAFETY: plain handlers without SA_RESTART, so KVM_RUN returns EINTR; they only touch atomics.
    unsafe {
        for (sig, handler) in [
            (libc::SIGUSR1, on_kick as *const () as usize),
            (libc::SIGINT, on_terminate as *const () as usize),
            (libc::SIGTERM, on_terminate as *const () as usize),
            (libc::SIGHUP, on_terminate as *const () as usize),
        ] {
            let mut a: libc::sigaction = std::mem::zeroed();
            a.sa_sigaction = handler;
            libc::sigemptyset(&mut a.sa_mask);
            libc::sigaction(sig, &a, std::ptr::null_mut());
        }
    }
}

pub fn run(args: RunArgs) -> Result<()> {
    let code = execute(&args)?;
    std::process::exit(code);
}

/// Exit reasons counted by the run loop (index into `RunStats::exits`).
const EXIT_REASONS: [&str; 5] = ["io-out", "io-in", "mmio-read", "mmio-write", "signal"];
const IO_OUT: usize = 0;
const IO_IN: usize = 1;
const MMIO_READ: usize = 2;
const MMIO_WRITE: usize = 3;
const SIGNAL: usize = 4;

#[derive(Default)]
struct RunStats {
    exits: [u64; EXIT_REASONS.len()],
    in_kvm: Duration,
}

impl RunStats {
    /// (reason, count) of the reasons that occurred.
    fn exits_by_reason(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        EXIT_REASONS
            .iter()
            .zip(self.exits)
            .filter(|e| e.1 > 0)
            .map(|(r, n)| (*r, n))
    }
}

fn execute(args: &RunArgs) -> Result<i32> {
    match args.accel {
        Accel::Kvm => {}
        Accel::Bt | Accel::Hybrid => bail!(
            "--accel {} is not available yet: the translator's system mode comes next; use --accel kvm",
            if args.accel == Accel::Bt { "bt" } else { "hybrid" }
        ),
    }
    if !args.image.exists() {
        bail!(
            "guest image {} does not exist (try test-images/hello.img)",
            args.image.display()
        );
    }
    let started = Instant::now();
    let bytes = args
        .mem
        .checked_mul(1 << 20)
        .filter(|&b| b <= MAX_RAM)
        .with_context(|| {
            format!(
                "--mem {} MiB is more than hbt supports ({} MiB)",
                args.mem,
                MAX_RAM >> 20
            )
        })?;
    let mut mem = memory::GuestMemory::new(bytes)?;
    let entry = loader::load(
        &args.image,
        &mut mem,
        &loader::LoadOptions {
            load_addr: args.load_addr,
            entry: args.entry,
            initrd: args.initrd.as_deref(),
            cmdline: &args.append,
        },
    )
    .with_context(|| format!("guest image {}", args.image.display()))?;
    boot::write_tables(&mut mem)?;
    let vm = vstate::vm::Vm::new(&mem)?;
    let mut vcpu = vm.create_vcpu()?;
    let sregs = vcpu.get_sregs().context("KVM_GET_SREGS failed")?;
    vcpu.set_sregs(&boot::long_mode_sregs(sregs))
        .context("KVM_SET_SREGS failed")?;
    vcpu.set_regs(&boot::entry_regs(entry.rip, entry.rsp, entry.rsi))
        .context("KVM_SET_REGS failed")?;

    let interactive = std::io::stdin().is_terminal();
    let _terminal = terminal::RawGuard::new(interactive);
    let (mut bus, marks) = Buses::standard(started, interactive, vm.irq_line(devices::serial::COM1_IRQ));
    // SAFETY: pthread_self has no preconditions.
    VCPU_THREAD.store(unsafe { libc::pthread_self() } as u64, Ordering::SeqCst);
    STOP.store(0, Ordering::SeqCst);
    install_signal_handlers();
    // The watchdog ends the run at --timeout, and after a terminating signal keeps kicking the
    // vCPU until the loop notices: a kick that lands just before KVM_RUN is lost, and a guest
    // that never exits (vmcall at CPL0, a spin) would otherwise run on.
    let deadline = args
        .timeout
        .map(|secs| Instant::now() + Duration::from_secs_f64(secs.max(0.0)));
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(20));
        if deadline.is_some_and(|d| Instant::now() >= d) {
            STOP.fetch_or(STOP_TIMEOUT, Ordering::SeqCst);
        }
        if STOP.load(Ordering::SeqCst) != 0 {
            kick_vcpu();
        }
    });

    if args.raw_exit_loop {
        return raw_exit_loop(&mut vcpu);
    }
    let mut st = RunStats::default();
    let loop_started = Instant::now();
    let end = loop {
        let stop = STOP.load(Ordering::SeqCst);
        if stop >> 8 != 0 {
            break End::Interrupted((stop >> 8) as i32 & 0xff);
        }
        if stop & STOP_TIMEOUT != 0 {
            break End::Timeout;
        }
        let t0 = Instant::now();
        let exit = vcpu.run();
        st.in_kvm += t0.elapsed();
        let (reason, action) = match exit {
            Ok(VcpuExit::IoOut(port, data)) => (IO_OUT, bus.pio.write(port as u64, data)),
            Ok(VcpuExit::IoIn(port, data)) => {
                bus.pio.read(port as u64, data);
                (IO_IN, Action::Continue)
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                bus.mmio.read(addr, data);
                (MMIO_READ, Action::Continue)
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => (MMIO_WRITE, bus.mmio.write(addr, data)),
            Ok(VcpuExit::Hlt) => break End::Halted,
            Ok(VcpuExit::Shutdown) => {
                bail!(
                    "guest triple fault (shutdown) after {:.3} s: {}",
                    started.elapsed().as_secs_f64(),
                    vstate::vcpu::describe(&vcpu, &mem)
                )
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                bail!("guest system event {kind}: {}", vstate::vcpu::describe(&vcpu, &mem))
            }
            Ok(VcpuExit::InternalError) => {
                bail!(
                    "KVM internal error (the in-kernel emulator could not run the guest): {}",
                    vstate::vcpu::describe(&vcpu, &mem)
                )
            }
            Ok(VcpuExit::FailEntry(reason, _)) => {
                bail!(
                    "KVM could not enter the guest (hardware entry failure {reason:#x}): {}",
                    vstate::vcpu::describe(&vcpu, &mem)
                )
            }
            Ok(VcpuExit::Intr) => (SIGNAL, Action::Continue),
            Ok(other) => {
                let what = format!("{other:?}");
                bail!("unexpected KVM exit {what}: {}", vstate::vcpu::describe(&vcpu, &mem))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => (SIGNAL, Action::Continue),
            Err(e) => bail!("KVM_RUN failed: {e}: {}", vstate::vcpu::describe(&vcpu, &mem)),
        };
        match action {
            Action::Continue => {}
            Action::Exit(v) => break End::ExitPort(v),
            Action::Reset => break End::Reset,
            Action::OutputClosed => break End::OutputClosed,
        }
        st.exits[reason] += 1;
    };
    let total = started.elapsed();
    let in_loop = loop_started.elapsed();
    // The guest's last output comes before hbt says how the run ended.
    bus.pio.flush();
    drop(_terminal);
    let status = match &end {
        End::ExitPort(v) => *v as i32,
        End::Reset => 0,
        End::Halted => {
            eprintln!(
                "hbt: guest halted with interrupts off: {}",
                vstate::vcpu::describe(&vcpu, &mem)
            );
            1
        }
        End::Timeout => {
            eprintln!(
                "hbt: --timeout reached after {:.3} s; guest at {}",
                total.as_secs_f64(),
                vstate::vcpu::describe(&vcpu, &mem)
            );
            124
        }
        End::OutputClosed => {
            eprintln!("hbt: stdout was closed; run ended as a program would by SIGPIPE");
            128 + libc::SIGPIPE
        }
        End::Interrupted(sig) => {
            let why = if *sig == libc::SIGINT {
                "Ctrl-C"
            } else {
                "SIGTERM/SIGHUP"
            };
            eprintln!(
                "hbt: interrupted ({why}); guest at {}",
                vstate::vcpu::describe(&vcpu, &mem)
            );
            128 + *sig
        }
    };
    let total_exits: u64 = st.exits.iter().sum();
    if args.stats_json {
        let devices = |b: &devices::Bus| {
            b.exit_counts()
                .into_iter()
                .map(|(name, base, n)| serde_json::json!({"device": name, "base": base, "exits": n}))
                .collect::<Vec<_>>()
        };
        let v = serde_json::json!({
            "image": args.image.display().to_string(),
            "kind": entry.kind,
            "ended_by": format!("{end:?}"),
            "status": status,
            "seconds_total": total.as_secs_f64(),
            "seconds_in_kvm_run": st.in_kvm.as_secs_f64(),
            "seconds_in_hbt": total.saturating_sub(st.in_kvm).as_secs_f64(),
            "seconds_run_loop": in_loop.as_secs_f64(),
            "exits": total_exits,
            "exits_by_reason": st.exits_by_reason().collect::<std::collections::BTreeMap<_, _>>(),
            "port_exits": devices(&bus.pio),
            "unclaimed_port_accesses": bus.pio.unclaimed,
            "mmio_exits": devices(&bus.mmio),
            "unclaimed_mmio_accesses": bus.mmio.unclaimed,
            "boot_progress": marks.0.borrow().iter().map(|(t, v)| serde_json::json!({"seconds": t, "value": v})).collect::<Vec<_>>(),
        });
        eprintln!("{v}");
    }
    if args.stats {
        eprintln!(
            "hbt run stats: {} ({}), ended by {end:?}",
            args.image.display(),
            entry.kind
        );
        eprintln!(
            "  time: {:.6} s total, {:.6} s in KVM_RUN, {:.6} s in hbt; run loop {:.6} s, {:.3} µs per exit",
            total.as_secs_f64(),
            st.in_kvm.as_secs_f64(),
            total.saturating_sub(st.in_kvm).as_secs_f64(),
            in_loop.as_secs_f64(),
            in_loop.as_secs_f64() * 1e6 / total_exits.max(1) as f64
        );
        eprintln!(
            "  exits: {total_exits} ({})",
            fmt_counts(st.exits_by_reason().map(|(k, v)| (k.to_string(), v)))
        );
        for (space, b) in [("port", &bus.pio), ("mmio", &bus.mmio)] {
            let per_device = b
                .exit_counts()
                .into_iter()
                .filter(|c| c.2 > 0)
                .map(|(name, base, n)| (format!("{name}@{base:#x}"), n));
            eprintln!(
                "  {space} exits: {} (unclaimed {space} accesses: {})",
                fmt_counts(per_device),
                b.unclaimed
            );
        }
        for (t, v) in marks.0.borrow().iter() {
            eprintln!("  boot progress {v:#04x} at {t:.6} s");
        }
    }
    Ok(status)
}

/// The floor `--raw-exit-loop` measures: KVM_RUN and back with nothing in between but a match.
fn raw_exit_loop(vcpu: &mut kvm_ioctls::VcpuFd) -> Result<i32> {
    let started = Instant::now();
    let mut exits = 0u64;
    loop {
        exits += 1;
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, _)) if port as u64 == devices::debug_exit::PORT => break,
            Ok(VcpuExit::IoOut(..)) => {}
            Ok(VcpuExit::IoIn(_, data)) => data.fill(0),
            Ok(other) => {
                let what = format!("{other:?}");
                bail!("raw exit loop: unexpected exit {what}")
            }
            Err(e) => bail!("raw exit loop: KVM_RUN failed: {e}"),
        }
    }
    let t = started.elapsed().as_secs_f64();
    eprintln!(
        "raw exit loop: {exits} exits in {t:.6} s, {:.3} µs per exit",
        t * 1e6 / exits as f64
    );
    Ok(0)
}

fn fmt_counts(it: impl Iterator<Item = (String, u64)>) -> String {
    let v: Vec<String> = it.map(|(k, n)| format!("{k} {n}")).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}
