//! Copy-before-write for a disk being read by another process: a
//! snapshot's writer, forked while the VM was paused, reads the disk while
//! the VM runs on and writes it. Before the device first writes a block,
//! it copies what the block held into a log; the reader takes each block
//! from the log if it is there, from the disk otherwise, and so sees the
//! disk as it was at the fork.
//!
//! The log is a file both processes hold (a memfd): one flag byte per
//! block, then the blocks' old contents at their own offsets. The device
//! writes a block's contents before its flag and its flag before the new
//! data reaches the disk; the reader reads the disk first and the flags
//! after, so a block it read while (or after) it was rewritten is always
//! flagged and taken from the log.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// The unit of copying.
pub const BLOCK: u64 = 4096;

/// The most a log holds: past it, blocks are flagged lost and the image
/// fails, rather than the VMM's memory growing with the guest's writes.
pub const MAX_KEPT: u64 = 1 << 30;

/// A block's flag: not copied (the disk still holds it as it was).
const UNTOUCHED: u8 = 0;
/// Copied: the log holds what the block was.
const KEPT: u8 = 1;
/// Written over though its old contents could not be kept.
const LOST: u8 = 2;

/// The device's side: copies blocks before their first write.
pub struct PreWriteLog {
    log: File,
    disk_size: u64,
    /// One bit per block: already copied (or lost).
    done: Vec<u64>,
    /// Blocks copied.
    kept: u64,
}

impl PreWriteLog {
    /// A log in `log` (an empty file both processes hold) for a disk of
    /// `disk_size` bytes.
    pub fn new(log: File, disk_size: u64) -> io::Result<Self> {
        log.set_len(data_start(disk_size) + disk_size)?;
        // The flags are written now, so that setting one later needs no
        // memory (a flag that could not be set would be a block silently
        // taken as it is now).
        let flags = vec![UNTOUCHED; disk_size.div_ceil(BLOCK) as usize];
        log.write_all_at(&flags, 0)?;
        let blocks = disk_size.div_ceil(BLOCK);
        Ok(PreWriteLog {
            log,
            disk_size,
            done: vec![0; blocks.div_ceil(64) as usize],
            kept: 0,
        })
    }

    /// How many blocks were copied.
    pub fn kept(&self) -> u64 {
        self.kept
    }

    /// Keeps every block of `[off, off + len)` not kept yet, reading
    /// them with `read` (the disk as the guest sees it). A block that
    /// cannot be kept (or past [`MAX_KEPT`]) is flagged lost, and the
    /// reader fails; the guest's write goes ahead. Fails only if a flag
    /// cannot be set: then the write must not happen.
    pub fn before_write(
        &mut self,
        off: u64,
        len: u64,
        read: impl Fn(&mut [u8], u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let end = (off + len).min(self.disk_size);
        let mut buf = vec![0u8; BLOCK as usize];
        let mut block = off / BLOCK;
        while block * BLOCK < end {
            let (word, bit) = ((block / 64) as usize, 1u64 << (block % 64));
            if self.done[word] & bit == 0 {
                let start = block * BLOCK;
                let n = BLOCK.min(self.disk_size - start) as usize;
                let kept = if self.kept * BLOCK >= MAX_KEPT {
                    Err(io::Error::other("the log is full"))
                } else {
                    read(&mut buf[..n], start).and_then(|()| {
                        self.log
                            .write_all_at(&buf[..n], data_start(self.disk_size) + start)
                    })
                };
                let flag = if kept.is_ok() { KEPT } else { LOST };
                if let Err(e) = kept {
                    log::warn!(
                        "virtio-blk: cannot keep block {block} for a snapshot being written: {e}"
                    );
                }
                // Handled once flagged: a block whose flag could not be
                // set is tried again by the next write to it.
                self.log.write_all_at(&[flag], block)?;
                self.done[word] |= bit;
                self.kept += u64::from(flag == KEPT);
            }
            block += 1;
        }
        Ok(())
    }
}

/// Where the blocks' contents start in a log: past the flags, aligned.
fn data_start(disk_size: u64) -> u64 {
    disk_size.div_ceil(BLOCK).div_ceil(BLOCK) * BLOCK
}

/// The reader's side: replaces, in `buf` just read from byte `off` of a
/// disk of `disk_size` bytes, every block the log holds.
pub fn patch_from_log(log: &File, disk_size: u64, off: u64, buf: &mut [u8]) -> io::Result<()> {
    let end = off + buf.len() as u64;
    let (first, last) = (off / BLOCK, end.div_ceil(BLOCK));
    let mut flags = vec![0u8; (last - first) as usize];
    log.read_exact_at(&mut flags, first)?;
    for (i, &flag) in flags.iter().enumerate() {
        let block = first + i as u64;
        match flag {
            UNTOUCHED => continue,
            KEPT => {}
            _ => {
                return Err(io::Error::other(format!(
                    "the VM overwrote block {block} while the image was written and its old contents could not be kept (--full-pause avoids this)"
                )))
            }
        }
        let from = (block * BLOCK).max(off);
        let to = ((block + 1) * BLOCK).min(end).min(disk_size);
        let at = (from - off) as usize..(to - off) as usize;
        log.read_exact_at(&mut buf[at], data_start(disk_size) + from)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty file, gone once closed.
    fn tmp() -> File {
        let t = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let f = t.as_file().try_clone().unwrap();
        drop(t);
        f
    }

    #[test]
    fn a_reader_sees_the_disk_as_it_was_before_the_writes() {
        // A disk of 3.5 blocks: the last one is short.
        let size = 3 * BLOCK + 2048;
        let disk = tmp();
        let old: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        disk.write_all_at(&old, 0).unwrap();
        let log = tmp();
        let mut pre = PreWriteLog::new(log.try_clone().unwrap(), size).unwrap();
        let read = |buf: &mut [u8], off: u64| disk.read_exact_at(buf, off);
        // Writes across blocks 1..2 and into the short last block, twice.
        for _ in 0..2 {
            for (off, len) in [(BLOCK + 100, BLOCK), (3 * BLOCK + 10, 100)] {
                pre.before_write(off, len, read).unwrap();
                disk.write_all_at(&vec![0xEE; len as usize], off).unwrap();
            }
        }
        // Read back whole and in odd pieces: always the old contents.
        let mut whole = vec![0u8; size as usize];
        disk.read_exact_at(&mut whole, 0).unwrap();
        assert_ne!(whole, old);
        patch_from_log(&log, size, 0, &mut whole).unwrap();
        assert_eq!(whole, old);
        let mut piece = vec![0u8; 5000];
        disk.read_exact_at(&mut piece, 3000).unwrap();
        patch_from_log(&log, size, 3000, &mut piece).unwrap();
        assert_eq!(piece, old[3000..8000]);
    }

    #[test]
    fn a_block_that_could_not_be_kept_fails_the_reader() {
        let size = 4 * BLOCK;
        let log = tmp();
        let mut pre = PreWriteLog::new(log.try_clone().unwrap(), size).unwrap();
        pre.before_write(BLOCK, 10, |_, _| Err(io::Error::other("gone")))
            .unwrap();
        let mut buf = vec![0u8; size as usize];
        let e = patch_from_log(&log, size, 0, &mut buf).unwrap_err();
        assert!(e.to_string().contains("block 1"), "{e}");
        // Blocks beside it read fine.
        let mut other = vec![0u8; BLOCK as usize];
        patch_from_log(&log, size, 2 * BLOCK, &mut other).unwrap();
    }
}
