//! Metrics and tracing for every tier, applied by the composition engine
//! around each built tier (outside its `timeout`), so kinds and combinators
//! do not count their own calls and every kind is counted the same way.
//!
//! Per tier: hits and misses of Stats and reads, errors (failed calls, and
//! readers or writers that fail part-way), bytes read and written, and call
//! durations; each call runs in a `tier` span naming the tier and digest.
//! Verification failures, fills, evictions and occupancy are counted where
//! they are known (the `tiers` engine, the cache stores).

use std::future::Future;
use std::io::SeekFrom;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use prometheus_client::metrics::histogram::Histogram;
use tokio::io::{AsyncRead, AsyncSeek, ReadBuf};
use tracing::{Instrument, info_span};

use crate::blobservice::{
    BlobReader, BlobService, BlobStat, BlobWriter, ChunkMeta, ChunkStream, PutResult,
};
use crate::digest::B3Digest;
use crate::error::{Error, Result};
use crate::metrics::TierMetrics;
use crate::verify::{BlobProof, Outboard};

/// A tier whose calls are counted and traced.
pub struct InstrumentedService {
    inner: Arc<dyn BlobService>,
    tier: String,
    metrics: TierMetrics,
}

impl InstrumentedService {
    /// Counts the calls of `inner`, the tier called `tier`, in `metrics`.
    pub fn new(inner: Arc<dyn BlobService>, tier: String, metrics: TierMetrics) -> Self {
        InstrumentedService {
            inner,
            tier,
            metrics,
        }
    }

    /// Runs `call` in a span, timing it into `histogram` and counting a
    /// failure as an error.
    /// [`observe`](Self::observe) for either kind of Stat, counted as a
    /// lookup (hit or miss).
    async fn observe_stat(
        &self,
        digest: &B3Digest,
        call: impl Future<Output = Result<Option<BlobStat>>>,
    ) -> Result<Option<BlobStat>> {
        let found = self
            .observe("stat", digest, &self.metrics.stat_seconds, call)
            .await;
        self.count_lookup(&found);
        found
    }

    async fn observe<T>(
        &self,
        op: &'static str,
        digest: &B3Digest,
        histogram: &Histogram,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let span = info_span!("tier", tier = %self.tier, op, %digest);
        let started = Instant::now();
        let result = call.instrument(span).await;
        histogram.observe(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            self.count_error(e);
        }
        result
    }

    /// Counts a failed call as an error, unless an open breaker refused it:
    /// such a call never reached the tier, and the breaker's own metrics
    /// show it.
    fn count_error(&self, e: &Error) {
        if !matches!(e.root(), Error::CircuitOpen { .. }) {
            self.metrics.errors.inc();
        }
    }

    /// Opens a writer with `open`, timing it, and counts what it writes.
    async fn counted_writer(
        &self,
        open: impl Future<Output = Result<Box<dyn BlobWriter>>>,
    ) -> Result<Box<dyn BlobWriter>> {
        let started = Instant::now();
        let opened = open.await;
        self.metrics
            .write_seconds
            .observe(started.elapsed().as_secs_f64());
        match opened {
            Ok(inner) => Ok(Box::new(CountingWriter {
                inner,
                metrics: self.metrics.clone(),
            })),
            Err(e) => {
                self.count_error(&e);
                Err(e)
            }
        }
    }

    /// Counts a lookup's answer as a hit or a miss.
    fn count_lookup<T>(&self, found: &Result<Option<T>>) {
        match found {
            Ok(Some(_)) => {
                self.metrics.hits.inc();
            }
            Ok(None) => {
                self.metrics.misses.inc();
            }
            Err(_) => {}
        }
    }
}

#[async_trait]
impl BlobService for InstrumentedService {
    async fn stat(&self, digest: &B3Digest) -> Result<Option<BlobStat>> {
        self.observe_stat(digest, self.inner.stat(digest)).await
    }

    async fn stat_before_read(&self, digest: &B3Digest) -> Result<Option<BlobStat>> {
        self.observe_stat(digest, self.inner.stat_before_read(digest))
            .await
    }

    async fn outboard(&self, digest: &B3Digest) -> Result<Option<Outboard>> {
        let m = &self.metrics;
        self.observe(
            "outboard",
            digest,
            &m.outboard_seconds,
            self.inner.outboard(digest),
        )
        .await
    }

    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
        let m = &self.metrics;
        let found = self
            .observe(
                "read",
                digest,
                &m.read_seconds,
                self.inner.open_read(digest),
            )
            .await;
        self.count_lookup(&found);
        Ok(found?.map(|inner| {
            Box::new(CountingReader {
                inner,
                metrics: self.metrics.clone(),
            }) as Box<dyn BlobReader>
        }))
    }

    async fn read_chunk(&self, chunk: &ChunkMeta) -> Result<Option<Bytes>> {
        let m = &self.metrics;
        let found = self
            .observe(
                "read_chunk",
                &chunk.digest,
                &m.read_chunk_seconds,
                self.inner.read_chunk(chunk),
            )
            .await;
        self.count_lookup(&found);
        if let Ok(Some(data)) = &found {
            m.read_bytes.inc_by(data.len() as u64);
        }
        found
    }

    /// Times opening the stream; its chunks count as bytes read, and a
    /// failure part-way as an error.
    async fn stream_chunks(
        &self,
        digest: &B3Digest,
        chunks: &[ChunkMeta],
    ) -> Result<Option<ChunkStream>> {
        let m = &self.metrics;
        let opened = self
            .observe(
                "stream_chunks",
                digest,
                &m.read_seconds,
                self.inner.stream_chunks(digest, chunks),
            )
            .await?;
        let metrics = self.metrics.clone();
        Ok(opened.map(|stream| {
            stream
                .inspect(move |item| match item {
                    Ok(chunk) => {
                        metrics.read_bytes.inc_by(chunk.len() as u64);
                    }
                    Err(e) if !matches!(e.root(), Error::CircuitOpen { .. }) => {
                        metrics.errors.inc();
                    }
                    Err(_) => {}
                })
                .boxed()
        }))
    }

    async fn holds_chunks(&self, chunks: &[ChunkMeta]) -> Result<Vec<bool>> {
        let span =
            info_span!("tier", tier = %self.tier, op = "holds_chunks", chunks = chunks.len());
        self.inner.holds_chunks(chunks).instrument(span).await
    }

    async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
        let span = info_span!("tier", tier = %self.tier, op = "write");
        self.counted_writer(self.inner.open_write().instrument(span))
            .await
    }

    async fn open_fill(&self, digest: &B3Digest, stat: &BlobStat) -> Result<Box<dyn BlobWriter>> {
        let span = info_span!("tier", tier = %self.tier, op = "fill", %digest);
        self.counted_writer(self.inner.open_fill(digest, stat).instrument(span))
            .await
    }

    async fn shutdown(&self, deadline: tokio::time::Instant) -> Result<()> {
        self.inner.shutdown(deadline).await
    }

    fn caught_lying(&self, digest: &B3Digest, chunks: &[ChunkMeta]) -> bool {
        self.inner.caught_lying(digest, chunks)
    }
}

/// Counts the bytes a reader delivers, and a read that fails.
struct CountingReader {
    inner: Box<dyn BlobReader>,
    metrics: TierMetrics,
}

impl BlobReader for CountingReader {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn poll_piece(
        &mut self,
        cx: &mut Context<'_>,
        scratch: &mut BytesMut,
        max: usize,
    ) -> Poll<std::io::Result<Bytes>> {
        let polled = self.inner.poll_piece(cx, scratch, max);
        match &polled {
            Poll::Ready(Ok(piece)) => {
                self.metrics.read_bytes.inc_by(piece.len() as u64);
            }
            Poll::Ready(Err(_)) => {
                self.metrics.errors.inc();
            }
            Poll::Pending => {}
        }
        polled
    }
}

impl AsyncRead for CountingReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        match &polled {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len().saturating_sub(before);
                self.metrics.read_bytes.inc_by(n as u64);
            }
            Poll::Ready(Err(_)) => {
                self.metrics.errors.inc();
            }
            Poll::Pending => {}
        }
        polled
    }
}

impl AsyncSeek for CountingReader {
    fn start_seek(mut self: Pin<&mut Self>, position: SeekFrom) -> std::io::Result<()> {
        Pin::new(&mut self.inner).start_seek(position)
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        Pin::new(&mut self.inner).poll_complete(cx)
    }
}

/// Counts the bytes written through a writer, and a write that fails.
struct CountingWriter {
    inner: Box<dyn BlobWriter>,
    metrics: TierMetrics,
}

#[async_trait]
impl BlobWriter for CountingWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        let n = data.len() as u64;
        let written = self.inner.write(data).await;
        if written.is_ok() {
            self.metrics.written_bytes.inc_by(n);
        } else {
            self.metrics.errors.inc();
        }
        written
    }

    async fn close(self: Box<Self>) -> Result<PutResult> {
        let metrics = self.metrics.clone();
        let closed = self.inner.close().await;
        if closed.is_err() {
            metrics.errors.inc();
        }
        closed
    }

    async fn close_verified(self: Box<Self>, proof: &BlobProof) -> Result<PutResult> {
        let metrics = self.metrics.clone();
        let closed = self.inner.close_verified(proof).await;
        if closed.is_err() {
            metrics.errors.inc();
        }
        closed
    }
}
