//! The saved state of a whole machine: what `Machine::save_state` returns
//! and a restore starts from. Plain data; the image module writes it as one
//! image section per part.

use serde::{Deserialize, Serialize};

use crate::arch::cpuid::CpuTemplate;
use crate::device_manager::persist::SavedDevice;
use crate::kvm::persist::{VcpuState, VmState};

/// What a VM is, beyond its guest state: saved in every image so a restore
/// rebuilds the same machine.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MachineConfig {
    pub mem_mib: u64,
    pub vcpus: u8,
    pub template: CpuTemplate,
    pub kernel: String,
    /// The guest runs a container command whose status `vmm` exits with.
    pub expects_status: bool,
}

/// Everything of a paused machine but its memory and disk contents.
#[derive(Clone)]
pub struct MachineState {
    pub config: MachineConfig,
    /// KVM's VM-wide state: interrupt controllers, PIT, clock.
    pub vm: VmState,
    /// One per vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// One per device.
    pub devices: Vec<SavedDevice>,
}
