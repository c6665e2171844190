//! `vmm inspect`: what an image holds, and (with verify) whether every
//! chunk decodes.

use std::io::Read;

use serde::Serialize;

use crate::format::{id_hex, Kind};
use crate::pages::Page;
use crate::reader::{ImageReader, Section};
use crate::SnapshotError;

#[derive(Debug, Serialize)]
pub struct Report {
    pub format_version: u32,
    pub arch: String,
    pub cpu_vendor: String,
    pub cpu_signature: (u32, u32, u32),
    pub image_id: String,
    pub parent_id: Option<String>,
    pub created_unix: u64,
    pub incremental: bool,
    pub sections: Vec<SectionReport>,
    pub memory: Option<DataReport>,
    pub disks: Vec<DataReport>,
    pub total_bytes: u64,
    pub verified: bool,
}

#[derive(Debug, Serialize)]
pub struct SectionReport {
    pub kind: &'static str,
    pub name: String,
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
    /// Pages the image describes.
    pub pages: u64,
    pub zero_pages: u64,
    /// Share of described pages that are zero (not stored).
    pub zero_share: f64,
    /// Bytes of the chunk records.
    pub stored_bytes: u64,
    /// `bytes` / `stored_bytes`.
    pub ratio: f64,
}

impl DataReport {
    fn finish(&mut self) {
        if self.pages > 0 {
            self.zero_share = self.zero_pages as f64 / self.pages as f64;
        }
        if self.stored_bytes > 0 {
            self.ratio = self.bytes as f64 / self.stored_bytes as f64;
        }
    }
}

/// Reads a whole image. With `verify`, decodes every chunk too (the
/// checksums are always checked).
pub fn inspect<R: Read>(r: R, verify: bool) -> Result<Report, SnapshotError> {
    let mut reader = ImageReader::new(r)?;
    let h = reader.header().clone();
    let mut report = Report {
        format_version: crate::FORMAT_VERSION,
        arch: h.arch.clone(),
        cpu_vendor: h.cpu_vendor.clone(),
        cpu_signature: h.cpu_signature,
        image_id: id_hex(&h.image_id),
        parent_id: h.parent_id.map(|p| id_hex(&p)),
        created_unix: h.created_unix,
        incremental: h.flags & crate::flags::INCREMENTAL != 0,
        sections: Vec::new(),
        memory: None,
        disks: Vec::new(),
        total_bytes: 0,
        verified: verify,
    };
    // Which data the chunks belong to: None before any MEMORY/DISK.
    let mut current: Option<DataReport> = None;
    let mut in_memory = false;
    let flush = |cur: &mut Option<DataReport>, mem: bool, report: &mut Report| {
        if let Some(mut d) = cur.take() {
            d.finish();
            if mem {
                report.memory = Some(d);
            } else {
                report.disks.push(d);
            }
        }
    };
    loop {
        let before = reader.position();
        match reader.next_section()? {
            Section::End => break,
            Section::State { kind, name, .. } => report.sections.push(SectionReport {
                kind: kind.label(),
                name,
                stored_bytes: reader.position() - before,
            }),
            Section::Memory(layout) => {
                flush(&mut current, in_memory, &mut report);
                in_memory = true;
                current = Some(DataReport {
                    name: "memory".into(),
                    bytes: layout.regions.iter().map(|r| r.1).sum(),
                    compression: layout.compression.to_string(),
                    ..Default::default()
                });
            }
            Section::Disk(info) => {
                flush(&mut current, in_memory, &mut report);
                in_memory = false;
                current = Some(DataReport {
                    name: info.name,
                    bytes: info.size,
                    compression: info.compression.to_string(),
                    ..Default::default()
                });
            }
            Section::Chunk(raw) => {
                let Some(d) = current.as_mut() else {
                    return Err(SnapshotError::Corrupt {
                        section: format!("chunk at offset {before}"),
                        reason: "a chunk before any memory or disk section".into(),
                    });
                };
                d.chunks += 1;
                d.stored_bytes += reader.position() - before;
                if verify {
                    let c = raw.decode()?;
                    for (_, p) in c.pages() {
                        match p {
                            Page::Absent => {}
                            Page::Zero => {
                                d.pages += 1;
                                d.zero_pages += 1;
                            }
                            Page::Data(_) => d.pages += 1,
                        }
                    }
                } else {
                    // Without decoding, count from the bitmaps' sizes.
                    d.pages += u64::from(raw.header.pages);
                    let c = raw.decode_bitmaps_only();
                    d.zero_pages += c.0;
                    d.pages -= c.1;
                }
            }
            Section::Skipped { kind, len } => report.sections.push(SectionReport {
                kind: Kind(kind.0).label(),
                name: format!("kind {:#x}, {len} bytes, skipped", kind.0),
                stored_bytes: reader.position() - before,
            }),
        }
    }
    flush(&mut current, in_memory, &mut report);
    report.total_bytes = reader.position();
    Ok(report)
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
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
        writeln!(f, "created      {} (unix seconds)", self.created_unix)?;
        match &self.parent_id {
            Some(p) => writeln!(f, "kind         incremental, parent {p}")?,
            None => writeln!(f, "kind         full")?,
        }
        writeln!(f, "size         {:.1} MiB", mib(self.total_bytes))?;
        writeln!(f, "sections")?;
        for s in &self.sections {
            writeln!(
                f,
                "  {:<8} {:<24} {:>10} bytes",
                s.kind, s.name, s.stored_bytes
            )?;
        }
        for d in self.memory.iter().chain(&self.disks) {
            writeln!(
                f,
                "{:<12} {:.1} MiB in {} chunks ({}): {} pages described, {:.1}% zero; stored {:.1} MiB, ratio {:.2}",
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
            writeln!(f, "verified     every checksum and every chunk")?;
        }
        Ok(())
    }
}
