//! The `disk` tier: bounded, persistent, crash-safe, self-repairing.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use strata::B3Digest;
use strata::blobservice::BlobService;
use strata::chunkstore::{ChunkStore, ChunkedBlobService};
use strata::kinds::disk::{DiskStore, StoredChunk, stored_chunks};
use strata::proto::snix::{BlobChunk, StatBlobRequest};
use tokio::io::AsyncReadExt;

use crate::harness::{
    put_blob as put_via, read_blob, snix_client, start_daemon as start, test_data,
};

/// Files under `dir` whose names mark them as half-written.
fn leftovers(dir: &Path) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.metadata().unwrap().is_dir() {
            n += leftovers(&entry.path());
        } else if entry.file_name().to_string_lossy().starts_with(".tmp-") {
            n += 1;
        }
    }
    n
}

/// Total bytes of the files under `dir`.
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            du(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

async fn put(svc: &dyn BlobService, data: &[u8]) -> B3Digest {
    let mut w = svc.open_write().await.unwrap();
    for piece in data.chunks(1 << 20) {
        w.write(Bytes::copy_from_slice(piece)).await.unwrap();
    }
    w.close().await.unwrap().digest
}

async fn read_all(svc: &dyn BlobService, digest: &B3Digest) -> Option<Vec<u8>> {
    let mut r = svc.open_read(digest).await.unwrap()?;
    let mut out = Vec::new();
    r.read_to_end(&mut out).await.unwrap();
    Some(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn eviction_keeps_the_directory_under_max_size() {
    let dir = tempfile::tempdir().unwrap();
    let max: u64 = 16 << 20;
    let svc = ChunkedBlobService::new(DiskStore::open(dir.path().into(), max).await.unwrap());
    // Slack: the chunks of one write window in flight (4 x 512 KiB) plus an index.
    let slack = 4 * 512 * 1024 + 64 * 1024;
    let mut newest = None;
    for i in 0..40u64 {
        // 2 MiB each: 80 MiB in all, 5x max_size.
        let data = test_data(2 << 20, 500 + i);
        let digest = put(&svc, &data).await;
        let used = du(dir.path());
        assert!(used <= max + slack, "after blob {i}: {used} bytes on disk");
        assert!(svc.store().used_bytes() <= max);
        newest = Some((digest, data));
    }
    let (digest, data) = newest.unwrap();
    assert!(
        read_all(&svc, &digest).await.unwrap() == data,
        "newest blob evicted"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn index_is_rebuilt_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let blobs: Vec<Vec<u8>> = (0..5)
        .map(|i| test_data(100_000 + i * 300_000, i as u64))
        .collect();
    let mut digests = Vec::new();
    {
        let svc =
            ChunkedBlobService::new(DiskStore::open(dir.path().into(), 1 << 30).await.unwrap());
        for b in &blobs {
            digests.push(put(&svc, b).await);
        }
    }
    // A file half-written when the process died, and a chunk cut short
    // at the end of a pack.
    let torn = dir.path().join("blobs/ab/.tmp-4242-7");
    std::fs::write(&torn, b"half an index").unwrap();
    // (The open pack's file runs on past its last record, with zeros to the
    // next 4 KiB: the record goes where the next append would have.)
    let last = stored_chunks(dir.path()).unwrap().pop().unwrap();
    let pack_len = last.offset + last.data.len() as u64;
    {
        use std::os::unix::fs::FileExt;
        let pack = std::fs::OpenOptions::new()
            .write(true)
            .open(&last.file)
            .unwrap();
        let cut_short = strata::kinds::disk::pack::record_header(&B3Digest::of(b"x"), 1 << 17);
        pack.write_all_at(&cut_short, pack_len).unwrap();
        pack.write_all_at(&[7; 5000], pack_len + cut_short.len() as u64)
            .unwrap();
    }
    let svc = ChunkedBlobService::new(DiskStore::open(dir.path().into(), 1 << 30).await.unwrap());
    assert!(!torn.exists(), "leftover temporary file kept");
    // Cut back to its last whole record, then given its table of contents.
    let bytes = std::fs::read(&last.file).unwrap();
    assert!(
        bytes.ends_with(&strata::kinds::disk::pack::TOC_MAGIC),
        "no table of contents"
    );
    let toc_at = u64::from_le_bytes(bytes[bytes.len() - 16..][..8].try_into().unwrap());
    assert_eq!(toc_at, pack_len, "a record cut short was kept");
    assert_eq!(
        svc.store().used_bytes(),
        du(&dir.path().join("packs"))
            + du(&dir.path().join("blobs"))
            + du(&dir.path().join("outboards"))
    );
    assert!(
        !dir.path().join("chunks").exists(),
        "a directory of chunk files was made"
    );
    for (d, b) in digests.iter().zip(&blobs) {
        assert!(read_all(&svc, d).await.unwrap() == *b);
    }
    // Reopening with a smaller bound evicts down to it.
    drop(svc);
    let svc = ChunkedBlobService::new(DiskStore::open(dir.path().into(), 1 << 20).await.unwrap());
    assert!(svc.store().used_bytes() <= 1 << 20);
    assert!(du(dir.path()) <= 1 << 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_chunks_and_indexes_are_misses_and_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let svc = ChunkedBlobService::new(DiskStore::open(dir.path().into(), 1 << 30).await.unwrap());
    let single = test_data(50_000, 1);
    let single_digest = put(&svc, &single).await;
    let multi = test_data(3 << 20, 2);
    let multi_digest = put(&svc, &multi).await;
    let chunks = svc.stat(&multi_digest).await.unwrap().unwrap().chunks;
    assert!(chunks.len() > 2);

    let stored = |d: &B3Digest| -> StoredChunk {
        stored_chunks(dir.path())
            .unwrap()
            .into_iter()
            .find(|c| c.digest == *d)
            .unwrap()
    };
    let damage = |c: &StoredChunk, at: u64| {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&c.file)
            .unwrap();
        let mut byte = [0];
        file.read_exact_at(&mut byte, c.offset + at).unwrap();
        file.write_all_at(&[byte[0] ^ 0x40], c.offset + at).unwrap();
    };

    // Bit rot in a single-chunk blob: a miss, and the chunk is forgotten.
    damage(&stored(&single_digest), 100);
    assert!(svc.open_read(&single_digest).await.unwrap().is_none());
    assert!(!svc.store().has_chunk(&single_digest).await.unwrap());
    assert!(svc.stat(&single_digest).await.unwrap().is_none());

    // Bit rot in a chunk of a larger blob: the read fails, the chunk is
    // forgotten, and the blob is a miss from then on.
    let victim = chunks[1].digest;
    damage(&stored(&victim), chunks[1].size / 2);
    let mut r = svc.open_read(&multi_digest).await.unwrap().unwrap();
    let mut out = Vec::new();
    assert!(r.read_to_end(&mut out).await.is_err());
    assert!(svc.stat(&multi_digest).await.unwrap().is_none());
    assert!(!svc.store().has_chunk(&victim).await.unwrap());

    // A pack cut short behind the store's back: the chunk past the cut is
    // a miss, the ones before it still read.
    let in_pack_order: Vec<StoredChunk> = stored_chunks(dir.path())
        .unwrap()
        .into_iter()
        .filter(|s| chunks.iter().any(|c| c.digest == s.digest))
        .collect();
    let cut = in_pack_order.last().unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cut.file)
        .unwrap()
        .set_len(cut.offset + 10)
        .unwrap();
    assert!(svc.store().get_chunk(&cut.digest).await.unwrap().is_none());
    assert!(!svc.store().has_chunk(&cut.digest).await.unwrap());
    // (Not the chunk damaged above, which may come first in the pack:
    // chunks are appended as their writes finish.)
    let first = in_pack_order
        .iter()
        .find_map(|s| {
            chunks
                .iter()
                .find(|c| c.digest == s.digest && c.digest != victim)
        })
        .unwrap();
    let data = svc.store().get_chunk_verified(first).await.unwrap();
    assert_eq!(data.map(|d| d.len() as u64), Some(first.size));

    // A garbage index file: a miss, removed.
    let other = test_data(2 << 20, 3);
    let other_digest = put(&svc, &other).await;
    let hex = other_digest.to_hex();
    let index = dir.path().join("blobs").join(&hex[..2]).join(&hex);
    std::fs::write(&index, b"\xff\xff\xff not protobuf").unwrap();
    assert!(svc.stat(&other_digest).await.unwrap().is_none());
    assert!(!index.exists());

    // And the blob can be put again, whole.
    assert_eq!(put(&svc, &multi).await, multi_digest);
    assert!(read_all(&svc, &multi_digest).await.unwrap() == multi);
}

fn disk_config(path: &Path) -> String {
    format!(
        "[blobservices.root]\ntype = \"disk\"\npath = \"{}\"\nmax_size = \"1GiB\"\n",
        path.display()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn blobs_survive_a_restart() {
    let cache = tempfile::tempdir().unwrap();
    let config = disk_config(cache.path());
    let blobs: Vec<Vec<u8>> = [10, 300_000, 5 << 20]
        .iter()
        .enumerate()
        .map(|(i, &n)| test_data(n, 40 + i as u64))
        .collect();
    let mut digests = Vec::new();
    {
        let daemon = start(config.clone()).await;
        for b in &blobs {
            digests.push(put_via(&daemon.tcp_addr(), b).await);
        }
    } // killed here
    let daemon = start(config.clone()).await;
    for (d, b) in digests.iter().zip(&blobs) {
        assert!(read_blob(&daemon.tcp_addr(), d).await.unwrap() == *b);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_during_put_never_leaves_a_torn_blob() {
    let cache = tempfile::tempdir().unwrap();
    let config = disk_config(cache.path());
    let old = test_data(2 << 20, 77);
    let old_digest = {
        let daemon = start(config.clone()).await;
        put_via(&daemon.tcp_addr(), &old).await
    };
    let data = test_data(12 << 20, 78);
    let digest = B3Digest::of(&data);
    let pieces: Vec<Bytes> = data
        .chunks(256 * 1024)
        .map(Bytes::copy_from_slice)
        .collect();

    // Kill the daemon after 1, 10, 30 and all 48 pieces were sent.
    for kill_after in [1usize, 10, 30, pieces.len()] {
        let mut daemon = start(config.clone()).await;
        let (tx, rx) = tokio::sync::mpsc::channel::<BlobChunk>(1);
        let mut client = snix_client(&daemon.tcp_addr());
        let put = tokio::spawn(async move {
            client
                .put(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        for p in &pieces[..kill_after] {
            if tx.send(BlobChunk { data: p.clone() }).await.is_err() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        daemon.kill();
        drop(tx);
        let _ = put.await;

        let daemon = start(config.clone()).await;
        let addr = daemon.tcp_addr();
        // The new blob is either absent or whole, never torn.
        let stat = snix_client(&addr)
            .stat(StatBlobRequest {
                digest: digest.into(),
                ..Default::default()
            })
            .await;
        match stat {
            Err(s) => assert_eq!(s.code(), tonic::Code::NotFound, "after {kill_after}: {s}"),
            Ok(_) => assert!(read_blob(&addr, &digest).await.unwrap() == data),
        }
        // Older blobs are intact, and no temporary file survived.
        assert!(read_blob(&addr, &old_digest).await.unwrap() == old);
        assert_eq!(leftovers(cache.path()), 0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_puts_and_reads_of_one_digest_are_safe() {
    let dir = tempfile::tempdir().unwrap();
    let svc = std::sync::Arc::new(ChunkedBlobService::new(
        DiskStore::open(dir.path().into(), 1 << 30).await.unwrap(),
    ));
    let data = std::sync::Arc::new(test_data(3 << 20, 55));
    let digest = B3Digest::of(&data);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..32 {
        let svc = svc.clone();
        let data = data.clone();
        tasks.spawn(async move {
            for _ in 0..5 {
                if i % 2 == 0 {
                    assert_eq!(put(svc.as_ref(), &data).await, digest);
                } else if let Some(got) = read_all(svc.as_ref(), &digest).await {
                    assert!(got == *data, "a reader saw different bytes");
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    assert!(read_all(svc.as_ref(), &digest).await.unwrap() == *data);
    assert_eq!(leftovers(dir.path()), 0);
}
