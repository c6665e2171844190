//! Emulated devices: the legacy PC devices a Linux guest needs (16550 serial,
//! i8042) and virtio over MMIO (transport and block device).
//!
//! Every device keeps its guest-visible state in a plain serde struct
//! (`FooState`, in the device's `persist` part) and implements [`Persist`]:
//! `save` reads the state of a quiesced device, `restore` builds a new device
//! from a state it validates first.

pub mod legacy;
pub mod persist;
pub mod virtio;

pub use persist::Persist;
