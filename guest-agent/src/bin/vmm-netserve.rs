//! A TCP server for the network tests and benchmarks, run inside the guest:
//!
//!     vmm run --net tap=tap0,ip=10.0.0.2/24 -- vmm-netserve PORT
//!
//! Each connection starts with one command line:
//! - `echo`: sends back everything it receives, until the client closes;
//! - `sink`: reads until the client shuts its side, then answers with the
//!   byte count and a newline (host to guest throughput);
//! - `source N`: sends N bytes, then closes (guest to host throughput).
//!
//! It prints `listening on PORT` once it accepts connections.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};

fn serve(stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut out = stream;
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
            let mut total = 0u64;
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            writeln!(out, "{total}")
        }
        Some("source") => {
            let mut left: u64 = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            let buf = vec![0x5au8; 256 << 10];
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                out.write_all(&buf[..n])?;
                left -= n as u64;
            }
            Ok(())
        }
        _ => writeln!(out, "unknown command {line:?}"),
    }
}

fn main() {
    let port: u16 = match std::env::args().nth(1).map(|p| p.parse()) {
        Some(Ok(p)) => p,
        _ => {
            eprintln!("usage: vmm-netserve PORT");
            std::process::exit(2);
        }
    };
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("vmm-netserve: cannot listen on port {port}: {e}");
            std::process::exit(1);
        }
    };
    println!("listening on {port}");
    let _ = std::io::stdout().flush();
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                std::thread::spawn(move || {
                    if let Err(e) = serve(s) {
                        eprintln!("vmm-netserve: {e}");
                    }
                });
            }
            Err(e) => eprintln!("vmm-netserve: accept: {e}"),
        }
    }
}
