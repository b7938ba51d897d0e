//! The PC's interrupt and timer chips as one unit, for engines without KVM's in-kernel ones:
//! the 8259 pair (`pic.rs`), the I/O APIC (`ioapic.rs`), the CPU's local APIC (`lapic.rs`) and
//! the 8254 PIT (`pit.rs`), wired as on a PC:
//!
//! ```text
//!  ISA IRQ n ──┬─▶ 8259 input n ──INTR──▶ LAPIC LINT0 (ExtINT) ──┐
//!              └─▶ I/O APIC pin n (IRQ 0: pin 2) ──message──▶ LAPIC IRR ──┴─▶ CPU
//!  PIT channel 0 ─▶ IRQ 0        LAPIC timer / self-IPI ─▶ LAPIC IRR
//! ```
//!
//! One lock covers all four chips, so a routing decision never sees half an update. The CPU's
//! INTR line is mirrored in an atomic that the engine reads at every block boundary without
//! taking the lock. Other threads reach the chips too: the serial port's input thread raises
//! IRQ 4, and the timer thread ([`Chipset::run_timers`]) sleeps until the PIT's or the local
//! APIC timer's next deadline, fires it, and kicks the vCPU out of translated code when that
//! left an interrupt pending. A halted vCPU sleeps in [`Chipset::wait`] until INTR rises.
//!
//! Where the two sources compete, the 8259's ExtINT is taken before the local APIC's IRR, as
//! KVM does (`kvm_cpu_get_interrupt`), so guests see the same order under either engine.

use super::ioapic::{self, IoApic, Message};
use super::lapic::{self, LocalApic, WriteEffect};
use super::pic::{self, Pic};
use super::pit::{self, Pit};
use super::{Action, Bus, Device};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The I/O APIC pin of ISA IRQ `irq`: identity, except the timer's IRQ 0 on pin 2 (the
/// interrupt source override every PC's MADT carries; `acpi.rs` writes it).
pub fn isa_irq_to_pin(irq: u8) -> usize {
    if irq == 0 {
        2
    } else {
        irq as usize
    }
}

/// The four chips, as one lock holds them.
pub struct Chips {
    pub pic: Pic,
    pub ioapic: IoApic,
    pub lapic: LocalApic,
    pub pit: Pit,
    /// PIT periods that ended while the previous tick was still latched (reinjected later).
    owed_ticks: u64,
    /// When the timer thread will look at the deadlines next.
    wake_plan: WakePlan,
}

/// The longest the timer thread sleeps: how soon it notices `done` without being woken.
const IDLE: Duration = Duration::from_millis(50);

/// When the timer thread sleeps until, and whether a deadline that moved must wake it sooner.
///
/// Waking it costs the thread that moved the deadline a futex wake, and often a reschedule —
/// and that thread is the vCPU, in the middle of the guest's timer handler: Linux re-arms its
/// TSC-deadline timer from every tick, so each tick paid it (≈10–20 µs of the ≈30–45 µs a
/// translated tick took under `--accel hybrid`, medians on an AMD EPYC). So the thread, finding no
/// deadline after firing one, sleeps only until three quarters of the last interval between
/// fires: a guest that re-arms about as far ahead as before moves the deadline past that
/// instant, and a deadline at or after the instant the thread will wake anyway needs no
/// wake-up (the thread sleeps on to it then).
#[derive(Debug, Default)]
struct WakePlan {
    /// The thread sleeps until then at the latest; `None` while it is awake (it looks at the
    /// deadlines again before it sleeps).
    asleep_until: Option<Instant>,
    last_fire: Option<Instant>,
    interval: Option<Duration>,
}

impl WakePlan {
    /// The thread wakes (or starts) and will look at the deadlines before sleeping again.
    fn woke(&mut self) {
        self.asleep_until = None;
    }

    /// A timer fired at `now`.
    fn fired(&mut self, now: Instant) {
        if let Some(last) = self.last_fire {
            self.interval = Some(now.saturating_duration_since(last));
        }
        self.last_fire = Some(now);
    }

    /// The thread goes to sleep at `now`, the next deadline being `deadline`: for how long.
    fn sleep(&mut self, now: Instant, deadline: Option<Instant>) -> Duration {
        let wait = match deadline {
            Some(d) => d.saturating_duration_since(now).min(IDLE),
            None => self.interval.map_or(IDLE, |i| (i * 3 / 4).min(IDLE)),
        };
        self.asleep_until = Some(now + wait);
        wait
    }

    /// The next deadline moved to `deadline`: whether the sleeping thread must wake for it.
    fn must_wake(&self, deadline: Option<Instant>) -> bool {
        matches!((deadline, self.asleep_until), (Some(d), Some(until)) if d < until)
    }
}

impl Chips {
    fn new(tsc_khz: u64) -> Self {
        Chips {
            pic: Pic::default(),
            ioapic: IoApic::default(),
            lapic: LocalApic::new(tsc_khz),
            pit: Pit::default(),
            owed_ticks: 0,
            wake_plan: WakePlan::default(),
        }
    }

    /// ISA IRQ `irq` (0–15) to `level`, on the 8259 and the I/O APIC both.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        self.pic.set_irq(irq, level);
        if let Some(m) = self.ioapic.set_pin(isa_irq_to_pin(irq), level) {
            self.deliver(m);
        }
    }

    /// A rising and falling edge (a timer tick).
    pub fn pulse(&mut self, irq: u8) {
        self.set_irq(irq, true);
        self.set_irq(irq, false);
    }

    /// An I/O APIC message reaches the local APIC if it is addressed to it.
    fn deliver(&mut self, m: Message) {
        match m.mode {
            0 | 1 if self.lapic.matches(m.dest, m.logical) => self.lapic.accept(m.vector, m.level),
            0 | 1 => {}
            _ => self.lapic.unsupported += 1,
        }
    }

    /// Whether an edge on ISA IRQ `irq` is latched and not yet taken (another edge now would
    /// merge with it): in the 8259's IRR, or in the local APIC's IRR through the I/O APIC.
    fn isa_irq_latched(&self, irq: u8) -> bool {
        self.pic.requested(irq)
            || self
                .ioapic
                .routed_vector(isa_irq_to_pin(irq))
                .is_some_and(|v| self.lapic.requested(v))
    }

    fn extint_pending(&self) -> bool {
        self.lapic.accepts_pic() && self.pic.interrupt_pending()
    }

    /// The CPU's INTR: an interrupt is waiting for it.
    pub fn pending(&self) -> bool {
        self.extint_pending() || self.lapic.deliverable().is_some()
    }

    /// INTA: the vector the CPU takes (None if the interrupt went away).
    pub fn acknowledge(&mut self) -> Option<u8> {
        if self.extint_pending() || !self.lapic.hardware_enabled() {
            self.pic.acknowledge()
        } else {
            self.lapic.acknowledge()
        }
    }

    fn lapic_write(&mut self, offset: u64, data: &[u8], now: Instant) {
        if let WriteEffect::LevelEoi(v) = self.lapic.mmio_write(offset, data, now) {
            for m in self.ioapic.eoi(v) {
                self.deliver(m);
            }
        }
    }

    fn ioapic_write(&mut self, offset: u64, data: &[u8]) {
        if let Some(m) = self.ioapic.mmio_write(offset, data) {
            self.deliver(m);
        }
    }

    /// When a timer next needs the timer thread.
    fn next_deadline(&self) -> Option<Instant> {
        match (self.pit.next_deadline(), self.lapic.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Fires what is due at `now`: PIT ticks (reinjecting owed ones one at a time) and the
    /// local APIC timer. Returns whether anything fired.
    fn fire_timers(&mut self, now: Instant) -> bool {
        self.owed_ticks = (self.owed_ticks + self.pit.poll(now)).min(pit::MAX_OWED);
        let mut fired = false;
        if self.owed_ticks > 0 && !self.isa_irq_latched(0) {
            self.pulse(0);
            self.owed_ticks -= 1;
            fired = true;
        }
        fired | self.lapic.poll_timer(now)
    }
}

/// The chips shared between the vCPU thread and the device threads.
pub struct Chipset {
    chips: Mutex<Chips>,
    /// The CPU's INTR line as of the last change (read without the lock).
    intr: AtomicBool,
    /// Wakes a halted vCPU.
    raised: Condvar,
    /// Wakes the timer thread: a deadline moved, a reinjected tick can go, or the run ends.
    timers: Condvar,
    /// PIT ticks are owed: the next acknowledge wakes the timer thread.
    owing: AtomicBool,
}

impl Chipset {
    /// The chips at reset; `tsc_khz` is the guest TSC's rate (for TSC-deadline timers).
    pub fn new(tsc_khz: u64) -> Self {
        Chipset {
            chips: Mutex::new(Chips::new(tsc_khz)),
            intr: AtomicBool::new(false),
            raised: Condvar::new(),
            timers: Condvar::new(),
            owing: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Chips> {
        self.chips.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the chips, then updates INTR (waking a halted vCPU when it is up) and wakes
    /// the timer thread when a deadline moved before the time it wakes anyway — only then, so
    /// the port reads of a calibration loop and the re-arming of a periodic tick cost no futex
    /// wake (see [`WakePlan`]).
    pub fn with<R>(&self, f: impl FnOnce(&mut Chips) -> R) -> R {
        let mut chips = self.lock();
        let deadline = chips.next_deadline();
        let r = f(&mut chips);
        let intr = chips.pending();
        self.intr.store(intr, Ordering::SeqCst);
        if intr {
            self.raised.notify_all();
        }
        let moved = chips.next_deadline();
        if moved != deadline && chips.wake_plan.must_wake(moved) {
            self.timers.notify_all();
        }
        r
    }

    pub fn set_irq(&self, irq: u8, level: bool) {
        self.with(|c| c.set_irq(irq, level));
    }

    /// The CPU's INTR line itself (translated code reads it: `Translator::set_interrupt_line`).
    pub fn interrupt_line(&self) -> &AtomicBool {
        &self.intr
    }

    /// The CPU's INTR line, as of the last change.
    pub fn interrupt_pending(&self) -> bool {
        self.intr.load(Ordering::SeqCst)
    }

    /// INTA. When PIT ticks are owed, the timer thread is woken to deliver the next.
    pub fn acknowledge(&self) -> Option<u8> {
        self.with(|c| {
            let v = c.acknowledge();
            if self.owing.load(Ordering::Relaxed) {
                self.timers.notify_all();
            }
            v
        })
    }

    /// Blocks until INTR is up, `wake()` says so, or `timeout` passes.
    pub fn wait(&self, timeout: Duration, wake: impl Fn() -> bool) {
        let chips = self.lock();
        if chips.pending() || wake() {
            return;
        }
        let _ = self.raised.wait_timeout(chips, timeout);
    }

    /// `rdmsr` of a local-APIC MSR (None: not one).
    pub fn rdmsr(&self, index: u32) -> Option<u64> {
        self.with(|c| c.lapic.rdmsr(index))
    }

    /// `wrmsr` of a local-APIC MSR (None: not one, or #GP). `tsc` is the guest's TSC now.
    pub fn wrmsr(&self, index: u32, value: u64, tsc: u64) -> Option<()> {
        self.with(|c| c.lapic.wrmsr(index, value, tsc, Instant::now()))
    }

    /// Interrupt requests the model could not carry out (NMI/INIT/SMI messages, an APIC
    /// base relocation), for `--stats`.
    pub fn unsupported_requests(&self) -> u64 {
        self.lock().lapic.unsupported
    }

    /// The timer thread's body: until `done`, fires the timers at their deadlines and calls
    /// `kick` (to stop the vCPU's translated code at its next block end) when that left an
    /// interrupt pending at the CPU.
    pub fn run_timers(&self, done: &AtomicBool, kick: impl Fn()) {
        let mut chips = self.lock();
        while !done.load(Ordering::SeqCst) {
            chips.wake_plan.woke();
            let now = Instant::now();
            let fired = chips.fire_timers(now);
            if fired {
                chips.wake_plan.fired(now);
            }
            let intr = chips.pending();
            self.intr.store(intr, Ordering::SeqCst);
            self.owing.store(chips.owed_ticks > 0, Ordering::SeqCst);
            if intr && fired {
                self.raised.notify_all();
                // Kick with the lock released: the vCPU leaves translated code (or KVM) at
                // once and acknowledges the interrupt, and found the lock still held here —
                // a futex sleep and a reschedule per tick (≈3% of a fork/exec-heavy guest's
                // time, perf on an Intel SPR host). Whatever changed meanwhile (a deadline
                // moved, an owed tick may go) is looked at again before sleeping.
                drop(chips);
                kick();
                chips = self.lock();
                continue;
            }
            let deadline = chips.next_deadline();
            let wait = chips.wake_plan.sleep(now, deadline);
            chips = self
                .timers
                .wait_timeout(chips, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Wakes the timer thread (to notice `done`).
    pub fn notify_timers(&self) {
        self.timers.notify_all();
    }
}

/// Puts the chips' ports and MMIO windows on the buses: the 8259 pair and its ELCR, the
/// 8254 with port 0x61, the I/O APIC and the local APIC.
pub fn insert(pio: &mut Bus, mmio: &mut Bus, chipset: &Arc<Chipset>) {
    let c = || Arc::clone(chipset);
    for (base, len, device) in [
        (
            pic::MASTER,
            2,
            Box::new(PicPorts { chipset: c(), chip: 0 }) as Box<dyn Device>,
        ),
        (pic::SLAVE, 2, Box::new(PicPorts { chipset: c(), chip: 1 })),
        (pic::ELCR, 2, Box::new(ElcrPorts(c()))),
        (pit::PORT, 4, Box::new(PitPorts(c()))),
        (pit::PORT_61, 1, Box::new(Port61(c()))),
    ] {
        pio.insert(base, len, device);
    }
    mmio.insert(ioapic::MMIO_BASE, ioapic::MMIO_SIZE, Box::new(IoApicMmio(c())));
    mmio.insert(lapic::MMIO_BASE, lapic::MMIO_SIZE, Box::new(LapicMmio(c())));
}

/// One 8259's two ports.
struct PicPorts {
    chipset: Arc<Chipset>,
    chip: usize,
}

impl Device for PicPorts {
    fn name(&self) -> &'static str {
        if self.chip == 0 {
            "pic-master"
        } else {
            "pic-slave"
        }
    }
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = self.chipset.with(|c| c.pic.read_port(self.chip, offset));
        data.fill(v);
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Action {
        let v = data.first().copied().unwrap_or(0);
        self.chipset.with(|c| c.pic.write_port(self.chip, offset, v));
        Action::Continue
    }
}

/// The edge/level control registers (0x4d0: master, 0x4d1: slave).
struct ElcrPorts(Arc<Chipset>);

impl Device for ElcrPorts {
    fn name(&self) -> &'static str {
        "elcr"
    }
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = self.0.with(|c| c.pic.elcr(offset as usize));
        data.fill(v);
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Action {
        let v = data.first().copied().unwrap_or(0);
        self.0.with(|c| c.pic.set_elcr(offset as usize, v));
        Action::Continue
    }
}

/// The PIT's ports (0x40–0x43).
struct PitPorts(Arc<Chipset>);

impl Device for PitPorts {
    fn name(&self) -> &'static str {
        "pit"
    }
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = self.0.with(|c| c.pit.read(offset, Instant::now()));
        data.fill(v);
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Action {
        let v = data.first().copied().unwrap_or(0);
        self.0.with(|c| c.pit.write(offset, v, Instant::now()));
        Action::Continue
    }
}

/// Port 0x61.
struct Port61(Arc<Chipset>);

impl Device for Port61 {
    fn name(&self) -> &'static str {
        "port61"
    }
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let v = self.0.with(|c| c.pit.read_61(Instant::now()));
        data.fill(v);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) -> Action {
        let v = data.first().copied().unwrap_or(0);
        self.0.with(|c| c.pit.write_61(v, Instant::now()));
        Action::Continue
    }
}

/// The I/O APIC's register window.
struct IoApicMmio(Arc<Chipset>);

impl Device for IoApicMmio {
    fn name(&self) -> &'static str {
        "ioapic"
    }
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.with(|c| c.ioapic.mmio_read(offset, data));
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Action {
        self.0.with(|c| c.ioapic_write(offset, data));
        Action::Continue
    }
}

/// The local APIC's register page.
struct LapicMmio(Arc<Chipset>);

impl Device for LapicMmio {
    fn name(&self) -> &'static str {
        "lapic"
    }
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.with(|c| c.lapic.mmio_read(offset, data, Instant::now()));
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Action {
        self.0.with(|c| c.lapic_write(offset, data, Instant::now()));
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 8259 initialization the test guests' runtime and Linux do: vectors 32/40.
    fn pic_initialized(c: &mut Chips) {
        for (chip, base) in [(0, 32), (1, 40)] {
            c.pic.write_port(chip, 0, 0x11);
            c.pic.write_port(chip, 1, base);
            c.pic.write_port(chip, 1, if chip == 0 { 4 } else { 2 });
            c.pic.write_port(chip, 1, 1);
        }
    }

    /// In APIC mode the OS masks the 8259 (whose IRQ 9 would otherwise arrive as ExtINT).
    fn mask_the_8259(c: &mut Chips) {
        pic_initialized(c);
        c.pic.write_port(0, 1, 0xff);
        c.pic.write_port(1, 1, 0xff);
    }

    fn lapic_write(c: &mut Chips, offset: u64, v: u32) {
        c.lapic_write(offset, &v.to_le_bytes(), Instant::now());
    }

    fn ioapic_program(c: &mut Chips, pin: u32, low: u32, high: u32) {
        for (reg, v) in [(0x11 + 2 * pin, high), (0x10 + 2 * pin, low)] {
            c.ioapic_write(0, &reg.to_le_bytes());
            c.ioapic_write(0x10, &v.to_le_bytes());
        }
    }

    #[test]
    fn at_reset_the_8259_reaches_the_cpu_through_lint0() {
        let mut c = Chips::new(1_000_000);
        pic_initialized(&mut c);
        c.pic.write_port(0, 1, 0xfe);
        c.pulse(0);
        assert!(c.pending());
        assert_eq!(c.acknowledge(), Some(32));
        assert!(!c.pending());
    }

    #[test]
    fn isa_irqs_route_through_the_ioapic_to_the_lapic() {
        let mut c = Chips::new(1_000_000);
        mask_the_8259(&mut c);
        lapic_write(&mut c, 0xf0, 0x1ff); // software enable
        ioapic_program(&mut c, 2, 0x30, 0); // IRQ 0 → pin 2, vector 0x30, physical dest 0
        ioapic_program(&mut c, 4, 0x24, 0);
        c.pulse(0);
        assert!(c.isa_irq_latched(0));
        c.set_irq(4, true);
        assert_eq!(c.acknowledge(), Some(0x30));
        assert!(!c.pending(), "0x24 is in a lower class than 0x30 in service");
        lapic_write(&mut c, 0xb0, 0); // EOI
        assert_eq!(c.acknowledge(), Some(0x24));
    }

    #[test]
    fn level_eoi_reaches_the_ioapic() {
        let mut c = Chips::new(1_000_000);
        mask_the_8259(&mut c);
        lapic_write(&mut c, 0xf0, 0x1ff);
        ioapic_program(&mut c, 9, (1 << 15) | 0x39, 0); // level
        c.set_irq(9, true);
        assert_eq!(c.acknowledge(), Some(0x39));
        lapic_write(&mut c, 0xb0, 0);
        assert!(c.pending(), "still asserted: the I/O APIC sends again after the EOI");
        assert_eq!(c.acknowledge(), Some(0x39));
        c.set_irq(9, false);
        lapic_write(&mut c, 0xb0, 0);
        assert!(!c.pending());
    }

    #[test]
    fn messages_for_another_apic_are_not_taken() {
        let mut c = Chips::new(1_000_000);
        mask_the_8259(&mut c);
        lapic_write(&mut c, 0xf0, 0x1ff);
        ioapic_program(&mut c, 5, 0x25, 3 << 24); // physical destination 3: nobody here
        c.set_irq(5, true);
        assert!(!c.pending());
    }

    #[test]
    fn a_deadline_re_armed_as_far_ahead_as_before_needs_no_wake_up() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut plan = WakePlan::default();
        plan.fired(t0);
        plan.fired(t0 + ms(4));
        // No deadline after the second fire: asleep until three quarters of the interval.
        assert_eq!(plan.sleep(t0 + ms(4), None), ms(3));
        assert!(!plan.must_wake(Some(t0 + ms(8))), "the guest's next tick, 4 ms on");
        assert!(
            !plan.must_wake(Some(t0 + ms(7))),
            "exactly when the thread wakes anyway"
        );
        assert!(plan.must_wake(Some(t0 + ms(5))), "a deadline before the planned wake");
        assert!(
            !plan.must_wake(None),
            "a deadline gone: the thread finds nothing and sleeps on"
        );
        // Awake, it looks at the deadlines before sleeping: nothing to wake.
        plan.woke();
        assert!(!plan.must_wake(Some(t0 + ms(5))));
        // Asleep to a deadline: an earlier one wakes it, a later one waits for it.
        assert_eq!(plan.sleep(t0 + ms(7), Some(t0 + ms(8))), ms(1));
        assert!(plan.must_wake(Some(t0 + ms(7) + Duration::from_micros(500))));
        assert!(!plan.must_wake(Some(t0 + ms(9))));
    }

    #[test]
    fn without_a_history_the_timer_thread_sleeps_idle_and_any_sooner_deadline_wakes_it() {
        let t0 = Instant::now();
        let mut plan = WakePlan::default();
        assert_eq!(plan.sleep(t0, None), IDLE);
        assert!(plan.must_wake(Some(t0 + Duration::from_millis(1))));
        // Intervals longer than IDLE are capped by it.
        plan.fired(t0);
        plan.fired(t0 + Duration::from_secs(10));
        assert_eq!(plan.sleep(t0 + Duration::from_secs(10), None), IDLE);
    }

    #[test]
    fn the_timer_thread_fires_the_lapic_timer_and_kicks() {
        let chipset = Arc::new(Chipset::new(1_000_000));
        chipset.with(|c| {
            lapic_write(c, 0xf0, 0x1ff);
            lapic_write(c, 0x3e0, 0xb); // divide by 1
            lapic_write(c, 0x320, 0x40); // one-shot, vector 0x40
            lapic_write(c, 0x380, 2_000_000); // 2 ms
        });
        let done = Arc::new(AtomicBool::new(false));
        let kicks = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let t = {
            let (chipset, done, kicks) = (Arc::clone(&chipset), Arc::clone(&done), Arc::clone(&kicks));
            std::thread::spawn(move || {
                chipset.run_timers(&done, || {
                    kicks.fetch_add(1, Ordering::SeqCst);
                })
            })
        };
        let give_up = Instant::now() + Duration::from_secs(5);
        while !chipset.interrupt_pending() && Instant::now() < give_up {
            chipset.wait(Duration::from_millis(100), || false);
        }
        assert!(chipset.interrupt_pending(), "the halted vCPU woke to the timer");
        assert_eq!(chipset.acknowledge(), Some(0x40));
        done.store(true, Ordering::SeqCst);
        chipset.notify_timers();
        t.join().unwrap();
        assert_eq!(kicks.load(Ordering::SeqCst), 1);
    }
}
