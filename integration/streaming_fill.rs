//! A cold read streams while its sync fill runs: the client gets the bytes
//! the fill has proven before the fill is over, and a client that stops
//! reading does not hold the fill back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use strata::B3Digest;
use strata::proto::snix::{BlobChunk, ReadBlobRequest, StatBlobRequest};
use tokio::sync::watch;
use tonic::Status;

use crate::front::{FrontHooks, ReadStream, serve_front};
use crate::harness::{
    Daemon, disk_sidecar, memory_origin, metric, put_blob, snix_client, test_data, wait_for_fill,
};

/// Holds back the peer's last chunk of a blob until the gate opens: a Read
/// of that chunk, and in a Read of the whole blob every byte from
/// `hold_from` on.
struct Gate {
    chunk: Vec<u8>,
    blob: Vec<u8>,
    hold_from: usize,
    open: watch::Receiver<bool>,
}

impl Gate {
    async fn wait(mut open: watch::Receiver<bool>) -> Result<(), Status> {
        open.wait_for(|open| *open)
            .await
            .map(|_| ())
            .map_err(|_| Status::unavailable("gate dropped"))
    }
}

#[tonic::async_trait]
impl FrontHooks for Gate {
    async fn before(&self, method: &'static str, digest: &[u8]) -> Result<(), Status> {
        if method == "read" && digest == self.chunk {
            Gate::wait(self.open.clone()).await?;
        }
        Ok(())
    }

    fn read_stream(&self, digest: &[u8], mut upstream: ReadStream) -> ReadStream {
        if digest != self.blob {
            return upstream;
        }
        let open = self.open.clone();
        let hold_from = self.hold_from;
        Box::pin(async_stream::stream! {
            let mut sent = 0;
            while let Some(msg) = upstream.next().await {
                let mut msg = match msg {
                    Ok(msg) => msg,
                    Err(status) => {
                        yield Err(status);
                        return;
                    }
                };
                if sent < hold_from && sent + msg.data.len() > hold_from {
                    let head = msg.data.split_to(hold_from - sent);
                    sent += head.len();
                    yield Ok(BlobChunk { data: head });
                }
                if sent >= hold_from
                    && let Err(status) = Gate::wait(open.clone()).await
                {
                    yield Err(status);
                    return;
                }
                sent += msg.data.len();
                yield Ok(msg);
            }
        })
    }
}

async fn origin_with(blob: &[u8]) -> (Daemon, B3Digest) {
    let origin = memory_origin().await;
    let digest = put_blob(&origin.tcp_addr(), blob).await;
    (origin, digest)
}

fn fills(sidecar: &Daemon) -> f64 {
    metric(&sidecar.metrics(), "strata_tier_fills_total{tier=\"near\"}")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cold_read_streams_before_its_fill_is_over() {
    let blob = test_data(8 << 20, 71);
    let (origin, digest) = origin_with(&blob).await;
    let stat = snix_client(&origin.tcp_addr())
        .stat(StatBlobRequest {
            digest: digest.into(),
            send_chunks: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stat.chunks.len() >= 4, "{} chunks", stat.chunks.len());
    let last = stat.chunks.last().unwrap();

    // The peer holds back its last chunk until the gate opens.
    let (gate, open) = watch::channel(false);
    let proxy_addr = serve_front(
        &origin.tcp_addr(),
        Gate {
            chunk: last.digest.to_vec(),
            blob: digest.as_bytes().to_vec(),
            hold_from: blob.len() - last.size as usize,
            open,
        },
    )
    .await;
    let near = tempfile::tempdir().unwrap();
    let sidecar = disk_sidecar(near.path(), &proxy_addr, "sync").await;

    let mut stream = snix_client(&sidecar.tcp_addr())
        .read(ReadBlobRequest {
            digest: digest.into(),
        })
        .await
        .unwrap()
        .into_inner();
    // Everything up to the group the held-back chunk starts in is proven
    // without it.
    let before_last = blob.len() - last.size as usize;
    let provable = before_last - before_last % (16 * 1024);
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < provable {
        let msg = tokio::time::timeout_at(deadline.into(), stream.next())
            .await
            .expect("the client got nothing while the fill waited for its last chunk")
            .expect("stream ended early")
            .unwrap();
        got.extend_from_slice(&msg.data);
    }
    assert_eq!(&got[..], &blob[..got.len()]);
    assert_eq!(
        fills(&sidecar),
        0.0,
        "the fill finished without its last chunk"
    );

    gate.send(true).unwrap();
    while let Some(msg) = stream.next().await {
        got.extend_from_slice(&msg.unwrap().data);
    }
    assert!(got == blob, "the streamed blob differs");
    // The fill completes, and the next read is local.
    wait_for_fill(&sidecar).await;
    drop(origin);
    let again = crate::harness::read_blob(&sidecar.tcp_addr(), &digest)
        .await
        .unwrap();
    assert!(again == blob);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_does_not_hold_the_fill_back() {
    let blob = Arc::new(test_data(48 << 20, 72));
    let (origin, digest) = origin_with(&blob).await;
    let near = tempfile::tempdir().unwrap();
    let sidecar = disk_sidecar(near.path(), &origin.tcp_addr(), "sync").await;

    let mut stream = snix_client(&sidecar.tcp_addr())
        .read(ReadBlobRequest {
            digest: digest.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = stream.next().await.unwrap().unwrap().data.to_vec();
    // The client pauses with most of the blob still to come (more than the
    // transport's windows and the tap hold): the fill goes on without it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while fills(&sidecar) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the fill waited for a client that stopped reading"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(got.len() < blob.len() / 2);
    // The client then reads on, from the filled tier, without a gap.
    while let Some(msg) = stream.next().await {
        got.extend_from_slice(&msg.unwrap().data);
    }
    assert!(got[..] == blob[..], "the resumed blob differs");
    let log = sidecar.log_text();
    assert!(
        !log.contains("ERROR"),
        "errors while the client paused:\n{log}"
    );
}
