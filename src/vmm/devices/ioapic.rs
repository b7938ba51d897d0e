//! The I/O APIC (82093AA-style, 24 pins, MMIO at 0xfec0_0000), for engines without KVM's
//! in-kernel one. ISA IRQs reach it one-to-one except IRQ 0, which the ACPI MADT overrides to
//! pin 2 (`acpi.rs`), as on every PC.
//!
//! Modelled: the index/data window (IOREGSEL at 0x00, IOWIN at 0x10), the ID, version and
//! arbitration registers, and 24 redirection entries with vector, delivery mode, destination
//! mode and destination, polarity, trigger mode, mask and the read-only remote IRR. An
//! edge-triggered pin sends a message on each asserting edge while unmasked; a level-triggered
//! pin sends one while asserted and unmasked with remote IRR clear, sets remote IRR, and sends
//! again after the local APIC's EOI for its vector if still asserted. Messages go to the
//! chipset, which hands them to the local APIC when the destination matches.

pub const MMIO_BASE: u64 = 0xfec0_0000;
pub const MMIO_SIZE: u64 = 0x20;
pub const PINS: usize = 24;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
/// Version 0x11, maximum redirection entry 23.
const VERSION_VALUE: u32 = 0x11 | ((PINS as u32 - 1) << 16);

const MASKED: u64 = 1 << 16;
const LEVEL: u64 = 1 << 15;
const REMOTE_IRR: u64 = 1 << 14;
const ACTIVE_LOW: u64 = 1 << 13;
const LOGICAL: u64 = 1 << 11;
/// Bits software writes (delivery status and remote IRR are read-only).
const WRITABLE: u64 = 0xff00_0000_0001_afff;

/// An interrupt message for the local APIC(s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message {
    pub vector: u8,
    /// Delivery mode (0 fixed, 1 lowest priority, 2 SMI, 4 NMI, 5 INIT, 7 ExtINT).
    pub mode: u8,
    pub dest: u8,
    pub logical: bool,
    pub level: bool,
}

pub struct IoApic {
    id: u32,
    select: u32,
    redirection: [u64; PINS],
    /// Input levels as driven (before polarity).
    lines: u32,
}

impl Default for IoApic {
    fn default() -> Self {
        IoApic {
            id: 0,
            select: 0,
            redirection: [MASKED; PINS],
            lines: 0,
        }
    }
}

impl IoApic {
    fn asserted(&self, pin: usize) -> bool {
        let line = self.lines & (1 << pin) != 0;
        line != (self.redirection[pin] & ACTIVE_LOW != 0)
    }

    fn message(&self, pin: usize) -> Message {
        let e = self.redirection[pin];
        Message {
            vector: e as u8,
            mode: ((e >> 8) & 7) as u8,
            dest: (e >> 56) as u8,
            logical: e & LOGICAL != 0,
            level: e & LEVEL != 0,
        }
    }

    /// Sends pin's message if the pin's state calls for one now (asserted, unmasked, and for a
    /// level pin, not already waiting for its EOI).
    fn service(&mut self, pin: usize) -> Option<Message> {
        let e = self.redirection[pin];
        if e & MASKED != 0 || !self.asserted(pin) {
            return None;
        }
        if e & LEVEL != 0 {
            if e & REMOTE_IRR != 0 {
                return None;
            }
            self.redirection[pin] |= REMOTE_IRR;
        }
        Some(self.message(pin))
    }

    /// Drives input `pin` to `level`: the message to deliver, if this change sends one.
    pub fn set_pin(&mut self, pin: usize, level: bool) -> Option<Message> {
        if pin >= PINS {
            return None;
        }
        let was = self.asserted(pin);
        if level {
            self.lines |= 1 << pin;
        } else {
            self.lines &= !(1 << pin);
        }
        let now = self.asserted(pin);
        let edge_triggered = self.redirection[pin] & LEVEL == 0;
        if edge_triggered && (was || !now) {
            return None; // only an asserting edge counts
        }
        self.service(pin)
    }

    /// The vector the pin's entry names, if the pin is routed (unmasked).
    pub fn routed_vector(&self, pin: usize) -> Option<u8> {
        let e = *self.redirection.get(pin)?;
        (e & MASKED == 0).then_some(e as u8)
    }

    /// The local APIC's EOI for a level-triggered `vector`: clears remote IRR on the pins that
    /// use it and resends for those still asserted.
    pub fn eoi(&mut self, vector: u8) -> Vec<Message> {
        let mut out = Vec::new();
        for pin in 0..PINS {
            let e = self.redirection[pin];
            if e as u8 == vector && e & REMOTE_IRR != 0 {
                self.redirection[pin] &= !REMOTE_IRR;
                out.extend(self.service(pin));
            }
        }
        out
    }

    fn read_register(&self) -> u32 {
        match self.select {
            0 => self.id,
            1 => VERSION_VALUE,
            2 => self.id, // arbitration ID
            r @ 0x10..=0x3f => {
                let e = self.redirection[(r as usize - 0x10) / 2];
                if r & 1 == 0 {
                    e as u32
                } else {
                    (e >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    /// Writes the selected register; an unmasked level pin that is asserted sends.
    fn write_register(&mut self, v: u32) -> Option<Message> {
        match self.select {
            0 => self.id = v & 0x0f00_0000,
            r @ 0x10..=0x3f => {
                let pin = (r as usize - 0x10) / 2;
                let e = &mut self.redirection[pin];
                let new = if r & 1 == 0 {
                    (*e & !0xffff_ffff) | v as u64
                } else {
                    (*e & 0xffff_ffff) | (v as u64) << 32
                };
                *e = (*e & !WRITABLE) | (new & WRITABLE);
                if *e & LEVEL == 0 {
                    *e &= !REMOTE_IRR;
                    return None;
                }
                return self.service(pin);
            }
            _ => {}
        }
        None
    }

    /// An MMIO read of the window.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset & !3 {
            IOREGSEL => self.select,
            IOWIN => self.read_register(),
            _ => 0,
        }
        .to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = v.get((offset & 3) as usize + i).copied().unwrap_or(0);
        }
    }

    /// An MMIO write of the window (32-bit accesses; narrower writes change the low bytes).
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) -> Option<Message> {
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(v);
        match offset {
            IOREGSEL => {
                self.select = v & 0xff;
                None
            }
            IOWIN => self.write_register(v),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(io: &mut IoApic, pin: usize, entry: u64) -> Option<Message> {
        io.mmio_write(IOREGSEL, &(0x10 + 2 * pin as u32 + 1).to_le_bytes());
        io.mmio_write(IOWIN, &((entry >> 32) as u32).to_le_bytes());
        io.mmio_write(IOREGSEL, &(0x10 + 2 * pin as u32).to_le_bytes());
        io.mmio_write(IOWIN, &(entry as u32).to_le_bytes())
    }

    fn read(io: &mut IoApic, reg: u32) -> u32 {
        io.mmio_write(IOREGSEL, &reg.to_le_bytes());
        let mut b = [0u8; 4];
        io.mmio_read(IOWIN, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn version_and_reset_masks() {
        let mut io = IoApic::default();
        assert_eq!(read(&mut io, 1), 0x0017_0011);
        assert_eq!(read(&mut io, 0x10), MASKED as u32);
        assert_eq!(io.set_pin(4, true), None, "masked at reset");
    }

    #[test]
    fn edge_pins_send_on_rising_edges_only() {
        let mut io = IoApic::default();
        program(&mut io, 4, 0x24);
        let m = io.set_pin(4, true).expect("edge");
        assert_eq!((m.vector, m.level, m.dest, m.logical), (0x24, false, 0, false));
        assert_eq!(io.set_pin(4, true), None, "no edge");
        assert_eq!(io.set_pin(4, false), None);
        assert!(io.set_pin(4, true).is_some());
    }

    #[test]
    fn level_pins_wait_for_eoi() {
        let mut io = IoApic::default();
        program(&mut io, 9, (1 << 56) | LOGICAL | LEVEL | 0x39);
        let m = io.set_pin(9, true).expect("level");
        assert!(m.level && m.logical && m.dest == 1);
        assert_ne!(read(&mut io, 0x22) as u64 & REMOTE_IRR, 0);
        assert_eq!(io.set_pin(9, true), None, "remote IRR set");
        assert_eq!(io.eoi(0x39).len(), 1, "still asserted: sent again");
        io.set_pin(9, false);
        assert!(io.eoi(0x39).is_empty());
        assert_eq!(read(&mut io, 0x22) as u64 & REMOTE_IRR, 0);
        // Active-low: the line's low level is the asserted one.
        assert_eq!(io.set_pin(10, true), None, "masked");
        assert_eq!(program(&mut io, 10, ACTIVE_LOW | LEVEL | 0x3a), None, "high: idle");
        assert!(io.routed_vector(10) == Some(0x3a));
        assert!(io.set_pin(10, false).is_some());
    }

    #[test]
    fn unmasking_an_asserted_level_pin_sends() {
        let mut io = IoApic::default();
        program(&mut io, 5, MASKED | LEVEL | 0x25);
        assert_eq!(io.set_pin(5, true), None);
        assert!(program(&mut io, 5, LEVEL | 0x25).is_some());
    }
}
