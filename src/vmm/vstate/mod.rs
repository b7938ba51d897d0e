//! KVM state: the VM (memory slots, in-kernel PIC/IOAPIC/LAPIC and PIT) and its vCPU.

pub mod vcpu;
pub mod vm;
