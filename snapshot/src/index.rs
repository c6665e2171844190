//! Random access through the index, for readers with a seekable file (a
//! lazy restore fetching one chunk per page fault, `inspect` on a file):
//! the header and index, and any one chunk.

use std::io::{Read, Seek, SeekFrom};

use crate::error::SnapshotError;
use crate::format::{
    max_chunk_payload, ChunkHeader, Kind, Space, FOOTER_LEN, MAX_CHUNK_PAGES, PAGE_SIZE,
};
use crate::framing::{read_file_header, read_footer, read_index_record, read_unnamed_record};
use crate::pages::{decode_chunk, Chunk};
use crate::state::{Header, Index, MemoryLayout};

/// Reads the header and the index of an image in a seekable file.
pub fn open_index<R: Read + Seek>(r: &mut R) -> Result<(Header, Index), SnapshotError> {
    r.seek(SeekFrom::Start(0)).map_err(SnapshotError::Read)?;
    let (header, _) = read_file_header(r)?;
    Ok((header, read_index(r)?))
}

/// Reads the index of an image in a seekable file, from its footer.
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
    let offset = read_footer(r)?.ok_or_else(|| SnapshotError::Corrupt {
        section: "footer".into(),
        reason: "no index footer (the image was cut short, written without an index, or damaged)"
            .into(),
    })?;
    if offset >= end - FOOTER_LEN as u64 {
        return Err(SnapshotError::Corrupt {
            section: "footer".into(),
            reason: "index offset past the end".into(),
        });
    }
    r.seek(SeekFrom::Start(offset))
        .map_err(SnapshotError::Read)?;
    let (index, len) = read_index_record(r, "the footer does not point at an index")?;
    // The index ends where the footer starts: otherwise the footer is
    // another image's (two in one file) or stray bytes.
    if offset + len != end - FOOTER_LEN as u64 {
        return Err(SnapshotError::Corrupt {
            section: "footer".into(),
            reason: "the index does not end where the footer starts (two images in one file, or bytes appended)".into(),
        });
    }
    Ok(index)
}

/// Reads the one chunk whose record starts at `offset` (from the index).
pub fn read_chunk_at<R: Read + Seek>(r: &mut R, offset: u64) -> Result<Chunk, SnapshotError> {
    r.seek(SeekFrom::Start(offset))
        .map_err(SnapshotError::Read)?;
    let label = format!("chunk at image offset {offset}");
    let payload = read_unnamed_record(
        r,
        Kind::CHUNK,
        max_chunk_payload(),
        &label,
        "not a chunk record",
    )?;
    decode_chunk(&payload, &label)
}

/// Reads the memory chunk holding guest-physical `addr` through the index
/// (the lazy restore's page-fault path). `None` if the image stores no
/// chunk there (an incremental image: the page is in a parent).
pub fn read_memory_chunk<R: Read + Seek>(
    r: &mut R,
    index: &Index,
    addr: u64,
) -> Result<Option<Chunk>, SnapshotError> {
    let Some(e) = index.memory_chunk(addr) else {
        return Ok(None);
    };
    let chunk = read_chunk_at(r, e.offset)?;
    let h = chunk.header;
    if Some((h.space, h.base, h.pages)) != e.chunk {
        return Err(SnapshotError::Corrupt {
            section: format!("memory chunk at guest {addr:#x}"),
            reason: "the index and the chunk disagree".into(),
        });
    }
    Ok(Some(chunk))
}

/// Where one memory chunk's record is in the image, from the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLocation {
    /// Guest-physical address of its first page.
    pub base: u64,
    pub pages: u32,
    /// Offset and length of the whole record in the image.
    pub offset: u64,
    pub len: u64,
}

impl ChunkLocation {
    /// Bytes of guest memory the chunk covers.
    pub fn span(&self) -> u64 {
        u64::from(self.pages) * PAGE_SIZE as u64
    }

    /// What errors call this chunk.
    pub fn label(&self) -> String {
        format!(
            "memory chunk at guest {:#x} (image offset {})",
            self.base, self.offset
        )
    }
}

/// The memory chunks of an image, for a reader that fetches them out of
/// order (a lazy restore) and reads on past them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryChunks {
    /// In guest-physical order, not overlapping, each inside `layout`.
    pub chunks: Vec<ChunkLocation>,
    /// Offset of the first record after the last chunk (a disk or END).
    pub end: u64,
}

/// The memory chunks that the index lists, checked against the MEMORY
/// section the streaming reader just read (`layout`, ending at image
/// offset `memory_end`): the index must put that section there, list its
/// chunks back to back right after it, in order and inside the layout, so
/// that skipping from `memory_end` to [`MemoryChunks::end`] skips exactly
/// the memory and nothing a disk needs.
pub fn memory_chunks(
    index: &Index,
    layout: &MemoryLayout,
    memory_end: u64,
) -> Result<MemoryChunks, SnapshotError> {
    let bad = |reason: String| SnapshotError::Corrupt {
        section: "index".into(),
        reason,
    };
    let at = index
        .sections
        .iter()
        .position(|e| e.kind == Kind::MEMORY)
        .ok_or_else(|| bad("it lists no memory section".into()))?;
    let memory = &index.sections[at];
    if memory.offset.checked_add(memory.len) != Some(memory_end) {
        return Err(bad(format!(
            "it puts the memory section at offset {}, the image has it ending at {memory_end}",
            memory.offset
        )));
    }
    let mut chunks = Vec::new();
    let mut end = memory_end;
    let mut region = 0usize;
    let mut next = layout.regions.first().map_or(0, |r| r.0);
    for e in &index.sections[at + 1..] {
        let Some((space, base, pages)) = e.chunk else {
            break;
        };
        if e.kind != Kind::CHUNK || space != Space::Memory {
            break;
        }
        let loc = ChunkLocation {
            base,
            pages,
            offset: e.offset,
            len: e.len,
        };
        if e.offset != end || e.len > max_chunk_payload() + 4096 {
            return Err(bad(format!("{} is out of place", loc.label())));
        }
        if pages == 0 || pages > MAX_CHUNK_PAGES || !base.is_multiple_of(PAGE_SIZE as u64) {
            return Err(bad(format!("{} has a bad size or address", loc.label())));
        }
        let chunk_end = base
            .checked_add(loc.span())
            .ok_or_else(|| bad(format!("{} wraps around", loc.label())))?;
        // Its region: the current one (after the chunk before) or a later one.
        loop {
            let Some(&(addr, len)) = layout.regions.get(region) else {
                return Err(bad(format!(
                    "{} is outside the memory layout, or out of order",
                    loc.label()
                )));
            };
            if base >= next.max(addr) && chunk_end <= addr + len {
                break;
            }
            region += 1;
            next = 0;
        }
        next = chunk_end;
        end = e.offset + e.len;
        chunks.push(loc);
    }
    Ok(MemoryChunks { chunks, end })
}

/// Reads the record of the chunk at `loc` from `file` (a positioned read:
/// any number of threads may share the file), checks its checksums and
/// that it is the chunk the index promised, and returns its payload, for
/// [`crate::Decoder::decode_into`].
pub fn read_chunk_record(
    file: &std::fs::File,
    loc: &ChunkLocation,
) -> Result<Vec<u8>, SnapshotError> {
    use std::os::unix::fs::FileExt;
    let label = loc.label();
    let len = usize::try_from(loc.len).map_err(|_| SnapshotError::Corrupt {
        section: label.clone(),
        reason: "record too long".into(),
    })?;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, loc.offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            SnapshotError::Truncated {
                section: label.clone(),
                expected: loc.len,
                got: 0,
            }
        } else {
            SnapshotError::Read(e)
        }
    })?;
    let mut r: &[u8] = &buf;
    let payload = read_unnamed_record(
        &mut r,
        Kind::CHUNK,
        max_chunk_payload(),
        &label,
        "not a chunk record",
    )?;
    if !r.is_empty() {
        return Err(SnapshotError::Corrupt {
            section: label,
            reason: "the record is shorter than the index says".into(),
        });
    }
    let header = ChunkHeader::decode(&payload).ok_or_else(|| SnapshotError::Corrupt {
        section: label.clone(),
        reason: "bad chunk header".into(),
    })?;
    if (header.space, header.base, header.pages) != (Space::Memory, loc.base, loc.pages) {
        return Err(SnapshotError::Corrupt {
            section: label,
            reason: "the index and the chunk disagree".into(),
        });
    }
    Ok(payload)
}
