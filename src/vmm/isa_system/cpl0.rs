//! Where KVM on this host (kvm_pvm: no VT-x/AMD-V; guest CPL0 runs through KVM's in-kernel
//! instruction emulator and pvm's own paths) runs privileged instructions at CPL0 differently
//! from the CPU, case by case. Each row was measured with `hbt isa-test --system --cpl0` on an
//! Intel Xeon (Sapphire Rapids) host, checked against the SDM, and is the reason a case is not
//! compared; the README lists them. Forms KVM cannot run at all (an emulation failure: `int3`,
//! `retf`, `lar`, …) are found at run time and reported the same way.

use hbt_translator::harness::system::{Case, Unfit};
use iced_x86::{Code, Mnemonic as M, Register};

/// The CR4 bits of features the CPU model hides (UMIP, FSGSBASE, SMEP, SMAP, PKE:
/// `src/vmm/cpuid.rs`): the CPU model's CPU raises #GP(0) for them; kvm_pvm sets them.
const CR4_HIDDEN_ACCEPTED: u64 = (1 << 11) | (1 << 16) | (1 << 20) | (1 << 21) | (1 << 22);
/// RFLAGS bits `sysretq` takes from R11 (the SDM: R11 & 3C7FD7H).
const SYSRET_FLAGS: u64 = 0x3c_7fd7;
const MSR_TSC_AUX: u32 = 0xc000_0103;
const USER_IOPL: u64 = 3 << 12;
const NT: u64 = 1 << 14;
const AC: u64 = 1 << 18;
/// MSRs holding a linear address: a non-canonical value raises #GP(0) on Intel.
const ADDRESS_MSRS: [u32; 7] = [
    0xc000_0100, // FS_BASE
    0xc000_0101, // GS_BASE
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
];

fn canonical(v: u64) -> bool {
    ((v << 16) as i64 >> 16) as u64 == v
}

fn case(why: &str) -> Option<Unfit> {
    Some(Unfit::Case(format!("kvm_pvm at CPL0: {why}")))
}

/// How kvm_pvm runs this CPL0 case differently from the CPU, if it does.
pub fn unfit_case(c: &Case) -> Option<Unfit> {
    let instr = &c.instance.instr;
    let s = c.state;
    match instr.mnemonic() {
        M::Mov if instr.op0_register().is_cr() => {
            let v = c.register(1)?;
            match instr.op0_register() {
                Register::CR0 | Register::CR4 if v >> 32 != 0 => {
                    case("ignores the upper half of a CR0/CR4 value (the CPU raises #GP(0))")
                }
                Register::CR4 if (v ^ s.cr4) & CR4_HIDDEN_ACCEPTED != 0 => case(
                    "sets CR4 bits of features the CPU model does not offer (UMIP, FSGSBASE, SMEP, SMAP, PKE), where that CPU raises #GP(0)",
                ),
                _ => None,
            }
        }
        M::Mov if instr.op0_register().is_dr() => {
            let v = c.register(1)?;
            let n = instr.op0_register().number();
            let aliased = matches!(n, 4 | 5) && s.cr4 & (1 << 3) == 0;
            ((n >= 6 || aliased) && v >> 32 != 0)
                .then(|| case("ignores the upper half of a DR6/DR7 value (the CPU raises #GP(0))"))
                .flatten()
        }
        M::Rdmsr | M::Wrmsr => {
            let index = s.gpr[1] as u32;
            let value = (s.gpr[2] << 32) | (s.gpr[0] & 0xffff_ffff);
            let writing = instr.mnemonic() == M::Wrmsr;
            if index == MSR_TSC_AUX {
                case("raises #GP(0) for IA32_TSC_AUX: its CPU has neither RDTSCP nor RDPID, the model's has both")
            } else if writing && ADDRESS_MSRS.contains(&index) && !canonical(value) {
                case("writes a non-canonical address into FS/GS/KERNEL_GS base, LSTAR, CSTAR or SYSENTER_ESP/EIP (the CPU raises #GP(0))")
            } else if writing && index == 0x277 && value.to_le_bytes().iter().any(|&t| !matches!(t, 0 | 1 | 4..=7)) {
                case("writes reserved memory types into IA32_PAT (the CPU raises #GP(0))")
            } else {
                None
            }
        }
        M::Lgdt | M::Lidt => {
            let base = c.operand(2, 8)?;
            (!canonical(base))
                .then(|| case("loads a non-canonical GDTR/IDTR base (the translator raises #GP(0), as AMD's manual says and KVM's own emulator does)"))
                .flatten()
        }
        M::Ltr => {
            let selector = match c.register(0) {
                Some(v) => v as u16,
                None => c.operand(0, 2)? as u16,
            };
            let index = (selector >> 3) as u64 * 8;
            if selector & 4 == 0 && index + 7 <= s.sys.gdtr.limit as u64 && index + 15 > s.sys.gdtr.limit as u64 {
                case("loads a TSS descriptor whose upper half lies past the GDT limit (the CPU raises #GP(selector))")
            } else {
                Some(Unfit::ErrorCode(
                    "kvm_pvm at CPL0: `ltr` faults with error code 0 where the CPU reports the selector".into(),
                ))
            }
        }
        M::Str | M::Sldt | M::Mov
            if matches!(instr.code(), Code::Str_r64m16 | Code::Sldt_r64m16 | Code::Mov_r64m16_Sreg)
                && instr.op0_kind() == iced_x86::OpKind::Memory =>
        {
            case("stores 8 bytes where the CPU stores the 16-bit selector (REX.W form to memory)")
        }
        M::Insb | M::Insw | M::Insd | M::Outsb | M::Outsw | M::Outsd
            if instr.has_rep_prefix() || instr.has_repne_prefix() =>
        {
            let n = instr.memory_size().size() as u64;
            let count = s.gpr[1];
            let start = if matches!(instr.mnemonic(), M::Insb | M::Insw | M::Insd) { s.gpr[7] } else { s.gpr[6] };
            let (lo, hi) = if s.rflags & (1 << 10) != 0 {
                (start.wrapping_sub(count.saturating_sub(1) * n), start.wrapping_add(n))
            } else {
                (start, start.wrapping_add(count * n))
            };
            (count > 0 && lo >> 12 != (hi - 1) >> 12)
                .then(|| case("does a `rep ins`/`rep outs` that crosses a page as one block: a fault undoes the iterations before it, which the CPU keeps"))
                .flatten()
        }
        M::Iretq => iret_frame(c),
        M::Retf => Some(Unfit::FaultAddress(
            "kvm_pvm at CPL0: a far return whose frame faults reports the offset's address; the CPU reads the selector first (measured at CPL3), so the #PF address is not compared".into(),
        )),
        M::Sysretq => {
            let (rcx, r11) = (s.gpr[1], s.gpr[11]);
            if s.efer & 1 == 0 {
                case("runs `sysretq` with EFER.SCE clear (the CPU raises #UD)")
            } else if !canonical(rcx) {
                case("returns to a non-canonical RCX and faults at CPL3, as AMD does (Intel raises #GP(0) at CPL0)")
            } else if r11 & !SYSRET_FLAGS != 0 || r11 & (USER_IOPL | NT) != 0 {
                case("loads RFLAGS bits `sysretq` does not (R11 outside 3C7FD7H) and drops IOPL and NT")
            } else {
                None
            }
        }
        _ => None,
    }
}

/// `iretq` frames kvm_pvm handles as the CPU does: to CPL0 (CS 0x10, SS 0x18 or null) or CPL3
/// (CS 0x33, SS 0x2b or 0x7b) at a canonical RIP. Others it does not check as the CPU does
/// (measured: it loads a gate's selector into CS, transfers to a non-canonical RIP and faults
/// there, checks SS before CS).
fn iret_frame(c: &Case) -> Option<Unfit> {
    // Whatever the frame: the emulator reads it from the RIP slot up, where the CPU reads
    // RFLAGS, CS and RIP first (measured at CPL3), so when reading it faults, the #PF address
    // differs.
    let order = || {
        Some(Unfit::FaultAddress(
            "kvm_pvm at CPL0: the emulator reads an `iretq` frame from the RIP slot up; the CPU reads RFLAGS, CS and RIP first (measured at CPL3), so a faulting frame's #PF address is not compared".into(),
        ))
    };
    let (Some(rip), Some(cs), Some(flags), Some(ss)) = (c.stack(0, 8), c.stack(8, 8), c.stack(16, 8), c.stack(32, 8))
    else {
        return order();
    };
    let cs = cs as u16;
    let ss = ss as u16;
    let fine = canonical(rip) && matches!((cs, ss), (0x10, 0x18 | 0) | (0x33, 0x2b | 0x7b));
    if c.state.rflags & NT != 0 {
        None
    } else if !fine {
        case("does not check an `iretq` frame as the CPU does (a non-code CS, a non-canonical RIP, SS before CS)")
    } else if cs == 0x33 && flags & (USER_IOPL | AC | NT) != 0 {
        case("returns to CPL3 with IOPL 0, AC and NT clear whatever the `iretq` frame says")
    } else {
        order()
    }
}
