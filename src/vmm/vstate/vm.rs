//! The KVM VM: guest RAM registered as memory slots, the in-kernel interrupt controllers and
//! PIT (the `timer` guest's clock), and a vCPU with the host's supported CPUID.

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
        fd.create_irq_chip().ioctl("KVM_CREATE_IRQCHIP")?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).ioctl("KVM_CREATE_PIT2")?;
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
}
