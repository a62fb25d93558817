//! `disk`: a byte-bounded cache directory of chunks and blob indexes, the
//! local store a sidecar lives on.
//!
//! ```toml
//! [blobservices.disk]
//! type = "disk"
//! path = "/var/cache/strata"
//! max_size = "50GiB"   # optional, default 10 GiB
//! direct_io = true      # optional, default true: packs bypass the page cache
//! ```
//!
//! Layout under `path` (see `docs/storage-layout.md`):
//!
//! * `packs/<16 hex>`: chunks, uncompressed (local reads should cost a
//!   `read`, not a decompression), appended one after another to packs of
//!   up to 64 MiB ([`pack`] has the format). A file per chunk would cost
//!   an inode allocated and one freed per 256 KiB filled, which on ext4
//!   costs more CPU than the write itself. Packs are written and read with
//!   direct I/O unless `direct_io = false` (module `direct` says why): the
//!   `memory` tier is the cache of hot chunks, and with `false` the page
//!   cache becomes a second one;
//! * `blobs/<2 hex>/<64 hex>`: the chunk list of a blob of two or more
//!   chunks, a protobuf `StatBlobResponse` as in object storage but without
//!   `bao` (indexes written by older versions carry it, and still work);
//! * `outboards/<2 hex>/<64 hex>`: that blob's outboard (a format byte, the
//!   shift, the parent pairs), apart from its index so that Stat reads
//!   only the chunk list. Written before the index; an index whose outboard
//!   file was evicted still serves its blob, just without an outboard;
//! * `<blobs or outboards>/<2 hex>/.tmp-<pid>-<n>`: a file being written,
//!   beside its final name (leftovers are deleted at start-up). Writing
//!   beside the target spreads new inodes over 512 directories: one shared
//!   temporary directory made ext4's inode allocator a hot spot;
//! * `chunks/<2 hex>/<64 hex>`: a chunk in a file of its own, as older
//!   versions stored them: still read, and evicted in turn, never written.
//! * `lock`: locked while a store has the directory open, so that two
//!   disk tiers never share one.
//!
//! Index and outboard files are written to a temporary name and renamed
//! into place, so a reader (or a restart after kill -9) sees a whole file
//! or none, and fsync'd before the rename, so they survive power loss too.
//! Chunks are appended to the open pack and become visible once written;
//! a restart cuts each pack back to its last whole record. Packs are not
//! fsync'd: every chunk is verified against its digest on read, and a
//! damaged one is forgotten and reported as a miss.
//!
//! The in-memory index is a moka cache of files and sealed packs weighted
//! by size and bounded by `max_size`; evicting an entry deletes its file
//! (a pack with all its chunks), least recently used first. It is rebuilt
//! from the directory at start-up, oldest files first, so recency survives
//! restarts approximately. Reading an index counts as a use of its
//! outboard too, so the two age together; reading a chunk, as a use of
//! its pack.
//!
//! Stat stays cheap for large blobs: decoded chunk lists of recently used
//! indexes are kept in a small cache (dropped with their index file), and
//! the check that every chunk of a list is still present is remembered
//! until a chunk is next lost.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use prometheus_client::metrics::gauge::Gauge;
use serde::Deserialize;
use tracing::{info, instrument, warn};

use crate::blobservice::{BlobService, ChunkMeta};
use crate::chunkstore::{
    BlobIndex, ChunkStore, ChunkedBlobService, MAX_CHUNK_SIZE, ObjectKey, SplitChunk,
};
use crate::composition::{BuildContext, ByteSize, TierConfig};
use crate::digest::B3Digest;
use crate::error::{Error, Result};
use crate::metrics::TierMetrics;
use crate::verify::verify_chunk_meta;

mod direct;
pub mod pack;
mod packs;

pub use direct::{AlignedBuf, io_buffer};

use packs::{Answer, Location, Packs, Sealed, Wrote};

/// Chunks a reader keeps in flight from a disk tier that reads with direct
/// I/O (see [`ChunkStore::read_ahead`] on [`DiskStore`]).
pub const DIRECT_READ_AHEAD: usize = 16;

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
    /// Whether packs bypass the page cache (module `direct` says why).
    #[serde(default = "default_direct_io")]
    pub direct_io: bool,
}

fn default_direct_io() -> bool {
    true
}

fn default_max_size() -> ByteSize {
    ByteSize(DEFAULT_MAX_SIZE)
}

#[async_trait]
impl TierConfig for DiskConfig {
    fn describe(&self) -> String {
        format!(
            "disk (path = {}, max_size = {}, direct_io = {})",
            self.path.display(),
            self.max_size,
            self.direct_io
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
        let store = DiskStore::open_with_metrics(
            self.path.clone(),
            self.max_size.0,
            self.direct_io,
            ctx.tier_metrics(),
        )
        .await?;
        Ok(Arc::new(ChunkedBlobService::new(store)))
    }
}

/// The largest pack: big enough that creating and deleting files costs
/// nothing next to writing their bytes, small enough that a pack evicted
/// whole is a small part of a cache.
pub const MAX_PACK: u64 = 64 << 20;

/// The smallest pack target: room for one chunk of the largest size
/// FastCDC cuts by default (512 KiB), so the open pack never outgrows it.
const MIN_PACK: u64 = pack::MAGIC_LEN + pack::RECORD_HEADER_LEN + (512 << 10);

/// The size at which a cache of `max_size` seals its packs: a
/// thirty-second of the cache, so that a small cache still evicts in steps
/// small against its size, within [`MIN_PACK`] and [`MAX_PACK`]. The index
/// holds the rest of `max_size`: together with the open pack, the directory
/// stays within it (unless a fill brings a chunk larger than the target,
/// cut by a peer with a larger average: then by that chunk at most).
fn pack_target(max_size: u64) -> u64 {
    (max_size / 32).clamp(MIN_PACK, MAX_PACK)
}

/// An entry of a disk tier's index: what is evicted as one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Entry {
    /// A file of its own: an index, an outboard, or a chunk written by an
    /// older version.
    File(ObjectKey),
    /// A sealed pack.
    Pack(u64),
}

/// The [`ChunkStore`] behind a `disk` tier.
pub struct DiskStore {
    root: PathBuf,
    /// Held while the store is open: two stores on one directory would
    /// delete each other's files and append to each other's packs.
    _lock: std::fs::File,
    index: moka::sync::Cache<Entry, u64>,
    packs: Arc<Packs>,
    max_size: u64,
    tmp_seq: AtomicU64,
    metrics: TierMetrics,
    /// Decoded chunk lists of recently used blob indexes. An entry is only
    /// a decoding of its file: whether the index exists is always asked of
    /// `index`.
    lists: moka::sync::Cache<B3Digest, Arc<CachedList>>,
    /// How many times chunks were lost (a pack or chunk file evicted or
    /// vanished, a chunk found damaged): while it is unchanged, a chunk
    /// list found complete still is.
    chunk_losses: Arc<AtomicU64>,
}

/// Bytes of decoded chunk lists a disk tier keeps in memory: about 400,000
/// chunks, the lists of some 100 GiB of blobs.
pub const LIST_CACHE_BYTES: u64 = 16 << 20;

/// Largest outboard kept inside its blob's index file rather than in a
/// file of its own: that of a blob of up to 4 MiB at the stored shift. A
/// small blob thus costs one file (one create, one fsync, one rename), and
/// a Stat that reads its index reads at most a few pages.
const INLINE_OUTBOARD_MAX: usize = 16 << 10;

/// The decoded index of a blob, without its outboard unless that is small.
struct CachedList {
    index: BlobIndex,
    /// The file it was decoded from: a hit is used only while the file
    /// there is still this one, so a file replaced or damaged behind the
    /// store's back is read again.
    file: FileId,
    /// What the index file holds of the outboard.
    inline: InlineOutboard,
    /// The value of `chunk_losses` read before the latest check that found
    /// every chunk of `index` present; 0 if none did.
    complete_as_of: AtomicU64,
}

/// The outboard an index file holds.
enum InlineOutboard {
    /// None: it is in its own file, if anywhere.
    None,
    /// A small one (up to [`INLINE_OUTBOARD_MAX`]), kept with the list:
    /// (shift, outboard).
    Kept(u8, Bytes),
    /// A large one, from an index file written by an older version: read
    /// from the file again when asked for.
    Large,
}

impl CachedList {
    /// The cached form of `index`, decoded from `file`.
    fn new(index: BlobIndex, file: FileId) -> Self {
        let BlobIndex { size, chunks, bao } = index;
        let inline = match bao {
            None => InlineOutboard::None,
            Some((shift, outboard)) if outboard.len() <= INLINE_OUTBOARD_MAX => {
                InlineOutboard::Kept(shift, outboard)
            }
            Some(_) => InlineOutboard::Large,
        };
        CachedList {
            index: BlobIndex {
                size,
                chunks,
                bao: None,
            },
            file,
            inline,
            complete_as_of: AtomicU64::new(0),
        }
    }

    fn weight(&self) -> u32 {
        let kept = match &self.inline {
            InlineOutboard::Kept(_, outboard) => outboard.len(),
            _ => 0,
        };
        let bytes = self.index.chunks.len() * size_of::<ChunkMeta>() + kept + 64;
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
    /// files there. Packs use direct I/O.
    pub async fn open(root: PathBuf, max_size: u64) -> Result<Self> {
        DiskStore::open_with_metrics(root, max_size, true, TierMetrics::detached("disk")).await
    }

    /// Like [`DiskStore::open`], with direct I/O for packs only if
    /// `direct_io`, counting evictions and occupancy in `metrics`.
    pub async fn open_with_metrics(
        root: PathBuf,
        max_size: u64,
        direct_io: bool,
        metrics: TierMetrics,
    ) -> Result<Self> {
        let scan_root = root.clone();
        let target = pack_target(max_size);
        let (lock, packs, found) = tokio::task::spawn_blocking(move || {
            let lock = lock_dir(&scan_root)?;
            let (packs, found_packs) = Packs::open(scan_root.join("packs"), target, direct_io)?;
            let mut found = prepare_and_scan(&scan_root)?;
            found.extend(
                found_packs
                    .into_iter()
                    .map(|p| (Entry::Pack(p.id), p.len, p.modified)),
            );
            found.sort_by_key(|(_, _, mtime)| *mtime);
            std::io::Result::Ok((lock, packs, found))
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))?
        .map_err(|e| {
            Error::Io(std::io::Error::new(
                e.kind(),
                format!("disk cache {}: {e}", root.display()),
            ))
        })?;
        let packs = Arc::new(packs);

        let lists = moka::sync::Cache::builder()
            .max_capacity(LIST_CACHE_BYTES)
            .weigher(|_, list: &Arc<CachedList>| list.weight())
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        // Starts at 1: 0 marks a list never found complete.
        let chunk_losses = Arc::new(AtomicU64::new(1));

        let listener_root = root.clone();
        let listener_packs = packs.clone();
        let gone = metrics.clone();
        let lost = chunk_losses.clone();
        let stale = lists.clone();
        let index = moka::sync::Cache::builder()
            // Room for the open pack, which the index does not hold.
            .max_capacity(max_size.saturating_sub(target))
            .weigher(|_, size: &u64| u32::try_from(*size).unwrap_or(u32::MAX))
            // LRU rather than TinyLFU: TinyLFU may refuse to admit a new
            // entry, which would delete a chunk right after it was written.
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .eviction_listener(move |entry: Arc<Entry>, size: u64, cause| {
                // Called once the entry is out of the map: a presence check
                // that read the count before this increment and still saw
                // the chunk raced with its removal, as any check may.
                if cause != moka::notification::RemovalCause::Replaced {
                    match *entry {
                        Entry::File(ObjectKey::Chunk(_)) => {
                            lost.fetch_add(1, Ordering::SeqCst);
                        }
                        Entry::Pack(id) => {
                            listener_packs.forget_pack(id);
                            lost.fetch_add(1, Ordering::SeqCst);
                        }
                        Entry::File(ObjectKey::Index(digest)) => stale.invalidate(&digest),
                        Entry::File(ObjectKey::Outboard(_)) => {}
                    }
                }
                gone.occupancy_bytes.dec_by(size as i64);
                if cause.was_evicted() {
                    gone.evictions.inc();
                    let path = match *entry {
                        Entry::File(key) => listener_root.join(relative_path(&key)),
                        Entry::Pack(id) => listener_packs.path(id),
                    };
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
        for (entry, size, _) in found {
            metrics.occupancy_bytes.inc_by(size as i64);
            index.insert(entry, size);
        }
        index.run_pending_tasks();
        info!(path = %root.display(), files, bytes, max_size, "disk cache opened");
        Ok(DiskStore {
            root,
            _lock: lock,
            index,
            packs,
            max_size,
            tmp_seq: AtomicU64::new(0),
            metrics,
            lists,
            chunk_losses,
        })
    }

    /// Bytes of the files the index accounts for and of the pack open for
    /// appending: at most `max_size` (see `pack_target`).
    pub fn used_bytes(&self) -> u64 {
        self.index.run_pending_tasks();
        self.index.weighted_size() + self.packs.open_pack().map_or(0, |(_, len)| len)
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
                    index.insert(Entry::File(key), len);
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
        if self.index.get(&Entry::File(key)).is_none() {
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
                self.index.invalidate(&Entry::File(key));
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Drops `key` from the index and deletes its file.
    async fn remove(&self, key: ObjectKey) -> Result<()> {
        self.index.invalidate(&Entry::File(key));
        match tokio::fs::remove_file(self.path(&key)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

/// A chunk as it lies in a cache directory.
#[derive(Debug, Clone)]
pub struct StoredChunk {
    /// The digest it is stored under (not checked).
    pub digest: B3Digest,
    /// The file that holds it: a pack, or a chunk file of an older version.
    pub file: PathBuf,
    /// Where its bytes start in `file`.
    pub offset: u64,
    /// Its bytes.
    pub data: Bytes,
}

/// Every chunk stored under the cache directory `root`: the whole records
/// of its packs, in pack order, then the chunk files older versions left.
/// Nothing is checked. For tools and tests that look inside a cache; the
/// tier itself reads one chunk at a time.
pub fn stored_chunks(root: &Path) -> std::io::Result<Vec<StoredChunk>> {
    let mut out = Vec::new();
    let mut packs = Vec::new();
    if let Ok(entries) = std::fs::read_dir(root.join("packs")) {
        for entry in entries {
            let entry = entry?;
            if let Some(id) = entry.file_name().to_str().and_then(pack::parse_name) {
                packs.push((id, entry.path()));
            }
        }
    }
    packs.sort();
    for (_, path) in packs {
        let file = std::fs::File::open(&path)?;
        for record in pack::scan(&file)?.records {
            out.push(StoredChunk {
                digest: record.digest,
                file: path.clone(),
                offset: record.offset,
                data: pack::read_at(&file, record.offset, record.len)?,
            });
        }
    }
    if let Ok(prefixes) = std::fs::read_dir(root.join("chunks")) {
        for prefix in prefixes {
            for entry in std::fs::read_dir(prefix?.path())? {
                let path = entry?.path();
                let name = path.file_name().and_then(|n| n.to_str());
                if let Some(digest) = name.and_then(|n| n.parse::<B3Digest>().ok()) {
                    out.push(StoredChunk {
                        digest,
                        data: std::fs::read(&path)?.into(),
                        file: path,
                        offset: 0,
                    });
                }
            }
        }
    }
    Ok(out)
}

/// Where [`DiskStore::read_chunk`] found a chunk.
enum ChunkAt {
    Pack(Location),
    /// A file of its own, written by an older version.
    File(PathBuf),
}

/// `data`, read for chunk `meta`: checked against it, when given.
fn checked(data: Bytes, meta: Option<ChunkMeta>) -> Result<Bytes> {
    if let Some(meta) = meta {
        verify_chunk_meta(&meta, &data)?;
    }
    Ok(data)
}

/// Accounts for what a call into the packs wrote: its bytes in the
/// occupancy metric, the packs it sealed in the index (evicting at once, so
/// the directory never holds much more than `max_size`). Returns whether
/// records are left staged for [`Packs::write_staged`].
fn account(index: &moka::sync::Cache<Entry, u64>, occupancy: &Gauge, wrote: Wrote) -> bool {
    occupancy.inc_by(wrote.added as i64);
    if !wrote.sealed.is_empty() {
        for Sealed { id, len } in wrote.sealed {
            index.insert(Entry::Pack(id), len);
        }
        index.run_pending_tasks();
    }
    wrote.staged_left
}

/// Writes the records left staged with nobody writing them, and any
/// staged behind those meanwhile, in a blocking task of no request's:
/// their appenders wait for the answers its batches send.
fn write_staged_later(packs: Arc<Packs>, index: moka::sync::Cache<Entry, u64>, occupancy: Gauge) {
    let write = move || {
        while account(&index, &occupancy, packs.write_staged()) {}
    };
    tokio::task::spawn_blocking(write);
}

/// Whether chunk `digest` is stored, in a pack or a file of its own. One
/// that is counts as a use of where it is: a Put or a fill that skips it
/// relies on it staying, as much as a read does, and would otherwise
/// publish a blob whose oldest chunks the next seal evicts.
fn stored(packs: &Packs, index: &moka::sync::Cache<Entry, u64>, digest: &B3Digest) -> bool {
    match packs.locate(digest) {
        Some(at) => {
            let _ = index.get(&Entry::Pack(at.pack));
            true
        }
        None => index.get(&Entry::File(ObjectKey::Chunk(*digest))).is_some(),
    }
}

impl DiskStore {
    /// Whether chunk `digest` is stored, in a pack or a file of its own.
    fn holds(&self, digest: &B3Digest) -> bool {
        stored(&self.packs, &self.index, digest)
    }

    /// Whether chunk `digest` is stored in a file of its own.
    fn holds_file(&self, digest: &B3Digest) -> bool {
        self.index
            .contains_key(&Entry::File(ObjectKey::Chunk(*digest)))
    }

    /// Reads chunk `digest`, checked against `meta` if given. A chunk of a
    /// pack is first read without waiting for the disk (`RWF_NOWAIT`); if
    /// the page cache held it, it is also checked right here, on the async
    /// task. Otherwise it is read and checked in one blocking task. A chunk
    /// whose file vanished or was cut short, or that the disk cannot read
    /// ([`lost_to_the_disk`]), is forgotten and reported absent.
    ///
    /// Hashing on the async task is bounded work, as everywhere a chunk is
    /// checked (`docs/architecture.md`): one chunk of at most
    /// [`MAX_CHUNK_SIZE`] (about 0.1 ms at 5 GB/s) between two awaits (a
    /// larger one, filled from a peer that cuts larger chunks, takes the
    /// blocking task), and the hop to a blocking thread and back cost more
    /// than that. Without it a warm 1 GiB read cost the sidecar 0.59–0.64
    /// CPU-seconds instead of 0.74–0.95 and ran 7–11% faster: the thread
    /// wake-ups go (see `docs/benchmarks.md`). A reader's read-ahead runs
    /// each fetch as a task of its own, so chunks read this way are still
    /// hashed on several cores at once. A read that must wait for the
    /// disk still waits, and hashes, on a blocking thread.
    async fn read_chunk(&self, digest: B3Digest, meta: Option<ChunkMeta>) -> Result<Option<Bytes>> {
        let at = if let Some(at) = self.packs.locate(&digest) {
            // A use of its pack (the open pack is not in the index yet).
            let _ = self.index.get(&Entry::Pack(at.pack));
            if at.len <= MAX_CHUNK_SIZE
                && let Some(data) = self.packs.read_cached(&at)
            {
                return checked(data, meta).map(Some);
            }
            ChunkAt::Pack(at)
        } else if self
            .index
            .get(&Entry::File(ObjectKey::Chunk(digest)))
            .is_some()
        {
            ChunkAt::File(self.path(&ObjectKey::Chunk(digest)))
        } else {
            return Ok(None);
        };
        let packs = self.packs.clone();
        let (at, read) = tokio::task::spawn_blocking(move || {
            let data = match &at {
                ChunkAt::Pack(at) => packs.read(at),
                ChunkAt::File(path) => std::fs::read(path).map(Bytes::from),
            };
            let read = match data {
                Ok(data) => Ok(Ok(checked(data, meta))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Err(None)),
                // A pack cut short behind the store's back.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(Err(None)),
                Err(e) if lost_to_the_disk(&e) => Ok(Err(Some(e))),
                Err(e) => Err(e),
            };
            (at, read)
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))?;
        let unreadable = match read? {
            Ok(checked) => return checked.map(Some),
            Err(unreadable) => unreadable,
        };
        match at {
            ChunkAt::Pack(at) if unreadable.is_some() || self.packs.path(at.pack).exists() => {
                let path = self.packs.path(at.pack);
                match unreadable {
                    Some(e) => warn!(%digest, pack = %path.display(), error = %e,
                        "a stored chunk cannot be read: forgotten, to be stored again"),
                    None => warn!(%digest, pack = %path.display(), "a stored chunk was cut short"),
                }
                if self.packs.forget_chunk(&digest) {
                    self.chunk_losses.fetch_add(1, Ordering::SeqCst);
                }
            }
            // Evicted since it was located, or deleted behind the store's
            // back: forget all it held.
            ChunkAt::Pack(at) => {
                self.packs.lost_pack(at.pack);
                self.chunk_losses.fetch_add(1, Ordering::SeqCst);
                self.index.invalidate(&Entry::Pack(at.pack));
            }
            ChunkAt::File(_) => self
                .index
                .invalidate(&Entry::File(ObjectKey::Chunk(digest))),
        }
        Ok(None)
    }
}

/// Whether a read failed because the disk lost the bytes it was asked for
/// (a bad sector, a file system's failed checksum), rather than for a
/// reason of the moment (no file handles left, say): the chunk is then as
/// good as gone, and is forgotten so that the next fill stores it anew,
/// where a read that keeps failing would send every request for it on to
/// the far tiers for good.
fn lost_to_the_disk(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EIO | libc::EUCLEAN))
}

impl DiskStore {
    /// Appends a chunk to the open pack, hashing it first when `digest` is
    /// not given and skipping a chunk the store already holds. Returns its
    /// digest. A chunk whose digest is known here and that is stored
    /// already is answered on the async task, whatever its size (a caller
    /// need not check first).
    ///
    /// A chunk of at most [`MAX_CHUNK_SIZE`] is hashed and staged right
    /// here, on the async task ([`Packs::try_stage`]): both are bounded
    /// work, as a chunk's check on a read is (see `read_chunk`), and a
    /// blocking task is started only when a batch must be written. Taking
    /// every chunk to a blocking thread cost a 1 GiB Put about 15,000
    /// context switches, and its share of the sidecar's CPU (see
    /// `docs/benchmarks.md`). Anything else goes to [`Self::append_blocking`].
    ///
    /// The chunk's pieces are copied into the pack's write buffer as they
    /// are, never joined first.
    async fn append(&self, digest: Option<B3Digest>, chunk: SplitChunk) -> Result<B3Digest> {
        let bounded = chunk.len() <= MAX_CHUNK_SIZE as usize;
        let digest = match digest {
            Some(digest) => digest,
            None if bounded => chunk.digest(),
            None => return self.append_blocking(None, chunk).await,
        };
        if self.holds(&digest) {
            return Ok(digest);
        }
        let staged = if bounded {
            let parts: Vec<&[u8]> = chunk.parts().collect();
            self.packs.try_stage(digest, &parts)
        } else {
            None
        };
        let Some(appended) = staged else {
            return self.append_blocking(Some(digest), chunk).await;
        };
        if account(&self.index, &self.metrics.occupancy_bytes, appended.wrote) {
            write_staged_later(
                self.packs.clone(),
                self.index.clone(),
                self.metrics.occupancy_bytes.clone(),
            );
        }
        appended.answer.stored().await.map_err(Error::from)?;
        Ok(digest)
    }

    /// [`Self::append`] in one blocking task, for a chunk that may have to
    /// wait for a write.
    async fn append_blocking(
        &self,
        digest: Option<B3Digest>,
        chunk: SplitChunk,
    ) -> Result<B3Digest> {
        let packs = self.packs.clone();
        let index = self.index.clone();
        let occupancy = self.metrics.occupancy_bytes.clone();
        // As in `write`: the blocking task accounts for what it wrote even
        // if this future is dropped.
        let (digest, answer) = tokio::task::spawn_blocking(move || {
            let digest = digest.unwrap_or_else(|| chunk.digest());
            if stored(&packs, &index, &digest) {
                return (digest, Answer::Now(Ok(())));
            }
            let parts: Vec<&[u8]> = chunk.parts().collect();
            let appended = packs.append(digest, &parts);
            if account(&index, &occupancy, appended.wrote) {
                // Others staged behind the batch this append wrote.
                write_staged_later(packs, index, occupancy);
            }
            (digest, appended.answer)
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))?;
        // A staged chunk is answered by whichever call writes its batch:
        // waited for here, without holding a blocking thread.
        answer.stored().await.map_err(Error::from)?;
        Ok(digest)
    }

    /// The decoded index of `digest` without its outboard: from the cache
    /// of chunk lists, else read from its file. The outboard file is left
    /// unread, but counts as used.
    async fn chunk_list(&self, digest: &B3Digest) -> Result<Option<Arc<CachedList>>> {
        let key = ObjectKey::Index(*digest);
        if self.index.get(&Entry::File(key)).is_none() {
            return Ok(None);
        }
        let _ = self.index.get(&Entry::File(ObjectKey::Outboard(*digest)));
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
                self.index.invalidate(&Entry::File(key));
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        match BlobIndex::decode_written(digest, data) {
            Ok(index) => {
                let list = Arc::new(CachedList::new(index, file));
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

/// Takes the lock on the cache directory `root` (created if missing), or
/// fails if another store, in this process or another, holds it.
fn lock_dir(root: &Path) -> std::io::Result<std::fs::File> {
    std::fs::create_dir_all(root)?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(root.join(LOCK_FILE))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(std::io::Error::new(
            std::io::ErrorKind::ResourceBusy,
            "in use by another disk tier (of this process or another); \
             give each disk tier a directory of its own",
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// The file a store holds a lock on while it has the directory open.
pub const LOCK_FILE: &str = "lock";

/// Creates the directory layout, deletes files left half-written, and lists
/// every stored file outside the packs as (entry, size, mtime).
fn prepare_and_scan(root: &Path) -> std::io::Result<Vec<(Entry, u64, SystemTime)>> {
    let mut dirs = Vec::with_capacity(KINDS.len() * 256);
    for (kind, make_key) in KINDS {
        // Chunk files are only read, where an older version left them.
        let legacy = kind == "chunks";
        if legacy && !root.join(kind).is_dir() {
            continue;
        }
        for prefix in 0..=255u8 {
            let dir = root.join(kind).join(format!("{prefix:02x}"));
            if legacy && !dir.is_dir() {
                continue;
            }
            std::fs::create_dir_all(&dir)?;
            dirs.push((dir, make_key));
        }
    }
    // Scan the directories on a few threads: start-up time matters for
    // caches of a million files.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
    let per_thread = dirs.len().div_ceil(threads);
    let found = std::thread::scope(|scope| {
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
    Ok(found)
}

type ScanDir = (PathBuf, MakeKey);

fn scan_dirs(dirs: &[ScanDir]) -> std::io::Result<Vec<(Entry, u64, SystemTime)>> {
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
            found.push((Entry::File(make_key(digest)), meta.len(), mtime));
        }
    }
    Ok(found)
}

#[async_trait]
impl ChunkStore for DiskStore {
    #[instrument(skip(self), fields(%digest), err)]
    async fn get_chunk(&self, digest: &B3Digest) -> Result<Option<Bytes>> {
        self.read_chunk(*digest, None).await
    }

    /// Reads and checks the chunk in one blocking task.
    #[instrument(skip(self, meta), fields(digest = %meta.digest), err)]
    async fn get_chunk_verified(&self, meta: &ChunkMeta) -> Result<Option<Bytes>> {
        self.read_chunk(meta.digest, Some(*meta)).await
    }

    async fn chunk_size(&self, digest: &B3Digest) -> Result<Option<u64>> {
        Ok(match self.packs.locate(digest) {
            Some(at) => Some(u64::from(at.len)),
            None => self.index.get(&Entry::File(ObjectKey::Chunk(*digest))),
        })
    }

    async fn has_chunk(&self, digest: &B3Digest) -> Result<bool> {
        Ok(self.holds(digest))
    }

    /// With direct I/O every chunk read waits for the disk, so more are
    /// kept in flight: warm 1 GiB reads ran 593 and 665 MB/s with 4, 723 to
    /// 1143 with 16, about what the disk gives with that many reads at once
    /// (`docs/benchmarks.md`, "Packs with direct I/O").
    fn read_ahead(&self) -> usize {
        if self.packs.direct() {
            DIRECT_READ_AHEAD
        } else {
            4
        }
    }

    fn holds_chunks(&self, chunks: &[ChunkMeta]) -> Vec<bool> {
        let mut held = self.packs.contains_each(chunks.iter().map(|c| &c.digest));
        for (held, c) in held.iter_mut().zip(chunks) {
            *held = *held || self.holds_file(&c.digest);
        }
        held
    }

    /// Appended to the open pack, unless already stored.
    #[instrument(skip(self, data), fields(%digest, len = data.len()), err)]
    async fn put_chunk(&self, digest: B3Digest, data: Bytes) -> Result<()> {
        self.append(Some(digest), data.into()).await.map(drop)
    }

    /// Hashes the chunk where it is appended (see `append`), and copies
    /// its pieces into the pack as they are.
    #[instrument(skip(self, chunk), fields(len = chunk.len()), err)]
    async fn put_chunk_hashing(&self, chunk: SplitChunk) -> Result<B3Digest> {
        self.append(None, chunk).await
    }

    /// The chunk list, then the outboard: kept with the list when small,
    /// else from its own file, or else from inside an index file written by
    /// an older version.
    #[instrument(skip(self), fields(%digest), err)]
    async fn get_index(&self, digest: &B3Digest) -> Result<Option<BlobIndex>> {
        let Some(list) = self.chunk_list(digest).await? else {
            return Ok(None);
        };
        if let InlineOutboard::Kept(shift, outboard) = &list.inline {
            return Ok(Some(BlobIndex {
                bao: Some((*shift, outboard.clone())),
                ..list.index.clone()
            }));
        }
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
        if matches!(list.inline, InlineOutboard::Large)
            && let Some(data) = self.read_file(ObjectKey::Index(*digest)).await?
            && let Ok(index) = BlobIndex::decode_written(digest, data)
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
        // One lock of the pack map for the whole list.
        let complete = self.holds_chunks(chunks).into_iter().all(|held| held);
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

    /// A large outboard goes to a file of its own, written before the
    /// index that makes the blob visible; the index file holds the chunk
    /// list, and a small outboard (`INLINE_OUTBOARD_MAX`).
    #[instrument(skip(self, index), fields(%digest), err)]
    async fn put_index(&self, digest: B3Digest, index: BlobIndex) -> Result<()> {
        let BlobIndex { size, chunks, bao } = index;
        let bao = match bao {
            Some((_, outboard)) if outboard.is_empty() => None,
            Some((shift, outboard)) if outboard.len() > INLINE_OUTBOARD_MAX => {
                self.write(
                    ObjectKey::Outboard(digest),
                    encode_outboard(shift, &outboard),
                    true,
                )
                .await?;
                None
            }
            small => small,
        };
        let index = BlobIndex { size, chunks, bao };
        // A cached list of the file this replaces is refused by its file
        // id on its next use.
        self.write(ObjectKey::Index(digest), index.encode(), true)
            .await
    }

    async fn discard_chunk(&self, digest: &B3Digest) -> Result<()> {
        warn!(%digest, "removing a damaged chunk");
        if self.packs.forget_chunk(digest) {
            self.chunk_losses.fetch_add(1, Ordering::SeqCst);
        }
        self.remove(ObjectKey::Chunk(*digest)).await
    }

    fn evicts(&self) -> bool {
        true
    }

    /// Enough chunks in flight (4 MiB of the default chunking, 8 MiB at
    /// most) that while one batch of appends is written the next fills
    /// (see `Packs::append`); with a window of 4, each batch held one
    /// or two chunks and a Put still waited on nearly every write.
    fn write_concurrency(&self) -> usize {
        16
    }
}

#[cfg(test)]
mod tests;
