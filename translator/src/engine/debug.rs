//! Debugger support in the engine (the VMM's gdb stub drives it): breakpoints and single-step,
//! without writing anything into guest memory — an `int3` planted in guest code would be seen
//! by the guest (reads, checksums, self-modifying-code detection) and by every alias of the page.
//!
//! **Breakpoints** are guest virtual addresses, at any privilege level and in any address
//! space (as QEMU's). [`Translator::run`] returns [`Exit::Breakpoint`] when the dispatcher is
//! about to run code at one, before anything there has run. Translated code never runs past
//! one on its own:
//! - the block builder ends a block before a breakpoint (its address becomes the block's
//!   fall-through exit) and does not inline a callee that holds one (`block.rs`), so code at a
//!   breakpoint only ever starts a block;
//! - nothing enters a block at a breakpoint without the dispatcher: no exit is chained to it,
//!   and no indirect-branch table entry or return cache points at it (`engine/mod.rs`);
//! - adding a breakpoint drops every block whose code covers the address, with every link into
//!   those blocks, so translations made before it cannot run past it.
//!
//! Removing a breakpoint drops nothing: blocks split at it stay correct, and exits that were
//! left unchained are chained the next time they are taken.
//!
//! **Single-step** ([`Translator::set_single_step`]): every block is one uncached instruction,
//! nothing is chained, and `run` returns [`Exit::Stepped`] as soon as one guest instruction
//! has completed — or, in system mode, once the exception it raised (a fault, `int n`, #UD for
//! an instruction without a rule) was delivered: RIP is then at the handler's first
//! instruction, as QEMU's gdb stub leaves it. Instructions the engine restarts (a soft-MMU TLB
//! miss, a self-modifying store, a device access) are not counted until they complete.
//! External interrupts are held pending while stepping (QEMU's default, `SSTEP_NOIRQ`), so a
//! step runs the instruction at RIP rather than a timer's handler; they are taken at the first
//! boundary after stepping ends. A step over `hlt` returns [`Exit::Halt`] with RIP after it;
//! the embedder decides whether to wait for an interrupt.
//!
//! **Resuming** from a breakpoint: [`Translator::skip_breakpoint_at_rip`] lets the code at the
//! current RIP run even if a breakpoint is there (a debugger that continues or steps from the
//! breakpoint it stopped at, without removing it first), until an instruction completes or an
//! exception or interrupt takes the guest elsewhere. A loop back to the same address stops
//! there again.

use super::*;
use std::collections::BTreeSet;

/// The debugger's view of the engine: what `run` stops for.
#[derive(Default)]
pub(super) struct DebugState {
    /// Guest virtual addresses to stop before.
    pub(super) breakpoints: BTreeSet<u64>,
    pub(super) single_step: bool,
    /// Code at this address runs even if it is a breakpoint, until the guest moves (set by
    /// `skip_breakpoint_at_rip`; see `moved`).
    skip: Option<u64>,
}

impl DebugState {
    /// There is a breakpoint at `va` (code there must start a block and be reached only
    /// through the dispatcher).
    pub(super) fn is_breakpoint(&self, va: u64) -> bool {
        !self.breakpoints.is_empty() && self.breakpoints.contains(&va)
    }

    /// The dispatcher, about to run code at `rip`, must stop for the debugger.
    pub(super) fn stops_at(&mut self, rip: u64) -> bool {
        if self.skip.is_some_and(|skip| skip != rip) {
            self.skip = None;
        }
        self.is_breakpoint(rip) && self.skip != Some(rip)
    }

    /// An instruction completed, or an exception or interrupt took the guest elsewhere: a
    /// breakpoint skipped at the RIP it was resumed at counts again. (Until then, an
    /// instruction the engine restarts — a soft-MMU TLB miss, a device access — does not stop
    /// at the same breakpoint twice.)
    pub(super) fn moved(&mut self) {
        self.skip = None;
    }
}

impl Translator {
    /// Stops `run` before code at guest virtual address `va` runs ([`Exit::Breakpoint`]).
    /// Translations covering `va` are dropped. Returns false if it was already set.
    pub fn add_breakpoint(&mut self, va: u64) -> bool {
        if !self.debug.breakpoints.insert(va) {
            return false;
        }
        let covering: Vec<usize> = (0..self.blocks.len())
            .filter(|&i| {
                let b = &self.blocks[i];
                b.valid && b.span.0 <= va && va < b.span.1
            })
            .collect();
        for i in covering {
            self.invalidate_block(i);
        }
        // Identity strategy: an instruction the engine performs, remembered by address.
        self.emulated_at.remove(&va);
        true
    }

    /// Removes the breakpoint at `va`; false if there was none.
    pub fn remove_breakpoint(&mut self, va: u64) -> bool {
        self.debug.breakpoints.remove(&va)
    }

    /// The breakpoints set, in address order.
    pub fn breakpoints(&self) -> impl Iterator<Item = u64> + '_ {
        self.debug.breakpoints.iter().copied()
    }

    /// Turns single-stepping on or off (see the module comment).
    pub fn set_single_step(&mut self, on: bool) {
        self.debug.single_step = on;
    }

    pub fn single_step(&self) -> bool {
        self.debug.single_step
    }

    /// The code at the current guest RIP runs even if a breakpoint is set there, until the
    /// guest moves (resuming from the breakpoint the guest stopped at; see the module comment).
    pub fn skip_breakpoint_at_rip(&mut self) {
        self.debug.skip = Some(self.ctx.get().state.rip);
    }
}
