//! Commands the VMM runs in the guest (`vmm agent exec`), as `docker exec`
//! does: in the agent's environment plus what the request adds, on pipes
//! or on a new pseudo-terminal, their output streamed back as it comes and
//! their exit status last.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use guest_abi::agent::{ExecRequest, Failure, Frame, Reply, OUTPUT_CHUNK};

use crate::children;
use crate::command;
use crate::control::{lock, Agent};
use crate::status;
use crate::sys::{self, Spawn, SpawnStep};

/// How long output may keep coming after the command exited (a background
/// child may hold its pipe).
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// A running command, as input and signals reach it.
pub struct Running {
    /// 0 until it is started.
    pid: libc::pid_t,
    /// Its input, written by a thread of its own (a command that does not
    /// read must not block the channel); None once closed or if it takes
    /// none.
    stdin: Option<mpsc::Sender<Vec<u8>>>,
    /// The terminal's master, to resize it.
    tty: Option<OwnedFd>,
}

fn failure(errno: i32, message: String) -> Failure {
    Failure { errno, message }
}

/// Lists command `id` before it starts, so input that arrives while it
/// starts waits for it instead of being lost. Called on the channel's
/// thread, in order with the frames that follow.
pub fn register(agent: &Agent, id: u64) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    let running = Running {
        pid: 0,
        stdin: Some(tx),
        tty: None,
    };
    lock(&agent.execs).insert(id, running);
    rx
}

/// Runs `req` for request `id` (see [`register`]) to its end; answers
/// `Exited` or a failure.
pub fn run(agent: &Arc<Agent>, id: u64, req: ExecRequest, input: mpsc::Receiver<Vec<u8>>) {
    let result = start(agent, id, &req, input);
    if result.is_err() {
        lock(&agent.execs).remove(&id);
    }
    let body = match result {
        Ok((status_rx, readers)) => {
            let status = status_rx.recv().unwrap_or(0);
            // The output first, so the answer is the stream's last frame.
            let deadline = std::time::Instant::now() + OUTPUT_GRACE;
            for done in readers {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                let _ = done.recv_timeout(left);
            }
            lock(&agent.execs).remove(&id);
            Ok(Reply::Exited {
                status: i32::from(status::from_wait_status(status)),
            })
        }
        Err(f) => Err(f),
    };
    agent.respond(id, body);
}

type Started = (mpsc::Receiver<libc::c_int>, Vec<mpsc::Receiver<()>>);

fn start(
    agent: &Arc<Agent>,
    id: u64,
    req: &ExecRequest,
    input: mpsc::Receiver<Vec<u8>>,
) -> Result<Started, Failure> {
    let io_err = |what: &str, e: std::io::Error| {
        failure(
            e.raw_os_error().unwrap_or(libc::EIO),
            format!("cannot run {}: {what}: {e}", req.argv[0]),
        )
    };
    let Some(program) = req.argv.first() else {
        return Err(failure(libc::EINVAL, "empty command".into()));
    };
    let inherited = std::env::vars_os().map(|(k, v)| (k.into_vec(), v.into_vec()));
    let extra = req.env.iter().filter_map(|e| {
        e.split_once('=')
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
    });
    let env = command::environment(inherited.chain(extra));
    let candidates = command::candidates(program.as_bytes(), command::path_of(&env));
    let to_c = |v: Vec<Vec<u8>>| {
        v.into_iter()
            .map(CString::new)
            .collect::<Result<Vec<_>, _>>()
    };
    let bad = |_| failure(libc::EINVAL, "an argument contains a NUL byte".into());
    let argv = to_c(req.argv.iter().map(|a| a.as_bytes().to_vec()).collect()).map_err(bad)?;
    let envp = to_c(env).map_err(bad)?;
    let candidates = to_c(candidates).map_err(bad)?;

    // The child's ends, and ours.
    let mut outputs: Vec<(u8, OwnedFd)> = Vec::new();
    let (child_fds, stdin, tty): ([OwnedFd; 3], Option<OwnedFd>, Option<OwnedFd>) = if req.tty {
        let (master, slave) = sys::open_pty(req.rows, req.cols).map_err(|e| io_err("pty", e))?;
        let dup = |f: &OwnedFd| f.try_clone().map_err(|e| io_err("dup", e));
        outputs.push((1, dup(&master)?));
        let input = dup(&master)?;
        (
            [dup(&slave)?, dup(&slave)?, slave],
            Some(input),
            Some(master),
        )
    } else {
        let (out_r, out_w) = sys::pipe().map_err(|e| io_err("pipe", e))?;
        let (err_r, err_w) = sys::pipe().map_err(|e| io_err("pipe", e))?;
        outputs.push((1, out_r));
        outputs.push((2, err_r));
        let (child_in, ours) = if req.stdin {
            let (r, w) = sys::pipe().map_err(|e| io_err("pipe", e))?;
            (r, Some(w))
        } else {
            let null =
                sys::open(c"/dev/null", libc::O_RDONLY).map_err(|e| io_err("/dev/null", e))?;
            (null, None)
        };
        ([child_in, out_w, err_w], ours, None)
    };
    let spec = Spawn {
        candidates,
        argv,
        envp,
        controlling_tty: req.tty,
        unshare_flags: 0,
        workdir: CString::from(c"/"),
        user: None,
        stdio: Some([
            child_fds[0].as_raw_fd(),
            child_fds[1].as_raw_fd(),
            child_fds[2].as_raw_fd(),
        ]),
    };
    let (pid, status_rx) = children::spawn(&spec).map_err(|e| {
        let errno = e.error.raw_os_error().unwrap_or(libc::EIO);
        let errno = match (e.step, errno) {
            (SpawnStep::Exec, libc::ENOENT | libc::ENOTDIR) => libc::ENOENT,
            _ => errno,
        };
        failure(errno, format!("cannot run {program}: {e}"))
    })?;
    // Only the child keeps its ends: our output reads end when it exits.
    drop(child_fds);
    let is_tty = tty.is_some();
    if let Some(fd) = stdin {
        let mut file = std::fs::File::from(fd);
        let _ = std::thread::Builder::new()
            .name("exec-input".into())
            .spawn(move || {
                for data in input {
                    let data = match (data.is_empty(), is_tty) {
                        // End of input: a terminal reads ^D, a pipe closes.
                        (true, true) => vec![4],
                        (true, false) => return,
                        (false, _) => data,
                    };
                    if file.write_all(&data).is_err() {
                        return;
                    }
                }
            });
    }
    if let Some(r) = lock(&agent.execs).get_mut(&id) {
        r.pid = pid;
        r.tty = tty;
    }
    let mut readers = Vec::new();
    for (fd, end) in outputs {
        let (done_tx, done_rx) = mpsc::channel();
        let a = agent.clone();
        let spawned = std::thread::Builder::new()
            .name("exec-output".into())
            .spawn(move || {
                forward_output(&a, id, fd, std::fs::File::from(end));
                let _ = done_tx.send(());
            });
        if spawned.is_ok() {
            readers.push(done_rx);
        }
    }
    Ok((status_rx, readers))
}

/// Sends what the command writes on `fd` to the VMM until it closes (or,
/// for a terminal, until its last writer is gone: EIO).
fn forward_output(agent: &Agent, id: u64, fd: u8, mut from: std::fs::File) {
    let mut buf = vec![0u8; OUTPUT_CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let frame = Frame::Output {
                    id,
                    fd,
                    data: buf[..n].to_vec(),
                };
                if agent.send(&frame).is_err() {
                    return;
                }
            }
        }
    }
}

/// Input from the VMM for command `id`; empty ends its input.
pub fn input(agent: &Agent, id: u64, data: Vec<u8>) {
    let mut execs = lock(&agent.execs);
    let Some(r) = execs.get_mut(&id) else { return };
    let end = data.is_empty();
    if let Some(tx) = &r.stdin {
        if tx.send(data).is_err() || (end && r.tty.is_none()) {
            r.stdin = None;
        }
    }
}

pub fn resize(agent: &Agent, id: u64, rows: u16, cols: u16) {
    if let Some(Running { tty: Some(t), .. }) = lock(&agent.execs).get(&id) {
        let _ = sys::set_window_size(t, rows, cols);
    }
}

pub fn signal(agent: &Agent, id: u64, signal: i32) {
    // pid 0 would signal the agent's own process group.
    if let Some(r) = lock(&agent.execs).get(&id).filter(|r| r.pid > 0) {
        let _ = sys::kill(r.pid, signal);
    }
}
