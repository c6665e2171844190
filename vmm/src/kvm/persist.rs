//! What KVM holds of a VM and its vCPUs, as plain serde structs, and the
//! ioctls that read it out and put it back.
//!
//! # Save order (per vCPU, with every vCPU out of KVM_RUN)
//! 1. MP state first: KVM_GET_MP_STATE makes KVM accept pending INIT/SIPI
//!    events, which may change the registers read after it.
//! 2. Registers, special registers, XSAVE, XCRs, debug registers, LAPIC,
//!    MSRs; then the pending events, last, so that nothing read before them
//!    can still turn into a pending event.
//!
//! # Restore order (per vCPU, on a freshly created vCPU)
//! 1. CPUID before anything else: KVM checks MSR writes and XSAVE contents
//!    against the CPUID the vCPU has.
//! 2. TSC frequency, before the TSC MSR is written.
//! 3. MP state, registers, special registers: SREGS carries APIC_BASE, which
//!    decides the LAPIC's mode, so it precedes the LAPIC.
//! 4. XSAVE, XCRs, debug registers, LAPIC.
//! 5. MSRs after the LAPIC: IA32_TSC_DEADLINE only sticks once the LAPIC
//!    timer is in TSC-deadline mode.
//! 6. Pending events last: an exception to inject refers to the registers.
//!
//! VM-wide state (PIC, IOAPIC, PIT, kvmclock) is restored before the vCPUs
//! run; kvmclock is set to the saved value so the guest's clock carries on
//! from where it stopped instead of jumping back.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, Xsave, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// KVM state of one vCPU.
#[derive(Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub tsc_khz: Option<u32>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The XSAVE area as KVM_GET_XSAVE(2) returns it, in 32-bit words; 1024
    /// words is the legacy 4 KiB area.
    pub xsave: Vec<u32>,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

/// KVM state of the VM as a whole.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("vCPU {id}: {op} failed: {err}")]
    Vcpu {
        id: u8,
        op: &'static str,
        err: kvm_ioctls::Error,
    },
    #[error("VM: {op} failed: {err}")]
    Vm {
        op: &'static str,
        err: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: this host's KVM refused MSR {index:#x} (value {value:#x}) of the image")]
    MsrRefused { id: u8, index: u32, value: u64 },
    #[error("vCPU {id}: the image's {what} is malformed ({detail})")]
    Malformed {
        id: u8,
        what: &'static str,
        detail: String,
    },
}

/// MSRs that are never worth saving: KVM lists them but refuses host reads
/// or writes on some hosts, or they are recomputed (the PV ones we disable).
fn skip_msr(index: u32) -> bool {
    matches!(
        index,
        // MSR_IA32_UMWAIT_CONTROL, IA32_PERF_CAPABILITIES and the
        // performance counters: not offered to the guest.
        0xe1 | 0x345
    ) || (0xc1..=0xc8).contains(&index)
        || (0x186..=0x18f).contains(&index)
        || (0x309..=0x30b).contains(&index)
        || (0x38d..=0x390).contains(&index)
        || (0xc001_0000..=0xc001_0007).contains(&index)
        || (0xc001_0200..=0xc001_020b).contains(&index)
}

/// The MSRs to save on this host: what KVM lists, minus those it cannot read
/// for this vCPU (found by reading them once).
pub fn saveable_msrs(kvm: &Kvm, fd: &VcpuFd, id: u8) -> Result<Vec<u32>, PersistError> {
    let list = kvm.get_msr_index_list().map_err(|err| PersistError::Vcpu {
        id,
        op: "KVM_GET_MSR_INDEX_LIST",
        err,
    })?;
    let mut out = Vec::new();
    for &index in list.as_slice().iter().filter(|&&i| !skip_msr(i)) {
        let mut one = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .map_err(|_| PersistError::Malformed {
            id,
            what: "MSR list",
            detail: "cannot build a one-entry list".into(),
        })?;
        if matches!(fd.get_msrs(&mut one), Ok(1)) {
            out.push(index);
        }
    }
    Ok(out)
}

fn vcpu_err(id: u8, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> PersistError {
    move |err| PersistError::Vcpu { id, op, err }
}

fn vm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> PersistError {
    move |err| PersistError::Vm { op, err }
}

/// Size in bytes of this host's XSAVE area for KVM_GET_XSAVE2, if larger than
/// the legacy 4 KiB.
pub fn xsave2_size(vm: &VmFd) -> Option<usize> {
    let size = usize::try_from(vm.check_extension_int(Cap::Xsave2)).ok()?;
    (size > std::mem::size_of::<kvm_xsave>()).then_some(size)
}

/// Reads a paused vCPU's state. `msr_indices` comes from [`saveable_msrs`].
/// `xsave_size` comes from [`xsave2_size`]. `cpuid` is the table the VMM
/// gave the vCPU: KVM_GET_CPUID2 is not trustworthy on every host (where the
/// guest's CPUID is not intercepted it returns the host's), and the table
/// we set is what restore must set again.
pub fn save_vcpu(
    xsave_size: Option<usize>,
    fd: &VcpuFd,
    id: u8,
    msr_indices: &[u32],
    cpuid: &[kvm_cpuid_entry2],
) -> Result<VcpuState, PersistError> {
    let mp_state = fd
        .get_mp_state()
        .map_err(vcpu_err(id, "KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(vcpu_err(id, "KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(vcpu_err(id, "KVM_GET_SREGS"))?;
    let xsave = match xsave_size {
        Some(size) => {
            let words = size.div_ceil(4);
            let extra = words - std::mem::size_of::<kvm_xsave>() / 4;
            let mut x = Xsave::new(extra).map_err(|_| PersistError::Malformed {
                id,
                what: "XSAVE area",
                detail: format!("{size} bytes is too large"),
            })?;
            // SAFETY: `x` was allocated with room for the `size` bytes KVM
            // reported through KVM_CAP_XSAVE2.
            unsafe { fd.get_xsave2(&mut x) }.map_err(vcpu_err(id, "KVM_GET_XSAVE2"))?;
            let fam = x.as_fam_struct_ref();
            let mut v = fam.xsave.region.to_vec();
            v.extend_from_slice(x.as_slice());
            v
        }
        None => fd
            .get_xsave()
            .map_err(vcpu_err(id, "KVM_GET_XSAVE"))?
            .region
            .to_vec(),
    };
    let xcrs = fd.get_xcrs().ok();
    let debugregs = fd
        .get_debug_regs()
        .map_err(vcpu_err(id, "KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(vcpu_err(id, "KVM_GET_LAPIC"))?;
    let entries: Vec<kvm_msr_entry> = msr_indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Vec::with_capacity(entries.len());
    // KVM_GET_MSRS takes at most KVM_MAX_MSR_ENTRIES at a time.
    for batch in entries.chunks(200) {
        let mut m = Msrs::from_entries(batch).map_err(|_| PersistError::Malformed {
            id,
            what: "MSR list",
            detail: "too many MSRs".into(),
        })?;
        let n = fd.get_msrs(&mut m).map_err(vcpu_err(id, "KVM_GET_MSRS"))?;
        msrs.extend_from_slice(&m.as_slice()[..n]);
    }
    let cpuid = cpuid.to_vec();
    let tsc_khz = fd.get_tsc_khz().ok();
    let events = fd
        .get_vcpu_events()
        .map_err(vcpu_err(id, "KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        id,
        cpuid,
        tsc_khz,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs,
        events,
    })
}

/// Puts a saved state into a freshly created vCPU, in the order the module
/// documentation gives.
pub fn restore_vcpu(vm: &VmFd, fd: &VcpuFd, s: &VcpuState) -> Result<(), PersistError> {
    let id = s.id;
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| PersistError::Malformed {
        id,
        what: "CPUID",
        detail: format!("{} entries", s.cpuid.len()),
    })?;
    fd.set_cpuid2(&cpuid)
        .map_err(vcpu_err(id, "KVM_SET_CPUID2"))?;
    if let Some(khz) = s.tsc_khz {
        if fd.get_tsc_khz().ok() != Some(khz) {
            // Scaling may be unsupported; the guest then sees this host's
            // rate, which Linux tolerates (it re-reads the TSC rate only at boot).
            if let Err(e) = fd.set_tsc_khz(khz) {
                log::warn!("vCPU {id}: cannot set the TSC to {khz} kHz: {e}");
            }
        }
    }
    fd.set_mp_state(s.mp_state)
        .map_err(vcpu_err(id, "KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(vcpu_err(id, "KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs)
        .map_err(vcpu_err(id, "KVM_SET_SREGS"))?;
    let legacy_words = std::mem::size_of::<kvm_xsave>() / 4;
    if s.xsave.len() < legacy_words {
        return Err(PersistError::Malformed {
            id,
            what: "XSAVE area",
            detail: format!("{} bytes, less than 4 KiB", s.xsave.len() * 4),
        });
    }
    if s.xsave.len() == legacy_words {
        let mut x = kvm_xsave::default();
        x.region.copy_from_slice(&s.xsave);
        // SAFETY: `x` is a complete legacy XSAVE area.
        unsafe { fd.set_xsave(&x) }.map_err(vcpu_err(id, "KVM_SET_XSAVE"))?;
    } else {
        let have = xsave2_size(vm).unwrap_or(0);
        if s.xsave.len() * 4 > have {
            return Err(PersistError::Malformed {
                id,
                what: "XSAVE area",
                detail: format!(
                    "{} bytes, but this host's KVM takes at most {have}",
                    s.xsave.len() * 4
                ),
            });
        }
        let mut x =
            Xsave::new(s.xsave.len() - legacy_words).map_err(|_| PersistError::Malformed {
                id,
                what: "XSAVE area",
                detail: "too large".into(),
            })?;
        // SAFETY: the wrapper owns a buffer of exactly `len` entries; the
        // FAM entries follow the legacy region.
        unsafe { x.as_mut_fam_struct() }
            .xsave
            .region
            .copy_from_slice(&s.xsave[..legacy_words]);
        x.as_mut_slice().copy_from_slice(&s.xsave[legacy_words..]);
        // SAFETY: `x` holds a whole XSAVE area of the size this host supports.
        unsafe { fd.set_xsave2(&x) }.map_err(vcpu_err(id, "KVM_SET_XSAVE2"))?;
    }
    if let Some(xcrs) = &s.xcrs {
        fd.set_xcrs(xcrs).map_err(vcpu_err(id, "KVM_SET_XCRS"))?;
    }
    fd.set_debug_regs(&s.debugregs)
        .map_err(vcpu_err(id, "KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic)
        .map_err(vcpu_err(id, "KVM_SET_LAPIC"))?;
    for batch in s.msrs.chunks(200) {
        let m = Msrs::from_entries(batch).map_err(|_| PersistError::Malformed {
            id,
            what: "MSR list",
            detail: "too many MSRs".into(),
        })?;
        let n = fd.set_msrs(&m).map_err(vcpu_err(id, "KVM_SET_MSRS"))?;
        if n < batch.len() {
            return Err(PersistError::MsrRefused {
                id,
                index: batch[n].index,
                value: batch[n].data,
            });
        }
    }
    fd.set_vcpu_events(&s.events)
        .map_err(vcpu_err(id, "KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// Reads the VM-wide state. Every vCPU must be paused.
pub fn save_vm(vm: &VmFd) -> Result<VmState, PersistError> {
    let chip = |id: u32| -> Result<kvm_irqchip, PersistError> {
        let mut c = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm.get_irqchip(&mut c).map_err(vm_err("KVM_GET_IRQCHIP"))?;
        Ok(c)
    };
    let mut clock = vm.get_clock().map_err(vm_err("KVM_GET_CLOCK"))?;
    // Only the clock value itself can be set back; the other flags describe
    // this host.
    clock.flags = 0;
    Ok(VmState {
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(vm_err("KVM_GET_PIT2"))?,
        clock,
    })
}

/// Puts VM-wide state back into a VM created the same way.
pub fn restore_vm(vm: &VmFd, s: &VmState) -> Result<(), PersistError> {
    for (chip, want) in [
        (&s.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&s.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&s.ioapic, KVM_IRQCHIP_IOAPIC),
    ] {
        if chip.chip_id != want {
            return Err(PersistError::Malformed {
                id: 0,
                what: "interrupt controller state",
                detail: format!("chip {} where {want} belongs", chip.chip_id),
            });
        }
        vm.set_irqchip(chip).map_err(vm_err("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&s.pit).map_err(vm_err("KVM_SET_PIT2"))?;
    let mut clock = s.clock;
    clock.flags = 0;
    vm.set_clock(&clock).map_err(vm_err("KVM_SET_CLOCK"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pmu_and_amd_private_msrs_are_skipped() {
        assert!(skip_msr(0xc1));
        assert!(skip_msr(0x38f));
        assert!(skip_msr(0xc001_0004));
        assert!(!skip_msr(0x10)); // IA32_TSC
        assert!(!skip_msr(0xc000_0082)); // LSTAR
        assert!(!skip_msr(0x6e0)); // TSC_DEADLINE
    }
}
