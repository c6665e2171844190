//! virtio-blk backed by a raw disk image file.
//!
//! Requests are served synchronously on the vCPU thread that notified the
//! queue, so a paused VM has no request in flight and writes have reached the
//! file (flushes reach the disk) by the time the driver sees them complete.

use std::fs::File;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{ActivateError, DeviceState, Interrupt, VirtioDevice};

pub const TYPE_BLOCK: u32 = 2;
const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// Serial number returned for VIRTIO_BLK_T_GET_ID, at most this long.
const ID_BYTES: usize = 20;

const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Largest data a single request may move; bounds the bounce buffer.
const MAX_REQUEST_BYTES: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot read the disk image's size: {0}")]
    Size(std::io::Error),
    #[error("disk image size {0} is not a multiple of 512 bytes")]
    NotSectorAligned(u64),
    #[error("the disk image is {actual} bytes, the saved device had {saved}")]
    SizeChanged { saved: u64, actual: u64 },
}

/// The device's own state; the disk contents are saved separately.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub disk_size: u64,
    pub read_only: bool,
    pub id: String,
    pub acked_features: u64,
}

pub struct Block {
    file: File,
    disk_size: u64,
    read_only: bool,
    id: String,
    acked_features: u64,
    mem: Option<GuestMemoryMmap>,
    config: [u8; 8],
}

impl Block {
    pub fn new(file: File, read_only: bool, id: String) -> Result<Self, BlockError> {
        let disk_size = file.metadata().map_err(BlockError::Size)?.len();
        if disk_size % SECTOR_SIZE != 0 {
            return Err(BlockError::NotSectorAligned(disk_size));
        }
        Ok(Block {
            file,
            disk_size,
            read_only,
            id,
            acked_features: 0,
            mem: None,
            config: (disk_size / SECTOR_SIZE).to_le_bytes(),
        })
    }

    /// Rebuilds the device around `file`, which must still have the saved size.
    pub fn restore(file: File, s: &BlockState) -> Result<Self, BlockError> {
        let mut b = Block::new(file, s.read_only, s.id.clone())?;
        if b.disk_size != s.disk_size {
            return Err(BlockError::SizeChanged {
                saved: s.disk_size,
                actual: b.disk_size,
            });
        }
        b.acked_features = s.acked_features;
        Ok(b)
    }

    /// Serves one request; returns the status byte and how many bytes were
    /// written into the driver's buffers (status byte included).
    fn serve(&self, mem: &GuestMemoryMmap, chain: &[(GuestAddress, u32, bool)]) -> (u8, u32) {
        // Header (readable), data buffers, status byte (the last, writable).
        let Some((&(hdr_addr, hdr_len, hdr_w), rest)) = chain.split_first() else {
            return (S_IOERR, 0);
        };
        let Some((&(status_addr, status_len, status_w), data)) = rest.split_last() else {
            return (S_IOERR, 0);
        };
        if hdr_w || hdr_len < 16 || !status_w || status_len < 1 {
            return (S_IOERR, 0);
        }
        let mut hdr = [0u8; 16];
        if mem.read_slice(&mut hdr, hdr_addr).is_err() {
            return (S_IOERR, 0);
        }
        let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or([0; 8]));
        let (status, written) = self.execute(mem, req_type, sector, data);
        if mem.write_obj(status, status_addr).is_err() {
            return (S_IOERR, 0);
        }
        (status, written + 1)
    }

    fn execute(
        &self,
        mem: &GuestMemoryMmap,
        req_type: u32,
        sector: u64,
        data: &[(GuestAddress, u32, bool)],
    ) -> (u8, u32) {
        let total: u64 = data.iter().map(|d| u64::from(d.1)).sum();
        let in_range = || {
            sector
                .checked_mul(SECTOR_SIZE)
                .and_then(|o| o.checked_add(total).map(|end| (o, end)))
                .filter(|&(_, end)| end <= self.disk_size && total <= MAX_REQUEST_BYTES)
                .map(|(o, _)| o)
        };
        match req_type {
            T_IN => {
                let Some(mut off) = in_range() else {
                    return (S_IOERR, 0);
                };
                if data.iter().any(|d| !d.2) {
                    return (S_IOERR, 0);
                }
                let mut written = 0u32;
                for &(addr, len, _) in data {
                    let mut buf = vec![0u8; len as usize];
                    if self.file.read_exact_at(&mut buf, off).is_err()
                        || mem.write_slice(&buf, addr).is_err()
                    {
                        return (S_IOERR, written);
                    }
                    off += u64::from(len);
                    written += len;
                }
                (S_OK, written)
            }
            T_OUT => {
                if self.read_only {
                    return (S_IOERR, 0);
                }
                let Some(mut off) = in_range() else {
                    return (S_IOERR, 0);
                };
                if data.iter().any(|d| d.2) {
                    return (S_IOERR, 0);
                }
                for &(addr, len, _) in data {
                    let mut buf = vec![0u8; len as usize];
                    if mem.read_slice(&mut buf, addr).is_err()
                        || self.file.write_all_at(&buf, off).is_err()
                    {
                        return (S_IOERR, 0);
                    }
                    off += u64::from(len);
                }
                (S_OK, 0)
            }
            T_FLUSH => match self.file.sync_data() {
                Ok(()) => (S_OK, 0),
                Err(e) => {
                    log::warn!("virtio-blk: flush failed: {e}");
                    (S_IOERR, 0)
                }
            },
            T_GET_ID => {
                let Some(&(addr, len, true)) = data.first() else {
                    return (S_IOERR, 0);
                };
                let mut id = [0u8; ID_BYTES];
                let n = self.id.len().min(ID_BYTES);
                id[..n].copy_from_slice(&self.id.as_bytes()[..n]);
                let n = (len as usize).min(ID_BYTES);
                match mem.write_slice(&id[..n], addr) {
                    Ok(()) => (S_OK, n as u32),
                    Err(_) => (S_IOERR, 0),
                }
            }
            _ => (S_UNSUPP, 0),
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        let ro = if self.read_only { VIRTIO_BLK_F_RO } else { 0 };
        super::VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_RING_F_EVENT_IDX | ro
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let start = offset as usize;
        if let Some(src) = self.config.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("virtio-blk: write to read-only config at {offset:#x} ignored");
    }

    fn activate(&mut self, mem: GuestMemoryMmap) -> Result<(), ActivateError> {
        self.mem = Some(mem);
        Ok(())
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, interrupt: &Interrupt) {
        let Some(mem) = self.mem.clone() else { return };
        if index != 0 {
            return;
        }
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let descs: Vec<(GuestAddress, u32, bool)> = chain
                .take(usize::from(QUEUE_SIZE))
                .map(|d| (d.addr(), d.len(), d.is_write_only()))
                .collect();
            let (status, len) = self.serve(&mem, &descs);
            log::trace!(
                "virtio-blk: head {head}: {} descriptors, status {status}, {len} bytes",
                descs.len()
            );
            if status != S_OK {
                log::debug!("virtio-blk: request at head {head} failed with status {status}");
            }
            if let Err(e) = queue.add_used(&mem, head, len) {
                log::warn!("virtio-blk: cannot return a used buffer: {e}");
                break;
            }
            used_any = true;
        }
        if used_any {
            let notify = queue.needs_notification(&mem).unwrap_or(true);
            log::trace!("virtio-blk: notify driver: {notify}");
            if notify {
                interrupt.signal_used_queue();
            }
        }
    }

    fn reset(&mut self) {
        self.mem = None;
        self.acked_features = 0;
    }

    fn save_device(&self) -> DeviceState {
        DeviceState::Block(BlockState {
            disk_size: self.disk_size,
            read_only: self.read_only,
            id: self.id.clone(),
            acked_features: self.acked_features,
        })
    }
}
