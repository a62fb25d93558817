//! gRPC status codes of DESIGN §1: NOT_FOUND for absent blobs,
//! INVALID_ARGUMENT for digests that are not 32 bytes.

use bytes::Bytes;
use futures::StreamExt;
use strata::proto::snix::{ReadBlobRequest, StatBlobRequest};
use tonic::Code;

use crate::harness::{Daemon, snix_client, tvix_client};

async fn stat_code(addr: &str, tvix: bool, digest: Bytes) -> Code {
    let req = StatBlobRequest {
        digest,
        ..Default::default()
    };
    let result = if tvix {
        tvix_client(addr).stat(req).await
    } else {
        snix_client(addr).stat(req).await
    };
    result.expect_err("Stat should fail").code()
}

async fn read_code(addr: &str, tvix: bool, digest: Bytes) -> Code {
    let req = ReadBlobRequest { digest };
    let result = if tvix {
        tvix_client(addr).read(req).await
    } else {
        snix_client(addr).read(req).await
    };
    match result {
        Err(status) => status.code(),
        // The status may also arrive as the first stream item.
        Ok(resp) => match resp.into_inner().next().await {
            Some(Err(status)) => status.code(),
            other => panic!("Read should fail, got {other:?}"),
        },
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn absent_and_malformed_digests() {
    let daemon = Daemon::start(None);
    for addr in [daemon.tcp_addr(), daemon.unix_addr()] {
        for tvix in [false, true] {
            let absent = Bytes::from(vec![0x42; 32]);
            assert_eq!(stat_code(&addr, tvix, absent.clone()).await, Code::NotFound);
            assert_eq!(read_code(&addr, tvix, absent).await, Code::NotFound);
            for len in [0, 31, 33] {
                let bad = Bytes::from(vec![0x42; len]);
                assert_eq!(
                    stat_code(&addr, tvix, bad.clone()).await,
                    Code::InvalidArgument,
                    "Stat, {len} bytes"
                );
                assert_eq!(
                    read_code(&addr, tvix, bad).await,
                    Code::InvalidArgument,
                    "Read, {len} bytes"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_blob_always_exists() {
    let daemon = Daemon::start(None);
    let stat = snix_client(&daemon.tcp_addr())
        .stat(StatBlobRequest {
            digest: strata::B3Digest::EMPTY.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stat.size, 0);
}

#[test]
fn cli_reports_missing_blob_and_leaves_no_file() {
    let daemon = Daemon::start(None);
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("never");
    let result = crate::harness::cli(&[
        "get",
        "--addr",
        &daemon.tcp_addr(),
        &"42".repeat(32),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!result.status.success());
    assert!(String::from_utf8_lossy(&result.stderr).contains("not found"));
    assert_eq!(std::fs::read_dir(out_dir.path()).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn health_reports_serving_for_both_packages() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

    let daemon = Daemon::start(None);
    let mut client = HealthClient::new(crate::harness::channel(&daemon.unix_addr()));
    for service in [
        "",
        "snix.castore.v1.BlobService",
        "tvix.castore.v1.BlobService",
    ] {
        let resp = client
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap_or_else(|s| panic!("health of {service:?}: {s}"))
            .into_inner();
        assert_eq!(resp.status(), ServingStatus::Serving, "{service:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn oversize_messages_are_refused_and_the_server_lives_on() {
    use strata::proto::snix::BlobChunk;

    let daemon = Daemon::start(None);
    let addr = daemon.tcp_addr();
    let big = BlobChunk {
        data: Bytes::from(vec![7u8; 5 << 20]),
    };
    let status = snix_client(&addr)
        .max_encoding_message_size(64 << 20)
        .put(futures::stream::iter(vec![big]))
        .await
        .expect_err("a 5 MiB message is over the 4 MiB cap");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

    // Nothing was stored and the server still answers.
    let digest = strata::B3Digest::of(&vec![7u8; 5 << 20]);
    assert_eq!(stat_code(&addr, false, digest.into()).await, Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn read_only_servers_refuse_puts_and_keep_serving() {
    let data = crate::harness::test_data(10_000, 3);
    // Fill a disk cache, then serve it read-only with a private socket.
    let cache = tempfile::tempdir().unwrap();
    let tiers = format!(
        "[blobservices.root]\ntype = \"disk\"\npath = \"{}\"\n",
        cache.path().display()
    );
    let digest = {
        let writer = crate::harness::start_daemon(tiers.clone()).await;
        crate::harness::put_blob(&writer.tcp_addr(), &data).await
    };
    let config = format!("[server]\nread_only = true\nsocket_mode = \"0600\"\n{tiers}");
    let daemon = crate::harness::start_daemon(config).await;
    let status = snix_client(&daemon.tcp_addr())
        .put(futures::stream::iter(vec![
            strata::proto::snix::BlobChunk {
                data: Bytes::from_static(b"x"),
            },
        ]))
        .await
        .expect_err("a read-only server took a Put");
    assert_eq!(status.code(), Code::PermissionDenied);
    let got = crate::harness::read_blob(&daemon.unix_addr(), &digest)
        .await
        .unwrap();
    assert!(got == data);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&daemon.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// A Stat or Read request is a digest and a few small fields: one larger
/// than `MAX_REQUEST_MESSAGE` is refused at its length prefix, whatever
/// `max_message_size` allows for Puts, so streams that never finish their
/// requests cannot each hold megabytes.
#[tokio::test(flavor = "multi_thread")]
async fn oversize_requests_are_refused() {
    let daemon = Daemon::start(None);
    let addr = daemon.tcp_addr();
    let oversize = Bytes::from(vec![0x42; strata::server::MAX_REQUEST_MESSAGE + 1]);
    for tvix in [false, true] {
        assert_eq!(
            stat_code(&addr, tvix, oversize.clone()).await,
            Code::OutOfRange,
            "Stat"
        );
        assert_eq!(
            read_code(&addr, tvix, oversize.clone()).await,
            Code::OutOfRange,
            "Read"
        );
    }
}
