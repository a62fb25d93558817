//! [`BlobIndex`] and its stored form: a protobuf `StatBlobResponse` listing
//! the chunks, as snix's objectstore blob service writes it, plus the blob's
//! outboard in the `bao` and `bao_shift` fields (which snix ignores).

use bytes::Bytes;
use prost::Message;

use crate::blobservice::ChunkMeta;
use crate::digest::B3Digest;
use crate::error::{Error, Result};
use crate::proto::snix::{StatBlobResponse, stat_blob_response};
use crate::verify::Outboard;

/// The chunk list of a blob made of two or more chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobIndex {
    /// Length of the blob in bytes (the sum of the chunk sizes).
    pub size: u64,
    /// The chunks, in order.
    pub chunks: Vec<ChunkMeta>,
    /// The blob's outboard as stored: its shift and bytes. Not yet checked
    /// against anything; indexes written by other tools have none.
    pub bao: Option<(u8, Bytes)>,
}

impl BlobIndex {
    /// Builds an index from its chunk list and the blob's outboard.
    pub fn new(chunks: Vec<ChunkMeta>, outboard: Option<&Outboard>) -> Self {
        BlobIndex {
            size: chunks.iter().map(|c| c.size).sum(),
            chunks,
            bao: outboard.map(|ob| (ob.shift(), ob.data().clone())),
        }
    }

    /// The stored outboard of blob `blob`, checked: fully (its tree hashes
    /// to the digest) unless `trusted`, in which case only its shape is.
    /// `None` if the index has none or it is unusable (logged).
    pub fn outboard(&self, blob: &B3Digest, trusted: bool) -> Option<Outboard> {
        let (shift, data) = self.bao.clone()?;
        let checked = if trusted {
            Outboard::trusted(*blob, self.size, shift, data)
        } else {
            Outboard::verify(*blob, self.size, shift, data)
        };
        checked
            .inspect_err(|e| tracing::warn!(%blob, error = %e, "ignoring the stored outboard"))
            .ok()
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
            size: self.size,
            bao: self
                .bao
                .as_ref()
                .map(|(_, d)| d.clone())
                .unwrap_or_default(),
            bao_shift: self.bao.as_ref().map_or(0, |(s, _)| u32::from(*s)),
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
        if msg.size != 0 && msg.size != size {
            return Err(corrupt(format!(
                "says {} bytes, its chunks add up to {size}",
                msg.size
            )));
        }
        let bao = match u8::try_from(msg.bao_shift) {
            _ if msg.bao.is_empty() => None,
            Ok(shift) => Some((shift, msg.bao)),
            Err(_) => return Err(corrupt(format!("bao_shift {}", msg.bao_shift))),
        };
        Ok(BlobIndex { size, chunks, bao })
    }
}
