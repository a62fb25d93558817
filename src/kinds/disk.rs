//! `disk`: a byte-bounded cache directory of chunks and blob indexes, the
//! local store a sidecar lives on.
//!
//! ```toml
//! [blobservices.disk]
//! type = "disk"
//! path = "/var/cache/strata"
//! max_size = "50GiB"   # optional, default 10 GiB
//! ```
//!
//! Layout under `path` (see `docs/storage-layout.md`):
//!
//! * `chunks/<2 hex>/<64 hex>`: a chunk, uncompressed (local reads should
//!   cost a `read`, not a decompression);
//! * `blobs/<2 hex>/<64 hex>`: the chunk list of a blob of two or more
//!   chunks, a protobuf `StatBlobResponse` as in object storage;
//! * `<kind>/<2 hex>/.tmp-<pid>-<n>`: a file being written, beside its final
//!   name (leftovers are deleted at start-up). Writing beside the target
//!   spreads new inodes over 512 directories: one shared temporary
//!   directory made ext4's inode allocator a hot spot.
//!
//! Every file is written to a temporary name and renamed into place, so a reader (or a
//! restart after kill -9) sees a whole file or none. Indexes are fsync'd
//! before the rename, so they survive power loss too; chunks are not, since
//! every chunk is verified against its digest on read: a damaged one is
//! deleted and reported as a miss.
//!
//! The in-memory index is a moka cache weighted by file size and bounded by
//! `max_size`; evicting an entry deletes its file, least recently used
//! first. It is rebuilt from the directory at start-up, oldest files first,
//! so recency survives restarts approximately.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Deserialize;
use tracing::{info, instrument, warn};

use crate::blobservice::BlobService;
use crate::chunkstore::{BlobIndex, ChunkStore, ChunkedBlobService, ObjectKey};
use crate::composition::{BuildContext, ByteSize, TierConfig};
use crate::digest::B3Digest;
use crate::error::{Error, Result};
use crate::metrics::TierMetrics;

/// Default `max_size` of a disk tier.
pub const DEFAULT_MAX_SIZE: u64 = 10 * 1024 * 1024 * 1024;

/// Configuration of a `disk` tier.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The cache directory (created if missing).
    pub path: PathBuf,
    /// Upper bound on the bytes of files kept.
    #[serde(default = "default_max_size")]
    pub max_size: ByteSize,
}

fn default_max_size() -> ByteSize {
    ByteSize(DEFAULT_MAX_SIZE)
}

#[async_trait]
impl TierConfig for DiskConfig {
    fn describe(&self) -> String {
        format!(
            "disk (path = {}, max_size = {})",
            self.path.display(),
            self.max_size
        )
    }

    fn persistent(&self, _ctx: &BuildContext) -> bool {
        true
    }

    fn fills_by_default(&self) -> bool {
        true
    }

    fn capacity(&self) -> Option<u64> {
        Some(self.max_size.0)
    }

    async fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn BlobService>> {
        let store =
            DiskStore::open_with_metrics(self.path.clone(), self.max_size.0, ctx.tier_metrics())
                .await?;
        Ok(Arc::new(ChunkedBlobService::new(store)))
    }
}

/// The [`ChunkStore`] behind a `disk` tier.
pub struct DiskStore {
    root: PathBuf,
    index: moka::sync::Cache<ObjectKey, u64>,
    max_size: u64,
    tmp_seq: AtomicU64,
    metrics: TierMetrics,
}

/// Prefix of the names of files being written.
pub const TMP_PREFIX: &str = ".tmp-";

/// Builds the key of a file from the digest in its name.
type MakeKey = fn(B3Digest) -> ObjectKey;

/// The two top-level directories and the kind of object each holds.
const KINDS: [(&str, MakeKey); 2] = [("chunks", ObjectKey::Chunk), ("blobs", ObjectKey::Index)];

fn relative_path(key: &ObjectKey) -> PathBuf {
    let (dir, digest) = match key {
        ObjectKey::Chunk(d) => ("chunks", d),
        ObjectKey::Index(d) => ("blobs", d),
    };
    let hex = digest.to_hex();
    Path::new(dir).join(&hex[..2]).join(hex)
}

impl DiskStore {
    /// Opens (or creates) the cache at `root`, rebuilding its index from the
    /// files there.
    pub async fn open(root: PathBuf, max_size: u64) -> Result<Self> {
        DiskStore::open_with_metrics(root, max_size, TierMetrics::detached("disk")).await
    }

    /// Like [`DiskStore::open`], counting evictions and occupancy in
    /// `metrics`.
    pub async fn open_with_metrics(
        root: PathBuf,
        max_size: u64,
        metrics: TierMetrics,
    ) -> Result<Self> {
        let scan_root = root.clone();
        let found = tokio::task::spawn_blocking(move || prepare_and_scan(&scan_root))
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))?
            .map_err(|e| {
                Error::Io(std::io::Error::new(
                    e.kind(),
                    format!("disk cache {}: {e}", root.display()),
                ))
            })?;

        let listener_root = root.clone();
        let gone = metrics.clone();
        let index = moka::sync::Cache::builder()
            .max_capacity(max_size)
            .weigher(|_, size: &u64| u32::try_from(*size).unwrap_or(u32::MAX))
            // LRU rather than TinyLFU: TinyLFU may refuse to admit a new
            // entry, which would delete a chunk right after it was written.
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .eviction_listener(move |key: Arc<ObjectKey>, size: u64, cause| {
                gone.occupancy_bytes.dec_by(size as i64);
                if cause.was_evicted() {
                    gone.evictions.inc();
                    let path = listener_root.join(relative_path(&key));
                    if let Err(e) = std::fs::remove_file(&path)
                        && e.kind() != std::io::ErrorKind::NotFound
                    {
                        warn!(path = %path.display(), error = %e, "cannot delete evicted file");
                    }
                }
            })
            .build();
        let files = found.len();
        let bytes: u64 = found.iter().map(|(_, size, _)| size).sum();
        for (key, size, _) in found {
            metrics.occupancy_bytes.inc_by(size as i64);
            index.insert(key, size);
        }
        index.run_pending_tasks();
        info!(path = %root.display(), files, bytes, max_size, "disk cache opened");
        Ok(DiskStore {
            root,
            index,
            max_size,
            tmp_seq: AtomicU64::new(0),
            metrics,
        })
    }

    /// Bytes of files the index accounts for.
    pub fn used_bytes(&self) -> u64 {
        self.index.run_pending_tasks();
        self.index.weighted_size()
    }

    /// The configured bound.
    pub fn max_size(&self) -> u64 {
        self.max_size
    }

    fn path(&self, key: &ObjectKey) -> PathBuf {
        self.root.join(relative_path(key))
    }

    /// Writes `data` under `key`: to a temporary name beside its final one,
    /// then renamed into place.
    async fn write(&self, key: ObjectKey, data: Bytes, durable: bool) -> Result<()> {
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let dest = self.path(&key);
        let tmp = dest.with_file_name(format!("{TMP_PREFIX}{}-{seq}", std::process::id()));
        let len = data.len() as u64;
        let index = self.index.clone();
        let occupancy = self.metrics.occupancy_bytes.clone();
        // The blocking task runs to its end even if this future is dropped
        // (a Put abandoned mid-way): it accounts for the file it renamed
        // into place itself, so no file is on disk outside the size bound.
        tokio::task::spawn_blocking(move || {
            let result = (|| {
                use std::io::Write;
                let mut file = std::fs::File::create(&tmp)?;
                file.write_all(&data)?;
                if durable {
                    file.sync_all()?;
                }
                std::fs::rename(&tmp, &dest)
            })();
            match result {
                Ok(()) => {
                    occupancy.inc_by(len as i64);
                    index.insert(key, len);
                    // Evict now, so the directory never holds much more
                    // than max_size.
                    index.run_pending_tasks();
                    Ok(())
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    Err(e)
                }
            }
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))??;
        Ok(())
    }

    /// Reads the file of `key` if the index has it. A file that vanished is
    /// dropped from the index and reported absent.
    async fn read(&self, key: ObjectKey) -> Result<Option<Bytes>> {
        if self.index.get(&key).is_none() {
            return Ok(None);
        }
        match tokio::fs::read(self.path(&key)).await {
            Ok(data) => Ok(Some(data.into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.index.invalidate(&key);
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Drops `key` from the index and deletes its file.
    async fn remove(&self, key: ObjectKey) -> Result<()> {
        self.index.invalidate(&key);
        match tokio::fs::remove_file(self.path(&key)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

/// Creates the directory layout, deletes files left half-written, and lists
/// every stored file as (key, size, mtime), oldest first.
fn prepare_and_scan(root: &Path) -> std::io::Result<Vec<(ObjectKey, u64, SystemTime)>> {
    let mut dirs = Vec::with_capacity(512);
    for (kind, make_key) in KINDS {
        for prefix in 0..=255u8 {
            let dir = root.join(kind).join(format!("{prefix:02x}"));
            std::fs::create_dir_all(&dir)?;
            dirs.push((dir, make_key));
        }
    }
    // Scan the 512 directories on a few threads: start-up time matters for
    // caches of a million files.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
    let per_thread = dirs.len().div_ceil(threads);
    let mut found = std::thread::scope(|scope| {
        let handles: Vec<_> = dirs
            .chunks(per_thread)
            .map(|part| scope.spawn(move || scan_dirs(part)))
            .collect();
        let mut all = Vec::new();
        for h in handles {
            match h.join() {
                Ok(part) => all.extend(part?),
                Err(_) => return Err(std::io::Error::other("disk scan thread panicked")),
            }
        }
        Ok(all)
    })?;
    found.sort_by_key(|(_, _, mtime)| *mtime);
    Ok(found)
}

type ScanDir = (PathBuf, MakeKey);

fn scan_dirs(dirs: &[ScanDir]) -> std::io::Result<Vec<(ObjectKey, u64, SystemTime)>> {
    let mut found = Vec::new();
    for (dir, make_key) in dirs {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(TMP_PREFIX) {
                // Half-written before a crash: never renamed into place.
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            let Ok(digest) = name.parse::<B3Digest>() else {
                continue;
            };
            let meta = entry.metadata()?;
            if !meta.is_file() {
                continue;
            }
            let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            found.push((make_key(digest), meta.len(), mtime));
        }
    }
    Ok(found)
}

#[async_trait]
impl ChunkStore for DiskStore {
    #[instrument(skip(self), fields(%digest), err)]
    async fn get_chunk(&self, digest: &B3Digest) -> Result<Option<Bytes>> {
        self.read(ObjectKey::Chunk(*digest)).await
    }

    async fn chunk_size(&self, digest: &B3Digest) -> Result<Option<u64>> {
        Ok(self.index.get(&ObjectKey::Chunk(*digest)))
    }

    async fn has_chunk(&self, digest: &B3Digest) -> Result<bool> {
        Ok(self.index.contains_key(&ObjectKey::Chunk(*digest)))
    }

    #[instrument(skip(self, data), fields(%digest, len = data.len()), err)]
    async fn put_chunk(&self, digest: B3Digest, data: Bytes) -> Result<()> {
        self.write(ObjectKey::Chunk(digest), data, false).await
    }

    #[instrument(skip(self), fields(%digest), err)]
    async fn get_index(&self, digest: &B3Digest) -> Result<Option<BlobIndex>> {
        let key = ObjectKey::Index(*digest);
        let Some(data) = self.read(key).await? else {
            return Ok(None);
        };
        match BlobIndex::decode(digest, &data) {
            Ok(index) => Ok(Some(index)),
            Err(e) => {
                warn!(%digest, error = %e, "removing a damaged blob index");
                self.remove(key).await?;
                Ok(None)
            }
        }
    }

    #[instrument(skip(self, index), fields(%digest), err)]
    async fn put_index(&self, digest: B3Digest, index: BlobIndex) -> Result<()> {
        self.write(ObjectKey::Index(digest), index.encode(), true)
            .await
    }

    async fn discard_chunk(&self, digest: &B3Digest) -> Result<()> {
        warn!(%digest, "removing a damaged chunk");
        self.remove(ObjectKey::Chunk(*digest)).await
    }

    fn evicts(&self) -> bool {
        true
    }

    fn write_concurrency(&self) -> usize {
        4
    }
}
