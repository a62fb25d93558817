//! A peer that hangs: the sidecar's requests fall through to the next tier
//! within the peer's timeout; after `failures` of them the breaker opens
//! (seen in /metrics) and the peer is no longer called; once the peer
//! recovers, a probe closes the breaker and the peer serves again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tonic::Status;

use crate::front::{FrontHooks, serve_front};
use crate::harness::{Daemon, metric, put_blob, read_blob, test_data};

/// Hangs every call while `hang` is set; counts the calls it receives.
struct Hanging {
    hang: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl FrontHooks for Hanging {
    async fn before(&self, _method: &'static str, _digest: &[u8]) -> Result<(), Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.hang.load(Ordering::SeqCst) {
            futures::future::pending::<()>().await;
        }
        Ok(())
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
    let proxy_addr = serve_front(
        &origin.tcp_addr(),
        Hanging {
            hang: hang.clone(),
            calls: calls.clone(),
        },
    )
    .await;

    // No fill tier: every read goes to the flaky peer first.
    let config = format!(
        "[blobservices.root]\ntype = \"tiers\"\ntiers = [\"flaky\", \"origin\"]\n\n\
         [blobservices.flaky]\ntype = \"grpc\"\nurl = \"{proxy_addr}\"\n\
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
