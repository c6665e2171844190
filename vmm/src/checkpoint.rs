//! Whole-VM checkpoint and restore through the snapshot image format.
//!
//! An image holds, in this order: the machine description (`vm
//! 'machine'`), KVM's VM-wide state (`vm 'kvm'`), one section per vCPU,
//! the devices, guest memory, then each disk's contents (or, with
//! `--no-disk`, a reference to the disk file). Restore reads it in one pass:
//! states first, so the VM can be built before memory streams in.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use snapshot::{
    decode_state, flags, id_hex, ApplyOptions, Compression, EncodeOptions, FileSource, Header,
    ImageReader, ImageWriter, Kind, Section,
};
use vm_memory::{Bytes, GuestAddress};

use crate::control::{SnapshotRequest, SnapshotTarget, VcpuSet};
use crate::device_manager::{DeviceManager, DevicesState};
use crate::kvm::persist::{self, VcpuState, VmState};
use crate::kvm::vcpu::Vcpu;
use crate::kvm::vm::Vm;
use crate::runner::{LiveVm, Machine, MachineConfig};
use crate::timeline::Timeline;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Image(#[from] snapshot::SnapshotError),
    #[error("cannot read the VM's state: {0}")]
    Save(String),
    #[error("cannot create {path}: {source}")]
    Create {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot make {path} durable: {source}")]
    Sync {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read disk {path}: {source}")]
    Disk {
        path: String,
        source: std::io::Error,
    },
    #[error("the image has no '{0}' section")]
    Missing(&'static str),
    #[error("the image ends before its memory")]
    NoMemory,
    #[error("image is for {what} '{image}', this host is '{host}'")]
    HostMismatch {
        what: &'static str,
        image: String,
        host: String,
    },
    #[error(
        "the image's VM needs {need_mib} MiB of memory, this host has {have_mib} MiB available"
    )]
    TooLittleMemory { need_mib: u64, have_mib: u64 },
    #[error("the image's guest saw CPUID {leaf:#x}.{reg} bit {bit}, which this host's KVM does not offer")]
    MissingCpuFeature {
        leaf: u32,
        reg: &'static str,
        bit: u32,
    },
    #[error("the disk {path} no longer matches the image ({reason}); restore from an image taken with the disk")]
    DiskChanged { path: String, reason: String },
    #[error("cannot write the restored disk {path}: {source}")]
    WriteDisk {
        path: String,
        source: std::io::Error,
    },
    #[error("the image's memory layout does not match its machine ({0})")]
    Layout(String),
    #[error("cannot rebuild the VM: {0}")]
    Rebuild(String),
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

/// What the host that wrote an image was.
fn host_cpu() -> (String, (u32, u32, u32)) {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |k: &str| {
        info.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let num = |k: &str| field(k).parse().unwrap_or(0);
    (
        field("vendor_id"),
        (num("cpu family"), num("model\t"), num("stepping")),
    )
}

fn disk_crc(file: &File, path: &Path) -> Result<(u64, u32), CheckpointError> {
    use std::os::unix::fs::FileExt;
    let err = |source| CheckpointError::Disk {
        path: path.display().to_string(),
        source,
    };
    let size = file.metadata().map_err(err)?.len();
    let mut crc = 0u32;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let n = buf.len().min((size - off) as usize);
        file.read_exact_at(&mut buf[..n], off).map_err(err)?;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        off += n as u64;
    }
    Ok((size, crc))
}

/// A temporary file next to `dest`, renamed over it once complete.
struct AtomicFile {
    tmp: PathBuf,
    dest: PathBuf,
    done: bool,
}

impl AtomicFile {
    fn create(dest: &Path) -> Result<(Self, File), CheckpointError> {
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into());
        let dir = dest.parent().filter(|p| !p.as_os_str().is_empty());
        let tmp = dir
            .unwrap_or(Path::new("."))
            .join(format!(".{name}.tmp.{}", std::process::id()));
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|source| CheckpointError::Create {
                path: tmp.display().to_string(),
                source,
            })?;
        Ok((
            AtomicFile {
                tmp,
                dest: dest.to_path_buf(),
                done: false,
            },
            f,
        ))
    }

    /// fsync, rename over the destination, fsync the directory.
    fn commit(mut self, f: File) -> Result<(), CheckpointError> {
        let sync_err = |path: &Path| {
            let path = path.display().to_string();
            move |source| CheckpointError::Sync { path, source }
        };
        f.sync_all().map_err(sync_err(&self.tmp))?;
        drop(f);
        std::fs::rename(&self.tmp, &self.dest).map_err(sync_err(&self.dest))?;
        self.done = true;
        let dir = self
            .dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(sync_err(dir))?;
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Checkpoints a paused VM into `req.target`.
pub fn snapshot(
    live: &LiveVm<'_>,
    set: &VcpuSet,
    req: SnapshotRequest,
) -> Result<serde_json::Value, CheckpointError> {
    let t0 = Instant::now();
    let compression = Compression::parse(&req.compress)?;
    // Flush what virtio-blk has written, so the disk matches the guest.
    live.devices
        .quiesce()
        .map_err(|e| CheckpointError::Save(e.to_string()))?;
    let vcpus = set
        .save()
        .map_err(|e| CheckpointError::Save(e.to_string()))?;
    let vm_state =
        persist::save_vm(live.vm.fd()).map_err(|e| CheckpointError::Save(e.to_string()))?;
    let devices = live.devices.save();
    let paused_ms = t0.elapsed().as_secs_f64() * 1000.0;

    let (vendor, signature) = host_cpu();
    let disks = devices.disk_paths();
    let flags = if req.no_disk || disks.is_empty() {
        0
    } else {
        flags::HAS_DISK
    };
    let header = Header::new("x86_64", &vendor, signature, flags);
    let write = |out: &mut dyn Write| -> Result<snapshot::WriteSummary, CheckpointError> {
        let mut w = ImageWriter::new(out, &header)?;
        w.write_state(Kind::VM, "machine", live.config)?;
        w.write_state(Kind::VM, "kvm", &vm_state)?;
        for v in &vcpus {
            w.write_state(Kind::VCPU, &v.id.to_string(), v)?;
        }
        w.write_state(Kind::DEVICE, "devices", &devices)?;
        let opts = EncodeOptions {
            compression,
            ..Default::default()
        };
        w.write_memory(&live.vm.memory_slices(), None, opts)?;
        for (i, path) in disks.iter().enumerate() {
            let name = format!("disk{i}");
            let file = File::open(path).map_err(|source| CheckpointError::Disk {
                path: path.display().to_string(),
                source,
            })?;
            if req.no_disk {
                let (size, crc32c) = disk_crc(&file, path)?;
                let r = DiskRef {
                    path: std::fs::canonicalize(path).unwrap_or_else(|_| path.clone()),
                    size,
                    crc32c,
                };
                w.write_state(Kind::DEVICE, &name, &r)?;
            } else {
                let len = file
                    .metadata()
                    .map_err(|source| CheckpointError::Disk {
                        path: path.display().to_string(),
                        source,
                    })?
                    .len();
                w.write_disk(&name, &FileSource { file: &file, len }, opts)?;
            }
        }
        Ok(w.finish()?.1)
    };
    let (summary, dest) = match req.target {
        SnapshotTarget::Path(path) => {
            let (atomic, file) = AtomicFile::create(&path)?;
            let mut out = BufWriter::with_capacity(1 << 20, file);
            let summary = write(&mut out)?;
            let file = out.into_inner().map_err(|e| CheckpointError::Sync {
                path: path.display().to_string(),
                source: e.into_error(),
            })?;
            atomic.commit(file)?;
            (summary, path.display().to_string())
        }
        SnapshotTarget::Stream(w) => {
            let mut out = BufWriter::with_capacity(1 << 20, w);
            let summary = write(&mut out)?;
            out.flush().map_err(snapshot::SnapshotError::Write)?;
            (summary, "stream".to_string())
        }
    };
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    log::info!(
        "snapshot {} written to {dest}: {} bytes in {ms:.0} ms",
        id_hex(&header.image_id),
        summary.bytes
    );
    Ok(serde_json::json!({
        "image_id": id_hex(&header.image_id),
        "destination": dest,
        "bytes": summary.bytes,
        "memory_pages": summary.memory.pages,
        "memory_zero_pages": summary.memory.zero_pages,
        "state_capture_ms": paused_ms,
        "total_ms": ms,
    }))
}

/// What restore reads before memory.
struct States {
    config: MachineConfig,
    vm: VmState,
    vcpus: Vec<VcpuState>,
    devices: DevicesState,
}

/// Checks that this host can run the image's VM.
fn check_host(header: &Header, states: &States, vm: &Vm) -> Result<(), CheckpointError> {
    let (vendor, _) = host_cpu();
    if header.cpu_vendor != vendor {
        return Err(CheckpointError::HostMismatch {
            what: "CPU vendor",
            image: header.cpu_vendor.clone(),
            host: vendor,
        });
    }
    if header.arch != "x86_64" {
        return Err(CheckpointError::HostMismatch {
            what: "architecture",
            image: header.arch.clone(),
            host: "x86_64".into(),
        });
    }
    let supported = vm
        .kvm()
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| CheckpointError::Rebuild(format!("KVM_GET_SUPPORTED_CPUID: {e}")))?;
    if let Some(v) = states.vcpus.first() {
        if let Some((leaf, reg, bit)) = missing_cpuid_feature(&v.cpuid, supported.as_slice()) {
            return Err(CheckpointError::MissingCpuFeature { leaf, reg, bit });
        }
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    if let Some(have_mib) = available_mib(&meminfo) {
        if have_mib < states.config.mem_mib {
            return Err(CheckpointError::TooLittleMemory {
                need_mib: states.config.mem_mib,
                have_mib,
            });
        }
    }
    Ok(())
}

/// The first feature (leaf, register, bit) the image's guest was given that
/// `host` (KVM's supported CPUID) lacks, among the feature leaves 1, 7 and
/// 0x8000_0001.
fn missing_cpuid_feature(
    image: &[kvm_bindings::kvm_cpuid_entry2],
    host: &[kvm_bindings::kvm_cpuid_entry2],
) -> Option<(u32, &'static str, u32)> {
    let find = |leaf: u32| host.iter().find(|e| e.function == leaf && e.index == 0);
    for e in image.iter().filter(|e| {
        (e.function == 1 || e.function == 7 || e.function == 0x8000_0001) && e.index == 0
    }) {
        let Some(have) = find(e.function) else {
            continue;
        };
        for (reg, want, have) in [
            ("ebx", e.ebx, have.ebx),
            ("ecx", e.ecx, have.ecx),
            ("edx", e.edx, have.edx),
        ] {
            // Not features: leaf 1 EBX is topology; some leaf-1 ECX/EDX bits
            // are set per vCPU by KVM or by our template (OSXSAVE, x2APIC,
            // TSC deadline, hypervisor, APIC, HTT), and OSPKE by the guest.
            let ignore = match (e.function, reg) {
                (1, "ebx") => u32::MAX,
                (1, "ecx") => (1 << 27) | (1 << 31) | (1 << 21) | (1 << 24),
                (1, "edx") => (1 << 9) | (1 << 28),
                (7, "ecx") => 1 << 4,
                _ => 0,
            };
            let missing = want & !have & !ignore;
            if missing != 0 {
                return Some((e.function, reg, missing.trailing_zeros()));
            }
        }
    }
    None
}

/// MemAvailable + SwapFree from /proc/meminfo, in MiB; None if unreadable.
fn available_mib(meminfo: &str) -> Option<u64> {
    let kib = |k: &str| -> Option<u64> {
        meminfo
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((kib("MemAvailable:")? + kib("SwapFree:").unwrap_or(0)) / 1024)
}

fn read_states<R: Read>(r: &mut ImageReader<R>) -> Result<(States, Section), CheckpointError> {
    let mut config = None;
    let mut vm = None;
    let mut vcpus = Vec::new();
    let mut devices = None;
    let first_after = loop {
        match r.next_section()? {
            Section::State {
                kind,
                name,
                payload,
            } => match (kind, name.as_str()) {
                (Kind::VM, "machine") => config = Some(decode_state("vm 'machine'", &payload)?),
                (Kind::VM, "kvm") => vm = Some(decode_state("vm 'kvm'", &payload)?),
                (Kind::VCPU, _) => vcpus.push(decode_state::<VcpuState>(&name, &payload)?),
                (Kind::DEVICE, "devices") => {
                    devices = Some(decode_state("device 'devices'", &payload)?)
                }
                _ => log::warn!("restore: ignoring state section {name}"),
            },
            Section::Skipped { .. } => {}
            other => break other,
        }
    };
    let config: MachineConfig = config.ok_or(CheckpointError::Missing("machine"))?;
    if vcpus.len() != usize::from(config.vcpus)
        || vcpus
            .iter()
            .enumerate()
            .any(|(i, v)| usize::from(v.id) != i)
    {
        return Err(CheckpointError::Layout(format!(
            "{} vCPU sections for a {}-vCPU machine",
            vcpus.len(),
            config.vcpus
        )));
    }
    Ok((
        States {
            config,
            vm: vm.ok_or(CheckpointError::Missing("kvm"))?,
            vcpus,
            devices: devices.ok_or(CheckpointError::Missing("devices"))?,
        },
        first_after,
    ))
}

/// Guest memory as the image reader's destination. Only pages with data
/// are written: fresh guest memory is already zero, and not touching it
/// saves a page fault per zero page.
struct GuestSink<'a>(&'a vm_memory::GuestMemoryMmap);

impl snapshot::PageSink for GuestSink<'_> {
    fn write_pages(&self, addr: u64, data: &[u8]) -> std::io::Result<()> {
        self.0
            .write_slice(data, GuestAddress(addr))
            .map_err(|e| std::io::Error::other(format!("guest page {addr:#x}: {e}")))
    }

    fn write_zeros(&self, addr: u64, len: u64) -> std::io::Result<()> {
        let zeros = [0u8; snapshot::PAGE_SIZE];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(zeros.len() as u64) as usize;
            self.write_pages(addr + off, &zeros[..n])?;
            off += n as u64;
        }
        Ok(())
    }
}

/// Reads an image and builds the VM it describes, ready to run.
pub fn restore(
    from: Box<dyn Read>,
    disk_dir: &Path,
    timeline: Arc<Timeline>,
) -> Result<Machine, CheckpointError> {
    let mut reader = ImageReader::new(BufReader::with_capacity(1 << 20, from))?;
    let header = reader.header().clone();
    let (states, section) = read_states(&mut reader)?;
    let vm = Vm::new(states.config.mem_mib).map_err(|e| CheckpointError::Rebuild(e.to_string()))?;
    check_host(&header, &states, &vm)?;

    let Section::Memory(layout) = section else {
        return Err(CheckpointError::NoMemory);
    };
    // The layout Vm::new just built for this size.
    let want = crate::arch::layout::ram_regions(states.config.mem_mib << 20);
    if layout.regions != want {
        return Err(CheckpointError::Layout(format!(
            "regions {:x?}, expected {want:x?}",
            layout.regions
        )));
    }
    // Memory, decoded on all cores straight into guest memory, then each
    // disk into a sparse file.
    let fresh = ApplyOptions {
        threads: 0,
        dest_is_zeroed: true,
    };
    let (_, mut next) = reader.read_memory_with(&GuestSink(vm.memory()), fresh)?;
    let mut disks: Vec<(PathBuf, File)> = Vec::new();
    let mut refs: Vec<DiskRef> = Vec::new();
    loop {
        match next {
            Section::Disk(info) => {
                std::fs::create_dir_all(disk_dir).map_err(|source| CheckpointError::Create {
                    path: disk_dir.display().to_string(),
                    source,
                })?;
                let path = unique(disk_dir.join(format!(
                    "{}-{}.img",
                    id_hex(&header.image_id),
                    info.name
                )));
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(|source| CheckpointError::Create {
                        path: path.display().to_string(),
                        source,
                    })?;
                log::info!("restore: disk {} → {}", info.name, path.display());
                let (_, after) = reader.read_disk_into(&file, fresh)?;
                disks.push((path, file));
                next = after;
                continue;
            }
            Section::State {
                kind: Kind::DEVICE,
                ref name,
                ref payload,
            } if name.starts_with("disk") => refs.push(decode_state(name, payload)?),
            Section::End => break,
            Section::Memory(_) | Section::Chunk(_) => {
                return Err(CheckpointError::Layout(
                    "memory data after the memory section".into(),
                ))
            }
            Section::State { ref name, .. } => log::warn!("restore: ignoring section {name}"),
            Section::Skipped { .. } => {}
        }
        next = reader.next_section()?;
    }
    for r in refs {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&r.path)
            .map_err(|e| CheckpointError::DiskChanged {
                path: r.path.display().to_string(),
                reason: e.to_string(),
            })?;
        let (size, crc) = disk_crc(&file, &r.path)?;
        if size != r.size || crc != r.crc32c {
            return Err(CheckpointError::DiskChanged {
                path: r.path.display().to_string(),
                reason: format!(
                    "size {size} (was {}), crc32c {crc:#x} (was {:#x})",
                    r.size, r.crc32c
                ),
            });
        }
        disks.push((r.path, file));
    }
    for (p, f) in &disks {
        f.sync_all().map_err(|source| CheckpointError::WriteDisk {
            path: p.display().to_string(),
            source,
        })?;
    }

    // VM-wide state, then the vCPUs (see kvm::persist for the order).
    persist::restore_vm(vm.fd(), &states.vm)
        .map_err(|e| CheckpointError::Rebuild(e.to_string()))?;
    let mut config = states.config.clone();
    config.disks = disks.iter().map(|(p, _)| p.clone()).collect();
    let devices = DeviceManager::restore(
        &vm,
        &states.devices,
        Box::new(std::io::stdout()),
        timeline.clone(),
        disks,
    )
    .map_err(|e| CheckpointError::Rebuild(e.to_string()))?;
    let mut vcpus = Vec::with_capacity(states.vcpus.len());
    for s in &states.vcpus {
        vcpus.push(Vcpu::restore(&vm, s).map_err(|e| CheckpointError::Rebuild(e.to_string()))?);
    }
    Ok(Machine {
        vm,
        devices: Arc::new(devices),
        vcpus,
        config,
        timeline,
    })
}

/// `path`, or `path` with a counter if it exists (parallel restores of one
/// image each get their own disk).
fn unique(path: PathBuf) -> PathBuf {
    if !path.exists() {
        return path;
    }
    for i in 1.. {
        let p = path.with_extension(format!("{i}.img"));
        if !p.exists() {
            return p;
        }
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn leaf(function: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn a_feature_the_host_lacks_is_named() {
        let host = [leaf(1, 0, 0x8000_0001, 0x0780_0000), leaf(7, 0x9, 0, 0)];
        let same = [
            leaf(1, 0x0102_0800, 0x8000_0001, 0x0780_0000),
            leaf(7, 0x1, 0, 0),
        ];
        assert_eq!(missing_cpuid_feature(&same, &host), None);
        // AVX2 (7.ebx bit 5) was given to the guest, this host lacks it.
        let avx2 = [leaf(7, 0x21, 0, 0)];
        assert_eq!(missing_cpuid_feature(&avx2, &host), Some((7, "ebx", 5)));
        // Bits our template or KVM set per vCPU are not features.
        let template = [leaf(
            1,
            0xffff_ffff,
            0x8000_0001 | (1 << 27),
            (1 << 28) | (1 << 9),
        )];
        assert_eq!(missing_cpuid_feature(&template, &host), None);
        // A leaf the host does not list is not compared.
        assert_eq!(missing_cpuid_feature(&[leaf(0xd, 7, 7, 7)], &host), None);
    }

    #[test]
    fn available_memory_counts_swap() {
        let m = "MemTotal: 100 kB\nMemAvailable:    2097152 kB\nSwapFree: 1048576 kB\n";
        assert_eq!(available_mib(m), Some(3072));
        assert_eq!(available_mib("MemTotal: 1 kB\n"), None);
    }
}
