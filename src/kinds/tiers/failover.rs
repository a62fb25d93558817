//! A reader that switches tiers mid-stream.
//!
//! Readers from far tiers verify lazily: a strata peer's or a bucket's
//! reader checks each chunk (and each 16 KiB group against the outboard) as
//! it arrives, so a lie shows up as a read error after some verified bytes
//! have already gone out to the client. A peer can also stall or die
//! half-way. Rather than fail the client's whole read there, the reader
//! records the failure against the tier, opens the blob in the next tier
//! that has it, seeks that reader to the position already delivered, and
//! carries on. Every byte handed out came from a verifying reader, so the
//! bytes before the switch are as good as those after it.

use std::io::{self, SeekFrom};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncSeek, AsyncSeekExt, ReadBuf};
use tracing::{Instrument, info, info_span};

use super::Inner;
use crate::blobservice::BlobReader;
use crate::digest::B3Digest;
use crate::error::Error;

/// A reader over a blob held by tier `tier` of a `tiers` service, which
/// moves on to the later tiers when that one fails.
pub(super) struct FailoverReader {
    inner: Arc<Inner>,
    digest: B3Digest,
    /// Index of the tier the current reader comes from.
    tier: usize,
    len: u64,
    /// Bytes delivered so far, or the target of the last completed seek.
    pos: u64,
    state: State,
}

enum State {
    Reading(Box<dyn BlobReader>),
    /// Opening the blob in a later tier after `cause` ended the last read.
    Switching {
        next: BoxFuture<'static, Option<(usize, Box<dyn BlobReader>)>>,
        cause: Error,
    },
    /// No later tier could take over.
    Failed,
}

impl FailoverReader {
    /// Wraps `reader`, which reads `digest` from tier `tier`.
    pub(super) fn new(
        inner: Arc<Inner>,
        digest: B3Digest,
        tier: usize,
        reader: Box<dyn BlobReader>,
    ) -> Self {
        FailoverReader {
            inner,
            digest,
            tier,
            len: reader.len(),
            pos: 0,
            state: State::Reading(reader),
        }
    }

    /// Starts opening the blob in the tiers after the current one, at the
    /// current position.
    fn switch(&mut self, cause: Error) {
        let member = &self.inner.members[self.tier];
        member.record_failure_at("read", &self.digest, &cause, self.pos);
        let span =
            info_span!("failover", digest = %self.digest, from = %member.name, position = self.pos);
        let next = reopen(
            self.inner.clone(),
            self.digest,
            self.tier + 1,
            self.len,
            self.pos,
        )
        .instrument(span)
        .boxed();
        self.state = State::Switching { next, cause };
    }
}

/// The first tier from `from` on whose reader for `digest` has length `len`
/// and seeks to `pos`; failures on the way are recorded against their tier.
async fn reopen(
    inner: Arc<Inner>,
    digest: B3Digest,
    from: usize,
    len: u64,
    pos: u64,
) -> Option<(usize, Box<dyn BlobReader>)> {
    for (i, m) in inner.members.iter().enumerate().skip(from) {
        if m.distrusts(&digest) {
            continue;
        }
        let mut reader = match m.svc.open_read(&digest).await {
            Ok(Some(reader)) => reader,
            Ok(None) => continue,
            Err(e) => {
                m.record_failure("read", &digest, &e);
                continue;
            }
        };
        if reader.len() != len {
            // A verifying reader cannot hand out a wrong length, but the
            // check is free and keeps the spliced stream consistent.
            let e = Error::Io(io::Error::other(format!(
                "length {} differs from the {len} bytes of the tier read before",
                reader.len()
            )));
            m.record_failure("read", &digest, &e);
            continue;
        }
        match reader.seek(SeekFrom::Start(pos)).await {
            Ok(_) => {
                info!(tier = %m.name, "resuming the read from this tier");
                return Some((i, reader));
            }
            Err(e) => m.record_failure("seek", &digest, &Error::from_io(e)),
        }
    }
    None
}

impl FailoverReader {
    /// Runs `op` (a read of some kind that answers with what it delivered
    /// and how many bytes that is) on the current tier's reader, switching
    /// tiers and running it again when it fails.
    fn poll_op<T>(
        &mut self,
        cx: &mut Context<'_>,
        mut op: impl FnMut(&mut dyn BlobReader, &mut Context<'_>) -> Poll<io::Result<(T, u64)>>,
    ) -> Poll<io::Result<T>> {
        loop {
            match &mut self.state {
                State::Reading(reader) => match ready!(op(reader.as_mut(), cx)) {
                    Ok((out, n)) => {
                        self.pos += n;
                        return Poll::Ready(Ok(out));
                    }
                    Err(e) => self.switch(Error::from_io(e)),
                },
                State::Switching { next, .. } => {
                    let found = ready!(next.as_mut().poll(cx));
                    let State::Switching { cause, .. } =
                        std::mem::replace(&mut self.state, State::Failed)
                    else {
                        unreachable!("matched Switching above");
                    };
                    match found {
                        Some((tier, reader)) => {
                            self.tier = tier;
                            self.state = State::Reading(reader);
                        }
                        // No tier took over: the client sees the cause.
                        None => return Poll::Ready(Err(cause.into_io())),
                    }
                }
                State::Failed => {
                    return Poll::Ready(Err(io::Error::other(format!(
                        "blob {}: no tier could continue the read",
                        self.digest
                    ))));
                }
            }
        }
    }
}

impl BlobReader for FailoverReader {
    fn len(&self) -> u64 {
        self.len
    }

    fn poll_piece(
        &mut self,
        cx: &mut Context<'_>,
        scratch: &mut BytesMut,
        max: usize,
    ) -> Poll<io::Result<Bytes>> {
        self.poll_op(cx, |reader, cx| {
            let piece = ready!(reader.poll_piece(cx, scratch, max))?;
            let n = piece.len() as u64;
            Poll::Ready(Ok((piece, n)))
        })
    }
}

impl AsyncRead for FailoverReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().poll_op(cx, |reader, cx| {
            let before = buf.filled().len();
            match ready!(Pin::new(reader).poll_read(cx, buf)) {
                Ok(()) => Poll::Ready(Ok(((), (buf.filled().len() - before) as u64))),
                Err(e) => {
                    // Whatever a failed read left in `buf` is not part of
                    // the stream.
                    buf.set_filled(before);
                    Poll::Ready(Err(e))
                }
            }
        })
    }
}

impl AsyncSeek for FailoverReader {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        match &mut self.get_mut().state {
            State::Reading(reader) => Pin::new(reader).start_seek(position),
            // Only reachable if a caller abandons a pending read and seeks.
            State::Switching { .. } => Err(io::Error::other(
                "cannot seek while the read is switching tiers",
            )),
            State::Failed => Err(io::Error::other("the read failed in every tier")),
        }
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        let this = self.get_mut();
        match &mut this.state {
            State::Reading(reader) => {
                let pos = ready!(Pin::new(reader).poll_complete(cx))?;
                this.pos = pos;
                Poll::Ready(Ok(pos))
            }
            _ => Poll::Ready(Ok(this.pos)),
        }
    }
}
