//! A peer that hangs: the sidecar's requests fall through to the next tier
//! within the peer's timeout; after `failures` of them the breaker opens
//! (seen in /metrics) and the peer is no longer called; once the peer
//! recovers, a probe closes the breaker and the peer serves again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use strata::addr::PeerAddr;
use strata::proto::snix::blob_service_client::BlobServiceClient;
use strata::proto::snix::blob_service_server::{BlobService, BlobServiceServer};
use strata::proto::snix::{
    BlobChunk, PutBlobResponse, ReadBlobRequest, StatBlobRequest, StatBlobResponse,
};
use tonic::transport::Channel;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use crate::harness::{Daemon, metric, put_blob, read_blob, test_data};

/// Forwards to an upstream, or hangs every call while `hang` is set;
/// counts the calls it receives.
struct HangingProxy {
    upstream: BlobServiceClient<Channel>,
    hang: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
}

impl HangingProxy {
    async fn gate(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.hang.load(Ordering::SeqCst) {
            futures::future::pending::<()>().await;
        }
    }
}

#[tonic::async_trait]
impl BlobService for HangingProxy {
    async fn stat(
        &self,
        request: Request<StatBlobRequest>,
    ) -> Result<Response<StatBlobResponse>, Status> {
        self.gate().await;
        self.upstream.clone().stat(request.into_inner()).await
    }

    type ReadStream = futures::stream::BoxStream<'static, Result<BlobChunk, Status>>;

    async fn read(
        &self,
        request: Request<ReadBlobRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        self.gate().await;
        let stream = self
            .upstream
            .clone()
            .read(request.into_inner())
            .await?
            .into_inner();
        Ok(Response::new(stream.boxed()))
    }

    async fn put(
        &self,
        _request: Request<Streaming<BlobChunk>>,
    ) -> Result<Response<PutBlobResponse>, Status> {
        Err(Status::unimplemented("read-only proxy"))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_peer_is_skipped_then_probed_back() {
    let origin = tokio::task::spawn_blocking(|| {
        Daemon::start(Some(
            "[blobservices.root]\ntype = \"memory\"\nmax_size = \"64MiB\"\n",
        ))
    })
    .await
    .unwrap();
    let blobs: Vec<Vec<u8>> = (0..12).map(|i| test_data(100_000, 50 + i)).collect();
    let mut digests = Vec::new();
    for b in &blobs {
        digests.push(put_blob(&origin.tcp_addr(), b).await);
    }

    let hang = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let upstream = BlobServiceClient::new(
        origin
            .tcp_addr()
            .parse::<PeerAddr>()
            .unwrap()
            .channel(Duration::from_secs(5))
            .unwrap(),
    );
    let proxy = HangingProxy {
        upstream,
        hang: hang.clone(),
        calls: calls.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(BlobServiceServer::new(proxy))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );

    // No fill tier: every read goes to the flaky peer first.
    let config = format!(
        "[blobservices.root]\ntype = \"tiers\"\ntiers = [\"flaky\", \"origin\"]\n\n\
         [blobservices.flaky]\ntype = \"grpc\"\nurl = \"grpc+http://{proxy_addr}\"\n\
         first_byte_timeout = \"300ms\"\nbreaker = {{ failures = 3, open_for = \"3s\" }}\n\n\
         [blobservices.origin]\ntype = \"grpc\"\nurl = \"{}\"\n",
        origin.tcp_addr()
    );
    let sidecar = tokio::task::spawn_blocking(move || Daemon::start_with_metrics(Some(&config)))
        .await
        .unwrap();
    let addr = sidecar.tcp_addr();
    let open = |page: &str| metric(page, "strata_tier_breaker_open{tier=\"flaky\"}");

    // Healthy: served through the flaky peer.
    assert!(read_blob(&addr, &digests[0]).await.unwrap() == blobs[0]);
    assert!(calls.load(Ordering::SeqCst) > 0);

    // Hung: each read falls through to the origin after the timeout, until
    // three failures open the breaker.
    hang.store(true, Ordering::SeqCst);
    let mut latencies = Vec::new();
    for i in 1..4 {
        let started = Instant::now();
        assert!(read_blob(&addr, &digests[i]).await.unwrap() == blobs[i]);
        latencies.push(started.elapsed());
    }
    println!("fall-through latency with the peer hung (first_byte_timeout 300ms): {latencies:?}");
    let page = sidecar.metrics();
    assert_eq!(open(&page), 1.0, "breaker not open:\n{page}");
    assert_eq!(
        metric(&page, "strata_tier_breaker_trips_total{tier=\"flaky\"}"),
        1.0
    );

    // Open: the peer is not called at all.
    let before = calls.load(Ordering::SeqCst);
    let started = Instant::now();
    assert!(read_blob(&addr, &digests[4]).await.unwrap() == blobs[4]);
    println!("read with the breaker open: {:?}", started.elapsed());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        before,
        "the open breaker let a call through"
    );

    // Recovered: within a few open periods a probe succeeds and the
    // breaker closes; the peer serves again.
    hang.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 5;
    loop {
        assert!(read_blob(&addr, &digests[i]).await.unwrap() == blobs[i]);
        i = 5 + (i - 4) % 7;
        if open(&sidecar.metrics()) == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the breaker never closed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = calls.load(Ordering::SeqCst);
    assert!(read_blob(&addr, &digests[11]).await.unwrap() == blobs[11]);
    assert!(
        calls.load(Ordering::SeqCst) > before,
        "the peer is not used again"
    );
    let log = sidecar.log_text();
    assert!(
        log.contains("circuit open") && log.contains("circuit closed"),
        "{log}"
    );
}
