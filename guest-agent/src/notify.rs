//! Programs that asked to hear about checkpoints: signalled before one
//! (default SIGUSR1; the agent then waits, boundedly, for each to say it
//! is ready) and after a restore (default SIGUSR2). This is CRaC's
//! beforeCheckpoint/afterRestore and DragonFly's SIGCKPT, for any program.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::control::lock;
use crate::sys;

pub const DEFAULT_BEFORE: i32 = libc::SIGUSR1;
pub const DEFAULT_AFTER: i32 = libc::SIGUSR2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Registration {
    pid: libc::pid_t,
    before: i32,
    after: i32,
}

#[derive(Default)]
struct State {
    registered: Vec<Registration>,
    /// Of the processes told of the coming checkpoint, those ready.
    waiting_for: Vec<libc::pid_t>,
}

#[derive(Default)]
pub struct Registry {
    state: Mutex<State>,
    ready: Condvar,
}

/// A signal a process may ask for: 1 to 64, not one that cannot be caught.
fn check_signal(s: i32) -> Option<i32> {
    ((1..=64).contains(&s) && s != libc::SIGKILL && s != libc::SIGSTOP).then_some(s)
}

impl Registry {
    /// Registers `pid` (again: the signals are replaced).
    pub fn register(
        &self,
        pid: i32,
        before: Option<i32>,
        after: Option<i32>,
    ) -> Result<(), String> {
        let before = match before {
            None => DEFAULT_BEFORE,
            Some(s) => check_signal(s).ok_or(format!("bad signal {s}"))?,
        };
        let after = match after {
            None => DEFAULT_AFTER,
            Some(s) => check_signal(s).ok_or(format!("bad signal {s}"))?,
        };
        if !sys::alive(pid) {
            return Err(format!("no process {pid}"));
        }
        let mut st = lock(&self.state);
        st.registered.retain(|r| r.pid != pid);
        st.registered.push(Registration { pid, before, after });
        Ok(())
    }

    /// `pid` has done its before-checkpoint work.
    pub fn ready(&self, pid: i32) {
        let mut st = lock(&self.state);
        st.waiting_for.retain(|&p| p != pid);
        self.ready.notify_all();
    }

    /// Signals every registered process and waits up to `timeout` for all
    /// to be ready; returns (signalled, ready).
    pub fn before_checkpoint(&self, timeout: Duration) -> (u32, u32) {
        let mut st = lock(&self.state);
        st.registered.retain(|r| sys::alive(r.pid));
        let mut told = Vec::new();
        for r in &st.registered {
            if sys::kill(r.pid, r.before).is_ok() {
                told.push(r.pid);
            }
        }
        st.waiting_for = told.clone();
        let deadline = Instant::now() + timeout;
        while !st.waiting_for.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .ready
                .wait_timeout(st, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
            // A process that died is as ready as it will be.
            st.waiting_for.retain(|&p| sys::alive(p));
        }
        let late = st.waiting_for.len();
        st.waiting_for.clear();
        (told.len() as u32, (told.len() - late) as u32)
    }

    /// Signals every registered process that the VM was restored.
    pub fn after_restore(&self) -> u32 {
        let mut st = lock(&self.state);
        st.registered.retain(|r| sys::alive(r.pid));
        st.registered
            .iter()
            .filter(|r| sys::kill(r.pid, r.after).is_ok())
            .count() as u32
    }
}
