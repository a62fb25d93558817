//! [`ChunkingWriter`]: content-defined chunking, hashing (chunk digests, blob
//! digest and outboard) and storing as data arrives.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Buf, Bytes, BytesMut};

use super::cdc::{Chunking, Cutter};
use super::uploads::Uploads;
use super::{BlobIndex, ChunkStore};
use crate::blobservice::{BlobWriter, ChunkMeta, PutResult};
use crate::error::Result;
use crate::verify::{PipelinedHasher, STORED_SHIFT};

/// Writes a blob into a [`ChunkStore`].
///
/// A chunk cut only depends on the bytes from the chunk start up to the
/// maximum chunk size, so cutting wherever a maximum chunk's worth of bytes
/// is at hand yields exactly the chunks a streaming FastCDC v2020 chunker
/// (snix's) produces. Chunks are cut straight out of the incoming pieces
/// when they lie inside one, without a copy; only the bytes of a chunk that
/// straddles two pieces are gathered in a carry buffer.
///
/// The work is spread so a Put is not bound by one task: the blob digest and
/// outboard are computed on the blocking pool, one piece behind
/// ([`PipelinedHasher`]), and each chunk is hashed and stored by an upload
/// task ([`ChunkStore::write_concurrency`] at most in flight) through
/// [`ChunkStore::put_chunk_hashing`] (a store may hash it where it writes
/// it instead). Memory stays at
/// about one maximum chunk, plus the queued pieces and uploads.
pub struct ChunkingWriter<S> {
    store: Arc<S>,
    chunking: Chunking,
    cutter: Cutter,
    /// Bytes of the chunk being assembled across pieces (less than a
    /// maximum chunk).
    carry: BytesMut,
    /// The blob's digest and outboard.
    blob_hasher: PipelinedHasher,
    /// The chunks cut so far, in order; `None` until its upload task has
    /// hashed it.
    chunks: Vec<Option<ChunkMeta>>,
    size: u64,
    /// Chunk uploads in flight; each reports its index in `chunks`.
    uploads: Uploads<S>,
}

impl<S: ChunkStore> ChunkingWriter<S> {
    /// Starts a blob in `store`.
    pub fn new(store: Arc<S>) -> Self {
        let chunking = store.chunking();
        ChunkingWriter {
            uploads: Uploads::new(store.clone()),
            store,
            chunking,
            cutter: Cutter::new(chunking),
            carry: BytesMut::new(),
            blob_hasher: PipelinedHasher::new(STORED_SHIFT),
            chunks: Vec::new(),
            size: 0,
        }
    }

    /// Where the chunk starting at `data[0]` ends. `data` holds at least a
    /// maximum chunk, or is the end of the blob.
    fn cut(&self, data: &[u8]) -> usize {
        self.cutter.cut(data)
    }

    /// Hashes and stores `chunk` (unless the store has it) in an upload
    /// task, after waiting for room in the upload window.
    async fn store_chunk(&mut self, chunk: Bytes) -> Result<()> {
        let index = self.chunks.len();
        self.chunks.push(None);
        let chunks = &mut self.chunks;
        self.uploads
            .start(index, chunk, None, &mut |i, meta| chunks[i] = Some(meta))
            .await
    }
}

#[async_trait]
impl<S: ChunkStore> BlobWriter for ChunkingWriter<S> {
    async fn write(&mut self, mut data: Bytes) -> Result<()> {
        self.size += data.len() as u64;
        self.blob_hasher.update(data.clone()).await?;
        let max = self.chunking.max() as usize;
        loop {
            if self.carry.is_empty() {
                // Chunks that lie inside this piece: cut without copying.
                while data.len() >= max {
                    let end = self.cut(&data[..max]);
                    let chunk = data.split_to(end);
                    self.store_chunk(chunk).await?;
                }
                if !data.is_empty() {
                    // Room for the whole chunk at once: growing the carry
                    // later would copy it again.
                    self.carry.reserve(max);
                    self.carry.extend_from_slice(&data);
                }
                return Ok(());
            }
            let carried = self.carry.len();
            if carried + data.len() < max {
                self.carry.extend_from_slice(&data);
                return Ok(());
            }
            // A chunk starts in the carry: cut it across the carry and this
            // piece, then copy only the part of the piece it takes.
            let end = self.cutter.cut_split(&self.carry, &data[..max - carried]);
            if end > carried {
                self.carry.extend_from_slice(&data[..end - carried]);
                data.advance(end - carried);
            }
            let chunk = self.carry.split_to(end).freeze();
            self.store_chunk(chunk).await?;
        }
    }

    async fn close(mut self: Box<Self>) -> Result<PutResult> {
        while !self.carry.is_empty() {
            let end = self.cut(&self.carry);
            let chunk = self.carry.split_to(end).freeze();
            self.store_chunk(chunk).await?;
        }
        let chunks = &mut self.chunks;
        self.uploads
            .finish(&mut |i, meta| chunks[i] = Some(meta))
            .await?;
        let hasher = std::mem::replace(&mut self.blob_hasher, PipelinedHasher::new(STORED_SHIFT));
        let (digest, outboard) = hasher.finalize().await?;
        let chunks = std::mem::take(&mut self.chunks)
            .into_iter()
            .collect::<Option<Vec<ChunkMeta>>>()
            .ok_or_else(|| std::io::Error::other("a chunk upload never reported back"))?;
        if chunks.len() < 2 {
            // The empty blob is never stored, and a single chunk is the blob.
            return Ok(PutResult {
                digest,
                size: self.size,
                chunks: Vec::new(),
            });
        }
        // Last: a visible index means every chunk is stored.
        let index = BlobIndex::new(chunks.clone(), Some(&outboard));
        self.store.put_index(digest, index).await?;
        Ok(PutResult {
            digest,
            size: self.size,
            chunks,
        })
    }
}
