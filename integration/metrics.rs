//! `/metrics` counters move with traffic: a sidecar `[mem, disk, peer]`
//! served with `--metrics-listen`, scraped before and after Puts, warm and
//! cold reads, concurrent cold reads, misses and evictions.

use crate::harness::{Daemon, metric, put_blob, read_blob, test_data};

fn sidecar_config(disk: &std::path::Path, peer: &str) -> String {
    format!(
        "[blobservices.root]\ntype = \"tiers\"\ntiers = [\"mem\", \"disk\", \"peer\"]\n\n\
         [blobservices.mem]\ntype = \"memory\"\nmax_size = \"4MiB\"\n\n\
         [blobservices.disk]\ntype = \"disk\"\npath = \"{}\"\nmax_size = \"1GiB\"\n\n\
         [blobservices.peer]\ntype = \"grpc\"\nurl = \"{peer}\"\n",
        disk.display()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn counters_move_with_traffic() {
    let peer = tokio::task::spawn_blocking(|| {
        Daemon::start(Some(
            "[blobservices.root]\ntype = \"memory\"\nmax_size = \"256MiB\"\n",
        ))
    })
    .await
    .unwrap();
    let disk = tempfile::tempdir().unwrap();
    let config = sidecar_config(disk.path(), &peer.tcp_addr());
    let sidecar = tokio::task::spawn_blocking(move || Daemon::start_with_metrics(Some(&config)))
        .await
        .unwrap();
    let page = sidecar.metrics();
    assert!(
        page.trim_end().ends_with("# EOF"),
        "not OpenMetrics:\n{page}"
    );
    assert_eq!(
        metric(
            &page,
            "strata_rpc_requests_total{method=\"Put\",code=\"Ok\"}"
        ),
        0.0
    );

    // A Put lands on the disk tier.
    let put = test_data(3 << 20, 1);
    let put_digest = put_blob(&sidecar.tcp_addr(), &put).await;
    assert!(read_blob(&sidecar.tcp_addr(), &put_digest).await.unwrap() == put);

    // Cold reads: blobs only the peer has, each 1 MiB, filled into mem
    // (4 MiB: the later ones evict the earlier) and disk.
    let mut cold = Vec::new();
    for seed in 10..18 {
        let data = test_data(1 << 20, seed);
        cold.push((put_blob(&peer.tcp_addr(), &data).await, data));
    }
    for (digest, data) in &cold {
        assert!(read_blob(&sidecar.tcp_addr(), digest).await.unwrap() == *data);
    }

    // Concurrent cold readers of one blob share one fetch.
    let shared = test_data(16 << 20, 30);
    let shared_digest = put_blob(&peer.tcp_addr(), &shared).await;
    let readers: Vec<_> = (0..20)
        .map(|_| {
            let addr = sidecar.tcp_addr();
            tokio::spawn(async move { read_blob(&addr, &shared_digest).await.map(|d| d.len()) })
        })
        .collect();
    for r in readers {
        assert_eq!(r.await.unwrap().unwrap(), shared.len());
    }

    // A miss everywhere.
    let absent = strata::B3Digest::of(b"no such blob");
    assert!(read_blob(&sidecar.tcp_addr(), &absent).await.is_err());

    let page = sidecar.metrics();
    let m = |series: &str| metric(&page, series);
    assert_eq!(
        m("strata_rpc_requests_total{method=\"Put\",code=\"Ok\"}"),
        1.0
    );
    assert!(m("strata_rpc_requests_total{method=\"Read\",code=\"Ok\"}") >= 29.0);
    assert_eq!(
        m("strata_rpc_requests_total{method=\"Read\",code=\"NotFound\"}"),
        1.0
    );
    assert_eq!(m("strata_rpc_duration_seconds_count{method=\"Put\"}"), 1.0);
    assert_eq!(m("strata_rpc_in_flight"), 0.0, "{page}");
    let cold_bytes = ((8 << 20) + shared.len()) as f64;
    assert!(
        m("strata_tier_read_bytes_total{tier=\"peer\"}") >= cold_bytes,
        "{page}"
    );
    assert!(m("strata_tier_written_bytes_total{tier=\"disk\"}") >= cold_bytes + put.len() as f64);
    assert!(m("strata_tier_fills_total{tier=\"disk\"}") >= 9.0, "{page}");
    assert!(m("strata_tier_fills_total{tier=\"mem\"}") >= 8.0, "{page}");
    assert!(
        m("strata_tier_evictions_total{tier=\"mem\"}") >= 1.0,
        "{page}"
    );
    let mem = m("strata_tier_occupancy_bytes{tier=\"mem\"}");
    assert!(
        mem > 0.0 && mem <= (4 << 20) as f64 * 1.1,
        "mem occupancy {mem}"
    );
    assert!(
        m("strata_tier_occupancy_bytes{tier=\"disk\"}") >= cold_bytes,
        "{page}"
    );
    assert!(m("strata_tier_hits_total{tier=\"peer\"}") >= 9.0);
    assert!(m("strata_tier_misses_total{tier=\"peer\"}") >= 1.0);
    assert!(m("strata_tier_misses_total{tier=\"mem\"}") >= 10.0);
    assert!(m("strata_tier_request_duration_seconds_count{tier=\"disk\",op=\"stat\"}") >= 10.0);
    assert!(m("strata_singleflight_joins_total") >= 1.0, "{page}");
    assert_eq!(
        m("strata_tier_verification_failures_total{tier=\"peer\"}"),
        0.0
    );
}
