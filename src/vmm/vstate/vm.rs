//! The KVM VM: guest RAM registered as memory slots, the in-kernel interrupt controllers and
//! PIT (the `timer` guest's clock), and a vCPU with the host's supported CPUID.

use crate::vmm::memory::GuestMemory;
use anyhow::{Context, Result};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
}

impl Vm {
    pub fn new(mem: &GuestMemory) -> Result<Self> {
        let kvm = Kvm::new().map_err(|e| {
            anyhow::anyhow!(
                "cannot open /dev/kvm ({e}): hbt run needs KVM; check that /dev/kvm exists and you may read and write it \
                 (e.g. add yourself to the `kvm` group)"
            )
        })?;
        let fd = kvm.create_vm().context("KVM_CREATE_VM failed")?;
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
            unsafe { fd.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION failed")?;
        }
        fd.create_irq_chip().context("KVM_CREATE_IRQCHIP failed")?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).context("KVM_CREATE_PIT2 failed")?;
        Ok(Vm { kvm, fd })
    }

    pub fn create_vcpu(&self) -> Result<VcpuFd> {
        let vcpu = self.fd.create_vcpu(0).context("KVM_CREATE_VCPU failed")?;
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .context("KVM_GET_SUPPORTED_CPUID failed")?;
        vcpu.set_cpuid2(&cpuid).context("KVM_SET_CPUID2 failed")?;
        super::vcpu::wire_lapic(&vcpu)?;
        Ok(vcpu)
    }
}
