//! `memory`: a byte-bounded in-memory cache of chunks and blob indexes.
//!
//! ```toml
//! [blobservices.mem]
//! type = "memory"
//! max_size = "512MiB"   # optional, default 512 MiB
//! ```
//!
//! Entries are evicted least-recently-used first once their total weight
//! exceeds `max_size`. Plain LRU rather than moka's default TinyLFU: TinyLFU
//! may refuse to admit a new entry while the cache is full of older ones,
//! and a blob that was just put must be readable right away.
//!
//! A blob larger than `max_size` cannot be held whole: its first chunks are
//! evicted while the last ones are written, and it reads as absent.
//!
//! Reads do not hash chunks again: every chunk was hashed under its digest
//! on its way in and never leaves the process
//! ([`ChunkStore::keeps_verified_chunks`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use serde::Deserialize;

use crate::blobservice::{BlobService, ChunkMeta};
use crate::chunkstore::{BlobIndex, ChunkStore, ChunkedBlobService, ObjectKey, SplitChunk};
use crate::composition::{BuildContext, ByteSize, TierConfig};
use crate::digest::B3Digest;
use crate::error::Result;
use crate::metrics::TierMetrics;

/// Default `max_size` of a memory tier.
pub const DEFAULT_MAX_SIZE: u64 = 512 * 1024 * 1024;

/// Configuration of a `memory` tier.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Upper bound on the bytes held (chunk bytes plus index overhead).
    #[serde(default = "default_max_size")]
    pub max_size: ByteSize,
}

fn default_max_size() -> ByteSize {
    ByteSize(DEFAULT_MAX_SIZE)
}

/// `memory://`: an anonymous memory tier of the default size.
pub fn from_url(url: &str) -> Result<Box<dyn TierConfig>, String> {
    match url {
        "memory://" | "memory:///" => Ok(Box::new(MemoryConfig {
            max_size: default_max_size(),
        })),
        _ => Err("a memory URL takes no path or options: use `memory://`".into()),
    }
}

#[async_trait]
impl TierConfig for MemoryConfig {
    fn describe(&self) -> String {
        format!("memory (max_size = {})", self.max_size)
    }

    fn fills_by_default(&self) -> bool {
        true
    }

    fn capacity(&self) -> Option<u64> {
        Some(self.max_size.0)
    }

    async fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn BlobService>> {
        Ok(Arc::new(ChunkedBlobService::new(
            MemoryStore::with_metrics(self.max_size.0, ctx.tier_metrics()),
        )))
    }
}

#[derive(Clone)]
enum Entry {
    Chunk(Bytes),
    Index(Arc<StoredIndex>),
}

/// A blob's index, with what the last look at its chunks found.
struct StoredIndex {
    index: BlobIndex,
    /// The value of [`MemoryStore`]'s `chunk_losses` read before the latest
    /// check that found every chunk of `index` present; 0 if none did.
    complete_as_of: AtomicU64,
}

impl Entry {
    /// Approximate bytes of memory the entry pins.
    fn weight(&self) -> u32 {
        const OVERHEAD: usize = 64;
        let bytes = match self {
            Entry::Chunk(data) => data.len(),
            Entry::Index(stored) => {
                stored.index.chunks.len() * size_of::<ChunkMeta>()
                    + stored
                        .index
                        .bao
                        .as_ref()
                        .map_or(0, |(_, outboard)| outboard.len())
            }
        };
        u32::try_from(bytes + OVERHEAD).unwrap_or(u32::MAX)
    }
}

/// The [`ChunkStore`] behind a `memory` tier.
pub struct MemoryStore {
    cache: moka::sync::Cache<ObjectKey, Entry>,
    /// Chunks that left the cache, counted from 1: a blob found complete
    /// when this was `n` is still complete while it is `n`, which answers
    /// the Stat of a large blob without a lookup per chunk (thousands for a
    /// GiB).
    chunk_losses: Arc<AtomicU64>,
    metrics: TierMetrics,
}

impl MemoryStore {
    /// An empty store holding at most about `max_size` bytes.
    pub fn new(max_size: u64) -> Self {
        MemoryStore::with_metrics(max_size, TierMetrics::detached("memory"))
    }

    /// Like [`MemoryStore::new`], counting evictions and occupancy in
    /// `metrics`.
    pub fn with_metrics(max_size: u64, metrics: TierMetrics) -> Self {
        let gone = metrics.clone();
        let chunk_losses = Arc::new(AtomicU64::new(1));
        let lost = chunk_losses.clone();
        MemoryStore {
            cache: moka::sync::Cache::builder()
                .max_capacity(max_size)
                .weigher(|_, entry: &Entry| entry.weight())
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                // Called for every way out: evicted, replaced or removed.
                .eviction_listener(move |_, entry: Entry, cause| {
                    if matches!(entry, Entry::Chunk(_)) {
                        lost.fetch_add(1, Ordering::SeqCst);
                    }
                    gone.occupancy_bytes.dec_by(entry.weight().into());
                    if cause.was_evicted() {
                        gone.evictions.inc();
                    }
                })
                .build(),
            chunk_losses,
            metrics,
        }
    }

    fn insert(&self, key: ObjectKey, entry: Entry) {
        self.metrics.occupancy_bytes.inc_by(entry.weight().into());
        self.cache.insert(key, entry);
    }

    /// Bytes currently accounted for (after pending evictions run).
    pub fn weighted_size(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.weighted_size()
    }
}

#[async_trait]
impl ChunkStore for MemoryStore {
    async fn get_chunk(&self, digest: &B3Digest) -> Result<Option<Bytes>> {
        Ok(match self.cache.get(&ObjectKey::Chunk(*digest)) {
            Some(Entry::Chunk(data)) => Some(data),
            _ => None,
        })
    }

    async fn chunk_size(&self, digest: &B3Digest) -> Result<Option<u64>> {
        Ok(match self.cache.get(&ObjectKey::Chunk(*digest)) {
            Some(Entry::Chunk(data)) => Some(data.len() as u64),
            _ => None,
        })
    }

    async fn has_chunk(&self, digest: &B3Digest) -> Result<bool> {
        Ok(self.cache.contains_key(&ObjectKey::Chunk(*digest)))
    }

    fn holds_chunks(&self, chunks: &[ChunkMeta]) -> Vec<bool> {
        chunks
            .iter()
            .map(|c| self.cache.contains_key(&ObjectKey::Chunk(c.digest)))
            .collect()
    }

    async fn put_chunk(&self, digest: B3Digest, data: Bytes) -> Result<()> {
        // Copy into an allocation of its own: `data` may be a slice of a
        // larger buffer, which would otherwise stay pinned uncounted.
        let data = Bytes::copy_from_slice(&data);
        self.insert(ObjectKey::Chunk(digest), Entry::Chunk(data));
        Ok(())
    }

    /// Copies the pieces straight into the chunk's own allocation: the
    /// default would join a chunk that straddles frames, and
    /// [`put_chunk`](ChunkStore::put_chunk) would copy the join again.
    async fn put_chunk_hashing(&self, chunk: SplitChunk) -> Result<B3Digest> {
        let digest = chunk.digest();
        let key = ObjectKey::Chunk(digest);
        if !self.cache.contains_key(&key) {
            self.insert(key, Entry::Chunk(chunk.copied()));
        }
        Ok(digest)
    }

    async fn get_index(&self, digest: &B3Digest) -> Result<Option<BlobIndex>> {
        Ok(match self.cache.get(&ObjectKey::Index(*digest)) {
            Some(Entry::Index(stored)) => Some(stored.index.clone()),
            _ => None,
        })
    }

    /// The chunk list alone: the outboard is not even reference-counted.
    async fn get_index_meta(&self, digest: &B3Digest) -> Result<Option<BlobIndex>> {
        Ok(match self.cache.get(&ObjectKey::Index(*digest)) {
            Some(Entry::Index(stored)) => Some(BlobIndex {
                size: stored.index.size,
                chunks: stored.index.chunks.clone(),
                bao: None,
            }),
            _ => None,
        })
    }

    /// Answered without a lookup per chunk when the stored index of
    /// `digest` lists `chunks`, was found complete, and no chunk has left
    /// since; else one lookup per chunk, without a future each.
    async fn has_chunks(&self, digest: &B3Digest, chunks: &[ChunkMeta]) -> Result<bool> {
        // Read before the lookups: a chunk that leaves during them moves
        // the count past what a complete result is recorded with.
        let losses = self.chunk_losses.load(Ordering::SeqCst);
        let stored = match self.cache.get(&ObjectKey::Index(*digest)) {
            Some(Entry::Index(stored)) if stored.index.chunks == chunks => Some(stored),
            _ => None,
        };
        if let Some(stored) = &stored
            && stored.complete_as_of.load(Ordering::SeqCst) == losses
        {
            return Ok(true);
        }
        let complete = chunks
            .iter()
            .all(|c| self.cache.contains_key(&ObjectKey::Chunk(c.digest)));
        if complete && let Some(stored) = stored {
            stored.complete_as_of.fetch_max(losses, Ordering::SeqCst);
        }
        Ok(complete)
    }

    async fn put_index(&self, digest: B3Digest, index: BlobIndex) -> Result<()> {
        let stored = StoredIndex {
            index,
            complete_as_of: AtomicU64::new(0),
        };
        self.insert(ObjectKey::Index(digest), Entry::Index(Arc::new(stored)));
        Ok(())
    }

    fn evicts(&self) -> bool {
        true
    }

    /// A chunk is the `Bytes` `put_chunk` was given (copied once, then
    /// immutable), so a read hands out exactly what was hashed.
    fn keeps_verified_chunks(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::pseudo_random as data;

    async fn put(svc: &ChunkedBlobService<MemoryStore>, blob: &[u8]) -> B3Digest {
        let mut w = svc.open_write().await.unwrap();
        w.write(Bytes::copy_from_slice(blob)).await.unwrap();
        w.close().await.unwrap().digest
    }

    #[tokio::test]
    async fn a_chunk_put_in_pieces_is_kept_whole_in_a_buffer_of_its_own() {
        let store = MemoryStore::new(16 << 20);
        let frame = Bytes::from(data(1 << 20, 3));
        let within_frame = |b: &Bytes| {
            let start = frame.as_ptr() as usize;
            (start..start + frame.len()).contains(&(b.as_ptr() as usize))
        };
        // A chunk that straddles frames, and one cut from a single frame.
        let tail = Bytes::from(data(4096, 4));
        let chunks = [
            SplitChunk::new([frame.slice(900_000..), frame.slice(..1000), tail]),
            SplitChunk::from(frame.slice(1000..300_000)),
        ];
        for chunk in chunks {
            let whole = chunk.clone().join();
            let digest = store.put_chunk_hashing(chunk).await.unwrap();
            assert_eq!(digest, B3Digest::of(&whole));
            let kept = store.get_chunk(&digest).await.unwrap().expect("stored");
            assert_eq!(kept, whole);
            assert!(!within_frame(&kept), "the chunk pins the frame it came in");
        }
        // Stored once: the chunk is counted once, and putting it again
        // keeps the first copy.
        let again = SplitChunk::from(frame.slice(1000..300_000));
        let digest = again.digest();
        let before = store.get_chunk(&digest).await.unwrap().expect("stored");
        store.put_chunk_hashing(again).await.unwrap();
        let after = store.get_chunk(&digest).await.unwrap().expect("stored");
        assert_eq!(before.as_ptr(), after.as_ptr());
    }

    #[tokio::test]
    async fn a_blob_found_complete_is_absent_once_a_chunk_is_removed() {
        let svc = ChunkedBlobService::new(MemoryStore::new(64 << 20));
        let digest = put(&svc, &data(3 << 20, 1)).await;
        let stat = svc.stat(&digest).await.unwrap().expect("stored");
        assert!(stat.chunks.len() > 2);
        // Twice: the second answer comes from the recorded check.
        assert!(svc.stat(&digest).await.unwrap().is_some());
        svc.store()
            .cache
            .invalidate(&ObjectKey::Chunk(stat.chunks[1].digest));
        assert!(svc.stat(&digest).await.unwrap().is_none());
        assert!(svc.open_read(&digest).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_blob_found_complete_is_absent_once_a_chunk_is_evicted() {
        let svc = ChunkedBlobService::new(MemoryStore::new(3 << 20));
        let digest = put(&svc, &data(2 << 20, 7)).await;
        let chunks = svc.stat(&digest).await.unwrap().expect("stored").chunks;
        // The Stat used the index after its chunks: the oldest chunks go
        // first when the next blob needs room, the index stays.
        put(&svc, &data(3 << 19, 5)).await;
        let store = svc.store();
        assert!(store.weighted_size() <= 3 << 20);
        assert!(store.get_index_meta(&digest).await.unwrap().is_some());
        assert!(!store.holds_chunks(&chunks).iter().all(|&held| held));
        assert!(!store.has_chunks(&digest, &chunks).await.unwrap());
        assert!(svc.stat(&digest).await.unwrap().is_none());
    }
}
