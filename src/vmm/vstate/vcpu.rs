//! vCPU helpers: LAPIC wiring for the legacy PIC, and a register dump for error reports.

use super::error::{IoctlContext, Result};
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
    let Ok(r) = vcpu.get_regs() else {
        return "(registers unavailable)".into();
    };
    let s = vcpu.get_sregs().ok();
    let mut out = format!(
        "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x}",
        r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp
    );
    if let Some(s) = s {
        out += &format!(
            " cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            s.cs.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
        );
    }
    // RIP is a guest-virtual address; with hbt's identity map it is also guest-physical.
    let mut bytes = [0u8; 15];
    if mem.read(r.rip, &mut bytes).is_ok() {
        let instr = iced_x86::Decoder::with_ip(64, &bytes, r.rip, iced_x86::DecoderOptions::NONE).decode();
        out += &format!(
            " bytes at rip: {} ({})",
            bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" "),
            if instr.is_invalid() {
                "not a valid instruction".to_string()
            } else {
                format!("`{instr}`")
            }
        );
    }
    out
}
