//! `tiers`: strata's main combinator. An ordered list of tiers, near to far;
//! reads are answered by the nearest tier that has the blob, and what comes
//! from far is written into the near tiers on the way.
//!
//! ```toml
//! [blobservices.root]
//! type = "tiers"
//! tiers = ["mem", "disk", "peer", "s3"]   # near -> far; order = priority
//! fill = "sync"                           # or "async", "off"
//! write_to = ["disk"]                     # default: the nearest persistent tier
//! fill_to = ["mem", "disk"]               # default: the caching kinds in the list
//! ```
//!
//! # Reads
//!
//! 1. Each tier is asked for the blob's Stat, in order. A tier that errors
//!    or times out counts as a miss (logged and counted); the first one that
//!    has the blob, tier *k*, provides its size and chunk list.
//! 2. If *k* is the nearest tier, or `fill = "off"`, or no tier before *k*
//!    takes fills, the blob is read from *k* (falling back to the tiers after
//!    *k* if that fails). Every tier's reader is verified (the
//!    [`BlobService`] contract). A reader that fails part-way (a lie caught
//!    at a chunk or 16 KiB group, a peer that stalls or dies) is replaced by
//!    the next tier's, seeked to where the first stopped, so the client's
//!    stream goes on (see `failover.rs`).
//! 3. Otherwise the blob is fetched chunk by chunk: each chunk from the
//!    nearest fill tier that already holds it (dedup across blobs), else
//!    from *k* or a later tier, verified against its digest, a bounded
//!    number in flight. The chunks stream into a writer on every fill tier
//!    before *k* (except tiers smaller than twice the blob, which it would
//!    mostly flush). A far tier's chunk list is never trusted: the run of
//!    chunks is proven to be the blob ([`BlobCheck`]: group by group against
//!    *k*'s outboard, else by hashing it all) before any fill tier publishes
//!    it; if it is not, the source is recorded as lying and nothing is
//!    published. Fill tiers store a sane chunk list as listed, without
//!    cutting and hashing it again ([`BlobService::open_fill`]).
//!    * `sync`: the reader that started the fill gets the proven bytes as
//!      they arrive, while the fill writes them (see `tap.rs`); readers that
//!      join it, or that fall behind, read from the near tier once the fill
//!      completed.
//!    * `async`: the fetched blob is verified into a spool, the read is
//!      answered from the spool at once, and a background worker writes the
//!      spool into the fill tiers (bounded queue; a full queue drops the fill
//!      and counts it; shutdown drains the queue). Reads of the blob that
//!      come before its fill has run are answered from the same spool.
//!
//! Concurrent reads of one blob share one fetch (single-flight).
//!
//! Asked for a single chunk (an outer engine's fill, going chunk by chunk),
//! a `tiers` asks each tier for it directly, nearest first, and writes it
//! into the fill tiers before the one that had it, without a Stat per
//! chunk.
//!
//! A tier whose data for a blob failed verification (a lie, or rot) is
//! passed over for that blob for ten minutes, in Stats and reads alike, so
//! the next read fills the near tiers from an honest tier instead of
//! meeting the lie again; if no other tier has the blob, the read fails
//! naming the liar rather than reporting the blob absent. Tiers that take
//! fills are exempt: they drop what failed a check and are refilled.
//!
//! # Writes
//!
//! Puts go to every tier in `write_to` (default: the nearest persistent
//! tier, else the nearest tier).

mod failover;
mod tap;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info_span, warn};

use crate::blobservice::{
    BlobReader, BlobService, BlobStat, BlobWriter, BufferedReader, ChunkMeta, ChunkStream,
    LARGEST_CHUNK, Pieces, PutResult, SharedSpool, check_chunk_size,
};
use crate::composition::{BuildContext, TierConfig};
use crate::digest::B3Digest;
use crate::error::{Error, Result, absent_unless_failed};
use crate::metrics::{Metrics, TierMetrics};
use crate::singleflight::SingleFlight;
use crate::verify::{
    BlobCheck, BlobProof, Outboard, cut_chunks, cut_proven, spool_verified_shared,
};
use tap::{Tap, TapReader};

/// Blobs up to this size are proven by hashing them whole, not against
/// their source's outboard: asking for it would cost a round trip (a peer
/// sends a blob this small inline with the Stat that located it), and
/// releasing its first groups early gains little, as the whole blob is held
/// until proven anyway ([`HOLD_LIMIT`]). The hash computes its outboard.
const CHECKED_WHOLE_MAX: u64 = crate::chunkstore::MAX_CHUNK_SIZE as u64;
/// Default number of chunks fetched concurrently during a fill.
const DEFAULT_READ_AHEAD: usize = 8;
/// How long a tier that lied about a blob is passed over for it: long
/// enough that the next reads fill the near tiers from an honest one, short
/// enough that a repaired object is used again soon.
const DISTRUST_FOR: std::time::Duration = std::time::Duration::from_secs(600);
/// Most digests a tier is distrusted for at once (about 100 bytes each).
const DISTRUSTED_PER_TIER: u64 = 16_384;
/// Largest bound of the async fill queue a configuration may set: each
/// queued fill holds a verified spool, so a queue this long is already more
/// than a cache should hold back (and tokio's channels refuse bounds past
/// `usize::MAX >> 3`).
const MAX_FILL_QUEUE: usize = 1 << 20;
/// Default bound of the async fill queue.
const DEFAULT_FILL_QUEUE: usize = 64;
/// Size of the pieces a whole-blob fetch is streamed in.
const PIECE: usize = 256 * 1024;
/// Largest blob a sync fill without an outboard holds in memory until it is
/// proven, to answer its reader before the fill tiers have stored it.
const HOLD_LIMIT: u64 = crate::blobservice::SPOOL_IN_MEMORY as u64;
/// Smallest chunk (but the last) of a chunk list a fill keeps as listed.
/// Any honest FastCDC list qualifies; a list of tiny chunks, which would
/// cost a file or an object per few bytes, is cut afresh instead.
const MIN_KEPT_CHUNK: u64 = 16 * 1024;

/// How many times one read asks a tier again after it passed over the
/// source of a lie itself ([`Member::asks_again`]): a bound, should each
/// answer it then gives be a lie as well.
const ASK_AGAIN: usize = 2;

/// Whether a fill hands the fill tiers the blob in pieces they may store as
/// they come, without cutting and hashing them again
/// ([`BlobService::open_fill`]): the chunks of a list it keeps, or a small
/// blob fetched whole as one chunk.
fn fills_as_fetched(stat: &BlobStat) -> bool {
    keeps_chunk_list(stat) || fetched_whole(stat)
}

/// Whether a fill fetches the blob as one chunk, one verified read of the
/// blob's own digest: it lists fewer than two chunks and is no larger than
/// a chunk may be.
fn fetched_whole(stat: &BlobStat) -> bool {
    stat.chunks.len() < 2 && stat.size <= LARGEST_CHUNK
}

/// Blob `digest` of `stat` as the one chunk a fill fetches it as when
/// [`fetched_whole`].
fn whole_chunk(digest: B3Digest, stat: &BlobStat) -> ChunkMeta {
    ChunkMeta {
        digest,
        size: stat.size,
    }
}

/// Whether a fill may store the blob as `stat` lists it: two or more
/// chunks, none too large (those fail their fetch anyway) and none but the
/// last too small.
fn keeps_chunk_list(stat: &BlobStat) -> bool {
    let Some((_, init)) = stat.chunks.split_last() else {
        return false;
    };
    stat.chunks.len() >= 2
        && stat.chunks.iter().all(|c| c.size <= LARGEST_CHUNK)
        && init.iter().all(|c| c.size >= MIN_KEPT_CHUNK)
}

/// When fetched data is written into the near tiers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fill {
    /// Before the read is answered.
    #[default]
    Sync,
    /// In the background, after the read is answered.
    Async,
    /// Never.
    Off,
}

impl std::fmt::Display for Fill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Fill::Sync => "sync",
            Fill::Async => "async",
            Fill::Off => "off",
        })
    }
}

/// Configuration of a `tiers` combinator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TiersConfig {
    /// Tier names (or URLs), nearest first.
    pub tiers: Vec<String>,
    /// Fill policy.
    #[serde(default)]
    pub fill: Fill,
    /// Where Puts go (default: the nearest persistent tier).
    pub write_to: Option<Vec<String>>,
    /// Which tiers of the list take fills (default: those whose kind caches:
    /// `memory`, `disk`, `objectstore`; peers fill themselves).
    pub fill_to: Option<Vec<String>>,
    /// Bound of the async fill queue (default 64 blobs).
    pub fill_queue: Option<usize>,
    /// Chunks fetched concurrently while filling (default 8).
    pub read_ahead: Option<usize>,
}

#[async_trait]
impl TierConfig for TiersConfig {
    fn references(&self) -> Vec<String> {
        let mut refs = self.tiers.clone();
        for w in self.write_to.iter().flatten() {
            if !refs.contains(w) {
                refs.push(w.clone());
            }
        }
        refs
    }

    fn validate(&self) -> Result<(), String> {
        if self.tiers.is_empty() {
            return Err("`tiers` must name at least one tier".into());
        }
        for (i, t) in self.tiers.iter().enumerate() {
            if self.tiers[..i].contains(t) {
                return Err(format!("`tiers` names `{t}` twice"));
            }
        }
        if self.write_to.as_ref().is_some_and(Vec::is_empty) {
            return Err("`write_to` is empty: omit it for the default".into());
        }
        for f in self.fill_to.iter().flatten() {
            if !self.tiers.contains(f) {
                return Err(format!("`fill_to` names `{f}`, which is not in `tiers`"));
            }
        }
        if let Some(n) = self.fill_queue.filter(|&n| n > MAX_FILL_QUEUE) {
            return Err(format!("`fill_queue` = {n} is more than {MAX_FILL_QUEUE}"));
        }
        Ok(())
    }

    fn describe(&self) -> String {
        let write_to = match &self.write_to {
            Some(w) => format!("[{}]", w.join(", ")),
            None => "nearest persistent".into(),
        };
        format!(
            "tiers [{}] (fill = {}, write_to = {write_to})",
            self.tiers.join(", "),
            self.fill
        )
    }

    fn persistent(&self, ctx: &BuildContext) -> bool {
        self.write_targets(ctx).iter().any(|t| ctx.persistent(t))
    }

    async fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn BlobService>> {
        let members = self
            .tiers
            .iter()
            .map(|name| {
                Ok(Member::new(
                    name.clone(),
                    ctx.tier(name)?,
                    match &self.fill_to {
                        Some(fill_to) => fill_to.contains(name),
                        None => ctx.fills_by_default(name),
                    },
                    ctx.capacity(name),
                    ctx.metrics().tier(name),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let write_to = self
            .write_targets(ctx)
            .into_iter()
            .map(|name| {
                Ok(members
                    .iter()
                    .find(|m| m.name == name)
                    .cloned()
                    .unwrap_or(Member::new(
                        name.clone(),
                        ctx.tier(&name)?,
                        false,
                        None,
                        ctx.metrics().tier(&name),
                    )))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Arc::new(TiersService::new(
            members,
            write_to,
            self.fill,
            self.read_ahead.unwrap_or(DEFAULT_READ_AHEAD).max(1),
            self.fill_queue.unwrap_or(DEFAULT_FILL_QUEUE).max(1),
            ctx.metrics().clone(),
        )))
    }
}

impl TiersConfig {
    fn write_targets(&self, ctx: &BuildContext) -> Vec<String> {
        match &self.write_to {
            Some(w) => w.clone(),
            None => {
                let nearest_persistent = self.tiers.iter().find(|t| ctx.persistent(t));
                vec![nearest_persistent.unwrap_or(&self.tiers[0]).clone()]
            }
        }
    }
}

#[derive(Clone)]
struct Member {
    name: String,
    svc: Arc<dyn BlobService>,
    takes_fills: bool,
    /// Bytes the tier holds at most, if bounded.
    capacity: Option<u64>,
    /// The tier's metrics. Calls, hits, misses, errors and bytes are
    /// counted around every tier by the composition engine; this
    /// combinator adds what only it sees: verification failures it caught,
    /// fills.
    metrics: TierMetrics,
    /// Blobs (and chunks) this tier gave data for that failed verification
    /// lately: it is passed over for them until [`DISTRUST_FOR`] has gone
    /// by. `None` for tiers that take fills, which drop what fails a check
    /// themselves and are refilled.
    distrusted: Option<moka::sync::Cache<B3Digest, ()>>,
}

impl Member {
    fn new(
        name: String,
        svc: Arc<dyn BlobService>,
        takes_fills: bool,
        capacity: Option<u64>,
        metrics: TierMetrics,
    ) -> Self {
        let distrusted = (!takes_fills).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(DISTRUSTED_PER_TIER)
                .time_to_live(DISTRUST_FOR)
                .build()
        });
        Member {
            name,
            svc,
            takes_fills,
            capacity,
            metrics,
            distrusted,
        }
    }

    /// Whether this tier lied about `digest` lately (see
    /// [`Member::distrusted`]).
    fn distrusts(&self, digest: &B3Digest) -> bool {
        self.distrusted
            .as_ref()
            .is_some_and(|d| d.contains_key(digest))
    }

    /// Whether a fill of a blob of `size` bytes goes into this tier. A blob
    /// larger than half the tier's capacity does not: it would flush most of
    /// the tier, and likely be evicted before it is read.
    fn takes_fill_of(&self, size: u64) -> bool {
        self.takes_fills && self.capacity.is_none_or(|c| size <= c / 2)
    }

    /// Counts a failure of this tier that is a lie: data that failed
    /// verification. (Every failed call is counted as an error around the
    /// tier already.)
    fn count_failure(&self, err: &Error) {
        if matches!(err.root(), Error::Verification(_)) {
            self.metrics.verification_failures.inc();
        }
    }

    /// Counts a failure about `digest` and, if it is a lie, passes this
    /// tier over for `digest` for a while (unless it takes fills).
    ///
    /// Why per blob: the tier's breaker does not see a lie the engine
    /// catches (a chunk list that does not make up the blob, say), since
    /// the tier's own calls succeeded and reset it; a tier listed before an
    /// honest one would be asked, and fail, on every read, and the near
    /// tiers never filled from the honest one. Opening the breaker instead
    /// would take a bucket with one rotten object out of service for every
    /// blob.
    fn record_failure(&self, what: &str, digest: &B3Digest, err: &Error) {
        self.count_failure(err);
        self.distrust_if_lie(digest, err);
        if matches!(err.root(), Error::CircuitOpen { .. }) {
            // Said once when the breaker opened; not again per request.
            debug!(tier = %self.name, %digest, "{what} skipped: circuit open");
            return;
        }
        warn!(tier = %self.name, %digest, error = %err, "{what} failed; trying the next tier");
    }

    /// Why a distrusted tier was not asked, for an error that says why no
    /// tier answered.
    fn distrust_note(&self) -> String {
        format!(
            "{}: passed over, it lied about this digest in the last {} s",
            self.name,
            DISTRUST_FOR.as_secs()
        )
    }

    fn distrust_if_lie(&self, digest: &B3Digest, err: &Error) {
        if let Some(distrusted) = &self.distrusted
            && matches!(err.root(), Error::Verification(_))
            // One entry, and one warning, however many reads caught the
            // same lie at once.
            && distrusted.entry(*digest).or_insert(()).is_fresh()
        {
            warn!(tier = %self.name, %digest, for_secs = DISTRUST_FOR.as_secs(),
                "the tier lied about this digest: passed over for it");
        }
    }

    /// [`Member::record_failure`] for what a fill from this tier caught: a
    /// lie there is in the chunk list this tier gave, `chunks` (its chunks,
    /// each checked as listed, do not make up the blob). A tier that passes
    /// over the list's source itself ([`BlobService::caught_lying`]: a
    /// `race`) is not passed over, and is asked again
    /// ([`Member::asks_again`]): its other members may have the blob.
    fn record_list_lie(&self, what: &str, digest: &B3Digest, chunks: &[ChunkMeta], err: &Error) {
        if self.distrusted.is_some()
            && matches!(err.root(), Error::Verification(_))
            && self.svc.caught_lying(digest, chunks)
        {
            self.count_failure(err);
            warn!(tier = %self.name, %digest, error = %err,
                "{what} failed; the tier passed over the source of the list, asking it again");
            return;
        }
        self.record_failure(what, digest, err);
    }

    /// Whether, after a lie caught in what it gave for `digest`, this tier
    /// is to be asked again: it could have been passed over for it, and
    /// was not, since it passed over the liar itself
    /// ([`Member::record_list_lie`]).
    fn asks_again(&self, digest: &B3Digest) -> bool {
        self.distrusted.is_some() && !self.distrusts(digest)
    }

    /// [`Member::record_failure`] for a read that failed after `position`
    /// bytes had been delivered.
    fn record_failure_at(&self, what: &str, digest: &B3Digest, err: &Error, position: u64) {
        self.count_failure(err);
        self.distrust_if_lie(digest, err);
        warn!(tier = %self.name, %digest, position, error = %err,
            "{what} failed part-way; trying the next tier");
    }
}

/// The `tiers` combinator. See the module docs.
pub struct TiersService {
    inner: Arc<Inner>,
}

struct Inner {
    members: Vec<Member>,
    write_to: Vec<Member>,
    fill: Fill,
    read_ahead: usize,
    /// Fetch-and-fill runs by blob digest; async fills yield their spool.
    flights: SingleFlight<B3Digest, Option<SharedSpool>>,
    filler: Option<AsyncFiller>,
    metrics: Metrics,
}

impl TiersService {
    fn new(
        members: Vec<Member>,
        write_to: Vec<Member>,
        fill: Fill,
        read_ahead: usize,
        fill_queue: usize,
        metrics: Metrics,
    ) -> Self {
        let filler = (fill == Fill::Async).then(|| AsyncFiller::start(fill_queue));
        TiersService {
            inner: Arc::new(Inner {
                members,
                write_to,
                fill,
                read_ahead,
                flights: SingleFlight::default(),
                filler,
                metrics,
            }),
        }
    }
}

/// Why [`Inner::locate`] looks for a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// To answer a Stat.
    Stat,
    /// To read it next ([`BlobService::stat_before_read`]).
    Read,
}

impl Inner {
    /// The nearest tier from `from` on that has the blob, and its Stat.
    async fn locate(
        &self,
        digest: &B3Digest,
        from: usize,
        purpose: Purpose,
    ) -> Result<Option<(usize, BlobStat)>> {
        let mut failures = Vec::new();
        for (i, m) in self.members.iter().enumerate().skip(from) {
            if m.distrusts(digest) {
                failures.push(m.distrust_note());
                continue;
            }
            let stat = match purpose {
                Purpose::Stat => m.svc.stat(digest).await,
                Purpose::Read => m.svc.stat_before_read(digest).await,
            };
            match stat {
                Ok(Some(stat)) => return Ok(Some((i, stat))),
                Ok(None) => {}
                Err(e) => {
                    m.record_failure("stat", digest, &e);
                    failures.push(format!("{}: {e}", m.name));
                }
            }
        }
        absent_unless_failed(failures)
    }

    /// Tiers before `k` that take fills (whatever the blob's size): where a
    /// chunk may already be, through another blob.
    fn near_caches(&self, k: usize) -> Vec<&Member> {
        self.members[..k].iter().filter(|m| m.takes_fills).collect()
    }

    /// Tiers before `k` that take a fill of a blob of `size` bytes.
    fn fill_targets(&self, k: usize, size: u64) -> Vec<&Member> {
        self.members[..k]
            .iter()
            .filter(|m| m.takes_fill_of(size))
            .collect()
    }

    /// Reads from tier `from`, then from each later tier, until one
    /// answers; the reader moves on to later tiers if it fails part-way.
    async fn read_direct(
        self: &Arc<Self>,
        digest: &B3Digest,
        from: usize,
    ) -> Result<Option<Box<dyn BlobReader>>> {
        let mut failures = Vec::new();
        for (i, m) in self.members.iter().enumerate().skip(from) {
            if m.distrusts(digest) {
                failures.push(m.distrust_note());
                continue;
            }
            match m.svc.open_read(digest).await {
                Ok(Some(reader)) => return Ok(Some(self.failover(digest, i, reader))),
                Ok(None) => {}
                Err(e) => {
                    m.record_failure("read", digest, &e);
                    failures.push(format!("{}: {e}", m.name));
                }
            }
        }
        absent_unless_failed(failures)
    }

    /// `reader` (of tier `tier`), made to continue from the later tiers if
    /// it fails part-way.
    fn failover(
        self: &Arc<Self>,
        digest: &B3Digest,
        tier: usize,
        reader: Box<dyn BlobReader>,
    ) -> Box<dyn BlobReader> {
        if tier + 1 == self.members.len() {
            return reader;
        }
        Box::new(failover::FailoverReader::new(
            self.clone(),
            *digest,
            tier,
            reader,
        ))
    }

    /// Reads from the fill tiers before `k` (after a fill).
    async fn read_near(
        self: &Arc<Self>,
        digest: &B3Digest,
        k: usize,
        size: u64,
    ) -> Option<Box<dyn BlobReader>> {
        for (i, m) in self.members[..k].iter().enumerate() {
            if !m.takes_fill_of(size) {
                continue;
            }
            match m.svc.open_read(digest).await {
                Ok(Some(reader)) => return Some(self.failover(digest, i, reader)),
                Ok(None) => {}
                Err(e) => m.record_failure("read", digest, &e),
            }
        }
        None
    }

    /// The outboard a fetch of the blob from tier `k` is checked against
    /// ([`BlobCheck`]), so a chunk list that does not make up the blob fails
    /// at its first bad group; without one the blob is hashed whole. A blob
    /// of one chunk, or of no more than a maximum chunk's worth
    /// ([`CHECKED_WHOLE_MAX`]), goes without: asking the source for its
    /// outboard would cost a round trip more than the hashing saves.
    async fn fetch_outboard(
        &self,
        digest: &B3Digest,
        k: usize,
        stat: &BlobStat,
    ) -> Result<Option<Outboard>> {
        if stat.size <= CHECKED_WHOLE_MAX {
            return Ok(None);
        }
        if stat.chunks.len() >= 2 || stat.size > LARGEST_CHUNK {
            self.source_outboard(digest, k).await
        } else {
            Ok(None)
        }
    }

    /// Tier `k`'s outboard of the blob. A wrong one is tier `k` lying (an
    /// error, so the read moves on); a tier that cannot say is read without
    /// one (the fill tiers still check the whole blob's digest).
    async fn source_outboard(&self, digest: &B3Digest, k: usize) -> Result<Option<Outboard>> {
        let source = &self.members[k];
        match source.svc.outboard(digest).await {
            Ok(outboard) => Ok(outboard),
            Err(e) if matches!(e.root(), Error::Verification(_)) => {
                source.record_failure("outboard", digest, &e);
                Err(e)
            }
            Err(e) => {
                source.record_failure("outboard", digest, &e);
                Ok(None)
            }
        }
    }

    /// The blob found in tier `k`, as the pieces a fill fetches and the
    /// check that proves them the blob: against tier `k`'s outboard, or by
    /// hashing them, or, for a blob fetched whole as one chunk, by the read
    /// that verified it (the one piece it is).
    async fn fetch(
        self: &Arc<Self>,
        digest: B3Digest,
        k: usize,
        stat: &BlobStat,
    ) -> Result<(BlobCheck, BoxStream<'static, Result<Bytes>>)> {
        let check = if fetched_whole(stat) {
            BlobCheck::read_chunk(whole_chunk(digest, stat))
        } else {
            let outboard = self.fetch_outboard(&digest, k, stat).await?;
            BlobCheck::new(digest, Some(stat.size), outboard)
        };
        Ok((check, self.unchecked_pieces(digest, k, stat).await?))
    }

    /// The blob's bytes, each chunk checked against its digest only.
    async fn unchecked_pieces(
        self: &Arc<Self>,
        digest: B3Digest,
        k: usize,
        stat: &BlobStat,
    ) -> Result<BoxStream<'static, Result<Bytes>>> {
        if stat.chunks.len() >= 2 {
            if !self.near_holds_any(k, &stat.chunks).await {
                match self.members[k]
                    .svc
                    .stream_chunks(&digest, &stat.chunks)
                    .await
                {
                    Ok(Some(whole)) => return Ok(self.streamed_chunks(digest, k, stat, whole)),
                    Ok(None) => {}
                    Err(e) => self.members[k].record_failure("stream", &digest, &e),
                }
            }
            return Ok(self.chunk_by_chunk(digest, k, stat.chunks.clone()));
        }
        if fetched_whole(stat) {
            // One chunk's worth with its length known: a single verified
            // read (for a peer, no Stat before it).
            let this = self.clone();
            let whole = whole_chunk(digest, stat);
            return Ok(
                stream::once(async move { this.fetch_chunk(&digest, whole, k).await }).boxed(),
            );
        }
        let reader = self
            .read_direct(&digest, k)
            .await?
            .ok_or(Error::AllTiersFailed(vec![format!(
                "blob {digest} vanished from every tier"
            )]))?;
        Ok(Pieces::new(reader, PIECE)
            .map(|piece| piece.map_err(Error::from_io))
            .boxed())
    }

    /// Each chunk of `blob` fetched on its own ([`Inner::fetch_chunk`]), up
    /// to `read_ahead` at a time.
    fn chunk_by_chunk(
        self: &Arc<Self>,
        digest: B3Digest,
        k: usize,
        chunks: Vec<ChunkMeta>,
    ) -> BoxStream<'static, Result<Bytes>> {
        let this = self.clone();
        stream::iter(chunks)
            .map(move |c| {
                let this = this.clone();
                async move { this.fetch_chunk(&digest, c, k).await }
            })
            .buffered(self.read_ahead)
            .boxed()
    }

    /// Whether a near cache before `k` holds any of `chunks` (another blob
    /// brought them): then the blob is fetched chunk by chunk, so that only
    /// the missing ones come from far. A cache that cannot say counts as
    /// holding none.
    async fn near_holds_any(&self, k: usize, chunks: &[ChunkMeta]) -> bool {
        for m in self.near_caches(k) {
            match m.svc.holds_chunks(chunks).await {
                Ok(held) if held.contains(&true) => return true,
                Ok(_) => {}
                Err(e) => {
                    debug!(tier = %m.name, error = %e, "could not tell which chunks it holds")
                }
            }
        }
        false
    }

    /// `whole`, tier `k`'s stream of the blob's chunks, carried on chunk by
    /// chunk from where it stopped if it fails for anything but a lie (a
    /// connection lost part-way, a stall), so that what was fetched is not
    /// fetched again. A lie ends the stream: the caller fails tier `k`.
    fn streamed_chunks(
        self: &Arc<Self>,
        digest: B3Digest,
        k: usize,
        stat: &BlobStat,
        mut whole: BoxStream<'static, Result<Bytes>>,
    ) -> BoxStream<'static, Result<Bytes>> {
        let this = self.clone();
        let chunks = stat.chunks.clone();
        Box::pin(async_stream::stream! {
            let mut done = 0;
            while let Some(item) = whole.next().await {
                match item {
                    Ok(chunk) => {
                        done += 1;
                        yield Ok(chunk);
                    }
                    Err(e) if matches!(e.root(), Error::Verification(_)) => {
                        yield Err(e);
                        return;
                    }
                    Err(e) => {
                        this.members[k].record_failure("stream", &digest, &e);
                        break;
                    }
                }
            }
            if done < chunks.len() {
                let mut rest = this.chunk_by_chunk(digest, k, chunks[done..].to_vec());
                while let Some(item) = rest.next().await {
                    yield item;
                }
            }
        })
    }

    /// One chunk of `blob`, verified: from the nearest fill tier before `k`
    /// that holds it, else from tier `k` or a later one.
    async fn fetch_chunk(&self, blob: &B3Digest, chunk: ChunkMeta, k: usize) -> Result<Bytes> {
        check_chunk_size(&chunk)?;
        let sources = self.near_caches(k).into_iter().chain(&self.members[k..]);
        // Tiers that returned something other than the listed chunk. Whose
        // lie that is shows only at the end: if another tier has the chunk
        // as listed, theirs; if none does, the list's (tier `k`'s, which
        // the caller records), so no honest tier is blamed for it.
        let mut mismatched: Vec<(&Member, Error)> = Vec::new();
        for m in sources.filter(|m| !m.distrusts(&chunk.digest)) {
            match m.svc.read_chunk(&chunk).await {
                Ok(Some(data)) => {
                    for (m, e) in &mismatched {
                        m.record_failure("chunk read", &chunk.digest, e);
                    }
                    return Ok(data);
                }
                Ok(None) => {}
                Err(e) if matches!(e.root(), Error::Verification(_)) => mismatched.push((m, e)),
                Err(e) => m.record_failure("chunk read", &chunk.digest, &e),
            }
        }
        for (m, e) in &mismatched {
            debug!(tier = %m.name, chunk = %chunk.digest, error = %e, "chunk not as listed");
        }
        Err(mismatched
            .pop()
            .map(|(_, e)| e)
            .unwrap_or(Error::MissingChunk {
                blob: *blob,
                chunk: chunk.digest,
            }))
    }

    /// Fetches the blob found in tier `k` and writes it into every fill
    /// tier before `k`. The bytes are proven to be the blob (a
    /// [`BlobCheck`], against tier `k`'s outboard when it has one) before
    /// any fill tier publishes them.
    ///
    /// When tier `k` lists chunks of sane sizes, each arrives verified
    /// against its digest and the fill tiers store them as listed
    /// ([`BlobService::open_fill`]): the check is the only other pass over
    /// the bytes. A blob of one chunk, fetched whole, is stored as it came
    /// too, and its read is its only pass ([`BlobCheck::read_chunk`]).
    /// Otherwise the fill tiers chunk and hash the stream themselves.
    ///
    /// Proven bytes also go to `tap`, the reader that started the fill, as
    /// they arrive.
    async fn fill_sync(
        self: Arc<Self>,
        digest: B3Digest,
        k: usize,
        stat: BlobStat,
        mut tap: Tap,
    ) -> Result<()> {
        let listed = fills_as_fetched(&stat);
        let mut writers = Vec::new();
        for m in self.fill_targets(k, stat.size) {
            let opened = if listed {
                m.svc.open_fill(&digest, &stat).await
            } else {
                m.svc.open_write().await
            };
            match opened {
                Ok(w) => writers.push((m, w)),
                Err(e) => m.record_failure("fill", &digest, &e),
            }
        }
        if writers.is_empty() {
            return Err(Error::AllTiersFailed(vec![
                "no fill tier accepted a write".into(),
            ]));
        }
        let (mut check, mut pieces) = self.fetch(digest, k, &stat).await?;
        // Without an outboard nothing is proven before the end. A small
        // blob is held until then and handed to the reader at once, before
        // the fill tiers finish storing it; the reader of a larger one
        // waits for the fill.
        let mut held = (!check.streams() && stat.size <= HOLD_LIMIT).then(Vec::new);
        if !check.streams() && held.is_none() {
            tap.close();
        }
        let source_lied = |e: &Error| {
            if matches!(e.root(), Error::Verification(_)) {
                self.members[k].record_list_lie("fill source", &digest, &stat.chunks, e);
            }
        };
        while let Some(piece) = pieces.next().await {
            let piece = piece.inspect_err(source_lied)?;
            let proven = check
                .push(piece.clone())
                .map_err(Error::from)
                .inspect_err(source_lied)?;
            tap.feed(proven).await;
            if let Some(held) = &mut held {
                held.push(piece.clone());
            }
            let mut i = 0;
            while i < writers.len() {
                match writers[i].1.write(piece.clone()).await {
                    Ok(()) => i += 1,
                    Err(e) => {
                        writers[i].0.record_failure("fill", &digest, &e);
                        drop(writers.remove(i));
                    }
                }
            }
            if writers.is_empty() {
                return Err(Error::AllTiersFailed(vec!["every fill tier failed".into()]));
            }
        }
        let proof = check
            .finish()
            .map_err(Error::from)
            .inspect_err(source_lied)?;
        if let Some(held) = held {
            tap.feed(held).await;
        }
        tap.close();
        let mut filled = 0;
        for (m, w) in writers {
            match w.close_verified(&proof).await {
                Ok(_) => {
                    m.metrics.fills.inc();
                    filled += 1;
                }
                Err(e) => m.record_failure("fill", &digest, &e),
            }
        }
        if filled == 0 {
            return Err(Error::AllTiersFailed(vec!["every fill tier failed".into()]));
        }
        debug!(%digest, source = %self.members[k].name, filled, listed, "filled near tiers");
        Ok(())
    }

    /// Writes chunk `chunk` (`data`, verified), found in tier `k`, into the
    /// fill tiers before `k`, as a blob of its own: before returning with
    /// `fill = "sync"`, in the background with `"async"`.
    async fn fill_chunk(self: &Arc<Self>, k: usize, chunk: &ChunkMeta, data: &Bytes) {
        if self.fill == Fill::Off || self.fill_targets(k, chunk.size).is_empty() {
            return;
        }
        let (this, chunk, data) = (self.clone(), *chunk, data.clone());
        let fill = async move {
            // The fill tiers publish it only with a proof: the one its
            // read gave, without hashing it again.
            let mut check = BlobCheck::read_chunk(chunk);
            let proof = match check.push(data.clone()).and_then(|_| check.finish()) {
                Ok(proof) => proof,
                Err(e) => {
                    // The tier that gave it checked its length; a bug.
                    warn!(digest = %chunk.digest, error = %e, "verified chunk failed its proof");
                    return;
                }
            };
            for m in this.fill_targets(k, chunk.size) {
                if let Err(e) = store_chunk(&*m.svc, &chunk, data.clone(), &proof).await {
                    m.record_failure("chunk fill", &chunk.digest, &e);
                }
            }
        }
        .instrument(info_span!("chunk fill", digest = %chunk.digest));
        match self.fill {
            Fill::Async => drop(tokio::spawn(fill)),
            _ => fill.await,
        }
    }

    /// Fetches the blob found in tier `k` into a verified spool and queues a
    /// background fill of the tiers before `k` from it.
    async fn fill_async(
        self: Arc<Self>,
        digest: B3Digest,
        k: usize,
        stat: BlobStat,
    ) -> Result<SharedSpool> {
        // Nothing in the spool is released before the whole run is proven.
        let (check, pieces) = self.fetch(digest, k, &stat).await?;
        let spooled = spool_verified_shared(check, Some(stat.size), None, pieces).await;
        let (spool, proof) = match spooled {
            Ok(spooled) => spooled,
            Err(e) => {
                self.members[k].record_list_lie("fetch", &digest, &stat.chunks, &e);
                return Err(e);
            }
        };
        if let Some(filler) = &self.filler {
            let targets = self
                .fill_targets(k, stat.size)
                .into_iter()
                .cloned()
                .collect();
            filler.enqueue(FillJob {
                stat,
                spool: spool.clone(),
                proof,
                targets,
                pending: 0,
            });
        }
        Ok(spool)
    }
}

#[async_trait]
impl BlobService for TiersService {
    async fn stat(&self, digest: &B3Digest) -> Result<Option<BlobStat>> {
        self.nearest_stat(digest, Purpose::Stat).await
    }

    async fn stat_before_read(&self, digest: &B3Digest) -> Result<Option<BlobStat>> {
        self.nearest_stat(digest, Purpose::Read).await
    }

    /// The outboard of the nearest tier that has the blob.
    async fn outboard(&self, digest: &B3Digest) -> Result<Option<Outboard>> {
        match self.inner.locate(digest, 0, Purpose::Stat).await? {
            Some((k, _)) => self.inner.members[k].svc.outboard(digest).await,
            None => Ok(None),
        }
    }

    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
        if digest.is_empty_blob() {
            return Ok(Some(Box::new(BufferedReader::new(Bytes::new()))));
        }
        let mut from = 0;
        let mut lie: Option<Error> = None;
        let mut asked_again = 0;
        loop {
            let Some((k, stat)) = self.inner.locate(digest, from, Purpose::Read).await? else {
                // Absent from the honest tiers: a liar's error says more.
                return lie.map_or(Ok(None), Err);
            };
            match self.read_located(digest, k, stat).await {
                Err(e) if matches!(e.root(), Error::Verification(_)) => {
                    // Tier k served data that is not this blob (recorded
                    // where it was caught). Unless it passed over the liar
                    // itself, and only a few times, try the tiers after it.
                    if self.inner.members[k].asks_again(digest) && asked_again < ASK_AGAIN {
                        asked_again += 1;
                        from = k;
                    } else {
                        from = k + 1;
                    }
                    lie = Some(e);
                }
                other => return other,
            }
        }
    }

    /// The blob read through this engine like any read (its own fills
    /// included), cut back along `chunks`, each chunk checked against its
    /// digest. A `tiers` (or `combined`) that is another engine's source
    /// thus gives a cold blob in one read, where the default left that
    /// engine to ask for it chunk by chunk, a Stat and a read each.
    async fn stream_chunks(
        &self,
        digest: &B3Digest,
        chunks: &[ChunkMeta],
    ) -> Result<Option<ChunkStream>> {
        let Some(reader) = self.open_read(digest).await? else {
            return Ok(None);
        };
        let pieces = Pieces::new(reader, PIECE).map(|piece| piece.map_err(Error::from_io));
        Ok(Some(cut_chunks(*digest, chunks.to_vec(), pieces)))
    }

    /// The chunk from the nearest tier that has it, each asked for it
    /// directly (a peer answers with one Read, no Stat), and written into
    /// the fill tiers before that one, as a read of it as a blob would
    /// (a chunk is a blob of one chunk).
    async fn read_chunk(&self, chunk: &ChunkMeta) -> Result<Option<Bytes>> {
        let inner = &self.inner;
        let mut failures = Vec::new();
        for (k, m) in inner.members.iter().enumerate() {
            if m.distrusts(&chunk.digest) {
                failures.push(m.distrust_note());
                continue;
            }
            match m.svc.read_chunk(chunk).await {
                Ok(Some(data)) => {
                    inner.fill_chunk(k, chunk, &data).await;
                    return Ok(Some(data));
                }
                Ok(None) => {}
                Err(e) => {
                    m.record_failure("chunk read", &chunk.digest, &e);
                    failures.push(format!("{}: {e}", m.name));
                }
            }
        }
        absent_unless_failed(failures)
    }

    /// Held if any tier says it holds it.
    async fn holds_chunks(&self, chunks: &[ChunkMeta]) -> Result<Vec<bool>> {
        let mut held = vec![false; chunks.len()];
        for m in &self.inner.members {
            if held.iter().all(|&h| h) {
                break;
            }
            match m.svc.holds_chunks(chunks).await {
                Ok(answer) => {
                    for (held, answer) in held.iter_mut().zip(answer) {
                        *held |= answer;
                    }
                }
                // "Not known to be held" is always a safe answer.
                Err(e) => debug!(tier = %m.name, error = %e, "holds_chunks failed"),
            }
        }
        Ok(held)
    }

    async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
        let mut writers = Vec::with_capacity(self.inner.write_to.len());
        for m in &self.inner.write_to {
            writers.push(m.svc.open_write().await?);
        }
        if writers.len() == 1 {
            return Ok(writers.remove(0));
        }
        Ok(Box::new(TeeWriter { writers }))
    }

    async fn shutdown(&self, deadline: tokio::time::Instant) -> Result<()> {
        if let Some(filler) = &self.inner.filler {
            filler.drain(deadline).await;
        }
        // A tier named only in `write_to` is shut down too (a nested
        // engine there may have fills of its own to drain).
        let only_written = self
            .inner
            .write_to
            .iter()
            .filter(|w| !self.inner.members.iter().any(|m| m.name == w.name));
        for m in self.inner.members.iter().chain(only_written) {
            m.svc.shutdown(deadline).await?;
        }
        Ok(())
    }
}

impl TiersService {
    /// The Stat of the nearest tier that has the blob.
    async fn nearest_stat(&self, digest: &B3Digest, purpose: Purpose) -> Result<Option<BlobStat>> {
        let found = self.inner.locate(digest, 0, purpose).await?;
        Ok(found.map(|(_, stat)| stat))
    }

    /// Reads the blob found in tier `k` (whose Stat is `stat`): directly, or
    /// through a fill of the tiers before it.
    async fn read_located(
        &self,
        digest: &B3Digest,
        k: usize,
        stat: BlobStat,
    ) -> Result<Option<Box<dyn BlobReader>>> {
        let inner = &self.inner;
        let size = stat.size;
        if k == 0 || inner.fill == Fill::Off || inner.fill_targets(k, size).is_empty() {
            return inner.read_direct(digest, k).await;
        }
        let digest = *digest;
        if let Some(filler) = &inner.filler
            && let Some(reader) = filler.pending_read(&digest).await
        {
            debug!(%digest, "read from the spool of its pending fill");
            return Ok(Some(reader));
        }
        let span =
            info_span!("fill", %digest, source = %inner.members[k].name, policy = %inner.fill);
        let verification_failed = |e: &Error| matches!(e.root(), Error::Verification(_));
        // A sync fill streams to the reader that starts it (see `tap.rs`).
        let (tap, tap_rx) = match inner.fill {
            Fill::Sync => {
                let (tap, rx) = Tap::new();
                (tap, Some(rx))
            }
            _ => (Tap::none(), None),
        };
        let work = {
            let inner = inner.clone();
            async move {
                match inner.fill {
                    Fill::Async => inner.fill_async(digest, k, stat).await.map(Some),
                    _ => inner.fill_sync(digest, k, stat, tap).await.map(|()| None),
                }
            }
            .instrument(span)
        };
        let (flight, joined) = inner.flights.start(digest, work);
        if joined {
            inner.metrics.singleflight_joins().inc();
            debug!(%digest, "joined a fetch already in flight");
        } else if let Some(rx) = tap_rx {
            return Ok(Some(Box::new(TapReader::new(
                inner.clone(),
                digest,
                k,
                size,
                rx,
                flight,
            ))));
        }
        let result = flight.await;
        match result {
            Ok(Some(spool)) => return spool.open().await.map(Some),
            Ok(None) => {
                if let Some(reader) = inner.read_near(&digest, k, size).await {
                    return Ok(Some(reader));
                }
                debug!(%digest, "filled blob already gone from the near tiers");
            }
            Err(e) if verification_failed(&e) => return Err(Error::Shared(e)),
            Err(e) => warn!(%digest, error = %e, "fetch and fill failed; reading directly"),
        }
        inner.read_direct(&digest, k).await
    }
}

/// Stores `data`, the whole of chunk `chunk` (verified against its digest by
/// the tier it came from, and proven by `proof`), in `target` as a blob of
/// its own: a fill of one chunk, which a chunk store keeps without cutting
/// or hashing it again ([`BlobService::open_fill`]).
async fn store_chunk(
    target: &dyn BlobService,
    chunk: &ChunkMeta,
    data: Bytes,
    proof: &BlobProof,
) -> Result<()> {
    let stat = BlobStat {
        size: chunk.size,
        chunks: Vec::new(),
    };
    let mut writer = target.open_fill(&chunk.digest, &stat).await?;
    writer.write(data).await?;
    writer.close_verified(proof).await?;
    Ok(())
}

/// Writes one blob into several tiers.
struct TeeWriter {
    writers: Vec<Box<dyn BlobWriter>>,
}

#[async_trait]
impl BlobWriter for TeeWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        for w in &mut self.writers {
            w.write(data.clone()).await?;
        }
        Ok(())
    }

    async fn close(self: Box<Self>) -> Result<PutResult> {
        let mut first: Option<PutResult> = None;
        for w in self.writers {
            let put = w.close().await?;
            match &first {
                Some(f) if f.digest != put.digest => {
                    return Err(Error::Io(std::io::Error::other(
                        "write targets disagree on the digest of the same bytes",
                    )));
                }
                Some(_) => {}
                None => first = Some(put),
            }
        }
        first.ok_or_else(|| Error::InvalidRequest("no write target".into()))
    }
}

/// A queued background fill.
struct FillJob {
    /// The Stat of the tier the blob came from.
    stat: BlobStat,
    /// The blob, verified.
    spool: SharedSpool,
    /// What verified it, and as which blob.
    proof: BlobProof,
    targets: Vec<Member>,
    /// Its entry in [`Pending`], set when it is queued.
    pending: u64,
}

/// The verified spools of blobs whose fill is queued or under way. The
/// single-flight of a fetch ends once its spool is verified, long before
/// the fill has stored it: a read of the blob meanwhile is answered from
/// the spool, where it would fetch the blob again and queue a second fill.
#[derive(Default)]
struct Pending {
    spools: std::sync::Mutex<std::collections::HashMap<B3Digest, (u64, SharedSpool)>>,
    next: std::sync::atomic::AtomicU64,
}

impl Pending {
    /// Records `spool` as the pending fill of `digest`; returns its entry.
    fn insert(&self, digest: B3Digest, spool: SharedSpool) -> u64 {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock().insert(digest, (id, spool));
        id
    }

    fn get(&self, digest: &B3Digest) -> Option<SharedSpool> {
        self.lock().get(digest).map(|(_, spool)| spool.clone())
    }

    /// Forgets entry `id` of `digest`, unless a later one replaced it.
    fn remove(&self, digest: &B3Digest, id: u64) {
        let mut spools = self.lock();
        if spools.get(digest).is_some_and(|(held, _)| *held == id) {
            spools.remove(digest);
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<B3Digest, (u64, SharedSpool)>> {
        self.spools.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The worker behind `fill = "async"`: a bounded queue of fills, drained on
/// shutdown until a deadline.
struct AsyncFiller {
    tx: std::sync::Mutex<Option<mpsc::Sender<FillJob>>>,
    worker: tokio::sync::Mutex<Option<tokio::task::JoinHandle<usize>>>,
    /// Tells the worker to give up: drop the fill in progress and the
    /// queued ones.
    stop: tokio_util::sync::CancellationToken,
    pending: Arc<Pending>,
}

impl AsyncFiller {
    fn start(queue: usize) -> Self {
        let (tx, rx) = mpsc::channel::<FillJob>(queue);
        let stop = tokio_util::sync::CancellationToken::new();
        let pending = Arc::new(Pending::default());
        let worker = tokio::spawn(Self::work(rx, stop.clone(), pending.clone()));
        AsyncFiller {
            tx: std::sync::Mutex::new(Some(tx)),
            worker: tokio::sync::Mutex::new(Some(worker)),
            stop,
            pending,
        }
    }

    /// A reader of blob `digest` from the spool of its pending fill.
    async fn pending_read(&self, digest: &B3Digest) -> Option<Box<dyn BlobReader>> {
        let spool = self.pending.get(digest)?;
        spool.open().await.ok()
    }

    /// Runs the queued fills one by one until the queue is closed and
    /// empty, or `stop` fires. Returns the number of fills (blob and
    /// target) it abandoned: the one in progress, if any, and the queued
    /// ones. A fill abandoned part-way publishes nothing: its writer is
    /// dropped unclosed.
    async fn work(
        mut rx: mpsc::Receiver<FillJob>,
        stop: tokio_util::sync::CancellationToken,
        pending: Arc<Pending>,
    ) -> usize {
        let mut abandoned = 0;
        loop {
            let job = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                job = rx.recv() => job,
            };
            let Some(job) = job else {
                return 0;
            };
            for (i, m) in job.targets.iter().enumerate() {
                let copied = tokio::select! {
                    biased;
                    () = stop.cancelled() => None,
                    copied = copy_into(&job, m.svc.as_ref()) => Some(copied),
                };
                // The target publishes the blob only under the proof's
                // digest: any other outcome is an error.
                match copied {
                    Some(Ok(_)) => {
                        m.metrics.fills.inc();
                    }
                    Some(Err(e)) => m.record_failure("async fill", job.proof.digest(), &e),
                    None => {
                        abandoned += Self::abandon(&job.targets[i..]);
                        break;
                    }
                }
            }
            pending.remove(job.proof.digest(), job.pending);
        }
        rx.close();
        while let Ok(job) = rx.try_recv() {
            abandoned += Self::abandon(&job.targets);
            pending.remove(job.proof.digest(), job.pending);
        }
        abandoned
    }

    /// Counts fills into `targets` as dropped.
    fn abandon(targets: &[Member]) -> usize {
        for m in targets {
            m.metrics.fills_dropped.inc();
        }
        targets.len()
    }

    fn enqueue(&self, mut job: FillJob) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(tx) = tx else {
            // Shutting down: a read that started before still completes,
            // but its fill is dropped, and counted like any other.
            Self::abandon(&job.targets);
            debug!(digest = %job.proof.digest(), "shutting down; fill dropped");
            return;
        };
        job.pending = self.pending.insert(*job.proof.digest(), job.spool.clone());
        if let Err(e) = tx.try_send(job) {
            let job = match e {
                mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job) => {
                    job
                }
            };
            self.pending.remove(job.proof.digest(), job.pending);
            Self::abandon(&job.targets);
            warn!(digest = %job.proof.digest(), "async fill queue full; fill dropped");
        }
    }

    /// Stops taking fills and waits for the queued ones until `deadline`;
    /// then abandons those left, saying how many.
    async fn drain(&self, deadline: tokio::time::Instant) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(mut worker) = self.worker.lock().await.take() else {
            return;
        };
        if tokio::time::timeout_at(deadline, &mut worker).await.is_ok() {
            return;
        }
        self.stop.cancel();
        let abandoned = worker.await.unwrap_or(0);
        warn!(
            abandoned,
            "fill_drain is over: abandoned the async fills still queued (the blobs stay \
             in the tiers they came from)"
        );
    }
}

/// Writes the spooled blob of `job` into `target`. As in
/// [`Inner::fill_sync`], a blob fetched as listed chunks (or whole, as one)
/// is handed over in those chunks, cut from the spool, for the target to
/// store as they are ([`BlobService::open_fill`]); any other is chunked and
/// hashed by the target. Either way the target publishes it only with the
/// spool's proof.
async fn copy_into(job: &FillJob, target: &dyn BlobService) -> Result<PutResult> {
    let digest = *job.proof.digest();
    let pieces = job.spool.pieces(PIECE).await?;
    let (mut writer, mut pieces) = if fills_as_fetched(&job.stat) {
        let chunks = if job.stat.chunks.len() >= 2 {
            job.stat.chunks.clone()
        } else {
            vec![whole_chunk(digest, &job.stat)]
        };
        (
            target.open_fill(&digest, &job.stat).await?,
            cut_proven(digest, chunks, pieces),
        )
    } else {
        (target.open_write().await?, pieces)
    };
    while let Some(piece) = pieces.next().await {
        writer.write(piece?).await?;
    }
    writer.close_verified(&job.proof).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunkstore::ChunkedBlobService;
    use crate::kinds::memory::MemoryStore;

    fn stat_of(sizes: &[u64]) -> BlobStat {
        let chunks: Vec<ChunkMeta> = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| ChunkMeta {
                digest: B3Digest::of(&i.to_le_bytes()),
                size,
            })
            .collect();
        BlobStat {
            size: sizes.iter().sum(),
            chunks,
        }
    }

    /// A `memory` service holding `blob` as `chunks` of `size` bytes each
    /// (the last shorter): a listing its own chunking would not produce.
    async fn listed_as(
        blob: &[u8],
        size: usize,
    ) -> (Arc<ChunkedBlobService<MemoryStore>>, B3Digest) {
        let svc = Arc::new(ChunkedBlobService::new(MemoryStore::new(64 << 20)));
        let digest = B3Digest::of(blob);
        let chunks: Vec<ChunkMeta> = blob
            .chunks(size)
            .map(|c| ChunkMeta {
                digest: B3Digest::of(c),
                size: c.len() as u64,
            })
            .collect();
        let stat = BlobStat {
            size: blob.len() as u64,
            chunks,
        };
        let mut check = BlobCheck::new(digest, Some(stat.size), None);
        let mut w = svc.open_fill(&digest, &stat).await.unwrap();
        for c in blob.chunks(size) {
            let c = Bytes::copy_from_slice(c);
            check.push(c.clone()).unwrap();
            w.write(c).await.unwrap();
        }
        w.close_verified(&check.finish().unwrap()).await.unwrap();
        (svc, digest)
    }

    async fn read_all(svc: &dyn BlobService, digest: &B3Digest) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut r = svc.open_read(digest).await.unwrap().unwrap();
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        back
    }

    /// `tiers` of `near` (a 64 MiB fill tier, written to) before `far`, with
    /// `fill = "async"`, and the near tier's metrics.
    fn async_tiers(
        near: Arc<dyn BlobService>,
        far: Arc<dyn BlobService>,
    ) -> (TiersService, TierMetrics) {
        let metrics = Metrics::new();
        let near_metrics = metrics.tier("near");
        let members = vec![
            Member::new(
                "near".into(),
                near,
                true,
                Some(64 << 20),
                near_metrics.clone(),
            ),
            Member::new("far".into(), far, false, None, metrics.tier("far")),
        ];
        let write_to = vec![members[0].clone()];
        let tiers = TiersService::new(members, write_to, Fill::Async, 4, 8, metrics);
        (tiers, near_metrics)
    }

    /// Reads `blob` through `tiers` of an empty `memory` tier before `far`,
    /// with `fill = "async"`, and returns that tier once the fill is drained.
    async fn read_through_async_fill(
        far: Arc<ChunkedBlobService<MemoryStore>>,
        digest: &B3Digest,
        blob: &[u8],
    ) -> Arc<ChunkedBlobService<MemoryStore>> {
        let near = Arc::new(ChunkedBlobService::new(MemoryStore::new(64 << 20)));
        let (tiers, _) = async_tiers(near.clone(), far);
        assert!(read_all(&tiers, digest).await == blob);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        tiers.shutdown(deadline).await.unwrap();
        near
    }

    #[tokio::test]
    async fn an_async_fill_stores_the_chunks_its_source_listed() {
        // Spooled in memory, and in a file (pieces that straddle chunks).
        for (len, seed) in [(1_300_000, 1), (6 << 20, 2)] {
            let blob = crate::testkit::pseudo_random(len, seed);
            let (far, digest) = listed_as(&blob, 100 * 1024).await;
            let near = read_through_async_fill(far.clone(), &digest, &blob).await;

            let listed = far.stat(&digest).await.unwrap().unwrap();
            assert_eq!(
                near.stat(&digest).await.unwrap(),
                Some(listed),
                "{len} bytes"
            );
            assert_eq!(
                near.outboard(&digest).await.unwrap(),
                far.outboard(&digest).await.unwrap()
            );
            assert!(read_all(&*near, &digest).await == blob);
        }
    }

    #[tokio::test]
    async fn a_fill_that_comes_after_shutdown_began_is_counted_as_dropped() {
        let blob = crate::testkit::pseudo_random(300_000, 4);
        let (far, digest) = listed_as(&blob, 100 * 1024).await;
        let near = Arc::new(ChunkedBlobService::new(MemoryStore::new(64 << 20)));
        let (tiers, near_metrics) = async_tiers(near.clone(), far);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        tiers.shutdown(deadline).await.unwrap();
        // A read that was under way when shutdown began is still answered.
        assert!(read_all(&tiers, &digest).await == blob);
        assert_eq!(near_metrics.fills_dropped.get(), 1);
        assert_eq!(near_metrics.fills.get(), 0);
        assert!(near.stat(&digest).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_blob_whose_fill_is_pending_is_read_from_its_spool_not_fetched_again() {
        /// Counts the calls that fetch a blob's bytes.
        struct Counted {
            svc: Arc<ChunkedBlobService<MemoryStore>>,
            fetches: std::sync::atomic::AtomicUsize,
        }
        #[async_trait]
        impl BlobService for Counted {
            async fn stat(&self, digest: &B3Digest) -> Result<Option<BlobStat>> {
                self.svc.stat(digest).await
            }
            async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
                self.fetches
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                self.svc.open_read(digest).await
            }
            async fn read_chunk(&self, chunk: &ChunkMeta) -> Result<Option<Bytes>> {
                self.fetches
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                self.svc.read_chunk(chunk).await
            }
            async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
                self.svc.open_write().await
            }
        }
        /// A near tier whose fills wait until `go` has a permit.
        struct Held {
            svc: Arc<ChunkedBlobService<MemoryStore>>,
            go: tokio::sync::Semaphore,
        }
        #[async_trait]
        impl BlobService for Held {
            async fn stat(&self, digest: &B3Digest) -> Result<Option<BlobStat>> {
                self.svc.stat(digest).await
            }
            async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
                self.svc.open_read(digest).await
            }
            async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
                self.svc.open_write().await
            }
            async fn open_fill(
                &self,
                digest: &B3Digest,
                stat: &BlobStat,
            ) -> Result<Box<dyn BlobWriter>> {
                let _permit = self.go.acquire().await;
                self.svc.open_fill(digest, stat).await
            }
        }
        let blob = crate::testkit::pseudo_random(1_300_000, 5);
        let (far, digest) = listed_as(&blob, 100 * 1024).await;
        let far = Arc::new(Counted {
            svc: far,
            fetches: 0.into(),
        });
        let near = Arc::new(Held {
            svc: Arc::new(ChunkedBlobService::new(MemoryStore::new(64 << 20))),
            go: tokio::sync::Semaphore::new(0),
        });
        let (tiers, near_metrics) = async_tiers(near.clone(), far.clone());
        assert!(read_all(&tiers, &digest).await == blob);
        let fetched = far.fetches.load(std::sync::atomic::Ordering::SeqCst);
        assert!(fetched > 0);
        // The fill waits; the next reads come from its spool.
        for _ in 0..3 {
            assert!(read_all(&tiers, &digest).await == blob);
        }
        assert_eq!(
            far.fetches.load(std::sync::atomic::Ordering::SeqCst),
            fetched
        );
        near.go.add_permits(1 << 20);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        tiers.shutdown(deadline).await.unwrap();
        assert_eq!(near_metrics.fills.get(), 1, "one fill, not one per read");
        assert_eq!(near_metrics.fills_dropped.get(), 0);
        assert!(near.svc.stat(&digest).await.unwrap().is_some());
        // Stored: the spool is no longer pending, and reads come from near.
        assert!(read_all(&tiers, &digest).await == blob);
        assert_eq!(
            far.fetches.load(std::sync::atomic::Ordering::SeqCst),
            fetched
        );
    }

    /// A tier that passes over the source of a lying chunk list itself
    /// ([`BlobService::caught_lying`]) is asked again, but not for ever: one
    /// that keeps lying is passed over after [`ASK_AGAIN`] more tries, and
    /// the read goes on to the next tier.
    #[tokio::test]
    async fn a_tier_that_keeps_lying_is_asked_again_only_so_often() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        /// Lists the blob's first two chunks swapped, and claims each time
        /// that it passed over the liar.
        struct Swapping {
            svc: Arc<ChunkedBlobService<MemoryStore>>,
            stats: AtomicUsize,
        }
        #[async_trait]
        impl BlobService for Swapping {
            async fn stat(&self, digest: &B3Digest) -> Result<Option<BlobStat>> {
                self.stats.fetch_add(1, Ordering::SeqCst);
                let mut stat = self.svc.stat(digest).await?;
                if let Some(stat) = &mut stat {
                    stat.chunks.swap(0, 1);
                }
                Ok(stat)
            }
            async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
                self.svc.open_read(digest).await
            }
            async fn read_chunk(&self, chunk: &ChunkMeta) -> Result<Option<Bytes>> {
                self.svc.read_chunk(chunk).await
            }
            async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
                self.svc.open_write().await
            }
            fn caught_lying(&self, _: &B3Digest, _: &[ChunkMeta]) -> bool {
                true
            }
        }
        let blob = crate::testkit::pseudo_random(1_300_000, 6);
        let (far, digest) = listed_as(&blob, 100 * 1024).await;
        let liar = Arc::new(Swapping {
            svc: far.clone(),
            stats: 0.into(),
        });
        let near = Arc::new(ChunkedBlobService::new(MemoryStore::new(64 << 20)));
        let metrics = Metrics::new();
        let members = vec![
            Member::new(
                "near".into(),
                near.clone(),
                true,
                None,
                metrics.tier("near"),
            ),
            Member::new(
                "liar".into(),
                liar.clone(),
                false,
                None,
                metrics.tier("liar"),
            ),
            Member::new("honest".into(), far, false, None, metrics.tier("honest")),
        ];
        let write_to = vec![members[0].clone()];
        let tiers = TiersService::new(members, write_to, Fill::Async, 4, 8, metrics);

        assert!(read_all(&tiers, &digest).await == blob);
        assert_eq!(liar.stats.load(Ordering::SeqCst), 1 + ASK_AGAIN);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        tiers.shutdown(deadline).await.unwrap();
        assert!(read_all(&*near, &digest).await == blob);
    }

    #[tokio::test]
    async fn shutdown_reaches_a_tier_named_only_in_write_to() {
        /// Counts its shutdowns.
        struct Watched(std::sync::atomic::AtomicUsize);
        #[async_trait]
        impl BlobService for Watched {
            async fn stat(&self, _: &B3Digest) -> Result<Option<BlobStat>> {
                Ok(None)
            }
            async fn open_read(&self, _: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
                Ok(None)
            }
            async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
                Err(Error::ReadOnly("watched".into()))
            }
            async fn shutdown(&self, _: tokio::time::Instant) -> Result<()> {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            }
        }
        let read = Arc::new(Watched(0.into()));
        let written = Arc::new(Watched(0.into()));
        let metrics = Metrics::new();
        let members = vec![Member::new(
            "read".into(),
            read.clone(),
            false,
            None,
            metrics.tier("read"),
        )];
        let write_to = vec![
            members[0].clone(),
            Member::new(
                "written".into(),
                written.clone(),
                false,
                None,
                metrics.tier("written"),
            ),
        ];
        let tiers = TiersService::new(members, write_to, Fill::Sync, 4, 8, metrics);
        tiers
            .shutdown(tokio::time::Instant::now() + std::time::Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(read.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(written.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_async_fill_of_one_chunk_stores_that_chunk() {
        let blob = crate::testkit::pseudo_random(300_000, 3);
        let far = Arc::new(ChunkedBlobService::new(MemoryStore::new(64 << 20)));
        let mut w = far.open_write().await.unwrap();
        w.write(Bytes::from(blob.clone())).await.unwrap();
        let digest = w.close().await.unwrap().digest;
        let near = read_through_async_fill(far, &digest, &blob).await;
        let chunk = ChunkMeta {
            digest,
            size: blob.len() as u64,
        };
        assert_eq!(
            near.read_chunk(&chunk).await.unwrap().as_deref(),
            Some(&blob[..])
        );
        assert!(read_all(&*near, &digest).await == blob);
    }

    #[test]
    fn fills_keep_only_sane_chunk_lists() {
        assert!(keeps_chunk_list(&stat_of(&[300_000, 200_000, 10])));
        // Not a list: one piece.
        assert!(!keeps_chunk_list(&stat_of(&[])));
        assert!(!keeps_chunk_list(&stat_of(&[300_000])));
        // A tiny chunk before the last, or an oversize one.
        assert!(!keeps_chunk_list(&stat_of(&[300_000, 100, 300_000])));
        assert!(!keeps_chunk_list(&stat_of(&[LARGEST_CHUNK + 1, 300_000])));
    }
}
