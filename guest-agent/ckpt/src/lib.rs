//! Checkpoints the whole VM from inside it, through the guest agent's
//! local socket (`guest_abi::agent::local`): DragonFly BSD's
//! `sys_checkpoint` for any program in a VM.
//!
//! [`checkpoint`] returns [`Checkpointed::Original`] in the run that asked,
//! once the image is durable on the host, and [`Checkpointed::Restored`]
//! in every VM restored from that image. The C functions of
//! `include/vmm_ckpt.h` wrap these.

use std::ffi::{c_char, c_int, CStr};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;

use guest_abi::agent::local::{LocalReply, LocalRequest, SOCKET_PATH};

/// Where the program is after a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checkpointed {
    /// The run that asked; the image is at this path on the host.
    Original(String),
    /// A VM restored from the image at this path.
    Restored(String),
}

/// One request to the agent, one answer.
fn ask(req: &LocalRequest) -> io::Result<LocalReply> {
    let mut conn = UnixStream::connect(SOCKET_PATH).map_err(|e| {
        let kind = e.raw_os_error().unwrap_or(libc::ENOENT);
        io::Error::from_raw_os_error(if kind == libc::ECONNREFUSED {
            libc::ENOENT
        } else {
            kind
        })
    })?;
    conn.write_all(req.line().as_bytes())?;
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line)?;
    LocalReply::parse(&line).ok_or_else(|| io::Error::from_raw_os_error(libc::EPROTO))
}

/// An agent's error as an io::Error: its errno, its message.
fn agent_error(errno: i32, message: String) -> io::Error {
    let kind = io::Error::from_raw_os_error(errno).kind();
    io::Error::new(kind, format!("{message} (errno {errno})"))
}

/// The errno an error from this crate carries.
pub fn errno_of(e: &io::Error) -> i32 {
    if let Some(n) = e.raw_os_error() {
        return n;
    }
    // "... (errno N)"
    e.to_string()
        .rsplit_once("(errno ")
        .and_then(|(_, n)| n.trim_end_matches(')').parse().ok())
        .unwrap_or(libc::EIO)
}

/// Checkpoints the VM under `name` (None: a name with a timestamp).
pub fn checkpoint(name: Option<&str>) -> io::Result<Checkpointed> {
    if let Some(n) = name {
        if n.is_empty() || n.contains(char::is_whitespace) {
            return Err(agent_error(
                libc::EINVAL,
                format!("bad checkpoint name {n:?}"),
            ));
        }
    }
    let req = LocalRequest::Checkpoint {
        name: name.map(str::to_string),
    };
    match ask(&req)? {
        LocalReply::Ok(path) => Ok(Checkpointed::Original(path)),
        LocalReply::Restored(path) => Ok(Checkpointed::Restored(path)),
        LocalReply::Error { errno, message } => Err(agent_error(errno, message)),
    }
}

/// Asks for `before` before each checkpoint and `after` after each
/// restore (None: SIGUSR1, SIGUSR2).
pub fn register(before: Option<i32>, after: Option<i32>) -> io::Result<()> {
    let (before, after) = match (before, after) {
        (None, None) => (None, None),
        (b, a) => (
            Some(b.unwrap_or(libc::SIGUSR1)),
            Some(a.unwrap_or(libc::SIGUSR2)),
        ),
    };
    let req = LocalRequest::Register {
        pid: std::process::id() as i32,
        before,
        after,
    };
    match ask(&req)? {
        LocalReply::Error { errno, message } => Err(agent_error(errno, message)),
        _ => Ok(()),
    }
}

/// This process has done its before-checkpoint work.
pub fn ready() -> io::Result<()> {
    let req = LocalRequest::Ready {
        pid: std::process::id() as i32,
    };
    match ask(&req)? {
        LocalReply::Error { errno, message } => Err(agent_error(errno, message)),
        _ => Ok(()),
    }
}

fn set_errno(e: &io::Error) -> c_int {
    // SAFETY: __errno_location returns this thread's errno slot, always valid.
    unsafe { *libc::__errno_location() = errno_of(e) };
    -1
}

/// C: `int vmm_checkpoint(const char *name)`; see include/vmm_ckpt.h.
///
/// # Safety
/// `name` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vmm_checkpoint(name: *const c_char) -> c_int {
    let name = if name.is_null() {
        None
    } else {
        // SAFETY: the caller passes a NUL-terminated string (see above).
        match unsafe { CStr::from_ptr(name) }.to_str() {
            Ok(n) => Some(n),
            Err(_) => return set_errno(&io::Error::from_raw_os_error(libc::EINVAL)),
        }
    };
    match checkpoint(name) {
        Ok(Checkpointed::Original(_)) => 0,
        Ok(Checkpointed::Restored(_)) => 1,
        Err(e) => set_errno(&e),
    }
}

/// C: `int vmm_notify_register(int before_signal, int after_signal)`.
#[unsafe(no_mangle)]
pub extern "C" fn vmm_notify_register(before_signal: c_int, after_signal: c_int) -> c_int {
    let pick = |s: c_int| (s != 0).then_some(s);
    match register(pick(before_signal), pick(after_signal)) {
        Ok(()) => 0,
        Err(e) => set_errno(&e),
    }
}

/// C: `int vmm_notify_ready(void)`.
#[unsafe(no_mangle)]
pub extern "C" fn vmm_notify_ready() -> c_int {
    match ready() {
        Ok(()) => 0,
        Err(e) => set_errno(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errnos_survive_the_message() {
        let e = agent_error(libc::EPERM, "no --snapshot-dir".into());
        assert_eq!(errno_of(&e), libc::EPERM);
        assert!(e.to_string().contains("no --snapshot-dir"));
        assert_eq!(
            errno_of(&io::Error::from_raw_os_error(libc::ENOENT)),
            libc::ENOENT
        );
    }
}
