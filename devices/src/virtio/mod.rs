//! virtio devices over the MMIO transport.

pub mod block;
mod mmio;

use std::sync::atomic::{AtomicU32, Ordering};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use mmio::{MmioError, MmioState, MmioTransport, QueueState};

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// VIRTIO_F_VERSION_1: every device offers it; the MMIO transport is version 2.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bits of the MMIO transport.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line: the status bits the driver reads and acks, and
/// the irqfd KVM turns into a guest interrupt.
pub struct Interrupt {
    evt: EventFd,
    status: AtomicU32,
}

impl Interrupt {
    pub fn new(evt: EventFd) -> Self {
        Interrupt {
            evt,
            status: AtomicU32::new(0),
        }
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::AcqRel);
        if let Err(e) = self.evt.write(1) {
            log::warn!("virtio: cannot raise the interrupt: {e}");
        }
    }

    /// The device put buffers in a used ring.
    pub fn signal_used_queue(&self) {
        self.signal(INT_USED_RING);
    }

    /// The device's configuration space changed.
    pub fn signal_config_change(&self) {
        self.signal(INT_CONFIG);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::Release);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver set up queue {0} with addresses outside guest memory")]
    BadQueue(usize),
}

/// What the MMIO transport needs from a device behind it.
pub trait VirtioDevice: Send {
    /// virtio device id (2 = block).
    fn device_type(&self) -> u32;
    /// The largest size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    fn avail_features(&self) -> u64;
    /// The features the driver accepted, once negotiated.
    fn set_acked_features(&mut self, acked: u64);
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start serving requests.
    fn activate(&mut self, mem: GuestMemoryMmap) -> Result<(), ActivateError>;
    /// The driver notified queue `index`: serve what it holds. Called on the
    /// vCPU thread, so when every vCPU is paused no request is in flight.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut virtio_queue::Queue,
        interrupt: &Interrupt,
    );
    /// Back to the state before activation.
    fn reset(&mut self);
    /// The device-specific state, for the image.
    fn save_device(&self) -> DeviceState;
}

/// Device-specific saved state, one variant per device kind.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeviceState {
    Block(block::BlockState),
}
