//! Applies an image's layers, in order, to a directory that becomes the
//! container's root: files keep their owner, mode and mtime; whiteouts
//! (`.wh.NAME`) remove what lower layers left; opaque directories
//! (`.wh..wh..opq`) hide all of a lower layer's directory.
//!
//! A layer is untrusted input. Every path is resolved with the root as the
//! root of resolution (openat2's `RESOLVE_IN_ROOT`): a symlink a layer put
//! there (`etc -> /etc`) leads to the root's own `/etc`, never the host's.
//! Entries naming `..` are refused.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};

use crate::source::normalize;

/// The opaque-directory marker; other `.wh.` names are whiteouts.
const OPAQUE: &str = ".wh..wh..opq";
const WHITEOUT: &str = ".wh.";
/// Links followed (and directories made) for one path, at most: the
/// kernel's own limit on symlinks in a path.
const MAX_DEPTH: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("cannot open the root {path}")]
    Root {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer} is not a readable tar archive")]
    Archive {
        layer: usize,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: entry {entry:?} leaves the image's root (it names ..)")]
    Escapes { layer: usize, entry: String },
    #[error("layer {layer}: cannot place {entry:?}")]
    Entry {
        layer: usize,
        entry: String,
        #[source]
        source: io::Error,
    },
}

/// What unpacking a layer did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LayerStats {
    pub entries: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    pub whiteouts: u64,
    /// Device nodes skipped: the guest's /dev is devtmpfs.
    pub devices_skipped: u64,
}

/// The directory being built, with a handle to resolve paths inside it.
pub struct Root {
    path: PathBuf,
    fd: OwnedFd,
}

impl Root {
    pub fn open(path: &Path) -> Result<Self, UnpackError> {
        let fd = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| UnpackError::Root {
            path: path.display().to_string(),
            source: e.into(),
        })?;
        Ok(Root {
            path: path.to_path_buf(),
            fd,
        })
    }

    /// The real path of `rel`, following its symlinks as the container would
    /// (absolute ones from the root, `..` never above it).
    pub fn resolve(&self, rel: &str) -> io::Result<PathBuf> {
        if rel.is_empty() {
            return Ok(self.path.clone());
        }
        let fd = rustix::fs::openat2(
            &self.fd,
            rel,
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        )?;
        let real = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
        if !real.starts_with(&self.path) {
            // The root moved while we worked (nothing else writes in it).
            return Err(io::Error::other(format!(
                "{rel} resolved to {} outside the root",
                real.display()
            )));
        }
        Ok(real)
    }

    /// [`Root::resolve`] for a directory, made (0755, root's) where missing,
    /// as a layer that adds `a/b/c` without `a/b` expects; through a
    /// dangling symlink, where it points.
    pub fn dir(&self, rel: &str) -> io::Result<PathBuf> {
        self.dir_within(rel, 0)
    }

    fn dir_within(&self, rel: &str, depth: usize) -> io::Result<PathBuf> {
        if depth > MAX_DEPTH {
            return Err(io::Error::from_raw_os_error(libc_eloop()));
        }
        match self.resolve(rel) {
            Ok(p) if p.is_dir() => Ok(p),
            Ok(p) => Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a directory", p.display()),
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let (parent, name) = split(rel);
                let parent = self.dir_within(parent, depth + 1)?;
                let p = parent.join(name);
                match fs::symlink_metadata(&p) {
                    Ok(m) if m.file_type().is_symlink() => {
                        // Where the link points, as the container sees it.
                        let target = fs::read_link(&p)?;
                        let base = parent.strip_prefix(&self.path).unwrap_or(Path::new(""));
                        let target = if target.is_absolute() {
                            target
                        } else {
                            base.join(target)
                        };
                        self.dir_within(&normalize(&target.to_string_lossy()), depth + 1)
                    }
                    Ok(_) => Err(e),
                    Err(_) => {
                        fs::create_dir(&p)?;
                        Ok(p)
                    }
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Applies one layer's tar stream (number `layer`, for messages).
    pub fn apply_layer(&self, layer: usize, tar: impl Read) -> Result<LayerStats, UnpackError> {
        let mut archive = tar::Archive::new(tar);
        archive.set_preserve_permissions(true);
        archive.set_preserve_ownerships(true);
        archive.set_preserve_mtime(true);
        archive.set_overwrite(true);
        let bad_archive = |source| UnpackError::Archive { layer, source };
        let mut stats = LayerStats::default();
        // What this layer placed: its own opaque markers must not hide it.
        let mut placed: HashSet<String> = HashSet::new();
        for entry in archive.entries().map_err(bad_archive)? {
            let mut entry = entry.map_err(bad_archive)?;
            let raw = entry
                .path()
                .map_err(bad_archive)?
                .to_string_lossy()
                .into_owned();
            let rel = clean(&raw).ok_or_else(|| UnpackError::Escapes {
                layer,
                entry: raw.clone(),
            })?;
            if rel.is_empty() {
                continue;
            }
            stats.entries += 1;
            let failed = |source| UnpackError::Entry {
                layer,
                entry: raw.clone(),
                source,
            };
            let (parent, name) = split(&rel);
            if name == OPAQUE {
                stats.whiteouts += 1;
                let dir = self.dir(parent).map_err(failed)?;
                hide_lower(&dir, parent, &placed).map_err(failed)?;
                continue;
            }
            if let Some(hidden) = name.strip_prefix(WHITEOUT) {
                stats.whiteouts += 1;
                match self.resolve(parent) {
                    Ok(dir) => remove_any(&dir.join(hidden)).map_err(failed)?,
                    // Nothing to hide under a directory that is not there.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(failed(e)),
                }
                continue;
            }
            let target = self.dir(parent).map_err(failed)?.join(name);
            let kind = entry.header().entry_type();
            // A directory stays (and merges); anything else is replaced.
            match fs::symlink_metadata(&target) {
                Ok(m) if m.is_dir() && kind.is_dir() => {}
                Ok(_) => remove_any(&target).map_err(failed)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(failed(e)),
            }
            placed.insert(rel.clone());
            if kind.is_hard_link() {
                let link = entry
                    .link_name()
                    .map_err(failed)?
                    .ok_or_else(|| failed(io::Error::other("a hard link without a target")))?
                    .to_string_lossy()
                    .into_owned();
                let link_rel = clean(&link).ok_or_else(|| UnpackError::Escapes {
                    layer,
                    entry: link.clone(),
                })?;
                let (lp, ln) = split(&link_rel);
                let source = self.resolve(lp).map_err(failed)?.join(ln);
                fs::hard_link(&source, &target).map_err(failed)?;
            } else if kind.is_block_special() || kind.is_character_special() {
                stats.devices_skipped += 1;
            } else if kind.is_fifo() {
                let h = entry.header();
                let mode = h.mode().map_err(failed)?;
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &target,
                    FileType::Fifo,
                    Mode::from_raw_mode(mode),
                    0,
                )
                .map_err(|e| failed(e.into()))?;
                let (uid, gid) = (h.uid().map_err(failed)?, h.gid().map_err(failed)?);
                std::os::unix::fs::lchown(&target, Some(uid as u32), Some(gid as u32))
                    .map_err(failed)?;
            } else {
                if kind.is_file() {
                    stats.bytes += entry.size();
                }
                entry.unpack(&target).map_err(failed)?;
            }
        }
        // The rest of the stream (tar's end blocks, padding) counts in the
        // layer's digest.
        io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(bad_archive)?;
        Ok(stats)
    }
}

/// Removes from `dir` (the image path `rel`) everything a lower layer put
/// there: all but what this layer `placed`, looking inside the directories
/// it placed too.
fn hide_lower(dir: &Path, rel: &str, placed: &HashSet<String>) -> io::Result<()> {
    for child in fs::read_dir(dir)? {
        let child = child?;
        let name = child.file_name().to_string_lossy().into_owned();
        let child_rel = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        if !placed.contains(&child_rel) {
            remove_any(&child.path())?;
        } else if child.file_type()?.is_dir() {
            hide_lower(&child.path(), &child_rel, placed)?;
        }
    }
    Ok(())
}

/// Removes a file, link or whole directory; nothing there is fine.
fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// An entry's path relative to the root (`./a//b/` is `a/b`), or None if it
/// names `..`.
fn clean(raw: &str) -> Option<String> {
    let mut parts = Vec::new();
    for c in Path::new(raw).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::ParentDir => return None,
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    Some(parts.join("/"))
}

/// ELOOP: too many links in a path.
fn libc_eloop() -> i32 {
    rustix::io::Errno::LOOP.raw_os_error()
}

/// `a/b/c` as (`a/b`, `c`); `c` as (``, `c`).
fn split(rel: &str) -> (&str, &str) {
    rel.rsplit_once('/').unwrap_or(("", rel))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A layer built in memory: (path, kind) where kind is file content,
    /// a symlink target, a directory or a hard link.
    enum E<'a> {
        File(&'a str, &'a [u8], u32, u64),
        Dir(&'a str),
        Link(&'a str, &'a str),
        Hard(&'a str, &'a str),
        Fifo(&'a str),
        Dev(&'a str),
    }

    fn layer(entries: &[E]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_ustar();
            h.set_mtime(1_700_000_000);
            h.set_uid(0);
            h.set_gid(0);
            let path = match e {
                E::File(p, ..)
                | E::Dir(p)
                | E::Link(p, _)
                | E::Hard(p, _)
                | E::Fifo(p)
                | E::Dev(p) => p,
            };
            if path.contains("..") {
                // The builder refuses such names: written raw, as a
                // hostile layer would have them.
                h.as_mut_bytes()[..path.len()].copy_from_slice(path.as_bytes());
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(0);
                if let E::Hard(_, t) = e {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_link_name(t).ok();
                    h.as_mut_bytes()[157..157 + t.len()].copy_from_slice(t.as_bytes());
                }
                h.set_cksum();
                b.append(&h, io::empty()).unwrap();
                continue;
            }
            match e {
                E::File(p, data, mode, uid) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(data.len() as u64);
                    h.set_mode(*mode);
                    h.set_uid(*uid);
                    h.set_gid(*uid);
                    b.append_data(&mut h, p, *data).unwrap();
                }
                E::Dir(p) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    b.append_data(&mut h, p, io::empty()).unwrap();
                }
                E::Link(p, t) | E::Hard(p, t) => {
                    h.set_entry_type(if matches!(e, E::Link(..)) {
                        tar::EntryType::Symlink
                    } else {
                        tar::EntryType::Link
                    });
                    h.set_mode(0o777);
                    h.set_size(0);
                    b.append_link(&mut h, p, t).unwrap();
                }
                E::Fifo(p) | E::Dev(p) => {
                    h.set_entry_type(if matches!(e, E::Fifo(..)) {
                        tar::EntryType::Fifo
                    } else {
                        tar::EntryType::Char
                    });
                    h.set_mode(0o600);
                    h.set_size(0);
                    b.append_data(&mut h, p, io::empty()).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    fn is_root() -> bool {
        std::os::unix::fs::MetadataExt::uid(&fs::metadata("/proc/self").unwrap()) == 0
    }

    fn apply(root: &Root, n: usize, entries: &[E]) -> Result<LayerStats, UnpackError> {
        root.apply_layer(n, layer(entries).as_slice())
    }

    fn exists(p: PathBuf) -> bool {
        fs::symlink_metadata(p).is_ok()
    }

    #[test]
    fn layers_stack_with_whiteouts_and_opaque_directories() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::open(d.path()).unwrap();
        let top = d.path();
        apply(
            &root,
            1,
            &[
                E::Dir("etc/"),
                E::File("etc/motd", b"one", 0o644, 0),
                E::File("etc/gone", b"x", 0o644, 0),
                E::Dir("data/"),
                E::File("data/old", b"old", 0o600, 0),
                E::Dir("data/sub/"),
                E::File("data/sub/deep", b"deep", 0o644, 0),
                E::Dir("tree/"),
                E::File("tree/leaf", b"leaf", 0o644, 0),
                E::File("was-file", b"f", 0o644, 0),
            ],
        )
        .unwrap();
        let stats = apply(
            &root,
            2,
            &[
                E::File("etc/.wh.gone", b"", 0o644, 0),
                E::File("etc/motd", b"two", 0o640, 0),
                // Same-layer entries before the marker stay; lower ones go,
                // in subdirectories too.
                E::Dir("data/sub/"),
                E::File("data/sub/new", b"new", 0o644, 0),
                E::File("data/.wh..wh..opq", b"", 0o644, 0),
                E::File("data/fresh", b"fresh", 0o644, 0),
                E::File(".wh.tree", b"", 0o644, 0),
                E::Dir("was-file/"),
                E::File("absent/.wh.nothing", b"", 0o644, 0),
            ],
        )
        .unwrap();
        assert_eq!(stats.whiteouts, 4);
        assert_eq!(fs::read(top.join("etc/motd")).unwrap(), b"two");
        assert_eq!(
            fs::metadata(top.join("etc/motd")).unwrap().mode() & 0o7777,
            0o640
        );
        assert!(!exists(top.join("etc/gone")));
        assert!(!exists(top.join("data/old")));
        assert!(!exists(top.join("data/sub/deep")));
        assert_eq!(fs::read(top.join("data/sub/new")).unwrap(), b"new");
        assert_eq!(fs::read(top.join("data/fresh")).unwrap(), b"fresh");
        assert!(!exists(top.join("tree")));
        assert!(top.join("was-file").is_dir());
        assert!(!exists(top.join("absent")));
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("victim"), b"keep").unwrap();
        let root = Root::open(d.path()).unwrap();
        let out = outside.path().to_str().unwrap();
        apply(
            &root,
            1,
            &[
                // An absolute link to a host directory, and one climbing out.
                E::Link("abs", out),
                E::Link("rel", "../../../../../../.."),
                E::Dir("usr/"),
                E::Dir("usr/lib/"),
                E::Link("lib", "usr/lib"),
            ],
        )
        .unwrap();
        apply(
            &root,
            2,
            &[
                E::File("abs/victim", b"owned", 0o644, 0),
                E::File("rel/tmp/planted", b"x", 0o644, 0),
                E::File("lib/libc.so", b"elf", 0o755, 0),
                E::Hard("hard", "abs/victim"),
            ],
        )
        .unwrap();
        // The host's file is untouched; the layer's writes landed inside.
        assert_eq!(fs::read(outside.path().join("victim")).unwrap(), b"keep");
        assert_eq!(
            fs::read(d.path().join(&out[1..]).join("victim")).unwrap(),
            b"owned"
        );
        assert!(d.path().join("tmp/planted").exists());
        assert_eq!(fs::read(d.path().join("usr/lib/libc.so")).unwrap(), b"elf");
        assert_eq!(fs::read(d.path().join("hard")).unwrap(), b"owned");
        assert_eq!(fs::read_link(d.path().join("abs")).unwrap(), Path::new(out));
        // A whiteout through the link removes the root's file only.
        apply(&root, 3, &[E::File("abs/.wh.victim", b"", 0o644, 0)]).unwrap();
        assert!(!exists(d.path().join(&out[1..]).join("victim")));
        assert_eq!(fs::read(outside.path().join("victim")).unwrap(), b"keep");
        assert_eq!(fs::read(d.path().join("hard")).unwrap(), b"owned");
    }

    #[test]
    fn entries_naming_dotdot_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::open(d.path()).unwrap();
        let e = apply(&root, 3, &[E::File("a/../../x", b"x", 0o644, 0)]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "layer 3: entry \"a/../../x\" leaves the image's root (it names ..)"
        );
        let e = apply(&root, 1, &[E::Hard("h", "../etc/passwd")]).unwrap_err();
        assert!(matches!(e, UnpackError::Escapes { .. }), "{e}");
    }

    #[test]
    fn ownership_fifos_and_devices() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::open(d.path()).unwrap();
        let stats = apply(
            &root,
            1,
            &[
                E::File("home/app/file", b"data", 0o4755, 1000),
                E::Fifo("run/pipe"),
                E::Dev("dev/null"),
            ],
        )
        .unwrap();
        assert_eq!(stats.devices_skipped, 1);
        assert_eq!(stats.bytes, 4);
        assert!(!exists(d.path().join("dev/null")));
        let fifo = fs::symlink_metadata(d.path().join("run/pipe")).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_fifo(&fifo.file_type()));
        let m = fs::metadata(d.path().join("home/app/file")).unwrap();
        assert_eq!(m.mtime(), 1_700_000_000);
        if is_root() {
            assert_eq!((m.uid(), m.gid()), (1000, 1000));
            assert_eq!(m.mode() & 0o7777, 0o4755);
        }
    }

    #[test]
    fn garbage_is_not_a_layer() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::open(d.path()).unwrap();
        let e = root.apply_layer(2, &[9u8; 1024][..]).unwrap_err();
        assert!(matches!(e, UnpackError::Archive { layer: 2, .. }), "{e}");
    }

    #[test]
    fn paths_are_cleaned() {
        assert_eq!(clean("./a//b/").as_deref(), Some("a/b"));
        assert_eq!(clean("/etc/passwd").as_deref(), Some("etc/passwd"));
        assert_eq!(clean("./").as_deref(), Some(""));
        assert_eq!(clean("a/../b"), None);
        assert_eq!(split("a/b/c"), ("a/b", "c"));
        assert_eq!(split("c"), ("", "c"));
    }
}
