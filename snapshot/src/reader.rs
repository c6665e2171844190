//! Reads an image from any `Read`, front to back; with `Seek`, also by index.

use std::io::{Read, Seek, SeekFrom};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};

use serde::de::DeserializeOwned;

use crate::format::{
    crc_matches, decode_footer, ChunkHeader, DiskInfo, Header, Index, Kind, MemoryLayout,
    SectionHeader, Space, CHUNK_HEADER_LEN, END_HAS_INDEX, FILE_HEADER_LEN, FOOTER_LEN,
    FORMAT_VERSION, MAGIC, MAX_CHUNK_PAGES, MAX_STATE_LEN, PAGE_SIZE, SECTION_HEADER_LEN,
};
use crate::pages::{decode_chunk, Chunk, ChunkStats, Decoder};
use crate::writer::threads_or_cores;
use crate::SnapshotError;

/// Largest chunk record: header, two bitmaps, and zstd's worst case for the
/// largest chunk's data.
pub fn max_chunk_payload() -> u64 {
    let data = MAX_CHUNK_PAGES as usize * PAGE_SIZE;
    (CHUNK_HEADER_LEN
        + 2 * (MAX_CHUNK_PAGES as usize).div_ceil(8)
        + zstd::zstd_safe::compress_bound(data)) as u64
}

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
            match (crate::pages::bit(present, i), crate::pages::bit(data, i)) {
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

/// Decodes a state payload (postcard); `name` is for the error message.
pub fn decode_state<T: DeserializeOwned>(name: &str, payload: &[u8]) -> Result<T, SnapshotError> {
    postcard::from_bytes(payload).map_err(|e| SnapshotError::Corrupt {
        section: name.to_string(),
        reason: format!("cannot decode its state ({e}); was it written by another build?"),
    })
}

/// Reads `buf.len()` bytes or reports where the image ends.
fn read_exact_or_truncated<R: Read + ?Sized>(
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

/// Reads a `len`-byte payload (already checked against its limit). The
/// buffer grows with the bytes that arrive, so a lying length on a short
/// input costs no more than the input.
fn read_payload<R: Read + ?Sized>(
    r: &mut R,
    len: u64,
    section: &str,
) -> Result<Vec<u8>, SnapshotError> {
    let mut buf = Vec::with_capacity(len.min(max_chunk_payload()) as usize);
    let got = r
        .take(len)
        .read_to_end(&mut buf)
        .map_err(SnapshotError::Read)? as u64;
    if got != len {
        return Err(SnapshotError::Truncated {
            section: section.to_string(),
            expected: len,
            got,
        });
    }
    Ok(buf)
}

/// Reads the magic, version and header; returns them and the bytes read.
fn read_header<R: Read + ?Sized>(r: &mut R) -> Result<(Header, u64), SnapshotError> {
    let mut fixed = [0u8; FILE_HEADER_LEN];
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
        return Err(SnapshotError::TooLarge {
            section: "header".into(),
            len: len.into(),
            limit: MAX_STATE_LEN,
        });
    }
    let body = read_payload(r, u64::from(len) + 4, "header")?;
    let (body, crc) = body.split_at(len as usize);
    if !crc_matches(
        crc32c::crc32c(body),
        u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]),
    ) {
        return Err(SnapshotError::Checksum {
            section: "header".into(),
        });
    }
    let header = decode_state("header", body)?;
    Ok((header, FILE_HEADER_LEN as u64 + u64::from(len) + 4))
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
        let (header, pos) = read_header(&mut r)?;
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
        let after = format!("the section after {}", self.last_label);
        let mut hb = [0u8; SECTION_HEADER_LEN];
        read_exact_or_truncated(&mut self.r, &mut hb, &after)?;
        let h = SectionHeader::decode(&hb).ok_or_else(|| SnapshotError::Checksum {
            section: format!("{after} (its record header, at offset {start})"),
        })?;
        self.seen += 1;
        let mut name = vec![0u8; usize::from(h.name_len)];
        read_exact_or_truncated(&mut self.r, &mut name, &after)?;
        let name = String::from_utf8(name).map_err(|_| SnapshotError::Corrupt {
            section: after.clone(),
            reason: "section name is not UTF-8".into(),
        })?;
        let mut label = match h.kind {
            Kind::CHUNK => format!("chunk #{} at offset {start}", self.seen),
            k if name.is_empty() => k.label().to_string(),
            k => format!("{} '{name}'", k.label()),
        };
        self.pos += SECTION_HEADER_LEN as u64 + u64::from(h.name_len);
        if !h.kind.is_known() || h.kind == Kind::INDEX {
            if !h.is_optional() {
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
                    section: format!("unknown section of kind {:#x} '{name}'", h.kind.0),
                    expected: h.payload_len,
                    got: copied,
                });
            }
            self.pos += h.payload_len;
            self.last_label = format!("unknown section of kind {:#x}", h.kind.0);
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
            return Err(SnapshotError::TooLarge {
                section: label,
                len: h.payload_len,
                limit,
            });
        }
        let payload = read_payload(&mut self.r, h.payload_len, &label)?;
        if h.kind == Kind::CHUNK {
            // Name the chunk by what it holds. On a checksum mismatch the
            // header itself is unverified, but a flipped bit most likely
            // lies in the data, and the offset is given too.
            if let Some(ch) = ChunkHeader::decode(&payload) {
                label = self.chunk_label(&ch, start);
            }
        }
        let crc = crc32c::crc32c_append(crc32c::crc32c(name.as_bytes()), &payload);
        if !crc_matches(crc, h.crc) {
            return Err(SnapshotError::Checksum { section: label });
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

    /// Reads and checks the INDEX record and the footer after END.
    fn read_trailer(&mut self) -> Result<(), SnapshotError> {
        let offset = self.pos;
        let mut hb = [0u8; SECTION_HEADER_LEN];
        read_exact_or_truncated(&mut self.r, &mut hb, "index")?;
        let h = SectionHeader::decode(&hb).ok_or(SnapshotError::Checksum {
            section: "index (its record header)".into(),
        })?;
        if h.kind != Kind::INDEX || h.name_len != 0 {
            return Err(SnapshotError::Corrupt {
                section: "index".into(),
                reason: "the end marker announces an index, but none follows".into(),
            });
        }
        if h.payload_len > MAX_STATE_LEN {
            return Err(SnapshotError::TooLarge {
                section: "index".into(),
                len: h.payload_len,
                limit: MAX_STATE_LEN,
            });
        }
        let payload = read_payload(&mut self.r, h.payload_len, "index")?;
        if !crc_matches(crc32c::crc32c(&payload), h.crc) {
            return Err(SnapshotError::Checksum {
                section: "index".into(),
            });
        }
        let index = decode_state("index", &payload)?;
        let mut f = [0u8; FOOTER_LEN];
        read_exact_or_truncated(&mut self.r, &mut f, "footer")?;
        if decode_footer(&f) != Some(offset) {
            return Err(SnapshotError::Corrupt {
                section: "footer".into(),
                reason: "the footer is damaged or does not point at the index".into(),
            });
        }
        self.pos += SECTION_HEADER_LEN as u64 + h.payload_len + FOOTER_LEN as u64;
        self.index = Some(index);
        Ok(())
    }

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

    /// The chunk pipeline: this thread reads and checksums records, the
    /// workers decode and write. `carve` gives a chunk its own slice of
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
        let mut next = |me: &mut Self,
                        stats: &mut ChunkStats|
         -> Result<Result<Work<'d>, Section>, SnapshotError> {
            match me.next_section()? {
                Section::Chunk(c) => {
                    let dest = carve(&c.header).map_err(|reason| SnapshotError::Corrupt {
                        section: c.label.clone(),
                        reason,
                    })?;
                    let (zero, absent) = c.decode_bitmaps_only();
                    stats.pages += u64::from(c.header.pages) - absent;
                    stats.zero_pages += zero;
                    stats.stored_bytes += c.stored_len();
                    Ok(Ok(Work { chunk: c, dest }))
                }
                other => Ok(Err(other)),
            }
        };
        if threads <= 1 {
            let mut dec = Decoder::default();
            loop {
                match next(self, &mut stats)? {
                    Ok(w) => w.run(&mut dec, sink, write_zeros)?,
                    Err(section) => return Ok((finish_stats(stats), section)),
                }
            }
        }
        let (tx, rx) = mpsc::sync_channel::<Work<'d>>(threads * 2);
        let rx = Mutex::new(rx);
        let failed = AtomicBool::new(false);
        let first_error: Mutex<Option<SnapshotError>> = Mutex::new(None);
        let outcome = std::thread::scope(|s| {
            for _ in 0..threads {
                let (rx, failed, first_error) = (&rx, &failed, &first_error);
                s.spawn(move || {
                    let mut dec = Decoder::default();
                    loop {
                        let work = match rx.lock() {
                            Ok(g) => g.recv(),
                            Err(p) => p.into_inner().recv(),
                        };
                        let Ok(work) = work else { return };
                        if let Err(e) = work.run(&mut dec, sink, write_zeros) {
                            failed.store(true, Ordering::Relaxed);
                            let mut g = first_error.lock().unwrap_or_else(|p| p.into_inner());
                            g.get_or_insert(e);
                            return;
                        }
                    }
                });
            }
            let r = loop {
                if failed.load(Ordering::Relaxed) {
                    break Ok(None);
                }
                match next(self, &mut stats) {
                    Ok(Ok(w)) => {
                        if tx.send(w).is_err() {
                            break Ok(None);
                        }
                    }
                    Ok(Err(section)) => break Ok(Some(section)),
                    Err(e) => break Err(e),
                }
            };
            drop(tx);
            r
        });
        if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        match outcome? {
            Some(section) => Ok((finish_stats(stats), section)),
            None => Err(SnapshotError::Usage("a decoding thread stopped")),
        }
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
                crate::Page::Data(d) => sink.write_pages(addr, d).map_err(io)?,
                crate::Page::Zero if write_zeros => {
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

/// Applies the memory of the parents of an incremental image, base first,
/// into `regions`, after checking that they form a chain ending in `top`
/// (each image's parent is the one before it). Then read `top`'s own
/// memory with `dest_is_zeroed: false`.
pub fn apply_parents<R: Read>(
    parents: Vec<R>,
    top: &Header,
    regions: &mut [(u64, &mut [u8])],
    opts: ApplyOptions,
) -> Result<ChunkStats, SnapshotError> {
    let mut readers = parents
        .into_iter()
        .map(ImageReader::new)
        .collect::<Result<Vec<_>, _>>()?;
    let mut chain: Vec<&Header> = readers.iter().map(|r| r.header()).collect();
    chain.push(top);
    check_chain(&chain)?;
    let mut total = ChunkStats::default();
    for (i, r) in readers.iter_mut().enumerate() {
        r.skip_to_memory()?;
        let o = ApplyOptions {
            dest_is_zeroed: i == 0 && opts.dest_is_zeroed,
            ..opts
        };
        total += r.read_memory_into(regions, o)?.0;
    }
    Ok(total)
}

/// Reads the header and the index of an image in a seekable file.
pub fn open_index<R: Read + Seek>(r: &mut R) -> Result<(Header, Index), SnapshotError> {
    r.seek(SeekFrom::Start(0)).map_err(SnapshotError::Read)?;
    let (header, _) = read_header(r)?;
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
    let mut f = [0u8; FOOTER_LEN];
    read_exact_or_truncated(r, &mut f, "footer")?;
    let offset = decode_footer(&f).ok_or_else(|| SnapshotError::Corrupt {
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
    let payload = read_payload(r, h.payload_len, "index")?;
    if !crc_matches(crc32c::crc32c(&payload), h.crc) {
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
    let label = format!("chunk at image offset {offset}");
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
    let payload = read_payload(r, h.payload_len, &label)?;
    if !crc_matches(crc32c::crc32c(&payload), h.crc) {
        return Err(SnapshotError::Checksum { section: label });
    }
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

/// Checks that `images` (headers, base first) form a chain: the first is a
/// full image and each next one is an increment on top of the one before.
pub fn check_chain(images: &[&Header]) -> Result<(), SnapshotError> {
    use crate::format::id_hex;
    let Some(base) = images.first() else {
        return Err(SnapshotError::Usage("an empty image chain"));
    };
    if base.is_incremental() {
        return Err(SnapshotError::ParentMissing {
            parent: base.parent_id.map(|p| id_hex(&p)).unwrap_or_default(),
        });
    }
    for w in images.windows(2) {
        let (parent, child) = (w[0], w[1]);
        if !child.is_incremental() || child.parent_id != Some(parent.image_id) {
            return Err(SnapshotError::ParentMismatch {
                image: id_hex(&child.image_id),
                expected: child
                    .parent_id
                    .map_or("none (it is a full image)".into(), |p| id_hex(&p)),
                found: id_hex(&parent.image_id),
            });
        }
    }
    Ok(())
}
