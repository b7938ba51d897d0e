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

/// The host CPU's view, passed through.
#[derive(Default)]
pub struct HostPlatform;

impl Platform for HostPlatform {
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let r = std::arch::x86_64::__cpuid_count(leaf, subleaf);
        [r.eax, r.ebx, r.ecx, r.edx]
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
