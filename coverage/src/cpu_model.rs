//! CPU models: which ISA extensions a binary may assume without runtime dispatch.
//!
//! Distribution binaries carry code for CPUs newer than their baseline (glibc's ifuncs hold
//! AVX-512 string functions, OpenSSL has SHA-NI paths) and pick it at run time through CPUID.
//! A translator that reports "no AVX-512" to the guest never runs that code, so for a given
//! model we leave instructions whose CPUID features lie outside it out of every footprint.
//!
//! The levels follow the x86-64 psABI micro-architecture levels; `BASE_FEATURES` holds what
//! every x86-64 CPU has architecturally (the 8086..486 integer ISA, x87, CPUID, TSC, MSRs,
//! SYSCALL, multi-byte NOP, PAUSE, CLFLUSH). `host` asks this machine's CPUID through
//! [`HOST_CPUID_BITS`]; `all` keeps everything.

use iced_x86::{Code, CpuidFeature as F, Instruction};
use serde::Serialize;
use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuModel {
    #[serde(rename = "x86-64-v1")]
    V1,
    #[serde(rename = "x86-64-v2")]
    V2,
    #[serde(rename = "x86-64-v3")]
    V3,
    #[serde(rename = "x86-64-v4")]
    V4,
    Host,
    All,
}

/// Features every x86-64 CPU has.
const BASE_FEATURES: &[F] = &[
    F::INTEL8086,
    F::INTEL186,
    F::INTEL286,
    F::INTEL386,
    F::INTEL486,
    F::X64,
    F::CPUID,
    F::TSC,
    F::MSR,
    F::RDPMC,
    F::SYSCALL,
    F::SEP,
    F::MULTIBYTENOP,
    F::PAUSE,
    F::FPU,
    F::FPU287,
    F::FPU387,
    F::CLFSH,
];

/// psABI level 1 beyond the architectural base.
const V1_FEATURES: &[F] = &[F::CMOV, F::CX8, F::FXSR, F::MMX, F::SSE, F::SSE2];
const V2_FEATURES: &[F] = &[F::CMPXCHG16B, F::POPCNT, F::SSE3, F::SSE4_1, F::SSE4_2, F::SSSE3];
const V3_FEATURES: &[F] = &[
    F::AVX,
    F::AVX2,
    F::BMI1,
    F::BMI2,
    F::F16C,
    F::FMA,
    F::LZCNT,
    F::MOVBE,
    F::XSAVE,
];
const V4_FEATURES: &[F] = &[F::AVX512F, F::AVX512BW, F::AVX512CD, F::AVX512DQ, F::AVX512VL];

/// Where CPUID reports a feature: (leaf, subleaf, register, bit).
#[derive(Clone, Copy)]
enum Reg {
    Ebx,
    Ecx,
    Edx,
    Eax,
}

#[rustfmt::skip]
const HOST_CPUID_BITS: &[(F, u32, u32, Reg, u32)] = &[
    (F::FPU, 1, 0, Reg::Edx, 0), (F::TSC, 1, 0, Reg::Edx, 4), (F::MSR, 1, 0, Reg::Edx, 5),
    (F::CX8, 1, 0, Reg::Edx, 8), (F::SEP, 1, 0, Reg::Edx, 11), (F::CMOV, 1, 0, Reg::Edx, 15),
    (F::CLFSH, 1, 0, Reg::Edx, 19), (F::MMX, 1, 0, Reg::Edx, 23), (F::FXSR, 1, 0, Reg::Edx, 24),
    (F::SSE, 1, 0, Reg::Edx, 25), (F::SSE2, 1, 0, Reg::Edx, 26),
    (F::SSE3, 1, 0, Reg::Ecx, 0), (F::PCLMULQDQ, 1, 0, Reg::Ecx, 1), (F::MONITOR, 1, 0, Reg::Ecx, 3),
    (F::VMX, 1, 0, Reg::Ecx, 5), (F::SMX, 1, 0, Reg::Ecx, 6), (F::SSSE3, 1, 0, Reg::Ecx, 9),
    (F::FMA, 1, 0, Reg::Ecx, 12), (F::CMPXCHG16B, 1, 0, Reg::Ecx, 13), (F::SSE4_1, 1, 0, Reg::Ecx, 19),
    (F::SSE4_2, 1, 0, Reg::Ecx, 20), (F::MOVBE, 1, 0, Reg::Ecx, 22), (F::POPCNT, 1, 0, Reg::Ecx, 23),
    (F::AES, 1, 0, Reg::Ecx, 25), (F::XSAVE, 1, 0, Reg::Ecx, 26), (F::AVX, 1, 0, Reg::Ecx, 28),
    (F::F16C, 1, 0, Reg::Ecx, 29), (F::RDRAND, 1, 0, Reg::Ecx, 30),
    (F::FSGSBASE, 7, 0, Reg::Ebx, 0), (F::BMI1, 7, 0, Reg::Ebx, 3), (F::HLE, 7, 0, Reg::Ebx, 4),
    (F::AVX2, 7, 0, Reg::Ebx, 5), (F::BMI2, 7, 0, Reg::Ebx, 8), (F::INVPCID, 7, 0, Reg::Ebx, 10),
    (F::RTM, 7, 0, Reg::Ebx, 11), (F::HLE_or_RTM, 7, 0, Reg::Ebx, 11), (F::MPX, 7, 0, Reg::Ebx, 14),
    (F::AVX512F, 7, 0, Reg::Ebx, 16), (F::AVX512DQ, 7, 0, Reg::Ebx, 17), (F::RDSEED, 7, 0, Reg::Ebx, 18),
    (F::ADX, 7, 0, Reg::Ebx, 19), (F::SMAP, 7, 0, Reg::Ebx, 20), (F::AVX512_IFMA, 7, 0, Reg::Ebx, 21),
    (F::CLFLUSHOPT, 7, 0, Reg::Ebx, 23), (F::CLWB, 7, 0, Reg::Ebx, 24), (F::AVX512PF, 7, 0, Reg::Ebx, 26),
    (F::AVX512ER, 7, 0, Reg::Ebx, 27), (F::AVX512CD, 7, 0, Reg::Ebx, 28), (F::SHA, 7, 0, Reg::Ebx, 29),
    (F::AVX512BW, 7, 0, Reg::Ebx, 30), (F::AVX512VL, 7, 0, Reg::Ebx, 31),
    (F::PREFETCHWT1, 7, 0, Reg::Ecx, 0), (F::AVX512_VBMI, 7, 0, Reg::Ecx, 1), (F::PKU, 7, 0, Reg::Ecx, 3),
    (F::WAITPKG, 7, 0, Reg::Ecx, 5), (F::AVX512_VBMI2, 7, 0, Reg::Ecx, 6), (F::CET_SS, 7, 0, Reg::Ecx, 7),
    (F::GFNI, 7, 0, Reg::Ecx, 8), (F::VAES, 7, 0, Reg::Ecx, 9), (F::VPCLMULQDQ, 7, 0, Reg::Ecx, 10),
    (F::AVX512_VNNI, 7, 0, Reg::Ecx, 11), (F::AVX512_BITALG, 7, 0, Reg::Ecx, 12),
    (F::AVX512_VPOPCNTDQ, 7, 0, Reg::Ecx, 14), (F::RDPID, 7, 0, Reg::Ecx, 22), (F::CLDEMOTE, 7, 0, Reg::Ecx, 25),
    (F::MOVDIRI, 7, 0, Reg::Ecx, 27), (F::MOVDIR64B, 7, 0, Reg::Ecx, 28), (F::ENQCMD, 7, 0, Reg::Ecx, 29),
    (F::AVX512_4VNNIW, 7, 0, Reg::Edx, 2), (F::AVX512_4FMAPS, 7, 0, Reg::Edx, 3),
    (F::SERIALIZE, 7, 0, Reg::Edx, 14), (F::TSXLDTRK, 7, 0, Reg::Edx, 16), (F::PCONFIG, 7, 0, Reg::Edx, 18),
    (F::CET_IBT, 7, 0, Reg::Edx, 20), (F::AMX_BF16, 7, 0, Reg::Edx, 22), (F::AVX512_FP16, 7, 0, Reg::Edx, 23),
    (F::AMX_TILE, 7, 0, Reg::Edx, 24), (F::AMX_INT8, 7, 0, Reg::Edx, 25),
    (F::AVX_VNNI, 7, 1, Reg::Eax, 4), (F::AVX512_BF16, 7, 1, Reg::Eax, 5),
    (F::XSAVEOPT, 0xd, 1, Reg::Eax, 0), (F::XSAVEC, 0xd, 1, Reg::Eax, 1), (F::XSAVES, 0xd, 1, Reg::Eax, 3),
    (F::SVM, 0x8000_0001, 0, Reg::Ecx, 2), (F::SKINIT_or_SVM, 0x8000_0001, 0, Reg::Ecx, 2),
    (F::LZCNT, 0x8000_0001, 0, Reg::Ecx, 5), (F::SSE4A, 0x8000_0001, 0, Reg::Ecx, 6),
    (F::PREFETCHW, 0x8000_0001, 0, Reg::Ecx, 8), (F::XOP, 0x8000_0001, 0, Reg::Ecx, 11),
    (F::SKINIT, 0x8000_0001, 0, Reg::Ecx, 12), (F::LWP, 0x8000_0001, 0, Reg::Ecx, 15),
    (F::FMA4, 0x8000_0001, 0, Reg::Ecx, 16), (F::TBM, 0x8000_0001, 0, Reg::Ecx, 21),
    (F::MONITORX, 0x8000_0001, 0, Reg::Ecx, 29),
    (F::SYSCALL, 0x8000_0001, 0, Reg::Edx, 11), (F::RDTSCP, 0x8000_0001, 0, Reg::Edx, 27),
    (F::D3NOWEXT, 0x8000_0001, 0, Reg::Edx, 30), (F::D3NOW, 0x8000_0001, 0, Reg::Edx, 31),
    (F::CLZERO, 0x8000_0008, 0, Reg::Ebx, 0), (F::INVLPGB, 0x8000_0008, 0, Reg::Ebx, 3),
    (F::RDPRU, 0x8000_0008, 0, Reg::Ebx, 4), (F::MCOMMIT, 0x8000_0008, 0, Reg::Ebx, 8),
    (F::WBNOINVD, 0x8000_0008, 0, Reg::Ebx, 9),
];

impl CpuModel {
    pub const ALL: [CpuModel; 6] = [
        CpuModel::V1,
        CpuModel::V2,
        CpuModel::V3,
        CpuModel::V4,
        CpuModel::Host,
        CpuModel::All,
    ];

    /// The feature set of this model, indexed by `CpuidFeature as usize`; `None` for `all`.
    pub fn features(self) -> Option<Vec<bool>> {
        let mut have = vec![false; F::values().len()];
        let mut add = |list: &[F]| list.iter().for_each(|&f| have[f as usize] = true);
        add(BASE_FEATURES);
        match self {
            CpuModel::All => return None,
            CpuModel::Host => host_features(&mut have),
            CpuModel::V1 => add(V1_FEATURES),
            CpuModel::V2 => [V1_FEATURES, V2_FEATURES].iter().for_each(|l| add(l)),
            CpuModel::V3 => [V1_FEATURES, V2_FEATURES, V3_FEATURES].iter().for_each(|l| add(l)),
            CpuModel::V4 => [V1_FEATURES, V2_FEATURES, V3_FEATURES, V4_FEATURES]
                .iter()
                .for_each(|l| add(l)),
        }
        Some(have)
    }

    /// For every `Code` index: may a binary built for this model execute it unconditionally?
    pub fn allowed_codes(self) -> Vec<bool> {
        let features = self.features();
        let mut instr = Instruction::default();
        Code::values()
            .map(|code| match &features {
                None => true,
                Some(have) => {
                    instr.set_code(code);
                    instr.cpuid_features().iter().all(|&f| have[f as usize])
                }
            })
            .collect()
    }
}

/// Clears, in CPUID leaf `leaf`/`subleaf`'s registers `[eax, ebx, ecx, edx]`, every feature
/// bit of [`HOST_CPUID_BITS`] whose feature `keep` (indexed by `CpuidFeature as usize`) lacks.
/// (Leaf 0xD, the XSAVE components, is the translator's business: `cpu::xsave::XsaveLayout`.)
pub fn mask_cpuid(keep: &[bool], leaf: u32, subleaf: u32, regs: &mut [u32; 4]) {
    for &(feature, l, sub, reg, bit) in HOST_CPUID_BITS {
        if l == leaf && sub == subleaf && !keep[feature as usize] {
            let i = match reg {
                Reg::Eax => 0,
                Reg::Ebx => 1,
                Reg::Ecx => 2,
                Reg::Edx => 3,
            };
            regs[i] &= !(1 << bit);
        }
    }
    if leaf == 1 && !keep[F::AVX as usize] {
        regs[2] &= !(1 << 27); // OSXSAVE stays only with AVX, so glibc's AVX probe stays off
    }
}

/// Host features that are in `model` and whose every instruction form satisfies `supported`:
/// the CPU a translator can present to a guest without it ever reaching an unsupported form
/// through runtime dispatch. Indexed by `CpuidFeature as usize`.
pub fn translatable_features(model: CpuModel, supported: impl Fn(Code) -> bool) -> Vec<bool> {
    let mut keep = CpuModel::Host.features().expect("host has a feature set");
    if let Some(limit) = model.features() {
        keep.iter_mut().zip(limit).for_each(|(k, l)| *k &= l);
    }
    // An unsupported form is unreachable once any one of its features is hidden; hide the
    // narrowest (fewest forms), so `vaesenc ymm` costs VAES, not AVX. The psABI level features
    // (SSE…AVX2) are never hidden for one odd form (`maskmovdqu`): programs built for a level
    // use them without asking CPUID, so hiding them would not keep the form away anyway.
    let mut instr = Instruction::default();
    let mut forms = vec![0usize; F::values().len()];
    for code in Code::values() {
        instr.set_code(code);
        instr.cpuid_features().iter().for_each(|&f| forms[f as usize] += 1);
    }
    for code in Code::values().filter(|&c| c != Code::INVALID && !supported(c)) {
        instr.set_code(code);
        let features = instr.cpuid_features();
        if features.iter().any(|&f| !keep[f as usize]) {
            continue;
        }
        if let Some(&narrowest) = features
            .iter()
            .filter(|f| {
                ![BASE_FEATURES, V1_FEATURES, V2_FEATURES, V3_FEATURES]
                    .iter()
                    .any(|l| l.contains(f))
            })
            .min_by_key(|&&f| forms[f as usize])
        {
            keep[narrowest as usize] = false;
        }
    }
    // A feature none of whose supported forms stays reachable (AVX512VL once AVX512F is gone)
    // is hidden too.
    let mut reachable = vec![false; F::values().len()];
    for code in Code::values().filter(|&c| c != Code::INVALID && supported(c)) {
        instr.set_code(code);
        let features = instr.cpuid_features();
        if features.iter().all(|&f| keep[f as usize]) {
            features.iter().for_each(|&f| reachable[f as usize] = true);
        }
    }
    keep.iter_mut().zip(reachable).for_each(|(k, r)| *k &= r);
    keep
}

fn host_features(have: &mut [bool]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        let max_basic = __cpuid(0).eax;
        let max_ext = __cpuid(0x8000_0000).eax;
        for &(feature, leaf, subleaf, reg, bit) in HOST_CPUID_BITS {
            let available = if leaf >= 0x8000_0000 {
                leaf <= max_ext
            } else {
                leaf <= max_basic
            };
            if !available {
                continue;
            }
            let r = __cpuid_count(leaf, subleaf);
            let value = match reg {
                Reg::Eax => r.eax,
                Reg::Ebx => r.ebx,
                Reg::Ecx => r.ecx,
                Reg::Edx => r.edx,
            };
            if value & (1 << bit) != 0 {
                have[feature as usize] = true;
            }
        }
    }
}

impl fmt::Display for CpuModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuModel::V1 => "x86-64-v1",
            CpuModel::V2 => "x86-64-v2",
            CpuModel::V3 => "x86-64-v3",
            CpuModel::V4 => "x86-64-v4",
            CpuModel::Host => "host",
            CpuModel::All => "all",
        })
    }
}

impl FromStr for CpuModel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        CpuModel::ALL.into_iter().find(|m| m.to_string() == s).ok_or_else(|| {
            format!("unknown CPU model `{s}` (expected x86-64-v1, x86-64-v2, x86-64-v3, x86-64-v4, host or all)")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(model: CpuModel, code: Code) -> bool {
        model.allowed_codes()[code as usize]
    }

    #[test]
    fn levels_are_nested() {
        let v: Vec<Vec<bool>> = [CpuModel::V1, CpuModel::V2, CpuModel::V3, CpuModel::V4, CpuModel::All]
            .iter()
            .map(|m| m.allowed_codes())
            .collect();
        for pair in v.windows(2) {
            assert!(pair[0].iter().zip(&pair[1]).all(|(a, b)| !a || *b));
        }
    }

    #[test]
    fn representative_instructions() {
        assert!(allowed(CpuModel::V1, Code::Add_rm32_r32));
        assert!(allowed(CpuModel::V1, Code::Addps_xmm_xmmm128));
        assert!(!allowed(CpuModel::V1, Code::Popcnt_r64_rm64));
        assert!(allowed(CpuModel::V2, Code::Popcnt_r64_rm64));
        assert!(!allowed(CpuModel::V2, Code::VEX_Vpaddd_ymm_ymm_ymmm256));
        assert!(allowed(CpuModel::V3, Code::VEX_Vpaddd_ymm_ymm_ymmm256));
        assert!(!allowed(CpuModel::V3, Code::EVEX_Vpaddd_zmm_k1z_zmm_zmmm512b32));
        assert!(allowed(CpuModel::V4, Code::EVEX_Vpaddd_zmm_k1z_zmm_zmmm512b32));
        assert!(allowed(CpuModel::All, Code::EVEX_Vpaddd_zmm_k1z_zmm_zmmm512b32));
        // The host always runs its base ISA.
        assert!(allowed(CpuModel::Host, Code::Add_rm32_r32));
    }

    #[test]
    fn unsupported_forms_are_unreachable_except_through_psabi_level_features() {
        let supported =
            |c: Code| c.op_code().encoding() != iced_x86::EncodingKind::EVEX && c != Code::VEX_Vaesenc_ymm_ymm_ymmm256;
        let host = CpuModel::Host.features().unwrap();
        for model in [CpuModel::V3, CpuModel::Host] {
            let keep = translatable_features(model, supported);
            let mut instr = Instruction::default();
            for code in Code::values().filter(|&c| c != Code::INVALID && !supported(c)) {
                instr.set_code(code);
                let features = instr.cpuid_features();
                if features.iter().all(|&f| keep[f as usize]) {
                    let level = |f: &F| {
                        [BASE_FEATURES, V1_FEATURES, V2_FEATURES, V3_FEATURES]
                            .iter()
                            .any(|l| l.contains(f))
                    };
                    assert!(features.iter().all(level), "{model}: {code:?} stays reachable");
                }
            }
            assert!(
                keep.iter().zip(&host).all(|(k, h)| !k || *h),
                "{model}: a shown feature the host lacks"
            );
        }
    }

    #[test]
    fn parse_round_trip() {
        for m in CpuModel::ALL {
            assert_eq!(m.to_string().parse::<CpuModel>().unwrap(), m);
        }
        assert!("pentium".parse::<CpuModel>().is_err());
    }
}
