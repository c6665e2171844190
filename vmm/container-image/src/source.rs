//! Where an image's files come from: a directory (an OCI image layout, or
//! an unpacked `docker save`) or a tar archive of one (`docker save`,
//! `podman save`, an `oci-archive`). Files are named by their path inside.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

/// How deep a chain of symlinks inside an archive may go (docker's archives
/// link a layer shared by two images to the first copy).
const MAX_LINKS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot open {path}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is not a tar archive or an image directory (it reads as a damaged tar archive)"
    )]
    NotAnArchive {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot decompress {path}")]
    Decompress {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{image} has no file {name}")]
    Missing { image: String, name: String },
    #[error("{image}: {name} is a chain of links that does not end in a file")]
    LinkLoop { image: String, name: String },
    #[error("cannot read {name} of {image}")]
    Read {
        image: String,
        name: String,
        #[source]
        source: io::Error,
    },
}

/// A file inside an archive: where its bytes are, or what it links to.
#[derive(Debug, Clone)]
enum Member {
    File { offset: u64, size: u64 },
    Link(String),
}

#[derive(Debug)]
enum Kind {
    Dir(PathBuf),
    Archive {
        file: File,
        members: HashMap<String, Member>,
    },
}

/// An image's files, read by name.
#[derive(Debug)]
pub struct Source {
    /// As the user named it, for messages.
    display: String,
    kind: Kind,
}

impl Source {
    /// Opens a directory as is, or indexes a tar archive (one pass over its
    /// headers; the layers are read later, by offset).
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let display = path.display().to_string();
        let open_err = |source| SourceError::Open {
            path: display.clone(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(open_err)?;
        if meta.is_dir() {
            return Ok(Source {
                display,
                kind: Kind::Dir(path.to_path_buf()),
            });
        }
        let mut file = File::open(path).map_err(open_err)?;
        let mut magic = [0u8; 4];
        let n = read_up_to(&mut file, &mut magic).map_err(open_err)?;
        let gzip = n >= 2 && magic[..2] == [0x1f, 0x8b];
        let zstd = n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd];
        if gzip || zstd {
            // `docker save | gzip`, as docker load takes it: the tar is
            // read by offset, so it goes to an unnamed temporary file.
            file = decompressed(file, gzip).map_err(|source| SourceError::Decompress {
                path: display.clone(),
                source,
            })?;
        }
        let members = index_archive(&file).map_err(|source| SourceError::NotAnArchive {
            path: display.clone(),
            source,
        })?;
        if members.is_empty() {
            return Err(SourceError::NotAnArchive {
                path: display,
                source: io::Error::new(io::ErrorKind::InvalidData, "no files in it"),
            });
        }
        Ok(Source {
            display,
            kind: Kind::Archive { file, members },
        })
    }

    /// The image as the user named it.
    pub fn display(&self) -> &str {
        &self.display
    }

    /// Whether the image has a file `name`.
    pub fn has(&self, name: &str) -> bool {
        match &self.kind {
            Kind::Dir(d) => d.join(name).is_file(),
            Kind::Archive { members, .. } => members.contains_key(&normalize(name)),
        }
    }

    /// Reads file `name`, streaming.
    pub fn open_file(&self, name: &str) -> Result<Box<dyn Read + '_>, SourceError> {
        let missing = || SourceError::Missing {
            image: self.display.clone(),
            name: name.to_string(),
        };
        let read_err = |source| SourceError::Read {
            image: self.display.clone(),
            name: name.to_string(),
            source,
        };
        match &self.kind {
            Kind::Dir(d) => {
                let rel = normalize(name);
                if rel.is_empty() {
                    return Err(missing());
                }
                match File::open(d.join(rel)) {
                    Ok(f) => Ok(Box::new(f)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Err(missing()),
                    Err(e) => Err(read_err(e)),
                }
            }
            Kind::Archive { file, members } => {
                let mut key = normalize(name);
                for _ in 0..MAX_LINKS {
                    match members.get(&key) {
                        None => return Err(missing()),
                        Some(Member::Link(target)) => key = target.clone(),
                        Some(&Member::File { offset, size }) => {
                            let mut f = file.try_clone().map_err(read_err)?;
                            f.seek(SeekFrom::Start(offset)).map_err(read_err)?;
                            return Ok(Box::new(f.take(size)));
                        }
                    }
                }
                Err(SourceError::LinkLoop {
                    image: self.display.clone(),
                    name: name.to_string(),
                })
            }
        }
    }

    /// Reads the whole of a small file `name` (JSON documents), at most
    /// `limit` bytes.
    pub fn read_small(&self, name: &str, limit: u64) -> Result<Vec<u8>, SourceError> {
        let mut buf = Vec::new();
        self.open_file(name)?
            .take(limit + 1)
            .read_to_end(&mut buf)
            .map_err(|source| SourceError::Read {
                image: self.display.clone(),
                name: name.to_string(),
                source,
            })?;
        if buf.len() as u64 > limit {
            return Err(SourceError::Read {
                image: self.display.clone(),
                name: name.to_string(),
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("larger than {limit} bytes, too large for what it should be"),
                ),
            });
        }
        Ok(buf)
    }
}

/// `file` decompressed into an unnamed temporary file (gone when closed).
fn decompressed(file: File, gzip: bool) -> io::Result<File> {
    let mut out = tempfile::tempfile()?;
    let input = io::BufReader::new(file);
    if gzip {
        io::copy(&mut flate2::bufread::MultiGzDecoder::new(input), &mut out)?;
    } else {
        io::copy(
            &mut zstd::stream::read::Decoder::with_buffer(input)?,
            &mut out,
        )?;
    }
    out.seek(SeekFrom::Start(0))?;
    Ok(out)
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    f.seek(SeekFrom::Start(0))?;
    Ok(n)
}

/// The archive's regular files and links, by normalized path.
fn index_archive(file: &File) -> io::Result<HashMap<String, Member>> {
    let mut members = HashMap::new();
    let mut archive = tar::Archive::new(file);
    for entry in archive.entries()? {
        let entry = entry?;
        let path = normalize(&entry.path()?.to_string_lossy());
        let kind = entry.header().entry_type();
        if kind.is_file() {
            members.insert(
                path,
                Member::File {
                    offset: entry.raw_file_position(),
                    size: entry.size(),
                },
            );
        } else if kind.is_symlink() || kind.is_hard_link() {
            let Some(target) = entry.link_name()? else {
                continue;
            };
            let target = target.to_string_lossy();
            // A symlink is relative to its directory; a hard link names
            // another member.
            let resolved = if kind.is_symlink() && !target.starts_with('/') {
                let dir = Path::new(&path).parent().unwrap_or(Path::new(""));
                normalize(&dir.join(target.as_ref()).to_string_lossy())
            } else {
                normalize(&target)
            };
            members.insert(path, Member::Link(resolved));
        }
    }
    Ok(members)
}

/// `name` as a relative path without `.`, `..` resolved lexically and never
/// above the top: `./blobs/sha256/x`, `/blobs//sha256/x` and
/// `a/../blobs/sha256/x` are all `blobs/sha256/x`.
pub fn normalize(name: &str) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::ParentDir => {
                parts.pop();
            }
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    parts.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalized() {
        assert_eq!(normalize("./blobs/sha256/ab"), "blobs/sha256/ab");
        assert_eq!(normalize("/blobs//sha256/ab"), "blobs/sha256/ab");
        assert_eq!(normalize("x/../blobs/ab"), "blobs/ab");
        assert_eq!(normalize("../../etc/passwd"), "etc/passwd");
        assert_eq!(normalize("."), "");
    }

    /// A tar archive of (name, file content or symlink target).
    fn archive(entries: &[(&str, Result<&[u8], &str>)]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut b = tar::Builder::new(f.reopen().unwrap());
        for (name, what) in entries {
            let mut h = tar::Header::new_gnu();
            match what {
                Ok(d) => {
                    h.set_size(d.len() as u64);
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(0o644);
                    b.append_data(&mut h, name, *d).unwrap();
                }
                Err(l) => {
                    h.set_size(0);
                    h.set_entry_type(tar::EntryType::Symlink);
                    b.append_link(&mut h, name, l).unwrap();
                }
            }
        }
        b.finish().unwrap();
        f
    }

    fn read(s: &Source, name: &str) -> Result<String, SourceError> {
        let mut out = String::new();
        s.open_file(name)?.read_to_string(&mut out).unwrap();
        Ok(out)
    }

    #[test]
    fn archive_members_and_links_are_read_by_name() {
        let f = archive(&[
            ("./manifest.json", Ok(b"[]")),
            ("aa/layer.tar", Ok(b"layer bytes")),
            ("bb/layer.tar", Err("../aa/layer.tar")),
            ("loop1", Err("loop2")),
            ("loop2", Err("loop1")),
        ]);
        let s = Source::open(f.path()).unwrap();
        assert!(s.has("manifest.json"));
        assert_eq!(read(&s, "manifest.json").unwrap(), "[]");
        assert_eq!(read(&s, "bb/layer.tar").unwrap(), "layer bytes");
        assert!(matches!(
            read(&s, "nothing"),
            Err(SourceError::Missing { .. })
        ));
        assert!(matches!(
            read(&s, "loop1"),
            Err(SourceError::LinkLoop { .. })
        ));
        assert!(s.read_small("aa/layer.tar", 4).is_err());
    }

    #[test]
    fn garbage_and_compressed_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let garbage = d.path().join("garbage");
        std::fs::write(&garbage, vec![7u8; 2000]).unwrap();
        let e = Source::open(&garbage).unwrap_err();
        assert!(matches!(e, SourceError::NotAnArchive { .. }), "{e}");
        let gz = d.path().join("x.tar.gz");
        std::fs::write(&gz, [0x1f, 0x8b, 8, 0, 0, 0]).unwrap();
        assert!(matches!(
            Source::open(&gz).unwrap_err(),
            SourceError::Decompress { .. }
        ));
        let empty = d.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert!(Source::open(&empty).is_err());
        assert!(matches!(
            Source::open(&d.path().join("nothing")).unwrap_err(),
            SourceError::Open { .. }
        ));
    }

    #[test]
    fn compressed_archives_are_read_through() {
        let f = archive(&[("manifest.json", Ok(b"[1]"))]);
        let tar = std::fs::read(f.path()).unwrap();
        let d = tempfile::tempdir().unwrap();
        let gz = d.path().join("x.tar.gz");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut e, &tar).unwrap();
        std::fs::write(&gz, e.finish().unwrap()).unwrap();
        let zs = d.path().join("x.tar.zst");
        std::fs::write(&zs, zstd::encode_all(tar.as_slice(), 1).unwrap()).unwrap();
        for p in [gz, zs] {
            let s = Source::open(&p).unwrap();
            assert_eq!(read(&s, "manifest.json").unwrap(), "[1]");
        }
    }

    #[test]
    fn directories_are_read_in_place() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("blobs/sha256")).unwrap();
        std::fs::write(d.path().join("blobs/sha256/ab"), b"blob").unwrap();
        let s = Source::open(d.path()).unwrap();
        assert!(s.has("blobs/sha256/ab"));
        assert_eq!(read(&s, "./blobs/sha256/ab").unwrap(), "blob");
        assert!(matches!(
            read(&s, "index.json"),
            Err(SourceError::Missing { .. })
        ));
    }
}
