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
    /// `int1` reaches a Linux process with RIP at the instruction, not after it.
    Int1ReportsRipAtInstruction,
    /// A faulting MMX store has already set FSW.TOP to 0.
    FaultingMmxStoreResetsTop,
    /// The F16C conversions never raise #AC.
    F16cSkipsAlignmentCheck,
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
        quirk: Quirk::Int1ReportsRipAtInstruction,
        instruction: "int1 (icebp, F1)",
        intel: "#DB trap: the signal frame's RIP is after the instruction",
        amd: "the signal frame's RIP is the instruction itself",
        vendors: &[Vendor::Amd],
        found: "differential harness: AMD EPYC (issue 3), Intel Xeon Sapphire Rapids (issue 10: RIP +1)",
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
            Quirk::Int1ReportsRipAtInstruction,
            Quirk::FaultingMmxStoreResetsTop,
            Quirk::F16cSkipsAlignmentCheck,
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
        assert!(amd.has(Quirk::Int1ReportsRipAtInstruction) && !intel.has(Quirk::Int1ReportsRipAtInstruction));
        assert!(intel.has(Quirk::FaultingMmxStoreResetsTop) && !amd.has(Quirk::FaultingMmxStoreResetsTop));
        assert!(intel.has(Quirk::F16cSkipsAlignmentCheck) && !amd.has(Quirk::F16cSkipsAlignmentCheck));
    }
}
