//! Consistent disks for a snapshot: sync and freeze the guest's writable
//! block-device filesystems (FIFREEZE), so what the disk holds is a clean
//! filesystem on its own, and thaw them after.

use std::ffi::CString;

use guest_abi::agent::Failure;

use crate::control::{lock, Agent};
use crate::sys;

/// Filesystems that can be frozen and live on a disk of the VM.
const FREEZABLE: &[&str] = &["ext4", "ext3", "ext2", "xfs", "btrfs", "f2fs"];

/// Undoes the octal escapes of /proc/self/mounts (`\040` for a space).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount points to freeze, in mount order, from /proc/self/mounts.
pub fn freezable(mounts: &str) -> Vec<String> {
    let mut points: Vec<String> = Vec::new();
    for line in mounts.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let [source, point, fstype, opts, ..] = f[..] else {
            continue;
        };
        let writable = opts.split(',').any(|o| o == "rw");
        if source.starts_with("/dev/") && writable && FREEZABLE.contains(&fstype) {
            let point = unescape(point);
            if !points.contains(&point) {
                points.push(point);
            }
        }
    }
    points
}

fn failure(point: &str, what: &str, e: std::io::Error) -> Failure {
    Failure {
        errno: e.raw_os_error().unwrap_or(libc::EIO),
        message: format!("cannot {what} {point}: {e}"),
    }
}

/// Freezes every writable disk filesystem; on a failure, thaws what it
/// froze. Returns the mount points frozen.
pub fn freeze(agent: &Agent) -> Result<Vec<String>, Failure> {
    let mut frozen = lock(&agent.frozen);
    if !frozen.is_empty() {
        return Ok(frozen.clone());
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .map_err(|e| failure("/proc/self/mounts", "read", e))?;
    for point in freezable(&mounts) {
        let Ok(c) = CString::new(point.as_bytes()) else {
            continue;
        };
        match sys::freeze_fs(&c) {
            Ok(()) => frozen.push(point),
            // Frozen by someone else: not ours to thaw.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => {
                let f = failure(&point, "freeze", e);
                thaw_list(&mut frozen);
                return Err(f);
            }
        }
    }
    Ok(frozen.clone())
}

/// Thaws what [`freeze`] froze, last first; returns the mount points.
pub fn thaw(agent: &Agent) -> Result<Vec<String>, Failure> {
    let mut frozen = lock(&agent.frozen);
    let points = frozen.clone();
    thaw_list(&mut frozen);
    Ok(points)
}

fn thaw_list(frozen: &mut Vec<String>) {
    while let Some(point) = frozen.pop() {
        if let Ok(c) = CString::new(point.as_bytes()) {
            // EINVAL: not frozen (thawed by someone else).
            if let Err(e) = sys::thaw_fs(&c) {
                if e.raw_os_error() != Some(libc::EINVAL) {
                    crate::init::say(format!("cannot thaw {point}: {e}"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_writable_disk_filesystems_are_frozen() {
        let mounts = "\
/dev/root / ext4 rw,relatime 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /tmp tmpfs rw,nosuid,nodev 0 0
/dev/vdb /mnt/data\\040disk xfs rw,relatime 0 0
/dev/vdc /ro ext4 ro,relatime 0 0
/dev/vdd /boot vfat rw 0 0
/dev/root / ext4 rw,relatime 0 0
";
        assert_eq!(freezable(mounts), ["/", "/mnt/data disk"]);
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("tail\\04"), "tail\\04");
    }
}
