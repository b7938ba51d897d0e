//! Model-specific registers as data: which MSR index is which piece of guest state, for `rdmsr`
//! and `wrmsr` in system mode. MSRs the CPU core keeps (EFER, the SYSCALL MSRs, FS/GS bases,
//! PAT, …) live in [`GuestState`]; those that belong to devices (the APIC base, the TSC
//! deadline) are the platform's; any other index raises #GP(0), as on hardware.

use crate::platform::Platform;
use crate::state::GuestState;

/// Where an MSR lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    Efer,
    Star,
    Lstar,
    Cstar,
    Sfmask,
    FsBase,
    GsBase,
    KernelGsBase,
    TscAux,
    Pat,
    MiscEnable,
    SpecCtrl,
    SysenterCs,
    SysenterEsp,
    SysenterEip,
    /// MSR_PLATFORM_INFO (Intel model): read-only, only bit 31 — CPUID faulting is offered.
    PlatformInfo,
    /// MSR_MISC_FEATURES_ENABLES (Intel model): bit 0 turns CPUID faulting on.
    MiscFeaturesEnables,
    /// The platform's (APIC base, TSC, TSC deadline, MTRRs, …).
    Platform,
    /// An MSR of AMD CPUs that a kernel reads without checking for #GP (so a guest shown an
    /// AMD CPU gets it, one shown an Intel CPU gets #GP): it reads as the value given, and
    /// writes are dropped, as under KVM.
    AmdFixed(u64),
}

/// The MSRs a kernel touches, by index.
pub const MSRS: &[(u32, &str, Slot)] = &[
    (0x10, "IA32_TIME_STAMP_COUNTER", Slot::Platform),
    (0x1b, "IA32_APIC_BASE", Slot::Platform),
    (0x48, "IA32_SPEC_CTRL", Slot::SpecCtrl),
    (0x8b, "IA32_BIOS_SIGN_ID", Slot::Platform),
    (0x10a, "IA32_ARCH_CAPABILITIES", Slot::Platform),
    (0xce, "MSR_PLATFORM_INFO", Slot::PlatformInfo),
    (0x140, "MSR_MISC_FEATURES_ENABLES", Slot::MiscFeaturesEnables),
    (0x174, "IA32_SYSENTER_CS", Slot::SysenterCs),
    (0x175, "IA32_SYSENTER_ESP", Slot::SysenterEsp),
    (0x176, "IA32_SYSENTER_EIP", Slot::SysenterEip),
    (0x1a0, "IA32_MISC_ENABLE", Slot::MiscEnable),
    (0x277, "IA32_PAT", Slot::Pat),
    (0x6e0, "IA32_TSC_DEADLINE", Slot::Platform),
    (0xc000_0080, "IA32_EFER", Slot::Efer),
    // KVM's paravirtual clock, which the VMM offers through its hypervisor CPUID leaves.
    (0x4b56_4d00, "MSR_KVM_WALL_CLOCK_NEW", Slot::Platform),
    (0x4b56_4d01, "MSR_KVM_SYSTEM_TIME_NEW", Slot::Platform),
    (0xc000_0081, "IA32_STAR", Slot::Star),
    (0xc000_0082, "IA32_LSTAR", Slot::Lstar),
    (0xc000_0083, "IA32_CSTAR", Slot::Cstar),
    (0xc000_0084, "IA32_FMASK", Slot::Sfmask),
    (0xc000_0100, "IA32_FS_BASE", Slot::FsBase),
    (0xc000_0101, "IA32_GS_BASE", Slot::GsBase),
    (0xc000_0102, "IA32_KERNEL_GS_BASE", Slot::KernelGsBase),
    (0xc000_0103, "IA32_TSC_AUX", Slot::TscAux),
    // Linux's early AMD set-up reads these with plain `rdmsr` (and writes NB_CFG's extended
    // config-space bit when a CPU comes online), and checks DE_CFG for a serializing LFENCE
    // (a safe read). HWCR bit 24 (TscFreqSel): the TSC counts at the P0 frequency, constant;
    // OSVW: no erratum workaround is announced; DE_CFG bit 1: LFENCE is dispatch-serializing
    // (always so since Zen 2, and translated `lfence` is the host's).
    (0xc001_0015, "MSR_K7_HWCR", Slot::AmdFixed(1 << 24)),
    (0xc001_001f, "MSR_AMD64_NB_CFG", Slot::AmdFixed(0)),
    (0xc001_0140, "MSR_AMD64_OSVW_ID_LENGTH", Slot::AmdFixed(0)),
    (0xc001_0141, "MSR_AMD64_OSVW_STATUS", Slot::AmdFixed(0)),
    (0xc001_1029, "MSR_AMD64_DE_CFG", Slot::AmdFixed(1 << 1)),
];

/// MSR_PLATFORM_INFO bit 31: CPUID faulting is supported (MSR_MISC_FEATURES_ENABLES bit 0).
const PLATFORM_INFO_CPUID_FAULTING: u64 = 1 << 31;
/// MSR_MISC_FEATURES_ENABLES bit 0: `cpuid` above CPL0 raises #GP(0).
pub(crate) const CPUID_FAULTING: u64 = 1 << 0;
/// EFER bits software may set: SCE, LME, NXE (LMA is the CPU's).
const EFER_WRITABLE: u64 = (1 << 0) | (1 << 8) | (1 << 11);
const EFER_LMA: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const CR0_PG: u64 = 1 << 31;
/// IA32_SPEC_CTRL bits the model accepts: IBRS, STIBP, SSBD, BHI_DIS_S.
const SPEC_CTRL_WRITABLE: u64 = 0b111 | (1 << 10);

fn slot(index: u32) -> Option<Slot> {
    MSRS.iter().find(|&&(i, _, _)| i == index).map(|&(_, _, s)| s)
}

fn field(s: &mut GuestState, slot: Slot) -> Option<&mut u64> {
    Some(match slot {
        Slot::Efer => &mut s.efer,
        Slot::Star => &mut s.sys.msr.star,
        Slot::Lstar => &mut s.sys.msr.lstar,
        Slot::Cstar => &mut s.sys.msr.cstar,
        Slot::Sfmask => &mut s.sys.msr.sfmask,
        Slot::FsBase => &mut s.fs_base,
        Slot::GsBase => &mut s.gs_base,
        Slot::KernelGsBase => &mut s.kernel_gs_base,
        Slot::TscAux => &mut s.sys.msr.tsc_aux,
        Slot::Pat => &mut s.sys.msr.pat,
        Slot::MiscEnable => &mut s.sys.msr.misc_enable,
        Slot::SpecCtrl => &mut s.sys.msr.spec_ctrl,
        Slot::SysenterCs => &mut s.sys.msr.sysenter_cs,
        Slot::SysenterEsp => &mut s.sys.msr.sysenter_esp,
        Slot::SysenterEip => &mut s.sys.msr.sysenter_eip,
        Slot::MiscFeaturesEnables => &mut s.sys.msr.misc_features_enables,
        Slot::Platform | Slot::AmdFixed(_) | Slot::PlatformInfo => return None,
    })
}

/// Whether the platform's CPU model is an AMD one (CPUID leaf 0's vendor).
fn amd_model(platform: &mut dyn Platform) -> bool {
    let [_, ebx, ecx, edx] = platform.cpuid(0, 0);
    crate::cpu::vendor::Vendor::from_leaf0(ebx, edx, ecx) == crate::cpu::vendor::Vendor::Amd
}

/// `rdmsr`: the value, or None for #GP(0).
pub fn read(s: &mut GuestState, platform: &mut dyn Platform, index: u32) -> Option<u64> {
    match slot(index)? {
        Slot::Platform => platform.rdmsr(index),
        Slot::AmdFixed(value) => amd_model(platform).then_some(value),
        // Intel's CPUID faulting (AMD's is another MSR, which the model does not offer).
        Slot::PlatformInfo => (!amd_model(platform)).then_some(PLATFORM_INFO_CPUID_FAULTING),
        Slot::MiscFeaturesEnables if amd_model(platform) => None,
        Slot::TscAux => Some(s.sys.msr.tsc_aux & 0xffff_ffff),
        other => field(s, other).map(|v| *v),
    }
}

/// `wrmsr`: Some(()) when written, None for #GP(0) (unknown MSR, reserved bits, a
/// non-canonical base).
pub fn write(s: &mut GuestState, platform: &mut dyn Platform, index: u32, value: u64) -> Option<()> {
    let slot = slot(index)?;
    match slot {
        Slot::Platform => return platform.wrmsr(index, value),
        Slot::AmdFixed(_) => return amd_model(platform).then_some(()),
        Slot::PlatformInfo => return None,
        Slot::MiscFeaturesEnables if amd_model(platform) || value & !CPUID_FAULTING != 0 => return None,
        Slot::Efer => {
            // LME cannot change while paging is on (the harness and every kernel run with it
            // on: the model is 64-bit only).
            if value & !(EFER_WRITABLE | EFER_LMA) != 0 || (value ^ s.efer) & EFER_LME != 0 && s.cr0 & CR0_PG != 0 {
                return None;
            }
            s.efer = (value & EFER_WRITABLE) | (s.efer & EFER_LMA);
            return Some(());
        }
        Slot::Lstar
        | Slot::Cstar
        | Slot::FsBase
        | Slot::GsBase
        | Slot::KernelGsBase
        | Slot::SysenterEsp
        | Slot::SysenterEip
            if !crate::mmu::is_canonical(value) =>
        {
            return None
        }
        Slot::TscAux if value >> 32 != 0 => return None,
        Slot::SpecCtrl if value & !SPEC_CTRL_WRITABLE != 0 => return None,
        // Each of the eight entries is a memory type: UC, WC, WT, WP, WB or UC- (0, 1, 4..7).
        Slot::Pat if value.to_le_bytes().iter().any(|&t| !matches!(t, 0 | 1 | 4..=7)) => return None,
        _ => {}
    }
    *field(s, slot)? = value;
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoDevices;
    impl Platform for NoDevices {
        fn cpuid(&mut self, _: u32, _: u32) -> [u32; 4] {
            [0; 4]
        }
        fn rdtsc(&mut self) -> u64 {
            0
        }
        fn tsc_aux(&mut self) -> u32 {
            0
        }
    }

    /// A platform whose CPU model says AuthenticAMD.
    struct AmdModel;
    impl Platform for AmdModel {
        fn cpuid(&mut self, leaf: u32, _: u32) -> [u32; 4] {
            let id = |s: &[u8; 4]| u32::from_le_bytes(*s);
            if leaf == 0 {
                [0xd, id(b"Auth"), id(b"cAMD"), id(b"enti")]
            } else {
                [0; 4]
            }
        }
        fn rdtsc(&mut self) -> u64 {
            0
        }
        fn tsc_aux(&mut self) -> u32 {
            0
        }
    }

    #[test]
    fn cpuid_faulting_is_offered_on_the_intel_model_only() {
        let mut s = GuestState::default();
        // NoDevices' CPUID leaf 0 names no vendor: the Intel model.
        assert_eq!(read(&mut s, &mut NoDevices, 0xce), Some(1 << 31), "MSR_PLATFORM_INFO");
        assert_eq!(write(&mut s, &mut NoDevices, 0xce, 0), None, "read-only");
        assert_eq!(write(&mut s, &mut NoDevices, 0x140, 1), Some(()));
        assert_eq!(s.sys.msr.misc_features_enables, 1);
        assert_eq!(read(&mut s, &mut NoDevices, 0x140), Some(1));
        assert_eq!(write(&mut s, &mut NoDevices, 0x140, 2), None, "only bit 0");
        assert_eq!(read(&mut s, &mut AmdModel, 0xce), None);
        assert_eq!(read(&mut s, &mut AmdModel, 0x140), None);
        assert_eq!(write(&mut s, &mut AmdModel, 0x140, 1), None);
    }

    #[test]
    fn table_round_trips_and_refuses_what_hardware_refuses() {
        let mut s = GuestState::default();
        let p = &mut NoDevices;
        assert_eq!(write(&mut s, p, 0xc000_0082, 0xffff_ffff_8100_0000), Some(()));
        assert_eq!(read(&mut s, p, 0xc000_0082), Some(0xffff_ffff_8100_0000));
        assert_eq!(
            write(&mut s, p, 0xc000_0082, 0x8000_0000_0000_0000),
            None,
            "non-canonical LSTAR"
        );
        assert_eq!(read(&mut s, p, 0x1234), None, "unknown MSR");
        let lma = s.efer & EFER_LMA;
        assert_eq!(write(&mut s, p, 0xc000_0080, 0x101), Some(()));
        assert_eq!(s.efer, 0x101 | lma, "LMA is kept, only SCE/LME/NXE are written");
        assert_eq!(write(&mut s, p, 0xc000_0080, 1 << 20), None, "reserved EFER bit");
        s.efer = 0xd01;
        assert_eq!(
            write(&mut s, p, 0xc000_0080, 0xc01),
            None,
            "clearing LME with paging on"
        );
        assert_eq!(
            write(&mut s, p, 0xc000_0080, 0x501),
            Some(()),
            "NXE may change (LMA is ignored)"
        );
        assert_eq!(
            write(&mut s, p, 0x277, 0x0007_0406_0007_0406),
            Some(()),
            "the reset PAT"
        );
        assert_eq!(
            write(&mut s, p, 0x277, 0x0007_0406_0007_0402),
            None,
            "memory type 2 is reserved"
        );
        assert_eq!(
            write(&mut s, p, 0x277, 0x0807_0406_0007_0406),
            None,
            "memory type 8 is reserved"
        );
        assert_eq!(read(&mut s, p, 0x1b), None, "no APIC on this platform");
        assert_eq!(read(&mut s, p, 0xc001_0140), None, "OSVW: not an AMD model");
        let amd = &mut AmdModel;
        assert_eq!(read(&mut s, amd, 0xc001_0015), Some(1 << 24), "HWCR.TscFreqSel");
        assert_eq!(
            write(&mut s, amd, 0xc001_001f, 1 << 46),
            Some(()),
            "NB_CFG write dropped"
        );
        assert_eq!(read(&mut s, amd, 0xc001_001f), Some(0));
        assert_eq!(write(&mut s, p, 0x48, 1), Some(()), "SPEC_CTRL.IBRS");
        assert_eq!(read(&mut s, p, 0x48), Some(1));
        assert_eq!(write(&mut s, p, 0x48, 1 << 3), None, "reserved SPEC_CTRL bit");
        let indexes: std::collections::HashSet<u32> = MSRS.iter().map(|m| m.0).collect();
        assert_eq!(indexes.len(), MSRS.len(), "one row per MSR");
    }
}
