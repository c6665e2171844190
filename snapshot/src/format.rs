//! The on-disk layout: constants, the identifiers of sections and address
//! spaces, the fixed-size records, and their encoding. Everything is
//! little-endian. FORMAT.md draws the picture; the serde payloads are in
//! [`crate::state`], which builds on this module (never the other way).

/// First bytes of every image.
pub const MAGIC: [u8; 8] = *b"VMMSNAP\0";
/// Last bytes of an image with an index: the footer's magic.
pub const FOOTER_MAGIC: [u8; 8] = *b"VMMSIDX\0";
/// The one format version. Bump it on any change to this module, to
/// [`crate::state`] or to a serialized state struct; readers refuse every
/// other version.
pub const FORMAT_VERSION: u32 = 2;
/// Guest memory and disks are described per page of this size.
pub const PAGE_SIZE: usize = 4096;
/// Default chunk: 1 MiB of guest memory. Big enough for zstd to find
/// matches and to keep per-chunk overhead (a 44-byte record header and two
/// 32-byte bitmaps) negligible; small enough that a lazy restore fetching
/// one chunk per fault stays cheap.
pub const DEFAULT_CHUNK_PAGES: u32 = 256;
/// Largest chunk a reader accepts (16 MiB of guest memory).
pub const MAX_CHUNK_PAGES: u32 = 4096;
/// Largest chunk record payload a reader accepts: header, two bitmaps, and
/// zstd's worst case for the largest chunk's data.
pub fn max_chunk_payload() -> u64 {
    let data = MAX_CHUNK_PAGES as usize * PAGE_SIZE;
    (CHUNK_HEADER_LEN
        + 2 * (MAX_CHUNK_PAGES as usize).div_ceil(8)
        + zstd::zstd_safe::compress_bound(data)) as u64
}
/// Largest header, state, layout or index payload a reader accepts.
pub const MAX_STATE_LEN: u64 = 64 << 20;
/// Largest section name.
pub const MAX_NAME_LEN: usize = 255;
/// Size of the fixed part of the image header: magic, version, length.
pub const FILE_HEADER_LEN: usize = 16;
/// Size of a section record before its name and payload.
pub const SECTION_HEADER_LEN: usize = 24;
/// Size of the footer that closes an image with an index.
pub const FOOTER_LEN: usize = 24;
/// Size of the fixed part of a chunk payload.
pub const CHUNK_HEADER_LEN: usize = 16;

/// Section flags ([`SectionHeader::flags`]).
pub mod section_flags {
    /// A reader that does not know the section's kind skips it; without
    /// this bit it refuses the image. Lets a newer writer add data an older
    /// reader can do without.
    pub const OPTIONAL: u16 = 1;
}

/// Section kinds.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Kind(pub u16);

impl Kind {
    /// VM-wide state (interrupt controllers, clock, machine description).
    pub const VM: Kind = Kind(1);
    /// One vCPU's state; the name is the vCPU index.
    pub const VCPU: Kind = Kind(2);
    /// One device's state; the name says which device.
    pub const DEVICE: Kind = Kind(3);
    /// Start of guest memory: its [`MemoryLayout`](crate::state::MemoryLayout);
    /// chunks follow.
    pub const MEMORY: Kind = Kind(4);
    /// Start of a disk's contents: its [`DiskInfo`](crate::state::DiskInfo);
    /// chunks follow.
    pub const DISK: Kind = Kind(5);
    /// A chunk of pages of memory or of a disk.
    pub const CHUNK: Kind = Kind(6);
    /// End of the image's contents.
    pub const END: Kind = Kind(7);
    /// The index after END (a streaming reader checks it and moves on).
    pub const INDEX: Kind = Kind(8);

    /// What error messages call this kind.
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

    /// Kinds this build reads.
    pub fn is_known(self) -> bool {
        (1..=8).contains(&self.0)
    }
}

/// Which address space a chunk's pages belong to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Space {
    Memory,
    /// The disk of the last DISK section.
    Disk,
}

/// The END payload's one byte: bit 0 says an index and footer follow, so a
/// streaming reader knows to read them (and never blocks waiting for bytes
/// that will not come, or leaves the writer's trailer unread in a pipe).
pub const END_HAS_INDEX: u8 = 1;

/// The fixed part of a CHUNK payload: 16 bytes, then the `present` bitmap,
/// the `data` bitmap (each `ceil(pages / 8)` bytes), then the data of the
/// pages with a data bit, concatenated and compressed as a whole.
///
/// A page that is present without data is all zeros. A page that is not
/// present is unchanged from the parent image (only in incremental images).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    pub space: Space,
    /// 0: stored, 1: zstd.
    pub codec: u8,
    pub pages: u32,
    /// Address of the first page: guest-physical, or a byte offset in the disk.
    pub base: u64,
}

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

    /// Decodes the fixed part; `None` if it is not a valid chunk header.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b: &[u8; CHUNK_HEADER_LEN] = b.get(..CHUNK_HEADER_LEN)?.try_into().ok()?;
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
            pages: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            base: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        })
    }

    /// Bytes in each of the two bitmaps.
    pub fn bitmap_len(&self) -> usize {
        (self.pages as usize).div_ceil(8)
    }

    /// Bytes of guest memory (or disk) the chunk covers.
    pub fn span(&self) -> u64 {
        u64::from(self.pages) * PAGE_SIZE as u64
    }
}

/// A section record's fixed part.
///
/// ```text
/// 0  u16 kind        2  u16 flags      4  u16 name_len   6  u16 reserved (0)
/// 8  u64 payload_len 16 u32 crc32c(name ++ payload)     20 u32 crc32c(bytes 0..20)
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectionHeader {
    pub kind: Kind,
    /// [`section_flags`].
    pub flags: u16,
    pub name_len: u16,
    pub payload_len: u64,
    /// crc32c of name and payload.
    pub crc: u32,
}

impl SectionHeader {
    pub fn encode(&self) -> [u8; SECTION_HEADER_LEN] {
        let mut b = [0u8; SECTION_HEADER_LEN];
        b[0..2].copy_from_slice(&self.kind.0.to_le_bytes());
        b[2..4].copy_from_slice(&self.flags.to_le_bytes());
        b[4..6].copy_from_slice(&self.name_len.to_le_bytes());
        b[8..16].copy_from_slice(&self.payload_len.to_le_bytes());
        b[16..20].copy_from_slice(&self.crc.to_le_bytes());
        // The record's own checksum, so a corrupt length or kind is caught
        // before it is used.
        let hcrc = crc32c::crc32c(&b[0..20]);
        b[20..24].copy_from_slice(&hcrc.to_le_bytes());
        b
    }

    /// Decodes and checks the record's own checksum.
    pub fn decode(b: &[u8; SECTION_HEADER_LEN]) -> Option<Self> {
        let hcrc = u32::from_le_bytes([b[20], b[21], b[22], b[23]]);
        if !crc_matches(crc32c::crc32c(&b[0..20]), hcrc) || b[6] != 0 || b[7] != 0 {
            return None;
        }
        Some(SectionHeader {
            kind: Kind(u16::from_le_bytes([b[0], b[1]])),
            flags: u16::from_le_bytes([b[2], b[3]]),
            name_len: u16::from_le_bytes([b[4], b[5]]),
            payload_len: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
            crc: u32::from_le_bytes([b[16], b[17], b[18], b[19]]),
        })
    }

    pub fn is_optional(&self) -> bool {
        self.flags & section_flags::OPTIONAL != 0
    }
}

/// The footer: `u64 index offset | u32 crc32c(bytes 0..8) | u32 0 | magic`.
pub fn encode_footer(index_offset: u64) -> [u8; FOOTER_LEN] {
    let mut b = [0u8; FOOTER_LEN];
    b[0..8].copy_from_slice(&index_offset.to_le_bytes());
    let crc = crc32c::crc32c(&b[0..8]);
    b[8..12].copy_from_slice(&crc.to_le_bytes());
    b[16..24].copy_from_slice(&FOOTER_MAGIC);
    b
}

/// The index offset in a footer, if the footer is intact.
pub fn decode_footer(b: &[u8; FOOTER_LEN]) -> Option<u64> {
    if b[16..24] != FOOTER_MAGIC || b[12..16] != [0; 4] {
        return None;
    }
    let crc = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    if !crc_matches(crc32c::crc32c(&b[0..8]), crc) {
        return None;
    }
    Some(u64::from_le_bytes([
        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
    ]))
}

/// Compares a computed checksum with a stored one. Fuzzing builds
/// (`cfg(fuzzing)`, set by cargo-fuzz) accept any checksum, so the fuzzer
/// reaches the decoders behind them instead of stopping at the first crc.
#[inline]
pub(crate) fn crc_matches(computed: u32, stored: u32) -> bool {
    cfg!(fuzzing) || computed == stored
}

/// Generates a fresh image id: 16 bytes from the kernel's random source.
pub fn new_image_id() -> [u8; 16] {
    use std::io::Read;
    let mut id = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .is_err()
    {
        // No /dev/urandom (a tight sandbox): time and pid still make ids
        // unique in practice, and ids only need to be unique, not secret.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        id.copy_from_slice(&t.to_le_bytes());
        id[15] ^= std::process::id() as u8;
        id[14] ^= (std::process::id() >> 8) as u8;
    }
    id
}

/// Hex form of an image id.
pub fn id_hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// The id [`id_hex`] spelled, or `None` if `s` is not 32 hex digits.
pub fn id_from_hex(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn section_header_round_trips_and_catches_corruption() {
        let h = SectionHeader {
            kind: Kind::VCPU,
            flags: section_flags::OPTIONAL,
            name_len: 3,
            payload_len: 1234,
            crc: 0xdead_beef,
        };
        let b = h.encode();
        assert_eq!(SectionHeader::decode(&b), Some(h));
        for i in 0..SECTION_HEADER_LEN {
            let mut bad = b;
            bad[i] ^= 1;
            assert_eq!(SectionHeader::decode(&bad), None, "byte {i}");
        }
    }

    #[test]
    fn footer_round_trips_and_catches_corruption() {
        let f = encode_footer(0x1234_5678_9abc);
        assert_eq!(decode_footer(&f), Some(0x1234_5678_9abc));
        for i in 0..FOOTER_LEN {
            let mut bad = f;
            bad[i] ^= 0x10;
            assert_eq!(decode_footer(&bad), None, "byte {i}");
        }
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
        assert_eq!(ChunkHeader::decode(&b[..15]), None);
    }

    #[test]
    fn ids_differ() {
        assert_ne!(new_image_id(), new_image_id());
        let id = new_image_id();
        assert_eq!(id_from_hex(&id_hex(&id)), Some(id));
        assert_eq!(id_from_hex(&id_hex(&id).to_uppercase()), Some(id));
        for bad in ["", "00", &"0".repeat(33), &format!("{}g", "0".repeat(31))] {
            assert_eq!(id_from_hex(bad), None, "{bad:?}");
        }
        assert_eq!(id_hex(&[0xab; 16]).len(), 32);
    }
}
