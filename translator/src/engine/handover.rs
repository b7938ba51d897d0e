//! What an embedder that runs some of the guest's code elsewhere needs from the engine (the
//! hybrid VMM runs guest user code under KVM and hands it back here at every kernel entry):
//!
//! - **user-mode exit** ([`Translator::set_user_exit`]): `run` returns [`Exit::UserMode`] at the
//!   first block boundary after the guest entered CPL3 (`sysretq`, `iretq`…), once no interrupt
//!   is waiting to be taken there, so the embedder can move the state out;
//! - **kernel-mode exit** ([`Translator::set_kernel_exit`]): `run` returns [`Exit::KernelMode`]
//!   when user code the engine ran enters the kernel, so the embedder can time user stretches;
//! - **the invalidation generation** ([`Translator::invalidation_generation`]): bumped whenever
//!   the guest invalidated translations (CR3/CR4/CR0 writes, INVLPG, INVPCID), so a copy of its
//!   page tables made elsewhere knows it may be stale — the guest's TLB semantics, which is all
//!   an OS relies on;
//! - **pages that gained translated code** ([`Translator::take_new_code_pages`]): code running
//!   elsewhere must not write them without the engine hearing of it (the embedder maps them
//!   read-only there and reports writes with [`Translator::invalidate_range`]);
//! - **events from outside** ([`Translator::deliver_event`]): an exception or interrupt the
//!   other engine saw, delivered through the guest's IDT as if it had happened here;
//! - **extended state left elsewhere** ([`Translator::set_extended_state_handover`],
//!   [`Translator::set_extended_state_stale`]): the embedder may hand back a state whose XSAVE
//!   image is out of date — the live one is still where the user code ran — and the engine
//!   returns [`Exit::ExtendedStateNeeded`] before any instruction touches it (a check at the
//!   start of each block that does, and before each such instruction the engine performs).
//!   Code that never touches it — a guest kernel's timer tick, most system calls — runs
//!   without the image being read out at all.

use super::*;
use crate::system::delivery::Event;

impl Translator {
    /// Turns the user-mode exit on or off (see the module comment). While it is on, pages that
    /// gain translated code are also logged for [`Translator::take_new_code_pages`]. Turning it
    /// on makes the next block boundary at CPL3 count as an entry to user mode (the embedder
    /// handed back a state at CPL3 and wants it again unless an interrupt is taken first).
    pub fn set_user_exit(&mut self, on: bool) {
        self.user_exit = on;
        if on {
            self.code_cpl = None;
        }
    }

    /// Whether the guest state may leave the engine now: no instruction is half done (a split
    /// access's bounce buffer or a device access mapped in the TLB, a one-off step pending).
    /// `run` returning `Interrupted` can stop between those; the user- and kernel-mode exits
    /// never do.
    pub fn at_clean_boundary(&self) -> bool {
        self.bounce.is_none() && self.mmio.is_none() && self.one_step.is_none()
    }

    /// Makes every translation that touches the extended state check first that it is here
    /// (see the module comment); drops the translations made with the other setting.
    pub fn set_extended_state_handover(&mut self, on: bool) {
        if on != self.extended_state_handover {
            self.flush();
            self.extended_state_handover = on;
        }
    }

    /// Marks the guest's extended state (`state().xsave`) out of date, or up to date again once
    /// the embedder has put the live one there. Only with the handover on (the mark would go
    /// unchecked otherwise).
    pub fn set_extended_state_stale(&mut self, stale: bool) {
        debug_assert!(self.extended_state_handover || !stale);
        self.ctx.get_mut().extended_state_stale = stale as u64;
    }

    /// Whether `state().xsave` is out of date (see [`Translator::set_extended_state_stale`]).
    pub fn extended_state_stale(&self) -> bool {
        self.ctx.get().extended_state_stale != 0
    }

    /// Turns the kernel-mode exit on or off (see the module comment).
    pub fn set_kernel_exit(&mut self, on: bool) {
        self.kernel_exit = on;
    }

    /// How many times the guest has invalidated translations so far.
    pub fn invalidation_generation(&self) -> u64 {
        self.invalidations
    }

    /// Guest-physical pages that gained translated code since the last call (logged only while
    /// the user-mode exit is on: the embedder calls this between its runs).
    pub fn take_new_code_pages(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.new_code_pages)
    }

    /// Whether guest-physical page `page` holds translated code.
    pub fn has_code_on_page(&self, page: u64) -> bool {
        self.code_pages.contains_key(&(page & !(PAGE - 1)))
    }

    /// Delivers `event` through the guest's IDT from the current state (system mode), as the
    /// dispatcher does for events met here. `Some(exit)`: the machine cannot go on (a triple
    /// fault).
    pub fn deliver_event(&mut self, event: Event) -> Result<Option<Exit>, TranslateError> {
        if !self.system {
            return Err(TranslateError::Host("events are delivered only in system mode".into()));
        }
        self.deliver(event)
    }
}
