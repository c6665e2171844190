//! Applies [`super::emulate`]'s decoding to a vCPU that KVM's instruction
//! emulator handed back: reads the instruction at RIP through the guest's
//! page tables, completes it, and moves RIP past it.

use devices::GuestMemoryMmap;
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::emulate;

/// Completes the instruction at RIP of vCPU `id` if [`emulate`] knows how;
/// otherwise says which instruction it was, for the user.
pub fn complete_instruction(fd: &VcpuFd, mem: &GuestMemoryMmap, id: u8) -> Result<(), String> {
    let err = |op: &str, e: kvm_ioctls::Error| format!("vCPU {id}: {op} failed: {e}");
    let mut r = fd.get_regs().map_err(|e| err("KVM_GET_REGS", e))?;
    let sregs = fd.get_sregs().map_err(|e| err("KVM_GET_SREGS", e))?;
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
        match translate(rip_linear + off).and_then(|gpa| mem.read_obj::<u8>(GuestAddress(gpa)).ok())
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
            let mut events = fd
                .get_vcpu_events()
                .map_err(|e| err("KVM_GET_VCPU_EVENTS", e))?;
            events.exception.injected = 1;
            events.exception.nr = 3;
            events.exception.has_error_code = 0;
            events.exception.error_code = 0;
            r.rip = next_rip;
            fd.set_regs(&r).map_err(|e| err("KVM_SET_REGS", e))?;
            fd.set_vcpu_events(&events)
                .map_err(|e| err("KVM_SET_VCPU_EVENTS", e))?;
            return Ok(());
        }
        emulate::Fallback::Fwait => {}
        emulate::Fallback::Fninit => {
            let mut fpu = fd.get_fpu().map_err(|e| err("KVM_GET_FPU", e))?;
            fpu.fcw = 0x37f;
            fpu.fsw = 0;
            fpu.ftwx = 0;
            fpu.last_opcode = 0;
            fpu.last_ip = 0;
            fpu.last_dp = 0;
            fd.set_fpu(&fpu).map_err(|e| err("KVM_SET_FPU", e))?;
        }
        emulate::Fallback::Ldmxcsr(op) => {
            let gpa = mem_operand(&op)?;
            let v: u32 = mem
                .read_obj(GuestAddress(gpa))
                .map_err(|e| format!("vCPU {id}: ldmxcsr operand: {e}"))?;
            let mut fpu = fd.get_fpu().map_err(|e| err("KVM_GET_FPU", e))?;
            fpu.mxcsr = v & 0xffff;
            fd.set_fpu(&fpu).map_err(|e| err("KVM_SET_FPU", e))?;
        }
        emulate::Fallback::Stmxcsr(op) => {
            let gpa = mem_operand(&op)?;
            let fpu = fd.get_fpu().map_err(|e| err("KVM_GET_FPU", e))?;
            mem.write_obj(fpu.mxcsr, GuestAddress(gpa))
                .map_err(|e| format!("vCPU {id}: stmxcsr operand: {e}"))?;
        }
    }
    r.rip = next_rip;
    fd.set_regs(&r).map_err(|e| err("KVM_SET_REGS", e))
}
