//! Least privilege by thread: each kind of thread, once set up, puts a
//! seccomp filter on itself that lets through only the system calls its
//! job needs. A call outside it raises SIGSYS, whose handler says which
//! thread made which call on stderr and ends the process (exit status 159,
//! 128 + SIGSYS), as Firecracker does. `vmm run|restore --no-seccomp`
//! turns the filters off, for debugging.
//!
//! The kinds: the vCPU threads (run the guest, act on its port and MMIO
//! exits: the most exposed), the device thread (queues, disk files, TAPs,
//! vsock sockets), the API (its thread, one per request, and the HTTP
//! server's own), the guest agent's channel (its threads), relays (the
//! console's input, the checkpoint signal), and the main thread once the
//! VM runs (lifecycle, snapshots).
//! The filters say what calls a thread may make; Landlock ([`crate::sandbox`])
//! says which files those calls may reach.
//!
//! The lists come from tracing the threads (strace -ff over boots, warm
//! runs, snapshots, restores, pause and resume, exec, a TAP) and from the
//! whole test suite run with `VMM_SECCOMP_LOG=1`, which makes the filters
//! log a call outside them to the kernel log (audit type 1326, with the
//! thread's name and the call's number) instead of stopping the VMM: the
//! way to find what a new feature needs. Each entry says why.
//!
//! A thread a filtered thread starts inherits its filter. glibc blocks
//! every signal while it creates a thread, so a call a filter forbids in
//! those few instructions would end the process without the handler's
//! message: a kind that starts threads allows what thread creation calls.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {0} thread's seccomp filter")]
    Build(&'static str, #[source] seccompiler::BackendError),
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] vmm_sys_util::errno::Error),
    #[error("cannot put the seccomp filter on a {0} thread")]
    Apply(&'static str, #[source] seccompiler::Error),
}

/// The kinds of thread with a filter of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    Vcpu,
    Devices,
    Api,
    Agent,
    /// Waits on one input and passes it on: the console's input, the
    /// checkpoint signal.
    Relay,
    /// Brings a lazily restored VM's memory in (`crate::page_server`): its
    /// fault thread and its filler (whose lower priority is set before).
    PageServer,
    Main,
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Devices => "device",
            ThreadKind::Api => "API",
            ThreadKind::Agent => "agent channel",
            ThreadKind::Relay => "relay",
            ThreadKind::PageServer => "page server",
            ThreadKind::Main => "main",
        }
    }

    /// Kinds whose threads start more threads.
    fn spawns_threads(self) -> bool {
        matches!(self, ThreadKind::Api | ThreadKind::Agent | ThreadKind::Main)
    }
}

/// Filters are on unless `--no-seccomp` turned them off.
static ENABLED: AtomicBool = AtomicBool::new(true);

/// `--no-seccomp`: threads started after this run unfiltered.
pub fn disable() {
    ENABLED.store(false, Ordering::Release);
}

/// The exit status of a process ended by a forbidden system call.
pub const FORBIDDEN_EXIT: i32 = 159;

/// KVM's ioctl type: `_IO(KVMIO, n)` has KVMIO (0xAE) in bits 8-15.
const KVMIO: u64 = 0xAE;

/// `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: u64 = 0x4004_54d0;

/// userfaultfd's ioctl type: UFFDIO (0xAA) in bits 8-15.
const UFFDIO: u64 = 0xAA;

/// FIONBIO: how std's `set_nonblocking` sets a socket non-blocking.
const FIONBIO: u64 = 0x5421;
/// The terminal's ioctls: TCGETS, TCSETS, TCSETSW, TIOCGWINSZ (raw mode
/// for the console, put back at exit; the window's size for an exec).
const TERMINAL_IOCTLS: [u64; 4] = [0x5401, 0x5402, 0x5403, 0x5413];
/// glibc opens /proc and /sys files read-only with these flags (malloc's
/// arena count, overcommit); Landlock confines where.
const READ_ONLY_CLOEXEC: u64 = (libc::O_RDONLY | libc::O_CLOEXEC) as u64;

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// A rule matching argument `arg` (32 bits) against `value`.
fn arg_is(arg: u8, value: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        value,
    )?])
}

/// The system calls a `kind` thread may make, with conditions on some.
fn allowed(kind: ThreadKind) -> Result<Rules, seccompiler::BackendError> {
    let mut rules: Rules = BTreeMap::new();
    let allow_all = |rules: &mut Rules, nrs: &[libc::c_long]| {
        for &nr in nrs {
            rules.insert(nr, Vec::new());
        }
    };
    // Every thread: memory for the allocator, locks and channels, signals
    // (the vCPU kick arrives as one), time, logging and the console's
    // output (write), and ending the thread.
    allow_all(
        &mut rules,
        &[
            libc::SYS_mmap,
            libc::SYS_munmap,
            libc::SYS_mprotect,
            libc::SYS_madvise,
            libc::SYS_mremap,
            libc::SYS_brk,
            libc::SYS_futex,
            libc::SYS_sched_yield,
            libc::SYS_sched_getaffinity,
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_getrandom,
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_read,
            libc::SYS_close,
            libc::SYS_exit,
            libc::SYS_exit_group,
        ],
    );
    // The SIGSYS handler reads the thread's name; a new thread sets its own.
    let mut prctl = vec![arg_is(0, libc::PR_GET_NAME as u64)?];
    if kind.spawns_threads() {
        prctl.push(arg_is(0, libc::PR_SET_NAME as u64)?);
        // What creating a thread calls, in the parent and in the child.
        allow_all(
            &mut rules,
            &[
                libc::SYS_clone3,
                libc::SYS_clone,
                libc::SYS_set_robust_list,
                libc::SYS_rseq,
            ],
        );
    }
    if kind == ThreadKind::Main {
        // Forking a snapshot's writer (`crate::background`): the child
        // asks to die with its parent and lowers its priority; the parent
        // waits for it, and gives the disks' logs to the devices.
        prctl.push(arg_is(0, libc::PR_SET_PDEATHSIG as u64)?);
        allow_all(
            &mut rules,
            &[
                libc::SYS_getppid,
                libc::SYS_setpriority,
                libc::SYS_wait4,
                libc::SYS_memfd_create,
            ],
        );
    }
    rules.insert(libc::SYS_prctl, prctl);
    // Sockets are Unix sockets (the API, vsock's host side, the agent).
    let unix_sockets = |rules: &mut Rules| -> Result<(), seccompiler::BackendError> {
        rules.insert(libc::SYS_socket, vec![arg_is(0, libc::AF_UNIX as u64)?]);
        rules.insert(libc::SYS_socketpair, vec![arg_is(0, libc::AF_UNIX as u64)?]);
        allow_all(
            rules,
            &[
                libc::SYS_connect,
                libc::SYS_accept4,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                libc::SYS_recvmsg,
                libc::SYS_sendmsg,
                libc::SYS_shutdown,
                libc::SYS_getsockopt,
                libc::SYS_setsockopt,
                libc::SYS_getsockname,
                libc::SYS_getpeername,
                libc::SYS_poll,
                libc::SYS_ppoll,
                libc::SYS_fcntl,
            ],
        );
        Ok(())
    };
    let kvm = SeccompRule::new(vec![SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(0xff00),
        KVMIO << 8,
    )?])?;
    match kind {
        ThreadKind::Vcpu => {
            // KVM_RUN and the vCPU's state (saved and restored on its own
            // thread): KVM's ioctls. And one of the TAP's: virtio-net sets
            // the offloads the driver acked when the driver's register
            // write activates or resets the device, on this thread.
            rules.insert(libc::SYS_ioctl, vec![kvm, arg_is(1, TUNSETOFFLOAD)?]);
        }
        ThreadKind::Devices => {
            // The event loop; disk requests (positioned reads and writes,
            // flushes); TAP frames (read/write); vsock's host sockets
            // (connect to a host listener, accept host connections, pass
            // the agent's connection on as a socket pair); entropy.
            allow_all(
                &mut rules,
                &[
                    libc::SYS_epoll_wait,
                    libc::SYS_epoll_pwait,
                    libc::SYS_epoll_ctl,
                    libc::SYS_readv,
                    libc::SYS_pread64,
                    libc::SYS_pwrite64,
                    libc::SYS_preadv,
                    libc::SYS_pwritev,
                    libc::SYS_fsync,
                    libc::SYS_fdatasync,
                    libc::SYS_lseek,
                    libc::SYS_fstat,
                    libc::SYS_newfstatat,
                    libc::SYS_statx,
                ],
            );
            unix_sockets(&mut rules)?;
            rules.insert(
                libc::SYS_ioctl,
                vec![arg_is(1, FIONBIO)?, arg_is(1, TUNSETOFFLOAD)?],
            );
            // Read-only opens, as on the API threads: once in CI (1 run in
            // about 10, at the end of a restored Linux guest's run) this
            // thread opened a file, and no strace census or rerun showed
            // which; Landlock still says where.
            rules.insert(libc::SYS_openat, vec![arg_is(2, READ_ONLY_CLOEXEC)?]);
        }
        ThreadKind::Api | ThreadKind::Agent => {
            // Requests and answers over Unix sockets, a snapshot's stream
            // through a pipe from the main thread; the agent's channel
            // likewise, with read timeouts.
            unix_sockets(&mut rules)?;
            allow_all(
                &mut rules,
                &[
                    libc::SYS_pipe2,
                    libc::SYS_readv,
                    libc::SYS_fstat,
                    libc::SYS_newfstatat,
                    libc::SYS_statx,
                ],
            );
            rules.insert(libc::SYS_ioctl, vec![arg_is(1, FIONBIO)?]);
            // New threads: glibc's malloc may read /proc and /sys for its
            // first arena.
            rules.insert(libc::SYS_openat, vec![arg_is(2, READ_ONLY_CLOEXEC)?]);
        }
        ThreadKind::Relay => {
            // Reads stdin (or a signal's self-pipe, a Unix socket) and
            // hands what came on; waits with poll.
            allow_all(
                &mut rules,
                &[libc::SYS_recvfrom, libc::SYS_poll, libc::SYS_ppoll],
            );
        }
        ThreadKind::PageServer => {
            // Waits on the userfaultfd and its stop eventfd, reads the
            // fault events (read), the image's chunks (positioned reads),
            // fills memory with userfaultfd's ioctls.
            allow_all(
                &mut rules,
                &[libc::SYS_pread64, libc::SYS_poll, libc::SYS_ppoll],
            );
            let uffdio = SeccompRule::new(vec![SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(0xff00),
                UFFDIO << 8,
            )?])?;
            rules.insert(libc::SYS_ioctl, vec![uffdio]);
            // Its first large allocation: glibc's malloc reads
            // /proc/sys/vm/overcommit_memory for a new thread's arena.
            rules.insert(libc::SYS_openat, vec![arg_is(2, READ_ONLY_CLOEXEC)?]);
        }
        ThreadKind::Main => {
            // The VM's lifecycle (KVM's ioctls, kicking vCPU threads), the
            // terminal put back at exit, and snapshots: image files written
            // atomically (create, lock, write, fsync, rename; stale
            // temporary files listed and removed), disks read, compression
            // threads started. Landlock confines which files.
            unix_sockets(&mut rules)?;
            allow_all(
                &mut rules,
                &[
                    libc::SYS_openat,
                    libc::SYS_readv,
                    libc::SYS_pread64,
                    libc::SYS_pwrite64,
                    libc::SYS_preadv,
                    libc::SYS_pwritev,
                    libc::SYS_lseek,
                    libc::SYS_fsync,
                    libc::SYS_fdatasync,
                    libc::SYS_ftruncate,
                    libc::SYS_fallocate,
                    libc::SYS_flock,
                    libc::SYS_rename,
                    libc::SYS_renameat,
                    libc::SYS_renameat2,
                    libc::SYS_unlink,
                    libc::SYS_unlinkat,
                    libc::SYS_getdents64,
                    libc::SYS_fstat,
                    libc::SYS_newfstatat,
                    libc::SYS_statx,
                    libc::SYS_readlink,
                    libc::SYS_readlinkat,
                    libc::SYS_pipe2,
                    libc::SYS_tgkill,
                    libc::SYS_rt_sigaction,
                    libc::SYS_epoll_wait,
                    libc::SYS_epoll_pwait,
                    libc::SYS_epoll_ctl,
                ],
            );
            let mut ioctls = vec![kvm, arg_is(1, FIONBIO)?, arg_is(1, TUNSETOFFLOAD)?];
            for t in TERMINAL_IOCTLS {
                ioctls.push(arg_is(1, t)?);
            }
            rules.insert(libc::SYS_ioctl, ioctls);
        }
    }
    Ok(rules)
}

/// The compiled filter of a `kind` thread; a call outside it raises
/// `mismatch` (SIGSYS in the VMM; an errno in tests).
fn program(kind: ThreadKind, mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let build = |e| SeccompError::Build(kind.name(), e);
    let filter = SeccompFilter::new(
        allowed(kind).map_err(build)?,
        mismatch,
        SeccompAction::Allow,
        seccompiler::TargetArch::x86_64,
    )
    .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// Puts `kind`'s filter on the calling thread (unless filters are off).
/// Call it once the thread is set up, before it does its work.
pub fn confine_this_thread(kind: ThreadKind) -> Result<(), SeccompError> {
    if !ENABLED.load(Ordering::Acquire) {
        return Ok(());
    }
    install_sigsys_handler()?;
    let mismatch = if std::env::var_os("VMM_SECCOMP_LOG").is_some_and(|v| v == "1") {
        SeccompAction::Log
    } else {
        SeccompAction::Trap
    };
    let bpf = program(kind, mismatch)?;
    seccompiler::apply_filter(&bpf).map_err(|e| SeccompError::Apply(kind.name(), e))
}

/// [`confine_this_thread`], for a thread that cannot report an error: a
/// failure is logged and the thread must not do its work (fail closed).
#[must_use = "a thread that could not be confined must stop"]
pub fn confine_or_log(kind: ThreadKind) -> bool {
    match confine_this_thread(kind) {
        Ok(()) => true,
        Err(e) => {
            log::error!(
                "{} (--no-seccomp runs without filters)",
                crate::error_chain(&e)
            );
            false
        }
    }
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    static INSTALLED: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, sigsys_handler)
                .map_err(|e| e.errno())
        })
        .map_err(|errno| SeccompError::Handler(vmm_sys_util::errno::Error::new(errno)))
}

/// Says which thread made which forbidden call, with what arguments, and
/// ends the process. Only async-signal-safe calls: prctl, write, _exit.
extern "C" fn sigsys_handler(
    _: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SIGSYS's siginfo holds the call's number at byte 24 (after signo,
    // errno, code, padding and the calling address).
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid siginfo_t, 128 bytes long;
        // bytes 24..28 are `_sigsys._syscall` for SIGSYS.
        unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() }
    };
    // The call's first three arguments, from the registers it was made with.
    let args = if context.is_null() {
        None
    } else {
        // SAFETY: with SA_SIGINFO the kernel passes the interrupted
        // thread's ucontext_t as the third argument.
        let gregs = unsafe { &(*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
        Some([libc::REG_RDI, libc::REG_RSI, libc::REG_RDX].map(|r| gregs[r as usize] as u64))
    };
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into `name`.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let mut msg = Line::default();
    msg.put(b"vmm: seccomp: thread '");
    msg.put(name.split(|&b| b == 0).next().unwrap_or_default());
    msg.put(b"' made system call ");
    msg.number(i64::from(nr), 10);
    if let Some(args) = args {
        msg.put(b" (");
        for (i, a) in args.iter().enumerate() {
            if i > 0 {
                msg.put(b", ");
            }
            msg.put(b"0x");
            msg.number(*a as i64, 16);
        }
        msg.put(b")");
        // What a file call was about: its path, for the *at calls.
        if [libc::SYS_openat, libc::SYS_unlinkat, libc::SYS_mkdirat].contains(&i64::from(nr))
            && args[1] != 0
        {
            msg.put(b" on \"");
            let path = args[1] as *const u8;
            for i in 0..96 {
                // SAFETY: the thread just passed this pointer to the kernel
                // as a NUL-terminated path; reading stops at its NUL.
                let b = unsafe { path.add(i).read() };
                if b == 0 {
                    break;
                }
                msg.put(&[b]);
            }
            msg.put(b"\"");
        }
    }
    msg.put(b", which its filter forbids; the VMM stops (--no-seccomp turns the filters off)\n");
    // SAFETY: writes our own buffer to stderr, then ends the process
    // without running anything else of it.
    unsafe {
        libc::write(libc::STDERR_FILENO, msg.buf.as_ptr().cast(), msg.len);
        libc::_exit(FORBIDDEN_EXIT);
    }
}

/// A line built without allocating (in a signal handler).
struct Line {
    buf: [u8; 320],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            buf: [0; 320],
            len: 0,
        }
    }
}

impl Line {
    fn put(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    /// `n` in `base` (10: signed; 16: as the unsigned 64-bit value).
    fn number(&mut self, n: i64, base: u64) {
        let mut digits = [0u8; 20];
        let mut v = if base == 10 {
            n.unsigned_abs()
        } else {
            n as u64
        };
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b"0123456789abcdef"[(v % base) as usize];
            v /= base;
            if v == 0 {
                break;
            }
        }
        if base == 10 && n < 0 {
            self.put(b"-");
        }
        self.put(&digits[i..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a thread of its own, filtered to answer EPERM instead of SIGSYS:
    /// what the vCPU filter lets through and what it stops.
    #[test]
    fn the_vcpu_filter_allows_kvm_and_stops_the_rest() {
        let bpf = program(ThreadKind::Vcpu, SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        let kvm = std::fs::File::open("/dev/kvm").ok();
        std::thread::spawn(move || {
            seccompiler::apply_filter(&bpf).unwrap();
            // Allowed: memory, write, KVM's ioctls.
            let v = vec![0u8; 1 << 20];
            assert_eq!(v.len(), 1 << 20);
            // SAFETY: writes 0 bytes to stderr.
            let wrote = unsafe { libc::write(libc::STDERR_FILENO, std::ptr::null(), 0) };
            assert_eq!(wrote, 0);
            if let Some(kvm) = &kvm {
                use std::os::fd::AsRawFd;
                // KVM_GET_API_VERSION = _IO(0xAE, 0x00).
                // SAFETY: an ioctl without arguments on /dev/kvm.
                let v = unsafe { libc::ioctl(kvm.as_raw_fd(), 0xAE00, 0) };
                assert_eq!(v, 12, "KVM's API version");
                // TUNSETOFFLOAD is let through (and fails: not a TAP).
                // SAFETY: an ioctl taking its argument by value.
                let r = unsafe { libc::ioctl(kvm.as_raw_fd(), TUNSETOFFLOAD as _, 0) };
                assert_eq!(r, -1);
                assert_ne!(
                    std::io::Error::last_os_error().raw_os_error(),
                    Some(libc::EPERM)
                );
                // TCGETS (0x5401) is neither KVM's nor that: refused.
                let mut t = [0u8; 64];
                // SAFETY: TCGETS writes a termios into `t`, big enough.
                let r = unsafe { libc::ioctl(kvm.as_raw_fd(), 0x5401, t.as_mut_ptr()) };
                assert_eq!(r, -1);
                assert_eq!(
                    std::io::Error::last_os_error().raw_os_error(),
                    Some(libc::EPERM)
                );
            }
            // Forbidden: opening files, sockets, processes.
            assert_eq!(
                std::fs::File::open("/etc/hostname")
                    .map_err(|e| e.raw_os_error())
                    .err(),
                Some(Some(libc::EPERM))
            );
            // SAFETY: socket() takes no pointers.
            let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            assert_eq!(fd, -1);
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EPERM)
            );
        })
        .join()
        .unwrap();
    }

    /// Runs `f` on a thread of its own under `kind`'s filter, set to
    /// answer EPERM instead of SIGSYS.
    fn on_filtered_thread(kind: ThreadKind, f: impl FnOnce() + Send + 'static) {
        let bpf = program(kind, SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        std::thread::spawn(move || {
            seccompiler::apply_filter(&bpf).unwrap();
            f();
        })
        .join()
        .unwrap();
    }

    fn refused<T: std::fmt::Debug>(what: &str, r: std::io::Result<T>) {
        assert_eq!(
            r.as_ref().err().and_then(std::io::Error::raw_os_error),
            Some(libc::EPERM),
            "{what}: {r:?}"
        );
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-seccomp-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_device_filter_serves_disks_and_sockets_only() {
        use std::os::unix::fs::FileExt;
        let d = scratch("devices");
        std::fs::write(d.join("disk"), b"0123456789").unwrap();
        let disk = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(d.join("disk"))
            .unwrap();
        let new = d.join("new");
        on_filtered_thread(ThreadKind::Devices, move || {
            // Allowed: positioned reads and writes, flushes, Unix sockets.
            let mut buf = [0u8; 4];
            disk.read_exact_at(&mut buf, 3).unwrap();
            assert_eq!(&buf, b"3456");
            disk.write_all_at(b"ab", 0).unwrap();
            disk.sync_data().unwrap();
            std::os::unix::net::UnixStream::pair().unwrap();
            // Refused: creating files, other sockets, threads, programs.
            refused("create a file", std::fs::File::create(&new));
            refused("a TCP socket", std::net::TcpListener::bind("127.0.0.1:0"));
            refused(
                "a thread",
                std::thread::Builder::new().spawn(|| ()).map(|_| ()),
            );
            refused(
                "a program",
                std::process::Command::new("/bin/true").status(),
            );
        });
        assert!(!d.join("new").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_api_and_agent_filters_serve_sockets_and_start_threads() {
        for kind in [ThreadKind::Api, ThreadKind::Agent] {
            let d = scratch("api");
            let new = d.join("new");
            let kvm = std::fs::File::open("/dev/kvm").ok();
            on_filtered_thread(kind, move || {
                // Allowed: pipes (a snapshot's stream), Unix sockets,
                // threads (one per request), reading /proc.
                std::io::pipe().unwrap();
                std::os::unix::net::UnixStream::pair().unwrap();
                std::thread::Builder::new()
                    .name("api-request".into())
                    .spawn(|| 7)
                    .unwrap()
                    .join()
                    .map(|n| assert_eq!(n, 7))
                    .unwrap();
                assert!(std::fs::read_to_string("/proc/self/status").is_ok());
                // Refused: writing files, KVM, other sockets, programs.
                refused("create a file", std::fs::File::create(&new));
                refused("a TCP socket", std::net::TcpListener::bind("127.0.0.1:0"));
                refused(
                    "a program",
                    std::process::Command::new("/bin/true").status(),
                );
                refused_kvm(kvm.as_ref());
            });
            std::fs::remove_dir_all(&d).unwrap();
        }
    }

    /// A KVM ioctl on `kvm` (where the host has KVM) is refused.
    fn refused_kvm(kvm: Option<&std::fs::File>) {
        use std::os::fd::AsRawFd;
        if let Some(kvm) = kvm {
            // SAFETY: KVM_GET_API_VERSION takes no argument.
            let r = unsafe { libc::ioctl(kvm.as_raw_fd(), 0xAE00, 0) };
            refused(
                "a KVM ioctl",
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(r)
                },
            );
        }
    }

    #[test]
    fn the_relay_filter_reads_and_little_else() {
        let (mut r, mut w) = std::io::pipe().unwrap();
        std::io::Write::write_all(&mut w, b"x").unwrap();
        on_filtered_thread(ThreadKind::Relay, move || {
            let mut b = [0u8; 1];
            std::io::Read::read_exact(&mut r, &mut b).unwrap();
            assert_eq!(&b, b"x");
            refused("a socket", std::os::unix::net::UnixStream::pair());
            refused(
                "a file",
                std::fs::File::open("/proc/self/status")
                    .and_then(|mut f| {
                        // Opening read-only is allowed everywhere (the C library
                        // needs it; Landlock says where): a write is not.
                        std::io::Write::write_all(&mut f, b"").map(|()| f)
                    })
                    .and_then(|_| std::fs::File::create("/proc/self/nothing-here")),
            );
        });
    }

    #[test]
    fn the_page_server_filter_reads_images_and_fills_memory_only() {
        let d = scratch("page-server");
        std::fs::write(d.join("img"), b"0123456789").unwrap();
        let img = std::fs::File::open(d.join("img")).unwrap();
        let new = d.join("new");
        let kvm = std::fs::File::open("/dev/kvm").ok();
        on_filtered_thread(ThreadKind::PageServer, move || {
            use std::os::fd::AsRawFd;
            use std::os::unix::fs::FileExt;
            // Allowed: positioned reads of the image; userfaultfd's ioctls
            // (here on a file that is not one: refused by the kernel with
            // ENOTTY, not by the filter with EPERM).
            let mut buf = [0u8; 3];
            img.read_exact_at(&mut buf, 4).unwrap();
            assert_eq!(&buf, b"456");
            // SAFETY: UFFDIO_WAKE (_IOR(0xAA, 0x02, struct uffdio_range)) on
            // a plain file reads nothing and fails.
            let r = unsafe { libc::ioctl(img.as_raw_fd(), 0x8010_AA02u64 as _, 0) };
            assert_eq!(r, -1);
            let e = std::io::Error::last_os_error().raw_os_error();
            assert_ne!(e, Some(libc::EPERM), "userfaultfd's ioctls pass the filter");
            // Refused: KVM, sockets, files written, threads, programs.
            refused("a socket", std::os::unix::net::UnixStream::pair());
            refused("create a file", std::fs::File::create(&new));
            refused(
                "a thread",
                std::thread::Builder::new().spawn(|| ()).map(|_| ()),
            );
            refused(
                "a program",
                std::process::Command::new("/bin/true").status(),
            );
            refused_kvm(kvm.as_ref());
        });
        assert!(!d.join("new").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_main_filter_writes_images_and_runs_no_program() {
        let d = scratch("main");
        let dir = d.clone();
        on_filtered_thread(ThreadKind::Main, move || {
            // Allowed: an image written atomically, a stale file removed.
            let tmp = dir.join(".img.tmp.1");
            let f = std::fs::File::create(&tmp).unwrap();
            f.try_lock().unwrap();
            std::io::Write::write_all(&mut &f, b"image").unwrap();
            f.sync_all().unwrap();
            std::fs::rename(&tmp, dir.join("img")).unwrap();
            assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
            std::fs::remove_file(dir.join("img")).unwrap();
            // Refused: programs, other sockets.
            refused(
                "a program",
                std::process::Command::new("/bin/true").status(),
            );
            refused("a TCP socket", std::net::TcpListener::bind("127.0.0.1:0"));
        });
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A forbidden call in a filtered process: the SIGSYS handler names the
    /// thread, the call and its arguments (a path, for openat), and the
    /// process ends with 159. Run in a child (this test binary again, told
    /// by an environment variable which call to make).
    #[test]
    fn a_forbidden_call_names_the_thread_and_ends_the_process() {
        const TEST: &str = "seccomp::tests::a_forbidden_call_names_the_thread_and_ends_the_process";
        if let Some(call) = std::env::var_os("VMM_SECCOMP_CHILD") {
            std::thread::Builder::new()
                .name("vcpu7".into())
                .spawn(move || {
                    confine_this_thread(ThreadKind::Vcpu).unwrap();
                    if call == "socket" {
                        // SAFETY: socket() takes no pointers; it is forbidden here.
                        unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
                    } else {
                        // SAFETY: a NUL-terminated path; openat is forbidden here.
                        unsafe {
                            libc::openat(
                                libc::AT_FDCWD,
                                c"/proc/self/status".as_ptr(),
                                libc::O_RDONLY,
                            )
                        };
                    }
                    unreachable!("the process ends on SIGSYS");
                })
                .unwrap()
                .join()
                .unwrap();
            return;
        }
        let child = |call: &str| {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", TEST, "--nocapture"])
                .env("VMM_SECCOMP_CHILD", call)
                .env_remove("VMM_SECCOMP_LOG")
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert_eq!(out.status.code(), Some(FORBIDDEN_EXIT), "{err}");
            err
        };
        let err = child("socket");
        assert!(
            err.contains(&format!(
                "vmm: seccomp: thread 'vcpu7' made system call {} (0x1, 0x1, 0x0), which its filter forbids",
                libc::SYS_socket
            )),
            "{err}"
        );
        let err = child("openat");
        assert!(
            err.contains(&format!(
                "vmm: seccomp: thread 'vcpu7' made system call {} (0xffffff9c, ",
                libc::SYS_openat
            )) && err.contains(", 0x0) on \"/proc/self/status\", which its filter forbids"),
            "{err}"
        );
    }
}
