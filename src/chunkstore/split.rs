//! [`SplitChunk`]: a chunk's bytes left in the pieces they arrived in.

use bytes::{Bytes, BytesMut};

use crate::digest::B3Digest;

/// A chunk as slices of the buffers it arrived in, in order.
///
/// A Put's chunks are cut straight out of the frames it arrives in, and a
/// chunk that straddles frames is made of the end of one, the start of the
/// last, and any in between. Joining them would copy the chunk; a store
/// that copies it anyway on its way out (the `disk` tier, into its aligned
/// write buffer) takes the pieces as they are ([`SplitChunk::parts`]), and
/// any other joins them once ([`SplitChunk::join`]).
#[derive(Debug, Clone, Default)]
pub struct SplitChunk {
    /// None empty.
    pieces: Vec<Bytes>,
}

impl SplitChunk {
    /// The chunk made of `pieces`, one after the other.
    pub fn new(pieces: impl IntoIterator<Item = Bytes>) -> Self {
        SplitChunk {
            pieces: pieces.into_iter().filter(|p| !p.is_empty()).collect(),
        }
    }

    /// The chunk's length.
    pub fn len(&self) -> usize {
        self.pieces.iter().map(Bytes::len).sum()
    }

    /// Whether the chunk has no bytes.
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// The chunk's bytes, in order, none empty.
    pub fn parts(&self) -> impl Iterator<Item = &[u8]> {
        self.pieces.iter().map(|p| &p[..])
    }

    /// The chunk's digest.
    pub fn digest(&self) -> B3Digest {
        if let [only] = &self.pieces[..] {
            return B3Digest::of(only);
        }
        let mut hasher = blake3::Hasher::new();
        for part in self.parts() {
            hasher.update(part);
        }
        B3Digest::from(hasher.finalize())
    }

    /// The chunk in one buffer: its only piece, or a copy of them all.
    pub fn join(mut self) -> Bytes {
        match self.pieces.len() {
            0 => Bytes::new(),
            1 => self.pieces.swap_remove(0),
            _ => self.copied(),
        }
    }

    /// The chunk copied into an allocation of its own, whatever its
    /// pieces: for a store that keeps chunks in memory, where a slice of a
    /// frame would pin the whole frame.
    pub fn copied(&self) -> Bytes {
        let mut own = BytesMut::with_capacity(self.len());
        for part in &self.pieces {
            own.extend_from_slice(part);
        }
        own.freeze()
    }
}

impl From<Bytes> for SplitChunk {
    fn from(data: Bytes) -> Self {
        SplitChunk::new([data])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_chunk_is_the_same_chunk_as_its_pieces_joined() {
        let data = Bytes::from(crate::testkit::pseudo_random(300_000, 9));
        let cuts: [&[usize]; 6] = [
            &[],
            &[0],
            &[1024],
            &[1, 150_001, 150_001, 299_999],
            &[300_000],
            &[7, 70, 700, 7000, 70_000],
        ];
        for cuts in cuts {
            let mut bounds = vec![0];
            bounds.extend_from_slice(cuts);
            bounds.push(data.len());
            let split = SplitChunk::new(bounds.windows(2).map(|w| data.slice(w[0]..w[1])));
            assert_eq!(split.len(), data.len());
            assert_eq!(split.digest(), B3Digest::of(&data), "cut at {cuts:?}");
            assert_eq!(split.parts().collect::<Vec<_>>().concat(), data);
            assert!(split.parts().all(|p| !p.is_empty()));
            assert_eq!(split.copied(), data, "cut at {cuts:?}");
            assert_eq!(split.join(), data, "cut at {cuts:?}");
        }
        assert!(SplitChunk::new([Bytes::new()]).is_empty());
    }
}
