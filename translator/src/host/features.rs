//! Which iced `CpuidFeature`s the host CPU can execute. The harness only claims instructions the
//! host runs natively (an AVX-512 form cannot be compared against anything on a host without
//! it). Vector extensions also need their state enabled by the OS (XCR0): AVX's YMM halves, and
//! for AVX-512 the opmask, ZMM_Hi256 and Hi16_ZMM components.

use iced_x86::CpuidFeature as F;
use std::arch::x86_64::__cpuid_count;

struct Cpuid {
    l1_ecx: u32,
    l1_edx: u32,
    l7_ebx: u32,
    l7_ecx: u32,
    l7_edx: u32,
    l71_eax: u32,
    l81_ecx: u32,
    l81_edx: u32,
    xcr0_avx: bool,
    /// XCR0 enables the three AVX-512 components (and AVX's).
    xcr0_avx512: bool,
}

fn cpuid() -> &'static Cpuid {
    static CPUID: std::sync::OnceLock<Cpuid> = std::sync::OnceLock::new();
    CPUID.get_or_init(|| {
        let l1 = __cpuid_count(1, 0);
        let l7 = __cpuid_count(7, 0);
        let l71 = __cpuid_count(7, 1);
        let l81 = __cpuid_count(0x8000_0001, 0);
        let avx512_state = crate::cpu::xsave::component::AVX512 | crate::cpu::xsave::component::AVX;
        Cpuid {
            l1_ecx: l1.ecx,
            l1_edx: l1.edx,
            l7_ebx: l7.ebx,
            l7_ecx: l7.ecx,
            l7_edx: l7.edx,
            l71_eax: l71.eax,
            l81_ecx: l81.ecx,
            l81_edx: l81.edx,
            xcr0_avx: std::arch::is_x86_feature_detected!("avx"),
            xcr0_avx512: bit_set(l1.ecx, 27) && host_xcr0() & avx512_state == avx512_state,
        }
    })
}

fn bit_set(reg: u32, n: u32) -> bool {
    reg & (1 << n) != 0
}

/// True when the host executes instructions that need `feature` (in 64-bit user mode).
pub fn host_has(feature: F) -> bool {
    let c = cpuid();
    let bit = bit_set;
    let avx512 = |reg: u32, n: u32| bit(reg, n) && c.xcr0_avx512;
    match feature {
        F::INTEL8086 | F::INTEL186 | F::INTEL286 | F::INTEL386 | F::INTEL486 | F::X64 => true,
        F::FPU | F::FPU287 | F::FPU387 => true,
        F::CPUID | F::TSC | F::CMOV | F::MMX | F::SSE | F::SSE2 | F::FXSR | F::CLFSH | F::CX8 => true,
        F::MULTIBYTENOP | F::PAUSE | F::SYSCALL => true,
        F::MSR => bit(c.l1_edx, 5),
        // endbr32/endbr64 execute as NOPs on every x86-64 CPU.
        F::CET_IBT => true,
        F::RDPMC => true,
        F::RDTSCP => bit(c.l81_edx, 27),
        F::SSE3 => bit(c.l1_ecx, 0),
        F::PCLMULQDQ => bit(c.l1_ecx, 1),
        F::SSSE3 => bit(c.l1_ecx, 9),
        F::FMA => bit(c.l1_ecx, 12) && c.xcr0_avx,
        F::CMPXCHG16B => bit(c.l1_ecx, 13),
        F::SSE4_1 => bit(c.l1_ecx, 19),
        F::SSE4_2 => bit(c.l1_ecx, 20),
        F::MOVBE => bit(c.l1_ecx, 22),
        F::POPCNT => bit(c.l1_ecx, 23),
        F::AES => bit(c.l1_ecx, 25),
        F::XSAVE => bit(c.l1_ecx, 26),
        F::AVX => bit(c.l1_ecx, 28) && c.xcr0_avx,
        F::F16C => bit(c.l1_ecx, 29) && c.xcr0_avx,
        F::RDRAND => bit(c.l1_ecx, 30),
        F::BMI1 => bit(c.l7_ebx, 3),
        F::AVX2 => bit(c.l7_ebx, 5) && c.xcr0_avx,
        F::BMI2 => bit(c.l7_ebx, 8),
        F::HLE => bit(c.l7_ebx, 4),
        F::RTM => bit(c.l7_ebx, 11),
        F::HLE_or_RTM => bit(c.l7_ebx, 4) || bit(c.l7_ebx, 11),
        F::RDSEED => bit(c.l7_ebx, 18),
        F::ADX => bit(c.l7_ebx, 19),
        F::CLFLUSHOPT => bit(c.l7_ebx, 23),
        F::CLWB => bit(c.l7_ebx, 24),
        F::SHA => bit(c.l7_ebx, 29),
        F::VAES => bit(c.l7_ecx, 9) && c.xcr0_avx,
        F::VPCLMULQDQ => bit(c.l7_ecx, 10) && c.xcr0_avx,
        F::RDPID => bit(c.l7_ecx, 22),
        F::AVX512F => avx512(c.l7_ebx, 16),
        F::AVX512DQ => avx512(c.l7_ebx, 17),
        F::AVX512_IFMA => avx512(c.l7_ebx, 21),
        F::AVX512CD => avx512(c.l7_ebx, 28),
        F::AVX512BW => avx512(c.l7_ebx, 30),
        F::AVX512VL => avx512(c.l7_ebx, 31),
        F::AVX512_VBMI => avx512(c.l7_ecx, 1),
        F::AVX512_VBMI2 => avx512(c.l7_ecx, 6),
        F::GFNI => bit(c.l7_ecx, 8),
        F::AVX512_VNNI => avx512(c.l7_ecx, 11),
        F::AVX512_BITALG => avx512(c.l7_ecx, 12),
        F::AVX512_VPOPCNTDQ => avx512(c.l7_ecx, 14),
        F::AVX512_VP2INTERSECT => avx512(c.l7_edx, 8),
        F::AVX512_FP16 => avx512(c.l7_edx, 23),
        F::AVX512_BF16 => avx512(c.l71_eax, 5),
        F::AVX_VNNI => bit(c.l71_eax, 4) && c.xcr0_avx,
        F::AVX_IFMA => bit(c.l71_eax, 23) && c.xcr0_avx,
        F::LZCNT => bit(c.l81_ecx, 5),
        F::PREFETCHW => bit(c.l81_ecx, 8),
        F::SSE4A => bit(c.l81_ecx, 6),
        F::XSAVEOPT | F::XSAVEC | F::XSAVES => {
            let d = __cpuid_count(0xd, 1);
            match feature {
                F::XSAVEOPT => bit(d.eax, 0),
                F::XSAVEC => bit(d.eax, 1),
                _ => bit(d.eax, 3),
            }
        }
        _ => false,
    }
}

/// True when every feature an instruction form needs is present.
pub fn host_runs(code: iced_x86::Code) -> bool {
    code.cpuid_features().iter().all(|&f| host_has(f))
}

/// XCR0: the state components the host OS enabled (what `xsave` with an all-ones mask saves).
pub fn host_xcr0() -> u64 {
    static XCR0: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *XCR0.get_or_init(|| {
        let (lo, hi): (u32, u32);
        // SAFETY: xgetbv(0) is available in user mode whenever OSXSAVE is set, which every
        // x86-64 Linux host with AVX has; it only reads XCR0.
        unsafe { std::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
        ((hi as u64) << 32) | lo as u64
    })
}

/// BMI2's `pext` is a single fast instruction here (Intel since Haswell, AMD since Zen 3). AMD
/// families before 19H run it in microcode, tens of cycles and more with dense masks, so the
/// emitter does not use it there (see `emit/branch.rs`).
pub fn fast_pext() -> bool {
    static FAST: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FAST.get_or_init(|| {
        let amd = crate::cpu::vendor::Vendor::host() == crate::cpu::vendor::Vendor::Amd;
        let eax = __cpuid_count(1, 0).eax;
        let family = ((eax >> 8) & 0xf) + if (eax >> 8) & 0xf == 0xf { (eax >> 20) & 0xff } else { 0 };
        host_has(F::BMI2) && !(amd && family < 0x19)
    })
}
