//! How a sidecar fetches a blob from a strata peer: a fill in one Read of
//! the whole blob when the near tiers hold none of its chunks, carried on
//! chunk by chunk if that Read breaks, and chunk by chunk — only the
//! missing ones — when another blob already brought some of them; a direct
//! read (no fill) from the start in one Read as well; a fill through a
//! `race` of mirrors in one Read too, and through a nested engine; a small
//! blob inline with its Stat, with no Read at all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use strata::B3Digest;
use strata::proto::snix::{BlobChunk, StatBlobRequest, StatBlobResponse};
use tonic::Status;

use crate::front::{FrontHooks, ReadStream, serve_front};
use crate::harness::{
    Daemon, disk_sidecar, memory_origin, put_blob, read_blob, snix_client, start_daemon, test_data,
    wait_for_fill,
};

/// Counts the Reads that go through, by digest; with `cut_after`, breaks
/// the first Read of `blob` once that many bytes went out.
#[derive(Clone, Default)]
struct Counter {
    reads: Arc<Mutex<HashMap<Vec<u8>, usize>>>,
    blob: Vec<u8>,
    cut_after: Option<usize>,
    cut: Arc<AtomicBool>,
}

impl Counter {
    fn reads_of(&self, digest: &B3Digest) -> usize {
        let reads = self.reads.lock().unwrap();
        reads.get(&digest.as_bytes().to_vec()).copied().unwrap_or(0)
    }

    fn all_reads(&self) -> usize {
        self.reads.lock().unwrap().values().sum()
    }
}

#[tonic::async_trait]
impl FrontHooks for Counter {
    async fn before(&self, method: &'static str, digest: &[u8]) -> Result<(), Status> {
        if method == "read" {
            *self
                .reads
                .lock()
                .unwrap()
                .entry(digest.to_vec())
                .or_default() += 1;
        }
        Ok(())
    }

    fn read_stream(&self, digest: &[u8], mut upstream: ReadStream) -> ReadStream {
        let Some(limit) = self.cut_after else {
            return upstream;
        };
        if digest != self.blob || self.cut.swap(true, Ordering::SeqCst) {
            return upstream;
        }
        Box::pin(async_stream::stream! {
            let mut sent = 0;
            while let Some(msg) = upstream.next().await {
                let Ok(mut msg) = msg else {
                    yield msg;
                    return;
                };
                if sent + msg.data.len() >= limit {
                    let head = msg.data.split_to(limit - sent);
                    yield Ok(BlobChunk { data: head });
                    yield Err(Status::unavailable("the front broke the stream"));
                    return;
                }
                sent += msg.data.len();
                yield Ok(msg);
            }
        })
    }
}

/// The peer's chunk list of `digest`: digests and sizes.
async fn listed(addr: &str, digest: &B3Digest) -> Vec<(B3Digest, u64)> {
    let stat = snix_client(addr)
        .stat(StatBlobRequest {
            digest: (*digest).into(),
            send_chunks: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    stat.chunks
        .iter()
        .map(|c| (B3Digest::try_from(&c.digest).unwrap(), c.size))
        .collect()
}

/// The digests of the peer's chunk list of `digest`.
async fn chunks_of(addr: &str, digest: &B3Digest) -> Vec<B3Digest> {
    listed(addr, digest)
        .await
        .into_iter()
        .map(|(c, _)| c)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cold_blob_comes_in_one_read() {
    let blob = test_data(6 << 20, 81);
    let origin = memory_origin().await;
    let digest = put_blob(&origin.tcp_addr(), &blob).await;
    let chunks = chunks_of(&origin.tcp_addr(), &digest).await;
    assert!(chunks.len() >= 8, "{} chunks", chunks.len());

    let counter = Counter::default();
    let front = serve_front(&origin.tcp_addr(), counter.clone()).await;
    let near = tempfile::tempdir().unwrap();
    let sidecar = disk_sidecar(near.path(), &front, "sync").await;
    let got = read_blob(&sidecar.tcp_addr(), &digest).await.unwrap();
    assert!(got == blob, "wrong bytes");
    assert_eq!(counter.reads_of(&digest), 1);
    assert_eq!(
        counter.all_reads(),
        1,
        "chunks were read one by one as well"
    );
    // The fill stored the chunks as listed: the next read is local.
    wait_for_fill(&sidecar).await;
    drop(origin);
    let again = read_blob(&sidecar.tcp_addr(), &digest).await.unwrap();
    assert!(again == blob);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_read_carries_on_chunk_by_chunk_from_where_it_stopped() {
    let blob = test_data(6 << 20, 82);
    let origin = memory_origin().await;
    let digest = put_blob(&origin.tcp_addr(), &blob).await;
    let chunks = listed(&origin.tcp_addr(), &digest).await;
    let cut = blob.len() / 2;

    let counter = Counter {
        blob: digest.as_bytes().to_vec(),
        cut_after: Some(cut),
        ..Default::default()
    };
    let front = serve_front(&origin.tcp_addr(), counter.clone()).await;
    let near = tempfile::tempdir().unwrap();
    let sidecar = disk_sidecar(near.path(), &front, "sync").await;
    let got = read_blob(&sidecar.tcp_addr(), &digest)
        .await
        .unwrap_or_else(|f| panic!("{f:?}\n{}", sidecar.log_text()));
    assert!(got == blob, "wrong bytes");
    assert_eq!(counter.reads_of(&digest), 1, "the blob was read again");
    // Every chunk that had come whole before the break was kept; each
    // later one was read once.
    let mut end = 0;
    for (chunk, size) in &chunks {
        end += *size as usize;
        let expected = usize::from(end > cut);
        assert_eq!(
            counter.reads_of(chunk),
            expected,
            "chunk ending at {end}, the break at {cut}"
        );
    }
    wait_for_fill(&sidecar).await;
    drop(origin);
    let again = read_blob(&sidecar.tcp_addr(), &digest).await.unwrap();
    assert!(again == blob, "the fill is not whole");
}

#[tokio::test(flavor = "multi_thread")]
async fn chunks_the_near_tier_holds_are_not_fetched_again() {
    let first = test_data(6 << 20, 83);
    // A second blob with most of the first one in it: content-defined
    // chunking finds the same chunks after the new head.
    let mut second = test_data(300 << 10, 84);
    second.extend_from_slice(&first[1 << 20..]);
    let origin = memory_origin().await;
    let first_digest = put_blob(&origin.tcp_addr(), &first).await;
    let second_digest = put_blob(&origin.tcp_addr(), &second).await;
    let first_chunks = chunks_of(&origin.tcp_addr(), &first_digest).await;
    let second_chunks = chunks_of(&origin.tcp_addr(), &second_digest).await;
    let shared = second_chunks
        .iter()
        .filter(|c| first_chunks.contains(c))
        .count();
    assert!(shared >= 4, "only {shared} shared chunks");

    let counter = Counter::default();
    let front = serve_front(&origin.tcp_addr(), counter.clone()).await;
    let near = tempfile::tempdir().unwrap();
    let sidecar = disk_sidecar(near.path(), &front, "sync").await;
    assert!(read_blob(&sidecar.tcp_addr(), &first_digest).await.unwrap() == first);
    wait_for_fill(&sidecar).await;
    let before = counter.all_reads();
    assert!(
        read_blob(&sidecar.tcp_addr(), &second_digest)
            .await
            .unwrap()
            == second
    );
    assert_eq!(
        counter.reads_of(&second_digest),
        0,
        "the second blob was read whole"
    );
    let fetched = counter.all_reads() - before;
    assert_eq!(
        fetched,
        second_chunks.len() - shared,
        "only the chunks the near tier lacks come from the peer"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_direct_read_from_the_start_is_one_read() {
    let blob = test_data(6 << 20, 85);
    let origin = memory_origin().await;
    let digest = put_blob(&origin.tcp_addr(), &blob).await;
    let counter = Counter::default();
    let front = serve_front(&origin.tcp_addr(), counter.clone()).await;
    let near = tempfile::tempdir().unwrap();
    let sidecar = disk_sidecar(near.path(), &front, "off").await;
    for round in 1..=2 {
        let got = read_blob(&sidecar.tcp_addr(), &digest).await.unwrap();
        assert!(got == blob, "wrong bytes");
        assert_eq!(counter.reads_of(&digest), round);
        assert_eq!(counter.all_reads(), round, "chunks were read one by one");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cold_blob_comes_in_one_read_through_a_race() {
    let blob = test_data(6 << 20, 85);
    let origin = memory_origin().await;
    let digest = put_blob(&origin.tcp_addr(), &blob).await;
    // The other mirror does not have the blob: the race is won by the one
    // that does.
    let empty = memory_origin().await;

    let counter = Counter::default();
    let front = serve_front(&origin.tcp_addr(), counter.clone()).await;
    let near = tempfile::tempdir().unwrap();
    let config = format!(
        "[blobservices.root]\ntype = \"tiers\"\ntiers = [\"near\", \"mirrors\"]\n\n\
         [blobservices.near]\ntype = \"disk\"\npath = {}\n\n\
         [blobservices.mirrors]\ntype = \"race\"\nmembers = [\"empty\", \"front\"]\n\n\
         [blobservices.empty]\ntype = \"grpc\"\nurl = \"{}\"\n\n\
         [blobservices.front]\ntype = \"grpc\"\nurl = \"{front}\"\n",
        toml::Value::String(near.path().display().to_string()),
        empty.tcp_addr(),
    );
    let sidecar = tokio::task::spawn_blocking(move || Daemon::start_with_metrics(Some(&config)))
        .await
        .unwrap();
    let got = read_blob(&sidecar.tcp_addr(), &digest).await.unwrap();
    assert!(got == blob, "wrong bytes");
    wait_for_fill(&sidecar).await;
    assert_eq!(
        counter.all_reads(),
        1,
        "the fill read the blob's chunks one by one"
    );
    drop(origin);
    let again = read_blob(&sidecar.tcp_addr(), &digest).await.unwrap();
    assert!(again == blob);
}

/// What an [`InlineFront`] does to the inline bytes of a Stat answer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Inline {
    /// Passes them on.
    Forward,
    /// Drops them, as a stock snix peer (which knows no such field) would.
    Strip,
    /// Flips a bit in them.
    Lie,
}

/// Counts the Stats and Reads it forwards, and treats inline bytes as
/// `mode` says.
#[derive(Clone)]
struct InlineFront {
    mode: Inline,
    stats: Arc<AtomicUsize>,
    reads: Arc<AtomicUsize>,
}

impl InlineFront {
    fn new(mode: Inline) -> Self {
        InlineFront {
            mode,
            stats: Arc::default(),
            reads: Arc::default(),
        }
    }

    /// Stats and Reads forwarded so far.
    fn calls(&self) -> (usize, usize) {
        (
            self.stats.load(Ordering::SeqCst),
            self.reads.load(Ordering::SeqCst),
        )
    }
}

#[tonic::async_trait]
impl FrontHooks for InlineFront {
    async fn before(&self, method: &'static str, _digest: &[u8]) -> Result<(), Status> {
        match method {
            "stat" => self.stats.fetch_add(1, Ordering::SeqCst),
            _ => self.reads.fetch_add(1, Ordering::SeqCst),
        };
        Ok(())
    }

    fn stat_answer(&self, answer: &mut StatBlobResponse) {
        match self.mode {
            Inline::Forward => {}
            Inline::Strip => answer.inline_data = Default::default(),
            Inline::Lie => {
                let mut lie = answer.inline_data.to_vec();
                if let Some(byte) = lie.get_mut(7) {
                    *byte ^= 1;
                }
                answer.inline_data = lie.into();
            }
        }
    }
}

/// A `disk` sidecar (sync fill, its disk tier in the returned directory)
/// whose peer is `origin` behind an [`InlineFront`] in `mode`.
async fn disk_sidecar_behind(
    origin: &Daemon,
    mode: Inline,
) -> (InlineFront, Daemon, tempfile::TempDir) {
    let front = InlineFront::new(mode);
    let addr = serve_front(&origin.tcp_addr(), front.clone()).await;
    let near = tempfile::tempdir().unwrap();
    let sidecar = disk_sidecar(near.path(), &addr, "sync").await;
    (front, sidecar, near)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cold_small_blob_comes_with_its_stat() {
    let blob = test_data(100_000, 90);
    let origin = memory_origin().await;
    let digest = put_blob(&origin.tcp_addr(), &blob).await;

    // Through a strata peer: one Stat that brings the blob, no Read; then
    // the blob is local.
    let (front, sidecar, _near) = disk_sidecar_behind(&origin, Inline::Forward).await;
    let got = read_blob(&sidecar.tcp_addr(), &digest).await.unwrap();
    assert!(got == blob, "wrong bytes");
    assert_eq!(front.calls(), (1, 0), "(Stats, Reads) of the peer");
    wait_for_fill(&sidecar).await;
    assert!(read_blob(&sidecar.tcp_addr(), &digest).await.unwrap() == blob);
    assert_eq!(front.calls(), (1, 0), "the second read was not local");

    // Through a peer that sends nothing inline: a Stat, then a Read.
    let (front, sidecar, _near) = disk_sidecar_behind(&origin, Inline::Strip).await;
    let got = read_blob(&sidecar.tcp_addr(), &digest).await.unwrap();
    assert!(got == blob, "wrong bytes");
    assert_eq!(front.calls(), (1, 1), "(Stats, Reads) of the peer");
}

/// Test data of `len` bytes that the default chunking cuts into `pieces`
/// chunks: the first seed from `seed` on that does.
fn cut_into(len: usize, pieces: usize, seed: u64) -> Vec<u8> {
    let chunking = strata::chunkstore::Chunking::default();
    (seed..seed + 1000)
        .map(|seed| test_data(len, seed))
        .find(|data| {
            let cuts =
                fastcdc::v2020::FastCDC::new(data, chunking.min(), chunking.avg, chunking.max());
            cuts.count() == pieces
        })
        .expect("a seed that cuts so")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cold_chunk_of_the_largest_size_comes_with_its_stat() {
    // Larger than the average chunk, one chunk still.
    let blob = cut_into(500_000, 1, 93);
    let origin = memory_origin().await;
    let digest = put_blob(&origin.tcp_addr(), &blob).await;
    assert!(chunks_of(&origin.tcp_addr(), &digest).await.len() <= 1);
    let (front, sidecar, _near) = disk_sidecar_behind(&origin, Inline::Forward).await;
    let got = read_blob(&sidecar.tcp_addr(), &digest).await.unwrap();
    assert!(got == blob, "wrong bytes");
    assert_eq!(front.calls(), (1, 0), "(Stats, Reads) of the peer");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cold_small_blob_of_two_chunks_needs_no_read() {
    let blob = cut_into(500_000, 2, 94);
    let origin = memory_origin().await;
    let digest = put_blob(&origin.tcp_addr(), &blob).await;
    let chunks = chunks_of(&origin.tcp_addr(), &digest).await;
    assert_eq!(chunks.len(), 2);
    let (front, sidecar, near) = disk_sidecar_behind(&origin, Inline::Forward).await;
    let got = read_blob(&sidecar.tcp_addr(), &digest).await.unwrap();
    assert!(got == blob, "wrong bytes");
    // The Stat that locates it brings both chunks; the fill hashes them
    // whole rather than ask for the outboard. No other call.
    assert_eq!(front.calls(), (1, 0), "(Stats, Reads) of the peer");
    wait_for_fill(&sidecar).await;
    let stored: Vec<B3Digest> = strata::kinds::disk::stored_chunks(near.path())
        .unwrap()
        .into_iter()
        .map(|c| c.digest)
        .collect();
    for chunk in &chunks {
        assert!(stored.contains(chunk), "chunk {chunk} was not filled");
    }
    assert!(read_blob(&sidecar.tcp_addr(), &digest).await.unwrap() == blob);
    assert_eq!(front.calls().1, 0, "the second read was not local");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_race_or_a_shard_of_peers_brings_a_cold_small_blob_with_its_stat() {
    let blob = test_data(100_000, 92);
    let origin = memory_origin().await;
    let digest = put_blob(&origin.tcp_addr(), &blob).await;
    // A race that asks its second member only after 60 s, and a shard:
    // in both, one member answers the Stat with the blob and is the one
    // the read goes to.
    for (kind, extra) in [("race", "hedge_after = \"60s\"\n"), ("shard", "")] {
        let (a, b) = (
            InlineFront::new(Inline::Forward),
            InlineFront::new(Inline::Forward),
        );
        let a_addr = serve_front(&origin.tcp_addr(), a.clone()).await;
        let b_addr = serve_front(&origin.tcp_addr(), b.clone()).await;
        let config = format!(
            "[blobservices.root]\ntype = \"tiers\"\ntiers = [\"near\", \"pool\"]\n\n\
             [blobservices.near]\ntype = \"memory\"\nmax_size = \"16MiB\"\n\n\
             [blobservices.pool]\ntype = \"{kind}\"\nmembers = [\"a\", \"b\"]\n{extra}\n\
             [blobservices.a]\ntype = \"grpc\"\nurl = \"{a_addr}\"\n\n\
             [blobservices.b]\ntype = \"grpc\"\nurl = \"{b_addr}\"\n"
        );
        let sidecar = start_daemon(config).await;
        let got = read_blob(&sidecar.tcp_addr(), &digest).await.unwrap();
        assert!(got == blob, "{kind}: wrong bytes");
        let ((a_stats, a_reads), (b_stats, b_reads)) = (a.calls(), b.calls());
        assert_eq!(
            (a_stats + b_stats, a_reads + b_reads),
            (1, 0),
            "{kind}: (Stats, Reads) of the members"
        );
    }
}

/// An outer `tiers` (a memory tier, then a `combined` of another memory
/// tier and the peer at `peer_addr`).
fn nested_config(peer_addr: &str) -> String {
    format!(
        "[blobservices.root]\ntype = \"tiers\"\ntiers = [\"outer\", \"site\"]\n\n\
         [blobservices.outer]\ntype = \"memory\"\nmax_size = \"64MiB\"\n\n\
         [blobservices.site]\ntype = \"combined\"\nnear = \"inner\"\nfar = \"peer\"\n\n\
         [blobservices.inner]\ntype = \"memory\"\nmax_size = \"64MiB\"\n\n\
         [blobservices.peer]\ntype = \"grpc\"\nurl = \"{peer_addr}\"\n"
    )
}

/// A `combined` (near memory, far peer) that is itself the source of an
/// outer `tiers`: the outer fill takes the cold blob through it in one Read
/// of the peer, not with a Stat and a Read per chunk, and the next read
/// does not reach the peer.
#[tokio::test(flavor = "multi_thread")]
async fn a_nested_engine_as_a_source_moves_a_cold_blob_in_one_read() {
    // About 32 chunks.
    let blob = test_data(8 << 20, 93);
    let origin = memory_origin().await;
    let digest = put_blob(&origin.tcp_addr(), &blob).await;
    let peer = InlineFront::new(Inline::Forward);
    let peer_addr = serve_front(&origin.tcp_addr(), peer.clone()).await;
    let sidecar = start_daemon(nested_config(&peer_addr)).await;
    let got = read_blob(&sidecar.tcp_addr(), &digest).await.unwrap();
    assert!(got == blob, "wrong bytes");
    let (stats, reads) = peer.calls();
    assert_eq!(reads, 1, "Reads of the peer ({stats} Stats)");
    // Each engine locates the blob and fetches its outboard: a few Stats,
    // not one per chunk.
    assert!(stats <= 8, "{stats} Stats of the peer");
    let got = read_blob(&sidecar.tcp_addr(), &digest).await.unwrap();
    assert!(got == blob, "wrong bytes from the near tier");
    assert_eq!(peer.calls(), (stats, reads), "the peer was asked again");
}

/// When the outer near cache already holds some of a blob's chunks (another
/// blob brought them), the outer fill asks a nested engine for the missing
/// chunks one by one: the nested engine asks its tiers for each chunk
/// directly, a Read of the peer per chunk and no Stat, and keeps them.
#[tokio::test(flavor = "multi_thread")]
async fn a_nested_engine_serves_single_chunks_without_a_stat_each() {
    // About 32 chunks; the other blob shares the first half of them.
    let blob = test_data(8 << 20, 94);
    let mut other = blob[..4 << 20].to_vec();
    other.extend_from_slice(&test_data(4 << 20, 95));
    let origin = memory_origin().await;
    let digest = put_blob(&origin.tcp_addr(), &blob).await;
    let other_digest = put_blob(&origin.tcp_addr(), &other).await;
    let peer = InlineFront::new(Inline::Forward);
    let peer_addr = serve_front(&origin.tcp_addr(), peer.clone()).await;
    let sidecar = start_daemon(nested_config(&peer_addr)).await;
    let got = read_blob(&sidecar.tcp_addr(), &other_digest).await.unwrap();
    assert!(got == other, "wrong bytes of the other blob");
    let before = peer.calls();

    let got = read_blob(&sidecar.tcp_addr(), &digest).await.unwrap();
    assert!(got == blob, "wrong bytes");
    let (stats, reads) = peer.calls();
    let (stats, reads) = (stats - before.0, reads - before.1);
    // The shared half came from the outer cache: a Read for each chunk of
    // the other half, a few Stats to locate the blob and its outboard.
    assert!((8..=24).contains(&reads), "{reads} Reads of the peer");
    assert!(stats <= 4, "{stats} Stats of the peer for {reads} Reads");

    // The near tiers kept it: the peer is not asked again.
    let got = read_blob(&sidecar.tcp_addr(), &digest).await.unwrap();
    assert!(got == blob, "wrong bytes from the near tiers");
    assert_eq!(
        peer.calls(),
        (stats + before.0, reads + before.1),
        "the peer was asked again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_that_lies_inline_is_passed_over() {
    let blob = test_data(100_000, 91);
    let origin = memory_origin().await;
    let digest = put_blob(&origin.tcp_addr(), &blob).await;
    let liar = InlineFront::new(Inline::Lie);
    let liar_addr = serve_front(&origin.tcp_addr(), liar.clone()).await;

    // Alone: the read fails, and nothing reaches the near tier.
    let near = tempfile::tempdir().unwrap();
    let sidecar = disk_sidecar(near.path(), &liar_addr, "sync").await;
    assert!(read_blob(&sidecar.tcp_addr(), &digest).await.is_err());
    assert_eq!(liar.calls(), (1, 0), "(Stats, Reads) of the liar");
    let stored = strata::kinds::disk::stored_chunks(near.path()).unwrap();
    assert!(stored.is_empty(), "a lie was stored");

    // Before an honest peer: the read goes on to it, and gets the blob.
    let near = tempfile::tempdir().unwrap();
    let config = format!(
        "[blobservices.root]\ntype = \"tiers\"\ntiers = [\"near\", \"liar\", \"honest\"]\n\n\
         [blobservices.near]\ntype = \"disk\"\npath = {}\n\n\
         [blobservices.liar]\ntype = \"grpc\"\nurl = \"{liar_addr}\"\n\n\
         [blobservices.honest]\ntype = \"grpc\"\nurl = \"{}\"\n",
        toml::Value::String(near.path().display().to_string()),
        origin.tcp_addr(),
    );
    let sidecar = start_daemon(config).await;
    let got = read_blob(&sidecar.tcp_addr(), &digest).await.unwrap();
    assert!(got == blob, "wrong bytes");
    for chunk in strata::kinds::disk::stored_chunks(near.path()).unwrap() {
        assert_eq!(B3Digest::of(&chunk.data), chunk.digest);
    }
}
