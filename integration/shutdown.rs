//! Graceful shutdown: SIGTERM while clients stream Reads of multi-MiB
//! blobs and Puts. The daemon exits 0 in time; no client is ever handed a
//! torn response as a success; every Put it acknowledged is on disk after a
//! restart. And a client that never finishes its request cannot hold the
//! daemon past `[server] shutdown_grace`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use strata::B3Digest;
use strata::proto::snix::{BlobChunk, ReadBlobRequest};
use tonic::Code;

use crate::crash::{assert_absent_or_whole, assert_all_read_back, check_disk};
use crate::harness::{Daemon, metric, put_blob, snix_client, start_daemon, test_data};

const READERS: usize = 12;
const PUTTERS: usize = 4;
/// Size of the Put messages.
const PIECE: usize = 256 << 10;
/// Bound on any one client operation, so a hung daemon fails the test.
const OP_TIMEOUT: Duration = Duration::from_secs(60);

fn sidecar_config(disk: &Path, grace: &str) -> String {
    format!(
        "[server]\nshutdown_grace = \"{grace}\"\n\n\
         [blobservices.root]\ntype = \"tiers\"\ntiers = [\"memory\", \"disk\"]\n\n\
         [blobservices.memory]\ntype = \"memory\"\nmax_size = \"64MiB\"\n\n\
         [blobservices.disk]\ntype = \"disk\"\npath = \"{}\"\nmax_size = \"2GiB\"\n",
        disk.display()
    )
}

/// How one Read ended.
enum ReadEnd {
    /// All the blob's bytes, exactly; `left_at_signal`: how many had not
    /// arrived yet when the reader saw that SIGTERM had been sent.
    Whole { left_at_signal: Option<usize> },
    /// A gRPC error, after `received` bytes that all matched.
    Failed { code: Code, received: usize },
    /// A success with other bytes, or too few: what must never happen.
    Torn(String),
}

/// Reads `digest`, comparing the bytes with `want` as they arrive; pauses
/// between messages, so a read spans a good part of a second and many are
/// mid-stream when the signal comes.
async fn slow_read(addr: &str, digest: B3Digest, want: &[u8], signal: &AtomicBool) -> ReadEnd {
    let req = ReadBlobRequest {
        digest: digest.into(),
    };
    let mut stream = match snix_client(addr).read(req).await {
        Ok(resp) => resp.into_inner(),
        Err(status) => {
            return ReadEnd::Failed {
                code: status.code(),
                received: 0,
            };
        }
    };
    let mut received = 0;
    let mut left_at_signal = None;
    while let Some(msg) = stream.next().await {
        if left_at_signal.is_none() && signal.load(Ordering::SeqCst) {
            left_at_signal = Some(want.len() - received);
        }
        match msg {
            Ok(m) => {
                let end = received + m.data.len();
                if end > want.len() || m.data != want[received..end] {
                    return ReadEnd::Torn(format!("wrong bytes at {received}..{end}"));
                }
                received = end;
            }
            Err(status) => {
                return ReadEnd::Failed {
                    code: status.code(),
                    received,
                };
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if received == want.len() {
        ReadEnd::Whole { left_at_signal }
    } else {
        ReadEnd::Torn(format!(
            "ended as a success after {received} of {} bytes",
            want.len()
        ))
    }
}

/// One attempted Put: the blob (regenerated from its seed when checked)
/// and the answer.
struct PutAttempt {
    len: usize,
    seed: u64,
    started: Instant,
    ended: Instant,
    answer: Result<B3Digest, Code>,
}

/// Puts `data` in paced messages, so a Put is often in flight.
async fn slow_put(addr: &str, data: Bytes) -> Result<B3Digest, Code> {
    let pieces = data.len().div_ceil(PIECE);
    let messages = futures::stream::iter(0..pieces).then(move |k| {
        let piece = data.slice(k * PIECE..((k + 1) * PIECE).min(data.len()));
        async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            BlobChunk { data: piece }
        }
    });
    let resp = snix_client(addr)
        .put(messages)
        .await
        .map_err(|s| s.code())?;
    B3Digest::try_from(&resp.into_inner().digest).map_err(|_| Code::Internal)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_exits_0_and_tears_no_response() {
    let disk = tempfile::tempdir().unwrap();
    // The grace is generous: the slowest request here (a paced Read of
    // 28 MiB) takes about a second, so every request in flight at the
    // signal can finish.
    let config = sidecar_config(disk.path(), "20s");
    let mut daemon = start_daemon(config.clone()).await;
    let addr = daemon.tcp_addr();

    let blobs: Arc<Vec<(B3Digest, Vec<u8>)>> = Arc::new(
        (0..6)
            .map(|i| {
                // 20 to 28 MiB: well over the HTTP/2 stream window, so
                // the daemon cannot have sent a whole Read before its
                // client consumed part of it.
                let data = test_data((20 << 20) + i * 1_600_000, 7000 + i as u64);
                (B3Digest::of(&data), data)
            })
            .collect(),
    );
    for (digest, data) in blobs.iter() {
        assert_eq!(put_blob(&addr, data).await, *digest);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let signal = Arc::new(AtomicBool::new(false));
    let mut readers = tokio::task::JoinSet::new();
    for r in 0..READERS {
        let (addr, blobs, stop, signal) =
            (addr.clone(), blobs.clone(), stop.clone(), signal.clone());
        readers.spawn(async move {
            let mut ends = Vec::new();
            let mut k = r;
            while !stop.load(Ordering::SeqCst) {
                let (digest, data) = &blobs[k % blobs.len()];
                k += 1;
                let started = Instant::now();
                let end =
                    tokio::time::timeout(OP_TIMEOUT, slow_read(&addr, *digest, data, &signal))
                        .await
                        .unwrap_or_else(|_| ReadEnd::Torn("hung".into()));
                if matches!(end, ReadEnd::Failed { .. }) {
                    // Once the daemon is gone every attempt fails at once:
                    // do not spin.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                ends.push((started, Instant::now(), end));
            }
            ends
        });
    }
    let mut putters = tokio::task::JoinSet::new();
    for p in 0..PUTTERS {
        let (addr, stop) = (addr.clone(), stop.clone());
        putters.spawn(async move {
            let mut attempts = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let seed = 100_000 + 1000 * p as u64 + n;
                let len = (1 << 20) + (seed as usize * 524_287) % (5 << 20);
                n += 1;
                let data = Bytes::from(test_data(len, seed));
                let started = Instant::now();
                let answer = tokio::time::timeout(OP_TIMEOUT, slow_put(&addr, data))
                    .await
                    .unwrap_or(Err(Code::DeadlineExceeded));
                if answer.is_err() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                attempts.push(PutAttempt {
                    len,
                    seed,
                    started,
                    ended: Instant::now(),
                    answer,
                });
            }
            attempts
        });
    }

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let signalled = Instant::now();
    daemon.sigterm();
    signal.store(true, Ordering::SeqCst);
    let (status, daemon) = tokio::task::spawn_blocking(move || {
        let status = daemon.wait_timeout(Duration::from_secs(30));
        (status, daemon)
    })
    .await
    .unwrap();
    let exited = signalled.elapsed();
    stop.store(true, Ordering::SeqCst);
    let reads: Vec<_> = readers.join_all().await.into_iter().flatten().collect();
    let puts: Vec<_> = putters.join_all().await.into_iter().flatten().collect();
    drop(daemon);
    let status = status.expect("strata serve still running 30 s after SIGTERM");
    assert!(status.success(), "strata serve exited with {status}");

    let mut whole_across_signal = 0;
    let mut drained = 0;
    let mut failed_reads = 0;
    for (started, ended, end) in &reads {
        match end {
            ReadEnd::Whole { left_at_signal } => {
                if *started < signalled && *ended > signalled {
                    whole_across_signal += 1;
                }
                // More left than the stream window (8 MiB) plus a message
                // the client may have buffered: the daemon sent part of
                // this blob after SIGTERM.
                if left_at_signal.is_some_and(|left| left > 9 << 20) {
                    drained += 1;
                }
            }
            ReadEnd::Failed { code, received } => {
                failed_reads += 1;
                // Refused, or cut off: both are errors a client retries.
                assert_ne!(
                    *code,
                    Code::Ok,
                    "a failed read without an error ({received} bytes)"
                );
            }
            ReadEnd::Torn(why) => panic!(
                "a read (started {} ms {} SIGTERM): {why}",
                started
                    .max(&signalled)
                    .duration_since(*started.min(&signalled))
                    .as_millis(),
                if *started < signalled {
                    "before"
                } else {
                    "after"
                }
            ),
        }
    }
    // Reads in flight at the signal were allowed to finish, including
    // ones the daemon still had most of to send: it drains, it does not
    // drop its clients.
    assert!(
        drained > 0,
        "no read that had more than 9 MiB to go at SIGTERM finished ({} reads, \
         {whole_across_signal} whole across the signal, {failed_reads} failed)",
        reads.len()
    );

    let mut acknowledged = Vec::new();
    let mut unanswered = Vec::new();
    let mut acked_across_signal = 0;
    for attempt in &puts {
        let data = test_data(attempt.len, attempt.seed);
        let digest = B3Digest::of(&data);
        match attempt.answer {
            Ok(got) => {
                assert_eq!(got, digest, "a Put answered the wrong digest");
                if attempt.started < signalled && attempt.ended > signalled {
                    acked_across_signal += 1;
                }
                acknowledged.push((digest, data));
            }
            Err(code) => {
                assert_ne!(code, Code::Ok);
                unanswered.push((digest, data));
            }
        }
    }
    println!(
        "shutdown: exited {status} {:.2} s after SIGTERM; {} reads ({whole_across_signal} whole across the signal, {drained} of them with over 9 MiB to go, \
         {failed_reads} failed), {} puts ({} acknowledged, {acked_across_signal} of them across the signal)",
        exited.as_secs_f64(),
        reads.len(),
        puts.len(),
        acknowledged.len()
    );

    // After a restart on the same directory, every acknowledged blob is
    // there, and an unacknowledged one is absent or whole.
    let daemon = start_daemon(config).await;
    let addr = daemon.tcp_addr();
    check_disk(disk.path(), "after the restart");
    assert_all_read_back(&addr, &blobs, "seeded blobs after the restart").await;
    assert_all_read_back(&addr, &acknowledged, "acknowledged Puts after the restart").await;
    for (digest, data) in &unanswered {
        assert_absent_or_whole(&addr, digest, data, "unacknowledged Put after the restart").await;
    }
}

/// A Put whose stream never ends and a Read whose client stopped reading
/// hold their requests open; SIGTERM must still end the daemon, with
/// status 0, once `shutdown_grace` is over — and the reader, cut off, gets
/// an error rather than a short blob.
#[tokio::test(flavor = "multi_thread")]
async fn a_stuck_client_cannot_hold_shutdown_past_the_grace() {
    const GRACE: Duration = Duration::from_secs(2);
    let config = "[server]\nshutdown_grace = \"2s\"\n\n\
                  [blobservices.root]\ntype = \"memory\"\nmax_size = \"256MiB\"\n";
    let mut daemon = tokio::task::spawn_blocking(move || Daemon::start_with_metrics(Some(config)))
        .await
        .unwrap();
    let addr = daemon.tcp_addr();
    // Larger than the HTTP/2 windows (8 MiB per stream), so the server
    // blocks on a reader that does not read.
    let big = test_data(48 << 20, 4242);
    let digest = put_blob(&addr, &big).await;

    let put = {
        let mut client = snix_client(&addr);
        let first = BlobChunk {
            data: Bytes::from_static(b"the rest never comes"),
        };
        tokio::spawn(async move {
            let messages = futures::stream::iter([first]).chain(futures::stream::pending());
            client.put(messages).await
        })
    };
    let mut stream = snix_client(&addr)
        .read(ReadBlobRequest {
            digest: digest.into(),
        })
        .await
        .expect("read")
        .into_inner();
    let mut received = stream
        .next()
        .await
        .expect("a first message")
        .expect("a first message")
        .data
        .len();

    // Both requests are in the daemon's hands before the signal.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&daemon.metrics(), "strata_rpc_in_flight") < 2.0 {
        assert!(Instant::now() < deadline, "the two requests never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let signalled = Instant::now();
    daemon.sigterm();
    let (status, daemon) = tokio::task::spawn_blocking(move || {
        let status = daemon.wait_timeout(Duration::from_secs(30));
        (status, daemon)
    })
    .await
    .unwrap();
    let took = signalled.elapsed();
    let status = status.expect("a stuck client held strata serve 30 s past SIGTERM");
    assert!(status.success(), "strata serve exited with {status}");
    // It waited for the requests in flight before giving up on them.
    assert!(
        took >= GRACE,
        "exited {took:?} after SIGTERM, before the grace was over"
    );
    assert!(
        daemon.log_text().contains("shutdown grace period over"),
        "{}",
        daemon.log_text()
    );

    let put = put.await.unwrap();
    assert!(put.is_err(), "the unfinished Put succeeded: {put:?}");
    // What the reader had buffered is right; then the stream fails.
    let end = loop {
        match stream.next().await {
            Some(Ok(m)) => {
                let end = received + m.data.len();
                assert!(m.data == big[received..end], "wrong bytes at {received}");
                received = end;
            }
            Some(Err(status)) => break Err(status),
            None => break Ok(()),
        }
    };
    assert!(
        end.is_err(),
        "the cut-off read ended as a success after {received} of {} bytes",
        big.len()
    );
    assert!(received < big.len());
}
