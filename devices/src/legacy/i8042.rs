//! The i8042 keyboard controller, as much of it as Linux probes, plus the
//! one thing it is here for: the CPU reset line (command 0xFE), which is how
//! a guest booted with `reboot=k` ends the VM.

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

mod persist;
pub use persist::I8042State;

pub const DATA_PORT: u16 = 0x60;
pub const COMMAND_PORT: u16 = 0x64;

// Status register bits.
const SB_OUT_FULL: u8 = 0x01;
const SB_SYSTEM: u8 = 0x04;
const SB_LAST_WAS_COMMAND: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;

// Control register (command byte) bits.
const CB_KBD_INT: u8 = 0x01;
const CB_SYSTEM: u8 = 0x04;
const CB_KBD_DISABLED: u8 = 0x10;
const CB_AUX_DISABLED: u8 = 0x20;
const CB_TRANSLATE: u8 = 0x40;

// Controller commands (port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_OUTBUF: u8 = 0xd2;
const CMD_WRITE_AUX_OUTBUF: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

// Keyboard commands and replies (port 0x60).
const KBD_RESET: u8 = 0xff;
const KBD_IDENTIFY: u8 = 0xf2;
const KBD_ECHO: u8 = 0xee;
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_OK: u8 = 0xaa;

/// At most this many bytes wait in the output buffer (more is a guest bug).
const OUT_BUFFER_MAX: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum I8042Error {
    #[error("saved i8042 state has {0} bytes in its output buffer (at most {OUT_BUFFER_MAX})")]
    OutBufferTooLong(usize),
    #[error("saved i8042 state waits for the data byte of {0:#04x}, which is not a command that takes one")]
    BadPendingCommand(u8),
}

/// Controller commands whose argument the guest writes next to port 0x60.
fn takes_data(cmd: u8) -> bool {
    matches!(
        cmd,
        CMD_WRITE_CTR
            | CMD_WRITE_OUTPUT_PORT
            | CMD_WRITE_KBD_OUTBUF
            | CMD_WRITE_AUX_OUTBUF
            | CMD_WRITE_AUX
    )
}

pub struct I8042 {
    irq: EventFd,
    reset: EventFd,
    status: u8,
    control: u8,
    out: VecDeque<u8>,
    /// A controller command waiting for its data byte on port 0x60.
    pending: Option<u8>,
}

impl I8042 {
    /// `irq` is raised for keyboard data; `reset` is written when the guest
    /// pulses the CPU reset line.
    pub fn new(irq: EventFd, reset: EventFd) -> Self {
        I8042 {
            irq,
            reset,
            status: SB_SYSTEM | SB_KBD_ENABLED,
            control: CB_KBD_INT | CB_SYSTEM | CB_AUX_DISABLED | CB_TRANSLATE,
            out: VecDeque::new(),
            pending: None,
        }
    }

    pub fn read(&mut self, port: u16) -> u8 {
        match port {
            DATA_PORT => {
                let b = self.out.pop_front().unwrap_or(0);
                self.sync_status();
                if !self.out.is_empty() {
                    self.raise_irq();
                }
                b
            }
            COMMAND_PORT => self.status,
            _ => 0xff,
        }
    }

    pub fn write(&mut self, port: u16, value: u8) {
        match port {
            COMMAND_PORT => {
                self.status |= SB_LAST_WAS_COMMAND;
                self.command(value);
            }
            DATA_PORT => {
                self.status &= !SB_LAST_WAS_COMMAND;
                match self.pending.take() {
                    Some(CMD_WRITE_CTR) => {
                        self.control = value;
                        if value & CB_SYSTEM != 0 {
                            self.status |= SB_SYSTEM;
                        }
                    }
                    // Bit 0 of the output port is the CPU reset line (active low).
                    Some(CMD_WRITE_OUTPUT_PORT) if value & 1 == 0 => self.signal_reset(),
                    // Loopback: the byte comes back as if the keyboard sent it.
                    Some(CMD_WRITE_KBD_OUTBUF) => self.push(value),
                    // There is no aux device: its bytes go nowhere.
                    Some(_) => {}
                    None => self.keyboard_command(value),
                }
            }
            _ => {}
        }
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            CMD_READ_CTR => self.push(self.control),
            c if takes_data(c) => self.pending = Some(c),
            // A20 on, reset line not asserted.
            CMD_READ_OUTPUT_PORT => self.push(0x03),
            CMD_SELF_TEST => self.push(0x55),
            CMD_KBD_TEST => self.push(0x00),
            // No mouse: the aux port fails its test.
            CMD_AUX_TEST => self.push(0xff),
            CMD_KBD_DISABLE => self.control |= CB_KBD_DISABLED,
            CMD_KBD_ENABLE => self.control &= !CB_KBD_DISABLED,
            CMD_AUX_DISABLE => self.control |= CB_AUX_DISABLED,
            // No aux port: it stays disabled, which is how a driver sees it
            // is absent.
            CMD_AUX_ENABLE => {}
            CMD_RESET_CPU => self.signal_reset(),
            other => log::debug!("i8042: ignoring controller command {other:#04x}"),
        }
    }

    fn signal_reset(&self) {
        log::info!("i8042: the guest asked for a CPU reset");
        if let Err(e) = self.reset.write(1) {
            log::error!("i8042: cannot signal the CPU reset: {e}");
        }
    }

    fn keyboard_command(&mut self, cmd: u8) {
        match cmd {
            KBD_RESET => {
                self.out.clear();
                self.push(KBD_ACK);
                self.push(KBD_SELF_TEST_OK);
            }
            KBD_IDENTIFY => {
                self.push(KBD_ACK);
                self.push(0xab);
                self.push(0x83);
            }
            KBD_ECHO => self.push(KBD_ECHO),
            // LEDs, rates, scan sets, enable/disable scanning, and their
            // argument bytes: acknowledge everything.
            _ => self.push(KBD_ACK),
        }
    }

    fn push(&mut self, b: u8) {
        if self.out.len() < OUT_BUFFER_MAX {
            self.out.push_back(b);
        }
        self.sync_status();
        self.raise_irq();
    }

    fn sync_status(&mut self) {
        if self.out.is_empty() {
            self.status &= !SB_OUT_FULL;
        } else {
            self.status |= SB_OUT_FULL;
        }
    }

    fn raise_irq(&self) {
        if self.control & CB_KBD_INT != 0 {
            if let Err(e) = self.irq.write(1) {
                log::warn!("i8042: cannot raise IRQ 1: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Persist;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn dev() -> (I8042, EventFd, EventFd) {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let reset = EventFd::new(EFD_NONBLOCK).unwrap();
        let k = I8042::new(irq.try_clone().unwrap(), reset.try_clone().unwrap());
        (k, irq, reset)
    }

    #[test]
    fn linux_probe_sequence() {
        let (mut k, irq, _) = dev();
        // i8042_flush: nothing pending.
        assert_eq!(k.read(COMMAND_PORT) & SB_OUT_FULL, 0);
        // Read the control register.
        k.write(COMMAND_PORT, CMD_READ_CTR);
        assert_ne!(k.read(COMMAND_PORT) & SB_OUT_FULL, 0);
        let ctr = k.read(DATA_PORT);
        assert_eq!(ctr & CB_KBD_INT, CB_KBD_INT);
        assert_eq!(irq.read().unwrap(), 1);
        // Self test and keyboard interface test.
        k.write(COMMAND_PORT, CMD_SELF_TEST);
        assert_eq!(k.read(DATA_PORT), 0x55);
        k.write(COMMAND_PORT, CMD_KBD_TEST);
        assert_eq!(k.read(DATA_PORT), 0x00);
        // Write the control register back with interrupts off.
        k.write(COMMAND_PORT, CMD_WRITE_CTR);
        k.write(DATA_PORT, ctr & !CB_KBD_INT);
        let _ = irq.read(); // what the tests above raised
        k.write(COMMAND_PORT, CMD_READ_CTR);
        assert_eq!(k.read(DATA_PORT), ctr & !CB_KBD_INT);
        assert!(irq.read().is_err(), "no IRQ with interrupts off");
    }

    #[test]
    fn keyboard_replies() {
        let (mut k, _, _) = dev();
        k.write(DATA_PORT, KBD_RESET);
        assert_eq!(
            (k.read(DATA_PORT), k.read(DATA_PORT)),
            (KBD_ACK, KBD_SELF_TEST_OK)
        );
        k.write(DATA_PORT, KBD_IDENTIFY);
        assert_eq!(
            [k.read(DATA_PORT), k.read(DATA_PORT), k.read(DATA_PORT)],
            [KBD_ACK, 0xab, 0x83]
        );
        k.write(DATA_PORT, 0xed); // set LEDs
        k.write(DATA_PORT, 0x07);
        assert_eq!((k.read(DATA_PORT), k.read(DATA_PORT)), (KBD_ACK, KBD_ACK));
        assert_eq!(k.read(COMMAND_PORT) & SB_OUT_FULL, 0);
        // A flood never grows the buffer past its bound.
        for _ in 0..100 {
            k.write(DATA_PORT, 0xf4);
        }
        assert_eq!(k.save().out_buffer.len(), OUT_BUFFER_MAX);
    }

    #[test]
    fn reset_line() {
        let (mut k, _, reset) = dev();
        assert!(reset.read().is_err());
        k.write(COMMAND_PORT, CMD_RESET_CPU);
        assert_eq!(reset.read().unwrap(), 1);
    }

    #[test]
    fn save_restore_mid_command() {
        let (mut k, _, _) = dev();
        k.write(DATA_PORT, KBD_IDENTIFY); // three bytes waiting
        k.write(COMMAND_PORT, CMD_WRITE_CTR); // its data byte not yet written
        let st = k.save();
        assert_eq!(st.pending_command, Some(CMD_WRITE_CTR));
        let fds = || EventFd::new(EFD_NONBLOCK).unwrap();
        let mut r = I8042::restore((fds(), fds()), &st).unwrap();
        assert_eq!(r.save(), st);
        r.write(DATA_PORT, 0x45);
        r.write(COMMAND_PORT, CMD_READ_CTR);
        let mut last = 0;
        while r.read(COMMAND_PORT) & SB_OUT_FULL != 0 {
            last = r.read(DATA_PORT);
        }
        assert_eq!(last, 0x45);
        let mut bad = st.clone();
        bad.out_buffer = vec![0; 17];
        assert!(matches!(
            I8042::restore((fds(), fds()), &bad),
            Err(I8042Error::OutBufferTooLong(17))
        ));
        let mut bad = st;
        bad.pending_command = Some(CMD_SELF_TEST);
        assert!(matches!(
            I8042::restore((fds(), fds()), &bad),
            Err(I8042Error::BadPendingCommand(CMD_SELF_TEST))
        ));
    }

    #[test]
    fn restore_reraises_irq_for_waiting_bytes() {
        let (mut k, _, _) = dev();
        k.write(COMMAND_PORT, CMD_SELF_TEST);
        let st = k.save();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let reset = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut r = I8042::restore((irq.try_clone().unwrap(), reset), &st).unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        assert_ne!(r.read(COMMAND_PORT) & SB_OUT_FULL, 0);
        assert_eq!(r.read(DATA_PORT), 0x55);
    }

    #[test]
    fn enable_disable_and_no_aux() {
        let (mut k, _, _) = dev();
        let ctr = |k: &mut I8042| {
            k.write(COMMAND_PORT, CMD_READ_CTR);
            k.read(DATA_PORT)
        };
        k.write(COMMAND_PORT, CMD_KBD_DISABLE);
        assert_ne!(ctr(&mut k) & CB_KBD_DISABLED, 0);
        k.write(COMMAND_PORT, CMD_KBD_ENABLE);
        assert_eq!(ctr(&mut k) & CB_KBD_DISABLED, 0);
        // The aux port never comes up.
        k.write(COMMAND_PORT, CMD_AUX_ENABLE);
        assert_ne!(ctr(&mut k) & CB_AUX_DISABLED, 0);
        k.write(COMMAND_PORT, CMD_AUX_DISABLE);
        assert_ne!(ctr(&mut k) & CB_AUX_DISABLED, 0);
        // Keyboard loopback through the controller.
        k.write(COMMAND_PORT, CMD_WRITE_KBD_OUTBUF);
        k.write(DATA_PORT, 0x1c);
        assert_eq!(k.read(DATA_PORT), 0x1c);
        // Scanning on/off and typematic rate with its argument: all ACKed.
        for b in [0xf5, 0xf4, 0xf3, 0x20] {
            k.write(DATA_PORT, b);
            assert_eq!(k.read(DATA_PORT), KBD_ACK);
        }
        // Reads with nothing waiting are harmless.
        assert_eq!(k.read(COMMAND_PORT) & SB_OUT_FULL, 0);
        let _ = k.read(DATA_PORT);
        let _ = k.read(0x61);
        k.write(0x61, 0xff);
    }

    #[test]
    fn output_port_reset_line() {
        let (mut k, _, reset) = dev();
        k.write(COMMAND_PORT, CMD_WRITE_OUTPUT_PORT);
        k.write(DATA_PORT, 0x03); // reset not asserted
        assert!(reset.read().is_err());
        k.write(COMMAND_PORT, CMD_WRITE_OUTPUT_PORT);
        k.write(DATA_PORT, 0x02); // bit 0 low: reset
        assert_eq!(reset.read().unwrap(), 1);
    }
}
