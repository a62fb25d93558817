//! [`ChunkingWriter`]: content-defined chunking, hashing (chunk digests, blob
//! digest and outboard) and storing as data arrives.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Buf, Bytes, BytesMut};

use super::cdc::{Chunking, Cutter};
use super::uploads::Uploads;
use super::{BlobIndex, ChunkStore, SplitChunk};
use crate::blobservice::{BlobWriter, ChunkMeta, PutResult};
use crate::error::Result;
use crate::verify::{PipelinedHasher, STORED_SHIFT};

/// Writes a blob into a [`ChunkStore`].
///
/// A chunk cut only depends on the bytes from the chunk start up to the
/// maximum chunk size, so cutting wherever a maximum chunk's worth of bytes
/// is at hand yields exactly the chunks a streaming FastCDC v2020 chunker
/// (snix's) produces. Chunks are cut straight out of the incoming pieces
/// without a copy: one that lies inside a piece as a slice of it, one that
/// straddles two as a slice of each ([`SplitChunk`]). Only pieces too small
/// to end a chunk (fewer bytes than a maximum chunk, with the carried
/// ones) are gathered into a buffer of their own.
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
    /// The start of the chunk being assembled across pieces.
    carry: Carry,
    /// The blob's digest and outboard.
    blob_hasher: PipelinedHasher,
    /// The chunks cut so far, in order; `None` until its upload task has
    /// hashed it.
    chunks: Vec<Option<ChunkMeta>>,
    size: u64,
    /// Chunk uploads in flight; each reports its index in `chunks`.
    uploads: Uploads<S>,
}

/// The bytes of a chunk that began in an earlier piece than the one being
/// cut: fewer than a maximum chunk.
#[derive(Default)]
enum Carry {
    /// None: the next chunk starts at the start of the next piece.
    #[default]
    Empty,
    /// The end of the last piece, as it arrived.
    Piece(Bytes),
    /// Copied out of pieces too small to end a chunk.
    Gathered(BytesMut),
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
            carry: Carry::Empty,
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
    async fn store_chunk(&mut self, chunk: SplitChunk) -> Result<()> {
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
            match std::mem::take(&mut self.carry) {
                Carry::Empty => {
                    // Chunks that lie inside this piece: cut without copying.
                    while data.len() >= max {
                        let end = self.cut(&data[..max]);
                        let chunk = data.split_to(end);
                        self.store_chunk(chunk.into()).await?;
                    }
                    if !data.is_empty() {
                        self.carry = Carry::Piece(data);
                    }
                    return Ok(());
                }
                Carry::Piece(mut head) => {
                    let carried = head.len();
                    if carried + data.len() < max {
                        // Pieces too small to end a chunk: gathered, each
                        // copied once, with room for the whole chunk (growing
                        // the buffer later would copy it again).
                        let mut gathered = BytesMut::with_capacity(max);
                        gathered.extend_from_slice(&head);
                        gathered.extend_from_slice(&data);
                        self.carry = Carry::Gathered(gathered);
                        return Ok(());
                    }
                    // A chunk starts in the carried piece and ends in it or
                    // in this one: cut across both, and keep both as they
                    // are.
                    let end = self.cutter.cut_split(&head, &data[..max - carried]);
                    let chunk = if end > carried {
                        SplitChunk::new(head, data.split_to(end - carried))
                    } else {
                        let chunk = head.split_to(end);
                        if !head.is_empty() {
                            self.carry = Carry::Piece(head);
                        }
                        chunk.into()
                    };
                    self.store_chunk(chunk).await?;
                }
                Carry::Gathered(mut gathered) => {
                    let carried = gathered.len();
                    if carried + data.len() < max {
                        gathered.extend_from_slice(&data);
                        self.carry = Carry::Gathered(gathered);
                        return Ok(());
                    }
                    // A chunk starts in the gathered bytes: cut it across
                    // them and this piece, then copy only the part of the
                    // piece it takes.
                    let end = self.cutter.cut_split(&gathered, &data[..max - carried]);
                    if end > carried {
                        gathered.extend_from_slice(&data[..end - carried]);
                        data.advance(end - carried);
                    }
                    let chunk = gathered.split_to(end).freeze();
                    if !gathered.is_empty() {
                        self.carry = Carry::Gathered(gathered);
                    }
                    self.store_chunk(chunk.into()).await?;
                }
            }
        }
    }

    async fn close(mut self: Box<Self>) -> Result<PutResult> {
        let mut rest = match std::mem::take(&mut self.carry) {
            Carry::Empty => Bytes::new(),
            Carry::Piece(piece) => piece,
            Carry::Gathered(gathered) => gathered.freeze(),
        };
        while !rest.is_empty() {
            let end = self.cut(&rest);
            let chunk = rest.split_to(end);
            self.store_chunk(chunk.into()).await?;
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
