//! Tests of the chunked blob service over the memory store.

use std::io::SeekFrom;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::*;
use crate::Error;
use crate::kinds::memory::MemoryStore;

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

async fn put(svc: &dyn BlobService, data: &[u8], piece: usize) -> crate::blobservice::PutResult {
    let mut w = svc.open_write().await.unwrap();
    for p in data.chunks(piece.max(1)) {
        w.write(Bytes::copy_from_slice(p)).await.unwrap();
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
    for piece in [1000, 65_536, 1 << 20, 3 << 20] {
        let svc = ChunkedBlobService::new(MemoryStore::new(64 << 20));
        let result = put(&svc, &blob, piece).await;
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
        assert_eq!(ours, reference, "write pieces of {piece}");
        for c in &result.chunks {
            assert!(c.size <= MAX_CHUNK_SIZE as u64);
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

#[tokio::test]
async fn a_corrupted_chunk_is_an_error_not_data() {
    let svc = ChunkedBlobService::new(MemoryStore::new(64 << 20));
    let blob = data(2 << 20, 3);
    let result = put(&svc, &blob, 1 << 20).await;
    let victim = result.chunks[1];
    let mut bad = svc
        .store()
        .get_chunk(&victim.digest)
        .await
        .unwrap()
        .unwrap()
        .to_vec();
    bad[10] ^= 1;
    svc.store()
        .put_chunk(victim.digest, bad.into())
        .await
        .unwrap();

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
