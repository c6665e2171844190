//! Wires the devices to guest ports, MMIO windows and interrupt lines,
//! dispatches vCPU accesses to them, and saves and restores them one by one
//! (see [`persist`]).

pub mod persist;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use devices::legacy::{Rtc, Serial, I8042};
use devices::virtio::block::{Backing, Block, Overlay};
use devices::virtio::mmio::reg::QUEUE_NOTIFY;
use devices::virtio::net::{MacAddr, Net, Tap, TapError};
use devices::virtio::rng::Rng;
use devices::virtio::vsock::{HostListener, Vsock, VsockError, VsockHost};
use devices::virtio::{MmioTransport, VirtioDevice, VirtioRestoreError, BACKEND_DATA_LIMIT};
use devices::Persist;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::agent::AGENT_PORT;
use crate::arch::layout::*;
use crate::bus::{Bus, PortEffect};
use crate::event_loop::{Drain, Subscriber};
use crate::kvm::vm::{Vm, VmError};
use crate::timeline::Timeline;
use persist::{device_id, id_matches, DeviceState, SavedDevice, StatusPortState, VirtioSlotState};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot open disk image {path}")]
    OpenDisk {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up virtio-blk on {path}")]
    Block {
        path: String,
        #[source]
        source: devices::virtio::block::BlockError,
    },
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot flush {id} before the snapshot")]
    Quiesce {
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot restore {id}")]
    Restore {
        id: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the image's device {id} is not one this VMM can rebuild ({reason})")]
    BadDevice { id: String, reason: String },
    #[error("the image has no disk for {0}")]
    NoDisk(String),
    #[error("cannot keep {id}'s disk as it is for the snapshot's writer")]
    KeepDisk {
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make the copy-on-write overlay of the disk in {dir}")]
    Overlay {
        dir: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot attach {id} to its TAP")]
    Tap {
        id: String,
        #[source]
        source: TapError,
    },
    #[error("cannot set up {id}")]
    Vsock {
        id: String,
        #[source]
        source: VsockError,
    },
    #[error("--vsock is given to restore, but the image has no vsock device")]
    NoVsock,
    #[error(
        "--net is given {given} times, the image's network devices are: {saved} (one --net each)"
    )]
    NetCount { given: usize, saved: String },
}

/// What a restore attaches that the image only names, by device id: the
/// disks, the TAPs and the vsock's host socket ([`open_backends`]).
#[derive(Default)]
pub struct RestoreBackends {
    pub disks: HashMap<String, DiskFile>,
    pub taps: HashMap<String, Tap>,
    pub vsock: Option<HostListener>,
    /// Where the vsock device sends the guest agent's connections.
    pub agent: Option<Sender<UnixStream>>,
}

/// Where a restored VM's host ends go instead of the saved ones.
#[derive(Debug, Default, Clone)]
pub struct RestoreOverrides {
    /// One TAP per network device, in order; empty keeps the saved TAPs.
    pub taps: Vec<String>,
    /// The vsock's host socket; None keeps the saved path.
    pub vsock_uds: Option<PathBuf>,
}

/// Opens the host ends of the saved devices: TAPs and the vsock socket.
/// Done before anything of the image is written out, so a missing or busy
/// TAP, or a socket path in use, costs nothing and leaves nothing.
pub fn open_backends(
    saved: &[SavedDevice],
    overrides: &RestoreOverrides,
) -> Result<RestoreBackends, DeviceError> {
    let taps = open_taps(saved, &overrides.taps)?;
    let vsock = saved.iter().find_map(|d| match &d.state {
        DeviceState::VirtioVsock(s) => Some((d.id.as_str(), &s.virtio.device)),
        _ => None,
    });
    let vsock = match (vsock, &overrides.vsock_uds) {
        (None, None) => None,
        (None, Some(_)) => return Err(DeviceError::NoVsock),
        (Some((id, state)), path) => match path.as_deref().or(state.uds_path()) {
            None => None,
            Some(path) => Some(HostListener::bind(path).map_err(|e| DeviceError::Vsock {
                id: id.to_string(),
                source: e.into(),
            })?),
        },
    };
    Ok(RestoreBackends {
        disks: HashMap::new(),
        taps,
        vsock,
        agent: None,
    })
}

/// Opens the TAP of each saved network device: `overrides` in the order of
/// the devices (one per device), or the saved TAPs if empty.
fn open_taps(
    saved: &[SavedDevice],
    overrides: &[String],
) -> Result<HashMap<String, Tap>, DeviceError> {
    let nets: Vec<(&str, &str)> = saved
        .iter()
        .filter_map(|d| match &d.state {
            DeviceState::VirtioNet(s) => Some((d.id.as_str(), s.virtio.device.tap.as_str())),
            _ => None,
        })
        .collect();
    if !overrides.is_empty() && overrides.len() != nets.len() {
        let ids: Vec<&str> = nets.iter().map(|&(id, _)| id).collect();
        return Err(DeviceError::NetCount {
            given: overrides.len(),
            saved: if ids.is_empty() {
                "none".into()
            } else {
                ids.join(", ")
            },
        });
    }
    let names: Vec<&str> = if overrides.is_empty() {
        nets.iter().map(|&(_, tap)| tap).collect()
    } else {
        overrides.iter().map(String::as_str).collect()
    };
    crate::boot::check_distinct_taps(names.iter().copied()).map_err(|e| {
        DeviceError::BadDevice {
            id: "virtio-net".into(),
            reason: e.to_string(),
        }
    })?;
    let mut taps = HashMap::new();
    for (&(id, _), name) in nets.iter().zip(names) {
        let tap = Tap::open(name).map_err(|source| DeviceError::Tap {
            id: id.to_string(),
            source,
        })?;
        taps.insert(id.to_string(), tap);
    }
    Ok(taps)
}

/// The disk behind a restored virtio-blk device: `path` names the image
/// (an overlay's base).
pub struct DiskFile {
    pub path: PathBuf,
    pub backing: Backing,
}

/// A virtio-blk device's disk as a snapshot sees it.
pub enum DiskView {
    /// The image file, which the guest writes.
    File(PathBuf),
    /// A copy-on-write view of `base` (`--ephemeral`), frozen as it is now.
    Overlay { base: PathBuf, overlay: Overlay },
}

impl DiskView {
    /// The image the disk comes from.
    pub fn path(&self) -> &Path {
        match self {
            DiskView::File(p) => p,
            DiskView::Overlay { base, .. } => base,
        }
    }
}

/// A new file in `dir` with no name: it takes an overlay's writes and
/// vanishes with the last descriptor, whatever way the VMM ends.
pub fn scratch_file(dir: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
}

struct VirtioSlot {
    id: String,
    base: u64,
    gsi: u32,
    /// Shared by the vCPU threads (register accesses) and the device
    /// thread (queue work); a request is served whole under this lock.
    transport: Arc<Mutex<MmioTransport>>,
    /// One per queue, signalled by KVM on a QueueNotify write of its index.
    queue_evts: Vec<EventFd>,
}

/// The device thread's subscriber for one virtio device: serves a queue
/// when its ioeventfd fires, and the device's backend (a TAP) when its file
/// descriptors are ready.
struct VirtioNotifier {
    id: String,
    transport: Arc<Mutex<MmioTransport>>,
    queue_evts: Vec<EventFd>,
}

impl event_manager::MutEventSubscriber for VirtioNotifier {
    fn init(&mut self, ops: &mut event_manager::EventOps) {
        for (index, evt) in self.queue_evts.iter().enumerate() {
            let data = BACKEND_DATA_LIMIT | index as u32;
            let events = event_manager::Events::with_data(evt, data, event_manager::EventSet::IN);
            if let Err(e) = ops.add(events) {
                log::error!("{}: cannot watch queue {index}'s ioeventfd: {e}", self.id);
            }
        }
        lock(&self.transport).init_backend(ops);
    }

    fn process(&mut self, events: event_manager::Events, ops: &mut event_manager::EventOps) {
        let data = events.data();
        let mut transport = lock(&self.transport);
        if data < BACKEND_DATA_LIMIT {
            transport.backend_event(events, ops);
        } else {
            let index = (data - BACKEND_DATA_LIMIT) as usize;
            if let Some(evt) = self.queue_evts.get(index) {
                // Several notifications may have piled up; one pass serves them all.
                let _ = evt.read();
                transport.notify_queue(index);
            }
        }
        transport.update_backend(ops);
    }
}

/// All devices of one VM.
pub struct DeviceManager {
    serial: Mutex<Serial>,
    i8042: Mutex<I8042>,
    rtc: Mutex<Rtc>,
    i8042_reset: EventFd,
    virtio: Vec<VirtioSlot>,
    /// Exit status the guest reported on STATUS_PORT, or -1.
    status: AtomicI32,
    timeline: Arc<Timeline>,
}

/// A poisoned lock only means another thread panicked mid-access; the
/// device state itself is still consistent enough to go on with.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The event fds of the serial port and the i8042: their interrupt lines,
/// and the i8042's reset line (one end for the device, one for the bus).
struct LegacyFds {
    serial_irq: EventFd,
    kbd_irq: EventFd,
    i8042_reset: EventFd,
    reset_clone: EventFd,
}

impl LegacyFds {
    fn new(vm: &Vm) -> Result<Self, DeviceError> {
        let serial_irq = eventfd()?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)?;
        let kbd_irq = eventfd()?;
        vm.register_irqfd(&kbd_irq, I8042_IRQ)?;
        let i8042_reset = eventfd()?;
        let reset_clone = i8042_reset.try_clone().map_err(DeviceError::EventFd)?;
        Ok(LegacyFds {
            serial_irq,
            kbd_irq,
            i8042_reset,
            reset_clone,
        })
    }
}

fn eventfd() -> Result<EventFd, DeviceError> {
    EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)
}

/// The slot of the `index`th virtio device: its MMIO window and GSI.
fn virtio_slot(index: usize) -> (u64, u32) {
    (
        VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE,
        VIRTIO_IRQ_BASE + index as u32,
    )
}

/// The state of the one device of `kind` that every VM has.
fn the_one<'a, T>(
    saved: &'a [SavedDevice],
    kind: &str,
    pick: impl Fn(&'a DeviceState) -> Option<&'a T>,
) -> Result<&'a T, DeviceError> {
    saved
        .iter()
        .find_map(|d| pick(&d.state))
        .ok_or_else(|| DeviceError::BadDevice {
            id: device_id(kind, 0),
            reason: "the image does not have it".into(),
        })
}

fn restore_err<E>(id: &str) -> impl FnOnce(E) -> DeviceError + '_
where
    E: std::error::Error + Send + Sync + 'static,
{
    move |e| DeviceError::Restore {
        id: id.to_string(),
        source: Box::new(e),
    }
}

impl DeviceManager {
    /// Creates the serial console (writing to `console`), the i8042 and
    /// the RTC.
    pub fn new(
        vm: &Vm,
        console: Box<dyn std::io::Write + Send>,
        timeline: Arc<Timeline>,
    ) -> Result<Self, DeviceError> {
        Self::with_legacy(
            vm,
            timeline,
            -1,
            Rtc::new(),
            |serial_irq, kbd_irq, reset| {
                Ok((Serial::new(serial_irq, console), I8042::new(kbd_irq, reset)))
            },
        )
    }

    /// A manager, no virtio devices yet, with `rtc`, and the serial port
    /// and the i8042 that `make` builds from their lines (serial IRQ,
    /// keyboard IRQ, the i8042's end of the reset line).
    fn with_legacy(
        vm: &Vm,
        timeline: Arc<Timeline>,
        status: i32,
        rtc: Rtc,
        make: impl FnOnce(EventFd, EventFd, EventFd) -> Result<(Serial, I8042), DeviceError>,
    ) -> Result<Self, DeviceError> {
        let fds = LegacyFds::new(vm)?;
        let (serial, i8042) = make(fds.serial_irq, fds.kbd_irq, fds.reset_clone)?;
        Ok(DeviceManager {
            serial: Mutex::new(serial),
            i8042: Mutex::new(i8042),
            rtc: Mutex::new(rtc),
            i8042_reset: fds.i8042_reset,
            virtio: Vec::new(),
            status: AtomicI32::new(status),
            timeline,
        })
    }

    /// Puts a virtio transport in the next MMIO slot, with an irqfd on its
    /// GSI and an ioeventfd on QueueNotify for each queue; returns the
    /// slot's (base, gsi).
    fn add_virtio(
        &mut self,
        vm: &Vm,
        id: String,
        make: impl FnOnce(EventFd) -> Result<MmioTransport, DeviceError>,
    ) -> Result<(u64, u32), DeviceError> {
        let (base, gsi) = virtio_slot(self.virtio.len());
        let irq = eventfd()?;
        vm.register_irqfd(&irq, gsi)?;
        let transport = make(irq)?;
        let mut queue_evts = Vec::with_capacity(transport.queue_count());
        for index in 0..transport.queue_count() {
            let evt = eventfd()?;
            vm.register_mmio_ioevent(&evt, base + QUEUE_NOTIFY, index as u32)?;
            queue_evts.push(evt);
        }
        self.virtio.push(VirtioSlot {
            id,
            base,
            gsi,
            transport: Arc::new(Mutex::new(transport)),
            queue_evts,
        });
        Ok((base, gsi))
    }

    /// What the device thread watches: each virtio device's queue ioeventfds.
    pub fn subscribers(&self) -> Vec<Subscriber> {
        let mut out: Vec<Subscriber> = Vec::new();
        for slot in &self.virtio {
            let evts: Result<Vec<EventFd>, _> =
                slot.queue_evts.iter().map(EventFd::try_clone).collect();
            match evts {
                Ok(queue_evts) => out.push(Arc::new(Mutex::new(VirtioNotifier {
                    id: slot.id.clone(),
                    transport: slot.transport.clone(),
                    queue_evts,
                }))),
                Err(e) => log::error!("{}: cannot share its ioeventfds: {e}", slot.id),
            }
        }
        out
    }

    /// Adds a virtio-blk device backed by `path`; returns the kernel
    /// command-line fragment that declares it to the guest. With
    /// `ephemeral_dir` the guest writes into a copy-on-write overlay kept
    /// (unnamed) in that directory, and `path` is only read.
    pub fn add_block(
        &mut self,
        vm: &Vm,
        path: &Path,
        read_only: bool,
        ephemeral_dir: Option<&Path>,
    ) -> Result<String, DeviceError> {
        let name = path.display().to_string();
        let open_err = |source| DeviceError::OpenDisk {
            path: name.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only && ephemeral_dir.is_none())
            .open(path)
            .map_err(open_err)?;
        let backing = match ephemeral_dir {
            None => Backing::File(file),
            Some(dir) => {
                let len = file.metadata().map_err(open_err)?.len();
                let upper = scratch_file(dir).map_err(|source| DeviceError::Overlay {
                    dir: dir.display().to_string(),
                    source: source.into(),
                })?;
                let overlay =
                    Overlay::new(file, len, upper).map_err(|source| DeviceError::Overlay {
                        dir: dir.display().to_string(),
                        source: source.into(),
                    })?;
                Backing::Overlay(overlay)
            }
        };
        let index = self.virtio.len();
        let block = Block::new(backing, read_only, format!("vmm-disk{index}"))
            .map_err(|source| DeviceError::Block { path: name, source })?;
        self.add_virtio_device(vm, device_id("virtio-blk", index), Box::new(block))
    }

    /// Adds a virtio-net device on the existing TAP `tap` with `mac`;
    /// returns the command-line fragment that declares it.
    pub fn add_net(&mut self, vm: &Vm, tap: &str, mac: MacAddr) -> Result<String, DeviceError> {
        let id = device_id("virtio-net", self.virtio.len());
        let tap = Tap::open(tap).map_err(|source| DeviceError::Tap {
            id: id.clone(),
            source,
        })?;
        let net = Net::new(tap, mac);
        self.add_virtio_device(vm, id, Box::new(net))
    }

    /// Adds the vsock device for guest `cid`, listening on `uds` if given;
    /// the guest agent's connections go to `agent`.
    pub fn add_vsock(
        &mut self,
        vm: &Vm,
        cid: u64,
        uds: Option<&Path>,
        agent: Sender<UnixStream>,
    ) -> Result<String, DeviceError> {
        let id = device_id("virtio-vsock", self.virtio.len());
        let mut vsock = Vsock::new(cid, uds).map_err(|source| DeviceError::Vsock {
            id: id.clone(),
            source,
        })?;
        vsock.add_service(AGENT_PORT, agent);
        self.add_virtio_device(vm, id, Box::new(vsock))
    }

    /// Adds the entropy device.
    pub fn add_rng(&mut self, vm: &Vm) -> Result<String, DeviceError> {
        let id = device_id("virtio-rng", self.virtio.len());
        self.add_virtio_device(vm, id, Box::new(Rng::new()))
    }

    fn add_virtio_device(
        &mut self,
        vm: &Vm,
        id: String,
        device: Box<dyn VirtioDevice>,
    ) -> Result<String, DeviceError> {
        let mem = vm.memory().clone();
        let (base, gsi) =
            self.add_virtio(vm, id, |irq| Ok(MmioTransport::new(mem, device, irq)))?;
        Ok(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"))
    }

    /// The VM was restored and runs again: each virtio device tells its
    /// driver what changed (a network card asks to be announced).
    pub fn restored(&self) {
        for slot in &self.virtio {
            lock(&slot.transport).restored();
        }
    }

    /// Makes every device's work durable (the disk's writes reach the file)
    /// so that a snapshot of the disk agrees with the guest's page cache.
    /// The vCPUs are paused, so no request is in flight.
    pub fn quiesce(&self) -> Result<(), DeviceError> {
        for slot in &self.virtio {
            lock(&slot.transport)
                .quiesce()
                .map_err(|source| DeviceError::Quiesce {
                    id: slot.id.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Reads every device's state, one entry per device; the vCPUs are
    /// paused and the devices quiesced.
    pub fn save(&self) -> Vec<SavedDevice> {
        let one = |kind, state| SavedDevice {
            id: device_id(kind, 0),
            state,
        };
        let mut out = vec![
            one("serial", DeviceState::Serial(lock(&self.serial).save())),
            one("i8042", DeviceState::I8042(lock(&self.i8042).save())),
            one("rtc", DeviceState::Rtc(lock(&self.rtc).save())),
            one(
                "status-port",
                DeviceState::StatusPort(StatusPortState {
                    status: self.status.load(Ordering::Acquire),
                }),
            ),
        ];
        for slot in &self.virtio {
            let transport = lock(&slot.transport);
            let (base, gsi) = (slot.base, slot.gsi);
            let state = if let Some(virtio) = devices::virtio::persist::save::<Block>(&transport) {
                DeviceState::VirtioBlock(VirtioSlotState { base, gsi, virtio })
            } else if let Some(virtio) = devices::virtio::persist::save::<Net>(&transport) {
                DeviceState::VirtioNet(VirtioSlotState { base, gsi, virtio })
            } else if let Some(virtio) = devices::virtio::persist::save::<Rng>(&transport) {
                DeviceState::VirtioRng(VirtioSlotState { base, gsi, virtio })
            } else if let Some(virtio) = devices::virtio::persist::save::<Vsock>(&transport) {
                DeviceState::VirtioVsock(VirtioSlotState { base, gsi, virtio })
            } else {
                // A new device type gets its arm above.
                log::error!("{}: a virtio device of unknown type is not saved", slot.id);
                continue;
            };
            out.push(SavedDevice {
                id: slot.id.clone(),
                state,
            });
        }
        out
    }

    /// The disk behind each virtio-blk device, by device id. An overlay's
    /// view stays consistent only while the VM is paused.
    pub fn disks(&self) -> Result<Vec<(String, DiskView)>, DeviceError> {
        let mut out = Vec::new();
        for slot in &self.virtio {
            let t = lock(&slot.transport);
            let Some(b) = t.device().as_any().downcast_ref::<Block>() else {
                continue;
            };
            let view = match b.overlay() {
                None => DiskView::File(b.path().to_path_buf()),
                Some(o) => DiskView::Overlay {
                    base: b.path().to_path_buf(),
                    overlay: o.try_clone().map_err(|source| DeviceError::Overlay {
                        dir: b.path().display().to_string(),
                        source: source.into(),
                    })?,
                },
            };
            out.push((slot.id.clone(), view));
        }
        Ok(out)
    }

    /// Has every virtio-blk device keep its disk as it is now for a reader
    /// in another process (a snapshot's writer): each copies what it is
    /// about to overwrite into a fresh log from `new_log`. The logs, by
    /// device id. Call it with the devices parked; [`Self::release_disks`]
    /// ends it.
    pub fn keep_disks_for_reader(
        &self,
        mut new_log: impl FnMut() -> std::io::Result<std::fs::File>,
    ) -> Result<Vec<(String, std::fs::File)>, DeviceError> {
        let mut logs = Vec::new();
        for slot in &self.virtio {
            let t = lock(&slot.transport);
            let Some(b) = t.device().as_any().downcast_ref::<Block>() else {
                continue;
            };
            let kept = new_log().and_then(|log| {
                b.keep_for_reader(Some(log.try_clone()?))?;
                Ok(log)
            });
            match kept {
                Ok(log) => logs.push((slot.id.clone(), log)),
                Err(source) => {
                    drop(t);
                    self.release_disks();
                    return Err(DeviceError::KeepDisk {
                        id: slot.id.clone(),
                        source,
                    });
                }
            }
        }
        Ok(logs)
    }

    /// Ends [`Self::keep_disks_for_reader`]: the devices write in place.
    /// How many blocks they had kept.
    pub fn release_disks(&self) -> u64 {
        let mut kept = 0;
        for slot in &self.virtio {
            let t = lock(&slot.transport);
            if let Some(b) = t.device().as_any().downcast_ref::<Block>() {
                kept += b.keep_for_reader(None).unwrap_or(0);
            }
        }
        kept
    }

    /// Rebuilds the devices from their saved states, attached to
    /// `backends` (the disks by device id, TAPs that replace the saved ones).
    pub fn restore(
        vm: &Vm,
        saved: &[SavedDevice],
        console: Box<dyn std::io::Write + Send>,
        timeline: Arc<Timeline>,
        backends: RestoreBackends,
    ) -> Result<Self, DeviceError> {
        let RestoreBackends {
            mut disks,
            mut taps,
            mut vsock,
            agent,
        } = backends;
        for d in saved {
            if !id_matches(&d.id, &d.state) {
                return Err(DeviceError::BadDevice {
                    id: d.id.clone(),
                    reason: format!("its state is a {}'s", d.state.kind()),
                });
            }
        }
        let serial_state = the_one(saved, "serial", |s| match s {
            DeviceState::Serial(s) => Some(s),
            _ => None,
        })?;
        let i8042_state = the_one(saved, "i8042", |s| match s {
            DeviceState::I8042(s) => Some(s),
            _ => None,
        })?;
        let status = the_one(saved, "status-port", |s| match s {
            DeviceState::StatusPort(s) => Some(s),
            _ => None,
        })?;
        // Images from before the RTC existed have none: a fresh one shows
        // the host's time, which is what it would show after a restore.
        let rtc = match the_one(saved, "rtc", |s| match s {
            DeviceState::Rtc(s) => Some(s),
            _ => None,
        }) {
            Ok(s) => {
                Rtc::restore(devices::legacy::rtc::system_clock, s).map_err(restore_err("rtc/0"))?
            }
            Err(_) => Rtc::new(),
        };
        let mut dm = Self::with_legacy(
            vm,
            timeline,
            status.status,
            rtc,
            |serial_irq, kbd_irq, reset| {
                let serial = Serial::restore((serial_irq, console), serial_state)
                    .map_err(restore_err("serial/0"))?;
                let i8042 = I8042::restore((kbd_irq, reset), i8042_state)
                    .map_err(restore_err("i8042/0"))?;
                Ok((serial, i8042))
            },
        )?;
        for d in saved {
            let (base, gsi) = match &d.state {
                DeviceState::VirtioBlock(s) => (s.base, s.gsi),
                DeviceState::VirtioNet(s) => (s.base, s.gsi),
                DeviceState::VirtioRng(s) => (s.base, s.gsi),
                DeviceState::VirtioVsock(s) => (s.base, s.gsi),
                _ => continue,
            };
            let index = dm.virtio.len();
            if (base, gsi) != virtio_slot(index) {
                return Err(DeviceError::BadDevice {
                    id: d.id.clone(),
                    reason: format!(
                        "virtio device {index} at {base:#x} on GSI {gsi}, expected {:x?}",
                        virtio_slot(index)
                    ),
                });
            }
            let mem = vm.memory().clone();
            let id = d.id.clone();
            let restore_failed = |e: VirtioRestoreError| match e {
                VirtioRestoreError::Device(source) => DeviceError::Restore {
                    id: id.clone(),
                    source,
                },
                VirtioRestoreError::Transport(e) => restore_err(&id)(e),
            };
            use devices::virtio::persist::restore as restore_virtio;
            match &d.state {
                DeviceState::VirtioBlock(slot) => {
                    let disk = disks
                        .remove(&d.id)
                        .ok_or_else(|| DeviceError::NoDisk(d.id.clone()))?;
                    let mut state = slot.virtio.clone();
                    state.device.path = disk.path;
                    dm.add_virtio(vm, d.id.clone(), |irq| {
                        restore_virtio::<Block>(mem, irq, disk.backing, &state)
                            .map_err(restore_failed)
                    })?;
                }
                DeviceState::VirtioNet(slot) => {
                    let tap = taps.remove(&d.id).ok_or_else(|| DeviceError::BadDevice {
                        id: d.id.clone(),
                        reason: "no TAP was opened for it".into(),
                    })?;
                    dm.add_virtio(vm, d.id.clone(), |irq| {
                        restore_virtio::<Net>(mem, irq, tap, &slot.virtio).map_err(restore_failed)
                    })?;
                }
                DeviceState::VirtioRng(slot) => {
                    dm.add_virtio(vm, d.id.clone(), |irq| {
                        restore_virtio::<Rng>(mem, irq, (), &slot.virtio).map_err(restore_failed)
                    })?;
                }
                DeviceState::VirtioVsock(slot) => {
                    let host = vsock.take();
                    if host.is_none() && slot.virtio.device.uds_path().is_some() {
                        return Err(DeviceError::BadDevice {
                            id: d.id.clone(),
                            reason: "no host socket was opened for it".into(),
                        });
                    }
                    let host = VsockHost {
                        listener: host,
                        services: agent.iter().map(|a| (AGENT_PORT, a.clone())).collect(),
                    };
                    dm.add_virtio(vm, d.id.clone(), |irq| {
                        restore_virtio::<Vsock>(mem, irq, host, &slot.virtio)
                            .map_err(restore_failed)
                    })?;
                }
                // Not virtio: restored with the legacy devices above.
                _ => {}
            }
        }
        if let Some(id) = disks.keys().next() {
            return Err(DeviceError::BadDevice {
                id: id.clone(),
                reason: "the image has its disk but not the device".into(),
            });
        }
        Ok(dm)
    }

    /// Feeds console input to the serial port; returns how many bytes it took.
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        lock(&self.serial).enqueue_input(bytes).unwrap_or(0)
    }

    /// The exit status the guest reported, if it did.
    pub fn exit_status(&self) -> Option<u8> {
        u8::try_from(self.status.load(Ordering::Acquire)).ok()
    }

    fn virtio_at(&self, addr: u64) -> Option<(&VirtioSlot, u64)> {
        self.virtio
            .iter()
            .find(|s| addr >= s.base && addr < s.base + VIRTIO_MMIO_SIZE)
            .map(|s| (s, addr - s.base))
    }
}

impl Drain for DeviceManager {
    /// Serves whatever the virtio queues hold (see `MmioTransport::drain`).
    fn drain(&self) {
        for slot in &self.virtio {
            lock(&slot.transport).drain();
        }
    }
}

impl Bus for DeviceManager {
    fn pio_in(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (COM1_PORT..COM1_PORT + 8).contains(&p) && data.len() == 1 => {
                let mut s = lock(&self.serial);
                data[0] = s.read((p - COM1_PORT) as u8);
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT if data.len() == 1 => {
                let mut k = lock(&self.i8042);
                data[0] = k.read(port);
            }
            p if (RTC_PORT..RTC_PORT + 2).contains(&p) && data.len() == 1 => {
                data[0] = lock(&self.rtc).read((p - RTC_PORT) as u8);
            }
            // Nothing there: the bus floats high.
            _ => data.fill(0xff),
        }
    }

    fn pio_out(&self, port: u16, data: &[u8]) -> PortEffect {
        match port {
            p if (COM1_PORT..COM1_PORT + 8).contains(&p) => {
                if p == COM1_PORT {
                    self.timeline.console_output();
                }
                let mut s = lock(&self.serial);
                for b in data {
                    s.write((p - COM1_PORT) as u8, *b);
                }
                PortEffect::None
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT if data.len() == 1 => {
                lock(&self.i8042).write(port, data[0]);
                // The i8042 signals a CPU reset through its eventfd.
                if self.i8042_reset.read().is_ok() {
                    PortEffect::Reset
                } else {
                    PortEffect::None
                }
            }
            p if (RTC_PORT..RTC_PORT + 2).contains(&p) && data.len() == 1 => {
                lock(&self.rtc).write((p - RTC_PORT) as u8, data[0]);
                PortEffect::None
            }
            // The guest's last word: the agent has synced the disk and
            // drained the console, so the VM ends here rather than after a
            // reboot whose messages would mix with the command's output.
            STATUS_PORT if !data.is_empty() => {
                self.status.store(i32::from(data[0]), Ordering::Release);
                PortEffect::Reset
            }
            PROGRESS_PORT => {
                self.timeline.agent_started();
                PortEffect::None
            }
            _ => PortEffect::None,
        }
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.virtio_at(addr) {
            Some((slot, off)) => lock(&slot.transport).read(off, data),
            None => data.fill(0xff),
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((slot, off)) = self.virtio_at(addr) {
            lock(&slot.transport).write(off, data)
        }
    }
}
