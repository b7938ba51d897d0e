//! The small guest machine a system-mode case runs in: guest-physical memory laid out with a
//! GDT, a TSS, an IDT whose every vector enters its own `hlt` stub, a kernel stack, the code
//! region (the instance in a sea of `hlt`, as in the user-mode machine) and the data region,
//! mapped by 4-level page tables whose data pages carry random U/S, R/W, NX, A and D bits
//! between unmapped neighbours.
//!
//! ```text
//! guest-physical                          guest-virtual
//!   0x1000 GDT (Linux's layout)             identity, supervisor (low page table)
//!   0x1800 LDT (CPL0 machine)
//!   0x2000 IDT: 256 interrupt gates, IST1
//!   0x3000 TSS: RSP0 = IST1 = kernel stack top
//!   0x4000 handler stubs: vector v at +v, LSTAR's at +0x800, all `hlt`
//!   0x5000 kernel stack (one page)
//!   0x6000, 0x7000 code pages               BASE + 0x1000, + 0x2000 (user, executable)
//!   0xa000, 0x8000 data pages (not adjacent) BASE + 0x10000, + 0x11000 (random bits)
//!   0x10000.. page-table sets (PML4, PDPT, PD, low PT, test PT), a fresh set per case;
//!             at CPL0 each set has a second root for `mov cr3` ([`Tables::alt_root`])
//! ```
//!
//! The CPL0 machine ([`Ring::Kernel`]) has a larger GDT with a descriptor of every kind the
//! privileged instructions treat differently (TSS available and busy, LDT present and not,
//! conforming, execute-only, read-only, expand-down, DPL 1 and 2, gates) and an LDT, so
//! `ltr`, `lldt`, `lar`, `lsl`, `verr`, `verw` and segment loads meet them.
//!
//! Every case ends in a handler's `hlt` at CPL0 (or, at CPL0, in the code region's sea): the
//! instruction faults, or completes and falls into the sea, where `hlt` at CPL3 raises #GP(0).
//! The handler is reached through IST1, so the frame is always at the same place and the GPRs
//! at the `hlt` are those of the interrupted code. Each case gets page-table frames no earlier
//! case used since the pool last wrapped: a reference engine whose MMU caches translations of
//! page-table frames (KVM's shadow MMU does) then needs to drop them only when the pool wraps.

use super::super::machine::{CODE_AT_OFFSET, CODE_OFFSET, CODE_SIZE, DATA_OFFSET, DATA_SIZE, HLT};
use super::super::rng::Rng;
use crate::mmu::soft_mmu::{P, RW, US};
use crate::state::{flags, Cpl, DescriptorTable, GuestState, Segment};

/// Guest-virtual base of the test region (below 4 GiB, so 32-bit addressing reaches it).
pub const BASE: u64 = 0x2000_0000;
pub const GDT: u64 = 0x1000;
/// The CPL0 machine's LDT (in the GDT's page).
pub const LDT: u64 = 0x1800;
pub const IDT: u64 = 0x2000;
pub const TSS: u64 = 0x3000;
pub const HANDLERS: u64 = 0x4000;
/// `syscall`'s entry (LSTAR): a `hlt` of its own.
pub const LSTAR_STUB: u64 = HANDLERS + 0x800;
pub const KERNEL_STACK_TOP: u64 = 0x6000;
const PHYS_CODE: u64 = 0x6000;
/// Data pages, deliberately not adjacent in guest-physical memory.
pub const PHYS_DATA: [u64; 2] = [0xa000, 0x8000];
/// The page-table pool.
const POOL: u64 = 0x10000;
const TABLES_PER_SET: u64 = 5;
const SET_SIZE: u64 = TABLES_PER_SET * 0x1000;
pub const POOL_SETS: u64 = 64;
/// Guest RAM: the fixed pages and the pool (room for CPL0 sets, which are twice the size).
pub const RAM_SIZE: u64 = 4 << 20;
const _: () = assert!(POOL + POOL_SETS * 2 * SET_SIZE <= RAM_SIZE);

/// Selectors (Linux's GDT layout, so selectors the synthesizer picks mean what they mean there).
pub const KERNEL_CS: u16 = 0x10;
pub const KERNEL_DS: u16 = 0x18;
pub const USER_DS: u16 = 0x2b;
pub const USER_CS: u16 = 0x33;
/// Linux's 32-bit user code segment (compatibility mode).
pub const USER32_CS: u16 = 0x23;
pub const TSS_SEL: u16 = 0x40;
/// The CPL0 machine's LDT descriptor.
pub const LDT_SEL: u16 = 0x60;
const GDT_ENTRIES: u64 = 16;
const KERNEL_GDT_ENTRIES: u64 = 32;
const LDT_ENTRIES: u64 = 5;
/// STAR as Linux sets it: SYSCALL to 0x10/0x18, SYSRET to 0x33/0x2b.
pub const STAR: u64 = (0x23 << 48) | (0x10 << 32);

/// CR0.AM: alignment checking at CPL3 (with RFLAGS.AC).
pub const CR0_AM: u64 = 1 << 18;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const NX: u64 = 1 << 63;

/// Vectors whose gate a CPL3 `int3`/`into` may use (DPL 3), as Linux sets them.
fn gate_dpl(vector: u8) -> u64 {
    if matches!(vector, 3 | 4) {
        3
    } else {
        0
    }
}

/// The page-table set of one case and the entries the synthesizer chose.
#[derive(Clone, Copy, Debug)]
pub struct Tables {
    /// Guest-physical address of the set (CR3).
    pub root: u64,
    /// Leaf entries of the two data pages and of their unmapped neighbours (below, above).
    pub data_ptes: [u64; 2],
    pub neighbour_ptes: [u64; 2],
    /// CPL0: a second root, right after the first set, for `mov cr3`: a copy of the set (the
    /// same mappings through other frames, accessed bits clear) or, when `alt_empty`, an empty
    /// PML4 (the next fetch faults, and so does the delivery: a triple fault).
    pub alt_root: Option<u64>,
    pub alt_empty: bool,
}

impl Tables {
    /// The guest-physical range of the set's frames (the alternate set's included).
    pub fn range(&self) -> (u64, u64) {
        let frames = if self.alt_root.is_some() { 2 } else { 1 };
        (self.root, self.root + frames * SET_SIZE)
    }
}

/// Which privilege level the instance runs at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ring {
    User,
    Kernel,
}

/// The CPL0 machine's extra descriptors (GDT index, value): one of each kind the privileged
/// instructions and segment loads check differently. 16-byte system descriptors take two slots.
const KERNEL_DESCRIPTORS: &[(usize, u64)] = &[
    (1, 0x00cf_9b00_0000_ffff),  // 0x08 kernel code, 32-bit
    (14, 0x00af_9f00_0000_ffff), // 0x70 conforming code, DPL 0, 64-bit
    (16, 0x00cf_1300_0000_ffff), // 0x80 data, DPL 0, not present
    (17, 0x00cf_9100_0000_ffff), // 0x88 read-only data, DPL 0
    (18, 0x00af_9900_0000_ffff), // 0x90 execute-only code, DPL 0, 64-bit
    (19, 0x00cf_b300_0000_ffff), // 0x98 data, DPL 1
    (20, 0x00cf_d300_0000_ffff), // 0xa0 data, DPL 2
    (27, 0x00cf_9700_0000_ffff), // 0xd8 expand-down data, DPL 0
    (28, 0x00cf_ff00_0000_ffff), // 0xe0 conforming readable code, DPL 3, 32-bit
    (29, 0x0000_9300_0000_0fff), // 0xe8 data, DPL 0, byte-granular limit 0xfff
    (30, 0x0000_8e00_0010_0000), // 0xf0 interrupt gate (lar/lsl never see it)
    (31, 0x0000_8900_3000_0067), // 0xf8 available TSS whose upper half is past the limit
];

/// A 16-byte system descriptor (TSS or LDT) of `kind` at `base` with `limit`.
fn system_descriptor(base: u64, limit: u64, kind: u64, present: bool) -> [u64; 2] {
    let lo = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | ((kind | (present as u64) << 7) << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    [lo, base >> 32]
}

/// The CPL0 machine's LDT: null, user data (DPL 3), kernel data, 64-bit kernel code, and a
/// not-present data segment (selectors 0x0c, 0x14, 0x1c, 0x24 with TI set).
const LDT_DESCRIPTORS: [u64; LDT_ENTRIES as usize] = [
    0,
    0x00cf_f300_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x00af_9b00_0000_ffff,
    0x00cf_1300_0000_ffff,
];

/// The GDT limit and LDT descriptor the machine at `ring` has.
pub fn gdt_limit(ring: Ring) -> u16 {
    let entries = match ring {
        Ring::User => GDT_ENTRIES,
        Ring::Kernel => KERNEL_GDT_ENTRIES,
    };
    (entries * 8 - 1) as u16
}

/// LDTR loaded from [`LDT_SEL`].
pub fn ldt_segment() -> crate::state::Segment {
    Segment {
        selector: LDT_SEL,
        base: LDT,
        limit: (LDT_ENTRIES * 8 - 1) as u32,
        attr: 0x82,
    }
}

/// Writes the fixed part of the machine (GDT, IDT, TSS, handler stubs) into `ram`.
pub fn write_fixed(ram: &mut [u8], ring: Ring) {
    let mut gdt = [0u64; KERNEL_GDT_ENTRIES as usize];
    gdt[2] = 0x00af_9b00_0000_ffff; // 0x10 kernel code, 64-bit
    gdt[3] = 0x00cf_9300_0000_ffff; // 0x18 kernel data
    gdt[4] = 0x00cf_fb00_0000_ffff; // 0x23 user code, 32-bit
    gdt[5] = 0x00cf_f300_0000_ffff; // 0x2b user data
    gdt[6] = 0x00af_fb00_0000_ffff; // 0x33 user code, 64-bit
                                    // 0x7b: Linux's CPU/node segment, read-only expand-down data of DPL 3 whose limit is the
                                    // CPU number (0 here; `lsl` reads it at CPL3, as vgetcpu does). A reference whose CPL3
                                    // segment loads go to its host's GDT (kvm_pvm's do) sees this very descriptor there, with
                                    // the host CPU's number as limit.
    gdt[15] = 0x0040_f500_0000_0000;
    // 0x40: an available 64-bit TSS.
    gdt[8] = 0x67 | ((TSS & 0xff_ffff) << 16) | (0x89 << 40) | (((TSS >> 24) & 0xff) << 56);
    gdt[9] = TSS >> 32;
    let entries = match ring {
        Ring::User => GDT_ENTRIES as usize,
        Ring::Kernel => {
            for &(i, d) in KERNEL_DESCRIPTORS {
                gdt[i] = d;
            }
            // 0x40 is TR: busy. 0x50 an available TSS, 0xc8 another busy one; 0x60 the LDT,
            // 0xa8 an LDT descriptor that is not present; 0xb8 a 64-bit call gate (DPL 3).
            gdt[8] |= 2 << 40;
            [gdt[10], gdt[11]] = system_descriptor(TSS, 0x67, 9, true);
            [gdt[25], gdt[26]] = system_descriptor(TSS, 0x67, 11, true);
            [gdt[12], gdt[13]] = system_descriptor(LDT, LDT_ENTRIES * 8 - 1, 2, true);
            [gdt[21], gdt[22]] = system_descriptor(LDT, LDT_ENTRIES * 8 - 1, 2, false);
            let target = HANDLERS;
            gdt[23] = (target & 0xffff) | ((KERNEL_CS as u64) << 16) | (0xec << 40) | (((target >> 16) & 0xffff) << 48);
            gdt[24] = target >> 32;
            for (i, d) in LDT_DESCRIPTORS.iter().enumerate() {
                put(ram, LDT + 8 * i as u64, *d);
            }
            KERNEL_GDT_ENTRIES as usize
        }
    };
    for (i, d) in gdt[..entries].iter().enumerate() {
        put(ram, GDT + 8 * i as u64, *d);
    }
    for v in 0..=255u8 {
        let offset = HANDLERS + v as u64;
        let lo = (offset & 0xffff)
            | ((KERNEL_CS as u64) << 16)
            | (1 << 32) // IST1
            | ((0x8e | (gate_dpl(v) << 5)) << 40)
            | (((offset >> 16) & 0xffff) << 48);
        put(ram, IDT + 16 * v as u64, lo);
        put(ram, IDT + 16 * v as u64 + 8, offset >> 32);
    }
    ram[TSS as usize..TSS as usize + 0x1000].fill(0);
    put(ram, TSS + 4, KERNEL_STACK_TOP); // RSP0
    put(ram, TSS + 0x24, KERNEL_STACK_TOP); // IST1
                                            // I/O map base past the limit: no I/O permission bitmap (port access needs CPL <= IOPL).
    ram[TSS as usize + 0x66..TSS as usize + 0x68].copy_from_slice(&0x68u16.to_le_bytes());
    ram[HANDLERS as usize..HANDLERS as usize + 0x1000].fill(HLT);
}

fn put(ram: &mut [u8], pa: u64, v: u64) {
    ram[pa as usize..pa as usize + 8].copy_from_slice(&v.to_le_bytes());
}

pub fn get(ram: &[u8], pa: u64) -> u64 {
    u64::from_le_bytes(ram[pa as usize..pa as usize + 8].try_into().expect("8 bytes"))
}

/// Random leaf bits for a data page: mostly present; U/S, R/W, NX, A, D each random.
fn random_leaf(rng: &mut Rng, ring: Ring) -> u64 {
    let mut e = 0;
    if rng.chance(92) {
        e |= P;
    }
    if rng.chance(75) {
        e |= RW;
    }
    // At CPL0, supervisor pages are the common case; at CPL3, user pages.
    let user = match ring {
        Ring::User => 80,
        Ring::Kernel => 30,
    };
    if rng.chance(user) {
        e |= US;
    }
    if rng.chance(50) {
        e |= NX;
    }
    if rng.chance(40) {
        e |= A;
    }
    if rng.chance(30) {
        e |= D;
    }
    e
}

/// Picks the next page-table set of the pool (`case` counts cases) and writes it: the fixed
/// pages identity-mapped for the supervisor, the code pages user-executable, the data pages
/// with random bits, their neighbours not present. Upper-level entries start with A clear.
pub fn write_tables(ram: &mut [u8], case: u64, rng: &mut Rng, ring: Ring) -> Tables {
    let frames = match ring {
        Ring::User => 1,
        Ring::Kernel => 2,
    };
    let root = POOL + (case % POOL_SETS) * frames * SET_SIZE;
    ram[root as usize..(root + frames * SET_SIZE) as usize].fill(0);
    let (pml4, pdpt, pd, pt_low, pt) = (root, root + 0x1000, root + 0x2000, root + 0x3000, root + 0x4000);
    let upper = P | RW | US;
    put(ram, pml4, pdpt | upper);
    put(ram, pdpt, pd | upper);
    put(ram, pd, pt_low | upper);
    put(ram, pd + ((BASE >> 21) & 511) * 8, pt | upper);
    for page in [GDT, IDT, TSS, HANDLERS, KERNEL_STACK_TOP - 0x1000] {
        put(ram, pt_low + (page >> 12) * 8, page | P | RW | NX);
    }
    // The handler stubs are supervisor code.
    put(ram, pt_low + (HANDLERS >> 12) * 8, HANDLERS | P);
    let slot = |va: u64| pt + ((va >> 12) & 511) * 8;
    for i in 0..CODE_SIZE / 0x1000 {
        let mut e = (PHYS_CODE + i * 0x1000) | P | RW | US;
        if rng.chance(50) {
            e |= A;
        }
        put(ram, slot(BASE + CODE_OFFSET + i * 0x1000), e);
    }
    let mut data_ptes = [0; 2];
    for (i, &pa) in PHYS_DATA.iter().enumerate() {
        data_ptes[i] = pa | random_leaf(rng, ring);
        put(ram, slot(BASE + DATA_OFFSET + i as u64 * 0x1000), data_ptes[i]);
    }
    // Unmapped neighbours: P clear, other bits random (the CPU ignores them).
    let mut neighbour_ptes = [0; 2];
    for (i, va) in [BASE + DATA_OFFSET - 0x1000, BASE + DATA_OFFSET + DATA_SIZE]
        .into_iter()
        .enumerate()
    {
        neighbour_ptes[i] = if rng.chance(50) {
            0
        } else {
            (0x9000 | random_leaf(rng, ring)) & !P
        };
        put(ram, slot(va), neighbour_ptes[i]);
    }
    let mut alt_root = None;
    let mut alt_empty = false;
    if ring == Ring::Kernel {
        // The alternate set: the same entries through its own frames (the PML4, PDPT and PD
        // entries re-pointed at the copies), or an empty PML4.
        let alt = root + SET_SIZE;
        alt_empty = rng.chance(15);
        if !alt_empty {
            for t in 0..TABLES_PER_SET {
                for e in 0..512 {
                    let mut v = get(ram, root + t * 0x1000 + e * 8);
                    if v != 0 && t < 3 {
                        v += SET_SIZE;
                    }
                    put(ram, alt + t * 0x1000 + e * 8, v);
                }
            }
        }
        alt_root = Some(alt);
    }
    Tables {
        root,
        data_ptes,
        neighbour_ptes,
        alt_root,
        alt_empty,
    }
}

/// The page holding the GDT and the LDT.
pub fn descriptor_page(ram: &[u8]) -> &[u8] {
    &ram[GDT as usize..GDT as usize + 0x1000]
}

/// Fills the code region with `hlt` and places the instance (after a `nop` when `lead_in`).
pub fn write_code(ram: &mut [u8], bytes: &[u8], lead_in: bool) {
    let code = &mut ram[PHYS_CODE as usize..(PHYS_CODE + CODE_SIZE) as usize];
    code.fill(HLT);
    let at = (CODE_AT_OFFSET - CODE_OFFSET) as usize;
    code[at..at + bytes.len()].copy_from_slice(bytes);
    if lead_in {
        code[at - 1] = 0x90;
    }
}

/// Writes the data region's contents (the synthesizer's, in virtual order) to its frames.
pub fn write_data(ram: &mut [u8], data: &[u8]) {
    for (i, &pa) in PHYS_DATA.iter().enumerate() {
        ram[pa as usize..pa as usize + 4096].copy_from_slice(&data[i * 4096..(i + 1) * 4096]);
    }
}

/// The data region's contents, in virtual order.
pub fn read_data(ram: &[u8]) -> Vec<u8> {
    PHYS_DATA
        .iter()
        .flat_map(|&pa| ram[pa as usize..pa as usize + 4096].iter().copied())
        .collect()
}

/// The code region's byte at a guest-virtual address (None outside it).
pub fn code_byte(ram: &[u8], va: u64) -> Option<u8> {
    let (lo, hi) = code_range();
    (lo..hi).contains(&va).then(|| ram[(PHYS_CODE + va - lo) as usize])
}

pub fn code_at() -> u64 {
    BASE + CODE_AT_OFFSET
}

pub fn code_range() -> (u64, u64) {
    (BASE + CODE_OFFSET, BASE + CODE_OFFSET + CODE_SIZE)
}

pub fn data() -> u64 {
    BASE + DATA_OFFSET
}

/// Turns a synthesized (user-mode) state into the machine's: paging through `tables`, the
/// descriptor tables, the TSS, the syscall MSRs, and the privilege level `ring`.
pub fn machine_state(s: &mut GuestState, tables: &Tables, ring: Ring) {
    s.cr3 = tables.root;
    s.cr2 = 0;
    s.sys.gdtr = DescriptorTable {
        base: GDT,
        limit: gdt_limit(ring),
    };
    s.sys.idtr = DescriptorTable {
        base: IDT,
        limit: 256 * 16 - 1,
    };
    s.sys.tr = Segment {
        selector: TSS_SEL,
        base: TSS,
        limit: 0x67,
        attr: 0x8b, // busy 64-bit TSS, present
    };
    s.sys.msr.star = STAR;
    s.sys.msr.lstar = LSTAR_STUB;
    s.sys.msr.sfmask = 0x4_7700;
    match ring {
        Ring::User => {
            s.cpl = Cpl::User;
            s.seg[1] = USER_CS;
            s.seg[2] = USER_DS;
        }
        Ring::Kernel => {
            s.cpl = Cpl::Kernel;
            s.seg[1] = KERNEL_CS;
            s.seg[2] = KERNEL_DS;
        }
    }
    s.rflags |= flags::FIXED;
}
