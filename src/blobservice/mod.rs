//! The [`BlobService`] trait: the one interface every tier, combinator and
//! the gRPC server speak.
//!
//! # Contract
//!
//! * Blobs are named by the BLAKE3 digest of their contents. A service never
//!   returns bytes for a digest that do not hash to it: tiers that hold data
//!   they did not write themselves pass it through [`crate::verify`] before
//!   handing it out.
//! * The empty blob ([`B3Digest::EMPTY`]) always exists; services answer it
//!   without storing it.
//! * A blob may be stored as a list of physical chunks ([`ChunkMeta`]), each
//!   itself a blob: [`BlobService::stat`] lists them, and every listed chunk
//!   can be stat'ed and read by its own digest on the same service.
//! * Reads and writes stream with bounded memory whatever the blob size:
//!   [`BlobReader`] is an `AsyncRead + AsyncSeek`, and [`BlobWriter`] takes
//!   `Bytes` pieces and keeps at most a few chunks of them in flight.
//! * "Absent" is `Ok(None)`, not an error. Errors mean the service could not
//!   answer (I/O, an unreachable or lying peer, ...).

mod reader;
mod spool;

pub use reader::{
    BlobReader, BufferedReader, Pieces, SpooledReader, poll_read_by_piece, poll_read_piece,
    seek_target,
};
pub use spool::{SPOOL_IN_MEMORY, SharedSpool, Spool};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::digest::B3Digest;
use crate::error::{Result, VerifyError};
use crate::verify::{BlobProof, Outboard};

/// One physical chunk of a blob: its digest and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkMeta {
    /// BLAKE3 digest of the chunk's bytes.
    pub digest: B3Digest,
    /// Length of the chunk in bytes.
    pub size: u64,
}

/// The largest chunk taken from any store: FastCDC v2020's largest
/// maximum. strata cuts chunks of at most [`crate::chunkstore::MAX_CHUNK_SIZE`];
/// a store chunking with other parameters may cut larger ones, never
/// larger than this. A size above it in a peer's or a bucket's chunk list
/// is a lie, refused before anything is allocated for it.
pub const LARGEST_CHUNK: u64 = fastcdc::v2020::MAXIMUM_MAX as u64;

/// The length of the blob `chunks` make up, or `None` if a chunk is larger
/// than [`LARGEST_CHUNK`] or the sizes overflow a `u64`. Every chunk list
/// that comes from outside the process passes through this before its
/// sizes are used for a buffer or an offset.
pub fn listed_len(chunks: &[ChunkMeta]) -> Option<u64> {
    chunks.iter().try_fold(0u64, |len, c| {
        (c.size <= LARGEST_CHUNK)
            .then(|| len.checked_add(c.size))
            .flatten()
    })
}

/// Refuses a chunk listed larger than [`LARGEST_CHUNK`] before a byte of
/// it is fetched or a buffer is sized for it.
pub fn check_chunk_size(chunk: &ChunkMeta) -> std::result::Result<(), VerifyError> {
    if chunk.size > LARGEST_CHUNK {
        return Err(VerifyError::LengthMismatch {
            what: "chunk",
            expected: chunk.digest,
            expected_len: LARGEST_CHUNK,
            actual_len: chunk.size,
        });
    }
    Ok(())
}

/// Verified chunks of a blob, in order: see [`BlobService::stream_chunks`].
pub type ChunkStream = BoxStream<'static, Result<Bytes>>;

/// What [`BlobService::stat`] knows about a blob.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlobStat {
    /// Length of the blob in bytes.
    pub size: u64,
    /// The blob's physical chunks, in order. Empty when the blob is stored
    /// as a single piece.
    pub chunks: Vec<ChunkMeta>,
}

/// What a completed write produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutResult {
    /// BLAKE3 digest of everything written.
    pub digest: B3Digest,
    /// Number of bytes written.
    pub size: u64,
    /// The physical chunks the blob was stored as (empty for a single piece).
    pub chunks: Vec<ChunkMeta>,
}

/// A store of BLAKE3-addressed blobs. See the module docs for the contract.
#[async_trait]
pub trait BlobService: Send + Sync + 'static {
    /// Whether the blob is present (and complete).
    async fn has(&self, digest: &B3Digest) -> Result<bool> {
        Ok(self.stat(digest).await?.is_some())
    }

    /// Size and chunk list of a blob, or `None` if it is absent.
    async fn stat(&self, digest: &B3Digest) -> Result<Option<BlobStat>>;

    /// A [`stat`](Self::stat) made because a read of the blob follows.
    ///
    /// A remote service may bring a small blob's bytes along with the
    /// answer, verify them, and keep them for that read, which then costs
    /// no round trip of its own: a cold small blob through a sidecar is
    /// one round trip to the peer instead of two. The default is a plain
    /// Stat.
    async fn stat_before_read(&self, digest: &B3Digest) -> Result<Option<BlobStat>> {
        self.stat(digest).await
    }

    /// The blob's outboard, checked against the digest (or computed by
    /// strata itself), at the shift the service keeps; `None` if the blob
    /// is absent or the service has no outboard for it.
    ///
    /// Separate from [`BlobService::stat`] because it is large (1/256 of
    /// the blob at 16 KiB groups) and most Stats — existence checks — do
    /// not need it. Combinators forward it to the tier that has the blob.
    async fn outboard(&self, digest: &B3Digest) -> Result<Option<Outboard>> {
        let _ = digest;
        Ok(None)
    }

    /// A seekable reader over the blob's verified contents, or `None` if it
    /// is absent.
    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>>;

    /// The whole of a chunk (or small blob) whose length is known from a
    /// chunk list, verified against its digest and length; `None` if absent.
    /// Services that can skip a round trip with the length in hand override
    /// it.
    async fn read_chunk(&self, chunk: &ChunkMeta) -> Result<Option<Bytes>> {
        let Some(mut reader) = self.open_read(&chunk.digest).await? else {
            return Ok(None);
        };
        let data = read_to_bytes(reader.as_mut(), chunk.size).await?;
        crate::verify::verify_chunk_meta(chunk, &data)?;
        Ok(Some(data))
    }

    /// The listed `chunks` of blob `digest` (as this service's
    /// [`stat`](Self::stat) listed them), in order, one item per chunk, each
    /// verified against its digest and length.
    ///
    /// For a service that moves a whole blob more cheaply than its chunks
    /// one by one: a gRPC peer answers with one Read of the blob, cut along
    /// the list, instead of a Read per chunk. `None` means the service has
    /// no such way (the default) or no such blob; the caller then goes
    /// chunk by chunk with [`read_chunk`](Self::read_chunk). A stream that
    /// fails part-way has delivered only verified chunks before the error.
    async fn stream_chunks(
        &self,
        digest: &B3Digest,
        chunks: &[ChunkMeta],
    ) -> Result<Option<ChunkStream>> {
        let _ = (digest, chunks);
        Ok(None)
    }

    /// Which of `chunks` this service holds, as far as it can tell without
    /// a round trip per chunk: cache tiers answer from their index. A
    /// service that cannot tell cheaply answers `false` for each (the
    /// default).
    async fn holds_chunks(&self, chunks: &[ChunkMeta]) -> Result<Vec<bool>> {
        Ok(vec![false; chunks.len()])
    }

    /// Starts writing a new blob. Nothing is visible until
    /// [`BlobWriter::close`] succeeds; dropping the writer abandons it.
    async fn open_write(&self) -> Result<Box<dyn BlobWriter>>;

    /// Starts storing a blob known in advance by its digest, size and
    /// chunk list (`stat`): a fill from another tier. The caller writes the
    /// listed chunks in order, one chunk per [`BlobWriter::write`], each
    /// already verified against its digest, checks the whole run with a
    /// [`crate::verify::BlobCheck`], and finishes with
    /// [`BlobWriter::close_verified`]. A blob of at most one maximum chunk
    /// listed with fewer than two chunks is written whole, in one write,
    /// verified against the blob's digest.
    ///
    /// A service that can store chunks as listed skips chunking and hashing
    /// them again. The default is an ordinary [`open_write`](Self::open_write).
    async fn open_fill(&self, digest: &B3Digest, stat: &BlobStat) -> Result<Box<dyn BlobWriter>> {
        let _ = (digest, stat);
        self.open_write().await
    }

    /// Finishes background work (queued fills, ...) before the process
    /// exits, abandoning what is not done by `deadline` (an abandoned write
    /// publishes nothing). Combinators forward it to the tiers they use.
    async fn shutdown(&self, deadline: tokio::time::Instant) -> Result<()> {
        let _ = deadline;
        Ok(())
    }

    /// Tells the service that `chunks`, the chunk list it gave for blob
    /// `digest` (a [`stat`](Self::stat) or
    /// [`stat_before_read`](Self::stat_before_read) answer), was caught
    /// lying: the listed chunks, each as listed, do not make up the blob.
    /// Returns whether the service passed over the source of that list, so
    /// that asked again it answers from another (a `race` of several peers
    /// does); then the caller asks it again rather than passing over the
    /// whole service. The list itself is passed because the service may
    /// have given different lists to reads close together, from different
    /// sources. The default: `false`. Wrappers forward it.
    fn caught_lying(&self, digest: &B3Digest, chunks: &[ChunkMeta]) -> bool {
        let _ = (digest, chunks);
        false
    }
}

/// An in-progress blob upload.
#[async_trait]
pub trait BlobWriter: Send {
    /// Appends `data` to the blob.
    async fn write(&mut self, data: Bytes) -> Result<()>;

    /// Finishes the blob and makes it visible. Returns its digest, size and
    /// chunk list.
    async fn close(self: Box<Self>) -> Result<PutResult>;

    /// Finishes a blob whose bytes `proof` vouches for (see
    /// [`BlobService::open_fill`]). Writers that hash what they store check
    /// their digest against the proof; fill writers, which do not, publish
    /// only this way.
    async fn close_verified(self: Box<Self>, proof: &BlobProof) -> Result<PutResult> {
        let put = self.close().await?;
        if put.digest != *proof.digest() {
            return Err(crate::error::VerifyError::DigestMismatch {
                what: "blob",
                expected: *proof.digest(),
                actual: put.digest,
            }
            .into());
        }
        Ok(put)
    }
}

#[async_trait]
impl<T: BlobService + ?Sized> BlobService for std::sync::Arc<T> {
    async fn has(&self, digest: &B3Digest) -> Result<bool> {
        (**self).has(digest).await
    }
    async fn stat(&self, digest: &B3Digest) -> Result<Option<BlobStat>> {
        (**self).stat(digest).await
    }
    async fn stat_before_read(&self, digest: &B3Digest) -> Result<Option<BlobStat>> {
        (**self).stat_before_read(digest).await
    }
    async fn outboard(&self, digest: &B3Digest) -> Result<Option<Outboard>> {
        (**self).outboard(digest).await
    }
    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
        (**self).open_read(digest).await
    }
    async fn read_chunk(&self, chunk: &ChunkMeta) -> Result<Option<Bytes>> {
        (**self).read_chunk(chunk).await
    }
    async fn stream_chunks(
        &self,
        digest: &B3Digest,
        chunks: &[ChunkMeta],
    ) -> Result<Option<ChunkStream>> {
        (**self).stream_chunks(digest, chunks).await
    }
    async fn holds_chunks(&self, chunks: &[ChunkMeta]) -> Result<Vec<bool>> {
        (**self).holds_chunks(chunks).await
    }
    async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
        (**self).open_write().await
    }
    async fn open_fill(&self, digest: &B3Digest, stat: &BlobStat) -> Result<Box<dyn BlobWriter>> {
        (**self).open_fill(digest, stat).await
    }
    async fn shutdown(&self, deadline: tokio::time::Instant) -> Result<()> {
        (**self).shutdown(deadline).await
    }
    fn caught_lying(&self, digest: &B3Digest, chunks: &[ChunkMeta]) -> bool {
        (**self).caught_lying(digest, chunks)
    }
}

/// Reads a whole blob into memory. Meant for blobs known to be small (chunks,
/// inline data); `limit` guards against anything larger.
pub async fn read_to_bytes(reader: &mut dyn BlobReader, limit: u64) -> Result<Bytes> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let n = (&mut *reader).take(limit + 1).read_to_end(&mut buf).await?;
    if n as u64 > limit {
        return Err(crate::Error::InvalidRequest(format!(
            "blob is larger than the {limit} bytes allowed here"
        )));
    }
    Ok(buf.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(size: u64) -> ChunkMeta {
        ChunkMeta {
            digest: B3Digest::of(&size.to_le_bytes()),
            size,
        }
    }

    #[test]
    fn listed_len_sums_sane_lists() {
        assert_eq!(listed_len(&[]), Some(0));
        assert_eq!(
            listed_len(&[chunk(3), chunk(LARGEST_CHUNK)]),
            Some(LARGEST_CHUNK + 3)
        );
    }

    #[test]
    fn listed_len_refuses_oversize_chunks_and_wrapping_sums() {
        assert_eq!(listed_len(&[chunk(LARGEST_CHUNK + 1)]), None);
        // Each size too large, and their sum wraps around to 10.
        assert_eq!(listed_len(&[chunk(1 << 63), chunk((1 << 63) + 10)]), None);
        assert!(check_chunk_size(&chunk(LARGEST_CHUNK)).is_ok());
        assert!(matches!(
            check_chunk_size(&chunk(u64::MAX)),
            Err(VerifyError::LengthMismatch { .. })
        ));
    }
}
