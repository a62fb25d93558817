//! Unit tests of the `disk` tier.

use std::os::unix::fs::FileExt;

use bytes::Bytes;
use tokio::io::AsyncReadExt;

use super::*;
use crate::testkit::pseudo_random;
use crate::verify::{STORED_SHIFT, bao::outboard_of};

use super::pack;

async fn open(dir: &Path, max_size: u64) -> ChunkedBlobService<DiskStore> {
    ChunkedBlobService::new(DiskStore::open(dir.into(), max_size).await.unwrap())
}

/// A store with direct I/O for packs only if `direct_io`.
async fn open_with(dir: &Path, max_size: u64, direct_io: bool) -> ChunkedBlobService<DiskStore> {
    let metrics = TierMetrics::detached("disk");
    let store = DiskStore::open_with_metrics(dir.into(), max_size, direct_io, metrics);
    ChunkedBlobService::new(store.await.unwrap())
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

/// A blob whose outboard is too large to be kept in its index file.
const LARGE: usize = 6 << 20;

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

/// Bytes of the files under `dir`, the store's directory, as the store
/// accounts them: the open pack up to its last record, without the zeros
/// that pad its file to the next block.
fn stored_bytes(store: &DiskStore, dir: &Path) -> u64 {
    let padding = match store.packs.open_pack() {
        Some((id, len)) => {
            let on_disk = std::fs::metadata(store.packs.path(id)).unwrap().len();
            assert_eq!(on_disk, padded(len), "pack {id}");
            on_disk - len
        }
        None => 0,
    };
    du(dir) - padding
}

/// The length of the open pack's file when the pack is `len` bytes long.
fn padded(len: u64) -> u64 {
    len.next_multiple_of(direct::ALIGN as u64)
}

/// A Put in pieces the way HTTP/2 clients cut theirs (a 1 MiB frame and
/// a few bytes, a run of small frames): each chunk reaches the tier in as
/// many pieces as it spans, is packed from them, and reads back whole.
#[tokio::test]
async fn a_chunk_put_in_many_pieces_is_packed_whole() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path(), 1 << 30).await;
    let blob = pseudo_random(5 << 20, 31);
    let mut w = svc.open_write().await.unwrap();
    let mut rest = &blob[..];
    for &size in [1 << 20, 10, 3, 300_000, 16_384, 16_384, 9].iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (piece, after) = rest.split_at(size.min(rest.len()));
        w.write(Bytes::copy_from_slice(piece)).await.unwrap();
        rest = after;
    }
    let put = w.close().await.unwrap();
    assert_eq!(put.digest, B3Digest::of(&blob));
    // The chunks a whole-blob cut gives.
    let cutter = crate::chunkstore::Cutter::new(Default::default());
    let mut cuts = Vec::new();
    let mut at = 0;
    while at < blob.len() {
        let len = cutter.cut(&blob[at..]);
        cuts.push(len as u64);
        at += len;
    }
    assert_eq!(put.chunks.iter().map(|c| c.size).collect::<Vec<_>>(), cuts);
    let mut offset = 0;
    for chunk in &put.chunks {
        let stored = svc.store().get_chunk(&chunk.digest).await.unwrap();
        let want = &blob[offset..offset + chunk.size as usize];
        assert_eq!(stored.as_deref(), Some(want), "chunk at {offset}");
        offset += chunk.size as usize;
    }
    assert!(read_all(&svc, &put.digest).await == blob);
}

#[tokio::test]
async fn the_outboard_is_stored_apart_from_the_chunk_list() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path(), 1 << 30).await;
    let blob = pseudo_random(LARGE, 1);
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
    assert_eq!(
        svc.store().used_bytes(),
        stored_bytes(svc.store(), dir.path())
    );
}

#[tokio::test]
async fn a_small_outboard_is_kept_in_the_index_file() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path(), 1 << 30).await;
    let blob = pseudo_random(1 << 20, 20);
    let digest = put(&svc, &blob).await;
    let expected = outboard_of(&blob, STORED_SHIFT).1;
    assert!(expected.data().len() <= INLINE_OUTBOARD_MAX);

    assert!(!file(dir.path(), ObjectKey::Outboard(digest)).exists());
    let stored = std::fs::read(file(dir.path(), ObjectKey::Index(digest))).unwrap();
    let index = BlobIndex::decode(&digest, &stored).unwrap();
    assert!(index.chunks.len() >= 2);
    assert_eq!(index.bao, Some((STORED_SHIFT, expected.data().clone())));
    assert_eq!(svc.outboard(&digest).await.unwrap(), Some(expected.clone()));
    assert_eq!(
        svc.store().used_bytes(),
        stored_bytes(svc.store(), dir.path())
    );

    // After a restart it comes with the chunk list the Stat read.
    assert!(svc.stat(&digest).await.unwrap().is_some());
    drop(svc);
    let svc = open(dir.path(), 1 << 30).await;
    assert!(svc.stat(&digest).await.unwrap().is_some());
    assert_eq!(svc.outboard(&digest).await.unwrap(), Some(expected));
    assert!(read_all(&svc, &digest).await == blob);
}

#[tokio::test]
async fn stat_and_read_leave_the_outboard_file_unread() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path(), 1 << 30).await;
    let blob = pseudo_random(LARGE, 2);
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
    let blob = pseudo_random(LARGE, 3);
    let digest = put(&svc, &blob).await;
    std::fs::remove_file(file(dir.path(), ObjectKey::Outboard(digest))).unwrap();

    assert_eq!(svc.outboard(&digest).await.unwrap(), None);
    assert!(
        !svc.store()
            .index
            .contains_key(&Entry::File(ObjectKey::Outboard(digest)))
    );
    assert!(svc.stat(&digest).await.unwrap().is_some());
    assert!(read_all(&svc, &digest).await == blob);

    // A damaged one is ignored and removed.
    let digest = put(&svc, &pseudo_random(LARGE, 4)).await;
    let ob = file(dir.path(), ObjectKey::Outboard(digest));
    std::fs::write(&ob, b"\x07\x04 not an outboard").unwrap();
    assert_eq!(svc.outboard(&digest).await.unwrap(), None);
    assert!(!ob.exists());
    assert!(svc.stat(&digest).await.unwrap().is_some());
}

#[tokio::test]
async fn an_index_with_the_outboard_inside_still_yields_it() {
    let dir = tempfile::tempdir().unwrap();
    let blob = pseudo_random(LARGE, 5);
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
    let blob = pseudo_random(LARGE, 6);
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
    assert_eq!(
        svc.store().used_bytes(),
        stored_bytes(svc.store(), dir.path())
    );
    assert!(
        svc.store()
            .index
            .contains_key(&Entry::File(ObjectKey::Outboard(digest)))
    );
    assert_eq!(
        svc.outboard(&digest).await.unwrap(),
        Some(outboard_of(&blob, STORED_SHIFT).1)
    );
    assert!(svc.stat(&orphan_digest).await.unwrap().is_none());
    assert_eq!(svc.outboard(&orphan_digest).await.unwrap(), None);

    // Fill the cache with other blobs, half as much again as it holds:
    // the orphan goes in its turn.
    let max = 8 << 20;
    drop(svc);
    let svc = open(dir.path(), max).await;
    for seed in 10..16 {
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
    // (Asked of the pack map: `holds` would count as a use of the chunk.)
    while svc.store().packs.contains(&first) {
        assert!(seed < 60, "the first chunk is never evicted");
        put(&svc, &pseudo_random(1 << 20, seed)).await;
        seed += 1;
        let _ = svc
            .store()
            .index
            .get(&Entry::File(ObjectKey::Index(digest)));
    }
    assert!(
        svc.store()
            .index
            .contains_key(&Entry::File(ObjectKey::Index(digest)))
    );
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

/// Pack files under `dir`, by name.
fn packs_in(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    out.sort();
    out
}

/// Where the table of contents at the end of the pack at `path` starts,
/// if there is one.
fn toc_offset(path: &Path) -> Option<u64> {
    let bytes = std::fs::read(path).unwrap();
    let footer = &bytes[bytes.len().checked_sub(16)?..];
    (footer[8..] == pack::TOC_MAGIC).then(|| u64::from_le_bytes(footer[..8].try_into().unwrap()))
}

#[tokio::test]
async fn chunks_go_to_packs_sealed_at_their_target() {
    let dir = tempfile::tempdir().unwrap();
    let max = 64 << 20;
    let target = pack_target(max);
    assert_eq!(target, 2 << 20);
    let svc = open(dir.path(), max).await;
    let mut blobs = Vec::new();
    for seed in 40..43 {
        let blob = pseudo_random(5 << 20, seed);
        blobs.push((put(&svc, &blob).await, blob));
    }
    assert!(!dir.path().join("chunks").exists());
    let packs = packs_in(dir.path());
    // 15 MiB in packs of at most 2 MiB, the last one still open.
    assert!(packs.len() >= 8, "{} packs", packs.len());
    let (open_id, open_len) = svc.store().packs.open_pack().unwrap();
    for path in &packs {
        let len = std::fs::metadata(path).unwrap().len();
        let id = pack::parse_name(path.file_name().unwrap().to_str().unwrap()).unwrap();
        if id == open_id {
            assert_eq!(len, padded(open_len));
            assert!(
                open_len <= target,
                "{} holds {open_len} bytes",
                path.display()
            );
        } else {
            // Records up to the target, then the table of contents.
            let records_end = toc_offset(path).expect("a sealed pack has a table of contents");
            assert!(
                records_end <= target,
                "{} holds {records_end} bytes",
                path.display()
            );
            assert_eq!(svc.store().index.get(&Entry::Pack(id)), Some(len));
        }
    }
    let stored = stored_chunks(dir.path()).unwrap();
    for c in &stored {
        assert_eq!(B3Digest::of(&c.data), c.digest);
        assert!(svc.store().holds(&c.digest));
    }
    assert_eq!(
        svc.store().used_bytes(),
        stored_bytes(svc.store(), dir.path())
    );

    // The same after a restart, which gives the pack that was open its
    // table of contents, and appends to a new pack.
    drop(svc);
    let svc = open(dir.path(), max).await;
    assert_eq!(svc.store().packs.open_pack(), None);
    for path in &packs {
        assert!(toc_offset(path).is_some(), "{}", path.display());
    }
    for (digest, blob) in &blobs {
        assert!(read_all(&svc, digest).await == *blob);
    }
    put(&svc, &pseudo_random(1 << 20, 43)).await;
    let (new_id, _) = svc.store().packs.open_pack().unwrap();
    assert!(new_id > open_id);
    assert_eq!(
        svc.store().used_bytes(),
        stored_bytes(svc.store(), dir.path())
    );
}

#[tokio::test]
async fn a_damaged_table_of_contents_is_rebuilt_from_a_scan() {
    let dir = tempfile::tempdir().unwrap();
    let max = 64 << 20;
    let svc = open(dir.path(), max).await;
    let blob = pseudo_random(5 << 20, 44);
    let digest = put(&svc, &blob).await;
    drop(svc);
    // Every pack has its table now (the open one got it at the restart
    // in `open`); damage one in the middle of its list.
    let svc = open(dir.path(), max).await;
    drop(svc);
    let path = packs_in(dir.path())[0].clone();
    let at = toc_offset(&path).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let len = bytes.len();
    bytes[at as usize + 40] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let svc = open(dir.path(), max).await;
    assert!(read_all(&svc, &digest).await == blob);
    assert_eq!(
        toc_offset(&path),
        Some(at),
        "a new table where the old one was"
    );
    assert_eq!(std::fs::read(&path).unwrap().len(), len);
    assert_ne!(std::fs::read(&path).unwrap(), bytes, "the damage is gone");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chunk_is_stored_once_however_often_it_is_put() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path(), 1 << 30).await;
    let store = svc.store();
    let chunks: Vec<Bytes> = (90..98)
        .map(|seed| pseudo_random(200_000, seed).into())
        .collect();
    // Each chunk put four times over, the four at once: twice under its
    // digest, twice to be hashed by the store.
    for _ in 0..2 {
        futures::future::try_join_all(chunks.iter().flat_map(|c| {
            (0..4).map(move |i| async move {
                let digest = B3Digest::of(c);
                if i % 2 == 0 {
                    store.put_chunk(digest, c.clone()).await
                } else {
                    let hashed = store.put_chunk_hashing(c.clone().into()).await?;
                    assert_eq!(hashed, digest);
                    Ok(())
                }
            })
        }))
        .await
        .unwrap();
    }
    let stored = stored_chunks(dir.path()).unwrap();
    assert_eq!(stored.len(), chunks.len(), "a chunk was stored twice");
    for c in &chunks {
        let got = store.get_chunk(&B3Digest::of(c)).await.unwrap();
        assert_eq!(got.as_ref(), Some(c));
    }
    assert_eq!(store.used_bytes(), stored_bytes(store, dir.path()));
}

/// Descriptors this process holds open on deleted files under `dir`.
fn open_deleted_files(dir: &Path) -> Vec<String> {
    let dir = dir.display().to_string();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .map(|target| target.display().to_string())
        .filter(|target| target.starts_with(&dir) && target.ends_with(" (deleted)"))
        .collect()
}

#[tokio::test]
async fn a_chunk_damaged_in_a_pack_is_caught_and_forgotten() {
    for direct_io in [true, false] {
        a_chunk_damaged_in_a_pack_is_caught(direct_io).await;
    }
}

async fn a_chunk_damaged_in_a_pack_is_caught(direct_io: bool) {
    let dir = tempfile::tempdir().unwrap();
    let svc = open_with(dir.path(), 1 << 30, direct_io).await;
    let blob = pseudo_random(3 << 20, 65);
    let digest = put(&svc, &blob).await;
    // The first read opens the pack's read handle.
    assert!(read_all(&svc, &digest).await == blob);
    let chunks = svc.stat(&digest).await.unwrap().unwrap().chunks;
    let (good, victim) = (chunks[0], chunks[1]);
    let at = svc.store().packs.locate(&victim.digest).unwrap();
    // Without direct I/O, the next reads take the path that reads without
    // waiting, from the page cache, and hashes on the async task (where
    // the file system has it: not tmpfs). With it, nothing is cached.
    let fast = svc.store().packs.read_cached(&at).is_some();
    assert_eq!(fast, svc.store().packs.reads_without_waiting());
    if direct_io {
        assert!(!fast);
    }

    // One bit flipped in place, through the page cache.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(svc.store().packs.path(at.pack))
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at.offset + 100).unwrap();
    file.write_all_at(&[byte[0] ^ 1], at.offset + 100).unwrap();
    assert_eq!(svc.store().packs.read_cached(&at).is_some(), fast);

    let err = svc.store().get_chunk_verified(&victim).await.unwrap_err();
    assert!(matches!(err.root(), Error::Verification(_)), "{err}");
    assert!(svc.read_chunk(&victim).await.unwrap().is_none());
    assert!(
        !svc.store().holds(&victim.digest),
        "the damaged chunk is forgotten"
    );
    let read = svc.read_chunk(&good).await.unwrap().unwrap();
    assert!(read[..] == blob[..good.size as usize]);
}

#[tokio::test]
async fn without_direct_io_packs_are_the_same_and_read_through_the_page_cache() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open_with(dir.path(), 64 << 20, false).await;
    let blob = pseudo_random(5 << 20, 66);
    let digest = put(&svc, &blob).await;
    assert!(read_all(&svc, &digest).await == blob);
    let (id, len) = svc.store().packs.open_pack().unwrap();
    let path = svc.store().packs.path(id);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), padded(len));
    assert_eq!(
        svc.store().used_bytes(),
        stored_bytes(svc.store(), dir.path())
    );
    // Fresh writes through the page cache are found there (where the
    // file system reads without waiting).
    let chunk = svc.stat(&digest).await.unwrap().unwrap().chunks[0];
    let at = svc.store().packs.locate(&chunk.digest).unwrap();
    assert_eq!(
        svc.store().packs.read_cached(&at).is_some(),
        svc.store().packs.reads_without_waiting()
    );

    // The same directory serves a store with direct I/O, and back.
    drop(svc);
    let svc = open_with(dir.path(), 64 << 20, true).await;
    assert!(read_all(&svc, &digest).await == blob);
    drop(svc);
    let svc = open_with(dir.path(), 64 << 20, false).await;
    assert!(read_all(&svc, &digest).await == blob);
}

#[tokio::test]
async fn an_open_pack_left_padded_by_a_crash_is_cut_back_to_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path(), 64 << 20).await;
    let blob = pseudo_random(3 << 20, 67);
    let digest = put(&svc, &blob).await;
    let (id, len) = svc.store().packs.open_pack().unwrap();
    let path = svc.store().packs.path(id);
    // What a kill -9 leaves: the open pack's file without a table of
    // contents, its last block padded with zeros.
    let crashed = std::fs::read(&path).unwrap();
    drop(svc);
    std::fs::write(&path, &crashed).unwrap();
    assert_eq!(crashed.len() as u64, padded(len));
    assert!(toc_offset(&path).is_none());

    let svc = open(dir.path(), 64 << 20).await;
    assert_eq!(toc_offset(&path), Some(len), "cut back to its last record");
    assert!(read_all(&svc, &digest).await == blob);
    assert_eq!(
        svc.store().used_bytes(),
        stored_bytes(svc.store(), dir.path())
    );
}

#[tokio::test]
async fn read_handles_close_with_their_packs() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path(), 1 << 30).await;
    let digest = put(&svc, &pseudo_random(3 << 20, 66)).await;
    let chunk = svc.stat(&digest).await.unwrap().unwrap().chunks[0];
    let at = svc.store().packs.locate(&chunk.digest).unwrap();
    let packs = &svc.store().packs;
    assert!(packs.read_cached(&at).is_none(), "no handle before a read");
    assert!(packs.read(&at).is_ok());
    assert!(packs.has_reader(at.pack));
    assert_eq!(
        packs.read_cached(&at).is_some(),
        packs.reads_without_waiting()
    );
    packs.forget_pack(at.pack);
    assert!(!packs.has_reader(at.pack));
    // A read that located the chunk before the pack was forgotten keeps
    // no handle either.
    assert!(packs.read(&at).is_ok());
    assert!(!packs.has_reader(at.pack));
}

#[tokio::test]
async fn an_evicted_pack_takes_its_chunks_and_their_blobs_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let max = 32 << 20;
    let svc = open(dir.path(), max).await;
    let blob = pseudo_random(3 << 20, 60);
    let oldest = put(&svc, &blob).await;
    let chunks = svc.stat(&oldest).await.unwrap().unwrap().chunks;
    let first_pack = svc.store().packs.locate(&chunks[0].digest).unwrap().pack;
    assert!(read_all(&svc, &oldest).await == blob);
    assert!(svc.store().packs.has_reader(first_pack));
    let mut seed = 61;
    while svc.store().packs.path(first_pack).exists() {
        assert!(seed < 120, "the first pack is never evicted");
        put(&svc, &pseudo_random(2 << 20, seed)).await;
        seed += 1;
    }
    assert!(!svc.store().holds(&chunks[0].digest));
    assert!(svc.stat(&oldest).await.unwrap().is_none());
    // Its read handle went with it: nothing holds its space.
    assert!(!svc.store().packs.has_reader(first_pack));
    assert_eq!(open_deleted_files(dir.path()), Vec::<String>::new());
    // What the map holds and what the packs hold agree.
    let stored = stored_chunks(dir.path()).unwrap();
    for c in &stored {
        assert!(
            svc.store().holds(&c.digest),
            "{} is stored but unknown",
            c.digest
        );
    }
    let known = svc
        .store()
        .packs
        .contains_each(stored.iter().map(|c| &c.digest));
    assert!(known.iter().all(|&k| k));
    assert!(svc.store().used_bytes() <= max);
    assert_eq!(
        svc.store().used_bytes(),
        stored_bytes(svc.store(), dir.path())
    );
}

#[tokio::test]
async fn a_pack_deleted_behind_the_stores_back_is_a_miss() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path(), 1 << 30).await;
    let digest = put(&svc, &pseudo_random(3 << 20, 70)).await;
    let chunks = svc.stat(&digest).await.unwrap().unwrap().chunks;
    for path in packs_in(dir.path()) {
        std::fs::remove_file(path).unwrap();
    }
    assert_eq!(
        svc.store().get_chunk(&chunks[0].digest).await.unwrap(),
        None
    );
    assert!(!svc.store().holds(&chunks[0].digest));
    assert!(svc.stat(&digest).await.unwrap().is_none());
    // The open pack was among them: what comes next goes to a new one.
    let blob = pseudo_random(3 << 20, 71);
    let digest = put(&svc, &blob).await;
    assert!(read_all(&svc, &digest).await == blob);
}

#[tokio::test]
async fn a_chunk_the_disk_cannot_read_is_forgotten_and_stored_again() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path(), 1 << 30).await;
    let blob = pseudo_random(3 << 20, 72);
    let digest = put(&svc, &blob).await;
    let chunks = svc.stat(&digest).await.unwrap().unwrap().chunks;
    let store = svc.store();

    // A failure of the moment is an error, and the chunk is kept.
    store.packs.fail_reads(libc::EMFILE);
    assert!(svc.read_chunk(&chunks[0]).await.is_err());
    assert!(store.holds(&chunks[0].digest));

    // Bytes the disk lost are a miss: the chunk, and the blob it made
    // whole, are gone, and the blob's other chunks stay.
    store.packs.fail_reads(libc::EIO);
    assert_eq!(svc.read_chunk(&chunks[0]).await.unwrap(), None);
    assert!(!store.holds(&chunks[0].digest));
    assert!(store.holds(&chunks[1].digest));
    assert!(svc.stat(&digest).await.unwrap().is_none());

    // Put again, the lost chunk goes to a new record, and reads back.
    store.packs.fail_reads(0);
    assert_eq!(put(&svc, &blob).await, digest);
    assert!(store.holds(&chunks[0].digest));
    assert!(read_all(&svc, &digest).await == blob);
}

#[tokio::test]
async fn a_pack_that_cannot_be_opened_is_left_alone_and_the_rest_serve() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (pseudo_random(3 << 20, 73), pseudo_random(3 << 20, 74));
    // Each put by a store of its own, so each blob in a pack of its own.
    let first_digest = put(&open(dir.path(), 1 << 30).await, &first).await;
    let second_digest = put(&open(dir.path(), 1 << 30).await, &second).await;
    let packs = packs_in(dir.path());
    assert_eq!(packs.len(), 2, "{packs:?}");
    let bad = packs[0].clone();
    let before = std::fs::read(&bad).unwrap();
    packs::UNOPENABLE.lock().unwrap().push(bad.clone());
    let svc = open(dir.path(), 1 << 30).await;
    packs::UNOPENABLE.lock().unwrap().retain(|p| p != &bad);

    assert!(svc.stat(&first_digest).await.unwrap().is_none());
    assert!(read_all(&svc, &second_digest).await == second);
    // Untouched, and never written to: the blob put again lands elsewhere.
    assert_eq!(put(&svc, &first).await, first_digest);
    assert!(read_all(&svc, &first_digest).await == first);
    assert!(std::fs::read(&bad).unwrap() == before);
}

#[tokio::test]
async fn chunk_files_of_older_versions_are_read_and_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let blob = pseudo_random(3 << 20, 80);
    let digest = {
        let svc = open(dir.path(), 1 << 30).await;
        put(&svc, &blob).await
    };
    // As older versions stored them: a file per chunk.
    let chunks = stored_chunks(dir.path()).unwrap();
    for c in &chunks {
        let path = file(dir.path(), ObjectKey::Chunk(c.digest));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, &c.data).unwrap();
    }
    std::fs::remove_dir_all(dir.path().join("packs")).unwrap();

    let max = 16 << 20;
    let svc = open(dir.path(), max).await;
    assert!(svc.store().holds(&chunks[0].digest));
    assert!(!svc.store().packs.contains(&chunks[0].digest));
    assert!(read_all(&svc, &digest).await == blob);
    // A damaged one is removed.
    let victim = file(dir.path(), ObjectKey::Chunk(chunks[1].digest));
    std::fs::write(&victim, b"not the chunk").unwrap();
    let meta = ChunkMeta {
        digest: chunks[1].digest,
        size: chunks[1].data.len() as u64,
    };
    assert!(svc.store().get_chunk_verified(&meta).await.is_err());
    svc.store().discard_chunk(&meta.digest).await.unwrap();
    assert!(!victim.exists());
    // Newer blobs push the old files out.
    for seed in 81..90 {
        put(&svc, &pseudo_random(2 << 20, seed)).await;
    }
    let first = file(dir.path(), ObjectKey::Chunk(chunks[0].digest));
    assert!(!first.exists(), "an old chunk file outlived the bound");
    assert!(!svc.store().holds(&chunks[0].digest));
    assert_eq!(
        svc.store().used_bytes(),
        stored_bytes(svc.store(), dir.path())
    );
}

#[tokio::test]
async fn a_pack_name_taken_behind_the_stores_back_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path(), 1 << 30).await;
    for id in 0..3 {
        std::fs::write(dir.path().join("packs").join(pack::file_name(id)), b"taken").unwrap();
    }
    let blob = pseudo_random(1 << 20, 100);
    let digest = put(&svc, &blob).await;
    assert_eq!(svc.store().packs.open_pack().map(|(id, _)| id), Some(3));
    assert!(read_all(&svc, &digest).await == blob);
}

#[tokio::test]
async fn a_directory_serves_one_store_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let first = DiskStore::open(dir.path().into(), 1 << 30).await.unwrap();
    let Err(err) = DiskStore::open(dir.path().into(), 1 << 30).await else {
        panic!("a second store opened the same directory");
    };
    let message = err.to_string();
    assert!(message.contains("in use by another disk tier"), "{message}");
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
    drop(first);
    DiskStore::open(dir.path().into(), 1 << 30).await.unwrap();
}

/// Writes what is staged, as the follow-up write of a batch does, and
/// checks that it was the one record of chunk `digest`, whose appender
/// waits on `answer`, and that the chunk reads back.
async fn the_next_write_answers(
    svc: &ChunkedBlobService<DiskStore>,
    answer: tokio::sync::oneshot::Receiver<std::io::Result<()>>,
    digest: &B3Digest,
    data: &[u8],
) {
    let wrote = svc.store().packs.write_staged();
    assert!(!wrote.staged_left);
    assert_eq!(wrote.added, pack::RECORD_HEADER_LEN + data.len() as u64);
    tokio::time::timeout(std::time::Duration::from_secs(10), answer)
        .await
        .expect("never answered")
        .unwrap()
        .unwrap();
    let got = svc.store().get_chunk(digest).await.unwrap();
    assert_eq!(got.as_deref(), Some(data));
}

#[tokio::test]
async fn a_chunk_staged_behind_another_write_is_answered_by_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path(), 64 << 20).await;
    let packs = &svc.store().packs;
    let first = pseudo_random(1000, 1);
    packs
        .append(B3Digest::of(&first), &[&first[..]])
        .answer
        .stored()
        .await
        .unwrap();

    // While another append writes a batch, this one only stages.
    packs.pretend_writing(true);
    let data = pseudo_random(100_000, 2);
    let digest = B3Digest::of(&data);
    let appended = packs.append(digest, &[&data[..]]);
    assert!(!appended.wrote.staged_left, "the writing append takes it");
    assert_eq!(appended.wrote.added, 0);
    let packs::Answer::Staged(mut answer) = appended.answer else {
        panic!("not staged: {:?}", appended.answer);
    };
    assert!(answer.try_recv().is_err(), "answered before it was written");
    assert!(!packs.contains(&digest));

    // That append is done and left it staged: the follow-up write takes it.
    packs.pretend_writing(false);
    the_next_write_answers(&svc, answer, &digest, &data).await;
    // Nothing is left to write.
    assert_eq!(packs.write_staged().added, 0);
}

/// The async task's part of an append only stages: anything that would
/// write, wait, or start a pack is left to the blocking `append`.
#[tokio::test]
async fn a_chunk_is_staged_without_a_blocking_thread_only_when_nothing_waits() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path(), 64 << 20).await;
    let packs = &svc.store().packs;
    let chunk = |seed: u64, len: usize| {
        let data = pseudo_random(len, seed);
        (B3Digest::of(&data), data)
    };
    // No pack is open yet: starting one creates a file.
    let (first, data) = chunk(1, 1000);
    assert!(packs.try_stage(first, &[&data[..]]).is_none());
    packs
        .append(first, &[&data[..]])
        .answer
        .stored()
        .await
        .unwrap();

    // Stored already: answered at once, nothing staged.
    let stored = packs.try_stage(first, &[&data[..]]).expect("no wait");
    assert!(matches!(stored.answer, packs::Answer::Now(Ok(()))));
    assert!(!stored.wrote.staged_left);

    // Staged with nobody writing: the caller must see it written.
    let (second, data) = chunk(2, 100_000);
    let staged = packs
        .try_stage(second, &[&data[..]])
        .expect("room in the tail");
    assert!(staged.wrote.staged_left);
    assert_eq!(staged.wrote.added, 0);
    let packs::Answer::Staged(answer) = staged.answer else {
        panic!("not staged: {:?}", staged.answer);
    };
    assert!(!packs.contains(&second), "mapped before it was written");
    // Another append of the same chunk joins it on the blocking path.
    assert!(packs.try_stage(second, &[&data[..]]).is_none());
    // A record the tail has no room for waits for the write.
    let (large, large_data) = chunk(3, 3 << 20);
    assert!(packs.try_stage(large, &[&large_data[..]]).is_none());

    the_next_write_answers(&svc, answer, &second, &data).await;

    // While a batch is written, the next chunk stages behind it, left to
    // that writer.
    packs.pretend_writing(true);
    let (third, data) = chunk(4, 50_000);
    let staged = packs
        .try_stage(third, &[&data[..]])
        .expect("room in the tail");
    assert!(!staged.wrote.staged_left, "the writing append takes it");
    packs.pretend_writing(false);
    assert!(packs.write_staged().added > 0);
    staged.answer.stored().await.unwrap();
    assert!(packs.contains(&third));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_are_written_together_and_each_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    // Packs of 2 MiB, so that appends racing each other also seal packs.
    let max = 64 << 20;
    let svc = open(dir.path(), max).await;
    let store = svc.store();
    // Sizes from one byte to more than a batch holds (those are written
    // at once, between the batches), many at a time.
    let chunks: Vec<Bytes> = (0..96u32)
        .map(|i| {
            let len = match i % 8 {
                0 => 1,
                7 if i % 32 == 7 => 3 << 20,
                n => (n as usize) * 77_777,
            };
            pseudo_random(len, u64::from(i) + 500).into()
        })
        .collect();
    // Every append is answered: by the batch it staged into, written by
    // whichever append or follow-up write found it staged.
    let appends = futures::future::try_join_all(
        chunks
            .iter()
            .map(|c| store.put_chunk_hashing(c.clone().into())),
    );
    tokio::time::timeout(std::time::Duration::from_secs(60), appends)
        .await
        .expect("an append was never answered")
        .unwrap();
    for c in &chunks {
        let got = store.get_chunk(&B3Digest::of(c)).await.unwrap();
        assert_eq!(got.as_ref(), Some(c), "a chunk of {} bytes", c.len());
    }
    let stored = stored_chunks(dir.path()).unwrap();
    assert_eq!(stored.len(), chunks.len());
    assert!(packs_in(dir.path()).len() > 4);
    assert_eq!(store.used_bytes(), stored_bytes(store, dir.path()));
    // Each batch's bytes are counted by the append that wrote it, which
    // need not be the one that staged them: none is lost or counted twice.
    assert_eq!(
        u64::try_from(store.metrics.occupancy_bytes.get()).unwrap(),
        store.used_bytes()
    );
    // And the packs scan back to the same chunks after a restart.
    drop(svc);
    let svc = open(dir.path(), max).await;
    for c in &chunks {
        let got = svc.store().get_chunk(&B3Digest::of(c)).await.unwrap();
        assert_eq!(got.as_ref(), Some(c));
    }
}

/// Appends of one chunk by several writers at once, while other appends
/// fill the pack's tail, all finish: an append that finds its chunk staged
/// by another, with nobody writing that batch, writes it rather than wait
/// for a writer that may never come (a Put ending in repeated chunks, such
/// as the zeros at the end of a disk image, once hung there).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_of_one_chunk_at_once_all_finish() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DiskStore::open(dir.path().into(), 1 << 30).await.unwrap());
    // Records of 700 KiB: two fill a batch, so appends find the tail full
    // and write it themselves often.
    for round in 0..200u64 {
        let shared = Bytes::from(pseudo_random(700 << 10, 1_000 + round));
        let shared_digest = B3Digest::of(&shared);
        let mut tasks = tokio::task::JoinSet::new();
        for writer in 0..16u64 {
            let store = store.clone();
            let shared = shared.clone();
            tasks.spawn(async move {
                let own = Bytes::from(pseudo_random(700 << 10, round * 100 + writer));
                store.put_chunk(B3Digest::of(&own), own).await.unwrap();
                store.put_chunk(shared_digest, shared).await.unwrap();
            });
        }
        let all = async {
            while let Some(done) = tasks.join_next().await {
                done.unwrap();
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(60), all)
            .await
            .unwrap_or_else(|_| panic!("round {round}: appends of one chunk hung"));
        assert_eq!(store.get_chunk(&shared_digest).await.unwrap(), Some(shared));
    }
}

/// A Put that skips chunks the tier holds counts them as used: their packs
/// outlive packs read or written after them, so the blob the Put published
/// is whole even when its own new chunks make the tier evict.
#[tokio::test]
async fn chunks_a_put_skips_are_kept_over_older_ones() {
    let dir = tempfile::tempdir().unwrap();
    // Packs of 1 MiB, and room for about 31 of them.
    let svc = open(dir.path(), 32 << 20).await;
    let first = pseudo_random(4 << 20, 41);
    put(&svc, &first).await;
    for seed in 0..5 {
        put(&svc, &pseudo_random(4 << 20, 100 + seed)).await;
    }
    // The first blob's chunks, then new ones: storing them evicts the
    // oldest packs, which held the first blob's chunks.
    let mut second = first.clone();
    second.extend_from_slice(&pseudo_random(12 << 20, 42));
    let digest = put(&svc, &second).await;
    assert!(
        svc.has(&digest).await.unwrap(),
        "a blob just put lost chunks it skipped"
    );
    assert!(read_all(&svc, &digest).await == second);
}

/// A stray file named like a pack with the largest id is not taken for
/// one: the store opens, and its next pack's id does not overflow.
#[tokio::test]
async fn a_stray_file_with_the_largest_pack_name_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("packs")).unwrap();
    std::fs::write(dir.path().join("packs").join("ffffffffffffffff"), b"stray").unwrap();
    let svc = open(dir.path(), 1 << 30).await;
    let blob = pseudo_random(3 << 20, 77);
    let digest = put(&svc, &blob).await;
    assert!(read_all(&svc, &digest).await == blob);
}

/// An index file cut short at a chunk's boundary still parses, but has
/// lost the size written after the chunks: it is found damaged and
/// removed, not read as a shorter blob.
#[tokio::test]
async fn an_index_cut_at_a_chunk_boundary_is_damaged_not_shorter() {
    use prost::Message;

    let dir = tempfile::tempdir().unwrap();
    let digest = {
        let svc = open(dir.path(), 1 << 30).await;
        put(&svc, &pseudo_random(LARGE, 30)).await
    };
    let path = file(dir.path(), ObjectKey::Index(digest));
    let whole =
        crate::proto::snix::StatBlobResponse::decode(&std::fs::read(&path).unwrap()[..]).unwrap();
    assert!(whole.chunks.len() > 2 && whole.size > 0);
    // What a cut after the second chunk's entry leaves.
    let cut = crate::proto::snix::StatBlobResponse {
        chunks: whole.chunks[..2].to_vec(),
        ..Default::default()
    };
    std::fs::write(&path, cut.encode_to_vec()).unwrap();

    let svc = open(dir.path(), 1 << 30).await;
    assert_eq!(svc.stat(&digest).await.unwrap(), None);
    assert!(svc.open_read(&digest).await.unwrap().is_none());
    assert!(!path.exists(), "the damaged index was kept");
}
