//! Saved state of a vsock device: the guest's CID, the host socket's path
//! (a restore may listen elsewhere) and what the driver negotiated.
//! Connections are not saved; the restored device resets them (see the
//! module's documentation).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{check_cid, HostListener, Vsock, VsockError};
use crate::virtio::VirtioDevice;
use crate::Persist;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub cid: u64,
    /// Where the host socket was when the state was saved.
    pub uds: PathBuf,
    pub acked_features: u64,
}

impl Persist for Vsock {
    type State = VsockState;
    /// The host socket, bound by the caller (at the saved path or another).
    type ConstructorArgs = HostListener;
    type Error = VsockError;

    fn save(&self) -> VsockState {
        VsockState {
            cid: self.cid,
            uds: self.host.path().to_path_buf(),
            acked_features: self.acked_features,
        }
    }

    fn restore(host: HostListener, s: &VsockState) -> Result<Self, VsockError> {
        check_cid(s.cid)?;
        let mut v = Vsock::with_listener(s.cid, host);
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
