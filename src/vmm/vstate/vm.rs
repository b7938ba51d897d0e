//! The KVM VM: guest RAM registered as memory slots, the in-kernel interrupt controllers and
//! PIT (the `timer` guest's clock), and a vCPU with the host's supported CPUID — or, for an
//! engine that brings hbt's own interrupt controllers (the hybrid engine), a bare VM whose vCPU
//! shows the guest hbt's CPU model (`cpuid.rs`).

use super::error::{IoctlContext, Result, VmError};
use crate::vmm::memory::GuestMemory;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

pub struct Vm {
    pub kvm: Kvm,
    /// Shared with devices that raise interrupts (KVM_IRQ_LINE is safe from any thread).
    pub fd: std::sync::Arc<VmFd>,
}

impl Vm {
    pub fn new(mem: &GuestMemory) -> Result<Self> {
        let vm = Vm::bare(mem)?;
        vm.fd.create_irq_chip().ioctl("KVM_CREATE_IRQCHIP")?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.fd.create_pit2(pit).ioctl("KVM_CREATE_PIT2")?;
        Ok(vm)
    }

    /// Guest RAM only: no in-kernel interrupt controllers or PIT (`hlt` and every interrupt
    /// are the VMM's).
    pub fn bare(mem: &GuestMemory) -> Result<Self> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm.create_vm().ioctl("KVM_CREATE_VM")?;
        for (slot, r) in mem.regions().iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: r.guest,
                memory_size: r.size,
                userspace_addr: mem.host_base() + r.offset,
                flags: 0,
            };
            // SAFETY: the region lies inside `mem`'s mapping, which outlives the VM (the Vmm
            // owns both and drops the VM first).
            unsafe { fd.set_user_memory_region(region) }.ioctl("KVM_SET_USER_MEMORY_REGION")?;
        }
        Ok(Vm {
            kvm,
            fd: std::sync::Arc::new(fd),
        })
    }

    /// A level-triggered ISA interrupt line `irq` on the in-kernel PIC/IOAPIC.
    pub fn irq_line(&self, irq: u32) -> crate::vmm::devices::IrqLine {
        let fd = std::sync::Arc::clone(&self.fd);
        crate::vmm::devices::IrqLine::new(move |level| {
            // A failed KVM_IRQ_LINE only loses an interrupt; nothing else to do from a device.
            let _ = fd.set_irq_line(irq, level);
        })
    }

    pub fn create_vcpu(&self) -> Result<VcpuFd> {
        let vcpu = self.fd.create_vcpu(0).ioctl("KVM_CREATE_VCPU")?;
        let mut cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .ioctl("KVM_GET_SUPPORTED_CPUID")?;
        // KVM emulates the TSC-deadline timer in its in-kernel local APIC but leaves the CPUID
        // bit to userspace (as QEMU sets it); `--accel bt` offers it too (`devices/lapic.rs`).
        if self.kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
            for e in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
                e.ecx |= 1 << 24;
            }
        }
        vcpu.set_cpuid2(&cpuid).ioctl("KVM_SET_CPUID2")?;
        super::vcpu::wire_lapic(&vcpu)?;
        Ok(vcpu)
    }

    /// A vCPU whose CPUID is hbt's CPU model (what `--accel bt` shows the guest), for a VM
    /// made with [`Vm::bare`].
    pub fn create_model_vcpu(&self) -> Result<VcpuFd> {
        let vcpu = self.fd.create_vcpu(0).ioctl("KVM_CREATE_VCPU")?;
        vcpu.set_cpuid2(&model_cpuid(&self.kvm)?).ioctl("KVM_SET_CPUID2")?;
        Ok(vcpu)
    }
}

/// KVM's table of CPUID leaves with hbt's CPU model's values (`cpuid::guest_cpuid`) in each.
pub fn model_cpuid(kvm: &Kvm) -> Result<kvm_bindings::CpuId> {
    let mut table = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .ioctl("KVM_GET_SUPPORTED_CPUID")?;
    for e in table.as_mut_slice() {
        [e.eax, e.ebx, e.ecx, e.edx] = crate::vmm::cpuid::guest_cpuid(e.function, e.index);
    }
    Ok(table)
}
