//! virtio devices over the MMIO transport.
//!
//! [`MmioTransport`] owns the register window, the queues and the
//! [`Interrupt`]; a [`VirtioDevice`] behind it ([`block::Block`],
//! [`net::Net`], [`rng::Rng`], [`vsock::Vsock`]) serves the requests. The VMM routes QueueNotify through an ioeventfd to its
//! device thread, which calls [`MmioTransport::notify_queue`]; a request is
//! served whole under the transport's lock, and
//! [`MmioTransport::drain`] serves what is left before a pause. A device
//! whose backend makes work of its own (a TAP's frames) registers its file
//! descriptors on the same thread ([`VirtioDevice::init_backend`]).

pub mod block;
pub mod chain;
pub mod mmio;
pub mod net;
pub mod persist;
pub mod rng;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::GuestMemoryMmap;
use event_manager::{EventOps, Events};
use vmm_sys_util::eventfd::EventFd;

pub use mmio::{MmioArgs, MmioError, MmioState, MmioTransport, QueueState};
pub use persist::{VirtioDeviceState, VirtioRestoreError};

/// Event data a device's backend may use; the device thread keeps the
/// values from here on for the queues' notifications.
pub const BACKEND_DATA_LIMIT: u32 = 1 << 31;

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
/// VIRTIO_RING_F_EVENT_IDX.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// InterruptStatus bit: a used ring was updated.
pub const INT_USED_RING: u32 = 1;
/// InterruptStatus bit: the configuration space changed.
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line: the InterruptStatus bits the driver reads and
/// acknowledges, and the irqfd KVM turns into a guest interrupt.
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

    /// The device's configuration space (or its status) changed.
    pub fn signal_config_change(&self) {
        self.signal(INT_CONFIG);
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// InterruptACK: clears `bits`.
    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::Release);
    }
}

/// What a device holds while its driver runs it: guest memory and the
/// interrupt to raise. `None` before activation and after a reset.
#[derive(Clone)]
pub struct Active {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<Interrupt>,
}

impl Active {
    /// Fills `slot` at activation; a second one without a reset is refused.
    pub fn activate(
        slot: &mut Option<Active>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        if slot.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        *slot = Some(Active { mem, interrupt });
        Ok(())
    }

    /// The activated device's memory and interrupt.
    pub fn get(slot: &Option<Active>) -> Result<Active, QueueError> {
        slot.clone().ok_or(QueueError::NotActivated)
    }
}

/// A read of a device's configuration space `config` at `offset`; bytes
/// past its end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let src = usize::try_from(offset)
        .ok()
        .and_then(|o| config.get(o..))
        .unwrap_or(&[]);
    let n = src.len().min(data.len());
    data[..n].copy_from_slice(&src[..n]);
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver set up queue {0} with rings outside guest memory")]
    BadQueue(usize),
    #[error("the device was activated twice without a reset")]
    AlreadyActive,
}

/// Why a device stopped serving a queue; the transport then sets
/// DEVICE_NEEDS_RESET and tells the driver.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the device is not activated")]
    NotActivated,
    #[error("the device has no queue {0}")]
    NoSuchQueue(usize),
    #[error("virtio queue: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("the available ring announces buffers the device cannot pop")]
    Stuck,
}

/// What the MMIO transport needs from a device behind it.
pub trait VirtioDevice: Send + std::any::Any {
    /// virtio device id (2 = block).
    fn device_type(&self) -> u32;
    /// The largest size of each queue; its length is the number of queues.
    /// Every size is a power of two no larger than 32768.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver (VIRTIO_F_VERSION_1 included).
    fn avail_features(&self) -> u64;
    /// The features the driver accepted, once it set FEATURES_OK (a subset
    /// of `avail_features`, the transport makes sure of it).
    fn set_acked_features(&mut self, acked: u64);
    /// Reads device configuration space at `offset`; bytes past its end read
    /// as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start serving requests.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError>;
    /// The driver notified queue `index`: serve everything it holds and
    /// signal the used ring through the interrupt given at activation.
    /// `queues` holds all of the device's queues (a request on one may be
    /// answered on another); queue `index` is ready, the others may not be.
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [virtio_queue::Queue],
    ) -> Result<(), QueueError>;
    /// Registers the host file descriptors whose readiness gives the device
    /// work (a TAP, sockets) with the device thread, with event data below
    /// [`BACKEND_DATA_LIMIT`]. Called once, when the thread takes the device.
    fn init_backend(&mut self, _ops: &mut EventOps) {}
    /// One of the backend's file descriptors is ready. `queues` is `None`
    /// until the driver has activated the device. The device may add and
    /// remove file descriptors through `ops`.
    fn backend_event(
        &mut self,
        _events: Events,
        _ops: &mut EventOps,
        _queues: Option<&mut [virtio_queue::Queue]>,
    ) -> Result<(), QueueError> {
        Ok(())
    }
    /// Called on the device thread after each queue notification and
    /// backend event: the moment to start or stop watching file descriptors
    /// that serving a queue opened or closed (vsock's connections).
    fn update_backend(&mut self, _ops: &mut EventOps) {}
    /// The VM was restored from an image and is about to run again: the
    /// moment to tell the guest what changed under it (a network device
    /// asks it to announce itself, vsock resets its connections). Called
    /// only on an activated device. Returns true if the device changed its
    /// configuration space, which the transport then signals.
    fn restored(&mut self, _queues: &mut [virtio_queue::Queue]) -> Result<bool, QueueError> {
        Ok(false)
    }
    /// Back to the state before activation.
    fn reset(&mut self);
    /// Makes everything the device has done durable (e.g. fsync the disk
    /// image) before its state or its backing file is captured.
    fn quiesce(&mut self) -> std::io::Result<()>;
    /// The device as `Any`, so its owner can reach its concrete type (and
    /// its [`crate::Persist`] state) through the transport.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// A minimal virtio driver side for tests: guest memory with a split queue
/// laid out in it, descriptor chains put on the available ring by hand.
#[cfg(test)]
pub(crate) mod test_utils {
    use crate::GuestMemoryMmap;
    use vm_memory::{Bytes, GuestAddress};

    pub const MEM_SIZE: usize = 0x10_0000;
    pub const DESC: u64 = 0x1000;
    pub const AVAIL: u64 = 0x2000;
    pub const USED: u64 = 0x3000;
    /// Buffers go from here on.
    pub const DATA: u64 = 0x1_0000;
    pub const QSIZE: u16 = 16;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    pub fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    /// A ready queue of QSIZE entries with its rings at DESC, AVAIL, USED.
    pub fn ready_queue(max_size: u16) -> virtio_queue::Queue {
        use virtio_queue::QueueT;
        let mut queue = virtio_queue::Queue::new(max_size).unwrap();
        queue.try_set_size(QSIZE).unwrap();
        queue
            .try_set_desc_table_address(GuestAddress(DESC))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(AVAIL))
            .unwrap();
        queue.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        queue.set_ready(true);
        queue
    }

    /// The driver's view of one queue: where the next descriptor and the next
    /// available entry go.
    pub struct Driver {
        pub mem: GuestMemoryMmap,
        next_desc: u16,
        avail_idx: u16,
    }

    impl Driver {
        pub fn new(mem: GuestMemoryMmap) -> Self {
            Driver {
                mem,
                next_desc: 0,
                avail_idx: 0,
            }
        }

        /// Writes a chain of (address, length, device-writable) buffers and
        /// makes it available; returns its head.
        pub fn add_chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
            let head = self.next_desc;
            for (i, &(addr, len, write)) in bufs.iter().enumerate() {
                let idx = (self.next_desc % QSIZE) as u64;
                let next = (self.next_desc + 1) % QSIZE;
                let mut flags = if write { F_WRITE } else { 0 };
                if i + 1 < bufs.len() {
                    flags |= F_NEXT;
                }
                let d = GuestAddress(DESC + idx * 16);
                self.mem.write_obj(addr, d).unwrap();
                self.mem.write_obj(len, d.unchecked_add(8)).unwrap();
                self.mem.write_obj(flags, d.unchecked_add(12)).unwrap();
                self.mem.write_obj(next, d.unchecked_add(14)).unwrap();
                self.next_desc = next;
            }
            let slot = (self.avail_idx % QSIZE) as u64;
            self.mem
                .write_obj(head, GuestAddress(AVAIL + 4 + slot * 2))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.mem
                .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
                .unwrap();
            head
        }

        pub fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
        }

        /// The used element at `slot`: (head, length).
        pub fn used(&self, slot: u16) -> (u32, u32) {
            let a = GuestAddress(USED + 4 + u64::from(slot % QSIZE) * 8);
            (
                self.mem.read_obj(a).unwrap(),
                self.mem.read_obj(a.unchecked_add(4)).unwrap(),
            )
        }

        pub fn byte(&self, addr: u64) -> u8 {
            self.mem.read_obj(GuestAddress(addr)).unwrap()
        }

        pub fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0; len];
            self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        }
    }

    use vm_memory::Address;
}
