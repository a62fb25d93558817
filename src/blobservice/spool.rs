//! [`Spool`]: where a blob waits while it is verified.

use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use super::{BlobReader, BufferedReader, SpooledReader};
use crate::error::Result;

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
        Ok(match self.0 {
            Inner::Memory { buf, .. } => Box::new(BufferedReader::new(buf.freeze())),
            Inner::File {
                mut file,
                path,
                len,
            } => {
                file.flush().await?;
                let mut file = file.into_inner();
                file.seek(std::io::SeekFrom::Start(0)).await?;
                Box::new(SpooledReader::new(file, path, len))
            }
        })
    }
}
