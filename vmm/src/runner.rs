//! Runs a machine to its end: starts it, serves API requests against it on
//! the main thread, and reports how it ended.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::api::{ApiError, ApiServer, VmInfo};
use crate::boot::VmConfig;
use crate::device_manager::{DeviceManager, RestoreOverrides};
use guest_abi::agent::{Reply, Request, StartRequest};

use crate::agent::{AgentChannel, AgentError};
use crate::background::{self, BackgroundWrite};
use crate::checkpoint::{self, checkpoint_path};
use crate::events::{
    ApiFailure, ApiRequest, SnapshotOptions, SnapshotRequest, SnapshotTarget, StopReason, VmEvent,
};
use crate::image::{self, ImageError, ImageOutput, OverlayMode};
use crate::machine::{Lifecycle, Machine, MachineError, RestoreHost};
use crate::sandbox::{Allow, Sandbox};
use crate::terminal::RawTerminal;
use crate::timeline::Timeline;
use crate::warm::{WarmCache, WarmKey};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error("cannot start the API server")]
    Api(#[source] ApiError),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
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
    #[error("--parent {path}: {reason}")]
    Parent { path: String, reason: String },
    #[error(transparent)]
    Background(#[from] crate::background::BackgroundError),
}

/// How a VM that ran to its end finished.
pub struct Finished {
    /// The exit status `vmm` should end with.
    pub status: i32,
    /// Boot milestones as one JSON line.
    pub timings: String,
}

/// How a running VMM is controlled, beyond its machine.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Serve the API on this socket.
    pub api_sock: Option<PathBuf>,
    /// The VM's name (`--name`), reported by the API.
    pub name: Option<String>,
    /// The container image it runs (`--image`), reported by the API.
    pub image: Option<String>,
    /// Where checkpoints asked for by the guest, a signal or
    /// `PUT /vm/checkpoint` go; without it they are refused.
    pub snapshot_dir: Option<PathBuf>,
    /// Checkpoint into `snapshot_dir` when this signal arrives.
    pub checkpoint_on: Option<i32>,
    /// The command goes to the agent once it is ready (a guest booted
    /// with `vmm.start=agent`, or restored from a warm image).
    pub start: Option<StartPlan>,
    /// What the VMM may still touch once its files are open (the API
    /// socket's directory, the snapshot directory); the machine adds its
    /// own sockets.
    pub sandbox: Sandbox,
    /// How `vmm restore` reports a restore, on stderr.
    pub restore_report: Report,
    /// `vmm restore --track`: log the pages written from the restore on.
    pub track_restored: bool,
}

/// A one-line result on stderr: none, for a person, or JSON for tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    Quiet,
    Line,
    Json,
}

/// The container's main process, handed to the agent when it is ready.
#[derive(Debug, Clone)]
pub struct StartPlan {
    pub process: StartRequest,
    /// First save a warm image of the waiting guest in this cache.
    pub save_warm: Option<(WarmCache, WarmKey)>,
}

/// How long the agent may take to take the command.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Boots the VM and runs it until the guest stops.
pub fn run(cfg: VmConfig, opts: &RunOptions, start: Instant) -> Result<Finished, RunError> {
    let timeline = Arc::new(Timeline::new(start));
    let (events_tx, events_rx) = mpsc::channel();
    let mut sandbox = opts.sandbox.clone();
    if let Some((cache, _)) = opts.start.as_ref().and_then(|p| p.save_warm.as_ref()) {
        sandbox.allow(cache.dir(), Allow::Images);
    }
    let machine = Machine::boot(
        &cfg,
        &sandbox,
        Box::new(std::io::stdout()),
        events_tx.clone(),
        timeline,
    )?;
    run_machine(machine, events_tx, events_rx, opts, start)
}

/// Why a warm start did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WarmStartError {
    /// The image could not be restored; nothing of the guest ran, so a cold
    /// boot can take over.
    #[error("the warm image {path} cannot be restored")]
    Unusable {
        path: String,
        #[source]
        source: MachineError,
    },
    #[error("cannot open the warm image {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The restored VM ran and failed.
    #[error(transparent)]
    Run(#[from] RunError),
}

/// Restores the warm image at `image` (the guest's agent waits for its
/// command), hands it `opts.start`'s command and runs it until it stops.
/// Its disk overlay lives, unnamed, in the temporary directory.
pub fn warm_start(
    image: &Path,
    opts: &RunOptions,
    start: Instant,
) -> Result<Finished, WarmStartError> {
    let unusable = |source: MachineError| WarmStartError::Unusable {
        path: image.display().to_string(),
        source,
    };
    let file = std::fs::File::open(image).map_err(|source| WarmStartError::Open {
        path: image.display().to_string(),
        source,
    })?;
    let timeline = Arc::new(Timeline::new(start));
    let (events_tx, events_rx) = mpsc::channel();
    let machine = Machine::restore(
        Box::new(file),
        &image.display().to_string(),
        &RestoreHost {
            disk_dir: &std::env::temp_dir(),
            overrides: &RestoreOverrides::default(),
            sandbox: &opts.sandbox,
            lazy: None,
        },
        Box::new(std::io::stdout()),
        events_tx.clone(),
        timeline,
    )
    .map_err(unusable)?;
    log::info!("warm image restored in {:?}", start.elapsed());
    Ok(run_machine(machine, events_tx, events_rx, opts, start)?)
}

/// Restores the VM in the image `from` and runs it until the guest stops.
/// `source` names the image (a path, or `-`) for the restored guest;
/// `lazy`, the image's file, lets its memory arrive as it is touched.
pub fn restore(
    from: Box<dyn Read>,
    lazy: Option<std::fs::File>,
    source: &str,
    disk_dir: &Path,
    overrides: &RestoreOverrides,
    opts: &RunOptions,
    start: Instant,
) -> Result<Finished, RunError> {
    let timeline = Arc::new(Timeline::new(start));
    let (events_tx, events_rx) = mpsc::channel();
    let mut machine = Machine::restore(
        from,
        source,
        &RestoreHost {
            disk_dir,
            overrides,
            sandbox: &opts.sandbox,
            lazy,
        },
        Box::new(std::io::stdout()),
        events_tx.clone(),
        timeline,
    )?;
    // The VM's memory is the image's: an increment may go on top of it.
    if let Some(id) = machine
        .restored_image()
        .and_then(snapshot::format::id_from_hex)
        .filter(|_| opts.track_restored)
    {
        if let Err(e) = machine.set_last_image(id) {
            log::warn!(
                "{}: the first snapshot of this VM cannot be an increment",
                crate::error_chain(&e)
            );
        }
    }
    log::info!("restored in {:?}", start.elapsed());
    report_restore(&machine, source, start, opts.restore_report);
    run_machine(machine, events_tx, events_rx, opts, start)
}

/// `vmm restore`'s result line, before the guest's console has its say.
fn report_restore(machine: &Machine, source: &str, start: Instant, report: Report) {
    let config = machine.config();
    let id = machine.restored_image().unwrap_or("?");
    let lazy = machine.memory_fill().is_some();
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    let line = match report {
        Report::Quiet => return,
        Report::Json => serde_json::json!({
            "image_id": id,
            "source": source,
            "mem_mib": config.mem_mib,
            "vcpus": config.vcpus,
            "restore_ms": ms,
            "memory": if lazy { "on demand" } else { "read" },
        })
        .to_string(),
        Report::Line => format!(
            "vmm: restored {id} from {source}: {} MiB of memory{}, {} vCPU{}, in {ms:.0} ms",
            config.mem_mib,
            if lazy { " (arriving on demand)" } else { "" },
            config.vcpus,
            if config.vcpus == 1 { "" } else { "s" },
        ),
    };
    let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("{line}\n").as_bytes());
}

/// Runs a built (booted or restored) machine until it stops, serving the API.
fn run_machine(
    mut machine: Machine,
    events_tx: Sender<VmEvent>,
    events_rx: Receiver<VmEvent>,
    opts: &RunOptions,
    start: Instant,
) -> Result<Finished, RunError> {
    let config = machine.config().clone();
    let state = Arc::new(Mutex::new("starting"));
    let progress = Arc::new(image::Progress::default());
    if let Some(signal) = opts.checkpoint_on {
        checkpoint::on_signal(signal, events_tx.clone()).map_err(RunError::Checkpoint)?;
    }
    let _api = match &opts.api_sock {
        Some(path) => Some(
            ApiServer::start(
                path,
                VmInfo {
                    vcpus: config.vcpus,
                    mem_mib: config.mem_mib,
                    kernel: config.kernel.clone(),
                    rootfs: machine
                        .disks()?
                        .first()
                        .map(|(_, d)| d.path().display().to_string()),
                    started: start,
                    name: opts.name.clone(),
                    image: opts.image.clone(),
                    state: state.clone(),
                    progress: progress.clone(),
                    memory_fill: machine.memory_fill_monitor(),
                },
                events_tx,
                machine.agent().clone(),
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
    // Every thread has started: the main thread confines itself too, to
    // running the VM's lifecycle and writing its images.
    crate::seccomp::confine_this_thread(crate::seccomp::ThreadKind::Main)?;
    machine.resume()?;
    VmInfo::set_state(&state, lifecycle_name(machine.lifecycle()));
    log::info!("vCPUs running {:?} after start", start.elapsed());

    let mut pending_start = opts.start.clone();
    let reason = loop {
        // The machine's vCPU threads hold senders until it shuts down, so
        // this fails only if they are all gone.
        match events_rx.recv() {
            Ok(VmEvent::Stop(reason)) => break reason,
            Ok(VmEvent::Request { request, reply }) => {
                if matches!(
                    request,
                    ApiRequest::Snapshot(_) | ApiRequest::Checkpoint { .. }
                ) {
                    VmInfo::set_state(&state, "snapshotting");
                }
                let (answer, stop) = serve(
                    &mut machine,
                    request,
                    opts.snapshot_dir.as_deref(),
                    &progress,
                );
                VmInfo::set_state(&state, lifecycle_name(machine.lifecycle()));
                let _ = reply.send(answer);
                if stop {
                    break StopReason::Requested;
                }
            }
            Ok(VmEvent::AgentReady) => {
                if let Some(plan) = pending_start.take() {
                    if let Err(why) = start_command(&mut machine, plan, start) {
                        break StopReason::Failed(why);
                    }
                }
            }
            Err(_) => break StopReason::Failed("all vCPU threads vanished".into()),
        }
    };
    console_done.store(true, Ordering::Release);
    machine.shutdown();
    log::info!("VM stopped ({reason:?}) after {:?}", start.elapsed());
    if let Some(fill) = machine.memory_fill() {
        log::info!("lazy restore: {fill:?}");
    }

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

/// The lifecycle state as the API reports it.
fn lifecycle_name(l: Lifecycle) -> &'static str {
    match l {
        Lifecycle::Created => "created",
        Lifecycle::Running => "running",
        Lifecycle::Paused => "paused",
        Lifecycle::Exited => "exited",
    }
}

/// Hands the waiting agent its command, after saving a warm image of the
/// guest as it waits if the plan says so (a failed save is only logged: it
/// costs the next run a boot, not this one its command).
fn start_command(machine: &mut Machine, plan: StartPlan, start: Instant) -> Result<(), String> {
    if let Some((cache, key)) = &plan.save_warm {
        save_warm(machine, cache, key, start)?;
    }
    let t0 = Instant::now();
    match machine
        .agent()
        .call(Request::Start(plan.process), START_TIMEOUT)
    {
        Ok(Reply::Started) => {
            log::info!(
                "command handed to the agent in {:?}, {:?} after start",
                t0.elapsed(),
                start.elapsed()
            );
            Ok(())
        }
        Ok(other) => Err(format!("the guest agent answered {other:?} to the command")),
        Err(e) => Err(format!("the guest agent did not take the command: {e}")),
    }
}

/// Pauses the machine, writes its warm image into `cache`, resumes it.
/// Only a failure to resume is the run's failure.
fn save_warm(
    machine: &mut Machine,
    cache: &WarmCache,
    key: &WarmKey,
    start: Instant,
) -> Result<(), String> {
    let boot_ms = start.elapsed().as_millis() as u64;
    let t0 = Instant::now();
    let path = cache.image_path(key);
    machine
        .pause()
        .map_err(|e| format!("cannot pause for the warm image: {e}"))?;
    let written = (|| -> Result<_, SnapshotError> {
        let output = ImageOutput::open(SnapshotTarget::Path(path.clone()))?;
        let state = machine.save_state()?;
        let disks = machine.disks()?;
        let how = image::WriteHow {
            increment: None,
            overlays: OverlayMode::Reference,
            quiesced: false,
            progress: None,
            kept_disks: &[],
        };
        Ok(image::write(
            &state,
            machine.ram(),
            &disks,
            &SnapshotOptions::default(),
            &how,
            output,
        )?)
    })();
    machine
        .resume()
        .map_err(|e| format!("cannot resume after the warm image: {e}"))?;
    match written.map_err(|e| e.to_string()).and_then(|w| {
        cache.record(key, boot_ms).map_err(|e| e.to_string())?;
        Ok(w)
    }) {
        Ok(w) => {
            log::info!(
                "warm image {} saved: {} bytes in {:?} (the next run starts from it)",
                path.display(),
                w.summary.bytes,
                t0.elapsed()
            );
            let removed = cache.prune(crate::warm::DEFAULT_MAX_BYTES);
            for r in removed {
                log::info!("warm cache: removed {} to stay within its bound", r.name);
            }
        }
        Err(e) => log::warn!("no warm image saved (the next run boots again): {e}"),
    }
    Ok(())
}

/// A refused lifecycle transition is the caller's conflict; anything else
/// failed.
fn failure(e: MachineError) -> ApiFailure {
    match e {
        MachineError::Transition { .. } => ApiFailure::Conflict(e.to_string()),
        e => ApiFailure::Failed(e.to_string()),
    }
}

/// Extra time for an agent call whose work has a bound of its own.
const AGENT_SLACK: Duration = Duration::from_secs(1);
/// How long a thaw may take.
const THAW_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether `e` comes from a permission the file system refused.
fn denied(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

fn snapshot_failure(e: SnapshotError) -> ApiFailure {
    match e {
        SnapshotError::Machine(e @ MachineError::NotParent { .. }) => {
            ApiFailure::Conflict(e.to_string())
        }
        SnapshotError::Machine(e) => failure(e),
        e @ SnapshotError::Parent { .. } => ApiFailure::BadRequest(e.to_string()),
        e => ApiFailure::Failed(e.to_string()),
    }
}

/// Serves one API request; returns the answer and whether the VM must now
/// stop.
fn serve(
    machine: &mut Machine,
    request: ApiRequest,
    snapshot_dir: Option<&Path>,
    progress: &image::Progress,
) -> (Result<serde_json::Value, ApiFailure>, bool) {
    let state = |m: &Machine| serde_json::json!({ "state": lifecycle_name(m.lifecycle()) });
    match request {
        ApiRequest::Pause => (
            machine.pause().map(|()| state(machine)).map_err(failure),
            false,
        ),
        ApiRequest::Resume => (
            machine.resume().map(|()| state(machine)).map_err(failure),
            false,
        ),
        ApiRequest::Snapshot(req) => checkpoint(machine, req, progress),
        ApiRequest::Checkpoint { name } => {
            let Some(dir) = snapshot_dir else {
                return (
                    Err(ApiFailure::Conflict(
                        "no snapshot directory: start the VM with --snapshot-dir DIR to let it checkpoint itself".into(),
                    )),
                    false,
                );
            };
            let path = match checkpoint_path(dir, name.as_deref()) {
                Ok(p) => p,
                Err(e) => return (Err(ApiFailure::BadRequest(e.to_string())), false),
            };
            let req = SnapshotRequest {
                target: SnapshotTarget::Path(path),
                options: SnapshotOptions::default(),
            };
            checkpoint(machine, req, progress)
        }
    }
}

/// Takes a snapshot the whole way: the agent readies the guest's programs
/// and freezes its filesystems, the VM pauses, its state is captured and
/// written, the VM carries on (unless asked to stop) and the filesystems
/// thaw. Returns the answer and whether the VM must now stop.
fn checkpoint(
    machine: &mut Machine,
    req: SnapshotRequest,
    progress: &image::Progress,
) -> (Result<serde_json::Value, ApiFailure>, bool) {
    let was_running = machine.lifecycle() == Lifecycle::Running;
    let stop = req.options.stop;
    // A parent that cannot be is refused before the guest is disturbed.
    let parent = match parent_of(machine, &req) {
        Ok(p) => p,
        Err(e) => return (Err(snapshot_failure(e)), false),
    };
    let output = match ImageOutput::open(req.target) {
        Ok(o) => o,
        Err(e) => {
            if let (Some(dirs), true) = (crate::sandbox::image_dirs(), denied(&e)) {
                let dirs: Vec<_> = dirs.iter().map(|d| d.display().to_string()).collect();
                let msg = format!(
                    "{}: this VMM writes images only into {} (Landlock; --snapshot-dir DIR allows one, --no-landlock lifts it)",
                    crate::error_chain(&e),
                    if dirs.is_empty() { "none".into() } else { dirs.join(", ") },
                );
                return (Err(ApiFailure::Forbidden(msg)), false);
            }
            return (Err(snapshot_failure(e.into())), false);
        }
    };
    // A VM still bringing its memory in from a lazy restore could only be
    // written with a full pause: let the fill finish first, as it runs.
    let fill_wait_ms = if was_running && !stop && !req.options.full_pause {
        wait_for_memory(machine, FILL_WAIT)
    } else {
        0.0
    };
    let t0 = Instant::now();
    // A paused guest cannot answer: only a running one is quiesced.
    let (frozen, prepare_ms) = if was_running {
        quiesce(machine.agent(), req.options.quiesce_timeout_ms)
    } else {
        (false, 0.0)
    };
    let quiesce_ms = ms_since(t0);
    // A running VM that goes on afterwards pauses only to be captured,
    // unless the image could not be taken at that instant.
    let full_pause = if !was_running || stop {
        None
    } else {
        full_pause_reason(machine, &req.options)
    };
    let background = was_running && !stop && full_pause.is_none();
    let t_pause = Instant::now();
    if was_running {
        if let Err(e) = machine.pause() {
            thaw(machine.agent(), frozen);
            return (Err(failure(e)), false);
        }
    }
    let pausing_ms = ms_since(t_pause);
    let track = req.options.track || parent.is_some();
    let started = snapshot(
        machine,
        output,
        &req.options,
        parent.as_ref(),
        frozen,
        background,
        progress,
    );
    let mut pause_ms = ms_since(t_pause);
    // What happened, which may not be what was meant.
    let background = matches!(started, Ok(Started::Writing(_)));
    let full_pause = match &started {
        Ok(Started::Written {
            fell_back: Some(why),
            ..
        }) => Some(why.clone()),
        _ => full_pause,
    };
    // After a write in the background has started, or a failed snapshot,
    // or a whole one, the VM carries on unless asked to stop, or stays
    // paused if it was.
    let stop_now = stop && started.is_ok();
    let t_thaw = Instant::now();
    if !stop_now && was_running {
        if let Err(e) = machine.resume() {
            log::error!("cannot resume the VM after a snapshot: {e}");
            if let Ok(Started::Writing(w)) = started {
                let _ = w.wait(machine, progress);
            }
            return (Err(failure(e)), true);
        }
        pause_ms = ms_since(t_pause);
        thaw(machine.agent(), frozen);
    }
    let resume_thaw_ms = ms_since(t_thaw);
    let mut result = started.and_then(|s| finish_snapshot(machine, s, track, progress));
    if let Ok(v) = &mut result {
        v["parent_id"] = parent.map(|(id, _)| snapshot::format::id_hex(&id)).into();
        v["prepare_ms"] = prepare_ms.into();
        v["freeze_ms"] = (quiesce_ms - prepare_ms).into();
        v["resume_thaw_ms"] = resume_thaw_ms.into();
        v["quiesced"] = frozen.into();
        v["pause_ms"] = pause_ms.into();
        v["pausing_ms"] = pausing_ms.into();
        v["fill_wait_ms"] = fill_wait_ms.into();
        v["background"] = background.into();
        if let Some(why) = full_pause {
            v["full_pause"] = why.into();
        }
        log::info!(
            "checkpoint: prepare {prepare_ms:.1} ms, freeze {:.1} ms, paused {pause_ms:.1} ms (capture {:.1} ms), written in {:.1} ms{}, resume+thaw {resume_thaw_ms:.1} ms",
            quiesce_ms - prepare_ms,
            v["state_capture_ms"].as_f64().unwrap_or(0.0),
            v["total_ms"].as_f64().unwrap_or(0.0),
            if background { " by a child while the VM ran" } else { "" },
        );
    }
    (result.map_err(snapshot_failure), stop_now)
}

/// How long a snapshot of a running VM waits for a lazy restore's memory.
const FILL_WAIT: Duration = Duration::from_secs(30);

/// Waits, at most `limit`, until a lazily restored machine has all of its
/// memory (at once if it was not restored lazily). The time it waited, ms.
fn wait_for_memory(machine: &Machine, limit: Duration) -> f64 {
    let t0 = Instant::now();
    machine.wait_for_memory(limit);
    let ms = ms_since(t0);
    if ms > 1.0 {
        log::info!("snapshot: waited {ms:.0} ms for the lazy restore to bring in all of memory");
    }
    ms
}

/// Why a snapshot of a running VM that goes on must keep it paused for the
/// whole write, if it must: the default is to pause for the capture only
/// and write from a forked copy (`crate::background`).
fn full_pause_reason(machine: &Machine, options: &SnapshotOptions) -> Option<String> {
    if options.full_pause {
        return Some("asked for (--full-pause)".into());
    }
    // The disk's fingerprint is read from the file itself, which the
    // running VM would go on changing (its contents, in the image, are
    // read as they were at the pause: `Machine::keep_disks_for_reader`).
    if options.no_disk && machine.disks().map_or(true, |d| !d.is_empty()) {
        return Some("--no-disk fingerprints the disk, which the VM would go on writing".into());
    }
    // A fork does not carry the lazy restore's userfaultfd: pages not yet
    // in would read as zeros in the child.
    if machine.memory_fill().is_some_and(|f| !f.done) {
        return Some(format!(
            "its memory was still arriving from the image it was restored from, {} s after the snapshot was asked for",
            FILL_WAIT.as_secs()
        ));
    }
    None
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Asks the agent, if one is connected, to get the guest's programs ready
/// and to freeze its filesystems, each within `timeout_ms`. Returns
/// whether they are frozen, and the time the programs took (ms).
fn quiesce(agent: &AgentChannel, timeout_ms: u64) -> (bool, f64) {
    if timeout_ms == 0 {
        return (false, 0.0);
    }
    if !agent.is_connected() {
        log::info!("snapshot: no guest agent connected; the disks are not quiesced");
        return (false, 0.0);
    }
    let timeout = Duration::from_millis(timeout_ms);
    let t0 = Instant::now();
    let ms = u32::try_from(timeout_ms).unwrap_or(u32::MAX);
    match agent.call(Request::Prepare { timeout_ms: ms }, timeout + AGENT_SLACK) {
        Ok(Reply::Prepared { notified, ready }) if notified > 0 => {
            log::info!(
                "snapshot: {ready} of {notified} registered programs ready in {:?}",
                t0.elapsed()
            );
        }
        Ok(_) => {}
        Err(e) => log::warn!("snapshot: the guest's programs were not told: {e}"),
    }
    let prepare_ms = ms_since(t0);
    let t1 = Instant::now();
    let frozen = match agent.call(Request::Freeze, timeout) {
        Ok(Reply::Frozen { filesystems }) => {
            log::info!("snapshot: froze {filesystems:?} in {:?}", t1.elapsed());
            true
        }
        Ok(other) => {
            log::warn!("snapshot: the agent answered {other:?} to freeze; not quiesced");
            false
        }
        Err(e) => {
            log::warn!("snapshot: going on without quiescing the disks: {e}");
            // A freeze that lands late must not stay.
            if matches!(e, AgentError::Timeout(_)) {
                thaw(agent, true);
            }
            false
        }
    };
    (frozen, prepare_ms)
}

fn thaw(agent: &AgentChannel, frozen: bool) {
    if !frozen {
        return;
    }
    if let Err(e) = agent.call(Request::Thaw, THAW_TIMEOUT) {
        log::error!("cannot thaw the guest's filesystems: {e}");
    }
}

/// The parent `req` names for an increment: its id (given, or read from
/// the file) and its absolute path, checked against the machine's last
/// image and against the destination (an increment must not replace its
/// own parent).
fn parent_of(
    machine: &Machine,
    req: &SnapshotRequest,
) -> Result<Option<([u8; 16], PathBuf)>, SnapshotError> {
    let options = &req.options;
    let Some(path) = &options.parent else {
        return Ok(None);
    };
    let bad = |reason: String| SnapshotError::Parent {
        path: path.display().to_string(),
        reason,
    };
    if !path.is_absolute() {
        return Err(bad("the VMM needs an absolute path".into()));
    }
    let id = match &options.parent_id {
        Some(hex) => snapshot::format::id_from_hex(hex)
            .ok_or_else(|| bad(format!("{hex:?} is not an image id")))?,
        None => {
            image::read_header(path)
                .map_err(|e| bad(crate::error_chain(&e)))?
                .image_id
        }
    };
    machine.check_parent(&id)?;
    if let SnapshotTarget::Path(out) = &req.target {
        if crate::image::same_file(out, path) {
            return Err(bad(
                "it is where the increment would go: an increment must not replace its parent"
                    .into(),
            ));
        }
    }
    Ok(Some((id, path.clone())))
}

/// A snapshot once the paused machine is captured.
enum Started {
    /// Written whole while the VM was paused.
    Written {
        written: image::Written,
        capture_ms: f64,
        /// Capture and write.
        total_ms: f64,
        /// Why a write meant for the background was not.
        fell_back: Option<String>,
    },
    /// Being written by a child process while the VM runs.
    Writing(Writing),
}

/// An image a forked child is writing.
struct Writing {
    write: BackgroundWrite,
    /// The temporary file the child writes, to remove if it dies.
    tmp: Option<PathBuf>,
    capture_ms: f64,
    fork_ms: f64,
    t0: Instant,
}

impl Writing {
    /// Waits for the child and ends the disks' logs: what it wrote, and
    /// how many blocks the disks kept for it.
    fn wait(
        self,
        machine: &Machine,
        progress: &image::Progress,
    ) -> Result<(image::Written, u64), background::BackgroundError> {
        let result = self.write.wait(progress);
        let kept = machine.release_disks();
        if let (Some(tmp), Err(background::BackgroundError::Vanished { .. })) = (&self.tmp, &result)
        {
            let _ = std::fs::remove_file(tmp);
        }
        result.map(|w| (w, kept))
    }
}

/// Saves a paused machine's state and writes its image, or with
/// `background` forks a child that writes it: whole, or with `parent` the
/// pages written since that image. From here on the machine's log counts
/// the writes since this image (if tracking, see [`finish_snapshot`]).
fn snapshot(
    machine: &mut Machine,
    output: ImageOutput,
    options: &SnapshotOptions,
    parent: Option<&([u8; 16], PathBuf)>,
    quiesced: bool,
    background: bool,
    progress: &image::Progress,
) -> Result<Started, SnapshotError> {
    let t0 = Instant::now();
    let state = machine.save_state()?;
    let dirty = match parent {
        Some((id, _)) => Some(machine.dirty_since(id)?),
        None => None,
    };
    let disks = machine.disks()?;
    // The child reads the disks while the VM writes them: their devices
    // keep what they overwrite for it.
    let (kept_disks, fell_back) = match background {
        false => (Vec::new(), None),
        true => match machine.keep_disks_for_reader() {
            Ok(logs) => (logs, None),
            Err(e) => (Vec::new(), Some(crate::error_chain(&e))),
        },
    };
    // Tracking costs the guest (small pages while logged): only when asked
    // for, and on from an increment on.
    if options.track || parent.is_some() {
        if let Err(e) = machine.begin_image() {
            machine.release_disks();
            return Err(e.into());
        }
    }
    let capture_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let write = |output: ImageOutput, progress: &image::Progress| {
        let how = image::WriteHow {
            increment: parent
                .zip(dirty.as_ref())
                .map(|((parent_id, path), dirty)| image::Increment {
                    parent_id: *parent_id,
                    parent_path: path,
                    dirty,
                }),
            overlays: OverlayMode::Merged,
            quiesced,
            progress: Some(progress),
            kept_disks: &kept_disks,
        };
        image::write(&state, machine.ram(), &disks, options, &how, output)
    };
    let t_fork = Instant::now();
    let forked = if background && fell_back.is_none() {
        Some(background::fork())
    } else {
        None
    };
    match forked {
        None | Some(Err(_)) => {
            // Disks that cannot be kept or a writer that cannot be forked
            // (no memory, a process limit): the image is written with the
            // VM paused instead.
            let fell_back = forked.and_then(Result::err).map_or(fell_back, |e| {
                machine.release_disks();
                Some(crate::error_chain(&e))
            });
            if let Some(why) = &fell_back {
                log::warn!("snapshot: {why}; writing the image with the VM paused");
            }
            let written = write(output, progress);
            let written = written.inspect_err(|_| machine_abandon(machine, options, parent))?;
            Ok(Started::Written {
                written,
                capture_ms,
                total_ms: ms_since(t0),
                fell_back,
            })
        }
        Some(Ok(background::Forked::Child(child))) => {
            child.finish(|progress| write(output, progress).map_err(|e| crate::error_chain(&e)))
        }
        Some(Ok(background::Forked::Parent(write))) => Ok(Started::Writing(Writing {
            write,
            tmp: output.disown(),
            capture_ms,
            fork_ms: ms_since(t_fork),
            t0,
        })),
    }
}

/// The machine goes back to the image before: the one it was about to
/// write was not.
fn machine_abandon(
    machine: &mut Machine,
    options: &SnapshotOptions,
    parent: Option<&([u8; 16], PathBuf)>,
) {
    if options.track || parent.is_some() {
        machine.abandon_image();
    }
}

/// Waits for an image being written in the background, records it as the
/// machine's last (with `track`) or stops tracking, and answers.
fn finish_snapshot(
    machine: &mut Machine,
    started: Started,
    track: bool,
    progress: &image::Progress,
) -> Result<serde_json::Value, SnapshotError> {
    // In the background: the fork's time, and the disk blocks kept.
    let (written, capture_ms, ms, fork_ms) = match started {
        Started::Written {
            written,
            capture_ms,
            total_ms,
            ..
        } => (written, capture_ms, total_ms, None),
        Started::Writing(w) => {
            let (capture_ms, fork_ms, t0) = (w.capture_ms, w.fork_ms, w.t0);
            match w.wait(machine, progress) {
                Ok((written, kept)) => (written, capture_ms, ms_since(t0), Some((fork_ms, kept))),
                Err(e) => {
                    if track {
                        machine.abandon_image();
                    }
                    return Err(SnapshotError::Background(e));
                }
            }
        }
    };
    if track {
        machine.record_image(written.id);
    } else if let Err(e) = machine.stop_tracking() {
        log::warn!("{}", crate::error_chain(&e));
    }
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
        "fork_ms": fork_ms.map(|f| f.0),
        "disk_blocks_kept": fork_ms.map(|f| f.1),
        "total_ms": ms,
    }))
}

/// Copies this process's stdin to the guest's serial port until `done`.
fn spawn_console_input(devices: Arc<DeviceManager>, done: Arc<AtomicBool>) -> Result<(), RunError> {
    std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            if !crate::seccomp::confine_or_log(crate::seccomp::ThreadKind::Relay) {
                return;
            }
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
