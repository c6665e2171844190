//! virtio-blk backed by a raw disk image file.
//!
//! Requests are served synchronously on the vCPU thread that notified the
//! queue: when the driver sees a request complete, a write has reached the
//! file (and a flush the disk), and a paused VM has no request in flight.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes};

use super::chain::{next_chain, Desc};
use super::{
    read_config_bytes, ActivateError, Active, Interrupt, QueueError, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

mod overlay;
mod persist;
pub mod pre_write;
pub use overlay::{Overlay, OverlayError, BLOCK as OVERLAY_BLOCK};
pub use persist::BlockState;

/// virtio device id of a block device.
pub const TYPE_BLOCK: u32 = 2;
pub const SECTOR_SIZE: u64 = 512;
/// The one request queue's size.
pub const QUEUE_SIZE: u16 = 256;
/// Serial number returned for VIRTIO_BLK_T_GET_ID, at most this long.
pub const ID_BYTES: usize = 20;
/// Data segments per request offered to the driver (VIRTIO_BLK_F_SEG_MAX):
/// with the header and status descriptors a request fits in half the queue.
pub const SEG_MAX: u32 = (QUEUE_SIZE / 2 - 2) as u32;

pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Size of struct virtio_blk_req's header: type, reserved, sector.
const HEADER_LEN: u32 = 16;
/// Bounce buffer between guest memory and the file, per step.
const CHUNK: usize = 64 << 10;
/// Configuration space: capacity (u64), size_max (u32), seg_max (u32).
const CONFIG_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot read the disk image's size: {0}")]
    Size(std::io::Error),
    #[error("disk image size {0} is not a multiple of 512 bytes")]
    NotSectorAligned(u64),
    #[error("disk id {0:?} is longer than {ID_BYTES} bytes")]
    IdTooLong(String),
    #[error("the disk image is {actual} bytes, the saved device had {saved}: not the same disk")]
    SizeChanged { saved: u64, actual: u64 },
    #[error("the saved block device offered features {saved:#x}, this one offers {now:#x}")]
    FeaturesChanged { saved: u64, now: u64 },
    #[error("the saved block device has features {acked:#x} acknowledged that it does not offer ({offered:#x})")]
    AckedNotOffered { acked: u64, offered: u64 },
}

/// What a block device reads and writes.
pub enum Backing {
    /// The image itself (read-write unless the device is read-only).
    File(File),
    /// A copy-on-write view of the image: it is only read.
    Overlay(Overlay),
}

impl Backing {
    fn len(&self) -> std::io::Result<u64> {
        match self {
            Backing::File(f) => Ok(f.metadata()?.len()),
            Backing::Overlay(o) => Ok(o.len()),
        }
    }

    /// The file that names the image (the base of an overlay).
    fn image(&self) -> &File {
        match self {
            Backing::File(f) => f,
            Backing::Overlay(o) => o.base(),
        }
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        match self {
            Backing::File(f) => f.read_exact_at(buf, off),
            Backing::Overlay(o) => o.read_at(buf, off),
        }
    }

    fn write_at(&mut self, buf: &[u8], off: u64) -> std::io::Result<()> {
        match self {
            Backing::File(f) => f.write_all_at(buf, off),
            Backing::Overlay(o) => o.write_at(buf, off),
        }
    }

    /// Makes written data durable; an overlay's data dies with the VM, so
    /// there is nothing to make durable.
    fn sync(&self) -> std::io::Result<()> {
        match self {
            Backing::File(f) => f.sync_data(),
            Backing::Overlay(_) => Ok(()),
        }
    }
}

pub struct Block {
    disk: Backing,
    path: PathBuf,
    disk_size: u64,
    read_only: bool,
    id: String,
    acked_features: u64,
    active: Option<Active>,
    config: [u8; CONFIG_LEN],
    /// While another process reads the disk as it was (a snapshot's
    /// writer): blocks are copied there before they are written.
    pre_write: std::sync::Mutex<Option<pre_write::PreWriteLog>>,
}

impl Block {
    /// A block device serving `disk` (a file opened read-write unless
    /// `read_only`); `id` (at most 20 bytes) is what VIRTIO_BLK_T_GET_ID
    /// returns. The image's path, recorded in the saved state, is found from
    /// the file descriptor; [`Block::with_path`] overrides it.
    pub fn new(disk: Backing, read_only: bool, id: String) -> Result<Self, BlockError> {
        if id.len() > ID_BYTES {
            return Err(BlockError::IdTooLong(id));
        }
        let disk_size = disk.len().map_err(BlockError::Size)?;
        if disk_size % SECTOR_SIZE != 0 {
            return Err(BlockError::NotSectorAligned(disk_size));
        }
        let path = std::fs::read_link(format!("/proc/self/fd/{}", disk.image().as_raw_fd()))
            .unwrap_or_default();
        let mut config = [0u8; CONFIG_LEN];
        config[..8].copy_from_slice(&(disk_size / SECTOR_SIZE).to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        Ok(Block {
            disk,
            path,
            disk_size,
            read_only,
            id,
            acked_features: 0,
            active: None,
            config,
            pre_write: std::sync::Mutex::new(None),
        })
    }

    /// From now on, until called with `None`, copies each block into
    /// `log` before the guest first writes it, so that a reader of the
    /// disk in another process sees it as it is now
    /// ([`pre_write::patch_from_log`]). Call it with the device parked.
    /// How many blocks the log it replaces had copied.
    pub fn keep_for_reader(&self, log: Option<File>) -> std::io::Result<u64> {
        let log = log
            .map(|f| pre_write::PreWriteLog::new(f, self.disk_size))
            .transpose()?;
        let old = std::mem::replace(
            &mut *self
                .pre_write
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            log,
        );
        Ok(old.map_or(0, |l| l.kept()))
    }

    /// Records where the image lives (kept in [`BlockState::path`]).
    pub fn with_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.path = path.into();
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The image's size in bytes.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The copy-on-write view, if the device has one.
    pub fn overlay(&self) -> Option<&Overlay> {
        match &self.disk {
            Backing::Overlay(o) => Some(o),
            Backing::File(_) => None,
        }
    }

    /// Serves one request chain; returns the used length (bytes written into
    /// the driver's buffers, status byte included). A chain without a
    /// writable status byte at its end gets no answer but is still returned.
    fn handle(&mut self, mem: &GuestMemoryMmap, chain: &[Desc]) -> u32 {
        let Some((status, rest)) = chain.split_last() else {
            log::debug!("virtio-blk: empty descriptor chain");
            return 0;
        };
        if !status.write || status.len < 1 {
            log::debug!("virtio-blk: request without a writable status byte");
            return 0;
        }
        let (code, written) = self.execute(mem, rest);
        if code != VIRTIO_BLK_S_OK {
            log::debug!("virtio-blk: request failed with status {code}");
        }
        if let Err(e) = mem.write_obj(code, status.addr) {
            log::debug!("virtio-blk: cannot write the status byte: {e}");
            return written;
        }
        written.saturating_add(1)
    }

    /// Runs the request in `chain` (header and data, no status); returns the
    /// status and how many bytes went into the driver's buffers.
    fn execute(&mut self, mem: &GuestMemoryMmap, chain: &[Desc]) -> (u8, u32) {
        let Some((hdr, data)) = chain.split_first() else {
            return (VIRTIO_BLK_S_IOERR, 0);
        };
        if hdr.write || hdr.len < HEADER_LEN {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let mut h = [0u8; HEADER_LEN as usize];
        if mem.read_slice(&mut h, hdr.addr).is_err() {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let req_type = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        match req_type {
            T_IN => self.read_to_guest(mem, sector, data),
            T_OUT if self.read_only => (VIRTIO_BLK_S_IOERR, 0),
            T_OUT => (self.write_from_guest(mem, sector, data), 0),
            T_FLUSH => match self.disk.sync() {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(e) => {
                    log::warn!("virtio-blk: flush of {} failed: {e}", self.path.display());
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            },
            T_GET_ID => {
                let Some(d) = data.first().filter(|d| d.write) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                let mut id = [0u8; ID_BYTES];
                id[..self.id.len()].copy_from_slice(self.id.as_bytes());
                let n = (d.len as usize).min(ID_BYTES);
                match mem.write_slice(&id[..n], d.addr) {
                    Ok(()) => (VIRTIO_BLK_S_OK, n as u32),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            other => {
                log::debug!("virtio-blk: unsupported request type {other}");
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
        }
    }

    /// The byte offset of `sector` if `data` fits on the disk from there.
    fn offset_for(&self, sector: u64, data: &[Desc]) -> Option<u64> {
        let total: u64 = data.iter().map(|d| u64::from(d.len)).sum();
        let start = sector.checked_mul(SECTOR_SIZE)?;
        let end = start.checked_add(total)?;
        (end <= self.disk_size).then_some(start)
    }

    fn read_to_guest(&self, mem: &GuestMemoryMmap, sector: u64, data: &[Desc]) -> (u8, u32) {
        if data.iter().any(|d| !d.write) {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let Some(mut off) = self.offset_for(sector, data) else {
            log::debug!("virtio-blk: read past the end of the disk at sector {sector}");
            return (VIRTIO_BLK_S_IOERR, 0);
        };
        let mut buf = vec![0u8; CHUNK];
        let mut written = 0u32;
        for d in data {
            let mut done = 0u32;
            while done < d.len {
                let n = ((d.len - done) as usize).min(CHUNK);
                let ok = d.addr.checked_add(u64::from(done)).is_some_and(|addr| {
                    self.disk.read_at(&mut buf[..n], off).is_ok()
                        && mem.write_slice(&buf[..n], addr).is_ok()
                });
                if !ok {
                    return (VIRTIO_BLK_S_IOERR, written);
                }
                off += n as u64;
                done += n as u32;
                written = written.saturating_add(n as u32);
            }
        }
        (VIRTIO_BLK_S_OK, written)
    }

    fn write_from_guest(&mut self, mem: &GuestMemoryMmap, sector: u64, data: &[Desc]) -> u8 {
        if data.iter().any(|d| d.write) {
            return VIRTIO_BLK_S_IOERR;
        }
        let Some(mut off) = self.offset_for(sector, data) else {
            log::debug!("virtio-blk: write past the end of the disk at sector {sector}");
            return VIRTIO_BLK_S_IOERR;
        };
        let mut buf = vec![0u8; CHUNK];
        for d in data {
            let mut done = 0u32;
            while done < d.len {
                let n = ((d.len - done) as usize).min(CHUNK);
                let ok = d
                    .addr
                    .checked_add(u64::from(done))
                    .is_some_and(|addr| mem.read_slice(&mut buf[..n], addr).is_ok());
                if !ok {
                    return VIRTIO_BLK_S_IOERR;
                }
                let disk = &self.disk;
                let pre_write = self
                    .pre_write
                    .get_mut()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(log) = pre_write {
                    if let Err(e) = log.before_write(off, n as u64, |b, o| disk.read_at(b, o)) {
                        log::warn!(
                            "virtio-blk: a write to {} cannot wait for the snapshot being written: {e}",
                            self.path.display()
                        );
                        return VIRTIO_BLK_S_IOERR;
                    }
                }
                if let Err(e) = self.disk.write_at(&buf[..n], off) {
                    log::warn!("virtio-blk: write to {} failed: {e}", self.path.display());
                    return VIRTIO_BLK_S_IOERR;
                }
                off += n as u64;
                done += n as u32;
            }
        }
        VIRTIO_BLK_S_OK
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
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_SEG_MAX
            | ro
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("virtio-blk: write to read-only config at {offset:#x} ignored");
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
        let mut used_any = false;
        loop {
            queue.disable_notification(&mem)?;
            let mut popped = 0usize;
            while let Some(chain) = next_chain(queue, &mem)? {
                let len = self.handle(&mem, &chain.descs);
                log::trace!(
                    "virtio-blk: head {}: {} descriptors, used {len}",
                    chain.head,
                    chain.descs.len()
                );
                queue.add_used(&mem, chain.head, len)?;
                used_any = true;
                popped += 1;
            }
            // With EVENT_IDX this also tells the driver where to kick next;
            // true means buffers arrived meanwhile.
            if !queue.enable_notification(&mem)? {
                break;
            }
            if popped == 0 {
                return Err(QueueError::Stuck);
            }
        }
        if used_any && queue.needs_notification(&mem).unwrap_or(true) {
            interrupt.signal_used_queue();
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
    }

    fn quiesce(&mut self) -> std::io::Result<()> {
        self.disk.sync()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::*;
    use crate::virtio::INT_USED_RING;
    use std::io::Write;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    use vmm_sys_util::tempfile::TempFile;

    const HDR: u64 = DATA;
    const BUF: u64 = DATA + 0x1000;
    const STATUS: u64 = DATA + 0x100;

    /// A 64 KiB disk whose sector n is filled with byte n.
    fn disk() -> TempFile {
        let t = TempFile::new().unwrap();
        let mut f = t.as_file();
        for n in 0..128u8 {
            f.write_all(&[n; 512]).unwrap();
        }
        t
    }

    struct Rig {
        block: Block,
        queue: Queue,
        drv: Driver,
        irq: EventFd,
        interrupt: Arc<Interrupt>,
    }

    fn rig(file: File, read_only: bool) -> Rig {
        let mem = memory();
        let mut block = Block::new(Backing::File(file), read_only, "disk0".into()).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
        let queue = ready_queue(QUEUE_SIZE);
        block.activate(mem.clone(), interrupt.clone()).unwrap();
        Rig {
            block,
            queue,
            drv: Driver::new(mem),
            irq,
            interrupt,
        }
    }

    impl Rig {
        /// Submits a request (header, then `data` buffers, then the status
        /// byte); returns (status, used length).
        fn request(&mut self, req_type: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
            let mut hdr = [0u8; 16];
            hdr[..4].copy_from_slice(&req_type.to_le_bytes());
            hdr[8..].copy_from_slice(&sector.to_le_bytes());
            self.drv.mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
            self.drv
                .mem
                .write_obj(0xffu8, GuestAddress(STATUS))
                .unwrap();
            let mut chain = vec![(HDR, 16, false)];
            chain.extend_from_slice(data);
            chain.push((STATUS, 1, true));
            let before = self.drv.used_idx();
            let head = self.drv.add_chain(&chain);
            self.block
                .process_queue(0, std::slice::from_mut(&mut self.queue))
                .unwrap();
            assert_eq!(self.drv.used_idx(), before.wrapping_add(1));
            let (id, len) = self.drv.used(before);
            assert_eq!(id, u32::from(head));
            (self.drv.byte(STATUS), len)
        }
    }

    #[test]
    fn read_sectors() {
        let t = disk();
        let mut r = rig(t.as_file().try_clone().unwrap(), false);
        // Two buffers: sector 3 and sectors 4-5.
        let (st, len) = r.request(T_IN, 3, &[(BUF, 512, true), (BUF + 0x1000, 1024, true)]);
        assert_eq!((st, len), (VIRTIO_BLK_S_OK, 1024 + 512 + 1));
        assert_eq!(r.drv.bytes(BUF, 512), vec![3u8; 512]);
        assert_eq!(r.drv.bytes(BUF + 0x1000, 512), vec![4u8; 512]);
        assert_eq!(r.drv.bytes(BUF + 0x1200, 512), vec![5u8; 512]);
        assert_eq!(r.irq.read().unwrap(), 1);
        assert_eq!(r.interrupt.status() & INT_USED_RING, INT_USED_RING);
    }

    #[test]
    fn write_reaches_the_file_and_flush() {
        let t = disk();
        let mut r = rig(t.as_file().try_clone().unwrap(), false);
        r.drv
            .mem
            .write_slice(&[0xabu8; 1024], GuestAddress(BUF))
            .unwrap();
        let (st, len) = r.request(T_OUT, 10, &[(BUF, 1024, false)]);
        assert_eq!((st, len), (VIRTIO_BLK_S_OK, 1));
        let mut back = vec![0u8; 1536];
        t.as_file().read_exact_at(&mut back, 9 * 512).unwrap();
        assert_eq!(&back[..512], &[9u8; 512][..]);
        assert_eq!(&back[512..], &[0xabu8; 1024][..]);
        assert_eq!(r.request(T_FLUSH, 0, &[]), (VIRTIO_BLK_S_OK, 1));
    }

    #[test]
    fn large_request_crosses_bounce_chunks() {
        let t = TempFile::new().unwrap();
        t.as_file().set_len(256 << 10).unwrap();
        let mut r = rig(t.as_file().try_clone().unwrap(), false);
        let pattern: Vec<u8> = (0..(200u32 << 10)).map(|i| (i % 251) as u8).collect();
        r.drv
            .mem
            .write_slice(&pattern, GuestAddress(0x4_0000))
            .unwrap();
        let n = pattern.len() as u32;
        assert_eq!(
            r.request(T_OUT, 8, &[(0x4_0000, n, false)]).0,
            VIRTIO_BLK_S_OK
        );
        let (st, len) = r.request(T_IN, 8, &[(0x8_0000, n, true)]);
        assert_eq!((st, len), (VIRTIO_BLK_S_OK, n + 1));
        assert_eq!(r.drv.bytes(0x8_0000, pattern.len()), pattern);
    }

    #[test]
    fn get_id() {
        let t = disk();
        let mut r = rig(t.as_file().try_clone().unwrap(), false);
        let (st, len) = r.request(T_GET_ID, 0, &[(BUF, 20, true)]);
        assert_eq!((st, len), (VIRTIO_BLK_S_OK, 21));
        let mut want = b"disk0".to_vec();
        want.resize(20, 0);
        assert_eq!(r.drv.bytes(BUF, 20), want);
        assert!(Block::new(
            Backing::File(t.as_file().try_clone().unwrap()),
            false,
            "x".repeat(21)
        )
        .is_err());
    }

    #[test]
    fn bad_requests() {
        let t = disk();
        let mut r = rig(t.as_file().try_clone().unwrap(), false);
        // Unknown type (discard).
        assert_eq!(
            r.request(11, 0, &[(BUF, 512, false)]).0,
            VIRTIO_BLK_S_UNSUPP
        );
        // Past the end: the disk has 128 sectors.
        assert_eq!(
            r.request(T_IN, 128, &[(BUF, 512, true)]),
            (VIRTIO_BLK_S_IOERR, 1)
        );
        assert_eq!(
            r.request(T_IN, 127, &[(BUF, 1024, true)]).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            r.request(T_OUT, u64::MAX, &[(BUF, 512, false)]).0,
            VIRTIO_BLK_S_IOERR
        );
        // Wrong buffer directions.
        assert_eq!(
            r.request(T_IN, 0, &[(BUF, 512, false)]).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            r.request(T_OUT, 0, &[(BUF, 512, true)]).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(r.request(T_GET_ID, 0, &[]).0, VIRTIO_BLK_S_IOERR);
        // A buffer outside guest memory.
        let outside = MEM_SIZE as u64 - 256;
        assert_eq!(
            r.request(T_IN, 0, &[(outside, 512, true)]).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            r.request(T_OUT, 0, &[(outside, 512, false)]).0,
            VIRTIO_BLK_S_IOERR
        );
        // Nothing was written by the failed writes.
        let mut back = [0u8; 512];
        t.as_file().read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, [0u8; 512]);
        // A header that is device-writable, or too short.
        let head = r.drv.add_chain(&[(HDR, 16, true), (STATUS, 1, true)]);
        r.block
            .process_queue(0, std::slice::from_mut(&mut r.queue))
            .unwrap();
        assert_eq!(r.drv.byte(STATUS), VIRTIO_BLK_S_IOERR);
        let head2 = r.drv.add_chain(&[(HDR, 8, false), (STATUS, 1, true)]);
        r.block
            .process_queue(0, std::slice::from_mut(&mut r.queue))
            .unwrap();
        assert_eq!(r.drv.byte(STATUS), VIRTIO_BLK_S_IOERR);
        // No status byte at all: returned with nothing written.
        let head3 = r.drv.add_chain(&[(HDR, 16, false)]);
        r.block
            .process_queue(0, std::slice::from_mut(&mut r.queue))
            .unwrap();
        let last = r.drv.used_idx().wrapping_sub(1);
        assert_eq!(r.drv.used(last), (u32::from(head3), 0));
        assert!(head != head2);
    }

    #[test]
    fn read_only_refuses_writes() {
        let t = disk();
        let mut r = rig(t.as_file().try_clone().unwrap(), true);
        assert_ne!(r.block.avail_features() & VIRTIO_BLK_F_RO, 0);
        assert_eq!(
            r.request(T_OUT, 0, &[(BUF, 512, false)]).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(r.request(T_IN, 1, &[(BUF, 512, true)]).0, VIRTIO_BLK_S_OK);
    }

    #[test]
    fn config_space() {
        let t = disk();
        let b = Block::new(
            Backing::File(t.as_file().try_clone().unwrap()),
            false,
            "d".into(),
        )
        .unwrap();
        let mut cap = [0u8; 8];
        b.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 128);
        let mut seg = [0u8; 4];
        b.read_config(12, &mut seg);
        assert_eq!(u32::from_le_bytes(seg), SEG_MAX);
        // Past the end, and absurd offsets, read as zero.
        let mut w = [0xffu8; 4];
        b.read_config(14, &mut w);
        assert_eq!(w, [0, 0, 0, 0]);
        b.read_config(u64::MAX, &mut w);
        assert_eq!(w, [0; 4]);
        assert_eq!(b.path(), t.as_path());
    }

    #[test]
    fn not_activated_and_bad_avail_index() {
        let t = disk();
        let mut r = rig(t.as_file().try_clone().unwrap(), false);
        // An available index far ahead of the device is a broken driver.
        r.drv
            .mem
            .write_obj(QSIZE + 5, GuestAddress(AVAIL + 2))
            .unwrap();
        assert!(r
            .block
            .process_queue(0, std::slice::from_mut(&mut r.queue))
            .is_err());
        assert!(r
            .block
            .process_queue(1, std::slice::from_mut(&mut r.queue))
            .is_err());
        r.block.reset();
        assert!(matches!(
            r.block.process_queue(0, std::slice::from_mut(&mut r.queue)),
            Err(QueueError::NotActivated)
        ));
    }

    #[test]
    fn event_idx_publishes_avail_event() {
        let t = disk();
        let mut r = rig(t.as_file().try_clone().unwrap(), false);
        r.queue.set_event_idx(true);
        r.request(T_IN, 0, &[(BUF, 512, true)]);
        r.request(T_IN, 1, &[(BUF, 512, true)]);
        // avail_event (after the used ring) tells the driver to kick at 2.
        let avail_event: u16 = r
            .drv
            .mem
            .read_obj(GuestAddress(USED + 4 + 8 * u64::from(QSIZE)))
            .unwrap();
        assert_eq!(avail_event, 2);
    }
}
