//! Lazy restore: a restored VM runs before its memory is in, and the
//! page-server thread brings memory in from the image as it is touched.
//!
//! Guest RAM is registered with userfaultfd (missing mode) while it is
//! still empty. A first touch of a page, by a vCPU through KVM or by any
//! VMM thread through its mapping (a device filling a buffer, the snapshot
//! writer), blocks in the kernel and reaches this thread as a fault event;
//! the thread reads the chunk holding the page from the image (positioned
//! read, checksums checked), decodes it and copies the whole chunk in at
//! once (UFFDIO_COPY; long runs of zero pages as the kernel's zero page,
//! UFFDIO_ZEROPAGE), which wakes whoever waits. Between faults it fills
//! the chunks nobody asked for yet, in address order, so the VM soon stops
//! faulting; with every chunk in, it unregisters the memory and ends.
//! (Collapsing the filled memory into huge pages then, MADV_COLLAPSE, made
//! the guest's first pass over 1 GiB slower, 1.1 s against 0.8 s: it
//! competes with the guest and remaps what KVM had already mapped.)
//!
//! Faults come first: the thread polls the userfaultfd before each chunk it
//! fills. A chunk the image cannot supply (a checksum mismatch, the file cut
//! short) ends the process with a message naming the chunk: the guest must
//! never run on memory that is not its own, and a vCPU waiting for that
//! chunk cannot be woken any other way.
//!
//! The thread never touches guest memory through the mapping itself: a
//! fault it raised would wait for itself.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use linux_raw_sys::general::{
    uffdio_api, uffdio_copy, uffdio_range, uffdio_register, uffdio_zeropage,
    UFFDIO_REGISTER_MODE_MISSING, UFFD_API, UFFD_EVENT_PAGEFAULT,
};
use snapshot::{ChunkLocation, Decoder, PAGE_SIZE};

use crate::memory::GuestRam;

#[derive(Debug, thiserror::Error)]
pub enum PageServerError {
    #[error("cannot open a userfaultfd for lazy restore (it needs root, or vm.unprivileged_userfaultfd=1); restore with --eager")]
    Open(#[source] std::io::Error),
    #[error("cannot register guest memory with userfaultfd")]
    Register(#[source] std::io::Error),
    #[error("cannot create the page server's stop eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot start the page-server thread")]
    Thread(#[source] std::io::Error),
}

/// A seekable image's memory, to be fetched as it is touched.
pub struct LazyMemory {
    /// The image file (positioned reads only).
    pub file: File,
    /// Its memory chunks, in guest-physical order (`snapshot::memory_chunks`).
    pub chunks: Vec<ChunkLocation>,
    /// Names the image in errors.
    pub source: String,
}

/// How far the fill has got, for waiters and reports.
#[derive(Debug, Default, Clone, Copy)]
pub struct FillStats {
    /// Chunks copied in because something touched them.
    pub on_fault: u64,
    /// Chunks copied in by the background fill.
    pub in_background: u64,
    /// Fault events read (several may land on one chunk).
    pub faults: u64,
    /// Every chunk is in and the memory is ordinary again.
    pub done: bool,
    /// Milliseconds from the start to the last chunk.
    pub fill_ms: u64,
}

struct Shared {
    stats: Mutex<FillStats>,
    changed: Condvar,
}

/// The running page server. Dropping it stops the thread (a VM being torn
/// down: its vCPUs have ended); it must go before the memory it serves.
pub struct PageServer {
    /// An eventfd: written once, it stops the thread.
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

/// Zero runs shorter than this are copied with the data around them: one
/// UFFDIO_COPY costs more than copying a few zero pages.
const MIN_ZERO_RUN: usize = 16;

/// One RAM region as the page server sees it.
#[derive(Clone, Copy)]
struct Region {
    gpa: u64,
    host: usize,
    len: usize,
}

impl PageServer {
    /// Registers all of `ram` (untouched so far) with a new userfaultfd and
    /// starts the thread that serves it from `image`.
    pub fn start(ram: &GuestRam, image: LazyMemory) -> Result<Self, PageServerError> {
        let uffd = Userfault::open().map_err(PageServerError::Open)?;
        let regions: Vec<Region> = ram
            .slices()
            .into_iter()
            .map(|(gpa, bytes)| Region {
                gpa,
                host: bytes.as_ptr() as usize,
                len: bytes.len(),
            })
            .collect();
        for r in &regions {
            uffd.register(r.host, r.len)
                .map_err(PageServerError::Register)?;
        }
        let stop = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map_err(|e| PageServerError::EventFd(e.into()))?;
        let stop_wait = stop.try_clone().map_err(PageServerError::EventFd)?;
        let shared = Arc::new(Shared {
            stats: Mutex::new(FillStats::default()),
            changed: Condvar::new(),
        });
        let filler = Filler {
            // Off only to see what a guest touches by itself (and to test
            // the fault path alone): `VMM_LAZY_BACKGROUND=0`.
            background: std::env::var_os("VMM_LAZY_BACKGROUND").is_none_or(|v| v != "0"),
            served: vec![false; image.chunks.len()],
            remaining: image.chunks.len(),
            image,
            regions,
            uffd,
            decoder: Decoder::default(),
            staging: Vec::new(),
            shared: shared.clone(),
            started: Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name("page-server".into())
            .spawn(move || filler.run(stop_wait))
            .map_err(PageServerError::Thread)?;
        Ok(PageServer {
            stop,
            thread: Some(thread),
            shared,
        })
    }

    /// Where the fill stands.
    pub fn stats(&self) -> FillStats {
        *lock(&self.shared.stats)
    }

    /// Waits until every chunk is in.
    pub fn wait_filled(&self) -> FillStats {
        let mut s = lock(&self.shared.stats);
        while !s.done {
            s = self
                .shared
                .changed
                .wait(s)
                .unwrap_or_else(|e| e.into_inner());
        }
        *s
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        let _ = rustix::io::write(&self.stop, &1u64.to_ne_bytes());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The thread's side.
struct Filler {
    image: LazyMemory,
    regions: Vec<Region>,
    uffd: Userfault,
    /// Fill what nobody asked for between faults.
    background: bool,
    served: Vec<bool>,
    remaining: usize,
    decoder: Decoder,
    /// One chunk's pages, decoded.
    staging: Vec<u8>,
    shared: Arc<Shared>,
    started: Instant,
}

impl Filler {
    fn run(mut self, stop: OwnedFd) {
        if let Err(e) = crate::seccomp::confine_this_thread(crate::seccomp::ThreadKind::PageServer)
        {
            self.fatal(&format!("the page server cannot be confined: {e}"));
        }
        let mut events = Vec::new();
        let mut next_fill = 0usize;
        loop {
            let busy = self.remaining > 0 && self.background;
            let (faults, stopped) = wait(&self.uffd, &stop, busy);
            if stopped {
                return;
            }
            if faults {
                self.serve_faults(&mut events);
            } else if busy {
                while self.served.get(next_fill) == Some(&true) {
                    next_fill += 1;
                }
                if next_fill < self.served.len() {
                    self.serve(next_fill, false);
                }
            }
            if self.remaining == 0 {
                self.finish();
                return;
            }
        }
    }

    fn serve_faults(&mut self, addrs: &mut Vec<usize>) {
        if let Err(e) = self.uffd.read_faults(addrs) {
            self.fatal(&format!("cannot read the userfaultfd: {e}"));
        }
        lock(&self.shared.stats).faults += addrs.len() as u64;
        for addr in std::mem::take(addrs) {
            match self.chunk_of(addr) {
                Some(i) if !self.served[i] => self.serve(i, true),
                // Served since the fault was raised (that copy woke the
                // faulting thread), or outside any chunk: a page the image
                // does not hold is zero.
                Some(_) => self.wake(addr),
                None => self.zero_page(addr),
            }
        }
    }

    /// The chunk holding host address `addr`.
    fn chunk_of(&self, addr: usize) -> Option<usize> {
        let r = self
            .regions
            .iter()
            .find(|r| addr >= r.host && addr < r.host + r.len)?;
        let gpa = r.gpa + (addr - r.host) as u64;
        let chunks = &self.image.chunks;
        let i = chunks.partition_point(|c| c.base + c.span() <= gpa);
        (chunks.get(i)?.base <= gpa).then_some(i)
    }

    /// Host address of guest-physical `gpa` (which a chunk covers).
    fn host_of(&self, gpa: u64) -> Option<usize> {
        let r = self
            .regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa < r.gpa + r.len as u64)?;
        Some(r.host + (gpa - r.gpa) as usize)
    }

    /// Reads, decodes and copies in chunk `i`.
    fn serve(&mut self, i: usize, on_fault: bool) {
        let loc = self.image.chunks[i];
        let span = loc.span() as usize;
        let payload = match snapshot::read_chunk_record(&self.image.file, &loc) {
            Ok(p) => p,
            Err(e) => self.fatal(&e.to_string()),
        };
        self.staging.clear();
        self.staging.resize(span, 0);
        if let Err(e) = self
            .decoder
            .decode_into(&payload, &loc.label(), &mut self.staging, true)
        {
            self.fatal(&e.to_string());
        }
        let Some(host) = self.host_of(loc.base) else {
            self.fatal(&format!("{} is outside guest memory", loc.label()));
        };
        for (start, end, zero) in runs(&self.staging) {
            let dst = host + start;
            let len = end - start;
            let r = if zero {
                self.uffd
                    .zeropage(dst, len)
                    .map_err(|e| format!("UFFDIO_ZEROPAGE: {e}"))
            } else {
                self.copy(start, dst, len)
            };
            if let Err(e) = r {
                self.fatal(&format!("cannot copy in {}: {e}", loc.label()));
            }
        }
        self.served[i] = true;
        self.remaining -= 1;
        let mut s = lock(&self.shared.stats);
        if on_fault {
            s.on_fault += 1;
        } else {
            s.in_background += 1;
        }
    }

    /// Copies `len` bytes of the staged chunk at `start` to `dst`, page by
    /// page where some page is already there (EEXIST).
    fn copy(&self, start: usize, dst: usize, len: usize) -> Result<(), String> {
        let mut done = 0;
        while done < len {
            let src = &self.staging[start + done..start + len];
            match self.uffd.copy(src, dst + done) {
                Ok(n) if n > 0 => done += n,
                Ok(_) => return Err("UFFDIO_COPY copied nothing".into()),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    // Some page in the range exists: the rest one by one.
                    for off in (done..len).step_by(PAGE_SIZE) {
                        let page = &self.staging[start + off..start + off + PAGE_SIZE];
                        match self.uffd.copy(page, dst + off) {
                            Ok(_) => {}
                            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                            Err(e) => return Err(format!("UFFDIO_COPY: {e}")),
                        }
                    }
                    return Ok(());
                }
                Err(e) => return Err(format!("UFFDIO_COPY: {e}")),
            }
        }
        Ok(())
    }

    fn wake(&self, addr: usize) {
        let page = addr & !(PAGE_SIZE - 1);
        if let Err(e) = self.uffd.wake(page, PAGE_SIZE) {
            self.fatal(&format!("cannot wake a fault at {page:#x}: {e}"));
        }
    }

    fn zero_page(&self, addr: usize) {
        let page = addr & !(PAGE_SIZE - 1);
        match self.uffd.zeropage(page, PAGE_SIZE) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => self.fatal(&format!("cannot map a zero page at {page:#x}: {e}")),
        }
    }

    /// Every chunk is in: the memory becomes ordinary memory again.
    fn finish(&mut self) {
        for r in &self.regions {
            if let Err(e) = self.uffd.unregister(r.host, r.len) {
                log::warn!("lazy restore: cannot unregister guest memory: {e}");
            }
        }
        let fill_ms = self.started.elapsed().as_millis() as u64;
        {
            let mut s = lock(&self.shared.stats);
            s.done = true;
            s.fill_ms = fill_ms;
            log::info!(
                "lazy restore: all {} chunks in after {fill_ms} ms ({} on fault, {} faults)",
                self.served.len(),
                s.on_fault,
                s.faults
            );
        }
        self.shared.changed.notify_all();
    }

    /// The guest cannot get its memory: end the process, naming why.
    fn fatal(&self, why: &str) -> ! {
        // The same shape as the errors `main` reports; not through `log`,
        // whose error lines would say it twice.
        let line = format!(
            "vmm: error: cannot restore guest memory from {}: {why}; the VM is stopped\n",
            self.image.source
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        std::process::exit(1)
    }
}

/// Waits for a fault or the stop signal; with `busy` (chunks left to fill)
/// it only looks. Returns (faults pending, stop asked).
fn wait(uffd: &Userfault, stop: &OwnedFd, busy: bool) -> (bool, bool) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [
        PollFd::new(&uffd.file, PollFlags::IN),
        PollFd::new(stop, PollFlags::IN),
    ];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match poll(&mut fds, busy.then_some(&now)) {
        Ok(n) if n > 0 => (!fds[0].revents().is_empty(), !fds[1].revents().is_empty()),
        _ => (false, false),
    }
}

/// A userfaultfd in missing mode: the few calls of the kernel's API that
/// lazy restore makes.
struct Userfault {
    file: File,
}

/// Bytes of one `struct uffd_msg`, and where a page fault's address is in it.
const UFFD_MSG_LEN: usize = 32;
const UFFD_MSG_ADDRESS: usize = 16;

impl Userfault {
    /// A non-blocking userfaultfd that reports faults from kernel mode too:
    /// `UFFD_USER_MODE_ONLY` would make KVM_RUN fail with EFAULT, since KVM
    /// touches guest memory from the kernel.
    fn open() -> std::io::Result<Self> {
        // SAFETY: userfaultfd(2) takes only flags and returns a new file
        // descriptor or -1.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned to us and nothing else owns it.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        let uffd = Userfault { file };
        let mut api = uffdio_api {
            api: u64::from(UFFD_API),
            features: 0,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`.
        unsafe { uffd.ioctl(linux_raw_sys::ioctl::UFFDIO_API, &mut api) }?;
        Ok(uffd)
    }

    /// Runs ioctl `request` on the userfaultfd with `arg`.
    ///
    /// # Safety
    /// `T` must be the struct `request` reads and writes, and what the
    /// request does to memory must be sound for the caller.
    unsafe fn ioctl<T>(&self, request: u32, arg: &mut T) -> std::io::Result<()> {
        // SAFETY: the caller vouches for the request and its argument,
        // which `arg` keeps alive for the call.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), request as _, arg as *mut T) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn register(&self, start: usize, len: usize) -> std::io::Result<()> {
        let mut reg = uffdio_register {
            range: uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode: u64::from(UFFDIO_REGISTER_MODE_MISSING),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register`; from
        // now on first touches of the range wait for this descriptor.
        unsafe { self.ioctl(linux_raw_sys::ioctl::UFFDIO_REGISTER, &mut reg) }
    }

    fn unregister(&self, start: usize, len: usize) -> std::io::Result<()> {
        let mut range = uffdio_range {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: UFFDIO_UNREGISTER takes a `struct uffdio_range`; the
        // range becomes ordinary memory.
        unsafe { self.ioctl(linux_raw_sys::ioctl::UFFDIO_UNREGISTER, &mut range) }
    }

    /// Copies `src` to registered host address `dst` and wakes its waiters;
    /// the bytes copied (fewer than asked for if interrupted).
    fn copy(&self, src: &[u8], dst: usize) -> std::io::Result<usize> {
        let mut copy = uffdio_copy {
            dst: dst as u64,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY takes a `struct uffdio_copy`; it reads `src`
        // (alive for the call) and fills only pages of the registered
        // range [dst, dst+len) that are still missing.
        match unsafe { self.ioctl(linux_raw_sys::ioctl::UFFDIO_COPY, &mut copy) } {
            Ok(()) => Ok(src.len()),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && copy.copy > 0 => {
                Ok(copy.copy as usize)
            }
            Err(e) => Err(e),
        }
    }

    /// Maps the zero page over registered [dst, dst+len) and wakes its waiters.
    fn zeropage(&self, dst: usize, len: usize) -> std::io::Result<()> {
        let mut zero = uffdio_zeropage {
            range: uffdio_range {
                start: dst as u64,
                len: len as u64,
            },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE takes a `struct uffdio_zeropage` and
        // maps only missing pages of the registered range.
        unsafe { self.ioctl(linux_raw_sys::ioctl::UFFDIO_ZEROPAGE, &mut zero) }
    }

    fn wake(&self, start: usize, len: usize) -> std::io::Result<()> {
        let mut range = uffdio_range {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: UFFDIO_WAKE takes a `struct uffdio_range` and only wakes.
        unsafe { self.ioctl(linux_raw_sys::ioctl::UFFDIO_WAKE, &mut range) }
    }

    /// Reads the pending events into `addrs`: the address of each page
    /// fault (other events are not asked for).
    fn read_faults(&self, addrs: &mut Vec<usize>) -> std::io::Result<()> {
        let mut buf = [0u8; 64 * UFFD_MSG_LEN];
        let n = match (&self.file).read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        for msg in buf[..n].chunks_exact(UFFD_MSG_LEN) {
            if u32::from(msg[0]) == UFFD_EVENT_PAGEFAULT {
                let mut a = [0u8; 8];
                a.copy_from_slice(&msg[UFFD_MSG_ADDRESS..UFFD_MSG_ADDRESS + 8]);
                addrs.push(u64::from_ne_bytes(a) as usize);
            }
        }
        Ok(())
    }
}

/// A decoded chunk as runs (start, end, all zero) of whole pages: zero runs
/// of at least [`MIN_ZERO_RUN`] pages apart, everything else copied.
fn runs(chunk: &[u8]) -> Vec<(usize, usize, bool)> {
    let pages = chunk.len() / PAGE_SIZE;
    let zero: Vec<bool> = (0..pages)
        .map(|i| snapshot::pages::is_zero(&chunk[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]))
        .collect();
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    let mut i = 0;
    while i < pages {
        let mut j = i;
        while j < pages && zero[j] == zero[i] {
            j += 1;
        }
        let is_zero_run = zero[i] && j - i >= MIN_ZERO_RUN;
        match out.last_mut() {
            Some(last) if !last.2 && !is_zero_run => last.1 = j * PAGE_SIZE,
            _ => out.push((i * PAGE_SIZE, j * PAGE_SIZE, is_zero_run)),
        }
        i = j;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(pattern: &[bool]) -> Vec<u8> {
        let mut c = vec![0u8; pattern.len() * PAGE_SIZE];
        for (i, data) in pattern.iter().enumerate() {
            if *data {
                c[i * PAGE_SIZE + 7] = 1;
            }
        }
        c
    }

    #[test]
    fn short_zero_runs_are_copied_with_their_neighbours() {
        let p = PAGE_SIZE;
        let mut pattern = vec![true, false, true];
        pattern.extend(std::iter::repeat_n(false, MIN_ZERO_RUN));
        pattern.push(true);
        assert_eq!(
            runs(&chunk(&pattern)),
            vec![
                (0, 3 * p, false),
                (3 * p, (3 + MIN_ZERO_RUN) * p, true),
                ((3 + MIN_ZERO_RUN) * p, (4 + MIN_ZERO_RUN) * p, false),
            ]
        );
        // All zero: one zero run; a short all-zero chunk: copied.
        assert_eq!(runs(&chunk(&[false; 20])), vec![(0, 20 * p, true)]);
        assert_eq!(runs(&chunk(&[false; 3])), vec![(0, 3 * p, false)]);
        assert_eq!(runs(&chunk(&[true; 4])), vec![(0, 4 * p, false)]);
    }
}
