//! The engine in system mode (`Config::system`): the instructions it performs through
//! `crate::system`, exceptions and interrupts delivered through the guest's IDT instead of
//! being returned, the interrupt window at block boundaries, and the translations that a change
//! of privilege level or of the guest's page tables makes stale.
//!
//! What is keyed how (this first version errs on the side of flushing):
//! - blocks are keyed by guest virtual RIP *and* CPL (`cache::block_key`), so code translated at
//!   CPL0 never runs at CPL3;
//! - each CPL has its own inline TLBs and indirect-branch table (blocks reach only their
//!   level's), so a change of CPL flushes nothing;
//! - a write to CR3, CR4 or CR0.WP/PG drops the TLBs, the indirect-branch table and the links
//!   between blocks (`cache.rs`, `remap`; a CR3 write with CR4.PGE keeps the links into blocks
//!   whose code is global); each block is then revalidated when the dispatcher next looks it
//!   up: kept if its code pages still map to the physical pages it was translated from,
//!   retranslated otherwise. `invlpg` away from translated code drops only the TLBs
//!   (`invalidate_page`).

use super::*;
pub(super) use crate::system::delivery::Event;
use crate::system::delivery::{self, Undeliverable};
use crate::system::{self as sys, Effects, Invalidated, Next};

/// What happened at a block boundary in system mode.
pub(super) enum Boundary {
    Continue,
    /// An external interrupt was delivered: the guest continues at its handler, not where the
    /// last block was going (so that block's exit must not be chained to the handler).
    Delivered,
    Exit(Exit),
}

/// Taken before an instruction that may be followed by a debug trap — the guest's RFLAGS.TF is
/// set or it has data breakpoints: what decides whether one follows ([`Translator::debug_trap`]).
#[derive(Clone, Copy)]
pub(super) struct TrapCheck {
    cpl: crate::state::Cpl,
    events: u64,
    single_step: bool,
}

impl TrapCheck {
    /// The instruction started with RFLAGS.TF set.
    pub(super) fn single_step(&self) -> bool {
        self.single_step
    }
}

/// How many delivered events [`Translator::recent_events`] keeps.
pub const RECENT_EVENTS: usize = 32;

/// An exception or interrupt as it was delivered, with where the guest was (for reports of a
/// guest that went wrong: the last events before a triple fault or a hang).
#[derive(Clone, Copy, Debug)]
pub struct DeliveredEvent {
    pub event: Event,
    pub rip: u64,
    pub cs: u16,
    pub rsp: u64,
    pub gs_base: u64,
}

impl std::fmt::Display for DeliveredEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.event {
            Event::Exception(e) => {
                write!(f, "exception {e} (vector {}", e.vector)?;
                if let Some(code) = e.error_code {
                    write!(f, ", error code {code:#x}")?;
                }
                write!(f, ")")?;
            }
            Event::Software { vector, .. } => write!(f, "int {vector:#x}")?,
            Event::External(v) => write!(f, "interrupt vector {v}")?,
        }
        write!(
            f,
            " at rip={:#x} cs={:#x} rsp={:#x} gs_base={:#x}",
            self.rip, self.cs, self.rsp, self.gs_base
        )
    }
}

impl Translator {
    /// The last exceptions and interrupts delivered in system mode, oldest first.
    pub fn recent_events(&self) -> impl ExactSizeIterator<Item = &DeliveredEvent> {
        self.recent_events.iter()
    }

    /// Performs an instruction the engine runs itself in system mode.
    pub(super) fn execute_system(
        &mut self,
        instr: &iced_x86::Instruction,
        rule: Rule,
        platform: &mut dyn Platform,
    ) -> Result<Lookup, TranslateError> {
        let mut effects = Effects::default();
        let (result, written) = self.with_memory(true, |state, mem| {
            sys::execute(state, instr, rule, mem, platform, &mut effects)
        });
        for page in written {
            self.invalidate_phys_page(page);
        }
        if effects.unimplemented {
            *self
                .stats
                .unimplemented
                .entry(format!("{:?}", instr.mnemonic()).to_lowercase())
                .or_default() += 1;
        }
        // Guest translations changed: the TLBs and links go; blocks are revalidated against the
        // new mapping when next looked up (see the file comment). The caller returns to the
        // dispatcher before anything else runs.
        match effects.invalidated {
            Invalidated::Nothing => {}
            Invalidated::All => self.remap(false),
            Invalidated::NonGlobal => self.remap(true),
            Invalidated::Page(va) => self.invalidate_page(va),
        }
        // XSETBV: code translated for the old XCR0 narrows XSAVE-family masks to it (a kernel
        // setting XCR0 = x87|SSE|AVX then restoring a compacted AVX image got #GP from code
        // translated for x87|SSE: Linux 6.1's WARN in fpu__init_system_xstate).
        self.follow_guest_xcr0()?;
        let next = result.map_err(|why| TranslateError::Unsupported {
            rip: instr.ip(),
            text: instr.to_string(),
            code: format!("{:?}", instr.code()),
            bytes: format!("({why})"),
        })?;
        Ok(match next {
            Next::Continue => Lookup::Emulated,
            Next::Exit(exit) => Lookup::Exit(exit),
            Next::Deliver(event) => match self.deliver(event)? {
                None => Lookup::Emulated,
                Some(exit) => Lookup::Exit(exit),
            },
        })
    }

    /// Delivers `event` through the guest's IDT. `Some(exit)` when the machine cannot go on
    /// (a triple fault).
    pub(super) fn deliver(&mut self, event: Event) -> Result<Option<Exit>, TranslateError> {
        self.events_delivered += 1;
        if let Event::Exception(e) = event {
            *self.stats.exceptions.entry(e.vector).or_default() += 1;
        } else if let Event::External(v) = event {
            *self.stats.interrupts.entry(v).or_default() += 1;
        }
        let before = &self.ctx.get().state;
        let record = DeliveredEvent {
            event,
            rip: before.rip,
            cs: before.seg[1],
            rsp: before.gpr[crate::state::gpr::RSP],
            gs_base: before.gs_base,
        };
        if self.recent_events.len() == RECENT_EVENTS {
            self.recent_events.pop_front();
        }
        self.recent_events.push_back(record);
        let (result, written) = self.with_memory(false, |state, mem| delivery::deliver(state, mem, event));
        // The frame's stores are the CPU's, not an instruction's: no data breakpoint hits.
        self.watch_hits = 0;
        for page in written {
            self.invalidate_phys_page(page);
        }
        match result {
            Ok(()) => Ok(None),
            Err(Undeliverable::TripleFault(e)) => Ok(Some(Exit::TripleFault(e))),
            Err(Undeliverable::Unsupported(why)) => Err(TranslateError::Host(why)),
        }
    }

    /// Before an instruction is dispatched in system mode: Some when a debug trap may follow it
    /// ([`Self::debug_trap`]): the guest's RFLAGS.TF is set, or it has data breakpoints (first
    /// brought up to date with its debug registers: `watch.rs`).
    pub(super) fn trap_check(&mut self) -> Option<TrapCheck> {
        if !self.system {
            return None;
        }
        let dr = &self.ctx.get().state.sys.dr;
        if !self.guest_breakpoints.decoded_from(dr) {
            self.guest_breakpoints = watch::GuestBreakpoints::decode(dr);
            // Pages that hold a watched byte must not stay in the TLB.
            self.flush_tlb();
        }
        let state = &self.ctx.get().state;
        let single_step = state.rflags & crate::state::flags::TF != 0;
        (single_step || !self.guest_breakpoints.is_empty()).then_some(TrapCheck {
            cpl: state.cpl,
            events: self.events_delivered,
            single_step,
        })
    }

    /// After the instruction `check` was taken before retired: whether the CPU would raise a
    /// debug trap now — then DR6 has its bits set (BS for the single step, B0–B3 for the data
    /// breakpoints hit) and the caller delivers #DB. Either trap follows an instruction that
    /// completed without raising or delivering an event: an exception, `int n` and `int3` clear
    /// TF on their way into the handler. The single step also needs the privilege level
    /// unchanged: `syscall` clears TF through IA32_FMASK (Linux reports a step over a system
    /// call itself, on its way out). Not modelled: the one-instruction delay after
    /// `mov ss`/`pop ss`, a trap after `sti`'s interrupt window.
    pub(super) fn debug_trap(&mut self, check: TrapCheck) -> bool {
        let hits = std::mem::take(&mut self.watch_hits);
        let state = &mut self.ctx.get_mut().state;
        if self.events_delivered != check.events {
            return false;
        }
        const DR6_BS: u64 = 1 << 14;
        let step = if check.single_step && state.cpl == check.cpl {
            DR6_BS
        } else {
            0
        };
        let bits = step | hits & 0xf;
        state.sys.dr[6] |= bits;
        bits != 0
    }

    /// Before the instruction at `rip` runs, in system mode: whether an instruction breakpoint
    /// there raises its #DB fault (DR6's B0–B3 bits are then set). RFLAGS.RF set means the
    /// instruction resumes from one: no fault until it has retired, even if the engine
    /// restarts it meanwhile (a soft-MMU TLB miss), and RF is cleared.
    pub(super) fn instruction_breakpoint(&mut self, rip: u64) -> bool {
        if !self.guest_breakpoints.has_instruction_breakpoints() || self.resuming_at == Some(rip) {
            return false;
        }
        let state = &mut self.ctx.get_mut().state;
        if state.rflags & crate::state::flags::RF != 0 {
            state.rflags &= !crate::state::flags::RF;
            self.resuming_at = Some(rip);
            return false;
        }
        let bits = self.guest_breakpoints.instruction_hits(rip);
        state.sys.dr[6] |= bits;
        bits != 0
    }

    /// A guest exception met by the dispatcher: returned to the caller in user mode, delivered
    /// in system mode (`None`: go on).
    pub(super) fn guest_exception(&mut self, exc: GuestException) -> Result<Option<Exit>, TranslateError> {
        if self.system {
            self.deliver(Event::Exception(exc))
        } else {
            Ok(Some(Exit::Exception(exc)))
        }
    }

    /// An instruction without a rule in system mode: the guest gets #UD, as from a CPU without
    /// it, and its name is counted (what to implement next).
    pub(super) fn undefined_instruction(&mut self, code: &str) -> Result<Option<Exit>, TranslateError> {
        *self.stats.unimplemented.entry(code.to_string()).or_default() += 1;
        self.deliver(Event::Exception(GuestException::new(crate::exit::vector::UD)))
    }

    /// At a block boundary: takes a pending external interrupt when IF is set and no interrupt
    /// shadow is active (the shadow of `sti`/`mov ss` lasts until the next instruction), and
    /// drops CPL-specific translations after a privilege change.
    pub(super) fn system_boundary(&mut self, platform: &mut dyn Platform) -> Result<Boundary, TranslateError> {
        let state = &mut self.ctx.get_mut().state;
        let shadow = std::mem::take(&mut state.sys.interrupt_shadow);
        let cpl = state.cpl;
        let entered_user = self.code_cpl != Some(cpl) && cpl == crate::state::Cpl::User;
        let entered_kernel = self.code_cpl == Some(crate::state::Cpl::User) && cpl == crate::state::Cpl::Kernel;
        if self.code_cpl != Some(cpl) {
            // Nothing to flush: each privilege level has its own TLBs and indirect-branch
            // table (`context::level_set`).
            self.code_cpl = Some(cpl);
        }
        if entered_kernel && self.kernel_exit {
            return Ok(Boundary::Exit(Exit::KernelMode));
        }
        // The embedder runs user code elsewhere (`handover.rs`), once an interrupt that is
        // waiting has been taken here (that enters the kernel again).
        let user_exit = entered_user && self.user_exit && !shadow;
        // A one-off step (a split or device access, a self-modifying store…) is set up to run
        // as the very next instruction (a bounce buffer or device page is mapped in the TLB,
        // its page is writable): an interrupt now would run the handler in that state instead.
        let step_pending = self.bounce.is_some() || self.one_step.is_some();
        let state = &self.ctx.get().state;
        // A debugger's single step holds interrupts pending (`debug.rs`).
        let deliverable = !step_pending && !self.debug.single_step && state.rflags & crate::state::flags::IF != 0;
        if !deliverable || !platform.interrupt_pending() {
            return Ok(if user_exit && !step_pending {
                Boundary::Exit(Exit::UserMode)
            } else {
                Boundary::Continue
            });
        }
        if shadow {
            // `sti` (or `mov ss`) holds interrupts off for one instruction: run that one alone,
            // so the interrupt is taken right after it and not after the loop it may start.
            self.one_step = Some(super::OneStep {
                rip: state.rip,
                kept: true,
            });
        } else if let Some(v) = platform.acknowledge_interrupt() {
            return Ok(match self.deliver(Event::External(v))? {
                Some(exit) => Boundary::Exit(exit),
                None => Boundary::Delivered,
            });
        }
        Ok(Boundary::Continue)
    }
}
