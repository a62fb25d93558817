//! The `objectstore` tier: the snix bucket layout in both directions, built
//! and checked from `docs/storage-layout.md` with hand-written code, and
//! round trips through a real S3 server.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use strata::B3Digest;
use strata::proto::snix::StatBlobRequest;

use crate::harness::{
    S3Server, put_blob as put, read_blob, snix_client, start_daemon as start, test_data,
};

// --- protobuf by hand, from the layout description -------------------------
// StatBlobResponse { repeated ChunkMeta chunks = 2; }
// ChunkMeta { bytes digest = 1; uint64 size = 2; }

fn varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn encode_index(chunks: &[(B3Digest, u64)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (digest, size) in chunks {
        let mut inner = vec![0x0a, 32];
        inner.extend_from_slice(digest.as_bytes());
        inner.push(0x10);
        varint(*size, &mut inner);
        out.push(0x12);
        varint(inner.len() as u64, &mut out);
        out.extend_from_slice(&inner);
    }
    out
}

fn read_varint(buf: &[u8], pos: &mut usize) -> u64 {
    let mut n = 0u64;
    let mut shift = 0;
    loop {
        let b = buf[*pos];
        *pos += 1;
        n |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return n;
        }
        shift += 7;
    }
}

/// A stored index, decoded by hand: the chunks (field 2), and strata's
/// additions: `bao` (3), `bao_shift` (4), `size` (5).
#[derive(Default)]
struct HandIndex {
    chunks: Vec<(B3Digest, u64)>,
    bao: Vec<u8>,
    bao_shift: u64,
    size: u64,
}

fn decode_index(buf: &[u8]) -> HandIndex {
    let mut index = HandIndex::default();
    let mut pos = 0;
    while pos < buf.len() {
        let tag = read_varint(buf, &mut pos);
        match tag {
            0x12 => {}
            0x1a => {
                let len = read_varint(buf, &mut pos) as usize;
                index.bao = buf[pos..pos + len].to_vec();
                pos += len;
                continue;
            }
            0x20 => {
                index.bao_shift = read_varint(buf, &mut pos);
                continue;
            }
            0x28 => {
                index.size = read_varint(buf, &mut pos);
                continue;
            }
            other => panic!("unexpected field tag {other:#x} in the index"),
        }
        let len = read_varint(buf, &mut pos) as usize;
        let inner = &buf[pos..pos + len];
        pos += len;
        let (mut digest, mut size, mut p) = (None, 0, 0);
        while p < inner.len() {
            match read_varint(inner, &mut p) {
                0x0a => {
                    let l = read_varint(inner, &mut p) as usize;
                    digest = Some(B3Digest::try_from(&inner[p..p + l]).unwrap());
                    p += l;
                }
                0x10 => size = read_varint(inner, &mut p),
                other => panic!("unexpected ChunkMeta tag {other:#x}"),
            }
        }
        index.chunks.push((digest.expect("chunk digest"), size));
    }
    index
}

/// The outboard at groups of `group` bytes, cut out of the `bao` crate's
/// (1 KiB) outboard: its pre-order parents over more than one group.
/// BLAKE3 splits `len` bytes into a left subtree of the largest power of two
/// KiB below `len`.
fn bao_pruned(data: &[u8], group: u64) -> Vec<u8> {
    fn walk(full: &[u8], pos: &mut usize, len: u64, group: u64, out: &mut Vec<u8>) {
        if len <= 1024 {
            return;
        }
        let pair = &full[*pos..*pos + 64];
        *pos += 64;
        if len > group {
            out.extend_from_slice(pair);
        }
        let left = (len.div_ceil(1024) - 1).next_power_of_two().max(1) * 1024;
        let left = if left >= len { left / 2 } else { left };
        walk(full, pos, left, group, out);
        walk(full, pos, len - left, group, out);
    }
    let (full, _) = bao::encode::outboard(data);
    let mut out = Vec::new();
    walk(&full[8..], &mut 0, data.len() as u64, group, &mut out);
    out
}

fn object_path(root: &Path, kind: &str, digest: &B3Digest) -> PathBuf {
    let hex = digest.to_hex();
    root.join(kind).join("b3").join(&hex[..2]).join(hex)
}

fn write_object(root: &Path, kind: &str, digest: &B3Digest, data: &[u8]) {
    let path = object_path(root, kind, digest);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

fn objectstore_config(url: &str, options: Option<&str>) -> String {
    let mut config =
        format!("[blobservices.root]\ntype = \"objectstore\"\nobject_store_url = \"{url}\"\n");
    if let Some(options) = options {
        config.push_str(&format!("object_store_options = {options}\n"));
    }
    config
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bucket_in_the_snix_layout_is_served() {
    let bucket = tempfile::tempdir().unwrap();
    let root = bucket.path();

    // "Hello World": one chunk object, compressed by a streaming encoder
    // (no content size in the frame header), at the documented key.
    let hello = B3Digest::of(b"Hello World");
    let frame = zstd::stream::encode_all(&b"Hello World"[..], 3).unwrap();
    write_object(root, "chunks", &hello, &frame);
    assert!(
        root.join("chunks/b3/41/41f8394111eb713a22165c46c90ab8f0fd9399c92028fd6d288944b23ff5bf76")
            .is_file()
    );

    // A blob of three chunks with arbitrary (non-FastCDC) boundaries.
    let blob = test_data(400_007, 11);
    let parts = [&blob[..100_000], &blob[100_000..400_000], &blob[400_000..]];
    let mut index = Vec::new();
    for part in parts {
        let d = B3Digest::of(part);
        write_object(
            root,
            "chunks",
            &d,
            &zstd::stream::encode_all(part, 1).unwrap(),
        );
        index.push((d, part.len() as u64));
    }
    let blob_digest = B3Digest::of(&blob);
    write_object(root, "blobs", &blob_digest, &encode_index(&index));

    let daemon = start(objectstore_config(
        &format!("file://{}", root.display()),
        None,
    ))
    .await;
    let addr = daemon.tcp_addr();

    assert_eq!(read_blob(&addr, &hello).await.unwrap(), b"Hello World");
    let stat = snix_client(&addr)
        .stat(StatBlobRequest {
            digest: hello.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stat.size, 11);

    assert!(read_blob(&addr, &blob_digest).await.unwrap() == blob);
    let stat = snix_client(&addr)
        .stat(StatBlobRequest {
            digest: blob_digest.into(),
            send_chunks: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stat.size, blob.len() as u64);
    let listed: Vec<(B3Digest, u64)> = stat
        .chunks
        .iter()
        .map(|c| (B3Digest::try_from(&c.digest).unwrap(), c.size))
        .collect();
    assert_eq!(listed, index);
    for (d, size) in &index {
        assert_eq!(read_blob(&addr, d).await.unwrap().len() as u64, *size);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn strata_writes_the_snix_layout() {
    let bucket = tempfile::tempdir().unwrap();
    let root = bucket.path();
    let daemon = start(objectstore_config(
        &format!("file://{}", root.display()),
        None,
    ))
    .await;
    let addr = daemon.tcp_addr();

    assert_eq!(put(&addr, b"").await, B3Digest::EMPTY);
    let hello = put(&addr, b"Hello World").await;
    let big = test_data(3 << 20, 12);
    let big_digest = put(&addr, &big).await;

    // The empty blob is not stored; "Hello World" is one chunk, no index.
    assert!(!object_path(root, "chunks", &B3Digest::EMPTY).exists());
    let frame = std::fs::read(object_path(root, "chunks", &hello)).unwrap();
    assert_eq!(
        zstd::stream::decode_all(&frame[..]).unwrap(),
        b"Hello World"
    );
    assert!(!object_path(root, "blobs", &hello).exists());

    // The large blob has an index whose chunks decompress, hash to their
    // names, concatenate to the blob, and are the FastCDC v2020 cuts.
    let stored = decode_index(&std::fs::read(object_path(root, "blobs", &big_digest)).unwrap());
    // Its outboard is the bao crate's, pruned to 16 KiB groups.
    assert_eq!(stored.size, big.len() as u64);
    assert_eq!(stored.bao_shift, 4);
    assert!(stored.bao == bao_pruned(&big, 16 * 1024));
    let index = stored.chunks;
    let mut joined = Vec::new();
    for (d, size) in &index {
        let frame = std::fs::read(object_path(root, "chunks", d)).unwrap();
        let data = zstd::stream::decode_all(&frame[..]).unwrap();
        assert_eq!(data.len() as u64, *size);
        assert_eq!(B3Digest::of(&data), *d);
        joined.extend_from_slice(&data);
    }
    assert!(joined == big);
    let cuts: Vec<u64> = fastcdc::v2020::StreamCDC::new(
        std::io::Cursor::new(&big),
        128 * 1024,
        256 * 1024,
        512 * 1024,
    )
    .map(|c| c.unwrap().length as u64)
    .collect();
    assert_eq!(index.iter().map(|(_, s)| *s).collect::<Vec<_>>(), cuts);

    // Nothing else was written.
    let mut files = 0;
    for kind in ["chunks", "blobs"] {
        for prefix in std::fs::read_dir(root.join(kind).join("b3")).unwrap() {
            files += std::fs::read_dir(prefix.unwrap().path()).unwrap().count();
        }
    }
    assert_eq!(files, 1 + index.len() + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn decompression_bombs_are_refused() {
    let bucket = tempfile::tempdir().unwrap();
    let root = bucket.path();
    // 17 MiB of zeros compresses to a few hundred bytes.
    let zeros = vec![0u8; 17 << 20];
    let bomb = B3Digest::of(&zeros);
    write_object(
        root,
        "chunks",
        &bomb,
        &zstd::bulk::compress(&zeros, 19).unwrap(),
    );
    let daemon = start(objectstore_config(
        &format!("file://{}", root.display()),
        None,
    ))
    .await;
    let failure = read_blob(&daemon.tcp_addr(), &bomb)
        .await
        .expect_err("a decompression bomb was served");
    assert_eq!(failure.code(), tonic::Code::DataLoss);
}

/// A chunk object larger than any chunk compresses to is refused by its
/// size, before its body is read into memory.
#[tokio::test(flavor = "multi_thread")]
async fn oversize_chunk_objects_are_refused_unread() {
    let bucket = tempfile::tempdir().unwrap();
    let root = bucket.path();
    let digest = B3Digest::of(b"an object far larger than a chunk");
    let path = object_path(root, "chunks", &digest);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    // Sparse: 64 GiB on paper, nothing on disk.
    std::fs::File::create(&path)
        .unwrap()
        .set_len(64 << 30)
        .unwrap();
    let daemon = start(objectstore_config(
        &format!("file://{}", root.display()),
        None,
    ))
    .await;
    let failure = read_blob(&daemon.tcp_addr(), &digest)
        .await
        .expect_err("an oversize object was served");
    assert_eq!(failure.code(), tonic::Code::DataLoss);
    assert!(
        daemon.log_text().contains("more than the"),
        "{}",
        daemon.log_text()
    );
}

/// Digests of the FastCDC v2020 chunks of `data` (snix's parameters).
fn chunk_digests(data: &[u8]) -> Vec<B3Digest> {
    fastcdc::v2020::StreamCDC::new(std::io::Cursor::new(data), 128 << 10, 256 << 10, 512 << 10)
        .map(|c| B3Digest::of(&c.unwrap().data))
        .collect()
}

/// Counts the objects in the bucket through the S3 API.
async fn count_objects(s3: &S3Server, bucket: &str) -> usize {
    let url = url::Url::parse(&format!("s3://{bucket}")).unwrap();
    let (store, _) = object_store::parse_url_opts(&url, s3.options()).unwrap();
    store.list(None).count().await
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_round_trips_and_dedup() {
    let s3 = tokio::task::spawn_blocking(|| S3Server::start("blobs"))
        .await
        .unwrap();
    let daemon = start(objectstore_config("s3://blobs", Some(&s3.options_toml()))).await;
    let addr = daemon.tcp_addr();

    let mut expected = std::collections::HashSet::new();
    for (i, size) in [0usize, 1 << 20, 300 << 20].into_iter().enumerate() {
        let data = test_data(size, 300 + i as u64);
        let digest = put(&addr, &data).await;
        assert_eq!(digest, B3Digest::of(&data));
        assert!(
            read_blob(&addr, &digest).await.unwrap() == data,
            "{size} bytes"
        );
        let cuts = chunk_digests(&data);
        if cuts.len() > 1 {
            expected.insert(("index", digest));
        }
        expected.extend(cuts.into_iter().map(|d| ("chunk", d)));
    }
    let big = test_data(300 << 20, 302);
    // Exactly one object per distinct chunk and one index per multi-chunk blob.
    let objects = count_objects(&s3, "blobs").await;
    assert_eq!(objects, expected.len());

    // The same blob again adds nothing.
    put(&addr, &big).await;
    assert_eq!(count_objects(&s3, "blobs").await, objects);

    // A blob sharing its first 200 MiB adds only the chunks after the
    // shared prefix (a few) and one index.
    let mut derived = big[..200 << 20].to_vec();
    derived.extend_from_slice(&test_data(1 << 20, 303));
    let derived_digest = put(&addr, &derived).await;
    let added = count_objects(&s3, "blobs").await - objects;
    assert!((2..=12).contains(&added), "{added} objects added");
    assert!(read_blob(&addr, &derived_digest).await.unwrap() == derived);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lying_index_in_a_shared_bucket_serves_nothing() {
    let bucket = tempfile::tempdir().unwrap();
    let root = bucket.path();
    // Valid chunks of one blob, filed under the index of another digest.
    let real = test_data(600_000, 21);
    let claimed = B3Digest::of(&test_data(600_000, 22));
    let mut index = Vec::new();
    for part in real.chunks(200_000) {
        let d = B3Digest::of(part);
        write_object(root, "chunks", &d, &zstd::bulk::compress(part, 3).unwrap());
        index.push((d, part.len() as u64));
    }
    write_object(root, "blobs", &claimed, &encode_index(&index));

    let daemon = start(objectstore_config(
        &format!("file://{}", root.display()),
        None,
    ))
    .await;
    let failure = read_blob(&daemon.tcp_addr(), &claimed)
        .await
        .expect_err("a blob under a lying index was served");
    assert_eq!(failure.code(), tonic::Code::DataLoss);
    assert_eq!(failure.received, 0, "unverified bytes released");
}
