//! A paravirtual clock for engines without KVM (`--accel bt`), speaking the part of KVM's
//! paravirtual ABI that carries time: `MSR_KVM_SYSTEM_TIME_NEW` and `MSR_KVM_WALL_CLOCK_NEW`
//! (Linux's `Documentation/virt/kvm/x86/msr.rst`), advertised by the hypervisor leaves in
//! `cpuid.rs` as KVM_FEATURE_CLOCKSOURCE2 with the stable-TSC bit.
//!
//! Why: a kernel needs the TSC's rate. Intel hosts state it in CPUID 15H, but Linux reads that
//! leaf only on Intel; on AMD it calibrates the TSC against a spinning PIT loop, which fails
//! under translation (one slow iteration in 50 ms voids the measurement) and leaves the kernel
//! on jiffies with the TSC marked unstable. With this clock the kernel takes the rate, boot
//! time and wall time from one structure hbt fills once: the guest's TSC is the host's
//! invariant TSC, so the structure never needs an update.
//!
//! The guest structure (`pvclock_vcpu_time_info`, 32 bytes): version, pad, tsc_timestamp,
//! system_time (ns), tsc_to_system_mul, tsc_shift, flags. The guest computes
//! `system_time + ((tsc - tsc_timestamp) << shift) * mul >> 32`.

use std::time::{SystemTime, UNIX_EPOCH};

pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// `flags`: the TSC is the same on every vCPU and never goes back.
const PVCLOCK_TSC_STABLE_BIT: u8 = 1 << 0;
const NSEC_PER_SEC: u64 = 1_000_000_000;

/// Guest memory the clock writes its structures into (guest-physical; false = not RAM).
pub trait PhysWrite {
    fn write_phys(&mut self, gpa: u64, bytes: &[u8]) -> bool;
}

/// The TSC-to-nanoseconds scale: `ns = ((tsc << shift) * mul) >> 32` (shift may be negative).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TscScale {
    pub mul: u32,
    pub shift: i8,
}

impl TscScale {
    /// The scale for a TSC of `tsc_khz`: the shift that puts the shifted rate in (1, 2] GHz,
    /// so `mul` (in [2^31, 2^32)) keeps the most precision.
    pub fn for_khz(tsc_khz: u64) -> TscScale {
        let hz = tsc_khz.clamp(1, 1 << 40) as u128 * 1000;
        let scaled = |shift: i8| if shift >= 0 { hz << shift } else { hz >> -shift };
        let mut shift: i8 = 0;
        while scaled(shift) > 2 * NSEC_PER_SEC as u128 {
            shift -= 1;
        }
        while scaled(shift) <= NSEC_PER_SEC as u128 {
            shift += 1;
        }
        let mul = ((NSEC_PER_SEC as u128) << 32) / scaled(shift);
        TscScale { mul: mul as u32, shift }
    }

    /// Nanoseconds for `ticks` TSC ticks, as the guest computes them.
    pub fn ns(self, ticks: u64) -> u64 {
        let t = if self.shift >= 0 {
            ticks << self.shift
        } else {
            ticks >> -self.shift
        };
        ((t as u128 * self.mul as u128) >> 32) as u64
    }

    /// The TSC rate a guest derives from the scale (Linux's `pvclock_tsc_khz`).
    #[cfg(test)]
    pub fn khz(self) -> u64 {
        let khz = (1_000_000u64 << 32) / self.mul.max(1) as u64;
        if self.shift < 0 {
            khz << -self.shift
        } else {
            khz >> self.shift
        }
    }
}

/// The clock's state: when the guest's time began, the scale, and the MSR values.
pub struct PvClock {
    boot_tsc: u64,
    scale: TscScale,
    system_time_msr: u64,
    wall_clock_msr: u64,
}

impl PvClock {
    /// A clock whose guest time 0 is TSC value `boot_tsc`, for a TSC of `tsc_khz`.
    pub fn new(boot_tsc: u64, tsc_khz: u64) -> PvClock {
        PvClock {
            boot_tsc,
            scale: TscScale::for_khz(tsc_khz),
            system_time_msr: 0,
            wall_clock_msr: 0,
        }
    }

    /// Guest nanoseconds since its time began, at TSC value `tsc`.
    fn system_time(&self, tsc: u64) -> u64 {
        self.scale.ns(tsc.wrapping_sub(self.boot_tsc))
    }

    pub fn rdmsr(&self, index: u32) -> Option<u64> {
        match index {
            MSR_KVM_SYSTEM_TIME_NEW => Some(self.system_time_msr),
            MSR_KVM_WALL_CLOCK_NEW => Some(self.wall_clock_msr),
            _ => None,
        }
    }

    /// A write of one of the clock's MSRs at TSC value `tsc`; None for other MSRs. A structure
    /// address outside guest RAM is accepted and ignored, as KVM does.
    pub fn wrmsr(&mut self, index: u32, value: u64, tsc: u64, mem: &mut dyn PhysWrite) -> Option<()> {
        match index {
            MSR_KVM_SYSTEM_TIME_NEW => {
                self.system_time_msr = value;
                if value & 1 != 0 {
                    mem.write_phys(value & !1, &self.time_info(tsc));
                }
            }
            MSR_KVM_WALL_CLOCK_NEW => {
                self.wall_clock_msr = value;
                mem.write_phys(value, &self.wall_clock(tsc, SystemTime::now()));
            }
            _ => return None,
        }
        Some(())
    }

    /// `pvclock_vcpu_time_info` for TSC value `tsc` (version 0: even, complete).
    fn time_info(&self, tsc: u64) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[8..16].copy_from_slice(&tsc.to_le_bytes());
        b[16..24].copy_from_slice(&self.system_time(tsc).to_le_bytes());
        b[24..28].copy_from_slice(&self.scale.mul.to_le_bytes());
        b[28] = self.scale.shift as u8;
        b[29] = PVCLOCK_TSC_STABLE_BIT;
        b
    }

    /// `pvclock_wall_clock`: the wall time at guest time 0 (version, seconds, nanoseconds).
    fn wall_clock(&self, tsc: u64, now: SystemTime) -> [u8; 12] {
        let now_ns = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let at_boot = now_ns.saturating_sub(self.system_time(tsc));
        let mut b = [0u8; 12];
        b[4..8].copy_from_slice(&((at_boot / NSEC_PER_SEC) as u32).to_le_bytes());
        b[8..12].copy_from_slice(&((at_boot % NSEC_PER_SEC) as u32).to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Ram(Vec<u8>);
    impl PhysWrite for Ram {
        fn write_phys(&mut self, gpa: u64, bytes: &[u8]) -> bool {
            let Some(dst) = self.0.get_mut(gpa as usize..gpa as usize + bytes.len()) else {
                return false;
            };
            dst.copy_from_slice(bytes);
            true
        }
    }

    #[test]
    fn the_scale_converts_ticks_to_nanoseconds_and_back_to_the_rate() {
        for khz in [1_000u64, 800_000, 999_999, 1_000_001, 2_600_000, 3_700_000, 5_000_000] {
            let s = TscScale::for_khz(khz);
            // One second of ticks is one second, within 1 ppm.
            let ns = s.ns(khz * 1000);
            assert!(ns.abs_diff(NSEC_PER_SEC) <= 1000, "{khz} kHz: {s:?} gives {ns} ns");
            assert!(s.khz().abs_diff(khz) <= 1, "{khz} kHz: {s:?} reads back {}", s.khz());
        }
    }

    #[test]
    fn enabling_the_system_time_fills_the_structure() {
        let mut clock = PvClock::new(1_000, 2_000_000);
        let mut ram = Ram(vec![0xff; 4096]);
        // 2 GHz: 2e9 ticks after boot is 1 s of guest time.
        assert_eq!(
            clock.wrmsr(MSR_KVM_SYSTEM_TIME_NEW, 0x100 | 1, 2_000_001_000, &mut ram),
            Some(())
        );
        let info = &ram.0[0x100..0x120];
        assert_eq!(u32::from_le_bytes(info[0..4].try_into().unwrap()), 0, "even version");
        assert_eq!(u64::from_le_bytes(info[8..16].try_into().unwrap()), 2_000_001_000);
        let st = u64::from_le_bytes(info[16..24].try_into().unwrap());
        assert!(st.abs_diff(NSEC_PER_SEC) < 10, "{st}");
        assert_eq!(info[29], PVCLOCK_TSC_STABLE_BIT);
        assert_eq!(clock.rdmsr(MSR_KVM_SYSTEM_TIME_NEW), Some(0x101));
        // Disabled: nothing written. Outside RAM: accepted, nothing written.
        let mut untouched = Ram(vec![0xff; 4096]);
        clock.wrmsr(MSR_KVM_SYSTEM_TIME_NEW, 0x100, 5, &mut untouched).unwrap();
        clock
            .wrmsr(MSR_KVM_SYSTEM_TIME_NEW, (1 << 40) | 1, 5, &mut untouched)
            .unwrap();
        assert!(untouched.0.iter().all(|&b| b == 0xff));
        assert_eq!(clock.wrmsr(0x10, 0, 0, &mut untouched), None);
    }

    #[test]
    fn the_wall_clock_is_the_time_at_boot() {
        let clock = PvClock::new(0, 1_000_000);
        let now = UNIX_EPOCH + std::time::Duration::new(1_800_000_000, 500_000_000);
        // 1 GHz, 3e9 ticks: booted 3 s before `now`.
        let w = clock.wall_clock(3_000_000_000, now);
        assert_eq!(u32::from_le_bytes(w[4..8].try_into().unwrap()), 1_799_999_997);
        let nsec = u32::from_le_bytes(w[8..12].try_into().unwrap());
        assert!(nsec.abs_diff(500_000_000) < 10, "{nsec}");
    }
}
