//! The warm-start cache: images of booted guests whose agent waits for
//! its command (`vmm.start=agent`), one per machine. `vmm run` restores one
//! instead of booting when the machine is the same: the same VMM, kernel,
//! initrd and rootfs files, unchanged (a [`FileIdentity`] each), the same
//! memory size, vCPUs and kernel command line.
//!
//! Layout: `DIR/NAME.vmm` is the image, `DIR/NAME.json` its [`Entry`]
//! (what it is for; the file's mtime says when it was last used). NAME is a
//! hash of the key; the entry holds the whole key, compared on lookup.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::atomic_file::{AtomicFile, AtomicFileError};
use crate::boot::VmConfig;
use crate::image::FileIdentity;

/// Bumped whenever what a warm image holds or means changes.
pub const WARM_VERSION: u32 = 1;
/// The cache's default size bound.
pub const DEFAULT_MAX_BYTES: u64 = 2 << 30;
const IMAGE_EXT: &str = "vmm";
const ENTRY_EXT: &str = "json";

#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("cannot use the warm-start cache {path}")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot identify {path} for the warm-start cache")]
    Identify {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot record the warm image")]
    Record(#[source] AtomicFileError),
    #[error("cannot write the warm image's entry {path}")]
    WriteEntry {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no warm image is named {0} (see vmm cache ls)")]
    NoSuchEntry(String),
    #[error("cannot remove {path}")]
    Remove {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What a warm image is an image of.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WarmKey {
    pub version: u32,
    /// The VMM binary: its devices and boot code made the image.
    pub vmm: FileIdentity,
    pub kernel: FileIdentity,
    pub initrd: Option<FileIdentity>,
    pub rootfs: FileIdentity,
    pub mem_mib: u64,
    pub vcpus: u8,
    /// `--cmdline`, if given (the default one is the VMM's).
    pub cmdline: Option<String>,
}

impl WarmKey {
    /// The key of the machine `cfg` describes (its rootfs must be set).
    pub fn of(cfg: &VmConfig) -> Result<Self, WarmError> {
        let id = |p: &Path| {
            FileIdentity::of(p).map_err(|source| WarmError::Identify {
                path: p.display().to_string(),
                source,
            })
        };
        let exe = std::env::current_exe().map_err(|source| WarmError::Identify {
            path: "the vmm binary".into(),
            source,
        })?;
        let rootfs = cfg.rootfs.as_deref().unwrap_or(Path::new("/"));
        Ok(WarmKey {
            version: WARM_VERSION,
            // Not its ctime: hard links change it (cargo's uplifting, perf's
            // build-id cache), and a rebuild changes mtime and inode anyway.
            vmm: FileIdentity {
                ctime_ns: 0,
                ..id(&exe)?
            },
            kernel: id(&cfg.kernel)?,
            initrd: cfg.initrd.as_deref().map(id).transpose()?,
            rootfs: id(rootfs)?,
            mem_mib: cfg.mem_mib,
            vcpus: cfg.vcpus,
            cmdline: cfg.cmdline.clone(),
        })
    }

    /// The file name stem of this key's image.
    pub fn name(&self) -> String {
        // SipHash with fixed keys: stable for a given Rust release; the
        // entry holds the whole key, so a collision only costs a boot.
        let mut h = std::hash::DefaultHasher::new();
        self.hash(&mut h);
        format!("{:016x}", h.finish())
    }

    /// The same machine (same files by path, same shape) with older or
    /// newer contents: an image for `other` is of no more use once `self`
    /// exists.
    fn supersedes(&self, other: &WarmKey) -> bool {
        self != other
            && self.kernel.path == other.kernel.path
            && self.rootfs.path == other.rootfs.path
            && self.initrd.as_ref().map(|i| &i.path) == other.initrd.as_ref().map(|i| &i.path)
            && self.mem_mib == other.mem_mib
            && self.vcpus == other.vcpus
            && self.cmdline == other.cmdline
    }
}

/// What `NAME.json` says about `NAME.vmm`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    pub key: WarmKey,
    /// Unix seconds.
    pub created: u64,
    /// How long the cold boot took to get the agent ready (ms).
    pub boot_ms: u64,
}

/// One cached image, as `vmm cache ls` shows it.
#[derive(Debug, Clone)]
pub struct Listed {
    pub name: String,
    pub entry: Entry,
    pub bytes: u64,
    pub last_used: SystemTime,
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct WarmCache {
    dir: PathBuf,
}

impl WarmCache {
    /// `$VMM_CACHE_DIR/warm` (default `~/.cache/vmm/warm`), created if
    /// missing.
    pub fn open_default() -> Result<Self, WarmError> {
        Self::open(crate::guest::cache_dir().join("warm"))
    }

    pub fn open(dir: PathBuf) -> Result<Self, WarmError> {
        std::fs::create_dir_all(&dir).map_err(|source| WarmError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        Ok(WarmCache { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{name}.{ext}"))
    }

    /// Where the image for `key` is written.
    pub fn image_path(&self, key: &WarmKey) -> PathBuf {
        self.path(&key.name(), IMAGE_EXT)
    }

    fn read_entry(&self, name: &str) -> Option<Entry> {
        let text = std::fs::read(self.path(name, ENTRY_EXT)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// The image for `key`, if the cache has one; marks it used.
    pub fn lookup(&self, key: &WarmKey) -> Option<PathBuf> {
        let name = key.name();
        let entry = self.read_entry(&name)?;
        let image = self.path(&name, IMAGE_EXT);
        if entry.key != *key || !image.is_file() {
            return None;
        }
        if let Ok(f) = std::fs::File::options()
            .write(true)
            .open(self.path(&name, ENTRY_EXT))
        {
            let _ = f.set_modified(SystemTime::now());
        }
        Some(image)
    }

    /// Records the image just written at [`WarmCache::image_path`] and
    /// removes the images it supersedes.
    pub fn record(&self, key: &WarmKey, boot_ms: u64) -> Result<(), WarmError> {
        let entry = Entry {
            key: key.clone(),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            boot_ms,
        };
        let path = self.path(&key.name(), ENTRY_EXT);
        let (atomic, mut file) = AtomicFile::create(&path).map_err(WarmError::Record)?;
        let text = serde_json::to_vec_pretty(&entry).unwrap_or_default();
        std::io::Write::write_all(&mut file, &text).map_err(|source| WarmError::WriteEntry {
            path: path.display().to_string(),
            source,
        })?;
        atomic.commit(file).map_err(WarmError::Record)?;
        for old in self.list() {
            if key.supersedes(&old.entry.key) {
                log::info!("warm cache: {} is out of date, removed", old.name);
                let _ = self.remove(&old.name);
            }
        }
        Ok(())
    }

    /// Removes a warm image and its entry.
    pub fn remove(&self, name: &str) -> Result<(), WarmError> {
        let mut found = false;
        for ext in [IMAGE_EXT, ENTRY_EXT] {
            let p = self.path(name, ext);
            match std::fs::remove_file(&p) {
                Ok(()) => found = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(WarmError::Remove {
                        path: p.display().to_string(),
                        source,
                    })
                }
            }
        }
        if found {
            Ok(())
        } else {
            Err(WarmError::NoSuchEntry(name.to_string()))
        }
    }

    /// Every image with a readable entry, most recently used first.
    pub fn list(&self) -> Vec<Listed> {
        self.scan().0
    }

    /// [`Self::list`], and the images without an entry that are over an
    /// hour old: left by a run killed between the two writes (a younger
    /// one may be a run's that is writing its entry now).
    fn scan(&self) -> (Vec<Listed>, Vec<PathBuf>) {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return (Vec::new(), Vec::new());
        };
        let mut out = Vec::new();
        let mut orphans = Vec::new();
        for e in dir.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some(IMAGE_EXT) {
                continue;
            }
            let Some(name) = p.file_stem().and_then(|s| s.to_str()).map(String::from) else {
                continue;
            };
            let (Some(entry), Ok(meta)) = (self.read_entry(&name), p.metadata()) else {
                let old = p
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > Duration::from_secs(3600));
                if old {
                    orphans.push(p);
                }
                continue;
            };
            let last_used = std::fs::metadata(self.path(&name, ENTRY_EXT))
                .and_then(|m| m.modified())
                .unwrap_or(UNIX_EPOCH);
            out.push(Listed {
                name,
                entry,
                bytes: meta.len(),
                last_used,
            });
        }
        out.sort_by_key(|l| std::cmp::Reverse(l.last_used));
        (out, orphans)
    }

    /// Removes images without an entry, then the least recently used
    /// images until the rest fit in `max_bytes`; returns the latter.
    pub fn prune(&self, max_bytes: u64) -> Vec<Listed> {
        let (listed, orphans) = self.scan();
        for p in orphans {
            let _ = std::fs::remove_file(p);
        }
        let mut total = 0u64;
        let mut removed = Vec::new();
        for l in listed {
            total = total.saturating_add(l.bytes);
            if total > max_bytes && self.remove(&l.name).is_ok() {
                removed.push(l);
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(dir: &Path, rootfs: &str) -> WarmKey {
        let file = |name: &str| {
            let p = dir.join(name);
            if !p.exists() {
                std::fs::write(&p, name).unwrap();
            }
            FileIdentity::of(&p).unwrap()
        };
        WarmKey {
            version: WARM_VERSION,
            vmm: file("vmm"),
            kernel: file("vmlinux"),
            initrd: None,
            rootfs: file(rootfs),
            mem_mib: 256,
            vcpus: 1,
            cmdline: None,
        }
    }

    fn put(cache: &WarmCache, k: &WarmKey, bytes: usize) {
        std::fs::write(cache.image_path(k), vec![0u8; bytes]).unwrap();
        cache.record(k, 90_000).unwrap();
    }

    #[test]
    fn finds_only_the_same_machine_and_a_changed_file_is_a_miss() {
        let t = tempfile::tempdir().unwrap();
        let cache = WarmCache::open(t.path().join("warm")).unwrap();
        let k = key(t.path(), "rootfs");
        assert_eq!(cache.lookup(&k), None);
        put(&cache, &k, 10);
        assert_eq!(cache.lookup(&k), Some(cache.image_path(&k)));
        let mut other = k.clone();
        other.mem_mib = 512;
        assert_eq!(cache.lookup(&other), None);

        std::thread::sleep(Duration::from_millis(10));
        std::fs::write(t.path().join("rootfs"), "changed").unwrap();
        let changed = key(t.path(), "rootfs");
        assert_ne!(changed, k);
        assert_eq!(cache.lookup(&changed), None);
        // The new image supersedes the old one.
        put(&cache, &changed, 10);
        let names: Vec<String> = cache.list().into_iter().map(|l| l.name).collect();
        assert_eq!(names, vec![changed.name()]);
    }

    #[test]
    fn prune_keeps_the_most_recently_used() {
        let t = tempfile::tempdir().unwrap();
        let cache = WarmCache::open(t.path().join("warm")).unwrap();
        let a = key(t.path(), "a");
        let b = key(t.path(), "b");
        put(&cache, &a, 100);
        std::thread::sleep(Duration::from_millis(20));
        put(&cache, &b, 100);
        std::thread::sleep(Duration::from_millis(20));
        assert!(cache.lookup(&a).is_some(), "a is now the most recent");
        let removed: Vec<String> = cache.prune(150).into_iter().map(|l| l.name).collect();
        assert_eq!(removed, vec![b.name()]);
        assert!(cache.lookup(&a).is_some() && cache.lookup(&b).is_none());
        assert!(matches!(
            cache.remove("nonesuch"),
            Err(WarmError::NoSuchEntry(_))
        ));
    }

    #[test]
    fn only_prune_removes_an_old_image_without_an_entry() {
        let t = tempfile::tempdir().unwrap();
        let cache = WarmCache::open(t.path().join("warm")).unwrap();
        let old = cache.path("0ld", IMAGE_EXT);
        let young = cache.path("y0ung", IMAGE_EXT);
        std::fs::write(&old, b"killed before its entry").unwrap();
        std::fs::write(&young, b"being written").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(7200))
            .unwrap();
        assert!(cache.list().is_empty());
        assert!(old.exists(), "listing changes nothing");
        assert!(cache.prune(u64::MAX).is_empty());
        assert!(!old.exists());
        assert!(young.exists(), "a run may be writing its entry now");
    }
}
