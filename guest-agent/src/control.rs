//! The agent's end of the control channel (protocol: `guest_abi::agent`).
//!
//! A thread keeps one vsock connection to the VMM: it connects, says
//! `Hello`, and serves what arrives; when the connection breaks (a restore
//! resets vsock) it connects again. Requests that take time (a command, a
//! freeze, the after-restore work) run on threads of their own, so the
//! channel keeps serving meanwhile; freeze and thaw take turns.
//!
//! The agent also asks the VMM for checkpoints on behalf of programs in
//! the guest ([`Agent::request_checkpoint`]). Such a request outlives its
//! connection when the VM is checkpointed with it in flight: in a VM
//! restored from that image the connection is gone, the request is
//! *orphaned*, and the after-restore work answers it `restored`.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use guest_abi::agent::local::LocalReply;
use guest_abi::agent::{
    read_frame, write_frame, Failure, Frame, FrameError, Reply, Request, StartRequest, AGENT_PORT,
    PROTOCOL_VERSION,
};

use crate::init::say;
use crate::sys::vsock;
use crate::{exec, freeze, notify, restore};

/// How long the VMM may take to answer `Hello`.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(5);
/// Retry delays while the VMM does not take the connection.
const FIRST_RETRY: Duration = Duration::from_millis(20);
const MAX_RETRY: Duration = Duration::from_secs(2);
/// How long a checkpoint request waits for a connection to the VMM.
const CONNECT_WAIT: Duration = Duration::from_secs(10);
/// How long an orphaned checkpoint request waits for the after-restore
/// work once the agent is connected again.
const ORPHAN_WAIT: Duration = Duration::from_secs(30);

/// What the agent's threads share.
pub struct Agent {
    writer: Mutex<Option<UnixStream>>,
    connected: Condvar,
    next_id: AtomicU64,
    /// Restores this guest has been through.
    pub generation: AtomicU64,
    /// Checkpoint requests sent to the VMM, by id: where the answer goes.
    pending: Mutex<HashMap<u64, Sender<LocalReply>>>,
    /// Checkpoint requests whose connection broke before the answer.
    orphaned: Mutex<Vec<(Instant, Sender<LocalReply>)>>,
    /// Running commands, by request id.
    pub execs: Mutex<HashMap<u64, exec::Running>>,
    /// Processes to signal around checkpoints.
    pub notify: notify::Registry,
    /// Freeze and thaw take turns; the mount points frozen now.
    pub frozen: Mutex<Vec<String>>,
    /// The main command, when it comes over the channel.
    start: Mutex<StartSlot>,
    started: Condvar,
}

/// Where the main command stands when it comes over the channel
/// (`vmm.start=agent`).
enum StartSlot {
    /// The boot named it (or there is none to wait for): `Start` is refused.
    NotWaiting,
    /// Init is still setting up. The channel holds back its `Hello` until
    /// init waits: the VMM takes a warm image when the agent connects, and
    /// whatever init did after that would be redone by every warm run.
    Booting,
    /// Init waits for it.
    Waiting,
    /// Arrived, not yet taken by init.
    Given(StartRequest),
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Agent {
    /// Starts the channel's thread. `wait_for_start`: the main command
    /// comes over the channel ([`Agent::wait_for_start`]), and the channel
    /// connects only once init waits for it.
    pub fn start(wait_for_start: bool) -> Arc<Agent> {
        let agent = Arc::new(Agent {
            writer: Mutex::new(None),
            connected: Condvar::new(),
            next_id: AtomicU64::new(1),
            generation: AtomicU64::new(0),
            pending: Mutex::new(HashMap::new()),
            orphaned: Mutex::new(Vec::new()),
            execs: Mutex::new(HashMap::new()),
            notify: notify::Registry::default(),
            frozen: Mutex::new(Vec::new()),
            start: Mutex::new(if wait_for_start {
                StartSlot::Booting
            } else {
                StartSlot::NotWaiting
            }),
            started: Condvar::new(),
        });
        let a = agent.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || a.run())
        {
            say(format!("cannot start the control channel: {e}"));
        }
        agent
    }

    /// Blocks until the VMM sends the main command (`Request::Start`).
    pub fn wait_for_start(&self) -> StartRequest {
        let mut slot = lock(&self.start);
        if let StartSlot::Booting = &*slot {
            *slot = StartSlot::Waiting;
            self.started.notify_all();
        }
        loop {
            if let StartSlot::Given(_) = &*slot {
                let StartSlot::Given(start) = std::mem::replace(&mut *slot, StartSlot::NotWaiting)
                else {
                    unreachable!("matched just above")
                };
                return start;
            }
            slot = self
                .started
                .wait(slot)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Hands the main command to init, once.
    fn give_start(&self, start: StartRequest) -> Result<Reply, Failure> {
        let mut slot = lock(&self.start);
        match &*slot {
            StartSlot::Waiting => {
                *slot = StartSlot::Given(start);
                self.started.notify_all();
                Ok(Reply::Started)
            }
            _ => Err(Failure {
                errno: libc::EBUSY,
                message: "the main command is already running (or came with the boot)".into(),
            }),
        }
    }

    /// Sends a frame to the VMM, if connected.
    pub fn send(&self, frame: &Frame) -> io::Result<()> {
        let mut w = lock(&self.writer);
        let s = w
            .as_mut()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOTCONN))?;
        write_frame(s, frame).map_err(|e| match e {
            FrameError::Io(e) => e,
            e => io::Error::other(e),
        })
    }

    /// Answers request `id`.
    pub fn respond(&self, id: u64, body: Result<Reply, Failure>) {
        if let Err(e) = self.send(&Frame::Response { id, body }) {
            say(format!("cannot answer the VMM: {e}"));
        }
    }

    /// Asks the VMM for a checkpoint named `name`; the answer arrives on
    /// the receiver: `Ok(path)` once the image is durable, `Restored(path)`
    /// in a VM restored from it.
    pub fn request_checkpoint(&self, name: Option<String>) -> Receiver<LocalReply> {
        let (tx, rx) = mpsc::channel();
        let deadline = Instant::now() + CONNECT_WAIT;
        let mut w = lock(&self.writer);
        while w.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let _ = tx.send(LocalReply::Error {
                    errno: libc::ENOTCONN,
                    message: "the agent is not connected to the VMM".into(),
                });
                return rx;
            }
            w = self
                .connected
                .wait_timeout(w, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        let id = self.next_id.fetch_add(1, Ordering::AcqRel);
        lock(&self.pending).insert(id, tx.clone());
        let frame = Frame::Request {
            id,
            body: Request::Checkpoint { name },
        };
        if let Some(s) = w.as_mut() {
            if let Err(e) = write_frame(s, &frame) {
                lock(&self.pending).remove(&id);
                let _ = tx.send(LocalReply::Error {
                    errno: libc::EIO,
                    message: format!("cannot reach the VMM: {e}"),
                });
            }
        }
        rx
    }

    /// Answers the checkpoint requests orphaned by a restore: the VM woke
    /// up from the image they asked for.
    pub fn answer_orphans(&self, image: &str) {
        for (_, tx) in lock(&self.orphaned).drain(..) {
            let _ = tx.send(LocalReply::Restored(image.to_string()));
        }
    }

    /// Connects, serves, reconnects; forever.
    fn run(self: Arc<Self>) {
        let mut slot = lock(&self.start);
        while let StartSlot::Booting = &*slot {
            slot = self
                .started
                .wait(slot)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        drop(slot);
        let mut retry = FIRST_RETRY;
        loop {
            match self.connect() {
                Ok(stream) => {
                    retry = FIRST_RETRY;
                    self.serve(stream);
                }
                Err(_) => {
                    std::thread::sleep(retry);
                    retry = (retry * 2).min(MAX_RETRY);
                }
            }
        }
    }

    /// A greeted connection to the VMM.
    fn connect(&self) -> io::Result<UnixStream> {
        let fd: OwnedFd = vsock::connect(vsock::HOST_CID, AGENT_PORT)?;
        let mut stream = UnixStream::from(fd);
        let hello = Frame::Hello {
            version: PROTOCOL_VERSION,
            generation: self.generation.load(Ordering::Acquire),
        };
        write_frame(&mut stream, &hello).map_err(io::Error::other)?;
        stream.set_read_timeout(Some(WELCOME_TIMEOUT))?;
        match read_frame(&mut stream) {
            Ok(Frame::Welcome {
                version: PROTOCOL_VERSION,
            }) => {}
            Ok(other) => {
                say(format!("the VMM answered {other:?} to Hello; not using it"));
                std::thread::sleep(MAX_RETRY);
                return Err(io::Error::from_raw_os_error(libc::EPROTO));
            }
            Err(e) => return Err(io::Error::other(e)),
        }
        stream.set_read_timeout(None)?;
        Ok(stream)
    }

    fn serve(self: &Arc<Self>, mut stream: UnixStream) {
        match stream.try_clone() {
            Ok(w) => *lock(&self.writer) = Some(w),
            Err(_) => return,
        }
        self.connected.notify_all();
        self.watch_orphans();
        loop {
            let frame = match read_frame(&mut stream) {
                Ok(f) => f,
                Err(FrameError::Closed) => break,
                Err(FrameError::Io(_)) => break,
                Err(e) => {
                    say(format!("control channel: {e}"));
                    break;
                }
            };
            self.dispatch(frame);
        }
        *lock(&self.writer) = None;
        // Whatever the VMM owed us it will not send on another connection.
        let now = Instant::now();
        let mut orphaned = lock(&self.orphaned);
        for (_, tx) in lock(&self.pending).drain() {
            orphaned.push((now, tx));
        }
    }

    /// Fails the orphaned requests that no restore claims in time (the
    /// connection broke for another reason).
    fn watch_orphans(self: &Arc<Self>) {
        if lock(&self.orphaned).is_empty() {
            return;
        }
        let a = self.clone();
        let _ = std::thread::Builder::new()
            .name("orphans".into())
            .spawn(move || {
                std::thread::sleep(ORPHAN_WAIT);
                for (_, tx) in lock(&a.orphaned).drain(..) {
                    let _ = tx.send(LocalReply::Error {
                        errno: libc::ECONNRESET,
                        message: "the connection to the VMM broke before it answered".into(),
                    });
                }
            });
    }

    fn dispatch(self: &Arc<Self>, frame: Frame) {
        match frame {
            Frame::Request { id, body } => self.request(id, body),
            Frame::Response { id, body } => {
                if let Some(tx) = lock(&self.pending).remove(&id) {
                    let reply = match body {
                        Ok(Reply::Checkpointed { path }) => LocalReply::Ok(path),
                        Ok(other) => LocalReply::Error {
                            errno: libc::EPROTO,
                            message: format!("the VMM answered {other:?}"),
                        },
                        Err(f) => LocalReply::Error {
                            errno: f.errno,
                            message: f.message,
                        },
                    };
                    let _ = tx.send(reply);
                }
            }
            Frame::Input { id, data } => exec::input(self, id, data),
            Frame::Resize { id, rows, cols } => exec::resize(self, id, rows, cols),
            Frame::Signal { id, signal } => exec::signal(self, id, signal),
            Frame::Hello { .. } | Frame::Welcome { .. } | Frame::Output { .. } => {}
        }
    }

    /// Serves a request from the VMM; what takes time gets a thread.
    fn request(self: &Arc<Self>, id: u64, body: Request) {
        let a = self.clone();
        let work: Box<dyn FnOnce() + Send> = match body {
            Request::Ping => {
                let generation = self.generation.load(Ordering::Acquire);
                return self.respond(id, Ok(Reply::Pong { generation }));
            }
            Request::Exec(req) => {
                let input = exec::register(self, id);
                Box::new(move || exec::run(&a, id, req, input))
            }
            Request::Prepare { timeout_ms } => Box::new(move || {
                let (notified, ready) = a
                    .notify
                    .before_checkpoint(Duration::from_millis(u64::from(timeout_ms)));
                a.respond(id, Ok(Reply::Prepared { notified, ready }));
            }),
            Request::Freeze => Box::new(move || {
                let r = freeze::freeze(&a);
                a.respond(id, r.map(|filesystems| Reply::Frozen { filesystems }));
            }),
            Request::Thaw => Box::new(move || {
                let r = freeze::thaw(&a);
                a.respond(id, r.map(|filesystems| Reply::Thawed { filesystems }));
            }),
            Request::AfterRestore(ar) => {
                let received = Instant::now();
                let hooks = restore::restore_hooks();
                if hooks.is_empty() {
                    // Without hooks the work is a few system calls: done
                    // here, it spares starting and ending a thread, which
                    // an interpreted guest kernel makes cost more than
                    // the work (about a fifth of a warm start's
                    // after-restore round trip, kvm_emulate_insn samples).
                    let reply = restore::after_restore(self, &ar, received, hooks);
                    return self.respond(id, Ok(reply));
                }
                Box::new(move || {
                    let reply = restore::after_restore(&a, &ar, received, hooks);
                    a.respond(id, Ok(reply));
                })
            }
            Request::Start(start) => {
                let reply = self.give_start(start);
                return self.respond(id, reply);
            }
            Request::Checkpoint { .. } => {
                return self.respond(
                    id,
                    Err(Failure {
                        errno: libc::EOPNOTSUPP,
                        message: "the agent does not take checkpoint requests".into(),
                    }),
                );
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("request".into())
            .spawn(work)
        {
            self.respond(
                id,
                Err(Failure {
                    errno: e.raw_os_error().unwrap_or(libc::EAGAIN),
                    message: format!("cannot start a thread: {e}"),
                }),
            );
        }
    }
}
