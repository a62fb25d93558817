//! `race`: several substituters of equal priority. Each Stat or read asks
//! them concurrently (or one more every `hedge_after`); the first verified
//! answer wins and the others are cancelled.
//!
//! ```toml
//! [blobservices.mirrors]
//! type = "race"
//! members = ["eu", "us"]
//! hedge_after = "50ms"   # optional: without it, all are asked at once
//! ```
//!
//! A member that answers "absent" or fails does not win; the next member
//! is asked at once instead of after the hedge delay. Readers are verified
//! by every member (the [`BlobService`] contract), so the winner's bytes are
//! what was asked for. A race is a read source: it takes no Puts.
//!
//! Chunks race too: a fill in front of the race takes a blob's chunks from
//! the first member to open a stream of them (`stream_chunks`), and a
//! single chunk from the first member to answer with it.
//!
//! The winner is the first to answer, before its bytes are checked. When
//! a chunk of the winner's stream fails its check, the stream carries on
//! from that chunk, chunk by chunk, each raced among the other members; if
//! one of them gives the chunk as listed, the winner lied, and is passed
//! over for that blob for ten minutes, so the fast liar does not win its
//! next race for it. If none does, the chunk list is what was wrong, and
//! the stream ends with the error. The engine in front then tells the race
//! which list lied ([`BlobService::caught_lying`]): the race passes over
//! the member whose Stat gave that list, for ten minutes too, and the
//! engine asks the race again rather than passing over it, honest members
//! and all. Members are told apart by their lists, not by which won the
//! last Stat: two reads of one blob close together may each have been
//! answered by a different member. A reader
//! (`open_read`) is not carried on this way: the engine in front moves a
//! failed reader to its next tier.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use serde::Deserialize;
use tracing::{debug, warn};

use crate::blobservice::{BlobReader, BlobService, BlobStat, BlobWriter, ChunkMeta, ChunkStream};
use crate::composition::{BuildContext, Duration as ConfigDuration, TierConfig};
use crate::digest::{B3Digest, DIGEST_LEN};
use crate::error::{Error, Result, absent_unless_failed};
use crate::verify::Outboard;

/// Configuration of a `race`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaceConfig {
    /// The substituters, in the order they are asked when hedging.
    pub members: Vec<String>,
    /// Ask the next member only after this long without an answer.
    pub hedge_after: Option<ConfigDuration>,
}

#[async_trait]
impl TierConfig for RaceConfig {
    fn references(&self) -> Vec<String> {
        self.members.clone()
    }

    fn validate(&self) -> Result<(), String> {
        if self.members.len() < 2 {
            return Err("a race needs at least two `members`".into());
        }
        Ok(())
    }

    fn describe(&self) -> String {
        match self.hedge_after {
            Some(h) => format!("race [{}] (hedge_after = {h})", self.members.join(", ")),
            None => format!("race [{}] (all at once)", self.members.join(", ")),
        }
    }

    async fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn BlobService>> {
        let members = self
            .members
            .iter()
            .map(|name| {
                Ok(Member {
                    name: name.clone(),
                    svc: ctx.tier(name)?,
                    distrusted: moka::sync::Cache::builder()
                        .max_capacity(DISTRUSTED_PER_MEMBER)
                        .time_to_live(DISTRUST_FOR)
                        .build(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Arc::new(RaceService {
            shared: Arc::new(Shared {
                members,
                hedge_after: self.hedge_after.map(|h| h.0),
                listed_by: moka::sync::Cache::builder()
                    .max_capacity(LISTED_BY)
                    .time_to_live(LISTED_FOR)
                    .build(),
            }),
        }))
    }
}

/// How long a member that lied about a blob (its chunks, or its chunk
/// list) is passed over for that blob (as a `tiers` engine passes over a
/// lying tier).
const DISTRUST_FOR: Duration = Duration::from_secs(600);
/// Most digests a member is distrusted for at once.
const DISTRUSTED_PER_MEMBER: u64 = 16_384;
/// Chunks fetched at once when a stream is carried on chunk by chunk.
const RESUME_AHEAD: usize = 8;
/// How long the race remembers which member's Stat gave a chunk list it
/// passed on: long enough for the read that follows the Stat to catch a
/// lie in the list.
const LISTED_FOR: Duration = Duration::from_secs(120);
/// Most chunk lists the race remembers the member of at once.
const LISTED_BY: u64 = 65_536;

/// The `race` combinator. See the module docs.
pub struct RaceService {
    shared: Arc<Shared>,
}

struct Member {
    name: String,
    svc: Arc<dyn BlobService>,
    /// Blobs this member lied about lately: chunks that failed their check,
    /// or a chunk list caught lying.
    distrusted: moka::sync::Cache<B3Digest, ()>,
}

/// What the race's calls and the streams it hands out share.
struct Shared {
    members: Vec<Member>,
    hedge_after: Option<Duration>,
    /// The member whose Stat answer gave each chunk list the race passed
    /// on, by blob and list: where a list caught lying came from
    /// ([`BlobService::caught_lying`]). Two members that give the same list
    /// share a key; the later one is remembered.
    listed_by: moka::sync::Cache<(B3Digest, ListPrint), usize>,
}

/// A chunk list's BLAKE3 digest (of each chunk's digest and size, in
/// order): what the race remembers of a list it passed on, in 32 bytes
/// whatever its length (a 1 GiB blob lists thousands of chunks).
type ListPrint = blake3::Hash;

fn list_print(chunks: &[ChunkMeta]) -> ListPrint {
    // Hashed 256 entries at a time: fed one entry's 40 bytes at a time,
    // BLAKE3 took 250 µs for a 1 GiB blob's 4096 chunks, against 70 µs
    // in batches (measured side by side, release build).
    const BATCH: usize = 256;
    const ENTRY: usize = DIGEST_LEN + size_of::<u64>();
    let mut hasher = blake3::Hasher::new();
    let mut buf = [0u8; BATCH * ENTRY];
    for batch in chunks.chunks(BATCH) {
        for (c, entry) in batch.iter().zip(buf.chunks_exact_mut(ENTRY)) {
            entry[..DIGEST_LEN].copy_from_slice(c.digest.as_bytes());
            entry[DIGEST_LEN..].copy_from_slice(&c.size.to_le_bytes());
        }
        hasher.update(&buf[..batch.len() * ENTRY]);
    }
    hasher.finalize()
}

type Attempt<T> = BoxFuture<'static, (usize, Result<Option<T>>)>;

impl Shared {
    /// Runs `ask` against the members as the race rules say (but not
    /// against those in `excluded` or that lied about `digest` lately) and
    /// returns the first `Some`, with the index of the member that gave it.
    async fn race<T: Send + 'static>(
        &self,
        digest: &B3Digest,
        excluded: &[usize],
        ask: impl Fn(Arc<dyn BlobService>) -> BoxFuture<'static, Result<Option<T>>>,
    ) -> Result<Option<(usize, T)>> {
        let mut candidates = Vec::with_capacity(self.members.len());
        let mut failures = Vec::new();
        for (i, m) in self.members.iter().enumerate() {
            if excluded.contains(&i) {
                continue;
            }
            if m.distrusted.contains_key(digest) {
                failures.push(format!(
                    "{}: passed over, it lied about this blob in the last {} s",
                    m.name,
                    DISTRUST_FOR.as_secs()
                ));
                continue;
            }
            candidates.push(i);
        }
        let launch = |i: usize| -> Attempt<T> {
            let fut = ask(self.members[i].svc.clone());
            Box::pin(async move { (i, fut.await) })
        };
        let mut running = FuturesUnordered::new();
        let mut next = 0;
        let all_at_once = self.hedge_after.is_none();
        while next < candidates.len() && (all_at_once || next == 0) {
            running.push(launch(candidates[next]));
            next += 1;
        }
        loop {
            if running.is_empty() {
                if next >= candidates.len() {
                    break;
                }
                running.push(launch(candidates[next]));
                next += 1;
            }
            let hedge = async {
                match self.hedge_after {
                    Some(d) if next < candidates.len() => tokio::time::sleep(d).await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                Some((i, result)) = running.next() => match result {
                    Ok(Some(answer)) => {
                        debug!(%digest, winner = %self.members[i].name, "race won");
                        // Dropping `running` cancels the losers.
                        return Ok(Some((i, answer)));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        warn!(tier = %self.members[i].name, %digest, error = %e, "race member failed");
                        failures.push(format!("{}: {e}", self.members[i].name));
                    }
                },
                () = hedge => {
                    running.push(launch(candidates[next]));
                    next += 1;
                }
            }
        }
        absent_unless_failed(failures)
    }

    /// `stream` of `chunks` of blob `digest`, from member `from`, carried
    /// on by the other members from the first chunk that fails its check
    /// (see the module docs): chunk by chunk, each raced among them (a
    /// member's stream of a blob's chunks starts at the blob's start).
    fn resuming(
        self: Arc<Self>,
        digest: B3Digest,
        chunks: Arc<[ChunkMeta]>,
        from: usize,
        mut stream: ChunkStream,
    ) -> ChunkStream {
        Box::pin(async_stream::stream! {
            let mut done = 0;
            let cause = loop {
                match stream.next().await {
                    None => return,
                    Some(Ok(chunk)) => {
                        done += 1;
                        yield Ok(chunk);
                    }
                    Some(Err(e)) if matches!(e.root(), Error::Verification(_)) && done < chunks.len() => {
                        break e;
                    }
                    Some(Err(e)) => {
                        yield Err(e);
                        return;
                    }
                }
            };
            warn!(tier = %self.members[from].name, %digest, error = %cause,
                "race member's chunk failed its check; asking the others for the rest");
            let mut rest = self.clone().each_chunk(digest, chunks[done..].to_vec(), from);
            match rest.next().await {
                Some(Ok(chunk)) => {
                    // Another member has the chunk as listed: `from` lied.
                    self.distrust(from, &digest, "race member gave chunks of this blob that failed their check");
                    yield Ok(chunk);
                }
                // None has it as listed: the list is the lie (or the chunk
                // is lost everywhere); the caller sees the first error.
                _ => {
                    yield Err(cause);
                    return;
                }
            }
            while let Some(item) = rest.next().await {
                let failed = item.is_err();
                yield item;
                if failed {
                    return;
                }
            }
        })
    }

    /// Each of `chunks` of blob `digest` from a race of the members but
    /// `excluded`, a few at a time.
    fn each_chunk(
        self: Arc<Self>,
        digest: B3Digest,
        chunks: Vec<ChunkMeta>,
        excluded: usize,
    ) -> ChunkStream {
        futures::stream::iter(chunks)
            .map(move |c| {
                let shared = self.clone();
                async move {
                    let found = shared
                        .race(&c.digest, &[excluded], move |svc| {
                            Box::pin(async move { svc.read_chunk(&c).await })
                        })
                        .await?;
                    found.map(|(_, data)| data).ok_or(Error::MissingChunk {
                        blob: digest,
                        chunk: c.digest,
                    })
                }
            })
            .buffered(RESUME_AHEAD)
            .boxed()
    }

    /// The first Stat answer of a race, remembering its member by its list.
    async fn stat(&self, digest: &B3Digest, before_read: bool) -> Result<Option<BlobStat>> {
        let d = *digest;
        let won = self
            .race(digest, &[], move |svc| {
                Box::pin(async move {
                    if before_read {
                        svc.stat_before_read(&d).await
                    } else {
                        svc.stat(&d).await
                    }
                })
            })
            .await?;
        Ok(won.map(|(i, stat)| {
            self.listed_by.insert((d, list_print(&stat.chunks)), i);
            stat
        }))
    }

    /// Passes over member `i` for blob `digest` for [`DISTRUST_FOR`], saying
    /// `why` once, however many reads caught the same lie.
    fn distrust(&self, i: usize, digest: &B3Digest, why: &str) {
        let m = &self.members[i];
        if m.distrusted.entry(*digest).or_insert(()).is_fresh() {
            warn!(tier = %m.name, %digest, for_secs = DISTRUST_FOR.as_secs(),
                "{why}: passed over for it");
        }
    }
}

impl RaceService {
    /// The first answer of a race among the members not passed over.
    async fn race<T: Send + 'static>(
        &self,
        digest: &B3Digest,
        ask: impl Fn(Arc<dyn BlobService>) -> BoxFuture<'static, Result<Option<T>>>,
    ) -> Result<Option<T>> {
        Ok(self
            .shared
            .race(digest, &[], ask)
            .await?
            .map(|(_, answer)| answer))
    }
}

#[async_trait]
impl BlobService for RaceService {
    async fn stat(&self, digest: &B3Digest) -> Result<Option<BlobStat>> {
        self.shared.stat(digest, false).await
    }

    /// The winner may have brought a small blob along for the read that
    /// follows; that read races too, and the winner answers it at once.
    async fn stat_before_read(&self, digest: &B3Digest) -> Result<Option<BlobStat>> {
        self.shared.stat(digest, true).await
    }

    async fn outboard(&self, digest: &B3Digest) -> Result<Option<Outboard>> {
        let d = *digest;
        self.race(digest, move |svc| {
            Box::pin(async move { svc.outboard(&d).await })
        })
        .await
    }

    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
        let d = *digest;
        self.race(digest, move |svc| {
            Box::pin(async move { svc.open_read(&d).await })
        })
        .await
    }

    async fn read_chunk(&self, chunk: &ChunkMeta) -> Result<Option<Bytes>> {
        let c = *chunk;
        self.race(&chunk.digest, move |svc| {
            Box::pin(async move { svc.read_chunk(&c).await })
        })
        .await
    }

    /// The first member to open a stream of the blob's chunks wins; a fill
    /// in front of the race then moves the blob in one transfer. The others
    /// carry it on if a chunk of it fails its check.
    async fn stream_chunks(
        &self,
        digest: &B3Digest,
        chunks: &[ChunkMeta],
    ) -> Result<Option<ChunkStream>> {
        let d = *digest;
        let list: Arc<[ChunkMeta]> = chunks.into();
        let asked = list.clone();
        let won = self
            .shared
            .race(digest, &[], move |svc| {
                let list = asked.clone();
                Box::pin(async move { svc.stream_chunks(&d, &list).await })
            })
            .await?;
        Ok(won.map(|(i, stream)| self.shared.clone().resuming(d, list, i, stream)))
    }

    async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
        Err(Error::ReadOnly(
            "a race is a read source; name a tier in `write_to` for Puts".into(),
        ))
    }

    async fn shutdown(&self, deadline: tokio::time::Instant) -> Result<()> {
        for m in &self.shared.members {
            m.svc.shutdown(deadline).await?;
        }
        Ok(())
    }

    /// Passes over the member whose Stat gave `chunks`, for that blob, as
    /// for chunks that failed their check; asked again, the race answers
    /// from the others, if any is left that is not passed over. A list the
    /// race does not remember passing on (not from it, or too long ago)
    /// passes over no member.
    fn caught_lying(&self, digest: &B3Digest, chunks: &[ChunkMeta]) -> bool {
        let shared = &self.shared;
        let Some(lister) = shared.listed_by.remove(&(*digest, list_print(chunks))) else {
            return false;
        };
        shared.distrust(
            lister,
            digest,
            "race member's chunk list of this blob was caught lying",
        );
        shared
            .members
            .iter()
            .any(|m| !m.distrusted.contains_key(digest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A member that lists a blob's chunks as told, while told to answer.
    struct Lister {
        chunks: Vec<ChunkMeta>,
        answers: AtomicBool,
    }

    impl Lister {
        fn new(chunks: &[ChunkMeta]) -> Arc<Self> {
            Arc::new(Lister {
                chunks: chunks.to_vec(),
                answers: AtomicBool::new(true),
            })
        }

        fn answers(&self, yes: bool) {
            self.answers.store(yes, Ordering::SeqCst);
        }
    }

    #[async_trait]
    impl BlobService for Lister {
        async fn stat(&self, _: &B3Digest) -> Result<Option<BlobStat>> {
            Ok(self.answers.load(Ordering::SeqCst).then(|| BlobStat {
                size: self.chunks.iter().map(|c| c.size).sum(),
                chunks: self.chunks.clone(),
            }))
        }

        async fn open_read(&self, _: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
            Ok(None)
        }

        async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
            Err(Error::ReadOnly("a test member".into()))
        }
    }

    fn race_of(members: &[(&str, Arc<Lister>)]) -> RaceService {
        let members = members
            .iter()
            .map(|(name, svc)| Member {
                name: name.to_string(),
                svc: svc.clone(),
                distrusted: moka::sync::Cache::new(DISTRUSTED_PER_MEMBER),
            })
            .collect();
        RaceService {
            shared: Arc::new(Shared {
                members,
                hedge_after: None,
                listed_by: moka::sync::Cache::new(LISTED_BY),
            }),
        }
    }

    #[test]
    fn a_list_print_is_the_digest_of_every_entry() {
        let list: Vec<ChunkMeta> = (0..600u64)
            .map(|i| ChunkMeta {
                digest: B3Digest::of(&i.to_le_bytes()),
                size: 1000 + i,
            })
            .collect();
        let whole: Vec<u8> = list
            .iter()
            .flat_map(|c| [&c.digest.as_bytes()[..], &c.size.to_le_bytes()].concat())
            .collect();
        for n in [0, 1, 255, 256, 257, 600] {
            let print = list_print(&list[..n]);
            assert_eq!(print, blake3::hash(&whole[..n * 40]), "{n} entries");
        }
        let mut other = list.clone();
        other[599].size += 1;
        assert_ne!(list_print(&list), list_print(&other));
    }

    /// Two reads of one blob close together, whose Stats two members won
    /// in turn: the read that catches the first list lying blames the
    /// member that gave it, not the one whose Stat the race passed on
    /// last.
    #[tokio::test]
    async fn the_member_whose_list_lied_is_passed_over_whoever_answered_since() {
        let digest = B3Digest::of(b"a blob");
        let honest_list = [b"one", b"two"].map(|c| ChunkMeta {
            digest: B3Digest::of(c),
            size: 3,
        });
        let lying_list = [honest_list[1], honest_list[0]];
        let (liar, honest) = (Lister::new(&lying_list), Lister::new(&honest_list));
        let race = race_of(&[("liar", liar.clone()), ("honest", honest.clone())]);
        let listed = |stat: Option<BlobStat>| stat.expect("a member answers").chunks;

        honest.answers(false);
        assert_eq!(listed(race.stat(&digest).await.unwrap()), lying_list);
        liar.answers(false);
        honest.answers(true);
        assert_eq!(listed(race.stat(&digest).await.unwrap()), honest_list);

        assert!(
            race.caught_lying(&digest, &lying_list),
            "the honest member is left"
        );
        let distrusted = |i: usize| race.shared.members[i].distrusted.contains_key(&digest);
        assert!(distrusted(0), "the liar is not passed over");
        assert!(!distrusted(1), "the honest member is passed over");
        liar.answers(true);
        for _ in 0..4 {
            assert_eq!(listed(race.stat(&digest).await.unwrap()), honest_list);
        }

        // A list the race did not pass on passes over nobody, and says so.
        assert!(!race.caught_lying(&digest, &honest_list[..1]));
        assert!(!distrusted(1));
        // Nor does a list of another blob.
        assert!(!race.caught_lying(&B3Digest::of(b"another"), &honest_list));
        assert!(!distrusted(1));
    }
}
