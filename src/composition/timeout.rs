//! The `timeout` every tier table may carry: applied by the composition
//! engine around any kind, so no kind implements it itself.
//!
//! Each call (Stat, opening a reader or writer, each write, closing) must
//! finish within the timeout, and a reader must make progress at least once
//! per timeout: a peer that stalls mid-stream is cut off, not waited for.

use std::io::SeekFrom;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncSeek, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::blobservice::{
    BlobReader, BlobService, BlobStat, BlobWriter, ChunkMeta, ChunkStream, PutResult,
};
use crate::digest::B3Digest;
use crate::error::{Error, Result};
use crate::verify::{BlobProof, Outboard};

/// A tier whose calls are bounded by a timeout.
pub struct TimeoutService {
    inner: Arc<dyn BlobService>,
    tier: String,
    after: Duration,
}

impl TimeoutService {
    /// Bounds every call of `inner` (named `tier` in errors) by `after`.
    pub fn new(inner: Arc<dyn BlobService>, tier: String, after: Duration) -> Self {
        TimeoutService { inner, tier, after }
    }

    fn error(&self) -> Error {
        Error::Timeout {
            tier: self.tier.clone(),
            after: self.after,
        }
    }

    async fn bounded<T>(&self, fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        tokio::time::timeout(self.after, fut)
            .await
            .unwrap_or_else(|_| Err(self.error()))
    }
}

#[async_trait]
impl BlobService for TimeoutService {
    async fn has(&self, digest: &B3Digest) -> Result<bool> {
        self.bounded(self.inner.has(digest)).await
    }

    async fn stat(&self, digest: &B3Digest) -> Result<Option<BlobStat>> {
        self.bounded(self.inner.stat(digest)).await
    }

    async fn stat_before_read(&self, digest: &B3Digest) -> Result<Option<BlobStat>> {
        self.bounded(self.inner.stat_before_read(digest)).await
    }

    async fn outboard(&self, digest: &B3Digest) -> Result<Option<Outboard>> {
        self.bounded(self.inner.outboard(digest)).await
    }

    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
        let reader = self.bounded(self.inner.open_read(digest)).await?;
        Ok(reader.map(|inner| {
            Box::new(TimeoutReader {
                inner,
                idle: self.after,
                deadline: Box::pin(tokio::time::sleep(self.after)),
                error: self.error(),
            }) as Box<dyn BlobReader>
        }))
    }

    async fn read_chunk(&self, chunk: &ChunkMeta) -> Result<Option<Bytes>> {
        self.bounded(self.inner.read_chunk(chunk)).await
    }

    /// Each chunk must come within the timeout, like a reader's progress.
    async fn stream_chunks(
        &self,
        digest: &B3Digest,
        chunks: &[ChunkMeta],
    ) -> Result<Option<ChunkStream>> {
        let Some(mut inner) = self
            .bounded(self.inner.stream_chunks(digest, chunks))
            .await?
        else {
            return Ok(None);
        };
        let after = self.after;
        let error = self.error();
        Ok(Some(Box::pin(async_stream::stream! {
            loop {
                match tokio::time::timeout(after, inner.next()).await {
                    Ok(Some(item)) => yield item,
                    Ok(None) => break,
                    Err(_) => {
                        yield Err(error);
                        break;
                    }
                }
            }
        })))
    }

    async fn holds_chunks(&self, chunks: &[ChunkMeta]) -> Result<Vec<bool>> {
        self.bounded(self.inner.holds_chunks(chunks)).await
    }

    async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
        let inner = self.bounded(self.inner.open_write()).await?;
        Ok(Box::new(TimeoutWriter {
            inner,
            after: self.after,
            tier: self.tier.clone(),
        }))
    }

    async fn open_fill(&self, digest: &B3Digest, stat: &BlobStat) -> Result<Box<dyn BlobWriter>> {
        let inner = self.bounded(self.inner.open_fill(digest, stat)).await?;
        Ok(Box::new(TimeoutWriter {
            inner,
            after: self.after,
            tier: self.tier.clone(),
        }))
    }

    async fn shutdown(&self, deadline: tokio::time::Instant) -> Result<()> {
        self.inner.shutdown(deadline).await
    }

    fn caught_lying(&self, digest: &B3Digest, chunks: &[ChunkMeta]) -> bool {
        self.inner.caught_lying(digest, chunks)
    }
}

/// Fails a read that makes no progress for `idle`.
struct TimeoutReader {
    inner: Box<dyn BlobReader>,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    error: Error,
}

impl TimeoutReader {
    fn timed_out(&self) -> std::io::Error {
        match &self.error {
            Error::Timeout { tier, after } => Error::Timeout {
                tier: tier.clone(),
                after: *after,
            }
            .into_io(),
            other => std::io::Error::other(other.to_string()),
        }
    }
}

impl BlobReader for TimeoutReader {
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
        self.on_poll(cx, polled)
    }
}

impl TimeoutReader {
    /// Moves the deadline on when `polled` is an answer; fails once the
    /// deadline passed without one.
    fn on_poll<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        match polled {
            Poll::Ready(r) => {
                let next = Instant::now() + self.idle;
                self.deadline.as_mut().reset(next);
                Poll::Ready(r)
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(self.timed_out())),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncRead for TimeoutReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.on_poll(cx, polled)
    }
}

impl AsyncSeek for TimeoutReader {
    fn start_seek(mut self: Pin<&mut Self>, position: SeekFrom) -> std::io::Result<()> {
        Pin::new(&mut self.inner).start_seek(position)
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        Pin::new(&mut self.inner).poll_complete(cx)
    }
}

/// Fails a write or close that takes longer than `after`.
struct TimeoutWriter {
    inner: Box<dyn BlobWriter>,
    after: Duration,
    tier: String,
}

impl TimeoutWriter {
    fn error(&self) -> Error {
        Error::Timeout {
            tier: self.tier.clone(),
            after: self.after,
        }
    }
}

#[async_trait]
impl BlobWriter for TimeoutWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        let after = self.after;
        match tokio::time::timeout(after, self.inner.write(data)).await {
            Ok(r) => r,
            Err(_) => Err(self.error()),
        }
    }

    async fn close(self: Box<Self>) -> Result<PutResult> {
        let error = self.error();
        tokio::time::timeout(self.after, self.inner.close())
            .await
            .unwrap_or(Err(error))
    }

    async fn close_verified(self: Box<Self>, proof: &BlobProof) -> Result<PutResult> {
        let error = self.error();
        tokio::time::timeout(self.after, self.inner.close_verified(proof))
            .await
            .unwrap_or(Err(error))
    }
}
