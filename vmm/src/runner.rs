//! Runs a machine to its end: starts it, serves API requests against it on
//! the main thread, and reports how it ended.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::{ApiError, ApiServer, VmInfo};
use crate::boot::VmConfig;
use crate::device_manager::{DeviceManager, RestoreOverrides};
use crate::events::{ApiFailure, ApiRequest, SnapshotRequest, StopReason, VmEvent};
use crate::image::{self, ImageError};
use crate::machine::{Lifecycle, Machine, MachineError};
use crate::terminal::RawTerminal;
use crate::timeline::Timeline;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error("cannot start the API server")]
    Api(#[source] ApiError),
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    #[error("the guest stopped: {0}")]
    GuestShutdown(String),
    #[error("{0}")]
    Failed(String),
    #[error("the guest rebooted without reporting the command's exit status (did it panic? see the console output above)")]
    NoExitStatus,
}

#[derive(Debug, thiserror::Error)]
enum SnapshotError {
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error(transparent)]
    Image(#[from] ImageError),
}

/// How a VM that ran to its end finished.
pub struct Finished {
    /// The exit status `vmm` should end with.
    pub status: i32,
    /// Boot milestones as one JSON line.
    pub timings: String,
}

/// Boots the VM and runs it until the guest stops.
pub fn run(cfg: VmConfig, start: Instant) -> Result<Finished, RunError> {
    let timeline = Arc::new(Timeline::new(start));
    let (events_tx, events_rx) = mpsc::channel();
    let machine = Machine::boot(
        &cfg,
        Box::new(std::io::stdout()),
        events_tx.clone(),
        timeline,
    )?;
    run_machine(
        machine,
        events_tx,
        events_rx,
        cfg.api_sock.as_deref(),
        start,
    )
}

/// Restores the VM in the image `from` and runs it until the guest stops.
pub fn restore(
    from: Box<dyn Read>,
    disk_dir: &Path,
    overrides: &RestoreOverrides,
    api_sock: Option<&Path>,
    start: Instant,
) -> Result<Finished, RunError> {
    let timeline = Arc::new(Timeline::new(start));
    let (events_tx, events_rx) = mpsc::channel();
    let machine = Machine::restore(
        from,
        disk_dir,
        overrides,
        Box::new(std::io::stdout()),
        events_tx.clone(),
        timeline,
    )?;
    log::info!("restored in {:?}", start.elapsed());
    run_machine(machine, events_tx, events_rx, api_sock, start)
}

/// Runs a built (booted or restored) machine until it stops, serving the API.
fn run_machine(
    mut machine: Machine,
    events_tx: Sender<VmEvent>,
    events_rx: Receiver<VmEvent>,
    api_sock: Option<&Path>,
    start: Instant,
) -> Result<Finished, RunError> {
    let config = machine.config().clone();
    let _api = match api_sock {
        Some(path) => Some(
            ApiServer::start(
                path,
                VmInfo {
                    vcpus: config.vcpus,
                    mem_mib: config.mem_mib,
                    kernel: config.kernel.clone(),
                    rootfs: machine
                        .disks()
                        .first()
                        .map(|(_, p)| p.display().to_string()),
                    started: start,
                },
                events_tx,
            )
            .map_err(RunError::Api)?,
        ),
        None => {
            drop(events_tx);
            None
        }
    };
    let _terminal = RawTerminal::enter_if_tty();
    let console_done = Arc::new(AtomicBool::new(false));
    spawn_console_input(machine.devices().clone(), console_done.clone())?;
    machine.resume()?;
    log::info!("vCPUs running {:?} after start", start.elapsed());

    let reason = loop {
        // The machine's vCPU threads hold senders until it shuts down, so
        // this fails only if they are all gone.
        match events_rx.recv() {
            Ok(VmEvent::Stop(reason)) => break reason,
            Ok(VmEvent::Request { request, reply }) => {
                let (answer, stop) = serve(&mut machine, request);
                let _ = reply.send(answer);
                if stop {
                    break StopReason::Requested;
                }
            }
            Err(_) => break StopReason::Failed("all vCPU threads vanished".into()),
        }
    };
    console_done.store(true, Ordering::Release);
    machine.shutdown();
    log::info!("VM stopped ({reason:?}) after {:?}", start.elapsed());

    let status = match reason {
        StopReason::GuestReset | StopReason::Requested => match machine.devices().exit_status() {
            Some(status) => i32::from(status),
            None if !config.expects_status => 0,
            None if matches!(reason, StopReason::Requested) => 0,
            None => return Err(RunError::NoExitStatus),
        },
        StopReason::GuestShutdown(msg) => return Err(RunError::GuestShutdown(msg)),
        StopReason::Failed(msg) => return Err(RunError::Failed(msg)),
    };
    Ok(Finished {
        status,
        timings: machine.timeline().report(),
    })
}

/// A refused lifecycle transition is the caller's conflict; anything else
/// failed.
fn failure(e: MachineError) -> ApiFailure {
    match e {
        MachineError::Transition { .. } => ApiFailure::Conflict(e.to_string()),
        e => ApiFailure::Failed(e.to_string()),
    }
}

fn snapshot_failure(e: SnapshotError) -> ApiFailure {
    match e {
        SnapshotError::Machine(e) => failure(e),
        e => ApiFailure::Failed(e.to_string()),
    }
}

/// Serves one API request; returns the answer and whether the VM must now
/// stop.
fn serve(
    machine: &mut Machine,
    request: ApiRequest,
) -> (Result<serde_json::Value, ApiFailure>, bool) {
    let state =
        |m: &Machine| serde_json::json!({ "state": format!("{:?}", m.lifecycle()).to_lowercase() });
    match request {
        ApiRequest::Pause => (
            machine.pause().map(|()| state(machine)).map_err(failure),
            false,
        ),
        ApiRequest::Resume => (
            machine.resume().map(|()| state(machine)).map_err(failure),
            false,
        ),
        ApiRequest::Snapshot(req) => {
            let was_running = machine.lifecycle() == Lifecycle::Running;
            let stop = req.options.stop;
            if was_running {
                if let Err(e) = machine.pause() {
                    return (Err(failure(e)), false);
                }
            }
            let result = snapshot(machine, req);
            // The VM survives a failed snapshot; after a good one it carries
            // on unless asked to stop, or stays paused if it was.
            let stop_now = stop && result.is_ok();
            if !stop_now && was_running {
                if let Err(e) = machine.resume() {
                    log::error!("cannot resume the VM after a snapshot: {e}");
                    return (result.map_err(snapshot_failure), true);
                }
            }
            (result.map_err(snapshot_failure), stop_now)
        }
    }
}

/// Saves a paused machine's state and writes its image.
fn snapshot(machine: &Machine, req: SnapshotRequest) -> Result<serde_json::Value, SnapshotError> {
    let t0 = Instant::now();
    let state = machine.save_state()?;
    let capture_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let written = image::write(
        &state,
        machine.ram(),
        &machine.disks(),
        &req.options,
        req.target,
    )?;
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    log::info!(
        "snapshot {} written to {}: {} bytes in {ms:.0} ms",
        written.image_id,
        written.destination,
        written.summary.bytes
    );
    Ok(serde_json::json!({
        "image_id": written.image_id,
        "destination": written.destination,
        "bytes": written.summary.bytes,
        "memory_pages": written.summary.memory.pages,
        "memory_zero_pages": written.summary.memory.zero_pages,
        "state_capture_ms": capture_ms,
        "total_ms": ms,
    }))
}

/// Copies this process's stdin to the guest's serial port until `done`.
fn spawn_console_input(devices: Arc<DeviceManager>, done: Arc<AtomicBool>) -> Result<(), RunError> {
    std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 64];
            while !done.load(Ordering::Acquire) {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut sent = 0;
                while sent < n && !done.load(Ordering::Acquire) {
                    let took = devices.serial_input(&buf[sent..n]);
                    sent += took;
                    if took == 0 {
                        // The guest has not drained the FIFO yet.
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(RunError::Thread)
}
