//! The KVM VM: guest memory, in-kernel interrupt controllers and PIT, irqfds.
//!
//! Creation order matters: the TSS and identity-map addresses must be set
//! before any vCPU exists, and the irqchip must exist before the PIT and
//! before vCPUs are created (KVM attaches each vCPU's LAPIC to it).

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("/dev/kvm speaks KVM API version {0}, this VMM needs 12")]
    ApiVersion(i32),
    #[error("/dev/kvm does not answer KVM ioctls (is it really the KVM device?)")]
    NotKvm,
    #[error("KVM lacks a capability this VMM needs: {0}")]
    MissingCap(&'static str),
    #[error("cannot allocate {mib} MiB of guest memory: {reason}")]
    Memory { mib: u64, reason: String },
    #[error("KVM {op} failed: {err}")]
    Kvm {
        op: &'static str,
        err: kvm_ioctls::Error,
    },
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |err| VmError::Kvm { op, err }
}

/// A KVM VM with its guest memory registered.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    memory: GuestMemoryMmap,
}

impl Vm {
    pub fn new(mem_mib: u64) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version < 0 {
            return Err(VmError::NotKvm);
        }
        if version != 12 {
            return Err(VmError::ApiVersion(version));
        }
        for (cap, name) in [
            (kvm_ioctls::Cap::Irqchip, "in-kernel irqchip"),
            (kvm_ioctls::Cap::Pit2, "PIT2"),
            (kvm_ioctls::Cap::Irqfd, "irqfd"),
            (kvm_ioctls::Cap::UserMemory, "user memory"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(mem_mib << 20)
            .into_iter()
            .map(|(a, l)| (GuestAddress(a), l as usize))
            .collect();
        let memory = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmError::Memory {
            mib: mem_mib,
            reason: e.to_string(),
        })?;
        for (slot, region) in memory.iter().enumerate() {
            let host =
                memory
                    .get_host_address(region.start_addr())
                    .map_err(|e| VmError::Memory {
                        mib: mem_mib,
                        reason: e.to_string(),
                    })?;
            let mr = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range is a live mapping owned by `memory`, which
            // this Vm keeps for as long as the VM fd exists.
            unsafe { fd.set_user_memory_region(mr) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(Vm { kvm, fd, memory })
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Guest RAM as (guest-physical address, bytes), for a snapshot.
    ///
    /// Only call this with every vCPU paused: the slices alias memory the
    /// guest writes while it runs. Devices serve requests on vCPU threads,
    /// so nothing else writes guest memory meanwhile.
    pub fn memory_slices(&self) -> Vec<(u64, &[u8])> {
        self.memory
            .iter()
            .filter_map(|region| {
                let host = self.memory.get_host_address(region.start_addr()).ok()?;
                let len = usize::try_from(region.len()).ok()?;
                // SAFETY: `host` is the start of this region's live mapping of
                // `len` bytes, owned by `self.memory` and unmapped only when
                // `self` is dropped, which the returned borrow prevents. The
                // caller guarantees no vCPU writes it meanwhile.
                let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
                Some((region.start_addr().raw_value(), bytes))
            })
            .collect()
    }

    /// Routes writes to `evt` into interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(kvm_err("KVM_IRQFD"))
    }
}
