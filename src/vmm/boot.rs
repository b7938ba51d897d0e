//! Entering a guest in 64-bit long mode, as the Linux 64-bit boot protocol specifies and the
//! test guests expect: a flat GDT (`__BOOT_CS` 0x10, `__BOOT_DS` 0x18), identity page tables for
//! the first 4 GiB (2 MiB pages, user-accessible so test guests can drop to CPL3), CR0/CR4/EFER.

use super::memory::GuestMemory;
use anyhow::Result;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

pub const GDT_ADDR: u64 = 0x500;
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;
const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000; // four PDs: 0xb000..0xf000
/// Initial stack for images that do not set their own (grows down from here).
pub const BOOT_STACK: u64 = 0x8ff0;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_SCE: u64 = 1;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
const BOOT_CR0: u64 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
const BOOT_CR4: u64 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
const BOOT_EFER: u64 = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE;
/// The GDT [`write_tables`] writes: null, null, `__BOOT_CS`, `__BOOT_DS`.
const GDT_LIMIT: u16 = 4 * 8 - 1;
/// TR: a busy 64-bit TSS at 0, limit 0x67 (what KVM needs to enter long mode; the test guests
/// and Linux load their own).
const TR_TYPE_BUSY_TSS: u8 = 11;

/// Writes the GDT and page tables into guest memory.
pub fn write_tables(mem: &mut GuestMemory) -> Result<()> {
    let gdt: [u64; 4] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_u64(GDT_ADDR + 8 * i as u64, *d)?;
    }
    use hbt_translator::mmu::soft_mmu::{P, PS, RW, US};
    const PRESENT_RW_USER: u64 = P | RW | US;
    mem.write_u64(PML4_ADDR, PDPT_ADDR | PRESENT_RW_USER)?;
    for gb in 0..4u64 {
        let pd = PD_ADDR + gb * 0x1000;
        mem.write_u64(PDPT_ADDR + gb * 8, pd | PRESENT_RW_USER)?;
        for i in 0..512u64 {
            let addr = (gb << 30) | (i << 21);
            mem.write_u64(pd + i * 8, addr | PRESENT_RW_USER | PS)?; // 2 MiB page
        }
    }
    Ok(())
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: if code { 0 } else { 1 },
        s: 1,
        l: if code { 1 } else { 0 },
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long-mode system registers on top of what KVM reports.
pub fn long_mode_sregs(mut s: kvm_sregs) -> kvm_sregs {
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = GDT_LIMIT;
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cs = segment(BOOT_CS, true);
    let data = segment(BOOT_DS, false);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: 0,
        type_: TR_TYPE_BUSY_TSS,
        present: 1,
        s: 0,
        ..data
    };
    s.cr3 = PML4_ADDR;
    s.cr4 = BOOT_CR4;
    s.cr0 = BOOT_CR0;
    s.efer = BOOT_EFER;
    s
}

pub fn entry_regs(rip: u64, rsp: u64, rsi: u64) -> kvm_regs {
    kvm_regs {
        rip,
        rsp,
        rsi,
        rflags: 0x2,
        ..Default::default()
    }
}

/// IA32_MISC_ENABLE as firmware leaves it: fast strings on (Linux drops ERMS otherwise, and
/// with FSRM still set its memmove then skips the short-copy check it needs without ERMS), BTS
/// and PEBS unavailable.
const MISC_ENABLE_AT_RESET: u64 = (1 << 0) | (1 << 11) | (1 << 12);

/// The same entry state for the translator (`--accel bt`): CPL0, the registers of
/// [`entry_regs`] and the system registers of [`long_mode_sregs`].
pub fn long_mode_state(rip: u64, rsp: u64, rsi: u64) -> hbt_translator::state::GuestState {
    use hbt_translator::state::{gpr, Cpl, DescriptorTable, GuestState, Segment};
    let mut s = GuestState {
        rip,
        rflags: 0x2,
        cr0: BOOT_CR0,
        cr2: 0,
        cr3: PML4_ADDR,
        cr4: BOOT_CR4,
        efer: BOOT_EFER,
        cpl: Cpl::Kernel,
        // x87 and SSE: the state a CPU with CR4.OSXSAVE clear keeps (FXSAVE's).
        xcr0: 0x3,
        seg: [BOOT_DS, BOOT_CS, BOOT_DS, BOOT_DS, BOOT_DS, BOOT_DS],
        ..GuestState::default()
    };
    s.gpr[gpr::RSP] = rsp;
    s.gpr[gpr::RSI] = rsi;
    s.sys.msr.misc_enable = MISC_ENABLE_AT_RESET;
    s.sys.gdtr = DescriptorTable {
        base: GDT_ADDR,
        limit: GDT_LIMIT,
    };
    const PRESENT: u16 = 1 << 7;
    s.sys.tr = Segment {
        selector: 0,
        base: 0,
        limit: 0x67,
        attr: TR_TYPE_BUSY_TSS as u16 | PRESENT,
    };
    s
}
