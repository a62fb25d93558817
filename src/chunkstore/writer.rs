//! [`ChunkingWriter`]: content-defined chunking, hashing and storing as data
//! arrives.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use fastcdc::v2020::FastCDC;

use super::{BlobIndex, ChunkStore};
use crate::blobservice::{BlobWriter, ChunkMeta, PutResult};
use crate::digest::B3Digest;
use crate::error::Result;

/// Average chunk size: snix's default, so both cut identical chunks.
pub const AVG_CHUNK_SIZE: u32 = 256 * 1024;
/// Minimum chunk size (average / 2).
pub const MIN_CHUNK_SIZE: u32 = AVG_CHUNK_SIZE / 2;
/// Maximum chunk size (average * 2).
pub const MAX_CHUNK_SIZE: u32 = AVG_CHUNK_SIZE * 2;

/// Writes a blob into a [`ChunkStore`].
///
/// Incoming bytes collect in a buffer; whenever it holds at least a maximum
/// chunk, the next FastCDC cut point is found. A cut only depends on the bytes
/// from the chunk start up to the maximum chunk size, so this yields exactly
/// the chunks a streaming FastCDC v2020 chunker (snix's) produces, while
/// memory stays at about one maximum chunk plus one write.
pub struct ChunkingWriter<S> {
    store: Arc<S>,
    buf: BytesMut,
    blob_hasher: blake3::Hasher,
    chunks: Vec<ChunkMeta>,
    size: u64,
}

impl<S: ChunkStore> ChunkingWriter<S> {
    /// Starts a blob in `store`.
    pub fn new(store: Arc<S>) -> Self {
        ChunkingWriter {
            store,
            buf: BytesMut::with_capacity(2 * MAX_CHUNK_SIZE as usize),
            blob_hasher: blake3::Hasher::new(),
            chunks: Vec::new(),
            size: 0,
        }
    }

    /// Cuts the next chunk off the front of the buffer and stores it.
    async fn emit_one(&mut self) -> Result<()> {
        let cdc = FastCDC::new(&self.buf, MIN_CHUNK_SIZE, AVG_CHUNK_SIZE, MAX_CHUNK_SIZE);
        let (_, end) = cdc.cut(0, self.buf.len());
        let chunk = self.buf.split_to(end).freeze();
        self.store_chunk(chunk).await
    }

    async fn store_chunk(&mut self, chunk: Bytes) -> Result<()> {
        let digest = B3Digest::of(&chunk);
        self.chunks.push(ChunkMeta {
            digest,
            size: chunk.len() as u64,
        });
        if !self.store.has_chunk(&digest).await? {
            self.store.put_chunk(digest, chunk).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl<S: ChunkStore> BlobWriter for ChunkingWriter<S> {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        self.blob_hasher.update(&data);
        self.size += data.len() as u64;
        self.buf.extend_from_slice(&data);
        while self.buf.len() >= MAX_CHUNK_SIZE as usize {
            self.emit_one().await?;
        }
        Ok(())
    }

    async fn close(mut self: Box<Self>) -> Result<PutResult> {
        while !self.buf.is_empty() {
            self.emit_one().await?;
        }
        let digest = B3Digest::from(self.blob_hasher.finalize());
        let chunks = std::mem::take(&mut self.chunks);
        if chunks.len() < 2 {
            // The empty blob is never stored, and a single chunk is the blob.
            return Ok(PutResult {
                digest,
                size: self.size,
                chunks: Vec::new(),
            });
        }
        let index = BlobIndex::new(chunks.clone());
        self.store.put_index(digest, index).await?;
        Ok(PutResult {
            digest,
            size: self.size,
            chunks,
        })
    }
}
