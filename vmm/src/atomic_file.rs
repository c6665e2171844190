//! A file that appears at its destination whole or not at all: written
//! to a temporary file next to it, fsynced, renamed over it, and the
//! directory fsynced. Until then an earlier file at the destination is
//! untouched; a failure removes the temporary file.
//!
//! Only a regular file (or nothing) is ever replaced: a directory, a device
//! node, a socket or a dangling link at the destination is refused before
//! anything is written, and a symbolic link to a regular file is followed,
//! so the link stays and its target gets the new contents.
//!
//! The temporary file is `.NAME.tmp.PID`, locked (`flock`) while its writer
//! lives. A writer killed midway leaves it behind; the next write to the
//! same destination removes it once its lock is free and its PID is gone.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum AtomicFileError {
    #[error("{path} is {what}, not a regular file: refusing to replace it")]
    NotRegular { path: String, what: &'static str },
    #[error("{path} is a symbolic link to nothing: refusing to replace it")]
    DanglingLink { path: String },
    #[error("cannot look at {path}")]
    Inspect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create {path}")]
    Create {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path} to disk")]
    Sync {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot put the finished file at {path}")]
    Rename {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A temporary file next to `dest`, renamed over it once complete.
pub struct AtomicFile {
    tmp: PathBuf,
    dest: PathBuf,
    done: bool,
}

impl AtomicFile {
    /// Checks that `dest` may be replaced, removes stale temporary files of
    /// earlier writers to it, and creates (and locks) this writer's own.
    pub fn create(dest: &Path) -> Result<(Self, File), AtomicFileError> {
        let dest = replaceable(dest)?;
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into());
        let dir = parent(&dest).to_path_buf();
        let prefix = format!(".{name}.tmp.");
        remove_stale(&dir, &prefix);
        let tmp = dir.join(format!("{prefix}{}", std::process::id()));
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|source| AtomicFileError::Create {
                path: tmp.display().to_string(),
                source,
            })?;
        // Nobody else knows the file yet: the lock is free.
        if let Err(e) = f.try_lock() {
            log::warn!("cannot lock {}: {e}", tmp.display());
        }
        Ok((
            AtomicFile {
                tmp,
                dest,
                done: false,
            },
            f,
        ))
    }

    /// Where the file will be (a symbolic link's target, if `dest` was one).
    pub fn destination(&self) -> &Path {
        &self.dest
    }

    /// fsync, rename over the destination, fsync the directory.
    pub fn commit(mut self, f: File) -> Result<(), AtomicFileError> {
        let sync_err = |path: &Path| {
            let path = path.display().to_string();
            move |source| AtomicFileError::Sync { path, source }
        };
        f.sync_all().map_err(sync_err(&self.tmp))?;
        std::fs::rename(&self.tmp, &self.dest).map_err(|source| AtomicFileError::Rename {
            path: self.dest.display().to_string(),
            source,
        })?;
        // The lock goes with the file, once it is in place.
        drop(f);
        self.done = true;
        let dir = parent(&self.dest);
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(sync_err(dir))?;
        Ok(())
    }
}

impl AtomicFile {
    /// Leaves the temporary file to another process that writes it (a
    /// forked copy of this one holding the same file): dropping this
    /// handle no longer removes it. Its path, to clean up after a writer
    /// that died.
    pub fn disown(mut self) -> PathBuf {
        self.done = true;
        std::mem::take(&mut self.tmp)
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// The path to write: `dest` itself if nothing or a regular file is there,
/// the target of a symbolic link to a regular file; an error otherwise.
fn replaceable(dest: &Path) -> Result<PathBuf, AtomicFileError> {
    use std::os::unix::fs::FileTypeExt;
    let path = || dest.display().to_string();
    let inspect = |source| AtomicFileError::Inspect {
        path: path(),
        source,
    };
    let link = match std::fs::symlink_metadata(dest) {
        Ok(m) => m.file_type().is_symlink(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(dest.to_path_buf()),
        Err(e) => return Err(inspect(e)),
    };
    let meta = match std::fs::metadata(dest) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(AtomicFileError::DanglingLink { path: path() })
        }
        Err(e) => return Err(inspect(e)),
    };
    let t = meta.file_type();
    let what = if t.is_file() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_block_device() || t.is_char_device() {
        Some("a device")
    } else if t.is_socket() {
        Some("a socket")
    } else if t.is_fifo() {
        Some("a named pipe")
    } else {
        Some("a special file")
    };
    if let Some(what) = what {
        return Err(AtomicFileError::NotRegular { path: path(), what });
    }
    if link {
        std::fs::canonicalize(dest).map_err(inspect)
    } else {
        Ok(dest.to_path_buf())
    }
}

/// Removes the temporary files in `dir` named `prefix` + a PID whose writer
/// is gone: its lock is free and no process has that PID. A live writer's
/// file (locked) and one whose PID lives again (it may be a writer that has
/// not locked yet) are left alone.
fn remove_stale(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let path = entry.path();
        let Ok(f) = OpenOptions::new().write(true).open(&path) else {
            continue;
        };
        if f.try_lock().is_ok() {
            match std::fs::remove_file(&path) {
                Ok(()) => log::info!(
                    "removed {}, left by a writer that died midway",
                    path.display()
                ),
                Err(e) => log::warn!("cannot remove stale {}: {e}", path.display()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileTypeExt;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-atomic-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn write(dest: &Path, text: &str) -> Result<(), AtomicFileError> {
        let (a, mut f) = AtomicFile::create(dest)?;
        f.write_all(text.as_bytes()).unwrap();
        a.commit(f)
    }

    #[test]
    fn replaces_a_regular_file_and_leaves_no_temporary_file() {
        let d = scratch("regular");
        let dest = d.join("img");
        std::fs::write(&dest, "old").unwrap();
        write(&dest, "new").unwrap();
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "new");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
    }

    #[test]
    fn refuses_what_is_not_a_regular_file() {
        let d = scratch("special");
        let e = write(&d, "x").unwrap_err();
        assert!(
            e.to_string()
                .ends_with("is a directory, not a regular file: refusing to replace it"),
            "{e}"
        );
        let e = write(Path::new("/dev/null"), "x").unwrap_err();
        assert!(
            matches!(
                e,
                AtomicFileError::NotRegular {
                    what: "a device",
                    ..
                }
            ),
            "{e}"
        );
        assert!(std::fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device());
        let dangling = d.join("dangling");
        std::os::unix::fs::symlink(d.join("nothing"), &dangling).unwrap();
        assert!(matches!(
            write(&dangling, "x"),
            Err(AtomicFileError::DanglingLink { .. })
        ));
        assert!(std::fs::symlink_metadata(&dangling).is_ok());
    }

    #[test]
    fn a_link_to_a_file_keeps_the_link_and_updates_its_target() {
        let d = scratch("link");
        let target = d.join("img-1");
        std::fs::write(&target, "old").unwrap();
        let link = d.join("latest");
        std::os::unix::fs::symlink("img-1", &link).unwrap();
        write(&link, "new").unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
    }

    #[test]
    fn a_dead_writers_temporary_file_is_removed_a_live_ones_kept() {
        let d = scratch("stale");
        let dest = d.join("img");
        // No PID reaches PID_MAX_LIMIT (2^22); nothing holds the lock.
        let dead = d.join(".img.tmp.4194304");
        std::fs::write(&dead, "partial").unwrap();
        // A live writer: our own PID's parent, holding the lock.
        let live = d.join(format!(".img.tmp.{}", std::os::unix::process::parent_id()));
        let held = File::create(&live).unwrap();
        held.try_lock().unwrap();
        let other = d.join(".other.tmp.4194304");
        std::fs::write(&other, "not ours").unwrap();
        write(&dest, "new").unwrap();
        assert!(!dead.exists(), "a dead writer's file stays");
        assert!(live.exists(), "a live writer's file went");
        assert!(other.exists(), "another destination's file went");
    }
}
