//! Small blobs a peer sent inline with a Stat, kept for the read that
//! follows it.
//!
//! A cold small blob through a sidecar used to cost two round trips to the
//! peer: the Stat that finds it, then the Read. A strata peer puts a small
//! blob's bytes in its Stat answer when asked (`inline_max_size`, see
//! `docs/protocol.md`), so [`BlobService::stat_before_read`] asks, checks
//! the bytes against the digest at once, and keeps them here; the read
//! that comes next takes them instead of sending a Read. Stock snix and
//! tvix peers ignore the request field, and the read goes out as before.
//!
//! Only verified bytes are kept, each entry is taken by the first read of
//! its blob, and whatever no read takes leaves by size or age: this is a
//! hand-over between two calls, not a cache.
//!
//! [`BlobService::stat_before_read`]: crate::blobservice::BlobService::stat_before_read

use std::time::Duration;

use bytes::Bytes;

use crate::blobservice::ChunkMeta;
use crate::digest::B3Digest;
use crate::error::VerifyError;
use crate::verify::verify_chunk_meta;

/// Largest blob asked for inline: the average chunk size, which covers
/// most files of a store path while keeping a Stat answer small.
pub const INLINE_MAX: u64 = 256 << 10;

/// Bytes kept for reads that have not come yet.
const KEPT_BYTES: u64 = 16 << 20;

/// How long kept bytes wait for their read.
const KEPT_FOR: Duration = Duration::from_secs(30);

/// Verified small blobs waiting for their read. Cloning shares them.
#[derive(Clone)]
pub struct Inlined {
    kept: moka::sync::Cache<B3Digest, Bytes>,
}

impl Default for Inlined {
    fn default() -> Self {
        Inlined {
            kept: moka::sync::Cache::builder()
                .max_capacity(KEPT_BYTES)
                .weigher(|_, data: &Bytes| u32::try_from(data.len()).unwrap_or(u32::MAX))
                .time_to_live(KEPT_FOR)
                .build(),
        }
    }
}

impl Inlined {
    /// Checks that `data` is the blob `digest` of `size` bytes, and keeps
    /// it for the next read of that blob. Bytes that do not match are the
    /// peer lying: an error, and nothing is kept.
    pub fn check_and_keep(
        &self,
        digest: &B3Digest,
        size: Option<u64>,
        data: Bytes,
    ) -> Result<(), VerifyError> {
        let meta = ChunkMeta {
            digest: *digest,
            size: size.unwrap_or(data.len() as u64),
        };
        verify_chunk_meta(&meta, &data)?;
        self.kept.insert(*digest, data);
        Ok(())
    }

    /// The kept bytes of blob `digest`, taken out: each serves one read.
    pub fn take(&self, digest: &B3Digest) -> Option<Bytes> {
        self.kept.remove(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_matching_bytes_are_kept_and_each_is_taken_once() {
        let inlined = Inlined::default();
        let data = Bytes::from_static(b"a small blob");
        let digest = B3Digest::of(&data);
        inlined
            .check_and_keep(&digest, Some(data.len() as u64), data.clone())
            .unwrap();
        assert_eq!(inlined.take(&digest), Some(data.clone()));
        assert_eq!(inlined.take(&digest), None);

        let other = B3Digest::of(b"another blob");
        assert!(inlined.check_and_keep(&other, None, data.clone()).is_err());
        assert_eq!(inlined.take(&other), None);
        let short = Some(data.len() as u64 - 1);
        assert!(inlined.check_and_keep(&digest, short, data).is_err());
        assert_eq!(inlined.take(&digest), None);
    }
}
