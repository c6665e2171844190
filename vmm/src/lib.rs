//! The micro-VMM: boots a Linux guest (or the test guest) under KVM.
//!
//! Layout: `arch` is pure x86_64 knowledge (layout, CPUID, boot state, MP
//! table, instruction fallbacks); `kvm` wraps /dev/kvm (VM, vCPUs, run loop);
//! `device_manager` wires the `devices` crate to ports and interrupts;
//! `runner` puts a VM together and runs it; `api` is the control socket.

pub mod api;
pub mod arch;
pub mod checkpoint;
pub mod control;
pub mod device_manager;
pub mod guest;
pub mod kvm;
pub mod runner;
pub mod terminal;
pub mod timeline;
