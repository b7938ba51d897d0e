//! Memory operands the CPU requires to be aligned, checked before any page walk: a misaligned
//! one raises #GP(0) without touching its pages (no accessed or dirty bit set, no #PF even when
//! the page is not mapped). The soft-MMU reproduces that on a TLB miss (`engine/softmmu.rs`
//! checks the requirement the miss info carries before it walks); on a TLB hit the host
//! instruction itself faults, since host addresses keep the guest's page offsets.
//!
//! Measured on an Intel Xeon (a native Linux process, an operand 8 bytes past a 16-byte
//! boundary in a page that is not mapped): #GP(0) for every legacy-SSE instruction with a
//! 16-byte memory operand except the unaligned forms below, for `cmpxchg16b`, and for the VEX
//! aligned and non-temporal moves (16 or 32 bytes); #PF for every other VEX form. The EVEX
//! aligned and non-temporal moves (16, 32 or 64 bytes) are checked the same way, masked or not
//! (the differential harness compares them with the CPU). With
//! RFLAGS.AC and CR0.AM set a misaligned SSE operand still raises #GP(0) (not #AC), unlike the
//! FXSAVE/XSAVE images.

use iced_x86::{Instruction, Mnemonic, OpKind};

/// What an instruction's memory operand must respect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Requirement {
    /// log2 of the required alignment; 0 = none.
    pub(super) log2: u8,
    /// Misalignment is #GP(0) whatever alignment checking says (SSE operands, `cmpxchg16b`);
    /// otherwise (FXSAVE/XSAVE images) #AC comes first for an image not even 4-byte aligned.
    pub(super) plain_gp: bool,
    /// AMD's misaligned SSE mode (MXCSR.MM) lifts the requirement: legacy-SSE forms other than
    /// the explicitly aligned moves.
    pub(super) waived_by_mm: bool,
}

impl Requirement {
    /// An FXSAVE/XSAVE image's requirement: such an instruction neither reuses the previous
    /// instruction's host address nor leaves its own for the next (`memop.rs`). An SSE
    /// operand may: on a reused address the host instruction checks the alignment itself.
    pub(super) fn image(self) -> bool {
        self.log2 != 0 && !self.plain_gp
    }
}

/// Explicitly aligned moves: the requirement holds in every encoding and in misaligned SSE
/// mode too.
fn aligned_move(m: Mnemonic) -> bool {
    matches!(
        m,
        Mnemonic::Movaps
            | Mnemonic::Movapd
            | Mnemonic::Movdqa
            | Mnemonic::Movntps
            | Mnemonic::Movntpd
            | Mnemonic::Movntdq
            | Mnemonic::Movntdqa
            | Mnemonic::Vmovaps
            | Mnemonic::Vmovapd
            | Mnemonic::Vmovdqa
            | Mnemonic::Vmovntps
            | Mnemonic::Vmovntpd
            | Mnemonic::Vmovntdq
            | Mnemonic::Vmovntdqa
            | Mnemonic::Vmovdqa32
            | Mnemonic::Vmovdqa64
    )
}

/// Legacy-SSE forms with a 16-byte operand that may be misaligned (SDM: MOVUPS, MOVUPD,
/// MOVDQU, LDDQU and the string compares).
fn unaligned_sse(m: Mnemonic) -> bool {
    matches!(
        m,
        Mnemonic::Movups
            | Mnemonic::Movupd
            | Mnemonic::Movdqu
            | Mnemonic::Lddqu
            | Mnemonic::Pcmpestri
            | Mnemonic::Pcmpestri64
            | Mnemonic::Pcmpestrm
            | Mnemonic::Pcmpestrm64
            | Mnemonic::Pcmpistri
            | Mnemonic::Pcmpistrm
    )
}

/// The alignment requirement of `instr`'s explicit memory operand.
pub(super) fn requirement(instr: &Instruction) -> Requirement {
    let m = instr.mnemonic();
    let image = super::xstate::required_alignment_log2(instr);
    if image != 0 {
        return Requirement {
            log2: image,
            ..Requirement::default()
        };
    }
    let has_memory = (0..instr.op_count()).any(|i| instr.op_kind(i) == OpKind::Memory);
    if !has_memory {
        return Requirement::default();
    }
    let size = instr.memory_size().size();
    let plain = |log2: u8, waived_by_mm: bool| Requirement {
        log2,
        plain_gp: true,
        waived_by_mm,
    };
    if m == Mnemonic::Cmpxchg16b {
        return plain(4, false);
    }
    if aligned_move(m) && matches!(size, 16 | 32 | 64) {
        return plain(size.trailing_zeros() as u8, false);
    }
    let legacy = instr.code().op_code().encoding() == iced_x86::EncodingKind::Legacy;
    // An SSE instruction: an XMM register operand, or MMX for `cvtpd2pi mm, m128`.
    let sse = (0..instr.op_count()).any(|i| {
        instr.op_kind(i) == OpKind::Register && (instr.op_register(i).is_xmm() || instr.op_register(i).is_mm())
    });
    if legacy && sse && size == 16 && !unaligned_sse(m) {
        return plain(4, true);
    }
    Requirement::default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Code, MemoryOperand, Register};

    fn with_memory(code: Code, reg: Register) -> Instruction {
        let m = MemoryOperand::with_base(Register::RAX);
        let i = if code.op_code().op_kind(0) == iced_x86::OpCodeOperandKind::xmm_or_mem
            || code.op_code().op_kind(0) == iced_x86::OpCodeOperandKind::ymm_or_mem
            || code.op_code().op_kind(0) == iced_x86::OpCodeOperandKind::mem
        {
            Instruction::with2(code, m, reg)
        } else {
            Instruction::with2(code, reg, m)
        };
        i.unwrap()
    }

    #[test]
    fn sse_operands_measured_on_the_cpu() {
        let req = |code, reg| requirement(&with_memory(code, reg));
        // #GP(0) before the page walk on an Intel Xeon.
        for (code, reg, log2) in [
            (Code::Movaps_xmmm128_xmm, Register::XMM1, 4),
            (Code::Addps_xmm_xmmm128, Register::XMM1, 4),
            (Code::Pshufb_xmm_xmmm128, Register::XMM1, 4),
            (Code::Movntdqa_xmm_m128, Register::XMM1, 4),
            (Code::Cvtpd2pi_mm_xmmm128, Register::MM1, 4),
            (Code::VEX_Vmovaps_ymmm256_ymm, Register::YMM1, 5),
            (Code::VEX_Vmovntdq_m128_xmm, Register::XMM1, 4),
        ] {
            let r = req(code, reg);
            assert_eq!((r.log2, r.plain_gp), (log2, true), "{code:?}");
        }
        // #PF: no requirement.
        for (code, reg) in [
            (Code::Movups_xmm_xmmm128, Register::XMM1),
            (Code::Lddqu_xmm_m128, Register::XMM1),
            (Code::VEX_Vaddps_ymm_ymm_ymmm256, Register::YMM1),
            (Code::Movq_xmm_rm64, Register::XMM1),
        ] {
            let i = if code == Code::VEX_Vaddps_ymm_ymm_ymmm256 {
                Instruction::with3(code, reg, reg, MemoryOperand::with_base(Register::RAX)).unwrap()
            } else {
                with_memory(code, reg)
            };
            assert_eq!(requirement(&i), Requirement::default(), "{code:?}");
        }
        let c = Instruction::with1(Code::Cmpxchg16b_m128, MemoryOperand::with_base(Register::RAX)).unwrap();
        assert_eq!(requirement(&c).log2, 4);
        // AMD's misaligned SSE mode lifts it for arithmetic, never for the aligned moves.
        assert!(req(Code::Addps_xmm_xmmm128, Register::XMM1).waived_by_mm);
        assert!(!req(Code::Movaps_xmmm128_xmm, Register::XMM1).waived_by_mm);
    }
}
