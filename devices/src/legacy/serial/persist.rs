//! Saved state of the serial port.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState as SuperioState};
use vmm_sys_util::eventfd::EventFd;

use super::{map_err, IrqTrigger, Serial, SerialError, FIFO_SIZE};
use crate::Persist;

/// Every register of the UART, and input the guest has not read yet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Received bytes the guest has not read, oldest first.
    pub in_buffer: Vec<u8>,
}

const LSR_DATA_READY: u8 = 0x01;
/// IIR values the UART model produces: no interrupt, THR empty, data available.
const IIR_VALID: [u8; 3] = [0x01, 0x02, 0x04];
/// IER bits of a 16550A.
const IER_VALID_BITS: u8 = 0x0f;

impl SerialState {
    fn validate(&self) -> Result<(), SerialError> {
        if self.in_buffer.len() > FIFO_SIZE {
            return Err(SerialError::InputTooLong(self.in_buffer.len()));
        }
        if (self.line_status & LSR_DATA_READY != 0) == self.in_buffer.is_empty() {
            return Err(SerialError::BadState(
                "the line status's data-ready bit disagrees with the unread input",
            ));
        }
        if !IIR_VALID.contains(&self.interrupt_identification) {
            return Err(SerialError::BadState(
                "the interrupt identification register holds an impossible value",
            ));
        }
        if self.interrupt_enable & !IER_VALID_BITS != 0 {
            return Err(SerialError::BadState(
                "the interrupt enable register has bits a 16550A does not have",
            ));
        }
        Ok(())
    }
}

impl Persist for Serial {
    type State = SerialState;
    /// The interrupt eventfd and where guest output goes.
    type ConstructorArgs = (EventFd, Box<dyn Write + Send>);
    type Error = SerialError;

    fn save(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Builds a UART in the saved state; re-raises its interrupt if one was
    /// pending and enabled.
    fn restore((irq, out): Self::ConstructorArgs, s: &SerialState) -> Result<Self, SerialError> {
        s.validate()?;
        let state = SuperioState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let uart = vm_superio::Serial::from_state(&state, IrqTrigger(irq), NoEvents, out)
            .map_err(map_err)?;
        Ok(Serial { uart })
    }
}
