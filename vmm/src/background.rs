//! An image written by a child process while the VM runs on: the VMM
//! forks while the VM is paused, so the child holds the guest's memory as
//! it was at that instant (the kernel copies a page only when the running
//! VM first writes it afterwards), and the VM resumes at once. The pause
//! is the state capture and the fork, not the write.
//!
//! Why a fork and not userfaultfd write-protection or pre-copy: protecting
//! memory costs the same as forking (both walk the page tables: 0.1 ms
//! for 4 GiB of huge pages, 45–100 ms for 4 GiB of 4 KiB pages, measured
//! here), but each first write after a fork is a copy the kernel makes in
//! its fault path (a few µs), where a write-protect fault goes out to a
//! handler thread and back (25–70 µs); pre-copy's last pause grows with
//! the guest's write rate. `PLATFORM.md` and issue 15 hold the figures.
//!
//! The child is a copy of a multi-threaded process in which only the
//! forking thread goes on: it must not take a lock another thread may
//! have held at the fork. It writes no log (the logger's lock), touches
//! nothing of the VM but memory and the disks, lets nothing unwind past
//! [`Child::finish`] and ends with `_exit`, so no destructor or exit
//! handler of the parent's runs twice. glibc's malloc is safe to
//! use after a fork. What the child reports comes back over a pipe: its
//! progress, then its result.

use std::io::{BufRead, BufReader, Write};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::image::{Progress, Written};

#[derive(Debug, thiserror::Error)]
pub enum BackgroundError {
    #[error("cannot create the pipe to the image's writer")]
    Pipe(#[source] std::io::Error),
    #[error("cannot fork the image's writer")]
    Fork(#[source] std::io::Error),
    #[error("{0}")]
    Failed(String),
    #[error("the image's writer (pid {pid}) {how} before it said how the write went")]
    Vanished { pid: i32, how: String },
}

/// How often the child reports its progress.
const REPORT_EVERY: Duration = Duration::from_millis(100);

/// The writer's niceness: below the VM's threads.
const WRITER_NICE: libc::c_int = 10;

/// What the child sends, one JSON line each.
#[derive(Serialize, Deserialize)]
enum Report {
    Progress { done: u64, total: u64 },
    Written(Written),
    Failed(String),
}

/// What [`fork`] returns in each process.
pub enum Forked {
    /// In the VMM: the write in progress.
    Parent(BackgroundWrite),
    /// In the child: write the image, then [`Child::finish`].
    Child(Child),
}

/// Forks the VMM. Call it with the VM paused and nothing of its state in
/// the middle of a change: the child sees memory as it is now.
pub fn fork() -> Result<Forked, BackgroundError> {
    let (reader, writer) = std::io::pipe().map_err(BackgroundError::Pipe)?;
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: fork has no memory-safety preconditions; the child below
    // keeps to what is safe in a forked copy of a multi-threaded process
    // (see the module's doc) and leaves through `_exit`.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(BackgroundError::Fork(std::io::Error::last_os_error())),
        0 => {
            // Another thread may have held the logger's lock, or stderr's,
            // at the fork: the child logs nothing, and a panic is reported
            // over the pipe, not printed.
            log::set_max_level(log::LevelFilter::Off);
            std::panic::set_hook(Box::new(|_| {}));
            drop(reader);
            // SAFETY: prctl(PR_SET_PDEATHSIG), getppid and setpriority take
            // no pointers. A child whose VMM is gone stops: no one waits
            // for its image. It yields the CPUs to the VM it copies (nice
            // 10, as the lazy restore's filler): the vCPUs it competes
            // with are what the short pause is for, and their resume
            // waits for them to be scheduled.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                libc::setpriority(libc::PRIO_PROCESS, 0, WRITER_NICE);
            }
            close_pipe_readers();
            Ok(Forked::Child(Child {
                out: Arc::new(std::sync::Mutex::new(writer)),
            }))
        }
        pid => {
            drop(writer);
            Ok(Forked::Parent(BackgroundWrite {
                pid,
                reports: BufReader::new(reader),
            }))
        }
    }
}

/// Closes, in the child, every pipe end it could read from. It reads no
/// pipe; but a read end it kept would keep a write end blocked for good:
/// an image streamed through the API (a pipe the API thread relays) whose
/// client went away would fill the pipe and never get EPIPE, the child
/// holding the only reader left, and the VMM waiting for the child.
fn close_pipe_readers() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<libc::c_int> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        // SAFETY: a zeroed `stat` is a valid buffer for fstat to fill.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat and fcntl(F_GETFL) on a descriptor number only
        // read its state; the pointer is to `st` above.
        let is_reader = unsafe {
            libc::fstat(fd, &mut st) == 0
                && st.st_mode & libc::S_IFMT == libc::S_IFIFO
                && libc::fcntl(fd, libc::F_GETFL) & libc::O_ACCMODE == libc::O_RDONLY
        };
        if is_reader {
            // SAFETY: closes the child's copy of a pipe's read end; no
            // object the child goes on using owns it (it reads no pipe,
            // and the objects that do own one are never dropped: the
            // child leaves through `_exit`).
            unsafe { libc::close(fd) };
        }
    }
}

/// A file in memory that a forked child shares (`memfd_create`): the
/// disks' copy-before-write logs. `name` shows in /proc.
pub fn memfd(name: &str) -> std::io::Result<std::fs::File> {
    let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: `name` is a valid C string for the call's duration.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    Ok(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// The child's side: its pipe to the VMM.
pub struct Child {
    out: Arc<std::sync::Mutex<std::io::PipeWriter>>,
}

impl Child {
    /// Runs `write` with a [`Progress`] the VMM sees, sends its result
    /// and ends the child. A panic is reported as a failure.
    /// Nothing unwinds out of it: the child's stack holds the VMM's own
    /// objects (the API server, the machine), whose destructors would act
    /// on what the child shares with the VMM.
    pub fn finish(self, write: impl FnOnce(&Progress) -> Result<Written, String>) -> ! {
        let out = self.out;
        let run = || {
            let progress = Arc::new(Progress::default());
            // Dropping `done` ends the reporter at once.
            let (done, finished) = std::sync::mpsc::channel::<()>();
            let (shared, to) = (progress.clone(), out.clone());
            // Without a reporter the write goes on, unreported.
            let reporter = std::thread::Builder::new().spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = finished.recv_timeout(REPORT_EVERY) {
                    if let Some((done, total)) = shared.now() {
                        send(&to, &Report::Progress { done, total });
                    }
                }
            });
            let result = write(&progress);
            drop(done);
            if let Ok(r) = reporter {
                let _ = r.join();
            }
            match result {
                Ok(w) => Report::Written(w),
                Err(e) => Report::Failed(e),
            }
        };
        let report = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
            .unwrap_or_else(|_| Report::Failed("the image's writer panicked".into()));
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| send(&out, &report)));
        // SAFETY: ends this process without running the parent's exit
        // handlers or destructors a second time.
        unsafe { libc::_exit(0) }
    }
}

fn send(out: &std::sync::Mutex<std::io::PipeWriter>, report: &Report) {
    let Ok(mut line) = serde_json::to_vec(report) else {
        return;
    };
    line.push(b'\n');
    if let Ok(mut out) = out.lock() {
        let _ = out.write_all(&line);
    }
}

/// A write going on in a child process.
pub struct BackgroundWrite {
    pid: libc::pid_t,
    reports: BufReader<std::io::PipeReader>,
}

impl BackgroundWrite {
    /// Waits for the child, passing its progress on to `progress`; what
    /// it wrote, or why it did not.
    pub fn wait(mut self, progress: &Progress) -> Result<Written, BackgroundError> {
        let mut outcome = None;
        let mut line = String::new();
        loop {
            line.clear();
            match self.reports.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            match serde_json::from_str(&line) {
                Ok(Report::Progress { done, total }) => progress.set(done, total),
                Ok(Report::Written(w)) => outcome = Some(Ok(w)),
                Ok(Report::Failed(e)) => outcome = Some(Err(BackgroundError::Failed(e))),
                Err(_) => {}
            }
        }
        progress.end();
        let status = self.reap();
        outcome.unwrap_or(Err(BackgroundError::Vanished {
            pid: self.pid,
            how: status,
        }))
    }

    /// Waits for the child to end; how it ended.
    fn reap(&self) -> String {
        let mut status = 0;
        loop {
            // SAFETY: `status` is a valid place for waitpid to write.
            let r = unsafe { libc::waitpid(self.pid, &mut status, 0) };
            if r == self.pid {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return format!("could not be waited for ({e})");
            }
        }
        if libc::WIFSIGNALED(status) {
            format!("was killed by signal {}", libc::WTERMSIG(status))
        } else {
            format!("exited with status {}", libc::WEXITSTATUS(status))
        }
    }
}
