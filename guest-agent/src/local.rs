//! The agent's local socket and notify FIFO for programs in the guest
//! (protocol: `guest_abi::agent::local`): checkpoint requests, and
//! registrations for the before/after signals.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use guest_abi::agent::local::{LocalReply, LocalRequest, NOTIFY_PATH, SOCKET_PATH};

use crate::control::Agent;
use crate::init::say;
use crate::sys;

/// How long a checkpoint may take before the caller is told it failed.
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(600);
/// The longest line a client may send.
const MAX_LINE: usize = 256;

/// Listens on the socket and reads the FIFO, each on a thread of its own.
pub fn start(agent: &Arc<Agent>) {
    let _ = std::fs::remove_file(SOCKET_PATH);
    match UnixListener::bind(SOCKET_PATH) {
        Ok(listener) => {
            // Any user of the guest may ask; the host decides where images go.
            let _ = std::fs::set_permissions(SOCKET_PATH, std::fs::Permissions::from_mode(0o666));
            let a = agent.clone();
            let _ = std::thread::Builder::new()
                .name("local".into())
                .spawn(move || {
                    for conn in listener.incoming().flatten() {
                        let a = a.clone();
                        let _ = std::thread::Builder::new()
                            .name("local-client".into())
                            .spawn(move || serve(&a, conn));
                    }
                });
        }
        Err(e) => say(format!("cannot listen on {SOCKET_PATH}: {e}")),
    }
    let _ = std::fs::remove_file(NOTIFY_PATH);
    let fifo = std::ffi::CString::new(NOTIFY_PATH).expect("no NUL");
    if let Err(e) = sys::mkfifo(&fifo, 0o622) {
        say(format!("cannot make {NOTIFY_PATH}: {e}"));
        return;
    }
    let _ = std::fs::set_permissions(NOTIFY_PATH, std::fs::Permissions::from_mode(0o622));
    let a = agent.clone();
    let _ = std::thread::Builder::new()
        .name("notify".into())
        .spawn(move || read_fifo(&a));
}

/// Handles one request; a checkpoint waits for the VMM.
fn handle(agent: &Agent, req: LocalRequest) -> LocalReply {
    match req {
        LocalRequest::Register { pid, before, after } => {
            match agent.notify.register(pid, before, after) {
                Ok(()) => LocalReply::Ok(String::new()),
                Err(message) => LocalReply::Error {
                    errno: libc::EINVAL,
                    message,
                },
            }
        }
        LocalRequest::Ready { pid } => {
            agent.notify.ready(pid);
            LocalReply::Ok(String::new())
        }
        LocalRequest::Checkpoint { name } => {
            let rx = agent.request_checkpoint(name);
            rx.recv_timeout(CHECKPOINT_TIMEOUT)
                .unwrap_or(LocalReply::Error {
                    errno: libc::ETIMEDOUT,
                    message: format!("no answer from the VMM within {CHECKPOINT_TIMEOUT:?}"),
                })
        }
    }
}

fn serve(agent: &Agent, conn: UnixStream) {
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    loop {
        line.clear();
        match (&mut reader).take(MAX_LINE as u64).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let reply = match LocalRequest::parse(line.trim_end()) {
            Some(req) => handle(agent, req),
            None => LocalReply::Error {
                errno: libc::EINVAL,
                message: format!("unknown request {:?}", line.trim_end()),
            },
        };
        if writer.write_all(reply.line().as_bytes()).is_err() {
            return;
        }
    }
}

/// Reads `register`/`ready` lines from the FIFO, forever (opened for
/// writing too, so it never sees end-of-file).
fn read_fifo(agent: &Agent) {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(NOTIFY_PATH)
    {
        Ok(f) => f,
        Err(e) => return say(format!("cannot open {NOTIFY_PATH}: {e}")),
    };
    for line in BufReader::new(file).lines() {
        let Ok(line) = line else { return };
        match LocalRequest::parse(line.trim_end()) {
            Some(LocalRequest::Checkpoint { .. }) | None => say(format!(
                "{NOTIFY_PATH}: ignored {line:?} (register PID [BEFORE AFTER] | ready PID)"
            )),
            Some(req) => {
                if let LocalReply::Error { message, .. } = handle(agent, req) {
                    say(format!("{NOTIFY_PATH}: {message}"));
                }
            }
        }
    }
}
