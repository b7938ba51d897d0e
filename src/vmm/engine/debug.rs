//! The engine interface a debugger drives (`vmm/gdb/`, `hbt run --gdb`): the guest's state and
//! memory while it is stopped, breakpoints, and running until something the debugger must
//! hear about. `--accel bt` implements it (`bt/debug.rs`) over the translator's breakpoints
//! and single-step (`translator/src/engine/debug.rs`); an engine that runs stretches of the
//! guest elsewhere (the hybrid engine, under KVM) implements the same calls.
//!
//! The CPU state is the translator's [`GuestState`]: the one complete x86-64 state hbt has
//! (GPRs, RIP, RFLAGS with the virtual IF/IOPL, selectors, bases, control registers, the XSAVE
//! image), which every engine converts to and from.

use super::End;
use anyhow::Result;
use hbt_translator::GuestState;
use std::collections::BTreeSet;

/// How the debugger lets the guest go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// Until a breakpoint, the debugger's attention request (`stop::request_attention`), or
    /// the end of the run.
    Continue,
    /// One instruction (an exception it raises is delivered, and the step ends at the
    /// handler's first instruction); external interrupts are held pending meanwhile.
    Step,
}

/// Why the guest stopped for the debugger.
#[derive(Debug)]
pub enum DebugStop {
    /// Before the instruction at a breakpoint (RIP is at it; it has not run).
    Breakpoint,
    /// After one step.
    Stepped,
    /// The debugger asked for the guest (`stop::request_attention`).
    Attention,
    /// The run is over (the guest's exit port, a reset, `--timeout`, a signal to hbt…).
    Ended(End),
}

/// A guest machine stopped under a debugger. Memory is accessed by guest virtual address,
/// through the guest's current page tables, with no accessed/dirty side effects and no
/// permission checks (as a debugger expects: kernel text is writable, user pages readable
/// from the kernel).
pub trait Debuggee {
    fn state(&self) -> &GuestState;
    /// The caller keeps the state loadable (e.g. an MXCSR without reserved bits, XSAVE
    /// components within XCR0) and leaves paging and segment state alone.
    fn state_mut(&mut self) -> &mut GuestState;
    /// Reads guest virtual memory into `buf`: the number of bytes read before the first one
    /// that is not mapped to RAM (device memory is never touched by a debugger read).
    fn read_memory(&mut self, va: u64, buf: &mut [u8]) -> usize;
    /// Writes guest virtual memory (translations of code it overwrites are dropped): the number
    /// of bytes written before the first one that is not mapped to RAM.
    fn write_memory(&mut self, va: u64, data: &[u8]) -> usize;
    /// Makes `wanted` the set of breakpoints (guest virtual addresses).
    fn set_breakpoints(&mut self, wanted: &BTreeSet<u64>);
    /// Lets the guest run. Resumed from the breakpoint it last stopped at (RIP unchanged),
    /// that breakpoint does not stop it again before the instruction there has run; any other
    /// breakpoint at RIP stops it at once. Errors end the machine (a triple fault, an engine failure); the guest state is left as
    /// it was when it happened, for the debugger to look at.
    fn resume(&mut self, how: Resume) -> Result<DebugStop>;
}
