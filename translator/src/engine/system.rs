//! The engine in system mode (`Config::system`): the instructions it performs through
//! `crate::system`, exceptions and interrupts delivered through the guest's IDT instead of
//! being returned, the interrupt window at block boundaries, and the translations that a change
//! of privilege level or of the guest's page tables makes stale.
//!
//! What is keyed how (this first version errs on the side of flushing):
//! - blocks are keyed by guest virtual RIP *and* CPL (`cache::block_key`), so code translated at
//!   CPL0 never runs at CPL3;
//! - the inline TLBs and the indirect-branch table are dropped when the CPL changes;
//! - a write to CR3, CR4 or CR0.WP/PG and `invlpg` drop every translation, blocks included
//!   (keying blocks by guest physical page, so address-space switches keep them, is next).

use super::*;
use crate::system::delivery::{self, Event, Undeliverable};
use crate::system::{self as sys, Effects, Next};

impl Translator {
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
        if effects.flush_tlb {
            // Guest translations changed: nothing derived from them survives (see the file
            // comment). The caller returns to the dispatcher before anything else runs.
            self.flush();
        }
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
        if let Event::Exception(e) = event {
            *self.stats.exceptions.entry(e.vector).or_default() += 1;
        } else if let Event::External(v) = event {
            *self.stats.interrupts.entry(v).or_default() += 1;
        }
        let (result, written) = self.with_memory(false, |state, mem| delivery::deliver(state, mem, event));
        for page in written {
            self.invalidate_phys_page(page);
        }
        match result {
            Ok(()) => Ok(None),
            Err(Undeliverable::TripleFault(e)) => Ok(Some(Exit::TripleFault(e))),
            Err(Undeliverable::Unsupported(why)) => Err(TranslateError::Host(why)),
        }
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
    pub(super) fn system_boundary(&mut self, platform: &mut dyn Platform) -> Result<Option<Exit>, TranslateError> {
        let state = &mut self.ctx.get_mut().state;
        let shadow = std::mem::take(&mut state.sys.interrupt_shadow);
        let cpl = state.cpl;
        if self.code_cpl != Some(cpl) {
            self.code_cpl = Some(cpl);
            let empty = self.glue.ibl_empty;
            let ctx = self.ctx.get_mut();
            ctx.flush_tlb();
            ctx.flush_ibl(empty);
        }
        let state = &self.ctx.get().state;
        if !shadow && state.rflags & crate::state::flags::IF != 0 && platform.interrupt_pending() {
            if let Some(v) = platform.acknowledge_interrupt() {
                return self.deliver(Event::External(v));
            }
        }
        Ok(None)
    }
}
