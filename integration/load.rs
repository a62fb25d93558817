//! Load: 500 concurrent clients for 30 s of mixed Stat, Read and Put against
//! one `strata serve` (a `[memory, disk]` sidecar). Every answer is checked
//! against the data the test put: a Read returns exactly the blob's bytes, a
//! Put the blob's digest, a Stat the blob's size, and digests nobody put are
//! NOT_FOUND. The only failure a client may see is a RESOURCE_EXHAUSTED
//! refusal. The daemon's resident memory is sampled throughout and its peak
//! must stay bounded.
//!
//! `STRATA_LOAD_SECS` overrides the duration.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use strata::B3Digest;
use strata::proto::snix::blob_service_client::BlobServiceClient;
use strata::proto::snix::{BlobChunk, ReadBlobRequest, StatBlobRequest};
use tonic::Code;
use tonic::transport::Channel;

use crate::harness::{Daemon, channel, metric, test_data};

/// Concurrent clients.
const CLIENTS: usize = 500;
/// Connections they share: the clients are tasks, not processes, and a
/// few dozen HTTP/2 connections carry them the way a build farm's few
/// daemons would.
const CONNECTIONS: usize = 24;
/// Default duration of the run.
const DEFAULT_SECS: u64 = 30;
/// Blobs in the pool the clients put and read.
const POOL: usize = 192;
/// Digests nobody puts.
const ABSENT: usize = 64;
/// Longest any one operation may take before it counts as an error: a
/// hung server fails the test instead of stalling it.
const OP_TIMEOUT: Duration = Duration::from_secs(60);

/// Bound on the daemon's peak resident memory. By design the daemon holds
/// the memory tier (64 MiB) plus, per request, buffers bounded by its
/// blob: a Read's read-ahead window (at most 8 chunks) and the HTTP/2
/// stream window, a Put's one maximum chunk plus one message plus its chunk
/// uploads. The pool's mean blob is about 0.45 MiB and about 60 % of the
/// 500 requests in flight move data, so a few hundred MiB is the expected
/// peak, allocator slack included. 1 GiB leaves room for that to double,
/// yet a daemon that kept Put payloads (several GiB are put per run) or
/// buffered every request several times over would cross it.
const RSS_LIMIT_MIB: u64 = 1024;

fn config(disk: &std::path::Path) -> String {
    format!(
        "[server]\n\
         # Every client of this test is 127.0.0.1: the per-client limit\n\
         # must not turn the test into one of the limits.\n\
         max_concurrent_per_client = 1024\n\n\
         [blobservices.root]\ntype = \"tiers\"\ntiers = [\"memory\", \"disk\"]\n\n\
         [blobservices.memory]\ntype = \"memory\"\nmax_size = \"64MiB\"\n\n\
         [blobservices.disk]\ntype = \"disk\"\npath = \"{}\"\nmax_size = \"4GiB\"\n",
        disk.display()
    )
}

struct Blob {
    data: Bytes,
    digest: B3Digest,
}

/// The blobs, whether each has been put (acknowledged) yet, and digests
/// that are never put.
struct Pool {
    blobs: Vec<Blob>,
    present: Vec<AtomicBool>,
    absent: Vec<B3Digest>,
}

/// Sizes from a few bytes to a few MiB: most small, some spanning several
/// chunks.
fn pool() -> Pool {
    let mut rng = StdRng::seed_from_u64(0x10ad);
    let blobs: Vec<Blob> = (0..POOL)
        .map(|i| {
            let len = match i % 8 {
                0..=2 => rng.random_range(1..1024),
                3 | 4 => rng.random_range(1024..64 << 10),
                5 | 6 => rng.random_range(64 << 10..1 << 20),
                _ => rng.random_range(1 << 20..4 << 20),
            };
            let data = Bytes::from(test_data(len, 50_000 + i as u64));
            let digest = B3Digest::of(&data);
            Blob { data, digest }
        })
        .collect();
    let absent = (0..ABSENT)
        .map(|i| B3Digest::of(format!("never put {i}").as_bytes()))
        .collect();
    Pool {
        present: blobs.iter().map(|_| AtomicBool::new(false)).collect(),
        blobs,
        absent,
    }
}

/// What the clients did.
#[derive(Default)]
struct Tally {
    reads: AtomicU64,
    read_bytes: AtomicU64,
    stats: AtomicU64,
    puts: AtomicU64,
    /// Stat or Read of a digest nobody put, answered NOT_FOUND.
    absent: AtomicU64,
    /// Stat or Read of a pool blob not put yet, answered NOT_FOUND.
    not_yet: AtomicU64,
    refusals: AtomicU64,
    errors: AtomicU64,
    wrong: AtomicU64,
    /// The first few errors and wrong answers, for the failure message.
    samples: Mutex<Vec<String>>,
}

impl Tally {
    fn note(&self, counter: &AtomicU64, what: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut samples = self.samples.lock().unwrap();
        if samples.len() < 20 {
            samples.push(what);
        }
    }

    /// A Stat or Read that ended with `status`; `expect_present` says the
    /// blob was acknowledged before the request was sent, `absent` that it
    /// is never put.
    fn failed(&self, op: &str, status: &tonic::Status, expect_present: bool, absent: bool) {
        match status.code() {
            Code::ResourceExhausted => {
                self.refusals.fetch_add(1, Ordering::Relaxed);
            }
            Code::NotFound if absent => {
                self.absent.fetch_add(1, Ordering::Relaxed);
            }
            Code::NotFound if !expect_present => {
                self.not_yet.fetch_add(1, Ordering::Relaxed);
            }
            Code::NotFound => self.note(
                &self.wrong,
                format!("{op}: NOT_FOUND for a blob put before: {status:?}"),
            ),
            _ => self.note(&self.errors, format!("{op}: {status:?}")),
        }
    }
}

type Client = BlobServiceClient<Channel>;

/// Reads `digest`, comparing every message with `want` at its offset as it
/// arrives (nothing is buffered, so 500 readers cost the test little).
async fn check_read(
    client: &mut Client,
    digest: B3Digest,
    want: Option<&Bytes>,
    expect_present: bool,
    tally: &Tally,
) {
    let req = ReadBlobRequest {
        digest: digest.into(),
    };
    let mut stream = match client.read(req).await {
        Ok(resp) => resp.into_inner(),
        Err(status) => return tally.failed("Read", &status, expect_present, want.is_none()),
    };
    let mut offset = 0usize;
    while let Some(msg) = stream.next().await {
        let piece = match msg {
            Ok(m) => m.data,
            Err(status) => {
                // An error after data is never a refusal or an absence.
                return tally.note(
                    &tally.errors,
                    format!("Read {digest}: failed after {offset} bytes: {status:?}"),
                );
            }
        };
        let Some(want) = want else {
            return tally.note(
                &tally.wrong,
                format!("Read {digest}: data for an absent blob"),
            );
        };
        let end = offset + piece.len();
        if end > want.len() || piece != want[offset..end] {
            return tally.note(
                &tally.wrong,
                format!("Read {digest}: wrong bytes at {offset}..{end}"),
            );
        }
        offset = end;
    }
    match want {
        Some(want) if offset != want.len() => tally.note(
            &tally.wrong,
            format!(
                "Read {digest}: ended after {offset} of {} bytes as a success",
                want.len()
            ),
        ),
        Some(_) => {
            tally.reads.fetch_add(1, Ordering::Relaxed);
            tally.read_bytes.fetch_add(offset as u64, Ordering::Relaxed);
        }
        // The empty answer to an absent digest: wrong, it must be NOT_FOUND.
        None => tally.note(
            &tally.wrong,
            format!("Read {digest}: an absent blob read as empty"),
        ),
    }
}

async fn check_stat(
    client: &mut Client,
    digest: B3Digest,
    want: Option<&Bytes>,
    expect_present: bool,
    send_chunks: bool,
    tally: &Tally,
) {
    let req = StatBlobRequest {
        digest: digest.into(),
        send_chunks,
        ..Default::default()
    };
    let resp = match client.stat(req).await {
        Ok(resp) => resp.into_inner(),
        Err(status) => return tally.failed("Stat", &status, expect_present, want.is_none()),
    };
    let Some(want) = want else {
        return tally.note(&tally.wrong, format!("Stat {digest}: found an absent blob"));
    };
    let listed: u64 = resp.chunks.iter().map(|c| c.size).sum();
    if resp.size != want.len() as u64 || (!resp.chunks.is_empty() && listed != resp.size) {
        return tally.note(
            &tally.wrong,
            format!(
                "Stat {digest}: size {} (chunks add up to {listed}), want {}",
                resp.size,
                want.len()
            ),
        );
    }
    tally.stats.fetch_add(1, Ordering::Relaxed);
}

/// Puts blob `i` in messages of `piece` bytes (slices of the pool's
/// buffer: no copies) and marks it present once acknowledged.
async fn check_put(client: &mut Client, pool: &Pool, i: usize, piece: usize, tally: &Tally) {
    let blob = &pool.blobs[i];
    let len = blob.data.len();
    let messages: Vec<BlobChunk> = (0..len.div_ceil(piece))
        .map(|k| BlobChunk {
            data: blob.data.slice(k * piece..((k + 1) * piece).min(len)),
        })
        .collect();
    match client.put(futures::stream::iter(messages)).await {
        Ok(resp) => {
            let got = B3Digest::try_from(&resp.into_inner().digest);
            if got.as_ref() != Ok(&blob.digest) {
                return tally.note(
                    &tally.wrong,
                    format!("Put of {}: answered {got:?}", blob.digest),
                );
            }
            pool.present[i].store(true, Ordering::SeqCst);
            tally.puts.fetch_add(1, Ordering::Relaxed);
        }
        Err(status) if status.code() == Code::ResourceExhausted => {
            tally.refusals.fetch_add(1, Ordering::Relaxed);
        }
        Err(status) => tally.note(&tally.errors, format!("Put of {}: {status:?}", blob.digest)),
    }
}

/// One client: random operations until `until`.
async fn client_loop(
    mut client: Client,
    id: u64,
    pool: Arc<Pool>,
    tally: Arc<Tally>,
    until: Instant,
) {
    let mut rng = StdRng::seed_from_u64(id);
    while Instant::now() < until {
        let roll = rng.random_range(0..100);
        let i = rng.random_range(0..POOL);
        let blob = &pool.blobs[i];
        // Read before the request goes out: a blob acknowledged by then
        // must be found.
        let present = pool.present[i].load(Ordering::SeqCst);
        let absent = pool.absent[rng.random_range(0..ABSENT)];
        let send_chunks = rng.random_bool(0.5);
        let piece = [16 << 10, 256 << 10, 1 << 20][rng.random_range(0..3)];
        let op = async {
            match roll {
                0..40 => {
                    check_read(&mut client, blob.digest, Some(&blob.data), present, &tally).await
                }
                40..70 => {
                    check_stat(
                        &mut client,
                        blob.digest,
                        Some(&blob.data),
                        present,
                        send_chunks,
                        &tally,
                    )
                    .await
                }
                70..85 => check_put(&mut client, &pool, i, piece, &tally).await,
                85..93 => check_read(&mut client, absent, None, false, &tally).await,
                _ => check_stat(&mut client, absent, None, false, send_chunks, &tally).await,
            }
        };
        if tokio::time::timeout(OP_TIMEOUT, op).await.is_err() {
            tally.note(
                &tally.errors,
                format!("an operation took over {OP_TIMEOUT:?}"),
            );
        }
    }
}

/// Resident memory of `pid` now and its peak so far, in KiB.
fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

#[tokio::test(flavor = "multi_thread")]
async fn five_hundred_clients_mixed_load_every_answer_right() {
    let secs = std::env::var("STRATA_LOAD_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_SECS);
    let disk = tempfile::tempdir().unwrap();
    let cfg = config(disk.path());
    let mut daemon = tokio::task::spawn_blocking(move || Daemon::start_with_metrics(Some(&cfg)))
        .await
        .unwrap();
    let addr = daemon.tcp_addr();
    let pid = daemon.pid();
    let pool = Arc::new(pool());
    let tally = Arc::new(Tally::default());
    let channels: Vec<Channel> = (0..CONNECTIONS).map(|_| channel(&addr)).collect();
    let client = |k: usize| {
        BlobServiceClient::new(channels[k % CONNECTIONS].clone())
            .max_decoding_message_size(64 << 20)
    };

    // Half the pool is there from the start, so reads find data at once;
    // the clients put the rest (and put the first half again).
    {
        let mut seeding = tokio::task::JoinSet::new();
        for i in (0..POOL).step_by(2) {
            let (mut c, pool, tally) = (client(i), pool.clone(), tally.clone());
            seeding.spawn(async move { check_put(&mut c, &pool, i, 1 << 20, &tally).await });
        }
        seeding.join_all().await;
    }
    let seeded = tally.puts.load(Ordering::Relaxed);
    assert_eq!(
        seeded,
        POOL as u64 / 2,
        "seeding failed: {:?}",
        tally.samples.lock().unwrap()
    );

    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while sampling.load(Ordering::SeqCst) {
                if let Some((rss, hwm)) = rss_kib(pid) {
                    peak = peak.max(rss).max(hwm);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        })
    };

    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let mut clients = tokio::task::JoinSet::new();
    for id in 0..CLIENTS {
        clients.spawn(client_loop(
            client(id),
            id as u64,
            pool.clone(),
            tally.clone(),
            until,
        ));
    }
    while let Some(done) = clients.join_next().await {
        done.expect("client task");
    }
    let elapsed = started.elapsed();
    sampling.store(false, Ordering::SeqCst);
    let mut peak_kib = sampler.join().unwrap();
    // The kernel's own high-water mark catches a peak between samples.
    if let Some((_, hwm)) = rss_kib(pid) {
        peak_kib = peak_kib.max(hwm);
    }
    let peak_mib = peak_kib / 1024;

    let t = &*tally;
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    println!(
        "load: {CLIENTS} clients over {CONNECTIONS} connections for {:.1} s: \
         {} reads ({} MiB), {} stats, {} puts ({seeded} seeding), \
         {} absent NOT_FOUND, {} not-yet-put NOT_FOUND, \
         {} refusals, {} errors, {} wrong answers, daemon peak RSS {peak_mib} MiB",
        elapsed.as_secs_f64(),
        load(&t.reads),
        load(&t.read_bytes) >> 20,
        load(&t.stats),
        load(&t.puts),
        load(&t.absent),
        load(&t.not_yet),
        load(&t.refusals),
        load(&t.errors),
        load(&t.wrong),
    );
    let samples = t.samples.lock().unwrap().clone();
    assert_eq!(load(&t.wrong), 0, "wrong answers: {samples:#?}");
    assert_eq!(load(&t.errors), 0, "errors: {samples:#?}");
    // Every kind of operation ran and was checked.
    for (what, n) in [
        ("reads", load(&t.reads)),
        ("stats", load(&t.stats)),
        ("puts during the run", load(&t.puts) - seeded),
        ("absent lookups", load(&t.absent)),
    ] {
        assert!(n > 0, "no {what} completed");
    }
    assert!(
        peak_mib < RSS_LIMIT_MIB,
        "daemon peak RSS {peak_mib} MiB, bound {RSS_LIMIT_MIB} MiB"
    );

    // The daemon's own account agrees: nothing in flight once the clients
    // are done (every slot came back), and no RPC ended in an error code.
    let page = daemon.metrics();
    assert_eq!(metric(&page, "strata_rpc_in_flight"), 0.0, "{page}");
    for line in page
        .lines()
        .filter(|l| l.starts_with("strata_rpc_requests_total{"))
    {
        let ok = ["\"Ok\"", "\"NotFound\"", "\"ResourceExhausted\""]
            .iter()
            .any(|code| line.contains(&format!("code={code}")));
        assert!(ok, "the daemon answered an error: {line}");
    }
    let status = tokio::task::spawn_blocking(move || daemon.terminate())
        .await
        .unwrap();
    assert!(status.success(), "strata serve exited with {status}");
}
