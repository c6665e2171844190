//! virtio-net backed by a host TAP interface.
//!
//! Frames keep their virtio-net header on both sides (the TAP is opened
//! with IFF_VNET_HDR), so checksum and segmentation offloads pass through
//! untouched: a guest that sends one 64 KiB TCP segment costs its
//! (interpreted, here) kernel one packet, not forty-five.
//!
//! Three queues: receive, transmit and control. Both data paths run on the
//! device thread: transmit when the driver notifies queue 1, receive when
//! the TAP has frames (edge-triggered) or the driver adds receive buffers.
//! A frame read while the receive queue is empty waits in `pending` until
//! buffers arrive; the TAP is not read again meanwhile, so the host's
//! queue, not ours, absorbs a slow guest.
//!
//! After a restore the device asks the guest to announce itself
//! (VIRTIO_NET_F_GUEST_ANNOUNCE): the guest sends gratuitous ARPs, so the
//! host's neighbour tables and switches learn where it is now.

mod persist;
pub mod tap;

use std::io;
use std::sync::Arc;

use crate::GuestMemoryMmap;
use event_manager::{EventOps, EventSet, Events};
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;

pub use persist::NetState;
pub use tap::{Tap, TapError};

use super::chain::{next_chain, write_to_chain};
use super::{
    read_config_bytes, ActivateError, Active, Interrupt, QueueError, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// virtio device id of a network card.
pub const TYPE_NET: u32 = 1;
pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const CTRL: usize = 2;

pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
pub const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
pub const VIRTIO_NET_F_GUEST_ANNOUNCE: u64 = 1 << 21;

/// Config space status bits.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
pub const VIRTIO_NET_S_ANNOUNCE: u16 = 2;

/// Control queue: class and command of the announce acknowledgement.
const CTRL_CLASS_ANNOUNCE: u8 = 3;
const CTRL_ANNOUNCE_ACK: u8 = 0;
const CTRL_OK: u8 = 0;
const CTRL_ERR: u8 = 1;

/// The largest frame: a 64 KiB TSO segment, its Ethernet header and the
/// virtio-net header.
const MAX_FRAME: usize = 65535 + 14 + tap::VNET_HDR_LEN;

/// The TAP's event data (queues use values from BACKEND_DATA_LIMIT on).
const TAP_EVENT: u32 = 0;

pub type MacAddr = [u8; 6];

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("the saved network device offered features {saved:#x}, this one offers {now:#x}")]
    FeaturesChanged { saved: u64, now: u64 },
    #[error("the saved network device has features {acked:#x} acknowledged that it does not offer ({offered:#x})")]
    AckedNotOffered { acked: u64, offered: u64 },
}

/// A random locally administered unicast address (02:xx:...).
pub fn random_mac() -> MacAddr {
    let mut mac = [0u8; 6];
    if getrandom::fill(&mut mac[1..]).is_err() {
        // Not secret, only needs to differ between VMs.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64
            ^ u64::from(std::process::id());
        mac[1..].copy_from_slice(&t.to_le_bytes()[..5]);
    }
    mac[0] = 0x02;
    mac
}

pub struct Net {
    tap: Tap,
    mac: MacAddr,
    acked_features: u64,
    /// The guest has not acknowledged our announce request yet.
    announce: bool,
    active: Option<Active>,
    /// A frame read from the TAP that found no receive buffer: its length
    /// in `rx_buf`.
    pending: Option<usize>,
    rx_buf: Vec<u8>,
}

impl Net {
    pub fn new(tap: Tap, mac: MacAddr) -> Self {
        Net {
            tap,
            mac,
            acked_features: 0,
            announce: false,
            active: None,
            pending: None,
            rx_buf: vec![0; MAX_FRAME],
        }
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    fn config(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[..6].copy_from_slice(&self.mac);
        let mut status = VIRTIO_NET_S_LINK_UP;
        if self.announce {
            status |= VIRTIO_NET_S_ANNOUNCE;
        }
        c[6..8].copy_from_slice(&status.to_le_bytes());
        // max_virtqueue_pairs: one.
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c
    }

    /// The TAP offloads that match what the guest accepted to receive.
    fn tap_offload(acked: u64) -> u32 {
        let mut f = 0;
        if acked & VIRTIO_NET_F_GUEST_CSUM != 0 {
            f |= tap::TUN_F_CSUM;
            if acked & VIRTIO_NET_F_GUEST_TSO4 != 0 {
                f |= tap::TUN_F_TSO4;
            }
            if acked & VIRTIO_NET_F_GUEST_TSO6 != 0 {
                f |= tap::TUN_F_TSO6;
            }
        }
        f
    }

    /// Moves frames from the TAP into receive buffers until either runs out.
    fn receive(&mut self, queues: &mut [Queue]) -> Result<(), QueueError> {
        let Active { mem, interrupt } = Active::get(&self.active)?;
        let Some(queue) = queues.get_mut(RX).filter(|q| q.ready()) else {
            return Ok(());
        };
        let mut used_any = false;
        loop {
            let len = match self.pending.take() {
                Some(len) => len,
                None => match self.tap.read_frame(&mut self.rx_buf) {
                    Ok(len) => len,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("virtio-net: read from {} failed: {e}", self.tap.name());
                        break;
                    }
                },
            };
            if len < tap::VNET_HDR_LEN {
                continue;
            }
            // num_buffers: the frame fits in one chain.
            self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
            let chain = match next_chain(queue, &mem)? {
                Some(chain) => chain,
                // With EVENT_IDX the driver kicks only past the index we
                // name here; buffers that came meanwhile are taken now.
                None if queue.enable_notification(&mem)? => {
                    self.pending = Some(len);
                    continue;
                }
                None => {
                    log::trace!("virtio-net: receive queue full; a frame waits");
                    self.pending = Some(len);
                    break;
                }
            };
            let written = write_to_chain(&mem, &chain.descs, &self.rx_buf[..len]);
            let used = if written == len {
                written
            } else {
                log::debug!(
                    "virtio-net: a {len}-byte frame does not fit a {written}-byte buffer; dropped"
                );
                0
            };
            queue.add_used(&mem, chain.head, used as u32)?;
            used_any = true;
        }
        if used_any && queue.needs_notification(&mem).unwrap_or(true) {
            interrupt.signal_used_queue();
        }
        Ok(())
    }

    /// Sends every frame the driver put on the transmit queue.
    fn transmit(&mut self, queues: &mut [Queue]) -> Result<(), QueueError> {
        let Active { mem, interrupt } = Active::get(&self.active)?;
        let Some(queue) = queues.get_mut(TX).filter(|q| q.ready()) else {
            return Err(QueueError::NoSuchQueue(TX));
        };
        let mut used_any = false;
        loop {
            queue.disable_notification(&mem)?;
            while let Some(chain) = next_chain(queue, &mem)? {
                match chain.read_all(&mem, MAX_FRAME + 1) {
                    Some(f) if f.len() > tap::VNET_HDR_LEN && f.len() <= MAX_FRAME => {
                        if let Err(e) = self.tap.write_frame(&f) {
                            // A full or downed TAP drops the frame, as a wire would.
                            log::debug!("virtio-net: write to {} failed: {e}", self.tap.name());
                        }
                    }
                    _ => log::debug!("virtio-net: malformed transmit chain dropped"),
                }
                queue.add_used(&mem, chain.head, 0)?;
                used_any = true;
            }
            if !queue.enable_notification(&mem)? {
                break;
            }
        }
        if used_any && queue.needs_notification(&mem).unwrap_or(true) {
            interrupt.signal_used_queue();
        }
        Ok(())
    }

    /// Serves the control queue: only the announce acknowledgement is
    /// understood (the only class our features enable).
    fn control(&mut self, queues: &mut [Queue]) -> Result<(), QueueError> {
        let Active { mem, interrupt } = Active::get(&self.active)?;
        let Some(queue) = queues.get_mut(CTRL).filter(|q| q.ready()) else {
            return Err(QueueError::NoSuchQueue(CTRL));
        };
        let mut used_any = false;
        while let Some(chain) = next_chain(queue, &mem)? {
            let mut used = 0;
            if let (Some(hdr), Some(ack)) = (
                chain.descs.iter().find(|d| !d.write && d.len >= 2),
                chain.descs.iter().rev().find(|d| d.write && d.len >= 1),
            ) {
                let mut h = [0u8; 2];
                let answer = match mem.read_slice(&mut h, hdr.addr) {
                    Ok(()) if h == [CTRL_CLASS_ANNOUNCE, CTRL_ANNOUNCE_ACK] => {
                        self.announce = false;
                        CTRL_OK
                    }
                    _ => {
                        log::debug!("virtio-net: control command {h:?} not supported");
                        CTRL_ERR
                    }
                };
                if mem.write_obj(answer, ack.addr).is_ok() {
                    used = 1;
                }
            }
            queue.add_used(&mem, chain.head, used)?;
            used_any = true;
        }
        if used_any {
            interrupt.signal_used_queue();
        }
        Ok(())
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, 64]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_STATUS
            | VIRTIO_NET_F_CTRL_VQ
            | VIRTIO_NET_F_GUEST_ANNOUNCE
            | VIRTIO_NET_F_CSUM
            | VIRTIO_NET_F_GUEST_CSUM
            | VIRTIO_NET_F_HOST_TSO4
            | VIRTIO_NET_F_HOST_TSO6
            | VIRTIO_NET_F_GUEST_TSO4
            | VIRTIO_NET_F_GUEST_TSO6
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked & self.avail_features();
        if let Err(e) = self.tap.set_offload(Self::tap_offload(self.acked_features)) {
            log::warn!("virtio-net: {e}; the guest gets no offloaded frames");
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // The MAC is writable only through VIRTIO_NET_F_CTRL_MAC_ADDR,
        // which is not offered.
        log::debug!("virtio-net: write to config at {offset:#x} ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        Active::activate(&mut self.active, mem, interrupt)
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue]) -> Result<(), QueueError> {
        match index {
            RX => self.receive(queues),
            TX => {
                self.transmit(queues)?;
                // A frame sent may well have an answer waiting already.
                self.receive(queues)
            }
            CTRL => self.control(queues),
            _ => Err(QueueError::NoSuchQueue(index)),
        }
    }

    fn init_backend(&mut self, ops: &mut EventOps) {
        let events = Events::with_data(
            &self.tap,
            TAP_EVENT,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        );
        if let Err(e) = ops.add(events) {
            log::error!("virtio-net: cannot watch TAP {}: {e}", self.tap.name());
        }
    }

    fn backend_event(
        &mut self,
        _events: Events,
        _ops: &mut EventOps,
        queues: Option<&mut [Queue]>,
    ) -> Result<(), QueueError> {
        match queues {
            Some(queues) => self.receive(queues),
            // Not running yet: frames wait in the TAP (and are read once
            // the driver adds receive buffers).
            None => Ok(()),
        }
    }

    fn restored(&mut self, queues: &mut [Queue]) -> Result<bool, QueueError> {
        // Whatever the TAP queued while the VM was away is delivered now.
        self.receive(queues)?;
        if self.acked_features & VIRTIO_NET_F_GUEST_ANNOUNCE != 0 {
            self.announce = true;
            return Ok(true);
        }
        Ok(false)
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.announce = false;
        self.pending = None;
        if let Err(e) = self.tap.set_offload(0) {
            log::warn!("virtio-net: {e}");
        }
    }

    fn quiesce(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_macs_are_local_unicast() {
        let r = random_mac();
        assert_eq!(r[0], 0x02);
        assert_ne!(random_mac(), r);
    }

    #[test]
    fn offloads_follow_what_the_guest_accepted() {
        assert_eq!(Net::tap_offload(VIRTIO_NET_F_GUEST_TSO4), 0);
        assert_eq!(
            Net::tap_offload(VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4),
            tap::TUN_F_CSUM | tap::TUN_F_TSO4
        );
    }
}
