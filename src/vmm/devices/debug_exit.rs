//! Debug-exit port (like QEMU's isa-debug-exit, without its `(v << 1) | 1` encoding): the
//! value a test guest writes becomes hbt's exit status.

use super::{Action, PortDevice};

pub const PORT: u16 = 0xf4;

pub struct DebugExit;

impl PortDevice for DebugExit {
    fn name(&self) -> &'static str {
        "debug-exit"
    }
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, _offset: u16, data: &[u8]) -> Action {
        let mut v = [0u8; 4];
        v[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
        Action::Exit(u32::from_le_bytes(v))
    }
}
