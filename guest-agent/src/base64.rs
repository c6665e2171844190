//! Base64url decoding for `vmm.cmd=`.
//!
//! Hand-written instead of pulling in the `base64` crate: the agent needs only
//! a decoder, it is twenty lines, and PID 1 is better off with fewer
//! dependencies. The VMM encodes with the URL-safe alphabet and no padding
//! (kernel command-line words cannot contain spaces, and `+`, `/` and `=` are
//! best avoided there); for robustness the standard alphabet and trailing `=`
//! padding are accepted too.

use std::fmt;

/// Why a `vmm.cmd=` value is not valid base64url.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// A byte outside the base64url (and standard base64) alphabet.
    InvalidByte { offset: usize, byte: u8 },
    /// A length that no encoding produces (one stray character at the end).
    InvalidLength(usize),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidByte { offset, byte } => write!(
                f,
                "byte {byte:#04x} at offset {offset} is not base64url (the VMM must encode \
                 the command with the URL-safe alphabet, no padding)"
            ),
            Self::InvalidLength(len) => {
                write!(
                    f,
                    "length {len} is not a valid base64url length (truncated command line?)"
                )
            }
        }
    }
}

impl std::error::Error for DecodeError {}

fn sextet(byte: u8) -> Option<u8> {
    match byte {
        b'A'..=b'Z' => Some(byte - b'A'),
        b'a'..=b'z' => Some(byte - b'a' + 26),
        b'0'..=b'9' => Some(byte - b'0' + 52),
        b'-' | b'+' => Some(62),
        b'_' | b'/' => Some(63),
        _ => None,
    }
}

/// Decodes unpadded base64url (padding and the standard alphabet tolerated).
pub fn decode(input: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let trimmed_len = input.iter().rposition(|&b| b != b'=').map_or(0, |i| i + 1);
    let input = &input[..trimmed_len];
    if input.len() % 4 == 1 {
        return Err(DecodeError::InvalidLength(input.len()));
    }
    let mut out = Vec::with_capacity(input.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for (offset, &byte) in input.iter().enumerate() {
        let v = sextet(byte).ok_or(DecodeError::InvalidByte { offset, byte })?;
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            // Truncation intended: take the top complete byte of the accumulator.
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_rfc4648_vectors_without_padding() {
        let cases: [(&str, &str); 7] = [
            ("", ""),
            ("Zg", "f"),
            ("Zm8", "fo"),
            ("Zm9v", "foo"),
            ("Zm9vYg", "foob"),
            ("Zm9vYmE", "fooba"),
            ("Zm9vYmFy", "foobar"),
        ];
        for (enc, dec) in cases {
            assert_eq!(decode(enc.as_bytes()).unwrap(), dec.as_bytes(), "{enc}");
        }
    }

    #[test]
    fn accepts_padding_and_both_alphabets() {
        assert_eq!(decode(b"Zm9vYg==").unwrap(), b"foob");
        // 0xfb 0xff encodes to "-_8" (url) and "+/8" (standard).
        assert_eq!(decode(b"-_8").unwrap(), [0xfb, 0xff]);
        assert_eq!(decode(b"+/8").unwrap(), [0xfb, 0xff]);
    }

    #[test]
    fn decodes_nul_separated_argv() {
        // "sh\0-c\0exit 7", as the VMM encodes it.
        assert_eq!(decode(b"c2gALWMAZXhpdCA3").unwrap(), b"sh\0-c\0exit 7");
    }

    #[test]
    fn rejects_bad_bytes_and_lengths() {
        assert_eq!(
            decode(b"Zm9v!A"),
            Err(DecodeError::InvalidByte {
                offset: 4,
                byte: b'!'
            })
        );
        assert_eq!(decode(b"Zm9vY"), Err(DecodeError::InvalidLength(5)));
        assert!(decode(b"Zm 9v").is_err());
    }

    #[test]
    fn round_trips_every_byte_value() {
        let data: Vec<u8> = (0..=255).collect();
        // Reference encoder, URL-safe, no padding.
        const ALPHA: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        for len in 0..data.len() {
            let mut enc = Vec::new();
            for chunk in data[..len].chunks(3) {
                let n = chunk.len();
                let mut b = [0u8; 3];
                b[..n].copy_from_slice(chunk);
                let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
                for i in 0..=n {
                    enc.push(ALPHA[((v >> (18 - 6 * i)) & 63) as usize]);
                }
            }
            assert_eq!(decode(&enc).unwrap(), &data[..len]);
        }
    }
}
