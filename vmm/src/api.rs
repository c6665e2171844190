//! The control socket: HTTP/1.1 + JSON over a Unix socket, so
//! `curl --unix-socket PATH http://localhost/vm` works.
//!
//! Endpoints (documented in the README):
//! - `GET /` and `GET /vm`: what this VMM runs (vCPUs, memory, kernel, uptime).
//! - `PUT /vm/pause`, `PUT /vm/resume`: stop and restart the vCPUs.
//! - `PUT /vm/snapshot` with a JSON body `{"path": "/x/img", "stop": false,
//!   "compress": "zstd:1", "no_disk": false}`: checkpoint the VM into a file
//!   (written atomically); answers with what was written. With
//!   `"stream": true` instead of a path, the response body *is* the image
//!   (chunked), so it can go through a pipe: this is how `vmm snapshot
//!   --out -` works (and `--out PATH` where Landlock keeps the VMM from
//!   writing). What was written (the answer to a path) follows the image
//!   as the trailer field `X-Snapshot-Answer`.
//! - `PUT /vm/checkpoint` with `{"name": "t1"}` (optional): checkpoint into
//!   `--snapshot-dir`, as the guest's `vmm-ckpt` does.
//! - `PUT /vm/shutdown`: stop the VM now; `vmm` exits.
//! - The guest agent ([`crate::agent`]): `GET /agent/ping`,
//!   `PUT /agent/freeze`, `PUT /agent/thaw`, and `PUT /agent/exec` with
//!   `{"argv": [...], "env": [...], "tty": false}`: runs a command in the
//!   guest and answers `{"status", "stdout", "stderr"}` once it ends. With
//!   `"stream": true` and the headers `Connection: Upgrade` and
//!   `Upgrade: vmm-exec`, the answer is `101 Switching Protocols` (the exec's
//!   id in `X-Exec-Id`) and the connection then carries the command's
//!   output as the agent's frames (`Output`, then a final `Response`) as it
//!   comes; `PUT /agent/exec/ID/input` (raw bytes, empty for end of input),
//!   `.../resize` (`{"rows", "cols"}`) and `.../signal` (`{"signal": N}`)
//!   reach it meanwhile. This is how `vmm agent exec` works.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use guest_abi::agent::{write_frame, ExecRequest, Failure, Frame, Reply, Request};
use serde::Deserialize;
use vmm_sys_util::eventfd::EventFd;

use crate::agent::{AgentChannel, AgentError, ExecHandle, Incoming};
use crate::events::{
    ApiFailure, ApiRequest, SnapshotBody, SnapshotRequest, SnapshotTarget, StopReason, VmEvent,
};
use crate::http;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("another VMM is already listening on {0}")]
    InUse(String),
    #[error(
        "{0} exists and is not a socket: refusing to replace it (choose another --api-sock path)"
    )]
    NotASocket(String),
    #[error("cannot tell whether {path} is a stale socket")]
    Probe {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove stale socket {path}")]
    Stale {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {path}")]
    Listen {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Makes `path` free for a new socket: nothing there, or a stale socket
/// (one nobody answers on), which is removed. Anything else at `path` is the
/// user's and is left alone: a live socket, a regular file, a directory.
fn claim_socket_path(path: &Path) -> Result<(), ApiError> {
    let name = || path.display().to_string();
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ApiError::Probe {
                path: name(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ApiError::NotASocket(name()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ApiError::InUse(name())),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)
            .map_err(|source| ApiError::Stale {
                path: name(),
                source,
            }),
        Err(source) => Err(ApiError::Probe {
            path: name(),
            source,
        }),
    }
}

/// Binds a listening socket at a free `path`, readable and writable by its
/// owner only whatever the umask: whoever can connect controls the VM.
fn listen(path: &Path) -> Result<(UnixListener, (u64, u64)), ApiError> {
    let err = |source| ApiError::Listen {
        path: path.display().to_string(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    let meta = std::fs::symlink_metadata(path).map_err(err)?;
    Ok((listener, (meta.dev(), meta.ino())))
}

/// Facts about the running VM that the API reports.
#[derive(Clone, Debug)]
pub struct VmInfo {
    pub vcpus: u8,
    pub mem_mib: u64,
    pub kernel: String,
    pub rootfs: Option<String>,
    pub started: Instant,
    /// `vmm run --name`'s, if any.
    pub name: Option<String>,
    /// `vmm run --image`'s, if any.
    pub image: Option<String>,
    /// What the VM is doing, as the main thread last said
    /// ([`VmInfo::set_state`]); read without asking it, so a listing
    /// answers during a long snapshot too.
    pub state: Arc<Mutex<&'static str>>,
    /// How far the image being written has got, if one is.
    pub progress: Arc<crate::image::Progress>,
    /// A lazily restored VM's memory: how much has arrived.
    pub memory_fill: Option<crate::page_server::FillMonitor>,
}

impl VmInfo {
    pub fn set_state(state: &Mutex<&'static str>, now: &'static str) {
        *state.lock().unwrap_or_else(PoisonError::into_inner) = now;
    }
}

fn is_upgrade(request: &http::Request) -> bool {
    request
        .header("Upgrade")
        .is_some_and(|u| u.eq_ignore_ascii_case(EXEC_PROTOCOL))
}

/// Serves one request: refuses it unread if too many are being served or
/// its body is larger than any request needs; otherwise reads its body,
/// routes it and answers it.
fn handle(mut request: http::Request, ctx: &Context) {
    let answer = |request: http::Request, code: u16, why: String| {
        if let Err(e) = request.respond_json(code, &serde_json::json!({ "error": why })) {
            log::warn!("API: cannot send a response: {e}");
        }
    };
    // This request counts too.
    let _serving = Serving::new(&ctx.handlers);
    if ctx.handlers.load(Ordering::Acquire) > MAX_REQUESTS_AT_ONCE {
        let why = format!("{MAX_REQUESTS_AT_ONCE} requests are already being served; try again");
        return answer(request, 503, why);
    }
    let declared = match request.body_length() {
        Ok(n) if n > MAX_BODY => {
            let why = format!("a request body of {n} bytes; the limit is {MAX_BODY}");
            return answer(request, 413, why);
        }
        Ok(n) => n,
        Err(why) => return answer(request, 411, why),
    };
    let body = match request.read_body(declared) {
        Ok(b) => b,
        Err(e) => {
            log::warn!("API: cannot read a request body: {e}");
            return;
        }
    };
    let upgrade = is_upgrade(&request);
    let (method, url) = (request.method.clone(), request.path.clone());
    let sent = match route(&method, &url, &body, upgrade, ctx) {
        Routed::Json(code, body) => request.respond_json(code, &body),
        // A stream lasts as long as its producer.
        Routed::Stream(reader, headers, answer) => {
            let _streaming = Serving::new(&ctx.streams);
            let trailer = answer.map(|rx| -> http::Trailer {
                let value = move || match rx.recv_timeout(STREAMED_ANSWER_TIMEOUT) {
                    Ok(Ok(v)) => v.to_string(),
                    Ok(Err(f)) => serde_json::json!({ "error": f.message() }).to_string(),
                    Err(_) => serde_json::json!({ "error": "no answer came" }).to_string(),
                };
                (ANSWER_TRAILER, Box::new(value))
            });
            request.respond_stream(&headers, reader, trailer)
        }
        Routed::Upgrade(headers, session) => request.upgrade(EXEC_PROTOCOL, &headers).map(session),
    };
    if let Err(e) = sent {
        log::warn!("API: cannot send a response: {e}");
    }
}

/// Counts a request (or a stream) being served for as long as it lives.
struct Serving<'a>(&'a AtomicUsize);

impl<'a> Serving<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Serving(count)
    }
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves the socket on its own thread; removes the socket file when
/// dropped, if it is still the one it bound.
pub struct ApiServer {
    path: PathBuf,
    /// Device and inode of the socket file, so that a file put at `path`
    /// since (by the user, or a VMM that took over a path we left) is not
    /// removed at exit.
    identity: (u64, u64),
    /// Ends the accepting thread.
    stop: Arc<EventFd>,
    ctx: Arc<Context>,
}

/// How long the VMM, ending, waits for streamed answers still on their way
/// (a snapshot's image and its trailer, taken with --stop).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

impl ApiServer {
    pub fn start(
        path: &Path,
        info: VmInfo,
        events: Sender<VmEvent>,
        agent: AgentChannel,
    ) -> Result<Self, ApiError> {
        let listen_err = |source| ApiError::Listen {
            path: path.display().to_string(),
            source,
        };
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(listen_err)?);
        claim_socket_path(path)?;
        let (listener, identity) = listen(path)?;
        let ctx = Arc::new(Context {
            info,
            events,
            agent,
            execs: Arc::new(Mutex::new(HashMap::new())),
            handlers: AtomicUsize::new(0),
            streams: AtomicUsize::new(0),
        });
        // Each connection is served on a thread of its own (`api-request`,
        // started by this one, so under its filter), from its first byte:
        // a client that sends slowly, or never, holds only that thread.
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let (stop2, ctx2) = (stop.clone(), ctx.clone());
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                let confined = crate::seccomp::confine_this_thread(crate::seccomp::ThreadKind::Api)
                    .map_err(|e| std::io::Error::other(crate::error_chain(&e)));
                let failed = confined.is_err();
                let _ = ready_tx.send(confined);
                if failed {
                    return;
                }
                let handler: Arc<dyn Fn(http::Request) + Send + Sync> =
                    Arc::new(move |request| handle(request, &ctx2));
                if let Err(e) = http::serve(listener, &stop2, handler) {
                    log::error!("API: the server stopped: {e}");
                }
            })
            .map_err(listen_err)?;
        let ready = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("the API thread ended")));
        if let Err(e) = ready {
            // The socket is ours, just bound: nobody will serve it.
            let _ = std::fs::remove_file(path);
            return Err(listen_err(e));
        }
        Ok(ApiServer {
            path: path.to_path_buf(),
            identity,
            stop,
            ctx,
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        // Answers on their way (the end of a snapshot's stream, taken with
        // --stop) get there before the process ends.
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while self.ctx.streams.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// How a request is answered.
enum Routed {
    Json(u16, serde_json::Value),
    /// The body streams from this pipe until its writer closes it; then
    /// the answer, if one is awaited, follows as the trailer
    /// [`ANSWER_TRAILER`].
    Stream(std::io::PipeReader, Vec<String>, Option<Receiver<Answer>>),
    /// 101 Switching Protocols with these headers, then the session owns
    /// the connection (written to as things happen).
    Upgrade(Vec<String>, Session),
}

type Session = Box<dyn FnOnce(UnixStream) + Send>;

/// The protocol a streamed exec switches to: the agent's frames.
pub const EXEC_PROTOCOL: &str = "vmm-exec";

/// What the API thread serves with.
struct Context {
    info: VmInfo,
    events: Sender<VmEvent>,
    agent: AgentChannel,
    /// Streamed execs still running, by id, for their input.
    execs: Arc<Mutex<HashMap<u64, ExecHandle>>>,
    /// Requests being served now, each on its thread.
    handlers: AtomicUsize,
    /// Streamed answers being sent now.
    streams: AtomicUsize,
}

/// The largest request body read (exec input comes in pieces far smaller).
const MAX_BODY: u64 = 16 << 20;

/// Requests served at once (streams and exec sessions included); more are
/// answered 503 at once.
const MAX_REQUESTS_AT_ONCE: usize = 64;

/// How long the agent may take to answer a ping, freeze or thaw.
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an exec waits for the agent to connect (it reconnects after a
/// restore).
const EXEC_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The body of `PUT /agent/exec`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    argv: Vec<String>,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    tty: bool,
    /// Take input through `PUT /agent/exec/ID/input` (streamed execs only).
    #[serde(default)]
    stdin: bool,
    #[serde(default)]
    rows: u16,
    #[serde(default)]
    cols: u16,
    #[serde(default)]
    stream: bool,
}

impl ExecBody {
    pub fn argv(&self) -> &[String] {
        &self.argv
    }

    /// Answered as a stream of frames rather than once it ends.
    pub fn streamed(&self) -> bool {
        self.stream
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeBody {
    rows: u16,
    cols: u16,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalBody {
    signal: i32,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CheckpointBody {
    #[serde(default)]
    name: Option<String>,
}

/// A body that may be empty (all defaults) or JSON.
fn parse_json<'a, T: Deserialize<'a> + Default>(body: &'a [u8]) -> Result<T, Refusal> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| (400, format!("bad request body: {e}")))
}

/// A request refused before anything acts on it: status and message.
pub type Refusal = (u16, String);

/// What a request asks for, its body parsed and checked: everything the
/// API takes from a client passes through [`Endpoint::parse`] (fuzzed by
/// `vmm/fuzz`) before any of it reaches the VM.
#[derive(Debug)]
pub enum Endpoint {
    Info,
    Shutdown,
    Pause,
    Resume,
    Snapshot(SnapshotBody),
    Checkpoint(Option<String>),
    AgentPing,
    AgentFreeze,
    AgentThaw,
    Exec(ExecBody),
    ExecInput(u64, Vec<u8>),
    ExecResize(u64, ResizeBody),
    ExecSignal(u64, SignalBody),
}

impl Endpoint {
    /// `upgrade`: the request asked to switch to the exec stream.
    pub fn parse(method: &str, url: &str, body: &[u8], upgrade: bool) -> Result<Self, Refusal> {
        let (get, put) = (method == "GET", method == "PUT");
        if let Some(rest) = url.strip_prefix("/agent/exec/") {
            if !put {
                return Err((405, format!("method {method} not allowed on {url}")));
            }
            return Self::exec_control(rest, body);
        }
        let endpoint = match url {
            "/" | "/vm" if get => Endpoint::Info,
            "/vm/shutdown" if put => Endpoint::Shutdown,
            "/vm/pause" if put => Endpoint::Pause,
            "/vm/resume" if put => Endpoint::Resume,
            "/vm/snapshot" if put => Endpoint::Snapshot(Self::snapshot(body)?),
            "/vm/checkpoint" if put => {
                Endpoint::Checkpoint(parse_json::<CheckpointBody>(body)?.name)
            }
            "/agent/ping" if get || put => Endpoint::AgentPing,
            "/agent/freeze" if put => Endpoint::AgentFreeze,
            "/agent/thaw" if put => Endpoint::AgentThaw,
            "/agent/exec" if put => Endpoint::Exec(Self::exec(body, upgrade)?),
            "/" | "/vm" | "/vm/shutdown" | "/vm/pause" | "/vm/resume" | "/vm/snapshot"
            | "/vm/checkpoint" | "/agent/ping" | "/agent/freeze" | "/agent/thaw"
            | "/agent/exec" => return Err((405, format!("method {method} not allowed on {url}"))),
            _ => return Err((404, format!("no endpoint {url}"))),
        };
        Ok(endpoint)
    }

    fn snapshot(body: &[u8]) -> Result<SnapshotBody, Refusal> {
        let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            body
        };
        let b: SnapshotBody = serde_json::from_slice(body)
            .map_err(|e| (400, format!("bad snapshot request: {e}")))?;
        if b.parent_id.is_some() && b.parent.is_none() {
            return Err((400, "\"parent_id\" goes with \"parent\"".into()));
        }
        match (&b.path, b.stream) {
            (Some(_), false) | (None, true) => Ok(b),
            _ => Err((400, "give either \"path\" or \"stream\": true".into())),
        }
    }

    fn exec(body: &[u8], upgrade: bool) -> Result<ExecBody, Refusal> {
        let b: ExecBody =
            serde_json::from_slice(body).map_err(|e| (400, format!("bad exec request: {e}")))?;
        if b.argv.is_empty() {
            return Err((400, "bad exec request: argv is empty".into()));
        }
        if b.stream && !upgrade {
            return Err((
                400,
                format!("a streamed exec needs the headers Connection: Upgrade and Upgrade: {EXEC_PROTOCOL}"),
            ));
        }
        Ok(b)
    }

    /// `/agent/exec/ID/{input,resize,signal}`.
    fn exec_control(rest: &str, body: &[u8]) -> Result<Self, Refusal> {
        let no_endpoint = || (404, format!("no endpoint /agent/exec/{rest}"));
        let (id, what) = rest.split_once('/').ok_or_else(no_endpoint)?;
        let id = id
            .parse::<u64>()
            .map_err(|_| (404, format!("no running exec {id}")))?;
        Ok(match what {
            "input" => Endpoint::ExecInput(id, body.to_vec()),
            "resize" => Endpoint::ExecResize(
                id,
                serde_json::from_slice(body)
                    .map_err(|e| (400, format!("bad resize request: {e}")))?,
            ),
            "signal" => Endpoint::ExecSignal(
                id,
                serde_json::from_slice(body)
                    .map_err(|e| (400, format!("bad signal request: {e}")))?,
            ),
            _ => return Err(no_endpoint()),
        })
    }
}

fn agent_error(e: AgentError) -> Routed {
    match e {
        AgentError::NotConnected(_) | AgentError::Timeout(_) | AgentError::Reset => error(503, e),
        AgentError::Refused(f) => error(500, f),
        e => error(500, e),
    }
}

/// A call to the agent, answered with its reply as JSON.
fn agent_call(agent: &AgentChannel, request: Request) -> Routed {
    let t0 = Instant::now();
    match agent.call(request, AGENT_TIMEOUT) {
        Ok(Reply::Pong { generation }) => Routed::Json(
            200,
            serde_json::json!({
                "generation": generation,
                "rtt_ms": t0.elapsed().as_secs_f64() * 1000.0,
            }),
        ),
        Ok(Reply::Frozen { filesystems }) => {
            Routed::Json(200, serde_json::json!({ "frozen": filesystems }))
        }
        Ok(Reply::Thawed { filesystems }) => {
            Routed::Json(200, serde_json::json!({ "thawed": filesystems }))
        }
        Ok(other) => error(500, format!("the agent answered {other:?}")),
        Err(e) => agent_error(e),
    }
}

/// `PUT /agent/exec`: runs a command, answering once it ends or streaming.
fn exec(ctx: &Context, b: ExecBody) -> Routed {
    let request = ExecRequest {
        argv: b.argv,
        env: b.env,
        tty: b.tty,
        stdin: b.stdin && b.stream,
        rows: b.rows,
        cols: b.cols,
    };
    let (handle, incoming) = match ctx.agent.exec(request, EXEC_CONNECT_TIMEOUT) {
        Ok(x) => x,
        Err(e) => return agent_error(e),
    };
    if !b.stream {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let status = loop {
            match incoming.recv() {
                Ok(Incoming::Output { fd: 2, data }) => stderr.extend(data),
                Ok(Incoming::Output { data, .. }) => stdout.extend(data),
                Ok(Incoming::Done(Ok(Reply::Exited { status }))) => break status,
                Ok(Incoming::Done(Ok(other))) => {
                    return error(500, format!("the agent answered {other:?}"))
                }
                Ok(Incoming::Done(Err(f))) => {
                    stderr.extend(format!("{f}\n").into_bytes());
                    break f.start_status();
                }
                Ok(Incoming::Reset) | Err(_) => {
                    return agent_error(AgentError::Reset);
                }
            }
        };
        return Routed::Json(
            200,
            serde_json::json!({
                "status": status,
                "stdout": String::from_utf8_lossy(&stdout),
                "stderr": String::from_utf8_lossy(&stderr),
            }),
        );
    }
    let id = handle.id();
    ctx.execs
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(id, handle.clone());
    let execs = ctx.execs.clone();
    let session = move |mut conn: UnixStream| {
        for item in incoming {
            let (frame, last) = match item {
                Incoming::Output { fd, data } => (Frame::Output { id, fd, data }, false),
                Incoming::Done(body) => (Frame::Response { id, body }, true),
                Incoming::Reset => (
                    Frame::Response {
                        id,
                        body: Err(Failure {
                            errno: libc::ECONNRESET,
                            message: "the guest agent's connection closed".into(),
                        }),
                    },
                    true,
                ),
            };
            let sent = write_frame(&mut conn, &frame).and_then(|()| Ok(conn.flush()?));
            if sent.is_err() {
                // The client went away: hang the command up, as a
                // terminal closing would.
                let _ = handle.signal(libc::SIGHUP);
                break;
            }
            if last {
                break;
            }
        }
        execs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    };
    Routed::Upgrade(vec![format!("X-Exec-Id: {id}")], Box::new(session))
}

/// `PUT /agent/exec/ID/{input,resize,signal}`.
fn exec_control(
    ctx: &Context,
    id: u64,
    act: impl FnOnce(&ExecHandle) -> Result<(), AgentError>,
) -> Routed {
    let handle = ctx
        .execs
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&id)
        .cloned();
    let Some(handle) = handle else {
        return error(404, format!("no running exec {id}"));
    };
    match act(&handle) {
        Ok(()) => Routed::Json(200, serde_json::json!({})),
        Err(e) => agent_error(e),
    }
}

fn error(code: u16, msg: impl std::fmt::Display) -> Routed {
    Routed::Json(code, serde_json::json!({ "error": msg.to_string() }))
}

/// Hands a request to the main thread and waits for its answer.
fn ask(events: &Sender<VmEvent>, request: ApiRequest) -> Routed {
    let (tx, rx) = std::sync::mpsc::channel();
    if events
        .send(VmEvent::Request { request, reply: tx })
        .is_err()
    {
        return error(503, "the VM is shutting down");
    }
    match rx.recv() {
        Ok(Ok(v)) => Routed::Json(200, v),
        Ok(Err(f)) => failure_answer(f),
        Err(_) => error(503, "the VM is shutting down"),
    }
}

fn failure_answer(f: ApiFailure) -> Routed {
    match f {
        ApiFailure::BadRequest(e) => error(400, e),
        ApiFailure::Conflict(e) => error(409, e),
        ApiFailure::Failed(e) => error(500, e),
        ApiFailure::Forbidden(e) => error(403, e),
    }
}

/// What the main thread answers a request with.
type Answer = Result<serde_json::Value, ApiFailure>;

/// How long a streamed snapshot's answer may take once its image has been
/// sent whole (only the answer's trip remains).
const STREAMED_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The trailer field of a streamed snapshot: the VMM's answer as JSON, as
/// `PUT /vm/snapshot` with a path answers.
pub const ANSWER_TRAILER: &str = "X-Snapshot-Answer";

/// Maps a request to its answer.
fn route(method: &str, url: &str, body: &[u8], upgrade: bool, ctx: &Context) -> Routed {
    let endpoint = match Endpoint::parse(method, url, body, upgrade) {
        Ok(e) => e,
        Err((code, msg)) => return error(code, msg),
    };
    let (info, events) = (&ctx.info, &ctx.events);
    match endpoint {
        Endpoint::Info => Routed::Json(
            200,
            serde_json::json!({
                "vcpus": info.vcpus,
                "mem_mib": info.mem_mib,
                "kernel": info.kernel,
                "rootfs": info.rootfs,
                "image": info.image,
                "uptime_ms": info.started.elapsed().as_millis() as u64,
                "vmm_version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
                "name": info.name,
                "state": *info.state.lock().unwrap_or_else(PoisonError::into_inner),
                "progress": info.progress.now().map(|(done, total)| serde_json::json!({ "done": done, "total": total })),
                "lazy_memory": info.memory_fill.as_ref().map(|m| m.now()),
            }),
        ),
        Endpoint::Shutdown => {
            let _ = events.send(VmEvent::Stop(StopReason::Requested));
            Routed::Json(200, serde_json::json!({ "state": "stopping" }))
        }
        Endpoint::AgentPing => agent_call(&ctx.agent, Request::Ping),
        Endpoint::AgentFreeze => agent_call(&ctx.agent, Request::Freeze),
        Endpoint::AgentThaw => agent_call(&ctx.agent, Request::Thaw),
        Endpoint::Exec(b) => exec(ctx, b),
        Endpoint::ExecInput(id, data) => exec_control(ctx, id, |h| h.input(data)),
        Endpoint::ExecResize(id, r) => exec_control(ctx, id, |h| h.resize(r.rows, r.cols)),
        Endpoint::ExecSignal(id, r) => exec_control(ctx, id, |h| h.signal(r.signal)),
        Endpoint::Checkpoint(name) => ask(events, ApiRequest::Checkpoint { name }),
        Endpoint::Pause => ask(events, ApiRequest::Pause),
        Endpoint::Resume => ask(events, ApiRequest::Resume),
        Endpoint::Snapshot(b) => {
            let options = b.options();
            let target = match b.path {
                Some(p) => SnapshotTarget::Path(p),
                None => {
                    let (reader, writer) = match std::io::pipe() {
                        Ok(p) => p,
                        Err(e) => return error(500, format!("cannot create a pipe: {e}")),
                    };
                    let request = ApiRequest::Snapshot(SnapshotRequest {
                        target: SnapshotTarget::Stream(Box::new(writer)),
                        options,
                    });
                    let (tx, rx) = std::sync::mpsc::channel();
                    if events
                        .send(VmEvent::Request { request, reply: tx })
                        .is_err()
                    {
                        return error(503, "the VM is shutting down");
                    }
                    // The main thread writes the image into the pipe while
                    // this thread sends it on; a failed snapshot closes the
                    // pipe early, which the image's missing end shows. Its
                    // answer (id, sizes, pause) comes once the image is
                    // written, as the stream's trailer.
                    return Routed::Stream(reader, Vec::new(), Some(rx));
                }
            };
            ask(
                events,
                ApiRequest::Snapshot(SnapshotRequest { target, options }),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn info() -> VmInfo {
        VmInfo {
            vcpus: 2,
            mem_mib: 256,
            kernel: "k".into(),
            rootfs: None,
            started: Instant::now(),
            name: None,
            image: None,
            state: Arc::new(Mutex::new("running")),
            progress: Arc::default(),
            memory_fill: None,
        }
    }

    fn request(path: &Path, req: &str) -> String {
        let mut c = UnixStream::connect(path).unwrap();
        c.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn an_increments_parent_id_needs_its_path() {
        let put = |body: &str| Endpoint::parse("PUT", "/vm/snapshot", body.as_bytes(), false);
        let e = put(r#"{"stream":true,"parent_id":"00112233445566778899aabbccddeeff"}"#)
            .err()
            .unwrap();
        assert_eq!(e.0, 400, "{}", e.1);
        assert!(e.1.contains("parent"), "{}", e.1);
        assert!(put(r#"{"stream":true,"parent":"/x/base.img"}"#).is_ok());
    }

    #[test]
    fn info_shutdown_and_errors_over_a_real_socket() {
        let dir = std::env::temp_dir().join(format!("vmm-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let (tx, rx) = std::sync::mpsc::channel();
        let (_agent_tx, agent_rx) = std::sync::mpsc::channel();
        let agent = AgentChannel::start(agent_rx, tx.clone(), None).unwrap();
        let server = ApiServer::start(&sock, info(), tx.clone(), agent.clone()).unwrap();
        assert!(matches!(
            ApiServer::start(&sock, info(), tx, agent),
            Err(ApiError::InUse(_))
        ));
        let r = request(
            &sock,
            "GET /vm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("\"vcpus\":2"), "{r}");
        let r = request(
            &sock,
            "GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        let r = request(&sock, "PUT /vm/shutdown HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(matches!(
            rx.recv().unwrap(),
            VmEvent::Stop(StopReason::Requested)
        ));
        // A bad snapshot request is refused before it reaches the main
        // thread: the VM is never paused for it.
        let body = r#"{"path":"/tmp/x.img","compress":"bogus"}"#;
        let r = request(
            &sock,
            &format!(
                "PUT /vm/snapshot HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        );
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        assert!(r.contains("unknown compression 'bogus'"), "{r}");
        assert!(rx.try_recv().is_err(), "the request reached the VM");

        // What the main thread refuses for the VM's state is a conflict,
        // what it fails at an internal error.
        let main = std::thread::spawn(move || {
            for answer in [
                ApiFailure::Conflict("cannot pause a VM that is Paused".into()),
                ApiFailure::Failed("cannot read the VM's KVM state".into()),
            ] {
                match rx.recv().unwrap() {
                    VmEvent::Request { reply, .. } => reply.send(Err(answer)).unwrap(),
                    VmEvent::Stop(_) | VmEvent::AgentReady => panic!("unexpected event"),
                }
            }
        });
        let put = "HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        let r = request(&sock, &format!("PUT /vm/pause {put}"));
        assert!(r.starts_with("HTTP/1.1 409"), "{r}");
        assert!(r.contains("cannot pause a VM that is Paused"), "{r}");
        let r = request(&sock, &format!("PUT /vm/resume {put}"));
        assert!(r.starts_with("HTTP/1.1 500"), "{r}");
        main.join().unwrap();
        drop(server);
        assert!(!sock.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
