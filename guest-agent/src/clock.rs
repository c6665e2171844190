//! The guest's wall clock, set from the CMOS RTC as the agent starts.
//!
//! The kernel reads the RTC early in boot, then keeps time itself; while
//! the guest kernel is interpreted (hosts without hardware virtualization)
//! it loses seconds over the boot (6-10 s over 90 s, measured). Reading the
//! RTC again here (the VMM's RTC shows the host's time) puts the clock
//! right within half a second, for a few port reads and one system call.

use crate::init::say;
use crate::sys;

/// RTC registers: seconds, minutes, hours, day, month, year, century.
const TIME_REGS: [u8; 7] = [0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32];
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const A_UIP: u8 = 0x80;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;

fn from_bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 0x0f)
}

/// Days from 1970-01-01 to the given civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix time from the time registers (in TIME_REGS order) and register B.
pub fn rtc_to_unix(regs: [u8; 7], b: u8) -> Option<i64> {
    let conv = |v: u8| if b & B_BINARY != 0 { v } else { from_bcd(v) };
    let [sec, min, hour_raw, day, month, year, century] = regs;
    let pm = b & B_24H == 0 && hour_raw & 0x80 != 0;
    let mut hour = conv(hour_raw & 0x7f);
    if b & B_24H == 0 {
        hour = hour % 12 + if pm { 12 } else { 0 };
    }
    let (sec, min, day, month) = (conv(sec), conv(min), conv(day), conv(month));
    let century = match conv(century) {
        c @ 19..=99 => i64::from(c),
        _ => 20,
    };
    let year = century * 100 + i64::from(conv(year));
    if sec > 59 || min > 59 || hour > 23 || !(1..=31).contains(&day) || !(1..=12).contains(&month) {
        return None;
    }
    let days = days_from_civil(year, i64::from(month), i64::from(day));
    Some(days * 86_400 + i64::from(hour) * 3600 + i64::from(min) * 60 + i64::from(sec))
}

/// Sets the wall clock from the RTC; problems are reported, not fatal.
pub fn set_from_rtc() {
    let read = || -> std::io::Result<Option<i64>> {
        let mut last = None;
        // Read until two reads agree and no update was in progress: a
        // second may tick between the registers.
        for _ in 0..4 {
            let mut regs = [REG_A, REG_B, 0, 0, 0, 0, 0, 0, 0];
            regs[2..].copy_from_slice(&TIME_REGS);
            let v = sys::read_cmos(&regs)?;
            if v[0] & A_UIP != 0 {
                continue;
            }
            let mut time = [0u8; 7];
            time.copy_from_slice(&v[2..]);
            let now = rtc_to_unix(time, v[1]);
            if now.is_some() && now == last {
                return Ok(now);
            }
            last = now;
        }
        Ok(last)
    };
    match read() {
        Ok(Some(secs)) => {
            // The RTC shows whole seconds: the middle of the second it
            // shows is the best guess (off by half a second at most).
            if let Err(e) = sys::set_realtime(secs, 500_000_000) {
                say(format!("cannot set the clock: {e}"));
            }
        }
        Ok(None) => say("the RTC shows no valid time; the clock is left as the kernel set it"),
        // No ioperm (another kernel) or no RTC: the kernel's time stands.
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bcd_and_binary_times_convert() {
        // 2026-11-24 07:43:04 UTC = 1795506184.
        let bcd = [0x04, 0x43, 0x07, 0x24, 0x11, 0x26, 0x20];
        assert_eq!(rtc_to_unix(bcd, B_24H), Some(1_795_506_184));
        let bin = [4, 43, 7, 24, 11, 26, 20];
        assert_eq!(rtc_to_unix(bin, B_24H | B_BINARY), Some(1_795_506_184));
        // 12-hour mode: 7 PM.
        let pm = [0, 0, 0x87, 1, 1, 0x70, 0x19];
        assert_eq!(rtc_to_unix(pm, 0), Some(19 * 3600));
        assert_eq!(rtc_to_unix([0, 0, 0, 1, 1, 0x70, 0x19], B_24H), Some(0));
        assert_eq!(rtc_to_unix([0x60, 0, 0, 1, 1, 0, 0x20], B_24H), None);
        assert_eq!(rtc_to_unix([0, 0, 0, 0, 1, 0, 0x20], B_24H), None);
    }

    #[test]
    fn leap_days_count() {
        assert_eq!(
            days_from_civil(2000, 3, 1) - days_from_civil(2000, 2, 28),
            2
        );
        assert_eq!(days_from_civil(1970, 1, 1), 0);
    }
}
