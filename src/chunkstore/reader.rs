//! [`ChunkedReader`]: a seekable reader over a blob's chunk list that
//! fetches chunks ahead of the read position and verifies each one.

use std::io::{self, SeekFrom};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, StreamExt};
use tokio::io::{AsyncRead, AsyncSeek, ReadBuf};

use super::ChunkStore;
use crate::blobservice::{BlobReader, ChunkMeta};
use crate::digest::B3Digest;
use crate::error::{Error, Result};
use crate::verify::verify_chunk_meta;

/// Reads a multi-chunk blob from a [`ChunkStore`].
///
/// Keeps up to [`ChunkStore::read_ahead`] chunk fetches in flight after the
/// current one (polled concurrently, yielded in order), so sequential reads
/// from a remote store overlap their round trips. A seek outside the chunks
/// in flight drops them and restarts at the target.
pub struct ChunkedReader<S> {
    blob: B3Digest,
    chunks: Arc<[ChunkMeta]>,
    /// `offsets[i]` is where chunk `i` starts; `offsets[n]` is the blob size.
    offsets: Arc<[u64]>,
    store: Arc<S>,
    pos: u64,
    /// The chunk `pos` is in, once fetched: (index, bytes).
    current: Option<(usize, Bytes)>,
    /// Fetches for chunks `next_fetch - inflight.len() ..next_fetch`.
    inflight: FuturesOrdered<BoxFuture<'static, Result<Bytes>>>,
    next_fetch: usize,
}

impl<S: ChunkStore> ChunkedReader<S> {
    /// Reads blob `blob` made of `chunks` from `store`.
    pub fn new(blob: B3Digest, chunks: Vec<ChunkMeta>, store: Arc<S>) -> Self {
        let mut offsets = Vec::with_capacity(chunks.len() + 1);
        let mut acc = 0u64;
        offsets.push(0);
        for c in &chunks {
            acc += c.size;
            offsets.push(acc);
        }
        ChunkedReader {
            blob,
            chunks: chunks.into(),
            offsets: offsets.into(),
            store,
            pos: 0,
            current: None,
            inflight: FuturesOrdered::new(),
            next_fetch: 0,
        }
    }

    fn size(&self) -> u64 {
        self.offsets.last().copied().unwrap_or(0)
    }

    /// Index of the chunk holding byte `pos` (`pos < size`).
    fn chunk_at(&self, pos: u64) -> usize {
        // offsets is sorted; the chunk is the last offset <= pos.
        self.offsets.partition_point(|&o| o <= pos) - 1
    }

    fn fetch(&self, idx: usize) -> BoxFuture<'static, Result<Bytes>> {
        let store = self.store.clone();
        let meta = self.chunks[idx];
        let blob = self.blob;
        Box::pin(async move {
            let data = store
                .get_chunk(&meta.digest)
                .await?
                .ok_or(Error::MissingChunk {
                    blob,
                    chunk: meta.digest,
                })?;
            if let Err(e) = verify_chunk_meta(&meta, &data) {
                tracing::warn!(%blob, chunk = %meta.digest, error = %e, "stored chunk failed verification");
                store.discard_chunk(&meta.digest).await?;
                return Err(e.into());
            }
            Ok(data)
        })
    }

    /// Polls until the chunk `idx` is `current`.
    fn poll_chunk(&mut self, cx: &mut Context<'_>, idx: usize) -> Poll<io::Result<()>> {
        if matches!(self.current, Some((i, _)) if i == idx) {
            return Poll::Ready(Ok(()));
        }
        let first_inflight = self.next_fetch - self.inflight.len();
        if self.inflight.is_empty() || idx < first_inflight || idx >= self.next_fetch {
            self.inflight = FuturesOrdered::new();
            self.next_fetch = idx;
        }
        let window = self.store.read_ahead().max(1);
        loop {
            while self.inflight.len() <= window && self.next_fetch < self.chunks.len() {
                let fut = self.fetch(self.next_fetch);
                self.inflight.push_back(fut);
                self.next_fetch += 1;
            }
            let got = ready!(self.inflight.poll_next_unpin(cx));
            let fetched = self.next_fetch - self.inflight.len() - 1;
            match got {
                Some(Ok(data)) => {
                    self.current = Some((fetched, data));
                    if fetched == idx {
                        return Poll::Ready(Ok(()));
                    }
                }
                Some(Err(e)) => {
                    // Forget the window: a retry starts afresh.
                    self.inflight = FuturesOrdered::new();
                    self.next_fetch = 0;
                    return Poll::Ready(Err(e.into_io()));
                }
                None => {
                    return Poll::Ready(Err(io::Error::other("chunk fetch window ran dry")));
                }
            }
        }
    }
}

impl<S: ChunkStore> BlobReader for ChunkedReader<S> {
    fn len(&self) -> u64 {
        self.size()
    }
}

impl<S: ChunkStore> AsyncRead for ChunkedReader<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos >= this.size() || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let idx = this.chunk_at(this.pos);
        ready!(this.poll_chunk(cx, idx))?;
        if let Some((_, data)) = &this.current {
            let within = (this.pos - this.offsets[idx]) as usize;
            let n = buf.remaining().min(data.len() - within);
            buf.put_slice(&data[within..within + n]);
            this.pos += n as u64;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: ChunkStore> AsyncSeek for ChunkedReader<S> {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        let this = self.get_mut();
        let target = match position {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => this.size().checked_add_signed(d),
            SeekFrom::Current(d) => this.pos.checked_add_signed(d),
        };
        this.pos = target.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek to a negative or overflowing position",
            )
        })?;
        Ok(())
    }

    fn poll_complete(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Poll::Ready(Ok(self.pos))
    }
}
