//! Masked AVX-512 memory operands: which bytes an access really touches.
//!
//! An EVEX instruction with an opmask reads or writes only the elements whose mask bit is set,
//! and a masked-off element neither faults nor marks its page accessed or dirty (memory fault
//! suppression): `vmovdqu8 zmm0{k1}{z}, [rdi]` may end in an unmapped page as long as the mask
//! stops short of it — glibc's AVX-512 string functions rely on that for their tails. Compress
//! stores and expand loads touch the first popcount(mask) elements, packed. A broadcast reads
//! the elements (of its tuple) some active lane repeats. Forms whose memory elements do not map
//! to mask lanes (shuffles, shift counts, pairwise products) read the whole operand.
//!
//! Under the identity strategy the host CPU does all this itself. The soft-MMU's miss path
//! (`engine/softmmu.rs`) asks [`first_touched`] which of the (at most two) pages an access
//! spans hold an active byte, walks only those, and reports a fault at that byte.

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

/// Whether `instr` is an EVEX instruction whose memory operand is accessed per element under
/// its opmask (so masked-off elements must not fault): its memory elements correspond one to
/// one to the mask's lanes (a full-vector operand, a scalar, a widening load or narrowing
/// store, a compress or expand), or it broadcasts one element or tuple to every lane, and it
/// is not one of the shuffles that read the whole operand whatever the mask
/// ([`reads_whole_operand`]). A shift count or other fixed-size operand is read whole.
pub fn is_masked_access(instr: &Instruction) -> bool {
    let has_memory = (0..instr.op_count()).any(|i| instr.op_kind(i) == OpKind::Memory);
    if !has_memory
        || instr.code().op_code().encoding() != iced_x86::EncodingKind::EVEX
        || !(instr.op_mask() != Register::None || packs_elements(instr.mnemonic()))
        || reads_whole_operand(instr.mnemonic())
        || is_shift_count(instr)
    {
        return false;
    }
    let size = instr.memory_size().size();
    let element = element_size(instr) as usize;
    instr.is_broadcast()
        || broadcasts(instr.mnemonic())
        || packs_elements(instr.mnemonic())
        || converts(instr.mnemonic())
        || size == vector_length(instr)
        || size == element
}

/// `vpsllw/vpsrld/vpsraq… v, v, xmm/m128`: the memory operand is the shift count, read whole
/// (measured: `vpsllw xmm1{k1}, xmm2, [p-8]` with k1 = 0 faults).
fn is_shift_count(instr: &Instruction) -> bool {
    matches!(
        instr.mnemonic(),
        Mnemonic::Vpsllw
            | Mnemonic::Vpslld
            | Mnemonic::Vpsllq
            | Mnemonic::Vpsrlw
            | Mnemonic::Vpsrld
            | Mnemonic::Vpsrlq
            | Mnemonic::Vpsraw
            | Mnemonic::Vpsrad
            | Mnemonic::Vpsraq
    ) && instr.op_count() == 3
        && instr.op2_kind() == OpKind::Memory
}

/// Shuffles and other forms whose memory elements do not map to the destination's lanes: the
/// CPU reads the whole operand (measured: `vpermq`, `vpshufb`, `vpunpcklbw`, `valignq`,
/// `vpmaddwd` with a one-element or empty mask fault on an unmapped second half; the
/// differential harness checks every form's straddling accesses against the CPU).
fn reads_whole_operand(m: Mnemonic) -> bool {
    NO_FAULT_SUPPRESSION.contains(&m)
}

/// Mnemonics (EVEX forms) without memory fault suppression.
const NO_FAULT_SUPPRESSION: &[Mnemonic] = &[
    Mnemonic::Vpermb,
    Mnemonic::Vpermw,
    Mnemonic::Vpermd,
    Mnemonic::Vpermq,
    Mnemonic::Vpermps,
    Mnemonic::Vpermpd,
    Mnemonic::Vpermi2b,
    Mnemonic::Vpermi2w,
    Mnemonic::Vpermi2d,
    Mnemonic::Vpermi2q,
    Mnemonic::Vpermi2ps,
    Mnemonic::Vpermi2pd,
    Mnemonic::Vpermt2b,
    Mnemonic::Vpermt2w,
    Mnemonic::Vpermt2d,
    Mnemonic::Vpermt2q,
    Mnemonic::Vpermt2ps,
    Mnemonic::Vpermt2pd,
    Mnemonic::Vpermilps,
    Mnemonic::Vpermilpd,
    Mnemonic::Vpshufb,
    Mnemonic::Vpshufd,
    Mnemonic::Vpshufhw,
    Mnemonic::Vpshuflw,
    Mnemonic::Vshufps,
    Mnemonic::Vshufpd,
    Mnemonic::Vshuff32x4,
    Mnemonic::Vshuff64x2,
    Mnemonic::Vshufi32x4,
    Mnemonic::Vshufi64x2,
    Mnemonic::Valignd,
    Mnemonic::Valignq,
    Mnemonic::Vpalignr,
    Mnemonic::Vpunpcklbw,
    Mnemonic::Vpunpckhbw,
    Mnemonic::Vpunpcklwd,
    Mnemonic::Vpunpckhwd,
    Mnemonic::Vpunpckldq,
    Mnemonic::Vpunpckhdq,
    Mnemonic::Vpunpcklqdq,
    Mnemonic::Vpunpckhqdq,
    Mnemonic::Vunpcklps,
    Mnemonic::Vunpckhps,
    Mnemonic::Vunpcklpd,
    Mnemonic::Vunpckhpd,
    Mnemonic::Vpacksswb,
    Mnemonic::Vpackssdw,
    Mnemonic::Vpackuswb,
    Mnemonic::Vpackusdw,
    Mnemonic::Vpsadbw,
    Mnemonic::Vmovsldup,
    Mnemonic::Vmovshdup,
    Mnemonic::Vmovddup,
    Mnemonic::Vpconflictd,
    Mnemonic::Vpconflictq,
    Mnemonic::Vcvtne2ps2bf16,
    // A qword of the matrix operand serves eight byte lanes.
    Mnemonic::Vgf2p8affineqb,
    Mnemonic::Vgf2p8affineinvqb,
    // Pairs of memory elements make one destination element.
    Mnemonic::Vpmaddwd,
    Mnemonic::Vpmaddubsw,
    Mnemonic::Vdbpsadbw,
    Mnemonic::Vpmultishiftqb,
    Mnemonic::Vinserti32x4,
    Mnemonic::Vinserti64x2,
    Mnemonic::Vinserti32x8,
    Mnemonic::Vinserti64x4,
    Mnemonic::Vinsertf32x4,
    Mnemonic::Vinsertf64x2,
    Mnemonic::Vinsertf32x8,
    Mnemonic::Vinsertf64x4,
];

/// Broadcasts from memory: one element or tuple read for every lane.
fn broadcasts(m: Mnemonic) -> bool {
    matches!(
        m,
        Mnemonic::Vpbroadcastb
            | Mnemonic::Vpbroadcastw
            | Mnemonic::Vpbroadcastd
            | Mnemonic::Vpbroadcastq
            | Mnemonic::Vbroadcastss
            | Mnemonic::Vbroadcastsd
            | Mnemonic::Vbroadcasti32x2
            | Mnemonic::Vbroadcasti32x4
            | Mnemonic::Vbroadcasti64x2
            | Mnemonic::Vbroadcasti32x8
            | Mnemonic::Vbroadcasti64x4
            | Mnemonic::Vbroadcastf32x2
            | Mnemonic::Vbroadcastf32x4
            | Mnemonic::Vbroadcastf64x2
            | Mnemonic::Vbroadcastf32x8
            | Mnemonic::Vbroadcastf64x4
    )
}

/// Widening loads and narrowing stores (`vpmovzx*`, `vpmovsx*`, `vpmov*` down-conversions,
/// `vcvt*`): memory element i belongs to lane i. A table by mnemonic, built once.
fn converts(m: Mnemonic) -> bool {
    static TABLE: std::sync::OnceLock<Vec<bool>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        Mnemonic::values()
            .map(|m| {
                let name = format!("{m:?}");
                (name.starts_with("Vpmov") && !name.contains("2m") && !name.contains("m2")) || name.starts_with("Vcvt")
            })
            .collect()
    })[m as usize]
}

/// Compress stores and expand loads: the active elements are packed at the operand's start.
fn packs_elements(m: Mnemonic) -> bool {
    matches!(
        m,
        Mnemonic::Vpcompressb
            | Mnemonic::Vpcompressw
            | Mnemonic::Vpcompressd
            | Mnemonic::Vpcompressq
            | Mnemonic::Vcompressps
            | Mnemonic::Vcompresspd
            | Mnemonic::Vpexpandb
            | Mnemonic::Vpexpandw
            | Mnemonic::Vpexpandd
            | Mnemonic::Vpexpandq
            | Mnemonic::Vexpandps
            | Mnemonic::Vexpandpd
    )
}

/// The widest vector register `instr` names (its vector length), in bytes; for a form with
/// none (`vfpclassps k{k}, m256`) its memory operand's size.
fn vector_length(instr: &Instruction) -> usize {
    (0..instr.op_count())
        .filter(|&i| instr.op_kind(i) == OpKind::Register)
        .map(|i| instr.op_register(i))
        .filter(|r| r.is_xmm() || r.is_ymm() || r.is_zmm())
        .map(|r| r.size())
        .max()
        .unwrap_or(instr.code().op_code().memory_size().size())
}

/// The first byte the masked access of `instr` (see [`is_masked_access`]) touches among the
/// offsets `from..to` of its memory operand, given its opmask's value `mask` (all ones for
/// `k0`): None when every element there is masked off.
pub fn first_touched(instr: &Instruction, mask: u64, from: u64, to: u64) -> Option<u64> {
    touched_elements(instr, mask)
        .filter(|&(start, end)| start < to && from < end)
        .map(|(start, _)| start.max(from))
        .min()
}

/// The last byte the masked access of `instr` touches (see [`first_touched`]): where an
/// Intel CPU reports a masked store's fault in its second page when the first page holds an
/// active element too (`cpu::vendor::Quirk::MaskedStoreFaultAtLastByte`).
pub fn last_touched(instr: &Instruction, mask: u64) -> Option<u64> {
    touched_elements(instr, mask).map(|(_, end)| end - 1).max()
}

/// The byte ranges (offsets into the memory operand) of the elements the masked access of
/// `instr` touches under `mask`.
fn touched_elements(instr: &Instruction, mask: u64) -> Box<dyn Iterator<Item = (u64, u64)>> {
    let size = instr.memory_size().size() as u64;
    let element = element_size(instr);
    if instr.is_broadcast() || broadcasts(instr.mnemonic()) {
        // Lane i reads memory element i mod (elements): a tuple broadcast reads the elements
        // some active lane repeats (measured: `vbroadcasti32x4 zmm1{k1}` with k1 = 0x11 reads
        // only dword 0), an element broadcast its one element when any lane is active. An
        // embedded broadcast stands for the form's whole memory operand (`vcvttpd2udq xmm{k},
        // m64{1to4}` has four lanes), a broadcast instruction fills its destination.
        let vector = if instr.is_broadcast() {
            instr.code().op_code().memory_size().size()
        } else {
            vector_length(instr)
        };
        let lanes = (vector as u64 / element).min(64);
        let elements = (size / element).max(1);
        return Box::new(
            (0..lanes)
                .filter(move |lane| mask & (1 << lane) != 0)
                .map(move |lane| (lane % elements) * element)
                .map(move |start| (start, start + element)),
        );
    }
    let lanes = (size / element).min(64);
    let mask = mask & lane_mask(lanes);
    if packs_elements(instr.mnemonic()) {
        let bytes = mask.count_ones() as u64 * element;
        return Box::new((bytes > 0).then_some((0, bytes)).into_iter());
    }
    Box::new(
        (0..lanes)
            .filter(move |lane| mask & (1 << lane) != 0)
            .map(move |lane| (lane * element, (lane + 1) * element)),
    )
}

/// The size of the elements the opmask selects in `instr`'s memory operand: EVEX.W's element
/// size where the form can broadcast (`vpmuludq` reads the low dword of each qword lane, and
/// faults at the qword), else the operand's own element size.
pub fn element_size(instr: &Instruction) -> u64 {
    let op = instr.code().op_code();
    // FP16 complex scalars: one mask bit for the pair of halves.
    if matches!(
        instr.mnemonic(),
        Mnemonic::Vfcmaddcsh | Mnemonic::Vfmaddcsh | Mnemonic::Vfcmulcsh | Mnemonic::Vfmulcsh
    ) {
        return 4;
    }
    let size = if op.can_broadcast() {
        op.broadcast_memory_size().size()
    } else {
        instr.memory_size().element_size()
    };
    (size as u64).max(1)
}

fn lane_mask(lanes: u64) -> u64 {
    if lanes >= 64 {
        u64::MAX
    } else {
        (1 << lanes) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Code, MemoryOperand};

    fn load(code: Code, k: Register) -> Instruction {
        let mut i = Instruction::with2(code, Register::ZMM1, MemoryOperand::with_base(Register::RDI)).unwrap();
        i.set_op_mask(k);
        i
    }

    #[test]
    fn only_active_elements_touch_memory() {
        let i = load(Code::EVEX_Vmovdqu8_zmm_k1z_zmmm512, Register::K1);
        assert!(is_masked_access(&i));
        // Bytes 0..3 active: the first page (offsets 0..40) is touched, the rest is not.
        assert_eq!(first_touched(&i, 0b111, 0, 40), Some(0));
        assert_eq!(first_touched(&i, 0b110, 0, 40), Some(1));
        assert_eq!(first_touched(&i, 0b111, 40, 64), None);
        assert_eq!(first_touched(&i, 0, 0, 64), None);
        let d = load(Code::EVEX_Vmovdqu32_zmm_k1z_zmmm512, Register::K2);
        // Dword 10 covers bytes 40..44.
        assert_eq!(first_touched(&d, 1 << 10, 40, 64), Some(40));
        assert_eq!(
            first_touched(&d, 1 << 10, 42, 64),
            Some(42),
            "straddling: the page's first byte"
        );
        assert_eq!(first_touched(&d, 1 << 10, 44, 64), None);
        assert_eq!(first_touched(&d, 1 << 16, 0, 64), None, "only 16 dword lanes");
        // The last byte of the last active element (Intel's CR2 for a split masked store).
        assert_eq!(last_touched(&d, 1 | 1 << 5), Some(23));
        assert_eq!(last_touched(&d, 1 << 16), None);
        let unmasked = load(Code::EVEX_Vmovdqu8_zmm_k1z_zmmm512, Register::None);
        assert!(!is_masked_access(&unmasked));
    }

    #[test]
    fn compress_and_broadcast() {
        let mut c = Instruction::with2(
            Code::EVEX_Vpcompressd_zmmm512_k1z_zmm,
            MemoryOperand::with_base(Register::RDI),
            Register::ZMM1,
        )
        .unwrap();
        c.set_op_mask(Register::K1);
        // Three active dwords are stored packed at bytes 0..12, wherever their lanes are.
        assert_eq!(first_touched(&c, 0b1000_0000_0000_0101 | 1 << 9, 8, 64), Some(8));
        assert_eq!(first_touched(&c, 0b1000_0000_0000_0101, 12, 64), None);
        assert_eq!(last_touched(&c, 0b1000_0000_0000_0101), Some(11));
        let mut b = Instruction::with3(
            Code::EVEX_Vpaddd_zmm_k1z_zmm_zmmm512b32,
            Register::ZMM1,
            Register::ZMM2,
            MemoryOperand::with_base(Register::RDI),
        )
        .unwrap();
        b.set_is_broadcast(true);
        b.set_op_mask(Register::K1);
        assert_eq!(first_touched(&b, 1 << 15, 0, 4), Some(0));
        assert_eq!(first_touched(&b, 1 << 16, 0, 4), None, "16 dword lanes in a zmm");
    }
}
