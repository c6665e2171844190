//! A TCP or vsock server for the network tests and benchmarks, run inside
//! the guest:
//!
//!     vmm run --net tap=tap0,ip=10.0.0.2/24 -- vmm-netserve PORT
//!     vmm-netserve --vsock PORT         # listens on vsock PORT instead
//!     vmm-netserve --vsock-hold PORT    # connects to the host's vsock PORT
//!
//! Each connection to a listener starts with one command line:
//! - `echo`: sends back everything it receives, until the client closes;
//! - `sink`: reads until the client shuts its side, then answers
//!   `<byte count> <FNV-1a 64 of the bytes, hex>\n`;
//! - `source N`: sends N bytes of the test pattern (byte i is
//!   `pattern(i)`), then closes.
//!
//! `--vsock-hold` keeps one connection to the host open, echoing what it
//! receives; when it fails (a restore resets vsock) it prints why, connects
//! again and says so, so a test sees both on the console.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use guest_agent::sys::vsock;

/// The test pattern's byte at offset `i`.
fn pattern(i: u64) -> u8 {
    (i ^ (i >> 8) ^ (i >> 16)).wrapping_mul(31) as u8
}

fn serve<S: Read + Write>(reader: S, mut out: S) -> std::io::Result<()> {
    let mut reader = BufReader::with_capacity(256 << 10, reader);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut words = line.split_whitespace();
    match words.next() {
        Some("echo") => {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                out.write_all(&buf[..n])?;
            }
        }
        Some("sink") => {
            let mut buf = vec![0u8; 256 << 10];
            let (mut total, mut hash) = (0u64, 0xcbf2_9ce4_8422_2325u64);
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                for &b in &buf[..n] {
                    hash = (hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
                }
                total += n as u64;
            }
            writeln!(out, "{total} {hash:016x}")
        }
        Some("source") => {
            let total: u64 = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            let mut buf = vec![0u8; 256 << 10];
            let mut sent = 0u64;
            while sent < total {
                let n = (total - sent).min(buf.len() as u64) as usize;
                for (k, b) in buf[..n].iter_mut().enumerate() {
                    *b = pattern(sent + k as u64);
                }
                out.write_all(&buf[..n])?;
                sent += n as u64;
            }
            Ok(())
        }
        _ => writeln!(out, "unknown command {line:?}"),
    }
}

fn spawn_serve<S: Read + Write + Send + 'static>(reader: S, out: S) {
    std::thread::spawn(move || {
        if let Err(e) = serve(reader, out) {
            eprintln!("vmm-netserve: {e}");
        }
    });
}

fn tcp(port: u16) -> std::io::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    println!("listening on {port}");
    let _ = std::io::stdout().flush();
    for stream in listener.incoming() {
        match stream.and_then(|s| {
            s.set_nodelay(true)?;
            Ok((s.try_clone()?, s))
        }) {
            Ok((r, w)) => spawn_serve(r, w),
            Err(e) => eprintln!("vmm-netserve: accept: {e}"),
        }
    }
    Ok(())
}

fn vsock_listen(port: u32) -> std::io::Result<()> {
    let listener = vsock::listen(port)?;
    println!("vsock listening on {port}");
    let _ = std::io::stdout().flush();
    loop {
        match vsock::accept(&listener).and_then(|fd| {
            let s = UnixStream::from(fd);
            Ok((s.try_clone()?, s))
        }) {
            Ok((r, w)) => spawn_serve(r, w),
            Err(e) => eprintln!("vmm-netserve: vsock accept: {e}"),
        }
    }
}

fn vsock_hold(port: u32) -> ! {
    let mut rounds = 0u32;
    loop {
        let mut s = match vsock::connect(vsock::HOST_CID, port) {
            Ok(fd) => UnixStream::from(fd),
            Err(_) => {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        rounds += 1;
        println!("vsock-hold connected {rounds}");
        let _ = std::io::stdout().flush();
        let mut buf = [0u8; 4096];
        let why = loop {
            match s.read(&mut buf) {
                Ok(0) => break "closed by the host".to_string(),
                Ok(n) => {
                    if let Err(e) = s.write_all(&buf[..n]) {
                        break e.to_string();
                    }
                }
                Err(e) => break e.to_string(),
            }
        };
        println!("vsock-hold lost: {why}");
        let _ = std::io::stdout().flush();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let port = |s: Option<&String>| s.and_then(|p| p.parse::<u32>().ok());
    let result = match args.first().map(String::as_str) {
        Some("--vsock") => port(args.get(1)).map(vsock_listen),
        Some("--vsock-hold") => port(args.get(1)).map(|p| vsock_hold(p)),
        _ => port(args.first())
            .and_then(|p| u16::try_from(p).ok())
            .map(tcp),
    };
    match result {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            eprintln!("vmm-netserve: {e}");
            std::process::exit(1);
        }
        None => {
            eprintln!("usage: vmm-netserve [--vsock | --vsock-hold] PORT");
            std::process::exit(2);
        }
    }
}
