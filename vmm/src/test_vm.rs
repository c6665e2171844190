//! A real KVM VM for unit tests: 16 MiB whose boot vCPU spins on `jmp $`
//! at the kernel's entry, in long mode on our boot page tables.

use std::sync::Arc;
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress};

use crate::arch::cpuid::CpuTemplate;
use crate::arch::{layout, regs};
use crate::kvm::vcpu::Vcpu;
use crate::kvm::vm::Vm;
use crate::timeline::Timeline;

/// Where the spinning code is, and so the vCPU's RIP whenever it stops.
pub const SPIN_AT: u64 = layout::HIMEM_START;

/// A VM with the spinning code in memory.
pub fn vm() -> Vm {
    let vm = Vm::new(16).expect("/dev/kvm must work for the vmm unit tests");
    regs::write_boot_tables(vm.memory()).unwrap();
    vm.memory()
        .write_slice(&[0xeb, 0xfe], GuestAddress(SPIN_AT))
        .unwrap();
    vm
}

/// Its boot vCPU, about to run the spinning code.
pub fn vcpu(vm: &Vm) -> Vcpu {
    Vcpu::new(vm, 0, 1, CpuTemplate::detect(), Some(SPIN_AT)).unwrap()
}

pub fn timeline() -> Arc<Timeline> {
    Arc::new(Timeline::new(Instant::now()))
}
