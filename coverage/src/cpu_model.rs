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
//! [`CPUID_BITS`]; `all` keeps everything.

use hbt_translator::cpu::cpuid_bits::{host_reports, CPUID_BITS};
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
/// bit of [`CPUID_BITS`] whose feature `keep` (indexed by `CpuidFeature as usize`) lacks.
/// (Leaf 0xD, the XSAVE components, is the translator's business: `cpu::xsave::XsaveLayout`.)
pub fn mask_cpuid(keep: &[bool], leaf: u32, subleaf: u32, regs: &mut [u32; 4]) {
    for &(feature, l, sub, reg, bit) in CPUID_BITS {
        if l == leaf && sub == subleaf && !keep[feature as usize] {
            regs[reg.index()] &= !(1 << bit);
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
    // Only forms 64-bit code can hold count: a form that exists in 16/32-bit code alone
    // (`rdpid r32`) is never met there, and hiding its feature would hide the 64-bit form too.
    for code in Code::values().filter(|&c| c != Code::INVALID && c.op_code().mode64() && !supported(c)) {
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
    for &(feature, ..) in CPUID_BITS {
        if host_reports(feature) == Some(true) {
            have[feature as usize] = true;
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
    fn forms_only_16_or_32_bit_code_has_hide_no_feature() {
        // Every 64-bit form supported: each host feature that has a 64-bit form stays, though
        // its 32-bit-only forms (`rdpid r32`, `pusha`, `aaa`…) are not supported.
        let host = CpuModel::Host.features().expect("host features");
        let keep = translatable_features(CpuModel::Host, |c| c.op_code().mode64());
        let mut instr = Instruction::default();
        let mut has_64_bit_form = vec![false; F::values().len()];
        for code in Code::values().filter(|c| *c != Code::INVALID && c.op_code().mode64()) {
            instr.set_code(code);
            instr
                .cpuid_features()
                .iter()
                .for_each(|&f| has_64_bit_form[f as usize] = true);
        }
        for f in F::values().filter(|&f| host[f as usize] && has_64_bit_form[f as usize]) {
            assert!(keep[f as usize], "{f:?} hidden");
        }
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
            // Only forms 64-bit code can hold count: a form that exists in 16/32-bit code alone
            // (`rdpid r32`) is never met there, and hiding its feature would hide the 64-bit form too.
            for code in Code::values().filter(|&c| c != Code::INVALID && c.op_code().mode64() && !supported(c)) {
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
