//! Chunk stores: the storage model shared by every local tier kind.
//!
//! A [`ChunkStore`] keeps two kinds of objects, both named by BLAKE3 digest:
//! chunks (pieces of at most [`MAX_CHUNK_SIZE`] bytes, cut by FastCDC) and
//! blob indexes (the ordered chunk list of a blob that has two or more
//! chunks). A blob of a single chunk is just that chunk, and the empty blob is
//! never stored. This is the layout snix's objectstore blob service uses, so
//! the same model serves memory, disk and object storage alike.
//!
//! [`ChunkedBlobService`] turns any chunk store into a [`BlobService`]: it
//! chunks and hashes on write (`writer.rs`) and reads through a seekable,
//! read-ahead reader that verifies every chunk (`reader.rs`). The backends
//! only move bytes.

mod cdc;
mod fill;
mod index;
mod reader;
mod split;
mod streamed;
mod uploads;
mod writer;

pub use cdc::{AVG_CHUNK_SIZE, Chunking, Cutter, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
pub use fill::ListedWriter;
pub use index::BlobIndex;
pub use reader::{ChunkSource, ChunkedReader, ServiceChunks, StoreChunks};
pub use split::SplitChunk;
pub use streamed::{OpenStream, StreamedReader};
pub use writer::ChunkingWriter;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tracing::instrument;

use crate::blobservice::{
    BlobReader, BlobService, BlobStat, BlobWriter, BufferedReader, ChunkMeta, Pieces,
};
use crate::digest::B3Digest;
use crate::error::{Error, Result};
use crate::verify::{
    BlobCheck, Outboard, check_kept_chunk, spool_verified_shared, verify_chunk, verify_chunk_meta,
};

/// Names an object in a chunk store: a chunk or a blob index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKey {
    /// The chunk with this digest.
    Chunk(B3Digest),
    /// The index of the blob with this digest.
    Index(B3Digest),
    /// The outboard of the blob with this digest, for stores that keep it
    /// apart from the index.
    Outboard(B3Digest),
}

/// A backend that stores chunks and blob indexes. Implementations only move
/// bytes; chunking, hashing and verification live in [`ChunkedBlobService`].
#[async_trait]
pub trait ChunkStore: Send + Sync + 'static {
    /// The chunk's bytes, or `None` if absent. The bytes are not trusted:
    /// callers verify them against `digest`.
    async fn get_chunk(&self, digest: &B3Digest) -> Result<Option<Bytes>>;

    /// The chunk `meta`, checked against its digest and length, or `None`
    /// if absent; a chunk that fails the check is a verification error.
    ///
    /// The default fetches with [`ChunkStore::get_chunk`] and checks on the
    /// caller's task (only the length, for a store that
    /// [keeps verified chunks](ChunkStore::keeps_verified_chunks)). A store
    /// whose reads block anyway checks on the same blocking thread, so that
    /// hashing runs beside the task streaming the chunks out rather than on
    /// it.
    async fn get_chunk_verified(&self, meta: &ChunkMeta) -> Result<Option<Bytes>> {
        let Some(data) = self.get_chunk(&meta.digest).await? else {
            return Ok(None);
        };
        if self.keeps_verified_chunks() {
            check_kept_chunk(meta, &data)?;
        } else {
            verify_chunk_meta(meta, &data)?;
        }
        Ok(Some(data))
    }

    /// Whether [`ChunkStore::get_chunk`] hands out the bytes that were given
    /// to [`ChunkStore::put_chunk`], kept immutable in this process's memory
    /// (as given, or as a copy made then). Every `put_chunk` caller hashed
    /// those bytes under their digest (a Put's writer computes it, a fill
    /// checked it), so reading them back crosses no trust boundary and they
    /// are not hashed again.
    /// Anything kept on a disk or another machine can change under the
    /// store and answers `false` (the default).
    fn keeps_verified_chunks(&self) -> bool {
        false
    }

    /// The chunk's length, or `None` if absent.
    async fn chunk_size(&self, digest: &B3Digest) -> Result<Option<u64>>;

    /// Whether the chunk is present.
    async fn has_chunk(&self, digest: &B3Digest) -> Result<bool> {
        Ok(self.chunk_size(digest).await?.is_some())
    }

    /// Which of `chunks` the store holds, answered from an index kept in
    /// memory; a store without one answers `false` for each (the default)
    /// rather than asking its backend chunk by chunk.
    fn holds_chunks(&self, chunks: &[ChunkMeta]) -> Vec<bool> {
        vec![false; chunks.len()]
    }

    /// Stores a chunk whose digest the caller has computed.
    async fn put_chunk(&self, digest: B3Digest, data: Bytes) -> Result<()>;

    /// Stores a chunk under the digest this computes, unless the store has
    /// it already, and returns the digest. The chunk comes as the pieces
    /// a Put cut it from ([`SplitChunk`]).
    ///
    /// The default hashes on the caller's task, and joins the pieces for
    /// [`ChunkStore::put_chunk`]. A store may hash where it writes
    /// instead, and take the pieces as they are: the `disk` tier copies
    /// them into its write buffer, so a chunk that straddles frames costs
    /// it no extra copy.
    async fn put_chunk_hashing(&self, chunk: SplitChunk) -> Result<B3Digest> {
        let digest = chunk.digest();
        if !self.has_chunk(&digest).await? {
            self.put_chunk(digest, chunk.join()).await?;
        }
        Ok(digest)
    }

    /// The index of a multi-chunk blob, or `None` if there is none.
    async fn get_index(&self, digest: &B3Digest) -> Result<Option<BlobIndex>>;

    /// The index of a multi-chunk blob without its outboard (`bao` is
    /// `None`): what Stat, and a read of an index this store vouches for,
    /// need. Stores that keep the outboard apart override this so that it
    /// is left unread.
    async fn get_index_meta(&self, digest: &B3Digest) -> Result<Option<BlobIndex>> {
        Ok(self
            .get_index(digest)
            .await?
            .map(|index| BlobIndex { bao: None, ..index }))
    }

    /// Whether every chunk of `chunks`, the chunk list of blob `digest`, is
    /// present. Asked only of stores that evict. The default asks
    /// [`ChunkStore::has_chunk`] chunk by chunk; a store may answer from a
    /// cheaper lookup, or from an earlier answer it knows still holds.
    async fn has_chunks(&self, _digest: &B3Digest, chunks: &[ChunkMeta]) -> Result<bool> {
        for chunk in chunks {
            if !self.has_chunk(&chunk.digest).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Stores the index of a multi-chunk blob. Called only after all of its
    /// chunks are stored, so a visible index means a complete blob.
    async fn put_index(&self, digest: B3Digest, index: BlobIndex) -> Result<()>;

    /// Whether chunks can disappear behind an index (caches that evict).
    /// If so, [`ChunkedBlobService`] checks that every chunk of an index is
    /// still present before it calls a blob present.
    fn evicts(&self) -> bool;

    /// Called when a chunk read from this store failed verification, so an
    /// evicting store can drop the bad copy and later reads miss instead of
    /// failing again. Stores shared with others leave their data alone.
    async fn discard_chunk(&self, _digest: &B3Digest) -> Result<()> {
        Ok(())
    }

    /// Whether every index in this store was written by strata after it
    /// hashed the whole blob itself. Stores shared with other writers (an
    /// object-storage bucket) answer `false`: their chunk lists are checked
    /// against the blob digest before any byte is released.
    fn trusts_indexes(&self) -> bool {
        true
    }

    /// How many chunks a reader may fetch ahead of the one being read.
    fn read_ahead(&self) -> usize {
        4
    }

    /// How many chunk uploads a writer may have in flight.
    fn write_concurrency(&self) -> usize {
        1
    }

    /// The FastCDC parameters new blobs are cut with.
    fn chunking(&self) -> Chunking {
        Chunking::default()
    }
}

/// A [`BlobService`] over a [`ChunkStore`].
pub struct ChunkedBlobService<S> {
    store: Arc<S>,
}

impl<S: ChunkStore> ChunkedBlobService<S> {
    /// Serves the blobs in `store`.
    pub fn new(store: S) -> Self {
        ChunkedBlobService {
            store: Arc::new(store),
        }
    }

    /// The backend.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The index of `digest`, if it has one and (for evicting stores) all of
    /// its chunks are still there; with its stored outboard only if
    /// `with_outboard`.
    async fn complete_index(
        &self,
        digest: &B3Digest,
        with_outboard: bool,
    ) -> Result<Option<BlobIndex>> {
        let index = if with_outboard {
            self.store.get_index(digest).await?
        } else {
            self.store.get_index_meta(digest).await?
        };
        let Some(index) = index else {
            return Ok(None);
        };
        if self.store.evicts() && !self.store.has_chunks(digest, &index.chunks).await? {
            return Ok(None);
        }
        Ok(Some(index))
    }
}

#[async_trait]
impl<S: ChunkStore> BlobService for ChunkedBlobService<S> {
    #[instrument(skip(self), fields(%digest), err)]
    async fn stat(&self, digest: &B3Digest) -> Result<Option<BlobStat>> {
        if digest.is_empty_blob() {
            return Ok(Some(BlobStat::default()));
        }
        if let Some(index) = self.complete_index(digest, false).await? {
            return Ok(Some(BlobStat {
                size: index.size,
                chunks: index.chunks,
            }));
        }
        Ok(self.store.chunk_size(digest).await?.map(|size| BlobStat {
            size,
            chunks: Vec::new(),
        }))
    }

    /// The outboard kept in the blob's index: trusted as stored when this
    /// store wrote the index itself, else checked against the digest.
    #[instrument(skip(self), fields(%digest), err)]
    async fn outboard(&self, digest: &B3Digest) -> Result<Option<Outboard>> {
        if digest.is_empty_blob() {
            return Ok(None);
        }
        Ok(self
            .complete_index(digest, true)
            .await?
            .and_then(|index| index.outboard(digest, self.store.trusts_indexes())))
    }

    #[instrument(skip(self), fields(%digest), err)]
    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
        if digest.is_empty_blob() {
            return Ok(Some(Box::new(BufferedReader::new(Bytes::new()))));
        }
        // An index this store vouches for is read without its outboard;
        // another one is checked against it.
        let with_outboard = !self.store.trusts_indexes();
        if let Some(index) = self.complete_index(digest, with_outboard).await? {
            return self.read_index(digest, index).await.map(Some);
        }
        let Some(data) = self.store.get_chunk(digest).await? else {
            return Ok(None);
        };
        if self.store.keeps_verified_chunks() {
            return Ok(Some(Box::new(BufferedReader::new(data))));
        }
        if let Err(e) = verify_chunk(digest, &data) {
            // A damaged copy of a whole blob: drop it and report a miss,
            // so another tier (or a new Put) can supply the blob.
            tracing::warn!(%digest, error = %e, "stored blob failed verification");
            self.store.discard_chunk(digest).await?;
            return Ok(None);
        }
        Ok(Some(Box::new(BufferedReader::new(data))))
    }

    /// Checked once, by the store (see [`ChunkStore::get_chunk_verified`]),
    /// rather than by `open_read` and then again by the default. A damaged
    /// copy is dropped and reads as absent, as in `open_read`, so another
    /// tier can supply the chunk.
    #[instrument(skip(self), fields(digest = %chunk.digest), err)]
    async fn read_chunk(&self, chunk: &ChunkMeta) -> Result<Option<Bytes>> {
        match reader::checked_chunk(&*self.store, chunk).await {
            Err(e) if matches!(e.root(), Error::Verification(_)) => Ok(None),
            other => other,
        }
    }

    async fn holds_chunks(&self, chunks: &[ChunkMeta]) -> Result<Vec<bool>> {
        Ok(self.store.holds_chunks(chunks))
    }

    async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
        Ok(Box::new(ChunkingWriter::new(self.store.clone())))
    }

    /// Stores the chunks as listed: see [`ListedWriter`]. A blob of one
    /// chunk's worth is stored as that one chunk (its list, empty or just
    /// itself, is not consulted); a larger blob without a list is chunked
    /// as a Put would.
    async fn open_fill(&self, digest: &B3Digest, stat: &BlobStat) -> Result<Box<dyn BlobWriter>> {
        let chunks = if stat.chunks.len() >= 2 {
            stat.chunks.clone()
        } else if (1..=u64::from(MAX_CHUNK_SIZE)).contains(&stat.size) {
            vec![ChunkMeta {
                digest: *digest,
                size: stat.size,
            }]
        } else {
            return self.open_write().await;
        };
        Ok(Box::new(ListedWriter::new(
            self.store.clone(),
            *digest,
            chunks,
        )))
    }
}

impl<S: ChunkStore> ChunkedBlobService<S> {
    /// A reader over a multi-chunk blob. Each chunk is verified as it is
    /// read; a chunk list this store does not vouch for is also proven to
    /// belong to the digest: group by group against a checked outboard, or,
    /// without one, by verifying the whole blob before releasing any of it
    /// (and then storing the outboard computed on the way, so the next read
    /// streams).
    async fn read_index(&self, digest: &B3Digest, index: BlobIndex) -> Result<Box<dyn BlobReader>> {
        let trusted = self.store.trusts_indexes();
        let outboard = if trusted {
            None
        } else {
            index.outboard(digest, false)
        };
        let reader = ChunkedReader::new(
            *digest,
            index.chunks.clone(),
            Arc::new(StoreChunks(self.store.clone())),
            self.store.read_ahead(),
            outboard.clone(),
        );
        if trusted || outboard.is_some() {
            return Ok(Box::new(reader));
        }
        let pieces = Pieces::new(Box::new(reader), MAX_CHUNK_SIZE as usize)
            .map(|r| r.map_err(Error::from_io));
        let (spool, proof) = spool_verified_shared(
            BlobCheck::new(*digest, Some(index.size), None),
            Some(index.size),
            None,
            pieces,
        )
        .await?;
        let index = BlobIndex::new(index.chunks, proof.outboard());
        if let Err(e) = self.store.put_index(*digest, index).await {
            tracing::warn!(%digest, error = %e, "could not store the computed outboard");
        }
        spool.open().await
    }
}

#[cfg(test)]
mod tests;
