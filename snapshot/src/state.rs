//! The serde types this crate writes into an image: the one place where
//! format-versioned types owned by the snapshot crate live.
//!
//! Everything here is serialized with postcard, whose encoding follows the
//! field order and types exactly: adding, removing, reordering or retyping a
//! field, or a variant, changes the bytes. Any such change must bump
//! [`crate::format::FORMAT_VERSION`]; the `golden_encodings` test pins the
//! bytes so that a change shows up in review as a failing test, not as
//! images that silently stop reading. The VM, vCPU and device state structs live next to
//! their owners (vmm, devices) and follow the same rule.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::SnapshotError;
pub use crate::format::Space;
use crate::format::{new_image_id, Kind, MAX_CHUNK_PAGES, PAGE_SIZE};

/// How chunk data is compressed.
///
/// As text (`FromStr`, `Display`, and serde in human-readable formats such
/// as JSON, for the VMM's command line and API) it is `none`, `zstd` or
/// `zstd:LEVEL`. In an image (postcard, not human-readable) it stays the
/// enum it always was: variant index, then the level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Stored as is (zero pages are still elided).
    None,
    /// zstd at this level (1 to 19).
    Zstd(i32),
}

impl Compression {
    /// Parses `none`, `zstd` (level 1: the fastest, and the default because
    /// saving is on the VM's pause path) or `zstd:LEVEL`.
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

impl std::str::FromStr for Compression {
    type Err = SnapshotError;
    fn from_str(s: &str) -> Result<Self, SnapshotError> {
        Compression::parse(s)
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

/// What [`Compression`] is in an image: the derived enum encoding, which
/// the `golden_encodings` test pins.
#[derive(Serialize, Deserialize)]
#[serde(rename = "Compression")]
enum CompressionRepr {
    None,
    Zstd(i32),
}

impl Serialize for Compression {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            return s.collect_str(self);
        }
        match *self {
            Compression::None => CompressionRepr::None,
            Compression::Zstd(l) => CompressionRepr::Zstd(l),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Compression {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            return Compression::parse(&s).map_err(serde::de::Error::custom);
        }
        Ok(match CompressionRepr::deserialize(d)? {
            CompressionRepr::None => Compression::None,
            CompressionRepr::Zstd(l) => Compression::Zstd(l),
        })
    }
}

/// Image flags ([`Header::flags`]).
pub mod flags {
    /// Memory holds only the pages listed, on top of the parent image.
    pub const INCREMENTAL: u32 = 1;
    /// The image carries disk contents.
    pub const HAS_DISK: u32 = 2;
    /// The guest agent synced and froze the guest's writable filesystems
    /// before the state was captured: the disks are consistent on their own.
    pub const QUIESCED: u32 = 4;
}

/// The image header (after magic and version).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// "x86_64".
    pub arch: String,
    /// CPU vendor of the host that wrote the image ("AuthenticAMD"...):
    /// restore on another vendor cannot work, and the VMM says so early.
    pub cpu_vendor: String,
    /// CPU family, model, stepping of that host.
    pub cpu_signature: (u32, u32, u32),
    /// Unique id of this image ([`crate::format::new_image_id`]); increments name
    /// their parent by it.
    pub image_id: [u8; 16],
    /// Parent image of an incremental image.
    pub parent_id: Option<[u8; 16]>,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
    /// [`flags`].
    pub flags: u32,
}

impl Header {
    /// A header with a fresh id and the current time.
    pub fn new(arch: &str, cpu_vendor: &str, cpu_signature: (u32, u32, u32), flags: u32) -> Self {
        Header {
            arch: arch.to_string(),
            cpu_vendor: cpu_vendor.to_string(),
            cpu_signature,
            image_id: new_image_id(),
            parent_id: None,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            flags,
        }
    }

    /// True for an incremental image.
    pub fn is_incremental(&self) -> bool {
        self.flags & flags::INCREMENTAL != 0
    }
}

/// Payload of the MEMORY section: where memory lies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    /// (guest physical address, length in bytes), page aligned, not
    /// overlapping, in the order their chunks follow.
    pub regions: Vec<(u64, u64)>,
    /// Pages per chunk (the last chunk of a region may be shorter).
    pub chunk_pages: u32,
    pub compression: Compression,
}

impl MemoryLayout {
    /// Checks what a reader relies on; `Err` carries the reason.
    pub fn validate(&self) -> Result<(), String> {
        check_chunk_pages(self.chunk_pages)?;
        let mut spans: Vec<(u64, u64)> = Vec::with_capacity(self.regions.len());
        for &(addr, len) in &self.regions {
            let page = PAGE_SIZE as u64;
            if !addr.is_multiple_of(page) || !len.is_multiple_of(page) {
                return Err(format!("region {addr:#x}+{len:#x} is not page aligned"));
            }
            let end = addr
                .checked_add(len)
                .ok_or_else(|| format!("region {addr:#x}+{len:#x} wraps around"))?;
            spans.push((addr, end));
        }
        spans.sort_unstable();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(format!(
                    "regions at {:#x} and {:#x} overlap",
                    w[0].0, w[1].0
                ));
            }
        }
        Ok(())
    }

    /// Total bytes of guest memory described.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().fold(0u64, |a, r| a.saturating_add(r.1))
    }
}

/// Payload of a DISK section: a disk whose contents follow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Which disk (e.g. the device name).
    pub name: String,
    /// Size in bytes (the last page may be partial).
    pub size: u64,
    pub chunk_pages: u32,
    pub compression: Compression,
}

impl DiskInfo {
    /// Checks what a reader relies on; `Err` carries the reason.
    pub fn validate(&self) -> Result<(), String> {
        check_chunk_pages(self.chunk_pages)?;
        if self.size.checked_add(PAGE_SIZE as u64).is_none() {
            return Err(format!("disk size {} is too large", self.size));
        }
        Ok(())
    }
}

fn check_chunk_pages(n: u32) -> Result<(), String> {
    if n == 0 || n > MAX_CHUNK_PAGES {
        return Err(format!(
            "chunk size {n} pages is outside 1..={MAX_CHUNK_PAGES}"
        ));
    }
    Ok(())
}

/// The index written after END: where every section starts, for readers
/// that can seek (lazy restore, `inspect` on a file).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    pub sections: Vec<IndexEntry>,
}

/// One section in the [`Index`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub kind: Kind,
    /// The section's name; for a chunk, what it belongs to: "memory" or the
    /// disk's name.
    pub name: String,
    /// Offset of the section record from the start of the image.
    pub offset: u64,
    /// Length of the whole record (header, name and payload).
    pub len: u64,
    /// For chunks: the space and first address they cover, and the page count.
    pub chunk: Option<(Space, u64, u32)>,
}

impl Index {
    /// The memory chunk holding guest-physical `addr`, if the image stores
    /// one (an incremental image may not). A linear scan: a lazy restore
    /// that looks up often should build its own map from
    /// [`Index::sections`] once.
    pub fn memory_chunk(&self, addr: u64) -> Option<&IndexEntry> {
        self.chunk_for(Space::Memory, "memory", addr)
    }

    /// The chunk of `space` (and, for disks, of disk `name`) holding `addr`.
    pub fn chunk_for(&self, space: Space, name: &str, addr: u64) -> Option<&IndexEntry> {
        self.sections.iter().find(|e| match e.chunk {
            Some((s, base, pages)) => {
                s == space
                    && e.name == name
                    && addr >= base
                    && (addr - base) / (PAGE_SIZE as u64) < u64::from(pages)
            }
            None => false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins the postcard bytes of every type above. If this fails, the
    /// format changed: bump FORMAT_VERSION, then update the bytes.
    #[test]
    fn golden_encodings() {
        let h = Header {
            arch: "x86_64".into(),
            cpu_vendor: "AuthenticAMD".into(),
            cpu_signature: (0x19, 0x21, 2),
            image_id: [7; 16],
            parent_id: Some([9; 16]),
            created_unix: 1_700_000_000,
            flags: flags::INCREMENTAL,
        };
        let l = MemoryLayout {
            regions: vec![(0, 0x1000), (0x1_0000_0000, 0x2000)],
            chunk_pages: 256,
            compression: Compression::Zstd(3),
        };
        let d = DiskInfo {
            name: "vda".into(),
            size: 5000,
            chunk_pages: 256,
            compression: Compression::None,
        };
        let i = Index {
            sections: vec![IndexEntry {
                kind: Kind::CHUNK,
                name: "memory".into(),
                offset: 100,
                len: 50,
                chunk: Some((Space::Memory, 0x1000, 1)),
            }],
        };
        let hex = |b: Vec<u8>| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let got = [
            hex(postcard::to_allocvec(&h).unwrap()),
            hex(postcard::to_allocvec(&l).unwrap()),
            hex(postcard::to_allocvec(&d).unwrap()),
            hex(postcard::to_allocvec(&i).unwrap()),
        ];
        let want = [
            "067838365f36340c41757468656e746963414d4419210207070707070707070707070707070707010909090909090909090909090909090980e2cfaa0601",
            "020080208080808010804080020106",
            "037664618827800200",
            "0106066d656d6f727964320100802001",
        ];
        // Printing all four at once makes an intended update one edit.
        assert_eq!(got, want, "format bytes changed: bump FORMAT_VERSION");
    }

    #[test]
    fn compression_parses() {
        assert_eq!(Compression::parse("none").unwrap(), Compression::None);
        assert_eq!(Compression::parse("zstd").unwrap(), Compression::Zstd(1));
        assert_eq!(Compression::parse("zstd:3").unwrap(), Compression::Zstd(3));
        for bad in ["zstd:0", "zstd:99", "gzip", "zstd:", "zstd:x", ""] {
            assert!(Compression::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Compression::Zstd(3).to_string(), "zstd:3");
    }

    #[test]
    fn compression_round_trips_as_text() {
        let all = std::iter::once(Compression::None).chain((1..=19).map(Compression::Zstd));
        for c in all {
            let text = c.to_string();
            assert_eq!(text.parse::<Compression>().unwrap(), c, "{text}");
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{text}\""));
            assert_eq!(serde_json::from_str::<Compression>(&json).unwrap(), c);
            // In an image it stays the enum.
            let bin = postcard::to_allocvec(&c).unwrap();
            assert_eq!(postcard::from_bytes::<Compression>(&bin).unwrap(), c);
        }
        assert_eq!("zstd".parse::<Compression>().unwrap(), Compression::Zstd(1));
        assert_eq!(
            serde_json::from_str::<Compression>("\"zstd\"").unwrap(),
            Compression::Zstd(1)
        );
    }

    #[test]
    fn bogus_compression_is_refused_by_name() {
        for bad in ["gzip", "zstd:20", "Zstd", "none "] {
            let e = bad.parse::<Compression>().unwrap_err();
            assert!(
                matches!(&e, SnapshotError::BadCompression(s) if s == bad),
                "{e}"
            );
            let json = serde_json::to_string(bad).unwrap();
            let e = serde_json::from_str::<Compression>(&json).unwrap_err();
            assert!(
                e.to_string()
                    .contains(&format!("unknown compression '{bad}'")),
                "{e}"
            );
        }
        assert!(serde_json::from_str::<Compression>("3").is_err());
        assert!(serde_json::from_str::<Compression>("{\"Zstd\":3}").is_err());
    }
}
