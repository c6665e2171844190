//! Least privilege by thread: each kind of thread, once set up, puts a
//! seccomp filter on itself that lets through only the system calls its
//! job needs. A call outside it raises SIGSYS, whose handler says which
//! thread made which call on stderr and ends the process (exit status 159,
//! 128 + SIGSYS), as Firecracker does. `vmm run|restore --no-seccomp`
//! turns the filters off, for debugging.
//!
//! Filtered so far: the vCPU threads, which run the guest and act on what it
//! asks (port and MMIO exits): the most exposed threads of the VMM.
//!
//! The lists come from tracing the threads (strace -ff over boots, warm
//! runs, snapshots, restores, pause and resume, exec, a TAP); each entry
//! says why. A thread a filtered thread starts inherits its filter, and
//! glibc blocks every signal while it creates a thread, so a filtered
//! thread must not start threads: the kernel would kill the process
//! without the handler's message.

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
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vCPU",
        }
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

/// The system calls a `kind` thread may make, with conditions on some.
fn allowed(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut allow = |nr: libc::c_long| {
        rules.insert(nr, Vec::new());
    };
    // Every thread: memory for the allocator, locks and channels, signals
    // (the vCPU kick arrives as one), time, logging and the console's
    // output (write), and ending the thread.
    for nr in [
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_mremap,
        libc::SYS_brk,
        libc::SYS_futex,
        libc::SYS_sched_yield,
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
    ] {
        allow(nr);
    }
    // The SIGSYS handler reads the thread's name.
    let get_name = SeccompRule::new(vec![SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::PR_GET_NAME as u64,
    )?])?;
    rules.insert(libc::SYS_prctl, vec![get_name]);
    match kind {
        ThreadKind::Vcpu => {
            // KVM_RUN and the vCPU's state (saved and restored on its own
            // thread): KVM's ioctls. And one of the TAP's: virtio-net sets
            // the offloads the driver acked when the driver's register
            // write activates or resets the device, on this thread.
            let kvm = SeccompRule::new(vec![SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(0xff00),
                KVMIO << 8,
            )?])?;
            let tap_offload = SeccompRule::new(vec![SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                TUNSETOFFLOAD,
            )?])?;
            rules.insert(libc::SYS_ioctl, vec![kvm, tap_offload]);
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
    let bpf = program(kind, SeccompAction::Trap)?;
    seccompiler::apply_filter(&bpf).map_err(|e| SeccompError::Apply(kind.name(), e))
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

/// Says which thread made which forbidden call, and ends the process.
/// Only async-signal-safe calls: prctl, write, _exit.
extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SIGSYS's siginfo holds the call's number at byte 24 (after signo,
    // errno, code, padding and the calling address).
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid siginfo_t, 128 bytes long;
        // bytes 24..28 are `_sigsys._syscall` for SIGSYS.
        unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() }
    };
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into `name`.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let mut msg = [0u8; 160];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        for &b in bytes {
            if len < msg.len() {
                msg[len] = b;
                len += 1;
            }
        }
    };
    put(b"vmm: seccomp: thread '");
    put(name.split(|&b| b == 0).next().unwrap_or_default());
    put(b"' made system call ");
    let mut digits = [0u8; 12];
    let mut n = i64::from(nr).unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if nr < 0 {
        put(b"-");
    }
    put(&digits[i..]);
    put(b", which its filter forbids; the VMM stops (--no-seccomp turns the filters off)\n");
    // SAFETY: writes our own buffer to stderr, then ends the process
    // without running anything else of it.
    unsafe {
        libc::write(libc::STDERR_FILENO, msg.as_ptr().cast(), len);
        libc::_exit(FORBIDDEN_EXIT);
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
                let v = unsafe { libc::ioctl(kvm.as_raw_fd(), 0xAE00) };
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

    /// A forbidden call in a filtered process: the SIGSYS handler names the
    /// thread and the call, and the process ends with 159. Run in a child
    /// (this test binary again, told by an environment variable).
    #[test]
    fn a_forbidden_call_names_the_thread_and_ends_the_process() {
        if std::env::var_os("VMM_SECCOMP_CHILD").is_some() {
            std::thread::Builder::new()
                .name("vcpu7".into())
                .spawn(|| {
                    confine_this_thread(ThreadKind::Vcpu).unwrap();
                    // SAFETY: socket() takes no pointers; it is forbidden here.
                    unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
                    unreachable!("the process ends on SIGSYS");
                })
                .unwrap()
                .join()
                .unwrap();
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "seccomp::tests::a_forbidden_call_names_the_thread_and_ends_the_process",
                "--nocapture",
            ])
            .env("VMM_SECCOMP_CHILD", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(FORBIDDEN_EXIT), "{err}");
        assert!(
            err.contains(&format!(
                "vmm: seccomp: thread 'vcpu7' made system call {}, which its filter forbids",
                libc::SYS_socket
            )),
            "{err}"
        );
    }
}
