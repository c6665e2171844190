//! Random access through the index, for readers with a seekable file (a
//! lazy restore fetching one chunk per page fault, `inspect` on a file):
//! the header and index, and any one chunk.

use std::io::{Read, Seek, SeekFrom};

use crate::error::SnapshotError;
use crate::format::{max_chunk_payload, Kind, FOOTER_LEN};
use crate::framing::{read_file_header, read_footer, read_index_record, read_unnamed_record};
use crate::pages::{decode_chunk, Chunk};
use crate::state::{Header, Index};

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
