//! x86_64: memory layout, CPUID, boot state, MP table, kernel loading and the
//! user-space completion of instructions KVM's emulator gives up on.

pub mod complete;
pub mod cpuid;
pub mod emulate;
pub mod layout;
pub mod loader;
pub mod mptable;
pub mod regs;
