//! The client side of the API socket, for `vmm`'s commands that talk to a
//! running VMM (`snapshot`, `agent`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use guest_abi::agent::{read_frame, ExecRequest, Frame, Reply};

use crate::api::EXEC_PROTOCOL;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no VMM answers on {0} (is it running with --api-sock?)")]
    NoVmm(String),
    #[error("request to {path} failed")]
    Request {
        path: String,
        #[source]
        source: curl::Error,
    },
    #[error("the VMM at {sock} went away during {doing} (was it killed? see its log)")]
    WentAway { sock: String, doing: &'static str },
    #[error("cannot write the response")]
    Write(#[source] std::io::Error),
    #[error("{0}")]
    Refused(String),
    #[error("the exec stream ended before the command's status")]
    Truncated,
    #[error("the connection to {0} failed")]
    Io(String, #[source] std::io::Error),
}

/// One HTTP request to the VMM's API socket; streams the response body
/// into `sink` and calls `on_header` with each response header line.
/// Returns the HTTP status.
pub fn request(
    sock: &Path,
    method: &str,
    path: &str,
    body: &[u8],
    sink: &mut dyn Write,
    on_header: &mut dyn FnMut(&str),
) -> Result<u32, ClientError> {
    let name = sock.display().to_string();
    let failed = |source| ClientError::Request {
        path: name.clone(),
        source,
    };
    let mut easy = curl::easy::Easy::new();
    easy.unix_socket_path(Some(sock)).map_err(failed)?;
    easy.url(&format!("http://localhost{path}"))
        .map_err(failed)?;
    easy.custom_request(method).map_err(failed)?;
    let mut headers = curl::easy::List::new();
    headers
        .append("Content-Type: application/json")
        .map_err(failed)?;
    easy.http_headers(headers).map_err(failed)?;
    easy.post_fields_copy(body).map_err(failed)?;
    let mut write_err = None;
    {
        let mut t = easy.transfer();
        t.header_function(|h| {
            if let Ok(line) = std::str::from_utf8(h) {
                on_header(line.trim_end());
            }
            true
        })
        .map_err(failed)?;
        t.write_function(|data| match sink.write_all(data) {
            Ok(()) => Ok(data.len()),
            Err(e) => {
                write_err = Some(e);
                Ok(0)
            }
        })
        .map_err(failed)?;
        if let Err(e) = t.perform() {
            drop(t);
            if let Some(w) = write_err {
                return Err(ClientError::Write(w));
            }
            if e.is_couldnt_connect() {
                return Err(ClientError::NoVmm(name));
            }
            if e.is_got_nothing() || e.is_recv_error() || e.is_send_error() || e.is_partial_file() {
                return Err(ClientError::WentAway {
                    sock: name,
                    doing: doing(path),
                });
            }
            return Err(failed(e));
        }
    }
    easy.response_code().map_err(failed)
}

/// What a request to `path` is, in words.
fn doing(path: &str) -> &'static str {
    match path.split('?').next().unwrap_or(path) {
        "/vm/snapshot" | "/vm/checkpoint" => "the snapshot",
        p if p.starts_with("/agent/exec") => "the command",
        "/vm/pause" => "the pause",
        "/vm/resume" => "the resume",
        _ => "the request",
    }
}

/// The `error` of a JSON error body, or the body.
pub fn error_text(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned())
}

/// A JSON request answered with JSON; a non-200 answer is an error
/// carrying the VMM's message.
pub fn json(
    sock: &Path,
    method: &str,
    path: &str,
    body: &serde_json::Value,
) -> Result<serde_json::Value, ClientError> {
    let mut out = Vec::new();
    let code = request(
        sock,
        method,
        path,
        body.to_string().as_bytes(),
        &mut out,
        &mut |_| {},
    )?;
    if code != 200 {
        return Err(ClientError::Refused(error_text(&out)));
    }
    Ok(serde_json::from_slice(&out).unwrap_or(serde_json::Value::Null))
}

/// Splits the exec stream's frames as they arrive: output to our stdout
/// and stderr, the end as the command's status.
struct ExecSink {
    buf: Vec<u8>,
    status: Option<Result<ExecEnd, String>>,
}

/// How a command run in the guest ended.
pub struct ExecEnd {
    /// Its exit status (128 + signal), or 126/127 if it could not start.
    pub status: i32,
    /// Why it could not start.
    pub message: Option<String>,
}

impl Write for ExecSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        loop {
            if self.buf.len() < 4 {
                break;
            }
            let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
            if self.buf.len() < 4 + len as usize {
                break;
            }
            let mut frame_bytes = &self.buf[..4 + len as usize];
            let frame = read_frame(&mut frame_bytes).map_err(std::io::Error::other)?;
            self.buf.drain(..4 + len as usize);
            match frame {
                Frame::Output { fd: 2, data, .. } => {
                    let mut e = std::io::stderr().lock();
                    e.write_all(&data)?;
                    e.flush()?;
                }
                Frame::Output { data, .. } => {
                    let mut o = std::io::stdout().lock();
                    o.write_all(&data)?;
                    o.flush()?;
                }
                Frame::Response {
                    body: Ok(Reply::Exited { status }),
                    ..
                } => {
                    self.status = Some(Ok(ExecEnd {
                        status,
                        message: None,
                    }))
                }
                Frame::Response { body: Ok(r), .. } => {
                    self.status = Some(Err(format!("the agent answered {r:?}")))
                }
                Frame::Response { body: Err(f), .. } => {
                    let status = f.start_status();
                    self.status = Some(Ok(ExecEnd {
                        status,
                        message: Some(f.message),
                    }));
                }
                _ => {}
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs a command in the guest through the VMM on `sock`, its output on
/// ours (and our stdin to it, with `exec.stdin`); returns how it ended.
///
/// The request asks to switch the connection to the exec stream (HTTP
/// Upgrade, as `docker exec` does); what follows the answer's head is the
/// agent's frames.
pub fn exec(sock: &Path, exec: ExecRequest) -> Result<ExecEnd, ClientError> {
    let name = sock.display().to_string();
    let body = serde_json::json!({
        "argv": exec.argv,
        "env": exec.env,
        "tty": exec.tty,
        "stdin": exec.stdin,
        "rows": exec.rows,
        "cols": exec.cols,
        "stream": true,
    })
    .to_string();
    let mut conn = UnixStream::connect(sock).map_err(|_| ClientError::NoVmm(name.clone()))?;
    let head = format!(
        "PUT /agent/exec HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n\
         Upgrade: {EXEC_PROTOCOL}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    let io = |e| ClientError::Io(name.clone(), e);
    conn.write_all(head.as_bytes()).map_err(io)?;
    conn.write_all(body.as_bytes()).map_err(io)?;

    // The answer's head; what came after it is the stream's start.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let (code, id, rest) = loop {
        let n = conn.read(&mut chunk).map_err(io)?;
        if n == 0 {
            return Err(ClientError::Truncated);
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let id = response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("x-exec-id"))
                    .map(|h| String::from_utf8_lossy(h.value).into_owned());
                break (response.code.unwrap_or(0), id, buf[len..].to_vec());
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => {
                return Err(ClientError::Refused(format!(
                    "bad answer from the VMM: {e}"
                )))
            }
        }
    };
    if code != 101 {
        // An error answers with a JSON body of known length: read it all.
        let mut body = rest;
        let _ = conn.read_to_end(&mut body);
        return Err(ClientError::Refused(error_text(&body)));
    }
    if let (true, Some(id)) = (exec.stdin, id) {
        let sock = sock.to_path_buf();
        // Ends with the process: a blocked read of stdin cannot be
        // interrupted, and is harmless once the command is done.
        let _ = std::thread::Builder::new()
            .name("exec-stdin".into())
            .spawn(move || forward_stdin(&sock, &id));
    }
    let mut sink = ExecSink {
        buf: Vec::new(),
        status: None,
    };
    sink.write_all(&rest).map_err(ClientError::Write)?;
    while sink.status.is_none() {
        let n = conn.read(&mut chunk).map_err(io)?;
        if n == 0 {
            break;
        }
        sink.write_all(&chunk[..n]).map_err(ClientError::Write)?;
    }
    match sink.status {
        Some(Ok(end)) => Ok(end),
        Some(Err(e)) => Err(ClientError::Refused(e)),
        None => Err(ClientError::Truncated),
    }
}

/// Copies our stdin to the running exec `id`, then closes its input.
fn forward_stdin(sock: &Path, id: &str) {
    let path = format!("/agent/exec/{id}/input");
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 4096];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        let mut out = Vec::new();
        let sent = request(sock, "PUT", &path, &buf[..n], &mut out, &mut |_| {});
        if n == 0 || !matches!(sent, Ok(200)) {
            return;
        }
    }
}
