//! The CPUID a guest sees under an engine without KVM (`--accel bt`): the host's, minus the
//! features this machine model does not have. Each hidden feature is one row of [`HIDDEN`],
//! with the reason, so adding a device, a system feature or a family of instruction rules means
//! deleting a row. The XSAVE leaves describe exactly the components of [`guest_xcr0`] (x87,
//! SSE, AVX where the host has them: AVX-512 and PKRU go with their instructions, AMX is never
//! offered).
//!
//! The hypervisor leaves (0x4000_0000–0x4000_00ff) describe hbt, not whatever hypervisor the
//! host runs under. They carry KVM's signature with exactly the KVM paravirtual features hbt
//! implements itself: the clock (`devices/pvclock.rs`: the TSC rate on every vendor, since
//! Linux reads CPUID 15H only on Intel) and "port 0x80 delays are not needed". A guest looking
//! for anything else of KVM's (steal time, PV EOI, async page faults, hypercalls) finds its
//! feature bit clear.

use hbt_coverage::cpu_model::{self, CpuModel};
use hbt_translator::cpu::xsave::XsaveLayout;
use iced_x86::CpuidFeature;

const EAX: usize = 0;
const EBX: usize = 1;
const ECX: usize = 2;
const EDX: usize = 3;

/// A CPUID bit the model clears ([`HIDDEN`]) or sets ([`CLAIMED`]).
pub struct ModelBit {
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: usize,
    pub bit: u32,
    pub name: &'static str,
    pub why: &'static str,
}

const fn hide(leaf: u32, subleaf: u32, reg: usize, bit: u32, name: &'static str, why: &'static str) -> ModelBit {
    ModelBit {
        leaf,
        subleaf,
        reg,
        bit,
        name,
        why,
    }
}

const NO_X2APIC: &str = "the local APIC is modelled in xAPIC (MMIO) mode only";
const NO_CR4_BIT: &str = "system mode does not implement the CR4 bit that enables it";
const NO_RTM: &str = "transactional memory is not offered to whole-machine guests (the translator's transactions always abort; under KVM user code would run real ones)";
const NO_RULE: &str = "the translator has no rule for its instructions (rules::NEVER_COPY)";

/// The features `--accel bt` hides.
pub const HIDDEN: &[ModelBit] = &[
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
    hide(1, 0, ECX, 21, "x2apic", NO_X2APIC),
    hide(
        1,
        0,
        EDX,
        12,
        "mtrr",
        "MTRRs are not modelled (memory types mean nothing to a translator)",
    ),
    hide(7, 0, EBX, 0, "fsgsbase", NO_CR4_BIT),
    hide(7, 0, EBX, 1, "tsc-adjust", "IA32_TSC_ADJUST is not modelled"),
    hide(7, 0, EBX, 4, "hle", NO_RTM),
    hide(7, 0, EBX, 11, "rtm", NO_RTM),
    hide(7, 0, EBX, 7, "smep", NO_CR4_BIT),
    hide(7, 0, EBX, 10, "invpcid", "PCID is not offered"),
    hide(7, 0, EBX, 20, "smap", NO_CR4_BIT),
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
    hide(7, 0, EDX, 20, "ibt", "CET indirect-branch tracking is not modelled"),
    hide(
        0xd,
        1,
        EAX,
        3,
        "xsaves",
        "XSAVES/XRSTORS and supervisor state components are not modelled",
    ),
    hide(0x8000_0001, 0, ECX, 2, "svm", "no nested virtualization"),
    hide(
        0x8000_0001,
        0,
        EDX,
        26,
        "pdpe1gb",
        "1 GiB pages are not tracked by INVLPG's code-region check (PS in a PDPTE faults as reserved)",
    ),
    hide(0x8000_0008, 0, EBX, 0, "clzero", NO_RULE),
];

/// Why the model says the CPU is not affected by a speculative-execution bug: the guest's
/// code never runs as written. Its software mitigations (return thunks, retpolines, buffer
/// clearing on kernel exit) are translated like any other code, so they would cost a kernel
/// under hbt dearly — a return thunk turns every `ret` into a return-cache miss — and protect
/// nothing: what speculates on the host is hbt's code, and keeping the guest from the host is
/// hbt's job, not the guest's.
const TRANSLATED: &str = "guest code runs translated: its mitigation would cost and not protect";

/// The bits `--accel bt` sets whatever the host has, where the host has the leaf: a feature
/// hbt provides itself, and "not affected" claims.
pub const CLAIMED: &[ModelBit] = &[
    // `rules::EmulateOp::Serialize`: translated code performs it on any host. Linux's
    // `sync_core` (after every text patch: ≈108,000 in a boot) then runs it instead of an
    // `iretq` to itself, which the engine emulates: a bt boot of Debian's kernel to power-off
    // went from 1.145 to 1.084 s, a hybrid one from 1.119 to 1.075 s (medians of 8 and 6
    // interleaved runs, AMD EPYC host without SERIALIZE). User code under KVM on a host
    // without it: kvm_pvm completed it (measured), or the #UD leaves KVM and the hybrid
    // engine re-runs the instruction in the translator.
    hide(
        7,
        0,
        EDX,
        14,
        "serialize",
        "the translator performs it on any host (a host mfence)",
    ),
    // `devices/lapic.rs`: its timer runs in every state the guest can put the CPU in (Linux
    // then needs no PIT to back it up, `apic_needs_pit`).
    hide(
        6,
        0,
        EAX,
        2,
        "arat",
        "the modelled local APIC timer always runs (no deep C-states)",
    ),
    // IA32_ARCH_CAPABILITIES exists; it reads ARCH_CAPABILITIES below.
    hide(7, 0, EDX, 29, "arch-capabilities", TRANSLATED),
    // BHI_DIS_S in IA32_SPEC_CTRL (which the core stores): Linux 6.1 still counts itself
    // exposed to branch-history injection despite BHI_NO when it sees a hypervisor, and then
    // sets this bit once instead of running a history-clearing loop on every kernel entry.
    hide(7, 2, EDX, 4, "bhi-ctrl", TRANSLATED),
    hide(0x8000_0021, 0, EAX, 29, "srso-no", TRANSLATED),
    hide(0x8000_0021, 0, ECX, 1, "tsa-sq-no", TRANSLATED),
    hide(0x8000_0021, 0, ECX, 2, "tsa-l1-no", TRANSLATED),
];

/// IA32_ARCH_CAPABILITIES as `--accel bt` reports it: not affected by Meltdown (RDCL_NO, so
/// Linux turns page-table isolation off: it cost a CR3 write per kernel entry and exit, and
/// kept kernel text from being global), MDS, TAA, the MMIO stale-data bugs (SBDR/FBSDP/PSDP),
/// GDS, RFDS (so no VERW buffer clearing on every return to user mode) and PBRSB; enhanced IBRS
/// (IBRS_ALL: Linux then uses no retpolines — each one turned an indirect call of the kernel
/// into an `ret` to a rewritten return address, a return-cache miss and a trip through the
/// engine) and not affected by BHI or ITS (no branch-history clearing loop on kernel entry, no
/// return thunks), all for the reason in [`TRANSLATED`]. Enhanced IBRS implies IA32_SPEC_CTRL,
/// which the core stores (`system/msr.rs`). Read-only, as on hardware.
pub const ARCH_CAPABILITIES: u64 = (1 << 0) // RDCL_NO
    | (1 << 1) // IBRS_ALL
    | (1 << 5) // MDS_NO
    | (1 << 8) // TAA_NO
    | (1 << 13) // SBDR_SSDP_NO
    | (1 << 14) // FBSDP_NO
    | (1 << 15) // PSDP_NO
    | (1 << 20) // BHI_NO
    | (1 << 24) // PBRSB_NO
    | (1 << 26) // GDS_NO
    | (1 << 27) // RFDS_NO
    | (1 << 62); // ITS_NO
/// Its MSR index.
pub const IA32_ARCH_CAPABILITIES: u32 = 0x10a;

/// The hypervisor leaf's signature ("KVMKVMKVM\0\0\0"): the ABI of the features below.
const SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
/// KVM paravirtual features (CPUID 0x4000_0001 EAX) hbt implements, by bit.
const KVM_FEATURE_NOP_IO_DELAY: u32 = 1 << 1;
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
const KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: u32 = 1 << 24;
const PARAVIRT_FEATURES: u32 = KVM_FEATURE_NOP_IO_DELAY | KVM_FEATURE_CLOCKSOURCE2 | KVM_FEATURE_CLOCKSOURCE_STABLE_BIT;

/// The XSAVE components offered: the managed ones whose instructions the guest may use.
/// AVX-512's are offered where the host has them and the translator runs all of AVX512F's
/// forms: kvm_pvm runs guest user code with the host's XCR0 whatever the guest's, so a model
/// without them would still see user code's `xsavec` save them (and fault past a buffer sized
/// from its CPUID: the dynamic loader's lazy-binding trampoline did, under hybrid) and
/// `xgetbv` report them.
pub fn guest_xcr0() -> u64 {
    let avx512 = avx512_translatable()[CpuidFeature::AVX512F as usize];
    XsaveLayout::host().xcr0_for(|f| match f {
        CpuidFeature::PKU => false,
        CpuidFeature::AVX512F => avx512,
        _ => true,
    })
}

/// Per `CpuidFeature`: false for an AVX-512 feature (one of its forms) the host has but the
/// translator does not run, so the model hides it as `hbt exec` does
/// (`cpu_model::translatable_features`); true for every other feature (the model's other
/// choices are [`HIDDEN`]'s).
fn avx512_translatable() -> &'static [bool] {
    static KEEP: std::sync::OnceLock<Vec<bool>> = std::sync::OnceLock::new();
    KEEP.get_or_init(|| {
        let translatable = cpu_model::translatable_features(CpuModel::Host, hbt_translator::supported::is_supported);
        CpuidFeature::values()
            .map(|f| !format!("{f:?}").starts_with("AVX512") || translatable[f as usize])
            .collect()
    })
}

/// CPUID as the guest sees it.
///
/// Computed once per (leaf, subleaf) and remembered: each host CPUID is a VM exit when hbt
/// itself runs in a VM (several microseconds), and the translator asks for some leaves on every
/// `mov cr3` (the physical-address width) — a Linux boot's 17,600 CR3 writes made CPUID a
/// quarter of its time.
pub fn guest_cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    use std::sync::OnceLock;
    static MODEL: OnceLock<ModelCache> = OnceLock::new();
    // Most leaves ignore ECX: a guest asking for leaf 1 with ECX = 1 gets leaf 1, whose
    // hidden features ([`HIDDEN`], keyed by subleaf 0) stay hidden.
    let subleaf = if has_subleaves(leaf) { subleaf } else { 0 };
    let model = MODEL.get_or_init(Default::default);
    if let Some(&regs) = model.lock().unwrap_or_else(|e| e.into_inner()).get(&(leaf, subleaf)) {
        return regs;
    }
    let regs = model_cpuid(leaf, subleaf);
    model
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert((leaf, subleaf), regs);
    regs
}

/// The CPUID results computed so far, by (leaf, subleaf).
type ModelCache = std::sync::Mutex<std::collections::HashMap<(u32, u32), [u32; 4]>>;

/// [`guest_cpuid`] computed from the host's CPUID.
fn model_cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    if (0x4000_0000..0x4000_0100).contains(&leaf) {
        return match leaf {
            0x4000_0000 => [0x4000_0001, SIGNATURE[0], SIGNATURE[1], SIGNATURE[2]],
            0x4000_0001 => [PARAVIRT_FEATURES, 0, 0, 0],
            _ => [0; 4],
        };
    }
    let r = std::arch::x86_64::__cpuid_count(leaf, subleaf);
    let mut regs = [r.eax, r.ebx, r.ecx, r.edx];
    XsaveLayout::host().guest_cpuid(guest_xcr0(), leaf, subleaf, &mut regs);
    for h in HIDDEN.iter().filter(|h| h.leaf == leaf && h.subleaf == subleaf) {
        regs[h.reg] &= !(1 << h.bit);
    }
    if leaf == 7 {
        cpu_model::mask_cpuid(avx512_translatable(), leaf, subleaf, &mut regs);
    }
    if leaf <= max_leaf_of(leaf) {
        for c in CLAIMED.iter().filter(|c| c.leaf == leaf && c.subleaf == subleaf) {
            regs[c.reg] |= 1 << c.bit;
        }
        if leaf == 7 && subleaf == 0 {
            // Leaf 7's EAX is its highest subleaf: a claimed bit's subleaf must be visible
            // (hosts whose leaf 7 ends before it answer it with zeros).
            let claimed = CLAIMED.iter().filter(|c| c.leaf == 7).map(|c| c.subleaf);
            regs[EAX] = claimed.fold(regs[EAX], u32::max);
        }
    }
    if leaf == 0x15 && regs[EAX] == 0 && max_basic_leaf() >= 0x15 {
        // TSC/crystal ratio 1:1 at a 1 kHz "crystal": TSC Hz = ECX * EBX / EAX. A kernel that
        // reads it (Linux does on Intel) never calibrates against a spinning PIT loop, which
        // translated port reads make noisy.
        regs = [1, tsc_khz() as u32, 1000, 0];
    }
    if leaf == 0x16 && regs[EAX] == 0 && max_basic_leaf() >= 0x16 {
        let mhz = (tsc_khz() / 1000) as u32;
        regs = [mhz, mhz, 100, 0];
    }
    if leaf == 1 {
        // One logical processor, APIC ID 0: the guest has one vCPU (`devices/lapic.rs`).
        regs[EBX] &= 0x0000_ffff;
        regs[EBX] |= 1 << 16;
        regs[ECX] |= 1 << 31; // hypervisor present
    }
    if matches!(leaf, 0xb | 0x1f) {
        regs[EDX] = 0; // the x2APIC ID of this (the only) processor
    }
    if leaf == 0x8000_001e {
        regs[EAX] = 0; // AMD's extended APIC ID
    }
    regs
}

/// Leaves whose ECX selects a subleaf (SDM vol. 2 CPUID, AMD APM vol. 3 appendix E): cache and
/// topology enumeration, structured extended features, XSAVE, RDT, SGX, processor trace, SoC
/// vendor, PCONFIG, AMX, AVX10, AMD's cache topology and QoS leaves.
fn has_subleaves(leaf: u32) -> bool {
    matches!(
        leaf,
        0x4 | 0x7
            | 0xb
            | 0xd
            | 0xf
            | 0x10
            | 0x12
            | 0x14
            | 0x17
            | 0x18
            | 0x1b
            | 0x1d
            | 0x1e
            | 0x1f
            | 0x20
            | 0x23
            | 0x24
            | 0x8000_001d
            | 0x8000_0020
            | 0x8000_0026
    )
}

fn max_basic_leaf() -> u32 {
    std::arch::x86_64::__cpuid_count(0, 0).eax
}

/// The host's highest leaf in `leaf`'s range (basic or extended).
fn max_leaf_of(leaf: u32) -> u32 {
    std::arch::x86_64::__cpuid_count(leaf & 0x8000_0000, 0).eax
}

/// The host TSC's rate in kHz (the guest's TSC is the host's): from CPUID 15H when the host
/// says, else measured once against the monotonic clock over 20 ms (±0.01%).
pub fn tsc_khz() -> u64 {
    static KHZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *KHZ.get_or_init(|| {
        let r = std::arch::x86_64::__cpuid_count(0x15, 0);
        if max_basic_leaf() >= 0x15 && r.eax != 0 && r.ebx != 0 && r.ecx != 0 {
            return r.ecx as u64 * r.ebx as u64 / r.eax as u64 / 1000;
        }
        measured_tsc_khz()
    })
}

fn measured_tsc_khz() -> u64 {
    use std::time::{Duration, Instant};
    // SAFETY: rdtsc has no memory effects.
    let tsc = || unsafe { std::arch::x86_64::_rdtsc() };
    // An (instant, TSC) pair taken between two TSC reads; the tightest of a few tries.
    let pair = || {
        (0..5)
            .map(|_| {
                let a = tsc();
                let now = Instant::now();
                let b = tsc();
                (b - a, now, a / 2 + b / 2)
            })
            .min_by_key(|&(width, _, _)| width)
            .map(|(_, now, t)| (now, t))
            .unwrap()
    };
    let (t0, c0) = pair();
    std::thread::sleep(Duration::from_millis(20));
    let (t1, c1) = pair();
    let ns = (t1 - t0).as_nanos().max(1) as u64;
    ((c1 - c0) as u128 * 1_000_000 / ns as u128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_features_are_clear_and_only_the_paravirtual_clock_is_offered() {
        for h in HIDDEN {
            let r = guest_cpuid(h.leaf, h.subleaf);
            assert_eq!(r[h.reg] & (1 << h.bit), 0, "{} ({})", h.name, h.why);
        }
        assert_ne!(guest_cpuid(1, 0)[ECX] & (1 << 31), 0);
        let sig = guest_cpuid(0x4000_0000, 0);
        let bytes: Vec<u8> = sig[1..].iter().flat_map(|r| r.to_le_bytes()).collect();
        assert_eq!(&bytes, b"KVMKVMKVM\0\0\0");
        assert_eq!(sig[0], 0x4000_0001, "highest hypervisor leaf");
        // Bits 1, 3 and 24: NOP_IO_DELAY, CLOCKSOURCE2, CLOCKSOURCE_STABLE_BIT; nothing else.
        assert_eq!(guest_cpuid(0x4000_0001, 0), [0x0100_000a, 0, 0, 0]);
        assert_eq!(guest_cpuid(0x4000_0002, 0), [0; 4]);
    }

    #[test]
    fn a_leaf_without_subleaves_ignores_ecx() {
        // The system harness found leaf 1 with ECX = 1 offering x2APIC and PCID, and leaf
        // 0x8000_0001 with ECX = 1 offering 1 GiB pages: the hidden bits are keyed by subleaf 0.
        for leaf in [1, 0x8000_0001] {
            for subleaf in [1, 2, 0xffff_ffff] {
                assert_eq!(
                    guest_cpuid(leaf, subleaf),
                    guest_cpuid(leaf, 0),
                    "leaf {leaf:#x} ECX {subleaf:#x}"
                );
            }
        }
        for h in HIDDEN.iter().filter(|h| !has_subleaves(h.leaf)) {
            assert_eq!(guest_cpuid(h.leaf, 1)[h.reg] & (1 << h.bit), 0, "{}", h.name);
        }
    }

    #[test]
    fn not_affected_claims_are_set_where_the_leaf_exists() {
        for c in CLAIMED {
            let r = guest_cpuid(c.leaf, c.subleaf);
            if c.leaf <= max_leaf_of(c.leaf) {
                assert_ne!(r[c.reg] & (1 << c.bit), 0, "{} ({})", c.name, c.why);
            } else {
                // No such leaf on this host: the guest reads what the host reads.
                let h = std::arch::x86_64::__cpuid_count(c.leaf, c.subleaf);
                let host = [h.eax, h.ebx, h.ecx, h.edx];
                assert_eq!(r[c.reg] & (1 << c.bit), host[c.reg] & (1 << c.bit), "{}", c.name);
            }
        }
    }

    #[test]
    fn everything_else_is_the_host_s() {
        // SSE2 and the vendor string pass through.
        let r = std::arch::x86_64::__cpuid_count(0, 0);
        assert_eq!(guest_cpuid(0, 0), [r.eax, r.ebx, r.ecx, r.edx]);
        assert_ne!(guest_cpuid(1, 0)[EDX] & (1 << 26), 0);
    }

    #[test]
    fn the_tsc_rate_is_offered_where_the_leaf_exists() {
        // Between 500 MHz and 10 GHz on any host these tests run on.
        let khz = tsc_khz();
        assert!((500_000..10_000_000).contains(&khz), "{khz} kHz");
        if max_basic_leaf() >= 0x15 {
            let [eax, ebx, ecx, _] = guest_cpuid(0x15, 0);
            let hz = ecx as u64 * ebx as u64 / eax as u64;
            assert_eq!(hz / 1000, khz, "CPUID 15H gives the TSC rate");
        }
    }

    #[test]
    fn the_xsave_leaf_offers_the_hosts_avx512_state() {
        let xcr0 = guest_xcr0();
        assert_eq!(xcr0 & 0b11, 0b11, "x87 and SSE always");
        let offered = avx512_translatable()[CpuidFeature::AVX512F as usize];
        let managed = XsaveLayout::host().managed();
        assert_eq!(
            xcr0 & 0xe0,
            if offered { managed & 0xe0 } else { 0 },
            "AVX-512 components where the host has them and the translator runs AVX512F"
        );
        let [eax, _, _, edx] = guest_cpuid(0xd, 0);
        assert_eq!((edx as u64) << 32 | eax as u64, xcr0);
        let avx512f = guest_cpuid(7, 0)[1] >> 16 & 1;
        assert_eq!(avx512f == 1, xcr0 & 0xe0 == 0xe0, "AVX512F with its state");
    }
}
