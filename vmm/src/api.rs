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
//! - `PUT /vm/shutdown`: stop the VM now; `vmm` exits.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use crate::events::{
    ApiFailure, ApiRequest, SnapshotBody, SnapshotRequest, SnapshotTarget, StopReason, VmEvent,
};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("another VMM is already listening on {0}")]
    InUse(String),
    #[error("cannot remove stale socket {path}: {source}")]
    Stale {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {path}: {reason}")]
    Listen { path: String, reason: String },
}

/// Facts about the running VM that the API reports.
#[derive(Clone, Debug)]
pub struct VmInfo {
    pub vcpus: u8,
    pub mem_mib: u64,
    pub kernel: String,
    pub rootfs: Option<String>,
    pub started: Instant,
}

/// Serves the socket on its own thread; removes the socket file when dropped.
pub struct ApiServer {
    path: PathBuf,
    server: Arc<tiny_http::Server>,
}

impl ApiServer {
    pub fn start(path: &Path, info: VmInfo, events: Sender<VmEvent>) -> Result<Self, ApiError> {
        let name = path.display().to_string();
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(ApiError::InUse(name));
            }
            std::fs::remove_file(path).map_err(|source| ApiError::Stale {
                path: name.clone(),
                source,
            })?;
        }
        let server =
            Arc::new(
                tiny_http::Server::http_unix(path).map_err(|e| ApiError::Listen {
                    path: name,
                    reason: e.to_string(),
                })?,
            );
        let s = server.clone();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for mut request in s.incoming_requests() {
                    let mut body = String::new();
                    if let Err(e) = request.as_reader().read_to_string(&mut body) {
                        log::warn!("API: cannot read a request body: {e}");
                        continue;
                    }
                    let method = request.method().clone();
                    let url = request.url().to_string();
                    let result = match route(&method, &url, &body, &info, &events) {
                        Routed::Json(code, body) => request.respond(json_response(code, &body)),
                        Routed::Stream(reader) => request.respond(tiny_http::Response::new(
                            tiny_http::StatusCode(200),
                            vec![header("Content-Type: application/octet-stream")],
                            reader,
                            None,
                            None,
                        )),
                    };
                    if let Err(e) = result {
                        log::warn!("API: cannot send a response: {e}");
                    }
                }
            })
            .map_err(|e| ApiError::Listen {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        Ok(ApiServer {
            path: path.to_path_buf(),
            server,
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.server.unblock();
        let _ = std::fs::remove_file(&self.path);
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
    Stream(std::io::PipeReader),
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
        Ok(Err(ApiFailure::Conflict(e))) => error(409, e),
        Ok(Err(ApiFailure::Failed(e))) => error(500, e),
        Err(_) => error(503, "the VM is shutting down"),
    }
}

/// Maps a request to its answer.
fn route(
    method: &tiny_http::Method,
    url: &str,
    body: &str,
    info: &VmInfo,
    events: &Sender<VmEvent>,
) -> Routed {
    use tiny_http::Method::{Get, Put};
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
            }),
        ),
        (Put, "/vm/shutdown") => {
            let _ = events.send(VmEvent::Stop(StopReason::Requested));
            Routed::Json(200, serde_json::json!({ "state": "stopping" }))
        }
        (Put, "/vm/pause") => ask(events, ApiRequest::Pause),
        (Put, "/vm/resume") => ask(events, ApiRequest::Resume),
        (Put, "/vm/snapshot") => {
            let b: SnapshotBody =
                match serde_json::from_str(if body.trim().is_empty() { "{}" } else { body }) {
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
                    return Routed::Stream(reader);
                }
                _ => return error(400, "give either \"path\" or \"stream\": true"),
            };
            ask(
                events,
                ApiRequest::Snapshot(SnapshotRequest { target, options }),
            )
        }
        (_, "/" | "/vm" | "/vm/shutdown" | "/vm/pause" | "/vm/resume" | "/vm/snapshot") => {
            error(405, format!("method {method} not allowed on {url}"))
        }
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
        let server = ApiServer::start(&sock, info(), tx.clone()).unwrap();
        assert!(matches!(
            ApiServer::start(&sock, info(), tx),
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
                    VmEvent::Stop(_) => panic!("unexpected stop"),
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
