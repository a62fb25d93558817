//! Pack I/O that bypasses the page cache (`O_DIRECT`), the `disk` tier's
//! default (`direct_io = true`).
//!
//! Why: a buffered write copies every stored byte into a page-cache page,
//! and a fresh page can cost far more than the copy. In a virtual machine
//! whose memory the host hands out lazily (and takes back through a
//! balloon's free-page reporting), the first touch of a guest page is a
//! fault in the host: writing 1 GiB into new files took 2.7–4.7 s of
//! system time here, against 0.2 s with `O_DIRECT`, and a cold read that
//! fills the disk tier cost the sidecar 7.0 CPU-s per GiB instead of 2.3
//! (`docs/benchmarks.md`). The page cache would also hold a second copy of
//! chunks the `memory` tier above already keeps hot, and a fill of
//! gigabytes of cold blobs would push everything else out of it.
//!
//! Direct transfers must start, end and sit in memory on block
//! boundaries. Appends therefore go through a [`Tail`]: each appended byte
//! is copied once into an aligned buffer (a chunk's bytes arrive wherever
//! the network put them; the copy costs a fraction of a fresh page), and
//! the bytes since the pack's last [`ALIGN`] boundary stay there and are
//! written again, padded with zeros up to the next boundary, with the next
//! write. A chunk is mapped (readable) only once the write that holds it
//! is done, so readers never look at unwritten bytes; the padding is cut
//! off when the pack is sealed, and a scan after a crash stops at it (a
//! record of length 0 cannot be one).
//! [`read_at`] reads the blocks that cover a record into a buffer from a
//! [`BufPool`] and hands out the record's bytes without a copy.
//!
//! A file system that refuses `O_DIRECT` gets the same aligned transfers
//! through the page cache ([`open`] falls back); tmpfs, for one, accepts the
//! flag and buffers anyway.

use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::mem::MaybeUninit;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

/// Alignment of every direct transfer's offset, length and buffer. 4 KiB
/// suits disks with 512-byte and with 4 KiB logical blocks alike.
pub const ALIGN: usize = 4096;

/// Most bytes a [`Tail`] gathers before they are written: a longer append
/// is written in pieces of this size, so its buffers stay small. Room for
/// several chunks of the default chunking, so that the chunks staged while
/// one batch is written go together in the next.
const STAGE: usize = 2 << 20;

/// How a pack file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// For reading.
    Read,
    /// Created for appending; it must not exist.
    CreateNew,
}

/// A transparent huge page on x86-64 and most arm64 kernels. A buffer of
/// a multiple of this size (a [`Tail`]'s, or a page [`BufPool`] cuts into
/// read buffers) is aligned to it and asks for huge pages: a direct
/// transfer pins the buffer's pages and maps each into its request, and
/// 512 pages of 4 KiB for every 2 MiB cost more than the one page that
/// holds them (see `docs/benchmarks.md`).
const HUGE_PAGE: usize = 2 << 20;

/// Opens `path` for direct I/O if `direct` and the file system allows it,
/// else buffered (the same aligned transfers work either way).
pub fn open(path: &Path, how: Open, direct: bool) -> std::io::Result<File> {
    let options = |flags| {
        let mut options = OpenOptions::new();
        options.read(true).custom_flags(flags);
        if how == Open::CreateNew {
            options.write(true).create_new(true);
        }
        options
    };
    if direct {
        match options(libc::O_DIRECT).open(path) {
            Ok(file) => return Ok(file),
            // The file system has no direct I/O (EINVAL is what Linux
            // answers): buffered, with the same aligned transfers.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::debug!(path = %path.display(), "no direct I/O here: buffered");
            }
            Err(e) => return Err(e),
        }
    }
    options(0).open(path)
}

/// A heap buffer on an [`ALIGN`] boundary, of which the first `len` bytes
/// are initialised. `Vec` cannot be asked for an alignment, so this holds
/// its own allocation; written here rather than taken from an aligned-vector
/// crate because it also tracks the initialised prefix a read fills (so
/// pooled buffers are never zeroed again) and goes back to a [`BufPool`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
    /// The allocation this buffer is a piece of, when it is not its own
    /// ([`AlignedBuf::pieces`]): freed with the last of its pieces.
    slab: Option<Arc<AlignedBuf>>,
}

// SAFETY: the buffer owns its bytes outright, like a `Vec<u8>` (a piece of
// a slab, its own range of it: no two pieces overlap).
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads the initialised bytes.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Room for `cap` bytes (rounded up to [`ALIGN`]), none initialised.
    fn with_capacity(cap: usize) -> AlignedBuf {
        let cap = cap.max(1).next_multiple_of(ALIGN);
        let layout = Self::layout(cap);
        // SAFETY: the layout has a nonzero size.
        let ptr = unsafe { alloc::alloc(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        if cap.is_multiple_of(HUGE_PAGE) {
            // SAFETY: advice on memory this buffer owns, none of it touched
            // yet; an error only means the kernel will not take it.
            unsafe { libc::madvise(ptr.as_ptr().cast(), cap, libc::MADV_HUGEPAGE) };
        }
        AlignedBuf {
            ptr,
            cap,
            len: 0,
            slab: None,
        }
    }

    /// A huge page cut into buffers of `size` bytes (a multiple of
    /// [`ALIGN`]), none initialised, as many as fit.
    fn pieces(size: usize) -> Vec<AlignedBuf> {
        debug_assert!(size.is_multiple_of(ALIGN) && size <= HUGE_PAGE);
        let slab = Arc::new(AlignedBuf::with_capacity(HUGE_PAGE));
        (0..HUGE_PAGE / size)
            .map(|i| AlignedBuf {
                // SAFETY: piece `i` ends at most at the slab's end, and no
                // two pieces overlap; the slab itself is never read or
                // written, only kept alive by its pieces.
                ptr: unsafe { slab.ptr.add(i * size) },
                cap: size,
                len: 0,
                slab: Some(Arc::clone(&slab)),
            })
            .collect()
    }

    /// `cap` zeroed bytes (rounded up to [`ALIGN`]), all initialised.
    fn zeroed(cap: usize) -> AlignedBuf {
        let mut buf = AlignedBuf::with_capacity(cap);
        buf.spare().fill(MaybeUninit::new(0));
        buf.len = buf.cap;
        buf
    }

    fn layout(cap: usize) -> Layout {
        // Only fails for a size near `isize::MAX`, which no chunk or
        // stage comes near.
        let align = if cap.is_multiple_of(HUGE_PAGE) {
            HUGE_PAGE
        } else {
            ALIGN
        };
        Layout::from_size_align(cap, align).unwrap_or_else(|_| panic!("{cap} bytes to align"))
    }

    /// The bytes after the initialised ones.
    fn spare(&mut self) -> &mut [MaybeUninit<u8>] {
        // SAFETY: the allocation holds `cap` bytes, and `MaybeUninit`
        // needs no initialisation.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.ptr.as_ptr().add(self.len).cast(),
                self.cap - self.len,
            )
        }
    }

    /// The initialised bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the first `len` bytes are initialised.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the first `len` bytes are initialised.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // A piece's memory is its slab's, freed with the slab.
        if self.slab.is_none() {
            // SAFETY: allocated in `with_capacity` with this layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
        }
    }
}

/// A zeroed buffer of at least `len` bytes for direct transfers, on huge
/// pages as the tier's own buffers are: for measurements that should move
/// bytes the way the tier does (`strata bench`'s disk references).
pub fn io_buffer(len: usize) -> AlignedBuf {
    AlignedBuf::zeroed(len.max(1).next_multiple_of(HUGE_PAGE))
}

/// Read buffers of one size, big enough for a chunk of the default
/// chunking and the blocks around it, kept for reuse. Fresh buffers cost
/// what this module avoids (first-touch page faults), and allocated on the
/// blocking threads the reads run on they spread over glibc's per-thread
/// arenas, each of which keeps what is freed into it: a sidecar grew from
/// 50 to 160 MB resident over a few warm reads of 1 GiB that way.
///
/// The buffers are cut three to a huge page ([`HUGE_PAGE`]): a direct read
/// into one then pins a single page and lands in one physically contiguous
/// range, where 4 KiB pages made it pin and map 130 of them. Warm reads
/// from the disk tier ran about a third faster that way here, at less CPU
/// (`docs/benchmarks.md`).
pub struct BufPool {
    free: Mutex<Vec<AlignedBuf>>,
    keep: usize,
}

/// The size of a pooled buffer: a third of a huge page, in whole blocks.
const POOLED: usize = HUGE_PAGE / 3 / ALIGN * ALIGN;
// A chunk of the default chunking and the blocks around it fit.
const _: () = assert!(POOLED >= crate::chunkstore::MAX_CHUNK_SIZE as usize + 2 * ALIGN);

impl BufPool {
    /// A pool that keeps up to `keep` buffers of [`POOLED`] bytes.
    pub fn new(keep: usize) -> Arc<BufPool> {
        Arc::new(BufPool {
            free: Mutex::new(Vec::with_capacity(keep)),
            keep,
        })
    }

    /// A buffer for `len` bytes: a pooled one if it fits, else one of its
    /// own (freed, not kept).
    fn take(&self, len: usize) -> AlignedBuf {
        if len <= POOLED {
            if let Some(kept) = self.free().pop() {
                return kept;
            }
            // A fresh huge page: one piece for this read, the others kept
            // for the next ones while there is room.
            let mut pieces = AlignedBuf::pieces(POOLED);
            let buf = pieces.pop().expect("a huge page holds a pooled buffer");
            let mut free = self.free();
            let room = self.keep.saturating_sub(free.len());
            free.extend(pieces.into_iter().take(room));
            buf
        } else {
            AlignedBuf::with_capacity(len)
        }
    }

    /// Keeps `buf` for the next [`BufPool::take`], if it is of the pooled
    /// size and there is room.
    fn give(&self, mut buf: AlignedBuf) {
        if buf.cap == POOLED {
            buf.len = 0;
            let mut free = self.free();
            if free.len() < self.keep {
                free.push(buf);
            }
        }
    }

    /// Buffers kept now.
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.free().len()
    }

    fn free(&self) -> std::sync::MutexGuard<'_, Vec<AlignedBuf>> {
        // A panic while the lock was held left a list of whole buffers.
        self.free.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A buffer that goes back to its pool when the last `Bytes` of it drops.
struct Pooled {
    buf: Option<AlignedBuf>,
    pool: Arc<BufPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], AlignedBuf::as_ref)
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pool.give(buf);
        }
    }
}

/// Reads the `len` bytes at `offset` of a pack: the [`ALIGN`]ed blocks
/// around them, in one positioned read (blocking), into a buffer from
/// `pool`. A pack cut short reads as `UnexpectedEof`.
pub fn read_at(file: &File, offset: u64, len: u32, pool: &Arc<BufPool>) -> std::io::Result<Bytes> {
    let start = offset - offset % ALIGN as u64;
    let skip = (offset - start) as usize;
    let want = skip + len as usize;
    let blocks = want.next_multiple_of(ALIGN);
    let mut buf = pool.take(want);
    while buf.len < want {
        // Whole blocks, from a block boundary: a direct read takes no other.
        let at = start + buf.len as u64;
        let room = blocks - buf.len;
        let read = match rustix::io::pread(file, &mut buf.spare()[..room], at) {
            Ok((init, _)) => init.len(),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                pool.give(buf);
                return Err(e.into());
            }
        };
        buf.len += read;
        // Nothing more, or a read that ended inside a block: the end of
        // the file.
        if buf.len < want && (read == 0 || !buf.len.is_multiple_of(ALIGN)) {
            let got = buf.len.saturating_sub(skip);
            pool.give(buf);
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("a record cut short: {got} of {len} bytes"),
            ));
        }
    }
    let pooled = Pooled {
        buf: Some(buf),
        pool: Arc::clone(pool),
    };
    Ok(Bytes::from_owner(pooled).slice(skip..want))
}

/// The end of a pack open for appending: bytes appended but not yet
/// written, after the bytes since the last [`ALIGN`] boundary, which are
/// kept here and written again with the next write, so that every write is
/// of whole aligned blocks.
///
/// Bytes are written either at once ([`Tail::append`]) or staged
/// ([`Tail::stage`]) and later taken out as a [`Batch`] ([`Tail::take`])
/// that is written without the tail: while one batch is written, the next
/// is staged into a second buffer (see `packs` for why).
pub struct Tail {
    buf: AlignedBuf,
    /// Bytes of `buf` that belong to the pack.
    fill: usize,
    /// The pack offset of `buf`'s first byte, on an [`ALIGN`] boundary.
    at: u64,
    /// The buffer of the last batch written, back for the next.
    spare: Option<AlignedBuf>,
}

/// Bytes taken from a [`Tail`] to be written: whole blocks from an
/// [`ALIGN`] boundary, the last one padded with zeros.
pub struct Batch {
    buf: AlignedBuf,
    /// The pack offset of `buf`'s first byte.
    at: u64,
    /// Bytes to write (whole blocks).
    len: usize,
    /// Bytes that belong to the pack.
    fill: usize,
}

impl Batch {
    /// Writes the batch into `file` (blocking).
    pub fn write(&self, file: &File) -> std::io::Result<()> {
        file.write_all_at(&self.buf.as_ref()[..self.len], self.at)
    }

    /// Where the pack ends once the batch is written.
    pub fn end(&self) -> u64 {
        self.at + self.fill as u64
    }
}

impl Tail {
    /// The tail of an empty pack.
    pub fn new() -> Tail {
        Tail {
            buf: AlignedBuf::zeroed(STAGE),
            fill: 0,
            at: 0,
            spare: None,
        }
    }

    /// The tail of another empty pack, in this one's buffers (fresh pages
    /// cost more than the bytes they hold: see the module's notes).
    pub fn reset(mut self) -> Tail {
        self.fill = 0;
        self.at = 0;
        self
    }

    /// Where the pack ends.
    pub fn end(&self) -> u64 {
        self.at + self.fill as u64
    }

    /// Bytes that can be staged before the tail must be taken.
    pub fn room(&self) -> usize {
        self.buf.len - self.fill
    }

    /// Appends `parts` without writing them, if [`Tail::room`] holds them
    /// all; else stages nothing and returns false.
    pub fn stage(&mut self, parts: &[&[u8]]) -> bool {
        if parts.iter().map(|p| p.len()).sum::<usize>() > self.room() {
            return false;
        }
        for part in parts {
            self.buf.as_mut_slice()[self.fill..self.fill + part.len()].copy_from_slice(part);
            self.fill += part.len();
        }
        true
    }

    /// Takes the bytes since the last write for writing, padded to a
    /// block. The tail goes on from the batch's last block boundary, with
    /// the bytes of its last, partial block (written again by the next
    /// batch: so batches must be written in the order they were taken,
    /// one after another).
    pub fn take(&mut self) -> Batch {
        let padded = self.fill.next_multiple_of(ALIGN);
        let whole = self.fill - self.fill % ALIGN;
        let mut next = self
            .spare
            .take()
            .unwrap_or_else(|| AlignedBuf::zeroed(self.buf.len));
        next.as_mut_slice()[..self.fill - whole]
            .copy_from_slice(&self.buf.as_ref()[whole..self.fill]);
        self.buf.as_mut_slice()[self.fill..padded].fill(0);
        let batch = Batch {
            buf: std::mem::replace(&mut self.buf, next),
            at: self.at,
            len: padded,
            fill: self.fill,
        };
        self.at += whole as u64;
        self.fill -= whole;
        batch
    }

    /// Keeps a written batch's buffer for the next [`Tail::take`].
    pub fn recycle(&mut self, batch: Batch) {
        if batch.buf.len == self.buf.len {
            self.spare = Some(batch.buf);
        }
    }

    /// Appends `parts`, one after another, to `file` (blocking), after
    /// anything staged. When it returns, every byte appended is in the
    /// file, followed by zeros to the next block boundary. After an error
    /// the file holds anything past the old end: [`Tail::rewind`] to it.
    pub fn append(&mut self, file: &File, parts: &[&[u8]]) -> std::io::Result<()> {
        for part in parts {
            let mut rest = *part;
            while !rest.is_empty() {
                let n = self.room().min(rest.len());
                self.stage(&[&rest[..n]]);
                rest = &rest[n..];
                if self.room() == 0 {
                    self.write_staged(file)?;
                }
            }
        }
        if self.fill > 0 {
            self.write_staged(file)?;
        }
        Ok(())
    }

    fn write_staged(&mut self, file: &File) -> std::io::Result<()> {
        let batch = self.take();
        batch.write(file)?;
        self.recycle(batch);
        Ok(())
    }

    /// Cuts `file` back to `end` (at most [`Tail::end`]) and appends on
    /// from there: the bytes of its last block are read back from the
    /// file.
    pub fn rewind(&mut self, file: &File, end: u64) -> std::io::Result<()> {
        file.set_len(end)?;
        let at = end - end % ALIGN as u64;
        let fill = (end - at) as usize;
        if fill > 0 {
            // Into the buffer's first block, which is aligned, as a direct
            // read must be. (Should this fail, the caller seals the pack
            // and the buffer goes with it.)
            let block = &mut self.buf.as_mut_slice()[..ALIGN];
            let read = loop {
                match rustix::io::pread(file, &mut *block, at) {
                    Ok(read) => break read,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(e.into()),
                }
            };
            if read < fill {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("{read} of the last block's {fill} bytes read back"),
                ));
            }
        }
        self.at = at;
        self.fill = fill;
        Ok(())
    }

    /// Writes `last`, the pack's final bytes, and cuts the padding after
    /// them off, so that the file ends where the pack does.
    pub fn finish(&mut self, file: &File, last: &[u8]) -> std::io::Result<()> {
        self.append(file, &[last])?;
        file.set_len(self.end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn new_pack(dir: &Path) -> File {
        open(&dir.join("p"), Open::CreateNew, true).unwrap()
    }

    #[test]
    fn appends_of_any_length_read_back_and_the_file_ends_on_a_block() {
        let dir = tempfile::tempdir().unwrap();
        let file = new_pack(dir.path());
        let pool = BufPool::new(4);
        let mut tail = Tail::new();
        let mut want = Vec::new();
        // Lengths that cross block boundaries, fill a block exactly, and
        // exceed the stage.
        for (i, len) in [8, 36, 4000, 4096, 1, STAGE + 123, 2 * ALIGN, 77]
            .into_iter()
            .enumerate()
        {
            let part = bytes(len, i as u8);
            tail.append(&file, &[&part[..len / 2], &part[len / 2..]])
                .unwrap();
            want.extend_from_slice(&part);
            assert_eq!(tail.end(), want.len() as u64);
            let on_disk = file.metadata().unwrap().len();
            assert_eq!(on_disk, (want.len() as u64).next_multiple_of(ALIGN as u64));
            let reader = open(&dir.path().join("p"), Open::Read, true).unwrap();
            let start = (want.len() - len) as u64;
            assert_eq!(
                read_at(&reader, start, len as u32, &pool).unwrap(),
                &part[..]
            );
        }
        let reader = open(&dir.path().join("p"), Open::Read, true).unwrap();
        assert_eq!(
            read_at(&reader, 0, want.len() as u32, &pool).unwrap(),
            &want[..]
        );
        // The padding reads as zeros.
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut File::open(dir.path().join("p")).unwrap(), &mut raw)
            .unwrap();
        assert!(raw[want.len()..].iter().all(|&b| b == 0));
    }

    #[test]
    fn finish_cuts_the_padding_off() {
        let dir = tempfile::tempdir().unwrap();
        let file = new_pack(dir.path());
        let mut tail = Tail::new();
        tail.append(&file, &[b"strpack\x01"]).unwrap();
        tail.finish(&file, b"the end").unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("p")).unwrap(),
            b"strpack\x01the end"
        );
    }

    #[test]
    fn a_rewind_appends_on_from_where_it_cut() {
        let dir = tempfile::tempdir().unwrap();
        let file = new_pack(dir.path());
        let mut tail = Tail::new();
        let first = bytes(5000, 1);
        tail.append(&file, &[&first]).unwrap();
        tail.append(&file, &[&bytes(3000, 2)]).unwrap();
        tail.rewind(&file, 5000).unwrap();
        assert_eq!(tail.end(), 5000);
        tail.append(&file, &[b"after"]).unwrap();
        let raw = std::fs::read(dir.path().join("p")).unwrap();
        assert_eq!(&raw[..5000], &first[..]);
        assert_eq!(&raw[5000..5005], b"after");
        assert_eq!(raw.len(), 8192);
    }

    #[test]
    fn a_read_past_the_end_is_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        let file = new_pack(dir.path());
        let mut tail = Tail::new();
        tail.finish(&file, &bytes(6000, 3)).unwrap();
        let pool = BufPool::new(4);
        let reader = open(&dir.path().join("p"), Open::Read, true).unwrap();
        assert_eq!(
            read_at(&reader, 5000, 1000, &pool).unwrap(),
            &bytes(6000, 3)[5000..]
        );
        let err = read_at(&reader, 5000, 1001, &pool).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        assert!(err.to_string().contains("1000 of 1001"), "{err}");
        let err = read_at(&reader, 9000, 10, &pool).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn read_buffers_go_back_to_the_pool_up_to_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let file = new_pack(dir.path());
        let data = bytes(3 * POOLED, 4);
        Tail::new().finish(&file, &data).unwrap();
        let reader = open(&dir.path().join("p"), Open::Read, true).unwrap();
        let pool = BufPool::new(2);
        let reads: Vec<Bytes> = (0..3)
            .map(|i| read_at(&reader, 100 + i * 1000, 256 << 10, &pool).unwrap())
            .collect();
        assert_eq!(pool.kept(), 0);
        // A slice keeps its buffer out of the pool until it drops too.
        let slice = reads[0].slice(10..20);
        drop(reads);
        assert_eq!(pool.kept(), 2, "two kept, the third freed");
        drop(slice);
        assert_eq!(pool.kept(), 2);
        // A record larger than a pooled buffer gets one of its own, not kept.
        let big = read_at(&reader, 1, (2 * POOLED) as u32, &pool).unwrap();
        assert_eq!(pool.kept(), 2);
        assert_eq!(big, &data[1..1 + 2 * POOLED]);
        drop(big);
        assert_eq!(pool.kept(), 2);
        // A reused buffer reads what it is asked for, not what it held.
        let again = read_at(&reader, 7, 5000, &pool).unwrap();
        assert_eq!(again, &data[7..5007]);
        assert_eq!(pool.kept(), 1);
        // A failed read hands its buffer back.
        let missing = read_at(&reader, 3 * POOLED as u64 - 10, 100, &pool);
        assert!(missing.is_err());
        assert_eq!(pool.kept(), 1);
    }

    #[test]
    fn the_buffer_is_aligned() {
        for cap in [1, ALIGN, ALIGN + 1, 300_000] {
            let buf = AlignedBuf::with_capacity(cap);
            assert_eq!(buf.ptr.as_ptr() as usize % ALIGN, 0);
            assert!(buf.cap >= cap && buf.cap.is_multiple_of(ALIGN));
        }
    }

    #[test]
    fn pooled_buffers_are_cut_from_one_huge_page_and_outlive_each_other() {
        let count = HUGE_PAGE / POOLED;
        assert_eq!(count, 3);
        let pool = BufPool::new(8);
        let mut bufs = vec![pool.take(1)];
        assert_eq!(pool.kept(), count - 1, "the rest of the page is kept");
        bufs.extend((1..count).map(|_| pool.take(POOLED)));
        assert_eq!(pool.kept(), 0);
        let base = bufs.iter().map(|b| b.ptr.as_ptr() as usize).min().unwrap();
        assert_eq!(base % HUGE_PAGE, 0);
        let mut starts: Vec<usize> = bufs
            .iter()
            .map(|b| b.ptr.as_ptr() as usize - base)
            .collect();
        starts.sort_unstable();
        assert_eq!(starts, (0..count).map(|i| i * POOLED).collect::<Vec<_>>());
        // Each piece holds its own bytes, and keeps the page alive alone.
        for (i, buf) in bufs.iter_mut().enumerate() {
            buf.spare().fill(MaybeUninit::new(i as u8 + 1));
            buf.len = buf.cap;
        }
        let last = bufs.pop().unwrap();
        drop(bufs);
        assert!(last.as_ref().iter().all(|&b| b == count as u8));
        // A buffer of its own is not cut from a page.
        assert!(pool.take(POOLED + 1).slab.is_none());
    }

    #[test]
    fn a_tail_buffer_sits_on_a_huge_page_boundary() {
        for cap in [HUGE_PAGE, STAGE, 2 * HUGE_PAGE] {
            let buf = AlignedBuf::zeroed(cap);
            assert_eq!(buf.ptr.as_ptr() as usize % HUGE_PAGE, 0, "{cap}");
            assert!(buf.as_ref().iter().all(|&b| b == 0));
        }
        // Smaller buffers keep the block alignment alone.
        let small = AlignedBuf::with_capacity(HUGE_PAGE - ALIGN);
        assert_eq!(AlignedBuf::layout(small.cap).align(), ALIGN);
    }
}
