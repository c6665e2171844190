//! The virtio-mmio transport, version 2 (virtio 1.x, section 4.2): the
//! register window a driver uses to negotiate features, set up queues and
//! notify the device. Registers are 32 bits wide; device configuration space
//! starts at 0x100.

use std::sync::Arc;

use crate::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use event_manager::{EventOps, Events};

use super::{
    status, Interrupt, QueueError, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

mod persist;
pub use persist::{MmioArgs, MmioError, MmioState, QueueState};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x554d_4d56; // "VMMU"

/// Register offsets.
pub mod reg {
    pub const MAGIC_VALUE: u64 = 0x00;
    pub const VERSION: u64 = 0x04;
    pub const DEVICE_ID: u64 = 0x08;
    pub const VENDOR_ID: u64 = 0x0c;
    pub const DEVICE_FEATURES: u64 = 0x10;
    pub const DEVICE_FEATURES_SEL: u64 = 0x14;
    pub const DRIVER_FEATURES: u64 = 0x20;
    pub const DRIVER_FEATURES_SEL: u64 = 0x24;
    pub const QUEUE_SEL: u64 = 0x30;
    pub const QUEUE_NUM_MAX: u64 = 0x34;
    pub const QUEUE_NUM: u64 = 0x38;
    pub const QUEUE_READY: u64 = 0x44;
    pub const QUEUE_NOTIFY: u64 = 0x50;
    pub const INTERRUPT_STATUS: u64 = 0x60;
    pub const INTERRUPT_ACK: u64 = 0x64;
    pub const STATUS: u64 = 0x70;
    pub const QUEUE_DESC_LOW: u64 = 0x80;
    pub const QUEUE_DESC_HIGH: u64 = 0x84;
    pub const QUEUE_AVAIL_LOW: u64 = 0x90;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x94;
    pub const QUEUE_USED_LOW: u64 = 0xa0;
    pub const QUEUE_USED_HIGH: u64 = 0xa4;
    pub const CONFIG_GENERATION: u64 = 0xfc;
    /// Device configuration space starts here.
    pub const CONFIG: u64 = 0x100;
}

/// Size of the register window before configuration space.
pub const MMIO_REGS_SIZE: u64 = 0x200;

pub struct MmioTransport {
    mem: GuestMemoryMmap,
    device: Box<dyn VirtioDevice>,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    status: u32,
    queue_select: u32,
    config_generation: u32,
    activated: bool,
}

/// Fresh queues of the device's maximum sizes.
fn new_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .iter()
        .filter_map(|&max| match Queue::new(max) {
            Ok(q) => Some(q),
            Err(e) => {
                log::error!("virtio-mmio: device declares an invalid queue size {max}: {e}");
                None
            }
        })
        .collect()
}

impl MmioTransport {
    /// A transport in reset state for `device`, raising `irq` (an irqfd).
    pub fn new(mem: GuestMemoryMmap, device: Box<dyn VirtioDevice>, irq: EventFd) -> Self {
        let queues = new_queues(device.as_ref());
        MmioTransport {
            mem,
            device,
            interrupt: Arc::new(Interrupt::new(irq)),
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

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The driver set DRIVER_OK and the device is serving requests.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Makes the device's work durable before a snapshot (see
    /// [`VirtioDevice::quiesce`]).
    pub fn quiesce(&mut self) -> std::io::Result<()> {
        self.device.quiesce()
    }

    fn offered_features(&self) -> u64 {
        self.device.avail_features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue setup is allowed only until the driver says DRIVER_OK.
    fn configuring(&self) -> bool {
        self.status & (status::DRIVER_OK | status::FAILED) == 0
    }

    /// A guest read at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || offset & 3 != 0 {
            log::debug!(
                "virtio-mmio: {}-byte read at {offset:#x} ignored",
                data.len()
            );
            data.fill(0);
            return;
        }
        let v: u32 = match offset {
            reg::MAGIC_VALUE => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => {
                let f = self.offered_features();
                match self.device_features_select {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                log::debug!("virtio-mmio: read of unknown or write-only register {offset:#x}");
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write at `offset` in the window. A QueueNotify that reaches
    /// here (no ioeventfd took it) is served synchronously.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
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
            reg::DEVICE_FEATURES_SEL => self.device_features_select = v,
            reg::DRIVER_FEATURES => self.write_driver_features(v),
            reg::DRIVER_FEATURES_SEL => self.driver_features_select = v,
            reg::QUEUE_SEL => self.queue_select = v,
            reg::QUEUE_NUM if configuring => {
                if let Some(q) = self.selected_queue() {
                    // Sizes that are not a power of two up to the maximum
                    // are refused (and logged) by the queue.
                    q.set_size(u16::try_from(v).unwrap_or(0));
                }
            }
            // Taking a queue down is allowed at any time (Linux's del_vq
            // checks it reads back 0); bringing one up only while configuring.
            reg::QUEUE_READY if configuring || v == 0 => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_NOTIFY => self.notify_queue(v as usize),
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.set_status(v),
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_AVAIL_LOW
            | reg::QUEUE_AVAIL_HIGH
            | reg::QUEUE_USED_LOW
            | reg::QUEUE_USED_HIGH
                if configuring =>
            {
                if let Some(q) = self.selected_queue() {
                    let (lo, hi) = if offset & 4 == 0 {
                        (Some(v), None)
                    } else {
                        (None, Some(v))
                    };
                    match offset & !4 {
                        reg::QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
                        reg::QUEUE_AVAIL_LOW => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => log::debug!("virtio-mmio: write {v:#x} to {offset:#x} ignored"),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.status & status::FEATURES_OK != 0 || self.status & status::DRIVER == 0 {
            log::debug!("virtio-mmio: driver features written outside negotiation, ignored");
            return;
        }
        let (mask, shift) = match self.driver_features_select {
            0 => (0xffff_ffffu64, 0),
            1 => (0xffff_ffff_0000_0000u64, 32),
            _ => return,
        };
        // A driver cannot accept what is not offered: drop such bits.
        let offered = self.offered_features();
        let wanted = (u64::from(v) << shift) & mask;
        if wanted & !offered != 0 {
            log::debug!("virtio-mmio: driver accepted unoffered features {wanted:#x}");
        }
        self.acked_features = (self.acked_features & !mask) | (wanted & offered);
    }

    /// How many queues the device has (QueueNotify values 0 to this - 1).
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// Serves whatever each ready queue holds, as a notification of every
    /// queue would. Called before a pause, so no request the driver made
    /// available is left unserved, and after a restore.
    pub fn drain(&mut self) {
        if !self.activated || self.status & status::DEVICE_NEEDS_RESET != 0 {
            return;
        }
        for index in 0..self.queues.len() {
            if self.queues[index].ready() {
                self.notify_queue(index);
            }
        }
    }

    /// The driver notified queue `index` (a QueueNotify write, or its
    /// ioeventfd): serve what it holds.
    pub fn notify_queue(&mut self, index: usize) {
        log::trace!("virtio-mmio: notify queue {index}");
        if !self.activated || self.status & status::DEVICE_NEEDS_RESET != 0 {
            log::debug!("virtio-mmio: notify of queue {index} before the device is running");
            return;
        }
        let Some(q) = self.queues.get(index) else {
            log::debug!("virtio-mmio: notify of nonexistent queue {index}");
            return;
        };
        if !q.ready() {
            log::debug!("virtio-mmio: notify of queue {index}, which is not ready");
            return;
        }
        let result = self.device.process_queue(index, &mut self.queues);
        self.check(result, "queue");
    }

    /// A device that failed needs a reset, and the driver is told.
    fn check<T>(&mut self, result: Result<T, QueueError>, what: &str) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                log::warn!(
                    "virtio-mmio: device type {} ({what}): {e}; it needs a reset",
                    self.device.device_type()
                );
                self.needs_reset();
                None
            }
        }
    }

    /// Lets the device register its backend's file descriptors on the
    /// device thread (see [`VirtioDevice::init_backend`]).
    pub fn init_backend(&mut self, ops: &mut EventOps) {
        self.device.init_backend(ops);
    }

    /// Lets the device start or stop watching file descriptors (see
    /// [`VirtioDevice::update_backend`]).
    pub fn update_backend(&mut self, ops: &mut EventOps) {
        self.device.update_backend(ops);
    }

    /// One of the backend's file descriptors is ready.
    pub fn backend_event(&mut self, events: Events, ops: &mut EventOps) {
        let running = self.activated && self.status & status::DEVICE_NEEDS_RESET == 0;
        let queues = running.then_some(self.queues.as_mut_slice());
        let result = self.device.backend_event(events, ops, queues);
        self.check(result, "backend");
    }

    /// The VM was restored and is about to run again: the device tells the
    /// guest what changed (see [`VirtioDevice::restored`]).
    pub fn restored(&mut self) {
        if !self.activated || self.status & status::DEVICE_NEEDS_RESET != 0 {
            return;
        }
        let result = self.device.restored(&mut self.queues);
        if self.check(result, "restore") == Some(true) {
            self.config_generation = self.config_generation.wrapping_add(1);
            self.interrupt.signal_config_change();
        }
    }

    fn needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal_config_change();
    }

    fn set_status(&mut self, v: u32) {
        log::trace!("virtio-mmio: status {:#x} -> {v:#x}", self.status);
        if v == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET is the device's to set, and only a reset clears it.
        let v = (v & !status::DEVICE_NEEDS_RESET) | (self.status & status::DEVICE_NEEDS_RESET);
        if v & self.status != self.status {
            log::debug!(
                "virtio-mmio: driver tried to clear status bits ({:#x} -> {v:#x})",
                self.status
            );
            return;
        }
        let mut v = v;
        let newly = v & !self.status;
        if newly & status::FEATURES_OK != 0 && self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            // Legacy drivers are not supported: FEATURES_OK does not stick.
            log::warn!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1");
            v &= !status::FEATURES_OK;
        }
        if newly & status::DRIVER_OK != 0 && v & status::FEATURES_OK == 0 {
            log::warn!("virtio-mmio: DRIVER_OK without FEATURES_OK ignored");
            v &= !status::DRIVER_OK;
        }
        self.status = v;
        if newly & v & status::FEATURES_OK != 0 {
            self.device.set_acked_features(self.acked_features);
        }
        if newly & v & status::DRIVER_OK != 0 && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut bad = None;
        for (i, q) in self.queues.iter_mut().enumerate() {
            q.set_event_idx(event_idx);
            if q.ready() && !q.is_valid(&self.mem) && bad.is_none() {
                bad = Some(i);
            }
        }
        let result = match bad {
            Some(i) => Err(super::ActivateError::BadQueue(i)),
            None => self
                .device
                .activate(self.mem.clone(), Arc::clone(&self.interrupt)),
        };
        match result {
            Ok(()) => self.activated = true,
            Err(e) => {
                log::warn!(
                    "virtio-mmio: cannot activate device type {}: {e}",
                    self.device.device_type()
                );
                self.needs_reset();
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::virtio::block::{Backing, Block, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_S_OK};
    use crate::virtio::test_utils::*;
    use crate::virtio::{INT_CONFIG, INT_USED_RING};
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;
    use vmm_sys_util::tempfile::TempFile;

    pub fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    pub fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// A 64 KiB disk image.
    pub fn disk() -> TempFile {
        let t = TempFile::new().unwrap();
        t.as_file().set_len(64 << 10).unwrap();
        t
    }

    /// A block device's transport in reset state; the irqfd's other end.
    pub fn transport(t: &TempFile) -> (MmioTransport, EventFd, GuestMemoryMmap) {
        let mem = memory();
        let block = Block::new(
            Backing::File(t.as_file().try_clone().unwrap()),
            false,
            "d".into(),
        )
        .unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let tr = MmioTransport::new(mem.clone(), Box::new(block), irq.try_clone().unwrap());
        (tr, irq, mem)
    }

    /// What Linux's virtio_mmio does up to FEATURES_OK, accepting everything
    /// offered.
    pub fn negotiate(t: &mut MmioTransport) -> u64 {
        w(t, reg::STATUS, 0);
        w(t, reg::STATUS, status::ACKNOWLEDGE);
        w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, reg::DEVICE_FEATURES_SEL, 1);
        let hi = r(t, reg::DEVICE_FEATURES);
        w(t, reg::DEVICE_FEATURES_SEL, 0);
        let lo = r(t, reg::DEVICE_FEATURES);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, hi);
        w(t, reg::DRIVER_FEATURES_SEL, 0);
        w(t, reg::DRIVER_FEATURES, lo);
        w(t, reg::STATUS, 0xb);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    pub fn setup_queue(t: &mut MmioTransport) {
        w(t, reg::QUEUE_SEL, 0);
        assert_eq!(r(t, reg::QUEUE_READY), 0);
        assert_eq!(r(t, reg::QUEUE_NUM_MAX), 256);
        w(t, reg::QUEUE_NUM, u32::from(QSIZE));
        for (lo, addr) in [
            (reg::QUEUE_DESC_LOW, DESC),
            (reg::QUEUE_AVAIL_LOW, AVAIL),
            (reg::QUEUE_USED_LOW, USED),
        ] {
            w(t, lo, addr as u32);
            w(t, lo + 4, (addr >> 32) as u32);
        }
        w(t, reg::QUEUE_READY, 1);
    }

    /// A whole driver bring-up: negotiate, queue 0, DRIVER_OK.
    pub fn bring_up(t: &mut MmioTransport) {
        negotiate(t);
        setup_queue(t);
        w(t, reg::STATUS, 0xf);
        assert!(t.is_activated());
    }

    /// Submits a one-sector read of `sector` into DATA + 0x1000 and kicks.
    pub fn read_sector(t: &mut MmioTransport, drv: &mut Driver, sector: u64) {
        let mut hdr = [0u8; 16];
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        drv.mem.write_slice(&hdr, GuestAddress(DATA)).unwrap();
        drv.add_chain(&[
            (DATA, 16, false),
            (DATA + 0x1000, 512, true),
            (DATA + 0x100, 1, true),
        ]);
        w(t, reg::QUEUE_NOTIFY, 0);
    }

    #[test]
    fn identity_registers() {
        let d = disk();
        let (mut t, _, _) = transport(&d);
        assert_eq!(r(&mut t, reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 2);
        assert_eq!(r(&mut t, reg::VENDOR_ID), VENDOR_ID);
        assert_eq!(r(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn feature_negotiation_in_both_halves() {
        let d = disk();
        let (mut t, _, _) = transport(&d);
        w(&mut t, reg::STATUS, 3);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        w(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        let lo = r(&mut t, reg::DEVICE_FEATURES);
        assert_ne!(u64::from(lo) & VIRTIO_BLK_F_FLUSH, 0);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 2);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0);
        // The driver accepts more than offered: the extra bits are dropped.
        w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w(&mut t, reg::DRIVER_FEATURES, 0xffff_ffff);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, reg::DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(t.acked_features, t.offered_features());
        // FEATURES_OK sticks, after which features are frozen.
        w(&mut t, reg::STATUS, 0xb);
        assert_eq!(r(&mut t, reg::STATUS), 0xb);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w(&mut t, reg::DRIVER_FEATURES, 0);
        assert_eq!(t.acked_features, t.offered_features());
    }

    #[test]
    fn legacy_driver_cannot_set_features_ok() {
        let d = disk();
        let (mut t, _, _) = transport(&d);
        w(&mut t, reg::STATUS, 3);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w(&mut t, reg::DRIVER_FEATURES, VIRTIO_BLK_F_FLUSH as u32);
        w(&mut t, reg::STATUS, 0xb);
        assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        // And DRIVER_OK without FEATURES_OK does not activate.
        w(&mut t, reg::STATUS, 0x7);
        assert!(!t.is_activated());
    }

    #[test]
    fn status_transitions_and_reset() {
        let d = disk();
        let (mut t, irq, mut mem) = transport(&d);
        bring_up(&mut t);
        // The driver cannot clear bits other than by a reset.
        w(&mut t, reg::STATUS, 0x3);
        assert_eq!(r(&mut t, reg::STATUS), 0xf);
        // Queue setup is frozen once running; only taking a queue down is not.
        w(&mut t, reg::QUEUE_NUM, 8);
        assert_eq!(t.queues[0].size(), QSIZE);
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
        let mut drv = Driver::new(mem.clone());
        read_sector(&mut t, &mut drv, 1);
        assert_eq!(drv.used_idx(), 1);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INT_USED_RING);
        w(&mut t, reg::INTERRUPT_ACK, INT_USED_RING);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
        // Reset: everything back to the start.
        w(&mut t, reg::STATUS, 0);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        assert!(!t.is_activated());
        assert_eq!(t.acked_features, 0);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
        assert_eq!(t.queues[0].size(), 256);
        // A kick after reset does nothing.
        read_sector(&mut t, &mut drv, 1);
        assert_eq!(drv.used_idx(), 1);
        // And the device can be brought up again from scratch.
        mem = memory();
        let mut drv = Driver::new(mem.clone());
        t.mem = mem;
        bring_up(&mut t);
        read_sector(&mut t, &mut drv, 2);
        assert_eq!(drv.used_idx(), 1);
        assert_eq!(drv.byte(DATA + 0x100), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn queue_setup_registers() {
        let d = disk();
        let (mut t, _, _) = transport(&d);
        negotiate(&mut t);
        // A queue that does not exist.
        w(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0);
        w(&mut t, reg::QUEUE_NUM, 16);
        w(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
        // Invalid sizes are refused.
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_NUM, 3);
        w(&mut t, reg::QUEUE_NUM, 512);
        w(&mut t, reg::QUEUE_NUM, 0x1_0010);
        assert_eq!(t.queues[0].size(), 256);
        // 64-bit addresses from two halves.
        w(&mut t, reg::QUEUE_DESC_LOW, 0x1000);
        w(&mut t, reg::QUEUE_DESC_HIGH, 0x1);
        assert_eq!(t.queues[0].desc_table(), 0x1_0000_1000);
        setup_queue(&mut t);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
        assert_eq!(t.queues[0].desc_table(), DESC);
        assert_eq!(t.queues[0].used_ring(), USED);
    }

    #[test]
    fn rings_outside_memory_need_reset() {
        let d = disk();
        let (mut t, irq, _) = transport(&d);
        negotiate(&mut t);
        setup_queue(&mut t);
        w(&mut t, reg::QUEUE_USED_LOW, MEM_SIZE as u32 - 8);
        w(&mut t, reg::STATUS, 0xf);
        assert!(!t.is_activated());
        assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
        assert_eq!(irq.read().unwrap(), 1);
        // A kick is ignored; a reset recovers.
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        w(&mut t, reg::STATUS, 0);
        assert_eq!(r(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn config_space_reads() {
        let d = disk();
        let (mut t, _, _) = transport(&d);
        let mut cap = [0u8; 8];
        t.read(reg::CONFIG, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 128);
        let mut b = [0u8; 1];
        t.read(reg::CONFIG + 1, &mut b);
        assert_eq!(b[0], 0);
        t.write(reg::CONFIG, &[1, 2, 3, 4]); // read-only: ignored
        t.read(reg::CONFIG, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 128);
        assert_eq!(r(&mut t, reg::CONFIG_GENERATION), 0);
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let d = disk();
        let (mut t, _, _) = transport(&d);
        bring_up(&mut t);
        for off in (0..0x110u64).chain([0xfff, u64::MAX - 3, u64::MAX]) {
            for len in [0usize, 1, 2, 3, 4, 8] {
                let mut buf = vec![0u8; len];
                t.read(off, &mut buf);
                if off != reg::STATUS && off != reg::QUEUE_NOTIFY {
                    t.write(off, &buf);
                }
            }
        }
        for q in [1u32, 0xffff_ffff] {
            w(&mut t, reg::QUEUE_NOTIFY, q);
        }
    }
}
