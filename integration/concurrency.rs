//! Many clients at once: every answer is right.

use bytes::Bytes;
use futures::StreamExt;
use strata::B3Digest;
use strata::proto::snix::{BlobChunk, ReadBlobRequest};

use crate::harness::{Daemon, snix_client, test_data};

#[tokio::test(flavor = "multi_thread")]
async fn sixty_four_clients_put_and_get_distinct_blobs() {
    let daemon = tokio::task::spawn_blocking(|| Daemon::start(None))
        .await
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64u64 {
        // Half over TCP, half over the socket; sizes from tiny to multi-chunk.
        let addr = if i % 2 == 0 {
            daemon.tcp_addr()
        } else {
            daemon.unix_addr()
        };
        tasks.spawn(async move {
            let size = (i as usize * 37_813) % (2 << 20) + 1;
            let data = test_data(size, 1000 + i);
            let digest = B3Digest::of(&data);
            let mut client = snix_client(&addr);
            let pieces: Vec<BlobChunk> = data
                .chunks(64 * 1024)
                .map(|c| BlobChunk {
                    data: Bytes::copy_from_slice(c),
                })
                .collect();
            let put = client
                .put(futures::stream::iter(pieces))
                .await
                .expect("put")
                .into_inner();
            assert_eq!(
                B3Digest::try_from(&put.digest).unwrap(),
                digest,
                "client {i}"
            );
            let mut stream = client
                .read(ReadBlobRequest {
                    digest: digest.into(),
                })
                .await
                .expect("read")
                .into_inner();
            let mut got = Vec::with_capacity(size);
            while let Some(msg) = stream.next().await {
                got.extend_from_slice(&msg.expect("read stream").data);
            }
            assert!(got == data, "client {i} read back different bytes");
        });
    }
    let mut done = 0;
    while let Some(result) = tasks.join_next().await {
        result.expect("client task");
        done += 1;
    }
    assert_eq!(done, 64);
}
