//! `--accel bt` under a debugger: the [`Debuggee`] calls over the translator (its breakpoints
//! and single-step, `translator/src/engine/debug.rs`), the soft-MMU's debugger page walk and
//! the run loop.

use super::{run_loop, BtPlatform, Pause};
use crate::vmm::engine::debug::{DebugStop, Debuggee, Resume};
use anyhow::Result;
use hbt_translator::mmu::soft_mmu;
use hbt_translator::{GuestState, Translator};
use std::collections::BTreeSet;

const PAGE: u64 = 4096;

pub(super) struct BtDebuggee<'a> {
    t: &'a mut Translator,
    platform: &'a mut BtPlatform,
    /// The breakpoint the guest last stopped at (not yet run).
    stopped_at: Option<u64>,
}

impl<'a> BtDebuggee<'a> {
    pub(super) fn new(t: &'a mut Translator, platform: &'a mut BtPlatform) -> Self {
        BtDebuggee {
            t,
            platform,
            stopped_at: None,
        }
    }

    /// The host address of guest virtual `va` and how many bytes from it lie in the same page,
    /// if it maps to RAM.
    fn host(&self, va: u64) -> Option<(u64, u64, usize)> {
        let pa = soft_mmu::translate_for_debugger(&self.platform.ram, &self.t.state().paging(), va)?;
        let room = (PAGE - (pa & (PAGE - 1))) as usize;
        let host = self.platform.ram.host(pa, room as u64)?;
        Some((pa, host, room))
    }
}

impl Debuggee for BtDebuggee<'_> {
    fn state(&self) -> &GuestState {
        self.t.state()
    }

    fn state_mut(&mut self) -> &mut GuestState {
        self.t.state_mut()
    }

    fn read_memory(&mut self, va: u64, buf: &mut [u8]) -> usize {
        let mut done = 0;
        while done < buf.len() {
            let Some((_, host, room)) = self.host(va.wrapping_add(done as u64)) else {
                break;
            };
            let n = room.min(buf.len() - done);
            // SAFETY: `host..host+n` lies in guest RAM (checked by `GuestRam::host`), which
            // outlives the run; the guest is stopped, so nothing writes it meanwhile.
            unsafe { std::ptr::copy_nonoverlapping(host as *const u8, buf[done..].as_mut_ptr(), n) };
            done += n;
        }
        done
    }

    fn write_memory(&mut self, va: u64, data: &[u8]) -> usize {
        let mut done = 0;
        while done < data.len() {
            let Some((pa, _, room)) = self.host(va.wrapping_add(done as u64)) else {
                break;
            };
            let n = room.min(data.len() - done);
            if !self.platform.ram.write(pa, &data[done..done + n]) {
                break;
            }
            // Translations of code there are stale now.
            self.t.invalidate_range(pa, n as u64);
            done += n;
        }
        done
    }

    fn set_breakpoints(&mut self, wanted: &BTreeSet<u64>) {
        let stale: Vec<u64> = self.t.breakpoints().filter(|va| !wanted.contains(va)).collect();
        for va in stale {
            self.t.remove_breakpoint(va);
        }
        for &va in wanted {
            self.t.add_breakpoint(va);
        }
    }

    fn resume(&mut self, how: Resume) -> Result<DebugStop> {
        if self.stopped_at.take() == Some(self.t.state().rip) {
            self.t.skip_breakpoint_at_rip();
        }
        self.t.set_single_step(how == Resume::Step);
        let stop = run_loop(self.t, self.platform).and_then(|p| match p {
            Pause::Debugger(stop) => Ok(stop),
            Pause::UserMode | Pause::KernelMode | Pause::PolicyCheck | Pause::ExtendedState => {
                anyhow::bail!("the translator stopped for another engine under the debugger")
            }
        });
        self.t.set_single_step(false);
        if let Ok(DebugStop::Breakpoint) = stop {
            self.stopped_at = Some(self.t.state().rip);
        }
        stop
    }
}
