//! The control channel between the VMM and the guest agent, and the agent's
//! local socket for programs in the guest.
//!
//! # The control channel
//! The agent connects over vsock to the host (CID 2) on [`AGENT_PORT`]; the
//! VMM serves that port itself, with no host socket involved. Each side
//! sends [`Frame`]s: a little-endian `u32` length, then the frame in
//! postcard. The agent opens with [`Frame::Hello`], the VMM answers
//! [`Frame::Welcome`]; a version mismatch ends the connection. Requests go
//! both ways (the VMM asks the agent to run a command, the agent asks the
//! VMM to checkpoint) and carry an id that their response repeats; ids are
//! the sender's own, so the two directions never collide.
//!
//! A restore resets every vsock connection. The agent reconnects by itself,
//! and the restored VMM then sends [`Request::AfterRestore`].
//!
//! # The local socket
//! Programs in the guest talk to the agent over the Unix stream socket
//! [`local::SOCKET_PATH`] in one-line text messages (see [`local`]), so a
//! library in any language, or a shell with `socat`, can use it.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// The host port the agent connects to.
pub const AGENT_PORT: u32 = 52;
/// Bumped on any incompatible change to [`Frame`].
pub const PROTOCOL_VERSION: u32 = 2;
/// The largest frame either side accepts.
pub const MAX_FRAME: usize = 1 << 20;
/// The most output one [`Frame::Output`] carries.
pub const OUTPUT_CHUNK: usize = 32 * 1024;

/// One message on the control channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// The agent's first frame on each connection.
    Hello {
        version: u32,
        /// Restores this guest has been through ([`Reply::Restored`]).
        generation: u64,
    },
    /// The VMM's answer to `Hello`.
    Welcome {
        version: u32,
    },
    Request {
        id: u64,
        body: Request,
    },
    Response {
        id: u64,
        body: Result<Reply, Failure>,
    },
    /// Output of the running exec `id`: `fd` 1 or 2.
    Output {
        id: u64,
        fd: u8,
        data: Vec<u8>,
    },
    /// Input for the running exec `id`; empty `data` closes its stdin.
    Input {
        id: u64,
        data: Vec<u8>,
    },
    /// The terminal of the running exec `id` changed size.
    Resize {
        id: u64,
        rows: u16,
        cols: u16,
    },
    /// Ends the running exec `id` with this signal.
    Signal {
        id: u64,
        signal: i32,
    },
}

/// What one side asks of the other.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// VMM to agent: are you there? Answered [`Reply::Pong`].
    Ping,
    /// VMM to agent: run a command, stream its output ([`Frame::Output`])
    /// and answer [`Reply::Exited`].
    Exec(ExecRequest),
    /// VMM to agent, before a checkpoint: signal the registered processes
    /// and wait up to `timeout_ms` for them to say they are ready.
    Prepare { timeout_ms: u32 },
    /// VMM to agent: sync and freeze the writable filesystems (FIFREEZE).
    Freeze,
    /// VMM to agent: thaw what `Freeze` froze.
    Thaw,
    /// VMM to agent, first thing after a restore.
    AfterRestore(AfterRestore),
    /// Agent to VMM: a program in the guest asks for a checkpoint. `name`
    /// is only a name; the VMM decides the directory.
    Checkpoint { name: Option<String> },
    /// VMM to agent, to a guest booted with `vmm.start=agent`: run the
    /// container's main process as a boot with `vmm.cmd=` would. Answered
    /// [`Reply::Started`] once it is handed over; the command's end ends
    /// the VM as usual.
    Start(StartRequest),
}

/// The container's main process, as the VMM hands it to a waiting agent.
/// What is `None` is as a boot with `vmm.cmd=` has it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRequest {
    /// `None`: an interactive shell.
    pub argv: Option<Vec<Vec<u8>>>,
    /// The whole environment (`NAME=value` entries), instead of the one the
    /// agent makes from the kernel's (a container image's `Env`).
    pub env: Option<Vec<Vec<u8>>>,
    /// The working directory; `None`: `/`.
    pub workdir: Option<Vec<u8>>,
    /// Whom the process runs as; `None`: root.
    pub user: Option<ProcessUser>,
}

/// Numeric credentials, resolved by the VMM (from the image's /etc/passwd
/// and /etc/group).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// A command to run in the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// `NAME=value` entries added to the agent's environment.
    pub env: Vec<String>,
    /// Run on a new pseudo-terminal (its output all comes as fd 1).
    pub tty: bool,
    /// Pass [`Frame::Input`] to the command's stdin; otherwise it reads
    /// /dev/null.
    pub stdin: bool,
    /// The terminal's size, with `tty`.
    pub rows: u16,
    pub cols: u16,
}

/// What the restored VMM hands the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AfterRestore {
    /// The host's wall clock as the message was sent.
    pub unix_secs: i64,
    pub unix_nanos: u32,
    /// Fresh host entropy for the guest kernel's RNG.
    pub entropy: Vec<u8>,
    /// The image the VM was restored from, as the VMM was given it.
    pub image: String,
}

/// A successful answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Pong {
        generation: u64,
    },
    /// A command ended: its exit code, or 128 + the signal that killed it.
    Exited {
        status: i32,
    },
    Prepared {
        notified: u32,
        ready: u32,
    },
    /// Mount points frozen or thawed.
    Frozen {
        filesystems: Vec<String>,
    },
    Thawed {
        filesystems: Vec<String>,
    },
    /// The after-restore work is done.
    Restored {
        generation: u64,
        hooks: u32,
        /// Time the work took in the guest.
        micros: u64,
        /// Each step's name and time (µs), in order.
        steps: Vec<(String, u64)>,
    },
    /// The checkpoint is durable on the host, at `path`.
    Checkpointed {
        path: String,
    },
    /// The main command is handed to the agent's init.
    Started,
}

/// A refused or failed request: an errno for the caller, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub errno: i32,
    pub message: String,
}

impl Failure {
    /// The exit status of a command that failed to start with this, as a
    /// shell (and docker) reports it: 127 not found, 126 cannot run.
    pub fn start_status(&self) -> i32 {
        if self.errno == ENOENT {
            127
        } else {
            126
        }
    }
}

/// Linux's ENOENT, the same on every architecture.
const ENOENT: i32 = 2;

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("the peer closed the channel")]
    Closed,
    #[error("channel I/O")]
    Io(#[from] io::Error),
    #[error("a frame of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("a malformed frame")]
    Malformed(#[source] postcard::Error),
}

/// Writes one frame (length, then body) in one write.
pub fn write_frame(w: &mut impl Write, frame: &Frame) -> Result<(), FrameError> {
    let body = postcard::to_stdvec(frame).map_err(FrameError::Malformed)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)?;
    Ok(())
}

/// Reads one frame; [`FrameError::Closed`] at a clean end of stream.
pub fn read_frame(r: &mut impl Read) -> Result<Frame, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    postcard::from_bytes(&body).map_err(FrameError::Malformed)
}

/// The agent's local socket and files, for programs in the guest.
///
/// Requests, one line each, answered with one line:
/// - `checkpoint [NAME]` → `ok PATH` in the original run once the image is
///   durable on the host, `restored PATH` when the VM woke up from that
///   image, `error ERRNO MESSAGE` otherwise;
/// - `register PID [BEFORE AFTER]` → `ok`: signal PID before each
///   checkpoint (default SIGUSR1) and after each restore (default SIGUSR2);
/// - `ready PID` → `ok`: PID has done its before-checkpoint work.
///
/// The same `register` and `ready` lines written to [`NOTIFY_PATH`] (a
/// FIFO, no answer) do the same for shell scripts.
pub mod local {
    /// The agent's Unix stream socket.
    pub const SOCKET_PATH: &str = "/run/vmm/agent.sock";
    /// A FIFO taking `register` and `ready` lines.
    pub const NOTIFY_PATH: &str = "/run/vmm/notify";
    /// How many restores this guest has been through, in decimal.
    pub const GENERATION_PATH: &str = "/run/vmm/generation";
    /// Executables run in name order after each restore.
    pub const RESTORE_HOOKS_DIR: &str = "/etc/vmm/restore.d";
    /// The longest checkpoint name the VMM accepts.
    pub const MAX_NAME: usize = 64;

    /// A line from a program in the guest.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum LocalRequest {
        Checkpoint {
            name: Option<String>,
        },
        Register {
            pid: i32,
            before: Option<i32>,
            after: Option<i32>,
        },
        Ready {
            pid: i32,
        },
    }

    impl LocalRequest {
        /// Parses one line (without its newline).
        pub fn parse(line: &str) -> Option<LocalRequest> {
            let mut words = line.split_ascii_whitespace();
            let verb = words.next()?;
            let num = |w: Option<&str>| w.and_then(|w| w.parse::<i32>().ok());
            let req = match verb {
                "checkpoint" => LocalRequest::Checkpoint {
                    name: words.next().map(str::to_string),
                },
                "register" => {
                    let pid = num(words.next()).filter(|&p| p > 0)?;
                    let (before, after) = match words.next() {
                        None => (None, None),
                        b => (Some(num(b)?), Some(num(words.next())?)),
                    };
                    LocalRequest::Register { pid, before, after }
                }
                "ready" => LocalRequest::Ready {
                    pid: num(words.next()).filter(|&p| p > 0)?,
                },
                _ => return None,
            };
            words.next().is_none().then_some(req)
        }

        /// The line for this request, with its newline.
        pub fn line(&self) -> String {
            match self {
                LocalRequest::Checkpoint { name: None } => "checkpoint\n".into(),
                LocalRequest::Checkpoint { name: Some(n) } => format!("checkpoint {n}\n"),
                LocalRequest::Register {
                    pid,
                    before: Some(b),
                    after: Some(a),
                } => format!("register {pid} {b} {a}\n"),
                LocalRequest::Register { pid, .. } => format!("register {pid}\n"),
                LocalRequest::Ready { pid } => format!("ready {pid}\n"),
            }
        }
    }

    /// The agent's answer to a line.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum LocalReply {
        Ok(String),
        Restored(String),
        Error { errno: i32, message: String },
    }

    impl LocalReply {
        pub fn parse(line: &str) -> Option<LocalReply> {
            let line = line.trim_end_matches('\n');
            let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
            Some(match verb {
                "ok" => LocalReply::Ok(rest.to_string()),
                "restored" => LocalReply::Restored(rest.to_string()),
                "error" => {
                    let (errno, message) = rest.split_once(' ').unwrap_or((rest, ""));
                    LocalReply::Error {
                        errno: errno.parse().ok()?,
                        message: message.to_string(),
                    }
                }
                _ => return None,
            })
        }

        /// The line for this reply, with its newline (newlines in the
        /// text become spaces).
        pub fn line(&self) -> String {
            let flat = |s: &str| s.replace('\n', " ");
            match self {
                LocalReply::Ok(s) if s.is_empty() => "ok\n".into(),
                LocalReply::Ok(s) => format!("ok {}\n", flat(s)),
                LocalReply::Restored(s) => format!("restored {}\n", flat(s)),
                LocalReply::Error { errno, message } => {
                    format!("error {errno} {}\n", flat(message))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::local::*;
    use super::*;

    /// Writes the seeds of the `read_frame` fuzz target (guest-agent/abi/
    /// fuzz) when FRAME_FUZZ_SEEDS names a directory: one stream of frames
    /// of every kind.
    #[test]
    fn write_fuzz_seeds() {
        let Some(dir) = std::env::var_os("FRAME_FUZZ_SEEDS") else {
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        let frames = [
            Frame::Hello {
                version: 1,
                generation: 2,
            },
            Frame::Welcome { version: 1 },
            Frame::Request {
                id: 3,
                body: Request::Ping,
            },
            Frame::Response {
                id: 3,
                body: Ok(Reply::Pong { generation: 2 }),
            },
            Frame::Output {
                id: 4,
                fd: 1,
                data: b"hello\n".to_vec(),
            },
            Frame::Input {
                id: 4,
                data: b"x".to_vec(),
            },
            Frame::Resize {
                id: 4,
                rows: 24,
                cols: 80,
            },
            Frame::Signal { id: 4, signal: 15 },
        ];
        let mut all = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            let mut one = Vec::new();
            write_frame(&mut one, f).unwrap();
            std::fs::write(dir.join(format!("frame-{i}")), &one).unwrap();
            all.extend_from_slice(&one);
        }
        std::fs::write(dir.join("all"), &all).unwrap();
    }

    #[test]
    fn a_failed_start_exits_as_a_shell_says() {
        let f = |errno| Failure {
            errno,
            message: String::new(),
        };
        assert_eq!(f(2).start_status(), 127, "ENOENT: not found");
        assert_eq!(f(13).start_status(), 126, "EACCES: cannot run");
    }

    #[test]
    fn frames_round_trip_through_a_stream() {
        let frames = [
            Frame::Hello {
                version: PROTOCOL_VERSION,
                generation: 3,
            },
            Frame::Request {
                id: 7,
                body: Request::Exec(ExecRequest {
                    argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
                    env: vec![],
                    tty: false,
                    stdin: true,
                    rows: 24,
                    cols: 80,
                }),
            },
            Frame::Output {
                id: 7,
                fd: 2,
                data: vec![0, 1, 255],
            },
            Frame::Response {
                id: 7,
                body: Err(Failure {
                    errno: 2,
                    message: "no such program".into(),
                }),
            },
        ];
        let mut buf = Vec::new();
        for f in &frames {
            write_frame(&mut buf, f).unwrap();
        }
        let mut r = buf.as_slice();
        for f in &frames {
            assert_eq!(&read_frame(&mut r).unwrap(), f);
        }
        assert!(matches!(read_frame(&mut r), Err(FrameError::Closed)));
    }

    #[test]
    fn bad_frames_are_refused() {
        let huge = ((MAX_FRAME + 1) as u32).to_le_bytes();
        assert!(matches!(
            read_frame(&mut huge.as_slice()),
            Err(FrameError::TooLarge(_))
        ));
        let garbage = [3u8, 0, 0, 0, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame(&mut garbage.as_slice()),
            Err(FrameError::Malformed(_))
        ));
        let truncated = [9u8, 0, 0, 0, 1];
        assert!(matches!(
            read_frame(&mut truncated.as_slice()),
            Err(FrameError::Io(_))
        ));
    }

    #[test]
    fn local_lines_parse_and_print() {
        for (line, req) in [
            ("checkpoint", LocalRequest::Checkpoint { name: None }),
            (
                "checkpoint t1",
                LocalRequest::Checkpoint {
                    name: Some("t1".into()),
                },
            ),
            (
                "register 42",
                LocalRequest::Register {
                    pid: 42,
                    before: None,
                    after: None,
                },
            ),
            (
                "register 42 10 12",
                LocalRequest::Register {
                    pid: 42,
                    before: Some(10),
                    after: Some(12),
                },
            ),
            ("ready 42", LocalRequest::Ready { pid: 42 }),
        ] {
            assert_eq!(LocalRequest::parse(line), Some(req.clone()), "{line}");
            assert_eq!(req.line(), format!("{line}\n"));
        }
        for bad in [
            "",
            "dump",
            "register",
            "register x",
            "register 0",
            "register 1 10",
            "ready",
            "checkpoint a b",
        ] {
            assert_eq!(LocalRequest::parse(bad), None, "{bad:?}");
        }
        for reply in [
            LocalReply::Ok("/snap/t1".into()),
            LocalReply::Ok(String::new()),
            LocalReply::Restored("/snap/t1".into()),
            LocalReply::Error {
                errno: 1,
                message: "no --snapshot-dir".into(),
            },
        ] {
            assert_eq!(LocalReply::parse(&reply.line()), Some(reply.clone()));
        }
        assert_eq!(LocalReply::parse("error x y"), None);
    }
}
