//! Loads the guest kernel (ELF vmlinux or bzImage), the command line, an
//! optional initrd, the MP table and `boot_params` into guest memory.

use std::fs::File;
use std::path::Path;

use devices::GuestMemoryMmap;
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{self, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::*;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a kernel image this VMM can boot (neither an x86_64 ELF vmlinux nor a bzImage)")]
    NotAKernel { path: String },
    #[error("cannot load kernel {path}")]
    LoadKernel {
        path: String,
        #[source]
        source: loader::Error,
    },
    #[error("cannot read initrd {path}: {source}")]
    Initrd {
        path: String,
        source: std::io::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below the kernel's limit")]
    InitrdTooLarge { path: String, size: u64 },
    #[error("kernel command line is too long or invalid")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("cannot write the kernel command line into guest memory")]
    WriteCmdline(#[source] loader::Error),
    #[error("cannot write boot data into guest memory: {0}")]
    GuestMemory(String),
}

/// Where the kernel entered, and what `boot_params` needs from its header.
pub struct LoadedKernel {
    pub entry: u64,
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
    kernel_end: u64,
}

/// Loads `path` as ELF, or failing that as bzImage.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, LoaderError> {
    let name = path.display().to_string();
    let mut file = File::open(path).map_err(|source| LoaderError::OpenKernel {
        path: name.clone(),
        source,
    })?;
    let mut magic = [0u8; 4];
    std::io::Read::read_exact(&mut file, &mut magic)
        .map_err(|_| LoaderError::NotAKernel { path: name.clone() })?;
    if &magic == b"\x7fELF" {
        let r = loader::elf::Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(|source| LoaderError::LoadKernel {
                path: name.clone(),
                source,
            })?;
        return Ok(LoadedKernel {
            entry: r.kernel_load.raw_value(),
            setup_header: None,
            kernel_end: r.kernel_end,
        });
    }
    match loader::bzimage::BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => Ok(LoadedKernel {
            // The 64-bit entry point sits 0x200 bytes into the protected-mode code.
            entry: r.kernel_load.raw_value() + 0x200,
            setup_header: r.setup_header,
            kernel_end: r.kernel_end,
        }),
        Err(loader::Error::Bzimage(loader::bzimage::Error::InvalidBzImage)) => {
            Err(LoaderError::NotAKernel { path: name })
        }
        Err(source) => Err(LoaderError::LoadKernel { path: name, source }),
    }
}

fn mem_err(e: impl std::fmt::Display) -> LoaderError {
    LoaderError::GuestMemory(e.to_string())
}

/// Writes the command line, the MP table, the initrd and `boot_params`.
pub fn configure_boot(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &str,
    initrd: Option<&Path>,
    vcpu_count: u8,
) -> Result<(), LoaderError> {
    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(LoaderError::Cmdline)?;
    cl.insert_str(cmdline).map_err(LoaderError::Cmdline)?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)
        .map_err(LoaderError::WriteCmdline)?;

    mem.write_slice(
        &super::mptable::build(vcpu_count),
        GuestAddress(MPTABLE_START),
    )
    .map_err(mem_err)?;

    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    params.hdr.kernel_alignment = 0x0100_0000;

    if let Some(path) = initrd {
        let (addr, size) = load_initrd(mem, path, kernel.kernel_end)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let mut e820 = vec![
        (0, EBDA_START, 1u32),
        (EBDA_START, HIMEM_START - EBDA_START, 2u32),
    ];
    for r in mem.iter() {
        let start = r.start_addr().raw_value();
        let end = start + r.len();
        let s = start.max(HIMEM_START);
        if end > s {
            e820.push((s, end - s, 1));
        }
    }
    for (i, (addr, size, type_)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = e820.len() as u8;

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(mem_err)
}

/// Places the initrd at the top of low memory (below 4 GiB and the MMIO hole), page aligned.
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<(u64, u64), LoaderError> {
    let name = path.display().to_string();
    let data = std::fs::read(path).map_err(|source| LoaderError::Initrd {
        path: name.clone(),
        source,
    })?;
    let size = data.len() as u64;
    let low_end = mem
        .iter()
        .next()
        .map(|r| r.start_addr().raw_value() + r.len())
        .unwrap_or(0);
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end.max(HIMEM_START))
        .ok_or(LoaderError::InitrdTooLarge { path: name, size })?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(mem_err)?;
    Ok((addr, size))
}
