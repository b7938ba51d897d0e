//! The MC146818 real-time clock and its CMOS RAM (index port 0x70, data port 0x71): the wall
//! clock a kernel reads at boot. The time is the host's UTC plus whatever offset the guest set by
//! writing the time registers; the chip is in 24-hour BCD mode, never mid-update (UIP clear), and
//! its battery is good (VRT). The other CMOS bytes are plain RAM. No alarm or periodic interrupt
//! (IRQ 8) is modelled.

use super::{Action, Device};
use std::time::{SystemTime, UNIX_EPOCH};

pub const PORT: u64 = 0x70;

const SECONDS: usize = 0x00;
const MINUTES: usize = 0x02;
const HOURS: usize = 0x04;
const WEEKDAY: usize = 0x06;
const DAY: usize = 0x07;
const MONTH: usize = 0x08;
const YEAR: usize = 0x09;
const STATUS_A: usize = 0x0a;
const STATUS_B: usize = 0x0b;
const STATUS_C: usize = 0x0c;
const STATUS_D: usize = 0x0d;
const CENTURY: usize = 0x32;

/// Status A: 32.768 kHz time base, 1024 Hz rate; UIP (bit 7) never set.
const STATUS_A_VALUE: u8 = 0x26;
/// Status B: 24-hour mode, BCD; SET (bit 7) stops the clock while the guest writes the time.
const STATUS_B_24H: u8 = 0x02;
const STATUS_B_SET: u8 = 0x80;
/// Status D: valid RAM and time.
const STATUS_D_VRT: u8 = 0x80;

pub struct Rtc {
    index: usize,
    ram: [u8; 128],
    /// Guest time minus host time, seconds.
    offset: i64,
}

impl Default for Rtc {
    fn default() -> Self {
        let mut ram = [0u8; 128];
        ram[STATUS_A] = STATUS_A_VALUE;
        ram[STATUS_B] = STATUS_B_24H;
        ram[STATUS_D] = STATUS_D_VRT;
        Rtc {
            index: 0,
            ram,
            offset: 0,
        }
    }
}

fn bcd(v: u32) -> u8 {
    (((v / 10) << 4) | (v % 10)) as u8
}

fn from_bcd(v: u8) -> u32 {
    (v >> 4) as u32 * 10 + (v & 0xf) as u32
}

/// Days since 1970-01-01 to (year, month 1–12, day 1–31), proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Shift to 0000-03-01 so leap days fall at the end of a 400-year era.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + (month <= 2) as i64;
    (year, month, day)
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = month as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl Rtc {
    fn host_now() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    }

    /// Fills the time registers for `unix` seconds.
    fn show(&mut self, unix: i64) {
        let days = unix.div_euclid(86_400);
        let secs = unix.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        self.ram[SECONDS] = bcd(secs % 60);
        self.ram[MINUTES] = bcd(secs / 60 % 60);
        self.ram[HOURS] = bcd(secs / 3600);
        // 1 = Sunday; 1970-01-01 was a Thursday.
        self.ram[WEEKDAY] = bcd(((days + 4).rem_euclid(7) + 1) as u32);
        self.ram[DAY] = bcd(day);
        self.ram[MONTH] = bcd(month);
        self.ram[YEAR] = bcd(year.rem_euclid(100) as u32);
        self.ram[CENTURY] = bcd(year.div_euclid(100).clamp(0, 99) as u32);
    }

    /// The time the registers hold, as `unix` seconds.
    fn shown(&self) -> i64 {
        let year = from_bcd(self.ram[CENTURY]) as i64 * 100 + from_bcd(self.ram[YEAR]) as i64;
        let days = days_from_civil(
            year,
            from_bcd(self.ram[MONTH]).clamp(1, 12),
            from_bcd(self.ram[DAY]).clamp(1, 31),
        );
        days * 86_400
            + from_bcd(self.ram[HOURS]) as i64 * 3600
            + from_bcd(self.ram[MINUTES]) as i64 * 60
            + from_bcd(self.ram[SECONDS]) as i64
    }

    fn running(&self) -> bool {
        self.ram[STATUS_B] & STATUS_B_SET == 0
    }

    fn read_register(&mut self) -> u8 {
        if self.index <= YEAR || self.index == CENTURY {
            if self.running() {
                self.show(Self::host_now() + self.offset);
            }
        } else if self.index == STATUS_C {
            // Read-to-clear interrupt flags; none are ever raised.
            return 0;
        }
        self.ram[self.index]
    }

    fn write_register(&mut self, v: u8) {
        match self.index {
            STATUS_A => self.ram[STATUS_A] = v & 0x7f,
            STATUS_C | STATUS_D => {}
            STATUS_B => {
                let was_running = self.running();
                // 24-hour BCD is the only mode modelled.
                self.ram[STATUS_B] = (v & STATUS_B_SET) | STATUS_B_24H;
                if was_running && !self.running() {
                    self.show(Self::host_now() + self.offset);
                } else if !was_running && self.running() {
                    self.offset = self.shown() - Self::host_now();
                }
            }
            i if i <= YEAR || i == CENTURY => {
                if self.running() {
                    self.show(Self::host_now() + self.offset);
                }
                self.ram[i] = v;
                if self.running() {
                    self.offset = self.shown() - Self::host_now();
                }
            }
            i => self.ram[i] = v,
        }
    }
}

impl Device for Rtc {
    fn name(&self) -> &'static str {
        "rtc"
    }
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = if offset == 0 { 0xff } else { self.read_register() };
        data.fill(v);
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Action {
        let v = data.first().copied().unwrap_or(0);
        if offset == 0 {
            // Bit 7 is the NMI mask, not part of the index.
            self.index = (v & 0x7f) as usize;
        } else {
            self.write_register(v);
        }
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(rtc: &mut Rtc, index: u8) -> u8 {
        rtc.write(0, &[index]);
        let mut b = [0];
        rtc.read(1, &mut b);
        b[0]
    }

    #[test]
    fn calendar_conversion_round_trips() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_789), (2026, 12, 2));
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn the_clock_shows_host_utc_in_bcd() {
        let mut rtc = Rtc::default();
        let before = Rtc::host_now();
        let shown = {
            let _ = read(&mut rtc, SECONDS as u8);
            rtc.shown()
        };
        assert!((before..=before + 2).contains(&shown), "{shown} vs {before}");
        assert_eq!(read(&mut rtc, STATUS_A as u8) & 0x80, 0, "never mid-update");
        assert_eq!(read(&mut rtc, STATUS_D as u8), STATUS_D_VRT);
        assert_eq!(read(&mut rtc, 0x8b), STATUS_B_24H, "NMI-mask bit ignored in the index");
    }

    #[test]
    fn the_guest_sets_the_clock_with_set_held() {
        let mut rtc = Rtc::default();
        let w = |rtc: &mut Rtc, i: usize, v: u8| {
            rtc.write(0, &[i as u8]);
            rtc.write(1, &[v]);
        };
        w(&mut rtc, STATUS_B, STATUS_B_SET | STATUS_B_24H);
        for (i, v) in [
            (SECONDS, 0x00),
            (MINUTES, 0x30),
            (HOURS, 0x12),
            (DAY, 0x01),
            (MONTH, 0x01),
            (YEAR, 0x99),
            (CENTURY, 0x19),
        ] {
            w(&mut rtc, i, v);
        }
        w(&mut rtc, STATUS_B, STATUS_B_24H);
        assert_eq!(read(&mut rtc, YEAR as u8), 0x99);
        assert_eq!(read(&mut rtc, CENTURY as u8), 0x19);
        assert_eq!(read(&mut rtc, HOURS as u8), 0x12);
        // Plain CMOS RAM.
        w(&mut rtc, 0x40, 0xa5);
        assert_eq!(read(&mut rtc, 0x40), 0xa5);
    }
}
