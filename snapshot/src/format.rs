//! The on-disk layout: constants, the fixed-size records, and their
//! encoding. Everything is little-endian. See FORMAT.md for the picture.

use serde::{Deserialize, Serialize};

use crate::SnapshotError;

/// First bytes of every image.
pub const MAGIC: [u8; 8] = *b"VMMSNAP\0";
/// Last bytes of every image written by this library: the index footer.
pub const FOOTER_MAGIC: [u8; 8] = *b"VMMSIDX\0";
/// The one format version. Bump it on any change to this module or to a
/// serialized state struct; readers refuse every other version.
pub const FORMAT_VERSION: u32 = 1;
/// Guest memory and disks are described per page of this size.
pub const PAGE_SIZE: usize = 4096;
/// Default chunk: 1 MiB of guest memory.
pub const DEFAULT_CHUNK_PAGES: u32 = 256;
/// Largest chunk a reader accepts (16 MiB of guest memory).
pub const MAX_CHUNK_PAGES: u32 = 4096;
/// Largest header or state payload a reader accepts.
pub const MAX_STATE_LEN: u64 = 64 << 20;
/// Largest section name.
pub const MAX_NAME_LEN: usize = 255;
/// Size of a section record before its name and payload.
pub const SECTION_HEADER_LEN: usize = 20;
/// Size of the footer that closes an image.
pub const FOOTER_LEN: usize = 16;

/// Section kinds. Kinds at or above 0x8000 are optional: a reader that does
/// not know one skips it; below, it refuses the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Kind(pub u16);

impl Kind {
    /// VM-wide state (interrupt controllers, clock, machine description).
    pub const VM: Kind = Kind(1);
    /// One vCPU's state; the name is the vCPU index.
    pub const VCPU: Kind = Kind(2);
    /// One device's state; the name says which device.
    pub const DEVICE: Kind = Kind(3);
    /// Start of guest memory: the region layout.
    pub const MEMORY: Kind = Kind(4);
    /// Start of a disk's contents.
    pub const DISK: Kind = Kind(5);
    /// A chunk of pages of memory or of a disk.
    pub const CHUNK: Kind = Kind(6);
    /// End of the image's contents.
    pub const END: Kind = Kind(7);
    /// The index after END (optional: a streaming reader never needs it).
    pub const INDEX: Kind = Kind(0x8001);

    pub fn is_optional(self) -> bool {
        self.0 >= 0x8000
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::VM => "vm",
            Kind::VCPU => "vcpu",
            Kind::DEVICE => "device",
            Kind::MEMORY => "memory",
            Kind::DISK => "disk",
            Kind::CHUNK => "chunk",
            Kind::END => "end",
            Kind::INDEX => "index",
            _ => "unknown",
        }
    }
}

/// How chunk data is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    None,
    /// zstd at this level (1 to 19).
    Zstd(i32),
}

impl Compression {
    /// Parses `none`, `zstd` (level 1) or `zstd:LEVEL`.
    pub fn parse(s: &str) -> Result<Self, SnapshotError> {
        let bad = || SnapshotError::BadCompression(s.to_string());
        match s {
            "none" => Ok(Compression::None),
            "zstd" => Ok(Compression::Zstd(1)),
            _ => {
                let level: i32 = s
                    .strip_prefix("zstd:")
                    .ok_or_else(bad)?
                    .parse()
                    .map_err(|_| bad())?;
                if (1..=19).contains(&level) {
                    Ok(Compression::Zstd(level))
                } else {
                    Err(bad())
                }
            }
        }
    }

    pub(crate) fn codec(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Zstd(_) => 1,
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::None => write!(f, "none"),
            Compression::Zstd(l) => write!(f, "zstd:{l}"),
        }
    }
}

/// Image flags.
pub mod flags {
    /// Memory holds only the pages listed, on top of the parent image.
    pub const INCREMENTAL: u32 = 1;
    /// The image carries disk contents.
    pub const HAS_DISK: u32 = 2;
}

/// The image header (after magic and version).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// "x86_64".
    pub arch: String,
    /// CPU vendor of the host that wrote the image ("AuthenticAMD"...).
    pub cpu_vendor: String,
    /// CPU family, model, stepping of that host.
    pub cpu_signature: (u32, u32, u32),
    /// Unique id of this image.
    pub image_id: [u8; 16],
    /// Parent image of an incremental image.
    pub parent_id: Option<[u8; 16]>,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
    pub flags: u32,
}

/// Where memory lies: guest-physical regions, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    /// (guest physical address, length in bytes), page aligned.
    pub regions: Vec<(u64, u64)>,
    pub chunk_pages: u32,
    pub compression: Compression,
}

/// A disk whose contents follow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Which disk (e.g. the device name).
    pub name: String,
    /// Size in bytes (the last page may be partial).
    pub size: u64,
    pub chunk_pages: u32,
    pub compression: Compression,
}

/// Which address space a chunk's pages belong to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Space {
    Memory,
    /// The disk of the last DISK section.
    Disk,
}

/// The fixed part of a CHUNK payload: 16 bytes, then the `present` bitmap,
/// the `data` bitmap (each `ceil(pages / 8)` bytes), then the data of the
/// pages with a data bit, concatenated and compressed as a whole.
///
/// A page that is present without data is all zeros. A page that is not
/// present is unchanged from the parent image (only in incremental images).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    pub space: Space,
    pub codec: u8,
    pub pages: u32,
    /// Address of the first page: guest-physical, or a byte offset in the disk.
    pub base: u64,
}

pub const CHUNK_HEADER_LEN: usize = 16;

impl ChunkHeader {
    pub fn encode(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut b = [0u8; CHUNK_HEADER_LEN];
        b[0] = match self.space {
            Space::Memory => 0,
            Space::Disk => 1,
        };
        b[1] = self.codec;
        b[4..8].copy_from_slice(&self.pages.to_le_bytes());
        b[8..16].copy_from_slice(&self.base.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < CHUNK_HEADER_LEN {
            return None;
        }
        let space = match b[0] {
            0 => Space::Memory,
            1 => Space::Disk,
            _ => return None,
        };
        let codec = b[1];
        if codec > 1 || b[2] != 0 || b[3] != 0 {
            return None;
        }
        Some(ChunkHeader {
            space,
            codec,
            pages: u32::from_le_bytes(b[4..8].try_into().ok()?),
            base: u64::from_le_bytes(b[8..16].try_into().ok()?),
        })
    }

    /// Bytes in each of the two bitmaps.
    pub fn bitmap_len(&self) -> usize {
        (self.pages as usize).div_ceil(8)
    }
}

/// The index written after END: where every section starts, for readers
/// that can seek (lazy restore, `inspect` on a file).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    pub sections: Vec<IndexEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub kind: Kind,
    pub name: String,
    /// Offset of the section record from the start of the image.
    pub offset: u64,
    /// For chunks: the space and first address they cover, and the page count.
    pub chunk: Option<(Space, u64, u32)>,
}

/// A section record's fixed part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectionHeader {
    pub kind: Kind,
    pub name_len: u16,
    pub payload_len: u64,
    /// crc32c of name and payload.
    pub crc: u32,
}

impl SectionHeader {
    pub fn encode(&self) -> [u8; SECTION_HEADER_LEN] {
        let mut b = [0u8; SECTION_HEADER_LEN];
        b[0..2].copy_from_slice(&self.kind.0.to_le_bytes());
        b[2..4].copy_from_slice(&self.name_len.to_le_bytes());
        b[4..12].copy_from_slice(&self.payload_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.crc.to_le_bytes());
        // Bytes 16..20: crc32c of bytes 0..16, so a corrupt length is caught
        // before it is used.
        let hcrc = crc32c::crc32c(&b[0..16]);
        b[16..20].copy_from_slice(&hcrc.to_le_bytes());
        b
    }

    /// Decodes and checks the record's own checksum.
    pub fn decode(b: &[u8; SECTION_HEADER_LEN]) -> Option<Self> {
        let hcrc = u32::from_le_bytes([b[16], b[17], b[18], b[19]]);
        if crc32c::crc32c(&b[0..16]) != hcrc {
            return None;
        }
        Some(SectionHeader {
            kind: Kind(u16::from_le_bytes([b[0], b[1]])),
            name_len: u16::from_le_bytes([b[2], b[3]]),
            payload_len: u64::from_le_bytes(b[4..12].try_into().ok()?),
            crc: u32::from_le_bytes(b[12..16].try_into().ok()?),
        })
    }
}

/// Generates a fresh image id.
pub fn new_image_id() -> [u8; 16] {
    use std::io::Read;
    let mut id = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .is_err()
    {
        // No /dev/urandom: time and pid still make ids unique in practice.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        id[..16].copy_from_slice(&t.to_le_bytes());
        id[0] ^= std::process::id() as u8;
    }
    id
}

/// Hex form of an image id.
pub fn id_hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_parses() {
        assert_eq!(Compression::parse("none").unwrap(), Compression::None);
        assert_eq!(Compression::parse("zstd").unwrap(), Compression::Zstd(1));
        assert_eq!(Compression::parse("zstd:3").unwrap(), Compression::Zstd(3));
        for bad in ["zstd:0", "zstd:99", "gzip", "zstd:", "zstd:x"] {
            assert!(Compression::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Compression::Zstd(3).to_string(), "zstd:3");
    }

    #[test]
    fn section_header_round_trips_and_catches_corruption() {
        let h = SectionHeader {
            kind: Kind::VCPU,
            name_len: 3,
            payload_len: 1234,
            crc: 0xdead_beef,
        };
        let mut b = h.encode();
        assert_eq!(SectionHeader::decode(&b), Some(h));
        b[5] ^= 1;
        assert_eq!(SectionHeader::decode(&b), None);
    }

    #[test]
    fn chunk_header_round_trips() {
        let c = ChunkHeader {
            space: Space::Disk,
            codec: 1,
            pages: 256,
            base: 0x10_0000,
        };
        assert_eq!(ChunkHeader::decode(&c.encode()), Some(c));
        assert_eq!(c.bitmap_len(), 32);
        let mut b = c.encode();
        b[0] = 9;
        assert_eq!(ChunkHeader::decode(&b), None);
    }
}
