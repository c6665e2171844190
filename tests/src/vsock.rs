//! The host side of the guest's vsock, as a program on the host uses it,
//! and the test pattern `vmm-netserve` sends.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Connects through the VMM's socket `uds` to the guest's vsock `port`
/// (`CONNECT <port>`, answered `OK <host port>`); returns the stream and
/// the host port.
pub fn connect(uds: &Path, port: u32) -> std::io::Result<(UnixStream, u32)> {
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Byte by byte: what follows the line is the guest's.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if s.read(&mut b)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!("closed after {:?}", String::from_utf8_lossy(&line)),
            ));
        }
        line.push(b[0]);
    }
    let text = String::from_utf8_lossy(&line);
    let host_port = text
        .trim()
        .strip_prefix("OK ")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad answer {text:?}")))?;
    Ok((s, host_port))
}

/// The test pattern's byte at offset `i` (as `vmm-netserve source` sends).
pub fn pattern(i: u64) -> u8 {
    (i ^ (i >> 8) ^ (i >> 16)).wrapping_mul(31) as u8
}

/// FNV-1a 64 (as `vmm-netserve sink` answers).
pub fn fnv(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

pub const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// Reads `source`'s stream to its end; checks every byte against the
/// pattern. Returns how many bytes came.
pub fn read_pattern(s: &mut impl Read) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(at);
        }
        for (k, &b) in buf[..n].iter().enumerate() {
            if b != pattern(at + k as u64) {
                return Err(std::io::Error::other(format!(
                    "byte {} is {b:#x}, the pattern says {:#x}",
                    at + k as u64,
                    pattern(at + k as u64)
                )));
            }
        }
        at += n as u64;
    }
}

/// Sends `len` bytes of the pattern to a `sink` and checks its answer
/// (count and FNV-1a); the stream must be half-closable.
pub fn sink_pattern(s: &mut UnixStream, len: u64) -> std::io::Result<()> {
    s.write_all(b"sink\n")?;
    let mut hash = FNV_START;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        for (k, b) in buf[..n].iter_mut().enumerate() {
            *b = pattern(at + k as u64);
        }
        s.write_all(&buf[..n])?;
        hash = fnv(hash, &buf[..n]);
        at += n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    let want = format!("{len} {hash:016x}");
    if line.trim() != want {
        return Err(std::io::Error::other(format!(
            "the guest got {:?}, sent {want:?}",
            line.trim()
        )));
    }
    Ok(())
}
