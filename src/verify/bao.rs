//! bao outboards: a blob's BLAKE3 hash tree above groups of `1 KiB << shift`
//! bytes, which lets any one group be checked against the blob digest on its
//! own.
//!
//! # Format
//!
//! BLAKE3 hashes 1 KiB blocks into a binary tree whose left subtrees are full
//! (a power of two blocks). Cutting the tree off `shift` levels above the
//! blocks leaves groups of `1 KiB << shift` bytes as leaves (the last group
//! may be short). The outboard lists, for every parent node in pre-order
//! (node, its left subtree, its right subtree), the chaining values of its two
//! children: 64 bytes per parent, `groups - 1` parents, no header. A blob of
//! one group has an empty outboard. At shift 0 these are the bytes of the
//! `bao` crate's outboard after its 8-byte length header, and at any shift
//! those of bao-tree's `PreOrderOutboard`.
//!
//! # Why by hand
//!
//! The tree is built and walked here with `blake3::hazmat` rather than with
//! bao-tree: strata needs the group chaining values themselves, to get a
//! blob's digest and outboard out of the one pass that also chunks it, and to
//! check physical chunks whose edges do not fall on group boundaries, while
//! bao-tree's API produces and consumes whole encoded streams. The tests pin
//! the bytes to the `bao` crate's.

use std::fmt;
use std::sync::Arc;

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};
use bytes::Bytes;

use crate::digest::B3Digest;
use crate::error::VerifyError;

/// BLAKE3's block ("chunk" in its spec) length: groups are `BLOCK_LEN << shift`.
pub const BLOCK_LEN: u64 = 1024;
/// The shift strata computes and stores outboards at: 16 KiB groups.
pub const STORED_SHIFT: u8 = 4;
/// The coarsest shift strata verifies streams with. Bytes are held back
/// until their whole group has arrived, so this bounds that memory (4 MiB).
pub const MAX_VERIFY_SHIFT: u8 = 12;
/// The coarsest shift this module handles at all (groups of 4 TiB).
pub const MAX_SHIFT: u8 = 32;
/// Bytes per parent node in an outboard.
const PAIR_LEN: usize = 64;

/// Length of a group at `shift`.
pub fn group_len(shift: u8) -> u64 {
    BLOCK_LEN << shift
}

/// Number of groups of a blob of `size` bytes at `shift` (the empty blob has
/// one, empty, group).
pub fn group_count(size: u64, shift: u8) -> u64 {
    size.div_ceil(group_len(shift)).max(1)
}

/// Length of the outboard of a blob of `size` bytes at `shift`.
pub fn outboard_len(size: u64, shift: u8) -> u64 {
    (group_count(size, shift) - 1) * PAIR_LEN as u64
}

/// The finest shift at or above `at_least` whose outboard for a blob of
/// `size` bytes takes at most `budget` bytes.
pub fn shift_within(size: u64, at_least: u8, budget: u64) -> u8 {
    let mut shift = at_least.min(MAX_SHIFT);
    while shift < MAX_SHIFT && outboard_len(size, shift) > budget {
        shift += 1;
    }
    shift
}

/// A blob's outboard whose tree is known to hash to the blob's digest:
/// either checked ([`Outboard::verify`]) or computed from the data
/// ([`OutboardHasher`]). Cheap to clone.
#[derive(Clone)]
pub struct Outboard {
    inner: Arc<Inner>,
}

struct Inner {
    blob: B3Digest,
    size: u64,
    shift: u8,
    /// The pre-order parent pairs.
    data: Bytes,
    /// Every group's chaining value, in order; empty for a one-group blob,
    /// whose only group is checked against the blob digest itself.
    leaves: Vec<ChainingValue>,
}

impl Outboard {
    /// Checks an outboard received for blob `blob` of `size` bytes at
    /// `shift`: its length, and that its tree hashes to the digest.
    pub fn verify(blob: B3Digest, size: u64, shift: u8, data: Bytes) -> Result<Self, VerifyError> {
        Self::parse(blob, size, shift, data, true)
    }

    /// Takes an outboard that strata computed itself and stored where no one
    /// else writes (memory, disk): its shape is checked, its hashes are not.
    pub fn trusted(blob: B3Digest, size: u64, shift: u8, data: Bytes) -> Result<Self, VerifyError> {
        Self::parse(blob, size, shift, data, false)
    }

    fn parse(
        blob: B3Digest,
        size: u64,
        shift: u8,
        data: Bytes,
        check: bool,
    ) -> Result<Self, VerifyError> {
        let bad = |why: String| VerifyError::BadOutboard { blob, why };
        if shift > MAX_SHIFT {
            return Err(bad(format!("shift {shift} is above {MAX_SHIFT}")));
        }
        let expected_len = outboard_len(size, shift);
        if data.len() as u64 != expected_len {
            return Err(bad(format!(
                "{} bytes, but a {size}-byte blob at shift {shift} has {expected_len}",
                data.len()
            )));
        }
        let mut walk = Walk {
            data: &data,
            pos: 0,
            group: group_len(shift),
            check,
            leaves: Vec::with_capacity(group_count(size, shift) as usize),
        };
        if size > walk.group {
            walk.parent(0, size, blob.as_bytes(), true)
                .map_err(|offset| bad(format!("parent node at byte {offset} does not hash up")))?;
        }
        let leaves = walk.leaves;
        Ok(Outboard {
            inner: Arc::new(Inner {
                blob,
                size,
                shift,
                data,
                leaves,
            }),
        })
    }

    /// The blob this is the outboard of.
    pub fn blob(&self) -> &B3Digest {
        &self.inner.blob
    }

    /// The blob's length.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// The group shift (groups of `1 KiB << shift`).
    pub fn shift(&self) -> u8 {
        self.inner.shift
    }

    /// Length of a (full) group.
    pub fn group_len(&self) -> u64 {
        group_len(self.inner.shift)
    }

    /// Number of groups.
    pub fn group_count(&self) -> u64 {
        group_count(self.inner.size, self.inner.shift)
    }

    /// The outboard's bytes (pre-order parent pairs).
    pub fn data(&self) -> &Bytes {
        &self.inner.data
    }

    /// The byte range of group `index`.
    pub fn group_range(&self, index: u64) -> std::ops::Range<u64> {
        let start = index * self.group_len();
        start..(start + self.group_len()).min(self.inner.size)
    }

    /// Checks that `data` is group `index` of the blob.
    pub fn check_group(&self, index: u64, data: &[u8]) -> Result<(), VerifyError> {
        let matches = index < self.group_count()
            && data.len() as u64 == {
                let range = self.group_range(index);
                range.end - range.start
            }
            && if self.inner.leaves.is_empty() {
                blake3::hash(data).as_bytes() == self.inner.blob.as_bytes()
            } else {
                group_cv(index * self.group_len(), data) == self.inner.leaves[index as usize]
            };
        if matches {
            Ok(())
        } else {
            Err(VerifyError::GroupMismatch {
                blob: self.inner.blob,
                offset: index.saturating_mul(self.group_len()),
                len: data.len() as u64,
            })
        }
    }

    /// This outboard at a coarser `shift` (or itself, at its own shift).
    /// Returns `None` for a finer one, which needs the data.
    pub fn coarsen(&self, shift: u8) -> Option<Outboard> {
        let own = self.inner.shift;
        if shift == own {
            return Some(self.clone());
        }
        if shift < own || shift > MAX_SHIFT {
            return None;
        }
        let size = self.inner.size;
        if group_count(size, shift) == 1 {
            return Some(Outboard::from_parts(
                self.inner.blob,
                size,
                shift,
                Vec::new(),
            ));
        }
        let fine = group_len(own);
        let coarse = group_len(shift);
        let leaves = (0..group_count(size, shift))
            .map(|i| {
                let start = i * coarse;
                let len = coarse.min(size - start);
                subtree_cv(&self.inner.leaves, fine, start, len)
            })
            .collect();
        Some(Outboard::from_parts(self.inner.blob, size, shift, leaves))
    }

    /// Builds the outboard of a blob from its group chaining values (empty
    /// for a one-group blob), which the caller computed from the data.
    fn from_parts(blob: B3Digest, size: u64, shift: u8, leaves: Vec<ChainingValue>) -> Self {
        let mut data = Vec::with_capacity(outboard_len(size, shift) as usize);
        if !leaves.is_empty() {
            build(&leaves, group_len(shift), 0, size, &mut data);
        }
        Outboard {
            inner: Arc::new(Inner {
                blob,
                size,
                shift,
                data: data.into(),
                leaves,
            }),
        }
    }
}

impl fmt::Debug for Outboard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outboard")
            .field("blob", &self.inner.blob)
            .field("size", &self.inner.size)
            .field("shift", &self.inner.shift)
            .field("bytes", &self.inner.data.len())
            .finish()
    }
}

impl PartialEq for Outboard {
    fn eq(&self, other: &Self) -> bool {
        self.inner.blob == other.inner.blob
            && self.inner.size == other.inner.size
            && self.inner.shift == other.inner.shift
            && self.inner.data == other.inner.data
    }
}

impl Eq for Outboard {}

/// The chaining value of the group at `offset` holding `data` (not the root).
fn group_cv(offset: u64, data: &[u8]) -> ChainingValue {
    let mut hasher = blake3::Hasher::new();
    hasher.set_input_offset(offset);
    hasher.update(data);
    hasher.finalize_non_root()
}

/// The chaining value of the (non-root) subtree over `start..start + len`,
/// from the chaining values of its groups of `group` bytes.
fn subtree_cv(leaves: &[ChainingValue], group: u64, start: u64, len: u64) -> ChainingValue {
    if len <= group {
        return leaves[(start / group) as usize];
    }
    let left = left_subtree_len(len);
    merge_subtrees_non_root(
        &subtree_cv(leaves, group, start, left),
        &subtree_cv(leaves, group, start + left, len - left),
        Mode::Hash,
    )
}

/// Appends the pre-order parent pairs of the subtree over
/// `start..start + len` (more than one group) and returns its chaining value.
fn build(
    leaves: &[ChainingValue],
    group: u64,
    start: u64,
    len: u64,
    out: &mut Vec<u8>,
) -> ChainingValue {
    if len <= group {
        return leaves[(start / group) as usize];
    }
    let at = out.len();
    out.extend_from_slice(&[0; PAIR_LEN]);
    let left = left_subtree_len(len);
    let l = build(leaves, group, start, left, out);
    let r = build(leaves, group, start + left, len - left, out);
    out[at..at + 32].copy_from_slice(&l);
    out[at + 32..at + PAIR_LEN].copy_from_slice(&r);
    merge_subtrees_non_root(&l, &r, Mode::Hash)
}

/// A pre-order walk over received parent pairs.
struct Walk<'a> {
    data: &'a [u8],
    pos: usize,
    group: u64,
    check: bool,
    leaves: Vec<ChainingValue>,
}

impl Walk<'_> {
    /// Walks the parent over `start..start + len` (more than one group),
    /// whose hash should be `expected`. Fails with the offset of the first
    /// pair that does not hash up.
    fn parent(
        &mut self,
        start: u64,
        len: u64,
        expected: &[u8; 32],
        root: bool,
    ) -> Result<(), usize> {
        let at = self.pos;
        let pair = self.data.get(at..at + PAIR_LEN).ok_or(at)?;
        self.pos += PAIR_LEN;
        let mut l = [0u8; 32];
        let mut r = [0u8; 32];
        l.copy_from_slice(&pair[..32]);
        r.copy_from_slice(&pair[32..]);
        if self.check {
            let ok = if root {
                merge_subtrees_root(&l, &r, Mode::Hash).as_bytes() == expected
            } else {
                merge_subtrees_non_root(&l, &r, Mode::Hash) == *expected
            };
            if !ok {
                return Err(at);
            }
        }
        let left = left_subtree_len(len);
        self.child(start, left, &l)?;
        self.child(start + left, len - left, &r)
    }

    fn child(&mut self, start: u64, len: u64, cv: &ChainingValue) -> Result<(), usize> {
        if len <= self.group {
            self.leaves.push(*cv);
            Ok(())
        } else {
            self.parent(start, len, cv, false)
        }
    }
}

/// Computes a blob's digest and outboard in one pass over its bytes, fed in
/// pieces of any size.
pub struct OutboardHasher {
    shift: u8,
    /// Hashes the group being filled.
    group: blake3::Hasher,
    /// Bytes in `group`.
    in_group: u64,
    /// Offset of `group`.
    group_start: u64,
    leaves: Vec<ChainingValue>,
}

impl OutboardHasher {
    /// A hasher producing an outboard at `shift` (at most [`MAX_SHIFT`]).
    pub fn new(shift: u8) -> Self {
        OutboardHasher {
            shift: shift.min(MAX_SHIFT),
            group: blake3::Hasher::new(),
            in_group: 0,
            group_start: 0,
            leaves: Vec::new(),
        }
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.group_start + self.in_group
    }

    /// Whether nothing was fed yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Feeds the next bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        let g = group_len(self.shift);
        while !data.is_empty() {
            if self.in_group == g {
                // Only now is it clear the full group is not the last one.
                self.leaves.push(self.group.finalize_non_root());
                self.group_start += g;
                self.in_group = 0;
                self.group = blake3::Hasher::new();
                self.group.set_input_offset(self.group_start);
            }
            let n = ((g - self.in_group) as usize).min(data.len());
            self.group.update(&data[..n]);
            self.in_group += n as u64;
            data = &data[n..];
        }
    }

    /// The digest of everything fed, and its outboard.
    pub fn finalize(mut self) -> (B3Digest, Outboard) {
        let size = self.len();
        let digest = if self.leaves.is_empty() {
            self.leaves.clear();
            B3Digest::from(self.group.finalize())
        } else {
            self.leaves.push(self.group.finalize_non_root());
            let g = group_len(self.shift);
            let left = left_subtree_len(size);
            let l = subtree_cv(&self.leaves, g, 0, left);
            let r = subtree_cv(&self.leaves, g, left, size - left);
            B3Digest::from(merge_subtrees_root(&l, &r, Mode::Hash))
        };
        let outboard = Outboard::from_parts(digest, size, self.shift, self.leaves);
        (digest, outboard)
    }
}

/// The digest and outboard of `data` at `shift`.
pub fn outboard_of(data: &[u8], shift: u8) -> (B3Digest, Outboard) {
    let mut hasher = OutboardHasher::new(shift);
    hasher.update(data);
    hasher.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::pseudo_random;

    /// Sizes around group and tree boundaries.
    const SIZES: &[usize] = &[
        0,
        1,
        1023,
        1024,
        1025,
        16 * 1024 - 1,
        16 * 1024,
        16 * 1024 + 1,
        32 * 1024,
        48 * 1024 + 5,
        100_000,
        1 << 20,
        (1 << 20) + 3 * 1024 + 7,
    ];

    #[test]
    fn digest_is_blake3() {
        for &size in SIZES {
            let data = pseudo_random(size, 1);
            for shift in [0, 2, 4, 7] {
                let (digest, ob) = outboard_of(&data, shift);
                assert_eq!(digest, B3Digest::of(&data), "size {size} shift {shift}");
                assert_eq!(ob.data().len() as u64, outboard_len(size as u64, shift));
            }
        }
    }

    #[test]
    fn shift_zero_equals_the_bao_crate() {
        for &size in SIZES {
            let data = pseudo_random(size, 2);
            let (expected, hash) = bao::encode::outboard(&data);
            let (digest, ob) = outboard_of(&data, 0);
            assert_eq!(digest.as_bytes(), hash.as_bytes());
            assert_eq!(&ob.data()[..], &expected[8..], "size {size}");
        }
    }

    #[test]
    fn pieces_of_any_size_give_the_same_outboard() {
        let data = pseudo_random(300_000, 3);
        let whole = outboard_of(&data, 4).1;
        for piece in [1, 1000, 16 * 1024, 70_000] {
            let mut h = OutboardHasher::new(4);
            for p in data.chunks(piece) {
                h.update(p);
            }
            assert_eq!(h.finalize().1, whole, "pieces of {piece}");
        }
    }

    #[test]
    fn coarsening_equals_computing_at_that_shift() {
        for &size in SIZES {
            let data = pseudo_random(size, 4);
            let fine = outboard_of(&data, 4).1;
            for shift in [4, 5, 6, 9, 12] {
                assert_eq!(
                    fine.coarsen(shift).unwrap(),
                    outboard_of(&data, shift).1,
                    "size {size} shift {shift}"
                );
            }
            assert!(fine.coarsen(3).is_none());
        }
    }

    #[test]
    fn verify_accepts_the_real_outboard_and_checks_groups() {
        let data = pseudo_random(200_000, 5);
        let (digest, ob) = outboard_of(&data, 4);
        let v = Outboard::verify(digest, data.len() as u64, 4, ob.data().clone()).unwrap();
        for i in 0..v.group_count() {
            let r = v.group_range(i);
            v.check_group(i, &data[r.start as usize..r.end as usize])
                .unwrap();
        }
        let mut bad = data[16 * 1024..32 * 1024].to_vec();
        bad[7] ^= 1;
        assert!(matches!(
            v.check_group(1, &bad),
            Err(VerifyError::GroupMismatch { offset: 16384, .. })
        ));
        // A group at the wrong index, and a short group, fail too.
        assert!(v.check_group(2, &data[16 * 1024..32 * 1024]).is_err());
        assert!(v.check_group(1, &data[16 * 1024..32 * 1024 - 1]).is_err());
        assert!(v.check_group(99, &data[..16 * 1024]).is_err());
    }

    #[test]
    fn single_group_blobs_check_against_the_digest() {
        let data = pseudo_random(5000, 6);
        let (digest, ob) = outboard_of(&data, 4);
        assert!(ob.data().is_empty());
        let v = Outboard::verify(digest, 5000, 4, Bytes::new()).unwrap();
        v.check_group(0, &data).unwrap();
        assert!(v.check_group(0, &data[1..]).is_err());
    }

    #[test]
    fn verify_rejects_tampered_wrong_or_misshaped_outboards() {
        let data = pseudo_random(500_000, 7);
        let (digest, ob) = outboard_of(&data, 4);
        let size = data.len() as u64;
        for at in [0, 31, 32, 64 * 5 + 3, ob.data().len() - 1] {
            let mut t = ob.data().to_vec();
            t[at] ^= 0x80;
            assert!(
                Outboard::verify(digest, size, 4, t.into()).is_err(),
                "flip at {at}"
            );
        }
        let other = outboard_of(&pseudo_random(500_000, 8), 4).1;
        assert!(Outboard::verify(digest, size, 4, other.data().clone()).is_err());
        // The tree does not commit to the size within the last group (only
        // checking that group does), but a size with another group count
        // cannot match.
        assert!(Outboard::verify(digest, size + 20_000, 4, ob.data().clone()).is_err());
        assert!(Outboard::verify(digest, size, 5, ob.data().clone()).is_err());
        let mut long = ob.data().to_vec();
        long.extend_from_slice(&[0; 64]);
        assert!(Outboard::verify(digest, size, 4, long.into()).is_err());
        assert!(Outboard::verify(digest, size, 40, Bytes::new()).is_err());
    }

    #[test]
    fn shift_within_budget() {
        let gib = 1 << 30;
        assert_eq!(outboard_len(gib, 4), (65536 - 1) * 64);
        assert_eq!(shift_within(gib, 4, 4 << 20), 4);
        assert_eq!(shift_within(gib, 4, 3 << 20), 5);
        assert_eq!(shift_within(1 << 40, 4, 3 << 20), 15);
        assert_eq!(shift_within(10, 0, 0), 0);
    }
}
