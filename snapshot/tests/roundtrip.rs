//! Write → read round trips, and every way an image can be damaged.

use std::collections::BTreeMap;
use std::io::Cursor;

use proptest::prelude::*;
use snapshot::format::{FOOTER_LEN, SECTION_HEADER_LEN};
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
struct Image {
    header: Header,
    states: BTreeMap<(Kind, String), Vec<u8>>,
    memory: BTreeMap<u64, Vec<u8>>,
    disk: Vec<u8>,
}

/// Reads a whole image section by section, applying memory chunks onto
/// `base` (the parent's memory for an incremental image).
fn read_all(img: &[u8], base: Option<BTreeMap<u64, Vec<u8>>>) -> Result<Image, SnapshotError> {
    let mut r = ImageReader::new(Cursor::new(img))?;
    let mut out = Image {
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

/// Memory regions, and the disk if the image has one.
type Restored = (Vec<Vec<u8>>, Option<Vec<u8>>);

/// Reads an image the way restore does: states, then memory into slices on
/// worker threads, then the disk into a file.
fn restore(img: &[u8], sizes: &[(u64, usize)], threads: usize) -> Result<Restored, SnapshotError> {
    let mut r = ImageReader::new(Cursor::new(img))?;
    let (_, _): (String, (String, u64)) = r.read_state(Kind::VM)?;
    let (idx, v): (String, FakeVcpu) = r.read_state(Kind::VCPU)?;
    assert_eq!((idx.as_str(), v.rip), ("0", 0xffff_ffff_8100_0000));
    let (_, _): (String, Vec<u8>) = r.read_state(Kind::DEVICE)?;
    let Section::Memory(_) = r.next_section()? else {
        panic!("no memory");
    };
    let mut mem: Vec<Vec<u8>> = sizes.iter().map(|&(_, l)| vec![0u8; l]).collect();
    let mut regions: Vec<(u64, &mut [u8])> = sizes
        .iter()
        .zip(mem.iter_mut())
        .map(|(&(a, _), m)| (a, &mut m[..]))
        .collect();
    let opts = ApplyOptions {
        threads,
        dest_is_zeroed: true,
    };
    let (_, next) = r.read_memory_into(&mut regions, opts)?;
    let disk = match next {
        Section::Disk(info) => {
            let f = tempfile::tempfile().unwrap();
            let (_, next) = r.read_disk_into(&f, opts)?;
            assert!(matches!(next, Section::End));
            let mut d = Vec::new();
            use std::io::{Read, Seek};
            let mut f = f;
            f.rewind().unwrap();
            f.read_to_end(&mut d).unwrap();
            assert_eq!(d.len() as u64, info.size);
            Some(d)
        }
        Section::End => None,
        other => panic!("{other:?}"),
    };
    Ok((mem, disk))
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

/// Offsets where each section record starts, END's end, and the end.
fn boundaries(img: &[u8]) -> Vec<usize> {
    let idx = read_index(&mut Cursor::new(img)).unwrap();
    let mut b: Vec<usize> = idx.sections.iter().map(|s| s.offset as usize).collect();
    let end = idx.sections.last().unwrap();
    assert_eq!(end.kind, Kind::END);
    b.push((end.offset + end.len) as usize);
    b.push(img.len() - FOOTER_LEN);
    b
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
        for threads in [1, 3] {
            let (mem, d) =
                restore(&img, &[(0, low.len()), (0x10_0000, high.len())], threads).unwrap();
            assert_eq!(mem[0], low);
            assert_eq!(mem[1], high);
            assert_eq!(d.unwrap(), disk);
        }
        // inspect agrees, and zero pages were not stored.
        let rep = inspect::inspect(Cursor::new(&img), true).unwrap();
        let m = rep.memory.as_ref().unwrap();
        assert_eq!(m.pages, 300);
        assert!(m.zero_share > 0.15, "{}", m.zero_share);
        assert_eq!(rep.disks.len(), 1);
        assert!(rep.indexed);
        assert_eq!(rep.total_bytes, img.len() as u64);
        let stored: u64 = rep.sections.iter().map(|s| s.stored_bytes).sum();
        assert!(stored < img.len() as u64);
        let text = rep.to_string();
        assert!(
            text.contains("zero (not stored)") && text.contains("vcpu"),
            "{text}"
        );
        let json = serde_json::to_string(&rep).unwrap();
        assert!(json.contains("\"zero_share\""));
        let quick = inspect::inspect(Cursor::new(&img), false).unwrap();
        assert_eq!(quick.memory.unwrap().zero_pages, m.zero_pages);
    }
}

#[test]
fn an_image_without_index_reads_the_same() {
    let (low, _, _) = sample();
    let mut w = ImageWriter::new(Vec::new(), &header(0, None)).unwrap();
    w.set_index(false);
    w.write_memory(&[(0, &low)], None, EncodeOptions::default())
        .unwrap();
    let img = w.finish().unwrap().0;
    assert!(read_index(&mut Cursor::new(&img)).is_err());
    let r = read_all(&img, None).unwrap();
    assert_eq!(r.memory[&0], low);
    assert!(!inspect::inspect(Cursor::new(&img), true).unwrap().indexed);
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
    let mut cuts: Vec<usize> = boundaries(&img);
    cuts.extend([0, 1, 7, 8, 15, 16, 20, 21, img.len() - 1]);
    cuts.extend((0..img.len()).step_by(97));
    for cut in cuts.into_iter().filter(|&c| c < img.len()) {
        let e = read_all(&img[..cut], None);
        assert!(e.is_err(), "cut at {cut} read as a whole image");
        assert!(inspect::inspect(Cursor::new(&img[..cut]), false).is_err());
    }
    let e = read_all(&img[..boundaries(&img)[5] + 30], None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("truncated in") && e.contains("expected"), "{e}");
}

#[test]
fn bytes_after_the_end_are_refused() {
    let (low, _, disk) = sample();
    let img = write_image(
        &header(0, None),
        &[(0, &low)],
        None,
        Some(&disk),
        Compression::Zstd(1),
        8,
    );
    for extra in [&b"x"[..], &img[..]] {
        let mut longer = img.clone();
        longer.extend_from_slice(extra);
        let e = read_all(&longer, None).unwrap_err().to_string();
        assert!(e.contains("data follows the image's end"), "{e}");
        assert!(inspect::inspect(Cursor::new(&longer), true).is_err());
        assert!(snapshot::read_index(&mut Cursor::new(&longer)).is_err());
    }
    assert!(read_all(&img, None).is_ok());
}

#[test]
fn a_flipped_byte_is_caught_and_named() {
    let (low, _, _) = sample();
    let img = write_image(
        &header(0, None),
        &[(0x4000_0000, &low)],
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
        let name_len = if s.kind == Kind::CHUNK {
            0
        } else {
            s.name.len()
        };
        for at in [
            s.offset as usize + 3,
            s.offset as usize + SECTION_HEADER_LEN + name_len + 20,
        ] {
            let mut bad = img.clone();
            bad[at] ^= 0x40;
            let e = read_all(&bad, None).unwrap_err().to_string();
            assert!(e.contains("checksum") || e.contains("corrupt"), "{e}");
            if s.kind == Kind::VCPU && at > s.offset as usize + 20 {
                assert!(e.contains("vcpu '0'"), "{e}");
            }
            if s.kind == Kind::CHUNK && at > s.offset as usize + 20 {
                let (_, base, _) = s.chunk.unwrap();
                assert!(
                    e.contains(&format!("memory chunk at guest {base:#x}")),
                    "{e}"
                );
            }
        }
    }
    // A damaged name is not quoted as if it were the section's: the
    // section is named by kind and place instead.
    let memory = idx
        .sections
        .iter()
        .find(|s| s.kind == Kind::MEMORY)
        .unwrap();
    let mut bad = img.clone();
    bad[memory.offset as usize + SECTION_HEADER_LEN + 1] ^= 0x02;
    let e = read_all(&bad, None).unwrap_err().to_string();
    assert!(
        e.contains(&format!("memory section at offset {}", memory.offset)),
        "{e}"
    );
    assert!(!e.contains("'mgmory'"), "{e}");
    // The trailer is checked too.
    let mut bad = img.clone();
    let n = bad.len();
    bad[n - FOOTER_LEN - 2] ^= 1;
    assert!(read_all(&bad, None).is_err());
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
    let mut v3 = img.clone();
    v3[8] = 3;
    let e = read_all(&v3, None).unwrap_err().to_string();
    assert_eq!(
        e,
        "image format version 3 is not supported (this build reads version 2)"
    );
    let e = read_all(b"#!/bin/sh\necho hello\n", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a vmm snapshot"), "{e}");
}

#[test]
fn unknown_sections_are_skipped_when_optional_refused_when_required() {
    for (optional, ok) in [(true, true), (false, false)] {
        let mut w = ImageWriter::new(Vec::new(), &header(0, None)).unwrap();
        if optional {
            w.write_optional_section(Kind(0x100), "future", &[1, 2, 3])
                .unwrap();
        } else {
            w.write_section(Kind(0x100), "future", &[1, 2, 3]).unwrap();
        }
        w.write_state(Kind::VM, "machine", &1u32).unwrap();
        let img = w.finish().unwrap().0;
        let r = read_all(&img, None);
        assert_eq!(r.is_ok(), ok, "{optional}");
        match r {
            Ok(r) => assert!(r.states.contains_key(&(Kind::VM, "machine".into()))),
            Err(e) => assert!(e.to_string().contains("newer vmm"), "{e}"),
        }
    }
}

#[test]
fn incremental_chain_merges_and_checks_parents() {
    let (low, high, _) = sample();
    let regions = [(0u64, &low[..]), (0x10_0000, &high[..])];
    let base_h = header(0, None);
    let base = write_image(&base_h, &regions, None, None, Compression::Zstd(1), 8);
    // Step 1: page 3 of low gets data, page 5 turns zero.
    let mut now1 = (low.clone(), high.clone());
    now1.0[3 * P..4 * P].fill(0xab);
    now1.0[5 * P..6 * P].fill(0);
    let inc1_h = header(flags::INCREMENTAL, Some(base_h.image_id));
    let dirty1 = vec![vec![(1u64 << 3) | (1 << 5)], vec![0u64; 5]];
    let inc1 = write_image(
        &inc1_h,
        &[(0, &now1.0), (0x10_0000, &now1.1)],
        Some(&dirty1),
        None,
        Compression::Zstd(1),
        8,
    );
    assert!(
        inc1.len() < base.len() / 4,
        "{} vs {}",
        inc1.len(),
        base.len()
    );
    // Step 2: page 70 of high changes.
    let mut now2 = now1.clone();
    now2.1[70 * P] ^= 0xff;
    let inc2_h = header(flags::INCREMENTAL, Some(inc1_h.image_id));
    let mut hb = vec![0u64; 5];
    hb[1] = 1 << 6;
    let dirty2 = vec![vec![0u64], hb];
    let inc2 = write_image(
        &inc2_h,
        &[(0, &now2.0), (0x10_0000, &now2.1)],
        Some(&dirty2),
        None,
        Compression::None,
        8,
    );

    // Section by section.
    let merged = read_all(&inc1, Some(read_all(&base, None).unwrap().memory)).unwrap();
    assert_eq!(merged.memory[&0], now1.0);
    // Through the library: parents, then the top image onto them.
    let mut m0 = vec![0u8; low.len()];
    let mut m1 = vec![0u8; high.len()];
    let mut regions: Vec<(u64, &mut [u8])> = vec![(0, &mut m0[..]), (0x10_0000, &mut m1[..])];
    let mut top = ImageReader::new(Cursor::new(&inc2)).unwrap();
    top.skip_to_memory().unwrap();
    apply_parents(
        vec![Cursor::new(&base), Cursor::new(&inc1)],
        top.header(),
        &mut regions,
        ApplyOptions::default(),
    )
    .unwrap();
    let opts = ApplyOptions {
        dest_is_zeroed: false,
        ..Default::default()
    };
    let (stats, end) = top.read_memory_into(&mut regions, opts).unwrap();
    assert!(matches!(end, Section::End));
    assert_eq!(stats.pages, 1);
    assert_eq!(m0, now2.0);
    assert_eq!(m1, now2.1);

    // Wrong parents.
    check_chain(&[&base_h, &inc1_h, &inc2_h]).unwrap();
    let e = check_chain(&[&base_h, &inc2_h]).unwrap_err().to_string();
    assert!(e.contains("parent"), "{e}");
    let mut regions: Vec<(u64, &mut [u8])> = vec![(0, &mut m0[..]), (0x10_0000, &mut m1[..])];
    assert!(apply_parents(vec![Cursor::new(&inc1)], &inc2_h, &mut regions, opts).is_err());
    assert!(apply_parents(vec![Cursor::new(&base)], &inc2_h, &mut regions, opts).is_err());
    assert!(check_chain(&[&inc1_h]).is_err());
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
    let (h, idx) = open_index(&mut f).unwrap();
    assert_eq!(h.arch, "x86_64");
    for addr in [
        0u64,
        0x3000,
        0x10_0000 + 8 * P as u64 + 5,
        0x10_0000 + high.len() as u64 - 1,
    ] {
        let c = read_memory_chunk(&mut f, &idx, addr).unwrap().unwrap();
        for (a, p) in c.pages() {
            let (region, base) = if a >= 0x10_0000 {
                (&high, 0x10_0000)
            } else {
                (&low, 0)
            };
            let off = (a - base) as usize;
            match p {
                Page::Data(d) => assert_eq!(&d[..], &region[off..off + P]),
                Page::Zero => assert!(region[off..off + P].iter().all(|&b| b == 0)),
                Page::Absent => panic!("absent page in a full image"),
            }
        }
    }
    assert!(read_memory_chunk(&mut f, &idx, 0x8_0000).unwrap().is_none());
}

#[test]
fn restore_refuses_memory_that_does_not_fit() {
    let (low, _, _) = sample();
    let img = write_image(
        &header(0, None),
        &[(0x10_0000, &low)],
        None,
        None,
        Compression::Zstd(1),
        8,
    );
    let mut r = ImageReader::new(Cursor::new(&img)).unwrap();
    r.skip_to_memory().unwrap();
    let mut small = vec![0u8; low.len() / 2];
    let mut regions = vec![(0x10_0000u64, &mut small[..])];
    let e = r
        .read_memory_into(&mut regions, ApplyOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside the memory given"), "{e}");
}

fn layout_strategy() -> impl Strategy<Value = Vec<(u64, Vec<u8>)>> {
    // Up to three regions: gap pages before each, and page kinds.
    proptest::collection::vec((0u64..64, proptest::collection::vec(0u8..3, 1..40)), 1..4).prop_map(
        |rs| {
            let mut addr = 0u64;
            rs.into_iter()
                .map(|(gap, kinds)| {
                    addr += gap * P as u64;
                    let a = addr;
                    addr += (kinds.len() * P) as u64;
                    (a, kinds)
                })
                .collect()
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_layouts_round_trip_and_any_cut_fails(
        layout in layout_strategy(),
        seed in any::<u64>(),
        chunk_pages in 1u32..20,
        level in 0i32..4,
        threads in 1usize..4,
        cut in any::<prop::sample::Index>(),
    ) {
        let mems: Vec<(u64, Vec<u8>)> = layout
            .iter()
            .enumerate()
            .map(|(i, (a, k))| (*a, fill(k, seed ^ i as u64)))
            .collect();
        let regions: Vec<(u64, &[u8])> = mems.iter().map(|(a, m)| (*a, &m[..])).collect();
        let c = if level == 0 { Compression::None } else { Compression::Zstd(level) };
        let disk = &mems[0].1[..mems[0].1.len() / 2 + 1];
        let img = write_image(&header(flags::HAS_DISK, None), &regions, None, Some(disk), c, chunk_pages);
        let sizes: Vec<(u64, usize)> = mems.iter().map(|(a, m)| (*a, m.len())).collect();
        let (got, d) = restore(&img, &sizes, threads).unwrap();
        for (g, (_, m)) in got.iter().zip(&mems) {
            prop_assert_eq!(g, m);
        }
        prop_assert_eq!(&d.unwrap()[..], disk);
        // Every cut at a section boundary, and one anywhere, is an error.
        let mut cuts = boundaries(&img);
        cuts.push(cut.index(img.len()));
        for at in cuts {
            prop_assert!(read_all(&img[..at], None).is_err());
            prop_assert!(restore(&img[..at], &sizes, threads).is_err());
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_is_an_error(
        kinds in proptest::collection::vec(0u8..3, 1..30),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let mem = fill(&kinds, 7);
        let img = write_image(&header(0, None), &[(0, &mem)], None, None, Compression::Zstd(1), 4);
        let mut bad = img.clone();
        let i = at.index(img.len());
        bad[i] ^= 1 << bit;
        prop_assert!(read_all(&bad, None).is_err(), "flip at {} of {}", i, img.len());
    }

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let mut img = b"VMMSNAP\0\x01\0\0\0".to_vec();
        img.extend_from_slice(&bytes);
        let _ = read_all(&img, None);
        let _ = inspect::inspect(Cursor::new(&img), true);
        let _ = read_index(&mut Cursor::new(&img));
    }
}

/// Writes a few small valid images as fuzzing seeds into the directory
/// named by SNAP_FUZZ_SEEDS (does nothing without it).
#[test]
fn write_fuzz_seeds() {
    let Some(dir) = std::env::var_os("SNAP_FUZZ_SEEDS") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kinds: Vec<u8> = (0..12u32).map(|i| (i * 7 % 5) as u8).collect();
    let mem = fill(&kinds, 5);
    let base_h = header(flags::HAS_DISK, None);
    for (i, c) in [Compression::None, Compression::Zstd(1)]
        .into_iter()
        .enumerate()
    {
        let img = write_image(&base_h, &[(0x1000, &mem)], None, Some(&mem[..5000]), c, 4);
        std::fs::write(dir.join(format!("full-{i}")), img).unwrap();
    }
    let inc_h = header(flags::INCREMENTAL, Some(base_h.image_id));
    let img = write_image(
        &inc_h,
        &[(0x1000, &mem)],
        Some(&[vec![0b101]]),
        None,
        Compression::Zstd(1),
        2,
    );
    std::fs::write(dir.join("incremental"), img).unwrap();
}

#[test]
fn decode_parallel_sees_every_chunk() {
    let (low, _, _) = sample();
    let img = write_image(
        &header(0, None),
        &[(0, &low)],
        None,
        None,
        Compression::Zstd(1),
        4,
    );
    let mut r = ImageReader::new(Cursor::new(&img)).unwrap();
    r.skip_to_memory().unwrap();
    let mut chunks = Vec::new();
    while let Section::Chunk(c) = r.next_section().unwrap() {
        chunks.push(c);
    }
    for threads in [1, 2, 3] {
        let mem = std::sync::Mutex::new(vec![0u8; low.len()]);
        decode_parallel(&chunks, threads, &|c| {
            let mut m = mem.lock().unwrap();
            for (addr, p) in c.pages() {
                if let Page::Data(d) = p {
                    m[addr as usize..addr as usize + P].copy_from_slice(d);
                }
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(mem.into_inner().unwrap(), low);
    }
}

#[test]
fn an_increment_zeroes_pages_even_with_default_options() {
    let mem = fill(&[1, 1, 2, 1], 9);
    let base_h = header(0, None);
    let base = write_image(&base_h, &[(0, &mem)], None, None, Compression::Zstd(1), 4);
    let mut now = mem.clone();
    now[P..2 * P].fill(0);
    let inc_h = header(flags::INCREMENTAL, Some(base_h.image_id));
    let inc = write_image(
        &inc_h,
        &[(0, &now)],
        Some(&[vec![0b10]]),
        None,
        Compression::Zstd(1),
        4,
    );
    let mut dest = vec![0u8; mem.len()];
    let mut top = ImageReader::new(Cursor::new(&inc)).unwrap();
    top.skip_to_memory().unwrap();
    let mut regions = vec![(0u64, &mut dest[..])];
    apply_parents(
        vec![Cursor::new(&base)],
        top.header(),
        &mut regions,
        ApplyOptions::default(),
    )
    .unwrap();
    assert_eq!(regions[0].1, &mem[..]);
    top.read_memory_into(&mut regions, ApplyOptions::default())
        .unwrap();
    assert_eq!(dest, now);
}

#[test]
fn reserved_kinds_cannot_be_written_by_hand() {
    let mut w = ImageWriter::new(Vec::new(), &header(0, None)).unwrap();
    for k in [
        Kind::MEMORY,
        Kind::DISK,
        Kind::CHUNK,
        Kind::END,
        Kind::INDEX,
    ] {
        assert!(w.write_section(k, "", &[]).is_err());
        assert!(w.write_state(k, "", &1u8).is_err());
    }
}

/// The lazy restore's path: states read in order, memory chunks located
/// through the index and fetched out of order with positioned reads, the
/// disk and the end read by a reader resumed past the chunks.
#[test]
fn memory_fetched_out_of_order_and_the_rest_read_past_it() {
    use std::io::{BufReader, Seek, SeekFrom, Write};
    let (low, high, disk) = sample();
    for c in [Compression::None, Compression::Zstd(1)] {
        let h = header(flags::HAS_DISK, None);
        let regions = [(0u64, &low[..]), (0x10_0000, &high[..])];
        let img = write_image(&h, &regions, None, Some(&disk), c, 16);
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&img).unwrap();

        let mut r = ImageReader::new(Cursor::new(&img)).unwrap();
        let layout = loop {
            if let Section::Memory(l) = r.next_section().unwrap() {
                break l;
            }
        };
        let index = read_index(&mut Cursor::new(&img)).unwrap();
        let chunks = memory_chunks(&index, &layout, r.position()).unwrap();
        assert_eq!(chunks.chunks.len(), 300usize.div_ceil(16) + 1, "{chunks:?}");
        // Backwards, each into its own place.
        let mut mem = [vec![0u8; low.len()], vec![0u8; high.len()]];
        let mut dec = Decoder::default();
        for loc in chunks.chunks.iter().rev() {
            let payload = read_chunk_record(&file, loc).unwrap();
            let (i, base) = if loc.base >= 0x10_0000 {
                (1, 0x10_0000)
            } else {
                (0, 0)
            };
            let at = (loc.base - base) as usize;
            let end = (at + loc.span() as usize).min(mem[i].len());
            let mut staging = vec![0u8; loc.span() as usize];
            dec.decode_into(&payload, &loc.label(), &mut staging, true)
                .unwrap();
            mem[i][at..end].copy_from_slice(&staging[..end - at]);
        }
        assert_eq!(mem[0], low);
        assert_eq!(mem[1], high);

        // The rest, read on from where the chunks end.
        file.seek(SeekFrom::Start(chunks.end)).unwrap();
        let mut rest = ImageReader::resume_at(BufReader::new(&file), h.clone(), chunks.end);
        let Section::Disk(info) = rest.next_section().unwrap() else {
            panic!("no disk after the memory chunks");
        };
        assert_eq!(info.size, disk.len() as u64);
        let f = tempfile::tempfile().unwrap();
        let (_, next) = rest.read_disk_into(&f, ApplyOptions::default()).unwrap();
        assert!(matches!(next, Section::End));

        // An index that does not describe this image is refused: the memory
        // section elsewhere, or a chunk moved.
        assert!(memory_chunks(&index, &layout, r.position() + 1).is_err());
        let mut moved = index.clone();
        let i = moved
            .sections
            .iter()
            .position(|e| e.kind == Kind::CHUNK)
            .unwrap();
        moved.sections[i].offset += 1;
        assert!(memory_chunks(&moved, &layout, r.position()).is_err());
        let mut outside = index.clone();
        outside.sections[i].chunk = Some((Space::Memory, 0x4000_0000, 16));
        assert!(memory_chunks(&outside, &layout, r.position()).is_err());

        // A damaged chunk is refused with its name; so is a record that is
        // not the chunk the index promised.
        let loc = chunks.chunks[3];
        let mut bad = img.clone();
        bad[(loc.offset + loc.len / 2) as usize] ^= 1;
        let mut badf = tempfile::tempfile().unwrap();
        badf.write_all(&bad).unwrap();
        let e = read_chunk_record(&badf, &loc).unwrap_err().to_string();
        assert!(e.contains("checksum") && e.contains(&loc.label()), "{e}");
        let wrong = ChunkLocation {
            base: loc.base + 0x1000,
            ..loc
        };
        let e = read_chunk_record(&file, &wrong).unwrap_err().to_string();
        assert!(e.contains("the index and the chunk disagree"), "{e}");
    }
}
