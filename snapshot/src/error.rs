//! [`SnapshotError`]: everything that can go wrong with an image.

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
