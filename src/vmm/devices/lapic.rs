//! The local APIC of the guest's one CPU (xAPIC, MMIO at 0xfee0_0000), for engines without
//! KVM's in-kernel one (`--accel bt`, and the hybrid engine's kernel side).
//!
//! Modelled: ID, version, TPR/PPR, EOI, LDR/DFR, the spurious-vector register (software
//! enable), ISR/TMR/IRR, ESR, the ICR (fixed interrupts to self — there is no other CPU), the
//! LVT (timer, thermal, performance counter, LINT0, LINT1, error) and the timer in its three
//! modes: one-shot, periodic and TSC-deadline (IA32_TSC_DEADLINE), plus IA32_APIC_BASE.
//!
//! The reset state is KVM's (`kvm_lapic_reset`), because test guests must behave the same
//! under `--accel kvm`: version 0x14 with six LVT entries, every LVT masked except LINT0,
//! which is ExtINT (the 8259 reaches the CPU through it, "virtual wire"), and LINT1, which is
//! NMI (as `vstate/vcpu.rs` wires KVM's, and as firmware leaves a PC), SVR 0xff (software
//! disabled). Also KVM's: fixed interrupts arriving while software-disabled are dropped,
//! writes of other sizes than 4 bytes are ignored, the timer counts at 1 GHz (one count per
//! nanosecond before the divider) and a periodic timer's period is at least 200 µs.
//!
//! The model is pure: the caller passes the time (`Instant` for the bus clock, the TSC for the
//! deadline mode) and wires the results ([`crate::vmm::devices::chipset`]). Not modelled:
//! x2APIC mode (hidden in CPUID), relocating the APIC base, NMI/SMI/INIT/SIPI delivery,
//! thermal and performance-counter interrupts, focus processor checking.

use std::time::{Duration, Instant};

/// Where the xAPIC registers live (IA32_APIC_BASE's reset value).
pub const MMIO_BASE: u64 = 0xfee0_0000;
pub const MMIO_SIZE: u64 = 0x1000;
pub const IA32_APIC_BASE: u32 = 0x1b;
pub const IA32_TSC_DEADLINE: u32 = 0x6e0;

const BASE_BSP: u64 = 1 << 8;
const BASE_X2APIC: u64 = 1 << 10;
const BASE_ENABLE: u64 = 1 << 11;

// Register offsets.
const ID: u64 = 0x20;
const VERSION: u64 = 0x30;
const TPR: u64 = 0x80;
const APR: u64 = 0x90;
const PPR: u64 = 0xa0;
const EOI: u64 = 0xb0;
const LDR: u64 = 0xd0;
const DFR: u64 = 0xe0;
const SVR: u64 = 0xf0;
const ISR: u64 = 0x100;
const TMR: u64 = 0x180;
const IRR: u64 = 0x200;
const ESR: u64 = 0x280;
const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;
const LVT_TIMER: u64 = 0x320;
const LVT_ERROR: u64 = 0x370;
const TIMER_INITIAL: u64 = 0x380;
const TIMER_CURRENT: u64 = 0x390;
const TIMER_DIVIDE: u64 = 0x3e0;

/// Version 0x14 (integrated APIC), max LVT index 5 (six entries), as KVM reports.
const VERSION_VALUE: u32 = 0x14 | (5 << 16);
const SVR_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
const LVT_DELIVERY_MODE: u32 = 7 << 8;
const DELIVERY_EXTINT: u32 = 7 << 8;
/// The writable bits of each LVT entry, by index (timer, thermal, PMC, LINT0, LINT1, error).
const LVT_WRITABLE: [u32; 6] = [0x7_10ff, 0x1_07ff, 0x1_07ff, 0x1_a7ff, 0x1_a7ff, 0x1_00ff];
const LVT_COUNT: usize = 6;
const LINT0: usize = 3;
const LINT1: usize = 4;
const DELIVERY_NMI: u32 = 4 << 8;
/// ESR bits.
const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;
const ESR_ILLEGAL_REGISTER: u32 = 1 << 7;
/// KVM's lower bound on a periodic timer's period (`min_timer_period_us`).
const MIN_PERIOD: Duration = Duration::from_micros(200);

/// The timer mode (LVT timer bits 17–18).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerMode {
    OneShot,
    Periodic,
    TscDeadline,
}

/// The timer's running state.
#[derive(Clone, Copy, Debug, Default)]
struct Timer {
    initial: u32,
    /// The divide configuration register as written.
    divide: u32,
    /// When the current count was loaded (one-shot/periodic), None when stopped.
    started: Option<Instant>,
    /// Periods already signalled since `started`.
    fired: u64,
    /// TSC-deadline mode: the armed deadline (0: disarmed) and when it falls.
    deadline_tsc: u64,
    deadline_at: Option<Instant>,
}

impl Timer {
    fn divisor(&self) -> u64 {
        let code = (self.divide & 3) | ((self.divide >> 1) & 4);
        if code == 7 {
            1
        } else {
            2 << code
        }
    }

    /// One count of the current count register, at the 1 GHz bus clock after the divider.
    fn count_length(&self) -> Duration {
        Duration::from_nanos(self.divisor())
    }

    fn period(&self, mode: TimerMode) -> Duration {
        let p = self.count_length() * self.initial;
        if mode == TimerMode::Periodic {
            p.max(MIN_PERIOD)
        } else {
            p
        }
    }
}

/// One local APIC.
pub struct LocalApic {
    base: u64,
    id: u32,
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: [u32; 8],
    tmr: [u32; 8],
    irr: [u32; 8],
    /// Errors latched since the last ESR write, and what a read shows.
    esr_pending: u32,
    esr: u32,
    icr: u64,
    lvt: [u32; LVT_COUNT],
    timer: Timer,
    tsc_khz: u64,
    /// Interrupts the model could not deliver (NMI/INIT/SIPI requests, relocation): counted
    /// for `--stats`, never silently lost.
    pub unsupported: u64,
}

/// What a register write asks the rest of the chipset to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteEffect {
    None,
    /// An EOI for a level-triggered vector: the I/O APIC must clear its remote IRR.
    LevelEoi(u8),
}

fn bit(regs: &[u32; 8], v: u8) -> bool {
    regs[v as usize / 32] & (1 << (v % 32)) != 0
}
fn set(regs: &mut [u32; 8], v: u8, on: bool) {
    let m = 1 << (v % 32);
    if on {
        regs[v as usize / 32] |= m
    } else {
        regs[v as usize / 32] &= !m
    }
}
fn highest(regs: &[u32; 8]) -> Option<u8> {
    (0..8)
        .rev()
        .find(|&i| regs[i] != 0)
        .map(|i| (i * 32 + 31 - regs[i].leading_zeros() as usize) as u8)
}

impl LocalApic {
    /// The reset state (see the file comment); `tsc_khz` converts TSC deadlines to time.
    pub fn new(tsc_khz: u64) -> Self {
        let mut lvt = [LVT_MASKED; LVT_COUNT];
        lvt[LINT0] = DELIVERY_EXTINT;
        lvt[LINT1] = DELIVERY_NMI;
        LocalApic {
            base: MMIO_BASE | BASE_BSP | BASE_ENABLE,
            id: 0,
            tpr: 0,
            ldr: 0,
            dfr: 0xffff_ffff,
            svr: 0xff,
            isr: [0; 8],
            tmr: [0; 8],
            irr: [0; 8],
            esr_pending: 0,
            esr: 0,
            icr: 0,
            lvt,
            timer: Timer::default(),
            tsc_khz: tsc_khz.max(1),
            unsupported: 0,
        }
    }

    /// IA32_APIC_BASE has its enable bit (a hardware-disabled APIC is as good as absent: the
    /// 8259 reaches the CPU directly).
    pub fn hardware_enabled(&self) -> bool {
        self.base & BASE_ENABLE != 0
    }

    fn software_enabled(&self) -> bool {
        self.hardware_enabled() && self.svr & SVR_ENABLE != 0
    }

    /// The 8259's INTR reaches the CPU: through LINT0 programmed as ExtINT and unmasked, or
    /// past a hardware-disabled APIC (KVM's `kvm_apic_accept_pic_intr`).
    pub fn accepts_pic(&self) -> bool {
        let lint0 = self.lvt[LINT0];
        !self.hardware_enabled() || (lint0 & LVT_MASKED == 0 && lint0 & LVT_DELIVERY_MODE == DELIVERY_EXTINT)
    }

    /// Whether a message for `dest` (physical APIC ID, or logical with `logical`) is for
    /// this APIC.
    pub fn matches(&self, dest: u8, logical: bool) -> bool {
        if !logical {
            return dest == 0xff || dest as u32 == self.id >> 24;
        }
        let ldr = (self.ldr >> 24) as u8;
        if dest == 0xff {
            return true;
        }
        if self.dfr >> 28 == 0xf {
            dest & ldr != 0 // flat model
        } else {
            dest >> 4 == ldr >> 4 && dest & ldr & 0xf != 0 // cluster model
        }
    }

    /// An interrupt arrives (from the I/O APIC, the timer, or a self-IPI).
    pub fn accept(&mut self, vector: u8, level: bool) {
        if !self.software_enabled() {
            return;
        }
        if vector < 16 {
            self.esr_pending |= ESR_RECEIVE_ILLEGAL_VECTOR;
            return;
        }
        set(&mut self.irr, vector, true);
        set(&mut self.tmr, vector, level);
    }

    /// Whether `vector` waits in the IRR (an interrupt request not yet taken).
    pub fn requested(&self, vector: u8) -> bool {
        bit(&self.irr, vector)
    }

    fn ppr(&self) -> u32 {
        let isrv = highest(&self.isr).map_or(0, |v| v as u32);
        if (self.tpr & 0xf0) >= (isrv & 0xf0) {
            self.tpr & 0xff
        } else {
            isrv & 0xf0
        }
    }

    /// The vector the CPU would take now, if any (highest IRR above the processor priority).
    pub fn deliverable(&self) -> Option<u8> {
        if !self.hardware_enabled() {
            return None;
        }
        let v = highest(&self.irr)?;
        ((v as u32 & 0xf0) > (self.ppr() & 0xf0)).then_some(v)
    }

    /// INTA: the deliverable vector moves from IRR to ISR. With nothing deliverable the
    /// spurious vector is returned, as hardware does.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let Some(v) = self.deliverable() else {
            return self.software_enabled().then_some(self.svr as u8);
        };
        set(&mut self.irr, v, false);
        set(&mut self.isr, v, true);
        Some(v)
    }

    fn eoi(&mut self) -> WriteEffect {
        let Some(v) = highest(&self.isr) else {
            return WriteEffect::None;
        };
        set(&mut self.isr, v, false);
        if bit(&self.tmr, v) {
            set(&mut self.tmr, v, false);
            WriteEffect::LevelEoi(v)
        } else {
            WriteEffect::None
        }
    }

    pub fn timer_mode(&self) -> TimerMode {
        match (self.lvt[0] >> 17) & 3 {
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            _ => TimerMode::OneShot,
        }
    }

    fn current_count(&self, now: Instant) -> u32 {
        let t = &self.timer;
        let (Some(started), mode) = (t.started, self.timer_mode()) else {
            return 0;
        };
        if mode == TimerMode::TscDeadline || t.initial == 0 {
            return 0;
        }
        let elapsed = now.saturating_duration_since(started);
        let counts = (elapsed.as_nanos() / t.count_length().as_nanos()) as u64;
        match mode {
            TimerMode::Periodic => {
                let per = (t.period(mode).as_nanos() / t.count_length().as_nanos()).max(1) as u64;
                (t.initial as u64).saturating_sub(counts % per) as u32
            }
            _ => (t.initial as u64).saturating_sub(counts) as u32,
        }
    }

    /// When the timer next expires, if it is running.
    pub fn next_deadline(&self) -> Option<Instant> {
        let t = &self.timer;
        match self.timer_mode() {
            TimerMode::TscDeadline => t.deadline_at,
            mode => {
                let started = t.started?;
                let periods = match mode {
                    TimerMode::OneShot if t.fired > 0 => return None,
                    TimerMode::OneShot => 1,
                    _ => t.fired + 1,
                };
                Some(started + t.period(mode) * periods.min(u32::MAX as u64) as u32)
            }
        }
    }

    /// Expires the timer if its time has come (`now`): the timer interrupt is accepted unless
    /// its LVT entry is masked. Returns whether the timer expired.
    pub fn poll_timer(&mut self, now: Instant) -> bool {
        let Some(deadline) = self.next_deadline() else {
            return false;
        };
        if now < deadline {
            return false;
        }
        let mode = self.timer_mode();
        match mode {
            TimerMode::TscDeadline => {
                self.timer.deadline_tsc = 0;
                self.timer.deadline_at = None;
            }
            TimerMode::OneShot => self.timer.fired = 1,
            TimerMode::Periodic => {
                // Late by several periods: one interrupt (the IRR coalesces them anyway).
                let started = self.timer.started.unwrap_or(now);
                let period = self.timer.period(mode).as_nanos().max(1);
                self.timer.fired = (now.saturating_duration_since(started).as_nanos() / period) as u64;
            }
        }
        let lvt = self.lvt[0];
        if lvt & LVT_MASKED == 0 {
            self.accept(lvt as u8, false);
        }
        true
    }

    fn stop_timer(&mut self) {
        self.timer.started = None;
        self.timer.fired = 0;
        self.timer.initial = 0;
        self.timer.deadline_tsc = 0;
        self.timer.deadline_at = None;
    }

    /// A 32-bit register read at `offset` (16-byte aligned).
    fn read_register(&mut self, offset: u64, now: Instant) -> u32 {
        match offset {
            ID => self.id,
            VERSION => VERSION_VALUE,
            TPR => self.tpr,
            APR => 0,
            PPR => self.ppr(),
            LDR => self.ldr,
            DFR => self.dfr,
            SVR => self.svr,
            o if (ISR..ISR + 0x80).contains(&o) => self.isr[((o - ISR) / 16) as usize],
            o if (TMR..TMR + 0x80).contains(&o) => self.tmr[((o - TMR) / 16) as usize],
            o if (IRR..IRR + 0x80).contains(&o) => self.irr[((o - IRR) / 16) as usize],
            ESR => self.esr,
            ICR_LOW => self.icr as u32 & !(1 << 12), // delivery status: always idle
            ICR_HIGH => (self.icr >> 32) as u32,
            o if (LVT_TIMER..=LVT_ERROR).contains(&o) => self.lvt[((o - LVT_TIMER) / 16) as usize],
            TIMER_INITIAL => self.timer.initial,
            TIMER_CURRENT => self.current_count(now),
            TIMER_DIVIDE => self.timer.divide,
            _ => 0,
        }
    }

    /// A 32-bit register write at `offset` (16-byte aligned).
    fn write_register(&mut self, offset: u64, v: u32, now: Instant) -> WriteEffect {
        match offset {
            ID => self.id = v & 0xff00_0000,
            TPR => self.tpr = v & 0xff,
            EOI => return self.eoi(),
            LDR => self.ldr = v & 0xff00_0000,
            DFR => self.dfr = v | 0x0fff_ffff,
            SVR => {
                self.svr = v & 0x13ff;
                if v & SVR_ENABLE == 0 {
                    // Software-disabling masks every LVT entry (and keeps them masked).
                    self.lvt.iter_mut().for_each(|l| *l |= LVT_MASKED);
                }
            }
            ESR => {
                self.esr = std::mem::take(&mut self.esr_pending);
            }
            ICR_LOW => {
                self.icr = (self.icr & !0xffff_ffff) | v as u64;
                self.send_ipi();
            }
            ICR_HIGH => self.icr = (self.icr & 0xffff_ffff) | ((v as u64 & 0xff00_0000) << 32),
            o if (LVT_TIMER..=LVT_ERROR).contains(&o) => {
                let i = ((o - LVT_TIMER) / 16) as usize;
                let before = self.timer_mode();
                let mut value = v & LVT_WRITABLE[i];
                if !self.software_enabled() {
                    value |= LVT_MASKED;
                }
                self.lvt[i] = value;
                if i == 0 && self.timer_mode() != before {
                    self.stop_timer();
                }
            }
            TIMER_INITIAL => {
                if self.timer_mode() != TimerMode::TscDeadline {
                    self.timer.initial = v;
                    self.timer.fired = 0;
                    self.timer.started = (v != 0).then_some(now);
                }
            }
            TIMER_DIVIDE => self.timer.divide = v & 0xb,
            _ => self.esr_pending |= ESR_ILLEGAL_REGISTER,
        }
        WriteEffect::None
    }

    /// The ICR was written: deliver what it asks for. Only this CPU exists.
    fn send_ipi(&mut self) {
        let low = self.icr as u32;
        let vector = low as u8;
        let mode = (low >> 8) & 7;
        let dest = (self.icr >> 56) as u8;
        let to_self = match (low >> 18) & 3 {
            0 => self.matches(dest, low & (1 << 11) != 0),
            1 | 2 => true,
            _ => false, // all excluding self: nobody
        };
        if !to_self {
            return;
        }
        match mode {
            // Fixed and lowest-priority.
            0 | 1 if vector < 16 => self.esr_pending |= ESR_SEND_ILLEGAL_VECTOR,
            0 | 1 => self.accept(vector, false),
            _ => self.unsupported += 1,
        }
    }

    /// An MMIO read of `data.len()` bytes at `offset` in the APIC page.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8], now: Instant) {
        let reg = self.read_register(offset & !0xf, now).to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = reg.get((offset & 0xf) as usize + i).copied().unwrap_or(0);
        }
    }

    /// An MMIO write; only aligned 4-byte writes reach a register (KVM ignores others).
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], now: Instant) -> WriteEffect {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return WriteEffect::None;
        };
        if offset & 0xf != 0 {
            return WriteEffect::None;
        }
        self.write_register(offset, u32::from_le_bytes(bytes), now)
    }

    /// `rdmsr` of an APIC MSR (None: not one of its MSRs).
    pub fn rdmsr(&self, index: u32) -> Option<u64> {
        match index {
            IA32_APIC_BASE => Some(self.base),
            IA32_TSC_DEADLINE => Some(if self.timer_mode() == TimerMode::TscDeadline {
                self.timer.deadline_tsc
            } else {
                0
            }),
            _ => None,
        }
    }

    /// `wrmsr` of an APIC MSR: None for #GP (not its MSR, or a value hardware refuses).
    /// `tsc` is the guest's TSC now, `now` the same moment on the host clock.
    pub fn wrmsr(&mut self, index: u32, value: u64, tsc: u64, now: Instant) -> Option<()> {
        match index {
            IA32_APIC_BASE => {
                // x2APIC is not offered; reserved bits (above 52 bits of address) #GP.
                if value & BASE_X2APIC != 0 || value >> 52 != 0 || value & 0x2ff != 0 {
                    return None;
                }
                if value & !0xfff != MMIO_BASE {
                    self.unsupported += 1; // relocation: the registers stay at MMIO_BASE
                }
                let disabling = self.hardware_enabled() && value & BASE_ENABLE == 0;
                self.base = value | BASE_BSP;
                if disabling {
                    // A hardware disable resets the APIC's state (SDM 10.4.3); the base stays.
                    let base = self.base;
                    *self = LocalApic {
                        base,
                        unsupported: self.unsupported,
                        ..LocalApic::new(self.tsc_khz)
                    };
                }
                Some(())
            }
            IA32_TSC_DEADLINE => {
                if self.timer_mode() == TimerMode::TscDeadline {
                    self.timer.deadline_tsc = value;
                    self.timer.deadline_at = (value != 0).then(|| {
                        let ticks = value.saturating_sub(tsc);
                        let ns = (ticks as u128 * 1_000_000 / self.tsc_khz as u128).min(u64::MAX as u128);
                        now + Duration::from_nanos(ns as u64)
                    });
                }
                Some(())
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(a: &mut LocalApic, offset: u64, v: u32, now: Instant) -> WriteEffect {
        a.mmio_write(offset, &v.to_le_bytes(), now)
    }
    fn read(a: &mut LocalApic, offset: u64, now: Instant) -> u32 {
        let mut b = [0u8; 4];
        a.mmio_read(offset, &mut b, now);
        u32::from_le_bytes(b)
    }
    fn enabled() -> (LocalApic, Instant) {
        let mut a = LocalApic::new(1_000_000); // 1 GHz TSC
        let t = Instant::now();
        write(&mut a, SVR, 0x1ff, t);
        (a, t)
    }

    #[test]
    fn reset_state_is_kvm_s() {
        let mut a = LocalApic::new(1_000_000);
        let t = Instant::now();
        assert_eq!(read(&mut a, VERSION, t), 0x0005_0014);
        assert_eq!(read(&mut a, SVR, t), 0xff);
        assert_eq!(read(&mut a, 0x350, t), 0x700, "LINT0 ExtINT: virtual wire");
        assert_eq!(read(&mut a, LVT_TIMER, t), LVT_MASKED);
        assert!(a.accepts_pic());
        assert_eq!(a.rdmsr(IA32_APIC_BASE), Some(0xfee0_0900));
        a.accept(0x40, false);
        assert_eq!(a.deliverable(), None, "software-disabled: fixed interrupts are dropped");
    }

    #[test]
    fn priority_isr_and_eoi() {
        let (mut a, t) = enabled();
        a.accept(0x31, false);
        a.accept(0x52, true);
        assert_eq!(a.acknowledge(), Some(0x52));
        assert_eq!(read(&mut a, PPR, t), 0x50);
        assert_eq!(a.deliverable(), None, "0x31 is below the in-service class");
        assert_eq!(write(&mut a, EOI, 0, t), WriteEffect::LevelEoi(0x52));
        assert_eq!(a.acknowledge(), Some(0x31));
        assert_eq!(write(&mut a, EOI, 0, t), WriteEffect::None);
        // TPR holds back a class.
        write(&mut a, TPR, 0x40, t);
        a.accept(0x45, false);
        assert_eq!(a.deliverable(), None);
        write(&mut a, TPR, 0x30, t);
        assert_eq!(a.deliverable(), Some(0x45));
        a.accept(3, false);
        write(&mut a, ESR, 0, t);
        assert_eq!(read(&mut a, ESR, t), ESR_RECEIVE_ILLEGAL_VECTOR);
    }

    #[test]
    fn self_ipi() {
        let (mut a, t) = enabled();
        write(&mut a, ICR_LOW, (1 << 18) | 0x77, t); // shorthand self, fixed
        assert_eq!(a.deliverable(), Some(0x77));
        assert_eq!(read(&mut a, ICR_LOW, t) & (1 << 12), 0, "delivery status idle");
        write(&mut a, ICR_LOW, (3 << 18) | 0x78, t); // all but self: nobody
        a.acknowledge();
        assert_eq!(a.deliverable(), None);
    }

    #[test]
    fn one_shot_and_periodic_timer() {
        let (mut a, t) = enabled();
        write(&mut a, TIMER_DIVIDE, 0xb, t); // divide by 1: a count is 1 ns
        write(&mut a, LVT_TIMER, 0x40, t); // one-shot, vector 0x40
        write(&mut a, TIMER_INITIAL, 1_000_000, t); // 1 ms
        assert_eq!(a.next_deadline(), Some(t + Duration::from_millis(1)));
        let c = read(&mut a, TIMER_CURRENT, t + Duration::from_micros(250));
        assert_eq!(c, 750_000);
        assert!(!a.poll_timer(t + Duration::from_micros(999)));
        assert!(a.poll_timer(t + Duration::from_millis(1)));
        assert_eq!(a.next_deadline(), None, "one-shot fires once");
        assert_eq!(read(&mut a, TIMER_CURRENT, t + Duration::from_millis(2)), 0);
        assert_eq!(a.acknowledge(), Some(0x40));
        write(&mut a, EOI, 0, t);
        // Periodic, 0x50; 1 µs requested, 200 µs given (KVM's floor).
        write(&mut a, LVT_TIMER, (1 << 17) | 0x50, t);
        write(&mut a, TIMER_INITIAL, 1000, t);
        assert_eq!(a.next_deadline(), Some(t + MIN_PERIOD));
        assert!(a.poll_timer(t + MIN_PERIOD * 3));
        assert_eq!(a.next_deadline(), Some(t + MIN_PERIOD * 4));
        assert_eq!(a.acknowledge(), Some(0x50));
        // Masked: the timer runs on without interrupts.
        write(&mut a, LVT_TIMER, (1 << 17) | LVT_MASKED | 0x50, t);
        write(&mut a, TIMER_INITIAL, 1_000_000, t);
        assert!(a.poll_timer(t + Duration::from_millis(1)));
        assert_eq!(a.deliverable(), None);
    }

    #[test]
    fn tsc_deadline_timer() {
        let (mut a, t) = enabled();
        assert_eq!(a.wrmsr(IA32_TSC_DEADLINE, 5000, 0, t), Some(()));
        assert_eq!(a.rdmsr(IA32_TSC_DEADLINE), Some(0), "ignored outside deadline mode");
        write(&mut a, LVT_TIMER, (2 << 17) | 0xec, t);
        write(&mut a, TIMER_INITIAL, 1000, t);
        assert_eq!(
            a.next_deadline(),
            None,
            "the initial count means nothing in deadline mode"
        );
        a.wrmsr(IA32_TSC_DEADLINE, 1_000_000 + 2_000_000, 1_000_000, t); // 2 ms away at 1 GHz
        assert_eq!(a.next_deadline(), Some(t + Duration::from_millis(2)));
        assert_eq!(a.rdmsr(IA32_TSC_DEADLINE), Some(3_000_000));
        assert!(a.poll_timer(t + Duration::from_millis(2)));
        assert_eq!(a.rdmsr(IA32_TSC_DEADLINE), Some(0), "disarmed once it fired");
        assert_eq!(a.acknowledge(), Some(0xec));
        // A deadline in the past fires at once; 0 disarms.
        a.wrmsr(IA32_TSC_DEADLINE, 1, 1_000_000, t);
        assert!(a.poll_timer(t));
        a.wrmsr(IA32_TSC_DEADLINE, 9_000_000, 1_000_000, t);
        a.wrmsr(IA32_TSC_DEADLINE, 0, 1_000_000, t);
        assert_eq!(a.next_deadline(), None);
        // Leaving deadline mode stops it.
        a.wrmsr(IA32_TSC_DEADLINE, 9_000_000, 1_000_000, t);
        write(&mut a, LVT_TIMER, 0xec, t);
        assert_eq!(a.next_deadline(), None);
    }

    #[test]
    fn software_disable_masks_the_lvt_and_hardware_disable_passes_the_pic() {
        let (mut a, t) = enabled();
        write(&mut a, LVT_TIMER, 0x40, t);
        write(&mut a, SVR, 0xff, t);
        assert_ne!(read(&mut a, LVT_TIMER, t) & LVT_MASKED, 0);
        write(&mut a, LVT_TIMER, 0x40, t);
        assert_ne!(read(&mut a, LVT_TIMER, t) & LVT_MASKED, 0, "stays masked");
        assert!(!a.accepts_pic(), "LINT0 masked now");
        assert_eq!(a.wrmsr(IA32_APIC_BASE, MMIO_BASE, 0, t), Some(()));
        assert!(a.accepts_pic(), "hardware-disabled: the 8259 goes straight to the CPU");
        assert_eq!(
            a.wrmsr(IA32_APIC_BASE, MMIO_BASE | BASE_X2APIC | BASE_ENABLE, 0, t),
            None
        );
    }

    #[test]
    fn logical_destinations() {
        let (mut a, t) = enabled();
        write(&mut a, LDR, 1 << 24, t);
        assert!(a.matches(1, true) && a.matches(0xff, true) && !a.matches(2, true));
        write(&mut a, DFR, 0x0fff_ffff, t); // cluster model
        write(&mut a, LDR, 0x21 << 24, t);
        assert!(a.matches(0x23, true) && !a.matches(0x13, true));
        assert!(a.matches(0, false) && !a.matches(1, false));
    }
}
