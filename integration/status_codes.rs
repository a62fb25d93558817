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
