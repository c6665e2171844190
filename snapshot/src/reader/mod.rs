//! Reads an image front to back from any `Read` (a pipe is fine):
//! [`ImageReader`] and the [`Section`]s it hands out. Records are read
//! through `crate::framing`; the chunks that follow a memory or disk
//! section are decoded and applied by the pipeline in `apply`
//! ([`ImageReader::read_memory_into`] and its kin).

pub(crate) mod apply;

use std::io::Read;

use serde::de::DeserializeOwned;

use crate::error::SnapshotError;
use crate::format::{
    max_chunk_payload, ChunkHeader, Kind, Space, CHUNK_HEADER_LEN, END_HAS_INDEX, FOOTER_LEN,
    MAX_CHUNK_PAGES, MAX_STATE_LEN, PAGE_SIZE, SECTION_HEADER_LEN,
};
use crate::framing::{
    read_file_header, read_footer, read_index_record, read_record_header, read_record_name,
    skip_payload, Payload,
};
use crate::pages::{bit, decode_chunk, Chunk};
use crate::state::{DiskInfo, Header, Index, MemoryLayout};
use crate::state_codec::decode_state;

/// One section as read.
#[derive(Debug)]
pub enum Section {
    /// A VM, vCPU or device state: decode it with [`Section::decode`] or
    /// [`decode_state`].
    State {
        kind: Kind,
        name: String,
        payload: Vec<u8>,
    },
    /// Guest memory starts: its chunks follow. Read them with
    /// [`ImageReader::read_memory_into`] / [`ImageReader::read_memory_with`],
    /// or one by one with `next_section`.
    Memory(MemoryLayout),
    /// A disk's contents start: its chunks follow. Read them with
    /// [`ImageReader::read_disk_into`], or one by one.
    Disk(DiskInfo),
    /// A chunk, checksummed but still encoded: decode with
    /// [`RawChunk::decode`] (on any thread).
    Chunk(RawChunk),
    /// An optional section this reader does not know, skipped.
    Skipped { kind: Kind, len: u64 },
    /// The end marker (and the index, if any, checked). Repeats after.
    End,
}

impl Section {
    /// Decodes a state section's payload.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, SnapshotError> {
        match self {
            Section::State {
                kind,
                name,
                payload,
            } => decode_state(&format!("{} '{name}'", kind.label()), payload),
            other => Err(SnapshotError::Usage(match other {
                Section::Memory(_) => "decode called on the memory section",
                Section::Disk(_) => "decode called on a disk section",
                _ => "decode called on a section without state",
            })),
        }
    }
}

/// A chunk's record, checksummed but not yet decompressed.
#[derive(Debug)]
pub struct RawChunk {
    pub header: ChunkHeader,
    payload: Vec<u8>,
    /// Names the chunk in errors.
    label: String,
}

impl RawChunk {
    pub fn decode(&self) -> Result<Chunk, SnapshotError> {
        decode_chunk(&self.payload, &self.label)
    }

    /// (zero pages, absent pages) from the bitmaps, without decompressing.
    pub fn decode_bitmaps_only(&self) -> (u64, u64) {
        let blen = self.header.bitmap_len();
        let maps = self
            .payload
            .get(CHUNK_HEADER_LEN..CHUNK_HEADER_LEN + 2 * blen);
        let Some(maps) = maps else { return (0, 0) };
        let (present, data) = maps.split_at(blen);
        let (mut zero, mut absent) = (0, 0);
        for i in 0..self.header.pages as usize {
            match (bit(present, i), bit(data, i)) {
                (false, _) => absent += 1,
                (true, false) => zero += 1,
                _ => {}
            }
        }
        (zero, absent)
    }

    /// The encoded payload.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// Bytes of the record's payload in the image.
    pub fn stored_len(&self) -> u64 {
        self.payload.len() as u64
    }

    /// What errors call this chunk ("memory chunk at guest 0x100000").
    pub fn label(&self) -> &str {
        &self.label
    }
}

/// What the chunks being read belong to, and where the next may start.
#[derive(Debug)]
enum Owner {
    None,
    Memory {
        layout: MemoryLayout,
        /// Region of the last chunk, and the address after it: chunks
        /// follow the layout's regions in order, ascending within each, so
        /// no two chunks overlap.
        region: usize,
        next: u64,
    },
    Disk {
        info: DiskInfo,
        next: u64,
    },
}

/// Reads an image front to back, from any `Read` (a pipe is fine).
///
/// Every section's checksum is checked as it is read, before anything is
/// handed out; a chunk's contents are checked again as it is decoded. Any
/// cut, anywhere, including in the index after END, is an error.
pub struct ImageReader<R: Read> {
    r: R,
    header: Header,
    pos: u64,
    ended: bool,
    /// Sections read, for error messages.
    seen: u64,
    last_label: String,
    owner: Owner,
    seen_memory: bool,
    index: Option<Index>,
}

impl<R: Read> ImageReader<R> {
    /// Reads and checks the header (magic, version, checksum).
    pub fn new(mut r: R) -> Result<Self, SnapshotError> {
        let (header, pos) = read_file_header(&mut r)?;
        Ok(ImageReader {
            r,
            header,
            pos,
            ended: false,
            seen: 0,
            last_label: "header".into(),
            owner: Owner::None,
            seen_memory: false,
            index: None,
        })
    }

    /// Reads on from image offset `pos` of the image whose `header` another
    /// reader read, `r` being positioned there: a lazy restore reads the
    /// states with one reader, skips the memory chunks (their place known
    /// from [`crate::memory_chunks`]) and reads the disks and the end with
    /// this one. Memory has been seen: another MEMORY section is refused.
    pub fn resume_at(r: R, header: Header, pos: u64) -> Self {
        ImageReader {
            r,
            header,
            pos,
            ended: false,
            seen: 0,
            last_label: format!("the memory chunks, skipped to offset {pos}"),
            owner: Owner::None,
            seen_memory: true,
            index: None,
        }
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Bytes read so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The index, once END has been read (if the image has one).
    pub fn index(&self) -> Option<&Index> {
        self.index.as_ref()
    }

    /// The layout of the memory whose chunks are being read.
    pub fn memory_layout(&self) -> Option<&MemoryLayout> {
        match &self.owner {
            Owner::Memory { layout, .. } => Some(layout),
            _ => None,
        }
    }

    /// Reads the next section, which must be a state of `kind`, and decodes
    /// it. Returns its name (a vCPU's index, a device's name) and value.
    pub fn read_state<T: DeserializeOwned>(
        &mut self,
        kind: Kind,
    ) -> Result<(String, T), SnapshotError> {
        match self.next_section()? {
            s @ Section::State { kind: k, .. } if k == kind => {
                let value = s.decode()?;
                let Section::State { name, .. } = s else {
                    return Err(SnapshotError::Usage("unreachable"));
                };
                Ok((name, value))
            }
            other => Err(SnapshotError::Corrupt {
                section: self.last_label.clone(),
                reason: format!(
                    "expected a {} section here, found {}",
                    kind.label(),
                    match other {
                        Section::State { kind, .. } => kind.label(),
                        Section::Memory(_) => "memory",
                        Section::Disk(_) => "a disk",
                        Section::Chunk(_) => "a chunk",
                        Section::Skipped { .. } => "an unknown optional section",
                        Section::End => "the end",
                    }
                ),
            }),
        }
    }

    /// Reads sections up to the MEMORY section and returns its layout; the
    /// states before it are skipped (for the parents of an incremental
    /// image, whose states are superseded).
    pub fn skip_to_memory(&mut self) -> Result<MemoryLayout, SnapshotError> {
        loop {
            match self.next_section()? {
                Section::Memory(l) => return Ok(l),
                Section::End => {
                    return Err(SnapshotError::Corrupt {
                        section: "end".into(),
                        reason: "the image has no memory".into(),
                    })
                }
                _ => {}
            }
        }
    }

    /// Reads the next section. After END it keeps returning END.
    pub fn next_section(&mut self) -> Result<Section, SnapshotError> {
        if self.ended {
            return Ok(Section::End);
        }
        let start = self.pos;
        let at = format!("the section at offset {start}, after {}", self.last_label);
        let h = read_record_header(&mut self.r, &at)?;
        self.seen += 1;
        let name = read_record_name(&mut self.r, &h, &at)?;
        // The name is covered by the record's checksum: until that is
        // checked, a damaged name must not be quoted as if it were real.
        let mut label = match h.kind {
            Kind::CHUNK => format!("chunk at offset {start}"),
            k => format!("{} section at offset {start}", k.label()),
        };
        self.pos += SECTION_HEADER_LEN as u64 + u64::from(h.name_len);
        if !h.kind.is_known() || h.kind == Kind::INDEX {
            if !h.is_optional() {
                return Err(SnapshotError::UnknownRequired {
                    kind: h.kind.0,
                    name,
                });
            }
            let unknown = format!("unknown section of kind {:#x}", h.kind.0);
            skip_payload(&mut self.r, &h, &format!("{unknown} at offset {start}"))?;
            self.pos += h.payload_len;
            self.last_label = unknown;
            return Ok(Section::Skipped {
                kind: h.kind,
                len: h.payload_len,
            });
        }
        let limit = if h.kind == Kind::CHUNK {
            max_chunk_payload()
        } else {
            MAX_STATE_LEN
        };
        let payload = Payload::read(&mut self.r, &h, &name, limit, &label)?;
        if h.kind == Kind::CHUNK {
            // Name the chunk by what it holds. On a checksum mismatch the
            // header itself is unverified, but a flipped bit most likely
            // lies in the data, and the offset is given too.
            if let Some(ch) = ChunkHeader::decode(payload.unchecked()) {
                label = self.chunk_label(&ch, start);
            }
        }
        let payload = payload.check(&label)?;
        if h.kind != Kind::CHUNK {
            label = match name.as_str() {
                "" => h.kind.label().to_string(),
                name => format!("{} '{name}'", h.kind.label()),
            };
        }
        self.pos += h.payload_len;
        self.last_label = label.clone();
        let corrupt = |label: &str, reason: String| SnapshotError::Corrupt {
            section: label.to_string(),
            reason,
        };
        Ok(match h.kind {
            Kind::MEMORY => {
                if self.seen_memory {
                    return Err(corrupt(&label, "a second memory section".into()));
                }
                self.seen_memory = true;
                let layout: MemoryLayout = decode_state(&label, &payload)?;
                layout.validate().map_err(|r| corrupt(&label, r))?;
                self.owner = Owner::Memory {
                    layout: layout.clone(),
                    region: 0,
                    next: layout.regions.first().map_or(0, |r| r.0),
                };
                Section::Memory(layout)
            }
            Kind::DISK => {
                let info: DiskInfo = decode_state(&label, &payload)?;
                info.validate().map_err(|r| corrupt(&label, r))?;
                self.owner = Owner::Disk {
                    info: info.clone(),
                    next: 0,
                };
                Section::Disk(info)
            }
            Kind::CHUNK => {
                let header = ChunkHeader::decode(&payload)
                    .ok_or_else(|| corrupt(&label, "bad chunk header".into()))?;
                self.check_chunk_place(&header, &label)?;
                Section::Chunk(RawChunk {
                    header,
                    payload,
                    label,
                })
            }
            Kind::END => {
                let flags = match payload.as_slice() {
                    [f] if f & !END_HAS_INDEX == 0 => *f,
                    _ => return Err(corrupt("end", "bad end marker".into())),
                };
                if flags & END_HAS_INDEX != 0 {
                    self.read_trailer()?;
                }
                self.expect_eof()?;
                self.ended = true;
                self.owner = Owner::None;
                Section::End
            }
            kind => {
                self.owner = Owner::None;
                Section::State {
                    kind,
                    name,
                    payload,
                }
            }
        })
    }

    fn chunk_label(&self, ch: &ChunkHeader, offset: u64) -> String {
        match (&self.owner, ch.space) {
            (Owner::Disk { info, .. }, Space::Disk) => format!(
                "disk '{}' chunk at byte {:#x} (image offset {offset})",
                info.name, ch.base
            ),
            _ => format!(
                "memory chunk at guest {:#x} (image offset {offset})",
                ch.base
            ),
        }
    }

    /// Checks that a chunk belongs where it is: to the memory or disk just
    /// announced, inside it, after the chunk before. Readers rely on this
    /// to write chunks in parallel into disjoint parts of guest memory.
    fn check_chunk_place(&mut self, h: &ChunkHeader, label: &str) -> Result<(), SnapshotError> {
        let bad = |reason: &str| SnapshotError::Corrupt {
            section: label.to_string(),
            reason: reason.to_string(),
        };
        if h.pages == 0 || h.pages > MAX_CHUNK_PAGES || !h.base.is_multiple_of(PAGE_SIZE as u64) {
            return Err(bad("bad chunk header"));
        }
        let end = h
            .base
            .checked_add(h.span())
            .ok_or_else(|| bad("chunk wraps around"))?;
        match &mut self.owner {
            Owner::Memory {
                layout,
                region,
                next,
            } => {
                if h.space != Space::Memory {
                    return Err(bad("a disk chunk among memory chunks"));
                }
                // The chunk's region: the current one, or a later one.
                let mut r = *region;
                loop {
                    let Some(&(addr, len)) = layout.regions.get(r) else {
                        return Err(bad("chunk outside the memory layout, or out of order"));
                    };
                    let lo = if r == *region { *next } else { addr };
                    if h.base >= lo && end <= addr + len {
                        break;
                    }
                    r += 1;
                }
                *region = r;
                *next = end;
            }
            Owner::Disk { info, next } => {
                if h.space != Space::Disk {
                    return Err(bad("a memory chunk among disk chunks"));
                }
                if h.base < *next || end > info.size.next_multiple_of(PAGE_SIZE as u64) {
                    return Err(bad("chunk outside the disk, or out of order"));
                }
                *next = end;
            }
            Owner::None => return Err(bad("a chunk that follows no memory or disk section")),
        }
        Ok(())
    }

    /// The image ends with END (and its trailer): anything after it means
    /// the file is not one image (two concatenated, or appended to), so
    /// what it holds is not what the writer wrote.
    fn expect_eof(&mut self) -> Result<(), SnapshotError> {
        let mut extra = [0u8; 1];
        loop {
            match self.r.read(&mut extra) {
                Ok(0) => return Ok(()),
                Ok(_) => {
                    return Err(SnapshotError::Corrupt {
                        section: "end".into(),
                        reason: format!(
                            "data follows the image's end at byte {} (two images in one file, or bytes appended)",
                            self.pos
                        ),
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(SnapshotError::Read(e)),
            }
        }
    }

    /// Reads and checks the INDEX record and the footer after END.
    fn read_trailer(&mut self) -> Result<(), SnapshotError> {
        let offset = self.pos;
        let (index, len) = read_index_record(
            &mut self.r,
            "the end marker announces an index, but none follows",
        )?;
        if read_footer(&mut self.r)? != Some(offset) {
            return Err(SnapshotError::Corrupt {
                section: "footer".into(),
                reason: "the footer is damaged or does not point at the index".into(),
            });
        }
        self.pos += len + FOOTER_LEN as u64;
        self.index = Some(index);
        Ok(())
    }
}
