//! Every system call the agent makes, and the crate's only `unsafe` code.
//!
//! Thin wrappers over libc returning `io::Result`. Each call costs about
//! 0.6 ms in a guest whose kernel is interpreted, so callers are expected to
//! make as few as they can; nothing here adds calls of its own.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr;
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};

use guest_abi::agent::ProcessUser;

fn check(ret: c_int) -> io::Result<c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn errno() -> c_int {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// mount(2).
pub fn mount(
    source: &CStr,
    target: &CStr,
    fstype: &CStr,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> io::Result<()> {
    let data = data.map_or(ptr::null(), CStr::as_ptr);
    // SAFETY: every pointer is a NUL-terminated string borrowed for the whole
    // call (data may be null, which mount(2) accepts).
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.cast::<c_void>(),
        )
    })?;
    Ok(())
}

/// Remounts `target` read-only. For ext4 this also writes back the journal,
/// so the image is clean (and readable by debugfs) after the VM ends.
pub fn remount_read_only(target: &CStr) -> io::Result<()> {
    // SAFETY: target is a NUL-terminated string borrowed for the call; a
    // remount takes null source, fstype and data.
    check(unsafe {
        libc::mount(
            ptr::null(),
            target.as_ptr(),
            ptr::null(),
            libc::MS_REMOUNT | libc::MS_RDONLY,
            ptr::null(),
        )
    })?;
    Ok(())
}

/// mkdir(2).
pub fn mkdir(path: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: path is a NUL-terminated string borrowed for the call.
    check(unsafe { libc::mkdir(path.as_ptr(), mode) })?;
    Ok(())
}

/// Whether `path` exists (access(2) with F_OK).
pub fn exists(path: &CStr) -> bool {
    // SAFETY: path is a NUL-terminated string borrowed for the call.
    unsafe { libc::access(path.as_ptr(), libc::F_OK) == 0 }
}

/// sethostname(2).
pub fn sethostname(name: &[u8]) -> io::Result<()> {
    // SAFETY: the kernel reads exactly name.len() bytes from name.
    check(unsafe { libc::sethostname(name.as_ptr().cast::<c_char>(), name.len()) })?;
    Ok(())
}

/// getpid(2).
pub fn getpid() -> libc::pid_t {
    // SAFETY: getpid has no arguments and cannot fail.
    unsafe { libc::getpid() }
}

/// Waits for any child to exit: `Some((pid, wait status))`, or `None` when
/// there are no children left.
pub fn wait_any() -> io::Result<Option<(libc::pid_t, c_int)>> {
    wait_pid(-1)
}

/// Waits for child `which` (-1: any) to exit, as [`wait_any`].
pub fn wait_pid(which: libc::pid_t) -> io::Result<Option<(libc::pid_t, c_int)>> {
    loop {
        let mut status: c_int = 0;
        // SAFETY: status is a valid, writable c_int for the duration of the call.
        let pid = unsafe { libc::waitpid(which, &mut status, 0) };
        if pid >= 0 {
            return Ok(Some((pid, status)));
        }
        match errno() {
            libc::EINTR => continue,
            libc::ECHILD => return Ok(None),
            e => return Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// Sends SIGKILL to every process except the caller (kill(-1, SIGKILL)).
/// Only meaningful for PID 1: anywhere else it kills everything the user owns.
pub fn kill_all_others() -> io::Result<()> {
    // SAFETY: kill takes no pointers; pid -1 means every process we may signal.
    check(unsafe { libc::kill(-1, libc::SIGKILL) })?;
    Ok(())
}

/// sync(2).
pub fn sync() {
    // SAFETY: sync has no arguments and cannot fail.
    unsafe { libc::sync() }
}

/// Waits until output written to the terminal on `fd` has been transmitted,
/// so a reboot does not cut off the command's last lines.
pub fn drain_output(fd: c_int) -> io::Result<()> {
    // SAFETY: tcdrain takes no pointers; an invalid fd only makes it fail.
    check(unsafe { libc::tcdrain(fd) })?;
    Ok(())
}

/// Writes `value` to I/O port `port` from user mode, after asking the kernel
/// for access to that one port (ioperm needs CAP_SYS_RAWIO and a kernel with
/// CONFIG_X86_IOPL_IOPERM). In a VM the `out` exits to the VMM.
#[cfg(target_arch = "x86_64")]
pub fn write_port(port: u16, value: u8) -> io::Result<()> {
    // SAFETY: ioperm takes no pointers; it only changes this process's I/O
    // permission bitmap.
    check(unsafe { libc::ioperm(libc::c_ulong::from(port), 1, 1) })?;
    // SAFETY: ioperm above granted this process exactly this port, so the
    // `out` cannot fault; it touches neither memory, the stack nor flags.
    unsafe {
        std::arch::asm!(
            "out dx, al",
            in("dx") port,
            in("al") value,
            options(nomem, nostack, preserves_flags)
        );
    }
    // Give the port back so the container, which inherits the I/O bitmap,
    // cannot write it.
    // SAFETY: as above; this only clears bits in this process's bitmap.
    check(unsafe { libc::ioperm(libc::c_ulong::from(port), 1, 0) })?;
    Ok(())
}

/// I/O ports exist only on x86.
#[cfg(not(target_arch = "x86_64"))]
pub fn write_port(_port: u16, _value: u8) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// Reads CMOS registers `regs` (index port 0x70, data port 0x71).
#[cfg(target_arch = "x86_64")]
pub fn read_cmos(regs: &[u8]) -> io::Result<Vec<u8>> {
    const INDEX: u16 = 0x70;
    // SAFETY: ioperm takes no pointers; it only grants this process ports
    // 0x70 and 0x71.
    check(unsafe { libc::ioperm(libc::c_ulong::from(INDEX), 2, 1) })?;
    let mut out = Vec::with_capacity(regs.len());
    for &r in regs {
        let v: u8;
        // SAFETY: ioperm above granted exactly these two ports, so neither
        // instruction can fault; they touch neither memory, the stack nor
        // flags.
        unsafe {
            std::arch::asm!(
                "out dx, al",
                "inc dx",
                "in al, dx",
                inout("dx") INDEX => _,
                inout("al") r => v,
                options(nomem, nostack, preserves_flags)
            );
        }
        out.push(v);
    }
    // SAFETY: as above; this only clears the bits again, so the container
    // (which inherits the I/O bitmap) cannot reach the RTC.
    check(unsafe { libc::ioperm(libc::c_ulong::from(INDEX), 2, 0) })?;
    Ok(out)
}

/// I/O ports exist only on x86.
#[cfg(not(target_arch = "x86_64"))]
pub fn read_cmos(_regs: &[u8]) -> io::Result<Vec<u8>> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// Sets CLOCK_REALTIME to `secs` and `nanos` since the epoch.
pub fn set_realtime(secs: i64, nanos: u32) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: libc::c_long::from(nanos.min(999_999_999)),
    };
    // SAFETY: `ts` is a valid timespec that lives through the call.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) }).map(|_| ())
}

/// Restarts the machine (LINUX_REBOOT_CMD_RESTART). Returns only on failure.
pub fn reboot() -> io::Error {
    // SAFETY: reboot takes no pointers.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    io::Error::last_os_error()
}

/// How to start the container's main process.
#[derive(Debug)]
pub struct Spawn {
    /// Paths to execve in turn, as execvp would try them (see `command::candidates`).
    pub candidates: Vec<CString>,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    /// Make the terminal on fd 0 (the console) the new session's controlling
    /// terminal, so job control and Ctrl-C work. Off in tests, where fd 0 may be
    /// the developer's terminal.
    pub controlling_tty: bool,
    /// CLONE_NEW* flags for unshare(2); 0 for none.
    pub unshare_flags: c_int,
    pub workdir: CString,
    /// Whom the process runs as (set after the chdir, as runc does, so a
    /// directory only root may enter still works); None: the agent's root.
    pub user: Option<ProcessUser>,
    /// The child's stdin, stdout and stderr; None inherits the agent's.
    pub stdio: Option<[c_int; 3]>,
}

/// The step of starting the main process that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpawnStep {
    Clone = 1,
    Setsid,
    Unshare,
    Chdir,
    Exec,
    Stdio,
    User,
}

impl SpawnStep {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Clone,
            2 => Self::Setsid,
            3 => Self::Unshare,
            4 => Self::Chdir,
            5 => Self::Exec,
            6 => Self::Stdio,
            7 => Self::User,
            _ => return None,
        })
    }
}

/// Why the main process could not be started.
#[derive(Debug)]
pub struct SpawnError {
    pub step: SpawnStep,
    pub error: io::Error,
}

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let step = match self.step {
            SpawnStep::Clone => "clone",
            SpawnStep::Setsid => "setsid",
            SpawnStep::Unshare => "unshare (does the guest kernel have the namespace?)",
            SpawnStep::Chdir => "chdir",
            SpawnStep::Exec => "exec",
            SpawnStep::Stdio => "dup2",
            SpawnStep::User => "setgroups/setgid/setuid",
        };
        write!(f, "{step}: {}", self.error)
    }
}

impl std::error::Error for SpawnError {}

/// What the child reads, prepared by the parent so that the child needs no
/// allocation; and where the child leaves the step and errno that failed.
struct ChildArgs<'a> {
    candidates: Vec<*const c_char>,
    argv: *const *const c_char,
    envp: *const *const c_char,
    controlling_tty: bool,
    unshare_flags: c_int,
    workdir: *const c_char,
    /// uid, gid and the supplementary groups.
    user: Option<(libc::uid_t, libc::gid_t, &'a [libc::gid_t])>,
    stdio: Option<[c_int; 3]>,
    failed_step: AtomicU8,
    failed_errno: AtomicI32,
}

/// Child stack size: the child only makes a handful of system calls.
const CHILD_STACK_BYTES: usize = 64 * 1024;

/// Starts the main process in a new session, like posix_spawn does: with
/// clone(CLONE_VM | CLONE_VFORK) on a stack of its own, so the agent's page
/// tables are not copied (fork is expensive when the guest kernel is
/// interpreted) and the parent learns synchronously whether exec worked.
pub fn spawn(spec: &Spawn) -> Result<libc::pid_t, SpawnError> {
    let argv = null_terminated(&spec.argv);
    let envp = null_terminated(&spec.envp);
    let args = ChildArgs {
        candidates: spec.candidates.iter().map(|c| c.as_ptr()).collect(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        controlling_tty: spec.controlling_tty,
        unshare_flags: spec.unshare_flags,
        workdir: spec.workdir.as_ptr(),
        user: spec
            .user
            .as_ref()
            .map(|u| (u.uid, u.gid, u.groups.as_slice())),
        stdio: spec.stdio,
        failed_step: AtomicU8::new(0),
        failed_errno: AtomicI32::new(0),
    };
    // u128 elements keep the stack 16-byte aligned, as the x86_64 ABI wants.
    let mut stack = vec![0u128; CHILD_STACK_BYTES / 16];
    let stack_top = stack.as_mut_ptr_range().end.cast::<c_void>();
    // SAFETY: child_main gets a pointer to `args`, which outlives the child's
    // use of it: with CLONE_VFORK the parent is suspended until the child has
    // exec'd or exited. The child runs on `stack` (ours, alive until then) and
    // only calls async-signal-safe functions. No signal handler is installed
    // in the agent, so none can run on the child's stack with shared memory.
    let pid = unsafe {
        libc::clone(
            child_main,
            stack_top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            ptr::from_ref(&args).cast_mut().cast::<c_void>(),
        )
    };
    if pid == -1 {
        return Err(SpawnError {
            step: SpawnStep::Clone,
            error: io::Error::last_os_error(),
        });
    }
    drop(stack);
    match SpawnStep::from_u8(args.failed_step.load(Ordering::Acquire)) {
        None => Ok(pid),
        Some(step) => {
            // The child has exited; reap it here so the caller sees no stray exit.
            let mut status = 0;
            // SAFETY: status is a valid, writable c_int for the duration of the call.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            Err(SpawnError {
                step,
                error: io::Error::from_raw_os_error(args.failed_errno.load(Ordering::Acquire)),
            })
        }
    }
}

fn null_terminated(strings: &[CString]) -> Vec<*const c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(ptr::null()))
        .collect()
}

/// Runs in the child, sharing the parent's memory: no allocation, no locks,
/// no unwinding; report failures through `ChildArgs` and `_exit`.
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `&ChildArgs` spawn passed to clone, alive and not
    // mutated by the suspended parent until this child execs or exits.
    let args = unsafe { &*arg.cast_const().cast::<ChildArgs<'_>>() };
    let fail = |step: SpawnStep, errno: c_int| -> c_int {
        args.failed_errno.store(errno, Ordering::Release);
        args.failed_step.store(step as u8, Ordering::Release);
        // SAFETY: _exit ends this process without running the parent's
        // atexit handlers or flushing its stdio buffers, as a vfork child must.
        unsafe { libc::_exit(127) }
    };

    // SAFETY: setsid takes no arguments.
    if unsafe { libc::setsid() } == -1 {
        return fail(SpawnStep::Setsid, errno());
    }
    if let Some(fds) = args.stdio {
        for (target, fd) in (0..).zip(fds) {
            // SAFETY: dup2 takes no pointers. The copies on 0-2 lose
            // O_CLOEXEC; the originals keep it and close at exec.
            if unsafe { libc::dup2(fd, target) } == -1 {
                return fail(SpawnStep::Stdio, errno());
            }
        }
    }
    if args.controlling_tty {
        attach_console();
    }
    // SAFETY: unshare takes no pointers.
    if args.unshare_flags != 0 && unsafe { libc::unshare(args.unshare_flags) } == -1 {
        return fail(SpawnStep::Unshare, errno());
    }
    // SAFETY: workdir is a NUL-terminated string owned by the suspended parent.
    if unsafe { libc::chdir(args.workdir) } == -1 {
        return fail(SpawnStep::Chdir, errno());
    }
    if let Some((uid, gid, groups)) = args.user {
        // Raw system calls, not glibc's wrappers: those change every
        // thread of the process (the agent's, whose memory this child
        // shares), taking locks and signalling them; posix_spawn's child
        // avoids them for the same reason.
        // SAFETY: `groups` points at `groups.len()` gids owned by the
        // suspended parent; the id calls take no pointers. Groups first,
        // the uid last: after it, the others are not allowed.
        let failed = unsafe {
            libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) == -1
                || libc::syscall(libc::SYS_setresgid, gid, gid, gid) == -1
                || libc::syscall(libc::SYS_setresuid, uid, uid, uid) == -1
        };
        if failed {
            return fail(SpawnStep::User, errno());
        }
    }

    // The PATH search of execvp: go on after "not there", remember "not allowed".
    let mut last = libc::ENOENT;
    let mut saw_eacces = false;
    for &path in &args.candidates {
        // SAFETY: path, argv and envp are NUL-terminated strings and
        // null-terminated pointer arrays owned by the suspended parent.
        unsafe { libc::execve(path, args.argv, args.envp) };
        last = errno();
        match last {
            libc::EACCES => saw_eacces = true,
            libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
            _ => break,
        }
    }
    let err = if saw_eacces && last != libc::ENOEXEC {
        libc::EACCES
    } else {
        last
    };
    fail(SpawnStep::Exec, err)
}

/// Makes the terminal on fd 0 the controlling terminal of the (new) session.
/// Linux gives init fds 0-2 on /dev/console, whose open never assigns a
/// controlling terminal, hence TIOCSCTTY. If fd 0 is closed (the kernel found
/// no console at boot), open /dev/console now. Best effort: a command without
/// a controlling terminal still runs.
fn attach_console() {
    // SAFETY: TIOCSCTTY takes an int argument (0: do not steal the terminal
    // from another session); an invalid fd only makes it fail.
    if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } == 0 || errno() != libc::EBADF {
        return;
    }
    // SAFETY: the path is a NUL-terminated literal.
    let fd = unsafe { libc::open(c"/dev/console".as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
    if fd < 0 {
        return;
    }
    for target in 0..3 {
        if fd != target {
            // SAFETY: dup2 takes no pointers; both fds are plain integers.
            unsafe { libc::dup2(fd, target) };
        }
    }
    if fd > 2 {
        // SAFETY: fd is ours and was duplicated onto 0-2 above.
        unsafe { libc::close(fd) };
    }
    // SAFETY: as above, TIOCSCTTY with an int argument.
    unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
}

/// A pipe, both ends close-on-exec: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: fds is a writable array of two ints, as pipe2 expects.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both descriptors are new and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// open(2), close-on-exec.
pub fn open(path: &CStr, flags: c_int) -> io::Result<OwnedFd> {
    // SAFETY: path is a NUL-terminated string borrowed for the call.
    let fd = check(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A new pseudo-terminal of `rows` x `cols`: (master, slave), both
/// close-on-exec.
pub fn open_pty(rows: u16, cols: u16) -> io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: posix_openpt takes no pointers; the result is checked.
    let master =
        check(unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })?;
    // SAFETY: a new descriptor that nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    // SAFETY: grantpt and unlockpt take the master's descriptor only.
    check(unsafe { libc::grantpt(master.as_raw_fd()) })?;
    // SAFETY: as above.
    check(unsafe { libc::unlockpt(master.as_raw_fd()) })?;
    let mut name = [0 as c_char; 64];
    // SAFETY: name is a writable buffer of the length passed.
    let r = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    // SAFETY: ptsname_r wrote a NUL-terminated path into name.
    let path = unsafe { CStr::from_ptr(name.as_ptr()) };
    let slave = open(path, libc::O_RDWR | libc::O_NOCTTY)?;
    set_window_size(&master, rows, cols)?;
    Ok((master, slave))
}

/// TIOCSWINSZ: the terminal's size (0 leaves the default).
pub fn set_window_size(tty: &OwnedFd, rows: u16, cols: u16) -> io::Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize that outlives the call.
    check(unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &ws) })?;
    Ok(())
}

/// kill(2).
pub fn kill(pid: libc::pid_t, signal: c_int) -> io::Result<()> {
    // SAFETY: kill takes no pointers.
    check(unsafe { libc::kill(pid, signal) })?;
    Ok(())
}

/// Whether process `pid` exists (kill with signal 0).
pub fn alive(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 || errno() == libc::EPERM }
}

/// FIFREEZE: `_IOWR('X', 119, int)`.
const FIFREEZE: libc::c_ulong = 0xc004_5877;
/// FITHAW: `_IOWR('X', 120, int)`.
const FITHAW: libc::c_ulong = 0xc004_5878;

/// Syncs and freezes the filesystem mounted on `mount_point`: writers
/// block until it is thawed.
pub fn freeze_fs(mount_point: &CStr) -> io::Result<()> {
    let dir = open(mount_point, libc::O_RDONLY | libc::O_DIRECTORY)?;
    // SAFETY: FIFREEZE takes an int argument, unused.
    check(unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE, 0) })?;
    Ok(())
}

/// Thaws the filesystem mounted on `mount_point`.
pub fn thaw_fs(mount_point: &CStr) -> io::Result<()> {
    let dir = open(mount_point, libc::O_RDONLY | libc::O_DIRECTORY)?;
    // SAFETY: FITHAW takes an int argument, unused.
    check(unsafe { libc::ioctl(dir.as_raw_fd(), FITHAW, 0) })?;
    Ok(())
}

/// RNDADDENTROPY: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// RNDRESEEDCRNG: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Credits `entropy` to the kernel's pool, then reseeds its CRNG from it,
/// so what /dev/urandom returns from now on depends on these bytes.
pub fn add_entropy_and_reseed(entropy: &[u8]) -> io::Result<()> {
    let random = open(c"/dev/urandom", libc::O_WRONLY)?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + entropy.len());
    let bits = c_int::try_from(entropy.len() * 8).unwrap_or(c_int::MAX);
    let len = c_int::try_from(entropy.len()).unwrap_or(c_int::MAX);
    info.extend_from_slice(&bits.to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(entropy);
    // u32 alignment for the kernel's struct: copy into u32s.
    let mut words = vec![0u32; info.len().div_ceil(4)];
    for (w, chunk) in words.iter_mut().zip(info.chunks(4)) {
        let mut b = [0u8; 4];
        b[..chunk.len()].copy_from_slice(chunk);
        *w = u32::from_ne_bytes(b);
    }
    // SAFETY: RNDADDENTROPY reads a rand_pool_info whose buf_size bytes
    // follow its two ints, all inside `words`, alive for the call.
    check(unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, words.as_ptr()) })?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    check(unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG, 0) })?;
    Ok(())
}

/// mkfifo(3).
pub fn mkfifo(path: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: path is a NUL-terminated string borrowed for the call.
    check(unsafe { libc::mkfifo(path.as_ptr(), mode) })?;
    Ok(())
}

/// An AF_INET datagram socket: the handle for interface ioctls.
pub struct NetConfigSocket(std::os::fd::OwnedFd);

/// struct rtentry (x86_64), for SIOCADDRT: glibc's libc crate lacks it.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn sockaddr_in(addr: std::net::Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain data; the
    // kernel reads a sockaddr_in through a sockaddr for AF_INET.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

impl NetConfigSocket {
    pub fn new() -> io::Result<Self> {
        // SAFETY: socket(2) takes no pointers; the result is checked.
        let fd = check(unsafe {
            libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0)
        })?;
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(NetConfigSocket(unsafe {
            std::os::fd::FromRawFd::from_raw_fd(fd)
        }))
    }

    fn ifreq(name: &str) -> io::Result<libc::ifreq> {
        // SAFETY: ifreq is plain data; all zeroes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        if name.is_empty() || name.len() >= req.ifr_name.len() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as c_char;
        }
        Ok(req)
    }

    fn ioctl(&self, request: libc::c_ulong, arg: *mut c_void) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: the callers pass a pointer to the struct `request` reads
        // or writes (ifreq or rtentry), alive for the call.
        check(unsafe { libc::ioctl(self.0.as_raw_fd(), request as _, arg) }).map(|_| ())
    }

    /// Gives interface `name` the address `addr`/`prefix`.
    pub fn set_address(&self, name: &str, addr: std::net::Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut req = Self::ifreq(name)?;
        req.ifr_ifru.ifru_addr = sockaddr_in(addr);
        self.ioctl(libc::SIOCSIFADDR, (&raw mut req).cast())?;
        let mask = u32::MAX
            .checked_shl(32 - u32::from(prefix.min(32)))
            .unwrap_or(0);
        req.ifr_ifru.ifru_netmask = sockaddr_in(mask.into());
        self.ioctl(libc::SIOCSIFNETMASK, (&raw mut req).cast())
    }

    /// Brings interface `name` up, keeping its other flags.
    pub fn set_up(&self, name: &str) -> io::Result<()> {
        let mut req = Self::ifreq(name)?;
        self.ioctl(libc::SIOCGIFFLAGS, (&raw mut req).cast())?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        self.ioctl(libc::SIOCSIFFLAGS, (&raw mut req).cast())
    }

    /// Adds the default route through `gateway`.
    pub fn add_default_route(&self, gateway: std::net::Ipv4Addr) -> io::Result<()> {
        let any = sockaddr_in(std::net::Ipv4Addr::UNSPECIFIED);
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: any,
            rt_gateway: sockaddr_in(gateway),
            rt_genmask: any,
            rt_flags: (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: ptr::null_mut(),
            rt_metric: 0,
            rt_dev: ptr::null_mut(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        self.ioctl(libc::SIOCADDRT, (&raw mut rt).cast())
    }
}

/// AF_VSOCK stream sockets: the guest's channel to the host.
pub mod vsock {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use super::check;

    /// The host's context id.
    pub const HOST_CID: u32 = libc::VMADDR_CID_HOST;

    fn addr(cid: u32, port: u32) -> libc::sockaddr_vm {
        libc::sockaddr_vm {
            svm_family: libc::AF_VSOCK as libc::sa_family_t,
            svm_reserved1: 0,
            svm_port: port,
            svm_cid: cid,
            svm_zero: [0; 4],
        }
    }

    fn socket() -> io::Result<OwnedFd> {
        // SAFETY: socket(2) takes no pointers; the result is checked.
        let fd = check(unsafe {
            libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
        })?;
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

    /// A socket listening on `port` for any CID.
    pub fn listen(port: u32) -> io::Result<OwnedFd> {
        let fd = socket()?;
        let a = addr(libc::VMADDR_CID_ANY, port);
        // SAFETY: `a` is a sockaddr_vm of ADDR_LEN bytes, alive for the call.
        check(unsafe { libc::bind(fd.as_raw_fd(), (&raw const a).cast(), ADDR_LEN) })?;
        // SAFETY: listen(2) takes no pointers.
        check(unsafe { libc::listen(fd.as_raw_fd(), 128) })?;
        Ok(fd)
    }

    /// The next connection on a listening socket.
    pub fn accept(listener: &OwnedFd) -> io::Result<OwnedFd> {
        // SAFETY: null address pointers are allowed: the peer is not asked for.
        let fd = check(unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        })?;
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// A connection to `port` of context `cid`.
    pub fn connect(cid: u32, port: u32) -> io::Result<OwnedFd> {
        let fd = socket()?;
        let a = addr(cid, port);
        // SAFETY: `a` is a sockaddr_vm of ADDR_LEN bytes, alive for the call.
        check(unsafe { libc::connect(fd.as_raw_fd(), (&raw const a).cast(), ADDR_LEN) })?;
        Ok(fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cstrings(v: &[&str]) -> Vec<CString> {
        v.iter().map(|s| CString::new(*s).unwrap()).collect()
    }

    fn spec(candidates: &[&str], argv: &[&str]) -> Spawn {
        Spawn {
            candidates: cstrings(candidates),
            argv: cstrings(argv),
            envp: cstrings(&["PATH=/usr/bin:/bin", "MARK=42"]),
            controlling_tty: false,
            unshare_flags: 0,
            workdir: CString::new("/").unwrap(),
            user: None,
            stdio: None,
        }
    }

    fn wait_for(pid: libc::pid_t) -> c_int {
        let mut status = 0;
        // SAFETY: status is a valid, writable c_int for the duration of the call.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        status
    }

    #[test]
    fn spawn_runs_in_a_new_session_with_env_and_cwd() {
        // Exits 0 only if it leads its own session, sees MARK and runs in /.
        let s = spec(
            &["/nonexistent/sh", "/bin/sh"],
            &[
                "sh",
                "-c",
                r#"[ "$MARK" = 42 ] && [ "$(pwd)" = / ] && [ "$(cut -d' ' -f6 /proc/$$/stat)" = $$ ] || exit 3; exit 7"#,
            ],
        );
        let pid = spawn(&s).unwrap();
        let status = wait_for(pid);
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 7);
    }

    #[test]
    fn spawn_connects_stdio() {
        let (out_r, out_w) = pipe().unwrap();
        let devnull = open(c"/dev/null", libc::O_RDONLY).unwrap();
        let mut s = spec(&["/bin/sh"], &["sh", "-c", "echo out; echo err >&2; cat"]);
        s.stdio = Some([devnull.as_raw_fd(), out_w.as_raw_fd(), out_w.as_raw_fd()]);
        let pid = spawn(&s).unwrap();
        drop(out_w);
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(out_r), &mut text).unwrap();
        assert_eq!(wait_for(pid), 0);
        assert_eq!(text, "out\nerr\n");
    }

    /// Needs root, as the agent has in the guest (and tests have here).
    #[test]
    fn spawn_sets_the_user_after_the_working_directory() {
        // SAFETY: geteuid takes nothing and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("not root: setuid cannot be tested");
            return;
        }
        let dir = std::env::temp_dir().join(format!("spawn-user-{}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let (out_r, out_w) = pipe().unwrap();
        let devnull = open(c"/dev/null", libc::O_RDONLY).unwrap();
        let mut s = spec(&["/bin/sh"], &["sh", "-c", "id -u; id -g; id -G; pwd"]);
        s.workdir = CString::new(dir.to_str().unwrap()).unwrap();
        s.user = Some(ProcessUser {
            uid: 4321,
            gid: 4322,
            groups: vec![4323, 4324],
        });
        s.stdio = Some([devnull.as_raw_fd(), out_w.as_raw_fd(), out_w.as_raw_fd()]);
        let pid = spawn(&s).unwrap();
        drop(out_w);
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(out_r), &mut text).unwrap();
        std::fs::remove_dir(&dir).unwrap();
        assert_eq!(wait_for(pid), 0, "{text}");
        // The directory (root's, 0700) was entered as root, then the
        // credentials changed.
        assert_eq!(
            text,
            format!("4321\n4322\n4322 4323 4324\n{}\n", dir.display())
        );
    }

    #[test]
    fn spawn_reports_missing_program() {
        let err = spawn(&spec(&["/nonexistent/a", "/nonexistent/b"], &["a"])).unwrap_err();
        assert_eq!(err.step, SpawnStep::Exec);
        assert_eq!(err.error.raw_os_error(), Some(libc::ENOENT));
    }

    #[test]
    fn spawn_reports_permission_denied_over_not_found() {
        // A file without execute permission: keep searching, then report EACCES.
        let file = std::env::temp_dir().join(format!("vmm-agent-test-{}", std::process::id()));
        std::fs::write(&file, "#!/bin/sh\n").unwrap();
        let path = file.to_str().unwrap();
        let err = spawn(&spec(&[path, "/nonexistent/b"], &["x"])).unwrap_err();
        std::fs::remove_file(&file).unwrap();
        assert_eq!(err.step, SpawnStep::Exec);
        assert_eq!(err.error.raw_os_error(), Some(libc::EACCES));
    }

    #[test]
    fn spawn_reports_a_bad_workdir() {
        let mut s = spec(&["/bin/true"], &["true"]);
        s.workdir = CString::new("/nonexistent").unwrap();
        let err = spawn(&s).unwrap_err();
        assert_eq!(err.step, SpawnStep::Chdir);
    }
}
