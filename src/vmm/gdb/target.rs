//! The gdbstub `Target`: gdb's requests (registers, memory, breakpoints, continue/step) as
//! calls on a stopped [`Debuggee`]. Nothing here runs the guest: `continue` and `step` only
//! record how to resume, and the session loop (`mod.rs`) runs it.
//!
//! Breakpoints are collected here and handed to the engine when the guest resumes: gdb removes
//! every breakpoint when the guest stops and inserts them again before it resumes (unless
//! `breakpoint always-inserted` is on), and the engine drops the translations around each one
//! it gains, so only real changes should reach it.

use super::arch::{self, HbtX86_64};
use crate::vmm::engine::debug::{Debuggee, Resume};
use gdbstub::arch::Registers as _;
use gdbstub::common::Signal;
use gdbstub::target::ext::base::single_register_access::{SingleRegisterAccess, SingleRegisterAccessOps};
use gdbstub::target::ext::base::singlethread::{
    SingleThreadBase, SingleThreadResume, SingleThreadResumeOps, SingleThreadSingleStep, SingleThreadSingleStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, SwBreakpoint, SwBreakpointOps,
};
use gdbstub::target::{Target, TargetError, TargetResult};
use std::collections::BTreeSet;

/// EFAULT: the address is not mapped to RAM.
const EFAULT: u8 = 14;
/// EPERM: a register write hbt refuses.
const EPERM: u8 = 1;

pub struct GdbTarget<'a> {
    pub(super) guest: &'a mut dyn Debuggee,
    /// Breakpoints gdb has inserted (`break`, `hbreak`: the same thing to the engine).
    software: BTreeSet<u64>,
    hardware: BTreeSet<u64>,
    /// How gdb last asked the guest to resume.
    pub(super) resume: Option<Resume>,
}

impl<'a> GdbTarget<'a> {
    pub fn new(guest: &'a mut dyn Debuggee) -> Self {
        GdbTarget {
            guest,
            software: BTreeSet::new(),
            hardware: BTreeSet::new(),
            resume: None,
        }
    }

    /// Every breakpoint gdb has inserted.
    pub fn breakpoints(&self) -> BTreeSet<u64> {
        self.software.union(&self.hardware).copied().collect()
    }
}

impl Target for GdbTarget<'_> {
    type Arch = HbtX86_64;
    /// Nothing gdb asks of a stopped guest fails fatally.
    type Error = std::convert::Infallible;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::SingleThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }
}

impl SingleThreadBase for GdbTarget<'_> {
    fn read_registers(&mut self, regs: &mut arch::Registers) -> TargetResult<(), Self> {
        *regs = arch::from_state(self.guest.state());
        Ok(())
    }

    fn write_registers(&mut self, regs: &arch::Registers) -> TargetResult<(), Self> {
        arch::apply(regs, self.guest.state_mut()).map_err(|_| TargetError::Errno(EPERM))
    }

    fn support_single_register_access(&mut self) -> Option<SingleRegisterAccessOps<'_, (), Self>> {
        Some(self)
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8]) -> TargetResult<usize, Self> {
        match self.guest.read_memory(start, data) {
            0 if !data.is_empty() => Err(TargetError::Errno(EFAULT)),
            n => Ok(n),
        }
    }

    fn write_addrs(&mut self, start: u64, data: &[u8]) -> TargetResult<(), Self> {
        if self.guest.write_memory(start, data) == data.len() {
            Ok(())
        } else {
            Err(TargetError::Errno(EFAULT))
        }
    }

    fn support_resume(&mut self) -> Option<SingleThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

// `p`/`P`: one register, as a slice of the whole register file.
impl SingleRegisterAccess<()> for GdbTarget<'_> {
    fn read_register(&mut self, _tid: (), reg: arch::RegId, buf: &mut [u8]) -> TargetResult<usize, Self> {
        let file = arch::serialize(&arch::from_state(self.guest.state()));
        let bytes = file
            .get(reg.offset()..reg.offset() + reg.size)
            .ok_or(TargetError::NonFatal)?;
        let n = bytes.len().min(buf.len());
        buf[..n].copy_from_slice(&bytes[..n]);
        Ok(n)
    }

    fn write_register(&mut self, _tid: (), reg: arch::RegId, val: &[u8]) -> TargetResult<(), Self> {
        let mut file = arch::serialize(&arch::from_state(self.guest.state()));
        let slot = file
            .get_mut(reg.offset()..reg.offset() + reg.size)
            .filter(|slot| slot.len() == val.len())
            .ok_or(TargetError::NonFatal)?;
        slot.copy_from_slice(val);
        let mut regs = arch::Registers::default();
        regs.gdb_deserialize(&file).map_err(|()| TargetError::NonFatal)?;
        self.write_registers(&regs)
    }
}

// A signal gdb asks to deliver with the resume is ignored: a machine has no signals (gdb's
// default for the SIGINT/SIGTRAP it reports is not to pass them anyway).
impl SingleThreadResume for GdbTarget<'_> {
    fn resume(&mut self, _signal: Option<Signal>) -> Result<(), Self::Error> {
        self.resume = Some(Resume::Continue);
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<SingleThreadSingleStepOps<'_, Self>> {
        Some(self)
    }
}

impl SingleThreadSingleStep for GdbTarget<'_> {
    fn step(&mut self, _signal: Option<Signal>) -> Result<(), Self::Error> {
        self.resume = Some(Resume::Step);
        Ok(())
    }
}

impl Breakpoints for GdbTarget<'_> {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }
}

impl SwBreakpoint for GdbTarget<'_> {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.software.insert(addr);
        Ok(true)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.software.remove(&addr);
        Ok(true)
    }
}

// `hbreak`: the translator's breakpoints need no debug registers, so a hardware breakpoint is
// the same as a software one (and is not limited to four).
impl HwBreakpoint for GdbTarget<'_> {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.hardware.insert(addr);
        Ok(true)
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.hardware.remove(&addr);
        Ok(true)
    }
}
