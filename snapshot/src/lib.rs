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
//!
//! The modules, each with one job; each uses only those listed above it,
//! so there is no import circle (this root only re-exports):
//!
//! - `error`: [`SnapshotError`].
//! - [`format`](mod@format): the byte layout: constants and limits,
//!   section kinds and address spaces, the fixed-size records (section
//!   header, chunk header, footer) and their encoding.
//! - [`state`]: the serde payload types ([`Header`], [`MemoryLayout`],
//!   [`DiskInfo`], [`Index`], [`Compression`]), pinned by a golden test.
//! - `state_codec`: the one codec for serde state (postcard, errors mapped):
//!   [`decode_state`], [`encode_state`].
//! - `workers`: the one pool of worker threads, each with its own zstd
//!   context, that every parallel path uses.
//! - [`pages`]: encoding and decoding one chunk (zero pages, bitmaps, zstd).
//! - `framing`: reading the framed parts (file header, one section record,
//!   footer) with lengths bounded and checksums checked.
//! - [`writer`]: [`ImageWriter`], streaming an image out.
//! - [`reader`]: [`ImageReader`], reading an image front to back;
//!   `reader::apply` is the chunk apply pipeline ([`ApplyOptions`],
//!   [`PageSink`], [`decode_parallel`]).
//! - `index`: random access through the index ([`open_index`],
//!   [`read_index`], [`read_chunk_at`], [`read_memory_chunk`]; for a lazy
//!   restore, [`memory_chunks`] and [`read_chunk_record`]).
//! - `chain`: incremental chains ([`check_chain`], [`apply_parents`]).
//! - [`inspect`]: what an image holds, for `vmm inspect`.

mod chain;
mod error;
pub mod format;
mod framing;
mod index;
pub mod inspect;
pub mod pages;
pub mod reader;
pub mod state;
mod state_codec;
mod workers;
pub mod writer;

pub use chain::{apply_parents, check_chain};
pub use error::SnapshotError;
pub use format::{id_hex, new_image_id, section_flags, Kind, Space, FORMAT_VERSION, PAGE_SIZE};
pub use index::{
    memory_chunks, open_index, read_chunk_at, read_chunk_record, read_index, read_memory_chunk,
    ChunkLocation, MemoryChunks,
};
pub use pages::{Chunk, ChunkStats, Decoder, Page};
pub use reader::apply::{decode_parallel, ApplyOptions, PageSink};
pub use reader::{ImageReader, RawChunk, Section};
pub use state::{flags, Compression, DiskInfo, Header, Index, IndexEntry, MemoryLayout};
pub use state_codec::{decode_state, encode_state};
pub use writer::{EncodeOptions, FileSource, ImageWriter, PageSource, WriteSummary};
