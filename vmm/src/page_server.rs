//! Lazy restore: a restored VM runs before its memory is in, and the page
//! server brings memory in from the image as it is touched.
//!
//! Guest RAM is registered with userfaultfd (missing mode) while it is
//! still empty. A first touch of a page, by a vCPU through KVM or by any
//! VMM thread through its mapping (a device filling a buffer, the snapshot
//! writer), blocks in the kernel and reaches the `page-server` thread as a
//! fault event; it reads the chunk holding the page from the image
//! (positioned read, checksums checked), decodes it and copies it in
//! (UFFDIO_COPY; long runs of zero pages as the kernel's zero page,
//! UFFDIO_ZEROPAGE), the 64 KiB around the page first: each copy wakes
//! whoever waits on its pages. Meanwhile the `page-fill` thread, at a lower
//! priority, copies in every chunk nobody asked for yet, in address order,
//! so the VM soon stops faulting. A chunk is claimed by one thread or the
//! other (an atomic state per chunk), never both. With every chunk in,
//! the memory is unregistered and both threads end. (Collapsing the
//! filled memory into huge pages then, MADV_COLLAPSE, made the guest's
//! first pass over 1 GiB slower, 1.1 s against 0.8 s: it competes with the
//! guest and remaps what KVM had already mapped.)
//!
//! A chunk the image cannot supply (a checksum mismatch, the file cut
//! short) ends the process with a message naming the chunk: the guest must
//! never run on memory that is not its own, and a vCPU waiting for that
//! chunk cannot be woken any other way.
//!
//! Neither thread touches guest memory through the mapping: a fault it
//! raised would wait for itself.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
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
    #[error("cannot open a userfaultfd for lazy restore (it needs root or vm.unprivileged_userfaultfd=1, and a seccomp profile that allows it)")]
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

/// How far the fill has got, for waiters and reports (`GET /vm`).
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct FillStats {
    /// Chunks of memory in the image.
    pub chunks: u64,
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

/// A userfaultfd opened for a page server ([`PageServer::open_userfaultfd`]).
pub struct UserfaultFd(Userfault);

/// Where a lazy restore's fill stands, read from any thread.
#[derive(Clone, Debug)]
pub struct FillMonitor(Arc<Mutex<FillStats>>);

impl FillMonitor {
    pub fn now(&self) -> FillStats {
        *lock(&self.0)
    }
}

/// A chunk's state (`Server::state`).
const MISSING: u8 = 0;
/// One thread has claimed it and is copying it in.
const CLAIMED: u8 = 1;
const IN: u8 = 2;

/// What the two threads share.
struct Server {
    image: LazyMemory,
    regions: Vec<Region>,
    uffd: Userfault,
    /// Per chunk: MISSING, CLAIMED or IN. Whoever claims a chunk copies
    /// it; the copy wakes every thread waiting on its pages.
    state: Vec<AtomicU8>,
    remaining: AtomicUsize,
    /// An eventfd, written when every chunk is in or the server is
    /// dropped: the fault thread's wait ends on it.
    stop: OwnedFd,
    stopping: AtomicBool,
    /// Set once the vCPUs run ([`PageServer::start_fill`]): until then the
    /// filler waits, leaving the CPU and the memory map's lock to the
    /// restore (its copies hold the lock that the restore's thread stacks
    /// and mappings need: filling early made the restore slower, 9.8 ms
    /// against 14–18).
    fill_go: Mutex<bool>,
    go: Condvar,
    stats: Arc<Mutex<FillStats>>,
    changed: Condvar,
    started: Instant,
}

/// The running page server: a thread that answers faults and one that
/// fills the rest at a lower priority. Dropping it stops both (a VM being
/// torn down: its vCPUs have ended); it must go before the memory it serves.
pub struct PageServer {
    server: Arc<Server>,
    threads: Vec<JoinHandle<()>>,
}

/// Zero runs shorter than this are copied with the data around them: one
/// UFFDIO_COPY costs more than copying a few zero pages.
const MIN_ZERO_RUN: usize = 16;

/// A fault is answered with the 64 KiB around the page first (a 1 MiB copy
/// takes about 1.5 ms here, 64 KiB a tenth of that), then the rest of its
/// chunk.
const FAULT_WINDOW: usize = 64 << 10;

/// The background filler's nice value: it yields the CPU to the vCPUs and
/// to the fault thread, and still goes on when they are busy.
const FILL_NICE: i32 = 10;

/// One RAM region as the page server sees it.
#[derive(Clone, Copy)]
struct Region {
    gpa: u64,
    host: usize,
    len: usize,
}

impl PageServer {
    /// Opens the userfaultfd a page server needs: before the restore reads
    /// anything, so that a host that refuses it (not root without
    /// `vm.unprivileged_userfaultfd=1`, a container's seccomp profile, a
    /// kernel without it) is known while an eager restore is still possible.
    pub fn open_userfaultfd() -> Result<UserfaultFd, PageServerError> {
        Userfault::open()
            .map(UserfaultFd)
            .map_err(PageServerError::Open)
    }

    /// Registers all of `ram` (untouched so far) with `uffd` and starts the
    /// threads that serve it from `image`.
    pub fn start(
        ram: &GuestRam,
        image: LazyMemory,
        uffd: UserfaultFd,
    ) -> Result<Self, PageServerError> {
        let uffd = uffd.0;
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
        let n = image.chunks.len();
        let server = Arc::new(Server {
            state: (0..n).map(|_| AtomicU8::new(MISSING)).collect(),
            remaining: AtomicUsize::new(n),
            image,
            regions,
            uffd,
            stop,
            stopping: AtomicBool::new(false),
            fill_go: Mutex::new(false),
            go: Condvar::new(),
            stats: Arc::new(Mutex::new(FillStats {
                chunks: n as u64,
                ..FillStats::default()
            })),
            changed: Condvar::new(),
            started: Instant::now(),
        });
        let mut page_server = PageServer {
            server: server.clone(),
            threads: Vec::new(),
        };
        if n == 0 {
            server.finish();
            return Ok(page_server);
        }
        let s = server.clone();
        page_server.threads.push(
            std::thread::Builder::new()
                .name("page-server".into())
                .spawn(move || s.answer_faults())
                .map_err(PageServerError::Thread)?,
        );
        // Off only to see what a guest touches by itself (and to test the
        // fault path alone): `VMM_LAZY_BACKGROUND=0`.
        if std::env::var_os("VMM_LAZY_BACKGROUND").is_none_or(|v| v != "0") {
            page_server.threads.push(
                std::thread::Builder::new()
                    .name("page-fill".into())
                    .spawn(move || server.fill())
                    .map_err(PageServerError::Thread)?,
            );
        }
        Ok(page_server)
    }

    /// Lets the background fill begin: called once the vCPUs run.
    pub fn start_fill(&self) {
        *lock(&self.server.fill_go) = true;
        self.server.go.notify_all();
    }

    /// Where the fill stands.
    pub fn stats(&self) -> FillStats {
        *lock(&self.server.stats)
    }

    /// A handle on where the fill stands that outlives the page server
    /// (the API's view of the VM).
    pub fn monitor(&self) -> FillMonitor {
        FillMonitor(self.server.stats.clone())
    }

    /// Waits until every chunk is in, at most `limit`; where the fill
    /// stands then.
    pub fn wait_filled(&self, limit: std::time::Duration) -> FillStats {
        let s = lock(&self.server.stats);
        let (s, _) = self
            .server
            .changed
            .wait_timeout_while(s, limit, |s| !s.done)
            .unwrap_or_else(|e| e.into_inner());
        *s
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.server.stopping.store(true, Ordering::Release);
        self.start_fill();
        self.server.signal_stop();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One thread's decoding state.
#[derive(Default)]
struct Worker {
    decoder: Decoder,
    /// One chunk's pages, decoded.
    staging: Vec<u8>,
}

impl Server {
    /// The fault thread: waits for faults and answers each with its chunk.
    fn answer_faults(&self) {
        self.confine();
        let mut worker = Worker::default();
        let mut addrs = Vec::new();
        loop {
            let (faults, stopped) = match wait(&self.uffd, &self.stop) {
                Ok(r) => r,
                Err(e) => self.fatal(&format!("cannot wait for page faults: {e}")),
            };
            if stopped {
                return;
            }
            if !faults {
                continue;
            }
            if let Err(e) = self.uffd.read_faults(&mut addrs) {
                self.fatal(&format!("cannot read the userfaultfd: {e}"));
            }
            lock(&self.stats).faults += addrs.len() as u64;
            for addr in addrs.drain(..) {
                match self.chunk_of(addr) {
                    Some(i) if self.claim(i) => self.serve(i, Some(addr), &mut worker),
                    // Being copied by the filler (its copy wakes the
                    // faulting thread) or already in (the copy that put
                    // it there did).
                    Some(_) => {}
                    // Outside every chunk: a page the image does not hold
                    // is zero.
                    None => self.zero_page(addr),
                }
            }
        }
    }

    /// The background filler: claims and copies in, in address order,
    /// every chunk nobody has asked for yet.
    fn fill(&self) {
        // SAFETY: setpriority changes only the scheduling weight of the
        // calling thread (a thread id of 0 means the caller on Linux).
        let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, FILL_NICE) };
        if r != 0 {
            log::info!(
                "lazy restore: the filler runs at normal priority: {}",
                std::io::Error::last_os_error()
            );
        }
        self.confine();
        let mut go = lock(&self.fill_go);
        while !*go {
            go = self.go.wait(go).unwrap_or_else(|e| e.into_inner());
        }
        drop(go);
        let mut worker = Worker::default();
        for i in 0..self.state.len() {
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            if self.claim(i) {
                self.serve(i, None, &mut worker);
            }
        }
    }

    fn confine(&self) {
        if let Err(e) = crate::seccomp::confine_this_thread(crate::seccomp::ThreadKind::PageServer)
        {
            self.fatal(&format!("the page server cannot be confined: {e}"));
        }
    }

    fn claim(&self, i: usize) -> bool {
        self.state[i]
            .compare_exchange(MISSING, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn signal_stop(&self) {
        let _ = rustix::io::write(&self.stop, &1u64.to_ne_bytes());
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

    /// Reads, decodes and copies in chunk `i`, which this thread claimed;
    /// for a fault at host address `fault`, the pages around it first.
    fn serve(&self, i: usize, fault: Option<usize>, w: &mut Worker) {
        let loc = self.image.chunks[i];
        let span = loc.span() as usize;
        let payload = match snapshot::read_chunk_record(&self.image.file, &loc) {
            Ok(p) => p,
            Err(e) => self.fatal(&e.to_string()),
        };
        w.staging.clear();
        w.staging.resize(span, 0);
        if let Err(e) = w
            .decoder
            .decode_into(&payload, &loc.label(), &mut w.staging, true)
        {
            self.fatal(&e.to_string());
        }
        let Some(host) = self.host_of(loc.base) else {
            self.fatal(&format!("{} is outside guest memory", loc.label()));
        };
        let window = fault.map(|addr| {
            let at = addr.saturating_sub(host) & !(FAULT_WINDOW - 1);
            (at, (at + FAULT_WINDOW).min(span))
        });
        for (start, end, zero) in first_around(&runs(&w.staging), window) {
            let dst = host + start;
            let len = end - start;
            let r = if zero {
                self.uffd
                    .zeropage(dst, len)
                    .map_err(|e| format!("UFFDIO_ZEROPAGE: {e}"))
            } else {
                self.copy(&w.staging[start..end], dst)
            };
            if let Err(e) = r {
                self.fatal(&format!("cannot copy in {}: {e}", loc.label()));
            }
        }
        self.state[i].store(IN, Ordering::Release);
        {
            let mut s = lock(&self.stats);
            if fault.is_some() {
                s.on_fault += 1;
            } else {
                s.in_background += 1;
            }
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finish();
        }
    }

    /// Copies `src` to `dst`, page by page where some page is already there
    /// (EEXIST).
    fn copy(&self, src: &[u8], dst: usize) -> Result<(), String> {
        let mut done = 0;
        while done < src.len() {
            match self.uffd.copy(&src[done..], dst + done) {
                Ok(n) if n > 0 => done += n,
                Ok(_) => return Err("UFFDIO_COPY copied nothing".into()),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    // Some page in the range exists: the rest one by one.
                    for off in (done..src.len()).step_by(PAGE_SIZE) {
                        match self.uffd.copy(&src[off..off + PAGE_SIZE], dst + off) {
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

    fn zero_page(&self, addr: usize) {
        let page = addr & !(PAGE_SIZE - 1);
        match self.uffd.zeropage(page, PAGE_SIZE) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            // The last chunk came in since the fault was read: the memory
            // is unregistered, which woke the faulting thread.
            Err(e)
                if e.raw_os_error() == Some(libc::ENOENT)
                    && self.remaining.load(Ordering::Acquire) == 0 => {}
            Err(e) => self.fatal(&format!("cannot map a zero page at {page:#x}: {e}")),
        }
    }

    /// Every chunk is in: the memory becomes ordinary memory again, and
    /// the fault thread ends.
    fn finish(&self) {
        for r in &self.regions {
            if let Err(e) = self.uffd.unregister(r.host, r.len) {
                log::warn!("lazy restore: cannot unregister guest memory: {e}");
            }
        }
        let fill_ms = self.started.elapsed().as_millis() as u64;
        {
            let mut s = lock(&self.stats);
            s.done = true;
            s.fill_ms = fill_ms;
            log::info!(
                "lazy restore: all {} chunks in after {fill_ms} ms ({} on fault, {} faults)",
                self.state.len(),
                s.on_fault,
                s.faults
            );
        }
        self.changed.notify_all();
        self.signal_stop();
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

/// `runs` (start, end, zero) reordered so that the part inside `window`
/// comes first, the runs cut at its edges; the rest follows in order.
fn first_around(
    runs: &[(usize, usize, bool)],
    window: Option<(usize, usize)>,
) -> Vec<(usize, usize, bool)> {
    let Some((ws, we)) = window else {
        return runs.to_vec();
    };
    let mut first = Vec::new();
    let mut rest = Vec::new();
    for &(s, e, zero) in runs {
        let (is, ie) = (s.max(ws), e.min(we));
        if is >= ie {
            rest.push((s, e, zero));
            continue;
        }
        first.push((is, ie, zero));
        if s < is {
            rest.push((s, is, zero));
        }
        if ie < e {
            rest.push((ie, e, zero));
        }
    }
    first.extend(rest);
    first
}

/// Waits for a fault or the stop signal. Returns (faults pending, stop
/// asked).
fn wait(uffd: &Userfault, stop: &OwnedFd) -> rustix::io::Result<(bool, bool)> {
    use rustix::event::{poll, PollFd, PollFlags};
    let mut fds = [
        PollFd::new(&uffd.file, PollFlags::IN),
        PollFd::new(stop, PollFlags::IN),
    ];
    match poll(&mut fds, None) {
        Ok(_) => Ok((!fds[0].revents().is_empty(), !fds[1].revents().is_empty())),
        Err(rustix::io::Errno::INTR) => Ok((false, false)),
        Err(e) => Err(e),
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
    fn the_window_around_a_fault_comes_first() {
        let runs = vec![(0, 10, false), (10, 30, true), (30, 40, false)];
        assert_eq!(first_around(&runs, None), runs);
        assert_eq!(
            first_around(&runs, Some((8, 16))),
            vec![
                (8, 10, false),
                (10, 16, true),
                (0, 8, false),
                (16, 30, true),
                (30, 40, false),
            ]
        );
        // A window inside one run splits it in three.
        assert_eq!(
            first_around(&runs, Some((32, 36))),
            vec![
                (32, 36, false),
                (0, 10, false),
                (10, 30, true),
                (30, 32, false),
                (36, 40, false)
            ]
        );
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
