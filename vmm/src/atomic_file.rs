//! A file that appears at its destination whole or not at all: written
//! to a temporary file next to it, fsynced, renamed over it, and the
//! directory fsynced. Until then an earlier file at the destination is
//! untouched; a failure removes the temporary file.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum AtomicFileError {
    #[error("cannot create {path}")]
    Create {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make {path} durable")]
    Sync {
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
    pub fn create(dest: &Path) -> Result<(Self, File), AtomicFileError> {
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into());
        let dir = dest.parent().filter(|p| !p.as_os_str().is_empty());
        let tmp = dir
            .unwrap_or(Path::new("."))
            .join(format!(".{name}.tmp.{}", std::process::id()));
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|source| AtomicFileError::Create {
                path: tmp.display().to_string(),
                source,
            })?;
        Ok((
            AtomicFile {
                tmp,
                dest: dest.to_path_buf(),
                done: false,
            },
            f,
        ))
    }

    /// fsync, rename over the destination, fsync the directory.
    pub fn commit(mut self, f: File) -> Result<(), AtomicFileError> {
        let sync_err = |path: &Path| {
            let path = path.display().to_string();
            move |source| AtomicFileError::Sync { path, source }
        };
        f.sync_all().map_err(sync_err(&self.tmp))?;
        drop(f);
        std::fs::rename(&self.tmp, &self.dest).map_err(sync_err(&self.dest))?;
        self.done = true;
        let dir = self
            .dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(sync_err(dir))?;
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
