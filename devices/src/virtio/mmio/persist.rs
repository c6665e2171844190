//! Saved state of a virtio-mmio transport. The device behind it saves its
//! own state next to itself; [`crate::virtio::persist`] pairs the two.

use std::sync::Arc;

use crate::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::MmioTransport;
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

/// Everything the transport holds; not the device's own state.
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
}

/// Constructor arguments of a restored transport.
pub struct MmioArgs {
    pub mem: GuestMemoryMmap,
    /// The irqfd of the device's GSI.
    pub irq: EventFd,
    /// The device behind it, already restored from its own state.
    pub device: Box<dyn VirtioDevice>,
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
    #[error("cannot activate the restored virtio device")]
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

impl Persist for MmioTransport {
    type State = MmioState;
    type ConstructorArgs = MmioArgs;
    type Error = MmioError;

    /// The caller has quiesced the device (no request in flight).
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
        }
    }

    /// Restores the transport around a device the caller rebuilt from its
    /// own state, checking that the two agree.
    fn restore(args: MmioArgs, s: &MmioState) -> Result<Self, MmioError> {
        let MmioArgs {
            mem,
            irq,
            mut device,
        } = args;
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

#[cfg(test)]
mod tests {
    use super::super::tests::{bring_up, disk, negotiate, r, read_sector, transport, w};
    use super::*;
    use crate::virtio::block::{Backing, Block, BlockError, BlockState};
    use crate::virtio::mmio::reg;
    use crate::virtio::persist::{self, VirtioDeviceState, VirtioRestoreError};
    use crate::virtio::test_utils::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;
    use vmm_sys_util::tempfile::TempFile;

    type State = VirtioDeviceState<BlockState>;

    fn save(t: &MmioTransport) -> State {
        persist::save::<Block>(t).expect("a block device")
    }

    /// Restores a block device and its transport; the irqfd's other end.
    fn restore(
        mem: &GuestMemoryMmap,
        d: &TempFile,
        s: &State,
    ) -> (Result<MmioTransport, VirtioRestoreError>, EventFd) {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let file = d.as_file().try_clone().unwrap();
        let t = persist::restore::<Block>(
            mem.clone(),
            irq.try_clone().unwrap(),
            Backing::File(file),
            s,
        );
        (t, irq)
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
        let s = save(&t);
        assert!(s.transport.activated);
        assert_eq!(s.transport.queues[0].next_avail, 2);
        assert_eq!(s.transport.queues[0].next_used, 2);
        assert_eq!(s.transport.interrupt_status, crate::virtio::INT_USED_RING);
        assert_eq!(s.device.path, d.as_path());
        assert_eq!(s.device.acked_features, s.transport.acked_features);

        // The restored transport is the same and carries on where it was.
        let (t2, irq) = restore(&mem, &d, &s);
        let mut t2 = t2.unwrap();
        assert_eq!(save(&t2), s);
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
        let s = save(&t);
        assert!(!s.transport.activated);
        let mut t2 = restore(&mem, &d, &s).0.unwrap();
        assert_eq!(save(&t2), s);
        // The driver can finish bringing it up.
        super::super::tests::setup_queue(&mut t2);
        w(&mut t2, reg::STATUS, 0xf);
        assert!(t2.is_activated());
    }

    fn running_state() -> (State, GuestMemoryMmap, TempFile) {
        let d = disk();
        let (mut t, _, mem) = transport(&d);
        bring_up(&mut t);
        (save(&t), mem, d)
    }

    fn restore_err(s: &State, mem: &GuestMemoryMmap, d: &TempFile) -> VirtioRestoreError {
        match restore(mem, d, s).0 {
            Ok(_) => panic!("restore accepted a bad state"),
            Err(e) => e,
        }
    }

    /// The transport refused the state.
    fn transport_err(s: &State, mem: &GuestMemoryMmap, d: &TempFile) -> MmioError {
        match restore_err(s, mem, d) {
            VirtioRestoreError::Transport(e) => e,
            other => panic!("the device, not the transport, refused: {other}"),
        }
    }

    /// The block device refused its state.
    fn block_err(s: &State, mem: &GuestMemoryMmap, d: &TempFile) -> BlockError {
        match restore_err(s, mem, d) {
            VirtioRestoreError::Device(e) => *e.downcast::<BlockError>().unwrap(),
            other => panic!("the transport, not the device, refused: {other}"),
        }
    }

    #[test]
    fn acked_features_not_offered() {
        let (mut s, mem, d) = running_state();
        s.transport.acked_features |= 1 << 28; // INDIRECT_DESC, never offered
        assert!(matches!(
            transport_err(&s, &mem, &d),
            MmioError::Features { .. }
        ));
        let (mut s, mem, d) = running_state();
        s.device.acked_features |= 1 << 28;
        assert!(matches!(
            block_err(&s, &mem, &d),
            BlockError::AckedNotOffered { .. }
        ));
    }

    #[test]
    fn queue_outside_memory() {
        let (mut s, mem, d) = running_state();
        s.transport.queues[0].used_ring = MEM_SIZE as u64 - 8;
        let e = transport_err(&s, &mem, &d);
        assert!(matches!(e, MmioError::Queue { index: 0, .. }), "{e}");
        let (mut s, mem, d) = running_state();
        s.transport.queues[0].desc_table = 0x1001; // misaligned
        assert!(matches!(
            transport_err(&s, &mem, &d),
            MmioError::Queue { .. }
        ));
        let (mut s, mem, d) = running_state();
        s.transport.queues[0].size = 300;
        assert!(matches!(
            transport_err(&s, &mem, &d),
            MmioError::Queue { .. }
        ));
        let (mut s, mem, d) = running_state();
        s.transport.queues[0].max_size = 128;
        assert!(matches!(
            transport_err(&s, &mem, &d),
            MmioError::Queue { .. }
        ));
    }

    #[test]
    fn queue_count_status_and_interrupt_status() {
        let (mut s, mem, d) = running_state();
        s.transport.queues.push(QueueState::default());
        assert!(matches!(
            transport_err(&s, &mem, &d),
            MmioError::QueueCount { saved: 2, given: 1 }
        ));
        let (mut s, mem, d) = running_state();
        s.transport.status = 0x3; // active without DRIVER_OK
        assert!(matches!(
            transport_err(&s, &mem, &d),
            MmioError::Status { .. }
        ));
        let (mut s, mem, d) = running_state();
        s.transport.status |= 0x100;
        assert!(matches!(
            transport_err(&s, &mem, &d),
            MmioError::Status { .. }
        ));
        let (mut s, mem, d) = running_state();
        s.transport.interrupt_status = 4;
        assert!(matches!(
            transport_err(&s, &mem, &d),
            MmioError::InterruptStatus(4)
        ));
    }

    #[test]
    fn disk_of_another_size() {
        let (s, mem, _) = running_state();
        let other = TempFile::new().unwrap();
        other.as_file().set_len(128 << 10).unwrap();
        assert!(matches!(
            block_err(&s, &mem, &other),
            BlockError::SizeChanged { .. }
        ));
        // A read-only disk offers other features than the saved device.
        let (mut s, mem, d) = running_state();
        s.device.read_only = true;
        assert!(matches!(
            block_err(&s, &mem, &d),
            BlockError::FeaturesChanged { .. }
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
            _: &mut [Queue],
        ) -> Result<(), crate::virtio::QueueError> {
            Ok(())
        }
        fn reset(&mut self) {}
        fn quiesce(&mut self) -> std::io::Result<()> {
            Ok(())
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }

    #[test]
    fn device_type_mismatch() {
        let (s, mem, _) = running_state();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let args = MmioArgs {
            mem,
            irq,
            device: Box::new(Other),
        };
        let r = MmioTransport::restore(args, &s.transport);
        assert!(matches!(
            r,
            Err(MmioError::DeviceType { saved: 2, given: 4 })
        ));
        // A transport holding another device type has no block state.
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(memory(), Box::new(Other), irq);
        assert!(persist::save::<Block>(&t).is_none());
    }
}
