//! Wires the devices to guest ports, MMIO windows and interrupt lines, and
//! dispatches vCPU accesses to them.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use devices::legacy::i8042::I8042State;
use devices::legacy::serial::SerialState;
use devices::legacy::{Serial, I8042};
use devices::virtio::block::Block;
use devices::virtio::mmio::{DeviceArgs, DeviceState, MmioArgs, MmioState};
use devices::virtio::MmioTransport;
use devices::Persist;
use serde::{Deserialize, Serialize};
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
    #[error("cannot flush virtio device at {base:#x} before the snapshot: {source}")]
    Quiesce { base: u64, source: std::io::Error },
    #[error("cannot restore the serial port: {0}")]
    RestoreSerial(String),
    #[error("cannot restore the i8042: {0}")]
    RestoreI8042(String),
    #[error("cannot restore the virtio device at {base:#x}: {reason}")]
    RestoreVirtio { base: u64, reason: String },
    #[error("the image's virtio device at {base:#x} lies outside the MMIO window")]
    BadSlot { base: u64 },
}

/// Saved state of every device, and where each sits on the buses.
#[derive(Clone, Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: SerialState,
    pub i8042: I8042State,
    pub virtio: Vec<VirtioSlotState>,
    /// The exit status the guest had already reported, or -1.
    pub status: i32,
}

impl DevicesState {
    /// The disk images behind the virtio-blk devices, in slot order.
    pub fn disk_paths(&self) -> Vec<std::path::PathBuf> {
        self.virtio
            .iter()
            .map(|slot| match &slot.transport.device {
                DeviceState::Block(b) => b.path.clone(),
            })
            .collect()
    }
}

#[derive(Clone, Serialize, Deserialize)]
pub struct VirtioSlotState {
    pub base: u64,
    pub gsi: u32,
    pub transport: MmioState,
}

struct VirtioSlot {
    base: u64,
    gsi: u32,
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

/// A poisoned lock only means another thread panicked mid-access; the
/// device state itself is still consistent enough to go on with.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The event fds of the serial port and the i8042: their interrupt lines,
/// and the i8042's reset line (one end for the device, one for the bus).
struct LegacyFds {
    serial_irq: EventFd,
    kbd_irq: EventFd,
    i8042_reset: EventFd,
    reset_clone: EventFd,
}

impl LegacyFds {
    fn new(vm: &Vm) -> Result<Self, DeviceError> {
        let serial_irq = eventfd()?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)?;
        let kbd_irq = eventfd()?;
        vm.register_irqfd(&kbd_irq, I8042_IRQ)?;
        let i8042_reset = eventfd()?;
        let reset_clone = i8042_reset.try_clone().map_err(DeviceError::EventFd)?;
        Ok(LegacyFds {
            serial_irq,
            kbd_irq,
            i8042_reset,
            reset_clone,
        })
    }
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
        let LegacyFds {
            serial_irq,
            kbd_irq,
            i8042_reset,
            reset_clone,
        } = LegacyFds::new(vm)?;
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
            gsi,
            transport: Mutex::new(transport),
        });
        Ok(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"))
    }

    /// Makes every device's work durable (the disk's writes reach the file)
    /// so that a snapshot of the disk agrees with the guest's page cache.
    /// The vCPUs are paused, so no request is in flight.
    pub fn quiesce(&self) -> Result<(), DeviceError> {
        for slot in &self.virtio {
            lock(&slot.transport)
                .quiesce()
                .map_err(|source| DeviceError::Quiesce {
                    base: slot.base,
                    source,
                })?;
        }
        Ok(())
    }

    /// Reads every device's state; the vCPUs are paused.
    pub fn save(&self) -> DevicesState {
        DevicesState {
            serial: lock(&self.serial).save(),
            i8042: lock(&self.i8042).save(),
            virtio: self
                .virtio
                .iter()
                .map(|slot| VirtioSlotState {
                    base: slot.base,
                    gsi: slot.gsi,
                    transport: lock(&slot.transport).save(),
                })
                .collect(),
            status: self.status.load(Ordering::Acquire),
        }
    }

    /// Rebuilds the devices from a saved state. `disks` gives, in slot
    /// order, the file that now holds each virtio-blk device's disk.
    pub fn restore(
        vm: &Vm,
        state: &DevicesState,
        console: Box<dyn std::io::Write + Send>,
        timeline: Arc<Timeline>,
        disks: Vec<(std::path::PathBuf, std::fs::File)>,
    ) -> Result<Self, DeviceError> {
        let LegacyFds {
            serial_irq,
            kbd_irq,
            i8042_reset,
            reset_clone,
        } = LegacyFds::new(vm)?;
        let serial = Serial::restore((serial_irq, console), &state.serial)
            .map_err(|e| DeviceError::RestoreSerial(e.to_string()))?;
        let i8042 = I8042::restore((kbd_irq, reset_clone), &state.i8042)
            .map_err(|e| DeviceError::RestoreI8042(e.to_string()))?;
        if disks.len() != state.virtio.len() {
            return Err(DeviceError::RestoreVirtio {
                base: VIRTIO_MMIO_BASE,
                reason: format!(
                    "the image has {} disks, {} were given",
                    state.virtio.len(),
                    disks.len()
                ),
            });
        }
        let mut virtio = Vec::with_capacity(state.virtio.len());
        for (i, (slot, (path, file))) in state.virtio.iter().zip(disks).enumerate() {
            let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE;
            let gsi = VIRTIO_IRQ_BASE + i as u32;
            if slot.base != base || slot.gsi != gsi {
                return Err(DeviceError::BadSlot { base: slot.base });
            }
            let irq = eventfd()?;
            vm.register_irqfd(&irq, gsi)?;
            let mut transport_state = slot.transport.clone();
            match &mut transport_state.device {
                DeviceState::Block(b) => b.path = path,
            }
            let transport = MmioTransport::restore(
                MmioArgs {
                    mem: vm.memory().clone(),
                    irq,
                    device: DeviceArgs::Block(file),
                },
                &transport_state,
            )
            .map_err(|e| DeviceError::RestoreVirtio {
                base,
                reason: e.to_string(),
            })?;
            virtio.push(VirtioSlot {
                base,
                gsi,
                transport: Mutex::new(transport),
            });
        }
        Ok(DeviceManager {
            serial: Mutex::new(serial),
            i8042: Mutex::new(i8042),
            i8042_reset,
            virtio,
            status: AtomicI32::new(state.status),
            timeline,
        })
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
            // The guest's last word: the agent has synced the disk and
            // drained the console, so the VM ends here rather than after a
            // reboot whose messages would mix with the command's output.
            STATUS_PORT if !data.is_empty() => {
                self.status.store(i32::from(data[0]), Ordering::Release);
                true
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
