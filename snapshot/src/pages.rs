//! Chunk encoding and decoding: zero-page elision, present-page lists for
//! incremental images, compression. Shared by memory and disks.

use crate::error::SnapshotError;
use crate::format::{ChunkHeader, Space, CHUNK_HEADER_LEN, MAX_CHUNK_PAGES, PAGE_SIZE};
use crate::state::Compression;

/// True if the page holds only zeros. ORs 64-byte blocks so the compiler
/// vectorises each block, and the scan still stops at the first non-zero
/// block (most non-zero pages are caught in their first 64 bytes).
pub fn is_zero(page: &[u8]) -> bool {
    let mut blocks = page.chunks_exact(64);
    for b in &mut blocks {
        if b.iter().fold(0u8, |a, &x| a | x) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&x| x == 0)
}

pub(crate) fn bit(map: &[u8], i: usize) -> bool {
    map.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

fn set_bit(map: &mut [u8], i: usize) {
    if let Some(b) = map.get_mut(i / 8) {
        *b |= 1 << (i % 8);
    }
}

/// Counts for one chunk, summed into image statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

/// An encoded chunk payload, in two parts so the compressed data is never
/// copied: `head` (chunk header and bitmaps) and `body` (the data).
pub struct EncodedChunk {
    pub head: Vec<u8>,
    pub body: Vec<u8>,
    pub header: ChunkHeader,
    pub stats: ChunkStats,
}

impl EncodedChunk {
    /// The payload as one buffer (tests, tools).
    pub fn payload(&self) -> Vec<u8> {
        [&self.head[..], &self.body[..]].concat()
    }
}

/// Encodes chunks; one per worker thread, so the zstd context and the
/// staging buffer are reused from chunk to chunk.
pub struct Encoder {
    compression: Compression,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    raw: Vec<u8>,
}

impl Encoder {
    pub fn new(compression: Compression) -> Result<Self, SnapshotError> {
        let compressor = match compression {
            Compression::None => None,
            Compression::Zstd(level) => Some(
                zstd::bulk::Compressor::new(level)
                    .map_err(|e| SnapshotError::Compress(e.to_string()))?,
            ),
        };
        Ok(Encoder {
            compression,
            compressor,
            raw: Vec::new(),
        })
    }

    /// Encodes one chunk. `data` holds the pages (the last one may be short:
    /// it counts as zero-padded); `present(i)` says whether page `i` belongs
    /// in the image (always true except in incremental images).
    pub fn encode(
        &mut self,
        space: Space,
        base: u64,
        data: &[u8],
        present: &dyn Fn(usize) -> bool,
    ) -> Result<EncodedChunk, SnapshotError> {
        let pages = data.len().div_ceil(PAGE_SIZE);
        if pages == 0 || pages > MAX_CHUNK_PAGES as usize {
            return Err(SnapshotError::Usage("chunk size out of range"));
        }
        let header = ChunkHeader {
            space,
            codec: self.compression.codec(),
            pages: pages as u32,
            base,
        };
        let blen = header.bitmap_len();
        let mut head = Vec::with_capacity(CHUNK_HEADER_LEN + 2 * blen);
        head.extend_from_slice(&header.encode());
        head.resize(CHUNK_HEADER_LEN + 2 * blen, 0);
        let (present_map, data_map) = head[CHUNK_HEADER_LEN..].split_at_mut(blen);
        let mut stats = ChunkStats::default();
        // Page-aligned runs of data pages, so a chunk without zero or
        // absent pages (most of a busy guest) is compressed straight from
        // guest memory, without staging.
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for i in 0..pages {
            if !present(i) {
                continue;
            }
            set_bit(present_map, i);
            stats.pages += 1;
            let start = i * PAGE_SIZE;
            let page = &data[start..(start + PAGE_SIZE).min(data.len())];
            if is_zero(page) {
                stats.zero_pages += 1;
                continue;
            }
            set_bit(data_map, i);
            match runs.last_mut() {
                Some(r) if r.1 == start => r.1 = start + PAGE_SIZE,
                _ => runs.push((start, start + PAGE_SIZE)),
            }
        }
        let data_pages = (stats.pages - stats.zero_pages) as usize;
        let raw_len = data_pages * PAGE_SIZE;
        let src: &[u8] = match runs.as_slice() {
            [(s, e)] if *e <= data.len() => &data[*s..*e],
            _ => {
                self.raw.clear();
                for &(s, e) in &runs {
                    self.raw.extend_from_slice(&data[s..e.min(data.len())]);
                    // A short last page is padded with zeros.
                    self.raw
                        .resize(self.raw.len().next_multiple_of(PAGE_SIZE), 0);
                }
                &self.raw
            }
        };
        debug_assert_eq!(src.len(), raw_len);
        let body = match self.compressor.as_mut() {
            _ if src.is_empty() => Vec::new(),
            None => src.to_vec(),
            Some(c) => {
                let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(src.len()));
                c.compress_to_buffer(src, &mut out)
                    .map_err(|e| SnapshotError::Compress(e.to_string()))?;
                out
            }
        };
        stats.raw_bytes = raw_len as u64;
        stats.stored_bytes = (head.len() + body.len()) as u64;
        Ok(EncodedChunk {
            head,
            body,
            header,
            stats,
        })
    }
}

/// Encodes one chunk with a one-off encoder (tests, tools).
pub fn encode_chunk(
    space: Space,
    base: u64,
    data: &[u8],
    present: &dyn Fn(usize) -> bool,
    compression: Compression,
) -> Result<EncodedChunk, SnapshotError> {
    Encoder::new(compression)?.encode(space, base, data, present)
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

/// A decoded chunk that owns its pages.
#[derive(Debug)]
pub struct Chunk {
    pub header: ChunkHeader,
    present: Vec<u8>,
    data_map: Vec<u8>,
    /// The data pages, decompressed, in order.
    data: Vec<u8>,
}

impl Chunk {
    /// Address (guest-physical or disk offset) of page `i`. decode checked
    /// that the chunk's last page address does not overflow.
    pub fn page_addr(&self, i: usize) -> u64 {
        self.header.base + (i * PAGE_SIZE) as u64
    }

    /// Every page of the chunk, with its address, in order.
    pub fn pages(&self) -> impl Iterator<Item = (u64, Page<'_>)> + '_ {
        self.view()
            .into_pages()
            .map(|(i, p)| (self.page_addr(i), p))
    }

    /// Pages with data.
    pub fn data_pages(&self) -> usize {
        self.data.len() / PAGE_SIZE
    }

    fn view(&self) -> ChunkView<'_> {
        ChunkView {
            header: self.header,
            present: &self.present,
            data_map: &self.data_map,
            data: &self.data,
        }
    }
}

/// A decoded chunk borrowing its bitmaps from the payload and its data from
/// the payload (stored) or a reused buffer (zstd).
#[derive(Clone, Copy)]
pub struct ChunkView<'a> {
    pub header: ChunkHeader,
    present: &'a [u8],
    data_map: &'a [u8],
    data: &'a [u8],
}

impl<'a> ChunkView<'a> {
    /// (page index, page) for every page.
    pub fn into_pages(self) -> impl Iterator<Item = (usize, Page<'a>)> {
        let mut next_data = 0usize;
        (0..self.header.pages as usize).map(move |i| {
            if !bit(self.present, i) {
                return (i, Page::Absent);
            }
            if !bit(self.data_map, i) {
                return (i, Page::Zero);
            }
            let start = next_data * PAGE_SIZE;
            next_data += 1;
            // decode checked that the data holds one page per data bit, so
            // the fallback is unreachable.
            match self
                .data
                .get(start..start + PAGE_SIZE)
                .and_then(|s| <&[u8; PAGE_SIZE]>::try_from(s).ok())
            {
                Some(p) => (i, Page::Data(p)),
                None => (i, Page::Zero),
            }
        })
    }

    /// Copies the chunk onto `dest` (which covers exactly the chunk's
    /// pages, or less for a short last disk page): data pages always, zero
    /// pages only if `write_zeros` (a fresh destination is already zero,
    /// and not touching it spares the page faults).
    pub fn apply_to(self, dest: &mut [u8], write_zeros: bool) {
        for (i, page) in self.into_pages() {
            let start = i * PAGE_SIZE;
            let Some(d) = dest.get_mut(start..(start + PAGE_SIZE).min(dest.len())) else {
                break;
            };
            match page {
                Page::Absent => {}
                Page::Zero if write_zeros => d.fill(0),
                Page::Zero => {}
                Page::Data(p) => d.copy_from_slice(&p[..d.len()]),
            }
        }
    }

    pub fn to_owned_chunk(self) -> Chunk {
        Chunk {
            header: self.header,
            present: self.present.to_vec(),
            data_map: self.data_map.to_vec(),
            data: self.data.to_vec(),
        }
    }
}

/// Reusable state for decoding chunks on one thread (a zstd context and
/// a scratch buffer), for readers that decode chunk after chunk.
#[derive(Default)]
pub struct Decoder {
    dctx: Option<zstd::bulk::Decompressor<'static>>,
    scratch: Vec<u8>,
}

/// A chunk payload's parts, checked against each other.
struct Parsed<'a> {
    header: ChunkHeader,
    present: &'a [u8],
    data_map: &'a [u8],
    body: &'a [u8],
    data_pages: usize,
}

/// Checks a chunk payload's header and bitmaps; never allocates.
fn parse<'a>(payload: &'a [u8], section: &str) -> Result<Parsed<'a>, SnapshotError> {
    let corrupt = |reason: &str| SnapshotError::Corrupt {
        section: section.to_string(),
        reason: reason.to_string(),
    };
    let header = ChunkHeader::decode(payload).ok_or_else(|| corrupt("bad chunk header"))?;
    if header.pages == 0 || header.pages > MAX_CHUNK_PAGES {
        return Err(corrupt("chunk page count out of range"));
    }
    if !header.base.is_multiple_of(PAGE_SIZE as u64)
        || header.base.checked_add(header.span()).is_none()
    {
        return Err(corrupt("chunk address is not a page address"));
    }
    let blen = header.bitmap_len();
    let maps_end = CHUNK_HEADER_LEN + 2 * blen;
    let Some(maps) = payload.get(CHUNK_HEADER_LEN..maps_end) else {
        return Err(corrupt("chunk bitmaps cut short"));
    };
    let (present, data_map) = maps.split_at(blen);
    // Data bits must be a subset of present bits, and bits past the page
    // count clear (unused bits of the last byte).
    let mut data_pages = 0usize;
    for (i, (&p, &d)) in present.iter().zip(data_map).enumerate() {
        if d & !p != 0 {
            return Err(corrupt("page with data but not present"));
        }
        data_pages += d.count_ones() as usize;
        let valid = (header.pages as usize).saturating_sub(i * 8).min(8);
        let mask = if valid == 8 { 0xff } else { (1u8 << valid) - 1 };
        if (p | d) & !mask != 0 {
            return Err(corrupt("bitmap bits past the chunk's pages"));
        }
    }
    let body = &payload[maps_end..];
    let want = data_pages * PAGE_SIZE;
    match header.codec {
        0 if body.len() != want => Err(corrupt(&format!(
            "stored data is {} bytes, the bitmap says {want}",
            body.len()
        ))),
        1 if want == 0 && !body.is_empty() => Err(corrupt("data after a chunk without data pages")),
        _ => Ok(Parsed {
            header,
            present,
            data_map,
            body,
            data_pages,
        }),
    }
}

impl Parsed<'_> {
    /// The data pages as one run `[start, end)` of page indexes, if they
    /// are contiguous (the usual case in busy memory).
    fn single_run(&self) -> Option<(usize, usize)> {
        let first = (0..self.header.pages as usize).find(|&i| bit(self.data_map, i))?;
        let end = first + self.data_pages;
        (first..end)
            .all(|i| bit(self.data_map, i))
            .then_some((first, end))
    }
}

impl Decoder {
    fn dctx(
        &mut self,
        section: &str,
    ) -> Result<&mut zstd::bulk::Decompressor<'static>, SnapshotError> {
        if self.dctx.is_none() {
            let d = zstd::bulk::Decompressor::new().map_err(|e| SnapshotError::Corrupt {
                section: section.to_string(),
                reason: format!("zstd: {e}"),
            })?;
            self.dctx = Some(d);
        }
        self.dctx
            .as_mut()
            .ok_or(SnapshotError::Usage("no zstd context"))
    }

    /// Decodes a chunk payload, checking every count against the header and
    /// never allocating more than the chunk's declared pages.
    pub fn decode<'a>(
        &'a mut self,
        payload: &'a [u8],
        section: &str,
    ) -> Result<ChunkView<'a>, SnapshotError> {
        let p = parse(payload, section)?;
        let want = p.data_pages * PAGE_SIZE;
        let data: &[u8] = if p.header.codec == 0 || want == 0 {
            p.body
        } else {
            let mut scratch = std::mem::take(&mut self.scratch);
            scratch.clear();
            // The buffer's capacity bounds the output: a frame claiming
            // more than the bitmap's pages fails instead of allocating.
            scratch.reserve_exact(want);
            let r = self
                .dctx(section)?
                .decompress_to_buffer(p.body, &mut scratch);
            self.scratch = scratch;
            check_size(r, want, section)?;
            &self.scratch[..want]
        };
        Ok(ChunkView {
            header: p.header,
            present: p.present,
            data_map: p.data_map,
            data,
        })
    }

    /// Decodes a chunk straight onto `dest` (see [`ChunkView::apply_to`]).
    /// When the data pages are contiguous, zstd decompresses directly into
    /// `dest`, saving a copy of every byte on restore.
    pub fn decode_into(
        &mut self,
        payload: &[u8],
        section: &str,
        dest: &mut [u8],
        write_zeros: bool,
    ) -> Result<(), SnapshotError> {
        let p = parse(payload, section)?;
        if p.header.codec == 1 && dest.len() as u64 >= p.header.span() {
            if let Some((s, e)) = p.single_run() {
                let want = p.data_pages * PAGE_SIZE;
                let out = &mut dest[s * PAGE_SIZE..e * PAGE_SIZE];
                let r = self.dctx(section)?.decompress_to_buffer(p.body, out);
                check_size(r, want, section)?;
                if write_zeros {
                    for i in 0..p.header.pages as usize {
                        if bit(p.present, i) && !bit(p.data_map, i) {
                            dest[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].fill(0);
                        }
                    }
                }
                return Ok(());
            }
        }
        self.decode(payload, section)?.apply_to(dest, write_zeros);
        Ok(())
    }
}

fn check_size(r: std::io::Result<usize>, want: usize, section: &str) -> Result<(), SnapshotError> {
    let corrupt = |reason: String| SnapshotError::Corrupt {
        section: section.to_string(),
        reason,
    };
    match r {
        Ok(n) if n == want => Ok(()),
        Ok(n) => Err(corrupt(format!(
            "compressed data decodes to {n} bytes, the bitmap says {want}"
        ))),
        Err(e) => Err(corrupt(format!("zstd: {e}"))),
    }
}

/// Decodes a chunk payload into a [`Chunk`] that owns its pages.
pub fn decode_chunk(payload: &[u8], section: &str) -> Result<Chunk, SnapshotError> {
    let mut d = Decoder::default();
    Ok(d.decode(payload, section)?.to_owned_chunk())
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
        assert!(!is_zero(&[0, 0, 1]));
    }

    #[test]
    fn chunk_round_trip_with_zero_absent_and_short_pages() {
        let mut data = vec![0u8; 3 * PAGE_SIZE + 100];
        data[PAGE_SIZE + 5] = 7; // page 1: data
        data[3 * PAGE_SIZE + 99] = 9; // page 3: short, data
        for c in [Compression::None, Compression::Zstd(1)] {
            let e = encode_chunk(Space::Memory, 0x1000, &data, &|i| i != 2, c).unwrap();
            assert_eq!(e.stats.pages, 3);
            assert_eq!(e.stats.zero_pages, 1);
            let ch = decode_chunk(&e.payload(), "t").unwrap();
            let pages: Vec<_> = ch.pages().collect();
            assert_eq!(pages.len(), 4);
            assert_eq!(pages[0], (0x1000, Page::Zero));
            assert!(matches!(pages[1], (0x2000, Page::Data(d)) if d[5] == 7));
            assert_eq!(pages[2], (0x3000, Page::Absent));
            assert!(matches!(pages[3], (0x4000, Page::Data(d)) if d[99] == 9 && d[100] == 0));
            assert_eq!(ch.data_pages(), 2);
        }
    }

    #[test]
    fn a_chunk_of_only_data_pages_is_not_staged() {
        let data: Vec<u8> = (0..4 * PAGE_SIZE).map(|i| (i % 251) as u8 + 1).collect();
        let e = encode_chunk(Space::Disk, 0, &data, &|_| true, Compression::Zstd(1)).unwrap();
        let mut dest = vec![0u8; data.len()];
        let mut d = Decoder::default();
        let payload = e.payload();
        d.decode(&payload, "t").unwrap().apply_to(&mut dest, false);
        assert_eq!(dest, data);
    }

    #[test]
    fn decode_into_matches_decode_for_every_pattern() {
        // Data pages contiguous or not, zero and absent pages around them.
        for pattern in [0b0110u8, 0b1011, 0b1111, 0b0001, 0b1000, 0b0000] {
            let mut data = vec![0u8; 4 * PAGE_SIZE];
            for i in 0..4 {
                if pattern & (1 << i) != 0 {
                    data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].fill(i as u8 + 1);
                }
            }
            for c in [Compression::None, Compression::Zstd(1)] {
                let payload = encode_chunk(Space::Memory, 0, &data, &|i| i != 2 || pattern == 0, c)
                    .unwrap()
                    .payload();
                for zeros in [false, true] {
                    let mut a = vec![0xeeu8; data.len()];
                    let mut b = a.clone();
                    let mut d = Decoder::default();
                    d.decode(&payload, "t").unwrap().apply_to(&mut a, zeros);
                    d.decode_into(&payload, "t", &mut b, zeros).unwrap();
                    assert_eq!(a, b, "{pattern:#b} {c} {zeros}");
                }
            }
        }
    }

    #[test]
    fn apply_writes_zero_pages_only_when_asked() {
        let mut data = vec![0u8; 2 * PAGE_SIZE];
        data[PAGE_SIZE] = 1;
        let e = encode_chunk(Space::Memory, 0, &data, &|_| true, Compression::None).unwrap();
        let payload = e.payload();
        let mut d = Decoder::default();
        let mut dest = vec![0xeeu8; 2 * PAGE_SIZE];
        d.decode(&payload, "t").unwrap().apply_to(&mut dest, false);
        assert_eq!(dest[0], 0xee);
        assert_eq!(&dest[PAGE_SIZE..], &data[PAGE_SIZE..]);
        d.decode(&payload, "t").unwrap().apply_to(&mut dest, true);
        assert_eq!(dest, data);
    }

    #[test]
    fn corrupt_chunks_are_refused() {
        let data = vec![1u8; 2 * PAGE_SIZE];
        for c in [Compression::None, Compression::Zstd(1)] {
            let payload = encode_chunk(Space::Memory, 0, &data, &|_| true, c)
                .unwrap()
                .payload();
            for cut in 0..payload.len() {
                assert!(decode_chunk(&payload[..cut], "t").is_err(), "cut at {cut}");
            }
            let mut bad = payload.clone();
            bad[4] = 0xff; // page count
            bad[5] = 0xff;
            assert!(decode_chunk(&bad, "t").is_err());
            let mut bad = payload.clone();
            bad[CHUNK_HEADER_LEN] = 0b1000_0001; // a present bit past page 2
            assert!(decode_chunk(&bad, "t").is_err());
            let mut bad = payload.clone();
            bad[CHUNK_HEADER_LEN] = 0b01; // page 1 has data but is absent
            assert!(decode_chunk(&bad, "t").is_err());
        }
    }
}
