//! Writes an image to any `Write`, never seeking.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;

use crate::error::SnapshotError;
use crate::format::{
    encode_footer, section_flags, Kind, SectionHeader, Space, DEFAULT_CHUNK_PAGES, END_HAS_INDEX,
    FORMAT_VERSION, MAGIC, MAX_CHUNK_PAGES, MAX_NAME_LEN, MAX_STATE_LEN, PAGE_SIZE,
    SECTION_HEADER_LEN,
};
use crate::pages::{ChunkStats, EncodedChunk, Encoder};
use crate::state::{Compression, DiskInfo, Header, Index, IndexEntry, MemoryLayout};
use crate::state_codec::encode_state;
use crate::workers::{self, threads_or_cores};

/// Pages of one region or disk, read by worker threads.
pub trait PageSource: Sync {
    /// Length in bytes.
    fn len(&self) -> u64;
    /// True if there are no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
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
    /// Pages per chunk (1 to [`MAX_CHUNK_PAGES`]).
    pub chunk_pages: u32,
    /// Worker threads for compression (0: one per core).
    pub threads: usize,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            compression: Compression::Zstd(1),
            chunk_pages: DEFAULT_CHUNK_PAGES,
            threads: 0,
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
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct WriteSummary {
    /// Bytes of the whole image.
    pub bytes: u64,
    pub memory: ChunkStats,
    pub disk: ChunkStats,
}

/// Streams an image: header, then sections in the order they are given,
/// then END, the index and the footer.
///
/// ```no_run
/// # fn main() -> Result<(), snapshot::SnapshotError> {
/// use snapshot::{EncodeOptions, Header, ImageWriter, Kind};
/// let memory = vec![0u8; 1 << 20];
/// let out = std::fs::File::create("vm.img").map_err(snapshot::SnapshotError::Write)?;
/// let header = Header::new("x86_64", "GenuineIntel", (6, 0x8f, 8), 0);
/// let mut w = ImageWriter::new(std::io::BufWriter::new(out), &header)?;
/// w.write_state(Kind::VM, "machine", &("q35", 1u32))?;
/// w.write_state(Kind::VCPU, "0", &[0u64; 4])?;
/// w.write_memory(&[(0, &memory[..])], None, EncodeOptions::default())?;
/// let (_out, summary) = w.finish()?;
/// # Ok(()) }
/// ```
pub struct ImageWriter<W: Write> {
    out: Counting<W>,
    index: Index,
    write_index: bool,
    summary: WriteSummary,
    incremental: bool,
    /// Bytes of memory and disk written so far (stored or found clean),
    /// for a progress display.
    progress: Option<Arc<AtomicU64>>,
}

impl<W: Write> ImageWriter<W> {
    /// Writes the magic, the version and `header`.
    pub fn new(out: W, header: &Header) -> Result<Self, SnapshotError> {
        let body = encode_state("header", header)?;
        let mut w = ImageWriter {
            out: Counting { inner: out, pos: 0 },
            index: Index::default(),
            write_index: true,
            summary: WriteSummary::default(),
            incremental: header.is_incremental(),
            progress: None,
        };
        w.out.put(&MAGIC)?;
        w.out.put(&FORMAT_VERSION.to_le_bytes())?;
        w.out.put(&(body.len() as u32).to_le_bytes())?;
        w.out.put(&body)?;
        w.out.put(&crc32c::crc32c(&body).to_le_bytes())?;
        Ok(w)
    }

    /// Whether `finish` appends the index and footer (default: yes). The
    /// streaming reader reads past them, so an index is harmless on a pipe;
    /// turn it off only to save its few bytes per MiB when nobody will
    /// seek in the image.
    pub fn set_index(&mut self, on: bool) {
        self.write_index = on;
    }

    /// Writes one required section record: a reader that does not know
    /// `kind` refuses the image. Memory, disks and the end have their own
    /// methods; their kinds are refused here.
    pub fn write_section(
        &mut self,
        kind: Kind,
        name: &str,
        payload: &[u8],
    ) -> Result<(), SnapshotError> {
        check_user_kind(kind)?;
        self.write_record(kind, 0, name, &[payload], None)
    }

    /// Writes one optional section record: a reader that does not know
    /// `kind` skips it.
    pub fn write_optional_section(
        &mut self,
        kind: Kind,
        name: &str,
        payload: &[u8],
    ) -> Result<(), SnapshotError> {
        check_user_kind(kind)?;
        self.write_record(kind, section_flags::OPTIONAL, name, &[payload], None)
    }

    fn write_record(
        &mut self,
        kind: Kind,
        flags: u16,
        name: &str,
        parts: &[&[u8]],
        chunk: Option<(&str, ChunkRef)>,
    ) -> Result<(), SnapshotError> {
        if name.len() > MAX_NAME_LEN {
            return Err(SnapshotError::NameTooLong(name.to_string()));
        }
        let mut crc = crc32c::crc32c(name.as_bytes());
        let mut len = 0u64;
        for p in parts {
            crc = crc32c::crc32c_append(crc, p);
            len += <[u8]>::len(p) as u64;
        }
        if kind != Kind::CHUNK && len > MAX_STATE_LEN {
            return Err(SnapshotError::TooLarge {
                section: format!("{} '{name}'", kind.label()),
                len,
                limit: MAX_STATE_LEN,
            });
        }
        let h = SectionHeader {
            kind,
            flags,
            name_len: name.len() as u16,
            payload_len: len,
            crc,
        };
        if kind != Kind::INDEX {
            let (name, chunk) = match chunk {
                Some((owner, c)) => (owner, Some(c)),
                None => (name, None),
            };
            self.index.sections.push(IndexEntry {
                kind,
                name: name.to_string(),
                offset: self.out.pos,
                len: (SECTION_HEADER_LEN + h.name_len as usize) as u64 + len,
                chunk,
            });
        }
        self.out.put(&h.encode())?;
        self.out.put(name.as_bytes())?;
        for p in parts {
            self.out.put(p)?;
        }
        Ok(())
    }

    /// Counts into `done` the bytes of memory and disks written from now
    /// on, chunk by chunk as they are stored (or found zero or clean), so
    /// another thread can show how far the image has got.
    pub fn report_progress(&mut self, done: Arc<AtomicU64>) {
        self.progress = Some(done);
    }

    /// Writes a serde value (postcard) as a state section: VM (`Kind::VM`),
    /// vCPU (`Kind::VCPU`, named by its index) or device (`Kind::DEVICE`).
    pub fn write_state<T: Serialize + ?Sized>(
        &mut self,
        kind: Kind,
        name: &str,
        value: &T,
    ) -> Result<(), SnapshotError> {
        check_user_kind(kind)?;
        let payload = encode_state(name, value)?;
        self.write_record(kind, 0, name, &[&payload], None)
    }

    /// Writes guest memory: `regions` are (guest-physical address, bytes),
    /// page aligned. `dirty`, for an incremental image (and only for one),
    /// gives per region a bitmap of the pages to store: bit `p % 64` of word
    /// `p / 64` for page `p` of the region (KVM's dirty log format).
    pub fn write_memory(
        &mut self,
        regions: &[(u64, &[u8])],
        dirty: Option<&[Vec<u64>]>,
        opts: EncodeOptions,
    ) -> Result<ChunkStats, SnapshotError> {
        if dirty.is_some() != self.incremental {
            return Err(SnapshotError::Usage(
                "a dirty-page bitmap goes with an incremental header, and only with one",
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
        if layout.validate().is_err() {
            return Err(SnapshotError::Usage(
                "memory regions must be page aligned and must not overlap, and chunks hold 1 to 4096 pages",
            ));
        }
        if let Some(d) = dirty {
            if d.len() != regions.len() {
                return Err(SnapshotError::Usage("one dirty bitmap per memory region"));
            }
            for (bits, (_, data)) in d.iter().zip(regions) {
                if bits.len() < (<[u8]>::len(data) / PAGE_SIZE).div_ceil(64) {
                    return Err(SnapshotError::Usage(
                        "a dirty bitmap is shorter than its region",
                    ));
                }
            }
        }
        let payload = encode_state("memory", &layout)?;
        self.write_record(Kind::MEMORY, 0, "memory", &[&payload], None)?;
        let mut total = ChunkStats::default();
        for (ri, (addr, data)) in regions.iter().enumerate() {
            let bits = dirty.and_then(|d| d.get(ri)).map(|v| v.as_slice());
            total += self.write_chunks(Space::Memory, "memory", *addr, data, bits, opts)?;
        }
        self.summary.memory += total;
        log::debug!(
            "memory: {} pages, {} zero, {} bytes stored",
            total.pages,
            total.zero_pages,
            total.stored_bytes
        );
        Ok(total)
    }

    /// Writes a disk's contents (`source` of `source.len()` bytes). `name`
    /// says which disk; a reader gets it back in [`DiskInfo`].
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
        if info.validate().is_err() {
            return Err(SnapshotError::Usage("chunks hold 1 to 4096 pages"));
        }
        let payload = encode_state(name, &info)?;
        self.write_record(Kind::DISK, 0, name, &[&payload], None)?;
        let stats = self.write_chunks(Space::Disk, name, 0, source, None, opts)?;
        self.summary.disk += stats;
        Ok(stats)
    }

    /// Encodes `source` in chunks on [`workers`] and writes them in order
    /// from this thread, at most a few chunks per worker in flight (bounded
    /// memory for a 64 GiB guest), the writing overlapping the compressing.
    fn write_chunks(
        &mut self,
        space: Space,
        owner: &str,
        base: u64,
        source: &dyn PageSource,
        dirty: Option<&[u64]>,
        opts: EncodeOptions,
    ) -> Result<ChunkStats, SnapshotError> {
        if opts.chunk_pages == 0 || opts.chunk_pages > MAX_CHUNK_PAGES {
            return Err(SnapshotError::Usage("chunk size out of range"));
        }
        let chunk_bytes = u64::from(opts.chunk_pages) * PAGE_SIZE as u64;
        let len = source.len();
        if base.checked_add(len).is_none() {
            return Err(SnapshotError::Usage(
                "region wraps around the address space",
            ));
        }
        let nchunks = usize::try_from(len.div_ceil(chunk_bytes))
            .map_err(|_| SnapshotError::Usage("region too large"))?;
        let job = ChunkJob {
            space,
            base,
            source,
            dirty,
            chunk_bytes,
            len,
        };
        let threads = threads_or_cores(opts.threads).min(nchunks).max(1);
        let mut stats = ChunkStats::default();
        let mut next = 0;
        let progress = self.progress.clone();
        // Chunks handed out but not yet written: enough to keep every
        // worker busy while this thread writes, and a bound on memory.
        workers::map_in_order(
            threads,
            4 * threads,
            || Ok((Encoder::new(opts.compression)?, Vec::new())),
            || {
                next += 1;
                Ok((next <= nchunks).then_some(next - 1))
            },
            |(enc, buf), i| job.encode(i, enc, buf),
            |chunk: Option<EncodedChunk>| {
                if let Some(p) = &progress {
                    p.fetch_add(chunk_bytes, Ordering::Relaxed);
                }
                if let Some(c) = chunk {
                    let cref = (c.header.space, c.header.base, c.header.pages);
                    self.write_record(
                        Kind::CHUNK,
                        0,
                        "",
                        &[&c.head, &c.body],
                        Some((owner, cref)),
                    )?;
                    stats += c.stats;
                }
                Ok(())
            },
        )?;
        Ok(stats)
    }

    /// Writes END, the index and the footer, and flushes. Returns the
    /// destination, so the caller can fsync a file.
    pub fn finish(mut self) -> Result<(W, WriteSummary), SnapshotError> {
        let mut index = std::mem::take(&mut self.index);
        // END itself is in the index (written just below, one byte).
        index.sections.push(IndexEntry {
            kind: Kind::END,
            name: String::new(),
            offset: self.out.pos,
            len: SECTION_HEADER_LEN as u64 + 1,
            chunk: None,
        });
        let payload = if self.write_index {
            let p = encode_state("index", &index)?;
            if p.len() as u64 > MAX_STATE_LEN {
                // Millions of chunks: a reader would refuse this index, and
                // the image is complete without it.
                log::warn!("image index too large ({} bytes): not written", p.len());
                None
            } else {
                Some(p)
            }
        } else {
            None
        };
        let end = [if payload.is_some() { END_HAS_INDEX } else { 0 }];
        self.write_record(Kind::END, 0, "", &[&end], None)?;
        if let Some(p) = payload {
            let index_offset = self.out.pos;
            self.write_record(Kind::INDEX, section_flags::OPTIONAL, "", &[&p], None)?;
            self.out.put(&encode_footer(index_offset))?;
        }
        self.out.inner.flush().map_err(SnapshotError::Write)?;
        self.summary.bytes = self.out.pos;
        log::debug!("image written: {} bytes", self.out.pos);
        Ok((self.out.inner, self.summary))
    }
}

type ChunkRef = (Space, u64, u32);

/// Sections a caller may write directly: state, and kinds this build does
/// not know (for tests, and for a newer VMM's additions).
fn check_user_kind(kind: Kind) -> Result<(), SnapshotError> {
    match kind {
        Kind::MEMORY | Kind::DISK | Kind::CHUNK | Kind::END | Kind::INDEX => {
            Err(SnapshotError::Usage(
                "memory, disks, chunks, the end and the index have their own methods",
            ))
        }
        _ => Ok(()),
    }
}

/// One region or disk being cut into chunks.
struct ChunkJob<'a> {
    space: Space,
    base: u64,
    source: &'a dyn PageSource,
    dirty: Option<&'a [u64]>,
    chunk_bytes: u64,
    len: u64,
}

impl ChunkJob<'_> {
    /// Encodes chunk `i`; `None` for an incremental chunk with no page to
    /// store (it is left out of the image).
    fn encode(
        &self,
        i: usize,
        enc: &mut Encoder,
        buf: &mut Vec<u8>,
    ) -> Result<Option<EncodedChunk>, SnapshotError> {
        let off = i as u64 * self.chunk_bytes;
        let n = self.chunk_bytes.min(self.len - off) as usize;
        let first_page = off / PAGE_SIZE as u64;
        let page_dirty = |p: usize| -> bool {
            let page = first_page + p as u64;
            match self.dirty {
                None => true,
                Some(bits) => bits
                    .get((page / 64) as usize)
                    .is_some_and(|w| w & (1 << (page % 64)) != 0),
            }
        };
        if self.dirty.is_some() && !(0..n.div_ceil(PAGE_SIZE)).any(page_dirty) {
            return Ok(None);
        }
        let data = match self.source.slice(off, n) {
            Some(d) => d,
            None => {
                buf.resize(n, 0);
                self.source
                    .read_at(off, buf)
                    .map_err(SnapshotError::Source)?;
                &buf[..]
            }
        };
        enc.encode(self.space, self.base + off, data, &page_dirty)
            .map(Some)
    }
}
