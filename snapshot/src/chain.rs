//! Chains of images: a full image and the increments on top of it, each
//! naming its parent by id. Checks that a chain is one, and applies the
//! parents' memory under the top image's.

use std::io::Read;

use crate::error::SnapshotError;
use crate::format::id_hex;
use crate::pages::ChunkStats;
use crate::reader::apply::ApplyOptions;
use crate::reader::ImageReader;
use crate::state::Header;

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

/// Checks that `images` (headers, base first) form a chain: the first is a
/// full image and each next one is an increment on top of the one before.
pub fn check_chain(images: &[&Header]) -> Result<(), SnapshotError> {
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
