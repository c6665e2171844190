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

#[cfg(test)]
mod tests {
    use super::super::tests::{bring_up, disk, negotiate, r, read_sector, transport, w};
    use super::*;
    use crate::virtio::mmio::reg;
    use crate::virtio::test_utils::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;
    use vmm_sys_util::tempfile::TempFile;

    fn args(mem: &GuestMemoryMmap, d: &TempFile) -> (MmioArgs, EventFd) {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let a = MmioArgs {
            mem: mem.clone(),
            irq: irq.try_clone().unwrap(),
            device: DeviceArgs::Block(d.as_file().try_clone().unwrap()),
        };
        (a, irq)
    }

    #[test]
    fn round_trip_of_a_running_device() {
        let d = disk();
        let (mut t, _, mem) = transport(&d);
        bring_up(&mut t);
        let mut drv = Driver::new(mem.clone());
        read_sector(&mut t, &mut drv, 1);
        read_sector(&mut t, &mut drv, 2);
        w(&mut t, reg::QUEUE_SEL, 0);
        let s = t.save();
        assert!(s.activated);
        assert_eq!(s.queues[0].next_avail, 2);
        assert_eq!(s.queues[0].next_used, 2);
        assert_eq!(s.interrupt_status, crate::virtio::INT_USED_RING);
        let DeviceState::Block(bs) = &s.device;
        assert_eq!(bs.path, d.as_path());
        assert_eq!(bs.acked_features, s.acked_features);

        // The restored transport is the same and carries on where it was.
        let (a, irq) = args(&mem, &d);
        let mut t2 = MmioTransport::restore(a, &s).unwrap();
        assert_eq!(t2.save(), s);
        assert_eq!(irq.read().unwrap(), 1, "pending interrupt raised again");
        assert_eq!(r(&mut t2, reg::STATUS), 0xf);
        read_sector(&mut t2, &mut drv, 3);
        assert_eq!(drv.used_idx(), 3);
        assert_eq!(t2.save().queues[0].next_avail, 3);
    }

    #[test]
    fn round_trip_before_the_driver() {
        let d = disk();
        let (mut t, _, mem) = transport(&d);
        negotiate(&mut t);
        let s = t.save();
        assert!(!s.activated);
        let (a, _) = args(&mem, &d);
        let mut t2 = MmioTransport::restore(a, &s).unwrap();
        assert_eq!(t2.save(), s);
        // The driver can finish bringing it up.
        super::super::tests::setup_queue(&mut t2);
        w(&mut t2, reg::STATUS, 0xf);
        assert!(t2.is_activated());
    }

    fn running_state() -> (MmioState, GuestMemoryMmap, TempFile) {
        let d = disk();
        let (mut t, _, mem) = transport(&d);
        bring_up(&mut t);
        (t.save(), mem, d)
    }

    fn restore_err(s: &MmioState, mem: &GuestMemoryMmap, d: &TempFile) -> MmioError {
        match MmioTransport::restore(args(mem, d).0, s) {
            Ok(_) => panic!("restore accepted a bad state"),
            Err(e) => e,
        }
    }

    #[test]
    fn acked_features_not_offered() {
        let (mut s, mem, d) = running_state();
        s.acked_features |= 1 << 28; // INDIRECT_DESC, never offered
        assert!(matches!(
            restore_err(&s, &mem, &d),
            MmioError::Features { .. }
        ));
        let (mut s, mem, d) = running_state();
        let DeviceState::Block(bs) = &mut s.device;
        bs.acked_features |= 1 << 28;
        assert!(matches!(
            restore_err(&s, &mem, &d),
            MmioError::Block(BlockError::AckedNotOffered { .. })
        ));
    }

    #[test]
    fn queue_outside_memory() {
        let (mut s, mem, d) = running_state();
        s.queues[0].used_ring = MEM_SIZE as u64 - 8;
        let e = restore_err(&s, &mem, &d);
        assert!(matches!(e, MmioError::Queue { index: 0, .. }), "{e}");
        let (mut s, mem, d) = running_state();
        s.queues[0].desc_table = 0x1001; // misaligned
        assert!(matches!(restore_err(&s, &mem, &d), MmioError::Queue { .. }));
        let (mut s, mem, d) = running_state();
        s.queues[0].size = 300;
        assert!(matches!(restore_err(&s, &mem, &d), MmioError::Queue { .. }));
        let (mut s, mem, d) = running_state();
        s.queues[0].max_size = 128;
        assert!(matches!(restore_err(&s, &mem, &d), MmioError::Queue { .. }));
    }

    #[test]
    fn queue_count_status_and_interrupt_status() {
        let (mut s, mem, d) = running_state();
        s.queues.push(QueueState::default());
        assert!(matches!(
            restore_err(&s, &mem, &d),
            MmioError::QueueCount { saved: 2, given: 1 }
        ));
        let (mut s, mem, d) = running_state();
        s.status = 0x3; // active without DRIVER_OK
        assert!(matches!(
            restore_err(&s, &mem, &d),
            MmioError::Status { .. }
        ));
        let (mut s, mem, d) = running_state();
        s.status |= 0x100;
        assert!(matches!(
            restore_err(&s, &mem, &d),
            MmioError::Status { .. }
        ));
        let (mut s, mem, d) = running_state();
        s.interrupt_status = 4;
        assert!(matches!(
            restore_err(&s, &mem, &d),
            MmioError::InterruptStatus(4)
        ));
    }

    #[test]
    fn disk_of_another_size() {
        let (s, mem, _) = running_state();
        let other = TempFile::new().unwrap();
        other.as_file().set_len(128 << 10).unwrap();
        assert!(matches!(
            restore_err(&s, &mem, &other),
            MmioError::Block(BlockError::SizeChanged { .. })
        ));
        // A read-only disk offers other features than the saved device.
        let (mut s, mem, d) = running_state();
        let DeviceState::Block(bs) = &mut s.device;
        bs.read_only = true;
        assert!(matches!(
            restore_err(&s, &mem, &d),
            MmioError::Block(BlockError::FeaturesChanged { .. })
        ));
    }

    /// A device of another type, to check the transport refuses to mix them.
    struct Other;
    impl VirtioDevice for Other {
        fn device_type(&self) -> u32 {
            4
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256]
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1
        }
        fn set_acked_features(&mut self, _: u64) {}
        fn read_config(&self, _: u64, data: &mut [u8]) {
            data.fill(0)
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(&mut self, _: GuestMemoryMmap, _: Arc<Interrupt>) -> Result<(), ActivateError> {
            Ok(())
        }
        fn process_queue(
            &mut self,
            _: usize,
            _: &mut Queue,
        ) -> Result<(), crate::virtio::QueueError> {
            Ok(())
        }
        fn reset(&mut self) {}
        fn quiesce(&mut self) -> std::io::Result<()> {
            Ok(())
        }
        fn save_device(&self) -> DeviceState {
            unreachable!("not saved in this test")
        }
    }

    #[test]
    fn device_type_mismatch() {
        let (s, mem, _) = running_state();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let r = MmioTransport::restore_with_device(mem, irq, Box::new(Other), &s);
        assert!(matches!(
            r,
            Err(MmioError::DeviceType { saved: 2, given: 4 })
        ));
    }
}
