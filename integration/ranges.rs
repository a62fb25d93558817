//! Ranged reads (`strata get --range`) of a blob that is only on a far peer:
//! the right bytes, verified, moving about the range and not the blob.

use std::sync::atomic::Ordering;

use strata::proto::snix::blob_service_client::BlobServiceClient;
use strata::proto::snix::blob_service_server::BlobServiceServer;
use strata::testkit::CountingProxy;
use tonic::transport::server::TcpIncoming;

use crate::harness::{Daemon, channel, cli, put_blob, test_data};

#[tokio::test(flavor = "multi_thread")]
async fn a_range_of_a_remote_blob_moves_about_the_range() {
    let origin = tokio::task::spawn_blocking(|| {
        Daemon::start(Some(
            "[blobservices.root]\ntype = \"memory\"\nmax_size = \"256MiB\"\n",
        ))
    })
    .await
    .unwrap();
    let size = 64 << 20;
    let data = test_data(size, 31);
    let digest = put_blob(&origin.tcp_addr(), &data).await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = format!("grpc+http://{}", listener.local_addr().unwrap());
    let (proxy, read_bytes) = CountingProxy::new(
        BlobServiceClient::new(channel(&origin.tcp_addr())).max_decoding_message_size(64 << 20),
    );
    let stat_bytes = proxy.stat_bytes();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(BlobServiceServer::new(proxy).max_encoding_message_size(64 << 20))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    let near = tempfile::tempdir().unwrap();
    let config = format!(
        "[blobservices.root]\ntype = \"tiers\"\ntiers = [\"mem\", \"disk\", \"{proxy_addr}\"]\n\n\
         [blobservices.mem]\ntype = \"memory\"\nmax_size = \"32MiB\"\n\n\
         [blobservices.disk]\ntype = \"disk\"\npath = \"{}\"\n",
        near.path().display()
    );
    let sidecar = tokio::task::spawn_blocking(move || Daemon::start(Some(&config)))
        .await
        .unwrap();

    let out_dir = tempfile::tempdir().unwrap();
    for (i, (start, len)) in [
        (40_000_000usize, 1 << 20),
        (12_345, 100),
        (size - 5000, 5000),
    ]
    .into_iter()
    .enumerate()
    {
        let out = out_dir.path().join(format!("range{i}"));
        let range = format!("{start}..{}", start + len);
        let result = cli(&[
            "get",
            "--addr",
            &sidecar.tcp_addr(),
            &digest.to_hex(),
            "--range",
            &range,
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(
            result.status.success(),
            "{range}: {}",
            String::from_utf8_lossy(&result.stderr)
        );
        let got = std::fs::read(&out).unwrap();
        assert!(got == data[start..start + len], "{range}: wrong bytes");
        let moved = read_bytes.swap(0, Ordering::Relaxed);
        let stats = stat_bytes.swap(0, Ordering::Relaxed);
        println!("range {range}: {moved} bytes read upstream, {stats} bytes of Stat responses");
        // The covering chunks, and at most one more on each side (chunks
        // are at most 512 KiB), whether Read or sent inline with the Stat
        // before a read; and the Stats, which the outboard (64 bytes per
        // 16 KiB) dominates.
        let chunks_bound = (len + 4 * 512 * 1024) as u64;
        let stats_bound = (size as u64 / 16384) * 64 * 2 + 64 * 1024;
        assert!(
            moved + stats <= chunks_bound + stats_bound,
            "{range}: {moved} bytes read and {stats} bytes of Stats upstream"
        );
    }

    // A range past the end is refused.
    let result = cli(&[
        "get",
        "--addr",
        &sidecar.tcp_addr(),
        &digest.to_hex(),
        "--range",
        &format!("0..{}", size + 1),
    ]);
    assert!(!result.status.success());
    assert!(String::from_utf8_lossy(&result.stderr).contains("past the end"));
}
