//! [`GroupVerifier`]: checks a contiguous run of a blob's bytes against the
//! blob's outboard, one group at a time, whatever the sizes of the pieces it
//! arrives in.

use bytes::{Bytes, BytesMut};

use super::bao::Outboard;
use crate::error::VerifyError;

/// Checks bytes of a blob, fed in order from the start of some group, against
/// the blob's [`Outboard`], and hands back each group only once it matched.
///
/// Physical chunks rarely end on group boundaries: the bytes of a group that
/// straddles two chunks are held until the next chunk completes it (the
/// "edge group" of the chunking notes). Whole groups inside a piece are
/// checked in place and returned without copying.
pub struct GroupVerifier {
    outboard: Outboard,
    /// Index of the group being assembled (or next to start).
    group: u64,
    /// Offset of the next byte to be fed.
    pos: u64,
    /// Start of the current group, when it straddles pieces.
    partial: BytesMut,
}

impl GroupVerifier {
    /// Expects bytes starting at group `first_group`.
    pub fn new(outboard: Outboard, first_group: u64) -> Self {
        let pos = (first_group * outboard.group_len()).min(outboard.size());
        GroupVerifier {
            outboard,
            group: first_group,
            pos,
            partial: BytesMut::new(),
        }
    }

    /// The offset the next fed byte belongs at.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The offset of the first byte not yet handed back.
    pub fn verified_up_to(&self) -> u64 {
        self.pos - self.partial.len() as u64
    }

    fn group_len_at(&self, index: u64) -> usize {
        let r = self.outboard.group_range(index);
        (r.end - r.start) as usize
    }

    /// Feeds the next bytes. Returns the bytes that completed their groups
    /// and matched, in order (they start at the previous
    /// [`verified_up_to`](Self::verified_up_to)). Fails at the first group
    /// that does not match, or when more bytes arrive than the blob has.
    pub fn push(&mut self, mut data: Bytes) -> Result<Vec<Bytes>, VerifyError> {
        let size = self.outboard.size();
        let end = self.pos.saturating_add(data.len() as u64);
        if end > size {
            return Err(VerifyError::LengthMismatch {
                what: "blob",
                expected: *self.outboard.blob(),
                expected_len: size,
                actual_len: end,
            });
        }
        self.pos = end;
        let mut out = Vec::with_capacity(2);
        if !self.partial.is_empty() {
            let need = self.group_len_at(self.group) - self.partial.len();
            let take = need.min(data.len());
            self.partial.extend_from_slice(&data.split_to(take));
            if take < need {
                return Ok(out);
            }
            self.outboard.check_group(self.group, &self.partial)?;
            out.push(self.partial.split().freeze());
            self.group += 1;
        }
        let mut run = 0;
        while self.group < self.outboard.group_count() {
            let len = self.group_len_at(self.group);
            if len == 0 || data.len() - run < len {
                break;
            }
            self.outboard
                .check_group(self.group, &data[run..run + len])?;
            run += len;
            self.group += 1;
        }
        if run > 0 {
            out.push(data.split_to(run));
        }
        self.partial.extend_from_slice(&data);
        Ok(out)
    }

    /// Checks that the run ended at the end of the blob with every group
    /// complete and matching (for the empty blob: that it is the empty blob).
    pub fn finish(self) -> Result<(), VerifyError> {
        let size = self.outboard.size();
        if self.pos != size || !self.partial.is_empty() {
            return Err(VerifyError::LengthMismatch {
                what: "blob",
                expected: *self.outboard.blob(),
                expected_len: size,
                actual_len: self.pos,
            });
        }
        if size == 0 {
            self.outboard.check_group(0, &[])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::pseudo_random;
    use crate::verify::bao::outboard_of;

    fn feed(v: &mut GroupVerifier, data: &[u8], piece: usize) -> Result<Vec<u8>, VerifyError> {
        let mut out = Vec::new();
        for p in data.chunks(piece) {
            for b in v.push(Bytes::copy_from_slice(p))? {
                out.extend_from_slice(&b);
            }
        }
        Ok(out)
    }

    #[test]
    fn releases_exactly_the_blob_in_any_piece_size() {
        let data = pseudo_random(200_000, 1);
        let ob = outboard_of(&data, 4).1;
        for piece in [1, 999, 16 * 1024, 50_000, 200_000] {
            let mut v = GroupVerifier::new(ob.clone(), 0);
            let out = feed(&mut v, &data, piece).unwrap();
            assert_eq!(out, data, "pieces of {piece}");
            v.finish().unwrap();
        }
    }

    #[test]
    fn releases_nothing_of_a_bad_group_and_stops_there() {
        let data = pseudo_random(100_000, 2);
        let ob = outboard_of(&data, 4).1;
        let mut bad = data.clone();
        bad[40_000] ^= 1; // group 2 (32768..49152)
        let mut v = GroupVerifier::new(ob, 0);
        let mut released = 0;
        let mut failed_at = None;
        for (i, p) in bad.chunks(10_000).enumerate() {
            match v.push(Bytes::copy_from_slice(p)) {
                Ok(out) => released += out.iter().map(Bytes::len).sum::<usize>(),
                Err(e) => {
                    assert!(matches!(
                        e,
                        VerifyError::GroupMismatch { offset: 32768, .. }
                    ));
                    failed_at = Some(i);
                    break;
                }
            }
        }
        assert_eq!(released, 32768);
        // Detected as soon as group 2 was complete, in the fifth piece.
        assert_eq!(failed_at, Some(4));
    }

    #[test]
    fn starts_mid_blob_and_rejects_overrun_and_truncation() {
        let data = pseudo_random(70_000, 3);
        let ob = outboard_of(&data, 4).1;
        let mut v = GroupVerifier::new(ob.clone(), 2);
        assert_eq!(v.position(), 32768);
        let out = feed(&mut v, &data[32768..], 7000).unwrap();
        assert_eq!(out, &data[32768..]);
        assert!(v.push(Bytes::from_static(b"x")).is_err());

        let mut v = GroupVerifier::new(ob, 0);
        feed(&mut v, &data[..69_999], 7000).unwrap();
        assert!(v.finish().is_err());
    }

    #[test]
    fn empty_blob() {
        let ob = outboard_of(b"", 4).1;
        let v = GroupVerifier::new(ob, 0);
        v.finish().unwrap();
    }
}
