//! `vcvtps2ph m, xmm/ymm, imm8` whose store faults. The CPU converts before it stores, so when
//! the store raises #PF (or #GP for a non-canonical address) MXCSR already has the
//! conversion's exception flags; and when one of them is unmasked, #XM wins over the memory
//! fault. Measured on an Intel Xeon in a Linux process (the MXCSR of the signal frame): an
//! inexact conversion stored to an unmapped page delivers #PF with PE set, and with PE
//! unmasked delivers #XM. The soft-MMU meets the fault on a TLB miss, before the host
//! instruction ran, so the engine converts here to learn the flags. An AMD EPYC leaves MXCSR as
//! it was and delivers the memory fault, PE unmasked or not (`cpu::vendor`,
//! `F16cStoreFaultKeepsConversion`): there the emitter never marks the store.

use crate::exit::{vector, GuestException};
use crate::state::GuestState;
use iced_x86::Instruction;

/// MXCSR exception flags (bits 0..5) and masks (bits 7..12).
const FLAGS: u32 = 0x3f;
const MASKS: u32 = 0x1f80;

/// The exception `instr` (a `vcvtps2ph` to memory, whose store raised `fault`) delivers, with
/// the conversion's flags added to the guest's MXCSR.
///
/// The EVEX forms convert only the elements their opmask selects (masked-off ones raise
/// nothing), and with {sae} raise no flags at all.
pub fn faulting_store(state: &mut GuestState, instr: &Instruction, fault: GuestException) -> GuestException {
    let mut src = super::regs::read_zmm(state, instr.op1_register().number());
    let lanes = instr.op1_register().size() / 4;
    if let Some(k) = super::regs::opmask_index(instr) {
        let k = super::regs::read_opmask(state, k);
        for lane in (0..lanes).filter(|l| k & (1 << l) == 0) {
            src[4 * lane..4 * lane + 4].fill(0); // +0.0 converts exactly
        }
    }
    src[4 * lanes..].fill(0);
    let mxcsr = state.xsave.mxcsr();
    // Every exception masked: the flags are wanted, not a host #XM.
    let guest = (mxcsr & !FLAGS) | MASKS;
    let raised = if instr.suppress_all_exceptions() {
        0
    } else if lanes == 4 {
        conversion_flags(
            src[..32].try_into().expect("32 bytes"),
            false,
            instr.immediate8(),
            guest,
        )
    } else {
        src.chunks_exact(32).fold(0, |flags, half| {
            flags | conversion_flags(half.try_into().expect("32 bytes"), true, instr.immediate8(), guest)
        })
    };
    state.xsave.set_mxcsr(mxcsr | raised);
    let unmasked = raised & !(mxcsr >> 7) & FLAGS;
    if unmasked != 0 {
        GuestException::new(vector::XM)
    } else {
        fault
    }
}

/// The MXCSR flags converting `src` (8 singles, or 4 when `!ymm`) to halves raises under
/// `mxcsr` (whose exceptions must all be masked) with rounding control `imm8`.
fn conversion_flags(src: &[u8; 32], ymm: bool, imm8: u8, mxcsr: u32) -> u32 {
    assert!(
        crate::host::features::host_has(iced_x86::CpuidFeature::F16C),
        "vcvtps2ph ran, so the host has F16C"
    );
    macro_rules! by_imm {
        ($($n:literal)*) => {
            match (imm8 & 7, ymm) {
                $(
                    // SAFETY: the host has F16C and AVX (checked above: the guest instruction
                    // ran on it); every exception is masked, so the conversion cannot trap.
                    ($n, true) => unsafe { convert::<$n, true>(src, mxcsr) },
                    ($n, false) => unsafe { convert::<$n, false>(src, mxcsr) },
                )*
                _ => unreachable!("imm8 & 7"),
            }
        };
    }
    // Bits 7..3 of imm8 are ignored by the CPU.
    by_imm!(0 1 2 3 4 5 6 7)
}

/// Converts under `mxcsr` and returns the flags it raised; the host's MXCSR is restored.
///
/// # Safety
/// The host must have F16C and AVX, and `mxcsr` must mask every exception.
#[target_feature(enable = "avx,f16c")]
unsafe fn convert<const IMM: u8, const YMM: bool>(src: &[u8; 32], mxcsr: u32) -> u32 {
    let mut csr = mxcsr & !FLAGS;
    let mut saved = 0u32;
    // SAFETY: the caller's guarantee; the block reads `src` (32 bytes), reads and writes the
    // two local words and restores the host's MXCSR before it ends.
    unsafe {
        if YMM {
            std::arch::asm!(
                "stmxcsr [{saved}]",
                "ldmxcsr [{csr}]",
                "vmovdqu {v}, [{src}]",
                "vcvtps2ph {o}, {v}, {imm}",
                "stmxcsr [{csr}]",
                "ldmxcsr [{saved}]",
                saved = in(reg) &mut saved,
                csr = in(reg) &mut csr,
                src = in(reg) src.as_ptr(),
                v = out(ymm_reg) _,
                o = out(xmm_reg) _,
                imm = const IMM,
                options(nostack),
            );
        } else {
            std::arch::asm!(
                "stmxcsr [{saved}]",
                "ldmxcsr [{csr}]",
                "vmovdqu {v:x}, [{src}]",
                "vcvtps2ph {o}, {v:x}, {imm}",
                "stmxcsr [{csr}]",
                "ldmxcsr [{saved}]",
                saved = in(reg) &mut saved,
                csr = in(reg) &mut csr,
                src = in(reg) src.as_ptr(),
                v = out(ymm_reg) _,
                o = out(xmm_reg) _,
                imm = const IMM,
                options(nostack),
            );
        }
    }
    csr & FLAGS
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Code, MemoryOperand, Register};

    fn floats(v: [f32; 8]) -> [u8; 32] {
        let mut b = [0u8; 32];
        for (i, f) in v.iter().enumerate() {
            b[4 * i..4 * i + 4].copy_from_slice(&f.to_le_bytes());
        }
        b
    }

    #[test]
    fn a_faulting_store_leaves_the_conversion_flags_in_mxcsr() {
        if !crate::host::features::host_has(iced_x86::CpuidFeature::F16C) {
            return;
        }
        // vcvtps2ph [rax], xmm1, 4 (round by MXCSR): 1.0001 is inexact in half precision.
        let instr = Instruction::with3(
            Code::VEX_Vcvtps2ph_xmmm64_xmm_imm8,
            MemoryOperand::with_base(Register::RAX),
            Register::XMM1,
            4,
        )
        .unwrap();
        let fault = GuestException::page_fault(0x1000, 6);
        let mut s = GuestState::default();
        super::super::regs::write_ymm(&mut s, 1, &floats([1.0001, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]));
        s.xsave.set_mxcsr(0x1f80);
        assert_eq!(faulting_store(&mut s, &instr, fault), fault);
        assert_eq!(s.xsave.mxcsr(), 0x1f80 | 0x20, "PE set by the conversion");
        // Exact values raise nothing.
        s.xsave.set_mxcsr(0x1f80);
        super::super::regs::write_ymm(&mut s, 1, &floats([1.0; 8]));
        assert_eq!(faulting_store(&mut s, &instr, fault), fault);
        assert_eq!(s.xsave.mxcsr(), 0x1f80);
        // PE unmasked: #XM instead of the page fault, PE set.
        super::super::regs::write_ymm(&mut s, 1, &floats([1.0001, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]));
        s.xsave.set_mxcsr(0x0f80);
        assert_eq!(faulting_store(&mut s, &instr, fault), GuestException::new(vector::XM));
        assert_eq!(s.xsave.mxcsr(), 0x0fa0);
    }
}
