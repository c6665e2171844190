//! The devices' saved state: one [`SavedDevice`] per device, which the image
//! writes as one section named by the device's id (`serial/0`,
//! `virtio-blk/0`, ...), so `vmm inspect` lists the devices.
//!
//! Adding a device type: a variant in [`DeviceState`] (its kind name in
//! [`DeviceState::kind`]) and its arms in `DeviceManager::save` and
//! `DeviceManager::restore`. Nothing else changes.

use devices::legacy::{I8042State, RtcState, SerialState};
use devices::virtio::block::BlockState;
use devices::virtio::net::NetState;
use devices::virtio::rng::RngState;
use devices::virtio::vsock::VsockState;
use devices::virtio::VirtioDeviceState;
use serde::{Deserialize, Serialize};

/// A device's saved state and its id.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedDevice {
    /// `kind/index`, unique in the VM; the image section's name.
    pub id: String,
    pub state: DeviceState,
}

/// One device's state, by kind.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum DeviceState {
    Serial(SerialState),
    I8042(I8042State),
    StatusPort(StatusPortState),
    VirtioBlock(VirtioSlotState<BlockState>),
    Rtc(RtcState),
    VirtioNet(VirtioSlotState<NetState>),
    VirtioRng(VirtioSlotState<RngState>),
    VirtioVsock(VirtioSlotState<VsockState>),
}

impl DeviceState {
    /// The first half of the device's id.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceState::Serial(_) => "serial",
            DeviceState::I8042(_) => "i8042",
            DeviceState::StatusPort(_) => "status-port",
            DeviceState::VirtioBlock(_) => "virtio-blk",
            DeviceState::Rtc(_) => "rtc",
            DeviceState::VirtioNet(_) => "virtio-net",
            DeviceState::VirtioRng(_) => "virtio-rng",
            DeviceState::VirtioVsock(_) => "virtio-vsock",
        }
    }
}

/// The guest agent's status port.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusPortState {
    /// The exit status the guest had already reported, or -1.
    pub status: i32,
}

/// A virtio device, where it sits on the MMIO bus and its interrupt line.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VirtioSlotState<T> {
    pub base: u64,
    pub gsi: u32,
    pub virtio: VirtioDeviceState<T>,
}

/// `kind/index`.
pub fn device_id(kind: &str, index: usize) -> String {
    format!("{kind}/{index}")
}

/// Checks that `id` names a device of `state`'s kind.
pub fn id_matches(id: &str, state: &DeviceState) -> bool {
    id.split_once('/')
        .is_some_and(|(kind, index)| kind == state.kind() && index.parse::<u32>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_their_kind() {
        let s = DeviceState::StatusPort(StatusPortState { status: 3 });
        assert_eq!(device_id(s.kind(), 0), "status-port/0");
        assert!(id_matches("status-port/0", &s));
        assert!(!id_matches("serial/0", &s));
        assert!(!id_matches("status-port", &s));
        assert!(!id_matches("status-port/x", &s));
    }
}
