//! A machine's state, memory and disks as a snapshot image, and back.
//!
//! # Sections, in image order
//! | kind   | name                 | holds                                   |
//! |--------|----------------------|-----------------------------------------|
//! | vm     | `machine`            | [`MachineConfig`]                       |
//! | vm     | `kvm`                | KVM's VM-wide state                     |
//! | vcpu   | `0`, `1`, ...        | one vCPU's KVM state                    |
//! | device | `serial/0`, ...      | one device's state ([`SavedDevice`])    |
//! | device | `disk-ref/<device>`  | `--no-disk`: where the disk is, its crc |
//! | device | `disk-overlay/<device>` | a warm image's copy-on-write disk: its base and written blocks |
//! | memory |                      | guest RAM, in chunks                    |
//! | disk   | `<device>`           | the disk of that virtio-blk device      |
//!
//! States come before memory so a restore can build the VM (and check the
//! host) before memory streams in; disks come last because they are the
//! largest and least urgent. Disks are bound to their device by its id.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use snapshot::{
    decode_state, flags, id_hex, ApplyOptions, EncodeOptions, FileSource, Header, ImageReader,
    ImageWriter, Kind, Section, SnapshotError,
};

use crate::atomic_file::{AtomicFile, AtomicFileError};
use crate::device_manager::persist::SavedDevice;
use crate::device_manager::{scratch_file, DiskFile, DiskView};
use crate::events::{SnapshotOptions, SnapshotTarget};
use crate::host::host_cpu;
use crate::kvm::persist::{VcpuState, VmState};
use crate::memory::{DirtyPages, GuestRam, RamSink};
use crate::page_server::LazyMemory;
use crate::state::{MachineConfig, MachineState};
use devices::virtio::block::{Backing, Overlay};

/// Section names, written and read only through these.
pub mod sections {
    /// vm: the machine description.
    pub const MACHINE: &str = "machine";
    /// vm: KVM's VM-wide state.
    pub const KVM: &str = "kvm";
    /// vm: an increment's parent ([`super::ParentRef`]).
    pub const PARENT: &str = "parent";
    /// device: a disk left out of the image, by device id.
    pub const DISK_REF_PREFIX: &str = "disk-ref/";
    /// device: the base and written blocks of a copy-on-write disk, by
    /// device id; the disk section of that device holds the written blocks.
    pub const DISK_OVERLAY_PREFIX: &str = "disk-overlay/";

    /// vcpu: the section of vCPU `id`.
    pub fn vcpu(id: u8) -> String {
        id.to_string()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Image(#[from] SnapshotError),
    #[error(transparent)]
    File(#[from] AtomicFileError),
    #[error("cannot read disk {path}")]
    Disk {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the image has no '{0}' section")]
    Missing(&'static str),
    #[error("the image ends before its memory")]
    NoMemory,
    #[error("increment {image} needs its parent, image {parent_id} at {path}: {reason}")]
    Parent {
        image: String,
        parent_id: String,
        path: String,
        reason: String,
    },
    #[error("increment {0} has more than {MAX_CHAIN} images below it")]
    ChainTooLong(String),
    #[error("the image's memory layout does not match its machine ({0})")]
    Layout(String),
    #[error("the disk {path} no longer matches the image ({reason}); restore from an image taken with the disk")]
    DiskChanged { path: String, reason: String },
    #[error("cannot create the restored disk {path}")]
    CreateDisk {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the restored disk {path}")]
    WriteDisk {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--no-disk: the disk over {0} is ephemeral (copy-on-write), its changes live only in this VM; take the snapshot with the disk")]
    EphemeralNoDisk(String),
    #[error("the image's copy-on-write disk {device} does not fit its base {base}")]
    BadOverlay {
        device: String,
        base: String,
        #[source]
        source: devices::virtio::block::OverlayError,
    },
}

/// Where an image goes, opened before the VM pauses: a destination that
/// must be refused is refused while the guest still runs.
pub enum ImageOutput {
    /// A file, written atomically (temporary file, fsync, rename).
    File(AtomicFile, File),
    /// A stream (the API response body), written as it is produced.
    Stream(Box<dyn Write + Send>),
}

impl ImageOutput {
    pub fn open(target: SnapshotTarget) -> Result<Self, ImageError> {
        Ok(match target {
            SnapshotTarget::Path(path) => {
                let (atomic, file) = AtomicFile::create(&path)?;
                ImageOutput::File(atomic, file)
            }
            SnapshotTarget::Stream(w) => ImageOutput::Stream(w),
        })
    }

    /// Lets go of this process's handle on an output a forked child now
    /// writes: the temporary file stays (the child commits or removes
    /// it); its path is returned, to remove if the child dies midway.
    pub fn disown(self) -> Option<PathBuf> {
        match self {
            ImageOutput::File(atomic, _file) => Some(atomic.disown()),
            ImageOutput::Stream(_) => None,
        }
    }
}

/// How a copy-on-write (`--ephemeral`) disk goes into an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverlayMode {
    /// As the guest sees it, whole: the image stands on its own.
    Merged,
    /// The written blocks and the identity of the base, which must still be
    /// the same file at restore: a warm image in this host's cache.
    Reference,
}

/// A file and what tells a changed one apart: any write changes its
/// ctime, which no one can set back.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileIdentity {
    pub path: PathBuf,
    pub size: u64,
    pub dev: u64,
    pub ino: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl FileIdentity {
    pub fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let path = std::fs::canonicalize(path)?;
        let m = std::fs::metadata(&path)?;
        Ok(FileIdentity {
            size: m.len(),
            dev: m.dev(),
            ino: m.ino(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            path,
        })
    }
}

/// A copy-on-write disk in an image ([`OverlayMode::Reference`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OverlayRef {
    pub base: FileIdentity,
    /// Runs of written blocks (first, count) of 4 KiB
    /// (`devices::virtio::block::OVERLAY_BLOCK`).
    pub written: Vec<(u64, u64)>,
}

/// An overlay for the writer's threads: what its guest sees (`merged`), or
/// only the blocks it wrote, zeros elsewhere.
struct OverlaySource<'a> {
    overlay: &'a Overlay,
    merged: bool,
}

impl snapshot::PageSource for OverlaySource<'_> {
    fn len(&self) -> u64 {
        self.overlay.len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if self.merged {
            self.overlay.read_at(buf, offset)
        } else {
            self.overlay.read_written_at(buf, offset)
        }
    }
}

/// A disk as it was when its device began keeping, in `log`, what it
/// overwrites (`devices::virtio::block::pre_write`).
struct AsAtFork<'a> {
    source: &'a dyn snapshot::PageSource,
    log: &'a File,
}

impl snapshot::PageSource for AsAtFork<'_> {
    fn len(&self) -> u64 {
        self.source.len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        // The disk first, the log after: see pre_write's ordering.
        self.source.read_at(offset, buf)?;
        devices::virtio::block::pre_write::patch_from_log(self.log, self.source.len(), offset, buf)
    }
}

/// A disk left out of the image (`--no-disk`): where it was and how to
/// recognise it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskRef {
    pub path: PathBuf,
    pub size: u64,
    /// crc32c of the whole disk.
    pub crc32c: u32,
}

/// What a written image holds, for the API's answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct Written {
    pub id: [u8; 16],
    /// `id` in hex.
    pub image_id: String,
    pub destination: String,
    pub summary: snapshot::WriteSummary,
}

fn disk_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Disk {
        path: path.display().to_string(),
        source,
    }
}

/// Size and crc32c of a whole disk file.
fn disk_crc(file: &File, path: &Path) -> Result<(u64, u32), ImageError> {
    use std::os::unix::fs::FileExt;
    let size = file.metadata().map_err(disk_err(path))?.len();
    let mut crc = 0u32;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let n = buf.len().min((size - off) as usize);
        file.read_exact_at(&mut buf[..n], off)
            .map_err(disk_err(path))?;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        off += n as u64;
    }
    Ok((size, crc))
}

/// Marks the progress ended however the write ends.
struct Ending<'a>(&'a Progress);

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// How far an image being written has got: bytes of memory and disks
/// done, of a total (0 while none is being written). The API reports it
/// (`GET /vm`), for `vmm snapshot`'s progress bar.
#[derive(Debug, Default)]
pub struct Progress {
    done: Arc<AtomicU64>,
    total: AtomicU64,
}

impl Progress {
    /// (done, total) while an image is being written.
    pub fn now(&self) -> Option<(u64, u64)> {
        let total = self.total.load(Ordering::Acquire);
        (total > 0).then(|| (self.done.load(Ordering::Relaxed).min(total), total))
    }

    fn start(&self, total: u64) {
        self.set(0, total);
    }

    /// Where a write elsewhere (a child process's) has got.
    pub(crate) fn set(&self, done: u64, total: u64) {
        self.done.store(done, Ordering::Relaxed);
        self.total.store(total, Ordering::Release);
    }

    pub(crate) fn end(&self) {
        self.total.store(0, Ordering::Release);
    }
}

/// Where an increment's parent was when the increment was written (vm
/// section `parent`; the header names it by id), so a restore can find it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ParentRef {
    /// Absolute.
    pub path: PathBuf,
}

/// What makes an image an increment.
pub struct Increment<'a> {
    pub parent_id: [u8; 16],
    /// Absolute.
    pub parent_path: &'a Path,
    /// The pages written since the parent.
    pub dirty: &'a DirtyPages,
}

/// How an image is written, beyond what was asked for.
pub struct WriteHow<'a> {
    /// Only the memory pages written since a parent image.
    pub increment: Option<Increment<'a>>,
    /// How an ephemeral disk's overlay goes in.
    pub overlays: OverlayMode,
    /// The guest agent froze the guest's filesystems first.
    pub quiesced: bool,
    /// Where to count the bytes done.
    pub progress: Option<&'a Progress>,
    /// Disks (by device id) whose device keeps what it overwrites in a
    /// log for this writer, a forked child: read as they were at the fork.
    pub kept_disks: &'a [(String, File)],
}

/// Writes a paused machine's `state`, its memory and its `disks` (device
/// id, file) to `target`. A file target appears whole or not at all.
pub fn write(
    state: &MachineState,
    ram: &GuestRam,
    disks: &[(String, DiskView)],
    options: &SnapshotOptions,
    how: &WriteHow,
    output: ImageOutput,
) -> Result<Written, ImageError> {
    let (overlays, quiesced) = (how.overlays, how.quiesced);
    let (vendor, signature) = host_cpu();
    // Whether a disk is held whole: a referenced overlay is not.
    let whole_disk = !options.no_disk
        && disks.iter().any(|(_, v)| match v {
            DiskView::File(_) => true,
            DiskView::Overlay { .. } => overlays == OverlayMode::Merged,
        });
    let mut flags = if whole_disk { flags::HAS_DISK } else { 0 };
    if quiesced {
        flags |= flags::QUIESCED;
    }
    if how.increment.is_some() {
        flags |= flags::INCREMENTAL;
    }
    let mut header = Header::new("x86_64", &vendor, signature, flags);
    header.parent_id = how.increment.as_ref().map(|i| i.parent_id);
    let opts = EncodeOptions {
        compression: options.compress,
        ..Default::default()
    };
    let write_all = |out: &mut dyn Write| -> Result<snapshot::WriteSummary, ImageError> {
        let mut w = ImageWriter::new(out, &header)?;
        w.write_state(Kind::VM, sections::MACHINE, &state.config)?;
        w.write_state(Kind::VM, sections::KVM, &state.vm)?;
        if let Some(inc) = &how.increment {
            let parent = ParentRef {
                path: inc.parent_path.to_path_buf(),
            };
            w.write_state(Kind::VM, sections::PARENT, &parent)?;
        }
        for v in &state.vcpus {
            w.write_state(Kind::VCPU, &sections::vcpu(v.id), v)?;
        }
        for d in &state.devices {
            w.write_state(Kind::DEVICE, &d.id, &d.state)?;
        }
        let mut files: Vec<(&str, &Path, File)> = Vec::with_capacity(disks.len());
        let mut views: Vec<(&str, Box<dyn snapshot::PageSource + '_>)> = Vec::new();
        for (id, view) in disks {
            match view {
                DiskView::File(path) if options.no_disk => {
                    let file = File::open(path).map_err(disk_err(path))?;
                    let (size, crc32c) = disk_crc(&file, path)?;
                    let r = DiskRef {
                        path: std::fs::canonicalize(path).unwrap_or_else(|_| path.clone()),
                        size,
                        crc32c,
                    };
                    let name = format!("{}{id}", sections::DISK_REF_PREFIX);
                    w.write_state(Kind::DEVICE, &name, &r)?;
                }
                DiskView::File(path) => {
                    files.push((id, path, File::open(path).map_err(disk_err(path))?));
                }
                DiskView::Overlay { base, overlay } => match overlays {
                    OverlayMode::Reference => {
                        let r = OverlayRef {
                            base: FileIdentity::of(base).map_err(disk_err(base))?,
                            written: overlay.written_extents(),
                        };
                        let name = format!("{}{id}", sections::DISK_OVERLAY_PREFIX);
                        w.write_state(Kind::DEVICE, &name, &r)?;
                        let written = OverlaySource {
                            overlay,
                            merged: false,
                        };
                        views.push((id, Box::new(written)));
                    }
                    OverlayMode::Merged if options.no_disk => {
                        return Err(ImageError::EphemeralNoDisk(base.display().to_string()))
                    }
                    OverlayMode::Merged => views.push((
                        id,
                        Box::new(OverlaySource {
                            overlay,
                            merged: true,
                        }),
                    )),
                },
            }
        }
        let mut lens = Vec::with_capacity(files.len());
        for (_, path, file) in &files {
            lens.push(file.metadata().map_err(disk_err(path))?.len());
        }
        let regions = ram.slices();
        if let Some(p) = how.progress {
            let memory: u64 = regions.iter().map(|(_, m)| m.len() as u64).sum();
            let disks: u64 =
                lens.iter().sum::<u64>() + views.iter().map(|(_, v)| v.len()).sum::<u64>();
            p.start(memory + disks);
            w.report_progress(p.done.clone());
        }
        let dirty = how.increment.as_ref().map(|i| i.dirty.as_slice());
        w.write_memory(&regions, dirty, opts)?;
        let mut write_disk = |id: &str, source: &dyn snapshot::PageSource| match how
            .kept_disks
            .iter()
            .find(|(k, _)| k == id)
        {
            Some((_, log)) => w.write_disk(id, &AsAtFork { source, log }, opts),
            None => w.write_disk(id, source, opts),
        };
        for ((id, _, file), len) in files.into_iter().zip(lens) {
            write_disk(id, &FileSource { file: &file, len })?;
        }
        for (id, source) in views {
            write_disk(id, source.as_ref())?;
        }
        Ok(w.finish()?.1)
    };
    let _ending = how.progress.map(Ending);
    let (summary, destination) = match output {
        ImageOutput::File(atomic, file) => {
            let path = atomic.destination().display().to_string();
            let mut out = BufWriter::with_capacity(1 << 20, file);
            let summary = write_all(&mut out)?;
            let file = out
                .into_inner()
                .map_err(|e| ImageError::Image(SnapshotError::Write(e.into_error())))?;
            atomic.commit(file)?;
            (summary, path)
        }
        ImageOutput::Stream(w) => {
            let mut out = BufWriter::with_capacity(1 << 20, w);
            let summary = write_all(&mut out)?;
            out.flush().map_err(SnapshotError::Write)?;
            (summary, "stream".to_string())
        }
    };
    Ok(Written {
        id: header.image_id,
        image_id: id_hex(&header.image_id),
        destination,
        summary,
    })
}

/// Whether `a` and `b` name the same existing file.
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => (x.dev(), x.ino()) == (y.dev(), y.ino()),
        _ => false,
    }
}

/// The header of the image file at `path`.
pub fn read_header(path: &Path) -> Result<Header, ImageError> {
    let file = File::open(path).map_err(SnapshotError::Read)?;
    Ok(ImageReader::new(BufReader::new(file))?.header().clone())
}

/// The most images below an increment: a bound on a cycle of references.
const MAX_CHAIN: usize = 64;

/// A parent image, read up to its memory.
struct ParentImage {
    reader: ImageReader<BufReader<File>>,
    layout: snapshot::MemoryLayout,
    /// Where it was found.
    path: PathBuf,
}

impl ParentImage {
    /// An increment's memory lies over its parents': the same regions.
    fn check_layout(&self, child: &snapshot::MemoryLayout) -> Result<(), ImageError> {
        if self.layout.regions == child.regions {
            return Ok(());
        }
        Err(ImageError::Layout(format!(
            "parent {} has regions {:x?}, its increment {:x?}",
            id_hex(&self.reader.header().image_id),
            self.layout.regions,
            child.regions
        )))
    }
}

/// Opens the parents of increment `top` (read from `source`, recording
/// `parent`), base first, each read up to its memory. A parent is looked
/// for at the path its child recorded, then under the same file name next
/// to the child (images moved together); it must carry the id its child
/// names, and the chain must hold together (`snapshot::check_chain`).
fn open_parents(
    top: &Header,
    parent: Option<&ParentRef>,
    source: &str,
) -> Result<Vec<ParentImage>, ImageError> {
    let mut chain: Vec<ParentImage> = Vec::new();
    let (mut child_id, mut child_path) = (top.image_id, PathBuf::from(source));
    let (mut want, mut next) = (top.parent_id, parent.cloned());
    while let Some(parent_id) = want {
        if chain.len() == MAX_CHAIN {
            return Err(ImageError::ChainTooLong(id_hex(&top.image_id)));
        }
        let recorded = next.take().map(|r| r.path);
        let err = |path: &Path, reason: String| ImageError::Parent {
            image: id_hex(&child_id),
            parent_id: id_hex(&parent_id),
            path: path.display().to_string(),
            reason,
        };
        let Some(recorded) = recorded else {
            return Err(err(
                Path::new("?"),
                "the increment does not say where its parent is".into(),
            ));
        };
        let beside = child_path
            .parent()
            .zip(recorded.file_name())
            .map(|(dir, name)| dir.join(name))
            .filter(|b| *b != recorded);
        // The recorded path first; next to the child if that is missing
        // or holds another image.
        let mut found = None;
        let mut problems = Vec::new();
        for path in std::iter::once(&recorded).chain(beside.as_ref()) {
            let opened = File::open(path).map_err(|e| e.to_string()).and_then(|f| {
                ImageReader::new(BufReader::with_capacity(1 << 20, f)).map_err(|e| e.to_string())
            });
            let problem = match opened {
                Ok(r) if r.header().image_id == parent_id => {
                    found = Some((r, path.clone()));
                    break;
                }
                Ok(r) => format!("that file is image {}", id_hex(&r.header().image_id)),
                Err(e) => e,
            };
            problems.push((path, problem));
        }
        let Some((mut reader, path)) = found else {
            let mut reason = String::new();
            for (i, (path, problem)) in problems.iter().enumerate() {
                match i {
                    0 => reason += problem,
                    _ => reason += &format!("; nor at {}: {problem}", path.display()),
                }
            }
            return Err(err(&recorded, reason));
        };
        let mut grandparent = None;
        let layout = loop {
            match reader
                .next_section()
                .map_err(|e| err(&path, e.to_string()))?
            {
                Section::State {
                    kind: Kind::VM,
                    name,
                    payload,
                } if name == sections::PARENT => {
                    grandparent = Some(decode_state("vm 'parent'", &payload)?);
                }
                Section::Memory(layout) => break layout,
                Section::End => return Err(err(&path, "it holds no memory".into())),
                _ => {}
            }
        };
        want = reader.header().parent_id;
        (child_id, next) = (parent_id, grandparent);
        child_path = path.clone();
        chain.push(ParentImage {
            reader,
            layout,
            path,
        });
    }
    chain.reverse();
    let mut headers: Vec<&Header> = chain.iter().map(|p| p.reader.header()).collect();
    headers.push(top);
    snapshot::check_chain(&headers)?;
    Ok(chain)
}

/// The images an increment at `path` builds on, base first, as a restore
/// would find them: (image id, where it is). Empty for a full image.
pub fn parents_of(path: &str) -> Result<Vec<(String, PathBuf)>, ImageError> {
    let file = File::open(path).map_err(SnapshotError::Read)?;
    let image = ImageIn::open(Box::new(file), path)?;
    let parents = open_parents(image.header(), image.parent.as_ref(), path)?;
    Ok(parents
        .iter()
        .map(|p| (id_hex(&p.reader.header().image_id), p.path.clone()))
        .collect())
}

/// Writes the increment at `source` and the images below it as one full
/// image at `out`, atomically: the increment's states and disks, and the
/// chain's memory merged (in this process's memory: only pages with data
/// take room). Returns what was written, and how many images were below
/// the increment.
pub fn flatten(
    source: &str,
    out: &Path,
    compression: snapshot::Compression,
) -> Result<(Written, usize), ImageError> {
    // States that would not restore are refused, not copied: read them
    // as a restore does (they are small; the memory is not read here).
    let file = File::open(source).map_err(SnapshotError::Read)?;
    ImageIn::open(Box::new(file), source)?;
    let file = File::open(source).map_err(SnapshotError::Read)?;
    let mut top = ImageReader::new(BufReader::with_capacity(1 << 20, file))?;
    let mut states = Vec::new();
    let mut parent: Option<ParentRef> = None;
    let layout = loop {
        match top.next_section()? {
            Section::State {
                kind: Kind::VM,
                name,
                payload,
            } if name == sections::PARENT => parent = Some(decode_state("vm 'parent'", &payload)?),
            Section::State {
                kind,
                name,
                payload,
            } => states.push((kind, name, payload)),
            Section::Memory(layout) => break layout,
            Section::Skipped { .. } => {}
            _ => return Err(ImageError::NoMemory),
        }
    };
    let parents = open_parents(top.header(), parent.as_ref(), source)?;
    let mut memory: Vec<(u64, Vec<u8>)> = layout
        .regions
        .iter()
        .map(|&(addr, len)| (addr, vec![0u8; len as usize]))
        .collect();
    let mut into: Vec<(u64, &mut [u8])> = memory
        .iter_mut()
        .map(|(a, m)| (*a, m.as_mut_slice()))
        .collect();
    let fresh = ApplyOptions {
        threads: 0,
        dest_is_zeroed: true,
    };
    let below = parents.len();
    for p in parents {
        p.check_layout(&layout)?;
        let mut r = p.reader;
        r.read_memory_into(&mut into, fresh)?;
    }
    let mut next = top.read_memory_into(&mut into, fresh)?.1;
    drop(into);

    let h = top.header();
    let header = Header::new(
        &h.arch,
        &h.cpu_vendor,
        h.cpu_signature,
        h.flags & !flags::INCREMENTAL,
    );
    let (atomic, file) = AtomicFile::create(out)?;
    let scratch_dir = atomic
        .destination()
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let mut sink = BufWriter::with_capacity(1 << 20, file);
    let mut w = ImageWriter::new(&mut sink, &header)?;
    for (kind, name, payload) in &states {
        w.write_section(*kind, name, payload)?;
    }
    let opts = EncodeOptions {
        compression,
        chunk_pages: layout.chunk_pages,
        ..Default::default()
    };
    let regions: Vec<(u64, &[u8])> = memory.iter().map(|(a, m)| (*a, m.as_slice())).collect();
    w.write_memory(&regions, None, opts)?;
    loop {
        match next {
            Section::Disk(info) => {
                let err = |source| ImageError::CreateDisk {
                    path: scratch_dir.display().to_string(),
                    source,
                };
                let disk = scratch_file(&scratch_dir).map_err(err)?;
                next = top.read_disk_into(&disk, fresh)?.1;
                let len = disk.metadata().map_err(err)?.len();
                w.write_disk(&info.name, &FileSource { file: &disk, len }, opts)?;
            }
            Section::Skipped { .. } => next = top.next_section()?,
            Section::End => break,
            _ => {
                return Err(ImageError::Layout(
                    "a section other than a disk follows the memory".into(),
                ))
            }
        }
    }
    let summary = w.finish()?.1;
    let file = sink
        .into_inner()
        .map_err(|e| ImageError::Image(SnapshotError::Write(e.into_error())))?;
    let destination = atomic.destination().display().to_string();
    atomic.commit(file)?;
    let written = Written {
        id: header.image_id,
        image_id: id_hex(&header.image_id),
        destination,
        summary,
    };
    Ok((written, below))
}

/// An image being read: its states are in, its memory and disks follow.
pub struct ImageIn {
    reader: ImageReader<BufReader<Box<dyn Read>>>,
    /// The path it is read from, or "-".
    source: String,
    /// An increment's parent.
    parent: Option<ParentRef>,
    state: MachineState,
    disk_refs: Vec<(String, DiskRef)>,
    overlay_refs: HashMap<String, OverlayRef>,
    /// The first section after the states.
    next: Section,
}

impl ImageIn {
    /// Reads the header and every state section of the image `from`,
    /// read from `source` (a path, or "-").
    pub fn open(from: Box<dyn Read>, source: &str) -> Result<Self, ImageError> {
        let mut reader = ImageReader::new(BufReader::with_capacity(1 << 20, from))?;
        let mut config: Option<MachineConfig> = None;
        let mut vm: Option<VmState> = None;
        let mut vcpus: Vec<VcpuState> = Vec::new();
        let mut devices: Vec<SavedDevice> = Vec::new();
        let mut disk_refs: Vec<(String, DiskRef)> = Vec::new();
        let mut overlay_refs: HashMap<String, OverlayRef> = HashMap::new();
        let mut parent: Option<ParentRef> = None;
        let next = loop {
            match reader.next_section()? {
                Section::State {
                    kind,
                    name,
                    payload,
                } => match kind {
                    Kind::VM if name == sections::MACHINE => {
                        config = Some(decode_state("vm 'machine'", &payload)?)
                    }
                    Kind::VM if name == sections::KVM => {
                        vm = Some(decode_state("vm 'kvm'", &payload)?)
                    }
                    Kind::VM if name == sections::PARENT => {
                        parent = Some(decode_state("vm 'parent'", &payload)?)
                    }
                    Kind::VCPU => vcpus.push(decode_state(&format!("vcpu '{name}'"), &payload)?),
                    Kind::DEVICE => {
                        let what = format!("device '{name}'");
                        if let Some(id) = name.strip_prefix(sections::DISK_REF_PREFIX) {
                            disk_refs.push((id.to_string(), decode_state(&what, &payload)?));
                        } else if let Some(id) = name.strip_prefix(sections::DISK_OVERLAY_PREFIX) {
                            overlay_refs.insert(id.to_string(), decode_state(&what, &payload)?);
                        } else {
                            devices.push(SavedDevice {
                                state: decode_state(&what, &payload)?,
                                id: name,
                            });
                        }
                    }
                    _ => log::warn!("restore: ignoring state section {name}"),
                },
                Section::Skipped { .. } => {}
                other => break other,
            }
        };
        let config = config.ok_or(ImageError::Missing(sections::MACHINE))?;
        if vcpus.len() != usize::from(config.vcpus)
            || vcpus
                .iter()
                .enumerate()
                .any(|(i, v)| usize::from(v.id) != i)
        {
            return Err(ImageError::Layout(format!(
                "{} vCPU sections for a {}-vCPU machine",
                vcpus.len(),
                config.vcpus
            )));
        }
        Ok(ImageIn {
            reader,
            source: source.to_string(),
            parent,
            state: MachineState {
                config,
                vm: vm.ok_or(ImageError::Missing(sections::KVM))?,
                vcpus,
                devices,
            },
            disk_refs,
            overlay_refs,
            next,
        })
    }

    pub fn header(&self) -> &Header {
        self.reader.header()
    }

    pub fn state(&self) -> &MachineState {
        &self.state
    }

    /// Reads memory into `ram` (decoded on all cores), then each disk into
    /// a new sparse file in `disk_dir`, and checks the disks the image left
    /// out. Returns the machine's state, the disk of each device, and the
    /// memory still to fetch.
    ///
    /// With `lazy` (the image's file, `source` naming it) and an image that
    /// can be read out of order (a full image with an index that agrees
    /// with it), memory is left out: `ram` is not touched, the disks are
    /// read past the memory chunks, and the chunks are returned for the
    /// page server ([`crate::page_server`]). Otherwise memory is read here.
    pub fn read_contents(
        self,
        ram: &GuestRam,
        disk_dir: &Path,
        lazy: Option<(File, &str)>,
    ) -> Result<Contents, ImageError> {
        let ImageIn {
            mut reader,
            source,
            parent,
            state,
            disk_refs,
            mut overlay_refs,
            next,
        } = self;
        let image_id = id_hex(&reader.header().image_id);
        let Section::Memory(layout) = next else {
            return Err(ImageError::NoMemory);
        };
        let want = GuestRam::regions(state.config.mem_mib);
        if layout.regions != want {
            return Err(ImageError::Layout(format!(
                "regions {:x?}, expected {want:x?}",
                layout.regions
            )));
        }
        let fresh = ApplyOptions {
            threads: 0,
            dest_is_zeroed: true,
        };
        let lazy = match lazy {
            Some((file, source)) if !reader.header().is_incremental() => {
                lazy_plan(file, &layout, reader.position(), source)?
            }
            _ => None,
        };
        let mut next = match &lazy {
            Some(plan) => {
                let rest = Positioned {
                    file: plan.file.try_clone().map_err(SnapshotError::Read)?,
                    pos: plan.end,
                };
                let header = reader.header().clone();
                reader = ImageReader::resume_at(
                    BufReader::with_capacity(1 << 20, Box::new(rest) as Box<dyn Read>),
                    header,
                    plan.end,
                );
                reader.next_section()?
            }
            None if reader.header().is_incremental() => {
                let parents = open_parents(reader.header(), parent.as_ref(), &source)?;
                for (i, p) in parents.into_iter().enumerate() {
                    p.check_layout(&layout)?;
                    let mut r = p.reader;
                    let opts = ApplyOptions {
                        dest_is_zeroed: i == 0,
                        ..fresh
                    };
                    r.read_memory_with(&RamSink(ram), opts)?;
                }
                reader.read_memory_with(&RamSink(ram), fresh)?.1
            }
            None => reader.read_memory_with(&RamSink(ram), fresh)?.1,
        };
        let mut disks = HashMap::new();
        loop {
            match next {
                Section::Disk(info) if overlay_refs.contains_key(&info.name) => {
                    let r = overlay_refs
                        .remove(&info.name)
                        .unwrap_or_else(|| unreachable!());
                    let base = open_overlay_base(&r.base)?;
                    let create_err = |source| ImageError::CreateDisk {
                        path: disk_dir.display().to_string(),
                        source,
                    };
                    let upper = scratch_file(disk_dir).map_err(create_err)?;
                    let (_, after) = reader.read_disk_into(&upper, fresh)?;
                    let overlay = Overlay::with_written(base, info.size, upper, &r.written)
                        .map_err(|source| ImageError::BadOverlay {
                            device: info.name.clone(),
                            base: r.base.path.display().to_string(),
                            source,
                        })?;
                    log::info!(
                        "restore: disk of {} is copy-on-write over {}",
                        info.name,
                        r.base.path.display()
                    );
                    disks.insert(
                        info.name,
                        DiskFile {
                            path: r.base.path,
                            backing: Backing::Overlay(overlay),
                        },
                    );
                    next = after;
                    continue;
                }
                Section::Disk(info) => {
                    let path = restored_disk_path(disk_dir, &image_id, &info.name)?;
                    let file = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .open(&path)
                        .map_err(|source| ImageError::CreateDisk {
                            path: path.display().to_string(),
                            source,
                        })?;
                    log::info!("restore: disk of {} → {}", info.name, path.display());
                    let (_, after) = reader.read_disk_into(&file, fresh)?;
                    disks.insert(
                        info.name,
                        DiskFile {
                            path,
                            backing: Backing::File(file),
                        },
                    );
                    next = after;
                    continue;
                }
                Section::End => break,
                Section::Memory(_) | Section::Chunk(_) => {
                    return Err(ImageError::Layout(
                        "memory data after the memory section".into(),
                    ))
                }
                Section::State { ref name, .. } => log::warn!("restore: ignoring section {name}"),
                Section::Skipped { .. } => {}
            }
            next = reader.next_section()?;
        }
        if let Some(id) = overlay_refs.keys().next() {
            return Err(ImageError::Layout(format!(
                "the copy-on-write disk of {id} has no disk section"
            )));
        }
        for (id, r) in disk_refs {
            let file = check_disk_ref(&r)?;
            disks.insert(
                id,
                DiskFile {
                    path: r.path,
                    backing: Backing::File(file),
                },
            );
        }
        for d in disks.values() {
            // An overlay dies with the VM: nothing to make durable.
            if let Backing::File(file) = &d.backing {
                file.sync_all().map_err(|source| ImageError::WriteDisk {
                    path: d.path.display().to_string(),
                    source,
                })?;
            }
        }
        Ok(Contents {
            state,
            disks,
            lazy: lazy.map(|p| LazyMemory {
                file: p.file,
                chunks: p.chunks,
                source: p.source,
            }),
        })
    }
}

/// What [`ImageIn::read_contents`] read.
pub struct Contents {
    pub state: MachineState,
    /// The disk of each device, by device id.
    pub disks: HashMap<String, DiskFile>,
    /// Memory left in the image, for the page server.
    pub lazy: Option<LazyMemory>,
}

/// Where a lazy restore's memory chunks are, and where the image goes on.
struct LazyPlan {
    file: File,
    chunks: Vec<snapshot::ChunkLocation>,
    end: u64,
    source: String,
}

/// The memory chunks of the image in `file` (whose memory section the
/// streaming reader has just read, ending at `memory_end`), if it can be
/// restored lazily; `None` for an image without an index (one written
/// without it: its memory is read in order). An index that disagrees with
/// the image is an error, as the streaming reader would find at the end.
fn lazy_plan(
    file: File,
    layout: &snapshot::MemoryLayout,
    memory_end: u64,
    source: &str,
) -> Result<Option<LazyPlan>, ImageError> {
    let mut at = Positioned {
        file: file.try_clone().map_err(SnapshotError::Read)?,
        pos: 0,
    };
    let index = match snapshot::read_index(&mut at) {
        Ok(index) => index,
        Err(e) => {
            log::info!("restore: memory read in order: the image has no usable index ({e})");
            return Ok(None);
        }
    };
    let chunks = snapshot::memory_chunks(&index, layout, memory_end)?;
    Ok(Some(LazyPlan {
        file,
        chunks: chunks.chunks,
        end: chunks.end,
        source: source.to_string(),
    }))
}

/// A file read with positioned reads from its own position: clones of one
/// descriptor share the file offset, these do not, so the image's reader,
/// the index reader and the page server never move each other.
struct Positioned {
    file: File,
    pos: u64,
}

impl Read for Positioned {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl std::io::Seek for Positioned {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        use std::io::SeekFrom;
        let base = match to {
            SeekFrom::Start(n) => {
                self.pos = n;
                return Ok(n);
            }
            SeekFrom::End(d) => (self.file.metadata()?.len(), d),
            SeekFrom::Current(d) => (self.pos, d),
        };
        self.pos = base
            .0
            .checked_add_signed(base.1)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        Ok(self.pos)
    }
}

/// Opens the base of a saved overlay, read-only, if it is still the file
/// the overlay was written over.
fn open_overlay_base(saved: &FileIdentity) -> Result<File, ImageError> {
    let changed = |reason: String| ImageError::DiskChanged {
        path: saved.path.display().to_string(),
        reason,
    };
    let now = FileIdentity::of(&saved.path).map_err(|e| changed(e.to_string()))?;
    if &now != saved {
        return Err(changed("it was modified or replaced since".into()));
    }
    File::open(&saved.path).map_err(|e| changed(e.to_string()))
}

/// Opens a disk the image left out, if it is still the one it was.
fn check_disk_ref(r: &DiskRef) -> Result<File, ImageError> {
    let changed = |reason: String| ImageError::DiskChanged {
        path: r.path.display().to_string(),
        reason,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&r.path)
        .map_err(|e| changed(e.to_string()))?;
    let (size, crc) = disk_crc(&file, &r.path)?;
    if size != r.size || crc != r.crc32c {
        return Err(changed(format!(
            "size {size} (was {}), crc32c {crc:#x} (was {:#x})",
            r.size, r.crc32c
        )));
    }
    Ok(file)
}

/// `DIR/IMAGE-DEVICE.img` (the device id's `/` as `-`), or with a counter
/// if it exists, so parallel restores of one image each get their own disk.
fn restored_disk_path(dir: &Path, image_id: &str, device: &str) -> Result<PathBuf, ImageError> {
    std::fs::create_dir_all(dir).map_err(|source| ImageError::CreateDisk {
        path: dir.display().to_string(),
        source,
    })?;
    let stem = format!("{image_id}-{}", device.replace('/', "-"));
    let path = dir.join(format!("{stem}.img"));
    if !path.exists() {
        return Ok(path);
    }
    for i in 1.. {
        let p = dir.join(format!("{stem}.{i}.img"));
        if !p.exists() {
            return Ok(p);
        }
    }
    Ok(path)
}
