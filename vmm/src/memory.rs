//! Guest memory: its layout, its backing and its KVM slots, all here, so a
//! new backing (a file, userfaultfd) or dirty logging is a change to this
//! module only.
//!
//! Today: anonymous private memory, advised for transparent huge pages
//! (`VMM_THP=0` leaves it on 4 KiB pages, for comparisons), one KVM slot
//! per RAM region (below and above the MMIO gap), no slot flags. A lazily
//! restored VM's memory is the same memory, filled by `crate::page_server`
//! through userfaultfd.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::arch::layout;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot allocate {mib} MiB of guest memory")]
    Allocate {
        mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} failed")]
    Slot {
        slot: u32,
        #[source]
        err: kvm_ioctls::Error,
    },
}

/// The guest's RAM.
pub struct GuestRam {
    mmap: GuestMemoryMmap,
}

impl GuestRam {
    /// Anonymous memory of `mib` MiB, laid out around the MMIO gap.
    pub fn new(mib: u64) -> Result<Self, MemoryError> {
        let ranges: Vec<(GuestAddress, usize)> = Self::regions(mib)
            .into_iter()
            .map(|(a, l)| (GuestAddress(a), l as usize))
            .collect();
        let mmap = GuestMemoryMmap::from_ranges(&ranges)
            .map_err(|source| MemoryError::Allocate { mib, source })?;
        Ok(GuestRam { mmap })
    }

    /// Asks for transparent huge pages (THP is `madvise` on our hosts, so
    /// memory gets them only when it asks): the guest's first touch of
    /// memory then costs one fault per 2 MiB instead of per 4 KiB, in the
    /// host and, where guest kernel code is interpreted, in KVM's shadow
    /// page tables. Best effort: without them the guest runs, slower.
    pub fn advise_huge_pages(&self) {
        if std::env::var_os("VMM_THP").is_some_and(|v| v == "0") {
            return;
        }
        for (_, bytes) in self.slices() {
            // SAFETY: the range is a live anonymous mapping owned by
            // `self.mmap`; MADV_HUGEPAGE changes how it is backed, not its
            // contents or validity.
            let r = unsafe {
                libc::madvise(
                    bytes.as_ptr().cast_mut().cast(),
                    bytes.len(),
                    libc::MADV_HUGEPAGE,
                )
            };
            if r != 0 {
                log::info!(
                    "guest memory: no transparent huge pages: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }

    /// (guest-physical address, length) of each RAM region of a `mib` MiB guest.
    pub fn regions(mib: u64) -> Vec<(u64, u64)> {
        layout::ram_regions(mib << 20)
    }

    /// Registers each region as a KVM memory slot. Called once per VM,
    /// before any vCPU runs.
    pub fn register(&self, vm: &VmFd) -> Result<(), MemoryError> {
        for (slot, (addr, bytes)) in self.slices().into_iter().enumerate() {
            let slot = slot as u32;
            let region = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: addr,
                memory_size: bytes.len() as u64,
                userspace_addr: bytes.as_ptr() as u64,
            };
            // SAFETY: the host range is a live mapping owned by `self.mmap`;
            // the Vm that owns this GuestRam keeps it for as long as its VM fd
            // exists.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(|err| MemoryError::Slot { slot, err })?;
        }
        Ok(())
    }

    /// What devices and loaders read and write guest memory through.
    pub fn mmap(&self) -> &GuestMemoryMmap {
        &self.mmap
    }

    /// Guest RAM as (guest-physical address, bytes), for a snapshot.
    ///
    /// Only read them with every vCPU paused and every device quiesced:
    /// the slices alias memory the guest and the devices write.
    pub fn slices(&self) -> Vec<(u64, &[u8])> {
        self.mmap
            .iter()
            .filter_map(|region| {
                let host = self.mmap.get_host_address(region.start_addr()).ok()?;
                let len = usize::try_from(region.len()).ok()?;
                // SAFETY: `host` is the start of this region's live mapping of
                // `len` bytes, owned by `self.mmap` and unmapped only when
                // `self` is dropped, which the returned borrow prevents.
                let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
                Some((region.start_addr().raw_value(), bytes))
            })
            .collect()
    }
}

/// Guest memory as an image reader's destination. Only pages with data are
/// written: fresh guest memory is already zero, and not touching it saves a
/// page fault per zero page.
pub struct RamSink<'a>(pub &'a GuestRam);

impl snapshot::PageSink for RamSink<'_> {
    fn write_pages(&self, addr: u64, data: &[u8]) -> std::io::Result<()> {
        self.0
            .mmap
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
