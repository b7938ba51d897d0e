//! Where Intel and AMD CPUs behave differently, as one table.
//!
//! The translator behaves like the host it runs on (a guest is shown the host's vendor through
//! CPUID), and the differential harness compares against that host, so each row below is tested
//! on whichever vendor CI lands on. A row names the instruction, what each vendor does, and how
//! the difference was found; code asks [`host_has`] (or [`Vendor::has`] in tests) for a quirk
//! instead of testing the vendor itself.

/// CPU vendors by CPUID leaf 0 (Hygon's Dhyana is an AMD Zen design; Zhaoxin/Centaur follow
/// Intel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
}

/// Behaviours that differ between vendors. Each is the behaviour of the vendors listed in its
/// [`QUIRKS`] row; the others do what the row's other column says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quirk {
    /// REX.W far pointers are m16:32, not m16:64.
    FarPointerIgnoresRexW,
    /// A far return whose CS RPL is not the CPL reads the outer SS:RSP before checking CS.
    RetfReadsOuterStackFirst,
    /// A faulting MMX store has already set FSW.TOP to 0.
    FaultingMmxStoreResetsTop,
    /// The F16C conversions never raise #AC.
    F16cSkipsAlignmentCheck,
    /// Alignment checking covers 16-, 32- and 64-byte accesses too, at 16 bytes.
    WideAccessesAlignmentChecked,
    /// Alignment checking looks at each element of a masked AVX-512 access, not the operand.
    MaskedAccessesCheckedPerElement,
    /// The SHA extensions' 128-bit operands need no alignment.
    ShaOperandsUnaligned,
    /// A misaligned XSAVE-family image raises #GP(0) even where alignment checking is on.
    XsaveMisalignmentIsGp,
    /// A `vcvtps2ph` store that faults has already raised the conversion's MXCSR flags (and
    /// an unmasked one's #XM wins over the memory fault).
    F16cStoreFaultKeepsConversion,
    /// An AVX2 gather that faults leaves its mask elements from the faulting one on as they
    /// were (not normalized to all ones) and the bits above a 128-bit form's mask unchanged.
    GatherFaultKeepsRawMask,
    /// `0f 0d` with a register operand (a reserved NOP on Intel) raises #UD. The translator
    /// copies it, so the host CPU decides; the system harness needs to know (its reference
    /// emulates it).
    PrefetchOpcodeRejectsRegister,
    /// A masked AVX-512 vector store (k1-k7; not a scalar) with active elements in both pages whose second page faults
    /// reports the last byte of its last active element in CR2, not the first it touches in
    /// that page.
    MaskedStoreFaultAtLastByte,
}

/// One vendor difference.
pub struct QuirkRow {
    pub quirk: Quirk,
    pub instruction: &'static str,
    pub intel: &'static str,
    pub amd: &'static str,
    /// Vendors that have the quirk.
    pub vendors: &'static [Vendor],
    pub found: &'static str,
}

/// Every vendor difference the translator models.
pub const QUIRKS: &[QuirkRow] = &[
    QuirkRow {
        quirk: Quirk::FarPointerIgnoresRexW,
        instruction: "lfs/lgs/lss r64, m16:64; jmp/call far m16:64",
        intel: "REX.W selects a 64-bit offset (m16:64)",
        amd: "REX.W is ignored: the operand is m16:32 and a 64-bit destination is zero-extended",
        vendors: &[Vendor::Amd],
        found: "differential harness on AMD EPYC (issue 3); AMD APM vol. 3 LFS/JMP (far)",
    },
    QuirkRow {
        quirk: Quirk::RetfReadsOuterStackFirst,
        instruction: "retf / retf imm16 with CS.RPL != CPL",
        intel: "checks the CS descriptor first: #GP(selector) (or #GP(0) for a null selector) without touching SS:RSP",
        amd: "pops the outer SS:RSP first (SS slot, then RSP slot), so an unmapped stack faults #PF before CS is checked",
        vendors: &[Vendor::Amd],
        found: "differential harness: AMD EPYC (issue 3), Intel Xeon Sapphire Rapids (issue 10: native #GP, translated #PF)",
    },
    QuirkRow {
        quirk: Quirk::FaultingMmxStoreResetsTop,
        instruction: "movd/movq m, mm; movntq m64, mm (faulting)",
        intel: "FSW.TOP is already 0 when the memory fault is delivered (tags unchanged)",
        amd: "x87 state is unchanged by the faulting store",
        vendors: &[Vendor::Intel],
        found: "differential harness on Intel Xeon Sapphire Rapids (issue 10: soft-MMU fsw 0x3800 vs native 0); \
                checked by hand with `fld1; movq [unmapped], mm0`",
    },
    QuirkRow {
        quirk: Quirk::F16cSkipsAlignmentCheck,
        instruction: "vcvtph2ps xmm, m64; vcvtps2ph m64, xmm, imm8 (misaligned, RFLAGS.AC and CR0.AM set, CPL3)",
        intel: "no #AC (SDM exception class 11): the access completes",
        amd: "#AC(0), like other 8-byte accesses",
        vendors: &[Vendor::Intel],
        found: "differential harness on Intel Xeon Sapphire Rapids (issue 10, seed 3: native completes, soft-MMU #AC); \
                checked by hand against vmovq/vaddss/vpinsrd, which do raise #AC there",
    },
    QuirkRow {
        quirk: Quirk::WideAccessesAlignmentChecked,
        instruction: "movups/vmovups/vaddps/lddqu/pcmpestri/vpermq… m128/m256/m512 (misaligned, RFLAGS.AC and CR0.AM set, CPL3)",
        intel: "no #AC for an access wider than 8 bytes: the access completes (or faults #PF)",
        amd: "#AC(0) unless the operand is 16-byte aligned (32- and 64-byte ones too), before any page walk",
        vendors: &[Vendor::Amd],
        found: "differential harness on AMD EPYC with AVX-512 (2026-12-06, seed 1: native #AC, soft-MMU #PF); \
                checked by hand at offsets 1, 2, 4, 8 (#AC) and 16, 32 (none) in a native process",
    },
    QuirkRow {
        quirk: Quirk::MaskedAccessesCheckedPerElement,
        instruction: "EVEX loads and stores under an opmask k1-k7, element by element (vmovups zmm{k}, vpmovzxbq zmm{k}, m64, broadcasts), and compress stores with or without one",
        intel: "checked by the operand's size like an unmasked access (vpmovzxbq zmm{k1}, m64 at an odd address: #AC)",
        amd: "checked by the memory element's size whatever the mask's value (vmovups zmm{k1}: 4 bytes; vpmovzxbq/vmovdqu8: never); \
              forms that read the whole operand (shuffles, shift counts, vinserti32x4) and unmasked expand loads are checked like unmasked ones",
        vendors: &[Vendor::Amd],
        found: "differential harness on AMD EPYC with AVX-512 (2026-12-06, seed 1: native completes or #PF, soft-MMU #AC); \
                checked by hand with masks 1, 0x8000 and 0xffff",
    },
    QuirkRow {
        quirk: Quirk::ShaOperandsUnaligned,
        instruction: "sha1rnds4/sha1nexte/sha1msg1/sha1msg2/sha256rnds2/sha256msg1/sha256msg2 xmm, m128 (misaligned)",
        intel: "#GP(0), like other legacy-SSE m128 operands",
        amd: "the access completes (#AC with alignment checking on, like movups)",
        vendors: &[Vendor::Amd],
        found: "differential harness on AMD EPYC (2026-12-06, seed 1: native completes, translated #GP)",
    },
    QuirkRow {
        quirk: Quirk::XsaveMisalignmentIsGp,
        instruction: "xsave/xsavec/xsaveopt/xrstor (image not 64-byte aligned, RFLAGS.AC and CR0.AM set, CPL3)",
        intel: "#AC(0) when the image is not even 4-byte aligned, #GP(0) otherwise (fxsave the same)",
        amd: "#GP(0) at every misalignment (fxsave still raises #AC at offsets 1 and 2)",
        vendors: &[Vendor::Amd],
        found: "differential harness on AMD EPYC (2026-12-06, seed 1: native #GP, translated #AC); checked by hand at offsets 1-32",
    },
    QuirkRow {
        quirk: Quirk::F16cStoreFaultKeepsConversion,
        instruction: "vcvtps2ph m, xmm/ymm/zmm, imm8 whose store faults (#PF), the conversion inexact",
        intel: "MXCSR already holds the conversion's flags (PE); with PE unmasked #XM is delivered instead",
        amd: "MXCSR is unchanged and the memory fault is delivered, PE unmasked or not",
        vendors: &[Vendor::Intel],
        found: "Intel Xeon by hand (issue 10, `emulate/f16c.rs`); differential harness on AMD EPYC (2026-12-06, seed 1: \
                native MXCSR 0x1f80, translated 0x1fa8), checked by hand with MXCSR 0x1f80 and 0xf80",
    },
    QuirkRow {
        quirk: Quirk::GatherFaultKeepsRawMask,
        instruction: "vpgatherdd/vgatherdps… (VEX) whose element load faults",
        intel: "the mask is normalized first (sign set: all ones, else zero; the bits above a 128-bit form cleared), completed elements cleared",
        amd: "elements before the faulting one are cleared, the faulting one and those after it keep their bits, the bits above a 128-bit form are kept",
        vendors: &[Vendor::Amd],
        found: "`hbt isa-test --system` on Intel Xeon (issue 10) and AMD EPYC (2026-12-06, seed 1: 16 forms, mask register differs); \
                checked by hand on the EPYC with `vpgatherdd xmm0, [rax+xmm4*4], xmm14` faulting on element 2",
    },
    QuirkRow {
        quirk: Quirk::PrefetchOpcodeRejectsRegister,
        instruction: "0f 0d /r with mod = 11 (iced: Reservednop_rm*_r*_0F0D)",
        intel: "a reserved NOP",
        amd: "#UD (the opcode is the PREFETCH/PREFETCHW group, which needs a memory operand)",
        vendors: &[Vendor::Amd],
        found: "`hbt isa-test --system` on AMD EPYC (2026-12-06: KVM completes it, the translated copy raises #UD); \
                `0f 0d c4` natively in a Linux process on that EPYC: SIGILL",
    },
    QuirkRow {
        quirk: Quirk::MaskedStoreFaultAtLastByte,
        instruction: "EVEX vector stores under an opmask (vmovups m{k}, vpmovdb m{k}, vpcompressb m{k}…) that cross into a faulting page, an active element in the first page",
        intel: "CR2 is the last byte of the last active element (vmovups [p-12]{k=0x21}, ymm: p+11); with no active element in the first page, the first active byte in the second (k=0x30: p+4)",
        amd: "CR2 is the first active byte in the faulting page, as for masked loads",
        vendors: &[Vendor::Intel],
        found: "`hbt isa-test --system` on Intel Xeon Sapphire Rapids (2026-12-07, seed 1: KVM p+0x13, translated the page start); \
                checked by hand with vmovups ymm{k} at p-12 and p-10 (straddling element), vpmovdb and vpcompressb; masked loads and \
                unmasked stores, `vpcompressb` without an opmask and scalar `vmovss`/`vmovsd` m{k} straddling the pages report the first \
                byte of the second page",
    },
];

impl Vendor {
    /// The vendor of a CPU whose CPUID leaf 0 returned `ebx`, `edx`, `ecx`.
    pub fn from_leaf0(ebx: u32, edx: u32, ecx: u32) -> Vendor {
        let mut id = [0u8; 12];
        id[..4].copy_from_slice(&ebx.to_le_bytes());
        id[4..8].copy_from_slice(&edx.to_le_bytes());
        id[8..].copy_from_slice(&ecx.to_le_bytes());
        match &id {
            b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
            _ => Vendor::Intel,
        }
    }

    /// The host's vendor.
    pub fn host() -> Vendor {
        static HOST: std::sync::OnceLock<Vendor> = std::sync::OnceLock::new();
        *HOST.get_or_init(|| {
            let r = std::arch::x86_64::__cpuid(0);
            Vendor::from_leaf0(r.ebx, r.edx, r.ecx)
        })
    }

    /// Whether this vendor's CPUs have `quirk`.
    pub fn has(self, quirk: Quirk) -> bool {
        QUIRKS
            .iter()
            .find(|row| row.quirk == quirk)
            .is_some_and(|row| row.vendors.contains(&self))
    }
}

/// Whether the host CPU has `quirk`.
pub fn host_has(quirk: Quirk) -> bool {
    Vendor::host().has(quirk)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_quirk_has_exactly_one_row() {
        for q in [
            Quirk::FarPointerIgnoresRexW,
            Quirk::RetfReadsOuterStackFirst,
            Quirk::FaultingMmxStoreResetsTop,
            Quirk::F16cSkipsAlignmentCheck,
            Quirk::WideAccessesAlignmentChecked,
            Quirk::MaskedAccessesCheckedPerElement,
            Quirk::ShaOperandsUnaligned,
            Quirk::XsaveMisalignmentIsGp,
            Quirk::F16cStoreFaultKeepsConversion,
            Quirk::GatherFaultKeepsRawMask,
            Quirk::PrefetchOpcodeRejectsRegister,
        ] {
            assert_eq!(QUIRKS.iter().filter(|r| r.quirk == q).count(), 1, "{q:?}");
        }
    }

    #[test]
    fn selection_by_vendor() {
        let amd = Vendor::from_leaf0(
            u32::from_le_bytes(*b"Auth"),
            u32::from_le_bytes(*b"enti"),
            u32::from_le_bytes(*b"cAMD"),
        );
        let intel = Vendor::from_leaf0(
            u32::from_le_bytes(*b"Genu"),
            u32::from_le_bytes(*b"ineI"),
            u32::from_le_bytes(*b"ntel"),
        );
        assert_eq!(amd, Vendor::Amd);
        assert_eq!(intel, Vendor::Intel);
        assert!(amd.has(Quirk::FarPointerIgnoresRexW) && !intel.has(Quirk::FarPointerIgnoresRexW));
        assert!(amd.has(Quirk::RetfReadsOuterStackFirst) && !intel.has(Quirk::RetfReadsOuterStackFirst));
        assert!(amd.has(Quirk::WideAccessesAlignmentChecked) && !intel.has(Quirk::WideAccessesAlignmentChecked));
        assert!(intel.has(Quirk::FaultingMmxStoreResetsTop) && !amd.has(Quirk::FaultingMmxStoreResetsTop));
        assert!(intel.has(Quirk::F16cSkipsAlignmentCheck) && !amd.has(Quirk::F16cSkipsAlignmentCheck));
    }
}
