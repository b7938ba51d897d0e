//! The translator's per-vCPU context, reached from translated code through the host GS base.
//!
//! Translated code keeps every guest GPR in its host register, so it needs a way to reach
//! spill slots, the exit mailbox, the TLBs and the indirect-branch table without stealing a
//! register: a Linux process leaves GS unused, so the engine points the host GS base at this
//! struct while guest code runs and glue addresses it as `gs:[offset]`. Field offsets are
//! therefore part of the emitter's contract and are taken with `offset_of!`.

use crate::host::HUGE_PAGE;
use crate::state::GuestState;
use std::alloc::Layout;
use std::mem::offset_of;

/// Entries in each soft-MMU TLB (direct-mapped, indexed by the low 16 bits of the page
/// number, which the inline lookup takes with a flag-free `movzx r32, r16`). With 256 entries a
/// Linux boot took 0.8M TLB misses, most of them conflicts; with 65,536, 0.17M. The flushes stay
/// cheap because the slots in use are tracked (see [`Context::fill_tlb`]).
pub const TLB_ENTRIES: usize = 1 << 16;
/// Slots [`Context::fill_tlb`] lists as in use before it gives up and the flushes clear or scan
/// everything (a boot keeps ≈3,000 live).
const TLB_TRACKED: usize = 8192;
/// Slots listed as holding a non-global translation since the last CR3 write (a boot fills ≈6
/// between two).
const TLB_TRACKED_NONGLOBAL: usize = 1024;
/// Entries in the indirect-branch lookup table, indexed by the low 16 bits of the guest target
/// (a `movzx` computes that without touching flags).
pub const IBL_ENTRIES: usize = 1 << 16;
/// Tag of an empty TLB entry: no page's tag (its negated page number: 0, or above
/// 2^64 − 2^52) equals it.
pub const TLB_EMPTY: u64 = 1;
/// Tag of an empty indirect-branch slot: `lea rcx,[tag+target]` is zero only for the one
/// target [`IBL_EMPTY_TARGET`], and an empty slot's host address is the miss path, which
/// reports exactly that target. It is canonical on purpose: a non-canonical target then never
/// matches any slot and always takes the lookup's own miss path, which records the branch so
/// the engine can raise #GP at it (the CPU faults at the branch, not at the target).
pub const IBL_EMPTY_TARGET: u64 = 0x0000_7fff_ffff_f000;
pub const IBL_EMPTY_TAG: u64 = IBL_EMPTY_TARGET.wrapping_neg();
/// `miss_info` bit: the access is a store from an MMX register (on Intel, a faulting one has
/// already reset FSW.TOP: `cpu::vendor::Quirk::FaultingMmxStoreResetsTop`).
pub const MISS_MMX_STORE: u64 = 1 << 26;
/// `miss_info` bits 27..30: log2 of the alignment the instruction requires (#GP(0) before any
/// page walk when the address is not aligned: the XSAVE family's 64 bytes, SSE operands'
/// 16 or 32; `emit/alignment.rs`); 0 = none.
pub const MISS_ALIGN_SHIFT: u64 = 27;
/// `miss_info` bit: a misaligned operand is #GP(0) even with alignment checking on (SSE
/// operands); without it, an image not even 4-byte aligned raises #AC first (FXSAVE/XSAVE).
pub const MISS_ALIGN_PLAIN_GP: u64 = 1 << 31;
/// `miss_info` bit: the guest's MXCSR.MM (AMD's misaligned SSE mode) lifts the requirement.
pub const MISS_ALIGN_WAIVED_BY_MM: u64 = 1 << 32;
/// `miss_info` bit: the access is `vcvtps2ph`'s store (a fault there leaves the conversion's
/// MXCSR flags behind: `emulate/f16c.rs`).
pub const MISS_F16C_STORE: u64 = 1 << 33;
/// `miss_info` bit: the access may touch only part of its operand — an EVEX access under an
/// opmask (`mmu::masked`), an XSAVE-family image (`XsaveLayout::touched_bytes`): a page
/// holding no byte it touches is not walked.
pub const MISS_PARTIAL: u64 = 1 << 34;
/// `miss_info` bits 36..39: log2 of the granule alignment checking (CPL3, CR0.AM, RFLAGS.AC)
/// holds the access to, #AC before any page walk when it is misaligned; 0 = unchecked
/// (`emit/alignment.rs`).
pub const MISS_AC_SHIFT: u64 = 36;
/// `miss_info` bit: the lookup of a window of accesses (`emit/window.rs`), not an access: its
/// miss never faults.
pub const MISS_WINDOW: u64 = 1 << 35;
/// `miss_info` bit: a loop window's entry check (`emit/loop_window.rs`) — not an access: the
/// guest RIP is the loop block's start, nothing of it run. Bits [`MISS_LOOP_KEY_SHIFT`].. hold
/// the page offset of the stream's first access (its `Translator::windowless` key).
pub const MISS_LOOP_WINDOW: u64 = 1 << 40;
pub const MISS_LOOP_KEY_SHIFT: u64 = 41;
/// `miss_info` bit (with [`MISS_WINDOW`]): a write window whose first access reads
/// (`emit/window.rs`): the TLB may take only a translation whose walk sets no accessed or
/// dirty bit, since the window's reads run before any of its stores.
pub const MISS_WINDOW_SETTLED: u64 = 1 << 53;
/// Slots of the small host stack glue uses for `pushfq`/`popfq` (never the guest stack).
const FLAG_STACK_SLOTS: usize = 16;

/// One soft-MMU TLB entry: the guest page number, negated — the inline lookup adds it to the
/// accessed page's number and hits on zero (`lea`/`jrcxz`, flags untouched), which a plain
/// page number would make it negate first, twice per access — and the value to add to a guest
/// virtual address to get the host address.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlbEntry {
    pub tag: u64,
    pub addend: u64,
}

impl TlbEntry {
    /// The guest page number it maps, if any.
    pub fn vpn(&self) -> Option<u64> {
        (self.tag != TLB_EMPTY).then(|| self.tag.wrapping_neg())
    }
}

/// Why translated code came back to the dispatcher.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// A block exit to a guest address with no chained successor (guest RIP).
    Branch = 1,
    /// The indirect-branch table had no entry for the guest RIP.
    IndirectMiss = 2,
    /// A soft-MMU TLB miss at `miss_va`; the instruction at the guest RIP restarts afterwards.
    TlbMiss = 3,
    /// The instruction at the guest RIP is performed by the engine.
    Emulate = 4,
    /// A host fault inside translated code, already mapped to a guest exception (`fault_*`).
    Fault = 5,
    /// The instruction at the guest RIP writes the page its own block came from (`fault_*` is
    /// not a guest exception): it runs from a fresh translation.
    SelfModify = 6,
    /// System mode: an inlined `sti` set IF while the interrupt controller's INTR line was up
    /// (`Translator::set_interrupt_line`); the guest RIP is the next instruction, inside
    /// `sti`'s shadow.
    InterruptWindow = 7,
    /// A block that reads or writes the guest's extended state was entered while that state
    /// is held elsewhere ([`Context::extended_state_stale`]); the guest RIP is the block's
    /// start, nothing of it has run.
    ExtendedState = 8,
}

/// Where each register (by hardware number) is spilled in [`Context::spill`]. The registers
/// glue borrows most — R11 and RCX at every indirect branch, then `BlockEmitter::pick`'s scratch
/// order — share the first cache line: a Golden Cove core commits two stores in a cycle only
/// when they go to one line (measured on Intel Sapphire Rapids: two 8-byte stores per loop
/// iteration take 2 cycles to two lines, 1 cycle to one line).
const SPILL_INDEX: [usize; 16] = [8, 1, 9, 5, 10, 6, 7, 11, 4, 3, 2, 0, 12, 13, 14, 15];

/// The [`Context::spill`] slot of hardware register `n`.
pub const fn spill_index(n: usize) -> usize {
    SPILL_INDEX[n]
}

/// The per-vCPU context. Allocated zeroed and 64-byte aligned (XSAVE needs it).
#[repr(C, align(64))]
pub struct Context {
    pub state: GuestState,
    /// Guest value of a register glue borrowed as scratch, at [`spill_index`] of its hardware
    /// register number.
    pub spill: [u64; 16],
    pub host_rsp: u64,
    pub host_mxcsr: u32,
    pub host_fcw: u16,
    pub entry_target: u64,
    pub exit_reason: u32,
    /// Address of the rel32 field of the block-exit jump that produced a `Branch` exit.
    pub exit_link: u64,
    pub miss_va: u64,
    /// Access size in the low 16 bits, [`crate::mmu::Access`] in bits 16..24, a stack access in
    /// bit 24, [`MISS_MMX_STORE`], [`MISS_ALIGN_SHIFT`], [`MISS_AC_SHIFT`] and the other bits.
    pub miss_info: u64,
    /// The number of the miss stub that exited: its
    /// [`MissSite`](crate::emit::miss_site::MissSite) gives `miss_info`, the guest RIP and
    /// where the borrowed registers are.
    pub miss_site: u64,
    pub rsp_save: u64,
    /// Top of `flag_stack` minus 8: where `pushfq` stored guest flags.
    pub flag_slot: u64,
    /// Top of `flag_stack`.
    pub flag_stack_top: u64,
    /// The constant 1: the mask operand of the indirect-branch lookup's last `pext`.
    pub one: u64,
    /// Set on an indirect-branch miss: the guest RIP of the branch and how far it moved RSP
    /// (a `ret` pops, a `call` pushes), so a non-canonical target can fault at the branch.
    pub branch_rip: u64,
    pub branch_rsp_delta: u64,
    /// System mode, while translated code runs: the guest RFLAGS bits the host cannot hold
    /// (IOPL, TF, NT, AC at CPL0, …; see `Translator::enter`), and IF apart from them as 0 or
    /// 0x200, so an inlined `cli` is one flag-free store and `pushfq` merges both with an `or`.
    pub virtual_flags: u64,
    pub virtual_if: u64,
    /// Nonzero while `state.xsave` is out of date because an embedder holds the live extended
    /// state (`Translator::set_extended_state_stale`): blocks that touch it exit first.
    pub extended_state_stale: u64,
    /// Nonzero while the guest's extended state is only in `state.xsave`, zero once the glue
    /// has loaded it into the host's registers: the lazy entry sets it (the eager one loads the
    /// state and clears it), the first block that touches the state then loads it
    /// (`Glue::load_extended_state`), and the exit saves the state only when it was loaded.
    pub extended_state_in_image: u64,
    /// Where `Glue::load_extended_state` returns to, and the guest RAX and RDX it borrows.
    pub extended_state_return: u64,
    pub extended_state_rax: u64,
    pub extended_state_rdx: u64,
    /// Entries into translated code that loaded the extended state (`Stats::extended_state_loads`).
    pub extended_state_loads: u64,
    /// Soft-MMU accesses served by the inline TLB, counted by translations made with
    /// `Translator::set_detailed_stats` (`--stats`).
    pub tlb_hits: u64,
    pub fault_vector: u32,
    pub fault_error_code: u32,
    pub fault_address: u64,
    pub flag_stack: [u64; FLAG_STACK_SLOTS],
    /// The soft-MMU TLBs, one set per privilege level (`KERNEL_SET`, `USER_SET`): translated
    /// code looks up the set of the level its block was translated for, and the engine fills
    /// the set of the level the guest runs at, so a change of privilege level (a system call,
    /// an interrupt from user mode, the return) flushes nothing — a CPL3 lookup can never hit
    /// a translation a CPL0 walk allowed. Flushes (CR3, INVLPG, CR4…) empty both.
    pub tlbs: [TlbSet; 2],
    /// The indirect-branch tables, one per privilege level (`KERNEL_SET`, `USER_SET`) and one
    /// for 32-bit code at CPL3 (`COMPAT_IBL_SET`, see [`ibl_set`]): a table holds host blocks
    /// translated for its level and mode.
    pub ibls: [IblTable; IBL_SETS],
}

/// One privilege level's indirect-branch table: per slot the negated guest target (see
/// [`IBL_EMPTY_TAG`]) and the host address to jump to.
#[repr(C)]
pub struct IblTable {
    pub tags: [u64; IBL_ENTRIES],
    pub hosts: [u64; IBL_ENTRIES],
}

/// Offsets glue uses (`gs:[OFF]`).
pub mod off {
    use super::*;
    pub const GPR: usize = offset_of!(Context, state) + offset_of!(GuestState, gpr);
    pub const RIP: usize = offset_of!(Context, state) + offset_of!(GuestState, rip);
    pub const RFLAGS: usize = offset_of!(Context, state) + offset_of!(GuestState, rflags);
    pub const FS_BASE: usize = offset_of!(Context, state) + offset_of!(GuestState, fs_base);
    pub const GS_BASE: usize = offset_of!(Context, state) + offset_of!(GuestState, gs_base);
    pub const KERNEL_GS_BASE: usize = offset_of!(Context, state) + offset_of!(GuestState, kernel_gs_base);
    pub const XSAVE: usize = offset_of!(Context, state) + offset_of!(GuestState, xsave);
    pub const XCR0: usize = offset_of!(Context, state) + offset_of!(GuestState, xcr0);
    pub const CR0: usize = offset_of!(Context, state) + offset_of!(GuestState, cr0);
    pub const CR2: usize = offset_of!(Context, state) + offset_of!(GuestState, cr2);
    pub const CR3: usize = offset_of!(Context, state) + offset_of!(GuestState, cr3);
    pub const CR4: usize = offset_of!(Context, state) + offset_of!(GuestState, cr4);
    pub const CR8: usize = offset_of!(Context, state) + offset_of!(GuestState, sys.cr8);
    /// The six selectors (u16 each, ES CS SS DS FS GS: `emulate::regs::sreg_index`).
    pub const SEG: usize = offset_of!(Context, state) + offset_of!(GuestState, seg);
    pub const TSC_AUX: usize = offset_of!(Context, state) + offset_of!(GuestState, sys.msr.tsc_aux);
    pub const SPILL: usize = offset_of!(Context, spill);
    pub const HOST_RSP: usize = offset_of!(Context, host_rsp);
    pub const HOST_MXCSR: usize = offset_of!(Context, host_mxcsr);
    pub const HOST_FCW: usize = offset_of!(Context, host_fcw);
    pub const ENTRY_TARGET: usize = offset_of!(Context, entry_target);
    pub const EXIT_REASON: usize = offset_of!(Context, exit_reason);
    pub const EXIT_LINK: usize = offset_of!(Context, exit_link);
    pub const MISS_VA: usize = offset_of!(Context, miss_va);
    pub const MISS_SITE: usize = offset_of!(Context, miss_site);
    pub const RSP_SAVE: usize = offset_of!(Context, rsp_save);
    pub const VIRTUAL_FLAGS: usize = offset_of!(Context, virtual_flags);
    pub const VIRTUAL_IF: usize = offset_of!(Context, virtual_if);
    pub const EXTENDED_STATE_STALE: usize = offset_of!(Context, extended_state_stale);
    pub const EXTENDED_STATE_IN_IMAGE: usize = offset_of!(Context, extended_state_in_image);
    pub const EXTENDED_STATE_RETURN: usize = offset_of!(Context, extended_state_return);
    pub const EXTENDED_STATE_RAX: usize = offset_of!(Context, extended_state_rax);
    pub const EXTENDED_STATE_RDX: usize = offset_of!(Context, extended_state_rdx);
    pub const EXTENDED_STATE_LOADS: usize = offset_of!(Context, extended_state_loads);
    pub const TLB_HITS: usize = offset_of!(Context, tlb_hits);
    pub const FLAG_SLOT: usize = offset_of!(Context, flag_slot);
    pub const FLAG_STACK_TOP: usize = offset_of!(Context, flag_stack_top);
    pub const ONE: usize = offset_of!(Context, one);
    pub const BRANCH_RIP: usize = offset_of!(Context, branch_rip);
    pub const BRANCH_RSP_DELTA: usize = offset_of!(Context, branch_rsp_delta);
    pub const FAULT_VECTOR: usize = offset_of!(Context, fault_vector);
    pub const FAULT_ERROR_CODE: usize = offset_of!(Context, fault_error_code);
    /// The read (or write) TLB of set `set` (`KERNEL_SET`, `USER_SET`).
    pub const fn tlb_read(set: usize) -> usize {
        offset_of!(Context, tlbs) + set * std::mem::size_of::<TlbSet>() + offset_of!(TlbSet, read)
    }
    pub const fn tlb_write(set: usize) -> usize {
        offset_of!(Context, tlbs) + set * std::mem::size_of::<TlbSet>() + offset_of!(TlbSet, write)
    }
    /// The tags (or hosts) of indirect-branch table `set`.
    pub const fn ibl_tags(set: usize) -> usize {
        offset_of!(Context, ibls) + set * std::mem::size_of::<IblTable>() + offset_of!(IblTable, tags)
    }
    pub const fn ibl_hosts(set: usize) -> usize {
        offset_of!(Context, ibls) + set * std::mem::size_of::<IblTable>() + offset_of!(IblTable, hosts)
    }
}

/// Owner of a heap-allocated [`Context`] (it is too large for the stack and must not move while
/// the host GS base points at it).
pub struct ContextBox {
    ptr: *mut Context,
    /// The mapping `ptr` lies in ([`ContextBox::MAPPED`] bytes).
    base: *mut u8,
}

impl ContextBox {
    /// Bytes mapped for a context: its size, plus room to start it on a 2 MiB boundary.
    const MAPPED: usize = std::mem::size_of::<Context>().next_multiple_of(4096) + HUGE_PAGE;

    pub fn new() -> Self {
        // Mapped rather than allocated, so that its TLB and indirect-branch tables (megabytes,
        // indexed by guest address bits: every lookup touches a different 4 KiB page) sit on
        // transparent huge pages: advised before anything touches them.
        let Some(base) = crate::host::map_anonymous(Self::MAPPED, libc::PROT_READ | libc::PROT_WRITE) else {
            std::alloc::handle_alloc_error(Layout::new::<Context>());
        };
        let ptr = (base as usize).next_multiple_of(HUGE_PAGE) as *mut Context;
        crate::host::advise_huge_pages(ptr as u64, std::mem::size_of::<Context>());
        let mut boxed = ContextBox { ptr, base };
        let ctx = boxed.get_mut();
        ctx.state = GuestState::default();
        ctx.flag_stack_top = &ctx.flag_stack[FLAG_STACK_SLOTS - 2] as *const u64 as u64;
        ctx.flag_slot = ctx.flag_stack_top - 8;
        ctx.one = 1;
        for set in &mut ctx.tlbs {
            set.slots_len = TLB_UNTRACKED; // all of it: the tables start zeroed, not empty
        }
        ctx.flush_tlb();
        for t in &mut ctx.ibls {
            t.tags.fill(IBL_EMPTY_TAG);
        }
        boxed
    }

    pub fn get(&self) -> &Context {
        // SAFETY: ptr points into the mapping `new` made (fresh, so zero-filled, and every field
        // of Context is plain data for which all-zero bytes are a valid value: Cpl::Kernel is 0),
        // 2 MiB-aligned (more than Context's alignment), and it lives as long as self.
        unsafe { &*self.ptr }
    }

    pub fn get_mut(&mut self) -> &mut Context {
        // SAFETY: as in `get`, and &mut self guarantees exclusive access.
        unsafe { &mut *self.ptr }
    }

    /// Raw pointer for the host GS base.
    pub fn as_ptr(&self) -> *mut Context {
        self.ptr
    }
}

impl Default for ContextBox {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ContextBox {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; nothing refers to the context any more.
        unsafe { libc::munmap(self.base as *mut libc::c_void, Self::MAPPED) };
    }
}

/// Which of the two TLBs an entry goes to (its global bit in `Context::tlb_flags`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlbKind {
    Read = 1,
    Write = 2,
}

const TLB_EMPTY_ENTRY: TlbEntry = TlbEntry {
    tag: TLB_EMPTY,
    addend: 0,
};
const SLOT_LISTED: u8 = 1 << 2;
const SLOT_LISTED_NONGLOBAL: u8 = 1 << 3;
/// A tracking list that overflowed.
const TLB_UNTRACKED: u32 = u32::MAX;

/// The set (of TLBs, of indirect-branch tables) kernel-mode (CPL0) translations use, and the
/// user-mode (CPL3) one: blocks are translated for one privilege level and reach only their
/// level's set, so a change of level flushes neither.
pub const KERNEL_SET: usize = 0;
pub const USER_SET: usize = 1;

/// The set of privilege level `cpl`.
pub fn level_set(cpl: crate::state::Cpl) -> usize {
    match cpl {
        crate::state::Cpl::Kernel => KERNEL_SET,
        crate::state::Cpl::User => USER_SET,
    }
}

/// The indirect-branch table of 32-bit code (compatibility mode, CPL3): its blocks are keyed
/// apart from 64-bit code at the same address (`Translator::block_key`), and the tables are
/// keyed by address alone, so they get a table of their own. (The TLBs are shared with 64-bit
/// CPL3 code: a page walk does not depend on the mode.)
pub const COMPAT_IBL_SET: usize = 2;
pub const IBL_SETS: usize = 3;

/// The indirect-branch table of code at `cpl`, 32-bit (`code32`) or not.
pub fn ibl_set(cpl: crate::state::Cpl, code32: bool) -> usize {
    if code32 {
        COMPAT_IBL_SET
    } else {
        level_set(cpl)
    }
}

/// One privilege level's soft-MMU TLB: read and write entries, direct-mapped, with the slots
/// in use tracked so flushes visit only those.
#[repr(C)]
pub struct TlbSet {
    pub read: [TlbEntry; TLB_ENTRIES],
    pub write: [TlbEntry; TLB_ENTRIES],
    /// Per TLB slot: bit 0/1 the read/write entry holds a global translation (kept by
    /// [`TlbSet::flush_nonglobal`]); [`SLOT_LISTED`] and [`SLOT_LISTED_NONGLOBAL`]: the slot
    /// is in `slots` / `nonglobal_slots`. Written only by [`TlbSet::fill`] and the flushes, so
    /// a slot refilled with a non-global translation never keeps a global bit.
    flags: [u8; TLB_ENTRIES],
    /// Slots that may hold an entry since the last full flush (`slots_len` of them), or
    /// `TLB_UNTRACKED`: too many, every slot must be considered.
    slots: [u16; TLB_TRACKED],
    slots_len: u32,
    /// Slots filled with a non-global translation since the last CR3 write (or `TLB_UNTRACKED`).
    nonglobal_slots: [u16; TLB_TRACKED_NONGLOBAL],
    nonglobal_len: u32,
    /// A bit per host page (its number modulo [`WRITE_FILTER_BITS`]) that a write entry filled
    /// since the last full flush may map: [`TlbSet::forget_write_host`] skips its scan of the
    /// write entries when the page's bit is clear. A page that gains translated code has
    /// rarely been written through this TLB (kernel text), and that scan — up to 8,192 slots
    /// per set for each new code page — was 4% of a Linux boot's translation time.
    write_filter: [u64; WRITE_FILTER_BITS / 64],
}

/// Bits of [`TlbSet::write_filter`].
const WRITE_FILTER_BITS: usize = 1 << 16;

impl TlbSet {
    /// Maps the page at guest virtual `page_va` to host address `host`; `global` translations
    /// survive [`TlbSet::flush_nonglobal`]. The slot is listed (once) so the flushes visit only
    /// slots in use.
    fn fill(&mut self, kind: TlbKind, page_va: u64, host: u64, global: bool) {
        let index = Context::tlb_index(page_va);
        let entry = TlbEntry {
            tag: (page_va >> 12).wrapping_neg(),
            addend: host.wrapping_sub(page_va),
        };
        match kind {
            TlbKind::Read => self.read[index] = entry,
            TlbKind::Write => {
                self.write[index] = entry;
                let bit = Self::write_filter_bit(host);
                self.write_filter[bit / 64] |= 1 << (bit % 64);
            }
        }
        let flags = &mut self.flags[index];
        if global {
            *flags |= kind as u8;
        } else {
            *flags &= !(kind as u8);
        }
        if *flags & SLOT_LISTED == 0 && self.slots_len != TLB_UNTRACKED {
            *flags |= SLOT_LISTED;
            if (self.slots_len as usize) < TLB_TRACKED {
                self.slots[self.slots_len as usize] = index as u16;
                self.slots_len += 1;
            } else {
                self.slots_len = TLB_UNTRACKED;
            }
        }
        let flags = &mut self.flags[index];
        if !global && *flags & SLOT_LISTED_NONGLOBAL == 0 && self.nonglobal_len != TLB_UNTRACKED {
            *flags |= SLOT_LISTED_NONGLOBAL;
            if (self.nonglobal_len as usize) < TLB_TRACKED_NONGLOBAL {
                self.nonglobal_slots[self.nonglobal_len as usize] = index as u16;
                self.nonglobal_len += 1;
            } else {
                self.nonglobal_len = TLB_UNTRACKED;
            }
        }
    }

    /// The slots that may hold entries: the listed ones, or all of them.
    fn used_slots(&self) -> Vec<usize> {
        if self.slots_len == TLB_UNTRACKED {
            (0..TLB_ENTRIES).collect()
        } else {
            self.slots[..self.slots_len as usize]
                .iter()
                .map(|&i| i as usize)
                .collect()
        }
    }

    /// Empties the entries that map `page_va`, and only those: the slot may hold another page
    /// (the TLB is direct-mapped), often a global kernel one, and an INVLPG empties the slots
    /// of a whole 2 MiB region. Emptying them whatever they held made a quarter of a
    /// fork/exec-heavy guest's TLB misses (3000 fork+exec under bt: 807–934k misses, 631k
    /// after; Intel SPR host).
    fn forget_page(&mut self, page_va: u64) {
        let index = Context::tlb_index(page_va);
        let vpn = Some(page_va >> 12);
        if self.write[index].vpn() == vpn {
            self.write[index] = TLB_EMPTY_ENTRY;
            self.flags[index] &= !(TlbKind::Write as u8);
        }
        if self.read[index].vpn() == vpn {
            self.read[index] = TLB_EMPTY_ENTRY;
            self.flags[index] &= !(TlbKind::Read as u8);
        }
    }

    /// The [`TlbSet::write_filter`] bit of the host page holding `host`.
    fn write_filter_bit(host: u64) -> usize {
        (host >> 12) as usize % WRITE_FILTER_BITS
    }

    fn forget_write_host(&mut self, host_page: u64) {
        let bit = Self::write_filter_bit(host_page);
        if self.write_filter[bit / 64] & (1 << (bit % 64)) == 0 {
            return;
        }
        // (Indexed rather than through `used_slots`: untracked, that list is 64 Ki entries,
        // allocated for each page that gains code.)
        let untracked = self.slots_len == TLB_UNTRACKED;
        let n = if untracked {
            TLB_ENTRIES
        } else {
            self.slots_len as usize
        };
        for k in 0..n {
            let i = if untracked { k } else { self.slots[k] as usize };
            let e = &mut self.write[i];
            if e.vpn()
                .is_some_and(|vpn| (vpn << 12).wrapping_add(e.addend) == host_page)
            {
                *e = TLB_EMPTY_ENTRY;
                self.flags[i] &= !(TlbKind::Write as u8);
            }
        }
    }

    fn flush(&mut self) {
        if self.slots_len == TLB_UNTRACKED {
            self.read.fill(TLB_EMPTY_ENTRY);
            self.write.fill(TLB_EMPTY_ENTRY);
            self.flags.fill(0);
        } else {
            for k in 0..self.slots_len as usize {
                let i = self.slots[k] as usize;
                self.read[i] = TLB_EMPTY_ENTRY;
                self.write[i] = TLB_EMPTY_ENTRY;
                self.flags[i] = 0;
            }
        }
        self.slots_len = 0;
        self.nonglobal_len = 0;
        self.write_filter.fill(0);
    }

    fn flush_nonglobal(&mut self) {
        let slots: Vec<usize> = if self.nonglobal_len == TLB_UNTRACKED {
            self.used_slots()
        } else {
            let listed = &self.nonglobal_slots[..self.nonglobal_len as usize];
            listed.iter().map(|&i| i as usize).collect()
        };
        for i in slots {
            let g = self.flags[i];
            if g & TlbKind::Read as u8 == 0 {
                self.read[i] = TLB_EMPTY_ENTRY;
            }
            if g & TlbKind::Write as u8 == 0 {
                self.write[i] = TLB_EMPTY_ENTRY;
            }
            self.flags[i] &= !SLOT_LISTED_NONGLOBAL;
        }
        self.nonglobal_len = 0;
    }
}

impl Context {
    /// The TLB slot of the page at guest virtual `page_va`.
    pub fn tlb_index(page_va: u64) -> usize {
        ((page_va >> 12) as usize) & (TLB_ENTRIES - 1)
    }

    /// Maps the page at guest virtual `page_va` to host address `host` in one TLB of set
    /// `set`; `global` translations survive [`Context::flush_tlb_nonglobal`].
    pub fn fill_tlb(&mut self, set: usize, kind: TlbKind, page_va: u64, host: u64, global: bool) {
        self.tlbs[set].fill(kind, page_va, host, global);
    }

    /// Empties both sets' entries for the page at guest virtual `page_va`.
    pub fn forget_tlb_page(&mut self, page_va: u64) {
        for set in &mut self.tlbs {
            set.forget_page(page_va);
        }
    }

    /// Empties both sets' entries for every page of the 2 MiB region holding guest virtual
    /// `va`: what INVLPG of `va` must drop, since the translation it names may be a 2 MiB page,
    /// cached here as 4 KiB entries.
    pub fn forget_tlb_region(&mut self, va: u64) {
        let region = va & !((1 << 21) - 1);
        for page in (0..512).map(|i| region.wrapping_add(i << 12)) {
            self.forget_tlb_page(page);
        }
    }

    /// Empties the write-TLB entries that reach the host page at `host_page` (its guest page
    /// became a code page: writes to it must miss, so they can invalidate its blocks). The
    /// whole write TLB used to go, once per new code page.
    pub fn forget_write_tlb_host(&mut self, host_page: u64) {
        for set in &mut self.tlbs {
            set.forget_write_host(host_page);
        }
    }

    pub fn flush_tlb(&mut self) {
        for set in &mut self.tlbs {
            set.flush();
        }
    }

    /// A CR3 write without PCIDs: only global translations stay (Linux writes CR3 thousands of
    /// times while booting — every `text_poke` switches to a temporary mm and back — and a
    /// full flush each time made a third of the boot's TLB misses). Only the slots filled with
    /// a non-global translation since the last one are visited, while they are few.
    pub fn flush_tlb_nonglobal(&mut self) {
        for set in &mut self.tlbs {
            set.flush_nonglobal();
        }
    }

    /// The indirect-branch slot of guest address `rip` (`engine::ibl_insert` fills only it).
    pub fn ibl_slot(rip: u64) -> usize {
        (rip & (IBL_ENTRIES as u64 - 1)) as usize
    }

    /// Empties the slot of the block at guest `rip` (or `rip`'s CPL0 key: the slot ignores the
    /// key bit) if it holds `host`, the block's translation, in either level's table.
    pub fn ibl_forget(&mut self, rip: u64, host: u64, miss: u64) {
        let slot = Self::ibl_slot(rip);
        for t in &mut self.ibls {
            if t.hosts[slot] == host {
                t.hosts[slot] = miss;
                t.tags[slot] = IBL_EMPTY_TAG;
            }
        }
    }

    /// Empties indirect-branch table `set`; every slot's host address becomes `miss`.
    pub fn flush_ibl(&mut self, set: usize, miss: u64) {
        self.ibls[set].tags.fill(IBL_EMPTY_TAG);
        self.ibls[set].hosts.fill(miss);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_global_tlb_entries_survive_a_nonglobal_flush() {
        let mut ctx = ContextBox::new();
        let c = ctx.get_mut();
        let (a, b) = (0x40_1000u64, 0x40_2000u64);
        c.fill_tlb(USER_SET, TlbKind::Read, a, 0x7000_1000, true);
        c.fill_tlb(USER_SET, TlbKind::Write, a, 0x7000_1000, false);
        c.fill_tlb(USER_SET, TlbKind::Read, b, 0x7000_2000, false);
        c.flush_tlb_nonglobal();
        let (ia, ib) = (Context::tlb_index(a), Context::tlb_index(b));
        assert_eq!(c.tlbs[USER_SET].read[ia].vpn(), Some(a >> 12), "global read entry kept");
        assert_eq!(
            c.tlbs[USER_SET].write[ia].vpn(),
            None,
            "non-global write entry of the same slot dropped"
        );
        assert_eq!(c.tlbs[USER_SET].read[ib].vpn(), None);
        // A slot refilled with a non-global translation loses its global bit.
        c.fill_tlb(
            USER_SET,
            TlbKind::Read,
            a + (TLB_ENTRIES as u64) * 4096,
            0x7000_3000,
            false,
        );
        c.flush_tlb_nonglobal();
        assert_eq!(c.tlbs[USER_SET].read[ia].vpn(), None);
        // A page becoming code: only the write entries that reach its host page go.
        c.fill_tlb(USER_SET, TlbKind::Write, a, 0x7000_1000, true);
        c.fill_tlb(USER_SET, TlbKind::Write, b, 0x7000_2000, true);
        c.forget_write_tlb_host(0x7000_2000);
        assert_eq!(
            (c.tlbs[USER_SET].write[ia].vpn(), c.tlbs[USER_SET].write[ib].vpn()),
            (Some(a >> 12), None)
        );
        c.flush_tlb();
        assert!(c.tlbs[USER_SET]
            .read
            .iter()
            .chain(c.tlbs[USER_SET].write.iter())
            .all(|e| e.vpn().is_none()));
    }

    #[test]
    fn forgetting_a_page_leaves_another_page_in_its_slot() {
        let mut ctx = ContextBox::new();
        let c = ctx.get_mut();
        let user = 0x40_1000u64;
        // The same slot: a kernel page whose number agrees in the index bits.
        let kernel = 0xffff_8880_0000_0000u64 | user;
        assert_eq!(Context::tlb_index(user), Context::tlb_index(kernel));
        let i = Context::tlb_index(user);
        c.fill_tlb(KERNEL_SET, TlbKind::Read, kernel, 0x7000_1000, true);
        c.fill_tlb(KERNEL_SET, TlbKind::Write, user, 0x7000_2000, false);
        c.forget_tlb_page(user);
        let set = &c.tlbs[KERNEL_SET];
        assert_eq!(set.read[i].vpn(), Some(kernel >> 12), "another page's entry kept");
        assert_eq!(set.write[i].vpn(), None, "the page's own entry dropped");
        // The kept entry is still global: a CR3 write keeps it.
        c.flush_tlb_nonglobal();
        assert_eq!(c.tlbs[KERNEL_SET].read[i].vpn(), Some(kernel >> 12));
        c.forget_tlb_region(kernel + 0x1234);
        assert_eq!(c.tlbs[KERNEL_SET].read[i].vpn(), None, "INVLPG in its 2 MiB region");
    }

    /// The flushes visit only the slots listed as in use; past the lists' capacity they fall
    /// back to every slot, and nothing is left behind either way.
    #[test]
    fn tracked_and_untracked_flushes_leave_nothing_behind() {
        let mut ctx = ContextBox::new();
        let c = ctx.get_mut();
        let empty = |c: &Context| {
            c.tlbs[USER_SET]
                .read
                .iter()
                .chain(c.tlbs[USER_SET].write.iter())
                .all(|e| e.vpn().is_none())
        };
        for n in [10, TLB_TRACKED_NONGLOBAL + 5, TLB_TRACKED + 5, TLB_ENTRIES] {
            for i in 0..n as u64 {
                let global = i % 3 == 0;
                c.fill_tlb(USER_SET, TlbKind::Read, i << 12, 0x7000_0000 + (i << 12), global);
                c.fill_tlb(USER_SET, TlbKind::Write, i << 12, 0x7000_0000 + (i << 12), global);
            }
            c.flush_tlb_nonglobal();
            let kept = (0..TLB_ENTRIES)
                .filter(|&i| c.tlbs[USER_SET].read[i].vpn().is_some())
                .count();
            assert_eq!(kept, n.div_ceil(3), "{n} slots: only the global third stays");
            assert!((0..n).all(|i| (c.tlbs[USER_SET].write[i].vpn().is_some()) == (i % 3 == 0)));
            // The last write entry's host page becomes code.
            let last = n as u64 - 1;
            c.fill_tlb(USER_SET, TlbKind::Write, last << 12, 0x7000_0000 + (last << 12), false);
            c.forget_write_tlb_host(0x7000_0000 + (last << 12));
            assert_eq!(c.tlbs[USER_SET].write[last as usize].vpn(), None, "{n} slots");
            c.flush_tlb();
            assert!(empty(c), "{n} slots: a full flush empties both TLBs");
        }
    }

    /// The write filter only skips scans that would find nothing: after any mix of fills
    /// (pages aliased, host pages whose filter bits collide), flushes and forgets, no write entry
    /// reaches a host page that was forgotten since it was filled.
    #[test]
    fn the_write_filter_never_hides_a_write_entry() {
        let mut ctx = ContextBox::new();
        let c = ctx.get_mut();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // Host pages 256 MiB apart share a filter bit.
        let host_page = |r: u64| 0x7000_0000 + ((r % 8) << 12) + ((r / 8 % 3) << 28);
        for _ in 0..20_000 {
            let r = next();
            match r % 16 {
                0 => c.flush_tlb(),
                1 => c.flush_tlb_nonglobal(),
                2..=9 => {
                    let va = (next() % 64) << 12;
                    c.fill_tlb(USER_SET, TlbKind::Write, va, host_page(next()), r % 3 == 0);
                }
                _ => {
                    let host = host_page(next());
                    c.forget_write_tlb_host(host);
                    let set = &c.tlbs[USER_SET];
                    let left = set
                        .write
                        .iter()
                        .filter(|e| e.vpn().is_some_and(|vpn| (vpn << 12).wrapping_add(e.addend) == host))
                        .count();
                    assert_eq!(left, 0, "a write entry still reaches {host:#x}");
                }
            }
        }
    }

    /// The two privilege levels' sets are apart: a CPL0 fill is not a CPL3 hit; the flushes
    /// (CR3, INVLPG, the code-page write forget) empty both.
    #[test]
    fn kernel_and_user_tlb_sets_are_apart_and_flush_together() {
        let mut ctx = ContextBox::new();
        let c = ctx.get_mut();
        let a = 0x40_1000u64;
        let i = Context::tlb_index(a);
        c.fill_tlb(KERNEL_SET, TlbKind::Read, a, 0x7000_1000, false);
        assert_eq!(c.tlbs[KERNEL_SET].read[i].vpn(), Some(a >> 12));
        assert_eq!(c.tlbs[USER_SET].read[i].vpn(), None, "a CPL0 walk never serves CPL3");
        c.fill_tlb(USER_SET, TlbKind::Write, a, 0x7000_1000, false);
        c.fill_tlb(KERNEL_SET, TlbKind::Write, a, 0x7000_1000, false);
        c.forget_write_tlb_host(0x7000_1000);
        assert_eq!(c.tlbs[USER_SET].write[i].vpn(), None);
        assert_eq!(c.tlbs[KERNEL_SET].write[i].vpn(), None);
        c.fill_tlb(USER_SET, TlbKind::Read, a, 0x7000_1000, false);
        c.flush_tlb_nonglobal();
        assert!(c.tlbs.iter().all(|s| s.read[i].vpn().is_none()));
        assert_ne!(off::tlb_read(KERNEL_SET), off::tlb_read(USER_SET));
    }
}
