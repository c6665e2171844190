//! What reaches the VMM's main thread (vCPU stops, API requests), and the
//! handles it drives its vCPU threads with.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::kvm::persist::VcpuState;
use crate::kvm::vcpu::{kick_signal, StopReason, VcpuReply, VcpuRequest};

/// An event for the main thread.
pub enum VmmEvent {
    /// The VM must stop (guest reset, failure, shutdown request).
    Stop(StopReason),
    /// An API request; the answer goes back on `reply`.
    Request {
        request: ApiRequest,
        reply: Sender<Result<serde_json::Value, String>>,
    },
}

/// Where a snapshot image goes.
pub enum SnapshotTarget {
    /// A file, written atomically (temporary file, fsync, rename).
    Path(PathBuf),
    /// A stream (the API response body), written as it is produced.
    Stream(Box<dyn Write + Send>),
}

/// `PUT /vm/snapshot` parameters.
pub struct SnapshotRequest {
    pub target: SnapshotTarget,
    /// End the VM once the image is safely written.
    pub stop: bool,
    /// "none", "zstd" or "zstd:LEVEL".
    pub compress: String,
    /// Leave the disk contents out and record its path and fingerprint.
    pub no_disk: bool,
}

pub enum ApiRequest {
    Pause,
    Resume,
    Snapshot(SnapshotRequest),
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("vCPU {0} has stopped (the VM is shutting down)")]
    Gone(usize),
    #[error("vCPU {0} did not pause within 10 s")]
    PauseTimeout(usize),
    #[error("vCPU {0}: {1}")]
    Vcpu(usize, String),
    #[error("vCPU {0} gave an unexpected answer")]
    Protocol(usize),
}

/// The main thread's end of one vCPU thread.
pub struct VcpuHandle {
    pub thread: JoinHandle<()>,
    pub requests: Sender<VcpuRequest>,
    pub replies: Receiver<VcpuReply>,
}

/// All vCPU threads of a VM, driven together.
pub struct VcpuSet {
    pub handles: Vec<VcpuHandle>,
    pub paused: bool,
}

impl VcpuSet {
    /// Takes every vCPU out of KVM_RUN and waits until each has finished
    /// its pending I/O and is waiting.
    pub fn pause(&mut self) -> Result<(), ControlError> {
        use vmm_sys_util::signal::Killable;
        if self.paused {
            return Ok(());
        }
        for (i, h) in self.handles.iter().enumerate() {
            h.requests
                .send(VcpuRequest::Pause)
                .map_err(|_| ControlError::Gone(i))?;
        }
        for (i, h) in self.handles.iter().enumerate() {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                // A signal that lands just before KVM_RUN is lost, so kick
                // until the thread answers.
                let _ = h.thread.kill(kick_signal());
                match h.replies.recv_timeout(Duration::from_millis(2)) {
                    Ok(VcpuReply::Paused) => break,
                    Ok(VcpuReply::Error(e)) => return Err(ControlError::Vcpu(i, e)),
                    Ok(_) => return Err(ControlError::Protocol(i)),
                    Err(RecvTimeoutError::Disconnected) => return Err(ControlError::Gone(i)),
                    Err(RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                        return Err(ControlError::PauseTimeout(i))
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                }
            }
        }
        self.paused = true;
        Ok(())
    }

    /// Reads every (paused) vCPU's KVM state.
    pub fn save(&self) -> Result<Vec<VcpuState>, ControlError> {
        let mut out = Vec::with_capacity(self.handles.len());
        for (i, h) in self.handles.iter().enumerate() {
            h.requests
                .send(VcpuRequest::Save)
                .map_err(|_| ControlError::Gone(i))?;
            match h.replies.recv() {
                Ok(VcpuReply::State(s)) => out.push(*s),
                Ok(VcpuReply::Error(e)) => return Err(ControlError::Vcpu(i, e)),
                Ok(_) => return Err(ControlError::Protocol(i)),
                Err(_) => return Err(ControlError::Gone(i)),
            }
        }
        Ok(out)
    }

    /// Lets every vCPU run again.
    pub fn resume(&mut self) -> Result<(), ControlError> {
        if !self.paused {
            return Ok(());
        }
        for (i, h) in self.handles.iter().enumerate() {
            h.requests
                .send(VcpuRequest::Resume)
                .map_err(|_| ControlError::Gone(i))?;
        }
        for (i, h) in self.handles.iter().enumerate() {
            match h.replies.recv() {
                Ok(VcpuReply::Resumed) => {}
                Ok(_) => return Err(ControlError::Protocol(i)),
                Err(_) => return Err(ControlError::Gone(i)),
            }
        }
        self.paused = false;
        Ok(())
    }

    /// Ends every vCPU thread (the caller has set the shared exit flag).
    pub fn stop(self) {
        use vmm_sys_util::signal::Killable;
        for h in self.handles {
            let _ = h.requests.send(VcpuRequest::Exit);
            let deadline = Instant::now() + Duration::from_secs(5);
            while !h.thread.is_finished() && Instant::now() < deadline {
                let _ = h.thread.kill(kick_signal());
                std::thread::sleep(Duration::from_millis(2));
            }
            if h.thread.is_finished() {
                let _ = h.thread.join();
            } else {
                log::warn!("a vCPU thread did not stop within 5 s");
            }
        }
    }
}
