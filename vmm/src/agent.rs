//! The VMM's end of the guest agent's control channel (protocol:
//! [`guest_abi::agent`]).
//!
//! The vsock device hands every guest connection to host port
//! [`AGENT_PORT`] to this module's acceptor thread, which checks the
//! agent's `Hello` and makes the connection current (a newer one replaces
//! it: after a restore the agent reconnects). Each connection has a reader
//! thread that routes responses and exec output to the callers waiting for
//! them, and turns the agent's own requests (a checkpoint asked for inside
//! the guest) into [`VmEvent`]s for the main thread.
//!
//! Every call has a deadline: a guest without an agent, or with a stuck
//! one, costs the caller that long and no more.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use guest_abi::agent::AGENT_PORT;
use guest_abi::agent::{
    read_frame, write_frame, AfterRestore, ExecRequest, Failure, Frame, FrameError, Reply, Request,
    PROTOCOL_VERSION,
};

use crate::events::{ApiFailure, ApiRequest, VmEvent};

/// How long a new connection may take to say `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the after-restore work may take in the guest.
const AFTER_RESTORE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the guest agent is not connected (waited {0:?}; does the guest run vmm-agent?)")]
    NotConnected(Duration),
    #[error("the guest agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the guest agent's connection closed before it answered")]
    Reset,
    #[error("cannot send to the guest agent")]
    Send(#[source] FrameError),
    #[error("the guest agent refused: {0}")]
    Refused(Failure),
    #[error("the guest agent answered {0:?}, not what was asked")]
    Unexpected(Box<Reply>),
}

/// What a caller waiting on a request receives.
#[derive(Debug)]
pub enum Incoming {
    /// Output of an exec: fd 1 or 2.
    Output { fd: u8, data: Vec<u8> },
    /// The answer; nothing follows it.
    Done(Result<Reply, Failure>),
    /// The connection ended first.
    Reset,
}

/// The channel, shared by the API thread, the main thread and its own
/// threads.
#[derive(Clone)]
pub struct AgentChannel {
    shared: Arc<Shared>,
}

struct Shared {
    conn: Mutex<Option<Conn>>,
    connected: Condvar,
    next_id: AtomicU64,
    next_serial: AtomicU64,
    /// Callers waiting for an answer, by request id.
    calls: Mutex<HashMap<u64, Sender<Incoming>>>,
    events: Sender<VmEvent>,
    /// Sent once to the first agent that connects after a restore: the
    /// image the VM came from.
    after_restore: Mutex<Option<String>>,
    /// The agent's restore generation, as it last said.
    generation: AtomicU64,
    /// [`VmEvent::AgentReady`] went out.
    ready: std::sync::atomic::AtomicBool,
}

struct Conn {
    writer: UnixStream,
    serial: u64,
}

impl AgentChannel {
    /// Serves the agent connections arriving on `connections`. `restored_from`
    /// names the image of a restored VM: its agent gets the after-restore
    /// work as soon as it reconnects.
    pub fn start(
        connections: Receiver<UnixStream>,
        events: Sender<VmEvent>,
        restored_from: Option<String>,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            conn: Mutex::new(None),
            connected: Condvar::new(),
            next_id: AtomicU64::new(1),
            next_serial: AtomicU64::new(1),
            calls: Mutex::new(HashMap::new()),
            events,
            after_restore: Mutex::new(restored_from),
            generation: AtomicU64::new(0),
            ready: std::sync::atomic::AtomicBool::new(false),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("agent".into())
            .spawn(move || {
                // Fail closed: unconfined, no agent is served.
                if !crate::seccomp::confine_or_log(crate::seccomp::ThreadKind::Agent) {
                    return;
                }
                for stream in connections {
                    s.clone().accept(stream);
                }
            })?;
        Ok(AgentChannel { shared })
    }

    /// Whether an agent is connected now.
    pub fn is_connected(&self) -> bool {
        lock(&self.shared.conn).is_some()
    }

    /// The restore generation the agent last reported.
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    /// Sends `request` and waits for its answer, `timeout` in all (the
    /// wait for a connection included).
    pub fn call(&self, request: Request, timeout: Duration) -> Result<Reply, AgentError> {
        let deadline = Instant::now() + timeout;
        let (id, rx) = self.shared.send_request(request, deadline, timeout)?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Incoming::Done(Ok(reply))) => return Ok(reply),
                Ok(Incoming::Done(Err(f))) => return Err(AgentError::Refused(f)),
                Ok(Incoming::Output { .. }) => {}
                Ok(Incoming::Reset) | Err(RecvTimeoutError::Disconnected) => {
                    return Err(AgentError::Reset)
                }
                Err(RecvTimeoutError::Timeout) => {
                    lock(&self.shared.calls).remove(&id);
                    return Err(AgentError::Timeout(timeout));
                }
            }
        }
    }

    /// Starts a command in the guest; its output and end arrive on the
    /// receiver. `connect_timeout` bounds the wait for the agent.
    pub fn exec(
        &self,
        request: ExecRequest,
        connect_timeout: Duration,
    ) -> Result<(ExecHandle, Receiver<Incoming>), AgentError> {
        let deadline = Instant::now() + connect_timeout;
        let (id, rx) =
            self.shared
                .send_request(Request::Exec(request), deadline, connect_timeout)?;
        let handle = ExecHandle {
            id,
            shared: self.shared.clone(),
        };
        Ok((handle, rx))
    }
}

/// A command running in the guest: its input, terminal size and signals.
#[derive(Clone)]
pub struct ExecHandle {
    id: u64,
    shared: Arc<Shared>,
}

impl ExecHandle {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Passes input to the command; empty `data` closes its stdin.
    pub fn input(&self, data: Vec<u8>) -> Result<(), AgentError> {
        self.shared.send(&Frame::Input { id: self.id, data })
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), AgentError> {
        self.shared.send(&Frame::Resize {
            id: self.id,
            rows,
            cols,
        })
    }

    pub fn signal(&self, signal: i32) -> Result<(), AgentError> {
        self.shared.send(&Frame::Signal {
            id: self.id,
            signal,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    /// Waits (until `deadline`) for a connection and sends `request` on it.
    fn send_request(
        &self,
        request: Request,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(u64, Receiver<Incoming>), AgentError> {
        let id = self.next_id.fetch_add(1, Ordering::AcqRel);
        let (tx, rx) = mpsc::channel();
        let mut conn = lock(&self.conn);
        while conn.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(AgentError::NotConnected(timeout));
            }
            conn = self
                .connected
                .wait_timeout(conn, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        lock(&self.calls).insert(id, tx);
        let c = conn.as_mut().expect("checked above");
        if let Err(e) = write_frame(&mut c.writer, &Frame::Request { id, body: request }) {
            lock(&self.calls).remove(&id);
            return Err(AgentError::Send(e));
        }
        Ok((id, rx))
    }

    fn send(&self, frame: &Frame) -> Result<(), AgentError> {
        let mut conn = lock(&self.conn);
        let c = conn.as_mut().ok_or(AgentError::Reset)?;
        write_frame(&mut c.writer, frame).map_err(AgentError::Send)
    }

    /// Greets a new connection and makes it the current one.
    fn accept(self: Arc<Self>, mut stream: UnixStream) {
        if stream.set_nonblocking(false).is_err()
            || stream.set_read_timeout(Some(HELLO_TIMEOUT)).is_err()
        {
            return;
        }
        let generation = match read_frame(&mut stream) {
            Ok(Frame::Hello {
                version: PROTOCOL_VERSION,
                generation,
            }) => generation,
            Ok(Frame::Hello { version, .. }) => {
                log::warn!(
                    "guest agent speaks protocol {version}, this VMM {PROTOCOL_VERSION}: not using it"
                );
                return;
            }
            Ok(other) => {
                log::warn!("guest agent: expected Hello, got {other:?}");
                return;
            }
            Err(e) => {
                log::warn!("guest agent: no Hello: {e}");
                return;
            }
        };
        self.generation.store(generation, Ordering::Release);
        let (Ok(writer), Ok(())) = (stream.try_clone(), stream.set_read_timeout(None)) else {
            return;
        };
        let serial = self.next_serial.fetch_add(1, Ordering::AcqRel);
        {
            let mut conn = lock(&self.conn);
            let mut w = &writer;
            if let Err(e) = write_frame(
                &mut w,
                &Frame::Welcome {
                    version: PROTOCOL_VERSION,
                },
            ) {
                log::warn!("guest agent: cannot answer its Hello: {e}");
                return;
            }
            if let Some(old) = conn.replace(Conn { writer, serial }) {
                let _ = old.writer.shutdown(std::net::Shutdown::Both);
            }
            self.connected.notify_all();
        }
        log::info!("guest agent connected (generation {generation})");
        if let Some(image) = lock(&self.after_restore).take() {
            let s = self.clone();
            let spawned = std::thread::Builder::new()
                .name("after-restore".into())
                .spawn(move || {
                    s.clone().after_restore(image);
                    s.announce_ready();
                });
            if let Err(e) = spawned {
                log::error!("cannot start the after-restore thread: {e}");
                self.announce_ready();
            }
        } else {
            self.announce_ready();
        }
        let s = self.clone();
        let spawned = std::thread::Builder::new()
            .name("agent-reader".into())
            .spawn(move || s.read(stream, serial));
        if let Err(e) = spawned {
            log::error!("cannot start the agent reader thread: {e}");
        }
    }

    /// Tells the main thread, once, that the agent can take requests (a
    /// restored guest's only after its clock and entropy are new).
    fn announce_ready(&self) {
        if !self.ready.swap(true, Ordering::AcqRel) {
            let _ = self.events.send(VmEvent::AgentReady);
        }
    }

    /// Hands the restored guest the host's time and fresh entropy.
    fn after_restore(self: Arc<Self>, image: String) {
        let t0 = Instant::now();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut entropy = vec![0u8; 64];
        if let Err(e) = getrandom::fill(&mut entropy) {
            log::error!("no host entropy for the restored guest: {e}");
            entropy.clear();
        }
        let request = Request::AfterRestore(AfterRestore {
            unix_secs: now.as_secs() as i64,
            unix_nanos: now.subsec_nanos(),
            entropy,
            image,
        });
        let channel = AgentChannel { shared: self };
        match channel.call(request, AFTER_RESTORE_TIMEOUT) {
            Ok(Reply::Restored {
                generation,
                hooks,
                micros,
                steps,
            }) => {
                channel
                    .shared
                    .generation
                    .store(generation, Ordering::Release);
                let steps: Vec<String> = steps
                    .iter()
                    .map(|(name, us)| format!("{name} {us} µs"))
                    .collect();
                log::info!(
                    "after-restore work done in {:?} (guest: {micros} µs: {}; {hooks} hooks; generation {generation})",
                    t0.elapsed(),
                    steps.join(", ")
                );
            }
            Ok(other) => log::warn!("after-restore: unexpected answer {other:?}"),
            Err(e) => log::warn!("after-restore: {e}"),
        }
    }

    /// Routes what the agent sends until the connection ends.
    fn read(self: Arc<Self>, mut stream: UnixStream, serial: u64) {
        loop {
            match read_frame(&mut stream) {
                Ok(Frame::Response { id, body }) => {
                    if let Some(tx) = lock(&self.calls).remove(&id) {
                        let _ = tx.send(Incoming::Done(body));
                    }
                }
                Ok(Frame::Output { id, fd, data }) => {
                    if let Some(tx) = lock(&self.calls).get(&id) {
                        let _ = tx.send(Incoming::Output { fd, data });
                    }
                }
                Ok(Frame::Request { id, body }) => self.clone().serve(id, body),
                Ok(other) => log::debug!("guest agent: unexpected frame {other:?}"),
                Err(FrameError::Closed) => break,
                Err(e) => {
                    log::warn!("guest agent channel: {e}");
                    break;
                }
            }
        }
        let mut conn = lock(&self.conn);
        if conn.as_ref().is_some_and(|c| c.serial == serial) {
            *conn = None;
            // Nobody will answer the calls made on this connection.
            for (_, tx) in lock(&self.calls).drain() {
                let _ = tx.send(Incoming::Reset);
            }
        }
        log::info!("guest agent disconnected");
    }

    /// Serves a request from the agent on a thread of its own: a
    /// checkpoint takes as long as writing the image.
    fn serve(self: Arc<Self>, id: u64, request: Request) {
        let Request::Checkpoint { name } = request else {
            let failure = Failure {
                errno: libc::EOPNOTSUPP,
                message: format!("the VMM does not serve {request:?}"),
            };
            let _ = self.send(&Frame::Response {
                id,
                body: Err(failure),
            });
            return;
        };
        let s = self.clone();
        let spawned = std::thread::Builder::new()
            .name("guest-checkpoint".into())
            .spawn(move || {
                let body = s.checkpoint(name);
                if let Err(e) = s.send(&Frame::Response { id, body }) {
                    log::warn!("cannot answer the guest's checkpoint request: {e}");
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start a thread for the guest's checkpoint: {e}");
        }
    }

    fn checkpoint(&self, name: Option<String>) -> Result<Reply, Failure> {
        let (tx, rx) = mpsc::channel();
        let request = ApiRequest::Checkpoint { name };
        let gone = || Failure {
            errno: libc::ECANCELED,
            message: "the VM is shutting down".into(),
        };
        self.events
            .send(VmEvent::Request { request, reply: tx })
            .map_err(|_| gone())?;
        match rx.recv().map_err(|_| gone())? {
            Ok(v) => Ok(Reply::Checkpointed {
                path: v
                    .get("destination")
                    .and_then(|d| d.as_str())
                    .unwrap_or_default()
                    .to_string(),
            }),
            Err(f) => Err(failure_for_guest(f)),
        }
    }
}

/// An API failure as the guest's caller sees it: an errno and the text.
fn failure_for_guest(f: ApiFailure) -> Failure {
    let (errno, message) = match f {
        ApiFailure::BadRequest(m) => (libc::EINVAL, m),
        ApiFailure::Conflict(m) => (libc::EPERM, m),
        ApiFailure::Failed(m) => (libc::EIO, m),
        ApiFailure::Forbidden(m) => (libc::EACCES, m),
    };
    Failure { errno, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake agent on the far end of a socket pair, as the vsock device
    /// would hand it over.
    fn connect(tx: &Sender<UnixStream>, generation: u64) -> (UnixStream, Frame) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        tx.send(theirs).unwrap();
        let mut agent = ours;
        write_frame(
            &mut agent,
            &Frame::Hello {
                version: PROTOCOL_VERSION,
                generation,
            },
        )
        .unwrap();
        let welcome = read_frame(&mut agent).unwrap();
        (agent, welcome)
    }

    #[test]
    fn calls_are_answered_and_bounded() {
        let (tx, rx) = mpsc::channel();
        let (events, _events_rx) = mpsc::channel();
        let ch = AgentChannel::start(rx, events, None).unwrap();
        let t0 = Instant::now();
        assert!(matches!(
            ch.call(Request::Ping, Duration::from_millis(50)),
            Err(AgentError::NotConnected(_))
        ));
        assert!(t0.elapsed() < Duration::from_secs(2));

        let (mut agent, welcome) = connect(&tx, 4);
        assert_eq!(
            welcome,
            Frame::Welcome {
                version: PROTOCOL_VERSION
            }
        );
        let server = std::thread::spawn(move || {
            let Frame::Request { id, body } = read_frame(&mut agent).unwrap() else {
                panic!("not a request")
            };
            assert_eq!(body, Request::Ping);
            write_frame(
                &mut agent,
                &Frame::Response {
                    id,
                    body: Ok(Reply::Pong { generation: 4 }),
                },
            )
            .unwrap();
            // The next request is never answered; then the agent goes.
            let _ = read_frame(&mut agent).unwrap();
            agent
        });
        assert_eq!(
            ch.call(Request::Ping, Duration::from_secs(5)).unwrap(),
            Reply::Pong { generation: 4 }
        );
        assert_eq!(ch.generation(), 4);
        assert!(matches!(
            ch.call(Request::Freeze, Duration::from_millis(100)),
            Err(AgentError::Timeout(_))
        ));
        drop(server.join().unwrap());
        let deadline = Instant::now() + Duration::from_secs(5);
        while ch.is_connected() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!ch.is_connected(), "a closed connection is forgotten");
    }

    #[test]
    fn a_wrong_version_is_not_used() {
        let (tx, rx) = mpsc::channel();
        let (events, _events_rx) = mpsc::channel();
        let ch = AgentChannel::start(rx, events, None).unwrap();
        let (mut agent, theirs) = UnixStream::pair().unwrap();
        tx.send(theirs).unwrap();
        write_frame(
            &mut agent,
            &Frame::Hello {
                version: PROTOCOL_VERSION + 1,
                generation: 0,
            },
        )
        .unwrap();
        assert!(matches!(read_frame(&mut agent), Err(FrameError::Closed)));
        assert!(!ch.is_connected());
    }

    #[test]
    fn the_agents_checkpoint_request_reaches_the_main_thread() {
        let (tx, rx) = mpsc::channel();
        let (events, events_rx) = mpsc::channel();
        let _ch = AgentChannel::start(rx, events, None).unwrap();
        let (mut agent, _) = connect(&tx, 0);
        // A fresh VM's agent is ready as soon as it is connected, once.
        assert!(matches!(
            events_rx.recv_timeout(Duration::from_secs(5)),
            Ok(VmEvent::AgentReady)
        ));
        write_frame(
            &mut agent,
            &Frame::Request {
                id: 9,
                body: Request::Checkpoint {
                    name: Some("t1".into()),
                },
            },
        )
        .unwrap();
        let Ok(VmEvent::Request {
            request: ApiRequest::Checkpoint { name },
            reply,
        }) = events_rx.recv_timeout(Duration::from_secs(5))
        else {
            panic!("no checkpoint request")
        };
        assert_eq!(name.as_deref(), Some("t1"));
        reply
            .send(Err(ApiFailure::Conflict("no --snapshot-dir".into())))
            .unwrap();
        assert_eq!(
            read_frame(&mut agent).unwrap(),
            Frame::Response {
                id: 9,
                body: Err(Failure {
                    errno: libc::EPERM,
                    message: "no --snapshot-dir".into()
                })
            }
        );
    }
}
