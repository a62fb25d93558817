//! [`SplitChunk`]: a chunk's bytes left in the pieces they arrived in.

use bytes::{Bytes, BytesMut};

use crate::digest::B3Digest;

/// A chunk as one or two pieces of the buffers it arrived in, in order.
///
/// A Put's chunks are cut straight out of the frames it arrives in, and a
/// chunk that straddles two frames is made of the end of one and the start
/// of the next. Joining them would copy the chunk; a store that copies it
/// anyway on its way out (the `disk` tier into its aligned write buffer)
/// takes the two pieces as they are ([`SplitChunk::parts`]), and any other
/// joins them once ([`SplitChunk::join`]).
#[derive(Debug, Clone, Default)]
pub struct SplitChunk {
    head: Bytes,
    /// Empty unless the chunk straddles two pieces.
    tail: Bytes,
}

impl SplitChunk {
    /// `head` followed by `tail`.
    pub fn new(head: Bytes, tail: Bytes) -> Self {
        if head.is_empty() {
            SplitChunk {
                head: tail,
                tail: Bytes::new(),
            }
        } else {
            SplitChunk { head, tail }
        }
    }

    /// The chunk's length.
    pub fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    /// Whether the chunk has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The chunk's bytes, in order: one or two slices.
    pub fn parts(&self) -> impl Iterator<Item = &[u8]> {
        [&self.head[..], &self.tail[..]]
            .into_iter()
            .filter(|part| !part.is_empty())
    }

    /// The chunk's digest.
    pub fn digest(&self) -> B3Digest {
        if self.tail.is_empty() {
            return B3Digest::of(&self.head);
        }
        let mut hasher = blake3::Hasher::new();
        for part in self.parts() {
            hasher.update(part);
        }
        B3Digest::from(hasher.finalize())
    }

    /// The chunk in one buffer: its only piece, or a copy of both.
    pub fn join(self) -> Bytes {
        if self.tail.is_empty() {
            return self.head;
        }
        let mut joined = BytesMut::with_capacity(self.len());
        joined.extend_from_slice(&self.head);
        joined.extend_from_slice(&self.tail);
        joined.freeze()
    }
}

impl From<Bytes> for SplitChunk {
    fn from(data: Bytes) -> Self {
        SplitChunk {
            head: data,
            tail: Bytes::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_chunk_is_the_same_chunk_as_its_pieces_joined() {
        let data = Bytes::from(crate::testkit::pseudo_random(300_000, 9));
        for at in [0, 1, 1024, 150_001, 299_999, 300_000] {
            let split = SplitChunk::new(data.slice(..at), data.slice(at..));
            assert_eq!(split.len(), data.len());
            assert_eq!(split.digest(), B3Digest::of(&data), "split at {at}");
            assert_eq!(
                split.parts().collect::<Vec<_>>().concat(),
                data,
                "split at {at}"
            );
            assert!(split.parts().all(|p| !p.is_empty()));
            assert_eq!(split.join(), data, "split at {at}");
        }
    }
}
