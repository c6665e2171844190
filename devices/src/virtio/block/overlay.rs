//! A copy-on-write view of a disk image (`--ephemeral`): the guest reads
//! the base image, its writes go to a private sparse file, and the base is
//! never written. The view ends with the VM, or is saved as the written
//! blocks alone (a warm image refers to its base instead of holding it).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// The unit of copy-on-write: a guest filesystem block, one host page.
pub const BLOCK: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("cannot size the overlay file")]
    Size(#[source] io::Error),
    #[error("written blocks {start}..{end} lie outside a disk of {blocks} blocks")]
    OutOfRange { start: u64, end: u64, blocks: u64 },
}

/// A base image and the blocks the guest wrote over it.
pub struct Overlay {
    base: File,
    upper: File,
    len: u64,
    /// One bit per [`BLOCK`] whose current contents are in `upper`.
    written: Vec<u64>,
}

impl Overlay {
    /// A fresh view of `base` (`len` bytes) over `upper`, an empty file
    /// of the caller's (usually unlinked) that takes the guest's writes.
    pub fn new(base: File, len: u64, upper: File) -> Result<Self, OverlayError> {
        upper.set_len(len).map_err(OverlayError::Size)?;
        let words = len.div_ceil(BLOCK).div_ceil(64);
        Ok(Overlay {
            base,
            upper,
            len,
            written: vec![0; words as usize],
        })
    }

    /// A view whose `upper` already holds the blocks in `extents` (start
    /// block, count), as [`Overlay::written_extents`] listed them.
    pub fn with_written(
        base: File,
        len: u64,
        upper: File,
        extents: &[(u64, u64)],
    ) -> Result<Self, OverlayError> {
        let mut o = Self::new(base, len, upper)?;
        let blocks = len.div_ceil(BLOCK);
        for &(start, count) in extents {
            let end = start.saturating_add(count);
            if end > blocks {
                return Err(OverlayError::OutOfRange { start, end, blocks });
            }
            for b in start..end {
                o.mark(b);
            }
        }
        Ok(o)
    }

    /// The disk's size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The image the view is based on.
    pub fn base(&self) -> &File {
        &self.base
    }

    /// Another handle on the same files and a copy of the written set: a
    /// consistent view for as long as the device is not written (the VM is
    /// paused), as a snapshot needs.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Overlay {
            base: self.base.try_clone()?,
            upper: self.upper.try_clone()?,
            len: self.len,
            written: self.written.clone(),
        })
    }

    fn is_written(&self, block: u64) -> bool {
        self.written[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    fn mark(&mut self, block: u64) {
        self.written[(block / 64) as usize] |= 1 << (block % 64);
    }

    /// Runs of written blocks: (first block, count), in order.
    pub fn written_extents(&self) -> Vec<(u64, u64)> {
        let blocks = self.len.div_ceil(BLOCK);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for b in (0..blocks).filter(|&b| self.is_written(b)) {
            match out.last_mut() {
                Some((start, count)) if *start + *count == b => *count += 1,
                _ => out.push((b, 1)),
            }
        }
        out
    }

    fn check(&self, off: u64, n: usize) -> io::Result<u64> {
        off.checked_add(n as u64)
            .filter(|&end| end <= self.len)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))
    }

    /// Reads what the guest sees at `off`: each run of blocks from the file
    /// that holds it.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.read_runs(buf, off, false)
    }

    /// Reads the written blocks at `off`, zeros for the others, without
    /// touching the base or the upper file's holes (a warm image saves only
    /// what the guest wrote).
    pub fn read_written_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.read_runs(buf, off, true)
    }

    fn read_runs(&self, buf: &mut [u8], off: u64, written_only: bool) -> io::Result<()> {
        let end = self.check(off, buf.len())?;
        let mut pos = off;
        while pos < end {
            let upper = self.is_written(pos / BLOCK);
            let mut run_end = (pos / BLOCK + 1) * BLOCK;
            while run_end < end && self.is_written(run_end / BLOCK) == upper {
                run_end += BLOCK;
            }
            let run_end = run_end.min(end);
            let at = (pos - off) as usize;
            let dest = &mut buf[at..(run_end - off) as usize];
            match (upper, written_only) {
                (true, _) => self.upper.read_exact_at(dest, pos)?,
                (false, false) => self.base.read_exact_at(dest, pos)?,
                (false, true) => dest.fill(0),
            }
            pos = run_end;
        }
        Ok(())
    }

    /// Writes `buf` at `off` into the overlay. A block written for the first
    /// time in part gets the rest of its bytes from the base first.
    pub fn write_at(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        let end = self.check(off, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let first = off / BLOCK;
        let last = (end - 1) / BLOCK;
        for b in [first, last] {
            let (start, stop) = (b * BLOCK, ((b + 1) * BLOCK).min(self.len));
            let partial = off > start || end < stop;
            if partial && !self.is_written(b) {
                let mut block = vec![0u8; (stop - start) as usize];
                self.base.read_exact_at(&mut block, start)?;
                self.upper.write_all_at(&block, start)?;
                self.mark(b);
            }
        }
        self.upper.write_all_at(buf, off)?;
        for b in first..=last {
            self.mark(b);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempfile::TempFile;

    /// A base of `blocks` blocks, block n filled with byte n + 1.
    fn base(blocks: u8) -> TempFile {
        let t = TempFile::new().unwrap();
        for n in 0..blocks {
            t.as_file()
                .write_all_at(&[n + 1; BLOCK as usize], u64::from(n) * BLOCK)
                .unwrap();
        }
        t
    }

    fn overlay(base: &TempFile) -> (Overlay, TempFile) {
        let upper = TempFile::new().unwrap();
        let len = base.as_file().metadata().unwrap().len();
        let o = Overlay::new(
            base.as_file().try_clone().unwrap(),
            len,
            upper.as_file().try_clone().unwrap(),
        )
        .unwrap();
        (o, upper)
    }

    fn contents(b: &TempFile) -> Vec<u8> {
        std::fs::read(b.as_path()).unwrap()
    }

    #[test]
    fn reads_the_base_until_written_and_never_changes_it() {
        let b = base(4);
        let before = contents(&b);
        let (mut o, _upper) = overlay(&b);
        let mut buf = vec![0u8; 3 * BLOCK as usize];
        o.read_at(&mut buf, BLOCK).unwrap();
        assert_eq!(&buf[..], &before[BLOCK as usize..4 * BLOCK as usize]);

        // Straddles blocks 1 and 2, covering neither whole.
        o.write_at(&[0xee; 100], 2 * BLOCK - 50).unwrap();
        let mut expect = before.clone();
        expect[(2 * BLOCK - 50) as usize..(2 * BLOCK + 50) as usize].fill(0xee);
        let mut all = vec![0u8; before.len()];
        o.read_at(&mut all, 0).unwrap();
        assert_eq!(
            all, expect,
            "partial blocks keep the rest of the base's bytes"
        );
        assert_eq!(contents(&b), before, "the base is untouched");
        assert_eq!(o.written_extents(), vec![(1, 2)]);
        let mut written = vec![0xffu8; before.len()];
        o.read_written_at(&mut written, 0).unwrap();
        assert!(
            written[..BLOCK as usize].iter().all(|&x| x == 0),
            "unwritten: zeros"
        );
        assert_eq!(
            &written[BLOCK as usize..3 * BLOCK as usize],
            &expect[BLOCK as usize..3 * BLOCK as usize],
            "written blocks as the guest sees them"
        );
        assert!(written[3 * BLOCK as usize..].iter().all(|&x| x == 0));
    }

    #[test]
    fn a_zero_write_hides_the_base_and_survives_a_reopen() {
        let b = base(3);
        let (mut o, upper) = overlay(&b);
        o.write_at(&[0; BLOCK as usize], 2 * BLOCK).unwrap();
        o.write_at(&[9; 10], 0).unwrap();
        let extents = o.written_extents();
        assert_eq!(extents, vec![(0, 1), (2, 1)]);
        let reopened = Overlay::with_written(
            b.as_file().try_clone().unwrap(),
            3 * BLOCK,
            upper.as_file().try_clone().unwrap(),
            &extents,
        )
        .unwrap();
        let mut buf = vec![1u8; BLOCK as usize];
        reopened.read_at(&mut buf, 2 * BLOCK).unwrap();
        assert!(
            buf.iter().all(|&x| x == 0),
            "written zeros, not the base's 3s"
        );
        reopened.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..11], &[9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 1]);
    }

    #[test]
    fn out_of_range_is_refused() {
        let b = base(2);
        let (mut o, upper) = overlay(&b);
        assert!(o.write_at(&[1; 2], 2 * BLOCK - 1).is_err());
        assert!(o.read_at(&mut [0; 1], 2 * BLOCK).is_err());
        let e = Overlay::with_written(
            b.as_file().try_clone().unwrap(),
            2 * BLOCK,
            upper.as_file().try_clone().unwrap(),
            &[(1, 2)],
        );
        assert!(matches!(e, Err(OverlayError::OutOfRange { .. })));
    }

    #[test]
    fn a_disk_of_odd_size_has_a_short_last_block() {
        let t = TempFile::new().unwrap();
        t.as_file().write_all_at(&[5; 1536], 0).unwrap();
        let upper = TempFile::new().unwrap();
        let mut o = Overlay::new(
            t.as_file().try_clone().unwrap(),
            1536,
            upper.as_file().try_clone().unwrap(),
        )
        .unwrap();
        o.write_at(&[6; 512], 512).unwrap();
        let mut buf = [0u8; 1536];
        o.read_at(&mut buf, 0).unwrap();
        assert!(buf[..512].iter().all(|&x| x == 5));
        assert!(buf[512..1024].iter().all(|&x| x == 6));
        assert!(buf[1024..].iter().all(|&x| x == 5));
    }
}
