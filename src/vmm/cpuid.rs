//! The CPUID a guest sees under an engine without KVM (`--accel bt`): the host's, minus the
//! features this machine model does not have. Each hidden feature is one row of [`HIDDEN`],
//! with the reason, so adding a device, a system feature or a family of instruction rules means
//! deleting a row. The XSAVE leaves describe exactly the components of [`guest_xcr0`] (x87,
//! SSE, AVX where the host has them: AVX-512 and PKRU go with their instructions, AMX is never
//! offered).
//!
//! The hypervisor leaves (0x4000_0000–0x4000_00ff) describe hbt, not whatever hypervisor the
//! host runs under: a guest must not find KVM's paravirtual clock or MSRs there.

use hbt_translator::cpu::xsave::XsaveLayout;
use iced_x86::CpuidFeature;

const EAX: usize = 0;
const EBX: usize = 1;
const ECX: usize = 2;
const EDX: usize = 3;

/// A CPUID feature bit the model clears.
pub struct Hidden {
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: usize,
    pub bit: u32,
    pub name: &'static str,
    pub why: &'static str,
}

const fn hide(leaf: u32, subleaf: u32, reg: usize, bit: u32, name: &'static str, why: &'static str) -> Hidden {
    Hidden {
        leaf,
        subleaf,
        reg,
        bit,
        name,
        why,
    }
}

const NO_LAPIC: &str = "no local APIC is modelled yet (the 8259 PIC delivers interrupts)";
const NO_CR4_BIT: &str = "system mode does not implement the CR4 bit that enables it";
const NO_EVEX: &str = "the translator has no rules for EVEX-encoded (AVX-512) instructions yet";
const NO_RULE: &str = "the translator has no rule for its instructions (rules::NEVER_COPY)";

/// The features `--accel bt` hides.
pub const HIDDEN: &[Hidden] = &[
    hide(
        1,
        0,
        ECX,
        3,
        "monitor",
        "MONITOR/MWAIT are not modelled (a guest idles with HLT)",
    ),
    hide(1, 0, ECX, 5, "vmx", "no nested virtualization"),
    hide(1, 0, ECX, 6, "smx", "no safer-mode extensions"),
    hide(1, 0, ECX, 17, "pcid", NO_CR4_BIT),
    hide(1, 0, ECX, 21, "x2apic", NO_LAPIC),
    hide(1, 0, ECX, 24, "tsc-deadline", NO_LAPIC),
    hide(1, 0, ECX, 30, "rdrand", NO_RULE),
    hide(1, 0, EDX, 9, "apic", NO_LAPIC),
    hide(7, 0, EBX, 0, "fsgsbase", NO_CR4_BIT),
    hide(7, 0, EBX, 4, "hle", NO_RULE),
    hide(7, 0, EBX, 16, "avx512f", NO_EVEX),
    hide(7, 0, EBX, 17, "avx512dq", NO_EVEX),
    hide(7, 0, EBX, 21, "avx512ifma", NO_EVEX),
    hide(7, 0, EBX, 26, "avx512pf", NO_EVEX),
    hide(7, 0, EBX, 27, "avx512er", NO_EVEX),
    hide(7, 0, EBX, 28, "avx512cd", NO_EVEX),
    hide(7, 0, EBX, 30, "avx512bw", NO_EVEX),
    hide(7, 0, EBX, 31, "avx512vl", NO_EVEX),
    hide(7, 0, ECX, 1, "avx512vbmi", NO_EVEX),
    hide(7, 0, ECX, 6, "avx512vbmi2", NO_EVEX),
    hide(7, 0, ECX, 11, "avx512vnni", NO_EVEX),
    hide(7, 0, ECX, 12, "avx512bitalg", NO_EVEX),
    hide(7, 0, ECX, 14, "avx512vpopcntdq", NO_EVEX),
    hide(7, 0, EDX, 2, "avx512-4vnniw", NO_EVEX),
    hide(7, 0, EDX, 3, "avx512-4fmaps", NO_EVEX),
    hide(7, 0, EDX, 8, "avx512-vp2intersect", NO_EVEX),
    hide(7, 0, EDX, 23, "avx512fp16", NO_EVEX),
    hide(7, 1, EAX, 5, "avx512bf16", NO_EVEX),
    hide(7, 0, EBX, 11, "rtm", NO_RULE),
    hide(7, 0, EBX, 18, "rdseed", NO_RULE),
    hide(7, 0, EBX, 7, "smep", NO_CR4_BIT),
    hide(7, 0, EBX, 10, "invpcid", "PCID is not offered"),
    hide(7, 0, EBX, 20, "smap", NO_CR4_BIT),
    hide(7, 0, ECX, 2, "umip", NO_CR4_BIT),
    hide(7, 0, ECX, 3, "pku", NO_CR4_BIT),
    hide(7, 0, ECX, 5, "waitpkg", NO_RULE),
    hide(7, 0, ECX, 7, "shstk", "CET shadow stacks are not modelled"),
    hide(
        7,
        0,
        ECX,
        16,
        "la57",
        "five-level paging is not implemented by the soft-MMU",
    ),
    hide(7, 0, ECX, 22, "rdpid", NO_RULE),
    hide(7, 0, EDX, 20, "ibt", "CET indirect-branch tracking is not modelled"),
    hide(
        7,
        0,
        EDX,
        29,
        "arch-capabilities",
        "IA32_ARCH_CAPABILITIES is not modelled",
    ),
    hide(
        0xd,
        1,
        EAX,
        3,
        "xsaves",
        "XSAVES/XRSTORS and supervisor state components are not modelled",
    ),
    hide(0x8000_0001, 0, ECX, 2, "svm", "no nested virtualization"),
    hide(0x8000_0008, 0, EBX, 0, "clzero", NO_RULE),
];

/// The hypervisor leaf's signature ("hbt hbt hbt ").
const SIGNATURE: [u32; 3] = [0x2074_6268, 0x2074_6268, 0x2074_6268];

/// The XSAVE components offered: the managed ones whose instructions the guest may use.
pub fn guest_xcr0() -> u64 {
    XsaveLayout::host().xcr0_for(|f| !matches!(f, CpuidFeature::AVX512F | CpuidFeature::PKU))
}

/// CPUID as the guest sees it.
pub fn guest_cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    if (0x4000_0000..0x4000_0100).contains(&leaf) {
        return if leaf == 0x4000_0000 {
            [0x4000_0000, SIGNATURE[0], SIGNATURE[1], SIGNATURE[2]]
        } else {
            [0; 4]
        };
    }
    let r = std::arch::x86_64::__cpuid_count(leaf, subleaf);
    let mut regs = [r.eax, r.ebx, r.ecx, r.edx];
    XsaveLayout::host().guest_cpuid(guest_xcr0(), leaf, subleaf, &mut regs);
    for h in HIDDEN.iter().filter(|h| h.leaf == leaf && h.subleaf == subleaf) {
        regs[h.reg] &= !(1 << h.bit);
    }
    if leaf == 1 {
        // One logical processor: the guest has one vCPU.
        regs[EBX] &= 0x0000_ffff;
        regs[EBX] |= 1 << 16;
        regs[ECX] |= 1 << 31; // hypervisor present
    }
    regs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_features_are_clear_and_the_hypervisor_is_hbt() {
        for h in HIDDEN {
            let r = guest_cpuid(h.leaf, h.subleaf);
            assert_eq!(r[h.reg] & (1 << h.bit), 0, "{} ({})", h.name, h.why);
        }
        assert_ne!(guest_cpuid(1, 0)[ECX] & (1 << 31), 0);
        let sig = guest_cpuid(0x4000_0000, 0);
        let bytes: Vec<u8> = sig[1..].iter().flat_map(|r| r.to_le_bytes()).collect();
        assert_eq!(&bytes, b"hbt hbt hbt ");
        assert_eq!(guest_cpuid(0x4000_0001, 0), [0; 4], "no KVM paravirtual features");
    }

    #[test]
    fn everything_else_is_the_host_s() {
        // SSE2 and the vendor string pass through.
        let r = std::arch::x86_64::__cpuid_count(0, 0);
        assert_eq!(guest_cpuid(0, 0), [r.eax, r.ebx, r.ecx, r.edx]);
        assert_ne!(guest_cpuid(1, 0)[EDX] & (1 << 26), 0);
    }

    #[test]
    fn the_xsave_leaf_offers_no_avx512_state() {
        let xcr0 = guest_xcr0();
        assert_eq!(xcr0 & 0b11, 0b11, "x87 and SSE always");
        assert_eq!(xcr0 & 0xe0, 0, "no AVX-512 components without EVEX rules");
        let [eax, _, _, edx] = guest_cpuid(0xd, 0);
        assert_eq!((edx as u64) << 32 | eax as u64, xcr0);
    }
}
