//! Who waits for which child: PID 1 reaps every child (orphans included)
//! on its main thread, and hands the exit of a child started for someone
//! else (a command the VMM runs, a restore hook) to whoever started it.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Mutex;

use crate::sys::{self, Spawn, SpawnError};

/// Children whose exit someone waits for, and where it goes.
static WAITERS: Mutex<Vec<(libc::pid_t, Sender<libc::c_int>)>> = Mutex::new(Vec::new());

fn waiters() -> std::sync::MutexGuard<'static, Vec<(libc::pid_t, Sender<libc::c_int>)>> {
    WAITERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Starts a child whose wait status arrives on the receiver once the main
/// thread reaps it. The table stays locked from before the child exists
/// until it is listed, so the reaper cannot miss its exit.
pub fn spawn(spec: &Spawn) -> Result<(libc::pid_t, Receiver<libc::c_int>), SpawnError> {
    let (tx, rx) = mpsc::channel();
    let mut w = waiters();
    let pid = sys::spawn(spec)?;
    w.push((pid, tx));
    Ok((pid, rx))
}

/// Called by the reaper for every child that is not the main process.
pub fn exited(pid: libc::pid_t, status: libc::c_int) {
    let mut w = waiters();
    if let Some(i) = w.iter().position(|(p, _)| *p == pid) {
        let (_, tx) = w.swap_remove(i);
        let _ = tx.send(status);
    }
}
