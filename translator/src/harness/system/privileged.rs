//! Operands and machine state for instances run at CPL0 ([`Ring::Kernel`]): the user-mode
//! synthesizer (`synth.rs`) fills GPRs, flags, vector state and data with random and edge
//! values; privileged instructions need values that keep the machine running and still reach
//! the interesting cases — control-register values that keep long mode and paging on or break
//! them on purpose, MSR indexes both engines model with valid and invalid values, descriptor
//! images for `lgdt`/`lidt`, selectors of every kind of descriptor in the CPL0 machine's GDT
//! and LDT (`guest.rs`), `iretq`/`sysretq` frames to CPL0 and CPL3, XCR0 values.
//!
//! Every choice here keeps the case inside the machine: addresses land in the code region's
//! `hlt` sea or the data region, and descriptor tables stay where the handlers need them
//! (`lgdt`/`lidt` load other values, but the case ends at the `hlt` right after).

use super::super::rng::Rng;
use super::super::synth::Instance;
use super::guest::{self, Tables, KERNEL_CS, KERNEL_DS, USER_CS, USER_DS};
use crate::rules::{rule, EmulateOp, Rule};
use crate::state::{flags, GuestState};
use crate::system::SystemOp;
use iced_x86::{Code, Instruction, Mnemonic as M, OpKind, Register};

/// Values a non-canonical address test uses (just past each half, and far out).
const NON_CANONICAL: [u64; 3] = [0x0000_8000_0000_0000, 0xffff_7fff_ffff_f000, 0x1234_5678_9abc_def0];

/// MSRs both engines model, by index, with how to pick a value to write. Indexes neither
/// engine knows raise #GP(0) in both.
#[derive(Clone, Copy)]
enum MsrValue {
    /// Any 64-bit value.
    Any,
    /// An address: canonical (kernel or user half) or not.
    Address,
    /// 32 bits, sometimes with upper bits set (#GP).
    Low32,
    Efer,
    Pat,
}

const MSRS: &[(u32, MsrValue)] = &[
    (0xc000_0080, MsrValue::Efer),
    (0xc000_0081, MsrValue::Any),     // STAR
    (0xc000_0082, MsrValue::Address), // LSTAR
    (0xc000_0083, MsrValue::Address), // CSTAR
    (0xc000_0084, MsrValue::Low32),   // SFMASK
    (0xc000_0100, MsrValue::Address), // FS_BASE
    (0xc000_0101, MsrValue::Address), // GS_BASE
    (0xc000_0102, MsrValue::Address), // KERNEL_GS_BASE
    (0xc000_0103, MsrValue::Low32),   // TSC_AUX
    (0x277, MsrValue::Pat),
    (0x174, MsrValue::Low32),   // SYSENTER_CS
    (0x175, MsrValue::Address), // SYSENTER_ESP
    (0x176, MsrValue::Address), // SYSENTER_EIP
];

/// MSR indexes no CPU model here implements: #GP(0) for both `rdmsr` and `wrmsr`.
const UNKNOWN_MSRS: [u32; 4] = [0x0000_1234, 0xc000_0fff, 0x8000_0000, 0xdead_beef];

/// Selectors worth loading or querying at CPL0: null with each RPL, Linux's entries, every kind
/// of descriptor in the CPL0 GDT (see `guest.rs`), LDT entries (TI set), past either limit.
const SELECTORS: [u16; 40] = [
    0, 1, 2, 3, 0x08, 0x10, 0x13, 0x18, 0x1b, 0x23, 0x2b, 0x33, 0x38, 0x40, 0x50, 0x60, 0x70, 0x7b, 0x80, 0x88, 0x90,
    0x98, 0x99, 0xa0, 0xa8, 0xb8, 0xc8, 0xd8, 0xe0, 0xe8, 0xf0, 0xf8, 0x100, 0x0c, 0x0f, 0x14, 0x1c, 0x24, 0x2c,
    0xfff8,
];

fn selector(rng: &mut Rng) -> u16 {
    if rng.chance(85) {
        rng.pick(&SELECTORS)
    } else {
        rng.next_u64() as u16
    }
}

fn address(rng: &mut Rng) -> u64 {
    match rng.below(10) {
        0..=3 => 0xffff_8000_0000_0000 | (rng.next_u64() & 0x7fff_ffff_fff8),
        4..=6 => rng.next_u64() & 0x7fff_ffff_fff8,
        7 => rng.pick(&[0, 0x0000_7fff_ffff_ffff, 0xffff_8000_0000_0000]),
        _ => rng.pick(&NON_CANONICAL),
    }
}

fn put(mem: &mut [u8], at: u64, value: u64, size: usize) {
    let at = at as usize;
    if at + size <= mem.len() {
        mem[at..at + size].copy_from_slice(&value.to_le_bytes()[..size]);
    }
}

fn set_low(s: &mut GuestState, reg: usize, bits: u32, value: u64) {
    let mask = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
    s.gpr[reg] = (s.gpr[reg] & !mask) | (value & mask);
}

/// The CPL0 machine's starting state beyond `guest::machine_state`: the system registers a
/// kernel would have (random where the CPU accepts anything), so reads of them show
/// something and writes have something to change.
fn system_registers(s: &mut GuestState, rng: &mut Rng) {
    // CR0.WP decides whether CPL0 may write read-only pages.
    if rng.chance(25) {
        s.cr0 &= !(1 << 16);
    }
    // CR4: DE (DR4/DR5 alias or #UD), TSD, PCE; PGE stays (the tables have no global pages).
    for bit in [3, 2, 8] {
        if rng.chance(30) {
            s.cr4 ^= 1 << bit;
        }
    }
    s.cr2 = rng.interesting();
    s.sys.cr8 = rng.below(16);
    s.kernel_gs_base = 0xffff_8880_0000_0000 | (rng.next_u64() & 0xffff_fff8);
    s.sys.msr.cstar = 0xffff_ffff_8100_0000 | (rng.next_u64() & 0xff_fff0);
    s.sys.msr.tsc_aux = rng.next_u64() & 0xffff_ffff;
    s.sys.msr.pat = 0x0007_0406_0007_0406;
    s.sys.msr.sysenter_cs = rng.next_u64() & 0xffff;
    s.sys.msr.sysenter_esp = 0xffff_ffff_8200_0000 | (rng.next_u64() & 0xff_fff0);
    s.sys.msr.sysenter_eip = 0xffff_ffff_8100_0000 | (rng.next_u64() & 0xff_fff0);
    // Breakpoint addresses nothing in the machine uses, DR6 and DR7 as after reset: no
    // breakpoint can trigger, whatever DR7 a `mov` writes.
    for dr in 0..4 {
        s.sys.dr[dr] = 0xffff_ffff_c000_0000 | (rng.next_u64() & 0x3fff_fff8);
    }
    s.sys.dr[6] = 0xffff_0ff0;
    s.sys.dr[7] = 0x400;
    if rng.chance(50) {
        s.sys.ldtr = guest::ldt_segment();
    }
    // Interrupts on or off, any IOPL: CPL0 may do port I/O and `cli`/`sti` either way.
    s.rflags = (s.rflags & !(flags::IF | flags::IOPL)) | (rng.below(2) * flags::IF) | (rng.below(4) << 12);
}

/// Cases the translator deliberately runs differently from the CPU (design limits, each
/// documented where it is made): not compared, with the reason.
pub fn translator_limitation(case: &super::Case) -> Option<&'static str> {
    let instr = &case.instance.instr;
    let s = case.state;
    if instr.mnemonic() == M::Xsetbv && s.gpr[1] as u32 == 0 && s.cr4 & (1 << 18) != 0 {
        let v = (s.gpr[2] << 32) | (s.gpr[0] & 0xffff_ffff);
        // x87 without SSE is a valid XCR0 on a CPU; the translator's entry and exit glue
        // move the guest's vector registers by its XCR0, so it keeps SSE in every guest XCR0
        // (`cpu::xsave::check_guest_xcr0`) and refuses the rest with #GP(0).
        if v & 3 == 1 && v & !s.xcr0 & !3 == 0 && v & 4 == 0 {
            return Some(
                "xsetbv of an XCR0 with x87 but not SSE raises #GP(0) (the glue keeps SSE in every guest XCR0)",
            );
        }
    }
    None
}

/// Adjusts a synthesized state for running `inst` at CPL0 (after `guest::machine_state`).
pub fn kernel_state(inst: &Instance, rng: &mut Rng, s: &mut GuestState, mem: &mut [u8], tables: &Tables) {
    system_registers(s, rng);
    let instr = &inst.instr;
    let data = guest::data();
    let target = inst.mem_target;
    match rule(instr.code()) {
        Some(Rule::System(op)) => system_op(instr, op, rng, s, mem, tables, target),
        Some(Rule::UserCopy) => {
            if matches!(instr.mnemonic(), M::Lar | M::Lsl | M::Verr | M::Verw) {
                selector_operand(instr, rng, s, mem, target, instr.op_count() - 1);
            }
        }
        Some(Rule::Emulate(EmulateOp::Segment)) => segment_op(instr, rng, s, mem, data, target),
        _ => {}
    }
}

/// Puts a selector from [`SELECTORS`] where operand `n` (a 16-bit register or memory) reads it.
fn selector_operand(
    instr: &Instruction,
    rng: &mut Rng,
    s: &mut GuestState,
    mem: &mut [u8],
    target: Option<u64>,
    n: u32,
) {
    let sel = selector(rng) as u64;
    match (instr.op_kind(n), target) {
        (OpKind::Register, _) => {
            let r = instr.op_register(n).full_register().number() & 15;
            set_low(s, r, 16, sel);
        }
        (_, Some(off)) => put(mem, off, sel, 2),
        _ => {}
    }
}

fn system_op(
    instr: &Instruction,
    op: SystemOp,
    rng: &mut Rng,
    s: &mut GuestState,
    mem: &mut [u8],
    tables: &Tables,
    target: Option<u64>,
) {
    use crate::state::gpr::{R11, RAX, RCX, RDX};
    match op {
        SystemOp::MovCr if instr.op0_register().is_cr() => {
            let r = instr.op1_register().number() & 15;
            s.gpr[r] = control_register_value(instr.op0_register(), rng, s, tables);
        }
        SystemOp::MovDr if instr.op0_register().is_dr() => {
            let r = instr.op1_register().number() & 15;
            s.gpr[r] = match instr.op0_register() {
                Register::DR6 | Register::DR7 => match rng.below(6) {
                    0 => rng.next_u64(),
                    1 => 0x400 | (rng.next_u64() & 0xffff_0000),
                    _ => rng.next_u64() & 0xffff_ffff,
                },
                _ => rng.interesting(),
            };
        }
        SystemOp::Rdmsr | SystemOp::Wrmsr => {
            let (index, kind) = if rng.chance(12) {
                (rng.pick(&UNKNOWN_MSRS), MsrValue::Any)
            } else {
                rng.pick(MSRS)
            };
            // Bits 63:32 of RCX are ignored.
            s.gpr[RCX] = (rng.next_u64() & 0xffff_ffff_0000_0000 & if rng.chance(20) { !0 } else { 0 }) | index as u64;
            let v = msr_value(kind, rng, s);
            s.gpr[RAX] = (s.gpr[RAX] & 0xffff_ffff_0000_0000) | (v & 0xffff_ffff);
            s.gpr[RDX] = (s.gpr[RDX] & 0xffff_ffff_0000_0000) | (v >> 32);
        }
        SystemOp::Lgdt | SystemOp::Lidt => {
            if let Some(off) = target {
                let limit = match rng.below(4) {
                    0 => 0xffff,
                    1 => rng.below(0x100) * 8 + 7,
                    _ => rng.next_u64() & 0xffff,
                };
                put(mem, off, limit, 2);
                put(mem, off + 2, address(rng), 8);
            }
        }
        SystemOp::Lldt | SystemOp::Ltr => selector_operand(instr, rng, s, mem, target, 0),
        SystemOp::Sysret => {
            s.gpr[RCX] = if rng.chance(85) {
                landing(instr, rng)
            } else {
                rng.pick(&NON_CANONICAL)
            };
            let mut fl = flags::FIXED | (rng.next_u64() & (flags::STATUS | flags::DF | flags::IF | flags::AC));
            if rng.chance(30) {
                fl |= rng.next_u64() & 0xffff_ffff_ffc0_0000; // reserved bits, which sysret drops
            }
            if rng.chance(20) {
                fl |= rng.below(4) << 12 | flags::NT;
            }
            s.gpr[R11] = fl;
            if rng.chance(10) {
                s.efer &= !1; // SCE clear: #UD
            }
        }
        SystemOp::Xsetbv => {
            let offered = s.xcr0;
            let v = match rng.below(8) {
                0 => rng.next_u64(),
                1 => rng.next_u64() & offered & !1, // x87 clear: #GP
                _ => (rng.next_u64() & offered) | 1,
            };
            s.gpr[RAX] = (s.gpr[RAX] & 0xffff_ffff_0000_0000) | (v & 0xffff_ffff);
            s.gpr[RDX] = (s.gpr[RDX] & 0xffff_ffff_0000_0000) | (v >> 32);
            s.gpr[RCX] = if rng.chance(85) {
                s.gpr[RCX] & 0xffff_ffff_0000_0000
            } else {
                rng.next_u64()
            };
            if rng.chance(10) {
                s.cr4 &= !(1 << 18); // OSXSAVE clear: #UD
            }
        }
        // IA32_KERNEL_GS_BASE holds only canonical values (its `wrmsr` checks).
        SystemOp::Invlpg if rng.chance(20) => {
            // A non-canonical address: INVLPG of one is a no-op (no #GP, unlike an access).
            let base = instr.memory_base();
            if base.is_gpr64() {
                s.gpr[base.number() & 15] ^= 1 << 62;
            }
        }
        SystemOp::PortString => {
            // Elements in the data region (so faults come from the pages' bits), a short count.
            let data = guest::data();
            s.gpr[6] = data + 0x200 + rng.below(0x600);
            s.gpr[7] = data + 0xc00 + rng.below(0x800);
            s.gpr[RCX] = rng.below(20);
            if rng.chance(10) {
                s.gpr[7] = data + 0x1000 - rng.below(4); // across the two (not adjacent) pages
            }
        }
        SystemOp::Swapgs => s.kernel_gs_base = 0xffff_8880_0000_0000 | (rng.next_u64() & 0x7f_ffff_fff8),
        _ => {}
    }
}

/// An address in the `hlt` sea after the instruction.
fn landing(instr: &Instruction, rng: &mut Rng) -> u64 {
    let (_, end) = guest::code_range();
    (instr.next_ip() + 1 + rng.below(64)).min(end - 1)
}

/// A value for `mov cr, reg`: mostly valid changes of the current value (with paging and long
/// mode kept), sometimes what the CPU refuses.
fn control_register_value(cr: Register, rng: &mut Rng, s: &GuestState, tables: &Tables) -> u64 {
    match cr {
        Register::CR0 => {
            // MP, EM, TS, NE, WP, AM, NW, CD.
            const FLIPPABLE: [u64; 8] = [1 << 1, 1 << 2, 1 << 3, 1 << 5, 1 << 16, 1 << 18, 1 << 29, 1 << 30];
            let mut v = s.cr0;
            for bit in FLIPPABLE {
                if rng.chance(25) {
                    v ^= bit;
                }
            }
            match rng.below(12) {
                0 => v &= !(1 << 31),                                // PG clear: #GP in long mode
                1 => v &= !1,                                        // PE clear with PG set: #GP
                2 => v |= 1 << (32 + rng.below(32)),                 // reserved upper bit: #GP
                3 => v |= 1 << rng.pick(&[6u64, 7, 15, 17, 19, 28]), // reserved low bits: ignored
                4 => v &= !0x10,                                     // ET reads as 1 whatever is written
                _ => {}
            }
            v
        }
        Register::CR3 => {
            let alt = tables.alt_root.unwrap_or(tables.root);
            match rng.below(10) {
                0..=3 => alt,
                4 => tables.root,
                5 => alt | (rng.below(4) << 3),           // PWT, PCD
                6 => alt | (rng.next_u64() & 0xfe7),      // ignored low bits
                7 => alt | 1 << (52 + rng.below(12)),     // reserved: #GP
                8 => alt | 1 << (40 + rng.below(12)),     // above MAXPHYADDR or not
                _ => 0x4000_0000 + (rng.below(16) << 12), // outside guest RAM
            }
        }
        Register::CR4 => {
            // VME, PVI, TSD, DE, PSE, MCE, PGE, PCE, OSFXSR, OSXMMEXCPT, UMIP, LA57, VMXE,
            // SMXE, FSGSBASE, PCIDE, OSXSAVE, SMEP, SMAP, PKE, CET, PKS.
            const FLIPPABLE: [u64; 22] = [
                0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 18, 20, 21, 22, 23, 24,
            ];
            let mut v = s.cr4;
            let flips = rng.below(3);
            for _ in 0..flips {
                v ^= 1 << rng.pick(&FLIPPABLE);
            }
            match rng.below(10) {
                0 => v &= !(1 << 5),                 // PAE clear: #GP in long mode
                1 => v |= 1 << (25 + rng.below(39)), // reserved: #GP
                _ => {}
            }
            v
        }
        Register::CR8 => {
            if rng.chance(85) {
                rng.below(16)
            } else {
                rng.interesting()
            }
        }
        _ => rng.interesting(),
    }
}

fn msr_value(kind: MsrValue, rng: &mut Rng, s: &GuestState) -> u64 {
    match kind {
        MsrValue::Any => rng.interesting(),
        MsrValue::Address => address(rng),
        MsrValue::Low32 => {
            if rng.chance(80) {
                rng.next_u64() & 0xffff_ffff
            } else {
                rng.interesting()
            }
        }
        MsrValue::Efer => {
            let mut v = s.efer;
            // SCE, NXE toggled; LME cleared (#GP with paging on); LMA (ignored); reserved bits.
            for bit in [0u64, 11] {
                if rng.chance(40) {
                    v ^= 1 << bit;
                }
            }
            match rng.below(10) {
                0 => v &= !(1 << 8),
                1 => v ^= 1 << 10,
                2 => v |= 1 << rng.pick(&[1u64, 9, 12, 13, 14, 15, 16, 21, 40]),
                _ => {}
            }
            v
        }
        MsrValue::Pat => {
            // Eight memory types: 0, 1, 4, 5, 6, 7 are valid; 2, 3 and 8..255 raise #GP.
            let mut v = 0u64;
            for i in 0..8 {
                let t = if rng.chance(93) {
                    rng.pick(&[0u64, 1, 4, 5, 6, 7])
                } else {
                    rng.pick(&[2u64, 3, 8, 0x16, 0x80])
                };
                v |= t << (8 * i);
            }
            v
        }
    }
}

/// A code selector for a far transfer: never 32-bit code (compatibility mode is refused by
/// design) nor the call gate (gates are not modelled), which the translator refuses.
fn far_target(cs: u16) -> u16 {
    if matches!(cs >> 3, 1 | 4 | 23 | 28) {
        KERNEL_CS
    } else {
        cs
    }
}

/// Selectors and frames for segment loads, far transfers and `iret` at CPL0 (the user-mode
/// synthesizer picks CPL3 ones).
fn segment_op(instr: &Instruction, rng: &mut Rng, s: &mut GuestState, mem: &mut [u8], data: u64, target: Option<u64>) {
    let stack = s.gpr[4].wrapping_sub(data);
    // The explicit memory operand, where the synthesizer aimed it (an offset into the data).
    let operand = |mem: &mut [u8], value: u64, size: usize, offset: u64| {
        if let Some(at) = target {
            put(mem, at + offset, value, size);
        }
    };
    match instr.mnemonic() {
        M::Mov if instr.op0_kind() == OpKind::Register && instr.op0_register().is_segment_register() => {
            let sel = selector(rng) as u64;
            match instr.op1_kind() {
                OpKind::Register => {
                    let r = instr.op1_register().full_register().number() & 15;
                    set_low(s, r, 16, sel);
                }
                _ => operand(mem, sel, 2, 0),
            }
        }
        M::Pop => put(mem, stack, selector(rng) as u64, 8),
        M::Lfs | M::Lgs | M::Lss => {
            let size = instr.op0_register().size();
            operand(mem, rng.interesting(), size, 0);
            operand(mem, selector(rng) as u64, 2, size as u64);
        }
        M::Iret | M::Iretd | M::Iretq | M::Retf => {
            let size = match instr.code() {
                Code::Retfw | Code::Retfw_imm16 | Code::Iretw => 2,
                Code::Retfd | Code::Retfd_imm16 | Code::Iretd => 4,
                _ => 8,
            };
            // To CPL0 (same level) or to CPL3, sometimes with a selector that fails.
            let to_user = rng.chance(50);
            let (cs, ss) = match rng.below(10) {
                0 => (selector(rng), selector(rng)),
                1 => (if to_user { USER_CS } else { KERNEL_CS }, selector(rng)),
                _ if to_user => (USER_CS, if rng.chance(80) { USER_DS } else { 0x7b }),
                _ => (KERNEL_CS, if rng.chance(70) { KERNEL_DS } else { 0 }),
            };
            let cs = far_target(cs);
            let rip = if rng.chance(90) {
                landing(instr, rng)
            } else {
                rng.pick(&NON_CANONICAL)
            };
            put(mem, stack, rip, size);
            put(mem, stack + size as u64, cs as u64, size);
            let skip = if instr.mnemonic() == M::Retf {
                if instr.op_count() == 1 {
                    instr.immediate16() as u64
                } else {
                    0
                }
            } else {
                let mut fl = flags::FIXED | (rng.next_u64() & (flags::STATUS | flags::DF | flags::IF));
                if rng.chance(30) {
                    fl |= rng.below(4) << 12;
                }
                if rng.chance(15) {
                    fl |= rng.pick(&[flags::NT, flags::AC, flags::VM, flags::RF, 1 << 19, 1 << 20, 1 << 21]);
                }
                put(mem, stack + 2 * size as u64, fl, size);
                0
            };
            let at = if instr.mnemonic() == M::Retf {
                stack + 2 * size as u64 + skip
            } else {
                stack + 3 * size as u64
            };
            let rsp = if rng.chance(90) {
                data + 0x400 + rng.below(0x100) * 8
            } else {
                rng.pick(&NON_CANONICAL)
            };
            put(mem, at, rsp, size);
            put(mem, at + size as u64, ss as u64, size);
            // `iret` with NT set raises #GP in 64-bit mode.
            if instr.mnemonic() != M::Retf && rng.chance(10) {
                s.rflags |= flags::NT;
            }
        }
        M::Jmp | M::Call => {
            let size = instr.memory_size().size() - 2;
            let cs = match rng.below(4) {
                0 => selector(rng),
                _ => KERNEL_CS,
            };
            let cs = far_target(cs);
            operand(mem, landing(instr, rng), size, 0);
            operand(mem, cs as u64, 2, size as u64);
        }
        _ => {}
    }
}
