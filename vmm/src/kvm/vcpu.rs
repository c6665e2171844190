//! A KVM vCPU: its boot configuration, save and restore, and one KVM_RUN
//! with the meaning of its exit. The thread that drives it, and its states,
//! live in the top-level `vcpu` module.

use std::sync::{Arc, OnceLock};

use devices::GuestMemoryMmap;
use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::arch::{complete, cpuid, regs};
use crate::bus::{Bus, PortEffect};
use crate::events::StopReason;
use crate::kvm::persist::{self, PersistError, VcpuState};
use crate::kvm::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {id}: KVM {op} failed")]
    Kvm {
        id: u8,
        op: &'static str,
        #[source]
        err: kvm_ioctls::Error,
    },
    #[error("cannot restore a vCPU")]
    Restore(#[source] Box<PersistError>),
    #[error("cannot list the MSRs to save")]
    SaveCaps(#[source] Box<PersistError>),
    #[error("vCPU {id}: KVM accepted only {set} of {total} boot MSRs")]
    Msrs { id: u8, set: usize, total: usize },
}

/// What the run loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitAction {
    Continue,
    Stop(StopReason),
    /// KVM_RUN returned an internal error: if KVM's emulator gave up, the
    /// instruction may be completed in user space.
    InternalError,
}

/// Decides what one KVM exit means. `suberror` is read by the caller for InternalError.
pub fn handle_exit(exit: VcpuExit<'_>, bus: &dyn Bus) -> ExitAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            bus.pio_in(port, data);
            ExitAction::Continue
        }
        VcpuExit::IoOut(port, data) => match bus.pio_out(port, data) {
            PortEffect::Reset => ExitAction::Stop(StopReason::GuestReset),
            PortEffect::None => ExitAction::Continue,
        },
        VcpuExit::MmioRead(addr, data) => {
            bus.mmio_read(addr, data);
            ExitAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            bus.mmio_write(addr, data);
            ExitAction::Continue
        }
        VcpuExit::Shutdown => ExitAction::Stop(StopReason::GuestShutdown(
            "the guest triple-faulted (KVM_EXIT_SHUTDOWN)".into(),
        )),
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitAction::Stop(StopReason::GuestReset),
            _ => ExitAction::Stop(StopReason::GuestShutdown(format!(
                "the guest signalled system event {kind}"
            ))),
        },
        VcpuExit::Hlt => ExitAction::Continue,
        VcpuExit::InternalError => ExitAction::InternalError,
        VcpuExit::FailEntry(reason, cpu) => ExitAction::Stop(StopReason::Failed(format!(
            "KVM could not enter the guest on cpu {cpu} (hardware reason {reason:#x})"
        ))),
        other => ExitAction::Stop(StopReason::Failed(format!(
            "unexpected KVM exit: {other:?}"
        ))),
    }
}

/// What saving a vCPU needs to know about this host, found once per VM.
pub struct SaveCaps {
    /// This host's XSAVE area size, from [`persist::xsave2_size`].
    xsave_size: Option<usize>,
    /// The MSRs this host lets us save, from [`persist::saveable_msrs`].
    msrs: Vec<u32>,
}

/// Found with the first vCPU of the process and shared by all: every VM of
/// one process runs on the same host.
static SAVE_CAPS: OnceLock<Arc<SaveCaps>> = OnceLock::new();

fn save_caps(vm: &Vm, fd: &VcpuFd, id: u8) -> Result<Arc<SaveCaps>, VcpuError> {
    if let Some(c) = SAVE_CAPS.get() {
        return Ok(c.clone());
    }
    let caps = Arc::new(SaveCaps {
        xsave_size: persist::xsave2_size(vm.fd()),
        msrs: persist::saveable_msrs(vm.kvm(), fd, id)
            .map_err(|e| VcpuError::SaveCaps(Box::new(e)))?,
    });
    Ok(SAVE_CAPS.get_or_init(|| caps).clone())
}

/// What one KVM_RUN came to.
#[derive(Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// Go on running.
    Continue,
    /// A signal took the vCPU out of KVM_RUN: look at the requests.
    Interrupted,
    /// The VM must stop.
    Stop(StopReason),
}

/// Signal used to kick a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

/// One KVM vCPU.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    /// The CPUID table this vCPU was given, saved in snapshots.
    cpuid: Vec<kvm_cpuid_entry2>,
    caps: Arc<SaveCaps>,
}

fn kvm_err(id: u8, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |err| VcpuError::Kvm { id, op, err }
}

impl Vcpu {
    /// Creates vCPU `id` and sets its CPUID, MSRs and LAPIC. `entry` is given for
    /// the boot vCPU only; the others wait for INIT/SIPI from it.
    pub fn new(
        vm: &Vm,
        id: u8,
        vcpu_count: u8,
        template: cpuid::CpuTemplate,
        entry: Option<u64>,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(kvm_err(id, "KVM_CREATE_VCPU"))?;
        let supported = vm
            .kvm()
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err(id, "KVM_GET_SUPPORTED_CPUID"))?;
        let entries: Vec<kvm_cpuid_entry2> = cpuid::filter_cpuid(
            supported.as_slice(),
            template,
            cpuid::VcpuTopology {
                apic_id: id,
                vcpu_count,
            },
        );
        for e in entries
            .iter()
            .filter(|e| e.function == 1 || e.function == 7)
        {
            log::debug!(
                "vCPU {id} CPUID {:#x}.{}: eax={:#x} ebx={:#x} ecx={:#x} edx={:#x}",
                e.function,
                e.index,
                e.eax,
                e.ebx,
                e.ecx,
                e.edx
            );
        }
        let cpuid = CpuId::from_entries(&entries).map_err(|_| VcpuError::Kvm {
            id,
            op: "building CPUID",
            err: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        fd.set_cpuid2(&cpuid)
            .map_err(kvm_err(id, "KVM_SET_CPUID2"))?;
        let cpuid_table = entries;

        let boot_msrs = regs::boot_msrs();
        let entries: Vec<kvm_msr_entry> = boot_msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Msrs {
            id,
            set: 0,
            total: entries.len(),
        })?;
        let set = fd.set_msrs(&msrs).map_err(kvm_err(id, "KVM_SET_MSRS"))?;
        if set != entries.len() {
            return Err(VcpuError::Msrs {
                id,
                set,
                total: entries.len(),
            });
        }

        let mut lapic = fd.get_lapic().map_err(kvm_err(id, "KVM_GET_LAPIC"))?;
        regs::set_lint(&mut lapic);
        fd.set_lapic(&lapic).map_err(kvm_err(id, "KVM_SET_LAPIC"))?;
        fd.set_fpu(&regs::boot_fpu())
            .map_err(kvm_err(id, "KVM_SET_FPU"))?;

        if let Some(entry) = entry {
            let sregs = fd.get_sregs().map_err(kvm_err(id, "KVM_GET_SREGS"))?;
            fd.set_sregs(&regs::boot_sregs(sregs))
                .map_err(kvm_err(id, "KVM_SET_SREGS"))?;
            fd.set_regs(&regs::boot_regs(entry))
                .map_err(kvm_err(id, "KVM_SET_REGS"))?;
        }
        let caps = save_caps(vm, &fd, id)?;
        Ok(Vcpu {
            id,
            fd,
            cpuid: cpuid_table,
            caps,
        })
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    /// TSC frequency in kHz as KVM reports it for this vCPU.
    pub fn tsc_khz(&self) -> Option<u32> {
        self.fd.get_tsc_khz().ok()
    }

    /// Creates vCPU `state.id` and puts a saved state into it.
    pub fn restore(vm: &Vm, state: &persist::VcpuState) -> Result<Self, VcpuError> {
        let id = state.id;
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(kvm_err(id, "KVM_CREATE_VCPU"))?;
        persist::restore_vcpu(vm.fd(), &fd, state).map_err(|e| VcpuError::Restore(Box::new(e)))?;
        let caps = save_caps(vm, &fd, id)?;
        Ok(Vcpu {
            id,
            fd,
            cpuid: state.cpuid.clone(),
            caps,
        })
    }

    /// Reads the vCPU's state. It must be out of KVM_RUN with its pending
    /// I/O finished ([`Vcpu::finish_pending_io`]).
    pub fn save(&self) -> Result<VcpuState, PersistError> {
        persist::save_vcpu(
            self.caps.xsave_size,
            &self.fd,
            self.id,
            &self.caps.msrs,
            &self.cpuid,
        )
    }

    /// Runs the guest until its next exit and handles it.
    pub fn run(&mut self, bus: &dyn Bus, mem: &GuestMemoryMmap) -> RunOutcome {
        let action = match self.fd.run() {
            Ok(exit) => handle_exit(exit, bus),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return RunOutcome::Interrupted;
            }
            Err(e) => ExitAction::Stop(StopReason::Failed(format!(
                "vCPU {}: KVM_RUN failed: {e}",
                self.id
            ))),
        };
        match action {
            ExitAction::Continue => RunOutcome::Continue,
            ExitAction::Stop(r) => RunOutcome::Stop(r),
            ExitAction::InternalError => {
                let suberror = self.internal_suberror();
                if suberror != kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
                    return RunOutcome::Stop(StopReason::Failed(format!(
                        "vCPU {}: KVM internal error, suberror {suberror}",
                        self.id
                    )));
                }
                match complete::complete_instruction(&self.fd, mem, self.id) {
                    Ok(()) => RunOutcome::Continue,
                    Err(msg) => RunOutcome::Stop(StopReason::Failed(msg)),
                }
            }
        }
    }

    /// An exit that needs the VMM to finish it (a port or MMIO read) is
    /// completed by the next KVM_RUN: run once with immediate_exit so KVM
    /// writes the result into the registers and returns at once. After
    /// this the registers are whole, and can be saved.
    pub fn finish_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
    }

    fn internal_suberror(&mut self) -> u32 {
        let run = self.fd.get_kvm_run();
        // SAFETY: KVM_RUN just returned KVM_EXIT_INTERNAL_ERROR, so `internal`
        // is the union member the kernel filled in.
        unsafe { run.__bindgen_anon_1.internal.suberror }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct RecordingBus {
        outs: Mutex<Vec<(u16, Vec<u8>)>>,
        mmio: Mutex<Vec<(u64, Vec<u8>)>>,
    }

    impl Bus for RecordingBus {
        fn pio_in(&self, port: u16, data: &mut [u8]) {
            data.fill(port as u8);
        }
        fn pio_out(&self, port: u16, data: &[u8]) -> PortEffect {
            self.outs.lock().unwrap().push((port, data.to_vec()));
            if port == 0x64 && data == [0xfe] {
                PortEffect::Reset
            } else {
                PortEffect::None
            }
        }
        fn mmio_read(&self, addr: u64, data: &mut [u8]) {
            data.fill(addr as u8);
        }
        fn mmio_write(&self, addr: u64, data: &[u8]) {
            self.mmio.lock().unwrap().push((addr, data.to_vec()));
        }
    }

    #[test]
    fn port_and_mmio_exits_reach_the_bus() {
        let bus = RecordingBus::default();
        let mut buf = [0u8; 1];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x3f8, &mut buf), &bus),
            ExitAction::Continue
        );
        assert_eq!(buf, [0xf8]);
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x3f8, b"A"), &bus),
            ExitAction::Continue
        );
        let mut m = [0u8; 4];
        assert_eq!(
            handle_exit(VcpuExit::MmioRead(0xd000_0010, &mut m), &bus),
            ExitAction::Continue
        );
        assert_eq!(m, [0x10; 4]);
        handle_exit(VcpuExit::MmioWrite(0xd000_0050, &[0, 0, 0, 0]), &bus);
        assert_eq!(bus.outs.lock().unwrap()[0], (0x3f8, b"A".to_vec()));
        assert_eq!(bus.mmio.lock().unwrap()[0].0, 0xd000_0050);
    }

    #[test]
    fn reset_and_shutdown_stop_the_vm() {
        let bus = RecordingBus::default();
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x64, &[0xfe]), &bus),
            ExitAction::Stop(StopReason::GuestReset)
        );
        assert!(matches!(
            handle_exit(VcpuExit::Shutdown, &bus),
            ExitAction::Stop(StopReason::GuestShutdown(_))
        ));
        assert_eq!(
            handle_exit(
                VcpuExit::SystemEvent(kvm_bindings::KVM_SYSTEM_EVENT_RESET, &[]),
                &bus
            ),
            ExitAction::Stop(StopReason::GuestReset)
        );
        assert_eq!(
            handle_exit(VcpuExit::InternalError, &bus),
            ExitAction::InternalError
        );
        assert!(matches!(
            handle_exit(VcpuExit::FailEntry(1, 0), &bus),
            ExitAction::Stop(StopReason::Failed(_))
        ));
    }
}
