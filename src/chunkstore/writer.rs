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
/// straddles several as a slice of each ([`SplitChunk`]), however the
/// frames cut the stream (an HTTP/2 client often sends a 1 MiB message as
/// a frame of 1 MiB and one of a few bytes). Only a chunk that would be
/// more than [`MAX_PIECES`] pieces is gathered into a buffer of its own.
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

/// Most pieces a chunk is kept in: with pieces of 8 KiB and more, a
/// maximum chunk of the default chunking fits. A Put in smaller pieces has
/// them gathered into one buffer instead, so that a stream of tiny frames
/// cannot make a list of millions.
const MAX_PIECES: usize = 64;

/// The bytes of a chunk that began in an earlier piece than the one being
/// cut: fewer than a maximum chunk.
enum Carry {
    /// Slices of the pieces as they arrived, at most [`MAX_PIECES`] of
    /// them; none if the next chunk starts with the next piece.
    Pieces(Vec<Bytes>),
    /// Copied out of more pieces than that.
    Gathered(BytesMut),
}

impl Default for Carry {
    fn default() -> Self {
        Carry::Pieces(Vec::new())
    }
}

/// Takes the first `len` bytes of `pieces` (which hold more), as pieces.
fn take_front(pieces: &mut Vec<Bytes>, mut len: usize) -> Vec<Bytes> {
    let mut front = Vec::new();
    while len > 0 {
        let piece = &mut pieces[0];
        if piece.len() > len {
            front.push(piece.split_to(len));
            break;
        }
        len -= piece.len();
        front.push(pieces.remove(0));
    }
    front
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
            carry: Carry::default(),
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
        if data.is_empty() {
            return Ok(());
        }
        self.size += data.len() as u64;
        self.blob_hasher.update(data.clone()).await?;
        let max = self.chunking.max() as usize;
        loop {
            match std::mem::take(&mut self.carry) {
                Carry::Pieces(pieces) if pieces.is_empty() => {
                    // Chunks that lie inside this piece: cut without copying.
                    while data.len() >= max {
                        let end = self.cut(&data[..max]);
                        let chunk = data.split_to(end);
                        self.store_chunk(chunk.into()).await?;
                    }
                    if !data.is_empty() {
                        self.carry = Carry::Pieces(vec![data]);
                    }
                    return Ok(());
                }
                Carry::Pieces(mut pieces) => {
                    let carried: usize = pieces.iter().map(Bytes::len).sum();
                    if carried + data.len() < max {
                        // Too little to end a chunk: kept as it came, or,
                        // past the bound, everything is gathered, room
                        // made for the whole chunk at once (growing the
                        // buffer later would copy it again).
                        self.carry = if pieces.len() < MAX_PIECES {
                            pieces.push(data);
                            Carry::Pieces(pieces)
                        } else {
                            let mut gathered = BytesMut::with_capacity(max);
                            for piece in pieces.iter().chain([&data]) {
                                gathered.extend_from_slice(piece);
                            }
                            Carry::Gathered(gathered)
                        };
                        return Ok(());
                    }
                    // A chunk starts in the carried pieces and ends in them
                    // or in this one: cut across them all, and keep each as
                    // it is.
                    let end = {
                        let mut parts: Vec<&[u8]> = pieces.iter().map(|p| &p[..]).collect();
                        parts.push(&data[..max - carried]);
                        self.cutter.cut_pieces(&parts)
                    };
                    let chunk = if end > carried {
                        pieces.push(data.split_to(end - carried));
                        SplitChunk::new(pieces)
                    } else {
                        let chunk = SplitChunk::new(take_front(&mut pieces, end));
                        self.carry = Carry::Pieces(pieces);
                        chunk
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
            Carry::Pieces(pieces) => pieces,
            Carry::Gathered(gathered) => vec![gathered.freeze()],
        };
        while !rest.is_empty() {
            let end = {
                let parts: Vec<&[u8]> = rest.iter().map(|p| &p[..]).collect();
                self.cutter.cut_pieces(&parts)
            };
            let chunk = SplitChunk::new(take_front(&mut rest, end));
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
