//! [`ChunkingWriter`]: content-defined chunking, hashing (chunk digests, blob
//! digest and outboard) and storing as data arrives.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use fastcdc::v2020::FastCDC;
use tokio::task::JoinSet;

use super::{BlobIndex, ChunkStore};
use crate::blobservice::{BlobWriter, ChunkMeta, PutResult};
use crate::digest::B3Digest;
use crate::error::Result;
use crate::verify::{OutboardHasher, STORED_SHIFT};

/// Average chunk size: snix's default, so both cut identical chunks.
pub const AVG_CHUNK_SIZE: u32 = 256 * 1024;
/// Minimum chunk size (average / 2).
pub const MIN_CHUNK_SIZE: u32 = AVG_CHUNK_SIZE / 2;
/// Maximum chunk size (average * 2).
pub const MAX_CHUNK_SIZE: u32 = AVG_CHUNK_SIZE * 2;

/// FastCDC v2020 parameters: minimum = average / 2, maximum = average * 2,
/// as snix derives them from its `avg_chunk_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunking {
    /// Average chunk size in bytes.
    pub avg: u32,
}

impl Default for Chunking {
    fn default() -> Self {
        Chunking {
            avg: AVG_CHUNK_SIZE,
        }
    }
}

impl Chunking {
    /// Smallest average FastCDC v2020 accepts with these ratios.
    pub const MIN_AVG: u32 = 2 * fastcdc::v2020::MINIMUM_MIN;
    /// Largest average FastCDC v2020 accepts with these ratios.
    pub const MAX_AVG: u32 = fastcdc::v2020::MAXIMUM_MAX / 2;

    /// Parameters for average chunk size `avg`, if FastCDC accepts it.
    pub fn with_avg(avg: u32) -> Option<Self> {
        (Self::MIN_AVG..=Self::MAX_AVG)
            .contains(&avg)
            .then_some(Chunking { avg })
    }

    /// Minimum chunk size.
    pub fn min(&self) -> u32 {
        self.avg / 2
    }

    /// Maximum chunk size.
    pub fn max(&self) -> u32 {
        self.avg * 2
    }
}

/// Writes a blob into a [`ChunkStore`].
///
/// Incoming bytes collect in a buffer; whenever it holds at least a maximum
/// chunk, the next FastCDC cut point is found. A cut only depends on the bytes
/// from the chunk start up to the maximum chunk size, so this yields exactly
/// the chunks a streaming FastCDC v2020 chunker (snix's) produces, while
/// memory stays at about one maximum chunk plus one write, plus the chunks
/// being uploaded ([`ChunkStore::write_concurrency`] at most).
pub struct ChunkingWriter<S> {
    store: Arc<S>,
    chunking: Chunking,
    buf: BytesMut,
    /// The blob's digest and outboard, computed in the same pass.
    blob_hasher: OutboardHasher,
    chunks: Vec<ChunkMeta>,
    size: u64,
    /// Chunk uploads in flight. Tasks, so they progress while the writer
    /// waits for more input; aborted if the writer is dropped.
    uploads: JoinSet<Result<()>>,
}

impl<S: ChunkStore> ChunkingWriter<S> {
    /// Starts a blob in `store`.
    pub fn new(store: Arc<S>) -> Self {
        let chunking = store.chunking();
        ChunkingWriter {
            store,
            chunking,
            buf: BytesMut::with_capacity(2 * chunking.max() as usize),
            blob_hasher: OutboardHasher::new(STORED_SHIFT),
            chunks: Vec::new(),
            size: 0,
            uploads: JoinSet::new(),
        }
    }

    /// Cuts the next chunk off the front of the buffer and stores it.
    async fn emit_one(&mut self) -> Result<()> {
        let c = self.chunking;
        let cdc = FastCDC::new(&self.buf, c.min(), c.avg, c.max());
        let (_, end) = cdc.cut(0, self.buf.len());
        let chunk = self.buf.split_to(end).freeze();
        self.store_chunk(chunk).await
    }

    /// Starts storing `chunk` (unless the store has it), after waiting for
    /// room in the upload window.
    async fn store_chunk(&mut self, chunk: Bytes) -> Result<()> {
        let digest = B3Digest::of(&chunk);
        self.chunks.push(ChunkMeta {
            digest,
            size: chunk.len() as u64,
        });
        while self.uploads.len() >= self.store.write_concurrency().max(1) {
            self.join_one().await?;
        }
        let store = self.store.clone();
        self.uploads.spawn(async move {
            if !store.has_chunk(&digest).await? {
                store.put_chunk(digest, chunk).await?;
            }
            Ok(())
        });
        Ok(())
    }

    /// Waits for one upload to finish and returns its error, if any.
    async fn join_one(&mut self) -> Result<()> {
        match self.uploads.join_next().await {
            Some(Ok(result)) => result,
            Some(Err(join)) => {
                Err(std::io::Error::other(format!("chunk upload task: {join}")).into())
            }
            None => Ok(()),
        }
    }
}

#[async_trait]
impl<S: ChunkStore> BlobWriter for ChunkingWriter<S> {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        self.blob_hasher.update(&data);
        self.size += data.len() as u64;
        self.buf.extend_from_slice(&data);
        while self.buf.len() >= self.chunking.max() as usize {
            self.emit_one().await?;
        }
        Ok(())
    }

    async fn close(mut self: Box<Self>) -> Result<PutResult> {
        while !self.buf.is_empty() {
            self.emit_one().await?;
        }
        while !self.uploads.is_empty() {
            self.join_one().await?;
        }
        let hasher = std::mem::replace(&mut self.blob_hasher, OutboardHasher::new(STORED_SHIFT));
        let (digest, outboard) = hasher.finalize();
        let chunks = std::mem::take(&mut self.chunks);
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
