//! Saved state of a virtio-mmio transport and the device behind it.

use std::fs::File;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::MmioTransport;
use crate::virtio::block::{Block, BlockError, BlockState};
use crate::virtio::{
    status, ActivateError, Interrupt, VirtioDevice, INT_CONFIG, INT_USED_RING, VIRTIO_F_VERSION_1,
};
use crate::Persist;

/// A queue's transport-visible state: what the driver configured and where
/// the device is in the rings. Our own copy, so the image does not depend on
/// virtio-queue's internals.
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

/// Device-specific saved state, one variant per device kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    Block(BlockState),
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

/// What rebuilds the device behind a transport, besides its saved state.
pub enum DeviceArgs {
    /// The disk image for a [`DeviceState::Block`] (its saved path is in
    /// [`BlockState::path`]).
    Block(File),
}

/// Constructor arguments of a restored transport.
pub struct MmioArgs {
    pub mem: GuestMemoryMmap,
    /// The irqfd of the device's GSI.
    pub irq: EventFd,
    pub device: DeviceArgs,
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
    #[error("saved virtio device status {status:#x} is inconsistent: {reason}")]
    Status { status: u32, reason: &'static str },
    #[error("saved virtio interrupt status {0:#x} has unknown bits")]
    InterruptStatus(u32),
    #[error("cannot restore the virtio-blk device: {0}")]
    Block(#[from] BlockError),
    #[error("cannot activate the restored virtio device: {0}")]
    Activate(#[from] ActivateError),
}

fn save_queue(q: &Queue) -> QueueState {
    QueueState {
        max_size: q.max_size(),
        size: q.size(),
        ready: q.ready(),
        desc_table: q.desc_table(),
        avail_ring: q.avail_ring(),
        used_ring: q.used_ring(),
        next_avail: q.next_avail(),
        next_used: q.next_used(),
        event_idx: q.event_idx_enabled(),
    }
}

/// Rebuilds a queue through virtio-queue's checked setters; a ready queue's
/// rings must lie in guest memory.
fn restore_queue(
    index: usize,
    qs: &QueueState,
    max: u16,
    mem: &GuestMemoryMmap,
) -> Result<Queue, MmioError> {
    let bad = |reason: String| MmioError::Queue { index, reason };
    if qs.max_size != max {
        return Err(bad(format!(
            "its maximum size is {} but the device's is {max}",
            qs.max_size
        )));
    }
    let mut q = Queue::new(max).map_err(|e| bad(e.to_string()))?;
    q.try_set_size(qs.size)
        .map_err(|e| bad(format!("size {}: {e}", qs.size)))?;
    q.try_set_desc_table_address(GuestAddress(qs.desc_table))
        .map_err(|e| bad(format!("descriptor table at {:#x}: {e}", qs.desc_table)))?;
    q.try_set_avail_ring_address(GuestAddress(qs.avail_ring))
        .map_err(|e| bad(format!("available ring at {:#x}: {e}", qs.avail_ring)))?;
    q.try_set_used_ring_address(GuestAddress(qs.used_ring))
        .map_err(|e| bad(format!("used ring at {:#x}: {e}", qs.used_ring)))?;
    q.set_next_avail(qs.next_avail);
    q.set_next_used(qs.next_used);
    q.set_event_idx(qs.event_idx);
    q.set_ready(qs.ready);
    if qs.ready && !q.is_valid(mem) {
        return Err(bad(format!(
            "its rings (descriptors {:#x}, available {:#x}, used {:#x}, size {}) are not inside guest memory",
            qs.desc_table, qs.avail_ring, qs.used_ring, qs.size
        )));
    }
    Ok(q)
}

impl MmioTransport {
    /// Restores a transport around a device the caller rebuilt itself.
    /// [`Persist::restore`] does this for the devices of this crate.
    pub fn restore_with_device(
        mem: GuestMemoryMmap,
        irq: EventFd,
        mut device: Box<dyn VirtioDevice>,
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
        let known = status::ACKNOWLEDGE
            | status::DRIVER
            | status::FEATURES_OK
            | status::DRIVER_OK
            | status::DEVICE_NEEDS_RESET
            | status::FAILED;
        let bad_status = |reason| MmioError::Status {
            status: s.status,
            reason,
        };
        if s.status & !known != 0 {
            return Err(bad_status("unknown bits"));
        }
        let features_ok = s.status & status::FEATURES_OK != 0;
        if features_ok && s.acked_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(bad_status("FEATURES_OK without VIRTIO_F_VERSION_1"));
        }
        if s.activated && (s.status & status::DRIVER_OK == 0 || !features_ok) {
            return Err(bad_status(
                "an active device without DRIVER_OK and FEATURES_OK",
            ));
        }
        if s.interrupt_status & !(INT_USED_RING | INT_CONFIG) != 0 {
            return Err(MmioError::InterruptStatus(s.interrupt_status));
        }
        let max_sizes = device.queue_max_sizes().to_vec();
        if s.queues.len() != max_sizes.len() {
            return Err(MmioError::QueueCount {
                saved: s.queues.len(),
                given: max_sizes.len(),
            });
        }
        let queues = s
            .queues
            .iter()
            .zip(&max_sizes)
            .enumerate()
            .map(|(index, (qs, &max))| restore_queue(index, qs, max, &mem))
            .collect::<Result<Vec<_>, _>>()?;

        let interrupt = Arc::new(Interrupt::new(irq));
        interrupt.set_status(s.interrupt_status);
        if features_ok {
            device.set_acked_features(s.acked_features);
        }
        if s.activated {
            device.activate(mem.clone(), Arc::clone(&interrupt))?;
        }
        if s.interrupt_status != 0 {
            // Raise it again: a spurious interrupt is harmless to the driver
            // (it reads InterruptStatus), a lost one hangs it.
            if let Err(e) = interrupt.evt.write(1) {
                log::warn!("virtio-mmio: cannot raise the restored interrupt: {e}");
            }
        }
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

impl Persist for MmioTransport {
    type State = MmioState;
    type ConstructorArgs = MmioArgs;
    type Error = MmioError;

    /// The caller has quiesced the VM (no vCPU in KVM_RUN): since requests
    /// are served synchronously, none is in flight.
    fn save(&self) -> MmioState {
        MmioState {
            device_type: self.device.device_type(),
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            acked_features: self.acked_features,
            status: self.status,
            queue_select: self.queue_select,
            queues: self.queues.iter().map(save_queue).collect(),
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            activated: self.activated,
            device: self.device.save_device(),
        }
    }

    fn restore(args: MmioArgs, s: &MmioState) -> Result<Self, MmioError> {
        let device: Box<dyn VirtioDevice> = match (&s.device, args.device) {
            (DeviceState::Block(bs), DeviceArgs::Block(file)) => {
                Box::new(Block::restore(file, bs)?)
            }
        };
        MmioTransport::restore_with_device(args.mem, args.irq, device, s)
    }
}
