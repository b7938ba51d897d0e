//! What the guest sees of the machine outside the CPU core: CPUID, the time-stamp counter and
//! (in system mode, later) ports, MSRs and interrupts. `hbt exec` and the harness use
//! [`HostPlatform`]; the VMM will supply its own.

pub trait Platform {
    /// CPUID leaf/subleaf as the guest should see it: `[eax, ebx, ecx, edx]`.
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4];
    /// The guest's time-stamp counter.
    fn rdtsc(&mut self) -> u64;
    /// IA32_TSC_AUX as `rdtscp` returns it in ECX.
    fn tsc_aux(&mut self) -> u32;

    // System mode (a kernel-mode guest, `hbt run --accel bt`). User-mode platforms keep these
    // defaults: a user-mode guest never reaches them (the instructions are #GP at CPL3).

    /// `in` of `size` bytes (1, 2 or 4) from `port`; an unclaimed port reads all ones.
    fn port_in(&mut self, _port: u16, size: u8) -> u32 {
        u32::MAX >> (32 - 8 * size as u32)
    }
    /// `out` of `size` bytes to `port`. `Stop` ends the run after the instruction (the debug-exit
    /// port, a reset, a closed console).
    fn port_out(&mut self, _port: u16, _size: u8, _value: u32) -> PortOutcome {
        PortOutcome::Continue
    }
    /// A guest-physical access outside RAM (the MMIO hole, or past the end of RAM) that reads
    /// `data.len()` bytes at `pa`; nothing there reads all ones, as on a PC bus.
    fn mmio_read(&mut self, _pa: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    /// A guest-physical write outside RAM; nothing there drops it. `Stop` as for `port_out`.
    fn mmio_write(&mut self, _pa: u64, _data: &[u8]) -> PortOutcome {
        PortOutcome::Continue
    }
    /// Platform MSRs (APIC base, TSC, TSC deadline…): the value, or None for #GP(0).
    fn rdmsr(&mut self, _index: u32) -> Option<u64> {
        None
    }
    fn wrmsr(&mut self, _index: u32, _value: u64) -> Option<()> {
        None
    }
    /// An external interrupt is waiting for the CPU (the interrupt controller's INTR line).
    fn interrupt_pending(&mut self) -> bool {
        false
    }
    /// The CPU takes the interrupt: its vector (None if it went away meanwhile).
    fn acknowledge_interrupt(&mut self) -> Option<u8> {
        None
    }
}

/// What a device write (port or MMIO) asks of the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortOutcome {
    Continue,
    /// End the run; [`crate::Exit::Stopped`] is returned with RIP after the instruction.
    Stop,
}

/// The host CPU's view, as a guest with every managed XSAVE component sees it: CPUID passes
/// through except that leaf 0DH describes the managed components only and XFD-armed features
/// (AMX) are hidden (`cpu::xsave::XsaveLayout::guest_cpuid`).
#[derive(Default)]
pub struct HostPlatform;

impl Platform for HostPlatform {
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let r = std::arch::x86_64::__cpuid_count(leaf, subleaf);
        let mut regs = [r.eax, r.ebx, r.ecx, r.edx];
        let layout = crate::cpu::xsave::XsaveLayout::host();
        layout.guest_cpuid(layout.managed(), leaf, subleaf, &mut regs);
        regs
    }
    fn rdtsc(&mut self) -> u64 {
        // SAFETY: rdtsc has no memory effects; it is allowed in user mode on Linux.
        unsafe { std::arch::x86_64::_rdtsc() }
    }
    fn tsc_aux(&mut self) -> u32 {
        let mut aux = 0u32;
        // SAFETY: rdtscp only writes `aux`.
        unsafe { std::arch::x86_64::__rdtscp(&mut aux) };
        aux
    }
}
