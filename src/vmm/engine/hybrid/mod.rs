//! `--accel hybrid`: guest kernel code (CPL0) in hbt's translator, guest user code (CPL3) under
//! KVM — the split VMware Workstation made, rebuilt on KVM. On these hosts (kvm_pvm) KVM runs
//! CPL3 natively and CPL0 ≈1000× slower, so the translator runs the machine (`bt.rs`'s
//! [`Machine`]: the same chipset, devices and CPU model) and hands each stretch of user code to
//! KVM when the policy (`policy.rs`) says it pays.
//!
//! A switch, step by step:
//! 1. the translator stops when the guest enters CPL3 (`sysretq`, `iretq`…; its user-mode exit);
//! 2. the state goes into KVM with hbt's descriptor tables, entry stubs (`host_region.rs`) and
//!    page tables (`user_tables.rs`) in place of the guest kernel's;
//! 3. KVM runs user code until it enters the kernel — through a stub — or the chipset kicks the
//!    thread out of KVM_RUN for an interrupt, a timeout or a signal;
//! 4. the user state comes back and the translator continues as the CPU would: a system call
//!    through the guest's LSTAR (`transfer::syscall`); a page fault whose access the guest's
//!    tables allow widens hbt's tables and KVM resumes (the guest never sees it); any other
//!    fault is delivered through the guest's IDT — a #PF from the translator's own walk, the
//!    rest by re-running the faulting instruction in the translator (one single step), which
//!    raises exactly what the guest's IDT, GDT and page tables make of it; an interrupt is
//!    taken by the translator at the user instruction boundary.

mod host_region;
pub mod policy;
mod user_tables;
mod user_vcpu;

use super::bt::{self, Machine, Pause};
use super::debug::DebugStop;
use super::{ending, fmt_counts, End, Finished, Setup};
use crate::vmm::stop;
use anyhow::{bail, Result};
use hbt_translator::mmu::soft_mmu::{self, GuestRam};
use hbt_translator::mmu::Access;
use hbt_translator::state::{Cpl, GuestState};
use hbt_translator::system::delivery::Event;
use hbt_translator::{Exit, GuestException, Translator};
use host_region::Entry;
use kvm_ioctls::VcpuExit;
use policy::{Choice, Policy};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use user_vcpu::UserVcpu;

/// Why user code under KVM went back to the translator (or stayed, for `HiddenFault`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Cause {
    Syscall,
    /// A page fault the guest's tables allow: hbt's tables widened, KVM resumed.
    HiddenFault,
    PageFault,
    /// Another exception (vector).
    Exception(u8),
    /// The chipset, a timeout or a signal kicked KVM_RUN.
    Kick,
    /// A device access from user code (MMIO mapped to user space).
    Device,
    /// KVM's instruction emulator gave up on a user instruction (the translator runs it).
    EmulationFailure,
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cause::Syscall => write!(f, "syscall"),
            Cause::HiddenFault => write!(f, "hidden-page-fault"),
            Cause::PageFault => write!(f, "page-fault"),
            Cause::Exception(v) => write!(f, "exception-{v}"),
            Cause::Kick => write!(f, "interrupt-or-stop"),
            Cause::Device => write!(f, "device-access"),
            Cause::EmulationFailure => write!(f, "kvm-emulation-failure"),
        }
    }
}

#[derive(Default)]
struct HybridStats {
    in_kvm: Duration,
    /// Moving the state into KVM and back out (ioctls, page tables).
    switching: Duration,
    stints: u64,
    causes: BTreeMap<Cause, u64>,
    replays: u64,
    /// Page faults KVM delivered without their address (`user_vcpu::UNREPORTED_CR2`).
    unreported_cr2: u64,
    /// User instructions KVM's emulator could not perform (run by the translator instead).
    emulation_failures: u64,
    translator_user_stretches: u64,
    /// Of those, stretches of 32-bit code (compatibility mode), which stay in the translator.
    compat_stretches: u64,
    /// Of those, stretches kvm_pvm would not run as a CPU would ([`translator_only`]): RFLAGS.TF
    /// set or DR7 breakpoints enabled (a debugger single-stepping or watching a process), or
    /// CR4.TSD (a process denied `rdtsc`).
    translator_only_stretches: u64,
    /// From a stint kicked out for an interrupt to the next stint (the guest kernel's handler
    /// in the translator, both switches).
    kick_to_stint: Duration,
    kicked_at: Option<Instant>,
}

/// The translator's code pages, for the tables (`user_tables::CodePages`).
struct TranslatedCode<'a>(&'a Translator);

impl user_tables::CodePages for TranslatedCode<'_> {
    fn has_code(&self, page: u64) -> bool {
        self.0.has_code_on_page(page)
    }
}

pub fn run(setup: &Setup) -> Result<Finished> {
    if setup.gdb.is_some() {
        bail!("--gdb needs --accel bt: the gdb stub drives hbt's binary translator alone");
    }
    let mut m = Machine::new(setup)?;
    let mut user = UserVcpu::new(setup.mem, setup.hybrid_table_frames)?;
    m.translator.set_user_exit(true);
    m.translator.set_extended_state_handover(true);
    // SAFETY: the flag is the vCPU's kvm_run mapping, which lives until `user` drops; the flag
    // is cleared below before that.
    unsafe { hbt_translator::host::signals::set_kick_flag(user.immediate_exit_flag()) };
    let mut stats = HybridStats::default();
    let mut policy = Policy::new(setup.hybrid_policy);
    let loop_started = Instant::now();
    let ram = bt::guest_ram(setup.mem);
    let mut result = drive(&mut m, &ram, &mut user, &mut policy, &mut stats);
    if m.translator.extended_state_stale() {
        // The final state (reports, a snapshot, the register dump of a run that failed) holds
        // the live image. After a failure, the failure is what is reported, even if reading
        // the image out fails too.
        if let Err(e) = fetch_extended_state(&mut m, &mut user) {
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    // SAFETY: clearing the flag (no pointer is stored).
    unsafe { hbt_translator::host::signals::set_kick_flag(std::ptr::null_mut()) };
    let extra = report(&stats, &user, &policy, loop_started.elapsed());
    m.finish(setup, result, loop_started, extra)
}

/// Runs the machine to its end.
fn drive(
    m: &mut Machine,
    ram: &GuestRam,
    user: &mut UserVcpu,
    policy: &mut Policy,
    stats: &mut HybridStats,
) -> Result<End> {
    // A user stretch left to the translator: its address space and start. The watch asks for
    // a policy check once it has run long enough to belong under KVM (a loop that makes no
    // system call and sees no interrupt would otherwise never leave the translator).
    let mut translator_stretch: Option<(u64, Instant)> = None;
    let watch = policy::Watch::start();
    loop {
        match bt::run_loop(&mut m.translator, &mut m.platform)? {
            Pause::Debugger(DebugStop::Ended(end)) => return Ok(end),
            Pause::Debugger(_) => {}
            Pause::ExtendedState => fetch_extended_state(m, user)?,
            Pause::UserMode if m.translator.state().code32 => {
                // 32-bit code stays in the translator: kvm_pvm emulates it an instruction at a
                // time (≈0.9 M iterations/s of a two-instruction loop, AMD EPYC), and its
                // `syscall` from compatibility mode is not a CPU's (it fetched at CSTAR truncated
                // to 32 bits and took the #PF at CPL0 on the user's stack). The translator runs
                // it to its next kernel entry.
                stats.translator_user_stretches += 1;
                stats.compat_stretches += 1;
            }
            Pause::UserMode if translator_only(m.translator.state()) => {
                stats.translator_user_stretches += 1;
                stats.translator_only_stretches += 1;
            }
            Pause::UserMode => {
                let cr3 = m.translator.state().cr3;
                match policy.choose(cr3, space_identity(ram, cr3)) {
                    Choice::Translator => {
                        // Timed to its next kernel entry (the policy's evidence).
                        stats.translator_user_stretches += 1;
                        translator_stretch = Some((cr3, Instant::now()));
                        m.translator.set_kernel_exit(true);
                        watch.arm(policy.long_stretch(cr3));
                    }
                    Choice::Kvm => {
                        if let Some(end) = user_stint(m, ram, user, policy, stats)? {
                            return Ok(end);
                        }
                    }
                }
            }
            Pause::KernelMode => {
                m.translator.set_kernel_exit(false);
                watch.disarm();
                if let Some((cr3, started)) = translator_stretch.take() {
                    policy.translator_stretch_ended(cr3, started.elapsed());
                }
            }
            Pause::PolicyCheck => {
                // Still the same user stretch: it computes; KVM takes it from here — at a
                // clean boundary only (a split access half done must finish in the translator:
                // its bounce buffer goes back to guest memory when it does).
                let state = m.translator.state();
                let at_user = state.cpl == Cpl::User && !state.code32 && !translator_only(state);
                if let (true, Some((cr3, started))) = (at_user, translator_stretch) {
                    if !m.translator.at_clean_boundary() {
                        watch.arm(Duration::from_micros(50));
                    } else if m.translator.state().cr3 == cr3 {
                        translator_stretch = None;
                        m.translator.set_kernel_exit(false);
                        policy.translator_stretch_cut(cr3, started.elapsed());
                        if let Some(end) = user_stint(m, ram, user, policy, stats)? {
                            return Ok(end);
                        }
                    }
                }
            }
        }
    }
}

/// User code that only the translator runs as a CPU would, measured under kvm_pvm: with
/// RFLAGS.TF set (a `ptrace(PTRACE_SINGLESTEP)` loop saw its child run to its end), with
/// breakpoints enabled in DR7 (any L or G bit: watched stores never stopped), or with CR4.TSD
/// set (Linux's `PR_SET_TSC`: `rdtsc` ran instead of faulting).
fn translator_only(state: &GuestState) -> bool {
    const CR4_TSD: u64 = 1 << 2;
    state.rflags & hbt_translator::state::flags::TF != 0 || state.sys.dr[7] & 0xff != 0 || state.cr4 & CR4_TSD != 0
}

/// What tells apart two processes that had the same CR3 (`Policy::choose`): the first entry of
/// the page-table root, which names the table a process's low user addresses (its program and
/// heap) hang from — a new process has its own. Only the entry's frame counts (its accessed bit
/// changes under a walk).
fn space_identity(ram: &GuestRam, cr3: u64) -> u64 {
    const FRAME: u64 = 0x000f_ffff_ffff_f000;
    ram.read_u64(cr3 & FRAME).map_or(0, |entry| entry & FRAME)
}

/// Runs user code under KVM from the translator's state until it enters the kernel (or is
/// kicked out); leaves the translator ready to go on. `Some(end)` when the run ended.
fn user_stint(
    m: &mut Machine,
    ram: &GuestRam,
    user: &mut UserVcpu,
    policy: &mut Policy,
    stats: &mut HybridStats,
) -> Result<Option<End>> {
    let new_pages = m.translator.take_new_code_pages();
    user.tables.code_appeared(&new_pages);
    let started = Instant::now();
    if let Some(kicked) = stats.kicked_at.take() {
        stats.kick_to_stint += kicked.elapsed();
    }
    let before = m.translator.state().clone();
    let generation = m.translator.invalidation_generation();
    user.load(
        ram,
        &before,
        m.translator.extended_state_stale(),
        generation,
        &TranslatedCode(&m.translator),
    )?;
    stats.switching += started.elapsed();
    stats.stints += 1;
    let mut last_hidden = None;
    let outcome = loop {
        user.vcpu.set_kvm_immediate_exit(0);
        if stop::requested().is_some() || stop::attention() || m.chipset.interrupt_pending() {
            break Outcome::Kicked;
        }
        let t0 = Instant::now();
        let exit = user.vcpu.run();
        stats.in_kvm += t0.elapsed();
        let mut out = None;
        let mut kicked = false;
        match exit {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => kicked = true,
            Ok(VcpuExit::Intr) => kicked = true,
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut bytes = [0u8; 8];
                let len = data.len().min(8);
                bytes[..len].copy_from_slice(&data[..len]);
                out = Some((port, bytes, len));
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                *stats.causes.entry(Cause::Device).or_default() += 1;
                m.platform.buses.pio.read(port as u64, data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                *stats.causes.entry(Cause::Device).or_default() += 1;
                m.platform.buses.mmio.read(addr, data);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                *stats.causes.entry(Cause::Device).or_default() += 1;
                if let Some(end) = ending(m.platform.buses.mmio.write(addr, data)) {
                    break Outcome::Ended(end);
                }
            }
            Ok(VcpuExit::InternalError) => {
                // kvm_pvm's emulator gave up on a user instruction it should have let fault
                // (`engine/kvm.rs`, EMULATION_RETRIES): the translator runs it.
                stats.emulation_failures += 1;
                break Outcome::Replay(None);
            }
            Ok(other) => {
                let what = format!("{other:?}");
                bail!(
                    "KVM stopped running guest user code with {what} (hbt's entry structures must catch every kernel entry): {}",
                    user.describe()
                )
            }
            Err(e) => bail!("KVM_RUN failed running guest user code: {e}"),
        }
        // Port output from a stub (user code entered the kernel) or, rarely, a device; or a
        // kick that caught the vCPU between a kernel entry and its stub's exit (at LSTAR, or at
        // a gate stub with the frame pushed), which is that entry.
        let (regs, sregs) = user.registers();
        let cr2 = sregs.cr2;
        let entry = user.region.entry(regs.rip, regs.rsp);
        if kicked && entry.is_none() {
            break Outcome::Kicked;
        }
        if let Some(Entry::Gate { vector, frame, .. }) = entry {
            if frame.cs & 3 != 3 {
                bail!(
                    "exception {vector} inside hbt's entry stubs (frame {frame:x?}): {}",
                    user.describe()
                );
            }
        }
        if kicked || out.is_some() {
            let (port, bytes, len) = out.unwrap_or((0, [0; 8], 0));
            match entry {
                Some(Entry::Syscall { rsp }) => break Outcome::Syscall { rsp },
                Some(Entry::Gate {
                    vector: 14,
                    error_code,
                    frame,
                }) => {
                    if cr2 == user_vcpu::UNREPORTED_CR2 {
                        // KVM did not say where: the translator finds out (user_vcpu.rs).
                        stats.unreported_cr2 += 1;
                        break Outcome::Replay(Some(frame));
                    }
                    let access = match error_code.unwrap_or(0) {
                        e if e & 0x10 != 0 => Access::Fetch,
                        e if e & 0x2 != 0 => Access::Write,
                        _ => Access::Read,
                    };
                    let mut paging = before.paging();
                    paging.cpl = Cpl::User;
                    match soft_mmu::walk(ram, &paging, cr2, access) {
                        Ok(pa) if last_hidden != Some((cr2, access)) => {
                            // The guest allows it: widen hbt's tables (a write to a page
                            // holding translated code drops those translations first).
                            last_hidden = Some((cr2, access));
                            if access == Access::Write && m.translator.has_code_on_page(pa) {
                                m.translator.invalidate_range(pa & !0xfff, 0x1000);
                            }
                            *stats.causes.entry(Cause::HiddenFault).or_default() += 1;
                            let widened = user.tables.widen(ram, cr2, &TranslatedCode(&m.translator));
                            if widened {
                                user.resume_user(&frame);
                            } else {
                                // Not a widening (or no frame left for one): the whole tree again.
                                let s = user.user_state(&before, Some(&frame));
                                user.tables.forget();
                                // (KVM ran: the live XSAVE image is its own.)
                                user.load(ram, &s, true, generation, &TranslatedCode(&m.translator))?;
                            }
                            continue;
                        }
                        Ok(_) => break Outcome::Replay(Some(frame)),
                        Err(exc) => break Outcome::Fault(frame, exc),
                    }
                }
                Some(Entry::Gate { vector, frame, .. }) => break Outcome::Gate(vector, frame),
                None => {
                    // Port output by user code itself (a guest that gave it IOPL 3 on a
                    // host that honours it).
                    *stats.causes.entry(Cause::Device).or_default() += 1;
                    if let Some(end) = ending(m.platform.buses.pio.write(port as u64, &bytes[..len])) {
                        break Outcome::Ended(end);
                    }
                }
            }
        }
    };
    let back = Instant::now();
    let entered_kernel = !matches!(outcome, Outcome::Kicked | Outcome::Ended(_));
    policy.stint_ended(before.cr3, started.elapsed(), entered_kernel);
    let t = &mut m.translator;
    // The XSAVE image stays in KVM until translated code touches it (`Pause::ExtendedState`).
    let resume = |t: &mut Translator, s: GuestState| {
        *t.state_mut() = s;
        t.set_extended_state_stale(true);
        t.set_user_exit(true);
    };
    match outcome {
        Outcome::Kicked => {
            *stats.causes.entry(Cause::Kick).or_default() += 1;
            stats.kicked_at = Some(Instant::now());
            resume(t, user.user_state(&before, None));
        }
        Outcome::Ended(end) => {
            resume(t, user.user_state(&before, None));
            return Ok(Some(end));
        }
        Outcome::Syscall { rsp } => {
            *stats.causes.entry(Cause::Syscall).or_default() += 1;
            let mut s = user.user_state(&before, None);
            s.gpr[4] = rsp;
            // RCX holds the next instruction, R11 RFLAGS as the CPU saved them; the translator
            // performs the rest of the instruction against the guest's STAR/LSTAR/SFMASK.
            let next = s.gpr[1];
            s.rip = next;
            s.rflags = user_vcpu::merge_flags(s.gpr[11], before.rflags);
            resume(t, s);
            let state = t.state_mut();
            if let Err(exc) = hbt_translator::system::transfer::syscall(state, next) {
                state.rip = next.wrapping_sub(2);
                deliver(t, Event::Exception(exc))?;
            }
        }
        Outcome::Fault(frame, exc) => {
            *stats.causes.entry(Cause::PageFault).or_default() += 1;
            user.faulted_at = exc.address.map(|va| (before.cr3, va));
            resume(t, user.user_state(&before, Some(&frame)));
            deliver(t, Event::Exception(exc))?;
        }
        Outcome::Gate(3, frame) => {
            // int3 (kvm_pvm enters the DPL-0 gate from CPL3): RIP is after it.
            *stats.causes.entry(Cause::Exception(3)).or_default() += 1;
            resume(t, user.user_state(&before, Some(&frame)));
            deliver(
                t,
                Event::Software {
                    vector: 3,
                    at: frame.rip.wrapping_sub(1),
                },
            )?;
        }
        Outcome::Gate(vector, frame) => {
            *stats.causes.entry(Cause::Exception(vector)).or_default() += 1;
            resume(t, user.user_state(&before, Some(&frame)));
            stats.replays += 1;
            return replay(m, user);
        }
        Outcome::Replay(frame) => {
            // No frame: KVM's emulator gave up on the instruction (no fault was delivered).
            let cause = if frame.is_some() {
                Cause::PageFault
            } else {
                Cause::EmulationFailure
            };
            *stats.causes.entry(cause).or_default() += 1;
            resume(t, user.user_state(&before, frame.as_ref()));
            stats.replays += 1;
            return replay(m, user);
        }
    }
    stats.switching += back.elapsed();
    Ok(None)
}

/// How a stint ended.
enum Outcome {
    Kicked,
    Syscall {
        rsp: u64,
    },
    /// A device asked to end the run.
    Ended(End),
    /// A page fault the translator's walk raises.
    Fault(host_region::Frame, GuestException),
    /// A gate other than #PF: the translator re-runs the instruction.
    Gate(u8, host_region::Frame),
    /// A page fault the guest's tables allowed twice in a row, or one without an address, or
    /// (no frame: at KVM's RIP) an instruction KVM's emulator gave up on: the translator runs it.
    Replay(Option<host_region::Frame>),
}

fn deliver(t: &mut Translator, event: Event) -> Result<()> {
    match t.deliver_event(event).map_err(|e| anyhow::anyhow!("translator: {e}"))? {
        None => Ok(()),
        Some(Exit::TripleFault(e)) => bail!("guest triple fault (a fault while delivering {e} as a double fault)"),
        Some(other) => bail!("delivering {event:?} ended with {other:?}"),
    }
}

/// Runs the instruction at the user RIP in the translator (one step): it raises what the
/// guest's own tables make of it, or completes.
fn replay(m: &mut Machine, user: &mut UserVcpu) -> Result<Option<End>> {
    m.translator.set_user_exit(false);
    m.translator.set_single_step(true);
    let result = loop {
        match bt::run_loop(&mut m.translator, &mut m.platform) {
            Ok(Pause::ExtendedState) => {
                if let Err(e) = fetch_extended_state(m, user) {
                    break Err(e);
                }
            }
            other => break other,
        }
    };
    m.translator.set_single_step(false);
    m.translator.set_user_exit(true);
    match result? {
        Pause::Debugger(DebugStop::Ended(end)) => Ok(Some(end)),
        _ => Ok(None),
    }
}

/// Translated code is about to touch the extended state that KVM still holds: read it out.
fn fetch_extended_state(m: &mut Machine, user: &mut UserVcpu) -> Result<()> {
    user.fetch_extended_state(&mut m.translator.state_mut().xsave.0)?;
    m.translator.set_extended_state_stale(false);
    Ok(())
}

fn report(
    s: &HybridStats,
    user: &UserVcpu,
    policy: &Policy,
    total: Duration,
) -> (Vec<String>, serde_json::Map<String, serde_json::Value>) {
    let causes = || s.causes.iter().map(|(c, n)| (c.to_string(), *n));
    let t = user.tables.stats;
    let mut lines = vec![
        format!(
            "  hybrid: {:.6} s of {:.6} s in KVM running user code, the rest in the translator; {} stints under KVM, {} user stretches left to the translator ({} of them 32-bit code, {} with TF, DR7 breakpoints or CR4.TSD)",
            s.in_kvm.as_secs_f64(),
            total.as_secs_f64(),
            s.stints,
            s.translator_user_stretches,
            s.compat_stretches,
            s.translator_only_stretches
        ),
        format!(
            "  hybrid: {:.6} s moving state into and out of KVM ({:.1} µs per stint; {} XSAVE images given to KVM, {} read out of it when translated code touched them)",
            s.switching.as_secs_f64(),
            s.switching.as_secs_f64() * 1e6 / s.stints.max(1) as f64,
            user.stats.xsave_loads,
            user.stats.xsave_fetches,
        ),
        format!("  hybrid: user code left KVM by cause: {}", fmt_counts(causes())),
        format!(
            "  hybrid: {:.1} µs on average from an interrupt's kick to user code under KVM again",
            s.kick_to_stint.as_secs_f64() * 1e6 / s.causes.get(&Cause::Kick).copied().unwrap_or(0).max(1) as f64
        ),
        format!(
            "  hybrid: {} instructions re-run in the translator ({} page faults KVM reported without an address, {} instructions KVM's emulator gave up on); page tables for KVM: {} built, {} kept after checking them against the guest's ({} checks, {:.1} µs each), {} widened in place, {} slot resets, {} frames in use",
            s.replays,
            s.unreported_cr2,
            s.emulation_failures,
            t.builds,
            t.kept,
            t.checks,
            t.check_time.as_secs_f64() * 1e6 / t.checks.max(1) as f64,
            t.widened,
            t.slot_resets,
            user.tables.frames_in_use()
        ),
        format!("  hybrid policy: {}", policy.describe()),
    ];
    lines.extend(policy.busiest(4).into_iter().map(|l| format!("    {l}")));
    let mut map = serde_json::Map::new();
    map.insert(
        "hybrid".into(),
        serde_json::json!({
            "seconds_in_kvm": s.in_kvm.as_secs_f64(),
            "seconds_switching": s.switching.as_secs_f64(),
            "xsave_images_loaded": user.stats.xsave_loads,
            "xsave_images_fetched": user.stats.xsave_fetches,
            "stints": s.stints,
            "translator_user_stretches": s.translator_user_stretches,
            "compat_stretches": s.compat_stretches,
            "translator_only_stretches": s.translator_only_stretches,
            "exits_by_cause": causes().collect::<BTreeMap<_, _>>(),
            "replays": s.replays,
            "page_faults_without_address": s.unreported_cr2,
            "emulation_failures": s.emulation_failures,
            "tables_built": t.builds,
            "tables_kept": t.kept,
            "table_checks": t.checks,
            "seconds_checking_tables": t.check_time.as_secs_f64(),
            "tables_widened": t.widened,
            "slot_resets": t.slot_resets,
            "policy": policy.json(),
        }),
    );
    (lines, map)
}
