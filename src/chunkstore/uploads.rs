//! [`Uploads`]: the bounded window of chunk uploads a blob writer keeps in
//! flight, shared by the Put writer and the fill writer.

use std::sync::Arc;

use tokio::task::JoinSet;

use super::{ChunkStore, SplitChunk};
use crate::blobservice::ChunkMeta;
use crate::digest::B3Digest;
use crate::error::Result;

/// Chunk uploads in flight for one blob: at most the store's
/// [`ChunkStore::write_concurrency`], each storing its chunk unless the
/// store has it already. Tasks, so they progress while the writer waits for
/// more input; aborted if the writer is dropped.
pub(super) struct Uploads<S> {
    store: Arc<S>,
    tasks: JoinSet<Result<(usize, ChunkMeta)>>,
}

impl<S: ChunkStore> Uploads<S> {
    pub(super) fn new(store: Arc<S>) -> Self {
        Uploads {
            store,
            tasks: JoinSet::new(),
        }
    }

    /// Waits for room in the window, then starts storing `chunk`, the
    /// blob's chunk number `index`, under `digest` if the caller knows it,
    /// else under the digest the task computes. Uploads that finish on the
    /// way are handed to `done`.
    pub(super) async fn start(
        &mut self,
        index: usize,
        chunk: SplitChunk,
        digest: Option<B3Digest>,
        done: &mut impl FnMut(usize, ChunkMeta),
    ) -> Result<()> {
        while self.tasks.len() >= self.store.write_concurrency().max(1) {
            self.join_one(done).await?;
        }
        let store = self.store.clone();
        self.tasks.spawn(async move {
            let size = chunk.len() as u64;
            let digest = match digest {
                Some(digest) => {
                    if !store.has_chunk(&digest).await? {
                        store.put_chunk(digest, chunk.join()).await?;
                    }
                    digest
                }
                None => store.put_chunk_hashing(chunk).await?,
            };
            Ok((index, ChunkMeta { digest, size }))
        });
        Ok(())
    }

    /// Waits for every upload, handing each to `done`; the first error
    /// ends the wait.
    pub(super) async fn finish(&mut self, done: &mut impl FnMut(usize, ChunkMeta)) -> Result<()> {
        while !self.tasks.is_empty() {
            self.join_one(done).await?;
        }
        Ok(())
    }

    async fn join_one(&mut self, done: &mut impl FnMut(usize, ChunkMeta)) -> Result<()> {
        match self.tasks.join_next().await {
            Some(Ok(result)) => {
                let (index, meta) = result?;
                done(index, meta);
                Ok(())
            }
            Some(Err(join)) => {
                Err(std::io::Error::other(format!("chunk upload task: {join}")).into())
            }
            None => Ok(()),
        }
    }
}
