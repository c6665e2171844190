//! Saved state of the i8042.

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::{takes_data, I8042Error, I8042, OUT_BUFFER_MAX};
use crate::Persist;

/// The controller's registers, its output buffer and any half-done command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// Status register (port 0x64 reads); its output-buffer-full bit is
    /// recomputed from `out_buffer` on restore.
    pub status: u8,
    /// The controller command byte.
    pub control: u8,
    /// Bytes waiting for the guest on port 0x60, oldest first.
    pub out_buffer: Vec<u8>,
    /// A controller command still waiting for its data byte.
    pub pending_command: Option<u8>,
}

impl Persist for I8042 {
    type State = I8042State;
    /// The IRQ 1 eventfd and the CPU reset eventfd.
    type ConstructorArgs = (EventFd, EventFd);
    type Error = I8042Error;

    fn save(&self) -> I8042State {
        I8042State {
            status: self.status,
            control: self.control,
            out_buffer: self.out.iter().copied().collect(),
            pending_command: self.pending,
        }
    }

    /// Builds a controller in the saved state; if bytes are waiting and
    /// keyboard interrupts are on, raises IRQ 1 again (the guest's handler
    /// copes with an extra interrupt, not with a lost one).
    fn restore((irq, reset): (EventFd, EventFd), s: &I8042State) -> Result<Self, I8042Error> {
        if s.out_buffer.len() > OUT_BUFFER_MAX {
            return Err(I8042Error::OutBufferTooLong(s.out_buffer.len()));
        }
        if let Some(cmd) = s.pending_command.filter(|&c| !takes_data(c)) {
            return Err(I8042Error::BadPendingCommand(cmd));
        }
        let mut k = I8042::new(irq, reset);
        k.status = s.status;
        k.control = s.control;
        k.out = s.out_buffer.iter().copied().collect();
        k.pending = s.pending_command;
        k.sync_status();
        if !k.out.is_empty() {
            k.raise_irq();
        }
        Ok(k)
    }
}
