//! The guest's own data breakpoints: DR0–DR3 enabled in DR7 for writes or for reads and writes
//! — what a debugger inside the guest sets through `ptrace(PTRACE_POKEUSER)` for gdb's `watch`.
//!
//! The CPU checks every data access against the enabled ranges and raises a #DB trap after the
//! instruction, DR6.B0–B3 naming the breakpoints hit. Here, a page that holds a watched byte
//! never enters the soft-MMU TLB, so every access translated code makes to it misses, and the
//! miss path — which then runs that one instruction against a bounce buffer — records the hit
//! (`softmmu.rs`); the instructions the engine performs record theirs as they access memory
//! (`memory.rs`). When the instruction has completed without raising or delivering an event,
//! the dispatcher sets DR6's bits and delivers #DB (`system.rs` `debug_trap`). The engine
//! follows DR0–DR3 and DR7 as the guest changes them (Linux loads them when it switches to a
//! traced thread), dropping the TLB each time.
//!
//! Not modelled: instruction breakpoints (R/W = 00) and I/O breakpoints (R/W = 10), which never
//! fire; a repeated string instruction traps once it has finished, not after the iteration that
//! hit (the CPU stops there with RIP still at the instruction).

use crate::host::pages::PAGE;
use crate::mmu::Access;

/// One enabled data breakpoint: the bytes it watches and whether reads hit it too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Watched {
    start: u64,
    len: u64,
    reads: bool,
}

/// The enabled data breakpoints of DR0–DR3 under DR7, by number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct DataBreakpoints {
    watched: [Option<Watched>; 4],
    /// DR0–DR3 and DR7 as they were decoded.
    registers: [u64; 5],
}

impl DataBreakpoints {
    /// Decodes DR0–DR3 and DR7 (`dr`): a breakpoint is enabled by its L or G bit; R/W 01 watches
    /// writes, 11 reads and writes; LEN 00/01/11/10 is 1/2/4/8 bytes, at the address with its
    /// low bits cleared (SDM Vol. 3 §18.2.5: the CPU ignores them).
    pub(super) fn decode(dr: &[u64; 8]) -> DataBreakpoints {
        let dr7 = dr[7];
        let watched = std::array::from_fn(|n| {
            let enabled = dr7 >> (2 * n) & 3 != 0;
            let rw = dr7 >> (16 + 4 * n) & 3;
            let len = match dr7 >> (18 + 4 * n) & 3 {
                0 => 1,
                1 => 2,
                2 => 8,
                _ => 4,
            };
            (enabled && (rw == 1 || rw == 3)).then_some(Watched {
                start: dr[n] & !(len - 1),
                len,
                reads: rw == 3,
            })
        });
        DataBreakpoints {
            watched,
            registers: [dr[0], dr[1], dr[2], dr[3], dr7],
        }
    }

    /// Whether `dr` still holds the registers these were decoded from.
    pub(super) fn decoded_from(&self, dr: &[u64; 8]) -> bool {
        self.registers == [dr[0], dr[1], dr[2], dr[3], dr[7]]
    }

    pub(super) fn is_empty(&self) -> bool {
        self.watched.iter().all(Option::is_none)
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
    fn dr7_selects_write_and_read_write_breakpoints_by_length() {
        let mut dr = [0u64; 8];
        dr[0] = 0x1003; // 4 bytes, writes: 0x1000..0x1004 (low bits ignored)
        dr[1] = 0x2ffc; // 8 bytes, reads and writes: 0x2ff8..0x3000
        dr[2] = 0x5000; // an instruction breakpoint: not a data one
        dr[3] = 0x6000; // not enabled
        dr[7] = 0b01 | 0b10 << 2 | 0b01 << 4 | (0b01 | 0b11 << 2) << 16 | (0b11 | 0b10 << 2) << 20;
        let b = DataBreakpoints::decode(&dr);
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
        assert!(DataBreakpoints::decode(&[0; 8]).is_empty());
    }
}
