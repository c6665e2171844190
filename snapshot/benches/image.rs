//! Writes and reads a guest-memory image of realistic content (about 50%
//! zero pages, 35% text/code-like pages, 15% random pages, in runs as in a
//! real guest) to a file and through a pipe, for each compression, and
//! prints throughput in GB/s (10^9 bytes) of guest memory, medians over a
//! few runs with the spread, and the size ratio.
//!
//! `cargo bench -p snapshot`; `SNAP_BENCH_MIB=256` for a quicker run,
//! `SNAP_BENCH_RUNS=5` for more runs. Files go to the system temp dir and
//! stay in the page cache (no fsync): this measures the format, not the disk.
//! Reads go into fresh, untouched memory like a restore's, so page faults
//! on the non-zero pages are part of the figure.

use std::io::{BufReader, BufWriter, Read, Write};
use std::time::Instant;

use snapshot::{
    ApplyOptions, Compression, EncodeOptions, Header, ImageReader, ImageWriter, Kind, Section,
    PAGE_SIZE,
};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const WORDS: &[&str] = &[
    "the",
    "kernel",
    "struct",
    "page",
    "return",
    "static",
    "int",
    "void",
    "if",
    "else",
    "for",
    "while",
    "mutex_lock",
    "spin_unlock",
    "NULL",
    "const",
    "char",
    "unsigned",
    "long",
    "sizeof",
    "->",
    "0x",
    "err",
    "goto",
    "out",
    "free",
    "alloc",
    "task",
    "inode",
    "file",
    "buffer",
    "len",
    "offset",
    "count",
    "flags",
    "state",
    "list_head",
    "next",
    "prev",
    "data",
    "{",
    "}",
    "(",
    ")",
    ";",
    "=",
    "==",
    "&&",
    "||",
    "!",
    "+",
    "-",
    "*",
    "/",
    "GFP_KERNEL",
    "EINVAL",
    "ENOMEM",
    "/usr/lib/x86_64-linux-gnu",
    "libc.so.6",
    "PATH=/usr/bin",
    "systemd",
    "journal",
    "[",
    "]",
];

/// Instruction-like byte sequences (prologues, movs, calls, rets).
const CODE: &[&[u8]] = &[
    &[0x55, 0x48, 0x89, 0xe5],
    &[0x48, 0x83, 0xec, 0x20],
    &[0xe8, 0x00, 0x00, 0x00, 0x00],
    &[0x48, 0x8b, 0x45, 0xf8],
    &[0x89, 0x7d, 0xfc],
    &[0xc3],
    &[0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x48, 0x85, 0xc0, 0x74, 0x05],
    &[0x31, 0xc0],
    &[0x5d],
];

fn text_page(r: &mut Rng, page: &mut [u8]) {
    let mut i = 0;
    while i < page.len() {
        let w = WORDS[r.below(WORDS.len() as u64) as usize].as_bytes();
        let n = w.len().min(page.len() - i);
        page[i..i + n].copy_from_slice(&w[..n]);
        i += n;
        if i < page.len() {
            page[i] = if r.below(8) == 0 { b'\n' } else { b' ' };
            i += 1;
        }
    }
}

fn code_page(r: &mut Rng, page: &mut [u8]) {
    let mut i = 0;
    while i < page.len() {
        let c = CODE[r.below(CODE.len() as u64) as usize];
        let n = c.len().min(page.len() - i);
        page[i..i + n].copy_from_slice(&c[..n]);
        if n == 5 && c[0] == 0xe8 {
            // A call's target differs from call to call.
            page[i + 1] = r.next() as u8;
            page[i + 2] = r.next() as u8;
        }
        i += n;
    }
}

/// Guest memory in runs of 1 to 64 pages: 50% zero, 35% text or code,
/// 15% random.
fn guest_memory(bytes: usize) -> Vec<u8> {
    let mut mem = vec![0u8; bytes];
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    let pages = bytes / PAGE_SIZE;
    let mut p = 0;
    while p < pages {
        let run = (1 + r.below(64) as usize).min(pages - p);
        let kind = r.below(100);
        for q in p..p + run {
            let page = &mut mem[q * PAGE_SIZE..(q + 1) * PAGE_SIZE];
            match kind {
                0..50 => {}
                50..70 => text_page(&mut r, page),
                70..85 => code_page(&mut r, page),
                _ => {
                    for c in page.chunks_exact_mut(8) {
                        c.copy_from_slice(&r.next().to_le_bytes());
                    }
                }
            }
        }
        p += run;
    }
    mem
}

fn write_image<W: Write>(out: W, mem: &[u8], c: Compression) -> (W, u64) {
    let h = Header::new("x86_64", "bench", (0, 0, 0), 0);
    let mut w = ImageWriter::new(out, &h).unwrap();
    w.write_state(Kind::VM, "machine", &(1u32, "bench"))
        .unwrap();
    let opts = EncodeOptions {
        compression: c,
        ..Default::default()
    };
    w.write_memory(&[(0, mem)], None, opts).unwrap();
    let (out, summary) = w.finish().unwrap();
    (out, summary.bytes)
}

fn read_image<R: Read>(input: R, len: usize) -> Vec<u8> {
    let mut r = ImageReader::new(input).unwrap();
    r.skip_to_memory().unwrap();
    let mut mem = vec![0u8; len];
    let (_, next) = r
        .read_memory_into(&mut [(0, &mut mem[..])], ApplyOptions::default())
        .unwrap();
    assert!(matches!(next, Section::End));
    mem
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let mib: usize = std::env::var("SNAP_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let runs: usize = std::env::var("SNAP_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    let bytes = mib << 20;
    let t = Instant::now();
    let mem = guest_memory(bytes);
    let zero = mem
        .chunks_exact(PAGE_SIZE)
        .filter(|p| p.iter().all(|&b| b == 0))
        .count() as f64
        / (bytes / PAGE_SIZE) as f64;
    println!(
        "guest memory: {mib} MiB, {:.0}% zero pages (generated in {:.1} s); {} cores; {runs} runs each, median [min..max]",
        zero * 100.0,
        t.elapsed().as_secs_f64(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    println!(
        "{:<8} {:<5} {:>24} {:>24} {:>10} {:>7}",
        "mode", "to", "write GB/s", "read GB/s", "image MiB", "ratio"
    );
    let gb = bytes as f64 / 1e9;
    let dir = tempfile::tempdir().unwrap();
    for c in [
        Compression::None,
        Compression::Zstd(1),
        Compression::Zstd(3),
    ] {
        let path = dir.path().join("image");
        // To a file.
        let mut w_file = Vec::new();
        let mut r_file = Vec::new();
        let mut size = 0;
        for _ in 0..runs {
            let t = Instant::now();
            let f = std::fs::File::create(&path).unwrap();
            let (out, n) = write_image(BufWriter::with_capacity(1 << 20, f), &mem, c);
            drop(out.into_inner().unwrap());
            w_file.push(gb / t.elapsed().as_secs_f64());
            size = n;
            let t = Instant::now();
            let f = std::fs::File::open(&path).unwrap();
            let got = read_image(BufReader::with_capacity(1 << 20, f), bytes);
            r_file.push(gb / t.elapsed().as_secs_f64());
            assert!(got == mem, "{c}: restored memory differs");
        }
        // Through a pipe: a thread drains (write) or feeds (read) it.
        let image = std::fs::read(&path).unwrap();
        let mut w_pipe = Vec::new();
        let mut r_pipe = Vec::new();
        for _ in 0..runs {
            let (mut rx, tx) = std::io::pipe().unwrap();
            let drain =
                std::thread::spawn(move || std::io::copy(&mut rx, &mut std::io::sink()).unwrap());
            let t = Instant::now();
            let (out, n) = write_image(BufWriter::with_capacity(1 << 20, tx), &mem, c);
            drop(out.into_inner().unwrap());
            assert_eq!(drain.join().unwrap(), n);
            w_pipe.push(gb / t.elapsed().as_secs_f64());

            let (rx, mut tx) = std::io::pipe().unwrap();
            let t = Instant::now();
            let got = std::thread::scope(|s| {
                s.spawn(|| {
                    tx.write_all(&image).unwrap();
                    drop(tx);
                });
                read_image(BufReader::with_capacity(1 << 20, rx), bytes)
            });
            r_pipe.push(gb / t.elapsed().as_secs_f64());
            assert!(got == mem, "{c}: restored memory differs");
        }
        let fmt = |v: &Vec<f64>| {
            let (m, lo, hi) = stats(v.clone());
            format!("{m:.2} [{lo:.2}..{hi:.2}]")
        };
        let ratio = bytes as f64 / size as f64;
        let mib_out = size as f64 / (1 << 20) as f64;
        println!(
            "{:<8} {:<5} {:>24} {:>24} {:>10.1} {:>7.2}",
            c.to_string(),
            "file",
            fmt(&w_file),
            fmt(&r_file),
            mib_out,
            ratio
        );
        println!(
            "{:<8} {:<5} {:>24} {:>24} {:>10.1} {:>7.2}",
            c.to_string(),
            "pipe",
            fmt(&w_pipe),
            fmt(&r_pipe),
            mib_out,
            ratio
        );
    }
}
