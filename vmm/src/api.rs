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
//!   --out -` works.
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
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use guest_abi::agent::{write_frame, ExecRequest, Failure, Frame, Reply, Request};
use serde::Deserialize;

use crate::agent::{AgentChannel, AgentError, ExecHandle, Incoming};
use crate::events::{
    ApiFailure, ApiRequest, SnapshotBody, SnapshotRequest, SnapshotTarget, StopReason, VmEvent,
};

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
    /// What the VM is doing, as the main thread last said
    /// ([`VmInfo::set_state`]); read without asking it, so a listing
    /// answers during a long snapshot too.
    pub state: Arc<Mutex<&'static str>>,
}

impl VmInfo {
    pub fn set_state(state: &Mutex<&'static str>, now: &'static str) {
        *state.lock().unwrap_or_else(PoisonError::into_inner) = now;
    }
}

/// Requests refused without reading their body: too many at a time, or a
/// body larger than any request needs.
fn refuse_early(request: &tiny_http::Request, ctx: &Context) -> Option<(u16, String)> {
    // This request's own thread counts too.
    if ctx.handlers.load(Ordering::Acquire) > MAX_REQUESTS_AT_ONCE {
        return Some((
            503,
            format!("{MAX_REQUESTS_AT_ONCE} requests are already being served; try again"),
        ));
    }
    match request.body_length() {
        Some(n) if n as u64 > MAX_BODY && !is_upgrade(request) => Some((
            413,
            format!("a request body of {n} bytes; the limit is {MAX_BODY}"),
        )),
        _ => None,
    }
}

fn is_upgrade(request: &tiny_http::Request) -> bool {
    request
        .headers()
        .iter()
        .any(|h| h.field.equiv("Upgrade") && h.value.as_str().eq_ignore_ascii_case(EXEC_PROTOCOL))
}

/// Reads one request's body, routes it and answers it.
fn handle(mut request: tiny_http::Request, ctx: &Context) {
    let upgrade = is_upgrade(&request);
    // A request that asks for an upgrade keeps its whole connection as its
    // body: read only what it declared.
    let declared = request.body_length().unwrap_or(0) as u64;
    let limit = if upgrade { declared } else { MAX_BODY };
    let mut body = Vec::new();
    if let Err(e) = Read::take(request.as_reader(), limit).read_to_end(&mut body) {
        log::warn!("API: cannot read a request body: {e}");
        return;
    }
    let method = request.method().clone();
    let url = request.url().to_string();
    match route(&method, &url, &body, upgrade, ctx) {
        Routed::Json(code, body) => {
            if let Err(e) = request.respond(json_response(code, &body)) {
                log::warn!("API: cannot send a response: {e}");
            }
        }
        // A stream lasts as long as its producer.
        Routed::Stream(reader, headers) => {
            let mut hs = vec![header("Content-Type: application/octet-stream")];
            hs.extend(headers.iter().map(|h| header(h)));
            let response =
                tiny_http::Response::new(tiny_http::StatusCode(200), hs, reader, None, None);
            if let Err(e) = request.respond(response) {
                log::warn!("API: cannot send a response: {e}");
            }
        }
        Routed::Upgrade(headers, session) => {
            let mut response = tiny_http::Response::empty(101);
            for h in &headers {
                response = response.with_header(header(h));
            }
            session(request.upgrade(EXEC_PROTOCOL, response));
        }
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
    server: Arc<tiny_http::Server>,
}

impl ApiServer {
    pub fn start(
        path: &Path,
        info: VmInfo,
        events: Sender<VmEvent>,
        agent: AgentChannel,
    ) -> Result<Self, ApiError> {
        claim_socket_path(path)?;
        let (listener, identity) = listen(path)?;
        let server = Arc::new(
            tiny_http::Server::from_listener(listener, None).map_err(|e| ApiError::Listen {
                path: path.display().to_string(),
                source: std::io::Error::other(e.to_string()),
            })?,
        );
        let s = server.clone();
        let ctx = Arc::new(Context {
            info,
            events,
            agent,
            execs: Arc::new(Mutex::new(HashMap::new())),
            handlers: AtomicUsize::new(0),
        });
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                // Each request is read and answered on a thread of its own,
                // refusals included: a client that sends its body slowly (or
                // never) holds only that thread, and the API goes on serving
                // the others. (Dropping a request whose body is unread makes
                // tiny_http read the rest of it, so even a refused one must
                // not be dropped here.)
                for request in s.incoming_requests() {
                    let ctx = ctx.clone();
                    ctx.handlers.fetch_add(1, Ordering::AcqRel);
                    let spawned = std::thread::Builder::new()
                        .name("api-request".into())
                        .spawn(move || {
                            match refuse_early(&request, &ctx) {
                                Some((code, why)) => {
                                    let answer =
                                        json_response(code, &serde_json::json!({ "error": why }));
                                    if let Err(e) = request.respond(answer) {
                                        log::warn!("API: cannot send a response: {e}");
                                    }
                                }
                                None => handle(request, &ctx),
                            }
                            ctx.handlers.fetch_sub(1, Ordering::AcqRel);
                        });
                    if let Err(e) = spawned {
                        log::error!("API: cannot start a thread for a request: {e}");
                    }
                }
            })
            .map_err(|source| ApiError::Listen {
                path: path.display().to_string(),
                source,
            })?;
        Ok(ApiServer {
            path: path.to_path_buf(),
            identity,
            server,
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.server.unblock();
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn header(h: &str) -> tiny_http::Header {
    h.parse().unwrap_or_else(|()| {
        tiny_http::Header::from_bytes(&b"X-Invalid"[..], &b"1"[..]).expect("static header")
    })
}

fn json_response(
    code: u16,
    body: &serde_json::Value,
) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    tiny_http::Response::from_string(body.to_string())
        .with_status_code(code)
        .with_header(header("Content-Type: application/json"))
}

/// How a request is answered.
enum Routed {
    Json(u16, serde_json::Value),
    /// The body streams from this pipe until its writer closes it.
    Stream(std::io::PipeReader, Vec<String>),
    /// 101 Switching Protocols with these headers, then the session owns
    /// the connection (written to as things happen, flushed each time:
    /// tiny_http's chunked bodies are buffered).
    Upgrade(Vec<String>, Session),
}

type Session = Box<dyn FnOnce(Box<dyn tiny_http::ReadWrite + Send>) + Send>;

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
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecBody {
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResizeBody {
    rows: u16,
    cols: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalBody {
    signal: i32,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CheckpointBody {
    #[serde(default)]
    name: Option<String>,
}

fn parse_json<'a, T: Deserialize<'a> + Default>(body: &'a [u8]) -> Result<T, Routed> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| error(400, format!("bad request body: {e}")))
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
fn exec(ctx: &Context, body: &[u8], upgrade: bool) -> Routed {
    let b: ExecBody = match serde_json::from_slice(body) {
        Ok(b) => b,
        Err(e) => return error(400, format!("bad exec request: {e}")),
    };
    if b.argv.is_empty() {
        return error(400, "bad exec request: argv is empty");
    }
    if b.stream && !upgrade {
        return error(
            400,
            format!("a streamed exec needs the headers Connection: Upgrade and Upgrade: {EXEC_PROTOCOL}"),
        );
    }
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
    let session = move |mut conn: Box<dyn tiny_http::ReadWrite + Send>| {
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
fn exec_control(ctx: &Context, rest: &str, body: &[u8]) -> Routed {
    let Some((id, what)) = rest.split_once('/') else {
        return error(404, format!("no endpoint /agent/exec/{rest}"));
    };
    let handle = id.parse::<u64>().ok().and_then(|id| {
        ctx.execs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned()
    });
    let Some(handle) = handle else {
        return error(404, format!("no running exec {id}"));
    };
    let sent = match what {
        "input" => handle.input(body.to_vec()),
        "resize" => match serde_json::from_slice::<ResizeBody>(body) {
            Ok(r) => handle.resize(r.rows, r.cols),
            Err(e) => return error(400, format!("bad resize request: {e}")),
        },
        "signal" => match serde_json::from_slice::<SignalBody>(body) {
            Ok(r) => handle.signal(r.signal),
            Err(e) => return error(400, format!("bad signal request: {e}")),
        },
        _ => return error(404, format!("no endpoint /agent/exec/{rest}")),
    };
    match sent {
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
        Ok(Err(ApiFailure::BadRequest(e))) => error(400, e),
        Ok(Err(ApiFailure::Conflict(e))) => error(409, e),
        Ok(Err(ApiFailure::Failed(e))) => error(500, e),
        Err(_) => error(503, "the VM is shutting down"),
    }
}

/// Maps a request to its answer.
fn route(
    method: &tiny_http::Method,
    url: &str,
    body: &[u8],
    upgrade: bool,
    ctx: &Context,
) -> Routed {
    use tiny_http::Method::{Get, Put};
    let (info, events) = (&ctx.info, &ctx.events);
    if let (Put, Some(rest)) = (method, url.strip_prefix("/agent/exec/")) {
        return exec_control(ctx, rest, body);
    }
    match (method, url) {
        (Get, "/") | (Get, "/vm") => Routed::Json(
            200,
            serde_json::json!({
                "vcpus": info.vcpus,
                "mem_mib": info.mem_mib,
                "kernel": info.kernel,
                "rootfs": info.rootfs,
                "uptime_ms": info.started.elapsed().as_millis() as u64,
                "vmm_version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
                "name": info.name,
                "state": *info.state.lock().unwrap_or_else(PoisonError::into_inner),
            }),
        ),
        (Put, "/vm/shutdown") => {
            let _ = events.send(VmEvent::Stop(StopReason::Requested));
            Routed::Json(200, serde_json::json!({ "state": "stopping" }))
        }
        (Get | Put, "/agent/ping") => agent_call(&ctx.agent, Request::Ping),
        (Put, "/agent/freeze") => agent_call(&ctx.agent, Request::Freeze),
        (Put, "/agent/thaw") => agent_call(&ctx.agent, Request::Thaw),
        (Put, "/agent/exec") => exec(ctx, body, upgrade),
        (Put, "/vm/checkpoint") => match parse_json::<CheckpointBody>(body) {
            Ok(b) => ask(events, ApiRequest::Checkpoint { name: b.name }),
            Err(r) => r,
        },
        (Put, "/vm/pause") => ask(events, ApiRequest::Pause),
        (Put, "/vm/resume") => ask(events, ApiRequest::Resume),
        (Put, "/vm/snapshot") => {
            let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
                b"{}"
            } else {
                body
            };
            let b: SnapshotBody = match serde_json::from_slice(body) {
                Ok(b) => b,
                Err(e) => return error(400, format!("bad snapshot request: {e}")),
            };
            let options = b.options();
            let target = match (b.path, b.stream) {
                (Some(p), false) => SnapshotTarget::Path(p),
                (None, true) => {
                    let (reader, writer) = match std::io::pipe() {
                        Ok(p) => p,
                        Err(e) => return error(500, format!("cannot create a pipe: {e}")),
                    };
                    let request = ApiRequest::Snapshot(SnapshotRequest {
                        target: SnapshotTarget::Stream(Box::new(writer)),
                        options,
                    });
                    let (tx, _rx) = std::sync::mpsc::channel();
                    if events
                        .send(VmEvent::Request { request, reply: tx })
                        .is_err()
                    {
                        return error(503, "the VM is shutting down");
                    }
                    // The main thread writes the image into the pipe while
                    // this thread sends it on; a failed snapshot closes the
                    // pipe early, which the image's missing end shows.
                    return Routed::Stream(reader, Vec::new());
                }
                _ => return error(400, "give either \"path\" or \"stream\": true"),
            };
            ask(
                events,
                ApiRequest::Snapshot(SnapshotRequest { target, options }),
            )
        }
        (
            _,
            "/" | "/vm" | "/vm/shutdown" | "/vm/pause" | "/vm/resume" | "/vm/snapshot"
            | "/vm/checkpoint" | "/agent/ping" | "/agent/freeze" | "/agent/thaw" | "/agent/exec",
        ) => error(405, format!("method {method} not allowed on {url}")),
        _ => error(404, format!("no endpoint {url}")),
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
            state: Arc::new(Mutex::new("running")),
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
