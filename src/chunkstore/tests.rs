//! Tests of the chunked blob service over the memory store (and wrappers
//! of it that behave like other stores).

use std::io::SeekFrom;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::*;
use crate::Error;
use crate::blobservice::ChunkMeta;
use crate::kinds::memory::MemoryStore;
use crate::testkit::pseudo_random as data;

async fn put(svc: &dyn BlobService, data: &[u8], piece: usize) -> crate::blobservice::PutResult {
    put_in(svc, data, &[piece]).await
}

/// Puts `data` in pieces of the sizes in `pieces`, round and round.
async fn put_in(
    svc: &dyn BlobService,
    mut data: &[u8],
    pieces: &[usize],
) -> crate::blobservice::PutResult {
    let mut w = svc.open_write().await.unwrap();
    for &piece in pieces.iter().cycle() {
        if data.is_empty() {
            break;
        }
        let (p, rest) = data.split_at(piece.clamp(1, data.len()));
        w.write(Bytes::copy_from_slice(p)).await.unwrap();
        data = rest;
    }
    w.close().await.unwrap()
}

#[tokio::test]
async fn chunks_match_a_streaming_fastcdc_whatever_the_write_sizes() {
    let blob = data(5 << 20, 1);
    let reference: Vec<(u64, usize)> = fastcdc::v2020::StreamCDC::new(
        std::io::Cursor::new(&blob),
        MIN_CHUNK_SIZE,
        AVG_CHUNK_SIZE,
        MAX_CHUNK_SIZE,
    )
    .map(|c| {
        let c = c.unwrap();
        (c.offset, c.length)
    })
    .collect();
    // Pieces smaller than a chunk (so many that they are gathered, and
    // just few enough to be kept as they came), just over a maximum chunk,
    // and several chunks long: cut from the carry, from the piece, and
    // both; then pieces of mixed sizes, as an HTTP/2 stream cuts 1 MiB
    // messages and others, so that a chunk spans pieces of every size.
    let sizes: [&[usize]; 10] = [
        &[1000],
        &[8191],
        &[1 << 20, 10],
        &[65_536],
        &[524_289],
        &[700_001],
        &[1 << 20],
        &[3 << 20],
        &[700_001, 3, 200_000, 1000, 1 << 20, 77],
        &[300_000, 100_000, 1 << 20, 5, 524_288, 131_072],
    ];
    for pieces in sizes {
        let svc = ChunkedBlobService::new(MemoryStore::new(64 << 20));
        let result = put_in(&svc, &blob, pieces).await;
        assert_eq!(result.digest, B3Digest::of(&blob));
        let mut offset = 0u64;
        let ours: Vec<(u64, usize)> = result
            .chunks
            .iter()
            .map(|c| {
                let r = (offset, c.size as usize);
                offset += c.size;
                r
            })
            .collect();
        assert_eq!(ours, reference, "write pieces of {pieces:?}");
        for (c, (offset, len)) in result.chunks.iter().zip(&reference) {
            assert!(c.size <= MAX_CHUNK_SIZE as u64);
            let bytes = &blob[*offset as usize..*offset as usize + len];
            assert_eq!(c.digest, B3Digest::of(bytes), "chunk at {offset}");
        }
    }
}

#[tokio::test]
async fn reads_and_seeks_return_the_right_bytes() {
    let svc = ChunkedBlobService::new(MemoryStore::new(64 << 20));
    let blob = data(3_000_001, 2);
    let result = put(&svc, &blob, 100_000).await;
    assert!(result.chunks.len() > 2);
    let stat = svc.stat(&result.digest).await.unwrap().unwrap();
    assert_eq!(stat.size, blob.len() as u64);
    assert_eq!(stat.chunks, result.chunks);

    let mut r = svc.open_read(&result.digest).await.unwrap().unwrap();
    let mut all = Vec::new();
    r.read_to_end(&mut all).await.unwrap();
    assert!(all == blob);

    for &(pos, len) in &[
        (0u64, 10usize),
        (262_143, 5000),
        (2_999_990, 100),
        (1_500_000, 700_000),
    ] {
        r.seek(SeekFrom::Start(pos)).await.unwrap();
        let mut buf = vec![0u8; len];
        let n = read_up_to(&mut r, &mut buf).await;
        let end = (pos as usize + len).min(blob.len());
        assert_eq!(&buf[..n], &blob[pos as usize..end], "at {pos}");
    }
    assert_eq!(
        r.seek(SeekFrom::End(-1)).await.unwrap(),
        blob.len() as u64 - 1
    );
    assert!(
        r.seek(SeekFrom::Current(-(blob.len() as i64)))
            .await
            .is_err()
    );
}

async fn read_up_to(r: &mut Box<dyn BlobReader>, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        let got = r.read(&mut buf[n..]).await.unwrap();
        if got == 0 {
            break;
        }
        n += got;
    }
    n
}

#[tokio::test]
async fn small_blobs_are_single_chunks_and_empty_is_implicit() {
    let svc = ChunkedBlobService::new(MemoryStore::new(64 << 20));
    let result = put(&svc, b"Hello World", 3).await;
    assert!(result.chunks.is_empty());
    assert_eq!(
        result.digest.to_hex(),
        "41f8394111eb713a22165c46c90ab8f0fd9399c92028fd6d288944b23ff5bf76"
    );
    assert!(
        svc.store()
            .get_index(&result.digest)
            .await
            .unwrap()
            .is_none()
    );
    assert!(svc.store().has_chunk(&result.digest).await.unwrap());

    let empty = put(&svc, b"", 1).await;
    assert_eq!(empty.digest, B3Digest::EMPTY);
    assert_eq!(svc.stat(&B3Digest::EMPTY).await.unwrap().unwrap().size, 0);
    assert!(!svc.store().has_chunk(&B3Digest::EMPTY).await.unwrap());
}

/// A memory store that does not vouch for the chunks it hands out, as a
/// store on disk cannot: its reads hash every chunk.
struct Unkept(MemoryStore);

#[async_trait]
impl ChunkStore for Unkept {
    async fn get_chunk(&self, digest: &B3Digest) -> Result<Option<Bytes>> {
        self.0.get_chunk(digest).await
    }
    async fn chunk_size(&self, digest: &B3Digest) -> Result<Option<u64>> {
        self.0.chunk_size(digest).await
    }
    async fn put_chunk(&self, digest: B3Digest, data: Bytes) -> Result<()> {
        self.0.put_chunk(digest, data).await
    }
    async fn get_index(&self, digest: &B3Digest) -> Result<Option<BlobIndex>> {
        self.0.get_index(digest).await
    }
    async fn put_index(&self, digest: B3Digest, index: BlobIndex) -> Result<()> {
        self.0.put_index(digest, index).await
    }
    fn evicts(&self) -> bool {
        true
    }
}

/// `victim`'s stored copy in `store`, with one bit flipped.
async fn corrupt(store: &impl ChunkStore, victim: &ChunkMeta) {
    let mut bad = store
        .get_chunk(&victim.digest)
        .await
        .unwrap()
        .unwrap()
        .to_vec();
    bad[10] ^= 1;
    store.put_chunk(victim.digest, bad.into()).await.unwrap();
}

#[tokio::test]
async fn read_chunk_hashes_a_stored_chunk_and_misses_a_damaged_one() {
    let svc = ChunkedBlobService::new(Unkept(MemoryStore::new(64 << 20)));
    let blob = data(2 << 20, 4);
    let result = put(&svc, &blob, 1 << 20).await;
    let (good, victim) = (result.chunks[0], result.chunks[1]);
    corrupt(svc.store(), &victim).await;
    let read = svc.read_chunk(&good).await.unwrap().unwrap();
    assert!(read[..] == blob[..good.size as usize]);
    assert!(svc.read_chunk(&victim).await.unwrap().is_none());
}

#[tokio::test]
async fn a_memory_store_hands_out_the_bytes_it_kept_and_checks_their_length() {
    let svc = ChunkedBlobService::new(MemoryStore::new(64 << 20));
    let blob = data(2 << 20, 5);
    let result = put(&svc, &blob, 1 << 20).await;
    let meta = result.chunks[1];
    let kept = svc.store().get_chunk(&meta.digest).await.unwrap().unwrap();
    let read = svc.read_chunk(&meta).await.unwrap().unwrap();
    assert_eq!(read.as_ptr(), kept.as_ptr(), "the kept allocation itself");
    assert_eq!(read.len(), kept.len());
    // An index that disagrees with a kept chunk's length is still caught.
    let mut index = svc
        .store()
        .get_index(&result.digest)
        .await
        .unwrap()
        .unwrap();
    index.chunks[1].size += 1;
    svc.store().put_index(result.digest, index).await.unwrap();
    let mut r = svc.open_read(&result.digest).await.unwrap().unwrap();
    let err = r.read_to_end(&mut Vec::new()).await.unwrap_err();
    assert!(matches!(Error::from_io(err), Error::Verification(_)));
}

#[tokio::test]
async fn a_corrupted_chunk_is_an_error_not_data() {
    let svc = ChunkedBlobService::new(Unkept(MemoryStore::new(64 << 20)));
    let blob = data(2 << 20, 3);
    let result = put(&svc, &blob, 1 << 20).await;
    let victim = result.chunks[1];
    corrupt(svc.store(), &victim).await;

    let mut r = svc.open_read(&result.digest).await.unwrap().unwrap();
    let mut out = Vec::new();
    let err = r.read_to_end(&mut out).await.unwrap_err();
    assert!(matches!(Error::from_io(err), Error::Verification(_)));
    assert!(
        out.len() as u64 <= result.chunks[0].size,
        "bytes past the bad chunk"
    );
}

#[tokio::test]
async fn memory_store_stays_bounded_and_keeps_the_newest() {
    let max = 8u64 << 20;
    let svc = ChunkedBlobService::new(MemoryStore::new(max));
    let mut last = None;
    for i in 0..40 {
        let blob = data(1 << 20, 100 + i);
        last = Some((put(&svc, &blob, 1 << 20).await.digest, blob));
    }
    assert!(svc.store().weighted_size() <= max);
    let (digest, blob) = last.unwrap();
    let mut r = svc
        .open_read(&digest)
        .await
        .unwrap()
        .expect("newest blob present");
    let mut out = Vec::new();
    r.read_to_end(&mut out).await.unwrap();
    assert!(out == blob);
}

/// A memory store that does not vouch for its indexes (like a shared
/// bucket) and counts chunk fetches.
struct Untrusted {
    inner: MemoryStore,
    fetched: std::sync::atomic::AtomicU64,
}

#[async_trait]
impl ChunkStore for Untrusted {
    async fn get_chunk(&self, digest: &B3Digest) -> Result<Option<Bytes>> {
        self.fetched
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.get_chunk(digest).await
    }
    async fn chunk_size(&self, digest: &B3Digest) -> Result<Option<u64>> {
        self.inner.chunk_size(digest).await
    }
    async fn put_chunk(&self, digest: B3Digest, data: Bytes) -> Result<()> {
        self.inner.put_chunk(digest, data).await
    }
    async fn get_index(&self, digest: &B3Digest) -> Result<Option<BlobIndex>> {
        self.inner.get_index(digest).await
    }
    async fn put_index(&self, digest: B3Digest, index: BlobIndex) -> Result<()> {
        self.inner.put_index(digest, index).await
    }
    fn evicts(&self) -> bool {
        false
    }
    fn trusts_indexes(&self) -> bool {
        false
    }
}

fn untrusted() -> ChunkedBlobService<Untrusted> {
    ChunkedBlobService::new(Untrusted {
        inner: MemoryStore::new(256 << 20),
        fetched: Default::default(),
    })
}

fn fetched(svc: &ChunkedBlobService<Untrusted>) -> u64 {
    svc.store()
        .fetched
        .swap(0, std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test]
async fn puts_store_the_outboard_and_the_service_returns_it() {
    let svc = untrusted();
    let blob = data(3 << 20, 20);
    let put = put(&svc, &blob, 1 << 20).await;
    let outboard = svc.outboard(&put.digest).await.unwrap();
    let expected = crate::verify::bao::outboard_of(&blob, crate::verify::STORED_SHIFT).1;
    assert_eq!(outboard, Some(expected));
}

#[tokio::test]
async fn an_untrusted_index_with_outboard_streams_and_ranges_fetch_only_their_chunks() {
    let svc = untrusted();
    let blob = data(8 << 20, 21);
    let put = put(&svc, &blob, 1 << 20).await;
    fetched(&svc);
    let mut r = svc.open_read(&put.digest).await.unwrap().unwrap();
    let mut all = Vec::new();
    r.read_to_end(&mut all).await.unwrap();
    assert!(all == blob);
    assert_eq!(
        fetched(&svc),
        put.chunks.len() as u64,
        "one fetch per chunk"
    );

    // 100 KiB in the middle: the covering chunks, one more for an edge
    // group, at most one read ahead.
    let (pos, len) = (5_000_000u64, 100_000usize);
    let mut r = svc.open_read(&put.digest).await.unwrap().unwrap();
    r.seek(SeekFrom::Start(pos)).await.unwrap();
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await.unwrap();
    assert!(buf == blob[pos as usize..pos as usize + len]);
    let n = fetched(&svc);
    assert!(
        (1..=4).contains(&n),
        "{n} chunks fetched for a 100 KiB range"
    );
}

#[tokio::test]
async fn a_lying_chunk_list_stops_at_the_first_bad_group() {
    let svc = untrusted();
    let blob = data(4 << 20, 22);
    let put = put(&svc, &blob, 1 << 20).await;
    // Swap chunk 2 for a chunk of another blob, with a truthful digest.
    let other = data(put.chunks[2].size as usize, 23);
    let other_digest = B3Digest::of(&other);
    svc.store()
        .put_chunk(other_digest, other.into())
        .await
        .unwrap();
    let mut index = svc.store().get_index(&put.digest).await.unwrap().unwrap();
    index.chunks[2].digest = other_digest;
    svc.store().put_index(put.digest, index).await.unwrap();

    let mut r = svc.open_read(&put.digest).await.unwrap().unwrap();
    let mut out = Vec::new();
    let err = r.read_to_end(&mut out).await.unwrap_err();
    assert!(matches!(Error::from_io(err), Error::Verification(_)));
    let bad_from = put.chunks[0].size + put.chunks[1].size;
    assert!(
        out.len() as u64 <= bad_from,
        "released bytes of the swapped chunk"
    );
    assert!(out == blob[..out.len()]);
    assert!(
        out.len() as u64 + 16 * 1024 > bad_from,
        "stopped later than the first bad group"
    );
}

#[tokio::test]
async fn an_index_without_outboard_is_verified_whole_then_gets_one() {
    let svc = untrusted();
    let blob = data(2 << 20, 24);
    let put = put(&svc, &blob, 1 << 20).await;
    // As another tool would have written it: no outboard.
    let stored = svc.store().get_index(&put.digest).await.unwrap().unwrap();
    let bare = BlobIndex::new(stored.chunks.clone(), None);
    svc.store().put_index(put.digest, bare).await.unwrap();
    assert_eq!(svc.outboard(&put.digest).await.unwrap(), None);

    let mut r = svc.open_read(&put.digest).await.unwrap().unwrap();
    let mut out = Vec::new();
    r.read_to_end(&mut out).await.unwrap();
    assert!(out == blob);
    let again = svc.store().get_index(&put.digest).await.unwrap().unwrap();
    assert_eq!(
        again, stored,
        "outboard computed and stored after verification"
    );
}

/// The example of the chunking notes: a 14 KiB blob verified at 4 KiB
/// groups (shift 2), stored as physical chunks of 2, 4, 1, 2 and 5 KiB.
/// Reading KiB 0..=4 needs groups [0..4) and [4..8), so the chunks
/// [0 1], [2 3 4 5], [6] and [7 8] — and not [9 .. 13].
#[tokio::test]
async fn the_chunking_notes_example_fetches_the_edge_neighbours() {
    let svc = untrusted();
    let blob = data(14 * 1024, 25);
    let digest = B3Digest::of(&blob);
    let mut chunks = Vec::new();
    let mut at = 0;
    for kib in [2, 4, 1, 2, 5] {
        let piece = &blob[at..at + kib * 1024];
        let meta = ChunkMeta {
            digest: B3Digest::of(piece),
            size: piece.len() as u64,
        };
        svc.store()
            .put_chunk(meta.digest, Bytes::copy_from_slice(piece))
            .await
            .unwrap();
        chunks.push(meta);
        at += kib * 1024;
    }
    let outboard = crate::verify::bao::outboard_of(&blob, 2).1;
    svc.store()
        .put_index(digest, BlobIndex::new(chunks, Some(&outboard)))
        .await
        .unwrap();

    let mut r = svc.open_read(&digest).await.unwrap().unwrap();
    r.seek(SeekFrom::Start(0)).await.unwrap();
    fetched(&svc);
    // A reader that starts at 0 reads ahead; start at 1 byte in instead,
    // which is a seek (read-ahead 1) into the same group.
    r.seek(SeekFrom::Start(1)).await.unwrap();
    let mut buf = vec![0u8; 5 * 1024 - 1];
    r.read_exact(&mut buf).await.unwrap();
    assert!(buf == blob[1..5 * 1024]);
    assert_eq!(fetched(&svc), 4, "chunks [0 1], [2 3 4 5], [6], [7 8]");
}

/// Fills `target` with the blob `source` holds, the way a `tiers` fill does:
/// listed chunks, proven by a [`crate::verify::BlobCheck`].
async fn fill_from(
    source: &ChunkedBlobService<MemoryStore>,
    target: &ChunkedBlobService<MemoryStore>,
    digest: &B3Digest,
) -> crate::Result<crate::blobservice::PutResult> {
    let stat = source.stat(digest).await?.unwrap();
    let outboard = source.outboard(digest).await?;
    let mut check = crate::verify::BlobCheck::new(*digest, Some(stat.size), outboard);
    let mut w = target.open_fill(digest, &stat).await?;
    for c in &stat.chunks {
        let chunk = source.read_chunk(c).await?.unwrap();
        check.push(chunk.clone())?;
        w.write(chunk).await?;
    }
    w.close_verified(&check.finish()?).await
}

#[tokio::test]
async fn a_fill_stores_the_listed_chunks_and_the_proven_outboard() {
    let source = ChunkedBlobService::new(MemoryStore::new(64 << 20));
    let target = ChunkedBlobService::new(MemoryStore::new(64 << 20));
    let blob = data(3 << 20, 30);
    let put = put(&source, &blob, 1 << 20).await;
    let filled = fill_from(&source, &target, &put.digest).await.unwrap();
    assert_eq!(filled, put);
    assert_eq!(
        target.stat(&put.digest).await.unwrap(),
        source.stat(&put.digest).await.unwrap()
    );
    assert_eq!(
        target.outboard(&put.digest).await.unwrap(),
        source.outboard(&put.digest).await.unwrap()
    );
    let mut r = target.open_read(&put.digest).await.unwrap().unwrap();
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    assert!(back == blob);
}

#[tokio::test]
async fn a_fill_of_one_chunk_stores_that_chunk_as_a_put_would() {
    let source = ChunkedBlobService::new(MemoryStore::new(64 << 20));
    let target = ChunkedBlobService::new(MemoryStore::new(64 << 20));
    let blob = Bytes::from(data(300_000, 33));
    let put = put(&source, &blob, 1 << 20).await;
    assert!(put.chunks.is_empty(), "one chunk: no list");
    let stat = source.stat(&put.digest).await.unwrap().unwrap();
    let whole = ChunkMeta {
        digest: put.digest,
        size: blob.len() as u64,
    };
    let mut check = crate::verify::BlobCheck::new(put.digest, Some(stat.size), None);
    check.push(blob.clone()).unwrap();
    let proof = check.finish().unwrap();

    // Written in pieces, it is refused and nothing is published.
    let mut w = target.open_fill(&put.digest, &stat).await.unwrap();
    assert!(w.write(blob.slice(..100_000)).await.is_err());
    drop(w);
    assert_eq!(target.stat(&put.digest).await.unwrap(), None);

    let mut w = target.open_fill(&put.digest, &stat).await.unwrap();
    w.write(blob.clone()).await.unwrap();
    assert_eq!(w.close_verified(&proof).await.unwrap(), put);
    assert_eq!(
        target.stat(&put.digest).await.unwrap(),
        source.stat(&put.digest).await.unwrap()
    );
    assert_eq!(target.read_chunk(&whole).await.unwrap(), Some(blob.clone()));
    let mut r = target.open_read(&put.digest).await.unwrap().unwrap();
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    assert!(back == blob);
}

#[tokio::test]
async fn a_fill_writer_publishes_nothing_without_a_matching_proof() {
    let source = ChunkedBlobService::new(MemoryStore::new(64 << 20));
    let target = ChunkedBlobService::new(MemoryStore::new(64 << 20));
    let blob = data(2 << 20, 31);
    let other = data(2 << 20, 32);
    let put = put(&source, &blob, 1 << 20).await;
    let stat = source.stat(&put.digest).await.unwrap().unwrap();
    let chunks: Vec<Bytes> = {
        let mut v = Vec::new();
        for c in &stat.chunks {
            v.push(source.read_chunk(c).await.unwrap().unwrap());
        }
        v
    };

    // Closed without a proof.
    let mut w = target.open_fill(&put.digest, &stat).await.unwrap();
    for c in &chunks {
        w.write(c.clone()).await.unwrap();
    }
    assert!(w.close().await.is_err());

    // A chunk of the wrong length, or one too many.
    let mut w = target.open_fill(&put.digest, &stat).await.unwrap();
    assert!(w.write(chunks[0].slice(1..)).await.is_err());
    let mut w = target.open_fill(&put.digest, &stat).await.unwrap();
    for c in &chunks {
        w.write(c.clone()).await.unwrap();
    }
    assert!(w.write(chunks[0].clone()).await.is_err());

    // A proof of another blob, or of a run cut short.
    let (other_digest, other_outboard) = crate::verify::bao::outboard_of(&other, 4);
    let mut check =
        crate::verify::BlobCheck::new(other_digest, Some(other.len() as u64), Some(other_outboard));
    check.push(Bytes::from(other.clone())).unwrap();
    let proof = check.finish().unwrap();
    let mut w = target.open_fill(&put.digest, &stat).await.unwrap();
    for c in &chunks {
        w.write(c.clone()).await.unwrap();
    }
    assert!(w.close_verified(&proof).await.is_err());
    let mut check = crate::verify::BlobCheck::new(put.digest, Some(blob.len() as u64), None);
    check.push(Bytes::from(blob.clone())).unwrap();
    let proof = check.finish().unwrap();
    let mut w = target.open_fill(&put.digest, &stat).await.unwrap();
    w.write(chunks[0].clone()).await.unwrap();
    assert!(w.close_verified(&proof).await.is_err());

    assert_eq!(target.stat(&put.digest).await.unwrap(), None);
}
