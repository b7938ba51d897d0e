//! vCPU helpers: LAPIC wiring for the legacy PIC, and a register dump for error reports.

use super::error::{IoctlContext, Result};
use crate::vmm::cpu_state::CpuSnapshot;
use crate::vmm::memory::GuestMemory;
use kvm_ioctls::VcpuFd;

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const DELIVERY_EXTINT: u32 = 0x7 << 8;
const DELIVERY_NMI: u32 = 0x4 << 8;

/// LINT0 as ExtINT (the 8259 PIC's output) and LINT1 as NMI, as a PC BIOS leaves them.
pub fn wire_lapic(vcpu: &VcpuFd) -> Result<()> {
    let mut lapic = vcpu.get_lapic().ioctl("KVM_GET_LAPIC")?;
    let mut set = |reg: usize, mode: u32| {
        let bytes = &mut lapic.regs[reg..reg + 4];
        let old = u32::from_le_bytes([bytes[0] as u8, bytes[1] as u8, bytes[2] as u8, bytes[3] as u8]);
        let new = (old & !0x1_0700) | mode; // unmask, set the delivery mode
        for (i, b) in new.to_le_bytes().iter().enumerate() {
            bytes[i] = *b as _;
        }
    };
    set(APIC_LVT_LINT0, DELIVERY_EXTINT);
    set(APIC_LVT_LINT1, DELIVERY_NMI);
    vcpu.set_lapic(&lapic).ioctl("KVM_SET_LAPIC")
}

/// One line of registers plus the bytes at RIP (for reports of faults and KVM errors).
pub fn describe(vcpu: &VcpuFd, mem: &GuestMemory) -> String {
    let (Ok(r), Ok(s)) = (vcpu.get_regs(), vcpu.get_sregs()) else {
        return "(registers unavailable)".into();
    };
    // RIP is a guest-virtual address; with hbt's identity map it is also guest-physical.
    let mut bytes = [0u8; 15];
    let code = mem.read(r.rip, &mut bytes).is_ok().then_some(bytes);
    CpuSnapshot::from_kvm(&r, &s).describe(code)
}
