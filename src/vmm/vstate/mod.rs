//! KVM state: the VM (memory slots, in-kernel PIC/IOAPIC/LAPIC and PIT) and its vCPU.

pub mod error;
pub mod vcpu;
pub mod vm;
