//! Debug-exit port (like QEMU's isa-debug-exit, without its `(v << 1) | 1` encoding): the
//! value a test guest writes becomes hbt's exit status.

use super::{Action, Device};

pub const PORT: u64 = 0xf4;

pub struct DebugExit;

impl Device for DebugExit {
    fn name(&self) -> &'static str {
        "debug-exit"
    }
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) -> Action {
        let mut v = [0u8; 4];
        v[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
        Action::Exit(u32::from_le_bytes(v))
    }
}
