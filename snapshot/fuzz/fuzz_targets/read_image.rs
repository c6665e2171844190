//! Feeds arbitrary bytes to every reading path: the streaming reader with
//! memory restored into slices, `inspect --verify`, and the index with
//! random-access chunk reads. Any panic, overflow or runaway allocation is
//! a bug; errors are the expected outcome.

#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use snapshot::{ApplyOptions, ImageReader, Section};

/// Memory the fuzzer may make us allocate for a restore.
const MAX_RESTORE: u64 = 64 << 20;

fuzz_target!(|data: &[u8]| {
    let _ = snapshot::inspect::inspect(Cursor::new(data), true);
    stream(data);
    let mut c = Cursor::new(data);
    if let Ok((_, index)) = snapshot::open_index(&mut c) {
        for e in index.sections.iter().take(64) {
            if let Some((_, base, _)) = e.chunk {
                let _ = snapshot::read_memory_chunk(&mut c, &index, base);
                let _ = snapshot::read_chunk_at(&mut c, e.offset);
            }
        }
    }
});

fn stream(data: &[u8]) {
    let Ok(mut r) = ImageReader::new(Cursor::new(data)) else {
        return;
    };
    let mut section = r.next_section();
    for _ in 0..10_000 {
        section = match section {
            Ok(Section::Memory(layout)) if layout.total_bytes() <= MAX_RESTORE => {
                let mut mem: Vec<(u64, Vec<u8>)> = layout
                    .regions
                    .iter()
                    .map(|&(a, l)| (a, vec![0u8; l as usize]))
                    .collect();
                let mut regions: Vec<(u64, &mut [u8])> =
                    mem.iter_mut().map(|(a, m)| (*a, &mut m[..])).collect();
                let opts = ApplyOptions {
                    threads: 1 + data.len() % 2,
                    dest_is_zeroed: data.len() % 3 == 0,
                };
                r.read_memory_into(&mut regions, opts).map(|(_, s)| s)
            }
            Ok(Section::Chunk(c)) => {
                let _ = c.decode();
                r.next_section()
            }
            Ok(Section::State { .. }) => {
                let _: Result<(u32, String), _> = Section::decode(section.as_ref().unwrap());
                r.next_section()
            }
            Ok(Section::End) | Err(_) => return,
            Ok(_) => r.next_section(),
        };
    }
}
