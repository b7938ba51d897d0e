//! Boot-progress port (POST-code style, port 0x80): each new byte written is timestamped and
//! shown by `--stats`, so a guest can mark how far it got and when. A write of the value already
//! shown is no new mark: Linux writes port 0x80 as an I/O delay (`outb_p`), thousands of times.

use super::{Action, Device};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Instant;

pub const PORT: u64 = 0x80;
/// Marks kept; later ones are counted but not stored (a guest may spin on port 0x80).
const MAX_MARKS: usize = 4096;

/// (seconds since the run started, value) of each write.
#[derive(Clone, Default)]
pub struct Marks(pub Rc<RefCell<Vec<(f64, u8)>>>);

pub struct BootProgress {
    started: Instant,
    marks: Marks,
}

impl BootProgress {
    pub fn new(started: Instant, marks: Marks) -> Self {
        BootProgress { started, marks }
    }
}

impl Device for BootProgress {
    fn name(&self) -> &'static str {
        "boot-progress"
    }
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let last = self.marks.0.borrow().last().map_or(0, |m| m.1);
        data.fill(last);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) -> Action {
        let mut marks = self.marks.0.borrow_mut();
        let value = data.first().copied().unwrap_or(0);
        if marks.len() < MAX_MARKS && marks.last().map(|m| m.1) != Some(value) {
            marks.push((self.started.elapsed().as_secs_f64(), value));
        }
        Action::Continue
    }
}
