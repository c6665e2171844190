//! The virtio-mmio transport, version 2 (virtio 1.x, section 4.2): the
//! register window a driver uses to negotiate features, set up queues and
//! notify the device.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{status, DeviceState, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::Persist;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x554d_4d56; // "VMMU"
/// Device configuration space starts here.
pub const CONFIG_OFFSET: u64 = 0x100;

/// A queue's transport-visible state: what the driver configured and where
/// the device is in the rings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

/// Everything the transport holds, and the device's own state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub device_type: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub acked_features: u64,
    pub status: u32,
    pub queue_select: u32,
    pub queues: Vec<QueueState>,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub activated: bool,
    pub device: DeviceState,
}

#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("saved virtio device is of type {saved}, the device given is of type {given}")]
    DeviceType { saved: u32, given: u32 },
    #[error("saved virtio state acknowledges features {acked:#x} the device does not offer ({offered:#x})")]
    Features { acked: u64, offered: u64 },
    #[error("saved virtio state has {saved} queues, the device has {given}")]
    QueueCount { saved: usize, given: usize },
    #[error("saved virtio queue {index} is invalid: {reason}")]
    Queue { index: usize, reason: String },
    #[error("cannot activate the restored virtio device: {0}")]
    Activate(#[from] super::ActivateError),
}

pub struct MmioTransport {
    mem: GuestMemoryMmap,
    device: Box<dyn VirtioDevice>,
    interrupt: Interrupt,
    queues: Vec<Queue>,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    status: u32,
    queue_select: u32,
    config_generation: u32,
    activated: bool,
}

fn new_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .iter()
        // Sizes come from our own devices: powers of two up to 32768.
        .map(|&max| Queue::new(max).expect("device queue sizes are valid"))
        .collect()
}

impl MmioTransport {
    pub fn new(mem: GuestMemoryMmap, device: Box<dyn VirtioDevice>, irq: EventFd) -> Self {
        let queues = new_queues(device.as_ref());
        MmioTransport {
            mem,
            device,
            interrupt: Interrupt::new(irq),
            queues,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            status: 0,
            queue_select: 0,
            config_generation: 0,
            activated: false,
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue setup is allowed only while the driver is configuring.
    fn configuring(&self) -> bool {
        self.status & status::DRIVER_OK == 0 && self.status & status::FAILED == 0
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 {
            log::debug!(
                "virtio-mmio: {}-byte read at {offset:#x} ignored",
                data.len()
            );
            data.fill(0);
            return;
        }
        let v: u32 = match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => {
                let f = self.device.avail_features() | VIRTIO_F_VERSION_1;
                match self.device_features_select {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status(),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => {
                log::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.write_config(offset - CONFIG_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::debug!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        let v = u32::from_le_bytes(bytes);
        let configuring = self.configuring();
        match offset {
            0x14 => self.device_features_select = v,
            0x20 if self.status & status::FEATURES_OK == 0 => {
                let (mask, shift) = match self.driver_features_select {
                    0 => (0xffff_ffffu64, 0),
                    1 => (0xffff_ffff_0000_0000u64, 32),
                    _ => return,
                };
                // Keep only what is offered: a driver cannot ack more.
                let offered = self.device.avail_features() | VIRTIO_F_VERSION_1;
                self.acked_features =
                    (self.acked_features & !mask) | ((u64::from(v) << shift) & mask & offered);
            }
            0x24 => self.driver_features_select = v,
            0x30 => self.queue_select = v,
            0x38 if configuring => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            0x44 if configuring => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            0x50 => self.notify(v as usize),
            0x64 => self.interrupt.ack(v),
            0x70 => self.set_status(v),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if configuring => {
                if let Some(q) = self.selected_queue() {
                    let (lo, hi) = if offset & 4 == 0 {
                        (Some(v), None)
                    } else {
                        (None, Some(v))
                    };
                    match offset & !4 {
                        0x80 => q.set_desc_table_address(lo, hi),
                        0x90 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => log::debug!("virtio-mmio: write {v:#x} to {offset:#x} ignored"),
        }
    }

    fn notify(&mut self, index: usize) {
        log::trace!("virtio-mmio: notify queue {index}");
        if !self.activated {
            return;
        }
        if let Some(q) = self.queues.get_mut(index) {
            self.device.process_queue(index, q, &self.interrupt);
        }
    }

    fn set_status(&mut self, v: u32) {
        log::trace!("virtio-mmio: status {:#x} -> {v:#x}", self.status);
        if v == 0 {
            self.reset();
            return;
        }
        let newly = v & !self.status;
        self.status = v;
        if newly & status::FEATURES_OK != 0 {
            if self.acked_features & VIRTIO_F_VERSION_1 == 0 {
                // Legacy drivers are not supported: refuse FEATURES_OK.
                self.status &= !status::FEATURES_OK;
                return;
            }
            self.device.set_acked_features(self.acked_features);
        }
        if newly & status::DRIVER_OK != 0 && !self.activated {
            let event_idx = self.acked_features & (1 << 29) != 0;
            let bad = self.queues.iter_mut().enumerate().find_map(|(i, q)| {
                q.set_event_idx(event_idx);
                (q.ready() && !q.is_valid(&self.mem)).then_some(i)
            });
            let result = match bad {
                Some(i) => Err(super::ActivateError::BadQueue(i)),
                None => self.device.activate(self.mem.clone()),
            };
            match result {
                Ok(()) => self.activated = true,
                Err(e) => {
                    log::warn!("virtio-mmio: {e}");
                    self.status |= status::DEVICE_NEEDS_RESET;
                    self.interrupt.signal_config_change();
                }
            }
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        self.queues = new_queues(self.device.as_ref());
        self.status = 0;
        self.acked_features = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
        self.interrupt.set_status(0);
        self.activated = false;
    }
}

impl Persist for MmioTransport {
    type State = MmioState;
    /// Guest memory, the irqfd, and the device rebuilt from `MmioState::device`.
    type ConstructorArgs = (GuestMemoryMmap, EventFd, Box<dyn VirtioDevice>);
    type Error = MmioError;

    fn save(&self) -> MmioState {
        MmioState {
            device_type: self.device.device_type(),
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            acked_features: self.acked_features,
            status: self.status,
            queue_select: self.queue_select,
            queues: self
                .queues
                .iter()
                .map(|q| QueueState {
                    max_size: q.max_size(),
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                    event_idx: q.event_idx_enabled(),
                })
                .collect(),
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            activated: self.activated,
            device: self.device.save_device(),
        }
    }

    fn restore(
        (mem, irq, mut device): Self::ConstructorArgs,
        s: &MmioState,
    ) -> Result<Self, MmioError> {
        if s.device_type != device.device_type() {
            return Err(MmioError::DeviceType {
                saved: s.device_type,
                given: device.device_type(),
            });
        }
        let offered = device.avail_features() | VIRTIO_F_VERSION_1;
        if s.acked_features & !offered != 0 {
            return Err(MmioError::Features {
                acked: s.acked_features,
                offered,
            });
        }
        let max_sizes = device.queue_max_sizes().to_vec();
        if s.queues.len() != max_sizes.len() {
            return Err(MmioError::QueueCount {
                saved: s.queues.len(),
                given: max_sizes.len(),
            });
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (index, (qs, &max)) in s.queues.iter().zip(&max_sizes).enumerate() {
            let bad = |reason: String| MmioError::Queue { index, reason };
            if qs.max_size != max {
                return Err(bad(format!(
                    "max size {} but the device has {max}",
                    qs.max_size
                )));
            }
            let mut q = Queue::new(max).map_err(|e| bad(e.to_string()))?;
            q.try_set_size(qs.size)
                .map_err(|e| bad(format!("size {}: {e}", qs.size)))?;
            q.try_set_desc_table_address(vm_memory::GuestAddress(qs.desc_table))
                .map_err(|e| bad(e.to_string()))?;
            q.try_set_avail_ring_address(vm_memory::GuestAddress(qs.avail_ring))
                .map_err(|e| bad(e.to_string()))?;
            q.try_set_used_ring_address(vm_memory::GuestAddress(qs.used_ring))
                .map_err(|e| bad(e.to_string()))?;
            q.set_next_avail(qs.next_avail);
            q.set_next_used(qs.next_used);
            q.set_event_idx(qs.event_idx);
            q.set_ready(qs.ready);
            if qs.ready && !q.is_valid(&mem) {
                return Err(bad("its rings are not inside guest memory".into()));
            }
            queues.push(q);
        }
        if s.acked_features != 0 {
            device.set_acked_features(s.acked_features);
        }
        if s.activated {
            device.activate(mem.clone())?;
        }
        let interrupt = Interrupt::new(irq);
        interrupt.set_status(s.interrupt_status & (super::INT_USED_RING | super::INT_CONFIG));
        Ok(MmioTransport {
            mem,
            device,
            interrupt,
            queues,
            device_features_select: s.device_features_select,
            driver_features_select: s.driver_features_select,
            acked_features: s.acked_features,
            status: s.status,
            queue_select: s.queue_select,
            config_generation: s.config_generation,
            activated: s.activated,
        })
    }
}
