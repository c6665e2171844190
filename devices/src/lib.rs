//! Emulated devices: the legacy PC devices a Linux guest needs (16550 serial,
//! i8042) and virtio over MMIO (transport and block device).
//!
//! Every device keeps its guest-visible state in a plain serde struct
//! (`FooState`, in a `persist.rs` next to the device: `legacy/serial/`,
//! `legacy/i8042/`, `virtio/mmio/`, `virtio/block/`) and implements
//! [`Persist`]: `save` reads the state of a quiesced device, `restore` builds
//! a new device from a state it validates first.
//!
//! Guest-controlled input never panics: every offset, length and index a
//! guest can write is bounds-checked, and a misbehaving virtio driver gets
//! DEVICE_NEEDS_RESET rather than a crashed VMM.

pub mod legacy;
pub mod persist;
pub mod virtio;

pub use persist::Persist;

/// Guest memory as the VMM maps it. Every write made through it (a device
/// filling a buffer, a used-ring update, a loader) is recorded page by page
/// in its region's bitmap: KVM's dirty log sees only the guest's own
/// writes, and an incremental snapshot needs both.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
