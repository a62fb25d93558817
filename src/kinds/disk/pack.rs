//! The pack file: how the `disk` tier lays chunks out on disk.
//!
//! Chunks are appended to a few large files, *packs*, instead of getting a
//! file each. A file per chunk means an inode allocated for every 256 KiB
//! written and one freed for every 256 KiB evicted. On ext4 that was the
//! costliest part of a fill: without a journal, its inode allocator passes
//! over inodes freed in the last minute or five, one lookup each, and a
//! cache that evicts as it fills frees them all the time (see
//! `docs/storage-layout.md`).
//!
//! A pack is the file `packs/<id>`, its id as 16 lowercase hex digits. It
//! starts with [`MAGIC`], then holds records one after another: the
//! chunk's BLAKE3 digest (32 bytes), its length (4 bytes, little-endian),
//! then its bytes, uncompressed. Records are only ever appended; a pack is
//! never rewritten (only cut back to its last whole record, after a failed
//! write or a crash) and is deleted whole.
//!
//! A sealed pack ends with a *table of contents*: one more record, named
//! [`TOC_MARKER`] instead of a digest, listing the digest and length of
//! every record before it, then a BLAKE3 checksum of the list and a
//! footer (the record's own offset, then [`TOC_MAGIC`]). The store reads
//! it at start-up instead of every record's header, which on a cold disk
//! is a random read per chunk: 2.4 s for 40,000 chunks of 256 KiB here,
//! a minute for a quarter of a terabyte. A pack without one (the pack that
//! was open at a crash, or one whose table failed its checks) is scanned
//! header by header, as before, and gets one then.
//!
//! Nothing here is trusted: a record's bytes are checked against its digest
//! whenever they are read, a table is used only if its checksum holds and
//! its lengths add up to where it starts, and [`scan`] stops at the first
//! record that is cut short or cannot be one, which is where a crash or a
//! full disk left off.

use std::fs::File;
use std::os::unix::fs::FileExt;

use bytes::Bytes;

use crate::digest::B3Digest;

/// First bytes of every pack; the last one is the format's version.
pub const MAGIC: [u8; 8] = *b"strpack\x01";

/// Length of [`MAGIC`]: the offset of a pack's first record.
pub const MAGIC_LEN: u64 = MAGIC.len() as u64;

/// Length of the digest and length in front of every record's bytes.
pub const RECORD_HEADER_LEN: u64 = 36;

/// The longest record [`scan`] accepts. FastCDC as configured never cuts a
/// chunk over 16 MiB, whatever the average; a longer length is garbage.
pub const MAX_RECORD: u32 = 16 << 20;

/// What a table of contents is named instead of a digest.
pub const TOC_MARKER: [u8; 32] = *b"strata pack: table of contents\0\0";

/// Last bytes of a pack that ends with a table of contents.
pub const TOC_MAGIC: [u8; 8] = *b"strtoc\x01\0";

/// Bytes of a table of contents after its list: the checksum, then the
/// footer (the table's offset, [`TOC_MAGIC`]).
const TOC_TAIL_LEN: usize = 32 + 8 + TOC_MAGIC.len();

/// Bytes per record in a table of contents: digest and length.
const TOC_ENTRY_LEN: usize = 36;

/// Most records a table of contents lists: one that would be longer than
/// any record may be is not written (such a pack is scanned instead).
pub const MAX_TOC_ENTRIES: usize = (MAX_RECORD as usize - TOC_TAIL_LEN) / TOC_ENTRY_LEN;

/// The name of pack `id`.
pub fn file_name(id: u64) -> String {
    format!("{id:016x}")
}

/// Pack ids stay below this. Ids count up from 0, one per pack, so the
/// store never gets near it; a file named above it is not one of its packs,
/// and taken for one it would make the next id overflow.
pub const MAX_ID: u64 = 1 << 62;

/// The id in a pack's name, if `name` is one.
pub fn parse_name(name: &str) -> Option<u64> {
    if name.len() != 16 || !name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u64::from_str_radix(name, 16).ok().filter(|&id| id < MAX_ID)
}

/// The bytes in front of a record of `len` bytes named `digest`.
pub fn record_header(digest: &B3Digest, len: u32) -> [u8; RECORD_HEADER_LEN as usize] {
    let mut out = [0; RECORD_HEADER_LEN as usize];
    out[..32].copy_from_slice(digest.as_bytes());
    out[32..].copy_from_slice(&len.to_le_bytes());
    out
}

/// Where a record's bytes are in its pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// The digest its header names (not checked by [`scan`]).
    pub digest: B3Digest,
    /// Offset of its bytes, past its header.
    pub offset: u64,
    /// Its length.
    pub len: u32,
}

/// What [`scan`] found in a pack.
#[derive(Debug, Default)]
pub struct Scanned {
    /// The whole records, in file order.
    pub records: Vec<Record>,
    /// Length of the pack up to the end of its last whole record, or 0 if
    /// it does not even start with [`MAGIC`]. Anything past it is a record
    /// cut short, or garbage (an unsound table of contents among them).
    pub valid_len: u64,
    /// Whether the records came from a sound table of contents, which
    /// `valid_len` includes.
    pub has_toc: bool,
}

/// The table of contents (a whole record) for a pack whose `records`
/// (digest, length) end at offset `at`, where it goes.
pub fn toc(records: &[(B3Digest, u32)], at: u64) -> Vec<u8> {
    let data_len = records.len() * TOC_ENTRY_LEN + TOC_TAIL_LEN;
    let mut out = Vec::with_capacity(RECORD_HEADER_LEN as usize + data_len);
    out.extend_from_slice(&TOC_MARKER);
    // At most MAX_TOC_ENTRIES entries: below MAX_RECORD.
    out.extend_from_slice(&u32::try_from(data_len).unwrap_or(u32::MAX).to_le_bytes());
    for (digest, len) in records {
        out.extend_from_slice(digest.as_bytes());
        out.extend_from_slice(&len.to_le_bytes());
    }
    let footer = footer(at);
    let list = &out[RECORD_HEADER_LEN as usize..];
    let checksum = toc_checksum(list, &footer);
    out.extend_from_slice(checksum.as_bytes());
    out.extend_from_slice(&footer);
    out
}

fn footer(at: u64) -> [u8; 16] {
    let mut footer = [0; 16];
    footer[..8].copy_from_slice(&at.to_le_bytes());
    footer[8..].copy_from_slice(&TOC_MAGIC);
    footer
}

fn toc_checksum(list: &[u8], footer: &[u8]) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(list);
    hasher.update(footer);
    hasher.finalize()
}

/// Appends the table of contents of `records`, which end at `at`, to
/// `file` (cut back to `at` first). Returns the bytes it added: none if
/// the write failed (a full disk), in which case the pack is left as it
/// was and is scanned at start-up.
pub fn append_toc(file: &File, records: &[(B3Digest, u32)], at: u64) -> u64 {
    let table = toc(records, at);
    let written = file
        .set_len(at)
        .and_then(|()| file.write_all_at(&table, at));
    match written {
        Ok(()) => table.len() as u64,
        Err(e) => {
            tracing::debug!(error = %e, "no table of contents for a pack");
            let _ = file.set_len(at);
            0
        }
    }
}

/// Lists the records of `file`: from its table of contents if it ends with
/// a sound one, else by [`scan`]ning their headers.
pub fn records(file: &File) -> std::io::Result<Scanned> {
    match read_toc(file)? {
        Some(scanned) => Ok(scanned),
        None => scan(file),
    }
}

/// The records a pack's table of contents lists, if the pack starts with
/// [`MAGIC`] and ends with a table whose checksum holds and whose lengths
/// end where it starts: three reads, whatever the number of records.
fn read_toc(file: &File) -> std::io::Result<Option<Scanned>> {
    let len = file.metadata()?.len();
    let smallest = MAGIC_LEN + RECORD_HEADER_LEN + TOC_TAIL_LEN as u64;
    if len < smallest {
        return Ok(None);
    }
    let mut footer = [0; 16];
    file.read_exact_at(&mut footer, len - 16)?;
    let at = u64::from_le_bytes(footer[..8].try_into().unwrap_or_default());
    if footer[8..] != TOC_MAGIC
        || at < MAGIC_LEN
        || at > len - smallest + MAGIC_LEN
        || len - at > RECORD_HEADER_LEN + u64::from(MAX_RECORD)
    {
        return Ok(None);
    }
    let mut table = vec![0; (len - at) as usize];
    file.read_exact_at(&mut table, at)?;
    let (header, data) = table.split_at(RECORD_HEADER_LEN as usize);
    let data_len = u32::from_le_bytes(header[32..].try_into().unwrap_or_default());
    let mut magic = [0; MAGIC.len()];
    file.read_exact_at(&mut magic, 0)?;
    if header[..32] != TOC_MARKER
        || data_len as usize != data.len()
        || !(data.len() - TOC_TAIL_LEN).is_multiple_of(TOC_ENTRY_LEN)
        || magic != MAGIC
    {
        return Ok(None);
    }
    let (list, tail) = data.split_at(data.len() - TOC_TAIL_LEN);
    let (checksum, footer) = tail.split_at(32);
    if toc_checksum(list, footer).as_bytes() != checksum {
        return Ok(None);
    }
    let mut records = Vec::with_capacity(list.len() / TOC_ENTRY_LEN);
    let mut pos = MAGIC_LEN;
    for entry in list.chunks_exact(TOC_ENTRY_LEN) {
        let (digest, record_len) = entry.split_at(32);
        let record_len = u32::from_le_bytes(record_len.try_into().unwrap_or_default());
        let Ok(digest) = B3Digest::try_from(digest) else {
            return Ok(None);
        };
        if record_len == 0 || record_len > MAX_RECORD {
            return Ok(None);
        }
        records.push(Record {
            digest,
            offset: pos + RECORD_HEADER_LEN,
            len: record_len,
        });
        pos += RECORD_HEADER_LEN + u64::from(record_len);
    }
    Ok((pos == at).then_some(Scanned {
        records,
        valid_len: len,
        has_toc: true,
    }))
}

/// Lists the records of `file`, reading only their headers. A table of
/// contents is not a chunk's record: the scan stops at one (it is the last
/// record of a pack, and [`records`] found it unsound).
pub fn scan(file: &File) -> std::io::Result<Scanned> {
    let len = file.metadata()?.len();
    let mut magic = [0; MAGIC.len()];
    if len < MAGIC_LEN || file.read_exact_at(&mut magic, 0).is_err() || magic != MAGIC {
        return Ok(Scanned::default());
    }
    let mut scanned = Scanned {
        records: Vec::new(),
        valid_len: MAGIC_LEN,
        has_toc: false,
    };
    let mut header = [0; RECORD_HEADER_LEN as usize];
    let mut pos = MAGIC_LEN;
    while pos + RECORD_HEADER_LEN <= len {
        file.read_exact_at(&mut header, pos)?;
        let (digest, record_len) = header.split_at(32);
        let record_len = u32::from_le_bytes(record_len.try_into().unwrap_or_default());
        let end = pos + RECORD_HEADER_LEN + u64::from(record_len);
        if digest == TOC_MARKER || record_len == 0 || record_len > MAX_RECORD || end > len {
            break;
        }
        let Ok(digest) = B3Digest::try_from(digest) else {
            break;
        };
        scanned.records.push(Record {
            digest,
            offset: pos + RECORD_HEADER_LEN,
            len: record_len,
        });
        pos = end;
        scanned.valid_len = end;
    }
    Ok(scanned)
}

/// Reads the `len` bytes at `offset` of a pack, waiting for the disk if
/// it must. A positioned read, so one handle serves every thread.
pub fn read_at(file: &File, offset: u64, len: u32) -> std::io::Result<Bytes> {
    let len = len as usize;
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        let got = data.len();
        // Into the reserved room, which is not zeroed first.
        let read = match rustix::io::pread(
            file,
            rustix::buffer::spare_capacity(&mut data),
            offset + got as u64,
        ) {
            Ok(read) => read,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if read == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("a record cut short: {got} of {len} bytes"),
            ));
        }
    }
    Ok(data.into())
}

/// The `len` bytes at `offset` of a pack if the page cache holds all of
/// them, read without waiting for the disk, so that an async task may call
/// it: `Ok(None)` if any page would have to come from the disk, or the
/// read failed otherwise. An error only if the kernel cannot read without
/// waiting: `RWF_NOWAIT` is Linux 4.14 and later, and not every file
/// system has it (tmpfs has not). The caller reads in a blocking task
/// instead.
///
/// Calls `preadv2` through libc, not rustix: rustix's takes initialised
/// buffers, and zeroing each chunk's buffer first was 6% of a warm read's
/// CPU in the sidecar.
#[cfg(target_os = "linux")]
pub fn read_cached(file: &File, offset: u64, len: u32) -> std::io::Result<Option<Bytes>> {
    use std::os::fd::AsRawFd;
    let len = len as usize;
    let offset = libc::off_t::try_from(offset).map_err(std::io::Error::other)?;
    let mut data = Vec::<u8>::with_capacity(len);
    let iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: len,
    };
    // SAFETY: `iov` describes the `len` bytes `data` reserved, which stay
    // allocated and otherwise untouched during the call; the kernel writes
    // at most `iov_len` bytes into them. `file` is an open descriptor.
    let read = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) };
    let Ok(read) = usize::try_from(read) else {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            // The kernel or the file system cannot read without waiting.
            Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS) => Err(e),
            // `EAGAIN`: not all cached. Anything else, a failing disk say,
            // the blocking read meets again and reports.
            _ => Ok(None),
        };
    };
    // A short read: some of it is not cached (or the pack was cut short).
    if read != len {
        return Ok(None);
    }
    // SAFETY: the kernel initialised all `len` reserved bytes.
    unsafe { data.set_len(len) };
    Ok(Some(data.into()))
}

/// Without `RWF_NOWAIT`, every read waits in a blocking task.
#[cfg(not(target_os = "linux"))]
pub fn read_cached(_file: &File, _offset: u64, _len: u32) -> std::io::Result<Option<Bytes>> {
    Err(std::io::ErrorKind::Unsupported.into())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn pack_of(records: &[&[u8]]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        for data in records {
            out.extend_from_slice(&record_header(&B3Digest::of(data), data.len() as u32));
            out.extend_from_slice(data);
        }
        out
    }

    /// A file holding `bytes`.
    fn file_of(bytes: &[u8]) -> File {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(bytes).unwrap();
        file
    }

    fn scan_bytes(bytes: &[u8]) -> Scanned {
        scan(&file_of(bytes)).unwrap()
    }

    #[test]
    fn names_round_trip_and_nothing_else_parses() {
        assert_eq!(parse_name(&file_name(0x2a)), Some(0x2a));
        assert_eq!(parse_name(&file_name(MAX_ID - 1)), Some(MAX_ID - 1));
        for name in [
            "ffffffffffffffff",
            "2a",
            "000000000000002A",
            "00000000000000zz",
            ".tmp-1-2",
            "000000000000002a0",
        ] {
            assert_eq!(parse_name(name), None, "{name}");
        }
    }

    #[test]
    fn scan_lists_whole_records_and_stops_where_one_is_cut_short() {
        let whole = pack_of(&[b"first chunk", b"second", b"third one"]);
        let scanned = scan_bytes(&whole);
        assert_eq!(scanned.valid_len, whole.len() as u64);
        let digests: Vec<_> = scanned.records.iter().map(|r| r.digest).collect();
        assert_eq!(
            digests,
            [b"first chunk".as_slice(), b"second", b"third one"].map(B3Digest::of)
        );
        assert_eq!(&whole[scanned.records[1].offset as usize..][..6], b"second");

        let two = pack_of(&[b"first chunk", b"second"]).len();
        // Cut anywhere inside the third record: the first two remain.
        for cut in two..whole.len() {
            let scanned = scan_bytes(&whole[..cut]);
            assert_eq!(scanned.records.len(), 2, "cut at {cut}");
            assert_eq!(scanned.valid_len, two as u64);
        }
        // Zeros where a header should be (a file system that lost a write).
        let mut zeroed = pack_of(&[b"first chunk"]);
        zeroed.extend_from_slice(&[0; 64]);
        assert_eq!(scan_bytes(&zeroed).records.len(), 1);
        // A length no chunk has.
        let mut huge = pack_of(&[b"first chunk"]);
        huge.extend_from_slice(&record_header(&B3Digest::of(b"x"), MAX_RECORD + 1));
        huge.extend_from_slice(&vec![0; MAX_RECORD as usize + 1]);
        assert_eq!(scan_bytes(&huge).records.len(), 1);
    }

    /// `records` as a pack ending with its table of contents; and where
    /// the table starts.
    fn pack_with_toc(records: &[&[u8]]) -> (Vec<u8>, usize) {
        let mut out = pack_of(records);
        let at = out.len();
        let listed: Vec<_> = records
            .iter()
            .map(|data| (B3Digest::of(data), data.len() as u32))
            .collect();
        out.extend_from_slice(&toc(&listed, at as u64));
        (out, at)
    }

    fn records_of(bytes: &[u8]) -> Scanned {
        records(&file_of(bytes)).unwrap()
    }

    #[test]
    fn a_table_of_contents_lists_what_a_scan_finds() {
        let chunks: [&[u8]; 3] = [b"first chunk", b"second", b"third one"];
        let (whole, at) = pack_with_toc(&chunks);
        let listed = records_of(&whole);
        assert!(listed.has_toc);
        assert_eq!(listed.valid_len, whole.len() as u64);
        let scanned = scan_bytes(&whole);
        assert!(!scanned.has_toc);
        assert_eq!(scanned.valid_len, at as u64, "the scan stops at the table");
        assert_eq!(listed.records, scanned.records);
        let one = pack_with_toc(&[b"x"]).0;
        assert_eq!(records_of(&one).records.len(), 1);
    }

    #[test]
    fn a_damaged_or_cut_table_of_contents_is_passed_over_for_a_scan() {
        let chunks: [&[u8]; 3] = [b"first chunk", b"second", b"third one"];
        let (whole, at) = pack_with_toc(&chunks);
        let want = scan_bytes(&whole).records;
        for i in at..whole.len() {
            let mut damaged = whole.clone();
            damaged[i] ^= 0x20;
            let got = records_of(&damaged);
            assert!(!got.has_toc, "byte {i} flipped");
            if i < at + 32 {
                // No longer named as a table: a record with a wrong digest
                // (reading it fails its check).
                assert_eq!(got.records[..3], want[..], "byte {i} flipped");
                assert_eq!(got.records.len(), 4, "byte {i} flipped");
            } else {
                assert_eq!(got.records, want, "byte {i} flipped");
                assert_eq!(got.valid_len, at as u64, "byte {i} flipped");
            }
        }
        for cut in at..whole.len() {
            let got = records_of(&whole[..cut]);
            assert!(!got.has_toc, "cut at {cut}");
            assert_eq!(got.records, want, "cut at {cut}");
            assert_eq!(got.valid_len, at as u64, "cut at {cut}");
        }
        // Lengths that do not end where the table starts, checksum and all.
        let mut short = pack_of(&chunks);
        let listed = [(B3Digest::of(b"first chunk"), 11)];
        short.extend_from_slice(&toc(&listed, short.len() as u64));
        let got = records_of(&short);
        assert!(!got.has_toc);
        assert_eq!(got.records, want);
    }

    #[test]
    fn a_file_without_the_magic_has_no_records() {
        assert_eq!(scan_bytes(b"").valid_len, 0);
        assert_eq!(scan_bytes(b"strpa").valid_len, 0);
        let mut other = pack_of(&[b"chunk"]);
        other[7] = 2;
        let scanned = scan_bytes(&other);
        assert_eq!((scanned.valid_len, scanned.records.len()), (0, 0));
    }

    #[test]
    fn records_read_back_by_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(file_name(1));
        std::fs::write(&path, pack_of(&[b"alpha", b"beta"])).unwrap();
        let file = File::open(&path).unwrap();
        let records = scan(&file).unwrap().records;
        let beta = records[1];
        assert_eq!(read_at(&file, beta.offset, beta.len).unwrap(), &b"beta"[..]);
        let err = read_at(&file, beta.offset, beta.len + 1).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        // Just written, so in the page cache, unless the file system
        // cannot tell (tmpfs).
        match read_cached(&file, beta.offset, beta.len) {
            Ok(read) => {
                assert_eq!(read.as_deref(), Some(&b"beta"[..]));
                let cut = read_cached(&file, beta.offset, beta.len + 1).unwrap();
                assert_eq!(cut, None);
            }
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "{e}"),
        }
        // Any other failure (here `EBADF`: a handle not open for reading)
        // is left to the blocking read, which reports it.
        let write_only = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        assert_eq!(
            read_cached(&write_only, beta.offset, beta.len).unwrap(),
            None
        );
    }
}
