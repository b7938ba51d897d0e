//! The device behind every I/O port of the harness's guest machine. At CPL0 `in` and `out` run
//! (KVM's emulator hands them to userspace as KVM_EXIT_IO; the translator to its platform), so
//! both engines must see the same device: reads answer a fixed function of port and size, and
//! writes are recorded in order, to be compared like memory.

use crate::platform::{Platform, PortOutcome};

/// One `out` the guest made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortWrite {
    pub port: u16,
    /// 1, 2 or 4 bytes.
    pub size: u8,
    pub value: u32,
}

/// What `in` of `size` bytes from `port` reads: different for every port and size, so a
/// wrong port or width shows in the destination register.
pub fn port_in(port: u16, size: u8) -> u32 {
    let size = size.clamp(1, 4);
    let v = 0x9e37_79b9u32.rotate_left(port as u32 % 31) ^ (port as u32).wrapping_mul(0x0101_0101) ^ size as u32;
    v & (u32::MAX >> (32 - 8 * size as u32))
}

/// The translator's platform in the harness: `inner` for CPUID, the TSC and MSRs, this file's
/// device for ports.
pub struct HarnessPlatform {
    pub inner: Box<dyn Platform>,
    pub writes: Vec<PortWrite>,
}

impl Platform for HarnessPlatform {
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        self.inner.cpuid(leaf, subleaf)
    }
    fn rdtsc(&mut self) -> u64 {
        self.inner.rdtsc()
    }
    fn tsc_aux(&mut self) -> u32 {
        self.inner.tsc_aux()
    }
    fn port_in(&mut self, port: u16, size: u8) -> u32 {
        port_in(port, size)
    }
    fn port_out(&mut self, port: u16, size: u8, value: u32) -> PortOutcome {
        self.writes.push(PortWrite { port, size, value });
        PortOutcome::Continue
    }
    fn mmio_read(&mut self, pa: u64, data: &mut [u8]) {
        self.inner.mmio_read(pa, data)
    }
    fn mmio_write(&mut self, pa: u64, data: &[u8]) -> PortOutcome {
        self.inner.mmio_write(pa, data)
    }
    fn rdmsr(&mut self, index: u32) -> Option<u64> {
        self.inner.rdmsr(index)
    }
    fn wrmsr(&mut self, index: u32, value: u64) -> Option<()> {
        self.inner.wrmsr(index, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fit_their_width_and_differ_by_port_and_size() {
        assert!(port_in(0x80, 1) <= 0xff);
        assert!(port_in(0x80, 2) <= 0xffff);
        assert_ne!(port_in(0x80, 4), port_in(0x81, 4));
        assert_ne!(port_in(0x80, 2), port_in(0x80, 4) & 0xffff);
    }
}
