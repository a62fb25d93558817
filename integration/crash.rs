//! Crash safety of the `disk` tier: `strata serve` killed with SIGKILL in the
//! middle of a Put, and in the middle of a fill from a peer, then restarted
//! on the same directory. After every crash: blobs that were complete before
//! it read back exactly; the blob being written is absent or whole, never
//! torn; every chunk file hashes to its name; every blob index on disk lists
//! chunks that are all there and add up to the blob it names; and the
//! restart clears the half-written temporary files.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use strata::B3Digest;
use strata::chunkstore::BlobIndex;
use strata::kinds::disk::{TMP_PREFIX, pack, stored_chunks};
use strata::proto::snix::{BlobChunk, StatBlobRequest};
use strata::verify::{OutboardHasher, STORED_SHIFT};

use crate::harness::{Daemon, put_blob, read_blob, snix_client, start_daemon, test_data};

/// The large blob whose Put (or fill) is cut short.
const LARGE: usize = 32 << 20;
/// Size of the Put messages that carry it.
const PIECE: usize = 256 << 10;

fn disk_config(path: &Path) -> String {
    format!(
        "[blobservices.root]\ntype = \"disk\"\npath = \"{}\"\nmax_size = \"1GiB\"\n",
        path.display()
    )
}

/// Every regular file under `dir/kind/`, as (path, name).
pub(crate) fn files_of(dir: &Path, kind: &str) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let Ok(prefixes) = std::fs::read_dir(dir.join(kind)) else {
        return out;
    };
    for prefix in prefixes {
        let prefix = prefix.unwrap().path();
        for entry in std::fs::read_dir(&prefix).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            out.push((path, name));
        }
    }
    out
}

/// The whole records of every pack under `dir`, read from their headers.
fn pack_records(dir: &Path) -> Vec<(PathBuf, pack::Record)> {
    let mut out = Vec::new();
    for (path, name) in files_in(&dir.join("packs")) {
        if pack::parse_name(&name).is_none() {
            continue;
        }
        // Gone again (an evicted pack): not a reader's view.
        let Ok(file) = std::fs::File::open(&path) else {
            continue;
        };
        for record in pack::scan(&file).unwrap().records {
            out.push((path.clone(), record));
        }
    }
    out
}

/// Every regular file directly in `dir`, as (path, name).
fn files_in(dir: &Path) -> Vec<(PathBuf, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            (path, name)
        })
        .collect()
}

/// What a disk tier's directory holds, checked.
pub(crate) struct DiskState {
    /// Chunk files by digest, with their sizes.
    pub(crate) chunks: HashMap<B3Digest, u64>,
    /// Digests of the blobs that have an index.
    pub(crate) indexes: Vec<B3Digest>,
    /// Half-written files left over.
    pub(crate) temporaries: usize,
}

/// Checks the invariants of a disk tier's directory, which must hold at any
/// instant, a crash included: a chunk file is named by the BLAKE3 of its
/// bytes and filed under its first two hex digits; an index decodes, and
/// its chunks are all present with the listed sizes and hash, in order, to
/// the digest the index is filed under. Only temporary files may be partial.
pub(crate) fn check_disk(dir: &Path, when: &str) -> DiskState {
    let mut state = DiskState {
        chunks: HashMap::new(),
        indexes: Vec::new(),
        temporaries: 0,
    };
    let mut chunk_data = HashMap::new();
    for chunk in stored_chunks(dir).unwrap() {
        assert_eq!(
            B3Digest::of(&chunk.data),
            chunk.digest,
            "{when}: a chunk in {} at {} does not hash to its digest",
            chunk.file.display(),
            chunk.offset
        );
        state.chunks.insert(chunk.digest, chunk.data.len() as u64);
        chunk_data.insert(chunk.digest, chunk.data);
    }
    for (_, name) in files_of(dir, "outboards") {
        if name.starts_with(TMP_PREFIX) {
            state.temporaries += 1;
        }
    }
    for (path, name) in files_of(dir, "blobs") {
        if name.starts_with(TMP_PREFIX) {
            state.temporaries += 1;
            continue;
        }
        let blob: B3Digest = name
            .parse()
            .unwrap_or_else(|e| panic!("{when}: index file {name}: {e}"));
        let stored = std::fs::read(&path).unwrap();
        let index = BlobIndex::decode(&blob, &stored)
            .unwrap_or_else(|e| panic!("{when}: a torn index is visible: {e}"));
        // Its outboard, if it has one apart: a format byte, the shift, the
        // outboard of exactly these chunks.
        let outboard = std::fs::read(dir.join("outboards").join(&name[..2]).join(&name)).ok();
        let shift = match outboard.as_deref() {
            Some([1, shift, ..]) => *shift,
            Some(other) => panic!(
                "{when}: outboard file of {blob} starts {:?}",
                other.get(..2)
            ),
            None => STORED_SHIFT,
        };
        let mut hasher = OutboardHasher::new(shift);
        for c in &index.chunks {
            assert_eq!(
                state.chunks.get(&c.digest),
                Some(&c.size),
                "{when}: index of {blob} lists chunk {} which is missing or of another size",
                c.digest
            );
            hasher.update(&chunk_data[&c.digest]);
        }
        let (made, computed) = hasher.finalize();
        assert_eq!(
            made, blob,
            "{when}: the chunks of index {blob} make another blob"
        );
        if let Some(outboard) = outboard {
            assert!(
                outboard[2..] == computed.data()[..],
                "{when}: a torn or wrong outboard of {blob} is visible"
            );
        }
        state.indexes.push(blob);
    }
    state
}

/// Reads every chunk and index file as soon as its name shows up, while the
/// daemon writes: a chunk published before it is whole would hash to
/// something else, an index published before its chunks would list missing
/// ones. A crash can only freeze a state a reader could have seen, so this
/// finds what a kill would need luck to hit.
struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Watcher {
    fn start(dir: &Path) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            let dir = dir.to_owned();
            std::thread::spawn(move || {
                let mut seen = HashSet::new();
                let mut bad = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    // Each whole record once, by where it lies.
                    for chunk in pack_records(&dir) {
                        let (path, record) = chunk;
                        if !seen.insert(format!("{}@{}", path.display(), record.offset)) {
                            continue;
                        }
                        // Gone again (an evicted pack): not a reader's view.
                        let Ok(data) = std::fs::File::open(&path)
                            .and_then(|file| pack::read_at(&file, record.offset, record.len))
                        else {
                            continue;
                        };
                        if B3Digest::of(&data) != record.digest {
                            bad.push(format!("{} ({} bytes)", record.digest, data.len()));
                        }
                    }
                    for (path, name) in files_of(&dir, "blobs") {
                        if name.starts_with(TMP_PREFIX) || seen.contains(&name) {
                            continue;
                        }
                        let Ok(stored) = std::fs::read(&path) else {
                            continue;
                        };
                        seen.insert(name.clone());
                        let Ok(blob) = name.parse::<B3Digest>() else {
                            bad.push(format!("index {name}: not a digest"));
                            continue;
                        };
                        match BlobIndex::decode(&blob, &stored) {
                            Err(e) => bad.push(format!("index {name}: {e}")),
                            Ok(index) => {
                                // Every blob here is large enough to have
                                // one, inside the index if small, and
                                // nothing is evicted.
                                let outboard = dir.join("outboards").join(&name[..2]).join(&name);
                                if index.bao.is_none() && !outboard.exists() {
                                    bad.push(format!("index {name} before its outboard"));
                                }
                                let stored: HashMap<_, _> = pack_records(&dir)
                                    .into_iter()
                                    .map(|(_, r)| (r.digest, u64::from(r.len)))
                                    .collect();
                                for c in index.chunks {
                                    if stored.get(&c.digest) != Some(&c.size) {
                                        bad.push(format!(
                                            "index {name} before its chunk {}",
                                            c.digest
                                        ));
                                    }
                                }
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                bad
            })
        };
        Watcher {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops watching; fails if a file was ever seen before it was whole.
    fn finish(mut self, when: &str) {
        self.stop.store(true, Ordering::SeqCst);
        let bad = self.thread.take().map(|t| t.join().unwrap());
        assert_eq!(
            bad,
            Some(Vec::new()),
            "{when}: files were visible before they were whole"
        );
    }
}

impl Drop for Watcher {
    /// A test that fails elsewhere must not leave the thread polling.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

pub(crate) async fn stat_code(addr: &str, digest: &B3Digest) -> tonic::Code {
    let req = StatBlobRequest {
        digest: (*digest).into(),
        ..Default::default()
    };
    match snix_client(addr).stat(req).await {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

/// The torn blob after a restart: absent (Stat NOT_FOUND), or present and
/// exactly right.
pub(crate) async fn assert_absent_or_whole(
    addr: &str,
    digest: &B3Digest,
    data: &[u8],
    when: &str,
) -> bool {
    match stat_code(addr, digest).await {
        tonic::Code::NotFound => false,
        tonic::Code::Ok => {
            let got = read_blob(addr, digest)
                .await
                .unwrap_or_else(|e| panic!("{when}: Stat says present, Read fails: {e:?}"));
            assert!(got == data, "{when}: the interrupted blob reads back wrong");
            true
        }
        other => panic!("{when}: Stat of the interrupted blob answered {other:?}"),
    }
}

pub(crate) async fn assert_all_read_back(addr: &str, blobs: &[(B3Digest, Vec<u8>)], when: &str) {
    for (digest, data) in blobs {
        let got = read_blob(addr, digest)
            .await
            .unwrap_or_else(|e| panic!("{when}: complete blob {digest} is lost: {e:?}"));
        assert!(
            got == *data,
            "{when}: complete blob {digest} reads back wrong"
        );
    }
}

/// Kills the daemon with SIGKILL once `ready` says so (polled), or after
/// 30 s: a test that never gets there still ends.
async fn kill_when(daemon: &mut Daemon, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    daemon.kill();
}

/// Five rounds of: Put small blobs whole, start a 32 MiB Put, kill -9 the
/// daemon part-way (after a different number of messages each round, the
/// last one as the stream ends), restart on the same
/// directory and check everything.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_put_keeps_the_disk_tier_consistent() {
    let cache = tempfile::tempdir().unwrap();
    let config = disk_config(cache.path());
    let large = Arc::new(test_data(LARGE, 900));
    let large_digest = B3Digest::of(&large);
    let pieces = LARGE / PIECE;
    let mut complete: Vec<(B3Digest, Vec<u8>)> = Vec::new();
    let mut torn_survived = 0;

    for (round, kill_after) in [1usize, 9, 40, 90, pieces].into_iter().enumerate() {
        let when = format!("round {round} (killed after {kill_after} of {pieces} messages)");
        let mut daemon = start_daemon(config.clone()).await;
        let addr = daemon.tcp_addr();
        // What was put before a crash is still there after the last one.
        assert_all_read_back(&addr, &complete, &format!("{when}, at start")).await;
        for (i, len) in [3usize, 200_000, 3 << 20].into_iter().enumerate() {
            let data = test_data(len, 1000 + 10 * round as u64 + i as u64);
            let digest = put_blob(&addr, &data).await;
            assert_eq!(digest, B3Digest::of(&data));
            complete.push((digest, data));
        }

        // The large Put: messages pulled by the client are counted, so the
        // kill lands while the server is receiving and writing chunks.
        let pulled = Arc::new(AtomicUsize::new(0));
        let messages = {
            let large = large.clone();
            let pulled = pulled.clone();
            futures::stream::iter(0..pieces).then(move |i| {
                let large = large.clone();
                let pulled = pulled.clone();
                async move {
                    // Pace the stream so that the server is busy with the
                    // blob, not done with it, when the kill comes.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    pulled.fetch_add(1, Ordering::SeqCst);
                    BlobChunk {
                        data: Bytes::copy_from_slice(&large[i * PIECE..(i + 1) * PIECE]),
                    }
                }
            })
        };
        let watcher = Watcher::start(cache.path());
        let mut client = snix_client(&addr);
        let put = tokio::spawn(async move { client.put(messages).await });
        kill_when(&mut daemon, || pulled.load(Ordering::SeqCst) >= kill_after).await;
        let _ = put.await;
        watcher.finish(&when);

        // Before the restart: no chunk or index is torn; only temporary
        // files may be.
        check_disk(cache.path(), &format!("{when}, after the kill"));

        let daemon = start_daemon(config.clone()).await;
        let addr = daemon.tcp_addr();
        let after = check_disk(cache.path(), &format!("{when}, after the restart"));
        assert_eq!(
            after.temporaries, 0,
            "{when}: temporary files survived the restart"
        );
        assert_all_read_back(&addr, &complete, &when).await;
        if assert_absent_or_whole(&addr, &large_digest, &large, &when).await {
            // A Put is complete only once its stream ended.
            assert_eq!(kill_after, pieces, "{when}: a Put cut short was published");
            torn_survived += 1;
            assert!(after.indexes.contains(&large_digest));
        } else {
            assert!(
                !after.indexes.contains(&large_digest),
                "{when}: an index of the interrupted blob is on disk but not served"
            );
        }
    }
    assert!(torn_survived <= 1);

    // The directory still works: the large blob can be put whole now, and
    // everything reads back across one more restart.
    {
        let daemon = start_daemon(config.clone()).await;
        assert_eq!(put_blob(&daemon.tcp_addr(), &large).await, large_digest);
    }
    complete.push((large_digest, large.to_vec()));
    let daemon = start_daemon(config.clone()).await;
    assert_all_read_back(&daemon.tcp_addr(), &complete, "at the end").await;
    check_disk(cache.path(), "at the end");
}

fn sidecar_config(near: &Path, peer: &str, fill: &str) -> String {
    format!(
        "[blobservices.root]\ntype = \"tiers\"\ntiers = [\"near\", \"peer\"]\nfill = \"{fill}\"\n\n\
         [blobservices.near]\ntype = \"disk\"\npath = \"{}\"\nmax_size = \"1GiB\"\n\n\
         [blobservices.peer]\ntype = \"grpc\"\nurl = \"{peer}\"\n",
        near.display()
    )
}

/// A sidecar `[near disk, peer grpc]` is killed with SIGKILL while it fills
/// the near tier with a 32 MiB blob from the peer (a new blob each round,
/// killed after a different number of its chunk files landed), and
/// restarted on the same directory: the near tier stays consistent, blobs
/// put into it before survive, and the read then succeeds. At the end the
/// near tier alone serves every blob.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_a_fill_keeps_the_near_tier_consistent() {
    let peer =
        start_daemon("[blobservices.root]\ntype = \"memory\"\nmax_size = \"512MiB\"\n".to_owned())
            .await;
    let near = tempfile::tempdir().unwrap();
    let mut complete: Vec<(B3Digest, Vec<u8>)> = Vec::new();
    // (chunk files written before the kill, fill mode)
    let rounds = [
        (1usize, "sync"),
        (10, "sync"),
        (40, "async"),
        (70, "sync"),
        (100, "async"),
    ];
    for (round, (kill_at, fill)) in rounds.into_iter().enumerate() {
        let when = format!("round {round} (fill = {fill}, killed at {kill_at} chunk files)");
        let large = test_data(LARGE, 910 + round as u64);
        let large_digest = put_blob(&peer.tcp_addr(), &large).await;
        assert_eq!(large_digest, B3Digest::of(&large));

        let config = sidecar_config(near.path(), &peer.tcp_addr(), fill);
        let mut sidecar = start_daemon(config.clone()).await;
        let addr = sidecar.tcp_addr();
        assert_all_read_back(&addr, &complete, &format!("{when}, at start")).await;
        // Puts go to the near tier (the nearest persistent one).
        let data = test_data(600_000, 2000 + round as u64);
        let digest = put_blob(&addr, &data).await;
        assert_eq!(digest, B3Digest::of(&data));
        complete.push((digest, data));

        let before = pack_records(near.path()).len();
        let reading = {
            let addr = addr.clone();
            tokio::spawn(async move { read_blob(&addr, &large_digest).await })
        };
        let watcher = Watcher::start(near.path());
        let near_dir = near.path().to_owned();
        // A fill that finishes before the mark was reached is killed right
        // after; the checks below hold either way.
        kill_when(&mut sidecar, || {
            pack_records(&near_dir).len() >= before + kill_at || reading.is_finished()
        })
        .await;
        let _ = reading.await;
        watcher.finish(&when);

        check_disk(near.path(), &format!("{when}, after the kill"));
        let mut sidecar = start_daemon(config).await;
        let addr = sidecar.tcp_addr();
        let after = check_disk(near.path(), &format!("{when}, after the restart"));
        assert_eq!(
            after.temporaries, 0,
            "{when}: temporary files survived the restart"
        );
        assert_all_read_back(&addr, &complete, &when).await;
        // The read that was cut off now succeeds, whole and right, from
        // whatever mix of near chunks and peer it takes.
        let got = read_blob(&addr, &large_digest)
            .await
            .unwrap_or_else(|e| panic!("{when}: read after the restart: {e:?}"));
        assert!(got == large, "{when}: read after the restart is wrong");
        complete.push((large_digest, large));
        // A graceful stop lets an async fill finish before the next round.
        let status = tokio::task::spawn_blocking(move || sidecar.terminate())
            .await
            .unwrap();
        assert!(status.success(), "{when}: sidecar exit status {status}");
        check_disk(near.path(), &format!("{when}, after the read"));
    }

    // The near tier now holds everything: a disk-only daemon on it serves
    // every blob without the peer.
    drop(peer);
    let alone = start_daemon(disk_config(near.path())).await;
    assert_all_read_back(&alone.tcp_addr(), &complete, "near tier alone").await;
}
