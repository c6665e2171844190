//! Chunk encoding and decoding: zero-page elision, optional page lists for
//! incremental images, compression. Shared by memory and disks.

use crate::format::{
    ChunkHeader, Compression, Space, CHUNK_HEADER_LEN, MAX_CHUNK_PAGES, PAGE_SIZE,
};
use crate::SnapshotError;

/// True if the page holds only zeros. Checks 64-byte blocks so the compiler
/// can vectorise each block and the scan still stops at the first non-zero.
pub fn is_zero(page: &[u8]) -> bool {
    let mut blocks = page.chunks_exact(64);
    for b in &mut blocks {
        if b.iter().fold(0u8, |a, &x| a | x) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&x| x == 0)
}

fn bit(map: &[u8], i: usize) -> bool {
    map.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

fn set_bit(map: &mut [u8], i: usize) {
    if let Some(b) = map.get_mut(i / 8) {
        *b |= 1 << (i % 8);
    }
}

/// Encodes one chunk. `data` holds the pages (the last one may be short: it
/// counts as zero-padded); `present(i)` says whether page `i` belongs in the
/// image (always true except in incremental images).
pub fn encode_chunk(
    space: Space,
    base: u64,
    data: &[u8],
    present: &dyn Fn(usize) -> bool,
    compression: Compression,
    compressor: Option<&mut zstd::bulk::Compressor<'static>>,
) -> Result<EncodedChunk, SnapshotError> {
    let pages = data.len().div_ceil(PAGE_SIZE);
    let header = ChunkHeader {
        space,
        codec: compression.codec(),
        pages: pages as u32,
        base,
    };
    let blen = header.bitmap_len();
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + 2 * blen + data.len() / 2);
    out.extend_from_slice(&header.encode());
    let mut present_map = vec![0u8; blen];
    let mut data_map = vec![0u8; blen];
    let mut raw = Vec::new();
    let mut stats = ChunkStats::default();
    for i in 0..pages {
        if !present(i) {
            continue;
        }
        set_bit(&mut present_map, i);
        stats.pages += 1;
        let page = &data[i * PAGE_SIZE..((i + 1) * PAGE_SIZE).min(data.len())];
        if is_zero(page) {
            stats.zero_pages += 1;
            continue;
        }
        set_bit(&mut data_map, i);
        raw.extend_from_slice(page);
        raw.resize(raw.len().next_multiple_of(PAGE_SIZE), 0);
    }
    out.extend_from_slice(&present_map);
    out.extend_from_slice(&data_map);
    match (compression, compressor) {
        (Compression::None, _) => out.extend_from_slice(&raw),
        (Compression::Zstd(_), Some(c)) if !raw.is_empty() => {
            let packed = c
                .compress(&raw)
                .map_err(|e| SnapshotError::Compress(e.to_string()))?;
            out.extend_from_slice(&packed);
        }
        (Compression::Zstd(level), None) if !raw.is_empty() => {
            let packed = zstd::bulk::compress(&raw, level)
                .map_err(|e| SnapshotError::Compress(e.to_string()))?;
            out.extend_from_slice(&packed);
        }
        (Compression::Zstd(_), _) => {}
    }
    stats.raw_bytes = raw.len() as u64;
    stats.stored_bytes = out.len() as u64;
    Ok(EncodedChunk {
        payload: out,
        stats,
    })
}

/// Counts for one chunk, summed into image statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ChunkStats {
    /// Pages recorded (present).
    pub pages: u64,
    /// Of those, all-zero pages (not stored).
    pub zero_pages: u64,
    /// Bytes of non-zero page data before compression.
    pub raw_bytes: u64,
    /// Bytes of the chunk record's payload.
    pub stored_bytes: u64,
}

impl std::ops::AddAssign for ChunkStats {
    fn add_assign(&mut self, o: Self) {
        self.pages += o.pages;
        self.zero_pages += o.zero_pages;
        self.raw_bytes += o.raw_bytes;
        self.stored_bytes += o.stored_bytes;
    }
}

pub struct EncodedChunk {
    pub payload: Vec<u8>,
    pub stats: ChunkStats,
}

/// What an image says about one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Page<'a> {
    /// Not in this image: unchanged from the parent.
    Absent,
    /// All zeros.
    Zero,
    Data(&'a [u8; PAGE_SIZE]),
}

/// A decoded chunk.
#[derive(Debug)]
pub struct Chunk {
    pub header: ChunkHeader,
    present: Vec<u8>,
    data_map: Vec<u8>,
    /// The data pages, decompressed, in order.
    data: Vec<u8>,
}

impl Chunk {
    /// Address (guest-physical or disk offset) of page `i`.
    pub fn page_addr(&self, i: usize) -> u64 {
        self.header.base + (i * PAGE_SIZE) as u64
    }

    /// Every page of the chunk, with its address, in order.
    pub fn pages(&self) -> impl Iterator<Item = (u64, Page<'_>)> + '_ {
        let mut next_data = 0usize;
        (0..self.header.pages as usize).map(move |i| {
            let addr = self.page_addr(i);
            if !bit(&self.present, i) {
                return (addr, Page::Absent);
            }
            if !bit(&self.data_map, i) {
                return (addr, Page::Zero);
            }
            let start = next_data * PAGE_SIZE;
            next_data += 1;
            // decode() checked that the data holds one page per data bit.
            match self
                .data
                .get(start..start + PAGE_SIZE)
                .and_then(|s| <&[u8; PAGE_SIZE]>::try_from(s).ok())
            {
                Some(p) => (addr, Page::Data(p)),
                None => (addr, Page::Zero),
            }
        })
    }

    /// Pages with data.
    pub fn data_pages(&self) -> usize {
        self.data.len() / PAGE_SIZE
    }
}

/// Decodes a chunk payload, checking every count against the header and
/// never allocating more than the chunk's declared pages.
pub fn decode_chunk(payload: &[u8], section: &str) -> Result<Chunk, SnapshotError> {
    let corrupt = |reason: &str| SnapshotError::Corrupt {
        section: section.to_string(),
        reason: reason.to_string(),
    };
    let header = ChunkHeader::decode(payload).ok_or_else(|| corrupt("bad chunk header"))?;
    if header.pages == 0 || header.pages > MAX_CHUNK_PAGES {
        return Err(corrupt("chunk page count out of range"));
    }
    if header.base % PAGE_SIZE as u64 != 0
        || header
            .base
            .checked_add(u64::from(header.pages) * PAGE_SIZE as u64)
            .is_none()
    {
        return Err(corrupt("chunk address is not a page address"));
    }
    let blen = header.bitmap_len();
    let maps_end = CHUNK_HEADER_LEN + 2 * blen;
    if payload.len() < maps_end {
        return Err(corrupt("chunk bitmaps cut short"));
    }
    let present = payload[CHUNK_HEADER_LEN..CHUNK_HEADER_LEN + blen].to_vec();
    let data_map = payload[CHUNK_HEADER_LEN + blen..maps_end].to_vec();
    let mut data_pages = 0usize;
    for i in 0..header.pages as usize {
        if bit(&data_map, i) {
            if !bit(&present, i) {
                return Err(corrupt("page with data but not present"));
            }
            data_pages += 1;
        }
    }
    // Bits past the page count must be clear.
    for i in header.pages as usize..blen * 8 {
        if bit(&present, i) || bit(&data_map, i) {
            return Err(corrupt("bitmap bits past the chunk's pages"));
        }
    }
    let want = data_pages * PAGE_SIZE;
    let body = &payload[maps_end..];
    let data = match header.codec {
        0 => {
            if body.len() != want {
                return Err(corrupt("uncompressed data has the wrong size"));
            }
            body.to_vec()
        }
        _ if want == 0 => {
            if !body.is_empty() {
                return Err(corrupt("data after a chunk without data pages"));
            }
            Vec::new()
        }
        _ => {
            let mut out = vec![0u8; want];
            let n = zstd::bulk::decompress_to_buffer(body, &mut out)
                .map_err(|e| corrupt(&format!("zstd: {e}")))?;
            if n != want {
                return Err(corrupt("compressed data decodes to the wrong size"));
            }
            out
        }
    };
    Ok(Chunk {
        header,
        present,
        data_map,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; PAGE_SIZE];
        assert!(is_zero(&p));
        p[4095] = 1;
        assert!(!is_zero(&p));
        assert!(is_zero(&[0u8; 100]));
    }

    #[test]
    fn chunk_round_trip_with_zero_absent_and_short_pages() {
        let mut data = vec![0u8; 3 * PAGE_SIZE + 100];
        data[PAGE_SIZE + 5] = 7; // page 1: data
        data[3 * PAGE_SIZE + 99] = 9; // page 3: short, data
        for c in [Compression::None, Compression::Zstd(1)] {
            let e = encode_chunk(Space::Memory, 0x1000, &data, &|i| i != 2, c, None).unwrap();
            assert_eq!(e.stats.pages, 3);
            assert_eq!(e.stats.zero_pages, 1);
            let ch = decode_chunk(&e.payload, "t").unwrap();
            let pages: Vec<_> = ch.pages().collect();
            assert_eq!(pages.len(), 4);
            assert_eq!(pages[0], (0x1000, Page::Zero));
            assert!(matches!(pages[1], (0x2000, Page::Data(d)) if d[5] == 7));
            assert_eq!(pages[2], (0x3000, Page::Absent));
            assert!(matches!(pages[3], (0x4000, Page::Data(d)) if d[99] == 9 && d[100] == 0));
        }
    }

    #[test]
    fn corrupt_chunks_are_refused() {
        let data = vec![1u8; 2 * PAGE_SIZE];
        let e = encode_chunk(
            Space::Memory,
            0,
            &data,
            &|_| true,
            Compression::Zstd(1),
            None,
        )
        .unwrap();
        for cut in 0..e.payload.len() {
            assert!(
                decode_chunk(&e.payload[..cut], "t").is_err(),
                "cut at {cut}"
            );
        }
        let mut bad = e.payload.clone();
        bad[4] = 0xff; // page count
        bad[5] = 0xff;
        assert!(decode_chunk(&bad, "t").is_err());
    }
}
