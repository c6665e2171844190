//! Reads an image from any `Read`, front to back; with `Seek`, also by index.

use std::io::{Read, Seek, SeekFrom};

use serde::de::DeserializeOwned;

use crate::format::{
    ChunkHeader, DiskInfo, Header, Index, Kind, MemoryLayout, SectionHeader, CHUNK_HEADER_LEN,
    FOOTER_LEN, FOOTER_MAGIC, FORMAT_VERSION, MAGIC, MAX_CHUNK_PAGES, MAX_STATE_LEN, PAGE_SIZE,
    SECTION_HEADER_LEN,
};
use crate::pages::{decode_chunk, Chunk};
use crate::SnapshotError;

/// Largest chunk record: header, two bitmaps, and zstd's worst case for the
/// largest chunk's data.
fn max_chunk_payload() -> u64 {
    let data = MAX_CHUNK_PAGES as usize * PAGE_SIZE;
    (CHUNK_HEADER_LEN
        + 2 * (MAX_CHUNK_PAGES as usize).div_ceil(8)
        + zstd::zstd_safe::compress_bound(data)) as u64
}

/// One section as read.
#[derive(Debug)]
pub enum Section {
    /// A VM, vCPU or device state: decode it with [`decode_state`].
    State {
        kind: Kind,
        name: String,
        payload: Vec<u8>,
    },
    Memory(MemoryLayout),
    Disk(DiskInfo),
    /// A chunk, still encoded: decode with [`RawChunk::decode`] (on any thread).
    Chunk(RawChunk),
    /// An optional section this reader does not know, skipped.
    Skipped {
        kind: Kind,
        len: u64,
    },
    End,
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
            let p = present[i / 8] & (1 << (i % 8)) != 0;
            let d = data[i / 8] & (1 << (i % 8)) != 0;
            match (p, d) {
                (false, _) => absent += 1,
                (true, false) => zero += 1,
                _ => {}
            }
        }
        (zero, absent)
    }

    /// Bytes of the record's payload in the image.
    pub fn stored_len(&self) -> u64 {
        self.payload.len() as u64
    }
}

/// Decodes a state payload.
pub fn decode_state<T: DeserializeOwned>(name: &str, payload: &[u8]) -> Result<T, SnapshotError> {
    postcard::from_bytes(payload).map_err(|e| SnapshotError::Corrupt {
        section: name.to_string(),
        reason: format!("cannot decode: {e}"),
    })
}

/// Reads `n` bytes or reports where the image ends.
fn read_exact_or_truncated<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    section: &str,
) -> Result<(), SnapshotError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(SnapshotError::Truncated {
                    section: section.to_string(),
                    expected: buf.len() as u64,
                    got: got as u64,
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(SnapshotError::Read(e)),
        }
    }
    Ok(())
}

/// Reads the magic, version and header.
fn read_header<R: Read>(r: &mut R) -> Result<(Header, u64), SnapshotError> {
    let mut fixed = [0u8; 16];
    read_exact_or_truncated(r, &mut fixed, "header")?;
    if fixed[0..8] != MAGIC {
        return Err(SnapshotError::NotAnImage);
    }
    let version = u32::from_le_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let len = u32::from_le_bytes([fixed[12], fixed[13], fixed[14], fixed[15]]);
    if u64::from(len) > MAX_STATE_LEN {
        return Err(SnapshotError::Corrupt {
            section: "header".into(),
            reason: format!("header length {len} is too large"),
        });
    }
    let mut body = vec![0u8; len as usize + 4];
    read_exact_or_truncated(r, &mut body, "header")?;
    let (body, crc) = body.split_at(len as usize);
    if crc32c::crc32c(body) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
        return Err(SnapshotError::Checksum {
            section: "header".into(),
        });
    }
    let header = decode_state("header", body)?;
    Ok((header, 16 + u64::from(len) + 4))
}

/// Reads an image front to back.
pub struct ImageReader<R: Read> {
    r: R,
    header: Header,
    pos: u64,
    ended: bool,
    /// Section count, for error messages.
    seen: u64,
    last_label: String,
}

impl<R: Read> ImageReader<R> {
    /// Reads and checks the header.
    pub fn new(mut r: R) -> Result<Self, SnapshotError> {
        let (header, pos) = read_header(&mut r)?;
        Ok(ImageReader {
            r,
            header,
            pos,
            ended: false,
            seen: 0,
            last_label: "header".into(),
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Bytes read so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Reads the next section. After END it keeps returning END.
    pub fn next_section(&mut self) -> Result<Section, SnapshotError> {
        if self.ended {
            return Ok(Section::End);
        }
        let after = format!("the section after {}", self.last_label);
        let mut hb = [0u8; SECTION_HEADER_LEN];
        read_exact_or_truncated(&mut self.r, &mut hb, &after)?;
        let h = SectionHeader::decode(&hb).ok_or(SnapshotError::Checksum {
            section: after.clone(),
        })?;
        self.seen += 1;
        let mut name = vec![0u8; usize::from(h.name_len)];
        read_exact_or_truncated(&mut self.r, &mut name, &after)?;
        let name = String::from_utf8(name).map_err(|_| SnapshotError::Corrupt {
            section: after.clone(),
            reason: "section name is not UTF-8".into(),
        })?;
        let label = match h.kind {
            Kind::CHUNK => format!("chunk #{} at offset {}", self.seen, self.pos),
            k if name.is_empty() => k.label().to_string(),
            k => format!("{} '{name}'", k.label()),
        };
        self.pos += SECTION_HEADER_LEN as u64 + u64::from(h.name_len);
        let known = matches!(
            h.kind,
            Kind::VM
                | Kind::VCPU
                | Kind::DEVICE
                | Kind::MEMORY
                | Kind::DISK
                | Kind::CHUNK
                | Kind::END
        );
        if !known {
            if !h.kind.is_optional() {
                return Err(SnapshotError::UnknownRequired {
                    kind: h.kind.0,
                    name,
                });
            }
            // Skip by length without allocating for it.
            let copied =
                std::io::copy(&mut (&mut self.r).take(h.payload_len), &mut std::io::sink())
                    .map_err(SnapshotError::Read)?;
            if copied != h.payload_len {
                return Err(SnapshotError::Truncated {
                    section: label,
                    expected: h.payload_len,
                    got: copied,
                });
            }
            self.pos += h.payload_len;
            self.last_label = label;
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
        if h.payload_len > limit {
            return Err(SnapshotError::Corrupt {
                section: label,
                reason: format!("length {} exceeds the limit {limit}", h.payload_len),
            });
        }
        let mut payload = vec![0u8; h.payload_len as usize];
        read_exact_or_truncated(&mut self.r, &mut payload, &label)?;
        let crc = crc32c::crc32c_append(crc32c::crc32c(name.as_bytes()), &payload);
        if crc != h.crc {
            return Err(SnapshotError::Checksum { section: label });
        }
        self.pos += h.payload_len;
        self.last_label = label.clone();
        Ok(match h.kind {
            Kind::MEMORY => Section::Memory(decode_state(&label, &payload)?),
            Kind::DISK => Section::Disk(decode_state(&label, &payload)?),
            Kind::CHUNK => Section::Chunk(RawChunk {
                header: ChunkHeader::decode(&payload).ok_or_else(|| SnapshotError::Corrupt {
                    section: label.clone(),
                    reason: "bad chunk header".into(),
                })?,
                payload,
                label,
            }),
            Kind::END => {
                self.ended = true;
                Section::End
            }
            kind => Section::State {
                kind,
                name,
                payload,
            },
        })
    }
}

/// Reads the index of an image in a seekable file.
pub fn read_index<R: Read + Seek>(r: &mut R) -> Result<Index, SnapshotError> {
    let end = r.seek(SeekFrom::End(0)).map_err(SnapshotError::Read)?;
    if end < FOOTER_LEN as u64 {
        return Err(SnapshotError::Truncated {
            section: "footer".into(),
            expected: FOOTER_LEN as u64,
            got: end,
        });
    }
    r.seek(SeekFrom::Start(end - FOOTER_LEN as u64))
        .map_err(SnapshotError::Read)?;
    let mut f = [0u8; FOOTER_LEN];
    read_exact_or_truncated(r, &mut f, "footer")?;
    if f[8..16] != FOOTER_MAGIC {
        return Err(SnapshotError::Corrupt {
            section: "footer".into(),
            reason: "no index footer (the image is cut short or was not closed)".into(),
        });
    }
    let offset = u64::from_le_bytes(f[0..8].try_into().unwrap_or_default());
    if offset >= end {
        return Err(SnapshotError::Corrupt {
            section: "footer".into(),
            reason: "index offset past the end".into(),
        });
    }
    r.seek(SeekFrom::Start(offset))
        .map_err(SnapshotError::Read)?;
    let mut hb = [0u8; SECTION_HEADER_LEN];
    read_exact_or_truncated(r, &mut hb, "index")?;
    let h = SectionHeader::decode(&hb).ok_or(SnapshotError::Checksum {
        section: "index".into(),
    })?;
    if h.kind != Kind::INDEX || h.name_len != 0 || h.payload_len > MAX_STATE_LEN {
        return Err(SnapshotError::Corrupt {
            section: "index".into(),
            reason: "the footer does not point at an index".into(),
        });
    }
    let mut payload = vec![0u8; h.payload_len as usize];
    read_exact_or_truncated(r, &mut payload, "index")?;
    if crc32c::crc32c(&payload) != h.crc {
        return Err(SnapshotError::Checksum {
            section: "index".into(),
        });
    }
    decode_state("index", &payload)
}

/// Reads the one chunk whose record starts at `offset` (from the index).
pub fn read_chunk_at<R: Read + Seek>(r: &mut R, offset: u64) -> Result<Chunk, SnapshotError> {
    r.seek(SeekFrom::Start(offset))
        .map_err(SnapshotError::Read)?;
    let mut hb = [0u8; SECTION_HEADER_LEN];
    let label = format!("chunk at offset {offset}");
    read_exact_or_truncated(r, &mut hb, &label)?;
    let h = SectionHeader::decode(&hb).ok_or(SnapshotError::Checksum {
        section: label.clone(),
    })?;
    if h.kind != Kind::CHUNK || h.name_len != 0 || h.payload_len > max_chunk_payload() {
        return Err(SnapshotError::Corrupt {
            section: label,
            reason: "not a chunk record".into(),
        });
    }
    let mut payload = vec![0u8; h.payload_len as usize];
    read_exact_or_truncated(r, &mut payload, &label)?;
    if crc32c::crc32c(&payload) != h.crc {
        return Err(SnapshotError::Checksum { section: label });
    }
    decode_chunk(&payload, &label)
}

/// Checks that `images` (headers, base first) form a chain: each
/// incremental image's parent is the image before it.
pub fn check_chain(images: &[&Header]) -> Result<(), SnapshotError> {
    use crate::format::{flags, id_hex};
    let Some(base) = images.first() else {
        return Err(SnapshotError::Usage("an empty image chain"));
    };
    if base.flags & flags::INCREMENTAL != 0 {
        return Err(SnapshotError::ParentMissing {
            parent: base.parent_id.map(|p| id_hex(&p)).unwrap_or_default(),
        });
    }
    for w in images.windows(2) {
        let (parent, child) = (w[0], w[1]);
        if child.flags & flags::INCREMENTAL == 0 || child.parent_id != Some(parent.image_id) {
            return Err(SnapshotError::ParentMismatch {
                image: id_hex(&child.image_id),
                expected: child.parent_id.map(|p| id_hex(&p)).unwrap_or("none".into()),
                found: id_hex(&parent.image_id),
            });
        }
    }
    Ok(())
}
