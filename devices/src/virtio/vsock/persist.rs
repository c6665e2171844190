//! Saved state of a vsock device: the guest's CID, the host socket's path
//! (a restore may listen elsewhere) and what the driver negotiated.
//! Connections are not saved; the restored device resets them (see the
//! module's documentation).

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;

use serde::{Deserialize, Serialize};

use super::{check_cid, HostListener, Vsock, VsockError};

/// What a restored device is attached to on the host.
pub struct VsockHost {
    pub listener: Option<HostListener>,
    /// Host ports served inside the VMM ([`Vsock::add_service`]).
    pub services: HashMap<u32, Sender<UnixStream>>,
}
use crate::virtio::VirtioDevice;
use crate::Persist;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub cid: u64,
    /// Where the host socket was when the state was saved; empty for a
    /// device without one (serves only the VMM's own ports).
    pub uds: PathBuf,
    pub acked_features: u64,
}

impl VsockState {
    /// The saved host socket's path, if the device had one.
    pub fn uds_path(&self) -> Option<&Path> {
        (!self.uds.as_os_str().is_empty()).then_some(self.uds.as_path())
    }
}

impl Persist for Vsock {
    type State = VsockState;
    /// The host socket, bound by the caller (at the saved path or another),
    /// if the device has one, and the VMM's services.
    type ConstructorArgs = VsockHost;
    type Error = VsockError;

    fn save(&self) -> VsockState {
        VsockState {
            cid: self.cid,
            uds: self.uds_path().map(Path::to_path_buf).unwrap_or_default(),
            acked_features: self.acked_features,
        }
    }

    fn restore(host: VsockHost, s: &VsockState) -> Result<Self, VsockError> {
        check_cid(s.cid)?;
        let mut v = Vsock::with_listener(s.cid, host.listener);
        v.services = host.services;
        let offered = v.avail_features();
        if s.acked_features & !offered != 0 {
            return Err(VsockError::AckedNotOffered {
                acked: s.acked_features,
                offered,
            });
        }
        v.acked_features = s.acked_features;
        Ok(v)
    }
}
