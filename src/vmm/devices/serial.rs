//! A 16550A UART on COM1 (0x3f8, IRQ 4), wired to hbt's stdout (transmit) and stdin (receive).
//!
//! The register set a driver uses: THR/RBR, IER, IIR/FCR, LCR (with DLAB and the divisor
//! latch), MCR, LSR (THR always empty; data-ready when stdin has bytes), MSR and the scratch
//! register. Output is batched (one exit per byte is the guest's cost, not a write(2) per byte
//! too): flushed at a newline, at 4 KiB, at an IER write or IIR read (the end of a console
//! write, an interrupt-driven transmit), when the guest reads LSR twice in a row (it polls:
//! for input, say, after a prompt without a newline) and when the vCPU halts (the engines
//! flush the buses). Not at every LSR read: Linux's console polls LSR before each byte it
//! writes, and a boot made a write(2) per byte of its log (16,000 of them). A closed stdout
//! ends the run. Interrupts: "received data available" and "THR empty", as the IIR reports
//! them, drive IRQ 4 (level) whenever IER enables them.

use super::{Action, Device, IrqLine};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub const COM1: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;

const LSR_DATA_READY: u8 = 0x01;
const LSR_THR_EMPTY: u8 = 0x20;
const LSR_IDLE: u8 = 0x40;
const LCR_DLAB: u8 = 0x80;
const IER_RX: u8 = 0x01;
const IER_THRE: u8 = 0x02;
const IIR_NONE: u8 = 0x01;
const IIR_THRE: u8 = 0x02;
const IIR_RX: u8 = 0x04;
const IIR_FIFO: u8 = 0xc0;
/// Output is written in batches of at most this many bytes.
const OUT_BATCH: usize = 4096;

/// Received bytes, filled by the stdin thread.
#[derive(Clone, Default)]
pub struct RxQueue {
    bytes: Arc<Mutex<VecDeque<u8>>>,
    /// IER enables the RX interrupt (the stdin thread raises the line on new data).
    irq_enabled: Arc<AtomicBool>,
}

pub struct Serial {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scratch: u8,
    divisor: u16,
    /// A "THR empty" interrupt is pending (set when THR empties or ETBEI is enabled, cleared by
    /// reading it from the IIR or writing THR).
    thre_pending: bool,
    out: Box<dyn Write>,
    /// Transmitted bytes not yet written to `out`.
    pending: Vec<u8>,
    /// `out` refused a write (EPIPE): the next THR write ends the run.
    closed: bool,
    /// The guest's last access to the UART was an LSR read (a second one in a row flushes).
    polled: bool,
    rx: RxQueue,
    irq: IrqLine,
}

impl Serial {
    /// Transmit to stdout; receive from stdin, read by a background thread.
    pub fn stdio(_interactive: bool, irq: IrqLine) -> Self {
        let rx = RxQueue::default();
        let feed = rx.clone();
        let line = irq.clone();
        std::thread::spawn(move || {
            // From a background job, a read of the terminal would stop all of hbt with SIGTTIN
            // (and its --timeout with it). Blocked in this thread, the read fails with EIO
            // instead, and input is taken again once the job is in the foreground.
            // SAFETY: a signal set built with the libc helpers, applied to this thread only.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGTTIN);
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
            let mut buf = [0u8; 256];
            let mut stdin = std::io::stdin();
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.raw_os_error() == Some(libc::EIO) || e.kind() == std::io::ErrorKind::Interrupted => {
                        std::thread::sleep(std::time::Duration::from_millis(100));
                        continue;
                    }
                    Err(_) => break,
                };
                if let Ok(mut q) = feed.bytes.lock() {
                    q.extend(&buf[..n]);
                }
                if feed.irq_enabled.load(Ordering::SeqCst) {
                    line.set(true);
                }
            }
        });
        Serial::new(Box::new(std::io::stdout()), rx, irq)
    }

    pub fn new(out: Box<dyn Write>, rx: RxQueue, irq: IrqLine) -> Self {
        Serial {
            ier: 0,
            lcr: 0x03,
            mcr: 0,
            scratch: 0,
            divisor: 1,
            thre_pending: false,
            out,
            pending: Vec::with_capacity(OUT_BATCH),
            closed: false,
            polled: false,
            rx,
            irq,
        }
    }

    /// Writes the batched output; a write error (stdout closed) is remembered.
    pub fn flush_out(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        if self
            .out
            .write_all(&self.pending)
            .and_then(|()| self.out.flush())
            .is_err()
        {
            self.closed = true;
        }
        self.pending.clear();
    }

    fn rx_ready(&self) -> bool {
        self.rx.bytes.lock().map(|q| !q.is_empty()).unwrap_or(false)
    }

    /// The highest-priority pending interrupt, as the IIR shows it.
    fn pending(&self) -> u8 {
        if self.ier & IER_RX != 0 && self.rx_ready() {
            IIR_RX
        } else if self.ier & IER_THRE != 0 && self.thre_pending {
            IIR_THRE
        } else {
            IIR_NONE
        }
    }

    fn update_irq(&self) {
        self.rx.irq_enabled.store(self.ier & IER_RX != 0, Ordering::SeqCst);
        self.irq.set(self.pending() != IIR_NONE);
    }
}

impl Device for Serial {
    fn name(&self) -> &'static str {
        "serial"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let dlab = self.lcr & LCR_DLAB != 0;
        let polled = std::mem::replace(&mut self.polled, offset == 5);
        let v = match offset {
            0 if dlab => self.divisor as u8,
            0 => {
                let b = self.rx.bytes.lock().ok().and_then(|mut q| q.pop_front()).unwrap_or(0);
                self.update_irq();
                b
            }
            1 if dlab => (self.divisor >> 8) as u8,
            1 => self.ier,
            2 => {
                self.flush_out();
                let iir = self.pending();
                if iir == IIR_THRE {
                    // Reading the IIR that reports "THR empty" acknowledges it.
                    self.thre_pending = false;
                    self.update_irq();
                }
                iir | IIR_FIFO
            }
            3 => self.lcr,
            4 => self.mcr,
            5 => {
                if polled {
                    self.flush_out();
                }
                LSR_THR_EMPTY | LSR_IDLE | if self.rx_ready() { LSR_DATA_READY } else { 0 }
            }
            6 => 0xb0, // DCD, DSR, CTS
            _ => self.scratch,
        };
        data.fill(v);
    }

    fn flush(&mut self) {
        self.flush_out();
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Action {
        let v = data.first().copied().unwrap_or(0);
        let dlab = self.lcr & LCR_DLAB != 0;
        self.polled = false;
        match offset {
            0 if dlab => self.divisor = (self.divisor & 0xff00) | v as u16,
            0 => {
                self.pending.push(v);
                if v == b'\n' || self.pending.len() >= OUT_BATCH {
                    self.flush_out();
                }
                if self.closed {
                    return Action::OutputClosed;
                }
                // Sent at once: the THR is empty again.
                self.thre_pending = true;
                self.update_irq();
            }
            1 if dlab => self.divisor = (self.divisor & 0x00ff) | (v as u16) << 8,
            1 => {
                self.flush_out();
                let enabling_thre = v & IER_THRE != 0 && self.ier & IER_THRE == 0;
                self.ier = v & 0x0f;
                if enabling_thre {
                    self.thre_pending = true; // THR is empty: enabling ETBEI interrupts at once
                }
                self.update_irq();
            }
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
        self.flush_out();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// stdout as the guest's output reaches it: each write(2) is one element.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn uart() -> (Serial, Writes) {
        let writes = Writes::default();
        let serial = Serial::new(Box::new(writes.clone()), RxQueue::default(), IrqLine::new(|_| {}));
        (serial, writes)
    }

    /// What Linux's console does per byte: poll LSR until THR is empty, then write THR.
    fn console_byte(s: &mut Serial, b: u8) {
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & LSR_THR_EMPTY, 0);
        s.write(0, &[b]);
    }

    #[test]
    fn a_console_line_is_one_write_and_a_poll_or_ier_write_flushes_the_rest() {
        let (mut s, writes) = uart();
        for &b in b"hello\n" {
            console_byte(&mut s, b);
        }
        assert_eq!(*writes.0.lock().unwrap(), vec![b"hello\n".to_vec()]);
        // A prompt, then the console's last LSR read: still batched.
        for &b in b"$ " {
            console_byte(&mut s, b);
        }
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(writes.0.lock().unwrap().len(), 1);
        // The guest keeps polling (for input): out it goes.
        s.read(5, &mut lsr);
        assert_eq!(writes.0.lock().unwrap()[1], b"$ ".to_vec());
        // The end of a console write restores IER: that flushes too.
        console_byte(&mut s, b'x');
        s.write(1, &[0]);
        assert_eq!(writes.0.lock().unwrap()[2], b"x".to_vec());
        // As does the vCPU halting (the engines flush the bus).
        console_byte(&mut s, b'y');
        Device::flush(&mut s);
        assert_eq!(writes.0.lock().unwrap()[3], b"y".to_vec());
        assert_eq!(writes.0.lock().unwrap().len(), 4);
    }
}
