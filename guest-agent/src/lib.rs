//! The guest agent, `vmm-agent`: PID 1 of the default guest.
//!
//! It mounts the API filesystems, runs the container command given on the
//! kernel command line (see [`cmdline`]) as the main process, reaps zombies,
//! and when the main process exits kills the rest, reports the exit status to
//! the VMM (see [`status`]) and reboots, which ends the VMM.
//!
//! Meanwhile it keeps a control channel to the VMM over vsock
//! ([`control`]): it runs commands for it ([`exec`]), freezes the disks for
//! a snapshot ([`freeze`]), does the after-restore work ([`restore`]), and
//! carries checkpoint requests from programs in the guest ([`local`],
//! [`notify`]).
//!
//! All `unsafe` code lives in [`sys`]; the rest is plain Rust, unit-tested on
//! the host.
#![deny(unsafe_code)]

pub mod children;
pub mod clock;
pub mod cmdline;
pub mod command;
pub mod control;
pub mod exec;
pub mod freeze;
pub mod init;
pub mod local;
pub mod net;
pub mod notify;
pub mod restore;
pub mod status;
#[allow(unsafe_code)]
pub mod sys;
