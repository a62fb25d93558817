//! [`BlobReader`] and the simplest implementation of it.

use std::io::{self, Cursor, SeekFrom};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{BufMut, Bytes, BytesMut};
use futures::Stream;
use tokio::io::{AsyncRead, AsyncSeek, ReadBuf};

/// A seekable stream over a blob's contents.
///
/// `len` is known up front: every service learns a blob's size before it
/// hands out a reader, and the server needs it for progress and limits.
pub trait BlobReader: AsyncRead + AsyncSeek + Send + Unpin {
    /// Length of the whole blob in bytes.
    fn len(&self) -> u64;

    /// Whether the blob is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next bytes from the current position, at most `max` (at least
    /// 1), as [`Bytes`]; empty at the end. Moves the position on like a
    /// read.
    ///
    /// This is how the server streams a blob. Readers that already hold
    /// the verified bytes in memory (a chunk, a fill's proven pieces) hand
    /// out slices of them, so a Read goes out without each byte being
    /// copied into a buffer first, in chunk-sized messages. The default
    /// reads into `scratch`, a buffer the caller keeps between calls.
    fn poll_piece(
        &mut self,
        cx: &mut Context<'_>,
        scratch: &mut BytesMut,
        max: usize,
    ) -> Poll<io::Result<Bytes>> {
        poll_read_piece(self, cx, scratch, max)
    }
}

/// [`BlobReader::poll_piece`] by an ordinary read into `scratch`.
pub fn poll_read_piece<R: AsyncRead + Unpin + ?Sized>(
    reader: &mut R,
    cx: &mut Context<'_>,
    scratch: &mut BytesMut,
    max: usize,
) -> Poll<io::Result<Bytes>> {
    scratch.clear();
    scratch.reserve(max);
    ready!(tokio_util::io::poll_read_buf(
        Pin::new(reader),
        cx,
        &mut (&mut *scratch).limit(max)
    ))?;
    Poll::Ready(Ok(scratch.split().freeze()))
}

/// [`AsyncRead::poll_read`] for a reader whose natural unit is a piece:
/// copies the next piece (at most what `buf` has room for) into `buf`.
pub fn poll_read_by_piece(
    reader: &mut dyn BlobReader,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    if buf.remaining() == 0 {
        return Poll::Ready(Ok(()));
    }
    // A piece reader hands out its own bytes; only one that wraps a plain
    // reader (a tap or failover reader over a spool) reads into this.
    let mut scratch = BytesMut::new();
    let piece = ready!(reader.poll_piece(cx, &mut scratch, buf.remaining()))?;
    buf.put_slice(&piece);
    Poll::Ready(Ok(()))
}

/// Where `position` points in a blob of `len` bytes read up to `pos`: the
/// target of a reader's `start_seek`. A target before the start is an
/// error; one past the end reads as the end.
pub fn seek_target(position: SeekFrom, pos: u64, len: u64) -> io::Result<u64> {
    match position {
        SeekFrom::Start(p) => Some(p),
        SeekFrom::End(d) => len.checked_add_signed(d),
        SeekFrom::Current(d) => pos.checked_add_signed(d),
    }
    .ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "seek to a negative or overflowing position",
        )
    })
}

/// A blob reader as a stream of its pieces ([`BlobReader::poll_piece`]),
/// each at most `max` bytes; an error ends it.
pub struct Pieces {
    reader: Option<Box<dyn BlobReader>>,
    scratch: BytesMut,
    max: usize,
}

impl Pieces {
    /// The pieces of `reader` from its current position.
    pub fn new(reader: Box<dyn BlobReader>, max: usize) -> Self {
        Pieces {
            reader: Some(reader),
            scratch: BytesMut::new(),
            max: max.max(1),
        }
    }
}

impl Stream for Pieces {
    type Item = io::Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let Some(reader) = &mut this.reader else {
            return Poll::Ready(None);
        };
        let piece = ready!(reader.poll_piece(cx, &mut this.scratch, this.max));
        match piece {
            Ok(piece) if !piece.is_empty() => Poll::Ready(Some(Ok(piece))),
            other => {
                this.reader = None;
                Poll::Ready(other.err().map(Err))
            }
        }
    }
}

/// A reader over bytes already in memory (and already verified).
pub struct BufferedReader(Cursor<Bytes>);

impl BufferedReader {
    /// Serves `data`.
    pub fn new(data: Bytes) -> Self {
        BufferedReader(Cursor::new(data))
    }
}

impl BlobReader for BufferedReader {
    fn len(&self) -> u64 {
        self.0.get_ref().len() as u64
    }

    /// A slice of the buffer, not a copy.
    fn poll_piece(
        &mut self,
        _cx: &mut Context<'_>,
        _scratch: &mut BytesMut,
        max: usize,
    ) -> Poll<io::Result<Bytes>> {
        let data = self.0.get_ref();
        let at = usize::try_from(self.0.position())
            .unwrap_or(usize::MAX)
            .min(data.len());
        let end = at + max.min(data.len() - at);
        let piece = data.slice(at..end);
        self.0.set_position(end as u64);
        Poll::Ready(Ok(piece))
    }
}

impl AsyncRead for BufferedReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncSeek for BufferedReader {
    fn start_seek(mut self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        Pin::new(&mut self.0).start_seek(position)
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Pin::new(&mut self.0).poll_complete(cx)
    }
}

/// A reader over a temporary file holding a verified blob; the file is
/// deleted when the last reader (or other holder of `path`) is dropped.
pub struct SpooledReader {
    file: tokio::fs::File,
    len: u64,
    // Keeps the file alive until the reader is dropped.
    _path: std::sync::Arc<tempfile::TempPath>,
}

impl SpooledReader {
    /// Serves `len` bytes from `file`, positioned at the start.
    pub fn new(file: tokio::fs::File, path: std::sync::Arc<tempfile::TempPath>, len: u64) -> Self {
        SpooledReader {
            file,
            len,
            _path: path,
        }
    }
}

impl BlobReader for SpooledReader {
    fn len(&self) -> u64 {
        self.len
    }
}

impl AsyncRead for SpooledReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_read(cx, buf)
    }
}

impl AsyncSeek for SpooledReader {
    fn start_seek(mut self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        Pin::new(&mut self.file).start_seek(position)
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Pin::new(&mut self.file).poll_complete(cx)
    }
}
