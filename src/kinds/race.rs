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
use crate::digest::B3Digest;
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
            .map(|name| Ok((name.clone(), ctx.tier(name)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Arc::new(RaceService {
            members,
            hedge_after: self.hedge_after.map(|h| h.0),
        }))
    }
}

/// The `race` combinator. See the module docs.
pub struct RaceService {
    members: Vec<(String, Arc<dyn BlobService>)>,
    hedge_after: Option<Duration>,
}

type Attempt<T> = BoxFuture<'static, (usize, Result<Option<T>>)>;

impl RaceService {
    /// Runs `ask` against the members as the race rules say and returns the
    /// first `Some`.
    async fn race<T: Send + 'static>(
        &self,
        digest: &B3Digest,
        ask: impl Fn(Arc<dyn BlobService>) -> BoxFuture<'static, Result<Option<T>>>,
    ) -> Result<Option<T>> {
        let launch = |i: usize| -> Attempt<T> {
            let fut = ask(self.members[i].1.clone());
            Box::pin(async move { (i, fut.await) })
        };
        let mut running = FuturesUnordered::new();
        let mut next = 0;
        let all_at_once = self.hedge_after.is_none();
        while next < self.members.len() && (all_at_once || next == 0) {
            running.push(launch(next));
            next += 1;
        }
        let mut failures = Vec::new();
        loop {
            if running.is_empty() {
                if next >= self.members.len() {
                    break;
                }
                running.push(launch(next));
                next += 1;
            }
            let hedge = async {
                match self.hedge_after {
                    Some(d) if next < self.members.len() => tokio::time::sleep(d).await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                Some((i, result)) = running.next() => match result {
                    Ok(Some(answer)) => {
                        debug!(%digest, winner = %self.members[i].0, "race won");
                        // Dropping `running` cancels the losers.
                        return Ok(Some(answer));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        warn!(tier = %self.members[i].0, %digest, error = %e, "race member failed");
                        failures.push(format!("{}: {e}", self.members[i].0));
                    }
                },
                () = hedge => {
                    running.push(launch(next));
                    next += 1;
                }
            }
        }
        absent_unless_failed(failures)
    }
}

#[async_trait]
impl BlobService for RaceService {
    async fn stat(&self, digest: &B3Digest) -> Result<Option<BlobStat>> {
        let d = *digest;
        self.race(digest, move |svc| {
            Box::pin(async move { svc.stat(&d).await })
        })
        .await
    }

    /// The winner may have brought a small blob along for the read that
    /// follows; that read races too, and the winner answers it at once.
    async fn stat_before_read(&self, digest: &B3Digest) -> Result<Option<BlobStat>> {
        let d = *digest;
        self.race(digest, move |svc| {
            Box::pin(async move { svc.stat_before_read(&d).await })
        })
        .await
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
    /// in front of the race then moves the blob in one transfer.
    async fn stream_chunks(
        &self,
        digest: &B3Digest,
        chunks: &[ChunkMeta],
    ) -> Result<Option<ChunkStream>> {
        let d = *digest;
        let list: Arc<[ChunkMeta]> = chunks.into();
        self.race(digest, move |svc| {
            let list = list.clone();
            Box::pin(async move { svc.stream_chunks(&d, &list).await })
        })
        .await
    }

    async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
        Err(Error::ReadOnly(
            "a race is a read source; name a tier in `write_to` for Puts".into(),
        ))
    }

    async fn shutdown(&self, deadline: tokio::time::Instant) -> Result<()> {
        for (_, m) in &self.members {
            m.shutdown(deadline).await?;
        }
        Ok(())
    }
}
