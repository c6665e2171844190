//! Saved state of the RTC.

use serde::{Deserialize, Serialize};

use super::{Clock, Rtc, CMOS_SIZE};
use crate::Persist;

/// The RTC's registers and memory, and how far its time is from the host's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcState {
    pub index: u8,
    /// All 128 bytes of CMOS memory.
    pub cmos: Vec<u8>,
    /// Guest time minus host time, in seconds: kept, so the restored RTC
    /// still reads real time (plus whatever the guest set).
    pub offset_secs: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum RtcError {
    #[error("saved RTC memory is {0} bytes, not {CMOS_SIZE}")]
    CmosSize(usize),
}

impl Persist for Rtc {
    type State = RtcState;
    /// The host clock to run on.
    type ConstructorArgs = Clock;
    type Error = RtcError;

    fn save(&self) -> RtcState {
        RtcState {
            index: self.index,
            cmos: self.cmos.to_vec(),
            offset_secs: self.offset,
        }
    }

    fn restore(clock: Clock, s: &RtcState) -> Result<Self, RtcError> {
        let cmos = <[u8; CMOS_SIZE]>::try_from(s.cmos.as_slice())
            .map_err(|_| RtcError::CmosSize(s.cmos.len()))?;
        Ok(Rtc {
            index: s.index,
            cmos,
            offset: s.offset_secs,
            clock,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_memory_and_offset() {
        let mut rtc = Rtc::with_clock(|| 1_000_000_000);
        rtc.write(0, 0x40);
        rtc.write(1, 0x5a);
        rtc.offset = 3600;
        let s = rtc.save();
        let mut back = Rtc::restore(|| 1_000_000_000, &s).unwrap();
        assert_eq!(back.save(), s);
        assert_eq!(back.read(1), 0x5a);
        let mut bad = s.clone();
        bad.cmos.pop();
        assert!(matches!(
            Rtc::restore(|| 0, &bad),
            Err(RtcError::CmosSize(127))
        ));
    }
}
