//! A vCPU: its boot configuration, its thread's run loop, and the exit handler.
//!
//! The run loop is a small state machine: it runs KVM_RUN until an exit asks it
//! to stop or another thread asks it to (by setting the shared `exiting` flag
//! and kicking it out of KVM_RUN with a signal). The exit handler, which
//! decides what each KVM exit means, is a separate function unit-tested on its
//! own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::{cpuid, emulate, regs};
use crate::kvm::persist;
use crate::kvm::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {id}: KVM {op} failed: {err}")]
    Kvm {
        id: u8,
        op: &'static str,
        err: kvm_ioctls::Error,
    },
    #[error("cannot restore a vCPU: {0}")]
    Restore(Box<persist::PersistError>),
    #[error("vCPU {id}: KVM accepted only {set} of {total} boot MSRs")]
    Msrs { id: u8, set: usize, total: usize },
}

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest reset the machine (i8042 pulse, `reboot`): the normal way out.
    GuestReset,
    /// A triple fault or KVM_SYSTEM_EVENT shutdown.
    GuestShutdown(String),
    /// Asked for through the API.
    Requested,
    /// The VM cannot go on.
    Failed(String),
}

/// What a device bus does with a guest access.
pub trait Bus: Send + Sync {
    fn pio_in(&self, port: u16, data: &mut [u8]);
    /// Returns true when the write asks for a machine reset.
    fn pio_out(&self, port: u16, data: &[u8]) -> bool;
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    fn mmio_write(&self, addr: u64, data: &[u8]);
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
        VcpuExit::IoOut(port, data) => {
            if bus.pio_out(port, data) {
                ExitAction::Stop(StopReason::GuestReset)
            } else {
                ExitAction::Continue
            }
        }
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

/// State shared by all vCPU threads of one VM.
pub struct VcpuShared {
    pub bus: Arc<dyn Bus>,
    pub memory: GuestMemoryMmap,
    pub exiting: AtomicBool,
    /// Where a vCPU reports that the VM must stop.
    pub stop: Sender<crate::control::VmmEvent>,
    pub timeline: Arc<crate::timeline::Timeline>,
}

pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    /// The CPUID table this vCPU was given, saved in snapshots.
    cpuid: Vec<kvm_cpuid_entry2>,
}

/// What the VMM asks of a vCPU thread.
#[derive(Debug)]
pub enum VcpuRequest {
    /// Leave KVM_RUN, finish any pending I/O, and wait.
    Pause,
    /// Read the (paused) vCPU's KVM state.
    Save,
    /// Go back to running the guest.
    Resume,
    /// End the thread.
    Exit,
}

/// What a vCPU thread answers.
pub enum VcpuReply {
    Paused,
    Resumed,
    State(Box<persist::VcpuState>),
    Error(String),
}

/// The vCPU thread's end of its control channels.
pub struct VcpuControl {
    pub requests: Receiver<VcpuRequest>,
    pub replies: Sender<VcpuReply>,
    /// This host's XSAVE area size, from [`persist::xsave2_size`].
    pub xsave_size: Option<usize>,
    /// The MSRs this host lets us save.
    pub msr_indices: Arc<Vec<u32>>,
}

enum Served {
    Running,
    Exit,
}

fn kvm_err(id: u8, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |err| VcpuError::Kvm { id, op, err }
}

/// Signal used to kick a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
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
        Ok(Vcpu {
            id,
            fd,
            cpuid: cpuid_table,
        })
    }

    pub fn fd(&self) -> &VcpuFd {
        &self.fd
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
        Ok(Vcpu {
            id,
            fd,
            cpuid: state.cpuid.clone(),
        })
    }

    /// The thread body: runs until this vCPU stops the VM or is told to stop.
    ///
    /// States: running (in and out of KVM_RUN), paused (out of KVM_RUN,
    /// waiting for requests), exiting. Requests arrive on `control`; the
    /// sender kicks the thread out of KVM_RUN with [`kick_signal`] until it
    /// answers.
    pub fn run(mut self, shared: Arc<VcpuShared>, control: VcpuControl) {
        if self.id == 0 {
            shared.timeline.first_instruction();
        }
        let reason = loop {
            if shared.exiting.load(Ordering::Acquire) {
                return;
            }
            if let Ok(req) = control.requests.try_recv() {
                match self.serve(req, &shared, &control) {
                    Served::Running => continue,
                    Served::Exit => return,
                }
            }
            let action = match self.fd.run() {
                Ok(exit) => handle_exit(exit, shared.bus.as_ref()),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    continue;
                }
                Err(e) => ExitAction::Stop(StopReason::Failed(format!(
                    "vCPU {}: KVM_RUN failed: {e}",
                    self.id
                ))),
            };
            match action {
                ExitAction::Continue => {}
                ExitAction::Stop(r) => break r,
                ExitAction::InternalError => {
                    if let Err(msg) = self.complete_emulation(&shared.memory) {
                        break StopReason::Failed(msg);
                    }
                }
            }
        };
        shared.exiting.store(true, Ordering::Release);
        // The receiver may be gone if another vCPU stopped the VM first.
        let _ = shared.stop.send(crate::control::VmmEvent::Stop(reason));
    }

    /// Handles one request; a pause keeps serving requests until a resume.
    fn serve(&mut self, req: VcpuRequest, shared: &VcpuShared, control: &VcpuControl) -> Served {
        let VcpuRequest::Pause = req else {
            // Only a pause is valid while running: answer so the caller never hangs.
            let _ = control.replies.send(VcpuReply::Error(format!(
                "vCPU {}: {req:?} while running",
                self.id
            )));
            return Served::Running;
        };
        // An exit that needs the VMM to finish it (a port or MMIO read) is
        // completed by the next KVM_RUN: run once with immediate_exit so KVM
        // writes the result into the registers and returns at once.
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
        let _ = control.replies.send(VcpuReply::Paused);
        loop {
            let Ok(req) = control.requests.recv() else {
                return Served::Exit;
            };
            let reply = match req {
                VcpuRequest::Pause => VcpuReply::Paused,
                VcpuRequest::Resume => {
                    let _ = control.replies.send(VcpuReply::Resumed);
                    return Served::Running;
                }
                VcpuRequest::Exit => return Served::Exit,
                VcpuRequest::Save => {
                    match persist::save_vcpu(
                        control.xsave_size,
                        &self.fd,
                        self.id,
                        &control.msr_indices,
                        &self.cpuid,
                    ) {
                        Ok(state) => VcpuReply::State(Box::new(state)),
                        Err(e) => VcpuReply::Error(e.to_string()),
                    }
                }
            };
            if shared.exiting.load(Ordering::Acquire) {
                return Served::Exit;
            }
            let _ = control.replies.send(reply);
        }
    }

    fn internal_suberror(&mut self) -> u32 {
        let run = self.fd.get_kvm_run();
        // SAFETY: KVM_RUN just returned KVM_EXIT_INTERNAL_ERROR, so `internal`
        // is the union member the kernel filled in.
        unsafe { run.__bindgen_anon_1.internal.suberror }
    }

    /// Reads the instruction at RIP and completes it if `emulate` knows how.
    fn complete_emulation(&mut self, mem: &GuestMemoryMmap) -> Result<(), String> {
        let suberror = self.internal_suberror();
        let id = self.id;
        if suberror != kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
            return Err(format!(
                "vCPU {id}: KVM internal error, suberror {suberror}"
            ));
        }
        let err = |op: &str, e: kvm_ioctls::Error| format!("vCPU {id}: {op} failed: {e}");
        let mut r = self.fd.get_regs().map_err(|e| err("KVM_GET_REGS", e))?;
        let sregs = self.fd.get_sregs().map_err(|e| err("KVM_GET_SREGS", e))?;
        let paging = sregs.cr0 & (1 << 31) != 0;
        let translate = |linear: u64| -> Option<u64> {
            if !paging {
                return Some(linear);
            }
            emulate::walk_page_tables(sregs.cr3, linear, |gpa| {
                mem.read_obj::<u64>(GuestAddress(gpa)).ok()
            })
        };
        let rip_linear = sregs.cs.base.wrapping_add(r.rip);
        let mut bytes = Vec::with_capacity(15);
        for off in 0..15u64 {
            match translate(rip_linear + off)
                .and_then(|gpa| mem.read_obj::<u8>(GuestAddress(gpa)).ok())
            {
                Some(b) => bytes.push(b),
                None => break,
            }
        }
        let hex: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        let decoded = emulate::decode(&bytes).map_err(|e| {
            format!(
                "vCPU {id}: the host's KVM cannot emulate the guest instruction at RIP {:#x} (bytes {}): {e}",
                r.rip,
                hex.join(" ")
            )
        })?;
        log::debug!(
            "vCPU {id}: completing {:?} at {:#x}",
            decoded.fallback,
            r.rip
        );
        let next_rip = r.rip.wrapping_add(decoded.len);
        let mem_operand = |op: &emulate::MemOperand| -> Result<u64, String> {
            let linear = emulate::effective_address(
                op,
                &emulate::gp_regs(&r),
                next_rip,
                sregs.fs.base,
                sregs.gs.base,
            );
            translate(linear).ok_or_else(|| {
                format!(
                    "vCPU {id}: operand at {linear:#x} of the instruction at {:#x} is not mapped",
                    r.rip
                )
            })
        };
        match decoded.fallback {
            emulate::Fallback::Int3 => {
                let mut events = self
                    .fd
                    .get_vcpu_events()
                    .map_err(|e| err("KVM_GET_VCPU_EVENTS", e))?;
                events.exception.injected = 1;
                events.exception.nr = 3;
                events.exception.has_error_code = 0;
                events.exception.error_code = 0;
                r.rip = next_rip;
                self.fd.set_regs(&r).map_err(|e| err("KVM_SET_REGS", e))?;
                self.fd
                    .set_vcpu_events(&events)
                    .map_err(|e| err("KVM_SET_VCPU_EVENTS", e))?;
                return Ok(());
            }
            emulate::Fallback::Fwait => {}
            emulate::Fallback::Fninit => {
                let mut fpu = self.fd.get_fpu().map_err(|e| err("KVM_GET_FPU", e))?;
                fpu.fcw = 0x37f;
                fpu.fsw = 0;
                fpu.ftwx = 0;
                fpu.last_opcode = 0;
                fpu.last_ip = 0;
                fpu.last_dp = 0;
                self.fd.set_fpu(&fpu).map_err(|e| err("KVM_SET_FPU", e))?;
            }
            emulate::Fallback::Ldmxcsr(op) => {
                let gpa = mem_operand(&op)?;
                let v: u32 = mem
                    .read_obj(GuestAddress(gpa))
                    .map_err(|e| format!("vCPU {id}: ldmxcsr operand: {e}"))?;
                let mut fpu = self.fd.get_fpu().map_err(|e| err("KVM_GET_FPU", e))?;
                fpu.mxcsr = v & 0xffff;
                self.fd.set_fpu(&fpu).map_err(|e| err("KVM_SET_FPU", e))?;
            }
            emulate::Fallback::Stmxcsr(op) => {
                let gpa = mem_operand(&op)?;
                let fpu = self.fd.get_fpu().map_err(|e| err("KVM_GET_FPU", e))?;
                mem.write_obj(fpu.mxcsr, GuestAddress(gpa))
                    .map_err(|e| format!("vCPU {id}: stmxcsr operand: {e}"))?;
            }
        }
        r.rip = next_rip;
        self.fd.set_regs(&r).map_err(|e| err("KVM_SET_REGS", e))
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
        fn pio_out(&self, port: u16, data: &[u8]) -> bool {
            self.outs.lock().unwrap().push((port, data.to_vec()));
            port == 0x64 && data == [0xfe]
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
