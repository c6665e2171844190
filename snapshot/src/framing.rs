//! Reading the framed parts of an image: the file header, a section record
//! (fixed part, name, length-prefixed payload) and the footer, each read
//! once here with its length bounded and its checksums checked. The
//! streaming reader and the index both read through this module.

use std::io::Read;

use crate::error::SnapshotError;
use crate::format::{
    crc_matches, decode_footer, max_chunk_payload, Kind, SectionHeader, FILE_HEADER_LEN,
    FOOTER_LEN, FORMAT_VERSION, MAGIC, MAX_STATE_LEN, SECTION_HEADER_LEN,
};
use crate::state::{Header, Index};
use crate::state_codec::decode_state;

/// Reads `buf.len()` bytes or reports where the image ends.
fn read_exact_or_truncated<R: Read + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
    section: &str,
) -> Result<(), SnapshotError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(SnapshotError::Truncated {
                    section: section.to_string(),
                    expected: buf.len() as u64,
                    got: got as u64,
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(SnapshotError::Read(e)),
        }
    }
    Ok(())
}

/// Reads a `len`-byte payload, refusing one over `limit`. The buffer grows
/// with the bytes that arrive, so a lying length on a short input costs no
/// more than the input.
fn read_bounded<R: Read + ?Sized>(
    r: &mut R,
    len: u64,
    limit: u64,
    section: &str,
) -> Result<Vec<u8>, SnapshotError> {
    if len > limit {
        return Err(SnapshotError::TooLarge {
            section: section.to_string(),
            len,
            limit,
        });
    }
    let mut buf = Vec::with_capacity(len.min(max_chunk_payload()) as usize);
    let got = r
        .take(len)
        .read_to_end(&mut buf)
        .map_err(SnapshotError::Read)? as u64;
    if got != len {
        return Err(SnapshotError::Truncated {
            section: section.to_string(),
            expected: len,
            got,
        });
    }
    Ok(buf)
}

/// Reads the magic, version and header; returns them and the bytes read.
pub(crate) fn read_file_header<R: Read + ?Sized>(
    r: &mut R,
) -> Result<(Header, u64), SnapshotError> {
    let mut fixed = [0u8; FILE_HEADER_LEN];
    read_exact_or_truncated(r, &mut fixed, "header")?;
    if fixed[0..8] != MAGIC {
        return Err(SnapshotError::NotAnImage);
    }
    let version = u32::from_le_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let len = u32::from_le_bytes([fixed[12], fixed[13], fixed[14], fixed[15]]);
    if u64::from(len) > MAX_STATE_LEN {
        return Err(SnapshotError::TooLarge {
            section: "header".into(),
            len: len.into(),
            limit: MAX_STATE_LEN,
        });
    }
    // The body, then its checksum (the length was checked just above).
    let body = read_bounded(r, u64::from(len) + 4, MAX_STATE_LEN + 4, "header")?;
    let (body, crc) = body.split_at(len as usize);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if !crc_matches(crc32c::crc32c(body), stored) {
        return Err(SnapshotError::Checksum {
            section: "header".into(),
        });
    }
    let header = decode_state("header", body)?;
    Ok((header, FILE_HEADER_LEN as u64 + u64::from(len) + 4))
}

/// Reads a section record's fixed part and checks its own checksum, so a
/// damaged length or kind is never used. `at` names the place in errors.
pub(crate) fn read_record_header<R: Read + ?Sized>(
    r: &mut R,
    at: &str,
) -> Result<SectionHeader, SnapshotError> {
    let mut b = [0u8; SECTION_HEADER_LEN];
    read_exact_or_truncated(r, &mut b, at)?;
    SectionHeader::decode(&b).ok_or_else(|| SnapshotError::Checksum {
        section: format!("{at} (its record header)"),
    })
}

/// Reads the name after a record's fixed part.
pub(crate) fn read_record_name<R: Read + ?Sized>(
    r: &mut R,
    h: &SectionHeader,
    at: &str,
) -> Result<String, SnapshotError> {
    let mut name = vec![0u8; usize::from(h.name_len)];
    read_exact_or_truncated(r, &mut name, at)?;
    String::from_utf8(name).map_err(|_| SnapshotError::Corrupt {
        section: at.to_string(),
        reason: "section name is not UTF-8".into(),
    })
}

/// A record's payload, read but not yet checked against the record's
/// checksum. [`Payload::check`] is the only way to take its bytes;
/// [`Payload::unchecked`] lends them, to name the record in an error.
pub(crate) struct Payload {
    bytes: Vec<u8>,
    crc_ok: bool,
}

impl Payload {
    /// Reads the payload of the record whose fixed part is `h` and whose
    /// name is `name`, refusing one over `limit`. `label` names it in errors.
    pub(crate) fn read<R: Read + ?Sized>(
        r: &mut R,
        h: &SectionHeader,
        name: &str,
        limit: u64,
        label: &str,
    ) -> Result<Self, SnapshotError> {
        let bytes = read_bounded(r, h.payload_len, limit, label)?;
        let crc = crc32c::crc32c_append(crc32c::crc32c(name.as_bytes()), &bytes);
        Ok(Payload {
            bytes,
            crc_ok: crc_matches(crc, h.crc),
        })
    }

    /// The bytes, unchecked: only to name the record in an error.
    pub(crate) fn unchecked(&self) -> &[u8] {
        &self.bytes
    }

    /// The bytes, if the checksum over name and payload matches; else a
    /// checksum error naming `label`.
    pub(crate) fn check(self, label: &str) -> Result<Vec<u8>, SnapshotError> {
        if self.crc_ok {
            Ok(self.bytes)
        } else {
            Err(SnapshotError::Checksum {
                section: label.to_string(),
            })
        }
    }
}

/// Skips the payload of the record whose fixed part is `h`, by length and
/// without allocating for it.
pub(crate) fn skip_payload<R: Read + ?Sized>(
    r: &mut R,
    h: &SectionHeader,
    label: &str,
) -> Result<(), SnapshotError> {
    let copied = std::io::copy(&mut r.take(h.payload_len), &mut std::io::sink())
        .map_err(SnapshotError::Read)?;
    if copied != h.payload_len {
        return Err(SnapshotError::Truncated {
            section: label.to_string(),
            expected: h.payload_len,
            got: copied,
        });
    }
    Ok(())
}

/// Reads a whole record that must be of `kind` and unnamed (the index, or
/// a chunk reached through the index); `wrong` says what another record
/// there means. Returns the checked payload.
pub(crate) fn read_unnamed_record<R: Read + ?Sized>(
    r: &mut R,
    kind: Kind,
    limit: u64,
    label: &str,
    wrong: &str,
) -> Result<Vec<u8>, SnapshotError> {
    let h = read_record_header(r, label)?;
    if h.kind != kind || h.name_len != 0 {
        return Err(SnapshotError::Corrupt {
            section: label.to_string(),
            reason: wrong.to_string(),
        });
    }
    Payload::read(r, &h, "", limit, label)?.check(label)
}

/// Reads the INDEX record (after END, or where the footer points) and
/// decodes it; `wrong` says what another record there means. Returns the
/// index and the record's length.
pub(crate) fn read_index_record<R: Read + ?Sized>(
    r: &mut R,
    wrong: &str,
) -> Result<(Index, u64), SnapshotError> {
    let payload = read_unnamed_record(r, Kind::INDEX, MAX_STATE_LEN, "index", wrong)?;
    let index = decode_state("index", &payload)?;
    Ok((index, (SECTION_HEADER_LEN + payload.len()) as u64))
}

/// Reads the footer; the index offset it holds, or `None` if it is not an
/// intact footer.
pub(crate) fn read_footer<R: Read + ?Sized>(r: &mut R) -> Result<Option<u64>, SnapshotError> {
    let mut f = [0u8; FOOTER_LEN];
    read_exact_or_truncated(r, &mut f, "footer")?;
    Ok(decode_footer(&f))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: Kind, name: &str, payload: &[u8]) -> Vec<u8> {
        let h = SectionHeader {
            kind,
            flags: 0,
            name_len: name.len() as u16,
            payload_len: payload.len() as u64,
            crc: crc32c::crc32c_append(crc32c::crc32c(name.as_bytes()), payload),
        };
        [&h.encode()[..], name.as_bytes(), payload].concat()
    }

    #[test]
    fn a_record_reads_back_and_any_damage_is_caught() {
        let rec = record(Kind::VCPU, "0", b"state");
        let mut r = &rec[..];
        let h = read_record_header(&mut r, "t").unwrap();
        assert_eq!(read_record_name(&mut r, &h, "t").unwrap(), "0");
        let p = Payload::read(&mut r, &h, "0", 100, "t").unwrap();
        assert_eq!(p.check("t").unwrap(), b"state");
        assert!(r.is_empty());
        for i in 0..rec.len() {
            let mut bad = rec.clone();
            bad[i] ^= 4;
            let mut r = &bad[..];
            let got = read_record_header(&mut r, "t").and_then(|h| {
                let name = read_record_name(&mut r, &h, "t")?;
                Payload::read(&mut r, &h, &name, 100, "t")?.check("t")
            });
            assert!(got.is_err(), "byte {i}");
        }
    }

    #[test]
    fn unnamed_records_are_checked_for_kind_length_and_cuts() {
        let rec = record(Kind::INDEX, "", b"index");
        let p = read_unnamed_record(&mut &rec[..], Kind::INDEX, 100, "index", "no").unwrap();
        assert_eq!(p, b"index");
        let e = read_unnamed_record(&mut &rec[..], Kind::CHUNK, 100, "c", "not a chunk");
        assert!(matches!(e, Err(SnapshotError::Corrupt { reason, .. }) if reason == "not a chunk"));
        let e = read_unnamed_record(&mut &rec[..], Kind::INDEX, 4, "index", "no");
        assert!(matches!(e, Err(SnapshotError::TooLarge { len: 5, .. })));
        for cut in 0..rec.len() {
            let e = read_unnamed_record(&mut &rec[..cut], Kind::INDEX, 100, "index", "no");
            assert!(
                matches!(e, Err(SnapshotError::Truncated { .. })),
                "cut at {cut}"
            );
        }
        let named = record(Kind::INDEX, "x", b"index");
        assert!(read_unnamed_record(&mut &named[..], Kind::INDEX, 100, "index", "no").is_err());
    }
}
