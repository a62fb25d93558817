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
//!   chunks, a protobuf `StatBlobResponse` as in object storage but without
//!   `bao` (indexes written by older versions carry it, and still work);
//! * `outboards/<2 hex>/<64 hex>`: that blob's outboard (a format byte, the
//!   shift, the parent pairs), apart from its index so that Stat reads
//!   only the chunk list. Written before the index; an index whose outboard
//!   file was evicted still serves its blob, just without an outboard;
//! * `<kind>/<2 hex>/.tmp-<pid>-<n>`: a file being written, beside its final
//!   name (leftovers are deleted at start-up). Writing beside the target
//!   spreads new inodes over 768 directories: one shared temporary
//!   directory made ext4's inode allocator a hot spot.
//!
//! Every file is written to a temporary name and renamed into place, so a reader (or a
//! restart after kill -9) sees a whole file or none. Indexes and outboards
//! are fsync'd before the rename, so they survive power loss too; chunks
//! are not, since
//! every chunk is verified against its digest on read: a damaged one is
//! deleted and reported as a miss.
//!
//! The in-memory index is a moka cache weighted by file size and bounded by
//! `max_size`; evicting an entry deletes its file, least recently used
//! first. It is rebuilt from the directory at start-up, oldest files first,
//! so recency survives restarts approximately. Reading an index counts as a
//! use of its outboard too, so the two age together.
//!
//! Stat stays cheap for large blobs: decoded chunk lists of recently used
//! indexes are kept in a small cache (dropped with their index file), and
//! the check that every chunk of a list is still present is remembered
//! until a chunk file is next removed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Deserialize;
use tracing::{info, instrument, warn};

use crate::blobservice::{BlobService, ChunkMeta};
use crate::chunkstore::{BlobIndex, ChunkStore, ChunkedBlobService, ObjectKey};
use crate::composition::{BuildContext, ByteSize, TierConfig};
use crate::digest::B3Digest;
use crate::error::{Error, Result};
use crate::metrics::TierMetrics;
use crate::verify::verify_chunk_meta;

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
    /// Decoded chunk lists of recently used blob indexes. An entry is only
    /// a decoding of its file: whether the index exists is always asked of
    /// `index`.
    lists: moka::sync::Cache<B3Digest, Arc<CachedList>>,
    /// How many times a chunk left `index` (evicted, damaged, vanished):
    /// while it is unchanged, a chunk list found complete still is.
    chunk_losses: Arc<AtomicU64>,
}

/// Bytes of decoded chunk lists a disk tier keeps in memory: about 400,000
/// chunks, the lists of some 100 GiB of blobs.
pub const LIST_CACHE_BYTES: u64 = 16 << 20;

/// The decoded index of a blob, without its outboard.
struct CachedList {
    index: BlobIndex,
    /// The file it was decoded from: a hit is used only while the file
    /// there is still this one, so a file replaced or damaged behind the
    /// store's back is read again.
    file: FileId,
    /// The index file holds the outboard itself (written by an older
    /// version).
    inline_outboard: bool,
    /// The value of `chunk_losses` read before the latest check that found
    /// every chunk of `index` present; 0 if none did.
    complete_as_of: AtomicU64,
}

impl CachedList {
    fn new(index: BlobIndex, file: FileId, inline_outboard: bool) -> Self {
        CachedList {
            index,
            file,
            inline_outboard,
            complete_as_of: AtomicU64::new(0),
        }
    }

    fn weight(&self) -> u32 {
        let bytes = self.index.chunks.len() * size_of::<ChunkMeta>() + 64;
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }
}

/// Tells one version of a file from another without reading it: a rename
/// over it changes the inode, a write its length or modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    inode: u64,
    len: u64,
    modified: Option<SystemTime>,
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileId {
            inode: meta.ino(),
            len: meta.len(),
            modified: meta.modified().ok(),
        }
    }
}

/// First byte of an outboard file: the version of its format.
const OUTBOARD_FORMAT: u8 = 1;

/// An outboard file: [`OUTBOARD_FORMAT`], the shift, then the outboard.
fn encode_outboard(shift: u8, data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(2 + data.len());
    out.extend_from_slice(&[OUTBOARD_FORMAT, shift]);
    out.extend_from_slice(data);
    out.into()
}

/// Parses an outboard file into (shift, outboard), without copying. Its
/// shape is checked against the blob later, by [`BlobIndex::outboard`].
fn decode_outboard(blob: &B3Digest, data: Bytes) -> Result<(u8, Bytes)> {
    match data.get(..2) {
        Some(&[OUTBOARD_FORMAT, shift]) => Ok((shift, data.slice(2..))),
        Some(&[format, _]) => Err(Error::Corrupt(format!(
            "outboard file of {blob}: unknown format {format}"
        ))),
        _ => Err(Error::Corrupt(format!(
            "outboard file of {blob}: {} bytes",
            data.len()
        ))),
    }
}

/// Prefix of the names of files being written.
pub const TMP_PREFIX: &str = ".tmp-";

/// Builds the key of a file from the digest in its name.
type MakeKey = fn(B3Digest) -> ObjectKey;

/// The top-level directories and the kind of object each holds.
const KINDS: [(&str, MakeKey); 3] = [
    ("chunks", ObjectKey::Chunk),
    ("blobs", ObjectKey::Index),
    ("outboards", ObjectKey::Outboard),
];

fn relative_path(key: &ObjectKey) -> PathBuf {
    let (dir, digest) = match key {
        ObjectKey::Chunk(d) => ("chunks", d),
        ObjectKey::Index(d) => ("blobs", d),
        ObjectKey::Outboard(d) => ("outboards", d),
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

        let lists = moka::sync::Cache::builder()
            .max_capacity(LIST_CACHE_BYTES)
            .weigher(|_, list: &Arc<CachedList>| list.weight())
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        // Starts at 1: 0 marks a list never found complete.
        let chunk_losses = Arc::new(AtomicU64::new(1));

        let listener_root = root.clone();
        let gone = metrics.clone();
        let lost = chunk_losses.clone();
        let stale = lists.clone();
        let index = moka::sync::Cache::builder()
            .max_capacity(max_size)
            .weigher(|_, size: &u64| u32::try_from(*size).unwrap_or(u32::MAX))
            // LRU rather than TinyLFU: TinyLFU may refuse to admit a new
            // entry, which would delete a chunk right after it was written.
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .eviction_listener(move |key: Arc<ObjectKey>, size: u64, cause| {
                // Called once the entry is out of the map: a presence check
                // that read the count before this increment and still saw
                // the chunk raced with its removal, as any check may.
                if cause != moka::notification::RemovalCause::Replaced {
                    match *key {
                        ObjectKey::Chunk(_) => {
                            lost.fetch_add(1, Ordering::SeqCst);
                        }
                        ObjectKey::Index(digest) => stale.invalidate(&digest),
                        ObjectKey::Outboard(_) => {}
                    }
                }
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
            lists,
            chunk_losses,
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
        self.read_file(key).await
    }

    /// Reads the file of `key`, which the index has. A file that vanished
    /// is dropped from the index and reported absent.
    async fn read_file(&self, key: ObjectKey) -> Result<Option<Bytes>> {
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

impl DiskStore {
    /// The decoded index of `digest` without its outboard: from the cache
    /// of chunk lists, else read from its file. The outboard file is left
    /// unread, but counts as used.
    async fn chunk_list(&self, digest: &B3Digest) -> Result<Option<Arc<CachedList>>> {
        let key = ObjectKey::Index(*digest);
        if self.index.get(&key).is_none() {
            return Ok(None);
        }
        let _ = self.index.get(&ObjectKey::Outboard(*digest));
        let path = self.path(&key);
        let cached = self.lists.get(digest);
        let found = tokio::task::spawn_blocking(move || -> std::io::Result<Found> {
            // A cached list costs a stat(2) to confirm, not a read.
            if let Some(list) = cached
                && FileId::of(&std::fs::metadata(&path)?) == list.file
            {
                return Ok(Found::Cached(list));
            }
            let mut file = std::fs::File::open(&path)?;
            let id = FileId::of(&file.metadata()?);
            let mut data = Vec::with_capacity(usize::try_from(id.len).unwrap_or(0));
            std::io::Read::read_to_end(&mut file, &mut data)?;
            Ok(Found::Read(id, data.into()))
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))?;
        let (file, data) = match found {
            Ok(Found::Cached(list)) => return Ok(Some(list)),
            Ok(Found::Read(file, data)) => (file, data),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.index.invalidate(&key);
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        match BlobIndex::decode_shared(digest, data) {
            Ok(index) => {
                let inline_outboard = index.bao.is_some();
                let list = Arc::new(CachedList::new(
                    BlobIndex { bao: None, ..index },
                    file,
                    inline_outboard,
                ));
                self.lists.insert(*digest, list.clone());
                Ok(Some(list))
            }
            Err(e) => {
                warn!(%digest, error = %e, "removing a damaged blob index");
                self.remove(key).await?;
                Ok(None)
            }
        }
    }

    /// Whether the chunk lists of `digest` are cached (for tests).
    #[cfg(test)]
    fn list_cached(&self, digest: &B3Digest) -> bool {
        self.lists.contains_key(digest)
    }
}

/// What [`DiskStore::chunk_list`] found on disk.
enum Found {
    /// The cached list, still that of the file there.
    Cached(Arc<CachedList>),
    /// The file there, read.
    Read(FileId, Bytes),
}

/// Creates the directory layout, deletes files left half-written, and lists
/// every stored file as (key, size, mtime), oldest first.
fn prepare_and_scan(root: &Path) -> std::io::Result<Vec<(ObjectKey, u64, SystemTime)>> {
    let mut dirs = Vec::with_capacity(KINDS.len() * 256);
    for (kind, make_key) in KINDS {
        for prefix in 0..=255u8 {
            let dir = root.join(kind).join(format!("{prefix:02x}"));
            std::fs::create_dir_all(&dir)?;
            dirs.push((dir, make_key));
        }
    }
    // Scan the 768 directories on a few threads: start-up time matters for
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

    /// Reads and checks the chunk in one blocking task.
    async fn get_chunk_verified(&self, meta: &ChunkMeta) -> Result<Option<Bytes>> {
        let key = ObjectKey::Chunk(meta.digest);
        if self.index.get(&key).is_none() {
            return Ok(None);
        }
        let path = self.path(&key);
        let meta = *meta;
        let read = tokio::task::spawn_blocking(move || match std::fs::read(&path) {
            Ok(data) => {
                let data = Bytes::from(data);
                Ok(Some(verify_chunk_meta(&meta, &data).map(|()| data)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))??;
        match read {
            Some(checked) => Ok(Some(checked?)),
            None => {
                // The file vanished: forget it.
                self.index.invalidate(&key);
                Ok(None)
            }
        }
    }

    async fn chunk_size(&self, digest: &B3Digest) -> Result<Option<u64>> {
        Ok(self.index.get(&ObjectKey::Chunk(*digest)))
    }

    async fn has_chunk(&self, digest: &B3Digest) -> Result<bool> {
        Ok(self.index.contains_key(&ObjectKey::Chunk(*digest)))
    }

    fn holds_chunks(&self, chunks: &[ChunkMeta]) -> Vec<bool> {
        chunks
            .iter()
            .map(|c| self.index.contains_key(&ObjectKey::Chunk(c.digest)))
            .collect()
    }

    #[instrument(skip(self, data), fields(%digest, len = data.len()), err)]
    async fn put_chunk(&self, digest: B3Digest, data: Bytes) -> Result<()> {
        self.write(ObjectKey::Chunk(digest), data, false).await
    }

    /// The chunk list, then the outboard from its own file, or else from
    /// inside an index file written by an older version.
    #[instrument(skip(self), fields(%digest), err)]
    async fn get_index(&self, digest: &B3Digest) -> Result<Option<BlobIndex>> {
        let Some(list) = self.chunk_list(digest).await? else {
            return Ok(None);
        };
        let key = ObjectKey::Outboard(*digest);
        if let Some(data) = self.read(key).await? {
            match decode_outboard(digest, data) {
                Ok(bao) => {
                    return Ok(Some(BlobIndex {
                        bao: Some(bao),
                        ..list.index.clone()
                    }));
                }
                Err(e) => {
                    warn!(%digest, error = %e, "removing a damaged outboard file");
                    self.remove(key).await?;
                }
            }
        }
        if list.inline_outboard
            && let Some(data) = self.read_file(ObjectKey::Index(*digest)).await?
            && let Ok(index) = BlobIndex::decode_shared(digest, data)
        {
            return Ok(Some(index));
        }
        Ok(Some(list.index.clone()))
    }

    #[instrument(skip(self), fields(%digest), err)]
    async fn get_index_meta(&self, digest: &B3Digest) -> Result<Option<BlobIndex>> {
        Ok(self
            .chunk_list(digest)
            .await?
            .map(|list| list.index.clone()))
    }

    /// Answered without a lookup per chunk when the cached list of
    /// `digest` was found complete and no chunk has been removed since.
    async fn has_chunks(&self, digest: &B3Digest, chunks: &[ChunkMeta]) -> Result<bool> {
        let losses = self.chunk_losses.load(Ordering::SeqCst);
        let cached = self
            .lists
            .get(digest)
            .filter(|list| list.index.chunks == chunks);
        if let Some(list) = &cached
            && list.complete_as_of.load(Ordering::SeqCst) == losses
        {
            return Ok(true);
        }
        let complete = chunks
            .iter()
            .all(|c| self.index.contains_key(&ObjectKey::Chunk(c.digest)));
        if let Some(list) = cached {
            if complete {
                list.complete_as_of.fetch_max(losses, Ordering::SeqCst);
            } else {
                // Read again next time, in case the list was superseded.
                self.lists.invalidate(digest);
            }
        }
        Ok(complete)
    }

    /// The outboard goes to a file of its own, written before the index
    /// that makes the blob visible; the index file holds the chunk list.
    #[instrument(skip(self, index), fields(%digest), err)]
    async fn put_index(&self, digest: B3Digest, index: BlobIndex) -> Result<()> {
        let BlobIndex { size, chunks, bao } = index;
        if let Some((shift, outboard)) = bao
            && !outboard.is_empty()
        {
            self.write(
                ObjectKey::Outboard(digest),
                encode_outboard(shift, &outboard),
                true,
            )
            .await?;
        }
        let index = BlobIndex {
            size,
            chunks,
            bao: None,
        };
        // A cached list of the file this replaces is refused by its file
        // id on its next use.
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

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::testkit::pseudo_random;
    use crate::verify::{STORED_SHIFT, bao::outboard_of};

    async fn open(dir: &Path, max_size: u64) -> ChunkedBlobService<DiskStore> {
        ChunkedBlobService::new(DiskStore::open(dir.into(), max_size).await.unwrap())
    }

    async fn put(svc: &ChunkedBlobService<DiskStore>, data: &[u8]) -> B3Digest {
        let mut w = svc.open_write().await.unwrap();
        for piece in data.chunks(1 << 20) {
            w.write(Bytes::copy_from_slice(piece)).await.unwrap();
        }
        w.close().await.unwrap().digest
    }

    async fn read_all(svc: &ChunkedBlobService<DiskStore>, digest: &B3Digest) -> Vec<u8> {
        let mut r = svc.open_read(digest).await.unwrap().unwrap();
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        out
    }

    fn file(dir: &Path, key: ObjectKey) -> PathBuf {
        dir.join(relative_path(&key))
    }

    /// Bytes of the regular files under `dir`.
    fn du(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let meta = e.metadata().unwrap();
                if meta.is_dir() {
                    du(&e.path())
                } else {
                    meta.len()
                }
            })
            .sum()
    }

    #[tokio::test]
    async fn the_outboard_is_stored_apart_from_the_chunk_list() {
        let dir = tempfile::tempdir().unwrap();
        let svc = open(dir.path(), 1 << 30).await;
        let blob = pseudo_random(3 << 20, 1);
        let digest = put(&svc, &blob).await;

        let stored = std::fs::read(file(dir.path(), ObjectKey::Index(digest))).unwrap();
        let index = BlobIndex::decode(&digest, &stored).unwrap();
        assert!(index.chunks.len() > 2);
        assert_eq!(index.bao, None, "the index file holds the outboard");

        let expected = outboard_of(&blob, STORED_SHIFT).1;
        let ob = std::fs::read(file(dir.path(), ObjectKey::Outboard(digest))).unwrap();
        assert_eq!(ob[..2], [OUTBOARD_FORMAT, STORED_SHIFT]);
        assert_eq!(ob[2..], expected.data()[..]);
        assert_eq!(svc.outboard(&digest).await.unwrap(), Some(expected));
        assert_eq!(svc.store().used_bytes(), du(dir.path()));
    }

    #[tokio::test]
    async fn stat_and_read_leave_the_outboard_file_unread() {
        let dir = tempfile::tempdir().unwrap();
        let svc = open(dir.path(), 1 << 30).await;
        let blob = pseudo_random(3 << 20, 2);
        let digest = put(&svc, &blob).await;
        // A file that cannot be read: a directory in its place.
        let ob = file(dir.path(), ObjectKey::Outboard(digest));
        std::fs::remove_file(&ob).unwrap();
        std::fs::create_dir(&ob).unwrap();
        // Not from the cache of chunk lists: from the index file.
        svc.store().lists.invalidate(&digest);

        let stat = svc.stat(&digest).await.unwrap().unwrap();
        assert_eq!(stat.size, blob.len() as u64);
        assert!(read_all(&svc, &digest).await == blob);
        assert!(
            svc.outboard(&digest).await.is_err(),
            "the outboard was read"
        );
    }

    #[tokio::test]
    async fn an_index_without_its_outboard_file_serves_the_blob_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let svc = open(dir.path(), 1 << 30).await;
        let blob = pseudo_random(3 << 20, 3);
        let digest = put(&svc, &blob).await;
        std::fs::remove_file(file(dir.path(), ObjectKey::Outboard(digest))).unwrap();

        assert_eq!(svc.outboard(&digest).await.unwrap(), None);
        assert!(!svc.store().index.contains_key(&ObjectKey::Outboard(digest)));
        assert!(svc.stat(&digest).await.unwrap().is_some());
        assert!(read_all(&svc, &digest).await == blob);

        // A damaged one is ignored and removed.
        let digest = put(&svc, &pseudo_random(3 << 20, 4)).await;
        let ob = file(dir.path(), ObjectKey::Outboard(digest));
        std::fs::write(&ob, b"\x07\x04 not an outboard").unwrap();
        assert_eq!(svc.outboard(&digest).await.unwrap(), None);
        assert!(!ob.exists());
        assert!(svc.stat(&digest).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn an_index_with_the_outboard_inside_still_yields_it() {
        let dir = tempfile::tempdir().unwrap();
        let blob = pseudo_random(3 << 20, 5);
        let (digest, outboard) = outboard_of(&blob, STORED_SHIFT);
        let chunks = {
            let svc = open(dir.path(), 1 << 30).await;
            assert_eq!(put(&svc, &blob).await, digest);
            svc.stat(&digest).await.unwrap().unwrap().chunks
        };
        // As older versions wrote it: one file, outboard inline.
        std::fs::remove_file(file(dir.path(), ObjectKey::Outboard(digest))).unwrap();
        let old = BlobIndex::new(chunks.clone(), Some(&outboard)).encode();
        std::fs::write(file(dir.path(), ObjectKey::Index(digest)), old).unwrap();

        let svc = open(dir.path(), 1 << 30).await;
        let stat = svc.stat(&digest).await.unwrap().unwrap();
        assert_eq!(stat.chunks, chunks);
        assert_eq!(svc.outboard(&digest).await.unwrap(), Some(outboard));
        assert!(read_all(&svc, &digest).await == blob);
    }

    #[tokio::test]
    async fn the_rebuild_finds_outboard_files_and_drops_half_written_ones() {
        let dir = tempfile::tempdir().unwrap();
        let blob = pseudo_random(3 << 20, 6);
        let digest = {
            let svc = open(dir.path(), 1 << 30).await;
            put(&svc, &blob).await
        };
        let torn = dir.path().join("outboards/ab/.tmp-4242-7");
        std::fs::write(&torn, b"half an outboard").unwrap();
        // An outboard without an index: harmless, and evicted in its turn.
        let orphan = pseudo_random(1 << 20, 7);
        let (orphan_digest, orphan_ob) = outboard_of(&orphan, STORED_SHIFT);
        let orphan_file = file(dir.path(), ObjectKey::Outboard(orphan_digest));
        std::fs::write(
            &orphan_file,
            encode_outboard(STORED_SHIFT, orphan_ob.data()),
        )
        .unwrap();

        let svc = open(dir.path(), 1 << 30).await;
        assert!(!torn.exists(), "leftover temporary file kept");
        assert_eq!(svc.store().used_bytes(), du(dir.path()));
        assert!(svc.store().index.contains_key(&ObjectKey::Outboard(digest)));
        assert_eq!(
            svc.outboard(&digest).await.unwrap(),
            Some(outboard_of(&blob, STORED_SHIFT).1)
        );
        assert!(svc.stat(&orphan_digest).await.unwrap().is_none());
        assert_eq!(svc.outboard(&orphan_digest).await.unwrap(), None);

        // Fill the cache with other blobs: the orphan goes first.
        let max = 8 << 20;
        drop(svc);
        let svc = open(dir.path(), max).await;
        for seed in 10..14 {
            put(&svc, &pseudo_random(2 << 20, seed)).await;
        }
        assert!(
            !orphan_file.exists(),
            "an orphan outboard outlived the bound"
        );
        assert!(svc.store().used_bytes() <= max);
    }

    #[tokio::test]
    async fn a_blob_that_lost_a_chunk_is_absent_after_cached_stats() {
        let dir = tempfile::tempdir().unwrap();
        let svc = open(dir.path(), 1 << 30).await;
        let blob = pseudo_random(3 << 20, 8);
        let digest = put(&svc, &blob).await;
        let chunks = svc.stat(&digest).await.unwrap().unwrap().chunks;
        // Found complete once, so answered from memory now.
        assert!(svc.stat(&digest).await.unwrap().is_some());
        assert!(svc.store().list_cached(&digest));

        svc.store().discard_chunk(&chunks[1].digest).await.unwrap();
        assert!(svc.stat(&digest).await.unwrap().is_none());
        assert!(svc.open_read(&digest).await.unwrap().is_none());

        // The same after an eviction for room rather than a removal.
        drop(svc);
        let max = 8 << 20;
        let svc = open(dir.path(), max).await;
        let blob = pseudo_random(3 << 20, 9);
        let digest = put(&svc, &blob).await;
        let first = svc.stat(&digest).await.unwrap().unwrap().chunks[0].digest;
        assert!(svc.stat(&digest).await.unwrap().is_some());
        // Other blobs, with the first's index used after each so that it
        // stays recent: only its chunks age.
        let mut seed = 20;
        while svc.store().index.contains_key(&ObjectKey::Chunk(first)) {
            assert!(seed < 60, "the first chunk is never evicted");
            put(&svc, &pseudo_random(1 << 20, seed)).await;
            seed += 1;
            let _ = svc.store().index.get(&ObjectKey::Index(digest));
        }
        assert!(svc.store().index.contains_key(&ObjectKey::Index(digest)));
        assert!(svc.store().list_cached(&digest));
        assert!(svc.stat(&digest).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_cached_chunk_list_goes_with_its_index() {
        let dir = tempfile::tempdir().unwrap();
        let svc = open(dir.path(), 1 << 30).await;
        let digest = put(&svc, &pseudo_random(3 << 20, 30)).await;
        assert!(svc.stat(&digest).await.unwrap().is_some());
        assert!(svc.store().list_cached(&digest));

        svc.store().remove(ObjectKey::Index(digest)).await.unwrap();
        assert!(!svc.store().list_cached(&digest));
        assert!(svc.stat(&digest).await.unwrap().is_none());
    }
}
