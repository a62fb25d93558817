//! [`BlobReader`] and the simplest implementation of it.

use std::io::{self, Cursor, SeekFrom};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
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
