//! [`BlobCheck`]: proves that a run of bytes is a whole blob, and hands out
//! a [`BlobProof`] that lets a writer publish it without hashing it again.
//! A chunk that a tier's `read_chunk` returned is already verified, and
//! gets its proof without a second pass ([`BlobCheck::read_chunk`]).

use bytes::Bytes;

use super::{GroupVerifier, Outboard, StreamVerifier};
use crate::blobservice::ChunkMeta;
use crate::digest::B3Digest;
use crate::error::VerifyError;

/// Checks a blob arriving in order from its first byte, in pieces of any
/// size: group by group against its outboard when one is known (a lie stops
/// at its first bad group, and verified bytes can be released at once), else
/// by hashing it all (nothing may be released before
/// [`finish`](Self::finish)), which also computes its outboard.
pub struct BlobCheck {
    digest: B3Digest,
    how: How,
}

enum How {
    Groups(GroupVerifier, Outboard),
    Hash(Box<StreamVerifier>),
    /// The one piece a `read_chunk` of this chunk returned, verified by it.
    ReadChunk {
        chunk: ChunkMeta,
        pushed: bool,
    },
}

impl BlobCheck {
    /// Expects blob `digest`, of `size` bytes if known, with its `outboard`
    /// if known (already checked against `digest`, as [`Outboard::verify`]
    /// does).
    pub fn new(digest: B3Digest, size: Option<u64>, outboard: Option<Outboard>) -> Self {
        let how = match outboard {
            Some(ob) if ob.blob() == &digest && size.is_none_or(|s| s == ob.size()) => {
                How::Groups(GroupVerifier::new(ob.clone(), 0), ob)
            }
            _ => How::Hash(Box::new(StreamVerifier::new(digest, size))),
        };
        BlobCheck { digest, how }
    }

    /// Expects the bytes of `chunk` as the one piece that
    /// [`BlobService::read_chunk`] returned for it. That method's contract
    /// is to return only bytes verified against the chunk's digest and
    /// length, so hashing them again here could only catch a memory fault:
    /// only the length is checked, as for any chunk kept since its check
    /// ([`super::check_kept_chunk`]), and a second piece is refused, since the
    /// read vouched for one. The proof carries no outboard: a blob of one
    /// chunk is stored without one.
    ///
    /// Before this, a cold chunk read through the `tiers` engine was
    /// hashed twice in the sidecar: by the tier that fetched it, and for
    /// the proof its fill needs.
    ///
    /// [`BlobService::read_chunk`]: crate::blobservice::BlobService::read_chunk
    pub fn read_chunk(chunk: ChunkMeta) -> Self {
        BlobCheck {
            digest: chunk.digest,
            how: How::ReadChunk {
                chunk,
                pushed: false,
            },
        }
    }

    /// Whether bytes are checked as they arrive (against an outboard, or
    /// by the read that returned them), so those [`push`](Self::push)
    /// returns may be released before the end.
    pub fn streams(&self) -> bool {
        matches!(self.how, How::Groups(..) | How::ReadChunk { .. })
    }

    /// Feeds the next piece. With an outboard, returns the bytes whose
    /// groups are now complete and matched (in order); without one, returns
    /// nothing: the blob is proven only at the end.
    pub fn push(&mut self, piece: Bytes) -> Result<Vec<Bytes>, VerifyError> {
        match &mut self.how {
            How::Groups(groups, _) => groups.push(piece),
            How::Hash(hasher) => {
                hasher.update(&piece)?;
                Ok(Vec::new())
            }
            How::ReadChunk { chunk, pushed } => {
                let before = if *pushed { chunk.size } else { 0 };
                if before > 0 || piece.len() as u64 != chunk.size {
                    return Err(VerifyError::LengthMismatch {
                        what: "chunk",
                        expected: chunk.digest,
                        expected_len: chunk.size,
                        actual_len: before + piece.len() as u64,
                    });
                }
                *pushed = true;
                Ok(vec![piece])
            }
        }
    }

    /// Checks that everything arrived and matched.
    pub fn finish(self) -> Result<BlobProof, VerifyError> {
        let outboard = match self.how {
            How::Groups(groups, outboard) => {
                groups.finish()?;
                outboard
            }
            How::Hash(hasher) => hasher.finish()?,
            How::ReadChunk { chunk, pushed } => {
                if !pushed {
                    return Err(VerifyError::LengthMismatch {
                        what: "chunk",
                        expected: chunk.digest,
                        expected_len: chunk.size,
                        actual_len: 0,
                    });
                }
                return Ok(BlobProof {
                    digest: chunk.digest,
                    size: chunk.size,
                    outboard: None,
                });
            }
        };
        Ok(BlobProof {
            digest: self.digest,
            size: outboard.size(),
            outboard: Some(outboard),
        })
    }
}

/// Evidence that the bytes fed to a [`BlobCheck`] are blob
/// [`digest`](Self::digest): only [`BlobCheck::finish`] makes one. A
/// writer that was handed those same bytes may publish them under this
/// digest, with this outboard, without hashing them itself.
#[derive(Debug, Clone)]
pub struct BlobProof {
    digest: B3Digest,
    size: u64,
    /// `None` for a chunk proven by its read, which is stored as a blob of
    /// one chunk: without an outboard.
    outboard: Option<Outboard>,
}

impl BlobProof {
    /// The blob the bytes proved to be.
    pub fn digest(&self) -> &B3Digest {
        &self.digest
    }

    /// Its length.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Its outboard (the one checked against, or the one computed); `None`
    /// for a chunk proven by its read.
    pub fn outboard(&self) -> Option<&Outboard> {
        self.outboard.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::pseudo_random;
    use crate::verify::bao::outboard_of;

    fn feed(check: &mut BlobCheck, data: &[u8]) -> Result<usize, VerifyError> {
        let mut released = 0;
        for piece in data.chunks(100_000) {
            released += check
                .push(Bytes::copy_from_slice(piece))?
                .iter()
                .map(Bytes::len)
                .sum::<usize>();
        }
        Ok(released)
    }

    #[test]
    fn proves_with_and_without_an_outboard() {
        let data = pseudo_random(1_000_000, 5);
        let (digest, outboard) = outboard_of(&data, 4);
        for known in [Some(outboard.clone()), None] {
            let mut check = BlobCheck::new(digest, Some(data.len() as u64), known.clone());
            assert_eq!(check.streams(), known.is_some());
            let released = feed(&mut check, &data).unwrap();
            assert_eq!(released, if known.is_some() { data.len() } else { 0 });
            let proof = check.finish().unwrap();
            assert_eq!(proof.digest(), &digest);
            assert_eq!(proof.size(), data.len() as u64);
            assert_eq!(proof.outboard(), Some(&outboard));
        }
    }

    #[test]
    fn a_read_chunk_is_proven_by_its_length_without_an_outboard() {
        let data = Bytes::from(pseudo_random(300_000, 7));
        let chunk = ChunkMeta {
            digest: B3Digest::of(&data),
            size: data.len() as u64,
        };
        let mut check = BlobCheck::read_chunk(chunk);
        assert!(check.streams());
        assert_eq!(check.push(data.clone()).unwrap(), vec![data.clone()]);
        let proof = check.finish().unwrap();
        assert_eq!(proof.digest(), &chunk.digest);
        assert_eq!(proof.size(), chunk.size);
        assert!(proof.outboard().is_none());

        // One piece of the listed length, once: a read vouched for no more.
        let short = BlobCheck::read_chunk(chunk).push(data.slice(1..));
        assert!(matches!(short, Err(VerifyError::LengthMismatch { .. })));
        let mut twice = BlobCheck::read_chunk(chunk);
        twice.push(data.clone()).unwrap();
        assert!(twice.push(Bytes::new()).is_err());
        assert!(BlobCheck::read_chunk(chunk).finish().is_err());
    }

    #[test]
    fn no_proof_for_other_bytes_or_a_short_run() {
        let data = pseudo_random(300_000, 6);
        let (digest, outboard) = outboard_of(&data, 4);
        let mut bad = data.clone();
        bad[200_000] ^= 1;
        for known in [Some(outboard.clone()), None] {
            let mut check = BlobCheck::new(digest, Some(data.len() as u64), known.clone());
            let fed = feed(&mut check, &bad);
            assert!(fed.is_err() || check.finish().is_err());

            let mut check = BlobCheck::new(digest, Some(data.len() as u64), known);
            feed(&mut check, &data[..299_999]).unwrap();
            assert!(check.finish().is_err());
        }
    }
}
