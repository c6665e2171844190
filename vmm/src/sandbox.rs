//! Least privilege on the file system: once the VMM has opened what its
//! configuration names (kernel, rootfs, disks, the image it restores, TAPs,
//! the vsock socket), it confines itself with Landlock, as Cloud Hypervisor
//! does, to what it still needs: writing images into the snapshot
//! directory (`--snapshot-dir`) and the warm-start cache, its sockets'
//! directories, and reading /proc and /sys. Nothing else may be opened,
//! created or removed, and nothing executed: a VMM taken over through a
//! device or the API can neither read the host's secrets nor write over the
//! user's files. A snapshot to another path is refused before the VM
//! pauses; `vmm snapshot --out PATH` then writes the file itself from the
//! VMM's stream.
//!
//! Landlock confines the thread that asks and the threads it starts after,
//! and checks files when they are opened, so the VMM enforces the rules on
//! its main thread after opening its files and before starting any other
//! thread ([`Sandbox::enforce`] in `Machine::boot` and `Machine::restore`).
//! `vmm run|restore --no-landlock` runs unconfined; a host kernel without
//! Landlock gets a one-line note and runs unconfined too.
//!
//! The rights handled are those of Landlock ABI 5 (Linux 6.10): a newer
//! kernel's further rights are left alone, an older one's missing ones are
//! dropped (best effort), and the note says which.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use landlock::{
    Access, AccessFs, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, ABI,
};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot confine the VMM with Landlock (--no-landlock runs it unconfined)")]
    Landlock(#[source] landlock::RulesetError),
}

/// What the VMM may do at a path (and, for a directory, beneath it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allow {
    /// Open files for reading, list directories.
    Read,
    /// Open files for reading and writing (a disk, /dev/kvm).
    ReadWrite,
    /// A directory the VMM writes images into: create, write, rename and
    /// remove regular files (atomic writes, stale temporary files).
    Images,
    /// A directory the VMM serves a socket from: create and remove sockets.
    Sockets,
}

impl Allow {
    fn rights(self, abi: ABI) -> BitFlags<AccessFs> {
        let read = AccessFs::ReadFile | AccessFs::ReadDir;
        match self {
            Allow::Read => read,
            Allow::ReadWrite => {
                read | AccessFs::WriteFile | AccessFs::Truncate | AccessFs::IoctlDev
            }
            Allow::Images => {
                read | AccessFs::WriteFile
                    | AccessFs::Truncate
                    | AccessFs::MakeReg
                    | AccessFs::RemoveFile
                    | AccessFs::Refer
            }
            Allow::Sockets => AccessFs::MakeSock | AccessFs::RemoveFile,
        }
        .intersection_c(AccessFs::from_all(abi))
    }
}

/// The paths the VMM may use, with what it may do there.
#[derive(Clone, Debug)]
pub struct Sandbox {
    enabled: bool,
    rules: Vec<(PathBuf, Allow)>,
}

/// The ABI whose rights are handled (see the module's doc).
const ABI_HANDLED: ABI = ABI::V5;

/// The directories the enforced rules let the VMM write images into, once
/// enforced: a snapshot elsewhere is refused with their list.
static CONFINED: OnceLock<Vec<PathBuf>> = OnceLock::new();

impl Sandbox {
    /// The rules every VMM needs: /dev/null and /dev/urandom, /proc and
    /// /sys (the C library and the Rust runtime read them: CPU counts,
    /// memory, cgroups; the stale temporary files of a dead writer are
    /// recognized by its pid).
    pub fn new(enabled: bool) -> Self {
        let mut s = Sandbox {
            enabled,
            rules: Vec::new(),
        };
        s.allow("/dev/null", Allow::ReadWrite);
        for p in ["/dev/urandom", "/proc", "/sys"] {
            s.allow(p, Allow::Read);
        }
        s
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Adds a rule; a path that does not exist (yet) is skipped at
    /// enforcement.
    pub fn allow(&mut self, path: impl Into<PathBuf>, allow: Allow) {
        self.rules.push((path.into(), allow));
    }

    /// The directory a file will be created in (`path`'s parent; `.` for a
    /// bare name).
    pub fn allow_parent(&mut self, path: &Path, allow: Allow) {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        self.allow(dir, allow);
    }

    /// Confines the calling thread and the threads it starts from now on.
    /// Enforcing twice (a failed warm start that then boots) stacks the
    /// same rules again, which changes nothing.
    pub fn enforce(&self) -> Result<(), SandboxError> {
        if !self.enabled {
            return Ok(());
        }
        let err = SandboxError::Landlock;
        let mut ruleset = Ruleset::default()
            .handle_access(AccessFs::from_all(ABI_HANDLED))
            .map_err(err)?
            .create()
            .map_err(err)?;
        let mut images = Vec::new();
        for (path, allow) in &self.rules {
            // A missing path (no TAP device, a socket directory not made)
            // is nothing to allow.
            let Ok(fd) = PathFd::new(path) else {
                log::debug!("landlock: {} does not exist; no rule", path.display());
                continue;
            };
            let mut rights = allow.rights(ABI_HANDLED);
            if !path.is_dir() {
                rights &= AccessFs::from_file(ABI_HANDLED);
            }
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd, rights))
                .map_err(err)?;
            if *allow == Allow::Images {
                images.push(std::fs::canonicalize(path).unwrap_or_else(|_| path.clone()));
            }
        }
        let status = ruleset.restrict_self().map_err(err)?;
        match status.ruleset {
            RulesetStatus::FullyEnforced => {
                log::info!("landlock: file access confined to {} paths", self.rules.len())
            }
            RulesetStatus::PartiallyEnforced => log::warn!(
                "landlock: this host kernel supports only part of the file-access rules; the VMM is partly confined"
            ),
            RulesetStatus::NotEnforced => {
                log::warn!("landlock: not available on this host kernel; file access is not confined");
                return Ok(());
            }
        }
        let _ = CONFINED.set(images);
        Ok(())
    }
}

/// When Landlock confines this VMM: the directories it may write images
/// into.
pub fn image_dirs() -> Option<&'static [PathBuf]> {
    CONFINED.get().map(Vec::as_slice)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn denied<T: std::fmt::Debug>(r: std::io::Result<T>) {
        assert_eq!(
            r.as_ref().err().and_then(std::io::Error::raw_os_error),
            Some(libc::EACCES),
            "{r:?}"
        );
    }

    /// On a thread of its own: reads and writes where the rules allow,
    /// EACCES elsewhere, and nothing can be executed.
    #[test]
    fn the_rules_allow_what_they_name_and_nothing_else() {
        let base = std::env::temp_dir().join(format!("vmm-sandbox-test-{}", std::process::id()));
        let (images, other) = (base.join("images"), base.join("other"));
        std::fs::create_dir_all(&images).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        let disk = other.join("disk.img");
        let secret = other.join("secret");
        std::fs::write(&disk, b"disk").unwrap();
        std::fs::write(&secret, b"secret").unwrap();
        let (images2, disk2, secret2, other2) =
            (images.clone(), disk.clone(), secret.clone(), other.clone());
        std::thread::spawn(move || {
            let mut s = Sandbox::new(true);
            s.allow(&images2, Allow::Images);
            s.allow(&disk2, Allow::ReadWrite);
            s.allow("/nonexistent/skipped", Allow::Read);
            s.enforce().unwrap();
            assert_eq!(image_dirs().map(<[_]>::len), Some(1));
            // Allowed: an image written, renamed and removed in its
            // directory; the disk read and written.
            let tmp = images2.join(".x.tmp");
            std::fs::File::create(&tmp)
                .unwrap()
                .write_all(b"image")
                .unwrap();
            std::fs::rename(&tmp, images2.join("x.img")).unwrap();
            std::fs::remove_file(images2.join("x.img")).unwrap();
            let mut d = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&disk2)
                .unwrap();
            d.write_all(b"DISK").unwrap();
            // Denied: a file beside the disk, creating one there, listing
            // its directory, the host's files, running a program.
            denied(std::fs::read(&secret2));
            denied(std::fs::File::create(other2.join("new")));
            denied(std::fs::read_dir(&other2));
            denied(std::fs::read("/etc/hostname"));
            denied(std::process::Command::new("/bin/true").status());
            denied(crate::device_manager::scratch_file(&other2));
            // Allowed by the defaults: /proc.
            assert!(std::fs::read_to_string("/proc/self/status").is_ok());
        })
        .join()
        .unwrap();
        assert_eq!(std::fs::read(&disk).unwrap(), b"DISK");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
