//! The one owner of a VM's lifecycle: its KVM VM and memory, its vCPU
//! threads, its devices and its configuration.
//!
//! ```text
//!   boot ──▶ Created ──resume──▶ Running ◀──resume── Paused ◀── restore
//!                                   │ └─────pause─────▶ ▲
//!                                   └─────── shutdown (from any) ──▶ Exited
//! ```
//!
//! A machine is built (booted or restored) with its vCPU threads started
//! but paused: nothing runs until [`Machine::resume`]. [`Machine::save_state`]
//! is allowed only while nothing runs; writing the image is a separate step
//! ([`crate::image::write`]) that takes the state and the memory.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;

use crate::agent::AgentChannel;
use crate::arch::cpuid::CpuTemplate;
use crate::arch::{loader, regs};
use crate::boot::{build_cmdline, ConfigError, VmConfig};
use crate::device_manager::{
    self, DeviceError, DeviceManager, DiskView, RestoreBackends, RestoreOverrides,
};
use crate::event_loop::{EventLoop, EventLoopError};
use crate::events::VmEvent;
use crate::host::{self, HostError};
use crate::image::{ImageError, ImageIn};
use crate::kvm::persist::{self, PersistError};
use crate::kvm::vcpu::{Vcpu, VcpuError};
use crate::kvm::vm::{Vm, VmError};
use crate::memory::{merge_dirty, DirtyPages, GuestRam};
use crate::page_server::{PageServer, PageServerError};
use crate::sandbox::{Allow, Sandbox, SandboxError};
use crate::state::{MachineConfig, MachineState};
use crate::timeline::Timeline;
use crate::vcpu::{VcpuContext, VcpuHandle, VcpuThreadError};

/// The guest's vsock context id when `--vsock` does not give one.
pub const DEFAULT_GUEST_CID: u64 = 3;

/// Where a machine is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Booted, never run.
    Created,
    Running,
    Paused,
    /// Its vCPU threads have ended; it cannot run again.
    Exited,
}

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("cannot {action} a VM that is {state:?}")]
    Transition {
        action: &'static str,
        state: Lifecycle,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    VcpuThread(#[from] VcpuThreadError),
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Loader(#[from] loader::LoaderError),
    #[error("cannot start the guest agent's thread")]
    AgentThread(#[source] std::io::Error),
    #[error("cannot write boot tables into guest memory")]
    BootTables(#[source] vm_memory::GuestMemoryError),
    #[error("cannot read the VM's KVM state")]
    Save(#[source] PersistError),
    #[error("cannot put the image's KVM state back")]
    Restore(#[source] PersistError),
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("cannot keep the image open for a lazy restore")]
    LazyImage(#[source] std::io::Error),
    #[error(transparent)]
    PageServer(#[from] PageServerError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("{}", not_parent_message(.parent, .last))]
    NotParent {
        parent: String,
        last: Option<String>,
    },
    #[error("cannot track the pages the VM writes")]
    DirtyLog(#[source] crate::memory::MemoryError),
}

fn not_parent_message(parent: &str, last: &Option<String>) -> String {
    match last {
        Some(last) => format!(
            "image {parent} is not this VM's last image ({last}: the last it wrote, or the one it was restored from): an increment goes on top of that one"
        ),
        None => format!(
            "this VM keeps track of no image (none written with --track, none restored with --track, or it lost track of its writes), so it cannot vouch for image {parent}: take a snapshot with --track first"
        ),
    }
}

/// The image a machine's memory last went into, and what the guest and
/// the devices have written since: what an increment on it must hold.
struct Lineage {
    image_id: [u8; 16],
    /// Pages already taken from the log for an increment that was then
    /// not written: they are still dirty with respect to `image_id`.
    carried: Option<DirtyPages>,
}

/// From here on, only what `sandbox` allows, and the machine's own vsock
/// socket (`uds`) and `disks` (a snapshot reads them again, by name).
/// Called before the machine's first thread starts, so every thread is
/// confined.
fn confine(sandbox: &Sandbox, uds: Option<&Path>, disks: &[PathBuf]) -> Result<(), SandboxError> {
    let mut sandbox = sandbox.clone();
    if let Some(uds) = uds {
        sandbox.allow_parent(uds, Allow::Sockets);
    }
    for disk in disks {
        sandbox.allow(disk, Allow::Read);
    }
    sandbox.enforce()
}

/// Where on this host a restored machine lands.
pub struct RestoreHost<'a> {
    /// Where the image's disks are materialized.
    pub disk_dir: &'a Path,
    /// Its host ends (TAPs, the vsock socket), if not the saved ones.
    pub overrides: &'a RestoreOverrides,
    /// What the VMM may still touch once they are open.
    pub sandbox: &'a Sandbox,
    /// The image's file, when it is one (not a stream) and its memory may
    /// arrive lazily ([`crate::page_server`]); `None` reads it all first.
    pub lazy: Option<std::fs::File>,
}

/// A VM and everything it owns.
pub struct Machine {
    /// Declared first: vCPU threads end before the VM and its memory go.
    vcpus: Vec<VcpuHandle>,
    /// The device thread; paused whenever the vCPUs are.
    event_loop: EventLoop,
    devices: Arc<DeviceManager>,
    /// Serves a lazily restored VM's memory: ends before the memory goes.
    page_server: Option<PageServer>,
    vm: Vm,
    config: MachineConfig,
    timeline: Arc<Timeline>,
    lifecycle: Lifecycle,
    /// Restored and not yet resumed: the devices have news for the guest.
    fresh_restore: bool,
    agent: AgentChannel,
    /// The id of the image this machine was restored from.
    restored_image: Option<String>,
    /// Set once an image of this machine is written ([`Machine::set_last_image`]).
    lineage: Option<Lineage>,
}

impl Machine {
    /// Builds a VM that boots `cfg.kernel` from its first instruction.
    /// `events` receives the vCPUs' stop reports; the console is the
    /// serial port's output.
    pub fn boot(
        cfg: &VmConfig,
        sandbox: &Sandbox,
        console: Box<dyn std::io::Write + Send>,
        events: Sender<VmEvent>,
        timeline: Arc<Timeline>,
    ) -> Result<Self, MachineError> {
        cfg.validate()?;
        let template = CpuTemplate::detect();
        log::info!("CPU template: {template:?}");
        let vm = Vm::new(cfg.mem_mib)?;
        vm.ram().advise_huge_pages();
        let kernel = loader::load_kernel(vm.memory(), &cfg.kernel)?;
        regs::write_boot_tables(vm.memory()).map_err(MachineError::BootTables)?;

        let mut devices = DeviceManager::new(&vm, console, timeline.clone())?;
        let mut device_args = Vec::new();
        if let Some(rootfs) = &cfg.rootfs {
            let scratch = cfg.ephemeral.then(std::env::temp_dir);
            device_args.push(devices.add_block(&vm, rootfs, false, scratch.as_deref())?);
        }
        let mut net_specs = Vec::new();
        for net in &cfg.nets {
            let mac = net.mac.unwrap_or_else(devices::virtio::net::random_mac);
            device_args.push(devices.add_net(&vm, &net.tap, mac)?);
            net_specs.extend(net.spec(mac));
        }
        // Every VM has a vsock device: the guest agent's channel needs it.
        let (agent_tx, agent_rx) = mpsc::channel();
        let (cid, uds) = match &cfg.vsock {
            Some(v) => (v.cid, Some(v.uds.as_path())),
            None => (DEFAULT_GUEST_CID, None),
        };
        device_args.push(devices.add_vsock(&vm, cid, uds, agent_tx)?);
        device_args.push(devices.add_rng(&vm)?);
        let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
        for id in 0..cfg.vcpus {
            let entry = (id == 0).then_some(kernel.entry);
            vcpus.push(Vcpu::new(&vm, id, cfg.vcpus, template, entry)?);
        }
        let cmdline = build_cmdline(cfg, template, vcpus[0].tsc_khz(), &device_args, &net_specs)?;
        log::info!("kernel command line: {cmdline}");
        loader::configure_boot(
            vm.memory(),
            &kernel,
            &cmdline,
            cfg.initrd.as_deref(),
            cfg.vcpus,
        )?;
        let config = MachineConfig {
            mem_mib: cfg.mem_mib,
            vcpus: cfg.vcpus,
            template,
            kernel: cfg.kernel.display().to_string(),
            // A command that comes over the agent's channel reports its
            // status as one on the command line does.
            expects_status: !cfg.command.is_empty() || cfg.start_by_agent,
        };
        // Everything named is open.
        let disks: Vec<_> = devices
            .disks()?
            .into_iter()
            .map(|(_, d)| d.path().to_path_buf())
            .collect();
        confine(sandbox, uds, &disks)?;
        let agent = AgentChannel::start(agent_rx, events.clone(), None)
            .map_err(MachineError::AgentThread)?;
        Self::assemble(
            vm,
            devices,
            vcpus,
            config,
            events,
            timeline,
            agent,
            Lifecycle::Created,
        )
    }

    /// Reads an image from `from` and builds the VM it describes, paused,
    /// on `host` (see [`RestoreHost`]).
    pub fn restore(
        from: Box<dyn Read>,
        source: &str,
        host: &RestoreHost,
        console: Box<dyn std::io::Write + Send>,
        events: Sender<VmEvent>,
        timeline: Arc<Timeline>,
    ) -> Result<Self, MachineError> {
        let image = ImageIn::open(from, source)?;
        let image_id = snapshot::format::id_hex(&image.header().image_id);
        let vm = Vm::new(image.state().config.mem_mib)?;
        let supported = vm
            .kvm()
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(MachineError::SupportedCpuid)?;
        host::check(image.header(), image.state(), supported.as_slice())?;
        let mut backends = device_manager::open_backends(&image.state().devices, host.overrides)?;
        let (agent_tx, agent_rx) = mpsc::channel();
        backends.agent = Some(agent_tx);
        // A host that refuses userfaultfd restores eagerly, as it did
        // before lazy restore: known before anything is read.
        let uffd = match &host.lazy {
            Some(_) => match PageServer::open_userfaultfd() {
                Ok(u) => Some(u),
                Err(e) => {
                    log::warn!("{}; reading all of memory first", crate::error_chain(&e));
                    None
                }
            },
            None => None,
        };
        let lazy = match (&host.lazy, &uffd) {
            (Some(f), Some(_)) => Some((f.try_clone().map_err(MachineError::LazyImage)?, source)),
            _ => None,
        };
        let contents = image.read_contents(vm.ram(), host.disk_dir, lazy)?;
        // After eager contents, not before: filling huge pages made the
        // restore of a 1 GiB test guest take 650 ms instead of 350 (its
        // first pass over memory then took far less: 740 ms to its first
        // tick against 1,830). What the guest touches next may still come in
        // huge pages. Lazy memory is still untouched here.
        vm.ram().advise_huge_pages();
        let state = contents.state;
        backends.disks = contents.disks;
        // The disks are made and every host end is open.
        let disks: Vec<_> = backends.disks.values().map(|d| d.path.clone()).collect();
        confine(
            host.sandbox,
            backends.vsock.as_ref().map(|l| l.path()),
            &disks,
        )?;
        // Before anything touches guest memory, after Landlock (which binds
        // the threads started after it).
        let page_server = match (contents.lazy, uffd) {
            (Some(lazy), Some(uffd)) => Some(PageServer::start(vm.ram(), lazy, uffd)?),
            _ => None,
        };
        let agent = AgentChannel::start(agent_rx, events.clone(), Some(source.to_string()))
            .map_err(MachineError::AgentThread)?;
        let mut machine = Self::from_state(vm, &state, backends, console, events, timeline, agent)?;
        machine.page_server = page_server;
        machine.restored_image = Some(image_id);
        Ok(machine)
    }

    /// Builds a paused machine from `state` in `vm`, whose memory already
    /// holds the guest's.
    ///
    /// Order: KVM's VM-wide state (PIC, IOAPIC, PIT, kvmclock) before any
    /// vCPU, so the vCPUs' LAPICs attach to restored interrupt controllers;
    /// devices before vCPUs, so a device that re-raises a pending interrupt
    /// finds its irqfd routed; each vCPU in the order of
    /// [`crate::kvm::persist`].
    pub fn from_state(
        vm: Vm,
        state: &MachineState,
        backends: RestoreBackends,
        console: Box<dyn std::io::Write + Send>,
        events: Sender<VmEvent>,
        timeline: Arc<Timeline>,
        agent: AgentChannel,
    ) -> Result<Self, MachineError> {
        persist::restore_vm(vm.fd(), &state.vm).map_err(MachineError::Restore)?;
        let devices =
            DeviceManager::restore(&vm, &state.devices, console, timeline.clone(), backends)?;
        let vcpus = state
            .vcpus
            .iter()
            .map(|s| Vcpu::restore(&vm, s))
            .collect::<Result<Vec<_>, _>>()?;
        Self::assemble(
            vm,
            devices,
            vcpus,
            state.config.clone(),
            events,
            timeline,
            agent,
            Lifecycle::Paused,
        )
    }

    /// Starts a (paused) thread for each vCPU.
    #[allow(clippy::too_many_arguments)] // private: the parts of a machine, each once
    fn assemble(
        vm: Vm,
        devices: DeviceManager,
        vcpus: Vec<Vcpu>,
        config: MachineConfig,
        events: Sender<VmEvent>,
        timeline: Arc<Timeline>,
        agent: AgentChannel,
        lifecycle: Lifecycle,
    ) -> Result<Self, MachineError> {
        let devices = Arc::new(devices);
        let event_loop = EventLoop::start(devices.subscribers(), devices.clone())?;
        if lifecycle != Lifecycle::Created {
            // Nothing runs in a restored machine until it is resumed.
            event_loop.pause()?;
        }
        let ctx = Arc::new(VcpuContext {
            bus: devices.clone(),
            memory: vm.memory().clone(),
            events,
            timeline: timeline.clone(),
        });
        let vcpus = vcpus
            .into_iter()
            .map(|v| VcpuHandle::spawn(v, ctx.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Machine {
            vcpus,
            event_loop,
            devices,
            page_server: None,
            vm,
            config,
            timeline,
            fresh_restore: lifecycle == Lifecycle::Paused,
            restored_image: None,
            lineage: None,
            lifecycle,
            agent,
        })
    }

    /// How a lazily restored machine's memory fill stands (`None`: its
    /// memory was all there before it ran).
    pub fn memory_fill(&self) -> Option<crate::page_server::FillStats> {
        self.page_server.as_ref().map(PageServer::stats)
    }

    /// Waits, at most `limit`, until a lazy restore has brought all of
    /// memory in; whether it has (true at once for a VM not restored
    /// lazily).
    pub fn wait_for_memory(&self, limit: std::time::Duration) -> bool {
        self.page_server
            .as_ref()
            .is_none_or(|p| p.wait_filled(limit).done)
    }

    /// [`Machine::memory_fill`], as a handle for other threads.
    pub fn memory_fill_monitor(&self) -> Option<crate::page_server::FillMonitor> {
        self.page_server.as_ref().map(PageServer::monitor)
    }

    /// The id of the image the machine was restored from, if it was.
    pub fn restored_image(&self) -> Option<&str> {
        self.restored_image.as_deref()
    }

    /// The guest agent's control channel.
    pub fn agent(&self) -> &AgentChannel {
        &self.agent
    }

    pub fn lifecycle(&self) -> Lifecycle {
        self.lifecycle
    }

    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    pub fn devices(&self) -> &Arc<DeviceManager> {
        &self.devices
    }

    pub fn timeline(&self) -> &Arc<Timeline> {
        &self.timeline
    }

    /// Guest memory, for the image writer: read it only while nothing runs.
    pub fn ram(&self) -> &GuestRam {
        self.vm.ram()
    }

    /// The disk behind each virtio-blk device, by device id; an overlay's
    /// view is consistent while the machine is paused.
    pub fn disks(&self) -> Result<Vec<(String, DiskView)>, MachineError> {
        Ok(self.devices.disks()?)
    }

    /// Has the disks kept as they are now for a snapshot's writer in a
    /// forked child, while the VM runs on: the logs to read them through,
    /// by device id. Not while running; [`Machine::release_disks`] ends it.
    pub fn keep_disks_for_reader(&self) -> Result<Vec<(String, std::fs::File)>, MachineError> {
        if self.lifecycle == Lifecycle::Running {
            return Err(self.refuse("keep the disks of"));
        }
        Ok(self
            .devices
            .keep_disks_for_reader(|| crate::background::memfd("vmm-disk-log"))?)
    }

    /// Ends [`Machine::keep_disks_for_reader`]: how many 4 KiB blocks the
    /// disks kept (the VM wrote them while the image was written).
    pub fn release_disks(&self) -> u64 {
        self.devices.release_disks()
    }

    fn refuse(&self, action: &'static str) -> MachineError {
        MachineError::Transition {
            action,
            state: self.lifecycle,
        }
    }

    /// Runs a created or paused machine: devices first, so a vCPU never
    /// notifies a device that cannot answer.
    pub fn resume(&mut self) -> Result<(), MachineError> {
        if !matches!(self.lifecycle, Lifecycle::Created | Lifecycle::Paused) {
            return Err(self.refuse("resume"));
        }
        if self.lifecycle == Lifecycle::Paused {
            self.event_loop.resume()?;
        }
        if std::mem::take(&mut self.fresh_restore) {
            // After the event loop runs (the interrupt it raises reaches
            // the restored interrupt controllers) and before the vCPUs do.
            self.devices.restored();
        }
        for v in &self.vcpus {
            v.resume()?;
        }
        if let Some(p) = &self.page_server {
            p.start_fill();
        }
        self.lifecycle = Lifecycle::Running;
        Ok(())
    }

    /// Takes every vCPU out of KVM_RUN with its pending I/O finished, then
    /// drains and parks the devices: after the vCPUs, so no new request
    /// arrives while they drain.
    pub fn pause(&mut self) -> Result<(), MachineError> {
        if self.lifecycle != Lifecycle::Running {
            return Err(self.refuse("pause"));
        }
        // Marked paused before asking: if a vCPU fails to answer, the
        // others are paused already and a resume brings them back.
        self.lifecycle = Lifecycle::Paused;
        for v in &self.vcpus {
            v.pause()?;
        }
        self.event_loop.pause()?;
        Ok(())
    }

    /// Captures the state of a machine that is not running.
    ///
    /// Order, and why:
    /// 1. Quiesce the devices: the disk's writes reach its file, so a copy
    ///    of the disk agrees with the guest's page cache.
    /// 2. The vCPUs (each in the order of [`crate::kvm::persist`]).
    /// 3. KVM's VM-wide state, after the vCPUs: kvmclock is read as late as
    ///    possible, so the restored guest's clock jumps the least.
    /// 4. The devices last: a device may still raise an interrupt (console
    ///    input arrives while paused); its saved state then holds the cause,
    ///    and its restore raises the interrupt again, so none is lost even
    ///    if the interrupt controllers were read before it.
    pub fn save_state(&self) -> Result<MachineState, MachineError> {
        if !matches!(self.lifecycle, Lifecycle::Created | Lifecycle::Paused) {
            return Err(self.refuse("save"));
        }
        self.devices.quiesce()?;
        let vcpus = self
            .vcpus
            .iter()
            .map(VcpuHandle::save)
            .collect::<Result<Vec<_>, _>>()?;
        let vm = persist::save_vm(self.vm.fd()).map_err(MachineError::Save)?;
        Ok(MachineState {
            config: self.config.clone(),
            vm,
            vcpus,
            devices: self.devices.save(),
        })
    }

    /// Records that the machine's memory, as it is now (not running), is
    /// image `image_id`'s (an image it wrote, or the one it was restored
    /// from): the next increment goes on top of it. Starts (or restarts)
    /// the log of the pages the guest and the devices write. Without a log
    /// the machine vouches for no image.
    pub fn set_last_image(&mut self, image_id: [u8; 16]) -> Result<(), MachineError> {
        if self.lifecycle == Lifecycle::Running {
            return Err(self.refuse("track"));
        }
        self.lineage = None;
        self.vm
            .ram()
            .start_dirty_log(self.vm.fd())
            .map_err(MachineError::DirtyLog)?;
        self.lineage = Some(Lineage {
            image_id,
            carried: None,
        });
        Ok(())
    }

    /// Marks the machine's memory as it is now (not running) as what the
    /// image about to be written holds: from here on the log counts the
    /// writes since that image. What was written since the last image is
    /// kept (carried) until [`Machine::record_image`], so an image that
    /// never gets written loses nothing.
    pub fn begin_image(&mut self) -> Result<(), MachineError> {
        if self.lifecycle == Lifecycle::Running {
            return Err(self.refuse("track"));
        }
        match self.lineage.as_ref().map(|l| l.image_id) {
            Some(last) => self.dirty_since(&last).map(drop),
            None => self
                .vm
                .ram()
                .start_dirty_log(self.vm.fd())
                .map_err(MachineError::DirtyLog),
        }
    }

    /// The image [`Machine::begin_image`] marked was written, as
    /// `image_id`: the next increment goes on it. The VM may be running.
    pub fn record_image(&mut self, image_id: [u8; 16]) {
        self.lineage = Some(Lineage {
            image_id,
            carried: None,
        });
    }

    /// The image [`Machine::begin_image`] marked was not written: the
    /// machine still vouches for the one before, if any; with none, the
    /// log it started stops.
    pub fn abandon_image(&mut self) {
        if self.lineage.is_none() {
            if let Err(e) = self.vm.ram().stop_dirty_log(self.vm.fd()) {
                log::warn!("{}", crate::error_chain(&MachineError::DirtyLog(e)));
            }
        }
    }

    /// Stops the log of written pages (the guest gets its large mappings
    /// back); the machine vouches for no image.
    pub fn stop_tracking(&mut self) -> Result<(), MachineError> {
        self.lineage = None;
        self.vm
            .ram()
            .stop_dirty_log(self.vm.fd())
            .map_err(MachineError::DirtyLog)
    }

    /// Whether image `parent` is the last one [`Machine::set_last_image`]
    /// recorded, the only one an increment can go on.
    pub fn check_parent(&self, parent: &[u8; 16]) -> Result<(), MachineError> {
        let last = self.lineage.as_ref().map(|l| l.image_id);
        if last.as_ref() == Some(parent) {
            return Ok(());
        }
        Err(MachineError::NotParent {
            parent: snapshot::format::id_hex(parent),
            last: last.map(|l| snapshot::format::id_hex(&l)),
        })
    }

    /// The pages written since image `parent`, which must be the last one
    /// [`Machine::set_last_image`] recorded. Kept until the next image is
    /// recorded, so an increment that fails to be written loses nothing.
    pub fn dirty_since(&mut self, parent: &[u8; 16]) -> Result<DirtyPages, MachineError> {
        if self.lifecycle == Lifecycle::Running {
            return Err(self.refuse("read the dirty pages of"));
        }
        self.check_parent(parent)?;
        let mut dirty = match self.vm.ram().take_dirty(self.vm.fd()) {
            Ok(d) => d,
            Err(e) => {
                // Part of the log may be gone with the error.
                self.lineage = None;
                return Err(MachineError::DirtyLog(e));
            }
        };
        if let Some(lineage) = self.lineage.as_mut() {
            if let Some(carried) = &lineage.carried {
                merge_dirty(&mut dirty, carried);
            }
            lineage.carried = Some(dirty.clone());
        }
        Ok(dirty)
    }

    /// Ends every vCPU thread and the device thread; the machine cannot
    /// run again.
    pub fn shutdown(&mut self) {
        for v in &mut self.vcpus {
            v.exit();
        }
        self.event_loop.stop();
        self.lifecycle = Lifecycle::Exited;
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if self.lifecycle != Lifecycle::Exited {
            self.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_vm;
    use std::sync::mpsc;

    fn config() -> MachineConfig {
        MachineConfig {
            mem_mib: 16,
            vcpus: 1,
            template: CpuTemplate::detect(),
            kernel: "spin".into(),
            expects_status: false,
        }
    }

    /// A created machine whose one vCPU spins on `jmp $`.
    fn spinning(events: Sender<VmEvent>) -> Machine {
        let vm = test_vm::vm();
        let vcpu = test_vm::vcpu(&vm);
        let timeline = test_vm::timeline();
        let devices = DeviceManager::new(&vm, Box::new(std::io::sink()), timeline.clone()).unwrap();
        Machine::assemble(
            vm,
            devices,
            vec![vcpu],
            config(),
            events.clone(),
            timeline,
            test_agent(events),
            Lifecycle::Created,
        )
        .unwrap()
    }

    /// A channel no agent ever connects to.
    fn test_agent(events: Sender<VmEvent>) -> AgentChannel {
        let (_tx, rx) = mpsc::channel();
        AgentChannel::start(rx, events, None).unwrap()
    }

    fn refused(r: Result<impl Sized, MachineError>, what: &str, in_state: Lifecycle) {
        match r {
            Err(MachineError::Transition { action, state }) => {
                assert_eq!((action, state), (what, in_state))
            }
            Err(e) => panic!("{what} failed otherwise: {e}"),
            Ok(_) => panic!("{what} was allowed while {in_state:?}"),
        }
    }

    #[test]
    fn lifecycle_transitions_are_checked() {
        let (events, _stops) = mpsc::channel();
        let mut m = spinning(events);
        assert_eq!(m.lifecycle(), Lifecycle::Created);
        refused(m.pause(), "pause", Lifecycle::Created);
        // A machine that never ran can be saved: it is its boot state.
        assert_eq!(m.save_state().unwrap().vcpus[0].regs.rip, test_vm::SPIN_AT);

        m.resume().unwrap();
        assert_eq!(m.lifecycle(), Lifecycle::Running);
        refused(m.resume(), "resume", Lifecycle::Running);
        refused(m.save_state(), "save", Lifecycle::Running);

        m.pause().unwrap();
        refused(m.pause(), "pause", Lifecycle::Paused);
        let s = m.save_state().unwrap();
        assert_eq!(s.vcpus.len(), 1);
        assert_eq!(s.vcpus[0].regs.rip, test_vm::SPIN_AT);
        let kinds: Vec<&str> = s.devices.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(kinds, ["serial/0", "i8042/0", "rtc/0", "status-port/0"]);

        m.resume().unwrap();
        m.shutdown();
        assert_eq!(m.lifecycle(), Lifecycle::Exited);
        refused(m.resume(), "resume", Lifecycle::Exited);
        refused(m.save_state(), "save", Lifecycle::Exited);
    }

    #[test]
    fn a_restored_machine_is_paused_until_resumed() {
        let (events, _stops) = mpsc::channel();
        let mut m = spinning(events.clone());
        m.resume().unwrap();
        m.pause().unwrap();
        let state = m.save_state().unwrap();
        m.shutdown();

        // The new VM's memory holds the guest's, as an image's would.
        let vm = test_vm::vm();
        let mut r = Machine::from_state(
            vm,
            &state,
            RestoreBackends::default(),
            Box::new(std::io::sink()),
            events.clone(),
            test_vm::timeline(),
            test_agent(events),
        )
        .unwrap();
        assert_eq!(r.lifecycle(), Lifecycle::Paused);
        assert_eq!(r.save_state().unwrap().vcpus[0].regs.rip, test_vm::SPIN_AT);
        r.resume().unwrap();
        r.pause().unwrap();
        let again = r.save_state().unwrap();
        assert_eq!(again.vcpus[0].regs.rip, test_vm::SPIN_AT);
        assert_eq!(again.vcpus[0].sregs.cr3, state.vcpus[0].sregs.cr3);
    }
}
