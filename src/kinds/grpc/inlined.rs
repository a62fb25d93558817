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
//! A blob of several chunks that came inline is kept chunk by chunk, each
//! checked against its listed digest: the read that follows goes along the
//! list and takes them, where it would have sent a Read of the whole blob.
//!
//! Only verified bytes are kept, each entry is taken by the first read of
//! its blob or chunk, and whatever no read takes leaves by size or age:
//! this is a hand-over between two calls, not a cache.
//!
//! [`BlobService::stat_before_read`]: crate::blobservice::BlobService::stat_before_read

use std::time::Duration;

use bytes::Bytes;

use crate::blobservice::{ChunkMeta, listed_len};
use crate::chunkstore::MAX_CHUNK_SIZE;
use crate::digest::B3Digest;
use crate::error::VerifyError;
use crate::verify::verify_chunk_meta;

/// Largest blob asked for inline: the largest chunk FastCDC cuts at the
/// default sizes (strata's and snix's), so a client that reads a blob
/// chunk by chunk, as stock clients do, costs the peer one round trip per
/// cold chunk, not two; and most files of a store path come whole.
pub const INLINE_MAX: u64 = MAX_CHUNK_SIZE as u64;

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

    /// Checks that `data` is made of `chunks`, each matching its digest,
    /// and keeps each chunk for the next read of it. Bytes that do not
    /// match are the peer lying: an error, and nothing is kept. Whether
    /// the chunks make up the blob they were listed for is for the read of
    /// that blob to prove, as for chunks that come by Read.
    pub fn check_and_keep_chunks(
        &self,
        blob: &B3Digest,
        chunks: &[ChunkMeta],
        data: Bytes,
    ) -> Result<(), VerifyError> {
        let Some(listed) = listed_len(chunks) else {
            return Err(VerifyError::BadChunkList { blob: *blob });
        };
        if listed != data.len() as u64 {
            return Err(VerifyError::LengthMismatch {
                what: "inline blob",
                expected: *blob,
                expected_len: listed,
                actual_len: data.len() as u64,
            });
        }
        let mut at = 0;
        let mut pieces = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            // Within `data`: the sizes add up to its length.
            let piece = data.slice(at..at + chunk.size as usize);
            at += chunk.size as usize;
            verify_chunk_meta(chunk, &piece)?;
            pieces.push((chunk.digest, piece));
        }
        for (digest, piece) in pieces {
            self.kept.insert(digest, piece);
        }
        Ok(())
    }

    /// The kept bytes of blob `digest`, taken out: each serves one read.
    pub fn take(&self, digest: &B3Digest) -> Option<Bytes> {
        self.kept.remove(digest)
    }

    /// Every chunk of `chunks`, taken out, if all of them are kept; else
    /// none is taken.
    pub fn take_all(&self, chunks: &[ChunkMeta]) -> Option<Vec<Bytes>> {
        if !chunks.iter().all(|c| self.kept.contains_key(&c.digest)) {
            return None;
        }
        // One may leave by age between the look and the take: then the
        // read goes out as if none had been kept.
        chunks
            .iter()
            .map(|c| self.take(&c.digest).filter(|d| d.len() as u64 == c.size))
            .collect()
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

    fn listed(parts: &[&'static [u8]]) -> (B3Digest, Vec<ChunkMeta>, Bytes) {
        let chunks = parts
            .iter()
            .map(|p| ChunkMeta {
                digest: B3Digest::of(p),
                size: p.len() as u64,
            })
            .collect();
        let data = Bytes::from(parts.concat());
        (B3Digest::of(&data), chunks, data)
    }

    #[test]
    fn a_blob_of_several_chunks_is_kept_by_chunk() {
        let inlined = Inlined::default();
        let (blob, chunks, data) = listed(&[b"first chunk", b"second", b"third one"]);
        inlined
            .check_and_keep_chunks(&blob, &chunks, data.clone())
            .unwrap();
        assert_eq!(inlined.take(&blob), None, "kept by chunk, not whole");
        let taken = inlined.take_all(&chunks).expect("every chunk kept");
        assert_eq!(taken.concat(), data.to_vec());
        assert_eq!(inlined.take_all(&chunks), None, "each is taken once");

        // One chunk missing: none is taken.
        inlined.check_and_keep_chunks(&blob, &chunks, data).unwrap();
        assert!(inlined.take(&chunks[1].digest).is_some());
        assert_eq!(inlined.take_all(&chunks), None);
        assert!(inlined.take(&chunks[0].digest).is_some(), "left in place");
    }

    #[test]
    fn chunks_that_do_not_match_their_list_keep_nothing() {
        let inlined = Inlined::default();
        let (blob, chunks, data) = listed(&[b"first chunk", b"second", b"third one"]);
        // A flipped byte in the last chunk.
        let mut lie = data.to_vec();
        *lie.last_mut().unwrap() ^= 1;
        assert!(
            inlined
                .check_and_keep_chunks(&blob, &chunks, lie.into())
                .is_err()
        );
        // Bytes that do not add up to the list.
        assert!(
            inlined
                .check_and_keep_chunks(&blob, &chunks, data.slice(1..))
                .is_err()
        );
        for chunk in &chunks {
            assert_eq!(inlined.take(&chunk.digest), None, "a lie was kept");
        }
    }
}
