//! Everything that talks to /dev/kvm: the VM and its vCPUs.

pub mod persist;
pub mod vcpu;
pub mod vm;
