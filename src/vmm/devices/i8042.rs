//! The i8042 keyboard controller (data port 0x60, status/command port 0x64) with nothing
//! plugged into it: no keyboard, no mouse (AUX). It answers every controller command a kernel's
//! probe sends — self-test, read/write the command byte, port tests, loopbacks — so a probe
//! sees a controller without devices at once instead of waiting out its timeouts (Linux waits
//! 500 ms for each unanswered command). Command 0xFE, or an output-port write with bit 0 clear,
//! pulses the CPU reset line, which ends the run: that is how Linux reboots a PC.
//!
//! Bytes written to the data port for a keyboard are dropped, as they would be with none
//! attached (no reply, so a driver's own timeout decides).

use super::{Action, Device};
use std::sync::{Arc, Mutex};

pub const DATA_PORT: u64 = 0x60;
pub const PORT: u64 = 0x64;

/// Status register bits.
const OBF: u8 = 1 << 0;
const SYSTEM_FLAG: u8 = 1 << 2;
const LAST_WAS_COMMAND: u8 = 1 << 3;
const NOT_INHIBITED: u8 = 1 << 4;

/// Command-byte bits: keyboard interrupt, system flag, keyboard clock off, AUX clock off,
/// scan-code translation.
const CTR_AT_RESET: u8 = 0x01 | 0x04 | 0x10 | 0x20 | 0x40;
const CTR_KBD_DISABLED: u8 = 0x10;
const CTR_AUX_DISABLED: u8 = 0x20;

/// What the next data-port write means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    /// A byte for the keyboard (none attached: dropped).
    Keyboard,
    CommandByte,
    OutputPort,
    /// 0xD2: echoed as if from the keyboard.
    KeyboardLoopback,
    /// 0xD3: echoed, but not marked as AUX data: there is no AUX port.
    AuxLoopback,
    /// 0xD4: a byte for the mouse (none attached: dropped).
    Aux,
}

/// The controller's state, shared by its two ports.
#[derive(Debug)]
pub struct Controller {
    ctr: u8,
    output: Option<u8>,
    pending: Pending,
    status_command: bool,
}

impl Default for Controller {
    fn default() -> Self {
        Controller {
            ctr: CTR_AT_RESET,
            output: None,
            pending: Pending::Keyboard,
            status_command: false,
        }
    }
}

impl Controller {
    fn status(&self) -> u8 {
        let mut s = SYSTEM_FLAG | NOT_INHIBITED;
        if self.output.is_some() {
            s |= OBF;
        }
        if self.status_command {
            s |= LAST_WAS_COMMAND;
        }
        s
    }

    fn read_data(&mut self) -> u8 {
        self.output.take().unwrap_or(0)
    }

    fn command(&mut self, cmd: u8) -> Action {
        self.status_command = true;
        self.pending = Pending::Keyboard;
        match cmd {
            0x20 => self.output = Some(self.ctr),
            0x60 => self.pending = Pending::CommandByte,
            0xa7 => self.ctr |= CTR_AUX_DISABLED,
            0xa8 => self.ctr &= !CTR_AUX_DISABLED,
            // AUX interface test: "clock line stuck low" — no mouse port.
            0xa9 => self.output = Some(0x02),
            0xaa => self.output = Some(0x55),
            0xab => self.output = Some(0x00),
            0xad => self.ctr |= CTR_KBD_DISABLED,
            0xae => self.ctr &= !CTR_KBD_DISABLED,
            // Input port: keyboard not inhibited.
            0xc0 => self.output = Some(0x80),
            0xd0 => self.output = Some(0x01),
            0xd1 => self.pending = Pending::OutputPort,
            0xd2 => self.pending = Pending::KeyboardLoopback,
            0xd3 => self.pending = Pending::AuxLoopback,
            0xd4 => self.pending = Pending::Aux,
            // Pulse output lines: bit 0 low is the reset line.
            0xf0..=0xff if cmd & 1 == 0 => return Action::Reset,
            _ => {}
        }
        Action::Continue
    }

    fn write_data(&mut self, v: u8) -> Action {
        self.status_command = false;
        let pending = std::mem::replace(&mut self.pending, Pending::Keyboard);
        match pending {
            Pending::CommandByte => self.ctr = v,
            Pending::OutputPort if v & 1 == 0 => return Action::Reset,
            Pending::OutputPort => {}
            Pending::KeyboardLoopback | Pending::AuxLoopback => self.output = Some(v),
            Pending::Keyboard | Pending::Aux => {}
        }
        Action::Continue
    }
}

/// One of the controller's two ports on the bus.
pub struct I8042Port {
    pub controller: Arc<Mutex<Controller>>,
    /// The status/command port (0x64), else the data port (0x60).
    pub command_port: bool,
}

impl I8042Port {
    /// The data and command ports of one new controller.
    pub fn pair() -> (I8042Port, I8042Port) {
        let c = Arc::new(Mutex::new(Controller::default()));
        (
            I8042Port {
                controller: Arc::clone(&c),
                command_port: false,
            },
            I8042Port {
                controller: c,
                command_port: true,
            },
        )
    }

    fn with<R>(&self, f: impl FnOnce(&mut Controller) -> R) -> R {
        f(&mut self.controller.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Device for I8042Port {
    fn name(&self) -> &'static str {
        "i8042"
    }
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let v = if self.command_port {
            self.with(|c| c.status())
        } else {
            self.with(|c| c.read_data())
        };
        data.fill(v);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) -> Action {
        let v = data.first().copied().unwrap_or(0);
        if self.command_port {
            self.with(|c| c.command(v))
        } else {
            self.with(|c| c.write_data(v))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux's `i8042_command`: command, parameter bytes, then replies (each once OBF is set).
    fn command(c: &mut Controller, cmd: u8, params: &[u8], replies: usize) -> Vec<u8> {
        assert_eq!(c.command(cmd), Action::Continue);
        for &p in params {
            assert_eq!(c.write_data(p), Action::Continue);
        }
        (0..replies)
            .map(|_| {
                assert_ne!(c.status() & OBF, 0, "reply to {cmd:#x} ready");
                c.read_data()
            })
            .collect()
    }

    #[test]
    fn a_linux_probe_finds_a_controller_without_devices() {
        let mut c = Controller::default();
        assert_eq!(c.status() & OBF, 0, "nothing to flush");
        assert_eq!(command(&mut c, 0xaa, &[], 1), [0x55], "self-test passes");
        let ctr = command(&mut c, 0x20, &[], 1)[0];
        command(&mut c, 0x60, &[ctr & !CTR_KBD_DISABLED], 0);
        assert_eq!(command(&mut c, 0x20, &[], 1), [ctr & !CTR_KBD_DISABLED]);
        // AUX loopback echoes without the AUX-data status bit, and the AUX test fails: no mouse.
        assert_eq!(command(&mut c, 0xd3, &[0x5a], 1), [0x5a]);
        assert_eq!(c.status() & 0x20, 0);
        assert_eq!(command(&mut c, 0xa9, &[], 1), [0x02]);
        // A byte for the keyboard gets no answer.
        assert_eq!(c.write_data(0xf2), Action::Continue);
        assert_eq!(c.status() & OBF, 0);
    }

    #[test]
    fn reset_by_pulse_or_output_port() {
        assert_eq!(Controller::default().command(0xfe), Action::Reset);
        let mut c = Controller::default();
        assert_eq!(c.command(0xd1), Action::Continue);
        assert_eq!(c.write_data(0xfe), Action::Reset);
        let mut c = Controller::default();
        c.command(0xd1);
        assert_eq!(c.write_data(0xdf), Action::Continue, "A20 on, reset line high");
        assert_eq!(c.command(0xff), Action::Continue, "pulse of no line");
    }
}
