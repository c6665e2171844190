//! PID 1: prepare the guest, run the container command, report, reboot.
//!
//! Every guest system call costs about 0.6 ms when the guest kernel is
//! interpreted (and fork far more), so the sequence below is the minimum:
//! about ten calls before the command starts, a few after it ends. On a normal
//! run the agent prints nothing, so the command's output is all there is.
//! Problems are one line on the console starting with `vmm-agent: `.

use std::ffi::{CStr, CString};
use std::fmt::Display;
use std::io::{self, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::atomic::{AtomicBool, Ordering};

use guest_abi::agent::StartRequest;

use crate::children;
use crate::cmdline::{self, Namespaces};
use crate::command;
use crate::status::{self, STATUS_PORT};
use crate::sys::{self, SpawnStep};

/// The guest's hostname.
pub const HOSTNAME: &[u8] = b"vmm";
/// Interactive shells, first one present wins.
const BASH: &CStr = c"/bin/bash";
const SH: &CStr = c"/bin/sh";
/// Run once before a warm image is taken (see [`prewarm`]).
const TRUE: &CStr = c"/bin/true";
/// Read whole before a warm image is taken, where present (Debian's paths):
/// a program uses more of the C library than `/bin/true` does.
const PREWARM_FILES: [&str; 1] = ["/lib/x86_64-linux-gnu/libc.so.6"];

/// Runs the agent; never returns (the machine reboots).
pub fn main() -> ! {
    let status = std::panic::catch_unwind(run).unwrap_or_else(|_| {
        say("internal error (panic); shutting down");
        status::CANNOT_EXECUTE
    });
    shutdown(status)
}

/// Prints one line on the console.
pub fn say(msg: impl Display) {
    // One write, so lines from concurrent writers do not interleave.
    let line = format!("vmm-agent: {msg}\n");
    let _ = io::stderr().write_all(line.as_bytes());
}

/// Everything up to the main process's exit; returns the status to report.
fn run() -> u8 {
    if sys::getpid() != 1 {
        // Anywhere else, the shutdown below would kill every process and reboot.
        say("must run as PID 1, the guest's init (it kills all processes and reboots when done)");
        std::process::exit(2);
    }
    // Best effort: a kernel without ioperm only loses the boot milestone.
    let _ = sys::write_port(status::PROGRESS_PORT, 1);
    let args = match cmdline::parse(std::env::args_os().skip(1).map(OsStringExt::into_vec)) {
        Ok(args) => args,
        Err(e) => {
            say(e);
            return status::CANNOT_EXECUTE;
        }
    };
    setup();
    crate::clock::set_from_rtc();
    crate::net::configure(&args.nets);
    let agent = crate::control::Agent::start(args.start_by_agent);
    crate::local::start(&agent);
    crate::restore::write_generation(0);

    EPHEMERAL_ROOT.store(args.ephemeral_root, Ordering::Release);
    let start = match args.command {
        Some(argv) => StartRequest {
            argv: Some(argv),
            ..StartRequest::default()
        },
        // A warm image is taken here: whatever comes next is the run's.
        None if args.start_by_agent => {
            prewarm();
            agent.wait_for_start()
        }
        None => StartRequest::default(),
    };
    let argv = start.argv.unwrap_or_else(interactive_shell);
    let env = start.env.unwrap_or_else(|| {
        command::environment(std::env::vars_os().map(|(k, v)| (k.into_vec(), v.into_vec())))
    });
    let candidates = command::candidates(&argv[0], command::path_of(&env));
    let program = String::from_utf8_lossy(&argv[0]).into_owned();
    let workdir = start.workdir.unwrap_or_else(|| b"/".to_vec());
    let (Some(argv), Some(envp), Some(candidates), Ok(workdir)) = (
        cstrings(argv),
        cstrings(env),
        cstrings(candidates),
        CString::new(workdir),
    ) else {
        // The VMM's strings come from a command line or a JSON document.
        say(format!(
            "cannot run {program}: an argument, the environment or the working directory contains a NUL byte"
        ));
        return status::CANNOT_EXECUTE;
    };
    let spec = sys::Spawn {
        candidates,
        argv,
        envp,
        controlling_tty: true,
        unshare_flags: unshare_flags(args.unshare),
        workdir,
        user: start.user,
        stdio: None,
    };
    match sys::spawn(&spec) {
        Ok(pid) => wait_for(pid),
        Err(e) => {
            say(format!("cannot run {program}: {e}"));
            match e.step {
                SpawnStep::Exec => status::from_exec_error(&e.error),
                _ => status::CANNOT_EXECUTE,
            }
        }
    }
}

/// Before a warm image is taken: runs `/bin/true`, reads the C library,
/// looks up a name in each PATH directory and the restore hooks, so that
/// the image's page and dentry caches hold what a warm run needs first.
/// Otherwise every warm run reads them from disk again, through a block
/// layer that is slow where the guest kernel is interpreted (`vmm run --
/// uname -a` from a warm image: 3.3 s with this, 6.7 s without).
fn prewarm() {
    let _ = crate::restore::restore_hooks();
    // A name no directory has: the lookup reads each small directory whole.
    for candidate in command::candidates(b".vmm-prewarm", command::DEFAULT_PATH) {
        let _ = std::fs::symlink_metadata(std::ffi::OsStr::from_bytes(&candidate));
    }
    for lib in PREWARM_FILES {
        let _ = std::fs::read(lib);
    }
    let spec = sys::Spawn {
        candidates: vec![CString::from(TRUE)],
        argv: vec![CString::from(TRUE)],
        envp: Vec::new(),
        controlling_tty: false,
        unshare_flags: 0,
        workdir: CString::from(c"/"),
        user: None,
        stdio: None,
    };
    // Best effort: a root without /bin/true only misses the head start.
    if let Ok(pid) = sys::spawn(&spec) {
        let _ = sys::wait_pid(pid);
    }
}

/// The root disk ends with the VM: no need to leave it clean.
static EPHEMERAL_ROOT: AtomicBool = AtomicBool::new(false);

/// Mounts the API filesystems and names the host. Failures are reported and
/// skipped: the command may well run without them.
fn setup() {
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(c"proc", c"/proc", c"proc", nosuid_nodev_noexec, None);
    mount(c"sysfs", c"/sys", c"sysfs", nosuid_nodev_noexec, None);
    // The kernel mounts devtmpfs on /dev itself (CONFIG_DEVTMPFS_MOUNT) when
    // it mounts the root; only other kernels need this.
    if !sys::exists(c"/dev/null") {
        mount(
            c"devtmpfs",
            c"/dev",
            c"devtmpfs",
            libc::MS_NOSUID,
            Some(c"mode=0755"),
        );
    }
    // gid 5 is Debian's tty group, as in Docker.
    mount(
        c"devpts",
        c"/dev/pts",
        c"devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some(c"gid=5,mode=0620,ptmxmode=0666"),
    );
    mount(
        c"shm",
        c"/dev/shm",
        c"tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(c"mode=1777"),
    );
    // The agent's socket, FIFO and generation live here: in memory, so a
    // frozen root filesystem never blocks them.
    mount(
        c"tmpfs",
        c"/run",
        c"tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(c"mode=0755"),
    );
    if let Err(e) = sys::mkdir(c"/run/vmm", 0o755) {
        say(format!("mkdir /run/vmm: {e}"));
    }
    // Scratch space in memory instead of the journaled, virtio-backed root.
    mount(
        c"tmpfs",
        c"/tmp",
        c"tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(c"mode=1777"),
    );
    if let Err(e) = sys::sethostname(HOSTNAME) {
        say(format!("sethostname: {e}"));
    }
}

/// Mounts, creating the mount point only if it is missing (one more call,
/// and only then: devtmpfs has no /dev/pts or /dev/shm).
fn mount(source: &CStr, target: &CStr, fstype: &CStr, flags: libc::c_ulong, data: Option<&CStr>) {
    let mut result = sys::mount(source, target, fstype, flags, data);
    if matches!(&result, Err(e) if e.raw_os_error() == Some(libc::ENOENT)) {
        result = sys::mkdir(target, 0o755)
            .and_then(|()| sys::mount(source, target, fstype, flags, data));
    }
    if let Err(e) = result {
        say(format!(
            "mount {} on {}: {e}",
            fstype.to_string_lossy(),
            target.to_string_lossy()
        ));
    }
}

/// argv for the interactive shell: bash when the image has it, else sh.
fn interactive_shell() -> Vec<Vec<u8>> {
    let shell = if sys::exists(BASH) { BASH } else { SH };
    vec![shell.to_bytes().to_vec(), b"-i".to_vec()]
}

fn unshare_flags(ns: Namespaces) -> libc::c_int {
    let mut flags = 0;
    if ns.uts {
        flags |= libc::CLONE_NEWUTS;
    }
    if ns.ipc {
        flags |= libc::CLONE_NEWIPC;
    }
    if ns.mount {
        flags |= libc::CLONE_NEWNS;
    }
    flags
}

fn cstrings(v: Vec<Vec<u8>>) -> Option<Vec<CString>> {
    v.into_iter().map(|s| CString::new(s).ok()).collect()
}

/// Reaps every child (orphans are re-parented to PID 1) until the main
/// process exits; returns its exit status.
fn wait_for(main: libc::pid_t) -> u8 {
    loop {
        match sys::wait_any() {
            Ok(Some((pid, st))) if pid == main => return status::from_wait_status(st),
            // A command run for the VMM, or an orphan.
            Ok(Some((pid, st))) => children::exited(pid, st),
            Ok(None) => {
                say("lost track of the main process (no children left)");
                return status::CANNOT_EXECUTE;
            }
            Err(e) => {
                say(format!("waitpid: {e}"));
                return status::CANNOT_EXECUTE;
            }
        }
    }
}

/// Ends the container and the VM: kill and reap what is left, make the root
/// filesystem clean, report `status` to the VMM and reboot. Never returns.
pub fn shutdown(status: u8) -> ! {
    // ESRCH (nobody left) is the common case.
    let _ = sys::kill_all_others();
    while let Ok(Some(_)) = sys::wait_any() {}
    // A read-only remount syncs the filesystem and checkpoints the ext4
    // journal, so the image is consistent for the host once the VM is gone;
    // an ephemeral root is gone with it.
    if !EPHEMERAL_ROOT.load(Ordering::Acquire) && sys::remount_read_only(c"/").is_err() {
        sys::sync();
    }
    // Let the serial line send the command's last output first: the VMM
    // ends the VM as soon as it has the status.
    let _ = sys::drain_output(libc::STDOUT_FILENO);
    if let Err(e) = sys::write_port(STATUS_PORT, status) {
        let hint = if e.raw_os_error() == Some(libc::ENOSYS) {
            " (the guest kernel needs CONFIG_X86_IOPL_IOPERM=y)"
        } else {
            ""
        };
        say(format!(
            "cannot report exit status {status} to the VMM on port {STATUS_PORT:#x}: {e}{hint}"
        ));
    }
    let e = sys::reboot();
    say(format!("reboot: {e}"));
    // Init exiting panics the kernel, which (with panic=N) resets the VM too.
    std::process::exit(i32::from(status))
}
