//! Root disks made from images, cached: `DIR/<id>-<agent>/rootfs.ext4`
//! and `image.json` (the [`Prepared`] record), where `<id>` is the image
//! id's first 16 hex digits and `<agent>` the agent's. A disk is built in
//! `DIR/.build-<name>/` under an exclusive lock on `DIR/.lock` and renamed
//! into place whole, so a reader never sees half of one and two runs of a
//! new image build it once.
//!
//! Building: each layer is streamed (decompressed as its media type, or
//! its first bytes, say), checked against its digests as it goes, and
//! applied to a staging directory ([`crate::unpack`]); the agent is added
//! at [`AGENT_PATH`], WorkingDir made; `mkfs.ext4 -d` packs the tree into
//! a sparse file. Run as root: files keep their owners.

use std::cell::RefCell;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};

use crate::select::{hex, Compression};
use crate::unpack::{Root, UnpackError};
use crate::user::{self, UserError};
use crate::{Image, Prepared, Process, SourceError, AGENT_PATH, DEFAULT_PATH};

const RECORD: &str = "image.json";
const DISK: &str = "rootfs.ext4";
/// The smallest disk made, and the room left beyond the content (the
/// file is sparse: free space costs nothing on the host).
const MIN_DISK: u64 = 1 << 30;
const HEADROOM: u64 = 512 << 20;
/// What a file or directory costs beyond its bytes: its last block,
/// directory entries, extent blocks.
const PER_ENTRY: u64 = 8 << 10;
/// The most of /etc/passwd or /etc/group read.
const MAX_ETC: u64 = 4 << 20;
/// What the disks may take on the host together (allocated blocks) before
/// making a new one removes the least recently used.
pub const DEFAULT_MAX_BYTES: u64 = 10 << 30;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot use the image cache {path}")]
    Dir {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot read the guest agent {path} (build the default guest: resources/build-guest.sh)"
    )]
    Agent {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("cannot read layer {layer} of {image}")]
    Layer {
        layer: usize,
        image: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer} of {image} does not match its {what} digest {expected} (it hashes to {actual}): the image is damaged")]
    LayerDigest {
        layer: usize,
        image: String,
        what: &'static str,
        expected: String,
        actual: String,
    },
    #[error("cannot unpack {image}")]
    Unpack {
        image: String,
        #[source]
        source: UnpackError,
    },
    #[error(transparent)]
    User(#[from] UserError),
    #[error("cannot {what} in the image's root")]
    Place {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot run mkfs.ext4 (install e2fsprogs)")]
    Mkfs(#[source] io::Error),
    #[error("mkfs.ext4 failed ({status}): {stderr}")]
    MkfsFailed { status: String, stderr: String },
    #[error("making a root disk of an image needs root: its files keep their owners")]
    NotRoot,
    #[error("no root disk of an image is named {0} (see vmm cache ls)")]
    NoSuchDisk(String),
    #[error("cannot remove {path}")]
    Remove {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot record the root disk in {path}")]
    Record {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// The cache directory of image root disks.
#[derive(Debug, Clone)]
pub struct ImageCache {
    dir: PathBuf,
}

/// A disk in the cache, as `vmm cache ls` shows it.
#[derive(Debug, Clone)]
pub struct CachedDisk {
    pub name: String,
    pub prepared: Prepared,
    /// What it takes on the host (allocated blocks: the file is sparse).
    pub bytes: u64,
    pub last_used: SystemTime,
}

impl ImageCache {
    pub fn open(dir: &Path) -> Result<Self, CacheError> {
        fs::create_dir_all(dir).map_err(|source| CacheError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        Ok(ImageCache {
            dir: dir.to_path_buf(),
        })
    }

    /// The root disk of `image` with `agent` inside: the cached one, or one
    /// built now. The flag says whether it was built.
    pub fn prepare(&self, image: &Image, agent: &Path) -> Result<(Prepared, bool), CacheError> {
        let agent_bytes = fs::read(agent).map_err(|source| CacheError::Agent {
            path: agent.display().to_string(),
            source,
        })?;
        let name = entry_name(image.id(), &hex(&Sha256::digest(&agent_bytes)));
        let cached = |name: &str| self.use_entry(name).filter(|p| p.id == image.id());
        if let Some(p) = cached(&name) {
            return Ok((p, false));
        }
        if !rustix::process::geteuid().is_root() {
            return Err(CacheError::NotRoot);
        }
        let lock = self.lock()?;
        // Someone may have built it while we waited.
        if let Some(p) = cached(&name) {
            return Ok((p, false));
        }
        self.remove_stale_builds();
        let built = self.build(image, &agent_bytes, &name)?;
        for removed in self.prune_except(DEFAULT_MAX_BYTES, &name) {
            log::info!(
                "image cache: removed {} ({}), least recently used beyond {} GiB",
                removed.name,
                removed.prepared.reference,
                DEFAULT_MAX_BYTES >> 30
            );
        }
        drop(lock);
        Ok((built, true))
    }

    /// [`Self::lookup`], marking the disk used now (its record's mtime).
    fn use_entry(&self, name: &str) -> Option<Prepared> {
        let p = self.lookup(name)?;
        let record = self.dir.join(name).join(RECORD);
        if let Ok(f) = File::options().append(true).open(record) {
            let _ = f.set_modified(SystemTime::now());
        }
        Some(p)
    }

    /// The disks, most recently used first.
    pub fn list(&self) -> Vec<CachedDisk> {
        let Ok(dir) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<CachedDisk> = dir
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    return None;
                }
                let prepared = self.lookup(&name)?;
                let meta = |p: &Path| fs::symlink_metadata(p).ok();
                let record = meta(&e.path().join(RECORD))?;
                let disk = meta(&prepared.rootfs)?;
                Some(CachedDisk {
                    name,
                    bytes: (disk.blocks() + record.blocks()) * 512,
                    last_used: record.modified().unwrap_or(UNIX_EPOCH),
                    prepared,
                })
            })
            .collect();
        out.sort_by_key(|d| std::cmp::Reverse(d.last_used));
        out
    }

    /// Removes the disk `name`.
    pub fn remove(&self, name: &str) -> Result<(), CacheError> {
        if name.is_empty() || name.starts_with('.') || name.contains('/') {
            return Err(CacheError::NoSuchDisk(name.into()));
        }
        let dir = self.dir.join(name);
        if !dir.join(RECORD).exists() {
            return Err(CacheError::NoSuchDisk(name.into()));
        }
        fs::remove_dir_all(&dir).map_err(|source| CacheError::Remove {
            path: dir.display().to_string(),
            source,
        })
    }

    /// Removes the least recently used disks beyond `max_bytes` in all;
    /// returns what it removed. Takes the build lock: a disk being made
    /// is not counted, nor removed half-made.
    pub fn prune(&self, max_bytes: u64) -> Result<Vec<CachedDisk>, CacheError> {
        let _lock = self.lock()?;
        Ok(self.prune_except(max_bytes, ""))
    }

    fn prune_except(&self, max_bytes: u64, keep: &str) -> Vec<CachedDisk> {
        let mut total = 0u64;
        let mut removed = Vec::new();
        for d in self.list() {
            total = total.saturating_add(d.bytes);
            if total > max_bytes && d.name != keep && self.remove(&d.name).is_ok() {
                removed.push(d);
            }
        }
        removed
    }

    /// Whether the disk of `image` with `agent` is cached (no building).
    pub fn has(&self, image: &Image, agent: &Path) -> bool {
        fs::read(agent)
            .map(|a| entry_name(image.id(), &hex(&Sha256::digest(&a))))
            .is_ok_and(|name| self.lookup(&name).is_some_and(|p| p.id == image.id()))
    }

    /// The entry `name`, if whole: its record parses and its disk is an
    /// ext4 file system (a disk lost to a crash is not used).
    fn lookup(&self, name: &str) -> Option<Prepared> {
        let dir = self.dir.join(name);
        let text = fs::read(dir.join(RECORD)).ok()?;
        let mut p: Prepared = serde_json::from_slice(&text).ok()?;
        p.rootfs = dir.join(DISK);
        is_ext4(&p.rootfs).then_some(p)
    }

    /// Removes what builds killed midway left (we hold the lock: no build
    /// runs).
    fn remove_stale_builds(&self) {
        let Ok(dir) = fs::read_dir(&self.dir) else {
            return;
        };
        for e in dir.filter_map(Result::ok) {
            if e.file_name().as_bytes().starts_with(b".build-") {
                log::info!(
                    "image cache: removing {}, left by a build that did not finish",
                    e.path().display()
                );
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }

    fn lock(&self) -> Result<File, CacheError> {
        let path = self.dir.join(".lock");
        let f = File::create(&path)
            .and_then(|f| f.lock().map(|()| f))
            .map_err(|source| CacheError::Dir {
                path: path.display().to_string(),
                source,
            })?;
        Ok(f)
    }

    fn build(&self, image: &Image, agent: &[u8], name: &str) -> Result<Prepared, CacheError> {
        let build = self.dir.join(format!(".build-{name}"));
        let dir_err = |source| CacheError::Dir {
            path: build.display().to_string(),
            source,
        };
        // A build killed midway left this; we hold the lock.
        if build.exists() {
            fs::remove_dir_all(&build).map_err(dir_err)?;
        }
        // Only root may look inside while the tree is built: it holds the
        // layers' setuid programs and world-writable directories.
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&build)
            .map_err(dir_err)?;
        let staging = build.join("root");
        fs::create_dir(&staging).map_err(dir_err)?;
        let result = self.build_in(image, agent, &build, &staging, name);
        if result.is_err() {
            let _ = fs::remove_dir_all(&build);
        }
        result
    }

    fn build_in(
        &self,
        image: &Image,
        agent: &[u8],
        build: &Path,
        staging: &Path,
        name: &str,
    ) -> Result<Prepared, CacheError> {
        let display = image.source.display().to_string();
        let root = Root::open(staging).map_err(|source| CacheError::Unpack {
            image: display.clone(),
            source,
        })?;
        let mut content_bytes = 0;
        let mut entries = 0;
        for (i, layer) in image.selected.layers.iter().enumerate() {
            let n = i + 1;
            log::info!(
                "image {display}: applying layer {n} of {}",
                image.selected.layers.len()
            );
            let raw = Hashing::new(image.source.open_file(&layer.file)?);
            let raw_hash = raw.state.clone();
            let read_err = |source| CacheError::Layer {
                layer: n,
                image: display.clone(),
                source,
            };
            let decoded = decompress(raw, layer.compression).map_err(read_err)?;
            let tar = Hashing::new(decoded);
            let tar_hash = tar.state.clone();
            let stats = root
                .apply_layer(n, tar)
                .map_err(|source| CacheError::Unpack {
                    image: display.clone(),
                    source,
                })?;
            content_bytes += stats.bytes;
            entries += stats.entries;
            let check = |what, expected: &str, actual: String| {
                if expected.eq_ignore_ascii_case(&actual) {
                    Ok(())
                } else {
                    Err(CacheError::LayerDigest {
                        layer: n,
                        image: display.clone(),
                        what,
                        expected: expected.to_string(),
                        actual,
                    })
                }
            };
            check("content", &layer.diff_id, finish(&tar_hash))?;
            if let Some(d) = &layer.digest {
                check("blob", d, finish(&raw_hash))?;
            }
            if stats.devices_skipped > 0 {
                log::info!(
                    "image {display}: layer {n}: {} device node(s) skipped (the guest's /dev is its own)",
                    stats.devices_skipped
                );
            }
        }
        let process = self.finish_root(image, agent, &root)?;
        let disk = build.join(DISK);
        let size = (content_bytes * 2 + entries * PER_ENTRY + HEADROOM)
            .max(MIN_DISK)
            .next_multiple_of(1 << 20);
        make_ext4(staging, &disk, size, entries)?;
        let prepared = Prepared {
            id: image.id().to_string(),
            reference: image.reference.clone(),
            process,
            rootfs: PathBuf::new(),
            content_bytes,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let record = build.join(RECORD);
        let rec_err = |source| CacheError::Record {
            path: record.display().to_string(),
            source,
        };
        let json = serde_json::to_vec_pretty(&prepared)
            .map_err(io::Error::other)
            .map_err(rec_err)?;
        fs::write(&record, json).map_err(rec_err)?;
        fs::remove_dir_all(staging).map_err(rec_err)?;
        // Durable before it is named: a crash must not leave a record
        // whose disk lost its blocks.
        for f in [&disk, &record, &build.to_path_buf()] {
            File::open(f).and_then(|f| f.sync_all()).map_err(rec_err)?;
        }
        let dest = self.dir.join(name);
        if dest.exists() {
            // A damaged entry (lookup found it unusable).
            fs::remove_dir_all(&dest).map_err(rec_err)?;
        }
        fs::rename(build, &dest).map_err(rec_err)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(rec_err)?;
        Ok(Prepared {
            rootfs: dest.join(DISK),
            ..prepared
        })
    }

    /// Adds the agent and WorkingDir; resolves User and Env.
    fn finish_root(&self, image: &Image, agent: &[u8], root: &Root) -> Result<Process, CacheError> {
        let place = |what: &str| {
            let what = what.to_string();
            move |source| CacheError::Place { what, source }
        };
        let (dir, file) = AGENT_PATH.rsplit_once('/').unwrap_or(("", AGENT_PATH));
        let agent_path = root
            .dir(Path::new(dir))
            .map_err(place("add the guest agent"))?
            .join(file);
        let _ = fs::remove_file(&agent_path);
        fs::write(&agent_path, agent).map_err(place("add the guest agent"))?;
        fs::set_permissions(
            &agent_path,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .map_err(place("add the guest agent"))?;

        let config = image.selected.config.config().clone().unwrap_or_default();
        let workdir = config
            .working_dir()
            .clone()
            .filter(|w| !w.is_empty())
            .map(|w| format!("/{}", w.trim_start_matches('/')))
            .unwrap_or_else(|| "/".into());
        root.dir(Path::new(workdir.trim_start_matches('/')))
            .map_err(place(&format!("make the WorkingDir {workdir}")))?;
        let read_etc = |name: &str| {
            root.resolve(Path::new(name))
                .and_then(|p| read_regular(&p, MAX_ETC))
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        let spec = config.user().clone().unwrap_or_default();
        let user = user::resolve(&spec, &read_etc("etc/passwd"), &read_etc("etc/group"))?;
        let mut env = config.env().clone().unwrap_or_default();
        let has =
            |env: &[String], name: &str| env.iter().any(|e| e.split('=').next() == Some(name));
        if !has(&env, "PATH") {
            env.push(DEFAULT_PATH.into());
        }
        if !has(&env, "HOME") {
            env.push(format!("HOME={}", user.home));
        }
        Ok(Process {
            entrypoint: config.entrypoint().clone().unwrap_or_default(),
            cmd: config.cmd().clone().unwrap_or_default(),
            env,
            workdir,
            uid: user.uid,
            gid: user.gid,
            groups: user.groups,
        })
    }
}

/// The start of a regular file, at most `limit` bytes: a layer's fifo or
/// device in its place is not opened for reading (it would block).
fn read_regular(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let f = File::options()
        .read(true)
        .custom_flags(libc_flags())
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    let mut buf = Vec::new();
    f.take(limit).read_to_end(&mut buf)?;
    Ok(buf)
}

/// O_NONBLOCK | O_NOFOLLOW.
fn libc_flags() -> i32 {
    (rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOFOLLOW).bits() as i32
}

/// Whether `path` is a file holding an ext4 file system (its superblock's
/// magic, 0xEF53 at byte 1080).
fn is_ext4(path: &Path) -> bool {
    let mut magic = [0u8; 2];
    File::open(path)
        .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut magic, 1080))
        .is_ok_and(|()| magic == [0x53, 0xef])
}

fn entry_name(id: &str, agent_hex: &str) -> String {
    let id = id.strip_prefix("sha256:").unwrap_or(id);
    format!(
        "{}-{}",
        &id[..16.min(id.len())],
        &agent_hex[..12.min(agent_hex.len())]
    )
}

/// Packs `tree` into a new ext4 image `disk` of `size` bytes (sparse).
/// No journal: the disk is the base of an overlay that ends with the VM.
fn make_ext4(tree: &Path, disk: &Path, size: u64, entries: u64) -> Result<(), CacheError> {
    let f = File::create(disk).map_err(CacheError::Mkfs)?;
    f.set_len(size).map_err(CacheError::Mkfs)?;
    drop(f);
    let inodes = entries + 65536;
    let out = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-m",
            "0",
            "-O",
            "^has_journal",
            "-L",
            "vmm-image",
        ])
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-E")
        .arg("root_owner=0:0")
        .arg("-d")
        .arg(tree)
        .arg(disk)
        .output()
        .map_err(CacheError::Mkfs)?;
    if !out.status.success() {
        return Err(CacheError::MkfsFailed {
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace('\n', "; "),
        });
    }
    Ok(())
}

/// A layer's bytes, decompressed.
fn decompress<'a>(raw: impl Read + 'a, how: Compression) -> io::Result<Box<dyn Read + 'a>> {
    let mut raw = BufReader::new(raw);
    let how = match how {
        Compression::Sniff => {
            let head = raw.fill_buf()?;
            if head.starts_with(&[0x1f, 0x8b]) {
                Compression::Gzip
            } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                Compression::Zstd
            } else {
                Compression::None
            }
        }
        other => other,
    };
    Ok(match how {
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(raw)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(raw)?),
        Compression::None | Compression::Sniff => Box::new(raw),
    })
}

/// A reader that hashes what passes through it, into a state the caller
/// keeps (the reader itself goes into the decoder and the tar reader).
struct Hashing<R> {
    inner: R,
    state: Rc<RefCell<Sha256>>,
}

impl<R: Read> Hashing<R> {
    fn new(inner: R) -> Self {
        Hashing {
            inner,
            state: Rc::new(RefCell::new(Sha256::new())),
        }
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.state.borrow_mut().update(&buf[..n]);
        Ok(n)
    }
}

fn finish(state: &Rc<RefCell<Sha256>>) -> String {
    format!("sha256:{}", hex(&state.borrow().clone().finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::sha256_of;

    /// A one-layer OCI layout in `dir`: /etc/passwd with `app`, /hello.
    fn layout(dir: &Path, damage: bool) {
        let mut b = tar::Builder::new(Vec::new());
        // /hello has a file capability, which the disk must keep.
        let pax = crate::test_util::pax_record(
            "SCHILY.xattr.security.capability",
            &crate::test_util::CAP_NET_RAW,
        );
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_path("PaxHeaders/hello").unwrap();
        h.set_size(pax.len() as u64);
        h.set_cksum();
        let mut pax_header = Some((h, pax));
        for (path, data) in [
            ("etc/passwd", &b"app:x:7:8::/home/app:/bin/sh\n"[..]),
            ("hello", b"hi\n"),
        ] {
            if path == "hello" {
                let (h, pax) = pax_header.take().unwrap();
                b.append(&h, pax.as_slice()).unwrap();
            }
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, path, data).unwrap();
        }
        let layer = b.into_inner().unwrap();
        let diff_id = sha256_of(&layer);
        let mut stored = layer.clone();
        if damage {
            let at = stored.len() - 1100;
            stored[at] ^= 1;
        }
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": { "User": "app", "Cmd": ["/hello"], "WorkingDir": "/w" },
            "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        })
        .to_string();
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).unwrap();
        let put = |bytes: &[u8]| {
            let d = sha256_of(bytes);
            fs::write(blobs.join(&d[7..]), bytes).unwrap();
            serde_json::json!({ "digest": d, "size": bytes.len() })
        };
        let mut config_desc = put(config.as_bytes());
        config_desc["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
        let mut layer_desc = put(&stored);
        layer_desc["mediaType"] = "application/vnd.oci.image.layer.v1.tar".into();
        let manifest = serde_json::json!({
            "schemaVersion": 2, "config": config_desc, "layers": [layer_desc],
        })
        .to_string();
        let mut m = put(manifest.as_bytes());
        m["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
        let index = serde_json::json!({ "schemaVersion": 2, "manifests": [m] });
        fs::write(dir.join("index.json"), index.to_string()).unwrap();
    }

    /// Needs root and mkfs.ext4 (e2fsprogs), as `vmm run --image` does.
    #[test]
    fn disks_are_made_once_listed_and_removed() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("not root: disks cannot be made");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let (img, cache_dir, agent) = (
            d.path().join("img"),
            d.path().join("cache"),
            d.path().join("agent"),
        );
        layout(&img, false);
        fs::write(&agent, b"#!agent").unwrap();
        let cache = ImageCache::open(&cache_dir).unwrap();
        let image = Image::open(img.to_str().unwrap()).unwrap();
        assert!(!cache.has(&image, &agent));
        let (p, built) = cache.prepare(&image, &agent).unwrap();
        assert!(built);
        assert_eq!(p.process.cmd, ["/hello"]);
        assert_eq!((p.process.uid, p.process.gid), (7, 8));
        assert_eq!(p.process.workdir, "/w");
        assert!(p.process.env.contains(&"HOME=/home/app".to_string()));
        assert!(p.process.env.contains(&DEFAULT_PATH.to_string()));
        // The agent and the WorkingDir are in the disk (debugfs reads it).
        let ls = Command::new("debugfs")
            .args(["-R", "ls -l /sbin"])
            .arg(&p.rootfs)
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&ls.stdout).contains("vmm-agent"));
        let ea = Command::new("debugfs")
            .args(["-R", "ea_list /hello"])
            .arg(&p.rootfs)
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&ea.stdout).contains("security.capability"),
            "{}",
            String::from_utf8_lossy(&ea.stdout)
        );
        let (again, built) = cache.prepare(&image, &agent).unwrap();
        assert!(!built);
        assert_eq!(again.rootfs, p.rootfs);
        assert!(cache.has(&image, &agent));
        // A new agent: a new disk.
        fs::write(&agent, b"#!agent 2").unwrap();
        let (other, built) = cache.prepare(&image, &agent).unwrap();
        assert!(built && other.rootfs != p.rootfs);
        let listed = cache.list();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].prepared.rootfs, other.rootfs, "most recent first");
        assert!(listed.iter().all(|l| l.bytes > 0 && l.prepared.created > 0));
        // Pruning to the size of one keeps the most recently used.
        let removed = cache.prune(listed[0].bytes).unwrap();
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].prepared.rootfs, p.rootfs);
        assert!(matches!(
            cache.remove("../x"),
            Err(CacheError::NoSuchDisk(_))
        ));
        cache.remove(&listed[0].name).unwrap();
        assert!(cache.list().is_empty());
    }

    #[test]
    fn a_damaged_layer_leaves_nothing_behind() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("not root: disks cannot be made");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let (img, cache_dir, agent) = (
            d.path().join("img"),
            d.path().join("cache"),
            d.path().join("agent"),
        );
        layout(&img, true);
        fs::write(&agent, b"#!agent").unwrap();
        let cache = ImageCache::open(&cache_dir).unwrap();
        let image = Image::open(img.to_str().unwrap()).unwrap();
        let e = cache.prepare(&image, &agent).unwrap_err();
        assert!(matches!(e, CacheError::LayerDigest { layer: 1, .. }), "{e}");
        let left: Vec<_> = fs::read_dir(&cache_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != ".lock")
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn names_and_decompression() {
        assert_eq!(
            entry_name(&format!("sha256:{}", "ab".repeat(32)), &"cd".repeat(32)),
            "abababababababab-cdcdcdcdcdcd"
        );
        let data = b"tar bytes".repeat(100);
        let gz = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            io::Write::write_all(&mut e, &data).unwrap();
            e.finish().unwrap()
        };
        let zs = zstd::encode_all(data.as_slice(), 1).unwrap();
        for (bytes, how) in [
            (&gz, Compression::Gzip),
            (&gz, Compression::Sniff),
            (&zs, Compression::Zstd),
            (&zs, Compression::Sniff),
            (&data, Compression::None),
            (&data, Compression::Sniff),
        ] {
            let mut out = Vec::new();
            decompress(bytes.as_slice(), how)
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
            assert_eq!(out, data, "{how:?}");
        }
        let mut h = Hashing::new(&b""[..]);
        h.read_to_end(&mut Vec::new()).unwrap();
        assert_eq!(finish(&h.state), crate::select::sha256_of(b""));
    }
}
