//! Overload answers RESOURCE_EXHAUSTED, not a crash or a queue: Reads held
//! open fill the concurrency limits, further requests are refused at once,
//! and the slots come back when the Reads end. An optional Put cap refuses
//! larger blobs.

use strata::proto::snix::{BlobChunk, ReadBlobRequest, StatBlobRequest};
use tonic::Code;

use crate::harness::{Daemon, metric, put_blob, read_blob, snix_client, start_daemon, test_data};

/// Starts a Read of `digest` and takes its first message only: the server's
/// stream then waits on flow control, holding its slot.
async fn hold_read(
    addr: &str,
    digest: &strata::B3Digest,
) -> tonic::Streaming<strata::proto::snix::BlobChunk> {
    let mut stream = snix_client(addr)
        .read(ReadBlobRequest {
            digest: (*digest).into(),
        })
        .await
        .expect("read accepted")
        .into_inner();
    stream.message().await.expect("first message");
    stream
}

async fn stat_code(addr: &str, digest: &strata::B3Digest) -> Code {
    match snix_client(addr)
        .stat(StatBlobRequest {
            digest: (*digest).into(),
            ..Default::default()
        })
        .await
    {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_over_the_limits_are_refused_until_slots_free() {
    for (total, per_client) in [(2, 100), (100, 2)] {
        let config = format!(
            "[server]\nmax_concurrent_requests = {total}\nmax_concurrent_per_client = {per_client}\n\n\
             [blobservices.root]\ntype = \"memory\"\nmax_size = \"256MiB\"\n"
        );
        let daemon = tokio::task::spawn_blocking(move || Daemon::start_with_metrics(Some(&config)))
            .await
            .unwrap();
        let addr = daemon.tcp_addr();
        // Larger than the HTTP/2 windows, so an unread stream stalls.
        let digest = put_blob(&addr, &test_data(64 << 20, 9)).await;
        let first = hold_read(&addr, &digest).await;
        let second = hold_read(&addr, &digest).await;
        assert_eq!(
            stat_code(&addr, &digest).await,
            Code::ResourceExhausted,
            "limits ({total}, {per_client})"
        );
        drop((first, second));
        // The server notices the reset streams asynchronously, one by one.
        let mut code = Code::ResourceExhausted;
        let mut page = String::new();
        for _ in 0..200 {
            code = stat_code(&addr, &digest).await;
            page = daemon.metrics();
            if code == Code::Ok && metric(&page, "strata_rpc_in_flight") == 0.0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(code, Code::Ok, "slots never came back");
        assert!(
            metric(
                &page,
                "strata_rpc_requests_total{method=\"Stat\",code=\"ResourceExhausted\"}"
            ) >= 1.0
        );
        assert_eq!(metric(&page, "strata_rpc_in_flight"), 0.0, "{page}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn puts_over_the_cap_are_refused_and_leave_nothing() {
    let daemon = start_daemon(
        "[server]\nmax_put_size = \"1MiB\"\n\n\
         [blobservices.root]\ntype = \"memory\"\nmax_size = \"64MiB\"\n"
            .into(),
    )
    .await;
    let addr = daemon.tcp_addr();
    let small = test_data(1 << 20, 1);
    let small_digest = put_blob(&addr, &small).await;
    assert_eq!(small_digest, strata::B3Digest::of(&small));

    let big = test_data(3 << 20, 2);
    let chunks: Vec<BlobChunk> = big
        .chunks(256 << 10)
        .map(|c| BlobChunk {
            data: bytes::Bytes::copy_from_slice(c),
        })
        .collect();
    let refused = snix_client(&addr)
        .put(futures::stream::iter(chunks))
        .await
        .expect_err("an oversize Put was accepted");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("max_put_size"), "{refused:?}");
    assert_eq!(
        stat_code(&addr, &strata::B3Digest::of(&big)).await,
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_fit_a_small_message_cap() {
    // Chunks run up to 512 KiB; with the cap at 512 KiB, a whole chunk and
    // its framing would not fit one message.
    let daemon = start_daemon(
        "[server]\nmax_message_size = \"512KiB\"\n\n\
         [blobservices.root]\ntype = \"memory\"\nmax_size = \"64MiB\"\n"
            .to_string(),
    )
    .await;
    let blob = test_data(6 << 20, 91);
    let pieces: Vec<BlobChunk> = blob
        .chunks(100 << 10)
        .map(|c| BlobChunk {
            data: bytes::Bytes::copy_from_slice(c),
        })
        .collect();
    let put = snix_client(&daemon.tcp_addr())
        .put(futures::stream::iter(pieces))
        .await
        .expect("put")
        .into_inner();
    let digest = strata::B3Digest::try_from(&put.digest).unwrap();
    let got = crate::harness::read_blob(&daemon.tcp_addr(), &digest)
        .await
        .unwrap_or_else(|f| panic!("{f:?}"));
    assert!(got == blob);
}

/// A chunk list too long for one message is left out of Stat (the answer
/// then says "no finer chunking"), rather than failing the Stat, which a
/// stock client needs before every read. Small chunks and a small message
/// limit stand in for a blob of tens of GiB at the default 4 MiB.
#[tokio::test(flavor = "multi_thread")]
async fn a_chunk_list_too_long_for_a_message_is_left_out() {
    let config = "[server]\nmax_message_size = \"64KiB\"\n\n\
         [blobservices.root]\ntype = \"objectstore\"\nobject_store_url = \"memory:///\"\navg_chunk_size = 512\n";
    let daemon = tokio::task::spawn_blocking(move || Daemon::start(Some(config)))
        .await
        .unwrap();
    let addr = daemon.tcp_addr();
    // About 4000 chunks: a list of some 160 KB.
    let data = test_data(2 << 20, 12);
    let pieces: Vec<BlobChunk> = data
        .chunks(32 << 10)
        .map(|c| BlobChunk {
            data: bytes::Bytes::copy_from_slice(c),
        })
        .collect();
    let put = snix_client(&addr)
        .put(futures::stream::iter(pieces))
        .await
        .expect("put")
        .into_inner();
    let digest = strata::B3Digest::try_from(&put.digest).unwrap();
    let stat = snix_client(&addr)
        .stat(StatBlobRequest {
            digest: digest.into(),
            send_chunks: true,
            ..Default::default()
        })
        .await
        .expect("Stat with chunks answers")
        .into_inner();
    assert_eq!(stat.size, data.len() as u64);
    assert!(
        stat.chunks.is_empty(),
        "{} chunks listed",
        stat.chunks.len()
    );
    let got = read_blob(&addr, &digest).await.expect("read");
    assert!(got == data, "the blob reads back whole");
}
