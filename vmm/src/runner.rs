//! Builds a VM from a configuration, runs it to the end, and reports how it ended.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;

use crate::api::{ApiServer, VmInfo};
use crate::arch::cpuid::{self, CpuTemplate};
use crate::arch::{layout, loader, regs};
use crate::checkpoint;
use crate::control::{ApiRequest, VcpuHandle, VcpuSet, VmmEvent};
use crate::device_manager::{DeviceError, DeviceManager};
use crate::kvm::persist;
use crate::kvm::vcpu::{kick_signal, StopReason, Vcpu, VcpuControl, VcpuError, VcpuShared};
use crate::kvm::vm::{Vm, VmError};
use crate::terminal::RawTerminal;
use crate::timeline::Timeline;

/// What `vmm run` was asked to boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub rootfs: Option<PathBuf>,
    pub mem_mib: u64,
    pub vcpus: u8,
    /// Replaces the default kernel command line when set.
    pub cmdline: Option<String>,
    pub api_sock: Option<PathBuf>,
    /// The container command; empty for an interactive shell.
    pub command: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("--vcpus must be between 1 and {max} (got {got})")]
    Vcpus { got: u64, max: u8 },
    #[error("--mem must be between {min} and {max} MiB (got {got})")]
    Mem { got: u64, min: u64, max: u64 },
    #[error("kernel command line is {len} bytes; the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("rootfs {0} does not exist")]
    MissingRootfs(String),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Loader(#[from] loader::LoaderError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("cannot write boot tables into guest memory: {0}")]
    BootTables(String),
    #[error("cannot start the API server: {0}")]
    Api(String),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error("the guest stopped: {0}")]
    GuestShutdown(String),
    #[error("{0}")]
    Failed(String),
    #[error("the guest rebooted without reporting the command's exit status (did it panic? see the console output above)")]
    NoExitStatus,
}

impl VmConfig {
    pub fn validate(&self) -> Result<(), RunError> {
        if self.vcpus == 0 || self.vcpus > layout::MAX_VCPUS {
            return Err(RunError::Vcpus {
                got: u64::from(self.vcpus),
                max: layout::MAX_VCPUS,
            });
        }
        if self.mem_mib < layout::MIN_MEM_MIB || self.mem_mib > layout::MAX_MEM_MIB {
            return Err(RunError::Mem {
                got: self.mem_mib,
                min: layout::MIN_MEM_MIB,
                max: layout::MAX_MEM_MIB,
            });
        }
        if let Some(r) = &self.rootfs {
            if !r.exists() {
                return Err(RunError::MissingRootfs(r.display().to_string()));
            }
        }
        Ok(())
    }
}

/// The kernel command line: the caller's, or our default, plus device
/// declarations and the container command for the guest agent.
pub fn build_cmdline(
    cfg: &VmConfig,
    template: CpuTemplate,
    tsc_khz: Option<u32>,
    devices: &[String],
) -> Result<String, RunError> {
    let mut parts: Vec<String> = Vec::new();
    match &cfg.cmdline {
        Some(c) => parts.push(c.clone()),
        None => {
            parts.push(
                "console=ttyS0 reboot=k panic=1 8250.nr_uarts=1 \
                 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd \
                 mitigations=off nofsgsbase init_on_alloc=0 tsc=reliable"
                    .to_string(),
            );
            if let Some(khz) = tsc_khz {
                // The TSC frequency and loops_per_jiffy (HZ=100) skip calibrations
                // that an interpreted kernel cannot do against the PIT in time.
                parts.push(format!("tsc_early_khz={khz} lpj={}", u64::from(khz) * 10));
            }
            if template == CpuTemplate::Interpreted {
                // The interpreted timer tick costs about its own period: keep ticks rare.
                parts.push("nopv highres=off nohz=on".into());
            }
            parts.extend(cpuid::linux_clearcpuid(template));
            if !cfg.command.is_empty() {
                // Only the command's output on the console: no kernel
                // messages below KERN_CRIT (a panic still shows).
                parts.push("loglevel=2".into());
            }
            if cfg.rootfs.is_some() {
                parts.push("root=/dev/vda rw rootfstype=ext4 init=/sbin/vmm-agent".into());
            }
        }
    }
    parts.extend(devices.iter().cloned());
    if !cfg.command.is_empty() {
        let joined = cfg.command.join("\0");
        let enc = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(joined.as_bytes());
        parts.push(format!("-- vmm.cmd={enc}"));
    }
    let s = parts.join(" ");
    if s.len() >= layout::CMDLINE_MAX_SIZE {
        return Err(RunError::CmdlineTooLong {
            len: s.len(),
            max: layout::CMDLINE_MAX_SIZE - 1,
        });
    }
    Ok(s)
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// How a VM that ran to its end finished.
pub struct Finished {
    /// The exit status `vmm` should end with.
    pub status: i32,
    /// Boot milestones as one JSON line.
    pub timings: String,
}

/// What a VM is, beyond its guest state: saved in every image so a restore
/// rebuilds the same machine.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MachineConfig {
    pub mem_mib: u64,
    pub vcpus: u8,
    pub template: CpuTemplate,
    pub kernel: String,
    /// The disk behind each virtio-blk device when the VM started.
    pub disks: Vec<PathBuf>,
    /// The guest runs a container command whose status `vmm` exits with.
    pub expects_status: bool,
}

/// A built VM, ready to run: booting and restoring both end here.
pub struct Machine {
    pub vm: Vm,
    pub devices: Arc<DeviceManager>,
    pub vcpus: Vec<Vcpu>,
    pub config: MachineConfig,
    pub timeline: Arc<Timeline>,
}

/// Builds a VM that boots `cfg.kernel` from its first instruction.
pub fn boot(cfg: &VmConfig, timeline: Arc<Timeline>) -> Result<Machine, RunError> {
    cfg.validate()?;
    let template = CpuTemplate::detect();
    log::info!("CPU template: {template:?}");
    let vm = Vm::new(cfg.mem_mib)?;
    let kernel = loader::load_kernel(vm.memory(), &cfg.kernel)?;
    regs::write_boot_tables(vm.memory()).map_err(|e| RunError::BootTables(e.to_string()))?;

    let mut devices = DeviceManager::new(&vm, Box::new(std::io::stdout()), timeline.clone())?;
    let mut device_args = Vec::new();
    if let Some(rootfs) = &cfg.rootfs {
        device_args.push(devices.add_block(&vm, rootfs, false)?);
    }
    let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
    for id in 0..cfg.vcpus {
        let entry = (id == 0).then_some(kernel.entry);
        vcpus.push(Vcpu::new(&vm, id, cfg.vcpus, template, entry)?);
    }
    let cmdline = build_cmdline(cfg, template, vcpus[0].tsc_khz(), &device_args)?;
    log::info!("kernel command line: {cmdline}");
    loader::configure_boot(
        vm.memory(),
        &kernel,
        &cmdline,
        cfg.initrd.as_deref(),
        cfg.vcpus,
    )?;
    Ok(Machine {
        vm,
        devices: Arc::new(devices),
        vcpus,
        config: MachineConfig {
            mem_mib: cfg.mem_mib,
            vcpus: cfg.vcpus,
            template,
            kernel: cfg.kernel.display().to_string(),
            disks: cfg.rootfs.iter().cloned().collect(),
            expects_status: !cfg.command.is_empty(),
        },
        timeline,
    })
}

/// Boots the VM and runs it until the guest stops.
pub fn run(cfg: VmConfig, start: Instant) -> Result<Finished, RunError> {
    let timeline = Arc::new(Timeline::new(start));
    let machine = boot(&cfg, timeline)?;
    run_machine(machine, cfg.api_sock.as_deref(), start)
}

/// Runs a built (booted or restored) VM until it stops, serving the API.
pub fn run_machine(
    machine: Machine,
    api_sock: Option<&Path>,
    start: Instant,
) -> Result<Finished, RunError> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
        .map_err(RunError::Signal)?;
    let Machine {
        vm,
        devices,
        vcpus,
        config,
        timeline,
    } = machine;
    let msr_indices = Arc::new(match vcpus.first() {
        Some(v) => persist::saveable_msrs(vm.kvm(), v.fd(), 0)
            .map_err(|e| RunError::Failed(e.to_string()))?,
        None => Vec::new(),
    });
    let xsave_size = persist::xsave2_size(vm.fd());

    let (events_tx, events_rx) = mpsc::channel();
    let _api = match api_sock {
        Some(path) => Some(
            ApiServer::start(
                path,
                VmInfo {
                    vcpus: config.vcpus,
                    mem_mib: config.mem_mib,
                    kernel: config.kernel.clone(),
                    rootfs: config.disks.first().map(|p| p.display().to_string()),
                    started: start,
                },
                events_tx.clone(),
            )
            .map_err(|e| RunError::Api(e.to_string()))?,
        ),
        None => None,
    };

    let shared = Arc::new(VcpuShared {
        bus: devices.clone(),
        memory: vm.memory().clone(),
        exiting: AtomicBool::new(false),
        stop: events_tx,
        timeline: timeline.clone(),
    });
    let _terminal = RawTerminal::enter_if_tty();
    spawn_console_input(devices.clone(), shared.clone())?;
    let mut set = VcpuSet {
        handles: Vec::new(),
        paused: false,
    };
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let shared = shared.clone();
        let (req_tx, req_rx) = mpsc::channel();
        let (rep_tx, rep_rx) = mpsc::channel();
        let control = VcpuControl {
            requests: req_rx,
            replies: rep_tx,
            xsave_size,
            msr_indices: msr_indices.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu.run(shared, control))
            .map_err(RunError::Thread)?;
        set.handles.push(VcpuHandle {
            thread,
            requests: req_tx,
            replies: rep_rx,
        });
    }
    log::info!(
        "{} vCPUs started {:?} after start",
        set.handles.len(),
        start.elapsed()
    );

    let live = LiveVm {
        vm: &vm,
        devices: &devices,
        config: &config,
    };
    let reason = loop {
        // Every sender lives in `shared` or the API server, so this only
        // fails if all of them are gone, which cannot happen while vCPU
        // threads run.
        match events_rx.recv() {
            Ok(VmmEvent::Stop(reason)) => break reason,
            Ok(VmmEvent::Request { request, reply }) => {
                let (answer, stop) = live.serve(request, &mut set);
                let _ = reply.send(answer);
                if stop {
                    break StopReason::Requested;
                }
            }
            Err(_) => break StopReason::Failed("all vCPU threads vanished".into()),
        }
    };
    shared.exiting.store(true, Ordering::Release);
    set.stop();
    log::info!("VM stopped ({reason:?}) after {:?}", start.elapsed());

    let status = match reason {
        StopReason::GuestReset | StopReason::Requested => match devices.exit_status() {
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
        timings: timeline.report(),
    })
}

/// The parts of a running VM that API requests act on.
pub struct LiveVm<'a> {
    pub vm: &'a Vm,
    pub devices: &'a DeviceManager,
    pub config: &'a MachineConfig,
}

impl LiveVm<'_> {
    /// Serves one API request; returns the answer and whether the VM must
    /// now stop.
    fn serve(
        &self,
        request: ApiRequest,
        set: &mut VcpuSet,
    ) -> (Result<serde_json::Value, String>, bool) {
        match request {
            ApiRequest::Pause => (
                set.pause()
                    .map(|()| serde_json::json!({ "state": "paused" }))
                    .map_err(|e| e.to_string()),
                false,
            ),
            ApiRequest::Resume => (
                set.resume()
                    .map(|()| serde_json::json!({ "state": "running" }))
                    .map_err(|e| e.to_string()),
                false,
            ),
            ApiRequest::Snapshot(req) => {
                let was_paused = set.paused;
                let stop = req.stop;
                if let Err(e) = set.pause() {
                    return (Err(e.to_string()), false);
                }
                let result = checkpoint::snapshot(self, set, req);
                // The VM survives a failed snapshot; after a good one it
                // carries on unless asked to stop, or stays paused if it was.
                let stop_now = stop && result.is_ok();
                if !stop_now && !was_paused {
                    if let Err(e) = set.resume() {
                        log::error!("cannot resume the VM after a snapshot: {e}");
                        return (result.map_err(|e| e.to_string()), true);
                    }
                }
                (result.map_err(|e| e.to_string()), stop_now)
            }
        }
    }
}

/// Copies this process's stdin to the guest's serial port.
fn spawn_console_input(
    devices: Arc<DeviceManager>,
    shared: Arc<VcpuShared>,
) -> Result<(), RunError> {
    std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 64];
            while !shared.exiting.load(Ordering::Acquire) {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut done = 0;
                while done < n && !shared.exiting.load(Ordering::Acquire) {
                    let took = devices.serial_input(&buf[done..n]);
                    done += took;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VmConfig {
        VmConfig {
            kernel: "k".into(),
            initrd: None,
            rootfs: Some("/".into()),
            mem_mib: 256,
            vcpus: 1,
            cmdline: None,
            api_sock: None,
            command: vec![],
        }
    }

    #[test]
    fn bad_sizes_are_refused() {
        let mut c = cfg();
        c.vcpus = 0;
        assert!(matches!(c.validate(), Err(RunError::Vcpus { .. })));
        c.vcpus = 9;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("between 1 and 8"));
        c.vcpus = 1;
        c.mem_mib = 1;
        assert!(matches!(c.validate(), Err(RunError::Mem { .. })));
        c.mem_mib = 16 * 1024;
        c.validate().unwrap();
    }

    #[test]
    fn cmdline_carries_the_command() {
        let mut c = cfg();
        c.command = vec!["sh".into(), "-c".into(), "exit 7".into()];
        let s = build_cmdline(
            &c,
            CpuTemplate::Interpreted,
            Some(2_000_000),
            &["virtio_mmio.device=4K@0xd0000000:5".into()],
        )
        .unwrap();
        assert!(s.contains("nopv") && s.contains("lpj=20000000") && s.contains("root=/dev/vda"));
        assert!(s.contains(" virtio_mmio.device=4K@0xd0000000:5 -- vmm.cmd="));
        let enc = s.rsplit("vmm.cmd=").next().unwrap();
        let dec = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(enc)
            .unwrap();
        assert_eq!(dec, b"sh\0-c\0exit 7");
    }

    #[test]
    fn custom_cmdline_replaces_the_default() {
        let mut c = cfg();
        c.rootfs = None;
        c.cmdline = Some("ticks".into());
        assert_eq!(
            build_cmdline(&c, CpuTemplate::Host, None, &[]).unwrap(),
            "ticks"
        );
        c.command = vec!["x".repeat(3000)];
        assert!(matches!(
            build_cmdline(&c, CpuTemplate::Host, None, &[]),
            Err(RunError::CmdlineTooLong { .. })
        ));
    }
}
