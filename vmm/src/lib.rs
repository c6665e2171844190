//! The micro-VMM: boots a Linux guest (or the test guest) under KVM, and
//! checkpoints and restores it whole. ARCHITECTURE.md at the repository's
//! root says how the parts fit.
//!
//! - `arch`: x86_64 knowledge (layout, CPUID, boot state, MP table, kernel
//!   loading, instruction completion).
//! - `kvm`: the KVM VM and vCPU wrappers and their saved state.
//! - `memory`: guest memory, its backing and KVM slots.
//! - `vcpu`: the vCPU threads and their state machine.
//! - `bus`, `device_manager`: the devices on the guest's buses, saved one by one;
//!   `event_loop`: the device thread where their backends work.
//! - `machine`: the one owner of a VM's lifecycle; `state` is what it saves.
//! - `image`: a machine's state, memory and disks as an image and back;
//!   `background`: an image written by a forked child while the VM runs;
//!   `host`: whether this host can run an image.
//! - `boot`: what `vmm run` boots; `runner`: runs a machine and serves `api`.
//! - `events`: what reaches the main thread, and the typed requests.
//! - `client`: requests to a running VMM's API socket.
//! - `agent`: the guest agent's control channel; `checkpoint`: checkpoints
//!   into `--snapshot-dir` (from the guest, a signal, the API).
//! - `seccomp`, `sandbox`: what each thread may call, and the file access
//!   Landlock confines the VMM to; `http`: the API socket's server;
//!   `progress`: the CLI's progress bars.

pub mod agent;
pub mod api;
pub mod arch;
pub mod atomic_file;
pub mod background;
pub mod boot;
pub mod bus;
pub mod checkpoint;
#[cfg(feature = "cli")]
pub mod client;
pub mod device_manager;
pub mod event_loop;
pub mod events;
pub mod guest;
pub mod host;
pub mod http;
pub mod image;
pub mod kvm;
pub mod machine;
pub mod memory;
pub mod names;
pub mod page_server;
pub mod progress;
pub mod runner;
pub mod sandbox;
pub mod seccomp;
pub mod state;
pub mod terminal;
pub mod timeline;
pub mod vcpu;
pub mod warm;

#[cfg(test)]
pub(crate) mod test_vm;

/// An error and its causes on one line, outermost first. Errors that
/// print their source also return it: a cause the message so far already
/// ends with is skipped.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !msg.ends_with(&c_text) {
            msg = format!("{msg}: {c_text}");
        }
        cause = c.source();
    }
    msg
}
