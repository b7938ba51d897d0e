//! ACPI fixed-hardware power management registers (the PM1a event and control blocks the FADT
//! in `acpi.rs` points at), so a guest finds a full (not hardware-reduced) ACPI PC with its
//! 8259, PIT and i8042, and can power the machine off.
//!
//! Ports: PM1a_STS (0x600, 16 bit, write 1 to clear), PM1a_EN (0x602), PM1a_CNT (0x604).
//! SCI_EN always reads 1: there is no SMI command port, the machine is in ACPI mode from the
//! start. Writing SLP_EN with SLP_TYP = [`S5_SLP_TYP`] (what the DSDT's `\_S5` package says)
//! ends the run as a power-off; other sleep states are not offered (no `\_S1`–`\_S4`) and
//! are ignored. Nothing raises status bits: there is no PM timer, power button or GPE.

use super::{Action, Device};

pub const PORT: u64 = 0x600;
/// PM1a_EVT_BLK (4 bytes) then PM1a_CNT_BLK (2 bytes).
pub const LEN: u64 = 6;
pub const PM1_EVT_LEN: u8 = 4;
pub const PM1_CNT_LEN: u8 = 2;
pub const PM1A_CNT: u64 = PORT + 4;
/// The SLP_TYP value the DSDT declares for S5 (soft off).
pub const S5_SLP_TYP: u16 = 5;

const SCI_EN: u16 = 1 << 0;
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;

#[derive(Default)]
pub struct AcpiPm {
    status: u16,
    enable: u16,
    control: u16,
}

impl AcpiPm {
    fn registers(&self) -> [u8; 6] {
        let mut r = [0u8; 6];
        r[0..2].copy_from_slice(&self.status.to_le_bytes());
        r[2..4].copy_from_slice(&self.enable.to_le_bytes());
        r[4..6].copy_from_slice(&(self.control | SCI_EN).to_le_bytes());
        r
    }
}

impl Device for AcpiPm {
    fn name(&self) -> &'static str {
        "acpi-pm"
    }
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let regs = self.registers();
        for (i, b) in data.iter_mut().enumerate() {
            *b = regs.get(offset as usize + i).copied().unwrap_or(0xff);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Action {
        let mut regs = self.registers();
        let mut written = [0u8; 6];
        for (i, &b) in data.iter().enumerate() {
            if let Some(r) = regs.get_mut(offset as usize + i) {
                *r = b;
                written[offset as usize + i] = b;
            }
        }
        // Status bits are cleared by writing ones.
        self.status &= !u16::from_le_bytes([written[0], written[1]]);
        self.enable = u16::from_le_bytes([regs[2], regs[3]]);
        let control = u16::from_le_bytes([regs[4], regs[5]]);
        self.control = control & !SLP_EN;
        let touched_control = offset + data.len() as u64 > 4;
        if touched_control && control & SLP_EN != 0 && (control >> SLP_TYP_SHIFT) & 7 == S5_SLP_TYP {
            return Action::PowerOff;
        }
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sci_en_reads_set_and_s5_powers_off() {
        let mut pm = AcpiPm::default();
        let mut cnt = [0u8; 2];
        pm.read(4, &mut cnt);
        assert_eq!(u16::from_le_bytes(cnt), SCI_EN);
        let s5 = (S5_SLP_TYP << SLP_TYP_SHIFT) | SCI_EN;
        assert_eq!(pm.write(4, &s5.to_le_bytes()), Action::Continue, "SLP_TYP alone");
        assert_eq!(pm.write(4, &(s5 | SLP_EN).to_le_bytes()), Action::PowerOff);
        let s3 = (3 << SLP_TYP_SHIFT) | SLP_EN;
        assert_eq!(pm.write(4, &s3.to_le_bytes()), Action::Continue, "no other sleep state");
        assert_eq!(pm.write(2, &0x0100u16.to_le_bytes()), Action::Continue);
        let mut en = [0u8; 2];
        pm.read(2, &mut en);
        assert_eq!(u16::from_le_bytes(en), 0x0100);
    }
}
