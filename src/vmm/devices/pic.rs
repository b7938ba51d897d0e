//! The 8259A programmable interrupt controller pair of a PC (master at 0x20, slave at 0xa0 on
//! the master's IRQ 2), for engines without KVM's in-kernel one (`--accel bt`).
//!
//! Modelled: the ICW1–ICW4 initialization sequence (vector base, cascade, auto-EOI), the mask
//! register (OCW1), non-specific and specific EOI and priority rotation (OCW2), IRR/ISR reads
//! (OCW3), fully nested priority with the slave cascaded on IRQ 2, edge-triggered inputs (a
//! line's rising edge latches its IRR bit, as an ISA bus's), the spurious IRQ 7 when an
//! interrupt vanishes before it is acknowledged, and the ELCR ports (0x4d0/0x4d1), which are
//! stored but do not change the triggering. The model is pure; `chipset.rs` shares it between
//! threads and puts its ports on the bus.

pub const MASTER: u64 = 0x20;
pub const SLAVE: u64 = 0xa0;
pub const ELCR: u64 = 0x4d0;

#[derive(Default)]
struct Chip {
    irr: u8,
    isr: u8,
    imr: u8,
    /// Input levels last seen (for edge detection).
    lines: u8,
    base: u8,
    /// 0: ready; 2..=4: expecting ICW2..ICW4.
    init_step: u8,
    icw4: bool,
    auto_eoi: bool,
    read_isr: bool,
    /// The lowest-priority IRQ is `priority_add - 1` (rotation).
    priority_add: u8,
    elcr: u8,
}

impl Chip {
    fn set_line(&mut self, irq: u8, level: bool) {
        let bit = 1 << irq;
        if level && self.lines & bit == 0 {
            self.irr |= bit;
        }
        if level {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
    }

    /// The highest-priority bit of `mask` (rotated priority), as an IRQ number.
    fn highest(&self, mask: u8) -> Option<u8> {
        (0..8)
            .map(|i| (i + self.priority_add) & 7)
            .find(|&irq| mask & (1 << irq) != 0)
    }

    /// The IRQ this chip would raise now: requested, unmasked, and of higher priority than
    /// everything in service.
    fn pending(&self) -> Option<u8> {
        let irq = self.highest(self.irr & !self.imr)?;
        match self.highest(self.isr) {
            Some(served) if self.priority(served) <= self.priority(irq) => None,
            _ => Some(irq),
        }
    }

    fn priority(&self, irq: u8) -> u8 {
        (irq.wrapping_sub(self.priority_add)) & 7
    }

    fn ack(&mut self, irq: u8) {
        let bit = 1 << irq;
        self.irr &= !bit;
        if self.auto_eoi {
            self.priority_add = (irq + 1) & 7;
        } else {
            self.isr |= bit;
        }
    }

    fn write_command(&mut self, v: u8) {
        if v & 0x10 != 0 {
            // ICW1: start initialization.
            *self = Chip {
                lines: self.lines,
                elcr: self.elcr,
                init_step: 2,
                icw4: v & 1 != 0,
                ..Chip::default()
            };
        } else if v & 0x08 != 0 {
            // OCW3: select IRR or ISR for reads.
            if v & 0x02 != 0 {
                self.read_isr = v & 0x01 != 0;
            }
        } else {
            // OCW2: end of interrupt, rotation.
            let rotate = v & 0x80 != 0;
            match (v >> 5) & 3 {
                1 => {
                    // Non-specific EOI: the highest-priority IRQ in service.
                    if let Some(irq) = self.highest(self.isr) {
                        self.isr &= !(1 << irq);
                        if rotate {
                            self.priority_add = (irq + 1) & 7;
                        }
                    }
                }
                3 => {
                    let irq = v & 7;
                    self.isr &= !(1 << irq);
                    if rotate {
                        self.priority_add = (irq + 1) & 7;
                    }
                }
                2 if v & 0x40 != 0 => self.priority_add = ((v & 7) + 1) & 7,
                _ => {}
            }
        }
    }

    fn write_data(&mut self, v: u8) {
        match self.init_step {
            2 => {
                self.base = v & 0xf8;
                self.init_step = 3;
            }
            3 => self.init_step = if self.icw4 { 4 } else { 0 },
            4 => {
                self.auto_eoi = v & 0x02 != 0;
                self.init_step = 0;
            }
            _ => self.imr = v,
        }
    }

    fn read_command(&self) -> u8 {
        if self.read_isr {
            self.isr
        } else {
            self.irr
        }
    }
}

/// The two chips, the slave cascaded on the master's IRQ 2.
#[derive(Default)]
pub struct Pic {
    chips: [Chip; 2],
}

impl Pic {
    /// ISA IRQ `irq` (0–15) to `level`.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        if irq < 8 {
            self.chips[0].set_line(irq, level);
        } else {
            self.chips[1].set_line(irq - 8, level);
        }
        self.update_cascade();
    }

    /// A rising and falling edge on `irq` (a timer tick).
    #[cfg(test)]
    pub fn pulse(&mut self, irq: u8) {
        self.set_irq(irq, true);
        self.set_irq(irq, false);
    }

    fn update_cascade(&mut self) {
        let slave = self.chips[1].pending().is_some();
        self.chips[0].set_line(2, slave);
    }

    /// The CPU's INTR line.
    pub fn interrupt_pending(&self) -> bool {
        self.chips[0].pending().is_some()
    }

    /// Whether an edge on `irq` is latched and not yet acknowledged (IRR): another edge now
    /// would be lost.
    pub fn requested(&self, irq: u8) -> bool {
        let (chip, bit) = if irq < 8 { (0, irq) } else { (1, irq - 8) };
        self.chips[chip].irr & (1 << bit) != 0
    }

    /// A read of one chip's ports (0: IRR or ISR as OCW3 selected, 1: the mask).
    pub fn read_port(&self, chip: usize, offset: u64) -> u8 {
        let chip = &self.chips[chip & 1];
        if offset == 0 {
            chip.read_command()
        } else {
            chip.imr
        }
    }

    /// A write to one chip's ports (0: ICW1/OCW2/OCW3, 1: ICW2–4 or the mask).
    pub fn write_port(&mut self, chip: usize, offset: u64, v: u8) {
        if offset == 0 {
            self.chips[chip & 1].write_command(v);
        } else {
            self.chips[chip & 1].write_data(v);
        }
        self.update_cascade();
    }

    /// The edge/level control register of one chip (stored, not acted on).
    pub fn elcr(&self, chip: usize) -> u8 {
        self.chips[chip & 1].elcr
    }

    pub fn set_elcr(&mut self, chip: usize, v: u8) {
        self.chips[chip & 1].elcr = v;
    }

    /// INTA: the vector of the highest-priority interrupt, now in service; the spurious
    /// vector (IRQ 7 of the chip) if it went away.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let master = &mut self.chips[0];
        let Some(irq) = master.pending() else {
            return Some(master.base + 7);
        };
        master.ack(irq);
        let vector = if irq == 2 {
            let slave = &mut self.chips[1];
            match slave.pending() {
                Some(s) => {
                    slave.ack(s);
                    slave.base + s
                }
                None => slave.base + 7,
            }
        } else {
            self.chips[0].base + irq
        };
        self.update_cascade();
        Some(vector)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The initialization the test guests' runtime and Linux do: vectors 32/40, cascade on 2.
    fn initialized() -> Pic {
        let mut p = Pic::default();
        for (chip, base) in [(0, 32), (1, 40)] {
            p.chips[chip].write_command(0x11);
            p.chips[chip].write_data(base);
            p.chips[chip].write_data(if chip == 0 { 4 } else { 2 });
            p.chips[chip].write_data(1);
        }
        p
    }

    #[test]
    fn priorities_masks_and_eoi() {
        let mut p = initialized();
        p.chips[0].write_data(0xfe); // only IRQ 0
        p.pulse(0);
        p.set_irq(4, true);
        assert!(p.interrupt_pending());
        assert_eq!(p.acknowledge(), Some(32));
        assert!(!p.interrupt_pending(), "IRQ 4 is masked, IRQ 0 in service");
        p.chips[0].write_data(0xee); // unmask IRQ 4 too
        assert!(!p.interrupt_pending(), "IRQ 4 waits for IRQ 0's EOI (lower priority)");
        p.chips[0].write_command(0x20);
        assert_eq!(p.acknowledge(), Some(36));
        p.chips[0].write_command(0x20);
        assert!(
            !p.interrupt_pending(),
            "edge-triggered: no second request without a new edge"
        );
    }

    #[test]
    fn the_slave_cascades_through_irq2() {
        let mut p = initialized();
        p.chips[0].write_data(0xfb); // IRQ 2 (cascade) open
        p.chips[1].write_data(0xef); // slave IRQ 4 = ISA IRQ 12
        p.set_irq(12, true);
        assert!(p.interrupt_pending());
        assert_eq!(p.acknowledge(), Some(44));
        assert_eq!(p.chips[1].isr, 1 << 4);
        assert_eq!(p.chips[0].isr, 1 << 2);
    }

    #[test]
    fn a_vanished_interrupt_is_spurious() {
        let mut p = initialized();
        assert_eq!(p.acknowledge(), Some(39));
    }
}
