//! [`Spool`]: where a blob waits while it is verified.

use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;

use futures::StreamExt;
use futures::stream::BoxStream;

use super::{BlobReader, BufferedReader, Pieces, SpooledReader};
use crate::error::{Error, Result};

/// Blobs up to this size are spooled in memory; larger ones go to a
/// temporary file, so memory stays bounded whatever the blob size.
pub const SPOOL_IN_MEMORY: usize = 4 * 1024 * 1024;

/// Holds a blob being verified: in memory while small, then in a temporary file.
pub struct Spool(Inner);

enum Inner {
    Memory {
        buf: BytesMut,
        dir: Option<PathBuf>,
    },
    File {
        file: tokio::io::BufWriter<tokio::fs::File>,
        path: tempfile::TempPath,
        len: u64,
    },
}

impl Spool {
    /// An empty spool; large blobs go to a temporary file in `dir` (default:
    /// the system temporary directory).
    pub fn new(dir: Option<PathBuf>, expected_len: Option<u64>) -> Self {
        let capacity = expected_len.map_or(0, |l| l.min(SPOOL_IN_MEMORY as u64) as usize);
        Spool(Inner::Memory {
            buf: BytesMut::with_capacity(capacity),
            dir,
        })
    }

    /// Appends verified-so-far bytes.
    pub async fn push(&mut self, data: Bytes) -> Result<()> {
        match &mut self.0 {
            Inner::Memory { buf, dir } => {
                if buf.len() + data.len() <= SPOOL_IN_MEMORY {
                    buf.extend_from_slice(&data);
                    return Ok(());
                }
                let named = match dir {
                    Some(dir) => tempfile::NamedTempFile::new_in(dir)?,
                    None => tempfile::NamedTempFile::new()?,
                };
                let (file, path) = named.into_parts();
                let mut file = tokio::io::BufWriter::with_capacity(
                    1024 * 1024,
                    tokio::fs::File::from_std(file),
                );
                file.write_all(buf).await?;
                file.write_all(&data).await?;
                let len = (buf.len() + data.len()) as u64;
                self.0 = Inner::File { file, path, len };
            }
            Inner::File { file, len, .. } => {
                file.write_all(&data).await?;
                *len += data.len() as u64;
            }
        }
        Ok(())
    }

    /// A reader over everything pushed. Call only once the blob verified.
    pub async fn into_reader(self) -> Result<Box<dyn BlobReader>> {
        self.into_shared().await?.open().await
    }

    /// Finishes the spool so it can be read any number of times.
    pub async fn into_shared(self) -> Result<SharedSpool> {
        Ok(match self.0 {
            Inner::Memory { buf, .. } => SharedSpool::Memory(buf.freeze()),
            Inner::File {
                mut file,
                path,
                len,
            } => {
                file.flush().await?;
                SharedSpool::File {
                    path: Arc::new(path),
                    len,
                }
            }
        })
    }
}

/// A finished, verified spool that several readers can open: the client's
/// reader and a background fill, for instance. A spool file is deleted when
/// the last holder is dropped.
#[derive(Clone)]
pub enum SharedSpool {
    /// A small blob, in memory.
    Memory(Bytes),
    /// A larger blob, in a temporary file.
    File {
        /// The file (deleted on drop of the last holder).
        path: Arc<tempfile::TempPath>,
        /// Its length.
        len: u64,
    },
}

impl SharedSpool {
    /// Length of the spooled blob.
    pub fn len(&self) -> u64 {
        match self {
            SharedSpool::Memory(b) => b.len() as u64,
            SharedSpool::File { len, .. } => *len,
        }
    }

    /// Whether the spooled blob is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The blob from the start as a stream of pieces: a blob in memory as
    /// one piece (which consumers can slice without copying), a file in
    /// pieces of up to `max` bytes.
    pub async fn pieces(&self, max: usize) -> Result<BoxStream<'static, Result<Bytes>>> {
        Ok(match self {
            SharedSpool::Memory(b) => {
                futures::stream::once(std::future::ready(Ok(b.clone()))).boxed()
            }
            SharedSpool::File { .. } => Pieces::new(self.open().await?, max)
                .map(|piece| piece.map_err(Error::from_io))
                .boxed(),
        })
    }

    /// A new reader from the start of the blob.
    pub async fn open(&self) -> Result<Box<dyn BlobReader>> {
        Ok(match self {
            SharedSpool::Memory(b) => Box::new(BufferedReader::new(b.clone())),
            SharedSpool::File { path, len } => {
                let file = tokio::fs::File::open(path.as_ref() as &std::path::Path).await?;
                Box::new(SpooledReader::new(file, path.clone(), *len))
            }
        })
    }
}
