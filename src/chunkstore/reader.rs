//! [`ChunkedReader`]: a seekable reader over a blob's chunk list that
//! fetches chunks ahead of the read position and verifies them.

use std::collections::VecDeque;
use std::io::{self, SeekFrom};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, StreamExt};
use tokio::io::{AsyncRead, AsyncSeek, ReadBuf};

use super::ChunkStore;
use crate::blobservice::{BlobReader, BlobService, ChunkMeta, poll_read_by_piece, seek_target};
use crate::digest::B3Digest;
use crate::error::{Error, Result};
use crate::task::spawn_owned;
use crate::verify::{GroupVerifier, Outboard};

/// Where a [`ChunkedReader`] gets chunks from. A source returns a chunk only
/// after checking it against the chunk's digest and length.
pub trait ChunkSource: Send + Sync + 'static {
    /// Chunk `chunk` of blob `blob`, verified.
    fn fetch(&self, blob: B3Digest, chunk: ChunkMeta) -> BoxFuture<'static, Result<Bytes>>;
}

/// The chunks of a [`ChunkStore`]. A chunk that fails verification is
/// handed to [`ChunkStore::discard_chunk`].
pub struct StoreChunks<S>(pub Arc<S>);

impl<S: ChunkStore> ChunkSource for StoreChunks<S> {
    fn fetch(&self, blob: B3Digest, meta: ChunkMeta) -> BoxFuture<'static, Result<Bytes>> {
        let store = self.0.clone();
        Box::pin(async move {
            checked_chunk(&*store, &meta)
                .await?
                .ok_or(Error::MissingChunk {
                    blob,
                    chunk: meta.digest,
                })
        })
    }
}

/// Chunk `meta` from `store`, checked by [`ChunkStore::get_chunk_verified`].
/// A stored copy that fails the check is handed to
/// [`ChunkStore::discard_chunk`], so later reads miss instead of failing
/// again.
pub(super) async fn checked_chunk<S: ChunkStore>(
    store: &S,
    meta: &ChunkMeta,
) -> Result<Option<Bytes>> {
    match store.get_chunk_verified(meta).await {
        Err(e) if matches!(e.root(), Error::Verification(_)) => {
            tracing::warn!(chunk = %meta.digest, error = %e, "stored chunk failed verification");
            store.discard_chunk(&meta.digest).await?;
            Err(e)
        }
        other => other,
    }
}

/// Chunks read by digest from a [`BlobService`] (whose `read_chunk`
/// verifies them).
pub struct ServiceChunks(pub Arc<dyn BlobService>);

impl ChunkSource for ServiceChunks {
    fn fetch(&self, blob: B3Digest, meta: ChunkMeta) -> BoxFuture<'static, Result<Bytes>> {
        let service = self.0.clone();
        Box::pin(async move {
            service.read_chunk(&meta).await?.ok_or(Error::MissingChunk {
                blob,
                chunk: meta.digest,
            })
        })
    }
}

/// Reads a multi-chunk blob from a [`ChunkSource`].
///
/// Keeps up to `read_ahead` chunk fetches in flight after the current one
/// (polled concurrently, yielded in order), so sequential reads from a
/// remote source overlap their round trips.
///
/// Every chunk is checked against its digest by the source. Given the blob's
/// [`Outboard`], the chunks are also run through a [`GroupVerifier`]: that is
/// what proves an untrusted chunk list belongs to the blob, group by group,
/// so bytes are released as soon as their group matched and a lie stops the
/// read at the first bad group. A seek restarts at the group holding the
/// target (from the chunk holding that group's start), so a read of a range
/// fetches only the chunks covering the range's groups.
pub struct ChunkedReader<C> {
    blob: B3Digest,
    chunks: Arc<[ChunkMeta]>,
    /// `offsets[i]` is where chunk `i` starts; `offsets[n]` is the blob size.
    offsets: Arc<[u64]>,
    source: Arc<C>,
    /// Most chunk fetches in flight beyond the one being read.
    read_ahead: usize,
    /// The current bound: 1 after a seek, one more per MiB read on from
    /// there, so a short ranged read fetches little beyond its range.
    window: usize,
    /// Bytes the pipeline released since it (re)started.
    since_restart: u64,
    outboard: Option<Outboard>,
    pos: u64,
    /// Released (verified) bytes, contiguous from `ready_start`.
    ready: VecDeque<Bytes>,
    ready_start: u64,
    /// Whether the fetch pipeline below is running.
    active: bool,
    /// Bytes to drop from the front of the next chunk (the pipeline started
    /// inside it).
    skip: usize,
    verifier: Option<GroupVerifier>,
    /// Fetches for chunks `next_fetch - inflight.len() ..next_fetch`.
    inflight: FuturesOrdered<BoxFuture<'static, Result<Bytes>>>,
    next_fetch: usize,
}

impl<C: ChunkSource> ChunkedReader<C> {
    /// Reads blob `blob` made of `chunks` from `source`, checking the chunks
    /// against `outboard` too when given.
    pub fn new(
        blob: B3Digest,
        chunks: Vec<ChunkMeta>,
        source: Arc<C>,
        read_ahead: usize,
        outboard: Option<Outboard>,
    ) -> Self {
        let mut offsets = Vec::with_capacity(chunks.len() + 1);
        let mut acc = 0u64;
        offsets.push(0);
        for c in &chunks {
            // Lists from outside come checked (`listed_len`); saturate
            // rather than wrap on any other.
            acc = acc.saturating_add(c.size);
            offsets.push(acc);
        }
        ChunkedReader {
            blob,
            chunks: chunks.into(),
            offsets: offsets.into(),
            source,
            read_ahead: read_ahead.max(1),
            window: 1,
            since_restart: 0,
            outboard,
            pos: 0,
            ready: VecDeque::new(),
            ready_start: 0,
            active: false,
            skip: 0,
            verifier: None,
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

    /// Drops the pipeline and starts a new one that releases bytes from the
    /// start of the group holding `pos` (or from `pos` itself, unverified
    /// by groups).
    fn restart(&mut self, pos: u64) {
        let start = match &self.outboard {
            Some(ob) => pos / ob.group_len() * ob.group_len(),
            None => pos,
        };
        let idx = self.chunk_at(start);
        self.inflight = FuturesOrdered::new();
        self.next_fetch = idx;
        self.ready.clear();
        self.ready_start = start;
        self.skip = (start - self.offsets[idx]) as usize;
        self.verifier = self
            .outboard
            .as_ref()
            .map(|ob| GroupVerifier::new(ob.clone(), start / ob.group_len()));
        self.window = if pos == 0 { self.read_ahead } else { 1 };
        self.since_restart = 0;
        self.active = true;
    }

    /// Whether the running pipeline will release `pos` without a restart.
    fn pipeline_reaches(&self, pos: u64) -> bool {
        self.active && pos >= self.ready_start && pos <= self.offsets[self.next_fetch]
    }

    /// Polls the pipeline until it released more bytes.
    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        loop {
            while self.inflight.len() < self.window && self.next_fetch < self.chunks.len() {
                // Each fetch, which checks its chunk, is a task of its own:
                // the window's checks run on as many cores as are free, and
                // go on while this task is busy sending.
                let fetch = self.source.fetch(self.blob, self.chunks[self.next_fetch]);
                self.inflight.push_back(Box::pin(spawn_owned(fetch)));
                self.next_fetch += 1;
            }
            let mut data = match ready!(self.inflight.poll_next_unpin(cx)) {
                Some(Ok(data)) => data,
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => {
                    return Poll::Ready(Err(Error::Io(io::Error::other(
                        "chunk fetch pipeline ran dry",
                    ))));
                }
            };
            self.since_restart += data.len() as u64;
            self.window = self
                .window
                .max(1 + (self.since_restart >> 20) as usize)
                .min(self.read_ahead);
            if self.skip > 0 {
                data = data.slice(self.skip.min(data.len())..);
                self.skip = 0;
            }
            let before = self.ready.len();
            match &mut self.verifier {
                Some(v) => {
                    let released = v.push(data).inspect_err(|e| {
                        tracing::warn!(blob = %self.blob, error = %e, "chunks do not match the outboard");
                    })?;
                    self.ready.extend(released);
                }
                None => self.ready.push_back(data),
            }
            if self.ready.len() > before {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<C: ChunkSource> BlobReader for ChunkedReader<C> {
    fn len(&self) -> u64 {
        self.size()
    }

    /// A slice of the released chunk bytes at the position.
    fn poll_piece(
        &mut self,
        cx: &mut Context<'_>,
        _scratch: &mut BytesMut,
        max: usize,
    ) -> Poll<io::Result<Bytes>> {
        if self.pos >= self.size() || max == 0 {
            return Poll::Ready(Ok(Bytes::new()));
        }
        loop {
            // Forget released bytes before the read position.
            while let Some(front) = self.ready.front() {
                let end = self.ready_start + front.len() as u64;
                if end > self.pos {
                    break;
                }
                self.ready_start = end;
                self.ready.pop_front();
            }
            if let Some(front) = self.ready.front()
                && self.ready_start <= self.pos
            {
                let within = (self.pos - self.ready_start) as usize;
                let n = max.min(front.len() - within);
                let piece = front.slice(within..within + n);
                self.pos += n as u64;
                return Poll::Ready(Ok(piece));
            }
            if !self.pipeline_reaches(self.pos) {
                self.restart(self.pos);
            }
            if let Err(e) = ready!(self.poll_more(cx)) {
                // A retry starts afresh.
                self.active = false;
                return Poll::Ready(Err(e.into_io()));
            }
        }
    }
}

impl<C: ChunkSource> AsyncRead for ChunkedReader<C> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        poll_read_by_piece(self.get_mut(), cx, buf)
    }
}

impl<C: ChunkSource> AsyncSeek for ChunkedReader<C> {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        let this = self.get_mut();
        this.pos = seek_target(position, this.pos, this.size())?;
        Ok(())
    }

    fn poll_complete(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Poll::Ready(Ok(self.pos))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::io::AsyncReadExt;
    use tokio::sync::watch;

    use super::*;

    /// Eight chunks of 1 KiB; chunk `i` is handed out once `released`
    /// reaches `i + 1`. Counts the fetches that finished and the fetch
    /// futures that were dropped.
    struct Gated {
        chunks: Vec<(ChunkMeta, Bytes)>,
        released: watch::Receiver<usize>,
        finished: Arc<AtomicUsize>,
        dropped: Arc<AtomicUsize>,
    }

    struct CountDrop(Arc<AtomicUsize>);

    impl Drop for CountDrop {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl ChunkSource for Gated {
        fn fetch(&self, _blob: B3Digest, chunk: ChunkMeta) -> BoxFuture<'static, Result<Bytes>> {
            let i = self.chunks.iter().position(|(c, _)| *c == chunk);
            let data = i.map(|i| self.chunks[i].1.clone());
            let mut released = self.released.clone();
            let finished = self.finished.clone();
            let guard = CountDrop(self.dropped.clone());
            Box::pin(async move {
                let _guard = guard;
                let i = i.ok_or(Error::MissingChunk {
                    blob: B3Digest::EMPTY,
                    chunk: chunk.digest,
                })?;
                released
                    .wait_for(|&n| n > i)
                    .await
                    .map_err(|e| Error::Io(io::Error::other(e)))?;
                finished.fetch_add(1, Ordering::SeqCst);
                Ok(data.unwrap_or_default())
            })
        }
    }

    fn gated() -> (ChunkedReader<Gated>, watch::Sender<usize>, Arc<Gated>) {
        let chunks: Vec<(ChunkMeta, Bytes)> = (0..8u8)
            .map(|i| {
                let data = Bytes::from(vec![i; 1024]);
                let meta = ChunkMeta {
                    digest: B3Digest::of(&data),
                    size: 1024,
                };
                (meta, data)
            })
            .collect();
        let (tx, rx) = watch::channel(0);
        let source = Arc::new(Gated {
            chunks: chunks.clone(),
            released: rx,
            finished: Arc::default(),
            dropped: Arc::default(),
        });
        let metas = chunks.iter().map(|(m, _)| *m).collect();
        let reader = ChunkedReader::new(B3Digest::EMPTY, metas, source.clone(), 4, None);
        (reader, tx, source)
    }

    /// Waits until `counter` reaches `n`; fails after ten seconds.
    async fn reaches(counter: &AtomicUsize, n: usize) {
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            while counter.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "counter stayed at {} of {n}",
            counter.load(Ordering::SeqCst)
        );
    }

    #[tokio::test]
    async fn fetches_in_the_window_finish_while_the_reader_is_not_polled() {
        let (mut reader, release, source) = gated();
        release.send_replace(1);
        let mut buf = vec![0u8; 1024];
        reader.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, vec![0u8; 1024]);
        // The window holds chunks 0..4. Released now, 1..4 are fetched
        // without the reader being polled: each runs as its own task.
        release.send_replace(8);
        reaches(&source.finished, 4).await;
        assert_eq!(
            source.finished.load(Ordering::SeqCst),
            4,
            "beyond the window"
        );
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).await.unwrap();
        let want: Vec<u8> = (1..8u8).flat_map(|i| vec![i; 1024]).collect();
        assert_eq!(rest, want);
    }

    #[tokio::test]
    async fn a_dropped_reader_abandons_its_fetches() {
        let (mut reader, _release, source) = gated();
        let mut buf = vec![0u8; 1024];
        let read = tokio::time::timeout(Duration::from_millis(20), reader.read(&mut buf)).await;
        assert!(read.is_err(), "nothing was released");
        drop(reader);
        // Every fetch of the window is dropped, not left waiting.
        reaches(&source.dropped, 4).await;
        assert_eq!(source.finished.load(Ordering::SeqCst), 0);
    }
}
