//! Container images for `vmm run --image`: an OCI image layout directory
//! or a `docker save` / `podman save` archive becomes an ext4 root disk
//! (its layers applied in order, with the guest agent added) and the
//! process its config describes (Entrypoint, Cmd, Env, WorkingDir, User).
//!
//! Root disks are cached by the image's id (its config's digest, which
//! names every layer's uncompressed content) and the agent's digest: the
//! same image saved by docker or as an OCI layout shares one disk, and a
//! new agent makes a new one. Nothing here runs a VM.
//!
//! Pulling from a registry is out of scope: images come as files.

pub mod cache;
pub mod select;
pub mod source;
pub mod unpack;
pub mod user;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use cache::{CacheError, CachedDisk, ImageCache, DEFAULT_MAX_BYTES};
pub use select::{SelectError, Selected};
pub use source::{Source, SourceError};

/// docker's PATH for a container whose image sets none.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Where the agent goes in the root (the kernel's `init=`).
pub const AGENT_PATH: &str = "sbin/vmm-agent";

/// An image chosen in its source, not yet unpacked.
#[derive(Debug)]
pub struct Image {
    /// As the user wrote it.
    pub reference: String,
    pub source: Source,
    pub selected: Selected,
}

impl Image {
    /// Opens `reference`: `PATH` or `PATH:TAG`, PATH an OCI layout
    /// directory or a docker/podman save archive.
    pub fn open(reference: &str) -> Result<Self, SelectError> {
        let (path, tag) = split_reference(reference);
        let source = Source::open(&path)?;
        let selected = select::select(&source, tag.as_deref())?;
        Ok(Image {
            reference: reference.to_string(),
            source,
            selected,
        })
    }

    /// `sha256:...` of the config.
    pub fn id(&self) -> &str {
        &self.selected.id
    }
}

/// `PATH:TAG` split where PATH names something that exists (paths may
/// hold colons too); otherwise the whole reference is the path.
pub fn split_reference(reference: &str) -> (PathBuf, Option<String>) {
    if Path::new(reference).exists() {
        return (PathBuf::from(reference), None);
    }
    for (i, _) in reference.match_indices(':') {
        let (path, tag) = (&reference[..i], &reference[i + 1..]);
        if !path.is_empty() && !tag.is_empty() && Path::new(path).exists() {
            return (PathBuf::from(path), Some(tag.to_string()));
        }
    }
    (PathBuf::from(reference), None)
}

/// The container's main process, from the image's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `NAME=value`: the config's Env, then PATH and HOME where it has none.
    pub env: Vec<String>,
    pub workdir: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the image has neither Entrypoint nor Cmd: give the command after --")]
pub struct NoCommand;

impl Process {
    /// What runs: Entrypoint, then `command` if given (as `docker run
    /// IMAGE CMD...` replaces Cmd), else Cmd.
    pub fn argv(&self, command: &[String]) -> Result<Vec<String>, NoCommand> {
        let tail = if command.is_empty() {
            &self.cmd
        } else {
            command
        };
        let argv: Vec<String> = self.entrypoint.iter().chain(tail).cloned().collect();
        if argv.is_empty() {
            return Err(NoCommand);
        }
        Ok(argv)
    }
}

/// A root disk ready to boot, and what to run on it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prepared {
    pub id: String,
    /// The reference it was first built from.
    pub reference: String,
    pub process: Process,
    #[serde(skip)]
    pub rootfs: PathBuf,
    /// Bytes of file content in the layers, once applied.
    pub content_bytes: u64,
    /// When the disk was made (unix seconds).
    #[serde(default)]
    pub created: u64,
}

#[cfg(test)]
mod test_util {
    /// cap_net_raw+ep as setcap writes it (vfs_cap_data revision 2).
    pub const CAP_NET_RAW: [u8; 20] = [
        1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];

    /// A PAX header record: its length counts itself.
    pub fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
        let body = [key.as_bytes(), b"=", value, b"\n"].concat();
        let mut len = body.len() + 2;
        while format!("{len} ").len() + body.len() != len {
            len += 1;
        }
        [format!("{len} ").as_bytes(), &body].concat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split_where_the_path_exists() {
        let d = tempfile::tempdir().unwrap();
        let archive = d.path().join("img.tar");
        std::fs::write(&archive, b"").unwrap();
        let a = archive.to_str().unwrap();
        assert_eq!(split_reference(a), (archive.clone(), None));
        assert_eq!(
            split_reference(&format!("{a}:v2")),
            (archive.clone(), Some("v2".into()))
        );
        assert_eq!(
            split_reference(&format!("{a}:busybox:latest")),
            (archive.clone(), Some("busybox:latest".into()))
        );
        let odd = d.path().join("with:colon");
        std::fs::create_dir(&odd).unwrap();
        let o = odd.to_str().unwrap();
        assert_eq!(split_reference(&format!("{o}:t")), (odd, Some("t".into())));
        assert_eq!(
            split_reference("/nonexistent:tag"),
            (PathBuf::from("/nonexistent:tag"), None)
        );
    }

    #[test]
    fn argv_is_entrypoint_then_command_or_cmd() {
        let p = Process {
            entrypoint: vec!["/bin/app".into(), "--flag".into()],
            cmd: vec!["default".into()],
            env: vec![],
            workdir: "/".into(),
            uid: 0,
            gid: 0,
            groups: vec![],
        };
        assert_eq!(p.argv(&[]).unwrap(), ["/bin/app", "--flag", "default"]);
        assert_eq!(p.argv(&["x".into()]).unwrap(), ["/bin/app", "--flag", "x"]);
        let none = Process {
            entrypoint: vec![],
            cmd: vec![],
            ..p
        };
        assert_eq!(none.argv(&[]), Err(NoCommand));
        assert_eq!(none.argv(&["sh".into()]).unwrap(), ["sh"]);
    }
}
