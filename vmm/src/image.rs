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

use serde::{Deserialize, Serialize};
use snapshot::{
    decode_state, flags, id_hex, ApplyOptions, EncodeOptions, FileSource, Header, ImageReader,
    ImageWriter, Kind, Section, SnapshotError,
};

use crate::atomic_file::{AtomicFile, AtomicFileError};
use crate::device_manager::persist::SavedDevice;
use crate::device_manager::DiskFile;
use crate::events::{SnapshotOptions, SnapshotTarget};
use crate::host::host_cpu;
use crate::kvm::persist::{VcpuState, VmState};
use crate::memory::{GuestRam, RamSink};
use crate::state::{MachineConfig, MachineState};

/// Section names, written and read only through these.
pub mod sections {
    /// vm: the machine description.
    pub const MACHINE: &str = "machine";
    /// vm: KVM's VM-wide state.
    pub const KVM: &str = "kvm";
    /// device: a disk left out of the image, by device id.
    pub const DISK_REF_PREFIX: &str = "disk-ref/";

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
pub struct Written {
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

/// Writes a paused machine's `state`, its memory and its `disks` (device
/// id, file) to `target`. A file target appears whole or not at all.
/// `quiesced`: the guest agent froze the guest's filesystems first.
pub fn write(
    state: &MachineState,
    ram: &GuestRam,
    disks: &[(String, PathBuf)],
    options: &SnapshotOptions,
    quiesced: bool,
    target: SnapshotTarget,
) -> Result<Written, ImageError> {
    let (vendor, signature) = host_cpu();
    let mut flags = if options.no_disk || disks.is_empty() {
        0
    } else {
        flags::HAS_DISK
    };
    if quiesced {
        flags |= flags::QUIESCED;
    }
    let header = Header::new("x86_64", &vendor, signature, flags);
    let opts = EncodeOptions {
        compression: options.compress,
        ..Default::default()
    };
    let write_all = |out: &mut dyn Write| -> Result<snapshot::WriteSummary, ImageError> {
        let mut w = ImageWriter::new(out, &header)?;
        w.write_state(Kind::VM, sections::MACHINE, &state.config)?;
        w.write_state(Kind::VM, sections::KVM, &state.vm)?;
        for v in &state.vcpus {
            w.write_state(Kind::VCPU, &sections::vcpu(v.id), v)?;
        }
        for d in &state.devices {
            w.write_state(Kind::DEVICE, &d.id, &d.state)?;
        }
        let mut files = Vec::with_capacity(disks.len());
        for (id, path) in disks {
            let file = File::open(path).map_err(disk_err(path))?;
            if options.no_disk {
                let (size, crc32c) = disk_crc(&file, path)?;
                let r = DiskRef {
                    path: std::fs::canonicalize(path).unwrap_or_else(|_| path.clone()),
                    size,
                    crc32c,
                };
                let name = format!("{}{id}", sections::DISK_REF_PREFIX);
                w.write_state(Kind::DEVICE, &name, &r)?;
            } else {
                files.push((id, path, file));
            }
        }
        w.write_memory(&ram.slices(), None, opts)?;
        for (id, path, file) in files {
            let len = file.metadata().map_err(disk_err(path))?.len();
            w.write_disk(id, &FileSource { file: &file, len }, opts)?;
        }
        Ok(w.finish()?.1)
    };
    let (summary, destination) = match target {
        SnapshotTarget::Path(path) => {
            let (atomic, file) = AtomicFile::create(&path)?;
            let mut out = BufWriter::with_capacity(1 << 20, file);
            let summary = write_all(&mut out)?;
            let file = out
                .into_inner()
                .map_err(|e| ImageError::Image(SnapshotError::Write(e.into_error())))?;
            atomic.commit(file)?;
            (summary, path.display().to_string())
        }
        SnapshotTarget::Stream(w) => {
            let mut out = BufWriter::with_capacity(1 << 20, w);
            let summary = write_all(&mut out)?;
            out.flush().map_err(SnapshotError::Write)?;
            (summary, "stream".to_string())
        }
    };
    Ok(Written {
        image_id: id_hex(&header.image_id),
        destination,
        summary,
    })
}

/// An image being read: its states are in, its memory and disks follow.
pub struct ImageIn {
    reader: ImageReader<BufReader<Box<dyn Read>>>,
    state: MachineState,
    disk_refs: Vec<(String, DiskRef)>,
    /// The first section after the states.
    next: Section,
}

impl ImageIn {
    /// Reads the header and every state section.
    pub fn open(from: Box<dyn Read>) -> Result<Self, ImageError> {
        let mut reader = ImageReader::new(BufReader::with_capacity(1 << 20, from))?;
        let mut config: Option<MachineConfig> = None;
        let mut vm: Option<VmState> = None;
        let mut vcpus: Vec<VcpuState> = Vec::new();
        let mut devices: Vec<SavedDevice> = Vec::new();
        let mut disk_refs: Vec<(String, DiskRef)> = Vec::new();
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
                    Kind::VCPU => vcpus.push(decode_state(&format!("vcpu '{name}'"), &payload)?),
                    Kind::DEVICE => {
                        let what = format!("device '{name}'");
                        match name.strip_prefix(sections::DISK_REF_PREFIX) {
                            Some(id) => {
                                disk_refs.push((id.to_string(), decode_state(&what, &payload)?))
                            }
                            None => devices.push(SavedDevice {
                                state: decode_state(&what, &payload)?,
                                id: name,
                            }),
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
            state: MachineState {
                config,
                vm: vm.ok_or(ImageError::Missing(sections::KVM))?,
                vcpus,
                devices,
            },
            disk_refs,
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
    /// out. Returns the machine's state and the disk of each device.
    pub fn read_contents(
        self,
        ram: &GuestRam,
        disk_dir: &Path,
    ) -> Result<(MachineState, HashMap<String, DiskFile>), ImageError> {
        let ImageIn {
            mut reader,
            state,
            disk_refs,
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
        let (_, mut next) = reader.read_memory_with(&RamSink(ram), fresh)?;
        let mut disks = HashMap::new();
        loop {
            match next {
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
                    disks.insert(info.name, DiskFile { path, file });
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
        for (id, r) in disk_refs {
            let file = check_disk_ref(&r)?;
            disks.insert(id, DiskFile { path: r.path, file });
        }
        for d in disks.values() {
            d.file.sync_all().map_err(|source| ImageError::WriteDisk {
                path: d.path.display().to_string(),
                source,
            })?;
        }
        Ok((state, disks))
    }
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
