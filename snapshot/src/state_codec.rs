//! The one codec for serde state: postcard, with its errors mapped to
//! [`SnapshotError`]. Every state payload of an image (the header, VM,
//! vCPU and device states, the memory layout, disk infos, the index) is
//! encoded and decoded here, so the encoding and its error messages are
//! the same everywhere.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::SnapshotError;

/// Encodes a state value (postcard); `name` is for the error message.
pub fn encode_state<T: Serialize + ?Sized>(
    name: &str,
    value: &T,
) -> Result<Vec<u8>, SnapshotError> {
    postcard::to_allocvec(value)
        .map_err(|e| SnapshotError::Serialize(name.to_string(), e.to_string()))
}

/// Decodes a state payload (postcard); `name` is for the error message.
pub fn decode_state<T: DeserializeOwned>(name: &str, payload: &[u8]) -> Result<T, SnapshotError> {
    postcard::from_bytes(payload).map_err(|e| SnapshotError::Corrupt {
        section: name.to_string(),
        reason: format!("cannot decode its state ({e}); was it written by another build?"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_names_what_it_cannot_decode() {
        let v = (7u32, String::from("vda"), Some([1u8; 4]));
        let b = encode_state("t", &v).unwrap();
        assert_eq!(
            decode_state::<(u32, String, Option<[u8; 4]>)>("t", &b).unwrap(),
            v
        );
        let e = decode_state::<(u32, String)>("device 'vda'", &b[..2]).unwrap_err();
        assert!(matches!(&e, SnapshotError::Corrupt { section, .. } if section == "device 'vda'"));
    }
}
