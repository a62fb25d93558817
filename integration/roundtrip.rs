//! Blobs of every awkward size survive put and get, over TCP and the unix
//! socket, through the CLI and through both package names.

use bytes::Bytes;
use futures::StreamExt;
use strata::B3Digest;
use strata::proto::snix::{BlobChunk, ReadBlobRequest, StatBlobRequest};

use crate::harness::{
    Daemon, cli, cli_ok, memory_origin, put_blob, read_blob, snix_client, test_data, tvix_client,
    write_file,
};

const SIZES: [usize; 5] = [0, 1, 1024, (1 << 20) + 1, 100 << 20];

#[test]
fn cli_round_trips_over_tcp_and_unix() {
    let daemon = Daemon::start(None);
    let work = tempfile::tempdir().unwrap();
    for (i, &size) in SIZES.iter().enumerate() {
        let data = test_data(size, i as u64);
        let expected = B3Digest::of(&data);
        let input = write_file(work.path(), &format!("in-{size}"), &data);
        let input = input.to_str().unwrap();

        // Put over TCP, get over the unix socket, and the other way round.
        for (put_addr, get_addr) in [
            (daemon.tcp_addr(), daemon.unix_addr()),
            (daemon.unix_addr(), daemon.tcp_addr()),
        ] {
            let out = cli_ok(&["put", "--addr", &put_addr, input]);
            assert_eq!(
                out,
                format!("{expected}  {input}\n"),
                "put output, size {size}"
            );

            let output = work.path().join(format!("out-{size}"));
            let output = output.to_str().unwrap();
            cli_ok(&["get", "--addr", &get_addr, &expected.to_hex(), "-o", output]);
            let got = std::fs::read(output).unwrap();
            assert!(
                got == data,
                "get -o returned different bytes for size {size}"
            );
            std::fs::remove_file(output).unwrap();

            let stat = cli_ok(&["stat", "--addr", &get_addr, &expected.to_hex(), "--json"]);
            let stat: serde_json::Value = serde_json::from_str(&stat).unwrap();
            assert_eq!(stat["size"], size as u64);
        }

        if size <= 1 << 20 {
            // Small blobs also to stdout.
            let out = cli(&["get", "--addr", &daemon.tcp_addr(), &expected.to_hex()]);
            assert!(out.status.success());
            assert!(out.stdout == data, "get to stdout, size {size}");
        }
    }
}

#[test]
fn put_reads_stdin() {
    let daemon = Daemon::start(None);
    let data = test_data(300_000, 7);
    let mut child = std::process::Command::new(crate::harness::strata_bin())
        .args(["put", "--addr", &daemon.tcp_addr(), "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{}  -\n", B3Digest::of(&data))
    );
}

async fn put_tvix(addr: &str, data: &[u8]) -> B3Digest {
    let pieces: Vec<BlobChunk> = data
        .chunks(100_000)
        .map(|c| BlobChunk {
            data: Bytes::copy_from_slice(c),
        })
        .collect();
    let resp = tvix_client(addr)
        .put(futures::stream::iter(pieces))
        .await
        .unwrap()
        .into_inner();
    B3Digest::try_from(&resp.digest).unwrap()
}

async fn read_tvix(addr: &str, digest: &B3Digest) -> Vec<u8> {
    let mut stream = tvix_client(addr)
        .read(ReadBlobRequest {
            digest: (*digest).into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.next().await {
        out.extend_from_slice(&msg.unwrap().data);
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn both_package_names_serve_the_same_blobs() {
    let daemon = Daemon::start(None);
    for (i, &size) in SIZES.iter().enumerate() {
        let addr = if i % 2 == 0 {
            daemon.tcp_addr()
        } else {
            daemon.unix_addr()
        };
        let data = test_data(size, 100 + i as u64);
        let expected = B3Digest::of(&data);

        assert_eq!(put_blob(&addr, &data).await, expected);
        assert!(
            read_tvix(&addr, &expected).await == data,
            "snix put, tvix read, {size}"
        );

        let other = test_data(size, 200 + i as u64);
        let other_digest = B3Digest::of(&other);
        assert_eq!(put_tvix(&addr, &other).await, other_digest);
        assert!(
            read_blob(&addr, &other_digest).await.unwrap() == other,
            "tvix put, snix read, {size}"
        );

        for client_is_tvix in [false, true] {
            let req = StatBlobRequest {
                digest: expected.into(),
                send_chunks: true,
                ..Default::default()
            };
            let stat = if client_is_tvix {
                tvix_client(&addr).stat(req).await
            } else {
                snix_client(&addr).stat(req).await
            }
            .unwrap()
            .into_inner();
            assert_eq!(stat.size, size as u64, "size in Stat");
            let chunk_sum: u64 = stat.chunks.iter().map(|c| c.size).sum();
            if !stat.chunks.is_empty() {
                assert_eq!(chunk_sum, size as u64, "chunk sizes add up");
            }
            // Every listed chunk can be read by its own digest.
            for c in &stat.chunks {
                let d = B3Digest::try_from(&c.digest).unwrap();
                let chunk = read_blob(&addr, &d).await.unwrap();
                assert_eq!(chunk.len() as u64, c.size);
                assert_eq!(B3Digest::of(&chunk), d);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn small_blobs_come_back_inline_when_asked() {
    let daemon = Daemon::start(None);
    let addr = daemon.tcp_addr();
    let data = test_data(5000, 9);
    let digest = put_blob(&addr, &data).await;
    let stat = snix_client(&addr)
        .stat(StatBlobRequest {
            digest: digest.into(),
            inline_max_size: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stat.inline_data.as_ref(), &data[..]);
    let stat = snix_client(&addr)
        .stat(StatBlobRequest {
            digest: digest.into(),
            inline_max_size: 4999,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stat.inline_data.is_empty());
    assert_eq!(stat.size, 5000);
}

/// An upload through the `grpc` tier that is dropped before `close` is
/// cancelled on the wire: the peer must not store the part it received as
/// a blob of its own.
#[tokio::test(flavor = "multi_thread")]
async fn an_abandoned_upload_leaves_nothing_on_the_peer() {
    use strata::blobservice::BlobService;
    use strata::kinds::grpc::{GrpcBlobService, Protocol};

    let origin = memory_origin().await;
    let addr = origin.tcp_addr().parse().unwrap();
    let peer = GrpcBlobService::new(addr, Protocol::Snix, None).unwrap();
    let part = test_data(3 << 20, 77);
    for _ in 0..5 {
        let mut writer = peer.open_write().await.unwrap();
        for piece in part.chunks(1 << 20) {
            writer.write(Bytes::copy_from_slice(piece)).await.unwrap();
        }
        drop(writer);
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        !peer.has(&B3Digest::of(&part)).await.unwrap(),
        "an abandoned upload was stored"
    );
    // A closed one is.
    let mut writer = peer.open_write().await.unwrap();
    writer.write(Bytes::from(part.clone())).await.unwrap();
    let put = writer.close().await.unwrap();
    assert_eq!(put.digest, B3Digest::of(&part));
    assert!(peer.has(&put.digest).await.unwrap());
}
