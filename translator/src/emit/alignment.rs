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
//!
//! Alignment *checking* (#AC at CPL3 with CR0.AM and RFLAGS.AC) is the other half: which
//! granule an access must respect differs between vendors (`cpu::vendor` rows
//! `WideAccessesAlignmentChecked`, `MaskedAccessesCheckedPerElement`, `F16cSkipsAlignmentCheck`).
//! [`AlignmentCheck`] is decided per instruction here and travels in the miss info; on a TLB hit
//! the host instruction checks itself (the host runs guest user code with the guest's AC).

use crate::cpu::vendor::{self, Quirk};
use iced_x86::{Instruction, Mnemonic, OpKind, Register};

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
    /// An FXSAVE/XSAVE image: such an instruction neither reuses the previous instruction's
    /// host address nor leaves its own for the next (`memop.rs`). An SSE operand may: on a
    /// reused address the host instruction checks the alignment itself.
    pub(super) image: bool,
}

/// The granule alignment checking holds an instruction's accesses to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum AlignmentCheck {
    /// By the access's size: 2, 4 and 8 bytes (an 80-bit x87 operand: 8); wider accesses at
    /// 16 bytes where the vendor checks them, not at all elsewhere.
    #[default]
    BySize,
    /// Each element of a masked AVX-512 access (AMD): log2 of the element's size.
    PerElement(u8),
    /// Never checked (the host kernel performs the access, or the vendor skips the form).
    Never,
}

impl AlignmentCheck {
    /// The rule for `instr`'s explicit memory operand; `kernel_copies` for forms whose store the
    /// host kernel performs itself (Linux's UMIP emulation), without alignment checking.
    pub(super) fn for_instruction(instr: &Instruction, kernel_copies: bool) -> AlignmentCheck {
        let f16c = matches!(instr.mnemonic(), Mnemonic::Vcvtph2ps | Mnemonic::Vcvtps2ph);
        if kernel_copies || (f16c && vendor::host_has(Quirk::F16cSkipsAlignmentCheck)) {
            return AlignmentCheck::Never;
        }
        // Compress stores count as element accesses even without an opmask (measured:
        // `vpcompressb m512, zmm` is never checked; `vpexpandb zmm, m512` is checked at 16).
        let per_element = instr.op_mask() != Register::None || instr.op0_kind() == OpKind::Memory;
        if per_element
            && crate::mmu::masked::is_masked_access(instr)
            && vendor::host_has(Quirk::MaskedAccessesCheckedPerElement)
        {
            return AlignmentCheck::PerElement(crate::mmu::masked::element_size(instr).min(16).trailing_zeros() as u8);
        }
        AlignmentCheck::BySize
    }

    /// log2 of the alignment an access of `size` bytes must have (0: unchecked).
    pub(super) fn granule_log2(self, size: u64) -> u8 {
        match self {
            AlignmentCheck::Never => 0,
            AlignmentCheck::PerElement(log2) => log2,
            AlignmentCheck::BySize => match size {
                2 | 4 | 8 => size.trailing_zeros() as u8,
                10 => 3,
                16 | 32 | 64 if vendor::host_has(Quirk::WideAccessesAlignmentChecked) => 4,
                _ => 0,
            },
        }
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

/// The SHA extensions (their m128 operand needs no alignment on some vendors).
fn sha(m: Mnemonic) -> bool {
    matches!(
        m,
        Mnemonic::Sha1rnds4
            | Mnemonic::Sha1nexte
            | Mnemonic::Sha1msg1
            | Mnemonic::Sha1msg2
            | Mnemonic::Sha256rnds2
            | Mnemonic::Sha256msg1
            | Mnemonic::Sha256msg2
    )
}

/// The alignment requirement of `instr`'s explicit memory operand.
pub(super) fn requirement(instr: &Instruction) -> Requirement {
    let m = instr.mnemonic();
    let image = super::xstate::required_alignment_log2(instr);
    if image != 0 {
        return Requirement {
            log2: image,
            plain_gp: super::xstate::is_xstate(instr) && vendor::host_has(Quirk::XsaveMisalignmentIsGp),
            image: true,
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
        image: false,
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
    if legacy && sse && size == 16 && !unaligned_sse(m) && !(sha(m) && vendor::host_has(Quirk::ShaOperandsUnaligned)) {
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
    fn alignment_check_granules_follow_the_host_vendor() {
        let amd = vendor::host_has(Quirk::MaskedAccessesCheckedPerElement);
        let mem = MemoryOperand::with_base(Register::RAX);
        let mut masked = Instruction::with2(Code::EVEX_Vmovups_zmm_k1z_zmmm512, Register::ZMM1, mem).unwrap();
        masked.set_op_mask(Register::K1);
        let unmasked = Instruction::with2(Code::EVEX_Vmovups_zmm_k1z_zmmm512, Register::ZMM1, mem).unwrap();
        let widen = {
            let mut i = Instruction::with2(Code::EVEX_Vpmovzxbq_zmm_k1z_xmmm64, Register::ZMM1, mem).unwrap();
            i.set_op_mask(Register::K1);
            i
        };
        let rule = |i: &Instruction| AlignmentCheck::for_instruction(i, false);
        // Measured on an AMD EPYC: `vmovups zmm{k1}` at 4-byte granules, `vpmovzxbq zmm{k1}`
        // never, unmasked 64-byte accesses at 16; on an Intel Xeon by size, never above 8.
        if amd {
            assert_eq!(rule(&masked).granule_log2(64), 2);
            assert_eq!(rule(&widen).granule_log2(8), 0);
            assert_eq!(rule(&unmasked).granule_log2(64), 4);
        } else {
            assert_eq!(rule(&masked).granule_log2(64), 0);
            assert_eq!(rule(&widen).granule_log2(8), 3);
            assert_eq!(rule(&unmasked).granule_log2(64), 0);
        }
        assert_eq!(AlignmentCheck::BySize.granule_log2(4), 2);
        assert_eq!(AlignmentCheck::BySize.granule_log2(10), 3);
        assert_eq!(AlignmentCheck::for_instruction(&unmasked, true), AlignmentCheck::Never);
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
