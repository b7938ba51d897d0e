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
