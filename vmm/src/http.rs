//! The API socket's HTTP/1.1 server: one thread per connection, one
//! request per connection (`Connection: close`), heads parsed by
//! `httparse`. What it does not do is as deliberate as what it does:
//!
//! - A connection holds only its own thread, from accept on: a burst of
//!   clients that connect and send nothing (or send slowly) never delays
//!   another's request, and their threads end when the head's deadline
//!   passes. At most [`MAX_CONNECTIONS`] at once; more are answered 503.
//! - A body is read only once the handler asks for it, and only as much as
//!   the request declared: a refused request (too large, too many) is
//!   answered and closed unread.
//! - Nothing on the file system is touched: the caller binds the socket
//!   and removes it (only if it is still its own).
//!
//! (tiny_http, used before, served connections from a pool that a burst of
//! idle ones could fill, drained an unread body whole before answering,
//! and removed whatever was at the socket's path when dropped.)

use std::io::{BufWriter, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// Connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 256;

/// How long a client may take to send a request's head, and then each
/// read of its body.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest request head read.
const MAX_HEAD: usize = 16 << 10;

/// A trailer field of a streamed answer: its name, and what gives its
/// value once the body has ended.
pub type Trailer = (&'static str, Box<dyn FnOnce() -> String + Send>);

/// One request, its head read; its body still on the connection.
pub struct Request {
    pub method: String,
    pub path: String,
    headers: Vec<(String, String)>,
    stream: UnixStream,
    /// Bytes read past the head: the body's start.
    early: Vec<u8>,
}

/// Why a request could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("the client sent no complete request head in {0:?}")]
    Timeout(Duration),
    #[error("the request head is larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("malformed request head: {0}")]
    Malformed(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Request {
    /// Reads a request's head from `stream` (within [`HEAD_TIMEOUT`]).
    fn read(mut stream: UnixStream) -> Result<Self, (UnixStream, HeadError)> {
        let deadline = Instant::now() + HEAD_TIMEOUT;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err((stream, HeadError::Timeout(HEAD_TIMEOUT)));
            }
            if let Err(e) = stream.set_read_timeout(Some(left)) {
                return Err((stream, e.into()));
            }
            let n = match stream.read(&mut chunk) {
                Ok(0) => {
                    let e = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                    return Err((stream, e.into()));
                }
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err((stream, HeadError::Timeout(HEAD_TIMEOUT)))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err((stream, e.into())),
            };
            buf.extend_from_slice(&chunk[..n]);
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut parsed = httparse::Request::new(&mut headers);
            match parsed.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let request = Request {
                        method: parsed.method.unwrap_or_default().to_string(),
                        path: parsed.path.unwrap_or_default().to_string(),
                        headers: parsed
                            .headers
                            .iter()
                            .map(|h| {
                                (
                                    h.name.to_string(),
                                    String::from_utf8_lossy(h.value).into_owned(),
                                )
                            })
                            .collect(),
                        early: buf[len..].to_vec(),
                        stream,
                    };
                    return Ok(request);
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
                Ok(httparse::Status::Partial) => return Err((stream, HeadError::TooLarge)),
                Err(e) => return Err((stream, HeadError::Malformed(e.to_string()))),
            }
        }
    }

    /// A header's value (names compare without case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body's declared length: Content-Length, 0 without one.
    /// A chunked body is not taken (`Err`).
    pub fn body_length(&self) -> Result<u64, String> {
        if self.header("Transfer-Encoding").is_some() {
            return Err("a chunked request body: send Content-Length".into());
        }
        match self.header("Content-Length") {
            None => Ok(0),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| format!("Content-Length {v:?} is not a number")),
        }
    }

    /// Reads the body, which the caller checked is at most `limit` bytes
    /// long as declared.
    pub fn read_body(&mut self, declared: u64) -> std::io::Result<Vec<u8>> {
        if self
            .header("Expect")
            .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
        {
            self.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        self.stream.set_read_timeout(Some(HEAD_TIMEOUT))?;
        let mut body = std::mem::take(&mut self.early);
        body.truncate(usize::try_from(declared).unwrap_or(usize::MAX));
        let rest = declared.saturating_sub(body.len() as u64);
        (&self.stream).take(rest).read_to_end(&mut body)?;
        if (body.len() as u64) < declared {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(body)
    }

    /// Answers with a JSON body and closes.
    pub fn respond_json(self, code: u16, body: &serde_json::Value) -> std::io::Result<()> {
        send_json(self.stream, code, body)
    }

    /// Answers 200 with a chunked body read from `from` until its end,
    /// then the trailer field `trailer` gives (what is known only once the
    /// body is whole; announced in a `Trailer` header).
    pub fn respond_stream(
        self,
        headers: &[String],
        mut from: impl Read,
        trailer: Option<Trailer>,
    ) -> std::io::Result<()> {
        let mut all = vec![
            "Content-Type: application/octet-stream".to_string(),
            "Transfer-Encoding: chunked".into(),
            "Connection: close".into(),
        ];
        all.extend_from_slice(headers);
        if let Some((name, _)) = &trailer {
            all.push(format!("Trailer: {name}"));
        }
        let mut out = BufWriter::with_capacity(256 << 10, &self.stream);
        out.write_all(head(200, &all).as_bytes())?;
        out.write_all(b"\r\n")?;
        let mut buf = vec![0u8; 128 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            write!(out, "{n:x}\r\n")?;
            out.write_all(&buf[..n])?;
            out.write_all(b"\r\n")?;
        }
        out.write_all(b"0\r\n")?;
        if let Some((name, value)) = trailer {
            // One line: a value never holds a line break.
            let value = value().replace(['\r', '\n'], " ");
            write!(out, "{name}: {value}\r\n")?;
        }
        out.write_all(b"\r\n")?;
        out.flush()?;
        drop(out);
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        Ok(())
    }

    /// Answers 101 Switching Protocols to `protocol` and hands over the
    /// connection.
    pub fn upgrade(mut self, protocol: &str, headers: &[String]) -> std::io::Result<UnixStream> {
        let mut all = vec![
            "Connection: Upgrade".to_string(),
            format!("Upgrade: {protocol}"),
        ];
        all.extend_from_slice(headers);
        let mut msg = head(101, &all);
        msg.push_str("\r\n");
        self.stream.write_all(msg.as_bytes())?;
        self.stream.set_read_timeout(None)?;
        Ok(self.stream)
    }
}

fn reason(code: u16) -> &'static str {
    match code {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// A response's status line and `headers`, without the blank line that
/// ends them.
fn head(code: u16, headers: &[String]) -> String {
    let mut head = format!("HTTP/1.1 {code} {}\r\n", reason(code));
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head
}

/// Answers `code` with a JSON body on `stream` and closes it.
fn send_json(mut stream: UnixStream, code: u16, body: &serde_json::Value) -> std::io::Result<()> {
    let body = body.to_string();
    let mut msg = head(
        code,
        &[
            "Content-Type: application/json".into(),
            format!("Content-Length: {}", body.len()),
            "Connection: close".into(),
        ],
    );
    msg.push_str("\r\n");
    msg.push_str(&body);
    stream.write_all(msg.as_bytes())?;
    close_gently(stream);
    Ok(())
}

/// Answers a connection that cannot be served with `code` and closes it.
fn refuse(stream: UnixStream, code: u16, message: &str) {
    let _ = stream.set_write_timeout(Some(HEAD_TIMEOUT));
    let _ = send_json(stream, code, &serde_json::json!({ "error": message }));
}

/// Ends our side of a connection whose request may not have been read
/// whole (a refused body, an oversized head): closing with unread bytes
/// would reset it, and the client could lose the answer. The client is
/// given a moment to read it and close; what it still sends is discarded.
fn close_gently(mut stream: UnixStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(LINGER));
    let mut sink = [0u8; 16 << 10];
    let deadline = Instant::now() + LINGER;
    while Instant::now() < deadline {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// How long [`close_gently`] waits for the client to close.
const LINGER: Duration = Duration::from_millis(200);

/// Accepts connections on `listener` until `stop` is signalled, serving
/// each on a thread of its own (named `api-request`) that reads the head
/// and hands the request to `handler`. Runs on the calling thread.
pub fn serve(
    listener: UnixListener,
    stop: &EventFd,
    handler: Arc<dyn Fn(Request) + Send + Sync>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll reads and writes the two pollfds above, which live
        // across the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            return Ok(());
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                log::warn!("API: cannot accept a connection: {e}");
                continue;
            }
        };
        // The accepted socket must block: its thread reads with timeouts.
        if let Err(e) = stream.set_nonblocking(false) {
            log::warn!("API: cannot set up a connection: {e}");
            continue;
        }
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            refuse(
                stream,
                503,
                &format!("{MAX_CONNECTIONS} connections are open already; try again"),
            );
            continue;
        }
        let (handler, active2) = (handler.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("api-request".into())
            .spawn(move || {
                match Request::read(stream) {
                    Ok(request) => handler(request),
                    Err((stream, HeadError::TooLarge)) => {
                        refuse(stream, 431, &HeadError::TooLarge.to_string())
                    }
                    Err((stream, e @ HeadError::Malformed(_))) => {
                        refuse(stream, 400, &e.to_string())
                    }
                    Err((stream, e @ HeadError::Timeout(_))) => refuse(stream, 408, &e.to_string()),
                    // The client went away.
                    Err((_, HeadError::Io(_))) => {}
                }
                active2.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::AcqRel);
            log::error!("API: cannot start a thread for a connection: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server on a socket pair's worth of real connections: a request
    /// read and answered, a streamed answer, an oversized head refused.
    #[test]
    fn requests_are_read_and_answered() {
        let dir = std::env::temp_dir().join(format!("vmm-http-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let stop = Arc::new(EventFd::new(0).unwrap());
        let stop2 = stop.clone();
        let server = std::thread::spawn(move || {
            serve(
                listener,
                &stop2,
                Arc::new(|mut r: Request| {
                    let n = r.body_length().unwrap();
                    let body = r.read_body(n).unwrap();
                    if r.path == "/stream" {
                        let answer: Trailer = ("X-Answer", Box::new(|| "done".into()));
                        r.respond_stream(&["X-Id: 7".into()], &b"hello world"[..], Some(answer))
                            .unwrap();
                    } else {
                        let v = serde_json::json!({ "path": r.path, "method": r.method, "body": String::from_utf8_lossy(&body) });
                        r.respond_json(200, &v).unwrap();
                    }
                }),
            )
        });
        let ask = |req: &[u8]| {
            let mut c = UnixStream::connect(&path).unwrap();
            c.write_all(req).unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).unwrap();
            out
        };
        let out = ask(b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello");
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(
            out.ends_with(r#"{"body":"hello","method":"PUT","path":"/x"}"#),
            "{out}"
        );
        let out = ask(b"GET /stream HTTP/1.1\r\n\r\n");
        assert!(out.contains("X-Id: 7\r\nTrailer: X-Answer\r\n"), "{out}");
        assert!(
            out.ends_with("\r\n\r\nb\r\nhello world\r\n0\r\nX-Answer: done\r\n\r\n"),
            "{out}"
        );
        let mut big = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        big.extend(vec![b'a'; MAX_HEAD + 10]);
        let out = ask(&big);
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
        let out = ask(b"NOT HTTP\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
        stop.write(1).unwrap();
        server.join().unwrap().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
