//! The firmware tables hbt gives a guest in place of a BIOS: ACPI's RSDP, XSDT, FADT, FACS,
//! DSDT and MADT, in the BIOS area at 0xe0000 (reserved in the e820 map), where an OS scans
//! for the RSDP. Debian's kernels are built without MP-table support (`CONFIG_X86_MPPARSE`
//! is off), so ACPI is how Linux finds the interrupt controllers.
//!
//! The machine they describe is a full (not hardware-reduced) ACPI PC with one CPU:
//! - MADT: the local APIC (ID 0) at 0xfee0_0000, the I/O APIC (ID 0, GSIs 0–23) at
//!   0xfec0_0000, dual 8259s present (PCAT_COMPAT), ISA IRQ 0 on GSI 2 and the SCI (IRQ 9)
//!   level-triggered, LINT1 as NMI — the layout of every PC, and what KVM's in-kernel chips
//!   provide under `--accel kvm` at the same addresses.
//! - FADT: PM1a event and control blocks at the ports of `devices/acpi_pm.rs` (so `poweroff`
//!   works through `\_S5`), no PM timer, no GPEs, no SMI command port (always in ACPI mode),
//!   legacy devices and an i8042 present, no VGA, C1 by `hlt` only, no reset register (Linux
//!   then reboots through the i8042, which hbt models).
//! - DSDT: just `Name (\_S5, Package () { 5, 5 })`.
//!
//! A hardware-reduced FADT would make Linux drop the 8259 and the PIT altogether; this
//! machine keeps them, and Linux leaves the PIT alone anyway once the CPU model offers the
//! TSC-deadline timer with ARAT (`apic_needs_pit`).

use super::devices::{acpi_pm, ioapic, lapic};
use super::memory::GuestMemory;
use anyhow::Result;

/// Where the tables go (inside the reserved 0x9fc00–0xfffff range of the e820 map).
pub const BASE: u64 = 0xe_0000;
const RSDP: u64 = BASE;
const XSDT: u64 = BASE + 0x40;
const FADT: u64 = BASE + 0x100;
const FACS: u64 = BASE + 0x240; // 64-byte aligned, as ACPI requires
const DSDT: u64 = BASE + 0x280;
const MADT: u64 = BASE + 0x300;

const OEM_ID: &[u8; 6] = b"HBTVMM";
const OEM_TABLE_ID: &[u8; 8] = b"HBTVMM  ";
/// The SCI's ISA IRQ (nothing raises it: no event hbt models needs one).
const SCI_IRQ: u8 = 9;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// A table: the 36-byte header, then the body; `finish` fills length and checksum.
struct Table(Vec<u8>);

impl Table {
    fn new(signature: &[u8; 4], revision: u8) -> Self {
        let mut t = Vec::with_capacity(256);
        t.extend_from_slice(signature);
        t.extend_from_slice(&[0; 4]); // length
        t.push(revision);
        t.push(0); // checksum
        t.extend_from_slice(OEM_ID);
        t.extend_from_slice(OEM_TABLE_ID);
        t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
        t.extend_from_slice(b"HBT ");
        t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
        Table(t)
    }
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    /// A Generic Address Structure for `width` bits of system I/O at `port` (0: none).
    fn io_gas(&mut self, port: u64, width: u8) -> &mut Self {
        if port == 0 {
            return self.bytes(&[0; 12]);
        }
        self.bytes(&[1, width, 0, 0]).u64(port)
    }
    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[4..8].copy_from_slice(&len.to_le_bytes());
        self.0[9] = checksum(&self.0);
        self.0
    }
}

fn rsdp() -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum of the first 20 bytes
    r.extend_from_slice(OEM_ID);
    r.push(2); // ACPI 2.0+: the XSDT is used
    r.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&XSDT.to_le_bytes());
    r.push(0); // extended checksum
    r.extend_from_slice(&[0; 3]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

fn xsdt() -> Vec<u8> {
    let mut t = Table::new(b"XSDT", 1);
    t.u64(FADT).u64(MADT);
    t.finish()
}

fn fadt() -> Vec<u8> {
    const WBINVD: u32 = 1 << 0;
    const PROC_C1: u32 = 1 << 2;
    const PWR_BUTTON: u32 = 1 << 4; // no fixed-feature power button
    const SLP_BUTTON: u32 = 1 << 5; // no fixed-feature sleep button
    const LEGACY_DEVICES: u16 = 1 << 0;
    const I8042: u16 = 1 << 1;
    const NO_VGA: u16 = 1 << 2;
    let evt = acpi_pm::PORT;
    let cnt = acpi_pm::PM1A_CNT;
    let mut t = Table::new(b"FACP", 6);
    // 32-bit FACS pointer 0: X_FIRMWARE_CTRL is set (ACPI 6 wants only one of the two).
    t.u32(0)
        .u32(DSDT as u32)
        .u8(0) // reserved (INT_MODEL)
        .u8(0) // preferred PM profile: unspecified
        .u16(SCI_IRQ as u16)
        .u32(0) // SMI_CMD: none, always in ACPI mode
        .bytes(&[0, 0, 0, 0]) // ACPI_ENABLE, ACPI_DISABLE, S4BIOS_REQ, PSTATE_CNT
        .u32(evt as u32)
        .u32(0)
        .u32(cnt as u32)
        .u32(0)
        .u32(0) // PM2_CNT
        .u32(0) // PM_TMR
        .u32(0) // GPE0
        .u32(0) // GPE1
        .bytes(&[acpi_pm::PM1_EVT_LEN, acpi_pm::PM1_CNT_LEN, 0, 0, 0, 0, 0, 0])
        .u16(101) // P_LVL2_LAT > 100: no C2
        .u16(1001) // P_LVL3_LAT > 1000: no C3
        .u16(0)
        .u16(0)
        .bytes(&[0, 0, 0, 0, 0]) // duty offset/width, alarms, century
        .u16(LEGACY_DEVICES | I8042 | NO_VGA)
        .u8(0)
        .u32(WBINVD | PROC_C1 | PWR_BUTTON | SLP_BUTTON)
        .io_gas(0, 0) // no reset register
        .u8(0) // reset value
        .u16(0) // ARM boot flags
        .u8(0) // FADT minor version
        .u64(FACS)
        .u64(DSDT)
        .io_gas(evt, 32)
        .io_gas(0, 0)
        .io_gas(cnt, 16)
        .io_gas(0, 0)
        .io_gas(0, 0) // PM2
        .io_gas(0, 0) // PM timer
        .io_gas(0, 0) // GPE0
        .io_gas(0, 0) // GPE1
        .io_gas(0, 0) // sleep control
        .io_gas(0, 0) // sleep status
        .u64(u64::from_le_bytes(*b"HBTVMM\0\0"));
    t.finish()
}

fn facs() -> Vec<u8> {
    let mut f = vec![0u8; 64];
    f[0..4].copy_from_slice(b"FACS");
    f[4..8].copy_from_slice(&64u32.to_le_bytes());
    f[32] = 2; // version
    f
}

fn dsdt() -> Vec<u8> {
    let s5 = acpi_pm::S5_SLP_TYP as u8;
    let mut t = Table::new(b"DSDT", 2);
    // NameOp "_S5_" PackageOp PkgLength(6) NumElements(2) BytePrefix 5 BytePrefix 5
    t.bytes(&[0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x02, 0x0a, s5, 0x0a, s5]);
    t.finish()
}

fn madt() -> Vec<u8> {
    const PCAT_COMPAT: u32 = 1;
    const ENABLED: u32 = 1;
    const LEVEL_ACTIVE_HIGH: u16 = 0b1101;
    let mut t = Table::new(b"APIC", 3);
    t.u32(lapic::MMIO_BASE as u32).u32(PCAT_COMPAT);
    // Processor local APIC: UID 0, APIC ID 0.
    t.bytes(&[0, 8, 0, 0]).u32(ENABLED);
    // I/O APIC: ID 0, address, GSI base 0.
    t.bytes(&[1, 12, 0, 0]).u32(ioapic::MMIO_BASE as u32).u32(0);
    // Interrupt source overrides: ISA IRQ 0 → GSI 2 (bus-conforming), the SCI level-high.
    t.bytes(&[2, 10, 0, 0]).u32(2).u16(0);
    t.bytes(&[2, 10, 0, SCI_IRQ]).u32(SCI_IRQ as u32).u16(LEVEL_ACTIVE_HIGH);
    // Local APIC NMI: every processor's LINT1.
    t.bytes(&[4, 6, 0xff]).u16(0).u8(1);
    t.finish()
}

/// Writes every table into guest RAM.
pub fn write_tables(mem: &mut GuestMemory) -> Result<()> {
    for (gpa, bytes) in [
        (RSDP, rsdp()),
        (XSDT, xsdt()),
        (FADT, fadt()),
        (FACS, facs()),
        (DSDT, dsdt()),
        (MADT, madt()),
    ] {
        mem.write(gpa, &bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(b: &[u8]) -> bool {
        checksum(b) == 0
    }

    #[test]
    fn tables_have_their_architectural_lengths_and_checksums() {
        let r = rsdp();
        assert_eq!(r.len(), 36);
        assert!(sums_to_zero(&r[..20]) && sums_to_zero(&r));
        for (t, sig, len) in [
            (xsdt(), b"XSDT", 36 + 16),
            (fadt(), b"FACP", 276),
            (madt(), b"APIC", 44 + 8 + 12 + 10 + 10 + 6),
            (dsdt(), b"DSDT", 36 + 12),
        ] {
            assert_eq!(&t[..4], sig);
            assert_eq!(t.len(), len, "{}", String::from_utf8_lossy(sig));
            assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize, len);
            assert!(sums_to_zero(&t), "{} checksum", String::from_utf8_lossy(sig));
        }
        assert_eq!(facs().len(), 64);
    }

    #[test]
    fn fadt_fields_sit_at_their_offsets() {
        let f = fadt();
        let u32_at = |o: usize| u32::from_le_bytes(f[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(f[o..o + 8].try_into().unwrap());
        assert_eq!(u32_at(36), 0, "FIRMWARE_CTRL: X_FIRMWARE_CTRL is used");
        assert_eq!(u32_at(40) as u64, DSDT);
        assert_eq!(u16::from_le_bytes([f[46], f[47]]), SCI_IRQ as u16);
        assert_eq!(u32_at(56) as u64, acpi_pm::PORT);
        assert_eq!(u32_at(64) as u64, acpi_pm::PM1A_CNT);
        assert_eq!((f[88], f[89]), (4, 2));
        assert_eq!(u16::from_le_bytes([f[109], f[110]]) & 3, 3, "legacy devices and i8042");
        assert_eq!(u64_at(132), FACS);
        assert_eq!(u64_at(140), DSDT);
        assert_eq!(u64_at(148 + 4), acpi_pm::PORT, "X_PM1a_EVT_BLK");
        assert_eq!(u64_at(172 + 4), acpi_pm::PM1A_CNT, "X_PM1a_CNT_BLK");
    }

    #[test]
    fn the_tables_fit_below_the_next_one() {
        for (at, len, next) in [
            (RSDP, rsdp().len(), XSDT),
            (XSDT, xsdt().len(), FADT),
            (FADT, fadt().len(), FACS),
            (FACS, facs().len(), DSDT),
            (DSDT, dsdt().len(), MADT),
            (MADT, madt().len(), 0xf_0000),
        ] {
            assert!(at + len as u64 <= next, "{at:#x}");
        }
    }
}
