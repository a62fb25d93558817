//! [`BlobIndex`] and its stored form: a protobuf `StatBlobResponse` listing
//! the chunks, as snix's objectstore blob service writes it, plus the blob's
//! outboard in the `bao` and `bao_shift` fields (which snix ignores).

use bytes::Bytes;
use prost::Message;

use crate::blobservice::{ChunkMeta, LARGEST_CHUNK};
use crate::digest::B3Digest;
use crate::error::{Error, Result};
use crate::proto::snix::{StatBlobResponse, stat_blob_response};
use crate::verify::Outboard;
use crate::verify::bao::MAX_VERIFY_SHIFT;

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
    /// An untrusted one coarser than [`MAX_VERIFY_SHIFT`] is unusable: a
    /// reader holds a whole group back until it is proven, and the stored
    /// shift would set that group's size.
    pub fn outboard(&self, blob: &B3Digest, trusted: bool) -> Option<Outboard> {
        let (shift, data) = self.bao.clone()?;
        if !trusted && shift > MAX_VERIFY_SHIFT {
            tracing::warn!(%blob, shift, "ignoring the stored outboard: too coarse to stream with");
            return None;
        }
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
        BlobIndex::decode_shared(blob, Bytes::copy_from_slice(data))
    }

    /// Like [`BlobIndex::decode`], without copying: the outboard is a view
    /// of `data`, and the chunk digests are read in place.
    pub fn decode_shared(blob: &B3Digest, data: Bytes) -> Result<Self> {
        BlobIndex::decode_stated(blob, data, false)
    }

    /// Like [`BlobIndex::decode_shared`], for an index strata wrote, which
    /// always states the blob's size: one that does not was cut short. A
    /// cut at a chunk's boundary still parses, and without the stated size
    /// to check the list against it would read as a shorter blob, each of
    /// its chunks sound.
    pub fn decode_written(blob: &B3Digest, data: Bytes) -> Result<Self> {
        BlobIndex::decode_stated(blob, data, true)
    }

    fn decode_stated(blob: &B3Digest, data: Bytes, size_stated: bool) -> Result<Self> {
        let msg = StatBlobResponse::decode(data).map_err(|e| corrupt(blob, e.to_string()))?;
        if size_stated && msg.size == 0 {
            return Err(corrupt(blob, "states no size: cut short".into()));
        }
        let (size, chunks) = checked_chunks(blob, &msg.chunks, msg.size)?;
        let bao = match u8::try_from(msg.bao_shift) {
            _ if msg.bao.is_empty() => None,
            Ok(shift) => Some((shift, msg.bao)),
            Err(_) => return Err(corrupt(blob, format!("bao_shift {}", msg.bao_shift))),
        };
        Ok(BlobIndex { size, chunks, bao })
    }
}

fn corrupt(blob: &B3Digest, why: String) -> Error {
    Error::Corrupt(format!("blob index of {blob}: {why}"))
}

/// The chunk list of a stored index, checked: at least one chunk, valid
/// digests, sizes that add up (to `stated`, when that is set).
fn checked_chunks(
    blob: &B3Digest,
    stored: &[stat_blob_response::ChunkMeta],
    stated: u64,
) -> Result<(u64, Vec<ChunkMeta>)> {
    if stored.is_empty() {
        return Err(corrupt(blob, "lists no chunks".into()));
    }
    let mut size = 0u64;
    let mut chunks = Vec::with_capacity(stored.len());
    for c in stored {
        let digest = B3Digest::try_from(&c.digest)
            .map_err(|e| corrupt(blob, format!("chunk digest: {e}")))?;
        if c.size > LARGEST_CHUNK {
            return Err(corrupt(
                blob,
                format!("lists a chunk of {} bytes, over {LARGEST_CHUNK}", c.size),
            ));
        }
        size = size
            .checked_add(c.size)
            .ok_or_else(|| corrupt(blob, "chunk sizes overflow".into()))?;
        chunks.push(ChunkMeta {
            digest,
            size: c.size,
        });
    }
    if stated != 0 && stated != size {
        return Err(corrupt(
            blob,
            format!("says {stated} bytes, its chunks add up to {size}"),
        ));
    }
    Ok((size, chunks))
}
