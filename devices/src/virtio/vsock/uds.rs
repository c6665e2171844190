//! The host end of vsock: a Unix socket the VMM listens on, with
//! Firecracker's convention. A host program connects to it and writes
//! `CONNECT <port>\n` to reach a guest listener on that port (answered
//! `OK <host port>\n`); a guest connecting to the host (CID 2) on port P
//! reaches whoever listens on `PATH_P`.

use std::io::{self, ErrorKind};
use std::os::linux::fs::MetadataExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum UdsError {
    #[error("{0} exists and is not a socket; not replacing it")]
    NotSocket(PathBuf),
    #[error("{0} is in use: a process is listening on it")]
    InUse(PathBuf),
    #[error("cannot listen on {0}")]
    Bind(PathBuf, #[source] io::Error),
}

/// The socket `vmm` listens on, removed when dropped if it is still ours.
#[derive(Debug)]
pub struct HostListener {
    pub listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket we made.
    id: (u64, u64),
}

impl HostListener {
    /// Listens on `path`. A socket nobody answers on (left by a VMM that
    /// died) is replaced; anything else there is refused.
    pub fn bind(path: &Path) -> Result<Self, UdsError> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if !m.file_type().is_socket() => {
                return Err(UdsError::NotSocket(path.to_path_buf()))
            }
            Ok(_) => match UnixStream::connect(path) {
                Ok(_) => return Err(UdsError::InUse(path.to_path_buf())),
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    log::info!("vsock: replacing stale socket {}", path.display());
                    std::fs::remove_file(path)
                        .map_err(|e| UdsError::Bind(path.to_path_buf(), e))?;
                }
                Err(e) => return Err(UdsError::Bind(path.to_path_buf(), e)),
            },
            Err(_) => {}
        }
        let listener =
            UnixListener::bind(path).map_err(|e| UdsError::Bind(path.to_path_buf(), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| UdsError::Bind(path.to_path_buf(), e))?;
        let m =
            std::fs::symlink_metadata(path).map_err(|e| UdsError::Bind(path.to_path_buf(), e))?;
        Ok(HostListener {
            listener,
            path: path.to_path_buf(),
            id: (m.st_dev(), m.st_ino()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where a guest's connection to host port `port` goes.
    pub fn port_path(&self, port: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!("_{port}"));
        p.into()
    }
}

impl Drop for HostListener {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| (m.st_dev(), m.st_ino()) == self.id);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Parses the host's `CONNECT <port>` line (without its newline).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let port = s.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_parse() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"connect 52"), None);
        assert_eq!(parse_connect(b"CONNECT x"), None);
    }

    #[test]
    fn stale_sockets_are_replaced_and_other_files_kept() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vmm-uds").unwrap();
        let dir_path = dir.as_path().to_path_buf();
        let path = dir_path.join("v.sock");
        let first = HostListener::bind(&path).unwrap();
        assert!(matches!(HostListener::bind(&path), Err(UdsError::InUse(_))));
        drop(first);
        // A socket whose listener is gone (its VMM was killed).
        drop(UnixListener::bind(&path).unwrap());
        let l = HostListener::bind(&path).unwrap();
        assert_eq!(
            l.port_path(5000),
            dir_path.join("v.sock_5000"),
            "guest-initiated connections go to PATH_PORT"
        );
        drop(l);
        assert!(!path.exists(), "our socket goes with us");

        let file = dir_path.join("notes.txt");
        std::fs::write(&file, "data").unwrap();
        assert!(matches!(
            HostListener::bind(&file),
            Err(UdsError::NotSocket(_))
        ));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
    }
}
