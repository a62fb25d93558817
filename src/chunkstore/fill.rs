//! [`ListedWriter`]: stores a blob fetched from another tier as the chunks
//! it was listed with, without chunking or hashing it again.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::uploads::Uploads;
use super::{BlobIndex, ChunkStore};
use crate::blobservice::{BlobWriter, ChunkMeta, PutResult};
use crate::digest::B3Digest;
use crate::error::{Error, Result};
use crate::verify::BlobProof;

/// The writer [`super::ChunkedBlobService`] returns from
/// [`crate::blobservice::BlobService::open_fill`].
///
/// A fill's chunks were each verified against their digests by the tier they
/// came from, and the caller proves the whole run with a
/// [`crate::verify::BlobCheck`]. Cutting and hashing them again, as a Put's
/// [`super::ChunkingWriter`] must, would only repeat that work: this writer
/// stores each chunk under its listed digest and publishes the index only
/// with the proof, in [`BlobWriter::close_verified`].
///
/// A blob of a single chunk comes as one write, verified against the blob's
/// own digest (which is the chunk's), and is stored as that chunk alone; its
/// proof may be the one its read gave
/// ([`crate::verify::BlobCheck::read_chunk`]).
pub struct ListedWriter<S> {
    store: Arc<S>,
    digest: B3Digest,
    chunks: Vec<ChunkMeta>,
    /// How many chunks have been written.
    written: usize,
    uploads: Uploads<S>,
}

impl<S: ChunkStore> ListedWriter<S> {
    /// Starts filling blob `digest`, listed as `chunks`.
    pub fn new(store: Arc<S>, digest: B3Digest, chunks: Vec<ChunkMeta>) -> Self {
        ListedWriter {
            uploads: Uploads::new(store.clone()),
            store,
            digest,
            chunks,
            written: 0,
        }
    }

    fn misuse(&self, why: String) -> Error {
        Error::Io(std::io::Error::other(format!(
            "fill of blob {}: {why}",
            self.digest
        )))
    }
}

#[async_trait]
impl<S: ChunkStore> BlobWriter for ListedWriter<S> {
    /// Takes the next listed chunk, whole.
    async fn write(&mut self, data: Bytes) -> Result<()> {
        let Some(meta) = self.chunks.get(self.written).copied() else {
            return Err(self.misuse("more chunks written than listed".into()));
        };
        if data.len() as u64 != meta.size {
            return Err(self.misuse(format!(
                "chunk {} written with {} bytes, listed with {}",
                self.written,
                data.len(),
                meta.size
            )));
        }
        let index = self.written;
        self.written += 1;
        self.uploads
            .start(index, data.into(), Some(meta.digest), &mut |_, _| {})
            .await
    }

    async fn close(self: Box<Self>) -> Result<PutResult> {
        Err(self.misuse("a fill is published only with its proof".into()))
    }

    async fn close_verified(mut self: Box<Self>, proof: &BlobProof) -> Result<PutResult> {
        let listed: u64 = self.chunks.iter().map(|c| c.size).sum();
        if *proof.digest() != self.digest
            || self.written != self.chunks.len()
            || listed != proof.size()
        {
            return Err(self.misuse(format!(
                "{} of {} chunks ({listed} bytes) written, proof for {} ({} bytes)",
                self.written,
                self.chunks.len(),
                proof.digest(),
                proof.size()
            )));
        }
        self.uploads.finish(&mut |_, _| {}).await?;
        if self.chunks.len() == 1 {
            // A blob of one chunk is that chunk, as a Put stores it: no
            // index, no outboard.
            return Ok(PutResult {
                digest: self.digest,
                size: proof.size(),
                chunks: Vec::new(),
            });
        }
        let Some(outboard) = proof.outboard() else {
            // Only a chunk's read proves it without one: not a blob of
            // several chunks.
            return Err(self.misuse("proof without an outboard for a blob of chunks".into()));
        };
        let chunks = std::mem::take(&mut self.chunks);
        // Last: a visible index means every chunk is stored.
        let index = BlobIndex::new(chunks.clone(), Some(outboard));
        self.store.put_index(self.digest, index).await?;
        Ok(PutResult {
            digest: self.digest,
            size: proof.size(),
            chunks,
        })
    }
}
