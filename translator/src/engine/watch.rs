//! The guest's own hardware breakpoints: DR0–DR3 enabled in DR7 — what a debugger inside the
//! guest sets through `ptrace(PTRACE_POKEUSER)` for gdb's `watch` and `hbreak`.
//!
//! **Data breakpoints** (R/W 01: writes; 11: reads and writes). The CPU checks every data
//! access against the enabled ranges and raises a #DB trap after the instruction, DR6.B0–B3
//! naming the breakpoints hit. Here, a page that holds a watched byte never enters the
//! soft-MMU TLB, so every access translated code makes to it misses, and the miss path — which
//! then runs that one instruction against a bounce buffer — records the hit (`softmmu.rs`); the
//! instructions the engine performs record theirs as they access memory (`memory.rs`). When the
//! instruction has completed without raising or delivering an event, the dispatcher sets DR6's
//! bits and delivers #DB (`system.rs` `debug_trap`).
//!
//! **Instruction breakpoints** (R/W 00). The CPU raises a #DB fault before executing an
//! instruction whose first byte is at an enabled address, unless RFLAGS.RF is set (a handler
//! resuming at the breakpoint sets it; the instruction then clears it). While one is enabled,
//! every block is a single instruction and the dispatcher checks each RIP (`system.rs`
//! `instruction_breakpoint`): slow, but only while a debugger has one set.
//!
//! The engine follows DR0–DR3 and DR7 as the guest changes them (Linux loads them when it
//! switches to a traced thread), dropping the TLB each time. Not modelled: I/O breakpoints
//! (R/W 10), which never fire; a repeated string instruction traps once it has finished, not
//! after the iteration that hit (the CPU stops there with RIP still at the instruction).

use crate::host::pages::PAGE;
use crate::mmu::Access;

/// One enabled data breakpoint: the bytes it watches and whether reads hit it too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Watched {
    start: u64,
    len: u64,
    reads: bool,
}

/// The enabled breakpoints of DR0–DR3 under DR7, by number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct GuestBreakpoints {
    watched: [Option<Watched>; 4],
    /// Instruction breakpoints: the linear address of an instruction's first byte.
    instructions: [Option<u64>; 4],
    /// DR0–DR3 and DR7 as they were decoded.
    registers: [u64; 5],
}

impl GuestBreakpoints {
    /// Decodes DR0–DR3 and DR7 (`dr`): a breakpoint is enabled by its L or G bit; R/W 00 is an
    /// instruction breakpoint, 01 watches writes, 11 reads and writes; LEN 00/01/11/10 is
    /// 1/2/4/8 bytes, at the address with its low bits cleared (SDM Vol. 3 §18.2.5: the CPU
    /// ignores them).
    pub(super) fn decode(dr: &[u64; 8]) -> GuestBreakpoints {
        let dr7 = dr[7];
        let enabled = |n: usize| dr7 >> (2 * n) & 3 != 0;
        let rw = |n: usize| dr7 >> (16 + 4 * n) & 3;
        let watched = std::array::from_fn(|n| {
            let len = match dr7 >> (18 + 4 * n) & 3 {
                0 => 1,
                1 => 2,
                2 => 8,
                _ => 4,
            };
            (enabled(n) && (rw(n) == 1 || rw(n) == 3)).then_some(Watched {
                start: dr[n] & !(len - 1),
                len,
                reads: rw(n) == 3,
            })
        });
        let instructions = std::array::from_fn(|n| (enabled(n) && rw(n) == 0).then_some(dr[n]));
        GuestBreakpoints {
            watched,
            instructions,
            registers: [dr[0], dr[1], dr[2], dr[3], dr7],
        }
    }

    /// Whether an instruction breakpoint is enabled (every block is then one instruction).
    pub(super) fn has_instruction_breakpoints(&self) -> bool {
        self.instructions.iter().any(Option::is_some)
    }

    /// DR6's B0–B3 bits for the instruction breakpoints at `rip`.
    pub(super) fn instruction_hits(&self, rip: u64) -> u64 {
        self.instructions
            .iter()
            .enumerate()
            .filter(|(_, at)| **at == Some(rip))
            .fold(0, |bits, (n, _)| bits | 1 << n)
    }

    /// Whether `dr` still holds the registers these were decoded from.
    pub(super) fn decoded_from(&self, dr: &[u64; 8]) -> bool {
        self.registers == [dr[0], dr[1], dr[2], dr[3], dr[7]]
    }

    pub(super) fn is_empty(&self) -> bool {
        self.watched.iter().all(Option::is_none) && !self.has_instruction_breakpoints()
    }

    /// Whether the page at `page_va` holds a watched byte (it must not enter the TLB).
    pub(super) fn watches_page(&self, page_va: u64) -> bool {
        let page = page_va & !(PAGE - 1);
        self.watched
            .iter()
            .flatten()
            .any(|w| w.start & !(PAGE - 1) <= page && page <= (w.start + w.len - 1) & !(PAGE - 1))
    }

    /// DR6's B0–B3 bits for an access of `len` bytes at `va`.
    pub(super) fn hits(&self, va: u64, len: u64, access: Access) -> u64 {
        let write = match access {
            Access::Write => true,
            Access::Read => false,
            _ => return 0,
        };
        let end = va.wrapping_add(len.max(1));
        self.watched
            .iter()
            .enumerate()
            .filter_map(|(n, w)| w.map(|w| (n, w)))
            .filter(|(_, w)| (write || w.reads) && va < w.start + w.len && w.start < end)
            .fold(0, |bits, (n, _)| bits | 1 << n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dr7_selects_instruction_write_and_read_write_breakpoints() {
        let mut dr = [0u64; 8];
        dr[0] = 0x1003; // 4 bytes, writes: 0x1000..0x1004 (low bits ignored)
        dr[1] = 0x2ffc; // 8 bytes, reads and writes: 0x2ff8..0x3000
        dr[2] = 0x5000; // an instruction breakpoint: not a data one
        dr[3] = 0x6000; // not enabled
        dr[7] = 0b01 | 0b10 << 2 | 0b01 << 4 | (0b01 | 0b11 << 2) << 16 | (0b11 | 0b10 << 2) << 20;
        let b = GuestBreakpoints::decode(&dr);
        assert!(b.decoded_from(&dr) && !b.is_empty());
        assert_eq!(b.hits(0x1002, 1, Access::Write), 0b1);
        assert_eq!(b.hits(0x1002, 1, Access::Read), 0, "DR0 watches writes only");
        assert_eq!(b.hits(0x0ffc, 4, Access::Write), 0, "ends just before");
        assert_eq!(b.hits(0x0ffd, 4, Access::Write), 0b1, "overlaps by one byte");
        assert_eq!(b.hits(0x2ff0, 16, Access::Read), 0b10);
        assert_eq!(b.hits(0x5000, 4, Access::Write), 0, "DR2 is an instruction breakpoint");
        assert_eq!(b.hits(0x6000, 4, Access::Write), 0, "DR3 is not enabled");
        assert_eq!(b.hits(0x1000, 4, Access::Fetch), 0);
        assert!(b.watches_page(0x1000) && b.watches_page(0x2000) && !b.watches_page(0x3000));
        assert!(!b.watches_page(0x5000));
        assert!(b.has_instruction_breakpoints());
        assert_eq!(b.instruction_hits(0x5000), 0b100);
        assert_eq!(b.instruction_hits(0x1000), 0, "DR0 is a data breakpoint");
        assert!(GuestBreakpoints::decode(&[0; 8]).is_empty());
    }
}
