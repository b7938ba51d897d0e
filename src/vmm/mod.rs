//! `hbt run`: the VMM. Guest RAM ([`memory`]), image loaders ([`loader`]), long-mode entry
//! ([`boot`]), the device models ([`devices`]), the guest CPUID without KVM ([`cpuid`]) and
//! the engines that run the guest ([`engine`]: KVM, or the binary translator), which end on
//! the guest's exit port, a reset, a triple fault, `--timeout`, Ctrl-C ([`stop`]) or an engine
//! error, and say which. [`gdb`] is the gdb stub of `--gdb`.

pub mod acpi;
pub mod boot;
pub mod cpu_state;
pub mod cpuid;
pub mod devices;
pub mod engine;
pub mod gdb;
pub mod isa_system;
pub mod loader;
pub mod memory;
pub mod stop;
mod terminal;
pub mod vstate;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use engine::{fmt_counts, End};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

/// Run a guest image on KVM or in hbt's binary translator.
///
/// The image is recognized by its contents: a bare-metal x86-64 ELF (entered in 64-bit long
/// mode with identity paging), a Linux bzImage (boot protocol 2.12+, 64-bit entry; --initrd,
/// --append; an LZ4-compressed kernel is decompressed and placed by hbt, see --decompress), or
/// a flat binary (--load-addr, --entry). The guest's COM1 serial port is wired to stdin/stdout;
/// a write to port 0xf4 ends the run with that value as hbt's exit status.
///
/// Examples:
///   hbt run test-images/hello.img
///   hbt run --stats --timeout 10 test-images/timer.img
///   hbt run --load-addr 0x100000 code.bin
///   hbt run --accel bt test-images/hello.img   (no /dev/kvm needed)
///   hbt run --accel bt --gdb 1234 test-images/hello.img
///       then, elsewhere: gdb -ex 'target remote :1234'   (with vmlinux for a Linux guest)
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct RunArgs {
    /// The guest image.
    image: PathBuf,
    /// Guest RAM, in MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    mem: u64,
    /// Execution engine: `kvm` (hardware virtualization through /dev/kvm), `bt` (hbt's binary
    /// translator runs the whole machine; no /dev/kvm needed), `hybrid` (guest kernel code in
    /// the translator, guest user code under KVM at native speed). Default: hybrid where
    /// /dev/kvm can be opened, bt otherwise (and bt under --gdb); --stats says which and why.
    #[arg(long, value_enum)]
    accel: Option<Accel>,
    /// Under --accel hybrid, which engine runs guest user code: `adaptive` (per address space,
    /// the engine whose stretches between kernel entries measure cheaper, re-measured now and
    /// then: KVM for code that computes, the translator for code that enters the kernel every
    /// few microseconds — shells, fork/exec loops, small reads) or `always-kvm`.
    #[arg(long, value_enum, default_value_t = engine::hybrid::policy::Mode::Adaptive, value_name = "POLICY")]
    hybrid_policy: engine::hybrid::policy::Mode,
    /// Hybrid: page-table frames for KVM's copies of the guest's tables before the region's
    /// memory slot is reset (default: all of hbt's 32 MiB region; small values exercise the
    /// resets in tests).
    #[arg(long, hide = true, value_name = "N", value_parser = clap::value_parser!(u64).range(8..))]
    hybrid_table_frames: Option<u64>,
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
    /// Linux bzImage: who decompresses the kernel. `hbt` (for an LZ4 payload: hbt decompresses
    /// it and places the kernel itself, at a random physical address and virtual offset (KASLR)
    /// unless --append says `nokaslr`; other payloads always decompress in the guest) or
    /// `guest` (the bzImage's own decompressor runs in the guest first, as on a PC; under the
    /// translator it costs a boot ≈0.1 s more).
    #[arg(long, value_enum, default_value_t = loader::Decompress::Hbt, value_name = "WHO")]
    decompress: loader::Decompress,
    /// End the run after this many seconds (exit status 124).
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
    /// Print exits by reason and port, time in KVM_RUN vs in hbt, and boot-progress marks.
    #[arg(long)]
    stats: bool,
    /// Like --stats, as one JSON object on stderr (for scripts).
    #[arg(long)]
    stats_json: bool,
    /// Write the instruction forms the translator translated during the run (guest kernel and
    /// user code under --accel bt; under hybrid, not the user code that ran under KVM) to FILE,
    /// added to it when it is already a census. Read it with `hbt coverage --compare FILE`.
    #[arg(long, value_name = "FILE")]
    census: Option<PathBuf>,
    /// Wait for gdb on [HOST:]PORT with the guest stopped at its first instruction, like QEMU's
    /// `-s -S`; it runs once gdb continues (`gdb -ex 'target remote :PORT'`). A bare port
    /// listens on 127.0.0.1; port 0 picks a free one (printed). Needs --accel bt. When gdb
    /// detaches or goes away, the guest runs on to its end.
    #[arg(long, value_name = "[HOST:]PORT", value_parser = gdb::parse_addr)]
    gdb: Option<std::net::SocketAddr>,
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

pub fn run(args: RunArgs) -> Result<()> {
    let code = execute(&args)?;
    std::process::exit(code);
}

/// The engine to use, and why (for --stats).
fn choose_engine(args: &RunArgs) -> (Accel, &'static str) {
    match args.accel {
        Some(accel) => (accel, "chosen with --accel"),
        None if args.gdb.is_some() => (Accel::Bt, "default under --gdb"),
        None if kvm_ioctls::Kvm::new().is_ok() => (Accel::Hybrid, "default: /dev/kvm works"),
        None => (Accel::Bt, "default: /dev/kvm cannot be opened"),
    }
}

fn execute(args: &RunArgs) -> Result<i32> {
    let (accel_choice, accel_why) = choose_engine(args);
    if args.census.is_some() && accel_choice == Accel::Kvm {
        bail!("--census counts what hbt's translator translates: it needs --accel bt or hybrid, not kvm");
    }
    let census_what = format!("hbt run {}", args.image.display());
    if let Some(file) = &args.census {
        // A file that cannot be written, or is something else, is an error before the run.
        hbt_coverage::census::add_to_file(file, &census_what, &[])
            .with_context(|| format!("--census {}", file.display()))?;
    }
    let census = args.census.as_ref().map(|_| hbt_translator::CensusCounts::new());
    if args.gdb.is_some() && accel_choice != Accel::Bt {
        bail!("--gdb needs --accel bt: the gdb stub drives hbt's binary translator (KVM's guest debugging is not wired up)");
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
    // The firmware tables first: an image that loads over them wins.
    acpi::write_tables(&mut mem)?;
    let entry = loader::load(
        &args.image,
        &mut mem,
        &loader::LoadOptions {
            load_addr: args.load_addr,
            entry: args.entry,
            initrd: args.initrd.as_deref(),
            cmdline: &args.append,
            decompress: args.decompress,
        },
    )
    .with_context(|| format!("guest image {}", args.image.display()))?;
    boot::write_tables(&mut mem)?;
    let gdb = args.gdb.map(gdb::Listener::bind).transpose()?;

    let interactive = std::io::stdin().is_terminal();
    let setup = engine::Setup {
        mem: &mut mem,
        entry: &entry,
        started,
        interactive,
        gdb,
        detailed_stats: args.stats || args.stats_json,
        hybrid_policy: args.hybrid_policy,
        hybrid_table_frames: args.hybrid_table_frames,
        census: census.clone(),
    };
    stop::arm(args.timeout);
    if args.raw_exit_loop {
        return engine::kvm::raw_exit_loop(&setup);
    }
    let terminal = terminal::RawGuard::new(interactive);
    let mut finished = match accel_choice {
        Accel::Kvm => engine::kvm::run(&setup)?,
        Accel::Bt => engine::bt::run(&setup)?,
        Accel::Hybrid => engine::hybrid::run(&setup)?,
    };
    let total = started.elapsed();
    if let (Some(file), Some(counts)) = (&args.census, &census) {
        hbt_coverage::census::add_to_file(file, &census_what, &counts.forms())
            .with_context(|| format!("--census {}", file.display()))?;
    }
    // The guest's last output comes before hbt says how the run ended.
    finished.buses.pio.flush();
    drop(terminal);
    let end = &finished.end;
    let location = &finished.location;
    let status = match end {
        End::ExitPort(v) => *v as i32,
        End::Reset | End::PowerOff => 0,
        End::Halted => {
            diag!("hbt: guest halted with interrupts off: {location}");
            1
        }
        End::Timeout => {
            diag!(
                "hbt: --timeout reached after {:.3} s; guest at {location}",
                total.as_secs_f64()
            );
            124
        }
        End::OutputClosed => {
            diag!("hbt: stdout was closed; run ended as a program would by SIGPIPE");
            128 + libc::SIGPIPE
        }
        End::Killed => {
            diag!("hbt: gdb killed the guest; it was at {location}");
            128 + libc::SIGKILL
        }
        End::Interrupted(sig) => {
            let why = if *sig == libc::SIGINT {
                "Ctrl-C"
            } else {
                "SIGTERM/SIGHUP"
            };
            diag!("hbt: interrupted ({why}); guest at {location}");
            128 + *sig
        }
    };
    let accel = accel_choice
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default();
    let bus = &finished.buses;
    let marks = finished.marks.0.borrow();
    if args.stats_json {
        let unclaimed = |b: &devices::Bus| {
            b.unclaimed_top(usize::MAX)
                .into_iter()
                .map(|(address, n)| serde_json::json!({"address": address, "accesses": n}))
                .collect::<Vec<_>>()
        };
        let devices = |b: &devices::Bus| {
            b.exit_counts()
                .into_iter()
                .map(|(name, base, n)| serde_json::json!({"device": name, "base": base, "exits": n}))
                .collect::<Vec<_>>()
        };
        let mut v = serde_json::json!({
            "image": args.image.display().to_string(),
            "kind": entry.kind,
            "kernel": entry.kernel.map(|k| serde_json::json!({"virtual_offset": k.virtual_offset, "physical": k.physical})),
            "accel": accel,
            "accel_chosen": accel_why,
            "ended_by": format!("{end:?}"),
            "status": status,
            "seconds_total": total.as_secs_f64(),
            "seconds_run_loop": finished.seconds_run_loop,
            "port_exits": devices(&bus.pio),
            "unclaimed_port_accesses": bus.pio.unclaimed,
            "unclaimed_ports": unclaimed(&bus.pio),
            "mmio_exits": devices(&bus.mmio),
            "unclaimed_mmio_accesses": bus.mmio.unclaimed,
            "unclaimed_mmio": unclaimed(&bus.mmio),
            "boot_progress": marks.iter().map(|(t, v)| serde_json::json!({"seconds": t, "value": v})).collect::<Vec<_>>(),
        });
        if let Some(obj) = v.as_object_mut() {
            obj.extend(std::mem::take(&mut finished.stats_json));
        }
        diag!("{v}");
    }
    if args.stats {
        diag!(
            "hbt run stats: {} ({}, --accel {accel}, {accel_why}), ended by {end:?}",
            args.image.display(),
            entry.describe()
        );
        for line in &finished.stats_lines {
            diag!("{line}");
        }
        // Under KVM each access is an exit; under the translator, a call into the device.
        let what = if accel_choice == Accel::Kvm {
            "exits"
        } else {
            "accesses"
        };
        for (space, b) in [("port", &bus.pio), ("mmio", &bus.mmio)] {
            let per_device = b
                .exit_counts()
                .into_iter()
                .filter(|c| c.2 > 0)
                .map(|(name, base, n)| (format!("{name}@{base:#x}"), n));
            let top = b.unclaimed_top(8);
            let top = if top.is_empty() {
                String::new()
            } else {
                let list: Vec<String> = top.iter().map(|(a, n)| format!("{a:#x} {n}")).collect();
                format!(", most at {}", list.join(", "))
            };
            diag!(
                "  {space} {what}: {} (unclaimed {space} accesses: {}{top})",
                fmt_counts(per_device),
                b.unclaimed
            );
        }
        for (t, v) in marks.iter() {
            diag!("  boot progress {v:#04x} at {t:.6} s");
        }
    }
    Ok(status)
}
