//! Devices on the two buses a PC has: port I/O and MMIO (the 3–4 GiB hole). Each bus is a
//! table of address ranges, each owned by one device; the run loop looks an exit's address up
//! once and calls the device. [`Buses::standard`] is the table `hbt run` uses.

pub mod acpi_pm;
pub mod chipset;
pub mod debug_exit;
pub mod i8042;
pub mod ioapic;
pub mod lapic;
pub mod pic;
pub mod pit;
pub mod progress;
pub mod pvclock;
pub mod rtc;
pub mod serial;

use std::time::Instant;

/// What a device asks the run loop to do after an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    /// The guest asked to end the run with this status (debug-exit port).
    Exit(u32),
    /// The guest asked for a reset (i8042 pulse): the run ends.
    Reset,
    /// The guest powered the machine off (ACPI S5 through PM1a_CNT): the run ends.
    PowerOff,
    /// hbt's stdout is closed (EPIPE): nobody reads the console any more, the run ends.
    OutputClosed,
}

/// An interrupt line a device drives (level: true = asserted). Clones share the line and its
/// current level, so only changes reach `set` (an ioctl), whichever thread makes them.
#[derive(Clone)]
pub struct IrqLine {
    set: std::sync::Arc<dyn Fn(bool) + Send + Sync>,
    level: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl IrqLine {
    pub fn new(set: impl Fn(bool) + Send + Sync + 'static) -> Self {
        IrqLine {
            set: std::sync::Arc::new(set),
            level: Default::default(),
        }
    }
    pub fn set(&self, level: bool) {
        if self.level.swap(level, std::sync::atomic::Ordering::SeqCst) != level {
            (self.set)(level)
        }
    }
}

/// A device on a bus; `offset` is relative to the start of its range.
pub trait Device {
    /// Short name for `--stats`.
    fn name(&self) -> &'static str;
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]) -> Action;
    /// Write out anything buffered (the run is ending, or hbt is about to print).
    fn flush(&mut self) {}
}

/// One bus entry: addresses `base..base+len` belong to `device`.
struct Range {
    base: u64,
    len: u64,
    device: Box<dyn Device>,
    exits: u64,
}

/// One address space (port I/O or MMIO).
pub struct Bus {
    ranges: Vec<Range>,
    /// Accesses no device owns (reads return all ones, writes are dropped).
    pub unclaimed: u64,
    /// The same, by address, for the first [`UNCLAIMED_ADDRESSES`] addresses seen (a guest
    /// probing absent hardware touches a few ports many times).
    unclaimed_by_address: std::collections::BTreeMap<u64, u64>,
}

/// How many distinct unclaimed addresses a bus counts one by one.
const UNCLAIMED_ADDRESSES: usize = 256;

/// Both buses.
pub struct Buses {
    pub pio: Bus,
    pub mmio: Bus,
}

impl Buses {
    /// The standard table for `hbt run` (see README "hbt run"), with the boot-progress log.
    pub fn standard(started: Instant, interactive: bool, com1_irq: IrqLine) -> (Self, progress::Marks) {
        let marks = progress::Marks::default();
        let mut pio = Bus::new();
        let (i8042_data, i8042_command) = i8042::I8042Port::pair();
        for (base, len, device) in [
            (
                serial::COM1,
                8,
                Box::new(serial::Serial::stdio(interactive, com1_irq)) as Box<dyn Device>,
            ),
            (debug_exit::PORT, 4, Box::new(debug_exit::DebugExit)),
            (i8042::DATA_PORT, 1, Box::new(i8042_data)),
            (i8042::PORT, 1, Box::new(i8042_command)),
            (rtc::PORT, 2, Box::new(rtc::Rtc::default())),
            (acpi_pm::PORT, acpi_pm::LEN, Box::new(acpi_pm::AcpiPm::default())),
            (
                progress::PORT,
                1,
                Box::new(progress::BootProgress::new(started, marks.clone())),
            ),
        ] {
            pio.insert(base, len, device);
        }
        // The interrupt controllers are the engine's: KVM's in-kernel ones, or `chipset.rs`.
        (Buses { pio, mmio: Bus::new() }, marks)
    }
}

impl Bus {
    pub fn new() -> Self {
        Bus {
            ranges: Vec::new(),
            unclaimed: 0,
            unclaimed_by_address: Default::default(),
        }
    }

    pub fn insert(&mut self, base: u64, len: u64, device: Box<dyn Device>) {
        assert!(
            self.ranges
                .iter()
                .all(|r| base + len <= r.base || r.base + r.len <= base),
            "overlapping port ranges at {base:#x}"
        );
        self.ranges.push(Range {
            base,
            len,
            device,
            exits: 0,
        });
    }

    fn find(&mut self, addr: u64) -> Option<&mut Range> {
        self.ranges.iter_mut().find(|r| addr >= r.base && addr - r.base < r.len)
    }

    pub fn read(&mut self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some(r) => {
                r.exits += 1;
                r.device.read(addr - r.base, data)
            }
            None => {
                self.record_unclaimed(addr);
                data.fill(0xff)
            }
        }
    }

    pub fn write(&mut self, addr: u64, data: &[u8]) -> Action {
        match self.find(addr) {
            Some(r) => {
                r.exits += 1;
                r.device.write(addr - r.base, data)
            }
            None => {
                self.record_unclaimed(addr);
                Action::Continue
            }
        }
    }

    fn record_unclaimed(&mut self, addr: u64) {
        self.unclaimed += 1;
        let known = self.unclaimed_by_address.len() < UNCLAIMED_ADDRESSES;
        if let Some(n) = self.unclaimed_by_address.get_mut(&addr) {
            *n += 1;
        } else if known {
            self.unclaimed_by_address.insert(addr, 1);
        }
    }

    /// The `n` unclaimed addresses accessed most, with their counts, most first.
    pub fn unclaimed_top(&self, n: usize) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self.unclaimed_by_address.iter().map(|(&a, &c)| (a, c)).collect();
        v.sort_by_key(|&(a, c)| (std::cmp::Reverse(c), a));
        v.truncate(n);
        v
    }

    /// Flushes every device's buffered output.
    pub fn flush(&mut self) {
        self.ranges.iter_mut().for_each(|r| r.device.flush());
    }

    /// (device name, base address, exits) for every device.
    pub fn exit_counts(&self) -> Vec<(&'static str, u64, u64)> {
        self.ranges.iter().map(|r| (r.device.name(), r.base, r.exits)).collect()
    }
}
