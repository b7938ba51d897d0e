//! `--accel bt`: the whole guest machine runs in hbt's binary translator (system mode, soft-MMU
//! over guest RAM); no /dev/kvm is needed. The translator calls back into [`BtPlatform`] for
//! port I/O and MMIO (the same device models KVM's exits reach), CPUID (`cpuid.rs`), platform
//! MSRs and the interrupt controllers, which are hbt's own (`devices/chipset.rs`: 8259 pair,
//! I/O APIC, local APIC, 8254 PIT) in place of KVM's in-kernel ones.
//!
//! Threads: the vCPU thread runs the translator; the chipset's timer thread fires the PIT and
//! the local APIC timer at their deadlines, and the serial input thread raises IRQ 4. Both
//! then kick the vCPU thread (`stop::KICK_SIGNAL`, routed to the translator's kick handler),
//! which unlinks chained blocks so translated code returns to the dispatcher, where the
//! interrupt window is checked. A `hlt` with interrupts enabled sleeps on the chipset until it
//! raises INTR.
//!
//! Under `--gdb` the run loop is driven by the gdb stub through `debug.rs` instead.

use super::debug::DebugStop;
use super::{ending, fmt_counts, End, Finished, Setup};
use crate::vmm::cpu_state::CpuSnapshot;
use crate::vmm::devices::pvclock::{PhysWrite, PvClock};
use crate::vmm::devices::{self, chipset::Chipset, Action, Buses, IrqLine};
use crate::vmm::devices::{lapic, progress};
use crate::vmm::memory::{GuestMemory, MMIO_HOLE_END, MMIO_HOLE_START};
use crate::vmm::{boot, cpuid, stop};
use anyhow::{bail, Result};
use hbt_translator::mmu::{soft_mmu, Access};
use hbt_translator::state::flags;
use hbt_translator::{Config, Exit, GuestRam, MemoryStrategy, Platform, PortOutcome, Translator};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Dispatcher rounds per call into the translator (the run loop checks for a stop between).
const BLOCK_BUDGET: u64 = 1 << 16;
/// Code cache for a whole guest machine: a Linux boot translates ≈60 MiB (the soft-MMU's
/// inline checks make code ≈80 bytes per guest instruction); a full cache is flushed whole.
const SYSTEM_CODE_CACHE: usize = 256 << 20;
/// The longest a halted vCPU sleeps before looking for a stop request.
const HALT_POLL: Duration = Duration::from_millis(20);
const IA32_TIME_STAMP_COUNTER: u32 = 0x10;
/// The loaded microcode's revision (in EDX:EAX after a write of 0 and a CPUID): none here.
const IA32_BIOS_SIGN_ID: u32 = 0x8b;

mod debug;

/// The machine around the translated CPU.
pub(super) struct BtPlatform {
    pub(super) buses: Buses,
    chipset: Arc<Chipset>,
    /// What a device asked for when a port write returned `PortOutcome::Stop`.
    stop: Option<Action>,
    /// The paravirtual clock (`devices/pvclock.rs`) and the RAM it writes into.
    clock: PvClock,
    ram: GuestRam,
    /// Guest-physical ranges hbt wrote since the run loop last told the translator.
    written: Vec<(u64, u64)>,
    /// Time spent in device models (port I/O and MMIO), for `--stats`.
    device_time: Duration,
}

/// Guest RAM as the paravirtual clock writes it: each write is recorded, so translations of
/// code in the range (a guest that put its clock structure over code) are dropped.
struct RecordedWrites<'a> {
    ram: &'a GuestRam,
    written: &'a mut Vec<(u64, u64)>,
}

impl PhysWrite for RecordedWrites<'_> {
    fn write_phys(&mut self, gpa: u64, bytes: &[u8]) -> bool {
        let ok = self.ram.write(gpa, bytes);
        if ok {
            self.written.push((gpa, bytes.len() as u64));
        }
        ok
    }
}

impl BtPlatform {
    /// A device write's outcome: anything but `Continue` ends the run (kept for the VMM).
    fn outcome(&mut self, action: Action) -> PortOutcome {
        match action {
            Action::Continue => PortOutcome::Continue,
            action => {
                self.stop = Some(action);
                PortOutcome::Stop
            }
        }
    }
}

impl Platform for BtPlatform {
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        cpuid::guest_cpuid(leaf, subleaf)
    }
    fn rdtsc(&mut self) -> u64 {
        // SAFETY: rdtsc has no memory effects.
        unsafe { std::arch::x86_64::_rdtsc() }
    }
    fn tsc_aux(&mut self) -> u32 {
        0
    }
    fn port_in(&mut self, port: u16, size: u8) -> u32 {
        let started = Instant::now();
        let mut data = [0u8; 4];
        self.buses.pio.read(port as u64, &mut data[..size as usize]);
        self.device_time += started.elapsed();
        u32::from_le_bytes(data)
    }
    fn port_out(&mut self, port: u16, size: u8, value: u32) -> PortOutcome {
        let started = Instant::now();
        let action = self.buses.pio.write(port as u64, &value.to_le_bytes()[..size as usize]);
        self.device_time += started.elapsed();
        self.outcome(action)
    }
    // The same MMIO bus KVM's exits use: unclaimed addresses read all ones, drop writes and are
    // counted (`--stats`).
    fn mmio_read(&mut self, pa: u64, data: &mut [u8]) {
        let started = Instant::now();
        self.buses.mmio.read(pa, data);
        self.device_time += started.elapsed();
    }
    fn mmio_write(&mut self, pa: u64, data: &[u8]) -> PortOutcome {
        let started = Instant::now();
        let action = self.buses.mmio.write(pa, data);
        self.device_time += started.elapsed();
        self.outcome(action)
    }
    fn rdmsr(&mut self, index: u32) -> Option<u64> {
        match index {
            IA32_TIME_STAMP_COUNTER => Some(self.rdtsc()),
            IA32_BIOS_SIGN_ID => Some(0),
            cpuid::IA32_ARCH_CAPABILITIES => Some(cpuid::ARCH_CAPABILITIES),
            lapic::IA32_APIC_BASE | lapic::IA32_TSC_DEADLINE => self.chipset.rdmsr(index),
            _ => self.clock.rdmsr(index),
        }
    }
    fn wrmsr(&mut self, index: u32, value: u64) -> Option<()> {
        if index == IA32_BIOS_SIGN_ID {
            return Some(());
        }
        let tsc = self.rdtsc();
        if matches!(index, lapic::IA32_APIC_BASE | lapic::IA32_TSC_DEADLINE) {
            return self.chipset.wrmsr(index, value, tsc);
        }
        let mut mem = RecordedWrites {
            ram: &self.ram,
            written: &mut self.written,
        };
        self.clock.wrmsr(index, value, tsc, &mut mem)
    }
    fn interrupt_pending(&mut self) -> bool {
        self.chipset.interrupt_pending()
    }
    fn acknowledge_interrupt(&mut self) -> Option<u8> {
        self.chipset.acknowledge()
    }
}

/// A view of guest RAM for the translator's soft-MMU (or for reading guest code in reports).
pub(super) fn guest_ram(mem: &GuestMemory) -> GuestRam {
    // SAFETY: the mapping is page-aligned (mmap) and outlives the run: `execute` owns it and
    // drops it after the engine returns.
    unsafe { GuestRam::with_hole(mem.host_base() as *mut u8, mem.size(), MMIO_HOLE_START, MMIO_HOLE_END) }
}

/// The 15 bytes at the guest's RIP, through its page tables.
fn code_at_rip(ram: &GuestRam, t: &Translator) -> Option<[u8; 15]> {
    let state = t.state();
    let mut bytes = [0u8; 15];
    for (i, b) in bytes.iter_mut().enumerate() {
        let pa = soft_mmu::walk(ram, &state.paging(), state.rip.wrapping_add(i as u64), Access::Fetch).ok()?;
        let host = ram.host(pa, 1)?;
        // SAFETY: `host` is inside guest RAM (checked by `GuestRam::host`).
        *b = unsafe { *(host as *const u8) };
    }
    Some(bytes)
}

/// The translated machine: the translator in system mode over guest RAM, and the platform
/// around it (device buses, hbt's chipset with its timer thread). The hybrid engine runs guest
/// kernel code on the same machine.
pub(super) struct Machine {
    pub(super) translator: Translator,
    pub(super) platform: BtPlatform,
    pub(super) chipset: Arc<Chipset>,
    pub(super) marks: progress::Marks,
    /// Stops the timer thread.
    done: Arc<AtomicBool>,
    ticker: Option<std::thread::JoinHandle<()>>,
}

impl Machine {
    pub(super) fn new(setup: &Setup) -> Result<Machine> {
        let mut translator = Translator::new(Config {
            strategy: MemoryStrategy::SoftMmu(guest_ram(setup.mem)),
            code_cache_bytes: SYSTEM_CODE_CACHE,
            // Forms with a rule but no harness verdict on this host still run: a guest kernel
            // needs them, and the alternative (#UD) is worse.
            verified_only: false,
            system: true,
        })?;
        // A guest spinning with interrupts off must still end on --timeout or a signal, and
        // stop for a debugger that asks.
        translator.set_stop_check(|| stop::requested().is_some() || stop::attention() || stop::policy_check_pending());
        translator.set_detailed_stats(setup.detailed_stats);
        if let Some(counts) = &setup.census {
            translator.record_census(std::sync::Arc::clone(counts));
        }
        let e = setup.entry;
        *translator.state_mut() = boot::long_mode_state(e.rip, e.rsp, e.rsi);
        hbt_translator::host::signals::catch_kick(stop::KICK_SIGNAL)?;

        let chipset = Arc::new(Chipset::new(cpuid::tsc_khz()));
        let com1_irq = {
            let chipset = Arc::clone(&chipset);
            IrqLine::new(move |level| {
                chipset.set_irq(devices::serial::COM1_IRQ as u8, level);
                if level && chipset.interrupt_pending() && !stop::on_vcpu_thread() {
                    stop::kick_vcpu();
                }
            })
        };
        let (mut buses, marks) = Buses::standard(setup.started, setup.interactive, com1_irq);
        devices::chipset::insert(&mut buses.pio, &mut buses.mmio, &chipset);
        // SAFETY: the chipset outlives every `translator.run` (the machine holds both, and
        // drops the translator first: field order), and its INTR line is an AtomicBool inside
        // the Arc's allocation, which does not move.
        unsafe { translator.set_interrupt_line(chipset.interrupt_line()) };
        // `BtPlatform::rdtsc` is the host's TSC as it is: translated kernel code may read it.
        translator.set_host_tsc(true);
        let done = Arc::new(AtomicBool::new(false));
        let ticker = {
            let (chipset, done) = (Arc::clone(&chipset), Arc::clone(&done));
            std::thread::Builder::new()
                .name("hbt-timers".into())
                .spawn(move || chipset.run_timers(&done, stop::kick_vcpu))?
        };
        // Every helper thread exists now (watchdog, serial input, ticker): they take the
        // terminating signals from here on.
        stop::block_terminating_signals();
        let platform = BtPlatform {
            buses,
            chipset: Arc::clone(&chipset),
            stop: None,
            // SAFETY: rdtsc has no memory effects.
            clock: PvClock::new(unsafe { std::arch::x86_64::_rdtsc() }, cpuid::tsc_khz()),
            ram: guest_ram(setup.mem),
            written: Vec::new(),
            device_time: Duration::ZERO,
        };
        Ok(Machine {
            translator,
            platform,
            chipset,
            marks,
            done,
            ticker: Some(ticker),
        })
    }

    /// Stops the timer thread and turns the run's result into the report: where the guest
    /// was (with the last events delivered when it went wrong) and the translator's counters,
    /// followed by `extra` lines and fields from the engine that drove the machine.
    pub(super) fn finish(
        mut self,
        setup: &Setup,
        result: Result<End>,
        loop_started: Instant,
        extra: (Vec<String>, serde_json::Map<String, serde_json::Value>),
    ) -> Result<Finished> {
        self.done.store(true, Ordering::SeqCst);
        self.chipset.notify_timers();
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
        let in_loop = loop_started.elapsed();
        let t = &self.translator;
        let mut location = CpuSnapshot::from_translator(t.state()).describe(code_at_rip(&self.platform.ram, t));
        if result.is_err() && t.recent_events().len() > 0 {
            location += "\nlast events delivered, oldest first:";
            for e in t.recent_events() {
                location += &format!("\n  {e}");
            }
        }
        let end = match result {
            Ok(end) => end,
            Err(why) => {
                self.platform.buses.pio.flush();
                bail!("{why} after {:.3} s: {location}", setup.started.elapsed().as_secs_f64())
            }
        };
        let (mut stats_lines, mut stats_json) = report(t, in_loop, self.platform.device_time, setup.detailed_stats);
        let unsupported = self.chipset.unsupported_requests();
        stats_lines.push(format!(
            "  interrupt requests the chipset model cannot carry out (NMI/INIT/SMI, APIC relocation): {unsupported}"
        ));
        stats_json.insert("chipset_unsupported_requests".into(), unsupported.into());
        stats_lines.extend(extra.0);
        stats_json.extend(extra.1);
        Ok(Finished {
            end,
            location,
            buses: self.platform.buses,
            marks: self.marks,
            seconds_run_loop: in_loop.as_secs_f64(),
            stats_lines,
            stats_json,
        })
    }
}

pub fn run(setup: &Setup) -> Result<Finished> {
    let mut m = Machine::new(setup)?;
    let loop_started = Instant::now();
    let result = match &setup.gdb {
        None => run_to_end(&mut m.translator, &mut m.platform),
        Some(gdb) => crate::vmm::gdb::serve(gdb, &mut debug::BtDebuggee::new(&mut m.translator, &mut m.platform)),
    };
    m.finish(setup, result, loop_started, Default::default())
}

/// Runs the guest until it ends or a stop is requested.
fn run_to_end(t: &mut Translator, platform: &mut BtPlatform) -> Result<End> {
    loop {
        // (Only a debugger sets breakpoints, steps or asks for attention.)
        match run_loop(t, platform)? {
            Pause::Debugger(DebugStop::Ended(end)) => return Ok(end),
            Pause::ExtendedState => bail!("the translator asked for extended state it never gave away"),
            _ => {}
        }
    }
}

/// Why [`run_loop`] returned.
pub(super) enum Pause {
    /// The run ended, or the guest stopped for a debugger.
    Debugger(DebugStop),
    /// The guest entered CPL3 (only with the translator's user-mode exit on: the hybrid engine
    /// takes user code from there).
    UserMode,
    /// The guest entered CPL0 from CPL3 (only with the kernel-mode exit on).
    KernelMode,
    /// The hybrid engine's policy asked to look at where the guest is (`stop::request_policy_check`).
    PolicyCheck,
    /// The guest is about to touch its extended state, which the hybrid engine left in KVM
    /// (`Translator::set_extended_state_stale`).
    ExtendedState,
}

/// Runs the guest until it ends, a stop is requested, it stops for a debugger or (with the
/// translator's user-mode exit on) it enters CPL3. Errors say why the machine cannot go on.
pub(super) fn run_loop(t: &mut Translator, platform: &mut BtPlatform) -> Result<Pause> {
    loop {
        if let Some(end) = stop::requested() {
            return Ok(Pause::Debugger(DebugStop::Ended(end)));
        }
        if stop::take_attention() {
            return Ok(Pause::Debugger(DebugStop::Attention));
        }
        if stop::take_policy_check() {
            return Ok(Pause::PolicyCheck);
        }
        let exit = t
            .run(platform, BLOCK_BUDGET)
            .map_err(|e| anyhow::anyhow!("translator: {e}"))?;
        for (gpa, len) in platform.written.drain(..) {
            t.invalidate_range(gpa, len);
        }
        match exit {
            Exit::BlockLimit | Exit::Interrupted => {}
            Exit::Breakpoint => return Ok(Pause::Debugger(DebugStop::Breakpoint)),
            Exit::Stepped => return Ok(Pause::Debugger(DebugStop::Stepped)),
            Exit::UserMode => return Ok(Pause::UserMode),
            Exit::KernelMode => return Ok(Pause::KernelMode),
            Exit::ExtendedStateNeeded => return Ok(Pause::ExtendedState),
            Exit::Stopped => {
                if let Some(end) = platform.stop.take().and_then(ending) {
                    return Ok(Pause::Debugger(DebugStop::Ended(end)));
                }
            }
            Exit::Halt => {
                if t.state().rflags & flags::IF == 0 {
                    return Ok(Pause::Debugger(DebugStop::Ended(End::Halted)));
                }
                // A step over `hlt` ends after it: interrupts are held while stepping.
                if t.single_step() {
                    return Ok(Pause::Debugger(DebugStop::Stepped));
                }
                // Output the guest left batched shows while it waits (a prompt, say).
                platform.buses.pio.flush();
                platform
                    .chipset
                    .wait(HALT_POLL, || stop::requested().is_some() || stop::attention());
            }
            Exit::TripleFault(e) => bail!("guest triple fault (a fault while delivering {e} as a double fault)"),
            Exit::Exception(e) => bail!("translator returned guest exception {e} in system mode"),
            Exit::Syscall => bail!("translator returned a user-mode syscall exit in system mode"),
        }
    }
}

/// The names of CPUID model bits, space-separated (for `--stats`).
fn names(bits: &[cpuid::ModelBit]) -> String {
    bits.iter().map(|b| b.name).collect::<Vec<_>>().join(" ")
}

/// The translator's counters for `--stats`/`--stats-json`.
fn report(
    t: &Translator,
    in_loop: Duration,
    device_time: Duration,
    detailed: bool,
) -> (Vec<String>, serde_json::Map<String, serde_json::Value>) {
    let s = t.stats();
    let lookups = s.tlb_hits + s.tlb_misses;
    let hit_rate = (lookups > 0).then(|| s.tlb_hits as f64 / lookups as f64);
    fn by_count(m: &std::collections::BTreeMap<iced_x86::Mnemonic, u64>) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = m.iter().map(|(k, n)| (format!("{k:?}").to_lowercase(), *n)).collect();
        v.sort_by_key(|(k, n)| (std::cmp::Reverse(*n), k.clone()));
        v
    }
    fn vectors(m: &std::collections::BTreeMap<u8, u64>) -> impl Iterator<Item = (String, u64)> + '_ {
        m.iter().map(|(v, n)| (format!("{v}"), *n))
    }
    let lines = vec![
        format!(
            "  time: {:.6} s in the run loop: {:.6} s translating, {:.6} s in translated code, {:.6} s in devices, the rest in the engine (dispatch, TLB misses, emulated instructions, delivery)",
            in_loop.as_secs_f64(),
            s.translate_time.as_secs_f64(),
            s.translated_code_time.as_secs_f64(),
            device_time.as_secs_f64()
        ),
        match hit_rate {
            Some(r) if detailed => format!(
                "  soft-MMU TLB: {:.3}% of lookups hit ({} hits, {} misses)",
                r * 100.0,
                s.tlb_hits,
                s.tlb_misses
            ),
            _ => format!("  soft-MMU TLB: {} misses", s.tlb_misses),
        },
        format!(
            "  soft-MMU windows: {} translated covering {} accesses with one lookup each; {} lookups missed, {} of them ran the first access alone; {} places without windows now",
            s.windows, s.window_accesses, s.window_misses, s.window_fallbacks, t.windowless_places()
        ),
        format!(
            "  soft-MMU loop windows: {} streams translated covering {} accesses with one lookup per loop entry; {} entry checks missed, {} of them went on without the window",
            s.loop_windows, s.loop_window_accesses, s.loop_window_misses, s.loop_window_fallbacks
        ),
        format!(
            "  translator: {} blocks ({} guest instructions, {} KiB of code), {} block exits, {} chained, \
             {} indirect misses, {} TLB misses, {} emulated, {} flushes, {} remaps, {} single-page invalidations, {} blocks invalidated \
             ({} brought back unchanged), {} device-memory accesses",
            s.blocks_translated,
            s.guest_instructions_translated,
            t.code_cache_used() >> 10,
            s.block_exits,
            s.chained,
            s.indirect_misses,
            s.tlb_misses,
            s.emulated,
            s.flushes,
            s.remaps,
            s.page_invalidations,
            s.invalidated_blocks,
            s.blocks_revived,
            s.mmio_accesses
        ),
        format!(
            "  extended state (x87, SSE, AVX): loaded into the host's registers by {} of the {} entries into translated code",
            s.extended_state_loads, s.block_exits
        ),
        format!(
            "  emulated instructions by mnemonic (most first): {}",
            fmt_counts(by_count(&s.emulated_by_mnemonic).into_iter().take(12))
        ),
        format!(
            "  exceptions delivered by vector: {}",
            fmt_counts(vectors(&s.exceptions))
        ),
        format!(
            "  interrupts delivered by vector: {}",
            fmt_counts(vectors(&s.interrupts))
        ),
        format!("  CPUID hides: {}", names(cpuid::HIDDEN)),
        format!("  CPUID claims (whatever the host has): {}", names(cpuid::CLAIMED)),
        format!(
            "  unimplemented instructions (#UD to the guest): {}",
            fmt_counts(s.unimplemented.iter().map(|(k, n)| (k.clone(), *n)))
        ),
    ];
    let mut lines = lines;
    if t.recent_events().len() == 0 {
        lines.push("  last events delivered: none".into());
    } else {
        lines.push("  last events delivered, oldest first:".into());
        lines.extend(t.recent_events().map(|e| format!("    {e}")));
    }
    let mut map = serde_json::Map::new();
    let reasons = |bits: &[cpuid::ModelBit]| {
        serde_json::Value::Object(bits.iter().map(|b| (b.name.to_string(), b.why.into())).collect())
    };
    map.insert("cpuid_hidden".into(), reasons(cpuid::HIDDEN));
    map.insert("cpuid_claimed".into(), reasons(cpuid::CLAIMED));
    map.insert("seconds_translating".into(), s.translate_time.as_secs_f64().into());
    map.insert(
        "seconds_in_translated_code".into(),
        s.translated_code_time.as_secs_f64().into(),
    );
    map.insert("seconds_in_devices".into(), device_time.as_secs_f64().into());
    map.insert("tlb_hits".into(), s.tlb_hits.into());
    map.insert("tlb_hit_rate".into(), hit_rate.into());
    map.insert(
        "translator".into(),
        serde_json::json!({
            "blocks_translated": s.blocks_translated,
            "blocks_revived": s.blocks_revived,
            "guest_instructions_translated": s.guest_instructions_translated,
            "code_cache_bytes": t.code_cache_used(),
            "block_exits": s.block_exits,
            "extended_state_loads": s.extended_state_loads,
            "chained": s.chained,
            "indirect_misses": s.indirect_misses,
            "tlb_misses": s.tlb_misses,
            "windows": {
                "translated": s.windows,
                "accesses": s.window_accesses,
                "misses": s.window_misses,
                "fallbacks": s.window_fallbacks,
                "windowless_places": t.windowless_places(),
            },
            "loop_windows": {
                "streams": s.loop_windows,
                "accesses": s.loop_window_accesses,
                "misses": s.loop_window_misses,
                "fallbacks": s.loop_window_fallbacks,
            },
            "emulated": s.emulated,
            "flushes": s.flushes,
            "remaps": s.remaps,
            "page_invalidations": s.page_invalidations,
            "invalidated_blocks": s.invalidated_blocks,
            "mmio_accesses": s.mmio_accesses,
            "exceptions_by_vector": s.exceptions,
            "interrupts_by_vector": s.interrupts,
            "unimplemented": s.unimplemented,
            "emulated_by_mnemonic": by_count(&s.emulated_by_mnemonic).into_iter().collect::<std::collections::BTreeMap<_, _>>(),
        }),
    );
    (lines, map)
}
