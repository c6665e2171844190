//! `vmm inspect`: what an image holds, and (with verify) whether every
//! chunk decodes.

use std::io::Read;

use serde::Serialize;

use crate::error::SnapshotError;
use crate::format::{id_hex, Kind, FORMAT_VERSION, PAGE_SIZE};
use crate::pages::Decoder;
use crate::reader::{ImageReader, Section};

/// What [`inspect`] found; `Serialize` for `--json`, `Display` for people.
#[derive(Debug, Serialize)]
pub struct Report {
    pub format_version: u32,
    pub arch: String,
    pub cpu_vendor: String,
    /// (family, model, stepping).
    pub cpu_signature: (u32, u32, u32),
    pub image_id: String,
    pub parent_id: Option<String>,
    pub created_unix: u64,
    pub flags: u32,
    pub incremental: bool,
    /// The guest's filesystems were frozen by its agent when it was taken.
    pub quiesced: bool,
    /// Every section in order; memory and each disk count as one, with
    /// their chunks.
    pub sections: Vec<SectionReport>,
    pub memory: Option<DataReport>,
    pub disks: Vec<DataReport>,
    /// Bytes read, up to and including the index and footer.
    pub total_bytes: u64,
    /// The image carries an index (random access for lazy restore).
    pub indexed: bool,
    /// Every chunk was decompressed and its sizes checked.
    pub verified: bool,
}

/// One section.
#[derive(Debug, Serialize)]
pub struct SectionReport {
    pub kind: &'static str,
    pub name: String,
    /// Bytes it describes: the state's payload, or memory/disk pages.
    pub raw_bytes: u64,
    /// Bytes it takes in the image, record headers included.
    pub stored_bytes: u64,
}

/// Memory or one disk.
#[derive(Debug, Default, Serialize)]
pub struct DataReport {
    pub name: String,
    /// Size of the memory or disk.
    pub bytes: u64,
    pub compression: String,
    pub chunks: u64,
    /// Pages the image describes (all of them, except in an increment).
    pub pages: u64,
    pub zero_pages: u64,
    /// Share of described pages that are zero (not stored).
    pub zero_share: f64,
    /// Bytes of the non-zero pages.
    pub raw_bytes: u64,
    /// Bytes of the chunk records.
    pub stored_bytes: u64,
    /// Described bytes (`pages` × 4 KiB) / `stored_bytes`.
    pub ratio: f64,
}

impl DataReport {
    fn finish(&mut self) {
        if self.pages > 0 {
            self.zero_share = self.zero_pages as f64 / self.pages as f64;
        }
        self.raw_bytes = (self.pages - self.zero_pages) * PAGE_SIZE as u64;
        if self.stored_bytes > 0 {
            self.ratio = (self.pages * PAGE_SIZE as u64) as f64 / self.stored_bytes as f64;
        }
    }
}

/// Reads a whole image. Every section's checksum is always checked; with
/// `verify`, every chunk is also decompressed and its contents checked
/// against its bitmaps. The first problem is the error.
pub fn inspect<R: Read>(r: R, verify: bool) -> Result<Report, SnapshotError> {
    let mut reader = ImageReader::new(r)?;
    let h = reader.header().clone();
    let mut report = Report {
        format_version: FORMAT_VERSION,
        arch: h.arch.clone(),
        cpu_vendor: h.cpu_vendor.clone(),
        cpu_signature: h.cpu_signature,
        image_id: id_hex(&h.image_id),
        parent_id: h.parent_id.map(|p| id_hex(&p)),
        created_unix: h.created_unix,
        flags: h.flags,
        incremental: h.is_incremental(),
        quiesced: h.flags & crate::state::flags::QUIESCED != 0,
        sections: Vec::new(),
        memory: None,
        disks: Vec::new(),
        total_bytes: 0,
        indexed: false,
        verified: verify,
    };
    // The memory or disk whose chunks are being read.
    let mut current: Option<(bool, DataReport)> = None;
    let flush = |cur: &mut Option<(bool, DataReport)>, report: &mut Report| {
        if let Some((is_mem, mut d)) = cur.take() {
            d.finish();
            report.sections.push(SectionReport {
                kind: if is_mem { "memory" } else { "disk" },
                name: d.name.clone(),
                raw_bytes: d.pages * PAGE_SIZE as u64,
                stored_bytes: d.stored_bytes,
            });
            if is_mem {
                report.memory = Some(d);
            } else {
                report.disks.push(d);
            }
        }
    };
    let mut decoder = Decoder::default();
    loop {
        let before = reader.position();
        let section = reader.next_section()?;
        let stored = reader.position() - before;
        if !matches!(section, Section::Chunk(_)) {
            flush(&mut current, &mut report);
        }
        match section {
            Section::End => break,
            Section::State {
                kind,
                name,
                payload,
            } => report.sections.push(SectionReport {
                kind: kind.label(),
                name,
                raw_bytes: payload.len() as u64,
                stored_bytes: stored,
            }),
            Section::Memory(layout) => {
                current = Some((
                    true,
                    DataReport {
                        name: "memory".into(),
                        bytes: layout.total_bytes(),
                        compression: layout.compression.to_string(),
                        stored_bytes: stored,
                        ..Default::default()
                    },
                ));
            }
            Section::Disk(info) => {
                current = Some((
                    false,
                    DataReport {
                        name: info.name,
                        bytes: info.size,
                        compression: info.compression.to_string(),
                        stored_bytes: stored,
                        ..Default::default()
                    },
                ));
            }
            Section::Chunk(raw) => {
                // The reader refuses a chunk outside memory or a disk.
                let Some((_, d)) = current.as_mut() else {
                    return Err(SnapshotError::Usage("a chunk outside memory or a disk"));
                };
                d.chunks += 1;
                d.stored_bytes += stored;
                let (zero, absent) = raw.decode_bitmaps_only();
                d.pages += u64::from(raw.header.pages) - absent;
                d.zero_pages += zero;
                if verify {
                    decoder.decode(raw.payload(), raw.label())?;
                }
            }
            Section::Skipped { kind, len } => report.sections.push(SectionReport {
                kind: Kind(kind.0).label(),
                name: format!("kind {:#x}, optional, skipped", kind.0),
                raw_bytes: len,
                stored_bytes: stored,
            }),
        }
    }
    report.indexed = reader.index().is_some();
    report.total_bytes = reader.position();
    Ok(report)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "image        {}", self.image_id)?;
        writeln!(f, "format       version {}", self.format_version)?;
        writeln!(
            f,
            "host         {} {} family {:#x} model {:#x} stepping {}",
            self.arch,
            self.cpu_vendor,
            self.cpu_signature.0,
            self.cpu_signature.1,
            self.cpu_signature.2
        )?;
        let created = i64::try_from(self.created_unix)
            .ok()
            .and_then(|s| chrono::DateTime::from_timestamp(s, 0));
        match created {
            Some(t) => writeln!(f, "created      {}", t.format("%Y-%m-%d %H:%M:%S UTC"))?,
            None => writeln!(f, "created      {} (unix seconds)", self.created_unix)?,
        }
        match &self.parent_id {
            Some(p) => writeln!(f, "kind         incremental, parent {p}")?,
            None => writeln!(f, "kind         full")?,
        }
        writeln!(
            f,
            "disks        {}",
            if self.quiesced {
                "quiesced (the guest agent froze its filesystems)"
            } else {
                "not quiesced"
            }
        )?;
        writeln!(
            f,
            "size         {:.1} MiB{}",
            mib(self.total_bytes),
            if self.indexed {
                ", indexed"
            } else {
                ", no index"
            }
        )?;
        writeln!(
            f,
            "sections     {:<8} {:<20} {:>14} {:>14}",
            "kind", "name", "raw bytes", "stored bytes"
        )?;
        for s in &self.sections {
            writeln!(
                f,
                "             {:<8} {:<20} {:>14} {:>14}",
                s.kind, s.name, s.raw_bytes, s.stored_bytes
            )?;
        }
        for d in self.memory.iter().chain(&self.disks) {
            writeln!(
                f,
                "{:<12} {:.1} MiB, {} chunks ({}): {} pages, {:.1}% zero (not stored); \
                 stored {:.1} MiB, ratio {:.2}",
                d.name,
                mib(d.bytes),
                d.chunks,
                d.compression,
                d.pages,
                d.zero_share * 100.0,
                mib(d.stored_bytes),
                d.ratio
            )?;
        }
        if self.verified {
            writeln!(f, "verified     every checksum, every chunk decoded")?;
        }
        Ok(())
    }
}
