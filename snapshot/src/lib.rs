//! The checkpoint image format: a streaming, checksummed, compressed image
//! of a whole VM. No KVM in here: the VMM hands in serde state structs,
//! guest memory as byte slices and disks as files.
//!
//! An image is a header and a sequence of typed, length-prefixed,
//! crc32c-checked sections, ending with END, an index and a footer. The
//! writer never seeks, so an image can go through a pipe; the index lets a
//! reader with a seekable file jump to any section or memory chunk. Memory
//! and disks are stored per 4 KiB page in chunks: zero pages are recorded,
//! not stored; the rest is compressed with zstd, on all cores, each chunk
//! on its own. See FORMAT.md for the byte layout.
//!
//! Writing: [`ImageWriter::new`], then [`ImageWriter::write_state`] for the
//! VM, each vCPU and each device, [`ImageWriter::write_memory`],
//! [`ImageWriter::write_disk`], and [`ImageWriter::finish`]. Reading:
//! [`ImageReader::new`], then [`ImageReader::next_section`] (or
//! [`ImageReader::read_state`]) until [`Section::Memory`], then
//! [`ImageReader::read_memory_into`], then [`ImageReader::read_disk_into`]
//! for each [`Section::Disk`], until [`Section::End`].

pub mod format;
pub mod inspect;
pub mod pages;
pub mod reader;
pub mod state;
pub mod writer;

pub use format::{
    flags, id_hex, new_image_id, section_flags, Compression, DiskInfo, Header, Index, IndexEntry,
    Kind, MemoryLayout, Space, FORMAT_VERSION, PAGE_SIZE,
};
pub use pages::{Chunk, ChunkStats, Page};
pub use reader::{
    apply_parents, check_chain, decode_state, open_index, read_chunk_at, read_index,
    read_memory_chunk, ApplyOptions, ImageReader, PageSink, RawChunk, Section,
};
pub use writer::{EncodeOptions, FileSource, ImageWriter, PageSource, WriteSummary};

/// Everything that can go wrong with an image, worded for the user.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a vmm snapshot image (bad magic)")]
    NotAnImage,
    #[error(
        "image format version {found} is not supported (this build reads version {supported})"
    )]
    Version { found: u32, supported: u32 },
    #[error("image is truncated in {section} (expected {expected} bytes, got {got})")]
    Truncated {
        section: String,
        expected: u64,
        got: u64,
    },
    #[error("{section} declares {len} bytes, more than the {limit} this build accepts: the image is corrupt")]
    TooLarge {
        section: String,
        len: u64,
        limit: u64,
    },
    #[error("cannot write the restored pages of {section}: {source}")]
    Sink {
        section: String,
        source: std::io::Error,
    },
    #[error("checksum mismatch in {section}: the image is corrupt")]
    Checksum { section: String },
    #[error("corrupt image: {section}: {reason}")]
    Corrupt { section: String, reason: String },
    #[error("image has a required section of kind {kind:#x} ('{name}') that this build does not know; it was written by a newer vmm")]
    UnknownRequired { kind: u16, name: String },
    #[error("image ends without its end marker (it was cut short)")]
    NoEnd,
    #[error("unknown compression '{0}' (use none, zstd or zstd:LEVEL with LEVEL 1 to 19)")]
    BadCompression(String),
    #[error("cannot write the image: {0}")]
    Write(std::io::Error),
    #[error("cannot read the image: {0}")]
    Read(std::io::Error),
    #[error("cannot read the data to save: {0}")]
    Source(std::io::Error),
    #[error("cannot serialize {0}: {1}")]
    Serialize(String, String),
    #[error("compression failed: {0}")]
    Compress(String),
    #[error("section name '{0}' is longer than 255 bytes")]
    NameTooLong(String),
    #[error("incremental image {image} has parent {expected}, but the image before it in the chain is {found}")]
    ParentMismatch {
        image: String,
        expected: String,
        found: String,
    },
    #[error("the chain starts with an incremental image: its parent {parent} is missing")]
    ParentMissing { parent: String },
    #[error("internal misuse of the image writer: {0}")]
    Usage(&'static str),
}

impl SnapshotError {
    fn serialize(what: &str) -> impl FnOnce(postcard::Error) -> SnapshotError + '_ {
        move |e| SnapshotError::Serialize(what.to_string(), e.to_string())
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
    let threads = writer::threads_or_cores(threads).min(chunks.len()).max(1);
    let run = |t: usize| -> Result<(), SnapshotError> {
        let mut dec = pages::Decoder::default();
        for c in chunks.iter().skip(t).step_by(threads) {
            apply(&dec.decode(c.payload(), c.label())?.to_owned_chunk())?;
        }
        Ok(())
    };
    if threads == 1 {
        return run(0);
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|t| s.spawn(move || run(t))).collect();
        for h in handles {
            h.join()
                .map_err(|_| SnapshotError::Usage("a decoding thread panicked"))??;
        }
        Ok(())
    })
}
