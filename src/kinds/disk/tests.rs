//! Unit tests of the `disk` tier.

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
    assert!(!svc.store().index.contains_key(&Entry::File(ObjectKey::Outboard(digest))));
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
    assert!(svc.store().index.contains_key(&Entry::File(ObjectKey::Outboard(digest))));
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
    while svc.store().holds(&first) {
        assert!(seed < 60, "the first chunk is never evicted");
        put(&svc, &pseudo_random(1 << 20, seed)).await;
        seed += 1;
        let _ = svc.store().index.get(&Entry::File(ObjectKey::Index(digest)));
    }
    assert!(svc.store().index.contains_key(&Entry::File(ObjectKey::Index(digest))));
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
