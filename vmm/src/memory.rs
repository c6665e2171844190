//! Guest memory: its layout, its backing and its KVM slots, all here, so a
//! new backing (a file, userfaultfd) or dirty logging is a change to this
//! module only.
//!
//! Today: anonymous private memory, advised for transparent huge pages
//! (`VMM_THP=0` leaves it on 4 KiB pages, for comparisons), one KVM slot
//! per RAM region (below and above the MMIO gap). A lazily restored VM's
//! memory is the same memory, filled by `crate::page_server` through
//! userfaultfd.
//!
//! Dirty pages, for incremental snapshots, come from two logs kept side by
//! side: KVM's (`KVM_MEM_LOG_DIRTY_PAGES` on every slot, from
//! [`GuestRam::start_dirty_log`] on) holds what the guest wrote; the
//! mapping's own bitmaps ([`devices::GuestMemoryMmap`]) hold what the VMM
//! wrote through it (devices filling buffers, used rings), which KVM never
//! sees. Writes that bypass both are restores of an image's own contents:
//! raw slices before the log starts, and a lazy restore's userfaultfd
//! copies, which may go on after it starts but only put back what the
//! image (and so every image taken since) already holds.

use std::sync::atomic::{AtomicBool, Ordering};

use devices::GuestMemoryMmap;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

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
    #[error("cannot read KVM's dirty-page log of slot {slot}")]
    DirtyLog {
        slot: u32,
        #[source]
        err: kvm_ioctls::Error,
    },
}

/// Pages written, per RAM region in [`GuestRam::slices`] order: bit
/// `p % 64` of word `p / 64` for page `p` of the region (KVM's format, and
/// the one `snapshot::ImageWriter::write_memory` takes).
pub type DirtyPages = Vec<Vec<u64>>;

/// `into |= from`, word by word.
pub fn merge_dirty(into: &mut DirtyPages, from: &DirtyPages) {
    for (a, b) in into.iter_mut().zip(from) {
        for (x, y) in a.iter_mut().zip(b) {
            *x |= *y;
        }
    }
}

/// The guest's RAM.
pub struct GuestRam {
    mmap: GuestMemoryMmap,
    /// KVM's dirty log is on ([`GuestRam::start_dirty_log`]).
    dirty_log: AtomicBool,
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
        Ok(GuestRam {
            mmap,
            dirty_log: AtomicBool::new(false),
        })
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
        self.set_slots(vm, 0)
    }

    /// Starts recording which pages are written, from now: KVM's log on
    /// every slot (a slot's flags change; its memory stays) and the
    /// mapping's bitmaps, cleared. Restarting a running log clears it.
    /// Call with every vCPU paused and the devices quiesced.
    pub fn start_dirty_log(&self, vm: &VmFd) -> Result<(), MemoryError> {
        if self.dirty_log.swap(true, Ordering::AcqRel) {
            self.take_dirty(vm)?;
            return Ok(());
        }
        if let Err(e) = self.set_slots(vm, kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES) {
            self.dirty_log.store(false, Ordering::Release);
            return Err(e);
        }
        for region in self.mmap.iter() {
            own_writes(region).reset();
        }
        Ok(())
    }

    /// Stops KVM's log (a slot under dirty logging is mapped in 4 KiB
    /// pages; without it, huge pages come back). No-op when it is off.
    pub fn stop_dirty_log(&self, vm: &VmFd) -> Result<(), MemoryError> {
        if self.dirty_log.swap(false, Ordering::AcqRel) {
            self.set_slots(vm, 0)?;
        }
        Ok(())
    }

    /// Whether [`GuestRam::start_dirty_log`] has started the log.
    pub fn dirty_log_started(&self) -> bool {
        self.dirty_log.load(Ordering::Acquire)
    }

    /// The pages written since the log started or was last taken, by the
    /// guest or through the mapping; both logs start over, empty. Call with
    /// every vCPU paused and the devices quiesced, after
    /// [`GuestRam::start_dirty_log`].
    pub fn take_dirty(&self, vm: &VmFd) -> Result<DirtyPages, MemoryError> {
        self.mmap
            .iter()
            .enumerate()
            .map(|(slot, region)| {
                let slot = slot as u32;
                let mut bits = vm
                    .get_dirty_log(slot, region.len() as usize)
                    .map_err(|err| MemoryError::DirtyLog { slot, err })?;
                for (k, v) in bits.iter_mut().zip(own_writes(region).get_and_reset()) {
                    *k |= v;
                }
                Ok(bits)
            })
            .collect()
    }

    fn set_slots(&self, vm: &VmFd, flags: u32) -> Result<(), MemoryError> {
        for (slot, (addr, bytes)) in self.slices().into_iter().enumerate() {
            let slot = slot as u32;
            let region = kvm_userspace_memory_region {
                slot,
                flags,
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

/// The bitmap of the writes the VMM made through `region`'s mapping.
fn own_writes(region: &vm_memory::GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    vm_memory::MmapRegion::bitmap(region)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_pages_merge_word_by_word() {
        let mut a: DirtyPages = vec![vec![0b0011, 0], vec![1 << 63]];
        merge_dirty(&mut a, &vec![vec![0b0110, 5], vec![1]]);
        assert_eq!(a, vec![vec![0b0111, 5], vec![(1 << 63) | 1]]);
    }

    /// What the VMM writes through the mapping (as devices do) is in the
    /// log, which KVM alone would miss; taking the log empties it.
    #[test]
    fn the_vmms_own_writes_are_logged() {
        let vm = crate::test_vm::vm();
        let ram = vm.ram();
        ram.start_dirty_log(vm.fd()).unwrap();
        assert!(ram.dirty_log_started());
        let set = |d: &DirtyPages| -> Vec<(usize, usize)> {
            let mut v = Vec::new();
            for (r, words) in d.iter().enumerate() {
                for (i, w) in words.iter().enumerate() {
                    for b in 0..64 {
                        if w & (1 << b) != 0 {
                            v.push((r, i * 64 + b));
                        }
                    }
                }
            }
            v
        };
        // Everything the loader wrote before the log started is forgotten.
        assert_eq!(set(&ram.take_dirty(vm.fd()).unwrap()), vec![]);
        ram.mmap()
            .write_slice(&[1u8; 10], GuestAddress(0x3ffc))
            .unwrap();
        assert_eq!(set(&ram.take_dirty(vm.fd()).unwrap()), vec![(0, 3), (0, 4)]);
        assert_eq!(set(&ram.take_dirty(vm.fd()).unwrap()), vec![]);
    }
}
