//! A cold read that streams while its fill runs.
//!
//! A sync fill used to finish writing the blob into the near tiers before
//! the client got its first byte, so a cold read took the fetch and then a
//! whole local read. When the source tier has an outboard, the fill checks
//! the blob group by group ([`crate::verify::BlobCheck`]) and each group is
//! proven as soon as it arrived. The fill hands those proven bytes to the
//! reader that started it through a bounded channel, the tap, while it
//! writes the same bytes into the near tiers.
//!
//! Without an outboard nothing is proven before the end: a small blob (a
//! chunk, typically) is held by the fill and handed over as soon as it
//! hashed right, before the near tiers have stored it; the reader of a
//! larger one is cut off the tap at once.
//!
//! The tap never holds the fill back for long: a client that stops reading
//! for [`TAP_PATIENCE`] is cut off too. A reader cut off, or one that seeks,
//! waits for the fill to end and carries on from the near tiers (or, if the
//! fill failed, from the source tier on) at its position, as any other
//! reader of a fill does.

use std::io::{self, SeekFrom};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncSeek, AsyncSeekExt, ReadBuf};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::Inner;
use crate::blobservice::{BlobReader, SharedSpool, poll_read_by_piece, seek_target};
use crate::digest::B3Digest;
use crate::error::Error;
use crate::singleflight::Flight;

/// Proven pieces queued for the client. A piece is at most a chunk (512
/// KiB), so this bounds the queue at 4 MiB per cold read; it only needs to
/// cover the gaps between the client's reads.
pub(super) const TAP_QUEUE: usize = 8;
/// How long the fill waits for a client that does not take what it is
/// given before it stops feeding it.
pub(super) const TAP_PATIENCE: Duration = Duration::from_millis(250);

/// The fill's end of the tap.
pub(super) struct Tap(Option<mpsc::Sender<Bytes>>);

impl Tap {
    /// A tap and the receiving end for [`TapReader`].
    pub(super) fn new() -> (Tap, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(TAP_QUEUE);
        (Tap(Some(tx)), rx)
    }

    /// A tap that feeds nobody.
    pub(super) fn none() -> Tap {
        Tap(None)
    }

    /// Hands proven bytes to the reader, unless it went away or has not
    /// taken any for [`TAP_PATIENCE`]: then the tap closes.
    pub(super) async fn feed(&mut self, pieces: Vec<Bytes>) {
        let Some(tx) = &self.0 else {
            return;
        };
        for piece in pieces {
            match tokio::time::timeout(TAP_PATIENCE, tx.send(piece)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    self.0 = None;
                    return;
                }
                Err(_) => {
                    debug!("the client is not keeping up with the fill; it reads after it");
                    self.0 = None;
                    return;
                }
            }
        }
    }

    /// Closes the tap, so its reader carries on from the filled tiers.
    pub(super) fn close(&mut self) {
        self.0 = None;
    }
}

/// The reader returned to the client whose read started a sync fill.
pub(super) struct TapReader {
    inner: Arc<Inner>,
    digest: B3Digest,
    /// The tier the fill fetches from.
    source: usize,
    len: u64,
    /// Bytes delivered, or the target of the last completed seek.
    pos: u64,
    fill: Flight<Option<SharedSpool>>,
    state: State,
}

enum State {
    Tap {
        rx: mpsc::Receiver<Bytes>,
        piece: Bytes,
    },
    /// Waiting for the fill, then opening a reader at `pos`.
    Opening(BoxFuture<'static, io::Result<Box<dyn BlobReader>>>),
    Reading(Box<dyn BlobReader>),
}

impl TapReader {
    /// Reads blob `digest` (`len` bytes) from `rx` while the `fill` from
    /// tier `source` runs.
    pub(super) fn new(
        inner: Arc<Inner>,
        digest: B3Digest,
        source: usize,
        len: u64,
        rx: mpsc::Receiver<Bytes>,
        fill: Flight<Option<SharedSpool>>,
    ) -> Self {
        TapReader {
            inner,
            digest,
            source,
            len,
            pos: 0,
            fill,
            state: State::Tap {
                rx,
                piece: Bytes::new(),
            },
        }
    }

    /// Leaves the tap: waits for the fill and reads on from position `at`.
    fn reopen(&mut self, at: u64) {
        self.state = State::Opening(
            after_fill(
                self.inner.clone(),
                self.digest,
                self.source,
                self.len,
                at,
                self.fill.clone(),
            )
            .boxed(),
        );
    }
}

/// A reader of the blob at `pos`, once `fill` is over: from the tiers it
/// filled, else from the source tier on (after the source, if the source
/// lied and did not pass over the liar itself).
async fn after_fill(
    inner: Arc<Inner>,
    digest: B3Digest,
    source: usize,
    len: u64,
    pos: u64,
    fill: Flight<Option<SharedSpool>>,
) -> io::Result<Box<dyn BlobReader>> {
    let (from, cause) = match fill.await {
        Ok(_) => {
            if let Some(reader) = inner.read_near(&digest, source, len).await {
                return seek(reader, pos).await;
            }
            (source, None)
        }
        // A source that passed over the liar itself is read again.
        Err(e) if matches!(e.root(), Error::Verification(_)) => {
            let again = inner.members[source].asks_again(&digest);
            (if again { source } else { source + 1 }, Some(e))
        }
        Err(e) => {
            warn!(%digest, error = %e, "fetch and fill failed; reading directly");
            (source, Some(e))
        }
    };
    match inner.read_direct(&digest, from).await {
        Ok(Some(reader)) => seek(reader, pos).await,
        // No later tier has it: the fill's failure says why.
        Ok(None) => Err(match cause {
            Some(e) => Error::Shared(e).into_io(),
            None => Error::AllTiersFailed(vec![format!("blob {digest} vanished from every tier")])
                .into_io(),
        }),
        Err(e) => Err(e.into_io()),
    }
}

async fn seek(mut reader: Box<dyn BlobReader>, pos: u64) -> io::Result<Box<dyn BlobReader>> {
    reader.seek(SeekFrom::Start(pos)).await?;
    Ok(reader)
}

impl BlobReader for TapReader {
    fn len(&self) -> u64 {
        self.len
    }

    /// Slices of the fill's proven pieces while tapped; the filled tier's
    /// pieces after.
    fn poll_piece(
        &mut self,
        cx: &mut Context<'_>,
        scratch: &mut BytesMut,
        max: usize,
    ) -> Poll<io::Result<Bytes>> {
        loop {
            match &mut self.state {
                State::Tap { rx, piece, .. } => {
                    if self.pos == self.len || max == 0 {
                        return Poll::Ready(Ok(Bytes::new()));
                    }
                    if piece.is_empty() {
                        match ready!(rx.poll_recv(cx)) {
                            Some(next) => *piece = next,
                            None => {
                                // Cut off before the end: read on after the fill.
                                let at = self.pos;
                                self.reopen(at);
                            }
                        }
                        continue;
                    }
                    let out = piece.split_to(piece.len().min(max));
                    self.pos += out.len() as u64;
                    return Poll::Ready(Ok(out));
                }
                State::Opening(opening) => {
                    let reader = ready!(opening.as_mut().poll(cx))?;
                    self.state = State::Reading(reader);
                }
                State::Reading(reader) => {
                    let out = ready!(reader.poll_piece(cx, scratch, max))?;
                    self.pos += out.len() as u64;
                    return Poll::Ready(Ok(out));
                }
            }
        }
    }
}

impl AsyncRead for TapReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        poll_read_by_piece(self.get_mut(), cx, buf)
    }
}

impl AsyncSeek for TapReader {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        let this = self.get_mut();
        let target = seek_target(position, this.pos, this.len)?;
        match &mut this.state {
            State::Tap { .. } if target == this.pos => Ok(()),
            State::Tap { .. } => {
                this.reopen(target);
                this.pos = target;
                Ok(())
            }
            State::Reading(reader) => Pin::new(reader).start_seek(SeekFrom::Start(target)),
            // Only reachable if a caller abandons a pending read and seeks.
            State::Opening(_) => Err(io::Error::other(
                "cannot seek while the read waits for its fill",
            )),
        }
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        let this = self.get_mut();
        match &mut this.state {
            State::Tap { .. } => Poll::Ready(Ok(this.pos)),
            // The reader is opened already seeked to `pos`.
            State::Opening(opening) => {
                let reader = ready!(opening.as_mut().poll(cx))?;
                this.state = State::Reading(reader);
                Poll::Ready(Ok(this.pos))
            }
            State::Reading(reader) => {
                let pos = ready!(Pin::new(reader).poll_complete(cx))?;
                this.pos = pos;
                Poll::Ready(Ok(pos))
            }
        }
    }
}
