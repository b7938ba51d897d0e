//! Soft-MMU TLB-miss sites: what a miss stub used to do in host code, kept as data.
//!
//! Every inline TLB lookup has a cold path for its miss. It used to be a stub that stored the
//! access's description and guest RIP into the context (four 12-byte immediate stores), put the
//! borrowed registers and the parked flags back (a load each, and a `popfq` through the flag
//! stack) and exited: ≈110 bytes and 11 instructions per memory access. A Linux boot emitted
//! 153,000 of them, 40% of its 42 MiB of code. Now the stub only saves the guest address, names
//! its [`MissSite`] and jumps to shared glue (3 instructions, 26 bytes), and the engine does the
//! rest from the site after the exit glue has saved the registers as they were
//! ([`MissSite::restore`]). The guest state comes out the same; the work moved from every
//! translation and the code cache to the miss itself, where a table lookup is nothing next to
//! the page walk that follows. (A boot's code went from 42.4 to 32.0 MiB; its time did not
//! measurably change: the stubs' stores were cheap to encode.)
//!
//! Site numbers index [`MissSites`], which lives as long as the code cache: a flush empties
//! both (a block invalidated before then leaves its sites unused).

use crate::context::{spill_index, Context};

/// A miss stub's description of its access.
#[derive(Clone, Copy, Debug)]
pub struct MissSite {
    /// `Context::miss_info` for the engine (size, access, alignment, window…).
    pub info: u64,
    /// The guest instruction that restarts after the miss.
    pub guest_rip: u64,
    /// Registers (by hardware number) whose guest value is in `Context::spill`.
    pub spilled: u16,
    /// Guest flags were pushed to `Context::flag_slot`.
    pub flags_saved: bool,
    /// The guest's RCX is in this register (by hardware number; the lookup borrowed RCX).
    pub parked_rcx: Option<u8>,
}

impl MissSite {
    /// Rebuilds the guest state at the site from what the exit glue saved (`ctx.state` holds the
    /// host registers and flags as the stub left them), as the old stub did before exiting:
    /// RCX from where it was parked, the borrowed registers from their spill slots, the flags
    /// from the flag stack; then the site's RIP and access description.
    pub fn restore(&self, ctx: &mut Context) {
        let gpr = &mut ctx.state.gpr;
        if let Some(p) = self.parked_rcx {
            gpr[1] = gpr[p as usize];
        }
        for (n, value) in gpr.iter_mut().enumerate() {
            if self.spilled & (1 << n) != 0 {
                *value = ctx.spill[spill_index(n)];
            }
        }
        if self.flags_saved {
            // The slot holds a `pushfq` image; the engine keeps only the bits the host holds
            // for the guest (`Translator::enter`).
            let slot = (ctx.flag_slot - ctx.flag_stack.as_ptr() as u64) / 8;
            ctx.state.rflags = ctx.flag_stack[slot as usize];
        }
        ctx.state.rip = self.guest_rip;
        ctx.miss_info = self.info;
    }
}

/// The sites of the code cache's miss stubs, by the number each stub stores.
#[derive(Default)]
pub struct MissSites(Vec<MissSite>);

impl MissSites {
    /// Records `site`; returns the number its stub stores.
    pub fn push(&mut self, site: MissSite) -> u32 {
        let n = self.0.len() as u32;
        self.0.push(site);
        n
    }

    pub fn get(&self, n: u32) -> Option<&MissSite> {
        self.0.get(n as usize)
    }

    /// Forgets every site (the code cache was flushed).
    pub fn clear(&mut self) {
        self.0.clear();
    }
}
