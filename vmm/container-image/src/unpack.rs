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
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};

/// The opaque-directory marker; other `.wh.` names are whiteouts.
const OPAQUE: &str = ".wh..wh..opq";
const WHITEOUT: &str = ".wh.";
/// The extended attributes a layer's files keep: file capabilities (`ping`
/// run by a user needs cap_net_raw). Others are dropped: SELinux labels
/// mean nothing in our guest, and trusted.* is the host's.
const KEPT_XATTRS: [&str; 1] = ["security.capability"];
/// How PAX headers carry extended attributes.
const PAX_XATTR: &str = "SCHILY.xattr.";

/// Symlinks followed for one path, at most: the kernel's own limit.
const MAX_LINKS: usize = 40;

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
    /// Extended attributes kept ([`KEPT_XATTRS`]).
    pub xattrs: u64,
}

/// The directory being built, with a handle to resolve paths inside it.
pub struct Root {
    /// Canonical: resolved paths are compared with it.
    path: PathBuf,
    fd: OwnedFd,
}

impl Root {
    pub fn open(path: &Path) -> Result<Self, UnpackError> {
        let root_err = |source: io::Error| UnpackError::Root {
            path: path.display().to_string(),
            source,
        };
        let path = fs::canonicalize(path).map_err(root_err)?;
        let fd = rustix::fs::open(
            &path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| root_err(e.into()))?;
        let root = Root { path, fd };
        // openat2 came with Linux 5.6: say so once, not per entry.
        root.resolve(Path::new(".")).map_err(|e| {
            if e.raw_os_error() == Some(rustix::io::Errno::NOSYS.raw_os_error()) {
                root_err(io::Error::other(
                    "this kernel has no openat2(2) (Linux 5.6 or later is needed to unpack images safely)",
                ))
            } else {
                root_err(e)
            }
        })?;
        Ok(root)
    }

    /// The real path of `rel`, following its symlinks as the container would
    /// (absolute ones from the root, `..` never above it).
    pub fn resolve(&self, rel: &Path) -> io::Result<PathBuf> {
        if rel.as_os_str().is_empty() {
            return Ok(self.path.clone());
        }
        let mut tries = 0;
        let fd = loop {
            match rustix::fs::openat2(
                &self.fd,
                rel,
                OFlags::PATH | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
            ) {
                // A rename anywhere on the system while `..` was walked.
                Err(rustix::io::Errno::AGAIN) if tries < 8 => tries += 1,
                other => break other?,
            }
        };
        let real = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
        if !real.starts_with(&self.path) {
            // The root moved while we worked (nothing else writes in it).
            return Err(io::Error::other(format!(
                "{} resolved to {} outside the root",
                rel.display(),
                real.display()
            )));
        }
        Ok(real)
    }

    /// [`Root::resolve`] for a directory, made (0755, root's) where missing,
    /// as a layer that adds `a/b/c` without `a/b` expects; through a
    /// dangling symlink, where it points.
    pub fn dir(&self, rel: &Path) -> io::Result<PathBuf> {
        self.dir_within(rel, 0)
    }

    /// `links`: symlinks followed so far for this path.
    fn dir_within(&self, rel: &Path, links: usize) -> io::Result<PathBuf> {
        if links > MAX_LINKS {
            return Err(io::Error::from_raw_os_error(
                rustix::io::Errno::LOOP.raw_os_error(),
            ));
        }
        match self.resolve(rel) {
            Ok(p) if p.is_dir() => Ok(p),
            Ok(p) => Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a directory", p.display()),
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let (parent, name) = split(rel);
                let parent = self.dir_within(parent, links)?;
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
                        self.dir_within(&lexical(&target), links + 1)
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
        // What this layer placed, and the directories above it: its own
        // opaque markers must not hide them.
        let mut placed = Placed::default();
        for entry in archive.entries().map_err(bad_archive)? {
            let mut entry = entry.map_err(bad_archive)?;
            let kind = entry.header().entry_type();
            if kind.is_pax_global_extensions() {
                continue;
            }
            let raw = entry.path().map_err(bad_archive)?.into_owned();
            let shown = raw.to_string_lossy().into_owned();
            let rel = clean(&raw).ok_or_else(|| UnpackError::Escapes {
                layer,
                entry: shown.clone(),
            })?;
            if rel.as_os_str().is_empty() {
                continue;
            }
            stats.entries += 1;
            let failed = |source| UnpackError::Entry {
                layer,
                entry: shown.clone(),
                source,
            };
            let (parent, name) = split(&rel);
            let name_bytes = name.as_bytes();
            if name_bytes == OPAQUE.as_bytes() {
                stats.whiteouts += 1;
                let dir = self.dir(parent).map_err(failed)?;
                hide_lower(&dir, parent, &placed).map_err(failed)?;
                continue;
            }
            if let Some(hidden) = name_bytes.strip_prefix(WHITEOUT.as_bytes()) {
                stats.whiteouts += 1;
                // `.wh..wh.*` names are the format's own; `.wh.`, `.wh..`
                // and `.wh...` would name the directory or its parent.
                if hidden.starts_with(WHITEOUT.as_bytes()) || matches!(hidden, b"" | b"." | b"..") {
                    continue;
                }
                match self.resolve(parent) {
                    Ok(dir) => remove_any(&dir.join(OsStr::from_bytes(hidden))).map_err(failed)?,
                    // Nothing to hide under a directory that is not there.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(failed(e)),
                }
                continue;
            }
            let target = self.dir(parent).map_err(failed)?.join(name);
            // Old (pre-ustar) archives mark directories with a slash only,
            // as tar itself then unpacks them.
            let is_dir = kind.is_dir()
                || entry.header().as_ustar().is_none()
                    && raw.as_os_str().as_bytes().ends_with(b"/");
            // A directory stays (and merges); anything else is replaced.
            match fs::symlink_metadata(&target) {
                Ok(m) if m.is_dir() && is_dir => {}
                Ok(_) => remove_any(&target).map_err(failed)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(failed(e)),
            }
            placed.insert(&rel);
            if kind.is_hard_link() {
                let link = entry
                    .link_name()
                    .map_err(failed)?
                    .ok_or_else(|| failed(io::Error::other("a hard link without a target")))?
                    .into_owned();
                let link_rel = clean(&link).ok_or_else(|| UnpackError::Escapes {
                    layer,
                    entry: link.to_string_lossy().into_owned(),
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
                let xattrs = kept_xattrs(&mut entry).map_err(failed)?;
                if kind.is_file() {
                    stats.bytes += entry.size();
                }
                entry.unpack(&target).map_err(failed)?;
                // After unpack's chown, which would clear a capability.
                for (name, value) in xattrs {
                    rustix::fs::lsetxattr(&target, name, &value, rustix::fs::XattrFlags::empty())
                        .map_err(|e| failed(io::Error::from(e)))?;
                    stats.xattrs += 1;
                }
            }
        }
        // The rest of the stream (tar's end blocks, padding) counts in the
        // layer's digest.
        io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(bad_archive)?;
        Ok(stats)
    }
}

/// The entry's extended attributes that we keep, from its PAX header.
fn kept_xattrs<R: Read>(entry: &mut tar::Entry<R>) -> io::Result<Vec<(&'static str, Vec<u8>)>> {
    let mut out = Vec::new();
    let Some(extensions) = entry.pax_extensions()? else {
        return Ok(out);
    };
    for ext in extensions {
        let ext = ext?;
        let Some(name) = ext.key().ok().and_then(|k| k.strip_prefix(PAX_XATTR)) else {
            continue;
        };
        if let Some(kept) = KEPT_XATTRS.iter().find(|k| **k == name) {
            out.push((*kept, ext.value_bytes().to_vec()));
        }
    }
    Ok(out)
}

/// The paths a layer placed, and every directory above them (a layer may
/// hold `a/b/c` without an entry for `a/b`).
#[derive(Default)]
struct Placed {
    paths: HashSet<PathBuf>,
    ancestors: HashSet<PathBuf>,
}

impl Placed {
    fn insert(&mut self, rel: &Path) {
        self.paths.insert(rel.to_path_buf());
        for a in rel.ancestors().skip(1) {
            if a.as_os_str().is_empty() || !self.ancestors.insert(a.to_path_buf()) {
                break;
            }
        }
    }

    fn contains(&self, rel: &Path) -> bool {
        self.paths.contains(rel) || self.ancestors.contains(rel)
    }
}

/// Removes from `dir` (the image path `rel`) everything a lower layer put
/// there: all but what this layer placed, looking inside the directories
/// it placed (or placed something in) too.
fn hide_lower(dir: &Path, rel: &Path, placed: &Placed) -> io::Result<()> {
    for child in fs::read_dir(dir)? {
        let child = child?;
        let child_rel = rel.join(child.file_name());
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

/// An entry's path relative to the root (`./a//b/` is `a/b`), byte for
/// byte, or None if it names `..`.
fn clean(raw: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::ParentDir => return None,
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    Some(out)
}

/// A symlink's target inside the root: `..` resolved lexically, never
/// above the top (as RESOLVE_IN_ROOT does).
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// `a/b/c` as (`a/b`, `c`); `c` as (``, `c`).
fn split(rel: &Path) -> (&Path, &OsStr) {
    (
        rel.parent().unwrap_or(Path::new("")),
        rel.file_name().unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::pax_record;
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
            if path.contains("..") || path.contains('é') {
                // The builder refuses such names: written raw, as a
                // hostile layer would have them (é as Latin-1's one byte).
                let name: Vec<u8> = path
                    .chars()
                    .map(|c| if c == 'é' { 0xe9 } else { c as u8 })
                    .collect();
                h.as_mut_bytes()[..name.len()].copy_from_slice(&name);
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                let data: &[u8] = if let E::File(_, d, ..) = e { d } else { &[] };
                h.set_size(data.len() as u64);
                if let E::Hard(_, t) = e {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_link_name(t).ok();
                    h.as_mut_bytes()[157..157 + t.len()].copy_from_slice(t.as_bytes());
                }
                h.set_cksum();
                b.append(&h, data).unwrap();
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
        rustix::process::geteuid().is_root()
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

    /// Whiteouts that would name the directory itself or its parent are
    /// not whiteouts; an opaque marker keeps what its layer placed below
    /// directories it has no entries for; names need not be UTF-8.
    #[test]
    fn odd_whiteouts_implicit_directories_and_byte_names() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::open(d.path()).unwrap();
        let latin1 = "café".to_string();
        apply(
            &root,
            1,
            &[
                E::File("usr/bin/sh", b"sh", 0o755, 0),
                E::File("a/lower", b"l", 0o644, 0),
                E::File(&latin1, b"latin-1", 0o644, 0),
            ],
        )
        .unwrap();
        apply(
            &root,
            2,
            &[
                E::File("usr/.wh...", b"", 0o644, 0),
                E::File("usr/bin/.wh..", b"", 0o644, 0),
                E::File(".wh.", b"", 0o644, 0),
                E::File("usr/.wh..wh.plnk", b"", 0o644, 0),
                E::File("a/b/c", b"c", 0o644, 0),
                E::File("a/.wh..wh..opq", b"", 0o644, 0),
            ],
        )
        .unwrap();
        assert_eq!(fs::read(d.path().join("usr/bin/sh")).unwrap(), b"sh");
        assert_eq!(fs::read(d.path().join("a/b/c")).unwrap(), b"c");
        assert!(!exists(d.path().join("a/lower")));
        let name = OsStr::from_bytes(b"caf\xe9");
        assert_eq!(fs::read(d.path().join::<&OsStr>(name)).unwrap(), b"latin-1");
        apply(
            &root,
            3,
            &[E::File(&format!(".wh.{latin1}"), b"", 0o644, 0)],
        )
        .unwrap();
        assert!(!exists(d.path().join::<&OsStr>(name)));
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

    /// Needs root (CAP_SETFCAP), as making a disk does.
    #[test]
    fn file_capabilities_are_kept_and_other_xattrs_dropped() {
        if !is_root() {
            eprintln!("not root: file capabilities cannot be set");
            return;
        }
        let cap = crate::test_util::CAP_NET_RAW;
        let pax = [
            pax_record("SCHILY.xattr.security.capability", &cap),
            pax_record("SCHILY.xattr.user.note", b"dropped"),
        ]
        .concat();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_path("PaxHeaders/ping").unwrap();
        h.set_mode(0o644);
        h.set_size(pax.len() as u64);
        h.set_cksum();
        b.append(&h, pax.as_slice()).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_path("bin/ping").unwrap();
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1);
        h.set_size(4);
        h.set_cksum();
        b.append(&h, &b"ping"[..]).unwrap();
        let d = tempfile::tempdir().unwrap();
        let root = Root::open(d.path()).unwrap();
        let stats = root
            .apply_layer(1, b.into_inner().unwrap().as_slice())
            .unwrap();
        assert_eq!(stats.xattrs, 1);
        let ping = d.path().join("bin/ping");
        let mut got = [0u8; 64];
        let n = rustix::fs::lgetxattr(&ping, "security.capability", &mut got[..]).unwrap();
        assert_eq!(&got[..n], &cap);
        assert!(rustix::fs::lgetxattr(&ping, "user.note", &mut got[..]).is_err());
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
        let c = |p: &str| clean(Path::new(p));
        assert_eq!(c("./a//b/"), Some(PathBuf::from("a/b")));
        assert_eq!(c("/etc/passwd"), Some(PathBuf::from("etc/passwd")));
        assert_eq!(c("./"), Some(PathBuf::new()));
        assert_eq!(c("a/../b"), None);
        assert_eq!(
            split(Path::new("a/b/c")),
            (Path::new("a/b"), OsStr::new("c"))
        );
        assert_eq!(split(Path::new("c")), (Path::new(""), OsStr::new("c")));
        assert_eq!(lexical(Path::new("/a/../../b/./c")), PathBuf::from("b/c"));
    }
}
