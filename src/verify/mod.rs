//! Verification: the one place where bytes are checked against the digest
//! they were asked for.
//!
//! Every read that crosses a trust boundary (a peer, a shared bucket, a
//! local cache file that may have rotted) goes through one of these before a
//! byte of it is handed out or written into another tier:
//!
//! * [`verify_chunk_meta`]: a whole physical chunk against its digest.
//! * [`GroupVerifier`]: a run of a blob's bytes, group by group, against the
//!   blob's [`Outboard`] (which [`Outboard::verify`] first checks against the
//!   blob digest) — a lie is caught at the first bad group.
//! * [`StreamVerifier`] / [`spool_verified`]: a whole blob whose pieces
//!   cannot be checked on their own, held back until all of it hashed right.
//! * [`cut_chunks`]: a blob streamed whole, cut back into its listed chunks,
//!   each checked like [`verify_chunk_meta`].
//! * [`BlobCheck`]: either of the last two, whichever the known outboard
//!   allows; its [`BlobProof`] lets a fill publish verified chunks without
//!   hashing them a second time.
//!
//! A chunk that never left this process's memory after it was hashed (the
//! `memory` tier keeps an immutable copy, made when it was stored) crosses
//! no trust boundary when it is read back: [`check_kept_chunk`] compares
//! only its length with the index.
//! Likewise a verified spool: [`cut_proven`] cuts it back into the chunks
//! it was proven as, checking lengths only, for a background fill.

pub mod bao;
mod check;
mod cut;
mod groups;
mod pipelined;

pub use bao::{Outboard, OutboardHasher, STORED_SHIFT};
pub use check::{BlobCheck, BlobProof};
pub use cut::{cut_chunks, cut_proven};
pub use groups::GroupVerifier;
pub use pipelined::PipelinedHasher;

use std::path::PathBuf;

use bytes::Bytes;
use futures::{Stream, StreamExt};

use crate::blobservice::{BlobReader, ChunkMeta, SharedSpool, Spool};
use crate::digest::B3Digest;
use crate::error::{Result, VerifyError};

/// Checks that `data` is the chunk (or small blob) named `expected`.
pub fn verify_chunk(expected: &B3Digest, data: &[u8]) -> Result<(), VerifyError> {
    let actual = B3Digest::of(data);
    if actual == *expected {
        Ok(())
    } else {
        Err(VerifyError::DigestMismatch {
            what: "chunk",
            expected: *expected,
            actual,
        })
    }
}

/// Checks that `data` is the chunk `meta` describes: its length and digest.
pub fn verify_chunk_meta(meta: &ChunkMeta, data: &[u8]) -> Result<(), VerifyError> {
    check_kept_chunk(meta, data)?;
    verify_chunk(&meta.digest, data)
}

/// Checks a chunk that was hashed under `meta.digest` when it was stored and
/// has stayed in this process's memory, immutable, since: only its length
/// against the index's. Hashing it again could only catch a memory fault,
/// which could as well strike any buffer after its check.
pub fn check_kept_chunk(meta: &ChunkMeta, data: &[u8]) -> Result<(), VerifyError> {
    if data.len() as u64 != meta.size {
        return Err(VerifyError::LengthMismatch {
            what: "chunk",
            expected: meta.digest,
            expected_len: meta.size,
            actual_len: data.len() as u64,
        });
    }
    Ok(())
}

/// Verifies a blob that arrives as a stream of pieces: feed every piece to
/// [`StreamVerifier::update`], then call [`StreamVerifier::finish`]. Nothing
/// fed to it may be released before `finish` succeeds.
///
/// It computes the blob's outboard on the way (same cost as hashing), so a
/// blob that arrived without one has one once it is verified.
pub struct StreamVerifier {
    expected: B3Digest,
    expected_len: Option<u64>,
    hasher: OutboardHasher,
    seen: u64,
}

impl StreamVerifier {
    /// Expects the blob `expected`, of `expected_len` bytes if known.
    pub fn new(expected: B3Digest, expected_len: Option<u64>) -> Self {
        StreamVerifier {
            expected,
            expected_len,
            hasher: OutboardHasher::new(STORED_SHIFT),
            seen: 0,
        }
    }

    /// Feeds the next piece. Fails as soon as more bytes arrive than announced.
    pub fn update(&mut self, data: &[u8]) -> Result<(), VerifyError> {
        self.seen += data.len() as u64;
        if let Some(expected_len) = self.expected_len
            && self.seen > expected_len
        {
            return Err(self.length_mismatch(expected_len));
        }
        self.hasher.update(data);
        Ok(())
    }

    /// Bytes fed so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Checks the length and the digest of everything fed, and returns the
    /// blob's outboard.
    pub fn finish(self) -> Result<Outboard, VerifyError> {
        if let Some(expected_len) = self.expected_len
            && self.seen != expected_len
        {
            return Err(self.length_mismatch(expected_len));
        }
        let (actual, outboard) = self.hasher.finalize();
        if actual == self.expected {
            Ok(outboard)
        } else {
            Err(VerifyError::DigestMismatch {
                what: "blob",
                expected: self.expected,
                actual,
            })
        }
    }

    fn length_mismatch(&self, expected_len: u64) -> VerifyError {
        VerifyError::LengthMismatch {
            what: "blob",
            expected: self.expected,
            expected_len,
            actual_len: self.seen,
        }
    }
}

/// Collects a blob arriving as `pieces` into a [`Spool`] while verifying it,
/// and returns a reader over it only once all of it hashed to `expected`
/// (with `expected_len` bytes, if known). Memory stays bounded: large blobs
/// spool to a temporary file in `spool_dir`.
///
/// This is how a blob whose chunk list or stream cannot be checked piece by
/// piece is made safe to release. With the blob's `outboard` known, the
/// pieces are checked group by group as they arrive instead ([`BlobCheck`]):
/// one pass over the bytes, and a lying source is dropped at its first bad
/// group rather than at the end.
pub async fn spool_verified<S>(
    expected: B3Digest,
    expected_len: Option<u64>,
    outboard: Option<Outboard>,
    spool_dir: Option<PathBuf>,
    pieces: S,
) -> Result<Box<dyn BlobReader>>
where
    S: Stream<Item = Result<Bytes>> + Unpin,
{
    let check = BlobCheck::new(expected, expected_len, outboard);
    spool_verified_shared(check, expected_len, spool_dir, pieces)
        .await?
        .0
        .open()
        .await
}

/// Like [`spool_verified`], but proves the pieces with `check` and returns
/// the spool itself, which several readers can open, and the proof of its
/// bytes (with the outboard they were checked against, or the one computed
/// on the way). `expected_len` sizes the spool.
pub async fn spool_verified_shared<S>(
    mut check: BlobCheck,
    expected_len: Option<u64>,
    spool_dir: Option<PathBuf>,
    mut pieces: S,
) -> Result<(SharedSpool, BlobProof)>
where
    S: Stream<Item = Result<Bytes>> + Unpin,
{
    let mut spool = Spool::new(spool_dir, expected_len);
    while let Some(piece) = pieces.next().await {
        let piece = piece?;
        check.push(piece.clone())?;
        spool.push(piece).await?;
    }
    let proof = check.finish()?;
    Ok((spool.into_shared().await?, proof))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_verification() {
        let d = B3Digest::of(b"abc");
        assert!(verify_chunk(&d, b"abc").is_ok());
        assert!(matches!(
            verify_chunk(&d, b"abd"),
            Err(VerifyError::DigestMismatch { .. })
        ));
    }

    #[test]
    fn stream_verification_in_pieces() {
        let d = B3Digest::of(b"hello world");
        let mut v = StreamVerifier::new(d, Some(11));
        v.update(b"hello ").unwrap();
        v.update(b"world").unwrap();
        assert!(v.finish().is_ok());
    }

    #[test]
    fn stream_rejects_overrun_early_and_short_at_finish() {
        let d = B3Digest::of(b"hello");
        let mut v = StreamVerifier::new(d, Some(5));
        assert!(matches!(
            v.update(b"hello!"),
            Err(VerifyError::LengthMismatch { .. })
        ));
        let mut v = StreamVerifier::new(d, Some(5));
        v.update(b"hell").unwrap();
        assert!(matches!(
            v.finish(),
            Err(VerifyError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn stream_rejects_wrong_content() {
        let d = B3Digest::of(b"hello");
        let mut v = StreamVerifier::new(d, None);
        v.update(b"jello").unwrap();
        assert!(matches!(
            v.finish(),
            Err(VerifyError::DigestMismatch { .. })
        ));
    }
}
