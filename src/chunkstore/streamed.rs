//! [`StreamedReader`]: a multi-chunk blob read from the start in one stream
//! (a peer's Read of the whole blob), checked group by group against the
//! blob's outboard; a seek anywhere else hands over to a [`ChunkedReader`],
//! which fetches only the chunks the new position needs.
//!
//! Reading a blob from its start through a [`ChunkedReader`] over a remote
//! source costs a round trip and a stream per chunk; one stream for the
//! whole blob costs one. Ranged reads keep the chunked path, which is what
//! lets them fetch only the covering chunks.

use std::collections::VecDeque;
use std::io::{self, SeekFrom};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use tokio::io::{AsyncRead, AsyncSeek, ReadBuf};

use super::{ChunkSource, ChunkedReader};
use crate::blobservice::{BlobReader, poll_read_by_piece, seek_target};
use crate::error::{Error, Result, VerifyError};
use crate::verify::{GroupVerifier, Outboard};

/// Opens the stream of the whole blob's bytes (in pieces of any size).
pub type OpenStream =
    Box<dyn FnOnce() -> BoxFuture<'static, Result<BoxStream<'static, Result<Bytes>>>> + Send>;

/// Reads a blob from one stream of it while it is read from the start; see
/// the module docs.
pub struct StreamedReader<C> {
    outboard: Outboard,
    pos: u64,
    state: State,
    /// Takes over after a seek (or when the stream could not be opened).
    chunked: ChunkedReader<C>,
}

enum State {
    /// Nothing read yet: the stream opens on the first read from the start.
    Idle(Option<OpenStream>),
    Opening(BoxFuture<'static, Result<BoxStream<'static, Result<Bytes>>>>),
    Streaming {
        pieces: BoxStream<'static, Result<Bytes>>,
        verifier: GroupVerifier,
        /// Verified bytes not yet handed out, from `pos` on.
        ready: VecDeque<Bytes>,
    },
    /// Reading through `chunked`.
    Chunked,
}

impl<C: ChunkSource> StreamedReader<C> {
    /// Reads the blob `outboard` describes from the stream `open` opens,
    /// and through `chunked` (a reader of the same blob) after a seek.
    pub fn new(outboard: Outboard, open: OpenStream, chunked: ChunkedReader<C>) -> Self {
        StreamedReader {
            outboard,
            pos: 0,
            state: State::Idle(Some(open)),
            chunked,
        }
    }

    /// Hands the read over to the chunked reader, at the current position.
    fn hand_over(&mut self) -> io::Result<()> {
        self.state = State::Chunked;
        Pin::new(&mut self.chunked).start_seek(SeekFrom::Start(self.pos))
    }

    /// Ends the stream after `err`: a read tried again carries on through
    /// the chunked reader, from the position reached.
    fn failed(&mut self, err: io::Error) -> io::Error {
        self.state = State::Idle(None);
        err
    }

    /// The stream ended after `received` bytes, short of the blob.
    fn ended_early(&self, received: u64) -> io::Error {
        Error::from(VerifyError::LengthMismatch {
            what: "blob",
            expected: *self.outboard.blob(),
            expected_len: self.outboard.size(),
            actual_len: received,
        })
        .into_io()
    }
}

impl<C: ChunkSource> BlobReader for StreamedReader<C> {
    fn len(&self) -> u64 {
        self.outboard.size()
    }

    fn poll_piece(
        &mut self,
        cx: &mut Context<'_>,
        scratch: &mut BytesMut,
        max: usize,
    ) -> Poll<io::Result<Bytes>> {
        // At the blob's end a stream still open is read on to its end
        // (below): a peer that sends bytes past the end, or an error status
        // after the last byte, is lying or failing even though every byte
        // handed out was proven, and its tier must hear of it (to log and
        // count it). On a sound peer the end is on its way with the last
        // bytes.
        let streaming = matches!(self.state, State::Streaming { .. });
        if max == 0 || (self.pos >= self.len() && !streaming) {
            return Poll::Ready(Ok(Bytes::new()));
        }
        loop {
            match &mut self.state {
                State::Idle(open) => match open.take() {
                    Some(open) if self.pos == 0 => self.state = State::Opening(open()),
                    _ => self.hand_over()?,
                },
                State::Opening(opening) => {
                    let pieces = match ready!(opening.as_mut().poll(cx)) {
                        Ok(pieces) => pieces,
                        Err(e) => return Poll::Ready(Err(self.failed(e.into_io()))),
                    };
                    self.state = State::Streaming {
                        pieces,
                        verifier: GroupVerifier::new(self.outboard.clone(), 0),
                        ready: VecDeque::new(),
                    };
                }
                State::Streaming {
                    pieces,
                    verifier,
                    ready,
                } => {
                    if let Some(front) = ready.front_mut() {
                        let piece = front.split_to(front.len().min(max));
                        if front.is_empty() {
                            ready.pop_front();
                        }
                        self.pos += piece.len() as u64;
                        return Poll::Ready(Ok(piece));
                    }
                    let err = match ready!(pieces.poll_next_unpin(cx)) {
                        Some(Ok(piece)) => match verifier.push(piece) {
                            Ok(released) => {
                                ready.extend(released.into_iter().filter(|b| !b.is_empty()));
                                continue;
                            }
                            Err(e) => {
                                tracing::warn!(blob = %self.outboard.blob(), error = %e, "stream does not match the outboard");
                                Error::from(e).into_io()
                            }
                        },
                        Some(Err(e)) => e.into_io(),
                        None if self.pos >= self.outboard.size() => {
                            self.state = State::Idle(None);
                            return Poll::Ready(Ok(Bytes::new()));
                        }
                        None => {
                            let received = verifier.position();
                            self.ended_early(received)
                        }
                    };
                    return Poll::Ready(Err(self.failed(err)));
                }
                State::Chunked => {
                    let piece = ready!(self.chunked.poll_piece(cx, scratch, max))?;
                    self.pos += piece.len() as u64;
                    return Poll::Ready(Ok(piece));
                }
            }
        }
    }
}

impl<C: ChunkSource> AsyncRead for StreamedReader<C> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        poll_read_by_piece(self.get_mut(), cx, buf)
    }
}

impl<C: ChunkSource> AsyncSeek for StreamedReader<C> {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        let this = self.get_mut();
        let target = seek_target(position, this.pos, this.len())?;
        if target == this.pos {
            return Ok(());
        }
        this.pos = target;
        this.hand_over()
    }

    fn poll_complete(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Poll::Ready(Ok(self.pos))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncSeekExt};

    use super::*;
    use crate::blobservice::ChunkMeta;
    use crate::digest::B3Digest;
    use crate::verify::{OutboardHasher, STORED_SHIFT};

    /// Chunks from memory, counting the fetches.
    struct Chunks {
        data: Bytes,
        offsets: Vec<(ChunkMeta, usize)>,
        fetches: AtomicUsize,
    }

    impl ChunkSource for Chunks {
        fn fetch(&self, _blob: B3Digest, chunk: ChunkMeta) -> BoxFuture<'static, Result<Bytes>> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            let at = self
                .offsets
                .iter()
                .find(|(c, _)| *c == chunk)
                .map(|(_, at)| *at);
            let data = self.data.clone();
            Box::pin(async move {
                let at = at.expect("a listed chunk");
                Ok(data.slice(at..at + chunk.size as usize))
            })
        }
    }

    struct Fixture {
        data: Bytes,
        outboard: Outboard,
        chunks: Arc<Chunks>,
        opened: Arc<AtomicUsize>,
    }

    fn fixture() -> Fixture {
        let data: Bytes = (0..3_000_000u32).map(|i| (i * 31 % 253) as u8).collect();
        let mut hasher = OutboardHasher::new(STORED_SHIFT);
        hasher.update(&data);
        let (_, outboard) = hasher.finalize();
        let mut offsets = Vec::new();
        let mut at = 0;
        for size in [700_000, 1_000_000, 300_000, 1_000_000] {
            let chunk = &data[at..at + size];
            offsets.push((
                ChunkMeta {
                    digest: B3Digest::of(chunk),
                    size: size as u64,
                },
                at,
            ));
            at += size;
        }
        Fixture {
            chunks: Arc::new(Chunks {
                data: data.clone(),
                offsets,
                fetches: AtomicUsize::new(0),
            }),
            data,
            outboard,
            opened: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A reader whose stream sends `sent` in 100,000-byte pieces.
    fn reader(f: &Fixture, sent: Bytes) -> StreamedReader<Chunks> {
        let opened = f.opened.clone();
        let open: OpenStream = Box::new(move || {
            opened.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                let pieces: Vec<Result<Bytes>> = (0..sent.len())
                    .step_by(100_000)
                    .map(|i| Ok(sent.slice(i..(i + 100_000).min(sent.len()))))
                    .collect();
                Ok(futures::stream::iter(pieces).boxed())
            })
        });
        let chunked = ChunkedReader::new(
            *f.outboard.blob(),
            f.chunks.offsets.iter().map(|(c, _)| *c).collect(),
            f.chunks.clone(),
            4,
            Some(f.outboard.clone()),
        );
        StreamedReader::new(f.outboard.clone(), open, chunked)
    }

    #[tokio::test]
    async fn a_read_from_the_start_is_one_stream() {
        let f = fixture();
        let mut r = reader(&f, f.data.clone());
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert!(got == f.data);
        assert_eq!(f.opened.load(Ordering::SeqCst), 1);
        assert_eq!(f.chunks.fetches.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_seek_goes_chunk_by_chunk() {
        let f = fixture();
        let mut r = reader(&f, f.data.clone());
        r.seek(SeekFrom::Start(1_800_000)).await.unwrap();
        let mut got = vec![0; 50_000];
        r.read_exact(&mut got).await.unwrap();
        assert!(got[..] == f.data[1_800_000..1_850_000]);
        assert_eq!(f.opened.load(Ordering::SeqCst), 0, "the stream was opened");
        assert_eq!(f.chunks.fetches.load(Ordering::SeqCst), 1);

        // Part-way through the stream, a seek hands over too.
        let f = fixture();
        let mut r = reader(&f, f.data.clone());
        let mut head = vec![0; 200_000];
        r.read_exact(&mut head).await.unwrap();
        r.seek(SeekFrom::Start(2_500_000)).await.unwrap();
        let mut tail = Vec::new();
        r.read_to_end(&mut tail).await.unwrap();
        assert!(head[..] == f.data[..200_000]);
        assert!(tail[..] == f.data[2_500_000..]);
        assert_eq!(f.opened.load(Ordering::SeqCst), 1);
        assert_eq!(f.chunks.fetches.load(Ordering::SeqCst), 1);
    }

    /// Reads `r` until it fails: the bytes it handed out, and the error.
    async fn read_to_error(r: &mut StreamedReader<Chunks>, what: &str) -> (Vec<u8>, io::Error) {
        let mut got = Vec::new();
        let mut buf = vec![0; 64 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) => panic!("{what}: the stream read to its end"),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return (got, e),
            }
        }
    }

    #[tokio::test]
    async fn a_lying_or_short_stream_fails_after_only_proven_bytes() {
        let f = fixture();
        let mut flipped = f.data.to_vec();
        flipped[1_000_000] ^= 1;
        let group = 16 * 1024;
        for (sent, what) in [
            (Bytes::from(flipped), "flipped"),
            (f.data.slice(..2_000_000), "short"),
        ] {
            let mut r = reader(&f, sent);
            let (mut got, err) = read_to_error(&mut r, what).await;
            assert!(got[..] == f.data[..got.len()], "{what}: unproven bytes");
            let proven = got.len();
            if what == "flipped" {
                assert_eq!(proven, 1_000_000 / group * group, "{what}");
                assert!(err.to_string().contains("offset 999424"), "{what}: {err}");
            } else {
                assert_eq!(proven, 2_000_000 / group * group, "{what}");
                assert!(err.to_string().contains("2000000"), "{what}: {err}");
            }
            // Read again after the error, the rest comes chunk by chunk.
            r.read_to_end(&mut got).await.unwrap();
            assert!(got == f.data, "{what}: the read did not carry on");
        }
    }

    #[tokio::test]
    async fn bytes_past_the_end_fail_the_read_after_the_proven_blob() {
        let f = fixture();
        let mut sent = f.data.to_vec();
        sent.extend_from_slice(b"trailing");
        let mut r = reader(&f, Bytes::from(sent));
        let (got, err) = read_to_error(&mut r, "overrun").await;
        assert!(got == f.data, "the proven blob was not handed out whole");
        assert!(err.to_string().contains("3000008"), "{err}");
        // The read is over: tried again, it ends without another fetch.
        assert_eq!(r.read(&mut [0; 16]).await.unwrap(), 0);
        assert_eq!(f.chunks.fetches.load(Ordering::SeqCst), 0);
    }
}
