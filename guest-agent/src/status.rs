//! Exit statuses and how they reach the VMM.
//!
//! Protocol: before rebooting, the agent writes one byte, the container's exit
//! status, to I/O port [`STATUS_PORT`] (after `ioperm` lets it do so from user
//! mode; the `out` exits straight to the VMM). The guest then reboots; with
//! `reboot=k` the kernel resets through the i8042, which ends the VMM, and
//! `vmm` exits with the byte it recorded. No byte means the guest ended
//! without an agent report (kernel panic, agent killed).

use std::io;

pub use guest_abi::ports::{PROGRESS_PORT, STATUS_PORT};

/// The program was found but could not be run, or the agent could not start it.
pub const CANNOT_EXECUTE: u8 = 126;
/// The program was not found.
pub const NOT_FOUND: u8 = 127;
/// Added to a signal number when the command was killed by a signal.
pub const SIGNAL_BASE: u8 = 128;

/// Maps a `waitpid` status to a shell-style exit status: the exit code, or
/// 128 + the signal number for a process killed by a signal.
pub fn from_wait_status(status: libc::c_int) -> u8 {
    if libc::WIFEXITED(status) {
        // The kernel keeps only the low 8 bits of an exit code.
        (libc::WEXITSTATUS(status) & 0xff) as u8
    } else if libc::WIFSIGNALED(status) {
        SIGNAL_BASE.wrapping_add((libc::WTERMSIG(status) & 0x7f) as u8)
    } else {
        // Stopped or continued: not an exit. Callers only pass exits; be total anyway.
        CANNOT_EXECUTE
    }
}

/// The status to report when the command could not be started.
pub fn from_exec_error(err: &io::Error) -> u8 {
    match err.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => NOT_FOUND,
        _ => CANNOT_EXECUTE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(code: i32) -> libc::c_int {
        (code & 0xff) << 8
    }

    fn signaled(sig: i32) -> libc::c_int {
        sig & 0x7f
    }

    #[test]
    fn exit_codes_pass_through() {
        assert_eq!(from_wait_status(exited(0)), 0);
        assert_eq!(from_wait_status(exited(7)), 7);
        assert_eq!(from_wait_status(exited(255)), 255);
    }

    #[test]
    fn signals_map_to_128_plus_signal() {
        assert_eq!(from_wait_status(signaled(libc::SIGKILL)), 137);
        assert_eq!(from_wait_status(signaled(libc::SIGTERM)), 143);
        assert_eq!(from_wait_status(signaled(libc::SIGSEGV) | 0x80), 139); // core dumped
    }

    #[test]
    fn real_wait_statuses_from_the_host() {
        use std::os::unix::process::ExitStatusExt;
        let st = std::process::Command::new("sh")
            .args(["-c", "exit 42"])
            .status()
            .unwrap();
        assert_eq!(from_wait_status(st.into_raw()), 42);
        let st = std::process::Command::new("sh")
            .args(["-c", "kill -9 $$"])
            .status()
            .unwrap();
        assert_eq!(from_wait_status(st.into_raw()), 137);
    }

    #[test]
    fn exec_errors_map_like_a_shell() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert_eq!(from_exec_error(&e(libc::ENOENT)), 127);
        assert_eq!(from_exec_error(&e(libc::EACCES)), 126);
        assert_eq!(from_exec_error(&e(libc::ENOEXEC)), 126);
    }
}
