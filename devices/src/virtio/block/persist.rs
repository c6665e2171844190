//! Saved state of a virtio-blk device. The disk's contents are not part of
//! it: the caller saves (or fingerprints) the image file separately.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Backing, Block, BlockError};
use crate::virtio::VirtioDevice;
use crate::Persist;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Where the image was when the state was saved.
    pub path: PathBuf,
    /// The image's size in bytes.
    pub disk_size: u64,
    pub read_only: bool,
    /// What VIRTIO_BLK_T_GET_ID returns.
    pub id: String,
    /// Features the device offered.
    pub avail_features: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
}

impl Persist for Block {
    type State = BlockState;
    /// The disk: the image, opened read-write unless the state is
    /// read-only, or a copy-on-write view of it. It must have the saved
    /// size; its contents are the caller's business.
    type ConstructorArgs = Backing;
    type Error = BlockError;

    fn save(&self) -> BlockState {
        BlockState {
            path: self.path.clone(),
            disk_size: self.disk_size,
            read_only: self.read_only,
            id: self.id.clone(),
            avail_features: self.avail_features(),
            acked_features: self.acked_features,
        }
    }

    /// Builds an inactive device; the transport activates it if the saved
    /// transport was active.
    fn restore(disk: Backing, s: &BlockState) -> Result<Self, BlockError> {
        let mut b = Block::new(disk, s.read_only, s.id.clone())?.with_path(s.path.clone());
        if b.disk_size != s.disk_size {
            return Err(BlockError::SizeChanged {
                saved: s.disk_size,
                actual: b.disk_size,
            });
        }
        let offered = b.avail_features();
        if s.avail_features != offered {
            return Err(BlockError::FeaturesChanged {
                saved: s.avail_features,
                now: offered,
            });
        }
        if s.acked_features & !offered != 0 {
            return Err(BlockError::AckedNotOffered {
                acked: s.acked_features,
                offered,
            });
        }
        b.acked_features = s.acked_features;
        Ok(b)
    }
}
