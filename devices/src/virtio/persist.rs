//! A virtio device's saved state paired with its transport's.
//!
//! The transport saves only itself ([`MmioState`]); each device saves its own
//! state next to itself (`block/persist.rs`). [`VirtioDeviceState`] pairs the
//! two for any device type, so adding a device touches only the device's
//! files and the VMM's one registration, never the transport.

use crate::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::{MmioArgs, MmioError, MmioState, MmioTransport};
use super::VirtioDevice;
use crate::Persist;

/// One virtio device as saved: its transport and its own state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceState<T> {
    pub transport: MmioState,
    pub device: T,
}

#[derive(Debug, thiserror::Error)]
pub enum VirtioRestoreError {
    #[error(transparent)]
    Device(Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Transport(#[from] MmioError),
}

/// The state of the device of type `D` behind `transport`, or None if the
/// device is of another type.
pub fn save<D>(transport: &MmioTransport) -> Option<VirtioDeviceState<D::State>>
where
    D: VirtioDevice + Persist + 'static,
{
    let device = transport.device().as_any().downcast_ref::<D>()?;
    Some(VirtioDeviceState {
        transport: transport.save(),
        device: device.save(),
    })
}

/// Rebuilds a device of type `D` from its state, then its transport around it.
pub fn restore<D>(
    mem: GuestMemoryMmap,
    irq: EventFd,
    args: D::ConstructorArgs,
    state: &VirtioDeviceState<D::State>,
) -> Result<MmioTransport, VirtioRestoreError>
where
    D: VirtioDevice + Persist + 'static,
{
    let device =
        D::restore(args, &state.device).map_err(|e| VirtioRestoreError::Device(Box::new(e)))?;
    Ok(MmioTransport::restore(
        MmioArgs {
            mem,
            irq,
            device: Box::new(device),
        },
        &state.transport,
    )?)
}
