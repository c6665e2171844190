//! The CMOS real-time clock (a Motorola MC146818) behind ports 0x70 (index)
//! and 0x71 (data): where x86 Linux reads the wall-clock time at boot,
//! before any driver, so a guest starts at the host's time instead of 1970.
//!
//! The time it shows is the host's UTC time plus an offset the guest can
//! change by writing the time registers; the offset is what a snapshot
//! keeps, so a restored guest's RTC still reads real time. No interrupts
//! (periodic, alarm, update) are generated: Linux reads the time and needs
//! none.

use chrono::{DateTime, Datelike, NaiveDate, Timelike};

mod persist;
pub use persist::{RtcError, RtcState};

/// Bytes of CMOS memory, time and control registers included.
pub const CMOS_SIZE: usize = 128;

/// Register indices.
pub mod reg {
    pub const SECONDS: u8 = 0x00;
    pub const MINUTES: u8 = 0x02;
    pub const HOURS: u8 = 0x04;
    pub const WEEKDAY: u8 = 0x06;
    pub const DAY: u8 = 0x07;
    pub const MONTH: u8 = 0x08;
    pub const YEAR: u8 = 0x09;
    pub const A: u8 = 0x0a;
    pub const B: u8 = 0x0b;
    pub const C: u8 = 0x0c;
    pub const D: u8 = 0x0d;
    /// The century, where ACPI's FADT usually points.
    pub const CENTURY: u8 = 0x32;
}

/// The registers that show the time.
const TIME_REGS: [u8; 7] = [
    reg::SECONDS,
    reg::MINUTES,
    reg::HOURS,
    reg::WEEKDAY,
    reg::DAY,
    reg::MONTH,
    reg::YEAR,
];

/// Register A: update in progress (never, here).
const A_UIP: u8 = 0x80;
/// Register A at reset: 32.768 kHz time base, 1024 Hz rate.
const A_RESET: u8 = 0x26;
/// Register B: updates frozen while the guest sets the time.
const B_SET: u8 = 0x80;
/// Register B: binary values instead of BCD.
const B_BINARY: u8 = 0x04;
/// Register B: 24-hour mode.
const B_24H: u8 = 0x02;
/// Register D: the time and memory are valid (the battery is good).
const D_VRT: u8 = 0x80;

/// Host UTC time in seconds.
pub type Clock = fn() -> i64;

/// The host's clock: what production RTCs run on.
pub fn system_clock() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A broken-down UTC time, as the time registers hold it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fields {
    second: u32,
    minute: u32,
    hour: u32,
    day: u32,
    month: u32,
    year: i32,
}

impl Fields {
    fn at(secs: i64) -> Self {
        let t = DateTime::from_timestamp(secs, 0).unwrap_or_default();
        Fields {
            second: t.second(),
            minute: t.minute(),
            hour: t.hour(),
            day: t.day(),
            month: t.month(),
            year: t.year(),
        }
    }

    /// Seconds since the epoch, or None for a date that does not exist.
    fn timestamp(&self) -> Option<i64> {
        let t = NaiveDate::from_ymd_opt(self.year, self.month, self.day)?.and_hms_opt(
            self.hour,
            self.minute,
            self.second,
        )?;
        Some(t.and_utc().timestamp())
    }

    fn weekday(&self) -> u32 {
        NaiveDate::from_ymd_opt(self.year, self.month, self.day)
            .map_or(1, |d| d.weekday().number_from_sunday())
    }
}

pub struct Rtc {
    index: u8,
    cmos: [u8; CMOS_SIZE],
    /// Guest time minus host time, in seconds.
    offset: i64,
    clock: Clock,
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

impl Rtc {
    /// An RTC showing the host's time.
    pub fn new() -> Self {
        Self::with_clock(system_clock)
    }

    /// An RTC on another clock (tests).
    pub fn with_clock(clock: Clock) -> Self {
        let mut cmos = [0u8; CMOS_SIZE];
        cmos[usize::from(reg::A)] = A_RESET;
        cmos[usize::from(reg::B)] = B_24H;
        Rtc {
            index: 0,
            cmos,
            offset: 0,
            clock,
        }
    }

    fn now(&self) -> Fields {
        Fields::at((self.clock)().saturating_add(self.offset))
    }

    fn binary(&self) -> bool {
        self.cmos[usize::from(reg::B)] & B_BINARY != 0
    }

    fn encode(&self, v: u32) -> u8 {
        let v = (v % 100) as u8;
        if self.binary() {
            v
        } else {
            (v / 10) << 4 | (v % 10)
        }
    }

    fn decode(&self, v: u8) -> u32 {
        if self.binary() {
            u32::from(v)
        } else {
            u32::from(v >> 4) * 10 + u32::from(v & 0x0f)
        }
    }

    fn encode_hour(&self, hour: u32) -> u8 {
        if self.cmos[usize::from(reg::B)] & B_24H != 0 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { 0x80 } else { 0 };
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(h12) | pm
    }

    fn decode_hour(&self, v: u8) -> u32 {
        if self.cmos[usize::from(reg::B)] & B_24H != 0 {
            return self.decode(v);
        }
        let h = self.decode(v & 0x7f) % 12;
        if v & 0x80 != 0 {
            h + 12
        } else {
            h
        }
    }

    /// The time registers' values for `f`.
    fn registers(&self, f: &Fields) -> [(u8, u8); 7] {
        [
            (reg::SECONDS, self.encode(f.second)),
            (reg::MINUTES, self.encode(f.minute)),
            (reg::HOURS, self.encode_hour(f.hour)),
            (reg::WEEKDAY, self.encode(f.weekday())),
            (reg::DAY, self.encode(f.day)),
            (reg::MONTH, self.encode(f.month)),
            (reg::YEAR, self.encode(f.year.rem_euclid(100) as u32)),
        ]
    }

    /// The time the time registers in CMOS memory hold (while SET).
    fn latched(&self) -> Fields {
        let r = |i: u8| self.cmos[usize::from(i)];
        let century = self.decode(r(reg::CENTURY)) as i32;
        Fields {
            second: self.decode(r(reg::SECONDS)),
            minute: self.decode(r(reg::MINUTES)),
            hour: self.decode_hour(r(reg::HOURS)),
            day: self.decode(r(reg::DAY)),
            month: self.decode(r(reg::MONTH)),
            year: century * 100 + self.decode(r(reg::YEAR)) as i32,
        }
    }

    /// Copies the running time into CMOS memory, as the chip does when
    /// the guest freezes updates.
    fn latch(&mut self) {
        let f = self.now();
        for (i, v) in self.registers(&f) {
            self.cmos[usize::from(i)] = v;
        }
        self.cmos[usize::from(reg::CENTURY)] = self.encode((f.year / 100) as u32);
    }

    /// Starts the clock from the time the guest set; a date that does not
    /// exist leaves the time as it was.
    fn set_from_latched(&mut self) {
        match self.latched().timestamp() {
            Some(t) => self.offset = t - (self.clock)(),
            None => log::debug!("rtc: the guest set an invalid date; time unchanged"),
        }
    }

    /// A guest read of port 0x70 + `offset`.
    pub fn read(&mut self, offset: u8) -> u8 {
        if offset == 0 {
            return self.index;
        }
        let index = self.index & 0x7f;
        let frozen = self.cmos[usize::from(reg::B)] & B_SET != 0;
        match index {
            reg::A => self.cmos[usize::from(reg::A)] & !A_UIP,
            reg::C => std::mem::take(&mut self.cmos[usize::from(reg::C)]),
            reg::D => D_VRT,
            reg::CENTURY if !frozen => self.encode((self.now().year / 100) as u32),
            i if TIME_REGS.contains(&i) => {
                if frozen {
                    self.cmos[usize::from(i)]
                } else {
                    let f = self.now();
                    self.registers(&f)
                        .iter()
                        .find(|(r, _)| *r == i)
                        .map_or(0, |&(_, v)| v)
                }
            }
            i => self.cmos[usize::from(i)],
        }
    }

    /// A guest write of `v` to port 0x70 + `offset`.
    pub fn write(&mut self, offset: u8, v: u8) {
        if offset == 0 {
            // Bit 7 masks NMIs on a PC; the index is the low 7 bits.
            self.index = v;
            return;
        }
        let index = self.index & 0x7f;
        match index {
            reg::A => self.cmos[usize::from(reg::A)] = v & !A_UIP,
            reg::B => {
                let was_set = self.cmos[usize::from(reg::B)] & B_SET != 0;
                if !was_set && v & B_SET != 0 {
                    self.latch();
                }
                self.cmos[usize::from(reg::B)] = v;
                if was_set && v & B_SET == 0 {
                    self.set_from_latched();
                }
            }
            reg::C | reg::D => {}
            i if TIME_REGS.contains(&i) || i == reg::CENTURY => {
                let frozen = self.cmos[usize::from(reg::B)] & B_SET != 0;
                if !frozen {
                    self.latch();
                }
                self.cmos[usize::from(i)] = v;
                if !frozen {
                    self.set_from_latched();
                }
            }
            i => self.cmos[usize::from(i)] = v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-24 06:30:45 UTC, a Tuesday.
    fn fixed() -> i64 {
        1_795_501_845
    }

    fn read(rtc: &mut Rtc, i: u8) -> u8 {
        rtc.write(0, i);
        rtc.read(1)
    }

    fn write(rtc: &mut Rtc, i: u8, v: u8) {
        rtc.write(0, i);
        rtc.write(1, v);
    }

    #[test]
    fn shows_the_host_time_in_bcd_24h() {
        let mut rtc = Rtc::with_clock(fixed);
        assert_eq!(Fields::at(fixed()).year, 2026);
        assert_eq!(read(&mut rtc, reg::SECONDS), 0x45);
        assert_eq!(read(&mut rtc, reg::MINUTES), 0x30);
        assert_eq!(read(&mut rtc, reg::HOURS), 0x06);
        assert_eq!(read(&mut rtc, reg::DAY), 0x24);
        assert_eq!(read(&mut rtc, reg::MONTH), 0x11);
        assert_eq!(read(&mut rtc, reg::YEAR), 0x26);
        assert_eq!(read(&mut rtc, reg::CENTURY), 0x20);
        assert_eq!(read(&mut rtc, reg::WEEKDAY), 0x03, "Tuesday, Sunday = 1");
        assert_eq!(read(&mut rtc, reg::A) & A_UIP, 0, "never mid-update");
        assert_eq!(read(&mut rtc, reg::D), D_VRT, "valid time");
        // The NMI-mask bit of the index does not change the register.
        assert_eq!(read(&mut rtc, 0x80 | reg::MINUTES), 0x30);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let mut rtc = Rtc::with_clock(|| fixed() + 12 * 3600);
        write(&mut rtc, reg::B, B_BINARY);
        assert_eq!(read(&mut rtc, reg::HOURS), 0x80 | 6, "6 PM");
        assert_eq!(read(&mut rtc, reg::MONTH), 11);
        write(&mut rtc, reg::B, B_BINARY | B_24H);
        assert_eq!(read(&mut rtc, reg::HOURS), 18);
    }

    #[test]
    fn the_guest_sets_the_time_with_updates_frozen() {
        let mut rtc = Rtc::with_clock(fixed);
        // As Linux's mc146818_set_time: SET, every field, SET cleared.
        write(&mut rtc, reg::B, B_SET | B_24H);
        write(&mut rtc, reg::YEAR, 0x30);
        write(&mut rtc, reg::MONTH, 0x02);
        write(&mut rtc, reg::DAY, 0x28);
        write(&mut rtc, reg::HOURS, 0x23);
        write(&mut rtc, reg::MINUTES, 0x59);
        write(&mut rtc, reg::SECONDS, 0x58);
        assert_eq!(read(&mut rtc, reg::YEAR), 0x30, "frozen: the set value");
        write(&mut rtc, reg::B, B_24H);
        let want = Fields {
            second: 58,
            minute: 59,
            hour: 23,
            day: 28,
            month: 2,
            year: 2030,
        };
        assert_eq!(rtc.offset, want.timestamp().unwrap() - fixed());
        assert_eq!(read(&mut rtc, reg::DAY), 0x28);
        // A field written while running moves the clock by that field.
        write(&mut rtc, reg::MINUTES, 0x00);
        assert_eq!(read(&mut rtc, reg::MINUTES), 0x00);
        assert_eq!(read(&mut rtc, reg::HOURS), 0x23);
    }

    #[test]
    fn an_impossible_date_leaves_the_time_alone() {
        let mut rtc = Rtc::with_clock(fixed);
        write(&mut rtc, reg::B, B_SET | B_24H);
        write(&mut rtc, reg::MONTH, 0x02);
        write(&mut rtc, reg::DAY, 0x31);
        write(&mut rtc, reg::B, B_24H);
        assert_eq!(rtc.offset, 0);
        // Garbage that is not BCD does not panic either.
        write(&mut rtc, reg::SECONDS, 0xff);
        write(&mut rtc, reg::HOURS, 0xff);
        let _ = read(&mut rtc, reg::HOURS);
    }

    #[test]
    fn cmos_memory_keeps_what_is_written() {
        let mut rtc = Rtc::with_clock(fixed);
        write(&mut rtc, 0x40, 0xab);
        assert_eq!(read(&mut rtc, 0x40), 0xab);
        write(&mut rtc, reg::D, 0);
        assert_eq!(read(&mut rtc, reg::D), D_VRT, "read-only");
    }
}
