//! The chunk apply pipeline: the chunks that follow a memory or disk
//! section, read and checksummed by the [`ImageReader`] on this thread,
//! decoded and written by [`workers`] into guest memory slices, a
//! [`PageSink`] or a disk file. Also [`decode_parallel`] for chunks already
//! read.

use std::io::Read;

use super::{ImageReader, Owner, RawChunk, Section};
use crate::error::SnapshotError;
use crate::format::{ChunkHeader, Space, PAGE_SIZE};
use crate::pages::{Chunk, ChunkStats, Decoder, Page};
use crate::workers::{self, threads_or_cores};

impl<R: Read> ImageReader<R> {
    /// Reads the memory chunks that follow a [`Section::Memory`] and writes
    /// them into `regions` ((guest-physical address, memory) pairs, e.g.
    /// the VM's mmap'd memory), decoding on `opts.threads` threads. Returns
    /// the counts and the section after the memory.
    ///
    /// Only pages with data are written, unless `opts.dest_is_zeroed` is
    /// false or the image is incremental: then zero pages are written too.
    /// Pages an incremental image does not hold are left as they are.
    pub fn read_memory_into(
        &mut self,
        regions: &mut [(u64, &mut [u8])],
        opts: ApplyOptions,
    ) -> Result<(ChunkStats, Section), SnapshotError> {
        let mut tails: Vec<(u64, &mut [u8])> =
            regions.iter_mut().map(|(a, m)| (*a, &mut m[..])).collect();
        self.apply_chunks(opts, Space::Memory, move |h| carve(&mut tails, h), &NoSink)
    }

    /// Like [`read_memory_into`](Self::read_memory_into), handing the pages
    /// to `sink` (for memory that is not a plain slice, e.g. behind
    /// vm-memory's `Bytes`). `sink` is called from several threads at once,
    /// with disjoint runs of whole pages.
    pub fn read_memory_with(
        &mut self,
        sink: &dyn PageSink,
        opts: ApplyOptions,
    ) -> Result<(ChunkStats, Section), SnapshotError> {
        self.apply_chunks(opts, Space::Memory, |_| Ok(None), sink)
    }

    /// Reads the chunks that follow a [`Section::Disk`] into `file`, sized to
    /// the disk first. Only pages with data are written (unless
    /// `opts.dest_is_zeroed` is false), so a new file stays sparse.
    pub fn read_disk_into(
        &mut self,
        file: &std::fs::File,
        opts: ApplyOptions,
    ) -> Result<(ChunkStats, Section), SnapshotError> {
        let Owner::Disk { info, .. } = &self.owner else {
            return Err(SnapshotError::Usage(
                "read_disk_into goes right after a disk section",
            ));
        };
        let size = info.size;
        file.set_len(size).map_err(SnapshotError::Source)?;
        let sink = FileSink { file, size };
        self.apply_chunks(opts, Space::Disk, |_| Ok(None), &sink)
    }

    /// The chunk pipeline: this thread reads and checksums records,
    /// [`workers`] decode and write. `carve` gives a chunk its own slice of
    /// the destination (or `None`: then the pages go to `sink`).
    fn apply_chunks<'d>(
        &mut self,
        opts: ApplyOptions,
        space: Space,
        mut carve: impl FnMut(&ChunkHeader) -> Result<Option<&'d mut [u8]>, String>,
        sink: &dyn PageSink,
    ) -> Result<(ChunkStats, Section), SnapshotError> {
        match (&self.owner, space) {
            (Owner::Memory { .. }, Space::Memory) | (Owner::Disk { .. }, Space::Disk) => {}
            _ => {
                return Err(SnapshotError::Usage(
                    "reading chunks goes right after their memory or disk section",
                ))
            }
        }
        let mut stats = ChunkStats::default();
        // An increment's zero pages replace its parent's data: always
        // written, whatever the caller says.
        let write_zeros = !opts.dest_is_zeroed || self.header.is_incremental();
        let threads = threads_or_cores(opts.threads);
        // This thread reads and checksums the records; the workers decode
        // and write. The section after the last chunk ends the jobs.
        let mut after = None;
        let jobs = || -> Result<Option<Work<'d>>, SnapshotError> {
            match self.next_section()? {
                Section::Chunk(c) => {
                    let dest = carve(&c.header).map_err(|reason| SnapshotError::Corrupt {
                        section: c.label.clone(),
                        reason,
                    })?;
                    let (zero, absent) = c.decode_bitmaps_only();
                    stats.pages += u64::from(c.header.pages) - absent;
                    stats.zero_pages += zero;
                    stats.stored_bytes += c.stored_len();
                    Ok(Some(Work { chunk: c, dest }))
                }
                other => {
                    after = Some(other);
                    Ok(None)
                }
            }
        };
        // Two chunks queued per worker besides the one it decodes.
        workers::for_each(
            threads,
            3 * threads,
            || Ok(Decoder::default()),
            jobs,
            |dec, w: Work<'d>| w.run(dec, sink, write_zeros),
        )?;
        let section = after.ok_or(SnapshotError::Usage("the chunks ended without a section"))?;
        Ok((finish_stats(stats), section))
    }
}

fn finish_stats(mut s: ChunkStats) -> ChunkStats {
    s.raw_bytes = (s.pages - s.zero_pages) * PAGE_SIZE as u64;
    s
}

/// Gives a chunk its part of the destination regions: `tails` holds, per
/// region, the part not yet handed out and its address. The reader checked
/// that chunks come in ascending order without overlap, so carving from
/// the front always works for a well-formed image.
fn carve<'d>(
    tails: &mut [(u64, &'d mut [u8])],
    h: &ChunkHeader,
) -> Result<Option<&'d mut [u8]>, String> {
    for (addr, tail) in tails.iter_mut() {
        let (Some(skip), Some(end)) = (h.base.checked_sub(*addr), h.base.checked_add(h.span()))
        else {
            continue;
        };
        let Ok(skip) = usize::try_from(skip) else {
            continue;
        };
        let span = h.span() as usize;
        if skip.checked_add(span).is_some_and(|e| e <= tail.len()) {
            let t = std::mem::take(tail);
            let (mine, rest) = t[skip..].split_at_mut(span);
            *tail = rest;
            *addr = end;
            return Ok(Some(mine));
        }
    }
    Err(format!(
        "chunk at guest {:#x} ({} pages) lies outside the memory given to restore into",
        h.base, h.pages
    ))
}

/// One chunk for a worker: the record and, with slices, its destination.
struct Work<'d> {
    chunk: RawChunk,
    dest: Option<&'d mut [u8]>,
}

impl Work<'_> {
    fn run(
        self,
        dec: &mut Decoder,
        sink: &dyn PageSink,
        write_zeros: bool,
    ) -> Result<(), SnapshotError> {
        if let Some(dest) = self.dest {
            return dec.decode_into(&self.chunk.payload, &self.chunk.label, dest, write_zeros);
        }
        let view = dec.decode(&self.chunk.payload, &self.chunk.label)?;
        let base = view.header.base;
        let io = |e: std::io::Error| SnapshotError::Sink {
            section: self.chunk.label.clone(),
            source: e,
        };
        for (i, page) in view.into_pages() {
            let addr = base + (i * PAGE_SIZE) as u64;
            match page {
                Page::Data(d) => sink.write_pages(addr, d).map_err(io)?,
                Page::Zero if write_zeros => {
                    sink.write_zeros(addr, PAGE_SIZE as u64).map_err(io)?
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// How decoded chunks are written.
#[derive(Clone, Copy, Debug)]
pub struct ApplyOptions {
    /// Decoding threads (0: one per core).
    pub threads: usize,
    /// The destination holds zeros (fresh guest memory, a new file): zero
    /// pages need not be written, which spares first-touch page faults.
    /// False when applying an increment on top of its parent.
    pub dest_is_zeroed: bool,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            threads: 0,
            dest_is_zeroed: true,
        }
    }
}

/// Where [`ImageReader::read_memory_with`] puts pages. Called from several
/// threads, with disjoint ranges.
pub trait PageSink: Sync {
    /// Writes `data` (whole pages) at `addr`.
    fn write_pages(&self, addr: u64, data: &[u8]) -> std::io::Result<()>;
    /// Writes `len` bytes of zeros at `addr` (only when the destination is
    /// not known to be zero).
    fn write_zeros(&self, addr: u64, len: u64) -> std::io::Result<()>;
}

struct NoSink;

impl PageSink for NoSink {
    fn write_pages(&self, _: u64, _: &[u8]) -> std::io::Result<()> {
        Err(std::io::Error::other("no destination"))
    }
    fn write_zeros(&self, _: u64, _: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("no destination"))
    }
}

/// A disk file, written with positional writes; the last page is cut at
/// the disk's size.
struct FileSink<'a> {
    file: &'a std::fs::File,
    size: u64,
}

impl PageSink for FileSink<'_> {
    fn write_pages(&self, addr: u64, data: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let n = self.size.saturating_sub(addr).min(data.len() as u64) as usize;
        self.file.write_all_at(&data[..n], addr)
    }
    fn write_zeros(&self, addr: u64, len: u64) -> std::io::Result<()> {
        let zeros = [0u8; PAGE_SIZE];
        let mut at = addr;
        let end = addr.saturating_add(len).min(self.size);
        while at < end {
            let n = (end - at).min(PAGE_SIZE as u64) as usize;
            self.write_pages(at, &zeros[..n])?;
            at += n as u64;
        }
        Ok(())
    }
}

/// Decodes `chunks` on `threads` threads (0: one per core) and hands each
/// decoded chunk to `apply`, which may run on any of them. Each thread
/// reuses one zstd context. [`ImageReader::read_memory_into`] and
/// [`ImageReader::read_memory_with`] do the same while streaming, without
/// batches and without copying decoded pages.
pub fn decode_parallel(
    chunks: &[RawChunk],
    threads: usize,
    apply: &(dyn Fn(&Chunk) -> Result<(), SnapshotError> + Sync),
) -> Result<(), SnapshotError> {
    let threads = threads_or_cores(threads).min(chunks.len()).max(1);
    let mut chunks = chunks.iter();
    workers::for_each(
        threads,
        2 * threads,
        || Ok(Decoder::default()),
        || Ok(chunks.next()),
        |dec, c: &RawChunk| apply(&dec.decode(c.payload(), c.label())?.to_owned_chunk()),
    )
}
