//! The KVM VM: in-kernel interrupt controllers and PIT, irqfds, and the
//! guest memory it maps (owned here, managed by [`crate::memory`]).
//!
//! Creation order matters: the TSS and identity-map addresses must be set
//! before any vCPU exists, and the irqchip must exist before the PIT and
//! before vCPUs are created (KVM attaches each vCPU's LAPIC to it).

use devices::GuestMemoryMmap;
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout;
use crate::memory::{GuestRam, MemoryError};

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
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("KVM {op} failed")]
    Kvm {
        op: &'static str,
        #[source]
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
    memory: GuestRam,
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
            (kvm_ioctls::Cap::Ioeventfd, "ioeventfd"),
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

        let memory = GuestRam::new(mem_mib)?;
        memory.register(&fd)?;
        Ok(Vm { kvm, fd, memory })
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Guest memory, as devices and loaders access it.
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.memory.mmap()
    }

    pub fn ram(&self) -> &GuestRam {
        &self.memory
    }

    /// Makes a guest write of `datamatch` (4 bytes) to MMIO address `addr`
    /// signal `evt` inside KVM, without an exit to the VMM.
    pub fn register_mmio_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &kvm_ioctls::IoEventAddress::Mmio(addr), datamatch)
            .map_err(kvm_err("KVM_IOEVENTFD"))
    }

    /// Routes writes to `evt` into interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(kvm_err("KVM_IRQFD"))
    }
}
