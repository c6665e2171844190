//! Finds the default guest that `resources/build-guest.sh` builds.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("no default guest {what} at {path}: build it with resources/build-guest.sh, or pass --kernel and --rootfs")]
    Missing { what: &'static str, path: String },
}

fn env(k: &str) -> Option<PathBuf> {
    std::env::var_os(k)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The project's cache: `$VMM_CACHE_DIR`, else `$XDG_CACHE_HOME/vmm`,
/// else `~/.cache/vmm`.
pub fn cache_dir() -> PathBuf {
    env("VMM_CACHE_DIR").unwrap_or_else(|| {
        env("XDG_CACHE_HOME")
            .or_else(|| env("HOME").map(|h| h.join(".cache")))
            .unwrap_or_else(|| PathBuf::from("/var/cache"))
            .join("vmm")
    })
}

/// The directory build-guest.sh writes to; the same rules as the script.
pub fn default_guest_dir() -> PathBuf {
    env("VMM_GUEST_DIR").unwrap_or_else(|| cache_dir().join("guest"))
}

/// The default guest's kernel.
pub fn default_kernel() -> Result<PathBuf, GuestError> {
    find("kernel", "vmlinux")
}

/// The default guest's root filesystem image.
pub fn default_rootfs() -> Result<PathBuf, GuestError> {
    find("rootfs", "rootfs.ext4")
}

/// The guest agent build-guest.sh built (what `--image` adds to a root).
pub fn default_agent() -> Result<PathBuf, GuestError> {
    find("agent", "vmm-agent")
}

/// Where root disks made from container images are kept.
pub fn image_cache_dir() -> PathBuf {
    cache_dir().join("images")
}

fn find(what: &'static str, file: &str) -> Result<PathBuf, GuestError> {
    let p = default_guest_dir().join(file);
    if p.exists() {
        Ok(p)
    } else {
        Err(GuestError::Missing {
            what,
            path: p.display().to_string(),
        })
    }
}
