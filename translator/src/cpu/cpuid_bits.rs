//! Where CPUID reports each instruction-set feature: one table of (leaf, subleaf, register,
//! bit) per iced `CpuidFeature` that hbt reads, shows or hides. The harness asks it what this
//! host can execute (`host/features.rs`); the coverage tool builds its `host` CPU model from it
//! and masks a guest's CPUID leaves with it (`hbt exec`).

use iced_x86::CpuidFeature as F;

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Reg {
    /// Its place in `[eax, ebx, ecx, edx]`.
    pub fn index(self) -> usize {
        match self {
            Reg::Eax => 0,
            Reg::Ebx => 1,
            Reg::Ecx => 2,
            Reg::Edx => 3,
        }
    }
}

/// (feature, leaf, subleaf, register, bit). `HLE_or_RTM` is listed at RTM's bit; `xtest` also
/// runs with HLE alone (`host/features.rs`).
#[rustfmt::skip]
pub const CPUID_BITS: &[(F, u32, u32, Reg, u32)] = &[
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
    (F::AVX512_VP2INTERSECT, 7, 0, Reg::Edx, 8),
    (F::SERIALIZE, 7, 0, Reg::Edx, 14), (F::TSXLDTRK, 7, 0, Reg::Edx, 16), (F::PCONFIG, 7, 0, Reg::Edx, 18),
    (F::CET_IBT, 7, 0, Reg::Edx, 20), (F::AMX_BF16, 7, 0, Reg::Edx, 22), (F::AVX512_FP16, 7, 0, Reg::Edx, 23),
    (F::AMX_TILE, 7, 0, Reg::Edx, 24), (F::AMX_INT8, 7, 0, Reg::Edx, 25),
    (F::AVX_VNNI, 7, 1, Reg::Eax, 4), (F::AVX512_BF16, 7, 1, Reg::Eax, 5), (F::AVX_IFMA, 7, 1, Reg::Eax, 23),
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

/// Whether the host's CPUID reports `feature`; None for a feature the table does not list.
pub fn host_reports(feature: F) -> Option<bool> {
    static HOST: std::sync::OnceLock<Vec<Option<bool>>> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        let max_basic = __cpuid(0).eax;
        let max_ext = __cpuid(0x8000_0000).eax;
        let mut reported = vec![None; F::values().len()];
        for &(feature, leaf, subleaf, reg, bit) in CPUID_BITS {
            let available = if leaf >= 0x8000_0000 {
                leaf <= max_ext
            } else {
                leaf <= max_basic
            };
            let r = if available {
                let r = __cpuid_count(leaf, subleaf);
                [r.eax, r.ebx, r.ecx, r.edx]
            } else {
                [0; 4]
            };
            reported[feature as usize] = Some(r[reg.index()] & (1 << bit) != 0);
        }
        reported
    })[feature as usize]
}
