//! Legacy PC devices on I/O ports.

pub mod i8042;
pub mod rtc;
pub mod serial;

pub use i8042::{I8042Error, I8042State, I8042};
pub use rtc::{Rtc, RtcError, RtcState};
pub use serial::{Serial, SerialError, SerialState};
