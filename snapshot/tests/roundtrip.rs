//! Write → read round trips, and every way an image can be damaged.

use std::collections::BTreeMap;
use std::io::Cursor;

use proptest::prelude::*;
use snapshot::*;

const P: usize = PAGE_SIZE;

fn header(flags: u32, parent: Option<[u8; 16]>) -> Header {
    Header {
        arch: "x86_64".into(),
        cpu_vendor: "AuthenticAMD".into(),
        cpu_signature: (0x1a, 2, 1),
        image_id: new_image_id(),
        parent_id: parent,
        created_unix: 1_700_000_000,
        flags,
    }
}

#[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
struct FakeVcpu {
    rip: u64,
    regs: Vec<u64>,
}

/// Pages: 0 zero, 1 text-like, 2 random.
fn fill(kinds: &[u8], seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; kinds.len() * P];
    let mut x = seed | 1;
    for (i, k) in kinds.iter().enumerate() {
        let page = &mut out[i * P..(i + 1) * P];
        match k % 3 {
            0 => {}
            1 => {
                for (j, b) in page.iter_mut().enumerate() {
                    *b = b"the quick brown fox jumps over the lazy dog\n"[(i + j) % 44];
                }
            }
            _ => {
                for b in page.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
                page[0] |= 1;
            }
        }
    }
    out
}

#[derive(Debug)]
struct Read {
    header: Header,
    states: BTreeMap<(Kind, String), Vec<u8>>,
    memory: BTreeMap<u64, Vec<u8>>,
    disk: Vec<u8>,
}

/// Reads a whole image, applying memory chunks onto `base` (the parent's
/// memory for an incremental image).
fn read_all(img: &[u8], base: Option<BTreeMap<u64, Vec<u8>>>) -> Result<Read, SnapshotError> {
    let mut r = ImageReader::new(Cursor::new(img))?;
    let mut out = Read {
        header: r.header().clone(),
        states: BTreeMap::new(),
        memory: base.unwrap_or_default(),
        disk: Vec::new(),
    };
    let mut in_disk = false;
    loop {
        match r.next_section()? {
            Section::End => return Ok(out),
            Section::State {
                kind,
                name,
                payload,
            } => {
                out.states.insert((kind, name), payload);
            }
            Section::Memory(layout) => {
                for (a, l) in layout.regions {
                    out.memory.entry(a).or_insert_with(|| vec![0u8; l as usize]);
                }
            }
            Section::Disk(info) => {
                in_disk = true;
                out.disk = vec![0u8; info.size as usize];
            }
            Section::Chunk(raw) => {
                let c = raw.decode()?;
                for (addr, page) in c.pages() {
                    let bytes: &[u8] = match page {
                        Page::Absent => continue,
                        Page::Zero => &[0u8; P],
                        Page::Data(d) => d,
                    };
                    if in_disk {
                        let a = addr as usize;
                        let end = (a + P).min(out.disk.len());
                        out.disk[a..end].copy_from_slice(&bytes[..end - a]);
                    } else {
                        let (base, region) = out
                            .memory
                            .range_mut(..=addr)
                            .next_back()
                            .expect("chunk inside a region");
                        let off = (addr - base) as usize;
                        region[off..off + P].copy_from_slice(bytes);
                    }
                }
            }
            Section::Skipped { .. } => {}
        }
    }
}

fn write_image(
    h: &Header,
    regions: &[(u64, &[u8])],
    dirty: Option<&[Vec<u64>]>,
    disk: Option<&[u8]>,
    compression: Compression,
    chunk_pages: u32,
) -> Vec<u8> {
    let mut w = ImageWriter::new(Vec::new(), h).unwrap();
    w.write_state(Kind::VM, "machine", &("x86_64", 256u64))
        .unwrap();
    w.write_state(
        Kind::VCPU,
        "0",
        &FakeVcpu {
            rip: 0xffff_ffff_8100_0000,
            regs: vec![1, 2, 3],
        },
    )
    .unwrap();
    w.write_state(Kind::DEVICE, "serial", &vec![1u8, 2, 3])
        .unwrap();
    let opts = EncodeOptions {
        compression,
        chunk_pages,
        threads: 2,
    };
    w.write_memory(regions, dirty, opts).unwrap();
    if let Some(d) = disk {
        w.write_disk("vda", &d, opts).unwrap();
    }
    w.finish().unwrap().0
}

fn sample() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let kinds: Vec<u8> = (0..300u32).map(|i| (i * 7 % 5) as u8).collect();
    let low = fill(&kinds[..40], 1);
    let high = fill(&kinds[40..], 2);
    let mut disk = fill(&kinds[..20], 3);
    disk.truncate(disk.len() - 1000);
    (low, high, disk)
}

#[test]
fn full_image_round_trips_in_every_compression() {
    let (low, high, disk) = sample();
    for c in [
        Compression::None,
        Compression::Zstd(1),
        Compression::Zstd(3),
    ] {
        let h = header(flags::HAS_DISK, None);
        let img = write_image(
            &h,
            &[(0, &low), (0x10_0000, &high)],
            None,
            Some(&disk),
            c,
            16,
        );
        let r = read_all(&img, None).unwrap();
        assert_eq!(r.header, h);
        assert_eq!(r.memory[&0], low);
        assert_eq!(r.memory[&0x10_0000], high);
        assert_eq!(r.disk, disk);
        let v: FakeVcpu = decode_state("vcpu 0", &r.states[&(Kind::VCPU, "0".into())]).unwrap();
        assert_eq!(v.rip, 0xffff_ffff_8100_0000);
        // inspect agrees, and zero pages were not stored.
        let rep = inspect::inspect(Cursor::new(&img), true).unwrap();
        let m = rep.memory.unwrap();
        assert_eq!(m.pages, 300);
        assert!(m.zero_share > 0.15, "{}", m.zero_share);
        assert_eq!(rep.disks.len(), 1);
        assert_eq!(rep.total_bytes, img.len() as u64 - 16 - rep_index_len(&img));
        let quick = inspect::inspect(Cursor::new(&img), false).unwrap();
        assert_eq!(quick.memory.unwrap().zero_pages, m.zero_pages);
    }
}

/// Bytes of the index and footer after END.
fn rep_index_len(img: &[u8]) -> u64 {
    let idx = read_index(&mut Cursor::new(img)).unwrap();
    let end = idx.sections.last().unwrap();
    img.len() as u64 - 16 - end.offset - 20
}

#[test]
fn truncation_anywhere_is_an_error() {
    let (low, _, disk) = sample();
    let img = write_image(
        &header(0, None),
        &[(0, &low)],
        None,
        Some(&disk),
        Compression::Zstd(1),
        8,
    );
    let idx = read_index(&mut Cursor::new(&img)).unwrap();
    let end_off = idx
        .sections
        .iter()
        .find(|s| s.kind == Kind::END)
        .unwrap()
        .offset;
    let mut cuts: Vec<u64> = idx.sections.iter().map(|s| s.offset).collect();
    cuts.extend([0, 1, 7, 8, 15, 16, 20, 21]);
    cuts.extend((0..img.len() as u64).step_by(97));
    for cut in cuts.into_iter().filter(|&c| c < end_off + 20) {
        let e = read_all(&img[..cut as usize], None);
        assert!(e.is_err(), "cut at {cut} read as a whole image");
    }
}

#[test]
fn a_flipped_byte_is_caught_and_named() {
    let (low, _, _) = sample();
    let img = write_image(
        &header(0, None),
        &[(0, &low)],
        None,
        None,
        Compression::Zstd(1),
        8,
    );
    let idx = read_index(&mut Cursor::new(&img)).unwrap();
    for s in &idx.sections {
        if s.kind == Kind::END {
            continue;
        }
        let mut bad = img.clone();
        let at = s.offset as usize + 20 + s.name.len();
        bad[at] ^= 0x40;
        let e = read_all(&bad, None).unwrap_err().to_string();
        assert!(e.contains("checksum") || e.contains("corrupt"), "{e}");
        if s.kind == Kind::VCPU {
            assert!(e.contains("vcpu '0'"), "{e}");
        }
    }
}

#[test]
fn other_versions_and_garbage_are_refused() {
    let img = write_image(
        &header(0, None),
        &[(0, &[0u8; P][..])],
        None,
        None,
        Compression::None,
        8,
    );
    let mut v2 = img.clone();
    v2[8] = 2;
    let e = read_all(&v2, None).unwrap_err().to_string();
    assert!(e.contains("version 2") && e.contains("version 1"), "{e}");
    let e = read_all(b"#!/bin/sh\necho hello\n", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a vmm snapshot"), "{e}");
}

#[test]
fn unknown_sections_are_skipped_when_optional_refused_when_required() {
    for (kind, ok) in [(Kind(0x9000), true), (Kind(0x0100), false)] {
        let mut w = ImageWriter::new(Vec::new(), &header(0, None)).unwrap();
        w.write_section(kind, "future", &[1, 2, 3]).unwrap();
        w.write_state(Kind::VM, "machine", &1u32).unwrap();
        let img = w.finish().unwrap().0;
        let r = read_all(&img, None);
        assert_eq!(r.is_ok(), ok, "{kind:?}");
        if ok {
            assert!(r
                .unwrap()
                .states
                .contains_key(&(Kind::VM, "machine".into())));
        }
    }
}

#[test]
fn incremental_chain_merges_and_checks_parents() {
    let (low, _, _) = sample();
    let base_h = header(0, None);
    let base = write_image(&base_h, &[(0, &low)], None, None, Compression::Zstd(1), 8);
    // Change pages 3 (to data) and 5 (to zero); only those are listed.
    let mut now = low.clone();
    now[3 * P..4 * P].fill(0xab);
    now[5 * P..6 * P].fill(0);
    let dirty = vec![vec![(1u64 << 3) | (1 << 5)]];
    let inc_h = header(flags::INCREMENTAL, Some(base_h.image_id));
    let inc = write_image(
        &inc_h,
        &[(0, &now)],
        Some(&dirty),
        None,
        Compression::Zstd(1),
        8,
    );
    assert!(
        inc.len() < base.len() / 4,
        "{} vs {}",
        inc.len(),
        base.len()
    );
    let merged = read_all(&inc, Some(read_all(&base, None).unwrap().memory)).unwrap();
    assert_eq!(merged.memory[&0], now);
    check_chain(&[&base_h, &inc_h]).unwrap();
    let other = header(0, None);
    let e = check_chain(&[&other, &inc_h]).unwrap_err().to_string();
    assert!(e.contains("parent"), "{e}");
    assert!(check_chain(&[&inc_h]).is_err());
}

#[test]
fn the_index_finds_any_chunk() {
    let (low, high, _) = sample();
    let img = write_image(
        &header(0, None),
        &[(0, &low), (0x10_0000, &high)],
        None,
        None,
        Compression::Zstd(1),
        4,
    );
    let mut f = Cursor::new(&img);
    let idx = read_index(&mut f).unwrap();
    let e = idx
        .sections
        .iter()
        .find(|s| matches!(s.chunk, Some((Space::Memory, a, _)) if a == 0x10_0000 + 8 * P as u64))
        .unwrap();
    let c = read_chunk_at(&mut f, e.offset).unwrap();
    for (addr, p) in c.pages() {
        let off = (addr - 0x10_0000) as usize;
        match p {
            Page::Data(d) => assert_eq!(&d[..], &high[off..off + P]),
            Page::Zero => assert!(high[off..off + P].iter().all(|&b| b == 0)),
            Page::Absent => panic!("absent page in a full image"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_pages_round_trip(
        kinds in proptest::collection::vec(0u8..3, 1..80),
        seed in any::<u64>(),
        chunk_pages in 1u32..20,
        level in 0i32..4,
        cut in any::<prop::sample::Index>(),
    ) {
        let mem = fill(&kinds, seed);
        let c = if level == 0 { Compression::None } else { Compression::Zstd(level) };
        let img = write_image(&header(0, None), &[(0x20_0000, &mem)], None, Some(&mem[..mem.len() / 2]), c, chunk_pages);
        let r = read_all(&img, None).unwrap();
        prop_assert_eq!(&r.memory[&0x20_0000], &mem);
        prop_assert_eq!(&r.disk[..], &mem[..mem.len() / 2]);
        // Any cut before the end marker is an error.
        let idx = read_index(&mut Cursor::new(&img)).unwrap();
        let end = idx.sections.iter().find(|s| s.kind == Kind::END).unwrap().offset as usize + 20;
        let at = cut.index(end);
        prop_assert!(read_all(&img[..at], None).is_err());
    }

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let mut img = b"VMMSNAP\0\x01\0\0\0".to_vec();
        img.extend_from_slice(&bytes);
        let _ = read_all(&img, None);
        let _ = inspect::inspect(Cursor::new(&img), true);
    }
}
