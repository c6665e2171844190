//! The control socket: HTTP/1.1 + JSON over a Unix socket, so
//! `curl --unix-socket PATH http://localhost/vm` works.
//!
//! Endpoints (documented in the README):
//! - `GET /` and `GET /vm`: what this VMM runs (vCPUs, memory, kernel, uptime).
//! - `PUT /vm/shutdown`: stop the VM now; `vmm` exits.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use crate::kvm::vcpu::StopReason;

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
    pub fn start(path: &Path, info: VmInfo, stop: Sender<StopReason>) -> Result<Self, ApiError> {
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
                for request in s.incoming_requests() {
                    let (code, body) = route(request.method(), request.url(), &info, &stop);
                    let response = tiny_http::Response::from_string(body.to_string())
                        .with_status_code(code)
                        .with_header(
                            "Content-Type: application/json"
                                .parse::<tiny_http::Header>()
                                .expect("static header is valid"),
                        );
                    if let Err(e) = request.respond(response) {
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

/// Maps a request to a status code and a JSON body.
fn route(
    method: &tiny_http::Method,
    url: &str,
    info: &VmInfo,
    stop: &Sender<StopReason>,
) -> (u16, serde_json::Value) {
    use tiny_http::Method::{Get, Put};
    match (method, url) {
        (Get, "/") | (Get, "/vm") => (
            200,
            serde_json::json!({
                "state": "running",
                "vcpus": info.vcpus,
                "mem_mib": info.mem_mib,
                "kernel": info.kernel,
                "rootfs": info.rootfs,
                "uptime_ms": info.started.elapsed().as_millis() as u64,
                "vmm_version": env!("CARGO_PKG_VERSION"),
            }),
        ),
        (Put, "/vm/shutdown") => {
            let _ = stop.send(StopReason::Requested);
            (200, serde_json::json!({ "state": "stopping" }))
        }
        (_, "/" | "/vm" | "/vm/shutdown") => (
            405,
            serde_json::json!({ "error": format!("method {method} not allowed on {url}") }),
        ),
        _ => (
            404,
            serde_json::json!({ "error": format!("no endpoint {url}") }),
        ),
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
        assert_eq!(rx.recv().unwrap(), StopReason::Requested);
        drop(server);
        assert!(!sock.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
