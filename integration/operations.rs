//! Operational behaviour of a sidecar in front of imperfect peers: retries
//! after broken connections, the whole-request bound on a peer that
//! trickles, the `rpc` span's outcome fields, and the bound on draining
//! async fills at shutdown.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use strata::B3Digest;
use strata::proto::snix::blob_service_server::BlobService;
use strata::proto::snix::{
    BlobChunk, PutBlobResponse, ReadBlobRequest, StatBlobRequest, StatBlobResponse,
};
use tonic::{Request, Response, Status, Streaming};

use crate::front::{FrontHooks, ReadStream, serve, serve_front};
use crate::harness::{Daemon, metric, put_blob, read_blob, start_daemon, strata_bin, test_data};

const MEMORY: &str = "[blobservices.root]\ntype = \"memory\"\nmax_size = \"64MiB\"\n";

async fn start_sidecar(config: String) -> Daemon {
    tokio::task::spawn_blocking(move || Daemon::start_with_metrics(Some(&config)))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn reset_connections_to_a_peer_are_retried() {
    let origin = start_daemon(MEMORY.into()).await;
    let data = test_data(300_000, 61);
    let digest = put_blob(&origin.tcp_addr(), &data).await;
    let origin_addr: SocketAddr = origin.tcp.parse().unwrap();
    let sidecar_config = |proxy: SocketAddr, retries: u32| {
        format!(
            "[blobservices.root]\ntype = \"tiers\"\ntiers = [\"peer\"]\n\n\
             [blobservices.peer]\ntype = \"grpc\"\nurl = \"grpc+http://{proxy}\"\n\
             retries = {retries}\nretry_backoff = \"20ms\"\n\
             breaker = {{ failures = 2, open_for = \"1h\" }}\n"
        )
    };
    let retries = |page: &str| metric(page, "strata_tier_retries_total{tier=\"peer\"}");

    // The peer's first two connections are reset: two retries reach it.
    let (proxy, accepted) = strata::testkit::resetting_proxy(origin_addr, 2)
        .await
        .unwrap();
    let sidecar = start_sidecar(sidecar_config(proxy, 2)).await;
    let got = read_blob(&sidecar.tcp_addr(), &digest).await.unwrap();
    assert!(got == data, "wrong bytes");
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    let page = sidecar.metrics();
    assert_eq!(retries(&page), 2.0, "{page}");
    assert!(
        !sidecar.log_text().contains("circuit open"),
        "one retried call opened the breaker"
    );
    drop(sidecar);

    // Without retries, one reset connection fails the read (the peer is
    // the only tier); the next read, on a new connection, works.
    let (proxy, accepted) = strata::testkit::resetting_proxy(origin_addr, 1)
        .await
        .unwrap();
    let sidecar = start_sidecar(sidecar_config(proxy, 0)).await;
    let failed = read_blob(&sidecar.tcp_addr(), &digest).await.unwrap_err();
    assert_eq!(failed.code(), tonic::Code::Unavailable, "{failed:?}");
    assert_eq!(retries(&sidecar.metrics()), 0.0);
    let got = read_blob(&sidecar.tcp_addr(), &digest).await.unwrap();
    assert!(got == data, "wrong bytes");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    drop(sidecar);

    // A call whose every attempt fails is one failure to the breaker
    // (which opens at two here), however many retries it took.
    let (proxy, accepted) = strata::testkit::resetting_proxy(origin_addr, 3)
        .await
        .unwrap();
    let sidecar = start_sidecar(sidecar_config(proxy, 2)).await;
    let failed = read_blob(&sidecar.tcp_addr(), &digest).await.unwrap_err();
    assert_eq!(failed.code(), tonic::Code::Unavailable, "{failed:?}");
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    let page = sidecar.metrics();
    assert_eq!(retries(&page), 2.0, "{page}");
    assert_eq!(
        metric(&page, "strata_tier_breaker_open{tier=\"peer\"}"),
        0.0,
        "{page}"
    );
    let got = read_blob(&sidecar.tcp_addr(), &digest).await.unwrap();
    assert!(got == data, "wrong bytes");
}

/// Lets Stats through and Reads too, except that a Read of any chunk but
/// the blob's first trickles out 8 KiB every half second: slow enough to
/// take minutes, steady enough that no idle timeout fires.
#[derive(Default)]
struct Trickle {
    /// The first chunk of the last blob Stat'ed with its chunks.
    first_chunk: Mutex<Option<Vec<u8>>>,
}

impl FrontHooks for Trickle {
    fn stat_answer(&self, answer: &mut StatBlobResponse) {
        if let Some(first) = answer.chunks.first() {
            *self.first_chunk.lock().unwrap() = Some(first.digest.to_vec());
        }
    }

    fn read_stream(&self, digest: &[u8], upstream: ReadStream) -> ReadStream {
        if self.first_chunk.lock().unwrap().as_deref() == Some(digest) {
            return upstream;
        }
        upstream
            .flat_map(|msg| {
                let pieces: Vec<Result<BlobChunk, Status>> = match msg {
                    Ok(m) => m
                        .data
                        .chunks(8 << 10)
                        .map(|p| {
                            Ok(BlobChunk {
                                data: bytes::Bytes::copy_from_slice(p),
                            })
                        })
                        .collect(),
                    Err(status) => vec![Err(status)],
                };
                futures::stream::iter(pieces)
            })
            .then(|piece| async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                piece
            })
            .boxed()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn request_timeout_moves_a_trickling_read_to_the_next_tier() {
    let origin = start_daemon(MEMORY.into()).await;
    let data = test_data(4 << 20, 62);
    let digest = put_blob(&origin.tcp_addr(), &data).await;
    let slow = serve_front(&origin.tcp_addr(), Trickle::default()).await;

    let config = format!(
        "[blobservices.root]\ntype = \"tiers\"\ntiers = [\"slow\", \"origin\"]\n\n\
         [blobservices.slow]\ntype = \"grpc\"\nurl = \"{slow}\"\n\
         request_timeout = \"2s\"\n\n\
         [blobservices.origin]\ntype = \"grpc\"\nurl = \"{}\"\n",
        origin.tcp_addr()
    );
    let sidecar = start_sidecar(config).await;
    let started = Instant::now();
    let got = read_blob(&sidecar.tcp_addr(), &digest).await.unwrap();
    let took = started.elapsed();
    assert!(got == data, "wrong bytes");
    // Through the trickle, each further chunk alone takes about 16 s.
    assert!(took < Duration::from_secs(12), "the read took {took:?}");

    // The slow peer delivered the first chunk, then was cut off and the
    // read went on from the origin where it stopped.
    let log = sidecar.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("read failed part-way") && l.contains("tier=slow"))
        .unwrap_or_else(|| panic!("no failover from the slow peer:\n{log}"));
    assert!(line.contains("timed out"), "{line}");
    let position: u64 = line
        .split("position=")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no position in {line}"));
    assert!(position > 0, "{line}");
    let page = sidecar.metrics();
    assert!(metric(&page, "strata_tier_read_bytes_total{tier=\"origin\"}") > 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn rpc_spans_end_with_bytes_and_outcome() {
    let daemon = tokio::task::spawn_blocking(|| {
        Daemon::start_logging(
            MEMORY,
            &["--log-format", "json"],
            "info,strata::server=debug",
        )
    })
    .await
    .unwrap();
    let addr = daemon.tcp_addr();
    let data = test_data(300_000, 63);
    let digest = put_blob(&addr, &data).await;
    assert!(read_blob(&addr, &digest).await.unwrap() == data);
    let absent = B3Digest::of(b"not stored here");
    let missing = read_blob(&addr, &absent).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    // The last request's line may still be on its way to the log.
    let deadline = Instant::now() + Duration::from_secs(10);
    let finished = loop {
        let finished: Vec<serde_json::Value> = daemon
            .log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["fields"]["message"] == "request finished")
            .collect();
        if finished.len() >= 3 || Instant::now() > deadline {
            break finished;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let span = |method: &str, digest: &B3Digest| {
        finished
            .iter()
            .map(|v| &v["span"])
            .find(|s| s["method"] == method && s["digest"] == digest.to_hex())
            .unwrap_or_else(|| panic!("no finished {method} of {digest}: {finished:#?}"))
            .clone()
    };
    let put = span("Put", &digest);
    assert_eq!(put["name"], "rpc");
    assert_eq!(put["bytes"], 300_000);
    assert_eq!(put["outcome"], "Ok");
    let read = span("Read", &digest);
    assert_eq!(read["bytes"], 300_000);
    assert_eq!(read["outcome"], "Ok");
    let missing = span("Read", &absent);
    assert_eq!(missing["bytes"], 0);
    assert_eq!(missing["outcome"], "NotFound");
}

/// A peer that has nothing and never finishes a Put: a fill target on
/// which every fill hangs.
struct BlackHole;

#[tonic::async_trait]
impl BlobService for BlackHole {
    async fn stat(
        &self,
        _request: Request<StatBlobRequest>,
    ) -> Result<Response<StatBlobResponse>, Status> {
        Err(Status::not_found("nothing here"))
    }

    type ReadStream = futures::stream::BoxStream<'static, Result<BlobChunk, Status>>;

    async fn read(
        &self,
        _request: Request<ReadBlobRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        Err(Status::not_found("nothing here"))
    }

    async fn put(
        &self,
        _request: Request<Streaming<BlobChunk>>,
    ) -> Result<Response<PutBlobResponse>, Status> {
        futures::future::pending().await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fill_drain_bounds_a_shutdown_with_hung_fills() {
    let origin = start_daemon(MEMORY.into()).await;
    let blobs: Vec<Vec<u8>> = (0..3).map(|i| test_data(200_000, 70 + i)).collect();
    let mut digests = Vec::new();
    for b in &blobs {
        digests.push(put_blob(&origin.tcp_addr(), b).await);
    }
    let sink = serve(BlackHole).await;
    let config = format!(
        "[server]\nfill_drain = \"1s\"\n\n\
         [blobservices.root]\ntype = \"tiers\"\ntiers = [\"sink\", \"origin\"]\n\
         fill = \"async\"\nfill_to = [\"sink\"]\n\n\
         [blobservices.sink]\ntype = \"grpc\"\nurl = \"grpc+http://{sink}\"\n\n\
         [blobservices.origin]\ntype = \"grpc\"\nurl = \"{}\"\n",
        origin.tcp_addr()
    );
    let mut sidecar = start_sidecar(config).await;
    // Each read is answered at once; its fill into the sink hangs (the
    // first) or waits behind it in the queue.
    for (digest, data) in digests.iter().zip(&blobs) {
        assert!(read_blob(&sidecar.tcp_addr(), digest).await.unwrap() == *data);
    }

    sidecar.sigterm();
    let exited = tokio::task::spawn_blocking(move || {
        let status = sidecar.wait_timeout(Duration::from_secs(30));
        (status, sidecar)
    })
    .await
    .unwrap();
    let (status, sidecar) = exited;
    let status = status.unwrap_or_else(|| {
        panic!(
            "strata serve did not exit with its fills hung:\n{}",
            sidecar.log_text()
        )
    });
    assert!(status.success(), "exited with {status}");
    let log = sidecar.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("fill_drain is over"))
        .unwrap_or_else(|| panic!("no warning about abandoned fills:\n{log}"));
    assert!(line.contains("abandoned=3"), "{line}");
}

/// `strata get` of a stored blob with `RUST_LOG=strata=debug` and the
/// span setting given: its stderr.
fn get_logging(addr: &str, digest: &B3Digest, spans: Option<&str>) -> String {
    let mut cmd = std::process::Command::new(strata_bin());
    // A ranged get reads through a `grpc` tier, whose calls have spans.
    cmd.args(["get", "--range", "0..", "--addr", addr, &digest.to_hex()])
        .args(["-o", "/dev/null"])
        .env("RUST_LOG", "strata=debug")
        .env_remove("STRATA_LOG_SPANS");
    if let Some(spans) = spans {
        cmd.env("STRATA_LOG_SPANS", spans);
    }
    let out = cmd.output().expect("run strata get");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn span_close_lines_time_each_call_when_asked() {
    let daemon = start_daemon(MEMORY.to_string()).await;
    let addr = daemon.tcp_addr();
    let digest = put_blob(&addr, &test_data(10_000, 64)).await;
    let (timed, plain) = tokio::task::spawn_blocking(move || {
        (
            get_logging(&addr, &digest, Some("close")),
            get_logging(&addr, &digest, None),
        )
    })
    .await
    .unwrap();
    // The client's read through its `grpc` tier runs in a span of its own.
    let line = timed
        .lines()
        .find(|l| l.contains("open_read{") && l.contains("close"))
        .unwrap_or_else(|| panic!("no closed open_read span in:\n{timed}"));
    assert!(
        line.contains("time.busy=") && line.contains("time.idle="),
        "{line}"
    );
    assert!(!plain.contains("time.busy"), "{plain}");
}
