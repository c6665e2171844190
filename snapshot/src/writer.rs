//! Writes an image to any `Write`, never seeking.

use std::io::Write;

use serde::Serialize;

use crate::format::{
    flags, Compression, DiskInfo, Header, Index, IndexEntry, Kind, MemoryLayout, SectionHeader,
    Space, FOOTER_MAGIC, FORMAT_VERSION, MAGIC, MAX_CHUNK_PAGES, MAX_NAME_LEN, PAGE_SIZE,
};
use crate::pages::{encode_chunk, ChunkStats, EncodedChunk};
use crate::SnapshotError;

/// Pages of one region or disk, read by worker threads.
pub trait PageSource: Sync {
    /// Length in bytes.
    fn len(&self) -> u64;
    /// Fills `buf` from byte `offset` (`buf` never runs past `len`).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// The bytes at `offset` without a copy, when they are in memory.
    fn slice(&self, _offset: u64, _len: usize) -> Option<&[u8]> {
        None
    }
}

impl PageSource for &[u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let s = PageSource::slice(self, offset, buf.len()).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past the source")
        })?;
        buf.copy_from_slice(s);
        Ok(())
    }
    fn slice(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let start = usize::try_from(offset).ok()?;
        self.get(start..start.checked_add(len)?)
    }
}

/// A file read with positional reads (several threads at once).
pub struct FileSource<'a> {
    pub file: &'a std::fs::File,
    pub len: u64,
}

impl PageSource for FileSource<'_> {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.read_exact_at(buf, offset)
    }
}

/// How memory or a disk is encoded.
#[derive(Clone, Copy, Debug)]
pub struct EncodeOptions {
    pub compression: Compression,
    pub chunk_pages: u32,
    /// Worker threads for compression (0: one per core).
    pub threads: usize,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            compression: Compression::Zstd(1),
            chunk_pages: crate::format::DEFAULT_CHUNK_PAGES,
            threads: 0,
        }
    }
}

impl EncodeOptions {
    fn threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// Counts a `Write`'s bytes, for the index.
struct Counting<W> {
    inner: W,
    pos: u64,
}

impl<W: Write> Counting<W> {
    fn put(&mut self, b: &[u8]) -> Result<(), SnapshotError> {
        self.inner.write_all(b).map_err(SnapshotError::Write)?;
        self.pos += b.len() as u64;
        Ok(())
    }
}

/// What `finish` reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct WriteSummary {
    pub bytes: u64,
    pub memory: ChunkStats,
    pub disk: ChunkStats,
}

/// Streams an image: header, then sections in the order they are given,
/// then END, the index and the footer.
pub struct ImageWriter<W: Write> {
    out: Counting<W>,
    index: Index,
    summary: WriteSummary,
    incremental: bool,
}

impl<W: Write> ImageWriter<W> {
    /// Writes the magic, the version and `header`.
    pub fn new(out: W, header: &Header) -> Result<Self, SnapshotError> {
        let body = postcard::to_allocvec(header).map_err(SnapshotError::serialize("header"))?;
        let mut w = ImageWriter {
            out: Counting { inner: out, pos: 0 },
            index: Index::default(),
            summary: WriteSummary::default(),
            incremental: header.flags & flags::INCREMENTAL != 0,
        };
        w.out.put(&MAGIC)?;
        w.out.put(&FORMAT_VERSION.to_le_bytes())?;
        w.out.put(&(body.len() as u32).to_le_bytes())?;
        w.out.put(&body)?;
        w.out.put(&crc32c::crc32c(&body).to_le_bytes())?;
        Ok(w)
    }

    /// Writes one section record.
    pub fn write_section(
        &mut self,
        kind: Kind,
        name: &str,
        payload: &[u8],
    ) -> Result<(), SnapshotError> {
        self.write_section_at(kind, name, payload, None)
    }

    fn write_section_at(
        &mut self,
        kind: Kind,
        name: &str,
        payload: &[u8],
        chunk: Option<(Space, u64, u32)>,
    ) -> Result<(), SnapshotError> {
        if name.len() > MAX_NAME_LEN {
            return Err(SnapshotError::NameTooLong(name.to_string()));
        }
        let mut crc = crc32c::crc32c(name.as_bytes());
        crc = crc32c::crc32c_append(crc, payload);
        let h = SectionHeader {
            kind,
            name_len: name.len() as u16,
            payload_len: payload.len() as u64,
            crc,
        };
        if kind != Kind::INDEX {
            self.index.sections.push(IndexEntry {
                kind,
                name: name.to_string(),
                offset: self.out.pos,
                chunk,
            });
        }
        self.out.put(&h.encode())?;
        self.out.put(name.as_bytes())?;
        self.out.put(payload)
    }

    /// Writes a serde value as a state section (VM, vCPU, device).
    pub fn write_state<T: Serialize>(
        &mut self,
        kind: Kind,
        name: &str,
        value: &T,
    ) -> Result<(), SnapshotError> {
        let payload = postcard::to_allocvec(value).map_err(SnapshotError::serialize(name))?;
        self.write_section(kind, name, &payload)
    }

    /// Writes guest memory: `regions` are (guest-physical address, bytes).
    /// `dirty`, for an incremental image, gives per region a bitmap (bit per
    /// page, 64 pages per word) of the pages to store.
    pub fn write_memory(
        &mut self,
        regions: &[(u64, &[u8])],
        dirty: Option<&[Vec<u64>]>,
        opts: EncodeOptions,
    ) -> Result<ChunkStats, SnapshotError> {
        if dirty.is_some() != self.incremental {
            return Err(SnapshotError::Usage(
                "a dirty-page list goes with an incremental header, and only with one",
            ));
        }
        let layout = MemoryLayout {
            regions: regions
                .iter()
                .map(|(a, d)| (*a, <[u8]>::len(d) as u64))
                .collect(),
            chunk_pages: opts.chunk_pages,
            compression: opts.compression,
        };
        for (addr, data) in regions {
            if addr % PAGE_SIZE as u64 != 0 || <[u8]>::len(data) % PAGE_SIZE != 0 {
                return Err(SnapshotError::Usage("memory regions must be page aligned"));
            }
        }
        self.write_state(Kind::MEMORY, "memory", &layout)?;
        let mut total = ChunkStats::default();
        for (ri, (addr, data)) in regions.iter().enumerate() {
            let bits = dirty.and_then(|d| d.get(ri)).map(|v| v.as_slice());
            if dirty.is_some() && bits.is_none() {
                return Err(SnapshotError::Usage("one dirty bitmap per memory region"));
            }
            total += self.write_chunks(Space::Memory, *addr, data, bits, opts)?;
        }
        self.summary.memory += total;
        Ok(total)
    }

    /// Writes a disk's contents (`source` of `source.len()` bytes).
    pub fn write_disk(
        &mut self,
        name: &str,
        source: &dyn PageSource,
        opts: EncodeOptions,
    ) -> Result<ChunkStats, SnapshotError> {
        let info = DiskInfo {
            name: name.to_string(),
            size: source.len(),
            chunk_pages: opts.chunk_pages,
            compression: opts.compression,
        };
        self.write_state(Kind::DISK, name, &info)?;
        let stats = self.write_chunks(Space::Disk, 0, source, None, opts)?;
        self.summary.disk += stats;
        Ok(stats)
    }

    /// Encodes `source` in chunks on worker threads, writing them in order.
    fn write_chunks(
        &mut self,
        space: Space,
        base: u64,
        source: &dyn PageSource,
        dirty: Option<&[u64]>,
        opts: EncodeOptions,
    ) -> Result<ChunkStats, SnapshotError> {
        if opts.chunk_pages == 0 || opts.chunk_pages > MAX_CHUNK_PAGES {
            return Err(SnapshotError::Usage("chunk size out of range"));
        }
        let chunk_bytes = opts.chunk_pages as u64 * PAGE_SIZE as u64;
        let len = source.len();
        let nchunks = len.div_ceil(chunk_bytes) as usize;
        let threads = opts.threads().max(1);
        // Chunks in flight: enough to keep every thread busy while bounding memory.
        let batch = threads * 4;
        let mut stats = ChunkStats::default();
        let page_dirty = |page: u64| -> bool {
            match dirty {
                None => true,
                Some(bits) => bits
                    .get((page / 64) as usize)
                    .is_some_and(|w| w & (1 << (page % 64)) != 0),
            }
        };
        let mut first = 0usize;
        while first < nchunks {
            let last = (first + batch).min(nchunks);
            let mut results: Vec<Option<Result<EncodedChunk, SnapshotError>>> =
                (first..last).map(|_| None).collect();
            std::thread::scope(|s| {
                let slots: Vec<_> = results.iter_mut().enumerate().collect();
                let mut per_thread: Vec<Vec<(usize, &mut Option<_>)>> =
                    (0..threads).map(|_| Vec::new()).collect();
                for (i, slot) in slots {
                    per_thread[i % threads].push((i, slot));
                }
                for work in per_thread {
                    s.spawn(move || {
                        let mut compressor = match opts.compression {
                            Compression::Zstd(level) => zstd::bulk::Compressor::new(level).ok(),
                            Compression::None => None,
                        };
                        let mut buf = Vec::new();
                        for (i, slot) in work {
                            let ci = (first + i) as u64;
                            let off = ci * chunk_bytes;
                            let n = chunk_bytes.min(len - off) as usize;
                            let first_page = off / PAGE_SIZE as u64;
                            let present = |p: usize| page_dirty(first_page + p as u64);
                            let result = match source.slice(off, n) {
                                Some(data) => encode_chunk(
                                    space,
                                    base + off,
                                    data,
                                    &present,
                                    opts.compression,
                                    compressor.as_mut(),
                                ),
                                None => {
                                    buf.resize(n, 0);
                                    match source.read_at(off, &mut buf) {
                                        Ok(()) => encode_chunk(
                                            space,
                                            base + off,
                                            &buf,
                                            &present,
                                            opts.compression,
                                            compressor.as_mut(),
                                        ),
                                        Err(e) => Err(SnapshotError::Source(e)),
                                    }
                                }
                            };
                            *slot = Some(result);
                        }
                    });
                }
            });
            for (i, r) in results.into_iter().enumerate() {
                let chunk = r.ok_or(SnapshotError::Usage("a chunk was not encoded"))??;
                let ci = (first + i) as u64;
                // An incremental chunk with no page of this image is left out.
                if chunk.stats.pages == 0 && dirty.is_some() {
                    continue;
                }
                let pages = chunk
                    .payload
                    .get(4..8)
                    .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                self.write_section_at(
                    Kind::CHUNK,
                    "",
                    &chunk.payload,
                    Some((space, base + ci * chunk_bytes, pages)),
                )?;
                stats += chunk.stats;
            }
            first = last;
        }
        Ok(stats)
    }

    /// Writes END, the index and the footer, and flushes. Returns the
    /// destination, so the caller can fsync a file.
    pub fn finish(mut self) -> Result<(W, WriteSummary), SnapshotError> {
        self.write_section(Kind::END, "", &[])?;
        let index_offset = self.out.pos;
        let index = std::mem::take(&mut self.index);
        let payload = postcard::to_allocvec(&index).map_err(SnapshotError::serialize("index"))?;
        self.write_section(Kind::INDEX, "", &payload)?;
        self.out.put(&index_offset.to_le_bytes())?;
        self.out.put(&FOOTER_MAGIC)?;
        self.out.inner.flush().map_err(SnapshotError::Write)?;
        self.summary.bytes = self.out.pos;
        Ok((self.out.inner, self.summary))
    }
}
