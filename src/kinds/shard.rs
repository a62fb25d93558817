//! `shard`: spreads blobs over a pool of peers by rendezvous (highest
//! random weight) hashing of the digest, so a fleet of sidecars shares a
//! pool of peer caches without coordination.
//!
//! ```toml
//! [blobservices.pool]
//! type = "shard"
//! members = ["peer-a", "peer-b", "peer-c"]
//! weights = [1, 1, 2]   # optional, same order as members; default all 1
//! ```
//!
//! Every digest ranks the members by score `weight / -ln(h)`, where `h` in
//! (0, 1) comes from BLAKE3 of the member name and the digest; the top
//! member owns the blob. A member that fails (down, error, timeout) is
//! skipped for the next-ranked one, so reads continue while a peer is down,
//! and adding or removing a member moves only the blobs it owns.
//!
//! Puts are spooled (memory, or a temporary file for large blobs) until the
//! digest is known, then written to its owner (or the next-ranked member if
//! the owner fails).
//!
//! A blob is therefore looked for on the first two members that answer, in
//! rank order: an owner that answers "absent" may have been down when the
//! blob was written, which put it on the next-ranked member, its stand-in.
//! Once the owner is back, that blob stays readable from the stand-in, at
//! the price of one more request for a blob the pool does not have. (A blob
//! written while the owner and its first stand-in were both down is found
//! only while one of them still is.)
//!
//! A blob's chunks live with the blob, on its owner. A fill in front of the
//! shard asks the owner for all of a blob's chunks at once
//! (`stream_chunks`); a single chunk, whose blob is not named, is asked of
//! the members in turn until one has it.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use tracing::warn;

use crate::blobservice::{
    BlobReader, BlobService, BlobStat, BlobWriter, ChunkMeta, ChunkStream, Pieces, PutResult, Spool,
};
use crate::composition::{BuildContext, TierConfig};
use crate::digest::B3Digest;
use crate::error::{Error, Result, absent_unless_failed};
use crate::verify::Outboard;

/// Configuration of a `shard`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    /// The pool.
    pub members: Vec<String>,
    /// Relative capacities, in the order of `members` (default: all 1).
    pub weights: Option<Vec<f64>>,
}

#[async_trait]
impl TierConfig for ShardConfig {
    fn references(&self) -> Vec<String> {
        self.members.clone()
    }

    fn validate(&self) -> Result<(), String> {
        if self.members.is_empty() {
            return Err("a shard needs at least one member".into());
        }
        if let Some(w) = &self.weights {
            if w.len() != self.members.len() {
                return Err(format!(
                    "`weights` has {} entries for {} members",
                    w.len(),
                    self.members.len()
                ));
            }
            if w.iter().any(|w| !w.is_finite() || *w <= 0.0) {
                return Err("`weights` must be positive numbers".into());
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        match &self.weights {
            Some(w) => format!(
                "shard [{}] (weights = {w:?}, rendezvous hashing)",
                self.members.join(", ")
            ),
            None => format!("shard [{}] (rendezvous hashing)", self.members.join(", ")),
        }
    }

    fn persistent(&self, ctx: &BuildContext) -> bool {
        self.members.iter().any(|m| ctx.persistent(m))
    }

    async fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn BlobService>> {
        let members = self
            .members
            .iter()
            .enumerate()
            .map(|(i, name)| {
                Ok(Member {
                    name: name.clone(),
                    weight: self.weights.as_ref().map_or(1.0, |w| w[i]),
                    svc: ctx.tier(name)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Arc::new(ShardService {
            members: Arc::new(members),
        }))
    }
}

struct Member {
    name: String,
    weight: f64,
    svc: Arc<dyn BlobService>,
}

/// The `shard` combinator. See the module docs.
pub struct ShardService {
    members: Arc<Vec<Member>>,
}

/// Member indices for `digest`, best first.
fn ranking(members: &[Member], digest: &B3Digest) -> Vec<usize> {
    let mut scored: Vec<(f64, usize)> = members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mut hasher = blake3::Hasher::new();
            hasher.update(m.name.as_bytes());
            hasher.update(&[0]);
            hasher.update(digest.as_bytes());
            let mut word = [0u8; 8];
            word.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
            // Map to (0, 1): never 0 (ln undefined) nor 1 (score infinite).
            let h = (u64::from_le_bytes(word) as f64 + 1.0) / (u64::MAX as f64 + 2.0);
            (m.weight / -h.ln(), i)
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored.into_iter().map(|(_, i)| i).collect()
}

impl ShardService {
    /// The owner of `digest` and its stand-ins, best first.
    pub fn ranked_names(&self, digest: &B3Digest) -> Vec<&str> {
        ranking(&self.members, digest)
            .into_iter()
            .map(|i| self.members[i].name.as_str())
            .collect()
    }
}

/// How many members that answer are asked for a blob before it is absent:
/// its owner and the stand-in a Put turns to while the owner is down.
const LOOKUP_DEPTH: usize = 2;

/// Asks the members in rank order for what `$call` finds: the first `Some`
/// wins; `None` from [`LOOKUP_DEPTH`] members that answered is the answer;
/// a member that fails is skipped (the next-ranked one is asked instead).
macro_rules! first_found {
    ($self:ident, $digest:ident, |$svc:ident| $call:expr) => {{
        let mut failures = Vec::new();
        let mut answered = 0;
        for i in ranking(&$self.members, $digest) {
            let m = &$self.members[i];
            let $svc = &m.svc;
            match $call.await {
                Ok(Some(answer)) => return Ok(Some(answer)),
                Ok(None) => {
                    answered += 1;
                    if answered == LOOKUP_DEPTH {
                        return Ok(None);
                    }
                }
                Err(e) => {
                    warn!(tier = %m.name, digest = %$digest, error = %e,
                        "shard member failed; trying the next-ranked one");
                    failures.push(format!("{}: {e}", m.name));
                }
            }
        }
        if answered > 0 {
            return Ok(None);
        }
        Err(Error::AllTiersFailed(failures))
    }};
}

#[async_trait]
impl BlobService for ShardService {
    async fn stat(&self, digest: &B3Digest) -> Result<Option<BlobStat>> {
        first_found!(self, digest, |svc| svc.stat(digest))
    }

    /// The read that follows finds the same member, which may have
    /// brought a small blob along with this answer.
    async fn stat_before_read(&self, digest: &B3Digest) -> Result<Option<BlobStat>> {
        first_found!(self, digest, |svc| svc.stat_before_read(digest))
    }

    async fn outboard(&self, digest: &B3Digest) -> Result<Option<Outboard>> {
        first_found!(self, digest, |svc| svc.outboard(digest))
    }

    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
        first_found!(self, digest, |svc| svc.open_read(digest))
    }

    /// A chunk is stored with its blob, on the blob's owner, which the
    /// chunk's digest does not name: the members are asked in the chunk's
    /// rank order until one has it, and "absent" from one is not the last
    /// word. A fill asks for a blob's chunks through
    /// [`stream_chunks`](Self::stream_chunks) first, which knows the owner;
    /// this serves the chunks it still lacks after that.
    async fn read_chunk(&self, chunk: &ChunkMeta) -> Result<Option<Bytes>> {
        let mut failures = Vec::new();
        for i in ranking(&self.members, &chunk.digest) {
            let m = &self.members[i];
            match m.svc.read_chunk(chunk).await {
                Ok(Some(data)) => return Ok(Some(data)),
                Ok(None) => {}
                Err(e) => {
                    warn!(tier = %m.name, digest = %chunk.digest, error = %e,
                        "shard member failed to read a chunk; asking the next one");
                    failures.push(format!("{}: {e}", m.name));
                }
            }
        }
        absent_unless_failed(failures)
    }

    /// The blob's chunks from the member that holds it (its owner, or a
    /// stand-in), in one transfer where the member can.
    async fn stream_chunks(
        &self,
        digest: &B3Digest,
        chunks: &[ChunkMeta],
    ) -> Result<Option<ChunkStream>> {
        first_found!(self, digest, |svc| svc.stream_chunks(digest, chunks))
    }

    async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
        Ok(Box::new(ShardWriter {
            members: self.members.clone(),
            spool: Spool::new(None, None),
            hasher: blake3::Hasher::new(),
        }))
    }

    async fn shutdown(&self, deadline: tokio::time::Instant) -> Result<()> {
        for m in self.members.iter() {
            m.svc.shutdown(deadline).await?;
        }
        Ok(())
    }
}

/// Holds a Put until its digest, and so its owner, is known.
struct ShardWriter {
    members: Arc<Vec<Member>>,
    spool: Spool,
    hasher: blake3::Hasher,
}

#[async_trait]
impl BlobWriter for ShardWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        self.hasher.update(&data);
        self.spool.push(data).await
    }

    async fn close(self: Box<Self>) -> Result<PutResult> {
        let digest = B3Digest::from(self.hasher.finalize());
        let spool = self.spool.into_shared().await?;
        let mut failures = Vec::new();
        for i in ranking(&self.members, &digest) {
            let m = &self.members[i];
            let attempt = async {
                let mut writer = m.svc.open_write().await?;
                let mut pieces = Pieces::new(spool.open().await?, 256 * 1024);
                while let Some(piece) = pieces.next().await {
                    writer.write(piece?).await?;
                }
                writer.close().await
            };
            match attempt.await {
                Ok(put) if put.digest == digest => return Ok(put),
                Ok(put) => failures.push(format!("{}: stored as {}", m.name, put.digest)),
                Err(e) => {
                    warn!(tier = %m.name, %digest, error = %e, "shard member refused a put");
                    failures.push(format!("{}: {e}", m.name));
                }
            }
        }
        Err(Error::AllTiersFailed(failures))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(names: &[&str], weights: &[f64]) -> Vec<Member> {
        names
            .iter()
            .zip(weights)
            .map(|(n, w)| Member {
                name: (*n).to_owned(),
                weight: *w,
                svc: Arc::new(crate::chunkstore::ChunkedBlobService::new(
                    crate::kinds::memory::MemoryStore::new(1 << 20),
                )),
            })
            .collect()
    }

    #[test]
    fn ranking_is_stable_and_spreads_by_weight() {
        let m = members(&["a", "b", "c"], &[1.0, 1.0, 2.0]);
        let mut owners = [0usize; 3];
        for i in 0..20_000u32 {
            let d = B3Digest::of(&i.to_le_bytes());
            let r = ranking(&m, &d);
            assert_eq!(r, ranking(&m, &d), "deterministic");
            owners[r[0]] += 1;
        }
        // Expected shares 1/4, 1/4, 1/2.
        assert!((4_300..5_700).contains(&owners[0]), "{owners:?}");
        assert!((4_300..5_700).contains(&owners[1]), "{owners:?}");
        assert!((9_000..11_000).contains(&owners[2]), "{owners:?}");
    }

    /// A member that can be taken down: while down, every call fails.
    struct Switch {
        down: std::sync::atomic::AtomicBool,
        calls: std::sync::atomic::AtomicUsize,
        svc: Arc<dyn BlobService>,
    }

    impl Switch {
        fn up(&self) -> Result<&Arc<dyn BlobService>> {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(Error::Io(std::io::Error::other("member down")));
            }
            Ok(&self.svc)
        }
    }

    #[async_trait]
    impl BlobService for Switch {
        async fn stat(&self, digest: &B3Digest) -> Result<Option<BlobStat>> {
            self.up()?.stat(digest).await
        }
        async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
            self.up()?.open_read(digest).await
        }
        async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
            self.up()?.open_write().await
        }
    }

    #[tokio::test]
    async fn a_blob_put_while_its_owner_was_down_is_found_once_it_is_back() {
        let switches: Vec<Arc<Switch>> = members(&["a", "b", "c"], &[1.0, 1.0, 1.0])
            .into_iter()
            .map(|m| {
                Arc::new(Switch {
                    down: false.into(),
                    calls: 0.into(),
                    svc: m.svc,
                })
            })
            .collect();
        let shard = ShardService {
            members: Arc::new(
                ["a", "b", "c"]
                    .iter()
                    .zip(&switches)
                    .map(|(name, s)| Member {
                        name: (*name).to_owned(),
                        weight: 1.0,
                        svc: s.clone(),
                    })
                    .collect(),
            ),
        };
        let data = Bytes::from(crate::testkit::pseudo_random(50_000, 3));
        let digest = B3Digest::of(&data);
        let rank = ranking(&shard.members, &digest);
        let (owner, stand_in) = (&switches[rank[0]], &switches[rank[1]]);

        owner.down.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut w = shard.open_write().await.unwrap();
        w.write(data.clone()).await.unwrap();
        assert_eq!(w.close().await.unwrap().digest, digest);
        assert!(stand_in.svc.stat(&digest).await.unwrap().is_some());

        owner.down.store(false, std::sync::atomic::Ordering::SeqCst);
        assert!(owner.svc.stat(&digest).await.unwrap().is_none());
        let stat = shard
            .stat(&digest)
            .await
            .unwrap()
            .expect("found on the stand-in");
        assert_eq!(stat.size, data.len() as u64);
        let mut reader = shard.open_read(&digest).await.unwrap().expect("readable");
        let read = crate::blobservice::read_to_bytes(reader.as_mut(), 1 << 20)
            .await
            .unwrap();
        assert_eq!(read, data);

        // A blob on neither is absent after two answers: the third-ranked
        // member is not asked.
        let absent = B3Digest::of(b"on no member");
        let third = &switches[ranking(&shard.members, &absent)[2]];
        let before = third.calls.load(std::sync::atomic::Ordering::SeqCst);
        assert!(shard.stat(&absent).await.unwrap().is_none());
        assert_eq!(
            third.calls.load(std::sync::atomic::Ordering::SeqCst),
            before
        );
    }

    #[test]
    fn removing_a_member_moves_only_its_blobs() {
        let all = members(&["a", "b", "c"], &[1.0, 1.0, 1.0]);
        let without_c = members(&["a", "b"], &[1.0, 1.0]);
        for i in 0..5_000u32 {
            let d = B3Digest::of(&i.to_le_bytes());
            let before = &all[ranking(&all, &d)[0]].name;
            let after = &without_c[ranking(&without_c, &d)[0]].name;
            if before != "c" {
                assert_eq!(before, after);
            }
        }
    }
}
