//! The `disk` tier's packs, in memory: where each chunk is, which chunks
//! each pack holds, and the one pack open for appending.
//!
//! Recency and the size bound are not kept here: a pack enters the tier's
//! cache index as one entry once it is sealed (full), and leaves it whole.
//! The open pack is outside that index until then (the index's bound
//! leaves room for it), so none of the chunks being appended can be
//! evicted while they are written.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock, TryLockError};
use std::time::SystemTime;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::digest::B3Digest;

use super::direct::{self, BufPool, Tail};
use super::pack::{self, MAGIC, MAGIC_LEN, RECORD_HEADER_LEN};

/// Where a chunk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Location {
    pub pack: u64,
    /// Offset of the chunk's bytes in the pack.
    pub offset: u64,
    pub len: u32,
}

/// A pack closed for appending, to be accounted for (and later evicted)
/// as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Sealed {
    pub id: u64,
    /// Bytes accounted to it: the sum of the `added` of its appends.
    pub len: u64,
}

/// A pack found at start-up, cut back to its last whole record.
#[derive(Debug)]
pub(super) struct FoundPack {
    pub id: u64,
    pub len: u64,
    pub modified: SystemTime,
}

/// What an append did.
#[derive(Debug)]
pub(super) struct Appended {
    /// What the call did to the directory.
    pub wrote: Wrote,
    /// Whether the chunk was stored, or when it will be known.
    pub answer: Answer,
}

/// What an append, or a [`Packs::write_staged`], did to the directory.
#[derive(Debug)]
pub(super) struct Wrote {
    /// Packs sealed: one found full, and one written to if that failed in
    /// a way that leaves its end unknown.
    pub sealed: Vec<Sealed>,
    /// Bytes added to the directory: a chunk's written at once, and those
    /// of the batch written, whoever staged them (so they are accounted
    /// even if their appenders have gone).
    pub added: u64,
    /// Records are left staged with no call writing them: the caller must
    /// see to [`Packs::write_staged`] being called (on a blocking thread)
    /// until this is false, or their appenders wait for ever.
    pub staged_left: bool,
}

/// How an append ends.
#[derive(Debug)]
pub(super) enum Answer {
    /// Known at once: the chunk was stored already, was written at once,
    /// or could not be stored.
    Now(std::io::Result<()>),
    /// Staged: the batch it went in answers once it is written (or lost).
    /// Some append is writing that batch, or will write it next, without
    /// waiting for this one.
    Staged(oneshot::Receiver<std::io::Result<()>>),
}

impl Answer {
    /// Waits for the answer.
    pub async fn stored(self) -> std::io::Result<()> {
        match self {
            Answer::Now(result) => result,
            Answer::Staged(answer) => answer.await.unwrap_or_else(|_| Err(unanswered())),
        }
    }
}

/// The length field of a record holding the chunk `data` (in pieces), if
/// a pack can hold one.
fn record_len(data: &[&[u8]]) -> std::io::Result<u32> {
    let len: usize = data.iter().map(|piece| piece.len()).sum();
    u32::try_from(len)
        .ok()
        .filter(|&len| len > 0 && len <= pack::MAX_RECORD)
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("a chunk of {len} bytes cannot be packed"),
            )
        })
}

/// Copies the record of chunk `digest` into `open`'s tail, unless the tail
/// has no room for it, and notes it staged. Returns where its answer
/// comes.
fn stage_record(
    open: &mut OpenPack,
    staged: &mut HashSet<B3Digest>,
    header: &[u8],
    data: &[&[u8]],
    digest: B3Digest,
    len: u32,
) -> Option<oneshot::Receiver<std::io::Result<()>>> {
    let start = open.len;
    if !open.tail.stage(&record_parts(header, data)) {
        return None;
    }
    let (answer, answered) = oneshot::channel();
    open.unwritten.push(StagedRecord {
        digest,
        offset: start + RECORD_HEADER_LEN,
        len,
        answer,
    });
    open.len += RECORD_HEADER_LEN + u64::from(len);
    staged.insert(digest);
    Some(answered)
}

/// A record's bytes: its header, then its chunk's pieces.
fn record_parts<'a>(header: &'a [u8], data: &[&'a [u8]]) -> Vec<&'a [u8]> {
    let mut parts = Vec::with_capacity(1 + data.len());
    parts.push(header);
    parts.extend_from_slice(data);
    parts
}

/// Whether records are staged in the open pack with no append writing.
fn unled(w: &Writer) -> bool {
    !w.flushing && w.open.as_ref().is_some_and(|o| !o.unwritten.is_empty())
}

/// The error of a staged append whose answer was dropped: not reached, as
/// every staged record is answered by its batch or with its lost pack.
fn unanswered() -> std::io::Error {
    std::io::Error::other("a staged chunk was neither written nor lost")
}

pub(super) struct Packs {
    dir: PathBuf,
    /// A pack is sealed once the next record would take it past this.
    target: u64,
    map: RwLock<Map>,
    writer: Mutex<Writer>,
    /// Signalled when a batch is written (or lost) and when the open pack
    /// is: appenders waiting for their answer, or for room to stage, look
    /// again.
    written: Condvar,
    /// Read handles of recently read packs, so a chunk read is one
    /// positioned read rather than an open, a read and a close (and can be
    /// tried without a blocking task: see [`Packs::read_cached`]). A
    /// pack's handle closes when the pack is forgotten; one deleted behind
    /// the store's back reads on through its handle, checked as ever,
    /// until then.
    readers: moka::sync::Cache<u64, Arc<File>>,
    /// Whether the file system reads without waiting (`RWF_NOWAIT`); false
    /// once it said it cannot, and with direct I/O (nothing is cached).
    nowait: AtomicBool,
    /// Whether packs are written and read with direct I/O (see
    /// [`direct`]).
    direct: bool,
    /// Buffers for direct reads.
    buffers: Arc<BufPool>,
    /// An OS error every read answers with instead of reading (0: none),
    /// set by tests to stand for a failing disk.
    #[cfg(test)]
    failing: std::sync::atomic::AtomicI32,
}

/// Direct-read buffers kept for reuse: enough for the read-ahead of two
/// readers (about 17 MiB).
const BUFFERS: usize = 32;

/// Most read handles kept open.
const READERS: u64 = 64;

#[derive(Default)]
struct Map {
    chunks: HashMap<B3Digest, Location>,
    /// The chunks each pack holds (some may since have been forgotten, or
    /// stored again elsewhere: compare with `chunks` before acting).
    members: HashMap<u64, Vec<B3Digest>>,
}

struct Writer {
    next_id: u64,
    open: Option<OpenPack>,
    /// A batch of the open pack is being written, outside the lock; the
    /// appender writing it wakes the others when it is done.
    flushing: bool,
    /// Chunks staged and not yet answered: another append of one waits for
    /// that answer instead of staging it again.
    staged: HashSet<B3Digest>,
    /// The tail of the last pack sealed, whose buffers the next pack takes.
    spare: Option<Tail>,
}

struct OpenPack {
    id: u64,
    /// Shared with the appender writing a batch outside the lock.
    file: Arc<File>,
    /// Its last bytes: every write to the pack goes through it.
    tail: Tail,
    /// Where the pack ends, staged records included.
    len: u64,
    /// Where the bytes written end: every record before is on disk and in
    /// the map.
    written: u64,
    /// Every record written, for its table of contents; `None` once
    /// there are more than a table lists.
    records: Option<Vec<(B3Digest, u32)>>,
    /// Records staged in the tail and not yet written, in pack order.
    unwritten: Vec<StagedRecord>,
}

/// A record staged in the open pack's tail.
struct StagedRecord {
    digest: B3Digest,
    /// Offset of the chunk's bytes in the pack.
    offset: u64,
    len: u32,
    /// Where its appender waits for it.
    answer: oneshot::Sender<std::io::Result<()>>,
}

impl StagedRecord {
    /// Answers the append that staged this record; `staged` is the
    /// writer's set of unanswered chunks.
    fn answer(self, staged: &mut HashSet<B3Digest>, result: std::io::Result<()>) {
        staged.remove(&self.digest);
        // An appender that has gone (its Put was dropped) needs no answer:
        // what was written stays written.
        let _ = self.answer.send(result);
    }
}

impl OpenPack {
    /// Ends the pack with its table of contents (if it can have one) and
    /// seals it; hands back its tail for the next pack. Called with
    /// nothing staged.
    fn seal(mut self) -> (Sealed, Tail) {
        let table = self
            .records
            .as_ref()
            .map(|records| pack::toc(records, self.len));
        let toc = match table {
            Some(table) => match self.tail.finish(&self.file, &table) {
                Ok(()) => table.len() as u64,
                Err(e) => {
                    tracing::debug!(error = %e, "no table of contents for a pack");
                    0
                }
            },
            None => 0,
        };
        if toc == 0 {
            // Without the padding after the last record (a scan would stop
            // at it anyway).
            let _ = self.file.set_len(self.len);
        }
        let sealed = Sealed {
            id: self.id,
            len: self.len + toc,
        };
        (sealed, self.tail)
    }

    /// Whether appending `record` bytes would take the pack past `target`
    /// (a pack holds at least one record, however large).
    fn full_for(&self, record: u64, target: u64) -> bool {
        self.len > MAGIC_LEN && self.len + record > target
    }
}

/// The error of an append staged in a pack whose file was lost.
fn lost_pack_error() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::NotFound,
        "the pack the chunk was appended to is gone",
    )
}

/// The error a staged append gets when the batch it was written in failed:
/// the same as the writer's, for each appender of the batch.
fn copy_error(e: &std::io::Error) -> std::io::Error {
    match e.raw_os_error() {
        Some(code) => std::io::Error::from_raw_os_error(code),
        None => std::io::Error::new(e.kind(), e.to_string()),
    }
}

/// Pack files that tests make fail to open, standing for a disk that
/// cannot read them (as root, permissions cannot).
#[cfg(test)]
pub(super) static UNOPENABLE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Opens pack file `path`, found at start-up, by its table of contents or
/// else by scanning it: then it is cut back to its last whole record and
/// given a table. One without any record is deleted (`None`). Returns its
/// records, its length and its metadata from before it was cut.
fn open_found(path: &Path) -> std::io::Result<Option<(pack::Scanned, u64, std::fs::Metadata)>> {
    #[cfg(test)]
    if UNOPENABLE
        .lock()
        .is_ok_and(|paths| paths.iter().any(|p| p == path))
    {
        return Err(std::io::Error::from_raw_os_error(libc::EIO));
    }
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let scanned = pack::records(&file)?;
    if scanned.records.is_empty() {
        drop(file);
        std::fs::remove_file(path)?;
        return Ok(None);
    }
    // Taken before the pack is cut or given its table: its age orders the
    // cache index.
    let meta = file.metadata()?;
    let mut len = scanned.valid_len;
    if !scanned.has_toc {
        if meta.len() > len {
            file.set_len(len)?;
        }
        if scanned.records.len() <= pack::MAX_TOC_ENTRIES {
            let listed: Vec<_> = scanned.records.iter().map(|r| (r.digest, r.len)).collect();
            len += pack::append_toc(&file, &listed, len);
        }
    }
    Ok(Some((scanned, len, meta)))
}

impl Packs {
    /// Opens the packs in `dir` (created if missing), each by its table of
    /// contents, or else by scanning it: then it is cut back to its last
    /// whole record and given a table. One without any record is deleted.
    /// Appends go to a new pack, never to one found here.
    pub fn open(
        dir: PathBuf,
        target: u64,
        direct: bool,
    ) -> std::io::Result<(Packs, Vec<FoundPack>)> {
        std::fs::create_dir_all(&dir)?;
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if let Some(id) = entry.file_name().to_str().and_then(pack::parse_name)
                && entry.file_type()?.is_file()
            {
                ids.push(id);
            }
        }
        // In id order, so that a chunk stored twice is found in the later.
        ids.sort_unstable();
        let mut map = Map::default();
        let mut found = Vec::with_capacity(ids.len());
        for &id in &ids {
            let path = dir.join(pack::file_name(id));
            let (scanned, len, meta) = match open_found(&path) {
                Ok(Some(found)) => found,
                Ok(None) => continue,
                Err(e) => {
                    // One bad file should not keep the whole tier (and the
                    // server) from starting: the pack is left as it is, for
                    // the operator to look at, and its chunks are fetched
                    // again when asked for.
                    tracing::error!(pack = %path.display(), error = %e,
                        "a pack cannot be opened: left as it is, its chunks unused \
                         and its space not counted");
                    continue;
                }
            };
            let members = scanned.records.iter().map(|r| r.digest).collect();
            for r in scanned.records {
                let location = Location {
                    pack: id,
                    offset: r.offset,
                    len: r.len,
                };
                map.chunks.insert(r.digest, location);
            }
            map.members.insert(id, members);
            found.push(FoundPack {
                id,
                len,
                modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
        let packs = Packs {
            dir,
            target,
            map: RwLock::new(map),
            writer: Mutex::new(Writer {
                next_id: ids.last().map_or(0, |id| id + 1),
                open: None,
                flushing: false,
                staged: HashSet::new(),
                spare: None,
            }),
            written: Condvar::new(),
            readers: moka::sync::Cache::new(READERS),
            nowait: AtomicBool::new(!direct),
            direct,
            buffers: BufPool::new(BUFFERS),
            #[cfg(test)]
            failing: Default::default(),
        };
        Ok((packs, found))
    }

    pub fn path(&self, id: u64) -> PathBuf {
        self.dir.join(pack::file_name(id))
    }

    /// The chunk at `at`, if the page cache holds all of it and a read
    /// handle of its pack is open: read without waiting for the disk, so
    /// that an async task may call it.
    pub fn read_cached(&self, at: &Location) -> Option<Bytes> {
        if !self.reads_without_waiting() {
            return None;
        }
        let file = self.readers.get(&at.pack)?;
        match pack::read_cached(&file, at.offset, at.len) {
            Ok(read) => read,
            Err(e) => {
                tracing::info!(dir = %self.dir.display(), error = %e,
                    "the file system cannot read without waiting: every read takes a blocking task");
                self.nowait.store(false, Ordering::Relaxed);
                None
            }
        }
    }

    /// Whether packs are read with direct I/O: each read waits for the
    /// disk.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Whether [`Packs::read_cached`] can find chunks (false once the file
    /// system said it cannot read without waiting).
    pub fn reads_without_waiting(&self) -> bool {
        self.nowait.load(Ordering::Relaxed)
    }

    /// The chunk at `at` (blocking). A pack cut short reads as
    /// `UnexpectedEof`, a pack gone as `NotFound`.
    pub fn read(&self, at: &Location) -> std::io::Result<Bytes> {
        #[cfg(test)]
        match self.failing.load(Ordering::Relaxed) {
            0 => {}
            code => return Err(std::io::Error::from_raw_os_error(code)),
        }
        let file = match self.readers.get(&at.pack) {
            Some(file) => file,
            None => {
                // One open per pack, however many reads miss at once.
                let file = self
                    .readers
                    .try_get_with(at.pack, || {
                        direct::open(&self.path(at.pack), direct::Open::Read, self.direct)
                            .map(Arc::new)
                    })
                    .map_err(|e| std::io::Error::new(e.kind(), e.to_string()))?;
                // Forgotten meanwhile (evicted, say): keep no handle that
                // would hold its deleted file's space.
                if !self.map().members.contains_key(&at.pack) {
                    self.close_reader(at.pack);
                }
                file
            }
        };
        if self.direct {
            direct::read_at(&file, at.offset, at.len, &self.buffers)
        } else {
            pack::read_at(&file, at.offset, at.len)
        }
    }

    /// Marks a batch as being written (or not), as an append writing one
    /// does, without writing anything.
    #[cfg(test)]
    pub fn pretend_writing(&self, writing: bool) {
        self.writer().flushing = writing;
    }

    /// Makes every read fail with OS error `code` (0: read again).
    #[cfg(test)]
    pub fn fail_reads(&self, code: i32) {
        self.failing.store(code, Ordering::Relaxed);
    }

    /// Whether a read handle of pack `id` is open.
    #[cfg(test)]
    pub fn has_reader(&self, id: u64) -> bool {
        self.readers.contains_key(&id)
    }

    pub fn locate(&self, digest: &B3Digest) -> Option<Location> {
        self.map().chunks.get(digest).copied()
    }

    pub fn contains(&self, digest: &B3Digest) -> bool {
        self.map().chunks.contains_key(digest)
    }

    /// Whether each digest is stored, under one lock.
    pub fn contains_each<'a>(&self, digests: impl Iterator<Item = &'a B3Digest>) -> Vec<bool> {
        let map = self.map();
        digests.map(|d| map.chunks.contains_key(d)).collect()
    }

    /// The id and length of the pack open for appending, if any.
    pub fn open_pack(&self) -> Option<(u64, u64)> {
        self.writer().open.as_ref().map(|p| (p.id, p.len))
    }

    /// Appends `data` as the chunk `digest` (blocking). The chunk can be
    /// read once its [`Answer`] says it is stored. A chunk already stored,
    /// or being stored by another append, is not stored again.
    ///
    /// Appends group their writes: each copies its record into the open
    /// pack's tail under the writer lock, and one of them at a time takes
    /// everything staged and writes it outside the lock, while the others
    /// stage the next batch behind it. A direct write waits for the disk;
    /// written one chunk at a time under the lock, as they once were, the
    /// writes were a queue the chunks' hashing and the network waited on
    /// (a Put into the disk tier ran at 70% of its speed into tmpfs).
    ///
    /// An append that staged its record while another writes returns at
    /// once, to await the answer its batch sends. One that finds nobody
    /// writing writes the batch its record went in, and no more: records
    /// staged behind it meanwhile are left to [`Packs::write_staged`]
    /// (`staged_left`), so its own caller is not held writing others'
    /// chunks for as long as they keep coming. Appends once waited here
    /// for their batch, each holding a blocking thread, and every batch
    /// written woke them all: about five context switches per chunk stored.
    pub fn append(&self, digest: B3Digest, data: &[&[u8]]) -> Appended {
        let mut sealed = Vec::new();
        let mut added = 0;
        let writer = self.writer();
        let (writer, answer) = self.append_locked(writer, &mut sealed, &mut added, digest, data);
        let staged_left = unled(&writer);
        drop(writer);
        Appended {
            wrote: Wrote {
                sealed,
                added,
                staged_left,
            },
            answer,
        }
    }

    /// Writes the records staged in the open pack, a batch, unless an
    /// append is writing already.
    pub fn write_staged(&self) -> Wrote {
        let mut sealed = Vec::new();
        let mut added = 0;
        let mut w = self.writer();
        if unled(&w) {
            w = self.lead(w, &mut sealed, &mut added);
        }
        Wrote {
            sealed,
            added,
            staged_left: unled(&w),
        }
    }

    /// Stages chunk `digest` in the open pack if that takes neither I/O
    /// nor a wait: the part of [`Packs::append`] that is only a copy under
    /// the writer lock, which an async task can do without a hop to a
    /// blocking thread. `None` when the append would have to write a batch
    /// first, wait for one, seal or start a pack, or join another append
    /// of the same chunk, or when another holds the writer lock: the
    /// caller then calls [`Packs::append`] on a blocking thread. A record
    /// staged with nobody writing is reported in `staged_left`, as by
    /// `append`, for the caller to hand to [`Packs::write_staged`]; this
    /// call never writes it itself.
    pub fn try_stage(&self, digest: B3Digest, data: &[&[u8]]) -> Option<Appended> {
        let len = record_len(data).ok()?;
        let record = RECORD_HEADER_LEN + u64::from(len);
        let header = pack::record_header(&digest, len);
        // Not waited for: an append holds the lock while it starts or
        // seals a pack, or writes a record too large to stage, all I/O
        // that must not hold up a runtime thread.
        let mut w = self.try_writer()?;
        let answer = if self.contains(&digest) {
            Answer::Now(Ok(()))
        } else {
            let Writer {
                open: Some(open),
                staged,
                ..
            } = &mut *w
            else {
                return None;
            };
            if staged.contains(&digest) || open.full_for(record, self.target) {
                return None;
            }
            Answer::Staged(stage_record(open, staged, &header, data, digest, len)?)
        };
        Some(Appended {
            wrote: Wrote {
                sealed: Vec::new(),
                added: 0,
                staged_left: unled(&w),
            },
            answer,
        })
    }

    fn append_locked<'a>(
        &'a self,
        mut w: MutexGuard<'a, Writer>,
        sealed: &mut Vec<Sealed>,
        added: &mut u64,
        digest: B3Digest,
        data: &[&[u8]],
    ) -> (MutexGuard<'a, Writer>, Answer) {
        let len = match record_len(data) {
            Ok(len) => len,
            Err(e) => return (w, Answer::Now(Err(e))),
        };
        let record = RECORD_HEADER_LEN + u64::from(len);
        let header = pack::record_header(&digest, len);
        let answer = loop {
            // Checked again under the writer lock: two fills of blobs that
            // share a chunk store it once.
            if self.contains(&digest) {
                return (w, Answer::Now(Ok(())));
            }
            if w.staged.contains(&digest) {
                // Another append staged it. Its batch is written by whoever
                // is writing now, or else by this append: its stager may
                // have left it to the writer this append just was, and
                // then nobody else would come to write it.
                w = if unled(&w) {
                    self.lead(w, sealed, added)
                } else {
                    self.wait(w)
                };
                continue;
            }
            let full = w
                .open
                .as_ref()
                .is_some_and(|o| o.full_for(record, self.target));
            let blocked = full
                || w.open
                    .as_ref()
                    .is_some_and(|o| o.tail.room() < header.len() + len as usize);
            if blocked {
                // Everything staged must be written first: to seal the
                // pack, or to make room in its tail.
                if w.flushing {
                    w = self.wait(w);
                    continue;
                }
                if w.open.as_ref().is_some_and(|o| !o.unwritten.is_empty()) {
                    w = self.lead(w, sealed, added);
                    continue;
                }
            }
            if full && let Some(open) = w.open.take() {
                let appended = open.len;
                let (seal, tail) = open.seal();
                // The table of contents.
                *added += seal.len - appended;
                sealed.push(seal);
                w.spare = Some(tail);
                self.written.notify_all();
                continue;
            }
            if w.open.is_none()
                && let Err(e) = self.start_pack(&mut w, added)
            {
                return (w, Answer::Now(Err(e)));
            }
            let Writer {
                open: Some(open),
                staged,
                ..
            } = &mut *w
            else {
                continue;
            };
            if let Some(answered) = stage_record(open, staged, &header, data, digest, len) {
                break answered;
            }
            // A record larger than a batch, with nothing staged before it:
            // written at once, under the lock.
            let result = self.append_now(open, &header, data, digest, len);
            if result.is_ok() {
                *added += record;
            } else if open.len != open.tail.end()
                && let Some(open) = w.open.take()
            {
                // The pack's end is unknown: seal it as it was accounted
                // (a scan cuts it back at the next start-up).
                sealed.push(Sealed {
                    id: open.id,
                    len: open.len,
                });
            }
            return (w, Answer::Now(result));
        };
        // Staged. An append writing a batch now answers this record with
        // its next one (or leaves it to `write_staged`); with none, this
        // one writes the batch.
        if unled(&w) {
            w = self.lead(w, sealed, added);
        }
        (w, Answer::Staged(answer))
    }

    /// Creates the next pack and opens it for appending, in the buffers of
    /// the last one sealed.
    fn start_pack(&self, w: &mut Writer, added: &mut u64) -> std::io::Result<()> {
        let (id, path, file) = self.create(w)?;
        let mut tail = w.spare.take().map_or_else(Tail::new, Tail::reset);
        if let Err(e) = tail.append(&file, &[&MAGIC]) {
            drop(file);
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        *added += MAGIC_LEN;
        w.open = Some(OpenPack {
            id,
            file: Arc::new(file),
            tail,
            len: MAGIC_LEN,
            written: MAGIC_LEN,
            records: Some(Vec::new()),
            unwritten: Vec::new(),
        });
        Ok(())
    }

    /// Writes one record at once, under the writer lock (nothing is
    /// staged), and maps it. After a failure the pack is cut back to where
    /// it was, if that works (else its tail ends elsewhere than its `len`).
    fn append_now(
        &self,
        open: &mut OpenPack,
        header: &[u8],
        data: &[&[u8]],
        digest: B3Digest,
        len: u32,
    ) -> std::io::Result<()> {
        let start = open.len;
        if let Err(e) = open.tail.append(&open.file, &record_parts(header, data)) {
            let _ = open.tail.rewind(&open.file, start);
            return Err(e);
        }
        open.len += RECORD_HEADER_LEN + u64::from(len);
        open.written = open.len;
        self.written_records(
            open.id,
            &mut open.records,
            [(digest, start + RECORD_HEADER_LEN, len)],
        );
        Ok(())
    }

    /// Takes everything staged in the open pack and writes it, outside the
    /// writer lock, then answers each record staged in it and adds the
    /// bytes written to `added`. A failed write loses the batch and
    /// everything staged after it: the pack goes on from the end of its
    /// last good write. Called with `flushing` unset.
    fn lead<'a>(
        &'a self,
        mut w: MutexGuard<'a, Writer>,
        sealed: &mut Vec<Sealed>,
        added: &mut u64,
    ) -> MutexGuard<'a, Writer> {
        let Some(open) = w.open.as_mut() else {
            return w;
        };
        let batch = open.tail.take();
        let records = std::mem::take(&mut open.unwritten);
        let file = Arc::clone(&open.file);
        let id = open.id;
        w.flushing = true;
        drop(w);
        let result = batch.write(&file);
        let mut w = self.writer();
        w.flushing = false;
        let Writer { open, staged, .. } = &mut *w;
        match (open.as_mut().filter(|o| o.id == id), result) {
            (Some(pack), Ok(())) => {
                *added += records
                    .iter()
                    .map(|r| RECORD_HEADER_LEN + u64::from(r.len))
                    .sum::<u64>();
                pack.written = batch.end();
                pack.tail.recycle(batch);
                self.written_records(
                    id,
                    &mut pack.records,
                    records.iter().map(|r| (r.digest, r.offset, r.len)),
                );
                for r in records {
                    r.answer(staged, Ok(()));
                }
            }
            (Some(pack), Err(e)) => {
                let later = std::mem::take(&mut pack.unwritten);
                let rewound = pack.tail.rewind(&pack.file, pack.written);
                pack.len = pack.written;
                for r in records.into_iter().chain(later) {
                    r.answer(staged, Err(copy_error(&e)));
                }
                if rewound.is_err()
                    && let Some(pack) = open.take()
                {
                    // Its end is unknown: sealed as it was accounted (a
                    // scan cuts it back at the next start-up).
                    sealed.push(Sealed {
                        id: pack.id,
                        len: pack.written,
                    });
                }
            }
            // The pack was lost meanwhile (its later records were answered
            // then).
            (None, _) => {
                for r in records {
                    r.answer(staged, Err(lost_pack_error()));
                }
            }
        }
        self.written.notify_all();
        w
    }

    /// Maps records of pack `id` now on disk, and lists them for its table
    /// of contents.
    fn written_records(
        &self,
        id: u64,
        toc: &mut Option<Vec<(B3Digest, u32)>>,
        records: impl IntoIterator<Item = (B3Digest, u64, u32)>,
    ) {
        let mut map = self.map_mut();
        for (digest, offset, len) in records {
            if let Some(listed) = toc {
                if listed.len() < pack::MAX_TOC_ENTRIES {
                    listed.push((digest, len));
                } else {
                    *toc = None;
                }
            }
            map.chunks.insert(
                digest,
                Location {
                    pack: id,
                    offset,
                    len,
                },
            );
            map.members.entry(id).or_default().push(digest);
        }
    }

    fn wait<'a>(&self, w: MutexGuard<'a, Writer>) -> MutexGuard<'a, Writer> {
        self.written.wait(w).unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates the next pack. An id taken since start-up (by another
    /// process on the same directory, which is not supported but must not
    /// stop this one) is skipped.
    fn create(&self, writer: &mut Writer) -> std::io::Result<(u64, PathBuf, File)> {
        let mut tries = 0;
        loop {
            let id = writer.next_id;
            writer.next_id += 1;
            let path = self.path(id);
            match direct::open(&path, direct::Open::CreateNew, self.direct) {
                Ok(file) => return Ok((id, path, file)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 64 => {
                    tries += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Forgets a chunk (found damaged). Its bytes stay in its pack, dead,
    /// until the pack goes.
    pub fn forget_chunk(&self, digest: &B3Digest) -> bool {
        self.map_mut().chunks.remove(digest).is_some()
    }

    /// Forgets every chunk of pack `id`, whose file is gone from under the
    /// store; if it is the open pack, appends go to a new one.
    pub fn lost_pack(&self, id: u64) {
        let mut writer = self.writer();
        if writer.open.as_ref().is_some_and(|open| open.id == id)
            && let Some(open) = writer.open.take()
        {
            // What was staged in it is lost with it.
            for r in open.unwritten {
                r.answer(&mut writer.staged, Err(lost_pack_error()));
            }
            self.written.notify_all();
        }
        drop(writer);
        self.forget_pack(id);
    }

    /// Forgets every chunk of pack `id` (evicted, or its file gone), and
    /// closes its read handle.
    pub fn forget_pack(&self, id: u64) {
        let mut map = self.map_mut();
        let members = map.members.remove(&id);
        self.close_reader(id);
        let Some(members) = members else {
            return;
        };
        for digest in members {
            if map.chunks.get(&digest).is_some_and(|l| l.pack == id) {
                map.chunks.remove(&digest);
            }
        }
    }

    /// Closes the read handle of pack `id`, if open (once the reads using
    /// it are done).
    fn close_reader(&self, id: u64) {
        self.readers.invalidate(&id);
        // moka drops a removed value only in its housekeeping; until then
        // the handle would hold a deleted pack's space.
        self.readers.run_pending_tasks();
    }

    // A panic elsewhere while a lock was held leaves the maps as they
    // were between two whole updates: carry on with them.
    fn map(&self) -> std::sync::RwLockReadGuard<'_, Map> {
        self.map.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn map_mut(&self) -> std::sync::RwLockWriteGuard<'_, Map> {
        self.map.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn writer(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The writer lock, unless another holds it.
    fn try_writer(&self) -> Option<MutexGuard<'_, Writer>> {
        match self.writer.try_lock() {
            Ok(w) => Some(w),
            Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }
}
