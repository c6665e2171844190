//! Wires the devices to guest ports, MMIO windows and interrupt lines, and
//! dispatches vCPU accesses to them.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use devices::legacy::{Serial, I8042};
use devices::virtio::block::Block;
use devices::virtio::MmioTransport;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::layout::*;
use crate::kvm::vcpu::Bus;
use crate::kvm::vm::{Vm, VmError};
use crate::timeline::Timeline;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot open disk image {path}: {source}")]
    OpenDisk {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot set up virtio-blk on {path}: {reason}")]
    Block { path: String, reason: String },
    #[error(transparent)]
    Vm(#[from] VmError),
}

struct VirtioSlot {
    base: u64,
    transport: Mutex<MmioTransport>,
}

/// All devices of one VM.
pub struct DeviceManager {
    serial: Mutex<Serial>,
    i8042: Mutex<I8042>,
    i8042_reset: EventFd,
    virtio: Vec<VirtioSlot>,
    /// Exit status the guest reported on STATUS_PORT, or -1.
    status: AtomicI32,
    timeline: Arc<Timeline>,
}

fn eventfd() -> Result<EventFd, DeviceError> {
    EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)
}

impl DeviceManager {
    /// Creates the serial console (writing to `console`) and the i8042.
    pub fn new(
        vm: &Vm,
        console: Box<dyn std::io::Write + Send>,
        timeline: Arc<Timeline>,
    ) -> Result<Self, DeviceError> {
        let serial_irq = eventfd()?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)?;
        let kbd_irq = eventfd()?;
        vm.register_irqfd(&kbd_irq, I8042_IRQ)?;
        let i8042_reset = eventfd()?;
        let reset_clone = i8042_reset.try_clone().map_err(DeviceError::EventFd)?;
        Ok(DeviceManager {
            serial: Mutex::new(Serial::new(serial_irq, console)),
            i8042: Mutex::new(I8042::new(kbd_irq, reset_clone)),
            i8042_reset,
            virtio: Vec::new(),
            status: AtomicI32::new(-1),
            timeline,
        })
    }

    /// Adds a virtio-blk device backed by `path`; returns the kernel
    /// command-line fragment that declares it to the guest.
    pub fn add_block(
        &mut self,
        vm: &Vm,
        path: &Path,
        read_only: bool,
    ) -> Result<String, DeviceError> {
        let name = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| DeviceError::OpenDisk {
                path: name.clone(),
                source,
            })?;
        let index = self.virtio.len() as u64;
        let block = Block::new(file, read_only, format!("vmm-disk{index}")).map_err(|e| {
            DeviceError::Block {
                path: name.clone(),
                reason: e.to_string(),
            }
        })?;
        let irq = eventfd()?;
        let gsi = VIRTIO_IRQ_BASE + index as u32;
        vm.register_irqfd(&irq, gsi)?;
        let base = VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SIZE;
        let transport = MmioTransport::new(vm.memory().clone(), Box::new(block), irq);
        self.virtio.push(VirtioSlot {
            base,
            transport: Mutex::new(transport),
        });
        Ok(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"))
    }

    /// Feeds console input to the serial port; returns how many bytes it took.
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        serial.enqueue_input(bytes).unwrap_or(0)
    }

    /// The exit status the guest reported, if it did.
    pub fn exit_status(&self) -> Option<u8> {
        u8::try_from(self.status.load(Ordering::Acquire)).ok()
    }

    fn virtio_at(&self, addr: u64) -> Option<(&VirtioSlot, u64)> {
        self.virtio
            .iter()
            .find(|s| addr >= s.base && addr < s.base + VIRTIO_MMIO_SIZE)
            .map(|s| (s, addr - s.base))
    }
}

impl Bus for DeviceManager {
    fn pio_in(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (COM1_PORT..COM1_PORT + 8).contains(&p) && data.len() == 1 => {
                let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                data[0] = s.read((p - COM1_PORT) as u8);
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT if data.len() == 1 => {
                let mut k = self.i8042.lock().unwrap_or_else(|e| e.into_inner());
                data[0] = k.read(port);
            }
            // Nothing there: the bus floats high.
            _ => data.fill(0xff),
        }
    }

    fn pio_out(&self, port: u16, data: &[u8]) -> bool {
        match port {
            p if (COM1_PORT..COM1_PORT + 8).contains(&p) => {
                if p == COM1_PORT {
                    self.timeline.console_output();
                }
                let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                for b in data {
                    s.write((p - COM1_PORT) as u8, *b);
                }
                false
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT if data.len() == 1 => {
                self.i8042
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(port, data[0]);
                // The i8042 signals a CPU reset through its eventfd.
                self.i8042_reset.read().is_ok()
            }
            STATUS_PORT if !data.is_empty() => {
                self.status.store(i32::from(data[0]), Ordering::Release);
                false
            }
            PROGRESS_PORT => {
                self.timeline.agent_started();
                false
            }
            _ => false,
        }
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.virtio_at(addr) {
            Some((slot, off)) => slot
                .transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read(off, data),
            None => data.fill(0xff),
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((slot, off)) = self.virtio_at(addr) {
            slot.transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write(off, data)
        }
    }
}
