//! Which iced `CpuidFeature`s the host CPU can execute. The harness only claims instructions the
//! host runs natively (an AVX-512 form cannot be compared against anything on a host without
//! it). Vector extensions also need their state enabled by the OS (XCR0): AVX's YMM halves, and
//! for AVX-512 the opmask, ZMM_Hi256 and Hi16_ZMM components.

use iced_x86::CpuidFeature as F;
use std::arch::x86_64::__cpuid_count;

/// What every x86-64 CPU executes in 64-bit user mode (`endbr32/64` execute as NOPs on every
/// one, and `rdpmc` faults the same way everywhere it is not enabled).
const BASELINE: &[F] = &[
    F::INTEL8086,
    F::INTEL186,
    F::INTEL286,
    F::INTEL386,
    F::INTEL486,
    F::X64,
    F::FPU,
    F::FPU287,
    F::FPU387,
    F::CPUID,
    F::TSC,
    F::CMOV,
    F::MMX,
    F::SSE,
    F::SSE2,
    F::FXSR,
    F::CLFSH,
    F::CX8,
    F::MULTIBYTENOP,
    F::PAUSE,
    F::SYSCALL,
    F::CET_IBT,
    F::RDPMC,
];

/// Features the harness runs where CPUID reports them (`cpu::cpuid_bits`); the rest — system,
/// privileged and vendor extensions it has no business executing in a test process — are never
/// claimed executable.
const WHEN_REPORTED: &[F] = &[
    F::MSR,
    F::RDTSCP,
    F::SSE3,
    F::PCLMULQDQ,
    F::SSSE3,
    F::CMPXCHG16B,
    F::SSE4_1,
    F::SSE4_2,
    F::MOVBE,
    F::POPCNT,
    F::AES,
    F::XSAVE,
    F::RDRAND,
    F::BMI1,
    F::BMI2,
    F::HLE,
    F::RTM,
    F::RDSEED,
    F::ADX,
    F::CLFLUSHOPT,
    F::CLWB,
    F::SHA,
    F::RDPID,
    F::GFNI,
    F::LZCNT,
    F::PREFETCHW,
    F::SSE4A,
    F::XSAVEOPT,
    F::XSAVEC,
    F::XSAVES,
];

/// Features whose instructions also need the OS to have enabled AVX state (XCR0 bits 1-2).
const WITH_AVX_STATE: &[F] = &[
    F::AVX,
    F::FMA,
    F::F16C,
    F::AVX2,
    F::VAES,
    F::VPCLMULQDQ,
    F::AVX_VNNI,
    F::AVX_IFMA,
];

/// Features whose instructions also need AVX-512 state (XCR0 bits 5-7).
const WITH_AVX512_STATE: &[F] = &[
    F::AVX512F,
    F::AVX512DQ,
    F::AVX512_IFMA,
    F::AVX512CD,
    F::AVX512BW,
    F::AVX512VL,
    F::AVX512_VBMI,
    F::AVX512_VBMI2,
    F::AVX512_VNNI,
    F::AVX512_BITALG,
    F::AVX512_VPOPCNTDQ,
    F::AVX512_VP2INTERSECT,
    F::AVX512_FP16,
    F::AVX512_BF16,
];

/// The OS enabled every component of `state` in XCR0 (and OSXSAVE, without which XCR0 is 0).
fn state_enabled(state: u64) -> bool {
    let osxsave = std::arch::x86_64::__cpuid_count(1, 0).ecx & (1 << 27) != 0;
    osxsave && host_xcr0() & state == state
}

/// True when the host executes instructions that need `feature` (in 64-bit user mode). Asked
/// for every memory operand the translator emits (BMI2), so the answers are computed once.
pub fn host_has(feature: F) -> bool {
    static HAS: std::sync::OnceLock<Vec<bool>> = std::sync::OnceLock::new();
    HAS.get_or_init(|| F::values().map(executes).collect())[feature as usize]
}

/// [`host_has`], computed from CPUID and XCR0.
fn executes(feature: F) -> bool {
    use crate::cpu::cpuid_bits::host_reports;
    use crate::cpu::xsave::component::{AVX, AVX512, SSE};
    let reported = || host_reports(feature) == Some(true);
    if BASELINE.contains(&feature) {
        true
    } else if feature == F::HLE_or_RTM {
        executes(F::HLE) || executes(F::RTM)
    } else if WITH_AVX_STATE.contains(&feature) {
        reported() && state_enabled(SSE | AVX)
    } else if WITH_AVX512_STATE.contains(&feature) {
        reported() && state_enabled(SSE | AVX | AVX512)
    } else {
        WHEN_REPORTED.contains(&feature) && reported()
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
