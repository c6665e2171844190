//! The 16550 UART on COM1, built on vm-superio's register model.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

mod persist;
pub use persist::SerialState;

/// The UART's receive FIFO holds this many bytes.
pub const FIFO_SIZE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("serial input FIFO is full")]
    FifoFull,
    #[error("cannot raise the serial interrupt: {0}")]
    Interrupt(std::io::Error),
    #[error("cannot write serial output: {0}")]
    Output(std::io::Error),
    #[error(
        "saved serial state holds {0} bytes of unread input, more than the {FIFO_SIZE}-byte FIFO"
    )]
    InputTooLong(usize),
    #[error("saved serial state is inconsistent: {0}")]
    BadState(&'static str),
}

/// Raises the serial IRQ by writing an eventfd that KVM turns into an interrupt.
pub(crate) struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

type Uart = vm_superio::Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>;

pub struct Serial {
    uart: Uart,
}

impl Serial {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Serial {
            uart: vm_superio::Serial::new(IrqTrigger(irq), out),
        }
    }

    /// A register read at `offset` (0..=7) from the base port.
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// A register write; output errors (a closed stdout) are logged, not fatal.
    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.uart.write(offset, value) {
            log::debug!("serial write at offset {offset}: {e:?}");
        }
    }

    /// Queues console input for the guest; returns how many bytes fit (0
    /// when the FIFO is full: retry once the guest has read some).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> Result<usize, SerialError> {
        let n = bytes.len().min(self.input_space());
        if n == 0 {
            return Ok(0);
        }
        self.uart.enqueue_raw_bytes(&bytes[..n]).map_err(map_err)
    }

    /// Free room in the input FIFO.
    pub fn input_space(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

fn map_err(e: vm_superio::serial::Error<std::io::Error>) -> SerialError {
    match e {
        vm_superio::serial::Error::FullFifo => SerialError::FifoFull,
        vm_superio::serial::Error::Trigger(e) => SerialError::Interrupt(e),
        vm_superio::serial::Error::IOError(e) => SerialError::Output(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Persist;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const LSR: u8 = 5;
    const IER: u8 = 1;

    #[test]
    fn output_and_input() {
        let sink = Sink::default();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq.try_clone().unwrap(), Box::new(sink.clone()));
        for b in b"hi" {
            s.write(0, *b);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        assert_ne!(s.read(LSR) & 0x20, 0, "transmitter empty");
        s.write(IER, 1); // received-data interrupt on
        assert_eq!(s.enqueue_input(b"ab").unwrap(), 2);
        assert_eq!(irq.read().unwrap(), 1, "input raised the IRQ");
        assert_ne!(s.read(LSR) & 1, 0, "data ready");
        assert_eq!(s.read(0), b'a');
        assert_eq!(s.read(0), b'b');
        assert_eq!(s.read(LSR) & 1, 0);
    }

    #[test]
    fn fifo_limits_input() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq, Box::new(std::io::sink()));
        let big = vec![b'x'; 100];
        let n = s.enqueue_input(&big).unwrap();
        assert_eq!(n, 64);
        assert_eq!(s.input_space(), 0);
        assert_eq!(s.enqueue_input(b"y").unwrap(), 0);
    }

    #[test]
    fn save_restore_keeps_registers_and_unread_input() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq, Box::new(std::io::sink()));
        s.write(7, 0x5a); // scratch
        s.write(3, 0x03); // 8N1
        s.enqueue_input(b"xyz").unwrap();
        let st = s.save();
        let mut r = Serial::restore(
            (
                EventFd::new(EFD_NONBLOCK).unwrap(),
                Box::new(std::io::sink()),
            ),
            &st,
        )
        .unwrap();
        assert_eq!(r.save(), st);
        assert_eq!(r.read(7), 0x5a);
        assert_eq!(r.read(0), b'x');
        let restore = |st: &SerialState| {
            Serial::restore(
                (
                    EventFd::new(EFD_NONBLOCK).unwrap(),
                    Box::new(std::io::sink()),
                ),
                st,
            )
        };
        let mut bad = st.clone();
        bad.in_buffer = vec![0; 65];
        assert!(matches!(restore(&bad), Err(SerialError::InputTooLong(65))));
        let mut bad = st.clone();
        bad.in_buffer.clear(); // data-ready still set
        assert!(matches!(restore(&bad), Err(SerialError::BadState(_))));
        let mut bad = st.clone();
        bad.interrupt_identification = 0x0c;
        assert!(matches!(restore(&bad), Err(SerialError::BadState(_))));
    }

    #[test]
    fn divisor_latch_and_interrupt_identification() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq.try_clone().unwrap(), Box::new(std::io::sink()));
        s.write(3, 0x80); // DLAB on
        s.write(0, 0x0c); // 9600 baud
        s.write(1, 0x00);
        s.write(3, 0x03); // DLAB off, 8N1
        let st = s.save();
        assert_eq!((st.baud_divisor_low, st.baud_divisor_high), (0x0c, 0));
        assert_eq!(st.line_control, 0x03);
        // THR-empty interrupt: enabling it raises it, reading IIR clears it.
        s.write(IER, 0x02);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(s.read(2) & 0x0f, 0x02);
        assert_eq!(s.read(2) & 0x0f, 0x01, "no interrupt pending");
    }

    #[test]
    fn restore_reraises_pending_input_interrupt() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq, Box::new(std::io::sink()));
        s.write(IER, 0x01);
        s.enqueue_input(b"q").unwrap();
        let st = s.save();
        let irq2 = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut r =
            Serial::restore((irq2.try_clone().unwrap(), Box::new(std::io::sink())), &st).unwrap();
        assert_eq!(irq2.read().unwrap(), 1, "the guest still has input to read");
        assert_eq!(r.read(2) & 0x0f, 0x04);
        assert_eq!(r.read(0), b'q');
    }
}
