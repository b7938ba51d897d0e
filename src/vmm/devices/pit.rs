//! The 8254 programmable interval timer (ports 0x40–0x43) and the PC's port 0x61 (channel 2
//! gate, speaker, OUT2, refresh toggle), for engines without KVM's in-kernel PIT (`--accel bt`).
//!
//! Time is the host's monotonic clock at the PIT's 1.193182 MHz. Modelled: the control word
//! (channel, access mode lobyte/hibyte/both, modes 0–5, the counter-latch and read-back
//! commands), counts read back as they fall, the gate of channel 2, and channel 0's output
//! driving IRQ 0: once at terminal count in mode 0, every period in modes 2 and 3. The model
//! is pure: `chipset.rs` puts its ports on the bus, and its timer thread sleeps until
//! [`Pit::next_deadline`] and pulses IRQ 0 then, so the vCPU thread never polls the clock.
//!
//! Ticks are reinjected, as KVM's in-kernel PIT does by default: a period that ends while the
//! previous edge is still latched (the guest had interrupts off, or hbt was busy translating)
//! is owed, and delivered as soon as the guest acknowledges the one before. A kernel that
//! counts ticks for time (jiffies, and Linux's clocksource watchdog on them) would otherwise
//! fall behind the TSC and declare it unstable.

use std::time::{Duration, Instant};

pub const PORT: u64 = 0x40;
pub const PORT_61: u64 = 0x61;
/// Input clock, Hz.
const HZ: u64 = 1_193_182;
/// Most ticks owed before older ones are dropped (a guest that keeps interrupts off for
/// seconds gets at most this many back).
pub const MAX_OWED: u64 = 1000;

#[derive(Clone, Copy, Default)]
struct Channel {
    mode: u8,
    /// 1: low byte, 2: high byte, 3: low then high.
    access: u8,
    reload: u16,
    /// When the count was loaded (counting starts then).
    loaded: Option<Instant>,
    /// Next byte of a two-byte write is the high one.
    write_high: bool,
    /// Next byte of a two-byte read is the high one.
    read_high: bool,
    latched: Option<u16>,
    /// Channel 0: periods already signalled on IRQ 0.
    fired: u64,
}

impl Channel {
    fn period(&self) -> u64 {
        match self.reload {
            0 => 0x10000,
            n => n as u64,
        }
    }

    fn ticks(&self, now: Instant) -> Option<u64> {
        let loaded = self.loaded?;
        let ns = now.saturating_duration_since(loaded).as_nanos() as u64;
        Some(ns / 1_000_000_000 * HZ + (ns % 1_000_000_000) * HZ / 1_000_000_000)
    }

    /// The count as a read would see it now.
    fn count(&self, now: Instant) -> u16 {
        let Some(t) = self.ticks(now) else {
            return self.reload;
        };
        let period = self.period();
        match self.mode {
            // One-shot modes count down once and then wrap (as the hardware's counter does).
            0 | 1 | 4 | 5 => (period.wrapping_sub(t) & 0xffff) as u16,
            // Mode 3 counts down by two, twice per period.
            3 => {
                let half = (period / 2).max(1);
                ((half - (t % half)) * 2) as u16
            }
            _ => (period - (t % period)) as u16,
        }
    }

    /// OUT (for channel 2's bit in port 0x61).
    fn output(&self, now: Instant) -> bool {
        let Some(t) = self.ticks(now) else {
            return false;
        };
        let period = self.period();
        match self.mode {
            0 | 1 => t >= period,
            3 => (t % period) < period / 2,
            _ => t % period != period - 1,
        }
    }

    /// IRQ 0 periods completed by `now`.
    fn periods(&self, now: Instant) -> u64 {
        let Some(t) = self.ticks(now) else { return 0 };
        match self.mode {
            0 | 1 | 4 | 5 => (t >= self.period()) as u64,
            _ => t / self.period(),
        }
    }

    fn deadline(&self) -> Option<Instant> {
        let loaded = self.loaded?;
        let periods = match self.mode {
            0 | 1 | 4 | 5 if self.fired > 0 => return None,
            0 | 1 | 4 | 5 => 1,
            _ => self.fired + 1,
        };
        let ticks = periods * self.period();
        Some(loaded + Duration::from_nanos(ticks * 1_000_000_000 / HZ + 1))
    }
}

/// The three channels and the port 0x61 latch.
#[derive(Default)]
pub struct Pit {
    channels: [Channel; 3],
    port61: u8,
    refresh: bool,
}

impl Pit {
    /// How many IRQ 0 periods channel 0 completed since the last poll.
    pub fn poll(&mut self, now: Instant) -> u64 {
        let c = &mut self.channels[0];
        let periods = c.periods(now);
        let new = periods.saturating_sub(c.fired);
        c.fired = c.fired.max(periods);
        new
    }

    /// When channel 0 next raises IRQ 0.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.channels[0].deadline()
    }

    /// A write to port 0x40 + `port` (0–3).
    pub fn write(&mut self, port: u64, v: u8, now: Instant) {
        if port == 3 {
            let ch = (v >> 6) as usize;
            if ch == 3 {
                // Read-back: latch the counts of the selected channels (status is not modelled).
                for i in 0..3 {
                    if v & (2 << i) != 0 && v & 0x20 == 0 {
                        self.channels[i].latched = Some(self.channels[i].count(now));
                    }
                }
                return;
            }
            let access = (v >> 4) & 3;
            let c = &mut self.channels[ch];
            if access == 0 {
                c.latched = Some(c.count(now));
                return;
            }
            *c = Channel {
                mode: (v >> 1) & 7,
                access,
                ..Channel::default()
            };
            if c.mode > 5 {
                c.mode -= 4; // 6 and 7 alias 2 and 3
            }
            return;
        }
        let c = &mut self.channels[port as usize];
        match c.access {
            1 => c.reload = (c.reload & 0xff00) | v as u16,
            2 => c.reload = (c.reload & 0x00ff) | (v as u16) << 8,
            _ => {
                if c.write_high {
                    c.reload = (c.reload & 0x00ff) | (v as u16) << 8;
                } else {
                    c.reload = (c.reload & 0xff00) | v as u16;
                }
                c.write_high = !c.write_high;
                if c.write_high {
                    return; // the count starts once both bytes are written
                }
            }
        }
        // Channel 2 counts only while its gate (port 0x61 bit 0) is high.
        if port != 2 || self.port61 & 1 != 0 {
            c.loaded = Some(now);
            c.fired = 0;
        }
    }

    /// A read of port 0x40 + `port` (0–3).
    pub fn read(&mut self, port: u64, now: Instant) -> u8 {
        if port == 3 {
            return 0xff;
        }
        let c = &mut self.channels[port as usize];
        let value = c.latched.unwrap_or_else(|| c.count(now));
        let byte = match c.access {
            1 => value as u8,
            2 => (value >> 8) as u8,
            _ => {
                let b = if c.read_high { (value >> 8) as u8 } else { value as u8 };
                c.read_high = !c.read_high;
                if c.read_high {
                    return b;
                }
                b
            }
        };
        c.latched = None;
        byte
    }

    pub fn read_61(&mut self, now: Instant) -> u8 {
        self.refresh = !self.refresh;
        let out2 = self.channels[2].output(now);
        (self.port61 & 0x0f) | (self.refresh as u8) << 4 | (out2 as u8) << 5
    }

    pub fn write_61(&mut self, v: u8, now: Instant) {
        let gate_rises = v & 1 != 0 && self.port61 & 1 == 0;
        self.port61 = v & 0x0f;
        if gate_rises {
            let c = &mut self.channels[2];
            c.loaded = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periodic_channel_0_and_counts() {
        let mut p = Pit::default();
        let t0 = Instant::now();
        p.write(3, 0x34, t0); // channel 0, lo/hi, mode 2
        p.write(0, (1193 & 0xff) as u8, t0);
        p.write(0, (1193 >> 8) as u8, t0);
        assert_eq!(p.poll(t0), 0);
        let d = p.next_deadline().unwrap();
        assert!(d > t0 && d - t0 < Duration::from_micros(1100), "≈1 ms period");
        assert_eq!(p.poll(t0 + Duration::from_micros(1001)), 1);
        assert_eq!(p.poll(t0 + Duration::from_micros(1500)), 0);
        assert_eq!(
            p.poll(t0 + Duration::from_micros(5100)),
            4,
            "late: every period is counted, for the ticker to reinject"
        );
        // Latch and read the count: it falls from 1193.
        p.write(3, 0x00, t0 + Duration::from_micros(500));
        let lo = p.read(0, t0) as u16;
        let hi = p.read(0, t0) as u16;
        let count = lo | hi << 8;
        assert!((590..=600).contains(&count), "count {count} after 500 µs");
    }

    #[test]
    fn channel_2_counts_while_gated_and_shows_out2() {
        let mut p = Pit::default();
        let t0 = Instant::now();
        p.write_61(0x01, t0);
        p.write(3, 0xb0, t0); // channel 2, lo/hi, mode 0
        p.write(2, 0xff, t0);
        p.write(2, 0xff, t0);
        assert_eq!(
            p.read_61(t0 + Duration::from_millis(1)) & 0x20,
            0,
            "OUT2 low while counting"
        );
        assert_ne!(
            p.read_61(t0 + Duration::from_millis(60)) & 0x20,
            0,
            "OUT2 high at terminal count"
        );
    }
}
