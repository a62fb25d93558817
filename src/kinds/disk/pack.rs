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
//! Nothing here is trusted: a record's bytes are checked against its digest
//! whenever they are read, and [`scan`] stops at the first record that is
//! cut short or cannot be one, which is where a crash or a full disk left
//! off.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

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

/// The name of pack `id`.
pub fn file_name(id: u64) -> String {
    format!("{id:016x}")
}

/// The id in a pack's name, if `name` is one.
pub fn parse_name(name: &str) -> Option<u64> {
    if name.len() != 16 || !name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u64::from_str_radix(name, 16).ok()
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
    /// cut short, or garbage.
    pub valid_len: u64,
}

/// Lists the records of `file`, reading only their headers.
pub fn scan(file: &File) -> std::io::Result<Scanned> {
    let len = file.metadata()?.len();
    let mut magic = [0; MAGIC.len()];
    if len < MAGIC_LEN || file.read_exact_at(&mut magic, 0).is_err() || magic != MAGIC {
        return Ok(Scanned::default());
    }
    let mut scanned = Scanned {
        records: Vec::new(),
        valid_len: MAGIC_LEN,
    };
    let mut header = [0; RECORD_HEADER_LEN as usize];
    let mut pos = MAGIC_LEN;
    while pos + RECORD_HEADER_LEN <= len {
        file.read_exact_at(&mut header, pos)?;
        let (digest, record_len) = header.split_at(32);
        let record_len = u32::from_le_bytes(record_len.try_into().unwrap_or_default());
        let end = pos + RECORD_HEADER_LEN + u64::from(record_len);
        if record_len == 0 || record_len > MAX_RECORD || end > len {
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

/// Reads the `len` bytes at `offset` of the pack at `path`.
pub fn read_at(path: &Path, offset: u64, len: u32) -> std::io::Result<Bytes> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    // `read_to_end` into reserved room fills it without zeroing it first.
    let mut data = Vec::with_capacity(len as usize);
    (&mut file).take(u64::from(len)).read_to_end(&mut data)?;
    if data.len() != len as usize {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("{}: a record cut short", path.display()),
        ));
    }
    Ok(data.into())
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

    fn scan_bytes(bytes: &[u8]) -> Scanned {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(bytes).unwrap();
        scan(&file).unwrap()
    }

    #[test]
    fn names_round_trip_and_nothing_else_parses() {
        assert_eq!(parse_name(&file_name(0x2a)), Some(0x2a));
        assert_eq!(parse_name(&file_name(u64::MAX)), Some(u64::MAX));
        for name in [
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
        assert_eq!(read_at(&path, beta.offset, beta.len).unwrap(), &b"beta"[..]);
        let err = read_at(&path, beta.offset, beta.len + 1).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
