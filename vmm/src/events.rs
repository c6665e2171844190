//! What reaches the VMM's main thread: a vCPU that stops the VM, or a
//! request from the API, and the typed requests themselves.
//!
//! The snapshot request is one typed struct: `vmm snapshot` builds it from
//! its arguments (compression parsed by clap), sends it as JSON, and the API
//! parses it back with serde, so a bad value is refused before the VM is
//! touched.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::Sender;

use serde::{Deserialize, Serialize};
use snapshot::Compression;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest reset the machine (i8042 pulse, `reboot`) or reported its
    /// exit status: the normal way out.
    GuestReset,
    /// A triple fault or KVM_SYSTEM_EVENT shutdown.
    GuestShutdown(String),
    /// Asked for through the API.
    Requested,
    /// The VM cannot go on.
    Failed(String),
}

/// An event for the main thread.
pub enum VmEvent {
    /// The VM must stop.
    Stop(StopReason),
    /// An API request; the answer goes back on `reply`.
    Request {
        request: ApiRequest,
        reply: Sender<Result<serde_json::Value, ApiFailure>>,
    },
    /// The guest agent is connected and, in a restored VM, has done its
    /// after-restore work: once per VM.
    AgentReady,
}

/// Why the main thread did not do what an API request asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiFailure {
    /// The request itself is wrong (a bad checkpoint name): 400.
    BadRequest(String),
    /// Not allowed in the VM's present state (pause a paused VM): 409.
    Conflict(String),
    /// Tried and failed: 500.
    Failed(String),
    /// Outside what the VMM may do (a snapshot to a path its Landlock
    /// rules do not let it write): 403.
    Forbidden(String),
}

impl ApiFailure {
    /// What went wrong, in words.
    pub fn message(&self) -> &str {
        match self {
            ApiFailure::BadRequest(m)
            | ApiFailure::Conflict(m)
            | ApiFailure::Failed(m)
            | ApiFailure::Forbidden(m) => m,
        }
    }
}

pub enum ApiRequest {
    Pause,
    Resume,
    Snapshot(SnapshotRequest),
    /// A checkpoint into the snapshot directory (`--snapshot-dir`), asked
    /// for from inside the guest, by `--checkpoint-on`'s signal or through
    /// the API; `name` is only a file name, checked by the main thread.
    Checkpoint {
        name: Option<String>,
    },
}

/// Where a snapshot image goes.
pub enum SnapshotTarget {
    /// A file, written atomically (temporary file, fsync, rename).
    Path(PathBuf),
    /// A stream (the API response body), written as it is produced.
    Stream(Box<dyn Write + Send>),
}

/// A snapshot to take, as the main thread receives it.
pub struct SnapshotRequest {
    pub target: SnapshotTarget,
    pub options: SnapshotOptions,
}

/// How to take a snapshot: `vmm snapshot`'s flags and the JSON fields of
/// `PUT /vm/snapshot` alike.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
pub struct SnapshotOptions {
    /// End the VM once the image is safely written.
    #[arg(long)]
    #[serde(default)]
    pub stop: bool,
    /// none, zstd or zstd:LEVEL (1 to 19).
    #[arg(long, default_value = "zstd:1")]
    #[serde(default = "default_compression")]
    pub compress: Compression,
    /// Record the disk's path and fingerprint instead of its contents.
    #[arg(long)]
    #[serde(default)]
    pub no_disk: bool,
    /// How long the guest agent may take, in ms, to get the guest's
    /// programs ready and freeze its filesystems; past it the snapshot goes
    /// on, recorded as not quiesced. 0: do not ask the agent.
    #[arg(long = "quiesce-timeout", value_name = "MS", default_value_t = DEFAULT_QUIESCE_TIMEOUT_MS)]
    #[serde(default = "default_quiesce_timeout")]
    pub quiesce_timeout_ms: u64,
    /// Keep track of the pages the VM writes from this image on, so the
    /// next snapshot can be an increment on it (--parent). It costs the
    /// guest: its memory is mapped in small pages while tracked (a first
    /// pass over 1 GiB took 3.8 s instead of 1.2 s after a restore).
    #[arg(long)]
    #[serde(default)]
    pub track: bool,
    /// Write an increment: only the memory pages written since IMAGE, this
    /// VM's last image taken or restored with --track (states and disks
    /// are written whole). Tracking goes on from the increment.
    #[arg(long, value_name = "IMAGE")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<PathBuf>,
    /// The parent's image id (hex), which `vmm snapshot` reads from the
    /// file; without it the VMM reads it.
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// Keep a running VM paused until the whole image is written. By
    /// default it pauses only while its state is captured and a copy of
    /// the VMM forked to write the image, which holds memory and disks as
    /// they were at the pause. It pauses throughout anyway with --no-disk,
    /// when a lazy restore's memory is still arriving after 30 s, or when
    /// the writer cannot be forked; the answer says why.
    #[arg(long)]
    #[serde(default)]
    pub full_pause: bool,
}

/// The default bound on the agent's quiescing.
pub const DEFAULT_QUIESCE_TIMEOUT_MS: u64 = 2000;

fn default_compression() -> Compression {
    Compression::Zstd(1)
}

fn default_quiesce_timeout() -> u64 {
    DEFAULT_QUIESCE_TIMEOUT_MS
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        SnapshotOptions {
            stop: false,
            compress: default_compression(),
            no_disk: false,
            quiesce_timeout_ms: DEFAULT_QUIESCE_TIMEOUT_MS,
            track: false,
            parent: None,
            parent_id: None,
            full_pause: false,
        }
    }
}

/// The body of `PUT /vm/snapshot`: a destination and the options. The
/// options' fields are spelled out rather than `#[serde(flatten)]`ed, since
/// serde cannot refuse unknown fields of a flattened struct, and a typo in a
/// request must be refused, not ignored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotBody {
    /// An absolute path on the VMM's host to write the image to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Send the image as the response body instead.
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stop: bool,
    #[serde(default = "default_compression")]
    pub compress: Compression,
    #[serde(default)]
    pub no_disk: bool,
    #[serde(default = "default_quiesce_timeout")]
    pub quiesce_timeout_ms: u64,
    /// Track the pages written from this image on.
    #[serde(default)]
    pub track: bool,
    /// An increment on this image (absolute path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<PathBuf>,
    /// The parent's id (hex); read from `parent` when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// Keep a running VM paused for the whole write.
    #[serde(default)]
    pub full_pause: bool,
}

impl SnapshotBody {
    pub fn new(path: Option<PathBuf>, options: SnapshotOptions) -> Self {
        SnapshotBody {
            stream: path.is_none(),
            path,
            stop: options.stop,
            compress: options.compress,
            no_disk: options.no_disk,
            quiesce_timeout_ms: options.quiesce_timeout_ms,
            track: options.track,
            parent: options.parent,
            parent_id: options.parent_id,
            full_pause: options.full_pause,
        }
    }

    pub fn options(&self) -> SnapshotOptions {
        SnapshotOptions {
            stop: self.stop,
            compress: self.compress,
            no_disk: self.no_disk,
            quiesce_timeout_ms: self.quiesce_timeout_ms,
            track: self.track,
            parent: self.parent.clone(),
            parent_id: self.parent_id.clone(),
            full_pause: self.full_pause,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_round_trips_and_refuses_bad_values() {
        let opts = SnapshotOptions {
            stop: true,
            compress: Compression::Zstd(3),
            no_disk: false,
            quiesce_timeout_ms: 500,
            track: true,
            parent: Some("/x/base".into()),
            parent_id: Some("00112233445566778899aabbccddeeff".into()),
            full_pause: true,
        };
        let body = SnapshotBody::new(Some("/x/img".into()), opts.clone());
        let text = serde_json::to_string(&body).unwrap();
        assert!(text.contains("\"zstd:3\""), "{text}");
        let back: SnapshotBody = serde_json::from_str(&text).unwrap();
        assert_eq!(back, body);
        assert_eq!(back.options(), opts);
        let empty: SnapshotBody = serde_json::from_str("{}").unwrap();
        assert_eq!(empty.compress, Compression::Zstd(1));
        assert_eq!(empty.parent, None);
        let e = serde_json::from_str::<SnapshotBody>(r#"{"compress":"bogus"}"#).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        assert!(serde_json::from_str::<SnapshotBody>(r#"{"typo":1}"#).is_err());
    }
}
