//! The i8042 keyboard controller, as far as a reset needs: command 0xFE on port 0x64 pulses
//! the CPU reset line, which ends the run. Status reads say "no data, input buffer empty".

use super::{Action, Device};

pub const PORT: u64 = 0x64;
const CMD_RESET: u8 = 0xfe;

pub struct I8042;

impl Device for I8042 {
    fn name(&self) -> &'static str {
        "i8042"
    }
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) -> Action {
        if data.first() == Some(&CMD_RESET) {
            Action::Reset
        } else {
            Action::Continue
        }
    }
}
