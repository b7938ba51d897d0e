//! KVM state: the VM (memory slots, in-kernel PIC/IOAPIC/LAPIC and PIT), its vCPU, and the
//! conversion of the translator's CPU state to and from KVM's (`transfer.rs`).

pub mod error;
pub mod transfer;
pub mod vcpu;
pub mod vm;
