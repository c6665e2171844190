//! Saved state of a virtio-net device: its identity (MAC), the TAP it was
//! attached to (a restore may attach another) and what the driver
//! negotiated. Frames in flight are not saved: a restored guest sees them
//! lost, as on a wire, and TCP sends them again.

use serde::{Deserialize, Serialize};

use super::{MacAddr, Net, NetError, Tap};
use crate::virtio::VirtioDevice;
use crate::Persist;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The TAP's name when the state was saved.
    pub tap: String,
    pub mac: MacAddr,
    pub avail_features: u64,
    pub acked_features: u64,
}

impl Persist for Net {
    type State = NetState;
    /// The TAP to attach: the saved one or another, opened by the caller.
    type ConstructorArgs = Tap;
    type Error = NetError;

    fn save(&self) -> NetState {
        NetState {
            tap: self.tap.name().to_string(),
            mac: self.mac,
            avail_features: self.avail_features(),
            acked_features: self.acked_features,
        }
    }

    /// Builds an inactive device; the transport activates it if the saved
    /// transport was active. The TAP gets the offloads the driver accepted.
    fn restore(tap: Tap, s: &NetState) -> Result<Self, NetError> {
        let mut net = Net::new(tap, s.mac);
        let offered = net.avail_features();
        if s.avail_features != offered {
            return Err(NetError::FeaturesChanged {
                saved: s.avail_features,
                now: offered,
            });
        }
        if s.acked_features & !offered != 0 {
            return Err(NetError::AckedNotOffered {
                acked: s.acked_features,
                offered,
            });
        }
        net.acked_features = s.acked_features;
        net.tap.set_offload(Net::tap_offload(s.acked_features))?;
        Ok(net)
    }
}
