//! virtio-rng: the guest's entropy source, backed by the host's
//! getrandom(2), so the guest kernel's pool is seeded at boot (hw_random
//! feeds it) and again after a restore, when every clone of one image
//! would otherwise carry the same pool.

use std::sync::Arc;

use crate::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};

use super::chain::{next_chain, write_to_chain};
use super::{
    read_config_bytes, ActivateError, Active, Interrupt, QueueError, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use crate::Persist;

/// virtio device id of an entropy source.
pub const TYPE_RNG: u32 = 4;
pub const QUEUE_SIZE: u16 = 64;
/// The most bytes one request gets: hw_random asks for small amounts, and
/// a request for more must not stall the device thread.
const MAX_PER_REQUEST: usize = 64 << 10;

#[derive(Default)]
pub struct Rng {
    acked_features: u64,
    active: Option<Active>,
}

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("the saved entropy device has features {0:#x} acknowledged that it does not offer")]
    AckedNotOffered(u64),
}

/// Saved state: only what the driver negotiated.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RngState {
    pub acked_features: u64,
}

impl Rng {
    pub fn new() -> Self {
        Rng::default()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&[], offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("virtio-rng: write to config at {offset:#x} ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        Active::activate(&mut self.active, mem, interrupt)
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue]) -> Result<(), QueueError> {
        let Active { mem, interrupt } = Active::get(&self.active)?;
        let Some(queue) = queues.get_mut(index).filter(|_| index == 0) else {
            return Err(QueueError::NoSuchQueue(index));
        };
        let mut buf = Vec::new();
        let mut used_any = false;
        while let Some(chain) = next_chain(queue, &mem)? {
            buf.resize(chain.writable_len().min(MAX_PER_REQUEST), 0);
            let written = match getrandom::fill(&mut buf) {
                Ok(()) => write_to_chain(&mem, &chain.descs, &buf),
                Err(e) => {
                    log::warn!("virtio-rng: the host's getrandom failed: {e}");
                    0
                }
            };
            queue.add_used(&mem, chain.head, written as u32)?;
            used_any = true;
        }
        if used_any {
            interrupt.signal_used_queue();
        }
        Ok(())
    }

    fn reset(&mut self) {
        *self = Rng::default();
    }

    fn quiesce(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Persist for Rng {
    type State = RngState;
    type ConstructorArgs = ();
    type Error = RngError;

    fn save(&self) -> RngState {
        RngState {
            acked_features: self.acked_features,
        }
    }

    fn restore((): (), s: &RngState) -> Result<Self, RngError> {
        let mut rng = Rng::new();
        if s.acked_features & !rng.avail_features() != 0 {
            return Err(RngError::AckedNotOffered(s.acked_features));
        }
        rng.acked_features = s.acked_features;
        Ok(rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn fills_the_drivers_buffers_with_fresh_bytes() {
        let mem = memory();
        let mut queue = ready_queue(QUEUE_SIZE);
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
        let mut rng = Rng::new();
        rng.activate(mem.clone(), interrupt).unwrap();
        let mut drv = Driver::new(mem);
        drv.add_chain(&[(DATA, 64, true)]);
        drv.add_chain(&[(DATA + 0x100, 64, true)]);
        rng.process_queue(0, std::slice::from_mut(&mut queue))
            .unwrap();
        assert_eq!(drv.used_idx(), 2);
        assert_eq!(drv.used(0).1, 64);
        let (a, b) = (drv.bytes(DATA, 64), drv.bytes(DATA + 0x100, 64));
        assert_ne!(a, vec![0; 64]);
        assert_ne!(a, b, "two requests got the same bytes");
        assert_eq!(irq.read().unwrap(), 1);
    }

    #[test]
    fn restore_refuses_unknown_features() {
        let s = RngState { acked_features: 1 };
        assert!(Rng::restore((), &s).is_err());
        let s = RngState {
            acked_features: VIRTIO_F_VERSION_1,
        };
        assert_eq!(Rng::restore((), &s).unwrap().save(), s);
    }
}
