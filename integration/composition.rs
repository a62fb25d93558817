//! The composition engine end to end: chains of real daemons, fills,
//! single-flight, timeouts, and configuration errors.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use strata::proto::snix::ReadBlobRequest;
use strata::proto::snix::blob_service_client::BlobServiceClient;
use strata::proto::snix::blob_service_server::BlobServiceServer;
use strata::testkit::CountingProxy;
use tonic::transport::server::TcpIncoming;

use crate::harness::{
    Daemon, channel, put_blob as put, read_blob, snix_client, stalled_peer, start_daemon as start,
    test_data,
};

fn tiers_config(near: &std::path::Path, upstream: &str, fill: &str) -> String {
    format!(
        r#"
[blobservices.root]
type = "tiers"
tiers = ["mem", "disk", "{upstream}"]
fill = "{fill}"

[blobservices.mem]
type = "memory"
max_size = "64MiB"

[blobservices.disk]
type = "disk"
path = "{}"
max_size = "1GiB"
"#,
        near.display()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn three_process_chain_fills_the_near_tiers() {
    let work = tempfile::tempdir().unwrap();
    let bucket = work.path().join("bucket");
    std::fs::create_dir(&bucket).unwrap();
    let mut origin = start(format!(
        "[blobservices.root]\ntype = \"objectstore\"\nobject_store_url = \"file://{}\"\n",
        bucket.display()
    ))
    .await;
    let mut peer = start(tiers_config(
        &work.path().join("peer"),
        &origin.unix_addr(),
        "sync",
    ))
    .await;
    let sidecar = start(tiers_config(
        &work.path().join("sidecar"),
        &peer.unix_addr(),
        "sync",
    ))
    .await;
    let nofill = start(tiers_config(
        &work.path().join("nofill"),
        &peer.unix_addr(),
        "off",
    ))
    .await;

    let blobs: Vec<Vec<u8>> = [100_000usize, 5 << 20]
        .iter()
        .map(|&n| test_data(n, n as u64))
        .collect();
    let mut digests = Vec::new();
    for b in &blobs {
        digests.push(put(&origin.tcp_addr(), b).await);
    }
    for (d, b) in digests.iter().zip(&blobs) {
        assert!(
            read_blob(&sidecar.tcp_addr(), d).await.unwrap() == *b,
            "through the chain"
        );
        assert!(
            read_blob(&nofill.tcp_addr(), d).await.unwrap() == *b,
            "fill = off still reads"
        );
    }

    peer.kill();
    origin.kill();
    for (d, b) in digests.iter().zip(&blobs) {
        assert!(
            read_blob(&sidecar.tcp_addr(), d).await.unwrap() == *b,
            "the sidecar's near tiers were filled"
        );
        assert!(
            read_blob(&nofill.tcp_addr(), d).await.is_err(),
            "fill = off kept nothing"
        );
    }
    // The log names the tier that failed.
    assert!(nofill.log_text().contains(&peer.unix_addr()) || nofill.log_text().contains("tier="));
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_cold_reads_fetch_upstream_once() {
    let origin =
        start("[blobservices.root]\ntype = \"memory\"\nmax_size = \"512MiB\"\n".into()).await;
    let data = test_data(100 << 20, 4242);
    let digest = put(&origin.tcp_addr(), &data).await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = format!("grpc+http://{}", listener.local_addr().unwrap());
    let (proxy, read_bytes) = CountingProxy::new(
        BlobServiceClient::new(channel(&origin.tcp_addr())).max_decoding_message_size(64 << 20),
    );
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(BlobServiceServer::new(proxy).max_encoding_message_size(64 << 20))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );

    let work = tempfile::tempdir().unwrap();
    let sidecar = start(tiers_config(work.path(), &proxy_addr, "sync")).await;
    let expected = blake3::hash(&data);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100 {
        let addr = if i % 2 == 0 {
            sidecar.tcp_addr()
        } else {
            sidecar.unix_addr()
        };
        tasks.spawn(async move {
            let mut stream = snix_client(&addr)
                .read(ReadBlobRequest {
                    digest: digest.into(),
                })
                .await
                .expect("read")
                .into_inner();
            let mut hasher = blake3::Hasher::new();
            while let Some(msg) = stream.next().await {
                hasher.update(&msg.expect("stream").data);
            }
            hasher.finalize()
        });
    }
    while let Some(got) = tasks.join_next().await {
        assert_eq!(got.unwrap(), expected);
    }
    let upstream = read_bytes.load(Ordering::SeqCst);
    let factor = upstream as f64 / data.len() as f64;
    eprintln!(
        "upstream bytes: {upstream} for a {} byte blob (factor {factor:.3})",
        data.len()
    );
    assert_eq!(upstream, data.len() as u64, "upstream factor {factor}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_tier_is_skipped_after_its_timeout() {
    let hung = stalled_peer();
    let good = start("[blobservices.root]\ntype = \"memory\"\n".into()).await;
    let data = test_data(300_000, 5);
    let digest = put(&good.tcp_addr(), &data).await;

    let sidecar = start(format!(
        r#"
[blobservices.root]
type = "tiers"
tiers = ["hung", "good"]
fill = "off"

[blobservices.hung]
type = "grpc"
url = "{hung}"
timeout = "300ms"

[blobservices.good]
type = "grpc"
url = "{}"
"#,
        good.tcp_addr()
    ))
    .await;
    let started = Instant::now();
    let got = read_blob(&sidecar.tcp_addr(), &digest).await.unwrap();
    let elapsed = started.elapsed();
    assert!(got == data);
    // Generous bound: a hung tier must not hold a read for long.
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    assert!(
        sidecar.log_text().contains("timed out"),
        "{}",
        sidecar.log_text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn async_fills_land_and_survive_a_graceful_shutdown() {
    let origin = start("[blobservices.root]\ntype = \"memory\"\n".into()).await;
    let data = test_data(3 << 20, 6);
    let digest = put(&origin.tcp_addr(), &data).await;

    let work = tempfile::tempdir().unwrap();
    let config = tiers_config(work.path(), &origin.tcp_addr(), "async");
    let sidecar = start(config.clone()).await;
    assert!(read_blob(&sidecar.tcp_addr(), &digest).await.unwrap() == data);
    // SIGTERM right away: the queued fill must still reach the disk tier.
    let pid = sidecar.pid();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let mut sidecar = sidecar;
    let status = sidecar.wait();
    assert!(status.success(), "exit status {status}");
    drop(origin);

    let sidecar = start(config).await;
    assert!(
        read_blob(&sidecar.tcp_addr(), &digest).await.unwrap() == data,
        "the async fill was lost"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_default_composition_keeps_blobs_across_restarts() {
    let cache = tempfile::tempdir().unwrap();
    let data = test_data(2 << 20, 7);
    let digest = {
        let daemon = tokio::task::spawn_blocking({
            let cache = cache.path().to_owned();
            move || Daemon::start_with_cache_home(None, &cache)
        })
        .await
        .unwrap();
        put(&daemon.tcp_addr(), &data).await
    };
    let daemon = tokio::task::spawn_blocking({
        let cache = cache.path().to_owned();
        move || Daemon::start_with_cache_home(None, &cache)
    })
    .await
    .unwrap();
    assert!(read_blob(&daemon.tcp_addr(), &digest).await.unwrap() == data);
    assert!(cache.path().join("strata/blobs/blobs").is_dir());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_race_is_won_by_the_member_that_answers() {
    let good = start("[blobservices.root]\ntype = \"memory\"\n".into()).await;
    let data = test_data(1 << 20, 8);
    let digest = put(&good.tcp_addr(), &data).await;

    // The answer's own time, measured directly.
    let started = Instant::now();
    assert!(read_blob(&good.tcp_addr(), &digest).await.unwrap() == data);
    let direct = started.elapsed();

    let hedge = Duration::from_millis(200);
    let racer = start(format!(
        r#"
[blobservices.root]
type = "race"
members = ["stalled", "good"]
hedge_after = "200ms"

[blobservices.stalled]
type = "grpc"
url = "{}"

[blobservices.good]
type = "grpc"
url = "{}"
"#,
        stalled_peer(),
        good.tcp_addr()
    ))
    .await;
    let started = Instant::now();
    assert!(read_blob(&racer.tcp_addr(), &digest).await.unwrap() == data);
    let raced = started.elapsed();
    eprintln!("direct {direct:?}, raced {raced:?}, hedge {hedge:?}");
    // The stalled member alone would never answer; the race answers after
    // the hedge delay plus the good member's own time (slack for a loaded
    // machine).
    assert!(raced >= hedge, "answered before the hedge delay: {raced:?}");
    assert!(
        raced < hedge + direct * 2 + Duration::from_secs(2),
        "took {raced:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shard_keeps_serving_when_a_member_dies() {
    let mut peers = Vec::new();
    for _ in 0..3 {
        peers.push(start("[blobservices.root]\ntype = \"memory\"\n".into()).await);
    }
    let config = format!(
        r#"
[blobservices.root]
type = "shard"
members = ["p0", "p1", "p2"]

[blobservices.p0]
type = "grpc"
url = "{}"
timeout = "2s"

[blobservices.p1]
type = "grpc"
url = "{}"
timeout = "2s"

[blobservices.p2]
type = "grpc"
url = "{}"
timeout = "2s"
"#,
        peers[0].unix_addr(),
        peers[1].unix_addr(),
        peers[2].unix_addr()
    );
    let front = start(config).await;
    let blobs: Vec<Vec<u8>> = (0..30)
        .map(|i| test_data(20_000 + i * 1000, 900 + i as u64))
        .collect();
    let mut digests = Vec::new();
    for b in &blobs {
        digests.push(put(&front.tcp_addr(), b).await);
    }
    // Blobs are spread over the pool.
    let mut holders = [0usize; 3];
    for d in &digests {
        for (i, p) in peers.iter().enumerate() {
            if read_blob(&p.tcp_addr(), d).await.is_ok() {
                holders[i] += 1;
            }
        }
    }
    assert_eq!(
        holders.iter().sum::<usize>(),
        blobs.len(),
        "each blob on one member"
    );
    assert!(holders.iter().all(|&h| h > 0), "{holders:?}");

    // Kill the member holding the most; blobs it owned now go to the
    // next-ranked member: writes succeed and read back.
    let victim = (0..3).max_by_key(|&i| holders[i]).unwrap();
    peers[victim].kill();
    for (i, b) in blobs.iter().enumerate() {
        let d = put(&front.tcp_addr(), b).await;
        assert_eq!(d, digests[i]);
        assert!(
            read_blob(&front.tcp_addr(), &d).await.unwrap() == *b,
            "blob {i}"
        );
    }
}

/// The members of a shard of `peers`, as composition entries `p0`, `p1`, …
fn shard_members(peers: &[Daemon]) -> String {
    let names: Vec<String> = (0..peers.len()).map(|i| format!("\"p{i}\"")).collect();
    let mut config = format!(
        "[blobservices.pool]\ntype = \"shard\"\nmembers = [{}]\n",
        names.join(", ")
    );
    for (i, p) in peers.iter().enumerate() {
        config.push_str(&format!(
            "\n[blobservices.p{i}]\ntype = \"grpc\"\nurl = \"{}\"\ntimeout = \"5s\"\n",
            p.unix_addr()
        ));
    }
    config
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sidecar_fills_its_disk_from_a_shard() {
    let mut peers = Vec::new();
    for _ in 0..3 {
        peers.push(start("[blobservices.root]\ntype = \"memory\"\n".into()).await);
    }
    let pool = shard_members(&peers);
    // A front that writes into the pool: each blob lands on its owner.
    let front = start(format!(
        "[blobservices.root]\ntype = \"tiers\"\ntiers = [\"pool\"]\nwrite_to = [\"pool\"]\n\n{pool}"
    ))
    .await;
    let disk = tempfile::tempdir().unwrap();
    let sidecar_config = format!(
        "[blobservices.root]\ntype = \"tiers\"\ntiers = [\"near\", \"pool\"]\n\n\
         [blobservices.near]\ntype = \"disk\"\npath = {}\n\n{pool}",
        toml::Value::String(disk.path().display().to_string())
    );
    let sidecar =
        tokio::task::spawn_blocking(move || Daemon::start_with_metrics(Some(&sidecar_config)))
            .await
            .unwrap();

    // Several chunks, so the fill goes by the chunk list; the second blob
    // starts with the first's bytes, so it shares its first chunks and its
    // fill fetches only the others, chunk by chunk.
    let first = test_data(3 << 20, 77);
    let mut second = first[..2 << 20].to_vec();
    second.extend_from_slice(&test_data(2 << 20, 78));
    let mut digests = Vec::new();
    for (n, blob) in [&first, &second].into_iter().enumerate() {
        let digest = put(&front.tcp_addr(), blob).await;
        assert_eq!(
            read_blob(&sidecar.tcp_addr(), &digest).await.unwrap(),
            *blob
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while crate::harness::metric(&sidecar.metrics(), "strata_tier_fills_total{tier=\"near\"}")
            < (n + 1) as f64
        {
            assert!(Instant::now() < deadline, "blob {n} was never filled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        digests.push(digest);
    }

    // The pool is gone; the sidecar still has both blobs.
    for p in &mut peers {
        p.kill();
    }
    assert_eq!(
        read_blob(&sidecar.tcp_addr(), &digests[0]).await.unwrap(),
        first
    );
    assert_eq!(
        read_blob(&sidecar.tcp_addr(), &digests[1]).await.unwrap(),
        second
    );
}
