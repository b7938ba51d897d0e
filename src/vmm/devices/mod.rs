//! Legacy PC devices on the port-I/O bus. The bus is a table of port ranges, each owned by one
//! device; the run loop looks a port up once per exit and calls the device.

pub mod debug_exit;
pub mod i8042;
pub mod progress;
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
}

pub trait PortDevice {
    /// Short name for `--stats`.
    fn name(&self) -> &'static str;
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]) -> Action;
}

/// One bus entry: ports `base..base+len` belong to `device`.
struct Range {
    base: u16,
    len: u16,
    device: Box<dyn PortDevice>,
    exits: u64,
}

/// The port-I/O bus.
pub struct PortBus {
    ranges: Vec<Range>,
    /// Accesses to ports no device owns (reads return all ones, writes are dropped).
    pub unclaimed: u64,
}

impl PortBus {
    pub fn new() -> Self {
        PortBus {
            ranges: Vec::new(),
            unclaimed: 0,
        }
    }

    /// The standard table for `hbt run` (see README "Devices"), with the boot-progress log.
    pub fn standard(started: Instant, interactive: bool) -> (Self, progress::Marks) {
        let marks = progress::Marks::default();
        let mut bus = PortBus::new();
        for (base, len, device) in [
            (
                serial::COM1,
                8,
                Box::new(serial::Serial::stdio(interactive)) as Box<dyn PortDevice>,
            ),
            (debug_exit::PORT, 4, Box::new(debug_exit::DebugExit)),
            (i8042::PORT, 1, Box::new(i8042::I8042)),
            (
                progress::PORT,
                1,
                Box::new(progress::BootProgress::new(started, marks.clone())),
            ),
        ] {
            bus.insert(base, len, device);
        }
        (bus, marks)
    }

    pub fn insert(&mut self, base: u16, len: u16, device: Box<dyn PortDevice>) {
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

    fn find(&mut self, port: u16) -> Option<&mut Range> {
        self.ranges.iter_mut().find(|r| port >= r.base && port < r.base + r.len)
    }

    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some(r) => {
                r.exits += 1;
                r.device.read(port - r.base, data)
            }
            None => {
                self.unclaimed += 1;
                data.fill(0xff)
            }
        }
    }

    pub fn write(&mut self, port: u16, data: &[u8]) -> Action {
        match self.find(port) {
            Some(r) => {
                r.exits += 1;
                r.device.write(port - r.base, data)
            }
            None => {
                self.unclaimed += 1;
                Action::Continue
            }
        }
    }

    /// (device name, base port, exits) for every device.
    pub fn exit_counts(&self) -> Vec<(&'static str, u16, u64)> {
        self.ranges.iter().map(|r| (r.device.name(), r.base, r.exits)).collect()
    }
}
