//! A 16550A UART on COM1 (0x3f8), wired to hbt's stdout (transmit) and stdin (receive).
//!
//! Enough of the register set for polled drivers: THR/RBR, IER, IIR/FCR, LCR (with DLAB and
//! the divisor latch), MCR, LSR (THR always empty; data-ready when stdin has bytes), MSR and
//! the scratch register. Interrupt delivery comes with the interrupt controller Linux needs.

use super::{Action, Device};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

pub const COM1: u64 = 0x3f8;

const LSR_DATA_READY: u8 = 0x01;
const LSR_THR_EMPTY: u8 = 0x20;
const LSR_IDLE: u8 = 0x40;
const LCR_DLAB: u8 = 0x80;

pub struct Serial {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scratch: u8,
    divisor: u16,
    out: Box<dyn Write>,
    input: Arc<Mutex<VecDeque<u8>>>,
}

impl Serial {
    /// Transmit to stdout; receive from stdin, read by a background thread.
    pub fn stdio(_interactive: bool) -> Self {
        let input = Arc::new(Mutex::new(VecDeque::new()));
        let feed = Arc::clone(&input);
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            let mut stdin = std::io::stdin();
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut q) = feed.lock() {
                    q.extend(&buf[..n]);
                }
            }
        });
        Serial::with_output(Box::new(std::io::stdout()), input)
    }

    pub fn with_output(out: Box<dyn Write>, input: Arc<Mutex<VecDeque<u8>>>) -> Self {
        Serial {
            ier: 0,
            lcr: 0x03,
            mcr: 0,
            scratch: 0,
            divisor: 1,
            out,
            input,
        }
    }

    fn rx_ready(&self) -> bool {
        self.input.lock().map(|q| !q.is_empty()).unwrap_or(false)
    }
}

impl Device for Serial {
    fn name(&self) -> &'static str {
        "serial"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let dlab = self.lcr & LCR_DLAB != 0;
        let v = match offset {
            0 if dlab => self.divisor as u8,
            0 => self.input.lock().ok().and_then(|mut q| q.pop_front()).unwrap_or(0),
            1 if dlab => (self.divisor >> 8) as u8,
            1 => self.ier,
            2 => 0xc1, // FIFOs enabled, no interrupt pending
            3 => self.lcr,
            4 => self.mcr,
            5 => LSR_THR_EMPTY | LSR_IDLE | if self.rx_ready() { LSR_DATA_READY } else { 0 },
            6 => 0xb0, // DCD, DSR, CTS
            _ => self.scratch,
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Action {
        let v = data.first().copied().unwrap_or(0);
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.divisor = (self.divisor & 0xff00) | v as u16,
            0 => {
                let _ = self.out.write_all(&[v]);
                if v == b'\n' {
                    let _ = self.out.flush();
                }
            }
            1 if dlab => self.divisor = (self.divisor & 0x00ff) | (v as u16) << 8,
            1 => self.ier = v & 0x0f,
            3 => self.lcr = v,
            4 => self.mcr = v & 0x1f,
            7 => self.scratch = v,
            _ => {}
        }
        Action::Continue
    }
}

impl Drop for Serial {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}
