//! [`BlobIndex`] and its stored form: a protobuf `StatBlobResponse` listing
//! the chunks, as snix's objectstore blob service writes it.

use bytes::Bytes;
use prost::Message;

use crate::blobservice::ChunkMeta;
use crate::digest::B3Digest;
use crate::error::{Error, Result};
use crate::proto::snix::{StatBlobResponse, stat_blob_response};

/// The chunk list of a blob made of two or more chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobIndex {
    /// Length of the blob in bytes (the sum of the chunk sizes).
    pub size: u64,
    /// The chunks, in order.
    pub chunks: Vec<ChunkMeta>,
}

impl BlobIndex {
    /// Builds an index from its chunk list.
    pub fn new(chunks: Vec<ChunkMeta>) -> Self {
        BlobIndex {
            size: chunks.iter().map(|c| c.size).sum(),
            chunks,
        }
    }

    /// The stored form: a protobuf `StatBlobResponse` with `chunks` set.
    pub fn encode(&self) -> Bytes {
        StatBlobResponse {
            chunks: self
                .chunks
                .iter()
                .map(|c| stat_blob_response::ChunkMeta {
                    digest: c.digest.into(),
                    size: c.size,
                })
                .collect(),
            ..Default::default()
        }
        .encode_to_vec()
        .into()
    }

    /// Parses the stored form. `blob` names the blob in errors.
    pub fn decode(blob: &B3Digest, data: &[u8]) -> Result<Self> {
        let corrupt = |why: String| Error::Corrupt(format!("blob index of {blob}: {why}"));
        let msg = StatBlobResponse::decode(data).map_err(|e| corrupt(e.to_string()))?;
        if msg.chunks.is_empty() {
            return Err(corrupt("lists no chunks".into()));
        }
        let chunks = msg
            .chunks
            .iter()
            .map(|c| {
                Ok(ChunkMeta {
                    digest: B3Digest::try_from(&c.digest)
                        .map_err(|e| corrupt(format!("chunk digest: {e}")))?,
                    size: c.size,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut size = 0u64;
        for c in &chunks {
            size = size
                .checked_add(c.size)
                .ok_or_else(|| corrupt("chunk sizes overflow".into()))?;
        }
        Ok(BlobIndex { size, chunks })
    }
}
