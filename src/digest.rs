//! [`B3Digest`]: the BLAKE3 digest that names every blob and chunk.

use std::fmt;
use std::str::FromStr;

use data_encoding::{BASE64, BASE64_NOPAD, HEXLOWER_PERMISSIVE};

/// Length of a BLAKE3 digest in bytes.
pub const DIGEST_LEN: usize = 32;

/// A BLAKE3 digest (32 bytes).
///
/// Prints as lowercase hex. Parses lowercase or uppercase hex and snix's
/// `blake3-<base64>` form (SRI-style, with or without padding).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct B3Digest([u8; DIGEST_LEN]);

/// Why a byte string or text is not a [`B3Digest`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// The digest did not have exactly 32 bytes.
    #[error("invalid digest length: expected {DIGEST_LEN} bytes, got {0}")]
    InvalidLength(usize),
    /// The text was neither 64 hex characters nor `blake3-<base64>`.
    #[error("invalid digest {0:?}: expected 64 hex characters or blake3-<base64>")]
    InvalidText(String),
}

impl B3Digest {
    /// The digest of the empty blob, which every store answers without storing it.
    pub const EMPTY: B3Digest = B3Digest([
        0xaf, 0x13, 0x49, 0xb9, 0xf5, 0xf9, 0xa1, 0xa6, 0xa0, 0x40, 0x4d, 0xea, 0x36, 0xdc, 0xc9,
        0x49, 0x9b, 0xcb, 0x25, 0xc9, 0xad, 0xc1, 0x12, 0xb7, 0xcc, 0x9a, 0x93, 0xca, 0xe4, 0x1f,
        0x32, 0x62,
    ]);

    /// Wraps 32 raw bytes.
    pub const fn from_bytes(bytes: [u8; DIGEST_LEN]) -> Self {
        B3Digest(bytes)
    }

    /// The BLAKE3 digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        B3Digest(*blake3::hash(data).as_bytes())
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; DIGEST_LEN] {
        &self.0
    }

    /// Lowercase hex, as used in storage keys and on the command line.
    pub fn to_hex(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.0)
    }

    /// Whether this is the digest of the empty blob.
    pub fn is_empty_blob(&self) -> bool {
        *self == Self::EMPTY
    }
}

impl TryFrom<&[u8]> for B3Digest {
    type Error = DigestError;

    fn try_from(value: &[u8]) -> Result<Self, Self::Error> {
        let bytes: [u8; DIGEST_LEN] = value
            .try_into()
            .map_err(|_| DigestError::InvalidLength(value.len()))?;
        Ok(B3Digest(bytes))
    }
}

impl TryFrom<&bytes::Bytes> for B3Digest {
    type Error = DigestError;

    fn try_from(value: &bytes::Bytes) -> Result<Self, Self::Error> {
        B3Digest::try_from(value.as_ref())
    }
}

impl From<blake3::Hash> for B3Digest {
    fn from(hash: blake3::Hash) -> Self {
        B3Digest(*hash.as_bytes())
    }
}

impl From<B3Digest> for bytes::Bytes {
    fn from(digest: B3Digest) -> Self {
        bytes::Bytes::copy_from_slice(&digest.0)
    }
}

impl FromStr for B3Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || DigestError::InvalidText(s.to_owned());
        let decoded = if let Some(b64) = s.strip_prefix("blake3-") {
            BASE64
                .decode(b64.as_bytes())
                .or_else(|_| BASE64_NOPAD.decode(b64.as_bytes()))
                .map_err(|_| invalid())?
        } else if s.len() == DIGEST_LEN * 2 {
            HEXLOWER_PERMISSIVE
                .decode(s.as_bytes())
                .map_err(|_| invalid())?
        } else {
            return Err(invalid());
        };
        B3Digest::try_from(decoded.as_slice()).map_err(|_| invalid())
    }
}

impl fmt::Display for B3Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for B3Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b3:{}", self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_constant_is_the_hash_of_nothing() {
        assert_eq!(B3Digest::of(b""), B3Digest::EMPTY);
    }

    #[test]
    fn hex_round_trip() {
        let d = B3Digest::of(b"Hello World");
        assert_eq!(
            d.to_string(),
            "41f8394111eb713a22165c46c90ab8f0fd9399c92028fd6d288944b23ff5bf76"
        );
        assert_eq!(d.to_string().parse::<B3Digest>(), Ok(d));
        assert_eq!(d.to_string().to_uppercase().parse::<B3Digest>(), Ok(d));
    }

    #[test]
    fn parses_snix_base64_form() {
        let d = B3Digest::of(b"Hello World");
        let padded = format!("blake3-{}", BASE64.encode(d.as_bytes()));
        let unpadded = format!("blake3-{}", BASE64_NOPAD.encode(d.as_bytes()));
        assert_eq!(padded.parse::<B3Digest>(), Ok(d));
        assert_eq!(unpadded.parse::<B3Digest>(), Ok(d));
    }

    #[test]
    fn rejects_malformed_text_and_lengths() {
        assert!("abc".parse::<B3Digest>().is_err());
        assert!("zz".repeat(32).parse::<B3Digest>().is_err());
        assert!("blake3-AAAA".parse::<B3Digest>().is_err());
        assert_eq!(
            B3Digest::try_from(&[0u8; 31][..]),
            Err(DigestError::InvalidLength(31))
        );
        assert_eq!(
            B3Digest::try_from(&[0u8; 33][..]),
            Err(DigestError::InvalidLength(33))
        );
    }
}
