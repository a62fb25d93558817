//! [`BlobCheck`]: proves that a run of bytes is a whole blob, and hands out
//! a [`BlobProof`] that lets a writer publish it without hashing it again.

use bytes::Bytes;

use super::{GroupVerifier, Outboard, StreamVerifier};
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

    /// Whether bytes are checked as they arrive (against an outboard), so
    /// those [`push`](Self::push) returns may be released before the end.
    pub fn streams(&self) -> bool {
        matches!(self.how, How::Groups(..))
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
        };
        Ok(BlobProof {
            digest: self.digest,
            size: outboard.size(),
            outboard,
        })
    }
}

/// Evidence that the bytes fed to a [`BlobCheck`] are blob
/// [`digest`](Self::digest): only [`BlobCheck::finish`] makes one. A writer
/// that was handed those same bytes may publish them under this digest, with
/// this outboard, without hashing them itself.
#[derive(Debug, Clone)]
pub struct BlobProof {
    digest: B3Digest,
    size: u64,
    outboard: Outboard,
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

    /// Its outboard (the one checked against, or the one computed).
    pub fn outboard(&self) -> &Outboard {
        &self.outboard
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
            assert_eq!(proof.outboard(), &outboard);
        }
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
